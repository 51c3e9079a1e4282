"""The default :class:`Database` a strategy installs, and the module-level :func:`connection`."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from psycopg import AsyncConnection

import ambient
from ambient.integrations.psycopg._common import _Checkout

if TYPE_CHECKING:
    from types import TracebackType


class Database(Protocol):
    """What :func:`connection` resolves: the strategy installed with ``default=True``."""

    def connection(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """An async context manager giving a connection for the current context."""
        ...


class _DefaultCheckout(_Checkout):
    __slots__ = ("_inner", "_timeout")

    def __init__(self, timeout: float | None) -> None:
        super().__init__()
        self._timeout = timeout
        self._inner: AbstractAsyncContextManager[AsyncConnection[Any]] | None = None

    async def _enter(self) -> AsyncConnection[Any]:
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
            self._entered = False
            return False
        try:
            return bool(await inner.__aexit__(exc_type, exc, tb))
        finally:
            self._entered = False


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
        ValueError: a ``timeout`` of NaN (as the block starts).
        TypeError: a ``timeout`` that is not a number (as the block starts).
    """
    return _DefaultCheckout(timeout)
