""":class:`SharedPool`: one pool for every user, the context's ids set in each transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

import ambient
from ambient import Lifetime, Registry, UserRef, _loops
from ambient.integrations.psycopg._adapters import _AdaptersAsMade
from ambient.integrations.psycopg._arguments import (
    _CONTEXT_FIELDS,
    DEFAULT_SETTINGS,
    RlsCheck,
    _Arguments,
    _checkout_timeout,
)
from ambient.integrations.psycopg._common import (
    _ACTIVE,
    _ASYNCIO_ONLY,
    _BEGUN_SIDE,
    _IDLE,
    _INERROR,
    _PIPELINE_OFF,
    _RESEED,
    _SESSION_RESET,
    _aborted,
    _before,
    _bounded,
    _cancel_broken,
    _cancel_server_side,
    _Cancellers,
    _checked_pool_options,
    _close_unopened,
    _cut_short,
    _ended_inside,
    _hand_back,
    _is_ended_inside,
    _not_opened,
    _prepared_in_step,
    _python_side,
    _restore_python_side,
    _same_transaction,
    _starts_as_the_first,
    _through_pooler,
    _unknown_commit,
    _warn_pooler,
)
from ambient.integrations.psycopg._database import Database
from ambient.integrations.psycopg._refusals import _RefusalLog, _Refusals
from ambient.integrations.psycopg._rls import _names, check_rls
from ambient.integrations.psycopg._shared_checkout import _Gate, _SharedCheckout

if TYPE_CHECKING:
    from ambient.errors import PoolExhaustedError
    from ambient.integrations.psycopg._common import Canceller, ServerSide


logger = logging.getLogger("ambient")

# The checkout that opens an installed pool on first use (the registry calls the pool's
# factory with no arguments): the pool, the checkout's deadline and timeout, and how many
# openings had run out of time when it began to wait.
_opener: ContextVar[tuple[SharedPool, float, float, int] | None] = ContextVar(
    "ambient.psycopg.opener", default=None
)


def _transaction_head(conn: AsyncConnection[Any]) -> str:
    """``BEGIN`` with the transaction characteristics set on ``conn`` (``isolation_level``,
    ``read_only``, ``deferrable``), as psycopg would begin its own transaction: the
    checkout's explicit BEGIN would otherwise ignore them."""
    parts = ["BEGIN"]
    if conn.isolation_level is not None:
        parts.append(f"ISOLATION LEVEL {conn.isolation_level.name.replace('_', ' ')}")
    if conn.read_only is not None:
        parts.append("READ ONLY" if conn.read_only else "READ WRITE")
    if conn.deferrable is not None:
        parts.append("DEFERRABLE" if conn.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


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


# What the reset is checked by: current_user, session_user, advisory locks released and
# random() seeded anew (in a function that evaluates both: a row's IS NULL stops at the
# first column that is not), how many protocol-level statements the session holds (to match
# psycopg's own, see _prepared_in_step), statements from SQL PREPARE; the settings follow.
# Both counts come from one look at pg_prepared_statements (_PREPARED, after the settings):
# each look builds the whole list, about a third of the check's time on the server.
_UNLOCK_AND_RESEED = f"pg_catalog.num_nulls(pg_catalog.pg_advisory_unlock_all(), {_RESEED})"
_CHECK = f"current_user, session_user, {_UNLOCK_AND_RESEED}, prepared.protocol, prepared.sql"
_PREPARED = (
    " FROM (SELECT pg_catalog.count(*) FILTER (WHERE NOT from_sql) AS protocol,"
    " pg_catalog.count(*) FILTER (WHERE from_sql) > 0 AS sql"
    " FROM pg_catalog.pg_prepared_statements) AS prepared"
)
# The same where the message deallocated the statements from SQL PREPARE (behind a pooler):
# looking for them again would cost as much as the deallocation. The pooler's server session
# holds its other clients' statements too (renamed, with pgbouncer's own tracking), so
# psycopg's are not counted there.
_CHECK_DEALLOCATED = f"current_user, session_user, {_UNLOCK_AND_RESEED}, NULL, false"


class SharedPool:
    """One pool for every user; row-level security sees the current context's ids.

    Each checkout runs in one explicit transaction that starts with
    ``SELECT pg_catalog.set_config(name, value, true), ...`` for every entry of ``settings`` (the
    values quoted as SQL literals by psycopg for the connection, sent with ``BEGIN`` in one
    round trip), so the values vanish at commit or rollback and ``SET LOCAL``'s autocommit
    pitfall cannot happen. That ``BEGIN`` has the ``isolation_level``, ``read_only`` and
    ``deferrable`` the pool's connections are made with (by a ``connection_class``), as
    psycopg's own transactions would. It is committed when the ``async with`` body ends normally and
    rolled back when it raises. Nested ``conn.transaction()`` blocks are savepoints, which
    never undo the settings. Ending the transaction inside the block (``conn.commit()``)
    leaves the rest of the block without settings, so the checkout then raises
    ``psycopg.ProgrammingError`` at its end; statements after it run in autocommit, and a
    transaction the block began after it and left open is rolled back, not committed. The
    connection is the checkout's only inside the block: a reference kept past it (for a
    background task, a task spawned in the block) runs its statements in whatever
    checkout holds the connection next, another user's included; such work takes a
    checkout of its own. A block that ends normally in a failed
    transaction (a statement's error caught inside it) is rolled back, and the checkout
    raises ``psycopg.errors.InFailedSqlTransaction`` rather than report a commit that did
    not happen. A connection whose server session ended while it sat idle (a server restart,
    ``pg_terminate_backend``) fails that first statement: it is replaced by another before
    the block runs.

    On return, in the same round trip as the commit, the connection is reset like
    ``DISCARD ALL`` (session settings, ``SET ROLE``, temporary tables, advisory locks,
    ``LISTEN``, cursors, sequence state; psycopg's own prepared statements are kept), its
    ``random()`` seeded anew (a handler's ``setseed()``, which ``DISCARD ALL`` keeps, would
    decide what the next user draws; this takes PostgreSQL 13 or newer) and checked: the
    settings empty, ``session_user`` the login role and ``current_user`` the role the session
    starts as (the login role, unless it takes another at connect time), no statement from
    SQL ``PREPARE``, and every statement psycopg prepared still there (psycopg would run one
    a handler deallocated, by name or with a ``DEALLOCATE ALL`` it does not notice, in the
    next user's query, which would fail). Every session must start as the role the pool's
    first one did (the one ``check_rls`` checked): a new connection that starts as another
    (an ``ALTER ROLE ... SET role`` since the pool opened) is closed unused, and a checkout
    whose transaction begins as another (behind a connection pooler, a server session it
    opened since) is rolled back before its block runs and raises
    ``psycopg.OperationalError``, its connection closed. One that fails
    the check is closed, never handed on (``stats().discarded``). Behind a connection
    pooler, whose server sessions outlive the client connection, the statements from SQL
    ``PREPARE`` are deallocated instead, and what a failed COMMIT would leave (advisory
    locks, sequence state, the seed) goes just before the COMMIT. Python-side attributes a
    handler changed (``autocommit``, ``isolation_level``, ``read_only``, ``deferrable``,
    ``row_factory``, ``cursor_factory``, ``server_cursor_factory``, ``prepare_threshold``)
    are restored too, and so are the connection's ``adapters`` when a handler registered a
    loader, a dumper or a type on them (told apart without a round trip).

    What no reset reaches stays, as after ``DISCARD ALL``: what an extension keeps in the
    server process (dblink's named connections, postgres_fdw's cached ones, a library a
    handler loaded with ``LOAD``, PL/Perl's ``%_SHARED``), and the role's or database's
    defaults (``ALTER ROLE ... SET``, which any role may run for itself), which ``RESET ALL``
    returns to and every session opened after the change starts with. Those are a change
    of the role, as DDL is, not of one session: only a ``role`` default is refused (above);
    a setting the checkouts set is set over its default in each of them, and a connection
    whose reset leaves it non-empty is closed. Let handlers leave neither.

    Args:
        conninfo: libpq connection string of an ordinary role (no superuser, no
            ``BYPASSRLS``, not the owner of the protected tables, unless they ``FORCE ROW
            LEVEL SECURITY``).
        min_size: Connections kept open.
        max_size: Connections at most.
        per_user_limit: Connections one user may hold at once; further checkouts of that
            user wait (within ``timeout``), so one user cannot take every connection; with
            ``max_waiting``, at most that many of them wait, and further ones are refused
            at once, as in the pool's own queue (``math.inf``: no limit).
        settings: Setting name -> context field (``user_id``, ``tenant_id``,
            ``thread_id``, ``run_id``, ``request_id``, ``connection_id``,
            ``parent_run_id``); an absent field is set to ``''``.
        timeout: Seconds a checkout may wait for a connection.
        return_timeout: Seconds at most to end a checkout's transaction and hand its
            connection back (commit or rollback, the reset, the server-side cancel of an
            interrupted query). Handing back is shielded from cancellation, so this is
            what ends it when the server stops answering: the connection is then closed
            instead of reused, a COMMIT cut off this way raises
            ``psycopg.OperationalError`` (it may or may not have taken effect), and what
            the server still runs of it is cancelled there in the background.
        retry_after: Seconds for the ``Retry-After`` of the 503 answer.
        rls_tables: Tables checked by :func:`check_rls` when the pool opens.
        rls_check: ``"warn"`` (default), ``"raise"`` or ``"off"``: what to do when the
            connecting role bypasses row-level security.
        name: Pool name in psycopg's logs.
        kwargs: Extra ``psycopg.AsyncConnection.connect`` arguments (``autocommit`` is
            always on outside checkouts).
        pool_options: Extra ``AsyncConnectionPool`` keyword arguments (``max_waiting``,
            ``max_lifetime``, ``max_idle``, ``num_workers``, ...), checked here.

    Raises:
        UnsupportedBackendError: when constructed inside trio.
        TypeError: a pool option ``AsyncConnectionPool`` does not take, or one ambient sets;
            a ``per_user_limit`` that is no number (``None``).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        per_user_limit: float = 5,
        settings: Mapping[str, str] = DEFAULT_SETTINGS,
        timeout: float = 30.0,
        return_timeout: float = 10.0,
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
            return_timeout=return_timeout,
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
        self.return_timeout = return_timeout
        self.retry_after = retry_after
        self.rls_tables = tuple(_names("rls_tables", rls_tables))
        self.rls_check: RlsCheck = rls_check
        self.name = name
        self._names = checked.names
        self._fields = checked.fields
        # BEGIN and the settings as one statement: one round trip without pipeline mode,
        # which costs psycopg more client CPU than the round trip it saves on a local server.
        # The same statement also reads the server side of the transaction: its COMMIT
        # reads it again (a handler that ended it and began another ran without the
        # settings), and behind a pooler it cancels the query with SQL when the cancel
        # request cannot get through. BEGIN takes the transaction characteristics of the
        # pool's connections once the first is made (see _configure).
        self._set_sql = checked.set_sql
        self._begin_sql = self._begin_with("BEGIN")
        self._pooled = False
        # Behind a pooler: what deallocates the statements from SQL PREPARE in the message
        # that ends a checkout.
        self._deallocate = ""
        read = sql.SQL("pg_catalog.current_setting({}, true)")
        reads = [read.format(sql.Literal(n)) for n in self._names]
        # Sent as one simple-protocol string after COMMIT, ROLLBACK or nothing, with the
        # check (which refuses statements from SQL PREPARE and a role still changed) last.
        self._reset_sql, self._deallocated_reset_sql = (
            sql.SQL("{}; SELECT {}{}")
            .format(
                sql.SQL(_SESSION_RESET),
                sql.SQL(", ").join([sql.SQL(check), *reads]),
                sql.SQL(source),
            )
            .as_string()
            for check, source in ((_CHECK, _PREPARED), (_CHECK_DEALLOCATED, ""))
        )
        self._kwargs = {**(kwargs or {}), "autocommit": True}
        self._pool_options = _checked_pool_options(pool_options)
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._opening: anyio.Lock | None = None
        self._timeouts = 0  # openings that got no connection in time
        self._installed = False
        self._initial: tuple[Any, ...] | None = None
        self._adapters = _AdaptersAsMade()
        self._login: str | None = None
        self._role: str | None = None
        self._gates: dict[UserRef, _Gate] = {}
        self.checked_out = 0
        self.discarded = 0
        self._cancellers = _Cancellers()
        self._pooler_seen = False
        # What the server said when it last refused a connection of the pool, and what of
        # that was logged (once while it lasts).
        self._refusals = _Refusals(self)
        self._refusal_log = _RefusalLog()

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
            PoolExhaustedError: the check got no connection within ``timeout`` (is the
                database reachable? When the server refused it, the message says so and
                a note on the error says what the server answered).
        """
        await self._open(time.monotonic() + self.timeout, self.timeout, self._timeouts)

    async def _open(self, deadline: float, allowed: float, seen: int) -> None:
        """Open the pool by ``deadline`` (``allowed`` seconds after the caller began);
        ``seen`` is how many openings had run out of time when the caller began to wait."""
        _loops.require_asyncio(_ASYNCIO_ONLY)
        if self._opening is None:
            self._opening = anyio.Lock()
        with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)) as bound:
            async with self._opening:
                if self._pool is not None:
                    return
                if self._timeouts != seen:
                    # An opening this caller waited for got no connection in time: the
                    # database is unreachable. Trying again in turn would make the last of
                    # N concurrent first requests wait N timeouts.
                    raise self._not_opened(allowed, shared=True)
                await self._open_now(deadline, allowed)
        if bound.cancelled_caught:
            raise self._not_opened(allowed)

    async def _open_now(self, deadline: float, allowed: float) -> None:
        self._refusals = _Refusals(self, self._refusals)
        options = dict(self._pool_options)
        options["connection_class"] = self._refusals.connection_class(
            options.get("connection_class", AsyncConnection), options
        )
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            self.conninfo,
            min_size=self.min_size,
            max_size=self.max_size,
            open=False,
            kwargs=self._kwargs,
            configure=self._configure,
            timeout=self.timeout,
            name=self.name,
            **options,
        )
        # The role its sessions start as is read again from the first new connection.
        self._role = None
        # The pool's worker tasks copy the current context: start them with no request
        # bound, or they would keep the first user's scope alive (and run as that user).
        with ambient.detached():
            await pool.open()
        try:
            if self.rls_check != "off":
                wait = max(deadline - time.monotonic(), 0.0)
                async with pool.connection(timeout=wait) as conn:
                    await check_rls(
                        conn, self.rls_tables, settings=self._names, action=self.rls_check
                    )
        except BaseException as exc:
            ran_out = isinstance(exc, PoolTimeout) or time.monotonic() >= deadline
            await _close_unopened(pool, ran_out=ran_out)
            if ran_out:
                self._timeouts += 1
                if isinstance(exc, PoolTimeout):
                    raise self._not_opened(allowed) from None
            raise
        self._pool = pool

    def _not_opened(self, allowed: float, *, shared: bool = False) -> PoolExhaustedError:
        why = self._refusals.why()
        return _not_opened(repr(self), allowed, self.retry_after, why, shared=shared)

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
        opener = _opener.get()
        if opener is not None and opener[0] is self:
            await self._open(*opener[1:])
        else:
            await self.open()
        try:
            yield self
        finally:
            if opened_here:
                await self.close()

    def _as_default(self) -> Iterable[SharedPool]:
        yield self

    async def _open_pool(
        self, deadline: float, allowed: float
    ) -> AsyncConnectionPool[AsyncConnection[Any]]:
        """The pool, opened (installed, on first use) by the checkout's ``deadline``."""
        _loops.require_asyncio(_ASYNCIO_ONLY)
        if self._installed:
            # The registry opens the pool (its component) and waits for an opening in
            # progress: tell the opening this checkout's deadline, and bound the wait.
            token = _opener.set((self, deadline, allowed, self._timeouts))
            try:
                with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)) as bound:
                    await ambient.resolve(self)
            finally:
                _opener.reset(token)
            if bound.cancelled_caught:
                raise self._not_opened(allowed)
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
        pooled, login, role, deallocate = await _through_pooler(conn)
        self._pooled = pooled
        self._deallocate = deallocate
        if pooled:
            _warn_pooler(
                self,
                conn,
                "its settings last one transaction, so transaction pooling suits it",
                deallocate,
            )
        # What the reset check expects: the role the server session logged in as, which a
        # pooler's own login (pgbouncer's user=, "user.project" names) makes differ from
        # the client's.
        self._login = login
        # And the role it runs as once RESET ROLE has run, which must stay the first's.
        if self._role is None:
            self._role = role
        await _starts_as_the_first(self, conn, role, self._role, "reopen the pool")
        # Every connection of the pool starts alike; remember how, to restore it on return.
        if self._initial is None:
            self._initial = _python_side(conn)
            self._begin_sql = self._begin_with(_transaction_head(conn))
        self._adapters.keep(conn)

    def _begin_with(self, head: str) -> str:
        """The statement that begins a checkout's transaction with ``head`` (``BEGIN`` and
        its characteristics), sets the settings and reads the role the transaction runs as
        and its server side."""
        if self._names:
            return f"{head}; {self._set_sql}, {_BEGUN_SIDE}"
        return f"{head}; SELECT {_BEGUN_SIDE}"

    async def _give_back(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        conn: AsyncConnection[Any],
        cur: AsyncCursor[Any] | None,
        cancel: Canceller,
        exc: BaseException | None,
        server: ServerSide | None = None,
    ) -> Exception | None:
        """End the checkout's transaction, reset the connection and hand it back.

        Returns the error to raise to the caller: a failed commit, or a transaction the
        handler ended itself, or a COMMIT given up at ``return_timeout``. Shielded, so a
        cancelled task still returns its connection, and bounded by ``return_timeout``,
        after which the connection is closed instead.
        """
        error: Exception | None = None
        commit = False
        status = conn.pgconn.transaction_status
        lost = conn.closed
        piped = not lost and conn.pgconn.pipeline_status != _PIPELINE_OFF
        broken = lost or piped or status == _ACTIVE
        with _bounded(self) as bound:
            try:
                if broken and await _cancel_broken(conn, cancel):
                    if server is not None and self._pooled:
                        await _cancel_server_side(pool, self._kwargs, server)
                    return _cut_short(lost=lost, piped=piped) if exc is None else None
                if status == _IDLE and exc is None:
                    error = _ended_inside()
                if status == _INERROR and exc is None:
                    error = _aborted()
                commit = exc is None and error is None
                deallocate = self._deallocate
                end = (
                    deallocate
                    if status == _IDLE
                    else f"{_before('COMMIT', pooled=self._pooled, deallocate=deallocate)}COMMIT; "
                    if commit
                    else f"ROLLBACK; {deallocate}"
                )
                if cur is None:
                    cur = conn.cursor(row_factory=tuple_row)
                # Committing, the transaction's server side is checked first: another than
                # the one the checkout began means the handler ended that one, and the
                # check's error rolls back what ran after instead of committing it.
                begun = server if commit else None
                error = await self._reset(conn, cur, end, begun) or error
            finally:
                if bound.cancel_called:
                    self.discarded += 1
                await _hand_back(bound, self, pool, conn, cancel, server if self._pooled else None)
        if bound.cancelled_caught and commit:
            return _unknown_commit(self.return_timeout)
        if broken:
            # Given up at the bound while cancelling the query of a connection that could not
            # end its checkout: closed, so nothing of the block was committed.
            return _cut_short(lost=lost, piped=piped) if exc is None else None
        return error

    async def _reset(
        self,
        conn: AsyncConnection[Any],
        cur: AsyncCursor[Any],
        end: str,
        begun: ServerSide | None = None,
    ) -> Exception | None:
        # The end of the transaction and the reset travel in one round trip. If the commit
        # fails, the rest of the string is skipped: the reset then runs on its own, and the
        # commit's error goes to the caller. A connection that cannot be reset and shown
        # clean is closed, whatever went wrong.
        failure: Exception | None = None
        reset = self._deallocated_reset_sql if self._deallocate else self._reset_sql
        try:
            try:
                await cur.execute((_same_transaction(begun) if begun else "") + end + reset)
            except psycopg.Error as exc:
                if begun is not None and _is_ended_inside(exc):
                    # Another transaction than the checkout's: it is rolled back below.
                    failure = _ended_inside(another=True)
                elif "COMMIT" in end:
                    failure = exc
                if conn.closed:
                    return failure
                # A deferred constraint failed before COMMIT: the transaction is still
                # open (behind a pooler, on the same server session), so end it here.
                rollback = "ROLLBACK; " if conn.pgconn.transaction_status == _INERROR else ""
                await cur.execute(rollback + self._deallocate + reset)
            while cur.nextset():
                pass
            row = await cur.fetchone()
            login = self._login or conn.info.user
            # The columns of _CHECK, then every setting.
            role = self._role or login
            if row is None or row[0] != role or row[1] != login or any(row[4:]):
                await self._discard(conn, "it kept session state (PREPARE, a role default?)")
                return failure
            if not self._pooled and not _prepared_in_step(conn, row[3]):
                await self._discard(conn, "a handler deallocated a statement psycopg prepared")
                return failure
            if conn.pgconn.transaction_status != _IDLE:
                await self._discard(conn, "its reset left a transaction open")
                return failure
            await _restore_python_side(conn, self._initial, self._adapters)
        except Exception as exc:  # noqa: BLE001 - never hand on a connection not shown clean
            await self._discard(conn, f"its reset failed: {exc!r}")
        return failure

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
                whole pool is in use, or the server refuses new connections: the message
                then ends with what it answered the last one).
            ValueError: a ``timeout`` of NaN.
            TypeError: a ``timeout`` that is not a number.
        """
        return _SharedCheckout(self, _checkout_timeout(timeout, self.timeout))

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
