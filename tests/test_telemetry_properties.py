"""Telemetry properties: generated request shapes (several users and tenants at once,
components of every lifetime and factory kind, failing or not, bodies that end, raise or are
cancelled, nested scopes, websockets, an outer server span or none) are driven through real
registries, scopes and AmbientMiddleware against the real OpenTelemetry SDK, and what was
recorded is compared with a model of what happened."""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode

import ambient
from ambient import Lifetime, Registry, UserExecutionContext
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.telemetry import BAGGAGE_FIELDS, Telemetry, hash_id
from tests.test_identity import http_scope
from tests.test_middleware import drive, ws_scope
from tests.test_telemetry import Otel, parent_id

KINDS = ("plain", "sync", "async", "gen", "agen", "cm", "acm")
"""Factory kinds: a result with no cleanup, a class with ``close()``, an ``async def``
whose result has ``aclose()``, a generator, an async generator, a context manager and an
async context manager."""

YIELDING = ("gen", "agen", "cm", "acm")
"""Kinds whose cleanup is the code after a ``yield``, where what ended the scope is thrown
in."""
LIFETIMES = {"request": Lifetime.REQUEST, "user": Lifetime.USER, "app": Lifetime.APP}
USERS = ("user-0", "user-1", "user-2")
TENANTS = (None, "tenant-0", "tenant-1")
NEVER = 1e9  # a span threshold no component reaches: only failures become spans


class CreationFailedError(Exception):
    """A factory that raised."""


class CleanupFailedError(Exception):
    """A cleanup that raised."""


class BodyFailedError(Exception):
    """A request body that raised."""


@dataclass(frozen=True)
class Component:
    """A registration: its lifetime and factory kind, and whether making or cleaning it
    fails."""

    name: str
    lifetime: str
    kind: str
    fails_creation: bool
    fails_cleanup: bool
    # Async kinds only: every resolution is cancelled while the factory runs.
    cut: bool = False

    @property
    def cleans(self) -> bool:
        """Whether it has a cleanup to run (and so to time and trace)."""
        return self.kind != "plain"


class Closing:
    """A component closed by ``close()``, which fails when told to."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    def close(self) -> None:
        if self.fails:
            raise CleanupFailedError


class AsyncClosing(Closing):
    """A component closed by ``aclose()``, which fails when told to."""

    async def aclose(self) -> None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        if self.fails:
            raise CleanupFailedError


def factory(component: Component) -> Callable[[], Any]:
    """A zero-argument factory of ``component``'s kind that fails where it says."""
    fails_creation, fails_cleanup = component.fails_creation, component.fails_cleanup

    def creation() -> None:
        if fails_creation:
            raise CreationFailedError

    if component.kind == "plain":

        def plain() -> object:
            creation()
            return object()

        return plain
    if component.kind == "sync":

        def sync() -> Closing:
            creation()
            return Closing(fails_cleanup)

        return sync
    if component.kind == "async":

        async def made() -> AsyncClosing:
            await anyio.lowlevel.checkpoint()
            creation()
            return AsyncClosing(fails_cleanup)

        return made
    if component.kind in ("gen", "cm"):

        def generator() -> Iterator[object]:
            creation()
            yield object()
            if fails_cleanup:
                raise CleanupFailedError

        return generator if component.kind == "gen" else contextlib.contextmanager(generator)

    async def agenerator() -> AsyncIterator[object]:
        await anyio.lowlevel.checkpoint()
        creation()
        yield object()
        await anyio.lowlevel.checkpoint()
        if fails_cleanup:
            raise CleanupFailedError

    return agenerator if component.kind == "agen" else contextlib.asynccontextmanager(agenerator)


@dataclass(frozen=True)
class Request:
    """One request: whose, what it resolves (and a nested scope of it), how it ends."""

    user: str
    tenant: str | None
    resolves: tuple[int, ...]
    nested: tuple[int, ...] | None  # what a nested scope of a child context resolves
    ending: str  # "ok", "raise" or "cancel"
    websocket: bool = False
    # Started by the previous request's app, inside its scope's context (as a server starts
    # a pipelined request inside the previous one's), not by the test.
    chained: bool = False
    # Its server span sampled out (there is one): none of its spans are exported.
    dropped: bool = False


@dataclass
class Seen:
    """What a request's body saw from inside its scopes."""

    ids: dict[int, dict[str, Any]] = field(default_factory=dict)  # depth -> ids bound
    baggage: dict[int, dict[str, object]] = field(default_factory=dict)


