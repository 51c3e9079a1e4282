"""On the wire: what configure_tracing sends to an OTLP/HTTP collector (what Jaeger ingests).

A small OTLP/HTTP receiver runs on 127.0.0.1 and decodes the protobuf payloads with
opentelemetry-proto; requests go through AmbientMiddleware on a real uvicorn server behind
opentelemetry-instrumentation-asgi.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import baggage as otel_baggage
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

import ambient
from ambient import Lifetime, Registry, UserRef
from ambient.integrations.otel import TracingHandle, configure_tracing
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import Telemetry, hash_id
from tests.documented import ROOT
from tests.servers import serve


class Receiver:
    """An OTLP/HTTP collector on 127.0.0.1 that keeps every decoded export request."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                # The path as sent: http.server collapses a leading "//" in self.path, which
                # a collector's router would not find.
                path = self.requestline.split()[1]
                response: Any
                with receiver._lock:
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    if path == "/v1/traces":
                        receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                        response = ExportTraceServiceResponse()
                    elif path == "/v1/metrics":
                        receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                        response = ExportMetricsServiceResponse()
                    else:
                        receiver.rejected.append(path)
                        self.send_response(404)
                        self.end_headers()
                        return
                payload = response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def spans(self) -> list[tuple[dict[str, Any], ProtoSpan]]:
        """Every received span with its resource attributes."""
        found = []
        for request in self.traces:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found

    def last_metrics(self) -> dict[str, Any]:
        """The newest data of each metric of instrumentation scope ``ambient``."""
        found: dict[str, Any] = {}
        for request in self.metrics:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    if scope_metrics.scope.name != "ambient":
                        continue
                    for metric in scope_metrics.metrics:
                        found[metric.name] = metric
        return found


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


def attributes(items: Any) -> dict[str, Any]:
    return {item.key: value(item.value) for item in items if isinstance(item, KeyValue)}


@pytest.fixture(name="receiver")
def fixture_receiver() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


class Dispatcher:
    def close(self) -> None:
        pass


class Memory:
    def __init__(self, user: UserRef) -> None:
        self.user = user


def broken() -> Iterator[str]:
    yield "socket"
    raise ConnectionResetError("peer gone")


def make_app(telemetry: Telemetry) -> Any:
    """AmbientMiddleware (identity from `x-user-id`) around an endpoint resolving two
    components, and on `/fail` one whose cleanup fails after the response went out."""
    registry = Registry()
    registry.register(Dispatcher, Dispatcher)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("socket", broken)

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await ambient.resolve(Dispatcher)
        await ambient.resolve(Memory)
        if scope["path"] == "/fail":
            await ambient.resolve("socket")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return AmbientMiddleware(
        endpoint, registry=registry, identity=trusted_header(), telemetry=telemetry
    )


