"""Per-user websocket channels: a hub of live sockets and a manager that only ever reaches
the current user's own sockets, across processes through Redis (extra ``redis``).

* :class:`ConnectionHub` (an APP component) holds the live connections of this process,
  keyed by ``(tenant, user, thread, connection id)``. Each connection has a bounded queue
  and its own writer task, so a sender never waits for a socket: one that falls behind by
  more than ``queue_size`` events (or ``queue_bytes``) is closed with 1013 and dropped. A
  socket whose send fails is dropped at once; every socket leaves the hub when its handler
  ends. A user may hold ``max_connections_per_user`` sockets in this process; opening one
  more closes that user's *oldest* socket with 1008 (the newest always gets in, so a user
  whose old tabs died without a close frame is never locked out).
* :class:`UserWebSocketManager` (a REQUEST component) is what application code uses:
  :meth:`~UserWebSocketManager.send` reaches the sockets of the bound context's user on the
  bound context's conversation thread, :meth:`~UserWebSocketManager.broadcast_user` all of
  that user's sockets. Nothing takes a user id: the target always comes from the bound
  context, so one user's events cannot be addressed to another.
* :func:`message_scope` runs one incoming message in a child context (a new run id) with its
  own REQUEST components, cleaned when the message is done; the connection's scope lives on.
* Delivery goes through a backend: :class:`InProcessBroadcast` (default, one process) or
  :class:`RedisBroadcast` (Redis pub/sub on one channel per user, so each process delivers to
  the sockets it holds). Publishing while Redis is unreachable raises
  :class:`BroadcastError` to the sender (the middleware answers it with 503); the backend
  reconnects and re-subscribes by itself. Pub/sub delivers at most once: events published
  while a process is cut off from Redis are not replayed to it.
* :class:`OriginAllowList` is ASGI middleware that refuses websocket handshakes from origins
  not on a list (cross-site websocket hijacking), before any context is bound.

Every method of the hub, its connections and the manager must be called on the event loop
that runs the application (use ``anyio.from_thread.run`` from worker threads). The hub and
the in-process backend run on asyncio and trio; :class:`RedisBroadcast` uses redis-py's
asyncio client and refuses to run on trio with :class:`UnsupportedBackendError`.

What the server does matters at the edges. uvicorn raises when the application sends to a
socket whose client is gone (as the ASGI spec asks), so the hub drops it at the first
failed send; hypercorn silently discards such sends, so there a dead socket leaves the hub
when its handler next reads and sees the disconnect. hypercorn also shields its socket
writes from cancellation: a client that stops reading altogether keeps its handler until the
server drops the connection, where on uvicorn the hub ends the handler's block after
``close_timeout``. Either way the hub stops queueing for it at once, so senders and memory
are never affected.

Example::

    hub = ConnectionHub()                  # or ConnectionHub(RedisBroadcast(redis_url))
    hub.install(registry)

    async def events(websocket: WebSocket) -> None:        # a Starlette websocket route
        manager = await ambient.resolve(UserWebSocketManager)
        async with manager.connect(websocket):
            async for text in websocket.iter_text():
                async with message_scope():
                    await run_agent(text)

    async def run_agent(prompt: str) -> None:             # anywhere in the user's request
        ws = await ambient.resolve(UserWebSocketManager)
        async for token in llm.stream(prompt):
            await ws.send({"type": "token", "text": token})
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import secrets
import struct
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

import anyio

import ambient
from ambient import (
    Lifetime,
    Registry,
    Scope,
    UserExecutionContext,
    UserRef,
    _loops,
    current_context_or_none,
    current_scope,
    get_current_context,
)
from ambient.errors import (
    AmbientError,
    ContextSwitchError,
    NoActiveContextError,
    UnsupportedBackendError,
)
from ambient.middleware import _problem

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = [
    "Broadcast",
    "BroadcastError",
    "Connection",
    "ConnectionHub",
    "Envelope",
    "HubStats",
    "InProcessBroadcast",
    "OriginAllowList",
    "RedisBroadcast",
    "UnsupportedBackendError",
    "UserWebSocketManager",
    "WebSocketLike",
    "decode_envelope",
    "encode_envelope",
    "message_scope",
]

logger = logging.getLogger("ambient.websockets")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TRY_AGAIN_LATER: Final = 1013

# Whom an envelope is for, within its user.
TO_USER: Final = 0
TO_THREAD: Final = 1
TO_CONNECTION: Final = 2

Event = Mapping[str, Any] | bytes | bytearray | memoryview


class BroadcastError(AmbientError, ConnectionError):
    """The event could not be handed to the delivery backend (Redis is unreachable).

    Raised to the sender, never swallowed: the event was not delivered anywhere. An HTTP
    request that lets it propagate is answered 503 with ``Retry-After`` by the middleware.
    """

    http_status = 503
    problem_type = "urn:ambient:problem:broadcast-unavailable"
    title = "Event delivery unavailable"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(detail)


class WebSocketLike(Protocol):
    """What the hub needs from a websocket: Starlette's (and FastAPI's) ``WebSocket`` fits."""

    async def accept(self) -> None:
        """Complete the handshake."""
        ...

    async def send_text(self, data: str) -> None:
        """Send a text frame."""
        ...

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame."""
        ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the socket."""
        ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event on its way to a user's sockets.

    Attributes:
        user: The user whose sockets receive it (always taken from a bound context).
        mode: ``TO_USER``, ``TO_THREAD`` or ``TO_CONNECTION``.
        target: The thread id or connection id for the last two modes.
        data: A text frame (``str``, JSON) or a binary frame (``bytes``).
    """

    user: UserRef
    mode: int
    target: str | None
    data: str | bytes


