"""What application code uses: :class:`UserWebSocketManager` and :func:`message_scope`."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from ambient import (
    Scope,
    UserExecutionContext,
    current_context_or_none,
    current_scope,
    get_current_context,
)
from ambient.errors import ContextSwitchError, NoActiveContextError
from ambient.integrations.websockets._connection import Connection, WebSocketLike
from ambient.integrations.websockets._envelope import TO_THREAD, TO_USER, Envelope, Event, _encode

if TYPE_CHECKING:
    from ambient.integrations.websockets._hub import ConnectionHub


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
        accepted without a subprotocol (unless ``accept=False``: accept it yourself first,
        e.g. with ``subprotocol="bearer"`` when the token came as the subprotocol, as a
        browser requires), subscribed and registered before the block starts, so an event sent
        after that reaches it. It is unregistered when the block ends, when a send to it
        fails, when it falls behind (closed with 1013) or when the user opens more than
        ``max_connections_per_user`` sockets (the oldest is closed with 1008).

        The block is the socket's lifetime: when the hub ends the connection (a failed
        send, 1013, 1008, or 1001 at shutdown) it cancels the block, which then exits
        quietly, and sends the close frame once the block is out; the code after it runs
        as usual. Work that must outlive the socket belongs outside the block. Send to this
        socket alone with ``connection.send``.

        Raises:
            BroadcastError: the backend could not subscribe (the socket is accepted and
                closed with 1013 first, the reason "Event delivery unavailable").
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
    # Seen by whoever sees the connection's scope: the middleware's telemetry too, not only
    # the registry's.
    return parent.registry.open_scope(child, observer=parent._extra)
