"""One-time websocket tickets: issued for the current user, redeemed once, within their ttl,
in memory and in a real Redis, and end to end on uvicorn with a JWT that never enters a URL."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import httpx
import jwt as pyjwt
import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import ambient
from ambient import Registry, UserExecutionContext
from ambient.errors import (
    IdentityError,
    IdentityUnavailableError,
    InvalidContextError,
    NoActiveContextError,
    PoolExhaustedError,
    UnsupportedBackendError,
)
from ambient.integrations.starlette import install
from ambient.middleware import AmbientMiddleware, WebSocketTickets, first_of, trusted_header
from ambient.middleware.identity import Identity, jwt_bearer
from ambient.middleware.tickets import (
    MemoryTicketStore,
    PerUserTicketStore,
    RedisTicketStore,
    RevocableTicketStore,
    TicketStore,
)
from tests.apps import Ledger, build_registry
from tests.conftest import REDIS_URL, service_unavailable
from tests.servers import serve
from tests.test_identity import context_app, served_or_refused
from tests.test_middleware import drive, ws_scope
from tests.test_psycopg import _eventually

SECRET = "a-test-secret-of-at-least-32-bytes!"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def handshake(ticket: str | None = None, query: str | None = None) -> dict[str, Any]:
    """A websocket handshake scope with ``?ticket=`` (or a raw query string)."""
    raw = query if query is not None else f"ticket={ticket}"
    return ws_scope([], query_string=raw.encode())


def bound(user: str = "alice", **claims: Any) -> ambient.bind_context:
    ctx = UserExecutionContext.create(
        user, tenant_id="acme", metadata={"claims": claims} if claims else None
    )
    return ambient.bind_context(ctx)


async def race(resolvers: list[WebSocketTickets], ticket: str) -> list[str]:
    """Each resolver redeems ``ticket``, all at once: who got in, and "refused" for the rest."""
    outcomes: list[str] = []

    async def redeem(tickets: WebSocketTickets) -> None:
        try:
            identity = await tickets(handshake(ticket))
        except IdentityError:
            outcomes.append("refused")
        else:
            assert identity is not None
            outcomes.append(identity.user_id)

    async with anyio.create_task_group() as tg:
        for resolver in resolvers:
            tg.start_soon(redeem, resolver)
    return sorted(outcomes)


async def refused(tickets: WebSocketTickets, scope: dict[str, Any]) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        await tickets(scope)
    return info.value


def _held(keys: list[bytes], prefix: str) -> list[bytes]:
    """The keys of outstanding tickets among ``keys``: a prefix and 64 hex digits."""
    return [key for key in keys if len(key) == len(prefix) + 64]


class TestMemory:
    async def test_issued_for_the_current_user_and_redeemed_once(self) -> None:
        tickets = WebSocketTickets()
        with bound("alice", scopes=["chat"]):
            ticket = await tickets.issue()
        identity = await tickets(handshake(ticket))
        assert identity is not None
        assert (identity.user_id, identity.tenant_id) == ("alice", "acme")
        assert dict(identity.claims) == {"scopes": ["chat"]}
        assert identity.expires_at is None
        again = await refused(tickets, handshake(ticket))
        assert again.status == 401
        assert "already used" in str(again)
        assert ticket not in str(again)

    async def test_expires_after_its_ttl(self) -> None:
        clock = Clock()
        tickets = WebSocketTickets(ttl=30, clock=clock)
        with bound():
            late, in_time = await tickets.issue(), await tickets.issue()
        clock.now += 29.9
        assert await tickets(handshake(in_time)) is not None
        clock.now += 0.1
        assert (await refused(tickets, handshake(late))).status == 401

    async def test_the_socket_expires_with_the_issuing_credential(self) -> None:
        """The ``exp`` claim of the issuing request's token becomes the identity's expiry
        (the middleware closes the socket with 4001 then); an explicit one wins."""
        tickets = WebSocketTickets()
        with bound(exp=2_000_000_000):
            from_claim = await tickets.issue()
            explicit = await tickets.issue(expires_at=1_900_000_000.5)
        first = await tickets(handshake(from_claim))
        second = await tickets(handshake(explicit))
        assert first is not None
        assert second is not None
        assert first.expires_at == 2_000_000_000
        assert second.expires_at == 1_900_000_000.5

    async def test_a_numeric_string_exp_ends_the_socket_as_jwt_bearer_reads_it(self) -> None:
        """PyJWT and ``jwt_bearer`` honour ``exp`` given as a numeric string; the ticket
        issued from such a token ignored it, and its socket never expired."""
        tickets = WebSocketTickets()
        with bound(exp="2000000000"):
            ticket = await tickets.issue()
        identity = await tickets(handshake(ticket))
        assert identity is not None
        assert identity.expires_at == 2_000_000_000

    async def test_a_fractional_exp_ends_the_socket_at_its_whole_second(self) -> None:
        """PyJWT honours ``exp`` until its whole second (``int(exp)``), and so does
        ``jwt_bearer``: the socket of a ticket issued under ``exp: 2000000000.9`` ends at
        2000000000, not later than the token it was issued from."""
        tickets = WebSocketTickets()
        with bound(exp=2_000_000_000.9):
            ticket = await tickets.issue()
        identity = await tickets(handshake(ticket))
        assert identity is not None
        assert identity.expires_at == 2_000_000_000

    async def test_a_ticket_issued_under_a_credential_without_claims_expires_with_it(
        self,
    ) -> None:
        """A signed context (a service's token) carries its expiry but no claims: the
        ticket issued under it used to open a socket that never expired, so a 30-second
        service token could be turned into a socket that lives on."""
        from ambient.integrations.propagation import ContextSigner, capture, signed_context

        signer = ContextSigner("k" * 32)
        tickets = WebSocketTickets()

        async def issue(request: Request) -> Response:
            return JSONResponse({"ticket": await tickets.issue()})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/ticket", issue)]),
            registry=Registry(),
            identity=signed_context(signer),
        )
        token = capture(UserExecutionContext.create("svc"), secret=signer, ttl=30)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            answer = await http.get("/ticket", headers={"x-ambient-context": token})
        assert answer.status_code == 200, answer.text
        identity = await tickets(handshake(answer.json()["ticket"]))
        assert identity is not None
        assert identity.user_id == "svc"
        assert identity.expires_at is not None
        assert time.time() < identity.expires_at <= time.time() + 31 + signer.leeway

    @pytest.mark.parametrize("traced", [False, True])
    async def test_a_ticket_issued_while_a_socket_handles_a_message_expires_with_it(
        self, traced: bool
    ) -> None:
        """A socket opened with a signed context (an expiry, no claims) handles each
        message in a message scope, and issues a ticket there: the ticket expires with the
        socket's credential, as one issued in the connection's own scope does. The expiry
        was looked for in the message scope only, which has none of its own: that ticket
        opened a socket that never expired. With telemetry the message scope holds state
        of its own (its span), still without an expiry: the connection's is found."""
        from opentelemetry.sdk.trace import TracerProvider

        from ambient.integrations.propagation import ContextSigner, capture, signed_context
        from ambient.integrations.websockets import message_scope
        from ambient.telemetry import Telemetry

        signer = ContextSigner("k" * 32)
        tickets = WebSocketTickets()
        issued: dict[str, str] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            issued["connection"] = await tickets.issue()
            async with message_scope():
                issued["message"] = await tickets.issue()
            await send({"type": "websocket.close", "code": 1000})

        telemetry = (
            Telemetry(tracer_provider=TracerProvider(), span_threshold=0) if traced else None
        )
        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=signed_context(signer), telemetry=telemetry
        )
        token = capture(UserExecutionContext.create("svc"), secret=signer, ttl=30)
        scope = ws_scope([(b"x-ambient-context", token.encode())])
        sent = await drive(middleware, scope, [{"type": "websocket.connect"}])
        assert [message["type"] for message in sent] == ["websocket.accept", "websocket.close"]
        expiries = {}
        for where, ticket in issued.items():
            identity = await tickets(handshake(ticket))
            assert identity is not None
            expiries[where] = identity.expires_at
        assert expiries["connection"] is not None
        assert expiries == {"connection": expiries["connection"], "message": expiries["connection"]}

    async def test_a_ticket_for_another_user_does_not_take_the_request_credentials_expiry(
        self,
    ) -> None:
        """A request signed in as an admin whose token expires, acting for bob (a switch
        to bob's context), issues bob a ticket: the expiry is looked for in bob's own
        bindings only, and bob presented no credential in this request. The admin's
        own ticket, issued in the same request, expires with the admin's token."""
        from ambient.integrations.propagation import ContextSigner, capture, signed_context

        signer = ContextSigner("k" * 32)
        tickets = WebSocketTickets()

        async def issue(request: Request) -> Response:
            own = await tickets.issue()
            with ambient.bind_context(UserExecutionContext.create("bob"), allow_switch=True):
                for_bob = await tickets.issue()
            return JSONResponse({"own": own, "bob": for_bob})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/ticket", issue)]),
            registry=Registry(),
            identity=signed_context(signer),
        )
        token = capture(UserExecutionContext.create("admin"), secret=signer, ttl=30)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            answer = await http.get("/ticket", headers={"x-ambient-context": token})
        assert answer.status_code == 200, answer.text
        own = await tickets(handshake(answer.json()["own"]))
        bob = await tickets(handshake(answer.json()["bob"]))
        assert own is not None
        assert bob is not None
        assert (own.user_id, bob.user_id) == ("admin", "bob")
        assert own.expires_at is not None
        assert bob.expires_at is None

    async def test_one_ticket_twenty_handshakes_at_once_one_gets_in(self) -> None:
        tickets = WebSocketTickets()
        with bound():
            ticket = await tickets.issue()
        assert await race([tickets] * 20, ticket) == ["alice"] + ["refused"] * 19

    async def test_bad_handshakes(self) -> None:
        """Malformed or unknown tickets are 401, a repeated parameter 400; a request
        without the parameter, or an HTTP request, is no identity (the next resolver's)."""
        tickets = WebSocketTickets()
        with bound():
            ticket = await tickets.issue()
        for bad in ("", "short", "x" * 43, ticket + "a", ticket[:-1] + "%00", "ü" * 43):
            error = await refused(tickets, handshake(query=f"ticket={bad}"))
            assert error.status == 401, bad
        repeated = await refused(tickets, handshake(query=f"ticket={ticket}&ticket={ticket}"))
        assert repeated.status == 400
        assert await tickets(handshake(query="")) is None
        assert await tickets(handshake(query="other=1")) is None
        assert await tickets(handshake(query=f"tickets={ticket}")) is None
        http = {"type": "http", "query_string": f"ticket={ticket}".encode(), "headers": []}
        assert await tickets(http) is None
        assert await tickets(handshake(ticket)) is not None  # none of the above spent it

    async def test_issue_refuses_an_expiry_that_is_no_time(self) -> None:
        """An explicit ``expires_at`` must be seconds since the epoch, as an identity's
        must: issue() took NaN, a string or a bool, and the handshake that redeemed the
        ticket failed with a server error (TypeError in the resolver) or was refused."""
        store = MemoryTicketStore()
        tickets = WebSocketTickets(store)
        with bound():
            for expires_at in (float("nan"), "2000000000", True):
                with pytest.raises(TypeError, match="expires_at"):
                    await tickets.issue(expires_at=expires_at)  # type: ignore[arg-type]
            for expires_at in (float("inf"), float("-inf")):  # None is the credential's
                with pytest.raises(ValueError, match="^expires_at must be finite"):
                    await tickets.issue(expires_at=expires_at)
        assert len(store) == 0

    async def test_issue_needs_a_context_and_json_claims(self) -> None:
        tickets = WebSocketTickets()
        with pytest.raises(NoActiveContextError):
            await tickets.issue()
        with bound(key=object()), pytest.raises(TypeError, match="JSON"):
            await tickets.issue()

    async def test_the_store_keeps_a_hash_and_stays_bounded(self) -> None:
        store = MemoryTicketStore(max_tickets=3)
        tickets = WebSocketTickets(store)
        with bound():
            issued = [await tickets.issue() for _ in range(5)]
        kept = repr(store._entries)
        assert not any(ticket in kept for ticket in issued)
        for ticket in issued[:2]:  # dropped as the later ones were put, not once counted
            assert (await refused(tickets, handshake(ticket))).status == 401
        assert len(store) == 3
        for ticket in issued[2:]:
            assert await tickets(handshake(ticket)) is not None
        assert len(store) == 0

    async def test_expired_tickets_leave_the_store_as_handshakes_come(self) -> None:
        """1,000 tickets issued and never used expire: the next handshake takes them out of
        the memory store (they stayed until another ticket was issued, however long)."""
        clock = Clock()
        store = MemoryTicketStore(max_per_user=1_001, clock=clock)
        tickets = WebSocketTickets(store, ttl=30, clock=clock)
        with bound():
            for _ in range(1_000):
                await tickets.issue()
            used = await tickets.issue()
        clock.now += 20
        assert await tickets(handshake(used)) is not None
        assert len(store._entries) == 1_000  # not expired yet: kept
        clock.now += 11
        assert (await refused(tickets, handshake(used))).status == 401
        assert len(store._entries) == 0

    def test_bad_arguments(self) -> None:
        for ttl in (0, -1, 301, True, "30", float("nan")):
            with pytest.raises(ValueError, match="ttl"):
                WebSocketTickets(ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="query"):
            WebSocketTickets(query="")
        with pytest.raises(TypeError, match="put"):
            WebSocketTickets(store={})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_tickets"):
            MemoryTicketStore(max_tickets=0)
        for bad in (0, -1, True, 1.5, "16", None):
            with pytest.raises(ValueError, match="max_per_user must be an int >= 1"):
                MemoryTicketStore(max_per_user=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="max_per_user must be an int >= 1"):
                RedisTicketStore(object(), max_per_user=bad)  # type: ignore[arg-type]


