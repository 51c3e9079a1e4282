"""What both strategies share around a checkout: its errors and handing the connection back."""

from __future__ import annotations

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


_ACTIVE = TransactionStatus.ACTIVE
_IDLE = TransactionStatus.IDLE
logger = logging.getLogger("ambient")


_ASYNCIO_ONLY = (
    "psycopg's async connection pool runs on asyncio only, and this code runs under "
    "another event loop (trio?): run the application on asyncio (uvicorn and hypercorn "
    "do by default), or use psycopg's sync ConnectionPool through worker threads"
)


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
