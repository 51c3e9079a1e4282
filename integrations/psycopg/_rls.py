"""The row-level-security self-check, :func:`check_rls`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import tuple_row
from psycopg.types.numeric import Oid

from ambient.errors import RowSecurityError, RowSecurityWarning
from ambient.integrations.psycopg._common import _IDLE

_ROLE_SQL = (
    "SELECT current_user, r.rolsuper, r.rolbypassrls "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
)
_TABLE = (
    "SELECT c.oid, c.relrowsecurity, c.relforcerowsecurity, "
    "pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') "
    "FROM pg_catalog.pg_class c WHERE c.oid = "
)
_TABLE_SQL = f"{_TABLE}pg_catalog.to_regclass(%s)"
_TABLE_BY_OID_SQL = f"{_TABLE}%s"
# A name qualified with a schema this role has no USAGE on, and the table it means there
# (NULL: none), read from the catalogs, which every role may read. to_regclass() raises
# "permission denied for schema" for such a name (even inside a CASE that would not reach
# it: the planner may evaluate it), though the table's policies matter all the same: views
# over it, and its partitions, may be elsewhere. No row for any other name (one without a
# schema is looked up on the search path, which skips the schemas the role may not use).
_UNUSABLE_SCHEMA_SQL = """
SELECT t.oid FROM pg_catalog.parse_ident(%s) p(n)
JOIN pg_catalog.pg_namespace s ON s.nspname = p.n[pg_catalog.cardinality(p.n) - 1]
LEFT JOIN pg_catalog.pg_class t
  ON t.relnamespace = s.oid AND t.relname = p.n[pg_catalog.cardinality(p.n)]
WHERE pg_catalog.cardinality(p.n) IN (2, 3)
  AND (pg_catalog.cardinality(p.n) = 2 OR p.n[1] = pg_catalog.current_database())
  AND NOT pg_catalog.has_schema_privilege(s.oid, 'USAGE')
"""

# Views and materialized views over a protected table, directly or through other views,
# that this role can read (in a schema it may use), and that show rows the table's policies
# did not filter: a materialized view always (its rows were stored by whoever refreshed
# it), a view over the table unless it is security_invoker (PostgreSQL 15+) or its owner is
# itself subject to the policies, and any view over one of those (which the role may read
# though it cannot read that one); views over a partition or child of the table too, which
# a query reads with the partition's own row-level security, if any, not the table's. With
# the first of those in the chain (NULL: the view itself) and its kind, and the partition or
# child a view reads (NULL: the table).
_VIEW_SQL = """
WITH RECURSIVE below(oid, child) AS (
  SELECT %s::pg_catalog.oid, false
  UNION
  SELECT i.inhrelid, true FROM pg_catalog.pg_inherits i JOIN below b ON i.inhparent = b.oid
), over(oid, relkind, skips, source, via) AS (
  SELECT v.oid, v.relkind,
    v.relkind = 'm' OR (
      NOT COALESCE((
        SELECT x.option_value::boolean
        FROM pg_catalog.pg_options_to_table(v.reloptions) x
        WHERE x.option_name = 'security_invoker'
      ), false)
      AND (
        o.rolsuper OR o.rolbypassrls
        OR (pg_catalog.pg_has_role(o.oid, t.relowner, 'USAGE') AND NOT t.relforcerowsecurity)
        OR (b.child AND NOT t.relrowsecurity)
      )
    ),
    NULL::pg_catalog.oid,
    CASE WHEN b.child THEN t.oid END
  FROM below b
  JOIN pg_catalog.pg_depend d ON d.refobjid = b.oid
  JOIN pg_catalog.pg_rewrite w ON w.oid = d.objid
  JOIN pg_catalog.pg_class v ON v.oid = w.ev_class
  JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
  JOIN pg_catalog.pg_roles o ON o.oid = v.relowner
  WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
    AND v.oid <> t.oid
    AND v.relkind IN ('v', 'm')
  UNION
  SELECT v.oid, v.relkind, u.skips OR v.relkind = 'm',
    CASE WHEN u.skips THEN COALESCE(u.source, u.oid) END, u.via
  FROM over u
  JOIN pg_catalog.pg_depend d ON d.refobjid = u.oid
  JOIN pg_catalog.pg_rewrite w ON w.oid = d.objid
  JOIN pg_catalog.pg_class v ON v.oid = w.ev_class
  WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
    AND v.oid <> u.oid
    AND v.relkind IN ('v', 'm')
)
SELECT DISTINCT ON (1) u.oid::pg_catalog.regclass::text, u.relkind,
  u.source::pg_catalog.regclass::text, u.via::pg_catalog.regclass::text,
  (SELECT s.relkind FROM pg_catalog.pg_class s WHERE s.oid = u.source)
FROM over u
JOIN pg_catalog.pg_class v ON v.oid = u.oid
WHERE u.skips AND pg_catalog.has_table_privilege(u.oid, 'SELECT')
  AND pg_catalog.has_schema_privilege(v.relnamespace, 'USAGE')
