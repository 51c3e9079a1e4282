"""Trace context never bleeds between requests on real servers.

Many users at once on keep-alive connections, some requests pipelined several to a socket
(uvicorn on asyncio starts each of those inside the previous one's context), half of them
continuing a client's ``traceparent``, behind opentelemetry-instrumentation-asgi: every
request's ``ambient.scope`` span sits under its own server span, in its own trace (the
client's, when it sent one), with its own user; no span is another request's child. On
uvicorn, hypercorn (asyncio and trio workers) with spans collected in memory, and on granian
(its own process) with spans sent through the real OTLP/HTTP exporter.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind

import ambient
from ambient import Registry
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import Telemetry, hash_id
from tests.servers import SERVERS, granian_available, serve
from tests.test_otel_wire import Receiver, attributes
from tests.traced_app import HASH_KEY, build

KEPT_ALIVE, CONNECTIONS = 120, 12  # requests over pooled keep-alive connections
BATCHES, PER_BATCH = 8, 4  # pipelined: PER_BATCH requests written at once to one socket


@dataclass(frozen=True)
class Call:
    """One request: its user, its id and the client's trace parent, if it sent one."""

    user: str
    request_id: str
    parent: tuple[int, int] | None  # (trace id, span id)

    def headers(self) -> dict[str, str]:
        headers = {"x-user-id": self.user, "x-request-id": self.request_id}
        if self.parent is not None:
            trace_id, span_id = self.parent
            headers["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-01"
        return headers


@dataclass(frozen=True)
class SpanView:
    """What the checks read of a span, from the SDK or decoded from OTLP."""

    name: str
    server: bool
    trace_id: int
    span_id: int
    parent_id: int | None
    attributes: dict[str, Any]


def plan() -> tuple[list[Call], list[list[Call]]]:
    """Distinct users, half of them continuing a random client trace."""
    rng = random.Random(1)

    def call(n: int) -> Call:
        parent = (rng.getrandbits(128) or 1, rng.getrandbits(64) or 1) if n % 2 else None
        return Call(f"user-{n}", f"req-{n}", parent)

    kept_alive = [call(n) for n in range(KEPT_ALIVE)]
    batches = [
        [call(KEPT_ALIVE + b * PER_BATCH + i) for i in range(PER_BATCH)] for b in range(BATCHES)
    ]
    return kept_alive, batches


def pipelined(url: str, calls: list[Call]) -> list[dict[str, Any]]:
    """Write every request of ``calls`` to one socket at once; read their answers in order."""
    host, port = url.removeprefix("http://").split(":")
    payload = b"".join(
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in call.headers().items())
        + b"\r\n"
        for call in calls
    )
    answers: list[dict[str, Any]] = []
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(payload)
        data = b""
        while len(answers) < len(calls):
            head, separator, rest = data.partition(b"\r\n\r\n")
            if separator:
                lines = head.decode().split("\r\n")
                assert lines[0].startswith("HTTP/1.1 200"), lines[0]
                fields = dict(line.lower().split(": ", 1) for line in lines[1:])
                length = int(fields["content-length"])
                if len(rest) >= length:
                    answers.append(json.loads(rest[:length]))
                    data = rest[length:]
                    continue
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection early"
            data += chunk
    return answers


async def drive(url: str) -> dict[str, tuple[Call, dict[str, Any]]]:
    """Send every planned request, keep-alive and pipelined ones at once; return each
    request's call and answer by request id."""
    kept_alive, batches = plan()
    answers: dict[str, tuple[Call, dict[str, Any]]] = {}
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(call: Call) -> None:
            response = await client.get("/", headers=call.headers())
            assert response.status_code == 200, response.text
            answers[call.request_id] = (call, response.json())

        async def batch(calls: list[Call]) -> None:
            for call, answer in zip(
                calls, await anyio.to_thread.run_sync(pipelined, url, calls), strict=True
            ):
                answers[call.request_id] = (call, answer)

        async with anyio.create_task_group() as tg:
            for calls in batches:
                tg.start_soon(batch, calls)
            for call in kept_alive:
                tg.start_soon(one, call)
    return answers