async def drive(handle: TracingHandle, telemetry: Telemetry, paths: list[tuple[str, str]]) -> None:
    app = OpenTelemetryMiddleware(
        make_app(telemetry),
        tracer_provider=handle.tracer_provider,
        meter_provider=handle.meter_provider,
        exclude_spans=["receive", "send"],
    )
    with serve("uvicorn", app, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def call(n: int, path: str, user: str) -> None:
                response = await client.get(
                    path, headers={"x-user-id": user, "x-request-id": f"req-{n}"}
                )
                assert response.status_code == 200

            async with anyio.create_task_group() as tg:
                for n, (path, user) in enumerate(paths):
                    tg.start_soon(call, n, path, user)
    # Flushes the batch span processor and the metric reader over OTLP/HTTP.
    await anyio.to_thread.run_sync(handle.shutdown)


async def test_spans_and_metrics_arrive_as_a_collector_sees_them(receiver: Receiver) -> None:
    """service.name, span names, parent links, attributes and metric values, decoded from
    the OTLP/HTTP protobuf that configure_tracing sent."""
    handle = configure_tracing(
        "ambient-wire-test",
        receiver.url,
        set_global=False,
        resource_attributes={"deployment.environment": "test"},
    )
    telemetry = handle.telemetry(span_threshold=0, hash_key=b"wire")
    paths = [("/fail" if n % 5 == 0 else "/ok", f"user-{n % 10}") for n in range(20)]
    await drive(handle, telemetry, paths)

    assert receiver.rejected == []
    spans = receiver.spans()
    for resource, _ in spans:
        assert resource["service.name"] == "ambient-wire-test"
        assert resource["deployment.environment"] == "test"
    by_id = {span.span_id: span for _, span in spans}
    servers = [s for s in by_id.values() if s.kind == ProtoSpan.SPAN_KIND_SERVER]
    scopes = [s for s in by_id.values() if s.name == "ambient.scope"]
    assert len(servers) == 20
    assert len(scopes) == 20
    names = {s.name for s in by_id.values()}
    assert {"ambient.scope", "ambient.resolve", "ambient.cleanup"} <= names
    assert names == {"GET /ok", "GET /fail", "ambient.scope", "ambient.resolve", "ambient.cleanup"}

    children: dict[bytes, list[ProtoSpan]] = {}
    for span in by_id.values():
        children.setdefault(span.parent_span_id, []).append(span)
    failed_scopes = 0
    for scope_span in scopes:
        scope_attributes = attributes(scope_span.attributes)
        parent = by_id[scope_span.parent_span_id]
        assert parent.kind == ProtoSpan.SPAN_KIND_SERVER
        assert parent.trace_id == scope_span.trace_id
        assert scope_span.kind == ProtoSpan.SPAN_KIND_INTERNAL
        n = int(scope_attributes["ambient.request_id"].removeprefix("req-"))
        path, user = paths[n]
        assert scope_attributes["ambient.user_id"] == hash_id(user, b"wire")
        assert user not in str(scope_span)
        mine = children[scope_span.span_id]
        assert {s.trace_id for s in mine} == {scope_span.trace_id}
        kinds = sorted(
            (s.name, attributes(s.attributes)["ambient.component"])
            for s in mine
            if s.name != "ambient.scope"
        )
        expected = [("ambient.cleanup", "Dispatcher"), ("ambient.resolve", "Dispatcher")]
        if path == "/fail":
            expected += [("ambient.cleanup", "'socket'"), ("ambient.resolve", "'socket'")]
        created_memory = ("ambient.resolve", "Memory") in kinds
        if created_memory:
            expected.append(("ambient.resolve", "Memory"))
        assert kinds == sorted(expected)
        if path == "/fail":
            failed_scopes += 1
            assert scope_span.status.code == ProtoStatus.STATUS_CODE_ERROR
            assert scope_attributes["ambient.cleanup.failures"] == 1
            (cleanup,) = [
                s
                for s in mine
                if s.name == "ambient.cleanup"
                and attributes(s.attributes)["ambient.component"] == "'socket'"
            ]
            assert cleanup.status.code == ProtoStatus.STATUS_CODE_ERROR
            assert [e.name for e in cleanup.events] == ["exception"]
        else:
            assert scope_attributes["ambient.cleanup.failures"] == 0
    assert failed_scopes == 4
    memory_creations = [
        s
        for s in by_id.values()
        if s.name == "ambient.resolve" and attributes(s.attributes)["ambient.component"] == "Memory"
    ]
    assert len(memory_creations) == 10  # once per user

    metrics = receiver.last_metrics()
    assert metrics["ambient.scopes.active"].sum.data_points[0].as_int == 0
    assert metrics["ambient.cleanup.failures"].sum.data_points[0].as_int == 4
    assert metrics["ambient.user_components.live"].sum.data_points[0].as_int == 10
    creations = {
        attributes(p.attributes)["ambient.component"]: p.count
        for p in metrics["ambient.component.create.duration"].histogram.data_points
    }
    assert creations == {"Dispatcher": 20, "Memory": 10, "'socket'": 4}
    for metric in metrics.values():
        data = getattr(metric, metric.WhichOneof("data"))
        for point in data.data_points:
            values = set(map(str, attributes(point.attributes).values()))
            assert not any(v.startswith("user-") for v in values)


async def test_environment_variables_are_honoured(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """endpoint=None: OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_EXPORTER_OTLP_HEADERS apply."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret")
    handle = configure_tracing("from-env", set_global=False, metrics=False)
    await drive(handle, handle.telemetry(), [("/ok", "alice")])
    assert receiver.metrics == []
    names = {span.name for _, span in receiver.spans()}
    assert "ambient.scope" in names
    assert {resource["service.name"] for resource, _ in receiver.spans()} == {"from-env"}
    assert all(h.get("x-api-key") == "s3cret" for h in receiver.headers)


def test_an_endpoint_with_a_slash_and_headers_reach_both_signals(receiver: Receiver) -> None:
    """An endpoint given with a trailing slash (``http://collector:4318/``) and export
    headers (an API key): spans and metrics both go to ``/v1/traces`` and ``/v1/metrics``
    with the headers; and force_flush() says False when the traces did not flush, even
    though the metrics did."""
    handle = configure_tracing(
        "slashed", receiver.url + "/", set_global=False, headers={"x-api-key": "s3cret"}
    )
    assert handle.meter_provider is not None
    handle.tracer_provider.get_tracer("test").start_span("test.span").end()
    handle.meter_provider.get_meter("test").create_counter("ambient.test.count").add(1)
    assert handle.force_flush(timeout=5)
    assert receiver.rejected == []
    assert [span.name for _, span in receiver.spans()] == ["test.span"]
    assert receiver.metrics != []
    assert len(receiver.headers) == len(receiver.traces) + len(receiver.metrics)
    assert all(h.get("x-api-key") == "s3cret" for h in receiver.headers)

    def unfinished(timeout_millis: int = 30000) -> bool:
        return False

    handle.tracer_provider.force_flush = unfinished  # type: ignore[method-assign]
    assert handle.force_flush(timeout=5) is False
    handle.shutdown()


def test_shutdown_is_idempotent_and_validates_the_name(receiver: Receiver) -> None:
    """shutdown() twice is harmless; an empty service name is refused."""
    handle = configure_tracing("twice", receiver.url, set_global=False)
    assert handle.force_flush(timeout=5)
    handle.shutdown()
    handle.shutdown()
    assert "shut down" in repr(handle)
    with pytest.raises(ValueError, match="service_name"):
        configure_tracing(" ", set_global=False)


def test_metrics_still_flush_when_the_tracer_providers_shutdown_fails(
    receiver: Receiver,
) -> None:
    """The tracer provider's shutdown raises (an exporter's bug): the error reaches the
    caller, and the meter provider is shut down all the same, its last metrics exported.
    The handle had marked itself shut down first and never reached the meter provider."""
    handle = configure_tracing("failing", receiver.url, set_global=False)
    assert handle.meter_provider is not None
    handle.meter_provider.get_meter("test").create_counter("ambient.test.count").add(1)

    def broken() -> None:
        raise RuntimeError("exporter bug")

    handle.tracer_provider.shutdown = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="exporter bug"):
        handle.shutdown()
    assert any(
        metric.name == "ambient.test.count"
        for request in receiver.metrics
        for resource in request.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )
    handle.shutdown()  # once: nothing more happens


def test_global_setup_in_a_fresh_process(receiver: Receiver) -> None:
    """The README flow in a fresh process: ``set_global=False`` leaves the global providers
    alone (a handle that took them anyway left the application's own setup local, with a
    warning), then configure_tracing installs the global providers,
    a plain Telemetry() uses them, a second configure_tracing warns and stays local, and
    shutdown() delivers the spans."""
    code = f"""
import asyncio, logging
from opentelemetry import metrics, trace
from ambient import Registry, UserExecutionContext
from ambient.integrations.otel import configure_tracing
from ambient.telemetry import Telemetry

logging.basicConfig(level=logging.WARNING, format="%(message)s")
local = configure_tracing("local-only", {receiver.url!r}, set_global=False)
assert trace.get_tracer_provider() is not local.tracer_provider
assert metrics.get_meter_provider() is not local.meter_provider
local.shutdown()
handle = configure_tracing("global-service", {receiver.url!r})
assert trace.get_tracer_provider() is handle.tracer_provider
assert metrics.get_meter_provider() is handle.meter_provider
logging.warning("the global providers are set")
second = configure_tracing("second", {receiver.url!r})
assert trace.get_tracer_provider() is handle.tracer_provider
registry = Registry(telemetry=Telemetry())

async def main():
    async with registry.open_scope(UserExecutionContext.create("alice")):
        pass

asyncio.run(main())
second.shutdown()
handle.shutdown()
"""
    out = subprocess.run(  # noqa: S603 - our own interpreter, fixed code
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    # Only the second call warns: the first installed the global providers.
    before, _, after = out.stderr.partition("the global providers are set")
    assert "already installed" not in before
    assert after.count("a global tracer provider was already installed") == 1
    assert after.count("a global meter provider was already installed") == 1
    spans = receiver.spans()
    assert [span.name for _, span in spans] == ["ambient.scope"]
    assert spans[0][0]["service.name"] == "global-service"
    assert "ambient.scopes.active" in receiver.last_metrics()


def test_the_demo_flushes_its_telemetry_when_the_server_is_stopped(receiver: Receiver) -> None:
    """``ambient demo`` with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, stopped with SIGTERM as a
    container runtime stops it: uvicorn ends the process with that signal after its graceful
    shutdown, so the spans still buffered were never sent. They are flushed at the end of
    the lifespan shutdown now."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        # Long enough that nothing is exported before the shutdown flushes it.
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    env.pop("AMBIENT_DATABASE_URL", None)
    with subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "ambient", "demo", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    answer = httpx.get(
                        f"http://127.0.0.1:{port}/history",
                        headers={"x-user-id": "alice"},
                        timeout=5,
                    )
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the demo did not start"
                    assert server.poll() is None, "the demo exited"
                    time.sleep(0.05)  # polling a starting process: bounded by the deadline
            assert answer.status_code == 200
            assert receiver.spans() == []  # still buffered
            server.send_signal(signal.SIGTERM)
            _, errors = server.communicate(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=10)
    names = {span.name for _, span in receiver.spans()}
    assert "ambient.scope" in names, errors
    assert "ambient.scopes.active" in receiver.last_metrics()


def test_the_readmes_jaeger_example_flushes_at_the_lifespan_shutdown(receiver: Receiver) -> None:
    """The README's tracing example, run as written under uvicorn in a fresh process (it
    installs the global providers): the request's scope span reaches the collector when the
    server stops, through the lifespan's ``tracing.shutdown()``, with the user id hashed,
    and ``metrics=False`` sends no metrics."""
    code = f"""
import contextlib, httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import ambient
from ambient import Registry
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from tests.documented import documented_code
from tests.servers import serve

async def home(request):
    return PlainTextResponse(ambient.get_current_context().user_id)

namespace = {{
    "contextlib": contextlib, "Registry": Registry, "AmbientMiddleware": AmbientMiddleware,
    "Starlette": Starlette, "trusted_header": trusted_header, "routes": [Route("/", home)],
}}
code = documented_code("README.md", "## Traces in Jaeger")
exec(code.replace("http://localhost:4318", {receiver.url!r}), namespace)
with serve("uvicorn", namespace["app"]) as url:
    assert httpx.get(url, headers={{"x-user-id": "alice"}}).text == "alice"
"""
    out = subprocess.run(  # noqa: S603 - our own interpreter, fixed code
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,  # where `tests` is found
    )
    assert out.returncode == 0, out.stderr
    ((resource, span),) = receiver.spans()
    assert (resource["service.name"], span.name) == ("agent-backend", "ambient.scope")
    user = attributes(span.attributes)["ambient.user_id"]
    assert len(user) == 16
    assert user != "alice"
    assert receiver.metrics == []


def test_the_service_name_given_wins_over_one_among_the_resource_attributes(
    receiver: Receiver,
) -> None:
    """``resource_attributes`` carrying a ``service.name`` of their own (a shared settings
    dict): the spans still name the service ``configure_tracing`` was given, with the other
    attributes kept. Merged the other way, the service was listed under the stray name."""
    handle = configure_tracing(
        "orders",
        receiver.url,
        set_global=False,
        metrics=False,
        resource_attributes={"service.name": "shared-defaults", "deployment.environment": "test"},
    )
    handle.tracer_provider.get_tracer("test").start_span("test.span").end()
    handle.shutdown()
    ((resource, span),) = receiver.spans()
    assert span.name == "test.span"
    assert resource["service.name"] == "orders"
    assert resource["deployment.environment"] == "test"


def test_the_handles_telemetry_passes_on_every_option(receiver: Receiver) -> None:
    """``handle.telemetry()`` makes a Telemetry with each option it was given: a raw user
    id, a tenant id hashed under the given key, every creation traced with a zero
    threshold, and the thread id put into baggage inside the scope. An option dropped on
    the way fell back to Telemetry's default (a hashed user id, a raw tenant id, no span
    for a fast creation, no baggage)."""
    handle = configure_tracing("options", receiver.url, set_global=False, metrics=False)
    telemetry = handle.telemetry(
        user_id="raw",
        tenant_id="hash",
        hash_key=b"tenant-key",
        span_threshold=0,
        baggage=("thread_id",),
    )
    registry = Registry(telemetry=telemetry)
    registry.register("baggage", lambda: dict(otel_baggage.get_all()))

    async def request() -> Any:
        ctx = ambient.UserExecutionContext.create("alice", tenant_id="acme", thread_id="t-1")
        async with registry.open_scope(ctx):
            return await ambient.resolve("baggage")

    seen = anyio.run(request)
    handle.shutdown()
    assert seen == {"ambient.thread_id": "t-1"}
    by_name = {span.name: attributes(span.attributes) for _, span in receiver.spans()}
    assert sorted(by_name) == ["ambient.resolve", "ambient.scope"]
    assert by_name["ambient.scope"]["ambient.user_id"] == "alice"
    assert by_name["ambient.scope"]["ambient.tenant_id"] == hash_id("acme", b"tenant-key")
    assert by_name["ambient.resolve"]["ambient.component"] == "'baggage'"


def test_force_flush_refuses_a_timeout_no_export_could_wait(receiver: Receiver) -> None:
    """An infinite timeout was Python's OverflowError and NaN its ValueError, naming
    nothing; each names the timeout now, and nothing was flushed or shut down."""
    handle = configure_tracing("flush-timeout", receiver.url, set_global=False)
    try:
        for timeout, error in ((float("inf"), ValueError), (float("nan"), ValueError)):
            with pytest.raises(error, match="^timeout must be a"):
                handle.force_flush(timeout=timeout)
        with pytest.raises(TypeError, match="^timeout must be a number of seconds"):
            handle.force_flush(timeout="5")  # type: ignore[arg-type]
        assert handle.force_flush(timeout=5) is True
    finally:
        handle.shutdown()


def test_force_flush_exports_the_metrics_even_when_the_traces_did_not_flush(
    receiver: Receiver,
) -> None:
    """force_flush() whose tracer provider did not finish in time still flushes the meter
    provider (and says False): the metrics recorded so far reach the collector before the
    next export period, instead of being skipped because the traces were late."""
    handle = configure_tracing("flushing", receiver.url, set_global=False)
    assert handle.meter_provider is not None
    handle.meter_provider.get_meter("test").create_counter("ambient.test.count").add(1)

    def unfinished(timeout_millis: int = 30000) -> bool:
        return False

    handle.tracer_provider.force_flush = unfinished  # type: ignore[method-assign]
    assert handle.force_flush(timeout=5) is False
    names = [
        metric.name
        for request in receiver.metrics
        for resource in request.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    ]
    assert names == ["ambient.test.count"]
    handle.shutdown()


def test_force_flush_gives_both_providers_its_timeout_in_milliseconds(receiver: Receiver) -> None:
    """``force_flush(timeout=2.5)`` waits at most 2.5 s for each provider: the SDK takes
    milliseconds, and a timeout passed on as seconds gave them 2 ms, reporting a flush
    that merely took longer than that as unfinished."""
    handle = configure_tracing("timeouts", receiver.url, set_global=False)
    assert handle.meter_provider is not None
    given: list[tuple[str, int]] = []

    def recording(signal: str) -> Any:
        def force_flush(timeout_millis: int = 30000) -> bool:
            given.append((signal, timeout_millis))
            return True

        return force_flush

    handle.tracer_provider.force_flush = recording("traces")  # type: ignore[method-assign]
    handle.meter_provider.force_flush = recording("metrics")  # type: ignore[method-assign]
    assert handle.force_flush(timeout=2.5) is True
    assert given == [("traces", 2500), ("metrics", 2500)]
    handle.shutdown()


@pytest.mark.parametrize(
    "endpoint",
    ["", "localhost:4318", "collector/v1", "grpc://collector:4317", "http://", "http:///v1"],
)
def test_an_endpoint_that_is_no_http_url_is_refused_at_configuration(endpoint: str) -> None:
    """An endpoint without ``http://`` or ``https://`` and a host (empty from an unset
    setting, a bare ``host:port``, the gRPC scheme) is refused by configure_tracing with
    a ValueError. It was accepted: every batch of spans then failed as it was exported,
    logged one by one, while force_flush() reported success."""
    with pytest.raises(ValueError, match="endpoint must be the collector's http"):
        configure_tracing("misconfigured", endpoint, set_global=False)


@pytest.mark.parametrize(
    ("endpoint", "refusal"),
    [
        ("http://127.0.0.1:43l8", "a port from 0 to 65535"),
        ("http://127.0.0.1:99999", "a port from 0 to 65535"),
        ("http://127.0.0.1:4318?tenant=acme", "without a query or fragment"),
        ("http://127.0.0.1:4318/otlp?", "without a query or fragment"),
        ("http://127.0.0.1:4318#traces", "without a query or fragment"),
    ],
    ids=["port-no-number", "port-out-of-range", "query", "empty-query", "fragment"],
)
def test_an_endpoint_no_signals_path_can_be_appended_to_is_refused_at_configuration(
    endpoint: str, refusal: str
) -> None:
    """A port that is no number or out of range, a query or a fragment (the signal's path
    appended after either is no path) is refused by configure_tracing with a ValueError
    saying which. It was accepted: every batch then reached no collector, or the base
    URL's path, answered 404, while force_flush() reported success."""
    with pytest.raises(ValueError, match=refusal) as refused:
        configure_tracing("misconfigured", endpoint, set_global=False)
    assert repr(endpoint) in str(refused.value)


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("http://collector:4318/v1/traces", "http://collector:4318"),
        ("http://collector:4318/v1/metrics/", "http://collector:4318"),
        ("https://gateway.example/otlp/v1/traces", "https://gateway.example/otlp"),
    ],
)
def test_an_endpoint_naming_a_signals_path_is_refused_with_its_base(
    endpoint: str, base: str
) -> None:
    """A signal's own URL (what ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` takes) is refused,
    naming the base URL to give instead. It was accepted and the signal's path appended
    again (``/v1/traces/v1/traces``): every batch was answered 404 and lost."""
    with pytest.raises(ValueError, match="without a signal's path") as refused:
        configure_tracing("misconfigured", endpoint, set_global=False)
    assert f"{base!r}, not {endpoint!r}" in str(refused.value)


