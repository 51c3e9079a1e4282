"""Leaks: nothing of a closed scope stays alive after a garbage collection."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import sniffio

import ambient
from ambient import Lifetime, Registry, UserExecutionContext


class RequestThing:
    """A REQUEST component."""


class UserThing:
    """A USER component."""


@pytest.mark.load
async def test_5000_scopes_leave_nothing_alive() -> None:
    """After 5,000 scopes with components, no context, scope or REQUEST component is alive."""
    registry = Registry()
    registry.register(RequestThing, RequestThing)

    def with_cleanup() -> Iterator[object]:
        yield object()

    async def async_with_cleanup() -> AsyncIterator[dict[str, int]]:
        yield {}

    registry.register("gen", with_cleanup)
    registry.register("agen", async_with_cleanup)
    registry.register(UserThing, UserThing, lifetime=Lifetime.USER, idle_ttl=0)
    refs: list[weakref.ref[object]] = []
    for n in range(5_000):
        ctx = UserExecutionContext.create(f"user-{n % 100}")
        async with registry.open_scope(ctx) as scope:
            thing = await ambient.resolve(RequestThing)
            ambient.resolve_sync("gen")
            await ambient.resolve("agen")
            await ambient.resolve(UserThing)
        if n % 100 == 0:
            refs += [weakref.ref(ctx), weakref.ref(scope), weakref.ref(thing)]
    del ctx, scope, thing
    await registry.sweep()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == []
    stats = registry.stats()
    assert stats.open_scopes == 0
    assert stats.created == stats.cleaned
    assert stats.live_users == 0


def _count_context_vars(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ContextVar made from now on, by ambient's modules or anyone else
    (ContextVar cannot be subclassed, so its name is replaced where it is looked up)."""
    made: list[str] = []
    real = contextvars.ContextVar

    def counting(name: str, **kwargs: Any) -> contextvars.ContextVar[Any]:
        made.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(contextvars, "ContextVar", counting)
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "ambient" and getattr(module, "ContextVar", None) is real:
            monkeypatch.setattr(module, "ContextVar", counting)
    return made


