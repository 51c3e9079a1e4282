"""One-time tickets for browser websockets: no credential in a URL.

A browser cannot set headers on ``new WebSocket(url)``, so a token ends up in the query
string, and from there in access logs, proxy logs and span attributes. Instead, an
authenticated HTTP request asks for a ticket, and the websocket presents it once::

    tickets = WebSocketTickets()  # or WebSocketTickets(RedisTicketStore(client))
    app = AmbientMiddleware(app, registry=registry, identity=first_of(tickets, jwt_bearer(...)))

    @app.post("/ws-ticket")
    async def ws_ticket() -> dict[str, str]:
        return {"ticket": await tickets.issue()}  # for the current context's user

    # browser: new WebSocket(`wss://host/ws?ticket=${ticket}`)

A ticket is 256 random bits, valid for ``ttl`` seconds (30 by default) and for one
handshake: the store takes it out atomically, so of two connections racing with one ticket
exactly one gets in. A handshake the middleware refuses for a reason that is not the
ticket's (a bad thread id, the per-user limit, a 503 before accept) gives the ticket back
for the rest of its ``ttl``, so that the client can retry with it. The store keeps a
SHA-256 of the ticket, never the ticket itself.

An outstanding ticket is a credential of its own: for a logout or a ban, refuse the user's
credential, then ``await tickets.revoke(user_id, tenant_id=...)`` so that every ticket issued
for that user before the call is refused (401) in every process sharing the store, then end
the user's open sockets (``hub.revoke(...)``). Tickets issued after the call work. The store
keeps a revocation generation per user, which every ticket carries from its issue; a ticket
of an older generation is refused. A generation is kept for 10 minutes after the user's
latest revocation or ticket, so it outlives every ticket that carries it.

One user holds at most ``max_per_user`` outstanding tickets (16 by default, an argument of
either store): one more drops that user's oldest, so a user who calls the issuing endpoint
in a loop neither pushes out the tickets of the others nor fills the store they share
(only ``MemoryTicketStore``'s bound on all users together, ``max_tickets``, drops the
oldest ticket of anyone, once that many are out).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast, runtime_checkable
from urllib.parse import parse_qsl

from ambient import _checks, _loops
from ambient._binding import _shown, get_current_context
from ambient._context import ANONYMOUS, UserRef, validate_id
from ambient._context import ReadOnlyDict as _ReadOnlyDict
from ambient.errors import IdentityError, IdentityUnavailableError
from ambient.middleware.identity import _EXPIRES_AT_KEY, Identity

__all__ = [
    "MemoryTicketStore",
    "PerUserTicketStore",
    "RedisTicketStore",
    "RevocableTicketStore",
    "TicketStore",
    "WebSocketTickets",
]

logger = logging.getLogger("ambient.middleware")

_TICKET = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
_MAX_TTL = 300.0
# How long a user's revocation generation outlives their latest revocation or ticket:
# twice the longest ttl, so that it outlives every ticket that carries it whatever ttl the
# instances sharing the store use, a ticket given back after a refused handshake, and
# clocks that disagree by minutes. Were it to go while such a ticket is out, a revocation
# after that would count from 0 again and could let the ticket in. Once it is gone the
# user's generation reads 0, as every ticket issued since carries.
_KEEP_GENERATION = 2 * _MAX_TTL
_MAX_PER_USER = 16
_REFUSED = "the websocket ticket is unknown, expired or already used"
_ASYNCIO_ONLY = (
    "redis-py's asyncio client runs on asyncio only, and this code runs under another event "
    "loop (trio?): run the application on asyncio, or use MemoryTicketStore"
)


@runtime_checkable
class TicketStore(Protocol):
    """Where issued tickets wait for their handshake."""

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds."""
        ...

    async def take(self, key: str) -> bytes | None:
        """Remove and return the value under ``key``, atomically; ``None`` when absent."""
        ...


