"""Litestar: the middleware through ``DefineMiddleware``, components through ``Provide``.

Litestar builds its middleware per route handler and keeps lifespan events away from it,
so the registry is closed with ``on_shutdown``. Litestar answers a handler's exception
itself (a 500) before route middleware sees it, so an exception handler answers ambient
errors with an HTTP status through ``answer_error``: the middleware's problem+json body,
and the error noted on the request's scope so that its cleanups see it.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Litestar, Request, Response, WebSocket, get, websocket
from litestar.di import NamedDependency, Provide
from litestar.middleware import DefineMiddleware
from litestar.params import FromQuery
from litestar.response import Stream

import ambient
from ambient import Registry
from ambient.errors import AmbientError, PoolExhaustedError
from ambient.middleware import AmbientMiddleware, answer_error
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
    grouped,
    in_thread,
    refuse,
    settled,
    work_stream,
)
from tests.frameworks.common import gate as pass_gate


async def provide_probe() -> Probe:
    return await ambient.resolve(Probe)


async def provide_memory() -> Memory:
    return await ambient.resolve(Memory)


@get("/whoami")
async def whoami(
    probe: NamedDependency[Probe],
    memory: NamedDependency[Memory],
    gate: FromQuery[str | None] = None,
    size: FromQuery[int] = 0,
) -> dict[str, Any]:
    overlapped = await pass_gate(gate, size)
    hop = await anyio.to_thread.run_sync(in_thread)
    return describe(probe, memory, overlapped=overlapped, **hop)


@get("/sync", sync_to_thread=True)
def whoami_sync() -> dict[str, Any]:
    return describe_sync()


@get("/stats")
async def stats() -> dict[str, Any]:
    return await settled()


@get("/busy")
async def busy() -> None:
    raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)


@get("/refused")
async def refused() -> None:
    await refuse()


@get("/grouped")
async def grouped_view() -> None:
    await grouped()


@get("/work")
async def work(hang: FromQuery[bool] = False) -> Stream:
    await ambient.resolve(Work)
    return Stream(work_stream(hang))


@websocket("/socket")
async def socket(
    socket: WebSocket[Any, Any, Any], fail: FromQuery[str] = "", accept: FromQuery[bool] = True
) -> None:
    """Begin the Work, then fail (with a PoolExhaustedError, or a bug), before or after
    accepting: Litestar closes the socket itself (4500) and returns."""
    await ambient.resolve(Work)
    if accept:
        await socket.accept()
        await socket.send_text("begun")
    if fail == "wait":
        await ambient.resolve(Probe)
        await socket.receive_text()  # until the client hangs up: raises WebSocketDisconnect
    if fail == "busy":
        raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)
    if fail == "bug":
        raise RuntimeError("a bug in the handler")
    await socket.close()


@websocket("/whoami-socket")
async def whoami_socket(
    socket: WebSocket[Any, Any, Any], gate: FromQuery[str | None] = None, size: FromQuery[int] = 0
) -> None:
    await socket.accept()
    await socket.send_json(await describe_socket(gate, size))
    await socket.close()


def problem(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    answer = answer_error(error)
    if answer is None:
        raise error
    return Response(
        answer.body(),
        status_code=answer.status,
        media_type="application/problem+json",
        headers={name.decode(): value.decode() for name, value in answer.headers},
    )


def build() -> tuple[Litestar, Registry, Ledger]:
    registry, ledger = build_registry()
    app = Litestar(
        route_handlers=[
            whoami,
            whoami_sync,
            stats,
            busy,
            work,
            refused,
            grouped_view,
            socket,
            whoami_socket,
        ],
        middleware=[DefineMiddleware(AmbientMiddleware, registry=registry, identity=IDENTITY)],
        dependencies={"probe": Provide(provide_probe), "memory": Provide(provide_memory)},
        # ExceptionGroup too: an error raised in a task group arrives as a group.
        exception_handlers={AmbientError: problem, ExceptionGroup: problem},
        on_shutdown=[registry.wait_for_scopes, registry.aclose],
    )
    return app, registry, ledger


app = build()[0]