@pytest.fixture(name="redis_client")
async def fixture_redis_client(anyio_backend: str) -> AsyncIterator[redis.asyncio.Redis]:
    if anyio_backend != "asyncio":
        pytest.skip("redis-py's asyncio client is asyncio-only; test_redis_store_refuses_trio")
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except redis.RedisError as error:
        service_unavailable("Redis", str(error))
    yield client
    await client.aclose()


class TestRedis:
    async def test_redeemed_once_even_when_twenty_race(
        self, redis_client: redis.asyncio.Redis
    ) -> None:
        """Twenty handshakes with one ticket, each over its own Redis connection: one gets
        in. The key is a hash of the ticket and expires with it."""
        prefix = f"ambient-test:{uuid.uuid4().hex}:"
        tickets = WebSocketTickets(RedisTicketStore(redis_client, prefix=prefix), ttl=30)
        with bound("bob"):
            ticket = await tickets.issue()
        keys = _held([key async for key in redis_client.scan_iter(match=f"{prefix}*")], prefix)
        assert len(keys) == 1
        assert ticket.encode() not in keys[0]
        assert ticket.encode() not in (await redis_client.get(keys[0]) or b"")
        assert 29_000 <= await redis_client.pttl(keys[0]) <= 30_000
        clients = [redis.asyncio.Redis.from_url(REDIS_URL) for _ in range(20)]
        racers = [WebSocketTickets(RedisTicketStore(c, prefix=prefix)) for c in clients]
        try:
            assert await race(racers, ticket) == ["bob"] + ["refused"] * 19
        finally:
            for client in clients:
                await client.aclose()
        keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
        assert _held(keys, prefix) == []

    async def test_redis_forgets_an_expired_ticket(self, redis_client: redis.asyncio.Redis) -> None:
        prefix = f"ambient-test:{uuid.uuid4().hex}:"
        tickets = WebSocketTickets(RedisTicketStore(redis_client, prefix=prefix), ttl=0.2)
        with bound():
            ticket = await tickets.issue()

        async def gone() -> bool:  # Redis expires the key by itself
            return [key async for key in redis_client.scan_iter(match=f"{prefix}*")] == []

        await _eventually(gone, "Redis expired the ticket")
        assert (await refused(tickets, handshake(ticket))).status == 401

    async def test_a_ticket_put_without_its_user_expires_in_redis_too(
        self, redis_client: redis.asyncio.Redis
    ) -> None:
        """A store wrapping the Redis store may call its plain ``put()``: the ticket's key
        expires with the ticket there as well, rather than staying in Redis for good."""
        prefix = f"ambient-test:{uuid.uuid4().hex}:"
        tickets = WebSocketTickets(GatedStore(RedisTicketStore(redis_client, prefix=prefix)))
        with bound():
            ticket = await tickets.issue()
        (key,) = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
        assert 29_000 <= await redis_client.pttl(key) <= 30_000
        assert await tickets(handshake(ticket)) is not None

    async def test_a_client_that_decodes_responses_redeems_too(
        self, redis_client: redis.asyncio.Redis
    ) -> None:
        """``decode_responses=True``, a common setup, answers str: the ticket still redeems
        (it used to be used up by a TypeError, a 500 for the handshake)."""
        prefix = f"ambient-test:{uuid.uuid4().hex}:"
        decoding = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            tickets = WebSocketTickets(RedisTicketStore(decoding, prefix=prefix))
            with bound("carol", scopes=["chat"]):
                ticket = await tickets.issue()
            identity = await tickets(handshake(ticket))
            assert identity is not None
            assert (identity.user_id, dict(identity.claims)) == ("carol", {"scopes": ["chat"]})
            assert (await refused(tickets, handshake(ticket))).status == 401
        finally:
            await decoding.aclose()

    async def test_a_store_that_cannot_be_reached_is_503_not_a_server_error(
        self, anyio_backend: str
    ) -> None:
        """Nothing listens where the store should be: issuing a ticket, redeeming one and
        revoking a user's raise IdentityUnavailableError (503, a handshake closed with
        1013), not Redis's ConnectionError."""
        from tests.servers import free_port

        if anyio_backend != "asyncio":
            pytest.skip("redis-py's asyncio client is asyncio-only; test_redis_store_refuses_trio")

        gone = redis.asyncio.Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2
        )
        try:
            tickets = WebSocketTickets(RedisTicketStore(gone))
            with bound(), pytest.raises(IdentityUnavailableError, match="ticket store"):
                await tickets.issue()
            with pytest.raises(IdentityUnavailableError, match="ticket store") as info:
                await tickets(handshake("t" * 43))
            # A ticket that cannot be one is refused as such, without asking the store.
            with pytest.raises(IdentityError) as malformed:
                await tickets(handshake("t" * 42))
            assert malformed.value.status == 401
            assert (info.value.http_status, info.value.retry_after) == (503, 5.0)
            # The store's own puts, as a store wrapping it calls them: the same 503.
            store = RedisTicketStore(gone)
            with pytest.raises(IdentityUnavailableError, match="no ticket can be issued"):
                await store.put("k" * 64, b"v", 30)
            with pytest.raises(IdentityUnavailableError, match="no ticket can be issued"):
                await store.put_for("alice", "k" * 64, b"v", 30)
            # Revoking says nothing was revoked: the caller must retry, not assume it done.
            with pytest.raises(IdentityUnavailableError, match="nothing was") as info:
                await tickets.revoke("alice")
            assert info.value.http_status == 503
            # Through the middleware, the client hears only to try again later: what the
            # server stores tickets in, and how it failed, is the server's business.
            refused = await _handshake(_served(tickets), "t" * 43)
            assert refused.status == 503
            assert _detail(refused) == IdentityUnavailableError.client_detail
        finally:
            await gone.aclose()


