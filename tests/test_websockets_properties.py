"""Per-user websocket channels, property-based: generated sequences of sockets opening,
sending, leaving cleanly or reset by their client, sends from requests and from other
sockets, revocations and hub shutdowns, some racing each other, replayed against a model
of what the contract promises.

The in-process runs drive the hub through real registries, scopes and managers on asyncio
and trio, with sockets that keep what they are sent (and fail every send once their client
is reset, as uvicorn's do); the Redis runs put two hubs (two processes) on one real Redis
(asyncio only, as redis-py is); the server runs replay them through ``tests.ws_app`` on
uvicorn and hypercorn's trio worker with real clients over loopback, a reset being a TCP
RST. Every wait is on an event, bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import hypothesis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import ambient
from ambient import Registry, UserExecutionContext, UserRef
from ambient.integrations.websockets import (
    Broadcast,
    Connection,
    ConnectionHub,
    InProcessBroadcast,
    RedisBroadcast,
    UserWebSocketManager,
    message_scope,
)
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.apps import BUILT, Ledger, Probe, build_registry
from tests.conftest import REDIS_URL, service_unavailable
from tests.servers import serve
from tests.test_websockets import abort_with_rst, expect_pong
from tests.ws_app import Sockets, build_app

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# A bound against a hang per example: each takes milliseconds when nothing is wrong.
DEADLINE = 5.0
# One user id in two tenants and in none, and a second id: each pair is another user.
USERS = [UserRef("alice"), UserRef("alice", "acme"), UserRef("alice", "globex"), UserRef("bob")]
THREADS = ["chat", "tools"]
CAP = 2  # max_connections_per_user: a third socket of a user replaces the oldest


class Changes:
    """Wakes whoever waits for the sockets to change (a frame, a close, a handler out)."""

    def __init__(self) -> None:
        self._changed = anyio.Event()

    def notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()


class Heard(RedisBroadcast):
    """A RedisBroadcast that says when its reader has handled a message (a revocation
    that ended no socket here included)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.changes: Changes | None = None

    def _handle(self, message: list[Any]) -> None:
        super()._handle(message)
        if self.changes is not None:
            self.changes.notify()