components_ = st.lists(
    st.builds(
        Component,
        name=st.just(""),
        lifetime=st.sampled_from(tuple(LIFETIMES)),
        kind=st.sampled_from(KINDS),
        fails_creation=st.booleans(),
        fails_cleanup=st.booleans(),
        cut=st.booleans(),
    ),
    min_size=1,
    max_size=5,
).map(
    lambda found: [
        Component(
            f"c{i}",
            c.lifetime,
            c.kind,
            c.fails_creation,
            c.fails_cleanup,
            c.cut and c.kind in ("async", "agen", "acm"),
        )
        for i, c in enumerate(found)
    ]
)


def requests_(count: int, websockets: bool) -> st.SearchStrategy[list[Request]]:
    """Requests over ``count`` components; websockets and pipelined ones for the
    middleware."""
    picks = st.lists(st.integers(0, count - 1), max_size=4, unique=True).map(tuple)
    return st.lists(
        st.builds(
            Request,
            user=st.sampled_from(USERS),
            tenant=st.sampled_from(TENANTS),
            resolves=picks,
            nested=st.none() | picks,
            ending=st.sampled_from(("ok", "raise", "cancel")),
            websocket=st.booleans() if websockets else st.just(False),
            chained=st.booleans() if websockets else st.just(False),
            dropped=st.booleans(),
        ),
        min_size=1,
        max_size=5,
    )


@st.composite
def telemetry_options(draw: st.DrawFn) -> dict[str, Any]:
    """``Telemetry`` keyword arguments: id policies, a key, a threshold every component
    reaches or none does, baggage fields that the policies allow."""
    user_id = draw(st.sampled_from(("hash", "raw", "omit")))
    tenant_id = draw(st.sampled_from(("hash", "raw", "omit")))
    allowed = sorted(
        f
        for f in BAGGAGE_FIELDS
        if not (f == "user_id" and user_id == "omit")
        and not (f == "tenant_id" and tenant_id == "omit")
    )
    return {
        "user_id": user_id,
        "tenant_id": tenant_id,
        "hash_key": draw(st.sampled_from((None, b"k1", "another key"))),
        "span_threshold": draw(st.sampled_from((0.0, NEVER))),
        "baggage": tuple(draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True))),
    }


# -- the model -----------------------------------------------------------------------------


@dataclass
class Expected:
    """What the telemetry must have recorded, by scope (its request index and depth)."""

    # (request, depth) -> Counter of (op, component, lifetime, failed)
    operations: dict[tuple[int, int], Counter[tuple[str, str, str, bool]]] = field(
        default_factory=dict
    )
    created: dict[tuple[int, int], int] = field(default_factory=dict)
    cleanup_failures: dict[tuple[int, int], int] = field(default_factory=dict)
    # cleanups at shutdown: Counter of (component, lifetime, failed, user, tenant)
    unscoped: Counter[tuple[str, str, bool, str | None, str | None]] = field(
        default_factory=Counter
    )
    attempts: Counter[str] = field(default_factory=Counter)  # creations, by component
    cleanups: Counter[str] = field(default_factory=Counter)  # cleanups run, by component
    failures: Counter[str] = field(default_factory=Counter)  # cleanups failed, by component
    live_users: int = 0  # USER components alive before shutdown


def model(
    components: list[Component], requests: list[Request], nested_traced: bool, expire: bool
) -> Expected:
    """Replay the requests in the order the test runs their resolutions. A nested scope
    that is not traced (a telemetry given to the middleware alone) records nothing, but the
    USER and APP components it made are seen cleaned at shutdown. With ``expire``, a
    user's components expire as soon as no open scope holds them: a scope holds its user's
    from its first USER resolution on (an open scope that has resolved none does not)."""
    expected = Expected()
    cached: set[tuple[str, object]] = set()  # (component, owner) of USER and APP ones
    shared: list[tuple[Component, Request | None]] = []  # made once, cleaned at shutdown
    holders: dict[tuple[str, str | None], set[tuple[int, int]]] = {}  # user -> scopes

    def run(index: int, depth: int, request: Request, picks: tuple[int, ...]) -> None:
        traced = depth == 0 or nested_traced
        # Cleanups see what ended the scope, thrown in at a generator's `yield` (the code
        # after it does not run) as contextlib's managers see it: re-raised, no failure.
        thrown = depth == 0 and request.ending != "ok"
        ops: Counter[tuple[str, str, str, bool]] = Counter()
        created = failures = 0
        made: list[Component] = []
        for pick in picks:
            component = components[pick]
            owner: object = (request.user, request.tenant) if component.lifetime == "user" else None
            if component.lifetime == "user":
                holders.setdefault((request.user, request.tenant), set()).add((index, depth))
            if component.lifetime != "request" and (component.name, owner) in cached:
                continue
            if traced:
                expected.attempts[component.name] += 1
            if component.cut:  # no error of its own: a span marked cancelled
                ops["resolve-cancelled", component.name, component.lifetime, False] += 1
                continue
            ops["resolve", component.name, component.lifetime, component.fails_creation] += 1
            if component.fails_creation:
                continue
            created += 1
            if component.lifetime == "request":
                made.append(component)
            else:
                cached.add((component.name, owner))
                shared.append((component, request if component.lifetime == "user" else None))
                if component.lifetime == "user" and traced:
                    expected.live_users += 1
        for component in made:
            if component.cleans:
                fails = component.fails_cleanup and not (thrown and component.kind in YIELDING)
                ops["cleanup", component.name, "request", fails] += 1
                if traced:
                    expected.cleanups[component.name] += 1
                if fails:
                    failures += 1
                    if traced:
                        expected.failures[component.name] += 1
        user = (request.user, request.tenant)
        if depth == 1 and expire and (index, depth) in holders.get(user, set()):
            holders[user].discard((index, depth))
            if not holders[user]:  # expired at once: made again when resolved again
                for name, owner in list(cached):
                    if owner == user:
                        cached.discard((name, owner))
        if traced:
            expected.operations[index, depth] = ops
            expected.created[index, depth] = created
            expected.cleanup_failures[index, depth] = failures

    for index, request in enumerate(requests):
        run(index, 0, request, request.resolves)
        if request.nested is not None:
            run(index, 1, request, request.nested)
    for component, owner in shared:
        if component.cleans:
            expected.cleanups[component.name] += 1
            if component.fails_cleanup:
                expected.failures[component.name] += 1
            user = None if owner is None else owner.user
            tenant = None if owner is None else owner.tenant
            key = (component.name, component.lifetime, component.fails_cleanup, user, tenant)
            expected.unscoped[key] += 1
    return expected


