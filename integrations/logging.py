"""Correlate log records with the current context and trace: stdlib logging and structlog.

:class:`ContextFilter` (a :class:`logging.Filter`) and :data:`add_context` (a structlog
processor) add ``user_id``, ``tenant_id``, ``thread_id``, ``run_id``, ``request_id``,
``trace_id`` and ``span_id`` to every record: the ids of the context bound where the record
is made, and the current OpenTelemetry span (the ``ambient.scope`` span inside a traced
scope). Outside a context (or a span) the fields are empty strings; neither ever raises.

The user id is hashed by default exactly as :class:`~ambient.telemetry.Telemetry` hashes it
(same default key per process; pass the same ``hash_key`` to both otherwise), so a log line
and a span of one request carry the same pseudonym. structlog itself is never imported: the
processor is a plain callable.

Example::

    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(user_id)s %(trace_id)s %(message)s"))

    structlog.configure(processors=[add_context, structlog.processors.JSONRenderer()])
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import MutableMapping
from typing import Any, Final

from opentelemetry import trace as otel_trace

from ambient import UserExecutionContext, current_context_or_none
from ambient.telemetry import IdPolicy, _IdExport

__all__ = ["FIELDS", "ContextFilter", "ContextProcessor", "add_context", "context_fields"]

FIELDS: Final = (
    "user_id",
    "tenant_id",
    "thread_id",
    "run_id",
    "request_id",
    "trace_id",
    "span_id",
)
"""The names added to every record."""

_EMPTY: Final = dict.fromkeys(FIELDS, "")
_DISCLOSES: Final = {"raw": 2, "hash": 1, "omit": 0}
# By record: how much of the ids the fields a ContextFilter added give away, which it added,
# and the context they came from (a later filter writing an id again may run elsewhere: a
# MemoryHandler flushes in whichever context logs last). Kept beside the record, not on it:
# formatters that print every attribute of a record would print it.
_written: Final[
    weakref.WeakKeyDictionary[
        logging.LogRecord, tuple[tuple[int, int], list[str], UserExecutionContext | None]
    ]
] = weakref.WeakKeyDictionary()


class _Fields:
    """Builds the correlation fields under one id policy."""

    __slots__ = ("_ids", "policy")

    def __init__(self, user_id: IdPolicy, tenant_id: IdPolicy, hash_key: bytes | str | None):
        self._ids = _IdExport(user_id, tenant_id, hash_key)
        # How much of each id the fields give away: raw > hash > omit.
        self.policy = (_DISCLOSES[self._ids.user_policy], _DISCLOSES[self._ids.tenant_policy])

    def __call__(self) -> dict[str, str]:
        try:
            return self.of(current_context_or_none(), trace=True)
        except Exception:  # noqa: BLE001 - a log record must never fail for its metadata
            return dict(_EMPTY)

    def of(self, ctx: UserExecutionContext | None, *, trace: bool) -> dict[str, str]:
        """The fields of ``ctx`` (and, with ``trace``, of the current span)."""
        try:
            fields = dict(_EMPTY)
            if ctx is not None:
                fields["user_id"] = self._ids.user(ctx.user_id) or ""
                fields["tenant_id"] = self._ids.tenant(ctx.tenant_id) or ""
                fields["thread_id"] = ctx.thread_id
                fields["run_id"] = ctx.run_id
                fields["request_id"] = ctx.request_id
            span = otel_trace.get_current_span().get_span_context() if trace else None
            if span is not None and span.is_valid:
                fields["trace_id"] = f"{span.trace_id:032x}"
                fields["span_id"] = f"{span.span_id:016x}"
        except Exception:  # noqa: BLE001 - a log record must never fail for its metadata
            return dict(_EMPTY)
        return fields


def context_fields(
    *, user_id: IdPolicy = "hash", tenant_id: IdPolicy = "raw", hash_key: bytes | str | None = None
) -> dict[str, str]:
    """The correlation fields for here and now (all :data:`FIELDS`, empty when unknown)."""
    return _Fields(user_id, tenant_id, hash_key)()


class ContextFilter(logging.Filter):
    """A :class:`logging.Filter` that adds the correlation fields to each record.

    It never drops a record. A field the record already has (passed with ``extra=``, or set
    by a filter with the same id policies earlier on the way, e.g. before a
    ``QueueHandler``) is kept, except that a filter giving away less of an id (``"hash"``
    after ``"raw"``, ``"omit"`` after either) writes that id again under its own policy:
    handlers share one record, and a debug handler's ``user_id="raw"`` must not reach the
    exported handler that hashes. Never the other way: a record a handler keeps to emit
    later (a ``MemoryHandler``) must not turn raw under it, so a ``"raw"`` filter after a
    hashing one leaves the hash.

    Args:
        user_id: ``"hash"`` (default; same HMAC as the spans), ``"raw"`` or ``"omit"``
            (empty string).
        tenant_id: The same choice for the tenant id (default ``"raw"``).
        hash_key: The HMAC key (default: the per-process key the telemetry also uses).
        name: Passed to :class:`logging.Filter` (it does not restrict anything here).
    """

    def __init__(
        self,
        *,
        user_id: IdPolicy = "hash",
        tenant_id: IdPolicy = "raw",
        hash_key: bytes | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name)
        self._fields = _Fields(user_id, tenant_id, hash_key)

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; always keep the record."""
        present = record.__dict__
        policy = self._fields.policy
        written = _written.get(record)
        if written is None:
            try:
                ctx = current_context_or_none()
            except Exception:  # noqa: BLE001 - a log record must never fail for its metadata
                ctx = None
            fields = self._fields.of(ctx, trace=True)
            added = [key for key in fields if key not in present]
            for key in added:
                present[key] = fields[key]
            _written[record] = (policy, added, ctx)
        else:
            (user, tenant), added, ctx = written
            if policy[0] < user or policy[1] < tenant:
                # The record's own context, not the one bound where it is handled again.
                fields = self._fields.of(ctx, trace=False)
                if policy[0] < user and "user_id" in added:
                    present["user_id"] = fields["user_id"]
                if policy[1] < tenant and "tenant_id" in added:
                    present["tenant_id"] = fields["tenant_id"]
                _written[record] = ((min(policy[0], user), min(policy[1], tenant)), added, ctx)
        return True


class ContextProcessor:
    """A structlog processor adding the correlation fields to the event dict.

    Keys already in the event dict are kept. Configure it like :class:`ContextFilter`;
    :data:`add_context` is one with the defaults.
    """

    __slots__ = ("_fields",)

    def __init__(
        self,
        *,
        user_id: IdPolicy = "hash",
        tenant_id: IdPolicy = "raw",
        hash_key: bytes | str | None = None,
    ) -> None:
        self._fields = _Fields(user_id, tenant_id, hash_key)

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in self._fields().items():
            event_dict.setdefault(key, value)
        return event_dict


add_context: Final = ContextProcessor()
"""The structlog processor with the default id policy (user id hashed, tenant id raw)."""
