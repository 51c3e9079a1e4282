"""Database work that runs after the endpoint returned: streamed bodies and background tasks.

A Starlette app behind ``AmbientMiddleware`` on a real uvicorn server and a real
PostgreSQL with row-level security. A ``StreamingResponse`` body and a ``BackgroundTask``
both run after the endpoint function has returned; they must still check out connections
as the request's own user, never see another user's setting or share a backend with them
at the same time, and leave nothing idle in a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import ambient
from ambient import Registry, UserExecutionContext
from ambient.errors import ScopeClosedError
from ambient.integrations.psycopg import SharedPool, connection
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.servers import serve
from tests.test_psycopg import Database, _admin, _eventually, make_database
from tests.test_psycopg_middleware import _admin_count, _eventually_zero, notes_pool

ROWS = 5
READ = (
    "SELECT owner, body, current_setting('app.user_id', true), pg_backend_pid() "
    "FROM {notes} ORDER BY id OFFSET %s LIMIT 1"
)


@dataclass(frozen=True)
class Checkout:
    """One connection checkout as the app saw it."""

    user: str
    setting: str
    pid: int
    start: float
    end: float


@dataclass
class Notes:
    """What the app records, shared between the server's thread and the test's."""

    checkouts: list[Checkout] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    background_started: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    background_done: threading.Event = field(default_factory=threading.Event)
    client_gone: threading.Event = field(default_factory=threading.Event)
    written: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Tasks the app leaves running past their response, the signal they wait for, the pool
    # they then check out from directly, and the users whose late work has ended.
    left_running: set[asyncio.Task[None]] = field(default_factory=set)
    go: threading.Event = field(default_factory=threading.Event)
    pool: SharedPool | None = None
    late: list[str] = field(default_factory=list)
    # Request ids whose final body message went out to the server, and for each request's
    # connection as its cleanup begins: its request id and whether that had happened.
    sent_in_full: set[str] = field(default_factory=set)
    released: list[tuple[str, bool]] = field(default_factory=list)

    def add(self, checkout: Checkout) -> None:
        with self.lock:
            self.checkouts.append(checkout)

    def note_release(self, request_id: str) -> None:
        with self.lock:
            self.released.append((request_id, request_id in self.sent_in_full))


async def _checkout_row(conn: Any, query: Any, offset: int) -> tuple[str, str, str, int]:
    cur = await conn.execute(query, (offset,))
    row = await cur.fetchone()
    assert row is not None
    return row  # type: ignore[no-any-return]


class RequestConnection:
    """A request's own connection as an application registers one: a REQUEST component
    holding a checkout from the installed pool for as long as its request's scope."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn


def request_connection(
    notes: Notes,
) -> Callable[[UserExecutionContext], AsyncIterator[RequestConnection]]:
    """The factory of :class:`RequestConnection`, noting in ``notes`` as each cleanup
    begins (before the connection goes back) whether its response had gone out in full."""

    async def factory(ctx: UserExecutionContext) -> AsyncIterator[RequestConnection]:
        async with connection() as conn:
            try:
                yield RequestConnection(conn)
            finally:
                notes.note_release(ctx.request_id)

    return factory


