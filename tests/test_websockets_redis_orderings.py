"""RedisBroadcast under orderings of Redis's replies only a network can make: the
subscription lost and made again while sockets open and close, confirmations that come
late or for a subscription given up. A proxy between redis-py and a real Redis holds and
lets through each direction value by value, so every ordering is the test's own.

RedisBroadcast runs on asyncio only: the trio runs are skipped (test_websockets.py checks
that it refuses trio).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import pytest
import redis.asyncio

from ambient import Registry, UserExecutionContext, UserRef
from ambient.integrations.websockets import (
    BroadcastError,
    ConnectionHub,
    Envelope,
    RedisBroadcast,
    UserWebSocketManager,
)
from ambient.integrations.websockets._envelope import REVOKE, TO_USER, encode_envelope
from tests.redis_server import own_redis
from tests.redisproxy import Link, RedisProxy, words

# A bound against a hang: every wait below is on an event, and each test takes well under
# a second when nothing is wrong.
DEADLINE = 20.0


@pytest.fixture(name="redis_port")
def fixture_redis_port(anyio_backend: str) -> Iterator[int]:
    """The port of a redis-server of the test's own (asyncio runs only): no other test's
    client kills or commands reach the connections these tests count."""
    if anyio_backend != "asyncio":
        pytest.skip("RedisBroadcast is asyncio-only; test_redis_broadcast_refuses_trio covers trio")
    with own_redis() as own:
        yield own.port


@pytest.fixture(name="admin")
async def fixture_admin(redis_port: int) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of the test's Redis itself, past the proxy."""
    client = redis.asyncio.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    yield client
    await client.aclose()


@pytest.fixture(name="proxy")
async def fixture_proxy(redis_port: int) -> AsyncIterator[RedisProxy]:
    """A proxy in front of the test's Redis."""
    async with RedisProxy("127.0.0.1", redis_port) as proxy:
        yield proxy


def prefix() -> str:
    """Channel names no concurrent test run shares."""
    return f"ambient-test:{uuid.uuid4().hex}:"


async def numsub(
    admin: redis.asyncio.Redis, backend: RedisBroadcast, users: list[UserRef]
) -> list[int]:
    """How many subscriptions Redis has of each of ``users``' channels."""
    channels = [backend.channel(user) for user in users]
    return [count for _, count in await admin.pubsub_numsub(*channels)]


def event(user: UserRef, n: int) -> str:
    return json.dumps({"tenant": user.tenant_id, "user": user.user_id, "n": n})


class Socket:
    """A websocket that keeps the text frames the hub writes to it and how it was closed."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closed: list[tuple[int, str | None]] = []
        self._changed = anyio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def accept(self) -> None:
        pass

    async def send_text(self, data: str) -> None:
        self.frames.append(data)
        self._notify()

    async def send_bytes(self, data: bytes) -> None:
        raise AssertionError

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append((code, reason))
        self._notify()

    async def until(self, frames: int) -> None:
        while len(self.frames) < frames and not self.closed:
            await self._changed.wait()


class Sockets:
    """Sockets of many users on one hub over ``backend``, each held open in a scope of its
    own by :meth:`hold` until :meth:`close` (or the hub) ends it."""

    def __init__(self, backend: RedisBroadcast, group: anyio.abc.TaskGroup) -> None:
        self.registry = Registry()
        self.hub = ConnectionHub(backend)
        self.hub.install(self.registry)
        self.group = group
        self.sockets: dict[tuple[UserRef, str], Socket] = {}
        self._leave: dict[tuple[UserRef, str], anyio.Event] = {}
        self._left: dict[tuple[UserRef, str], anyio.Event] = {}
        self.refusals: dict[tuple[UserRef, str], str] = {}

    async def open(self, user: UserRef, connection_id: str) -> str:
        """Open a socket; return ``"open"`` once it is in the hub, or ``"refused"``."""
        return str(await self.group.start(self._hold, user, connection_id))

    async def close(self, user: UserRef, connection_id: str) -> None:
        """Close a socket opened by :meth:`open`; return once its handler left the hub."""
        self._leave[user, connection_id].set()
        await self._left[user, connection_id].wait()

    async def _hold(
        self,
        user: UserRef,
        connection_id: str,
        *,
        task_status: anyio.abc.TaskStatus[str],
    ) -> None:
        key = (user, connection_id)
        socket = self.sockets[key] = Socket()
        self._leave[key] = anyio.Event()
        self._left[key] = left = anyio.Event()
        context = UserExecutionContext.create(
            user.user_id, tenant_id=user.tenant_id, connection_id=connection_id
        )
        try:
            async with self.registry.open_scope(context) as scope:
                manager = await scope.resolve(UserWebSocketManager)
                try:
                    async with manager.connect(socket):  # type: ignore[arg-type]
                        task_status.started("open")
                        await self._leave[key].wait()
                except BroadcastError as error:
                    self.refusals[key] = str(error)
                    task_status.started("refused")
        finally:
            left.set()


class Handled(RedisBroadcast):
    """A RedisBroadcast that counts the replies and messages its reader has handled, so a
    test knows when one it let through has been taken into account, the SUBSCRIBEs
    asked for before the reader had a connection, and the subscriptions that came as far
    as claiming their channel (past their first checks)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.handled: list[list[Any]] = []
        self._handled = anyio.Event()
        self._sent = anyio.Event()
        # SUBSCRIBEs subscribe() asked for while the reader had no connection yet.
        self.unsent: list[bytes] = []
        self.claims: list[bytes] = []
        self._claimed = anyio.Event()

    async def _claim(self, channel: bytes) -> bool:
        self.claims.append(channel)
        claimed, self._claimed = self._claimed, anyio.Event()
        claimed.set()
        return await super()._claim(channel)

    async def claimed(self, channel: bytes, times: int) -> None:
        """Wait until ``times`` subscriptions of ``channel`` came as far as claiming it."""
        while self.claims.count(channel) < times:
            await self._claimed.wait()

    async def _send(self, command: str, channel: bytes) -> None:
        if command == "SUBSCRIBE" and self._subscription is None:
            self.unsent.append(channel)
            sent, self._sent = self._sent, anyio.Event()
            sent.set()
        await super()._send(command, channel)

    async def unsent_subscribes(self, count: int) -> None:
        """Wait until ``count`` SUBSCRIBEs were asked for with no connection to write them."""
        while len(self.unsent) < count:
            await self._sent.wait()

    def _handle(self, message: list[Any]) -> None:
        super()._handle(message)
        self.handled.append(message)
        handled, self._handled = self._handled, anyio.Event()
        handled.set()

    async def handled_reply(self, kind: bytes, channel: bytes, start: int = 0) -> int:
        """Wait until the reader has handled a ``kind`` reply for ``channel`` (from the
        ``start``-th it handled); return its index."""
        while True:
            for index in range(start, len(self.handled)):
                if [bytes(part) for part in self.handled[index][:2]] == [kind, channel]:
                    return index
            await self._handled.wait()


class Deliveries:
    """What the backend delivered to this process's sockets, in order."""

    def __init__(self, backend: RedisBroadcast) -> None:
        self.delivered: list[Envelope] = []
        self._arrived = anyio.Event()
        backend.attach(self)

    def __call__(self, envelope: Envelope) -> None:
        self.delivered.append(envelope)
        arrived, self._arrived = self._arrived, anyio.Event()
        arrived.set()

    async def next(self) -> None:
        """Wait for the next delivery."""
        await self._arrived.wait()

    async def one_each(self, backend: RedisBroadcast, users: list[UserRef], n: int = 1) -> None:
        """Publish event ``n`` to each of ``users`` in turn, and wait until the last one is
        delivered (on one connection, those before it came first or never will)."""
        for user in users:
            await backend.publish(Envelope(user, TO_USER, None, event(user, n)))
        last = Envelope(users[-1], TO_USER, None, event(users[-1], n))
        while last not in self.delivered:
            await self.next()


