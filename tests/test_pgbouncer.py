"""Both pool strategies behind pgbouncer in transaction pooling mode.

pgbouncer (``pool_mode = transaction``, two server connections) stands between the pools
and PostgreSQL, so every transaction of a client connection may run on another server
session, one that other users' transactions used a moment ago. Fifty users at once, two
thousand checkouts: every statement must see only its own user's settings and rows, and no
server session may keep a setting for the next client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.abc import Query
from psycopg.rows import dict_row

from ambient import Registry, UserExecutionContext
from ambient.errors import PoolExhaustedError
from ambient.integrations.psycopg import PerUserPools, SharedPool, connection
from ambient.integrations.psycopg._common import _DEALLOCATE_FROM_SQL, _end_and_reset
from tests.conftest import service_unavailable
from tests.servers import free_port, stop, wait_listening
from tests.test_psycopg import (
    Database,
    _admin,
    _admin_scalar,
    _commit_waits_for_its_lock,
    _eventually,
    _query_stopped,
    _scalar,
    make_database,
)

USERS = 50
CHECKOUTS = 40
SERVER_CONNECTIONS = 2


@contextmanager
def pgbouncer(db: Database, port: int | None = None, *, dbname: str = "test") -> Iterator[str]:
    """pgbouncer in transaction mode in front of the test database (or ``dbname``, under
    the name ``test``), logging in as the test's app role, on ``port`` (default: a free
    one); yields the conninfo clients use."""
    binary = shutil.which("pgbouncer")
    if binary is None:
        service_unavailable("pgbouncer", "the pgbouncer program is not installed")
        raise AssertionError  # unreachable: service_unavailable skips or fails
    role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    port = free_port() if port is None else port
    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o777)  # pgbouncer refuses to run as root: it runs as postgres
        ini = Path(folder, "pgbouncer.ini")
        ini.write_text(
            "[databases]\n"
            f"test = host=127.0.0.1 port=5432 dbname={dbname} user={role}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"admin_users = {role}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {SERVER_CONNECTIONS}\n"
            "max_client_conn = 500\n"
            f"logfile = {folder}/pgbouncer.log\n"
        )
        command = [binary, str(ini)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # noqa: S603
        try:
            wait_listening(port, process)
            yield f"host=127.0.0.1 port={port} dbname=test user={role}"
        finally:
            stop(process)


@pytest.fixture(name="bounced")
def fixture_bounced(anyio_backend: str) -> Iterator[tuple[Database, str]]:
    """A fresh database with every user's note, and pgbouncer in front of it."""
    if anyio_backend != "asyncio":
        pytest.skip("psycopg's async pool is asyncio-only (trio refusal: test_*_trio)")
    with make_database() as db, pgbouncer(db) as url:
        with _admin() as admin:
            for n in range(USERS):
                admin.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                    (f"user-{n}", f"note of user-{n}"),
                )
        yield db, url


async def _many_users(registry: Registry, db: Database) -> list[str]:
    """USERS users at once, CHECKOUTS checkouts each; what any of them saw wrong."""
    wrong: list[str] = []

    async def user(n: int) -> None:
        name = f"user-{n}"
        for i in range(CHECKOUTS):
            async with registry.open_scope(UserExecutionContext.create(name)):
                try:
                    async with connection() as conn:
                        cur = await conn.execute("SELECT current_setting('app.user_id', true)")
                        setting = await cur.fetchone()
                        await anyio.lowlevel.checkpoint()  # let the others interleave
                        cur = await conn.execute(db.sql("SELECT owner FROM {notes}"))
                        owners = [row[0] for row in await cur.fetchall()]
                except psycopg.Error as error:
                    wrong.append(f"{name} #{i}: {type(error).__name__}: {error}")
                    continue
                if setting != (name,) or owners != [name]:
                    wrong.append(f"{name} #{i}: setting {setting}, rows of {owners}")

    async with anyio.create_task_group() as tg:
        for n in range(USERS):
            tg.start_soon(user, n)
    return wrong


async def _server_sessions(url: str) -> list[tuple[Any, ...]]:
    """What plain clients of pgbouncer find in each of its server sessions: the role, the
    search_path, the advisory locks held and the ``app.user_id`` setting (one client per
    session, each holding its session in a transaction while the others take theirs)."""
    seen: dict[int, tuple[Any, ...]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(SERVER_CONNECTIONS):
            conn = await stack.enter_async_context(await psycopg.AsyncConnection.connect(url))
            cur = await conn.execute(
                "SELECT pg_backend_pid(), current_user, current_setting('search_path'), "
                "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid()), current_setting('app.user_id', true)",
                prepare=False,
            )
            row = await cur.fetchone()
            assert row is not None
            seen[row[0]] = row[1:]
    assert len(seen) == SERVER_CONNECTIONS
    return list(seen.values())


async def _no_session_settings(url: str) -> list[Any]:
    """The ``app.user_id`` settings left in pgbouncer's server sessions (none may be)."""
    return [setting for *_, setting in await _server_sessions(url) if setting]


def _rls_pool(
    db: Database,
    url: str,
    strategy: str,
    *,
    shared: dict[str, int],
    kwargs: dict[str, Any] | None = None,
) -> SharedPool | PerUserPools:
    """A pool of ``strategy`` through the pooler at ``url``, checking the notes table's
    row-level security; ``shared`` sizes a SharedPool (a PerUserPools gets 2 per user);
    ``kwargs``: more connection arguments."""
    options: dict[str, Any] = {
        "rls_tables": [db.notes],
        "rls_check": "raise",
        "kwargs": {**db.kwargs(), "prepare_threshold": None, **(kwargs or {})},
    }
    if strategy == "shared":
        return SharedPool(url, **shared, **options)
    return PerUserPools(url, max_size=2, max_total=20, **options)


def _registry(pool: SharedPool | PerUserPools) -> Registry:
    registry = Registry()
    pool.install(registry)
    return registry


def _every_session_pool(db: Database, url: str, strategy: str) -> SharedPool | PerUserPools:
    """A pool of ``strategy`` ("shared" or "per_user") through the pooler at ``url`` that
    one user may fill with every server session, with no prepared statements and no RLS
    check."""
    options: dict[str, Any] = {
        "rls_check": "off",
        "kwargs": {**db.kwargs(), "prepare_threshold": None},
    }
    if strategy == "shared":
        return SharedPool(
            url, max_size=SERVER_CONNECTIONS, per_user_limit=SERVER_CONNECTIONS, **options
        )
    return PerUserPools(url, max_size=SERVER_CONNECTIONS, **options)


SETTING = "SELECT current_setting('app.user_id', true)"


async def _read(registry: Registry, user: str, query: Query) -> list[tuple[Any, ...]]:
    """The rows of ``query`` in one checkout of ``user``."""
    async with (
        registry.open_scope(UserExecutionContext.create(user)),
        connection() as conn,
    ):
        cur = await conn.execute(query, prepare=False)
        return await cur.fetchall()


async def _read_once(registry: Registry, user: str, query: Query) -> list[tuple[Any, ...]]:
    """:func:`_read`, and the registry is closed after."""
    try:
        return await _read(registry, user, query)
    finally:
        await registry.aclose()


def _pooler_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "connection pooler" in r.getMessage()]


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_both_strategies_behind_transaction_pooling(
    bounced: tuple[Database, str], caplog: pytest.LogCaptureFixture, strategy: str
) -> None:
    """2,000 checkouts of 50 users through pgbouncer's two server sessions: each sees only
    its own setting and row, nothing fails, and no server session keeps a setting; the
    pooler is recognised and reported once. PerUserPools, whose connections carry session
    settings when they reach PostgreSQL directly, sets them in every checkout's
    transaction here (with session settings most checkouts saw another user's)."""
    db, url = bounced
    pool = _rls_pool(db, url, strategy, shared={"max_size": 10, "per_user_limit": 10})
    registry = _registry(pool)
    with caplog.at_level(logging.WARNING, logger="ambient"):
        try:
            assert await _many_users(registry, db) == []
            if isinstance(pool, SharedPool):
                assert pool.stats().discarded == 0
        finally:
            await registry.aclose()
    assert await _no_session_settings(url) == []
    warnings = _pooler_warnings(caplog)
    assert len(warnings) == 1
    assert "prepare_threshold" not in warnings[0]


