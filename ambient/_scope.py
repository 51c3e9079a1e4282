"""A :class:`Scope`: one request's (or job's, or connection's) components and their cleanup."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, overload

import anyio
import anyio.from_thread

from ambient import _binding, _observe
from ambient._binding import _Binding, _set_new, _SharedBinding, _shown, bind, unbind
from ambient._context import ANONYMOUS, UserExecutionContext
from ambient._instances import (
    Instances,
    _Deadline,
    _Later,
    _RequestInstances,
    finalize,
    finalize_sync,
    needs_await,
)
from ambient._loops import loop_call_soon
from ambient._observe import Observer, notify
from ambient._provider import _GEN, _REQUEST, _SYNC, _USER, RANK, Provider, key_name
from ambient.errors import (
    CleanupError,
    NoActiveContextError,
    ResolutionError,
    ScopeClosedError,
)

if TYPE_CHECKING:
    from types import TracebackType

    from ambient._context import UserRef
    from ambient._registry import Registry, UserEntry

__all__ = ["Scope"]

T = TypeVar("T")
logger = logging.getLogger("ambient")
_NOTHING = contextlib.nullcontext()
# Guards a scope's first REQUEST store and its USER entry: worker threads of one scope may
# get there at once. Taken only on those first uses (and for holds, which a thread may
# take and release), and held for a few field accesses.
_FIRST_USE = threading.Lock()
_MISSING: Any = object()
# Assigned, not imported by name: CPython 3.11 compiles a method call on a name bound by
# `from ... import` as an attribute read (it takes the name for a module's), which builds a
# bound method on every call: _current.get() and .set() are run per request.
_current: Final = _binding._current


class _Resolver(Protocol):
    """What a binding resolves components through: a scope, or a restricted view of one."""

    @property
    def owner(self) -> Scope: ...

    async def resolve(self, key: Any) -> Any: ...

    def resolve_sync(self, key: Any) -> Any: ...


class Scope:
    """The components of one unit of work, bound together with its context.

    Opened by :meth:`Registry.open_scope` (the middleware opens one per request and per
    websocket connection). ``async with scope:`` binds the context, and on exit cleans up
    the REQUEST components newest first, releases the user's USER components and unbinds.
    Cleanups are shielded from cancellation and bounded by the registry's
    ``cleanup_timeout``; every one runs even when others fail.

    Exiting raises :class:`~ambient.errors.CleanupError` when cleanups failed, unless the
    body itself raised: then the body's exception propagates with the failures attached as
    a note.

    Attributes:
        context: The bound context.
        exception: What ended the scope's body (an exception or a cancellation), or what
            cut its cleanup short after a body that ended normally, for observers; ``None``
            when it ended normally, and once the scope has closed.
        components_created: Components this scope created.
        cleanup_failures: Cleanups that failed when it closed.
    """

    __slots__ = (
        "__weakref__",
        "_allow_switch",
        "_binding",
        "_cache",
        "_closed",
        "_closes",
        "_extra",
        "_holds",
        "_opened",
        "_others_after",
        "_own",
        "_registry",
        "_released",
        "_shares",
        "_state",
        "_user",
        "_user_entry",
        "_wake",
        "cleanup_failures",
        "components_created",
        "context",
        "exception",
        "observers",
    )

    def __init__(
        self,
        registry: Registry,
        context: UserExecutionContext,
        *,
        allow_switch: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self._registry = registry
        self._extra = observer
        self._holds = 0
        self._released: anyio.Event | None = None
        # The loop's thread and how to run a callback there, once a close waits for holds.
        self._wake: tuple[int, Callable[[Callable[[], object]], object] | None] | None = None
        self.context = context
        self._allow_switch = allow_switch
        # Made on the first REQUEST component: many requests create none.
        self._own: Instances | None = None
        # Every component this scope has resolved, whatever its lifetime: the fast path.
        self._cache: dict[Hashable, Any] = {}
        self._user_entry: UserEntry | None = None
        # Whether _cache holds USER or APP components (registry.aclose() drops them there).
        self._shares = False
        self._user: UserRef | None = None
        self._binding: _Binding | None = None
        self._opened = False
        self._closed = False
        # Whether other users' cleanups this scope comes across (evicted, expired) wait
        # for its close: set by the middleware for an HTTP request, whose answer must not
        # wait for them.
        self._others_after = False
        self._state: dict[Any, Any] | None = None
        self.observers: tuple[Observer, ...] = ()
        self.components_created = 0
        self.cleanup_failures = 0
        self.exception: BaseException | None = None
        if type(context) is not UserExecutionContext and not isinstance(
            context, UserExecutionContext
        ):
            # It would be bound as "the context", and get_current_context() return it.
            msg = f"a Scope takes a UserExecutionContext, not {type(context).__name__}"
            raise TypeError(msg)

    @property
    def registry(self) -> Registry:
        """The registry this scope resolves from."""
        return self._registry

    @property
    def owner(self) -> Scope:
        """This scope (restricted views of it answer their scope)."""
        return self

    @property
    def closed(self) -> bool:
        """Whether the scope has closed; resolving from it then raises ``ScopeClosedError``."""
        return self._closed

    @property
    def state(self) -> dict[Any, Any]:
        """A dict for observers and integrations to keep per-scope data in (emptied when
        the scope closes, after the observers have seen it close)."""
        if self._state is None:
            self._state = {}
        return self._state

    def __repr__(self) -> str:
        status = "closed" if self._closed else "open" if self._opened else "new"
        # The run id only: a scope's repr goes into log lines and error messages (and from
        # there into spans), where a raw user id must never appear.
        return f"<Scope {status} for run {self.context.run_id}>"

    # -- opening and closing -------------------------------------------------------------

    async def __aenter__(self) -> Scope:
        if self._opened:
            msg = "a Scope can be entered once; open a new one with registry.open_scope(ctx)"
            raise RuntimeError(msg)
        if self._closed:
            # Closed before it was entered: opened now, it would bind its context for good
            # (its exit finds it closed already) and count as open forever.
            msg = (
                "this Scope was closed before it was entered; open a new one with "
                "registry.open_scope(ctx)"
            )
            raise ScopeClosedError(msg)
        registry = self._registry
        if registry.expiry_due():
            await registry.expire_idle()
        self._open()
        return self

    def _open(self) -> None:
        """Bind the context and tell the observers: entering, once expiry is done.

        The middleware calls this directly (one coroutine fewer per request); it has
        checked that the scope is new.
        """
        registry = self._registry
        if not registry._frozen:
            registry.before_open()  # once per start: a store on every request costs as much
        # Which start of the registry this scope belongs to: one opened before the last
        # aclose() is refused USER and APP components (Registry._shut_error()).
        self._closes = registry._closes
        if _current.get() is None:
            # Nothing to shadow and no other user to refuse: bind() without its checks.
            self._binding = _set_new(self.context, self, None)
        else:
            self._binding = bind(self.context, self, allow_switch=self._allow_switch)
        self._opened = True
        registry.open_scopes += 1
        extra = self._extra
        if extra is None and not _observe.observers:
            own = registry._observers
            if not own:
                return  # nobody observes (scope_observers() would say so, for a call more)
            # The registry's one telemetry, waiting for an SDK: a clock read, not a call.
            until = own[0].inactive_until
            if until is not None and monotonic() < until:
                return
        observers = registry.scope_observers(extra)
        if observers:
            self.observers = observers
            notify(observers, "scope_opened", self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failures = await self._close(exc)
        if not failures:
            return
        if exc is not None:
            for failure in failures:
                exc.add_note(f"ambient: while closing this scope, cleanup failed: {failure!r}")
            return
        names = len(failures)
        raise CleanupError(f"{names} component cleanup(s) failed while closing the scope", failures)

    async def aclose(self) -> None:
        """Close the scope (as leaving ``async with`` does)."""
        await self.__aexit__(None, None, None)

    async def finish(self, exc: BaseException | None = None) -> tuple[Exception, ...]:
        """Close the scope and return the cleanup failures instead of raising them.

        For callers that have already answered (the middleware after a response went out):
        failures are still counted and seen by observers.

        Args:
            exc: The exception that ended the work, if any (generator factories see it).
        """
        return tuple(await self._close(exc))

    def _close_now(self, exc: BaseException | None) -> Sequence[Exception] | None:
        """Close without awaiting when nothing needs it; ``None`` (and nothing done) when
        something does: a hold, USER components to release, async cleanups, expiry due.

        No failures are ``()``, not a new list: most closes have none, once per request."""
        if exc is not None and self.exception is None:
            self.exception = exc
        if self._closed or not self._opened:
            self._closed = True
            return ()
        registry = self._registry
        # registry.expiry_due(), inlined: once per request.
        if (
            self._holds
            or self._user_entry is not None
            or registry._evicted
            or (registry._idle and registry._clock() >= registry._next_expiry)
        ):
            return None
        # Closed first, then what was made read: a worker thread's resolve_sync() publishes
        # what it takes (a store, a user entry) first, then looks at _closed. Whichever
        # comes second sees the other, so nothing a thread takes is missed.
        self._closed = True
        if self._user_entry is not None:
            return None
        own = self._own
        if own is None:
            self._ended(())
            return ()
        created = own.close_sync()
        if created is None:
            return None
        failures: Sequence[Exception] = ()
        # Nothing more from the cache (its store keeps it, refused, for factories still
        # running): cleanups may resolve, and must not be handed what they clean.
        self._cache = {}
        try:
            if created:
                observers = self.observers
                # _owner_user(), inlined: once per request that made a component.
                user = self._user_ref() if observers else None
                failures = finalize_sync(created, exc, registry, user, observers, self)
        except BaseException as error:
            self._cut_short(error)
            raise
        finally:
            self._ended(failures)
        return failures

    async def _close(self, exc: BaseException | None) -> Sequence[Exception]:
        if exc is None:
            # An error noted on the scope while it ran (note_failure(), answer_error()) is
            # what ended it, for its cleanups as for its observers: else a transaction
            # around a yield commits the work of a scope its span records as failed.
            exc = self.exception
        done = self._close_now(exc)
        if done is not None:
            return done
        return await self._close_later(exc)

    async def _close_later(  # noqa: PLR0915 - one close, its state in locals
        self, exc: BaseException | None
    ) -> list[Exception]:
        """The rest of :meth:`_close`, once :meth:`_close_now` has said it must await."""
        registry = self._registry
        failures: list[Exception] = []
        interrupted: BaseException | None = None
        # Marked closed by this close's _close_now (a later close returns there): a hold
        # that a raw thread took meanwhile, having found the scope open, is waited for.
        marked_here = self._closed
        if self._holds:
            try:
                await self._wait_for_holds()
            except BaseException as error:  # noqa: BLE001 - re-raised once cleaned up
                # A native asyncio cancellation gets through the shield: stop waiting for
                # the holds, but still clean up and release the user's components.
                interrupted = error
            if self._closed and not marked_here:
                # Another close of this scope waited for the same holds and has taken over
                # the cleanup: ending the scope twice would count it twice.
                if interrupted is not None:
                    raise interrupted
                return []
            if exc is None:
                exc = self.exception  # noted by the work the close waited for
            if interrupted is not None:
                self._cut_short(interrupted)
        try:
            self._closed = True
            # Nothing more from the cache either: what it holds is cleaned below (the USER
            # components released, then expired or evicted), while work this scope started
            # may still resolve from it.
            self._cache = {}
            own = self._own
            created = own.close() if own is not None else []
            with _FIRST_USE:  # against a worker thread taking the entry back (see there)
                entry, self._user_entry = self._user_entry, None
            awaits = bool(created) and needs_await(created)
            if entry is not None or (awaits and len(created) > 1):
                with anyio.CancelScope(shield=True):
                    try:
                        failures = await finalize(
                            created, exc, registry, self._owner_user(), self.observers, self
                        )
                    finally:
                        if entry is not None:
                            registry.release_user(entry)
                    await registry.expire_idle()
            else:
                if awaits:
                    # One component whose cleanup is async (a connection per request, most
                    # often): its bounding scope is the shield too, one cancel scope fewer
                    # than for several.
                    failures = await finalize(
                        created,
                        exc,
                        registry,
                        self._owner_user(),
                        self.observers,
                        self,
                        shield=True,
                    )
                elif created:
                    failures = finalize_sync(
                        created, exc, registry, self._owner_user(), self.observers, self
                    )
                # After the failures are kept: a native cancellation may cut the expiry short.
                if registry.expiry_due():
                    with anyio.CancelScope(shield=True):
                        await registry.expire_idle()
        except BaseException as error:
            self._cut_short(error)
            raise
        finally:
            # Whatever interrupted the cleanup (a native cancellation the shield cannot
            # stop, a KeyboardInterrupt), the scope still ends: unbound and counted.
            self._closed = True
            self._ended(failures)
        if interrupted is not None:
            raise interrupted
        return failures

    def _cut_short(self, error: BaseException) -> None:
        # The body may have ended well: what interrupted the close (a native cancellation,
        # a KeyboardInterrupt) is what ended the scope, for its observers.
        if self.exception is None:
            self.exception = error

    def _owner_user(self) -> UserRef | None:
        # Only observers see whose components were cleaned: no UserRef without them.
        return self._user_ref() if self.observers else None

    def _user_ref(self) -> UserRef:
        # Built once per scope: every event an observer sees names the user.
        user = self._user
        if user is None:
            user = self._user = self.context.user
        return user

    def _ended(self, failures: Sequence[Exception]) -> None:
        if self._cache:
            self._cache = {}
        self.cleanup_failures = len(failures)
        binding = self._binding
        if binding is not None:
            # The binding refers to this scope: dropping it here keeps a request from
            # leaving a reference cycle for the garbage collector (a server pays for
            # every collection with its whole heap).
            self._binding = None
            unbind(binding)
        registry = self._registry
        if self._shares:
            registry._sharing.discard(self)
        registry.open_scopes -= 1
        if registry._scopes_closed is not None and not registry.open_scopes:
            registry._scopes_closed.set()
        try:
            if self.observers:
                notify(self.observers, "scope_closed", self, tuple(failures))
        finally:
            # Something may keep this scope alive after it closed (a timer scheduled in the
            # request holds the request's contextvars, and so its binding and scope): keep
            # nothing of the request's through it, least of all the exception, whose
            # traceback holds every frame's locals.
            self._state = None
            self.exception = None
            self._own = None

    def hold(self) -> _Hold:
        """Keep this scope open past the end of its body, for work it hands off.

        ``with scope.hold():`` in a task that outlives the request (a fire-and-forget task,
        a background job): while any hold is active, closing the scope waits for it (up to
        the registry's ``cleanup_timeout``) before cleaning up, so the task may go on using
        the request's components. Without a hold such a task gets ``ScopeClosedError``
        once the scope has closed. Take the hold *before* the body ends (in the request),
        then pass it into the task::

            hold = scope.hold()
            task_group.start_soon(job, hold)   # job: `with hold: ...`
        """
        if self._closed:
            msg = "cannot hold a scope that has already closed"
            raise ScopeClosedError(msg)
        if loop_call_soon() is None:
            # A worker thread (a sync endpoint's): taken on the loop's thread instead, when
            # the loop is anyio's, where it comes before or after a close, never between
            # the close's look at the holds and its end.
            try:
                return anyio.from_thread.run_sync(self.hold)
            except RuntimeError:
                pass  # a thread no anyio loop started
        with _FIRST_USE:
            self._holds += 1
        return _Hold(self)

    def _release(self) -> None:
        # In any thread: the count is the lock's, and a close waiting meanwhile is woken on
        # its own loop.
        with _FIRST_USE:
            self._holds -= 1
            released = self._released if self._holds == 0 else None
            wake = self._wake
        if released is None:
            return
        if wake is None or wake[1] is None or wake[0] == threading.get_ident():
            released.set()
            return
        # A RuntimeError: the loop has finished, and nothing waits for the hold any more.
        with contextlib.suppress(RuntimeError):
            wake[1](released.set)

    async def _wait_for_holds(self) -> None:
        timeout = self._registry.cleanup_timeout
        self._wake = (threading.get_ident(), loop_call_soon())
        # Set with no binding: on asyncio the deadline's timer holds a copy of the context
        # until its time, even once cancelled, and with it this scope.
        with anyio.CancelScope(shield=True), _Deadline(timeout) as deadline:
            # Until no hold is left: one taken after the last release woke this close
            # (held work handing over to more) keeps the scope open too.
            while True:
                # One event for every close waiting here: the last release sets the one
                # it finds. Read and made under the lock a release in a raw thread takes:
                # it sees either no hold left here, or this event to wake.
                with _FIRST_USE:
                    if not self._holds:
                        break
                    released = self._released
                    if released is None or released.is_set():
                        released = self._released = anyio.Event()
                await released.wait()
        if deadline.cancelled_caught:
            logger.warning(
                "ambient: %d hold(s) on %r still active after %s s; cleaning up anyway",
                self._holds,
                self,
                timeout,
            )

    # -- resolution ----------------------------------------------------------------------

    @overload
    async def resolve(self, key: type[T]) -> T: ...
    @overload
    async def resolve(self, key: Hashable) -> Any: ...

    async def resolve(self, key: Any) -> Any:
        """Return the component registered under ``key``, creating it on first use.

        Raises:
            ResolutionError: unknown key, dependency cycle, lifetime violation.
            ScopeClosedError: the scope has closed.
        """
        # get(), not try/except: a raised KeyError on every first resolution costs more than
        # the lookup saves on cached ones.
        instance = self._cache.get(key, _MISSING)
        if instance is not _MISSING:
            return instance
        provider = self._registry.providers.get(key)
        if provider is None or self._closed or not self._opened:
            raise self._unavailable(key)
        if provider.lifetime is _REQUEST:
            own = self._own or self._request_store()
            kind = provider.kind
            if kind is _SYNC or kind is _GEN:
                instance = own.now(provider, self.context, self, self._registry)
                if type(instance) is _Later:
                    return await instance.rest
                return instance
            return await own.anow(provider, self.context, self, self._registry)
        registry = self._registry
        while True:
            # Asked again on a retry: a close that closed the store this resolution used
            # ended this scope's start, and a scope opened since may have begun the next,
            # whose components are not for this one.
            if self._closes != registry._closes:
                raise registry._shut_error(provider.name)
            if provider.lifetime is _USER:
                entry = self._user_entry
                if entry is None or entry.instances.closed:
                    entry = await self._acquire_user()
                store, arg = entry.instances, entry.ref
            else:
                store, arg = registry.app_instances, None
            try:
                instance = await store.aget(provider, arg, self, registry)
            except ScopeClosedError:
                if not store.closed or self._closed:
                    raise
                # registry.aclose() closed the store meanwhile: refused while the registry
                # is closed, and to a scope of the start it ended; made afresh for one of
                # a new start, from the fresh store (or expiry closed it).
                shut = registry.closed_error(provider)
                if shut is not None:
                    raise shut from None
                continue
            break
        if self._closed:
            # The scope closed while the component was made: it lives on with its user or
            # the app, but this scope hands out nothing more (nor caches it for later).
            if provider.lifetime is _USER:
                registry.made_while_idle(entry, provider)
            raise self._unavailable(key)
        if not self._shares:
            self._share()
        self._cache[key] = instance
        return instance

    @overload
    def resolve_sync(self, key: type[T]) -> T: ...
    @overload
    def resolve_sync(self, key: Hashable) -> Any: ...

    def resolve_sync(self, key: Any) -> Any:
        """Like :meth:`resolve` for sync factories; callable from worker threads.

        Raises:
            ResolutionError: as :meth:`resolve`, and for async factories (await
                :meth:`resolve` instead).
            ScopeClosedError: the scope has closed.
        """
        instance = self._cache.get(key, _MISSING)
        if instance is not _MISSING:
            return instance
        provider = self._registry.providers.get(key)
        if provider is None or self._closed or not self._opened:
            raise self._unavailable(key)
        if provider.lifetime is _REQUEST:
            own = self._own or self._request_store()
            return own.get(provider, self.context, self, self._registry)
        registry = self._registry
        while True:
            if self._closes != registry._closes:
                raise registry._shut_error(provider.name)  # as in resolve()
            if provider.lifetime is _USER:
                entry = self._user_entry
                if entry is None or entry.instances.closed:
                    entry = self._acquire_user_sync()
                store, arg = entry.instances, entry.ref
            else:
                store, arg = registry.app_instances, None
            try:
                instance = store.get(provider, arg, self, registry)
            except ScopeClosedError:
                if not store.closed or self._closed:
                    raise
                shut = registry.closed_error(provider)  # as in resolve()
                if shut is not None:
                    raise shut from None
                continue
            # Published, then _closed read (see _close_now): a close that came first may have
            # missed the scope in the registry's set of sharing scopes, which would keep it (and
            # what its cache holds) for good. Whoever sees the other takes it out.
            if not self._shares:
                self._share()
            self._cache[key] = instance
            if self._closed:
                self._cache.pop(key, None)
                self._registry._sharing.discard(self)
                if provider.lifetime is _USER:
                    registry.made_while_idle(entry, provider)  # as in resolve()
                raise self._unavailable(key)  # as in resolve()
            # Cached, then the store's state read: registry.aclose() on the event loop
            # closes the stores, then drops what open scopes cached from them. Whichever
            # comes second sees the other: a component it cleans is never left cached here.
            if not store.closed:
                return instance
            # Made afresh (a fresh one another thread cached meanwhile is still stored).
            self._cache.pop(key, None)

    def _share(self) -> None:
        # Known to the registry while open, so that its aclose() can drop the USER and APP
        # components it cleans from this scope's cache (see Registry.aclose).
        self._shares = True
        self._registry._sharing.add(self)

    def _request_store(self) -> Instances:
        # Two threads of this scope may both have found no store: a second one would create
        # the component again, and its copy would never be cleaned.
        # acquire()/release() rather than `with`: a `with` on a lock costs about twice as
        # much, and this runs for every request that makes a component.
        _FIRST_USE.acquire()
        try:
            own = self._own
            if own is None:
                # It warns if garbage-collected unclosed: then this scope never closed.
                own = _RequestInstances("request scope", self._cache)
                own.run_id = self.context.run_id
                self._own = own
        finally:
            _FIRST_USE.release()
        if self._closed:
            # Published, then _closed read (see _close_now): a close that read _own before
            # this store existed missed it, so close it here. Instances.close() hands what
            # was made to one caller only, whoever else closes it too.
            created = own.close()
            if created:
                self._registry.clean_up_refused(created, self, self.observers)
            raise self._closed_meanwhile()
        return own

    def _closed_meanwhile(self) -> ScopeClosedError:
        """The error of a worker thread that found the scope open and then closed."""
        return ScopeClosedError(f"cannot resolve from {self!r}: the scope has closed")

    def _unavailable(self, key: Hashable) -> Exception:
        if self._closed or not self._opened:
            state = "has closed" if self._closed else "is not open yet (use `async with`)"
            msg = f"cannot resolve {key_name(key)}: the scope {state}"
            return ScopeClosedError(msg)
        return self._registry.unknown_key(key)

    async def _acquire_user(self) -> UserEntry:
        entry = self._acquire_user_sync()
        if not self._others_after:
            await self._registry.close_evicted()
        return entry

    def _acquire_user_sync(self) -> UserEntry:
        registry = self._registry
        entry = registry.acquire_user(
            self._user_ref(), ephemeral=self.context.metadata.get(ANONYMOUS) is True
        )
        spare: UserEntry | None
        with _FIRST_USE:
            held = self._user_entry
            if held is not None and not held.instances.closed:
                kept, spare = held, entry  # another thread of this scope acquired it first
            else:
                # First USER component of this scope, or the registry was closed under it.
                kept, spare = entry, held
                self._user_entry = entry
        if spare is not None:
            registry.release_user(spare)
        if self._closed:
            # Published, then _closed read (see _close_now): a close that came first may
            # have missed the entry. Whoever takes it off the scope releases it.
            with _FIRST_USE:
                missed = self._user_entry is kept
                if missed:
                    self._user_entry = None
            if missed:
                registry.release_user(kept)
            raise self._closed_meanwhile()
        return kept

    @contextlib.contextmanager
    def _restricted(self, provider: Provider) -> Iterator[None]:
        binding = _SharedBinding(
            self.context, _View(self, provider), _shown(), provider.lifetime.name, provider.name
        )
        binding.token = _current.set(binding)
        try:
            yield
        finally:
            # Its token, as _bound_here() may have replaced it.
            token, binding.token = binding.token, None
            if token is not None:
                _current.reset(token)

    def restricted_for(self, provider: Provider) -> contextlib.AbstractContextManager[None]:
        """While a USER or APP factory runs, ``ambient.resolve`` may only reach components
        that live at least as long (a USER object holding one request's component would
        keep it past that request's cleanup), and no request's context is shown."""
        if provider.lifetime is _REQUEST:
            return _NOTHING
        return self._restricted(provider)


class _Hold:
    """An active hold on a scope (see :meth:`Scope.hold`); release it by leaving ``with``
    or calling :meth:`release`, on the event loop or in a thread the work went to.
    Releasing twice is harmless."""

    __slots__ = ("_scope",)

    def __init__(self, scope: Scope) -> None:
        self._scope: Scope | None = scope

    def release(self) -> None:
        """Let the scope close (once every hold is released)."""
        scope, self._scope = self._scope, None
        if scope is not None:
            scope._release()

    def __enter__(self) -> _Hold:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class _View:
    """A scope seen from inside a USER or APP factory."""

    __slots__ = ("_for", "_scope")

    def __init__(self, scope: Scope, provider: Provider) -> None:
        self._scope = scope
        self._for = provider

    @property
    def owner(self) -> Scope:
        return self._scope

    def refuse(self) -> NoActiveContextError:
        """The error of asking for the scope it views (see :func:`ambient.current_scope`)."""
        return NoActiveContextError(self._for.lifetime.name, component=self._for.name)

    def _check(self, key: Hashable) -> None:
        provider = self._scope.registry.providers.get(key)
        if provider is not None and RANK[provider.lifetime] < RANK[self._for.lifetime]:
            msg = (
                f"{self._for.lifetime.name} component {self._for.name} cannot depend on "
                f"{provider.lifetime.name} component {provider.name}: it would outlive it. "
                "Resolve it where it is used instead"
            )
            raise ResolutionError(msg)

    async def resolve(self, key: Hashable) -> Any:
        self._check(key)
        instance = await self._scope.resolve(key)
        self._depends(key)
        return instance

    def resolve_sync(self, key: Hashable) -> Any:
        self._check(key)
        instance = self._scope.resolve_sync(key)
        self._depends(key)
        return instance

    def _depends(self, key: Hashable) -> None:
        # A USER component may hold what its factory resolved: that must not expire first.
        if self._for.lifetime is not _USER:
            return
        provider = self._scope.registry.providers.get(key)
        entry = self._scope._user_entry
        if provider is not None and provider.lifetime is _USER and entry is not None:
            entry.instances.depends(self._for.key, key)
