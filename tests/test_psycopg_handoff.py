"""What one user's checkout leaves in a connection never reaches the next user's.

Many users at once, each with its own identity, share few connections, so every
connection passes from user to user; each checkout leaves something behind in its
session and checks, before anything else, that nothing another user left is there.
PostgreSQL only (psycopg's async pool runs on asyncio: the trio parametrization is
skipped here, and the trio refusals are tested in test_psycopg.py).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest
from psycopg.rows import tuple_row
from psycopg_pool import PoolClosed

from ambient import Registry, UserRef, bind_context, resolve
from ambient.errors import RowSecurityError
from ambient.integrations.psycopg import PerUserPools, SharedPool
from tests.conftest import DATABASE_URL
from tests.test_psycopg import (
    Database,
    _admin,
    _ctx,
    _eventually,
    _scalar,
    _shared_idle,
    _url_for,
    make_database,
)

USERS = 12
# The cursors a session holds, not counting the unnamed portal of this very query.
_CURSORS = "SELECT count(*) FROM pg_catalog.pg_cursors WHERE name <> ''"
ROUNDS = 4


@pytest.fixture(name="db")
def fixture_db(anyio_backend: str) -> Iterator[Database]:
    """A fresh schema, tables and roles (asyncio only: the pools run on asyncio)."""
    if anyio_backend != "asyncio":
        pytest.skip("psycopg's async pool is asyncio-only (trio refusal: test_psycopg.py)")
    with make_database() as db:
        yield db


async def _each_user(work: Any) -> None:
    """Run ``work(user, round)`` for USERS users at once, ROUNDS times each in turn."""

    async def rounds(user: str) -> None:
        for turn in range(ROUNDS):
            with bind_context(_ctx(user), allow_switch=True):
                await work(user, turn)

    async with anyio.create_task_group() as tg:
        for n in range(USERS):
            tg.start_soon(rounds, f"user{n}")


async def test_a_held_cursor_left_by_a_handler_never_reaches_the_next_user(db: Database) -> None:
    """A handler declares a cursor WITH HOLD over its own rows and commits inside its
    checkout (which the checkout reports): the cursor outlives that transaction, and the
    next user of the connection must neither see it nor fetch the rows it holds. The
    handler's writes stay committed, and the checkout's error says only that it ended the
    transaction itself (no transaction was open to roll back as its block ended)."""
    async with SharedPool(
        db.app_url,
        min_size=2,
        max_size=2,
        per_user_limit=1,
        timeout=30,
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        fetched: Counter[str] = Counter()

        async def work(user: str, turn: int) -> None:
            with pytest.raises(psycopg.ProgrammingError, match="ended") as info:
                async with pool.connection() as conn:
                    assert await _scalar(conn, _CURSORS) == 0
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                        (user, f"{user}-{turn}"),
                    )
                    await conn.execute(
                        db.sql("DECLARE held CURSOR WITH HOLD FOR SELECT owner FROM {notes}")
                    )
                    await conn.commit()
                    cur = conn.cursor(row_factory=tuple_row)
                    await cur.execute("FETCH ALL FROM held")
                    owners = [owner for (owner,) in await cur.fetchall()]
                    assert owners == [user] * (turn + 1)
                    fetched[user] += 1
            # Nothing was open as the block ended: the error says nothing was rolled back.
            assert "rolled back" not in str(info.value)

        await _each_user(work)
        assert fetched == dict.fromkeys((f"user{n}" for n in range(USERS)), ROUNDS)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        assert pool.stats().discarded == 0


async def test_a_channel_a_handler_listens_on_never_reaches_the_next_user(db: Database) -> None:
    """Each user's handler listens on its own inbox channel and commits normally. The next
    user of the connection listens on nothing of another user's: a notification sent later
    to that inbox (a reset code, say) would otherwise arrive on the next user's connection,
    in its ``notifies()``."""
    async with SharedPool(
        db.app_url,
        min_size=2,
        max_size=2,
        per_user_limit=1,
        timeout=30,
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        listened: Counter[str] = Counter()

        async def work(user: str, turn: int) -> None:
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute("SELECT pg_catalog.pg_listening_channels()")
                assert await cur.fetchall() == []
                await conn.execute(f"LISTEN inbox_{user}")  # from its COMMIT on
                listened[user] += 1

        await _each_user(work)
        assert listened == dict.fromkeys((f"user{n}" for n in range(USERS)), ROUNDS)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        assert pool.stats().discarded == 0


async def test_the_last_sequence_value_a_user_drew_never_reaches_the_next_user(
    db: Database,
) -> None:
    """Each user inserts a note (drawing the next id from the notes' sequence). The next
    user of the connection has drawn nothing in its session: ``lastval()`` there would
    otherwise tell it another user's newest id, a row it may not see."""
    async with SharedPool(
        db.app_url,
        min_size=2,
        max_size=2,
        per_user_limit=1,
        timeout=30,
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        drawn: dict[str, list[int]] = {}

        async def work(user: str, turn: int) -> None:
            async with pool.connection() as conn:
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                    async with conn.transaction():  # a savepoint: the checkout goes on
                        await conn.execute("SELECT pg_catalog.lastval()")
                new = await _scalar(
                    conn,
                    db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s) RETURNING id"),
                    (user, f"{user}-{turn}"),
                )
                assert await _scalar(conn, "SELECT pg_catalog.lastval()") == new
                drawn.setdefault(user, []).append(new)

        await _each_user(work)
        ids = [new for news in drawn.values() for new in news]
        assert len(ids) == len(set(ids)) == USERS * ROUNDS
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        assert pool.stats().discarded == 0


async def test_transaction_characteristics_a_handler_set_never_reach_the_next_checkout(
    db: Database,
) -> None:
    """A handler of PerUserPools, between transactions of its checkout, makes its
    connection's next transactions SERIALIZABLE and DEFERRABLE (psycopg begins them with
    the connection's characteristics). The user's next checkout of that connection begins
    them as the pool made it: READ COMMITTED, not deferrable, where a serialization failure
    the application never expects cannot happen."""
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=USERS,
        timeout=30,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
    )
    registry = Registry()
    pools.install(registry)
    characteristics = (
        "SELECT current_setting('transaction_isolation'), "
        "current_setting('transaction_deferrable'), current_setting('app.user_id')"
    )
    served: Counter[str] = Counter()

    async def rounds(user: str) -> None:
        for _ in range(ROUNDS):
            async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                assert (conn.isolation_level, conn.deferrable) == (None, None)
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(characteristics)
                assert await cur.fetchone() == ("read committed", "off", user)
                await conn.commit()
                await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
                await conn.set_deferrable(True)
                await cur.execute(characteristics)
                assert await cur.fetchone() == ("serializable", "on", user)
                served[user] += 1

    try:
        async with anyio.create_task_group() as tg:
            for n in range(USERS):
                tg.start_soon(rounds, f"user{n}")
        assert served == dict.fromkeys((f"user{n}" for n in range(USERS)), ROUNDS)
        assert pools.stats().slots <= USERS
    finally:
        await registry.aclose()