@runtime_checkable
class RevocableTicketStore(TicketStore, Protocol):
    """A ticket store that also keeps each user's revocation generation, which
    :meth:`WebSocketTickets.revoke` needs. Both built-in stores are; a store with only
    ``put()`` and ``take()`` still issues and redeems tickets, and ``revoke()`` over it
    raises ``TypeError``."""

    async def generation(self, user: str, keep: float) -> int:
        """The generation under ``user`` (an opaque key): 0 when none, or once expired. One
        that exists is kept ``keep`` seconds from now, atomically with this read, so that
        it outlives the ticket about to carry it."""
        ...

    async def revoke(self, user: str, keep: float) -> None:
        """Add 1 to the generation under ``user``, atomically, and keep it ``keep`` seconds
        from now (from this call, also when it was kept longer before)."""
        ...


@runtime_checkable
class PerUserTicketStore(TicketStore, Protocol):
    """A ticket store that knows whose each ticket is, and holds a bounded number of one
    user's: :class:`WebSocketTickets` puts every ticket with :meth:`put_for` then. Both
    built-in stores are; over a store with only ``put()`` and ``take()`` the bound is the
    store's business."""

    async def put_for(self, user: str, key: str, value: bytes, ttl: float) -> None:
        """As :meth:`~TicketStore.put`, as one of ``user``'s (an opaque key) outstanding
        tickets: when that user holds as many as the store's bound, their oldest are
        dropped (atomically with the put), never another user's."""
        ...


