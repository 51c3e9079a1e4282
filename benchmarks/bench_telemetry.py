"""Per-request cost of ambient's telemetry, side by side with a bare OpenTelemetry server span.

Drives ASGI apps directly (no server, no sockets: only the middleware and telemetry work is
measured) on one asyncio loop, interleaving short blocks of each stack, and prints the cost
per request of each stack (its best block) and its overhead over the bare app:

* ``AmbientMiddleware`` without telemetry, with an observer that does nothing (the core's
  price for any observer), and with ``Telemetry()`` but no OpenTelemetry SDK (global no-op
  proxies: the cost has to stay under 0.5 us per request);
* ambient with ``Telemetry`` on an SDK ``TracerProvider`` + ``BatchSpanProcessor`` and an SDK
  ``MeterProvider`` (exporters that drop everything: export cost is not ours), and on the
  tracer alone (a no-op meter);
* ``opentelemetry-instrumentation-asgi``'s ``OpenTelemetryMiddleware`` around the bare app on
  the same SDK (server span only, with and without the meter, and with its default per-send
  spans);
* both together, as a traced application runs them.

Each request resolves ``--components`` components: 1 is a REQUEST one with a cleanup, 2 adds a
USER one shared by the user's requests, 3 is three REQUEST components of which one has a
cleanup (the issue's "ambient + 3"); 0 measures the scope alone.

Run: ``python benchmarks/bench_telemetry.py [--block 1000] [--blocks 40] [--components 2]``
(``--components 3`` for the three REQUEST components of the performance target)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import ambient
from ambient import ComponentEvent, Lifetime, Observer, Registry, UserExecutionContext, UserRef
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import Telemetry

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class DropSpans(SpanExporter):
    """Accepts every batch and keeps nothing."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class DropMetrics(MetricExporter):
    """Accepts every collection and keeps nothing."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self._temporality = AggregationTemporality.CUMULATIVE

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


class Dispatcher:
    """A REQUEST component with a cleanup."""

    def close(self) -> None:
        pass


class Memory:
    """A USER component."""

    def __init__(self, user: UserRef) -> None:
        self.user = user


class Engine:
    """A REQUEST component without a cleanup."""


class Session:
    """Another REQUEST component without a cleanup."""


def endpoint(components: int) -> App:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if components:
            await ambient.resolve(Dispatcher)
        if components == 2:
            await ambient.resolve(Memory)
        elif components == 3:
            await ambient.resolve(Engine)
            await ambient.resolve(Session)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def bare(components: int) -> App:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def with_ambient(app: App, telemetry: Observer | None) -> App:
    """AmbientMiddleware around ``app``: identity from `x-user-id` (trusted loopback)."""
    registry = Registry()
    registry.register(Dispatcher, Dispatcher)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register(Engine, Engine)
    registry.register(Session, Session)
    return AmbientMiddleware(  # type: ignore[return-value]
        app, registry=registry, identity=trusted_header(), telemetry=telemetry
    )


def http_scope(user: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/work",
        "raw_path": b"/work",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-user-id", user.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


async def run(app: App, scopes: list[dict[str, Any]], n: int) -> float:
    """Seconds per request for ``n`` sequential requests."""
    count = len(scopes)
    gc.collect()
    started = time.perf_counter()
    for i in range(n):
        await app(scopes[i % count], receive, send)
    return (time.perf_counter() - started) / n


def hook_cost(observer: Observer, components: int) -> float:
    """Seconds the observer's own hooks take for one request, called directly."""
    scope = Registry().open_scope(UserExecutionContext.create("user-0"))
    event = ComponentEvent(
        Dispatcher, "Dispatcher", Lifetime.REQUEST, object(), None, scope, 0, 0.0
    )

    def one_request() -> None:
        observer.scope_opened(scope)
        for _ in range(components):
            observer.component_created(event)
            observer.component_cleaned(event)
        observer.scope_closed(scope, ())

    number = 200_000
    return min(timeit.repeat(one_request, number=number, repeat=5)) / number


