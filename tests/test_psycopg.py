"""ambient.integrations.psycopg on the real PostgreSQL: SharedPool, PerUserPools, check_rls.

Every test creates its own schema, roles and tables (unique names, so parallel runs do not
clash) and drops them afterwards. psycopg's async pool is asyncio-only: the trio
parametrization of the database tests is skipped, and the trio tests at the end prove that
the strategies refuse to run there with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import fractions
import gc
import math
import os
import random
import re
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.abc import Buffer, Query
from psycopg.pq import PipelineStatus, Trace, TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool, PoolClosed

from ambient import (
    Lifetime,
    Registry,
    UserExecutionContext,
    UserRef,
    bind_context,
    current_context_or_none,
    resolve,
)
from ambient._context import validate_id
from ambient.errors import (
    InvalidContextError,
    NoActiveContextError,
    PoolExhaustedError,
    RegistryError,
)
from ambient.integrations.fastapi import CurrentContext, install
from ambient.integrations.psycopg import Database as InstalledDatabase
from ambient.integrations.psycopg import (
    PerUserPools,
    PerUserPoolsStats,
    RowSecurityError,
    RowSecurityWarning,
    SharedPool,
    UnsupportedBackendError,
    check_rls,
    connection,
)
from ambient.middleware import trusted_header
from tests.conftest import DATABASE_URL, service_unavailable


@dataclass(frozen=True)
class Database:
    """What one test gets: an app role under RLS and the admin URL to inspect with."""

    schema: str
    app_url: str  # an ordinary role: no superuser, no BYPASSRLS, not the table owner
    owner_url: str  # owns `owned` (RLS enabled, FORCE off) and `forced` (FORCE on)
    admin_url: str
    app_name: str  # application_name of this test's pool connections

    @property
    def notes(self) -> str:
        return f"{self.schema}.notes"

    def sql(self, template: str) -> sql.Composed:
        """``template`` with ``{notes}`` replaced by this test's notes table."""
        return sql.SQL(template).format(notes=sql.Identifier(self.schema, "notes"))

    def kwargs(self) -> dict[str, Any]:
        return {"application_name": self.app_name}


def _admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(DATABASE_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).splitlines()[0])
        raise  # unreachable: service_unavailable skips or fails


async def _rls_problems(url: str, tables: Iterable[str] = ()) -> list[str]:
    """The problems check_rls raises RowSecurityError with, on a connection to ``url``."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, tables)
    return info.value.problems


async def _rls_warnings(url: str, tables: Iterable[str]) -> list[str]:
    """The problems check_rls, asked to warn, warns of (RowSecurityWarning) and returns, on a
    connection to ``url``."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(conn, tables, action="warn")
    return problems


def _url_for(role: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(DATABASE_URL)
    info["user"] = role
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@contextlib.contextmanager
def make_database() -> Iterator[Database]:
    """Create a schema with a notes table whose RLS policy fails closed, and the roles to
    use it; drop them all afterwards."""
    tag = uuid.uuid4().hex[:12]
    schema, app, owner = f"ambient_t_{tag}", f"ambient_app_{tag}", f"ambient_own_{tag}"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {app}, {owner}")
        admin.execute(
            f"CREATE TABLE {schema}.notes (id bigserial PRIMARY KEY, owner text NOT NULL, "
            "tenant text, body text NOT NULL)"
        )
        admin.execute(f"ALTER TABLE {schema}.notes ENABLE ROW LEVEL SECURITY")
        admin.execute(
            f"CREATE POLICY notes_owner ON {schema}.notes "
            "USING (owner = NULLIF(current_setting('app.user_id', true), '')) "
            "WITH CHECK (owner = NULLIF(current_setting('app.user_id', true), ''))"
        )
        admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.notes TO {app}")
        admin.execute(f"GRANT USAGE ON SEQUENCE {schema}.notes_id_seq TO {app}")
        for name, force in (("owned", False), ("forced", True)):
            admin.execute(f"CREATE TABLE {schema}.{name} (owner text)")
            admin.execute(f"ALTER TABLE {schema}.{name} OWNER TO {owner}")
            admin.execute(f"ALTER TABLE {schema}.{name} ENABLE ROW LEVEL SECURITY")
            if force:
                admin.execute(f"ALTER TABLE {schema}.{name} FORCE ROW LEVEL SECURITY")
        admin.execute(f"CREATE TABLE {schema}.plain (owner text)")
        admin.execute(f"GRANT SELECT ON {schema}.plain TO {app}")
        admin.execute(
            f"CREATE TABLE {schema}.deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
        admin.execute(f"GRANT SELECT, INSERT ON {schema}.deferred TO {app}")
    try:
        yield Database(
            schema=schema,
            app_url=_url_for(app),
            owner_url=_url_for(owner),
            admin_url=DATABASE_URL,
            app_name=f"ambient-test-{tag}",
        )
    finally:
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = ANY(%s) AND pid <> pg_backend_pid()",
                ([app, owner],),
            )
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.execute(f"DROP ROLE {app}")
            admin.execute(f"DROP ROLE {owner}")


@pytest.fixture(name="db")
def fixture_db(anyio_backend: str) -> Iterator[Database]:
    """A fresh schema, tables and roles (asyncio only: the pools run on asyncio)."""
    if anyio_backend != "asyncio":
        pytest.skip("psycopg's async pool is asyncio-only (trio refusal: test_*_trio)")
    with make_database() as db:
        yield db


async def _scalar(conn: psycopg.AsyncConnection[Any], query: Query, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _admin_scalar(db: Database, sql: str, params: Any = None) -> Any:
    async with await psycopg.AsyncConnection.connect(db.admin_url, autocommit=True) as conn:
        return await _scalar(conn, sql, params)


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 5.0) -> None:
    """Wait for state the pool reaches in its background workers (bounded polling)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {within} s: {what}")
        await anyio.sleep(0.01)


async def _running(db: Database, marker: str) -> int:
    """How many queries carrying ``marker`` run on the server now (another session's view)."""
    return int(
        await _admin_scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        )
    )


async def _query_stopped(db: Database, marker: str) -> None:
    """Wait (bounded) until no query carrying ``marker`` runs on the server."""

    async def stopped() -> bool:
        return await _running(db, marker) == 0

    await _eventually(stopped, "the cancelled query stopped on the server")


async def _reached(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Whether ``check`` holds within ``within`` seconds (bounded polling; the caller
    decides what a miss means, e.g. after releasing what a deadlock would hold)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.01)
    return True


def _recording(
    made: list[psycopg.AsyncConnection[Any]],
) -> type[psycopg.AsyncConnection[Any]]:
    """A connection class that appends every connection it opens to ``made``."""

    class Recorded(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:
            conn = await super().connect(*args, **kwargs)
            made.append(conn)
            return conn

    return Recorded


def _ctx(user: str, tenant: str | None = "acme") -> UserExecutionContext:
    return UserExecutionContext.create(user, tenant_id=tenant)


@pytest.fixture(name="shared")
async def fixture_shared(db: Database) -> AsyncIterator[SharedPool]:
    """An open SharedPool of the app role (max_size 4, per-user limit 2)."""
    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=4,
        per_user_limit=2,
        timeout=5,
        rls_tables=[db.notes],
        rls_check="raise",
        kwargs=db.kwargs(),
    ) as pool:
        yield pool


async def _shared_idle(pool: SharedPool) -> bool:
    stats = pool.stats()
    return (
        stats.available == stats.size
        and stats.waiting == 0
        and stats.checked_out == 0
        and stats.users == 0
    )


# -- SharedPool: settings and row-level security --------------------------------------------


async def test_shared_connection_needs_a_context(shared: SharedPool) -> None:
    """Outside a context, connection() raises NoActiveContextError and takes nothing."""
    with pytest.raises(NoActiveContextError):
        async with shared.connection():
            pass
    assert shared.stats().checked_out == 0


async def test_shared_sets_context_fields_in_one_transaction(shared: SharedPool) -> None:
    """Inside a checkout the settings hold the context's ids, within an open transaction."""
    with bind_context(_ctx("alice", "acme")):
        async with shared.connection() as conn:
            assert conn.info.transaction_status is TransactionStatus.INTRANS
            row = await (
                await conn.execute(
                    "SELECT current_setting('app.user_id', true), "
                    "current_setting('app.tenant_id', true)"
                )
            ).fetchone()
    assert row == ("alice", "acme")
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


async def test_shared_begin_and_settings_take_one_round_trip(db: Database) -> None:
    """BEGIN and the settings travel as one statement in one round trip, as the protocol
    trace of the checkout shows, with nothing prepared; the checkout sees its own user's
    settings, in a transaction, out of pipeline mode."""
    fd, path = tempfile.mkstemp()
    os.close(fd)
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="off", kwargs=db.kwargs()
    ) as pool:
        with open(path, "w") as trace:  # noqa: ASYNC230 - a local file, written by libpq
            for user in ("alice", "bob"):
                with bind_context(_ctx(user), allow_switch=True):
                    async with pool.connection() as conn:
                        if user == "alice":  # trace from alice's return to bob's first query
                            conn.pgconn.trace(trace.fileno())
                            conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
                            continue
                        conn.pgconn.untrace()
                        assert conn.pgconn.pipeline_status == PipelineStatus.OFF
                        assert conn.info.transaction_status is TransactionStatus.INTRANS
                        row = await (
                            await conn.execute(
                                "SELECT current_setting('app.user_id', true), "
                                "current_setting('app.tenant_id', true)"
                            )
                        ).fetchone()
        assert row == ("bob", "acme")
    with open(path) as trace:  # noqa: ASYNC230
        lines = trace.read().splitlines()
    os.unlink(path)
    reset_done = next(
        i
        for i, line in enumerate(lines)
        if "ReadyForQuery" in line and any("RESET ALL" in earlier for earlier in lines[:i])
    )
    checkout = lines[reset_done + 1 :]
    assert sum("ReadyForQuery" in line for line in checkout) == 1
    sent = [line for line in checkout if line.startswith("F")]
    assert len(sent) == 1
    assert "Query" in sent[0]
    assert "BEGIN; SELECT pg_catalog.set_config('app.user_id', 'bob', true)" in sent[0]


async def test_a_schema_ahead_of_pg_catalog_cannot_shadow_the_settings(db: Database) -> None:
    """A role whose search_path puts a schema before pg_catalog (where someone could create
    functions) had that schema's ``set_config`` and ``current_setting`` called in place of
    PostgreSQL's: here one sets every user to mallory, and alice's checkout read mallory's
    rows. The library's own calls name pg_catalog."""
    schema = db.schema
    with _admin() as admin:
        for name in ("set_config", "current_setting"):
            admin.execute(f"DROP FUNCTION IF EXISTS {schema}.{name}")
        admin.execute(
            f"CREATE FUNCTION {schema}.set_config(text, text, boolean) RETURNS text "
            "LANGUAGE sql AS $$ SELECT pg_catalog.set_config($1, 'mallory', $3) $$"
        )
        admin.execute(f"GRANT EXECUTE ON FUNCTION {schema}.set_config TO PUBLIC")
    options: dict[str, Any] = {
        "rls_check": "off",
        "kwargs": {**db.kwargs(), "options": f"-c search_path={schema},pg_catalog"},
    }
    for pool in (
        SharedPool(db.app_url, min_size=1, max_size=1, **options),
        PerUserPools(db.app_url, max_size=1, max_total=1, **options),
    ):
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice")), connection() as conn:
                seen = await _scalar(conn, "SELECT pg_catalog.current_setting('app.user_id', true)")
        finally:
            await registry.aclose()
        assert seen == "alice", type(pool).__name__


async def test_shared_absent_tenant_is_empty(shared: SharedPool) -> None:
    """A context without a tenant sets app.tenant_id to '' (read as unset by NULLIF)."""
    with bind_context(_ctx("alice", None)):
        async with shared.connection() as conn:
            tenant = await _scalar(conn, "SELECT current_setting('app.tenant_id', true)")
    assert tenant == ""


async def test_an_absent_tenant_is_empty_though_the_role_presets_one(db: Database) -> None:
    """With a tenant_id preset for the role (``ALTER ROLE ... SET app.tenant_id``, which
    rls_check="warn" only warns of), a context without a tenant still sets app.tenant_id
    to '' in either strategy, not back to the preset tenant, whose rows the policies would
    then show."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    with _admin() as admin:
        admin.execute(f"ALTER ROLE {app} SET app.tenant_id = 'preset'")
    options: dict[str, Any] = {"rls_check": "off", "kwargs": db.kwargs()}
    for pool in (
        SharedPool(db.app_url, max_size=1, **options),
        PerUserPools(db.app_url, max_size=1, **options),
    ):
        registry = Registry()
        pool.install(registry)
        try:
            async with registry.open_scope(_ctx("alice", None)), connection() as conn:
                seen = await _scalar(conn, "SELECT current_setting('app.tenant_id', true)")
        finally:
            await registry.aclose()
        assert seen == "", type(pool).__name__


async def test_shared_rls_concurrent_users_see_only_their_rows(
    db: Database, shared: SharedPool
) -> None:
    """100 users insert and read concurrently through one registry; each sees only its own
    rows (pool of 4, per-user limit 2, so connections are reused across users)."""
    registry = Registry()
    shared.install(registry)
    seen: dict[str, list[str]] = {}

    async def user(n: int) -> None:
        name = f"user-{n}"
        async with registry.open_scope(_ctx(name)):
            for i in range(3):
                async with connection() as conn:
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"),
                        (name, f"{name}:{i}"),
                    )
            async with connection() as conn:
                cur = await conn.execute(db.sql("SELECT owner, body FROM {notes}"))
                rows = await cur.fetchall()
        assert {owner for owner, _ in rows} == {name}
        seen[name] = sorted(body for _, body in rows)

    async with anyio.create_task_group() as tg:
        for n in range(100):
            tg.start_soon(user, n)
    assert len(seen) == 100
    for name, bodies in seen.items():
        assert bodies == [f"{name}:{i}" for i in range(3)]
    await registry.aclose()
    assert shared.opened  # opened by the fixture, not by the registry: it stays open


async def test_the_readmes_shared_pool_example_runs_as_written(db: Database) -> None:
    """The README's PostgreSQL example, run as written (its table found on the role's
    search path): each user reads only their notes, under a pool that checked the table's
    row-level security when it opened (``rls_check="raise"``)."""
    from tests.documented import documented_code

    with _admin() as admin:
        admin.execute(
            db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'a'), ('bob', 'b')")
        )
    info = psycopg.conninfo.conninfo_to_dict(db.app_url)
    info["options"] = f"-c search_path={db.schema}"
    registry = Registry()
    namespace: dict[str, Any] = {
        "url": psycopg.conninfo.make_conninfo(**info),  # type: ignore[arg-type]
        "registry": registry,
    }
    exec(documented_code("README.md", "## PostgreSQL per user"), namespace)  # noqa: S102 - our own docs
    try:
        for user in ("alice", "bob"):
            async with registry.open_scope(_ctx(user)):
                assert await namespace["my_notes"]() == [(user[0],)]
    finally:
        await registry.aclose()


async def test_shared_policy_fails_closed_without_settings(
    db: Database, shared: SharedPool
) -> None:
    """With no user set (fresh session, reverted setting, or '') the policy shows nothing,
    accepts no new row and updates or deletes none of the rows there are."""
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            await conn.execute(
                db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'secret')")
            )

    async def nothing_reachable(conn: psycopg.AsyncConnection[Any]) -> None:
        assert await _scalar(conn, db.sql("SELECT count(*) FROM {notes}")) == 0
        for statement in ("UPDATE {notes} SET body = 'changed'", "DELETE FROM {notes}"):
            assert (await conn.execute(db.sql(statement))).rowcount == 0, statement

    async with await psycopg.AsyncConnection.connect(db.app_url, autocommit=True) as conn:
        assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") is None
        await nothing_reachable(conn)  # fresh: NULL
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.user_id', 'alice', true)")
            assert await _scalar(conn, db.sql("SELECT count(*) FROM {notes}")) == 1
        assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == ""
        await nothing_reachable(conn)  # reverted: ''
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('', 'x')"))
        await conn.execute("SELECT set_config('app.user_id', '', false)")
        await nothing_reachable(conn)  # set to '' outright
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
    assert bodies == [("secret",)]


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_shared_values_arrive_verbatim_never_as_sql(db: Database, conforming: str) -> None:
    """Ids full of quotes, backslashes and semicolons arrive verbatim and the role never
    changes, whether the server reads backslashes in string literals
    (``standard_conforming_strings`` off) or not: psycopg quotes each value for the
    connection it is sent on."""
    kwargs = db.kwargs()
    kwargs["options"] = f"{kwargs.get('options', '')} -c standard_conforming_strings={conforming}"
    nasty = [
        "o'brien",
        "'; SET ROLE postgres; --",
        "a\\b",
        "\\'; SET ROLE postgres; --",
        '"; DROP TABLE x; --',
        "ümlaut-用户-🙂",
        "$1",
        "%s",
    ]
    async with SharedPool(db.app_url, min_size=1, max_size=1, kwargs=kwargs) as pool:
        for value in nasty:
            with bind_context(_ctx(value, value)):
                async with pool.connection() as conn:
                    row = await (
                        await conn.execute(
                            "SELECT current_setting('app.user_id', true), "
                            "current_setting('app.tenant_id', true), current_user = session_user, "
                            "current_setting('standard_conforming_strings')"
                        )
                    ).fetchone()
            assert row == (value, value, True, conforming)


def _is_valid_id(value: str) -> bool:
    try:
        validate_id("id", value)
    except InvalidContextError:
        return False
    return True


# Ids as the context allows them: SQL's quoting and comment characters, psycopg's placeholder
# syntax and any printable Unicode (private use and unassigned code points included).
_any_id = (
    st.lists(
        st.one_of(
            st.sampled_from(["'", "''", "\\", '"', ";", "--", "/*", "$$", "%s", "%(x)s", "E'"]),
            st.sampled_from(["'; SET ROLE postgres; --", "'); RESET ALL; SELECT ('"]),
            st.text(
                st.characters(exclude_categories=("Cc", "Cs", "Cf", "Zl", "Zp", "Zs")),
                max_size=8,
            ),
            st.just(" "),
        ),
        min_size=1,
        max_size=12,
    )
    .map("".join)
    .filter(_is_valid_id)
)


@pytest.fixture(name="verbatim_db", scope="module")
def fixture_verbatim_db() -> Iterator[Database]:
    """One schema and role for every example of the property test below."""
    with make_database() as db:
        yield db


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(_any_id, min_size=1, max_size=6, unique=True))
def test_any_ids_arrive_verbatim_in_both_strategies(verbatim_db: Database, ids: list[str]) -> None:
    """Whatever ids the context allows, used as user and tenant at once by users checking
    out together: each of them reads back exactly its own ids from the settings, through
    SharedPool (quoted by psycopg in the statement that begins the checkout) and through
    PerUserPools (bound as parameters of the session's settings), and the role never
    changes."""
    db = verbatim_db

    async def check() -> dict[str, set[tuple[Any, ...]]]:
        seen: dict[str, set[tuple[Any, ...]]] = {}
        options: dict[str, Any] = {"timeout": 10, "rls_check": "off", "kwargs": db.kwargs()}
        for pool in (
            SharedPool(db.app_url, min_size=1, max_size=2, **options),
            PerUserPools(db.app_url, max_size=1, max_total=3, **options),
        ):
            registry = Registry()
            pool.install(registry)

            async def read(registry: Registry, value: str) -> None:
                async with registry.open_scope(_ctx(value, value)), connection() as conn:
                    cur = await conn.execute(
                        "SELECT current_setting('app.user_id', true), "
                        "current_setting('app.tenant_id', true), current_user = session_user"
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    seen.setdefault(value, set()).add(tuple(row))

            try:
                async with anyio.create_task_group() as tg:
                    for value in ids:
                        tg.start_soon(read, registry, value)
            finally:
                await registry.aclose()
        return seen

    seen = anyio.run(check, backend="asyncio")
    assert seen == {value: {(value, value, True)} for value in ids}


# -- SharedPool: transactions -----------------------------------------------------------------


async def test_shared_commits_on_success_and_rolls_back_on_error(
    db: Database, shared: SharedPool
) -> None:
    """The checkout's transaction commits when the body ends normally, rolls back on error."""

    class BoomError(Exception):
        pass

    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'kept')"))
        with pytest.raises(BoomError):
            async with shared.connection() as conn:
                await conn.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'dropped')")
                )
                raise BoomError
        async with shared.connection() as conn:
            bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
    assert bodies == [("kept",)]


async def test_shared_caught_statement_error_is_not_a_silent_commit(db: Database) -> None:
    """A block that catches a failed statement and ends normally is rolled back, and the
    checkout says so (InFailedSqlTransaction) instead of pretending to commit; an error
    caught inside a savepoint keeps the rest of the work. The connection is reused."""
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', %s)")
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="rolled back"):
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    await conn.execute(insert, ("lost",))
                    with contextlib.suppress(psycopg.errors.DivisionByZero):
                        await conn.execute("SELECT 1/0")
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                await conn.execute(insert, ("kept",))
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    async with conn.transaction():
                        await conn.execute("SELECT 1/0")
            async with pool.connection() as conn:
                bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
                user = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
        assert bodies == [("kept",)]
        assert user == "alice"
        assert pool.stats().discarded == 0


async def test_shared_failed_commit_raises_and_the_connection_is_reused(db: Database) -> None:
    """A commit that fails (a deferred constraint) raises from the checkout; the work is
    gone and the same connection, reset, serves the next checkout."""
    deferred = sql.Identifier(db.schema, "deferred")
    insert = sql.SQL("INSERT INTO {} VALUES (1)").format(deferred)
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            with pytest.raises(psycopg.errors.UniqueViolation):
                async with pool.connection() as conn:
                    pid = conn.info.backend_pid
                    await conn.execute(insert)
                    await conn.execute(insert)  # deferred: fails only at COMMIT
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                count = sql.SQL("SELECT count(*) FROM {}").format(deferred)
                assert await _scalar(conn, count) == 0
                user = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
        assert user == "alice"
        assert pool.stats().discarded == 0


async def test_shared_commit_inside_checkout_is_reported(db: Database, shared: SharedPool) -> None:
    """conn.commit() inside the checkout ends its transaction and its settings: what runs
    after it sees no rows (the policy fails closed), and the checkout raises at its end."""
    with bind_context(_ctx("alice")), pytest.raises(psycopg.ProgrammingError, match="ended"):
        async with shared.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')"))
            await conn.commit()
            assert await _scalar(conn, db.sql("SELECT count(*) FROM {notes}")) == 0
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_shared_commit_and_begin_inside_checkout_is_reported(
    db: Database, shared: SharedPool, end: str
) -> None:
    """A handler that ends the checkout's transaction and begins another ran the rest of its
    block without the settings: the connection is in a transaction again when the block
    ends, and the checkout still raises (what ran after BEGIN committed without them)."""
    with bind_context(_ctx("alice")), pytest.raises(psycopg.ProgrammingError, match="ended"):
        async with shared.connection() as conn:
            await conn.execute(f"{end}; BEGIN")
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == ""
    await _eventually(lambda: _shared_idle(shared), "pool idle again")
    assert shared.stats().discarded == 0


async def test_shared_checkout_begins_with_the_connections_transaction_characteristics(
    db: Database,
) -> None:
    """Connections made SERIALIZABLE and read-only (by a connection class): the checkout's
    own BEGIN ran READ COMMITTED and read-write all the same, silently."""

    class Serializable(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:
            conn = await super().connect(*args, **kwargs)
            await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            await conn.set_read_only(True)
            return conn

    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=1,
        rls_check="off",
        kwargs=db.kwargs(),
        connection_class=Serializable,
    ) as pool:
        for user in ("alice", "bob"):
            with bind_context(_ctx(user), allow_switch=True):
                async with pool.connection() as conn:
                    level = await _scalar(conn, "SELECT current_setting('transaction_isolation')")
                    read_only = await _scalar(
                        conn, "SELECT current_setting('transaction_read_only')"
                    )
                    setting = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
            assert (level, read_only, setting) == ("serializable", "on", user)


async def test_a_requests_notice_handlers_never_hear_the_next_users(db: Database) -> None:
    """Alice's request adds a notice and a notification handler to its connection; Bob's
    checkout gets the same connection next: his notices (here naming his data) and his
    notifications reach none of Alice's handlers."""
    heard: list[str] = []
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, rls_check="off", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                alice_pid = conn.info.backend_pid
                conn.add_notice_handler(lambda d: heard.append(f"notice {d.message_primary}"))
                conn.add_notify_handler(lambda n: heard.append(f"notify {n.payload}"))
                await conn.execute("DO $$BEGIN RAISE NOTICE 'alice: hello'; END$$")
        with bind_context(_ctx("bob")):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == alice_pid  # the same connection
                await conn.execute("LISTEN bobs_channel")
                await conn.execute(
                    "DO $$BEGIN RAISE NOTICE 'bob: %', current_setting('app.user_id'); END$$"
                )
                await conn.execute("NOTIFY bobs_channel, 'bob: secret'")
            async with pool.connection() as conn:  # bob's notification arrives after commit
                await conn.execute("SELECT 1")
    assert heard == ["notice alice: hello"]


