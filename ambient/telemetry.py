"""OpenTelemetry spans and metrics for scopes and components, on the OpenTelemetry API.

:class:`Telemetry` is an :class:`~ambient.Observer`: give it to the :class:`~ambient.Registry`
(``Registry(telemetry=Telemetry())``, so every scope of that registry is traced: requests,
jobs, tests) or to the middleware. It records

* an ``ambient.scope`` span (INTERNAL) from the moment the context is bound to the end of the
  scope's cleanup, a child of whatever span is current when the scope opens (the server span
  of ``opentelemetry-instrumentation-asgi`` placed outside the middleware);
* for each component created or cleaned up, an ``ambient.resolve`` / ``ambient.cleanup`` child
  span when it took at least ``span_threshold`` seconds or failed, otherwise an event of the
  same name on the scope span;
* the metrics ``ambient.scopes.active``, ``ambient.user_components.live``,
  ``ambient.component.create.duration``, ``ambient.cleanup.duration``,
  ``ambient.cleanup.failures`` and ``ambient.global_state.accesses``. No metric carries a user
  or tenant id. ``ambient.scopes.active`` is an observable up-down counter: the count is kept
  here and read when the meter collects, instead of two SDK measurements per scope.

While the scope is open its span is the current span, so spans your code starts nest under
it, and log records (see :mod:`ambient.integrations.logging`) carry its ids. The span is made
current without an OpenTelemetry context token: closing the scope restores the context that
was current when it opened, if the scope's context is still the current one, instead of
``detach``-ing a token. Closing a scope from another task or after an abandoned generator
therefore never logs "Failed to detach context"; the task that abandoned the generator keeps
the ended scope span as its current span until its own enclosing span ends. When the context
current at the opening was another request's (a server that starts a pipelined request
inside the previous one's), neither the scope span nor the scope's context (its baggage and
trace parent, with or without tracing) starts from it, and closing restores what they
started from instead.

The per-scope state refers to the context it made current only weakly, so a closed scope's
span, events and context are freed by reference counting, not left to the cycle collector.

With no OpenTelemetry SDK configured the global providers are no-op proxies; ``Telemetry``
notices that and does no span or metric work at all (it looks again at most once a second, so
an SDK installed after start-up is picked up).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Final, Literal

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from ambient import __version__, _binding, _checks
from ambient._binding import _bound_here
from ambient._observe import ComponentEvent, Observer
from ambient._provider import Lifetime
from ambient.errors import IncompleteResponseError, InvalidContextError, _readable

if TYPE_CHECKING:
    from ambient._context import UserExecutionContext, UserRef
    from ambient._scope import Scope

__all__ = [
    "BAGGAGE_FIELDS",
    "IdPolicy",
    "Telemetry",
    "hash_id",
]

logger = logging.getLogger("ambient")
# Assigned, not imported by name: CPython 3.11 compiles a method call on a name bound by
# `from ... import` as an attribute read (it takes the name for a module's), which builds a
# bound method on every call: _current.get() is run per traced scope.
_current: Final = _binding._current

IdPolicy = Literal["hash", "raw", "omit"]
"""How an id is exported: keyed hash (default for users), as is, or not at all."""

BAGGAGE_FIELDS: Final = frozenset(
    {"user_id", "tenant_id", "thread_id", "run_id", "request_id", "connection_id"}
)
"""Context fields that ``Telemetry(baggage=...)`` may put into W3C baggage."""

_POLICIES: Final = ("hash", "raw", "omit")
_PROCESS_KEY: Final = secrets.token_bytes(32)
_RECHECK_SECONDS: Final = 1.0
_HASH_CACHE_SIZE: Final = 4096
_SCOPE_KEY: Final = otel_context.create_key("ambient.scope")
_USER: Final = Lifetime.USER
_INTERNAL: Final = SpanKind.INTERNAL  # read once per scope; see ambient._provider._REQUEST
# Component creation is often microseconds, pool connects and agent start-ups seconds.
_DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

try:  # the global meter provider before an SDK is installed; no public name for its type
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    _PROXY_METER_PROVIDERS: tuple[type, ...] = (_ProxyMeterProvider,)
except ImportError:  # pragma: no cover - depends on the opentelemetry-api version
    _PROXY_METER_PROVIDERS = ()


def _key_bytes(key: bytes | str | None) -> bytes:
    if key is None:
        return _PROCESS_KEY
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or not key:
        msg = "hash_key must be non-empty bytes or str (or None for a random per-process key)"
        raise ValueError(msg)
    return key


def hash_id(value: str, key: bytes | str | None = None) -> str:
    """Pseudonymise an id: HMAC-SHA256 of ``value`` under ``key``, 16 hex characters.

    Args:
        value: The id (a user or tenant id).
        key: The HMAC key. ``None`` uses a random key made once per process, shared by spans
            and log records so they correlate; pass a fixed key (from your secret store) to
            correlate across processes and restarts.
    """
    return hmac.digest(_key_bytes(key), value.encode(), "sha256").hex()[:16]


def _strip_ambient_baggage(context: Context) -> Context:
    """Drop incoming ``ambient.*`` baggage: only this process may speak for its scopes."""
    for key in otel_baggage.get_all(context):
        if key.startswith("ambient."):
            context = otel_baggage.remove_baggage(key, context)
    return context


def _encloses(outer: Scope, scope: Scope) -> bool:
    """Whether ``scope`` was opened inside ``outer`` (``outer`` is bound around it)."""
    binding = _current.get()
    if binding is None or binding.scope is None or binding.scope.owner is not scope:
        return True  # not ours to judge: keep the current context
    binding = binding.prev
    while binding is not None:
        if not binding.closed and binding.scope is not None and binding.scope.owner is outer:
            return True
        binding = binding.prev
    return False


def _descends(outer: Scope, scope: Scope) -> bool:
    """Whether ``scope`` was opened by work that ``outer``'s work started (``outer`` is
    bound around it, open or closed since: a task that outlived it)."""
    binding = _current.get()
    if binding is None or binding.scope is None or binding.scope.owner is not scope:
        return True  # not ours to judge: keep the current context
    binding = binding.prev
    while binding is not None:
        if binding.scope is not None and binding.scope.owner is outer:
            return True
        binding = binding.prev
    return False


def _foreign(context: Context, scope: Scope) -> bool:
    """Whether the scope whose record ``context`` carries is another request's: ``scope``
    was not opened by work that scope's work started (a pipelined request, which the server
    started inside the previous one's context, and whose middleware bound nothing above it)."""
    record = context.get(_SCOPE_KEY)
    if type(record) is not _ScopeRecord:
        return False
    binding = _current.get()
    if binding is None or binding.scope is None or binding.scope.owner is not scope:
        return False  # not ours to judge
    outer = record.scope()
    if outer is None:  # gone: only a scope with nothing bound above it is surely unrelated
        return binding.prev is None
    return not _descends(outer, scope) and not _callers(outer)


