"""Both psycopg strategies when the network to PostgreSQL goes silent mid-checkout.

A relay on loopback (tests.netfault) stands between the pools and the real server; freezing
it holds every byte while every socket stays open: what a partition or a hung peer looks
like to a client. Handing a connection back (commit or rollback, reset, the server-side
cancel of an interrupted query) must then end within ``return_timeout``: the connection is
closed instead of reused, the caller hears that a commit's outcome is unknown, and the pool
works again once the network does. Without the bound the request's cleanup, shielded from
cancellation, would wait for the network forever.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

from ambient import Registry
from ambient.errors import PoolExhaustedError
from ambient.integrations.psycopg import PerUserPools, SharedPool, connection
from tests.netfault import SilentNetwork
from tests.test_psycopg import Database, _ctx, _scalar, fixture_db  # noqa: F401 - the db fixture

RETURN_TIMEOUT = 0.5
# What the test allows a bounded give-back (the bound plus the time to close and hand the
# connection back); a give-back without a bound would wait for the network forever.
WITHIN = RETURN_TIMEOUT + 10
# How long the relay stays silent at most: a give-back that waits for the network ends then.
HOLD = WITHIN + 5


def _through(url: str, relay: SilentNetwork) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["host"], info["port"] = "127.0.0.1", str(relay.port)
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@pytest.fixture(name="relay")
async def fixture_relay(db: Database) -> AsyncIterator[SilentNetwork]:
    """A silent-able relay to the test database's server."""
    info = psycopg.conninfo.conninfo_to_dict(db.app_url)
    host, port = str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))
    async with SilentNetwork(host, port, hold=HOLD) as relay:
        yield relay


def _installed(
    kind: str, db: Database, relay: SilentNetwork, **options: Any
) -> tuple[SharedPool | PerUserPools, Registry]:
    """A pool of strategy ``kind`` through ``relay``, installed in a new registry."""
    common: dict[str, Any] = {
        "timeout": 5,
        "return_timeout": RETURN_TIMEOUT,
        "kwargs": db.kwargs(),
        "rls_check": "off",
        **options,
    }
    url = _through(db.app_url, relay)
    pool: SharedPool | PerUserPools = (
        SharedPool(url, min_size=0, max_size=2, **common)
        if kind == "shared"
        else PerUserPools(url, max_size=2, max_total=4, **common)
    )
    registry = Registry()
    pool.install(registry)
    return pool, registry


STRATEGIES = pytest.mark.parametrize("kind", ["shared", "per_user"])


