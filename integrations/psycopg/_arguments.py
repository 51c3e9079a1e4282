"""The arguments both strategies take, checked, and the settings they send."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ambient import UserExecutionContext, UserRef
from ambient._checks import number, whole

if TYPE_CHECKING:
    from ambient.integrations.psycopg._per_user import PerUserPools
    from ambient.integrations.psycopg._shared import SharedPool


DEFAULT_SETTINGS: Mapping[str, str] = {"app.user_id": "user_id", "app.tenant_id": "tenant_id"}
"""GUC name -> context field set for row-level security by default."""

RlsCheck = Literal["raise", "warn", "off"]
_CONTEXT_FIELDS = frozenset(
    {"user_id", "tenant_id", "thread_id", "run_id", "request_id", "connection_id", "parent_run_id"}
)
_USER_FIELDS = frozenset({"user_id", "tenant_id"})
# Custom settings need a dotted name, each part as PostgreSQL takes it: a letter, "_" or any
# non-ASCII character first (it takes every byte above 0x7F as a letter), then digits and
# "$" too; never a lone surrogate, which no encoding sends. set_config() takes the name as
# a value anyway (bound, or quoted by psycopg), never as SQL text.
_PART = "[A-Za-z_\u0080-\ud7ff\ue000-\U0010ffff][A-Za-z0-9_$\u0080-\ud7ff\ue000-\U0010ffff]*"
_GUC_NAME = re.compile(rf"{_PART}(\.{_PART})+")


def _same_setting(name: str) -> str:
    """``name`` as PostgreSQL compares setting names: ASCII letters in either case alike
    (``App.User_Id`` is ``app.user_id``), any other character as it is."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check_settings(settings: Mapping[str, str], allowed: frozenset[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for name, field_name in settings.items():
        if not isinstance(name, str) or not _GUC_NAME.fullmatch(name):
            msg = f"setting name {name!r} must be a dotted custom setting name like 'app.user_id'"
            raise ValueError(msg)
        # Two spellings of one setting: the later set_config() would overwrite the earlier
        # one's field, and a policy reading it would see the wrong id.
        earlier = seen.setdefault(_same_setting(name), name)
        if earlier != name:
            msg = (
                f"settings {earlier!r} and {name!r} are one setting (PostgreSQL ignores the "
                "case of ASCII letters in setting names); give each setting once"
            )
            raise ValueError(msg)
        if field_name not in allowed:
            msg = (
                f"setting {name!r} names the context field {field_name!r}; choose one of "
                f"{', '.join(sorted(allowed))}"
            )
            raise ValueError(msg)
    return tuple(settings)


# A connection limit the strategy does not take (None is a value a caller may pass).
_ABSENT = object()


def _check_limit(name: str, value: object, least: int, says: str) -> None:
    """A limit on connections: a number (``inf``: none), at least ``least``. None or NaN
    would be taken here and fail every checkout (a TypeError, or a wait for a share or room
    that a NaN limit never grants)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number of connections, not {value!r}"
        raise TypeError(msg)
    if math.isnan(value) or value < least:
        msg = f"{name} must be >= {says}, not {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class _Arguments:
    """The arguments both strategies take, checked, and the settings as they are sent."""

    names: tuple[str, ...]  # setting names, in the order of ``settings``
    fields: tuple[str, ...]  # the context field of each
    set_sql: str  # ``SELECT set_config(%s, %s, local), ...`` for all of them ('' for none)

    @classmethod
    def validated(
        cls,
        *,
        min_size: int,
        max_size: int,
        per_user_limit: object = _ABSENT,
        max_total: object = _ABSENT,
        idle_ttl: object = _ABSENT,
        timeout: float,
        return_timeout: float,
        retry_after: float,
        rls_check: str,
        settings: Mapping[str, str],
        fields: frozenset[str],
        local: bool,
    ) -> _Arguments:
        """Raise ``ValueError`` naming the first bad argument (``_ABSENT`` for a connection
        limit or ``idle_ttl``: the strategy has no such argument), ``TypeError`` for one
        that is no number (an ``idle_ttl`` of ``None`` too: the registry would read it as
        its default, 300 s); ``fields`` are the context fields ``settings`` may name."""
        whole(min_size, "min_size", "connections")
        whole(max_size, "max_size", "connections")
        if not 0 <= min_size <= max_size or max_size < 1:
            msg = f"need 0 <= min_size <= max_size and max_size >= 1, not {min_size}, {max_size}"
            raise ValueError(msg)
        if per_user_limit is not _ABSENT:
            _check_limit("per_user_limit", per_user_limit, 1, "1")
        if max_total is not _ABSENT:
            _check_limit("max_total", max_total, max(1, min_size), "max(1, min_size)")
        if idle_ttl is not _ABSENT and not number(idle_ttl, "idle_ttl") >= 0:
            msg = f"idle_ttl must be >= 0 seconds, not {idle_ttl!r}"
            raise ValueError(msg)
        if not number(timeout, "timeout") > 0:
            msg = f"timeout must be > 0 seconds, not {timeout!r}"
            raise ValueError(msg)
        if not number(return_timeout, "return_timeout") > 0:
            msg = f"return_timeout must be > 0 seconds, not {return_timeout!r}"
            raise ValueError(msg)
        if not 0 < number(retry_after, "retry_after") < math.inf:
            msg = f"retry_after must be > 0 seconds and finite, not {retry_after!r}"
            raise ValueError(msg)
        if rls_check not in ("raise", "warn", "off"):
            msg = f"rls_check must be 'raise', 'warn' or 'off', not {rls_check!r}"
            raise ValueError(msg)
        names = _check_settings(settings, fields)
        return cls(names, tuple(settings.values()), _set_config_sql(len(names), local=local))


def _checkout_timeout(timeout: float | None, default: float) -> float:
    """The seconds a checkout may wait: ``timeout``, or ``default`` for ``None``. A number
    of seconds (zero or less: no wait), never NaN, which no deadline can be made of."""
    if timeout is None:
        return default
    seconds = number(timeout, "timeout")
    if math.isnan(seconds):
        msg = "timeout must be a number of seconds, not nan"
        raise ValueError(msg)
    return seconds


def _set_config_sql(count: int, *, local: bool) -> str:
    """``SELECT pg_catalog.set_config(%s, %s, local), ...`` for ``count`` settings ('' for
    none), qualified: a schema ahead of pg_catalog in the search_path cannot shadow it."""
    flag = "true" if local else "false"
    calls = ", ".join(f"pg_catalog.set_config(%s, %s, {flag})" for _ in range(count))
    return f"SELECT {calls}" if count else ""


def _values(source: UserExecutionContext | UserRef, owner: SharedPool | PerUserPools) -> list[str]:
    """The parameters of ``owner``'s settings statement: each setting's name and ``source``'s
    value."""
    params: list[str] = []
    for name, field_name in zip(owner._names, owner._fields, strict=True):
        value = getattr(source, field_name)
        params += (name, "" if value is None else value)
    return params
