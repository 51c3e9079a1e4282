"""Per-request cost of a context (and components) per request, in-process, against the peers.

An in-process ASGI driver (no server, no sockets) calls each stack with a synthetic ``http``
scope carrying the identity header of one of 100 users, and checks every response: status
200 and a body that names the user the request was sent for, as the stack's own context (or
component) saw it; for the stacks with components, that every request's cleanup ran. A
broken stack fails the run instead of looking fast.

Sequential mode sends one request after another; concurrent mode runs 100 users at once,
each endpoint yielding to the event loop once mid-request, so every request is suspended
while the others run. Overhead is a stack's time per request minus the bare endpoint's in
the same round.

Variants (every peer gets its best case: a minimal pure ASGI middleware where the library
allows one, so that only the library's own work is measured):

* ``bare endpoint``: reads the identity header itself;
* ``floor``: a hand-written pure ASGI middleware that sets a ContextVar to a small frozen
  dataclass and resets it after the call;
* ``ambient``: ``AmbientMiddleware`` with ``trusted_header()``, no components (and with a
  plain header resolver, to tell the peer check apart);
* ``ambient + 3 components``: three REQUEST components, a chain (the last one a generator
  factory with a cleanup);
* ``starlette-context``: ``RawContextMiddleware`` with a plugin reading the header;
* ``asgi-correlation-id``: ``CorrelationIdMiddleware`` on the identity header;
* ``svcs``: a ``Container`` per request with the user as a local value and 3 factories;
* ``dishka``: a REQUEST-scope container per request, the user from context, 3 providers;
* ``BaseHTTPMiddleware``: Starlette's, setting the same ContextVar as the floor;
* ``otel-asgi``: ``OpenTelemetryMiddleware``, server span only, SDK ``TracerProvider`` with a
  ``BatchSpanProcessor`` exporting to nowhere;
* with ``ambient.telemetry``: ambient + 3 components with ``Telemetry()`` and no SDK, with
  full lifecycle tracing on the same SDK setup, and inside ``otel-asgi``;
* two bounds, not peers: ambient's per-request duties written by hand (identity header from
  a local peer only, checked user id, request id taken or generated and echoed, thread and
  run ids, a frozen context in a ContextVar), and ambient + 3 components with a minimal
  hand-written ``Observer`` making one SDK span per scope and one event per component:
  how close the middleware and tracing targets can come in Python at all;
* FastAPI (own table): a bare route, a ``Depends`` chain of 3 (the last a ``yield``
  dependency), and ambient's FastAPI integration resolving the same 3 components.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

# Imported once: an import statement in the endpoint would be billed to every request.
from ambient import get_current_context, resolve
from benchmarks import (
    Options,
    Report,
    Stat,
    Table,
    Target,
    interleave,
    median_interval,
    paired_difference,
    ratio_of_medians,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

USERS = tuple(f"user-{i:03d}" for i in range(100))
HEADER = b"x-user-id"

# Endpoints yield to the loop once per request in concurrent mode.
PAUSE = False

FLOOR = "floor (hand-written ContextVar middleware)"
DISHKA = "dishka, REQUEST scope, 3 providers"
SVCS = "svcs, 3 factories"
AMBIENT = "ambient"
AMBIENT3 = "ambient + 3 components"
NO_SDK = "ambient + 3 components + Telemetry(), no SDK"
AMBIENT_ASYNC_GEN = "ambient + 1 async generator component"
TRACED = "ambient + 3 components, full tracing (SDK)"
OTEL_ASGI = "otel-asgi, server span only (SDK)"
DUTIES = "hand-written middleware with ambient's duties"
MIN_SPAN = "ambient + 3 components, minimal hand-written span observer (SDK)"


class BrokenVariantError(AssertionError):
    """A stack answered wrongly: a wrong user, a wrong status, a cleanup that did not run."""


# -- the components every DI variant builds: a chain of three ------------------------------


@dataclass(frozen=True, slots=True)
class User:
    """The identity a middleware hands to a peer's container."""

    user_id: str


class Dispatcher:
    """Built from the request's user."""

    __slots__ = ("user_id",)

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


class Engine:
    """Depends on the dispatcher."""

    __slots__ = ("dispatcher",)

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher


