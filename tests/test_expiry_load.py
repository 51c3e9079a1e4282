"""Streams cut at their identity's expiry and websockets refused a database connection,
many distinct users at once, on real servers (HTTP/1.1, and HTTP/2 with every stream on one
connection).

Half of the users hold a server-sent event stream under a JWT that expires 2 to 4 s ahead
(no leeway): idle, ticking, or idle inside a database checkout with a row written; a few
more stop reading a stream that floods them. The other half hold streams under long-lived
tokens. Every expiring stream must end at its expiry (not before it, within a bound after
it; for a client that stopped reading, within ``cleanup_timeout``), its REQUEST component
cleaned exactly once with the cut seen by the cleanup, its checkout rolled back and given
back, while the other users' streams go on and receive only their own events. On the
asyncio servers, websockets of further users meanwhile hold their only database connection
(a SharedPool with ``per_user_limit=1``) and open a second socket whose checkout runs out
of time after accept: it must be closed with 1013, while the other users' sockets are
served. No span of any user's trace names another user.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import jwt
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.integrations.psycopg import SharedPool
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import jwt_bearer
from ambient.telemetry import Telemetry, hash_id
from tests.apps import Chunks
from tests.servers import serve
from tests.test_psycopg import make_database

pytestmark = pytest.mark.load

EXPIRING = 50
LASTING = 50
STALLED = 5  # users whose client stops reading
HOLDERS = 6  # users whose second socket finds their one connection taken
SOCKETS = 20  # users whose one socket is served
HASH_KEY = b"expiry-load"
SECRET = "s" * 32
# How long after its expiry a stream may take to end on a loaded machine.
END_BOUND = 2.5


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[int, tuple[str, str]] = {}
        self.cleaned: Counter[int] = Counter()
        self.ended_by: dict[int, str | None] = {}
        self.cleaned_at: dict[int, float] = {}
        # Components whose cleanup the stalled clients wait for.
        self.watch: set[int] = set()
        self.watched_done = 0
        self.watched_cleaned = threading.Event()
        self.next = 0

    def create(self, kind: str, user: str) -> int:
        with self.lock:
            self.next += 1
            self.created[self.next] = (kind, user)
            return self.next

    def clean(self, n: int, error: BaseException | None) -> None:
        with self.lock:
            self.cleaned[n] += 1
            self.ended_by[n] = None if error is None else type(error).__name__
            self.cleaned_at[n] = time.time()
            if n in self.watch:
                self._watched()

    def watch_for(self, n: int) -> None:
        """Count ``n`` among the components of stalled clients, cleaned already or later."""
        with self.lock:
            self.watch.add(n)
            if n in self.cleaned:
                self._watched()

    def _watched(self) -> None:
        self.watched_done += 1
        if self.watched_done == STALLED:
            self.watched_cleaned.set()


class Feed:
    def __init__(self, n: int, user: str) -> None:
        self.n, self.user = n, user


class Memo:
    def __init__(self, n: int, user: str) -> None:
        self.n, self.user = n, user


def token(user: str, expires_at: float) -> str:
    return jwt.encode({"sub": user, "exp": expires_at}, SECRET, algorithm="HS256")


def trace_id() -> str:
    return f"{trace.get_current_span().get_span_context().trace_id:032x}"


def build_app(
    provider: TracerProvider, ledger: Ledger, pool: SharedPool | None, notes: str | None
) -> tuple[Any, Registry]:
    registry = Registry(
        telemetry=Telemetry(tracer_provider=provider, hash_key=HASH_KEY, span_threshold=0),
        cleanup_timeout=2.0,
    )

    @registry.provide(lifetime=Lifetime.USER)
    def memo(user: UserRef) -> Iterator[Memo]:
        n = ledger.create("user", user.user_id)
        error = None
        try:
            yield Memo(n, user.user_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            ledger.clean(n, error)

    @registry.provide(lifetime=Lifetime.REQUEST)
    async def feed(ctx: UserExecutionContext) -> AsyncIterator[Feed]:
        n = ledger.create("request", ctx.user_id)
        error = None
        try:
            yield Feed(n, ctx.user_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            ledger.clean(n, error)

    if pool is not None:
        pool.install(registry)

    async def events(request: Request) -> StreamingResponse:
        ctx = ambient.get_current_context()
        got = await ambient.resolve(Feed)
        kept = await ambient.resolve(Memo)
        ticking = request.query_params.get("tick") == "1"
        flooding = request.query_params.get("flood") == "1"
        holding = request.query_params.get("db") == "1"

        def event(n: int) -> bytes:
            if flooding and n % 2:  # for a client that stopped reading: the server's send blocks
                return b": " + b"x" * 65536 + b"\n\n"
            now = ambient.get_current_context()
            line = {
                "user": now.user_id,
                "feed": got.n,
                "feed_user": got.user,
                "memo_user": kept.user,
                "trace_id": trace_id(),
                "count": 0 if flooding else n,
            }
            return f"data: {json.dumps(line)}\n\n".encode()

        async def pace(n: int) -> None:
            if n == 0 or flooding:
                return
            if holding and pool is not None:
                # Idle inside a checkout with a row written: the cut rolls it back.
                async with pool.connection() as conn:
                    await conn.execute(
                        f"INSERT INTO {notes} (owner, body) VALUES (%s, 'cut')",  # noqa: S608
                        (ctx.user_id,),
                    )
                    await anyio.Event().wait()
            if not ticking:
                await anyio.Event().wait()  # idle until cut or the client leaves
            await anyio.sleep(0.1)  # the stream's own pace, not a synchronisation

        # An iterator, not a generator: one cut on trio leaves no unraisable warning.
        return StreamingResponse(Chunks(event, before=pace), media_type="text/event-stream")

    async def socket(websocket: WebSocket) -> None:
        ctx = ambient.get_current_context()
        await websocket.accept()
        command = await websocket.receive_text()
        assert pool is not None
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT current_setting('app.user_id')")
            (setting,) = await cur.fetchone()  # type: ignore[misc]
            await websocket.send_json(
                {"user": ctx.user_id, "setting": setting, "trace_id": trace_id()}
            )
            if command == "hold":
                await websocket.receive_text()  # until the client lets it go
        await websocket.send_json({"released": ctx.user_id})
        await websocket.close()

    async def count_notes(request: Request) -> JSONResponse:
        assert pool is not None
        async with pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {notes}")  # noqa: S608
            (count,) = await cur.fetchone()  # type: ignore[misc]
        return JSONResponse({"user": ambient.get_current_context().user_id, "notes": count})

    app = Starlette(
        routes=[
            Route("/events", events),
            Route("/notes", count_notes),
            WebSocketRoute("/ws", socket),
        ]
    )
    return AmbientMiddleware(
        app, registry=registry, identity=jwt_bearer(SECRET, algorithms=["HS256"], leeway=0)
    ), registry


@pytest.fixture(name="tracing")
def fixture_tracing() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def parse(line: str) -> dict[str, Any]:
    assert line.startswith("data: "), line
    return json.loads(line.removeprefix("data: "))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("server", "http2"),
    [
        ("uvicorn", False),
        ("hypercorn", False),
        ("hypercorn-trio", False),
        ("hypercorn", True),
        ("hypercorn-trio", True),
    ],
)
async def test_streams_expire_apart_while_sockets_are_refused_a_connection(
    anyio_backend: str,
    server: str,
    http2: bool,
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Each expiring stream ends at its own expiry, cleaned once with the cut; the lasting
    ones go on with their own events only; sockets past their connection get 1013. Over
    HTTP/2 every stream is one of a single connection's."""
    if anyio_backend != "asyncio":
        pytest.skip("one client loop is enough: the servers run on their own loops")
    provider, exporter = tracing
    ledger = Ledger()
    seen_traces: dict[str, str] = {}  # trace id -> user, from what the app answered
    ended: dict[str, tuple[float, float, int]] = {}  # user -> (expiry, end, feed)
    lasting_feeds: dict[str, int] = {}
    database = server != "hypercorn-trio"  # psycopg's pool runs on asyncio only
    with make_database() if database else contextlib.nullcontext() as db:
        pool = (
            SharedPool(
                db.app_url,
                min_size=2,
                max_size=EXPIRING // 3 + HOLDERS + 12,
                per_user_limit=1,
                timeout=1.5,
                rls_check="off",
                kwargs=db.kwargs(),
            )
            if db is not None
            else None
        )
        app, registry = build_app(provider, ledger, pool, db and db.notes)
        with serve(server, app) as url:
            limits = httpx.Limits(max_connections=1 if http2 else EXPIRING + LASTING + 10)
            async with httpx.AsyncClient(
                base_url=url, limits=limits, timeout=30, http1=not http2, http2=http2
            ) as client:
                all_ended = anyio.Event()
                left = [EXPIRING]

                async def expiring(n: int) -> None:
                    user = f"exp-{n:03d}"
                    # Whole seconds, as jwt_bearer() reads `exp`: 2 to 4 s ahead, so that a
                    # loaded machine serves the first request before the token expires.
                    expires_at = int(time.time()) + 3 + n % 2
                    headers = {"authorization": f"Bearer {token(user, expires_at)}"}
                    tick = n % 2
                    holding = int(pool is not None and n % 3 == 0)
                    try:
                        async with client.stream(
                            "GET", f"/events?tick={tick}&db={holding}", headers=headers
                        ) as response:
                            assert response.status_code == 200, await response.aread()
                            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                            lines = [line async for line in response.aiter_lines() if line]
                            end = time.time()
                    finally:
                        left[0] -= 1
                        if not left[0]:
                            all_ended.set()
                    assert lines, user
                    got = [parse(line) for line in lines]
                    for event in got:
                        assert event["user"] == user, event
                        assert event["feed_user"] == event["memo_user"] == user, event
                        seen_traces.setdefault(event["trace_id"], user)
                        assert seen_traces[event["trace_id"]] == user, event
                    assert {e["feed"] for e in got} == {got[0]["feed"]}, got
                    ended[user] = (expires_at, end, got[0]["feed"])
                    if holding:
                        # The cut checkout rolled back and gave the user's one place back.
                        fresh = {"authorization": f"Bearer {token(user, time.time() + 600)}"}
                        answer = await client.get("/notes", headers=fresh)
                        assert answer.status_code == 200, answer.text
                        assert answer.json() == {"user": user, "notes": 0}, answer.json()

                async def lasting(n: int) -> None:
                    user = f"last-{n:03d}"
                    headers = {"authorization": f"Bearer {token(user, time.time() + 600)}"}
                    async with client.stream("GET", "/events?tick=1", headers=headers) as response:
                        assert response.status_code == 200
                        after = 0
                        async for line in response.aiter_lines():
                            if not line:
                                continue
                            event = parse(line)
                            assert event["user"] == user, event
                            assert event["feed_user"] == event["memo_user"] == user, event
                            seen_traces.setdefault(event["trace_id"], user)
                            assert seen_traces[event["trace_id"]] == user, event
                            lasting_feeds[user] = event["feed"]
                            if all_ended.is_set():
                                after += 1
                                if after == 3:
                                    break
                        assert after == 3, user  # it went on past every other one's expiry

                async def holder(n: int) -> None:
                    user = f"hold-{n:03d}"
                    ws_url = url.replace("http://", "ws://") + "/ws"
                    headers = {"authorization": f"Bearer {token(user, time.time() + 600)}"}
                    async with ws_connect(ws_url, additional_headers=headers) as first:
                        await first.send("hold")
                        held = json.loads(await first.recv())
                        assert held["user"] == held["setting"] == user, held
                        async with ws_connect(ws_url, additional_headers=headers) as second:
                            await second.send("try")
                            with pytest.raises(ConnectionClosed) as closed:
                                await second.recv()
                            assert closed.value.rcvd is not None, user
                            assert closed.value.rcvd.code == 1013, closed.value.rcvd
                        await first.send("release")
                        assert json.loads(await first.recv()) == {"released": user}

                async def served(n: int) -> None:
                    user = f"ws-{n:03d}"
                    ws_url = url.replace("http://", "ws://") + "/ws"
                    headers = {"authorization": f"Bearer {token(user, time.time() + 600)}"}
                    async with ws_connect(ws_url, additional_headers=headers) as ws:
                        await ws.send("once")
                        got = json.loads(await ws.recv())
                        assert got["user"] == got["setting"] == user, got
                        seen_traces.setdefault(got["trace_id"], user)
                        assert seen_traces[got["trace_id"]] == user, got
                        assert json.loads(await ws.recv()) == {"released": user}

                stalled_feeds: dict[str, tuple[float, int]] = {}

                async def stalled(n: int) -> None:
                    # A client that reads the first event, then stops reading: the end
                    # waits at most cleanup_timeout for the server to take it.
                    user = f"stall-{n:03d}"
                    expires_at = int(time.time()) + 3 + n % 2
                    host, port = url.removeprefix("http://").split(":")
                    async with await anyio.connect_tcp(host, int(port)) as conn:
                        await conn.send(
                            f"GET /events?flood=1 HTTP/1.1\r\nHost: x\r\n"
                            f"authorization: Bearer {token(user, expires_at)}\r\n\r\n".encode()
                        )
                        received = b""
                        for _ in range(100):  # bounded: the first event comes in a few reads
                            received += await conn.receive()
                            if b"\n\n" in received:
                                break
                        first = received.split(b"data: ", 1)[1].split(b"\n\n", 1)[0]
                        event = json.loads(first)
                        assert event["user"] == event["feed_user"] == user, event
                        stalled_feeds[user] = (expires_at, event["feed"])
                        ledger.watch_for(event["feed"])
                        # Not reading on until the request's component is cleaned.
                        await anyio.to_thread.run_sync(ledger.watched_cleaned.wait, 20)

                with anyio.fail_after(45):
                    async with anyio.create_task_group() as tg:
                        for n in range(EXPIRING):
                            tg.start_soon(expiring, n)
                        for n in range(LASTING):
                            tg.start_soon(lasting, n)
                        if pool is not None:
                            for n in range(HOLDERS):
                                tg.start_soon(holder, n)
                            for n in range(SOCKETS):
                                tg.start_soon(served, n)
                        if server != "hypercorn-trio":
                            # hypercorn's trio worker shields its socket writes: an end it
                            # does not take cannot be given up on.
                            for n in range(STALLED):
                                tg.start_soon(stalled, n)
            # Before shutdown: the USER components are all still in use.
            user_made = {n for n, (kind, _) in ledger.created.items() if kind == "user"}
            assert not user_made & set(ledger.cleaned), "a USER component was cleaned early"
    assert registry.stats().open_scopes == 0
    # -- each expiring stream ended at its expiry, its component cleaned once with the cut
    assert len(ended) == EXPIRING
    for user, (expires_at, end, feed) in ended.items():
        assert end >= expires_at, (user, end - expires_at)
        assert end <= expires_at + END_BOUND, (user, end - expires_at)
        assert ledger.cleaned[feed] == 1, user
        assert ledger.ended_by[feed] == "_CutOffAtExpiryError", (user, ledger.ended_by[feed])
    for user, (expires_at, feed) in stalled_feeds.items():
        assert ledger.cleaned[feed] == 1, user
        assert ledger.ended_by[feed] == "_CutOffAtExpiryError", (user, ledger.ended_by[feed])
        late = ledger.cleaned_at[feed] - expires_at
        assert 0 <= late <= registry.cleanup_timeout + END_BOUND, (user, late)
    assert len(lasting_feeds) == LASTING
    for user, feed in lasting_feeds.items():
        assert ledger.cleaned[feed] == 1, user
        assert ledger.ended_by[feed] != "_CutOffAtExpiryError", (user, ledger.ended_by[feed])
    twice = {n: c for n, c in ledger.cleaned.items() if c != 1}
    never = set(ledger.created) - set(ledger.cleaned)
    assert not twice, twice
    assert not never, {n: ledger.created[n] for n in never}
    # -- spans: one user per trace, the one the app answered in it
    users_by_trace: dict[str, set[str]] = defaultdict(set)
    cancelled: dict[str, bool] = {}  # trace id -> its scope span marked cut short
    for span in exporter.get_finished_spans():
        user_attr = (span.attributes or {}).get("ambient.user_id")
        if user_attr is not None:
            users_by_trace[f"{span.context.trace_id:032x}"].add(str(user_attr))
        if span.name == "ambient.scope":
            marked = bool((span.attributes or {}).get("ambient.cancelled"))
            cancelled[f"{span.context.trace_id:032x}"] = marked
    mixed = {t: u for t, u in users_by_trace.items() if len(u) != 1}
    assert not mixed, mixed
    for trace_hex, user in seen_traces.items():
        assert users_by_trace[trace_hex] == {hash_id(user, HASH_KEY)}, (user, trace_hex)
        if user.startswith("exp-"):
            assert cancelled[trace_hex], (user, trace_hex)
