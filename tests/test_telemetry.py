"""Telemetry: scope and component spans, events, ids, metrics, baggage, failure safety, and
AmbientMiddleware behind opentelemetry-instrumentation-asgi on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import itertools
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from opentelemetry import baggage, metrics, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import (
    ReadableSpan,
    Span,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp as StarletteApp
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

import ambient
import ambient.telemetry
from ambient import (
    CleanupError,
    ComponentEvent,
    Lifetime,
    Observer,
    Registry,
    UserExecutionContext,
    UserRef,
    _binding,
)
from ambient.integrations.logging import ContextFilter
from ambient.integrations.websockets import message_scope
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import Identity, trusted_header
from ambient.telemetry import Telemetry, hash_id
from tests.servers import serve, shutdown_under_open_streams
from tests.test_middleware import drive, ws_scope

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


# -- helpers -------------------------------------------------------------------------------


class Collector(SpanProcessor):
    """Keeps every ended span and counts starts; a test waits on it instead of sleeping."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.started = 0
        self._cond = threading.Condition()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        with self._cond:
            self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            self.spans.append(span)
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[ReadableSpan]], bool], timeout: float = 10
    ) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.spans), timeout), self.names()

    def named(self, name: str) -> list[ReadableSpan]:
        with self._cond:
            return [s for s in self.spans if s.name == name]

    def names(self) -> list[str]:
        return [s.name for s in self.spans]


class Otel:
    """A real SDK tracer and meter provider with in-memory collection."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.spans = Collector()
        self.tracer_provider = TracerProvider(sampler=sampler)
        self.tracer_provider.add_span_processor(self.spans)
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def telemetry(self, **options: Any) -> Telemetry:
        return Telemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def points(self) -> dict[str, list[Any]]:
        """Data points of ambient's instruments, by instrument name."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[Any]] = {}
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "ambient":
                    continue
                for metric in scope_metrics.metrics:
                    found[metric.name] = list(metric.data.data_points)
        return found

    def total(self, name: str) -> float:
        return float(sum(p.value for p in self.points().get(name, [])))

    def count(self, name: str) -> int:
        return int(sum(p.count for p in self.points().get(name, [])))


@pytest.fixture(name="otel")
def fixture_otel() -> Iterator[Otel]:
    otel = Otel()
    yield otel
    otel.tracer_provider.shutdown()


class FirstRootDropped(Sampler):
    """A root sampler that samples out the first trace and samples every later one."""

    def __init__(self) -> None:
        self.roots = 0
        self._lock = threading.Lock()

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        with self._lock:
            self.roots += 1
            first = self.roots == 1
        if first:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "FirstRootDropped"


@pytest.fixture(name="otel_first_dropped")
def fixture_otel_first_dropped() -> Iterator[Otel]:
    """Parent-based sampling whose first trace is sampled out."""
    otel = Otel(ParentBased(FirstRootDropped()))
    yield otel
    otel.tracer_provider.shutdown()
    otel.meter_provider.shutdown()


@pytest.fixture(name="detach_errors")
def fixture_detach_errors() -> Iterator[list[logging.LogRecord]]:
    """Records OpenTelemetry logs when a context token cannot be detached."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    log = logging.getLogger("opentelemetry.context")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


class Dispatcher:
    """A REQUEST component with a cleanup."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Memory:
    """A USER component."""

    def __init__(self, user: UserRef) -> None:
        self.user = user


