"""SharedPool through AmbientMiddleware on a real uvicorn server and real PostgreSQL.

The server runs in its own thread with its own asyncio loop (where the pool lives); the
clients are httpx, so these tests run on both asyncio and trio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg.abc import Query
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import ambient
from ambient import Registry, UserExecutionContext
from ambient.errors import PoolExhaustedError
from ambient.integrations.psycopg import PerUserPools, SharedPool, connection
from ambient.integrations.websockets import message_scope
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.servers import serve
from tests.test_psycopg import Database, _eventually, make_database

Scope = MutableMapping[str, Any]


@dataclass
class NotesApp:
    """A raw ASGI app on the pool: the middleware is the only thing between it and uvicorn.

    ``POST /notes`` stores the body for the current user, ``GET /notes[?timeout=s]`` lists
    what the current user sees, ``GET /hold`` keeps a connection until ``release`` is set, and
    ``GET /sleep`` runs a long query that a client disconnect cancels.
    """

    db: Database
    release: threading.Event = field(default_factory=threading.Event)
    holding: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    hold_target: int = 0
    sleeping: threading.Event = field(default_factory=threading.Event)
    sleep_outcome: list[str] = field(default_factory=list)
    marker: str = field(default_factory=lambda: f"sleep-{uuid.uuid4().hex}")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/notes"):
            body = await _read_body(receive)
            async with connection() as conn:
                await conn.execute(
                    self.db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                    (_current_user(), body.decode()),
                )
            await _answer(send, 201, {"ok": True})
        elif route == ("GET", "/notes"):
            query = scope.get("query_string", b"").decode()
            timeout = float(query.removeprefix("timeout=")) if query else None
            async with connection(timeout=timeout) as conn:
                cur = await conn.execute(self.db.sql("SELECT owner, body FROM {notes} ORDER BY id"))
                rows = await cur.fetchall()
            await _answer(send, 200, {"rows": [list(row) for row in rows]})
        elif route == ("GET", "/hold"):
            async with connection():
                self.holding += 1
                if self.holding == self.hold_target:
                    self.held.set()
                await anyio.to_thread.run_sync(self.release.wait, abandon_on_cancel=True)
            await _answer(send, 200, {"ok": True})
        elif route == ("GET", "/sleep"):
            await self._sleep(receive, send)
        else:
            await _answer(send, 404, {})

    async def _sleep(self, receive: Any, send: Any) -> None:
        """Run a long query; stop it when the client goes away (as frameworks do)."""
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                async with connection() as conn:
                    self.sleeping.set()
                    await conn.execute(f"SELECT pg_sleep(30) /* {self.marker} */")
            except anyio.get_cancelled_exc_class():
                self.sleep_outcome.append("cancelled")
                raise
            self.sleep_outcome.append("finished")
            tg.cancel_scope.cancel()
        await _answer(send, 200, {"ok": True})


def _current_user() -> str:
    import ambient

    return ambient.get_current_context().user_id


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _answer(send: Any, status: int, payload: object) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


@dataclass
class Served:
    """A running server with its app and pool."""

    url: str
    app: NotesApp
    pool: SharedPool
    db: Database


def notes_pool(db: Database, **options: Any) -> SharedPool:
    """A SharedPool of the test's app role that refuses to open unless RLS protects the
    notes table (``options`` are the sizes and timeouts)."""
    return SharedPool(
        db.app_url,
        min_size=1,
        rls_tables=[db.notes],
        rls_check="raise",
        kwargs=db.kwargs(),
        **options,
    )


SERVED_POOL: dict[str, Any] = {"max_size": 4, "per_user_limit": 2, "timeout": 10, "retry_after": 3}


@pytest.fixture(name="served")
def fixture_served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """uvicorn serving NotesApp behind AmbientMiddleware, on a SharedPool of 4 for the app
    role (per-user limit 2, 10 s timeout, Retry-After 3); a test parametrizes ``served``
    indirectly with a dict of pool options to replace these."""
    options = getattr(request, "param", SERVED_POOL)
    with make_database() as db:
        # Built here, outside any event loop: the pool opens on the server's asyncio loop.
        pool = notes_pool(db, **options)
        registry = Registry()
        pool.install(registry)
        app = NotesApp(db)
        asgi = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with serve("uvicorn", asgi) as url:
            yield Served(url, app, pool, db)
            app.release.set()  # a test that failed while holding must not stall the shutdown
        assert not pool.opened  # the middleware closed the registry at shutdown


@pytest.fixture(name="served_behind_base_http")
def fixture_served_behind_base_http() -> Iterator[Served]:
    """The served app with a pass-through ``BaseHTTPMiddleware`` outside the middleware."""

    async def passing(request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)

    with make_database() as db:
        pool = notes_pool(db, **SERVED_POOL)
        registry = Registry()
        pool.install(registry)
        app = NotesApp(db)
        inner = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with serve("uvicorn", BaseHTTPMiddleware(inner, dispatch=passing)) as url:
            yield Served(url, app, pool, db)
        assert not pool.opened


def _admin_count(db: Database, query: Query, params: tuple[object, ...]) -> int:
    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _assert_pool_exhausted(response: httpx.Response) -> dict[str, Any]:
    """A 503 problem+json with the pool's Retry-After; return the problem."""
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == 503
    # The pool's name, settings and state are the server's: they go to its log.
    assert problem["detail"] == PoolExhaustedError.client_detail
    return problem


