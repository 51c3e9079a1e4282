"""The row-level-security self-check, :func:`check_rls`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

from psycopg import AsyncConnection

from ambient.errors import RowSecurityError, RowSecurityWarning
from ambient.integrations.psycopg._common import _IDLE

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