def build_app(db: Database, notes: Notes, *, base_http: bool = False) -> Starlette:
    """``/stream`` streams the user's rows from one checkout held across the chunks;
    ``/background`` answers at once and reads in a background task, after waiting for
    ``/hold`` (another user holding the only connection) to be in place; ``/stream-own``
    streams them through the request's own connection, which its endpoint resolved;
    ``/write-later``
    answers at once and writes a note in a background task once the client has gone.
    With ``base_http`` a pass-through ``BaseHTTPMiddleware`` wraps the routes."""
    query = db.sql(READ)

    async def stream(request: Request) -> Response:
        park = "park" in request.query_params

        async def body() -> AsyncIterator[bytes]:
            user = ambient.get_current_context().user_id
            async with connection() as conn:
                start = time.monotonic()
                setting, pid = "", 0
                for offset in range(ROWS):
                    owner, text, setting, pid = await _checkout_row(conn, query, offset)
                    yield json.dumps([owner, text, setting, pid]).encode() + b"\n"
                    if park:
                        # Only the client going away ends this stream.
                        try:
                            await anyio.sleep_forever()
                        except BaseException:
                            notes.cut.append(user)
                            raise
                    # A slow producer: the connection stays checked out between chunks.
                    await anyio.sleep(0.01)
                notes.add(Checkout(user, setting, pid, start, time.monotonic()))

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def stream_own(request: Request) -> Response:
        own = await ambient.resolve(RequestConnection)
        user = ambient.get_current_context().user_id

        async def body() -> AsyncIterator[bytes]:
            # Runs after the endpoint returned, a chunk at a time.
            start = time.monotonic()
            setting, pid = "", 0
            for offset in range(ROWS):
                owner, text, setting, pid = await _checkout_row(own.conn, query, offset)
                yield json.dumps([owner, text, setting, pid]).encode() + b"\n"
                await anyio.sleep(0.01)  # a slow producer, as in /stream
            notes.add(Checkout(user, setting, pid, start, time.monotonic()))

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def background(request: Request) -> Response:
        async def later() -> None:
            user = ambient.get_current_context().user_id
            notes.background_started.set()
            await anyio.to_thread.run_sync(notes.holding.wait, 10)
            try:
                async with connection() as conn:
                    start = time.monotonic()
                    owner, _, setting, pid = await _checkout_row(conn, query, 0)
                    notes.add(Checkout(user, setting, pid, start, time.monotonic()))
                    if owner != user:
                        notes.errors.append(f"background of {user} read {owner}'s row")
            finally:
                notes.background_done.set()

        return JSONResponse({"ok": True}, background=BackgroundTask(later))

    async def write_later(request: Request) -> Response:
        async def later() -> None:
            user = ambient.get_current_context().user_id
            try:
                await anyio.to_thread.run_sync(notes.client_gone.wait, 10)
                async with connection() as conn:
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'later')"), (user,)
                    )
                notes.written.append(user)
            except BaseException:
                notes.cut.append(user)
                raise
            finally:
                notes.background_done.set()

        return JSONResponse({"ok": True}, background=BackgroundTask(later))

    async def detach(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        own = await ambient.resolve(RequestConnection)
        owner, _, setting, _ = await _checkout_row(own.conn, query, 0)

        async def late() -> None:
            # Left running with no hold: it outlives the request, whose scope has closed
            # and whose connection went back to the pool by the time it goes on.
            try:
                await anyio.to_thread.run_sync(notes.go.wait, 10)
                try:
                    handed = await ambient.resolve(RequestConnection)
                except ScopeClosedError:
                    pass
                else:
                    notes.errors.append(f"late work of {user} got its request's connection")
                    await _checkout_row(handed.conn, query, 0)
                assert notes.pool is not None
                async with notes.pool.connection() as conn:
                    start = time.monotonic()
                    owner, _, setting, pid = await _checkout_row(conn, query, 0)
                    notes.add(Checkout(user, setting, pid, start, time.monotonic()))
                    if owner != user:
                        notes.errors.append(f"late work of {user} read {owner}'s row")
            except BaseException as exc:
                notes.errors.append(f"late work of {user} failed: {exc!r}")
                raise
            finally:
                with notes.lock:
                    notes.late.append(user)

        task = asyncio.get_running_loop().create_task(late())
        notes.left_running.add(task)
        task.add_done_callback(notes.left_running.discard)
        return JSONResponse({"user": user, "owner": owner, "setting": setting})

    async def hold(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        async with connection() as conn:
            start = time.monotonic()
            _, _, setting, pid = await _checkout_row(conn, query, 0)
            notes.holding.set()
            await anyio.to_thread.run_sync(notes.release.wait, 10)
            notes.add(Checkout(user, setting, pid, start, time.monotonic()))
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/stream", stream),
            Route("/stream-own", stream_own),
            Route("/background", background),
            Route("/hold", hold),
            Route("/detach", detach),
            Route("/write-later", write_later, methods=["POST"]),
        ],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_passing)] if base_http else [],
    )