@pytest.mark.parametrize("base", ["/traces", "/otlp/metrics/", "/v2/logs"])
def test_a_base_url_ending_in_a_signals_name_outside_v1_is_a_base(
    receiver: Receiver, base: str
) -> None:
    """Only ``/v1/<signal>`` is a signal's own path: a gateway's base URL whose last
    segment merely names a signal is accepted, and the signal's path appended to it."""
    handle = configure_tracing("routed", receiver.url + base, set_global=False, metrics=False)
    handle.tracer_provider.get_tracer("test").start_span("test.span").end()
    handle.force_flush(timeout=5)
    handle.shutdown()
    assert receiver.rejected == [base.rstrip("/") + "/v1/traces"]


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "s3cret\r\nx-injected: 1"},
        {"x-api-key": "сек s3cret"},
        {"x-api-key": 12345},
        {"x-api-key": " s3cret"},
        {"x api key": "s3cret"},
        {"": "s3cret"},
    ],
    ids=["line-break", "not-latin-1", "not-a-str", "leading-space", "name-with-spaces", "no-name"],
)
def test_export_headers_no_request_can_carry_are_refused_at_configuration(
    receiver: Receiver, headers: dict[Any, Any]
) -> None:
    """A header the exporter cannot send (a line break, a character outside Latin-1, a
    value that is no str, a name that is no HTTP token) is refused with a ValueError that
    does not echo the value (an API key, as a rule). It was accepted: every batch then
    failed as it was exported, logged one by one, while force_flush() reported success."""
    with pytest.raises(ValueError, match="headers") as refused:
        configure_tracing("misconfigured", receiver.url, set_global=False, headers=headers)
    assert "s3cret" not in str(refused.value)
    assert receiver.traces == []