ORDER BY 1, 3 NULLS FIRST, 4 NULLS FIRST
"""

# Partitions and inheritance children of a protected table, at any depth, that this role can
# read or write (in a schema it may use) and whose own row-level security does not apply to
# it: a policy applies to the table a query names, so querying one of them directly skips
# the parent's policies.
_CHILD_SQL = """
WITH RECURSIVE below(oid) AS (
  SELECT i.inhrelid FROM pg_catalog.pg_inherits i
  WHERE i.inhparent = %s
  UNION
  SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN below b ON i.inhparent = b.oid
)
SELECT c.oid::pg_catalog.regclass::text
FROM below b
JOIN pg_catalog.pg_class c ON c.oid = b.oid
WHERE pg_catalog.has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')
  AND pg_catalog.has_schema_privilege(c.relnamespace, 'USAGE')
  AND (
    NOT c.relrowsecurity
    OR (pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)
  )
ORDER BY 1
"""

# What the queries looking a table name up raise for a name that can name no table here:
# one with a NUL byte (DataError, before it is sent), one that is no identifier or is empty
# (InvalidParameterValue, InvalidName), one with more than three parts (SyntaxError), one
# in another database (FeatureNotSupported).
_MALFORMED_NAME = (
    psycopg.DataError,
    psycopg.errors.InvalidName,
    psycopg.errors.SyntaxError,
    psycopg.errors.FeatureNotSupported,
)


def _names(argument: str, names: Iterable[str]) -> list[str]:
    """``names`` as a list, refused when it is one name (a str would be checked letter
    by letter) or holds something other than a str (which no query could name)."""
    if isinstance(names, (str, bytes)):
        msg = f"{argument} must be a list of names, not one {type(names).__name__} ({names!r:.64})"
        raise TypeError(msg)
    listed = list(names)
    for name in listed:
        if not isinstance(name, str):
            msg = f"{argument} must hold names as str, not {name!r:.64}"
            raise TypeError(msg)
    return listed


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
    start as somebody; a view over a protected table that this role can read, and that
    reads it with the rights of an owner who bypasses its policies (not
    ``security_invoker``), or a materialized view over one, shows every user's rows, and so
    does a view this role can read over such a view (even one it cannot read); so does a
    partition or child table of a protected table, queried directly or through such a view,
    unless row-level security applies to it too (a policy applies to the table a query
    names). So is a table that does not exist, a name that can name no table of this
    database (malformed, or naming another database), a setting name with a NUL byte, and
    a table or setting name the connection cannot send (a lone surrogate, a character its
    client encoding lacks).
    Each of these is a problem. A table in a schema the role has no USAGE on is checked
    all the same (views over it and its partitions may be elsewhere); views and partitions
    in such a schema, which the role cannot reach, are no problem.

    Args:
        conn: A fresh connection, opened the way the application opens its own. A
            transaction it is in is left open as it is; one the check begins is rolled back,
            even when one of its queries fails.
        tables: The protected tables (``"schema.table"`` or a name on the search path).
        settings: Settings that must start empty (``"app.user_id"``, ...).
        action: ``"raise"`` :class:`RowSecurityError`, or ``"warn"``
            :class:`RowSecurityWarning`, when there are problems.

    Returns:
        The problems found (empty when row-level security applies), after warning.

    Raises:
        RowSecurityError: with ``action="raise"`` when there are problems.
        TypeError: ``tables`` or ``settings`` is one str, or holds something other than a
            str.
    """
    if action not in ("raise", "warn"):
        msg = f"action must be 'raise' or 'warn', not {action!r}"
        raise ValueError(msg)
    tables = _names("tables", tables)
    settings = _names("settings", settings)
    problems: list[str] = []
    # A transaction the caller had open is the caller's (its writes, its transaction block);
    # only one these queries began is ended here.
    began = conn.pgconn.transaction_status == _IDLE
    try:
        await _find_problems(conn, tables, settings, problems)
    except Exception:
        # One of these queries failed (a lost connection, a name no text encoding holds): a
        # transaction it began would fail the caller's next statement
        # (InFailedSqlTransaction); the error raised is the query's, not the rollback's.
        if began and not conn.closed and conn.pgconn.transaction_status != _IDLE:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
        raise
    if began and conn.pgconn.transaction_status != _IDLE:
        await conn.rollback()
    if problems:
        if action == "raise":
            raise RowSecurityError(problems)
        warnings.warn(RowSecurityError(problems).args[0], RowSecurityWarning, stacklevel=2)
    return problems