@pytest.mark.parametrize("starts_as", ["its login", "another role"])
async def test_a_session_authorization_a_handler_set_never_reaches_the_next_user(
    db: Database, starts_as: str
) -> None:
    """A pool that logs in as a superuser (which ``rls_check`` only warns about, or not at
    all when off), its sessions maybe starting as an ordinary role (``-c role=...``): a
    handler runs ``SET SESSION AUTHORIZATION``, which the authenticated superuser allows
    whatever the current role, and which neither ``RESET ALL`` nor ``RESET ROLE`` undoes.
    The next user would run as that role, or with its rights: the connection is closed
    instead, every time."""
    login = psycopg.conninfo.conninfo_to_dict(DATABASE_URL)["user"]
    other = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    kwargs = db.kwargs()
    role = login
    if starts_as == "another role":
        kwargs["options"] = f"-c role={other}"
        role = other
    async with SharedPool(
        DATABASE_URL,
        min_size=2,
        max_size=2,
        per_user_limit=1,
        timeout=30,
        rls_check="off",
        kwargs=kwargs,
    ) as pool:
        switched: Counter[str] = Counter()

        async def work(user: str, turn: int) -> None:
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(
                    "SELECT session_user, current_user, current_setting('app.user_id')"
                )
                assert await cur.fetchone() == (login, role, user)
                await conn.execute(f'SET SESSION AUTHORIZATION "{other}"')
                await cur.execute("SELECT session_user, current_user")
                assert await cur.fetchone() == (other, other)
                switched[user] += 1

        await _each_user(work)
        assert switched == dict.fromkeys((f"user{n}" for n in range(USERS)), ROUNDS)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        assert pool.stats().discarded == USERS * ROUNDS


