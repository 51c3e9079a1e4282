"""One user's pool of a :class:`PerUserPools`, and a checkout from it."""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

import ambient
from ambient import UserRef
from ambient.errors import PoolExhaustedError
from ambient.integrations.psycopg._arguments import _values
from ambient.integrations.psycopg._common import (
    _begun_as_the_first,
    _Checkout,
    _close_unopened,
    _exhausted,
    _getconn_uncancelled,
    _not_opened,
    _python_side,
    _queue_full,
    _release,
    _restore_python_side,
    _starts_as_the_first,
    _through_pooler,
    _warn_pooler,
)
from ambient.integrations.psycopg._refusals import _Refusals

if TYPE_CHECKING:
    from types import TracebackType

    from ambient.integrations.psycopg._common import ServerSide
    from ambient.integrations.psycopg._per_user import PerUserPools


_pool_numbers = itertools.count(1)


def _user_pool_closed(owner: PerUserPools) -> PoolClosed:
    return PoolClosed(f"{owner!r}: this user's pool was closed (shutdown or eviction)")


class _UserPool:
    """One user's pool: the USER component behind :class:`PerUserPools`."""

    __slots__ = (
        "__weakref__",
        "active",
        "closed",
        "deallocate",
        "initial",
        "lent",
        "made",
        "opening",
        "owner",
        "pool",
        "pooled",
        "refusals",
        "role",
        "slots",
        "timeouts",
        "user",
    )

    def __init__(self, owner: PerUserPools, user: UserRef) -> None:
        self.owner = owner
        self.user = user
        self.pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        # The connections the pool made (closed ones pruned as it makes more), and those a
        # checkout holds: see _close_left_open.
        self.made: set[AsyncConnection[Any]] = set()
        self.lent: set[AsyncConnection[Any]] = set()
        self.opening: anyio.Event | None = None
        self.slots = 0
        self.active = 0
        self.closed = False
        # Whether the connections reach the server through a pooler (seen on connecting).
        self.pooled = False
        # Behind a pooler: what deallocates statements from SQL PREPARE as a checkout ends.
        self.deallocate = ""
        # The role the first connection with this pool's connection string started as.
        self.role: str | None = None
        # How the pool makes its connections, to restore on return (see _reset).
        self.initial: tuple[Any, ...] | None = None
        self.timeouts = 0  # openings that got no connection in time
        # What the server said when it last refused a connection of this user's pool.
        self.refusals = _Refusals(owner)
        owner._pools.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self.pool is not None else "empty"
        return f"<user pool of {self.owner!r}: {state}, {self.slots} slot(s), {self.active} busy>"

    async def ensure_pool(
        self, deadline: float, allowed: float
    ) -> AsyncConnectionPool[AsyncConnection[Any]]:
        owner = self.owner
        seen = self.timeouts
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
                    f"this user's pool of {owner!r} did not open within {allowed} s",
                    owner.retry_after,
                    self.refusals.why(),
                )
            if self.timeouts != seen:
                # The opening waited for got no connection in time: the database is
                # unreachable. Trying again in turn would make the last of N concurrent
                # first checkouts wait N timeouts.
                raise self._not_opened(allowed, shared=True)
        self.opening = opening = anyio.Event()
        try:
            first = max(1, owner.min_size)
            taken = 0
            try:
                while taken < first:
                    await owner._take_slot(self, deadline, wait=True)
                    taken += 1
                pool, made = await self._open(taken, deadline, allowed)
            except BaseException:
                owner._give_back(taken)
                raise
            self.slots = taken
            self.pool = pool
            self.made = made
            if self.closed:  # the component was cleaned up while the pool opened
                await self.close_pool()
                raise _user_pool_closed(owner)
            return pool
        finally:
            self.opening = None
            opening.set()

    async def _open(
        self, slots: int, deadline: float, allowed: float
    ) -> tuple[AsyncConnectionPool[AsyncConnection[Any]], set[AsyncConnection[Any]]]:
        """A new psycopg pool for this user, open, and the connections it makes."""
        owner = self.owner
        conninfo = owner.conninfo if isinstance(owner.conninfo, str) else owner.conninfo(self.user)
        made: set[AsyncConnection[Any]] = set()

        async def configure(conn: AsyncConnection[Any]) -> None:
            made.difference_update([c for c in made if c.closed])
            made.add(conn)
            await self._configure(conn, conninfo)

        options = {**owner._pool_options, "reset": self._reset}
        options["connection_class"] = self.refusals.connection_class(
            options.get("connection_class", AsyncConnection), options
        )
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo,
            min_size=owner.min_size,
            max_size=slots,
            open=False,
            kwargs=owner._kwargs,
            configure=configure,
            timeout=owner.timeout,
            name=f"{owner.name}-{next(_pool_numbers)}",
            **options,
        )
        with anyio.CancelScope(shield=True):
            # The pool's worker tasks copy the current context: start them with no request
            # bound, or they would keep the first user's scope alive (and run as that user).
            with ambient.detached():
                await pool.open()
        ran_out = False
        try:
            with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)) as bound:
                await owner._check_rls_once(pool, deadline)
        except PoolTimeout:
            ran_out = True
        except BaseException:
            await _close_unopened(pool, ran_out=False)
            await self._close_left_open(made)
            raise
        if ran_out or bound.cancelled_caught:
            await _close_unopened(pool, ran_out=True)
            await self._close_left_open(made)
            self.timeouts += 1
            raise self._not_opened(allowed)
        return pool, made

    def _not_opened(self, allowed: float, *, shared: bool = False) -> PoolExhaustedError:
        owner = self.owner
        what = f"this user's pool of {owner!r}"
        return _not_opened(what, allowed, owner.retry_after, self.refusals.why(), shared=shared)

    async def _configure(self, conn: AsyncConnection[Any], conninfo: str) -> None:
        owner = self.owner
        pooled, _, role, deallocate = await _through_pooler(conn)
        first = owner._roles.setdefault(conninfo, role)
        await _starts_as_the_first(owner, conn, role, first, "restart the application")
        self.role = first
        if pooled:
            # The server session behind this connection changes hands between
            # transactions: a session-level setting would reach other users' queries.
            self.pooled = True
            self.deallocate = deallocate
            _warn_pooler(
                owner,
                conn,
                "its settings are set in every checkout's transaction, not once per session",
                deallocate,
            )
        elif owner._names:
            # A connection of this pool serves this user only: session settings are safe.
            # psycopg's own cursor class: the application's may bind $1, not %s.
            params = _values(self.user, owner)
            await AsyncCursor(conn).execute(owner._set_sql, params, prepare=False)
        if not conn.autocommit:
            await conn.commit()
        if self.initial is None:
            self.initial = _python_side(conn)
        owner._adapters.keep(conn)

    async def _reset(self, conn: AsyncConnection[Any]) -> None:
        # psycopg's pool calls this on every connection handed back idle: a handler's
        # set_autocommit(True) would otherwise commit the user's next request statement by
        # statement, its error's rollback undoing nothing.
        await _restore_python_side(conn, self.initial, self.owner._adapters)
        reset = self.owner._pool_options.get("reset")
        if reset is not None:
            await reset(conn)

    async def grow(self, deadline: float, *, wait: bool = False) -> bool:
        """Take one more slot when every connection this pool may hold is busy (waiting
        for room until ``deadline`` when ``wait``). Return whether the pool still lacks
        the room it wanted (none was free, and ``wait`` was not asked for)."""
        owner = self.owner
        pool = self.pool
        if pool is None or self.slots >= owner.max_size or self.active <= self.slots:
            return False
        if await owner._take_slot(self, deadline, wait=wait):
            if self.pool is not pool or self.slots >= owner.max_size or self.active <= self.slots:
                # Evicted or closed while we waited for room, or no longer short of it
                # (another checkout grew the pool, or a connection of it came back).
                owner._give_back(1)
                return False
            self.slots += 1
            # Shielded: resize waits for psycopg's pool lock, and a cancellation there would
            # leave this slot counted here (and taken from the budget) but never given to the
            # pool, which could then not grow to it until closed.
            with anyio.CancelScope(shield=True):
                await pool.resize(owner.min_size, self.slots)
            return False
        return True

    async def grow_when_room(self, deadline: float) -> None:
        """:meth:`grow`, waiting for room (another user's pool going idle, say) until
        ``deadline``; a deadline passed is no error here (the checkout's own wait says)."""
        with contextlib.suppress(PoolExhaustedError):
            await self.grow(deadline, wait=True)

    async def close_pool(self, *, evicted: bool = False, keep: int = 0) -> None:
        """Close the psycopg pool and give its room back to the budget (``keep`` of it
        goes to the caller)."""
        owner = self.owner
        owner._idle.pop(self, None)
        pool, self.pool = self.pool, None
        made, self.made = self.made, set()
        slots, self.slots = self.slots, 0
        if evicted:
            owner.evicted += 1
        try:
            if pool is not None:
                with anyio.CancelScope(shield=True):
                    await pool.close()
                    await self._close_left_open(made)
        finally:
            # After the connections are closed: their room may go to another pool at once.
            owner._give_back(slots, keep=keep)

    async def _close_left_open(self, made: set[AsyncConnection[Any]]) -> None:
        """Close what a closed pool that ``made`` these connections left open (shielded).

        psycopg's pool takes a connection back in a background task, and drops the task
        when the pool has closed meanwhile: nothing would close that connection (nor end
        its server session) but the garbage collector. A connection a checkout still
        holds is closed by the pool when the checkout hands it back.
        """
        left = [conn for conn in made if not conn.closed and conn not in self.lent]
        made.clear()
        with anyio.CancelScope(shield=True):
            for conn in left:
                await conn.close()

    async def aclose(self) -> None:
        """Close the pool (the USER component's cleanup)."""
        self.closed = True
        self.owner._pools.discard(self)
        await self.close_pool()