# -- driving -------------------------------------------------------------------------------


class Turns:
    """Every request opens its scope first; then each, in order, resolves; then all end at
    once. Ordered by events, so that which scope creates a shared component is known."""

    def __init__(self, count: int) -> None:
        self.opened = 0
        self.all_open = anyio.Event()
        self.turns = [anyio.Event() for _ in range(count + 1)]
        self.count = count

    def open(self) -> None:
        self.opened += 1
        if self.opened == self.count:
            self.all_open.set()

    async def mine(self, index: int) -> None:
        await self.turns[index].wait()

    def done(self, index: int) -> None:
        self.turns[index + 1].set()

    async def ending(self) -> None:
        await self.turns[self.count].wait()


async def body(
    registry: Registry,
    components: list[Component],
    request: Request,
    index: int,
    turns: Turns,
    seen: Seen,
    cancel: anyio.CancelScope,
) -> None:
    """What runs in a request's scope: its resolutions in turn (and a nested scope's), then
    its ending, when every request has had its turn."""
    seen.ids[0] = ids_of(ambient.get_current_context())
    seen.baggage[0] = dict(baggage.get_all())
    turns.open()
    await turns.mine(index)
    await resolve_each(components, request.resolves)
    if request.nested is not None:
        child = ambient.get_current_context().child("tool")
        with contextlib.suppress(ambient.CleanupError):
            async with registry.open_scope(child):
                seen.ids[1] = ids_of(ambient.get_current_context())
                seen.baggage[1] = dict(baggage.get_all())
                await resolve_each(components, request.nested)
    turns.done(index)
    await turns.ending()
    if request.ending == "raise":
        raise BodyFailedError
    if request.ending == "cancel":
        cancel.cancel()
        await anyio.lowlevel.checkpoint()


async def resolve_each(components: list[Component], picks: tuple[int, ...]) -> None:
    """Resolve each pick, as a body that goes on when a factory fails would."""
    for pick in picks:
        component = components[pick]
        with contextlib.suppress(CreationFailedError), anyio.CancelScope() as cut:
            if component.cut:
                cut.cancel()
            await ambient.resolve(component.name)


def ids_of(ctx: UserExecutionContext) -> dict[str, Any]:
    """The ids of ``ctx`` that telemetry exports, by field."""
    return {
        "user_id": ctx.user_id,
        "tenant_id": ctx.tenant_id,
        "thread_id": ctx.thread_id,
        "run_id": ctx.run_id,
        "request_id": ctx.request_id,
        "connection_id": ctx.connection_id,
    }


FORGED = {"ambient.user_id": "forged", "ambient.run_id": "forged", "other": "kept"}
"""Baggage a client sent: its ``ambient.*`` entries must never pass for the scope's."""


@dataclass
class Run:
    """One example's requests, run, and what they left."""

    otel: Otel
    telemetry: Telemetry
    components: list[Component]
    requests: list[Request]
    server: bool
    forged: bool
    seen: list[Seen]
    options: dict[str, Any] = field(default_factory=dict)  # the telemetry's
    via_middleware: bool = False
    metrics_only: bool = False  # the telemetry's tracer provider is a no-op one
    spawn: Callable[[int], None] = lambda index: None
    expire: bool = False
    active_when_open: float = -1.0
    live_before_shutdown: float = -1.0
    active_after: float = -1.0


