"""Both psycopg strategies when PostgreSQL refuses their new connections.

The server refuses a connection for reasons of its own (a role's CONNECTION LIMIT, a wrong
password, a database that is starting up). psycopg's pool logs each refusal and tries again
in the background, so a checkout that waits for a connection only learns that none came:
the 503 it raises must say what the server said, without the conninfo or the password, and
ambient's log must say it once, not once per attempt.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

from ambient import Registry, UserRef, bind_context
from ambient.errors import PoolExhaustedError
from ambient.integrations.psycopg import PerUserPools, SharedPool, connection
from tests.conftest import DATABASE_URL
from tests.test_psycopg import (
    Database,
    _admin,
    _admin_scalar,
    _ctx,
    _eventually,
    fixture_db,  # noqa: F401 - the db fixture
)

# The version of psycopg installed, as (major, minor).
_PSYCOPG = tuple(int(n) for n in re.findall(r"\d+", psycopg.__version__)[:2])

# Never in a message (the test server trusts loopback, so it is never checked either).
SECRET = "s3cret-pa55word"


@contextlib.contextmanager
def limited_role(limit: int) -> Iterator[tuple[str, str]]:
    """A throwaway login role that may hold ``limit`` server connections at most, and a
    conninfo of it with a password; dropped afterwards."""
    name = f"ambient_lim_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS CONNECTION LIMIT {limit}")
    params = psycopg.conninfo.conninfo_to_dict(DATABASE_URL)
    params.update(user=name, password=SECRET)
    try:
        yield name, psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            admin.execute(f"DROP ROLE {name}")


def _refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ambient" and "too many connections" in r.getMessage()
    ]


async def _refused(why: str, *, within: float | None = None) -> PoolExhaustedError:
    """The 503 of a checkout of the current context (its timeout ``within``) that must get
    no connection: ``why`` says what the server allows instead."""
    with pytest.raises(PoolExhaustedError) as refused:
        async with connection(timeout=within):
            pytest.fail(why)
    return refused.value


def _assert_says_why(error: PoolExhaustedError, role: str, retry_after: float) -> None:
    """The 503 notes the server's reason for the logs and tracebacks that show it, never
    the password or the conninfo, and keeps it out of its detail, the client's answer."""
    notes = "\n".join(getattr(error, "__notes__", []))
    assert f'too many connections for role "{role}"' in notes, notes
    assert role not in str(error)
    for said in (notes, str(error)):
        assert SECRET not in said
        assert "password" not in said
        assert "port" not in said
    assert (error.http_status, error.retry_after) == (503, retry_after)


def _strategy(kind: str, url: str, db: Database, **options: Any) -> SharedPool | PerUserPools:
    common: dict[str, Any] = {"rls_check": "off", "kwargs": db.kwargs(), **options}
    if kind == "shared":
        return SharedPool(url, **{"min_size": 1, "max_size": 2, "per_user_limit": 2, **common})
    return PerUserPools(url, **{"min_size": 1, "max_size": 2, "max_total": 2, **common})


async def _errors(pool: SharedPool | PerUserPools) -> int:
    """The refused connection attempts of the psycopg pool(s) behind ``pool``."""
    if isinstance(pool, SharedPool):
        inner = [pool._pool] if pool._pool is not None else []
    else:
        inner = [p.pool for p in pool._pools if p.pool is not None]
    return sum(p.get_stats().get("connections_errors", 0) for p in inner)