async def _ends_in_time(work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work``; fail if it took ``WITHIN`` seconds or more.

    A give-back is shielded from cancellation and may freeze the whole event loop (a
    blocking C call), so no deadline in this process could end it: the relay thaws by
    itself after ``HOLD`` seconds, and a give-back that waited for the network ends late.
    """
    started = time.monotonic()
    await work()
    took = time.monotonic() - started
    assert took < WITHIN, f"the checkout ended {took:.1f} s after it started (bound {WITHIN} s)"


async def _recovers(
    pool: SharedPool | PerUserPools, registry: Registry, relay: SilentNetwork
) -> None:
    """Nothing is left checked out; once the network is back, a checkout gets a working
    connection with its user's settings."""
    assert pool.stats().checked_out == 0
    await relay.thaw()
    async with registry.open_scope(_ctx("bob")), connection() as conn:
        assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "bob"
    assert pool.stats().checked_out == 0
    await registry.aclose()


@STRATEGIES
async def test_commit_on_a_silent_network_ends_within_return_timeout(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """The block ends normally while the network is silent: the commit cannot finish, so
    the connection is closed at ``return_timeout`` and the caller hears that the commit's
    outcome is unknown (not that it failed, not nothing)."""
    pool, registry = _installed(kind, db, relay)
    caught: list[BaseException] = []

    async def work() -> None:
        async with registry.open_scope(_ctx("alice")):
            try:
                async with connection() as conn:
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')")
                    )
                    await relay.freeze()
            except psycopg.OperationalError as exc:
                caught.append(exc)

    await _ends_in_time(work)
    assert len(caught) == 1
    assert "may or may not" in str(caught[0])
    assert f"return_timeout={RETURN_TIMEOUT}" in str(caught[0])
    if isinstance(pool, SharedPool):
        assert pool.stats().discarded == 1
    await _recovers(pool, registry, relay)


@STRATEGIES
async def test_rollback_on_a_silent_network_ends_within_return_timeout(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """The block raises while the network is silent: its own error reaches the caller,
    unchanged, once the rollback has been given up at ``return_timeout``."""
    pool, registry = _installed(kind, db, relay)

    async def work() -> None:
        async with registry.open_scope(_ctx("alice")):
            with pytest.raises(LookupError, match="the handler's own"):
                async with connection() as conn:
                    await conn.execute("SELECT 1")
                    await relay.freeze()
                    raise LookupError("the handler's own error")

    await _ends_in_time(work)
    await _recovers(pool, registry, relay)


@STRATEGIES
async def test_cancelled_query_on_a_silent_network_ends_within_return_timeout(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """A request cancelled while its query waits on a silent network: the server-side
    cancel cannot get through either, and the give-back still ends at ``return_timeout``
    (it is shielded from the cancellation, so nothing else would end it)."""
    pool, registry = _installed(kind, db, relay)
    request = anyio.CancelScope()

    async def work() -> None:
        async with registry.open_scope(_ctx("alice")):
            with request:
                request.deadline = anyio.current_time() + 0.2
                async with connection() as conn:
                    await relay.freeze()
                    await conn.execute("SELECT 1")

    await _ends_in_time(work)
    assert request.cancelled_caught
    await _recovers(pool, registry, relay)


OPEN_TIMEOUT = 2.0


@STRATEGIES
async def test_first_requests_during_an_outage_fail_each_within_its_timeout(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """The database does not answer when the pool opens on first use (its row-level-security
    check needs a connection): each of several concurrent first requests gets
    PoolExhaustedError (a 503) within its own timeout, and the pool opens once the database
    answers. Before, psycopg's PoolTimeout escaped as is (a 500), and each SharedPool request
    waited for the failed opening and then tried again in turn: the last of N waited N
    timeouts."""
    pool, registry = _installed(kind, db, relay, timeout=OPEN_TIMEOUT, rls_check="warn")
    users = [f"user-{n}" for n in range(5)] if kind == "shared" else ["alice", "bob"] * 3
    took: list[float] = []
    errors: list[BaseException] = []
    await relay.freeze()

    async def request(user: str) -> None:
        started = time.monotonic()
        async with registry.open_scope(_ctx(user)):
            try:
                async with connection():
                    pass
            except Exception as exc:
                errors.append(exc)
        took.append(time.monotonic() - started)

    async with anyio.create_task_group() as tg:
        for user in users:
            tg.start_soon(request, user)
    assert [type(exc) for exc in errors] == [PoolExhaustedError] * len(users), errors
    assert max(took) < OPEN_TIMEOUT + 1.5, took
    assert not any(p.pool for p in getattr(pool, "_pools", ())), "a pool left open"
    await _recovers(pool, registry, relay)


@STRATEGIES
async def test_a_checkouts_own_timeout_bounds_the_pools_opening(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """``connection(timeout=...)`` shorter than the pool's ``timeout`` bounds the opening
    of the pool on first use too. Before, the opening waited for the pool's timeout."""
    pool, registry = _installed(kind, db, relay, timeout=10, rls_check="warn")
    await relay.freeze()
    started = time.monotonic()
    async with registry.open_scope(_ctx("alice")):
        with pytest.raises(PoolExhaustedError, match="could not be opened"):
            async with connection(timeout=0.5):
                pass
    assert time.monotonic() - started < 3
    await _recovers(pool, registry, relay)


def _opening(pool: SharedPool | PerUserPools) -> bool:
    """Whether ``pool`` (or, for PerUserPools, one of its users' pools) is opening."""
    if isinstance(pool, SharedPool):
        return pool._opening is not None and pool._opening.locked()
    return any(user_pool.opening is not None for user_pool in pool._pools)


@STRATEGIES
async def test_a_checkout_waiting_for_another_checkouts_opening_ends_at_its_own_timeout(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """A checkout with a short ``connection(timeout=...)`` that finds the pool opening for
    another checkout of the same user, one with a long timeout, waits for that opening no
    longer than its own timeout: it gets PoolExhaustedError while the other still waits."""
    pool, registry = _installed(kind, db, relay, timeout=OPEN_TIMEOUT * 3, rls_check="warn")
    await relay.freeze()
    opener_done = anyio.Event()
    outcome: list[BaseException] = []

    async def opener() -> None:
        async with registry.open_scope(_ctx("alice")):
            try:
                async with connection():
                    pass
            except PoolExhaustedError as exc:
                outcome.append(exc)
        opener_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(opener)
        with anyio.fail_after(OPEN_TIMEOUT):
            while not _opening(pool):
                await anyio.lowlevel.checkpoint()
        async with registry.open_scope(_ctx("alice")):
            with pytest.raises(PoolExhaustedError, match="within 0.5 s"):
                async with connection(timeout=0.5):
                    pass
        assert not opener_done.is_set(), "the short checkout waited for the whole opening"
    assert len(outcome) == 1, outcome
    await _recovers(pool, registry, relay)


@STRATEGIES
async def test_a_block_left_running_a_query_on_a_silent_network_is_not_a_silent_success(
    db: Database, relay: SilentNetwork, kind: str
) -> None:
    """The block writes a row, leaves a ``cursor.stream()`` loop before its end and ends
    normally, and the network goes silent: the query still running cannot be cancelled on
    the server, the give-back ends at ``return_timeout`` with the connection closed, and
    the caller hears that nothing was committed (the error of a block that cannot commit),
    not nothing."""
    pool, registry = _installed(kind, db, relay)
    caught: list[BaseException] = []

    async def work() -> None:
        async with registry.open_scope(_ctx("alice")):
            try:
                async with connection() as conn:
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')")
                    )
                    async for (n,) in conn.cursor().stream("SELECT generate_series(1, 100000)"):
                        if n == 3:
                            break
                    await relay.freeze()
            except psycopg.OperationalError as exc:
                caught.append(exc)

    await _ends_in_time(work)
    assert len(caught) == 1, caught
    assert "nothing of it was committed" in str(caught[0])
    await _recovers(pool, registry, relay)
    async with await psycopg.AsyncConnection.connect(db.admin_url) as admin:
        assert await _scalar(admin, db.sql("SELECT count(*) FROM {notes}")) == 0