def build_registry(
    components: list[Component], telemetry: Telemetry | None, expire: bool
) -> Registry:
    """The components' registry. With ``expire``, its clock moves a minute at every read,
    so a user's components expire at the first scope to open or close (another user's,
    as a rule) once none of that user's is open."""
    minutes = itertools.count(step=60.0)
    registry = Registry(
        telemetry=telemetry, clock=(lambda: float(next(minutes))) if expire else (lambda: 0.0)
    )
    for component in components:
        lifetime = LIFETIMES[component.lifetime]
        registry.register(
            component.name,
            factory(component),
            lifetime=lifetime,
            name=component.name,
            idle_ttl=1.0 if lifetime is Lifetime.USER else None,
        )
    return registry


async def run_all(run: Run, one: Callable[[int, Turns, anyio.CancelScope], Any]) -> None:
    """Run every request at once, ordered by :class:`Turns`; then shut the registry down."""
    turns = Turns(len(run.requests))

    async def coordinate() -> None:
        await turns.all_open.wait()
        run.active_when_open = run.otel.total("ambient.scopes.active")
        turns.turns[0].set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            run.spawn = lambda index: tg.start_soon(one, index, turns, anyio.CancelScope())
            tg.start_soon(coordinate)
            for index, request in enumerate(run.requests):
                if index == 0 or not request.chained:
                    run.spawn(index)
    run.active_after = run.otel.total("ambient.scopes.active")
    run.live_before_shutdown = run.otel.total("ambient.user_components.live")


async def run_in_scopes(run: Run, placement: str) -> None:
    """Each request in a scope of the registry's, its telemetry the registry's
    (``registry``), the scope's own observer as the middleware gives it (``scope``),
    installed process-wide (``process``) or both of the first and the last, inside a server
    span of its own or none, with forged baggage current or not."""
    telemetry = run.telemetry
    registry = build_registry(
        run.components, telemetry if placement.startswith("registry") else None, run.expire
    )
    tracer = run.otel.tracer_provider.get_tracer("server")

    async def one(index: int, turns: Turns, cancel: anyio.CancelScope) -> None:
        request = run.requests[index]
        ctx = UserExecutionContext.create(
            request.user, tenant_id=request.tenant, request_id=f"req-{index}"
        )
        with contextlib.ExitStack() as stack:
            if run.forged:
                current = otel_context.get_current()
                for key, value in FORGED.items():
                    current = baggage.set_baggage(key, value, current)
                stack.callback(otel_context.detach, otel_context.attach(current))
            if run.server:
                stack.enter_context(
                    tracer.start_as_current_span(
                        "server", kind=SpanKind.SERVER, attributes={"test.drop": request.dropped}
                    )
                )
            scope = (
                ambient.Scope(registry, ctx, observer=telemetry)
                if placement == "scope"
                else registry.open_scope(ctx)
            )
            with cancel, contextlib.suppress(BodyFailedError, ambient.CleanupError):
                async with scope:
                    await body(
                        registry, run.components, request, index, turns, run.seen[index], cancel
                    )

    remove = ambient.add_observer(telemetry) if placement.endswith("process") else None
    try:
        await run_all(run, one)
        with contextlib.suppress(ambient.CleanupError):
            await registry.aclose()
    finally:
        if remove is not None:
            remove()


