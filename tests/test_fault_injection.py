"""Fault injection at every await point of a request: bind, resolve, use and teardown.

A clean request through ``AmbientMiddleware`` passes a fixed list of await points (in the
app, in ``receive``/``send``, in async factories and in async cleanups). The tests run it
once to list them, then once per point with a fault injected there: a real cancellation of
the caller's cancel scope (asyncio's ``CancelledError``, trio's ``Cancelled``) or a custom
``BaseException``. Whatever the point, every component that was created is cleaned exactly
once, nothing stays bound, every span that started has ended, a second user's request
running beside it is untouched, and the fault reaches the caller unchanged.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient.middleware import AmbientMiddleware, trusted_header
from ambient.telemetry import Telemetry
from tests.test_identity import http_scope

Message = MutableMapping[str, Any]


class Injected(BaseException):
    """The fault: a BaseException no handler in the library may swallow or replace."""


class OpenSpans(SpanProcessor):
    """Span ids started and not yet ended."""

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.started = 0
        # How each scope span ended: its status and whether it says "cancelled".
        self.scope_outcomes: list[tuple[str, bool]] = []

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.started += 1
        self.open.add(span.context.span_id)

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.discard(span.context.span_id)
        if span.name == "ambient.scope":
            attributes = span.attributes or {}
            self.scope_outcomes.append(
                (span.status.status_code.name, bool(attributes.get("ambient.cancelled")))
            )


class Faults:
    """Counts the await points one request passes; injects the fault at one of them.

    ``"cancel"`` cancels the caller's cancel scope at the point and then awaits a
    checkpoint, so the backend's own cancellation exception is raised wherever the next
    unshielded await is (a shielded cleanup finishes first). ``"raise"`` raises
    :class:`Injected` right there.
    """

    def __init__(self, at: int | None = None, fault: str = "raise") -> None:
        self.at = at
        self.fault = fault
        self.passed: list[str] = []
        self.cancel_scope: anyio.CancelScope | None = None
        self.injected: Injected | None = None

    async def point(self, label: str) -> None:
        index = len(self.passed)
        self.passed.append(label)
        if index == self.at:
            if self.fault == "raise":
                self.injected = Injected(label)
                raise self.injected
            assert self.cancel_scope is not None
            self.cancel_scope.cancel()
        await anyio.lowlevel.checkpoint()


class Ledger:
    """What every component instance went through, by a unique name."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.cleaned: list[str] = []
        self.counter = itertools.count()

    def new(self, kind: str, owner: str) -> str:
        name = f"{kind}#{next(self.counter)}:{owner}"
        self.created.append(name)
        return name


class NeedsCleanup:
    """A component cleaned by its ``aclose()`` (no generator involved)."""

    def __init__(self, ledger: Ledger, name: str) -> None:
        self.ledger = ledger
        self.name = name

    async def aclose(self) -> None:
        self.ledger.cleaned.append(self.name)


def build(ledger: Ledger, faults: dict[str, Faults]) -> Registry:
    """Five components of every shape; each await point reports to its user's ``Faults``."""
    registry = Registry()

    def sync_gen(ctx: UserExecutionContext) -> Iterator[str]:
        name = ledger.new("sync_gen", ctx.user_id)
        try:  # a failed or cancelled request's exception is thrown in at the yield
            yield name
        finally:
            ledger.cleaned.append(name)

    async def async_fn(ctx: UserExecutionContext) -> NeedsCleanup:
        await faults[ctx.user_id].point("async_fn: create")
        return NeedsCleanup(ledger, ledger.new("async_fn", ctx.user_id))

    async def async_gen(ctx: UserExecutionContext) -> AsyncIterator[str]:
        inner = await ambient.resolve("sync_gen")
        await faults[ctx.user_id].point("async_gen: create")
        name = ledger.new("async_gen", ctx.user_id)
        try:
            yield f"{name}<{inner}>"
        finally:
            ledger.cleaned.append(name)
            await faults[ctx.user_id].point("async_gen: cleanup")

    async def per_user(user: UserRef) -> AsyncIterator[str]:
        await faults[user.user_id].point("per_user: create")
        name = ledger.new("per_user", user.user_id)
        try:
            yield name
        finally:
            ledger.cleaned.append(name)

    registry.register("sync_gen", sync_gen)
    registry.register("async_fn", async_fn)
    registry.register("async_gen", async_gen)
    registry.register("per_user", per_user, lifetime=Lifetime.USER)
    return registry