def check(answers: dict[str, tuple[Call, dict[str, Any]]], spans: list[SpanView]) -> None:
    """Each request: its own user in its answer, and its own scope span under its own server
    span, in the client's trace or a new one of its own; no span crosses requests."""
    assert len(answers) == KEPT_ALIVE + BATCHES * PER_BATCH
    by_id = {span.span_id: span for span in spans}
    scopes = [span for span in spans if span.name == "ambient.scope"]
    assert len(scopes) == len(answers)
    scope_of = {str(span.attributes["ambient.request_id"]): span for span in scopes}
    assert sorted(scope_of) == sorted(answers)
    seen_traces: set[int] = set()
    for request_id, (call, answer) in answers.items():
        assert answer["user"] == answer["memory"] == call.user, (call, answer)
        assert answer["request_id"] == request_id
        scope = scope_of[request_id]
        assert scope.attributes["ambient.user_id"] == hash_id(call.user, HASH_KEY)
        # The endpoint ran under its own scope span.
        assert (answer["trace_id"], answer["span_id"]) == (
            f"{scope.trace_id:032x}",
            f"{scope.span_id:016x}",
        )
        assert scope.parent_id is not None, "a scope span lost its server span"
        server = by_id[scope.parent_id]
        assert server.server, server.name
        assert server.trace_id == scope.trace_id
        if call.parent is None:
            assert server.parent_id is None, f"{request_id}'s server span has a parent"
        else:
            assert (server.trace_id, server.parent_id) == call.parent
        assert scope.trace_id not in seen_traces, f"{request_id} shares another's trace"
        seen_traces.add(scope.trace_id)
    # Component spans sit under their own request's scope span, never another's.
    for span in spans:
        if span.name in ("ambient.resolve", "ambient.cleanup"):
            assert span.parent_id is not None
            assert by_id[span.parent_id].name == "ambient.scope"
            assert by_id[span.parent_id].trace_id == span.trace_id
    assert sum(span.name == "ambient.resolve" for span in spans) == 2 * len(answers)


class Collector(SpanProcessor):
    """Keeps every ended span; a test waits on it instead of sleeping."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self._cond = threading.Condition()

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            self.spans.append(span)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[ReadableSpan]], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.spans), 20)


def view(span: ReadableSpan) -> SpanView:
    assert span.context is not None
    return SpanView(
        span.name,
        span.kind is SpanKind.SERVER,
        span.context.trace_id,
        span.context.span_id,
        None if span.parent is None else span.parent.span_id,
        dict(span.attributes or {}),
    )


@pytest.fixture(name="collected")
def fixture_collected() -> Iterator[tuple[TracerProvider, Collector]]:
    collector = Collector()
    provider = TracerProvider()
    provider.add_span_processor(collector)
    yield provider, collector
    provider.shutdown()


@pytest.mark.parametrize("server", SERVERS)
async def test_keep_alive_and_pipelined_requests_each_stay_in_their_own_trace(
    server: str, collected: tuple[TracerProvider, Collector]
) -> None:
    """152 users at once, keep-alive and pipelined, half continuing a client trace."""
    provider, collector = collected
    # uvicorn starts a pipelined request inside the previous one's context, and the
    # instrumentation then starts its server span as a child of that request's span (only
    # uvicorn's reset_contextvars stops that); ambient's own spans need no such help, as
    # tests/test_telemetry.py's pipelining tests show without the instrumentation.
    options: dict[str, Any] = {"reset_contextvars": True} if server == "uvicorn" else {}
    with serve(server, build(provider), lifespan="off", **options) as url:
        answers = await drive(url)
        await anyio.to_thread.run_sync(
            lambda: collector.wait_for(
                lambda spans: sum(s.kind is SpanKind.SERVER for s in spans) == len(answers)
            )
        )
    check(answers, [view(span) for span in collector.spans])


@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
async def test_under_granian_through_the_otlp_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same traffic on granian (its own process), the spans exported over OTLP/HTTP."""
    with Receiver() as receiver:
        monkeypatch.setenv("TRACED_APP_COLLECTOR", receiver.url)
        with serve("granian", None, target="tests.traced_app:app") as url:
            answers = await drive(url)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                flushed = await client.post("/flush", headers={"x-user-id": "flusher"})
            assert flushed.status_code == 200
        spans = [
            SpanView(
                span.name,
                span.kind == span.SPAN_KIND_SERVER,
                int.from_bytes(span.trace_id, "big"),
                int.from_bytes(span.span_id, "big"),
                int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None,
                attributes(span.attributes),
            )
            for _, span in receiver.spans()
        ]
    # The flush request's own spans end after its flush; any exported later are left out.
    flusher = hash_id("flusher", HASH_KEY)
    check(answers, [s for s in spans if s.attributes.get("ambient.user_id") != flusher])