async def test_a_requests_notify_handler_never_hears_what_the_next_user_commits(
    db: Database,
) -> None:
    """Alice's request adds a notification handler to its connection; Bob's checkout of the
    same connection listens on his channel, notifies it and commits inside the block
    (reported as an error): his notification arrives with that COMMIT, and reaches none of
    Alice's handlers."""
    heard: list[str] = []
    bobs: list[str] = []
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, rls_check="off", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                alice_pid = conn.info.backend_pid
                conn.add_notify_handler(lambda n: heard.append(f"notify {n.payload}"))
        with bind_context(_ctx("bob")), pytest.raises(psycopg.ProgrammingError):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == alice_pid  # the same connection
                conn.add_notify_handler(lambda n: bobs.append(n.payload))
                await conn.execute("LISTEN bobs_inbox")
                await conn.execute("NOTIFY bobs_inbox, 'bob: secret'")
                await conn.commit()
    assert bobs == ["bob: secret"]
    assert heard == []


async def test_a_notification_left_after_a_commit_never_reaches_the_next_user(
    db: Database,
) -> None:
    """Alice's handler commits inside its checkout (reported as an error) after sending her
    own channel a notification: it arrives with the COMMIT and waits in the connection's
    backlog. Bob's checkout of the same connection must not read it."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, rls_check="off", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")), pytest.raises(psycopg.ProgrammingError):
            async with pool.connection() as conn:
                alice_pid = conn.info.backend_pid
                await conn.execute("LISTEN alice_inbox")
                await conn.execute("NOTIFY alice_inbox, 'alice: reset code 123456'")
                await conn.commit()
        with bind_context(_ctx("bob")):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == alice_pid  # the same connection
                heard = [n.payload async for n in conn.notifies(timeout=0.2)]
    assert heard == []


async def test_per_user_pools_hand_the_next_checkout_a_connection_as_the_pool_made_it(
    db: Database,
) -> None:
    """A handler turns autocommit on (and read-only, and dict rows) inside its block, which a
    connection that is not yet in a transaction allows. The user's next checkout gets the
    same connection: with autocommit still on, its writes were committed statement by
    statement and its error rolled back nothing."""
    pools = PerUserPools(db.app_url, max_size=1, max_total=1, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
            first_pid = conn.info.backend_pid
            await conn.set_autocommit(True)
            await conn.set_read_only(True)
            conn.row_factory = dict_row  # type: ignore[assignment]
        with pytest.raises(LookupError):
            async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
                assert conn.info.backend_pid == first_pid
                assert (conn.autocommit, conn.read_only) == (False, None)
                await conn.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'half')")
                )
                assert type(await (await conn.execute("SELECT 1")).fetchone()) is tuple
                raise LookupError
        async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
            assert await _scalar(conn, db.sql("SELECT count(*) FROM {notes}")) == 0
    finally:
        await registry.aclose()


class _AlicesCursor(psycopg.AsyncCursor[Any]):
    """A cursor class one handler makes its connection's default."""


class _AlicesServerCursor(psycopg.AsyncServerCursor[Any]):
    """A named-cursor class one handler makes its connection's default."""


class _AlicesText(TextLoader):
    """How one handler loads text: every value as the same string."""

    def load(self, data: Buffer) -> str:
        return "loaded the way alice wanted"


class _AlicesDecimal(psycopg.adapt.Dumper):
    """How one handler dumps a Decimal: always 0."""

    oid = psycopg.adapters.types["numeric"].oid

    def dump(self, obj: Any) -> bytes:
        return b"0"


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_cursor_factories_and_adapters_a_handler_changed_are_restored(
    db: Database, strategy: str
) -> None:
    """A handler changes its connection's cursor classes, registers a text loader, a Decimal
    dumper and a type of its own on it. The next checkout of the same connection (another
    user's, with SharedPool; the same user's next request, with PerUserPools) gets it as the
    pool made it: the default cursor classes, text loaded as text, a Decimal sent as it is,
    without alice's type; and the connection was kept, not closed."""
    options: dict[str, Any] = {"rls_check": "off", "kwargs": db.kwargs()}
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, **options)
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, max_total=1, **options)
    )
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), connection() as conn:
            pid = conn.info.backend_pid
            conn.cursor_factory = _AlicesCursor
            conn.server_cursor_factory = _AlicesServerCursor
            conn.adapters.register_loader("text", _AlicesText)
            conn.adapters.register_dumper(decimal.Decimal, _AlicesDecimal)
            info = await psycopg.types.TypeInfo.fetch(conn, "text")
            assert info is not None
            info.name = "alices_text"
            info.register(conn)
            assert await _scalar(conn, "SELECT 'alice'::text") == "loaded the way alice wanted"
        second = "bob" if strategy == "shared" else "alice"
        async with registry.open_scope(_ctx(second)), connection() as conn:
            assert conn.info.backend_pid == pid  # the same connection
            assert type(conn.cursor()) is psycopg.AsyncCursor
            async with conn.cursor("named") as named:
                assert type(named) is psycopg.AsyncServerCursor
            assert await _scalar(conn, "SELECT %s::text", (second,)) == second
            assert await _scalar(conn, "SELECT %s", (decimal.Decimal("1.5"),)) == decimal.Decimal(
                "1.5"
            )
            assert conn.adapters.types.get("alices_text") is None
        if isinstance(pool, SharedPool):
            assert pool.stats().discarded == 0
    finally:
        await registry.aclose()


class _AlicesUntypedDecimal(psycopg.adapt.Dumper):
    """How one handler dumps a Decimal, as no type in particular: always 0."""

    def dump(self, obj: Any) -> bytes:
        return b"0"


class _AlicesInt4(psycopg.adapt.Dumper):
    """How one handler dumps a value known only as an int4 (COPY after set_types): 0."""

    oid = psycopg.adapters.types["int4"].oid

    def dump(self, obj: Any) -> bytes:
        return b"0"


async def _copied(conn: psycopg.AsyncConnection[Any], value: int) -> int:
    """``value`` copied as an int4 into a table of this transaction; what the table holds."""
    async with conn.cursor() as cur:
        await cur.execute("CREATE TEMPORARY TABLE copied (x int4) ON COMMIT DROP")
        async with cur.copy("COPY copied (x) FROM STDIN") as copy:
            copy.set_types(["int4"])
            await copy.write_row([value])
        await cur.execute("SELECT x FROM copied")
        row = await cur.fetchone()
        await cur.execute("DROP TABLE copied")
    assert row is not None
    return int(row[0])


async def _register(conn: psycopg.AsyncConnection[Any], what: str) -> None:
    """Register ``what`` on ``conn``, each in one of the mappings of its adapters map only,
    and check that it took."""
    adapters = conn.adapters
    if what == "a loader":
        adapters.register_loader("text", _AlicesText)
        assert await _scalar(conn, "SELECT 'alice'::text") == "loaded the way alice wanted"
    elif what == "a dumper":
        adapters.register_dumper(decimal.Decimal, _AlicesUntypedDecimal)
        assert await _scalar(conn, "SELECT %s::text", (decimal.Decimal("1.5"),)) == "0"
    elif what == "a dumper by type":
        adapters.register_dumper(None, _AlicesInt4)
        assert await _copied(conn, 7) == 0
    else:
        text = psycopg.adapters.types["text"]
        adapters.types.add(psycopg.types.TypeInfo("alices_text", text.oid, text.array_oid))
        assert adapters.types[text.oid].name == "alices_text"


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("what", ["a loader", "a dumper", "a dumper by type", "a type"])
async def test_each_kind_of_adapter_a_handler_registered_alone_is_undone(
    db: Database, strategy: str, what: str
) -> None:
    """A handler registers one thing only on its connection: a text loader, a Decimal
    dumper, an int4 dumper used where only the type is known (COPY after set_types), or a
    type. Each lives in a mapping of the connection's adapters of its own, and the next
    checkout of the same connection gets the pool's adapters back whichever it was; so
    does the one after a second handler registered the same on the adapters given back.
    (With SharedPool alice, bob and carol check out in turn; with PerUserPools alice does,
    three times.)"""
    options: dict[str, Any] = {"rls_check": "off", "kwargs": db.kwargs()}
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, **options)
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, max_total=1, **options)
    )
    users = ["alice", "bob", "carol"] if strategy == "shared" else ["alice"] * 3
    pids: set[int] = set()
    text = psycopg.adapters.types["text"]
    registry = Registry()
    pool.install(registry)
    try:
        for user in users[:2]:
            async with registry.open_scope(_ctx(user)), connection() as conn:
                pids.add(conn.info.backend_pid)
                await _register(conn, what)
        async with registry.open_scope(_ctx(users[2])), connection() as conn:
            pids.add(conn.info.backend_pid)
            assert await _scalar(conn, "SELECT %s::text", (users[2],)) == users[2]
            assert await _scalar(conn, "SELECT %s::text", (decimal.Decimal("1.5"),)) == "1.5"
            assert await _copied(conn, 8) == 8
            assert conn.adapters.types.get("alices_text") is None
            assert conn.adapters.types[text.oid].name == "text"
    finally:
        await registry.aclose()
    assert len(pids) == 1  # the same connection throughout


async def test_shared_set_local_is_effective_with_no_warning(shared: SharedPool) -> None:
    """SET LOCAL inside a checkout works: the connection is in a transaction block, so
    PostgreSQL draws no 'can only be used in transaction blocks' warning (autocommit
    pitfall)."""
    notices: list[str] = []
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            conn.add_notice_handler(lambda diag: notices.append(str(diag.message_primary)))
            await conn.execute("SET LOCAL statement_timeout = '7s'")
            timeout = await _scalar(conn, "SHOW statement_timeout")
            user = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
            conn._notice_handlers.clear()
    assert (timeout, user) == ("7s", "alice")
    assert notices == []


async def test_shared_savepoint_rollback_keeps_the_settings(shared: SharedPool) -> None:
    """A nested transaction that fails rolls back to its savepoint, never past the
    settings, which were set before any savepoint."""
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with conn.transaction():
                    await conn.execute("SELECT 1 / 0")
            user = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
    assert user == "alice"


# -- SharedPool: a returned connection is clean --------------------------------------------------


@pytest.mark.load
async def test_shared_leak_check_10000_alternating_checkouts(db: Database) -> None:
    """max_size=1: over 10,000 alternating checkouts of two users on one physical
    connection (same backend pid throughout), each sees only its own settings, and a
    session-level SET by one is gone before the other's next checkout."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        alice, bob = _ctx("alice"), _ctx("bob", "globex")
        pids: set[int] = set()
        for i in range(10_000):
            ctx = alice if i % 2 == 0 else bob
            with bind_context(ctx, allow_switch=True):
                async with pool.connection() as conn:
                    row = await (
                        await conn.execute(
                            "SELECT current_setting('app.user_id', true), "
                            "current_setting('app.tenant_id', true), "
                            "current_setting('app.leak', true), pg_backend_pid()"
                        )
                    ).fetchone()
                    assert row is not None
                    assert row[:3] in (
                        (ctx.user_id, ctx.tenant_id, None),
                        (ctx.user_id, ctx.tenant_id, ""),
                    )
                    pids.add(row[3])
                    if i % 10 == 0:  # a handler leaving session state behind
                        await conn.execute(
                            "SELECT set_config('app.leak', %s, false)", (ctx.user_id,)
                        )
                        await conn.execute(
                            "SELECT set_config('app.user_id', %s, false)", (ctx.user_id,)
                        )
        assert len(pids) == 1
        assert pool.stats().discarded == 0


async def test_shared_session_state_is_reset(db: Database) -> None:
    """SET, SET ROLE-free session changes, temp tables and a changed row factory left by one
    user's handler are all gone for the next user on the same connection."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute("SET app.user_id = 'alice'")
                await conn.execute("SET search_path = pg_catalog")
                await conn.execute("CREATE TEMP TABLE alice_scratch (x int)")
                await conn.execute("SELECT pg_advisory_lock(42)")
                conn.row_factory = dict_row  # type: ignore[assignment]
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                cur = await conn.execute(
                    "SELECT current_setting('search_path'), "
                    "to_regclass('pg_temp.alice_scratch') IS NULL, "
                    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid())"
                )
                row = await cur.fetchone()
        assert row == ('"$user", public', True, 0)


async def test_shared_sql_prepared_statement_is_not_handed_on(db: Database) -> None:
    """A statement prepared with SQL PREPARE (which the reset keeps, as it keeps psycopg's
    own) makes the connection dirty: it is closed, and the next user cannot EXECUTE it."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute("PREPARE alice_secret AS SELECT 'alice-only'")
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                    async with conn.transaction():  # a savepoint: the checkout goes on
                        await conn.execute("EXECUTE alice_secret")
        assert pool.stats().discarded == 1


@pytest.mark.parametrize("deallocate", ["by name", "DEALLOCATE ALL seen before"])
async def test_shared_a_deallocated_psycopg_statement_is_not_handed_on(
    db: Database, deallocate: str
) -> None:
    """A handler deallocates a statement psycopg prepared on its connection: by name, or
    with a DEALLOCATE ALL psycopg has run before on the connection (it notices only a new
    one). psycopg would go on using the statement, so the next user's same query would
    fail with "prepared statement does not exist": the connection is closed instead, and
    the next user's query runs."""
    query = db.sql("SELECT count(*) FROM {notes}")
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                if deallocate == "by name":
                    await conn.execute(query, prepare=True)
                    name = await _scalar(
                        conn, "SELECT name FROM pg_prepared_statements WHERE NOT from_sql"
                    )
                    await conn.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(name)))
                else:
                    await conn.execute("DEALLOCATE ALL")  # nothing prepared yet
                    await conn.execute(query, prepare=True)
                    await conn.execute("DEALLOCATE ALL")
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                row = await (await conn.execute(query, prepare=True)).fetchone()
                assert conn.info.backend_pid != pid
        assert row == (0,)
        assert pool.stats().discarded == 1


async def test_shared_psycopgs_prepared_statements_are_kept_across_checkouts(db: Database) -> None:
    """Checkouts that commit and that roll back keep the connection and psycopg's own
    prepared statements work on (none deallocated by a handler: nothing is discarded)."""
    query = db.sql("SELECT count(*) FROM {notes}")
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        for turn in range(4):
            with bind_context(_ctx(f"user{turn}")), contextlib.suppress(LookupError):
                async with pool.connection() as conn:
                    row = await (await conn.execute(query, prepare=True)).fetchone()
                    assert row == (0,)
                    if turn % 2:
                        raise LookupError  # rolled back
        assert pool.stats().discarded == 0


async def test_shared_a_seed_one_user_set_does_not_decide_the_next_users_random(
    db: Database,
) -> None:
    """A handler seeds the session's random() with setseed(), which DISCARD ALL keeps: the
    next user's random() on the same connection must not be the sequence that seed makes
    (which the first user could compute)."""
    async with await psycopg.AsyncConnection.connect(db.admin_url, autocommit=True) as conn:
        await conn.execute("SELECT setseed(0.5)")
        seeded = [await _scalar(conn, "SELECT random()") for _ in range(3)]
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute("SELECT setseed(0.5)")
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                drawn = [await _scalar(conn, "SELECT random()") for _ in range(3)]
        assert pool.stats().discarded == 0
    assert drawn != seeded


async def test_shared_changed_role_is_not_handed_on(db: Database) -> None:
    """A handler that switches role (SET ROLE): the reset undoes it (behind a pooler,
    closing the connection would not: the pooler keeps the server session), and the next
    user runs as the login role on the same connection."""
    app_role = await _role_of(db.app_url)
    owner_role = await _role_of(db.owner_url)
    with _admin() as admin:
        admin.execute(f"GRANT {owner_role} TO {app_role}")
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner_role)))
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                assert conn.info.backend_pid == pid
                assert await _scalar(conn, "SELECT current_user") == app_role
        assert pool.stats().discarded == 0


async def _role_of(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return str(await _scalar(conn, "SELECT current_user"))


async def test_shared_sessions_that_start_as_another_role_are_reused_as_that_role(
    db: Database,
) -> None:
    """The pool logs in as a role that only switches to the app role (``options=-c
    role=...``, as an ``ALTER ROLE ... SET role`` default would): the reset brings each
    session back to the app role, even after a handler's ``SET ROLE NONE``, and the same
    connection serves user after user as the app role, each with its own rows. Before,
    the reset check expected the login role, so every connection was closed on its first
    return (a new server session per checkout, and a warning each time)."""
    app_role = await _role_of(db.app_url)
    login = f"{app_role}_login"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {login} LOGIN NOINHERIT NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"GRANT {app_role} TO {login}")
    kwargs = {**db.kwargs(), "options": f"-c role={app_role}"}
    seen: list[tuple[Any, ...]] = []
    try:
        async with SharedPool(
            _url_for(login),
            min_size=1,
            max_size=1,
            timeout=5,
            rls_tables=[db.notes],
            rls_check="raise",
            kwargs=kwargs,
        ) as pool:
            for user in ("alice", "bob", "carol", "alice"):
                with bind_context(_ctx(user), allow_switch=True):
                    async with pool.connection() as conn:
                        await conn.execute(
                            db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'n')"), (user,)
                        )
                        cur = await conn.execute(
                            db.sql(
                                "SELECT current_user, pg_backend_pid(), "
                                "(SELECT array_agg(DISTINCT owner) FROM {notes})"
                            )
                        )
                        row = await cur.fetchone()
                        assert row is not None
                        seen.append(tuple(row))
                        await conn.execute("SET ROLE NONE")  # back to the login role
            discarded = pool.stats().discarded
    finally:
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (login,),
            )
            admin.execute(f"DROP ROLE {login}")
    assert [(role, owners) for role, _, owners in seen] == [
        (app_role, [user]) for user in ("alice", "bob", "carol", "alice")
    ]
    assert len({pid for _, pid, _ in seen}) == 1
    assert discarded == 0


async def test_shared_sessions_that_start_as_another_role_than_the_first_are_refused(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler makes the pool's login start its sessions as a BYPASSRLS role it is a
    member of (``ALTER ROLE CURRENT_USER SET role``, which any role may run for itself),
    and leaves its connection to be closed (a SQL PREPARE). The connection opened next
    starts as that role: it is refused, and the next user's checkout gets a 503, instead
    of reading every user's rows through it (and every connection after it). The pool
    checked the role its first connection started as, and only that one."""
    app_role = await _role_of(db.app_url)
    login = f"{app_role}_switching_login"
    bypass = f"{app_role}_switching_bypass"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {bypass} NOLOGIN BYPASSRLS")
        admin.execute(f"GRANT {app_role} TO {bypass}")
        admin.execute(f"CREATE ROLE {login} LOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"GRANT {app_role}, {bypass} TO {login}")
        admin.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'a')"))
    seen: list[Any] = []
    try:
        async with SharedPool(
            _url_for(login),
            min_size=1,
            max_size=1,
            timeout=2,
            rls_tables=[db.notes],
            rls_check="raise",
            kwargs=db.kwargs(),
        ) as pool:
            with bind_context(_ctx("mallory")):
                async with pool.connection() as conn:
                    await conn.execute(f"ALTER ROLE CURRENT_USER SET role = {bypass}")
                    await conn.execute("PREPARE kept AS SELECT 1")
            with bind_context(_ctx("bob"), allow_switch=True):
                try:
                    async with pool.connection() as conn:
                        cur = await conn.execute(
                            db.sql("SELECT current_user, (SELECT count(*) FROM {notes})")
                        )
                        seen.append(await cur.fetchone())
                except PoolExhaustedError:
                    seen.append("refused")
    finally:
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (login,),
            )
            admin.execute(f"DROP ROLE {login}")
            admin.execute(f"DROP ROLE {bypass}")
    assert seen == ["refused"]
    assert any(bypass in record.getMessage() for record in caplog.records)


async def test_per_user_sessions_that_start_as_another_role_than_the_first_are_refused(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """PerUserPools: a handler makes the login start its sessions as a BYPASSRLS role it is
    a member of (``ALTER ROLE CURRENT_USER SET role``, which any role may run for itself).
    The next user's pool opens a connection that starts as that role: it is refused, and
    that user's checkout gets a 503, instead of reading every user's rows through it. The
    strategy checked the role its first connection started as, and only that one."""
    app_role = await _role_of(db.app_url)
    login = f"{app_role}_per_user_switching_login"
    bypass = f"{app_role}_per_user_switching_bypass"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {bypass} NOLOGIN BYPASSRLS")
        admin.execute(f"GRANT {app_role} TO {bypass}")
        admin.execute(f"CREATE ROLE {login} LOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"GRANT {app_role}, {bypass} TO {login}")
        admin.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'a')"))
    seen: list[Any] = []
    registry = Registry()
    pools = PerUserPools(
        _url_for(login),
        max_size=1,
        max_total=4,
        timeout=2,
        rls_tables=[db.notes],
        rls_check="raise",
        kwargs=db.kwargs(),
    )
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("mallory")), pools.connection() as conn:
            await conn.execute(f"ALTER ROLE CURRENT_USER SET role = {bypass}")
        async with registry.open_scope(_ctx("bob")):
            try:
                async with pools.connection() as conn:
                    cur = await conn.execute(
                        db.sql("SELECT current_user, (SELECT count(*) FROM {notes})")
                    )
                    seen.append(await cur.fetchone())
            except PoolExhaustedError:
                seen.append("refused")
    finally:
        await registry.aclose()
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (login,),
            )
            admin.execute(f"DROP ROLE {login}")
            admin.execute(f"DROP ROLE {bypass}")
    assert seen == ["refused"]
    assert any(bypass in record.getMessage() for record in caplog.records)


def _commit_waits_for_its_lock(db: Database) -> None:
    """Make every COMMIT of an insert into ``db``'s plain table wait for the advisory lock
    named by the schema (a deferred constraint trigger takes it): whoever holds that lock
    holds such a COMMIT on the server."""
    schema = sql.Identifier(db.schema)
    with _admin() as admin:
        admin.execute(
            sql.SQL(
                "CREATE FUNCTION {}.wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_catalog.pg_advisory_xact_lock(hashtext({})); "
                "RETURN NULL; END $$"
            ).format(schema, sql.Literal(db.schema))
        )
        admin.execute(
            sql.SQL(
                "CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT ON {}.plain "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {}.wait_at_commit()"
            ).format(schema, schema)
        )
        admin.execute(sql.SQL("GRANT INSERT ON {}.plain TO PUBLIC").format(schema))


@pytest.mark.parametrize("kind", ["shared", "per_user"])
async def test_a_commit_given_up_at_return_timeout_is_cancelled_on_the_server(
    db: Database, kind: str
) -> None:
    """A COMMIT that waits on the server (here a deferred trigger waiting for a lock
    another session holds) is given up at ``return_timeout``: the caller hears that its
    outcome is unknown, the server stops running it instead of waiting on, holding the
    transaction's locks, until the lock comes free, and a shared pool counts the connection
    as discarded. Before, the cancel psycopg sends
    when its wait is interrupted was interrupted by the same deadline, and the connection
    was closed with the COMMIT still running."""
    schema = sql.Identifier(db.schema)
    _commit_waits_for_its_lock(db)
    options: dict[str, Any] = {"return_timeout": 0.5, "rls_check": "off", "kwargs": db.kwargs()}
    pool = (
        SharedPool(db.app_url, min_size=1, max_size=1, **options)
        if kind == "shared"
        else PerUserPools(db.app_url, max_size=1, max_total=1, **options)
    )
    registry = Registry()
    pool.install(registry)
    insert = sql.SQL("INSERT INTO {}.plain VALUES ('alice')").format(schema)
    waiting = (
        "SELECT count(*) FROM pg_catalog.pg_stat_activity "
        "WHERE application_name = %s AND wait_event_type = 'Lock'"
    )

    async def still_waiting() -> bool:
        return int(await _admin_scalar(db, waiting, (db.app_name,))) > 0

    async def gone() -> bool:
        return not await still_waiting()

    try:
        with _admin() as holder:
            holder.autocommit = False
            holder.execute("SELECT pg_catalog.pg_advisory_xact_lock(hashtext(%s))", (db.schema,))
            with pytest.raises(psycopg.OperationalError, match="may or may not"):
                async with registry.open_scope(_ctx("alice")), connection() as conn:
                    await conn.execute(insert)
            await _eventually(gone, "the COMMIT given up stops on the server", within=10.0)
            if isinstance(pool, SharedPool):
                assert pool.stats().discarded == 1
            holder.rollback()
    finally:
        await registry.aclose()


async def test_shared_dirty_connection_is_discarded(db: Database) -> None:
    """When the reset cannot clean a connection, it is closed and replaced, never handed
    on (the reset is sabotaged to simulate one that fails)."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        pool._reset_sql = (  # a reset that resets nothing
            "SELECT current_user, session_user, NULL, "
            "(SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql), false, "
            "current_setting('app.user_id', true), "
            "current_setting('app.tenant_id', true)"
        )
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
                await conn.execute("SET app.tenant_id = 'evil'")
        # Ending the checkout's transaction inside it (to see the session value, not ours)
        # is reported when the block ends.
        with (
            bind_context(_ctx("bob", None), allow_switch=True),
            pytest.raises(psycopg.ProgrammingError, match="ended"),
        ):
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                await conn.execute("COMMIT; BEGIN")
                tenant = await _scalar(conn, "SELECT current_setting('app.tenant_id', true)")
        assert tenant in (None, "")
        assert pool.stats().discarded == 1


