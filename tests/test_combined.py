"""Every feature at once, many users at once, on a real server.

One FastAPI app as a team would build it: JWT identity, telemetry on the OpenTelemetry SDK
(W3C baggage on), a middleware of its own tracing each request, a SharedPool on PostgreSQL
with row-level security, USER and REQUEST components with cleanups, a ContextFilter behind
a QueueHandler, work handed to a shared thread pool (held past the response too), calls to
a second service carrying the signed context from the request and from worker threads,
streaming routes whose clients leave mid-stream (some in the middle of a query), requests
pipelined on one connection, and websockets on the hub with a scope per message. Each of
many distinct users checks on every answer that the handler, the database, the log
records, the spans, the threads and the second service all saw that user and only that
user, that no trace holds two users, and that every component was cleaned up exactly once.
The database part runs on uvicorn (psycopg's pool is asyncio-only), the rest on hypercorn's
trio worker too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import httpx
import jwt
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from websockets.asyncio.client import connect as ws_connect

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.integrations.fastapi import install
from ambient.integrations.logging import ContextFilter
from ambient.integrations.propagation import async_inject_hook, inject_hook, signed_context
from ambient.integrations.psycopg import SharedPool
from ambient.integrations.threads import ContextExecutor, run_sync_in_thread
from ambient.integrations.websockets import ConnectionHub, UserWebSocketManager, message_scope
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import jwt_bearer
from ambient.telemetry import Telemetry, hash_id
from tests.servers import serve
from tests.test_psycopg import make_database

pytestmark = pytest.mark.load

USERS = 100
WORK_PER_USER = 2
PIPELINED = (5, 4)  # batches, requests per batch
HASH_KEY = b"combined-features"
JWT_SECRET = "j" * 32
CONTEXT_SECRET = "c" * 32


class Ledger:
    """Creations and cleanups of every component instance, by instance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[int, tuple[str, str]] = {}
        self.cleaned: Counter[int] = Counter()
        self.next = 0

    def create(self, kind: str, user: str) -> int:
        with self.lock:
            self.next += 1
            self.created[self.next] = (kind, user)
            return self.next

    def clean(self, n: int) -> None:
        with self.lock:
            self.cleaned[n] += 1


class UserCache:
    def __init__(self, n: int, user: str) -> None:
        self.n, self.user = n, user


class Work:
    def __init__(self, n: int, user: str) -> None:
        self.n, self.user = n, user