@pytest.mark.parametrize("kind", ["shared", "per_user"])
async def test_a_503_for_a_connection_the_server_refused_says_why(
    db: Database, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The role may hold one server connection; a checkout holds it and a second one waits
    for the pool to grow, which the server refuses ("too many connections for role"). The
    second checkout's 503 says so (not only that no connection became available); the
    server refuses the pool's retry too, and a third checkout says the same, while
    ambient's log said it once per outage, not once per refused attempt. (The first
    checkout waits 2 s: time enough for the refusal of the pool's first attempt to arrive
    on a loaded machine.)"""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(1) as (role, url):
        pool = _strategy(kind, url, db, timeout=5, retry_after=7.0)
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")), connection() as held:
                await held.execute("SELECT 1")
                with pytest.raises(PoolExhaustedError) as first:
                    async with pool.connection(timeout=2):
                        pytest.fail("the server allows one connection only")
                _assert_says_why(first.value, role, 7.0)

                async def retried() -> bool:
                    return await _errors(pool) >= 2

                await _eventually(retried, "psycopg's pool tried to connect again")
                with pytest.raises(PoolExhaustedError) as again:
                    async with pool.connection(timeout=0.2):
                        pytest.fail("the server allows one connection only")
                _assert_says_why(again.value, role, 7.0)
                # While the server refuses: once the held connection goes back and the
                # pool closes, an attempt may get in and a later refusal be a new outage.
                logged = _refusal_logs(caplog)
                refused = await _errors(pool)
        finally:
            await registry.aclose()
    # Once per outage, not once per refused attempt. The pool's opening may make an outage
    # of its own: an attempt refused while another, begun after it, took the one place.
    assert 1 <= len(logged) <= 2, logged
    assert len(logged) < refused
    assert SECRET not in logged[0]


async def _refused_first(url: str, role: str) -> None:
    """A checkout of the installed strategy while another connection holds the role's one
    place (ended afterwards): the pool's attempts are refused, and the 503 says why. (The
    checkout waits 2 s, as the test above does; the pool's next attempt comes about 3 s
    after its first.)"""
    blocker = await psycopg.AsyncConnection.connect(url)
    try:
        refused = await _refused("another connection holds the role's one place", within=2)
    finally:
        await blocker.close()
    _assert_says_why(refused, role, 7.0)


async def _second_checkout_after_a_refusal(
    pool: SharedPool | PerUserPools,
    url: str,
    role: str,
    *,
    gives_up_after: float,
    between: Callable[[], None] = lambda: None,
) -> PoolExhaustedError:
    """``pool`` installed, in a scope of alice's: the pool's first attempts refused
    (:func:`_refused_first`), ``between()`` called, then a checkout that connects and holds
    its connection while a second one gives up after ``gives_up_after`` seconds: its 503."""
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")):
            await _refused_first(url, role)
            between()
            async with connection(timeout=15) as held:
                await held.execute("SELECT 1")
                refused = await _refused(
                    "a second connection while the first is held", within=gives_up_after
                )
    finally:
        await registry.aclose()
    return refused


@pytest.mark.parametrize("kind", ["shared", "per_user"])
async def test_a_503_after_the_pool_connected_again_quotes_no_earlier_refusal(
    db: Database, kind: str
) -> None:
    """The server refuses the pool's first attempts (another connection holds the role's one
    place), and a checkout's 503 says so. That connection closes, the pool's next attempt
    connects, and a checkout holds the connection: a second checkout that finds none
    (max_size=1) gets a 503 that quotes no refusal, the server having refused nothing
    since the pool connected."""
    with limited_role(1) as (role, url):
        pool = _strategy(kind, url, db, min_size=0, max_size=1, retry_after=7.0)
        busy = await _second_checkout_after_a_refusal(pool, url, role, gives_up_after=0.2)
    assert "became available" in str(busy)
    assert getattr(busy, "__notes__", []) == [], busy.__notes__


@pytest.mark.parametrize("kind", ["shared", "per_user"])
async def test_a_refusal_after_the_pool_connected_again_is_logged_again(
    db: Database, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses the pool's first attempts (another connection holds the role's one
    place): ambient logs it once. That connection closes, the pool connects, and a checkout
    holds the connection; a second checkout makes the pool grow, which the server refuses
    for the same reason: a new outage, logged again, and said by that checkout's 503."""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(1) as (role, url):
        pool = _strategy(kind, url, db, min_size=0, retry_after=7.0)

        def logged_once() -> None:
            assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)

        again = await _second_checkout_after_a_refusal(
            pool, url, role, gives_up_after=2, between=logged_once
        )
    _assert_says_why(again, role, 7.0)
    assert len(_refusal_logs(caplog)) == 2, _refusal_logs(caplog)