async def test_shared_writes_after_a_commit_inside_the_checkout_are_rolled_back(
    db: Database,
) -> None:
    """A handler ends the checkout's transaction itself and begins another, then writes:
    the checkout raises "ended inside", and the write it made without the context's
    settings is rolled back, not committed with the error (what ran before the handler's
    own commit stays)."""
    deferred = sql.Identifier(db.schema, "deferred")
    insert = sql.SQL("INSERT INTO {} VALUES (%s)").format(deferred)
    async with SharedPool(db.app_url, min_size=1, max_size=1, kwargs=db.kwargs()) as pool:
        with bind_context(_ctx("alice")), pytest.raises(psycopg.ProgrammingError, match="ended"):
            async with pool.connection() as conn:
                await conn.execute(insert, (1,))
                await conn.execute("COMMIT; BEGIN")
                await conn.execute(insert, (2,))
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                assert await _scalar(conn, "SELECT txid_current_if_assigned()") is None
                rows = await _scalar(conn, sql.SQL("SELECT array_agg(x) FROM {}").format(deferred))
        assert pool.stats().discarded == 0
    assert rows == [1]


@pytest.mark.parametrize("then", ["a caught error", "another commit"])
async def test_shared_an_error_after_a_commit_inside_the_checkout_owns_that_commit(
    db: Database, then: str
) -> None:
    """A handler ends the checkout's transaction itself, begins another and writes; then
    a statement fails and its error is caught (the checkout raises InFailedSqlTransaction),
    or it commits again and begins a third (the checkout raises "ended inside"). What it
    committed stays, and the error says so: it said that nothing of the transaction was
    committed, or that the transaction begun after the checkout's was rolled back."""
    deferred = sql.Identifier(db.schema, "deferred")
    insert = sql.SQL("INSERT INTO {} VALUES (%s)").format(deferred)
    async with SharedPool(db.app_url, min_size=1, max_size=1, kwargs=db.kwargs()) as pool:
        with bind_context(_ctx("alice")), pytest.raises(psycopg.Error) as raised:
            async with pool.connection() as conn:
                await conn.execute(insert, (1,))
                await conn.execute("COMMIT; BEGIN")
                await conn.execute(insert, (2,))
                if then == "a caught error":
                    with contextlib.suppress(psycopg.errors.UndefinedTable):
                        await conn.execute("SELECT FROM no_such_table")
                else:
                    await conn.execute("COMMIT; BEGIN")
                    await conn.execute(insert, (3,))
    async with await psycopg.AsyncConnection.connect(db.admin_url) as admin:
        query = sql.SQL("SELECT array_agg(x ORDER BY x) FROM {}").format(deferred)
        rows = await _scalar(admin, query)
    if then == "a caught error":
        assert isinstance(raised.value, psycopg.errors.InFailedSqlTransaction)
        assert rows == [1]
        assert "but what the block committed itself" in str(raised.value)
    else:
        assert isinstance(raised.value, psycopg.ProgrammingError)
        assert rows == [1, 2]
        assert "the transaction still open as the block ended was rolled back" in str(raised.value)


_CHECK_ONLY = (
    "SELECT current_user, session_user, NULL, "
    "(SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql), false, "
    "current_setting('app.user_id', true), current_setting('app.tenant_id', true)"
)


@pytest.mark.parametrize(
    "reset", ["SELECT 1/0", f"BEGIN; {_CHECK_ONLY}"], ids=["raises", "leaves-a-transaction-open"]
)
async def test_shared_connection_whose_reset_fails_is_discarded(db: Database, reset: str) -> None:
    """A reset that raises, or that leaves a transaction open, closes the connection: the
    next user gets a new backend in a fresh transaction with only its own settings. (The
    reset travels with the commit, so its error reaches the checkout that returned the
    connection: in one round trip the two cannot be told apart.)"""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        pool._reset_sql = reset
        failing = pytest.raises(psycopg.errors.DivisionByZero)
        with bind_context(_ctx("alice")), failing if "1/0" in reset else contextlib.nullcontext():
            async with pool.connection() as conn:
                pid = conn.info.backend_pid
        pool._reset_sql = _CHECK_ONLY
        with bind_context(_ctx("bob", None), allow_switch=True):
            async with pool.connection() as conn:
                assert conn.info.backend_pid != pid
                started = await _scalar(conn, "SELECT txid_current_if_assigned()")
                settings = await (
                    await conn.execute(
                        "SELECT current_setting('app.user_id', true), "
                        "current_setting('app.tenant_id', true)"
                    )
                ).fetchone()
        assert started is None  # nothing of alice's transaction carried over
        assert settings == ("bob", "")
        assert pool.stats().discarded == 1


async def test_shared_settings_are_transaction_local(db: Database) -> None:
    """The settings end with the checkout's transaction: even with a reset that resets
    nothing, the connection comes back clean and is kept (same backend, none discarded)."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, rls_check="raise", kwargs=db.kwargs()
    ) as pool:
        pool._reset_sql = (  # a reset that resets nothing: only the check remains
            "SELECT current_user, session_user, NULL, "
            "(SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql), false, "
            "current_setting('app.user_id', true), "
            "current_setting('app.tenant_id', true)"
        )
        pids: set[int] = set()
        for user in ("alice", "bob", "carol"):
            with bind_context(_ctx(user), allow_switch=True):
                async with pool.connection() as conn:
                    pids.add(conn.info.backend_pid)
        assert len(pids) == 1
        assert pool.stats().discarded == 0


# -- SharedPool: limits, exhaustion, cancellation -------------------------------------------------


async def test_shared_per_user_limit(shared: SharedPool) -> None:
    """A user holding per_user_limit connections waits (then gets PoolExhaustedError);
    another user still gets one at once."""
    hold = anyio.Event()
    held = 0
    all_held = anyio.Event()

    async def holder() -> None:
        nonlocal held
        with bind_context(_ctx("alice")):
            async with shared.connection():
                held += 1
                if held == 2:
                    all_held.set()
                await hold.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        tg.start_soon(holder)
        await all_held.wait()
        with bind_context(_ctx("alice")):
            started = time.monotonic()
            with pytest.raises(PoolExhaustedError) as info:
                async with shared.connection(timeout=0.3):
                    pass
            assert time.monotonic() - started < 2
        with bind_context(_ctx("bob")):
            async with shared.connection(timeout=0.3) as conn:
                assert await _scalar(conn, "SELECT 1") == 1
        hold.set()
    assert info.value.http_status == 503
    assert info.value.retry_after == 1.0
    assert "per_user_limit" in str(info.value)
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


async def test_shared_a_wait_for_the_users_share_that_timed_out_takes_no_place(
    shared: SharedPool,
) -> None:
    """alice holds her whole share (per_user_limit=2) and a third checkout of hers times
    out waiting for it; when one of her two connections comes back, her next checkout gets
    its place at once, while the other is still held. The timed-out wait leaves no place in
    her line to be handed the returned one and lost."""
    async with anyio.create_task_group() as tg:
        first = await _hold(tg, shared, "alice")
        second = await _hold(tg, shared, "alice")
        with bind_context(_ctx("alice")):
            with pytest.raises(PoolExhaustedError, match="per_user_limit"):
                async with shared.connection(timeout=0.2):
                    pytest.fail("alice's share is taken")
            first.set()
            await _eventually(
                _async(lambda: shared.stats().checked_out == 1), "one of alice's returned"
            )
            async with shared.connection(timeout=2) as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id')") == "alice"
        second.set()
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


async def test_shared_stats_count_each_user_and_tenant_with_a_checkout(shared: SharedPool) -> None:
    """stats() counts the checkouts in progress and the users holding them, a user being
    one user_id in one tenant: alice of acme holding her whole share (per_user_limit=2)
    leaves alice of another tenant served at once, and bob's checkout counts as a third
    user's."""
    async with anyio.create_task_group() as tg:
        releases = [await _hold(tg, shared, user) for user in ("alice", "alice", "bob")]
        with bind_context(_ctx("alice", "globex")):
            async with shared.connection(timeout=0.3) as conn:
                assert await _scalar(conn, "SELECT current_setting('app.tenant_id')") == "globex"
                stats = shared.stats()
                assert (stats.checked_out, stats.users, stats.waiting) == (4, 3, 0)
                assert stats.size - stats.available == 4
        for release in releases:
            release.set()
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


async def test_shared_max_waiting_bounds_the_wait_for_a_users_share(db: Database) -> None:
    """max_waiting=2, per_user_limit=1: alice holds her one connection and two more of her
    checkouts wait for it; her next ones are refused at once with a 503 error that says
    why, as psycopg refuses a checkout past max_waiting in the pool's own queue, while bob
    is still served. Before, every further checkout of alice's waited the whole timeout
    for her share, however many already did."""
    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=2,
        per_user_limit=1,
        timeout=10,
        rls_check="off",
        kwargs=db.kwargs(),
        max_waiting=2,
    ) as pool:
        served: list[str] = []

        async def queued() -> None:
            with bind_context(_ctx("alice")):
                async with pool.connection() as conn:
                    served.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))

        async with anyio.create_task_group() as tg:
            release = await _hold(tg, pool, "alice")
            for _ in range(2):
                tg.start_soon(queued)
            alice = UserRef("alice", "acme")
            await _eventually(
                _async(lambda: len(pool._gates[alice].waiters) == 2), "two of alice's wait"
            )
            with bind_context(_ctx("alice")), anyio.fail_after(2):
                for _ in range(3):
                    with pytest.raises(PoolExhaustedError, match="max_waiting=2") as info:
                        async with pool.connection():
                            pytest.fail("alice's share is taken")
            await _checkout_once(pool, "bob")
            release.set()
        assert served == ["alice", "alice"]
        assert info.value.http_status == 503
        assert "per_user_limit" in str(info.value)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")


async def _hold(tg: anyio.abc.TaskGroup, pool: SharedPool, user: str) -> anyio.Event:
    """Start a task in ``tg`` in which ``user`` holds one of ``pool``'s connections until
    the returned event is set; return once it holds it."""
    release = anyio.Event()
    holding = anyio.Event()

    async def holder() -> None:
        with bind_context(_ctx(user)):
            async with pool.connection():
                holding.set()
                await release.wait()

    tg.start_soon(holder)
    await holding.wait()
    return release


async def test_shared_exhaustion_raises_within_timeout(db: Database) -> None:
    """With every connection held, a checkout fails with PoolExhaustedError after its
    timeout, not a hang."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=5, retry_after=2.5, rls_check="raise"
    ) as pool:
        async with anyio.create_task_group() as tg:
            release = await _hold(tg, pool, "alice")
            started = time.monotonic()
            with bind_context(_ctx("bob")), pytest.raises(PoolExhaustedError) as info:
                async with pool.connection(timeout=0.3):
                    pass
            elapsed = time.monotonic() - started
            release.set()
        assert 0.25 < elapsed < 2
        assert info.value.retry_after == 2.5
        await _eventually(lambda: _shared_idle(pool), "pool idle again")


async def test_shared_wait_for_the_users_share_ends_at_the_checkouts_deadline(
    db: Database,
) -> None:
    """A checkout that waited for the pool to open on first use, and then for the user's
    share (taken by the user's other checkout, which opened the pool), fails within its own
    timeout. Before, its wait for the share started over with the whole timeout."""
    connecting, connect = anyio.Event(), anyio.Event()

    class Slow(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:
            connecting.set()
            await connect.wait()
            return await super().connect(*args, **kwargs)

    pool = SharedPool(
        db.app_url,
        min_size=1,
        max_size=2,
        per_user_limit=1,
        timeout=1.0,
        rls_check="raise",
        kwargs=db.kwargs(),
        connection_class=Slow,
    )
    registry = Registry()
    pool.install(registry)
    release = anyio.Event()

    async def opener() -> None:
        async with registry.open_scope(_ctx("alice")), pool.connection():
            await release.wait()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(opener)
            await connecting.wait()
            async with registry.open_scope(_ctx("alice")):
                started = time.monotonic()
                tg.start_soon(_later, 0.8, connect.set)
                with anyio.fail_after(5), pytest.raises(PoolExhaustedError, match="per_user"):
                    async with pool.connection():
                        pytest.fail("the user's share is taken")
                elapsed = time.monotonic() - started
            release.set()
    finally:
        await registry.aclose()
    assert 0.9 < elapsed < 1.5, elapsed


async def _later(delay: float, then: Callable[[], object]) -> None:
    """Call ``then`` after ``delay`` seconds (time a test lets pass on purpose)."""
    await anyio.sleep(delay)
    then()


@pytest.mark.parametrize("wait_for", ["pool", "user share"])
async def test_shared_callers_deadline_wins_over_the_pool_timeout(
    db: Database, wait_for: str
) -> None:
    """A caller's own deadline (fail_after) ends a checkout that waits for a connection (or
    for the user's share) at that deadline, not after the pool's 30 s timeout, as a
    TimeoutError rather than PoolExhaustedError; the pool then serves as before."""
    async with SharedPool(
        db.app_url, min_size=1, max_size=1, per_user_limit=1, timeout=30, rls_check="raise"
    ) as pool:
        waiter = "alice" if wait_for == "user share" else "bob"
        async with anyio.create_task_group() as tg:
            release = await _hold(tg, pool, "alice")
            started = time.monotonic()
            with bind_context(_ctx(waiter)), pytest.raises(TimeoutError):
                with anyio.fail_after(0.5):
                    async with pool.connection():
                        pass
            elapsed = time.monotonic() - started
            release.set()
        assert 0.4 < elapsed < 10  # the pool's timeout is 30 s
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        await _checkout_once(pool, waiter)
        assert pool.stats().checked_out == 0


async def test_shared_cancel_while_waiting_loses_nothing(shared: SharedPool) -> None:
    """Tasks cancelled while waiting for a connection leave the pool as it was."""
    release = anyio.Event()
    holding = 0
    all_holding = anyio.Event()

    async def holder(user: str) -> None:
        nonlocal holding
        with bind_context(_ctx(user)):
            async with shared.connection():
                holding += 1
                if holding == 4:
                    all_holding.set()
                await release.wait()

    async with anyio.create_task_group() as tg:
        for user in ("a", "b", "c", "d"):
            tg.start_soon(holder, user)
        await all_holding.wait()
        with anyio.CancelScope() as waiters:
            async with anyio.create_task_group() as inner:
                for n in range(10):
                    inner.start_soon(_checkout_once, shared, f"waiter-{n}")
                await _eventually(_async(lambda: shared.stats().waiting == 10), "10 waiting")
                waiters.cancel()
        release.set()
    await _eventually(lambda: _shared_idle(shared), "pool idle again")
    assert shared.stats().size == 4


@pytest.mark.parametrize("waits_for", ["user share", "pool"])
async def test_shared_checkout_cancelled_as_a_connection_is_handed_to_it_loses_none(
    db: Database, waits_for: str
) -> None:
    """max_size=1, per_user_limit=1: a second checkout waits for alice's share (alice
    again) or for the pool's one connection (bob). Alice's checkout ends and cancels the
    waiter a few steps later, at each step in turn, so that the cancellation lands while
    the share or the connection is being handed over, or during the waiter's first
    statement: every time, the share and the connection come back, and carol is served
    at once after."""
    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=1,
        per_user_limit=1,
        timeout=5,
        rls_check="off",
        kwargs=db.kwargs(),
    ) as pool:
        waiter_user = "alice" if waits_for == "user share" else "bob"

        async def one_round(steps: int) -> None:
            waiting = anyio.CancelScope()
            holding, release = anyio.Event(), anyio.Event()

            async def holder() -> None:
                with bind_context(_ctx("alice")):
                    async with pool.connection():
                        holding.set()
                        await release.wait()
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                waiting.cancel()

            async def waiter() -> None:
                with waiting, bind_context(_ctx(waiter_user)):
                    async with pool.connection() as conn:
                        await conn.execute("SELECT 1")

            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await holding.wait()
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                release.set()

        for steps in range(12):
            await one_round(steps)
            await _eventually(lambda: _shared_idle(pool), f"pool idle after {steps} steps")
            assert (pool.stats().size, pool._gates) == (1, {})
            with anyio.fail_after(5):
                await _checkout_once(pool, "carol")


async def test_shared_checkout_cancelled_by_asyncio_as_its_share_is_handed_to_it_hands_it_on(
    db: Database,
) -> None:
    """per_user_limit=1: alice holds her share and two more of her checkouts wait for it in
    line. Her checkout ends and, in the same step, the first waiter's task is cancelled
    with asyncio's ``Task.cancel()`` (``asyncio.timeout``, a server ending the task): the
    share just handed to it must go on to the next in line, which is served. Dropped, it
    would keep alice's count of held connections at the limit while her line lasted, and
    the second waiter would wait out its timeout."""
    import asyncio

    async with SharedPool(
        db.app_url,
        min_size=1,
        max_size=2,
        per_user_limit=1,
        timeout=3,
        rls_check="off",
        kwargs=db.kwargs(),
    ) as pool:
        alice = UserRef("alice", "acme")
        served: list[str] = []

        async def waiter() -> None:
            with bind_context(_ctx("alice")):
                async with pool.connection() as conn:
                    served.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))

        with anyio.fail_after(10):
            holding, release = anyio.Event(), anyio.Event()
            first: asyncio.Task[None] | None = None

            async def holder() -> None:
                with bind_context(_ctx("alice")):
                    async with pool.connection():
                        holding.set()
                        await release.wait()
                # No checkpoint since the share was handed to the first waiter.
                assert first is not None
                first.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                await holding.wait()
                first = asyncio.create_task(waiter())
                await _eventually(
                    _async(lambda: len(pool._gates[alice].waiters) == 1), "alice's first waits"
                )
                tg.start_soon(waiter)
                await _eventually(
                    _async(lambda: len(pool._gates[alice].waiters) == 2), "alice's second waits"
                )
                release.set()
            with pytest.raises(asyncio.CancelledError):
                await first
        assert served == ["alice"]
        await _eventually(lambda: _shared_idle(pool), "pool idle again")


async def test_shared_checkout_cancelled_by_asyncio_as_the_pool_hands_it_a_connection_ends(
    db: Database,
) -> None:
    """max_size=1: alice holds the pool's one connection and bob's checkout waits for it
    in psycopg's pool. Her checkout ends and, in the same step, bob's task is cancelled
    with asyncio's ``Task.cancel()`` (a framework cancelling the view of a client gone):
    the connection just handed to him goes back, and his task ends cancelled. Python
    3.11's ``asyncio.wait_for``, under the pool's wait, returns the connection instead of
    the cancellation: the checkout went on, and the cancelled view ran its queries."""
    import asyncio
    import contextvars

    async with SharedPool(
        db.app_url, min_size=1, max_size=1, timeout=3, rls_check="off", kwargs=db.kwargs()
    ) as pool:
        served: list[str] = []

        async def waiter() -> None:
            with bind_context(_ctx("bob")):
                async with pool.connection() as conn:
                    served.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))

        with anyio.fail_after(10):
            with bind_context(_ctx("alice")):
                async with pool.connection():
                    bob = asyncio.create_task(waiter(), context=contextvars.Context())
                    await _eventually(_async(lambda: pool.stats().waiting == 1), "bob waits")
            # No checkpoint since the connection was handed to bob.
            bob.cancel()
            with pytest.raises(asyncio.CancelledError):
                await bob
        assert served == []
        await _eventually(lambda: _shared_idle(pool), "pool idle again")
        await _checkout_once(pool, "carol")


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run


async def _checkout_once(pool: SharedPool | PerUserPools, user: str) -> None:
    with bind_context(_ctx(user)):
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


async def test_shared_cancel_mid_query_cancels_it_on_the_server(
    db: Database, shared: SharedPool
) -> None:
    """A task cancelled during a long query: the query stops on the server, nothing stays
    'idle in transaction', and the pool recovers."""
    marker = f"cancel-{uuid.uuid4().hex}"
    with anyio.move_on_after(0.3), bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            await conn.execute(f"SELECT pg_sleep(30) /* {marker} */")

    await _query_stopped(db, marker)
    await _eventually(lambda: _shared_idle(shared), "pool idle again")
    stuck = await _admin_scalar(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND state LIKE 'idle in transaction%%'",
        (db.app_name,),
    )
    assert stuck == 0
    with bind_context(_ctx("bob")):
        async with shared.connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "bob"


async def test_cancel_with_a_libpq_older_than_17_still_reaches_the_server(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without libpq 17's non-blocking cancel (forced off here: the bundled libpq has it),
    the blocking one, in a worker thread, still stops a cancelled query on the server."""
    from ambient.integrations.psycopg import _common

    monkeypatch.setattr(_common, "_NONBLOCKING_CANCEL", False)
    marker = f"cancel-{uuid.uuid4().hex}"
    async with SharedPool(db.app_url, min_size=1, max_size=2, rls_check="off") as pool:
        with anyio.move_on_after(0.3), bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                cancel = pool._cancellers.of(conn)
                await conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
        assert type(cancel).__name__ == "PGcancel"

        await _query_stopped(db, marker)
        await _eventually(lambda: _shared_idle(pool), "pool idle again")


async def test_shared_cancel_while_holding_rolls_back(db: Database, shared: SharedPool) -> None:
    """A task cancelled while it holds a connection mid-transaction: the work is rolled
    back and the connection comes back clean."""
    with anyio.CancelScope() as scope, bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')"))
            scope.cancel()
            await anyio.sleep_forever()
    await _eventually(lambda: _shared_idle(shared), "pool idle again")
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            assert await _scalar(conn, db.sql("SELECT count(*) FROM {notes}")) == 0


async def test_shared_random_cancellations_lose_no_connection(
    db: Database, shared: SharedPool
) -> None:
    """300 checkouts by 30 users, a third cancelled at random moments (waiting, querying,
    holding a row lock): afterwards the pool is idle, no lock is held, and a follow-up
    burst succeeds."""
    rng = random.Random(5)
    with bind_context(_ctx("seed")):
        async with shared.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('seed', 'row')"))
    completed = 0

    async def work(n: int, cancel_after: float | None) -> None:
        nonlocal completed
        user = f"user-{n % 30}"
        with anyio.CancelScope() as scope:
            if cancel_after is not None:
                scope.deadline = anyio.current_time() + cancel_after
            with bind_context(_ctx(user)):
                async with shared.connection() as conn:
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'w')"), (user,)
                    )
                    await conn.execute(
                        db.sql("SELECT * FROM {notes} WHERE owner = %s FOR UPDATE"), (user,)
                    )
                    await conn.execute("SELECT pg_sleep(0.002)")
            completed += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(300):
                tg.start_soon(work, n, rng.uniform(0, 0.05) if rng.random() < 0.33 else None)
    await _eventually(lambda: _shared_idle(shared), "pool idle again")
    locks = await _admin_scalar(
        db,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE a.application_name = %s AND l.locktype IN ('relation', 'tuple', 'transactionid')",
        (db.app_name,),
    )
    assert locks == 0
    assert completed >= 150
    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(_checkout_once, shared, f"after-{n}")
    await _eventually(lambda: _shared_idle(shared), "pool idle again")


async def test_shared_connections_ended_while_idle_are_replaced_unseen(db: Database) -> None:
    """Every idle connection's server session ended (a restart, pg_terminate_backend): the
    next checkouts, of several users, each get a working connection with their settings.
    Before, each ended connection failed one request with AdminShutdown from the checkout's
    own BEGIN, before its block ran."""
    async with SharedPool(
        db.app_url, min_size=3, max_size=3, timeout=5, rls_check="off", kwargs=db.kwargs()
    ) as pool:

        async def all_idle() -> bool:
            return pool.stats().available == 3

        await _eventually(all_idle, "three idle connections")
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (db.app_name,),
            )

        async def ended() -> bool:
            return await _sessions(db) == 0

        await _eventually(ended, "the server sessions ended")
        for n in range(6):
            with bind_context(_ctx(f"user-{n}")):
                async with pool.connection() as conn:
                    setting = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
            assert setting == f"user-{n}"
        assert pool.stats().checked_out == 0


async def _sessions(db: Database) -> int:
    """The server sessions of this test's pools."""
    return int(
        await _admin_scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (db.app_name,),
        )
    )


# -- SharedPool: lifecycle ---------------------------------------------------------------------


async def test_shared_install_opens_on_first_use_and_closes_at_shutdown(db: Database) -> None:
    """Installed in a registry, the pool opens on the first checkout and closes with the
    registry; the module-level connection() finds it."""
    pool = SharedPool(db.app_url, min_size=0, max_size=2, rls_check="raise", kwargs=db.kwargs())
    registry = Registry()
    pool.install(registry)
    assert not pool.opened
    async with registry.open_scope(_ctx("alice")):
        async with connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "alice"
        assert pool.opened
    await registry.aclose()
    assert not pool.opened


async def test_shared_not_open_and_not_installed(db: Database) -> None:
    """A pool neither opened nor installed says how to fix that."""
    pool = SharedPool(db.app_url, rls_check="off")
    with bind_context(_ctx("alice")), pytest.raises(PoolClosed, match="not open"):
        async with pool.connection():
            pass


async def test_shared_open_refuses_a_superuser(db: Database) -> None:
    """rls_check='raise' refuses to open a pool whose role is a superuser."""
    pool = SharedPool(db.admin_url, min_size=0, max_size=1, rls_check="raise")
    with pytest.raises(RowSecurityError, match="superuser"):
        await pool.open()
    assert not pool.opened


