"""What both strategies share around a checkout: its errors and handing the connection back."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import weakref
from typing import TYPE_CHECKING, Any, Union, cast

import anyio
import anyio.lowlevel
import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, capabilities
from psycopg.pq import PipelineStatus, PollingStatus, TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from ambient.errors import PoolExhaustedError

if TYPE_CHECKING:
    from psycopg.pq.abc import PGcancel, PGcancelConn

    from ambient.integrations.psycopg._adapters import _AdaptersAsMade
    from ambient.integrations.psycopg._per_user import PerUserPools
    from ambient.integrations.psycopg._shared import SharedPool


_ACTIVE = TransactionStatus.ACTIVE
_IDLE = TransactionStatus.IDLE
_INERROR = TransactionStatus.INERROR
_PIPELINE_OFF = PipelineStatus.OFF
_POLL_READING = PollingStatus.READING
_POLL_WRITING = PollingStatus.WRITING
logger = logging.getLogger("ambient")


_ASYNCIO_ONLY = (
    "psycopg's async connection pool runs on asyncio only, and this code runs under "
    "another event loop (trio?): run the application on asyncio (uvicorn and hypercorn "
    "do by default), or use psycopg's sync ConnectionPool through worker threads"
)


# AsyncConnectionPool arguments ambient sets itself on every pool it makes.
_OWN_POOL_ARGUMENTS = frozenset({"open", "configure"})

# What a handler may leave in a server session, undone as DISCARD ALL would, less:
# DEALLOCATE ALL (psycopg, and a pooler that follows prepared statements, track the
# statements they prepared and would not notice them gone), SET SESSION AUTHORIZATION
# DEFAULT (only a superuser can change it) and DISCARD PLANS (cached plans show nobody
# anything). RESET ALL leaves the role alone: RESET ROLE undoes a SET ROLE. Sent after COMMIT
# or ROLLBACK in the same message, so that a pooler cannot hand the session on in between.
_SESSION_RESET = "CLOSE ALL; RESET ALL; RESET ROLE; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES"
# The session's random() seeded anew from strong randomness (gen_random_uuid(), PostgreSQL
# 13+; hashed to an int8, then scaled into setseed()'s range): DISCARD ALL keeps what a
# handler's setseed() made of it, and the next user's random() would draw the sequence that
# seed decides. Costs tens of microseconds per checkout, most of it the server's strong
# random source; text and bit string arithmetic on it cost twice that.
_RESEED = (
    "pg_catalog.setseed(pg_catalog.uuid_hash_extended(pg_catalog.gen_random_uuid(), 0)"
    "::float8 / 9223372036854775808.0::float8)"
)
# The same for a PerUserPools connection behind a pooler, advisory locks and seed included.
_POOLED_RESET = f"{_SESSION_RESET}; SELECT pg_catalog.pg_advisory_unlock_all(), {_RESEED}"
# Behind a pooler, the statements a handler prepared with SQL PREPARE, one by one (not
# DEALLOCATE ALL, see above): a rollback keeps them, and the pooler's next client would find
# them (and fail to prepare one of the same name). PL/pgSQL names them; a role that may not
# use it gets nothing here (see _through_pooler).
_DEALLOCATE_FROM_SQL = (
    "DO $$DECLARE stmt text; BEGIN FOR stmt IN SELECT s.name FROM "
    "pg_catalog.pg_prepared_statements s WHERE s.from_sql LOOP "
    "EXECUTE 'DEALLOCATE ' || pg_catalog.quote_ident(stmt); END LOOP; END $$; "
)


def _checked_pool_options(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse at construction what ``AsyncConnectionPool`` would refuse only when the pool
    opens, inside the first request that needs it."""
    known = inspect.signature(AsyncConnectionPool.__init__).parameters
    unknown = sorted(name for name in options if name not in known or name == "self")
    if unknown:
        msg = (
            f"unknown AsyncConnectionPool option(s) {', '.join(unknown)}; pass pool options "
            "as keywords of their own, e.g. max_waiting=20"
        )
        raise TypeError(msg)
    taken = sorted(_OWN_POOL_ARGUMENTS.intersection(options))
    if taken:
        msg = f"{', '.join(taken)} cannot be set: ambient sets it on every pool it opens"
        raise TypeError(msg)
    return options