async def test_a_refusal_after_a_later_opening_of_the_pool_connected_is_logged_again(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses every connection of the role: the SharedPool's opening, which
    waits for a connection to check row-level security on, gets none, and its 503 says
    why, as ambient's log does. The role may then hold one connection: the next checkout
    opens the pool anew, connects and holds its connection; a second checkout makes the
    pool grow, which the server refuses for the same reason as before: a new outage, logged
    again. (Before, the log still took the first outage for the current one.)"""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(0) as (role, url):
        pool = _strategy(
            "shared", url, db, min_size=0, timeout=2, rls_check="warn", retry_after=7.0
        )
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")):
                first = await _refused("the server allows no connection")
                _assert_says_why(first, role, 7.0)
                assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)
                with _admin() as admin:
                    admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 1")
                async with connection(timeout=10) as held:
                    await held.execute("SELECT 1")
                    again = await _refused("the server allows one connection only")
        finally:
            await registry.aclose()
    _assert_says_why(again, role, 7.0)
    assert len(_refusal_logs(caplog)) == 2, _refusal_logs(caplog)


async def test_a_refusal_after_another_users_pool_connected_is_logged_again(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses every connection of the role: alice's pool gets none, and
    ambient logs it once. The role may then hold one connection: bob's pool, which
    connects as alice's does, connects and holds it, which ends the outage; a second
    checkout of bob's makes his pool grow, which the server refuses for the same reason as
    before: a new outage, logged again. (Before, the log took alice's outage for the
    current one until her own pool connected, which it may never do.)"""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(0) as (role, url):
        pool = _strategy(
            "per_user", url, db, min_size=0, timeout=2, rls_check="warn", retry_after=7.0
        )
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")):
                first = await _refused("the server allows no connection")
            _assert_says_why(first, role, 7.0)
            assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)
            with _admin() as admin:
                admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT 1")
            async with registry.open_scope(_ctx("bob")), connection(timeout=10) as held:
                await held.execute("SELECT 1")
                again = await _refused("the server allows one connection only")
        finally:
            await registry.aclose()
    _assert_says_why(again, role, 7.0)
    assert len(_refusal_logs(caplog)) == 2, _refusal_logs(caplog)


async def test_a_refusal_of_one_users_role_lasts_while_another_role_connects(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Each user connects as a role of their own: the server refuses every connection of
    alice's, and ambient logs it once. Bob's pool connects as his role, which says nothing
    of alice's: her next checkout's pool is refused for the same reason, still the same
    outage, not logged again."""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(0) as (role, url):

        def conninfo(user: UserRef) -> str:
            return url if user.user_id == "alice" else db.app_url

        pool = PerUserPools(
            conninfo, min_size=0, max_total=2, timeout=2, retry_after=7.0, kwargs=db.kwargs()
        )
        registry = Registry()
        pool.install(registry)
        refused: list[PoolExhaustedError] = []
        try:
            for user in ("alice", "bob", "alice"):
                async with registry.open_scope(_ctx(user)):
                    try:
                        async with connection() as conn:
                            await conn.execute("SELECT 1")
                    except PoolExhaustedError as exc:
                        refused.append(exc)
        finally:
            await registry.aclose()
    assert len(refused) == 2, refused
    for error in refused:
        _assert_says_why(error, role, 7.0)
    assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)


async def test_a_checkout_that_waited_for_a_refused_opening_does_not_open_again(
    db: Database,
) -> None:
    """The server refuses every connection of the role. A checkout of alice's opens her
    pool, and a second one, which may wait longer, waits for that opening: when it gets no
    connection in time, both end with a 503 that says why, the second at once, saying that
    the opening it waited for got none, rather than opening the pool again itself (the
    last of N such checkouts would wait N timeouts)."""
    with limited_role(0) as (role, url):
        pool = _strategy("per_user", url, db, timeout=2, rls_check="warn", retry_after=7.0)
        registry = Registry()
        pool.install(registry)
        refused: list[PoolExhaustedError] = []

        async def checkout(within: float) -> None:
            refused.append(await _refused("the server allows no connection", within=within))

        async def opening() -> bool:
            return pool.stats().slots == 1

        try:
            async with registry.open_scope(_ctx("alice")):
                with anyio.fail_after(4):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(checkout, 2)
                        await _eventually(opening, "alice's pool opens")
                        await checkout(10)
        finally:
            await registry.aclose()
    assert len(refused) == 2, refused
    for error in refused:
        _assert_says_why(error, role, 7.0)
    waited = [error for error in refused if "the opening this checkout waited for" in str(error)]
    assert len(waited) == 1, refused


async def test_a_connection_begun_before_a_refusal_leaves_it_noted(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool opens several connections at once: one that began before the server
    refused another, and connects after, says nothing of whether the server refuses now,
    so the refusal stays noted for the next 503, and ambient's log takes the outage for
    still going on: the server's next refusal for the same reason is not logged again."""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(1) as (role, url):
        refusals = SharedPool(url, rls_check="off")._refusals
        begun, go = anyio.Event(), anyio.Event()

        class Slow(psycopg.AsyncConnection[Any]):
            @classmethod
            async def connect(cls, *args: Any, **kwargs: Any) -> Any:
                begun.set()
                await go.wait()
                return await super().connect(*args, **kwargs)

        slow = refusals.connection_class(Slow, {})
        plain = refusals.connection_class(psycopg.AsyncConnection, {})
        made: list[psycopg.AsyncConnection[Any]] = []

        async def connect_slowly() -> None:
            made.append(await slow.connect(url, **db.kwargs()))

        blocker = await psycopg.AsyncConnection.connect(url)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(connect_slowly)
                await begun.wait()
                try:
                    with pytest.raises(psycopg.OperationalError, match="too many connections"):
                        await plain.connect(url, **db.kwargs())
                finally:
                    await blocker.close()

                async def place_free() -> bool:
                    held = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                    return await _admin_scalar(db, held, (role,)) == 0

                await _eventually(place_free, "the other connection ended on the server")
                go.set()
        try:
            assert len(made) == 1
            assert f'too many connections for role "{role}"' in refusals.why(), refusals.why()
            assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)
            # The slow connection holds the role's one place.
            with pytest.raises(psycopg.OperationalError, match="too many connections"):
                await plain.connect(url, **db.kwargs())
            assert len(_refusal_logs(caplog)) == 1, _refusal_logs(caplog)
        finally:
            for conn in made:
                await conn.close()