async def test_shared_open_warns_for_an_owner_without_force(db: Database) -> None:
    """rls_check='warn' opens the pool and warns when the role owns a table without FORCE."""
    pool = SharedPool(db.owner_url, min_size=0, max_size=1, rls_tables=[f"{db.schema}.owned"])
    with pytest.warns(RowSecurityWarning, match="FORCE ROW LEVEL SECURITY"):
        await pool.open()
    assert pool.opened
    await pool.close()


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("role", ["bypassrls", "member of the owner"])
async def test_strategies_refuse_a_role_that_bypasses_the_policies(
    db: Database, strategy: str, role: str
) -> None:
    """Connecting as a role with BYPASSRLS, or as a member of the table's owner (which owns
    it by inheritance, and the table does not FORCE row-level security), the first checkout
    with rls_check='raise' fails with RowSecurityError naming the cause, before any query
    of the user's runs, and leaves no server session open."""
    name = f"ambient_bad_{uuid.uuid4().hex[:12]}"
    owner = psycopg.conninfo.conninfo_to_dict(db.owner_url)["user"]
    with _admin() as admin:
        if role == "bypassrls":
            admin.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER BYPASSRLS")
            admin.execute(f"GRANT USAGE ON SCHEMA {db.schema} TO {name}")
        else:
            admin.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS INHERIT")
            admin.execute(f"GRANT {owner} TO {name}")
    options: dict[str, Any] = {
        "timeout": 5,
        "rls_tables": [f"{db.schema}.owned"],
        "rls_check": "raise",
        "kwargs": db.kwargs(),
    }
    pool: SharedPool | PerUserPools = (
        SharedPool(_url_for(name), min_size=1, max_size=1, **options)
        if strategy == "shared"
        else PerUserPools(_url_for(name), max_size=1, max_total=1, **options)
    )
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("bob")):
            with pytest.raises(RowSecurityError) as info:
                async with connection():
                    pytest.fail("the checkout must not start")
        await _eventually(_async_int(lambda: _server_connections(db), 0), "no session left")
    finally:
        await registry.aclose()
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            admin.execute(f"DROP OWNED BY {name}")
            admin.execute(f"DROP ROLE {name}")
    expected = "BYPASSRLS" if role == "bypassrls" else f"owns '{db.schema}.owned'"
    assert any(expected in problem for problem in info.value.problems), info.value.problems


# -- check_rls ---------------------------------------------------------------------------------


async def test_check_rls_detects_superuser(db: Database) -> None:
    """A superuser bypasses RLS: check_rls raises, or warns when asked to."""
    async with await psycopg.AsyncConnection.connect(db.admin_url) as conn:
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, [db.notes])
        assert any("superuser" in p for p in info.value.problems)
        with pytest.warns(RowSecurityWarning) as warned:
            problems = await check_rls(conn, [db.notes], action="warn")
        assert problems == info.value.problems
        assert conn.info.transaction_status is TransactionStatus.IDLE
    assert [w.filename for w in warned] == [__file__]  # the warning names its caller


async def test_check_rls_detects_bypassrls(db: Database) -> None:
    """A role with BYPASSRLS ignores every policy: check_rls says so."""
    role = f"ambient_byp_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER BYPASSRLS")
    try:
        async with await psycopg.AsyncConnection.connect(_url_for(role)) as conn:
            with pytest.raises(RowSecurityError, match="BYPASSRLS"):
                await check_rls(conn)
    finally:
        with _admin() as admin:
            admin.execute(f"DROP ROLE {role}")


async def test_check_rls_detects_a_preset_setting(db: Database) -> None:
    """A role default for app.user_id would make every session start as that user: the
    self-check of a SharedPool refuses it."""
    role = await _role_of(db.app_url)
    with _admin() as admin:
        admin.execute(f"ALTER ROLE {role} SET app.user_id = 'alice'")
    try:
        pool = SharedPool(db.app_url, min_size=0, max_size=1, rls_check="raise")
        with pytest.raises(RowSecurityError, match="preset"):
            await pool.open()
        assert not pool.opened
    finally:
        with _admin() as admin:
            admin.execute(f"ALTER ROLE {role} RESET app.user_id")


async def test_check_rls_detects_owner_without_force(db: Database) -> None:
    """The owner of a table bypasses its policies unless FORCE ROW LEVEL SECURITY."""
    async with await psycopg.AsyncConnection.connect(db.owner_url) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(
                conn, [f"{db.schema}.owned", f"{db.schema}.forced"], action="warn"
            )
    assert len(problems) == 1
    assert f"{db.schema}.owned" in problems[0]
    assert "FORCE" in problems[0]


async def test_check_rls_detects_views_that_bypass_the_policies(db: Database) -> None:
    """A view over the protected table that reads it with its (superuser) owner's rights
    shows bob alice's rows, and so does a materialized view: check_rls names both, and a
    SharedPool checking that table refuses to open. A security_invoker view is fine."""
    app_role = sql.Identifier(psycopg.conninfo.conninfo_to_dict(db.app_url)["user"])
    notes = sql.Identifier(db.schema, "notes")
    views = {name: sql.Identifier(db.schema, name) for name in ("leaky", "frozen", "invoker")}
    with _admin() as admin:
        for name, template in (
            ("leaky", "CREATE VIEW {} AS SELECT * FROM {}"),
            ("frozen", "CREATE MATERIALIZED VIEW {} AS SELECT * FROM {}"),
            ("invoker", "CREATE VIEW {} WITH (security_invoker = on) AS SELECT * FROM {}"),
        ):
            admin.execute(sql.SQL(template).format(views[name], notes))
            admin.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(views[name], app_role))
    async with SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off") as pool:
        with bind_context(_ctx("alice")):
            async with pool.connection() as conn:
                await conn.execute(
                    db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')")
                )
        with _admin() as admin:
            admin.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(views["frozen"]))
        counts = {}
        with bind_context(_ctx("bob"), allow_switch=True):
            async with pool.connection() as conn:
                for name, relation in {"notes": notes, **views}.items():
                    count = sql.SQL("SELECT count(*) FROM {}").format(relation)
                    counts[name] = await _scalar(conn, count)
    assert counts == {"notes": 0, "leaky": 1, "frozen": 1, "invoker": 0}  # the danger
    problems = await _rls_warnings(db.app_url, [db.notes])
    assert len(problems) == 2
    assert f"materialized view '{db.schema}.frozen'" in problems[0]
    assert f"view '{db.schema}.leaky'" in problems[1]
    assert "security_invoker" in problems[1]
    with pytest.raises(RowSecurityError, match="leaky"):
        async with SharedPool(db.app_url, min_size=1, rls_tables=[db.notes], rls_check="raise"):
            pass


async def test_check_rls_detects_views_over_views_that_bypass_the_policies(
    db: Database,
) -> None:
    """A view the role cannot read reads the protected table with its (superuser) owner's
    rights; a view over it, and a materialized view over it, are granted to the role and
    show bob alice's rows. check_rls names both and the view they read through, and a
    SharedPool checking the table refuses to open. A view over a security_invoker view is
    fine: the table is then read with the querying role's rights."""
    app_role = sql.Identifier(psycopg.conninfo.conninfo_to_dict(db.app_url)["user"])
    notes = sql.Identifier(db.schema, "notes")
    names = ("internal", "report", "stored", "invoker", "over_invoker")
    views = {name: sql.Identifier(db.schema, name) for name in names}
    with _admin() as admin:
        for template, *relations in (
            ("CREATE VIEW {} AS SELECT * FROM {}", views["internal"], notes),
            ("CREATE VIEW {} AS SELECT owner, body FROM {}", views["report"], views["internal"]),
            ("CREATE MATERIALIZED VIEW {} AS SELECT * FROM {}", views["stored"], views["internal"]),
            (
                "CREATE VIEW {} WITH (security_invoker = on) AS SELECT * FROM {}",
                views["invoker"],
                notes,
            ),
            ("CREATE VIEW {} AS SELECT * FROM {}", views["over_invoker"], views["invoker"]),
            ("GRANT SELECT ON {}, {} TO {}", views["report"], views["stored"], app_role),
            ("GRANT SELECT ON {}, {} TO {}", views["invoker"], views["over_invoker"], app_role),
        ):
            admin.execute(sql.SQL(template).format(*relations))
        admin.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')"))
        admin.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(views["stored"]))
    async with SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off") as pool:
        with bind_context(_ctx("bob")):
            async with pool.connection() as conn:
                count = sql.SQL("SELECT count(*) FROM {}")
                counts = {
                    name: await _scalar(conn, count.format(views[name])) for name in names[1:]
                }
    assert counts == {"report": 1, "stored": 1, "invoker": 0, "over_invoker": 0}  # the danger
    problems = await _rls_warnings(db.app_url, [db.notes])
    assert len(problems) == 2
    assert f"view '{db.schema}.report' shows the rows" in problems[0]
    assert f"that '{db.schema}.internal' reads without its policies" in problems[0]
    assert f"materialized view '{db.schema}.stored'" in problems[1]
    with pytest.raises(RowSecurityError, match="report"):
        async with SharedPool(db.app_url, min_size=1, rls_tables=[db.notes], rls_check="raise"):
            pass


async def test_check_rls_detects_partitions_and_children_read_without_the_policies(
    db: Database,
) -> None:
    """A protected table partitioned by tenant, and one that other tables inherit from:
    row-level security applies to the table a query names, so a tenant that queries another
    tenant's partition (or a child table) directly reads all of it. check_rls names each
    such table the role can read or write, at any depth, and a SharedPool checking the
    parent refuses to open; a partition with row-level security of its own, or one the
    role has no privilege on, is fine."""
    app_role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE TABLE {s}.docs (tenant text NOT NULL, body text) PARTITION BY LIST (tenant)",
            "ALTER TABLE {s}.docs ENABLE ROW LEVEL SECURITY",
            "CREATE TABLE {s}.docs_acme PARTITION OF {s}.docs FOR VALUES IN ('acme')",
            "CREATE TABLE {s}.docs_globex PARTITION OF {s}.docs FOR VALUES IN ('globex') "
            "PARTITION BY LIST (body)",
            "CREATE TABLE {s}.docs_globex_all PARTITION OF {s}.docs_globex DEFAULT",
            "CREATE TABLE {s}.docs_initech PARTITION OF {s}.docs FOR VALUES IN ('initech')",
            "CREATE TABLE {s}.docs_hidden PARTITION OF {s}.docs FOR VALUES IN ('hidden')",
            "CREATE TABLE {s}.docs_own_policy PARTITION OF {s}.docs FOR VALUES IN ('own')",
            "ALTER TABLE {s}.docs_own_policy ENABLE ROW LEVEL SECURITY",
            "CREATE TABLE {s}.base (tenant text)",
            "ALTER TABLE {s}.base ENABLE ROW LEVEL SECURITY",
            "CREATE TABLE {s}.child () INHERITS ({s}.base)",
            "GRANT SELECT ON {s}.docs, {s}.docs_acme, {s}.docs_globex, {s}.docs_globex_all, "
            "{s}.docs_own_policy, {s}.base, {s}.child TO {app}",
            "GRANT UPDATE ON {s}.docs_initech TO {app}",
        ):
            admin.execute(statement.format(s=schema, app=app_role))
        admin.execute(
            f"CREATE POLICY tenant ON {schema}.docs "
            "USING (tenant = NULLIF(current_setting('app.tenant_id', true), ''))"
        )
        admin.execute(
            sql.SQL("INSERT INTO {} VALUES ('acme', 'a'), ('globex', 'g')").format(
                sql.Identifier(schema, "docs")
            )
        )
    async with SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off") as pool:
        with bind_context(_ctx("alice", "acme")):
            async with pool.connection() as conn:
                count = sql.SQL("SELECT count(*) FROM {}")
                through_parent, direct = [
                    await _scalar(conn, count.format(sql.Identifier(schema, name)))
                    for name in ("docs", "docs_globex")
                ]
    assert (through_parent, direct) == (1, 1)  # the danger: globex's row, read directly
    problems = await _rls_warnings(db.app_url, [f"{schema}.docs", f"{schema}.base"])
    named = [re.findall(r"'([^']+)'", problem)[0] for problem in problems]
    assert named == [
        f"{schema}.docs_acme",
        f"{schema}.docs_globex",
        f"{schema}.docs_globex_all",
        f"{schema}.docs_initech",
        f"{schema}.child",
    ]
    assert all("ENABLE ROW LEVEL SECURITY" in problem for problem in problems)
    with pytest.raises(RowSecurityError, match="docs_globex"):
        async with SharedPool(
            db.app_url, min_size=1, rls_tables=[f"{schema}.docs"], rls_check="raise"
        ):
            pass


async def test_check_rls_asks_no_security_invoker_of_a_materialized_view_a_view_reads(
    db: Database,
) -> None:
    """A view granted to the role over a materialized view it cannot read shows the rows
    the materialized view stored without the table's policies: check_rls reports it, and
    tells to revoke the privilege, not to make the materialized view security_invoker
    (ALTER VIEW refuses a materialized view, which reads nothing when queried)."""
    app_role = sql.Identifier(psycopg.conninfo.conninfo_to_dict(db.app_url)["user"])
    notes = sql.Identifier(db.schema, "notes")
    stored = sql.Identifier(db.schema, "stored")
    report = sql.Identifier(db.schema, "report")
    with _admin() as admin:
        admin.execute(
            sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT * FROM {}").format(stored, notes)
        )
        admin.execute(sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(report, stored))
        admin.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(report, app_role))
    problems = await _rls_warnings(db.app_url, [db.notes])
    assert len(problems) == 1
    assert f"view '{db.schema}.report'" in problems[0]
    assert f"materialized view '{db.schema}.stored'" in problems[0]
    assert "security_invoker" not in problems[0]
    assert "revoke" in problems[0]


async def test_check_rls_detects_views_over_partitions_that_skip_the_policies(
    db: Database,
) -> None:
    """A view (owned by a superuser) over a partition of a protected table, granted to the
    role, though the partition itself is not: it shows every tenant's rows of that
    partition, as the partition read directly would. check_rls names it; a view over a
    partition with row-level security of its own, read with the querying role's rights
    (security_invoker), is fine."""
    app_role = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE TABLE {s}.docs (tenant text NOT NULL, body text) PARTITION BY LIST (tenant)",
            "ALTER TABLE {s}.docs ENABLE ROW LEVEL SECURITY",
            "CREATE TABLE {s}.docs_globex PARTITION OF {s}.docs FOR VALUES IN ('globex')",
            "CREATE TABLE {s}.docs_own PARTITION OF {s}.docs FOR VALUES IN ('own')",
            "ALTER TABLE {s}.docs_own ENABLE ROW LEVEL SECURITY",
            "CREATE VIEW {s}.globex_report AS SELECT * FROM {s}.docs_globex",
            "CREATE VIEW {s}.own_report WITH (security_invoker = on) AS SELECT * FROM {s}.docs_own",
            "GRANT SELECT ON {s}.docs, {s}.globex_report, {s}.own_report TO {app}",
        ):
            admin.execute(statement.format(s=schema, app=app_role))
        admin.execute(
            f"CREATE POLICY tenant ON {schema}.docs "
            "USING (tenant = NULLIF(current_setting('app.tenant_id', true), ''))"
        )
        admin.execute(
            sql.SQL("INSERT INTO {} VALUES ('globex', 'g')").format(sql.Identifier(schema, "docs"))
        )
    async with SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off") as pool:
        with bind_context(_ctx("alice", "acme")):
            async with pool.connection() as conn:
                count = sql.SQL("SELECT count(*) FROM {}")
                through_parent, through_view = [
                    await _scalar(conn, count.format(sql.Identifier(schema, name)))
                    for name in ("docs", "globex_report")
                ]
    assert (through_parent, through_view) == (0, 1)  # the danger: globex's row, in a view
    problems = await _rls_warnings(db.app_url, [f"{schema}.docs"])
    assert len(problems) == 1
    assert f"view '{schema}.globex_report'" in problems[0]
    assert f"'{schema}.docs_globex'" in problems[0]
    with pytest.raises(RowSecurityError, match="globex_report"):
        async with SharedPool(
            db.app_url, min_size=1, rls_tables=[f"{schema}.docs"], rls_check="raise"
        ):
            pass


async def test_bob_cannot_update_or_delete_alices_rows(db: Database, shared: SharedPool) -> None:
    """Row-level security also holds for writes: bob's UPDATE and DELETE of alice's rows
    touch nothing, and alice's row is as she left it."""
    with bind_context(_ctx("alice")):
        async with shared.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'x')"))
    with bind_context(_ctx("bob"), allow_switch=True):
        async with shared.connection() as conn:
            updated = await conn.execute(
                db.sql("UPDATE {notes} SET body = 'bob was here' WHERE owner = 'alice'")
            )
            deleted = await conn.execute(db.sql("DELETE FROM {notes} WHERE owner = 'alice'"))
            assert (updated.rowcount, deleted.rowcount) == (0, 0)
    with bind_context(_ctx("alice"), allow_switch=True):
        async with shared.connection() as conn:
            rows = await (await conn.execute(db.sql("SELECT owner, body FROM {notes}"))).fetchall()
    assert rows == [("alice", "x")]


async def test_check_rls_passes_an_ordinary_role(db: Database) -> None:
    """An ordinary role on tables with RLS enabled has no problem; a table without RLS or
    one that does not exist does."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        assert await check_rls(conn, [db.notes]) == []
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, [f"{db.schema}.plain", f"{db.schema}.missing"])
    assert len(info.value.problems) == 2
    assert "not enabled" in info.value.problems[0]
    assert "does not exist" in info.value.problems[1]


async def test_check_rls_names_a_superuser_and_a_bypassrls_role_apart(db: Database) -> None:
    """A superuser without BYPASSRLS bypasses every policy all the same: check_rls names it
    a superuser; a role with BYPASSRLS alone is named for that, and for nothing else."""
    tag = uuid.uuid4().hex[:12]
    superuser, bypasser = f"ambient_su_{tag}", f"ambient_byp_{tag}"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {superuser} LOGIN SUPERUSER NOBYPASSRLS")
        admin.execute(f"CREATE ROLE {bypasser} LOGIN NOSUPERUSER BYPASSRLS")
    found: dict[str, list[str]] = {}
    try:
        for role in (superuser, bypasser):
            found[role] = await _rls_problems(_url_for(role))
    finally:
        with _admin() as admin:
            admin.execute(f"DROP ROLE {superuser}")
            admin.execute(f"DROP ROLE {bypasser}")
    assert len(found[superuser]) == 1, found[superuser]
    assert f"role '{superuser}' is a superuser" in found[superuser][0]
    assert len(found[bypasser]) == 1, found[bypasser]
    assert f"role '{bypasser}' has BYPASSRLS" in found[bypasser][0]


async def test_check_rls_checks_the_tables_after_a_missing_one(db: Database) -> None:
    """A protected table that does not exist is a problem, and the tables named after it
    are checked all the same: one without row-level security is not passed over."""
    problems = await _rls_problems(db.app_url, [f"{db.schema}.missing", f"{db.schema}.plain"])
    assert len(problems) == 2, problems
    assert f"table '{db.schema}.missing' does not exist" in problems[0]
    assert f"row-level security is not enabled on '{db.schema}.plain'" in problems[1]


async def test_check_rls_refuses_an_unknown_action(db: Database) -> None:
    """An action other than "raise" or "warn" is a ValueError, not a quiet pass: with no
    problem to report, it would have gone unnoticed until there was one."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        with pytest.raises(ValueError, match="action must be 'raise' or 'warn', not 'loud'"):
            await check_rls(conn, [db.notes], action="loud")  # type: ignore[arg-type]


async def test_check_rls_names_an_owned_table_without_row_level_security_once(
    db: Database,
) -> None:
    """A table its owner checks, with row-level security not enabled, is one problem: the
    one to fix first (FORCE means nothing on a table without it)."""
    owner = psycopg.conninfo.conninfo_to_dict(db.owner_url)["user"]
    with _admin() as admin:
        admin.execute(f"CREATE TABLE {db.schema}.mine (owner text)")
        admin.execute(f"ALTER TABLE {db.schema}.mine OWNER TO {owner}")
    problems = await _rls_problems(db.owner_url, [f"{db.schema}.mine"])
    assert len(problems) == 1, problems
    assert f"row-level security is not enabled on '{db.schema}.mine'" in problems[0]


async def test_check_rls_detects_a_materialized_view_owned_by_a_role_under_the_policies(
    db: Database,
) -> None:
    """A materialized view over the protected table holds the rows of whoever last
    refreshed it, even when its owner is subject to the policies: check_rls names it."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    with _admin() as admin:
        admin.execute(
            sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(db.schema, "kept"), sql.Identifier(db.schema, "notes")
            )
        )
        admin.execute(f"ALTER MATERIALIZED VIEW {db.schema}.kept OWNER TO {app}")
    problems = await _rls_problems(db.app_url, [db.notes])
    assert len(problems) == 1, problems
    assert f"materialized view '{db.schema}.kept'" in problems[0]


@pytest.mark.parametrize("owner", ["SUPERUSER NOBYPASSRLS", "NOSUPERUSER BYPASSRLS", "table owner"])
async def test_check_rls_detects_a_view_whose_owner_bypasses_the_policies(
    db: Database, owner: str
) -> None:
    """A view over a protected table owned by a superuser without BYPASSRLS (even a table
    that FORCEs row-level security), by a role with
    BYPASSRLS that is no superuser, or by the table's owner (no FORCE), reads every user's
    rows with its owner's rights: check_rls names it."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    role = f"ambient_vo_{uuid.uuid4().hex[:12]}"
    # A superuser bypasses the policies of a table that FORCEs them too.
    tables = {"table owner": f"{db.schema}.owned", "SUPERUSER NOBYPASSRLS": f"{db.schema}.forced"}
    table = tables.get(owner, db.notes)
    with _admin() as admin:
        if owner == "table owner":
            role = psycopg.conninfo.conninfo_to_dict(db.owner_url)["user"]
        else:
            admin.execute(f"CREATE ROLE {role} NOLOGIN {owner}")
        admin.execute(
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(db.schema, "seen"), sql.Identifier(*table.split("."))
            )
        )
        admin.execute(f"ALTER VIEW {db.schema}.seen OWNER TO {role}")
        admin.execute(f"GRANT SELECT ON {db.schema}.seen TO {app}")
    try:
        problems = await _rls_problems(db.app_url, [table])
    finally:
        if owner != "table owner":
            with _admin() as admin:
                admin.execute(f"DROP OWNED BY {role}")
                admin.execute(f"DROP ROLE {role}")
    assert len(problems) == 1, problems
    assert f"view '{db.schema}.seen' reads '{table}'" in problems[0]


async def test_check_rls_detects_a_materialized_view_over_a_security_invoker_view(
    db: Database,
) -> None:
    """A materialized view over a security_invoker view over the protected table holds the
    rows of whoever last refreshed it, though the view it reads applies the policies:
    check_rls names it, and not the view."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    with _admin() as admin:
        invoker, kept = sql.Identifier(db.schema, "invoker"), sql.Identifier(db.schema, "kept")
        admin.execute(
            sql.SQL("CREATE VIEW {} WITH (security_invoker = on) AS SELECT * FROM {}").format(
                invoker, sql.Identifier(db.schema, "notes")
            )
        )
        admin.execute(
            sql.SQL("CREATE MATERIALIZED VIEW {} AS SELECT * FROM {}").format(kept, invoker)
        )
        admin.execute(f"GRANT SELECT ON {db.schema}.invoker, {db.schema}.kept TO {app}")
    problems = await _rls_problems(db.app_url, [db.notes])
    assert len(problems) == 1, problems
    assert f"materialized view '{db.schema}.kept'" in problems[0]


async def test_check_rls_detects_a_view_over_a_child_without_row_level_security(
    db: Database,
) -> None:
    """A view over a child of the protected table that has no row-level security of its
    own reads the child's rows without the parent's policies, even when the view's owner is
    subject to them: check_rls names it (the child itself the role cannot read)."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    role = f"ambient_vo_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f"CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS")
        admin.execute(f"CREATE TABLE {db.schema}.kid () INHERITS ({db.notes})")
        admin.execute(
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(db.schema, "kids"), sql.Identifier(db.schema, "kid")
            )
        )
        admin.execute(f"ALTER VIEW {db.schema}.kids OWNER TO {role}")
        admin.execute(f"GRANT SELECT ON {db.schema}.kids TO {app}")
    try:
        problems = await _rls_problems(db.app_url, [db.notes])
    finally:
        with _admin() as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
    assert len(problems) == 1, problems
    assert (
        f"view '{db.schema}.kids' reads '{db.schema}.kid', a partition or child of "
        f"'{db.notes}'" in problems[0]
    )