async def _close_unopened(pool: AsyncConnectionPool[Any], *, ran_out: bool) -> None:
    """Close a pool whose opening failed (shielded). When it ran out of time, its workers
    may be stuck connecting to a server that does not answer: psycopg would wait 5 s for
    them (and then leave them), past the deadline of the checkout that waits for this."""
    with anyio.CancelScope(shield=True):
        await (pool.close(timeout=0) if ran_out else pool.close())


def _python_side(conn: AsyncConnection[Any]) -> tuple[Any, ...]:
    """What a handler can change on the Python side of a connection, as the pool made it."""
    return (
        conn.autocommit,
        conn.isolation_level,
        conn.read_only,
        conn.deferrable,
        conn.row_factory,
        conn.cursor_factory,
        conn.server_cursor_factory,
        conn.prepare_threshold,
    )


async def _restore_python_side(
    conn: AsyncConnection[Any], initial: tuple[Any, ...] | None, adapters: _AdaptersAsMade
) -> None:
    """Undo what a handler changed on the Python side of an idle connection before it serves
    another checkout: ``autocommit`` left on would commit each statement of the next one,
    errors or not, and a loader registered on it would load the next one's values. The
    attributes go back to the pool's ``initial`` ones, the adapters to the connection's own
    as made (see ``_AdaptersAsMade``)."""
    # Notice and notification callbacks a request added would receive the next users'
    # notices, and notifications that arrived after a handler's own COMMIT wait in the
    # backlog for whoever calls notifies() next. The pool's connections start with none;
    # psycopg keeps them in these (private) containers and has no public way to list them.
    for name in ("_notice_handlers", "_notify_handlers", "_notifies_backlog"):
        kept = getattr(conn, name, None)
        if kept:
            kept.clear()
    adapters.restore(conn)
    if initial is None:
        return
    (
        autocommit,
        isolation_level,
        read_only,
        deferrable,
        row_factory,
        cursor_factory,
        server_cursor_factory,
        threshold,
    ) = initial
    if conn.autocommit != autocommit:
        await conn.set_autocommit(autocommit)
    if conn.isolation_level != isolation_level:
        await conn.set_isolation_level(isolation_level)
    if conn.read_only != read_only:
        await conn.set_read_only(read_only)
    if conn.deferrable != deferrable:
        await conn.set_deferrable(deferrable)
    conn.row_factory = row_factory
    conn.cursor_factory = cursor_factory
    conn.server_cursor_factory = server_cursor_factory
    conn.prepare_threshold = threshold


def _prepared_in_step(conn: AsyncConnection[Any], on_server: int) -> bool:
    """Whether the server session of ``conn``, which held ``on_server`` protocol-level
    prepared statements as the reset ended, holds every statement psycopg will execute
    as prepared. psycopg notices a DEALLOCATE ALL only the first time it runs the query
    text, and a DEALLOCATE by name never: it would execute the statement in the next
    checkout, which would fail with "prepared statement does not exist". psycopg keeps them
    in a private manager: without it, there is nothing to compare."""
    # Read after the reset's results, which psycopg may have followed with deallocations of
    # its own (all of them after a ROLLBACK, old ones past prepared_max): those left its
    # list too, so the session may hold more than the list, never fewer.
    names = getattr(getattr(conn, "_prepared", None), "_names", None)
    return names is None or on_server >= len(names)


# libpq 17's non-blocking cancel: psycopg's blocking one (PGcancel.cancel) holds the GIL
# while it waits for the server, which freezes the event loop when the server is slow or
# unreachable, even from a worker thread.
_NONBLOCKING_CANCEL = capabilities.has_cancel_safe()
Canceller = Union["PGcancelConn", "PGcancel"]


class _Cancellers:
    """For each connection of a pool, what cancels its running query on the server.

    Made on a connection's first checkout and kept with it: it must outlive the connection,
    which psycopg closes when it cannot finish a query (a task cancelled twice while it
    waits), though the server may still run that query.
    """

    __slots__ = ("_of",)

    def __init__(self) -> None:
        self._of: weakref.WeakKeyDictionary[AsyncConnection[Any], Canceller] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, conn: AsyncConnection[Any]) -> Canceller:
        cancel = self._of.get(conn)
        if cancel is None:
            pgconn = conn.pgconn
            cancel = pgconn.cancel_conn() if _NONBLOCKING_CANCEL else pgconn.get_cancel()
            self._of[conn] = cancel
        return cancel