class Records(logging.Handler):
    """Keeps what the queue listener emits (in its own thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Timing:
    """A pure ASGI middleware wrapping each HTTP request in a span of its own."""

    def __init__(self, app: Any, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span("timing"):
            await self.app(scope, receive, send)


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")


def span_ids() -> tuple[str, str]:
    span = trace.get_current_span().get_span_context()
    return f"{span.trace_id:032x}", f"{span.span_id:016x}"


def build_service_b(provider: TracerProvider) -> Any:
    registry = Registry(telemetry=Telemetry(tracer_provider=provider, hash_key=HASH_KEY))

    async def who(request: Request) -> JSONResponse:
        ctx = ambient.get_current_context()
        trace_id, _ = span_ids()
        return JSONResponse(
            {
                "user": ctx.user_id,
                "request_id": ctx.request_id,
                "parent_run_id": ctx.parent_run_id,
                "trace_id": trace_id,
                "baggage": request.headers.get("baggage"),
            }
        )

    app = Starlette(routes=[Route("/who", who)])
    inner = AmbientMiddleware(app, registry=registry, identity=signed_context(CONTEXT_SECRET))
    return OpenTelemetryMiddleware(inner, tracer_provider=provider)


def build_service_a(
    provider: TracerProvider,
    pool: SharedPool | None,
    ledger: Ledger,
    executor: ThreadPoolExecutor,
    b_url: str,
    db_notes: str | None,
    stream_ended: dict[str, dict[str, Any]],
    held: dict[str, dict[str, Any]],
) -> tuple[Any, Registry, ConnectionHub]:
    registry = Registry(
        telemetry=Telemetry(
            tracer_provider=provider, hash_key=HASH_KEY, span_threshold=0, baggage=("thread_id",)
        )
    )
    log = logging.getLogger("combined.app")

    @registry.provide(lifetime=Lifetime.USER)
    def user_cache(user: UserRef) -> Iterator[UserCache]:
        n = ledger.create("user", user.user_id)
        try:
            yield UserCache(n, user.user_id)
        finally:
            ledger.clean(n)

    @registry.provide(lifetime=Lifetime.REQUEST)
    async def work(ctx: UserExecutionContext) -> AsyncIterator[Work]:
        n = ledger.create("request", ctx.user_id)
        try:
            yield Work(n, ctx.user_id)
        finally:
            log.info("cleanup work")
            ledger.clean(n)

    if pool is not None:
        pool.install(registry)
    hub = ConnectionHub()
    hub.install(registry)
    client = httpx.AsyncClient(
        event_hooks={
            "request": [
                async_inject_hook(hosts=[b_url.removeprefix("http://")], secret=CONTEXT_SECRET)
            ]
        }
    )

    sync_client = httpx.Client(
        event_hooks={
            "request": [inject_hook(hosts=[b_url.removeprefix("http://")], secret=CONTEXT_SECRET)]
        }
    )

    def after_response(w: Work) -> None:
        ctx = ambient.get_current_context()
        log.info("after response")
        again = ambient.resolve_sync(Work)
        held[ctx.request_id] = {
            "user": ctx.user_id,
            "same": again is w,
            "cleaned": ledger.cleaned[w.n],
            "trace_id": span_ids()[0],
        }

    def in_thread() -> dict[str, Any]:
        ctx = ambient.get_current_context()
        log.info("in thread")
        w = ambient.resolve_sync(Work)
        b = sync_client.get(f"{b_url}/who").json()
        return {
            "user": ctx.user_id,
            "work_user": w.user,
            "work": w.n,
            "trace_id": span_ids()[0],
            "b": b,
        }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            with sync_client:
                yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/work")
    async def do_work() -> dict[str, Any]:
        ctx = ambient.get_current_context()
        log.info("start")
        w = await ambient.resolve(Work)
        cache = await ambient.resolve(UserCache)
        trace_id, _ = span_ids()
        setting, owners = ctx.user_id, [ctx.user_id]
        if pool is not None:
            async with pool.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {db_notes} (owner, body) VALUES (%s, %s)",  # noqa: S608
                    (ctx.user_id, "x"),
                )
                cur = await conn.execute(
                    f"SELECT current_setting('app.user_id'), array_agg(DISTINCT owner) "  # noqa: S608
                    f"FROM {db_notes}"
                )
                setting, owners = await cur.fetchone()  # type: ignore[misc]
        threaded = await anyio.to_thread.run_sync(executor.submit(in_thread).result)
        executor.submit_held(after_response, w)
        anyio_threaded = await run_sync_in_thread(in_thread)
        answer = await client.get(f"{b_url}/who")
        log.info("end")
        return {
            "user": ctx.user_id,
            "work_user": w.user,
            "work": w.n,
            "cache_user": cache.user,
            "trace_id": trace_id,
            "setting": setting,
            "owners": owners,
            "thread": threaded,
            "anyio_thread": anyio_threaded,
            "b": answer.json(),
            "request_id": ctx.request_id,
            "run_id": ctx.run_id,
            "after_b_user": ambient.get_current_context().user_id,
            "after_b_trace": span_ids()[0],
        }

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        ctx = ambient.get_current_context()

        async def body() -> AsyncIterator[bytes]:
            w = await ambient.resolve(Work)
            try:
                yield json.dumps({"user": ambient.get_current_context().user_id}).encode() + b"\n"
                setting = ctx.user_id
                if pool is not None:
                    async with pool.connection() as conn:
                        cur = await conn.execute("SELECT current_setting('app.user_id')")
                        (setting,) = await cur.fetchone()  # type: ignore[misc]
                yield json.dumps({"setting": setting, "work_user": w.user}).encode() + b"\n"
                if pool is not None and request.query_params.get("in_query"):
                    async with pool.connection() as conn:
                        await conn.execute("SELECT 'combined-wait', pg_sleep(60)")
                await anyio.Event().wait()  # until the client leaves
            finally:
                log.info("stream end")
                stream_ended[ctx.request_id] = {
                    "user": ambient.get_current_context().user_id,
                    "expected": ctx.user_id,
                }

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.get("/notify")
    async def notify() -> dict[str, Any]:
        manager = await ambient.resolve(UserWebSocketManager)
        ctx = ambient.get_current_context()
        await manager.send({"type": "note", "for": ctx.user_id})
        return {"sent": True}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        manager = await ambient.resolve(UserWebSocketManager)
        ctx = ambient.get_current_context()
        log.info("socket")
        await websocket.accept(subprotocol="bearer")
        async with manager.connect(websocket, accept=False) as connection:
            await connection.send({"type": "ready", "user": ctx.user_id})
            async for text in websocket.iter_text():
                async with message_scope():
                    inner = ambient.get_current_context()
                    log.info("message")
                    w = await ambient.resolve(Work)
                    threaded = await anyio.to_thread.run_sync(executor.submit(in_thread).result)
                    b = (await client.get(f"{b_url}/who")).json()
                    manager = await ambient.resolve(UserWebSocketManager)
                    await manager.send(
                        {
                            "type": "echo",
                            "user": inner.user_id,
                            "work_user": w.user,
                            "work": w.n,
                            "thread": threaded,
                            "b": b,
                            "text": text,
                            "trace_id": span_ids()[0],
                            "request_id": inner.request_id,
                            "run_id": inner.run_id,
                        }
                    )

    @app.get("/chunks")
    async def chunks() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(2):
                ctx = ambient.get_current_context()
                line = {
                    "user": ctx.user_id,
                    "trace_id": span_ids()[0],
                    "request_id": ctx.request_id,
                }
                yield json.dumps(line).encode() + b"\n"

        return StreamingResponse(body(), media_type="application/x-ndjson")

    # A middleware of the app's own, added before install(): inside AmbientMiddleware.
    app.add_middleware(Timing, tracer=provider.get_tracer("combined"))
    install(app, registry=registry, identity=jwt_bearer(JWT_SECRET, algorithms=["HS256"]))
    return app, registry, hub


@pytest.fixture(name="tracing")
def fixture_tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# trio warns about a streamed body's async generator whose client left (Starlette does not
# close it): the stream's own end is what the test checks.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn-trio"])
async def test_combined_features_keep_every_user_apart(
    anyio_backend: str, server: str, tracing: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Many users through every feature at once: each sees only itself everywhere (on
    trio without the database: psycopg's pool runs on asyncio only)."""
    if anyio_backend != "asyncio":
        pytest.skip("one client loop is enough: the servers run on their own loops")
    provider, exporter = tracing
    records = Records()
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    queue_handler = logging.handlers.QueueHandler(log_queue)
    queue_handler.addFilter(ContextFilter(hash_key=HASH_KEY))
    listener = logging.handlers.QueueListener(log_queue, records)
    logger = logging.getLogger("combined.app")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.addHandler(queue_handler)
    logger.propagate = False
    listener.start()
    warnings = Records()
    warnings.setLevel(logging.WARNING)
    logging.getLogger().addHandler(warnings)
    TRACES.clear()
    REQUEST_USERS.clear()
    ledger = Ledger()
    stream_ended: dict[str, dict[str, Any]] = {}
    executor = ContextExecutor(max_workers=4)
    held: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        pool = db = None
        if server == "uvicorn":
            db = stack.enter_context(make_database())
            pool = SharedPool(
                db.app_url, min_size=2, max_size=8, per_user_limit=2, kwargs=db.kwargs()
            )
        b_url = stack.enter_context(serve(server, build_service_b(provider)))
        app, registry, hub = build_service_a(
            provider, pool, ledger, executor, b_url, db and db.notes, stream_ended, held
        )
        try:
            with serve(server, app) as a_url:
                await drive(a_url, pool is not None)
                if server == "uvicorn":  # hypercorn answers pipelined requests one by one
                    await anyio.to_thread.run_sync(pipelined, a_url)
        finally:
            listener.stop()
            logger.removeHandler(queue_handler)
            logger.setLevel(level)
            logger.propagate = propagate
            logging.getLogger().removeHandler(warnings)
            executor.shutdown()
    # -- what every component saw, and its cleanup
    stats = registry.stats()
    assert stats.open_scopes == 0, stats
    hub_stats = hub.stats()
    assert (hub_stats.connections, hub_stats.send_failures) == (0, 0), hub_stats
    assert ledger.created, "no component was created"
    twice = {n: c for n, c in ledger.cleaned.items() if c != 1}
    never = set(ledger.created) - set(ledger.cleaned)
    assert not twice, twice
    assert not never, never
    # -- logs: each record of a request is that request's user and trace
    by_request: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for record in records.records:
        assert record.user_id, record.getMessage()
        by_request[record.request_id].add((record.user_id, record.trace_id))  # type: ignore[attr-defined]
    assert all(len(seen) == 1 for seen in by_request.values()), {
        k: v for k, v in by_request.items() if len(v) != 1
    }
    assert len(REQUEST_USERS) == len(TRACES)
    logged = [request_id for request_id in REQUEST_USERS if request_id in by_request]
    assert len(logged) == USERS * WORK_PER_USER  # the /work requests log, /chunks do not
    for request_id in logged:
        user_hash = hash_id(REQUEST_USERS[request_id], HASH_KEY)
        assert {seen[0] for seen in by_request[request_id]} == {user_hash}
    # -- spans: no trace holds two users
    users_by_trace: dict[int, set[str]] = defaultdict(set)
    for span in exporter.get_finished_spans():
        user = (span.attributes or {}).get("ambient.user_id")
        if user is not None:
            users_by_trace[span.context.trace_id].add(str(user))
    mixed = {t: u for t, u in users_by_trace.items() if len(u) != 1}
    assert not mixed, mixed
    assert len(stream_ended) == len([n for n in range(USERS) if n % 3 != 2])
    for ended in stream_ended.values():
        assert ended["user"] == ended["expected"], ended
    assert (
        len(set(TRACES))
        == len(TRACES)
        == USERS * WORK_PER_USER + (PIPELINED[0] * PIPELINED[1] if server == "uvicorn" else 0)
    )
    # psycopg itself warns when a query a client left is cancelled under anyio's level
    # cancellation (it closes that connection, the pool replaces it): not ours.
    # The middleware reports once that uvicorn started a pipelined request inside the
    # previous one's context (which it then ignores).
    ours = [
        r
        for r in warnings.records
        if not r.name.startswith("psycopg") and "another request's live context" not in r.msg
    ]
    assert not ours, [r.getMessage() for r in ours]
    assert len(held) == USERS * WORK_PER_USER
    for seen in held.values():
        assert seen["same"], seen
        assert seen["cleaned"] == 0, seen