def _callers(outer: Scope) -> bool:
    """Whether the open ``outer`` was bound in this very Context: the caller's own scope,
    around an app it calls in its task (an ASGI client in a test's scope, an app mounted in
    another one's), whose context must be current again once the app's scope closes."""
    held = outer._binding
    if held is None:
        return False
    mine = _current.get()
    if not _bound_here(held):
        return False
    _current.set(mine)  # _bound_here made ``held`` current again
    return True


def _unrelated_scopes_removed(context: Context, scope: Scope) -> Context:
    """The context to start ``scope``'s span in.

    The current one, unless it is the context another scope made current, or one its work
    made from it whose span has ended, and ``scope`` is not nested in that scope: then it
    was inherited from unrelated work (on asyncio a pipelined request starts inside the
    previous request's context, uvicorn#2167, even inside the span an instrumentation
    inside the middleware wraps that request's ``send`` in; a task spawned by a request
    outlives it), and the span starts from what was current before that scope instead, or
    from nothing when that scope is another request's (what was current before it, its
    server span and its baggage, is that request's too), so it never becomes another
    request's child. A span still going on is the current work's
    own (a task's, an outer middleware's server span), as is a remote parent it took from
    a message, when that work descends from the scope whose context it was made from (or
    was made from no scope's): the scope's span goes under it. One made from an unrelated
    scope's context is that scope's work, still going on (the previous pipelined request's
    handler span), even though it is current here. A sampled-out span never tells whether it
    has ended: it is the current work's own when that work descends from the scope's
    (a task a request started), not when unrelated work inherited it.
    """
    while True:
        record = context.get(_SCOPE_KEY)
        if type(record) is not _ScopeRecord:
            return context
        outer = record.scope()
        if record.attached() is not context:
            span = trace.get_current_span(context)
            span_context = span.get_span_context()
            # Even going on, a span made from another scope's context belongs to work that
            # scope's work started; a pipelined request inherits the previous one's while
            # that request still runs (its handler's span, around a response whose
            # streaming task group it is still leaving).
            if (span.is_recording() or span_context.is_remote) and (
                outer is None or _descends(outer, scope)
            ):
                return context
            if (
                span_context.is_valid
                and not span_context.trace_flags.sampled
                and outer is not None
                and _descends(outer, scope)
            ):
                return context
        if not record.closed and outer is not None and _encloses(outer, scope):
            return context
        if outer is None and _foreign(context, scope):
            # Another request's scope, gone (garbage-collected): as when it is alive below.
            return Context()
        if outer is not None and not _descends(outer, scope) and not _callers(outer):
            # Another request's scope, which ``scope``'s work did not start: what was current
            # before it (that request's server span, its caller's remote parent, its
            # baggage) is that request's too.
            return Context()
        if record.previous is None:
            return Context()
        context = record.previous


def _parent_context(previous: Context, scope: Scope, record: _ScopeRecord) -> Context:
    """The context ``scope``'s span starts in (see :func:`_unrelated_scopes_removed`).

    When ``previous`` was another request's (the server started this one inside it),
    closing the scope makes that context current, not ``previous``: what runs after the
    scope in this request (the middleware's log of a failed cleanup, an outer middleware)
    must not take that request's trace for its own, as the scope span did not."""
    parent = _unrelated_scopes_removed(previous, scope)
    if parent is not previous and _foreign(previous, scope):
        record.restores = parent
    return parent


