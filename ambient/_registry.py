"""The :class:`Registry`: recipes for components, and the USER and APP instances."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import anyio.from_thread
from opentelemetry import context as otel_context

from ambient import _checks, _observe
from ambient._binding import _current
from ambient._context import UserExecutionContext, UserRef
from ambient._instances import (
    Created,
    Instances,
    cleaned_apart,
    finalize,
    finalize_sync,
    needs_await,
    not_run,
)
from ambient._loops import loop_call_soon
from ambient._observe import Observer
from ambient._provider import Lifetime, key_from_annotation, key_name, make_provider
from ambient._scope import Scope
from ambient.errors import CleanupError, RegistryError, ResolutionError, ScopeClosedError

if TYPE_CHECKING:
    from ambient._provider import Provider

__all__ = ["Registry", "RegistryStats", "UserEntry"]

logger = logging.getLogger("ambient")

# Seconds of ``clock`` between two warnings that the users in use are past max_users.
_WARN_OVER_EVERY = 60.0

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_IDLE_TTL = 300.0


def _check_key(key: object) -> None:
    """Refuse a key no scope could resolve, naming it (rather than Python's bare
    "unhashable type" from the lookup)."""
    try:
        hash(key)
    except TypeError:
        msg = f"a component's key must be hashable (usually the component's class), not {key!r:.64}"
        raise RegistryError(msg) from None
    if key is None:
        # What a failed optional import or a missing annotation leaves: no caller means
        # to resolve None.
        msg = "a component's key must not be None (usually it is the component's class)"
        raise RegistryError(msg)


@dataclass(frozen=True, slots=True)
class RegistryStats:
    """A snapshot of what a registry has done.

    Attributes:
        open_scopes: Scopes open right now.
        live_users: Users with live USER components (in use or idle).
        live_user_components: USER components alive right now.
        created: Components created so far (every lifetime).
        cleaned: Components cleaned up so far.
        cleanup_failures: Cleanups that raised or timed out.
    """

    open_scopes: int
    live_users: int
    live_user_components: int
    created: int
    cleaned: int
    cleanup_failures: int


class UserEntry:
    """One user's USER components and how many open scopes hold them."""

    __slots__ = ("ephemeral", "idle_since", "instances", "ref", "refs")

    def __init__(self, ref: UserRef, *, ephemeral: bool = False) -> None:
        self.ref = ref
        self.instances = Instances("user")
        self.refs = 0
        self.idle_since: float | None = None
        # A user that can never come back (an anonymous caller): cleaned once unused.
        self.ephemeral = ephemeral


_CallSoon = Callable[[Callable[[], object]], object]


def _loop_key(call_soon: _CallSoon | None) -> object:
    """The event loop (trio: its run's token) ``call_soon`` runs callbacks on."""
    return getattr(call_soon, "__self__", call_soon)


class _Closing:
    """An :meth:`Registry.aclose` under way, which every call made meanwhile waits for: its
    event loop, and how it ended.

    Those calls may run on other event loops (two servers in two threads sharing one
    registry): each loop's callers wait on an event of their own loop, set through that
    loop, as the close ends."""

    __slots__ = ("done", "failures", "frozen", "lock", "loop", "waiters")

    def __init__(self, *, frozen: bool) -> None:
        # Whether a scope had opened before: the registry stays frozen to registrations.
        self.frozen = frozen
        self.loop = _loop_key(loop_call_soon())
        self.lock = threading.Lock()
        self.done = False
        self.failures: list[Exception] = []
        self.waiters: dict[object, tuple[_CallSoon, anyio.Event]] = {}

    def waiter(self) -> anyio.Event | None:
        """The event this loop's callers wait on; ``None`` once the close has ended."""
        call_soon = loop_call_soon()
        if call_soon is None:  # pragma: no cover - awaited, so some loop runs here
            msg = "registry.aclose() can only be awaited on an event loop"
            raise RuntimeError(msg)
        loop = _loop_key(call_soon)
        with self.lock:
            if self.done:
                return None
            found = self.waiters.get(loop)
            if found is None:
                found = self.waiters[loop] = (call_soon, anyio.Event())
        return found[1]

    def finish(self, failures: list[Exception]) -> None:
        """Record how the close ended and wake every caller waiting for it."""
        with self.lock:
            self.done = True
            self.failures = failures
            waiters = list(self.waiters.values())
        for call_soon, event in waiters:
            # A RuntimeError: that loop has finished, and nothing there waits any more.
            with contextlib.suppress(RuntimeError):
                call_soon(event.set)