class ClientSocket:
    """The server side of one client's socket: keeps the events it is sent (their numbers)
    and the codes it is closed with; once its client reset the connection, every send and
    close raises, as uvicorn's do."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.frames: list[int] = []
        self.closes: list[int] = []
        self.reset = False
        self.failed_sends = 0

    async def accept(self) -> None:
        pass

    async def send_text(self, data: str) -> None:
        if self.reset:
            self.failed_sends += 1
            raise ConnectionResetError
        self.frames.append(json.loads(data)["n"])
        self.changes.notify()

    async def send_bytes(self, data: bytes) -> None:
        raise AssertionError(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closes.append(code)
        self.changes.notify()
        if self.reset:
            raise ConnectionResetError


@dataclass
class Held:
    """One socket of the scenario, as the model sees it, and its handler."""

    process: int  # which hub (process) holds it
    user: UserRef
    thread: str
    number: int
    # Its user's n-th socket: the same ids come again for every user, as random ones may.
    connection_id: str
    socket: ClientSocket
    commands: Any = None  # the handler's inbox: ("leave",) or ("send", how, numbers, done)
    out: bool = False  # the handler left connect() and its scope
    connection: Connection | None = None
    registered: bool = True  # the model says its hub holds it
    expected: list[int] = field(default_factory=list)
    # Events of a race this socket was ended in: it gets a prefix of them.
    racy: list[int] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)


def event(n: int) -> dict[str, int]:
    return {"n": n}


@dataclass
class Process:
    """One process's hub, its registry and the model's counts of what the hub did."""

    hub: ConnectionHub
    registry: Registry
    failures: int = 0
    # Failed sends the hub may or may not count: a reset racing the last events.
    maybe_failures: int = 0
    replaced: int = 0
    revoked: int = 0

    async def start(self) -> None:
        """What the application's lifespan startup does: with Redis, the subscription is
        up and the recent revocations read before any handshake (as the README says)."""
        backend = self.hub.backend
        if isinstance(backend, RedisBroadcast):
            await backend.wait_connected()

    async def restart(self) -> None:
        """The process shuts down (its registry closes the hub) and starts again."""
        await self.hub.aclose()
        await self.start()


class Scenario:
    """The hubs (one per process), the sockets and the model of what each must get."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, backends: list[Callable[[], Broadcast | None]]
    ) -> None:
        self.ledger = Ledger()
        self.processes: list[Process] = []
        for backend in backends:
            registry = build_registry(self.ledger)
            hub = ConnectionHub(backend(), max_connections_per_user=CAP)
            hub.install(registry)
            self.processes.append(Process(hub, registry))
        self.tg = tg
        self.changes = Changes()
        for process in self.processes:
            if isinstance(process.hub.backend, Heard):
                process.hub.backend.changes = self.changes
        self.sockets: list[Held] = []
        self.numbers = 0  # events sent so far

    # -- the model -----------------------------------------------------------------------

    def registered(self, user: UserRef | None = None, process: int | None = None) -> list[Held]:
        """Sockets the model says a hub holds: of ``user``, in ``process``, if named."""
        return [
            h
            for h in self.sockets
            if h.registered and user in (None, h.user) and process in (None, h.process)
        ]

    def targets(self, user: UserRef, thread: str | None) -> list[Held]:
        return [h for h in self.registered(user) if thread in (None, h.thread)]

    def deliver(self, n: int, targets: list[Held]) -> None:
        """Event ``n`` reaches ``targets``; one whose client reset fails, and leaves."""
        for held in targets:
            if held.socket.reset:
                held.registered = False
                self.processes[held.process].failures += 1
            else:
                held.expected.append(n)

    def end(self, ended: list[Held], code: int) -> None:
        for held in ended:
            held.registered = False
            held.closes.append(code)

    def next_number(self) -> int:
        self.numbers += 1
        return self.numbers

    # -- the driver ----------------------------------------------------------------------

    async def open(self, process: int, user: UserRef, thread: str) -> None:
        connection_id = f"c-{sum(h.user == user for h in self.sockets)}"
        socket = ClientSocket(self.changes)
        held = Held(process, user, thread, len(self.sockets), connection_id, socket)
        mine = self.registered(user, process)
        if len(mine) >= CAP:
            self.end(mine[:1], 1008)  # the oldest
            self.processes[process].replaced += 1
        self.sockets.append(held)
        await self.tg.start(self._handler, held)

    async def _handler(self, held: Held, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[Any, ...]](10)
        held.commands = send
        context = UserExecutionContext.create(
            held.user.user_id,
            tenant_id=held.user.tenant_id,
            thread_id=held.thread,
            connection_id=held.connection_id,
        )
        registry = self.processes[held.process].registry
        try:
            async with registry.open_scope(context) as scope:
                manager = await scope.resolve(UserWebSocketManager)
                await scope.resolve(Probe)  # counted: cleaned exactly once
                async with manager.connect(held.socket) as connection, receive:
                    held.connection = connection
                    task_status.started()
                    async for command in receive:
                        if command[0] == "leave":
                            break
                        _, how, numbers, done = command
                        async with message_scope():
                            mine = await ambient.resolve(UserWebSocketManager)
                            for n in numbers:
                                if how == "thread":
                                    await mine.send(event(n))
                                elif how == "user":
                                    await mine.broadcast_user(event(n))
                                else:
                                    await connection.send(event(n))
                        done.set()
        finally:
            send.close()
            held.out = True
            self.changes.notify()

    async def request(
        self, process: int, user: UserRef, thread: str, how: str, count: int
    ) -> list[int]:
        """An HTTP request of ``user`` on ``thread`` sends ``count`` events."""
        numbers = [self.next_number() for _ in range(count)]
        context = UserExecutionContext.create(
            user.user_id, tenant_id=user.tenant_id, thread_id=thread
        )
        async with self.processes[process].registry.open_scope(context) as scope:
            manager = await scope.resolve(UserWebSocketManager)
            await scope.resolve(Probe)
            for n in numbers:
                if how == "thread":
                    await manager.send(event(n))
                else:
                    await manager.broadcast_user(event(n))
        return numbers

    async def settle(self) -> None:
        """Wait until every socket has what the model says it gets, and every handler the
        model says is out is out (bounded by the example's deadline)."""

        def done() -> bool:
            return all(
                (h.registered or h.out)
                and (h.socket.reset or len(h.socket.frames) >= len(h.expected))
                for h in self.sockets
            )

        await self.changes.until(done)

    def check(self) -> None:
        for held in self.sockets:
            got = held.socket.frames
            assert got[: len(held.expected)] == held.expected, (held.number, got, held.expected)
            rest = got[len(held.expected) :]
            assert rest == held.racy[: len(rest)], (held.number, got, held.expected, held.racy)
            assert held.socket.closes == held.closes, (held.number, held.socket.closes)
        for number, process in enumerate(self.processes):
            stats = process.hub.stats()
            registered = self.registered(process=number)
            users = {h.user for h in registered}
            assert (stats.connections, stats.users) == (len(registered), len(users)), stats
            assert (stats.replaced, stats.revoked, stats.queued) == (
                process.replaced,
                process.revoked,
                0,
            ), stats
            low = process.failures
            assert low <= stats.send_failures <= low + process.maybe_failures, stats
            held_by_hub = {
                (c.user, c.connection_id) for cs in process.hub._users.values() for c in cs.values()
            }
            assert held_by_hub == {(h.user, h.connection_id) for h in registered}
            backend = process.hub.backend
            if isinstance(backend, RedisBroadcast):
                # A channel subscribed here for each user with a socket here, and no other.
                assert set(backend._refs) == {backend.channel(user) for user in users}

    # -- the operations --------------------------------------------------------------------

    def pick(self, k: int, *, reset: bool | None = None) -> Held | None:
        """The ``k``-th (modulo) socket whose handler is in its block (and whose client
        did or did not reset, if ``reset`` says)."""
        live = [h for h in self.registered() if reset in (None, h.socket.reset)]
        return live[k % len(live)] if live else None

    async def leave(self, held: Held) -> None:
        """The handler leaves its block (its client closed, or it noticed the reset)."""
        held.registered = False
        await held.commands.send(("leave",))
        await self.changes.until(lambda: held.out)

    async def revoke(self, process: int, user: UserRef, one: Held | None = None) -> None:
        """An administrator revokes ``user`` (or only the connection of ``one``) through
        the hub of ``process``; it returns how many sockets it ended there."""
        mine = self.registered(user, process)
        if one is not None:
            mine = [h for h in mine if h is one]
        ended = await self.processes[process].hub.revoke(
            user.user_id,
            tenant_id=user.tenant_id,
            connection_id=None if one is None else one.connection_id,
        )
        assert ended == len(mine)

    async def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        hypothesis.event(kind)
        p = op[1] % len(self.processes)
        if kind == "open":
            _, _, u, t = op
            await self.open(p, USERS[u], THREADS[t])
        elif kind == "leave":
            held = self.pick(op[2])
            if held is not None:
                await self.leave(held)
        elif kind == "reset":
            held = self.pick(op[2], reset=False)
            if held is not None:
                held.socket.reset = True
        elif kind == "request":
            _, _, u, t, how, count = op
            user, thread = USERS[u], THREADS[t]
            for n in await self.request(p, user, thread, how, count):
                self.deliver(n, self.targets(user, thread if how == "thread" else None))
        elif kind == "from_socket":
            _, _, k, how, count = op
            held = self.pick(k, reset=False)
            if held is None:
                return
            numbers = [self.next_number() for _ in range(count)]
            done = anyio.Event()
            await held.commands.send(("send", how, numbers, done))
            await done.wait()
            for n in numbers:
                if how == "self":
                    self.deliver(n, [held])
                else:
                    thread = held.thread if how == "thread" else None
                    self.deliver(n, self.targets(held.user, thread))
        elif kind == "revoke":
            user = USERS[op[2]]
            await self.revoke(p, user)
            self.revoked(self.registered(user))
        elif kind == "revoke_one":
            held = self.pick(op[2])
            if held is not None:
                await self.revoke(p, held.user, held)
                self.revoked([held])
        elif kind == "close_hub":
            mine = self.registered(process=p)
            await self.processes[p].restart()
            self.end(mine, 1001)
        elif kind == "race_open":
            await self.race_open(p, *op[2:])
        else:
            await self.race(p, *op[2:])

    def revoked(self, ended: list[Held]) -> None:
        for held in ended:
            self.processes[held.process].revoked += 1
        self.end(ended, 4001)

    async def race(
        self, p: int, u: int, t: int, how: str, count: int, k: int, ending: str, delay: int
    ) -> None:
        """A request sends ``count`` events while, ``delay`` steps in, a socket leaves or
        is reset, its user is revoked, or a hub closes: what was sent before reaches
        every socket, what after reaches none of those ended, in order either way."""
        for reset in [h for h in self.registered() if h.socket.reset]:
            await self.leave(reset)  # noticed first: a race decides nothing for them
        victim = self.pick(k)
        if victim is None:
            return
        user, thread = USERS[u], THREADS[t]
        targets = self.targets(user, thread if how == "thread" else None)
        if ending in ("leave", "reset"):
            ended = [victim]
        elif ending == "revoke":
            ended = self.registered(victim.user)
        else:
            ended = self.registered(process=victim.process)
        sent: list[int] = []

        async def send() -> None:
            sent.extend(await self.request(p, user, thread, how, count))

        async def end() -> None:
            for _ in range(delay):
                await anyio.lowlevel.checkpoint()
            if ending == "leave":
                victim.registered = False
                await victim.commands.send(("leave",))
            elif ending == "reset":
                victim.socket.reset = True
            elif ending == "revoke":
                await self.revoke(victim.process, victim.user)
            else:
                await self.processes[victim.process].restart()

        async with anyio.create_task_group() as race:
            race.start_soon(send)
            race.start_soon(end)
        for held in ended:
            if held in targets:
                held.racy = list(sent)
        for n in sent:
            self.deliver(n, [h for h in targets if h not in ended])
        if ending == "reset":
            # Dropped at its first failed send (its block ends), or, none came after the
            # reset, its handler notices it now.
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await victim.commands.send(("leave",))
            await self.changes.until(lambda: victim.out)
            self.processes[victim.process].maybe_failures += 1
        elif ending == "revoke":
            self.revoked(ended)
        elif ending == "close_hub":
            self.end(ended, 1001)
        for held in ended:
            held.registered = False

    async def race_open(self, p: int, u: int, t: int, ending: str, q: int, delay: int) -> None:
        """A socket of a user opens in process ``p`` while, ``delay`` steps in, the user
        is revoked through process ``q`` or process ``p`` shuts down: the socket is ended
        with the others (4001, 1001) or gets in and stays, and either way every count and
        every later event agrees with which."""
        user, thread = USERS[u], THREADS[t]
        q %= len(self.processes)
        if len(self.registered(user, p)) >= CAP:
            return  # no replacement in the race
        for reset in [h for h in self.registered() if h.socket.reset]:
            await self.leave(reset)
        ended = self.registered(user) if ending == "revoke" else self.registered(process=p)
        connection_id = f"c-{sum(h.user == user for h in self.sockets)}"
        held = Held(p, user, thread, len(self.sockets), connection_id, ClientSocket(self.changes))
        self.sockets.append(held)

        async def end() -> None:
            for _ in range(delay):
                await anyio.lowlevel.checkpoint()
            if ending == "revoke":
                await self.processes[q].hub.revoke(user.user_id, tenant_id=user.tenant_id)
            else:
                await self.processes[p].restart()

        async with anyio.create_task_group() as race:
            race.start_soon(end)
            await self.tg.start(self._handler, held)
        if ending == "revoke":
            hub = self.processes[p].hub
            # Until the revocation reached process p: it ends the socket if it came after
            # the socket began to join.
            await self.changes.until(lambda: (user, None) in hub._recent)
            self.revoked(ended)
        else:
            self.end(ended, 1001)
        assert held.connection is not None
        code = held.connection.close_code
        if code == 4001:
            self.revoked([held])
        elif code is not None:
            self.end([held], code)

    async def finish(self) -> None:
        """Every client leaves; the registries shut down."""
        for held in self.registered():
            await self.leave(held)
        await self.settle()
        self.check()
        for process in self.processes:
            await process.registry.aclose()
            BUILT.remove(process.registry)  # closed here: nothing left for close_built()
            hub = process.hub
            # Also when no request resolved it, and so the registry does not own it.
            await hub.aclose()
            assert (hub._users, hub._joining, hub._joining_ids, hub._leaving, hub._open) == (
                {},
                set(),
                {},
                set(),
                set(),
            )
        assert self.ledger.problems() == []


