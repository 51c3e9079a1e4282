"""FastAPI: a ``Depends`` chain of 3 against ambient's FastAPI integration resolving the same 3.

Driven in-process like :mod:`benchmarks.bench_asgi` (same checks: every response names its
user; every request's ``Session`` is cleaned up), over a bare FastAPI route that reads the
identity header itself. The ``Depends`` chain builds ``Dispatcher`` from the header, then
``Engine`` and a ``yield`` dependency ``Session``; ambient's side is ``install(app, ...)``
with ``trusted_header()`` and three ``Resolve(...)`` parameters.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at
decoration time, including names imported inside the functions below.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from benchmarks import Options, Report, Target, bench_asgi
from benchmarks.bench_asgi import (
    CI,
    App,
    BrokenVariantError,
    Dispatcher,
    Engine,
    Session,
    Variant,
    ambient_registry,
    measure,
    overhead_table,
    ratio_of,
)


def _check(session: Session, engine: Engine, dispatcher: Dispatcher) -> None:
    if engine is not session.engine or dispatcher is not engine.dispatcher:
        msg = "one request saw two instances of a component"
        raise BrokenVariantError(msg)


def bare_app() -> App:
    """A FastAPI route answering with the identity header."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.get("/work")
    async def work(request: Request) -> PlainTextResponse:
        if bench_asgi.PAUSE:
            await asyncio.sleep(0)
        return PlainTextResponse(request.headers["x-user-id"])

    return app


def depends_app() -> App:
    """FastAPI with a ``Depends`` chain of 3 (the last a ``yield`` dependency)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import PlainTextResponse

    async def get_dispatcher(request: Request) -> Dispatcher:
        return Dispatcher(request.headers["x-user-id"])

    async def get_engine(dispatcher: Annotated[Dispatcher, Depends(get_dispatcher)]) -> Engine:
        return Engine(dispatcher)

    async def get_session(
        engine: Annotated[Engine, Depends(get_engine)],
    ) -> AsyncIterator[Session]:
        created = Session(engine)
        yield created
        created.close()

    app = FastAPI()

    @app.get("/work")
    async def work(
        session: Annotated[Session, Depends(get_session)],
        engine: Annotated[Engine, Depends(get_engine)],
        dispatcher: Annotated[Dispatcher, Depends(get_dispatcher)],
    ) -> PlainTextResponse:
        _check(session, engine, dispatcher)
        if bench_asgi.PAUSE:
            await asyncio.sleep(0)
        return PlainTextResponse(dispatcher.user_id)

    return app


def ambient_app() -> App:
    """ambient's FastAPI integration resolving the same 3 components."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from ambient.integrations.fastapi import Resolve, install
    from ambient.middleware import trusted_header

    app = FastAPI()
    install(app, registry=ambient_registry(components=True), identity=trusted_header())

    @app.get("/work")
    async def work(
        session: Annotated[Session, Resolve(Session)],
        engine: Annotated[Engine, Resolve(Engine)],
        dispatcher: Annotated[Dispatcher, Resolve(Dispatcher)],
    ) -> PlainTextResponse:
        _check(session, engine, dispatcher)
        if bench_asgi.PAUSE:
            await asyncio.sleep(0)
        return PlainTextResponse(dispatcher.user_id)

    return app


BARE = "FastAPI bare route"
DEPENDS = "FastAPI Depends chain of 3"
AMBIENT = "FastAPI + ambient integration, 3 Resolve"


def variants(report: Report) -> list[Variant]:
    """The FastAPI table's stacks."""
    stacks = [Variant(BARE, bare_app()), Variant(DEPENDS, depends_app(), cleanups=True)]
    try:
        stacks.append(Variant(AMBIENT, ambient_app(), cleanups=True))
    except ImportError as exc:
        report.unavailable(AMBIENT, f"ambient.integrations.fastapi: {exc}")
    return stacks


async def run(report: Report, options: Options) -> None:
    """FastAPI with a Depends chain vs ambient's integration, over a bare FastAPI route."""
    stacks = variants(report)
    n = options.size(200, 100)
    blocks = options.rounds * 4
    for mode in ("sequential", "concurrent"):
        results = await measure(stacks, n, blocks, concurrent_mode=mode == "concurrent")
        table, overheads = overhead_table(
            f"FastAPI, {mode} ({blocks} blocks of {n} requests per stack)",
            results,
            BARE,
            DEPENDS,
            "Depends chain",
        )
        report.table(table)
        if AMBIENT in overheads:
            report.target(
                Target(
                    f"FastAPI + ambient (3 Resolve) vs the Depends chain's overhead ({mode})",
                    ratio_of(overheads, AMBIENT, DEPENDS),
                    float("inf"),
                    interval=CI,
                )
            )