async def test_redis_store_refuses_trio(anyio_backend: str) -> None:
    """Under trio the Redis store fails at once with a clear error."""
    if anyio_backend != "trio":
        pytest.skip("the refusal is trio's")
    with pytest.raises(UnsupportedBackendError, match="asyncio only"):
        RedisTicketStore(object())


# -- a handshake refused for a reason that is not the ticket's ------------------------------


class GatedStore:
    """A ticket store whose next ``put`` (a refused handshake giving its ticket back) waits
    until the test lets it through."""

    def __init__(self, inner: TicketStore) -> None:
        self.inner = inner
        self.putting = anyio.Event()
        self.proceed: anyio.Event | None = None

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        proceed = self.proceed
        if proceed is not None:
            self.proceed = None
            self.putting.set()
            await proceed.wait()
        await self.inner.put(key, value, ttl)

    async def take(self, key: str) -> bytes | None:
        return await self.inner.take(key)


class Socket:
    """One websocket through the middleware in process, its client scripted by the test."""

    def __init__(self, query: str = "", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.scope = ws_scope(
            headers or [],
            query_string=query.encode(),
            extensions={"websocket.http.response": {}},
        )
        self.sent: list[dict[str, Any]] = []
        self.answered = anyio.Event()
        self.done = anyio.Event()
        self._client, self._server = anyio.create_memory_object_stream[dict[str, Any]](4)
        self._client.send_nowait({"type": "websocket.connect"})

    async def run(self, app: AmbientMiddleware) -> None:
        async def send(message: Any) -> None:
            self.sent.append(message)
            self.answered.set()

        try:
            await app(self.scope, self._server.receive, send)
        finally:
            self._client.close()
            self._server.close()
            self.done.set()

    @property
    def status(self) -> int:
        """101 for an accepted socket, else the status of the denial response."""
        first = self.sent[0]
        return 101 if first["type"] == "websocket.accept" else int(first["status"])

    def disconnect(self) -> None:
        self._client.send_nowait({"type": "websocket.disconnect", "code": 1000})


async def _open(tg: anyio.abc.TaskGroup, app: AmbientMiddleware, socket: Socket) -> Socket:
    tg.start_soon(socket.run, app)
    await socket.answered.wait()
    return socket


async def _first_of(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def _serve_socket(scope: Any, receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


@pytest.fixture(name="ticket_store", params=["memory", "redis"])
def fixture_ticket_store(request: pytest.FixtureRequest) -> TicketStore:
    if request.param == "memory":
        return MemoryTicketStore()
    client = request.getfixturevalue("redis_client")
    return RedisTicketStore(client, prefix=f"ambient-test:{uuid.uuid4().hex}:")


async def test_a_handshake_over_the_limit_gives_its_ticket_back_and_one_connection_gets_in(
    ticket_store: TicketStore,
) -> None:
    """alice already has her one socket: a handshake with a fresh ticket is 429, and its
    ticket goes back to the store before the answer (a second handshake while it is out
    is 401). Once the slot is free, two handshakes with it at once: exactly one gets in,
    and from then on the ticket is 401, never 429 again. Before, the 429 had used the
    ticket up: every retry was 401 "already used"."""
    store = GatedStore(ticket_store)
    tickets = WebSocketTickets(store)
    app = AmbientMiddleware(
        _serve_socket,
        registry=Registry(),
        identity=first_of(tickets, trusted_header(tenant_header="x-tenant-id")),
        max_concurrent_per_user=1,
    )
    with bound("alice"):
        ticket = await tickets.issue()
    query = f"ticket={ticket}"
    alice = [(b"x-user-id", b"alice"), (b"x-tenant-id", b"acme")]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            holder = await _open(tg, app, Socket(headers=alice))
            assert holder.status == 101
            store.proceed = proceed = anyio.Event()
            over = Socket(query)
            tg.start_soon(over.run, app)
            await _first_of(store.putting, over.answered)
            assert store.putting.is_set(), f"answered {over.sent[:1]} without giving it back"
            while_out = await _open(tg, app, Socket(query))
            assert while_out.status == 401
            proceed.set()
            await over.answered.wait()
            assert over.status == 429
            assert (b"retry-after", b"1") in over.sent[0]["headers"]

            holder.disconnect()
            await holder.done.wait()
            racers = [Socket(query), Socket(query)]
            for racer in racers:
                tg.start_soon(racer.run, app)
            for racer in racers:
                await racer.answered.wait()
            assert sorted(racer.status for racer in racers) == [101, 401]
            (winner,) = (racer for racer in racers if racer.status == 101)
            assert (await _open(tg, app, Socket(query))).status == 401  # not 429: not taken
            winner.disconnect()
            await winner.done.wait()
            assert (await _open(tg, app, Socket(query))).status == 401
    assert app._active == {}


async def test_a_503_before_accept_gives_the_ticket_back() -> None:
    """The app raised PoolExhaustedError before accepting (503 with Retry-After): the
    ticket is given back, and the retry gets in, once. Before, it was spent."""
    tries = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise PoolExhaustedError("the pool is busy")
        await _serve_socket(scope, receive, send)

    tickets = WebSocketTickets()
    middleware = AmbientMiddleware(app, registry=Registry(), identity=tickets)
    with bound("alice"):
        ticket = await tickets.issue()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            busy = await _open(tg, middleware, Socket(f"ticket={ticket}"))
            assert busy.status == 503
            retry = await _open(tg, middleware, Socket(f"ticket={ticket}"))
            assert retry.status == 101
            assert (await _open(tg, middleware, Socket(f"ticket={ticket}"))).status == 401
            retry.disconnect()


async def test_a_ticket_that_expired_while_out_is_not_given_back() -> None:
    """A refused handshake gives the ticket back only for what is left of its ttl."""
    clock = Clock()
    store = MemoryTicketStore()
    tickets = WebSocketTickets(store, ttl=30, clock=clock)
    with bound():
        ticket = await tickets.issue()
    identity = await tickets(handshake(ticket))
    assert identity is not None
    clock.now += 30
    await identity._refused()
    assert len(store) == 0
    with bound():
        ticket = await tickets.issue()
    identity = await tickets(handshake(ticket))
    assert identity is not None
    await identity._refused()
    await identity._refused()  # at most once
    assert await tickets(handshake(ticket)) is not None


async def test_a_ticket_given_back_expires_in_turn_with_the_ones_issued_after_it() -> None:
    """A ticket given back goes behind tickets issued after it but expires before them:
    it leaves the store when it expires (it stayed until they did) and never costs a live
    ticket its place under ``max_tickets``."""
    clock = Clock()
    store = MemoryTicketStore(max_tickets=2, clock=clock)
    tickets = WebSocketTickets(store, ttl=30, clock=clock)
    with bound():
        given_back = await tickets.issue()
        clock.now += 1
        live = await tickets.issue()
    clock.now += 1
    identity = await tickets(handshake(given_back))
    assert identity is not None
    await identity._refused()
    assert len(store) == 2
    clock.now += 28.5  # the ticket given back expired; the one issued after it did not
    assert len(store) == 1
    with bound():
        newest = await tickets.issue()
    assert (await refused(tickets, handshake(given_back))).status == 401
    assert await tickets(handshake(live)) is not None
    assert await tickets(handshake(newest)) is not None
    assert len(store) == 0


# -- one user's tickets and another's --------------------------------------------------------


async def _redeems(tickets: WebSocketTickets, ticket: str, user: str) -> None:
    identity = await tickets(handshake(ticket))
    assert identity is not None
    assert identity.user_id == user


async def test_a_user_issuing_in_a_loop_never_pushes_out_another_users_ticket() -> None:
    """alice calls the issuing endpoint in a loop: past 16 outstanding tickets, her own
    oldest go, and bob's ticket still gets in. Before, the store dropped the oldest ticket
    of all once ``max_tickets`` were out: bob's, whose handshake was then 401."""
    store = MemoryTicketStore(max_tickets=20)
    tickets = WebSocketTickets(store)
    with bound("bob"):
        bobs = await tickets.issue()
    with bound("alice"):
        alices = [await tickets.issue() for _ in range(40)]
    await _redeems(tickets, bobs, "bob")
    assert len(store) == 16
    for ticket in alices[:-16]:
        assert (await refused(tickets, handshake(ticket))).status == 401
    for ticket in alices[-16:]:
        await _redeems(tickets, ticket, "alice")
    assert len(store) == 0


async def test_redis_keeps_no_more_than_16_of_one_users_tickets(
    redis_client: redis.asyncio.Redis,
) -> None:
    """In Redis too, alice issuing in a loop holds at most 16 outstanding tickets (her
    oldest go), so that she cannot fill the Redis that every user's tickets share; bob's
    ticket still gets in. Before, every ticket she was issued stayed for its ttl."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"
    tickets = WebSocketTickets(RedisTicketStore(redis_client, prefix=prefix))
    with bound("bob"):
        bobs = await tickets.issue()
    with bound("alice"):
        alices = [await tickets.issue() for _ in range(20)]
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
    assert len(_held(keys, prefix)) == 17
    await _redeems(tickets, bobs, "bob")
    for ticket in alices[:-16]:
        assert (await refused(tickets, handshake(ticket))).status == 401
    for ticket in alices[-16:]:
        await _redeems(tickets, ticket, "alice")
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
    assert _held(keys, prefix) == []


@pytest.fixture(name="store_of_three", params=["memory", "redis"])
def fixture_store_of_three(request: pytest.FixtureRequest) -> TicketStore:
    """A ticket store that holds at most three tickets of one user."""
    if request.param == "memory":
        return MemoryTicketStore(max_per_user=3)
    client = request.getfixturevalue("redis_client")
    return RedisTicketStore(client, prefix=f"ambient-test:{uuid.uuid4().hex}:", max_per_user=3)


async def test_past_max_per_user_the_users_own_oldest_ticket_goes(
    store_of_three: TicketStore,
) -> None:
    """With ``max_per_user=3`` alice's fourth and fifth tickets drop her two oldest; the
    tickets of bob and of alice in another tenant (another user), issued before hers,
    stay."""
    assert isinstance(store_of_three, PerUserTicketStore)
    tickets = WebSocketTickets(store_of_three)
    with bound("bob"):
        bobs = await tickets.issue()
    with ambient.bind_context(UserExecutionContext.create("alice", tenant_id="globex")):
        other_tenant = await tickets.issue()
    with bound("alice"):
        alices = [await tickets.issue() for _ in range(5)]
    for ticket in alices[:2]:
        assert (await refused(tickets, handshake(ticket))).status == 401
    for ticket in (*alices[2:], other_tenant):
        await _redeems(tickets, ticket, "alice")
    await _redeems(tickets, bobs, "bob")


async def test_a_ticket_given_back_counts_once_as_the_users_newest(
    store_of_three: TicketStore,
) -> None:
    """alice holds her three tickets; the first one's handshake is refused for a reason
    that is not the ticket's and gives it back: she still holds three, that one now her
    newest, so her next ticket drops the second, and the one given back gets in."""
    tickets = WebSocketTickets(store_of_three)
    with bound("alice"):
        first, second, third = [await tickets.issue() for _ in range(3)]
    identity = await tickets(handshake(first))
    assert identity is not None
    await identity._refused()
    with bound("alice"):
        fourth = await tickets.issue()
    assert (await refused(tickets, handshake(second))).status == 401
    for ticket in (first, third, fourth):
        await _redeems(tickets, ticket, "alice")


# -- revocation ------------------------------------------------------------------------------


async def _handshake(app: AmbientMiddleware, ticket: str) -> Socket:
    """One handshake with ``ticket`` through ``app``; a socket that got in is closed again."""
    socket = Socket(f"ticket={ticket}")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await _open(tg, app, socket)
            if socket.status == 101:
                socket.disconnect()
    return socket


def _detail(socket: Socket) -> str:
    """The problem detail of a refused handshake."""
    (body,) = (m["body"] for m in socket.sent if m["type"] == "websocket.http.response.body")
    detail: str = json.loads(body)["detail"]
    return detail


def _served(tickets: WebSocketTickets, **options: Any) -> AmbientMiddleware:
    return AmbientMiddleware(_serve_socket, registry=Registry(), identity=tickets, **options)


async def test_revoke_refuses_the_users_earlier_tickets_and_no_one_elses(
    ticket_store: TicketStore,
) -> None:
    """After ``revoke("alice", tenant_id="acme")`` her outstanding tickets are 401, with the
    refusal of an unknown ticket; bob's, alice's in another tenant and alice's without a
    tenant still get in, and so does a ticket issued to her after the revocation."""
    tickets = WebSocketTickets(ticket_store)
    app = _served(tickets)
    with bound("alice"):
        earlier = [await tickets.issue() for _ in range(2)]
    with bound("bob"):
        bobs = await tickets.issue()
    with ambient.bind_context(UserExecutionContext.create("alice", tenant_id="globex")):
        other_tenant = await tickets.issue()
    with ambient.bind_context(UserExecutionContext.create("alice")):
        no_tenant = await tickets.issue()

    await tickets.revoke("alice", tenant_id="acme")
    with bound("alice"):
        later = await tickets.issue()

    unknown = await _handshake(app, "u" * 43)
    for ticket in earlier:
        revoked = await _handshake(app, ticket)
        assert revoked.status == 401
        assert _detail(revoked) == _detail(unknown)
    for ticket in (bobs, other_tenant, no_tenant, later):
        assert (await _handshake(app, ticket)).status == 101
    assert (await _handshake(app, earlier[0])).status == 401  # spent, as any refused one


async def test_revoke_takes_a_user_ref() -> None:
    """``revoke(UserRef(user_id, tenant_id))`` is ``revoke(user_id, tenant_id=...)``."""
    tickets = WebSocketTickets()
    app = _served(tickets)
    with bound("alice"):
        earlier = await tickets.issue()
    await tickets.revoke(ambient.UserRef("alice", "acme"))
    assert (await _handshake(app, earlier)).status == 401


async def test_a_ticket_given_back_after_a_refused_handshake_stays_revoked(
    ticket_store: TicketStore,
) -> None:
    """A handshake over ``max_concurrent_per_user`` (429) gives its ticket back to the store,
    with the generation it was issued under: revoked meanwhile, the retry is 401."""
    tickets = WebSocketTickets(ticket_store)
    app = AmbientMiddleware(
        _serve_socket,
        registry=Registry(),
        identity=first_of(tickets, trusted_header(tenant_header="x-tenant-id")),
        max_concurrent_per_user=1,
    )
    with bound("alice"):
        ticket = await tickets.issue()
    alice = [(b"x-user-id", b"alice"), (b"x-tenant-id", b"acme")]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            holder = await _open(tg, app, Socket(headers=alice))
            assert holder.status == 101
            assert (await _open(tg, app, Socket(f"ticket={ticket}"))).status == 429
            holder.disconnect()
            await holder.done.wait()
    await tickets.revoke("alice", tenant_id="acme")
    assert (await _handshake(app, ticket)).status == 401


class PausedStore:
    """A revocable store whose next ``put`` (issue() storing its ticket, after it read the
    generation) waits until the test lets it through."""

    def __init__(self, inner: RevocableTicketStore) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.putting = anyio.Event()
        self.proceed = anyio.Event()

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        self.calls.append("put")
        self.putting.set()
        await self.proceed.wait()
        await self.inner.put(key, value, ttl)

    async def take(self, key: str) -> bytes | None:
        return await self.inner.take(key)

    async def generation(self, user: str, keep: float) -> int:
        self.calls.append("generation")
        return await self.inner.generation(user, keep)

    async def revoke(self, user: str, keep: float) -> None:
        self.calls.append("revoke")
        await self.inner.revoke(user, keep)


async def test_a_revoke_while_a_ticket_is_being_issued_refuses_that_ticket(
    ticket_store: TicketStore,
) -> None:
    """issue() has read alice's generation but not yet stored her ticket when she is
    revoked: the ticket it then hands out carries the older generation, and is 401."""
    assert isinstance(ticket_store, RevocableTicketStore)
    store = PausedStore(ticket_store)
    tickets = WebSocketTickets(store)
    issued: list[str] = []

    async def issue() -> None:
        with bound("alice"):
            issued.append(await tickets.issue())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(issue)
            await store.putting.wait()
            await tickets.revoke("alice", tenant_id="acme")
            store.proceed.set()
    assert (await _handshake(_served(tickets), issued[0])).status == 401
    assert store.calls == ["generation", "put", "revoke", "generation"]  # the last: redeeming


async def test_a_revocation_is_seen_by_every_process_sharing_redis(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two processes (two ``WebSocketTickets`` over their own Redis clients): alice's
    tickets issued by the first are refused by both once the second revokes her, and a
    ticket the second issues after it gets in at the first. Redis keeps a hash of the user,
    for twice the longest ttl, refreshed at each revocation and each ticket issued."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"
    other = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        first = WebSocketTickets(RedisTicketStore(redis_client, prefix=prefix))
        second = WebSocketTickets(RedisTicketStore(other, prefix=prefix))
        with bound("alice"):
            earlier = [await first.issue() for _ in range(2)]
        await second.revoke("alice", tenant_id="acme")
        await second.revoke("alice", tenant_id="acme")
        with bound("alice"):
            later = await second.issue()
        assert (await _handshake(_served(first), earlier[0])).status == 401
        assert (await _handshake(_served(second), earlier[1])).status == 401
        assert (await _handshake(_served(first), later)).status == 101
        (key,) = [key async for key in redis_client.scan_iter(match=f"{prefix}revoked:*")]
        assert b"alice" not in key
        assert b"acme" not in key
        assert await redis_client.get(key) == b"2"
        assert 599_000 <= await redis_client.pttl(key) <= 600_000
        await redis_client.pexpire(key, 1_000)
        with bound("alice"):
            await first.issue()  # its ticket carries the generation: kept for it again
        assert 599_000 <= await redis_client.pttl(key) <= 600_000
    finally:
        await other.aclose()


async def test_a_revocation_outlives_every_ticket_issued_before_it_and_then_goes() -> None:
    """A ticket of the longest ttl issued just before a revocation is still refused at its
    last moment. The generation leaves the store 10 minutes after the user's latest
    revocation or ticket; from then on a new ticket reads 0 again and gets in, and the
    earlier ones stay out: they expired."""
    clock = Clock()
    store = MemoryTicketStore(clock=clock)
    tickets = WebSocketTickets(store, ttl=300, clock=clock)
    app = _served(tickets)
    with bound("alice"):
        earlier = [await tickets.issue() for _ in range(2)]
    clock.now += 1
    await tickets.revoke("alice", tenant_id="acme")
    clock.now += 298.9  # the last 0.1 s of the earlier tickets
    assert (await _handshake(app, earlier[0])).status == 401
    clock.now += 301.2  # 600.1 s after the revocation, 301.2 s after that handshake
    assert len(store._generations) == 1
    clock.now += 300
    assert (await _handshake(app, earlier[1])).status == 401
    with bound("alice"):
        after_expiry = await tickets.issue()
    assert len(store._generations) == 0
    assert (await _handshake(app, after_expiry)).status == 101


async def test_a_generation_outlives_the_tickets_that_carry_it() -> None:
    """A ticket issued 599 s after alice's revocation carries her generation; it must not
    expire a second later while the ticket is out, or a second revocation would count from
    0 again, give the ticket's generation back, and let the ticket in."""
    clock = Clock()
    tickets = WebSocketTickets(MemoryTicketStore(clock=clock), ttl=300, clock=clock)
    await tickets.revoke("alice", tenant_id="acme")
    clock.now += 599
    with bound("alice"):
        ticket = await tickets.issue()
    clock.now += 101
    await tickets.revoke("alice", tenant_id="acme")
    assert (await _handshake(_served(tickets), ticket)).status == 401


async def test_a_ticket_given_back_by_a_process_whose_clock_is_behind_stays_revoked() -> None:
    """A process whose wall clock is 1000 s behind gives a refused handshake's ticket back
    for at most its ``ttl``, not for the 1300 s its clock says are left: the store must
    not keep the ticket past the generation it carries (kept 600 s from that handshake),
    or a revocation after the generation went would count from 0 again, to the very
    generation the ticket carries, and let it in."""
    monotonic = Clock()
    store = MemoryTicketStore(clock=monotonic)
    issuer = WebSocketTickets(store, ttl=300, clock=Clock())
    behind = Clock()
    behind.now -= 1000
    app = AmbientMiddleware(
        _serve_socket,
        registry=Registry(),
        identity=WebSocketTickets(store, ttl=300, clock=behind),
        thread_id_query="thread",
    )
    await issuer.revoke("alice", tenant_id="acme")
    with bound("alice"):
        ticket = await issuer.issue()  # carries generation 1
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            refused = await _open(tg, app, Socket(f"ticket={ticket}&thread=%FF"))
    assert refused.status == 400  # not UTF-8: given back
    monotonic.now += 700
    behind.now += 700
    await issuer.revoke("alice", tenant_id="acme")  # the generation had gone: 1 again
    assert (await _handshake(app, ticket)).status == 401


async def test_redis_keeps_a_ticket_given_back_no_longer_than_its_ttl(
    redis_client: redis.asyncio.Redis,
) -> None:
    """In Redis too, a ticket given back by a process whose clock is behind is kept for at
    most its ``ttl``: never past the generation it carries."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"
    store = RedisTicketStore(redis_client, prefix=prefix)
    issuer = WebSocketTickets(store, ttl=300)
    behind = Clock()
    behind.now = time.time() - 1000
    app = AmbientMiddleware(
        _serve_socket,
        registry=Registry(),
        identity=WebSocketTickets(store, ttl=300, clock=behind),
        thread_id_query="thread",
    )
    with bound("alice"):
        ticket = await issuer.issue()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            refused = await _open(tg, app, Socket(f"ticket={ticket}&thread=%FF"))
    assert refused.status == 400
    (key,) = [key async for key in redis_client.scan_iter(match=f"{prefix}[0-9a-f]*")]
    assert 0 < await redis_client.pttl(key) <= 300_000


class FailingGenerationStore(PausedStore):
    """A revocable store whose next ``generation()`` fails as an unreachable Redis does."""

    def __init__(self, inner: RevocableTicketStore) -> None:
        super().__init__(inner)
        self.proceed.set()
        self.fail = False

    async def generation(self, user: str, keep: float) -> int:
        if self.fail:
            self.fail = False
            raise IdentityUnavailableError("the ticket store (Redis) cannot be reached")
        return await super().generation(user, keep)


async def test_a_handshake_that_cannot_read_the_generation_leaves_its_ticket_usable(
    ticket_store: TicketStore,
) -> None:
    """The store fails between taking the ticket and reading the user's generation: the
    handshake is refused as unavailable (1013, "try again"), and the retry with the same
    ticket gets in; the ticket was not at fault."""
    assert isinstance(ticket_store, RevocableTicketStore)
    store = FailingGenerationStore(ticket_store)
    tickets = WebSocketTickets(store)
    with bound("alice"):
        ticket = await tickets.issue()
    store.fail = True
    with pytest.raises(IdentityUnavailableError):
        await tickets(handshake(ticket))
    identity = await tickets(handshake(ticket))
    assert identity is not None
    assert identity.user_id == "alice"
    with pytest.raises(IdentityError, match="already used"):
        await tickets(handshake(ticket))


async def test_a_store_put_in_place_of_another_is_the_one_revocations_go_to() -> None:
    """Whether a store keeps revocations is checked once per store, not on every issue and
    handshake: a store assigned later is checked again, and revoking goes to it."""
    tickets = WebSocketTickets(MemoryTicketStore())
    with bound("alice"):
        first = await tickets.issue()
    assert await tickets(handshake(first)) is not None
    tickets.store = GatedStore(MemoryTicketStore())
    with bound("alice"):
        plain = await tickets.issue()
    with pytest.raises(TypeError, match="keeps no revocations"):
        await tickets.revoke("alice", tenant_id="acme")
    assert await tickets(handshake(plain)) is not None
    tickets.store = MemoryTicketStore()
    with bound("alice"):
        ticket = await tickets.issue()
    await tickets.revoke("alice", tenant_id="acme")
    with pytest.raises(IdentityError):
        await tickets(handshake(ticket))


async def test_revoke_refuses_bad_ids_and_stores_without_revocations() -> None:
    """Ids are checked as a context checks them; a ``UserRef`` carries its tenant; a store
    with only ``put()`` and ``take()`` issues and redeems tickets but cannot revoke."""
    tickets = WebSocketTickets()
    for user, tenant in (("", None), ("none", None), (" alice", None), (5, None), ("a", "")):
        with pytest.raises(InvalidContextError):
            await tickets.revoke(user, tenant_id=tenant)  # type: ignore[arg-type]
    with pytest.raises(InvalidContextError, match="tenant_id"):
        await tickets.revoke(ambient.UserRef("alice", "null"))
    with pytest.raises(ValueError, match="inside the UserRef"):
        await tickets.revoke(ambient.UserRef("alice", "acme"), tenant_id="acme")

    plain = WebSocketTickets(GatedStore(MemoryTicketStore()))
    with bound("alice"):
        ticket = await plain.issue()
    with pytest.raises(TypeError, match="keeps no revocations"):
        await plain.revoke("alice", tenant_id="acme")
    assert (await _handshake(_served(plain), ticket)).status == 101


# -- end to end ----------------------------------------------------------------------------


def _app(tickets: WebSocketTickets, **options: Any) -> AmbientMiddleware:
    async def issue(request: Request) -> Response:
        return JSONResponse({"ticket": await tickets.issue()})

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        ctx = ambient.get_current_context()
        await websocket.send_json({"user": ctx.user_id, "tenant": ctx.tenant_id})
        await websocket.close()

    routes = [Route("/ws-ticket", issue, methods=["POST"]), WebSocketRoute("/ws", chat)]
    return AmbientMiddleware(
        Starlette(routes=routes),
        registry=Registry(),
        identity=first_of(tickets, jwt_bearer(SECRET, algorithms=["HS256"], tenant_claim="tenant")),
        **options,
    )


@pytest.fixture(name="logs")
def fixture_logs() -> Iterator[list[str]]:
    """Every record of uvicorn's access and error logs and of ambient's, as text."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")

    keep = Keep(logging.DEBUG)
    loggers = {
        logging.getLogger(name): level
        for name, level in (
            ("", logging.INFO),
            ("uvicorn", logging.INFO),
            ("uvicorn.access", logging.INFO),
            ("ambient", logging.DEBUG),
        )
    }
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.addHandler(keep)
        logger.setLevel(level)
    yield seen
    for logger, level in saved.items():
        logger.removeHandler(keep)
        logger.setLevel(level)


async def test_thirty_browsers_trade_their_jwt_for_a_ticket_on_uvicorn(logs: list[str]) -> None:
    """30 users at once: each posts its JWT in a header for a ticket, opens the websocket
    with only the ticket in the URL, and is served as itself. A ticket used again is
    refused before the app runs. No token appears in uvicorn's access or error log or in
    ambient's."""
    app = _app(WebSocketTickets())
    now = int(time.time())
    tokens = {
        f"user-{n}": pyjwt.encode(
            {"sub": f"user-{n}", "tenant": f"t{n % 3}", "exp": now + 600},
            SECRET,
            algorithm="HS256",
        )
        for n in range(30)
    }
    replies: dict[str, Any] = {}
    reuse: list[int] = []

    def open_socket(ws_url: str, user: str, ticket: str) -> None:
        with connect(f"{ws_url}?ticket={ticket}", open_timeout=20) as sock:
            sock.send("hi")
            replies[user] = json.loads(sock.recv(timeout=10))
        with pytest.raises(InvalidStatus) as again:
            connect(f"{ws_url}?ticket={ticket}", open_timeout=20)
        reuse.append(again.value.response.status_code)

    with serve("uvicorn", app, access_log=True, log_level="info", log_config=None) as url:
        ws_url = url.replace("http", "ws") + "/ws"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def browser(user: str, token: str) -> None:
                answer = await client.post(
                    "/ws-ticket", headers={"authorization": f"Bearer {token}"}
                )
                assert answer.status_code == 200, answer.text
                ticket = answer.json()["ticket"]
                await anyio.to_thread.run_sync(open_socket, ws_url, user, ticket)

            async with anyio.create_task_group() as tg:
                for user, token in tokens.items():
                    tg.start_soon(browser, user, token)
    assert replies == {f"user-{n}": {"user": f"user-{n}", "tenant": f"t{n % 3}"} for n in range(30)}
    # Servers with the denial-response extension answer 401; others close with 1008 (403).
    assert sorted(set(reuse)) in ([401], [403])
    assert any("WebSocket /ws?ticket=" in line for line in logs)  # the access log was seen
    for token in tokens.values():
        signature = token.rsplit(".", 1)[1]
        assert not any(signature in line for line in logs)


def _refusal(url: str) -> tuple[int, str | None]:
    """The status and Retry-After of a handshake that must be refused."""
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=20)
    response = refused.value.response
    return response.status_code, response.headers.get("retry-after")


async def test_a_refused_handshake_keeps_its_ticket_for_the_retry_on_uvicorn() -> None:
    """Five users at once, one socket each at most: a handshake with a thread id that is
    not UTF-8 is 400 and the same ticket with the thread id fixed gets in; a second socket
    is 429 with Retry-After, and once the first has closed the same ticket gets in, once.
    Before, both refusals had used the ticket up: the retries were 401 "already used"."""
    app = _app(WebSocketTickets(), thread_id_query="thread", max_concurrent_per_user=1)
    now = int(time.time())
    tokens = {
        f"user-{n}": pyjwt.encode(
            {"sub": f"user-{n}", "tenant": "t", "exp": now + 600}, SECRET, algorithm="HS256"
        )
        for n in range(5)
    }
    outcomes: dict[str, list[tuple[int, str | None]]] = {}

    def sockets(ws_url: str, user: str, first: str, second: str) -> None:
        seen = outcomes[user] = [_refusal(f"{ws_url}?ticket={first}&thread=%FF")]
        with connect(f"{ws_url}?ticket={first}&thread={user}", open_timeout=20) as held:
            seen.append(_refusal(f"{ws_url}?ticket={second}"))
            held.send("bye")
            assert json.loads(held.recv(timeout=10))["user"] == user
        anyio.from_thread.run(_eventually, lambda: _left(app, user), f"{user}'s slot freed")
        with connect(f"{ws_url}?ticket={second}", open_timeout=20) as retried:
            retried.send("hi")
            assert json.loads(retried.recv(timeout=10))["user"] == user
        seen.append(_refusal(f"{ws_url}?ticket={second}"))

    with serve("uvicorn", app) as url:
        ws_url = url.replace("http", "ws") + "/ws"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def browser(user: str, token: str) -> None:
                issued = []
                for _ in range(2):
                    answer = await client.post(
                        "/ws-ticket", headers={"authorization": f"Bearer {token}"}
                    )
                    assert answer.status_code == 200, answer.text
                    issued.append(answer.json()["ticket"])
                await anyio.to_thread.run_sync(sockets, ws_url, user, *issued)

            async with anyio.create_task_group() as tg:
                for user, token in tokens.items():
                    tg.start_soon(browser, user, token)
    assert outcomes == {user: [(400, None), (429, "1"), (401, None)] for user in tokens}


async def _left(app: AmbientMiddleware, user: str) -> bool:
    return all(ref.user_id != user for ref in app._active)


async def test_an_anonymous_caller_gets_no_ticket() -> None:
    """With ``anonymous=True`` a request without credentials runs as a fresh anonymous user,
    never the user of another request. A ticket for it would carry that user id to a
    websocket as an identity, without the ``anonymous`` mark: the socket would share the
    request's anonymous user and pass for signed in. Asking for one is 401, and no
    websocket gets in as that user."""
    tickets = WebSocketTickets()
    seen: list[UserExecutionContext] = []

    async def issue(request: Request) -> Response:
        seen.append(ambient.get_current_context())
        return JSONResponse({"ticket": await tickets.issue()})

    app = Starlette(routes=[Route("/ws-ticket", issue, methods=["POST"])])
    install(app, registry=Registry(), identity=tickets, anonymous=True)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        response = await client.post("/ws-ticket")
    assert seen[0].metadata.get("anonymous") is True
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert len(tickets.store) == 0  # type: ignore[arg-type]
    with ambient.bind_context(seen[0]), pytest.raises(IdentityError) as info:
        await tickets.issue()
    assert info.value.status == 401


async def test_a_ticket_whose_credential_expired_before_its_handshake_is_refused_and_spent(
    ticket_store: TicketStore,
) -> None:
    """alice's ticket is issued under a credential that expires 5 s later, and the
    handshake comes 5 s after the issue (well within the ticket's own 30 s): it is 401,
    never a socket of a credential that is over, and the ticket is not given back. bob's,
    issued at the same time under a credential that lasts, gets in."""
    clock = Clock()
    clock.now = time.time()
    tickets = WebSocketTickets(ticket_store, ttl=30, clock=clock)
    app = _served(tickets)
    with bound("alice"):
        alices = await tickets.issue(expires_at=clock.now + 5)
    with bound("bob"):
        bobs = await tickets.issue(expires_at=clock.now + 3600)
    clock.now += 5
    refusal = await _handshake(app, alices)
    assert refusal.status == 401
    assert "unknown, expired or already used" in _detail(refusal)
    assert (await _handshake(app, bobs)).status == 101
    clock.now -= 4  # had it been given back, it would redeem now
    assert (await _handshake(app, alices)).status == 401


async def test_a_users_redeemed_tickets_take_no_room_from_the_one_still_out(
    store_of_three: TicketStore,
) -> None:
    """With ``max_per_user=3`` alice holds three tickets and redeems her two newest: one
    is outstanding. Her next ticket must not drop it, as if the redeemed ones still
    counted: both redeem. Redis lists a user's tickets and prunes the list only once it
    is full, so the prune must look at which of them still exist."""
    tickets = WebSocketTickets(store_of_three)
    with bound("alice"):
        held = [await tickets.issue() for _ in range(3)]
    for ticket in held[1:]:
        await _redeems(tickets, ticket, "alice")
    with bound("alice"):
        newest = await tickets.issue()
    await _redeems(tickets, held[0], "alice")
    await _redeems(tickets, newest, "alice")


async def test_a_revoked_user_who_never_comes_back_leaves_nothing_in_redis_for_good(
    redis_client: redis.asyncio.Redis,
) -> None:
    """A revocation of a user who issues no ticket after it: Redis still forgets the
    user's generation 10 minutes later, rather than keeping a key per banned user for
    ever."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"
    tickets = WebSocketTickets(RedisTicketStore(redis_client, prefix=prefix))
    await tickets.revoke("mallory", tenant_id="acme")
    (key,) = [key async for key in redis_client.scan_iter(match=f"{prefix}revoked:*")]
    assert 599_000 <= await redis_client.pttl(key) <= 600_000


async def test_a_user_whose_tickets_all_expired_is_bounded_again_from_the_next_one() -> None:
    """With ``max_per_user=3`` alice's three tickets all expire; she is issued one more,
    then three after it: the first of those four is dropped as her oldest, as it would be
    had none of hers expired. The store forgot her once her tickets were all gone, and
    the ticket issued then was kept outside her count: she held four."""
    clock = Clock()
    store = MemoryTicketStore(max_per_user=3, clock=clock)
    tickets = WebSocketTickets(store, ttl=30)
    with bound("alice"):
        for _ in range(3):
            await tickets.issue()
        clock.now += 31
        first = await tickets.issue()
        later = [await tickets.issue() for _ in range(3)]
    assert len(store) == 3
    assert (await refused(tickets, handshake(first))).status == 401
    for ticket in later:
        await _redeems(tickets, ticket, "alice")


async def test_one_ticket_past_max_per_user_drops_the_users_oldest(
    store_of_three: TicketStore,
) -> None:
    """With ``max_per_user=3`` alice's fourth ticket drops her first at once: she never
    holds four, not even for one ticket until the next is issued."""
    tickets = WebSocketTickets(store_of_three)
    with bound("alice"):
        first, *rest = [await tickets.issue() for _ in range(4)]
    assert (await refused(tickets, handshake(first))).status == 401
    for ticket in rest:
        await _redeems(tickets, ticket, "alice")


async def test_the_memory_store_drops_a_ticket_at_its_deadline() -> None:
    """A ticket is held until its deadline, not at it: from then on ``take()`` answers
    ``None`` and ``len()`` no longer counts it, whether it was put in the order of the
    deadlines or before a ticket put earlier with a later one (a ticket given back)."""
    clock = Clock()
    store = MemoryTicketStore(clock=clock)
    for key in "abc":
        await store.put(key * 64, key.encode(), 30)
    await store.put("d" * 64, b"d", 10)
    clock.now += 10
    assert len(store) == 3
    clock.now += 19.5
    assert await store.take("a" * 64) == b"a"
    clock.now += 0.5
    assert await store.take("b" * 64) is None
    assert len(store) == 0


async def test_tickets_given_back_and_redeemed_leave_no_trace_in_the_memory_store() -> None:
    """Tickets given back after a refused handshake, then redeemed on the retry, before a
    ticket put earlier with a later deadline: the memory store keeps no note of them past
    a bound (a client retrying in a loop grew it without end), and when their deadlines
    pass the live ticket stays and a ticket given back since still expires on time."""
    clock = Clock()
    store = MemoryTicketStore(clock=clock)
    await store.put("l" * 64, b"live", 300)
    for n in range(200):
        key = f"{n:064d}"
        await store.put(key, b"given back", 10)
        assert await store.take(key) == b"given back"
        assert len(store._early) <= 2 * len(store._entries) + 9
    await store.put("g" * 64, b"given back", 10)
    assert len(store) == 2
    clock.now += 10
    assert len(store) == 1
    assert await store.take("g" * 64) is None
    assert await store.take("l" * 64) == b"live"


async def test_a_key_put_again_is_held_to_its_last_deadline_for_its_last_user() -> None:
    """A store's ``put_for()`` of a key it holds replaces the ticket: the key is held to
    the new deadline (not dropped at the old, earlier one) and counts among the new
    user's tickets only, so that the old user's next ticket drops none of the new one's."""
    clock = Clock()
    store = MemoryTicketStore(max_per_user=1, clock=clock)
    await store.put_for("carol", "c" * 64, b"carol", 200)
    await store.put_for("bob", "b" * 64, b"bob", 200)
    await store.put_for("alice", "k" * 64, b"alice", 10)  # earlier than bob's: an early one
    await store.put_for("bob", "k" * 64, b"bob again", 300)
    assert await store.take("b" * 64) is None  # bob's one ticket is the one put last
    await store.put_for("alice", "a" * 64, b"alice", 300)
    clock.now += 10  # the deadline the key was first put with
    assert len(store) == 3
    assert await store.take("k" * 64) == b"bob again"
    assert await store.take("a" * 64) == b"alice"
    assert await store.take("c" * 64) == b"carol"
    assert len(store) == 0


async def test_a_refused_handshakes_ticket_goes_back_once() -> None:
    """A handshake refused for a reason not the ticket's gives it back once: after the
    retry got in with it, the first handshake giving it back again does not make it
    usable a second time."""
    tickets = WebSocketTickets()
    with bound("alice"):
        ticket = await tickets.issue()
    first = await tickets(handshake(ticket))
    assert first is not None
    await first._refused()
    await _redeems(tickets, ticket, "alice")
    await first._refused()
    assert (await refused(tickets, handshake(ticket))).status == 401


async def test_a_copy_of_a_tickets_identity_is_refused_as_the_middleware_says() -> None:
    """A resolver wrapping the tickets returns a copy of the identity they redeemed (an
    Identity is a frozen dataclass: ``dataclasses.replace()`` to add claims). The handshake
    refused for a bad thread id is 400, as any other: the copy knew nothing of the ticket
    it came from, and giving it back raised an AttributeError, a server error. The ticket
    stays spent."""
    tickets = WebSocketTickets()

    async def resolver(scope: Any) -> Identity | None:
        identity = await tickets(scope)
        return None if identity is None else dataclasses.replace(identity, claims={"via": "x"})

    app = AmbientMiddleware(
        _serve_socket, registry=Registry(), identity=resolver, thread_id_query="thread"
    )
    with bound("alice"):
        ticket = await tickets.issue()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            refusal = await _open(tg, app, Socket(f"ticket={ticket}&thread=%FF"))
    assert refusal.status == 400
    assert (await _handshake(app, ticket)).status == 401


async def test_a_users_expired_ticket_takes_no_room_from_her_live_ones() -> None:
    """alice holds three tickets; the first, given back after a refused handshake, expires
    before the other two: her next ticket finds it gone and drops none of the live ones
    (though the one that expired was put last)."""
    clock = Clock()
    store = MemoryTicketStore(max_per_user=3, clock=clock)
    tickets = WebSocketTickets(store, ttl=30, clock=clock)
    with bound("alice"):
        first = await tickets.issue()
        clock.now += 10
        second, third = await tickets.issue(), await tickets.issue()
    identity = await tickets(handshake(first))
    assert identity is not None
    await identity._refused()
    clock.now += 25
    with bound("alice"):
        fourth = await tickets.issue()
    assert (await refused(tickets, handshake(first))).status == 401
    for ticket in (second, third, fourth):
        await _redeems(tickets, ticket, "alice")


async def test_a_bool_exp_claim_gives_the_ticket_no_expiry() -> None:
    """``exp: true`` is no time (as jwt_bearer() reads it): the ticket's socket has no
    expiry from it, rather than one in 1970 that refuses the handshake."""
    tickets = WebSocketTickets()
    with bound(exp=True):
        ticket = await tickets.issue()
    identity = await tickets(handshake(ticket))
    assert identity is not None
    assert identity.expires_at is None


# Pieces of a handshake's query string: an issued ticket (by number; percent-escaped too),
# or something else a client may send.
query_pieces = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["ticket", "escaped"]), st.integers(0, 2)),
        st.tuples(
            st.just("raw"),
            st.sampled_from(
                [
                    "ticket=",
                    "ticket",
                    "ticket=short",
                    "ticket=" + "A" * 43,
                    "TICKET=x",
                    "tickets=x",
                    "thread=t-1",
                    "thread=null",
                    "thread=%FF",
                    "thread=",
                    "other=1",
                ]
            ),
        ),
    ),
    max_size=3,
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(handshakes=st.lists(query_pieces, min_size=1, max_size=6), denied=st.booleans())
def test_any_query_strings_let_each_ticket_open_one_socket_at_most(
    backend: str, handshakes: list[list[tuple[str, Any]]], denied: bool
) -> None:
    """Handshakes one after another with any query strings around three users' tickets
    (repeated, percent-escaped, replayed, unknown, beside good and bad thread ids): a
    socket opens exactly when one ``ticket`` parameter holds an issued ticket that
    opened none yet and the thread id is fine, for that ticket's user; a ticket whose
    handshake was refused for its thread id opens the next; any other handshake is
    refused (400 for a repeated parameter or a bad thread id, 401 for a ticket that
    opens nothing or none), never served or failed."""
    tickets = WebSocketTickets()

    async def issue() -> list[str]:
        issued = []
        for user in ("u-0", "u-1", "u-2"):
            with bound(user):
                issued.append(await tickets.issue())
        return issued

    issued = anyio.run(issue, backend=backend)
    opened: set[str] = set()
    for pieces in handshakes:
        query = "&".join(
            value
            if kind == "raw"
            else f"ticket={issued[value]}"
            if kind == "ticket"
            else "ticket=" + "".join(f"%{ord(char):02X}" for char in issued[value])
            for kind, value in pieces
        )
        ledger = Ledger()
        middleware = AmbientMiddleware(
            context_app,
            registry=build_registry(ledger),
            identity=tickets,
            thread_id_query="thread",
        )
        extensions = {"websocket.http.response": {}} if denied else {}
        scope = ws_scope([], query_string=query.encode(), extensions=extensions)
        seen, _, status, said = served_or_refused(middleware, ledger, scope, backend)

        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        named = [value for key, value in pairs if key == "ticket"]
        threads = [value for key, value in pairs if key == "thread"]
        thread_ok = threads in ([], ["t-1"]) and "%FF" not in query
        usable = len(named) == 1 and named[0] in issued and named[0] not in opened
        assert (seen is not None) == (usable and thread_ok), (query, status, said)
        if seen is not None:
            opened.add(named[0])
            assert seen["user"] == f"u-{issued.index(named[0])}"
        elif denied:
            # The ticket is checked first, then whether there was one, then the thread id.
            expected = 400 if len(named) > 1 or (usable and not thread_ok) else 401
            assert status == expected, (query, said)
        assert all(ticket not in said for ticket in issued)