users = st.integers(0, len(USERS) - 1)
threads = st.integers(0, len(THREADS) - 1)
processes = st.integers(0, 1)  # which hub: taken modulo the scenario's number of them
picks = st.integers(0, 7)
hows = st.sampled_from(["thread", "user"])
counts = st.integers(1, 3)
opens = st.tuples(st.just("open"), processes, users, threads)
operations = st.one_of(
    opens,
    opens,
    st.tuples(st.just("leave"), processes, picks),
    st.tuples(st.just("reset"), processes, picks),
    st.tuples(st.just("request"), processes, users, threads, hows, counts),
    st.tuples(
        st.just("from_socket"),
        processes,
        picks,
        st.sampled_from(["thread", "user", "self"]),
        counts,
    ),
    st.tuples(st.just("revoke"), processes, users),
    st.tuples(st.just("revoke_one"), processes, picks),
    st.tuples(st.just("close_hub"), processes),
    st.tuples(
        st.just("race_open"),
        processes,
        users,
        threads,
        st.sampled_from(["revoke", "close_hub"]),
        processes,
        st.integers(0, 6),
    ),
    st.tuples(
        st.just("race"),
        processes,
        users,
        threads,
        hows,
        st.integers(1, 4),
        picks,
        st.sampled_from(["leave", "reset", "revoke", "close_hub"]),
        st.integers(0, 6),
    ),
)
scenarios = st.tuples(
    st.lists(opens, min_size=1, max_size=8), st.lists(operations, min_size=1, max_size=30)
).map(lambda parts: [*parts[0], *parts[1]])