async def try_subscribe(backend: RedisBroadcast, user: UserRef) -> str:
    """Subscribe ``user``'s socket: ``"subscribed"``, or what the BroadcastError said."""
    try:
        await backend.subscribe(user)
    except BroadcastError as error:
        return str(error)
    return "subscribed"


async def let_go(backend: RedisBroadcast, users: list[UserRef]) -> None:
    """Unsubscribe each of ``users``: the backend then holds no subscription."""
    for user in users:
        await backend.unsubscribe(user)
    assert backend.subscriptions == 0


USERS = [UserRef(f"user-{n // 2}", "acme" if n % 2 else None) for n in range(24)]


async def test_sockets_opening_and_closing_across_a_reconnect_keep_exactly_their_channels(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Twenty-four users (the same ids in two tenants) hold two sockets each when the
    subscription's connection is cut. The new connection's handshake is held while four
    users close both sockets (their channels are in the SUBSCRIBE it is about to send),
    then Redis takes that SUBSCRIBE and its answers are held while four more users close
    both sockets, four close one of their two, and a new user's socket and a third socket
    of a user keeping two try to join. Once Redis's answers go through: both were refused
    (1013) and hold nothing; Redis has exactly the channels of the users with a socket
    left, one subscription each; events published before Redis had the new SUBSCRIBE
    reach no one, those published after it (while its answers were held) and after the
    reconnect reach every open socket of their user, in order, and nobody else's; once
    every socket is closed, Redis has none of their channels."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    stay, early, late, half = USERS[:12], USERS[12:16], USERS[16:20], USERS[20:]
    newcomer = UserRef("newcomer", "acme")
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            sockets = Sockets(backend, group)
            await backend.wait_connected()
            for user in USERS:
                for connection_id in ("c-1", "c-2"):
                    assert await sockets.open(user, connection_id) == "open"
            old = await proxy.link(Link.subscribed)
            assert await numsub(admin, backend, USERS) == [1] * len(USERS)

            def hold_the_handshake(link: Link) -> None:
                # The first connection after the cut is the reader's (nothing publishes
                # meanwhile): held from its first byte, its answers once it subscribes.
                proxy.on_link = None
                link.up.hold()

                def on_command(value: Any) -> None:
                    if words(value)[0] == b"subscribe":
                        link.down.hold()
                        link.up.on_arrival = None

                link.up.on_arrival = on_command

            proxy.on_link = hold_the_handshake
            start = len(proxy.links)
            old.cut()
            new = await proxy.link(lambda link: True, start=start)
            for user in early:
                for connection_id in ("c-1", "c-2"):
                    await sockets.close(user, connection_id)
            for user in USERS:
                await backend.publish(Envelope(user, TO_USER, None, event(user, 0)))
            new.up.release()
            subscribe = await new.up.arrival(lambda w: w[0] == b"subscribe")
            assert {backend.channel(user) for user in early} <= set(
                words(new.up.arrived[subscribe])
            )
            # Written once the SUBSCRIBE is: the reader holds the new connection from here.
            # Due at once (what is left of its SUBSCRIBE): not waited for to the deadline.
            with anyio.move_on_after(5):
                await new.up.arrival(lambda w: w[0] == b"unsubscribe", subscribe)
            unsubscribed = [w for w in map(words, new.up.arrived) if w[0] == b"unsubscribe"]
            assert unsubscribed == [[b"unsubscribe", *(backend.channel(user) for user in early)]], (
                "the channels of the users gone as it connected were not unsubscribed"
            )
            for user in late:
                for connection_id in ("c-1", "c-2"):
                    await sockets.close(user, connection_id)
            for user in half:
                await sockets.close(user, "c-1")
            assert await sockets.open(newcomer, "c-1") == "refused"
            # A third socket of a user who keeps two: refused, it takes none of theirs.
            assert await sockets.open(stay[0], "c-3") == "refused"
            # Redis has the SUBSCRIBE: these are on their way to the sockets.
            await new.up.passed_through(subscribe)
            for user in USERS:
                await backend.publish(Envelope(user, TO_USER, None, event(user, 1)))
            new.down.release()
            await backend.wait_connected()
            assert backend.reconnects == 1
            # Its confirmation comes after Redis handled every UNSUBSCRIBE sent before.
            assert await sockets.open(UserRef("sign"), "c-1") == "open", sockets.refusals
            held = stay + half
            assert await numsub(admin, backend, [*USERS, newcomer]) == [
                1 if user in held else 0 for user in [*USERS, newcomer]
            ]
            assert backend.subscriptions == len(held) + 1
            for n in (2, 3):
                for user in USERS:
                    await backend.publish(Envelope(user, TO_USER, None, event(user, n)))
            sign = (UserRef("sign"), "c-1")
            still_open = {(user, "c-2") for user in held} | {(user, "c-1") for user in stay}
            for key, socket in sockets.sockets.items():
                user, _ = key
                if key in still_open:
                    expected = [event(user, n) for n in (1, 2, 3)]
                    # Published after the reconnect: due at once, not at the deadline.
                    with anyio.move_on_after(2):
                        await socket.until(len(expected))
                    assert (socket.frames, socket.closed) == (expected, []), key
                elif key in ((newcomer, "c-1"), (stay[0], "c-3")):
                    assert (socket.frames, [code for code, _ in socket.closed]) == ([], [1013])
                else:
                    assert socket.frames == [], key
            for key in [*still_open, sign]:
                await sockets.close(*key)
            await backend.subscribe(UserRef("sign again"))
            assert await numsub(admin, backend, USERS) == [0] * len(USERS)
            await backend.unsubscribe(UserRef("sign again"))
            await sockets.registry.aclose()
    assert backend.subscriptions == 0


@pytest.mark.parametrize(
    "answered", ["before the second joins", "as the second reads", "after the second subscribes"]
)
async def test_a_confirmation_for_a_subscription_given_up_does_not_confirm_the_next_one(
    proxy: RedisProxy, admin: redis.asyncio.Redis, answered: str
) -> None:
    """Redis's answer to dave's SUBSCRIBE is late: his subscribe() gives up after
    ``timeout`` and unsubscribes. A second socket of dave subscribes again, its SUBSCRIBE
    held on its way to Redis. The late answers to the first SUBSCRIBE and to the
    UNSUBSCRIBE come before that socket joins, while it reads dave's count of revocations,
    or once it sent its SUBSCRIBE: they confirm nothing, as Redis has no subscription of
    dave after them (an event published then reaches nobody). Only once Redis took the
    second SUBSCRIBE and answered it does subscribe() return; Redis has dave's channel
    once, and dave's events reach him; carol's, subscribed throughout, reach her only."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    dave, carol = UserRef("dave", "acme"), UserRef("carol", "acme")
    channel = backend.channel(dave)
    key = channel + b":revocations"
    subscribes: list[int] = []
    second_sent, second_reads = anyio.Event(), anyio.Event()
    reading: list[Link] = []

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(carol)
        link = await proxy.link(Link.subscribed)

        def on_subscription_command(value: Any) -> None:
            if words(value)[:2] == [b"subscribe", channel]:
                subscribes.append(len(link.up.arrived))
                if len(subscribes) == 1:
                    link.down.hold()  # the first: its answer is late
                else:
                    link.up.hold()  # the second: held on its way to Redis
                    second_sent.set()

        def on_command(each: Link, value: Any) -> None:
            if words(value) == [b"mget", key] and answered == "as the second reads":
                reading.append(each)
                if len(reading) == 2:  # the second socket's first read
                    each.down.hold()
                    second_reads.set()

        link.up.on_arrival = on_subscription_command
        proxy.on_command = on_command
        backend.timeout = 0.3  # the first socket's deadline only
        with pytest.raises(BroadcastError, match="confirm the subscription"):
            await backend.subscribe(dave)
        backend.timeout = 2.0
        assert backend.subscriptions == 1
        await link.up.arrival(lambda w: w[:2] == [b"unsubscribe", channel])
        done = anyio.Event()

        async def answer_the_first() -> None:
            start = len(backend.handled)
            link.down.release(2)
            start = await backend.handled_reply(b"subscribe", channel, start)
            await backend.handled_reply(b"unsubscribe", channel, start)
            assert await numsub(admin, backend, [dave]) == [0]

        async def subscribe_again() -> None:
            await backend.subscribe(dave)
            done.set()

        if answered == "before the second joins":
            await answer_the_first()
        async with anyio.create_task_group() as group:
            group.start_soon(subscribe_again)
            if answered == "as the second reads":
                await second_reads.wait()
                await answer_the_first()
                reading[1].down.release()
            await second_sent.wait()
            if answered == "after the second subscribes":
                await answer_the_first()
            # Taken for confirmed, subscribe() would return a step later (after its read
            # of dave's count), while Redis has no subscription of dave.
            assert channel not in backend._confirmed
            assert not done.is_set()
            link.down.release()
            link.up.release()
        assert await numsub(admin, backend, [dave, carol]) == [1, 1]
        await deliveries.one_each(backend, [dave, carol])
    assert delivered == [Envelope(u, TO_USER, None, event(u, 1)) for u in (dave, carol)]
    await let_go(backend, [dave, carol])
    # Nothing kept of dave's unsubscriptions once their late answers came.
    assert backend._unsubscribed == set()
    await backend.aclose()


async def test_a_late_confirmation_while_the_next_socket_reads_leaves_no_socket_unsubscribed(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Redis's answer to the SUBSCRIBE of dave's first socket is late: its subscribe()
    gives up after ``timeout`` and unsubscribes. His second socket starts subscribing
    and reads his count of revocations; the late answers to the first SUBSCRIBE and to
    the UNSUBSCRIBE come in meanwhile, and a third socket of dave joins. The second
    socket gives up (its client left) before its read is answered. The third socket then
    subscribes dave's channel itself: once its subscribe() returned, Redis has dave's
    channel, and dave's events reach him. Before, the late answer was taken for the
    confirmation of the second socket's subscription, not sent yet: the third socket's
    subscribe() returned at once, and once the second gave up nothing subscribed dave's
    channel, while his third socket stayed open, receiving nothing."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    dave, carol = UserRef("dave", "acme"), UserRef("carol", "acme")
    channel = backend.channel(dave)
    key = channel + b":revocations"
    reads: list[Link] = []
    second_reads = anyio.Event()
    outcomes: dict[str, str] = {}

    async def join(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            try:
                await backend.subscribe(dave)
                outcomes[name] = "subscribed"
            except BroadcastError as error:
                outcomes[name] = str(error)
        outcomes.setdefault(name, "given up")

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(carol)
        link = await proxy.link(Link.subscribed)

        def on_subscription_command(value: Any) -> None:
            if words(value)[:2] == [b"subscribe", channel]:
                link.up.on_arrival = None
                link.down.hold()  # the first: its answer is late

        def on_command(each: Link, value: Any) -> None:
            if words(value) == [b"mget", key]:
                reads.append(each)
                if len(reads) == 2:  # the second socket's first read: never answered
                    each.down.hold()
                    second_reads.set()

        link.up.on_arrival = on_subscription_command
        proxy.on_command = on_command
        backend.timeout = 0.3  # the first socket's deadline only
        await join("first")
        backend.timeout = 2.0
        await link.up.arrival(lambda w: w[:2] == [b"unsubscribe", channel])
        async with anyio.create_task_group() as group:
            second = anyio.CancelScope()
            group.start_soon(join, "second", second)
            await second_reads.wait()
            start = len(backend.handled)
            link.down.release()
            start = await backend.handled_reply(b"subscribe", channel, start)
            await backend.handled_reply(b"unsubscribe", channel, start)
            group.start_soon(join, "third")
            await backend.claimed(channel, 3)
            second.cancel()
        assert outcomes == {
            "first": "Redis did not confirm the subscription within 0.3 s",
            "second": "given up",
            "third": "subscribed",
        }
        assert backend.subscriptions == 2
        assert await numsub(admin, backend, [dave, carol]) == [1, 1]
        # In this order on one connection: carol's arrives after dave's would have.
        await deliveries.one_each(backend, [dave, carol])
    assert delivered == [Envelope(u, TO_USER, None, event(u, 1)) for u in (dave, carol)]
    await let_go(backend, [dave, carol])
    # Nothing kept of dave's unsubscriptions once their late answers came.
    assert backend._unsubscribed == set()
    await backend.aclose()


async def first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return once any of ``waits`` returned (the others are cancelled)."""
    async with anyio.create_task_group() as group:

        async def run(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            group.cancel_scope.cancel()

        for wait in waits:
            group.start_soon(run, wait)


@pytest.mark.parametrize("read_answered", ["after the reconnect", "during the reconnect"])
async def test_a_first_subscription_reading_its_count_across_a_reconnect_ends_consistent(
    proxy: RedisProxy, admin: redis.asyncio.Redis, read_answered: str
) -> None:
    """Ten users hold their channels. Dave's first socket is joining: Redis's answer to its
    read of his count of revocations is held while the subscription's connection is cut.
    Answered once the subscription is back, dave's subscribe() goes on: Redis has his
    channel once and his events reach him. Answered while the new connection's SUBSCRIBE
    (his channel in it) waits for Redis's confirmations, it fails saying Redis is
    unreachable and unsubscribes: Redis has no subscription of dave once the connection
    is back. Either way the ten users' events reach exactly them."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    held, dave = USERS[:10], UserRef("dave", "acme")
    key = backend.channel(dave) + b":revocations"
    read_held = anyio.Event()
    reads: list[Link] = []

    def on_command(link: Link, value: Any) -> None:
        if words(value) == [b"mget", key] and not reads:
            link.down.hold()
            reads.append(link)
            read_held.set()

    outcome: list[str] = []
    finished = anyio.Event()

    async def join() -> None:
        outcome.append(await try_subscribe(backend, dave))
        finished.set()

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        for user in held:
            await backend.subscribe(user)
        old = await proxy.link(Link.subscribed)
        proxy.on_command = on_command
        async with anyio.create_task_group() as group:
            group.start_soon(join)
            await read_held.wait()
            start = len(proxy.links)
            if read_answered == "during the reconnect":

                def hold_confirmations(link: Link) -> None:
                    proxy.on_link = None

                    def on_subscribe(value: Any) -> None:
                        if words(value)[0] == b"subscribe":
                            link.up.on_arrival = None
                            link.down.hold()

                    link.up.on_arrival = on_subscribe

                proxy.on_link = hold_confirmations
            old.cut()
            while backend.connected:
                await backend._wait_changed()
            if read_answered == "after the reconnect":
                await backend.wait_connected()
                reads[0].down.release()
            else:
                new = await proxy.link(Link.subscribed, start)
                batch = await new.up.arrival(lambda w: w[0] == b"subscribe")
                assert backend.channel(dave) in words(new.up.arrived[batch])
                await new.up.passed_through(batch)
                reads[0].down.release()
                # Let the confirmations through once dave's subscribe() has ended or sent
                # a SUBSCRIBE of its own: it must not wait for them.
                await first_of(
                    finished.wait,
                    lambda: new.up.arrival(lambda w: w[0] == b"subscribe", batch + 1),
                )
                new.down.release()
                await backend.wait_connected()
        if read_answered == "after the reconnect":
            assert outcome == ["subscribed"]
        else:
            assert outcome[0].startswith("Redis has been unreachable for "), outcome
        assert backend.reconnects == 1
        # Its confirmation comes after Redis handled whatever was sent before it.
        await backend.subscribe(UserRef("sign"))
        subscribed = read_answered == "after the reconnect"
        assert await numsub(admin, backend, [*held, dave]) == [1] * len(held) + [int(subscribed)]
        assert backend.subscriptions == len(held) + 1 + subscribed
        await deliveries.one_each(backend, [*held, dave, UserRef("sign")])
    receivers = [*held, dave] if subscribed else held
    assert delivered == [
        Envelope(user, TO_USER, None, event(user, 1)) for user in [*receivers, UserRef("sign")]
    ]
    await backend.aclose()


async def test_sockets_joining_while_the_first_subscription_connects_get_their_events(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """The backend's subscription connects for the first time, and its handshake with
    Redis is held while twelve users (the same ids in two tenants) subscribe: each reads
    its count of revocations and asks for its SUBSCRIBE while there is no connection to
    write it on. Once the handshake goes through, the reader subscribes them too: every
    subscribe() returns, Redis has each channel once, and each user's events reach that
    user only."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    users = USERS[:12]

    def hold_the_handshake(link: Link) -> None:
        # The reader's: wait_connected() starts it, and nothing else connects before.
        proxy.on_link = None
        link.up.hold()

    proxy.on_link = hold_the_handshake
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            group.start_soon(backend.wait_connected)
            reader = await proxy.link(lambda link: True)
            for user in users:
                group.start_soon(backend.subscribe, user)
            await backend.unsent_subscribes(len(users))
            assert not reader.subscribed()
            reader.up.release()
        assert backend.connected
        assert await numsub(admin, backend, users) == [1] * len(users)
        for user in users:
            await backend.publish(Envelope(user, TO_USER, None, event(user, 1)))
        while len(delivered) < len(users):
            with anyio.move_on_after(2) as waited:  # published once subscribed: due at once
                await deliveries.next()
            if waited.cancelled_caught:
                break
    assert delivered == [Envelope(user, TO_USER, None, event(user, 1)) for user in users]
    await let_go(backend, users)
    await backend.aclose()


async def test_a_subscribe_whose_answer_is_lost_with_the_connection_leaves_nothing_behind(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Ten users hold their channels. Dave's first socket sends its SUBSCRIBE, and the
    connection is cut before Redis's answer gets through: his subscribe() fails saying
    Redis is unreachable, and his channel is let go. The subscription comes back without
    waiting for that answer, which will never come: Redis has the ten users' channels and
    not dave's, their events reach exactly them, and dave subscribes again."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=2.0, health_check_interval=60)
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    held, dave = USERS[:10], UserRef("dave", "acme")
    channel = backend.channel(dave)
    outcome: list[str] = []

    async def join() -> None:
        outcome.append(await try_subscribe(backend, dave))

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        for user in held:
            await backend.subscribe(user)
        link = await proxy.link(Link.subscribed)

        def on_command(value: Any) -> None:
            if words(value)[:2] == [b"subscribe", channel]:
                link.up.on_arrival = None
                link.down.hold()

        link.up.on_arrival = on_command
        async with anyio.create_task_group() as group:
            group.start_soon(join)
            await link.up.passed_through(
                await link.up.arrival(lambda w: w[:2] == [b"subscribe", channel])
            )
            link.cut()
        assert outcome[0].startswith("Redis has been unreachable for "), outcome
        assert backend.subscriptions == len(held)
        with anyio.move_on_after(5):  # due once the reconnect is made
            await backend.wait_connected()
        assert backend.connected, "the subscription never came back"
        assert await numsub(admin, backend, [*held, dave]) == [1] * len(held) + [0]
        await deliveries.one_each(backend, held)
        await backend.subscribe(dave)
        assert await numsub(admin, backend, [dave]) == [1]
    assert delivered == [Envelope(user, TO_USER, None, event(user, 1)) for user in held]
    await let_go(backend, [dave, *held])
    await backend.aclose()


async def test_a_subscription_connection_that_answers_no_command_is_replaced_despite_traffic(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """The subscription's connection goes on bringing carol's events while nothing the
    process writes on it reaches Redis any more (one way of a connection stalled). Dave's
    socket cannot subscribe (BroadcastError) and the connection is replaced within twice
    ``health_check_interval`` of the unanswered SUBSCRIBE: dave subscribes again, Redis
    has his channel once, and his events and carol's reach exactly them; the new
    connection, its SUBSCRIBEs answered, is kept under the same traffic. Before, the
    health check counted only silence, which carol's events never let come: the
    connection was kept, reported as connected, and every new user's socket was refused
    for as long as the traffic lasted."""
    backend = RedisBroadcast(
        proxy.url, channel_prefix=prefix(), timeout=0.5, health_check_interval=1.0
    )
    deliveries = Deliveries(backend)
    delivered = deliveries.delivered
    carol, dave = UserRef("carol", "acme"), UserRef("dave", "acme")

    async def traffic() -> None:
        # Back to back: the connection is never silent for health_check_interval.
        n = 0
        while True:
            n += 1
            with contextlib.suppress(BroadcastError):
                await backend.publish(Envelope(carol, TO_USER, None, event(carol, n)))

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(carol)
        link = await proxy.link(Link.subscribed)
        async with anyio.create_task_group() as group:
            group.start_soon(traffic)
            while not delivered:
                await deliveries.next()
            link.up.hold()
            with pytest.raises(BroadcastError):  # unconfirmed, or the connection replaced
                await backend.subscribe(dave)
            with anyio.move_on_after(5):
                while backend.reconnects == 0:
                    await backend._wait_changed()
            group.cancel_scope.cancel()
        assert backend.reconnects == 1, "the stalled connection was kept"
        await backend.wait_connected()
        await backend.subscribe(dave)
        assert await numsub(admin, backend, [dave, carol]) == [1, 1]
        # A connection whose SUBSCRIBEs were all answered is kept, however long the
        # traffic lasts (here twice the health check's limit).
        with anyio.move_on_after(4 * backend.health_check_interval):
            await traffic()
        assert backend.reconnects == 1, "a healthy connection was replaced"
        delivered.clear()
        await deliveries.one_each(backend, [dave, carol], 0)
    # The end of carol's traffic may come along: hers only.
    latest = [Envelope(u, TO_USER, None, event(u, 0)) for u in (dave, carol)]
    assert [e for e in delivered if e in latest] == latest
    assert all(e.user == carol for e in delivered if e not in latest)
    await backend.unsubscribe(dave)
    await backend.unsubscribe(carol)
    await backend.aclose()


def ambient_warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.name == "ambient.websockets"]


def revocations_key(backend: RedisBroadcast, user: UserRef) -> bytes:
    """The Redis key counting ``user``'s revocations."""
    return backend.channel(user) + b":revocations"


async def test_foreign_messages_on_the_channels_are_dropped_and_delivery_goes_on(
    redis_port: int, admin: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else publishing on alice's channel and on the revocations channel (no
    envelope, no count, an event that is no revocation): each is dropped with a warning,
    none reaches a socket, and the reader goes on delivering alice's events and
    revocations."""
    backend = RedisBroadcast(
        f"redis://127.0.0.1:{redis_port}/0", channel_prefix=prefix(), health_check_interval=60
    )
    deliveries = Deliveries(backend)
    alice = UserRef("alice", "acme")
    revoked = f"{backend.channel_prefix}revocations"
    stray = encode_envelope(Envelope(alice, TO_USER, None, event(alice, 0)))
    assert repr(backend) == "<RedisBroadcast disconnected channels=0>"
    with anyio.fail_after(DEADLINE), caplog.at_level(logging.WARNING, "ambient.websockets"):
        await backend.wait_connected()
        await backend.subscribe(alice)
        assert repr(backend) == "<RedisBroadcast connected channels=1>"
        await admin.publish(backend.channel(alice), b"no envelope")
        await admin.publish(revoked, b"no count")
        await admin.publish(revoked, b"1-0 1:1 no envelope")
        await admin.publish(revoked, b"1-0 1:1 " + stray)
        after = Envelope(alice, TO_USER, None, event(alice, 1))
        await backend.publish(after)
        revocation = Envelope(alice, REVOKE, None, "access revoked")
        await backend.publish(revocation)
        while len(deliveries.delivered) < 2:
            await deliveries.next()
    assert deliveries.delivered == [after, revocation]
    assert ambient_warnings(caplog.records) == [
        "ambient: dropped a malformed message on a websocket channel",
        "ambient: dropped a malformed message on the revocations channel",
        "ambient: dropped a malformed message on the revocations channel",
        "ambient: dropped a message on the revocations channel that is none",
    ]
    await backend.unsubscribe(alice)
    await backend.aclose()


@pytest.mark.parametrize("malformed", [b"no count", b"kept:-1", b"kept: 1"])
async def test_a_malformed_recent_revocation_or_count_is_taken_for_none(
    redis_port: int, admin: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture, malformed: bytes
) -> None:
    """The stream of recent revocations holds an entry without a count ahead of bob's
    revocation, and alice's count of revocations is no count (no number after its epoch,
    or one that is no digits only): the backend starting reads bob's revocation past the
    malformed entry, alice's socket subscribes (her count taken for none at each read),
    and her revocation made after reaches it; each flaw is a warning."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(url, channel_prefix=backend.channel_prefix)
    deliveries = Deliveries(backend)
    alice, bob = UserRef("alice", "acme"), UserRef("bob", "acme")
    revoked = f"{backend.channel_prefix}revocations"
    alice_revoked = Envelope(alice, REVOKE, None, "alice revoked")
    bob_revoked = Envelope(bob, REVOKE, None, "bob revoked")
    with anyio.fail_after(DEADLINE), caplog.at_level(logging.WARNING, "ambient.websockets"):
        await admin.xadd(revoked, {"envelope": encode_envelope(alice_revoked)})
        await other.publish(bob_revoked)
        await admin.set(revocations_key(backend, alice), malformed)
        await backend.wait_connected()
        assert deliveries.delivered == [bob_revoked]
        await backend.subscribe(alice)
        assert deliveries.delivered == [bob_revoked]
        await other.publish(alice_revoked)
        while len(deliveries.delivered) < 2:
            await deliveries.next()
    assert deliveries.delivered == [bob_revoked, alice_revoked]
    assert ambient_warnings(caplog.records) == [
        "ambient: dropped a malformed entry of the recent revocations",
        # Read before her subscription and once it is confirmed.
        "ambient: took a malformed count of revocations for none",
        "ambient: took a malformed count of revocations for none",
    ]
    await backend.unsubscribe(alice)
    await backend.aclose()
    await other.aclose()


class CountedMeanwhile(RedisBroadcast):
    """A RedisBroadcast whose first SUBSCRIBE of ``user``'s channel is preceded by
    ``count`` set as that user's count of revocations: a revocation made between the
    subscription's two reads of the count, whose message and stream entry this process
    never gets (the count is all Redis kept of it)."""

    def __init__(
        self, url: str, admin: redis.asyncio.Redis, user: UserRef, count: bytes, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.admin = admin
        self.target = self.channel(user)
        self.key = revocations_key(self, user)
        self.count = count

    async def _send(self, command: str, channel: bytes) -> None:
        if command == "SUBSCRIBE" and channel == self.target and self.count:
            count, self.count = self.count, b""
            await self.admin.set(self.key, count)
        await super()._send(command, channel)


@pytest.mark.parametrize("counted", ["none before", "one before"])
async def test_a_revocation_counted_between_a_first_subscriptions_reads_revokes_the_user(
    redis_port: int, admin: redis.asyncio.Redis, counted: str
) -> None:
    """Alice's first socket here subscribes while a revocation of hers is counted in
    Redis, one this process neither hears nor reads: her sockets here are revoked once
    the subscription is confirmed. Bob, whose count does not move, is not revoked."""
    alice, bob = UserRef("alice", "acme"), UserRef("bob", "acme")
    backend = CountedMeanwhile(
        f"redis://127.0.0.1:{redis_port}/0",
        admin,
        alice,
        b"kept:2" if counted == "one before" else b"lost:1",
        channel_prefix=prefix(),
        health_check_interval=60,
    )
    deliveries = Deliveries(backend)
    with anyio.fail_after(DEADLINE):
        if counted == "one before":
            await admin.set(backend.key, b"kept:1")
        await backend.wait_connected()
        await backend.subscribe(bob)
        await backend.subscribe(alice)
    assert deliveries.delivered == [Envelope(alice, REVOKE, None, "access revoked")]
    await let_go(backend, [alice, bob])
    await backend.aclose()


async def test_a_subscribe_whose_read_of_the_count_fails_is_a_broadcast_error_leaving_nothing(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Redis drops the connection each time the read of alice's count of revocations
    reaches it: her subscribe raises BroadcastError saying so and holds nothing; once Redis
    answers again, her next subscribe takes the channel and gets her events."""
    backend = RedisBroadcast(proxy.url, channel_prefix=prefix(), health_check_interval=60)
    deliveries = Deliveries(backend)
    alice = UserRef("alice", "acme")
    cut = 0

    def on_command(link: Link, value: Any) -> None:
        nonlocal cut
        if words(value)[0] == b"mget":
            cut += 1
            link.cut()

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        proxy.on_command = on_command
        with pytest.raises(BroadcastError, match="^could not read the user's revocations"):
            await backend.subscribe(alice)
        assert cut >= 1
        assert backend.subscriptions == 0
        assert await numsub(admin, backend, [alice]) == [0]
        proxy.on_command = None
        await backend.subscribe(alice)
        assert await numsub(admin, backend, [alice]) == [1]
        await deliveries.one_each(backend, [alice])
    assert deliveries.delivered == [Envelope(alice, TO_USER, None, event(alice, 1))]
    await let_go(backend, [alice])
    await backend.aclose()


async def test_a_subscription_connection_gone_silent_is_pinged_and_replaced(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Redis's side of the subscription connection goes silent (nothing it sends comes
    through): the backend pings it, and replaces it once twice ``health_check_interval``
    passed without an answer; the new connection has alice's channel once and her events
    reach her again."""
    backend = RedisBroadcast(
        proxy.url, channel_prefix=prefix(), timeout=1.0, health_check_interval=0.2
    )
    deliveries = Deliveries(backend)
    alice = UserRef("alice", "acme")
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(alice)
        link = await proxy.link(Link.subscribed)
        link.down.hold()
        await link.up.arrival(lambda w: w[0] == b"ping")
        await link.closed.wait()
        await backend.wait_connected()
        assert backend.reconnects == 1
        assert await numsub(admin, backend, [alice]) == [1]
        await deliveries.one_each(backend, [alice])
    assert deliveries.delivered == [Envelope(alice, TO_USER, None, event(alice, 1))]
    await let_go(backend, [alice])
    await backend.aclose()


async def test_after_an_outage_the_recent_revocations_are_read_from_the_one_heard_last(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Alice's revocation is heard; the subscription connection is cut and bob's is made
    before the new one subscribes: once back, the backend delivers bob's once and not
    alice's again, reading the stream from the revocation it heard last."""
    backend = RedisBroadcast(proxy.url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(
        f"redis://127.0.0.1:{proxy.target_port}/0", channel_prefix=backend.channel_prefix
    )
    deliveries = Deliveries(backend)
    alice, bob = UserRef("alice", "acme"), UserRef("bob", "acme")
    alice_revoked = Envelope(alice, REVOKE, None, "alice revoked")
    bob_revoked = Envelope(bob, REVOKE, None, "bob revoked")
    reads: list[list[bytes]] = []

    def on_command(link: Link, value: Any) -> None:
        if words(value)[0] == b"xrange":
            reads.append(words(value))

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await other.publish(alice_revoked)
        await deliveries.next()
        old = await proxy.link(Link.subscribed)

        def hold_the_handshake(link: Link) -> None:
            proxy.on_link = None
            link.up.hold()

        proxy.on_link = hold_the_handshake
        proxy.on_command = on_command
        start = len(proxy.links)
        old.cut()
        new = await proxy.link(lambda link: True, start=start)
        await other.publish(bob_revoked)
        new.up.release()
        await backend.wait_connected()
    assert deliveries.delivered == [alice_revoked, bob_revoked]
    [(heard, _), _] = await admin.xrange(f"{backend.channel_prefix}revocations")
    # One read, from alice's revocation on: not the whole window again.
    assert [read[2] for read in reads] == [heard], reads
    assert backend.reconnects == 1
    await backend.aclose()
    await other.aclose()


async def test_a_backend_closed_while_redis_was_down_subscribes_at_once_once_it_is_back(
    anyio_backend: str,
) -> None:
    """Redis goes down under a running backend, which notices; the backend is closed
    (the application shuts down) and Redis comes back. Started again, its first
    subscribe() gets the channel, and the start counts no reconnect: the outage belonged
    to the run before the close (it does not fail at once as if Redis were still down)."""
    if anyio_backend != "asyncio":
        pytest.skip("RedisBroadcast is asyncio-only; test_redis_broadcast_refuses_trio covers trio")
    alice = UserRef("alice", "acme")
    with own_redis() as own, anyio.fail_after(DEADLINE):
        backend = RedisBroadcast(own.url, channel_prefix=prefix(), health_check_interval=60)
        deliveries = Deliveries(backend)
        await backend.wait_connected()
        own.kill()
        while backend.connected:
            await backend._wait_changed()
        await backend.aclose()
        own.start()
        await backend.subscribe(alice)
        assert backend.reconnects == 0
        await deliveries.one_each(backend, [alice])
        await let_go(backend, [alice])
        await backend.aclose()
    assert deliveries.delivered == [Envelope(alice, TO_USER, None, event(alice, 1))]


async def test_a_socket_waiting_for_another_ones_subscription_fails_with_it_when_redis_goes(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Dave's first socket sent its SUBSCRIBE, whose answer is held; his second socket
    waits for that subscription. The connection is cut, and the next one is held before
    it subscribes: both sockets fail at once saying Redis is unreachable, not the second
    one only once its own ``timeout`` passed, saying Redis did not confirm."""
    backend = Handled(proxy.url, channel_prefix=prefix(), timeout=5.0, health_check_interval=60)
    dave = UserRef("dave", "acme")
    channel = backend.channel(dave)
    outcomes: list[str] = []

    async def join() -> None:
        outcomes.append(await try_subscribe(backend, dave))

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        link = await proxy.link(Link.subscribed)
        start = len(link.up.arrived)
        link.down.hold()
        async with anyio.create_task_group() as group:
            group.start_soon(join)
            await link.up.arrival(lambda w: w[:2] == [b"subscribe", channel], start)
            group.start_soon(join)
            await backend.claimed(channel, 2)

            def hold(new: Link) -> None:
                proxy.on_link = None
                new.up.hold()

            proxy.on_link = hold
            link.cut()
        assert len(outcomes) == 2
        assert all(o.startswith("Redis has been unreachable") for o in outcomes), outcomes
        assert backend.subscriptions == 0
    await backend.aclose()


async def test_a_publish_after_a_redis_restart_gets_through_on_its_first_try(
    anyio_backend: str,
) -> None:
    """Redis restarts between two publishes: the connection the first one left in the pool
    is dead, and the second publish gets through all the same (it tries once more on a new
    connection) instead of failing with BroadcastError."""
    if anyio_backend != "asyncio":
        pytest.skip("RedisBroadcast is asyncio-only; test_redis_broadcast_refuses_trio covers trio")
    alice = UserRef("alice", "acme")
    with own_redis() as own, anyio.fail_after(DEADLINE):
        backend = RedisBroadcast(own.url, channel_prefix=prefix(), health_check_interval=60)
        await backend.publish(Envelope(alice, TO_USER, None, event(alice, 0)))
        own.kill()
        own.start()
        await backend.publish(Envelope(alice, TO_USER, None, event(alice, 1)))
        await backend.aclose()


async def test_a_revocation_under_an_id_heard_before_with_another_count_is_delivered(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """Alice's revocation is heard; then one of bob's comes under the same id in the
    stream but another count (as from a Redis taking over whose clock is behind, which
    numbers its ids and counts anew): it is delivered, not taken for alice's heard again."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(url, channel_prefix=backend.channel_prefix)
    deliveries = Deliveries(backend)
    alice, bob, carol = UserRef("alice", "acme"), UserRef("bob", "acme"), UserRef("carol")
    revoked = [
        Envelope(user, REVOKE, None, f"{user.user_id} revoked") for user in (alice, bob, carol)
    ]
    channel = f"{backend.channel_prefix}revocations"
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await other.publish(revoked[0])
        await deliveries.next()
        [(entry_id, _)] = await admin.xrange(channel)
        await admin.publish(channel, entry_id + b" taken-over:1 " + encode_envelope(revoked[1]))
        await other.publish(revoked[2])
        while revoked[2] not in deliveries.delivered:
            await deliveries.next()
    assert deliveries.delivered == revoked
    await backend.aclose()
    await other.aclose()


async def test_revocations_heard_keep_nothing_per_revocation(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """Revocations heard of a user with a socket here (of another connection: the socket
    stays) and of a user without one are accounted for as they come: the backend keeps
    nothing of them per user to learn later (not every one of them, of every user revoked
    anywhere, until an outage)."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(url, channel_prefix=backend.channel_prefix)
    deliveries = Deliveries(backend)
    alice, bob = UserRef("alice", "acme"), UserRef("bob", "acme")
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(alice)
        for n in range(3):
            await other.publish(Envelope(alice, REVOKE, f"elsewhere-{n}", "revoked"))
            await other.publish(Envelope(bob, REVOKE, None, "revoked"))
        while len(deliveries.delivered) < 6:
            await deliveries.next()
        assert backend._heard == {}
        # Alice's three, in the epoch they were counted in: accounted for.
        assert list(backend._revocations[backend.channel(alice)].values())[-1] == 3
    await let_go(backend, [alice])
    await backend.aclose()
    await other.aclose()


async def test_a_revocation_keeps_its_count_and_the_recent_ones_bounded_in_time_and_length(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """A revocation leaves its user's count and the stream of recent revocations to
    expire a week after the latest one, and trims the stream to about the latest 10,000
    (it held 10,200 before)."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    alice = UserRef("alice", "acme")
    stream = f"{backend.channel_prefix}revocations"
    week = 7 * 24 * 3600
    with anyio.fail_after(DEADLINE):
        async with admin.pipeline(transaction=False) as pipe:
            for _ in range(10_200):
                pipe.xadd(stream, {"envelope": b"old", "count": b"old:1"})
            await pipe.execute()
        await backend.publish(Envelope(alice, REVOKE, None, "revoked"))
        assert week - 60 < await admin.ttl(stream) <= week
        assert week - 60 < await admin.ttl(revocations_key(backend, alice)) <= week
        assert 10_000 <= await admin.xlen(stream) <= 10_100
    await backend.aclose()


async def test_the_epochs_kept_of_a_users_count_are_the_latest_four_met(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """Alice's count of revocations is lost again and again (each revocation after it
    begins a new epoch), and one of her first epochs comes back (as after a failover to a
    Redis that kept it): the backend keeps what it accounted for in the four epochs met
    last, that one among them, not in every epoch ever met nor in the four met first."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(url, channel_prefix=backend.channel_prefix)
    deliveries = Deliveries(backend)
    alice = UserRef("alice", "acme")
    key = revocations_key(backend, alice)
    counts: list[bytes] = []

    async def revoke(count: bytes | None) -> None:
        # Alice's count as it is to be (None: lost), then a revocation of a connection of
        # hers that is not here: her socket stays.
        if count is None:
            await admin.delete(key)
        else:
            await admin.set(key, count)
        await other.publish(Envelope(alice, REVOKE, "elsewhere", "revoked"))
        while len(deliveries.delivered) < len(counts) + 1:
            await deliveries.next()
        counts.append(await admin.get(key))

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(alice)
        for _ in range(3):
            await revoke(None)
        await revoke(counts[0])  # the first epoch again
        for _ in range(2):
            await revoke(None)
        epochs = backend._revocations[backend.channel(alice)]
        assert [(epoch, str(n).encode()) for epoch, n in epochs.items()] == [
            tuple(count.rpartition(b":")[::2]) for count in (counts[2], counts[3], *counts[4:])
        ]
    await let_go(backend, [alice])
    await backend.aclose()
    await other.aclose()


async def test_the_revocations_remembered_as_heard_are_the_latest_twenty_thousand(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """20,001 revocations come on the revocations channel: each is delivered once, and
    the backend remembers the latest 20,000 as heard (twice what the stream holds), not
    every one it ever heard."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    deliveries = Deliveries(backend)
    channel = f"{backend.channel_prefix}revocations"
    raw = encode_envelope(Envelope(UserRef("alice", "acme"), REVOKE, None, "revoked"))
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        async with admin.pipeline(transaction=False) as pipe:
            for n in range(1, 20_002):
                pipe.publish(channel, b"%d-0 e:%d %s" % (n, n, raw))
            await pipe.execute()
        while len(deliveries.delivered) < 20_001:
            await deliveries.next()
        assert len(backend._seen) == 20_000
        assert next(iter(backend._seen)) == b"2-0 e:2"
    await backend.aclose()


async def test_subscribes_answered_one_after_another_keep_the_connection(
    proxy: RedisProxy, admin: redis.asyncio.Redis
) -> None:
    """Redis answers the SUBSCRIBEs of dave's and erin's sockets late, one after the
    other: dave's after 1.2 ``health_check_interval``, erin's 1.2 more after it, one of
    them waiting throughout. Each answer is within twice ``health_check_interval`` of the
    one before, which shows that Redis still takes what the process writes: the connection
    is kept and both sockets subscribe (the wait is counted from the latest answer, not
    from the first SUBSCRIBE until none is left waiting). The interval is long enough that a
    machine stalled for a second still answers within it."""
    interval = 2.0
    backend = Handled(
        proxy.url, channel_prefix=prefix(), timeout=10.0, health_check_interval=interval
    )
    deliveries = Deliveries(backend)
    dave, erin = UserRef("dave", "acme"), UserRef("erin", "acme")
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        link = await proxy.link(Link.subscribed)
        link.down.hold()
        start = len(link.up.arrived)
        async with anyio.create_task_group() as group:
            for user in (dave, erin):
                group.start_soon(backend.subscribe, user)
                await link.up.arrival(
                    lambda w, user=user: w[:2] == [b"subscribe", backend.channel(user)], start
                )
            # The time the health check measures: no event tells it.
            await anyio.sleep(1.2 * interval)
            answered = len(backend.handled)
            link.down.release(1)
            await backend.handled_reply(b"subscribe", backend.channel(dave), answered)
            await anyio.sleep(1.2 * interval)
            link.down.release()
        assert backend.reconnects == 0
        assert await numsub(admin, backend, [dave, erin]) == [1, 1]
        await deliveries.one_each(backend, [dave, erin])
    await let_go(backend, [dave, erin])
    await backend.aclose()


async def test_the_recent_revocations_read_as_the_subscription_starts_are_those_of_five_minutes(
    redis_port: int, admin: redis.asyncio.Redis
) -> None:
    """The stream of recent revocations holds bob's of 310 seconds ago and carol's of 290
    seconds ago (on Redis's clock): a backend starting its subscription delivers carol's,
    within the five minutes, and not bob's."""
    backend = RedisBroadcast(
        f"redis://127.0.0.1:{redis_port}/0", channel_prefix=prefix(), health_check_interval=60
    )
    deliveries = Deliveries(backend)
    stream = f"{backend.channel_prefix}revocations"
    bob = Envelope(UserRef("bob", "acme"), REVOKE, None, "bob revoked")
    carol = Envelope(UserRef("carol", "acme"), REVOKE, None, "carol revoked")
    seconds, microseconds = await admin.time()
    now = seconds * 1000 + microseconds // 1000
    with anyio.fail_after(DEADLINE):
        for ago, (revoked, count) in ((310_000, (bob, b"e:1")), (290_000, (carol, b"e:2"))):
            fields = {"envelope": encode_envelope(revoked), "count": count}
            await admin.xadd(stream, fields, id=f"{now - ago}-0")  # type: ignore[arg-type]
        await backend.wait_connected()
    assert deliveries.delivered == [carol]
    await backend.aclose()


@pytest.mark.parametrize("stream", ["another with that id", "the same, heard long ago"])
async def test_a_backend_started_again_reads_from_the_one_heard_last_only_if_it_is_that_one(
    redis_port: int, admin: redis.asyncio.Redis, stream: str
) -> None:
    """The backend heard alice's revocation, then is closed and started again. Another
    stream (as after a failover) holds, under that revocation's id, bob's with another
    count, and carol's a second before it: both are delivered (the stream is read over
    its five minutes, not from that id). Or the revocation heard last is more than five
    minutes old, and so is dave's after it in the stream: the stream is read over its five
    minutes, not from that one, and neither alice's (again) nor dave's is delivered."""
    backend = RedisBroadcast(
        f"redis://127.0.0.1:{redis_port}/0", channel_prefix=prefix(), health_check_interval=60
    )
    deliveries = Deliveries(backend)
    channel = f"{backend.channel_prefix}revocations"
    alice, bob, carol, dave = (
        Envelope(UserRef(name, "acme"), REVOKE, None, f"{name} revoked")
        for name in ("alice", "bob", "carol", "dave")
    )

    async def add(entry_id: str, revoked: Envelope, count: bytes) -> None:
        fields = {"envelope": encode_envelope(revoked), "count": count}
        await admin.xadd(channel, fields, id=entry_id)  # type: ignore[arg-type]

    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        if stream == "another with that id":
            seconds, microseconds = await admin.time()
            heard = seconds * 1000 + microseconds // 1000 - 10_000
            await add(f"{heard}-0", alice, b"e:1")
            await admin.publish(channel, b"%d-0 e:1 %s" % (heard, encode_envelope(alice)))
            await deliveries.next()
            await backend.aclose()
            await admin.delete(channel)
            await add(f"{heard - 1000}-0", carol, b"f:1")
            await add(f"{heard}-0", bob, b"f:2")
            expected = [alice, carol, bob]
        else:
            await add("1000-0", alice, b"e:1")
            await add("2000-0", dave, b"e:2")
            await admin.publish(channel, b"1000-0 e:1 " + encode_envelope(alice))
            await deliveries.next()
            await backend.aclose()
            expected = [alice]
        await backend.wait_connected()
    assert deliveries.delivered == expected
    await backend.aclose()


async def test_an_outage_is_reported_once_however_many_attempts_fail_and_its_end_once(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes down: the subscription fails to reconnect again and again, and the
    outage is one warning, its end another once Redis is back (one reconnect), not a
    warning per failed attempt."""
    if anyio_backend != "asyncio":
        pytest.skip("RedisBroadcast is asyncio-only; test_redis_broadcast_refuses_trio covers trio")
    with own_redis() as own, anyio.fail_after(DEADLINE):
        backend = RedisBroadcast(
            own.url,
            channel_prefix=prefix(),
            reconnect_delay=0.01,
            max_reconnect_delay=0.01,
            health_check_interval=60,
        )
        await backend.wait_connected()
        with caplog.at_level(logging.WARNING, "ambient.websockets"):
            own.kill()
            for _ in range(3):  # the connection lost, then two attempts that fail
                await backend._wait_changed()
            own.start()
            await backend.wait_connected()
        await backend.aclose()
    warnings = ambient_warnings(caplog.records)
    assert [w.partition(" (")[0] for w in warnings] == [
        "ambient: lost the Redis subscription",
        "ambient: the Redis subscription is back",
    ]
    assert backend.reconnects == 1


@pytest.mark.parametrize(
    ("first", "longest", "attempts"),
    [(0.1, 10.0, range(2, 9)), (0.01, 0.02, range(15, 201))],
    ids=["doubled", "capped"],
)
async def test_reconnect_attempts_back_off_doubling_up_to_the_longest_delay(
    anyio_backend: str, first: float, longest: float, attempts: range
) -> None:
    """Redis is down for two seconds: the subscription's attempts to reconnect wait
    ``reconnect_delay``, doubled after each failure (0.1, 0.2, 0.4, 0.8 s: at most eight
    attempts in the two seconds, not twenty), and never longer than ``max_reconnect_delay``
    (0.01, then 0.02 s: some hundred, not the eight of a delay doubled on). The bounds leave
    room for a machine stalled for part of the time."""
    if anyio_backend != "asyncio":
        pytest.skip("RedisBroadcast is asyncio-only; test_redis_broadcast_refuses_trio covers trio")
    with own_redis() as own, anyio.fail_after(DEADLINE):
        backend = RedisBroadcast(
            own.url,
            channel_prefix=prefix(),
            reconnect_delay=first,
            max_reconnect_delay=longest,
            health_check_interval=60,
        )
        await backend.wait_connected()
        own.kill()
        await backend._wait_changed()  # the connection is lost
        failed = 0
        # The time the back-off is measured in: no event tells it.
        with anyio.move_on_after(2.0):
            while True:
                await backend._wait_changed()
                failed += 1
        own.start()
        await backend.wait_connected()
        await backend.aclose()
    assert failed in attempts


async def test_a_backend_started_again_with_no_socket_delivers_what_it_missed_without_alarm(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend, holding no socket, is closed; alice is revoked meanwhile. Started
    again, it delivers her revocation from the stream of recent ones, as a start does,
    without the warning of an outage (it had no sockets to have missed it for)."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    backend = RedisBroadcast(url, channel_prefix=prefix(), health_check_interval=60)
    other = RedisBroadcast(url, channel_prefix=backend.channel_prefix)
    deliveries = Deliveries(backend)
    revoked = Envelope(UserRef("alice", "acme"), REVOKE, None, "revoked")
    with anyio.fail_after(DEADLINE), caplog.at_level(logging.WARNING, "ambient.websockets"):
        await backend.wait_connected()
        await backend.aclose()
        await other.publish(revoked)
        await backend.wait_connected()
    assert deliveries.delivered == [revoked]
    assert ambient_warnings(caplog.records) == []
    await backend.aclose()
    await other.aclose()


@pytest.mark.parametrize(("protocol", "pong"), [(2, b""), (3, b"PONG")], ids=["RESP2", "RESP3"])
async def test_an_idle_subscription_answering_each_ping_is_kept(
    redis_port: int, protocol: int, pong: bytes
) -> None:
    """Nothing comes on the subscription for several ``health_check_interval``: each
    silence is pinged, Redis answers each PING (over RESP3, ``protocol=3`` in the URL,
    with a plain string, not a pub/sub message), and the connection is kept (no
    reconnect), delivering alice's events after."""
    backend = Handled(
        f"redis://127.0.0.1:{redis_port}/0?protocol={protocol}",
        channel_prefix=prefix(),
        health_check_interval=0.5,
    )
    deliveries = Deliveries(backend)
    alice = UserRef("alice", "acme")
    with anyio.fail_after(DEADLINE):
        await backend.wait_connected()
        await backend.subscribe(alice)
        answered = 0
        for _ in range(3):
            answered = await backend.handled_reply(b"pong", pong, answered) + 1
        assert backend.reconnects == 0
        await deliveries.one_each(backend, [alice])
    assert deliveries.delivered == [Envelope(alice, TO_USER, None, event(alice, 1))]
    await let_go(backend, [alice])
    await backend.aclose()


async def test_a_publish_under_way_as_the_backend_closes_leaves_no_connection_open(
    proxy: RedisProxy,
) -> None:
    """A publish waits for Redis's answer when the backend is closed (a shutdown while a
    run still streams): aclose() waits for it, then closes its connection, and no
    connection through the proxy stays open. It used to close the client under the
    publish, whose retry opened the connection again and gave it back to the pool of the
    client closed, where it stayed open until the garbage collector found it."""
    backend = RedisBroadcast(proxy.url, channel_prefix=prefix())
    backend.attach(lambda envelope: None)
    carol = UserRef("carol")

    def hold_its_answer(link: Link, value: Any) -> None:
        if words(value)[0] == b"publish":
            proxy.on_command = None
            link.down.hold()

    proxy.on_command = hold_its_answer
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            group.start_soon(backend.publish, Envelope(carol, TO_USER, None, event(carol, 1)))
            publishing = await proxy.link(
                lambda link: any(words(value)[0] == b"publish" for value in link.up.arrived)
            )
            group.start_soon(backend.aclose)
            await anyio.wait_all_tasks_blocked()
            publishing.down.release()
    # Closed at once: a connection left open is still open well past this bound.
    with anyio.move_on_after(5):
        for link in proxy.links:
            await link.closed.wait()
    assert [link.closed.is_set() for link in proxy.links] == [True] * len(proxy.links)


async def test_a_socket_joining_after_revoke_returned_is_not_ended_by_that_revocation_heard_back(
    proxy: RedisProxy,
) -> None:
    """Carol is revoked through this process, and revoke() returns; then a socket of hers
    (a new credential) begins to join here, and only then does the revocation come back
    to this process on its subscription, a connection of its own that lags behind the
    answer to the publish. The socket stays: this process already applied that
    revocation, as it was made, and it is the same one, not a second. It used to be
    applied again as it came back, ending the socket (4001) of a handshake made after."""
    backend = Handled(proxy.url, channel_prefix=prefix(), health_check_interval=60)
    carol = UserRef("carol")
    opened = anyio.Event()
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            sockets = Sockets(backend, group)
            await backend.wait_connected()
            subscription = await proxy.link(Link.subscribed)
            subscription.down.hold()
            assert await sockets.hub.revoke("carol") == 0
            start = len(subscription.up.arrived)

            async def open_carols() -> None:
                assert await sockets.open(carol, "c-1") == "open"
                opened.set()

            group.start_soon(open_carols)
            await subscription.up.arrival(lambda w: w[0] == b"subscribe", start)
            subscription.down.release()  # the revocation, then the SUBSCRIBE's answer
            await opened.wait()
            await backend.handled_reply(b"message", backend._revoked)
            stats = sockets.hub.stats()
            assert (stats.connections, stats.revoked) == (1, 0)
            assert sockets.sockets[carol, "c-1"].closed == []
            await sockets.close(carol, "c-1")
            await sockets.registry.aclose()
