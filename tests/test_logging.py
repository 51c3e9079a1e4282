"""Log correlation: the stdlib filter and the structlog processor add the context's ids and
the current trace to every record, empty outside a context, never another user's."""

from __future__ import annotations

import contextlib
import gc
import logging
import logging.handlers
import pickle
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import structlog
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from structlog.testing import LogCapture

import ambient
import ambient.integrations.logging as ambient_logging
from ambient import Registry, UserExecutionContext, bind_context
from ambient.integrations.logging import (
    FIELDS,
    ContextFilter,
    ContextProcessor,
    add_context,
    context_fields,
)
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import Telemetry, hash_id
from tests.servers import serve


class Keep(logging.Handler):
    """Keeps the records it handles (those ``filters`` pass, in turn)."""

    def __init__(self, *filters: logging.Filter) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        for log_filter in filters:
            self.addFilter(log_filter)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def handled_by(
    name: str, *handlers: logging.Handler, logger_filter: logging.Filter | None = None
) -> Iterator[logging.Logger]:
    """The logger ``tests.logging.<name>`` at INFO, not propagating, with ``handlers`` (in
    this order) and ``logger_filter`` on it until the block is out."""
    log = logging.getLogger(f"tests.logging.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if logger_filter is not None:
        log.addFilter(logger_filter)
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
        if logger_filter is not None:
            log.removeFilter(logger_filter)


@pytest.fixture(name="tracer_provider")
def fixture_tracer_provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    yield provider
    provider.shutdown()


def make_logger(name: str, log_filter: logging.Filter) -> tuple[logging.Logger, Keep]:
    log = logging.getLogger(f"tests.logging.{name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for old in list(log.handlers):
        log.removeHandler(old)
    handler = Keep()
    handler.addFilter(log_filter)
    log.addHandler(handler)
    return log, handler


def _drop_test_handlers(but: str = "") -> None:
    """Detach the handlers (and their filters) of this file's loggers, but ``but``'s."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("tests.logging.") and name != but:
            log = logging.getLogger(name)
            for handler in list(log.handlers):
                log.removeHandler(handler)
    gc.collect()


def fields(record: logging.LogRecord) -> dict[str, str]:
    return {name: getattr(record, name) for name in FIELDS}


class TestContextFilter:
    def test_outside_a_context_every_field_is_empty(self) -> None:
        """No context, no span: all seven fields exist and are empty strings."""
        log, kept = make_logger("outside", ContextFilter())
        log.info("hello")
        (record,) = kept.records
        assert fields(record) == dict.fromkeys(FIELDS, "")

    def test_bound_context_without_a_span(self) -> None:
        """A bound context gives the ids (user id hashed); no span gives empty trace fields."""
        log, kept = make_logger("bound", ContextFilter())
        context = UserExecutionContext.create("alice", tenant_id="acme")
        with bind_context(context):
            log.info("hello")
        assert fields(kept.records[0]) == {
            "user_id": hash_id("alice"),
            "tenant_id": "acme",
            "thread_id": context.thread_id,
            "run_id": context.run_id,
            "request_id": context.request_id,
            "trace_id": "",
            "span_id": "",
        }

    def test_trace_and_span_ids_keep_their_leading_zeros(self) -> None:
        """The ids are W3C's fixed-width hex (32 and 16 digits), leading zeros included, so
        a log line's trace id is the one a trace backend shows for the span."""
        from opentelemetry import trace

        span = trace.NonRecordingSpan(
            trace.SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False)
        )
        log, kept = make_logger("padded", ContextFilter())
        with trace.use_span(span):
            log.info("hello")
        assert kept.records[0].trace_id == "0" * 29 + "abc"  # type: ignore[attr-defined]
        assert kept.records[0].span_id == "0" * 13 + "def"  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        ("options", "user", "tenant"),
        [
            ({"user_id": "raw"}, "alice", "acme"),
            ({"user_id": "omit", "tenant_id": "omit"}, "", ""),
            (
                {"hash_key": b"k", "tenant_id": "hash"},
                hash_id("alice", b"k"),
                hash_id("acme", b"k"),
            ),
        ],
    )
    def test_id_policies(self, options: dict[str, Any], user: str, tenant: str) -> None:
        """user_id and tenant_id follow the same policies as the spans."""
        log, kept = make_logger("policy", ContextFilter(**options))
        with bind_context(UserExecutionContext.create("alice", tenant_id="acme")):
            log.info("hello")
        assert kept.records[0].user_id == user  # type: ignore[attr-defined]
        assert kept.records[0].tenant_id == tenant  # type: ignore[attr-defined]

    def test_fields_given_with_extra_are_kept(self) -> None:
        """A field passed with extra= wins over the filter's value."""
        log, kept = make_logger("extra", ContextFilter())
        with bind_context(UserExecutionContext.create("alice")):
            log.info("hello", extra={"request_id": "from-caller"})
        assert kept.records[0].request_id == "from-caller"  # type: ignore[attr-defined]
        assert kept.records[0].user_id == hash_id("alice")  # type: ignore[attr-defined]

    def test_an_id_given_with_extra_is_kept_by_a_stricter_filter_after_a_laxer_one(
        self,
    ) -> None:
        """A user id the call gives with ``extra=`` is the caller's: a raw debug handler's
        filter keeps it, and the hashing handler after it keeps it too instead of taking it
        for one the raw filter wrote."""
        debug, exported = Keep(ContextFilter(user_id="raw")), Keep(ContextFilter())
        with (
            handled_by("extra-two-policies", debug, exported) as log,
            bind_context(UserExecutionContext.create("alice")),
        ):
            log.info("hello", extra={"user_id": "service-account"})
        assert debug.records[0].user_id == "service-account"  # type: ignore[attr-defined]
        assert exported.records[0].user_id == "service-account"  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        ("setup", "debug_sees", "exported_sees"),
        [
            # A raw debug handler first, then the exported one hashing: it used to keep the
            # raw id the first filter had written on the shared record.
            ("raw debug, hashing exported", "raw", "hash"),
            # An omitting debug handler first: the exported one never gives away more.
            ("omitting debug, hashing exported", "omit", "omit"),
            # A hashing buffer first (a MemoryHandler emitting later), then a raw debug
            # handler: the buffered record must not turn raw under the buffer.
            ("hashing buffer, raw debug", "hash", "hash"),
            # A hashing filter on the logger, a raw debug handler, an exported handler with
            # no filter of its own: it must get the logger filter's hash.
            ("hashing logger, raw debug, plain exported", "hash", "hash"),
            # The same policy twice on one record (the logger's filter and the handlers'):
            # an id written under it is kept, not hashed again.
            ("hashing logger, hashing debug and exported", "hash", "hash"),
        ],
    )
    def test_no_handler_gives_away_more_of_an_id_than_its_filter_allows(
        self, setup: str, debug_sees: str, exported_sees: str
    ) -> None:
        """Handlers share one record: a filter giving away less of an id writes it again
        under its own policy, never the other way; a field given with ``extra=`` is kept by
        every handler."""
        emitted: dict[str, list[dict[str, Any]]] = {"debug": [], "exported": []}
        buffered: list[logging.LogRecord] = []

        class Snapshot(logging.Handler):
            """Keeps what each record carried when this handler emitted it."""

            def __init__(self, name: str) -> None:
                super().__init__(logging.DEBUG)
                self.kept = emitted[name]

            def emit(self, record: logging.LogRecord) -> None:
                self.kept.append(dict(record.__dict__))

        class Buffer(logging.Handler):
            """Keeps the records themselves, to emit them later (as a MemoryHandler does)."""

            def emit(self, record: logging.LogRecord) -> None:
                buffered.append(record)

        debug, exported = Snapshot("debug"), Snapshot("exported")
        handlers: list[logging.Handler]
        logger_filter = None
        if setup == "raw debug, hashing exported":
            debug.addFilter(ContextFilter(user_id="raw"))
            exported.addFilter(ContextFilter())
            handlers = [debug, exported]
        elif setup == "omitting debug, hashing exported":
            debug.addFilter(ContextFilter(user_id="omit"))
            exported.addFilter(ContextFilter())
            handlers = [debug, exported]
        elif setup == "hashing buffer, raw debug":
            buffer = Buffer()
            buffer.addFilter(ContextFilter())
            debug.addFilter(ContextFilter(user_id="raw"))
            handlers = [buffer, debug]
        elif setup == "hashing logger, hashing debug and exported":
            logger_filter = ContextFilter()
            debug.addFilter(ContextFilter())
            exported.addFilter(ContextFilter())
            handlers = [debug, exported]
        else:
            logger_filter = ContextFilter()
            debug.addFilter(ContextFilter(user_id="raw"))
            handlers = [debug, exported]
        with (
            handled_by(f"policies-{setup}", *handlers, logger_filter=logger_filter) as log,
            bind_context(UserExecutionContext.create("alice@example.com")),
        ):
            log.info("run done")
            log.info("given", extra={"request_id": "from-caller"})
        for record in buffered:  # the buffer flushes now, after the other handlers ran
            exported.handle(record)
        shown = {"raw": "alice@example.com", "hash": hash_id("alice@example.com"), "omit": ""}
        assert [r["user_id"] for r in emitted["debug"]] == [shown[debug_sees]] * 2
        assert [r["user_id"] for r in emitted["exported"]] == [shown[exported_sees]] * 2
        for records in emitted.values():
            assert records[1]["request_id"] == "from-caller"
        if exported_sees != "raw":
            assert "alice@example.com" not in repr(emitted["exported"])

    @pytest.mark.parametrize("flushed_in", ["another user's context", "no context"])
    def test_a_record_rewritten_later_keeps_the_user_it_was_made_for(self, flushed_in: str) -> None:
        """A raw debug handler and a MemoryHandler whose target hashes: alice's record,
        flushed later in another context, carries alice's pseudonym, never the flushing
        context's user id (nor an empty one)."""
        exported: list[tuple[str, str, str]] = []

        class Snapshot(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                exported.append((record.getMessage(), record.user_id, record.request_id))  # type: ignore[attr-defined]

        debug = Keep(ContextFilter(user_id="raw"))
        target = Snapshot()
        target.addFilter(ContextFilter())
        buffer = logging.handlers.MemoryHandler(
            capacity=100, flushLevel=logging.CRITICAL, target=target
        )
        alice = UserExecutionContext.create("alice", request_id="req-alice")
        try:
            with handled_by(f"flushed-{flushed_in}", debug, buffer) as log:
                with bind_context(alice):
                    log.info("for alice")
                if flushed_in == "no context":
                    buffer.flush()
                else:
                    with bind_context(UserExecutionContext.create("bob", request_id="req-bob")):
                        buffer.flush()
        finally:
            buffer.close()
        assert exported == [("for alice", hash_id("alice"), "req-alice")]

    def test_a_raw_debug_handler_does_not_reach_a_hashing_handler_behind_a_queue(
        self,
    ) -> None:
        """A raw debug handler, then a QueueHandler whose listener's handler hashes: the
        listener gets a copy of the record, in a thread with no context, and still writes
        the hash, never the raw id the debug handler's filter put on the record."""
        exported: list[tuple[str, str]] = []

        class Snapshot(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                exported.append((record.user_id, record.tenant_id))  # type: ignore[attr-defined]

        debug = Keep(ContextFilter(user_id="raw"))
        target = Snapshot()
        target.addFilter(ContextFilter(tenant_id="omit"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(records, target)
        with handled_by("queued", debug, logging.handlers.QueueHandler(records)) as log:
            listener.start()
            try:
                alice = UserExecutionContext.create("alice@example.com", tenant_id="acme")
                with bind_context(alice):
                    log.info("run done")
            finally:
                listener.stop()
        assert exported == [(hash_id("alice@example.com"), "")]
        # The copy the listener got pickles as plain strings (a SocketHandler's receiver
        # need not have this library installed).
        pickled = pickle.dumps(debug.records[0].__dict__)
        assert type(pickle.loads(pickled)["user_id"]) is str  # noqa: S301 - made just above

    def test_a_hashing_handler_then_an_omitting_one_behind_a_queue_omits_the_id(
        self,
    ) -> None:
        """A raw debug handler, a hashing one, then a QueueHandler whose listener's handler
        omits the user id: the hash the second filter wrote still reaches the listener's
        copy of the record as written under "hash", so the omitting filter empties it."""
        exported: list[str] = []

        class Snapshot(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                exported.append(record.user_id)  # type: ignore[attr-defined]

        debug, hashing = Keep(ContextFilter(user_id="raw")), Keep(ContextFilter())
        target = Snapshot()
        target.addFilter(ContextFilter(user_id="omit"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        listener = logging.handlers.QueueListener(records, target)
        queued = logging.handlers.QueueHandler(records)
        with handled_by("queued-three", debug, hashing, queued) as log:
            listener.start()
            try:
                with bind_context(UserExecutionContext.create("alice@example.com")):
                    log.info("run done")
            finally:
                listener.stop()
        assert exported == [""]
        assert hashing.records[0].user_id == hash_id("alice@example.com")  # type: ignore[attr-defined]

    def test_a_filter_made_stricter_than_the_rest_counts_at_once(self) -> None:
        """In a fresh process (no filter before): a raw filter and a hashing one made just
        before a record is logged, the hashing one behind a QueueHandler. The stricter one
        counts from the moment it is made, not from the next time a filter is collected:
        the raw filter marks what it writes and the listener's copy gets the hash."""
        code = """
import logging, logging.handlers, queue
from ambient import UserExecutionContext, bind_context
from ambient.integrations.logging import ContextFilter
from ambient.telemetry import hash_id

exported, shown = [], []
class Snapshot(logging.Handler):
    def __init__(self, kept):
        super().__init__()
        self.kept = kept
    def emit(self, record):
        self.kept.append(record.user_id)

log = logging.getLogger("fresh")
log.setLevel(logging.INFO)
log.propagate = False
debug = Snapshot(shown)
debug.addFilter(ContextFilter(user_id="raw"))
target = Snapshot(exported)
target.addFilter(ContextFilter())
records = queue.SimpleQueue()
listener = logging.handlers.QueueListener(records, target)
log.addHandler(debug)
log.addHandler(logging.handlers.QueueHandler(records))
listener.start()
with bind_context(UserExecutionContext.create("alice@example.com")):
    log.info("run done")
listener.stop()
print(shown == ["alice@example.com"], exported == [hash_id("alice@example.com")])
"""
        out = subprocess.run(  # noqa: S603 - our own interpreter, fixed code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.split() == ["True", "True"]

    def test_outside_a_context_a_stricter_filter_after_a_laxer_one_leaves_the_ids_empty(
        self,
    ) -> None:
        """A raw debug handler, then a hashing one, on a record made outside any context:
        the empty ids the first filter wrote stay empty under the second, never the hash
        of an empty string, which would look like a user's."""
        debug, exported = Keep(ContextFilter(user_id="raw")), Keep(ContextFilter(tenant_id="hash"))
        with handled_by("outside-two-policies", debug, exported) as log:
            log.info("no context")
        (record,) = exported.records
        assert (record.user_id, record.tenant_id) == ("", "")  # type: ignore[attr-defined]

    def test_an_id_that_cannot_be_written_again_is_left_out(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A raw debug handler, then a hashing one whose hash fails: the record still goes
        out, without the id rather than with the raw one."""
        import hmac

        debug, exported = Keep(ContextFilter(user_id="raw")), Keep(ContextFilter())

        def broken(*args: object) -> bytes:
            raise RuntimeError("hash failed")

        with (
            handled_by("failing-hash", debug, exported) as log,
            bind_context(UserExecutionContext.create("alice@example.com")),
        ):
            monkeypatch.setattr(hmac, "digest", broken)
            log.info("run done")
            monkeypatch.undo()
        (record,) = exported.records
        assert record.user_id == ""  # type: ignore[attr-defined]
        assert "alice@example.com" not in repr(record.__dict__)

    def test_never_raises(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """If looking up the context fails, the record still goes out with empty fields."""

        def broken() -> None:
            raise RuntimeError("lookup failed")

        monkeypatch.setattr(ambient_logging, "current_context_or_none", broken)
        log, kept = make_logger("broken", ContextFilter())
        log.info("hello")
        assert fields(kept.records[0]) == dict.fromkeys(FIELDS, "")

    def test_a_record_that_cannot_be_hashed_still_gets_each_filters_ids(self) -> None:
        """A record class of the application's that compares by value (``__eq__`` and no
        ``__hash__``) cannot be noted on: each filter still writes its fields and lets the
        record through, and a hashing filter after a raw one still hashes the user id (nor
        does a raw one after a hashing one make it raw)."""

        class Compared(logging.LogRecord):  # noqa: PLW1641 - unhashable on purpose
            def __eq__(self, other: object) -> bool:
                return self is other

        raw, hashing = ContextFilter(user_id="raw"), ContextFilter()
        with bind_context(UserExecutionContext.create("alice", tenant_id="acme")):
            first = Compared("compared", logging.INFO, "app.py", 1, "hello", None, None)
            assert raw.filter(first)
            assert (first.user_id, first.tenant_id) == ("alice", "acme")  # type: ignore[attr-defined]
            assert hashing.filter(first)
            assert first.user_id == hash_id("alice")  # type: ignore[attr-defined]
            second = Compared("compared", logging.INFO, "app.py", 1, "hello", None, None)
            assert hashing.filter(second)
            assert raw.filter(second)
            assert second.user_id == hash_id("alice")  # type: ignore[attr-defined]

    def test_bad_policy_is_refused(self) -> None:
        """An unknown policy raises ValueError at construction."""
        with pytest.raises(ValueError, match="user_id must be one of"):
            ContextFilter(user_id="clear")  # type: ignore[arg-type]

    async def test_records_carry_the_scope_span_and_the_spans_user_hash(
        self, tracer_provider: TracerProvider
    ) -> None:
        """Inside a traced scope: trace and span id of the scope span, and the same user
        pseudonym as the span attribute."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        registry = Registry(telemetry=Telemetry(tracer_provider=tracer_provider))
        log, kept = make_logger("traced", ContextFilter())
        async with registry.open_scope(UserExecutionContext.create("alice")):
            log.info("inside")
        log.info("after")
        (span,) = exporter.get_finished_spans()
        inside, after = kept.records
        assert inside.trace_id == f"{span.context.trace_id:032x}"  # type: ignore[attr-defined]
        assert inside.span_id == f"{span.context.span_id:016x}"  # type: ignore[attr-defined]
        assert inside.user_id == (span.attributes or {})["ambient.user_id"]  # type: ignore[attr-defined]
        assert fields(after) == dict.fromkeys(FIELDS, "")

    async def test_records_made_by_user_and_app_factories_carry_no_requests_ids(
        self,
    ) -> None:
        """A USER component is shared by its user's requests and an APP one by every user's:
        what their factories log, while alice's request has them made, carries none of that
        request's ids (its user among them), as their factories see no context; the
        request's own record carries them all."""
        registry = Registry()
        log, kept = make_logger("factories", ContextFilter(user_id="raw"))

        def per_user(user: ambient.UserRef) -> str:
            log.info("user component")
            return f"memory of {user.user_id}"

        def per_app() -> str:
            log.info("app component")
            return "pool"

        registry.register("memory", per_user, lifetime=ambient.Lifetime.USER)
        registry.register("pool", per_app, lifetime=ambient.Lifetime.APP)
        ctx = UserExecutionContext.create("alice", tenant_id="acme")
        async with registry.open_scope(ctx):
            await ambient.resolve("memory")
            await ambient.resolve("pool")
            log.info("request")
        await registry.aclose()
        made = {record.getMessage(): fields(record) for record in kept.records}
        assert made["user component"] == dict.fromkeys(FIELDS, "")
        assert made["app component"] == dict.fromkeys(FIELDS, "")
        assert made["request"] == {
            "user_id": "alice",
            "tenant_id": "acme",
            "thread_id": ctx.thread_id,
            "run_id": ctx.run_id,
            "request_id": ctx.request_id,
            "trace_id": "",
            "span_id": "",
        }

    async def test_100_concurrent_users_never_get_each_others_ids(
        self, tracer_provider: TracerProvider
    ) -> None:
        """100 concurrent scopes, each logging across checkpoints: every record carries its
        own user, request and trace, never another's."""
        registry = Registry(telemetry=Telemetry(tracer_provider=tracer_provider))
        log, kept = make_logger("concurrent", ContextFilter(user_id="raw"))
        expected: dict[str, tuple[str, str]] = {}

        async def request(n: int) -> None:
            context = UserExecutionContext.create(f"user-{n}", request_id=f"req-{n}")
            async with registry.open_scope(context):
                from opentelemetry import trace

                trace_id = f"{trace.get_current_span().get_span_context().trace_id:032x}"
                expected[f"req-{n}"] = (f"user-{n}", trace_id)
                for step in range(3):
                    log.info("step %d", step)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(request, n)
        assert len(kept.records) == 300
        assert len({trace for _, trace in expected.values()}) == 100
        for record in kept.records:
            user, trace_id = expected[record.request_id]  # type: ignore[attr-defined]
            assert record.user_id == user  # type: ignore[attr-defined]
            assert record.trace_id == trace_id  # type: ignore[attr-defined]

    def test_context_fields_helper(self) -> None:
        """context_fields() returns the same dict the filter adds, under its own policy."""
        with bind_context(UserExecutionContext.create("alice", request_id="r1")):
            assert context_fields(user_id="raw")["request_id"] == "r1"
            assert context_fields(user_id="raw")["user_id"] == "alice"
            assert context_fields(hash_key=b"k")["user_id"] == hash_id("alice", b"k")
        assert context_fields() == dict.fromkeys(FIELDS, "")

    def test_context_fields_takes_the_tenant_policy(self) -> None:
        """context_fields() hashes or omits the tenant id as its tenant_id policy says."""
        with bind_context(UserExecutionContext.create("alice", tenant_id="acme")):
            assert context_fields()["tenant_id"] == "acme"
            assert context_fields(tenant_id="hash", hash_key=b"k")["tenant_id"] == hash_id(
                "acme", b"k"
            )
            assert context_fields(tenant_id="omit")["tenant_id"] == ""

    def test_one_policy_writes_plain_strings_that_any_json_encoder_takes(self) -> None:
        """With filters of one policy (nearly every process), the ids are plain str, which
        msgspec (no enc_hook) encodes: it refuses str subclasses, and every record would be
        a logging error. Only while a stricter filter lives are they marked for it, and the
        stricter one's own output is plain again."""
        msgspec = pytest.importorskip("msgspec")
        _drop_test_handlers()  # and with them the filters of earlier tests
        log, kept = make_logger("plain", ContextFilter())
        with bind_context(UserExecutionContext.create("alice", tenant_id="acme")):
            log.info("hello")
            encoded = msgspec.json.encode({name: getattr(kept.records[0], name) for name in FIELDS})
            assert msgspec.json.decode(encoded)["user_id"] == hash_id("alice")
            # A stricter filter beside it: a raw one's values are marked for it to find.
            strict, strict_kept = make_logger("plain.strict", ContextFilter(user_id="omit"))
            raw, raw_kept = make_logger("plain.raw", ContextFilter(user_id="raw"))
            raw.handlers[0].addFilter(strict.handlers[0].filters[0])
            raw.info("hello")
            record = raw_kept.records[0]
            assert record.user_id == ""  # type: ignore[attr-defined]
            msgspec.json.encode({name: getattr(record, name) for name in FIELDS})
        del strict, strict_kept, raw, raw_kept, record
        _drop_test_handlers(but="tests.logging.plain")
        with bind_context(UserExecutionContext.create("bob")):
            log.info("again")
        assert type(kept.records[1].user_id) is str  # type: ignore[attr-defined]

    def test_a_record_kept_before_a_stricter_filter_existed_is_still_written_again(
        self,
    ) -> None:
        """A MemoryHandler keeps records until its hashing target is set up (at startup,
        say): a raw filter wrote alice's id while no stricter filter existed, so as a plain
        string, which the target's hashing filter then took for a value given with extra=
        and exported raw."""
        _drop_test_handlers()  # and with them the filters of earlier tests
        buffer = logging.handlers.MemoryHandler(100, flushLevel=logging.CRITICAL)
        with handled_by("buffered", buffer, logger_filter=ContextFilter(user_id="raw")) as log:
            with bind_context(UserExecutionContext.create("alice")):
                log.info("before the exporter is set up")
            exporter = Keep(ContextFilter())
            buffer.setTarget(exporter)
            buffer.flush()
            (record,) = exporter.records
            assert record.user_id == hash_id("alice")  # type: ignore[attr-defined]

    def test_an_id_written_over_a_filters_one_is_kept_by_a_stricter_filter_made_later(
        self,
    ) -> None:
        """As above, but a filter of the app's own relabels the buffered record's user after
        the raw filter wrote alice's id: that value is the app's, not the raw filter's, so
        the target's hashing filter keeps it instead of hashing it as alice's id."""

        class Relabel(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.user_id = "scheduler"
                return True

        _drop_test_handlers()
        buffer = logging.handlers.MemoryHandler(100, flushLevel=logging.CRITICAL)
        buffer.addFilter(Relabel())
        with handled_by("relabelled", buffer, logger_filter=ContextFilter(user_id="raw")) as log:
            with bind_context(UserExecutionContext.create("alice")):
                log.info("before the exporter is set up")
            exporter = Keep(ContextFilter())
            buffer.setTarget(exporter)
            buffer.flush()
            (record,) = exporter.records
            assert record.user_id == "scheduler"  # type: ignore[attr-defined]

    def test_filters_made_and_dropped_on_many_threads_leave_the_strictest_live_policy(
        self,
    ) -> None:
        """Filters of every policy made and dropped on four threads at once (as dictConfig
        in one thread and the garbage collector in another may): once they are done, the
        strictest policy noted is that of the filters still alive, neither a dropped
        one's nor a laxer one's."""
        from ambient.integrations import logging as ambient_logging

        _drop_test_handlers()
        # Filters of other tests' loggers that are still alive count too.
        kept: list[ContextFilter] = list(ambient_logging._filters.keys())
        others = len(kept)
        policies = ("raw", "hash", "omit")
        start = threading.Barrier(4)

        def churn(seed: int) -> None:
            rng = random.Random(seed)
            start.wait(timeout=10)
            for n in range(300):
                made = ContextFilter(user_id=rng.choice(policies), tenant_id=rng.choice(policies))
                if n % 100 == 0:
                    kept.append(made)
                if n % 37 == 0:
                    gc.collect()

        threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        gc.collect()
        disclosure = {"raw": 2, "hash": 1, "omit": 0}
        expected = {
            "user_id": min(disclosure[f._fields._ids.user_policy] for f in kept),
            "tenant_id": min(disclosure[f._fields._ids.tenant_policy] for f in kept),
        }
        assert len(kept) == others + 12
        assert ambient_logging._strictest == expected
        del kept[others:]
        gc.collect()
        assert ambient_logging._strictest == {
            key: min((d[key] for d in ambient_logging._filters.values()), default=2)
            for key in ("user_id", "tenant_id")
        }
        assert len(ambient_logging._filters) == others

    def test_a_recount_that_read_before_a_filter_was_made_counts_again(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A raw filter made on one thread reads the live filters, then an omitting one is
        made (and counted) on another before the first writes what it read: the first
        counts again, so the strictest policy noted is the omitting one's, not the stale
        count that misses it (which would leave a raw id unmarked for it)."""
        _drop_test_handlers()
        real = ambient_logging._filters
        read, go_on = threading.Event(), threading.Event()
        pause_in: list[int] = []

        class ReadThenWait:
            """The live filters; the first read on the paused thread waits once it read."""

            def __setitem__(self, made: ContextFilter, disclosures: dict[str, int]) -> None:
                real[made] = disclosures

            def values(self) -> list[dict[str, int]]:
                live = list(real.values())
                if pause_in and pause_in[0] == threading.get_ident():
                    pause_in.clear()
                    read.set()
                    go_on.wait(10)
                return live

        monkeypatch.setattr(ambient_logging, "_filters", ReadThenWait())
        made: list[ContextFilter] = []

        def make_raw() -> None:
            pause_in.append(threading.get_ident())
            made.append(ContextFilter(user_id="raw", tenant_id="raw"))

        thread = threading.Thread(target=make_raw)
        thread.start()
        assert read.wait(10)
        omitting = ContextFilter(user_id="omit", tenant_id="raw")
        go_on.set()
        thread.join(10)
        assert len(made) == 1
        assert ambient_logging._strictest["user_id"] == 0
        monkeypatch.undo()
        made.clear()
        del omitting
        gc.collect()


class TestThroughTheMiddleware:
    async def test_requests_on_uvicorn_log_their_own_ids_and_trace(
        self, tracer_provider: TracerProvider
    ) -> None:
        """50 concurrent users through AmbientMiddleware behind the OpenTelemetry ASGI
        middleware on uvicorn, each with its own traceparent: every record made in a request
        carries that request's user pseudonym, request id and trace id."""
        log, kept = make_logger("served", ContextFilter())
        registry = Registry(telemetry=Telemetry(tracer_provider=tracer_provider))

        async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
            log.info("handling")
            await anyio.lowlevel.checkpoint()
            log.info("answering")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = OpenTelemetryMiddleware(
            AmbientMiddleware(endpoint, registry=registry, identity=trusted_header()),
            tracer_provider=tracer_provider,
            exclude_spans=["receive", "send"],
        )
        rng = random.Random(7)
        traces = {f"req-{n}": (f"user-{n}", rng.getrandbits(128) or 1) for n in range(50)}
        with serve("uvicorn", app, lifespan="off") as url:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

                async def call(request_id: str) -> None:
                    user, trace_id = traces[request_id]
                    response = await client.get(
                        "/",
                        headers={
                            "x-user-id": user,
                            "x-request-id": request_id,
                            "traceparent": f"00-{trace_id:032x}-{1:016x}-01",
                        },
                    )
                    assert response.status_code == 200

                async with anyio.create_task_group() as tg:
                    for request_id in traces:
                        tg.start_soon(call, request_id)
        assert len(kept.records) == 100
        for record in kept.records:
            user, trace_id = traces[record.request_id]  # type: ignore[attr-defined]
            assert record.user_id == hash_id(user)  # type: ignore[attr-defined]
            assert record.trace_id == f"{trace_id:032x}"  # type: ignore[attr-defined]
            assert record.span_id != ""  # type: ignore[attr-defined]


class TestStructlog:
    def _logger(self, processor: Any = add_context) -> tuple[Any, LogCapture]:
        capture = LogCapture()
        log = structlog.wrap_logger(
            structlog.PrintLogger(),
            processors=[processor, capture],
            cache_logger_on_first_use=False,
        )
        return log, capture

    def test_outside_a_context(self) -> None:
        """Outside a context the processor adds empty fields."""
        log, capture = self._logger()
        log.info("hello")
        (entry,) = capture.entries
        assert {k: entry[k] for k in FIELDS} == dict.fromkeys(FIELDS, "")

    def test_inside_a_context_and_keys_given_are_kept(self) -> None:
        """Inside, the ids are added (user hashed); a key the call passes is kept."""
        log, capture = self._logger()
        context = UserExecutionContext.create("alice")
        with bind_context(context):
            log.info("hello", run_id="mine")
        (entry,) = capture.entries
        assert entry["user_id"] == hash_id("alice")
        assert entry["thread_id"] == context.thread_id
        assert entry["run_id"] == "mine"

    def test_the_processor_takes_the_filters_id_policies(self) -> None:
        """A ContextProcessor hashes under the key it is given, and follows the tenant's
        policy, as a ContextFilter with the same arguments does."""
        log, capture = self._logger(ContextProcessor(hash_key=b"k", tenant_id="omit"))
        with bind_context(UserExecutionContext.create("alice", tenant_id="acme")):
            log.info("hello")
        (entry,) = capture.entries
        assert (entry["user_id"], entry["tenant_id"]) == (hash_id("alice", b"k"), "")

    async def test_concurrent_users(self) -> None:
        """50 concurrent contexts: each event carries its own user."""
        log, capture = self._logger(ContextProcessor(user_id="raw"))

        async def request(n: int) -> None:
            with bind_context(UserExecutionContext.create(f"user-{n}", request_id=f"req-{n}")):
                for _ in range(2):
                    log.info("step")
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(request, n)
        assert len(capture.entries) == 100
        for entry in capture.entries:
            assert entry["user_id"] == "user-" + entry["request_id"].removeprefix("req-")

    def test_importing_the_module_does_not_import_structlog(self) -> None:
        """structlog stays optional: the integration never imports it."""
        code = (
            "import sys, ambient.integrations.logging\n"
            "print('structlog' in sys.modules, 'opentelemetry.sdk' in sys.modules)\n"
        )
        out = subprocess.run(  # noqa: S603 - our own interpreter, fixed code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.split() == ["False", "False"]


def test_the_public_names_exist() -> None:
    """__all__ of the integration names what it exports."""
    for name in ambient_logging.__all__:
        assert hasattr(ambient_logging, name)
    assert ambient.current_context_or_none() is None
