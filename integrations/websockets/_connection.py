"""One registered socket: its bounded queue and the writer task that drains it."""

from __future__ import annotations

import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Protocol

import anyio

from ambient import UserExecutionContext
from ambient.integrations.websockets._envelope import TO_CONNECTION, Envelope, Event, _encode

if TYPE_CHECKING:
    from ambient.integrations.websockets._hub import ConnectionHub


logger = logging.getLogger("ambient.websockets")


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


class Connection:
    """One registered socket, as its handler sees it (yielded by
    :meth:`UserWebSocketManager.connect`).

    Attributes:
        connection_id: The id of this connection (the context's ``connection_id``).
        user: Whose socket it is.
        thread_id: The conversation thread it follows.
        close_code: The code the hub closed it with (1013 overflow, 1008 replaced,
            1001 shutdown, 4001 revoked), or ``None``.
    """

    __slots__ = (
        "__weakref__",
        "_block_scope",
        "_close_pending",
        "_closing",
        "_done",
        "_ending",
        "_hub",
        "_queue",
        "_queued_bytes",
        "_revoked",
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
        # Set by the writer once the queue is written: the hub sends the close frame as
        # soon as the handler's block is out (see ``_connect``).
        self._close_pending = False
        # Set when the writer must stop once its queue is empty (the handler is done).
        self._done = False
        self._writer_scope: anyio.CancelScope | None = None
        self._block_scope: anyio.CancelScope | None = None
        # The handler's block must end: now, or as soon as it starts.
        self._ending = False
        # The close reason once the user's access was revoked.
        self._revoked: str | None = None

    def __repr__(self) -> str:
        # The connection id only, as a scope's repr: it goes into log lines (the hub's
        # warnings), where a raw user id must never appear.
        return f"<Connection {self.connection_id}>"

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
        """End the connection: the writer writes the queue (when ``drain``) within the
        hub's ``close_timeout`` and cancels the handler's block, and the hub closes the
        socket once the block is out."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        self.close_code = code
        if not drain:
            self._queue.clear()
            self._queued_bytes = 0
        self._limit_writer()

    def _revoke(self, code: int, reason: str) -> None:
        """Access revoked: end the handler's block now, before it handles anything more;
        the hub closes the socket with ``code`` once the block is out."""
        self._revoked = reason
        self.close_code = code
        # Not ``_closing``: the writer must not start a close the cancellation could cut
        # short (the framework would then refuse the hub's own close frame).
        self._done = True
        self._queue.clear()
        self._queued_bytes = 0
        self._end_block()

    def _end_block(self) -> None:
        """End the handler's block now, or as soon as it starts (see ``_connect``)."""
        self._ending = True
        block = self._block_scope
        if block is not None:
            block.cancel()

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
        """Drain the queue into the socket, in order; then end the handler's block if the
        hub ends the connection."""
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
            except Exception:  # whatever the server raised, the socket is gone
                logger.debug("ambient: send to %r failed; dropping it", self, exc_info=True)
                failed = self._hub._send_failed(self)
            finished = True
        self._writer_scope = None
        if failed or self._closing is not None:
            # The hub ended this connection: end the handler's block before the close frame
            # goes out. A framework WebSocket refuses to be used once a close has begun
            # (Starlette raises WebSocketDisconnected), so a handler resuming between the
            # two would fail instead of leaving its block quietly.
            if not finished:
                logger.info("ambient: %r did not take its last frames within close_timeout", self)
            elif not failed:
                self._close_pending = True
            self._end_block()