class UnreadableError(Exception):
    """An app's exception whose message cannot be read: its ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


def ctx(user: str = "alice", **ids: Any) -> UserExecutionContext:
    return UserExecutionContext.create(user, **ids)


async def resolved_by_each(registry: Registry, key: type, users: Iterable[str]) -> None:
    """Each of ``users``, all at once, resolves ``key`` in a scope of theirs."""

    async def visit(user: str) -> None:
        async with registry.open_scope(ctx(user)):
            await ambient.resolve(key)

    async with anyio.create_task_group() as tg:
        for user in users:
            tg.start_soon(visit, user)


def one(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def one_record(records: list[logging.LogRecord], text: str) -> logging.LogRecord:
    found = [r for r in records if text in r.getMessage()]
    assert len(found) == 1, [r.getMessage() for r in records]
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


# -- the scope span ------------------------------------------------------------------------


async def _cancel_as_a_cleanup_hangs(registry: Registry) -> None:
    """Run alice's request, whose component's cleanup never ends, and cancel its task
    (asyncio's native cancellation) once that cleanup has begun."""
    in_cleanup = anyio.Event()

    class Connection:
        async def aclose(self) -> None:
            in_cleanup.set()
            await anyio.sleep_forever()

    registry.register(Connection, Connection)

    async def request() -> None:
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Connection)

    task = asyncio.ensure_future(request())
    with anyio.fail_after(5):
        await in_cleanup.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class TestScopeSpan:
    async def test_scope_span_carries_the_context_ids(self, otel: Otel) -> None:
        """ambient.scope is INTERNAL, from instrumentation scope `ambient`, with every id."""
        registry = Registry(telemetry=otel.telemetry(hash_key=b"k"))
        registry.register(Dispatcher, Dispatcher)
        context = ctx("alice", tenant_id="acme")
        async with registry.open_scope(context):
            await ambient.resolve(Dispatcher)
        span = one(otel.spans.named("ambient.scope"))
        assert span.kind is SpanKind.INTERNAL
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "ambient"
        assert dict(span.attributes or {}) == {
            "ambient.user_id": hash_id("alice", b"k"),
            "ambient.tenant_id": "acme",
            "ambient.thread_id": context.thread_id,
            "ambient.run_id": context.run_id,
            "ambient.request_id": context.request_id,
            "ambient.components.created": 1,
            "ambient.cleanup.failures": 0,
        }
        assert span.status.status_code is StatusCode.UNSET

    async def test_the_scope_context_is_made_the_general_way_when_the_api_changed_shape(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the API's span key (an OpenTelemetry API of another shape), the scope's
        context is made through the public API: the scope span is current in the scope, a
        span of the scope's code and a nested scope's span are its children, each scope puts
        back the context it found, and a task the request started that opens a scope after
        the request's closed goes under the request's parent, not the ended scope span."""
        monkeypatch.setattr(ambient.telemetry, "_SPAN_KEY", None)
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        before = otel_context.get_current()
        request_done = anyio.Event()

        async def later() -> None:
            await request_done.wait()
            async with registry.open_scope(ctx("alice")):
                pass

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                with tracer.start_as_current_span("server") as server:
                    async with registry.open_scope(ctx("alice")):
                        outer = otel_context.get_current()
                        with tracer.start_as_current_span("work"):
                            pass
                        async with registry.open_scope(ctx("alice")):
                            pass
                        assert otel_context.get_current() is outer
                        tg.start_soon(later)
                request_done.set()
        assert otel_context.get_current() is before
        inner, request, task = otel.spans.named("ambient.scope")
        work = one(otel.spans.named("work"))
        assert parent_id(request) == server.get_span_context().span_id
        assert parent_id(work) == request.context.span_id
        assert parent_id(inner) == request.context.span_id
        assert parent_id(task) == server.get_span_context().span_id

    async def test_a_scope_under_another_registrys_scope_nests_under_the_outer_traced_one(
        self, otel: Otel
    ) -> None:
        """An app with a registry of its own and no telemetry, mounted inside a traced one:
        a traced scope opened under its scope is a child of the outer traced scope span,
        not of that span's parent."""
        registry = Registry(telemetry=otel.telemetry())
        mounted = Registry()
        tracer = otel.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("server") as server:
            async with (
                registry.open_scope(ctx("alice")),
                mounted.open_scope(ctx("alice")),
                registry.open_scope(ctx("alice")),
            ):
                pass
        inner, outer = otel.spans.named("ambient.scope")
        assert parent_id(outer) == server.get_span_context().span_id
        assert parent_id(inner) == outer.context.span_id

    @pytest.mark.parametrize("u0", ["open", "closed", "gone"])
    async def test_a_scope_opened_with_nothing_bound_in_another_users_context_starts_apart(
        self, otel: Otel, u0: str
    ) -> None:
        """A server starts u1's request inside u0's Context, and the app opens u1's scope
        itself with nothing bound (no middleware cleared u0's trace), while u0's scope is
        still open, once it closed, or once it closed and was garbage-collected: u1's scope
        span is the root of a trace of its own, u1's scope sees only u1's baggage, and once
        it closes u1's request is in no trace and has no baggage, not back in u0's (nor in
        u0's server span)."""
        registry = Registry(telemetry=otel.telemetry(user_id="raw", baggage=("user_id",)))
        seen: dict[str, object] = {}
        u0_closed = anyio.Event()
        u1_done = anyio.Event()

        async def next_request() -> None:
            if u0 != "open":
                await u0_closed.wait()
            _binding._current.set(None)  # what a request starts with: nothing bound
            if u0 == "gone":
                # As once u0's scope is garbage-collected (on asyncio a Context out of
                # ambient's reach may hold it a while longer): its record no longer knows it.
                u0_record.scope = weakref.ref(Gone())
            async with registry.open_scope(ctx("u1")):
                seen["inside"] = dict(baggage.get_all())
            span = trace.get_current_span().get_span_context()
            seen["after"] = (dict(baggage.get_all()), span.is_valid)
            u1_done.set()

        class Gone:
            pass

        tracer = otel.tracer_provider.get_tracer("test")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                with tracer.start_as_current_span("u0's server span"):
                    # Held until the end: u0's request is still around, its scope closed.
                    async with registry.open_scope(ctx("u0")) as u0_scope:
                        u0_record = otel_context.get_current().get(ambient.telemetry._SCOPE_KEY)
                        assert u0_record is not None
                        tg.start_soon(next_request)  # in a copy of u0's Context
                        if u0 == "open":
                            await u1_done.wait()
                u0_closed.set()
        assert u0_scope.context.user_id == "u0"
        spans = {
            (s.attributes or {})["ambient.user_id"]: s for s in otel.spans.named("ambient.scope")
        }
        assert spans["u1"].parent is None
        assert spans["u1"].context.trace_id != spans["u0"].context.trace_id
        assert seen == {"inside": {"ambient.user_id": "u1"}, "after": ({}, False)}

    async def test_a_request_cut_short_is_cancelled_and_a_5xx_an_error(self, otel: Otel) -> None:
        """The middleware closes a request whose app returned with its response unfinished
        once it heard that the client is gone (a framework cancelled the work of a client
        gone) as cancelled, as a cancellation that reaches it is; one its app answered with
        a 5xx as an error."""
        registry = Registry(telemetry=otel.telemetry())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["path"] == "/gone":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"a", "more_body": True})
                while (await receive())["type"] != "http.disconnect":
                    pass
                return
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"upstream failed"})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            pass

        for path in ("/gone", "/failed"):
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "method": "GET",
                "path": path,
                "headers": [(b"x-user-id", b"ann")],
                "client": ("127.0.0.1", 50000),
            }
            await middleware(scope, receive, send)
        gone, failed = otel.spans.named("ambient.scope")
        assert gone.status.status_code is StatusCode.UNSET
        assert (gone.attributes or {})["ambient.cancelled"] is True
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.status.description == "ServerErrorResponseError"

    @pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
    async def test_an_app_that_returns_without_answering_a_client_still_there_is_an_error(
        self, otel: Otel, server: str
    ) -> None:
        """An app that returns without answering, or without ending the answer it began,
        while its client waits: the server answers a 500 or drops the connection, and logs
        the app's failure. Its scope span is an error, not a request cut short by a client
        gone: it was marked cancelled, status unset, as if the client had left."""
        registry = Registry(telemetry=otel.telemetry())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["path"] == "/unfinished":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"a", "more_body": True})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with serve(server, middleware, lifespan="off") as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                unanswered = await client.get("/unanswered", headers={"x-user-id": "ann"})
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.get("/unfinished", headers={"x-user-id": "bob"})
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(lambda spans: len(spans) == 2)
            )
        assert unanswered.status_code == 500
        for span in otel.spans.named("ambient.scope"):
            assert span.status.status_code is StatusCode.ERROR
            assert span.status.description == "IncompleteResponseError"
            assert "ambient.cancelled" not in (span.attributes or {})
            [event] = span.events
            assert "with the client still there" in str(
                (event.attributes or {})["exception.message"]
            )

    @pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
    async def test_a_websocket_app_that_returns_without_answering_its_handshake_is_an_error(
        self, otel: Otel, server: str
    ) -> None:
        """A websocket app that returns without accepting or refusing the handshake while
        its client waits: the server refuses it with a 500. Its scope span is an error (and
        its cleanups see it): it was a success."""
        registry = Registry(telemetry=otel.telemetry())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()  # websocket.connect

        def knock(url: str) -> int:
            try:
                with ws_connect(url, additional_headers={"x-user-id": "ann"}, open_timeout=10):
                    pass
            except InvalidStatus as refused:
                return refused.response.status_code
            return 101

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with serve(server, middleware, lifespan="off") as url:
            status = await anyio.to_thread.run_sync(knock, url.replace("http", "ws", 1))
            await anyio.to_thread.run_sync(lambda: otel.spans.wait_for(lambda spans: spans))
        assert status == 500
        span = one(otel.spans.named("ambient.scope"))
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "IncompleteResponseError"

    async def test_a_failing_or_cancelled_body_marks_the_scope_span(self, otel: Otel) -> None:
        registry = Registry(telemetry=otel.telemetry())
        with pytest.raises(LookupError):
            async with registry.open_scope(ctx("failing")):
                raise LookupError("no such agent")
        with anyio.CancelScope() as cancelled:
            async with registry.open_scope(ctx("cancelled")):
                cancelled.cancel()
                await anyio.sleep_forever()
        failed, interrupted = otel.spans.named("ambient.scope")
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.status.description == "LookupError"
        assert [e.name for e in failed.events] == ["exception"]
        assert interrupted.status.status_code is StatusCode.UNSET
        assert (interrupted.attributes or {})["ambient.cancelled"] is True

    async def test_a_generator_closed_inside_its_scope_is_cancelled_not_an_error(
        self, otel: Otel
    ) -> None:
        """Scopes opened in async generators that their consumers stop early (closed while
        each is suspended inside its scope) end cancelled, not as errors, for each user."""
        registry = Registry(telemetry=otel.telemetry())

        async def async_stream(user: str) -> AsyncIterator[int]:
            async with registry.open_scope(ctx(user)):
                yield 1
                yield 2

        for i in range(10):
            agen = async_stream(f"user-{i}")
            assert await agen.__anext__() == 1
            await agen.aclose()
        spans = otel.spans.named("ambient.scope")
        assert len(spans) == 10
        for span in spans:
            assert span.status.status_code is StatusCode.UNSET
            assert (span.attributes or {})["ambient.cancelled"] is True
            assert [e.name for e in span.events] == []

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_a_cancelled_nursery_in_the_body_is_a_cancellation_not_an_error(
        self, otel: Otel
    ) -> None:
        """A trio nursery (strict exception groups) cancelled from outside while its tasks
        run raises their cancellations as a group: the scope span is marked cancelled, as
        for a lone cancellation; it used to be an error "BaseExceptionGroup". A group
        holding a real error stays an error."""
        import trio

        registry = Registry(telemetry=otel.telemetry())
        with anyio.move_on_after(0.01):
            async with registry.open_scope(ctx("cancelled")), trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep_forever()
        with pytest.raises(ExceptionGroup):
            async with registry.open_scope(ctx("failing")):
                raise ExceptionGroup("work", [LookupError("no such agent")])
        cancelled, failed = otel.spans.named("ambient.scope")
        assert cancelled.status.status_code is StatusCode.UNSET
        assert (cancelled.attributes or {})["ambient.cancelled"] is True
        assert not cancelled.events
        assert failed.status.status_code is StatusCode.ERROR
        assert "ambient.cancelled" not in (failed.attributes or {})

    async def test_a_group_of_cancellations_and_an_error_is_an_error(
        self, otel: Otel, anyio_backend: str
    ) -> None:
        """A scope ended by a group of cancellations and an error together is an error,
        not a cancellation: on trio, a nursery cancelled from outside while one of its
        tasks fails as it is cancelled (its cleanup raises); on asyncio, the failures of
        tasks gathered and raised as one group, a cancelled one among them."""
        registry = Registry(telemetry=otel.telemetry())
        ended: list[BaseException] = []

        async def fails_when_cancelled(started: anyio.Event) -> None:
            try:
                started.set()
                await anyio.sleep_forever()
            finally:
                raise LookupError("cleanup of the task failed")

        async def gathered_failures() -> None:
            failures = [asyncio.CancelledError(), LookupError("the task failed")]
            raise BaseExceptionGroup("gathered", failures)

        with pytest.raises(BaseExceptionGroup) as raised, anyio.CancelScope() as outer:
            async with registry.open_scope(ctx("mixed")):
                try:
                    if anyio_backend == "asyncio":
                        await gathered_failures()
                    async with anyio.create_task_group() as tg:
                        started = anyio.Event()
                        tg.start_soon(fails_when_cancelled, started)
                        await started.wait()
                        outer.cancel()
                        await anyio.sleep_forever()
                except BaseException as error:
                    ended.append(error)
                    raise
        assert raised.value.subgroup(LookupError) is not None
        [error] = ended
        assert isinstance(error, BaseExceptionGroup)
        assert error.subgroup(anyio.get_cancelled_exc_class()) is not None
        [span] = otel.spans.named("ambient.scope")
        assert span.status.status_code is StatusCode.ERROR
        assert "ambient.cancelled" not in (span.attributes or {})

    @pytest.mark.parametrize("cleanup", ["sync", "async"])
    async def test_an_interrupt_escaping_a_cleanup_marks_the_scope_span(
        self, otel: Otel, cleanup: str
    ) -> None:
        """A BaseException that escapes a cleanup (a KeyboardInterrupt) ends the scope with
        it after a body that ended well: the scope span is an error carrying it, as the
        cleanup's own span is; it used to look like a clean success."""

        class Interrupt(BaseException):
            pass

        class Connection:
            def close(self) -> None:
                raise Interrupt

        class AsyncConnection:
            async def aclose(self) -> None:
                await anyio.lowlevel.checkpoint()
                raise Interrupt

        registry = Registry(telemetry=otel.telemetry())
        registry.register(Connection, Connection if cleanup == "sync" else AsyncConnection)
        with pytest.raises(Interrupt):
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Connection)
        scope_span = one(otel.spans.named("ambient.scope"))
        assert scope_span.status.status_code is StatusCode.ERROR
        assert scope_span.status.description == "Interrupt"
        assert [e.name for e in scope_span.events if e.name != "ambient.resolve"] == ["exception"]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_cancellation_cutting_the_cleanup_short_marks_the_scope_span(
        self, otel: Otel
    ) -> None:
        """A native cancellation (``task.cancel()``, which anyio's shield does not hold back)
        arriving while the scope cleans up after a body that ended well: the scope span is
        marked cancelled, as the cancellation reaches the caller."""
        await _cancel_as_a_cleanup_hangs(Registry(telemetry=otel.telemetry()))
        scope_span = one(otel.spans.named("ambient.scope"))
        assert scope_span.status.status_code is StatusCode.UNSET
        assert (scope_span.attributes or {})["ambient.cancelled"] is True

    async def test_scope_span_is_current_inside_and_restored_after(self, otel: Otel) -> None:
        """Inside the scope the scope span is current; afterwards the outer span is again."""
        tracer = otel.tracer_provider.get_tracer("test")
        registry = Registry(telemetry=otel.telemetry())
        with tracer.start_as_current_span("outer") as outer:
            async with registry.open_scope(ctx()):
                inside = trace.get_current_span()
                with tracer.start_as_current_span("work"):
                    await anyio.lowlevel.checkpoint()
            assert trace.get_current_span() is outer
        scope_span = one(otel.spans.named("ambient.scope"))
        assert inside.get_span_context().span_id == scope_span.context.span_id
        assert parent_id(scope_span) == outer.get_span_context().span_id
        assert parent_id(one(otel.spans.named("work"))) == scope_span.context.span_id

    async def test_a_request_served_inside_a_scope_restores_the_context_before_it(
        self, otel: Otel
    ) -> None:
        """An app called inside an open scope, in its task (an ASGI client in a test's bound
        context, an app with a middleware of its own mounted in another): the request's
        scope does not descend from the enclosing one, its middleware bound nothing above
        it. Closing it put back the context the enclosing scope started from, not the one
        current before the request: the enclosing scope's span was no longer current."""
        telemetry = otel.telemetry()
        registry = Registry(telemetry=telemetry)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        stack = AmbientMiddleware(
            app, registry=registry, identity=trusted_header(), telemetry=telemetry
        )
        transport = httpx.ASGITransport(app=stack, client=("127.0.0.1", 50000))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            registry.open_scope(ctx()),
        ):
            before = otel_context.get_current()
            enclosing = trace.get_current_span()
            answer = await client.get("/", headers={"x-user-id": "u1"})
            assert answer.status_code == 200
            assert trace.get_current_span() is enclosing
            assert otel_context.get_current() is before
        assert len(otel.spans.named("ambient.scope")) == 2

    async def test_requests_served_inside_a_scope_see_their_own_user_not_the_enclosing_one(
        self, otel: Otel
    ) -> None:
        """An app with its middleware called inside alice's open scope, in its task (an
        ASGI client in a test's bound context), once per user: each request's handler sees
        its own user, its log records carry that user and its own scope's trace, and alice
        is bound again once it answered. Each request's scope span is not alice's child (its
        scope does not descend from hers) but stays in the caller's trace, under the span
        alice's scope started in, as a previous request's would not. Telling the enclosing
        scope apart from a previous request's made alice's binding current again inside the
        request."""
        telemetry = otel.telemetry(user_id="raw")
        registry = Registry(telemetry=telemetry)
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        keep = Keep()
        keep.addFilter(ContextFilter(user_id="raw"))
        log = logging.getLogger("tests.served_inside_a_scope")
        log.addHandler(keep)
        log.setLevel(logging.INFO)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            user = ambient.get_current_context().user_id
            log.info("handled %s", user)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": user.encode()})

        stack = AmbientMiddleware(
            app, registry=registry, identity=trusted_header(), telemetry=telemetry
        )
        transport = httpx.ASGITransport(app=stack, client=("127.0.0.1", 50000))
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        tracer = otel.tracer_provider.get_tracer("test")
        users = [f"u{n}" for n in range(5)]
        answers = []
        try:
            with tracer.start_as_current_span("caller") as caller:
                async with client, registry.open_scope(ctx("alice")):
                    for user in users:
                        answer = await client.get("/", headers={"x-user-id": user})
                        answers.append(answer.text)
                        assert ambient.get_current_context().user_id == "alice"
        finally:
            log.removeHandler(keep)
        assert answers == users
        spans = {
            (s.attributes or {})["ambient.user_id"]: s for s in otel.spans.named("ambient.scope")
        }
        assert set(spans) == {"alice", *users}
        for span in spans.values():
            assert parent_id(span) == caller.get_span_context().span_id
        for user in users:
            record = one_record(records, f"handled {user}")
            assert record.user_id == user  # type: ignore[attr-defined]
            assert record.trace_id == f"{spans[user].context.trace_id:032x}"  # type: ignore[attr-defined]
            assert record.span_id == f"{spans[user].context.span_id:016x}"  # type: ignore[attr-defined]

    async def test_scope_span_covers_the_cleanup(self, otel: Otel) -> None:
        """The scope span ends after the last cleanup, which is its child."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))

        async def slow_cleanup() -> AsyncIterator[Dispatcher]:
            yield Dispatcher()
            await anyio.sleep(0.01)

        registry.register(Dispatcher, slow_cleanup)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Dispatcher)
        scope_span = one(otel.spans.named("ambient.scope"))
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert parent_id(cleanup) == scope_span.context.span_id
        assert scope_span.start_time is not None
        assert cleanup.start_time is not None
        assert scope_span.end_time is not None
        assert cleanup.end_time is not None
        assert scope_span.start_time <= cleanup.start_time
        assert cleanup.end_time - cleanup.start_time >= 10_000_000
        assert cleanup.end_time <= scope_span.end_time

    async def test_failed_cleanup_marks_the_scope_span(self, otel: Otel) -> None:
        """A failing cleanup: ERROR scope span, `ambient.cleanup.failures` 1, ERROR cleanup span."""
        registry = Registry(telemetry=otel.telemetry())

        def broken() -> Iterator[Dispatcher]:
            yield Dispatcher()
            raise RuntimeError("cannot close")

        registry.register(Dispatcher, broken)
        with pytest.raises(CleanupError):
            async with registry.open_scope(ctx()):
                await ambient.resolve(Dispatcher)
        scope_span = one(otel.spans.named("ambient.scope"))
        assert scope_span.status.status_code is StatusCode.ERROR
        assert (scope_span.attributes or {})["ambient.cleanup.failures"] == 1
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert cleanup.status.status_code is StatusCode.ERROR
        assert parent_id(cleanup) == scope_span.context.span_id
        (event,) = cleanup.events
        assert event.name == "exception"
        assert (event.attributes or {})["exception.type"] == "RuntimeError"

    async def test_nested_scopes_closed_out_of_order_restore_nothing_stale(
        self, otel: Otel
    ) -> None:
        """Closing an outer scope before an inner one never brings an ended span back."""
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("outer") as outer:
            first = registry.open_scope(ctx("alice"))
            await first.__aenter__()
            second = registry.open_scope(ctx("bob"), allow_switch=True)
            await second.__aenter__()
            await first.aclose()
            await second.aclose()
            assert trace.get_current_span() is outer
        assert len(otel.spans.named("ambient.scope")) == 2

    async def test_scope_opened_inside_a_scope_is_its_child(self, otel: Otel) -> None:
        """A scope opened inside another (directly or in a child task) nests under its span."""
        registry = Registry(telemetry=otel.telemetry())
        async with registry.open_scope(ctx("alice")):
            async with registry.open_scope(ctx("bob"), allow_switch=True):
                pass
            async with anyio.create_task_group() as tg:

                async def job() -> None:
                    async with registry.open_scope(ctx("carol"), allow_switch=True):
                        pass

                tg.start_soon(job)
        spans = {
            (s.attributes or {})["ambient.user_id"]: s for s in otel.spans.named("ambient.scope")
        }
        outer = spans[hash_id("alice")]
        assert outer.parent is None
        for user in ("bob", "carol"):
            assert parent_id(spans[hash_id(user)]) == outer.context.span_id

    async def test_work_outliving_its_request_is_not_a_child_of_the_ended_scope(
        self, otel: Otel
    ) -> None:
        """A task started in a request that opens its own scope after the request's scope
        closed: its span stays in the request's trace, under the request's parent span, not
        under the ended scope span."""
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        request_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            with tracer.start_as_current_span("server") as server:
                async with registry.open_scope(ctx("alice")):

                    async def later() -> None:
                        await request_done.wait()
                        async with registry.open_scope(ctx("alice")):
                            pass

                    tg.start_soon(later)
            request_done.set()
        first, second = otel.spans.named("ambient.scope")
        assert parent_id(first) == server.get_span_context().span_id
        assert parent_id(second) == server.get_span_context().span_id
        assert second.context.trace_id == first.context.trace_id

    async def test_work_outliving_its_request_nests_its_scope_under_its_own_live_span(
        self, otel: Otel
    ) -> None:
        """A task started inside a request's span ("handler") that outlives the request:
        the scope it opens in a span of its own ("job", still going on) nests under that
        span; one it opens where the request's span has ended (the task's context still
        shows it) starts, like the request's scope, under the request's parent span."""
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        request_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            with tracer.start_as_current_span("server") as server:
                async with registry.open_scope(ctx("alice")):
                    with tracer.start_as_current_span("handler"):

                        async def later() -> None:
                            await request_done.wait()
                            with tracer.start_as_current_span("job") as job:
                                async with registry.open_scope(ctx("alice")):
                                    pass
                            async with registry.open_scope(ctx("alice")):
                                pass
                            assert job.get_span_context().is_valid

                        tg.start_soon(later)
            request_done.set()
        request, in_job, after_job = otel.spans.named("ambient.scope")
        (job,) = otel.spans.named("job")
        assert parent_id(request) == server.get_span_context().span_id
        assert parent_id(in_job) == job.context.span_id
        assert parent_id(after_job) == server.get_span_context().span_id
        assert len({s.context.trace_id for s in (request, in_job, after_job)}) == 1

    async def test_work_outliving_its_request_nests_its_scope_under_a_remote_parent(
        self, otel: Otel
    ) -> None:
        """Tasks a request started that outlive it and take a remote parent from a message
        they handle (a queue's traceparent): the scope each opens joins that message's
        trace, under its remote span, not the ended request's nor its parent's."""
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        request_done = anyio.Event()
        remote = {i: (0x1000 + i, 0x2000 + i) for i in range(5)}

        async def later(i: int) -> None:
            await request_done.wait()
            trace_id, span_id = remote[i]
            carrier = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
            token = otel_context.attach(propagate.extract(carrier, otel_context.get_current()))
            try:
                async with registry.open_scope(ctx("alice", run_id=f"message-{i}")):
                    pass
            finally:
                otel_context.detach(token)

        async with anyio.create_task_group() as tg:
            with tracer.start_as_current_span("server"):
                async with registry.open_scope(ctx("alice", run_id="request")):
                    for i in remote:
                        tg.start_soon(later, i)
            request_done.set()
        by_run = {
            (s.attributes or {})["ambient.run_id"]: s for s in otel.spans.named("ambient.scope")
        }
        assert len(by_run) == 6
        for i, (trace_id, span_id) in remote.items():
            span = by_run[f"message-{i}"]
            assert span.context.trace_id == trace_id
            assert parent_id(span) == span_id

    async def test_work_outliving_its_request_gets_its_own_span_back_after_a_scope(
        self, otel: Otel
    ) -> None:
        """Ten tasks a request started outlive it, each in a span of its own ("job"), and
        open and close a scope there: once it closes, the task's "job" span is current
        again, so what the task does next ("step") nests under it, not under the ended
        request's server span."""
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        request_done = anyio.Event()

        async def later(i: int) -> None:
            await request_done.wait()
            with tracer.start_as_current_span(f"job-{i}") as job:
                async with registry.open_scope(ctx(f"user-{i}"), allow_switch=True):
                    await anyio.lowlevel.checkpoint()
                assert trace.get_current_span() is job
                with tracer.start_as_current_span(f"step-{i}"):
                    pass

        async with anyio.create_task_group() as tg:
            with tracer.start_as_current_span("server"):
                async with registry.open_scope(ctx("alice")):
                    with tracer.start_as_current_span("handler"):
                        for i in range(10):
                            tg.start_soon(later, i)
            request_done.set()
        by_name = {s.name: s for s in otel.spans.spans}
        for i in range(10):
            assert parent_id(by_name[f"step-{i}"]) == by_name[f"job-{i}"].context.span_id

    async def test_sampled_out_work_outliving_its_request_keeps_its_scope_in_its_trace(
        self, otel_first_dropped: Otel
    ) -> None:
        """The same in a trace sampled out: the task's own "job" span is still going on,
        though not recording, so the scope it opens in it stays in the request's trace,
        sampled out as the rest of it. It used to start a trace of its own, sampled afresh
        (exported as a root span of a trace nothing else is in), its log records carrying
        another trace id than the request's."""
        otel = otel_first_dropped
        registry = Registry(telemetry=otel.telemetry())
        tracer = otel.tracer_provider.get_tracer("test")
        request_done = anyio.Event()
        in_job: list[trace.SpanContext] = []
        async with anyio.create_task_group() as tg:
            async with registry.open_scope(ctx("alice")):
                request = trace.get_current_span().get_span_context()

                async def later() -> None:
                    await request_done.wait()
                    with tracer.start_as_current_span("job") as job:
                        async with registry.open_scope(ctx("alice")):
                            in_job.append(trace.get_current_span().get_span_context())
                    assert not job.is_recording()

                tg.start_soon(later)
            request_done.set()
        assert not request.trace_flags.sampled
        assert len(in_job) == 1
        assert in_job[0].trace_id == request.trace_id
        assert not in_job[0].trace_flags.sampled
        assert otel.spans.spans == []

    async def test_a_traced_scope_leaves_no_reference_cycle(self, otel: Otel) -> None:
        """Once the scope closes, its span and the context it made current are freed by
        reference counting alone: a traced request leaves nothing to the cycle collector."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, Dispatcher)
        gc.collect()
        gc.disable()
        try:
            async with registry.open_scope(ctx()):
                await ambient.resolve(Dispatcher)
                span = weakref.ref(trace.get_current_span())
                context = weakref.ref(otel_context.get_current())
            assert span() is None
            assert context() is None
        finally:
            gc.enable()
        assert len(one(otel.spans.named("ambient.scope")).events) == 2

    async def test_registry_and_scope_observer_do_not_double_trace(self, otel: Otel) -> None:
        """The same telemetry on the registry and passed to open_scope traces once."""
        telemetry = otel.telemetry()
        registry = Registry(telemetry=telemetry)
        async with registry.open_scope(ctx(), observer=telemetry):
            pass
        assert len(otel.spans.named("ambient.scope")) == 1


# -- components: spans or events -----------------------------------------------------------


class TestComponentSpans:
    async def test_threshold_zero_makes_every_operation_a_child_span(self, otel: Otel) -> None:
        """With span_threshold=0 each creation and cleanup is a child span of the scope."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Dispatcher)
            await ambient.resolve(Memory)
        scope_span = one(otel.spans.named("ambient.scope"))
        resolves = otel.spans.named("ambient.resolve")
        assert {(s.attributes or {})["ambient.component"] for s in resolves} == {
            "Dispatcher",
            "Memory",
        }
        assert {(s.attributes or {})["ambient.lifetime"] for s in resolves} == {"request", "user"}
        cleanup = one(otel.spans.named("ambient.cleanup"))
        for span in [*resolves, cleanup]:
            assert parent_id(span) == scope_span.context.span_id
            assert span.context.trace_id == scope_span.context.trace_id
            assert span.kind is SpanKind.INTERNAL
        assert scope_span.events == ()
        await registry.aclose()

    async def test_threshold_zero_makes_spans_of_operations_a_coarse_clock_times_at_zero(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A clock too coarse to see a fast factory or cleanup (Windows' ticks) times it at
        0.0 s: under span_threshold=0 it is still a span, "every one", for every user."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        monkeypatch.setattr(time, "perf_counter", lambda: 1.0)
        await resolved_by_each(registry, Dispatcher, [f"user-{i}" for i in range(10)])
        monkeypatch.undo()
        resolves = otel.spans.named("ambient.resolve")
        cleanups = otel.spans.named("ambient.cleanup")
        assert len(resolves) == len(cleanups) == 10
        for span in otel.spans.named("ambient.scope"):
            assert span.events == ()

    async def test_fast_operations_become_events_on_the_scope_span(self, otel: Otel) -> None:
        """Below the threshold a creation or cleanup is an event with its duration."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, Dispatcher)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Dispatcher)
        assert otel.spans.names() == ["ambient.scope"]
        scope_span = one(otel.spans.named("ambient.scope"))
        assert [e.name for e in scope_span.events] == ["ambient.resolve", "ambient.cleanup"]
        for event in scope_span.events:
            attributes = event.attributes or {}
            assert attributes["ambient.component"] == "Dispatcher"
            assert attributes["ambient.lifetime"] == "request"
            duration = attributes["ambient.duration"]
            assert isinstance(duration, float)
            assert 0 <= duration < 60
            assert scope_span.start_time is not None
            assert event.timestamp >= scope_span.start_time

    async def test_events_come_before_the_scope_exception(self, otel: Otel) -> None:
        """Events of a failing scope: its components' in order, then the exception."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, Dispatcher)
        with pytest.raises(LookupError):
            async with registry.open_scope(ctx()):
                await ambient.resolve(Dispatcher)
                raise LookupError("no such agent")
        scope_span = one(otel.spans.named("ambient.scope"))
        assert [e.name for e in scope_span.events] == [
            "ambient.resolve",
            "ambient.cleanup",
            "exception",
        ]

    @staticmethod
    def dispatching_under(limits: SpanLimits) -> tuple[Registry, TracerProvider, Collector]:
        """A registry with :class:`Dispatcher`, its spans made under ``limits`` (and its
        component events on them, below the default threshold) collected."""
        spans = Collector()
        provider = TracerProvider(span_limits=limits)
        provider.add_span_processor(spans)
        telemetry = Telemetry(tracer_provider=provider, meter_provider=NoOpMeterProvider())
        registry = Registry(telemetry=telemetry)
        registry.register(Dispatcher, Dispatcher)
        return registry, provider, spans

    async def test_events_under_an_attribute_length_limit(self) -> None:
        """With a span attribute length limit configured, events are truncated by the SDK
        like any attribute (the SDK's own ``add_event`` path)."""
        registry, provider, spans = self.dispatching_under(SpanLimits(max_attribute_length=4))
        async with registry.open_scope(ctx()):
            await ambient.resolve(Dispatcher)
        provider.shutdown()
        scope_span = one(spans.named("ambient.scope"))
        assert [(e.name, dict(e.attributes or {})) for e in scope_span.events] == [
            (name, {"ambient.component": "Disp", "ambient.lifetime": "requ", "ambient.duration": d})
            for name, d in zip(
                ["ambient.resolve", "ambient.cleanup"],
                [(e.attributes or {})["ambient.duration"] for e in scope_span.events],
                strict=True,
            )
        ]

    async def test_events_under_an_event_attribute_count_limit(self) -> None:
        """With fewer attributes allowed per event than a component event has, the SDK
        keeps within the limit (its own ``add_event`` path), for each of many users."""
        registry, provider, spans = self.dispatching_under(SpanLimits(max_event_attributes=2))
        await resolved_by_each(registry, Dispatcher, [f"user-{i}" for i in range(10)])
        provider.shutdown()
        scope_spans = spans.named("ambient.scope")
        assert len(scope_spans) == 10
        for span in scope_spans:
            assert [e.name for e in span.events] == ["ambient.resolve", "ambient.cleanup"]
            for event in span.events:
                assert len(event.attributes or {}) == 2

    @pytest.mark.parametrize(
        "limits",
        [SpanLimits(), SpanLimits(max_attribute_length=64)],
        ids=["handed-over", "add_event"],
    )
    async def test_an_event_is_timed_from_its_operations_start_with_its_duration(
        self, limits: SpanLimits
    ) -> None:
        """A fast creation's and cleanup's events start when the operation started, not
        when it was recorded, and carry the time it took: on the SDK's spans (the events
        handed over at close) and through the API's ``add_event`` (under an attribute
        length limit)."""
        ran: dict[str, tuple[int, int]] = {}

        class Timed:
            def __init__(self) -> None:
                start = time.time_ns()
                ran["ambient.resolve"] = (start, time.time_ns())

            def close(self) -> None:
                start = time.time_ns()
                ran["ambient.cleanup"] = (start, time.time_ns())

        spans = Collector()
        provider = TracerProvider(span_limits=limits)
        provider.add_span_processor(spans)
        telemetry = Telemetry(tracer_provider=provider, meter_provider=NoOpMeterProvider())
        registry = Registry(telemetry=telemetry)
        registry.register(Timed, Timed)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Timed)
        provider.shutdown()
        scope_span = one(spans.named("ambient.scope"))
        assert [e.name for e in scope_span.events] == ["ambient.resolve", "ambient.cleanup"]
        for event in scope_span.events:
            began, ended = ran[event.name]
            duration = (event.attributes or {})["ambient.duration"]
            assert isinstance(duration, float)
            assert event.timestamp <= began
            assert duration > 0
            assert duration * 1e9 >= ended - began

    async def test_fast_operations_of_a_sampled_out_scope_are_left_out_quietly(
        self, otel_first_dropped: Otel, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The first scope's trace is sampled out, the next ones' are not: the first scope's
        fast creation and cleanup are recorded nowhere and without a complaint, and each
        later scope span carries its own two events. A sampled-out span has no event list
        to hand them to."""
        otel = otel_first_dropped
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, Dispatcher)
        with caplog.at_level(logging.ERROR, logger="ambient"):
            for user in ("dropped", "kept-1", "kept-2"):
                async with registry.open_scope(ctx(user)):
                    await ambient.resolve(Dispatcher)
        assert telemetry_failures(caplog.records) == []
        scope_spans = otel.spans.named("ambient.scope")
        assert len(scope_spans) == 2
        for span in scope_spans:
            assert [e.name for e in span.events] == ["ambient.resolve", "ambient.cleanup"]

    async def test_slow_operation_is_a_span_and_fast_one_an_event(self, otel: Otel) -> None:
        """Around the threshold: the 20 ms factory gets a span, the instant one an event."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0.01))

        async def slow() -> Memory:
            await anyio.sleep(0.02)
            return Memory(UserRef("x"))

        registry.register(Memory, slow)
        registry.register(Dispatcher, Dispatcher)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Memory)
            await ambient.resolve(Dispatcher)
        resolve = one(otel.spans.named("ambient.resolve"))
        assert (resolve.attributes or {})["ambient.component"] == "Memory"
        assert resolve.end_time is not None
        assert resolve.start_time is not None
        assert resolve.end_time - resolve.start_time >= 20_000_000
        scope_span = one(otel.spans.named("ambient.scope"))
        events = [(e.name, (e.attributes or {})["ambient.component"]) for e in scope_span.events]
        assert events == [
            ("ambient.resolve", "Dispatcher"),
            ("ambient.cleanup", "Dispatcher"),
            # Memory has nothing to clean up: no cleanup event, however slow its creation.
        ]

    async def test_a_component_span_lasts_what_its_operation_took(self, otel: Otel) -> None:
        """Each ambient.resolve / ambient.cleanup span starts and ends when its factory or
        cleanup did (the duration the histograms record), not when telemetry got to it, for
        each of many concurrent users."""
        seen: dict[tuple[str, str], ComponentEvent] = {}

        class Durations(Observer):
            def component_created(self, event: ComponentEvent) -> None:
                assert event.scope is not None
                seen["ambient.resolve", event.scope.context.request_id] = event

            def component_cleaned(self, event: ComponentEvent) -> None:
                assert event.scope is not None
                seen["ambient.cleanup", event.scope.context.request_id] = event

        async def dispatcher() -> AsyncIterator[Dispatcher]:
            await anyio.lowlevel.checkpoint()
            yield Dispatcher()
            await anyio.lowlevel.checkpoint()

        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, dispatcher)
        remove = ambient.add_observer(Durations())
        try:
            await resolved_by_each(registry, Dispatcher, [f"user-{i}" for i in range(20)])
        finally:
            remove()
        spans = [*otel.spans.named("ambient.resolve"), *otel.spans.named("ambient.cleanup")]
        assert len(spans) == len(seen) == 40
        scopes = {s.context.span_id: s for s in otel.spans.named("ambient.scope")}
        for span in spans:
            request_id = str((scopes[parent_id(span)].attributes or {})["ambient.request_id"])
            event = seen[span.name, request_id]
            assert span.start_time == event.start_ns
            assert span.end_time == event.start_ns + round(event.duration * 1e9)

    async def test_nothing_to_clean_up_is_no_cleanup_but_still_an_end(self, otel: Otel) -> None:
        """A component without a cleanup gets no ambient.cleanup span, event or duration,
        while observers still see its end (what probes count), flagged cleanup_ran=False;
        a USER one still leaves ambient.user_components.live. Nothing ran, so its end
        carries no duration; it still names the user and the time it ended."""
        ended: list[tuple[str, bool]] = []
        events: list[ComponentEvent] = []

        class Ends(Observer):
            def component_cleaned(self, event: ComponentEvent) -> None:
                ended.append((event.name, event.cleanup_ran))
                events.append(event)

        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        registry.register("settings", lambda: {"retries": 3})
        remove = ambient.add_observer(Ends())
        try:
            async with registry.open_scope(ctx()):
                await ambient.resolve(Dispatcher)
                await ambient.resolve("settings")
                await ambient.resolve(Memory)
            assert otel.total("ambient.user_components.live") == 1
            await registry.aclose()
        finally:
            remove()
        assert ended == [("'settings'", False), ("Dispatcher", True), ("Memory", False)]
        for event in (events[0], events[2]):
            assert event.duration == 0.0
            assert event.start_ns > 0
            assert event.user == ctx().user
        assert events[1].duration > 0.0
        cleanups = otel.spans.named("ambient.cleanup")
        assert [(s.attributes or {})["ambient.component"] for s in cleanups] == ["Dispatcher"]
        assert otel.count("ambient.cleanup.duration") == 1
        assert otel.total("ambient.user_components.live") == 0

    async def test_failing_factory_is_an_error_span_whatever_the_threshold(
        self, otel: Otel
    ) -> None:
        """A factory that raises: ERROR span with the exception recorded; the next try works."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        calls = 0

        def flaky() -> Dispatcher:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("pool down")
            return Dispatcher()

        registry.register(Dispatcher, flaky)
        async with registry.open_scope(ctx()):
            with pytest.raises(ConnectionError):
                await ambient.resolve(Dispatcher)
            await ambient.resolve(Dispatcher)
        failed = one(otel.spans.named("ambient.resolve"))
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.status.description == "ConnectionError"
        (event,) = failed.events
        assert (event.attributes or {})["exception.message"] == "pool down"

    async def test_an_error_whose_message_cannot_be_read_is_recorded_and_its_spans_end(
        self, otel: Otel, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A factory, and then the scope's body, raising an exception whose ``__str__``
        raises: the ``ambient.resolve`` and ``ambient.scope`` spans still end as errors,
        each with an exception event naming its type and standing in for its message, and
        telemetry logs no failure. OpenTelemetry's ``record_exception`` asks for ``str()``
        of it: that raised, and neither span ended, so the request's trace was never
        exported."""

        def broken() -> Dispatcher:
            raise UnreadableError

        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, broken)
        with caplog.at_level(logging.ERROR, logger="ambient"), pytest.raises(UnreadableError):
            async with registry.open_scope(ctx()):
                await ambient.resolve(Dispatcher)
        assert [r for r in caplog.records if "telemetry failed" in r.getMessage()] == []
        for name in ("ambient.resolve", "ambient.scope"):
            span = one(otel.spans.named(name))
            assert span.status.status_code is StatusCode.ERROR
            assert span.status.description == "UnreadableError"
            (event,) = span.events
            attributes = event.attributes or {}
            assert event.name == "exception"
            assert str(attributes["exception.type"]).endswith("UnreadableError")
            assert attributes["exception.message"] == "<exception str() failed>"
            assert "UnreadableError" in str(attributes["exception.stacktrace"])

    async def test_cancelled_factory_is_not_an_error(self, otel: Otel) -> None:
        """A factory interrupted by cancellation ends its span unset, marked cancelled."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        started = anyio.Event()

        async def hangs() -> Dispatcher:
            started.set()
            await anyio.sleep_forever()
            raise AssertionError

        registry.register(Dispatcher, hangs)
        with anyio.CancelScope() as cancel:

            async def cancel_when_started() -> None:
                await started.wait()
                cancel.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_started)
                async with registry.open_scope(ctx()):
                    await ambient.resolve(Dispatcher)
        span = one(otel.spans.named("ambient.resolve"))
        assert span.status.status_code is StatusCode.UNSET
        assert (span.attributes or {})["ambient.cancelled"] is True
        assert otel.spans.started == len(otel.spans.spans)

    async def test_user_cleanup_at_shutdown_is_a_trace_of_its_own(self, otel: Otel) -> None:
        """A failing USER cleanup at shutdown: root ERROR span naming the hashed user, and
        no tenant for a user who has none (no attribute, not one whose value is None)."""
        registry = Registry(telemetry=otel.telemetry(hash_key="k"))

        def memory(user: UserRef) -> Iterator[Memory]:
            yield Memory(user)
            raise OSError("flush failed")

        registry.register(Memory, memory, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx("carol")):
            await ambient.resolve(Memory)
        with pytest.raises(CleanupError):
            await registry.aclose()
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert cleanup.parent is None
        assert cleanup.status.status_code is StatusCode.ERROR
        assert (cleanup.attributes or {})["ambient.user_id"] == hash_id("carol", "k")
        assert (cleanup.attributes or {})["ambient.lifetime"] == "user"
        assert "ambient.tenant_id" not in (cleanup.attributes or {})

    async def test_cleanups_at_shutdown_name_the_user_only_as_the_policies_allow(
        self, otel: Otel
    ) -> None:
        """Cleanups at shutdown, each a trace of its own: a USER component's names its
        tenant but not its user under ``user_id="omit"``, an APP component's names no one."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0, user_id="omit"))

        class Pool:
            def close(self) -> None:
                pass

        def memory(user: UserRef) -> Iterator[Memory]:
            yield Memory(user)

        registry.register(Pool, Pool, lifetime=Lifetime.APP, name="pool")
        registry.register(Memory, memory, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx("carol", tenant_id="acme")):
            await ambient.resolve(Pool)
            await ambient.resolve(Memory)
        await registry.aclose()
        cleanups = {
            (s.attributes or {})["ambient.lifetime"]: s for s in otel.spans.named("ambient.cleanup")
        }
        assert sorted(cleanups) == ["app", "user"]
        for span in cleanups.values():
            assert span.parent is None
        assert dict(cleanups["user"].attributes or {}) == {
            "ambient.component": "Memory",
            "ambient.lifetime": "user",
            "ambient.tenant_id": "acme",
        }
        assert dict(cleanups["app"].attributes or {}) == {
            "ambient.component": "pool",
            "ambient.lifetime": "app",
        }

    async def test_user_cleanups_at_a_shutdown_run_inside_a_span_are_traces_of_their_own(
        self, otel: Otel
    ) -> None:
        """A registry closed while a span is current (a lifespan shutdown traced by the
        server, one user's request that closes it): every user's cleanup span is a root
        naming that user, none in the current span's trace, with or without a failure."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0, hash_key="k"))
        cleaned: list[str] = []

        def memory(user: UserRef) -> Iterator[Memory]:
            yield Memory(user)
            cleaned.append(user.user_id)
            if user.user_id == "user-0":
                raise OSError("flush failed")

        registry.register(Memory, memory, lifetime=Lifetime.USER)
        users = [f"user-{i}" for i in range(10)]
        await resolved_by_each(registry, Memory, users)
        tracer = otel.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("shutdown") as shutdown, pytest.raises(CleanupError):
            await registry.aclose()
        assert sorted(cleaned) == sorted(users)
        cleanups = otel.spans.named("ambient.cleanup")
        assert sorted((s.attributes or {})["ambient.user_id"] for s in cleanups) == sorted(
            hash_id(u, "k") for u in users
        )
        for span in cleanups:
            assert span.parent is None, span.attributes
            assert span.context.trace_id != shutdown.get_span_context().trace_id

    @pytest.mark.parametrize("ended_by", ["idle expiry", "max_users eviction"])
    async def test_other_users_cleanups_run_in_a_request_stay_out_of_its_trace(
        self, otel: Otel, ended_by: str
    ) -> None:
        """Twenty users' USER components are cleaned up while bob's traced request runs (an
        expiry swept as his scope opens and closes, an eviction as he takes his slot): each
        cleanup span is a root of its own naming its hashed user, none in bob's trace, and no
        one's id reaches the spans of bob's trace."""
        now = [0.0]
        evicting = ended_by == "max_users eviction"
        registry = Registry(
            telemetry=otel.telemetry(span_threshold=0, hash_key="k", tenant_id="hash"),
            clock=lambda: now[0],
            max_users=20 if evicting else 10_000,
        )
        cleaned: list[str] = []

        def memory(user: UserRef) -> Iterator[Memory]:
            yield Memory(user)
            cleaned.append(user.user_id)

        registry.register(Memory, memory, lifetime=Lifetime.USER, idle_ttl=10)
        users = [f"user-{i}" for i in range(20)]

        async def visit(user: str) -> None:
            async with registry.open_scope(ctx(user, tenant_id=f"tenant-{user}")):
                await ambient.resolve(Memory)

        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(visit, user)
        assert cleaned == []
        if not evicting:
            now[0] = 11.0
        tracer = otel.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("bob-request") as request_span:
            if evicting:
                # Twenty users kept: bob's is one more, and the least recent idle one goes.
                await visit("bob")
                for i in range(1, len(users)):
                    await visit(f"bob-{i}")
            else:
                await visit("bob")
        assert set(users) <= set(cleaned)
        bobs_trace = request_span.get_span_context().trace_id
        cleanups = [
            s
            for s in otel.spans.named("ambient.cleanup")
            if (s.attributes or {}).get("ambient.user_id") in {hash_id(u, "k") for u in users}
        ]
        assert len(cleanups) == len(users)
        for span in cleanups:
            assert span.parent is None, span.attributes
            assert span.context.trace_id != bobs_trace
        # Hashed under the tenant policy too, though no scope is there to say whose it is.
        assert {(s.attributes or {})["ambient.tenant_id"] for s in cleanups} == {
            hash_id(f"tenant-{u}", "k") for u in users
        }
        raw = set(users) | {f"tenant-{u}" for u in users}
        for span in otel.spans.spans:
            assert not {str(v) for v in (span.attributes or {}).values()} & raw, span.name
        forbidden = {hash_id(u, "k") for u in users} | set(users) | {f"tenant-{u}" for u in users}
        for span in otel.spans.spans:
            if span.context.trace_id == bobs_trace:
                values = {str(v) for v in (span.attributes or {}).values()}
                assert not values & forbidden, (span.name, span.attributes)


# -- ids -----------------------------------------------------------------------------------


class TestIds:
    def test_hash_is_a_keyed_hmac_not_a_bare_sha256(self) -> None:
        """hash_id is HMAC-SHA256 under the key, 16 hex characters."""
        expected = hmac.new(b"secret", b"alice", "sha256").hexdigest()[:16]
        assert hash_id("alice", b"secret") == expected
        assert hash_id("alice", "secret") == expected
        assert hash_id("alice", b"other") != expected
        assert hash_id("alice", b"secret") != hashlib.sha256(b"alice").hexdigest()[:16]
        assert hash_id("alice") != hashlib.sha256(b"alice").hexdigest()[:16]
        assert len(hash_id("alice")) == 16

    def test_the_hash_cache_stays_bounded_under_many_users(self) -> None:
        """A long-running process sees ever more users: the cache of their hashes (keyed
        by their raw ids) stays bounded, and a hash is the same after the cache has turned
        over, in the telemetry and in the log filter alike."""
        telemetry = Telemetry(
            tracer_provider=trace.NoOpTracerProvider(), user_id="hash", hash_key="k"
        )
        log_filter = ContextFilter(hash_key="k")
        first = telemetry.export_user_id("user-0")
        for i in range(10_000):
            assert telemetry.export_user_id(f"user-{i}") == hash_id(f"user-{i}", "k")
            with ambient.bind_context(ctx(f"user-{i}")):
                record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
                log_filter.filter(record)
                assert record.user_id == hash_id(f"user-{i}", "k")  # type: ignore[attr-defined]
        assert telemetry.export_user_id("user-0") == first
        for cache in (telemetry._ids._hashed, log_filter._fields._ids._hashed):
            assert 0 < len(cache) <= 4096

    @pytest.mark.parametrize(
        ("user_policy", "tenant_policy", "user", "tenant"),
        [
            ("hash", "raw", hash_id("alice", b"k"), "acme"),
            ("raw", "hash", "alice", hash_id("acme", b"k")),
            ("omit", "omit", None, None),
        ],
    )
    async def test_id_policies(
        self,
        otel: Otel,
        user_policy: Any,
        tenant_policy: Any,
        user: str | None,
        tenant: str | None,
    ) -> None:
        """user_id and tenant_id are hashed, raw or omitted as configured: an omitted one is
        no attribute at all, not one whose value is None (which the SDK keeps as it is, and
        the OTLP exporter sends as the key with an empty value)."""
        telemetry = otel.telemetry(user_id=user_policy, tenant_id=tenant_policy, hash_key=b"k")
        registry = Registry(telemetry=telemetry)
        async with registry.open_scope(ctx("alice", tenant_id="acme")):
            pass
        attributes = dict(one(otel.spans.named("ambient.scope")).attributes or {})
        assert attributes.get("ambient.user_id") == user
        assert attributes.get("ambient.tenant_id") == tenant
        assert None not in attributes.values()
        # The ids as the telemetry says it exports them are those its spans carry.
        assert telemetry.export_user_id("alice") == user
        assert telemetry.export_tenant_id("acme") == tenant
        assert telemetry.export_tenant_id(None) is None

    def test_the_repr_tells_the_state_and_user_policy_and_no_key(self, otel: Otel) -> None:
        """repr says whether the telemetry records anything and how user ids go out; never
        the key they are hashed under."""
        dormant = Telemetry(
            tracer_provider=trace.NoOpTracerProvider(),
            meter_provider=NoOpMeterProvider(),
            hash_key="hash-key-1",
        )
        active = otel.telemetry(user_id="omit", hash_key="hash-key-2")
        assert repr(dormant) == "<Telemetry dormant user_id='hash'>"
        assert repr(active) == "<Telemetry active user_id='omit'>"

    async def test_default_key_is_shared_by_the_process(self, otel: Otel) -> None:
        """Without hash_key the span hash equals hash_id(user) (what log records carry)."""
        registry = Registry(telemetry=otel.telemetry())
        async with registry.open_scope(ctx("alice")):
            pass
        attributes = one(otel.spans.named("ambient.scope")).attributes or {}
        assert attributes["ambient.user_id"] == hash_id("alice")

    def test_default_key_is_random_per_process(self) -> None:
        """Without hash_key each process hashes under a key of its own: the same users'
        exported ids differ between two processes (a key fixed in the library would let
        anyone who reads a span map its hash back to a user by hashing candidate ids)."""
        program = (
            "from opentelemetry.trace import NoOpTracerProvider\n"
            "from ambient.telemetry import Telemetry, hash_id\n"
            "telemetry = Telemetry(tracer_provider=NoOpTracerProvider())\n"
            "users = [f'user-{i}' for i in range(5)]\n"
            "exported = [telemetry.export_user_id(u) for u in users]\n"
            "assert exported == [hash_id(u) for u in users]\n"
            "print(' '.join(exported))\n"
        )
        runs = [
            subprocess.run(  # noqa: S603 - this interpreter, a fixed program
                [sys.executable, "-c", program],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
            for _ in range(2)
        ]
        assert len(runs[0]) == len(runs[1]) == 5
        assert not set(runs[0]) & set(runs[1])
        assert not set(runs[0]) & {hash_id(f"user-{i}") for i in range(5)}

    async def test_no_raw_user_id_anywhere_by_default(self, otel: Otel) -> None:
        """Default config: the raw user id is in no span name, attribute or event."""
        user = "user-7f3a9c"
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        registry.register(Dispatcher, Dispatcher)
        async with registry.open_scope(ctx(user)):
            await ambient.resolve(Memory)
            await ambient.resolve(Dispatcher)
        await registry.aclose()
        assert otel.spans.spans
        for span in otel.spans.spans:
            assert user not in span.to_json()

    @pytest.mark.parametrize(
        ("options", "field"),
        [
            ({}, "user_id"),
            ({"user_id": "omit"}, "user_id"),
            ({"tenant_id": "hash"}, "tenant_id"),
        ],
    )
    async def test_an_invalid_id_a_context_error_echoes_is_not_exported(
        self, otel: Otel, options: dict[str, Any], field: str
    ) -> None:
        """A worker building a context from a flawed id (an e-mail with a trailing space,
        read from a queue) fails with an error echoing it: the scope span and the factory's
        span record that error without the id its policy keeps out of traces."""
        flawed = "alice@example.com "
        ids = {"user_id": flawed, "tenant_id": "acme"}
        if field == "tenant_id":
            ids = {"user_id": "alice", "tenant_id": flawed}

        class Job:
            def __init__(self) -> None:
                UserExecutionContext.create(ids["user_id"], tenant_id=ids["tenant_id"])

        registry = Registry(telemetry=otel.telemetry(**options))
        registry.register(Job, Job)
        with pytest.raises(ambient.InvalidContextError, match="alice@example.com"):
            async with registry.open_scope(ctx("worker")):
                await ambient.resolve(Job)
        spans = [one(otel.spans.named("ambient.scope")), one(otel.spans.named("ambient.resolve"))]
        for span in spans:
            assert "alice@example.com" not in span.to_json()
            (event,) = [e for e in span.events if e.name == "exception"]
            assert event.attributes is not None
            assert event.attributes["exception.message"] == (
                f"{field} is invalid: must not start or end with whitespace"
            )
            assert "InvalidContextError" in str(event.attributes["exception.stacktrace"])

    @pytest.mark.parametrize("wrapped", ["cause", "context", "group"])
    async def test_an_invalid_id_echoed_by_a_wrapped_context_error_is_not_exported(
        self, otel: Otel, wrapped: str
    ) -> None:
        """The error echoing a flawed user id reaches the scope wrapped: the cause of the
        job's own error, the error being handled when another was raised, or a member of
        an exception group (a task group's). Its stack trace, recorded on the scope span,
        holds the wrapped error's message too: without the id all the same."""
        flawed = "alice@example.com "
        registry = Registry(telemetry=otel.telemetry())
        with pytest.raises(Exception) as raised:  # noqa: PT011 - each case raises its own
            async with registry.open_scope(ctx("worker")):
                try:
                    UserExecutionContext.create(flawed)
                except ambient.InvalidContextError as error:
                    if wrapped == "cause":
                        raise RuntimeError("the job could not start") from error
                    if wrapped == "context":
                        raise RuntimeError("the job could not start")  # noqa: B904
                    failed = error
                # Raised where no error is being handled: a member of the group only.
                raise ExceptionGroup("jobs", [failed])
        assert "alice@example.com" in "".join(traceback.format_exception(raised.value))
        span = one(otel.spans.named("ambient.scope"))
        assert "alice@example.com" not in span.to_json()
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert "user_id is invalid" in str(event.attributes["exception.stacktrace"])

    async def test_an_unreadable_error_caused_by_an_echoed_invalid_id_is_recorded_without_it(
        self, otel: Otel
    ) -> None:
        """The job's own error, caused by the error echoing a flawed user id, has a message
        that cannot be read: the scope span still ends as an error, with an exception
        event whose message stands in for it and whose stack trace has the cause without
        the id. Reading the message to take the id out of it raised, and the span never
        ended."""
        flawed = "alice@example.com "
        registry = Registry(telemetry=otel.telemetry())
        with pytest.raises(UnreadableError):
            async with registry.open_scope(ctx("worker")):
                try:
                    UserExecutionContext.create(flawed)
                except ambient.InvalidContextError as error:
                    raise UnreadableError from error
        span = one(otel.spans.named("ambient.scope"))
        assert span.status.status_code is StatusCode.ERROR
        assert "alice@example.com" not in span.to_json()
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.message"] == "<exception str() failed>"
        assert "user_id is invalid" in str(event.attributes["exception.stacktrace"])

    @pytest.mark.parametrize("tenant_policy", ["raw", "hash", "omit"])
    async def test_an_invalid_id_is_echoed_where_its_policy_is_raw(
        self, otel: Otel, tenant_policy: Any
    ) -> None:
        """With user_id="raw" the error is recorded as it was raised, whatever the tenant
        id's policy: only the fields exported hashed or not at all are left out."""
        flawed = "alice@example.com "
        registry = Registry(telemetry=otel.telemetry(user_id="raw", tenant_id=tenant_policy))
        with pytest.raises(ambient.InvalidContextError):
            async with registry.open_scope(ctx("worker")):
                UserExecutionContext.create(flawed)
        (event,) = one(otel.spans.named("ambient.scope")).events
        assert event.attributes is not None
        assert "(got 'alice@example.com ')" in str(event.attributes["exception.message"])

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"user_id": "plain"}, "user_id must be one of"),
            ({"tenant_id": "sha1"}, "tenant_id must be one of"),
            ({"span_threshold": -1}, "span_threshold"),
            ({"hash_key": b""}, "hash_key"),
            ({"baggage": ("password",)}, "unknown: 'password'"),
            ({"baggage": ("thread_id", 7)}, "unknown: 7"),
            ({"baggage": ("user_id",), "user_id": "omit"}, "user_id cannot go into baggage"),
        ],
    )
    def test_bad_options_are_refused(self, options: dict[str, Any], message: str) -> None:
        """Unknown policies, negative thresholds and unknown baggage fields raise ValueError."""
        with pytest.raises(ValueError, match=message):
            Telemetry(**options)

    @pytest.mark.parametrize("fields", ["thread_id", b"thread_id"])
    def test_one_baggage_field_given_as_a_string_is_refused_saying_so(
        self, fields: str | bytes
    ) -> None:
        """A str is not read as a tuple of one-letter fields (``unknown: _, a, d, ...``)."""
        with pytest.raises(TypeError, match=r"baggage must be a tuple of field names"):
            Telemetry(baggage=fields)  # type: ignore[arg-type]


