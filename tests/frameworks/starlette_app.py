"""Starlette with ``ambient.integrations.starlette.install``: no ``request.state`` anywhere."""

from __future__ import annotations

import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import ambient
from ambient import Registry
from ambient.errors import PoolExhaustedError
from ambient.integrations.starlette import install
from tests.frameworks.common import (
    IDENTITY,
    Ledger,
    Memory,
    Probe,
    Work,
    build_registry,
    describe,
    describe_socket,
    describe_sync,
    gate,
    grouped,
    held,
    in_thread,
    refuse,
    release,
    settled,
    work_outcome,
    work_stream,
)


async def whoami(request: Request) -> Response:
    probe = await ambient.resolve(Probe)
    memory = await ambient.resolve(Memory)
    overlapped = await gate(
        request.query_params.get("gate"), int(request.query_params.get("size", 0))
    )
    hop = await anyio.to_thread.run_sync(in_thread)
    return JSONResponse(describe(probe, memory, overlapped=overlapped, **hop))


async def whoami_sync(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(describe_sync))


async def stats(request: Request) -> Response:
    return JSONResponse(await settled())


async def busy(request: Request) -> Response:
    raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)


async def refused(request: Request) -> Response:
    await refuse()


async def grouped_view(request: Request) -> Response:
    await grouped()
    return Response()


async def whoami_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    params = websocket.query_params
    await websocket.send_json(await describe_socket(params.get("gate"), int(params["size"])))
    await websocket.close()


async def work(request: Request) -> Response:
    await ambient.resolve(Work)
    return StreamingResponse(work_stream(bool(request.query_params.get("hang"))))


async def work_socket(websocket: WebSocket) -> None:
    """Begin the Work, tell the client, then work until let go (``/release``) and send the
    result, to a client that may have hung up meanwhile; with ``then=read``, wait for the
    client's thanks before closing (``receive_text`` raises for a client that left)."""
    await ambient.resolve(Work)
    probe = await ambient.resolve(Probe)
    await websocket.accept()
    await websocket.send_text("begun")
    await held(ambient.get_current_context().request_id)
    await websocket.send_text(f"done for {probe.user_id}")
    if websocket.query_params.get("then") == "read":
        await websocket.receive_text()
    await websocket.close()


async def let_go(request: Request) -> Response:
    release(request.query_params["request"])
    return Response()


async def outcome(request: Request) -> Response:
    states = tuple(request.query_params["states"].split(","))
    return Response(await work_outcome(request.query_params["request"], states))


def build() -> tuple[Starlette, Registry, Ledger]:
    registry, ledger = build_registry()
    app = Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/sync", whoami_sync),
            Route("/stats", stats),
            Route("/busy", busy),
            Route("/work", work),
            Route("/refused", refused),
            Route("/grouped", grouped_view),
            Route("/release", let_go),
            Route("/outcome", outcome),
            WebSocketRoute("/whoami-socket", whoami_socket),
            WebSocketRoute("/work-socket", work_socket),
        ]
    )
    install(app, registry=registry, identity=IDENTITY)
    return app, registry, ledger


app = build()[0]
