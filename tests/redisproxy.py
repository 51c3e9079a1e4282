"""A loopback TCP proxy in front of a Redis that a test drives frame by frame.

Every connection a client opens through it is a :class:`Link` of two :class:`Direction`
s: ``up`` (the client's commands) and ``down`` (Redis's replies and pushed messages).
Each direction cuts what passes into whole RESP values, so a test can wait for a given
command or reply to reach the proxy, hold a direction, let a counted number of values
through, and cut the link, all driven by events: the order in which Redis sees commands
and the client sees replies is the test's, not the scheduler's.

It runs in the test's own event loop (the clients under test are asyncio ones that never
block the loop), on any anyio backend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

Value = Any


class _IncompleteError(Exception):
    """The buffer ends inside a value."""


def _line(buffer: bytes | bytearray, at: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise _IncompleteError
    return bytes(buffer[at:end]), end + 2


def _parse(buffer: bytes | bytearray, at: int) -> tuple[Value, int]:
    """The RESP (2 or 3) value starting at ``at`` in ``buffer`` and where it ends."""
    if at >= len(buffer):
        raise _IncompleteError
    kind = buffer[at : at + 1]
    text, at = _line(buffer, at + 1)
    if kind in (b"+", b"-", b",", b"(", b"#", b"_"):
        return text, at
    if kind == b":":
        return int(text), at
    if kind in (b"$", b"=", b"!"):
        length = int(text)
        if length < 0:
            return None, at
        if len(buffer) < at + length + 2:
            raise _IncompleteError
        return bytes(buffer[at : at + length]), at + length + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(text)
        if count < 0:
            return None, at
        if kind in (b"%", b"|"):
            count *= 2
        items = []
        for _ in range(count):
            item, at = _parse(buffer, at)
            items.append(item)
        if kind == b"|":  # attributes, then the value they describe
            value, at = _parse(buffer, at)
            return value, at
        return items, at
    msg = f"not RESP: {bytes(buffer[at - len(text) - 3 : at])!r}"
    raise ValueError(msg)


def words(value: Value) -> list[bytes]:
    """``value``'s parts as bytes, lower-cased first part (``[b"subscribe", b"ch", 1]``
    gives ``[b"subscribe", b"ch", b"1"]``); a value that is no list gives ``[value]``."""
    parts = value if isinstance(value, list) else [value]
    out = [p if isinstance(p, bytes) else str(p).encode() for p in parts]
    if out:
        out[0] = out[0].lower()
    return out


class Direction:
    """One way of one :class:`Link`: the values that reached the proxy (``arrived``), how
    many of them went on (``passed``), and whether it holds them."""

    def __init__(self, name: str, notify: Callable[[], None]) -> None:
        self.name = name
        self._notify_proxy = notify
        self.arrived: list[Value] = []
        self.passed = 0
        # None: flowing; a number: that many more values go on, then it holds.
        self._allowed: int | None = None
        self._changed = anyio.Event()
        # Called with each value as it reaches the proxy, before it can go on: the test's
        # hook for this direction, and the proxy's for every link's (see RedisProxy).
        self.on_arrival: Callable[[Value], None] | None = None
        self.on_any_arrival: Callable[[Value], None] | None = None

    def __repr__(self) -> str:
        return f"<Direction {self.name} arrived={len(self.arrived)} passed={self.passed}>"

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        self._notify_proxy()

    def hold(self) -> None:
        """From now on, nothing more goes on (what is on its way in the kernel still does)."""
        self._allowed = 0
        self._notify()

    def release(self, values: int | None = None) -> None:
        """Let ``values`` more values go on (then hold again), or all of them (``None``)."""
        if values is None:
            self._allowed = None
        else:
            self._allowed = (self._allowed or 0) + values
        self._notify()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (checked as values arrive and pass)."""
        while not condition():
            await self._changed.wait()

    async def arrival(self, predicate: Callable[[list[bytes]], bool], start: int = 0) -> int:
        """Wait for a value from index ``start`` on whose :func:`words` satisfy
        ``predicate``; return its index."""
        found: list[int] = []

        def seen() -> bool:
            for index in range(start, len(self.arrived)):
                if predicate(words(self.arrived[index])):
                    found.append(index)
                    return True
            return False

        await self.until(seen)
        return found[0]

    async def passed_through(self, index: int) -> None:
        """Wait until the value at ``index`` went on."""
        await self.until(lambda: self.passed > index)

    def _arrive(self, value: Value) -> None:
        if self.on_arrival is not None:
            self.on_arrival(value)
        if self.on_any_arrival is not None:
            self.on_any_arrival(value)
        self.arrived.append(value)
        self._notify()

    async def _forward(
        self, raws: list[bytes], sink: anyio.abc.ByteSendStream, link: anyio.CancelScope
    ) -> None:
        while True:
            await self.until(
                lambda: self.passed < len(raws) and (self._allowed is None or self._allowed > 0)
            )
            if self._allowed is not None:
                self._allowed -= 1
            try:
                await sink.send(raws[self.passed])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                link.cancel()  # the other side is gone: so is the link
                return
            self.passed += 1
            self._notify()


