"""FastAPI with ``install``, ``CurrentContext`` and ``Resolve``: async and sync endpoints."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import StreamingResponse

import ambient
from ambient import Registry
from ambient.errors import PoolExhaustedError
from ambient.integrations.fastapi import CurrentContext, Resolve, install
from tests.frameworks.common import (
    IDENTITY,
    Ledger,
    Memory,
    Probe,
    Work,
    build_registry,
    describe,
    describe_socket,
    gate,
    grouped,
    in_thread,
    refuse,
    settled,
    work_stream,
)


def build() -> tuple[FastAPI, Registry, Ledger]:
    registry, ledger = build_registry()
    app = FastAPI()
    install(app, registry=registry, identity=IDENTITY)

    @app.get("/whoami")
    async def whoami(
        ctx: CurrentContext,
        probe: Annotated[Probe, Resolve(Probe)],
        memory: Annotated[Memory, Resolve(Memory)],
        gate_name: Annotated[str | None, Query(alias="gate")] = None,
        size: int = 0,
    ) -> dict[str, Any]:
        overlapped = await gate(gate_name, size)
        hop = await anyio.to_thread.run_sync(in_thread)
        assert ctx is ambient.get_current_context()
        return describe(probe, memory, overlapped=overlapped, **hop)

    @app.get("/sync")
    def whoami_sync(ctx: CurrentContext, probe: Annotated[Probe, Resolve(Probe)]) -> dict[str, Any]:
        # A plain def endpoint runs in FastAPI's thread pool: same context, same scope.
        memory = ambient.resolve_sync(Memory)
        assert ambient.resolve_sync(Probe) is probe
        return describe(probe, memory, **in_thread(), thread_hop=ctx.user_id == probe.user_id)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return await settled()

    @app.get("/busy")
    async def busy() -> None:
        raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)

    @app.get("/refused")
    async def refused() -> None:
        await refuse()

    @app.get("/grouped")
    async def grouped_view() -> None:
        await grouped()

    @app.websocket("/whoami-socket")
    async def whoami_socket(
        websocket: WebSocket,
        ctx: CurrentContext,
        gate_name: Annotated[str | None, Query(alias="gate")] = None,
        size: int = 0,
    ) -> None:
        await websocket.accept()
        body = await describe_socket(gate_name, size)
        assert ctx is ambient.get_current_context()
        await websocket.send_json(body)
        await websocket.close()

    @app.get("/work")
    async def work(_: Annotated[Work, Resolve(Work)], hang: bool = False) -> StreamingResponse:
        return StreamingResponse(work_stream(hang))

    return app, registry, ledger


app = build()[0]