async def test_a_refusal_of_one_role_ends_not_with_a_connection_of_another_refused_before(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Alice and Bob each connect as a role of their own, and the server refuses both (a
    reason each, naming the role): ambient logs each once. Alice's role may then connect,
    and her pool does: that ends her outage, not Bob's, which the server's next refusal
    of his pool's connection continues, not logged again."""
    caplog.set_level(logging.WARNING, logger="ambient")
    with limited_role(0) as (alices_role, alices_url), limited_role(0) as (bobs_role, bobs_url):

        def conninfo(user: UserRef) -> str:
            return alices_url if user.user_id == "alice" else bobs_url

        pool = PerUserPools(
            conninfo, min_size=0, max_total=4, timeout=2, retry_after=7.0, kwargs=db.kwargs()
        )
        registry = Registry()
        pool.install(registry)
        refused: dict[str, list[PoolExhaustedError]] = {"alice": [], "bob": []}

        async def checkout(user: str) -> None:
            async with registry.open_scope(_ctx(user)):
                try:
                    async with connection() as conn:
                        await conn.execute("SELECT 1")
                except PoolExhaustedError as exc:
                    refused[user].append(exc)

        try:
            await checkout("alice")
            await checkout("bob")
            assert len(_refusal_logs(caplog)) == 2, _refusal_logs(caplog)
            with _admin() as admin:
                admin.execute(f"ALTER ROLE {alices_role} CONNECTION LIMIT 1")
            await checkout("alice")
            await checkout("bob")
        finally:
            await registry.aclose()
    assert [len(refused["alice"]), len(refused["bob"])] == [1, 2], refused
    _assert_says_why(refused["alice"][0], alices_role, 7.0)
    for error in refused["bob"]:
        _assert_says_why(error, bobs_role, 7.0)
    assert len(_refusal_logs(caplog)) == 2, _refusal_logs(caplog)


async def test_an_opening_anew_that_hears_nothing_back_quotes_the_earlier_refusal(
    db: Database,
) -> None:
    """The server refuses every connection of the role: the SharedPool's opening gets none,
    and its 503 says why. The next checkout opens the pool anew, whose attempt to connect
    gets no answer before the checkout gives up: its 503 still quotes the refusal, the
    last thing the server said, as the pool has not connected since."""
    with limited_role(0) as (role, url):
        hold, begun, go = False, anyio.Event(), anyio.Event()

        class Stalled(psycopg.AsyncConnection[Any]):
            @classmethod
            async def connect(cls, *args: Any, **kwargs: Any) -> Any:
                if hold:
                    begun.set()
                    await go.wait()
                return await super().connect(*args, **kwargs)

        pool = _strategy(
            "shared",
            url,
            db,
            min_size=0,
            timeout=2,
            rls_check="warn",
            retry_after=7.0,
            connection_class=Stalled,
        )
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")):
                first = await _refused("the server allows no connection")
                _assert_says_why(first, role, 7.0)
                hold = True
                again = await _refused("the server answers no connection")
                assert begun.is_set()
        finally:
            go.set()
            await registry.aclose()
    _assert_says_why(again, role, 7.0)


@pytest.mark.parametrize("close_returns", [False, True])
@pytest.mark.parametrize("kind", ["shared", "per_user"])
async def test_a_pool_the_server_lets_open_no_connection_says_why(
    db: Database, kind: str, close_returns: bool
) -> None:
    """The role may hold no connection at all: the first checkout, which opens the pool and
    runs the row-level-security check on its first connection, gets a 503 that names the
    server's refusal instead of asking whether the database is reachable. So does a pool
    whose connections go back to it on close() (close_returns=True), from psycopg 3.3 on,
    which takes a connection class of ambient's making with that option."""
    if close_returns and _PSYCOPG < (3, 3):
        pytest.skip("psycopg before 3.3 takes no connection class of ambient's making here")
    with limited_role(0) as (role, url):
        pool = _strategy(kind, url, db, timeout=2, rls_check="warn", close_returns=close_returns)
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")):
                refused = await _refused("the server allows no connection")
        finally:
            await registry.aclose()
    _assert_says_why(refused, role, 1.0)
    assert "reachable" not in str(refused)
    assert "the server refused the last attempt to connect" in str(refused)


async def test_connections_keep_the_applications_own_class(db: Database) -> None:
    """The pool notes refusals through a connection class of its own making, which opens
    the application's: a checkout still gets a connection of the class it asked for."""

    class Custom(psycopg.AsyncConnection[Any]):
        pass

    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=1,
        rls_check="off",
        kwargs=db.kwargs(),
        connection_class=Custom,
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                assert type(conn) is Custom
                await conn.execute("SELECT 1")


def test_a_refusal_that_echoes_the_password_is_noted_without_it() -> None:
    """A server message may echo what a connection option held (the password too, if it
    was put there by mistake): what the pool notes, and the 503 and the log say, has it
    blotted out, and libpq's words about where the server runs left off."""

    class Attempt:
        password = SECRET.encode()

    refusal = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.1", port 5432 failed: '
        f'FATAL:  invalid value for parameter "app.key": "{SECRET}"\nmore detail',
        pgconn=Attempt(),  # type: ignore[arg-type]
    )
    pool = SharedPool("postgresql://app@127.0.0.1/app")
    pool._refusals._refused(refusal)
    assert pool._refusals.why().endswith(': FATAL: invalid value for parameter "app.key": "***"'), (
        pool._refusals.why()
    )


def test_a_long_or_empty_refusal_is_noted_in_short() -> None:
    """The note keeps the first 300 characters of the server's first line (a message may be
    long), names the error's class for a refusal that says nothing, and says how long ago
    the refusal came: never less than nothing."""
    pool = SharedPool("postgresql://app@127.0.0.1/app")
    pool._refusals._refused(psycopg.OperationalError("FATAL:  " + "x" * 1000 + "\nmore"))
    why = pool._refusals.why()
    assert re.fullmatch(
        r"the pool's last attempt to connect failed \d+\.\d s ago: FATAL: x{293}", why
    ), why
    pool._refusals._refused(psycopg.OperationalError(""))
    why = pool._refusals.why()
    assert re.fullmatch(
        r"the pool's last attempt to connect failed \d+\.\d s ago: OperationalError", why
    ), why