async def drive(a_url: str, database: bool) -> None:
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
    async with httpx.AsyncClient(base_url=a_url, limits=limits, timeout=60) as client:

        async def one_user(n: int) -> None:
            user = f"user-{n:03d}"
            headers = {"authorization": f"Bearer {token(user)}", "x-thread-id": f"t-{user}"}

            async def work() -> None:
                got = (await client.get("/work", headers=headers)).json()
                check_work(user, got)

            async with anyio.create_task_group() as tg:
                for _ in range(WORK_PER_USER):
                    tg.start_soon(work)
            if n % 3 != 2:
                url = "/stream?in_query=1" if n % 3 and database else "/stream"
                async with client.stream("GET", url, headers=headers) as response:
                    lines = response.aiter_lines()
                    first = json.loads(await anext(lines))
                    second = json.loads(await anext(lines))
                assert first == {"user": user}
                assert second == {"setting": user, "work_user": user}
            if n % 4 == 0:
                ws_url = a_url.replace("http://", "ws://") + "/ws"
                async with ws_connect(
                    ws_url,
                    subprotocols=["bearer", token(user)],
                    additional_headers={"x-thread-id": f"t-{user}"},
                ) as ws:  # type: ignore[list-item]
                    ready = json.loads(await ws.recv())
                    assert ready == {"type": "ready", "user": user}
                    sent = (await client.get("/notify", headers=headers)).json()
                    assert sent["sent"]
                    note = json.loads(await ws.recv())
                    assert note == {"type": "note", "for": user}, note
                    for _ in range(3):
                        await ws.send("hi")
                        echo = json.loads(await ws.recv())
                        assert echo["user"] == user, echo
                        assert echo["work_user"] == user, echo
                        assert echo["thread"]["user"] == user, echo
                        assert echo["thread"]["work"] == echo["work"], echo
                        assert echo["thread"]["trace_id"] == echo["trace_id"], echo
                        assert echo["thread"]["b"]["user"] == user, echo
                        assert echo["b"]["user"] == user, echo
                        assert echo["b"]["trace_id"] == echo["trace_id"], echo
                        assert echo["b"]["parent_run_id"] == echo["run_id"], echo
                        assert echo["b"]["request_id"] == echo["request_id"], echo

        async with anyio.create_task_group() as tg:
            for n in range(USERS):
                tg.start_soon(one_user, n)