Deliver = Callable[[Envelope], None]


class Broadcast(Protocol):
    """A delivery backend: takes envelopes from senders and hands them to every process's
    hub, which delivers to the sockets it holds."""

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback (called once, by the hub)."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to every process holding sockets of its user.

        Raises:
            BroadcastError: when it cannot be handed on.
        """
        ...

    async def subscribe(self, user: UserRef) -> None:
        """Start receiving ``user``'s envelopes here (reference-counted); returns once
        envelopes published from now on will arrive.

        Raises:
            BroadcastError: when the subscription cannot be made.
        """
        ...

    async def unsubscribe(self, user: UserRef) -> None:
        """Drop one reference taken by :meth:`subscribe`."""
        ...

    async def aclose(self) -> None:
        """Release connections and tasks (the backend may be used again afterwards)."""
        ...


class InProcessBroadcast:
    """The default backend: delivery within this process, nothing to configure."""

    __slots__ = ("_deliver",)

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback."""
        _attach_once(self._deliver, deliver)
        self._deliver = deliver

    async def publish(self, envelope: Envelope) -> None:
        """Queue ``envelope`` on this process's matching sockets."""
        deliver = self._deliver
        if deliver is not None:
            deliver(envelope)
        # A real suspension point: writers get to run even when a sender emits in a tight
        # loop, so a fast socket keeps up instead of overflowing its queue.
        await anyio.lowlevel.checkpoint()

    async def subscribe(self, user: UserRef) -> None:
        """Nothing to do in one process."""

    async def unsubscribe(self, user: UserRef) -> None:
        """Nothing to do in one process."""

    async def aclose(self) -> None:
        """Nothing to release."""


def _attach_once(current: Deliver | None, new: Deliver) -> None:
    if current is not None and current != new:
        msg = "this backend already delivers to another ConnectionHub; give each hub its own"
        raise RuntimeError(msg)


@dataclass(frozen=True, slots=True)
class HubStats:
    """A snapshot of a :class:`ConnectionHub`.

    Attributes:
        connections: Sockets registered now.
        users: Users with at least one socket here.
        queued: Events waiting in socket queues.
        queued_bytes: Their size (characters of text frames, bytes of binary frames).
        peak_queued: The longest any socket's queue has been.
        overflows: Sockets closed with 1013 because they fell too far behind.
        send_failures: Sockets dropped because a send to them failed.
        replaced: Sockets closed with 1008 to make room for a newer one of the same user.
    """

    connections: int
    users: int
    queued: int
    queued_bytes: int
    peak_queued: int
    overflows: int
    send_failures: int
    replaced: int