# -- metrics -------------------------------------------------------------------------------


class TestMetrics:
    async def test_metrics_after_n_requests(self, otel: Otel) -> None:
        """Counts and histogram counts add up after 30 scopes of 10 users; active back to 0."""
        registry = Registry(telemetry=otel.telemetry())
        registry.register(Dispatcher, Dispatcher)
        registry.register(Memory, Memory, lifetime=Lifetime.USER)

        def broken() -> Iterator[str]:
            yield "x"
            raise RuntimeError("boom")

        registry.register("broken", broken)
        users = [f"user-{i}" for i in range(10)]
        seen_active: list[float] = []
        failures = 0
        for n in range(30):
            try:
                async with registry.open_scope(ctx(users[n % 10], tenant_id=f"t{n % 10 % 3}")):
                    await ambient.resolve(Dispatcher)
                    await ambient.resolve(Memory)
                    if n % 5 == 0:
                        await ambient.resolve("broken")
                    seen_active.append(otel.total("ambient.scopes.active"))
            except CleanupError:
                failures += 1
        assert failures == 6
        assert seen_active == [1] * 30
        assert otel.total("ambient.scopes.active") == 0
        assert otel.count("ambient.component.create.duration") == 30 + 10 + 6
        assert otel.count("ambient.cleanup.duration") == 30 + 6
        assert otel.total("ambient.cleanup.failures") == 6
        assert otel.total("ambient.user_components.live") == 10
        await registry.aclose()
        assert otel.total("ambient.user_components.live") == 0
        # Memory has nothing to clean up: its end is counted as a live USER component
        # gone, never as a cleanup.
        assert otel.count("ambient.cleanup.duration") == 30 + 6
        points = otel.points()
        by_component = {
            p.attributes["ambient.component"]: p.count
            for p in points["ambient.component.create.duration"]
        }
        assert by_component == {"Dispatcher": 30, "Memory": 10, "'broken'": 6}
        forbidden = set(users) | {"t0", "t1", "t2"} | {hash_id(u) for u in users}
        for name, data_points in points.items():
            for point in data_points:
                values = {str(v) for v in (point.attributes or {}).values()}
                assert not values & forbidden, (name, point.attributes)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_cleanup_cut_short_by_a_cancellation_is_no_cleanup_failure(
        self, otel: Otel
    ) -> None:
        """A native cancellation (``task.cancel()``, which anyio's shield does not hold back)
        cuts a cleanup short: its span is marked cancelled, not an error, and neither the
        scope span nor the registry counts a failure. ambient.cleanup.failures counted one."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        await _cancel_as_a_cleanup_hangs(registry)
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert (cleanup.attributes or {})["ambient.cancelled"] is True
        assert cleanup.status.status_code is StatusCode.UNSET
        scope_span = one(otel.spans.named("ambient.scope"))
        assert (scope_span.attributes or {})["ambient.cleanup.failures"] == 0
        assert registry.stats().cleanup_failures == 0
        assert otel.count("ambient.cleanup.duration") == 1
        assert otel.total("ambient.cleanup.failures") == 0

    @pytest.mark.parametrize("factory", ["async", "sync in a worker thread"])
    async def test_a_component_made_while_the_registry_closes_is_counted_made_and_cleaned(
        self, otel: Otel, factory: str
    ) -> None:
        """registry.aclose() (shutdown) closes a user's store while a request's USER factory
        runs: what the factory makes is refused and cleaned at once, and the request gets
        ScopeClosedError (the registry is closed: nothing more is made). The creation is
        counted and traced, as its cleanup is: the refused one's creation used to be
        missing while its cleanup was counted."""
        started, go_on = anyio.Event(), threading.Event()
        made: list[str] = []

        async def memory(user: UserRef) -> AsyncIterator[Memory]:
            made.append(user.user_id)
            started.set()
            await anyio.to_thread.run_sync(go_on.wait, 5)
            yield Memory(user)

        def memory_sync(user: UserRef) -> Iterator[Memory]:
            made.append(user.user_id)
            anyio.from_thread.run_sync(started.set)
            go_on.wait(5)
            yield Memory(user)

        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(
            Memory, memory if factory == "async" else memory_sync, lifetime=Lifetime.USER
        )
        refused: list[Exception] = []

        async def request() -> None:
            async with registry.open_scope(ctx("alice")):
                try:
                    if factory == "async":
                        await ambient.resolve(Memory)
                    else:
                        await anyio.to_thread.run_sync(ambient.resolve_sync, Memory)
                except ambient.errors.ScopeClosedError as exc:
                    refused.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await started.wait()
                await registry.aclose()
                go_on.set()
        assert made == ["alice"]
        assert len(refused) == 1
        assert registry.stats().created == registry.stats().cleaned == 1
        assert otel.count("ambient.component.create.duration") == 1
        assert otel.count("ambient.cleanup.duration") == 1
        assert otel.total("ambient.user_components.live") == 0
        scope_span = one(otel.spans.named("ambient.scope"))
        assert (scope_span.attributes or {})["ambient.components.created"] == 1
        resolve = one(otel.spans.named("ambient.resolve"))
        assert parent_id(resolve) == scope_span.context.span_id
        # Cleaned inside the request, as it was refused.
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert parent_id(cleanup) == scope_span.context.span_id

    @pytest.mark.parametrize("closes", [False, True], ids=["no cleanup", "cleanup"])
    async def test_a_request_component_handing_out_the_users_one_never_counts_it_down(
        self, otel: Otel, closes: bool
    ) -> None:
        """A REQUEST component whose factory returns the user's own USER component (a
        per-request view of it) ends with each request; the user's component lives on and
        stays counted in ambient.user_components.live, for each of many users."""

        class Session:
            def __init__(self, user: UserRef) -> None:
                self.user = user

        class ClosingSession(Session):
            def close(self) -> None:
                pass

        kind = ClosingSession if closes else Session

        async def view() -> Session:
            return await ambient.resolve(kind)

        registry = Registry(telemetry=otel.telemetry())
        registry.register(kind, kind, lifetime=Lifetime.USER)
        registry.register("view", view)
        users = [f"user-{i}" for i in range(10)]
        for _ in range(2):
            for user in users:
                async with registry.open_scope(ctx(user)):
                    assert isinstance(await ambient.resolve("view"), kind)
        assert otel.total("ambient.user_components.live") == 10
        await registry.aclose()
        assert otel.total("ambient.user_components.live") == 0

    async def test_one_object_handed_to_many_users_is_counted_for_each(self, otel: Otel) -> None:
        """USER factories that return one shared object (``None``, a module-level client)
        make a component per user all the same: each is counted live and counted down as
        it goes, so the count returns to zero."""
        shared = object()
        registry = Registry(telemetry=otel.telemetry())
        registry.register("nothing", lambda: None, lifetime=Lifetime.USER)
        registry.register("shared", lambda: shared, lifetime=Lifetime.USER)
        for i in range(10):
            async with registry.open_scope(ctx(f"user-{i}")):
                assert await ambient.resolve("nothing") is None
                assert await ambient.resolve("shared") is shared
        assert otel.total("ambient.user_components.live") == 20
        await registry.aclose()
        assert otel.total("ambient.user_components.live") == 0

    async def test_a_failed_user_factory_is_never_counted_live(self, otel: Otel) -> None:
        """Ten users whose USER factory fails, concurrently: each failure is timed, none is
        counted as a live USER component (nothing lives, and nothing will be cleaned up to
        count it down again), next to ten users whose factory works."""
        registry = Registry(telemetry=otel.telemetry())

        def memory(user: UserRef) -> Memory:
            if user.user_id.startswith("broken"):
                raise ConnectionError("store down")
            return Memory(user)

        registry.register(Memory, memory, lifetime=Lifetime.USER)
        failed: list[str] = []

        async def visit(user: str) -> None:
            async with registry.open_scope(ctx(user)):
                try:
                    await ambient.resolve(Memory)
                except ConnectionError:
                    failed.append(user)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(visit, f"broken-{i}")
                tg.start_soon(visit, f"fine-{i}")
        assert len(failed) == 10
        assert otel.count("ambient.component.create.duration") == 20
        assert otel.total("ambient.user_components.live") == 10
        await registry.aclose()
        assert otel.total("ambient.user_components.live") == 0

    async def test_scopes_active_counts_every_telemetry_on_one_meter(self, otel: Otel) -> None:
        """Two telemetries on one meter provider add up in one ambient.scopes.active."""
        first = Registry(telemetry=otel.telemetry())
        second = Registry(telemetry=otel.telemetry())
        async with first.open_scope(ctx("alice")):
            async with second.open_scope(ctx("bob"), allow_switch=True):
                assert otel.total("ambient.scopes.active") == 2
            assert otel.total("ambient.scopes.active") == 1
        assert otel.total("ambient.scopes.active") == 0

    async def test_histograms_use_second_buckets(self, otel: Otel) -> None:
        """Durations are seconds with buckets fine enough for microsecond factories and
        cleanups."""
        registry = Registry(telemetry=otel.telemetry())
        registry.register(Dispatcher, Dispatcher)
        async with registry.open_scope(ctx()):
            await ambient.resolve(Dispatcher)
        for name in ("ambient.component.create.duration", "ambient.cleanup.duration"):
            (point,) = otel.points()[name]
            assert point.explicit_bounds[0] == 0.0001
            assert point.explicit_bounds[-1] == 10.0
            assert point.sum < 1

    def test_global_state_accesses_are_counted_by_name(self, otel: Otel) -> None:
        """record_global_access counts per global name, nothing else in the attributes."""
        telemetry = otel.telemetry()
        for _ in range(3):
            telemetry.record_global_access("legacy_engine")
        (point,) = otel.points()["ambient.global_state.accesses"]
        assert point.value == 3
        assert dict(point.attributes) == {"ambient.global": "legacy_engine"}

    async def test_many_users_add_no_span_name_and_no_metric_series(self, otel: Otel) -> None:
        """200 users of 20 tenants, 3 requests each, 50 at once, through the middleware
        with every operation a span and the raw user id an attribute: every request gets its
        own answer, and ambient's spans take their names from 3 only, none naming a user,
        tenant or path; no metric point carries a user or tenant (nor its hash), and each
        instrument has as many series for 200 users as it had for the first user alone."""
        telemetry = otel.telemetry(span_threshold=0, user_id="raw", tenant_id="raw", hash_key="k")
        registry = server_registry(telemetry)
        app = AmbientMiddleware(
            streaming_handler,
            registry=registry,
            identity=trusted_header(tenant_header="x-tenant-id"),
        )
        users = [f"user-{n}" for n in range(200)]
        tenants = {user: f"tenant-{n % 20}" for n, user in enumerate(users)}
        limit = anyio.Semaphore(50)
        wrong: list[tuple[str, dict[str, Any]]] = []
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))

        async def one(http: httpx.AsyncClient, user: str, n: int) -> None:
            async with limit:
                answer = await http.get(
                    f"/u/{user}/{n}",
                    headers={"x-user-id": user, "x-tenant-id": tenants[user]},
                )
            if answer.status_code != 200 or answer.json()["user_id"] != user:
                wrong.append((user, answer.json()))

        def series() -> dict[str, int]:
            return {name: len(points) for name, points in otel.points().items()}

        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            await one(http, users[0], 0)
            first = series()
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    for user in users:
                        tg.start_soon(one, http, user, n)
        assert wrong == []
        assert series() == first
        await registry.aclose()
        assert len(otel.spans.named("ambient.scope")) == 1 + 3 * len(users)
        names = {span.name for span in otel.spans.spans}
        assert names == {"ambient.scope", "ambient.resolve", "ambient.cleanup"}
        forbidden = set(users) | set(tenants.values())
        forbidden |= {hash_id(value, "k") for value in forbidden}
        for name, points in otel.points().items():
            for point in points:
                values = {str(v) for v in (point.attributes or {}).values()}
                assert not values & forbidden, (name, point.attributes)
                assert not any("/u/" in value for value in values), (name, point.attributes)


# -- no SDK --------------------------------------------------------------------------------


@pytest.fixture(name="no_sdk")
def fixture_no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The global providers as they are before any SDK is installed (whatever other tests
    of this process may have installed)."""
    from opentelemetry import metrics
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    tracer_provider = trace.ProxyTracerProvider()
    meter_provider = _ProxyMeterProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: tracer_provider)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: meter_provider)