async def _find_problems(
    conn: AsyncConnection[Any], tables: Iterable[str], settings: Iterable[str], problems: list[str]
) -> None:
    """The queries of :func:`check_rls`: append what they find to ``problems``."""
    # Rows by position, whatever row factory the application made the connection with, and
    # %s placeholders, whatever cursor class (AsyncRawCursor binds $1).
    async with AsyncCursor(conn, row_factory=tuple_row) as cur:
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
            try:
                # In a savepoint: a name the server cannot parse fails the query, and the
                # tables after it are checked all the same.
                async with conn.transaction():
                    await cur.execute(_UNUSABLE_SCHEMA_SQL, (table,), prepare=False)
                    unusable = await cur.fetchone()
                    if unusable is None:
                        await cur.execute(_TABLE_SQL, (table,), prepare=False)
                    else:
                        oid_arg = (Oid(unusable[0] or 0),)
                        await cur.execute(_TABLE_BY_OID_SQL, oid_arg, prepare=False)
                    info = await cur.fetchone()
            except _MALFORMED_NAME as exc:
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                problems.append(
                    f"table name {table!r} names no table of this database ({reason}): "
                    "name a table as table, schema.table or database.schema.table, in "
                    'double quotes a part that is not lower case, as in SQL ("My Table")'
                )
                continue
            except UnicodeEncodeError as exc:
                problems.append(_unsendable("table name", table, exc))
                continue
            if info is None:
                problems.append(f"table {table!r} does not exist (or is not visible)")
                continue
            oid, enabled, forced, owns = info
            table_oid = Oid(oid)
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
            await cur.execute(_CHILD_SQL, (table_oid,), prepare=False)
            for (child,) in await cur.fetchall():
                problems.append(
                    f"table {child!r} is a partition or child of {table!r}, and role {role!r} "
                    "can query it directly, which skips the policies of "
                    f"{table!r}: ALTER TABLE {child} ENABLE ROW LEVEL SECURITY (and FORCE, "
                    "for its owner) with policies of its own, or revoke that privilege"
                )
            await cur.execute(_VIEW_SQL, (table_oid,), prepare=False)
            problems += [_view_problem(table, role, *found) for found in await cur.fetchall()]
        await _find_preset_settings(cur, settings, role, problems)


async def _find_preset_settings(
    cur: AsyncCursor[tuple[Any, ...]], settings: Iterable[str], role: str, problems: list[str]
) -> None:
    """The settings part of :func:`_find_problems`: one that starts with a value."""
    for name in settings:
        try:
            await cur.execute("SELECT pg_catalog.current_setting(%s, true)", (name,), prepare=False)
        except UnicodeEncodeError as exc:
            problems.append(_unsendable("setting name", name, exc))
            continue
        except psycopg.DataError as exc:  # a NUL byte, refused before it is sent
            problems.append(f"setting name {name!r} names no setting ({exc})")
            continue
        preset = await cur.fetchone()
        if preset is not None and preset[0]:
            problems.append(
                f"setting {name!r} is preset for this role or database, so every session "
                f"starts with a value in it: ALTER ROLE {role} RESET {name} (or ALTER "
                "DATABASE)"
            )


def _unsendable(what: str, name: str, exc: UnicodeEncodeError) -> str:
    """The problem of a name this connection cannot send (a lone surrogate, or a character
    its client encoding lacks): nothing on the server could be checked for it."""
    return (
        f"{what} {name!r} cannot be sent in this connection's client encoding "
        f"{exc.encoding!r} ({exc.reason} at {exc.start}), so nothing was checked for it: "
        "name it in characters that encoding holds (UTF8 holds all but lone surrogates)"
    )


def _view_problem(
    table: str,
    role: str,
    view: str,
    kind: str,
    source: str | None,
    via: str | None,
    source_kind: str | None,
) -> str:
    """What is wrong with a view (a row of :data:`_VIEW_SQL`) that shows ``table``'s rows
    to ``role`` without its policies, and what to do about it."""
    if kind == "m":
        return (
            f"materialized view {view!r} holds rows of {table!r} that no policy "
            f"filters, and role {role!r} can read it: revoke that privilege"
        )
    if source_kind == "m":
        return (
            f"view {view!r} shows the rows of {table!r} that materialized view "
            f"{source!r} holds, which no policy filters, and role {role!r} can "
            "read it: revoke that privilege"
        )
    if source is not None:
        return (
            f"view {view!r} shows the rows of {table!r} that {source!r} reads "
            f"without its policies, and role {role!r} can read it: ALTER VIEW "
            f"{source} SET (security_invoker = true) (PostgreSQL 15+), or revoke "
            "that privilege"
        )
    if via is not None:
        return (
            f"view {view!r} reads {via!r}, a partition or child of {table!r}, "
            f"with the rights of its owner, which skips the policies of {table!r}, "
            f"and role {role!r} can read it: ALTER VIEW {view} SET "
            "(security_invoker = true) (PostgreSQL 15+), or revoke that privilege"
        )
    return (
        f"view {view!r} reads {table!r} with the rights of its owner, who "
        f"bypasses the table's policies, and role {role!r} can read it: "
        f"ALTER VIEW {view} SET (security_invoker = true) (PostgreSQL 15+), "
        "or revoke that privilege"
    )
