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

A filter reads the context where it runs. Where records are emitted later or elsewhere,
put it on the handler that takes them in (the ``QueueHandler``, the ``MemoryHandler``) or on
the logger, not on the handler behind it: a ``QueueListener``'s handlers run in the
listener's thread (no context: empty fields), and a ``MemoryHandler``'s target runs when the
buffer is flushed, maybe during another request (that request's ids).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import MutableMapping
from typing import Any, Final

from opentelemetry import trace

from ambient import current_context_or_none
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


class _Written(str):
    """An id a :class:`ContextFilter` wrote on a record, under the policy its class names.

    The policy travels with the value, not beside the record: a ``QueueHandler`` hands its
    listener a copy of the record (sharing the values), and a ``MemoryHandler`` emits the
    record later, in whatever context is bound then; either way a stricter filter further
    on can still write the id again from the value itself. Pickled (a ``SocketHandler``, a
    queue to another process) it is a plain string.
    """

    __slots__ = ()
    disclosure = 2

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return (str, (str(self),))


class _Hashed(_Written):
    __slots__ = ()
    disclosure = 1


# How much of an id each policy gives away: raw > hash > omit. An omitted id is "", of which
# nothing gives away less, so no value is marked as omitted.
_DISCLOSES: Final = {"raw": 2, "hash": 1, "omit": 0}
_MARKED: Final[dict[int, type[_Written]]] = {2: _Written, 1: _Hashed}

# Per id field: how little of it the strictest live ContextFilter gives away. A value gets
# its policy's class only while a stricter filter exists to write it again; otherwise it is
# a plain str, as JSON encoders that refuse str subclasses (msgspec without an enc_hook)
# need, and as nearly every process has it (one filter, or filters of one policy).
_strictest: Final = {"user_id": 2, "tenant_id": 2}
_filters: Final[weakref.WeakKeyDictionary[ContextFilter, dict[str, int]]] = (
    weakref.WeakKeyDictionary()
)
# Tickets of recounts, and the last one taken. No lock: filters are made while logging's
# own lock is held (dictConfig) and forgotten from the garbage collector, which may run a
# handler's callback that takes logging's lock; holding one of ours meanwhile could deadlock.
_tickets: Final = itertools.count(1)
_last_ticket = [0]


def _note_filter(made: ContextFilter, disclosures: dict[str, int]) -> None:
    _filters[made] = disclosures
    _recount()
    weakref.finalize(made, _recount)


def _recount() -> None:
    while True:
        ticket = next(_tickets)  # atomic
        _last_ticket[0] = ticket
        try:
            live = list(_filters.values())
        except RuntimeError:  # changed by another thread as it was read: read again
            continue
        for key in _strictest:
            _strictest[key] = min((d[key] for d in live), default=2)
        # A recount that read before a filter was added may write after the one that read
        # it: that one took its ticket later, so the earlier one sees it and counts again.
        if _last_ticket[0] == ticket:
            return


# Records on which a filter wrote an id as a plain str (no stricter filter existed then):
# the value and its policy per field, for a stricter filter made later that meets the
# record again (a MemoryHandler emitting it once its target is set up). A value that is no
# longer the one written there was given by someone else: theirs to decide.
_plain: Final[weakref.WeakKeyDictionary[logging.LogRecord, dict[str, tuple[str, int]]]] = (
    weakref.WeakKeyDictionary()
)


def _marked(key: str, disclosure: int, value: str) -> str:
    """``value`` as written under ``disclosure``: marked when a stricter filter exists."""
    if _strictest[key] < disclosure:
        return _MARKED[disclosure](value)
    return str(value)


class _Fields:
    """Builds the correlation fields under one id policy."""

    __slots__ = ("_ids",)

    def __init__(self, user_id: IdPolicy, tenant_id: IdPolicy, hash_key: bytes | str | None):
        self._ids = _IdExport(user_id, tenant_id, hash_key)

    def __call__(self) -> dict[str, str]:
        try:
            fields = dict(_EMPTY)
            ctx = current_context_or_none()
            if ctx is not None:
                fields["user_id"] = self._ids.user(ctx.user_id) or ""
                fields["tenant_id"] = self._ids.tenant(ctx.tenant_id) or ""
                fields["thread_id"] = ctx.thread_id
                fields["run_id"] = ctx.run_id
                fields["request_id"] = ctx.request_id
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                fields["trace_id"] = f"{span.trace_id:032x}"
                fields["span_id"] = f"{span.span_id:016x}"
        except Exception:  # noqa: BLE001 - a log record must never fail for its metadata
            return dict(_EMPTY)
        return fields

    def stricter(self, key: str, value: object, disclosure: int | None = None) -> str | None:
        """``value``, an id (``key``) a filter wrote (under ``disclosure`` if it is a plain
        str), written again under this policy if that gives away less of it; else ``None``
        (keep it)."""
        if isinstance(value, _Written):
            disclosure = value.disclosure
        elif disclosure is None:
            return None  # given with extra=: the caller's to decide
        if key == "user_id":
            policy, export = self._ids.user_policy, self._ids.user
        else:
            policy, export = self._ids.tenant_policy, self._ids.tenant
        mine = _DISCLOSES[policy]
        if mine >= disclosure:
            return None
        if mine and value:  # hashed
            return _marked(key, mine, export(str(value)) or "")
        return ""


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
    after ``"raw"``, ``"omit"`` after either) writes that id again under its own policy,
    from the value written (also behind a ``QueueHandler``, in its listener's thread, and
    in a ``MemoryHandler`` flushing during another request): handlers share one record, and
    a debug handler's ``user_id="raw"`` must not reach the exported handler that hashes.
    Never the other way: a record a handler keeps to emit later (a ``MemoryHandler``) must
    not turn raw under it, so a ``"raw"`` filter after a hashing one leaves the hash.
    The fields are plain strings, except while a filter with a stricter policy exists in
    the process: then the ids a laxer filter writes are ``str`` subclasses that carry their
    policy to it (``json`` and pickling treat them as strings; msgspec needs an
    ``enc_hook`` returning ``str(value)`` for them).

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
        ids = self._fields._ids
        self._disclosures = {
            "user_id": _DISCLOSES[ids.user_policy],
            "tenant_id": _DISCLOSES[ids.tenant_policy],
        }
        _note_filter(self, self._disclosures)

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; always keep the record."""
        present = record.__dict__
        written: dict[str, str] = {}
        if not all(key in present for key in FIELDS):
            disclosures = self._disclosures
            for key, value in self._fields().items():
                if key not in present:
                    disclosure = disclosures.get(key)
                    if disclosure is None:
                        present[key] = value
                    else:
                        present[key] = written[key] = _marked(key, disclosure, value)
        try:
            plain = _plain.get(record)
        except TypeError:  # a record class without weak references: nothing noted on it
            plain = None
        for key in ("user_id", "tenant_id"):
            value = present[key]
            noted = None if plain is None else plain.get(key)
            disclosure = noted[1] if noted is not None and noted[0] is value else None
            try:
                again = self._fields.stricter(key, value, disclosure)
            except Exception:  # noqa: BLE001 - a log record must never fail for its metadata
                again = ""
            if again is not None:
                present[key] = value = again
            elif value is not written.get(key):
                continue
            mine = self._disclosures[key]
            if mine and value and type(value) is str:
                if plain is None:
                    try:
                        plain = _plain.setdefault(record, {})
                    except TypeError:
                        break
                plain[key] = (value, mine)
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