async def main(block: int, blocks: int, components: int) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"

    spans = DropSpans()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(spans, max_queue_size=1_000_000))
    meter_provider = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(DropMetrics(), 60_000)]
    )
    sdk = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    traced = Telemetry(tracer_provider=tracer_provider, meter_provider=NoOpMeterProvider())
    no_sdk = Telemetry()
    assert not no_sdk.active
    assert sdk.active

    def asgi(app: App, *, default_spans: bool = False, metered: bool = True) -> App:
        return OpenTelemetryMiddleware(  # type: ignore[no-any-return]
            app,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider if metered else NoOpMeterProvider(),
            exclude_spans=None if default_spans else ["receive", "send"],
        )

    stacks: dict[str, App] = {
        "bare app": bare(components),
        "ambient, no telemetry": with_ambient(endpoint(components), None),
        "ambient + a do-nothing Observer()": with_ambient(endpoint(components), Observer()),
        "ambient + Telemetry, no SDK": with_ambient(endpoint(components), no_sdk),
        "ambient + Telemetry, SDK+batch": with_ambient(endpoint(components), sdk),
        "ambient + Telemetry, tracing only": with_ambient(endpoint(components), traced),
        "otel-asgi server span, SDK+batch": asgi(bare(components)),
        "otel-asgi server span, tracing only": asgi(bare(components), metered=False),
        "otel-asgi default (send spans)": asgi(bare(components), default_spans=True),
        "otel-asgi + ambient + Telemetry": asgi(with_ambient(endpoint(components), sdk)),
    }
    scopes = [http_scope(f"user-{i}") for i in range(100)]
    results: dict[str, list[float]] = {name: [] for name in stacks}
    for app in stacks.values():  # warm up: USER components, caches, code paths
        await run(app, scopes, 2000)
    # Short blocks, interleaved in a fresh random order each time: a burst of load from
    # elsewhere on the machine spoils a few blocks of every stack, not one stack's result.
    order = list(stacks)
    rng = random.Random(1)
    for _ in range(blocks):
        rng.shuffle(order)
        for name in order:
            results[name].append(await run(stacks[name], scopes, block))
    tracer_provider.shutdown()
    meter_provider.shutdown()

    best = {name: min(values) * 1e6 for name, values in results.items()}
    median = {name: statistics.median(values) * 1e6 for name, values in results.items()}
    base = best["bare app"]
    asgi_cost = best["otel-asgi server span, SDK+batch"] - base
    print(
        f"per-request cost: {blocks} interleaved blocks of {block} requests per stack, "
        f"{components} component(s) per request; best block [median block]"
    )
    print(f"{'stack':36} {'us/req':>16} {'overhead':>9} {'vs otel-asgi':>13}")
    for name in stacks:
        overhead = best[name] - base
        ratio = overhead / asgi_cost if name != "bare app" else 0.0
        print(f"{name:36} {best[name]:7.2f} [{median[name]:6.2f}] {overhead:8.2f}  {ratio:11.2f}x")
    no_sdk_cost = best["ambient + Telemetry, no SDK"] - best["ambient, no telemetry"]
    observer_cost = best["ambient + a do-nothing Observer()"] - best["ambient, no telemetry"]
    sdk_cost = best["ambient + Telemetry, SDK+batch"] - best["ambient, no telemetry"]
    own = hook_cost(no_sdk, components) * 1e9
    nothing = hook_cost(Observer(), components) * 1e9
    print()
    print(
        f"Telemetry with no SDK, end to end: {no_sdk_cost:+.2f} us/request (target < 0.5 us); "
        f"a do-nothing Observer(): {observer_cost:+.2f} us"
    )
    print(
        f"  Telemetry's own hooks with no SDK, called directly: {own:.0f} ns/request "
        f"(a do-nothing Observer's: {nothing:.0f} ns); the rest is the core building and "
        "dispatching events for any observer"
    )
    print(
        f"Telemetry with SDK+batch: {sdk_cost:+.2f} us/request = "
        f"{sdk_cost / asgi_cost:.2f}x a bare otel-asgi server span ({asgi_cost:.2f} us)"
    )
    traced_cost = best["ambient + Telemetry, tracing only"] - best["ambient, no telemetry"]
    asgi_traced = best["otel-asgi server span, tracing only"] - base
    print(
        f"Telemetry, tracing only: {traced_cost:+.2f} us/request = "
        f"{traced_cost / asgi_traced:.2f}x otel-asgi's server span, tracing only "
        f"({asgi_traced:.2f} us); of that, any observer's core cost: {observer_cost:+.2f} us"
    )
    print(f"spans exported to the dropping exporter: {spans.exported}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=1000, help="requests per timed block")
    parser.add_argument("--blocks", type=int, default=40, help="timed blocks per stack")
    parser.add_argument("--components", type=int, default=2, choices=(0, 1, 2, 3))
    options = parser.parse_args()
    asyncio.run(main(options.block, options.blocks, options.components))