async def test_per_user_pools_direct_keep_session_settings(
    bounced: tuple[Database, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Connected directly, PerUserPools sees no pooler and sets the settings once per
    session, as before: a statement outside any transaction still sees them."""
    db, _ = bounced
    pools = PerUserPools(db.app_url, kwargs={**db.kwargs(), "autocommit": True})
    registry = _registry(pools)
    query = "SELECT current_setting('app.user_id', true)"
    with caplog.at_level(logging.WARNING, logger="ambient"):
        assert await _read_once(registry, "user-7", query) == [("user-7",)]
    assert _pooler_warnings(caplog) == []


async def test_per_user_pools_refuse_autocommit_behind_a_pooler(
    bounced: tuple[Database, str],
) -> None:
    """With autocommit the settings of one transaction would not cover the next
    statement: behind a pooler the checkout refuses, and its connection goes back."""
    db, url = bounced
    pools = PerUserPools(url, kwargs={**db.kwargs(), "autocommit": True, "prepare_threshold": None})
    registry = _registry(pools)
    try:
        async with registry.open_scope(UserExecutionContext.create("user-1")):
            with pytest.raises(psycopg.ProgrammingError, match="autocommit"):
                async with connection():
                    pytest.fail("the checkout must not start")
            assert pools.stats().checked_out == 0
    finally:
        await registry.aclose()


@pytest.mark.parametrize("autocommit", [False, True])
async def test_per_user_pools_with_no_settings_set_none_behind_a_pooler(
    bounced: tuple[Database, str], autocommit: bool
) -> None:
    """With no settings to set (``settings={}``), a checkout behind the pooler sends no
    statement to set them in its transaction: its block runs, and commits, as any other;
    with autocommit too, which is refused only where settings would be lost."""
    db, url = bounced
    pools = PerUserPools(
        url,
        settings={},
        kwargs={**db.kwargs(), "prepare_threshold": None, "autocommit": autocommit},
    )
    registry = _registry(pools)
    try:
        async with registry.open_scope(UserExecutionContext.create("user-1")):
            for _ in range(2):
                async with connection() as conn:
                    assert await (await conn.execute("SELECT 1")).fetchall() == [(1,)]
            assert pools.stats().checked_out == 0
    finally:
        await registry.aclose()


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_connections_made_with_dict_rows_behind_a_pooler(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """Behind the pooler, with connections that return dicts (``row_factory=dict_row``):
    ten users at once, three checkouts each, get dict rows of their own row only, every
    checkout commits without error, and no server session keeps a setting. Before,
    PerUserPools read the statement that sets a checkout's settings, and the one that
    commits it, by position: every checkout failed."""
    db, url = bounced
    kwargs = {**db.kwargs(), "prepare_threshold": None, "row_factory": dict_row}
    options: dict[str, Any] = {"rls_tables": [db.notes], "rls_check": "raise", "kwargs": kwargs}
    pool: SharedPool | PerUserPools = (
        SharedPool(url, max_size=4, per_user_limit=2, **options)
        if strategy == "shared"
        else PerUserPools(url, max_size=1, max_total=10, **options)
    )
    registry = _registry(pool)
    query = db.sql("SELECT owner, current_setting('app.user_id', true) AS setting FROM {notes}")
    seen: dict[str, list[Any]] = {}

    async def user(name: str) -> None:
        for _ in range(3):
            async with (
                registry.open_scope(UserExecutionContext.create(name)),
                connection() as conn,
            ):
                cur = await conn.execute(query, prepare=False)
                seen.setdefault(name, []).append(await cur.fetchall())

    users = [f"user-{n}" for n in range(10)]
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for name in users:
                    tg.start_soon(user, name)
    finally:
        await registry.aclose()
    assert seen == {name: [[{"owner": name, "setting": name}]] * 3 for name in users}
    assert await _no_session_settings(url) == []


async def test_prepared_statements_behind_a_pooler_are_warned_about(
    bounced: tuple[Database, str], caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg prepares statements by default, which pgbouncer before 1.21 cannot follow
    across server sessions: opening a pool through one says how to turn that off."""
    db, url = bounced
    pool = SharedPool(url, rls_check="off", kwargs=db.kwargs())
    registry = _registry(pool)
    query = db.sql("SELECT owner FROM {notes}")
    with caplog.at_level(logging.WARNING, logger="ambient"):
        assert await _read_once(registry, "user-1", query) == [("user-1",)]
    warnings = _pooler_warnings(caplog)
    assert len(warnings) == 1
    assert "'prepare_threshold': None" in warnings[0]


async def test_a_pooler_logging_in_under_another_name_keeps_clean_connections(
    bounced: tuple[Database, str], caplog: pytest.LogCaptureFixture
) -> None:
    """pgbouncer logs in to PostgreSQL as the app role whatever name its client gives
    (``user=`` in ``[databases]``; hosted poolers' ``role.project`` names do the same):
    SharedPool's reset check expects the server session's login, not the client's, so
    a clean connection is reused rather than closed after every checkout."""
    db, url = bounced
    client_url = psycopg.conninfo.make_conninfo(url, user="frontend")
    pool = SharedPool(
        client_url,
        min_size=1,
        max_size=1,
        rls_tables=[db.notes],
        rls_check="raise",
        kwargs={**db.kwargs(), "prepare_threshold": None},
    )
    registry = _registry(pool)
    with caplog.at_level(logging.WARNING, logger="ambient"):
        try:
            for _ in range(5):
                assert await _read(registry, "user-4", SETTING) == [("user-4",)]
            stats = pool.stats()
        finally:
            await registry.aclose()
    assert stats.discarded == 0
    assert [r for r in caplog.records if "instead of reusing" in r.getMessage()] == []


@contextlib.asynccontextmanager
async def _bypassing_sessions(
    db: Database, url: str
) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """What makes the pooler's new server sessions start as a BYPASSRLS role the app role
    of ``url`` is a member of (``ALTER ROLE ... SET role``, then pgbouncer's ``RECONNECT``),
    to be called while a pool is in use; it returns that role. On the way out, after the
    test has closed its pools, the app role's sessions start as themselves again and the
    role is dropped."""
    app_role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    bypass = f"{app_role}_bypass"

    async def start() -> str:
        with _admin() as admin:
            admin.execute(f"CREATE ROLE {bypass} NOLOGIN BYPASSRLS")
            admin.execute(f"GRANT USAGE ON SCHEMA {db.schema} TO {bypass}")
            admin.execute(db.sql("GRANT SELECT ON {notes} TO ") + sql.Identifier(bypass))
            admin.execute(f"GRANT {bypass} TO {app_role}")
            admin.execute(f"ALTER ROLE {app_role} SET role = {bypass}")
        console = psycopg.conninfo.make_conninfo(url, dbname="pgbouncer")
        async with await psycopg.AsyncConnection.connect(console, autocommit=True) as conn:
            # Every server session is closed once released: the next ones are new.
            await conn.execute("RECONNECT test", prepare=False)
        return bypass

    try:
        yield start
    finally:
        with _admin() as admin:
            admin.execute(f"ALTER ROLE {app_role} RESET role")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = %s AND pid <> pg_backend_pid()",
                (app_role,),
            )
            if admin.execute("SELECT FROM pg_roles WHERE rolname = %s", (bypass,)).fetchone():
                admin.execute(f"DROP OWNED BY {bypass}")
                admin.execute(f"DROP ROLE {bypass}")


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_server_session_that_starts_as_another_role_is_refused_at_checkout(
    bounced: tuple[Database, str], caplog: pytest.LogCaptureFixture, strategy: str
) -> None:
    """The app role's sessions are made to start as a BYPASSRLS role it is a member of
    (``ALTER ROLE ... SET role``) while the pool is in use, and pgbouncer opens new server
    sessions, which start as that role, under client connections the pool checked when
    they connected. The next checkout is refused before its block runs, with an error
    naming both roles, and so is the next one (SharedPool closes the connection, whose
    reset finds it running as that role, and refuses new ones as they connect). Before, it
    ran as the bypassing role and read every user's rows."""
    db, url = bounced
    app_role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    pool = _rls_pool(db, url, strategy, shared={"max_size": 2, "timeout": 2})
    registry = _registry(pool)
    notes = db.sql("SELECT current_user, owner FROM {notes}")
    outcomes: list[Any] = []
    async with _bypassing_sessions(db, url) as start_bypassing:
        try:
            assert await _read(registry, "user-1", notes) == [(app_role, "user-1")]
            bypass = await start_bypassing()
            with caplog.at_level(logging.ERROR, logger="ambient"):
                for _ in range(2):
                    try:
                        outcomes.append(await _read(registry, "user-1", notes))
                    except psycopg.OperationalError as error:
                        outcomes.append(str(error))
                    except PoolExhaustedError:
                        outcomes.append("unavailable")
            discarded = pool.stats().discarded if isinstance(pool, SharedPool) else None
        finally:
            await registry.aclose()
    refused = f"began as role {bypass!r}, not {app_role!r}"
    assert len(outcomes) == 2
    assert refused in str(outcomes[0])
    # Again: SharedPool's new connections to the pooler start as that role too, and are
    # refused as they connect (a 503) unless the pool still held another to refuse here.
    assert refused in str(outcomes[1]) or (strategy == "shared" and outcomes[1] == "unavailable")
    assert [r for r in caplog.records if r.levelno == logging.ERROR and bypass in r.getMessage()]
    # SharedPool closes the connections (the reset check finds them running as the
    # bypassing role); PerUserPools keeps them, rolled back and reset, refusing each time.
    assert discarded in ((None,) if strategy == "per_user" else (1, 2))


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_with_no_settings_a_connection_begun_as_another_role_is_refused(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """As above, with ``settings={}`` (an application whose policies read ``current_user``,
    say): the checkout that meets a server connection started as the bypassing role is
    refused before its block runs all the same. Before, PerUserPools read nothing as such
    a checkout began, and its block ran as that role."""
    db, url = bounced
    app_role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    options: dict[str, Any] = {
        "settings": {},
        "rls_check": "off",
        "kwargs": {**db.kwargs(), "prepare_threshold": None},
    }
    pool: SharedPool | PerUserPools = (
        SharedPool(url, max_size=2, timeout=2, **options)
        if strategy == "shared"
        else PerUserPools(url, max_size=2, max_total=20, **options)
    )
    registry = _registry(pool)
    async with _bypassing_sessions(db, url) as start_bypassing:
        try:
            assert await _read(registry, "user-1", "SELECT current_user") == [(app_role,)]
            bypass = await start_bypassing()
            refused = f"began as role {bypass!r}, not {app_role!r}"
            with pytest.raises(psycopg.OperationalError, match=refused):
                await _read(registry, "user-1", "SELECT current_user")
        finally:
            await registry.aclose()


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("then", ["statement", "nothing", "write"])
async def test_a_transaction_ended_inside_the_checkout_is_reported(
    bounced: tuple[Database, str], strategy: str, then: str
) -> None:
    """Behind the pooler the settings last one transaction, for both strategies: after the
    handler's own conn.commit() a statement sees no user setting and no row (the policy
    fails closed), and the checkout says so when it ends instead of passing silently, as
    it does when the commit was the block's last statement. What the handler wrote in a
    transaction it began after its commit, without the settings, is rolled back with the
    error (it was committed)."""
    db, url = bounced
    pool = _rls_pool(db, url, strategy, shared={"max_size": 2, "per_user_limit": 2})
    registry = _registry(pool)
    seen: list[Any] = []
    deferred = sql.Identifier(db.schema, "deferred")
    insert = sql.SQL("INSERT INTO {} VALUES (3)").format(deferred)
    try:
        async with registry.open_scope(UserExecutionContext.create("user-3")):
            with pytest.raises(psycopg.ProgrammingError, match="ended inside"):
                async with connection() as conn:
                    query = db.sql(
                        "SELECT current_setting('app.user_id', true), count(*) FROM {notes}"
                    )
                    seen.append(await (await conn.execute(query, prepare=False)).fetchone())
                    await conn.commit()
                    if then == "statement":
                        seen.append(await (await conn.execute(query, prepare=False)).fetchone())
                    elif then == "write":
                        # In a transaction of its own: a SharedPool connection autocommits
                        # outside the one the checkout began.
                        await conn.execute("BEGIN", prepare=False)
                        await conn.execute(insert, prepare=False)
            assert pool.stats().checked_out == 0
    finally:
        await registry.aclose()
    assert seen[0] == ("user-3", 1)
    after = [[(None, 0)], [("", 0)]] if then == "statement" else [[]]
    assert seen[1:] in after
    async with await psycopg.AsyncConnection.connect(db.admin_url) as admin:
        assert await _scalar(admin, sql.SQL("SELECT count(*) FROM {}").format(deferred)) == 0


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("outcome", ["commit", "rollback", "failed commit"])
async def test_session_state_a_checkout_leaves_stays_out_of_the_pooler(
    bounced: tuple[Database, str], strategy: str, outcome: str
) -> None:
    """A handler switches role, changes the search_path and takes a session advisory lock
    in every server session of the pooler: when its checkout ends, committed, rolled back
    or failing to commit (a deferred constraint), none of it stays in the session the
    pooler hands the next client (closing the client connection would not undo it: the
    pooler keeps the server session)."""
    db, url = bounced
    app_role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    other = f"{app_role}_other"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {other} NOLOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"GRANT {other} TO {app_role}")
    clean = {row[:3] for row in await _server_sessions(url)}
    pool = _every_session_pool(db, url, strategy)
    registry = _registry(pool)
    rolled_back = (
        pytest.raises(LookupError)
        if outcome == "rollback"
        else pytest.raises(psycopg.errors.UniqueViolation)
        if outcome == "failed commit"
        else contextlib.nullcontext()
    )
    deferred = psycopg.sql.Identifier(db.schema, "deferred")
    try:
        # Every server session at once: one checkout each, held together.
        with rolled_back:
            async with (
                registry.open_scope(UserExecutionContext.create("user-1")),
                connection() as first,
                connection() as second,
            ):
                for key, conn in enumerate((first, second)):
                    if outcome == "failed commit":  # checked only when the checkout commits
                        insert = psycopg.sql.SQL("INSERT INTO {} VALUES (%s)").format(deferred)
                        await conn.execute(insert, (key,), prepare=False)
                        await conn.execute(insert, (key,), prepare=False)
                    await conn.execute(f"SET ROLE {other}", prepare=False)
                    await conn.execute("SET search_path = pg_catalog", prepare=False)
                    await conn.execute("SELECT pg_advisory_lock(%s)", (key,), prepare=False)
                    cur = await conn.execute("SELECT current_user", prepare=False)
                    assert await cur.fetchone() == (other,)
                if outcome == "rollback":
                    raise LookupError(outcome)
        left = {row[:3] for row in await _server_sessions(url)}
    finally:
        await registry.aclose()
    with _admin() as admin:
        admin.execute(f"DROP ROLE {other}")
    assert left == clean == {(app_role, '"$user", public', 0)}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_the_settings_end_with_the_transaction_behind_a_pooler_though_the_reset_fails(
    bounced: tuple[Database, str], strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a pooler, either strategy sets the settings for the checkout's transaction
    only, so a reset that fails right after the commit (made to fail here) still leaves no
    user's id in the server sessions the pooler hands its next clients, who may never set
    one of their own."""
    from ambient.integrations.psycopg import _common

    db, url = bounced
    pool = _every_session_pool(db, url, strategy)
    registry = _registry(pool)
    failing = "SELECT 1 / 0"
    if isinstance(pool, SharedPool):
        pool._reset_sql = pool._deallocated_reset_sql = failing
    else:
        monkeypatch.setattr(_common, "_POOLED_RESET", failing)
    try:
        # Every server session at once: one checkout each, held together.
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with (
                registry.open_scope(UserExecutionContext.create("user-1")),
                connection() as first,
                connection() as second,
            ):
                for conn in (first, second):
                    cur = await conn.execute(SETTING, prepare=False)
                    assert await cur.fetchone() == ("user-1",)
        left = await _no_session_settings(url)
    finally:
        monkeypatch.undo()
        await registry.aclose()
    assert left == []


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_pipeline_left_open_leaves_nothing_to_the_pooler(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """A handler takes a session advisory lock in every server session of the pooler, then
    enters ``conn.pipeline()`` and never leaves it: the message that ends the checkout
    (COMMIT and reset) would be queued, not run. The block raises (before, it ended as if
    committed), and no server session keeps the lock: the connection is closed in its
    transaction, and the pooler drops the session."""
    db, url = bounced
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    pool = _every_session_pool(db, url, strategy)
    registry = _registry(pool)
    left_open = []
    try:
        with pytest.raises(psycopg.OperationalError, match="pipeline"):
            async with (
                registry.open_scope(UserExecutionContext.create("user-1")),
                connection() as first,
                connection() as second,
            ):
                for key, conn in enumerate((first, second)):
                    await conn.execute("SELECT pg_advisory_lock(%s)", (key,), prepare=False)
                    left_open.append(conn.pipeline())
                    pipeline = await left_open[-1].__aenter__()
                    await conn.execute("SELECT 1", prepare=False)
                    await pipeline.sync()
        sessions = {row[:3] for row in await _server_sessions(url)}
    finally:
        for pipeline_block in left_open:
            with contextlib.suppress(psycopg.Error):
                await pipeline_block.__aexit__(None, None, None)
        await registry.aclose()
    assert sessions == {(role, '"$user", public', 0)}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_session_state_left_before_a_commit_inside_the_checkout_is_reset(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """A handler leaves session state (search_path, a session setting, a temporary table,
    LISTEN, a session advisory lock, a statement from SQL PREPARE) and then ends the
    checkout's transaction itself (conn.commit()): the checkout says so when it ends, and
    resets the server session the pooler gives it then (the one just left, with no other
    client in between), as when it commits itself. Before, PerUserPools left all of it to
    the pooler's next client, another user's checkout."""
    db, url = bounced
    pool = _rls_pool(db, url, strategy, shared={"max_size": 1})
    registry = _registry(pool)
    try:
        async with registry.open_scope(UserExecutionContext.create("user-1")):
            with pytest.raises(psycopg.ProgrammingError, match="ended inside"):
                async with connection() as conn:
                    for statement in (
                        "SET search_path = pg_catalog",
                        "SET app.user_id = 'user-1'",
                        "CREATE TEMP TABLE scratch (x int)",
                        "LISTEN leaked",
                        "SELECT pg_advisory_lock(1)",
                        "PREPARE leaked AS SELECT 1",
                    ):
                        await conn.execute(statement, prepare=False)
                    await conn.commit()
        left = await _server_sessions(url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as plain:
            cur = await plain.execute(
                "SELECT pg_catalog.to_regclass('pg_temp.scratch'), "
                "(SELECT count(*) FROM pg_catalog.pg_listening_channels()), "
                "(SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)",
                prepare=False,
            )
            leftovers = await cur.fetchone()
    finally:
        await registry.aclose()
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    assert {(row[0], row[1], row[2], row[3] or None) for row in left} == {
        (role, '"$user", public', 0, None)
    }
    assert leftovers == (None, 0, 0)


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_connections_a_restarted_pooler_dropped_are_replaced_unseen(
    anyio_backend: str, strategy: str
) -> None:
    """pgbouncer restarts while the pools hold idle connections to it, which it dropped:
    the next checkouts, of several users, each get a working connection with their
    settings. Before, each dropped connection failed one request (the checkout's own first
    statement, before its block ran)."""
    if anyio_backend != "asyncio":
        pytest.skip("psycopg's async pool is asyncio-only (trio refusal: test_*_trio)")
    users = [f"user-{n}" for n in range(4)]
    port = free_port()
    with make_database() as db:
        options: dict[str, Any] = {"rls_check": "off", "kwargs": {"prepare_threshold": None}}
        with pgbouncer(db, port) as url:
            pool: SharedPool | PerUserPools = (
                SharedPool(url, min_size=3, max_size=3, **options)
                if strategy == "shared"
                else PerUserPools(url, min_size=2, max_size=2, **options)
            )
            registry = _registry(pool)
            for user in users:
                assert await _read(registry, user, SETTING) == [(user,)]
        try:
            with pgbouncer(db, port):
                for user in users * 2:
                    assert await _read(registry, user, SETTING) == [(user,)]
        finally:
            await registry.aclose()


@pytest.mark.parametrize("cursors", ["psycopg's", "raw"])
@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_cancelled_query_stops_on_the_server_behind_a_pooler(
    bounced: tuple[Database, str], strategy: str, cursors: str
) -> None:
    """A request cancelled while its query runs (holding a row lock): the query stops on the
    server and the lock is free for the next request. psycopg gives up on such a query and
    closes the connection, and pgbouncer drops a cancel request for a client that is gone:
    before, the query ran on to its end, holding the lock. The same when the application's
    cursors bind ``$1`` placeholders (``cursor_factory=AsyncRawCursor``): before, the
    cancel, sent with ``%s`` through such a cursor, failed unseen, and PerUserPools could
    set no checkout's settings."""
    db, url = bounced
    kwargs = {"cursor_factory": psycopg.AsyncRawCursor} if cursors == "raw" else {}
    pool = _rls_pool(db, url, strategy, shared={"max_size": 4}, kwargs=kwargs)
    registry = _registry(pool)
    marker = f"cancel-{uuid.uuid4().hex}"
    try:
        async with registry.open_scope(UserExecutionContext.create("user-1")):
            with anyio.move_on_after(0.5) as request:
                async with connection() as conn:
                    await conn.execute(db.sql("SELECT * FROM {notes} FOR UPDATE"), prepare=False)
                    await conn.execute(f"SELECT pg_sleep(30) /* {marker} */", prepare=False)
            assert request.cancelled_caught
        await _query_stopped(db, marker)
        async with (
            registry.open_scope(UserExecutionContext.create("user-1")),
            connection() as conn,
        ):
            await conn.execute("SET LOCAL lock_timeout = '2s'", prepare=False)
            await conn.execute(db.sql("UPDATE {notes} SET body = 'again'"), prepare=False)
    finally:
        await registry.aclose()


async def test_a_cancelled_query_stops_on_the_server_behind_a_pooler_with_no_settings(
    bounced: tuple[Database, str],
) -> None:
    """As above for ``PerUserPools(settings={})``, whose checkouts set nothing: the query
    of a cancelled request stops on the server all the same (the checkout reads where its
    transaction runs as it begins). Before, such a checkout read nothing, and its query ran
    on to its end."""
    db, url = bounced
    pools = PerUserPools(
        url,
        settings={},
        rls_check="off",
        kwargs={**db.kwargs(), "prepare_threshold": None},
    )
    registry = _registry(pools)
    marker = f"cancel-{uuid.uuid4().hex}"
    try:
        async with registry.open_scope(UserExecutionContext.create("user-1")):
            with anyio.move_on_after(0.5) as request:
                async with connection() as conn:
                    await conn.execute(f"SELECT pg_sleep(30) /* {marker} */", prepare=False)
            assert request.cancelled_caught
        await _query_stopped(db, marker)
    finally:
        await registry.aclose()


async def _clients_waiting(url: str) -> int:
    """How many clients of the pooler at ``url`` wait for a server session (its console)."""
    console = psycopg.conninfo.make_conninfo(url, dbname="pgbouncer")
    async with await psycopg.AsyncConnection.connect(console, autocommit=True) as conn:
        cur = await conn.execute("SHOW POOLS", prepare=False)
        names = [column.name for column in cur.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    return sum(int(row["cl_waiting"]) for row in rows if row["database"] == "test")


# The seed a handler gives random(): the next user must not draw what it makes.
_SEED = 0.5


def _serializable(db: Database) -> tuple[sql.Identifier, sql.Composed]:
    """Every transaction of the app role SERIALIZABLE (see :func:`_isolated`), and a table
    of two rows for two of them to conflict over."""
    role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    pairs = sql.Identifier(db.schema, "pairs")
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int)").format(pairs))
        admin.execute(sql.SQL("INSERT INTO {} VALUES (1, 0), (2, 0)").format(pairs))
        admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(pairs, sql.Identifier(role))
        )
    return pairs, _isolated(db, "serializable")


def _isolated(db: Database, isolation: str) -> sql.Composed:
    """Every transaction of the app role at ``isolation``, and what a client finds in the
    server session it is handed: its process, role, search_path, a session setting, a
    temporary table, LISTEN, session advisory locks, the last sequence value it drew, and
    whether its random() draws what the seed :func:`_leave_session_state` sets makes."""
    role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    last_value = sql.Identifier(db.schema, "last_value")
    with _admin() as admin:
        admin.execute(f"SELECT setseed({_SEED})")
        seeded = admin.execute("SELECT random()").fetchone()
        admin.execute(
            sql.SQL(
                "CREATE FUNCTION {}() RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN "
                "RETURN pg_catalog.lastval(); EXCEPTION WHEN object_not_in_prerequisite_state "
                "THEN RETURN NULL; END $$"
            ).format(last_value)
        )
        admin.execute(
            sql.SQL("ALTER ROLE {} SET default_transaction_isolation = {}").format(
                sql.Identifier(role), sql.Literal(isolation)
            )
        )
    return sql.SQL(
        "SELECT pg_catalog.pg_backend_pid(), current_user, current_setting('search_path'), "
        "COALESCE(current_setting('app.leftover', true), ''), "
        "pg_catalog.to_regclass('pg_temp.scratch') IS NOT NULL, "
        "(SELECT count(*) FROM pg_catalog.pg_listening_channels()), "
        "(SELECT count(*) FROM pg_catalog.pg_locks "
        "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), {}(), "
        "pg_catalog.random() = {}"
    ).format(last_value, sql.Literal(seeded[0] if seeded else None))


async def _leave_session_state(conn: psycopg.AsyncConnection[Any], db: Database, user: str) -> int:
    """Leave in ``conn``'s server session what a handler can: a search_path, a session
    setting, a temporary table, a LISTEN, a session advisory lock, a sequence value (a
    note of ``user``'s) and random()'s seed. Returns the server process."""
    for statement in (
        f"SELECT setseed({_SEED})",
        "SET search_path = pg_catalog",
        "SET app.leftover = 'leaked'",
        "CREATE TEMP TABLE scratch (x int)",
        "LISTEN leaked",
    ):
        await conn.execute(statement, prepare=False)
    # Keyed by the test's schema too: advisory locks are the database's, and another test
    # run on the same database would hold (or wait for) the same user's.
    key = (f"{db.schema}/{user}",)
    await conn.execute("SELECT pg_advisory_lock(hashtext(%s))", key, prepare=False)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'secret') RETURNING id")
    await conn.execute(insert, (user,), prepare=False)
    cur = await conn.execute("SELECT pg_catalog.pg_backend_pid()", prepare=False)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _conflicting_commits(
    registry: Registry,
    db: Database,
    pairs: sql.Identifier,
    before_second_commit: Callable[[], Awaitable[None]],
) -> tuple[BaseException | None, int]:
    """Two users' SERIALIZABLE checkouts, each reading the row the other writes: the first
    commits, which dooms the second, whose COMMIT then fails (a serialization failure at
    the COMMIT itself, nothing before it). The second leaves session state behind
    (:func:`_leave_session_state`), and ``before_second_commit`` runs just before its
    block ends. Returns the second checkout's error and its server process."""
    read = sql.SQL("SELECT v FROM {} WHERE id = %s").format(pairs)
    write = sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(pairs)
    # read 1, read 2, write 2, write 1 (and the state), commit the first: in this order.
    turns = [anyio.Event() for _ in range(4)]
    second: list[Any] = []

    async def first() -> None:
        async with (
            registry.open_scope(UserExecutionContext.create("user-1")),
            connection() as conn,
        ):
            await conn.execute(read, (1,), prepare=False)
            turns[0].set()
            await turns[1].wait()
            await conn.execute(write, (2,), prepare=False)
            turns[2].set()
            await turns[3].wait()
        committed.set()

    async def then() -> None:
        try:
            async with (
                registry.open_scope(UserExecutionContext.create("user-2")),
                connection() as conn,
            ):
                await turns[0].wait()
                await conn.execute(read, (2,), prepare=False)
                turns[1].set()
                await turns[2].wait()
                await conn.execute(write, (1,), prepare=False)
                second.append(await _leave_session_state(conn, db, "user-2"))
                turns[3].set()
                await committed.wait()
                await before_second_commit()
        except psycopg.Error as error:
            second.append(error)
        else:
            second.append(None)

    committed = anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(then)
    pid, error = second
    return error, pid


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_commit_that_fails_leaves_nothing_to_the_next_client(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """Under SERIALIZABLE two users' checkouts conflict and the second one's COMMIT fails;
    the pooler hands its server session at once to a client that was waiting for one.
    That client finds nothing of the failed checkout there: no search_path, setting,
    temporary table or LISTEN (the failed transaction took them along), and no session
    advisory lock or sequence value; the handler gets the database's own error. Before,
    the lock and the sequence value stayed: the reset travelled after the COMMIT and was
    skipped, and the session was another client's by the time the reset came again."""
    db, url = bounced
    pairs, left = _serializable(db)
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    pool = _rls_pool(db, url, strategy, shared={"max_size": 2, "per_user_limit": 1})
    registry = _registry(pool)
    seen: list[tuple[Any, ...] | None] = []

    async def next_client_waits() -> None:
        # The first checkout's server session is free: a plain client holds it, and the
        # next one waits for the session the failing COMMIT will free.
        blocker = await psycopg.AsyncConnection.connect(url)
        await blocker.execute("SELECT 1", prepare=False)
        waiter_done = anyio.Event()

        async def waiter() -> None:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    seen.append(await (await conn.execute(left, prepare=False)).fetchone())
            finally:
                waiter_done.set()

        async def queued() -> bool:
            return await _clients_waiting(url) == 1

        async def release_blocker() -> None:
            await waiter_done.wait()
            await blocker.close()

        tg.start_soon(waiter)
        await _eventually(queued, "the next client waits for a server session")
        tg.start_soon(release_blocker)

    try:
        async with anyio.create_task_group() as tg:
            error, pid = await _conflicting_commits(registry, db, pairs, next_client_waits)
        sessions = await _server_sessions(url)
    finally:
        await registry.aclose()
    assert isinstance(error, psycopg.errors.SerializationFailure), error
    assert seen == [(pid, role, '"$user", public', "", False, 0, 0, None, False)]
    assert {row[:3] for row in sessions} == {(role, '"$user", public', 0)}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_commit_given_up_at_return_timeout_stops_on_the_server_behind_a_pooler(
    bounced: tuple[Database, str], strategy: str
) -> None:
    """A COMMIT that waits on the server (a deferred trigger waiting for a lock another
    session holds) is given up at ``return_timeout``, and its connection to the pooler
    closed: the caller hears that its outcome is unknown, and the server stops running it.
    pgbouncer drops a cancel request for a client connection that is gone, so only the
    cancel sent with SQL, over a connection of its own, reaches the server; without it the
    COMMIT would wait on, holding the transaction's locks and the pooler's server
    session."""
    db, url = bounced
    schema = sql.Identifier(db.schema)
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    _commit_waits_for_its_lock(db)
    options: dict[str, Any] = {
        "return_timeout": 0.5,
        "rls_check": "off",
        "kwargs": {**db.kwargs(), "prepare_threshold": None},
    }
    pool: SharedPool | PerUserPools = (
        SharedPool(url, min_size=1, max_size=1, **options)
        if strategy == "shared"
        else PerUserPools(url, max_size=1, max_total=1, **options)
    )
    registry = _registry(pool)
    insert = sql.SQL("INSERT INTO {}.plain VALUES ('user-1')").format(schema)

    async def gone() -> bool:
        # By role: the pooler's server sessions do not carry the client's application_name.
        waiting = await _admin_scalar(
            db,
            "SELECT count(*) FROM pg_catalog.pg_stat_activity "
            "WHERE usename = %s AND wait_event_type = 'Lock'",
            (role,),
        )
        return int(waiting) == 0

    try:
        with _admin() as holder:
            holder.autocommit = False
            holder.execute("SELECT pg_catalog.pg_advisory_xact_lock(hashtext(%s))", (db.schema,))
            with pytest.raises(psycopg.OperationalError, match="may or may not"):
                async with (
                    registry.open_scope(UserExecutionContext.create("user-1")),
                    connection() as conn,
                ):
                    await conn.execute(insert, prepare=False)
            await _eventually(gone, "the COMMIT given up stops on the server", within=10.0)
            holder.rollback()
    finally:
        await registry.aclose()


async def test_a_commit_that_fails_leaves_nothing_to_the_next_user_connected_directly(
    bounced: tuple[Database, str],
) -> None:
    """The same conflict with SharedPool connected directly: the next users, both of the
    pool's connections at once, find nothing of the failed checkout in its session."""
    db, _ = bounced
    pairs, left = _serializable(db)
    role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    pool = _rls_pool(db, db.app_url, "shared", shared={"max_size": 2, "per_user_limit": 2})
    registry = _registry(pool)

    async def nothing() -> None:
        pass

    try:
        error, pid = await _conflicting_commits(registry, db, pairs, nothing)
        async with (
            registry.open_scope(UserExecutionContext.create("user-3")),
            connection() as first,
            connection() as second,
        ):
            seen = [
                await (await conn.execute(left, prepare=False)).fetchone()
                for conn in (first, second)
            ]
        assert isinstance(pool, SharedPool)
        discarded = pool.stats().discarded
    finally:
        await registry.aclose()
    assert isinstance(error, psycopg.errors.SerializationFailure), error
    assert (pid, role, '"$user", public', "", False, 0, 0, None, False) in seen
    assert discarded == 0


@pytest.mark.parametrize(
    ("strategy", "route"), [("shared", "pooler"), ("per_user", "pooler"), ("shared", "direct")]
)
async def test_a_deadlock_as_checkouts_commit_leaves_nothing_in_their_sessions(
    bounced: tuple[Database, str], strategy: str, route: str
) -> None:
    """Two users' checkouts each insert, into a deferred unique column, the value the other
    inserts too, leave session state behind, and end together: checking the deferred
    constraints, one waits for the other, and the database ends one of them with a
    deadlock. That checkout raises the database's DeadlockDetected, the other commits, and
    neither server session keeps anything of either handler."""
    db, url = bounced
    _, left = _serializable(db)
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    target = url if route == "pooler" else db.app_url
    pool = _rls_pool(db, target, strategy, shared={"max_size": 2, "per_user_limit": 2})
    registry = _registry(pool)
    insert = sql.SQL("INSERT INTO {} VALUES (%s)").format(sql.Identifier(db.schema, "deferred"))
    # Each inserts its own value, then the other's, which is then already there (so the
    # check waits for the end of the other's transaction), then both end.
    steps = [[anyio.Event(), anyio.Event()] for _ in range(2)]
    outcomes: list[BaseException | None] = []

    async def user(n: int) -> None:
        try:
            async with (
                registry.open_scope(UserExecutionContext.create(f"user-{n}")),
                connection() as conn,
            ):
                for step, key in enumerate((n, 1 - n)):
                    await conn.execute(insert, (key,), prepare=False)
                    steps[step][n].set()
                    await steps[step][1 - n].wait()
                await _leave_session_state(conn, db, f"user-{n}")
        except psycopg.Error as error:
            outcomes.append(error)
        else:
            outcomes.append(None)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(user, 0)
                tg.start_soon(user, 1)
        if route == "pooler":
            sessions = [row[:3] for row in await _server_sessions(url)]
        else:
            async with (
                registry.open_scope(UserExecutionContext.create("user-3")),
                connection() as first,
                connection() as second,
            ):
                sessions = [
                    (await (await conn.execute(left, prepare=False)).fetchone() or ())[1:]
                    for conn in (first, second)
                ]
    finally:
        await registry.aclose()
    assert sorted(type(outcome).__name__ for outcome in outcomes) == [
        "DeadlockDetected",
        "NoneType",
    ]
    clean = (
        (role, '"$user", public', 0)
        if route == "pooler"
        else (role, '"$user", public', "", False, 0, 0, None, False)
    )
    assert sessions == [clean, clean]


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize(
    "statement",
    [
        "SET app.tenant_id = 'legacy'",
        "SET LOCAL datestyle = 'German, DMY'",
        "SET LOCAL timezone = 'Asia/Kathmandu'",
    ],
)
async def test_a_handler_that_sets_a_setting_itself_commits_without_error(
    bounced: tuple[Database, str], strategy: str, statement: str
) -> None:
    """A handler that sets one of the checkout's settings itself, for the session (legacy
    code's ``SET app.tenant_id``), or changes how times read for its transaction, in a
    block that ends normally: the checkout commits and raises nothing, and the next
    checkout sees only its own settings. Before, PerUserPools behind a pooler, which read
    the settings back to tell whether the transaction was still its own, raised "the
    checkout's transaction was ended inside it" after committing; and reading the
    transaction's start as a time failed to parse it in the handler's DateStyle."""
    db, url = bounced
    pool = _rls_pool(db, url, strategy, shared={"max_size": 1, "per_user_limit": 1})
    registry = _registry(pool)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('user-5', 'kept')")
    try:
        async with (
            registry.open_scope(UserExecutionContext.create("user-5")),
            connection() as conn,
        ):
            await conn.execute(statement, prepare=False)
            await conn.execute(insert, prepare=False)
        rows = await _read(
            registry,
            "user-5",
            db.sql("SELECT body, current_setting('app.tenant_id', true) FROM {notes} ORDER BY id"),
        )
    finally:
        await registry.aclose()
    assert rows == [("note of user-5", ""), ("kept", "")]


# What makes a COMMIT fail after the deferred constraints were checked, at any isolation
# level, and what the checkout then raises (None: it commits).
_FAILING_COMMITS: dict[str, tuple[str, type[psycopg.Error] | None]] = {
    # Checked just before the COMMIT, inside the transaction, where the session is still
    # the checkout's.
    "deferred constraint": (
        "INSERT INTO {deferred} VALUES (1); INSERT INTO {deferred} VALUES (1)",
        psycopg.errors.UniqueViolation,
    ),
    # A cursor WITH HOLD is run to its end by the COMMIT, which fails when the cursor's
    # query does; the checkout closes its cursors anyway, so it commits.
    "held cursor": (
        "DECLARE doomed CURSOR WITH HOLD FOR SELECT pg_catalog.nextval({sequence}::regclass) "
        "/ (x - 2) FROM pg_catalog.generate_series(1, 3) x",
        None,
    ),
    # PostgreSQL refuses, at the COMMIT itself, a table emptied at each COMMIT that a
    # table kept across them refers to.
    "on commit action": (
        "CREATE TEMP TABLE parent (id int PRIMARY KEY) ON COMMIT DELETE ROWS; "
        "CREATE TEMP TABLE child (id int REFERENCES parent)",
        psycopg.errors.FeatureNotSupported,
    ),
    # A deferred constraint trigger that draws a sequence value (numbering an audit entry,
    # say) before it refuses the row: checked before the COMMIT too, so the value it drew
    # is discarded with the rest, not left in the session the pooler hands on.
    "deferred trigger": (
        "CREATE TEMP TABLE audited (x int); "
        "CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_catalog.nextval({sequence}::regclass); RAISE EXCEPTION 'refused'; END $$; "
        "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON audited DEFERRABLE INITIALLY "
        "DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse(); "
        "INSERT INTO audited VALUES (1)",
        psycopg.errors.RaiseException,
    ),
}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
@pytest.mark.parametrize("cause", list(_FAILING_COMMITS))
async def test_a_commit_failing_at_any_isolation_level_leaves_nothing_to_the_next_user(
    bounced: tuple[Database, str], strategy: str, isolation: str, cause: str
) -> None:
    """A handler takes a session advisory lock, draws a sequence value and leaves other
    session state, and its checkout's COMMIT then fails, whatever the isolation level (not
    only a serialization failure under SERIALIZABLE). The client that waited for a server
    session gets that one at once, and another user's checkouts, in every server session of
    the pooler at once, after it: none finds anything of the handler's (no lock held, so
    they can take it; no sequence value, no setting). Before, outside SERIALIZABLE the lock
    was released only after the COMMIT, in the part of the message a failed COMMIT skips,
    and the pooler handed the session on with the lock held; a held cursor drew a sequence
    value after the sequence state was discarded."""
    db, url = bounced
    left = _isolated(db, isolation)
    role = psycopg.conninfo.conninfo_to_dict(url)["user"]
    pool = _rls_pool(db, url, strategy, shared={"max_size": 2, "per_user_limit": 2})
    registry = _registry(pool)
    statements, raised = _FAILING_COMMITS[cause]
    statement = sql.SQL(statements).format(
        deferred=sql.Identifier(db.schema, "deferred"),
        sequence=sql.Literal(f"{db.schema}.notes_id_seq"),
    )
    # Whether this session can take user-1's lock (and gives it back at once).
    lock = sql.SQL(
        "SELECT CASE WHEN pg_catalog.pg_try_advisory_lock(hashtext({key})) "
        "THEN pg_catalog.pg_advisory_unlock(hashtext({key})) ELSE false END"
    ).format(key=sql.Literal(f"{db.schema}/user-1"))
    outcome: list[BaseException | None] = []
    seen: list[tuple[Any, ...]] = []
    waited = anyio.Event()

    async def probe(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
        row = await (await conn.execute(left, prepare=False)).fetchone()
        took = await (await conn.execute(lock, prepare=False)).fetchone()
        assert row is not None
        assert took is not None
        return (*row, *took)

    async def waiter() -> None:
        try:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                seen.append(await probe(conn))
        finally:
            waited.set()

    async def queued() -> bool:
        return await _clients_waiting(url) == 1

    try:
        with anyio.fail_after(30):
            # The other server session is held by a plain client, so the next one waits for
            # the session of user-1's checkout, and gets it as its COMMIT ends.
            async with (
                anyio.create_task_group() as tg,
                await psycopg.AsyncConnection.connect(url) as blocker,
            ):
                try:
                    async with (
                        registry.open_scope(UserExecutionContext.create("user-1")),
                        connection() as conn,
                    ):
                        pid = await _leave_session_state(conn, db, "user-1")
                        await conn.execute(statement, prepare=False)
                        await blocker.execute("SELECT 1", prepare=False)
                        tg.start_soon(waiter)
                        await _eventually(queued, "the next client waits for a session")
                except psycopg.Error as error:
                    outcome.append(error)
                else:
                    outcome.append(None)
                await waited.wait()
        async with (
            registry.open_scope(UserExecutionContext.create("user-2")),
            connection() as first,
            connection() as second,
        ):
            seen += [await probe(conn) for conn in (first, second)]
    finally:
        await registry.aclose()
    assert type(outcome[0]) is (type(None) if raised is None else raised), outcome
    assert seen[0][0] == pid  # the waiting client got the session of the failed COMMIT
    assert len({row[0] for row in seen[1:]}) == 2  # user-2 had both server sessions
    clean = (role, '"$user", public', "", False, 0, 0, None, False, True)
    assert [row[1:] for row in seen] == [clean] * 3


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("outcome", ["commit", "rollback", "failed commit", "commit inside"])
async def test_a_statement_from_sql_prepare_stays_out_of_the_pooler(
    bounced: tuple[Database, str], strategy: str, outcome: str
) -> None:
    """A handler prepares a statement with SQL ``PREPARE`` (a name and a text of user-1's),
    and its checkout commits, rolls back, fails to commit, or is committed by the handler
    itself (an error, the checkout's end then finds no transaction). Another user's checkouts, in
    every server session of the pooler at once, find no such statement and can prepare one
    of the same name; SharedPool keeps its connection (it has nothing to discard). Before,
    the statement outlived the checkout in the server session (PREPARE is not undone by a
    rollback, and the reset left statements alone, for psycopg's own): the next client
    could read and run it, and failed to prepare its own of that name; SharedPool closed
    its own client connection for it, which left the server session as it was."""
    db, url = bounced
    pool = _rls_pool(db, url, strategy, shared={"max_size": 2, "per_user_limit": 2})
    registry = _registry(pool)
    fail = _FAILING_COMMITS["on commit action"][0] if outcome == "failed commit" else "SELECT 1"
    seen: list[tuple[Any, ...]] = []
    try:
        with contextlib.suppress(
            LookupError, psycopg.errors.FeatureNotSupported, psycopg.ProgrammingError
        ):
            async with (
                registry.open_scope(UserExecutionContext.create("user-1")),
                connection() as conn,
            ):
                await conn.execute("PREPARE mine AS SELECT 'user-1 private'", prepare=False)
                await conn.execute(fail, prepare=False)
                if outcome == "rollback":
                    raise LookupError(outcome)
                if outcome == "commit inside":
                    await conn.commit()
        async with (
            registry.open_scope(UserExecutionContext.create("user-2")),
            connection() as first,
            connection() as second,
        ):
            for conn in (first, second):
                cur = await conn.execute(
                    "SELECT pg_catalog.pg_backend_pid(), (SELECT count(*) FROM "
                    "pg_catalog.pg_prepared_statements WHERE from_sql)",
                    prepare=False,
                )
                row = await cur.fetchone()
                assert row is not None
                await conn.execute("PREPARE mine AS SELECT 'user-2 private'", prepare=False)
                seen.append(row)
        discarded = pool.stats().discarded if isinstance(pool, SharedPool) else 0
    finally:
        await registry.aclose()
    assert len({pid for pid, _ in seen}) == 2  # user-2 had both server sessions
    assert [count for _, count in seen] == [0, 0]
    assert discarded == 0


async def test_the_pooled_commit_keeps_psycopgs_own_prepared_statements(
    bounced: tuple[Database, str],
) -> None:
    """The message that commits a checkout behind a pooler deallocates the statements from
    SQL PREPARE only: psycopg's own, prepared with the protocol (which pgbouncer 1.22 and
    later follows across server sessions), stay prepared, where DEALLOCATE ALL would make
    every checkout prepare them again. On one server session, directly, so that psycopg's
    statement is there to find."""
    db, _ = bounced
    own = "SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql"
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        await conn.execute("SELECT 1", prepare=True)  # psycopg's own, _pg3_0
        await conn.execute("PREPARE mine AS SELECT 1", prepare=False)
        await _end_and_reset(conn, "COMMIT", deallocate=_DEALLOCATE_FROM_SQL)
        cur = await conn.execute(own, prepare=False)
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT 1", prepare=True)
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT name FROM pg_catalog.pg_prepared_statements")
        assert [row[0] for row in await cur.fetchall()] == ["_pg3_0"]


async def test_without_plpgsql_statements_from_sql_prepare_are_warned_about(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In a database where the role may not use PL/pgSQL, which deallocates the statements
    from SQL PREPARE behind a pooler, checkouts still commit (the deallocation is left
    out rather than failing every COMMIT), and the pooler warning says not to use them."""
    if anyio_backend != "asyncio":
        pytest.skip("psycopg's async pool is asyncio-only (trio refusal: test_*_trio)")
    name = f"ambient_nopl_{uuid.uuid4().hex[:12]}"
    with make_database() as db:
        with _admin() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            info = psycopg.conninfo.conninfo_to_dict(db.admin_url)
            other = psycopg.conninfo.make_conninfo(**{**info, "dbname": name})  # type: ignore[arg-type]
            with psycopg.connect(other, autocommit=True) as admin:
                admin.execute("REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC")
            with pgbouncer(db, dbname=name) as url, caplog.at_level(logging.WARNING, "ambient"):
                pool = SharedPool(url, rls_check="off", kwargs={"prepare_threshold": None})
                registry = _registry(pool)
                try:
                    async with (
                        registry.open_scope(UserExecutionContext.create("user-1")),
                        connection() as conn,
                    ):
                        await conn.execute("PREPARE mine AS SELECT 1", prepare=False)
                    rows = await _read(registry, "user-2", SETTING)
                finally:
                    await registry.aclose()
        finally:
            with _admin() as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    assert rows == [("user-2",)]
    warnings = _pooler_warnings(caplog)
    assert len(warnings) == 1
    assert "PL/pgSQL" in warnings[0]