async def _send_cancel(cancel: Canceller) -> None:
    """Cancel the connection's running query on the server (best effort: the server may
    already be done). Ends when the enclosing scope is cancelled, however slow the server."""
    try:
        if not _NONBLOCKING_CANCEL:
            # A limiter of its own: the default one may be spent by threads that wait for a
            # connection, which this very cancel is about to give back.
            await anyio.to_thread.run_sync(
                cancel.cancel,  # type: ignore[union-attr]
                limiter=anyio.CapacityLimiter(1),
                abandon_on_cancel=True,
            )
            return
        cancel_conn = cast("PGcancelConn", cancel)
        cancel_conn.start()
        # libpq's polling loop, which starts as if the last poll had asked to write.
        status: int = _POLL_WRITING
        while status in (_POLL_READING, _POLL_WRITING):
            if status == _POLL_READING:
                await anyio.wait_readable(cancel_conn.socket)
            else:
                await anyio.wait_writable(cancel_conn.socket)
            status = cancel_conn.poll()
    except Exception:  # noqa: BLE001 - best effort: the server may already be done
        return


async def _cancel_broken(conn: AsyncConnection[Any], cancel: Canceller) -> bool:
    """Whether ``conn`` cannot end its checkout: lost, interrupted mid-query, or left in
    pipeline mode; if so cancel its query on the server and close it (which rolls its
    transaction back).

    psycopg closes a connection whose query it could not finish (a cancellation that kept
    interrupting it); the server would go on running the query, holding its locks. In
    pipeline mode (a ``conn.pipeline()`` the block entered and never left) the end of the
    checkout would be queued, not run: its COMMIT and reset would fail unseen, or not
    happen, and the connection would go back to the pool still in pipeline mode.
    """
    if not conn.closed and conn.pgconn.transaction_status != _ACTIVE:
        if conn.pgconn.pipeline_status == _PIPELINE_OFF:
            return False
        await conn.close()  # no query runs: nothing to cancel
        return True
    await _send_cancel(cancel)
    if not conn.closed:
        await conn.close()
    return True


# Behind a pooler, what a checkout's first statement reads too: the server process that
# runs its transaction, and when that transaction began (a later one of the same process,
# another client's, starts later), in microseconds since the epoch: read again at COMMIT,
# after the handler may have changed DateStyle or TimeZone, a time as text would read
# differently, or not parse.
_SERVER_SIDE = (
    "pg_catalog.pg_backend_pid(), (extract(epoch FROM pg_catalog.now()) * 1000000)::bigint"
)
# What a checkout's first statement reads before the server side: the role its transaction
# runs as, before the handler's code can SET ROLE. Behind a pooler, a server session opened
# after an ALTER ROLE ... SET role starts as that role, under a client connection the
# pool checked when it connected (see _starts_as_the_first): only the checkout sees it.
_BEGUN_SIDE = f"current_user, {_SERVER_SIDE}"
_CANCEL_SERVER_SIDE = (
    "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_catalog.pg_stat_activity "
    "WHERE pid = %s AND (extract(epoch FROM xact_start) * 1000000)::bigint = %s"
)
ServerSide = tuple[int, int]
# The setting a checkout's COMMIT asks for when its transaction is not the one it began: an
# error, so that the COMMIT after it in the same message is skipped and what the handler
# ran after ending the checkout's transaction is rolled back, not committed.
_ENDED_INSIDE_GUARD = "ambient.checkout_transaction_ended_inside"


def _same_transaction(server: ServerSide) -> str:
    """The statement that fails unless the transaction is the one whose ``server`` side the
    checkout read as it began (the integers are the server's own, read back as ints)."""
    pid, began = server
    return (
        f"SELECT pg_catalog.current_setting(CASE WHEN ({_SERVER_SIDE}) = ({int(pid)}, "
        f"{int(began)}) THEN 'server_version' ELSE '{_ENDED_INSIDE_GUARD}' END); "
    )


