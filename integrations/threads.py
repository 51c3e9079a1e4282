"""Threads and tasks that carry the whole scope: context, components and trace.

Who sees the request's context and scope without help:

* code awaited in the request, and tasks it spawns (``asyncio.create_task``, anyio task
  groups, trio nurseries): they start with a copy of the spawner's context;
* ``anyio.to_thread.run_sync``, ``asyncio.to_thread``, Starlette's and FastAPI's thread pool,
  asgiref's ``sync_to_async``: they copy the context into the worker thread.

Who does not: ``ThreadPoolExecutor.submit``, ``loop.run_in_executor`` with such an executor
and ``threading.Thread`` start with an empty context. :class:`ContextExecutor` (or
:func:`ambient.wrap`) carries it over. In a worker thread that carries the scope,
``ambient.resolve_sync(Key)`` resolves in the request's scope: the same instances the
request sees, created once however many threads ask.

**Work that outlives the request.** The scope closes when the request's ASGI call returns
and cleans up its REQUEST components. A task or thread still running after that keeps the
context (``get_current_context()`` still answers, for logging) but every resolution raises
:class:`~ambient.errors.ScopeClosedError`, so it can never be handed a component that has
been cleaned up (a connection back in the pool, perhaps already lent to another user).
Work that needs the request's components after the response takes ownership explicitly:
:func:`hold_scope` (tasks), :meth:`ContextExecutor.submit_held` (threads),
``run_sync_in_thread(..., abandon_on_cancel=True)`` or :func:`iterate_in_thread` (a sync
generator's steps) hold the scope open, and its cleanup
waits for them, for at most the registry's ``cleanup_timeout``; then it logs a warning and
cleans up anyway. While a hold is active the request's ASGI call has not returned (the
response has been sent): keep held work short, and hand long jobs to a queue with
:func:`ambient.integrations.propagation.capture` instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import sys
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, TypeVarTuple, cast

import anyio.to_thread

from ambient._binding import _shown, current_scope
from ambient._instances import hand_over as _hand_over

if TYPE_CHECKING:
    from ambient._scope import Scope, _Hold

__all__ = ["ContextExecutor", "hold_scope", "iterate_in_thread", "run_sync_in_thread"]

P = ParamSpec("P")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")


def _take_hold(scope: Scope) -> _Hold:
    """Hold ``scope`` from this thread: the event loop's, a worker thread anyio started
    (taken on the loop's thread), or another framework's worker thread (asgiref's, where a
    Django sync view runs: the request's body is running there, so the scope cannot be
    closing). The hold is released in whatever thread its work ends."""
    return scope.hold()


def hold_scope(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Hand an async function work that may outlive the request, keeping the scope open.

    The current scope is held from this call until the returned function's call
    finishes, so the request's cleanup waits for it (at most the registry's
    ``cleanup_timeout``) and it may resolve and use the request's components after the
    response. Call ``hold_scope`` in the request, before its body ends; the returned
    function may be called once::

        asyncio.create_task(hold_scope(send_receipt)(order_id))
        task_group.start_soon(hold_scope(send_receipt), order_id)

    Without it, the same task gets :class:`~ambient.errors.ScopeClosedError` from any
    resolution after the scope closed. Keep a reference to asyncio tasks you create (the
    loop only keeps weak ones). If the returned function is never called, the hold is
    released only by the cleanup timeout.

    Raises:
        NoActiveContextError: no scope is bound here.
        ScopeClosedError: the scope has already closed.
        TypeError: ``fn`` is not an async function.
    """
    if not inspect.iscoroutinefunction(fn):
        msg = f"hold_scope() takes an async function, not {fn!r}; for threads use ContextExecutor"
        raise TypeError(msg)
    hold = _take_hold(current_scope())
    used = False

    @functools.wraps(fn)  # its coroutine is named after fn (in task reprs and warnings)
    async def body(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal used
        if used:
            msg = f"the function returned by hold_scope({fn.__name__}) can be called once"
            raise RuntimeError(msg)
        used = True
        with hold:
            return await fn(*args, **kwargs)

    def never_ran() -> None:
        # A call cancelled or closed before it started: the hold is its to release only
        # when no call has run (one that ran holds it until it ends). Any later call
        # raises, as a second call would: the scope may close as soon as this returns.
        nonlocal used
        if not used:
            used = True
            hold.release()

    def run_held(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return _HeldCoroutine(body(*args, **kwargs), never_ran)

    # The code of an async function (body is one), which marks held as async to inspect.
    held = _AsyncFunction(run_held, cast("types.FunctionType", body).__code__)
    functools.update_wrapper(held, fn)
    _mark_coroutine_function(held)
    return held


class _AsyncFunction(Generic[P, R]):
    """The function :func:`hold_scope` returns: it makes a :class:`_HeldCoroutine`, and is
    an async function to whoever asks.

    ``inspect.iscoroutinefunction`` (which Litestar asks of a background task) takes a
    function for async by the flags of its code, and on Python 3.11 knows no other mark. A
    plain function making the coroutine passes for sync there: such a framework runs it in
    a worker thread, which makes the coroutine and drops it unawaited, and the request's
    cleanup waits out its timeout for the hold. So this is a function-like object (as a
    compiled function is), with the code of an async function; ``functools.update_wrapper``
    gives it the held function's name (a ``functools.partial`` has none: it keeps its own).
    """

    __defaults__ = None
    __kwdefaults__ = None

    def __init__(self, make: Callable[P, Coroutine[Any, Any, R]], code: types.CodeType) -> None:
        self._make = make
        self.__code__ = code
        self.__name__ = self.__qualname__ = "hold_scope_call"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return self._make(*args, **kwargs)


class _HeldCoroutine(Coroutine[Any, Any, R]):
    """The coroutine of a :func:`hold_scope` function: one cancelled or closed before it
    started (``task.cancel()`` right after ``asyncio.create_task``, an ``asyncio.TaskGroup``
    whose sibling failed) never runs its body, so it releases the hold itself (unless a
    call of the same function runs) instead of leaving the request's cleanup waiting for it
    until the cleanup timeout."""

    __slots__ = ("_coro", "_never_ran", "_started")

    def __init__(self, coro: Coroutine[Any, Any, R], never_ran: Callable[[], None]) -> None:
        self._coro = coro
        self._never_ran = never_ran
        self._started = False

    def send(self, value: Any, /) -> Any:
        self._started = True
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None, /) -> Any:
        if not self._started:
            self._never_ran()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # pragma: no cover - the deprecated form

    def close(self) -> None:
        if not self._started:
            self._never_ran()
        self._coro.close()

    def __await__(self) -> Generator[Any, None, R]:
        return self._coro.__await__()

    def __getattr__(self, name: str) -> Any:
        # cr_frame, cr_running, cr_await, ...: what event loops and anyio inspect.
        return getattr(self._coro, name)


def _mark_coroutine_function(function: Callable[..., Any]) -> None:
    """Let ``inspect`` and ``asyncio`` (and frameworks asking them, as Starlette's
    background tasks do) see ``function`` as the async function it stands for."""
    if sys.version_info >= (3, 12):
        inspect.markcoroutinefunction(function)
    else:  # pragma: no cover - depends on the Python version
        function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


async def run_sync_in_thread(
    fn: Callable[[*Ts], R],
    *args: *Ts,
    abandon_on_cancel: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
) -> R:
    """Run ``fn(*args)`` in a worker thread with the current context, scope and trace.

    Inside ``fn``, ``ambient.get_current_context()`` is the caller's context and
    ``ambient.resolve_sync(Key)`` resolves in the caller's scope. Works on asyncio and trio.

    Args:
        fn: A sync callable.
        args: Its positional arguments.
        abandon_on_cancel: Let the caller be cancelled while ``fn`` still runs (anyio's
            option). The scope bound here, if any and still open, is then held until
            ``fn`` returns, so the request's cleanup waits for the abandoned thread
            instead of cleaning up under it.
        limiter: The capacity limiter (default: anyio's, 40 threads).

    Raises:
        TypeError: ``fn`` is an async function.
    """
    if inspect.iscoroutinefunction(fn):
        msg = f"run_sync_in_thread() runs sync callables; await {fn!r} instead"
        raise TypeError(msg)
    binding = _shown()
    if (
        not abandon_on_cancel
        or binding is None
        or binding.scope is None
        or binding.scope.owner.closed
    ):
        # anyio copies the contextvars (ambient's binding and the OpenTelemetry context).
        # With no scope bound there is nothing for an abandoned thread to outlive; with one
        # that has closed (work that outlived its request), nothing left to hold: fn's
        # resolutions are refused as the caller's are.
        return await anyio.to_thread.run_sync(
            fn, *args, abandon_on_cancel=abandon_on_cancel, limiter=limiter
        )
    hold = _take_hold(binding.scope.owner)
    lock = threading.Lock()
    started = given_up = False

    def run_held() -> R | None:
        nonlocal started
        with lock:
            if given_up:
                return None  # cancelled before it started: anyio discards the call anyway
            started = True
        try:
            return fn(*args)
        finally:
            hold.release()

    try:
        result = await anyio.to_thread.run_sync(run_held, abandon_on_cancel=True, limiter=limiter)
    except BaseException:
        with lock:
            given_up = True
            release = not started
        if release:
            hold.release()
        raise
    return cast("R", result)


async def iterate_in_thread(
    iterable: Iterable[R], *, limiter: anyio.CapacityLimiter | None = None
) -> AsyncIterator[R]:
    """Step a sync iterable (a sync generator streamed as a response body) in worker threads,
    each step as :func:`run_sync_in_thread` with ``abandon_on_cancel=True`` runs it.

    Each step sees the current context, scope and trace. A caller cancelled during a step
    (a framework ending the stream of a client that hung up) goes on at once, and the
    request's scope is held until the abandoned step returns, so the request's cleanup
    never runs under a step that still uses its components (for at most the registry's
    ``cleanup_timeout``, as any hold). An iterator left before its end (this generator
    closed, or its caller cancelled) is closed as a step is, its ``finally`` blocks
    included: in a worker thread, or by the abandoned step's thread once that step returns.
    For frameworks that would abandon such a thread themselves (Quart steps a sync body in
    its executor): see docs/frameworks.md.

    Args:
        iterable: A sync iterable; ``iter()`` of it is taken in the caller's thread.
        limiter: The capacity limiter (default: anyio's, 40 threads).
    """
    iterator = iter(iterable)
    end = object()
    close = getattr(iterator, "close", None)  # a generator's: its finally blocks run
    lock = threading.Lock()
    # "idle" between steps, "running" a step, "closing" once left during a step (whose
    # thread then closes the iterator, as the step ends), "done" once finished or closed.
    state = "idle"

    def step() -> R | object:
        nonlocal state
        with lock:
            if state != "idle":
                return end  # left before this step's thread started, and closed
            state = "running"
        try:
            item = next(iterator, end)
        except BaseException:
            with lock:
                state = "done"
            raise
        with lock:
            left = state == "closing"
            state = "done" if left or item is end else "idle"
        if left and close is not None:
            close()
            return end
        return item

    try:
        while True:
            item = await run_sync_in_thread(step, abandon_on_cancel=True, limiter=limiter)
            if item is end:
                return
            yield cast("R", item)
    finally:
        # Left before its end (closed, cancelled): an iterator not closed here would run its
        # finally blocks whenever it is collected, in any thread, with no scope and perhaps
        # after the request's cleanup; its steps' thread and hold are for them too.
        with lock:
            between_steps = state == "idle"
            state = "closing" if state == "running" else "done"
        if between_steps and close is not None:
            with anyio.CancelScope(shield=True):
                await run_sync_in_thread(close, abandon_on_cancel=True, limiter=limiter)


class ContextExecutor(ThreadPoolExecutor):
    """A :class:`~concurrent.futures.ThreadPoolExecutor` whose work runs in the submitter's
    context: the ambient context and scope, and the OpenTelemetry trace.

    Each submitted call runs in a copy of the contextvars taken at :meth:`submit`, so
    ``loop.run_in_executor(executor, fn)`` and ``executor.map`` carry them too. Outside any
    context it behaves as a plain ``ThreadPoolExecutor``. Work that may still run after
    the request ended should use :meth:`submit_held`: a cancelled ``await
    loop.run_in_executor(...)`` (a client that hung up) does not stop its thread, which
    could go on using a component the request's cleanup has closed.

    Example::

        executor = ContextExecutor(max_workers=8)

        async def report(request):
            return await loop.run_in_executor(executor, render_report)  # sees the user
    """

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in the current context.

        Raises:
            TypeError: ``fn`` is an async function.
        """
        _check_sync(fn)
        context = contextvars.copy_context()
        _hand_over(context)

        def run() -> R:
            return context.run(fn, *args, **kwargs)

        return super().submit(run)

    def submit_held(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Like :meth:`submit`, holding the current scope open until ``fn`` returns.

        The request's cleanup waits for ``fn`` (at most the registry's
        ``cleanup_timeout``), so ``fn`` may use the request's components after the
        response. Call it in the request: on the event loop, or in the worker thread a
        sync endpoint runs in (Starlette's and FastAPI's, Django's through asgiref).

        Raises:
            NoActiveContextError: no scope is bound here.
            ScopeClosedError: the scope has already closed.
            TypeError: ``fn`` is an async function.
        """
        _check_sync(fn)
        hold = _take_hold(current_scope())
        context = contextvars.copy_context()
        _hand_over(context)

        ran = False

        def run_held() -> R:
            nonlocal ran
            ran = True
            try:
                return context.run(fn, *args, **kwargs)
            finally:
                hold.release()

        def released_if_never_ran(future: Future[R]) -> None:
            # Done without running: cancelled while queued (future.cancel(),
            # shutdown(cancel_futures=True)), or failed with BrokenThreadPool when a worker's
            # initializer failed (the pool drains its queue). run_held never runs, so its
            # release must come from here. A future is done only after run_held returned.
            if not ran:
                hold.release()

        try:
            future = super().submit(run_held)
        except BaseException:
            hold.release()
            raise
        future.add_done_callback(released_if_never_ran)
        return future


def _check_sync(fn: Callable[..., Any]) -> None:
    if inspect.iscoroutinefunction(fn):
        msg = f"a thread pool runs sync callables; run {fn!r} as a task instead"
        raise TypeError(msg)
