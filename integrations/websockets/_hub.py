""":class:`ConnectionHub`: the live websocket connections of this process."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient._binding import _shown
from ambient._checks import number
from ambient._context import validate_id
from ambient.errors import BroadcastError
from ambient.integrations.websockets._broadcast import Broadcast, InProcessBroadcast
from ambient.integrations.websockets._connection import Connection, WebSocketLike
from ambient.integrations.websockets._envelope import REVOKE, TO_CONNECTION, TO_USER, Envelope
from ambient.integrations.websockets._manager import UserWebSocketManager
from ambient.middleware._asgi import CLOSE_IDENTITY_ENDED
from ambient.middleware.identity import _VALIDATED_AT_KEY, _validation_clock

logger = logging.getLogger("ambient.websockets")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_REVOKED: Final = CLOSE_IDENTITY_ENDED  # as the middleware closes an expired identity's

# How long, and how many, revocations the hub keeps for handshakes validated before them
# that reach connect() only after them. Between the identity check and connect() an app
# awaits a database, a ticket's redemption, the accept: milliseconds to seconds, and servers
# give up on a handshake well before five minutes. Revocations are rare administrative
# acts; 10,000 entries (a few MB at most) still hold a whole tenant banned at once, and past
# that the oldest go first, those whose handshakes in flight are the likeliest to have
# joined already (and been revoked as registered sockets).
_REVOCATIONS_KEPT_FOR: Final = 300.0
_REVOCATIONS_KEPT: Final = 10_000


@dataclass(frozen=True, slots=True)
class HubStats:
    """A snapshot of a :class:`ConnectionHub`.

    Attributes:
        connections: Sockets registered now.
        users: Users with at least one socket here.
        queued: Events waiting in socket queues.
        queued_bytes: Their size (characters of text frames, bytes of binary frames).
        peak_queued: The longest any socket's queue has been.
        overflows: Sockets closed with 1013 because they fell too far behind.
        send_failures: Sockets dropped because a send to them failed.
        replaced: Sockets closed with 1008 to make room for a newer one of the same user.
        revoked: Sockets closed with 4001 by :meth:`ConnectionHub.revoke`.
    """

    connections: int
    users: int
    queued: int
    queued_bytes: int
    peak_queued: int
    overflows: int
    send_failures: int
    replaced: int
    revoked: int = 0


class ConnectionHub:
    """The live websocket connections of this process (an APP component).

    Args:
        backend: How events reach the sockets: :class:`InProcessBroadcast` (default) or
            :class:`RedisBroadcast` for several processes or hosts.
        max_connections_per_user: Sockets one user may hold in this process; one more
            closes the user's oldest socket with 1008 (the newest always gets in).
        queue_size: Events a socket may fall behind before it is closed with 1013.
        queue_bytes: Size a socket's queue may reach (characters of text plus bytes of
            binary frames) before it is closed with 1013; a bigger event is refused.
        close_timeout: Seconds the hub waits for a socket it ends to take its last frames
            (past them, it cancels the socket's handler block without waiting further),
            and for the close frame it sends once that block is out; also the longest
            :meth:`aclose` waits for the sockets it closes.

    Example::

        hub = ConnectionHub(RedisBroadcast("redis://cache:6379/0"))
        hub.install(registry)
    """

    def __init__(
        self,
        backend: Broadcast | None = None,
        *,
        max_connections_per_user: int = 16,
        queue_size: int = 256,
        queue_bytes: int = 4 * 1024 * 1024,
        close_timeout: float = 5.0,
    ) -> None:
        for name, value in (
            ("max_connections_per_user", max_connections_per_user),
            ("queue_size", queue_size),
            ("queue_bytes", queue_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be an int >= 1, not {value!r}"
                raise ValueError(msg)
        close_timeout = number(close_timeout, "close_timeout")
        if not close_timeout > 0:
            msg = f"close_timeout must be > 0 seconds, not {close_timeout!r}"
            raise ValueError(msg)
        self.backend: Broadcast = InProcessBroadcast() if backend is None else backend
        self.max_connections_per_user = max_connections_per_user
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.close_timeout = close_timeout
        self._users: dict[UserRef, dict[str, Connection]] = {}
        # Sockets between the start of connect() and their registration (subscribing,
        # accepting): a revocation or aclose() in that window must reach them too.
        self._joining: set[Connection] = set()
        # The same, by user and connection id: one id is in use once, as a registered
        # socket's or a joining one's.
        self._joining_ids: dict[tuple[UserRef, str], Connection] = {}
        # Sockets the hub is closing (replaced, fallen behind, shut down), out of the
        # registry while their writer takes the last frames and their block still runs: a
        # revocation must end them too.
        self._leaving: set[Connection] = set()
        # Recent revocations, oldest first: (user, the connection id named or None for all)
        # -> (when, on self._clock, the reason). A socket whose handshake passed the
        # identity check before one of them, and whose app reached connect() only after
        # it, was neither registered nor joining when it came, and is revoked as it joins.
        self._recent: OrderedDict[tuple[UserRef, str | None], tuple[float, str]] = OrderedDict()
        self._recent_for = _REVOCATIONS_KEPT_FOR
        self._recent_max = _REVOCATIONS_KEPT
        # Every socket from the start of its join until its handler left connect(), its
        # close frame sent: what aclose() waits for.
        self._open: set[Connection] = set()
        # Set, and dropped, when a socket leaves _open: what aclose() waits on.
        self._left: anyio.Event | None = None
        # The middleware's clock for the moment it checks a handshake's identity.
        self._clock = _validation_clock
        self._count = 0
        self._peak_queued = 0
        self._overflows = 0
        self._send_failures = 0
        self._replaced = 0
        self._revoked = 0
        # Each revocation revoke() is publishing -> sockets it ended here so far.
        self._ending_here: dict[Envelope, int] = {}
        self.backend.attach(self._deliver)

    def install(self, registry: Registry) -> None:
        """Register this hub (APP) and :class:`UserWebSocketManager` (REQUEST) in
        ``registry``; the registry closes the hub at shutdown."""
        registry.register(ConnectionHub, self._provide, lifetime=Lifetime.APP)
        registry.register(UserWebSocketManager, self._manager)

    def _provide(self) -> ConnectionHub:
        return self

    def _manager(self, ctx: UserExecutionContext) -> UserWebSocketManager:
        # Resolving the hub makes the registry own it, so shutdown closes the backend.
        ambient.resolve_sync(ConnectionHub)
        return UserWebSocketManager(self, ctx)

    def stats(self) -> HubStats:
        """Counts of connections, queued events and closes (safe to call from any thread)."""
        connections = [c for user in list(self._users.values()) for c in list(user.values())]
        return HubStats(
            connections=self._count,
            users=len(self._users),
            queued=sum(len(c._queue) for c in connections),
            queued_bytes=sum(c._queued_bytes for c in connections),
            peak_queued=self._peak_queued,
            overflows=self._overflows,
            send_failures=self._send_failures,
            replaced=self._replaced,
            revoked=self._revoked,
        )

    async def aclose(self) -> None:
        """Close every socket with 1001 (after its queue), wait until they are closed, and
        release the backend.

        The registry calls this at shutdown. It returns once every socket of the hub
        (registered, still connecting, or already being closed) is closed: its handler's
        block is out and its close frame sent, so a server stopping next cuts none of them.
        It waits at most ``close_timeout``: a socket still closing then (its client stopped
        reading, or its handler does not let its block end) is logged and left to finish
        on its own, and the backend is released anyway. The hub stays usable: a later
        connection starts the backend again.
        """
        closing = set(self._open)
        for user in list(self._users.values()):
            for connection in list(user.values()):
                self._end(connection, CLOSE_GOING_AWAY, "server shutting down", drain=True)
        for connection in list(self._joining):
            # Not registered once it is accepted: closed by its writer with the others.
            connection._request_close(CLOSE_GOING_AWAY, "server shutting down", drain=True)
        try:
            with anyio.move_on_after(self.close_timeout):
                while not closing.isdisjoint(self._open):
                    if self._left is None:
                        self._left = anyio.Event()
                    await self._left.wait()
            left = len(closing & self._open)
            if left:
                logger.warning(
                    "ambient: %d socket(s) were still closing %s s (close_timeout) after the "
                    "hub began to close them; leaving them to finish on their own",
                    left,
                    self.close_timeout,
                )
        finally:
            # Also when the caller gave up waiting (a registry whose cleanup_timeout is
            # shorter): a backend left running would go on reconnecting after shutdown.
            with anyio.CancelScope(shield=True):
                await self.backend.aclose()

    async def revoke(
        self,
        user: UserRef | str,
        *,
        tenant_id: str | None = None,
        connection_id: str | None = None,
        reason: str = "access revoked",
    ) -> int:
        """End a user's sockets (or the one ``connection_id`` names) in every process the
        backend reaches: each handler's block is cancelled at once, so it handles nothing
        more under that user's context, and the socket is closed with 4001 and ``reason``.
        A user is its ``(tenant_id, user_id)`` pair, as for USER components: without
        ``tenant_id`` only the user of no tenant is revoked, never that user id in a
        tenant (pass a :class:`~ambient.UserRef`, or the tenant the user's tokens carry).

        For a logout, a ban or a revoked session: refuse the credential first, and the
        user's outstanding websocket tickets (:meth:`WebSocketTickets.revoke
        <ambient.middleware.tickets.WebSocketTickets.revoke>`), so no new handshake gets in;
        then call this. A socket still connecting is revoked as its handshake completes,
        and one the hub is already closing (replaced, fallen behind, shut down) whose
        block still runs while its last frames go out is revoked too.

        So is a socket whose handshake :class:`~ambient.middleware.AmbientMiddleware`
        validated before the revocation reached this process, but whose app reached
        ``connect()`` only after it (it awaited a database, a ticket's redemption, the
        accept first): each process remembers the revocations that reach it (through this
        call or the backend) for five minutes, the latest 10,000 of them, dated on its
        monotonic clock as they arrive (the revocation's time on another host's clock
        cannot be compared with this one's); a handshake validated at or before that date
        is revoked as it joins, one validated after it gets in. :class:`RedisBroadcast`
        hands every revocation to every process whose subscription is up, also one that
        holds no socket of the user; a process whose subscription starts, or comes back
        after an outage, reads the revocations of the last five minutes it did not hear
        before it lets a socket join (start it in the application's lifespan startup with
        :meth:`RedisBroadcast.wait_connected`, before any handshake is under way). A
        revocation learnt that way, or from
        :class:`RedisBroadcast`'s count (see below), is dated when it is learnt, which
        can be later than the revocation: a handshake validated in between is revoked
        too, and can connect again. Not covered: sockets whose scope the middleware did
        not open (no validation time).

        A process whose :class:`RedisBroadcast` subscription was down reads the
        revocations it missed from Redis once back, and ends exactly the sockets they
        named. Only one it can learn of from its user's count alone (made during an
        outage longer than five minutes, or dropped from the stream of recent ones) ends
        every socket of that user there, also when ``connection_id`` named one, with the
        reason "access revoked".

        Unlike the hub's other sends, it names its user explicitly: it is meant
        for an administrator or the auth system, not for the user's own requests.

        Returns:
            How many sockets of this process it ended: registered ones, and those still
            connecting or being closed (0 when the user has none here). Through
            :class:`RedisBroadcast` the other processes end theirs as the revocation
            reaches them, and their counts are not known when this returns: 0 says only
            that this process held none.

        Raises:
            InvalidContextError: ``user``, ``tenant_id`` or ``connection_id`` is not a
                valid id.
            ValueError: ``reason`` is longer than a close frame allows (123 bytes).
            BroadcastError: the backend is unreachable, or did not answer in time: this
                process's sockets of the user are ended all the same, but the revocation
                may not have reached the other processes, or (only its answer late) it
                may have; revoking again is safe.
        """
        if isinstance(user, UserRef):
            if tenant_id is not None:
                msg = "pass the tenant inside the UserRef, not as tenant_id as well"
                raise ValueError(msg)
            # Checked as well: a UserRef is built unchecked, and one no socket can belong
            # to would revoke nothing without a word.
            user_id: object = user.user_id
            tenant_id = user.tenant_id
        else:
            user_id = user
        tenant = None if tenant_id is None else validate_id("tenant_id", tenant_id)
        ref = UserRef(validate_id("user_id", user_id), tenant)
        if connection_id is not None:
            # Checked as the context checks it: an id no connection can have (an empty one)
            # must not reach a backend, where it could read as "every connection".
            connection_id = validate_id("connection_id", connection_id)
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            msg = f"reason must be a str of at most 123 bytes (a close frame's), not {reason!r}"
            raise ValueError(msg)
        envelope = Envelope(ref, REVOKE, connection_id, reason)
        # By value: what the backend ends in this process while this call publishes counts
        # as this call's, handed back as this envelope or as one of its own (decoded from
        # Redis, heard before Redis's answer). Equal revocations in flight share the count.
        ending = self._ending_here
        ending.setdefault(envelope, 0)
        try:
            await self._publish(envelope)
        finally:
            ended = ending.pop(envelope, 0)
            # Here too: a backend delivering over a subscription (Redis) delivers nothing
            # to this process before it subscribed to anything. And whether or not the
            # backend took it (Redis down, this call cancelled): this process's sockets
            # are its own to end, at once, without waiting for the backend's message
            # (which then finds them gone).
            self._remember(envelope)
            ended += self._revoke_here(envelope)
        return ended

    # -- delivery ------------------------------------------------------------------------

    async def _publish(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to the backend (which calls :meth:`_deliver` in each process)."""
        await self.backend.publish(envelope)

    def _deliver(self, envelope: Envelope) -> None:
        """Queue ``envelope`` on the matching sockets this process holds (never waits)."""
        mode = envelope.mode
        if mode == REVOKE:
            self._remember(envelope)
            ended = self._revoke_here(envelope)
            if envelope in self._ending_here:  # revoke() is publishing it
                self._ending_here[envelope] += ended
            return
        connections = self._users.get(envelope.user)
        if not connections:
            return
        target = envelope.target
        data = envelope.data
        if mode == TO_CONNECTION:
            connection = connections.get(target) if target is not None else None
            if connection is not None:
                connection._offer(data)
            return
        for connection in list(connections.values()):
            if mode == TO_USER or connection.thread_id == target:
                connection._offer(data)

    def _revoke_here(self, envelope: Envelope) -> int:
        """Apply the revocation ``envelope`` to the sockets of this process; return how
        many it ended (each socket once: revoke() applies it here too)."""
        reason = str(envelope.data)
        target = envelope.target
        ended = 0
        connections = self._users.get(envelope.user)
        if connections:
            for revoked in list(connections.values()):
                if target is None or revoked.connection_id == target:
                    self._remove(revoked)
                    ended += 1
                    revoked._revoke(CLOSE_REVOKED, reason)
        if self._joining or self._leaving:
            # Sockets still connecting, or being closed by the hub: marked now, their block
            # ends now or as soon as it starts (see :meth:`_connect`).
            for joining in (*self._joining, *self._leaving):
                if (
                    joining.user == envelope.user
                    and (target is None or joining.connection_id == target)
                    and joining._revoked is None
                ):
                    ended += 1
                    joining._revoke(CLOSE_REVOKED, reason)
        self._revoked += ended
        return ended

    def _remember(self, envelope: Envelope) -> None:
        """Keep the revocation ``envelope`` for handshakes validated before it that join
        later, dated now (the latest one per user and connection named), within the
        bounds: the oldest go once past ``_recent_for`` seconds or ``_recent_max``."""
        now = self._clock()
        recent = self._recent
        key = (envelope.user, envelope.target)
        recent.pop(key, None)
        recent[key] = (now, str(envelope.data))
        oldest = now - self._recent_for
        # Oldest first, as dated on one monotonic clock; the entry just added stays, unless
        # there is room for none.
        while recent and (
            len(recent) > self._recent_max or next(iter(recent.values()))[0] < oldest
        ):
            recent.popitem(last=False)

    def _revoked_since(self, connection: Connection, validated_at: float) -> str | None:
        """The reason of a remembered revocation of ``connection`` (its user's every
        socket, or this one) at or after ``validated_at``, or ``None``."""
        user = connection.user
        for key in ((user, None), (user, connection.connection_id)):
            found = self._recent.get(key)
            # At the same instant too: the clock cannot tell which came first.
            if found is not None and validated_at <= found[0]:
                return found[1]
        return None

    # -- registration --------------------------------------------------------------------

    @asynccontextmanager
    async def _connect(
        self, ctx: UserExecutionContext, websocket: WebSocketLike, *, accept: bool = True
    ) -> AsyncIterator[Connection]:
        """Register ``websocket`` for ``ctx`` while the block runs (the way in is
        :meth:`UserWebSocketManager.connect`, which takes ``ctx`` from the binding)."""
        connection = Connection(self, websocket, ctx)
        user = connection.user
        existing = self._users.get(user)
        # One still connecting too: registered after it, the first would have been replaced
        # in the hub and served on out of reach of its events and of a revocation.
        if (existing is not None and connection.connection_id in existing) or (
            user,
            connection.connection_id,
        ) in self._joining_ids:
            msg = f"connection {connection.connection_id} is already registered"
            raise RuntimeError(msg)
        await self._join(connection, websocket, accept=accept, validated_at=_validated_at(ctx))
        failure: BaseException | None = None
        try:
            if accept:
                await websocket.accept()
            async with anyio.create_task_group() as tg:
                await tg.start(connection._run_writer)
                # Only now: cancelled while tg.start() waits, the task group would take the
                # cancellation for its own and leave before the block ever started.
                connection._block_scope = tg.cancel_scope
                self._unjoin(connection)
                if connection._ending:
                    # Revoked or closed while it connected: the block ends at its first
                    # await, and the socket is closed as a registered one's would be.
                    tg.cancel_scope.cancel()
                if connection._closing is not None:
                    # Shut down by aclose() while it connected: among the sockets the hub
                    # is closing, which a revocation ends too, until its block is out.
                    self._leaving.add(connection)
                elif not connection._ending:
                    self._add(connection)
                try:
                    yield connection
                except anyio.get_cancelled_exc_class():
                    connection._abort()
                    raise
                except BaseException as error:  # noqa: BLE001 - re-raised below
                    connection._abort()
                    # Re-raised below the task group, which would wrap it in a group.
                    failure = error
                finally:
                    self._remove(connection)
                    self._leaving.discard(connection)
                    connection._finish()
            if failure is not None:
                raise failure
        finally:
            await self._leave(connection, websocket)

    async def _leave(self, connection: Connection, websocket: WebSocketLike) -> None:
        """``connection``'s handler is leaving ``connect()``: close its socket if the hub
        ended it, and unsubscribe its user; then it counts as closed."""
        try:
            self._unjoin(connection)
            self._leaving.discard(connection)
            if connection._revoked is not None:
                await _close(connection, websocket, CLOSE_REVOKED, connection._revoked)
            elif connection._close_pending and connection._closing is not None:
                await _close(connection, websocket, *connection._closing)
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                try:
                    await self.backend.unsubscribe(connection.user)
                except Exception:
                    logger.warning("ambient: unsubscribing %r failed", connection, exc_info=True)
        finally:
            self._closed(connection)

    async def _join(
        self,
        connection: Connection,
        websocket: WebSocketLike,
        *,
        accept: bool,
        validated_at: float | None = None,
    ) -> None:
        """Subscribe ``connection``'s user, the socket counted as joining from now on, and
        revoked at once if its handshake (validated at ``validated_at``, when known) came
        before a revocation remembered here."""
        self._open.add(connection)
        self._joining.add(connection)
        self._joining_ids[connection.user, connection.connection_id] = connection
        # With no await since the add: a revocation from now on finds it joining instead.
        if validated_at is not None and self._recent:
            reason = self._revoked_since(connection, validated_at)
            if reason is not None:
                self._revoked += 1
                connection._revoke(CLOSE_REVOKED, reason)
        try:
            await self.backend.subscribe(connection.user)
        except BaseException as error:
            self._unjoin(connection)
            try:
                if accept and isinstance(error, BroadcastError):
                    # Its title, as the middleware closes an accepted socket: the detail
                    # names the backend's address, no business of the client's.
                    await _refuse_after_accept(websocket, error.title)
            finally:
                self._closed(connection)
            raise

    def _closed(self, connection: Connection) -> None:
        """``connection``'s handler left ``connect()``: its socket is closed, or its own."""
        self._open.discard(connection)
        left, self._left = self._left, None
        if left is not None:
            left.set()

    def _unjoin(self, connection: Connection) -> None:
        """``connection`` is no longer joining (registered, or its handler left)."""
        self._joining.discard(connection)
        key = (connection.user, connection.connection_id)
        # Its own entry only: once it is registered or gone, another socket with its id
        # may be joining.
        if self._joining_ids.get(key) is connection:
            del self._joining_ids[key]

    def _add(self, connection: Connection) -> None:
        connections = self._users.setdefault(connection.user, {})
        while len(connections) >= self.max_connections_per_user:
            oldest = next(iter(connections.values()))
            self._replaced += 1
            self._end(
                oldest,
                CLOSE_POLICY_VIOLATION,
                f"too many connections (limit {self.max_connections_per_user}); "
                "replaced by a newer one",
                drain=True,
            )
        # Fetched again: with a cap of 1, removing the oldest emptied ``connections`` and
        # ``_remove`` dropped it from ``_users``.
        self._users.setdefault(connection.user, {})[connection.connection_id] = connection
        self._count += 1

    def _remove(self, connection: Connection) -> None:
        connections = self._users.get(connection.user)
        if connections is None or connections.get(connection.connection_id) is not connection:
            return
        del connections[connection.connection_id]
        self._count -= 1
        if not connections:
            del self._users[connection.user]

    def _end(self, connection: Connection, code: int, reason: str, *, drain: bool) -> None:
        """Close the registered ``connection`` with ``code``: out of the registry now, among
        the sockets leaving until its block is out."""
        self._remove(connection)
        self._leaving.add(connection)
        connection._request_close(code, reason, drain=drain)

    def _overflowed(self, connection: Connection) -> None:
        """``connection`` fell ``queue_size`` events behind: drop it and close it with 1013."""
        self._overflows += 1
        logger.warning(
            "ambient: %r fell more than %d events behind; closing it with 1013",
            connection,
            self.queue_size,
        )
        self._end(
            connection, CLOSE_TRY_AGAIN_LATER, "too slow: the event queue overflowed", drain=False
        )

    def _send_failed(self, connection: Connection) -> bool:
        """A send to ``connection`` failed: it is gone. Return whether its handler was
        still using it (rather than already leaving or being closed by the hub)."""
        if connection._done or connection._closing is not None:
            return False
        connection._done = True
        self._remove(connection)
        self._send_failures += 1
        return True


def _validated_at(ctx: UserExecutionContext) -> float | None:
    """When the middleware began to check the identity of the websocket handshake whose
    scope is bound here (on its clock, the hub's ``_clock``), or ``None`` without one (a
    scope opened without the middleware). Found through the scopes of ``ctx``'s user bound
    here, a message scope's parent included."""
    binding = _shown()
    user = ctx.user
    while binding is not None and binding.ctx.user == user:
        resolver = binding.scope
        state = None if resolver is None else resolver.owner._state
        if state is not None:
            validated_at = state.get(_VALIDATED_AT_KEY)
            # An int too: a clock a test puts in place may count whole seconds.
            if isinstance(validated_at, int | float) and not isinstance(validated_at, bool):
                return validated_at
        binding = binding.prev
    return None


async def _close(connection: Connection, websocket: WebSocketLike, code: int, reason: str) -> None:
    """Close the socket of a connection the hub ended, once its block is out (within the
    hub's ``close_timeout``)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(connection._hub.close_timeout):
        try:
            await websocket.close(code, reason)
        except Exception:  # the socket is already gone or closed
            logger.debug("ambient: closing %r with %d failed", connection, code, exc_info=True)


async def _refuse_after_accept(websocket: WebSocketLike, reason: str) -> None:
    """Tell the client to come back later: accept, then close with 1013 and the reason."""
    try:
        await websocket.accept()
        await websocket.close(
            CLOSE_TRY_AGAIN_LATER, reason.encode()[:123].decode("utf-8", "ignore")
        )
    except Exception:  # the client may already be gone
        logger.debug("ambient: could not refuse the socket", exc_info=True)