def _is_ended_inside(error: BaseException) -> bool:
    """Whether ``error`` is the failure of :func:`_same_transaction`'s statement."""
    return isinstance(error, psycopg.errors.UndefinedObject) and _ENDED_INSIDE_GUARD in str(error)


async def _cancel_server_side(
    pool: AsyncConnectionPool[Any], kwargs: dict[str, Any], server: ServerSide
) -> None:
    """Behind a pooler, cancel the query of the transaction ``server`` (its server process
    and start, see ``_SERVER_SIDE``) over a connection of its own, with SQL. The pooler
    drops a cancel request once the client connection it names is gone, and psycopg closes
    a connection whose query it could not finish: the query would run on, holding its
    locks. Best effort, bounded by the enclosing give-back."""
    try:
        async with await pool.connection_class.connect(
            pool.conninfo, **{**kwargs, "autocommit": True}
        ) as conn:
            # psycopg's own cursor class: the application's may bind $1, not %s.
            await AsyncCursor(conn).execute(_CANCEL_SERVER_SIDE, server, prepare=False)
    except Exception:  # noqa: BLE001 - best effort: the server may already be done
        return


async def _through_pooler(conn: AsyncConnection[Any]) -> tuple[bool, str, str, str]:
    """Whether ``conn`` reaches PostgreSQL through a connection pooler (pgbouncer and its
    kin), the role its server session logged in as (a pooler may log in under another
    name than its client's), the role the session starts as (the login's, unless it takes
    another at connect time: ``options=-c role=...``, ``ALTER ROLE ... SET role``), and,
    behind a pooler, what deallocates the statements from SQL PREPARE (nothing when the
    role may not use PL/pgSQL). The pooler hands the client a cancel key of its own, so
    the backend pid libpq learnt at connect time is not the pid of the server process that
    runs the queries."""
    cur = await conn.cursor(row_factory=tuple_row).execute(
        "SELECT pg_catalog.pg_backend_pid(), session_user, current_user, EXISTS (SELECT "
        "FROM pg_catalog.pg_language WHERE lanname = 'plpgsql' "
        "AND pg_catalog.has_language_privilege(oid, 'USAGE'))",
        prepare=False,
    )
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - a SELECT without FROM returns its row
        return False, conn.info.user, conn.info.user, ""
    pooled = row[0] != conn.info.backend_pid
    return pooled, row[1], row[2], _DEALLOCATE_FROM_SQL if pooled and row[3] else ""


async def _starts_as_the_first(
    owner: SharedPool | PerUserPools,
    conn: AsyncConnection[Any],
    role: str,
    first: str,
    remedy: str,
) -> None:
    """Close ``conn`` unused when its session starts as another role than ``first``, the
    role the first session of ``owner`` with the same login started as (the one check_rls
    checked): any role may ALTER ROLE itself SET role to a role it is a member of, perhaps
    one that bypasses row-level security, and every user after would run as it.
    ``remedy`` says how to take a new role default on purpose."""
    if role == first:
        return
    await conn.close()
    msg = (
        f"a new connection of {owner!r} starts as role {role!r}, not {first!r} as "
        f"its first one did (an ALTER ROLE ... SET role since?): it is closed, not used; "
        f"{remedy} to use that role"
    )
    logger.error("ambient: %s", msg)
    raise psycopg.OperationalError(msg)


def _begun_as_the_first(
    owner: SharedPool | PerUserPools, role: str, first: str | None, remedy: str
) -> psycopg.OperationalError | None:
    """The error that refuses a checkout whose transaction began as another role than
    ``first`` (see :func:`_starts_as_the_first`), read by its first statement (see
    ``_BEGUN_SIDE``) before the caller's code runs; ``None`` when it is ``first``.
    ``remedy`` says how to take a new role default on purpose."""
    if first is None or role == first:
        return None
    msg = (
        f"a checkout of {owner!r} began as role {role!r}, not {first!r} as the first "
        "connection started (an ALTER ROLE ... SET role since, taken by a new server "
        "session of the connection pooler?): its transaction was rolled back before the "
        f"block ran; reset that role default (ALTER ROLE ... RESET role), or {remedy} to "
        "use that role"
    )
    logger.error("ambient: %s", msg)
    return psycopg.OperationalError(msg)


