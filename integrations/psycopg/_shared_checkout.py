"""A checkout of a :class:`SharedPool`, and the per-user share of the pool it waits for."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

import ambient
from ambient.integrations.psycopg._arguments import _values
from ambient.integrations.psycopg._common import (
    _begun_as_the_first,
    _Checkout,
    _exhausted,
    _getconn_uncancelled,
    _queue_full,
)

if TYPE_CHECKING:
    from types import TracebackType

    from ambient import UserRef
    from ambient.integrations.psycopg._common import ServerSide
    from ambient.integrations.psycopg._shared import SharedPool


class _Gate:
    """One user's share of a :class:`SharedPool`: at most ``limit`` connections held, the
    rest wait in line (a place freed is handed to the first in line)."""

    __slots__ = ("held", "refs", "waiters")

    def __init__(self) -> None:
        self.held = 0
        self.refs = 0  # checkouts in progress, waiting or holding
        self.waiters: deque[anyio.Event] = deque()

    def try_acquire(self, limit: float) -> bool:
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


class _SharedCheckout(_Checkout):
    __slots__ = (
        "_cancel",
        "_conn",
        "_cur",
        "_gate",
        "_owner",
        "_pool",
        "_server",
        "_timeout",
        "_user",
    )

    def __init__(self, owner: SharedPool, timeout: float) -> None:
        super().__init__()
        self._owner = owner
        self._timeout = timeout
        self._conn: AsyncConnection[Any] | None = None
        self._cur: AsyncClientCursor[Any] | None = None
        self._server: ServerSide | None = None

    async def _enter(self) -> AsyncConnection[Any]:
        ctx = ambient.get_current_context()
        owner = self._owner
        deadline = time.monotonic() + self._timeout
        pool = owner._pool
        if pool is None:
            pool = await owner._open_pool(deadline, self._timeout)
        retries = owner.max_size
        while True:
            conn = await self._take(ctx.user, pool, deadline)
            begun_as: str | None = None
            try:
                # One cursor for the checkout's own statements, with a known row factory.
                # It binds client-side (psycopg quotes each value for this connection), so
                # BEGIN and the settings go as one statement in one round trip.
                # It also reads the server side of the transaction, which the checkout's
                # COMMIT reads again: a handler that ended the transaction and began another
                # ran the rest of its block without the settings.
                self._cur = cur = AsyncClientCursor(conn, row_factory=tuple_row)
                await cur.execute(owner._begin_sql, _values(ctx, owner))
                cur.nextset()
                row = await cur.fetchone()
                if row is not None:
                    begun_as = row[-3]
                    self._server = (row[-2], row[-1])
            except BaseException as exc:
                await self._finish(exc)
                # The server ended the connection while it sat idle in the pool (a restart,
                # pg_terminate_backend): nothing of the caller's ran on it, so take another
                # (as many times at most as the pool holds connections, all maybe ended).
                if not (retries and conn.closed and isinstance(exc, psycopg.OperationalError)):
                    raise
                retries -= 1
            else:
                # Behind a pooler, a server session that started as another role since the
                # pool checked its connections: refused before the block runs. The rollback's
                # reset check closes the connection (its role is not the pool's), and every
                # checkout that meets such a session is refused too.
                refused = (
                    None
                    if begun_as is None
                    else _begun_as_the_first(owner, begun_as, owner._role, "reopen the pool")
                )
                if refused is None:
                    return conn
                await self._finish(refused)
                raise refused

    async def _take(
        self, user: UserRef, pool: AsyncConnectionPool[AsyncConnection[Any]], deadline: float
    ) -> AsyncConnection[Any]:
        """Take the user's share and a connection of ``pool`` by ``deadline``."""
        owner = self._owner
        gate = owner._enter_gate(user)
        owner.checked_out += 1
        try:
            await self._take_share(gate, pool, deadline)
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
        self._cancel = owner._cancellers.of(conn)
        self._conn = conn
        self._cur = None
        self._server = None
        return conn

    async def _take_share(
        self, gate: _Gate, pool: AsyncConnectionPool[AsyncConnection[Any]], deadline: float
    ) -> None:
        owner = self._owner
        if gate.try_acquire(owner.per_user_limit):
            return
        # The user's line for a share is a queue for the pool too: max_waiting bounds it as
        # psycopg bounds its own, or one user's burst would wait there without limit.
        if pool.max_waiting and len(gate.waiters) >= pool.max_waiting:
            raise _exhausted(
                f"this user already holds {owner.per_user_limit} connection(s) of {owner!r} "
                f"(per_user_limit) and {len(gate.waiters)} more of its checkouts wait for one "
                f"(max_waiting={pool.max_waiting}), so this request was refused without "
                "waiting",
                owner.retry_after,
            )
        if await gate.acquire(max(deadline - time.monotonic(), 0.0)):
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
            return await _getconn_uncancelled(pool, max(deadline - time.monotonic(), 0.0))
        except TooManyRequests as exc:
            raise _queue_full(repr(owner), pool, owner.max_size, owner.retry_after, exc) from None
        except PoolTimeout as exc:
            stats = pool.get_stats()
            raise _exhausted(
                f"no connection of {owner!r} became available within {self._timeout} s "
                f"(max_size={owner.max_size}, in use="
                f"{stats.get('pool_size', 0) - stats.get('pool_available', 0)}, "
                f"waiting={stats.get('requests_waiting', 0)}): {exc}",
                owner.retry_after,
                owner._refusals.why(),
            ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            error = await self._finish(exc)
        finally:
            self._entered = False
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
            return await owner._give_back(
                self._pool, conn, self._cur, self._cancel, exc, self._server
            )
        finally:
            self._gate.release()
            owner.checked_out -= 1
            owner._leave_gate(self._user, self._gate)