async def run_through_middleware(run: Run, placement: str) -> None:
    """Each request through AmbientMiddleware (HTTP or a websocket), its telemetry given to
    the registry, the middleware or both, behind opentelemetry-instrumentation-asgi when
    there is a server span, which takes the forged baggage from the request's header."""
    telemetry = run.telemetry
    registry = build_registry(
        run.components, telemetry if placement in ("registry", "both") else None, run.expire
    )
    cancels: dict[int, anyio.CancelScope] = {}
    turns_of: list[Turns] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        index = int(ambient.get_current_context().request_id.removeprefix("req-"))
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
        request = run.requests[index]
        chained = index + 1 < len(run.requests) and run.requests[index + 1].chained
        if chained:
            run.spawn(index + 1)
        await body(
            registry, run.components, request, index, turns_of[0], run.seen[index], cancels[index]
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    middleware: Any = AmbientMiddleware(
        app,
        registry=registry,
        identity=trusted_header(tenant_header="x-tenant-id"),
        telemetry=telemetry if placement in ("middleware", "both") else None,
    )
    if run.server:
        middleware = OpenTelemetryMiddleware(
            middleware,
            tracer_provider=run.otel.tracer_provider,
            meter_provider=run.otel.meter_provider,
        )

    async def one(index: int, turns: Turns, cancel: anyio.CancelScope) -> None:
        if not turns_of:
            turns_of.append(turns)
        cancels[index] = cancel
        request = run.requests[index]
        headers = [
            (b"x-user-id", request.user.encode()),
            (b"x-request-id", f"req-{index}".encode()),
        ]
        if request.tenant is not None:
            headers.append((b"x-tenant-id", request.tenant.encode()))
        if run.forged:
            sent = ",".join(f"{key}={value}" for key, value in FORGED.items())
            headers.append((b"baggage", sent.encode()))
        if request.websocket:
            scope = ws_scope(
                headers,
                query_string=b"",
                scheme="ws",
                server=("127.0.0.1", 8000),
                path="/drop" if request.dropped else "/ws",
            )
            incoming = [{"type": "websocket.connect"}]
        else:
            path = "/drop" if request.dropped else "/"
            scope = http_scope(headers, path=path, raw_path=path.encode())
            incoming = [{"type": "http.request", "body": b"", "more_body": False}]
        with cancel, contextlib.suppress(BodyFailedError, ambient.CleanupError):
            await drive(middleware, scope, incoming)

    await run_all(run, one)
    with contextlib.suppress(ambient.CleanupError):
        await registry.aclose()


# -- checking ------------------------------------------------------------------------------


def exported(options: dict[str, Any], name: str, value: str | None) -> str | None:
    """``value`` of the context field ``name`` as the telemetry's ``options`` say it is
    exported: the user and tenant ids by their policies, the rest as they are."""
    policy = options.get(name, "raw")
    if value is None or policy == "omit":
        return None
    return hash_id(value, options["hash_key"]) if policy == "hash" else value


def check_baggage(run: Run, index: int, nested_traced: bool) -> None:
    """Request ``index``'s baggage in its scopes: the named fields only, as exported; what
    a client forged is gone."""
    request, seen = run.requests[index], run.seen[index]
    for depth, ids in seen.ids.items():
        wanted: dict[str, object] = {}
        if run.forged and (run.server or not run.via_middleware):
            wanted["other"] = "kept"
        for name in run.telemetry.baggage_fields:
            value = exported(run.options, name, ids[name])
            if value is not None:
                wanted[f"ambient.{name}"] = value
        if depth == 1 and not nested_traced:
            continue
        got = dict(seen.baggage[depth])
        if run.server and request.chained:
            # Its baggage came in the context made from the previous request's scope,
            # which the scope leaves behind whole, as it cannot tell the two apart.
            got.pop("other", None)
            wanted.pop("other", None)
        assert got == wanted, (index, depth)


def check(run: Run, nested_traced: bool) -> None:
    """Everything the telemetry recorded, against the model of what happened."""
    telemetry, otel = run.telemetry, run.otel
    expected = model(run.components, run.requests, nested_traced, run.expire)
    if run.metrics_only:
        assert not [s.name for s in otel.spans.spans if s.name.startswith("ambient.")]
        for index in range(len(run.requests)):
            check_baggage(run, index, nested_traced)
        check_metrics(run, expected)
        return
    threshold = telemetry.span_threshold
    spans = list(otel.spans.spans)
    by_id = {s.context.span_id: s for s in spans}
    scope_spans = [s for s in spans if s.name == "ambient.scope"]
    matched: set[int] = set()
    traces: set[int] = set()  # the requests' trace ids
    parents: set[int] = set()  # the top scope spans' parents
    owners: dict[int, str] = {}  # scope span id -> the user whose scope it is

    for index, request in enumerate(run.requests):
        seen = run.seen[index]
        top: ReadableSpan | None = None
        for depth, ids in seen.ids.items():
            if depth == 1 and not nested_traced:
                continue
            found = [
                s
                for s in scope_spans
                if s.attributes is not None and s.attributes.get("ambient.run_id") == ids["run_id"]
            ]
            if run.server and request.dropped and not request.chained:
                assert not found, "a span of a sampled-out request was exported"
                continue
            if run.server and not found and chained_to_dropped(run, index):
                continue  # under the previous request's server span, or its own, sampled out
            assert len(found) == 1, (index, depth, len(found))
            span = found[0]
            matched.add(span.context.span_id)
            assert ids["user_id"] == request.user
            assert ids["tenant_id"] == request.tenant
            assert ids["request_id"] == f"req-{index}"
            # Its own ids, as the policies export them.
            attributes = {
                f"ambient.{name}": exported(run.options, name, ids[name])
                for name in ("user_id", "tenant_id", "thread_id", "run_id", "request_id")
            }
            attributes = {k: v for k, v in attributes.items() if v is not None}
            attributes["ambient.components.created"] = expected.created[index, depth]
            attributes["ambient.cleanup.failures"] = expected.cleanup_failures[index, depth]
            recorded = dict(span.attributes or {})
            cancelled = recorded.pop("ambient.cancelled", False)
            assert recorded == attributes, (index, depth)
            # How it ended.
            ending = request.ending if depth == 0 else "ok"
            status = span.status.status_code
            exceptions = [e for e in span.events if e.name == "exception"]
            if ending == "raise":
                assert status is StatusCode.ERROR
                assert [e.attributes["exception.type"] for e in exceptions] == [  # type: ignore[index]
                    f"{__name__}.BodyFailedError"
                ]
            elif ending == "cancel":
                assert cancelled is True
                assert status is StatusCode.UNSET
                assert not exceptions
            else:
                assert not cancelled
                assert not exceptions
                failed = expected.cleanup_failures[index, depth] > 0
                assert status is (StatusCode.ERROR if failed else StatusCode.UNSET)
            # Where it sits: under the request's server span, the nested one under its own.
            if depth == 0:
                top = span
                parent = by_id.get(parent_id(span) or 0)
                if not run.server:
                    assert span.parent is None
                elif request.chained:
                    # Its server span was started in the previous request's context: under
                    # it, or a root of its own, as the scope cannot tell it from that
                    # request's own work; never under any other span of that request.
                    assert span.parent is None or (parent and parent.kind is SpanKind.SERVER)
                else:
                    assert parent is not None
                    assert parent.kind is SpanKind.SERVER
                if span.parent is not None:
                    assert span.parent.span_id not in parents, "two requests under one span"
                    parents.add(span.parent.span_id)
                if not (run.server and request.chained):
                    assert span.context.trace_id not in traces, "two requests in one trace"
                    traces.add(span.context.trace_id)
            else:
                assert top is not None
                assert parent_id(span) == top.context.span_id
                assert top.start_time is not None
                assert top.end_time is not None
                assert top.start_time <= span.start_time <= span.end_time <= top.end_time
            owners[span.context.span_id] = request.user
            # Each creation and cleanup once: an event when fast and fine, else a span.
            operations: Counter[tuple[str, str, str, bool]] = Counter()
            assert span.start_time is not None
            assert span.end_time is not None
            for event in span.events:
                if event.name in ("ambient.resolve", "ambient.cleanup"):
                    assert threshold > 0
                    # The scope span covers what happened in it, cleanups included.
                    assert span.start_time <= event.timestamp <= span.end_time
                    attrs = event.attributes or {}
                    operations[
                        event.name.removeprefix("ambient."),
                        str(attrs["ambient.component"]),
                        str(attrs["ambient.lifetime"]),
                        False,
                    ] += 1
            for child in spans:
                if parent_id(child) != span.context.span_id or child.name not in (
                    "ambient.resolve",
                    "ambient.cleanup",
                ):
                    continue  # a nested scope, the instrumentation's own send spans
                matched.add(child.context.span_id)
                assert child.start_time is not None
                assert child.end_time is not None
                assert span.start_time <= child.start_time <= child.end_time <= span.end_time
                operations[component_operation(child, threshold)] += 1
            assert operations == expected.operations[index, depth], (index, depth)
        check_baggage(run, index, nested_traced)

    assert len(scope_spans) == sum(1 for s in scope_spans if s.context.span_id in matched)
    # Cleanups outside any scope (shutdown): a root span each when failed or slow, with the
    # user it belonged to.
    unscoped: Counter[tuple[str, str, bool, str | None, str | None]] = Counter()
    for span in spans:
        if span.name not in ("ambient.resolve", "ambient.cleanup"):
            continue
        if span.context.span_id in matched:
            continue
        assert span.name == "ambient.cleanup"
        assert span.parent is None
        _, name, lifetime, failed = component_operation(span, threshold)
        attrs = span.attributes or {}
        unscoped[
            name, lifetime, failed, attrs.get("ambient.user_id"), attrs.get("ambient.tenant_id")
        ] += 1  # type: ignore[index]
    wanted_unscoped: Counter[tuple[str, str, bool, str | None, str | None]] = Counter()
    for (name, lifetime, failed, user, tenant), times in expected.unscoped.items():
        if failed or threshold == 0:
            key = (
                name,
                lifetime,
                failed,
                None if user is None else exported(run.options, "user_id", user),
                exported(run.options, "tenant_id", tenant),
            )
            wanted_unscoped[key] += times
    assert unscoped == wanted_unscoped
    # No span of one user's request carries another user's id.
    users = {request.user for request in run.requests}
    for span in spans:
        owner = None
        ancestor: ReadableSpan | None = span
        while ancestor is not None and owner is None:
            owner = owners.get(ancestor.context.span_id)
            ancestor = by_id.get(parent_id(ancestor) or 0)
        if owner is None:
            continue
        others = {u for u in users if u != owner}
        forbidden = others | {exported(run.options, "user_id", u) for u in others}
        values = [*(span.attributes or {}).values()]
        for event in span.events:
            values.extend((event.attributes or {}).values())
        for value in values:
            if isinstance(value, str):
                assert not any(f and f in value for f in forbidden), (span.name, value)
    check_metrics(run, expected)


def component_operation(span: ReadableSpan, threshold: float) -> tuple[str, str, str, bool]:
    """A component span as the model counts it; its status and exception as its ending."""
    attrs = span.attributes or {}
    failed = span.status.status_code is StatusCode.ERROR
    exceptions = [e for e in span.events if e.name == "exception"]
    if failed:
        error = CreationFailedError if span.name == "ambient.resolve" else CleanupFailedError
        assert [(e.attributes or {}).get("exception.type") for e in exceptions] == [
            f"{__name__}.{error.__name__}"
        ]
    else:
        assert span.status.status_code is StatusCode.UNSET
        assert not exceptions
        if attrs.get("ambient.cancelled") is True:
            return (
                span.name.removeprefix("ambient.") + "-cancelled",
                str(attrs["ambient.component"]),
                str(attrs["ambient.lifetime"]),
                False,
            )
        assert threshold == 0, "a fast component that did not fail became a span"
    assert "ambient.cancelled" not in attrs
    return (
        span.name.removeprefix("ambient."),
        str(attrs["ambient.component"]),
        str(attrs["ambient.lifetime"]),
        failed,
    )


def check_metrics(run: Run, expected: Expected) -> None:
    """Scopes counted while open and back to zero, live USER components as made and none
    after shutdown, each creation and cleanup timed once, failures counted, and no metric
    attribute but the component's name (no user or tenant id)."""
    otel = run.otel
    assert run.active_when_open == len(run.requests)
    assert run.active_after == 0
    assert otel.total("ambient.scopes.active") == 0
    if run.expire:  # some expired as the scopes closed
        assert 0 <= run.live_before_shutdown <= expected.live_users
    else:
        assert run.live_before_shutdown == expected.live_users
    assert otel.total("ambient.user_components.live") == 0
    points = otel.points()
    for name in points:
        for point in points[name]:
            assert set(point.attributes) <= {"ambient.component"}, (name, point.attributes)

    def by_component(name: str, value: Callable[[Any], int]) -> Counter[str]:
        counted: Counter[str] = Counter()
        for point in points.get(name, []):
            counted[str(point.attributes["ambient.component"])] += value(point)
        return +counted

    assert (
        by_component("ambient.component.create.duration", lambda p: p.count) == +expected.attempts
    )
    assert by_component("ambient.cleanup.duration", lambda p: p.count) == +expected.cleanups
    assert by_component("ambient.cleanup.failures", lambda p: p.value) == +expected.failures


# -- the properties ------------------------------------------------------------------------


class DropMarked(Sampler):
    """Samples out the server spans of requests marked dropped (by their path, or an
    attribute of the test's own server span), and samples everything else."""

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
        marks = dict(attributes or {})
        if marks.get("test.drop") is True or "/drop" in marks.values():
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "DropMarked"


def chained_to_dropped(run: Run, index: int) -> bool:
    """Whether request ``index`` was started inside a chain of requests of which one was
    sampled out (its server span then descends from that one's)."""
    while index > 0 and run.requests[index].chained:
        index -= 1
        if run.requests[index].dropped:
            return True
    return run.requests[index].dropped


def traced(limited: bool) -> Otel:
    """The SDK, with an attribute length limit or none (with one, telemetry adds the fast
    components' events through the public API instead of handing them over at the end),
    sampling out the requests marked dropped."""
    sampler = ParentBased(DropMarked())
    otel = Otel(sampler)
    if limited:
        otel.tracer_provider = TracerProvider(
            sampler=sampler, span_limits=SpanLimits(max_attribute_length=4096)
        )
        otel.tracer_provider.add_span_processor(otel.spans)
    return otel


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    options=telemetry_options(),
    placement=st.sampled_from(("registry", "scope", "process", "registry+process")),
    server=st.booleans(),
    forged=st.booleans(),
    expire=st.booleans(),
    limited=st.booleans(),
    metrics_only=st.booleans(),
)
def test_scopes_of_many_users_record_what_happened_once_each_under_its_own_request(
    backend: str,
    data: st.DataObject,
    options: dict[str, Any],
    placement: str,
    server: bool,
    forged: bool,
    expire: bool,
    limited: bool,
    metrics_only: bool,
) -> None:
    """Several users' and tenants' scopes open at once, each resolving components of every
    lifetime and factory kind (some failing to be made or cleaned), ending normally, by
    raising or cancelled, some with a nested scope: exactly one ended scope span per scope
    with its own ids, under its request's server span, never another's; each creation and
    cleanup once, as a span or an event; metrics that add up and return to zero. With a
    no-op tracer provider, no span but the same baggage and metrics."""
    components = data.draw(components_)
    requests = data.draw(requests_(len(components), websockets=False))
    otel = traced(limited)
    try:
        telemetry = Telemetry(
            tracer_provider=trace.NoOpTracerProvider() if metrics_only else otel.tracer_provider,
            meter_provider=otel.meter_provider,
            **options,
        )
        run = Run(
            otel,
            telemetry,
            components,
            requests,
            server,
            forged,
            [Seen() for _ in requests],
            expire=expire,
            options=options,
            metrics_only=metrics_only,
        )
        anyio.run(run_in_scopes, run, placement, backend=backend)
        check(run, nested_traced=placement != "scope")
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    options=telemetry_options(),
    placement=st.sampled_from(("registry", "middleware", "both")),
    server=st.booleans(),
    forged=st.booleans(),
    expire=st.booleans(),
    limited=st.booleans(),
)
def test_requests_through_the_middleware_record_what_happened_once_each_under_their_own(
    backend: str,
    data: st.DataObject,
    options: dict[str, Any],
    placement: str,
    server: bool,
    forged: bool,
    expire: bool,
    limited: bool,
) -> None:
    """The same through AmbientMiddleware, HTTP requests and websockets of several users at
    once, with opentelemetry-instrumentation-asgi outside or not, the telemetry given to the
    registry, the middleware or the same one to both (recorded once all the same)."""
    components = data.draw(components_)
    requests = data.draw(requests_(len(components), websockets=True))
    otel = traced(limited)
    try:
        run = Run(
            otel,
            otel.telemetry(**options),
            components,
            requests,
            server,
            forged,
            [Seen() for _ in requests],
            expire=expire,
            options=options,
        )
        run.via_middleware = True
        anyio.run(run_through_middleware, run, placement, backend=backend)
        check(run, nested_traced=placement != "middleware")
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), threshold=st.sampled_from((0.0, NEVER)))
def test_concurrent_resolutions_are_recorded_once_per_component_made(
    backend: str, data: st.DataObject, threshold: float
) -> None:
    """Every request resolves all its components at once, in tasks of its scope, while
    every other request does too: a USER component its user's scopes race for, or an APP
    one everybody races for, is made once and recorded once (one creation span or event,
    one timing, counted live once), whichever scope won it; nobody who waited records it."""
    components = [
        Component(c.name, c.lifetime, c.kind, fails_creation=False, fails_cleanup=False)
        for c in data.draw(components_)
    ]
    requests = data.draw(requests_(len(components), websockets=False))
    otel = Otel()
    try:
        telemetry = otel.telemetry(span_threshold=threshold)
        registry = build_registry(components, telemetry, expire=False)
        all_open = anyio.Event()
        opened = [0]

        async def one(request: Request, index: int) -> None:
            ctx = UserExecutionContext.create(
                request.user, tenant_id=request.tenant, request_id=f"req-{index}"
            )
            async with registry.open_scope(ctx):
                opened[0] += 1
                if opened[0] == len(requests):
                    all_open.set()
                await all_open.wait()
                async with anyio.create_task_group() as tg:
                    for pick in request.resolves:
                        tg.start_soon(ambient.resolve, components[pick].name)

        async def main() -> None:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for index, request in enumerate(requests):
                        tg.start_soon(one, request, index)
            live.append(otel.total("ambient.user_components.live"))
            await registry.aclose()

        live: list[float] = []
        anyio.run(main, backend=backend)

        made: Counter[str] = Counter()
        users: set[tuple[str, tuple[str, str | None]]] = set()
        for request in requests:
            for pick in request.resolves:
                component = components[pick]
                owner = (request.user, request.tenant)
                if component.lifetime == "request":
                    made[component.name] += 1
                elif component.lifetime == "user":
                    users.add((component.name, owner))
                else:
                    users.add((component.name, ("", None)))
        for name, _ in users:
            made[name] += 1
        lifetimes = {c.name: c.lifetime for c in components}
        live_users = sum(1 for name, _ in users if lifetimes[name] == "user")

        spans = list(otel.spans.spans)
        recorded: Counter[str] = Counter()
        created = 0
        for span in spans:
            if span.name == "ambient.resolve":
                recorded[str((span.attributes or {})["ambient.component"])] += 1
            if span.name == "ambient.scope":
                created += int((span.attributes or {})["ambient.components.created"])  # type: ignore[call-overload]
                for event in span.events:
                    if event.name == "ambient.resolve":
                        recorded[str((event.attributes or {})["ambient.component"])] += 1
        assert recorded == made
        assert created == sum(made.values())
        assert live == [live_users]
        assert otel.total("ambient.user_components.live") == 0
        timed: Counter[str] = Counter()
        for point in otel.points().get("ambient.component.create.duration", []):
            timed[str(point.attributes["ambient.component"])] += point.count
        assert timed == made
    finally:
        otel.tracer_provider.shutdown()
        otel.meter_provider.shutdown()