async def _getconn(
    pool: AsyncConnectionPool[AsyncConnection[Any]],
    user_pool: _UserPool,
    deadline: float,
    *,
    grow: bool,
) -> AsyncConnection[Any]:
    """A connection of ``pool`` by ``deadline``. When ``grow``, the pool wanted room that
    was not free: wait for a connection of its own or for that room, whichever comes
    first; once grown, ask again (psycopg's pool opens a connection for a new request, not
    for one already waiting)."""
    if grow:
        outcome: list[AsyncConnection[Any] | Exception] = []
        try:
            async with anyio.create_task_group() as tg:

                async def own() -> None:
                    try:
                        timeout = max(deadline - time.monotonic(), 0.0)
                        outcome.append(await pool.getconn(timeout=timeout))
                    except Exception as error:  # noqa: BLE001 - raised below, outside the group
                        outcome.append(error)
                    tg.cancel_scope.cancel()

                async def room() -> None:
                    before = user_pool.slots
                    await user_pool.grow_when_room(deadline)
                    if user_pool.slots > before:
                        tg.cancel_scope.cancel()

                tg.start_soon(own)
                tg.start_soon(room)
        except BaseException:
            # Cancelled from outside once the connection was ours: nobody would hand it back,
            # and the user's pool would be one connection short until it closed.
            if outcome and not isinstance(outcome[0], Exception):
                with anyio.CancelScope(shield=True):
                    await pool.putconn(outcome[0])
            raise
        if outcome:
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            return outcome[0]
    return await _getconn_uncancelled(pool, max(deadline - time.monotonic(), 0.0))


