""":class:`RedisBroadcast`: events fanned out across processes through Redis pub/sub."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import anyio

from ambient import UserRef, _loops
from ambient._checks import number
from ambient.errors import BroadcastError
from ambient.integrations.websockets._broadcast import Deliver, _attach_once
from ambient.integrations.websockets._envelope import (
    REVOKE,
    Envelope,
    decode_envelope,
    encode_envelope,
)

if TYPE_CHECKING:
    from redis.asyncio import ConnectionPool, Redis
    from redis.asyncio.connection import AbstractConnection


logger = logging.getLogger("ambient.websockets")

# Seconds a user's count of revocations (and the stream of recent revocations) outlives
# the last one: far longer than Redis is ever unreachable for, so that a process coming back
# still finds what it missed.
_REVOCATIONS_KEPT = 7 * 24 * 3600
# The stream of recent revocations every process reads when its subscription starts or comes
# back: the latest 10,000 (about; Redis trims a stream in whole nodes), of which it takes
# those of the last five minutes (on Redis's clock), what the hub keeps for handshakes in
# flight (see _hub.py).
_RECENT_KEPT = 10_000
_RECENT_FOR_MS = 300_000
# The revocations heard (id in the stream and count) a process keeps to know one heard
# again: twice what the stream holds, so that whatever it still holds of them is known.
_SEEN_KEPT = 2 * _RECENT_KEPT
# The epochs of a user's count of revocations a process keeps what it accounted for in:
# a new one begins only when Redis lost the count or another Redis run made it. One dropped
# and read again is taken for one of revocations none of which was heard (all sockets).
_EPOCHS_KEPT = 4

# A revocation, in one step: counted in its user's key (for processes holding that user's
# sockets whose subscription was down), added to the stream of recent ones (for processes
# whose subscription was down or not started), and published on the revocations channel,
# with its id in that stream, to every process. The stream entry and that message carry
# the user's count as of this revocation: a process knows which of the user's revocations
# it heard or read, and learns from the count only of those it did not. Not on the user's
# channel as well: every process listens on the revocations channel, and a second copy,
# read after a socket of the user joined, ended that socket too.
# A count is "<epoch>:<number>". A count this Redis did not make (lost with the key, kept
# by the Redis before a restart or a failover, which may have lost the latest ones) starts
# again at 1 in a new epoch, named after this Redis's run id and a token: numbers that
# would come again after those processes accounted for are never reused. (INFO may be
# refused by an ACL: then only a lost count starts a new epoch.)
# KEYS: the user's count, the stream. ARGV: the revocations channel, the envelope, the
# seconds both keys are kept, the length of the stream, the token of a new epoch.
_REVOKE = """
local info = redis.pcall('INFO', 'server')
local run = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local epoch, number = run .. ':' .. ARGV[5], 1
local value = redis.call('GET', KEYS[1])
if value then
    local kept, counted = string.match(value, '^(.*):(%d+)$')
    if kept and string.sub(kept, 1, #run + 1) == run .. ':' then
        epoch, number = kept, tonumber(counted) + 1
    end
end
local count = epoch .. ':' .. number
redis.call('SET', KEYS[1], count, 'EX', ARGV[3])
local id = redis.call(
    'XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'envelope', ARGV[2], 'count', count)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], id .. ' ' .. count .. ' ' .. ARGV[2])
return {id, count}
"""

# A user's count of revocations: the epoch Redis numbers them in, and their number.
Count = tuple[bytes, int]
_NO_COUNT: Count = (b"", 0)


def _milliseconds(entry_id: bytes) -> int:
    """The time, in milliseconds, of the id ``entry_id`` in a stream (-1 if it is none)."""
    milliseconds = entry_id.partition(b"-")[0]
    return int(milliseconds) if milliseconds.isdigit() else -1


def _count(value: bytes) -> Count:
    """The count ``value`` (``<epoch>:<number>``) says.

    Raises:
        ValueError: it is no count.
    """
    epoch, _, number = value.rpartition(b":")
    if not number.isdigit():
        raise ValueError(value)
    return epoch, int(number)


_ASYNCIO_ONLY = (
    "RedisBroadcast uses redis-py's asyncio client, which runs on asyncio only, and this "
    "code runs under another event loop (trio?): run the application on asyncio "
    "(uvicorn and hypercorn do by default) or use the in-process backend"
)


class RedisBroadcast:
    """Fan events out across processes and hosts through Redis pub/sub (extra ``redis``).

    Every process subscribes to one channel per user it holds sockets of (the channel
    name is a hash of tenant and user id) and delivers what arrives to those sockets;
    senders publish on the user's channel. A reader task per process keeps the
    subscription alive: it notices a dead connection (also a silent one, by pinging every
    ``health_check_interval`` seconds, and one that no longer answers its SUBSCRIBEs
    while messages still come), reconnects with exponential back-off and re-subscribes.
    Publishing while Redis is unreachable raises :class:`BroadcastError`; so does opening
    a socket while the subscription cannot be made. Pub/sub delivers at
    most once: events published while this process is disconnected do not reach its
    sockets. Revocations are the exception. Each is published to every process, only on
    one revocations channel the subscription always listens on (so that a process where
    a handshake of the user is under way, with no socket of that user yet, hears it too;
    the process that publishes it delivers it to its own sockets as Redis takes it, once),
    and is kept in a Redis stream of the latest ones (about 10,000): a process whose
    subscription starts, or comes back after an outage, reads from it the revocations of
    the last five minutes (on Redis's clock) it has not heard, and new sockets wait for
    that read. Each is also counted in a Redis key of its user, and carries its number in
    that count, so a process knows which of the user's revocations it heard or read; a
    count another Redis made (before a restart or a failover, which may have lost the
    latest) or that was lost starts again in a new epoch, never reusing a number. A
    process whose subscription comes back (or starts again after :meth:`aclose`, sockets
    still held), once it has read the recent ones, compares those counts with the
    revocations it accounted for, and revokes every socket of a user with one it neither
    heard nor read (all of them: the count does not say which connection that one named);
    that takes an outage (or a close) longer than five minutes, or a stream trimmed or
    lost meanwhile. A process subscribing to a user it holds no socket of yet reads the
    count before and after: a revocation in between, published before Redis had the
    subscription and neither heard nor read, revokes the user's sockets there the same
    way. Revocations need Redis 5 or later (streams).

    Args:
        url: The Redis URL (``redis://host:6379/0``).
        channel_prefix: Prefix of the channel names (separate applications sharing one
            Redis need different prefixes).
        timeout: Seconds to connect, publish or subscribe before failing. A new
            connection's setup (redis-py's handshake: a round trip for each of HELLO,
            CLIENT SETINFO and the like) counts against the command that takes it, and a
            command that gives up throws its half set-up connection away; the
            subscription needs about three round trips within one ``timeout``. On a
            distant Redis whose round trip is more than a fifth of ``timeout``, raise it:
            otherwise publishes from a cold start fail until the load drops, and the
            subscription never connects.
        reconnect_delay: First back-off delay after a lost connection, doubled per failure.
        max_reconnect_delay: The longest back-off delay.
        health_check_interval: Seconds of silence after which the subscription connection
            is pinged; twice that without an answer and it is replaced. So is a connection
            on which a SUBSCRIBE waits twice that long for Redis's answer, messages coming
            or not (they do not show that Redis still reads what this process writes).
        max_connections: Connections this process opens to Redis to publish (the
            subscription takes one more). A publish finding them all busy waits for one,
            within ``timeout``; past it, it raises :class:`BroadcastError` saying so.

    Raises:
        UnsupportedBackendError: when constructed (or later used) under trio.
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "ambient:ws:",
        timeout: float = 2.0,
        reconnect_delay: float = 0.05,
        max_reconnect_delay: float = 2.0,
        health_check_interval: float = 5.0,
        max_connections: int = 50,
    ) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            msg = f"max_connections must be an int >= 1, not {max_connections!r}"
            raise ValueError(msg)
        for name, value in (
            ("timeout", timeout),
            ("reconnect_delay", reconnect_delay),
            ("max_reconnect_delay", max_reconnect_delay),
            ("health_check_interval", health_check_interval),
        ):
            if not number(value, name) > 0:
                msg = f"{name} must be > 0 seconds, not {value!r}"
                raise ValueError(msg)
        self.url = url
        self.channel_prefix = channel_prefix
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.health_check_interval = health_check_interval
        self.max_connections = max_connections
        self.reconnects = 0
        self._deliver: Deliver | None = None
        self._control = f"{channel_prefix}process:{secrets.token_hex(8)}".encode()
        # Every revocation is published on this channel, and kept in the stream of this
        # name (keys and channels are apart in Redis).
        self._revoked = f"{channel_prefix}revocations".encode()
        self._refs: dict[bytes, int] = {}
        self._users: dict[bytes, UserRef] = {}
        self._pending: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        # Channels whose first subscription here got as far as its SUBSCRIBE (or is on its
        # way to it): the other sockets of the user wait for its confirmation.
        self._subscribing: set[bytes] = set()
        # Channels unsubscribed with answers to a SUBSCRIBE still to come, whose next
        # SUBSCRIBE is not written yet: those answers, from before the UNSUBSCRIBE, confirm
        # nothing (a socket joining meanwhile would take the channel for subscribed, and
        # stay open with none once the socket subscribing it gave up).
        self._unsubscribed: set[bytes] = set()
        # Since when the subscription connection has had a SUBSCRIBE waiting for Redis's
        # answer with no answer meanwhile (None: none waits). Messages alone keep it from
        # going silent while Redis no longer takes its commands (one way of it stalled).
        self._unanswered_since: float | None = None
        self._changed: anyio.Event | None = None
        self._client: Redis | None = None
        # The publishing client's free connections, counted here: a publish waits for one
        # in this semaphore rather than in redis-py's pool, so a deadline passed waiting
        # (every connection busy) is told apart from one passed in Redis.
        self._free: asyncio.Semaphore | None = None
        # The subscription's own connection, outside redis-py's PubSub: PubSub reconnects
        # its connection by itself when a command is written on it after it died (and
        # when a read on it fails), behind the reader, which then read the replies of
        # that reconnect or went on reading a connection subscribed to nothing. Only the
        # reader connects this one, and it subscribes every channel when it does.
        self._subscription: AbstractConnection | None = None
        self._sub_pool: ConnectionPool | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._down_since: float | None = None
        # Per subscribed channel, per epoch of its user's count of revocations (the latest
        # _EPOCHS_KEPT, the one met last at the end): the number up to which every one is
        # accounted for here, made before the subscription, or heard (as a message, or read
        # from the stream of recent ones), each numbered by the count it carries. Epochs
        # apart: epochs have no order, and a count read just before a revocation that began
        # a new epoch, heard before the read's answer was taken, is of the epoch before.
        self._revocations: dict[bytes, dict[bytes, int]] = {}
        # Subscribed channel -> the counts of its user's revocations heard here past those
        # accounted for in their epoch, one before them not (yet): heard out of order, or
        # before the count was read.
        self._heard: dict[bytes, set[Count]] = {}
        # The subscription came back after an outage (or started again after aclose(), with
        # sockets held): look for revocations it missed.
        self._resync = False
        # aclose() ran since the subscription was last up: started again with channels
        # still subscribed (sockets the hub still holds), it looks for revocations missed
        # as after an outage.
        self._closed = False
        # The stream of recent revocations was read since the subscription (re)started:
        # new sockets wait for it, a revocation they missed would only be learnt there.
        self._caught_up = False
        # The ids, in that stream, of the latest revocations heard (messages or read),
        # oldest first. Not their order: ids go back when a Redis whose clock is behind the
        # ids seen takes over (a failover, a restart without persistence), and a later
        # revocation would be taken for one heard.
        self._seen: dict[bytes, None] = {}
        # The id and count of the revocation heard last: the stream holds those heard
        # after it past it, as long as it holds it.
        self._last_heard: tuple[bytes, bytes] | None = None

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<RedisBroadcast {state} channels={len(self._refs)}>"

    @property
    def connected(self) -> bool:
        """Whether the subscription connection is up and every channel confirmed."""
        return self._connected

    @property
    def subscriptions(self) -> int:
        """User channels this process is subscribed to (users with sockets here)."""
        return len(self._refs)

    def attach(self, deliver: Deliver) -> None:
        """Remember the hub's delivery callback."""
        _attach_once(self._deliver, deliver)
        self._deliver = deliver

    def channel(self, user: UserRef) -> bytes:
        """The Redis channel of ``user``."""
        key = json.dumps([user.tenant_id, user.user_id]).encode()
        return self.channel_prefix.encode() + hashlib.sha256(key).hexdigest()[:32].encode()

    def _on_this_loop(self) -> None:
        """Check that this runs on asyncio, on the loop the backend started on.

        redis-py's connections, the reader task and the wake-up event belong to the loop
        they were made on, and cannot even be closed from another (:meth:`aclose` lets the
        backend start again on any loop).

        Raises:
            UnsupportedBackendError: not running on asyncio.
            BroadcastError: the backend started on another event loop.
        """
        _loops.require_asyncio(_ASYNCIO_ONLY)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            msg = (
                "this RedisBroadcast started on another event loop, and its Redis "
                "connections belong to that loop: run the application on one loop (in "
                "tests, `with TestClient(app) as client:` rather than a loop per call), or "
                "aclose() the backend before using it on another"
            )
            raise BroadcastError(msg)

    def _revocations_key(self, channel: bytes) -> bytes:
        return channel + b":revocations"

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        """Publish ``envelope`` on its user's channel (a revocation on the revocations
        channel instead, see the class).

        Raises:
            BroadcastError: Redis did not take it within ``timeout`` (or no connection of
                the ``max_connections`` came free within it).
            UnsupportedBackendError: not running on asyncio.
        """
        self._on_this_loop()
        from redis.exceptions import RedisError

        client, free = self._publisher()
        channel = self.channel(envelope.user)
        raw = encode_envelope(envelope)
        waiting_for: str | None = None  # None while no connection is free
        try:
            with anyio.fail_after(self.timeout):
                async with free:
                    waiting_for = "take the event"
                    if envelope.mode != REVOKE:
                        await client.publish(channel, raw)
                        return
                    # One script, one round trip: counted, kept and published at once,
                    # so a process that misses the message finds it once back.
                    entry_id, count = await client.eval(
                        _REVOKE,
                        2,
                        self._revocations_key(channel),
                        self._revoked,
                        self._revoked,
                        raw,
                        _REVOCATIONS_KEPT,
                        _RECENT_KEPT,
                        secrets.token_hex(8),
                    )
        except TimeoutError:
            raise self._timed_out(waiting_for) from None
        except (RedisError, OSError) as error:
            raise BroadcastError(f"could not publish the event to Redis: {error}") from error
        # Delivered here now, as made, unless heard already: its message comes on the
        # subscription, another connection, maybe well after this answer, and delivered
        # then it ended the sockets of the user that joined meanwhile, one of a handshake
        # made after the revocation too. Not taken as the one heard last: those before it
        # on the subscription may not be read yet.
        if self._deliver is not None:
            self._revocation_heard(entry_id, count, raw, last=False)

    def _timed_out(self, waiting_for: str | None) -> BroadcastError:
        """The error for a deadline passed while Redis was to ``waiting_for`` something, or
        (``None``) while every connection of the pool was busy."""
        if waiting_for is not None:
            return BroadcastError(f"Redis did not {waiting_for} within {self.timeout} s")
        msg = (
            f"no connection to Redis came free within {self.timeout} s: all "
            f"{self.max_connections} were busy (the pool is exhausted; raise the "
            "RedisBroadcast's max_connections)"
        )
        return BroadcastError(msg)

    def _publisher(self) -> tuple[Redis, asyncio.Semaphore]:
        if self._client is None or self._free is None:
            self._client = self._new_client(retries=1)
            self._free = asyncio.Semaphore(self.max_connections)
        return self._client, self._free

    def _new_client(self, *, retries: int) -> Redis:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # A pool that waits for a free connection: redis-py's default one fails at once
        # with "Too many connections" when more commands than its size are under way.
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One retry heals a pooled connection that died with a Redis restart; a Redis
            # that is down fails at once instead of after a long back-off.
            retry=Retry(NoBackoff(), retries),
        )
        return Redis.from_pool(pool)

    # -- subscribing ---------------------------------------------------------------------

    async def subscribe(self, user: UserRef) -> None:
        """Subscribe to ``user``'s channel (reference-counted) and wait until Redis
        confirmed it.

        A first subscription of ``user`` here reads the user's count of revocations before
        it subscribes and again once Redis confirmed it: a revocation published in between
        reached this process on the revocations channel, or is read from the stream of
        recent ones, as every revocation carries its number in that count; if the count
        grew by one heard in neither way, every socket of ``user`` here is revoked (the
        count does not say which connection that one named).
        Every subscription also waits until this process has read the recent revocations
        it missed, once its subscription (re)started (no command of its own).

        Raises:
            BroadcastError: Redis is down or did not confirm within ``timeout``.
            UnsupportedBackendError: not running on asyncio.
        """
        self._on_this_loop()
        channel = self.channel(user)
        self._refs[channel] = self._refs.get(channel, 0) + 1
        self._users[channel] = user
        waiting_for: str | None = None
        first = False  # this call makes the channel's subscription
        sent = False

        async def read_count() -> Count:
            nonlocal waiting_for
            client, free = self._publisher()
            waiting_for = None  # None while no connection is free
            async with free:
                waiting_for = "answer the read of the user's revocations"
                [count] = await self._revocation_counts(client, [channel])
            return count

        try:
            self._start_reader()
            self._check_up()
            with anyio.fail_after(self.timeout):
                waiting_for = "confirm the subscription"
                first = await self._claim(channel)
                if first:
                    # Read before subscribing: every revocation up to it came before this
                    # subscription; one Redis takes from now on is told by the revocations
                    # channel, or by the count read again below.
                    self._advance(channel, await read_count())
                    self._check_up()
                    # Confirmed only by the answer to this SUBSCRIBE (or a later one), not
                    # by one to a SUBSCRIBE of an earlier, since unsubscribed, socket.
                    self._confirmed.discard(channel)
                    sent = True
                    await self._send("SUBSCRIBE", channel)
                waiting_for = "confirm the subscription"
                while channel not in self._confirmed or not self._caught_up:
                    await self._wait_changed()
                    self._check_up()  # the connection broke meanwhile: fail now
                if first or channel not in self._revocations:
                    # Read once subscribed: a revocation after this read arrives as a message.
                    count = await read_count()
                    deliver = self._deliver
                    if await self._missed_since(channel, count) and first and deliver is not None:
                        deliver(Envelope(user, REVOKE, None, "access revoked"))
        except TimeoutError:
            await self._release(user, claimed=first and not sent)
            raise self._timed_out(waiting_for) from None
        except BaseException as error:
            await self._release(user, claimed=first and not sent)
            from redis.exceptions import RedisError

            # Not a BroadcastError (an OSError too): it says what failed already.
            if isinstance(error, RedisError | OSError) and not isinstance(error, BroadcastError):
                msg = f"could not read the user's revocations from Redis: {error}"
                raise BroadcastError(msg) from error
            raise

    async def _revocation_counts(self, client: Redis, channels: list[bytes]) -> list[Count]:
        """The users' counts of revocations (``channels``' users), from Redis."""
        keys = [self._revocations_key(channel) for channel in channels]
        values = await client.mget(keys)
        counts = []
        for value in values:
            try:
                counts.append(_count(value) if isinstance(value, bytes) else _NO_COUNT)
            except ValueError:
                logger.warning("ambient: took a malformed count of revocations for none")
                counts.append(_NO_COUNT)
        return counts

    async def _recent_revocations(self) -> None:
        """Once the subscription (re)started: deliver the revocations of the last five
        minutes it has not heard (see :meth:`_read_recent`). After an outage (or aclose()
        with sockets held), then revoke the sockets of every user with a revocation this
        process neither heard nor read (see :meth:`_missed_revocations`)."""
        # Those whose count is known: a first subscription under way reads its own.
        channels = [c for c in self._refs if c in self._revocations] if self._resync else []
        counts = await self._read_recent(channels)
        if channels:
            self._missed_revocations(channels, counts)

    async def _read_recent(self, channels: list[bytes]) -> list[Count]:
        """Deliver the revocations of the last five minutes (on Redis's clock) not heard
        here, from the stream of recent ones (the hub dates each as it gets it, the
        conservative side), once it read the counts of ``channels``' users, which it
        returns: every revocation those count is in what is read next, unless the stream
        lost it. (Read after the stream, they could count one made meanwhile whose message
        waits on the subscription, not read yet.)"""
        client, free = self._publisher()
        counts: list[Count] = []
        with anyio.fail_after(self.timeout):
            async with free:
                if channels:
                    counts = await self._revocation_counts(client, channels)
                seconds, microseconds = await client.time()
                start = seconds * 1000 + microseconds // 1000 - _RECENT_FOR_MS
                entries = None
                last = self._last_heard
                if last is not None and _milliseconds(last[0]) >= start:
                    # From the one heard last, if the stream still holds it: not past the
                    # largest id heard, as later ones may have smaller ids.
                    entries = await client.xrange(self._revoked, min=last[0])
                    first_id, fields = entries[0] if entries else (None, None)
                    if (first_id, (fields or {}).get(b"count")) != last:
                        entries = None  # another stream (a reset, a failover) or trimmed
                if entries is None:
                    # The whole window, those heard too (skipped below).
                    entries = await client.xrange(self._revoked, min=max(start, 0))
        missed = 0
        for entry_id, fields in entries or ():
            raw = None if fields is None else fields.get(b"envelope")
            count = None if fields is None else fields.get(b"count")
            if (
                not isinstance(entry_id, bytes)
                or not isinstance(raw, bytes)
                or not isinstance(count, bytes)
            ):
                logger.warning("ambient: dropped a malformed entry of the recent revocations")
            elif self._revocation_heard(entry_id, count, raw):
                missed += 1
        if missed and self._resync:  # after an outage or a close, not a first start
            logger.warning(
                "ambient: %d revocation(s) were made while the Redis subscription was down; "
                "applying them here now",
                missed,
            )
        return counts

    def _revocation_heard(
        self, entry_id: bytes, count: bytes, raw: bytes, *, last: bool = True
    ) -> bool:
        """Deliver the revocation ``raw``, kept as ``entry_id`` in the stream of recent
        ones and numbered ``count`` among its user's, unless it was heard already (and,
        when ``last``, take it as the one heard last); return whether it was delivered."""
        try:
            numbered = _count(count)
            envelope = decode_envelope(raw)
        except (ValueError, UnicodeDecodeError):
            logger.warning("ambient: dropped a malformed message on the revocations channel")
            return False
        seen = self._seen
        # With its count: an id may come again after the stream was lost, its count not.
        key = entry_id + b" " + count
        if key in seen:
            return False  # read from the stream, then heard as a message too, or the reverse
        seen[key] = None
        if len(seen) > _SEEN_KEPT:
            del seen[next(iter(seen))]
        if last:
            self._last_heard = (entry_id, count)
        deliver = self._deliver
        if envelope.mode != REVOKE or deliver is None:
            logger.warning("ambient: dropped a message on the revocations channel that is none")
            return False
        deliver(envelope)
        channel = self.channel(envelope.user)
        if channel in self._refs:
            self._heard.setdefault(channel, set()).add(numbered)
            if channel in self._revocations:
                self._advance(channel, (numbered[0], 0))
        return True

    def _advance(self, channel: bytes, count: Count) -> None:
        """Take every revocation of ``channel``'s user up to ``count`` (or up to those
        accounted for already in its epoch, if more) as accounted for, and those heard in a
        row after, in each epoch. An epoch first met here (Redis lost the count, or another
        Redis run made it, and numbers them anew) has none of its revocations accounted for
        but those heard."""
        epochs = self._revocations.setdefault(channel, {})
        heard = self._heard.pop(channel, set())
        epoch, number = count
        for other in {e for e, _ in heard}:
            # Only heard of (before the channel's first count, of another epoch, was
            # taken): begun after that read, which counted none of its revocations.
            epochs.setdefault(other, 0)
        # Met last: moved to the end.
        epochs[epoch] = max(epochs.pop(epoch, 0), number)
        for each, accounted in epochs.items():
            number = accounted
            while (each, number + 1) in heard:
                number += 1
            epochs[each] = number
        while len(epochs) > _EPOCHS_KEPT:
            del epochs[next(iter(epochs))]
        later = {(e, n) for e, n in heard if e in epochs and n > epochs[e]}
        if later:
            self._heard[channel] = later

    def _missed(self, channel: bytes, count: Count) -> bool:
        """Compare ``count``, the count of ``channel``'s user's revocations just read from
        Redis, with those accounted for here in its epoch; return whether any of them was
        neither heard nor read from the stream (which connection it named is then not
        known). Accounted for from now on."""
        if channel not in self._revocations:
            self._advance(channel, count)
            return False
        # Those accounted for in its epoch: none but those heard, in one new here.
        self._advance(channel, (count[0], 0))
        known = self._revocations[channel][count[0]]
        self._advance(channel, count)
        return count[1] > known

    async def _missed_since(self, channel: bytes, count: Count) -> bool:
        """:meth:`_missed` for ``count``, read once Redis confirmed the subscription of
        ``channel``: a revocation it counts may have reached this process with its message
        not read from the subscription yet, and is then read from the stream first."""
        known = self._revocations.get(channel)
        if known is not None and count[1] > known.get(count[0], 0):
            await self._read_recent([])
        return self._missed(channel, count)

    def _missed_revocations(self, channels: list[bytes], counts: list[Count]) -> None:
        """After an outage of the subscription (or aclose() with sockets held), once the
        recent revocations are read: revoke the sockets of every user whose count of
        revocations (``counts``, of ``channels``' users, read before the recent ones) grew
        by one this process neither heard nor read (the stream no longer held it)."""
        deliver = self._deliver
        for channel, count in zip(channels, counts, strict=True):
            user = self._users.get(channel)
            if user is None or channel not in self._revocations:
                continue  # unsubscribed meanwhile
            if self._missed(channel, count) and deliver is not None:
                logger.warning(
                    "ambient: a user was revoked while the Redis subscription was down, "
                    "and the revocation is no longer among the recent ones; revoking "
                    "their sockets here now"
                )
                deliver(Envelope(user, REVOKE, None, "access revoked"))

    async def _claim(self, channel: bytes) -> bool:
        """Wait until ``channel`` is confirmed (``False``) or no subscription here is on
        its way to subscribe it; then this one is (``True``): the first of its user here,
        or the next after a first that gave up before its SUBSCRIBE, which nothing else
        would send."""
        while channel not in self._confirmed:
            if channel not in self._subscribing:
                self._subscribing.add(channel)
                return True
            await self._wait_changed()
            self._check_up()  # the connection broke meanwhile: fail now
        return False

    async def _release(self, user: UserRef, *, claimed: bool) -> None:
        """Drop the reference of a subscription of ``user`` that failed. One that
        ``claimed`` the channel and never sent its SUBSCRIBE wakes the sockets waiting
        for it, and the next of them subscribes."""
        if claimed:
            self._subscribing.discard(self.channel(user))
            self._notify()
        with anyio.CancelScope(shield=True):
            await self.unsubscribe(user)

    def _check_up(self) -> None:
        if self._down_since is not None:
            down = anyio.current_time() - self._down_since
            raise BroadcastError(f"Redis has been unreachable for {down:.1f} s")

    async def unsubscribe(self, user: UserRef) -> None:
        """Drop one reference on ``user``'s channel; the last one unsubscribes."""
        channel = self.channel(user)
        refs = self._refs.get(channel, 0) - 1
        if refs > 0:
            self._refs[channel] = refs
            return
        self._refs.pop(channel, None)
        self._users.pop(channel, None)
        self._revocations.pop(channel, None)
        self._heard.pop(channel, None)
        self._confirmed.discard(channel)
        self._subscribing.discard(channel)
        if self._pending.get(channel, 0) > 0:
            self._unsubscribed.add(channel)
        await self._send("UNSUBSCRIBE", channel)

    async def _send(self, command: str, channel: bytes) -> None:
        if command == "SUBSCRIBE":
            # Written now, or (no connection) by the reader as it subscribes every channel.
            self._unsubscribed.discard(channel)
        connection = self._subscription
        if connection is None or not connection.is_connected:
            return  # the reader (re)subscribes every wanted channel when it connects
        if command == "SUBSCRIBE":
            self._pending[channel] = self._pending.get(channel, 0) + 1
            if self._unanswered_since is None:
                self._unanswered_since = anyio.current_time()
        try:
            await _write(connection, command, channel)
        except Exception:  # the reader notices the broken connection
            logger.debug("ambient: %s on Redis failed", command, exc_info=True)

    async def _wait_changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_connected(self) -> None:
        """Wait until the subscription connection is up and the recent revocations read,
        starting it if needed (bound the wait with ``anyio.fail_after``).

        Awaited in the application's lifespan startup, it starts the subscription before
        any handshake is under way: a subscription starting later dates the revocations
        of the last five minutes as it reads them, and revokes a handshake of those users
        that is joining then, also one validated after the revocation.
        """
        self._on_this_loop()
        self._start_reader()
        while not self._connected or not self._caught_up:
            await self._wait_changed()

    # -- the reader task -----------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            # An empty contextvars.Context: the reader serves every user of the process and
            # must not carry the context of the request that happened to start it.
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_forever(), context=contextvars.Context())

    async def _read_forever(self) -> None:
        delay = self.reconnect_delay
        while True:
            try:
                await self._read_once()
            except Exception as error:  # noqa: BLE001 - any failure means: reconnect
                if self._down_since is None:
                    self._down_since = anyio.current_time()
                    logger.warning("ambient: lost the Redis subscription (%s); reconnecting", error)
            finally:
                if self._connected:
                    delay = self.reconnect_delay  # it worked for a while: retry promptly
                self._connected = False
                self._resync = False  # set again once every channel is subscribed again
                self._caught_up = False  # read again once every channel is subscribed
                self._confirmed.clear()
                self._pending.clear()
                self._unsubscribed.clear()  # a new connection has none of the old's answers
                self._unanswered_since = None
                connection, self._subscription = self._subscription, None
                if connection is not None:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(connection.disconnect(nowait=True))
                self._notify()
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)

    async def _read_once(self) -> None:
        connection = self._new_subscription()
        channels = [self._control, self._revoked, *self._refs]
        for channel in channels:
            self._pending[channel] = 1
        try:
            with anyio.fail_after(self.timeout):
                # Any: redis-py leaves connect() untyped in some releases.
                connect: Any = connection.connect
                await connect()
                await _write(connection, "SUBSCRIBE", *channels)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _close_quietly(connection.disconnect(nowait=True))
            raise
        self._subscription = connection
        self._unanswered_since = anyio.current_time()
        # Channels subscribed or dropped while the SUBSCRIBE above was on its way.
        sent = set(channels)
        late = [channel for channel in self._refs if channel not in sent]
        gone = [c for c in channels[2:] if c not in self._refs]
        if late:
            for channel in late:
                self._pending[channel] = 1
            await _write(connection, "SUBSCRIBE", *late)
        if gone:
            await _write(connection, "UNSUBSCRIBE", *gone)
        interval = self.health_check_interval
        silent_since = anyio.current_time()
        pinged = False
        while True:
            message = await _read(connection, interval)
            now = anyio.current_time()
            unanswered = self._unanswered_since
            if unanswered is not None and now - unanswered >= 2 * interval:
                msg = f"Redis answered no SUBSCRIBE within {2 * interval} s"
                raise ConnectionError(msg)
            if message is None:
                if now - silent_since >= 2 * interval:
                    raise ConnectionError(f"Redis did not answer a ping within {interval} s")
                if not pinged:
                    await _write(connection, "PING")
                    pinged = True
                continue
            silent_since = now
            pinged = False
            self._handle(message)
            if self._connected and not self._caught_up:
                # Failing here (Redis gone again) reconnects, and reads again after that.
                await self._recent_revocations()
                self._caught_up = True
                self._resync = False
                self._notify()

    def _new_subscription(self) -> AbstractConnection:
        """A new, unconnected connection for the subscription, made by the reader only."""
        from redis.asyncio import ConnectionPool
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self._sub_pool is None:
            # Only its connection settings are used: connections are made from them, never
            # taken from (nor given back to) the pool.
            self._sub_pool = ConnectionPool.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0),
            )
        pool = self._sub_pool
        connection: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
        return connection

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        channel: bytes = message[1] if len(message) > 1 else b""
        if kind == b"message" and channel == self._revoked:
            if not self._caught_up:
                # Kept in the stream of recent revocations before it was published, so the
                # read of that stream still to come delivers it, in order with those this
                # process missed before it.
                return
            entry_id, _, rest = message[2].partition(b" ")
            count, _, raw = rest.partition(b" ")
            self._revocation_heard(entry_id, count, raw)
        elif kind == b"message":
            user = self._users.get(channel)
            deliver = self._deliver
            if user is None or deliver is None:
                return
            try:
                envelope = decode_envelope(message[2])
            except (ValueError, UnicodeDecodeError):
                logger.warning("ambient: dropped a malformed message on a websocket channel")
                return
            if envelope.user != user:
                logger.warning("ambient: dropped a message whose user does not match its channel")
                return
            if envelope.mode == REVOKE:
                # Not made by publish(), which counts a revocation and keeps it in the stream
                # of recent ones: delivered, it would end the user's sockets only in the
                # processes subscribed to this channel, its subscription up, and no process
                # would learn of it later.
                logger.warning(
                    "ambient: dropped a revocation on a user's channel (revocations come on "
                    "the revocations channel only)"
                )
                return
            deliver(envelope)
        elif kind == b"subscribe":
            # Redis takes what this process writes: the rest is waited for from now.
            self._unanswered_since = anyio.current_time()
            pending = self._pending.get(channel, 0) - 1
            if pending > 0:
                self._pending[channel] = pending
                return
            self._pending.pop(channel, None)
            if channel in self._unsubscribed:
                self._unsubscribed.discard(channel)  # the last answer from before it
            elif channel in self._refs or channel in (self._control, self._revoked):
                self._confirmed.add(channel)
            if not self._pending:
                self._unanswered_since = None
            if not self._connected and not self._pending:
                self._connected = True
                if self._down_since is not None:
                    self.reconnects += 1
                    self._resync = True
                    logger.warning("ambient: the Redis subscription is back")
                elif self._closed and self._refs:
                    # Started again after aclose() with sockets held: their users may have
                    # been revoked meanwhile, in revocations the stream no longer holds.
                    self._resync = True
                self._down_since = None
                self._closed = False
            self._notify()

    async def aclose(self) -> None:
        """Stop the reader and close the Redis connections (used again on next use), once
        the publishes under way on them are done (each within ``timeout``).

        The revocations heard are not forgotten: started again, the backend delivers those
        of the last five minutes it has not heard, as after an outage, not every one again;
        and, as after an outage, it revokes the sockets still held here of every user with
        a revocation it neither heard nor read (made while it was closed, and no longer
        among the recent ones).
        """
        reader, self._reader = self._reader, None
        if reader is not None:
            with anyio.CancelScope(shield=True):
                while not reader.done():
                    # Again until it ends: a cancellation that lands as one of the reader's
                    # own deadlines expires can be taken for that deadline's, and the
                    # reader would go on reconnecting while shutdown waits for it.
                    reader.cancel()
                    await asyncio.wait([reader], timeout=self.timeout)
        # Taken out first: a publish from now on makes a client of its own. Those under way
        # on this one are waited for (each within its timeout): closed under them, it would
        # take back the connection a retry opened again, and leave it open.
        client, self._client = self._client, None
        free, self._free = self._free, None
        self._sub_pool = None
        if free is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                for _ in range(self.max_connections):
                    await free.acquire()
        if client is not None:
            await _close_quietly(client.aclose())
        self._connected = False
        self._caught_up = False
        # The revocations heard are kept (_seen, _last_heard, the accounting per channel):
        # started again, it delivers from the stream only those it has not heard, as after
        # an outage. Delivered again, one heard minutes ago ended the sockets its user
        # opened since with a new credential. Another Redis behind the URL by then is taken
        # as after a failover: the read starts at the one heard last only if its stream
        # holds that one, and its counts, of epochs of its own, match none heard. _seen
        # stays within _SEEN_KEPT. The channels of the sockets the hub still holds stay
        # subscribed: started again, it compares their users' counts of revocations with
        # those accounted for, as after an outage, for one that the stream lost meanwhile
        # or that fell out of its five minutes.
        self._closed = True
        self._down_since = None
        self._confirmed.clear()
        self._pending.clear()
        self._unsubscribed.clear()
        self._unanswered_since = None
        self._notify()
        self._loop = None


async def _write(connection: AbstractConnection, *command: str | bytes) -> None:
    """Write ``command`` on the subscription connection, or raise ``ConnectionError`` if it
    is closed: never connect it again, nor ping it first, as redis-py would."""
    if not connection.is_connected:
        raise ConnectionError("the Redis subscription connection is closed")
    await connection.send_command(*command, check_health=False)


async def _read(connection: AbstractConnection, silence: float) -> list[Any] | None:
    """The next message on the subscription connection (``None`` after ``silence`` seconds
    without one), or ``ConnectionError`` if it is closed: it is not connected again."""
    if not connection.is_connected:
        raise ConnectionError("the Redis subscription connection is closed")
    response = await connection.read_response(timeout=silence, push_request=True)
    if response is None:
        return None
    if isinstance(response, bytes):  # a PING's answer over RESP3
        return [b"pong", response]
    if not isinstance(response, list) or not response:
        msg = f"Redis sent {response!r} on the subscription connection"
        raise ConnectionError(msg)
    return response


async def _close_quietly(closing: Awaitable[None]) -> None:
    try:
        await closing
    except Exception:  # a connection that is already broken
        logger.debug("ambient: closing a Redis connection failed", exc_info=True)