USERS_CALLING = 40


class Recorder:
    """A downstream service that keeps the headers of every request, by request id."""

    def __init__(self) -> None:
        self.headers: dict[str, dict[str, str]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.headers[headers["x-request-id"]] = headers
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn-trio"])
@pytest.mark.parametrize("fields", [(), ("user_id", "thread_id")], ids=["default", "baggage"])
async def test_outgoing_calls_carry_only_their_own_requests_trace_and_baggage(
    server: str, fields: tuple[str, ...], collected: tuple[TracerProvider, Collector]
) -> None:
    """40 users at once, half of them sending a forged ``baggage: ambient.user_id=admin``,
    each request calling a downstream service with the propagated headers. Each call
    continues its own request's scope span, in its own trace; by default it carries no
    baggage of ambient's, and with ``baggage=("user_id", "thread_id")`` only its own
    user's keyed hash and thread, never the raw id nor the forged one; the client's other
    entries pass through."""
    provider, collector = collected
    telemetry = Telemetry(tracer_provider=provider, hash_key=HASH_KEY, baggage=fields)
    downstream = Recorder()
    with serve("uvicorn", downstream) as downstream_url:
        # Made once: a client of its own per call, without building an SSL context each time.
        tls = ssl.create_default_context()

        async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            headers = {"x-request-id": ctx.request_id}
            propagate.inject(headers)
            async with httpx.AsyncClient(timeout=30, verify=tls) as client:
                answer = await client.get(downstream_url, headers=headers)
            span = trace.get_current_span().get_span_context()
            body = json.dumps(
                {"status": answer.status_code, "span_id": f"{span.span_id:016x}"}
            ).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        app = OpenTelemetryMiddleware(
            AmbientMiddleware(
                endpoint, registry=Registry(), identity=trusted_header(), telemetry=telemetry
            ),
            tracer_provider=provider,
            exclude_spans=["receive", "send"],
        )
        answers: dict[str, dict[str, Any]] = {}
        with serve(server, app, lifespan="off") as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def one(n: int) -> None:
                    headers = {
                        "x-user-id": f"user-{n}",
                        "x-thread-id": f"thread-{n}",
                        "x-request-id": f"req-{n}",
                    }
                    if n % 2:
                        headers["baggage"] = "ambient.user_id=admin,other=kept"
                    response = await client.get("/", headers=headers)
                    assert response.status_code == 200, response.text
                    answers[f"req-{n}"] = response.json()

                async with anyio.create_task_group() as tg:
                    for n in range(USERS_CALLING):
                        tg.start_soon(one, n)
    scopes = {
        str((s.attributes or {})["ambient.request_id"]): s
        for s in collector.spans
        if s.name == "ambient.scope"
    }
    for n in range(USERS_CALLING):
        request_id = f"req-{n}"
        answer, sent, scope_span = (
            answers[request_id],
            downstream.headers[request_id],
            scopes[request_id],
        )
        assert answer["status"] == 204
        assert scope_span.context is not None
        assert answer["span_id"] == f"{scope_span.context.span_id:016x}"
        _, trace_id, parent_id, _ = sent["traceparent"].split("-")
        assert (trace_id, parent_id) == (
            f"{scope_span.context.trace_id:032x}",
            f"{scope_span.context.span_id:016x}",
        )
        entries = dict(
            item.strip().split("=", 1) for item in sent.get("baggage", "").split(",") if item
        )
        expected = {}
        if fields:
            expected = {
                "ambient.user_id": hash_id(f"user-{n}", HASH_KEY),
                "ambient.thread_id": f"thread-{n}",
            }
        if n % 2:
            expected["other"] = "kept"
        assert entries == expected, (request_id, sent.get("baggage"))
        assert f"user-{n}" not in " ".join(v for k, v in sent.items() if k != "x-request-id")
