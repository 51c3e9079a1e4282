"""Binding a :class:`UserExecutionContext` (and its component scope) to the current context.

One module-level :class:`~contextvars.ContextVar` holds an immutable-by-convention
:class:`_Binding`. Who sees a binding follows :mod:`contextvars`:

* code awaited inside the binding, and tasks spawned inside it (asyncio tasks, anyio task
  groups, trio nurseries), see it;
* a write in a child task (or a worker thread started by ``anyio.to_thread``) stays there
  and never reaches the parent;
* raw ``ThreadPoolExecutor.submit``, ``loop.run_in_executor`` and ``threading.Thread`` start
  with an empty context; :func:`wrap` carries the binding across them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Hashable,
    Iterator,
)
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from opentelemetry import context as otel_context

from ambient._context import UserExecutionContext
from ambient.errors import ContextSwitchError, NoActiveContextError

if TYPE_CHECKING:
    from types import TracebackType

    from ambient._scope import Scope, _Resolver, _View

__all__ = [
    "bind_context",
    "current_context_or_none",
    "current_scope",
    "detached",
    "get_current_context",
    "wrap",
]

P = ParamSpec("P")
R = TypeVar("R")


class _Binding:
    """One binding: the context, the scope that resolves components (if any), and the
    binding it shadows. ``closed`` is set once, when the binding ends; ``elsewhere`` when it
    was ended from another Context than one where it is current (which then still holds it)."""

    __slots__ = ("__weakref__", "closed", "ctx", "elsewhere", "prev", "scope", "token")

    # No __init__: made current by _set_new() (calling a class with an __init__ costs about
    # twice what making the object and setting its slots there does, once per request).
    ctx: UserExecutionContext
    scope: _Resolver | None
    prev: _Binding | None
    closed: bool
    elsewhere: bool
    token: Token[_Binding | None] | None


class _SharedBinding(_Binding):
    """What a USER or APP factory runs in: its resolutions go through ``scope`` (a view of
    the request's scope that refuses shorter-lived components), while no request context is
    shown (``get_current_context()`` raises, ``current_context_or_none()`` answers ``None``):
    the component is shared by many requests, and one request's ids baked into it would be
    wrong for every other.

    Marked ended from the start: code that reads a binding only when it is live (the hot
    ``get_current_context()``, switch checks) reaches :func:`_visible` and the check for
    this class there, so a binding of a request pays nothing for it. Made current and reset
    by its factory's caller, never through :func:`bind` and :func:`unbind`."""

    __slots__ = ("lifetime", "name")

    def __init__(
        self,
        ctx: UserExecutionContext,
        scope: _Resolver,
        prev: _Binding | None,
        lifetime: str,
        name: str,
    ) -> None:
        self.ctx = ctx
        self.scope = scope
        self.prev = prev
        self.closed = True
        self.elsewhere = False
        self.token = None
        self.lifetime = lifetime
        self.name = name

    def refuse(self) -> NoActiveContextError:
        """The error of asking it for the context."""
        return NoActiveContextError(self.lifetime, component=self.name)


_current: Final[ContextVar[_Binding | None]] = ContextVar("ambient.current", default=None)


def _set_new(ctx: UserExecutionContext, scope: _Resolver | None, prev: _Binding | None) -> _Binding:
    """Make a binding of ``ctx`` and ``scope`` that shadows ``prev``, and make it current."""
    binding = _Binding()
    binding.ctx = ctx
    binding.scope = scope
    binding.prev = prev
    binding.closed = False
    binding.elsewhere = False
    binding.token = _current.set(binding)
    return binding


# The creations (ambient._instances._Creation) whose async factories this task is
# awaiting, outermost first: a repeat of a key is a cycle.
_resolving: Final[ContextVar[tuple[Any, ...]]] = ContextVar("ambient.resolving", default=())
# Keys whose sync factories handed this work to another thread (through ambient's thread
# helpers) and may be waiting for it: waiting here for one of them would wait for itself.
_handed_over: Final[ContextVar[tuple[Hashable, ...]]] = ContextVar(
    "ambient.handed_over", default=()
)


def _forget_in_forked_child() -> None:
    """Start a forked child with nothing bound and an empty OpenTelemetry context, as a
    spawned one starts.

    The child runs on in the context of the thread that forked it: a process pool forks
    its workers at its first submit, in the submitting request, and without this every
    job its workers run, whoever submits it, would see that request's user and resolve
    from a copy of its scope (sharing its connections with the parent), and record its
    spans and log lines into that request's trace, with its baggage. The child is the
    only owner of this context, so nothing is left to restore."""
    _current.set(None)
    _resolving.set(())
    _handed_over.set(())
    otel_context.attach(otel_context.Context())


if hasattr(os, "register_at_fork"):  # not on Windows, which only spawns
    os.register_at_fork(after_in_child=_forget_in_forked_child)


def _live(binding: _Binding | None) -> _Binding | None:
    # Never past a USER or APP factory's binding (marked ended only to show no context):
    # what it shadows is the request's, which work of the factory must not see.
    while binding is not None and binding.closed and type(binding) is not _SharedBinding:
        binding = binding.prev
    return binding


def _visible(binding: _Binding) -> _Binding | None:
    """What an ended ``binding``, the current value here, shows.

    In the Context that made it, when it was ended from another (a generator finalised in
    another task) or out of order: what it shadowed there, that Context's own binding (its
    token is reset here, as the end would have). Anywhere else (a task started inside it,
    work :func:`wrap` carried out of it): the binding itself, as when it ended in the
    Context that made it. That work keeps reading its own context, while its scope
    refuses to resolve; it never turns into another user's binding that it shadowed (a
    task started inside an admin's scope for bob never turns into the admin). A live one
    of the same user it shadowed is shown instead, as it always was."""
    while binding.elsewhere:
        token = binding.token
        if token is None:
            # Its own Context has reset it already: this one is not that Context.
            return _inherited(binding)
        try:
            _current.reset(token)
        except (ValueError, RuntimeError):
            # Not the Context that made it: only that one can reset its token.
            return _inherited(binding)
        binding.token = None
        shadowed = _current.get()
        if shadowed is None or not shadowed.closed:
            return shadowed
        binding = shadowed
    return binding


def _bound_here(binding: _Binding) -> bool:
    """Whether the live ``binding`` was bound in this very :class:`contextvars.Context` (a
    caller's own binding), not in one this Context was copied from (a task started inside
    it: another request's, when a server starts requests inside the previous one's).

    Only the Context that set a token can reset it: a try, then the binding set again,
    with a token of this Context that restores the same value. A USER or APP factory's
    binding counts while its factory runs (it is marked ended only to show no context)."""
    token = binding.token
    if (binding.closed and type(binding) is not _SharedBinding) or binding.elsewhere:
        return False
    if token is None:
        return False
    try:
        _current.reset(token)
    except (ValueError, RuntimeError):
        return False
    binding.token = _current.set(binding)
    return True


def _inherited(binding: _Binding) -> _Binding:
    """What a Context that inherited the ended ``binding`` (and did not make it) shows:
    the nearest live binding it shadows if that is of the same user, else itself."""
    live = _live(binding.prev)
    return live if live is not None and _same_user(live.ctx, binding.ctx) else binding


def _same_user(one: UserExecutionContext, other: UserExecutionContext) -> bool:
    return one.user_id == other.user_id and one.tenant_id == other.tenant_id


def _shown() -> _Binding | None:
    """The binding code here sees (see :func:`_visible`), or ``None``."""
    binding = _current.get()
    if binding is not None and binding.closed:
        return _visible(binding)
    return binding


def _user_factorys(binding: _Binding) -> bool:
    """Whether ``binding`` is the one a USER component's factory runs in."""
    return type(binding) is _SharedBinding and binding.lifetime == "USER"


def bind(
    ctx: UserExecutionContext, scope: _Resolver | None, *, allow_switch: bool = False
) -> _Binding:
    """Bind ``ctx`` (and ``scope``) in the current context; undo with :func:`unbind`.

    What is bound here is what code here sees (see :func:`_visible`): an ended binding
    has nothing left to mix with another user's, and a live binding it shadows is not
    this Context's (work started inside bob's scope is not the admin who opened it)."""
    current = _shown()
    if (
        current is not None
        and not allow_switch
        # A USER factory's binding shows no context, but what it makes is its user's.
        and (not current.closed or _user_factorys(current))
        and not _same_user(current.ctx, ctx)
    ):
        msg = (
            "a context of another user is already bound here; binding a second user "
            "inside it would mix their state. Pass allow_switch=True where the switch is "
            "intended (an admin acting for a user, a worker serving many users)"
        )
        raise ContextSwitchError(msg)
    return _set_new(ctx, scope, current)


def _ended_above(current: _Binding | None, binding: _Binding) -> bool:
    """Whether every binding above ``binding`` in ``current``'s chain has ended: inner ones
    ended from another Context (a generator finalised by another task), which could not
    restore this Context's value, so ``binding`` must restore past them."""
    while current is not None and current is not binding:
        if not current.closed:
            return False
        current = current.prev
    return current is binding


def unbind(binding: _Binding) -> None:
    """End ``binding``; safe out of order and from another :class:`contextvars.Context`.

    Exiting out of order never resurrects an ended binding: whatever becomes current is the
    nearest binding in the chain that is still open (or nothing).
    """
    if binding.closed:
        return
    binding.closed = True
    current = _current.get()
    if current is not binding and not _ended_above(current, binding):
        # Out-of-order exit: an inner binding is current. It restores past us when it ends.
        # Or we are ended from another Context (a finalised generator's), and the one we
        # were made in still holds us.
        binding.elsewhere = True
        return
    token = binding.token
    binding.token = None
    try:
        if token is not None:
            _current.reset(token)
    except ValueError:
        # The token belongs to another Context (a generator finalised by another task):
        # kept for that one, which still holds the binding (see _visible). This Context
        # inherited the binding and, if it shows it, shows what it shadowed instead unless
        # that is another user's: work started inside bob's scope never turns into the
        # admin's.
        binding.token = token
        binding.elsewhere = True
        if current is binding:
            live = _live(binding.prev)
            if live is None or _same_user(live.ctx, binding.ctx):
                _current.set(live)
        # Else inner bindings above it have ended: this Context shows what they show.
        return
    previous = _current.get()
    if previous is not None and previous.closed:
        # Ended elsewhere or out of order: settled as reading it would settle it.
        shown = _visible(previous)
        if shown is not previous:
            _current.set(shown)


class bind_context:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Bind ``ctx`` for the duration of a ``with`` block (also inside async code).

    The previous binding is restored on exit, even on error and even when bindings end out
    of order. Binding a context of a different user (or tenant) while one is bound raises
    :class:`~ambient.errors.ContextSwitchError` unless ``allow_switch=True``; a child of the
    current context (see :meth:`UserExecutionContext.child`) is always allowed and keeps the
    current component scope.

    Example::

        with bind_context(UserExecutionContext.create("alice")):
            run_job()
    """

    __slots__ = ("_allow_switch", "_binding", "_ctx")

    def __init__(self, ctx: UserExecutionContext, *, allow_switch: bool = False) -> None:
        if not isinstance(ctx, UserExecutionContext):
            msg = f"bind_context() takes a UserExecutionContext, not {type(ctx).__name__}"
            raise TypeError(msg)
        self._ctx = ctx
        self._allow_switch = allow_switch
        self._binding: _Binding | None = None

    def __enter__(self) -> UserExecutionContext:
        if self._binding is not None:
            msg = "this bind_context() is already in use; create one per `with` block"
            raise RuntimeError(msg)
        ctx = self._ctx
        current = _shown()
        scope = None
        if current is not None and _same_user(current.ctx, ctx):
            scope = current.scope
        self._binding = bind(ctx, scope, allow_switch=self._allow_switch)
        return ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        binding = self._binding
        if binding is not None:
            unbind(binding)


def get_current_context() -> UserExecutionContext:
    """Return the context bound here.

    Raises:
        NoActiveContextError: when nothing is bound (outside a request, job or test
            binding), and inside the factory of a USER or APP component, which is shared by
            many requests (a USER factory receives a :class:`UserRef` instead).
    """
    # _shown() inlined: this is the hottest read there is.
    binding = _current.get()
    if binding is None:
        raise NoActiveContextError
    if binding.closed:
        shown = _visible(binding)
        if shown is None:
            raise NoActiveContextError
        if type(shown) is _SharedBinding:
            raise shown.refuse()
        return shown.ctx
    return binding.ctx


def current_context_or_none() -> UserExecutionContext | None:
    """Return the context bound here, or ``None`` (also inside a USER or APP factory)."""
    # _shown() inlined, as in get_current_context(): a logging filter reads it per record.
    binding = _current.get()
    if binding is None:
        return None
    if binding.closed:
        shown = _visible(binding)
        if shown is None or type(shown) is _SharedBinding:
            return None
        return shown.ctx
    return binding.ctx


def current_scope() -> Scope:
    """Return the component scope bound here.

    Raises:
        NoActiveContextError: when no scope is bound, and inside the factory of a USER or
            APP component (as :func:`get_current_context` does), also under a context
            the factory binds itself: the request's scope would hand it the request's
            context and its REQUEST components, which a component shared by many
            requests must not keep.
    """
    binding = _shown()
    if binding is None:
        raise NoActiveContextError
    if type(binding) is _SharedBinding:
        # Its resolutions go through binding.scope, a view that refuses shorter-lived
        # components; the scope it views would not.
        raise binding.refuse()
    scope = binding.scope
    if scope is None:
        raise NoActiveContextError("scope")
    owner = scope.owner
    if owner is not scope:
        # The view a USER or APP factory resolves through, carried into a context it bound
        # for its own work: refused as in the factory itself.
        raise cast("_View", scope).refuse()
    return owner


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to the current context, scope and OpenTelemetry context.

    For work that leaves the current task: ``ThreadPoolExecutor.submit``,
    ``loop.run_in_executor``, ``threading.Thread``, callbacks and job queues. A sync ``fn``
    runs in a copy of the contextvars captured now (each call gets its own copy, so the
    wrapper may run in several threads at once); an async ``fn`` re-binds ambient's state
    and the OpenTelemetry context around the awaited call. What a call hands back to run
    later runs with them too, wherever it runs: a generator (a generator function's body
    runs as it is iterated, not as it is called) runs each step in the copy it was made in,
    a coroutine (a lambda's) or an async generator with ambient's state and the
    OpenTelemetry context re-bound around each step; a binding the body of a generator makes
    lasts across its yields without reaching the code iterating it. A generator already
    under way when the call hands it back (a module-level stream) is not the call's to run:
    it comes back as it is.

    Example::

        executor.submit(ambient.wrap(render_report), report_id)
    """
    # An object with ``async def __call__`` is an async callable too.
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        binding = _current.get()
        trace_context = otel_context.get_current()
        async_fn = cast("Callable[P, Any]", fn)

        @functools.wraps(fn)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            token = _current.set(binding)
            trace_token = otel_context.attach(trace_context)
            try:
                return await async_fn(*args, **kwargs)
            finally:
                otel_context.detach(trace_token)
                _current.reset(token)

        return cast("Callable[P, R]", run_async)

    from ambient._instances import hand_over  # it imports this module

    captured = contextvars.copy_context()
    hand_over(captured)

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        context = captured.copy()
        return cast("R", _run_later(context, context.run(fn, *args, **kwargs)))

    return run


def _run_later(context: contextvars.Context, result: Any) -> Any:
    """``result``, what a wrapped call handed back, made to run with the binding and trace
    ``context`` holds when it runs later, wherever that is: a generator function's generator
    steps in ``context``; a coroutine (a lambda's, or a ``types.coroutine`` generator) or an
    async generator gets them re-bound. Anything else comes back as it is, and so does a
    generator already under way (a module-level stream): it is not the call's to run, and
    driven through one of ours it would be closed when ours is."""
    if inspect.isgenerator(result) and not result.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE:
        if inspect.getgeneratorstate(result) == inspect.GEN_CREATED:
            return _steps_in(context, result)
        return result
    if not (
        inspect.isgenerator(result) or inspect.iscoroutine(result) or inspect.isasyncgen(result)
    ):
        return result
    binding = context.get(_current)
    trace_context = context.run(otel_context.get_current)
    if inspect.isasyncgen(result):
        return _async_steps_rebound(result, binding, trace_context)
    return _rebound(cast("Awaitable[Any]", result), binding, trace_context)


def _steps_in(
    context: contextvars.Context, generator: Generator[Any, Any, Any]
) -> Generator[Any, Any, Any]:
    """Run each step of ``generator`` in ``context``, as ``yield from`` would run it here."""
    step: Callable[[Any], Any] = generator.send
    value: Any = None
    while True:
        try:
            item = context.run(step, value)
        except StopIteration as stop:
            return stop.value
        try:
            value = yield item
        except GeneratorExit:
            context.run(generator.close)
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown in, as ``yield from`` does
            step, value = generator.throw, exc
        else:
            step = generator.send


async def _rebound(
    coroutine: Awaitable[R], binding: _Binding | None, trace_context: otel_context.Context
) -> R:
    """Await ``coroutine`` with ``binding`` and ``trace_context`` bound."""
    token = _current.set(binding)
    trace_token = otel_context.attach(trace_context)
    try:
        return await coroutine
    finally:
        otel_context.detach(trace_token)
        _current.reset(token)


async def _async_steps_rebound(
    generator: AsyncGenerator[Any, Any],
    binding: _Binding | None,
    trace_context: otel_context.Context,
) -> AsyncGenerator[Any, Any]:
    """Run each step of ``generator`` with ``binding`` and ``trace_context`` bound."""
    # What the body binds is its own, kept from one step to the next (as it would be
    # unwrapped) and taken back from the code iterating it between them.
    own = (binding, trace_context)

    async def step(advance: Callable[[Any], Awaitable[Any]], value: Any) -> Any:
        nonlocal own
        token = _current.set(own[0])
        trace_token = otel_context.attach(own[1])
        try:
            return await advance(value)
        finally:
            own = (_current.get(), otel_context.get_current())
            otel_context.detach(trace_token)
            _current.reset(token)

    advance: Callable[[Any], Awaitable[Any]] = generator.asend
    value: Any = None
    while True:
        try:
            item = await step(advance, value)
        except StopAsyncIteration:
            return
        try:
            value = yield item
        except GeneratorExit:
            await step(lambda _: generator.aclose(), None)
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown in, as the step's await does
            advance, value = generator.athrow, exc
        else:
            advance = generator.asend


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Run the block with no context bound and an empty OpenTelemetry context.

    For starting long-lived background work from inside a request: a connection pool's
    worker tasks, a cache refresher. Tasks started in the block copy the current
    :mod:`contextvars` context; without this they would carry the request that happened
    to start them (running as its user, keeping its scope alive after it closed, and
    recording their spans, with the request's baggage, into the request's trace long
    after it ended). Their spans start traces of their own.
    """
    token = _current.set(None)
    trace_token = otel_context.attach(otel_context.Context())
    # Nor the creations in progress of a factory that starts it: that work is not part of
    # them (it may wait for one instead of being told it is a cycle).
    resolving = _resolving.set(())
    handed_over = _handed_over.set(())
    try:
        yield
    finally:
        try:
            _current.reset(token)
        except ValueError:
            # Ended in another Context (an async generator that yielded in the block,
            # closed by its finaliser's task): none of these tokens is this Context's,
            # whose state the block never changed, and OpenTelemetry would log "Failed to
            # detach context".
            pass
        else:
            _handed_over.reset(handed_over)
            _resolving.reset(resolving)
            otel_context.detach(trace_token)