def pipelined(url: str) -> None:
    """Write several users' streamed requests to one socket at once (uvicorn starts each
    inside the previous one's context); each answer is its own user's, in its own trace."""
    host, port = url.removeprefix("http://").split(":")
    users = [f"piped-{b}-{i}" for b in range(PIPELINED[0]) for i in range(PIPELINED[1])]
    for b in range(PIPELINED[0]):
        batch = users[b * PIPELINED[1] : (b + 1) * PIPELINED[1]]
        payload = b"".join(
            f"GET /chunks HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {token(user)}\r\n"
            f"{'connection: close' if user == batch[-1] else 'x-last: no'}\r\n\r\n".encode()
            for user in batch
        )
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(payload)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        answers = data.split(b"HTTP/1.1 ")[1:]
        assert len(answers) == len(batch), data
        for user, answer in zip(batch, answers, strict=True):
            assert answer.startswith(b"200"), answer
            lines = [json.loads(line) for line in re.findall(rb"\{[^\r\n]*\}", answer)]
            assert len(lines) == 2, answer
            assert {line["user"] for line in lines} == {user}, answer
            TRACES.append(lines[0]["trace_id"])
            REQUEST_USERS[lines[0]["request_id"]] = user
            assert lines[1]["trace_id"] == lines[0]["trace_id"], answer