def _answered_503(caplog: pytest.LogCaptureFixture) -> str:
    """What the middleware logged of the 503s it answered (the errors' own messages)."""
    return "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name == "ambient.middleware" and "with 503" in r.getMessage()
    )


async def _eventually_zero(db: Database, query: str, params: tuple[object, ...]) -> None:
    async def zero() -> bool:
        return await anyio.to_thread.run_sync(_admin_count, db, query, params) == 0

    await _eventually(zero, query, within=10)


@pytest.mark.load
async def test_middleware_rls_100_concurrent_users(served: Served) -> None:
    """100 users write and read notes concurrently through the middleware; each sees only
    its own rows, and a request without identity is refused before touching the pool."""
    failures: list[str] = []

    async def user(client: httpx.AsyncClient, n: int) -> None:
        name = f"user-{n}"
        headers = {"x-user-id": name}
        for i in range(2):
            answer = await client.post("/notes", content=f"{name}:{i}", headers=headers)
            if answer.status_code != 201:
                failures.append(f"{name} POST {answer.status_code} {answer.text}")
        answer = await client.get("/notes", headers=headers)
        expected = [[name, f"{name}:{i}"] for i in range(2)]
        if answer.status_code != 200 or answer.json()["rows"] != expected:
            failures.append(f"{name} GET {answer.status_code} {answer.text}")

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as client:
        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(user, client, n)
        anonymous = await client.get("/notes")
    assert failures == []
    assert anonymous.status_code == 401
    rows = await anyio.to_thread.run_sync(
        _admin_count, served.db, served.db.sql("SELECT count(*) FROM {notes}"), ()
    )
    assert rows == 200
    stats = served.pool.stats()
    assert (stats.checked_out, stats.users, stats.discarded) == (0, 0, 0)


async def test_middleware_exhaustion_answers_503_with_retry_after(served: Served) -> None:
    """With every connection held, a request gets 503 problem+json with Retry-After within
    the pool's timeout, not a hang; once released, requests succeed again."""
    app = served.app
    app.hold_target = 4
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        async with anyio.create_task_group() as tg:
            holders: list[httpx.Response] = []

            async def hold(user: str) -> None:
                holders.append(await client.get("/hold", headers={"x-user-id": user}))

            for user in ("a", "b", "c", "d"):
                tg.start_soon(hold, user)
            held = await anyio.to_thread.run_sync(app.held.wait, 10)
            assert held
            started = anyio.current_time()
            refused = await client.get("/notes?timeout=0.5", headers={"x-user-id": "e"})
            elapsed = anyio.current_time() - started
            app.release.set()
        after = await client.get("/notes", headers={"x-user-id": "e"})
    _assert_pool_exhausted(refused)
    assert elapsed < 3
    assert [r.status_code for r in holders] == [200] * 4
    assert after.status_code == 200