class _SessionCounts:
    """Sessions opened and cleaned, in every stack: kept on an instance, as a write to a
    class attribute empties CPython's lookup cache for that class on every request."""

    __slots__ = ("cleaned", "opened")

    def __init__(self) -> None:
        self.opened = 0
        self.cleaned = 0


SESSIONS = _SessionCounts()


class Session:
    """Depends on the engine; its factory is a generator whose cleanup closes it."""

    __slots__ = ("closed", "engine")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.closed = False
        SESSIONS.opened += 1

    def close(self) -> None:
        self.closed = True
        SESSIONS.cleaned += 1


def _header_user(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == HEADER:
            return str(value.decode("latin-1"))
    msg = "no identity header"
    raise BrokenVariantError(msg)


async def _respond(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _components_body(
    session: Session, engine: Engine, dispatcher: Dispatcher, send: Send
) -> None:
    if engine is not session.engine or dispatcher is not engine.dispatcher:
        msg = "one request saw two instances of a component"
        raise BrokenVariantError(msg)
    await _respond(send, dispatcher.user_id.encode())


# -- bare endpoint and the floor ------------------------------------------------------------


async def bare_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the identity header it reads itself."""
    if PAUSE:
        await asyncio.sleep(0)
    for name, value in scope["headers"]:
        if name == HEADER:
            await _respond(send, value)
            return


@dataclass(frozen=True, slots=True)
class FloorContext:
    """The floor's context: what a hand-written middleware would keep."""

    user_id: str


floor_var: ContextVar[FloorContext | None] = ContextVar("bench.floor", default=None)


class FloorMiddleware:
    """The floor: a pure ASGI middleware setting a ContextVar, reset after the call."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = floor_var.set(FloorContext(_header_user(scope)))
        try:
            await self.app(scope, receive, send)
        finally:
            floor_var.reset(token)


def _answers_from(var: ContextVar[Any], label: str) -> App:
    """An endpoint answering with the user of the context in ``var``."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if PAUSE:
            await asyncio.sleep(0)
        ctx = var.get()
        if ctx is None:
            msg = f"no {label} context"
            raise BrokenVariantError(msg)
        await _respond(send, ctx.user_id.encode())

    return endpoint


floor_endpoint = _answers_from(floor_var, "floor")


# -- a bound: ambient's per-request duties, written by hand -------------------------------


@dataclass(frozen=True, slots=True)
class DutiesContext:
    """The ids ambient's context holds, as a hand-written middleware would keep them."""

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    tenant_id: str | None = None
    connection_id: str | None = None
    parent_run_id: str | None = None
    depth: int = 0


duties_var: ContextVar[DutiesContext | None] = ContextVar("bench.duties", default=None)
_LOCAL_PEERS = frozenset({"127.0.0.1", "::1"})
_REQUEST_ID_HEADER = b"x-request-id"


async def _answer(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class DutiesMiddleware:
    """What ambient's middleware does per request, minus components, by hand: a bound on
    how cheap its duties can be in Python, not a peer.

    Honours the identity header only from a local peer and only when sent once, checks the
    user id (1-256 printable characters, no whitespace at either end), takes a valid
    request id or generates one (echoed on the response), generates the thread and run
    ids, binds a frozen context and resets it after the call.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_user: bytes | None = None
        raw_request_id: bytes | None = None
        for name, value in scope["headers"]:
            lowered = name.lower()
            if lowered == HEADER:
                if raw_user is not None:
                    await _answer(send, 400)
                    return
                raw_user = value
            elif lowered == _REQUEST_ID_HEADER:
                raw_request_id = value
        client = scope.get("client")
        if raw_user is None or not client or client[0] not in _LOCAL_PEERS:
            await _answer(send, 401)
            return
        try:
            user_id = raw_user.decode("utf-8")
        except UnicodeDecodeError:
            user_id = ""
        if (
            not user_id
            or len(user_id) > 256
            or not user_id.isprintable()
            or user_id[0].isspace()
            or user_id[-1].isspace()
        ):
            await _answer(send, 400)
            return
        ids = random.getrandbits(384).to_bytes(48, "big").hex()
        request_id = ids[64:]
        if raw_request_id is not None and 0 < len(raw_request_id) <= 128:
            candidate = raw_request_id.decode("latin-1")
            if candidate.isascii() and candidate.isprintable() and " " not in candidate:
                request_id = candidate
        echo = (_REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        token = duties_var.set(DutiesContext(user_id, ids[:32], ids[32:64], request_id))
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duties_var.reset(token)


duties_endpoint = _answers_from(duties_var, "duties")


# -- ambient -----------------------------------------------------------------------------


def ambient_registry(*, components: bool, telemetry: Any = None) -> Any:
    """A registry with the three-component chain (or nothing)."""
    import ambient

    registry = ambient.Registry(telemetry=telemetry)
    if components:

        def dispatcher(ctx: ambient.UserExecutionContext) -> Dispatcher:
            return Dispatcher(ctx.user_id)

        def engine() -> Engine:
            return Engine(ambient.resolve_sync(Dispatcher))

        def session() -> Iterator[Session]:
            created = Session(ambient.resolve_sync(Engine))
            yield created
            created.close()

        registry.register(Dispatcher, dispatcher)
        registry.register(Engine, engine)
        registry.register(Session, session)
    return registry


def ambient_async_gen_app() -> App:
    """``AmbientMiddleware`` with one REQUEST component made by an async generator factory
    (a connection per request, the usual shape): its cleanup is async, so the scope closes
    through its awaiting path."""
    import ambient

    registry = ambient.Registry()

    async def session() -> AsyncIterator[Session]:
        created = Session(Engine(Dispatcher(get_current_context().user_id)))
        yield created
        created.close()

    registry.register(Session, session)

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        made = await resolve(Session)
        if PAUSE:
            await asyncio.sleep(0)
        await _respond(send, made.engine.dispatcher.user_id.encode())

    return ambient_app(endpoint, components=False, registry=registry)


async def ambient_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the user of ``get_current_context()``."""
    if PAUSE:
        await asyncio.sleep(0)
    await _respond(send, get_current_context().user_id.encode())


async def ambient_components_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Resolves the three components and answers with the dispatcher's user."""
    session = await resolve(Session)
    engine = await resolve(Engine)
    dispatcher = await resolve(Dispatcher)
    if PAUSE:
        await asyncio.sleep(0)
    await _components_body(session, engine, dispatcher, send)


def ambient_app(
    endpoint: App,
    *,
    components: bool,
    identity: Any = None,
    telemetry: Any = None,
    registry: Any = None,
) -> App:
    """``AmbientMiddleware`` around ``endpoint`` (``trusted_header()`` unless given)."""
    from ambient.middleware import AmbientMiddleware, trusted_header

    if registry is None:
        registry = ambient_registry(components=components, telemetry=telemetry)
    return AmbientMiddleware(
        endpoint,
        registry=registry,
        identity=identity if identity is not None else trusted_header("x-user-id"),
    )


def plain_header_identity(scope: Scope) -> Any:
    """An identity resolver that trusts the header from anyone (no peer check)."""
    from ambient.middleware import Identity

    return Identity(_header_user(scope))


# -- peers -------------------------------------------------------------------------------


def starlette_context_app() -> App:
    """``RawContextMiddleware`` with a plugin that reads the identity header."""
    from starlette_context import context
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import Plugin

    class UserPlugin(Plugin):
        key = "x-user-id"

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if PAUSE:
            await asyncio.sleep(0)
        await _respond(send, context["x-user-id"].encode())

    return RawContextMiddleware(endpoint, plugins=(UserPlugin(),))  # type: ignore[arg-type]


def correlation_id_app(inner: App | None = None) -> App:
    """``CorrelationIdMiddleware`` whose "correlation id" is the identity header."""
    from asgi_correlation_id import CorrelationIdMiddleware, correlation_id

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if PAUSE:
            await asyncio.sleep(0)
        value = correlation_id.get()
        if value is None:
            msg = "no correlation id"
            raise BrokenVariantError(msg)
        await _respond(send, value.encode())

    return CorrelationIdMiddleware(  # type: ignore[return-value]
        endpoint if inner is None else inner,  # type: ignore[arg-type]
        header_name="X-User-Id",
        validator=None,
        update_request_header=False,
    )


def svcs_registry() -> Any:
    """An svcs registry with the three-factory chain (the user is a per-container value)."""
    import svcs

    registry = svcs.Registry()

    def dispatcher(svcs_container: svcs.Container) -> Dispatcher:
        return Dispatcher(svcs_container.get(User).user_id)

    def engine(svcs_container: svcs.Container) -> Engine:
        return Engine(svcs_container.get(Dispatcher))

    def session(svcs_container: svcs.Container) -> Iterator[Session]:
        created = Session(svcs_container.get(Engine))
        yield created
        created.close()

    registry.register_factory(Dispatcher, dispatcher)
    registry.register_factory(Engine, engine)
    registry.register_factory(Session, session)
    return registry


def svcs_app() -> App:
    """A container per request, the user registered as a local value."""
    import svcs

    registry = svcs_registry()

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        container: svcs.Container = scope["svcs"]
        session, engine, dispatcher = await container.aget(Session, Engine, Dispatcher)
        if PAUSE:
            await asyncio.sleep(0)
        await _components_body(session, engine, dispatcher, send)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with svcs.Container(registry) as container:
            container.register_local_value(User, User(_header_user(scope)))
            scope["svcs"] = container
            await endpoint(scope, receive, send)

    return app


def dishka_container() -> Any:
    """A dishka APP container with the user from context and the three-provider chain."""
    from dishka import Provider, from_context, make_async_container, provide
    from dishka import Scope as DishkaScope

    class Components(Provider):
        scope = DishkaScope.REQUEST
        user = from_context(provides=User, scope=DishkaScope.REQUEST)

        @provide
        def dispatcher(self, user: User) -> Dispatcher:
            return Dispatcher(user.user_id)

        @provide
        def engine(self, dispatcher: Dispatcher) -> Engine:
            return Engine(dispatcher)

        @provide
        def session(self, engine: Engine) -> Iterator[Session]:
            created = Session(engine)
            yield created
            created.close()

    return make_async_container(Components())


def dishka_app() -> App:
    """A REQUEST-scope container per request, entered with the user as context."""
    container = dishka_container()

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        request_container = scope["dishka"]
        session = await request_container.get(Session)
        engine = await request_container.get(Engine)
        dispatcher = await request_container.get(Dispatcher)
        if PAUSE:
            await asyncio.sleep(0)
        await _components_body(session, engine, dispatcher, send)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with container(context={User: User(_header_user(scope))}) as request_container:
            scope["dishka"] = request_container
            await endpoint(scope, receive, send)

    return app


def base_http_middleware_app() -> App:
    """Starlette's ``BaseHTTPMiddleware`` setting the floor's ContextVar."""
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import Response

    class ContextMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            token = floor_var.set(FloorContext(_header_user(request.scope)))
            try:
                return await call_next(request)
            finally:
                floor_var.reset(token)

    return ContextMiddleware(floor_endpoint)  # type: ignore[arg-type]


@dataclass
class Tracing:
    """An SDK tracer provider with a batch processor whose exporter drops everything."""

    provider: Any
    exported: Callable[[], int]

    @classmethod
    def create(cls) -> Tracing:
        """A fresh provider (never installed globally: the no-SDK variants stay no-SDK)."""
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        count = [0]

        class Drop(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                count[0] += len(spans)
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        return cls(provider, lambda: count[0])


def minimal_span_observer(tracing: Tracing) -> Any:
    """A bound for full tracing, not a feature: an ambient ``Observer`` that only makes one
    SDK span per scope (with the context's ids, made current) and one event per component
    created and cleaned up. None of ``Telemetry``'s guarantees: no error handling, no
    baggage, no metrics, no spans for slow or failed components, no out-of-order restore.
    """
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import Event

    import ambient

    tracer = tracing.provider.get_tracer("benchmarks.minimal")

    class MinimalSpans(ambient.Observer):
        def scope_opened(self, scope: Any) -> None:
            ctx = scope.context
            previous = otel_context.get_current()
            span = tracer.start_span(
                "ambient.scope",
                previous,
                trace.SpanKind.INTERNAL,
                {
                    "ambient.thread_id": ctx.thread_id,
                    "ambient.run_id": ctx.run_id,
                    "ambient.request_id": ctx.request_id,
                    "ambient.user_id": ctx.user_id,
                },
            )
            scope.state[self] = (span, previous, [])
            otel_context.attach(trace.set_span_in_context(span, previous))

        def scope_closed(self, scope: Any, failures: tuple[BaseException, ...]) -> None:
            span, previous, events = scope.state.pop(self)
            otel_context.attach(previous)
            # The same shortcut as Telemetry: ready events, no per-event lock.
            span._events.extend(events)
            span.set_attribute("ambient.components.created", scope.components_created)
            span.set_attribute("ambient.cleanup.failures", len(failures))
            span.end()

        def component_created(self, event: Any) -> None:
            self._event("ambient.resolve", event)

        def component_cleaned(self, event: Any) -> None:
            if event.cleanup_ran:
                self._event("ambient.cleanup", event)

        def _event(self, name: str, event: Any) -> None:
            attributes = {"ambient.component": event.name, "ambient.duration": event.duration}
            event.scope.state[self][2].append(Event(name, attributes, event.start_ns))

    return MinimalSpans()


def otel_asgi_app(inner: App, tracing: Tracing) -> App:
    """``OpenTelemetryMiddleware``: the server span only (no per-message spans)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(  # type: ignore[no-any-return]
        inner, tracer_provider=tracing.provider, exclude_spans=["receive", "send"]
    )


# -- the driver --------------------------------------------------------------------------

_TEMPLATE_HEADERS = ((b"host", b"bench"), (b"user-agent", b"bench/1"), (b"accept", b"*/*"))
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}


def http_scope(user: str) -> Scope:
    """A fresh ``http`` scope for ``GET /work`` from 127.0.0.1 carrying ``user``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/work",
        "raw_path": b"/work",
        "query_string": b"",
        "root_path": "",
        "headers": [*_TEMPLATE_HEADERS, (HEADER, user.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


class _Exchange:
    """One request's receive and send, recording what the app answered."""

    __slots__ = ("body", "received", "status")

    def __init__(self) -> None:
        self.received = False
        self.status = 0
        self.body = b""

    async def receive(self) -> Message:
        if self.received:
            return _DISCONNECT
        self.received = True
        return _REQUEST

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.body += message.get("body", b"")


async def _serve(app: App, user: str, expected: bytes) -> None:
    exchange = _Exchange()
    await app(http_scope(user), exchange.receive, exchange.send)
    if exchange.status != 200 or exchange.body != expected:
        msg = (
            f"request for {user!r} answered {exchange.status} {exchange.body[:80]!r}; "
            f"expected 200 {expected!r}"
        )
        raise BrokenVariantError(msg)


async def sequential(app: App, n: int) -> float:
    """Seconds per request for ``n`` requests one after another, users in turn."""
    users = USERS
    expected = [u.encode() for u in users]
    count = len(users)
    started = time.perf_counter()
    for i in range(n):
        j = i % count
        await _serve(app, users[j], expected[j])
    return (time.perf_counter() - started) / n


async def concurrent(app: App, n: int) -> float:
    """Seconds per request for ``n`` requests from 100 users at once (n/100 each)."""
    per_user = max(1, n // len(USERS))

    async def user_loop(user: str) -> None:
        expected = user.encode()
        for _ in range(per_user):
            await _serve(app, user, expected)

    started = time.perf_counter()
    await asyncio.gather(*(user_loop(u) for u in USERS))
    return (time.perf_counter() - started) / (per_user * len(USERS))


@dataclass
class Variant:
    """A stack to measure; ``cleanups`` says each request must close one ``Session``."""

    name: str
    app: App
    cleanups: bool = False


def chunk(variant: Variant, n: int, *, concurrent_mode: bool) -> Callable[[], Awaitable[float]]:
    """A timed chunk of ``n`` requests through ``variant``, checked afterwards."""

    async def run() -> float:
        global PAUSE
        PAUSE = concurrent_mode
        opened, cleaned = SESSIONS.opened, SESSIONS.cleaned
        try:
            if concurrent_mode:
                seconds = await concurrent(variant.app, n)
            else:
                seconds = await sequential(variant.app, n)
        finally:
            PAUSE = False
        if variant.cleanups:
            done = max(1, n // len(USERS)) * len(USERS) if concurrent_mode else n
            if SESSIONS.opened - opened != done or SESSIONS.cleaned - cleaned != done:
                msg = (
                    f"{variant.name}: {SESSIONS.opened - opened} sessions opened and "
                    f"{SESSIONS.cleaned - cleaned} cleaned for {done} requests"
                )
                raise BrokenVariantError(msg)
        return seconds

    return run


# -- the section -------------------------------------------------------------------------


def _telemetry_variants(report: Report, tracing: Tracing) -> list[Variant]:
    try:
        from ambient.telemetry import Telemetry
    except ImportError as exc:
        report.unavailable("ambient tracing variants", f"ambient.telemetry: {exc}")
        return []
    no_sdk = Telemetry()
    traced = Telemetry(tracer_provider=tracing.provider)
    return [
        Variant(
            NO_SDK,
            ambient_app(ambient_components_endpoint, components=True, telemetry=no_sdk),
            cleanups=True,
        ),
        Variant(
            TRACED,
            ambient_app(ambient_components_endpoint, components=True, telemetry=traced),
            cleanups=True,
        ),
        Variant(
            MIN_SPAN,
            ambient_app(
                ambient_components_endpoint,
                components=True,
                telemetry=minimal_span_observer(tracing),
            ),
            cleanups=True,
        ),
        Variant(
            "otel-asgi around ambient + 3, full tracing",
            otel_asgi_app(
                ambient_app(ambient_components_endpoint, components=True, telemetry=traced),
                tracing,
            ),
            cleanups=True,
        ),
    ]


def variants(report: Report, tracing: Tracing) -> list[Variant]:
    """Every stack of the main table."""
    return [
        Variant("bare endpoint", bare_endpoint),
        Variant(FLOOR, FloorMiddleware(floor_endpoint)),
        Variant(AMBIENT, ambient_app(ambient_endpoint, components=False)),
        Variant(
            "ambient, header resolver without peer check",
            ambient_app(ambient_endpoint, components=False, identity=plain_header_identity),
        ),
        Variant(DUTIES, DutiesMiddleware(duties_endpoint)),
        Variant(
            AMBIENT3,
            ambient_app(ambient_components_endpoint, components=True),
            cleanups=True,
        ),
        Variant("starlette-context RawContextMiddleware", starlette_context_app()),
        Variant("asgi-correlation-id", correlation_id_app()),
        Variant(SVCS, svcs_app(), cleanups=True),
        Variant(DISHKA, dishka_app(), cleanups=True),
        Variant("Starlette BaseHTTPMiddleware", base_http_middleware_app()),
        Variant(OTEL_ASGI, otel_asgi_app(bare_endpoint, tracing)),
        *_telemetry_variants(report, tracing),
    ]


async def measure(
    stacks: list[Variant], n: int, rounds: int, *, concurrent_mode: bool
) -> dict[str, list[float]]:
    """Interleaved seconds per request of every stack."""
    chunks = {v.name: chunk(v, n, concurrent_mode=concurrent_mode) for v in stacks}
    return await interleave(chunks, rounds)


CI = "90% CI"


def overhead_table(
    title: str,
    results: dict[str, list[float]],
    base: str,
    reference: str,
    reference_label: str,
) -> tuple[Table, dict[str, list[float]]]:
    """Per-request time, overhead above ``base`` and its ratio to ``reference``'s overhead."""
    table = Table(
        title,
        ["stack", "us/request", "overhead us", f"x {reference_label} overhead ({CI})"],
    )
    overheads = {name: paired_difference(values, results[base]) for name, values in results.items()}
    for name, values in results.items():
        per_request = Stat.of(values).scaled(1e6).fmt(2)
        if name == base:
            table.add(name, per_request, "-", "-")
            continue
        overhead = Stat.of(overheads[name]).scaled(1e6).fmt(2)
        ratio = ratio_of(overheads, name, reference).fmt(2)
        table.add(name, per_request, overhead, ratio if name != reference else "1")
    table.notes.append(
        "us/request and overhead: median over interleaved blocks (min-max); overhead = stack "
        "minus the bare endpoint in the same block round; ratio = ratio of median overheads "
        "(90% bootstrap interval)"
    )
    return table, overheads


def ratio_of(overheads: dict[str, list[float]], name: str, reference: str) -> Stat:
    """Ratio of the median overheads of ``name`` and ``reference``, with its interval."""
    return ratio_of_medians(overheads[name], overheads[reference])


async def run(report: Report, options: Options) -> None:
    """The ASGI section: sequential and concurrent tables, and how overhead scales."""
    tracing = Tracing.create()
    # Short blocks, many rounds: each block is paired with the bare endpoint's block of the
    # same round, close in time, which keeps a busy machine's drift out of the differences.
    n = options.size(500, 200)
    blocks = options.rounds * 4
    stacks = variants(report, tracing)
    per_mode: dict[str, dict[str, list[float]]] = {}
    for mode in ("sequential", "concurrent"):
        results = await measure(stacks, n, blocks, concurrent_mode=mode == "concurrent")
        users = "100 users at once" if mode == "concurrent" else "one request at a time"
        table, overheads = overhead_table(
            f"In-process ASGI, {mode} ({users}; {blocks} blocks of {n} requests per stack)",
            results,
            "bare endpoint",
            FLOOR,
            "floor",
        )
        table.notes.append(
            "ambient + 3 components vs dishka's overhead: "
            + ratio_of(overheads, AMBIENT3, DISHKA).fmt(2, "x")
            + "; vs svcs's: "
            + ratio_of(overheads, AMBIENT3, SVCS).fmt(2, "x")
        )
        report.table(table)
        per_mode[mode] = overheads
        report.target(
            Target(
                f"ambient middleware alone vs the floor's overhead ({mode})",
                ratio_of(overheads, AMBIENT, FLOOR),
                2.5,
                interval=CI,
            )
        )
        report.target(
            Target(
                f"ambient middleware alone vs its duties written by hand ({mode}, bound)",
                ratio_of(overheads, AMBIENT, DUTIES),
                float("inf"),
                interval=CI,
            )
        )
        report.target(
            Target(
                f"ambient's duties written by hand vs the floor's overhead ({mode}, bound)",
                ratio_of(overheads, DUTIES, FLOOR),
                float("inf"),
                interval=CI,
            )
        )
        report.target(
            Target(
                f"ambient + 3 components vs dishka's overhead ({mode})",
                ratio_of(overheads, AMBIENT3, DISHKA),
                0.5,
                interval=CI,
            )
        )
        if NO_SDK in overheads:
            _telemetry_targets(report, overheads, mode)
    seq, conc = per_mode["sequential"], per_mode["concurrent"]
    scaling = Table(
        "Concurrent-mode overhead vs sequential (same stack, same run)",
        ["stack", "sequential us", "concurrent us", f"concurrent / sequential ({CI})"],
    )
    for name in seq:
        if name == "bare endpoint":
            continue
        s, c = Stat.of(seq[name]).median * 1e6, Stat.of(conc[name]).median * 1e6
        scaling.add(name, f"{s:.2f}", f"{c:.2f}", ratio_of_medians(conc[name], seq[name]).fmt(2))
    report.table(scaling)
    report.target(
        Target(
            "ambient + 3 components, concurrent overhead vs sequential (informative)",
            ratio_of_medians(conc[AMBIENT3], seq[AMBIENT3]),
            float("inf"),
            interval=CI,
        )
    )
    print(f"spans exported by the dropping exporter: {tracing.exported()}\n")
    tracing.provider.shutdown()


def _telemetry_targets(report: Report, overheads: dict[str, list[float]], mode: str) -> None:
    untraced = overheads[AMBIENT3]
    no_sdk = paired_difference(overheads[NO_SDK], untraced)
    report.target(
        Target(
            f"Telemetry() with no SDK, added per request ({mode})",
            median_interval(no_sdk).scaled(1e6),
            0.5,
            unit=" us",
            interval=CI,
        )
    )
    traced = overheads[TRACED]
    report.target(
        Target(
            f"full tracing added to ambient + 3 vs otel-asgi's server-span overhead ({mode})",
            ratio_of_medians(paired_difference(traced, untraced), overheads[OTEL_ASGI]),
            0.5,
            interval=CI,
        )
    )
    if MIN_SPAN in overheads:
        minimal = paired_difference(overheads[MIN_SPAN], untraced)
        report.target(
            Target(
                f"minimal span observer added to ambient + 3 vs otel-asgi's ({mode}, bound)",
                ratio_of_medians(minimal, overheads[OTEL_ASGI]),
                float("inf"),
                interval=CI,
            )
        )
    report.target(
        Target(
            f"ambient + 3 + full tracing, whole overhead vs otel-asgi's ({mode})",
            ratio_of(overheads, TRACED, OTEL_ASGI),
            float("inf"),
            interval=CI,
        )
    )