def check_work(user: str, got: dict[str, Any]) -> None:
    assert got["user"] == user, got
    assert got["work_user"] == user, got
    assert got["cache_user"] == user, got
    assert got["setting"] == user, got
    assert got["owners"] == [user], got
    for key in ("thread", "anyio_thread"):
        assert got[key]["user"] == user, got
        assert got[key]["work_user"] == user, got
        assert got[key]["work"] == got["work"], got
        assert got[key]["trace_id"] == got["trace_id"], got
        assert got[key]["b"]["user"] == user, got
        assert got[key]["b"]["trace_id"] == got["trace_id"], got
        assert got[key]["b"]["request_id"] == got["request_id"], got
    b = got["b"]
    assert b["user"] == user, got
    assert b["request_id"] == got["request_id"], got
    assert b["parent_run_id"] == got["run_id"], got
    assert b["trace_id"] == got["trace_id"], got
    assert got["after_b_user"] == user, got
    assert got["after_b_trace"] == got["trace_id"], got
    assert b["baggage"] == f"ambient.thread_id=t-{user}", got
    TRACES.append(got["trace_id"])
    REQUEST_USERS[got["request_id"]] = user


TRACES: list[str] = []
REQUEST_USERS: dict[str, str] = {}  # request id -> user, for the log records