class Registry:
    """Recipes for components, and the owner of every USER and APP instance.

    Args:
        cleanup_timeout: Seconds an async cleanup may take before it is abandoned.
        max_users: Users whose USER components are kept; past it, the least recently used
            users that no open scope holds are evicted (never one in use). Users in use
            past it are logged as a warning, at most once a minute.
        clock: Monotonic clock for ``idle_ttl`` expiry (inject one in tests).
        telemetry: An :class:`~ambient.telemetry.Telemetry` (or any observer) that sees
            this registry's scopes and components.

    Raises:
        ValueError: ``cleanup_timeout`` not above 0 or infinite, ``max_users`` below 1.
        TypeError: an option of another type: ``cleanup_timeout`` no number,
            ``max_users`` no whole number, ``clock`` not callable, ``telemetry`` no
            :class:`~ambient.Observer`.

    Example::

        registry = Registry()
        registry.register(ToolDispatcher, ToolDispatcher)            # per request
        registry.register(Memory, Memory, lifetime=Lifetime.USER)   # per user

        async with registry.open_scope(UserExecutionContext.create("alice")):
            dispatcher = await ambient.resolve(ToolDispatcher)
    """

    def __init__(
        self,
        *,
        cleanup_timeout: float = 10.0,
        max_users: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Observer | None = None,
    ) -> None:
        cleanup_timeout = _checks.number(cleanup_timeout, "cleanup_timeout")
        if not cleanup_timeout > 0:
            msg = f"cleanup_timeout must be > 0 seconds, not {cleanup_timeout!r}"
            raise ValueError(msg)
        max_users = _checks.whole(max_users, "max_users", "users")
        if max_users < 1:
            msg = f"max_users must be an int >= 1, not {max_users!r}"
            raise ValueError(msg)
        clock = _checks.clock(clock)
        if telemetry is not None:
            _observe.checked(telemetry, "telemetry")
        self.cleanup_timeout = cleanup_timeout
        self.max_users = max_users
        self.telemetry = telemetry
        self._clock = clock
        self._observers: tuple[Observer, ...] = () if telemetry is None else (telemetry,)
        self.providers: dict[Hashable, Provider] = {}
        self.app_instances = Instances("registry")
        self._frozen = False
        self._lock = threading.Lock()
        self._users: OrderedDict[UserRef, UserEntry] = OrderedDict()
        self._idle = 0
        self._next_expiry = math.inf
        self._evicted: list[UserEntry] = []
        # Whether the users in use are past max_users, said once: a burst of thousands of
        # users at once would otherwise be thousands of warnings. And said at most once a
        # minute (of ``clock``): a registry going back and forth across the limit would
        # otherwise say it at every crossing.
        self._over_max_users = False
        self._warned_over_at = -math.inf
        # The scopes' own observers (the middleware's telemetry), for the cleanups that
        # happen outside any scope. Weakly: an observer an application opened one scope
        # with and then dropped must not stay here (nor be told of every later cleanup)
        # for as long as the registry lives; one per scope would pile up.
        # Replaced, never changed in place: a cleanup in another thread (a second event
        # loop's) reads the tuple it took while scopes opening here note more.
        self._extras: tuple[weakref.ref[Observer], ...] = ()
        self._kept_extras: tuple[Observer, ...] = ()  # those that cannot be weakly held
        self._extras_lock = threading.Lock()
        # The last one noted, strongly: the middleware passes the same one to every scope,
        # found here at the cost of one comparison, and one kept does not pile up.
        self._last_extra: Observer | None = None
        # Open scopes whose caches hold USER or APP components.
        self._sharing: set[Scope] = set()
        self.open_scopes = 0
        # Set when the last open scope closes, while shutdown waits for that.
        self._scopes_closed: anyio.Event | None = None
        self._scope_waiters = 0
        # Calls cleaning users' components right now, and aclose()s waiting for them to end.
        self._users_cleaning = 0
        self._users_cleaned: list[anyio.Event] = []
        # The last aclose(), under way or done: calls made meanwhile wait for it. Once one
        # has begun (it clears _frozen) the registry is closed, until a scope opens once it
        # has ended (the application started again): the first to open sets _frozen.
        self._closing: _Closing | None = None
        # How many times aclose() has closed the registry: a scope opened before the last
        # close makes no more USER or APP components, even once a later scope opened it again.
        self._closes = 0
        self.created = 0
        self.cleaned = 0
        self.cleanup_failures = 0

    # -- registration --------------------------------------------------------------------

    def register(
        self,
        key: Hashable,
        factory: Callable[..., Any],
        *,
        lifetime: Lifetime = Lifetime.REQUEST,
        name: str | None = None,
        idle_ttl: float | None = None,
        enter: bool = True,
        replace: bool = False,
    ) -> None:
        """Register ``factory`` as the recipe for ``key`` (usually the component's class).

        Args:
            key: What users resolve.
            factory: A callable, class, ``async def``, generator or async generator (code
                after its single ``yield`` is the cleanup). A REQUEST factory may take the
                request's context, a USER factory the :class:`UserRef`, an APP factory
                nothing; any may take no argument.
            lifetime: REQUEST (default), USER or APP.
            name: Name in errors, logs and telemetry (default: the key's name): a
                non-empty str, in any script, without line breaks or control characters.
            idle_ttl: USER only: seconds after the user's last scope closes before the
                component is cleaned (default 300; finite: infinity is refused). A USER
                component that another one's factory resolved lives at least as long as
                that one (it may hold it).
            enter: Enter a result that is an (async) context manager (default); with
                ``False`` only ``aclose()``/``close()`` is called.
            replace: Allow replacing an earlier registration (for tests).

        Raises:
            RegistryError: duplicate key, frozen registry, unusable key, factory or name,
                ``enter`` or ``replace`` that is no bool.
        """
        _check_key(key)
        if type(enter) is not bool:
            # Truthy text ("no") entered what it was meant to keep from being entered.
            msg = f"enter must be True or False, not {enter!r:.64}"
            raise RegistryError(msg)
        if type(replace) is not bool:
            # As enter: truthy text ("no") replaced the registration it was meant to keep.
            msg = f"replace must be True or False, not {replace!r:.64}"
            raise RegistryError(msg)
        if self._frozen or (self._closing is not None and self._closing.frozen):
            msg = (
                f"cannot register {key_name(key)}: the registry is frozen because a scope "
                "has been opened; register every component at start-up"
            )
            raise RegistryError(msg)
        if key in self.providers and not replace:
            msg = (
                f"{key_name(key)} is already registered; pass replace=True to replace it "
                "(meant for tests)"
            )
            raise RegistryError(msg)
        if idle_ttl is not None and lifetime is not Lifetime.USER:
            shown = lifetime.name if isinstance(lifetime, Lifetime) else repr(lifetime)
            msg = f"idle_ttl applies to USER components only, not {shown}"
            raise RegistryError(msg)
        self.providers[key] = make_provider(
            key,
            factory,
            lifetime=lifetime,
            name=name,
            enter=enter,
            idle_ttl=DEFAULT_IDLE_TTL if idle_ttl is None else idle_ttl,
        )

    @overload
    def provide(self, factory: F, /) -> F: ...
    @overload
    def provide(
        self,
        *,
        lifetime: Lifetime = ...,
        name: str | None = ...,
        idle_ttl: float | None = ...,
        enter: bool = ...,
    ) -> Callable[[F], F]: ...

    def provide(  # type: ignore[misc]  # mypy misreads the keyword-only overload
        self,
        factory: Callable[..., Any] | None = None,
        /,
        *,
        lifetime: Lifetime = Lifetime.REQUEST,
        name: str | None = None,
        idle_ttl: float | None = None,
        enter: bool = True,
    ) -> Any:
        """Decorator form of :meth:`register`; the key is the factory's return annotation,
        unwrapped as its result is (``Iterator[X]``, ``AsyncIterator[X]``, ``Awaitable[X]``
        and, unless ``enter=False``, ``AbstractAsyncContextManager[X]`` and
        ``AbstractContextManager[X]`` give ``X``; ``Annotated`` metadata is kept, so
        ``Annotated[Iterator[X], m]`` gives ``Annotated[X, m]``), or the class itself.

        Example::

            @registry.provide(lifetime=Lifetime.USER)
            async def memory(user: UserRef) -> AsyncIterator[Memory]:
                async with Memory.open(user.user_id) as m:
                    yield m
        """

        def decorate(fn: F) -> F:
            self.register(
                key_from_annotation(fn, enter=enter),
                fn,
                lifetime=lifetime,
                name=name,
                idle_ttl=idle_ttl,
                enter=enter,
            )
            return fn

        if factory is not None:
            if not callable(factory):
                # `@registry.provide(Lifetime.USER)` or `@registry.provide(key)`: the
                # annotation reader's complaint about it would not say what was meant.
                hint = (
                    f"the lifetime as a keyword: @registry.provide(lifetime={factory})"
                    if isinstance(factory, Lifetime)
                    else "no key: use registry.register(key, factory) to choose one"
                )
                msg = f"provide() decorates a factory and takes {hint}"
                raise RegistryError(msg)
            return decorate(factory)
        return decorate

    def unknown_key(self, key: Hashable) -> ResolutionError:
        """The error for resolving an unregistered key."""
        names = ", ".join(sorted(p.name for p in self.providers.values())) or "nothing yet"
        return ResolutionError(
            f"no component is registered for {key_name(key)}; registered: {names}. "
            "Register it with registry.register(key, factory)"
        )

    # -- scopes --------------------------------------------------------------------------

    def open_scope(
        self,
        ctx: UserExecutionContext,
        *,
        allow_switch: bool = False,
        observer: Observer | None = None,
    ) -> Scope:
        """Return a :class:`Scope` for ``ctx``; ``async with`` it to bind and clean up.

        Args:
            ctx: The context to bind.
            allow_switch: Allow opening it while another user's context is bound.
            observer: An extra observer for this scope (the middleware passes the
                telemetry it was given). It is also told when the USER and APP components
                it saw made are cleaned up later, outside any scope, for as long as
                the caller keeps it (the registry does not keep it alive).

        Raises:
            TypeError: ``ctx`` is not a :class:`UserExecutionContext`.
        """
        if not isinstance(ctx, UserExecutionContext):
            msg = f"open_scope() takes a UserExecutionContext, not {type(ctx).__name__}"
            raise TypeError(msg)
        return Scope(self, ctx, allow_switch=allow_switch, observer=observer)

    def scope_observers(self, extra: Observer | None) -> tuple[Observer, ...]:
        """The observers a scope opening now reports to: this registry's, the process-wide
        ones and ``extra``, each only while it is :attr:`~ambient.Observer.active`."""
        own = self._observers
        if extra is not None and extra is not self._last_extra:
            self._note_extra(extra)
        if _observe.observers or (own and extra is not None):
            every = self.observers()
            if extra is not None and extra not in every:
                every = (*every, extra)
            if len(every) > 1:
                return tuple(o for o in every if o.active)
            observer = every[0]
        elif extra is None:
            # The common cases, without building a tuple: no observer, or one telemetry.
            if not own:
                return ()
            observer = own[0]  # the only one: the registry's telemetry
        else:
            observer = extra  # the scope's alone (the middleware's telemetry)
        # Not asked while it says it stays inactive: a clock read instead of a call.
        until = observer.inactive_until
        if until is not None and monotonic() < until:
            return ()
        if not observer.active:
            return ()
        return own if own else (observer,)

    def _note_extra(self, extra: Observer) -> None:
        # It may see USER and APP components made: it must see them cleaned too, which
        # happens outside any scope (expiry, eviction, aclose), while someone holds it.
        self._last_extra = extra
        try:
            ref = weakref.ref(extra)
        except TypeError:  # cannot be weakly referred to: kept for good
            with self._extras_lock:
                if extra not in self._kept_extras:
                    self._kept_extras = (*self._kept_extras, extra)
            return
        with self._extras_lock:
            live = [noted for noted in self._extras if noted() is not None]
            if not any(noted() is extra for noted in live):
                live.append(ref)
            self._extras = tuple(live)

    def observers(self) -> tuple[Observer, ...]:
        """This registry's telemetry plus the process-wide observers, as of now."""
        shared = _observe.observers
        own = self._observers
        if shared and own:
            if own[0] in shared:
                # Given to the registry and installed process-wide too: still one of each
                # event (a span started twice is ended once, a probe counts cleanups twice).
                return own + tuple(o for o in shared if o is not own[0])
            return own + shared
        return own or shared

    def _cleanup_observers(self) -> tuple[Observer, ...]:
        """Who sees USER and APP components cleaned: the registry's observers and every
        scope observer that could have seen them made, while active."""
        every = self.observers()
        extras = [extra for noted in self._extras if (extra := noted()) is not None]
        extras += self._kept_extras
        every = every + tuple(e for e in extras if e not in every)
        return tuple(o for o in every if o.active)

    def before_open(self) -> None:
        """Freeze the registry as its first scope opens, and open it again as the first
        scope after :meth:`aclose` does. Not while that close is still under way: a scope
        opening during shutdown would otherwise have the scopes still open make USER and
        APP components again, which the close, past taking them, never cleans up."""
        with self._lock:
            closing = self._closing
            if closing is None or closing.done:
                self._frozen = True

    # -- USER entries --------------------------------------------------------------------

    def acquire_user(self, ref: UserRef, *, ephemeral: bool = False) -> UserEntry:
        """Take a reference on ``ref``'s entry, creating it (and evicting LRU) as needed;
        an ``ephemeral`` one is cleaned up as soon as no scope holds it."""
        # acquire()/release() rather than `with` (about twice the cost): once per request
        # that uses USER components, and again in release_user().
        lock = self._lock
        lock.acquire()
        try:
            entry = self._users.get(ref)
            if entry is None:
                if self._closing is not None and not self._frozen:
                    raise self._shut_error("USER components")
                entry = self._users[ref] = UserEntry(ref, ephemeral=ephemeral)
                entry.refs = 1  # before eviction, which must never pick this new entry
                if len(self._users) > self.max_users:
                    self._evict_lru()
                return entry
            if entry.refs == 0:
                self._idle -= 1
            entry.refs += 1
            entry.idle_since = None
        finally:
            lock.release()
        return entry

    def release_user(self, entry: UserEntry) -> None:
        """Drop one reference on ``entry``; the last one starts its idle clock."""
        lock = self._lock
        lock.acquire()
        try:
            entry.refs -= 1
            if entry.refs == 0 and self._users.get(entry.ref) is entry:
                if entry.ephemeral:
                    del self._users[entry.ref]
                    self._evicted.append(entry)
                    if self._over_max_users and len(self._users) <= self.max_users:
                        # Back within the limit without an eviction: the next burst past
                        # it is reported again.
                        self._over_max_users = False
                    return
                # Least recently used is least recently released (not acquired): a long
                # request that began before another user's short one used its user after it.
                # Only the idle users' order counts: eviction never takes one in use.
                self._users.move_to_end(entry.ref)
                now = self._clock()
                entry.idle_since = now
                self._idle += 1
                shortest = min((p.idle_ttl for p, _, _ in entry.instances.created), default=0.0)
                self._next_expiry = min(self._next_expiry, now + shortest)
                if len(self._users) > self.max_users:
                    # A burst of users in flight at once went past max_users: shrink back
                    # as they leave, not when some later user arrives.
                    if self._idle == 1:
                        # The only idle user is this one (every other user over the limit
                        # is in use): no walk over them all for each user that leaves.
                        del self._users[entry.ref]
                        self._idle = 0
                        self._evicted.append(entry)
                        if len(self._users) <= self.max_users:
                            self._over_max_users = False
                    else:
                        self._evict_lru(warn=False)
        finally:
            lock.release()

    def made_while_idle(self, entry: UserEntry, provider: Provider) -> None:
        """Note ``provider``'s component, made for ``entry`` by work its closed scope left
        running: the user's last scope may have released the entry before, reckoning its
        expiry without this component, which may be due first."""
        with self._lock:
            if entry.refs == 0 and entry.idle_since is not None:
                self._next_expiry = min(self._next_expiry, entry.idle_since + provider.idle_ttl)

    def _evict_lru(self, *, warn: bool = True) -> None:
        excess = len(self._users) - self.max_users
        # Past max_users in a burst, this runs for every user admitted and released: walk
        # the users only while some are idle, and only as far as the idle ones to evict.
        if self._idle:
            victims: list[UserEntry] = []
            for entry in self._users.values():
                if entry.refs == 0:
                    victims.append(entry)
                    if len(victims) == excess or len(victims) == self._idle:
                        break
            for entry in victims:
                del self._users[entry.ref]
            self._idle -= len(victims)
            self._evicted += victims
            excess -= len(victims)
        if excess <= 0:
            self._over_max_users = False
        elif warn and not self._over_max_users:
            self._over_max_users = True
            now = self._clock()
            if now - self._warned_over_at >= _WARN_OVER_EVERY:
                self._warned_over_at = now
                logger.warning(
                    "ambient: %d users hold USER components in open scopes, above "
                    "max_users=%d; none can be evicted while in use (reported once until "
                    "they are back within it, at most once a minute)",
                    len(self._users),
                    self.max_users,
                )

    async def close_evicted(self) -> None:
        """Clean up users evicted by ``max_users``."""
        if not self._evicted:
            return
        with self._lock:
            evicted, self._evicted = self._evicted, []
        await self._close_all([(entry, entry.instances.close()) for entry in evicted])

    def clean_up_refused(
        self, created: list[Created], scope: Scope, observers: tuple[Observer, ...]
    ) -> None:
        """Clean up components made for ``scope`` that its store refused, having closed
        while they were made (by a worker thread): at once when every cleanup is sync;
        otherwise on the event loop, by the next scope of this registry that opens or
        closes, or by :meth:`aclose`; once the registry is closed (at shutdown, when no
        such scope may come), on the loop of the anyio worker thread this is, at once. A
        thread that has no loop to run them on then (one no anyio loop started, or whose
        loop has ended) runs the sync cleanups and reports each async one as a failed
        cleanup that could not run: logged, counted and seen by observers."""
        with cleaned_apart(created[0][0]):
            if not needs_await(created):
                finalize_sync(created, None, self, scope._user_ref(), observers, scope)
                return
            if self._closing is not None and not self._frozen:
                try:
                    anyio.from_thread.run(
                        self._close_all, [(UserEntry(scope._user_ref()), created)]
                    )
                except RuntimeError:
                    # Queued, they would wait for a scope or a close that shutdown ruled out.
                    self._cannot_clean(created, scope, observers)
                return
        self._queue_cleanup(scope._user_ref(), created)

    def _cannot_clean(
        self, created: list[Created], scope: Scope, observers: tuple[Observer, ...]
    ) -> None:
        """Run the sync cleanups of ``created`` here, and report the async ones, which this
        thread has no event loop to await, as failed cleanups that could not run."""
        user = scope._user_ref()
        runnable: list[Created] = []
        pending: list[Created] = []
        for one in created:
            finalizer = one[2]
            (pending if finalizer is not None and finalizer.is_async else runnable).append(one)
        finalize_sync(runnable, None, self, user, observers, scope)
        for provider, instance, _ in reversed(pending):
            error = RuntimeError(
                "it is async and could not run: the component was made in a thread with no "
                "event loop to await it (a thread no anyio loop started, or one whose loop "
                "has ended) after its scope closed and the registry was closed at shutdown, "
                "so no later scope or close of the registry runs it. Work still running "
                "after shutdown must not resolve components: hold the scope "
                "(ContextExecutor.submit_held, run_sync_in_thread(..., "
                "abandon_on_cancel=True)) or end the work before shutdown"
            )
            not_run(self, provider, instance, user, observers, scope, error)

    def _queue_cleanup(self, ref: UserRef, created: list[Created]) -> None:
        """Queue the cleanup of ``created`` (made for ``ref``) for the next scope of this
        registry that closes, or :meth:`aclose`: as an evicted user's entry, which
        expiry_due() sees at no extra cost."""
        entry = UserEntry(ref, ephemeral=True)
        entry.instances.created = created
        with self._lock:
            self._evicted.append(entry)

    def expiry_due(self) -> bool:
        """Whether evicted or expired USER components wait for cleanup."""
        return bool(self._evicted) or bool(self._idle and self._clock() >= self._next_expiry)

    async def expire_idle(self) -> None:
        """Clean up USER components whose ``idle_ttl`` has passed (cheap when none has)."""
        if self._evicted:
            await self.close_evicted()
        if not self._idle or self._clock() < self._next_expiry:
            return
        await self.sweep()

    async def sweep(self) -> None:
        """Clean up every USER component whose ``idle_ttl`` has passed, now, and those
        waiting for the next scope of this registry that closes (users evicted for
        ``max_users`` or taken out of use as a request opened)."""
        await self.close_evicted()
        await self._close_all(self._take_expired())

    def _queue_expired(self) -> None:
        """Take the USER components whose ``idle_ttl`` has passed out of use, now, and
        queue their cleanup for the next scope of this registry that closes (or
        :meth:`aclose`): a request opening does not wait for another user's cleanups, and a
        user coming back gets fresh components at once."""
        if not self._idle or self._clock() < self._next_expiry:
            return
        for entry, expired in self._take_expired():
            self._queue_cleanup(entry.ref, expired)

    def _take_expired(self) -> list[tuple[UserEntry, list[Created]]]:
        """Take every USER component whose ``idle_ttl`` has passed out of its user's store."""
        now = self._clock()
        due: list[tuple[UserEntry, list[Created]]] = []
        with self._lock:
            next_expiry = math.inf
            for ref, entry in list(self._users.items()):
                if entry.refs or entry.idle_since is None:
                    continue
                instances = entry.instances
                with instances.lock:
                    # A component a factory resolved lives as long as what it was made for.
                    ttls = instances.idle_ttls()
                    expired: list[Created] = []
                    kept: list[Created] = []
                    for created in instances.created:
                        ttl = created[0].idle_ttl if ttls is None else ttls[created[0].key]
                        done = entry.idle_since + ttl <= now
                        (expired if done else kept).append(created)
                        if not done:
                            next_expiry = min(next_expiry, entry.idle_since + ttl)
                    instances.created = kept
                    instances.async_cleanups = sum(
                        1 for _, _, f in kept if f is not None and f.is_async
                    )
                    deps = instances.deps
                    for created in expired:
                        instances.cache.pop(created[0].key, None)
                        if deps is not None:
                            deps.pop(created[0].key, None)
                    if not kept:
                        # Under the store's lock: a worker thread storing a component
                        # between the two would leave it in a store nothing cleans.
                        instances.closed = True
                if not kept:
                    del self._users[ref]
                    self._idle -= 1
                if expired:
                    due.append((entry, expired))
            self._next_expiry = next_expiry
        return due

    async def _close_all(
        self, due: list[tuple[UserEntry, list[Any]]], app: list[Any] | None = None
    ) -> list[Exception]:
        """Clean up users' components, each user's in a task of its own, then the app's.

        Users do not wait for each other: a user whose cleanups hang for their
        ``cleanup_timeout`` would otherwise hold up every user after it, and the request or
        the shutdown waiting for them all. Every user's cleanups run to their end even when
        the caller is cancelled meanwhile (these were taken out of the registry: nothing
        would clean them later); a native asyncio cancellation (``asyncio.timeout`` around
        a request), which passes anyio's shield, is raised once all are done.
        """
        failures: list[Exception] = []
        interrupted: list[BaseException] = []

        async def clean(cleanup: Callable[[], Awaitable[list[Exception]]]) -> None:
            with anyio.CancelScope(shield=True):
                try:
                    failures.extend(await cleanup())
                except BaseException as exc:  # noqa: BLE001 - raised below, after the rest
                    interrupted.append(exc)

        async def in_tasks(cleanups: list[Callable[[], Awaitable[list[Exception]]]]) -> None:
            # In tasks of their own even for one user: a native cancellation of the caller
            # lands in the caller, waiting here, never inside a cleanup.
            try:
                async with anyio.create_task_group() as group:
                    for cleanup in cleanups:
                        group.start_soon(clean, cleanup)
            except BaseException as exc:  # noqa: BLE001 - raised below
                interrupted.append(exc)

        with anyio.CancelScope(shield=True):
            if due:
                self._users_cleaning += 1
                try:
                    await in_tasks(
                        [
                            functools.partial(self._clean_apart, created, entry.ref)
                            for entry, created in due
                        ]
                    )
                finally:
                    self._users_cleaning -= 1
                    if not self._users_cleaning:
                        waiting, self._users_cleaned = self._users_cleaned, []
                        for event in waiting:
                            event.set()
            if app:
                try:
                    await self._wait_for_user_cleanups()
                except BaseException as exc:  # noqa: BLE001 - raised below, after the app's
                    interrupted.append(exc)
                await in_tasks([functools.partial(self._clean_apart, app, None)])
        if interrupted:
            raise interrupted[0]
        return failures

    async def _wait_for_user_cleanups(self) -> None:
        """Wait until no user's cleanup runs (at most ``cleanup_timeout``): before the app's
        components go, an expiry or eviction another task started (a request that ended
        as shutdown began) may still return what they made to them (a connection to its
        pool), as aclose()'s own users' cleanups have."""
        if not self._users_cleaning:
            return
        event = anyio.Event()
        self._users_cleaned.append(event)
        try:
            with anyio.move_on_after(self.cleanup_timeout):
                await event.wait()
        finally:
            if event in self._users_cleaned:
                self._users_cleaned.remove(event)

    async def _clean_apart(self, created: list[Any], user: UserRef | None) -> list[Exception]:
        # Expiry, eviction and aclose() run inside whichever request comes along, often
        # another user's: nothing of that request may be bound while a user's or the app's
        # components go (their cleanups would log, trace and resolve as that request's
        # user, and their spans would join its trace, carrying its baggage).
        token = _current.set(None)
        trace_token = otel_context.attach(otel_context.Context())
        try:
            return await finalize(created, None, self, user, self._cleanup_observers())
        finally:
            otel_context.detach(trace_token)
            _current.reset(token)

    # -- shutdown and stats --------------------------------------------------------------

    async def wait_for_scopes(self) -> int:
        """Wait until no scope of this registry is open, at most the registry's
        ``cleanup_timeout``; return how many still are (wrap the call in
        ``anyio.move_on_after`` to wait less).

        For shutdown: a server that cancelled its last requests starts its lifespan
        shutdown while their shielded cleanups still run, and those may still use USER and
        APP components.
        """
        if self.open_scopes:
            # One event for every caller waiting at once: each replacing it, or dropping it
            # when done, left the others waiting for the whole timeout.
            event = self._scopes_closed
            if event is None or event.is_set():
                event = self._scopes_closed = anyio.Event()
            self._scope_waiters += 1
            try:
                with anyio.move_on_after(self.cleanup_timeout):
                    await event.wait()
            finally:
                self._scope_waiters -= 1
                if not self._scope_waiters:
                    self._scopes_closed = None
        return self.open_scopes

    async def aclose(self) -> None:
        """Clean up every USER and APP component (application shutdown), and close the
        registry.

        Scopes still open keep their REQUEST components, but from now on a USER or APP
        component they resolve (in a worker thread too) raises
        :class:`~ambient.errors.ScopeClosedError` instead of being made: nothing would
        clean it up after shutdown. One being made meanwhile is cleaned up as it is
        finished, and refused the same way. Users' cleanups already under way (an expiry a
        request ran as shutdown began) end before the APP components go, waited for at
        most ``cleanup_timeout``. The registry stays usable: a scope opened once the close
        has ended (a test starting the same application twice) opens it again, for the
        scopes opened from then on (one open across the close stays refused); one opened
        while it runs does not.

        A call made while another is under way (two servers sharing the registry, a
        shutdown racing a test's teardown) cleans nothing more: it returns when that close
        has ended, and raises the same failures as :class:`CleanupError`. Waiting for a
        close running on another event loop, it gives up with :class:`RegistryError`
        once a whole ``cleanup_timeout`` went by with no cleanup ending there (that loop
        stopped, or a sync cleanup blocks it).

        Raises:
            CleanupError: when cleanups failed (every cleanup still ran).
            RegistryError: a close under way on another event loop stopped making progress.
        """
        with self._lock:
            under_way = last = self._closing
            if last is None or last.done:
                under_way = None
                frozen = self._frozen or (last is not None and last.frozen)
                closing = self._closing = _Closing(frozen=frozen)
                due, app = self._take_all()
        if under_way is not None:
            await self._wait_for_close(under_way)
            return
        failures: list[Exception] = []
        try:
            for scope in list(self._sharing):
                # Open scopes no longer take these from their caches (and are refused them).
                cache = scope._cache
                for key in list(cache):
                    provider = self.providers.get(key)
                    if provider is not None and provider.lifetime is not Lifetime.REQUEST:
                        cache.pop(key, None)
            failures = await self._close_all(due, app)
        finally:
            closing.finish(failures)
        if failures:
            msg = f"{len(failures)} cleanup(s) failed while closing the registry"
            raise CleanupError(msg, failures)

    def _take_all(self) -> tuple[list[tuple[UserEntry, list[Created]]], list[Created]]:
        """Take every user's components and the app's out of use, and close the registry
        (the lock is held)."""
        # Nothing more is made for the scopes open now: what they made would never be
        # cleaned (a server exits after its shutdown). A scope that opens later reopens it.
        self._frozen = False
        self._closes += 1
        entries = list(self._users.values()) + self._evicted
        self._users.clear()
        self._evicted = []
        self._idle = 0
        self._over_max_users = False
        # Every store closed before the first await: a scope resolving meanwhile is refused
        # instead of taking one that is about to be cleaned.
        due = [(entry, entry.instances.close()) for entry in entries]
        return due, self.app_instances.close()

    def closed_error(self, provider: Provider) -> ScopeClosedError | None:
        """The error for resolving ``provider``'s (USER or APP) component from a store
        :meth:`aclose` closed, while the registry is closed; ``None`` once it has been
        started again (a scope opened since), with a fresh store for APP components."""
        with self._lock:
            if self._closing is not None and not self._frozen:
                return self._shut_error(provider.name)
            if self.app_instances.closed:
                self.app_instances = Instances("registry")
        return None

    @staticmethod
    def _shut_error(what: str) -> ScopeClosedError:
        """The error for resolving ``what`` (USER or APP components) once :meth:`aclose`
        closed the registry: from a store it closed, or from a scope opened before it (a
        scope opened since, the application started again, opened the registry again, but
        what one of before made would be cleaned by no close of its start)."""
        return ScopeClosedError(
            f"cannot resolve {what}: the registry was closed at shutdown "
            "(registry.aclose()), and a USER or APP component made now would never be "
            "cleaned up. Work still running after shutdown must not use them; a scope "
            "opened later (the application started again) makes them afresh"
        )

    async def _wait_for_close(self, closing: _Closing) -> None:
        """Wait for the close under way (see :meth:`aclose`), and raise what it raised."""
        event = closing.waiter()
        if event is not None and closing.loop == _loop_key(loop_call_soon()):
            await event.wait()  # as its own caller awaits it
        elif event is not None:
            # On another loop, whose end this one cannot see: as long as its cleanups go on.
            while not event.is_set():
                progress = self.cleaned + self.cleanup_failures
                with anyio.move_on_after(self.cleanup_timeout):
                    await event.wait()
                if not event.is_set() and self.cleaned + self.cleanup_failures == progress:
                    msg = (
                        "registry.aclose() is under way on another event loop and no cleanup "
                        f"ended there for {self.cleanup_timeout} s (the registry's "
                        "cleanup_timeout); has that loop stopped, or does a sync cleanup "
                        "block it? Its USER and APP components may not all be cleaned up"
                    )
                    raise RegistryError(msg)
        if closing.failures:
            msg = (
                f"{len(closing.failures)} cleanup(s) failed while closing the registry "
                "(in the close under way that this call waited for)"
            )
            raise CleanupError(msg, closing.failures)

    def stats(self) -> RegistryStats:
        """Counts of what this registry has done so far."""
        with self._lock:
            users = list(self._users.values())
        return RegistryStats(
            open_scopes=self.open_scopes,
            live_users=len(users),
            live_user_components=sum(len(e.instances.created) for e in users),
            created=self.created,
            cleaned=self.cleaned,
            cleanup_failures=self.cleanup_failures,
        )
