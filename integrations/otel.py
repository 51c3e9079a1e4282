"""Send traces and metrics to an OTLP/HTTP collector (Jaeger, the OpenTelemetry Collector).

Needs the ``otlp`` extra (``pip install 'ambient-context[otlp]'``): the OpenTelemetry SDK and
its OTLP/HTTP exporter. Jaeger's all-in-one image accepts OTLP/HTTP on port 4318::

    handle = configure_tracing("agent-backend", "http://localhost:4318", metrics=False)
    registry = Registry(telemetry=Telemetry())       # uses the global providers set here

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        handle.shutdown()                             # flushes what is buffered

Flush in the application's lifespan shutdown, not after ``uvicorn.run()`` or in an
``atexit`` hook: uvicorn ends the process with the SIGTERM it got once its graceful shutdown
is done, and neither would run (the spans still buffered would be lost).

With ``endpoint=None`` the exporters follow the standard environment variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_COMPRESSION``, ...), defaulting to
``http://localhost:4318``; ``OTEL_BSP_*`` tune the batch span processor and
``OTEL_METRIC_EXPORT_INTERVAL`` the metric export period.
"""

from __future__ import annotations

import logging
import math
import re
import urllib.parse
from collections.abc import Mapping

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from ambient import _checks
from ambient.middleware.identity import _header_name
from ambient.telemetry import IdPolicy, Telemetry

__all__ = ["TracingHandle", "configure_tracing"]

logger = logging.getLogger("ambient")


class TracingHandle:
    """The providers :func:`configure_tracing` built; ``shutdown()`` flushes and stops them.

    Attributes:
        tracer_provider: The SDK tracer provider (OTLP/HTTP exporter, batch processor).
        meter_provider: The SDK meter provider, or ``None`` with ``metrics=False``.
    """

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider | None):
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._shut_down = False

    def telemetry(
        self,
        *,
        user_id: IdPolicy = "hash",
        tenant_id: IdPolicy = "raw",
        hash_key: bytes | str | None = None,
        span_threshold: float = 0.001,
        baggage: tuple[str, ...] = (),
    ) -> Telemetry:
        """A :class:`~ambient.telemetry.Telemetry` on these providers (global or not)."""
        return Telemetry(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            user_id=user_id,
            tenant_id=tenant_id,
            hash_key=hash_key,
            span_threshold=span_threshold,
            baggage=baggage,
        )

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Export everything buffered now; ``False`` when it did not finish in time.

        Raises:
            TypeError: ``timeout`` is no number of seconds.
            ValueError: ``timeout`` is infinite or NaN (an OverflowError or ValueError
                that named nothing).
        """
        seconds = _checks.number(timeout, "timeout")
        if math.isnan(seconds):
            msg = "timeout must be a number of seconds, not nan"
            raise ValueError(msg)
        millis = int(seconds * 1000)
        done = self.tracer_provider.force_flush(millis)
        if self.meter_provider is not None:
            done = self.meter_provider.force_flush(millis) and done
        return done

    def shutdown(self) -> None:
        """Flush and stop the exporters (once; later calls do nothing)."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self.tracer_provider.shutdown()
        finally:
            # Even when the tracer provider's shutdown raised: the metrics still flush.
            if self.meter_provider is not None:
                self.meter_provider.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else "running"
        return f"<TracingHandle {state}>"


_SIGNALS = ("traces", "metrics", "logs")


def _signal_url(endpoint: str, path: str) -> str:
    return f"{endpoint.rstrip('/')}/{path}"


def _check_endpoint(endpoint: object) -> None:
    # The exporter takes any string and fails only as it exports, logging each lost batch
    # while force_flush() still reports success: refused here, at start-up, instead.
    parts = urllib.parse.urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        msg = (
            "endpoint must be the collector's http:// or https:// base URL, such as "
            f"'http://localhost:4318', not {endpoint!r}"
        )
        raise ValueError(msg)
    try:
        parts.port  # noqa: B018 - read to check: one that is no number or out of range raises
    except ValueError:
        msg = f"endpoint must have a port from 0 to 65535, if any, not {endpoint!r}"
        raise ValueError(msg) from None
    # After a query or a fragment (even an empty one), the signal's path is not a path.
    traces = urllib.parse.urlsplit(_signal_url(str(endpoint), "v1/traces"))
    if not traces.path.endswith("/v1/traces"):
        msg = (
            "endpoint must be the collector's base URL, without a query or fragment (the "
            f"signal's path is appended to it), not {endpoint!r}"
        )
        raise ValueError(msg)
    path = parts.path.rstrip("/")
    head, _, signal = path.rpartition("/")
    if signal in _SIGNALS and head.endswith("/v1"):
        # A signal's own URL, as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT takes it: the signal's
        # path would be appended again and every batch answered 404.
        base = urllib.parse.urlunsplit(parts._replace(path=head.removesuffix("/v1")))
        msg = (
            "endpoint must be the collector's base URL, without a signal's path: "
            f"{base!r}, not {endpoint!r} (traces go to <endpoint>/v1/traces, metrics "
            "to <endpoint>/v1/metrics)"
        )
        raise ValueError(msg)