def _warn_pooler(
    owner: SharedPool | PerUserPools, conn: AsyncConnection[Any], how: str, deallocate: str
) -> None:
    """Say once per pool owner what a pooler between it and the server means (and, without
    what would ``deallocate`` them, that statements from SQL PREPARE outlive a checkout)."""
    if owner._pooler_seen:
        return
    owner._pooler_seen = True
    prepared = (
        ""
        if conn.prepare_threshold is None
        else " psycopg prepares statements it runs often (prepare_threshold="
        f"{conn.prepare_threshold}); under transaction pooling that needs pgbouncer 1.22 or "
        "newer with max_prepared_statements set, and libpq 17 or newer (otherwise pass "
        "kwargs={'prepare_threshold': None})."
    )
    if not deallocate:
        prepared += (
            " This role may not use PL/pgSQL, which deallocates the statements a handler "
            "prepares with SQL PREPARE: they would stay in the server session, so use none."
        )
    logger.warning(
        "ambient: %r connects through a connection pooler (pgbouncer?): %s.%s",
        owner,
        how,
        prepared,
    )


def _aborted() -> psycopg.errors.InFailedSqlTransaction:
    """The error of a checkout that ended normally in a failed transaction."""
    # COMMIT of a failed transaction rolls it back without an error: say so rather than
    # let the block's work vanish silently. A failed transaction answers no query, so
    # whether it is still the checkout's (the handler may have committed that one) is not
    # known here.
    return psycopg.errors.InFailedSqlTransaction(
        "a statement in the checkout failed and its error was caught inside the block, so "
        "the transaction was rolled back: nothing of it was committed, but what the block "
        "committed itself before, if it did (conn.commit(), COMMIT). Wrap statements whose "
        "errors you handle in `async with conn.transaction():` (a savepoint)"
    )


def _ended_inside(*, another: bool = False) -> psycopg.ProgrammingError:
    """The error of a checkout whose handler ended the transaction that carried the
    context's settings (behind a pooler, the settings of either strategy); ``another``:
    and the one open at the block's end (the handler may have begun and committed others
    in between) was rolled back."""
    then = ", and the transaction still open as the block ended was rolled back" if another else ""
    return psycopg.ProgrammingError(
        "the checkout's transaction was ended inside it (conn.commit(), conn.rollback() or "
        f"COMMIT): the statements after that ran without the context's settings{then}. "
        "Let the checkout commit when its block ends"
    )


def _cut_short(*, lost: bool, piped: bool = False) -> psycopg.OperationalError:
    """The error of a checkout whose block ended normally on a connection it could not
    commit on: lost, ``piped`` (left in pipeline mode, so closed) or still running a query
    (cancelled, so rolled back)."""
    why = (
        "its connection was lost"
        if lost
        else "its connection was still in pipeline mode (a conn.pipeline() entered and not "
        "left), so it was closed"
        if piped
        else "its connection was still running a query (a cursor.stream() left before its "
        "end? close it first, e.g. with contextlib.aclosing), which was cancelled"
    )
    return psycopg.OperationalError(
        f"the checkout's block ended normally but {why}: its transaction was rolled back, "
        "nothing of it was committed"
    )


def _unknown_commit(return_timeout: float) -> psycopg.OperationalError:
    """The error of a checkout whose COMMIT was given up at ``return_timeout``."""
    return psycopg.OperationalError(
        f"the checkout's COMMIT did not finish within return_timeout={return_timeout} s, so "
        "its connection was closed: the transaction may or may not have been committed"
    )


