"""A cache of created components with single-flight creation and ordered cleanup.

One ``Instances`` backs each scope (REQUEST components), each user entry (USER components)
and each registry (APP components). Creation is single-flight across tasks *and* threads:
concurrent resolutions of one key create it once, and a factory that fails leaves nothing
behind, so the next resolution retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import types
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator, Hashable, Mapping
from contextvars import Context
from typing import TYPE_CHECKING, Any, Final, NoReturn

import anyio
import anyio.lowlevel

from ambient import _binding, _provider
from ambient._loops import loop_call_soon, on_loop_thread
from ambient._observe import Observer, component_event, notify
from ambient._provider import (
    _AGEN,
    _BARE,
    _FINISHED,
    _GEN,
    _REQUEST,
    _SYNC,
    AWAIT,
    Finalizer,
    Provider,
    _new_object,
    _no_yield,
    _plain,
    build_async,
    build_now,
    build_sync,
    enter_async,
    finish_async,
    finish_now,
    finish_sync,
    key_name,
)
from ambient.errors import CleanupTimeoutError, ResolutionError, ScopeClosedError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from ambient._context import UserRef
    from ambient._registry import Registry
    from ambient._scope import Scope

__all__ = [
    "Created",
    "Instances",
    "cleaned_apart",
    "finalize",
    "finalize_sync",
    "hand_over",
    "needs_await",
    "not_run",
]

logger = logging.getLogger("ambient")

_MISSING: Final = object()
# Assigned, not imported by name: CPython 3.11 compiles a method call on a name bound by
# `from ... import` as an attribute read (it takes the name for a module's), which builds a
# bound method on every call: _PLAIN.get() is run per component made.
_PLAIN: Final = _provider._PLAIN
_current: Final = _binding._current
_resolving: Final = _binding._resolving
_handed_over: Final = _binding._handed_over

Created = tuple[Provider, Any, Finalizer | None]
_CallSoon = Callable[[Callable[[], object]], object]
# What a finished creation wakes: a task of the creator's loop, threads, other loops' tasks.
_Waiters = tuple[
    anyio.Event | None, threading.Event | None, dict[object, tuple[_CallSoon, anyio.Event]] | None
]


class _Marker:
    """A creation in progress that nobody waits for yet: one per thread and kind, reused.

    Most creations see no contention, so the :class:`_Pending` a waiter needs is made by
    the first waiter, not by every creation.
    """

    __slots__ = ("in_async", "owner")

    def __init__(self, owner: int, *, in_async: bool) -> None:
        self.owner = owner
        self.in_async = in_async


class _Creation(_Marker):
    """An async factory's creation in progress on some task: what the work it waits for
    (that task, tasks its factory started, worker threads it handed work to) waits for,
    while it waits, so that a task about to wait for it can tell it would wait for itself."""

    __slots__ = ("key", "waiting")

    def __init__(self, key: Hashable, owner: int) -> None:
        self.owner = owner
        self.in_async = True
        self.key = key
        # One entry per wait: several tasks or threads of one factory may wait at once.
        self.waiting: list[_Pending] = []


class _Later:
    """What :meth:`Instances.now` answers when the creation must be awaited: the coroutine
    that finishes it. Never a component: the class is private."""

    __slots__ = ("rest",)

    def __init__(self, rest: Coroutine[Any, Any, Any]) -> None:
        self.rest = rest


def _keys(stack: tuple[_Creation, ...]) -> tuple[Hashable, ...]:
    return tuple(creation.key for creation in stack)


def _check_cycle(key: Hashable, stack: tuple[_Creation, ...], building: list[Hashable]) -> None:
    """Raise the cycle that waiting for ``key`` would close: this task (``stack``) or this
    thread (``building``) is making it. Asked only of a key being made: a task a factory
    started inherits its stack, and may resolve that key once made."""
    if key in building or any(creation.key == key for creation in stack):
        raise _cycle((*_keys(stack), *building), key)


def _waits_for(pending: _Pending, stack: tuple[_Creation, ...]) -> list[Hashable] | None:
    """The keys along which ``pending``'s creator waits (for a creation that waits...) back
    to a creation of ``stack``, whose task would then wait for itself; else ``None``."""
    todo: list[tuple[_Pending, tuple[Hashable, ...]]] = [(pending, ())]
    seen: set[_Creation] = set()
    while todo:
        current, path = todo.pop()
        creation = current.creation
        if creation is None or creation in seen:
            continue
        seen.add(creation)
        path = (*path, creation.key)
        if creation in stack:
            return list(path)
        if len(path) < 64:
            # A copy: a worker thread may add or drop its wait meanwhile.
            todo.extend((waited, path) for waited in tuple(creation.waiting))
    return None


def _wait_from(pending: _Pending, stack: tuple[_Creation, ...]) -> None:
    """Before this task or thread waits for ``pending`` (:func:`_check_cycle` asked): raise
    the cycle the wait would close through other tasks, else note the wait on this task's
    creations (undo with :func:`_waited`).

    Noted first, then checked: a worker thread and a task waiting for each other's
    creations at the same moment would each miss the other's wait, checked first."""
    for creation in stack:
        creation.waiting.append(pending)
    path = _waits_for(pending, stack)
    if path is not None:
        # Another task makes this key and waits, maybe through others, for a creation of
        # this task: each would wait for the other for good.
        _waited(pending, stack)
        raise _cycle((*_keys(stack), *path[:-1]), path[-1])