def _leave_scopes_context() -> None:
    """Make an empty OpenTelemetry context current when the current one is a scope's (or was
    made from one's).

    For a request that the server started inside another request's context (see
    :func:`_unrelated_scopes_removed`), before its own scope opens: its identity resolver,
    or the refusal of its request, must not call out or log in that request's trace, with
    that request's baggage (its user's ids among it). Telemetry that never made a scope's
    context current costs nothing here."""
    if type(otel_context.get_current().get(_SCOPE_KEY)) is _ScopeRecord:
        otel_context.attach(Context())


def _cancellation(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation (asyncio's, trio's, a closed generator's, a
    response cut short because the framework cancelled the work of a client gone): work cut
    short, not an error of its own. So is a group of nothing but cancellations: what a trio
    nursery raises when it is cancelled from outside while its tasks run."""
    if isinstance(error, BaseExceptionGroup):
        return all(_cancellation(member) for member in error.exceptions)
    if isinstance(error, IncompleteResponseError):
        # Not when the app returned without finishing its answer to a client still there:
        # the server answers that with a 500, or drops the connection.
        return getattr(error, "client_gone", True) is not False
    trio = sys.modules.get("trio")
    return isinstance(error, (asyncio.CancelledError, GeneratorExit)) or (
        trio is not None and isinstance(error, trio.Cancelled)
    )


def _echoed_ids(error: BaseException, hidden: frozenset[str]) -> dict[str, str]:
    """The messages of the :class:`~ambient.errors.InvalidContextError` in ``error`` (its
    cause, context or group members included) that echo a ``hidden`` id field's value,
    each mapped to the same message without the value."""
    found: dict[str, str] = {}
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        field = getattr(current, "field", None)
        if isinstance(current, InvalidContextError) and field in hidden:
            safe = f"{field} is invalid: {getattr(current, 'reason', '')}"
            message = str(current)
            if message != safe:
                found[message] = safe
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        links = (current.__cause__, current.__context__)
        pending.extend(link for link in links if link is not None)
    return found


def _record_end(span: trace.Span, error: BaseException, hidden: frozenset[str]) -> None:
    """Record on ``span`` what ended its work: a cancellation is not an error of its own,
    only ``ambient.cancelled``; any other exception, ``KeyboardInterrupt`` and
    ``SystemExit`` included, is an error, as OpenTelemetry's own spans record it.

    An invalid id that a context error echoes (``user_id is invalid: ... (got 'alice ')``)
    is left out of the recorded message and stack trace when its field (in ``hidden``) is
    exported hashed or not at all: it is that user's id, give or take the flaw.

    An exception whose ``__str__`` raises (which the API's ``record_exception`` calls) is
    recorded all the same, with the stand-in :mod:`traceback` gives for its message: the
    span must still end, or the request's trace is never exported."""
    if _cancellation(error):
        span.set_attribute("ambient.cancelled", True)
        return
    echoed = _echoed_ids(error, hidden) if hidden else None
    attributes: dict[str, str] | None = None
    if echoed:
        message = _message(error)
        stacktrace = "".join(traceback.format_exception(error))
        for raw, safe in echoed.items():
            message = message.replace(raw, safe)
            stacktrace = stacktrace.replace(raw, safe)
        attributes = {"exception.message": message, "exception.stacktrace": stacktrace}
    try:
        span.record_exception(error, attributes)
    except Exception:  # noqa: BLE001 - its str() raised: the event the API would record
        module = type(error).__module__
        name = type(error).__qualname__
        recorded = {
            "exception.type": f"{module}.{name}" if module and module != "builtins" else name,
            "exception.message": _message(error),
            "exception.stacktrace": "".join(traceback.format_exception(error)),
            "exception.escaped": "False",
        }
        span.add_event("exception", {**recorded, **(attributes or {})})
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def _message(error: BaseException) -> str:
    """``str(error)``, or the stand-in :mod:`traceback` gives when its ``__str__`` raises."""
    said = _readable(error)
    return "<exception str() failed>" if said is None else said


def _check_policy(name: str, policy: str) -> IdPolicy:
    if policy not in _POLICIES:
        msg = f"{name} must be one of {', '.join(map(repr, _POLICIES))}, not {policy!r}"
        raise ValueError(msg)
    return policy  # type: ignore[return-value]  # checked against _POLICIES just above


class _IdExport:
    """Applies the user and tenant id policies (shared with the logging integration)."""

    __slots__ = ("_hashed", "hidden", "key", "tenant_policy", "user_policy")

    def __init__(self, user_id: str, tenant_id: str, hash_key: bytes | str | None) -> None:
        self.user_policy = _check_policy("user_id", user_id)
        self.tenant_policy = _check_policy("tenant_id", tenant_id)
        # The fields whose raw values must not be exported.
        self.hidden = frozenset(
            field
            for field, policy in (("user_id", self.user_policy), ("tenant_id", self.tenant_policy))
            if policy != "raw"
        )
        self.key = _key_bytes(hash_key)
        # An HMAC costs about 1.5 us; the same users come back request after request.
        self._hashed: dict[str, str] = {}

    def _apply(self, policy: IdPolicy, value: str | None) -> str | None:
        if value is None or policy == "omit":
            return None
        if policy == "raw":
            return value
        hashed = self._hashed.get(value)
        if hashed is None:
            hashed = hmac.digest(self.key, value.encode(), "sha256").hex()[:16]
            if len(self._hashed) >= _HASH_CACHE_SIZE:
                self._hashed.clear()
            self._hashed[value] = hashed
        return hashed

    def user(self, value: str) -> str | None:
        return self._apply(self.user_policy, value)

    def tenant(self, value: str | None) -> str | None:
        return self._apply(self.tenant_policy, value)


class _Gauge:
    """A count kept here and read by the meter when it collects.

    For ``ambient.scopes.active``: an SDK ``UpDownCounter.add`` costs microseconds, twice per
    scope; an observable up-down counter exports the same non-monotonic sum for the price of
    an addition under a lock.
    """

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, amount: int) -> None:
        with self._lock:
            self.value += amount

    def observe(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return (metrics.Observation(self.value),)


# One count per meter: the SDK registers an instrument name once per meter and ignores the
# callbacks of a second registration, so every Telemetry on that meter shares the first one's.
_GAUGES: weakref.WeakKeyDictionary[metrics.Meter, _Gauge] = weakref.WeakKeyDictionary()
_GAUGES_LOCK: Final = threading.Lock()


def _scopes_active(meter: metrics.Meter) -> _Gauge | metrics.UpDownCounter:
    """The ``ambient.scopes.active`` count of ``meter``, made on first use."""
    with _GAUGES_LOCK:
        try:
            gauge = _GAUGES.get(meter)
        except TypeError:  # a meter that cannot be weakly referred to: count synchronously
            return meter.create_up_down_counter(
                "ambient.scopes.active", unit="{scope}", description="Scopes open right now."
            )
        if gauge is None:
            gauge = _GAUGES[meter] = _Gauge()
            meter.create_observable_up_down_counter(
                "ambient.scopes.active",
                callbacks=[gauge.observe],
                unit="{scope}",
                description="Scopes open right now.",
            )
    return gauge


class _Instruments:
    """The metric instruments of one meter."""

    __slots__ = (
        "cleanup_duration",
        "cleanup_failures",
        "counted",
        "create_duration",
        "global_accesses",
        "scopes_active",
        "user_components",
    )

    def __init__(self, meter: metrics.Meter) -> None:
        # USER components this meter counted live, by id: one made before a late SDK was
        # found was never counted up, so its cleanup must not count it down.
        self.counted: dict[int, int] = {}
        self.scopes_active = _scopes_active(meter)
        self.user_components = meter.create_up_down_counter(
            "ambient.user_components.live",
            unit="{component}",
            description="USER-lifetime components alive right now.",
        )
        self.create_duration = meter.create_histogram(
            "ambient.component.create.duration",
            unit="s",
            description="Time a component factory took.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.cleanup_duration = meter.create_histogram(
            "ambient.cleanup.duration",
            unit="s",
            description="Time a component cleanup took.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.cleanup_failures = meter.create_counter(
            "ambient.cleanup.failures",
            unit="{cleanup}",
            description="Component cleanups that raised or timed out.",
        )
        self.global_accesses = meter.create_counter(
            "ambient.global_state.accesses",
            unit="{access}",
            description="Accesses to a guarded module-level global while a user context was bound.",
        )


def _count(instruments: _Instruments, event: ComponentEvent) -> None:
    """Note one count of ``event``'s USER component (see :func:`_uncount`)."""
    counted = instruments.counted
    key = id(event.instance)
    counted[key] = counted.get(key, 0) + 1


def _uncount(instruments: _Instruments, event: ComponentEvent) -> bool:
    """Forget one count of ``event``'s USER component; whether it had been counted."""
    counted = instruments.counted
    key = id(event.instance)
    times = counted.get(key)
    if times is None:
        return False
    if times == 1:
        del counted[key]
    else:
        counted[key] = times - 1
    return True


def _only_key(context: Context) -> str | None:
    return next(iter(context)) if len(context) == 1 else None


# The keys the API stores the current span and the baggage under, found through the public
# API, so that the scope's context is made in one copy instead of three (None: the API
# changed shape, and the general path is taken).
_SPAN_KEY: Final = _only_key(trace.set_span_in_context(trace.INVALID_SPAN, Context()))
_BAGGAGE_KEY: Final = _only_key(otel_baggage.set_baggage("ambient", "", Context()))


def _event_attributes(event: ComponentEvent) -> dict[str, str | float]:
    """A fast component's event attributes: of the three types the SDK keeps as they are."""
    return {
        "ambient.component": event.name,
        "ambient.lifetime": event.lifetime._value_,
        "ambient.duration": event.duration,
    }


def _no_context() -> None:
    return None


def _sdk_event_type(tracer: trace.Tracer) -> Callable[..., object] | None:
    """The SDK's ``Event`` class when ``tracer`` is the SDK's and needs no attribute clean-up.

    ``Span.add_event`` copies and checks the attributes of every event and takes two locks
    (together most of the cost of a fast component); ours are clean by construction (a str,
    a str, a float). On the SDK's spans the scope collects ready ``Event`` objects and hands
    them over in one go when it closes, before the span ends. Only while no attribute length
    limit is configured, which would have to truncate the component name.
    """
    sdk = sys.modules.get("opentelemetry.sdk.trace")
    if sdk is None or not isinstance(tracer, getattr(sdk, "Tracer", ())):
        return None
    limits = getattr(tracer, "_span_limits", None)
    if limits is None or getattr(limits, "max_attribute_length", 0) is not None:
        return None
    max_attributes = getattr(limits, "max_event_attributes", 0)
    if max_attributes is not None and max_attributes < 3:
        return None
    event_type: Callable[..., object] | None = getattr(sdk, "Event", None)
    return event_type


class _ScopeRecord:
    """What one :class:`Telemetry` keeps in ``scope.state`` while the scope is open."""

    __slots__ = (
        "attached",
        "closed",
        "counted",
        "events",
        "flush",
        "parent",
        "previous",
        "restores",
        "scope",
        "span",
    )

    def __init__(self, scope: Scope) -> None:
        # Weak: a context pinned by a timer or a leftover task must not keep the scope alive.
        self.scope = weakref.ref(scope)
        self.span: trace.Span | None = None
        self.parent: Context | None = None  # the scope span's parent context
        # The OpenTelemetry context made current, weakly: that context holds this record,
        # and a strong reference back would leave every traced request (span, events and
        # all) to the cycle collector.
        self.attached: Callable[[], Context | None] = _no_context
        self.previous: Context | None = None  # what was current before
        # What closing the scope makes current instead of ``previous``, when that was
        # another request's context (see _parent_context).
        self.restores: Context | None = None
        # Fast components' events, for ``flush`` (the SDK span's event list) at close.
        self.events: list[object] | None = None
        self.flush: Callable[[list[object]], object] | None = None
        self.counted = False
        self.closed = False


class Telemetry(Observer):
    """Trace scopes and components, and count them, on the OpenTelemetry API.

    Args:
        tracer_provider: Where spans go (default: the global provider, looked up once).
        meter_provider: Where metrics go (default: the global provider, looked up once).
        user_id: ``"hash"`` (default): HMAC-SHA256 under ``hash_key``, 16 hex characters;
            ``"raw"``: the id itself; ``"omit"``: no user attribute. Unless ``"raw"``, an
            :class:`~ambient.InvalidContextError` recorded on a span loses the id it echoes.
        tenant_id: The same choice for the tenant id (default ``"raw"``).
        hash_key: Key for ``"hash"`` (bytes or str). ``None``: a random key per process,
            the same one :mod:`ambient.integrations.logging` uses, so spans and log records
            of one process correlate.
        span_threshold: Component creations and cleanups that take at least this many
            seconds (or fail) become ``ambient.resolve`` / ``ambient.cleanup`` spans; faster
            ones become events on the scope span. ``0`` makes every one a span.
        baggage: Context fields (from :data:`BAGGAGE_FIELDS`) to put into W3C baggage as
            ``ambient.<field>`` for downstream services, with the same id policies. Off by
            default. Incoming baggage is never read as identity; incoming ``ambient.*``
            entries are replaced or dropped so they cannot pass for ours.

    Raises:
        ValueError: an unknown policy, a negative threshold, an unknown baggage field or
            ``user_id`` in ``baggage`` with ``user_id="omit"``.

    Example::

        registry = Registry(telemetry=Telemetry())
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        user_id: IdPolicy = "hash",
        tenant_id: IdPolicy = "raw",
        hash_key: bytes | str | None = None,
        span_threshold: float = 0.001,
        baggage: Iterable[str] = (),
    ) -> None:
        self._ids = _IdExport(user_id, tenant_id, hash_key)
        if not _checks.number(span_threshold, "span_threshold") >= 0:
            msg = f"span_threshold must be >= 0 seconds, not {span_threshold!r}"
            raise ValueError(msg)
        self.span_threshold = float(span_threshold)
        if isinstance(baggage, (str, bytes)):
            # A str is an iterable of one-letter "fields": say what was meant instead.
            msg = f"baggage must be a tuple of field names, such as ({baggage!r},), not a str"
            raise TypeError(msg)
        fields = tuple(dict.fromkeys(baggage))
        unknown = sorted(repr(field) for field in set(fields) - BAGGAGE_FIELDS)
        if unknown:
            msg = (
                f"baggage fields must be among {', '.join(sorted(BAGGAGE_FIELDS))}; "
                f"unknown: {', '.join(unknown)}"
            )
            raise ValueError(msg)
        omitted = {"user_id": self._ids.user_policy, "tenant_id": self._ids.tenant_policy}
        for field, policy in omitted.items():
            if field in fields and policy == "omit":
                msg = f"{field} cannot go into baggage while {field}='omit'"
                raise ValueError(msg)
        self.baggage_fields = fields
        # A proxy provider (the global one before an SDK is set) means "the global one".
        if isinstance(tracer_provider, trace.ProxyTracerProvider):
            tracer_provider = None
        if isinstance(meter_provider, _PROXY_METER_PROVIDERS):
            meter_provider = None
        self._tracer_provider_arg = tracer_provider
        self._meter_provider_arg = meter_provider
        self._tracer: trace.Tracer | None = None
        self._event_type: Callable[..., object] | None = None
        self._instruments: _Instruments | None = None
        self._tracer_pending = False
        self._meter_pending = False
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._complained: set[str] = set()
        self._component_attributes: dict[str, Mapping[str, str]] = {}
        self._resolve_tracer()
        self._resolve_meter()
        self._update_state()

    # -- providers -----------------------------------------------------------------------

    def _resolve_tracer(self) -> None:
        provider = self._tracer_provider_arg or trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            # The global provider is not set yet; its proxies would give no-op spans.
            self._tracer_pending = True
            return
        self._tracer_pending = False
        if isinstance(provider, trace.NoOpTracerProvider):
            return
        tracer = provider.get_tracer("ambient", __version__)
        if not isinstance(tracer, trace.NoOpTracer):
            self._event_type = _sdk_event_type(tracer)
            self._tracer = tracer

    def _resolve_meter(self) -> None:
        provider = self._meter_provider_arg or metrics.get_meter_provider()
        if isinstance(provider, _PROXY_METER_PROVIDERS):
            self._meter_pending = True
            return
        self._meter_pending = False
        if isinstance(provider, metrics.NoOpMeterProvider):
            return
        meter = provider.get_meter("ambient", __version__)
        if not isinstance(meter, metrics.NoOpMeter):
            self._instruments = _Instruments(meter)

    def _update_state(self) -> None:
        self._pending = self._tracer_pending or self._meter_pending
        self._dormant = (
            self._tracer is None and self._instruments is None and not self.baggage_fields
        )
        self._active = not self._dormant
        # Last: a scope reading it before the state above changed asks `active` anyway. A
        # subclass deciding `active` itself is asked for every scope.
        if self._active or type(self).active is not Telemetry.active:
            self.inactive_until = None
        elif self._pending:
            self.inactive_until = self._next_check
        else:
            self.inactive_until = math.inf

    def _recheck(self) -> None:
        now = monotonic()
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + _RECHECK_SECONDS
            # A provider set late that fails to hand out a tracer or its instruments is
            # given up on (logged once): the request that happened to look must not fail.
            if self._tracer_pending:
                try:
                    self._resolve_tracer()
                except Exception:  # noqa: BLE001 - logged once; never breaks a request
                    self._tracer_pending = False
                    self._failed("tracer provider")
            if self._meter_pending:
                try:
                    self._resolve_meter()
                except Exception:  # noqa: BLE001 - logged once; never breaks a request
                    self._meter_pending = False
                    self._failed("meter provider")
            self._update_state()

    @property
    def active(self) -> bool:
        """Whether this telemetry records anything (an SDK provider or baggage is set).

        While the global providers are still no-op proxies this looks again at most once a
        second, so it stays cheap enough to ask for every scope; :attr:`inactive_until` says
        when, so that a scope opening before then need not ask.
        """
        if self._pending and monotonic() >= self._next_check:
            self._recheck()
        return self._active

    # -- ids -----------------------------------------------------------------------------

    def export_user_id(self, user_id: str) -> str | None:
        """The user id as this telemetry exports it (hashed, raw, or ``None`` for omit)."""
        return self._ids.user(user_id)

    def export_tenant_id(self, tenant_id: str | None) -> str | None:
        """The tenant id as this telemetry exports it (``None`` when absent or omitted)."""
        return self._ids.tenant(tenant_id)

    def _scope_attributes(self, ctx: UserExecutionContext) -> dict[str, str | int]:
        attributes: dict[str, str | int] = {
            "ambient.thread_id": ctx.thread_id,
            "ambient.run_id": ctx.run_id,
            "ambient.request_id": ctx.request_id,
        }
        user = self._ids.user(ctx.user_id)
        if user is not None:
            attributes["ambient.user_id"] = user
        tenant = self._ids.tenant(ctx.tenant_id)
        if tenant is not None:
            attributes["ambient.tenant_id"] = tenant
        return attributes

    def _user_attributes(self, user: UserRef) -> dict[str, str]:
        attributes: dict[str, str] = {}
        exported = self._ids.user(user.user_id)
        if exported is not None:
            attributes["ambient.user_id"] = exported
        tenant = self._ids.tenant(user.tenant_id)
        if tenant is not None:
            attributes["ambient.tenant_id"] = tenant
        return attributes

    def _with_baggage(self, base: Context, ctx: UserExecutionContext) -> Context:
        result = _strip_ambient_baggage(base)
        for field in self.baggage_fields:
            if field == "user_id":
                value: str | None = self._ids.user(ctx.user_id)
            elif field == "tenant_id":
                value = self._ids.tenant(ctx.tenant_id)
            else:
                value = getattr(ctx, field)
            if value is not None:
                result = otel_baggage.set_baggage(f"ambient.{field}", value, result)
        return result

    # -- failures ------------------------------------------------------------------------

    def _failed(self, where: str) -> None:
        if where in self._complained:
            return
        self._complained.add(where)
        logger.exception(
            "ambient telemetry failed in %s; the request goes on (logged once per telemetry)",
            where,
        )

    # -- scopes --------------------------------------------------------------------------

    def scope_opened(self, scope: Scope) -> None:
        """Start the scope span and make it current; count the scope."""
        if self._pending and monotonic() >= self._next_check:
            self._recheck()
        if self._dormant:
            return
        record = _ScopeRecord(scope)
        scope.state[self] = record
        instruments = self._instruments
        if instruments is not None:
            try:
                instruments.scopes_active.add(1)
                record.counted = True
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("scope_opened (metrics)")
        try:
            previous = otel_context.get_current()
            # Without a span too: the trace parent and baggage that the scope's calls
            # propagate must not be another request's (a pipelined request's) either.
            parent = _parent_context(previous, scope, record)
            tracer = self._tracer
            if tracer is None:
                if self.baggage_fields:
                    current = self._with_baggage(parent, scope.context)
                elif _BAGGAGE_KEY is None or _BAGGAGE_KEY in parent:
                    # Metrics only: still no forged `ambient.*` baggage past this scope.
                    current = _strip_ambient_baggage(parent)
                else:
                    current = parent
            else:
                # The scope's spans start from the cleaned baggage too, not only the code in
                # the scope: a span processor copying baggage onto spans (as
                # opentelemetry-processor-baggage does) would otherwise label them with a
                # client's forged `ambient.user_id`.
                if self.baggage_fields:
                    parent = self._with_baggage(parent, scope.context)
                elif _BAGGAGE_KEY is None or _BAGGAGE_KEY in parent:
                    parent = _strip_ambient_baggage(parent)
                span = tracer.start_span(
                    "ambient.scope",
                    parent,
                    _INTERNAL,
                    self._scope_attributes(scope.context),
                )
                record.span = span
                record.parent = parent
                if self._event_type is not None:
                    flush = getattr(getattr(span, "_events", None), "extend", None)
                    if flush is not None:
                        record.flush = flush
                        record.events = []
                if _SPAN_KEY is None:
                    current = trace.set_span_in_context(span, parent)
                    current = otel_context.set_value(_SCOPE_KEY, record, current)
                else:
                    # The parent plus the span and this record, in one copy.
                    current = Context({**parent, _SPAN_KEY: span, _SCOPE_KEY: record})
            if current is not previous:
                if tracer is None:
                    current = otel_context.set_value(_SCOPE_KEY, record, current)
                record.previous = previous
                record.attached = weakref.ref(current)
                # No token is kept: see scope_closed.
                otel_context.attach(current)
        except Exception:  # noqa: BLE001 - logged once; never breaks a request
            self._failed("scope_opened")

    def scope_closed(self, scope: Scope, failures: tuple[BaseException, ...]) -> None:
        """Restore the previous OpenTelemetry context, end the scope span, count it closed."""
        if self._dormant:
            return
        record = scope.state.pop(self, None)
        if type(record) is not _ScopeRecord:
            return
        record.closed = True
        if record.previous is not None:
            try:
                self._restore(record)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("scope_closed (context)")
        span = record.span
        if span is not None:
            try:
                self._flush(record)
                span.set_attribute("ambient.components.created", scope.components_created)
                span.set_attribute("ambient.cleanup.failures", len(failures))
                ended_by = scope.exception
                if ended_by is None:
                    if failures:
                        span.set_status(
                            Status(StatusCode.ERROR, f"{len(failures)} component cleanup(s) failed")
                        )
                else:
                    _record_end(span, ended_by, self._ids.hidden)
                span.end()
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("scope_closed (span)")
        instruments = self._instruments
        if record.counted and instruments is not None:
            try:
                instruments.scopes_active.add(-1)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("scope_closed (metrics)")

    def _flush(self, record: _ScopeRecord) -> None:
        events = record.events
        if events and record.flush is not None:
            try:
                record.flush(events)
            except Exception:  # noqa: BLE001 - logged once; the span still ends
                self._failed("scope_closed (events)")

    @staticmethod
    def _restore(record: _ScopeRecord) -> None:
        # Token-free: a token reset from another Context (a generator finalised by another
        # task, a scope closed elsewhere) would raise, and OpenTelemetry logs "Failed to
        # detach context". Only when our context is still current do we put the previous
        # one back, skipping scopes that already closed out of order.
        if otel_context.get_current() is not record.attached():
            return
        previous = record.previous if record.restores is None else record.restores
        while previous is not None:
            outer = previous.get(_SCOPE_KEY)
            if type(outer) is not _ScopeRecord or not outer.closed:
                break
            if outer.attached() is not previous:
                break
            previous = outer.previous
        otel_context.attach(Context() if previous is None else previous)

    # -- components ----------------------------------------------------------------------

    def _attributes(self, event: ComponentEvent) -> Mapping[str, str]:
        attributes = self._component_attributes.get(event.name)
        if attributes is None:
            attributes = {"ambient.component": event.name}
            if len(self._component_attributes) < 10_000:
                self._component_attributes[event.name] = attributes
        return attributes

    def component_created(self, event: ComponentEvent) -> None:
        """Record a creation: span or event, duration histogram, live USER components."""
        instruments = self._instruments
        if instruments is not None:
            try:
                attributes = self._attributes(event)
                instruments.create_duration.record(event.duration, attributes)
                if event.lifetime is _USER and event.error is None:
                    instruments.user_components.add(1, attributes)
                    _count(instruments, event)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("component_created (metrics)")
        if self._tracer is not None:
            try:
                if not self._fast_event("ambient.resolve", event):
                    self._trace_component("ambient.resolve", event)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("component_created (span)")

    def component_cleaned(self, event: ComponentEvent) -> None:
        """Record a cleanup: span or event, duration histogram, failures, live USER components.

        A component with nothing to clean up (``event.cleanup_ran`` is false) only leaves
        the live USER count: there was no cleanup to time or trace.
        """
        instruments = self._instruments
        if not event.cleanup_ran:
            if instruments is not None and event.lifetime is _USER and _uncount(instruments, event):
                try:
                    instruments.user_components.add(-1, self._attributes(event))
                except Exception:  # noqa: BLE001 - logged once; never breaks a request
                    self._failed("component_cleaned (metrics)")
            return
        if instruments is not None:
            try:
                attributes = self._attributes(event)
                instruments.cleanup_duration.record(event.duration, attributes)
                # A cleanup cut short by a cancellation did not fail (its span is not an
                # error, nor does the scope or the registry count it as a failure).
                if event.error is not None and not _cancellation(event.error):
                    instruments.cleanup_failures.add(1, attributes)
                if event.lifetime is _USER and _uncount(instruments, event):
                    instruments.user_components.add(-1, attributes)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("component_cleaned (metrics)")
        if self._tracer is not None:
            try:
                if not self._fast_event("ambient.cleanup", event):
                    self._trace_component("ambient.cleanup", event)
            except Exception:  # noqa: BLE001 - logged once; never breaks a request
                self._failed("component_cleaned (span)")

    def _fast_event(self, name: str, event: ComponentEvent) -> bool:
        """The common case, kept short: a fast success on an SDK scope span becomes a ready
        ``Event`` for the scope to hand over when it closes. False when it is not that case."""
        scope = event.scope
        if scope is None or event.error is not None or event.duration >= self.span_threshold:
            return False
        record = scope.state.get(self)
        event_type = self._event_type
        if type(record) is not _ScopeRecord or record.events is None or event_type is None:
            return False
        record.events.append(event_type(name, _event_attributes(event), event.start_ns))
        return True

    def _trace_component(self, name: str, event: ComponentEvent) -> None:
        """A child span when slow or failed, else an event through the public API."""
        scope = event.scope
        record = None if scope is None else scope.state.get(self)
        if type(record) is not _ScopeRecord or record.span is None:
            record = None
        if event.error is None and event.duration < self.span_threshold:
            if record is not None and record.span is not None:
                record.span.add_event(name, _event_attributes(event), timestamp=event.start_ns)
            return
        self._component_span(name, event, record)

    def _component_span(
        self, name: str, event: ComponentEvent, record: _ScopeRecord | None
    ) -> None:
        tracer = self._tracer
        if tracer is None:
            return
        attributes: dict[str, str | bool] = {
            "ambient.component": event.name,
            "ambient.lifetime": event.lifetime._value_,
        }
        if record is not None and record.span is not None:
            parent = trace.set_span_in_context(record.span, record.parent)
        else:
            # Cleanup at idle expiry or shutdown: no scope, so a trace of its own (the
            # current span may belong to another user's request).
            parent = Context()
            if event.user is not None:
                attributes.update(self._user_attributes(event.user))
        span = tracer.start_span(
            name,
            context=parent,
            kind=_INTERNAL,
            attributes=attributes,
            start_time=event.start_ns,
        )
        error = event.error
        if error is not None:
            _record_end(span, error, self._ids.hidden)
        span.end(end_time=event.start_ns + round(event.duration * 1e9))

    # -- migration -----------------------------------------------------------------------

    def record_global_access(self, name: str) -> None:
        """Count one access to the guarded global ``name`` (``ambient.global_state.accesses``)."""
        if self._meter_pending and monotonic() >= self._next_check:
            self._recheck()
        instruments = self._instruments
        if instruments is None:
            return
        try:
            instruments.global_accesses.add(1, {"ambient.global": name})
        except Exception:  # noqa: BLE001 - logged once; never breaks a request
            self._failed("record_global_access")

    def _record_own_global_access(self, name: str) -> None:
        # Guarded globals count their accesses on the global meter provider themselves; a
        # telemetry with a provider of its own counts them there too.
        provider = self._meter_provider_arg
        if provider is not None and provider is not metrics.get_meter_provider():
            self.record_global_access(name)

    def __repr__(self) -> str:
        state = "dormant" if self._dormant else "active"
        return f"<Telemetry {state} user_id={self._ids.user_policy!r}>"