@pytest.mark.load
async def test_5000_middleware_stacks_create_no_context_vars_and_free_their_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building 5,000 applications (registry, telemetry, middleware) and serving one
    request each creates no ContextVar (a Context keeps every variable it saw alive), and
    the memory they used is returned once they are dropped (the same 100 users throughout:
    valid user ids are memoised process-wide, up to a bound)."""
    from ambient.middleware import AmbientMiddleware, trusted_header
    from ambient.telemetry import Telemetry
    from tests.test_identity import http_scope

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        thing = await ambient.resolve(RequestThing)
        assert isinstance(thing, RequestThing)
        user = ambient.get_current_context().user_id.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": user})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def serve_one(n: int) -> None:
        registry = Registry()
        registry.register(RequestThing, RequestThing)
        stack = AmbientMiddleware(
            app, registry=registry, identity=trusted_header(), telemetry=Telemetry()
        )
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        user = f"user-{n % 100}"
        await stack(http_scope([(b"x-user-id", user.encode())]), receive, send)
        assert sent[-1]["body"] == user.encode()
        await registry.aclose()

    for n in range(1_000):  # imports, first-use caches and the 100 users' ids
        await serve_one(n)
    made = _count_context_vars(monkeypatch)
    contextvars.ContextVar("probe")
    assert made == ["probe"]  # the count works
    made.clear()
    gc.collect()
    blocks = sys.getallocatedblocks()
    for n in range(5_000):
        await serve_one(n)
    gc.collect()
    grown = sys.getallocatedblocks() - blocks
    assert made == []
    # One object kept per application would be 5,000 blocks.
    assert grown < 1_000, f"{grown} memory blocks still allocated"


class Payload:
    """Request data that must not outlive the request (a body, a document)."""


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
async def test_a_timer_or_task_holding_the_request_context_pins_none_of_its_data(
    traced: bool,
) -> None:
    """A request schedules work that keeps a copy of its contextvars long after it ends
    (a task in an application-wide task group; on asyncio also a ``call_later`` timer),
    and then fails. Once the request is over, its REQUEST component, its user's USER
    component, what it kept in ``scope.state`` and a local of the failing frame are all
    collectable; the scope that stays reachable holds no exception and no state. Traced
    too: the OpenTelemetry context the copy holds (the scope's span, events and baggage)
    keeps none of them either."""
    telemetry = None
    if traced:
        from opentelemetry.sdk.trace import TracerProvider

        from ambient.telemetry import Telemetry

        telemetry = Telemetry(
            tracer_provider=TracerProvider(), span_threshold=0, baggage=("thread_id",)
        )
    registry = Registry(telemetry=telemetry)
    registry.register(RequestThing, RequestThing)
    registry.register(UserThing, UserThing, lifetime=Lifetime.USER, idle_ttl=0)
    refs: list[weakref.ref[object]] = []
    scopes: list[ambient.Scope] = []
    timers: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        payload = Payload()
        refs.extend(
            weakref.ref(thing)
            for thing in (
                await ambient.resolve(RequestThing),
                await ambient.resolve(UserThing),
                payload,
            )
        )
        current = ambient.current_scope()
        current.state["payload"] = Payload()
        refs.append(weakref.ref(current.state["payload"]))
        scopes.append(current)
        outlives.start_soon(anyio.sleep_forever)
        if sniffio.current_async_library() == "asyncio":
            timers.append(asyncio.get_running_loop().call_later(600, lambda: None))
        msg = "the handler failed"
        raise RuntimeError(msg)

    from ambient.middleware import AmbientMiddleware, trusted_header
    from tests.test_identity import http_scope

    stack = AmbientMiddleware(app, registry=registry, identity=trusted_header())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    async with anyio.create_task_group() as outlives:
        with pytest.raises(RuntimeError, match="the handler failed"):
            await stack(http_scope([(b"x-user-id", b"alice")]), receive, send)
        await registry.sweep()
        gc.collect()
        assert [type(r()).__name__ for r in refs if r() is not None] == []
        (scope,) = scopes
        assert scope.closed
        assert scope.exception is None
        assert scope.state == {}
        assert registry.stats().created == registry.stats().cleaned == 2
        outlives.cancel_scope.cancel()
    for timer in timers:
        timer.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # loop.call_later is asyncio's
async def test_a_timer_scheduled_under_detached_keeps_nothing_of_the_request() -> None:
    """A timer a request schedules keeps a copy of its contextvars until it runs, and so
    the request's context and closed scope (asyncio keeps a cancelled one's until its due
    time): the README's advice, scheduling it under ``ambient.detached()``, keeps neither,
    and its callback runs with no context. Two requests of two users, one each way: the
    first shows the test can tell."""
    registry = Registry()
    registry.register(RequestThing, RequestThing)
    refs: dict[str, list[weakref.ref[object]]] = {}
    timers: list[asyncio.TimerHandle] = []
    ran = anyio.Event()
    seen: list[object] = ["not run"]

    def callback() -> None:
        seen[0] = ambient.current_context_or_none()
        ran.set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await ambient.resolve(RequestThing)
        ctx = ambient.get_current_context()
        refs[ctx.user_id] = [weakref.ref(ctx), weakref.ref(ambient.current_scope())]
        loop = asyncio.get_running_loop()
        if ctx.user_id == "alice":
            timers.append(loop.call_later(600, lambda: None))
        else:
            with ambient.detached():
                timers.append(loop.call_later(600, lambda: None))
                loop.call_soon(callback)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    from ambient.middleware import AmbientMiddleware, trusted_header
    from tests.test_identity import http_scope

    stack = AmbientMiddleware(app, registry=registry, identity=trusted_header())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    try:
        for user in ("alice", "bob"):
            await stack(http_scope([(b"x-user-id", user.encode())]), receive, send)
        with anyio.fail_after(5):
            await ran.wait()
        gc.collect()
        alive = {user: sum(ref() is not None for ref in kept) for user, kept in refs.items()}
        assert alive == {"alice": 2, "bob": 0}
        assert seen == [None]
        assert registry.stats().created == registry.stats().cleaned == 2
    finally:
        for timer in timers:
            timer.cancel()


Scopes = list[weakref.ref[ambient.Scope]]


async def _alive_after(
    one: Callable[[str], Awaitable[None]], users: list[str], scopes: Scopes, due: float
) -> list[str]:
    """Serve every user's request at once with ``one`` while a timer due in ``due`` seconds
    waits (as a server's keep-alive or a pool's maintenance does: asyncio drops cancelled
    timers from the front of its queue only), then collect garbage: the users whose closed
    scopes are still alive."""
    async with anyio.create_task_group() as group:
        group.start_soon(anyio.sleep, due)
        async with anyio.create_task_group() as requests:
            for user in users:
                requests.start_soon(one, user)
        gc.collect()
        alive = [scope.context.user_id for ref in scopes if (scope := ref()) is not None]
        group.cancel_scope.cancel()
    assert len(scopes) == len(users)
    return alive


def _websocket_client() -> tuple[
    Callable[[], Awaitable[dict[str, Any]]],
    Callable[[dict[str, Any]], Awaitable[None]],
    list[dict[str, Any]],
]:
    """A websocket client's side for the middleware: the handshake's connect, then a wait
    for nothing (on an event, as a server's future: anyio's ``sleep_forever`` is a timer,
    due at infinity, that would hold the binding itself), and the messages sent to it."""
    connect = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if connect:
            return connect.pop()
        await anyio.Event().wait()
        raise AssertionError  # pragma: no cover - never woken

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, sent


async def test_a_streamed_response_with_an_expiring_identity_leaves_no_closed_scope() -> None:
    """Responses sent in more than one body message (as Quart sends every response) for
    users with an expiring identity (a JWT's ``exp``): once they are over, no closed scope
    is still alive. On asyncio the middleware's expiry deadlines are timers, which keep a
    copy of the context they were set in until their time comes (an hour on here), even
    once cancelled."""
    import time

    import jwt

    from ambient.middleware import AmbientMiddleware
    from ambient.middleware.identity import jwt_bearer
    from tests.test_identity import http_scope

    secret = "a-secret-for-streamed-responses-0123456789"
    scopes: Scopes = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(weakref.ref(ambient.current_scope()))
        user = ambient.get_current_context().user_id.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": user, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    resolver = jwt_bearer(secret, algorithms=["HS256"])
    stack = AmbientMiddleware(app, registry=Registry(), identity=resolver)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def one(user: str) -> None:
        token = jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, secret, "HS256")
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await stack(http_scope([(b"authorization", f"Bearer {token}".encode())]), receive, send)
        assert [m.get("body") for m in sent] == [None, user.encode(), b""]

    users = [f"streamer-{n}" for n in range(20)]
    assert await _alive_after(one, users, scopes, due=60) == []


async def test_a_websocket_with_an_expiring_identity_leaves_no_closed_scope() -> None:
    """Websockets of users with an expiring identity (a JWT's ``exp``) that close before
    it: once they are over, no closed scope is still alive (the expiry's deadlines, timers
    on asyncio, are set with no binding in the context)."""
    import time

    import jwt

    from ambient.middleware import AmbientMiddleware
    from ambient.middleware.identity import jwt_bearer
    from tests.test_middleware import ws_scope

    secret = "a-secret-for-closed-websockets-0123456789"
    scopes: Scopes = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(weakref.ref(ambient.current_scope()))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        user = ambient.get_current_context().user_id
        await send({"type": "websocket.send", "text": user})
        await send({"type": "websocket.close", "code": 1000})

    resolver = jwt_bearer(secret, algorithms=["HS256"])
    stack = AmbientMiddleware(app, registry=Registry(), identity=resolver)

    async def one(user: str) -> None:
        token = jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, secret, "HS256")
        receive, send, sent = _websocket_client()
        await stack(ws_scope([(b"authorization", f"Bearer {token}".encode())]), receive, send)
        assert [(m["type"], m.get("text")) for m in sent] == [
            ("websocket.accept", None),
            ("websocket.send", user),
            ("websocket.close", None),
        ]

    users = [f"socket-{n}" for n in range(20)]
    assert await _alive_after(one, users, scopes, due=60) == []


async def test_a_scope_whose_close_waited_for_a_hold_is_not_kept_by_the_wait() -> None:
    """Requests that hand work to a task with ``scope.hold()``, each closing while the hold
    is still active: once they are over, no closed scope is still alive (the bound of the
    wait for the hold, ``cleanup_timeout``, is a timer on asyncio, which must not hold the
    binding in its context)."""
    registry = Registry()
    scopes: Scopes = []

    closed_when_released: list[bool] = []

    async def release(hold: Any, scope: weakref.ref[ambient.Scope]) -> None:
        # Runs once the request's body has ended: its close waits for this.
        closed_when_released.append(scope().closed)  # type: ignore[union-attr]
        hold.release()

    async def one(user: str) -> None:
        context = UserExecutionContext.create(user)
        async with anyio.create_task_group() as tasks, registry.open_scope(context) as scope:
            scopes.append(weakref.ref(scope))
            tasks.start_soon(release, scope.hold(), scopes[-1])
            del scope

    users = [f"held-{n}" for n in range(20)]
    with anyio.fail_after(10):
        # Due before the bound of the wait for the hold (cleanup_timeout) ends.
        assert await _alive_after(one, users, scopes, due=5) == []
    assert closed_when_released == [False] * len(users)


@pytest.mark.parametrize("receives_on", [False, True], ids=["ends-when-told", "receives-on"])
async def test_a_websocket_closed_at_its_identitys_expiry_leaves_no_closed_scope(
    receives_on: bool,
) -> None:
    """Websockets closed by the middleware with 4001 at their identity's expiry, a close
    bounded by the registry's ``cleanup_timeout``, of apps that end when told the client is
    gone or receive on until cancelled: once they are over, no closed scope is still alive
    (no timer of the middleware's, on asyncio, holds the binding in its context)."""
    import time

    from ambient.middleware import AmbientMiddleware
    from ambient.middleware.identity import Identity
    from tests.test_middleware import ws_scope

    scopes: Scopes = []
    expires_at = time.time() + 0.2

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(weakref.ref(ambient.current_scope()))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"  # told at the expiry
        if receives_on:
            await receive()  # until cancelled

    def expiring(scope: Any) -> Identity:
        return Identity(scope["headers"][0][1].decode(), expires_at=expires_at)

    stack = AmbientMiddleware(app, registry=Registry(), identity=expiring)

    async def one(user: str) -> None:
        receive, send, sent = _websocket_client()
        await stack(ws_scope([(b"x-user-id", user.encode())]), receive, send)
        assert [(m["type"], m.get("code")) for m in sent] == [
            ("websocket.accept", None),
            ("websocket.close", 4001),
        ]

    users = [f"expired-{n}" for n in range(20)]
    with anyio.fail_after(10):
        # Due before the bound of the close (cleanup_timeout) ends.
        assert await _alive_after(one, users, scopes, due=5) == []


@pytest.mark.load
async def test_users_one_request_each_stay_within_max_users_and_expire_unread() -> None:
    """8,192 distinct users through the middleware, one request each, each resolving a
    USER component (a per-user cache, ``idle_ttl=60``) with ``max_users=100``: the
    registry never holds more than 100 users, evicting the least recently used idle one
    as each newcomer arrives; the second 4,096 users leave no more memory allocated than
    a bound far below one block each (4,096: a whole turn of the process-wide memo of
    valid ids, so that it is as full at both counts); after twice the ttl, one request
    of another user expires every idle entry though none is read again; every component
    is cleaned exactly once."""
    from ambient.middleware import AmbientMiddleware, trusted_header
    from tests.test_identity import http_scope

    now = [1000.0]
    registry = Registry(max_users=100, clock=lambda: now[0])
    counts = {"made": 0, "cleaned": 0, "most": 0}

    def cache(user: ambient.UserRef) -> Iterator[dict[str, str]]:
        counts["made"] += 1
        yield {"user": user.user_id}
        counts["cleaned"] += 1

    registry.register("cache", cache, lifetime=Lifetime.USER, idle_ttl=60)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        entry = await ambient.resolve("cache")
        assert entry == {"user": ambient.get_current_context().user_id}
        counts["most"] = max(counts["most"], registry.stats().live_users)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    answered = {204: 0}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answered[message["status"]] = answered.get(message["status"], 0) + 1

    stack = AmbientMiddleware(app, registry=registry, identity=trusted_header())

    async def users(first: int, count: int) -> None:
        for n in range(first, first + count):
            await stack(http_scope([(b"x-user-id", b"user-%d" % n)]), receive, send)
            now[0] += 0.001

    await users(0, 4096)
    gc.collect()
    blocks = sys.getallocatedblocks()
    await users(4096, 4096)
    gc.collect()
    grown = sys.getallocatedblocks() - blocks
    assert answered == {204: 8192}
    assert counts == {"made": 8192, "cleaned": 8192 - 100, "most": 100}
    assert registry.stats().live_users == 100
    # One block kept per user would be 4,096.
    assert grown < 1_000, f"{grown} memory blocks still allocated"

    now[0] += 120  # twice the idle ttl; none of the 100 users left comes back
    await stack(http_scope([(b"x-user-id", b"someone-else")]), receive, send)
    assert answered == {204: 8193}
    assert counts == {"made": 8193, "cleaned": 8192, "most": 100}
    assert registry.stats().live_users == 1
    await registry.aclose()
    assert counts["cleaned"] == 8193