def _check_max(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be an int >= 1, not {value!r}"
        raise ValueError(msg)
    return value


class MemoryTicketStore:
    """Tickets in this process's memory: for one server process (a handshake that reaches
    another worker finds no ticket; use :class:`RedisTicketStore` there).

    Args:
        max_tickets: Tickets held at most, all users together (a bound on memory); beyond
            it the oldest outstanding ticket is dropped, whoever's it is. A user reaches it
            alone only with ``max_per_user`` as large.
        max_per_user: Tickets of one user (and tenant) held at most; one more drops that
            user's oldest outstanding ticket.
        clock: Monotonic seconds (for tests).
    """

    def __init__(
        self,
        *,
        max_tickets: int = 100_000,
        max_per_user: int = _MAX_PER_USER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = _check_max("max_tickets", max_tickets)
        self._max_per_user = _check_max("max_per_user", max_per_user)
        self._clock = _checks.clock(clock)
        self._lock = threading.Lock()
        # In order of their deadlines, but for tickets put with a deadline earlier than
        # ``_latest`` (one given back after a refused handshake): those are in ``_early``
        # too, so that they expire on time rather than once every ticket before them has.
        # key -> (deadline, value, the user put_for() named or None).
        self._entries: OrderedDict[str, tuple[float, bytes, str | None]] = OrderedDict()
        # user -> the keys of their outstanding tickets, in the order they were put.
        self._users: dict[str, dict[str, None]] = {}
        self._early: list[tuple[float, str]] = []
        self._latest = -math.inf  # the latest deadline of a ticket put in order
        # user -> (generation, deadline), in the order of their deadlines.
        self._generations: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._entries)

    def _purge(self, now: float) -> None:
        entries = self._entries
        early = self._early
        while early and early[0][0] <= now:
            deadline, key = heapq.heappop(early)
            entry = entries.get(key)
            if entry is not None and entry[0] == deadline:  # not taken (nor put again)
                del entries[key]
                if entry[2] is not None:
                    self._forget(entry[2], key)
        while entries:
            key, (deadline, _, user) = next(iter(entries.items()))
            if deadline > now and len(entries) <= self._max:
                return
            del entries[key]
            if user is not None:
                self._forget(user, key)

    def _forget(self, user: str, key: str) -> None:
        held = self._users.get(user)
        if held is not None:
            held.pop(key, None)
            if not held:
                del self._users[user]

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        self._put(None, key, value, ttl)

    async def put_for(self, user: str, key: str, value: bytes, ttl: float) -> None:
        self._put(user, key, value, ttl)

    def _put(self, user: str | None, key: str, value: bytes, ttl: float) -> None:
        with self._lock:
            now = self._clock()
            deadline = now + ttl
            entries = self._entries
            entry = entries.pop(key, None)
            if entry is not None and entry[2] is not None:
                self._forget(entry[2], key)
            if user is not None:
                held = self._users.get(user)
                if held is None:
                    self._users[user] = {key: None}
                else:
                    if len(held) >= self._max_per_user:
                        # Expired ones first, so that only live tickets count.
                        self._purge(now)
                        while len(held) >= self._max_per_user:
                            oldest = next(iter(held))
                            del held[oldest], entries[oldest]
                    # Back in place: the purge forgets a user whose tickets all expired.
                    self._users[user] = held
                    held[key] = None
            if not entries:
                self._latest = -math.inf
                self._early.clear()
            if deadline >= self._latest:
                self._latest = deadline
            else:
                early = self._early
                if len(early) > 2 * len(entries) + 8:
                    # Mostly tickets taken since: rebuilt from the ones still here.
                    early[:] = [(d, k) for d, k in early if entries.get(k, (None,))[0] == d]
                    heapq.heapify(early)
                heapq.heappush(early, (deadline, key))
            entries[key] = (deadline, value, user)
            self._purge(now)

    async def take(self, key: str) -> bytes | None:
        with self._lock:
            now = self._clock()
            entry = self._entries.pop(key, None)
            if entry is not None and entry[2] is not None:
                self._forget(entry[2], key)
            # Expired tickets go here too, not only when one is issued: a burst of tickets
            # never used would otherwise stay until the next ticket is issued.
            self._purge(now)
            if entry is None or entry[0] <= now:
                return None
            return entry[1]

    async def generation(self, user: str, keep: float) -> int:
        with self._lock:
            now = self._clock()
            generations = self._generations
            self._purge_generations(now)
            entry = generations.pop(user, None)
            if entry is None or entry[1] <= now:
                return 0
            generations[user] = (entry[0], max(entry[1], now + keep))
            return entry[0]

    async def revoke(self, user: str, keep: float) -> None:
        with self._lock:
            now = self._clock()
            generations = self._generations
            self._purge_generations(now)
            entry = generations.pop(user, None)
            generations[user] = (1 if entry is None else entry[0] + 1, now + keep)

    def _purge_generations(self, now: float) -> None:
        generations = self._generations
        while generations:
            user, (_, deadline) = next(iter(generations.items()))
            if deadline > now:
                return
            del generations[user]


class RedisTicketStore:
    """Tickets in Redis (6.2 or newer), shared by every worker and server: one Redis (a
    primary with its replicas), not a Redis Cluster, as the script that puts a ticket also
    drops the user's oldest, keys in other slots. Past ``max_per_user`` that script runs
    a command per ticket of the user, so keep the bound small (the default is 16).

    A Redis that cannot be reached raises :class:`~ambient.errors.IdentityUnavailableError`
    (503 with ``Retry-After`` for the request issuing a ticket, a handshake closed with
    1013, or the request revoking a user's tickets): the ticket may be fine, the store is
    not.

    Args:
        client: A ``redis.asyncio.Redis`` (extra ``redis``; ``decode_responses`` either
            way); asyncio only.
        prefix: Key prefix; a ticket's key expires with the ticket, the list of a user's
            outstanding tickets (``<prefix>held:<hash>``) with the last of them, a
            user's revocation generation (``<prefix>revoked:<hash>``) 10 minutes after the
            user's latest revocation or ticket. A Redis that evicts keys with an expiry
            under ``maxmemory`` (``volatile-*``, ``allkeys-*``) or restarts without
            persistence can lose a generation, and with it the revocation of tickets still
            out.
        max_per_user: Tickets of one user (and tenant) held at most, all processes
            together; one more drops that user's oldest outstanding ticket, in the same
            Lua script that stores the new one.
    """

    def __init__(
        self, client: Any, *, prefix: str = "ambient:ws-ticket:", max_per_user: int = _MAX_PER_USER
    ) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        self._max_per_user = _check_max("max_per_user", max_per_user)
        self._client = client
        self._prefix = prefix
        self._put_for: Any = None  # the script, registered on first use

    async def put_for(self, user: str, key: str, value: bytes, ttl: float) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        script = self._put_for
        if script is None:
            script = self._put_for = self._client.register_script(_PUT_FOR)
        try:
            stored = await script(
                keys=[self._prefix + key, f"{self._prefix}held:{user}"],
                args=[value, max(1, math.ceil(ttl * 1000)), self._max_per_user],
            )
        except RedisError as error:
            raise _store_unavailable("issued", error) from error
        if not stored:  # pragma: no cover - 256 random bits do not collide
            msg = "a ticket with this key is already outstanding"
            raise RuntimeError(msg)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        try:
            stored = await self._client.set(
                self._prefix + key, value, px=max(1, math.ceil(ttl * 1000)), nx=True
            )
        except RedisError as error:
            raise _store_unavailable("issued", error) from error
        if not stored:  # pragma: no cover - 256 random bits do not collide
            msg = "a ticket with this key is already outstanding"
            raise RuntimeError(msg)

    async def take(self, key: str) -> bytes | None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        try:
            value = await self._client.getdel(self._prefix + key)
        except RedisError as error:
            raise _store_unavailable("redeemed", error) from error
        if value is None:
            return None
        # A client made with decode_responses=True answers str (tickets are ASCII JSON).
        return value.encode() if isinstance(value, str) else bytes(value)

    async def generation(self, user: str, keep: float) -> int:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        try:
            value = await self._client.getex(
                self._generation_key(user), px=max(1, math.ceil(keep * 1000))
            )
        except RedisError as error:
            raise _store_unavailable("issued or redeemed", error) from error
        return 0 if value is None else int(value)

    async def revoke(self, user: str, keep: float) -> None:
        _loops.refuse_trio(_ASYNCIO_ONLY)
        from redis.exceptions import RedisError

        key = self._generation_key(user)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.pexpire(key, max(1, math.ceil(keep * 1000)))
                await pipe.execute()
        except RedisError as error:
            raise IdentityUnavailableError(
                "the ticket store (Redis) cannot be reached, so the user's tickets were not "
                f"revoked: nothing was; try again shortly ({type(error).__name__})"
            ) from error

    def _generation_key(self, user: str) -> str:
        # A ticket's key is 64 hex digits: "revoked:" sets these apart from every one.
        return f"{self._prefix}revoked:{user}"


# Stores a ticket (KEYS[1]; ARGV[1] for ARGV[2] ms) and lists it last among its user's
# (KEYS[2], oldest first), after dropping as many of the user's oldest as leave it room
# among ARGV[3]. The list is pruned only once it is full, so that the common put costs no
# more than a SET: it still names tickets taken (GETDEL knows no user) or expired since,
# and a ticket given back twice; those do not count, and a ticket counts where it was last
# put. The tickets it names are keys the script was not passed: one Redis, not a cluster.
_PUT_FOR = """
local held, ttl, bound = KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('LLEN', held) >= bound then
    local listed = redis.call('LRANGE', held, 0, -1)
    local left = redis.call('PTTL', held)
    local live, seen = {}, {[KEYS[1]] = true}
    for i = #listed, 1, -1 do
        local key = listed[i]
        if not seen[key] then
            seen[key] = true
            if redis.call('EXISTS', key) == 1 then
                live[#live + 1] = key
            end
        end
    end
    for i = bound, #live do
        redis.call('DEL', live[i])
    end
    redis.call('DEL', held)
    for i = math.min(#live, bound - 1), 1, -1 do
        redis.call('RPUSH', held, live[i])
    end
    if left > 0 and #live > 0 and bound > 1 then
        redis.call('PEXPIRE', held, left)
    end
end
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
    return 0
end
redis.call('RPUSH', held, KEYS[1])
if redis.call('PTTL', held) < ttl then
    redis.call('PEXPIRE', held, ttl)
end
return 1
"""


def _store_unavailable(what: str, error: Exception) -> IdentityUnavailableError:
    return IdentityUnavailableError(
        f"the ticket store (Redis) cannot be reached, so no ticket can be {what}; try again "
        f"shortly ({type(error).__name__})"
    )


class WebSocketTickets:
    """Issues one-time websocket tickets, and is the identity resolver that redeems them.

    As a resolver it looks only at websocket handshakes carrying the ``query`` parameter
    (anything else is no identity, for :func:`~ambient.middleware.first_of` to go on). A
    ticket that is malformed, unknown, expired or already used is refused (401); a
    repeated parameter is malformed (400). A handshake that the middleware refuses after
    redeeming its ticket, for a reason that is not the ticket's (400 for a bad thread id,
    429 over ``max_concurrent_per_user``, an error of the app answered before accept), gives
    the ticket back for the rest of its ``ttl``: the retry with it can get in. A ticket
    issued before :meth:`revoke` was called for its user is refused (401) as well.

    A user (and tenant) holds at most the store's ``max_per_user`` outstanding tickets (16
    by default): issuing one more drops that user's oldest, whose handshake is then refused
    (401), not another user's. A ticket given back counts once, as the user's newest.

    Args:
        store: Where tickets wait (default: a :class:`MemoryTicketStore`).
        ttl: Seconds a ticket stays valid; more than 0 and at most 300.
        query: The query parameter that carries the ticket.
        clock: Wall-clock seconds since the epoch (for tests).
    """

    def __init__(
        self,
        store: TicketStore | None = None,
        *,
        ttl: float = 30.0,
        query: str = "ticket",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= _MAX_TTL:
            msg = f"ttl must be seconds, more than 0 and at most 300, not {ttl!r}"
            raise ValueError(msg)
        if not isinstance(query, str) or not query:
            msg = f"query must be a non-empty str, not {query!r}"
            raise ValueError(msg)
        if store is not None and not isinstance(store, TicketStore):
            msg = f"store must have async put() and take(), not {type(store).__name__}"
            raise TypeError(msg)
        self.store: TicketStore = MemoryTicketStore() if store is None else store
        self.ttl = float(ttl)
        self.query = query
        self._clock = _checks.clock(clock)
        # The store last checked, whether it keeps revocations, whether it bounds a user's.
        self._checked: tuple[TicketStore | None, bool, bool] = (None, False, False)

    async def issue(self, *, expires_at: float | None = None) -> str:
        """A ticket for the current context's user and tenant, with its ``claims``.

        The websocket it opens expires (closed with 4001) at ``expires_at``, by default
        when the credential the current request presented does (a JWT's ``exp``, a signed
        context's expiry), if it does.

        Raises:
            NoActiveContextError: outside a request.
            IdentityError: in an anonymous caller's context (401 from the middleware): its
                user is its request's alone, and the ticket would carry it to a socket as
                a signed-in user.
            TypeError: when the context's claims are not JSON, or ``expires_at`` is not
                seconds since the epoch.
            ValueError: when ``expires_at`` is infinite (``None``, the default, is the
                credential's expiry).
        """
        # As Identity checks it: the handshake redeeming the ticket would fail on it.
        _checks.instant(expires_at, "expires_at")
        ctx = get_current_context()
        if ctx.metadata.get(ANONYMOUS) is True:
            msg = "websocket tickets are issued to signed-in users; this request had no identity"
            raise IdentityError(msg, status=401)
        claims = ctx.metadata.get("claims")
        if expires_at is None:
            expires_at = _credential_expiry()
        if expires_at is None and isinstance(claims, Mapping):
            exp = claims.get("exp")
            if exp is not None and not isinstance(exp, bool):
                # As PyJWT and jwt_bearer() read it (a numeric string too): the ticket's
                # socket must end when the token it was issued from does.
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    expires_at = float(int(exp))
        user = _user_key(ctx.user_id, ctx.tenant_id)
        revocable = self._revocable()
        # Read before the ticket is put: a revoke() in between leaves it an older generation.
        generation = 0 if revocable is None else await revocable.generation(user, _KEEP_GENERATION)
        ticket = secrets.token_urlsafe(32)
        now = self._clock()
        payload = {
            "user": ctx.user_id,
            "tenant": ctx.tenant_id,
            "claims": dict(claims) if isinstance(claims, Mapping) else None,
            "expires_at": expires_at,
            "valid_until": now + self.ttl,
            "generation": generation,
        }
        try:
            value = json.dumps(payload, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            msg = f"a ticket carries the context's claims, which must be JSON: {exc}"
            raise TypeError(msg) from None
        await self._put(user, _key(ticket), value, self.ttl)
        return ticket

    async def revoke(self, user: UserRef | str, *, tenant_id: str | None = None) -> None:
        """Refuse every ticket issued for ``user`` (and ``tenant_id``) before this call, in
        every process that shares the store; tickets issued after it work.

        For a logout, a ban or a revoked session: refuse the user's credential (so that no
        new ticket is issued), call this, then end the user's open sockets
        (:meth:`ConnectionHub.revoke <ambient.integrations.websockets.ConnectionHub.revoke>`).
        A ticket issued while this runs may be refused too; none issued before it gets in.

        Raises:
            InvalidContextError: ``user`` or ``tenant_id`` is not a valid id.
            ValueError: ``user`` is a ``UserRef`` and ``tenant_id`` is given as well.
            TypeError: the store keeps no revocations (it has only ``put()`` and ``take()``;
                see :class:`RevocableTicketStore`).
            IdentityUnavailableError: the store (Redis) cannot be reached; nothing was
                revoked. Answered 503 with ``Retry-After`` if it leaves a request: retry.
        """
        if isinstance(user, UserRef):
            if tenant_id is not None:
                msg = "pass the tenant inside the UserRef, not as tenant_id as well"
                raise ValueError(msg)
            user_id, tenant = user.user_id, user.tenant_id
        else:
            user_id, tenant = user, tenant_id
        user_id = validate_id("user_id", user_id)
        tenant = None if tenant is None else validate_id("tenant_id", tenant)
        revocable = self._revocable()
        if revocable is None:
            msg = (
                f"the ticket store {type(self.store).__name__} keeps no revocations: give it "
                "async generation() and revoke() (see RevocableTicketStore), or use "
                "MemoryTicketStore or RedisTicketStore"
            )
            raise TypeError(msg)
        await revocable.revoke(_user_key(user_id, tenant), _KEEP_GENERATION)

    async def __call__(self, scope: Mapping[str, Any]) -> Identity | None:
        if scope.get("type") != "websocket":
            return None
        query = scope.get("query_string", b"")
        if not query:
            return None
        name = self.query
        found = [
            v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == name
        ]
        if not found:
            return None
        if len(found) > 1:
            raise IdentityError(f"the {name!r} query parameter is repeated", status=400)
        ticket = found[0]
        if _TICKET.fullmatch(ticket) is None:
            raise IdentityError(_REFUSED, status=401)
        key = _key(ticket)
        value = await self.store.take(key)
        if value is None:
            raise IdentityError(_REFUSED, status=401)
        payload = json.loads(value)
        now = self._clock()
        expires_at = payload["expires_at"]
        if payload["valid_until"] <= now or (expires_at is not None and expires_at <= now):
            raise IdentityError(_REFUSED, status=401)
        user = _user_key(payload["user"], payload["tenant"])
        revocable = self._revocable()
        if revocable is not None:
            # Read after the take: a revoke() that returned before this handshake began is
            # seen. A ticket issued before the upgrade that added generations counts as 0.
            try:
                current = await revocable.generation(user, _KEEP_GENERATION)
            except Exception:
                # Not the ticket's fault (the store failed after the take): back for the
                # retry that the 1013 asks for, still to be checked against the generation.
                await self._give_back(user, key, value, payload["valid_until"])
                raise
            if payload.get("generation", 0) < current:
                raise IdentityError(_REFUSED, status=401)
        claims = payload["claims"]
        identity = _TicketIdentity(
            payload["user"],
            payload["tenant"],
            _ReadOnlyDict(claims or {}),
            expires_at=expires_at,
        )
        object.__setattr__(identity, "_spent", (self, user, key, value, payload["valid_until"]))
        return identity

    def _check(self) -> tuple[TicketStore | None, bool, bool]:
        """The store, whether it keeps revocation generations and whether it bounds a
        user's tickets; checked once per store, as an isinstance() of a runtime protocol
        costs microseconds on every issue and handshake."""
        store = self.store
        checked = self._checked
        if checked[0] is not store:
            checked = self._checked = (
                store,
                isinstance(store, RevocableTicketStore),
                isinstance(store, PerUserTicketStore),
            )
        return checked

    def _revocable(self) -> RevocableTicketStore | None:
        """The store, if it keeps revocation generations."""
        store, revocable, _ = self._check()
        return cast(RevocableTicketStore, store) if revocable else None

    async def _put(self, user: str, key: str, value: bytes, ttl: float) -> None:
        """Put a ticket in the store, as ``user``'s when the store bounds a user's."""
        store, _, per_user = self._check()
        if per_user:
            await cast(PerUserTicketStore, store).put_for(user, key, value, ttl)
        else:
            await self.store.put(key, value, ttl)

    async def _give_back(self, user: str, key: str, value: bytes, valid_until: float) -> None:
        """Put a taken ticket back for the rest of its ttl (its handshake was refused)."""
        # At most a ttl, whatever this process's clock says is left: one behind the
        # issuer's would have the store keep the ticket past the generation it carries
        # (kept from this handshake's read), and a revocation after that generation went
        # would count from 0 again, up to the ticket's own, and let it in.
        left = min(valid_until - self._clock(), self.ttl)
        if left <= 0:
            return
        try:
            await self._put(user, key, value, left)
        except Exception:  # the refusal goes out all the same; the ticket stays spent
            logger.warning(
                "ambient: a websocket ticket could not be given back to its store after the "
                "handshake was refused; the client needs a new ticket",
                exc_info=True,
            )


class _TicketIdentity(Identity):
    """An identity redeemed from a ticket: when the middleware refuses the handshake, the
    ticket goes back to the store (once), so that a retry with it gets in. Only the
    handshake that took the ticket holds it, and one that got in never gives it back: a
    ticket still admits one connection at most."""

    __slots__ = ("_spent",)

    _spent: tuple[WebSocketTickets, str, str, bytes, float] | None

    async def _refused(self) -> None:
        # A copy (dataclasses.replace() by a resolver wrapping this one) has none: the
        # ticket stays spent, and its refusal goes out as the middleware made it.
        spent = getattr(self, "_spent", None)
        if spent is None:
            return
        object.__setattr__(self, "_spent", None)
        tickets, user, key, value, valid_until = spent
        await tickets._give_back(user, key, value, valid_until)


def _credential_expiry() -> float | None:
    """When the credential of the request or websocket whose scope is bound here expires,
    or ``None``: found through the scopes of the bound user here, a message scope's parent
    included (a child scope has no expiry of its own)."""
    binding = _shown()
    user = None if binding is None else binding.ctx.user
    while binding is not None and binding.ctx.user == user:
        resolver = binding.scope
        state = None if resolver is None else resolver.owner._state
        if state is not None:
            expires_at = state.get(_EXPIRES_AT_KEY)
            if expires_at is not None:
                return cast(float, expires_at)
        binding = binding.prev
    return None


def _key(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


def _user_key(user_id: str, tenant_id: str | None) -> str:
    """The store's name for a user's revocation generation: unambiguous (no separator a
    user id could contain) and free of the ids themselves."""
    return hashlib.sha256(json.dumps([user_id, tenant_id]).encode()).hexdigest()