async def play(ops: list[tuple[Any, ...]], backends: list[Callable[[], Broadcast | None]]) -> None:
    """Run ``ops`` on hubs over ``backends``, checking the model after each step."""
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            scenario = Scenario(tg, backends)
            for process in scenario.processes:
                await process.start()
            for op in ops:
                await scenario.run(op)
                await scenario.settle()
                scenario.check()
            await scenario.finish()


@BACKENDS
@PROPERTY
@given(ops=scenarios)
def test_every_event_reaches_exactly_its_users_open_sockets_in_order(
    backend: str, ops: list[tuple[Any, ...]]
) -> None:
    """Four users (one id in no tenant and in two tenants, and another id), two threads,
    at most two sockets each; sockets open, leave, are reset by their client, get events
    from requests and from their own or another socket's handler, are revoked (all of a
    user's or one), replaced or shut down with the hub, also while events are on their
    way or while a socket of the user is still connecting. After each step every socket
    got exactly its user's (and thread's) events, each once, in the order sent, and no
    other user's; one ended in a race got a prefix of the race's events; the hub's counts
    and its registry of sockets are the model's; at the end every component made for a
    socket or a request was cleaned exactly once and nothing stays in the hub."""
    anyio.run(play, ops, [InProcessBroadcast], backend=backend)