@pytest.mark.parametrize(
    "served",
    [{**SERVED_POOL, "max_size": 2, "max_waiting": 2}],  # extra AsyncConnectionPool options
    ids=["max_size=2,max_waiting=2"],
    indirect=True,
)
async def test_middleware_max_waiting_full_answers_503_at_once(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """With every connection held and max_waiting requests already queued for one, the
    next request gets 503 problem+json with Retry-After at once (not after the pool's 10 s
    timeout), saying the queue is full; once released, every held and queued request is
    served, and so is a new one."""
    caplog.set_level(logging.INFO, logger="ambient.middleware")
    app, pool = served.app, served.pool
    app.hold_target = 2
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        holders: list[httpx.Response] = []
        queued: list[httpx.Response] = []

        async def get(path: str, user: str, into: list[httpx.Response]) -> None:
            into.append(await client.get(path, headers={"x-user-id": user}))

        async with anyio.create_task_group() as tg:
            for user in ("a", "b"):
                tg.start_soon(get, "/hold", user, holders)
            assert await anyio.to_thread.run_sync(app.held.wait, 10)
            for user in ("c", "d"):  # distinct users: the per-user limit stays out of it
                tg.start_soon(get, "/notes", user, queued)

            async def queue_full() -> bool:
                return pool.stats().waiting == 2

            await _eventually(queue_full, "two requests wait in the pool's queue", within=10)
            started = anyio.current_time()
            refused = await client.get("/notes", headers={"x-user-id": "e"})
            elapsed = anyio.current_time() - started
            stats_when_refused = pool.stats()
            app.release.set()
        after = await client.get("/notes", headers={"x-user-id": "e"})
    _assert_pool_exhausted(refused)
    logged = _answered_503(caplog)
    assert "queue for a connection" in logged
    assert "is full (max_waiting=2" in logged
    assert "2 requests waiting" in logged
    assert elapsed < 2  # refused at once, well under the 10 s timeout
    assert (stats_when_refused.waiting, stats_when_refused.checked_out) == (2, 4)
    assert [r.status_code for r in holders] == [200, 200]
    assert [r.status_code for r in queued] == [200, 200]
    assert after.status_code == 200
    stats = pool.stats()
    assert (stats.checked_out, stats.users, stats.waiting) == (0, 0, 0)


@pytest.mark.parametrize(
    "served",
    [{**SERVED_POOL, "max_size": 2, "timeout": 0.5}],
    ids=["max_size=2,timeout=0.5"],
    indirect=True,
)
async def test_middleware_configured_timeout_answers_503(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """With every connection held, a request without a timeout of its own waits the pool's
    configured 0.5 s, not longer, and gets 503 problem+json with Retry-After; afterwards
    nothing is left checked out or waiting, and requests are served again."""
    caplog.set_level(logging.INFO, logger="ambient.middleware")
    app, pool = served.app, served.pool
    app.hold_target = 2
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        holders: list[httpx.Response] = []

        async def hold(user: str) -> None:
            holders.append(await client.get("/hold", headers={"x-user-id": user}))

        async with anyio.create_task_group() as tg:
            for user in ("a", "b"):
                tg.start_soon(hold, user)
            assert await anyio.to_thread.run_sync(app.held.wait, 10)
            started = anyio.current_time()
            # The client's own bound, so a pool that ignored its timeout fails fast.
            refused = await client.get("/notes", headers={"x-user-id": "c"}, timeout=5)
            elapsed = anyio.current_time() - started
            app.release.set()
        assert [r.status_code for r in holders] == [200, 200]

        async def whole() -> bool:
            stats = pool.stats()
            return (stats.checked_out, stats.users, stats.waiting) == (0, 0, 0) and (
                stats.available == stats.size
            )

        await _eventually(whole, "every connection back in the pool", within=10)
        after = await client.get("/notes", headers={"x-user-id": "c"})
    _assert_pool_exhausted(refused)
    assert "within 0.5 s" in _answered_503(caplog)
    assert 0.4 <= elapsed < 3  # waited the configured timeout, and no longer
    assert pool.stats().discarded == 0
    assert after.status_code == 200


async def test_middleware_per_user_limit_answers_503(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """One user holding per_user_limit connections gets 503 for a third request, while
    another user is served."""
    caplog.set_level(logging.INFO, logger="ambient.middleware")
    app = served.app
    app.hold_target = 2
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
        anyio.create_task_group() as tg,
    ):

        async def hold() -> None:
            await client.get("/hold", headers={"x-user-id": "greedy"})

        for _ in range(2):
            tg.start_soon(hold)
        assert await anyio.to_thread.run_sync(app.held.wait, 10)
        greedy = await client.get("/notes?timeout=0.5", headers={"x-user-id": "greedy"})
        other = await client.get("/notes", headers={"x-user-id": "modest"})
        app.release.set()
    assert greedy.status_code == 503
    assert greedy.json()["detail"] == PoolExhaustedError.client_detail
    assert "per_user_limit" in _answered_503(caplog)
    assert other.status_code == 200


async def test_middleware_client_disconnect_mid_query(served: Served) -> None:
    """A client that goes away during a long query: the app cancels it, the query stops
    on the server, nothing is left idle in transaction, and the pool is whole again."""
    await _disconnect_mid_query(served)


async def test_client_disconnect_mid_query_behind_a_base_http_middleware_outside(
    served_behind_base_http: Served,
) -> None:
    """The same with a ``BaseHTTPMiddleware`` outside the middleware (FastAPI's
    ``@app.middleware("http")`` added after install()), which runs the rest of the stack in
    a task of its own and hands it the client's disconnect through its own ``receive``: the
    query still stops on the server, nothing is left idle in transaction, and the pool is
    whole again."""
    await _disconnect_mid_query(served_behind_base_http)


async def _disconnect_mid_query(served: Served) -> None:
    """A long query of alice's, her client gone while it runs: the query is cancelled and
    stops on the server, her connection comes back clean, and she is served again."""
    app = served.app
    db = served.db
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        with anyio.CancelScope() as request:

            async def go_away() -> None:
                await anyio.to_thread.run_sync(app.sleeping.wait, 10)
                await _wait_running(db, app.marker)
                request.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(go_away)
                await client.get("/sleep", headers={"x-user-id": "alice"})
        assert request.cancelled_caught
        await _eventually_zero(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{app.marker}%",),
        )
        await _eventually_zero(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state LIKE 'idle in transaction%%'",
            (db.app_name,),
        )

        async def returned() -> bool:
            return served.pool.stats().checked_out == 0

        await _eventually(returned, "the connection is back in the pool", within=10)
        after = await client.get("/notes", headers={"x-user-id": "alice"})
    assert app.sleep_outcome == ["cancelled"]
    assert after.status_code == 200


async def _wait_running(db: Database, marker: str) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s "
        "AND state = 'active' AND pid <> pg_backend_pid()"
    )

    async def running() -> bool:
        return await anyio.to_thread.run_sync(_admin_count, db, query, (f"%{marker}%",)) > 0

    await _eventually(running, "the query runs on the server", within=10)


async def test_shutdown_waits_for_requests_holding_pool_connections() -> None:
    """The server is told to stop while three requests hold pool connections: they finish
    with their connections (200), and only then does lifespan shutdown close the registry
    and the pool."""
    with make_database() as db:
        # Built outside the test's loop (which may be trio): the pool opens on the server's.
        pool = await anyio.to_thread.run_sync(
            lambda: SharedPool(
                db.app_url, min_size=1, max_size=4, rls_check="raise", kwargs=db.kwargs()
            )
        )
        registry = Registry()
        pool.install(registry)
        app = NotesApp(db, hold_target=3)
        asgi = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        server = serve("uvicorn", asgi)
        url = server.__enter__()
        host, port = url.removeprefix("http://").split(":")
        statuses: list[int] = []
        stopped = threading.Event()

        def stop() -> None:
            server.__exit__(None, None, None)
            stopped.set()

        def refusing() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                return True
            return False

        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def hold(n: int) -> None:
                answer = await http.get("/hold", headers={"x-user-id": f"holder-{n}"})
                statuses.append(answer.status_code)

            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(hold, n)
                assert await anyio.to_thread.run_sync(app.held.wait, 10)
                assert pool.stats().checked_out == 3
                threading.Thread(target=stop, daemon=True).start()
                for _ in range(200):  # bounded: until the server stops accepting
                    if await anyio.to_thread.run_sync(refusing):
                        break
                    await anyio.sleep(0.05)
                else:
                    pytest.fail("the server kept accepting connections")
                assert pool.opened  # shutdown has begun, and the pool is still open
                app.release.set()
        assert await anyio.to_thread.run_sync(stopped.wait, 30)
        assert statuses == [200, 200, 200]
        assert not pool.opened


async def test_per_user_pools_outlived_by_requests_cancelled_at_the_graceful_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PerUserPools, whose pools are USER components: the server is told to stop while three
    users' requests hold connections, and gives up on them at its graceful-shutdown
    deadline, cancelling them. Each request's cleanup still uses its checkout (an audit
    query after the request's work) and hands it back to its user's pool before lifespan
    shutdown closes that pool: nothing of ambient's or psycopg's fails or warns, and no
    server connection of the application is left behind."""
    caplog.set_level(logging.WARNING)
    with make_database() as db:
        pools = await anyio.to_thread.run_sync(
            lambda: PerUserPools(
                db.app_url, max_size=2, max_total=6, rls_check="raise", kwargs=db.kwargs()
            )
        )
        registry = Registry()
        pools.install(registry)
        audited: list[str] = []

        async def audit(ctx: UserExecutionContext) -> AsyncIterator[_Audit]:
            async with pools.connection() as conn:
                try:
                    yield _Audit()
                finally:
                    await conn.execute("SELECT pg_sleep(0.1)")
                    audited.append(ctx.user_id)

        registry.register(_Audit, audit)
        app = NotesApp(db, hold_target=3)

        async def auditing(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                await ambient.resolve(_Audit)
            await app(scope, receive, send)

        asgi = AmbientMiddleware(auditing, registry=registry, identity=trusted_header())
        server = serve("uvicorn", asgi, timeout_graceful_shutdown=0.1)
        url = server.__enter__()
        stopped = threading.Event()

        def stop() -> None:
            server.__exit__(None, None, None)
            stopped.set()

        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def hold(n: int) -> None:
                with contextlib.suppress(httpx.TransportError):
                    await http.get("/hold", headers={"x-user-id": f"holder-{n}"})

            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(hold, n)
                assert await anyio.to_thread.run_sync(app.held.wait, 10)
                assert pools.stats().pools == 3
                threading.Thread(target=stop, daemon=True).start()
                assert await anyio.to_thread.run_sync(stopped.wait, 30)
        app.release.set()
        assert sorted(audited) == [f"holder-{n}" for n in range(3)]
        assert pools.stats().pools == 0
        await _eventually_zero(
            db, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (db.app_name,)
        )
    complaints = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith(("ambient", "psycopg"))
    ]
    assert complaints == []


class _Audit:
    """A REQUEST component whose cleanup still uses the request's checkout."""


def _open_socket(stack: contextlib.ExitStack, url: str, user: str) -> ClientConnection:
    """Open a websocket for ``user``, closed with ``stack``."""
    return stack.enter_context(
        ws_connect(url, additional_headers={"x-user-id": user}, open_timeout=10)
    )


def _exchange(ws: ClientConnection, text: str) -> dict[str, Any]:
    """Send one message on a websocket and read its answer (bounded)."""
    ws.send(text)
    answer: dict[str, Any] = json.loads(ws.recv(timeout=20))
    return answer


async def test_open_sockets_pin_no_pool_and_query_as_their_user_after_its_eviction() -> None:
    """Ten users each keep a websocket open (a scope holding their user entry for the
    socket's life) and query through their PerUserPools pool once per message, under a
    budget of three connections; fifty other users' HTTP requests come in between. The
    sockets' pools, idle between messages, are closed to make room, so every request is
    served instead of waiting for a socket to end (503 or a hang); each socket's next
    message reopens its user's pool and runs with that user's settings and rows only. A
    pool whose user still has a scope open must neither be spared from eviction (ten
    sockets would hold more pools than the budget has room for) nor stay closed for good."""
    users = [f"sock-{n}" for n in range(10)]
    callers = [f"http-{n}" for n in range(50)]
    with make_database() as db:
        pools = await anyio.to_thread.run_sync(
            lambda: PerUserPools(
                db.app_url,
                max_size=1,
                max_total=3,
                timeout=15,
                rls_tables=[db.notes],
                rls_check="raise",
                kwargs=db.kwargs(),
            )
        )
        registry = Registry()
        pools.install(registry)
        notes = NotesApp(db)
        query = db.sql(
            "SELECT current_setting('app.user_id', true),"
            " (SELECT coalesce(array_agg(DISTINCT owner), ARRAY[]::text[]) FROM {notes})"
        )

        async def app(scope: Scope, receive: Any, send: Any) -> None:
            if scope["type"] != "websocket":
                await notes(scope, receive, send)
                return
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while (await receive())["type"] == "websocket.receive":
                async with message_scope(), connection() as conn:
                    row = await (await conn.execute(query)).fetchone()
                assert row is not None
                answer = {"user": _current_user(), "setting": row[0], "owners": row[1]}
                await send({"type": "websocket.send", "text": json.dumps(answer)})

        asgi = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with serve("uvicorn", asgi) as url, anyio.fail_after(90):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:

                async def post(user: str) -> None:
                    response = await http.post(
                        "/notes", content=f"{user}'s note", headers={"x-user-id": user}
                    )
                    assert response.status_code == 201, (user, response.text)

                async with anyio.create_task_group() as tg:
                    for user in users + callers:
                        tg.start_soon(post, user)

                ws_url = url.replace("http://", "ws://") + "/ws"
                sockets: dict[str, ClientConnection] = {}
                opened = contextlib.ExitStack()
                try:
                    for user in users:
                        sockets[user] = await anyio.to_thread.run_sync(
                            _open_socket, opened, ws_url, user
                        )
                    answers: dict[str, list[dict[str, Any]]] = {user: [] for user in users}

                    async def talk(user: str, text: str) -> None:
                        answers[user].append(
                            await anyio.to_thread.run_sync(_exchange, sockets[user], text)
                        )

                    async def read(user: str) -> None:
                        response = await http.get("/notes", headers={"x-user-id": user})
                        assert response.status_code == 200, (user, response.text)
                        assert response.json() == {"rows": [[user, f"{user}'s note"]]}, user

                    async with anyio.create_task_group() as tg:
                        for user in users:
                            tg.start_soon(talk, user, "first")
                    async with anyio.create_task_group() as tg:
                        for user in callers:
                            tg.start_soon(read, user)
                    async with anyio.create_task_group() as tg:
                        for user in users:
                            tg.start_soon(talk, user, "second")
                    stats = pools.stats()
                finally:
                    await anyio.to_thread.run_sync(opened.close)
        for user in users:
            expected = {"user": user, "setting": user, "owners": [user]}
            assert answers[user] == [expected, expected], user
        # Every socket user's pool had to give its room up at least once for the others.
        assert stats.evicted >= len(users) + len(callers) - pools.max_total, stats
        assert stats.slots <= pools.max_total, stats