def _bounded(owner: SharedPool | PerUserPools) -> anyio.CancelScope:
    """The scope of a give-back: shielded from cancellation, ended by its own deadline
    (``owner.return_timeout``) when the server stops answering."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + owner.return_timeout)


async def _getconn_uncancelled(
    pool: AsyncConnectionPool[AsyncConnection[Any]], within: float
) -> AsyncConnection[Any]:
    """``pool.getconn(timeout=within)``, keeping a cancellation that lands as the pool
    hands the task a connection: Python 3.11's ``asyncio.wait_for``, under the pool's
    wait, then returns the connection and drops the ``Task.cancel()`` (a framework's
    cancelling the view of a client gone), and the cancelled work would go on. The
    connection goes back, and the cancellation is raised."""
    task = asyncio.current_task()
    requested = 0 if task is None else task.cancelling()
    conn = await pool.getconn(timeout=within)
    if task is None or task.cancelling() <= requested:
        return conn
    with anyio.CancelScope(shield=True):
        await pool.putconn(conn)
    # A cancel scope's cancellation is delivered again at a checkpoint, as its own; a
    # native one, dropped, is not.
    await anyio.lowlevel.checkpoint()
    raise asyncio.CancelledError


async def _hand_back(
    bound: anyio.CancelScope,
    owner: SharedPool | PerUserPools,
    pool: AsyncConnectionPool[Any],
    conn: AsyncConnection[Any],
    cancel: Canceller,
    server: ServerSide | None,
) -> None:
    """Give ``conn`` to ``pool`` at the end of the give-back ``bound`` (from ``finally``),
    closed first when the give-back ran out of time; then what the give-back left running
    on the server is cancelled there in the background (with ``cancel``, and with SQL for
    the transaction ``server`` behind a pooler)."""
    if not bound.cancel_called:
        # The work is done: nothing of the hand-back itself may be cut short. One scope for
        # both, rather than a deadline inside a shield: each costs microseconds per checkout.
        bound.deadline = math.inf
        await pool.putconn(conn)
        return
    logger.warning(
        "ambient: a connection of %r was not handed back within return_timeout=%s s (is the "
        "server reachable?): closed it instead",
        owner,
        owner.return_timeout,
    )
    # psycopg's own cancel of the interrupted statement was cut short by the same deadline:
    # a server that is slow rather than unreachable would run it on (a COMMIT waiting for a
    # lock, holding the transaction's), however long, once the connection is closed.
    running = conn.closed or conn.pgconn.transaction_status == _ACTIVE
    with anyio.CancelScope(shield=True):
        await conn.close()
        await pool.putconn(conn)
    if running:
        stop = _cancel_given_up(pool, owner._kwargs, cancel, server, owner.return_timeout)
        # In a Context of its own: not the request's, which it would keep alive meanwhile.
        task = asyncio.get_running_loop().create_task(stop, context=contextvars.Context())
        _stopping.add(task)
        task.add_done_callback(_stopping.discard)


# The background cancels of _hand_back(), kept referenced until they end.
_stopping: set[asyncio.Task[None]] = set()


async def _cancel_given_up(
    pool: AsyncConnectionPool[Any],
    kwargs: dict[str, Any],
    cancel: Canceller,
    server: ServerSide | None,
    within: float,
) -> None:
    """Cancel on the server what a give-back given up at its bound left running, in
    ``within`` seconds at most: the caller, whose give-back took its whole bound already,
    does not wait for it."""
    with anyio.move_on_after(within):
        await _send_cancel(cancel)
        if server is not None:
            await _cancel_server_side(pool, kwargs, server)


async def _release(
    owner: PerUserPools,
    pool: AsyncConnectionPool[Any],
    conn: AsyncConnection[Any],
    cancel: Canceller,
    exc: BaseException | None,
    *,
    pooled: bool,
    deallocate: str = "",
    settings: list[str] | None = None,
    server: ServerSide | None = None,
) -> Exception | None:
    """End a psycopg-style checkout (commit on success, roll back on error) and hand the
    connection back. Shielded, so a cancelled task still returns its connection, and
    bounded by ``owner.return_timeout``, after which the connection is closed instead.

    Returns the error to raise to the caller: a transaction that failed inside a block
    that ended normally (rolled back), a COMMIT given up at the bound, or a transaction
    the handler ended itself when its ``settings`` (the values the checkout set in it,
    behind a pooler) were all the context it had (told by the ``server`` side of the
    transaction, read again as it commits). A ``pooled`` connection (its server session
    passes to other clients of the pooler) is reset in the same message as its COMMIT or
    ROLLBACK, statements from SQL PREPARE included with ``deallocate``. An interrupted
    query of a checkout whose ``server`` side is known (behind a pooler) is cancelled with
    SQL too.
    """
    committing = False
    status: int | None = None
    lost = conn.closed
    piped = not lost and conn.pgconn.pipeline_status != _PIPELINE_OFF
    with _bounded(owner) as bound:
        try:
            if await _cancel_broken(conn, cancel):
                if server is not None:
                    await _cancel_server_side(pool, owner._kwargs, server)
                return _cut_short(lost=lost, piped=piped) if exc is None else None
            status = conn.pgconn.transaction_status
            if status == _IDLE:
                if pooled:
                    # The handler ended the transaction itself, and the pooler may have handed
                    # its server session on since: reset the one it gives now, most likely the
                    # same (as SharedPool does), rather than leave the handler's state in it.
                    await _reset_idle(conn, deallocate)
                return _ended_inside() if settings and exc is None else None
            if exc is None and status != _INERROR:
                committing = True
                if not pooled:
                    await conn.commit()
                elif not await _end_and_reset(
                    conn, "COMMIT", server if settings else None, deallocate=deallocate
                ):
                    return _ended_inside(another=True)
                return None
            try:
                await (
                    _end_and_reset(conn, "ROLLBACK", deallocate=deallocate)
                    if pooled
                    else conn.rollback()
                )
            except psycopg.Error as error:  # the pool replaces a broken connection
                logger.warning("ambient: rollback after %r failed: %s", exc, error)
        finally:
            await _hand_back(bound, owner, pool, conn, cancel, server if pooled else None)
    if bound.cancelled_caught and committing:
        return _unknown_commit(owner.return_timeout)
    if status is None:
        # Given up at the bound while cancelling the query of a connection that could not
        # end its checkout: closed, so nothing of the block was committed.
        return _cut_short(lost=lost, piped=piped) if exc is None else None
    # Rolled back (or given up, which rolls back too): a block that ended normally here was
    # in a failed transaction.
    return _aborted() if exc is None and status is not None else None


async def _reset_idle(conn: AsyncConnection[Any], deallocate: str) -> None:
    """Reset a pooled connection's server session outside a transaction (best effort)."""
    try:
        await AsyncClientCursor(conn).execute(f"{deallocate}{_POOLED_RESET}")
        if conn.pgconn.transaction_status != _IDLE:
            # psycopg began a transaction for it (autocommit off): the reset takes effect
            # when it commits.
            await conn.commit()
    except psycopg.Error as error:
        logger.warning("ambient: resetting a pooled server session failed: %s", error)


