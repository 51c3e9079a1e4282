""":class:`OriginAllowList`: refuse websocket handshakes from origins not on a list."""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from ambient.middleware import _problem

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
# What urlsplit() deletes from anywhere in a URL before it parses it: a value holding one
# would be read as another origin than the one it spells.
_DELETED = ("\t", "\r", "\n")
# Never in an Origin a browser sends: a query or fragment, even an empty one ("?", "#"),
# which urlsplit() reads as none.
_NO_ORIGIN = ("?", "#")
# Never in a host as a browser sends it (which decodes percent-escapes, and reads a
# backslash as the path's start): a host holding one would never match.
_NOT_IN_HOST = frozenset(" %\\<>^|\x7f") | frozenset(map(chr, range(32)))

_HEX_DIGITS = frozenset(string.hexdigits)


def _ipv4_number(part: str) -> int | None:
    """One part of an IPv4 host as the WHATWG URL standard reads it (``0x`` hexadecimal,
    a leading ``0`` octal, else decimal), or ``None`` when it is no number."""
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        if not _HEX_DIGITS.issuperset(digits):
            return None
        return int(digits, 16) if digits else 0
    if not part.isascii() or not part.isdigit():
        return None
    if len(part) > 1 and part[0] == "0":
        return int(part, 8) if set(part) <= set("01234567") else None
    return int(part)


def _ipv4(host: str) -> str | None:
    """``host`` as a browser writes it when it reads it as an IPv4 address (its last part
    a number: ``127.1``, ``0x7f.0.0.1``, ``2130706433``): dotted decimal; ``host`` itself
    for a domain; ``None`` when it ends in a number yet is no address (``app.123``,
    ``1.2.3.4.5``, ``256.0.0.1``), which a browser refuses as a URL."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    if not (last.isascii() and last.isdigit()) and _ipv4_number(last) is None:
        return host  # a domain
    numbers = [_ipv4_number(part) if part else None for part in parts]
    if len(numbers) > 4 or None in numbers:  # at most four parts, each a number
        return None
    values = [n for n in numbers if n is not None]
    # Each part but the last is one byte; the last fills the bytes left.
    if any(n > 255 for n in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        return None
    address = values[-1]
    for index, value in enumerate(values[:-1]):
        address += value << (8 * (3 - index))
    return str(ipaddress.IPv4Address(address))


def _ipv6(host: str) -> str | None:
    """The bracketed IPv6 ``host`` (given without its brackets) as a browser writes it:
    lower-case hexadecimal pieces, the first longest run of two or more zero pieces
    compressed, an embedded IPv4 address written as pieces too; ``None`` when it is no
    address."""
    try:
        value = int(ipaddress.IPv6Address(host))
    except ValueError:
        return None
    pieces = [(value >> (112 - 16 * index)) & 0xFFFF for index in range(8)]
    start, length = -1, 1  # the first longest run of zero pieces longer than one
    run = None
    for index, piece in enumerate([*pieces, 1]):
        if piece == 0:
            run = index if run is None else run
        elif run is not None:
            if index - run > length:
                start, length = run, index - run
            run = None
    written = [format(piece, "x") for piece in pieces]
    if start < 0:
        return "[" + ":".join(written) + "]"
    return "[" + ":".join(written[:start]) + "::" + ":".join(written[start + length :]) + "]"


ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


def _origin(value: str) -> str | None:
    """``scheme://host[:port]`` lower-cased without a default port, an IP host as a
    browser writes it, or ``None``."""
    value = value.strip()
    if any(char in value for char in (*_DELETED, *_NO_ORIGIN)):
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (
        not scheme
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or not _NOT_IN_HOST.isdisjoint(host)
    ):
        return None
    # An IP address as a browser writes it (the WHATWG URL standard's host serialisation),
    # however it was spelled: an Origin holds that form, and a shorthand would never match.
    if "[" in parts.netloc:  # a bracketed host: an IPv6 address, or no host at all
        host = _ipv6(host)
    elif scheme in _DEFAULT_PORTS:  # an opaque host of another scheme is no address
        host = _ipv4(host)
    if host is None:
        return None
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginAllowList:
    """ASGI middleware refusing websocket handshakes whose ``Origin`` is not allowed.

    Browsers send cookies (and other ambient credentials) with a websocket handshake from
    any page, and the same-origin policy does not apply to it: without this check a hostile
    page can open an authenticated socket (cross-site websocket hijacking). Put it
    *outside* :class:`~ambient.middleware.AmbientMiddleware` so a refused handshake never
    binds a context or creates a component. HTTP requests pass through untouched.

    A handshake is refused (HTTP 403 where the server supports the denial-response
    extension, else closed with 1008 before accept) when its Origin is not in
    ``allowed_origins``, is malformed, is sent more than once, or is missing (unless
    ``allow_missing=True``, for non-browser clients, which send none).

    Args:
        app: The ASGI application.
        allowed_origins: Origins such as ``"https://app.example.com"`` (scheme, host and
            non-default port; compared case-insensitively), each spelled out: no wildcards,
            no credentials, path (but ``/``), query or fragment (not even an empty ``?`` or
            ``#``), and a host in its ASCII form (``xn--`` for an internationalised name),
            without percent-escapes, as browsers send it. A trailing dot is kept: a page
            at ``app.example.`` is another origin than one at ``app.example``. An IP
            address is compared as a browser writes it, however it is spelled here or in
            the ``Origin``: ``https://127.1`` and ``https://0x7f.0.0.1`` are
            ``https://127.0.0.1``, ``https://[0:0:0:0:0:0:0:1]`` is ``https://[::1]``; a
            host ending in a number that is no address (``app.123``) is refused.
        allow_missing: Accept handshakes without an Origin header.
    """

    __slots__ = ("allow_missing", "allowed", "app")

    def __init__(
        self, app: ASGIApp, *, allowed_origins: Iterable[str], allow_missing: bool = False
    ) -> None:
        if isinstance(allowed_origins, str):
            msg = "allowed_origins is a list of origins, not one string"
            raise TypeError(msg)
        allowed: set[str] = set()
        for value in allowed_origins:
            origin = _origin(value) if isinstance(value, str) else None
            if origin is None or "*" in origin:
                msg = f"{value!r} is not an origin like 'https://app.example.com'"
                raise ValueError(msg)
            if not origin.isascii():
                # Browsers send the ASCII form: this one would never match.
                msg = (
                    f"{value!r} is not an origin as browsers send it: write its host in "
                    "ASCII (the 'xn--' form of an internationalised name)"
                )
                raise ValueError(msg)
            allowed.add(origin)
        self.app = app
        self.allowed = frozenset(allowed)
        self.allow_missing = allow_missing

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"origin"]
        if not values and self.allow_missing:
            await self.app(scope, receive, send)
            return
        reason = self._refusal(values)
        if reason is None:
            await self.app(scope, receive, send)
            return
        problem = _problem.Problem(
            403, "Origin not allowed", reason, type_="urn:ambient:problem:origin"
        )
        await problem.deny_websocket(scope, receive, send)

    def _refusal(self, values: list[bytes]) -> str | None:
        if not values:
            return "the websocket handshake carried no Origin header"
        if len(values) > 1:
            return "the websocket handshake carried more than one Origin header"
        try:
            origin = _origin(values[0].decode("ascii"))
        except UnicodeDecodeError:
            origin = None
        if origin is None or origin not in self.allowed:
            return "the websocket handshake came from an origin that is not allowed"
        return None