def _waited(pending: _Pending, stack: tuple[_Creation, ...]) -> None:
    for creation in stack:
        creation.waiting.remove(pending)


def _looks_cyclic(
    pending: _Pending, key: Hashable, stack: tuple[_Creation, ...], building: list[Hashable]
) -> bool:
    """Whether waiting for ``pending`` would close a cycle as things stand (see
    :func:`_check_cycle` and :func:`_wait_from`, which decide and raise), without noting
    anything."""
    if key in building or any(creation.key == key for creation in stack):
        return True
    return bool(stack) and _waits_for(pending, stack) is not None


async def _wait(
    pending: _Pending, key: Hashable, stack: tuple[_Creation, ...], building: list[Hashable]
) -> None:
    """Wait for another task's creation of ``key``, unless it is a cycle."""
    _check_cycle(key, stack, building)
    if not stack:
        await pending.wait()
        return
    _wait_from(pending, stack)
    try:
        await pending.wait()
    finally:
        _waited(pending, stack)


class _Pending:
    """A creation in progress that other resolvers wait for."""

    __slots__ = (
        "_async_event",
        "_lock",
        "_loop_events",
        "_thread_event",
        "creation",
        "finished",
        "in_async",
        "owner",
    )

    def __init__(self, lock: threading.Lock, marker: _Marker) -> None:
        self._lock = lock
        self.owner = marker.owner
        self.in_async = marker.in_async
        self.creation = marker if type(marker) is _Creation else None
        self.finished = False
        self._async_event: anyio.Event | None = None
        self._thread_event: threading.Event | None = None
        # Per event loop waiting for a creation made elsewhere: how to run a callback on
        # that loop, and the event its tasks wait on. Keyed by the loop (trio: its run's
        # token), not its thread: a thread runs one loop after another (asyncio.run per
        # job), and a later one's tasks must not wait on a finished one's event.
        self._loop_events: dict[object, tuple[_CallSoon, anyio.Event]] | None = None

    def finish_locked(self) -> _Waiters:
        """Mark the creation finished (the lock is held); return the events to set."""
        self.finished = True
        return self._async_event, self._thread_event, self._loop_events

    @staticmethod
    def wake(waiters: _Waiters) -> None:
        """Set the events :meth:`finish_locked` returned (the lock released)."""
        async_event, thread_event, loop_events = waiters
        if thread_event is not None:
            thread_event.set()
        if async_event is not None:
            async_event.set()
        if loop_events:
            for call_soon, event in loop_events.values():
                # A RuntimeError: that loop has finished, and nothing there waits any more.
                with contextlib.suppress(RuntimeError):
                    call_soon(event.set)

    def blocks_this_loop(self) -> bool:
        """Whether a blocking wait here would block the event loop that must finish it."""
        return self.in_async and self.owner == threading.get_ident()

    def _thread_waiter(self) -> threading.Event | None:
        with self._lock:
            if self.finished:
                return None
            if self._thread_event is None:
                self._thread_event = threading.Event()
            return self._thread_event

    async def wait(self) -> None:
        if self.blocks_this_loop():
            with self._lock:
                if self.finished:
                    return
                if self._async_event is None:
                    self._async_event = anyio.Event()
                event = self._async_event
            await event.wait()
            return
        # Created by a worker thread (or on another event loop): the creator wakes this
        # loop's tasks through the loop itself, with no thread to wait in. A thread per
        # waiting task, abandoned when that task was cancelled (a request timing out), was
        # left blocked until the creation ended: one more for every timeout meanwhile.
        call_soon = loop_call_soon()
        if call_soon is None:  # pragma: no cover - awaited, so some loop runs here
            msg = "a creation can only be awaited on an event loop"
            raise RuntimeError(msg)
        loop = getattr(call_soon, "__self__", call_soon)
        with self._lock:
            if self.finished:
                return
            if self._loop_events is None:
                self._loop_events = {}
            found = self._loop_events.get(loop)
            if found is None:
                found = self._loop_events[loop] = (call_soon, anyio.Event())
        await found[1].wait()

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block this thread until the creation is done (at most ``timeout``); whether it
        is."""
        thread_event = self._thread_waiter()
        if timeout is not None:
            # A thread waits at most TIMEOUT_MAX (292 years): past it, OverflowError.
            timeout = min(timeout, threading.TIMEOUT_MAX)
        return thread_event is None or thread_event.wait(timeout)


class _Building:
    """One thread's keys whose sync factories run on it, outermost first, and its markers
    of creations in progress.

    A sync factory never yields to the event loop, so while one runs no other task's can
    start on this thread: a per-thread stack suffices, and costs less than a ContextVar.
    """

    __slots__ = ("in_async", "in_thread", "keys")

    def __init__(self) -> None:
        self.keys: list[Hashable] = []
        owner = threading.get_ident()
        self.in_async = _Marker(owner, in_async=True)
        self.in_thread = _Marker(owner, in_async=False)


class _PerThread(threading.local):
    """Each thread's :class:`_Building`, behind one attribute: reading an attribute of a
    thread-local costs about what reading a ContextVar does, and a creation needs all
    three of its fields."""

    def __init__(self) -> None:
        self.building = _Building()


_per_thread: Final = _PerThread()


def _build_restricted(
    build: Callable[[Provider, object, Mapping[Hashable, Any]], tuple[Any, Any]],
    provider: Provider,
    arg: object,
    scope: Scope,
) -> tuple[Any, Any]:
    """Run a USER or APP component's sync factory, restricted to what lives as long.

    A REQUEST component's is called in place, with its key on the thread's stack of
    creations around it: a call fewer for every component of every request."""
    with scope.restricted_for(provider):
        return build(provider, arg, scope._cache)


def hand_over(context: Context) -> None:
    """Note in ``context`` (a copy another thread will run in) the components this thread's
    sync factories are making. A factory that hands work to a thread and waits for it
    would otherwise deadlock when that work resolves what the factory makes, instead of
    the cycle being reported."""
    building = _per_thread.building.keys
    if building:
        context.run(_extend_handed_over, tuple(building))


def _extend_handed_over(keys: tuple[Hashable, ...]) -> None:
    _handed_over.set((*_handed_over.get(), *keys))


def _cycle(stack: tuple[Hashable, ...], key: Hashable) -> ResolutionError:
    path = " -> ".join(key_name(k) for k in (*stack[stack.index(key) :], key))
    return ResolutionError(f"dependency cycle while resolving: {path}")


def _wait_sync(
    provider: Provider,
    pending: _Pending,
    stack: tuple[_Creation, ...],
    building: list[Hashable],
    registry: Registry,
) -> None:
    """Wait, blocking, for another thread or task making ``provider``'s component (the
    caller claims it again after), or raise what makes the wait impossible."""
    _check_cycle(provider.key, stack, building)
    if pending.blocks_this_loop():
        msg = (
            f"{provider.name} is being created by another task on this event loop; "
            "resolve_sync() cannot wait for it without blocking the loop: use "
            "`await resolve(...)`"
        )
        raise ResolutionError(msg)
    handed = _handed_over.get()
    key = provider.key
    if key in handed:
        raise _cycle((*handed, *_keys(stack), *building), key)
    if on_loop_thread():
        # The loop stands still while it waits, and would for good if the factory
        # in the worker thread waits for the loop (anyio.from_thread): bounded.
        limit = registry.cleanup_timeout
        if not pending.wait_blocking(limit):
            msg = (
                f"{provider.name} is being created in a worker thread and was not "
                f"done within {limit} s, while resolve_sync() on the event loop's "
                "thread waited for it, blocking the loop (does its factory wait for "
                "the loop?): use `await resolve(...)`"
            )
            raise ResolutionError(msg)
        return
    if not stack:
        pending.wait_blocking()
        return
    # A worker thread a task's factory handed work to: that task waits for this.
    _wait_from(pending, stack)
    try:
        pending.wait_blocking()
    finally:
        _waited(pending, stack)


class Instances:
    """Created components of one owner (a scope, a user, the app)."""

    __slots__ = (
        "async_cleanups",
        "cache",
        "closed",
        "created",
        "deps",
        "lock",
        "owner_label",
        "pending",
    )

    def __init__(self, owner_label: str, cache: dict[Hashable, Any] | None = None) -> None:
        self.cache: dict[Hashable, Any] = {} if cache is None else cache
        self.pending: dict[Hashable, _Marker | _Pending] = {}
        self.created: list[Created] = []
        self.lock = threading.Lock()
        self.closed = False
        self.owner_label = owner_label
        self.async_cleanups = 0
        # USER stores: the keys each component's factory resolved from this store (what it
        # may hold), so that none expires before what it was made for.
        self.deps: dict[Hashable, set[Hashable]] | None = None

    def depends(self, dependent: Hashable, key: Hashable) -> None:
        """Note that ``dependent``'s factory resolved ``key`` from this store."""
        with self.lock:
            deps = self.deps
            if deps is None:
                deps = self.deps = {}
            deps.setdefault(dependent, set()).add(key)

    def idle_ttls(self) -> dict[Hashable, float] | None:
        """Each component's idle time to live, raised to that of everything made with it
        (the lock is held); ``None`` when no factory resolved another of this store."""
        deps = self.deps
        if not deps:
            return None
        ttls: dict[Hashable, float] = {}
        # A dependency is stored before what its factory was resolved for: going newest
        # first, each component's own time is final before it is handed to what it holds.
        for provider, _, _ in reversed(self.created):
            key = provider.key
            ttl = max(provider.idle_ttl, ttls.get(key, 0.0))
            ttls[key] = ttl
            for dep in deps.get(key, ()):
                if ttls.get(dep, 0.0) < ttl:
                    ttls[dep] = ttl
        return ttls

    def needs_await(self) -> bool:
        """Whether cleaning up what was created so far awaits anything."""
        return self.async_cleanups > 0

    def close(self) -> list[Created]:
        """Refuse further creations and hand-outs; hand back what was created, oldest
        first.

        The cache is kept (and refused by :meth:`_claim`): a factory still running checks
        its result against it, and must find there a component it resolved, which its own
        registration cleans (see ``build_async``)."""
        # acquire()/release() rather than `with`: a `with` on a lock costs about twice as
        # much, and these run for every component of every request.
        lock = self.lock
        lock.acquire()
        try:
            self.closed = True
            created, self.created = self.created, []
            self.async_cleanups = 0
        finally:
            lock.release()
        return created

    def close_sync(self) -> list[Created] | None:
        """:meth:`close`, unless cleaning up what was created awaits anything: then
        ``None``, and nothing changes (the close that awaits takes it all). Checked under
        the lock: a worker thread may store a component with an async cleanup up to the
        close."""
        lock = self.lock
        lock.acquire()
        try:
            if self.async_cleanups:
                return None
            self.closed = True
            created, self.created = self.created, []
        finally:
            lock.release()
        return created

    def _closed_error(self, provider: Provider) -> ScopeClosedError:
        return ScopeClosedError(
            f"cannot resolve {provider.name}: the {self.owner_label} it belongs to has closed "
            "(work that outlives its request must not use that request's components)"
        )

    async def aget(self, provider: Provider, arg: object, scope: Scope, registry: Registry) -> Any:
        """Return the cached component or create it (once, however many ask at once)."""
        key = provider.key
        here = _per_thread.building
        building = here.keys
        # A sync factory never waits for another task (one returning an awaitable aside):
        # the thread's reused marker is enough, and spares an object per creation.
        # A plain function or a generator (which may still return an awaitable: AWAIT).
        sync = provider.kind is _SYNC or provider.kind is _GEN
        owner = here.in_async
        creation = None if sync else _Creation(key, owner.owner)
        settled = False
        while True:
            instance, pending = self._claim(provider, creation or owner)
            if pending is None:
                if instance is not _MISSING:
                    return instance
                break
            # Read where used, not on every creation: nothing this task runs in between
            # changes it (_awaited() restores what it sets).
            stack = _resolving.get()
            if not settled and _looks_cyclic(pending, key, stack, building):
                # Not yet a cycle: this may be a task the factory making the key has just
                # started, running its first step inside create_task (asyncio's eager task
                # factory) before that factory returned. Let it return, as it would have
                # before the task first ran; a factory that waits for this task is still
                # making the key afterwards, and the wait below names the cycle.
                settled = True
                await anyio.lowlevel.checkpoint()
                continue
            await _wait(pending, key, stack, building)
        observers = scope.observers
        # Wall clock first: a pause between the two reads then moves the span's start
        # earlier, never its end (start_ns + duration) past the cleanup's or the scope's.
        start_ns = time.time_ns() if observers else 0
        started = time.perf_counter() if observers else 0.0
        try:
            if sync:
                # Nothing to await (usually): no task switch can happen while it runs, so
                # the cheap per-thread stack finds cycles.
                building.append(key)
                try:
                    instance, finalizer = (
                        build_now(provider, arg, scope._cache)
                        if provider.lifetime is _REQUEST
                        else _build_restricted(build_now, provider, arg, scope)
                    )
                finally:
                    building.pop()
                if instance is AWAIT:
                    instance, finalizer = await self._awaited(
                        finish_async,
                        provider,
                        finalizer,
                        scope,
                        (*_resolving.get(), self._continued(key, owner.owner)),
                    )
            else:
                instance, finalizer = await self._awaited(
                    build_async,
                    provider,
                    arg,
                    scope,
                    (*_resolving.get(), creation),  # type: ignore[arg-type]  # made: not sync
                )
        except BaseException as exc:
            self._forget(key)
            if observers:
                self._report(observers, provider, None, arg, scope, start_ns, started, exc)
            raise
        if not self._store(provider, instance, finalizer):
            await self._refused(
                provider, instance, finalizer, arg, scope, registry, start_ns, started
            )
        registry.created += 1
        scope.components_created += 1
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
        return instance

    async def anow(  # noqa: PLR0915 - every such component's creation, in one frame
        self, provider: Provider, arg: object, scope: Scope, registry: Registry
    ) -> Any:
        """:meth:`aget` for a REQUEST component of an async function or an async generator
        (a connection per request, most often), in one coroutine: its claim and creation
        inlined, with no coroutine for ``_awaited()``, ``build_async()`` or
        ``_enter_agen()``."""
        key = provider.key
        lock = self.lock
        lock.acquire()
        try:
            if self.closed:
                raise self._closed_error(provider)
            instance = self.cache.get(key, _MISSING)
            if instance is not _MISSING:
                return instance
            pending = self.pending
            claimed = key not in pending
            if claimed:
                # _Creation.__init__, inlined (as Finalizer's in _enter_gen()).
                creation = _new_object(_Creation)
                creation.owner = _per_thread.building.in_async.owner
                creation.in_async = True
                creation.key = key
                creation.waiting = []
                pending[key] = creation
        finally:
            lock.release()
        if not claimed:
            # Another task or thread is making it: aget() waits for it (or names a cycle).
            return await self.aget(provider, arg, scope, registry)
        observers = scope.observers
        start_ns = time.time_ns() if observers else 0  # first, as in aget()
        started = time.perf_counter() if observers else 0.0
        finalizer: Finalizer | None
        try:
            # _awaited(), inlined: the factory runs with this creation last on the task's
            # stack, restored before the store (or the refused component's cleanup).
            token = _resolving.set((*_resolving.get(), creation))
            try:
                result = provider.factory(arg) if provider.takes_arg else provider.factory()
                if provider.kind is _AGEN:
                    # _enter_agen(), inlined: once for every async generator component.
                    try:
                        instance = await result.__anext__()
                    except StopAsyncIteration:
                        raise _no_yield(provider, _AGEN) from None
                    finalizer = _new_object(Finalizer)
                    finalizer.name = provider.name
                    finalizer.how = "async generator"
                    finalizer.target = result
                    finalizer.is_async = True
                else:
                    # finish_async(), in place for an async function: once for every such
                    # component, whose awaited result is most often a plain object. Checked
                    # against the store's cache, the scope's as the factory started: a
                    # close meanwhile gives the scope an empty one.
                    result = await result
                    plain = _plain(provider, result, self.cache)
                    if plain is None:
                        instance, finalizer = await enter_async(provider, result, self.cache)
                    else:
                        instance, finalizer = plain
            finally:
                _resolving.reset(token)
        except BaseException as exc:
            self._forget(key)
            if observers:
                self._report(observers, provider, None, arg, scope, start_ns, started, exc)
            raise
        if not self._store(provider, instance, finalizer):
            await self._refused(
                provider, instance, finalizer, arg, scope, registry, start_ns, started
            )
        registry.created += 1
        scope.components_created += 1
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
        return instance

    def now(  # noqa: PLR0915 - every such component's creation, in one frame
        self, provider: Provider, arg: object, scope: Scope, registry: Registry
    ) -> Any:
        """:meth:`aget` for a REQUEST component of a plain function or a generator, with no
        coroutine of its own (one fewer for every such component made): the component, or
        a :class:`_Later` whose coroutine the caller awaits for it when the creation must
        wait (for another one, for what the factory returned, for a cleanup)."""
        key = provider.key
        here = _per_thread.building
        # _claim() and _store(), inlined, with their lock (as in get()).
        lock = self.lock
        lock.acquire()
        try:
            if self.closed:
                raise self._closed_error(provider)
            instance = self.cache.get(key, _MISSING)
            if instance is not _MISSING:
                return instance
            pending = self.pending
            claimed = key not in pending
            if claimed:
                pending[key] = here.in_async
        finally:
            lock.release()
        if not claimed:
            # Another task or thread is making it: aget() waits for it (or names a cycle).
            return _Later(self.aget(provider, arg, scope, registry))
        observers = scope.observers
        if observers:
            start_ns = time.time_ns()  # first, as in aget()
            started = time.perf_counter()
        else:
            started, start_ns = 0.0, 0
        building = here.keys
        try:
            # Nothing to await (usually): no task switch can happen while it runs, so the
            # cheap per-thread stack finds cycles.
            building.append(key)
            try:
                # build_now(), inlined to the factory's call: once for every such component.
                instance = provider.factory(arg) if provider.takes_arg else provider.factory()
                if provider.kind is _GEN:
                    # _enter_gen(), inlined: once for every generator component.
                    gen = instance
                    try:
                        instance = next(gen)
                    except StopIteration:
                        raise _no_yield(provider) from None
                    finalizer = _new_object(Finalizer)
                    finalizer.name = provider.name
                    finalizer.how = "generator"
                    finalizer.target = gen
                    finalizer.is_async = False
                elif _PLAIN.get(type(instance)) is _BARE:
                    finalizer = None
                else:
                    instance, finalizer = finish_now(provider, instance, scope._cache)
            finally:
                building.pop()
        except BaseException as exc:
            self._forget(key)
            if observers:
                self._report(observers, provider, None, arg, scope, start_ns, started, exc)
            raise
        if instance is AWAIT:
            return _Later(
                self._finish(provider, finalizer, arg, scope, registry, start_ns, started)
            )
        lock.acquire()
        try:
            stored = not self.closed
            if stored:
                self.cache[key] = instance
                self.created.append((provider, instance, finalizer))
                if finalizer is not None and finalizer.is_async:
                    self.async_cleanups += 1
            marker = self.pending.pop(key, None)
            waiters = marker.finish_locked() if type(marker) is _Pending else None
        finally:
            lock.release()
        if waiters is not None:
            _Pending.wake(waiters)
        if not stored:
            return _Later(
                self._refused(
                    provider, instance, finalizer, arg, scope, registry, start_ns, started
                )
            )
        registry.created += 1
        scope.components_created += 1
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
        return instance

    async def _finish(
        self,
        provider: Provider,
        result: Any,
        arg: object,
        scope: Scope,
        registry: Registry,
        start_ns: int,
        started: float,
    ) -> Any:
        """The rest of :meth:`now` when the factory returned something to await or enter."""
        key = provider.key
        observers = scope.observers
        try:
            instance, finalizer = await self._awaited(
                finish_async,
                provider,
                result,
                scope,
                (*_resolving.get(), self._continued(key, _per_thread.building.in_async.owner)),
            )
        except BaseException as exc:
            self._forget(key)
            if observers:
                self._report(observers, provider, None, arg, scope, start_ns, started, exc)
            raise
        if not self._store(provider, instance, finalizer):
            await self._refused(
                provider, instance, finalizer, arg, scope, registry, start_ns, started
            )
        registry.created += 1
        scope.components_created += 1
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
        return instance

    async def _refused(
        self,
        provider: Provider,
        instance: Any,
        finalizer: Finalizer | None,
        arg: object,
        scope: Scope,
        registry: Registry,
        start_ns: int,
        started: float,
    ) -> NoReturn:
        """Clean up a component made while this store closed, and refuse it."""
        # Made, and cleaned below: the counts stay even, the observers' too.
        registry.created += 1
        scope.components_created += 1
        observers = scope.observers
        user = None
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
            user = scope._user_ref() if arg is not None else None
        with anyio.CancelScope(shield=True), cleaned_apart(provider):
            await finalize(
                [(provider, instance, finalizer)], None, registry, user, observers, scope
            )
        raise self._closed_error(provider)

    def _continued(self, key: Hashable, owner: int) -> _Creation:
        """The creation of ``key`` by a plain function whose result is to be awaited, put in
        place of the thread's reused marker as what is in progress: a task about to wait for
        ``key`` then follows what this creation waits for, and names a cycle through other
        tasks rather than waiting for good."""
        creation = _Creation(key, owner)
        with self.lock:
            marked = self.pending.get(key)
            if type(marked) is _Pending:
                marked.creation = creation
            elif marked is not None:
                self.pending[key] = creation
        return creation

    @staticmethod
    async def _awaited(
        run: Callable[
            [Provider, Any, Mapping[Hashable, Any]], Awaitable[tuple[Any, Finalizer | None]]
        ],
        provider: Provider,
        value: Any,
        scope: Scope,
        stack: tuple[_Creation, ...],
    ) -> tuple[Any, Finalizer | None]:
        """``await run(provider, value, ...)`` (building, or finishing what a sync factory
        returned) with ``stack``, this task's creations with this one last, current."""
        token = _resolving.set(stack)
        try:
            if provider.lifetime is _REQUEST:
                return await run(provider, value, scope._cache)
            with scope.restricted_for(provider):
                return await run(provider, value, scope._cache)
        finally:
            _resolving.reset(token)

    def get(  # noqa: PLR0915 - every component's creation, in one frame
        self, provider: Provider, arg: object, scope: Scope, registry: Registry
    ) -> Any:
        """The sync twin of :meth:`aget` (sync factories only; safe from worker threads)."""
        key = provider.key
        here = _per_thread.building
        # _claim() and _store(), inlined, with their lock: once for every component made.
        lock = self.lock
        lock.acquire()
        try:
            if self.closed:
                raise self._closed_error(provider)
            instance = self.cache.get(key, _MISSING)
            if instance is not _MISSING:
                return instance
            pending = self.pending
            claimed = key not in pending
            if claimed:
                pending[key] = here.in_thread
        finally:
            lock.release()
        building = here.keys
        if not claimed:
            # Another thread or task is making it: wait, then claim it again.
            while True:
                instance, waited = self._claim(provider, here.in_thread)
                if waited is None:
                    if instance is not _MISSING:
                        return instance
                    break
                # Read only for a wait, as in aget().
                _wait_sync(provider, waited, _resolving.get(), building, registry)
        observers = scope.observers
        if observers:
            start_ns = time.time_ns()  # first, as in aget()
            started = time.perf_counter()
        try:
            building.append(key)
            try:
                if provider.lifetime is not _REQUEST:
                    instance, finalizer = _build_restricted(build_sync, provider, arg, scope)
                elif provider.kind is _SYNC:
                    # build_sync(), inlined to the factory's call (as in now()).
                    instance = provider.factory(arg) if provider.takes_arg else provider.factory()
                    if _PLAIN.get(type(instance)) is _BARE:
                        finalizer = None
                    else:
                        instance, finalizer = finish_sync(provider, instance, scope._cache)
                else:
                    instance, finalizer = build_sync(provider, arg, scope._cache)
            finally:
                building.pop()
        except BaseException as exc:
            self._forget(key)
            if observers:
                self._report(observers, provider, None, arg, scope, start_ns, started, exc)
            raise
        lock.acquire()
        try:
            stored = not self.closed
            if stored:
                self.cache[key] = instance
                self.created.append((provider, instance, finalizer))
                if finalizer is not None and finalizer.is_async:
                    self.async_cleanups += 1
            marker = self.pending.pop(key, None)
            waiters = marker.finish_locked() if type(marker) is _Pending else None
        finally:
            lock.release()
        if waiters is not None:
            _Pending.wake(waiters)
        registry.created += 1
        scope.components_created += 1
        if observers:
            self._report(observers, provider, instance, arg, scope, start_ns, started, None)
        if not stored:
            # Its owner closed while the factory ran (in a worker thread, say): nobody else
            # will clean it, and an async cleanup cannot be awaited here.
            registry.clean_up_refused([(provider, instance, finalizer)], scope, observers)
            raise self._closed_error(provider)
        return instance

    def _claim(self, provider: Provider, marker: _Marker) -> tuple[Any, _Pending | None]:
        """``(instance, None)`` when cached; ``(_MISSING, None)`` when the key is now ours
        to create (marked with ``marker``); else ``(_MISSING, the creation to wait for)``.
        """
        key = provider.key
        lock = self.lock
        lock.acquire()
        try:
            if self.closed:
                raise self._closed_error(provider)
            instance = self.cache.get(key, _MISSING)
            if instance is not _MISSING:
                return instance, None
            pending = self.pending.get(key)
            if pending is None:
                self.pending[key] = marker
                return _MISSING, None
            if not isinstance(pending, _Pending):
                pending = self.pending[key] = _Pending(lock, pending)
            return _MISSING, pending
        finally:
            lock.release()

    def _unmark_locked(self, key: Hashable) -> _Waiters | None:
        """Drop ``key``'s in-progress mark (the lock is held); the waiters to wake, if any."""
        pending = self.pending.pop(key, None)
        return pending.finish_locked() if type(pending) is _Pending else None

    def _forget(self, key: Hashable) -> None:
        with self.lock:
            waiters = self._unmark_locked(key)
        if waiters is not None:
            _Pending.wake(waiters)

    def _store(self, provider: Provider, instance: Any, finalizer: Finalizer | None) -> bool:
        key = provider.key
        lock = self.lock
        lock.acquire()
        try:
            stored = not self.closed
            if stored:
                self.cache[key] = instance
                self.created.append((provider, instance, finalizer))
                if finalizer is not None and finalizer.is_async:
                    self.async_cleanups += 1
            # _unmark_locked(), inlined: once for every component made.
            pending = self.pending.pop(key, None)
            waiters = pending.finish_locked() if type(pending) is _Pending else None
        finally:
            lock.release()
        if waiters is not None:
            _Pending.wake(waiters)
        return stored

    @staticmethod
    def _report(
        observers: tuple[Observer, ...],
        provider: Provider,
        instance: Any,
        arg: object,
        scope: Scope,
        start_ns: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        user = scope._user_ref() if arg is not None else None
        event = component_event(
            provider,
            instance,
            user,
            scope,
            start_ns,
            time.perf_counter() - started,
            error,
            True,
        )
        notify(observers, "component_created", event)


class _RequestInstances(Instances):
    """The store of one scope's REQUEST components, which warns when it is garbage-collected
    with cleanups pending: its scope was never closed.

    Here rather than on the scope: a ``__del__`` costs a call whenever its object goes,
    and most scopes create no REQUEST component.
    """

    __slots__ = ("run_id",)

    run_id: str  # set by the scope as it makes the store

    def __del__(self) -> None:
        if not self.closed and self.created:
            warnings.warn(
                f"<Scope open for run {self.run_id}> was garbage-collected with "
                f"{len(self.created)} component cleanup(s) pending; close scopes with "
                "`async with` or `await scope.aclose()`",
                ResourceWarning,
                stacklevel=1,
            )


def _set_deadline(scope: anyio.CancelScope, at: float) -> None:
    """Set ``scope``'s deadline with no ambient binding in the current context.

    On asyncio a deadline is a timer handle holding a copy of the current context until
    it is due, even once cancelled: set with the binding, it would keep the scope and its
    context alive that long after the scope closed (an identity's expiry is often hours
    on; a cleanup's bound is ``cleanup_timeout``).
    """
    token = _current.set(None)
    try:
        scope.deadline = at
    finally:
        _current.reset(token)


class _Deadline:
    """``anyio.move_on_after``, its deadline set with :func:`_set_deadline`."""

    __slots__ = ("_scope", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._scope = anyio.CancelScope()

    def __enter__(self) -> anyio.CancelScope:
        scope = self._scope.__enter__()
        _set_deadline(scope, anyio.current_time() + self._timeout)
        return scope

    def __exit__(self, *exc_info: Any) -> bool:
        return bool(self._scope.__exit__(*exc_info))


@types.coroutine
def _resumed(running: Coroutine[Any, Any, Any], waits_on: Any) -> Generator[Any, Any, Any]:
    """The rest of ``running``, whose first step yielded ``waits_on``, run as ``await
    running`` would: what it yields goes to the event loop, what the loop sends or throws
    goes back to it."""
    while True:
        try:
            sent = yield waits_on
        except GeneratorExit:
            running.close()
            raise
        except BaseException as thrown:  # noqa: BLE001 - handed to the coroutine, as await does
            try:
                waits_on = running.throw(thrown)
            except StopIteration as done:
                return done.value
        else:
            try:
                waits_on = running.send(sent)
            except StopIteration as done:
                return done.value


def needs_await(created: list[Created]) -> bool:
    """Whether cleaning ``created`` awaits anything (and so needs a shielded scope)."""
    return any(finalizer is not None and finalizer.is_async for _, _, finalizer in created)


async def finalize(
    created: list[Created],
    exc: BaseException | None,
    registry: Registry,
    user: UserRef | None,
    observers: tuple[Observer, ...],
    scope: Scope | None = None,
    *,
    shield: bool = False,
) -> list[Exception]:
    """Clean up ``created`` newest first; every cleanup runs once, whatever the others do.

    Must run inside a shielded cancel scope, unless ``shield`` (for a single component: each
    async cleanup's own bounding scope is then shielded). Async cleanups are bounded by the
    registry's ``cleanup_timeout``. Returns the failures; each is also logged and counted.
    """
    failures: list[Exception] = []
    escaped: BaseException | None = None
    timeout = registry.cleanup_timeout
    for provider, instance, finalizer in reversed(created):
        if finalizer is None:
            registry.cleaned += 1
            if observers:
                _no_cleanup(provider, instance, user, observers, scope)
            continue
        start_ns = time.time_ns() if observers else 0  # first, as in aget()
        started = time.perf_counter()
        error: Exception | None = None
        interrupted: BaseException | None = None
        try:
            if finalizer.is_async:
                with anyio.CancelScope(shield=shield) as deadline:
                    # Stepped once by hand: a cleanup that finishes without waiting (most
                    # of them) needs no deadline, and a deadline is a timer on the event
                    # loop, about a quarter of such a request's cost. One that waits gets
                    # its deadline before it does, within this scope it started in.
                    running = finalizer.run(exc)
                    try:
                        waits_on = running.send(None)
                    except StopIteration:
                        pass
                    else:
                        _set_deadline(deadline, anyio.current_time() + timeout)
                        await _resumed(running, waits_on)
                if deadline.cancel_called:
                    # Cancelled at its deadline: abandoned there, or it caught the
                    # cancellation and returned, having run past its bound all the same.
                    ending = (
                        " and was abandoned"
                        if deadline.cancelled_caught
                        else "; it caught its cancellation and returned"
                    )
                    error = CleanupTimeoutError(
                        f"cleanup of {provider.name} did not finish within {timeout} s "
                        f"(the registry's cleanup_timeout){ending}"
                    )
            else:
                finalizer.run_sync(exc)
        except Exception as raised:  # noqa: BLE001 - collected into CleanupError
            error = raised
        except BaseException as raised:  # noqa: BLE001 - re-raised once every cleanup ran
            error = _stray_cancellation(raised, provider)
            if error is None:
                escaped = escaped or raised
                interrupted = raised
        _record(
            registry,
            provider,
            instance,
            user,
            observers,
            scope,
            start_ns,
            started,
            error,
            interrupted,
        )
        if error is not None:
            failures.append(error)
    if escaped is not None:
        raise escaped
    return failures


def finalize_sync(
    created: list[Created],
    exc: BaseException | None,
    registry: Registry,
    user: UserRef | None,
    observers: tuple[Observer, ...],
    scope: Scope | None = None,
) -> list[Exception]:
    """:func:`finalize` for components whose cleanups are all sync (nothing to shield)."""
    failures: list[Exception] = []
    escaped: BaseException | None = None
    # Timed only for observers; a cleanup that ran through with none is only counted.
    started, start_ns = 0.0, 0
    error: Exception | None
    interrupted: BaseException | None
    for provider, instance, finalizer in reversed(created):
        if finalizer is None:
            registry.cleaned += 1
            if observers:
                _no_cleanup(provider, instance, user, observers, scope)
            continue
        if observers:
            start_ns = time.time_ns()  # first, as in aget()
            started = time.perf_counter()
        try:
            if exc is None and finalizer.how == "generator":
                # Finalizer.run_sync(), in place for its usual case: a generator factory's
                # run to its end, once for every such component.
                if next(finalizer.target, _FINISHED) is not _FINISHED:
                    finalizer.yielded_again()
            else:
                finalizer.run_sync(exc)
        except Exception as raised:  # noqa: BLE001 - collected into CleanupError
            error, interrupted = raised, None
        except BaseException as raised:  # noqa: BLE001 - re-raised once every cleanup ran
            error, interrupted = _stray_cancellation(raised, provider), None
            if error is None:
                escaped = escaped or raised
                interrupted = raised
        else:
            if not observers:
                registry.cleaned += 1
                continue
            error = interrupted = None
        _record(
            registry,
            provider,
            instance,
            user,
            observers,
            scope,
            start_ns,
            started,
            error,
            interrupted,
        )
        if error is not None:
            failures.append(error)
    if escaped is not None:
        raise escaped
    return failures


def cleaned_apart(provider: Provider) -> AbstractContextManager[None]:
    """Where a refused component of ``provider`` is cleaned: a USER or APP one with no
    request's context shown, as at its expiry (``Registry._clean_apart()``), since it was
    never that request's; a REQUEST one in its request's."""
    if provider.lifetime is _REQUEST:
        return contextlib.nullcontext()
    return _binding.detached()


def not_run(
    registry: Registry,
    provider: Provider,
    instance: Any,
    user: UserRef | None,
    observers: tuple[Observer, ...],
    scope: Scope | None,
    error: Exception,
) -> None:
    """Report a cleanup that could not run at all (``error`` says why) as a failed one:
    logged, counted and seen by observers."""
    _record(
        registry,
        provider,
        instance,
        user,
        observers,
        scope,
        time.time_ns(),
        time.perf_counter(),
        error,
    )


def _stray_cancellation(raised: BaseException, provider: Provider) -> Exception | None:
    """The failure of a cleanup that raised asyncio's ``CancelledError`` while nothing
    cancels the task it runs in, or ``None`` for any other ``BaseException``.

    Such a cancellation is the cleanup's own: it awaited a task or future it had cancelled
    (``task.cancel(); await task``) and let its ``CancelledError`` out. Raised on, it would
    pass for a cancellation of the request, reach the server after the response (uvicorn
    then closes the connection, dropping the next request on it) and go uncounted. A
    cancellation of the task itself (its ``cancelling()`` count is up: the server, a
    timeout or a cancel scope asked for it) stays one. Trio raises no cancellation unasked.
    """
    if not isinstance(raised, asyncio.CancelledError):
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop here: trio, or a worker thread
        return None
    if task is None or task.cancelling():
        return None
    error = RuntimeError(
        f"the cleanup of {provider.name} raised CancelledError, though nothing cancelled "
        "it (it awaited a task or future it had cancelled?); suppress that cancellation "
        "in the cleanup"
    )
    error.__cause__ = raised
    return error


def _no_cleanup(
    provider: Provider,
    instance: Any,
    user: UserRef | None,
    observers: tuple[Observer, ...],
    scope: Scope | None,
) -> None:
    """Tell the observers of the end of a component with nothing to clean up: an event
    with ``cleanup_ran=False``, and no duration (nothing ran, so nothing was timed)."""
    event = component_event(
        provider,
        instance,
        user,
        scope,
        time.time_ns(),
        0.0,
        None,
        False,
    )
    notify(observers, "component_cleaned", event)


def _record(
    registry: Registry,
    provider: Provider,
    instance: Any,
    user: UserRef | None,
    observers: tuple[Observer, ...],
    scope: Scope | None,
    start_ns: int,
    started: float,
    error: Exception | None,
    interrupted: BaseException | None = None,
) -> None:
    """Count one cleanup and tell the observers how it ended: failed (``error``), cut short
    (``interrupted``: a cancellation or KeyboardInterrupt the cleanup let through, never a
    success on a span) or done."""
    registry.cleaned += 1
    if error is not None:
        registry.cleanup_failures += 1
        logger.warning(
            "cleanup of %s failed: %s",
            provider.name,
            error,
            exc_info=error,
            extra={"ambient_component": provider.name},
        )
    if observers:
        notify(
            observers,
            "component_cleaned",
            component_event(
                provider,
                instance,
                user,
                scope,
                start_ns,
                time.perf_counter() - started,
                error if error is not None else interrupted,
                True,
            ),
        )