async def _end_and_reset(
    conn: AsyncConnection[Any],
    end: str,
    server: ServerSide | None = None,
    *,
    deallocate: str = "",
) -> bool:
    """End the transaction with ``end`` and reset the session, in one message, statements
    from SQL PREPARE included with ``deallocate``; ``False`` when the transaction ended is
    not the one whose ``server`` side the checkout read as it began (the handler ended that
    one, and a statement began another)."""
    # Client-side binding: the simple query protocol, which alone takes several statements;
    # rows by position, whatever the connection's row factory.
    cur = AsyncClientCursor(conn, row_factory=tuple_row)
    ending = (
        f"{_before(end, pooled=True, deallocate=deallocate)}{end}; "
        f"{_after(end, deallocate=deallocate)}{_POOLED_RESET}"
    )
    try:
        # Not the settings' values: a handler may set one itself, in the same transaction.
        await cur.execute(ending if server is None else _same_transaction(server) + ending)
    except psycopg.Error as exc:
        if not conn.closed and conn.pgconn.transaction_status == _INERROR:
            # Failed before COMMIT (a deferred constraint, or another transaction than the
            # checkout's): the transaction is still open, so the pooler still gives this
            # client the same server session. Roll it back and reset it.
            await cur.execute(f"ROLLBACK; {deallocate}{_POOLED_RESET}")
        if server is not None and _is_ended_inside(exc):
            return False
        raise
    return True


