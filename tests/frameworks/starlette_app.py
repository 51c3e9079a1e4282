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
    in_thread,
    refuse,
    settled,
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
            WebSocketRoute("/whoami-socket", whoami_socket),
        ]
    )
    install(app, registry=registry, identity=IDENTITY)
    return app, registry, ledger


app = build()[0]