async def test_a_prepare_threshold_a_handler_set_never_reaches_the_next_user(
    db: Database,
) -> None:
    """A handler makes psycopg prepare every statement on its connection
    (``prepare_threshold = 0``). The next user's checkout of that connection prepares as
    the pool made it: a statement run once is not prepared on the server (behind a pooler
    that follows no prepared statements, one prepared would fail the next transaction)."""
    async with SharedPool(
        db.app_url,
        min_size=2,
        max_size=2,
        per_user_limit=1,
        timeout=30,
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        made: int | None = None
        prepared = "SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE statement LIKE %s"
        ran: Counter[str] = Counter()

        async def work(user: str, turn: int) -> None:
            nonlocal made
            async with pool.connection() as conn:
                if made is None:
                    made = conn.prepare_threshold
                assert conn.prepare_threshold == made
                mark = f"once_{user}_{turn}"
                assert await _scalar(conn, f"SELECT '{user}' AS {mark}") == user
                assert await _scalar(conn, prepared, (f"%{mark}%",)) == 0
                conn.prepare_threshold = 0
                mark = f"always_{user}_{turn}"
                assert await _scalar(conn, f"SELECT '{user}' AS {mark}") == user
                assert await _scalar(conn, prepared, (f"%{mark}%",)) == 1
                ran[user] += 1

        await _each_user(work)
        assert made is not None
        assert made > 0
        assert ran == dict.fromkeys((f"user{n}" for n in range(USERS)), ROUNDS)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        assert pool.stats().discarded == 0


async def test_a_users_share_stays_within_per_user_limit_as_places_are_handed_on(
    db: Database,
) -> None:
    """Six users, each with three checkouts at once, again and again, and
    per_user_limit=2 of a pool that could serve all: a place a checkout frees is handed to
    the user's one in line, and the checkout that freed it, back at once for another, waits
    in turn, though no other waits then. No user ever holds more than two
    connections (counted in the checkouts, and on the server by a lock each checkout of
    the user holds), and every checkout sees its own user's id."""
    users, limit = 6, 2
    tasks, rounds = limit + 1, 3 * ROUNDS
    key = zlib.crc32(db.schema.encode()) & 0x7FFFFFFF  # this test's locks only
    async with SharedPool(
        db.app_url,
        min_size=limit * users,
        max_size=limit * users + 4,
        per_user_limit=limit,
        timeout=30,
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        holding: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        served: Counter[str] = Counter()

        async def checkout(u: int) -> None:
            user = f"user{u}"
            with bind_context(_ctx(user), allow_switch=True):
                for _ in range(rounds):
                    async with pool.connection() as conn:
                        holding[user] += 1
                        peak[user] = max(peak[user], holding[user])
                        cur = conn.cursor(row_factory=tuple_row)
                        await cur.execute(
                            "SELECT pg_catalog.pg_advisory_xact_lock_shared(%s, %s)", (key, u)
                        )
                        await cur.execute(
                            "SELECT current_setting('app.user_id'), count(*) "
                            "FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
                            "AND classid = %s AND objid = %s AND objsubid = 2 AND granted",
                            (key, u),
                        )
                        (setting, holders) = await cur.fetchone() or (None, None)
                        assert (setting, holding[user]) == (user, min(holding[user], limit))
                        assert 1 <= holders <= limit
                        # Let the user's other checkouts queue up behind this one.
                        for _ in range(tasks):
                            await anyio.lowlevel.checkpoint()
                        holding[user] -= 1
                    served[user] += 1

        async with anyio.create_task_group() as tg:
            for u in range(users):
                for _ in range(tasks):
                    tg.start_soon(checkout, u)
        assert served == dict.fromkeys((f"user{u}" for u in range(users)), tasks * rounds)
        assert peak == dict.fromkeys((f"user{u}" for u in range(users)), limit)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")


async def test_user_pools_that_fail_to_open_give_their_room_back(db: Database) -> None:
    """Under max_total=2, the pools of six users fail to open one after another (their
    role bypasses row-level security, which ``rls_check="raise"`` refuses): each gives back
    the room it took for its first connection. Then six other users are all served at once,
    each with its own settings; the budget is whole again afterwards."""
    max_total = 2
    refused = [f"root{n}" for n in range(6)]

    def conninfo(user: UserRef) -> str:
        return DATABASE_URL if user.user_id.startswith("root") else db.app_url

    pools = PerUserPools(
        conninfo,
        max_size=1,
        max_total=max_total,
        timeout=10,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
    )
    registry = Registry()
    pools.install(registry)
    served: Counter[str] = Counter()

    async def serve(user: str) -> None:
        for _ in range(ROUNDS):
            async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id')") == user
                served[user] += 1

    try:
        for user in refused:
            with pytest.raises(RowSecurityError):
                async with registry.open_scope(_ctx(user)), pools.connection():
                    pass
            assert pools.stats().slots == 0
        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(serve, f"user{n}")
        assert served == dict.fromkeys((f"user{n}" for n in range(6)), ROUNDS)
        assert pools.stats().slots <= max_total
        assert pools.stats().checked_out == 0
    finally:
        await registry.aclose()
    assert pools.stats().slots == 0


async def test_per_user_pools_serve_users_that_each_log_in_as_a_role_of_their_own(
    db: Database,
) -> None:
    """A conninfo callable gives each user a login role of its own (the documented "a role
    per user"). Every user's pool connects and serves it as its own role, with its own
    settings, whichever user's pool connected first: the role a pool's sessions must keep
    starting as is the first one of the same login's, not the first of any user's."""
    app_role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    roles = {f"user{n}": f"{app_role}_login{n}" for n in range(USERS)}
    with _admin() as admin:
        for role in roles.values():
            admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS IN ROLE {app_role}")
    pools = PerUserPools(
        lambda user: _url_for(roles[user.user_id]),
        max_size=1,
        max_total=USERS,
        timeout=10,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
    )
    registry = Registry()
    pools.install(registry)
    served: Counter[str] = Counter()

    async def serve(user: str) -> None:
        for turn in range(ROUNDS):
            async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                await conn.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                    (user, f"{user}-{turn}"),
                )
                cur = conn.cursor(row_factory=tuple_row)
                await cur.execute(
                    db.sql(
                        "SELECT current_user, current_setting('app.user_id'), "
                        "(SELECT array_agg(DISTINCT owner) FROM {notes}), "
                        "(SELECT count(*) FROM {notes})"
                    )
                )
                assert await cur.fetchone() == (roles[user], user, [user], turn + 1)
                served[user] += 1

    try:
        async with anyio.create_task_group() as tg:
            for user in roles:
                tg.start_soon(serve, user)
        assert served == dict.fromkeys(roles, ROUNDS)
    finally:
        await registry.aclose()
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
                (list(roles.values()),),
            )
            for role in roles.values():
                admin.execute(f"DROP ROLE {role}")