def test_export_headers_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="headers must be a mapping"):
        configure_tracing(
            "misconfigured",
            "http://127.0.0.1:4318",
            set_global=False,
            headers=[("x-api-key", "s3cret")],  # type: ignore[arg-type]
        )


def test_export_headers_with_latin_1_and_inner_spaces_reach_the_collector(
    receiver: Receiver,
) -> None:
    """Values with spaces or a tab inside and Latin-1 letters (first and last too) are
    header values: sent."""
    headers = {"Authorization": "Bearer a.b.c", "x-team": "café\tcrème", "x-season": "été"}
    handle = configure_tracing("accepted", receiver.url, set_global=False, headers=headers)
    handle.tracer_provider.get_tracer("test").start_span("test.span").end()
    assert handle.force_flush(timeout=5)
    assert [span.name for _, span in receiver.spans()] == ["test.span"]
    sent = receiver.headers[0]
    assert (sent["authorization"], sent["x-team"]) == ("Bearer a.b.c", "café\tcrème")
    assert sent["x-season"] == "été"
    handle.shutdown()


@pytest.mark.parametrize("scheme", ["http", "https", "HTTP"])
def test_an_http_or_https_endpoint_is_accepted(receiver: Receiver, scheme: str) -> None:
    """Either scheme, in any case, is a collector's URL (spans go over plain HTTP here)."""
    url = receiver.url.replace("http", scheme, 1)
    handle = configure_tracing("accepted", url, set_global=False, metrics=False)
    if scheme != "https":
        handle.tracer_provider.get_tracer("test").start_span("test.span").end()
        assert handle.force_flush(timeout=5)
        assert [span.name for _, span in receiver.spans()] == ["test.span"]
    handle.shutdown()