async def test_check_rls_names_a_view_reached_by_several_paths_for_what_it_reads_itself(
    db: Database,
) -> None:
    """A view (owned by a superuser) that reads the protected table and also another view
    over it that skips its policies, and one that reads the table and also a child of it
    without row-level security: check_rls names each once, for reading the table with its
    owner's rights, and asks for the view's own security_invoker, not the other view's
    (the role cannot read that one) or the child's."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE TABLE {s}.kid () INHERITS ({s}.notes)",
            "CREATE VIEW {s}.internal AS SELECT owner FROM {s}.notes",
            "CREATE VIEW {s}.with_internal AS "
            "SELECT owner FROM {s}.notes UNION ALL SELECT owner FROM {s}.internal",
            "CREATE VIEW {s}.with_kid AS "
            "SELECT owner FROM {s}.notes UNION ALL SELECT owner FROM {s}.kid",
            "GRANT SELECT ON {s}.with_internal, {s}.with_kid TO {app}",
        ):
            admin.execute(statement.format(s=schema, app=app))
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, [db.notes])
    assert info.value.problems == [
        f"view '{schema}.{view}' reads '{db.notes}' with the rights of its owner, who "
        f"bypasses the table's policies, and role '{app}' can read it: ALTER VIEW "
        f"{schema}.{view} SET (security_invoker = true) (PostgreSQL 15+), or revoke that "
        "privilege"
        for view in ("with_internal", "with_kid")
    ]


async def test_check_rls_detects_a_child_the_role_owns_without_force(db: Database) -> None:
    """A child of the protected table with row-level security enabled, but owned by the
    role and not FORCE: the role reads it without any policy, so check_rls names it."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    with _admin() as admin:
        admin.execute(f"CREATE TABLE {db.schema}.kid () INHERITS ({db.notes})")
        admin.execute(f"ALTER TABLE {db.schema}.kid ENABLE ROW LEVEL SECURITY")
        admin.execute(f"ALTER TABLE {db.schema}.kid OWNER TO {app}")
    problems = await _rls_problems(db.app_url, [db.notes])
    assert len(problems) == 1, problems
    assert f"table '{db.schema}.kid' is a partition or child of '{db.notes}'" in problems[0]


async def test_check_rls_detects_a_view_owned_by_a_member_of_the_tables_owner(
    db: Database,
) -> None:
    """A view owned by a role that is a member of the protected table's owner (and so has
    its rights) reads the table as its owner would, without its policies unless the table
    FORCEs them: check_rls names the view over the table without FORCE, and not the one
    over the table with it."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    owner = psycopg.conninfo.conninfo_to_dict(db.owner_url)["user"]
    member = f"ambient_mb_{uuid.uuid4().hex[:12]}"
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE ROLE {member} NOLOGIN NOSUPERUSER NOBYPASSRLS INHERIT",
            "GRANT {owner} TO {member}",
            "INSERT INTO {s}.owned (owner) VALUES ('alice')",
            "INSERT INTO {s}.forced (owner) VALUES ('alice')",
            "CREATE VIEW {s}.owned_view AS SELECT * FROM {s}.owned",
            "CREATE VIEW {s}.forced_view AS SELECT * FROM {s}.forced",
            "ALTER VIEW {s}.owned_view OWNER TO {member}",
            "ALTER VIEW {s}.forced_view OWNER TO {member}",
            "GRANT SELECT ON {s}.owned_view, {s}.forced_view TO {app}",
        ):
            admin.execute(statement.format(s=schema, app=app, owner=owner, member=member))
    try:
        async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
            await conn.execute("SELECT set_config('app.user_id', 'bob', false)")
            counts = [
                await _scalar(
                    conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, view))
                )
                for view in ("owned_view", "forced_view")
            ]
            await conn.rollback()
        problems = await _rls_problems(db.app_url, [f"{schema}.owned", f"{schema}.forced"])
    finally:
        with _admin() as admin:
            admin.execute(f"DROP OWNED BY {member}")
            admin.execute(f"DROP ROLE {member}")
    assert counts == [1, 0]  # the danger
    assert len(problems) == 1, problems
    assert f"view '{schema}.owned_view' reads '{schema}.owned'" in problems[0]


async def test_check_rls_names_the_view_that_skips_the_policies_below_a_chain_of_views(
    db: Database,
) -> None:
    """A view the role can read, two views above one that reads the protected table with its
    (superuser) owner's rights, and one over a view over a materialized view over a
    security_invoker view of the table: check_rls asks for security_invoker on the view
    that skips the policies (not the view between), and names the materialized view (not
    the security_invoker view, which applies the policies)."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE VIEW {s}.internal AS SELECT owner FROM {s}.notes",
            "CREATE VIEW {s}.middle AS SELECT owner FROM {s}.internal",
            "CREATE VIEW {s}.top AS SELECT owner FROM {s}.middle",
            "CREATE VIEW {s}.invoker WITH (security_invoker = on) AS SELECT owner FROM {s}.notes",
            "CREATE MATERIALIZED VIEW {s}.stored AS SELECT owner FROM {s}.invoker",
            "CREATE VIEW {s}.over_stored AS SELECT owner FROM {s}.stored",
            "CREATE VIEW {s}.shown AS SELECT owner FROM {s}.over_stored",
            "GRANT SELECT ON {s}.top, {s}.shown TO {app}",
        ):
            admin.execute(statement.format(s=schema, app=app))
    problems = await _rls_problems(db.app_url, [db.notes])
    assert len(problems) == 2, problems
    assert problems[0].startswith(
        f"view '{schema}.shown' shows the rows of '{db.notes}' that materialized view "
        f"'{schema}.stored' holds"
    ), problems[0]
    assert problems[1].startswith(
        f"view '{schema}.top' shows the rows of '{db.notes}' that '{schema}.internal' reads "
        f"without its policies, and role '{app}' can read it: ALTER VIEW {schema}.internal "
        "SET (security_invoker = true)"
    ), problems[1]


async def test_check_rls_checks_the_role_a_connection_has_set(db: Database) -> None:
    """A connection that logged in as a superuser and then SET ROLE to the application's
    role queries as that role, under the policies: check_rls checks that role, and finds
    nothing to report."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    async with await psycopg.AsyncConnection.connect(db.admin_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
        assert await check_rls(conn, [db.notes]) == []
        assert await _scalar(conn, "SELECT current_user") == app


@pytest.mark.parametrize("autocommit", [False, True], ids=["transaction", "autocommit"])
async def test_check_rls_leaves_a_transaction_the_caller_opened_to_the_caller(
    db: Database, autocommit: bool
) -> None:
    """check_rls on a connection in a transaction block of the caller's (or, without
    autocommit, in a transaction its earlier statements began) checks, leaves the
    transaction open and the caller's writes in it, which commit with it. Before, it rolled
    back the caller's writes, or raised ProgrammingError inside a transaction block."""
    notes = sql.Identifier(db.schema, "notes")
    insert = sql.SQL(
        "INSERT INTO {} (owner, body) VALUES (current_setting('app.user_id'), %s)"
    ).format(notes)
    async with await psycopg.AsyncConnection.connect(db.app_url, autocommit=autocommit) as conn:
        await conn.execute("SELECT set_config('app.user_id', 'alice', false)")
        async with conn.transaction():
            await conn.execute(insert, ("in a block",))
            assert await check_rls(conn, [db.notes]) == []
            await conn.execute(insert, ("after the check",))
        if not autocommit:
            await conn.execute(insert, ("implicit",))
            assert await check_rls(conn, [db.notes]) == []
            assert conn.info.transaction_status is TransactionStatus.INTRANS
            await conn.commit()
        else:
            assert await check_rls(conn, [db.notes]) == []
        assert conn.info.transaction_status is TransactionStatus.IDLE
    bodies = sorted(["after the check", "in a block"] + ([] if autocommit else ["implicit"]))
    async with await psycopg.AsyncConnection.connect(db.admin_url) as admin:
        cur = await admin.execute(sql.SQL("SELECT body FROM {} ORDER BY body").format(notes))
        assert [body for (body,) in await cur.fetchall()] == bodies


async def test_check_rls_that_fails_rolls_back_the_transaction_it_began(db: Database) -> None:
    """check_rls on a connection outside a transaction, whose query fails partway (the
    server refuses to show an ordinary role ``data_directory``, a setting the check is
    asked about after the role and a table were checked): the error is the query's, and
    the transaction the check began is rolled back (it was left failed, and the caller's
    next statement raised InFailedSqlTransaction). A transaction the caller had open
    stays the caller's, failed by the refused query, for the caller to roll back."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await check_rls(conn, [db.notes], settings=["data_directory"])
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert await _scalar(conn, "SELECT 1") == 1
        await conn.rollback()
        await conn.execute("SELECT 1")  # the caller's transaction
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await check_rls(conn, [], settings=["data_directory"])
        assert conn.info.transaction_status is TransactionStatus.INERROR
        await conn.rollback()
        assert await _scalar(conn, "SELECT 1") == 1


@pytest.mark.parametrize(
    ("tables", "settings", "said"),
    [
        ("notes", (), "tables must be a list of names, not one str ('notes')"),
        ([b"notes"], (), "tables must hold names as str, not b'notes'"),
        ((), "app.user_id", "settings must be a list of names, not one str ('app.user_id')"),
        ((), [None], "settings must hold names as str, not None"),
    ],
    ids=["one-table-name", "bytes-name", "one-setting", "none-setting"],
)
async def test_check_rls_refuses_one_name_for_a_list_and_names_of_no_str(
    db: Database, tables: Any, settings: Any, said: str
) -> None:
    """``check_rls(conn, "notes")`` would check the tables ``n``, ``o``, ``t``... and a
    bytes or None name no query can take (the server's UndefinedFunction): a TypeError
    saying which argument and what, before any query, the connection left as it was."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        with pytest.raises(TypeError) as raised:
            await check_rls(conn, tables, settings=settings)
        assert str(raised.value) == said
        assert conn.info.transaction_status is TransactionStatus.IDLE


@pytest.mark.parametrize("autocommit", [False, True], ids=["transaction", "autocommit"])
async def test_check_rls_reports_a_table_name_that_names_no_table_here(
    db: Database, autocommit: bool
) -> None:
    """A protected table name that is empty, has a NUL byte, is no identifier, has more
    than three parts or names another database is a problem of check_rls's, saying which
    name and why, like a table that does not exist; the tables after it are checked all the
    same, and the connection is left as it was. It raised the query's error
    (InvalidParameterValue, ...) and checked nothing after it."""
    names = ["", "x\x00y", "not a name", "a.b.c.d", "elsewhere_db.public.notes"]
    reasons = [
        "not a valid identifier",
        "NUL",
        "not a valid identifier",
        "too many dotted names",
        "cross-database references",
    ]
    async with await psycopg.AsyncConnection.connect(db.app_url, autocommit=autocommit) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(
                conn, [*names, f"{db.schema}.plain", db.notes], action="warn"
            )
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert await _scalar(conn, "SELECT 1") == 1
    assert len(problems) == len(names) + 1, problems
    for problem, name, reason in zip(problems[:-1], names, reasons, strict=True):
        assert problem.startswith(f"table name {name!r} names no table of this database ("), problem
        assert reason in problem, problem
    assert f"row-level security is not enabled on '{db.schema}.plain'" in problems[-1]


@pytest.mark.parametrize("autocommit", [False, True], ids=["transaction", "autocommit"])
async def test_check_rls_reports_names_the_connection_cannot_send(
    db: Database, autocommit: bool
) -> None:
    """A table or setting name with a lone surrogate (no encoding holds one), or with a
    character the connection's client encoding lacks, is a problem naming it and the
    encoding, and a setting name with a NUL byte one naming it; the names after them are
    checked all the same, the connection left as it was. ``check_rls()`` raised the
    driver's ``UnicodeEncodeError`` or ``DataError`` and checked nothing after it."""
    table, setting = "notes\ud800", "app.\udfff"
    kwargs = {"autocommit": autocommit, "client_encoding": "LATIN1"}
    async with await psycopg.AsyncConnection.connect(db.app_url, **kwargs) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(
                conn,
                [table, "заметки", f"{db.schema}.plain"],
                settings=[setting, "app.a\x00b", "app.user_id"],
                action="warn",
            )
        assert conn.info.transaction_status is TransactionStatus.IDLE
        assert await _scalar(conn, "SELECT 1") == 1
    assert len(problems) == 5, problems
    sent = "cannot be sent in this connection's client encoding 'latin-1' ("
    assert problems[0].startswith(f"table name {table!r} {sent}"), problems[0]
    assert problems[1].startswith(f"table name 'заметки' {sent}"), problems[1]
    assert f"row-level security is not enabled on '{db.schema}.plain'" in problems[2]
    assert problems[3].startswith(f"setting name {setting!r} {sent}"), problems[3]
    assert problems[4].startswith("setting name 'app.a\\x00b' names no setting ("), problems[4]
    assert "NUL" in problems[4], problems[4]


@pytest.fixture(name="hidden")
def fixture_hidden(db: Database) -> Iterator[str]:
    """A schema the app role has no USAGE on, holding a protected table (``guarded``), one
    without row-level security (``bare``), both readable by the app role, and a view over
    ``guarded`` that skips its policies; and a view in the test's own schema over
    ``guarded`` that does too (``peek``): the app role may read both views."""
    hidden = f"{db.schema}_hidden"
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    with _admin() as admin:
        admin.execute(f"CREATE SCHEMA {hidden}")
        admin.execute(f"CREATE TABLE {hidden}.guarded (owner text)")
        admin.execute(f"ALTER TABLE {hidden}.guarded ENABLE ROW LEVEL SECURITY")
        admin.execute(f"CREATE TABLE {hidden}.bare (owner text)")
        for view in ((hidden, "inner_peek"), (db.schema, "peek")):
            admin.execute(
                sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                    sql.Identifier(*view), sql.Identifier(hidden, "guarded")
                )
            )
        admin.execute(
            f"GRANT SELECT ON {hidden}.guarded, {hidden}.bare, {hidden}.inner_peek, "
            f"{db.schema}.peek TO {app}"
        )
    try:
        yield hidden
    finally:
        with _admin() as admin:
            admin.execute(f"DROP SCHEMA {hidden} CASCADE")


async def test_check_rls_checks_tables_in_a_schema_the_role_cannot_use(
    db: Database, hidden: str
) -> None:
    """Protected tables named in a schema the role has no USAGE on: check_rls checks them
    all the same (it raised "permission denied for schema" before), and reports what it
    finds there: the table without row-level security, and the view the role can read
    over the protected one, not the view it cannot reach (in that schema)."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute(f"SELECT FROM {hidden}.guarded")
        await conn.rollback()
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(conn, [f"{hidden}.guarded", f"{hidden}.bare"], action="warn")
    assert len(problems) == 2, problems
    assert f"view '{db.schema}.peek' reads '{hidden}.guarded'" in problems[0]
    assert f"row-level security is not enabled on '{hidden}.bare'" in problems[1]


async def test_check_rls_takes_a_name_with_this_database_in_a_schema_the_role_cannot_use(
    db: Database, hidden: str
) -> None:
    """A protected table named with this database, in a schema the role has no USAGE on,
    is checked like the same name without the database (it raised "permission denied for
    schema"); a name in another database is no table of this one."""
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        here = await _scalar(conn, "SELECT current_database()")
        await conn.rollback()
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, [f"{here}.{hidden}.guarded"])
        assert len(info.value.problems) == 1, info.value.problems
        assert f"view '{db.schema}.peek' reads '{here}.{hidden}.guarded'" in info.value.problems[0]
        elsewhere = f"{here}_elsewhere.{hidden}.guarded"
        with pytest.raises(RowSecurityError) as info:
            await check_rls(conn, [elsewhere])
        assert info.value.problems == [
            f"table name {elsewhere!r} names no table of this database (cross-database "
            f'references are not implemented: "{elsewhere}"): name a table as table, '
            "schema.table or database.schema.table, in double quotes a part that is not "
            'lower case, as in SQL ("My Table")'
        ]


async def test_check_rls_passes_children_and_views_under_the_policies_or_out_of_reach(
    db: Database, hidden: str
) -> None:
    """No problem for check_rls: a child of the protected table, granted to the role, in a
    schema the role has no USAGE on (it cannot reach it); a child the role owns with
    row-level security enabled and FORCEd; a view over a table that FORCEs row-level
    security owned by that table's owner, whom FORCE puts under the policies."""
    app = psycopg.conninfo.conninfo_to_dict(db.app_url)["user"]
    owner = psycopg.conninfo.conninfo_to_dict(db.owner_url)["user"]
    schema = db.schema
    with _admin() as admin:
        for statement in (
            "CREATE TABLE {h}.kid () INHERITS ({s}.notes)",
            "GRANT SELECT ON {h}.kid TO {app}",
            "CREATE TABLE {s}.own_kid () INHERITS ({s}.notes)",
            "ALTER TABLE {s}.own_kid ENABLE ROW LEVEL SECURITY",
            "ALTER TABLE {s}.own_kid FORCE ROW LEVEL SECURITY",
            "ALTER TABLE {s}.own_kid OWNER TO {app}",
            "CREATE VIEW {s}.forced_view AS SELECT * FROM {s}.forced",
            "ALTER VIEW {s}.forced_view OWNER TO {owner}",
            "GRANT SELECT ON {s}.forced_view TO {app}",
        ):
            admin.execute(statement.format(h=hidden, s=schema, app=app, owner=owner))
    async with await psycopg.AsyncConnection.connect(db.app_url) as conn:
        assert await check_rls(conn, [db.notes, f"{schema}.forced"]) == []


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_strategies_with_rls_check_warn_open_on_tables_the_role_cannot_reach(
    db: Database, hidden: str, strategy: str
) -> None:
    """With ``rls_check="warn"`` and a protected table in a schema the role cannot use, the
    strategy warns of what the check found and serves checkouts (before, the check's
    "permission denied for schema" failed every checkout)."""
    options: dict[str, Any] = {
        "timeout": 5,
        "rls_tables": [db.notes, f"{hidden}.bare"],
        "rls_check": "warn",
        "kwargs": db.kwargs(),
    }
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, **options)
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, max_total=1, **options)
    )
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")):
            with pytest.warns(RowSecurityWarning, match=f"not enabled on '{hidden}.bare'"):
                async with connection() as conn:
                    assert await _scalar(conn, "SELECT current_setting('app.user_id')") == "alice"
    finally:
        await registry.aclose()


async def _four_users_through_a_pool(
    db: Database,
    strategy: str,
    kwargs: dict[str, Any],
    work: Callable[[str], Awaitable[object]],
) -> list[str]:
    """A SharedPool ("shared") or PerUserPools of connections made with ``kwargs``, which
    checks row-level security on the notes ("raise"), installed in a registry where four
    users at once each run ``work`` (given their name) in a scope of theirs; their names."""
    options: dict[str, Any] = {
        "timeout": 5,
        "rls_tables": [db.notes],
        "rls_check": "raise",
        "kwargs": kwargs,
    }
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=2, **options)
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, max_total=2, **options)
    )
    registry = Registry()
    pool.install(registry)
    users = [f"user-{n}" for n in range(4)]

    async def user(name: str) -> None:
        async with registry.open_scope(_ctx(name)):
            await work(name)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for name in users:
                    tg.start_soon(user, name)
    finally:
        await registry.aclose()
    return users


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_connections_made_with_dict_rows_open_and_check_row_level_security(
    db: Database, strategy: str
) -> None:
    """The application's connections return dicts (``kwargs={"row_factory": dict_row}``):
    the pool opens, its self-check still tells a protected table from an unprotected one,
    and each of several users gets dict rows of its own rows only. Before, ambient read its
    own queries' rows by position: no connection could be configured (every checkout was
    refused after its timeout, "is it reachable?") and check_rls raised KeyError."""
    kwargs = {**db.kwargs(), "row_factory": dict_row}
    async with await psycopg.AsyncConnection.connect(db.app_url, **kwargs) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(conn, [db.notes, f"{db.schema}.plain"], action="warn")
    assert len(problems) == 1
    assert f"{db.schema}.plain" in problems[0]
    assert "not enabled" in problems[0]
    seen: dict[str, list[Any]] = {}

    async def work(name: str) -> None:
        async with connection() as conn:
            await conn.execute(
                db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)"), (name, name)
            )
        async with connection() as conn:
            cur = await conn.execute(db.sql("SELECT owner, body FROM {notes}"))
            seen[name] = await cur.fetchall()

    users = await _four_users_through_a_pool(db, strategy, kwargs, work)
    assert seen == {name: [{"owner": name, "body": name}] for name in users}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_connections_made_with_raw_cursors_open_and_check_row_level_security(
    db: Database, strategy: str
) -> None:
    """The application's cursors bind ``$1`` placeholders
    (``kwargs={"cursor_factory": AsyncRawCursor}``): check_rls still tells a protected
    table from an unprotected one, the pool opens, and each of several users reads its own
    rows only. Before, ambient sent its own ``%s`` queries through the application's
    cursor class: check_rls raised SyntaxError, and PerUserPools could configure no
    connection (every checkout was refused after its timeout)."""
    kwargs = {**db.kwargs(), "cursor_factory": psycopg.AsyncRawCursor}
    async with await psycopg.AsyncConnection.connect(db.app_url, **kwargs) as conn:
        with pytest.warns(RowSecurityWarning):
            problems = await check_rls(
                conn, [db.notes, f"{db.schema}.plain"], settings=["app.user_id"], action="warn"
            )
    assert len(problems) == 1
    assert f"{db.schema}.plain" in problems[0]
    seen: dict[str, list[Any]] = {}

    async def work(name: str) -> None:
        async with connection() as conn:
            await conn.execute(
                db.sql("INSERT INTO {notes} (owner, body) VALUES ($1, $2)"), (name, name)
            )
        async with connection() as conn:
            cur = await conn.execute(
                db.sql("SELECT owner, current_setting($1, true) FROM {notes}"), ("app.user_id",)
            )
            seen[name] = await cur.fetchall()

    users = await _four_users_through_a_pool(db, strategy, kwargs, work)
    assert seen == {name: [(name, name)] for name in users}


# -- PerUserPools ------------------------------------------------------------------------------


async def _server_connections(db: Database) -> int:
    return int(
        await _admin_scalar(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (db.app_name,),
        )
    )


