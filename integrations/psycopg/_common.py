"""What both strategies share around a checkout: its errors and handing the connection back."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from ambient.errors import PoolExhaustedError

if TYPE_CHECKING:
    from psycopg.pq.abc import PGcancel

    from ambient.integrations.psycopg._per_user import PerUserPools
    from ambient.integrations.psycopg._shared import SharedPool


_ACTIVE = TransactionStatus.ACTIVE
_IDLE = TransactionStatus.IDLE
_INERROR = TransactionStatus.INERROR
logger = logging.getLogger("ambient")


_ASYNCIO_ONLY = (
    "psycopg's async connection pool runs on asyncio only, and this code runs under "
    "another event loop (trio?): run the application on asyncio (uvicorn and hypercorn "
    "do by default), or use psycopg's sync ConnectionPool through worker threads"
)


# AsyncConnectionPool arguments ambient sets itself on every pool it makes.
_OWN_POOL_ARGUMENTS = frozenset({"open", "configure"})


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


async def _through_pooler(conn: AsyncConnection[Any]) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a connection pooler (pgbouncer and its
    kin): the pooler hands the client a cancel key of its own, so the backend pid libpq
    learnt at connect time is not the pid of the server process that runs the queries."""
    cur = await conn.execute("SELECT pg_catalog.pg_backend_pid()", prepare=False)
    row = await cur.fetchone()
    return row is not None and row[0] != conn.info.backend_pid


def _warn_pooler(owner: SharedPool | PerUserPools, conn: AsyncConnection[Any], how: str) -> None:
    """Say once per pool owner what a pooler between it and the server means."""
    if owner._pooler_seen:
        return
    owner._pooler_seen = True
    prepared = (
        ""
        if conn.prepare_threshold is None
        else " psycopg prepares statements it runs often (prepare_threshold="
        f"{conn.prepare_threshold}); under transaction pooling that fails before pgbouncer "
        "1.21 (pass kwargs={'prepare_threshold': None} there)."
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
    # let the block's work vanish silently.
    return psycopg.errors.InFailedSqlTransaction(
        "a statement in the checkout failed and its error was caught inside the block, so "
        "the transaction was rolled back: nothing of it was committed. Wrap statements "
        "whose errors you handle in `async with conn.transaction():` (a savepoint)"
    )


async def _release(
    pool: AsyncConnectionPool[Any],
    conn: AsyncConnection[Any],
    cancel: PGcancel,
    exc: BaseException | None,
) -> Exception | None:
    """End a psycopg-style checkout (commit on success, roll back on error) and hand the
    connection back. Shielded, so a cancelled task still returns its connection.

    Returns the error to raise to the caller: a transaction that failed inside a block
    that ended normally (rolled back).
    """
    with anyio.CancelScope(shield=True):
        try:
            if await _cancel_broken(conn, cancel):
                return None
            status = conn.pgconn.transaction_status
            if status == _IDLE:
                return None
            if exc is None and status != _INERROR:
                await conn.commit()
                return None
            try:
                await conn.rollback()
            except psycopg.Error as error:  # the pool replaces a broken connection
                logger.warning("ambient: rollback after %r failed: %s", exc, error)
        finally:
            await pool.putconn(conn)
    return _aborted() if exc is None else None


_IN_USE = "this checkout is in use; call connection() once per `async with`"


def _exhausted(detail: str, retry_after: float) -> PoolExhaustedError:
    return PoolExhaustedError(detail, retry_after=retry_after)


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