_faults: dict[str, Faults] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the body, resolves everything with awaits between, answers with the user."""
    user = ambient.get_current_context().user_id
    f = _faults[user]
    await f.point("app: start")
    await receive()
    first = await ambient.resolve("async_gen")
    await f.point("app: between resolves")
    await ambient.resolve("async_fn")
    await ambient.resolve("per_user")
    assert first == await ambient.resolve("async_gen")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await f.point("app: between sends")
    await send({"type": "http.response.body", "body": user.encode()})
    await f.point("app: after the response")


async def request(middleware: Any, user: str, f: Faults) -> list[Message]:
    """One request of ``user`` whose ``receive`` and ``send`` are await points too."""
    sent: list[Message] = []

    async def receive() -> Message:
        await f.point("receive")
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        await f.point(f"send {message['type']}")
        sent.append(message)

    scope = http_scope([(b"x-user-id", user.encode())])
    await middleware(scope, receive, send)
    return sent


class Stack:
    """A fresh registry, telemetry with a real SDK, and the middleware, for one run."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        _faults.clear()
        self.registry = build(self.ledger, _faults)
        self.spans = OpenSpans()
        provider = TracerProvider()
        provider.add_span_processor(self.spans)
        self.middleware = AmbientMiddleware(
            app,
            registry=self.registry,
            identity=trusted_header("x-user-id"),
            telemetry=Telemetry(tracer_provider=provider),
        )

    async def check_clean(self, where: str) -> None:
        """After the run and the registry's shutdown: each created component cleaned
        once, nothing bound, no scope open, no span left open."""
        # Before shutdown, which closes user entries whatever their references: a scope
        # that lost track of one would keep its user's entry in use for good.
        leaked = {ref: entry.refs for ref, entry in self.registry._users.items() if entry.refs}
        assert not leaked, f"{where}: user references left behind: {leaked}"
        await self.registry.aclose()
        cleaned = Counter(self.ledger.cleaned)
        twice = sorted(name for name, n in cleaned.items() if n > 1)
        assert not twice, f"{where}: cleaned more than once: {twice}"
        created = set(self.ledger.created)
        assert len(created) == len(self.ledger.created), where
        assert set(cleaned) == created, (
            f"{where}: never cleaned: {sorted(created - set(cleaned))}, "
            f"cleaned but never created: {sorted(set(cleaned) - created)}"
        )
        stats = self.registry.stats()
        assert stats.created == stats.cleaned == len(self.ledger.created), (where, stats)
        assert stats.open_scopes == 0, where
        assert ambient.current_context_or_none() is None, where
        assert not self.spans.open, f"{where}: {len(self.spans.open)} span(s) never ended"


async def clean_run() -> list[str]:
    """The await points a request passes when nothing goes wrong (and that it is clean)."""
    stack = Stack()
    f = _faults["alice"] = Faults()
    sent = await request(stack.middleware, "alice", f)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"alice"
    await stack.check_clean("clean run")
    # sync_gen, async_fn, async_gen (REQUEST) and per_user (USER).
    assert len(stack.ledger.created) == 4
    assert stack.spans.started > 0
    return f.passed


async def test_a_clean_request_passes_every_kind_of_await_point() -> None:
    """The point list covers the app, receive/send, factories and an async cleanup, so
    the injection tests below reach every phase."""
    passed = await clean_run()
    assert passed == [
        "app: start",
        "receive",
        "async_gen: create",
        "app: between resolves",
        "async_fn: create",
        "per_user: create",
        "send http.response.start",
        "app: between sends",
        "send http.response.body",
        "app: after the response",
        "async_gen: cleanup",
    ]


async def alice_faulted_beside_bob(fault: str, at: int, points: list[str]) -> None:
    """Alice's request with ``fault`` at her ``at``-th await point, bob's beside it."""
    where = f"{fault} at #{at} ({points[at]})"
    stack = Stack()
    alice = _faults["alice"] = Faults(at, fault)
    bob = _faults["bob"] = Faults()
    bob_sent: list[Message] = []
    caught: BaseException | None = None

    async def run_bob() -> None:
        bob_sent.extend(await request(stack.middleware, "bob", bob))

    async def run_alice() -> None:
        nonlocal caught
        with anyio.CancelScope() as alice.cancel_scope:
            try:
                await request(stack.middleware, "alice", alice)
            except Injected as exc:
                caught = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_bob)
            tg.start_soon(run_alice)
    if fault == "raise":
        assert alice.injected is not None, where
        assert caught is alice.injected, f"{where}: the caller got {caught!r}"
    else:
        assert caught is None, where
        assert alice.cancel_scope is not None
        assert alice.cancel_scope.cancel_called, where
        if points[at] != "async_gen: cleanup":
            # The cancellation reached the caller's cancel scope: not swallowed on the way.
            # (Inside the shielded cleanup it waits for a checkpoint that never comes: the
            # request has nothing left to await.)
            assert alice.cancel_scope.cancelled_caught, where
    assert alice.passed[: at + 1] == points[: at + 1], where
    assert bob.passed == points, where
    if points[at] != "async_gen: cleanup":
        # The scope span says how the request ended: a cancellation is not an error; any
        # other exception, a BaseException included, is.
        alice_ended = ("UNSET", True) if fault == "cancel" else ("ERROR", False)
        assert sorted(stack.spans.scope_outcomes) == sorted([("UNSET", False), alice_ended]), where
    assert bob_sent[-1].get("body") == b"bob", where
    await stack.check_clean(where)


@pytest.mark.parametrize("fault", ["raise", "cancel"])
async def test_fault_at_every_await_point_cleans_everything_once(fault: str) -> None:
    """For each await point: inject the fault into alice's request while bob's runs beside
    it. Every component (alice's and bob's) is cleaned exactly once, nothing stays bound or
    open, the fault reaches the caller unchanged, and bob is answered as bob."""
    points = await clean_run()
    for at in range(len(points)):
        await alice_faulted_beside_bob(fault, at, points)
