"""Quart: ``app.asgi_app`` wrapped in the middleware, an ``errorhandler`` for ambient errors.

Quart answers a view's exception itself (a 500), so an error handler answers an ambient
error with an HTTP status through ``answer_error``: the same problem+json body the
middleware writes, and the error noted on the request's scope so that its cleanups see it.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from quart import Quart, request, websocket
from quart.signals import got_websocket_exception

import ambient
from ambient import Registry
from ambient.errors import AmbientError, PoolExhaustedError
from ambient.middleware import AmbientMiddleware, answer_error, note_failure
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
    do_work,
    gate,
    grouped,
    in_thread,
    refuse,
    settled,
)


def build() -> tuple[Quart, Registry, Ledger]:
    registry, ledger = build_registry()
    app = Quart(__name__)

    @app.get("/whoami")
    async def whoami() -> dict[str, Any]:
        probe = await ambient.resolve(Probe)
        memory = await ambient.resolve(Memory)
        overlapped = await gate(request.args.get("gate"), int(request.args.get("size", 0)))
        hop = await anyio.to_thread.run_sync(in_thread)
        return describe(probe, memory, overlapped=overlapped, **hop)

    @app.get("/sync")
    def whoami_sync() -> dict[str, Any]:
        # Quart runs a sync view in its executor, in a copy of the request's context.
        return describe_sync()

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return await settled()

    @app.get("/busy")
    async def busy() -> None:
        raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)

    @app.get("/work")
    async def work() -> str:
        await do_work(bool(request.args.get("hang")))
        return "done"

    @app.get("/grouped")
    async def grouped_view() -> None:
        await grouped()

    @app.websocket("/socket")
    async def socket() -> None:
        # Begin the Work, then fail (a PoolExhaustedError, or a bug), before or after
        # accepting.
        await ambient.resolve(Work)
        if websocket.args.get("accept") == "true":
            await websocket.accept()
            await websocket.send("begun")
        fail = websocket.args.get("fail")
        if fail == "wait":
            await ambient.resolve(Probe)
            await websocket.receive()  # until the client hangs up: Quart cancels the handler
        if fail == "busy":
            raise PoolExhaustedError("no connection within 0.1 s", retry_after=2)
        if fail == "bug":
            raise RuntimeError("a bug in the handler")
        await websocket.close(1000)

    @app.websocket("/whoami-socket")
    async def whoami_socket() -> None:
        await websocket.accept()
        args = websocket.args
        body = await describe_socket(args.get("gate"), int(args.get("size", 0)))
        await websocket.send_json(body)
        await websocket.close(1000)

    @app.get("/refused")
    async def refused() -> None:
        await refuse()

    # ExceptionGroup too: an error raised in a task group arrives as a group.
    @app.errorhandler(AmbientError)
    @app.errorhandler(ExceptionGroup)
    async def problem(error: Exception) -> Any:
        answer = answer_error(error)
        if answer is None:
            raise error
        headers = {k.decode(): v.decode() for k, v in answer.headers}
        headers["content-type"] = "application/problem+json"
        return answer.body(), answer.status, headers

    # Quart closes the socket of a handler that raised with 1000: the failure is noted.
    # Held by the app: blinker keeps a weak reference to a receiver.
    async def socket_failed(sender: Quart, exception: Exception) -> None:
        note_failure(exception)

    got_websocket_exception.connect(socket_failed, sender=app, weak=False)

    app.asgi_app = AmbientMiddleware(app.asgi_app, registry=registry, identity=IDENTITY)  # type: ignore[method-assign]
    return app, registry, ledger


app = build()[0]