class Link:
    """One client connection through the proxy, and its own connection to Redis."""

    def __init__(self, number: int, notify: Callable[[], None]) -> None:
        self.number = number
        self.up = Direction(f"link {number} up", notify)
        self.down = Direction(f"link {number} down", notify)
        self.closed = anyio.Event()
        self._scope = anyio.CancelScope()

    def __repr__(self) -> str:
        return f"<Link {self.number} {self.up!r} {self.down!r}>"

    def cut(self) -> None:
        """Close both of its sockets now (what is held is lost), as a dead network would."""
        self._scope.cancel()

    def subscribed(self) -> bool:
        """Whether the client sent a SUBSCRIBE on it (the pub/sub connection)."""
        return any(words(value)[0] == b"subscribe" for value in self.up.arrived)

    async def _pump(
        self, direction: Direction, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream
    ) -> None:
        raws: list[bytes] = []
        buffer = bytearray()
        async with anyio.create_task_group() as group:
            group.start_soon(direction._forward, raws, sink, self._scope)
            try:
                async for chunk in source:
                    buffer += chunk
                    while buffer:
                        try:
                            value, end = _parse(buffer, 0)
                        except _IncompleteError:
                            break
                        raws.append(bytes(buffer[:end]))
                        del buffer[:end]
                        direction._arrive(value)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            # One side closed: so is the link (once what arrived went on, if it flows).
            await direction.until(lambda: direction.passed == len(raws))
            self._scope.cancel()


class RedisProxy:
    """Relays ``127.0.0.1:port`` to Redis on ``host:target_port``; ``links`` are the
    connections made through it, oldest first; ``on_link`` is called with each new one
    before any of its bytes go through, ``on_command`` with each command (and its link)
    as it reaches the proxy, before it goes on."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.links: list[Link] = []
        self.on_link: Callable[[Link], None] | None = None
        self.on_command: Callable[[Link, Value], None] | None = None
        self._changed = anyio.Event()
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RedisProxy:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._serve, listener)
        return self

    async def _serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        async with listener:
            await listener.serve(self._handle)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        return await self._group.__aexit__(exc_type, exc, tb)

    async def link(self, predicate: Callable[[Link], bool], start: int = 0) -> Link:
        """Wait for a link from index ``start`` on satisfying ``predicate`` (checked as
        links come and values arrive on them)."""
        while True:
            for link in self.links[start:]:
                if predicate(link):
                    return link
            await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _command(self, link: Link, value: Value) -> None:
        if self.on_command is not None:
            self.on_command(link, value)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        link = Link(len(self.links), self._notify)
        link.up.on_any_arrival = lambda value: self._command(link, value)
        self.links.append(link)
        if self.on_link is not None:
            self.on_link(link)
        self._notify()
        async with client:
            try:
                server = await anyio.connect_tcp(self.host, self.target_port)
            except OSError:
                link.closed.set()
                return
            async with server:
                with link._scope:
                    async with anyio.create_task_group() as group:
                        group.start_soon(link._pump, link.up, client, server)
                        group.start_soon(link._pump, link.down, server, client)
        link.closed.set()
