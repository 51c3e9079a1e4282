"""A Starlette app with per-user websocket channels, for the websocket tests.

``/ws`` registers a socket (it announces itself with a ``ready`` frame, sent once the socket
is registered and subscribed) and handles each incoming message in a message scope;
``/run`` is an agent run in an HTTP request that streams events to its user's sockets.
``tests.ws_redis_app`` builds the same app on Redis for the multi-process test.
"""

from __future__ import annotations

import json
import weakref
from contextlib import aclosing
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import ambient
from ambient.integrations.websockets import (
    BroadcastError,
    Connection,
    ConnectionHub,
    OriginAllowList,
    RedisBroadcast,
    UserWebSocketManager,
    message_scope,
)
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.apps import Ledger, Probe, build_registry


class Sockets:
    """What the app saw of its sockets: weak references, to prove none is kept alive."""

    def __init__(self) -> None:
        self.connections: list[weakref.ref[Connection]] = []


def user_connections(hub: ConnectionHub) -> int:
    """Sockets the current user holds in this process."""
    return len(hub._users.get(ambient.get_current_context().user, {}))


def build_app(hub: ConnectionHub, ledger: Ledger, sockets: Sockets) -> Starlette:
    async def socket(websocket: WebSocket) -> None:
        manager = await ambient.resolve(UserWebSocketManager)
        # A REQUEST component of the connection's own scope: it lives as long as the socket.
        held = await ambient.resolve(Probe)
        ctx = ambient.get_current_context()
        try:
            async with manager.connect(websocket) as connection:
                sockets.connections.append(weakref.ref(connection))
                await connection.send(
                    {
                        "type": "ready",
                        "user": ctx.user_id,
                        "thread": ctx.thread_id,
                        "connection": connection.connection_id,
                        "run_id": ctx.run_id,
                    }
                )
                # aclosing: a handler that fails must not leave the generator to the GC.
                async with aclosing(websocket.iter_text()) as texts:
                    async for text in texts:
                        await handle(json.loads(text), connection, held)
        except BaseException as error:
            ledger.note(f"socket failed: {type(error).__name__}", ctx.user_id)
            raise
        finally:
            ledger.note("socket closed", ctx.user_id)

    async def handle(command: dict[str, Any], connection: Connection, held: Probe) -> None:
        op = command["op"]
        if op == "ping":
            await connection.send({"type": "pong", "n": command.get("n")})
            return
        probe: Probe | None = None
        async with message_scope(op=op):
            ctx = ambient.get_current_context()
            manager = await ambient.resolve(UserWebSocketManager)
            if op == "probe":
                probe = await ambient.resolve(Probe)
                await connection.send(
                    {
                        "type": "probe",
                        "probe": probe.number,
                        "probe_user": probe.user_id,
                        "run_id": ctx.run_id,
                        "parent_run_id": ctx.parent_run_id,
                        "depth": ctx.depth,
                        "held": held.number,
                    }
                )
            elif op == "stream":
                # The handler is busy here, not reading: a vanished client is noticed by
                # the writer's failing send, not by a disconnect message.
                sent = 0
                while user_connections(hub) and sent < command["max"]:
                    await manager.send({"type": "event", "seq": sent, "run": ctx.run_id})
                    sent += 1
                    await anyio.sleep(command["pace"])
                for _ in range(command["after"]):
                    await manager.send({"type": "event", "seq": sent, "run": ctx.run_id})
                    sent += 1
                ledger.note(f"streamed {sent}", ctx.user_id)
            elif op == "echo":
                # What the client wrote, to every socket of its thread; an event that cannot
                # be sent is refused to the sender, on this socket.
                try:
                    await manager.send({"type": "echo", "text": command["text"]})
                except ValueError as error:
                    await connection.send({"type": "refused", "error": str(error)})
            elif op == "boom":
                await ambient.resolve(Probe)
                msg = "the message handler failed"
                raise RuntimeError(msg)
            elif op == "batch":
                start, count, size = command["start"], command["count"], command["size"]
                pad = "x" * size
                for seq in range(start, start + count):
                    await manager.broadcast_user({"type": "event", "seq": seq, "pad": pad})
                await connection.send({"type": "batch-done", "next": start + count})
        if probe is not None:
            after = ambient.get_current_context()
            await connection.send(
                {
                    "type": "after",
                    "cleaned": ledger.cleaned[probe.number],
                    "held_cleaned": ledger.cleaned[held.number],
                    "run_id": after.run_id,
                }
            )

    async def run(request: Request) -> Response:
        """An agent run: ``events`` events to this user's thread, then one to all of the
        user's sockets; with ``pace``, one event every ``pace`` seconds until the user has
        no socket left here, and ``events`` more after that."""
        manager = await ambient.resolve(UserWebSocketManager)
        ctx = ambient.get_current_context()
        events = int(request.query_params.get("events", "100"))
        pace = float(request.query_params.get("pace", "0"))
        sent = 0
        if pace:
            while user_connections(hub) and sent < 10_000:
                await manager.send({"type": "event", "seq": sent, "run": ctx.run_id})
                sent += 1
                await anyio.sleep(pace)
        for _ in range(events):
            event = {
                "type": "event",
                "user": ctx.user_id,
                "thread": ctx.thread_id,
                "run": ctx.run_id,
                "seq": sent,
            }
            try:
                await manager.send(event)
            except BroadcastError as error:
                # The sender learns about the outage; Starlette would turn it into a 500.
                return JSONResponse({"error": str(error), "sent": sent}, status_code=503)
            sent += 1
        if request.query_params.get("broadcast"):
            await manager.broadcast_user(
                {"type": "done", "user": ctx.user_id, "thread": ctx.thread_id, "run": ctx.run_id}
            )
        return JSONResponse({"sent": sent, "run": ctx.run_id, "left": user_connections(hub)})

    async def stats(request: Request) -> Response:
        return JSONResponse(_stats(hub))

    async def closed(request: Request) -> Response:
        """Wait until ``count`` socket handlers have finished."""
        count = int(request.query_params["count"])

        def done(led: Ledger) -> bool:
            return sum(1 for what, _ in led.events if what == "socket closed") >= count

        finished = await anyio.to_thread.run_sync(ledger.wait, done)
        return JSONResponse({"closed": finished, **_stats(hub)})

    async def close_hub(request: Request) -> Response:
        """What the registry does at shutdown; with how many socket handlers had finished
        when it returned."""
        await hub.aclose()
        finished = sum(1 for what, _ in ledger.events if what == "socket closed")
        return JSONResponse({"finished": finished, **_stats(hub)})

    async def revoke(request: Request) -> Response:
        """An administrator ends a user's sockets (or one of them); with what the backend
        raised, and the hub's numbers after it, when the backend could not take it."""
        params = request.query_params
        try:
            ended = await hub.revoke(
                params["user"],
                connection_id=params.get("connection"),
                reason=params.get("reason", "access revoked"),
            )
        except BroadcastError as error:
            return JSONResponse({"error": str(error), **_stats(hub)}, status_code=503)
        return JSONResponse({"ended": ended, **_stats(hub)})

    async def down(request: Request) -> Response:
        """Wait until the Redis subscription is lost."""
        backend = hub.backend
        assert isinstance(backend, RedisBroadcast)
        with anyio.fail_after(10):
            while backend.connected:
                await backend._wait_changed()
        return JSONResponse({"connected": backend.connected})

    async def ready(request: Request) -> Response:
        backend = hub.backend
        if isinstance(backend, RedisBroadcast):
            with anyio.fail_after(float(request.query_params.get("timeout", "10"))):
                await backend.wait_connected()
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[
            WebSocketRoute("/ws", socket),
            Route("/run", run, methods=["POST"]),
            Route("/stats", stats),
            Route("/ready", ready),
            Route("/closed", closed),
            Route("/hub/close", close_hub, methods=["POST"]),
            Route("/revoke", revoke, methods=["POST"]),
            Route("/down", down),
        ]
    )


def _stats(hub: ConnectionHub) -> dict[str, int]:
    stats = hub.stats()
    numbers = {name: getattr(stats, name) for name in stats.__slots__}
    if isinstance(hub.backend, RedisBroadcast):
        numbers["subscriptions"] = hub.backend.subscriptions
        numbers["reconnects"] = hub.backend.reconnects
    return numbers


def build(hub: ConnectionHub, *, origins: list[str] | None = None) -> tuple[Any, Ledger, Sockets]:
    """The app behind AmbientMiddleware (and the Origin check when ``origins`` is given)."""
    ledger = Ledger()
    sockets = Sockets()
    registry = build_registry(ledger)
    hub.install(registry)
    app: Any = AmbientMiddleware(
        build_app(hub, ledger, sockets), registry=registry, identity=trusted_header()
    )
    if origins is not None:
        app = OriginAllowList(app, allowed_origins=origins)
    return app, ledger, sockets
