""":class:`PerUserPools`: a pool per user, under one budget of server connections."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ambient import Lifetime, Registry, UserRef, _loops
from ambient.integrations.psycopg._adapters import _AdaptersAsMade
from ambient.integrations.psycopg._arguments import (
    _USER_FIELDS,
    DEFAULT_SETTINGS,
    RlsCheck,
    _Arguments,
    _checkout_timeout,
    _set_config_sql,
)
from ambient.integrations.psycopg._common import (
    _ASYNCIO_ONLY,
    _BEGUN_SIDE,
    _Cancellers,
    _checked_pool_options,
    _exhausted,
)
from ambient.integrations.psycopg._database import Database
from ambient.integrations.psycopg._refusals import _RefusalLog
from ambient.integrations.psycopg._rls import _names, check_rls
from ambient.integrations.psycopg._user_pool import _UserCheckout, _UserPool


@dataclass(frozen=True, slots=True)
class PerUserPoolsStats:
    """A snapshot of a :class:`PerUserPools`.

    Attributes:
        pools: Open user pools.
        idle_pools: Open user pools with no checkout (the first to close under pressure).
        slots: Connections the open pools may hold together (never above ``max_total``);
            every open server connection counts, idle ones included.
        max_total: The global cap (``math.inf``: none).
        waiting: Checkouts waiting for room under the cap.
        checked_out: Checkouts in progress.
        evicted: Idle pools closed to make room.
    """

    pools: int
    idle_pools: int
    slots: int
    max_total: float
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
    Connected directly, what a handler leaves in its server session (``SET ROLE``, a session
    setting, a temporary table) stays for that same user's later checkouts of the
    connection, as in psycopg's own pool, and never reaches another user's. Undo it in the
    handler (``RESET ROLE``, ``SET LOCAL`` rather than ``SET``), not with ``RESET ALL`` in a
    ``reset`` of ``pool_options``, which would drop the ``settings`` too; or use
    :class:`SharedPool`, which resets every session it hands back.
    A connection that reaches PostgreSQL through a connection pooler (pgbouncer, whose
    transaction pooling hands one server session to many clients in turn) is recognised
    when it connects (the pooler's cancel key is not the server's): its settings are then
    never set for the session, but at the start of every checkout, for its transaction
    only, and autocommit is refused there (one statement's transaction would lose them);
    a checkout whose transaction begins as another role than the strategy's first
    connection started as (a server session the pooler opened after an ``ALTER ROLE ...
    SET role``) is rolled back before its block runs and raises
    ``psycopg.OperationalError``;
    what a handler leaves in the server session (``SET ROLE``, session settings, advisory
    locks, temporary tables, ``LISTEN``, ``random()``'s seed) is reset in the same message
    as the checkout's COMMIT or ROLLBACK, before the pooler can hand the session to another
    client; a handler that ends the checkout's transaction itself there (``conn.commit()``) gets
    ``psycopg.ProgrammingError`` when its block ends, since what ran after it ran without
    the settings (the transaction open as the block ends is rolled back, not committed;
    the server session the pooler gives the checkout then is reset, most likely the one
    the handler left, though the pooler may have handed that on before).
    A checkout follows psycopg's rules: committed when the ``async with`` body ends
    normally, rolled back when it raises. One that ends normally in a failed transaction
    (a statement's error caught inside it) is rolled back and raises
    ``psycopg.errors.InFailedSqlTransaction``, where psycopg's commit would roll back
    silently. What a handler changed on the Python side of its connection (``autocommit``,
    ``isolation_level``, ``read_only``, ``deferrable``, ``row_factory``,
    ``cursor_factory``, ``server_cursor_factory``, ``prepare_threshold``, a loader, dumper
    or type registered on its ``adapters``) is put back before the user's next checkout.

    Args:
        conninfo: libpq connection string, or a callable taking the
            :class:`~ambient.UserRef` and returning one (a role per user).
        max_size: Connections one user's pool may hold.
        min_size: Connections a user's pool keeps open once created.
        max_total: Server connections all user pools may hold together (``math.inf``:
            no cap).
        idle_ttl: Seconds after a user's last request before the user's pool closes.
        timeout: Seconds a checkout may wait.
        return_timeout: Seconds at most to end a checkout's transaction and hand its
            connection back (commit or rollback, the server-side cancel of an
            interrupted query). Handing back is shielded from cancellation, so this is
            what ends it when the server stops answering: the connection is then closed
            instead of reused, a COMMIT cut off this way raises
            ``psycopg.OperationalError`` (it may or may not have taken effect), and what
            the server still runs of it is cancelled there in the background.
        retry_after: Seconds for the ``Retry-After`` of the 503 answer.
        settings: Setting name -> ``"user_id"`` or ``"tenant_id"``.
        rls_tables: Tables checked by :func:`check_rls` when a pool first connects.
        rls_check: ``"warn"`` (default), ``"raise"`` or ``"off"``.
        name: Prefix of the pools' names in psycopg's logs (never the user id).
        kwargs: Extra ``psycopg.AsyncConnection.connect`` arguments.
        pool_options: Extra ``AsyncConnectionPool`` keyword arguments (``max_idle``,
            ``max_lifetime``, ``num_workers``, ...), checked here.
            ``check=AsyncConnectionPool.check_connection`` tests each connection before a
            checkout gets it (one round trip), so that one whose server session ended while
            it sat idle (a server restart) is replaced instead of failing the block's first
            statement (which, connected directly, is the block's own).

    Raises:
        UnsupportedBackendError: when constructed inside trio.
        TypeError: a pool option ``AsyncConnectionPool`` does not take, or one ambient sets;
            a ``max_total`` that is no number (``None``).
    """

    def __init__(
        self,
        conninfo: str | Callable[[UserRef], str],
        *,
        max_size: int = 5,
        min_size: int = 0,
        max_total: float = 100,
        idle_ttl: float = 300.0,
        timeout: float = 30.0,
        return_timeout: float = 10.0,
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
            return_timeout=return_timeout,
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
        self.return_timeout = return_timeout
        self.retry_after = retry_after
        self.rls_tables = tuple(_names("rls_tables", rls_tables))
        self.rls_check: RlsCheck = rls_check
        self.name = name
        self._names = checked.names
        self._fields = checked.fields
        self._set_sql = checked.set_sql
        # Behind a connection pooler the settings are set in every transaction instead.
        # With the server side of the transaction, to cancel its query with SQL when the
        # cancel request cannot get through the pooler, and the role it runs as, to refuse
        # a server session that started as another than the first connection did: read
        # with no settings too, where that role would bypass policies all the same.
        self._set_local_sql = (
            f"{_set_config_sql(len(self._names), local=True)}, {_BEGUN_SIDE}"
            if self._names
            else f"SELECT {_BEGUN_SIDE}"
        )
        self._pooler_seen = False
        # The server's refusal of a connection logged last, for every user's pool (once
        # while it lasts).
        self._refusal_log = _RefusalLog()
        self._kwargs = dict(kwargs or {})
        self._pool_options = _checked_pool_options(pool_options)
        self._checked_conninfo: set[str] = set()
        # The global budget: slots held by open (or closing) pools, LRU idle pools, waiters.
        self._used = 0
        self._idle: OrderedDict[_UserPool, None] = OrderedDict()
        self._pools: set[_UserPool] = set()
        self._waiters: deque[anyio.Event] = deque()
        # Waiters woken (their event set) that have not run yet: the room or idle pool that
        # woke them is theirs, not a busy user's that asks for more in between.
        self._handed = 0
        self.checked_out = 0
        self.evicted = 0
        self._cancellers = _Cancellers()
        self._adapters = _AdaptersAsMade()
        # Per connection string (a callable conninfo may log each user in as a role of its
        # own), the role its first session started as (the one check_rls checked): every
        # later one with that string must start as it too.
        self._roles: dict[str, str] = {}

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
            idle_ttl=float(self.idle_ttl),  # the registry takes an int or a float only
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
            PoolExhaustedError: no connection within the timeout (when the server refuses
                new connections, the message ends with what it answered the last one).
            ValueError: a ``timeout`` of NaN.
            TypeError: a ``timeout`` that is not a number.
        """
        return _UserCheckout(self, _checkout_timeout(timeout, self.timeout))

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
            self._handed += 1
            count -= 1

    async def _take_slot(self, user_pool: _UserPool, deadline: float, *, wait: bool) -> bool:
        """Take one connection slot for ``user_pool``: free room, else close the least
        recently used idle pool, else wait until ``deadline`` (or give up when not
        ``wait``)."""
        if not wait and (self._waiters or self._handed):
            return False  # room freed up belongs to checkouts that have no connection at all
        woken = False
        while True:
            # Not yet woken: behind the checkouts in line, and leaving the room and idle
            # pools handed to those woken to them (they have not run yet).
            if woken or not self._spoken_for():
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
                    self._handed -= 1
                    self._wake(1)  # we were handed room or an idle pool: pass it on
                else:
                    self._waiters.remove(event)
                raise
            if event.is_set():
                self._handed -= 1
                woken = True
            else:
                self._waiters.remove(event)

    def _spoken_for(self) -> bool:
        """Whether checkouts wait in line, or those woken and not yet run may need all the
        free room and idle pools there are (none there: nothing to take either)."""
        free = self.max_total - self._used + len(self._idle)
        return bool(self._waiters) or self._handed >= free

    def _give_back(self, slots: int, *, keep: int = 0) -> None:
        self._used -= slots - keep
        self._wake(slots - keep)

    async def _check_rls_once(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]], deadline: float
    ) -> None:
        conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
        if self.rls_check == "off" or conninfo in self._checked_conninfo:
            return
        async with pool.connection(timeout=max(deadline - time.monotonic(), 0.0)) as conn:
            await check_rls(conn, self.rls_tables, action=self.rls_check)
        self._checked_conninfo.add(conninfo)
