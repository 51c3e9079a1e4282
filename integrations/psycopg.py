"""Per-user PostgreSQL access with psycopg 3 and psycopg_pool (extra ``psycopg``).

Two strategies, each installed into a :class:`~ambient.Registry`; code running for a user
gets a connection with ``async with db.connection() as conn:`` (or the module-level
:func:`connection`) and can never see another user's session state or rows:

* :class:`SharedPool`: one pool for everybody, with a per-user concurrency cap. Every
  checkout is one explicit transaction in which the context fields named by ``settings``
  are set with ``set_config(name, value, true)`` (bound parameters), so row-level-security
  policies on ``current_setting('app.user_id', true)`` see them. It is committed when the
  ``async with`` body ends normally and rolled back when it raises. A returned connection
  is reset (as ``DISCARD ALL`` does) and shown clean before anybody else gets it; one
  that cannot be is closed.
* :class:`PerUserPools`: a ``psycopg_pool`` pool per ``(tenant, user)``, a USER-lifetime
  component closed ``idle_ttl`` seconds after the user's last request, with a global cap
  (``max_total``) on the server connections all user pools hold together.

Both turn a connection that does not arrive within ``timeout`` seconds into
:class:`~ambient.errors.PoolExhaustedError` (the middleware answers 503 with
``Retry-After``), never a hang. Cancelling a task that waits for or holds a connection
never loses it: the transaction is rolled back, a running query is cancelled on the
server, and the connection goes back to its pool (or is replaced).

psycopg's async pool runs on asyncio only; on trio both strategies refuse to start with
:class:`UnsupportedBackendError`. Run :func:`check_rls` (the strategies do it when they
open) to learn whether the connecting role bypasses row-level security.

Example::

    db = SharedPool("postgresql://app@db/app", max_size=20, per_user_limit=5)
    db.install(registry)

    async def list_notes() -> list[tuple[str]]:
        async with db.connection() as conn:
            cur = await conn.execute("SELECT body FROM notes")  # RLS: this user's rows
            return await cur.fetchall()

A policy that fails closed when no user is set::

    CREATE POLICY notes_owner ON notes
        USING (owner = NULLIF(current_setting('app.user_id', true), ''))
        WITH CHECK (owner = NULLIF(current_setting('app.user_id', true), ''));
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef, _loops
from ambient.errors import (
    PoolExhaustedError,
    RowSecurityError,
    RowSecurityWarning,
    UnsupportedBackendError,
)

if TYPE_CHECKING:
    from types import TracebackType

    from psycopg.pq.abc import PGcancel

__all__ = [
    "DEFAULT_SETTINGS",
    "Database",
    "PerUserPools",
    "PerUserPoolsStats",
    "RowSecurityError",
    "RowSecurityWarning",
    "SharedPool",
    "SharedPoolStats",
    "UnsupportedBackendError",
    "check_rls",
    "connection",
]

DEFAULT_SETTINGS: Mapping[str, str] = {"app.user_id": "user_id", "app.tenant_id": "tenant_id"}
"""GUC name -> context field set for row-level security by default."""

RlsCheck = Literal["raise", "warn", "off"]
_CONTEXT_FIELDS = frozenset(
    {"user_id", "tenant_id", "thread_id", "run_id", "request_id", "connection_id", "parent_run_id"}
)
_USER_FIELDS = frozenset({"user_id", "tenant_id"})
# Custom settings need a dotted name; set_config() takes the name as a bound parameter anyway.
_GUC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+")
_ACTIVE = TransactionStatus.ACTIVE
_IDLE = TransactionStatus.IDLE
_pool_numbers = itertools.count(1)
logger = logging.getLogger("ambient")


class Database(Protocol):
    """What :func:`connection` resolves: the strategy installed with ``default=True``."""

    def connection(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """An async context manager giving a connection for the current context."""
        ...


# -- helpers shared by both strategies -----------------------------------------------------


_ASYNCIO_ONLY = (
    "psycopg's async connection pool runs on asyncio only, and this code runs under "
    "another event loop (trio?): run the application on asyncio (uvicorn and hypercorn "
    "do by default), or use psycopg's sync ConnectionPool through worker threads"
)


def _check_settings(settings: Mapping[str, str], allowed: frozenset[str]) -> tuple[str, ...]:
    for name, field_name in settings.items():
        if not isinstance(name, str) or not _GUC_NAME.fullmatch(name):
            msg = f"setting name {name!r} must be a dotted custom setting name like 'app.user_id'"
            raise ValueError(msg)
        if field_name not in allowed:
            msg = (
                f"setting {name!r} names the context field {field_name!r}; choose one of "
                f"{', '.join(sorted(allowed))}"
            )
            raise ValueError(msg)
    return tuple(settings)


@dataclass(frozen=True, slots=True)
class _Arguments:
    """The arguments both strategies take, checked, and the settings as they are sent."""

    names: tuple[str, ...]  # setting names, in the order of ``settings``
    fields: tuple[str, ...]  # the context field of each
    set_sql: str  # ``SELECT set_config(%s, %s, local), ...`` for all of them ('' for none)

    @classmethod
    def validated(
        cls,
        *,
        min_size: int,
        max_size: int,
        per_user_limit: int | None = None,
        max_total: int | None = None,
        idle_ttl: float | None = None,
        timeout: float,
        retry_after: float,
        rls_check: str,
        settings: Mapping[str, str],
        fields: frozenset[str],
        local: bool,
    ) -> _Arguments:
        """Raise ``ValueError`` naming the first bad argument (``None``: the strategy has no
        such argument); ``fields`` are the context fields ``settings`` may name."""
        if not 0 <= min_size <= max_size or max_size < 1:
            msg = f"need 0 <= min_size <= max_size and max_size >= 1, not {min_size}, {max_size}"
            raise ValueError(msg)
        if per_user_limit is not None and per_user_limit < 1:
            msg = f"per_user_limit must be >= 1, not {per_user_limit!r}"
            raise ValueError(msg)
        if max_total is not None and max_total < max(1, min_size):
            msg = f"max_total must be >= max(1, min_size), not {max_total!r}"
            raise ValueError(msg)
        if idle_ttl is not None and idle_ttl < 0:
            msg = f"idle_ttl must be >= 0 seconds, not {idle_ttl!r}"
            raise ValueError(msg)
        if not timeout > 0:
            msg = f"timeout must be > 0 seconds, not {timeout!r}"
            raise ValueError(msg)
        if not retry_after > 0:
            msg = f"retry_after must be > 0 seconds, not {retry_after!r}"
            raise ValueError(msg)
        if rls_check not in ("raise", "warn", "off"):
            msg = f"rls_check must be 'raise', 'warn' or 'off', not {rls_check!r}"
            raise ValueError(msg)
        names = _check_settings(settings, fields)
        calls = ", ".join(f"set_config(%s, %s, {'true' if local else 'false'})" for _ in names)
        return cls(names, tuple(settings.values()), f"SELECT {calls}" if names else "")


async def _send_cancel(cancel: PGcancel) -> None:
    """Cancel the connection's running query on the server (libpq's blocking call)."""
    try:
        # A limiter of its own: the default one may be spent by threads that wait for a
        # connection, which this very cancel is about to give back.
        await anyio.to_thread.run_sync(cancel.cancel, limiter=anyio.CapacityLimiter(1))
    except Exception:  # noqa: BLE001 - best effort: the server may already be done
        return


async def _cancel_broken(conn: AsyncConnection[Any], cancel: PGcancel) -> bool:
    """Whether ``conn`` was interrupted mid-query; if so cancel the query on the server.

    psycopg closes a connection whose query it could not finish (a cancellation that kept
    interrupting it); the server would go on running the query, holding its locks.
    """
    if not conn.closed and conn.pgconn.transaction_status != _ACTIVE:
        return False
    await _send_cancel(cancel)
    if not conn.closed:
        await conn.close()
    return True


async def _release(
    pool: AsyncConnectionPool[Any],
    conn: AsyncConnection[Any],
    cancel: PGcancel,
    exc: BaseException | None,
) -> None:
    """End a psycopg-style checkout (commit on success, roll back on error) and hand the
    connection back. Shielded, so a cancelled task still returns its connection."""
    with anyio.CancelScope(shield=True):
        try:
            if await _cancel_broken(conn, cancel):
                return
            if conn.pgconn.transaction_status == _IDLE:
                return
            if exc is None:
                await conn.commit()
                return
            try:
                await conn.rollback()
            except psycopg.Error as error:  # the pool replaces a broken connection
                logger.warning("ambient: rollback after %r failed: %s", exc, error)
        finally:
            await pool.putconn(conn)


_IN_USE = "this checkout is in use; call connection() once per `async with`"


def _exhausted(detail: str, retry_after: float) -> PoolExhaustedError:
    return PoolExhaustedError(detail, retry_after=retry_after)


# -- row-level security self-check ---------------------------------------------------------

_ROLE_SQL = (
    "SELECT current_user, r.rolsuper, r.rolbypassrls "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
)
_TABLE_SQL = (
    "SELECT c.relrowsecurity, c.relforcerowsecurity, "
    "pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') "
    "FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass(%s)"
)


async def check_rls(
    conn: AsyncConnection[Any],
    tables: Iterable[str] = (),
    *,
    settings: Iterable[str] = (),
    action: Literal["raise", "warn"] = "raise",
) -> list[str]:
    """Check that row-level security applies to ``conn``'s role.

    A superuser or a role with ``BYPASSRLS`` ignores every policy; the owner of a table
    ignores its policies unless ``FORCE ROW LEVEL SECURITY`` is set; a table without
    ``ENABLE ROW LEVEL SECURITY`` has no policies in force; a setting that a role or
    database default presets (``ALTER ROLE ... SET app.user_id``) makes every session
    start as somebody. Each of these is a problem.

    Args:
        conn: A fresh connection, opened the way the application opens its own.
        tables: The protected tables (``"schema.table"`` or a name on the search path).
        settings: Settings that must start empty (``"app.user_id"``, ...).
        action: ``"raise"`` :class:`RowSecurityError`, or ``"warn"``
            :class:`RowSecurityWarning`, when there are problems.

    Returns:
        The problems found (empty when row-level security applies), after warning.

    Raises:
        RowSecurityError: with ``action="raise"`` when there are problems.
    """
    if action not in ("raise", "warn"):
        msg = f"action must be 'raise' or 'warn', not {action!r}"
        raise ValueError(msg)
    problems: list[str] = []
    async with conn.cursor() as cur:
        await cur.execute(_ROLE_SQL, prepare=False)
        row = await cur.fetchone()
        role = "?" if row is None else str(row[0])
        if row is not None and row[1]:
            problems.append(
                f"role {role!r} is a superuser, and superusers bypass row-level security even "
                "with FORCE ROW LEVEL SECURITY; connect as an ordinary role"
            )
        if row is not None and row[2]:
            problems.append(
                f"role {role!r} has BYPASSRLS; connect as a role without it "
                f"(ALTER ROLE {role} NOBYPASSRLS)"
            )
        for table in tables:
            await cur.execute(_TABLE_SQL, (table,), prepare=False)
            info = await cur.fetchone()
            if info is None:
                problems.append(f"table {table!r} does not exist (or is not visible)")
                continue
            enabled, forced, owns = info
            if not enabled:
                problems.append(
                    f"row-level security is not enabled on {table!r}: "
                    f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"
                )
            elif owns and not forced:
                problems.append(
                    f"role {role!r} owns {table!r}, and owners bypass its policies unless "
                    f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY"
                )
        for name in settings:
            await cur.execute("SELECT current_setting(%s, true)", (name,), prepare=False)
            preset = await cur.fetchone()
            if preset is not None and preset[0]:
                problems.append(
                    f"setting {name!r} is preset for this role or database, so every session "
                    f"starts with a value in it: ALTER ROLE {role} RESET {name} (or ALTER "
                    "DATABASE)"
                )
    if conn.pgconn.transaction_status != _IDLE and not conn.autocommit:
        await conn.rollback()
    if problems:
        if action == "raise":
            raise RowSecurityError(problems)
        warnings.warn(RowSecurityError(problems).args[0], RowSecurityWarning, stacklevel=2)
    return problems


# -- SharedPool ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedPoolStats:
    """A snapshot of a :class:`SharedPool`.

    Attributes:
        size: Server connections the pool holds (in use, idle or being opened).
        available: Idle connections ready for a checkout.
        waiting: Checkouts waiting for a connection in the pool.
        checked_out: Checkouts in progress (waiting or holding a connection).
        users: Users with a checkout in progress.
        discarded: Connections closed because they could not be reset clean.
    """

    size: int
    available: int
    waiting: int
    checked_out: int
    users: int
    discarded: int


class _Gate:
    """One user's share of a :class:`SharedPool`: at most ``limit`` connections held, the
    rest wait in line (a place freed is handed to the first in line)."""

    __slots__ = ("held", "refs", "waiters")

    def __init__(self) -> None:
        self.held = 0
        self.refs = 0  # checkouts in progress, waiting or holding
        self.waiters: deque[anyio.Event] = deque()

    def try_acquire(self, limit: int) -> bool:
        if self.held < limit and not self.waiters:
            self.held += 1
            return True
        return False

    async def acquire(self, within: float) -> bool:
        event = anyio.Event()
        self.waiters.append(event)
        try:
            with anyio.move_on_after(within):
                await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # we were handed a place: hand it on
            else:
                self.waiters.remove(event)
            raise
        if event.is_set():
            return True
        self.waiters.remove(event)
        return False

    def release(self) -> None:
        if self.waiters:
            self.waiters.popleft().set()
        else:
            self.held -= 1


# What the reset is checked by: current_user, session_user, advisory locks released (and
# NULL-tested, to be a column), statements from SQL PREPARE (psycopg's own are
# protocol-level); the settings follow.
_CHECK = (
    "current_user, session_user, pg_catalog.pg_advisory_unlock_all() IS NULL, "
    "EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)"
)


class SharedPool:
    """One pool for every user; row-level security sees the current context's ids.

    Each checkout runs in one explicit transaction that starts with
    ``SELECT set_config(name, value, true), ...`` for every entry of ``settings`` (bound
    parameters), so the values vanish at commit or rollback and ``SET LOCAL``'s autocommit
    pitfall cannot happen. It is committed when the ``async with`` body ends normally and
    rolled back when it raises. Nested ``conn.transaction()`` blocks are savepoints, which
    never undo the settings. Ending the transaction inside the block (``conn.commit()``)
    leaves the rest of the block without settings, so the checkout then raises
    ``psycopg.ProgrammingError`` at its end.

    On return, in the same round trip as the commit, the connection is reset like
    ``DISCARD ALL`` (session settings, temporary tables, advisory locks, ``LISTEN``,
    cursors, sequence state; psycopg's own prepared statements are kept) and checked: the
    settings empty, ``current_user`` and ``session_user`` the login role, no statement
    from SQL ``PREPARE``. One that fails the check (after ``SET ROLE``, say) is closed,
    never handed on (``stats().discarded``). Python-side attributes a handler
    changed (``autocommit``, ``isolation_level``, ``read_only``, ``deferrable``,
    ``row_factory``, ``prepare_threshold``) are restored too.

    Args:
        conninfo: libpq connection string of an ordinary role (no superuser, no
            ``BYPASSRLS``, not the owner of the protected tables, unless they ``FORCE ROW
            LEVEL SECURITY``).
        min_size: Connections kept open.
        max_size: Connections at most.
        per_user_limit: Connections one user may hold at once; further checkouts of that
            user wait (within ``timeout``), so one user cannot take every connection.
        settings: Setting name -> context field (``user_id``, ``tenant_id``,
            ``thread_id``, ``run_id``, ``request_id``, ``connection_id``,
            ``parent_run_id``); an absent field is set to ``''``.
        timeout: Seconds a checkout may wait for a connection.
        retry_after: Seconds for the ``Retry-After`` of the 503 answer.
        rls_tables: Tables checked by :func:`check_rls` when the pool opens.
        rls_check: ``"warn"`` (default), ``"raise"`` or ``"off"``: what to do when the
            connecting role bypasses row-level security.
        name: Pool name in psycopg's logs.
        kwargs: Extra ``psycopg.AsyncConnection.connect`` arguments (``autocommit`` is
            always on outside checkouts).
        pool_options: Extra ``AsyncConnectionPool`` arguments (``max_waiting``,
            ``max_lifetime``, ``max_idle``, ``num_workers``, ...).

    Raises:
        UnsupportedBackendError: when constructed inside trio.
    """

    # DISCARD ALL, less: DEALLOCATE ALL (psycopg tracks the statements it prepared and would
    # not notice them gone; the check refuses statements from SQL PREPARE), SET SESSION
    # AUTHORIZATION DEFAULT (the check refuses a changed role: SET ROLE is rare) and
    # DISCARD PLANS (cached plans show nobody anything). Sent as one simple-protocol string
    # after COMMIT, ROLLBACK or nothing, with the check as its last statement.
    _RESET_SQL = "CLOSE ALL; RESET ALL; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES"

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        per_user_limit: int = 5,
        settings: Mapping[str, str] = DEFAULT_SETTINGS,
        timeout: float = 30.0,
        retry_after: float = 1.0,
        rls_tables: Iterable[str] = (),
        rls_check: RlsCheck = "warn",
        name: str = "ambient-shared",
        kwargs: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        checked = _Arguments.validated(
            min_size=min_size,
            max_size=max_size,
            per_user_limit=per_user_limit,
            timeout=timeout,
            retry_after=retry_after,
            rls_check=rls_check,
            settings=settings,
            fields=_CONTEXT_FIELDS,
            local=True,
        )
        self.conninfo = conninfo
        self.min_size = min_size
        self.max_size = max_size
        self.per_user_limit = per_user_limit
        self.timeout = timeout
        self.retry_after = retry_after
        self.rls_tables = tuple(rls_tables)
        self.rls_check: RlsCheck = rls_check
        self.name = name
        self._names = checked.names
        self._fields = checked.fields
        self._set_sql = checked.set_sql
        reads = [sql.SQL("current_setting({}, true)").format(sql.Literal(n)) for n in self._names]
        self._reset_sql = (
            sql.SQL("{}; SELECT {}")
            .format(sql.SQL(self._RESET_SQL), sql.SQL(", ").join([sql.SQL(_CHECK), *reads]))
            .as_string()
        )
        self._kwargs = {**(kwargs or {}), "autocommit": True}
        self._pool_options = pool_options
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._opening: anyio.Lock | None = None
        self._installed = False
        self._initial: tuple[Any, ...] | None = None
        self._gates: dict[UserRef, _Gate] = {}
        self.checked_out = 0
        self.discarded = 0

    def __repr__(self) -> str:
        return f"<SharedPool {self.name!r}>"

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def opened(self) -> bool:
        """Whether the pool is open."""
        return self._pool is not None

    async def open(self) -> None:
        """Open the pool and run the row-level-security self-check (idempotent).

        Raises:
            UnsupportedBackendError: outside asyncio.
            RowSecurityError: with ``rls_check="raise"`` when the role bypasses RLS.
        """
        _loops.require_asyncio(_ASYNCIO_ONLY)
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if self._pool is not None:
                return
            pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                self.conninfo,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                kwargs=self._kwargs,
                configure=self._configure,
                timeout=self.timeout,
                name=self.name,
                **self._pool_options,
            )
            # The pool's worker tasks copy the current context: start them with no request
            # bound, or they would keep the first user's scope alive (and run as that user).
            with ambient.detached():
                await pool.open()
            try:
                if self.rls_check != "off":
                    async with pool.connection(timeout=self.timeout) as conn:
                        await check_rls(
                            conn, self.rls_tables, settings=self._names, action=self.rls_check
                        )
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await pool.close()
                raise
            self._pool = pool

    async def close(self) -> None:
        """Close the pool; connections in use are closed when they come back."""
        pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.CancelScope(shield=True):
                await pool.close()

    async def __aenter__(self) -> SharedPool:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def install(self, registry: Registry, *, default: bool = True) -> None:
        """Register this pool in ``registry``: an APP component (key: this pool) opened on
        first use and closed at shutdown, and with ``default=True`` the :class:`Database`
        that the module-level :func:`connection` uses.

        Raises:
            RegistryError: when the keys are already registered or the registry is frozen.
        """
        registry.register(self, self._app_component, lifetime=Lifetime.APP, name=repr(self))
        if default:
            registry.register(Database, self._as_default, lifetime=Lifetime.APP, name="Database")
        self._installed = True

    async def _app_component(self) -> AsyncIterator[SharedPool]:
        opened_here = self._pool is None
        await self.open()
        try:
            yield self
        finally:
            if opened_here:
                await self.close()

    def _as_default(self) -> Iterable[SharedPool]:
        yield self

    async def _open_pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        _loops.require_asyncio(_ASYNCIO_ONLY)
        if self._installed:
            await ambient.resolve(self)
        pool = self._pool
        if pool is None:
            msg = (
                f"{self!r} is not open: open it with `async with pool:` or `await pool.open()`, "
                "or install it in the registry with `pool.install(registry)`"
            )
            raise PoolClosed(msg)
        return pool

    # -- connection callbacks (run by psycopg_pool's workers) ------------------------------

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        # Every connection of the pool starts alike; remember how, to restore it on return.
        if self._initial is None:
            self._initial = (
                conn.autocommit,
                conn.isolation_level,
                conn.read_only,
                conn.deferrable,
                conn.row_factory,
                conn.prepare_threshold,
            )

    async def _give_back(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        conn: AsyncConnection[Any],
        cur: AsyncCursor[Any] | None,
        cancel: PGcancel,
        exc: BaseException | None,
    ) -> Exception | None:
        """End the checkout's transaction, reset the connection and hand it back.

        Returns the error to raise to the caller: a failed commit, or a transaction the
        handler ended itself. Shielded: a cancelled task still returns its connection.
        """
        error: Exception | None = None
        with anyio.CancelScope(shield=True):
            try:
                status = conn.pgconn.transaction_status
                if (conn.closed or status == _ACTIVE) and await _cancel_broken(conn, cancel):
                    return None
                if status == _IDLE and exc is None:
                    error = psycopg.ProgrammingError(
                        "the checkout's transaction was ended inside it (conn.commit(), "
                        "conn.rollback() or COMMIT): the statements after that ran without "
                        "the context's settings. Let the checkout commit when its block ends"
                    )
                end = "" if status == _IDLE else "COMMIT; " if exc is None else "ROLLBACK; "
                if cur is None:
                    cur = conn.cursor(row_factory=tuple_row)
                error = await self._reset(conn, cur, end) or error
            finally:
                await pool.putconn(conn)
        return error

    async def _reset(
        self, conn: AsyncConnection[Any], cur: AsyncCursor[Any], end: str
    ) -> Exception | None:
        # The end of the transaction and the reset travel in one round trip. If the commit
        # fails, the rest of the string is skipped: the reset then runs on its own, and the
        # commit's error goes to the caller. A connection that cannot be reset and shown
        # clean is closed, whatever went wrong.
        failure: Exception | None = None
        try:
            try:
                await cur.execute(end + self._reset_sql)
            except psycopg.Error as exc:
                if end.startswith("COMMIT"):
                    failure = exc
                if conn.closed:
                    return failure
                await cur.execute(self._reset_sql)
            while cur.nextset():
                pass
            row = await cur.fetchone()
            login = conn.info.user
            # The columns of _CHECK, then every setting.
            if row is None or row[0] != login or row[1] != login or any(row[3:]):
                await self._discard(conn, "it kept session state (PREPARE, a role default?)")
                return failure
            await self._restore(conn)
        except Exception as exc:  # noqa: BLE001 - never hand on a connection not shown clean
            await self._discard(conn, f"its reset failed: {exc!r}")
        return failure

    async def _restore(self, conn: AsyncConnection[Any]) -> None:
        """Undo what a handler changed on the Python side of the connection."""
        initial = self._initial
        if initial is None:
            return
        autocommit, isolation_level, read_only, deferrable, row_factory, threshold = initial
        if conn.autocommit != autocommit:
            await conn.set_autocommit(autocommit)
        if conn.isolation_level != isolation_level:
            await conn.set_isolation_level(isolation_level)
        if conn.read_only != read_only:
            await conn.set_read_only(read_only)
        if conn.deferrable != deferrable:
            await conn.set_deferrable(deferrable)
        conn.row_factory = row_factory
        conn.prepare_threshold = threshold

    async def _discard(self, conn: AsyncConnection[Any], why: str) -> None:
        self.discarded += 1
        logger.warning("ambient: closed a connection of %r instead of reusing it: %s", self, why)
        await conn.close()

    # -- checkouts -----------------------------------------------------------------------

    def connection(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A connection for the current context, inside one transaction with the settings.

        ``async with pool.connection() as conn:``; see the class documentation.

        Args:
            timeout: Seconds to wait for a connection (default: the pool's ``timeout``).

        Raises:
            NoActiveContextError: outside a context.
            PoolExhaustedError: no connection within the timeout (the user's share or the
                whole pool is in use).
        """
        return _SharedCheckout(self, self.timeout if timeout is None else timeout)

    def stats(self) -> SharedPoolStats:
        """Counts of what the pool holds now."""
        measures = self._pool.get_stats() if self._pool is not None else {}
        return SharedPoolStats(
            size=measures.get("pool_size", 0),
            available=measures.get("pool_available", 0),
            waiting=measures.get("requests_waiting", 0),
            checked_out=self.checked_out,
            users=len(self._gates),
            discarded=self.discarded,
        )

    def _enter_gate(self, user: UserRef) -> _Gate:
        gate = self._gates.get(user)
        if gate is None:
            gate = self._gates[user] = _Gate()
        gate.refs += 1
        return gate

    def _leave_gate(self, user: UserRef, gate: _Gate) -> None:
        gate.refs -= 1
        if gate.refs == 0 and self._gates.get(user) is gate:
            del self._gates[user]


class _SharedCheckout:
    __slots__ = ("_cancel", "_conn", "_cur", "_gate", "_owner", "_pool", "_timeout", "_user")

    def __init__(self, owner: SharedPool, timeout: float) -> None:
        self._owner = owner
        self._timeout = timeout
        self._conn: AsyncConnection[Any] | None = None

    async def __aenter__(self) -> AsyncConnection[Any]:
        if self._conn is not None:
            raise RuntimeError(_IN_USE)
        ctx = ambient.get_current_context()
        owner = self._owner
        pool = owner._pool
        if pool is None:
            pool = await owner._open_pool()
        deadline = time.monotonic() + self._timeout
        user = ctx.user
        gate = owner._enter_gate(user)
        owner.checked_out += 1
        try:
            await self._take_share(gate)
            try:
                conn = await self._getconn(pool, deadline)
            except BaseException:
                gate.release()
                raise
        except BaseException:
            owner.checked_out -= 1
            owner._leave_gate(user, gate)
            raise
        self._pool = pool
        self._gate = gate
        self._user = user
        self._cancel = conn.pgconn.get_cancel()
        self._conn = conn
        self._cur = None
        try:
            # One cursor for the checkout's own statements, with a known row factory.
            self._cur = cur = conn.cursor(row_factory=tuple_row)
            await cur.execute("BEGIN")
            if owner._names:
                await cur.execute(owner._set_sql, _values(ctx, owner), prepare=True)
        except BaseException as exc:
            await self._finish(exc)
            raise
        return conn

    async def _take_share(self, gate: _Gate) -> None:
        owner = self._owner
        if gate.try_acquire(owner.per_user_limit) or await gate.acquire(self._timeout):
            return
        raise _exhausted(
            f"this user already holds {owner.per_user_limit} connection(s) of {owner!r} "
            f"(per_user_limit) and none came back within {self._timeout} s",
            owner.retry_after,
        )

    async def _getconn(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]], deadline: float
    ) -> AsyncConnection[Any]:
        owner = self._owner
        try:
            return await pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
        except (PoolTimeout, TooManyRequests) as exc:
            stats = pool.get_stats()
            raise _exhausted(
                f"no connection of {owner!r} became available within {self._timeout} s "
                f"(max_size={owner.max_size}, in use="
                f"{stats.get('pool_size', 0) - stats.get('pool_available', 0)}, "
                f"waiting={stats.get('requests_waiting', 0)}): {exc}",
                owner.retry_after,
            ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        error = await self._finish(exc)
        if error is not None and exc is None:
            raise error
        return False

    async def _finish(self, exc: BaseException | None) -> Exception | None:
        conn = self._conn
        if conn is None:
            return None
        self._conn = None
        owner = self._owner
        try:
            return await owner._give_back(self._pool, conn, self._cur, self._cancel, exc)
        finally:
            self._gate.release()
            owner.checked_out -= 1
            owner._leave_gate(self._user, self._gate)


def _values(source: UserExecutionContext | UserRef, owner: SharedPool | PerUserPools) -> list[str]:
    """The parameters of ``owner._set_sql``: each setting's name and ``source``'s value."""
    params: list[str] = []
    for name, field_name in zip(owner._names, owner._fields, strict=True):
        value = getattr(source, field_name)
        params += (name, "" if value is None else value)
    return params


# -- PerUserPools --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PerUserPoolsStats:
    """A snapshot of a :class:`PerUserPools`.

    Attributes:
        pools: Open user pools.
        idle_pools: Open user pools with no checkout (the first to close under pressure).
        slots: Connections the open pools may hold together (never above ``max_total``);
            every open server connection counts, idle ones included.
        max_total: The global cap.
        waiting: Checkouts waiting for room under the cap.
        checked_out: Checkouts in progress.
        evicted: Idle pools closed to make room.
    """

    pools: int
    idle_pools: int
    slots: int
    max_total: int
    waiting: int
    checked_out: int
    evicted: int


class PerUserPools:
    """A ``psycopg_pool`` pool per ``(tenant, user)``, under a global connection cap.

    Installed as a USER-lifetime component: a user's pool is created on the user's first
    checkout and closed ``idle_ttl`` seconds after the user's last request ended (checked
    against the registry's clock), when the registry evicts the user, or at shutdown.

    The pools together never hold more than ``max_total`` server connections, idle ones
    included: a pool grows one connection at a time, each taken from the global budget.
    When the budget is spent, the least recently used pool with no checkout in progress is
    closed to make room; when none can be, the checkout waits (up to ``timeout``) for a
    connection of its own pool or for room, and then raises
    :class:`~ambient.errors.PoolExhaustedError`. A pool keeps the room it grew into until
    it is closed.

    Every connection of a user's pool serves that user only; the ``settings`` (by default
    ``app.user_id`` and ``app.tenant_id``) are set for the whole session when it connects.
    A checkout follows psycopg's rules: committed when the ``async with`` body ends
    normally, rolled back when it raises.

    Args:
        conninfo: libpq connection string, or a callable taking the
            :class:`~ambient.UserRef` and returning one (a role per user).
        max_size: Connections one user's pool may hold.
        min_size: Connections a user's pool keeps open once created.
        max_total: Server connections all user pools may hold together.
        idle_ttl: Seconds after a user's last request before the user's pool closes.
        timeout: Seconds a checkout may wait.
        retry_after: Seconds for the ``Retry-After`` of the 503 answer.
        settings: Setting name -> ``"user_id"`` or ``"tenant_id"``.
        rls_tables: Tables checked by :func:`check_rls` when a pool first connects.
        rls_check: ``"warn"`` (default), ``"raise"`` or ``"off"``.
        name: Prefix of the pools' names in psycopg's logs (never the user id).
        kwargs: Extra ``psycopg.AsyncConnection.connect`` arguments.
        pool_options: Extra ``AsyncConnectionPool`` arguments (``max_idle``,
            ``max_lifetime``, ``num_workers``, ...).

    Raises:
        UnsupportedBackendError: when constructed inside trio.
    """

    def __init__(
        self,
        conninfo: str | Callable[[UserRef], str],
        *,
        max_size: int = 5,
        min_size: int = 0,
        max_total: int = 100,
        idle_ttl: float = 300.0,
        timeout: float = 30.0,
        retry_after: float = 1.0,
        settings: Mapping[str, str] = DEFAULT_SETTINGS,
        rls_tables: Iterable[str] = (),
        rls_check: RlsCheck = "warn",
        name: str = "ambient-user",
        kwargs: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        checked = _Arguments.validated(
            min_size=min_size,
            max_size=max_size,
            max_total=max_total,
            idle_ttl=idle_ttl,
            timeout=timeout,
            retry_after=retry_after,
            rls_check=rls_check,
            settings=settings,
            fields=_USER_FIELDS,
            local=False,
        )
        self.conninfo = conninfo
        self.max_size = max_size
        self.min_size = min_size
        self.max_total = max_total
        self.idle_ttl = idle_ttl
        self.timeout = timeout
        self.retry_after = retry_after
        self.rls_tables = tuple(rls_tables)
        self.rls_check: RlsCheck = rls_check
        self.name = name
        self._names = checked.names
        self._fields = checked.fields
        self._set_sql = checked.set_sql
        self._kwargs = dict(kwargs or {})
        self._pool_options = pool_options
        self._checked_conninfo: set[str] = set()
        # The global budget: slots held by open (or closing) pools, LRU idle pools, waiters.
        self._used = 0
        self._idle: OrderedDict[_UserPool, None] = OrderedDict()
        self._pools: set[_UserPool] = set()
        self._waiters: deque[anyio.Event] = deque()
        self.checked_out = 0
        self.evicted = 0

    def __repr__(self) -> str:
        return f"<PerUserPools {self.name!r}>"

    def install(self, registry: Registry, *, default: bool = True) -> None:
        """Register the user pools in ``registry`` as a USER component (key: this object),
        and with ``default=True`` as the :class:`Database` of :func:`connection`.

        Raises:
            RegistryError: when the keys are already registered or the registry is frozen.
        """
        registry.register(
            self,
            self._user_pool,
            lifetime=Lifetime.USER,
            name=repr(self),
            idle_ttl=self.idle_ttl,
        )
        if default:
            registry.register(Database, self._as_default, lifetime=Lifetime.APP, name="Database")

    def _user_pool(self, user: UserRef) -> _UserPool:
        _loops.require_asyncio(_ASYNCIO_ONLY)
        return _UserPool(self, user)

    def _as_default(self) -> Iterable[PerUserPools]:
        yield self

    def connection(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A connection from the current user's pool.

        ``async with pools.connection() as conn:``; committed when the body ends normally,
        rolled back when it raises.

        Args:
            timeout: Seconds to wait (default: the strategy's ``timeout``).

        Raises:
            NoActiveContextError: outside a scope.
            PoolExhaustedError: no connection within the timeout.
        """
        return _UserCheckout(self, self.timeout if timeout is None else timeout)

    def stats(self) -> PerUserPoolsStats:
        """Counts of the user pools and the global budget now."""
        return PerUserPoolsStats(
            pools=sum(1 for p in self._pools if p.pool is not None),
            idle_pools=len(self._idle),
            slots=self._used,
            max_total=self.max_total,
            waiting=len(self._waiters),
            checked_out=self.checked_out,
            evicted=self.evicted,
        )

    # -- the global budget ---------------------------------------------------------------

    def _busy(self, user_pool: _UserPool) -> None:
        user_pool.active += 1
        self.checked_out += 1
        if user_pool.active == 1:
            self._idle.pop(user_pool, None)

    def _done(self, user_pool: _UserPool) -> None:
        user_pool.active -= 1
        self.checked_out -= 1
        if user_pool.active == 0 and user_pool.pool is not None and not user_pool.closed:
            self._idle[user_pool] = None
            self._wake(1)  # a waiter may close this pool now

    def _wake(self, count: int) -> None:
        while count > 0 and self._waiters:
            self._waiters.popleft().set()
            count -= 1

    async def _take_slot(self, user_pool: _UserPool, deadline: float, *, wait: bool) -> bool:
        """Take one connection slot for ``user_pool``: free room, else close the least
        recently used idle pool, else wait until ``deadline`` (or give up when not
        ``wait``)."""
        if not wait and self._waiters:
            return False  # room freed up belongs to checkouts that have no connection at all
        woken = False
        while True:
            if self._used < self.max_total:
                self._used += 1
                return True
            victim = next(iter(self._idle), None)
            if victim is not None:
                await victim.close_pool(evicted=True, keep=1)  # one of its slots is ours
                return True
            if not wait:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _exhausted(
                    f"{self!r} holds max_total={self.max_total} server connections, all in "
                    f"use, and none came free within {self.timeout} s",
                    self.retry_after,
                )
            event = anyio.Event()
            if woken:
                self._waiters.appendleft(event)  # keep our place in the queue
            else:
                self._waiters.append(event)
            try:
                with anyio.move_on_after(remaining):
                    await event.wait()
            except BaseException:
                if event.is_set():
                    self._wake(1)  # we were handed room or an idle pool: pass it on
                else:
                    self._waiters.remove(event)
                raise
            if event.is_set():
                woken = True
            else:
                self._waiters.remove(event)

    def _give_back(self, slots: int, *, keep: int = 0) -> None:
        self._used -= slots - keep
        self._wake(slots - keep)

    async def _check_rls_once(self, pool: AsyncConnectionPool[AsyncConnection[Any]]) -> None:
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
        if self.rls_check == "off" or conninfo in self._checked_conninfo:
            return
        async with pool.connection(timeout=self.timeout) as conn:
            await check_rls(conn, self.rls_tables, action=self.rls_check)
        self._checked_conninfo.add(conninfo)


def _user_pool_closed(owner: PerUserPools) -> PoolClosed:
    return PoolClosed(f"{owner!r}: this user's pool was closed (shutdown or eviction)")


class _UserPool:
    """One user's pool: the USER component behind :class:`PerUserPools`."""

    __slots__ = ("__weakref__", "active", "closed", "opening", "owner", "pool", "slots", "user")

    def __init__(self, owner: PerUserPools, user: UserRef) -> None:
        self.owner = owner
        self.user = user
        self.pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self.opening: anyio.Event | None = None
        self.slots = 0
        self.active = 0
        self.closed = False
        owner._pools.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self.pool is not None else "empty"
        return f"<user pool of {self.owner!r}: {state}, {self.slots} slot(s), {self.active} busy>"

    async def ensure_pool(self, deadline: float) -> AsyncConnectionPool[AsyncConnection[Any]]:
        owner = self.owner
        while True:
            if self.closed:
                raise _user_pool_closed(owner)
            if self.pool is not None:
                return self.pool
            opening = self.opening
            if opening is None:
                break
            with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)):
                await opening.wait()
            if not opening.is_set():
                raise _exhausted(
                    f"this user's pool of {owner!r} did not open within {owner.timeout} s",
                    owner.retry_after,
                )
        self.opening = opening = anyio.Event()
        try:
            first = max(1, owner.min_size)
            taken = 0
            try:
                while taken < first:
                    await owner._take_slot(self, deadline, wait=True)
                    taken += 1
                pool = await self._open(taken)
            except BaseException:
                owner._give_back(taken)
                raise
            if self.closed:  # the component was cleaned up while the pool opened
                self.slots = taken
                self.pool = pool
                await self.close_pool()
                raise _user_pool_closed(owner)
            self.slots = taken
            self.pool = pool
            return pool
        finally:
            self.opening = None
            opening.set()

    async def _open(self, slots: int) -> AsyncConnectionPool[AsyncConnection[Any]]:
        owner = self.owner
        conninfo = owner.conninfo if isinstance(owner.conninfo, str) else owner.conninfo(self.user)
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo,
            min_size=owner.min_size,
            max_size=slots,
            open=False,
            kwargs=owner._kwargs,
            configure=self._configure if owner._names else None,
            timeout=owner.timeout,
            name=f"{owner.name}-{next(_pool_numbers)}",
            **owner._pool_options,
        )
        with anyio.CancelScope(shield=True):
            # The pool's worker tasks copy the current context: start them with no request
            # bound, or they would keep the first user's scope alive (and run as that user).
            with ambient.detached():
                await pool.open()
        try:
            await owner._check_rls_once(pool)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise
        return pool

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        # A connection of this pool serves this user only: session-level settings are safe.
        owner = self.owner
        await conn.execute(owner._set_sql, _values(self.user, owner), prepare=False)
        if not conn.autocommit:
            await conn.commit()

    async def grow(self, deadline: float) -> None:
        """Take one more slot when every connection this pool may hold is busy."""
        owner = self.owner
        pool = self.pool
        if pool is None or self.slots >= owner.max_size or self.active <= self.slots:
            return
        if await owner._take_slot(self, deadline, wait=False):
            if self.pool is not pool:  # evicted or closed while we waited for room
                owner._give_back(1)
                return
            self.slots += 1
            await pool.resize(owner.min_size, self.slots)

    async def close_pool(self, *, evicted: bool = False, keep: int = 0) -> None:
        """Close the psycopg pool and give its room back to the budget (``keep`` of it
        goes to the caller)."""
        owner = self.owner
        owner._idle.pop(self, None)
        pool, self.pool = self.pool, None
        slots, self.slots = self.slots, 0
        if evicted:
            owner.evicted += 1
        try:
            if pool is not None:
                with anyio.CancelScope(shield=True):
                    await pool.close()
        finally:
            owner._give_back(slots, keep=keep)

    async def aclose(self) -> None:
        """Close the pool (the USER component's cleanup)."""
        self.closed = True
        self.owner._pools.discard(self)
        await self.close_pool()


class _UserCheckout:
    __slots__ = ("_cancel", "_conn", "_owner", "_pool", "_timeout", "_user_pool")

    def __init__(self, owner: PerUserPools, timeout: float) -> None:
        self._owner = owner
        self._timeout = timeout
        self._conn: AsyncConnection[Any] | None = None

    async def __aenter__(self) -> AsyncConnection[Any]:
        if self._conn is not None:
            raise RuntimeError(_IN_USE)
        owner = self._owner
        user_pool: _UserPool = await ambient.resolve(owner)
        deadline = time.monotonic() + self._timeout
        owner._busy(user_pool)
        try:
            pool = await user_pool.ensure_pool(deadline)
            await user_pool.grow(deadline)
            try:
                conn = await pool.getconn(timeout=max(deadline - time.monotonic(), 0.0))
            except (PoolTimeout, TooManyRequests) as exc:
                raise _exhausted(
                    f"no connection of this user's pool of {owner!r} became available within "
                    f"{self._timeout} s (max_size={owner.max_size}, "
                    f"{owner._used}/{owner.max_total} server connections in use): {exc}",
                    owner.retry_after,
                ) from None
        except BaseException:
            owner._done(user_pool)
            raise
        self._user_pool = user_pool
        self._pool = pool
        self._cancel = conn.pgconn.get_cancel()
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        conn = self._conn
        if conn is None:
            return False
        self._conn = None
        try:
            await _release(self._pool, conn, self._cancel, exc)
        finally:
            self._owner._done(self._user_pool)
        return False


# -- the module-level accessor -------------------------------------------------------------


class _DefaultCheckout:
    __slots__ = ("_inner", "_timeout")

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._inner: AbstractAsyncContextManager[AsyncConnection[Any]] | None = None

    async def __aenter__(self) -> AsyncConnection[Any]:
        database: Database = await ambient.resolve(Database)
        inner = database.connection(timeout=self._timeout)
        conn = await inner.__aenter__()
        self._inner = inner
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        inner, self._inner = self._inner, None
        if inner is None:
            return False
        return bool(await inner.__aexit__(exc_type, exc, tb))


def connection(
    *, timeout: float | None = None
) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
    """A connection for the current context from the strategy installed as the default
    :class:`Database` (``strategy.install(registry)``).

    Example::

        async with connection() as conn:
            await conn.execute("INSERT INTO notes (owner, body) VALUES (%s, %s)", ...)

    Raises:
        NoActiveContextError: outside a scope.
        ResolutionError: when no strategy is installed.
        PoolExhaustedError: no connection within the timeout.
    """
    return _DefaultCheckout(timeout)