class Connection:
    """One registered socket, as its handler sees it (yielded by
    :meth:`UserWebSocketManager.connect`).

    Attributes:
        connection_id: The id of this connection (the context's ``connection_id``).
        user: Whose socket it is.
        thread_id: The conversation thread it follows.
        close_code: The code the hub closed it with (1013 overflow, 1008 replaced,
            1001 shutdown), or ``None``.
    """

    __slots__ = (
        "__weakref__",
        "_block_scope",
        "_closing",
        "_done",
        "_hub",
        "_queue",
        "_queued_bytes",
        "_wakeup",
        "_websocket",
        "_writer_scope",
        "close_code",
        "connection_id",
        "thread_id",
        "user",
    )

    def __init__(
        self, hub: ConnectionHub, websocket: WebSocketLike, ctx: UserExecutionContext
    ) -> None:
        self._hub = hub
        self._websocket = websocket
        self.connection_id = ctx.connection_id or secrets.token_hex(16)
        self.user = ctx.user
        self.thread_id = ctx.thread_id
        self.close_code: int | None = None
        self._queue: deque[str | bytes] = deque()
        self._queued_bytes = 0
        self._wakeup: anyio.Event | None = None
        # (code, reason) once the hub decided to close the socket.
        self._closing: tuple[int, str] | None = None
        # Set when the writer must stop once its queue is empty (the handler is done).
        self._done = False
        self._writer_scope: anyio.CancelScope | None = None
        self._block_scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.connection_id} of {self.user.user_id!r}>"

    @property
    def closed(self) -> bool:
        """Whether the hub no longer delivers to this socket."""
        return self._done or self._closing is not None

    async def send(self, event: Event) -> None:
        """Send ``event`` to this socket only, in order with everything the hub sends it.

        Raises:
            TypeError, ValueError: ``event`` is not a JSON-serialisable mapping or bytes.
            BroadcastError: the backend is unreachable.
        """
        data = _encode(event, self._hub.queue_bytes)
        await self._hub._publish(Envelope(self.user, TO_CONNECTION, self.connection_id, data))

    # -- the hub's side ------------------------------------------------------------------

    def _offer(self, data: str | bytes) -> None:
        """Queue ``data`` without waiting; an overflowing socket is closed with 1013."""
        if self._done or self._closing is not None:
            return
        hub = self._hub
        size = len(data)
        if len(self._queue) >= hub.queue_size or self._queued_bytes + size > hub.queue_bytes:
            hub._overflowed(self)
            return
        self._queue.append(data)
        self._queued_bytes += size
        hub._peak_queued = max(hub._peak_queued, len(self._queue))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _request_close(self, code: int, reason: str, *, drain: bool) -> None:
        """Close the socket from the writer (after the queue, when ``drain``), within the
        hub's ``close_timeout``; past it the connection's block is cancelled."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        self.close_code = code
        if not drain:
            self._queue.clear()
            self._queued_bytes = 0
        self._limit_writer()

    def _finish(self) -> None:
        """The handler is done: write what is queued (within ``close_timeout``), then stop."""
        self._done = True
        self._limit_writer()

    def _abort(self) -> None:
        """The handler failed: stop writing now."""
        self._done = True
        self._queue.clear()
        self._queued_bytes = 0
        if self._writer_scope is not None:
            self._writer_scope.cancel()

    def _limit_writer(self) -> None:
        scope = self._writer_scope
        if scope is not None:
            scope.deadline = min(scope.deadline, anyio.current_time() + self._hub.close_timeout)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    async def _run_writer(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Drain the queue into the socket, in order; then close it if the hub asked to."""
        websocket = self._websocket
        finished = failed = False
        with anyio.CancelScope() as scope:
            self._writer_scope = scope
            task_status.started()
            try:
                while True:
                    if not self._queue:
                        if self._done or self._closing is not None:
                            break
                        wakeup = self._wakeup = anyio.Event()
                        await wakeup.wait()
                        continue
                    data = self._queue.popleft()
                    self._queued_bytes -= len(data)
                    if isinstance(data, str):
                        await websocket.send_text(data)
                    else:
                        await websocket.send_bytes(data)
                closing = self._closing
                if closing is not None:
                    await websocket.close(closing[0], closing[1])
            except Exception:  # whatever the server raised, the socket is gone
                logger.debug("ambient: send to %r failed; dropping it", self, exc_info=True)
                failed = self._hub._send_failed(self)
            finished = True
        self._writer_scope = None
        if failed or self._closing is not None:
            # The hub ended this connection: end the handler's block as well. The socket
            # is closed or broken, and a framework WebSocket refuses to receive once it has
            # been closed from this side (Starlette raises WebSocketDisconnected).
            if not finished:
                logger.info("ambient: %r did not close within close_timeout", self)
            block = self._block_scope
            if block is not None:
                block.cancel()