@pytest.fixture(name="redis_url")
def fixture_redis_url() -> str:
    """The shared test Redis (the property runs on asyncio only: RedisBroadcast is)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        service_unavailable("Redis", str(error))
    finally:
        client.close()
    return REDIS_URL


@settings(PROPERTY, max_examples=100)
@given(ops=scenarios)
def test_two_processes_on_one_redis_deliver_exactly_as_one(
    redis_url: str, ops: list[tuple[Any, ...]]
) -> None:
    """The same scenarios on two hubs (two processes) sharing one Redis, each socket held
    by one of them, each request and revocation made in one of them: every socket still
    gets exactly its user's (and thread's) events, once each, in the order sent, wherever
    they were sent from; a revocation ends the user's sockets in both; each hub's counts
    are the model's, and it is subscribed to the channel of exactly the users it holds
    sockets of."""
    prefix = f"ambient-test:{uuid.uuid4().hex}:"

    def backend() -> RedisBroadcast:
        return Heard(redis_url, channel_prefix=prefix)

    anyio.run(play, ops, [backend, backend], backend="asyncio")


# -- real servers and clients over loopback --------------------------------------------------

SERVER_FOR = {"asyncio": "uvicorn", "trio": "hypercorn-trio"}
OPS = {"x-user-id": "operator"}
# Each example's users are new ones: the server, its hub and its ledger serve them all.
_examples = itertools.count()


@dataclass
class Served:
    """A server running the websocket test app for the whole module (its hub, its ledger),
    and how many socket handlers its examples have seen finish so far."""

    url: str
    hub: ConnectionHub
    ledger: Ledger
    finished: int = 0


@pytest.fixture(name="served", scope="module", params=sorted(SERVER_FOR.values()))
def fixture_served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """``tests.ws_app``'s app behind the middleware, with tenants (``x-tenant-id``), on
    uvicorn (the app on asyncio) and hypercorn's trio worker (on trio)."""
    hub = ConnectionHub(max_connections_per_user=CAP)
    ledger = Ledger()
    registry = build_registry(ledger)
    BUILT.remove(registry)  # the server's lifespan shutdown closes it
    hub.install(registry)
    identity = trusted_header(tenant_header="x-tenant-id")
    app = AmbientMiddleware(build_app(hub, ledger, Sockets()), registry=registry, identity=identity)
    with serve(request.param, app) as url:
        yield Served(url, hub, ledger)
    assert ledger.problems() == []