# RFC 9110 field-value: visible characters (Latin-1 beyond ASCII), spaces and tabs inside.
_HEADER_VALUE = re.compile(r"(?:[!-~\x80-\xff](?:[\t -~\x80-\xff]*[!-~\x80-\xff])?)?")


def _check_headers(headers: object) -> None:
    # As with the endpoint: a header the exporter cannot send fails every export, each lost
    # batch only logged. The value is never echoed: it is usually a credential.
    if not isinstance(headers, Mapping):
        msg = f"headers must be a mapping of header names to values, not {type(headers).__name__}"
        raise TypeError(msg)
    for name, value in headers.items():
        _header_name(name, "a name in headers")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            msg = (
                f"the value of {name!r} in headers must be a str of visible Latin-1 characters, "
                "with spaces or tabs only inside and no line break"
            )
            raise ValueError(msg)


def configure_tracing(
    service_name: str,
    endpoint: str | None = None,
    *,
    metrics: bool = True,
    set_global: bool = True,
    resource_attributes: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> TracingHandle:
    """Build SDK tracer and meter providers exporting over OTLP/HTTP.

    Args:
        service_name: ``service.name`` of the resource (how Jaeger lists the service).
        endpoint: Collector base URL, e.g. ``"http://localhost:4318"``; traces go to
            ``<endpoint>/v1/traces``, metrics to ``<endpoint>/v1/metrics``. ``None`` follows
            the ``OTEL_EXPORTER_OTLP_*`` environment variables.
        metrics: Also export metrics (turn off for a Jaeger-only setup: Jaeger
            accepts traces, not metrics).
        set_global: Install the providers as OpenTelemetry's global ones, so
            ``Telemetry()`` and other instrumentation use them. OpenTelemetry allows that once
            per process; a second time logs a warning and the handle's providers stay local
            (use :meth:`TracingHandle.telemetry`).
        resource_attributes: More resource attributes (``deployment.environment``, ...).
        headers: Extra export headers (e.g. an API key); default ``OTEL_EXPORTER_OTLP_HEADERS``.

    Returns:
        A :class:`TracingHandle`; call ``shutdown()`` in the application's lifespan
        shutdown to flush (see the module's docs: not after ``uvicorn.run()``).

    Raises:
        ValueError: ``service_name`` is empty, ``endpoint`` is not an ``http://`` or
            ``https://`` URL naming a host, has a port that is no number from 0 to 65535,
            a query or a fragment, or ends in a signal's path (``/v1/traces``), or a name
            in ``headers`` is no HTTP token or its value no header value (not a ``str``, a
            line break, a character outside Latin-1).
        TypeError: ``headers`` is not a mapping.
    """
    if not isinstance(service_name, str) or not service_name.strip():
        msg = "service_name must be a non-empty str (it becomes the resource's service.name)"
        raise ValueError(msg)
    if endpoint is not None:
        _check_endpoint(endpoint)
    if headers is not None:
        _check_headers(headers)
    resource = Resource.create({**(resource_attributes or {}), SERVICE_NAME: service_name})
    span_exporter = OTLPSpanExporter(
        endpoint=None if endpoint is None else _signal_url(endpoint, "v1/traces"),
        headers=headers,
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = None
    if metrics:
        metric_exporter = OTLPMetricExporter(
            endpoint=None if endpoint is None else _signal_url(endpoint, "v1/metrics"),
            headers=headers,
        )
        meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
        )
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        if trace.get_tracer_provider() is not tracer_provider:
            logger.warning(
                "ambient: a global tracer provider was already installed; configure_tracing's "
                "stays local, use handle.telemetry() to trace with it"
            )
        if meter_provider is not None:
            otel_metrics.set_meter_provider(meter_provider)
            if otel_metrics.get_meter_provider() is not meter_provider:
                logger.warning(
                    "ambient: a global meter provider was already installed; "
                    "configure_tracing's stays local"
                )
    return TracingHandle(tracer_provider, meter_provider)