async def test_per_user_pools_give_each_user_its_own_sessions(db: Database) -> None:
    """Each user gets connections of its own pool, with the user's settings for the
    session; no connection serves two users."""
    pools = PerUserPools(db.app_url, max_total=10, rls_check="raise", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    pids: dict[str, set[int]] = {}
    for _ in range(3):
        for user in ("alice", "bob", "carol"):
            async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                row = await (
                    await conn.execute(
                        "SELECT current_setting('app.user_id', true), pg_backend_pid()"
                    )
                ).fetchone()
                assert row is not None
                assert row[0] == user
                pids.setdefault(user, set()).add(row[1])
    assert all(len(p) == 1 for p in pids.values())
    assert len(set().union(*pids.values())) == 3
    assert pools.stats().pools == 3
    await registry.aclose()
    assert pools.stats().pools == 0
    assert pools.stats().slots == 0
    await _eventually(_async_int(lambda: _server_connections(db), 0), "connections closed")


async def _checkout() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A FastAPI ``yield`` dependency holding a checkout for the endpoint."""
    async with connection() as conn:
        yield conn


Checkout = Annotated[psycopg.AsyncConnection[Any], Depends(_checkout)]


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_an_error_answer_raised_through_the_checkout_rolls_its_writes_back(
    db: Database, strategy: str
) -> None:
    """FastAPI turns an HTTPException into a 409 answer after it left the endpoint: raised
    inside the checkout's block, or in an endpoint whose checkout a ``yield`` dependency
    holds, the write is rolled back; an endpoint that answers 409 itself from inside the
    block ends it normally, so its write is committed (the documented rule: the block's
    own outcome decides, not the status). Ten users at once, each seeing only its own row."""
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=3, rls_check="raise", kwargs=db.kwargs())
        if strategy == "shared"
        else PerUserPools(
            db.app_url, max_size=1, max_total=3, rls_check="raise", kwargs=db.kwargs()
        )
    )
    registry = Registry()
    pool.install(registry)
    app = FastAPI()
    install(app, registry=registry, identity=trusted_header())
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, %s)")

    @app.post("/raise")
    async def raising(ctx: CurrentContext) -> None:
        async with connection() as conn:
            await conn.execute(insert, (ctx.user_id, "raise"))
            raise HTTPException(409)

    @app.post("/dependency")
    async def dependency(ctx: CurrentContext, conn: Checkout) -> None:
        await conn.execute(insert, (ctx.user_id, "dependency"))
        raise HTTPException(409)

    @app.post("/answer")
    async def answer(ctx: CurrentContext) -> JSONResponse:
        async with connection() as conn:
            await conn.execute(insert, (ctx.user_id, "answer"))
            return JSONResponse({"detail": "conflict"}, status_code=409)

    @app.get("/notes")
    async def notes() -> list[list[str]]:
        async with connection() as conn:
            cur = await conn.execute(db.sql("SELECT owner, body FROM {notes} ORDER BY body"))
            return [list(row) for row in await cur.fetchall()]

    seen: dict[str, Any] = {}
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))

    async def user(http: httpx.AsyncClient, name: str) -> None:
        headers = {"x-user-id": name}
        statuses = [
            (await http.post(path, headers=headers)).status_code
            for path in ("/raise", "/dependency", "/answer")
        ]
        seen[name] = (statuses, (await http.get("/notes", headers=headers)).json())

    users = [f"user-{n}" for n in range(10)]
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for name in users:
                        tg.start_soon(user, http, name)
    finally:
        await registry.aclose()
    assert seen == {name: ([409, 409, 409], [[name, "answer"]]) for name in users}


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_block_that_cannot_commit_says_so_instead_of_losing_its_writes(
    db: Database, strategy: str
) -> None:
    """The block writes a row, then leaves a ``cursor.stream()`` loop at its first match: the
    stream's query still runs when the block ends, so the checkout cannot commit (the query
    is cancelled, the transaction rolled back). It used to end as if all went well, the
    row silently gone; it raises now, naming the likely cause. The same block reading the
    stream to its end commits, and the pool serves the next checkout."""
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=2, rls_check="raise", kwargs=db.kwargs())
        if strategy == "shared"
        else PerUserPools(db.app_url, max_total=4, rls_check="raise", kwargs=db.kwargs())
    )
    registry = Registry()
    pool.install(registry)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', %s)")
    try:
        for body, stop_early in (("lost", True), ("kept", False)):
            async with registry.open_scope(_ctx("alice")):
                with (
                    pytest.raises(psycopg.OperationalError, match="still running a query")
                    if stop_early
                    else contextlib.nullcontext()
                ):
                    async with pool.connection() as conn:
                        await conn.execute(insert, (body,))
                        async for (n,) in conn.cursor().stream("SELECT generate_series(1, 1000)"):
                            if stop_early and n == 3:
                                break
        async with registry.open_scope(_ctx("alice")), pool.connection() as conn:
            bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
    finally:
        await registry.aclose()
    assert bodies == [("kept",)]


def _one_connection_pool(db: Database, strategy: str) -> tuple[SharedPool | PerUserPools, Registry]:
    """A pool of the given strategy holding at most one connection, installed in a new
    registry."""
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, rls_check="raise", kwargs=db.kwargs())
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, rls_check="raise", kwargs=db.kwargs())
    )
    registry = Registry()
    pool.install(registry)
    return pool, registry


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_pipeline_left_open_is_not_a_silent_commit(db: Database, strategy: str) -> None:
    """A handler enters ``conn.pipeline()`` and never leaves it (its results synced, so no
    query runs): the checkout's end would be queued, not run. SharedPool's COMMIT and reset
    failed unseen and its block ended as if committed; PerUserPools committed and handed
    the connection back still in pipeline mode. The block raises now, nothing of it is
    committed, and the next checkout gets a connection out of pipeline mode."""
    pool, registry = _one_connection_pool(db, strategy)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'piped')")
    try:
        async with registry.open_scope(_ctx("alice")):
            with pytest.raises(psycopg.OperationalError, match="pipeline"):
                async with pool.connection() as conn:
                    left_open = conn.pipeline()
                    pipeline = await left_open.__aenter__()
                    await conn.execute(insert)
                    await pipeline.sync()
            with contextlib.suppress(psycopg.Error):
                await left_open.__aexit__(None, None, None)
            async with pool.connection() as conn:
                piped = conn.pgconn.pipeline_status
                count = await _scalar(conn, db.sql("SELECT count(*) FROM {notes}"))
    finally:
        await registry.aclose()
    assert (piped, count) == (PipelineStatus.OFF, 0)


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_copy_left_open_is_not_a_silent_commit(db: Database, strategy: str) -> None:
    """A handler starts a ``COPY ... TO STDOUT``, reads part of it and ends its block with
    the COPY still open (entered by hand, never left): the connection is still busy, so
    the block raises, nothing of it is committed, and the next checkout gets a connection
    that is not in COPY mode."""
    pool, registry = _one_connection_pool(db, strategy)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'copied')")
    try:
        async with registry.open_scope(_ctx("alice")):
            with pytest.raises(psycopg.OperationalError, match="still running a query"):
                async with pool.connection() as conn:
                    await conn.execute(insert)
                    left_open = conn.cursor().copy(
                        "COPY (SELECT generate_series(1, 100000)) TO STDOUT"
                    )
                    copy = await left_open.__aenter__()
                    assert await copy.read()
            with contextlib.suppress(psycopg.Error):
                await left_open.__aexit__(None, None, None)
            async with pool.connection() as conn:
                count = await _scalar(conn, db.sql("SELECT count(*) FROM {notes}"))
    finally:
        await registry.aclose()
    assert count == 0


@pytest.mark.parametrize("ends_first", ["y", "x"], ids=["room-frees-up", "its-own-comes-back"])
async def test_a_checkout_waiting_to_grow_its_pool_takes_what_comes_first(
    db: Database, ends_first: str
) -> None:
    """max_total=2: x and y hold one connection each, and x opens a second checkout, for
    which x's pool must grow: there is no room. When y's checkout ends first, y's idle
    pool is closed for room and x's pool grows into it, long before the timeout (it used
    to wait only for x's own first connection and fail with PoolExhaustedError). When x's
    first checkout ends first, the second takes that connection at once, while y still
    holds its own and no room frees up; it does not wait for room until its timeout."""
    pools = PerUserPools(
        db.app_url, max_size=2, max_total=2, timeout=30, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    x_holds, y_holds, y_done, x_done, got = (anyio.Event() for _ in range(5))
    second: list[str] = []

    async def hold(user: str, holding: anyio.Event, release: anyio.Event) -> None:
        async with registry.open_scope(_ctx(user)), pools.connection():
            holding.set()
            await release.wait()

    async def x_again() -> None:
        async with registry.open_scope(_ctx("x")), pools.connection() as conn:
            second.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))
            got.set()

    first, then = (y_done, x_done) if ends_first == "y" else (x_done, y_done)
    try:
        with anyio.fail_after(20):  # well within the 30 s a checkout waits for room
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, "x", x_holds, x_done)
                await x_holds.wait()
                tg.start_soon(hold, "y", y_holds, y_done)
                await y_holds.wait()
                tg.start_soon(x_again)
                await anyio.wait_all_tasks_blocked()
                assert (second, pools.stats().slots) == ([], 2)
                first.set()
                await got.wait()
                assert not then.is_set()
                then.set()
        stats = pools.stats()
    finally:
        await registry.aclose()
    assert second == ["x"]
    assert (stats.evicted, stats.slots) == (int(ends_first == "y"), 2)


async def _x_grows_as_z_is_woken(db: Database, steps: int) -> list[str]:
    """One round of the test below: the users in the order they got their connection."""
    pools = PerUserPools(
        db.app_url, max_size=2, max_total=2, timeout=10, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    x_holds, y_holds, y_done, z_got, x_done = (anyio.Event() for _ in range(5))
    order: list[str] = []

    async def hold_x() -> None:
        async with registry.open_scope(_ctx("x")), pools.connection():
            x_holds.set()
            await x_done.wait()

    async def y_then_x_again() -> None:
        async with registry.open_scope(_ctx("y")), pools.connection():
            y_holds.set()
            await y_done.wait()
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        async with registry.open_scope(_ctx("x")), pools.connection() as conn:
            order.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))

    async def z() -> None:
        async with registry.open_scope(_ctx("z")), pools.connection() as conn:
            order.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))
            z_got.set()

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold_x)
                await x_holds.wait()
                tg.start_soon(y_then_x_again)
                await y_holds.wait()
                tg.start_soon(z)
                await anyio.wait_all_tasks_blocked()
                assert pools.stats().waiting == 1
                y_done.set()
                with anyio.move_on_after(5):  # z's room came free: well within its 10 s
                    await z_got.wait()
                x_done.set()
    finally:
        await registry.aclose()
    return order


async def test_room_freed_for_a_user_with_no_connection_is_not_taken_by_a_busy_user(
    db: Database,
) -> None:
    """max_total=2: x and y hold one connection each, and z, which has none, waits for
    room. y's checkout ends, so y's idle pool is z's to close for room, and right then
    (after a few more steps, at each count in turn) x asks for a second connection. x's
    pool used to grow into that room whenever x asked between z being woken and z
    running, and z, which had waited first, waited on until x's work was done."""
    for steps in range(8):
        order = await _x_grows_as_z_is_woken(db, steps)
        assert order == ["z", "x"], f"{steps} steps after y's checkout ended"


async def _a_new_user_checks_out_as_bob_is_woken(db: Database, steps: int) -> list[str]:
    """One round of the test below: the users in the order they got their connection."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=10, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    holding, release = anyio.Event(), anyio.Event()
    served: list[str] = []

    async def checkout(user: str) -> None:
        async with registry.open_scope(_ctx(user)), connection() as conn:
            served.append(await _scalar(conn, "SELECT current_setting('app.user_id', true)"))

    async def alice_then_carol() -> None:
        async with registry.open_scope(_ctx("alice")), connection():
            holding.set()
            await release.wait()
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        await checkout("carol")

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice_then_carol)
                await holding.wait()
                tg.start_soon(checkout, "bob")
                await _eventually(_async(lambda: pools.stats().waiting == 1), "bob waits")
                release.set()
    finally:
        await registry.aclose()
    return served


async def test_room_freed_for_a_waiter_is_not_taken_by_a_new_users_first_checkout(
    db: Database,
) -> None:
    """max_total=1: alice holds the one connection and bob's first checkout waits for room.
    Alice's checkout ends, so her idle pool is bob's to close for room, and right then
    (after a few more steps, at each count in turn) carol's first checkout asks for room.
    Carol used to take it whenever she asked between bob being woken and bob running:
    bob, first in line, waited again until carol was done (or timed out meanwhile)."""
    for steps in range(8):
        served = await _a_new_user_checks_out_as_bob_is_woken(db, steps)
        assert served == ["bob", "carol"], f"{steps} steps after alice's checkout ended"


async def test_a_checkout_cancelled_as_its_pool_hands_it_a_connection_loses_none(
    db: Database,
) -> None:
    """max_total=1: a second checkout of the user waits for its pool's one connection or
    for room to grow. The holder gives the connection back and cancels the waiter a few
    steps later, at each step in turn: whenever the waiter's pool had already handed it
    the connection, that connection was never given back, and the user's pool stayed a
    connection short (every later checkout refused with PoolExhaustedError)."""
    pools = PerUserPools(
        db.app_url, max_size=2, max_total=1, timeout=10, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)

    async def one_round(steps: int) -> None:
        waiting = anyio.CancelScope()
        holding, release = anyio.Event(), anyio.Event()

        async def holder() -> None:
            async with pools.connection():
                holding.set()
                await release.wait()
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            waiting.cancel()

        async def waiter() -> None:
            with waiting:
                async with pools.connection() as conn:
                    await conn.execute("SELECT 1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            release.set()

    try:
        for steps in range(12):
            async with registry.open_scope(_ctx("alice")):
                await one_round(steps)
                user_pool = await resolve(pools)
                pool = user_pool.pool
                assert pool is not None

                async def none_lent(pool: Any = pool) -> bool:
                    # A query cancelled mid-way closes its connection: the pool replaces it.
                    stats = pool.get_stats()
                    return stats.get("pool_size", 0) == stats.get("pool_available", 0) == 1

                await _eventually(none_lent, f"every connection back after {steps} steps")
                assert pools.checked_out == 0
                with anyio.fail_after(5):
                    async with pools.connection(timeout=2) as conn:
                        assert await _scalar(conn, "SELECT 1") == 1
    finally:
        await registry.aclose()


@pytest.mark.parametrize("closed_by", ["shutdown", "idle_ttl", "room"])
async def test_per_user_pools_close_a_connection_handed_back_as_the_pool_closes(
    db: Database, closed_by: str
) -> None:
    """psycopg's pool takes a connection back in a background task, and drops the task
    when the pool has closed meanwhile. Alice hands her two connections back; the first
    one's reset holds the pool's one worker until her pool is closing (at shutdown, after
    idle_ttl, or for room another user needs), so the second one's return is still
    queued then. Once the close has returned, neither is open, on the client or on the
    server, and garbage collection finds nothing to warn about. The second used to stay
    open until garbage collection closed it, its server session too, while its slot of
    max_total was already given to another pool."""
    now = [1000.0]
    registry = Registry(clock=lambda: now[0])
    made: list[psycopg.AsyncConnection[Any]] = []
    tracked = _recording(made)

    resetting, resume = anyio.Event(), anyio.Event()

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        if not resetting.is_set():
            resetting.set()
            await resume.wait()

    pools = PerUserPools(
        db.app_url,
        max_size=2,
        max_total=2,
        idle_ttl=60,
        timeout=10,
        rls_check="off",
        kwargs=db.kwargs(),
        num_workers=1,
        connection_class=tracked,
        reset=reset,
    )
    pools.install(registry)
    both = anyio.Event()
    holders = 0

    async def hold() -> None:
        nonlocal holders
        async with registry.open_scope(_ctx("alice")), connection() as conn:
            await conn.execute("SELECT 1")
            holders += 1
            if holders == 2:
                both.set()
            await both.wait()

    async def room() -> None:
        async with registry.open_scope(_ctx("bob")), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id')") == "bob"

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                tg.start_soon(hold)
            (user_pool,) = pools._pools
            psycopg_pool = user_pool.pool
            assert psycopg_pool is not None
            alices = list(made)
            assert len(alices) == 2
            pids = [conn.info.backend_pid for conn in alices]
            await resetting.wait()  # the first return holds the worker, the second waits
            async with anyio.create_task_group() as tg:
                if closed_by == "shutdown":
                    tg.start_soon(registry.aclose)
                elif closed_by == "idle_ttl":
                    now[0] += 61
                    tg.start_soon(registry.sweep)
                else:
                    tg.start_soon(room)
                await anyio.wait_all_tasks_blocked()
                assert psycopg_pool.closed  # closing, waiting for its worker
                resume.set()
            assert [conn.closed for conn in alices] == [True, True]
            assert pools.stats().slots == (1 if closed_by == "room" else 0)

            async def backends_gone() -> bool:
                left = await _admin_scalar(
                    db, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                )
                return bool(left == 0)

            await _eventually(backends_gone, "alice's server sessions ended")
    finally:
        resume.set()
        await registry.aclose()
    del alices
    made.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_per_user_pools_close_the_connection_of_a_failed_rls_check(db: Database) -> None:
    """A user's pool whose first connection fails the row-level security check is closed
    with its connection: psycopg's pool took the connection back in a background task,
    dropped once the pool had closed, and the connection used to stay open, its server
    session too, until garbage collection, after its slot of max_total was given back."""
    made: list[psycopg.AsyncConnection[Any]] = []
    tracked = _recording(made)

    pools = PerUserPools(
        db.app_url,
        max_total=2,
        rls_tables=[f"{db.schema}.plain"],
        rls_check="raise",
        kwargs=db.kwargs(),
        connection_class=tracked,
    )
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")):
            with pytest.raises(RowSecurityError, match="not enabled"):
                async with pools.connection():
                    pass
        assert len(made) == 1
        assert made[0].closed
        assert pools.stats().slots == 0
        await _eventually(_async_int(lambda: _server_connections(db), 0), "connection closed")
    finally:
        await registry.aclose()


def _async_int(get: Callable[[], Awaitable[int]], expected: int) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return await get() == expected

    return run


async def test_per_user_pools_rls(db: Database) -> None:
    """Rows written through PerUserPools are visible to their owner only."""
    pools = PerUserPools(db.app_url, max_total=10, rls_check="raise", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    for user in ("alice", "bob"):
        async with registry.open_scope(_ctx(user)), connection() as conn:
            await conn.execute(
                db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'n')"), (user,)
            )
    async with registry.open_scope(_ctx("alice")), connection() as conn:
        owners = await (await conn.execute(db.sql("SELECT owner FROM {notes}"))).fetchall()
    assert owners == [("alice",)]
    await registry.aclose()


async def test_per_user_pools_check_row_level_security_once_per_connection_string(
    db: Database,
) -> None:
    """rls_check='warn' with a role that owns a table without FORCE: the first user's pool
    checks the role and warns; the pools of the users after it, which log in with the same
    connection string, neither check it again (a checkout and a query more as each user
    first connects) nor repeat the warning."""
    pools = PerUserPools(
        db.owner_url, max_total=10, rls_tables=[f"{db.schema}.owned"], kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    try:
        with pytest.warns(RowSecurityWarning, match="FORCE ROW LEVEL SECURITY") as warned:
            for user in ("alice", "bob", "carol"):
                async with registry.open_scope(_ctx(user)), pools.connection() as conn:
                    assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == (
                        user
                    )
        assert pools.stats().pools == 3
        assert len([w for w in warned if w.category is RowSecurityWarning]) == 1
    finally:
        await registry.aclose()


async def test_per_user_pools_check_row_level_security_for_each_connection_string(
    db: Database,
) -> None:
    """A conninfo callable logs alice in as the application's role and bob as a superuser.
    Alice's pool opens first and passes the check; bob's, which logs in with another
    connection string, is checked too, and refused with rls_check='raise', before a
    statement of bob's runs. Each connection string is checked once, not only the first
    one the strategy meets."""
    pools = PerUserPools(
        lambda user: db.app_url if user.user_id == "alice" else db.admin_url,
        max_size=1,
        max_total=2,
        timeout=5,
        rls_check="raise",
        rls_tables=[db.notes],
        kwargs=db.kwargs(),
    )
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "alice"
        async with registry.open_scope(_ctx("bob")):
            with pytest.raises(RowSecurityError, match="superuser"):
                async with pools.connection():
                    pytest.fail("bob's pool must not open as a superuser")
        assert (pools.stats().pools, pools.stats().slots) == (1, 1)
    finally:
        await registry.aclose()


async def test_per_user_pools_count_every_min_size_connection_against_max_total(
    db: Database,
) -> None:
    """min_size=2 and max_total=2: the first user's pool opens holding both of its
    connections, all the room there is, so the second user's first checkout closes that
    idle pool to make room rather than open two connections more."""
    pools = PerUserPools(
        db.app_url, min_size=2, max_size=2, max_total=2, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), pools.connection():
            pass
        await _eventually(_async_int(lambda: _server_connections(db), 2), "alice's pool filled")
        assert pools.stats().slots == 2
        async with registry.open_scope(_ctx("bob")), pools.connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "bob"
        assert (pools.stats().pools, pools.stats().slots, pools.stats().evicted) == (1, 2, 1)
        await _eventually(_async_int(lambda: _server_connections(db), 2), "bob's pool filled")
    finally:
        await registry.aclose()


async def test_per_user_pools_let_a_checkout_in_progress_finish_as_shutdown_closes_its_pool(
    db: Database,
) -> None:
    """Shutdown closes alice's pool while her checkout runs: the checkout goes on with its
    connection and commits, and the connection is closed as it comes back, not under the
    statements still to run."""
    pools = PerUserPools(db.app_url, max_size=1, max_total=1, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'a')"))
            await registry.aclose()
            assert pools.stats().pools == 0
            await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', 'b')"))
        assert conn.closed
        with _admin() as admin:
            bodies = admin.execute(db.sql("SELECT body FROM {notes} ORDER BY body")).fetchall()
        assert bodies == [("a",), ("b",)]
        assert (pools.stats().slots, pools.stats().checked_out) == (0, 0)
    finally:
        await registry.aclose()


async def test_per_user_pools_grow_only_for_checkouts_at_once(db: Database) -> None:
    """A user whose checkouts come one after another holds one connection of the budget,
    whatever max_size allows: the next user's pool finds room of its own, and the first
    user's pool is not closed to make it."""
    pools = PerUserPools(db.app_url, max_size=5, max_total=2, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    try:
        pids = set()
        for _ in range(3):
            async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
                pids.add(conn.info.backend_pid)
        assert len(pids) == 1
        assert pools.stats().slots == 1
        async with registry.open_scope(_ctx("bob")), pools.connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "bob"
        assert (pools.stats().pools, pools.stats().slots, pools.stats().evicted) == (2, 2, 0)
    finally:
        await registry.aclose()


async def test_per_user_pools_a_checkout_waiting_for_room_takes_the_room_another_pool_frees(
    db: Database,
) -> None:
    """Alice holds a connection and bob the rest of max_total; alice's second checkout waits
    for room. Once bob's checkout ends, his idle pool is closed to make that room and
    alice's second checkout gets a connection of its own at once, while her first still
    holds the other, rather than wait for her first to end (or its timeout)."""
    pools = PerUserPools(
        db.app_url, max_size=2, max_total=2, timeout=5, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    bob_in, bob_out = anyio.Event(), anyio.Event()

    async def bob() -> None:
        async with registry.open_scope(_ctx("bob")), pools.connection():
            bob_in.set()
            await bob_out.wait()

    async def room_wanted() -> bool:
        return pools.stats().waiting == 1

    try:
        with anyio.fail_after(4):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bob)
                await bob_in.wait()
                async with registry.open_scope(_ctx("alice")), pools.connection() as first:

                    async def second() -> None:
                        async with pools.connection() as conn:
                            assert conn.info.backend_pid != first.info.backend_pid
                            assert await _scalar(
                                conn, "SELECT current_setting('app.user_id', true)"
                            ) == ("alice")

                    async with anyio.create_task_group() as alice:
                        alice.start_soon(second)
                        await _eventually(room_wanted, "alice's second checkout waits for room")
                        bob_out.set()
        assert (pools.stats().pools, pools.stats().slots, pools.stats().evicted) == (1, 2, 1)
    finally:
        bob_out.set()
        await registry.aclose()


async def test_per_user_pools_run_their_background_work_outside_any_request(
    db: Database,
) -> None:
    """psycopg's pool workers, which take connections back and run the pool's ``reset``,
    start with no request bound: a reset sees no context, not the one of the request that
    opened the user's pool, which the workers would otherwise keep alive as long as the
    pool lives."""
    seen: list[UserExecutionContext | None] = []

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        seen.append(current_context_or_none())

    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, rls_check="off", kwargs=db.kwargs(), reset=reset
    )
    registry = Registry()
    pools.install(registry)
    try:
        for _ in range(2):
            async with registry.open_scope(_ctx("alice")), pools.connection() as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == (
                    "alice"
                )
        await _eventually(_async(lambda: len(seen) == 2), "both connections taken back")
        assert seen == [None, None]
    finally:
        await registry.aclose()


async def test_per_user_pools_commit_on_success_rollback_on_error(db: Database) -> None:
    """A per-user checkout commits when its block ends normally, rolls back when it raises."""
    pools = PerUserPools(db.app_url, max_total=5, rls_check="raise", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', %s)")
    async with registry.open_scope(_ctx("alice")):
        async with connection() as conn:
            await conn.execute(insert, ("kept",))
        with pytest.raises(ZeroDivisionError):
            async with connection() as conn:
                await conn.execute(insert, ("dropped",))
                _ = 1 / 0
        async with connection() as conn:
            bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
    assert bodies == [("kept",)]
    await registry.aclose()


async def test_per_user_pools_caught_statement_error_is_not_a_silent_commit(
    db: Database,
) -> None:
    """A per-user checkout that ends normally in a failed transaction (the statement's
    error caught inside) is rolled back and raises InFailedSqlTransaction; the next
    checkout starts clean."""
    pools = PerUserPools(db.app_url, max_total=5, rls_check="raise", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    insert = db.sql("INSERT INTO {notes} (owner, body) VALUES ('alice', %s)")
    async with registry.open_scope(_ctx("alice")):
        with pytest.raises(psycopg.errors.InFailedSqlTransaction, match="rolled back"):
            async with connection() as conn:
                await conn.execute(insert, ("lost",))
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    await conn.execute("SELECT 1/0")
        async with connection() as conn:
            assert conn.info.transaction_status is TransactionStatus.IDLE
            bodies = await (await conn.execute(db.sql("SELECT body FROM {notes}"))).fetchall()
    assert bodies == []
    await registry.aclose()


async def test_per_user_pools_300_users_never_exceed_max_total(db: Database) -> None:
    """300 users at once with max_total=50: the server never sees more than 50 of our
    connections (pg_stat_activity, sampled throughout), and every user is served."""
    pools = PerUserPools(
        db.app_url,
        max_size=5,
        max_total=50,
        timeout=30,
        rls_check="off",
        kwargs=db.kwargs(),
        num_workers=1,
    )
    registry = Registry()
    pools.install(registry)
    peak = 0
    done = anyio.Event()
    served: set[str] = set()

    async def sample() -> None:
        nonlocal peak
        async with await psycopg.AsyncConnection.connect(db.admin_url, autocommit=True) as conn:
            while not done.is_set():
                count = await _scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (db.app_name,),
                )
                peak = max(peak, int(count))
                assert pools.stats().slots <= 50
                await anyio.sleep(0.005)

    async def user(n: int) -> None:
        name = f"user-{n}"
        async with registry.open_scope(_ctx(name)), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == name
            await conn.execute("SELECT pg_sleep(0.01)")
        served.add(name)

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                async with anyio.create_task_group() as users:
                    for n in range(300):
                        users.start_soon(user, n)
                done.set()
    finally:
        # Closed on a failure too: pools left open would hang the event loop's end.
        await registry.aclose()
    assert len(served) == 300
    assert 0 < peak <= 50
    assert pools.stats().evicted >= 250
    await _eventually(_async_int(lambda: _server_connections(db), 0), "connections closed")


async def test_per_user_pools_close_after_idle_ttl(db: Database) -> None:
    """A user's pool closes idle_ttl seconds after the user's last request (the registry's
    clock is injected), and its server connections go away."""
    now = [1000.0]
    registry = Registry(clock=lambda: now[0])
    pools = PerUserPools(db.app_url, idle_ttl=60, max_total=10, rls_check="off", kwargs=db.kwargs())
    pools.install(registry)
    async with registry.open_scope(_ctx("alice")), connection() as conn:
        await conn.execute("SELECT 1")
    assert pools.stats().pools == 1
    now[0] += 59
    await registry.sweep()
    assert pools.stats().pools == 1
    assert await _server_connections(db) == 1
    now[0] += 2
    await registry.sweep()
    assert pools.stats().pools == 0
    assert pools.stats().slots == 0
    await _eventually(_async_int(lambda: _server_connections(db), 0), "connections closed")
    await registry.aclose()


async def test_per_user_pools_keep_no_user_pool_once_cleaned_up(db: Database) -> None:
    """Once a user's pool is cleaned up (idle_ttl past its user's last request), the
    strategy holds it no longer: a long-running application keeps no pool object for every
    user it ever served."""
    now = [1000.0]
    registry = Registry(clock=lambda: now[0])
    pools = PerUserPools(db.app_url, idle_ttl=60, max_total=10, rls_check="off", kwargs=db.kwargs())
    pools.install(registry)

    async def serve_alice() -> weakref.ref[Any]:
        async with registry.open_scope(_ctx("alice")):
            async with connection() as conn:
                await conn.execute("SELECT 1")
            return weakref.ref(await resolve(pools))

    try:
        user_pool = await serve_alice()
        now[0] += 61
        await registry.sweep()
        gc.collect()
        assert user_pool() is None
        assert pools.stats().slots == 0
    finally:
        await registry.aclose()


async def test_per_user_pools_exhaustion_and_idle_eviction(db: Database) -> None:
    """With max_total=2 held by two busy users, a third user's checkout fails after its
    timeout, with the strategy's retry_after; once a holder is done, the third user's
    waiting checkout closes that idle pool and proceeds."""
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=2,
        timeout=5,
        retry_after=2.5,
        rls_check="off",
        kwargs=db.kwargs(),
    )
    registry = Registry()
    pools.install(registry)
    release = {"a": anyio.Event(), "b": anyio.Event()}
    holding = 0
    both = anyio.Event()

    async def holder(user: str) -> None:
        nonlocal holding
        async with registry.open_scope(_ctx(user)), connection():
            holding += 1
            if holding == 2:
                both.set()
            await release[user].wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder, "a")
        tg.start_soon(holder, "b")
        await both.wait()
        async with registry.open_scope(_ctx("c")):
            started = time.monotonic()
            with pytest.raises(PoolExhaustedError, match="max_total=2") as info:
                async with connection(timeout=0.3):
                    pass
            assert time.monotonic() - started < 2
            assert (info.value.http_status, info.value.retry_after) == (503, 2.5)
            waiting = anyio.Event()

            async def third() -> None:
                async with connection() as conn:
                    assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "c"
                waiting.set()

            tg.start_soon(third)
            await _eventually(_async(lambda: pools.stats().waiting == 1), "c waits")
            release["a"].set()
            await waiting.wait()
        release["b"].set()
    stats = pools.stats()
    assert stats.evicted == 1
    assert stats.slots == 2
    assert await _server_connections(db) <= 2
    await registry.aclose()


