"""A small multi-user Starlette app behind AmbientMiddleware, with counted components.

Every component records its creation and cleanup in a :class:`Ledger`, so a test can prove
that each one was cleaned exactly once and was only ever seen by its own user.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.middleware import AmbientMiddleware, IdentityResolver, trusted_header

_Chunk = TypeVar("_Chunk", str, bytes)


class Chunks(Generic[_Chunk]):
    """A streamed body for tests: ``count`` chunks (endless with ``None``), the ``n``-th
    made by ``make(n)`` once ``before(n)`` is awaited (an event source's pace, the next event
    in an hour). An iterator, not a generator: one left unclosed is no unraisable warning."""

    def __init__(
        self,
        make: Callable[[int], _Chunk],
        *,
        count: int | None = None,
        before: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.make, self.count, self.before, self.sent = make, count, before, 0

    def __aiter__(self) -> Chunks[_Chunk]:
        return self

    async def __anext__(self) -> _Chunk:
        if self.count is not None and self.sent >= self.count:
            raise StopAsyncIteration
        if self.before is not None:
            await self.before(self.sent)
        self.sent += 1
        return self.make(self.sent - 1)


async def next_in_an_hour(n: int) -> None:
    """For :class:`Chunks`: the first chunk now, the next in an hour (an idle stream)."""
    if n:
        await anyio.sleep(3600)


class Ledger:
    """Thread-safe record of created and cleaned components (the server runs in a thread)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self.created: dict[int, str] = {}
        self.cleaned: Counter[int] = Counter()
        self.events: list[tuple[str, str]] = []

    def create(self, owner: str) -> int:
        with self._changed:
            number = next(self._ids)
            self.created[number] = owner
            return number

    def clean(self, number: int) -> None:
        with self._changed:
            self.cleaned[number] += 1
            self._changed.notify_all()

    def note(self, what: str, user: str) -> None:
        with self._changed:
            self.events.append((what, user))
            self._changed.notify_all()

    def wait(self, predicate: Callable[[Ledger], bool], timeout: float = 15.0) -> bool:
        """Block until ``predicate(self)`` holds (cleanups finish after responses are sent)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    def all_cleaned(self) -> bool:
        return set(self.cleaned) == set(self.created)

    def problems(self) -> list[str]:
        """Components cleaned more than once or never (call once everything has closed)."""
        found = [f"component {n} cleaned {c} times" for n, c in self.cleaned.items() if c != 1]
        found += [f"component {n} never cleaned" for n in self.created if n not in self.cleaned]
        return found


class Probe:
    """A REQUEST component: which request and user it was made for."""

    def __init__(self, number: int, ctx: UserExecutionContext) -> None:
        self.number = number
        self.user_id = ctx.user_id
        self.request_id = ctx.request_id


class Memory:
    """A USER component."""

    def __init__(self, number: int, user: UserRef) -> None:
        self.number = number
        self.user_id = user.user_id


# Registries built for a test; close_built() closes them (see the test modules' fixtures).
BUILT: list[Registry] = []


async def close_built() -> None:
    """Close the registries built since the last call, as a lifespan shutdown would: their
    USER components are async generators, which must be closed, not garbage collected."""
    while BUILT:
        await BUILT.pop().aclose()


def build_registry(ledger: Ledger) -> Registry:
    registry = Registry()
    BUILT.append(registry)

    def probe(ctx: UserExecutionContext) -> Iterator[Probe]:
        number = ledger.create(ctx.user_id)
        try:
            yield Probe(number, ctx)
        finally:
            ledger.clean(number)

    async def memory(user: UserRef) -> AsyncIterator[Memory]:
        number = ledger.create(user.user_id)
        try:
            yield Memory(number, user)
        finally:
            ledger.clean(number)

    registry.register(Probe, probe)
    registry.register(Memory, memory, lifetime=Lifetime.USER)
    return registry


def _describe(probe: Probe, memory: Memory | None = None) -> dict[str, Any]:
    ctx = ambient.get_current_context()
    body: dict[str, Any] = {
        "user": ctx.user_id,
        "tenant": ctx.tenant_id,
        "request_id": ctx.request_id,
        "thread_id": ctx.thread_id,
        "probe": probe.number,
        "probe_user": probe.user_id,
        "probe_request": probe.request_id,
    }
    if memory is not None:
        body["memory"] = memory.number
        body["memory_user"] = memory.user_id
    return body


def build_app(ledger: Ledger) -> Starlette:
    """The routes the middleware tests drive (without the middleware)."""

    async def whoami(request: Request) -> Response:
        # Yield to the event loop between binding, resolving and reading the context, so
        # concurrent requests interleave there: a binding kept anywhere but in the request's
        # own context would show up as another user's.
        await anyio.lowlevel.checkpoint()
        probe = await ambient.resolve(Probe)
        await anyio.lowlevel.checkpoint()
        memory = await ambient.resolve(Memory)
        await anyio.lowlevel.checkpoint()
        return JSONResponse(_describe(probe, memory))

    async def stream(request: Request) -> Response:
        probes: list[Probe] = []

        async def before(n: int) -> None:
            if n == 1:  # after the first chunk went out: the context and components still work
                probes.append(await ambient.resolve(Probe))
                ledger.note("streamed", ambient.get_current_context().user_id)
            elif n > 1:
                await anyio.sleep(0.005)

        def chunk(n: int) -> bytes:
            if n == 0:
                return b"first\n"
            if n == 1:
                return f"{probes[0].user_id} {probes[0].number}\n".encode()
            return b"more\n"

        # "endless": a token stream that only ends when the client leaves. An iterator, not a
        # generator: one cut on trio leaves no unraisable warning.
        count = None if request.query_params.get("endless") else 2
        body = Chunks(chunk, count=count, before=before)
        return StreamingResponse(body, media_type="text/plain")

    async def background(request: Request) -> Response:
        async def later() -> None:
            probe = await ambient.resolve(Probe)
            ledger.note(f"background {probe.user_id}", ambient.get_current_context().user_id)

        return JSONResponse({"ok": True}, background=BackgroundTask(later))

    async def boom(request: Request) -> Response:
        await ambient.resolve(Probe)
        msg = "the handler failed"
        raise RuntimeError(msg)

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.receive_text()
                probe = await ambient.resolve(Probe)
                ctx = ambient.get_current_context()
                await websocket.send_json(
                    {
                        "user": ctx.user_id,
                        "connection_id": ctx.connection_id,
                        "probe": probe.number,
                        "probe_user": probe.user_id,
                    }
                )
        finally:
            ledger.note("socket closed", ambient.get_current_context().user_id)

    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/stream", stream),
            Route("/background", background),
            Route("/boom", boom),
            WebSocketRoute("/ws", socket),
        ]
    )


def build(
    identity: IdentityResolver | None = None, **options: Any
) -> tuple[AmbientMiddleware, Ledger, Registry]:
    """The app wrapped in AmbientMiddleware, its ledger and registry."""
    ledger = Ledger()
    registry = build_registry(ledger)
    app = AmbientMiddleware(
        build_app(ledger),
        registry=registry,
        identity=trusted_header() if identity is None else identity,
        **options,
    )
    return app, ledger, registry


class Pool:
    """An APP component."""

    def __init__(self, number: int) -> None:
        self.number = number


CRASH = "the background loop died"


def build_crashing_lifespan(ledger: Ledger, *, framework: bool) -> Any:
    """An app whose lifespan starts a background task that raises ``RuntimeError(CRASH)``
    while the server serves, once ``GET /crash`` asks for it (the answer comes when the
    lifespan has ended): a plain ASGI lifespan, whose wait for the shutdown message the
    crash ends, or, with ``framework``, a Starlette lifespan context, after which Starlette
    sends ``lifespan.shutdown.failed`` unasked. ``GET /`` answers the numbers of the user's
    Memory (USER) and of the Pool (APP), both counted in ``ledger``. Behind
    AmbientMiddleware; what the server hears from the lifespan is noted in ``ledger`` as
    ``(message type, its message)``."""
    registry = build_registry(ledger)

    async def pool() -> AsyncIterator[Pool]:
        number = ledger.create("app")
        try:
            yield Pool(number)
        finally:
            ledger.clean(number)

    registry.register(Pool, pool, lifetime=Lifetime.APP)
    events: dict[str, anyio.Event] = {}

    async def crash_when_asked() -> None:
        await events["crash"].wait()
        raise RuntimeError(CRASH)

    @contextlib.asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        events["crash"], events["ended"] = anyio.Event(), anyio.Event()
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(crash_when_asked)
                yield
                tasks.cancel_scope.cancel()
        finally:
            events["ended"].set()

    async def numbers(request: Request) -> Response:
        memory = await ambient.resolve(Memory)
        return JSONResponse([memory.number, (await ambient.resolve(Pool)).number])

    async def crash(request: Request) -> Response:
        events["crash"].set()
        await events["ended"].wait()
        return Response("crashed")

    routes = [Route("/", numbers), Route("/crash", crash)]
    inner: Any = Starlette(routes=routes, lifespan=lifespan if framework else None)

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return
        assert (await receive())["type"] == "lifespan.startup"
        async with lifespan(None):
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})

    middleware = AmbientMiddleware(
        inner if framework else plain, registry=registry, identity=trusted_header()
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def told(message: Any) -> None:
            if scope["type"] == "lifespan":
                ledger.note(message["type"], message.get("message", ""))
            await send(message)

        await middleware(scope, receive, told)

    return app