class FailingPutStore(MemoryTicketStore):
    """A memory store whose puts fail, once ``fail`` is set, as an unreachable Redis's do."""

    fail = False

    async def put_for(self, user: str, key: str, value: bytes, ttl: float) -> None:
        if self.fail:
            raise IdentityUnavailableError("the ticket store (Redis) cannot be reached")
        await super().put_for(user, key, value, ttl)


async def test_a_ticket_the_store_cannot_take_back_leaves_the_refusal_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store fails as a refused handshake gives its ticket back: the refusal goes on
    (no error of the store's in its place), the failure is logged, and the ticket stays
    spent."""
    store = FailingPutStore()
    tickets = WebSocketTickets(store)
    with bound("alice"):
        ticket = await tickets.issue()
    identity = await tickets(handshake(ticket))
    assert identity is not None
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        await identity._refused()
    assert ["could not be given back" in r.getMessage() for r in caplog.records] == [True]
    assert (await refused(tickets, handshake(ticket))).status == 401


async def test_a_ticket_that_expired_while_out_takes_no_live_tickets_room(
    store_of_three: TicketStore,
) -> None:
    """alice's first ticket expires while its handshake is out, and she is issued three
    more, as many as she may hold; the handshake is then refused for a reason that is not
    the ticket's. The ticket stays spent, and her three live tickets all redeem: giving
    back a ticket with no time left dropped her oldest live one to make room for it."""
    clock = Clock()
    tickets = WebSocketTickets(store_of_three, ttl=30, clock=clock)
    with bound("alice"):
        first = await tickets.issue()
    identity = await tickets(handshake(first))
    assert identity is not None
    clock.now += 30
    with bound("alice"):
        live = [await tickets.issue() for _ in range(3)]
    await identity._refused()
    assert (await refused(tickets, handshake(first))).status == 401
    for ticket in live:
        await _redeems(tickets, ticket, "alice")


async def test_users_whose_ids_read_alike_put_together_are_revoked_apart(
    ticket_store: TicketStore,
) -> None:
    """A user's revocations and bound are kept under their user and tenant ids together,
    and no joining of the two reads alike for two users: revoking alice of ``acme`` leaves
    the tickets of ``aliceacme`` (no tenant) and of ``alic`` of ``eacme``, and revoking
    ``a:b`` of ``c`` leaves ``a`` of ``b:c``'s."""
    tickets = WebSocketTickets(ticket_store)
    app = _served(tickets)
    users = [("alice", "acme"), ("aliceacme", None), ("alic", "eacme"), ("a:b", "c"), ("a", "b:c")]
    issued = {}
    for user, tenant in users:
        with ambient.bind_context(UserExecutionContext.create(user, tenant_id=tenant)):
            issued[user, tenant] = await tickets.issue()
    await tickets.revoke("alice", tenant_id="acme")
    await tickets.revoke("a:b", tenant_id="c")
    assert {user: (await _handshake(app, ticket)).status for user, ticket in issued.items()} == {
        ("alice", "acme"): 401,
        ("aliceacme", None): 101,
        ("alic", "eacme"): 101,
        ("a:b", "c"): 401,
        ("a", "b:c"): 101,
    }


async def test_redis_keeps_a_users_list_as_long_as_her_longest_lived_ticket(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Two processes share a Redis store, one issuing tickets of 300 s, the other of 30 s.
    alice's 30-s ticket, past her bound, prunes her list of outstanding tickets: the list
    still lives as long as the 300-s ticket it names. Were it to go with the 30-s one, her
    next tickets would start a list that does not count the 300-s one, and she would hold
    more than her bound."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"
    store = RedisTicketStore(redis_client, prefix=prefix, max_per_user=2)
    long_lived = WebSocketTickets(store, ttl=300)
    short_lived = WebSocketTickets(store, ttl=30)
    with bound("alice"):
        first, second = await long_lived.issue(), await long_lived.issue()
        third = await short_lived.issue()
    (held,) = [key async for key in redis_client.scan_iter(match=f"{prefix}held:*")]
    assert 299_000 <= await redis_client.pttl(held) <= 300_000
    assert (await refused(long_lived, handshake(first))).status == 401
    await _redeems(long_lived, second, "alice")
    await _redeems(short_lived, third, "alice")


async def test_the_memory_store_forgets_users_whose_tickets_are_all_gone() -> None:
    """200 users are each issued two tickets: one redeemed, the other expired. The memory
    store then keeps no note of any of them (it kept an empty one for each user who ever
    held a ticket, for as long as the process ran)."""
    clock = Clock()
    store = MemoryTicketStore(clock=clock)
    tickets = WebSocketTickets(store, ttl=30, clock=clock)
    for n in range(200):
        with bound(f"user-{n}"):
            redeemed = await tickets.issue()
            await tickets.issue()
        await _redeems(tickets, redeemed, f"user-{n}")
    clock.now += 30
    assert len(store) == 0
    assert store._users == {}


async def test_a_revocation_keeps_the_generation_for_its_keep_from_its_own_call() -> None:
    """The memory store's ``revoke(user, keep)`` keeps the generation ``keep`` seconds from
    that call, as a ``RevocableTicketStore`` must: a second revocation 599 s after the
    first, with no ticket between, is still counted 2 s later."""
    clock = Clock()
    store = MemoryTicketStore(clock=clock)
    await store.revoke("u", 600)
    clock.now += 599
    await store.revoke("u", 600)
    clock.now += 2
    assert await store.generation("u", 600) == 2
    clock.now += 600
    assert await store.generation("u", 600) == 0