async def test_per_user_pools_make_room_by_closing_the_least_recently_used_pool(
    db: Database,
) -> None:
    """max_total=3 spent by the pools of users a, b and c, then a checks out again: the
    room a fourth user needs is taken from b's pool, idle the longest, while a's and c's
    keep their server sessions (the same backend at their next checkout)."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=3, timeout=5, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)

    async def backend(user: str) -> int:
        async with registry.open_scope(_ctx(user)), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == user
            return conn.info.backend_pid

    try:
        first = {user: await backend(user) for user in ("a", "b", "c")}
        assert await backend("a") == first["a"]
        await backend("d")
        assert pools.stats().evicted == 1
        assert (await backend("a"), await backend("c")) == (first["a"], first["c"])
        assert pools.stats().evicted == 1
        assert await backend("b") != first["b"]  # a new pool, for which d's made room
        assert pools.stats().evicted == 2
    finally:
        await registry.aclose()


async def test_per_user_pools_forget_the_connections_they_replaced(db: Database) -> None:
    """A user's pool keeps the connections it made, to close those psycopg's pool leaves
    open as it closes, and forgets each once closed, as it makes the next: a pool whose
    server sessions end in turn, each connection replaced when checked, keeps only the one
    it holds open."""
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=1,
        timeout=5,
        rls_check="off",
        kwargs=db.kwargs(),
        check=AsyncConnectionPool.check_connection,
    )
    registry = Registry()
    pools.install(registry)

    async def ended() -> bool:
        return await _sessions(db) == 0

    try:
        async with registry.open_scope(_ctx("alice")):
            user_pool = await resolve(pools)
            for turn in range(4):
                if turn:
                    with _admin() as admin:
                        admin.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = %s",
                            (db.app_name,),
                        )
                    await _eventually(ended, "the server session ended")
                async with connection() as conn:
                    setting = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
                assert setting == "alice"
            assert len(user_pool.made) == 1, user_pool.made
    finally:
        await registry.aclose()


async def test_per_user_pools_never_evict_a_pool_its_user_checks_out_again(db: Database) -> None:
    """An idle pool is the first to close under pressure only until its user checks out
    again: with max_total=1 and alice holding a connection of her pool once more, bob's
    checkout waits and fails after its timeout, and alice's pool stays open under her."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=5, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    holding, done = anyio.Event(), anyio.Event()

    async def alice() -> None:
        async with registry.open_scope(_ctx("alice")):
            async with connection() as conn:
                await conn.execute("SELECT 1")
            assert pools.stats().idle_pools == 1
            async with connection() as conn:
                holding.set()
                await done.wait()
                assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "alice"

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice)
                await holding.wait()
                async with registry.open_scope(_ctx("bob")):
                    with pytest.raises(PoolExhaustedError, match="max_total=1"):
                        async with connection(timeout=0.3):
                            pytest.fail("alice's pool holds the one connection")
                done.set()
        assert pools.stats() == PerUserPoolsStats(
            pools=1, idle_pools=1, slots=1, max_total=1, waiting=0, checked_out=0, evicted=0
        )
    finally:
        await registry.aclose()


async def test_per_user_pools_full_waiting_queue_is_refused_at_once(db: Database) -> None:
    """A user's pool whose waiting queue is full (``max_waiting``) refuses the next checkout
    at once, with a 503 error that says so, not after the timeout."""
    pools = PerUserPools(
        db.app_url,
        max_size=1,
        max_total=4,
        timeout=10,
        rls_check="off",
        kwargs=db.kwargs(),
        max_waiting=1,
    )
    registry = Registry()
    pools.install(registry)
    held = anyio.Event()
    release = anyio.Event()

    async def holder() -> None:
        async with registry.open_scope(_ctx("a")), connection():
            held.set()
            await release.wait()

    async def queued() -> None:
        async with registry.open_scope(_ctx("a")), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "a"

    def queue_length() -> int:
        (user_pool,) = pools._pools
        assert user_pool.pool is not None
        return int(user_pool.pool.get_stats().get("requests_waiting", 0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await held.wait()
        tg.start_soon(queued)
        await _eventually(_async(lambda: queue_length() == 1), "the second checkout queues")
        async with registry.open_scope(_ctx("a")):
            started = time.monotonic()
            with pytest.raises(PoolExhaustedError, match=r"is full \(max_waiting=1") as info:
                async with connection():
                    pass
            assert time.monotonic() - started < 2
        assert info.value.http_status == 503
        release.set()
    assert pools.stats().checked_out == 0
    await registry.aclose()


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
def test_pool_options_are_checked_at_construction(strategy: type[Any]) -> None:
    """A pool option psycopg's pool does not take (or one ambient sets itself) is refused
    when the strategy is built, not at the first request, when the pool opens."""
    url = "postgresql://app@127.0.0.1/app"
    with pytest.raises(TypeError, match="unknown AsyncConnectionPool option.*pool_options"):
        strategy(url, pool_options={"max_waiting": 2})
    with pytest.raises(TypeError, match=r"option\(s\) max_wait;"):
        strategy(url, max_wait=2)
    with pytest.raises(TypeError, match="open cannot be set"):
        strategy(url, open=True)
    assert strategy(url, max_waiting=2, max_idle=60.0) is not None


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("max_size", 0, "max_size >= 1"),
        ("min_size", 20, "min_size <= max_size"),
        ("timeout", 0, "timeout must be > 0 seconds, not 0"),
        ("return_timeout", 0, "return_timeout must be > 0 seconds, not 0"),
        ("return_timeout", -1.0, "return_timeout must be > 0 seconds, not -1.0"),
        ("return_timeout", float("nan"), "return_timeout must be > 0 seconds, not nan"),
        ("retry_after", 0, "retry_after must be > 0 seconds"),
        # A Retry-After header of inf or nan seconds cannot be written.
        ("retry_after", float("inf"), "retry_after must be a finite number of seconds"),
        ("retry_after", float("nan"), "retry_after must be > 0 seconds and finite"),
        ("rls_check", "loud", "rls_check must be"),
    ],
)
def test_bad_arguments_are_refused_at_construction(
    strategy: type[Any], argument: str, value: object, message: str
) -> None:
    """Each argument out of range is named in a ValueError when the strategy is built."""
    with pytest.raises(ValueError, match=re.escape(message)):
        strategy("postgresql://app@127.0.0.1/app", **{argument: value})


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
@pytest.mark.parametrize(
    "name",
    [
        "user_id",
        "app.",
        ".user_id",
        "app.user_id; RESET ALL",
        "app.user id",
        "1app.user_id",
        "app.1user_id",  # PostgreSQL refuses a part after a dot that starts with a digit too
        "app.$user_id",  # or with a dollar sign
        "app.user\ud800",  # a lone surrogate, which no text encoding sends
        7,
    ],
)
def test_settings_names_that_are_no_custom_setting_are_refused_at_construction(
    strategy: type[Any], name: object
) -> None:
    """A setting name that is not a dotted custom setting name (or not a string at all),
    even one that only starts like one, is a ValueError naming it when the strategy is
    built, not a failure of every checkout."""
    with pytest.raises(ValueError, match=re.escape(f"setting name {name!r} must be a dotted")):
        strategy("postgresql://app@127.0.0.1/app", settings={name: "user_id"})


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
@pytest.mark.parametrize(
    ("first", "second"),
    [("app.user_id", "App.User_Id"), ("APP.TENANT", "app.tenant")],
)
def test_two_spellings_of_one_setting_are_refused_at_construction(
    strategy: type[Any], first: str, second: str
) -> None:
    """PostgreSQL ignores the case of ASCII letters in a setting's name, so two names that
    differ only so are one setting, and the later ``set_config`` would overwrite the
    earlier one's field (a policy reading the user's setting would see the tenant): a
    ValueError naming both. Non-ASCII letters are compared as they are, as PostgreSQL
    does, so ``app.ä`` and ``app.Ä`` are two settings."""
    with pytest.raises(ValueError, match="are one setting") as info:
        strategy("postgresql://app@127.0.0.1/app", settings={first: "user_id", second: "tenant_id"})
    assert f"settings {first!r} and {second!r}" in str(info.value)
    two = {"app.ä": "user_id", "app.Ä": "tenant_id"}
    assert strategy("postgresql://app@127.0.0.1/app", settings=two) is not None


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
async def test_setting_names_in_any_script_are_set(db: Database, strategy: type[Any]) -> None:
    """PostgreSQL takes any non-ASCII character as a letter of a setting's name, and so
    does each strategy: a checkout reads the user and tenant from such settings (and
    ``app.ä`` and ``app.Ä`` are two settings there too)."""
    settings = {"app.nutzer_ä": "user_id", "мой.арендатор$1": "tenant_id", "app.Ä": "user_id"}
    pool = strategy(db.app_url, max_size=1, settings=settings, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice", "acme")), connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT pg_catalog.current_setting('app.nutzer_ä', true), "
                    "pg_catalog.current_setting('мой.арендатор$1', true), "
                    "pg_catalog.current_setting('app.ä', true), "
                    "pg_catalog.current_setting('app.Ä', true)"
                )
            ).fetchone()
    finally:
        await registry.aclose()
    assert row == ("alice", "acme", None, "alice")


@pytest.mark.parametrize(
    ("strategy", "field", "choices"),
    [
        (
            SharedPool,
            "password",
            "connection_id, parent_run_id, request_id, run_id, tenant_id, thread_id, user_id",
        ),
        (PerUserPools, "password", "tenant_id, user_id"),
        # Each user's pool is the user's: its connections cannot follow one request's ids.
        (PerUserPools, "request_id", "tenant_id, user_id"),
    ],
)
def test_settings_of_a_field_the_strategy_cannot_set_are_refused_at_construction(
    strategy: type[Any], field: str, choices: str
) -> None:
    """A setting of a context field the strategy does not set is a ValueError naming the
    setting, the field and the fields to choose from; the names and fields it does set
    are taken."""
    with pytest.raises(ValueError, match=re.escape(f"choose one of {choices}")) as info:
        strategy("postgresql://app@127.0.0.1/app", settings={"app.who": field})
    assert f"setting 'app.who' names the context field {field!r}" in str(info.value)
    taken = {"app.user_id": "user_id", "my_app.v2.tenant$id": "tenant_id"}
    assert strategy("postgresql://app@127.0.0.1/app", settings=taken) is not None


@pytest.mark.parametrize(
    ("strategy", "arguments", "error", "message"),
    [
        (SharedPool, {"min_size": -1}, ValueError, "need 0 <= min_size <= max_size"),
        (SharedPool, {"min_size": 1.5}, TypeError, "min_size must be a whole number"),
        (PerUserPools, {"max_size": 2.0}, TypeError, "max_size must be a whole number"),
        (SharedPool, {"per_user_limit": 0}, ValueError, "per_user_limit must be >= 1, not 0"),
        (SharedPool, {"per_user_limit": True}, TypeError, "per_user_limit must be a number"),
        (PerUserPools, {"max_total": False}, TypeError, "max_total must be a number"),
        (
            PerUserPools,
            {"max_total": 0},
            ValueError,
            "max_total must be >= max(1, min_size), not 0",
        ),
        (
            PerUserPools,
            {"min_size": 2, "max_size": 3, "max_total": 1},
            ValueError,
            "max_total must be >= max(1, min_size), not 1",
        ),
        (PerUserPools, {"idle_ttl": -0.5}, ValueError, "idle_ttl must be >= 0 seconds, not -0.5"),
        (
            PerUserPools,
            {"idle_ttl": float("nan")},
            ValueError,
            "idle_ttl must be >= 0 seconds, not nan",
        ),
    ],
)
def test_limits_out_of_range_are_refused_at_construction(
    strategy: type[Any], arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    """A negative min_size, a pool size that is no whole number, a per-user limit below
    one, a global cap below one or below min_size (the pools it keeps open would break it),
    a bool for a number of connections, or a negative idle time is refused, naming the
    argument, when the strategy is built."""
    with pytest.raises(error, match=re.escape(message)):
        strategy("postgresql://app@127.0.0.1/app", **arguments)


@pytest.mark.parametrize(
    ("strategy", "arguments"),
    [
        (PerUserPools, {"idle_ttl": 0}),  # a user's pool closes as its last request ends
        (PerUserPools, {"min_size": 2, "max_size": 2, "max_total": 2}),
        (PerUserPools, {"max_total": float("inf")}),  # no global cap
        (PerUserPools, {"max_total": fractions.Fraction(3)}),
        (SharedPool, {"per_user_limit": 1}),
        (SharedPool, {"per_user_limit": fractions.Fraction(2)}),
        (SharedPool, {"per_user_limit": float("inf")}),  # no per-user limit
    ],
)
def test_limits_at_the_edge_of_their_range_are_taken(
    strategy: type[Any], arguments: dict[str, object]
) -> None:
    """The least value each limit takes (an idle_ttl of 0, a global cap equal to
    min_size, a per-user limit of 1), no cap at all, and a number of any real type (a
    Fraction) build the strategy, which keeps each value as given."""
    pool = strategy("postgresql://app@127.0.0.1/app", **arguments)
    assert {name: getattr(pool, name) for name in arguments} == arguments


@pytest.mark.parametrize("strategy", [SharedPool, PerUserPools])
async def test_a_strategy_without_kwargs_connects_with_its_conninfo_alone(
    db: Database, strategy: type[Any]
) -> None:
    """``kwargs`` left out (``None``): each connection is made from the connection string
    alone, its options included, and a checkout sees its user's settings."""
    conninfo = psycopg.conninfo.make_conninfo(db.app_url, application_name=db.app_name)
    pool = strategy(conninfo, max_size=1, timeout=5, rls_check="off")
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT current_setting('application_name'), "
                    "current_setting('app.user_id', true)"
                )
            ).fetchone()
    finally:
        await registry.aclose()
    assert row == (db.app_name, "alice")


async def test_no_cap_and_no_per_user_limit_serve_checkouts(db: Database) -> None:
    """``math.inf`` as the global cap or the per-user limit (typed ``float``) serves
    checkouts: three users' pools open at once with no cap, which ``stats()`` reports as
    it is, and one user holds three connections of a shared pool at once."""
    options: dict[str, Any] = {"timeout": 5, "rls_check": "off", "kwargs": db.kwargs()}
    pools = PerUserPools(db.app_url, max_size=1, max_total=math.inf, **options)
    shared = SharedPool(db.app_url, max_size=3, per_user_limit=math.inf, **options)
    registry = Registry()
    pools.install(registry)
    shared.install(registry, default=False)
    seen: list[str] = []
    holding = anyio.Semaphore(0)
    release = anyio.Event()

    async def hold(user: str) -> None:
        async with registry.open_scope(_ctx(user)), pools.connection() as conn:
            seen.append(await _scalar(conn, "SELECT current_setting('app.user_id')"))
            holding.release()
            await release.wait()

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for user in ("alice", "bob", "carol"):
                    tg.start_soon(hold, user)
                for _ in range(3):
                    await holding.acquire()
                stats = pools.stats()
                release.set()
        assert (stats.pools, stats.slots, stats.max_total) == (3, 3, math.inf)
        async with registry.open_scope(_ctx("dave")), contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                conn = await stack.enter_async_context(shared.connection())
                seen.append(await _scalar(conn, "SELECT current_setting('app.user_id', true)"))
            assert shared.stats().checked_out == 3
    finally:
        await registry.aclose()
        await shared.close()
    assert sorted(seen[:3]) == ["alice", "bob", "carol"]
    assert seen[3:] == ["dave", "dave", "dave"]


@pytest.mark.parametrize(
    ("strategy", "argument"), [(SharedPool, "per_user_limit"), (PerUserPools, "max_total")]
)
@pytest.mark.parametrize(
    ("value", "error"), [(None, TypeError), ("5", TypeError), (float("nan"), ValueError)]
)
def test_a_connection_limit_that_is_no_number_is_refused_at_construction(
    strategy: type[Any], argument: str, value: object, error: type[Exception]
) -> None:
    """A per-user limit (SharedPool) or global cap (PerUserPools) of None, a string or NaN
    is refused, naming the argument, when the strategy is built. Before, None and NaN were
    taken, and then every checkout raised TypeError, or waited its whole timeout for a
    share or room that NaN never grants and answered 503; a string raised a TypeError that
    named no argument."""
    with pytest.raises(error, match=f"{argument} must be"):
        strategy("postgresql://app@127.0.0.1/app", **{argument: value})


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_a_checkouts_bad_timeout_is_refused_at_once(db: Database, strategy: str) -> None:
    """``connection(timeout=...)`` with NaN or a non-number, while the user's only
    connection is held: a ValueError or TypeError naming the timeout, at once, and nothing
    taken. Before, PerUserPools waited forever for a NaN timeout, SharedPool raised anyio's
    "deadline must not be NaN", and a string failed inside arithmetic."""
    options: dict[str, Any] = {"timeout": 5, "rls_check": "off", "kwargs": db.kwargs()}
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, per_user_limit=1, **options)
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, **options)
    )
    registry = Registry()
    pool.install(registry)
    try:
        async with registry.open_scope(_ctx("alice")), pool.connection():
            for bad, error in (
                (float("nan"), ValueError),
                ("1", TypeError),
                (True, TypeError),
                (10**400, ValueError),  # no float holds it: was Python's OverflowError
                (float("inf"), ValueError),  # None is the pool's timeout; no wait is endless
            ):
                with anyio.fail_after(2), pytest.raises(error, match="timeout must be"):
                    async with pool.connection(timeout=bad):  # type: ignore[arg-type]
                        pytest.fail("no connection was free")
                assert pool.stats().checked_out == 1
            with anyio.fail_after(2), pytest.raises(ValueError, match="timeout must be"):
                async with connection(timeout=float("nan")):  # the installed default
                    pytest.fail("no connection was free")
            assert pool.stats().checked_out == 1
            # Any real number of seconds is a timeout, not only an int or a float.
            with anyio.fail_after(2), pytest.raises(PoolExhaustedError):
                async with pool.connection(timeout=fractions.Fraction(1, 20)):  # type: ignore[arg-type]
                    pytest.fail("no connection was free")
    finally:
        await registry.aclose()


