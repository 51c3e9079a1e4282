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
* :meth:`ConnectionHub.revoke` ends a named user's sockets (or one of them) in every
  process, for a logout, a ban or a revoked session: each handler's block is cancelled at
  once and the socket closed with 4001; it returns how many sockets of this process it
  ended. It is the one operation that names its user: it is for the auth system or an
  administrator, not for the user's own requests.
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

from ambient.errors import BroadcastError, UnsupportedBackendError
from ambient.integrations.websockets._broadcast import Broadcast, InProcessBroadcast
from ambient.integrations.websockets._broadcast import Deliver as Deliver
from ambient.integrations.websockets._connection import Connection, WebSocketLike
from ambient.integrations.websockets._envelope import REVOKE as REVOKE
from ambient.integrations.websockets._envelope import TO_CONNECTION as TO_CONNECTION
from ambient.integrations.websockets._envelope import TO_THREAD as TO_THREAD
from ambient.integrations.websockets._envelope import TO_USER as TO_USER
from ambient.integrations.websockets._envelope import Envelope, decode_envelope, encode_envelope
from ambient.integrations.websockets._envelope import Event as Event
from ambient.integrations.websockets._hub import CLOSE_GOING_AWAY as CLOSE_GOING_AWAY
from ambient.integrations.websockets._hub import CLOSE_POLICY_VIOLATION as CLOSE_POLICY_VIOLATION
from ambient.integrations.websockets._hub import CLOSE_REVOKED as CLOSE_REVOKED
from ambient.integrations.websockets._hub import CLOSE_TRY_AGAIN_LATER as CLOSE_TRY_AGAIN_LATER
from ambient.integrations.websockets._hub import ConnectionHub, HubStats
from ambient.integrations.websockets._manager import UserWebSocketManager, message_scope
from ambient.integrations.websockets._origin import ASGIApp as ASGIApp
from ambient.integrations.websockets._origin import OriginAllowList
from ambient.integrations.websockets._redis import RedisBroadcast

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