@pytest.mark.usefixtures("no_sdk")
class TestNoSdk:
    async def test_global_proxy_provider_means_no_work(self) -> None:
        """With no SDK configured telemetry is dormant: no per-scope state, context untouched."""
        telemetry = Telemetry()
        assert not telemetry.active
        registry = Registry(telemetry=telemetry)
        registry.register(Dispatcher, Dispatcher)
        before = otel_context.get_current()
        async with registry.open_scope(ctx()) as scope:
            await ambient.resolve(Dispatcher)
            assert otel_context.get_current() is before
            assert telemetry not in scope.state

    async def test_explicit_noop_providers_are_dormant(self) -> None:
        """NoOp tracer and meter providers are recognised as such."""
        from opentelemetry.metrics import NoOpMeterProvider

        telemetry = Telemetry(
            tracer_provider=trace.NoOpTracerProvider(), meter_provider=NoOpMeterProvider()
        )
        assert not telemetry.active

    async def test_a_disabled_sdk_is_dormant(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """SDK providers made under OTEL_SDK_DISABLED=true hand out no-op tracers and
        meters: the telemetry is dormant as with no SDK (no per-scope state, no no-op
        spans made current), for every user."""
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        telemetry = Telemetry(tracer_provider=TracerProvider(), meter_provider=MeterProvider())
        assert not telemetry.active
        registry = Registry(telemetry=telemetry)
        registry.register(Dispatcher, Dispatcher)
        before = otel_context.get_current()

        async def visit(user: str) -> None:
            async with registry.open_scope(ctx(user)) as scope:
                await ambient.resolve(Dispatcher)
                assert otel_context.get_current() is before
                assert telemetry not in scope.state

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(visit, f"user-{i}")

    async def test_sdk_installed_later_is_picked_up(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A global provider set after the telemetry was built is found on a later scope."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry()
        assert not telemetry.active
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel.tracer_provider)
        registry = Registry(telemetry=telemetry)
        async with registry.open_scope(ctx()):
            pass
        assert telemetry.active
        assert len(otel.spans.named("ambient.scope")) == 1

    async def test_sdk_installed_later_is_picked_up_when_given_the_proxy_providers(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A telemetry given the global providers as they were at start-up (still the API's
        proxies) follows the SDK installed later, as one given no provider does: spans and
        metrics both, for every user served after it."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry(
            tracer_provider=trace.get_tracer_provider(), meter_provider=metrics.get_meter_provider()
        )
        registry = Registry(telemetry=telemetry)
        assert not telemetry.active
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel.tracer_provider)
        monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
        for i in range(5):
            async with registry.open_scope(ctx(f"user-{i}")):
                pass
        assert telemetry.active
        assert len(otel.spans.named("ambient.scope")) == 5
        assert otel.points()["ambient.scopes.active"][0].value == 0

    async def test_sdk_installed_later_is_picked_up_by_a_scope_given_the_telemetry(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same for a telemetry given to each scope (as the middleware does) instead of
        to the registry: a global provider set after it was built is found."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry()
        registry = Registry()
        async with registry.open_scope(ctx(), observer=telemetry):
            pass
        assert not telemetry.active
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel.tracer_provider)
        async with registry.open_scope(ctx(), observer=telemetry):
            pass
        assert telemetry.active
        assert len(otel.spans.named("ambient.scope")) == 1

    async def test_a_dormant_telemetry_asked_for_every_scope_does_no_work(self) -> None:
        """A subclass deciding ``active`` itself is asked for every scope; with no SDK it
        still records nothing: no per-scope state, the context untouched, for every user."""

        class AlwaysAsked(Telemetry):
            asked = 0

            @property
            def active(self) -> bool:
                self.asked += 1
                return True

        telemetry = AlwaysAsked()
        registry = Registry(telemetry=telemetry)
        registry.register(Dispatcher, Dispatcher)
        before = otel_context.get_current()
        for user in ("alice", "bob"):
            async with registry.open_scope(ctx(user)) as scope:
                await ambient.resolve(Dispatcher)
                assert otel_context.get_current() is before
                assert telemetry not in scope.state
        assert telemetry.asked >= 2
        assert repr(telemetry) == "<Telemetry dormant user_id='hash'>"

    def test_global_accesses_counted_directly_wait_for_the_sdk_installed_later(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``record_global_access`` called before any SDK counts nothing and neither raises
        nor logs; once a global meter provider is set, the next call finds and counts it."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry()
        with caplog.at_level(logging.DEBUG, logger="ambient"):
            telemetry.record_global_access("legacy_engine")
        assert [r for r in caplog.records if r.name == "ambient"] == []
        assert otel.points() == {}
        monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
        telemetry.record_global_access("legacy_engine")
        telemetry.record_global_access("legacy_engine")
        (point,) = otel.points()["ambient.global_state.accesses"]
        assert point.value == 2

    async def test_a_dormant_telemetry_says_until_when_it_stays_inactive(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Waiting for an SDK, ``inactive_until`` is when it looks again (so a scope opening
        before then does not ask); on explicit no-op providers, never; once active, ``None``."""
        from opentelemetry.metrics import NoOpMeterProvider

        telemetry = Telemetry()
        assert not telemetry.active  # looks now, and not again for a second
        assert telemetry.inactive_until is not None
        assert 0 < telemetry.inactive_until - time.monotonic() <= 1.0
        noop = Telemetry(
            tracer_provider=trace.NoOpTracerProvider(), meter_provider=NoOpMeterProvider()
        )
        assert noop.inactive_until == float("inf")
        traced = Telemetry(tracer_provider=otel.tracer_provider)
        assert traced.inactive_until is None
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        late = Telemetry()
        assert not late.active
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: otel.tracer_provider)
        assert late.active
        assert late.inactive_until is None

    async def test_a_subclass_with_its_own_active_is_asked_for_every_scope(self) -> None:
        """A subclass deciding ``active`` itself is asked as before: the base's own wait for
        an SDK says nothing about the subclass's answer."""

        class Always(Telemetry):
            opened: list[str]

            @property
            def active(self) -> bool:
                return True

            def scope_opened(self, scope: ambient.Scope) -> None:
                self.opened.append(scope.context.user_id)

        always = Always()
        always.opened = []
        assert always.inactive_until is None
        registry = Registry(telemetry=always)
        for user in ("alice", "bob"):
            async with registry.open_scope(ctx(user)):
                pass
        assert always.opened == ["alice", "bob"]

    async def test_a_meter_found_later_counts_only_what_it_saw_made(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """USER components made before the meter provider was set were never counted live;
        their cleanups after it was set must not count them down, or
        ambient.user_components.live goes below zero and stays there."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry()
        registry = Registry(telemetry=telemetry)
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        for user in ("alice", "bob"):
            async with registry.open_scope(ctx(user)):
                await ambient.resolve(Memory)
        assert not telemetry.active
        monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
        async with registry.open_scope(ctx("carol")):
            await ambient.resolve(Memory)
        assert telemetry.active
        assert otel.total("ambient.user_components.live") == 1
        await registry.aclose()
        assert otel.total("ambient.user_components.live") == 0

    async def test_a_meter_found_later_counts_down_only_what_it_saw_made_when_cleaned(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same for USER components with a cleanup of their own: those of the users
        served before the meter provider was set are cleaned up (and timed) without
        counting down ambient.user_components.live, and what it counted is forgotten as
        they go."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        closed: list[str] = []

        class Session:
            def __init__(self, user: UserRef) -> None:
                self.user = user

            def close(self) -> None:
                closed.append(self.user.user_id)

        telemetry = Telemetry()
        registry = Registry(telemetry=telemetry)
        registry.register(Session, Session, lifetime=Lifetime.USER)
        early = [f"early-{i}" for i in range(5)]
        for user in early:
            async with registry.open_scope(ctx(user)):
                await ambient.resolve(Session)
        assert not telemetry.active
        monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
        for user in ("late-0", "late-1"):
            async with registry.open_scope(ctx(user)):
                await ambient.resolve(Session)
        assert telemetry.active
        assert otel.total("ambient.user_components.live") == 2
        await registry.aclose()
        assert sorted(closed) == sorted([*early, "late-0", "late-1"])
        assert otel.count("ambient.cleanup.duration") == 7
        assert otel.total("ambient.user_components.live") == 0
        # Nothing is kept per component once it is gone: a long-running process serves
        # ever more users.
        instruments = telemetry._instruments
        assert instruments is not None
        assert instruments.counted == {}

    async def test_scopes_open_before_the_meter_was_found_are_not_counted_closed(
        self, otel: Otel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A traced telemetry whose meter provider is set while scopes are open counts only
        the scopes it saw open: ambient.scopes.active never goes below what is open."""
        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        registry = Registry(telemetry=Telemetry(tracer_provider=otel.tracer_provider))
        early_open = anyio.Event()
        late_open = anyio.Event()
        close_early = anyio.Event()
        close_late = anyio.Event()
        early_closed = anyio.Event()
        opened = closed = 0

        async def visit(user: str, ready: anyio.Event, close: anyio.Event) -> None:
            nonlocal opened, closed
            async with registry.open_scope(ctx(user)):
                opened += 1
                if opened in (10, 20):
                    ready.set()
                await close.wait()
            closed += 1
            if closed == 10:
                early_closed.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(visit, f"early-{i}", early_open, close_early)
                await early_open.wait()
                monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
                for i in range(10):
                    tg.start_soon(visit, f"late-{i}", late_open, close_late)
                await late_open.wait()
                assert otel.total("ambient.scopes.active") == 10
                close_early.set()
                await early_closed.wait()
                assert otel.total("ambient.scopes.active") == 10
                close_late.set()
        assert otel.total("ambient.scopes.active") == 0
        assert len(otel.spans.named("ambient.scope")) == 20

    @pytest.mark.parametrize("provider", ["tracer", "meter"])
    async def test_a_failing_provider_found_later_never_breaks_a_request(
        self,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        provider: str,
    ) -> None:
        """A provider set after start-up whose tracer or instruments cannot be made is given
        up on with one logged error; the requests that come across it go on."""

        class Broken:
            def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
                raise RuntimeError("exporter misconfigured")

            def get_meter(self, *args: object, **kwargs: object) -> metrics.Meter:
                raise RuntimeError("exporter misconfigured")

        monkeypatch.setattr(ambient.telemetry, "_RECHECK_SECONDS", 0.0)
        telemetry = Telemetry()
        registry = Registry(telemetry=telemetry)
        registry.register(Dispatcher, Dispatcher)
        getter = "get_tracer_provider" if provider == "tracer" else "get_meter_provider"
        monkeypatch.setattr(trace if provider == "tracer" else metrics, getter, Broken)
        with caplog.at_level(logging.ERROR, logger="ambient"):
            for user in ("alice", "bob", "carol"):
                async with registry.open_scope(ctx(user)):
                    assert isinstance(await ambient.resolve(Dispatcher), Dispatcher)
        failures = [r for r in caplog.records if "telemetry failed" in r.getMessage()]
        assert [r.getMessage().split(";")[0] for r in failures] == [
            f"ambient telemetry failed in {provider} provider"
        ]
        await registry.aclose()

    async def test_baggage_alone_is_active(self) -> None:
        """Baggage works without an SDK (propagation needs only the API)."""
        telemetry = Telemetry(baggage=("thread_id",))
        registry = Registry(telemetry=telemetry)
        context = ctx()
        async with registry.open_scope(context):
            assert baggage.get_baggage("ambient.thread_id") == context.thread_id
        assert baggage.get_baggage("ambient.thread_id") is None


# -- baggage -------------------------------------------------------------------------------


class BaggageToAttributes(SpanProcessor):
    """Copies the baggage of a span's parent context onto the span as it starts, as
    opentelemetry-processor-baggage does."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for key, value in baggage.get_all(parent_context).items():
            span.set_attribute(key, str(value))


class TestBaggage:
    async def test_a_field_without_a_value_goes_into_no_baggage_and_a_forged_one_is_dropped(
        self, otel: Otel
    ) -> None:
        """A context field named for baggage that the context does not have (no tenant, no
        connection) puts no entry in, not even an empty one, and a forged incoming entry of
        that name is dropped all the same, for each user."""
        registry = Registry(
            telemetry=otel.telemetry(baggage=("tenant_id", "connection_id", "thread_id"))
        )
        for user in ("alice", "bob"):
            incoming = baggage.set_baggage("ambient.tenant_id", "forged-tenant")
            incoming = baggage.set_baggage("ambient.connection_id", "forged-conn", incoming)
            token = otel_context.attach(incoming)
            try:
                context = ctx(user)
                async with registry.open_scope(context):
                    entries = dict(baggage.get_all())
            finally:
                otel_context.detach(token)
            assert entries == {"ambient.thread_id": context.thread_id}

    async def test_off_by_default(self, otel: Otel) -> None:
        """Default telemetry puts nothing into baggage; outgoing headers carry none."""
        registry = Registry(telemetry=otel.telemetry())
        async with registry.open_scope(ctx("alice")):
            headers: dict[str, str] = {}
            propagate.inject(headers)
        assert "baggage" not in headers
        assert "traceparent" in headers

    async def test_named_fields_with_the_id_policy(self, otel: Otel) -> None:
        """baggage=("thread_id", "user_id") sends the thread id and the *hashed* user id."""
        registry = Registry(telemetry=otel.telemetry(baggage=("thread_id", "user_id")))
        context = ctx("alice")
        async with registry.open_scope(context):
            headers: dict[str, str] = {}
            propagate.inject(headers)
        entries = dict(item.split("=", 1) for item in headers["baggage"].split(","))
        assert entries == {
            "ambient.thread_id": context.thread_id,
            "ambient.user_id": hash_id("alice"),
        }
        assert "alice" not in headers["baggage"]

    @pytest.mark.parametrize(
        ("user_policy", "tenant_policy"), [("hash", "hash"), ("raw", "hash"), ("hash", "raw")]
    )
    async def test_both_ids_go_into_baggage_under_their_own_policies_for_many_users(
        self, otel: Otel, user_policy: Any, tenant_policy: Any
    ) -> None:
        """The user and the tenant id in baggage follow each one's own policy: a hashed
        tenant id never leaves the process raw, for each of many concurrent users."""
        telemetry = otel.telemetry(
            user_id=user_policy,
            tenant_id=tenant_policy,
            hash_key="k",
            baggage=("user_id", "tenant_id"),
        )
        registry = Registry(telemetry=telemetry)
        sent: dict[str, dict[str, str]] = {}

        def exported(policy: str, value: str) -> str:
            return hash_id(value, "k") if policy == "hash" else value

        async def visit(i: int) -> None:
            async with registry.open_scope(ctx(f"user-{i}", tenant_id=f"tenant-{i}")):
                await anyio.lowlevel.checkpoint()
                headers: dict[str, str] = {}
                propagate.inject(headers)
                sent[f"user-{i}"] = dict(
                    item.split("=", 1) for item in headers["baggage"].split(",")
                )

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(visit, i)
        assert sent == {
            f"user-{i}": {
                "ambient.user_id": exported(user_policy, f"user-{i}"),
                "ambient.tenant_id": exported(tenant_policy, f"tenant-{i}"),
            }
            for i in range(20)
        }

    async def test_incoming_ambient_baggage_is_dropped(self, otel: Otel) -> None:
        """Incoming `ambient.*` baggage never survives into the scope; other entries do."""
        registry = Registry(telemetry=otel.telemetry())
        incoming = baggage.set_baggage("ambient.user_id", "admin")
        incoming = baggage.set_baggage("other", "kept", incoming)
        token = otel_context.attach(incoming)
        try:
            async with registry.open_scope(ctx("bob")):
                assert ambient.get_current_context().user_id == "bob"
                assert baggage.get_baggage("ambient.user_id") is None
                assert baggage.get_baggage("other") == "kept"
        finally:
            otel_context.detach(token)

    async def test_incoming_ambient_baggage_is_dropped_by_metrics_only_telemetry(
        self, otel: Otel
    ) -> None:
        """A telemetry with metrics and no tracing is active as well: forged `ambient.*`
        baggage from the client does not survive into the scope (and from there into the
        `baggage` header of the app's outgoing calls) either."""
        telemetry = Telemetry(
            tracer_provider=trace.NoOpTracerProvider(), meter_provider=otel.meter_provider
        )
        registry = Registry(telemetry=telemetry)
        incoming = baggage.set_baggage("ambient.user_id", "admin")
        incoming = baggage.set_baggage("other", "kept", incoming)
        token = otel_context.attach(incoming)
        try:
            async with registry.open_scope(ctx("bob")):
                assert telemetry.active
                assert baggage.get_baggage("ambient.user_id") is None
                assert baggage.get_baggage("other") == "kept"
                outgoing: dict[str, str] = {}
                propagate.inject(outgoing)
                assert "ambient.user_id" not in outgoing.get("baggage", "")
            assert baggage.get_baggage("ambient.user_id") == "admin"  # the caller's, restored
        finally:
            otel_context.detach(token)

    @pytest.mark.parametrize("metrics_only", [False, True])
    async def test_every_forged_ambient_entry_is_dropped_for_many_users(
        self, otel: Otel, metrics_only: bool
    ) -> None:
        """Not only `ambient.user_id`: a client's `ambient.tenant_id`, `ambient.thread_id`,
        any `ambient.*` entry is dropped before the scope's outgoing calls see it, for
        twenty concurrent users each forging another tenant; what the telemetry puts in
        itself (`baggage=("thread_id",)`) is the user's own; other entries pass."""
        if metrics_only:
            telemetry = Telemetry(
                tracer_provider=trace.NoOpTracerProvider(), meter_provider=otel.meter_provider
            )
        else:
            telemetry = otel.telemetry(baggage=("thread_id",))
        registry = Registry(telemetry=telemetry)
        forged = [f"ambient.{field}" for field in sorted(ambient.telemetry.BAGGAGE_FIELDS)]
        forged.append("ambient.role")
        sent: dict[str, str] = {}

        async def visit(i: int) -> None:
            incoming = otel_context.Context()
            for key in forged:
                incoming = baggage.set_baggage(key, f"forged-{i}", incoming)
            incoming = baggage.set_baggage("other", f"kept-{i}", incoming)
            token = otel_context.attach(incoming)
            try:
                async with registry.open_scope(ctx(f"user-{i}", thread_id=f"thread-{i}")):
                    await anyio.lowlevel.checkpoint()
                    outgoing: dict[str, str] = {}
                    propagate.inject(outgoing)
                    sent[f"user-{i}"] = outgoing.get("baggage", "")
                    assert baggage.get_baggage("other") == f"kept-{i}"
            finally:
                otel_context.detach(token)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(visit, i)
        assert len(sent) == 20
        for i in range(20):
            header = sent[f"user-{i}"]
            assert "forged" not in header, header
            assert f"other=kept-{i}" in header
            if not metrics_only:
                assert f"ambient.thread_id=thread-{i}" in header

    @pytest.mark.parametrize("fields", [(), ("user_id",)])
    async def test_forged_ambient_baggage_never_reaches_the_scopes_spans(
        self, otel: Otel, fields: tuple[str, ...]
    ) -> None:
        """A span processor that copies the baggage of a span's parent context onto the span
        (as opentelemetry-processor-baggage does) never sees a client's forged
        `ambient.user_id` on the scope span or its component spans: it used to overwrite
        the span's own hashed user id with "admin"."""

        otel.tracer_provider.add_span_processor(BaggageToAttributes())
        registry = Registry(telemetry=otel.telemetry(span_threshold=0, baggage=fields))
        registry.register(Dispatcher, Dispatcher)
        incoming = baggage.set_baggage("ambient.user_id", "admin")
        incoming = baggage.set_baggage("other", "kept", incoming)
        token = otel_context.attach(incoming)
        try:
            async with registry.open_scope(ctx("bob")):
                await ambient.resolve(Dispatcher)
        finally:
            otel_context.detach(token)
        scope_span = one(otel.spans.named("ambient.scope"))
        assert (scope_span.attributes or {})["ambient.user_id"] == hash_id("bob")
        assert (scope_span.attributes or {})["other"] == "kept"
        for span in otel.spans.spans:
            assert (span.attributes or {}).get("ambient.user_id") in (None, hash_id("bob"))

    async def test_baggage_a_scope_takes_in_from_a_message_never_labels_its_component_spans(
        self, otel: Otel
    ) -> None:
        """Inside their scopes, ten users' handlers attach the context propagated with a
        message (a queue consumer, a websocket frame) whose baggage forges
        `ambient.user_id`: a span processor copying baggage onto spans still never labels
        a component span with it; component spans start from the scope's own context."""

        otel.tracer_provider.add_span_processor(BaggageToAttributes())
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        users = [f"user-{i}" for i in range(10)]

        async def visit(user: str) -> None:
            async with registry.open_scope(ctx(user)):
                message = propagate.extract({"baggage": "ambient.user_id=admin,order=o-1"})
                token = otel_context.attach(message)
                try:
                    await anyio.lowlevel.checkpoint()
                    await ambient.resolve(Dispatcher)
                finally:
                    otel_context.detach(token)

        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(visit, user)
        resolves = otel.spans.named("ambient.resolve")
        assert len(resolves) == 10
        scopes = {s.context.span_id: s for s in otel.spans.named("ambient.scope")}
        for span in resolves:
            assert (span.attributes or {}).get("ambient.user_id") is None, span.attributes
            assert span.parent is not None
            assert span.parent.span_id in scopes

    @pytest.mark.parametrize("size", [8_000, 16 * 1024])
    async def test_oversized_incoming_baggage_is_bounded_and_never_identity(
        self, otel: Otel, size: int
    ) -> None:
        """100 users at once, each request carrying a baggage header of thousands of
        entries, forged ``ambient.*`` ones first, through otel-asgi and the middleware.
        Each request runs as its header's user and its context holds nothing from the
        baggage. The propagator's W3C limits hold: at 8,000 bytes only the first 180
        entries reach the app, and the forged ones among them are dropped; at 16 KB the
        whole header is refused. No span carries a baggage value."""
        telemetry = otel.telemetry(baggage=("thread_id",))
        registry = Registry(telemetry=telemetry)
        seen: dict[str, tuple[UserExecutionContext, dict[str, object]]] = {}

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            context = ambient.get_current_context()
            seen[context.user_id] = (context, dict(baggage.get_all()))
            await anyio.lowlevel.checkpoint()
            body = context.user_id.encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        stack = OpenTelemetryMiddleware(
            AmbientMiddleware(
                app, registry=registry, identity=trusted_header(), telemetry=telemetry
            ),
            tracer_provider=otel.tracer_provider,
        )
        forged = "ambient.user_id=admin,ambient.thread_id=stolen,"
        entries = ",".join(f"k{i}=v{i}" for i in range(5_000))
        header = (forged + entries)[:size].rsplit(",", 1)[0]
        answers: dict[str, httpx.Response] = {}

        async def one(client: httpx.AsyncClient, user: str) -> None:
            headers = {"x-user-id": user, "baggage": header}
            answers[user] = await client.get("/", headers=headers)

        transport = httpx.ASGITransport(app=stack, client=("127.0.0.1", 50000))
        users = [f"user-{n}" for n in range(100)]
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            anyio.create_task_group() as tg,
        ):
            for user in users:
                tg.start_soon(one, client, user)
        assert {u: (a.status_code, a.text) for u, a in answers.items()} == {
            u: (200, u) for u in users
        }
        for user in users:
            context, entries_seen = seen[user]
            assert context.user_id == user
            assert context.metadata == {}
            # 180 pairs pass the propagator, the 2 forged are dropped, ambient adds 1.
            assert len(entries_seen) == (180 - 2 + 1 if size < 8192 else 1)
            ambient_entries = {k: v for k, v in entries_seen.items() if k.startswith("ambient.")}
            assert ambient_entries == {"ambient.thread_id": context.thread_id}
        values = {f"v{i}" for i in range(5_000)} | {"admin", "stolen"}
        for span in otel.spans.spans:
            attributes = dict(span.attributes or {})
            assert not values & {str(v) for v in attributes.values()}, span.name


# -- telemetry never breaks a request, never fails to detach ---------------------------------


class Exploding(SpanProcessor):
    """A span processor that raises on every start and end."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        raise RuntimeError("processor down")

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("processor down")


class ExplodingExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        raise ConnectionError("collector down")


class TestNeverBreaks:
    async def test_raising_span_processor_is_logged_once_and_requests_go_on(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every hook failing: all scopes run and clean up; each failure site logged once."""
        provider = TracerProvider()
        provider.add_span_processor(Exploding())
        registry = Registry(telemetry=Telemetry(tracer_provider=provider, span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        before = otel_context.get_current()
        dispatchers: list[Dispatcher] = []
        with caplog.at_level(logging.ERROR, logger="ambient"):
            for _ in range(20):
                async with registry.open_scope(ctx()):
                    dispatchers.append(await ambient.resolve(Dispatcher))
        assert all(d.closed for d in dispatchers)
        assert otel_context.get_current() is before
        messages = [r.getMessage() for r in caplog.records if r.name == "ambient"]
        assert messages
        assert len(messages) == len(set(messages)) <= 5
        provider.shutdown()

    async def test_raising_exporter_does_not_break_scopes(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An exporter that raises is the SDK's to log; the scope and its cleanup go on."""
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(ExplodingExporter()))
        registry = Registry(telemetry=Telemetry(tracer_provider=provider, span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        with caplog.at_level(logging.ERROR):
            async with registry.open_scope(ctx()):
                dispatcher = await ambient.resolve(Dispatcher)
        assert dispatcher.closed
        assert any("collector down" in r.getMessage() or r.exc_info for r in caplog.records)
        provider.shutdown()

    async def test_cancelled_scopes_end_every_span_without_detach_errors(
        self, otel: Otel, detach_errors: list[logging.LogRecord]
    ) -> None:
        """50 scopes cancelled mid-body (with a user span current): starts == ends, no
        "Failed to detach context", every cleanup ran."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        tracer = otel.tracer_provider.get_tracer("test")
        dispatchers: list[Dispatcher] = []
        blocked = 0
        all_blocked = anyio.Event()

        async def request(n: int) -> None:
            nonlocal blocked
            async with registry.open_scope(ctx(f"user-{n}")):
                dispatchers.append(await ambient.resolve(Dispatcher))
                with tracer.start_as_current_span("handler"):
                    blocked += 1
                    if blocked == 50:
                        all_blocked.set()
                    await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(request, n)
            await all_blocked.wait()
            tg.cancel_scope.cancel()
        assert len(dispatchers) == 50
        assert all(d.closed for d in dispatchers)
        assert otel.spans.started == len(otel.spans.spans)
        assert len(otel.spans.named("ambient.scope")) == 50
        assert otel.total("ambient.scopes.active") == 0
        assert detach_errors == []

    async def test_generator_scope_closed_from_another_task(
        self, otel: Otel, detach_errors: list[logging.LogRecord]
    ) -> None:
        """A scope opened inside an async generator and closed by another task: its span
        ends, nothing fails to detach, and the closing task's context is unchanged."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)
        tracer = otel.tracer_provider.get_tracer("test")

        async def stream() -> AsyncGenerator[int, None]:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Dispatcher)
                for i in range(5):
                    yield i

        agen = stream()
        opened = anyio.Event()
        closed = anyio.Event()

        async def consumer() -> None:
            await agen.__anext__()
            await agen.__anext__()
            opened.set()
            await closed.wait()

        async def closer() -> None:
            await opened.wait()
            with tracer.start_as_current_span("closer") as span:
                await agen.aclose()
                assert trace.get_current_span() is span
            closed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            tg.start_soon(closer)
        assert len(otel.spans.named("ambient.scope")) == 1
        assert len(otel.spans.named("ambient.cleanup")) == 1
        assert otel.spans.started == len(otel.spans.spans)
        assert detach_errors == []

    async def test_abandoned_generator_finalised_by_the_loop(
        self, otel: Otel, detach_errors: list[logging.LogRecord], anyio_backend: str
    ) -> None:
        """A generator dropped mid-iteration and finalised by the event loop's hook (a new
        task): the scope span still ends and nothing fails to detach."""
        registry = Registry(telemetry=otel.telemetry(span_threshold=0))
        registry.register(Dispatcher, Dispatcher)

        async def stream() -> AsyncGenerator[int, None]:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Dispatcher)
                for i in range(5):
                    yield i

        async def consume_two() -> None:
            agen = stream()
            await agen.__anext__()
            await agen.__anext__()

        if anyio_backend == "trio":
            # trio warns about an async generator collected unexhausted; that is the point.
            with pytest.warns(ResourceWarning):
                await consume_two()
                gc.collect()
                await _until(lambda: bool(otel.spans.named("ambient.scope")))
        else:
            await consume_two()
            gc.collect()
            await _until(lambda: bool(otel.spans.named("ambient.scope")))
        assert len(otel.spans.named("ambient.cleanup")) == 1
        assert otel.spans.started == len(otel.spans.spans)
        assert detach_errors == []


class FailingInstrument:
    """An instrument of a real SDK meter that raises, instead of counting, on the amounts
    ``fails`` picks."""

    def __init__(self, instrument: Any, fails: Callable[[float], bool]) -> None:
        self.instrument = instrument
        self.fails = fails

    def add(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        if self.fails(amount):
            raise RuntimeError("meter down")
        self.instrument.add(amount, attributes)

    def record(self, amount: float, attributes: Any = None, context: Any = None) -> None:
        if self.fails(amount):
            raise RuntimeError("meter down")
        self.instrument.record(amount, attributes)


class SlottedMeter:
    """A meter no weak reference can refer to (slots, no ``__weakref__``) over a real SDK
    meter; its instrument named ``failing`` raises on the amounts ``fails`` picks."""

    __slots__ = ("_failing", "_fails", "_meter")

    def __init__(self, meter: metrics.Meter, failing: str, fails: Callable[[float], bool]) -> None:
        self._meter = meter
        self._failing = failing
        self._fails = fails

    def _made(self, instrument: Any, name: str) -> Any:
        return FailingInstrument(instrument, self._fails) if name == self._failing else instrument

    def create_up_down_counter(self, name: str, **options: Any) -> Any:
        return self._made(self._meter.create_up_down_counter(name, **options), name)

    def create_counter(self, name: str, **options: Any) -> Any:
        return self._made(self._meter.create_counter(name, **options), name)

    def create_histogram(self, name: str, **options: Any) -> Any:
        return self._made(self._meter.create_histogram(name, **options), name)

    def create_observable_up_down_counter(self, name: str, **options: Any) -> Any:
        raise AssertionError("a meter that cannot be weakly referred to is counted synchronously")


class SlottedMeterProvider(metrics.MeterProvider):
    """Hands out :class:`SlottedMeter` over ``otel``'s real meter provider."""

    def __init__(
        self, otel: Otel, failing: str = "", fails: Callable[[float], bool] = lambda _: True
    ) -> None:
        self.provider = otel.meter_provider
        self.failing = failing
        self.fails = fails

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        meter = self.provider.get_meter(name, *args, **kwargs)
        return SlottedMeter(meter, self.failing, self.fails)


def telemetry_failures(records: list[logging.LogRecord]) -> list[str]:
    """Where the logged telemetry failures happened, one entry per record."""
    return [
        r.getMessage().split(";")[0].removeprefix("ambient telemetry failed in ")
        for r in records
        if r.name == "ambient" and "telemetry failed" in r.getMessage()
    ]


class TestBrokenMetrics:
    async def test_a_meter_no_weak_reference_can_refer_to_counts_scopes_as_they_open(
        self, otel: Otel
    ) -> None:
        """``ambient.scopes.active`` on a meter that cannot be weakly referred to (kept by
        no per-meter table) is an up-down counter counted as scopes open and close, for
        every user at once."""
        telemetry = Telemetry(meter_provider=SlottedMeterProvider(otel))
        registry = Registry(telemetry=telemetry)
        opened = 0
        all_open = anyio.Event()
        close = anyio.Event()

        async def visit(user: str) -> None:
            nonlocal opened
            async with registry.open_scope(ctx(user)):
                opened += 1
                if opened == 3:
                    all_open.set()
                await close.wait()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for user in ("alice", "bob", "carol"):
                    tg.start_soon(visit, user)
                await all_open.wait()
                assert otel.total("ambient.scopes.active") == 3
                close.set()
        assert otel.total("ambient.scopes.active") == 0
        await registry.aclose()

    @pytest.mark.parametrize(
        ("instrument", "fails", "where", "scopes_active"),
        [
            ("ambient.scopes.active", lambda n: n > 0, "scope_opened (metrics)", 0),
            ("ambient.scopes.active", lambda n: n < 0, "scope_closed (metrics)", 3),
            ("ambient.component.create.duration", None, "component_created (metrics)", 0),
            ("ambient.cleanup.duration", None, "component_cleaned (metrics)", 0),
            ("ambient.user_components.live", lambda n: n < 0, "component_cleaned (metrics)", 0),
            ("ambient.global_state.accesses", None, "record_global_access", 0),
        ],
        ids=[
            "scope opened",
            "scope closed",
            "component created",
            "component cleaned",
            "user component without cleanup gone",
            "global access",
        ],
    )
    async def test_a_raising_instrument_is_logged_once_and_every_request_is_answered(
        self,
        otel: Otel,
        caplog: pytest.LogCaptureFixture,
        instrument: str,
        fails: Callable[[float], bool] | None,
        where: str,
        scopes_active: int,
    ) -> None:
        """An instrument of the application's meter that raises: three users' requests each
        get their answer, with their spans; every cleanup runs once; the failure is logged
        once, naming where; and a scope whose count up failed is not counted down."""
        from ambient.migration import guard_global

        provider = SlottedMeterProvider(otel, instrument, fails or (lambda _: True))
        registry = Registry(
            telemetry=Telemetry(tracer_provider=otel.tracer_provider, meter_provider=provider)
        )
        closes: list[str] = []

        class Connection:
            def __init__(self) -> None:
                self.user = ambient.get_current_context().user_id

            def close(self) -> None:
                closes.append(self.user)

        registry.register(Connection, Connection)
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        catalog = guard_global({"triage": "queue-7"}, name="catalog", mode="off")
        users = ["alice", "bob", "carol"]
        answers: dict[str, tuple[str, str, str]] = {}
        with caplog.at_level(logging.ERROR, logger="ambient"):
            for user in users:
                async with registry.open_scope(ctx(user)):
                    connection = await ambient.resolve(Connection)
                    memory = await ambient.resolve(Memory)
                    answers[user] = (connection.user, memory.user.user_id, catalog["triage"])
            await registry.aclose()
        assert answers == {u: (u, u, "queue-7") for u in users}
        assert closes == users
        assert telemetry_failures(caplog.records) == [where]
        assert len(otel.spans.named("ambient.scope")) == 3
        assert otel.total("ambient.scopes.active") == scopes_active

    async def test_a_span_refusing_its_events_still_ends_and_the_request_goes_on(
        self, otel: Otel, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The fast components' events handed to the scope span in one go at its close are
        refused: the span still ends, with its attributes; each request gets its answer and
        its cleanups run once; the failure is logged once."""

        class Refusing(list[object]):
            def extend(self, events: Iterable[object]) -> None:
                raise RuntimeError("events refused")

        class RefuseEvents(SpanProcessor):
            def on_start(
                self, span: Span, parent_context: otel_context.Context | None = None
            ) -> None:
                span._events = Refusing()  # type: ignore[assignment]

        otel.tracer_provider.add_span_processor(RefuseEvents())
        registry = Registry(telemetry=otel.telemetry(span_threshold=60))
        registry.register(Dispatcher, Dispatcher)
        dispatchers: list[Dispatcher] = []
        with caplog.at_level(logging.ERROR, logger="ambient"):
            for user in ("alice", "bob", "carol"):
                async with registry.open_scope(ctx(user)):
                    dispatchers.append(await ambient.resolve(Dispatcher))
        assert [d.closed for d in dispatchers] == [True] * 3
        assert telemetry_failures(caplog.records) == ["scope_closed (events)"]
        spans = otel.spans.named("ambient.scope")
        assert len(spans) == 3
        for span in spans:
            assert (span.attributes or {})["ambient.components.created"] == 1
        assert otel.spans.started == len(otel.spans.spans)


class TestDisconnect:
    async def test_client_disconnect_mid_stream(
        self, otel: Otel, detach_errors: list[logging.LogRecord]
    ) -> None:
        """The client goes away after two chunks of a stream on uvicorn: the scope still
        cleans up inside its span, every span ends, nothing fails to detach."""
        telemetry = otel.telemetry(span_threshold=0)
        finished = threading.Event()
        dispatchers: list[Dispatcher] = []
        seen: list[str] = []

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            dispatchers.append(await ambient.resolve(Dispatcher))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(2):
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            while (message := await receive())["type"] != "http.disconnect":
                pass
            seen.append(message["type"])

        inner = make_app(server_registry(), telemetry, handler)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                finished.set()

        wrapped = OpenTelemetryMiddleware(app, tracer_provider=otel.tracer_provider)
        with serve("uvicorn", wrapped, lifespan="off") as url:
            port = int(url.rsplit(":", 1)[1])
            # A raw socket: the client reads two chunks and hangs up, nothing in between.
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(
                    b"GET /stream HTTP/1.1\r\nHost: x\r\n"
                    b"x-user-id: alice\r\nx-request-id: req-1\r\n\r\n"
                )
                received = b""
                while received.count(b"x") < 2048:
                    received += await stream.receive()
            assert await anyio.to_thread.run_sync(finished.wait, 10)
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(
                    lambda spans: any(s.kind is SpanKind.SERVER for s in spans)
                )
            )
        assert seen == ["http.disconnect"]
        assert len(dispatchers) == 1
        assert dispatchers[0].closed
        scope_span = one(otel.spans.named("ambient.scope"))
        cleanup = one(otel.spans.named("ambient.cleanup"))
        assert parent_id(cleanup) == scope_span.context.span_id
        assert otel.spans.started == len(otel.spans.spans)
        assert detach_errors == []


async def _until(condition: Callable[[], bool], rounds: int = 1000) -> None:
    """Let other tasks (the loop's generator finaliser) run until ``condition`` holds."""
    for _ in range(rounds):
        if condition():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition never became true")


# -- behind opentelemetry-instrumentation-asgi on a real server -----------------------------


def make_app(registry: Registry, telemetry: Telemetry | None, handler: ASGIApp) -> ASGIApp:
    """``handler`` behind AmbientMiddleware; identity from `x-user-id` (trusted loopback)."""
    return AmbientMiddleware(  # type: ignore[return-value]
        handler, registry=registry, identity=trusted_header(), telemetry=telemetry
    )


class Background:
    """A component first resolved after the response was sent (background work)."""

    def close(self) -> None:
        """A real cleanup, so that it is traced."""


class FailingCleanup:
    """A REQUEST component whose cleanup fails (after the response was sent)."""

    def close(self) -> None:
        raise RuntimeError("cleanup failed")


async def streaming_handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Resolves components, streams its ids in three chunks, then does background work."""
    context = ambient.get_current_context()
    await ambient.resolve(Dispatcher)
    await ambient.resolve(Memory)
    span = trace.get_current_span().get_span_context()
    body = json.dumps(
        {
            "user_id": context.user_id,
            "request_id": context.request_id,
            "trace_id": f"{span.trace_id:032x}",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    third = len(body) // 3 + 1
    for start in range(0, len(body), third):
        await send(
            {"type": "http.response.body", "body": body[start : start + third], "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    await ambient.resolve(Background)


def server_registry(telemetry: Telemetry | None = None) -> Registry:
    registry = Registry(telemetry=telemetry)
    registry.register(Dispatcher, Dispatcher)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register(Background, Background)
    return registry


class TestBehindServerSpan:
    async def test_server_span_scope_span_component_spans(self, otel: Otel) -> None:
        """server span -> ambient.scope -> ambient.resolve/cleanup; the scope span ends after
        the last body chunk and covers the background work and the cleanup."""
        telemetry = otel.telemetry(span_threshold=0)
        app = OpenTelemetryMiddleware(
            make_app(server_registry(), telemetry, streaming_handler),
            tracer_provider=otel.tracer_provider,
        )
        with serve("uvicorn", app, lifespan="off") as url:
            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.get(
                    "/stream", headers={"x-user-id": "alice", "x-request-id": "req-1"}
                )
            assert response.status_code == 200
            assert response.json()["user_id"] == "alice"
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(
                    lambda spans: any(s.kind is SpanKind.SERVER for s in spans)
                )
            )
        server = one([s for s in otel.spans.spans if s.kind is SpanKind.SERVER])
        scope_span = one(otel.spans.named("ambient.scope"))
        assert parent_id(scope_span) == server.context.span_id
        assert scope_span.context.trace_id == server.context.trace_id
        assert response.json()["trace_id"] == f"{server.context.trace_id:032x}"
        resolves = otel.spans.named("ambient.resolve")
        cleanups = otel.spans.named("ambient.cleanup")
        assert len(resolves) == 3
        assert len(cleanups) == 2  # Dispatcher and Background; Memory lives on (USER)
        for span in [*resolves, *cleanups]:
            assert parent_id(span) == scope_span.context.span_id
        sends = [s for s in otel.spans.spans if s.name.endswith("http send")]
        assert len(sends) >= 4
        last_chunk = max(s.end_time or 0 for s in sends)
        background = one(
            [s for s in resolves if (s.attributes or {})["ambient.component"] == "Background"]
        )
        assert background.start_time is not None
        assert scope_span.end_time is not None
        assert background.start_time >= last_chunk
        assert scope_span.end_time >= max(s.end_time or 0 for s in cleanups)
        assert scope_span.end_time > last_chunk
        # The server span ends at the last chunk; the scope span covers what comes after.
        assert server.end_time is not None
        assert server.end_time <= background.start_time

    async def test_100_concurrent_users_each_in_their_own_trace(self, otel: Otel) -> None:
        """100 concurrent users on uvicorn, each with its own traceparent: every scope span
        carries its own request's ids and sits under its own request's server span."""
        telemetry = otel.telemetry(span_threshold=0, user_id="raw")
        app = OpenTelemetryMiddleware(
            # The registry's telemetry this time (the middleware's telemetry=None).
            make_app(server_registry(telemetry), None, streaming_handler),
            tracer_provider=otel.tracer_provider,
            exclude_spans=["receive", "send"],
        )
        rng = random.Random(4)
        requests = {
            f"req-{n}": (f"user-{n}", rng.getrandbits(128), rng.getrandbits(64) or 1)
            for n in range(100)
        }
        answers: dict[str, dict[str, str]] = {}
        with serve("uvicorn", app, lifespan="off") as url:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

                async def call(request_id: str) -> None:
                    user, trace_id, span_id = requests[request_id]
                    response = await client.get(
                        f"/u/{user}",
                        headers={
                            "x-user-id": user,
                            "x-request-id": request_id,
                            "traceparent": f"00-{trace_id:032x}-{span_id:016x}-01",
                        },
                    )
                    assert response.status_code == 200
                    answers[request_id] = response.json()

                async with anyio.create_task_group() as tg:
                    for request_id in requests:
                        tg.start_soon(call, request_id)
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(
                    lambda spans: sum(s.kind is SpanKind.SERVER for s in spans) == 100
                )
            )
        servers = {s.context.span_id: s for s in otel.spans.spans if s.kind is SpanKind.SERVER}
        scopes = otel.spans.named("ambient.scope")
        assert len(scopes) == 100
        children: dict[int, list[ReadableSpan]] = {}
        for span in otel.spans.named("ambient.resolve") + otel.spans.named("ambient.cleanup"):
            children.setdefault(parent_id(span) or 0, []).append(span)
        for scope_span in scopes:
            attributes = scope_span.attributes or {}
            request_id = str(attributes["ambient.request_id"])
            user, trace_id, span_id = requests[request_id]
            assert answers[request_id] == {
                "user_id": user,
                "request_id": request_id,
                "trace_id": f"{trace_id:032x}",
            }
            assert attributes["ambient.user_id"] == user
            assert scope_span.context.trace_id == trace_id
            server = servers[parent_id(scope_span) or 0]
            assert server.context.trace_id == trace_id
            assert parent_id(server) == span_id
            mine = children[scope_span.context.span_id]
            assert len(mine) == 5  # 3 creations, 2 request cleanups
            assert {s.context.trace_id for s in mine} == {trace_id}

    async def test_incoming_baggage_is_never_identity(self, otel: Otel) -> None:
        """`baggage: ambient.user_id=admin` from a client: without an identity header 401;
        with one, the bound user is the header's, and the ambient.* entry is gone."""
        telemetry = otel.telemetry()

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            body = json.dumps(
                {
                    "user_id": ambient.get_current_context().user_id,
                    "ambient.user_id": baggage.get_baggage("ambient.user_id"),
                    "enduser.id": baggage.get_baggage("enduser.id"),
                }
            ).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        app = OpenTelemetryMiddleware(
            make_app(server_registry(), telemetry, handler), tracer_provider=otel.tracer_provider
        )
        forged = {"baggage": "ambient.user_id=admin,enduser.id=admin"}
        with serve("uvicorn", app, lifespan="off") as url:
            async with httpx.AsyncClient(base_url=url) as client:
                refused = await client.get("/", headers=forged)
                served = await client.get("/", headers={**forged, "x-user-id": "bob"})
        assert refused.status_code == 401
        assert served.status_code == 200
        assert served.json() == {"user_id": "bob", "ambient.user_id": None, "enduser.id": "admin"}
        await anyio.to_thread.run_sync(
            lambda: otel.spans.wait_for(lambda spans: bool(otel.spans.named("ambient.scope")))
        )
        scope_span = one(otel.spans.named("ambient.scope"))
        assert (scope_span.attributes or {})["ambient.user_id"] == hash_id("bob")


async def test_a_websocket_messages_scopes_are_traced_by_the_middlewares_telemetry(
    otel: Otel,
) -> None:
    """AmbientMiddleware(telemetry=...) traces a websocket's message scopes as it traces the
    connection's: each is a child span of the connection's scope span, its components are
    traced and counted. They used to be seen only by the registry's telemetry (none here)."""
    telemetry = otel.telemetry(span_threshold=0)
    registry = Registry()
    registry.register(Dispatcher, Dispatcher)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        for _ in range(2):
            await receive()
            async with message_scope():
                await ambient.resolve(Dispatcher)
        await send({"type": "websocket.close", "code": 1000})

    middleware = AmbientMiddleware(
        app, registry=registry, identity=trusted_header(), telemetry=telemetry
    )
    incoming = [{"type": "websocket.connect"}] + [{"type": "websocket.receive", "text": "x"}] * 2
    await drive(middleware, ws_scope([(b"x-user-id", b"ann")]), incoming)
    connection, *messages = sorted(
        otel.spans.named("ambient.scope"), key=lambda s: s.start_time or 0
    )
    assert len(messages) == 2
    for message in messages:
        assert parent_id(message) == connection.context.span_id
        assert (message.attributes or {})["ambient.user_id"] == hash_id("ann")
    resolves = otel.spans.named("ambient.resolve")
    assert sorted(parent_id(s) for s in resolves) == sorted(m.context.span_id for m in messages)
    assert otel.count("ambient.component.create.duration") == 2
    assert otel.total("ambient.scopes.active") == 0


def pipelined(
    url: str, users: list[str], first_body: int = 0, first_header: str = ""
) -> list[bytes]:
    """Send one request per user on one socket in a single write, the first with a body of
    ``first_body`` bytes (a POST) and the header line ``first_header``; read every answer."""
    host, port = url.removeprefix("http://").split(":")
    payload = b"".join(
        f"GET / HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n\r\n".encode() for user in users
    )
    if first_header:
        payload = payload.replace(b"\r\n\r\n", f"\r\n{first_header}\r\n\r\n".encode(), 1)
    if first_body:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nx-user-id: {users[0]}\r\n"
        first = f"{head}content-length: {first_body}\r\n\r\n".encode() + b"a" * first_body
        payload = first + payload.partition(b"\r\n\r\n")[2]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(b"HTTP/1.1 200") < len(users) or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection early"
            data += chunk
    return [part.partition(b"\r\n\r\n")[2] for part in data.split(b"HTTP/1.1 200")[1:]]


async def who(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the request's body, answer its user and the baggage it sees."""
    while (await receive()).get("more_body", False):
        pass
    seen = dict(baggage.get_all())
    body = json.dumps({"user": ambient.get_current_context().user_id, "baggage": seen}).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TestPipelining:
    async def test_pipelined_requests_get_a_trace_each(self, otel: Otel) -> None:
        """Three requests pipelined on one connection (uvicorn on asyncio starts each inside
        the previous one's context): every scope span is the root of its own trace."""
        app = make_app(server_registry(), otel.telemetry(user_id="raw"), who)
        with serve("uvicorn", app, lifespan="off") as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"])
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1", "u2"]
        scopes = otel.spans.named("ambient.scope")
        assert sorted((s.attributes or {})["ambient.user_id"] for s in scopes) == ["u0", "u1", "u2"]
        assert [s.parent for s in scopes] == [None, None, None]
        assert len({s.context.trace_id for s in scopes}) == 3

    @pytest.mark.parametrize("nested", [False, True], ids=["request", "nested-binding"])
    async def test_the_next_requests_identity_is_resolved_outside_the_previous_trace(
        self, otel: Otel, nested: bool
    ) -> None:
        """uvicorn starts the next pipelined request inside the previous one's context, here
        while that request's scope (its span, its baggage) is still current: each request
        waits in its handler, its answer sent, until the next one's identity resolver has
        run; ``nested``: inside a scope the handler opened inside the request's. The
        resolver (which may call an identity provider, or log) runs in no trace and sees
        no baggage; it ran in the previous user's trace, with that user's ids as its
        baggage."""
        seen: dict[str, tuple[bool, dict[str, object]]] = {}
        waiting: list[anyio.Event] = []
        users = ["u0", "u1", "u2"]
        by_header = trusted_header()
        registry = server_registry()

        def identity(scope: Any) -> Identity | None:
            user = dict(scope["headers"])[b"x-user-id"].decode()
            current = trace.get_current_span().get_span_context().is_valid
            seen[user] = (current, dict(baggage.get_all()))
            if waiting:
                waiting.pop().set()
            return by_header(scope)

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            last = ambient.get_current_context().user_id == users[-1]
            if not last:
                waiting.append(anyio.Event())  # on the server's event loop
                next_resolved = waiting[-1]
            own = registry.open_scope(ambient.get_current_context()) if nested else nullcontext()
            async with own:
                await who(scope, receive, send)
                if not last:
                    with anyio.fail_after(10):  # uvicorn started the next one as it ended
                        await next_resolved.wait()

        telemetry = otel.telemetry(user_id="raw", baggage=("user_id", "thread_id"))
        app = AmbientMiddleware(handler, registry=registry, identity=identity, telemetry=telemetry)
        with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, users)
        assert [json.loads(b)["user"] for b in bodies] == users
        # Each handler saw its own user's baggage: the scope did put it there.
        assert [json.loads(b)["baggage"].get("ambient.user_id") for b in bodies] == users
        assert seen == {user: (False, {}) for user in users}

    async def test_requests_behind_an_instrumentation_inside_after_a_sampled_out_one(
        self, otel_first_dropped: Otel
    ) -> None:
        """The first of three pipelined requests is sampled out, so the spans that the
        instrumentation inside wraps its ``send`` in are sampled out too (not recording,
        never seen to end): the next requests still start traces of their own, sampled
        afresh, rather than joining the first one's, sampled out with it."""
        otel = otel_first_dropped
        inner = OpenTelemetryMiddleware(who, tracer_provider=otel.tracer_provider)
        app = make_app(server_registry(), otel.telemetry(user_id="raw"), inner)
        with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"])
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1", "u2"]
        scopes = otel.spans.named("ambient.scope")
        assert sorted((s.attributes or {})["ambient.user_id"] for s in scopes) == ["u1", "u2"]
        assert [s.parent for s in scopes] == [None, None]
        assert len({s.context.trace_id for s in scopes}) == 2

    @pytest.mark.parametrize("first_body", [0, 2_000_000], ids=["pipelined", "large-body"])
    @pytest.mark.parametrize(
        "options",
        [{"http": "h11", "loop": "asyncio"}, {"http": "httptools", "loop": "uvloop"}],
        ids=["h11", "httptools"],
    )
    async def test_requests_behind_an_instrumentation_inside_get_a_trace_each(
        self, otel: Otel, options: dict[str, str], first_body: int
    ) -> None:
        """opentelemetry-instrumentation-asgi inside the middleware wraps each ``send`` and
        ``receive`` in a span of its own: uvicorn (without reset_contextvars) starts the
        next request on the connection (pipelined, or after a large body) inside one of
        those spans' context. Every scope span is still the root of its own trace. The next
        user's scope span was a child of the previous user's "http send" or "http receive"
        span: three users in one trace."""
        if options["http"] == "httptools":  # uvicorn's extra, not the core's test set
            pytest.importorskip("httptools")
            pytest.importorskip("uvloop")
        inner = OpenTelemetryMiddleware(who, tracer_provider=otel.tracer_provider)
        app = make_app(server_registry(), otel.telemetry(user_id="raw"), inner)
        with serve("uvicorn", app, lifespan="off", **options) as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"], first_body)
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1", "u2"]
        scopes = otel.spans.named("ambient.scope")
        assert sorted((s.attributes or {})["ambient.user_id"] for s in scopes) == ["u0", "u1", "u2"]
        assert [s.parent for s in scopes] == [None, None, None]
        assert len({s.context.trace_id for s in scopes}) == 3
        # The instrumentation's own request spans (internal ones, a span being current),
        # one under each scope span.
        requests = otel.spans.named("GET /") + otel.spans.named("POST /")
        assert sorted(parent_id(s) or 0 for s in requests) == sorted(
            s.context.span_id for s in scopes
        )

    async def test_a_request_started_inside_a_span_still_going_on_gets_a_trace_of_its_own(
        self, otel: Otel
    ) -> None:
        """The app wraps each request in a span of its own (a handler span, an instrumentation
        inside the middleware) that is still going on after the response was sent when
        uvicorn starts the next pipelined request inside its context (here the first
        request waits for the next one's scope to open; a streaming response's task group
        does the same). That span is the previous request's work, not the next one's: the
        next user's scope span still starts a trace of its own. It used to be a child of
        the previous user's span, every user on the connection in one trace."""
        tracer = otel.tracer_provider.get_tracer("app")
        opened: list[anyio.Event] = []

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if not opened:
                opened.append(anyio.Event())  # on the server's event loop
            first = ambient.get_current_context().user_id == "u0"
            with tracer.start_as_current_span("handler"):
                await who(scope, receive, send)
                if first:
                    with anyio.fail_after(10):  # the next request is already started
                        await opened[0].wait()
                else:
                    opened[0].set()

        app = make_app(server_registry(), otel.telemetry(user_id="raw"), handler)
        with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1"])
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1"]
        scopes = otel.spans.named("ambient.scope")
        assert sorted((s.attributes or {})["ambient.user_id"] for s in scopes) == ["u0", "u1"]
        assert [s.parent for s in scopes] == [None, None]
        assert len({s.context.trace_id for s in scopes}) == 2

    async def test_pipelined_requests_under_baggage_alone_carry_nothing_of_the_previous_one(
        self,
    ) -> None:
        """A telemetry that puts baggage and records no spans (no SDK) makes the scope's
        baggage current too: uvicorn starts the next pipelined request inside the previous
        one's context, here while that request still has a trace parent and baggage of its
        own current for its calls. The next user's outgoing calls carry only their own
        thread id: they carried the previous user's trace parent and baggage as well."""
        telemetry = Telemetry(tracer_provider=trace.NoOpTracerProvider(), baggage=("thread_id",))
        assert telemetry.active
        parent = trace.NonRecordingSpan(
            trace.SpanContext(0xA11CE, 0xA11CE, is_remote=True, trace_flags=trace.TraceFlags(1))
        )

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            own = None
            if ctx.user_id == "u0":
                mine = trace.set_span_in_context(parent, baggage.set_baggage("order", "u0-order"))
                own = otel_context.attach(mine)
            try:
                outgoing: dict[str, str] = {}
                propagate.inject(outgoing)
                body = json.dumps(
                    {"user": ctx.user_id, "thread": ctx.thread_id, "outgoing": outgoing}
                ).encode()
                headers = [(b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            finally:
                if own is not None:
                    otel_context.detach(own)

        app = make_app(server_registry(), telemetry, handler)
        with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"])
        answers = [json.loads(body) for body in bodies]
        assert [answer["user"] for answer in answers] == ["u0", "u1", "u2"]
        assert answers[0]["outgoing"]["baggage"] == (
            f"ambient.thread_id={answers[0]['thread']},order=u0-order"
        )
        for answer in answers[1:]:
            assert answer["outgoing"] == {"baggage": f"ambient.thread_id={answer['thread']}"}

    async def test_a_pipelined_requests_identity_is_resolved_outside_the_previous_ones_trace(
        self, otel: Otel
    ) -> None:
        """uvicorn starts the next pipelined request inside the previous one's context, the
        previous scope's trace and baggage current in it. The next request's identity
        resolver (here one that calls another service, as a token introspection does, and
        logs) runs before that request's scope opens: its call carries no trace or baggage
        of the previous user's, its log line no trace id of theirs. Its call carried the
        previous user's trace parent and baggage (their user id among it)."""
        telemetry = otel.telemetry(user_id="raw", baggage=("user_id", "thread_id"))
        header = trusted_header()
        resolved: dict[str, dict[str, str]] = {}
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        async def introspecting(scope: Any) -> Identity | None:
            identity = header(scope)
            assert isinstance(identity, Identity)
            outgoing: dict[str, str] = {}
            propagate.inject(outgoing)
            resolved[identity.user_id] = outgoing
            log.info("resolved %s", identity.user_id)
            return identity

        keep = Keep()
        keep.addFilter(ContextFilter(user_id="raw"))
        log = logging.getLogger("tests.introspection")
        log.addHandler(keep)
        log.setLevel(logging.INFO)
        app = AmbientMiddleware(
            who, registry=server_registry(), identity=introspecting, telemetry=telemetry
        )
        try:
            with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
                bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"])
        finally:
            log.removeHandler(keep)
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1", "u2"]
        assert resolved == {"u0": {}, "u1": {}, "u2": {}}
        assert [(r.getMessage(), r.trace_id) for r in records] == [  # type: ignore[attr-defined]
            (f"resolved u{n}", "") for n in range(3)
        ]

    async def test_a_log_line_after_the_scope_is_not_in_the_previous_users_trace(
        self, otel: Otel
    ) -> None:
        """uvicorn starts the next pipelined request inside the previous one's context, here
        inside a span of the instrumentation within the middleware. The next user's scope
        span starts a trace of its own; once its scope closes, what runs on in that request
        (the middleware's log of its failed cleanup) must not carry the previous user's
        trace either. Closing the scope put the previous user's context back: the log line
        about u1's cleanup carried u0's trace id."""
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        keep = Keep()
        keep.addFilter(ContextFilter(user_id="raw"))
        log = logging.getLogger("ambient.middleware")
        log.addHandler(keep)
        registry = server_registry()
        registry.register(FailingCleanup, FailingCleanup)

        async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if ambient.get_current_context().user_id == "u1":
                await ambient.resolve(FailingCleanup)
            await who(scope, receive, send)

        inner = OpenTelemetryMiddleware(handler, tracer_provider=otel.tracer_provider)
        app = make_app(registry, otel.telemetry(user_id="raw"), inner)
        try:
            with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
                bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1"])
        finally:
            log.removeHandler(keep)
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1"]
        traces = {
            (s.attributes or {})["ambient.user_id"]: f"{s.context.trace_id:032x}"
            for s in otel.spans.named("ambient.scope")
        }
        failed = one_record(records, "a cleanup failed after the response was sent")
        assert failed.trace_id != traces["u0"]  # type: ignore[attr-defined]
        assert failed.trace_id in ("", traces["u1"])  # type: ignore[attr-defined]

    async def test_behind_otel_asgi_with_reset_contextvars(self, otel: Otel) -> None:
        """Behind opentelemetry-instrumentation-asgi, with uvicorn's reset_contextvars (the
        server span itself would otherwise inherit the previous request's context): each
        scope span sits under its own server span in its own trace."""
        app = OpenTelemetryMiddleware(
            make_app(server_registry(), otel.telemetry(user_id="raw"), who),
            tracer_provider=otel.tracer_provider,
            exclude_spans=["receive", "send"],
        )
        with serve("uvicorn", app, lifespan="off", reset_contextvars=True) as url:
            bodies = await anyio.to_thread.run_sync(pipelined, url, ["u0", "u1", "u2"])
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(
                    lambda spans: sum(s.kind is SpanKind.SERVER for s in spans) == 3
                )
            )
        assert [json.loads(b)["user"] for b in bodies] == ["u0", "u1", "u2"]
        servers = {s.context.span_id: s for s in otel.spans.spans if s.kind is SpanKind.SERVER}
        assert [s.parent for s in servers.values()] == [None, None, None]
        scopes = otel.spans.named("ambient.scope")
        assert len(scopes) == 3
        for scope_span in scopes:
            server = servers[parent_id(scope_span) or 0]
            assert server.context.trace_id == scope_span.context.trace_id
        assert len({s.context.trace_id for s in scopes}) == 3

    async def test_behind_otel_asgi_without_reset_contextvars(self, otel: Otel) -> None:
        """Behind opentelemetry-instrumentation-asgi, without reset_contextvars: uvicorn
        starts the next pipelined request inside the previous one's context, so the
        instrumentation's span of that request joins the previous user's trace. The next
        user's scope span (with its user id, its components and the app's spans under it)
        still starts a trace of its own, and none of the previous request's baggage is in
        its context. It used to start from what was current before the previous user's
        scope: that user's server span (three users in one trace) and client's baggage."""
        app = OpenTelemetryMiddleware(
            make_app(server_registry(), otel.telemetry(user_id="raw"), who),
            tracer_provider=otel.tracer_provider,
            exclude_spans=["receive", "send"],
        )
        with serve("uvicorn", app, lifespan="off", http="h11", loop="asyncio") as url:
            bodies = await anyio.to_thread.run_sync(
                pipelined, url, ["u0", "u1", "u2"], 0, "baggage: email=u0%40example.com"
            )
            await anyio.to_thread.run_sync(
                lambda: otel.spans.wait_for(
                    lambda spans: sum(s.name == "GET /" for s in spans) == 3
                )
            )
        answers = [json.loads(b) for b in bodies]
        assert [a["user"] for a in answers] == ["u0", "u1", "u2"]
        # The first client's baggage is the first request's only.
        assert [a["baggage"] for a in answers] == [{"email": "u0@example.com"}, {}, {}]
        scopes = otel.spans.named("ambient.scope")
        users = {s.context.trace_id: (s.attributes or {})["ambient.user_id"] for s in scopes}
        assert sorted(users.values()) == ["u0", "u1", "u2"]  # one user per trace
        first = next(s for s in scopes if (s.attributes or {})["ambient.user_id"] == "u0")
        server = next(s for s in otel.spans.named("GET /") if s.kind is SpanKind.SERVER)
        assert parent_id(first) == server.context.span_id  # the first is under its server span


# -- a BaseHTTPMiddleware, worker threads, cancellations and failures: 50 users at once ------

USERS_AT_ONCE = 50
# By request number modulo 5: "cancel" is cancelled from inside its worker thread, which the
# request waits for; "abandon" is cancelled the same way but leaves the thread running past
# the end of the request (abandon_on_cancel), its span ending after the scope span's.
MODES = ("ok", "raise", "cancel", "abandon", "ok")


class OpenSpans(SpanProcessor):
    """Span ids started and not yet ended (as tests/test_fault_injection.py keeps them), with
    a lock and a wait: spans here end in worker threads and on the server's thread."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}
        self.started = 0
        self._cond = threading.Condition()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        with self._cond:
            self.started += 1
            self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        with self._cond:
            self.open.pop(span.context.span_id, None)
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20) -> dict[int, str]:
        """Wait (bounded) until nothing is open and ``predicate`` holds; what is still open."""
        with self._cond:
            self._cond.wait_for(lambda: not self.open and predicate(), timeout)
            return dict(self.open)


class RequestFailedError(Exception):
    """A request that fails after its thread work; carries what the request saw."""

    def __init__(self, answer: dict[str, str]) -> None:
        super().__init__("boom")
        self.answer = answer


class Worker(Dispatcher):
    """A REQUEST component resolved in the worker thread, with a cleanup."""


class Hop:
    """One request's test state, put in its ASGI scope (under "d02") by :class:`Harness`: its
    id and mode from the path (the truth, whatever ambient binds), its cancel scope, what its
    thread saw, and the release of a thread that outlives the request."""

    def __init__(self, request_id: str, mode: str) -> None:
        self.request_id = request_id
        self.mode = mode
        self.cancel_scope = anyio.CancelScope()
        self.seen: dict[str, str] = {}
        self.released = threading.Event()


class Harness:
    """The outermost app: each request runs in a cancel scope that its worker thread cancels
    (through ``anyio.from_thread``) in the cancel modes; a cancelled request is answered 499
    with what its thread saw; a ``RequestFailedError``, already answered 500 by Starlette, is
    not re-raised to the server; a thread left running is released once its request is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.unexpected: list[BaseException] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        _, mode, n = scope["path"].split("/")
        hop = scope["d02"] = Hop(f"req-{n}", mode)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            with hop.cancel_scope:
                await self.app(scope, receive, tracked)
        except RequestFailedError:
            pass
        except Exception as exc:
            self.unexpected.append(exc)
            raise
        finally:
            hop.released.set()
        if hop.cancel_scope.cancelled_caught:
            if started:
                self.unexpected.append(AssertionError(f"{hop.request_id} cancelled mid-response"))
                return
            body = json.dumps({"cancelled": True, **hop.seen}).encode()
            await send({"type": "http.response.start", "status": 499, "headers": []})
            await send({"type": "http.response.body", "body": body})


class Gate:
    """Holds every request inside its scope until all of them are (a bounded wait)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self._all_in: anyio.Event | None = None

    async def arrive(self) -> None:
        if self._all_in is None:  # made on the server's event loop, on first use
            self._all_in = anyio.Event()
        self.arrived += 1
        if self.arrived == self.expected:
            self._all_in.set()
        with anyio.fail_after(30):
            await self._all_in.wait()


class TracedDispatch(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware that makes its own span current around ``call_next`` (the app
    then runs in a task of the middleware's task group), as tracing middleware often do."""

    def __init__(self, app: StarletteApp, tracer: trace.Tracer) -> None:
        super().__init__(app)
        self.tracer = tracer

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        hop: Hop = request.scope["d02"]
        bound = ambient.current_context_or_none()
        attributes = {
            "d02.request": hop.request_id,
            "d02.saw": "nobody" if bound is None else bound.user_id,
        }
        with self.tracer.start_as_current_span("d02.dispatch", attributes=attributes):
            return await call_next(request)


def thread_work(hop: Hop, tracer: trace.Tracer) -> dict[str, str]:
    """In a worker thread: a span of its own, a component, and in the cancel modes the
    cancellation of its own request (while the span is current)."""
    context = ambient.get_current_context()
    attributes = {"d02.request": hop.request_id, "d02.seen_user": context.user_id}
    with tracer.start_as_current_span("d02.thread", attributes=attributes):
        ambient.resolve_sync(Worker)
        seen = {"thread_user": context.user_id, "thread_request_id": context.request_id}
        hop.seen.update(seen)
        if hop.mode in ("cancel", "abandon"):
            anyio.from_thread.run_sync(hop.cancel_scope.cancel)
        if hop.mode == "abandon":
            assert hop.released.wait(30), "the abandoned thread was never released"
    return seen


def d02_app(otel: Otel, base_outside: bool) -> tuple[Harness, list[Dispatcher], list[Worker]]:
    """Harness -> OpenTelemetryMiddleware -> Starlette with TracedDispatch outside or inside
    AmbientMiddleware -> an endpoint that resolves a component, waits for all 50 requests,
    hops to a worker thread through ``ambient.wrap`` and ``anyio.to_thread``, then answers,
    raises or (already) is cancelled."""
    tracer = otel.tracer_provider.get_tracer("d02")
    dispatchers: list[Dispatcher] = []
    workers: list[Worker] = []
    registry = Registry()

    def dispatcher() -> Dispatcher:
        dispatchers.append(Dispatcher())
        return dispatchers[-1]

    def worker() -> Worker:
        workers.append(Worker())
        return workers[-1]

    registry.register(Dispatcher, dispatcher)
    registry.register(Worker, worker)
    gate = Gate(USERS_AT_ONCE)

    async def endpoint(request: Request) -> Response:
        hop: Hop = request.scope["d02"]
        await ambient.resolve(Dispatcher)
        await gate.arrive()
        seen = await anyio.to_thread.run_sync(
            ambient.wrap(thread_work), hop, tracer, abandon_on_cancel=hop.mode == "abandon"
        )
        if hop.mode in ("cancel", "abandon"):
            await anyio.lowlevel.checkpoint()
            raise AssertionError(f"{hop.request_id} was not cancelled")
        answer = {"user": ambient.get_current_context().user_id, **seen}
        if hop.mode == "raise":
            raise RequestFailedError(answer)
        return JSONResponse(answer)

    async def on_error(request: Request, exc: Exception) -> Response:
        answer = exc.answer if isinstance(exc, RequestFailedError) else {"error": repr(exc)}
        return JSONResponse(answer, status_code=500)

    ambient_layer = Middleware(
        AmbientMiddleware,
        registry=registry,
        identity=trusted_header(),
        telemetry=otel.telemetry(span_threshold=0, user_id="raw"),
    )
    dispatch_layer = Middleware(TracedDispatch, tracer=tracer)
    stack = [dispatch_layer, ambient_layer] if base_outside else [ambient_layer, dispatch_layer]
    app = Starlette(
        routes=[Route("/{mode}/{n}", endpoint)],
        middleware=stack,
        exception_handlers={Exception: on_error},
    )

    def label_server_span(span: Any, scope: dict[str, Any]) -> None:
        span.set_attribute("d02.request", scope["d02"].request_id)

    traced = OpenTelemetryMiddleware(
        app,
        tracer_provider=otel.tracer_provider,
        exclude_spans=["receive", "send"],
        server_request_hook=label_server_span,
    )
    return Harness(traced), dispatchers, workers


def request_of(span: ReadableSpan) -> str | None:
    """The request a span was started for, by the truth it carries, not by its parent."""
    attributes = span.attributes or {}
    found = attributes.get("ambient.request_id" if span.name == "ambient.scope" else "d02.request")
    return None if found is None else str(found)


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    parent = by_id.get(parent_id(span) or 0)
    while parent is not None:
        chain.append(parent)
        parent = by_id.get(parent_id(parent) or 0)
    return chain


async def fifty_users_through_base_http_middleware(
    otel: Otel,
    detach_errors: list[logging.LogRecord],
    anyio_backend: str,
    *,
    base_outside: bool,
) -> None:
    """The D02 scenario, on uvicorn (asyncio) or hypercorn's trio worker (trio)."""
    opens = OpenSpans()
    otel.tracer_provider.add_span_processor(opens)
    harness, dispatchers, workers = d02_app(otel, base_outside)
    server = "uvicorn" if anyio_backend == "asyncio" else "hypercorn-trio"
    options: dict[str, Any] = {"lifespan": "off"} if server == "uvicorn" else {}
    answers: dict[int, tuple[int, dict[str, Any]]] = {}

    def servers_ended() -> bool:
        return sum(s.kind is SpanKind.SERVER for s in otel.spans.spans) == USERS_AT_ONCE

    with serve(server, harness, **options) as url:
        limits = httpx.Limits(max_connections=USERS_AT_ONCE)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

            async def call(n: int) -> None:
                headers = {"x-user-id": f"user-{n}", "x-request-id": f"req-{n}"}
                response = await client.get(f"/{MODES[n % 5]}/{n}", headers=headers)
                answers[n] = (response.status_code, response.json())

            async with anyio.create_task_group() as tg:
                for n in range(USERS_AT_ONCE):
                    tg.start_soon(call, n)
        # The abandoned threads end their spans after their requests answered.
        still_open = await anyio.to_thread.run_sync(opens.wait_until, servers_ended)
    assert harness.unexpected == []

    # No detach failure, every span ended, every component created was cleaned.
    assert [r.getMessage() for r in detach_errors if r.levelno >= logging.WARNING] == []
    assert still_open == {}
    assert opens.started == len(otel.spans.spans)
    assert len(dispatchers) == len(workers) == USERS_AT_ONCE
    assert all(d.closed for d in dispatchers)
    assert all(w.closed for w in workers)

    # Each response names its own user, as the request and its worker thread saw it.
    for n in range(USERS_AT_ONCE):
        status, body = answers[n]
        user, request_id, mode = f"user-{n}", f"req-{n}", MODES[n % 5]
        assert body["thread_user"] == user, (n, body)
        assert body["thread_request_id"] == request_id, (n, body)
        if mode in ("cancel", "abandon"):
            assert (status, body.get("cancelled")) == (499, True), (n, body)
        else:
            assert (status, body["user"]) == (200 if mode == "ok" else 500, user), (n, body)

    # One tree per request: only server spans are roots, no parent is unknown, and no span
    # has an ancestor started for another request.
    spans = list(otel.spans.spans)
    by_id = {s.context.span_id: s for s in spans}
    mine: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        assert parent_id(span) is None or parent_id(span) in by_id, span.name
        assert (span.parent is None) == (span.kind is SpanKind.SERVER), span.name
        owners = {request_of(s) for s in [span, *ancestors(span, by_id)]} - {None}
        assert len(owners) == 1, (span.name, owners)
        mine.setdefault(owners.pop() or "", []).append(span)
    assert sorted(mine) == sorted(f"req-{n}" for n in range(USERS_AT_ONCE))

    traces = set()
    for n in range(USERS_AT_ONCE):
        user, mode = f"user-{n}", MODES[n % 5]
        tree = mine[f"req-{n}"]
        named = {name: [s for s in tree if s.name == name] for name in {s.name for s in tree}}
        server_span = one([s for s in tree if s.kind is SpanKind.SERVER])
        scope_span = one(named["ambient.scope"])
        thread_span = one(named["d02.thread"])
        dispatch_span = one(named["d02.dispatch"])
        assert len(tree) == 8, sorted(named)  # server, dispatch, scope, thread, 2+2 components
        assert {s.context.trace_id for s in tree} == {server_span.context.trace_id}
        traces.add(server_span.context.trace_id)
        assert (scope_span.attributes or {})["ambient.user_id"] == user
        assert (thread_span.attributes or {})["d02.seen_user"] == user
        assert scope_span in ancestors(thread_span, by_id)
        for component in named["ambient.resolve"] + named["ambient.cleanup"]:
            assert parent_id(component) == scope_span.context.span_id
        assert len(named["ambient.resolve"]) == len(named["ambient.cleanup"]) == 2
        if base_outside:
            assert parent_id(dispatch_span) == server_span.context.span_id
            assert parent_id(scope_span) == dispatch_span.context.span_id
            assert (dispatch_span.attributes or {})["d02.saw"] == "nobody"
        else:
            assert parent_id(scope_span) == server_span.context.span_id
            assert parent_id(dispatch_span) == scope_span.context.span_id
            assert (dispatch_span.attributes or {})["d02.saw"] == user
        # The scope span says how the request ended.
        scope_attributes = scope_span.attributes or {}
        assert scope_attributes.get("ambient.cancelled", False) == (mode in ("cancel", "abandon"))
        assert (scope_span.status.status_code is StatusCode.ERROR) == (mode == "raise")
        assert thread_span.end_time is not None
        assert scope_span.end_time is not None
        if mode == "abandon":  # the thread outlived its request, still under its scope span
            assert thread_span.end_time >= scope_span.end_time
        else:
            assert thread_span.end_time <= scope_span.end_time
    assert len(traces) == USERS_AT_ONCE


class TestBaseHTTPMiddleware:
    async def test_outside_ambient_50_users_with_threads_cancels_and_failures(
        self, otel: Otel, detach_errors: list[logging.LogRecord], anyio_backend: str
    ) -> None:
        """A span-starting BaseHTTPMiddleware outside AmbientMiddleware (the scope opens in
        the middleware's app task), 50 users at once, each hopping to a worker thread that
        starts a span; some requests cancelled from that thread, some left running in it,
        some raising: no "Failed to detach context", every span ended, every span in its own
        request's trace and never under another request's, each answer names its user."""
        await fifty_users_through_base_http_middleware(
            otel, detach_errors, anyio_backend, base_outside=True
        )

    async def test_inside_ambient_50_users_with_threads_cancels_and_failures(
        self, otel: Otel, detach_errors: list[logging.LogRecord], anyio_backend: str
    ) -> None:
        """The same with the BaseHTTPMiddleware inside AmbientMiddleware: its span is a child
        of the scope span, and the app runs in a task the scope did not open."""
        await fifty_users_through_base_http_middleware(
            otel, detach_errors, anyio_backend, base_outside=False
        )


async def test_a_telemetrys_own_meter_counts_the_guarded_globals_touched_in_its_scopes(
    otel: Otel,
) -> None:
    """``Telemetry(meter_provider=...)`` lists ``ambient.global_state.accesses`` among its
    metrics, but the accesses were counted on the global meter provider only: the one the
    application gave its telemetry never saw them."""
    from ambient.migration import guard_global

    catalog = guard_global({"triage": 1}, name="catalog", mode="off")
    registry = Registry(telemetry=otel.telemetry())
    for user in ("alice", "bob"):
        async with registry.open_scope(ctx(user)):
            assert catalog["triage"] == 1
    assert catalog["triage"] == 1  # outside any scope: not an access
    points = otel.points()["ambient.global_state.accesses"]
    assert [(dict(p.attributes or {}), p.value) for p in points] == [
        ({"ambient.global": "catalog"}, 2)
    ]


@pytest.mark.parametrize("given", [True, False], ids=["given", "global"])
async def test_a_telemetry_on_the_global_meter_provider_counts_each_access_once(
    otel: Otel, monkeypatch: pytest.MonkeyPatch, given: bool
) -> None:
    """A telemetry on the global meter provider, given it (the application passes the
    provider it installed) or not, counts each access to a guarded global once, not once
    for the global count and again for its own, for each of many users."""
    from ambient.migration import guard_global

    monkeypatch.setattr(metrics, "get_meter_provider", lambda: otel.meter_provider)
    catalog = guard_global({"triage": 1}, name="catalog", mode="off")
    telemetry = otel.telemetry() if given else Telemetry(tracer_provider=otel.tracer_provider)
    registry = Registry(telemetry=telemetry)
    for i in range(10):
        async with registry.open_scope(ctx(f"user-{i}")):
            assert catalog["triage"] == 1
    points = otel.points()["ambient.global_state.accesses"]
    assert [(dict(p.attributes or {}), p.value) for p in points] == [
        ({"ambient.global": "catalog"}, 10)
    ]


# -- a server shutting down under open streams and background work ------------------------


@shutdown_under_open_streams
def test_a_shutdown_cutting_streams_and_background_work_short_ends_every_span(
    otel: Otel, server: str, options: dict[str, Any]
) -> None:
    """10 users each hold an endless streamed response and a background task still at
    work, both using a REQUEST component with an async cleanup and the user's USER
    component, when the server shuts down and cancels them after its 1 s grace period.
    Every span that started has ended (none left open, which an exporter would never see),
    each request's scope span names its own user with that request's cleanups inside it,
    and each user's USER component, cleaned at shutdown, is a span naming that user."""
    users = [f"u-{n}" for n in range(10)]
    registry = Registry(telemetry=otel.telemetry(hash_key="k", span_threshold=0))
    working = threading.Semaphore(0)

    class Step:
        def __init__(self, context: UserExecutionContext) -> None:
            self.user = context.user_id

        async def aclose(self) -> None:
            await anyio.sleep(0.05)

    async def memory(user: UserRef) -> AsyncIterator[Memory]:
        yield Memory(user)
        await anyio.sleep(0.05)

    registry.register(Step, Step)
    registry.register(Memory, memory, lifetime=Lifetime.USER)

    async def keep_going(user: str) -> AsyncIterator[bytes]:
        step = await ambient.resolve(Step)
        memory = await ambient.resolve(Memory)
        assert (step.user, memory.user.user_id) == (user, user)
        working.release()
        while True:  # until the server cancels it
            yield b"more\n"
            await anyio.sleep(0.01)

    async def chat(request: Request) -> Response:
        return StreamingResponse(keep_going(ambient.get_current_context().user_id))

    async def later(request: Request) -> Response:
        user = ambient.get_current_context().user_id

        async def job() -> None:
            async for _ in keep_going(user):
                pass

        return Response("accepted", background=BackgroundTask(job))

    app = AmbientMiddleware(
        Starlette(routes=[Route("/chat", chat), Route("/later", later)]),
        registry=registry,
        identity=trusted_header(),
    )
    with contextlib.ExitStack() as sockets, serve(server, app, **options) as url:
        host, port = url.removeprefix("http://").split(":")
        for user, path in itertools.product(users, ("/chat", "/later")):
            sock = sockets.enter_context(socket.create_connection((host, int(port)), 10))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n\r\n".encode())
        for _ in range(2 * len(users)):
            assert working.acquire(timeout=20)
    assert registry.stats().open_scopes == 0
    assert otel.spans.started == len(otel.spans.spans), otel.spans.names()
    hashed = {hash_id(user, "k"): user for user in users}
    scopes = otel.spans.named("ambient.scope")
    assert sorted(hashed[(s.attributes or {})["ambient.user_id"]] for s in scopes) == sorted(
        users * 2
    )
    by_id = {s.context.span_id: s for s in scopes if s.context is not None}
    cleanups = otel.spans.named("ambient.cleanup")
    steps = [s for s in cleanups if (s.attributes or {})["ambient.lifetime"] == "request"]
    assert len(steps) == 2 * len(users)
    # One cleanup inside each request's scope span, none elsewhere.
    assert sorted(s.parent.span_id for s in steps if s.parent is not None) == sorted(by_id)
    memories = [s for s in cleanups if (s.attributes or {})["ambient.lifetime"] == "user"]
    assert sorted(hashed[(s.attributes or {})["ambient.user_id"]] for s in memories) == users