# Behind a pooler, before the COMMIT too: what a transaction that fails to commit would leave
# in the server session (its settings, role, temporary tables and LISTEN go with it), since
# the pooler hands the session on before the reset after the COMMIT can reach it. A COMMIT
# can fail at any isolation level, after the deferred constraints were checked (a full
# NOTIFY queue, a table emptied ON COMMIT that another refers to, an extension's own commit
# such as postgres_fdw's, and a serialization failure under SERIALIZABLE), so the session
# advisory locks go before it whatever the level: the pooler's next client would hold them,
# or wait for them. The sequence state goes after the cursors, which a COMMIT would otherwise
# run to their end (a cursor WITH HOLD) after it was discarded; the reset closes them anyway.
_BEFORE_POOLED_COMMIT = (
    f"DISCARD SEQUENCES; SELECT pg_catalog.pg_advisory_unlock_all(), {_RESEED}; "
)


def _before(end: str, *, pooled: bool, deallocate: str = "") -> str:
    """What goes before ``end`` in the message that ends a checkout: before a COMMIT, the
    deferred constraints are checked, so that one failing fails inside the transaction,
    where the session can still be reset, not in the COMMIT, which ends it (behind a
    pooler the session is then another client's), and the cursors are closed, which the
    COMMIT would otherwise run to their end (a cursor WITH HOLD) only for the reset to
    close them; behind a ``pooled`` connection, what a failed COMMIT would leave is undone
    before it, statements from SQL PREPARE included with ``deallocate`` (no rollback
    undoes them)."""
    if end != "COMMIT":
        return ""
    pooled_part = f"{_BEFORE_POOLED_COMMIT}{deallocate}" if pooled else ""
    return f"SET CONSTRAINTS ALL IMMEDIATE; CLOSE ALL; {pooled_part}"


def _after(end: str, *, deallocate: str) -> str:
    """What goes between ``end`` and the reset: ``deallocate`` (statements from SQL
    PREPARE), unless ``end`` is a COMMIT, before which they went. A failed transaction
    refuses every statement but its ROLLBACK, so there they go after it."""
    return "" if end == "COMMIT" else deallocate


_IN_USE = "this checkout is in use; call connection() once per `async with`"


class _Checkout:
    """A checkout's ``async with``, entered once at a time: from the start of an entry, not
    from when it has a connection, a second entry while the first waits or is in use would
    take a connection of its own into the same fields, and the first connection would never
    come back."""

    __slots__ = ("_entered",)

    def __init__(self) -> None:
        self._entered = False

    async def __aenter__(self) -> AsyncConnection[Any]:
        if self._entered:
            raise RuntimeError(_IN_USE)
        self._entered = True
        try:
            return await self._enter()
        except BaseException:
            self._entered = False
            raise

    async def _enter(self) -> AsyncConnection[Any]:
        raise NotImplementedError


def _exhausted(detail: str, retry_after: float, why: str = "") -> PoolExhaustedError:
    error = PoolExhaustedError(detail, retry_after=retry_after)
    if why:
        # A note, for the logs and tracebacks that show the error: the detail is the
        # client's answer, and the server's words name its roles and settings.
        error.add_note(why)
    return error


def _not_opened(
    what: str, allowed: float, retry_after: float, why: str, *, shared: bool = False
) -> PoolExhaustedError:
    """``what`` (a pool) got no connection to open with within ``allowed`` seconds, in an
    opening of its own or in the one it waited for (``shared``); ``why``: what the server
    said when it last refused one (see ``_Refusals.why``), if it did, noted on the error."""
    how = "the opening this checkout waited for" if shared else "it"
    hint = " (the server refused the last attempt to connect)" if why else " (is it reachable?)"
    return _exhausted(
        f"{what} could not be opened: the database gave {how} no connection within "
        f"{allowed} s{hint}",
        retry_after,
        why,
    )


def _queue_full(
    what: str, pool: AsyncConnectionPool[Any], max_size: int, retry_after: float, exc: Exception
) -> PoolExhaustedError:
    """psycopg refused the checkout at once because ``pool``'s queue is full
    (``max_waiting``): say so, not that the timeout ran out."""
    return _exhausted(
        f"the queue for a connection of {what} is full (max_waiting={pool.max_waiting}, "
        f"max_size={max_size}), so this request was refused without waiting: {exc}",
        retry_after,
    )