class ConnectionHub:
    """The live websocket connections of this process (an APP component).

    Args:
        backend: How events reach the sockets: :class:`InProcessBroadcast` (default) or
            :class:`RedisBroadcast` for several processes or hosts.
        max_connections_per_user: Sockets one user may hold in this process; one more
            closes the user's oldest socket with 1008 (the newest always gets in).
        queue_size: Events a socket may fall behind before it is closed with 1013.
        queue_bytes: Size a socket's queue may reach (characters of text plus bytes of
            binary frames) before it is closed with 1013; a bigger event is refused.
        close_timeout: Seconds the hub waits for a socket to take its last frames and the
            close frame before it cancels the socket's handler block.

    Example::

        hub = ConnectionHub(RedisBroadcast("redis://cache:6379/0"))
        hub.install(registry)
    """

    def __init__(
        self,
        backend: Broadcast | None = None,
        *,
        max_connections_per_user: int = 16,
        queue_size: int = 256,
        queue_bytes: int = 4 * 1024 * 1024,
        close_timeout: float = 5.0,
    ) -> None:
        for name, value in (
            ("max_connections_per_user", max_connections_per_user),
            ("queue_size", queue_size),
            ("queue_bytes", queue_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be an int >= 1, not {value!r}"
                raise ValueError(msg)
        if not close_timeout > 0:
            msg = f"close_timeout must be > 0 seconds, not {close_timeout!r}"
            raise ValueError(msg)
        self.backend: Broadcast = InProcessBroadcast() if backend is None else backend
        self.max_connections_per_user = max_connections_per_user
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.close_timeout = close_timeout
        self._users: dict[UserRef, dict[str, Connection]] = {}
        self._count = 0
        self._peak_queued = 0
        self._overflows = 0
        self._send_failures = 0
        self._replaced = 0
        self.backend.attach(self._deliver)

    def install(self, registry: Registry) -> None:
        """Register this hub (APP) and :class:`UserWebSocketManager` (REQUEST) in
        ``registry``; the registry closes the hub at shutdown."""
        registry.register(ConnectionHub, self._provide, lifetime=Lifetime.APP)
        registry.register(UserWebSocketManager, self._manager)

    def _provide(self) -> ConnectionHub:
        return self

    def _manager(self, ctx: UserExecutionContext) -> UserWebSocketManager:
        # Resolving the hub makes the registry own it, so shutdown closes the backend.
        ambient.resolve_sync(ConnectionHub)
        return UserWebSocketManager(self, ctx)

    def stats(self) -> HubStats:
        """Counts of connections, queued events and closes (safe to call from any thread)."""
        connections = [c for user in list(self._users.values()) for c in list(user.values())]
        return HubStats(
            connections=self._count,
            users=len(self._users),
            queued=sum(len(c._queue) for c in connections),
            queued_bytes=sum(c._queued_bytes for c in connections),
            peak_queued=self._peak_queued,
            overflows=self._overflows,
            send_failures=self._send_failures,
            replaced=self._replaced,
        )

    async def aclose(self) -> None:
        """Close every socket with 1001 (after its queue) and release the backend.

        The registry calls this at shutdown. The hub stays usable: a later connection
        starts the backend again.
        """
        for user in list(self._users.values()):
            for connection in list(user.values()):
                self._remove(connection)
                connection._request_close(CLOSE_GOING_AWAY, "server shutting down", drain=True)
        await self.backend.aclose()

    # -- delivery ------------------------------------------------------------------------

    async def _publish(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to the backend (which calls :meth:`_deliver` in each process)."""
        await self.backend.publish(envelope)

    def _deliver(self, envelope: Envelope) -> None:
        """Queue ``envelope`` on the matching sockets this process holds (never waits)."""
        connections = self._users.get(envelope.user)
        if not connections:
            return
        mode = envelope.mode
        target = envelope.target
        data = envelope.data
        if mode == TO_CONNECTION:
            connection = connections.get(target) if target is not None else None
            if connection is not None:
                connection._offer(data)
            return
        for connection in list(connections.values()):
            if mode == TO_USER or connection.thread_id == target:
                connection._offer(data)

    # -- registration --------------------------------------------------------------------

    @asynccontextmanager
    async def _connect(
        self, ctx: UserExecutionContext, websocket: WebSocketLike, *, accept: bool = True
    ) -> AsyncIterator[Connection]:
        """Register ``websocket`` for ``ctx`` while the block runs (the way in is
        :meth:`UserWebSocketManager.connect`, which takes ``ctx`` from the binding)."""
        connection = Connection(self, websocket, ctx)
        user = connection.user
        existing = self._users.get(user)
        if existing is not None and connection.connection_id in existing:
            msg = f"connection {connection.connection_id} is already registered"
            raise RuntimeError(msg)
        try:
            await self.backend.subscribe(user)
        except BroadcastError as error:
            if accept:
                await _refuse_after_accept(websocket, str(error))
            raise
        failure: BaseException | None = None
        try:
            if accept:
                await websocket.accept()
            async with anyio.create_task_group() as tg:
                connection._block_scope = tg.cancel_scope
                await tg.start(connection._run_writer)
                self._add(connection)
                try:
                    yield connection
                except anyio.get_cancelled_exc_class():
                    connection._abort()
                    raise
                except BaseException as error:  # noqa: BLE001 - re-raised below
                    connection._abort()
                    # Re-raised below the task group, which would wrap it in a group.
                    failure = error
                finally:
                    self._remove(connection)
                    connection._finish()
            if failure is not None:
                raise failure
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                try:
                    await self.backend.unsubscribe(user)
                except Exception:
                    logger.warning("ambient: unsubscribing %r failed", connection, exc_info=True)

    def _add(self, connection: Connection) -> None:
        connections = self._users.setdefault(connection.user, {})
        while len(connections) >= self.max_connections_per_user:
            oldest = next(iter(connections.values()))
            self._remove(oldest)
            self._replaced += 1
            oldest._request_close(
                CLOSE_POLICY_VIOLATION,
                f"too many connections (limit {self.max_connections_per_user}); "
                "replaced by a newer one",
                drain=True,
            )
        connections[connection.connection_id] = connection
        self._count += 1

    def _remove(self, connection: Connection) -> None:
        connections = self._users.get(connection.user)
        if connections is None or connections.get(connection.connection_id) is not connection:
            return
        del connections[connection.connection_id]
        self._count -= 1
        if not connections:
            del self._users[connection.user]

    def _overflowed(self, connection: Connection) -> None:
        """``connection`` fell ``queue_size`` events behind: drop it and close it with 1013."""
        self._remove(connection)
        self._overflows += 1
        logger.warning(
            "ambient: %r fell more than %d events behind; closing it with 1013",
            connection,
            self.queue_size,
        )
        connection._request_close(
            CLOSE_TRY_AGAIN_LATER, "too slow: the event queue overflowed", drain=False
        )

    def _send_failed(self, connection: Connection) -> bool:
        """A send to ``connection`` failed: it is gone. Return whether its handler was
        still using it (rather than already leaving or being closed by the hub)."""
        if connection._done or connection._closing is not None:
            return False
        connection._done = True
        self._remove(connection)
        self._send_failures += 1
        return True


async def _refuse_after_accept(websocket: WebSocketLike, reason: str) -> None:
    """Tell the client to come back later: accept, then close with 1013 and the reason."""
    try:
        await websocket.accept()
        await websocket.close(
            CLOSE_TRY_AGAIN_LATER, reason.encode()[:123].decode("utf-8", "ignore")
        )
    except Exception:  # the client may already be gone
        logger.debug("ambient: could not refuse the socket", exc_info=True)


class UserWebSocketManager:
    """Send events to the current user's sockets (a REQUEST component).

    Resolve it in the request or connection: ``await ambient.resolve(UserWebSocketManager)``.
    The recipient is always the bound context's user (and, for :meth:`send`, its thread);
    there is no way to name another user. Using a manager while another user's context is
    bound raises :class:`~ambient.errors.ContextSwitchError`.
    """

    __slots__ = ("_hub", "_user")

    def __init__(self, hub: ConnectionHub, ctx: UserExecutionContext) -> None:
        self._hub = hub
        self._user = ctx.user

    def _bound(self) -> UserExecutionContext:
        ctx = current_context_or_none()
        if ctx is None:
            raise NoActiveContextError
        if ctx.user_id != self._user.user_id or ctx.tenant_id != self._user.tenant_id:
            msg = (
                "this UserWebSocketManager was resolved for another user than the one bound "
                "here; resolve it in the current context instead of keeping it around"
            )
            raise ContextSwitchError(msg)
        return ctx

    async def send(self, event: Event) -> None:
        """Send ``event`` to the current user's sockets on the current conversation thread.

        Never waits for a socket and never fails because one is slow or gone.

        Args:
            event: A JSON-serialisable mapping (sent as a text frame) or bytes (binary).

        Raises:
            TypeError, ValueError: ``event`` cannot be serialised, or is larger than the
                hub's ``queue_bytes``.
            BroadcastError: the backend is unreachable; nothing was delivered.
            NoActiveContextError, ContextSwitchError: no context, or another user's, bound.
        """
        ctx = self._bound()
        data = _encode(event, self._hub.queue_bytes)
        await self._hub._publish(Envelope(ctx.user, TO_THREAD, ctx.thread_id, data))

    async def broadcast_user(self, event: Event) -> None:
        """Send ``event`` to every socket of the current user, on every thread.

        Raises:
            The same as :meth:`send`.
        """
        ctx = self._bound()
        data = _encode(event, self._hub.queue_bytes)
        await self._hub._publish(Envelope(ctx.user, TO_USER, None, data))

    def connect(
        self, websocket: WebSocketLike, *, accept: bool = True
    ) -> AbstractAsyncContextManager[Connection]:
        """Register ``websocket`` as a socket of the bound context while the block runs.

        The socket is keyed by the context's user, thread and ``connection_id``. It is
        accepted (unless ``accept=False``: accept it yourself first, e.g. with a
        subprotocol), subscribed and registered before the block starts, so an event sent
        after that reaches it. It is unregistered when the block ends, when a send to it
        fails, when it falls behind (closed with 1013) or when the user opens more than
        ``max_connections_per_user`` sockets (the oldest is closed with 1008).

        The block is the socket's lifetime: when the hub ends the connection (a failed
        send, 1013, 1008, or 1001 at shutdown) it cancels the block, which then exits
        quietly; the code after it runs as usual. Work that must outlive the socket
        belongs outside the block. Send to this socket alone with ``connection.send``.

        Raises:
            BroadcastError: the backend could not subscribe (the socket is accepted and
                closed with 1013 first).
        """
        ctx = self._bound()
        return self._hub._connect(ctx, websocket, accept=accept)


def message_scope(operation: str = "websocket.message", **metadata: object) -> Scope:
    """A scope for one incoming message: ``async with message_scope():``.

    It binds a child of the current context (same user, thread and connection, a new
    ``run_id`` whose parent is the connection's run) and gives it its own REQUEST
    components, cleaned when the block ends; the connection's context and components are
    bound again afterwards.

    Raises:
        NoActiveContextError: no scope is bound (call it inside a connection's scope).
    """
    parent = current_scope()
    child = get_current_context().child(operation, **metadata)
    return parent.registry.open_scope(child)


def _encode(event: Event, limit: int) -> str | bytes:
    data: str | bytes
    if isinstance(event, bytes | bytearray | memoryview):
        data = bytes(event)
    elif isinstance(event, Mapping):
        document = event if isinstance(event, dict) else dict(event)
        data = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    else:
        msg = f"an event is a JSON-serialisable mapping or bytes, not {type(event).__name__}"
        raise TypeError(msg)
    if len(data) > limit:
        msg = f"the event is {len(data)} long, more than the hub's queue_bytes ({limit})"
        raise ValueError(msg)
    return data


# -- Redis ---------------------------------------------------------------------------------

_HEADER = struct.Struct("!BBHHH")  # kind, mode, len(tenant)+1 or 0, len(user), len(target)
_TEXT, _BINARY = 0, 1


def encode_envelope(envelope: Envelope) -> bytes:
    """The wire form of ``envelope`` on Redis (the user travels along and is checked)."""
    user = envelope.user
    tenant = b"" if user.tenant_id is None else user.tenant_id.encode()
    user_id = user.user_id.encode()
    target = b"" if envelope.target is None else envelope.target.encode()
    data = envelope.data
    kind = _TEXT if isinstance(data, str) else _BINARY
    payload = data.encode() if isinstance(data, str) else data
    tenant_len = 0 if user.tenant_id is None else len(tenant) + 1
    header = _HEADER.pack(kind, envelope.mode, tenant_len, len(user_id), len(target))
    return b"".join((header, tenant, user_id, target, payload))


def decode_envelope(raw: bytes) -> Envelope:
    """The inverse of :func:`encode_envelope`.

    Raises:
        ValueError: ``raw`` is not an envelope.
    """
    try:
        kind, mode, tenant_len, user_len, target_len = _HEADER.unpack_from(raw)
    except struct.error:
        raise ValueError("not an ambient websocket envelope") from None
    at = _HEADER.size
    tenant = None
    if tenant_len:
        tenant = raw[at : at + tenant_len - 1].decode()
        at += tenant_len - 1
    user_id = raw[at : at + user_len].decode()
    at += user_len
    target = raw[at : at + target_len].decode() if target_len else None
    at += target_len
    if kind not in (_TEXT, _BINARY) or mode not in (TO_USER, TO_THREAD, TO_CONNECTION):
        raise ValueError("not an ambient websocket envelope")
    payload = raw[at:]
    data: str | bytes = payload.decode() if kind == _TEXT else bytes(payload)
    return Envelope(UserRef(user_id, tenant), mode, target, data)


_ASYNCIO_ONLY = (
    "RedisBroadcast uses redis-py's asyncio client, which runs on asyncio only, and this "
    "code runs under another event loop (trio?): run the application on asyncio "
    "(uvicorn and hypercorn do by default) or use the in-process backend"
)


class RedisBroadcast:
    """Fan events out across processes and hosts through Redis pub/sub (extra ``redis``).

    Every process subscribes to one channel per user it holds sockets of (the channel
    name is a hash of tenant and user id) and delivers what arrives to those sockets;
    senders publish on the user's channel. A reader task per process keeps the
    subscription alive: it notices a dead connection (also a silent one, by pinging every
    ``health_check_interval`` seconds), reconnects with exponential back-off and
    re-subscribes. Publishing while Redis is unreachable raises :class:`BroadcastError`;
    so does opening a socket while the subscription cannot be made. Pub/sub delivers at
    most once: events published while this process is disconnected do not reach its
    sockets.

    Args:
        url: The Redis URL (``redis://host:6379/0``).
        channel_prefix: Prefix of the channel names (separate applications sharing one
            Redis need different prefixes).
        timeout: Seconds to connect, publish or subscribe before failing.
        reconnect_delay: First back-off delay after a lost connection, doubled per failure.
        max_reconnect_delay: The longest back-off delay.
        health_check_interval: Seconds of silence after which the subscription connection
            is pinged; twice that without an answer and it is replaced.

    Raises:
        UnsupportedBackendError: when constructed (or later used) under trio.
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "ambient:ws:",
        timeout: float = 2.0,
        reconnect_delay: float = 0.05,
        max_reconnect_delay: float = 2.0,
        health_check_interval: float = 5.0,
    ) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        for name, value in (
            ("timeout", timeout),
            ("reconnect_delay", reconnect_delay),
            ("max_reconnect_delay", max_reconnect_delay),
            ("health_check_interval", health_check_interval),
        ):
            if not value > 0:
                msg = f"{name} must be > 0 seconds, not {value!r}"
                raise ValueError(msg)
        self.url = url
        self.channel_prefix = channel_prefix
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.health_check_interval = health_check_interval
        self.reconnects = 0
        self._deliver: Deliver | None = None
        self._control = f"{channel_prefix}process:{secrets.token_hex(8)}".encode()
        self._refs: dict[bytes, int] = {}
        self._users: dict[bytes, UserRef] = {}
        self._pending: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._changed: anyio.Event | None = None
        self._client: Redis | None = None
        self._sub_client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = False
        self._down_since: float | None = None

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<RedisBroadcast {state} channels={len(self._refs)}>"

    @property
    def connected(self) -> bool:
        """Whether the subscription connection is up and every channel confirmed."""
        return self._connected

    @property
    def subscriptions(self) -> int:
        """User channels this process is subscribed to (users with sockets here)."""
        return len(self._refs)

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback."""
        _attach_once(self._deliver, deliver)
        self._deliver = deliver

    def channel(self, user: UserRef) -> bytes:
        """The Redis channel of ``user``."""
        key = json.dumps([user.tenant_id, user.user_id]).encode()
        return self.channel_prefix.encode() + hashlib.sha256(key).hexdigest()[:32].encode()

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        """Publish ``envelope`` on its user's channel.

        Raises:
            BroadcastError: Redis did not take it within ``timeout``.
            UnsupportedBackendError: not running on asyncio.
        """
        _loops.require_asyncio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        client = self._publisher()
        try:
            with anyio.fail_after(self.timeout):
                await client.publish(self.channel(envelope.user), encode_envelope(envelope))
        except (RedisError, OSError) as error:
            raise BroadcastError(f"could not publish the event to Redis: {error}") from error

    def _publisher(self) -> Redis:
        if self._client is None:
            self._client = self._new_client(retries=1)
        return self._client

    def _new_client(self, *, retries: int) -> Redis:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One retry heals a pooled connection that died with a Redis restart; a Redis
            # that is down fails at once instead of after a long back-off.
            retry=Retry(NoBackoff(), retries),
        )

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(self, user: UserRef) -> None:
        """Subscribe to ``user``'s channel (reference-counted) and wait until Redis
        confirmed it.

        Raises:
            BroadcastError: Redis is down or did not confirm within ``timeout``.
            UnsupportedBackendError: not running on asyncio.
        """
        _loops.require_asyncio(_ASYNCIO_ONLY)
        channel = self.channel(user)
        refs = self._refs.get(channel, 0)
        self._refs[channel] = refs + 1
        self._users[channel] = user
        try:
            self._start_reader()
            self._check_up()
            if refs == 0:
                await self._send("SUBSCRIBE", channel)
            with anyio.fail_after(self.timeout):
                while channel not in self._confirmed:
                    await self._wait_changed()
                    self._check_up()  # the connection broke meanwhile: fail now
        except TimeoutError:
            await self._release(user)
            msg = f"Redis did not confirm the subscription within {self.timeout} s"
            raise BroadcastError(msg) from None
        except BaseException:
            await self._release(user)
            raise

    async def _release(self, user: UserRef) -> None:
        with anyio.CancelScope(shield=True):
            await self.unsubscribe(user)

    def _check_up(self) -> None:
        if self._down_since is not None:
            down = anyio.current_time() - self._down_since
            raise BroadcastError(f"Redis has been unreachable for {down:.1f} s")

    async def unsubscribe(self, user: UserRef) -> None:
        """Drop one reference on ``user``'s channel; the last one unsubscribes."""
        channel = self.channel(user)
        refs = self._refs.get(channel, 0) - 1
        if refs > 0:
            self._refs[channel] = refs
            return
        self._refs.pop(channel, None)
        self._users.pop(channel, None)
        self._confirmed.discard(channel)
        await self._send("UNSUBSCRIBE", channel)

    async def _send(self, command: str, channel: bytes) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # the reader (re)subscribes every wanted channel when it connects
        if command == "SUBSCRIBE":
            self._pending[channel] = self._pending.get(channel, 0) + 1
        try:
            await pubsub.execute_command(command, channel)
        except Exception:  # the reader notices the broken connection
            logger.debug("ambient: %s on Redis failed", command, exc_info=True)

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_connected(self) -> None:
        """Wait until the subscription connection is up, starting it if needed (bound the
        wait with ``anyio.fail_after``)."""
        _loops.require_asyncio(_ASYNCIO_ONLY)
        self._start_reader()
        while not self._connected:
            await self._wait_changed()

    # -- the reader task -----------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            # An empty contextvars.Context: the reader serves every user of the process and
            # must not carry the context of the request that happened to start it.
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_forever(), context=contextvars.Context())

    async def _read_forever(self) -> None:
        delay = self.reconnect_delay
        while True:
            try:
                await self._read_once()
            except Exception as error:  # noqa: BLE001 - any failure means: reconnect
                if self._down_since is None:
                    self._down_since = anyio.current_time()
                    logger.warning("ambient: lost the Redis subscription (%s); reconnecting", error)
            finally:
                if self._connected:
                    delay = self.reconnect_delay  # it worked for a while: retry promptly
                self._connected = False
                self._confirmed.clear()
                self._pending.clear()
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    # Any: redis-py types aclose() in some releases and not in others.
                    aclose: Any = pubsub.aclose
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(aclose())
                self._notify()
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)

    async def _read_once(self) -> None:
        if self._sub_client is None:
            self._sub_client = self._new_client(retries=0)
        pubsub = self._sub_client.pubsub()
        channels = [self._control, *self._refs]
        for channel in channels:
            self._pending[channel] = 1
        try:
            with anyio.fail_after(self.timeout):
                await pubsub.execute_command("SUBSCRIBE", *channels)
        except BaseException:
            aclose: Any = pubsub.aclose
            with anyio.CancelScope(shield=True):
                await _close_quietly(aclose())
            raise
        self._pubsub = pubsub
        # Channels subscribed or dropped while the SUBSCRIBE above was on its way.
        sent = set(channels)
        late = [channel for channel in self._refs if channel not in sent]
        gone = [c for c in channels if c not in self._refs and c != self._control]
        if late:
            for channel in late:
                self._pending[channel] = 1
            await pubsub.execute_command("SUBSCRIBE", *late)
        if gone:
            await pubsub.execute_command("UNSUBSCRIBE", *gone)
        interval = self.health_check_interval
        silent_since = anyio.current_time()
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=interval)
            now = anyio.current_time()
            if message is None:
                if now - silent_since >= 2 * interval:
                    raise ConnectionError(f"Redis did not answer a ping within {interval} s")
                if not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            silent_since = now
            pinged = False
            self._handle(message)

    def _handle(self, message: Mapping[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if kind == "message":
            user = self._users.get(channel)
            deliver = self._deliver
            if user is None or deliver is None:
                return
            try:
                envelope = decode_envelope(message["data"])
            except (ValueError, UnicodeDecodeError):
                logger.warning("ambient: dropped a malformed message on a websocket channel")
                return
            if envelope.user != user:
                logger.warning("ambient: dropped a message whose user does not match its channel")
                return
            deliver(envelope)
        elif kind == "subscribe":
            pending = self._pending.get(channel, 0) - 1
            if pending > 0:
                self._pending[channel] = pending
                return
            self._pending.pop(channel, None)
            if channel in self._refs or channel == self._control:
                self._confirmed.add(channel)
            if not self._connected and not self._pending:
                self._connected = True
                if self._down_since is not None:
                    self.reconnects += 1
                    logger.warning("ambient: the Redis subscription is back")
                self._down_since = None
            self._notify()

    async def aclose(self) -> None:
        """Stop the reader and close the Redis connections (used again on next use)."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([reader])
        for client in (self._client, self._sub_client):
            if client is not None:
                await _close_quietly(client.aclose())
        self._client = self._sub_client = None
        self._connected = False
        self._down_since = None
        self._confirmed.clear()
        self._pending.clear()
        self._notify()


async def _close_quietly(closing: Awaitable[None]) -> None:
    try:
        await closing
    except Exception:  # a connection that is already broken
        logger.debug("ambient: closing a Redis connection failed", exc_info=True)


# -- Origin check --------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


def _origin(value: str) -> str | None:
    """``scheme://host[:port]`` lower-cased without a default port, or ``None``."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (
        not scheme
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginAllowList:
    """ASGI middleware refusing websocket handshakes whose ``Origin`` is not allowed.

    Browsers send cookies (and other ambient credentials) with a websocket handshake from
    any page, and the same-origin policy does not apply to it: without this check a hostile
    page can open an authenticated socket (cross-site websocket hijacking). Put it
    *outside* :class:`~ambient.middleware.AmbientMiddleware` so a refused handshake never
    binds a context or creates a component. HTTP requests pass through untouched.

    A handshake is refused (HTTP 403 where the server supports the denial-response
    extension, else closed with 1008 before accept) when its Origin is not in
    ``allowed_origins``, is malformed, is sent more than once, or is missing (unless
    ``allow_missing=True``, for non-browser clients, which send none).

    Args:
        app: The ASGI application.
        allowed_origins: Origins such as ``"https://app.example.com"`` (scheme, host and
            non-default port; compared case-insensitively).
        allow_missing: Accept handshakes without an Origin header.
    """

    __slots__ = ("allow_missing", "allowed", "app")

    def __init__(
        self, app: ASGIApp, *, allowed_origins: Iterable[str], allow_missing: bool = False
    ) -> None:
        if isinstance(allowed_origins, str):
            msg = "allowed_origins is a list of origins, not one string"
            raise TypeError(msg)
        allowed: set[str] = set()
        for value in allowed_origins:
            origin = _origin(value) if isinstance(value, str) else None
            if origin is None:
                msg = f"{value!r} is not an origin like 'https://app.example.com'"
                raise ValueError(msg)
            allowed.add(origin)
        self.app = app
        self.allowed = frozenset(allowed)
        self.allow_missing = allow_missing

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"origin"]
        if not values and self.allow_missing:
            await self.app(scope, receive, send)
            return
        reason = self._refusal(values)
        if reason is None:
            await self.app(scope, receive, send)
            return
        problem = _problem.Problem(
            403, "Origin not allowed", reason, type_="urn:ambient:problem:origin"
        )
        await problem.deny_websocket(scope, receive, send)

    def _refusal(self, values: list[bytes]) -> str | None:
        if not values:
            return "the websocket handshake carried no Origin header"
        if len(values) > 1:
            return "the websocket handshake carried more than one Origin header"
        try:
            origin = _origin(values[0].decode("ascii"))
        except UnicodeDecodeError:
            origin = None
        if origin is None or origin not in self.allowed:
            return "the websocket handshake came from an origin that is not allowed"
        return None