def _gated(gate: anyio.Event, gated_conninfo: str) -> type[psycopg.AsyncConnection[Any]]:
    """A connection class whose connections to ``gated_conninfo`` wait for ``gate``."""

    class Gated(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            if conninfo == gated_conninfo:
                await gate.wait()
            return await super().connect(conninfo, **kwargs)

    return Gated


async def _serve_users(registry: Registry, pools: PerUserPools, users: list[str]) -> None:
    """Each of ``users`` at once, ROUNDS checkouts each, every one seeing its own id."""
    served: Counter[str] = Counter()

    async def serve(user: str) -> None:
        for _ in range(ROUNDS):
            async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id')") == user
                served[user] += 1

    async with anyio.create_task_group() as tg:
        for user in users:
            tg.start_soon(serve, user)
    assert served == dict.fromkeys(users, ROUNDS)


async def test_room_a_failed_opening_gives_back_goes_to_the_checkouts_waiting_for_it(
    db: Database,
) -> None:
    """max_total=1: a user's pool takes the only room and fails to open (its role bypasses
    row-level security) while four other users' checkouts wait for room. The room it gives
    back wakes them: all are served, in turn, well within their timeout."""
    gate = anyio.Event()

    def conninfo(user: UserRef) -> str:
        return DATABASE_URL if user.user_id == "root" else db.app_url

    pools = PerUserPools(
        conninfo,
        max_size=1,
        max_total=1,
        timeout=10,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
        connection_class=_gated(gate, DATABASE_URL),
    )
    registry = Registry()
    pools.install(registry)
    users = [f"user{n}" for n in range(4)]

    async def refused() -> None:
        with pytest.raises(RowSecurityError):
            async with registry.open_scope(_ctx("root")), pools.connection():
                pass

    async def waiting(count: int) -> bool:
        return pools.stats().waiting == count

    async def room_taken() -> bool:
        return pools.stats().slots == 1

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(refused)
            await _eventually(room_taken, "the refused user's pool took the room")
            tg.start_soon(_serve_users, registry, pools, users)
            await _eventually(lambda: waiting(len(users)), "every other user waits for room")
            gate.set()
        assert pools.stats().checked_out == 0
    finally:
        await registry.aclose()
    assert pools.stats().slots == 0


async def test_a_user_pool_closed_while_it_opens_gives_its_room_back(db: Database) -> None:
    """max_total=1: a user's pool is closed (its user evicted) while it opens; the opening
    ends with PoolClosed for that checkout, closes what it opened and gives the room back,
    so that other users are served next."""
    gate = anyio.Event()
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=1,
        timeout=10,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
        connection_class=_gated(gate, db.app_url),
    )
    registry = Registry()
    pools.install(registry)

    async def evicted() -> None:
        async with registry.open_scope(_ctx("leaving")):
            user_pool = await resolve(pools)
            async with anyio.create_task_group() as tg:

                async def checkout() -> None:
                    with pytest.raises(PoolClosed):
                        async with pools.connection():
                            pass

                tg.start_soon(checkout)
                await _eventually(room_taken, "the pool took its room and opens")
                await user_pool.aclose()  # the USER component's cleanup
                gate.set()

    async def room_taken() -> bool:
        return pools.stats().slots == 1

    try:
        await evicted()
        assert pools.stats().slots == 0
        await _serve_users(registry, pools, [f"user{n}" for n in range(4)])
    finally:
        await registry.aclose()
    assert pools.stats().slots == 0


async def test_a_checkout_of_a_user_pool_already_closed_connects_nothing(db: Database) -> None:
    """A checkout in a scope whose user's pool was closed already (the user evicted while
    the request runs) ends with PoolClosed at once: no pool opens for it, no connection is
    attempted (one would wait for a gate that never opens), and no room is taken."""
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=1,
        timeout=2,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
        connection_class=_gated(anyio.Event(), db.app_url),
    )
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("leaving")):
            user_pool = await resolve(pools)
            await user_pool.aclose()  # the USER component's cleanup
            with anyio.fail_after(1), pytest.raises(PoolClosed, match="pool was closed"):
                async with pools.connection():
                    pytest.fail("the user's pool was closed")
        assert pools.stats().slots == 0
    finally:
        await registry.aclose()