class _UserCheckout(_Checkout):
    __slots__ = (
        "_cancel",
        "_conn",
        "_owner",
        "_pool",
        "_server",
        "_settings",
        "_timeout",
        "_user_pool",
    )

    def __init__(self, owner: PerUserPools, timeout: float) -> None:
        super().__init__()
        self._owner = owner
        self._timeout = timeout
        self._conn: AsyncConnection[Any] | None = None
        # Behind a pooler: the values of the settings set in the checkout's transaction, and
        # its server side.
        self._settings: list[str] | None = None
        self._server: ServerSide | None = None

    async def _enter(self) -> AsyncConnection[Any]:
        self._settings = None
        self._server = None
        owner = self._owner
        deadline = time.monotonic() + self._timeout
        user_pool: _UserPool = await ambient.resolve(owner)
        owner._busy(user_pool)
        retries = owner.max_size
        while True:
            try:
                pool = await user_pool.ensure_pool(deadline, self._timeout)
                conn = await self._take(pool, user_pool, deadline)
            except BaseException:
                owner._done(user_pool)
                raise
            user_pool.lent.add(conn)
            if not user_pool.pooled or (conn.autocommit and not owner._names):
                # Connected directly, or with nothing to set in transactions that last one
                # statement each.
                break
            error = await self._set_local(conn, pool, user_pool)
            if error is None:
                break
            # The connection to the pooler ended while it sat idle in the pool (the pooler
            # restarted): nothing of the caller's ran on it, so take another (as many times
            # at most as the pool holds connections, all maybe ended).
            if not (retries and conn.closed and isinstance(error, psycopg.OperationalError)):
                owner._done(user_pool)
                raise error
            retries -= 1
        self._user_pool = user_pool
        self._pool = pool
        self._cancel = owner._cancellers.of(conn)
        self._conn = conn
        return conn

    async def _take(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        user_pool: _UserPool,
        deadline: float,
    ) -> AsyncConnection[Any]:
        owner = self._owner
        short = await user_pool.grow(deadline)
        try:
            return await _getconn(pool, user_pool, deadline, grow=short)
        except TooManyRequests as exc:
            raise _queue_full(
                f"this user's pool of {owner!r}", pool, owner.max_size, owner.retry_after, exc
            ) from None
        except PoolTimeout as exc:
            raise _exhausted(
                f"no connection of this user's pool of {owner!r} became available within "
                f"{self._timeout} s (max_size={owner.max_size}, "
                f"{owner._used}/{owner.max_total} server connections in use): {exc}",
                owner.retry_after,
                user_pool.refusals.why(),
            ) from None

    async def _set_local(
        self,
        conn: AsyncConnection[Any],
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        user_pool: _UserPool,
    ) -> BaseException | None:
        """Behind a pooler: the settings for this checkout's transaction (it starts here).
        When that fails, hand the connection back and return the error."""
        owner = self._owner
        error: BaseException
        if conn.autocommit:
            error = psycopg.ProgrammingError(
                f"{owner!r} connects through a connection pooler, where the settings last "
                "one transaction; with autocommit each statement is its own, so they would "
                "not cover the next. Leave autocommit off"
            )
        else:
            params = _values(user_pool.user, owner)
            try:
                # Read by position, whatever the connection's row factory, with psycopg's
                # own cursor class, whatever the connection's (AsyncRawCursor binds $1).
                cur = AsyncCursor(conn, row_factory=tuple_row)
                await cur.execute(owner._set_local_sql, params, prepare=False)
                row = await cur.fetchone()
            except BaseException as exc:  # noqa: BLE001 - the caller raises it
                error = exc
            else:
                self._settings = params[1::2]
                if row is not None:
                    self._server = (row[-2], row[-1])
                    # A server session of the pooler that started as another role since the
                    # first connection: rolled back and reset below before the block runs,
                    # as every checkout that meets such a session is.
                    refused = _begun_as_the_first(
                        owner, row[-3], user_pool.role, "restart the application"
                    )
                    if refused is None:
                        return None
                    error = refused
                else:
                    return None
        try:
            await _release(
                owner,
                pool,
                conn,
                owner._cancellers.of(conn),
                error,
                pooled=True,
                deallocate=user_pool.deallocate,
            )
        finally:
            user_pool.lent.discard(conn)
        return error

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        conn = self._conn
        if conn is None:
            self._entered = False
            return False
        self._conn = None
        try:
            error = await _release(
                self._owner,
                self._pool,
                conn,
                self._cancel,
                exc,
                pooled=self._user_pool.pooled,
                deallocate=self._user_pool.deallocate,
                settings=self._settings,
                server=self._server,
            )
        finally:
            self._user_pool.lent.discard(conn)
            self._owner._done(self._user_pool)
            self._entered = False
        if error is not None:
            raise error
        return False