async def test_per_user_pools_grow_to_max_size(db: Database) -> None:
    """One user's concurrent checkouts grow its pool one connection at a time up to
    max_size, on distinct server connections."""
    pools = PerUserPools(db.app_url, max_size=3, max_total=10, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    release = anyio.Event()
    pids: set[int] = set()
    all_in = anyio.Event()

    async def hold() -> None:
        async with connection() as conn:
            pids.add(conn.info.backend_pid)
            if len(pids) == 3:
                all_in.set()
            await release.wait()

    async with registry.open_scope(_ctx("alice")), anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(hold)
        await all_in.wait()
        with pytest.raises(PoolExhaustedError):
            async with connection(timeout=0.2):
                pass
        release.set()
    assert pools.stats().slots == 3
    await registry.aclose()


async def test_a_checkout_of_a_pool_at_max_size_takes_no_place_in_the_line_for_room(
    db: Database,
) -> None:
    """max_size=1, max_total=1: alice holds her pool's one connection and a second checkout
    of hers waits for it. Her pool may not grow, so that checkout waits in her pool only,
    not in the line for room under max_total, where it would come before bob's first
    checkout; once alice's first checkout ends, her second gets the connection."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=10, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    holding, release, second = anyio.Event(), anyio.Event(), anyio.Event()

    async def hold() -> None:
        async with connection():
            holding.set()
            await release.wait()

    async def again() -> None:
        async with connection() as conn:
            assert await _scalar(conn, "SELECT 1") == 1
            second.set()

    try:
        with anyio.fail_after(20):
            async with registry.open_scope(_ctx("alice")), anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await holding.wait()
                tg.start_soon(again)
                await anyio.wait_all_tasks_blocked()
                assert (pools.stats().checked_out, pools.stats().waiting) == (2, 0)
                release.set()
                await second.wait()
    finally:
        await registry.aclose()


async def test_per_user_pools_cancel_while_waiting_for_room(db: Database) -> None:
    """Checkouts cancelled while waiting for room under max_total give nothing away."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=5, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    release = anyio.Event()
    holding = anyio.Event()

    async def holder() -> None:
        async with registry.open_scope(_ctx("a")), connection():
            holding.set()
            await release.wait()

    async def waiter(n: int) -> None:
        async with registry.open_scope(_ctx(f"w{n}")), connection():
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await holding.wait()
        with anyio.CancelScope() as cancel:
            async with anyio.create_task_group() as waiters:
                for n in range(5):
                    waiters.start_soon(waiter, n)
                await _eventually(_async(lambda: pools.stats().waiting == 5), "5 waiting")
                cancel.cancel()
        release.set()
    stats = pools.stats()
    assert (stats.waiting, stats.checked_out, stats.slots) == (0, 0, 1)
    async with registry.open_scope(_ctx("z")), connection() as conn:
        assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "z"
    await registry.aclose()


@pytest.mark.parametrize("wait_for", ["room", "own pool"])
async def test_per_user_pools_callers_deadline_wins_over_the_pool_timeout(
    db: Database, wait_for: str
) -> None:
    """As for SharedPool: a caller's own deadline (fail_after) ends a checkout that waits
    for room under max_total (another user holds it) or for a connection of the user's
    own pool at that deadline, as a TimeoutError rather than PoolExhaustedError after the
    pools' 30 s timeout; the pools then serve as before."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=30, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    release = anyio.Event()
    holding = anyio.Event()
    waiter = "alice" if wait_for == "own pool" else "bob"

    async def holder() -> None:
        async with registry.open_scope(_ctx("alice")), connection():
            holding.set()
            await release.wait()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with registry.open_scope(_ctx(waiter)):
                    with anyio.fail_after(0.5):
                        async with connection():
                            pass
            elapsed = time.monotonic() - started
            release.set()
        assert 0.4 < elapsed < 10  # the pools' timeout is 30 s
        await _eventually(_async(lambda: pools.stats().checked_out == 0), "connections back")
        async with registry.open_scope(_ctx(waiter)), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == waiter
    finally:
        await registry.aclose()


async def test_per_user_pools_a_waiter_whose_room_was_taken_keeps_its_place_in_line(
    db: Database,
) -> None:
    """max_total=1: alice holds the one connection, and bob's then carol's checkouts wait
    for room in line. Alice's checkout ends (her pool idle, bob woken to close it) and, in
    the same step, she checks out of her pool again: bob finds no room and waits on, still
    first in line, so that once alice is done he is served before carol."""
    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=10, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    served: list[str] = []

    async def waiter(user: str) -> None:
        async with registry.open_scope(_ctx(user)), connection() as conn:
            served.append(await _scalar(conn, "SELECT current_setting('app.user_id', true)"))

    holding, release = anyio.Event(), anyio.Event()

    async def alice() -> None:
        async with registry.open_scope(_ctx("alice")):
            async with connection():
                holding.set()
                await release.wait()
            # No checkpoint since bob was woken to take her idle pool's room.
            async with connection() as conn:
                await _eventually(_async(lambda: pools.stats().waiting == 2), "bob waits on")
                served.append(await _scalar(conn, "SELECT current_setting('app.user_id', true)"))

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice)
                await holding.wait()
                tg.start_soon(waiter, "bob")
                await _eventually(_async(lambda: pools.stats().waiting == 1), "bob waits")
                tg.start_soon(waiter, "carol")
                await _eventually(_async(lambda: pools.stats().waiting == 2), "carol waits")
                release.set()
        assert served == ["alice", "bob", "carol"]
        assert pools.stats().evicted == 2
    finally:
        await registry.aclose()


async def test_per_user_pools_room_handed_to_a_checkout_asyncio_cancels_goes_to_the_next(
    db: Database,
) -> None:
    """max_total=1: alice holds the one connection, and two other users' checkouts wait
    for room in line. Alice's checkout ends (her pool idle, the first in line woken to
    take its room) and, in the same step, the first waiter's task is cancelled with
    asyncio's ``Task.cancel()``: the room must go on to the second, which is served."""
    import asyncio

    pools = PerUserPools(
        db.app_url, max_size=1, max_total=1, timeout=3, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    served: list[str] = []

    async def waiter(user: str) -> None:
        async with registry.open_scope(_ctx(user)), connection() as conn:
            served.append(await _scalar(conn, "SELECT current_setting('app.user_id', true)"))

    with anyio.fail_after(10):
        holding, release = anyio.Event(), anyio.Event()
        first: asyncio.Task[None] | None = None

        async def holder() -> None:
            async with registry.open_scope(_ctx("alice")):
                async with connection():
                    holding.set()
                    await release.wait()
                # No checkpoint since the room was handed to the first waiter.
                assert first is not None
                first.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            first = asyncio.create_task(waiter("bob"))
            await _eventually(_async(lambda: pools.stats().waiting == 1), "bob waits")
            tg.start_soon(waiter, "carol")
            await _eventually(_async(lambda: pools.stats().waiting == 2), "carol waits")
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert served == ["carol"]
    stats = pools.stats()
    assert (stats.waiting, stats.checked_out, stats.slots) == (0, 0, 1)
    await registry.aclose()


async def test_per_user_pools_checkout_cancelled_by_asyncio_as_its_pool_hands_it_one_ends(
    db: Database,
) -> None:
    """max_size=1: alice holds her pool's one connection and another of her checkouts
    waits for it in psycopg's pool. The first ends, and the waiter's task is cancelled
    with asyncio's ``Task.cancel()`` a few steps later, at each step in turn, so that the
    cancellation lands as the pool's worker hands the connection over: every time, the
    waiter ends cancelled, having run nothing (Python 3.11's ``asyncio.wait_for`` handed
    it the connection instead, and the cancelled checkout went on)."""
    import asyncio
    import contextvars

    pools = PerUserPools(
        db.app_url, max_size=1, max_total=5, timeout=3, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    served: list[int] = []
    done_first: list[int] = []

    async def waiter(steps: int) -> None:
        async with registry.open_scope(_ctx("alice")), connection() as conn:
            await conn.execute("SELECT 1")
            served.append(steps)

    with anyio.fail_after(20):
        for steps in range(8):
            async with registry.open_scope(_ctx("alice")):
                async with connection():
                    second = asyncio.create_task(waiter(steps), context=contextvars.Context())
                    await _eventually(_async(lambda: _waiting_in(pools) == 1), "it waits")
                for _ in range(steps):
                    await asyncio.sleep(0)
                if second.cancel():
                    with pytest.raises(asyncio.CancelledError):
                        await second
                else:
                    done_first.append(steps)  # its whole checkout ran before the cancel
                async with connection() as conn:
                    assert await _scalar(conn, "SELECT current_setting('app.user_id')") == "alice"
    assert served == done_first
    assert pools.stats().checked_out == 0
    await registry.aclose()


def _waiting_in(pools: PerUserPools) -> int:
    """Checkouts waiting in psycopg's user pools (not for room under the cap)."""
    return sum(
        p.pool.get_stats().get("requests_waiting", 0) for p in pools._pools if p.pool is not None
    )


async def test_per_user_pools_cancel_mid_query(db: Database) -> None:
    """A cancelled query of a per-user pool is cancelled on the server; the pool recovers."""
    pools = PerUserPools(db.app_url, max_total=5, rls_check="off", kwargs=db.kwargs())
    registry = Registry()
    pools.install(registry)
    marker = f"cancel-{uuid.uuid4().hex}"
    async with registry.open_scope(_ctx("alice")):
        with anyio.move_on_after(0.3):
            async with connection() as conn:
                await conn.execute(f"SELECT pg_sleep(30) /* {marker} */")

        await _query_stopped(db, marker)
        async with connection() as conn:
            assert await _scalar(conn, "SELECT 1") == 1
    assert pools.stats().checked_out == 0
    await registry.aclose()


async def test_per_user_pools_cancel_while_growing_keeps_slots_and_pool_in_step(
    db: Database,
) -> None:
    """A checkout cancelled while its pool grows (psycopg's pool lock busy at that moment)
    leaves the user's pool able to hold the room it took: another checkout of the user
    then gets its second connection rather than waiting for the first."""
    pools = PerUserPools(
        db.app_url, max_size=2, max_total=3, timeout=5, rls_check="off", kwargs=db.kwargs()
    )
    registry = Registry()
    pools.install(registry)
    release = anyio.Event()
    holding = anyio.Event()
    ended = anyio.Event()

    async def hold() -> None:
        async with connection():
            holding.set()
            await release.wait()

    async def growing(scope: anyio.CancelScope) -> None:
        with scope:
            async with connection():
                pass
        ended.set()

    async with registry.open_scope(_ctx("alice")), anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await holding.wait()
        (user_pool,) = [p for p in pools._pools if p.pool is not None]
        assert user_pool.pool is not None
        psycopg_pool = user_pool.pool
        await psycopg_pool._lock.acquire()  # the pool busy when the growth reaches it
        try:
            scope = anyio.CancelScope()
            tg.start_soon(growing, scope)
            await _eventually(_async(lambda: pools.stats().slots == 2), "the room taken")
            scope.cancel()
        finally:
            psycopg_pool._lock.release()
        await _eventually(_async(ended.is_set), "the cancelled checkout ended")
        assert scope.cancelled_caught
        assert psycopg_pool.max_size == user_pool.slots == 2
        async with connection(timeout=2) as conn:  # the second connection, alongside
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "alice"
        release.set()
    assert pools.stats().checked_out == 0
    await registry.aclose()


async def _per_user_idle(pools: PerUserPools) -> bool:
    """Nothing checked out or waiting; every open pool idle, within its share of the budget."""
    stats = pools.stats()
    return (
        stats.waiting == 0
        and stats.checked_out == 0
        and stats.idle_pools == stats.pools
        and stats.pools <= stats.slots <= min(stats.max_total, stats.pools * pools.max_size)
    )


def _cancelled_in(exc: BaseException) -> str:
    """Where a cancellation hit a checkout: the innermost function of the integration on
    its way (``_take_slot``: waiting for room, ``ensure_pool``: waiting for the user's pool
    to open, ``__aenter__``: waiting for a connection of the pool) or ``query`` when psycopg
    was running a statement."""
    where = "elsewhere"
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "integrations/psycopg" in code.co_filename:
            where = code.co_name
        elif code.co_name == "execute" and "psycopg" in code.co_filename:
            where = "query"
        tb = tb.tb_next
    return where


async def test_per_user_pools_random_cancellations_lose_no_connection(db: Database) -> None:
    """300 checkouts by 30 users under max_total=3 (max_size=2), a third cancelled at
    random moments (waiting for room or for the user's pool to open, waiting for a
    connection, querying, holding a row lock). Sampled throughout, the server never runs
    more than max_total of our connections that the client still holds open (backends the
    client has closed may take a moment to exit); afterwards the budget is whole and idle,
    each open pool's slots match its psycopg pool, no lock is held on the test's tables,
    nothing is 'idle in transaction', and 50 distinct users are then all served, each with
    its own settings."""
    max_total = 3
    opened: dict[int, psycopg.AsyncConnection[Any]] = {}  # backend pid -> client connection

    class Tracked(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:
            conn = await super().connect(*args, **kwargs)
            opened[conn.info.backend_pid] = conn
            return conn

    pools = PerUserPools(
        db.app_url,
        max_size=2,
        max_total=max_total,
        timeout=30,
        rls_check="off",
        kwargs=db.kwargs(),
        num_workers=1,
        connection_class=Tracked,
    )
    registry = Registry()
    pools.install(registry)
    rng = random.Random(9)
    async with registry.open_scope(_ctx("seed")), connection() as conn:
        await conn.execute(db.sql("INSERT INTO {notes} (owner, body) VALUES ('seed', 'row')"))
    peak = raw_peak = samples = 0
    sampling = True
    completed = 0
    cancelled: Counter[str] = Counter()

    async def sample() -> None:
        nonlocal peak, raw_peak, samples
        async with await psycopg.AsyncConnection.connect(db.admin_url, autocommit=True) as conn:
            while sampling:
                assert sum(not c.closed for c in opened.values()) <= max_total  # client side
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                    (db.app_name,),
                )
                pids = {row[0] for row in await cur.fetchall()}
                # Closed by the client (by now): the server may list them while they exit.
                closed = {pid for pid, c in opened.items() if c.closed}
                raw_peak = max(raw_peak, len(pids))
                peak = max(peak, len(pids - closed))
                samples += 1
                assert pools.stats().slots <= max_total
                await anyio.sleep(0.005)

    async def work(n: int, cancel: str | None, after: float) -> None:
        nonlocal completed
        user = f"user-{n % 30}"
        where = "scope"
        with anyio.CancelScope() as scope:
            if cancel == "waiting":  # most of a checkout's time goes waiting for room
                scope.deadline = anyio.current_time() + after
            try:
                async with registry.open_scope(_ctx(user)), connection() as conn:
                    if cancel == "holding":
                        scope.deadline = anyio.current_time() + after
                    await conn.execute(
                        db.sql("INSERT INTO {notes} (owner, body) VALUES (%s, 'w')"), (user,)
                    )
                    await conn.execute(
                        db.sql("SELECT * FROM {notes} WHERE owner = %s FOR UPDATE"), (user,)
                    )
                    await conn.execute("SELECT pg_sleep(0.002)")
            except anyio.get_cancelled_exc_class() as exc:
                where = _cancelled_in(exc)
                raise
        if scope.cancelled_caught:
            cancelled[where] += 1
        else:
            completed += 1

    async def burst(n: int) -> None:
        name = f"after-{n}"
        async with registry.open_scope(_ctx(name)), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == name

    async def locks_gone() -> bool:
        locks = await _admin_scalar(
            db,
            "SELECT count(*) FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) "
            "WHERE (a.application_name = %s "
            "AND l.locktype IN ('relation', 'tuple', 'transactionid')) "
            "OR l.relation IN (SELECT oid FROM pg_class WHERE relnamespace = %s::regnamespace)",
            (db.app_name, db.schema),
        )
        return bool(locks == 0)

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                async with anyio.create_task_group() as workers:
                    for n in range(300):
                        cancel = rng.choice(["waiting", "holding", None, None, None, None])
                        after = rng.uniform(0, 1.5 if cancel == "waiting" else 0.01)
                        workers.start_soon(work, n, cancel, after)
                await _eventually(lambda: _per_user_idle(pools), "the budget idle again")
                stats = pools.stats()
                open_pools = [p for p in pools._pools if p.pool is not None]
                assert sum(p.slots for p in open_pools) == stats.slots <= max_total
                assert all(p.pool is not None and p.pool.max_size == p.slots for p in open_pools)

                async def all_back() -> bool:  # no connection lost by a cancelled checkout
                    held = sum(1 for c in opened.values() if not c.closed)
                    available = sum(
                        p.pool.get_stats().get("pool_available", 0)
                        for p in open_pools
                        if p.pool is not None
                    )
                    return held == available

                await _eventually(all_back, "every open connection back in its pool")
                await _eventually(locks_gone, "no lock held on the test's tables")
                stuck = await _admin_scalar(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                    "AND state LIKE 'idle in transaction%%'",
                    (db.app_name,),
                )
                assert stuck == 0

                async def within_slots() -> bool:
                    return await _server_connections(db) <= stats.slots

                await _eventually(within_slots, "no more server connections than slots")
                async with anyio.create_task_group() as users:
                    for n in range(50):
                        users.start_soon(burst, n)
                sampling = False
    finally:
        sampling = False
        await registry.aclose()
    assert samples >= 20
    assert 0 < peak <= max_total, (peak, raw_peak)
    assert completed >= 150
    assert cancelled["query"] >= 10, cancelled
    assert cancelled["ensure_pool"] + cancelled["_take_slot"] + cancelled["__aenter__"] >= 10, (
        cancelled
    )
    assert pools.stats().evicted >= 30
    await _eventually(_async_int(lambda: _server_connections(db), 0), "connections closed")


@pytest.mark.parametrize("libpq", ["17", "older"])
@pytest.mark.parametrize("strategy", ["shared", "per_user"])
async def test_cancel_reaches_the_server_with_every_worker_thread_busy(
    db: Database, strategy: str, libpq: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With anyio's default worker-thread limiter spent (every token held by a thread
    blocked on an event), a checkout cancelled mid-query still cancels the query on the
    server within 5 s, and the pool is idle again, all before the blocked threads are let
    go: libpq 17's cancel needs no thread, and the blocking cancel of an older libpq (forced
    here: the bundled libpq is 17) runs on a thread of its own, not one of those."""
    from ambient.integrations.psycopg import _common

    if libpq == "older":
        monkeypatch.setattr(_common, "_NONBLOCKING_CANCEL", False)
    pool: SharedPool | PerUserPools
    if strategy == "shared":
        pool = SharedPool(
            db.app_url, min_size=1, max_size=2, timeout=5, rls_check="off", kwargs=db.kwargs()
        )
    else:
        pool = PerUserPools(
            db.app_url, max_size=2, max_total=2, timeout=5, rls_check="off", kwargs=db.kwargs()
        )
    registry = Registry()
    pool.install(registry)
    marker = f"cancel-{uuid.uuid4().hex}"

    async def idle() -> bool:
        if isinstance(pool, SharedPool):
            return await _shared_idle(pool)
        return await _per_user_idle(pool)

    async def running() -> int:
        return await _running(db, marker)

    limiter = anyio.to_thread.current_default_thread_limiter()
    blocker = threading.Event()
    cancelled = anyio.Event()

    async def block() -> None:
        await anyio.to_thread.run_sync(blocker.wait)

    async def cancelled_query() -> None:
        async with registry.open_scope(_ctx("alice")):
            with anyio.move_on_after(0.5):
                async with connection() as conn:
                    await conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
        cancelled.set()

    gone = ended = False  # within 5 s of the cancellation, the threads still blocked
    tokens_left: float | None = None
    try:
        async with registry.open_scope(_ctx("alice")), connection() as conn:
            await conn.execute("SELECT 1")  # the pool open, a connection ready
        async with anyio.create_task_group() as tg:
            try:
                for _ in range(int(limiter.total_tokens)):
                    tg.start_soon(block)
                await _eventually(
                    _async(lambda: limiter.available_tokens == 0), "every thread token taken"
                )
                tg.start_soon(cancelled_query)
                await _eventually(_async_int(running, 1), "the query running")
                # A deadlock would hold the cancelled checkout until the threads are let go:
                # measure with them blocked, let them go, then judge (outside the group).
                gone = await _reached(_async_int(running, 0), within=5)
                ended = await _reached(_async(cancelled.is_set), within=5)
                ended = ended and await _reached(idle, within=5)
                tokens_left = limiter.available_tokens
            finally:
                blocker.set()
        assert gone, "the cancelled query still ran on the server after 5 s"
        assert ended, "the cancelled checkout had not ended, or the pool was not idle, in 5 s"
        assert tokens_left == 0  # the blocked threads held every token throughout
        async with registry.open_scope(_ctx("bob")), connection() as conn:
            assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == "bob"
    finally:
        blocker.set()
        await registry.aclose()


async def test_per_user_pools_need_a_scope(db: Database) -> None:
    """Without a scope there is no user to pick a pool for."""
    pools = PerUserPools(db.app_url, rls_check="off")
    with pytest.raises(NoActiveContextError):
        async with pools.connection():
            pass


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("entered_through", ["the strategy", "the module"])
async def test_a_checkout_entered_again_while_in_use_is_refused(
    db: Database, strategy: str, entered_through: str
) -> None:
    """One checkout object entered again while it is in use, nested or from another task
    that enters it while the first still waits for a connection, raises RuntimeError: it
    never takes a second connection, whose return would go to the other entry (the first
    connection then never comes back, and the second goes back to the pool while in use).
    Once its block has ended it is no longer in use: entered again, it gets a connection."""
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, timeout=5, rls_check="off")
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, timeout=5, rls_check="off")
    )
    registry = Registry()
    pool.install(registry)

    def checkout() -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        return pool.connection() if entered_through == "the strategy" else connection()

    try:
        async with registry.open_scope(_ctx("alice")):
            twice = checkout()
            async with twice as conn:
                with pytest.raises(RuntimeError, match="in use"):
                    async with twice:
                        pass
                assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == (
                    "alice"
                )
            assert pool.stats().checked_out == 0
            async with twice as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == (
                    "alice"
                )
            assert pool.stats().checked_out == 0
            shared_by_two = checkout()
            release = anyio.Event()
            holding = anyio.Event()
            seen: list[int] = []

            async def hold() -> None:
                async with checkout():
                    holding.set()
                    await release.wait()

            async def first() -> None:
                async with shared_by_two as conn:
                    seen.append(conn.info.backend_pid)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await holding.wait()
                tg.start_soon(first)
                await _eventually(
                    _async(lambda: pool.stats().checked_out == 2), "the first entry waits"
                )
                with pytest.raises(RuntimeError, match="in use"):
                    async with shared_by_two:
                        pass
                release.set()
            assert len(seen) == 1
            assert pool.stats().checked_out == 0
    finally:
        await registry.aclose()


@pytest.mark.parametrize("strategy", ["shared", "per_user"])
@pytest.mark.parametrize("entered_through", ["the strategy", "the module"])
async def test_a_checkout_whose_entry_failed_can_be_entered_again(
    db: Database, strategy: str, entered_through: str
) -> None:
    """A checkout object that got no connection within its timeout (the 503 answer) is not
    in use: entered again once a connection came back, it gets one, rather than being
    refused as in use by the entry that failed."""
    pool: SharedPool | PerUserPools = (
        SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off", kwargs=db.kwargs())
        if strategy == "shared"
        else PerUserPools(db.app_url, max_size=1, rls_check="off", kwargs=db.kwargs())
    )
    registry = Registry()
    pool.install(registry)
    retried = (
        pool.connection(timeout=0.1)
        if entered_through == "the strategy"
        else connection(timeout=0.1)
    )
    try:
        async with registry.open_scope(_ctx("alice")):
            async with pool.connection():
                with pytest.raises(PoolExhaustedError):
                    async with retried:
                        pass
            async with retried as conn:
                assert await _scalar(conn, "SELECT current_setting('app.user_id', true)") == (
                    "alice"
                )
            assert pool.stats().checked_out == 0
    finally:
        await registry.aclose()


async def test_connection_ends_as_the_installed_databases_own_checkout_does(
    db: Database,
) -> None:
    """An application may install a Database of its own, here one whose checkout (a
    SharedPool's) handles a LookupError of the block and lets its connection go as at a
    normal end: connection()'s block ends as that checkout's does, the LookupError handled
    and the code after the block run, a ValueError raised; the connection went back both
    times."""
    pool = SharedPool(db.app_url, min_size=1, max_size=1, rls_check="off", kwargs=db.kwargs())

    class Forgiving:
        @contextlib.asynccontextmanager
        async def connection(
            self,
            *,
            timeout: float | None = None,  # noqa: ASYNC109 - the Database protocol's
        ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            async with pool.connection(timeout=timeout) as conn:
                with contextlib.suppress(LookupError):
                    yield conn

    registry = Registry()
    pool.install(registry, default=False)
    registry.register(InstalledDatabase, Forgiving, lifetime=Lifetime.APP, name="Database")
    after: list[str] = []
    try:
        async with registry.open_scope(_ctx("alice")):
            async with connection() as conn:
                await conn.execute("SELECT 1")
                raise LookupError("handled by the installed Database")
            after.append("handled")
            with pytest.raises(ValueError, match="not handled"):
                async with connection() as conn:
                    await conn.execute("SELECT 1")
                    raise ValueError("not handled by the installed Database")
            async with connection(timeout=1) as conn:
                user = await _scalar(conn, "SELECT current_setting('app.user_id', true)")
            assert pool.stats().checked_out == 0
    finally:
        await registry.aclose()
    assert (after, user) == (["handled"], "alice")


# -- trio ------------------------------------------------------------------------------------


async def test_strategies_refuse_trio(anyio_backend: str) -> None:
    """psycopg's async pool is asyncio-only: constructing a strategy under trio fails at
    once with UnsupportedBackendError (on asyncio construction succeeds)."""
    if anyio_backend == "asyncio":
        SharedPool(DATABASE_URL)
        PerUserPools(DATABASE_URL)
        return
    with pytest.raises(UnsupportedBackendError, match="asyncio only"):
        SharedPool(DATABASE_URL)
    with pytest.raises(UnsupportedBackendError, match="asyncio only"):
        PerUserPools(DATABASE_URL)


@pytest.fixture(name="built_outside_a_loop")
def fixture_built_outside_a_loop() -> SharedPool:
    """A pool constructed at import time (no event loop running yet)."""
    return SharedPool(DATABASE_URL, rls_check="off")


async def test_open_refuses_trio(anyio_backend: str, built_outside_a_loop: SharedPool) -> None:
    """A pool built outside any event loop refuses to open under trio, before connecting."""
    if anyio_backend == "asyncio":
        pytest.skip("opening on asyncio is what every other test does")
    with pytest.raises(UnsupportedBackendError, match="asyncio only"):
        await built_outside_a_loop.open()
    assert not built_outside_a_loop.opened
    with bind_context(_ctx("alice")), pytest.raises(UnsupportedBackendError):
        async with built_outside_a_loop.connection():
            pass


async def test_per_user_pools_refuse_trio_at_first_use(anyio_backend: str) -> None:
    """PerUserPools built outside any event loop and installed: the first checkout under
    trio fails with UnsupportedBackendError, before any pool is created."""
    if anyio_backend == "asyncio":
        pytest.skip("checkouts on asyncio are what every other test does")
    pools = await anyio.to_thread.run_sync(lambda: PerUserPools(DATABASE_URL, rls_check="off"))
    registry = Registry()
    pools.install(registry)
    async with registry.open_scope(_ctx("alice")):
        with pytest.raises(UnsupportedBackendError, match="asyncio only"):
            async with connection():
                pass
    assert pools.stats().pools == 0
    await registry.aclose()


def test_per_user_pools_show_their_name_and_max_total_before_any_checkout() -> None:
    """PerUserPools(name="billing") is ``<PerUserPools 'billing'>`` in its repr and as the
    registry's component; before any checkout its stats show the max_total it was given
    and nothing open, in a snapshot that cannot be changed."""
    pools = PerUserPools(DATABASE_URL, max_total=7, name="billing")
    assert repr(pools) == "<PerUserPools 'billing'>"
    registry = Registry()
    pools.install(registry)
    assert registry.providers[pools].name == "<PerUserPools 'billing'>"
    stats = pools.stats()
    assert stats == PerUserPoolsStats(
        pools=0, idle_pools=0, slots=0, max_total=7, waiting=0, checked_out=0, evicted=0
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.slots = 1  # type: ignore[misc]


def test_per_user_pools_installs_an_idle_ttl_of_any_real_type() -> None:
    """An idle_ttl the strategy takes (any real number of seconds, as its timeouts) is
    taken by the registry too when the strategy is installed, as that many seconds.
    A Fraction was taken by PerUserPools and refused by install() with RegistryError."""
    pools = PerUserPools(DATABASE_URL, idle_ttl=fractions.Fraction(1, 2))
    registry = Registry()
    pools.install(registry)
    assert registry.providers[pools].idle_ttl == 0.5


def test_two_default_databases_conflict() -> None:
    """Only one strategy can be the default Database of a registry; another installs with
    default=False and is used through its own connection()."""
    registry = Registry()
    SharedPool(DATABASE_URL).install(registry)
    with pytest.raises(RegistryError, match="Database"):
        PerUserPools(DATABASE_URL).install(registry)
    PerUserPools(DATABASE_URL).install(registry, default=False)