async def _passing(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


@dataclass
class Served:
    url: str
    db: Database
    pool: SharedPool
    notes: Notes
    registry: Registry


def _seed(db: Database, users: list[str]) -> None:
    with _admin() as admin:
        for user in users:
            for i in range(ROWS):
                admin.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                    (user, f"{user}:{i}"),
                )


@contextlib.asynccontextmanager
async def running(
    max_size: int, users: list[str], *, base_http: bool = False
) -> AsyncIterator[Served]:
    """The app on uvicorn with a SharedPool of ``max_size`` and ``ROWS`` notes per user."""
    with make_database() as db:
        _seed(db, users)
        # Built outside the test's loop (which may be trio): the pool opens on the server's.
        pool = await anyio.to_thread.run_sync(
            lambda: notes_pool(db, max_size=max_size, per_user_limit=max_size, timeout=20)
        )
        registry = Registry()
        pool.install(registry)
        notes = Notes(pool=pool)
        registry.register(RequestConnection, request_connection(notes))
        app = build_app(db, notes, base_http=base_http)
        asgi = AmbientMiddleware(app, registry=registry, identity=trusted_header())

        async def recorded(scope: Any, receive: Any, send: Any) -> None:
            """The server's side of the middleware: notes each request whose final body
            message has gone out (by the request id its client sent)."""
            if scope["type"] != "http":
                await asgi(scope, receive, send)
                return
            request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode()

            async def send_recorded(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    with notes.lock:
                        notes.sent_in_full.add(request_id)

            await asgi(scope, receive, send_recorded)

        with serve("uvicorn", recorded) as url:
            yield Served(url, db, pool, notes, registry)


async def _nothing_left_open(served: Served) -> None:
    """No backend of the app idle in a transaction, every connection back in the pool."""
    await _eventually_zero(
        served.db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND state LIKE 'idle in transaction%%'",
        (served.db.app_name,),
    )

    async def returned() -> bool:
        return served.pool.stats().checked_out == 0

    await _eventually(returned, "every connection is back in the pool", within=10)


def _overlapping(checkouts: list[Checkout]) -> list[tuple[Checkout, Checkout]]:
    """Pairs of checkouts of different users on one backend at the same time."""
    return [
        (a, b)
        for i, a in enumerate(checkouts)
        for b in checkouts[i + 1 :]
        if a.pid == b.pid and a.user != b.user and a.start < b.end and b.start < a.end
    ]


async def test_streamed_bodies_read_through_their_own_checkout() -> None:
    """20 users, 5 streams each, 20 at once on a pool of 4: every chunk of every stream is
    the user's own row read under the user's own setting, no two users share a backend at
    once, and afterwards nothing is idle in a transaction and every connection is back."""
    users = [f"user-{n}" for n in range(20)]
    async with running(4, users) as served:
        failures: list[str] = []

        async def read(client: httpx.AsyncClient, user: str) -> None:
            for _ in range(5):
                answer = await client.get("/stream", headers={"x-user-id": user})
                lines = [json.loads(line) for line in answer.text.splitlines()]
                expected = [[user, f"{user}:{i}", user] for i in range(ROWS)]
                if answer.status_code != 200 or [line[:3] for line in lines] != expected:
                    failures.append(f"{user}: {answer.status_code} {answer.text[:200]}")
                elif len({line[3] for line in lines}) != 1:
                    failures.append(f"{user}: one stream read from several backends")

        limits = httpx.Limits(max_connections=20)
        async with (
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client,
            anyio.create_task_group() as tg,
        ):
            for user in users:
                tg.start_soon(read, client, user)
        assert failures == []
        checkouts = list(served.notes.checkouts)
        assert len(checkouts) == 100
        assert all(c.setting == c.user for c in checkouts)
        assert _overlapping(checkouts) == []
        await _nothing_left_open(served)


async def test_a_stream_through_its_requests_connection_keeps_it_until_its_last_chunk() -> None:
    """20 users, 5 streams each, 20 at once on a pool of 4; each body reads its rows,
    a chunk at a time after its endpoint returned, through the REQUEST connection the
    endpoint resolved. No body finds that connection gone or handed on: every chunk is the
    user's own row under the user's own setting, from one backend no other user holds
    meanwhile; each connection's cleanup begins once, only after its response's final body
    went out; afterwards nothing is idle in a transaction and every connection is back."""
    users = [f"user-{n}" for n in range(20)]
    async with running(4, users) as served:
        failures: list[str] = []

        async def read(client: httpx.AsyncClient, user: str) -> None:
            for i in range(5):
                headers = {"x-user-id": user, "x-request-id": f"{user}-{i}"}
                answer = await client.get("/stream-own", headers=headers)
                lines = [json.loads(line) for line in answer.text.splitlines()]
                expected = [[user, f"{user}:{i}", user] for i in range(ROWS)]
                if answer.status_code != 200 or [line[:3] for line in lines] != expected:
                    failures.append(f"{user}: {answer.status_code} {answer.text[:200]}")

        limits = httpx.Limits(max_connections=20)
        async with (
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client,
            anyio.create_task_group() as tg,
        ):
            for user in users:
                tg.start_soon(read, client, user)
        assert failures == []
        await _nothing_left_open(served)
        checkouts = list(served.notes.checkouts)
        assert len(checkouts) == 100
        assert all(c.setting == c.user for c in checkouts)
        assert _overlapping(checkouts) == []
        assert sorted(served.notes.released) == sorted(
            (f"{user}-{i}", True) for user in users for i in range(5)
        )


async def test_stream_cut_short_by_the_client_returns_its_connection() -> None:
    """A client reads the first chunk of a stream that holds the pool's only connection
    and then waits forever, and goes away: the stream is cancelled, its connection comes
    back (rolled back, not idle in a transaction) and the next user is served from it."""
    async with running(1, ["alice", "bob"]) as served:
        port = int(served.url.rsplit(":", 1)[1])
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as sock:
                await sock.send(
                    b"GET /stream?park HTTP/1.1\r\nhost: 127.0.0.1\r\nx-user-id: alice\r\n\r\n"
                )
                received = b""
                while b"alice:0" not in received:
                    received += await sock.receive()
        assert received.startswith(b"HTTP/1.1 200")
        await _nothing_left_open(served)
        assert served.notes.cut == ["alice"]
        assert served.notes.checkouts == []
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            after = await client.get("/stream", headers={"x-user-id": "bob"})
        assert after.status_code == 200
        assert [json.loads(line)[0] for line in after.text.splitlines()] == ["bob"] * ROWS


async def test_background_task_checks_out_as_its_own_user() -> None:
    """Pool of one. Alice's background task (after her response was sent) wants a
    connection while bob's request holds the only one: it waits, then reads as alice, on
    the backend bob used but never at the same time, and bob reads as bob."""
    async with running(1, ["alice", "bob"]) as served:
        notes = served.notes
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            first = await client.get("/background", headers={"x-user-id": "alice"})
            assert first.status_code == 200
            assert await anyio.to_thread.run_sync(notes.background_started.wait, 10)
            async with anyio.create_task_group() as tg:

                async def bob() -> None:
                    answer = await client.get("/hold", headers={"x-user-id": "bob"})
                    assert answer.status_code == 200

                tg.start_soon(bob)
                assert await anyio.to_thread.run_sync(notes.holding.wait, 10)
                # Alice's background task is now after the only connection, bob holds it.
                assert not notes.background_done.is_set()
                notes.release.set()
            assert await anyio.to_thread.run_sync(notes.background_done.wait, 10)
        assert notes.errors == []
        by_user = {c.user: c for c in notes.checkouts}
        assert sorted(by_user) == ["alice", "bob"]
        assert by_user["alice"].setting == "alice"
        assert by_user["bob"].setting == "bob"
        assert by_user["alice"].pid == by_user["bob"].pid  # the pool has one connection
        assert by_user["bob"].end <= by_user["alice"].start
        await _nothing_left_open(served)
        rows = await anyio.to_thread.run_sync(
            _admin_count, served.db, served.db.sql("SELECT count(*) FROM {notes}"), ()
        )
        assert rows == 2 * ROWS


@pytest.mark.parametrize("base_http", [False, True], ids=["plain", "base-http-middleware"])
async def test_a_background_write_after_the_client_left_is_its_users(base_http: bool) -> None:
    """The client reads the response and closes its socket at once; only then does the
    background task write, through the pool, with or without a BaseHTTPMiddleware in the
    app: the note is written, as the request's user, and nothing is left open."""
    async with running(2, ["alice"], base_http=base_http) as served:
        port = int(served.url.rsplit(":", 1)[1])
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as sock:
                await sock.send(
                    b"POST /write-later HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"x-user-id: alice\r\ncontent-length: 0\r\n\r\n"
                )
                received = b""
                while not received.endswith(b'{"ok":true}'):
                    received += await sock.receive()
        served.notes.client_gone.set()
        assert await anyio.to_thread.run_sync(served.notes.background_done.wait, 10)
        assert (served.notes.written, served.notes.cut) == (["alice"], [])
        written = await anyio.to_thread.run_sync(
            _admin_count,
            served.db,
            served.db.sql("SELECT count(*) FROM {notes} WHERE owner = 'alice' AND body = 'later'"),
            (),
        )
        assert written == 1
        await _nothing_left_open(served)


async def test_work_left_running_past_its_response_never_gets_a_connection_handed_on() -> None:
    """Pool of two, ten users. Each request reads through its own REQUEST connection and
    leaves a task running (no hold) that goes on only once every request's scope has
    closed, while every user streams through the pool at once. Each late task is refused
    its request's connection (back in the pool, maybe another user's by then) with
    ScopeClosedError; a checkout of its own from the pool reads as its own user; no two
    users share a backend at once, every answer is its user's own, and nothing is left
    open."""
    users = [f"user-{n}" for n in range(10)]
    async with running(2, users) as served:
        notes = served.notes
        failures: list[str] = []

        async def detach(client: httpx.AsyncClient, user: str) -> None:
            answer = await client.get("/detach", headers={"x-user-id": user})
            expected = {"user": user, "owner": user, "setting": user}
            if answer.status_code != 200 or answer.json() != expected:
                failures.append(f"{user}: {answer.status_code} {answer.text[:200]}")

        async def read(client: httpx.AsyncClient, user: str) -> None:
            answer = await client.get("/stream", headers={"x-user-id": user})
            lines = [json.loads(line) for line in answer.text.splitlines()]
            expected = [[user, f"{user}:{i}", user] for i in range(ROWS)]
            if answer.status_code != 200 or [line[:3] for line in lines] != expected:
                failures.append(f"{user}: {answer.status_code} {answer.text[:200]}")

        limits = httpx.Limits(max_connections=len(users))
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as client:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for user in users:
                        tg.start_soon(detach, client, user)

            async def closed() -> bool:
                return served.registry.stats().open_scopes == 0

            await _eventually(closed, "every request's scope has closed", within=10)
            assert len(notes.left_running) == len(users)
            notes.go.set()
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for user in users:
                        tg.start_soon(read, client, user)

        async def ended() -> bool:
            return len(notes.late) == len(users)

        await _eventually(ended, "every late task has ended", within=20)
        assert failures == []
        assert notes.errors == []
        assert sorted(notes.late) == sorted(users)
        checkouts = list(notes.checkouts)
        late = [c for c in checkouts if c.user in users]
        assert len(late) == 2 * len(users)  # a stream and a late checkout per user
        assert all(c.setting == c.user for c in checkouts)
        assert _overlapping(checkouts) == []
        await _nothing_left_open(served)
