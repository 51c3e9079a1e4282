"""Per-user PostgreSQL access with psycopg 3 and psycopg_pool (extra ``psycopg``).

Two strategies, each installed into a :class:`~ambient.Registry`; code running for a user
gets a connection with ``async with db.connection() as conn:`` (or the module-level
:func:`connection`) and can never see another user's session state or rows:

* :class:`SharedPool`: one pool for everybody, with a per-user concurrency cap. Every
  checkout is one explicit transaction in which the context fields named by ``settings``
  are set with ``set_config(name, value, true)`` (values quoted by psycopg), so row-level-security
  policies on ``current_setting('app.user_id', true)`` see them. It is committed when the
  ``async with`` body ends normally and rolled back when it raises (or when it ends
  normally in a failed transaction, which then raises
  ``psycopg.errors.InFailedSqlTransaction``). A returned connection
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

With tenants, a user id names a user only within its tenant: add
``AND tenant IS NOT DISTINCT FROM NULLIF(current_setting('app.tenant_id', true), '')`` to
both, or the same user id in two tenants shares its rows.
"""

from ambient.errors import (
    PoolExhaustedError,
    RowSecurityError,
    RowSecurityWarning,
    UnsupportedBackendError,
)
from ambient.integrations.psycopg._arguments import DEFAULT_SETTINGS
from ambient.integrations.psycopg._arguments import RlsCheck as RlsCheck
from ambient.integrations.psycopg._database import Database, connection
from ambient.integrations.psycopg._per_user import PerUserPools, PerUserPoolsStats
from ambient.integrations.psycopg._rls import check_rls
from ambient.integrations.psycopg._shared import SharedPool, SharedPoolStats

__all__ = [
    "DEFAULT_SETTINGS",
    "Database",
    "PerUserPools",
    "PerUserPoolsStats",
    "PoolExhaustedError",
    "RowSecurityError",
    "RowSecurityWarning",
    "SharedPool",
    "SharedPoolStats",
    "UnsupportedBackendError",
    "check_rls",
    "connection",
]