@dataclass
class Client:
    """A client's socket, and the frames the model says it gets before its next pong."""

    user: UserRef
    thread: str
    sock: ClientConnection
    due: list[dict[str, Any]] = field(default_factory=list)


def headers(user: UserRef, thread: str) -> dict[str, str]:
    sent = {"x-user-id": user.user_id, "x-thread-id": thread}
    if user.tenant_id is not None:
        sent["x-tenant-id"] = user.tenant_id
    return sent


async def play_served(served: Served, ops: list[tuple[Any, ...]]) -> None:
    """Run ``ops`` through clients of ``served``, checking after each step that every open
    socket got exactly its frames (before the pong it asks for) and the hub's counts."""
    example = next(_examples)
    users = [UserRef(f"e{example}-{u.user_id}", u.tenant_id) for u in USERS]
    ws = served.url.replace("http://", "ws://") + "/ws"
    clients: list[Client] = []
    pings = itertools.count()
    async with httpx.AsyncClient(base_url=served.url, timeout=DEADLINE) as http:

        async def ended(count: int) -> None:
            """Wait until ``count`` more socket handlers are done; check the counts."""
            served.finished += count
            closed = await http.get("/closed", params={"count": served.finished}, headers=OPS)
            body = closed.json()
            assert body["closed"] is True, body
            assert (body["connections"], body["users"]) == (
                len(clients),
                len({c.user for c in clients}),
            ), body

        async def pick(k: int) -> Client | None:
            return clients[k % len(clients)] if clients else None

        async def leave(client: Client, *, reset: bool) -> None:
            clients.remove(client)
            if reset:
                abort_with_rst(client.sock)
            else:
                await client.sock.close()
            await ended(1)

        try:
            for op in ops:
                kind = op[0]
                first: Client | None = None
                if kind == "open":
                    user, thread = users[op[2]], THREADS[op[3]]
                    sock = await connect(
                        ws, additional_headers=headers(user, thread), proxy=None, compression=None
                    )
                    ready = json.loads(await sock.recv())
                    assert (ready["type"], ready["user"], ready["thread"]) == (
                        "ready",
                        user.user_id,
                        thread,
                    )
                    mine = [c for c in clients if c.user == user]
                    clients.append(Client(user, thread, sock))
                    if len(mine) >= CAP:  # the oldest is closed with 1008
                        clients.remove(mine[0])
                        with pytest.raises(ConnectionClosed):
                            while True:
                                mine[0].due.append(json.loads(await mine[0].sock.recv()))
                        assert mine[0].sock.close_code == 1008
                        assert mine[0].due == [], mine[0].due
                        await ended(1)
                elif kind in ("leave", "reset"):
                    client = await pick(op[2])
                    if client is not None:
                        await leave(client, reset=kind == "reset")
                elif kind in ("request", "race"):
                    user, thread, how, count = users[op[2]], THREADS[op[3]], op[4], op[5]
                    params: dict[str, Any] = {"events": count if how == "thread" else 0}
                    if how == "user":
                        params["broadcast"] = 1
                    response = await http.post("/run", params=params, headers=headers(user, thread))
                    assert response.status_code == 200, response.text
                    run = response.json()["run"]
                    for client in clients:
                        if client.user != user:
                            continue
                        if how == "thread" and client.thread == thread:
                            client.due += [
                                {
                                    "type": "event",
                                    "user": user.user_id,
                                    "thread": thread,
                                    "run": run,
                                    "seq": n,
                                }
                                for n in range(count)
                            ]
                        elif how == "user":
                            client.due.append(
                                {"type": "done", "user": user.user_id, "thread": thread, "run": run}
                            )
                elif kind == "from_socket":
                    client = await pick(op[2])
                    if client is None:
                        continue
                    text = f"from {len(client.due)}"
                    first = client
                    await client.sock.send(json.dumps({"op": "echo", "text": text}))
                    for other in clients:
                        if other.user == client.user and other.thread == client.thread:
                            other.due.append({"type": "echo", "text": text})
                # Every open socket got exactly what is due to it, in order; the one whose
                # handler sent first: its pong says the handler is past the send.
                for client in sorted(clients, key=lambda c: c is not first):
                    n = next(pings)
                    assert await expect_pong(client.sock, n) == client.due, client.user
                    client.due = []
            stats = (await http.get("/stats", headers=OPS)).json()
            assert (stats["connections"], stats["users"]) == (
                len(clients),
                len({c.user for c in clients}),
            ), stats
        finally:
            left = list(clients)
            for client in left:
                await leave(client, reset=False)


@settings(PROPERTY, max_examples=25)
@given(ops=scenarios)
def test_on_a_real_server_each_socket_gets_exactly_its_users_events(
    served: Served, ops: list[tuple[Any, ...]]
) -> None:
    """The same scenarios through real clients of uvicorn and hypercorn's trio worker over
    loopback: sockets open with their user (tenant) and thread in the handshake, close
    cleanly or are reset (TCP RST, no close frame), runs in HTTP requests send to their
    thread's sockets or to all of their user's, and a socket's handler sends to its
    thread. After each step every open socket gets exactly its user's (and thread's)
    events in order before the pong it asks for, nothing of another user's (the same id
    in another tenant included); a socket past the cap loses the oldest with 1008 and
    nothing more; once a socket's handler is done the hub counts exactly the open ones;
    each socket's and request's component is cleaned exactly once."""
    supported = {"open", "leave", "reset", "request", "race", "from_socket"}

    async def bounded() -> None:
        async with asyncio.timeout(DEADLINE):
            await play_served(served, [op for op in ops if op[0] in supported])

    asyncio.run(bounded())
