"""Who a request runs for: identity resolvers for :class:`~ambient.middleware.AmbientMiddleware`.

A resolver is any callable, sync or async, that takes the ASGI scope and returns an
:class:`Identity`, or ``None`` when the request carries no identity (answered with 401, or
an anonymous user with ``anonymous=True``). A resolver raises
:class:`~ambient.errors.IdentityError` for an identity that is present but malformed or
rejected: a repeated identity header, a token that fails validation.

Built in: :func:`scope_user` (Starlette's ``AuthenticationMiddleware``),
:func:`trusted_header` (a header set by a trusted proxy), :func:`jwt_bearer` (extra
``jwt``), :func:`first_of`, and :func:`signed_context` (another service's signed context;
it lives in :mod:`ambient.integrations.propagation` and is found here too).
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeAlias, TypeVar

from ambient import _checks
from ambient._context import ReadOnlyDict as _ReadOnlyDict
from ambient._loops import in_trio as _in_trio
from ambient.errors import IdentityError, IdentityUnavailableError

logger = logging.getLogger("ambient.middleware")

if TYPE_CHECKING:
    from anyio import CapacityLimiter
    from jwt import PyJWKClient, PyJWKSet

    from ambient._context import UserExecutionContext
    from ambient.integrations.propagation import signed_context

__all__ = [
    "Identity",
    "IdentityError",
    "IdentityResolver",
    "checked_identity",
    "first_of",
    "header_values",
    "jwt_bearer",
    "resolve_identity",
    "scope_user",
    "signed_context",
    "trusted_header",
]

_NO_CLAIMS: Mapping[str, Any] = _ReadOnlyDict()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request runs for, as a resolver found it.

    Attributes:
        user_id: The user's id (validated by the middleware like every context id).
        tenant_id: The tenant, when the application has tenants.
        claims: What else the resolver learnt (token claims, auth scopes); becomes the
            ``claims`` entry of the context's metadata. Never put secrets here.
        parent: The context this request continues, when a resolver verified one (a signed
            context from another service): the request's context becomes its child, with
            the parent's user, tenant, thread and request ids and a new run whose parent is
            the parent's run. Its user and tenant must be ``user_id`` and ``tenant_id``.
        expires_at: When the identity stops being valid, in seconds since the epoch (a
            token's ``exp``), or ``None`` for never (infinity is refused with
            :class:`ValueError`; NaN, a bool or text with :class:`TypeError`). A websocket
            connection still open then is cancelled and closed with code 4001, and a
            streamed HTTP response (server-sent events) whose body is streaming is
            cancelled and ended, idle or not: neither outlives its credential.
    """

    user_id: str
    tenant_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS)
    parent: UserExecutionContext | None = None
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.expires_at is not None:  # most identities: no call on each request
            _checks.instant(self.expires_at, "Identity.expires_at")

    async def _refused(self) -> None:
        """The middleware refused the request after resolving this identity, for a reason
        of its own (a bad thread id, the per-user limit) or an error of the app answered
        before its response started. An identity whose resolver spent something on the
        request (a one-time websocket ticket) gives it back here; this one spent nothing."""


# The request scope's state key for its identity's expiry, for what outlives the request on
# its behalf (a websocket ticket it issues must not outlive the credential either).
_EXPIRES_AT_KEY: Final = "ambient.identity.expires_at"
# A websocket's scope state key for when (on :func:`_validation_clock`) the middleware began
# to resolve its identity: a revocation after that moment may have come after the credential
# was checked, and the websockets integration's hub applies it to the socket as it joins.
_VALIDATED_AT_KEY: Final = "ambient.identity.validated_at"


def _validation_clock() -> float:
    """The clock of :data:`_VALIDATED_AT_KEY`, which the websockets hub dates revocations
    on too: ``time.monotonic()``, looked up at each call, so that both read the same clock
    when a test replaces it."""
    return time.monotonic()


class _DraftIdentity(Identity):
    """An :class:`Identity` being filled in: the same slots, written by plain stores (a
    frozen dataclass's slots are written only through calls that build an argument tuple
    each), then given its class (same layout)."""

    __slots__ = ()
    # Both: the frozen __delattr__ left in place would keep every store on the slow path.
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


def _identity(user_id: str, tenant_id: str | None) -> Identity:
    """``Identity(user_id, tenant_id)`` at a fraction of the cost (no claims, no parent)."""
    draft: Any = object.__new__(_DraftIdentity)
    draft.user_id = user_id
    draft.tenant_id = tenant_id
    draft.claims = _NO_CLAIMS
    draft.parent = None
    draft.expires_at = None
    draft.__class__ = Identity
    identity: Identity = draft
    return identity


IdentityResolver: TypeAlias = Callable[
    [Mapping[str, Any]], "Identity | Awaitable[Identity | None] | None"
]


# RFC 9110's token: what a header name may be made of.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header_name(name: object, what: str = "header name") -> bytes:
    """``name`` lower-cased as an ASGI server passes header names, or :class:`ValueError`
    naming ``what`` when no request could ever carry a header so named: a resolver
    reading it would find no identity in any request, each answered 401 without a word
    why."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        msg = (
            f"{what} must be a non-empty HTTP token (letters, digits and !#$%&'*+-.^_`|~), "
            f"not {name!r}"
        )
        raise ValueError(msg)
    return name.lower().encode("ascii")


def header_values(scope: Mapping[str, Any], name: str) -> list[bytes]:
    """Every value of the header ``name`` in an ASGI scope (names compare case-insensitively).

    ``x_user_id`` and ``x-user-id`` are different names: underscores are never folded into
    dashes, so a client cannot smuggle a second copy of a header past a proxy that only
    strips the dashed spelling.
    """
    wanted = name.lower().encode("latin-1")
    return [value for key, value in scope.get("headers", ()) if key.lower() == wanted]


def _single_header(
    scope: Mapping[str, Any], name: str, *, challenge: str | None = None
) -> str | None:
    values = header_values(scope, name)
    if not values:
        return None
    if len(values) > 1:
        # Two copies means something in front of us added one; "first wins" would let a
        # client choose whichever copy the proxy did not overwrite.
        msg = f"the {name} header was sent {len(values)} times"
        raise IdentityError(msg, challenge=challenge)
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        msg = f"the {name} header is not valid UTF-8"
        raise IdentityError(msg, challenge=challenge) from None


# The name of the attribute holding a resolver's WWW-Authenticate challenge: what the
# middleware sends with the 401 for a request that carried no identity.
_CHALLENGE: Final = "_ambient_challenge"


def _challenge_of(resolver: object) -> str | None:
    """The ``WWW-Authenticate`` challenge of ``resolver``, or ``None`` when its credential
    has no standard scheme (a trusted proxy's header, a signed context, a ticket)."""
    challenge = getattr(resolver, _CHALLENGE, None)
    return challenge if isinstance(challenge, str) else None


def _uncalled_factory(resolver: object) -> str | None:
    """The name of ``resolver`` when it is a function that *makes* identity resolvers
    (declared to return an ``IdentityResolver``: ``trusted_header``, ``jwt_bearer``, an
    application's own) given where its result belongs, or ``None``.

    Called with the ASGI scope, such a function fails on every request with an error about
    its own arguments; caught where the resolver is given, it fails at start-up instead."""
    if not inspect.isfunction(resolver):
        return None
    returns = resolver.__annotations__.get("return")
    if returns is IdentityResolver or (
        isinstance(returns, str) and returns.rpartition(".")[2] == "IdentityResolver"
    ):
        return resolver.__name__
    return None


def _check_resolver(resolver: object, what: str) -> None:
    """Refuse ``resolver`` (given as ``what``) when it is not callable, or is a factory of
    resolvers that was not called."""
    if not callable(resolver):
        msg = f"{what} must be a callable taking the ASGI scope, not {resolver!r}"
        raise TypeError(msg)
    factory = _uncalled_factory(resolver)
    if factory is not None:
        msg = (
            f"{what} is {factory}, which makes an identity resolver rather than being one: "
            f"call it ({factory}(...)) and pass what it returns"
        )
        raise TypeError(msg)


def _challenging(resolver: IdentityResolver, challenge: str | None) -> IdentityResolver:
    if challenge is not None:
        setattr(resolver, _CHALLENGE, challenge)
    return resolver


async def resolve_identity(resolver: IdentityResolver, scope: Mapping[str, Any]) -> Identity | None:
    """Run ``resolver`` (sync or async) and check what it returned."""
    result = resolver(scope)
    if result is None or type(result) is Identity:  # the common case, without isawaitable()
        return result
    return await checked_identity(resolver, result)


async def checked_identity(resolver: IdentityResolver, result: object) -> Identity | None:
    """Await what ``resolver`` returned when it is awaitable, and check its type."""
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, Identity):
        msg = (
            f"identity resolver {resolver!r} returned {type(result).__name__}; "
            "a resolver returns ambient.middleware.identity.Identity or None"
        )
        raise TypeError(msg)
    return result


# -- Starlette AuthenticationMiddleware -----------------------------------------------------


def scope_user(*, tenant_attribute: str = "tenant_id") -> IdentityResolver:
    """Use the user that Starlette's ``AuthenticationMiddleware`` put in ``scope["user"]``.

    Place ``AmbientMiddleware`` *inside* ``AuthenticationMiddleware``. A user whose
    ``is_authenticated`` is not ``True`` (unauthenticated, or a method rather than Starlette's
    property) is no identity. The user id is ``user.identity``, or ``user.display_name`` for
    user classes that do not implement ``identity`` (Starlette's ``SimpleUser``); the tenant
    is the user's ``tenant_attribute`` attribute when it has one; the auth scopes from
    ``scope["auth"]`` become the ``scopes`` claim. A user id, or a tenant other than
    ``None``, that is not a ``str`` (a ``UUID``, an ``int``) raises :class:`TypeError`
    rather than being guessed at: the user class is the application's, so that is the
    server's error (a 500 whose message only the server's log shows), not the client's.
    """

    def resolve(scope: Mapping[str, Any]) -> Identity | None:
        user = scope.get("user")
        # `is True`, not truthiness: a user class whose is_authenticated is a method (old
        # Django style) would otherwise pass for signed in whoever it is.
        if user is None or getattr(user, "is_authenticated", False) is not True:
            return None
        try:
            user_id = user.identity
        except (AttributeError, NotImplementedError):
            user_id = getattr(user, "display_name", None)
        if not isinstance(user_id, str):
            msg = (
                f"scope['user'] ({type(user).__name__}) has no str identity or display_name; "
                "give the user class an `identity` property"
            )
            raise TypeError(msg)
        tenant = getattr(user, tenant_attribute, None)
        if tenant is not None and not isinstance(tenant, str):
            # Taken for "no tenant", users of every tenant with the same id would share
            # one user's components.
            msg = (
                f"scope['user'] ({type(user).__name__}) has a {tenant_attribute} that is "
                f"{type(tenant).__name__}, not a str or None; make it a str property"
            )
            raise TypeError(msg)
        auth = scope.get("auth")
        scopes = getattr(auth, "scopes", None)
        claims = {"scopes": tuple(scopes)} if scopes else _NO_CLAIMS
        return Identity(user_id, tenant, claims)

    return resolve


# -- trusted proxy header -------------------------------------------------------------------

# The entry of ``trusted`` for peers that connected over the server's Unix domain socket (a
# proxy on this host, as nginx in front of ``gunicorn --bind unix:...``): the socket file's
# permissions decide who can connect. Such requests carry no client address.
_UNIX_SOCKET: Final = "unix"

_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network | Literal["unix"]


def _networks(trusted: Iterable[str]) -> tuple[_Network, ...]:
    if isinstance(trusted, str):
        trusted = (trusted,)
    networks: list[_Network] = []
    for entry in trusted:
        if entry == _UNIX_SOCKET:
            networks.append(_UNIX_SOCKET)
            continue
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            msg = (
                f"trusted network {entry!r} is not a network in CIDR notation (or "
                f"{_UNIX_SOCKET!r}, for the server's Unix socket): {exc}"
            )
            raise ValueError(msg) from None
        mapped = network.network_address
        if (
            isinstance(mapped, ipaddress.IPv6Address)
            and mapped.ipv4_mapped is not None
            and network.prefixlen >= 128 - 32
        ):
            # A peer's IPv4-mapped address is checked as the IPv4 address it maps (a
            # dual-stack server's IPv4 clients): so must the network be, or it never matches.
            network = ipaddress.ip_network(f"{mapped.ipv4_mapped}/{network.prefixlen - 96}")
        if network.prefixlen == 0:
            logger.warning(
                "ambient: the trusted network %s is every address: any client can assert "
                "any identity; name the networks of the proxies that set it",
                network,
            )
        networks.append(network)
    if not networks:
        msg = (
            "trusted names no network, so no peer could ever assert an identity; name the "
            "networks of the proxies or services that set it"
        )
        raise ValueError(msg)
    _warn_if_every_address_together(networks)
    return tuple(networks)


def _warn_if_every_address_together(networks: list[_Network]) -> None:
    """Warn when networks none of which is every address are so together (``0.0.0.0/1``
    and ``128.0.0.0/1``): any client could assert any identity, as with ``0.0.0.0/0``."""
    for version, everything in ((4, "0.0.0.0/0"), (6, "::/0")):
        some = [
            network
            for network in networks
            if not isinstance(network, str) and network.version == version and network.prefixlen
        ]
        together = list(ipaddress.collapse_addresses(some))  # type: ignore[type-var]
        if together == [ipaddress.ip_network(everything)]:
            logger.warning(
                "ambient: the trusted networks %s are together every IPv%d address: any "
                "client can assert any identity; name the networks of the proxies that set it",
                ", ".join(map(str, some)),
                version,
            )


def _over_unix_socket(scope: Mapping[str, Any]) -> bool:
    """Whether the request came over a Unix domain socket: no client address, and a server
    address that is a path without a port (uvicorn) or none at all (hypercorn). A TCP
    connection whose peer address could not be read still has the server's port."""
    if scope.get("client"):
        return False
    server = scope.get("server")
    return server is None or (len(server) == 2 and server[1] is None)


def _peer_trusted(scope: Mapping[str, Any], networks: tuple[_Network, ...]) -> bool:
    client = scope.get("client")
    if not client:
        return _UNIX_SOCKET in networks and _over_unix_socket(scope)
    host = client[0]
    # ip_address() also reads an int and 4 or 16 packed bytes as an address: a host
    # that is not text (out of the ASGI spec) must not become a trusted one.
    if type(host) is not str:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(type(network) is not str and address in network for network in networks)


_MAX_PEERS = 1024
_MAX_IDENTITIES = 1024
_K = TypeVar("_K")
_XFF = b"x-forwarded-for"
_FORWARDED = b"forwarded"
_FORWARDED_PEER = (
    "ambient: %s refused a request whose client address %r came from its %s header, not "
    "from the connection: the server rewrites scope['client'] from proxy headers (uvicorn "
    "does by default, for peers in --forwarded-allow-ips; hypercorn's ProxyFixMiddleware "
    "and granian's proxy-header wrapper do too), so the peer that connected is unknown and "
    "a client could name a trusted address. Turn that off (uvicorn --no-proxy-headers, or "
    "proxy_headers=False) so that the peer check sees the proxy that connected. Reported "
    "once."
)

_UNIX_PEER = (
    "ambient: %s refused a request that came over the server's Unix domain socket, which "
    "has no client address: add %r to trusted if the proxy connecting through that socket "
    "sets the identity. Reported once."
)


def _host_port(node: str) -> tuple[str, int]:
    """A forwarded node as a server reads it: ``host``, ``host:port``, ``[v6]:port``."""
    if node.startswith("["):
        host, _, rest = node[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif node.count(":") == 1:
        host, _, port = node.partition(":")
    else:
        host, port = node, ""
    # Read as uvicorn reads it, with int(): a sign, leading zeros, underscores and spaces
    # are a port too. A stricter reading would take a client's "127.0.0.1:0443" for
    # another node than the ("127.0.0.1", 443) the server made of it.
    try:
        return host, int(port)
    except ValueError:  # no port, or none int() reads (latin-1 '²' is a digit to isdigit())
        return host, 0


def _nodes(name: bytes, value: bytes) -> list[str]:
    """The client nodes an ``X-Forwarded-For`` or ``Forwarded`` (``for=``) value names."""
    items = [item.strip() for item in value.decode("latin-1").split(",")]
    if name == _XFF:
        return items
    nodes = []
    for item in items:
        for pair in item.split(";"):
            key, _, node = pair.partition("=")
            if key.strip().lower() == "for":
                nodes.append(node.strip().strip('"'))
    return nodes


def _client_forwarded(
    scope: Mapping[str, Any], headers: Iterable[tuple[bytes, bytes]]
) -> bytes | None:
    """Which of ``headers`` (forwarding headers of the request) ``scope["client"]`` was
    read from, as far as can be told; ``None`` when it is the connection's own peer.

    A server that takes the client from a forwarding header sets ``(host, port)`` to a
    node of it, with port 0 when the node has none; a peer that really connected has the
    port of its socket, which no forwarding header names.
    """
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    if type(host) is not str:
        return None
    if host[:1] == '"':
        host = host.strip('"')  # hypercorn keeps a quoted Forwarded node as it was sent
    # Behind a real proxy every request carries X-Forwarded-For, naming the proxy's clients,
    # not the proxy: a value that lacks the host cannot name it, and is passed over without
    # being parsed. (Not the port: the text of one int() reads has many spellings.)
    wanted = host.encode("latin-1", "replace")
    for name, value in headers:
        if wanted not in value:
            continue
        for node in _nodes(name, value):
            node_host, node_port = _host_port(node)
            if (host == node_host and port in (node_port, 0)) or (port == 0 and host == node):
                return name
    return None


def _forwarding_headers(scope: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    found = []
    for key, value in scope.get("headers", ()):
        lowered = key.lower()
        if lowered in (_XFF, _FORWARDED):
            found.append((lowered, value))
    return found


class _PeerHints:
    """What a peer-checking resolver tells the operator, once, when the server's setup
    rather than the client is why requests are refused."""

    __slots__ = ("resolver", "warned")

    def __init__(self, resolver: str) -> None:
        self.resolver = resolver
        self.warned = False

    def forwarded(self, scope: Mapping[str, Any], headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the client address was read from forwarding ``headers``."""
        via = _client_forwarded(scope, headers)
        if via is None:
            return False
        if not self.warned:
            self.warned = True
            logger.warning(_FORWARDED_PEER, self.resolver, scope["client"][0], via.decode())
        return True

    def admits(self, scope: Mapping[str, Any], *, peer_trusted: bool) -> bool:
        """Whether a peer that ``peer_trusted`` says is trusted really connected (its
        address was not read from forwarding headers); a refusal is explained once."""
        if not peer_trusted:
            self.refused(scope)
            return False
        return not self.forwarded(scope, _forwarding_headers(scope))

    def refused(self, scope: Mapping[str, Any]) -> None:
        """Explain (once) a refused peer that came over a Unix socket or from proxy headers."""
        if self.warned:
            return
        if _over_unix_socket(scope):
            self.warned = True
            logger.warning(_UNIX_PEER, self.resolver, _UNIX_SOCKET)
        else:
            self.forwarded(scope, _forwarding_headers(scope))


def _peer_check(networks: tuple[_Network, ...]) -> Callable[[Mapping[str, Any]], bool]:
    """:func:`_peer_trusted` with the verdict kept per client address: parsing an address
    with :mod:`ipaddress` costs microseconds, and a server sees few distinct peers (the
    proxies in front of it), so the verdict is looked up, not recomputed, per request."""
    verdicts: dict[str, bool] = {}

    def trusted(scope: Mapping[str, Any]) -> bool:
        client = scope.get("client")
        if not client:
            return _peer_trusted(scope, networks)
        host = client[0]
        if type(host) is not str:
            return _peer_trusted(scope, networks)
        verdict = verdicts.get(host)
        if verdict is None:
            verdict = _peer_trusted(scope, networks)
            if len(verdicts) >= _MAX_PEERS:
                verdicts.clear()
            verdicts[host] = verdict
        return verdict

    return trusted


def trusted_header(
    name: str = "x-user-id",
    tenant_header: str | None = None,
    trusted: Iterable[str] = ("127.0.0.1/32", "::1/128"),
) -> IdentityResolver:
    """Take the user id from a header that a trusted proxy or gateway sets.

    The header is honoured only when the connecting peer (``scope["client"]``) lies in one
    of the ``trusted`` networks; from anyone else it is ignored, so the request has no
    identity (401, or anonymous). Make sure the proxy overwrites the header a client sent.

    The peer must be the one that connected. A server that rewrites ``scope["client"]``
    from ``X-Forwarded-For`` or ``Forwarded`` (uvicorn does by default for peers in
    ``--forwarded-allow-ips``) hides it; a request whose client address is a node of those
    headers is therefore refused too, with a warning logged once. Run such a server
    without its proxy-header handling (uvicorn ``--no-proxy-headers``).

    A header sent more than once is refused (400), also as the one comma-separated line
    a proxy may join its copies into: a user or tenant id with a comma cannot be asserted
    this way.

    Args:
        name: The user id header (compared case-insensitively; ``_`` is not ``-``).
        tenant_header: The tenant id header, if any.
        trusted: Networks in CIDR notation whose peers may assert an identity, and
            ``"unix"`` for a proxy connecting through the server's Unix domain socket. An
            IPv4 peer and its IPv4-mapped IPv6 form (``::ffff:10.0.0.1``) are one peer, in
            an IPv4 network and its mapped form (``::ffff:10.0.0.0/104``) alike.

    Raises:
        ValueError: at construction, for a network that is not valid CIDR, or none; for a
            header name (``name``, ``tenant_header``) that is not an HTTP token (empty, not
            ASCII, with a space, a colon ...): no request could carry it.
    """
    networks = _networks(trusted)
    wanted = _header_name(name)
    # Else an empty name read no tenant at all, and a non-ASCII one failed every request.
    tenant = None if tenant_header is None else _header_name(tenant_header, "tenant_header")

    peer_trusted = _peer_check(networks)
    # Identities are immutable and a server sees the same users again and again: decoding
    # and building one is looked up, not redone (bounded like the peer verdicts).
    known: dict[bytes, Identity] = {}
    hints = _PeerHints("trusted_header()")
    lengths = _lengths(wanted)

    def resolve(scope: Mapping[str, Any]) -> Identity | None:
        if not peer_trusted(scope):
            if not hints.warned and header_values(scope, name):
                hints.refused(scope)
            return None
        # One pass, no list: this runs for every request behind the proxy.
        raw: bytes | None = None
        forwarding: list[tuple[bytes, bytes]] | None = None
        for key, value in scope.get("headers", ()):
            if len(key) not in lengths:
                continue  # none of the names, in any case: lowered for nothing
            lowered = key.lower()
            if lowered == wanted:
                if raw is not None:
                    _single_header(scope, name)  # raises, naming how often it was sent
                raw = value
            # Two comparisons rather than `in` a tuple (or a set, which would refuse a
            # name it cannot hash): cheaper, and this runs for every header.
            elif lowered == _XFF or lowered == _FORWARDED:  # noqa: PLR1714, SIM109
                if forwarding is None:
                    forwarding = []
                forwarding.append((lowered, value))
        if raw is None:
            return None
        if forwarding is not None and hints.forwarded(scope, forwarding):
            return None
        if tenant_header is None:
            identity = known.get(raw)
            if identity is not None:
                return identity
        user_id = _header_id(raw, name)
        if tenant_header:  # a name the user header's pass leaves to be read on its own
            tenant_id = _single_header(scope, tenant_header)
            if tenant_id is not None and "," in tenant_id:
                _joined(tenant_header)
            return _identity(user_id, tenant_id)
        return _remembered(known, raw, _identity(user_id, None))

    # A tenant name the user header's pass gives another meaning (the user header's, a
    # forwarding header's) is read on its own, as header_values() reads it.
    if tenant_header and tenant is not None and tenant not in (wanted, _XFF, _FORWARDED):
        return _with_tenant(name, wanted, tenant_header, tenant, peer_trusted, hints)
    return resolve


def _with_tenant(
    name: str,
    wanted: bytes,
    tenant_header: str,
    tenant: bytes,
    peer_trusted: Callable[[Mapping[str, Any]], bool],
    hints: _PeerHints,
) -> IdentityResolver:
    """:func:`trusted_header`'s resolver for a user header named ``wanted`` and a tenant
    header named ``tenant`` (both lowered): both headers and the forwarding headers read
    in one pass, answered as reading each on its own would (the user header's errors
    first, then the tenant's)."""
    # As trusted_header()'s own memo, by both headers' values (the tenant's None when not
    # sent): only what was decoded and checked is kept, never what a repeat refuses.
    known: dict[tuple[bytes, bytes | None], Identity] = {}
    lengths = _lengths(wanted, tenant)

    def resolve(scope: Mapping[str, Any]) -> Identity | None:
        if not peer_trusted(scope):
            if not hints.warned and header_values(scope, name):
                hints.refused(scope)
            return None
        raw: bytes | None = None
        tenant_raw: bytes | None = None
        tenants = 0
        forwarding: list[tuple[bytes, bytes]] | None = None
        for key, value in scope.get("headers", ()):
            if len(key) not in lengths:
                continue  # as in trusted_header()
            lowered = key.lower()
            if lowered == wanted:
                if raw is not None:
                    _single_header(scope, name)  # raises, naming how often it was sent
                raw = value
            elif lowered == tenant:
                tenant_raw = value
                tenants += 1
            elif lowered == _XFF or lowered == _FORWARDED:  # noqa: PLR1714, SIM109
                if forwarding is None:
                    forwarding = []
                forwarding.append((lowered, value))
        if raw is None:
            return None
        if forwarding is not None and hints.forwarded(scope, forwarding):
            return None
        key = (raw, tenant_raw)
        if tenants < 2:
            identity = known.get(key)
            if identity is not None:
                return identity
        user_id = _header_id(raw, name)
        tenant_id: str | None = None
        if tenant_raw is not None:
            if tenants > 1:
                _single_header(scope, tenant_header)  # raises, naming how often it was sent
            try:
                tenant_id = tenant_raw.decode("utf-8")
            except UnicodeDecodeError:
                msg = f"the {tenant_header} header is not valid UTF-8"
                raise IdentityError(msg) from None
            if "," in tenant_id:  # after decoding, as _single_header() reads it
                _joined(tenant_header)
        return _remembered(known, key, _identity(user_id, tenant_id))

    return resolve


def _lengths(*names: bytes) -> frozenset[int]:
    """The lengths of a resolver's header names and of the forwarding headers': a header
    of another length is none of them, whatever its case."""
    return frozenset(len(name) for name in (*names, _XFF, _FORWARDED))


def _header_id(raw: bytes, name: str) -> str:
    """The user id a header's single value holds: refused (400) when joined by a comma (a
    proxy's copies on one line), then when not UTF-8."""
    if b"," in raw:
        _joined(name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(f"the {name} header is not valid UTF-8") from None


def _remembered(known: dict[_K, Identity], key: _K, identity: Identity) -> Identity:
    """``identity``, kept in ``known`` under ``key`` (emptied when full)."""
    if len(known) >= _MAX_IDENTITIES:
        known.clear()
    known[key] = identity
    return identity


def _joined(name: str) -> NoReturn:
    # RFC 9110 lets a proxy join the copies of a repeated header into one comma-separated
    # line: "bob, admin" is two identities, refused as two lines are.
    msg = (
        f"the {name} header holds a comma, as a proxy joins the copies of a header sent "
        "more than once: an id with a comma cannot be asserted through it"
    )
    raise IdentityError(msg)


# -- JWT bearer tokens ----------------------------------------------------------------------

_HMAC = frozenset({"HS256", "HS384", "HS512"})
_WEBSOCKET_PROTOCOL = "bearer"
# RFC 6750 section 3: no credential (or one of another scheme) is answered with the bare
# scheme, a token that fails validation with invalid_token, a malformed request with
# invalid_request.
_BEARER: Final = "Bearer"
_BEARER_REFUSED: Final = 'Bearer error="invalid_token"'
_BEARER_MALFORMED: Final = 'Bearer error="invalid_request"'


def _token_refused(detail: str) -> IdentityError:
    return IdentityError(detail, status=401, challenge=_BEARER_REFUSED)


def _malformed(detail: str) -> IdentityError:
    return IdentityError(detail, challenge=_BEARER_MALFORMED)


def _bearer_token(scope: Mapping[str, Any]) -> str | None:
    """The bearer token of a request, or ``None`` when it sends none.

    A malformed request (RFC 6750's ``invalid_request``) is 400: the Authorization header
    sent more than once or not UTF-8, ``Bearer`` without a token (an empty
    ``Authorization: Bearer ``), a websocket's ``bearer`` subprotocol given twice or not
    followed by a token, and a websocket sending both an Authorization header and the
    ``bearer`` subprotocol (one credential, sent one way: neither copy is picked). Another
    scheme (``Basic ...``) is 401, like no credential.
    """
    header = _single_header(scope, "authorization", challenge=_BEARER_MALFORMED)
    protocol_token = _protocol_token(scope) if scope.get("type") == "websocket" else None
    if header is not None:
        if protocol_token is not None:
            raise _malformed(
                "a token was sent both in the Authorization header and as the 'bearer' "
                "subprotocol; send it one way"
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise IdentityError(
                "the Authorization header is not 'Bearer <token>'", status=401, challenge=_BEARER
            )
        token = token.strip()
        if not token:
            raise _malformed("the Authorization header says Bearer but has no token")
        return token
    return protocol_token


def _protocol_token(scope: Mapping[str, Any]) -> str | None:
    # Browsers cannot set headers on a websocket: the token rides as the subprotocol after
    # "bearer" (the app then accepts with subprotocol="bearer").
    protocols = list(scope.get("subprotocols") or ())
    count = protocols.count(_WEBSOCKET_PROTOCOL)
    if not count:
        return None
    if count > 1:
        raise _malformed(f"the 'bearer' subprotocol was sent {count} times")
    index = protocols.index(_WEBSOCKET_PROTOCOL)
    token = str(protocols[index + 1]).strip() if index + 1 < len(protocols) else ""
    if not token:
        raise _malformed("the 'bearer' subprotocol is not followed by a token")
    return token


def _check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    algs = (algorithms,) if isinstance(algorithms, str) else tuple(algorithms)
    if not algs:
        msg = "jwt_bearer() needs at least one algorithm, e.g. algorithms=['RS256']"
        raise ValueError(msg)
    for alg in algs:
        if not isinstance(alg, str):
            msg = f"jwt_bearer()'s algorithms must be names such as 'RS256', not {alg!r:.64}"
            raise TypeError(msg)
    # Once each: an algorithm named twice was counted as another family's ("cannot mix").
    algs = tuple(dict.fromkeys(algs))
    if any(alg.lower() == "none" for alg in algs):
        msg = "jwt_bearer() refuses the 'none' algorithm: unsigned tokens prove nothing"
        raise ValueError(msg)
    from jwt.algorithms import get_default_algorithms

    unknown = sorted(set(algs).difference(get_default_algorithms()))
    if unknown:
        # A token of such an algorithm is never verified: a misspelt name (or an algorithm
        # of the cryptography package, not installed) would refuse every token.
        msg = (
            f"jwt_bearer() does not know the algorithm(s) {unknown}; known ones are "
            f"{sorted(get_default_algorithms())} (the jwt extra installs cryptography, "
            "which the asymmetric ones need)"
        )
        raise ValueError(msg)
    hmac_algs = _HMAC.intersection(algs)
    if hmac_algs and len(hmac_algs) != len(algs):
        msg = (
            "jwt_bearer() cannot mix HMAC and asymmetric algorithms: a public key would "
            "then verify forged HMAC tokens (key confusion); use one family"
        )
        raise ValueError(msg)
    return algs


def _jwt_failure(exc: Exception) -> str:
    """What was wrong with a token, in words that never include the token."""
    import jwt

    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the bearer token lacks the {exc.claim!r} claim"
    reasons: tuple[tuple[type[Exception], str], ...] = (
        (jwt.ExpiredSignatureError, "the bearer token has expired"),
        # nbf or iat in the future: PyJWT raises the same error for both.
        (jwt.ImmatureSignatureError, "the bearer token is not valid yet (nbf or iat)"),
        (jwt.InvalidAudienceError, "the bearer token is for another audience"),
        (jwt.InvalidIssuerError, "the bearer token has the wrong issuer"),
        (jwt.InvalidAlgorithmError, "the bearer token's algorithm is not accepted"),
        (jwt.InvalidSignatureError, "the bearer token's signature is invalid"),
    )
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return "the bearer token is malformed"


def _audience_refused(audiences: list[str] | None, warned: list[bool]) -> IdentityError:
    """The refusal of a token for another audience; without accepted audiences, of any
    token naming one, which the operator is told about once (``warned`` empty until then)."""
    if audiences is not None:
        return _token_refused("the bearer token is for another audience")
    if not warned:
        warned.append(True)
        logger.warning(
            "ambient: jwt_bearer() refused a token naming an audience (aud) because it "
            "accepts none; pass audience=... with this service's name to accept tokens "
            "meant for it. Reported once."
        )
    return _token_refused("the bearer token is for an audience and this service accepts none")


# PyJWKClient's words for "the key set was fetched and has no key with the token's kid".
_NO_MATCHING_KEY = "Unable to find a signing key that matches"


# Worker threads jwt_bearer's key set client may hold at once. PyJWKClient fetches with
# blocking I/O for up to its timeout; in the default limiter (40 threads, shared with the
# application's own thread work) a slow identity provider would hold every thread.
_KEY_SET_THREADS = 4

# Seconds a key set that failed is not asked again (also the 503's Retry-After). Without a
# pause every waiting request would try the provider in turn, each for up to its timeout.
_KEY_SET_PAUSE = 5.0

# A request waits for its key at most this many times the client's timeout (PyJWT's default
# when it has none): enough for a fetch that connects, then answers, each within it. The
# timeout bounds every read of the answer, not the whole of it, so a provider sending its
# key set a byte at a time would otherwise hold every request for as long as it likes.
_KEY_SET_WAIT = 2
_PYJWT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class _Remembered:
    """The last key set a ``PyJWKClient`` fetched that a resolver saw: its signing keys,
    when it was fetched (``time.monotonic``), and the client's cache entry it came from."""

    keys: list[Any]
    fetched_at: float
    entry: object = None


class _KeySet:
    """``jwt_bearer``'s view of a ``PyJWKClient``: the threads it may use, the pause after a
    failure, what it makes of a failure, the last key set fetched, and the warnings it logs:
    one when the provider's key set starts failing, one when it works again (never one per
    request during an outage)."""

    __slots__ = (
        "_gate",
        "_limiters",
        "_outage",
        "_remembered",
        "_retry_at",
        "_served_stale",
        "_stale_for",
        "failing",
    )

    def __init__(self, stale_for: float = 0.0) -> None:
        self.failing = False
        self._limiters: dict[tuple[bool, int], CapacityLimiter] = {}
        self._gate = threading.Lock()
        self._retry_at = 0.0
        self._outage = ""
        self._stale_for = stale_for
        # Assigned whole (never changed in place): threads of this resolver read it unlocked.
        self._remembered: _Remembered | None = None
        self._served_stale = False

    def limiter(self) -> CapacityLimiter:
        """This resolver's own thread limiter, one per event loop it runs in (an anyio
        limiter belongs to one: its async library, on its thread)."""
        loop = (_in_trio(), threading.get_ident())
        limiter = self._limiters.get(loop)
        if limiter is None:
            import anyio

            limiter = self._limiters.setdefault(loop, anyio.CapacityLimiter(_KEY_SET_THREADS))
        return limiter

    def signing_key(self, client: PyJWKClient, kid: str) -> Any:
        """The key named ``kid`` from ``client`` (in a worker thread: it may fetch).

        One thread at a time asks the client (PyJWKClient holds its own lock for the whole
        call anyway), so the requests queued behind a fetch that failed do not each ask
        again: for :data:`_KEY_SET_PAUSE` seconds after a failure nobody does. Keys the
        client fetched before still serve then (see :meth:`_known_key`); any other key is
        503 at once. Nobody waits for the gate longer than :meth:`patience` either: a fetch
        that never ends holds it.
        """
        import jwt

        wait = self._retry_at - _monotonic()
        if wait > 0:
            return self._fetched_key(client, kid, wait)
        if not self._gate.acquire(timeout=self.patience(client)):
            # A fetch that will not end holds the gate (its request has given up on it).
            error = self.unavailable(TimeoutError("another request's fetch is stuck"))
            return self._known_key_or(client, kid, error)
        failed: Exception | None = None
        refused: IdentityError | IdentityUnavailableError | None = None
        try:
            wait = self._retry_at - _monotonic()  # a fetch failed while this one waited
            if wait > 0:
                return self._fetched_key(client, kid, wait)
            cache = client.jwk_set_cache
            cached = None if cache is None else cache.jwk_set_with_timestamp
            try:
                # By the kid read from the token's header once, for every step: the client's
                # get_signing_key_from_jwt would decode the whole token again, payload too.
                found = client.get_signing_key(kid)
            except (jwt.PyJWKClientError, jwt.PyJWKSetError) as exc:
                failed = exc
            except Exception as exc:  # noqa: BLE001 - whatever the answer broke, it is not the token
                # PyJWKClient lets through what the provider's answer makes of its parsing: a
                # body that is not JSON (a proxy's error page), JSON nested too deep, a key
                # field of the wrong type, a connection reset in the middle of the body.
                failed = exc
            self._remember(client, None if failed is not None else found)
            if failed is not None:
                # Made sense of with the gate held: the pause a failure starts is set before a
                # request queued behind this fetch looks for it, rather than it fetching too.
                refused = self.failure(failed)
                if isinstance(refused, IdentityError):
                    self._forget(client, kid)
            # Whether the provider answered: a key its cache held says nothing of it, and
            # an outage said to be over by one would be warned of again at the next fetch.
            entry = None if cache is None else cache.jwk_set_with_timestamp
            answered = cache is None or (entry is not None and entry is not cached)
        finally:
            self._gate.release()
        if isinstance(refused, IdentityUnavailableError):
            return self._known_key_or(client, kid, refused)
        if answered:
            self.worked()  # a key set without the token's key works too
        if refused is not None:
            raise refused
        return found

    @staticmethod
    def patience(client: PyJWKClient) -> float:
        """Seconds a request waits for its key from ``client``, fetch included."""
        timeout = getattr(client, "timeout", None)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            timeout = _PYJWT_TIMEOUT
        return _KEY_SET_WAIT * float(timeout)

    def stuck(self, client: PyJWKClient, kid: str) -> Any:
        """The key named ``kid`` after its request waited :meth:`patience` for it in vain:
        one fetched before (:meth:`_known_key`), else the 503. The fetch goes on in its
        thread, and fills the client's cache if it ever ends."""
        error = self.unavailable(TimeoutError("the key set did not arrive in time"))
        return self._known_key_or(client, kid, error)

    def _remember(self, client: PyJWKClient, found: Any) -> None:
        """Remember the last key set ``client`` fetched: its cache entry (which a fetch that
        fails leaves in place, and which another resolver sharing the client may have
        filled), or without a cache, where each lookup fetches, the key just ``found``."""
        import jwt

        cache = client.jwk_set_cache
        if cache is not None:
            entry = cache.jwk_set_with_timestamp
            remembered = self._remembered
            if entry is not None and (remembered is None or remembered.entry is not entry):
                keys = [
                    key
                    for key in entry.get_jwk_set().keys
                    if key.public_key_use in ("sig", None) and key.key_id
                ]
                self._remembered = _Remembered(keys, entry.get_timestamp(), entry)
        elif isinstance(found, jwt.PyJWK):
            self._remembered = _Remembered([found], _monotonic())

    def _forget(self, client: PyJWKClient, kid: str) -> None:
        """The key set just fetched lacks the key ``kid``: without a cache, the key found
        last is forgotten when it is that one (the provider removed it, and it must not
        serve in an outage). A cache's set is remembered whole, as it was fetched."""
        remembered = self._remembered
        if (
            client.jwk_set_cache is None
            and remembered is not None
            and any(key.key_id == kid for key in remembered.keys)
        ):
            self._remembered = None

    def _known_key(self, client: PyJWKClient, kid: str) -> Any:
        """The key named ``kid`` among those fetched before, or ``None``: as PyJWKClient
        picks it (a signing key), in the client's cache while it is fresh, or else in the
        last key set fetched up to ``stale_for`` seconds after its fetch."""
        self._remember(client, None)
        remembered = self._remembered
        if remembered is None:
            return None
        key = client.match_kid(remembered.keys, kid)
        if key is None:
            return None
        cache = client.jwk_set_cache
        if (
            cache is not None
            and cache.get() is not None
            and cache.jwk_set_with_timestamp is remembered.entry
        ):
            return key  # still in the client's cache: it serves, whatever stale_for says
        if self._stale_for and 0 <= _monotonic() - remembered.fetched_at <= self._stale_for:
            self._served_stale = True
            return key
        return None

    def _known_key_or(self, client: PyJWKClient, kid: str, error: IdentityUnavailableError) -> Any:
        """The key named ``kid`` among those fetched before, else ``error`` raised."""
        key = self._known_key(client, kid)
        if key is None:
            raise error
        return key

    def _fetched_key(self, client: PyJWKClient, kid: str, wait: float) -> Any:
        return self._known_key_or(
            client, kid, IdentityUnavailableError(self._outage, retry_after=wait)
        )

    def failure(self, exc: Exception) -> IdentityError | IdentityUnavailableError:
        """The token's key unknown to the key set is the token's fault (401); a key set that
        could not be fetched or is unusable is the server's (503): it says nothing about
        the token, and the provider is left alone for a pause."""
        import jwt

        unreachable = isinstance(exc, jwt.PyJWKClientConnectionError | OSError)
        if not unreachable and str(exc).startswith(_NO_MATCHING_KEY):
            return _token_refused("the token's key (kid) is not trusted")
        return self.unavailable(exc)

    def unavailable(self, exc: Exception) -> IdentityUnavailableError:
        """The 503 for a key set that could not be had because of ``exc``; the provider is
        left alone for a pause."""
        import jwt

        unreachable = isinstance(exc, jwt.PyJWKClientConnectionError | OSError)
        reason = "could not be fetched" if unreachable else "is unusable"
        self._outage = f"the identity provider's key set {reason}; try again shortly"
        self._retry_at = _monotonic() + _KEY_SET_PAUSE
        error = IdentityUnavailableError(self._outage, retry_after=_KEY_SET_PAUSE)
        if not self.failing:
            self.failing = True
            self._served_stale = False
            logger.warning(
                "ambient: jwt_bearer(): %s (%s: %s); %s",
                error,
                type(exc).__name__,
                exc,
                self._stale_note(),
            )
        return error

    def _stale_note(self) -> str:
        """What the warning of an outage says of the keys fetched before it."""
        if not self._stale_for:
            return "keys fetched before serve while in the client's cache (stale_keys_for=0)"
        remembered = self._remembered
        if remembered is None:
            return "no key set was fetched before to serve meanwhile"
        age = max(0.0, _monotonic() - remembered.fetched_at)
        if age > self._stale_for:
            return (
                f"the last key set fetched, {age:.0f} s ago, is past stale_keys_for="
                f"{self._stale_for:g} and serves no more"
            )
        return (
            f"the last key set fetched, {age:.0f} s ago, serves meanwhile, for "
            f"{self._stale_for - age:.0f} s more at most (stale_keys_for={self._stale_for:g})"
        )

    def worked(self) -> None:
        if self.failing:
            self.failing = False
            self._retry_at = 0.0  # a fetch that outlived its request's wait ended after all
            stale = "; keys fetched before it served meanwhile" if self._served_stale else ""
            logger.warning(
                "ambient: jwt_bearer(): the identity provider's key set works again%s", stale
            )


def _verification_keys(
    key_or_jwks: Any, *, hmac: bool
) -> tuple[PyJWKClient | None, PyJWKSet | None, Any]:
    """``jwt_bearer``'s key argument as ``(key set client, key set, key)``, one of them set."""
    import jwt

    if isinstance(key_or_jwks, jwt.PyJWKClient):
        if hmac:
            msg = (
                "jwt_bearer() cannot verify HMAC algorithms with a PyJWKClient: a key set "
                "fetched from a URL is public, and anyone who reads a secret key in it can "
                "sign tokens; give the secret itself (or a key set dict kept private)"
            )
            raise ValueError(msg)
        return key_or_jwks, None, None
    if isinstance(key_or_jwks, Mapping) and "keys" in key_or_jwks:
        return None, jwt.PyJWKSet.from_dict(dict(key_or_jwks)), None
    if isinstance(key_or_jwks, Mapping):
        jwk = jwt.PyJWK.from_dict(dict(key_or_jwks))
        if jwk.public_key_use not in ("sig", None):
            # As in a key set: a key marked for encryption verifies no signature.
            msg = f"the JWK given is marked for use {jwk.public_key_use!r}, not for signatures"
            raise ValueError(msg)
        return None, None, jwk
    if hmac and isinstance(key_or_jwks, str | bytes):
        _refuse_public_key_as_secret(key_or_jwks)
    return None, None, key_or_jwks


def _check_keys_serve(algs: Collection[str], jwks: PyJWKSet | None, key: Any) -> None:
    """Refuse a JWK, or a key set, none of whose keys can verify a token of ``algs``: PyJWT
    takes a JWK's algorithm for the only one it verifies, so every token would be 401."""
    import jwt

    if isinstance(key, jwt.PyJWK):
        if key.algorithm_name not in algs:
            msg = (
                f"the JWK given verifies {key.algorithm_name} tokens only, an algorithm "
                f"not among algorithms {sorted(algs)}: every token would be refused"
            )
            raise ValueError(msg)
    elif jwks is not None:
        signing = {k.algorithm_name for k in jwks.keys if k.public_key_use in ("sig", None)}
        if not signing & set(algs):
            msg = (
                f"no signing key of the key set verifies any of algorithms {sorted(algs)} "
                f"(its keys are for {sorted(signing)}): every token would be refused"
            )
            raise ValueError(msg)


def _check_key_verifies(algs: Collection[str], key: Any) -> None:
    """Refuse a key (neither a JWK nor a key set) with which none of ``algs`` verifies a
    signature: a key of another kind, a private key rather than its public key, a key set
    object given where a dict was meant. PyJWT finds out only at each token, with a
    ``TypeError`` or ``AttributeError``: every request with a token would be a 500."""
    import jwt

    jws = jwt.PyJWS()
    reasons = []
    for alg in sorted(algs):
        try:
            prepared = jws.get_algorithm_by_name(alg).prepare_key(key)
        except (jwt.PyJWTError, TypeError, ValueError, AttributeError) as exc:
            reasons.append(f"{alg}: {exc}")
            continue
        if isinstance(prepared, bytes) or callable(getattr(prepared, "verify", None)):
            return
        reasons.append(f"{alg}: a private key verifies nothing, give its public key")
    msg = (
        f"the key given ({type(key).__name__}) cannot verify tokens of any of algorithms "
        f"{sorted(algs)}: every token would fail ({'; '.join(reasons)})"
    )
    raise ValueError(msg)


def _refuse_public_key_as_secret(key: str | bytes) -> None:
    """Raise ``ValueError`` when an HMAC secret is a public key or certificate (or
    anything else PyJWT refuses as one: nothing at all, a JWK as text)."""
    from jwt.algorithms import HMACAlgorithm
    from jwt.exceptions import InvalidKeyError

    # PyJWT's own test of an HMAC secret, at construction rather than at every token: it
    # knows PEM, SSH and DER (public keys and certificates) alike.
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except InvalidKeyError as exc:
        if not key:
            msg = "the HMAC secret given is empty: no token would ever verify"
        elif (kind := _json_kind(key)) == "JSON":
            # PyJWT refuses JSON with a "kty" member at any depth: a JWK held deeper down.
            msg = (
                f"the HMAC secret given is JSON text holding a JWK: give the JWK as a dict ({exc})"
            )
        elif kind is not None:
            msg = f"the HMAC secret given is a {kind} as text: give it as a dict ({exc})"
        else:
            msg = (
                "an HMAC algorithm was given with a public key or certificate; that is the "
                "key-confusion attack"
            )
        raise ValueError(msg) from None


def _json_kind(key: str | bytes) -> str | None:
    """What ``key`` is as JSON text: ``"JWK"`` (an object with ``kty``), ``"key set"`` (one
    with ``keys``), ``"JSON"`` (any other value), or ``None`` (no JSON text)."""
    import json

    try:
        value = json.loads(key)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and "kty" in value:
        return "JWK"
    if isinstance(value, dict) and "keys" in value:
        return "key set"
    return "JSON"


def _audiences(audience: str | Iterable[str] | None) -> list[str] | None:
    """The accepted audiences as a list: an iterator or generator given would be used up by
    the first token, and every later one refused as "for another audience"."""
    if audience is None:
        return None
    audiences = [audience] if isinstance(audience, str) else list(audience)
    if not audiences or not all(isinstance(value, str) and value for value in audiences):
        msg = f"audience must be a non-empty string or strings, not {audiences!r}"
        raise ValueError(msg)
    return audiences


def _finite_seconds(value: object, name: str, off: str = "") -> float:
    """``value`` as seconds, refused at construction when no check could use it: not an
    int or float (TypeError), negative, NaN or infinite, or an int past what a float holds
    (ValueError, compared before converting); ``off`` says what 0 means, if anything."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be seconds as an int or float, not {type(value).__name__}"
        raise TypeError(msg)
    if not 0 <= value <= sys.float_info.max:
        msg = f"{name} must be finite seconds >= 0{off}, not {value!s:.64}"
        raise ValueError(msg)
    return float(value)


def _required_claims(require: object, user_claim: object, tenant_claim: object) -> list[str]:
    """The claims a token must carry, ``user_claim`` among them; one name given as a str is
    one claim (not its letters, each of which no token carries: every token was 401)."""
    for option, claim in (("user_claim", user_claim), ("tenant_claim", tenant_claim)):
        if claim is None and option == "tenant_claim":
            continue
        if not isinstance(claim, str) or not claim:
            msg = f"{option} must be a claim's name, a non-empty str, not {claim!r:.64}"
            raise TypeError(msg) if not isinstance(claim, str) else ValueError(msg)
    names = (require,) if isinstance(require, str) else require
    if not isinstance(names, Iterable):
        msg = f"require must be claim names, such as ('exp',), not {require!r:.64}"
        raise TypeError(msg)
    required = {str(user_claim)}
    for name in names:
        if not isinstance(name, str) or not name:
            msg = f"require must name claims with non-empty strs, not {name!r:.64}"
            raise TypeError(msg) if not isinstance(name, str) else ValueError(msg)
        required.add(name)
    return sorted(required)


def jwt_bearer(  # noqa: PLR0915 - its closures share the options checked here
    key_or_jwks: Any,
    *,
    algorithms: Iterable[str],
    audience: str | Iterable[str] | None = None,
    issuer: str | None = None,
    user_claim: str = "sub",
    tenant_claim: str | None = None,
    leeway: float = 30.0,
    require: Iterable[str] = ("exp",),
    stale_keys_for: float = 3600.0,
) -> IdentityResolver:
    """Take the identity from an ``Authorization: Bearer`` JWT (extra ``jwt``, PyJWT).

    Validates the signature, ``exp``, ``nbf``, ``aud`` and ``iss`` (when ``issuer`` is
    given); ``alg=none`` is refused, and an HMAC algorithm can
    never be combined with an asymmetric key (the key-confusion attack). Websockets may send
    the token as the subprotocol after ``bearer`` (``Sec-WebSocket-Protocol: bearer, <jwt>``);
    the app then accepts with ``subprotocol="bearer"``, since a browser fails a handshake
    whose answer names none of the subprotocols it offered.
    A missing token is no identity. Otherwise :class:`~ambient.errors.IdentityError`, whose
    detail says what failed, never the token: 401 for a token that fails validation (bad
    signature, expired, wrong ``aud`` or ``iss``, ...) or an Authorization header of another
    scheme (``Basic ...``); 400 for a malformed request (RFC 6750 ``invalid_request``): the
    Authorization header sent twice, ``Bearer`` without a token (an empty
    ``Authorization: Bearer ``), a ``bearer`` subprotocol repeated or not followed by a token,
    or a websocket sending both the header and the subprotocol. Each answer carries the
    RFC 6750 challenge in ``WWW-Authenticate``: ``Bearer error="invalid_token"`` for a token
    that fails validation, ``Bearer error="invalid_request"`` for a malformed request,
    ``Bearer`` for another scheme and, from the middleware, for a request without a token.
    The identity expires with the token (``exp`` plus ``leeway``): a websocket still open
    then is closed with 4001.

    Args:
        key_or_jwks: The verification key (HMAC secret, PEM public key, PyJWT key object), a
            JWKS as a dict (``{"keys": [...]}``, selected by the token's ``kid``) or a
            ``jwt.PyJWKClient``. A key set that cannot be had is 503 with ``Retry-After``;
            a request waits for it at most twice the client's ``timeout`` (which bounds
            each read of the answer, not the whole answer). A token whose ``kid`` the set
            lacks is 401; the client fetches the set again for such a ``kid`` only once its
            last fetch is ``cooldown_duration`` old (30 s by default), so a token signed
            with a key the provider added since is 401 until then.
        algorithms: Accepted algorithms, e.g. ``["RS256"]``. Required; never ``"none"``.
        audience: Accepted ``aud`` value(s). Without one, a token naming any audience is
            refused (RFC 7519: a token for other services is not for this one), with a
            warning logged once, and a token without ``aud`` is accepted. With one, a
            token without ``aud`` is refused too (401: it lacks the claim).
        issuer: Required ``iss`` value.
        user_claim: The claim holding the user id.
        tenant_claim: The claim holding the tenant id, if any. A token without it (or with
            it null) is a user of no tenant; name it in ``require`` to refuse such a token.
        leeway: Seconds of clock skew allowed for ``exp`` and ``nbf`` (finite, >= 0).
        require: Claims that must be present (``user_claim`` always is); one name given
            as a str is that claim.
        stale_keys_for: With a ``PyJWKClient`` whose cached key set has expired (its
            ``lifespan``), for how many seconds after the last successful fetch that set
            still verifies tokens while the provider cannot be reached or answers with no
            usable key set: a token whose key is in it is verified with it, any other is
            503, and past this bound every token is 503 until the provider answers.
            Finite, >= 0; ``0`` turns it off. The outage's warning says whether that set
            serves. A client that keeps no key set (``cache_jwk_set=False``) shows none:
            the key it found last is remembered instead.

    Raises:
        ValueError: at construction, for ``alg=none``, no algorithm, an algorithm PyJWT
            does not know, HMAC mixed with asymmetric algorithms or given a public key or a
            ``PyJWKClient`` (a key set fetched from a URL is public), a key with which none
            of ``algorithms`` verifies (a private key, a key of another kind), a JWK or key
            set with no signing key for any of ``algorithms``, an empty audience, or a
            leeway or ``stale_keys_for`` that is negative, infinite or NaN, or an empty
            claim name (``user_claim``, ``tenant_claim``, in ``require``).
        TypeError: at construction, for a leeway or ``stale_keys_for`` that is not a
            number of seconds, or a claim name or algorithm that is not a str.
    """
    import jwt

    algs = _check_algorithms(algorithms)
    hmac_algs = _HMAC.intersection(algs)

    jwk_client, jwks, key = _verification_keys(key_or_jwks, hmac=bool(hmac_algs))
    _check_keys_serve(algs, jwks, key)
    if jwk_client is None and jwks is None and not isinstance(key, jwt.PyJWK):
        _check_key_verifies(algs, key)
    audiences = _audiences(audience)
    # inf would pass every expired token, nan fail every valid one.
    leeway = _finite_seconds(leeway, "leeway")
    # inf would trust a key set fetched once for ever, a removed key with it.
    stale_for = _finite_seconds(stale_keys_for, "stale_keys_for", " (0 turns it off)")
    required = _required_claims(require, user_claim, tenant_claim)
    # aud is checked without an audience too: RFC 7519 (4.1.3) has a token naming audiences
    # refused by a service not among them, or a token meant for another service would do.
    decoder = jwt.PyJWT(options={"require": required, "verify_aud": True, "strict_aud": False})
    warned_audience: list[bool] = []

    key_set = _KeySet(stale_for)

    def signing_key(token: str, *, waited: bool) -> Any:
        if jwk_client is not None:
            kid = jwt.get_unverified_header(token).get("kid")  # a str, when there (PyJWT checks)
            if not kid:
                # PyJWKClient matches no key without one: refused here, before a fetch that
                # could only fail or, with the provider down, answer 503 for a bad token.
                raise _token_refused("the token names no key (kid)")
            if waited:  # in vain, for a fetch that goes on
                return key_set.stuck(jwk_client, kid)
            return key_set.signing_key(jwk_client, kid)
        if jwks is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            if not isinstance(kid, str):
                raise _token_refused("the token names no key (kid)")
            try:
                found = jwks[kid]
            except KeyError:
                found = None
            # A key marked for encryption verifies no signature (PyJWKClient skips them too).
            if found is None or found.public_key_use not in ("sig", None):
                raise _token_refused("the token's key (kid) is not trusted")
            return found
        return key

    def verify(token: str, *, waited: bool = False) -> Identity:
        try:
            claims = decoder.decode(
                token,
                signing_key(token, waited=waited),
                algorithms=list(algs),
                audience=audiences,
                issuer=issuer,
                leeway=leeway,
            )
        except jwt.InvalidAudienceError:
            raise _audience_refused(audiences, warned_audience) from None
        except jwt.PyJWTError as exc:
            raise _token_refused(_jwt_failure(exc)) from None
        user_id = claims.get(user_claim)
        if not isinstance(user_id, str):
            raise _token_refused(f"the token's {user_claim!r} claim is not a string")
        tenant = claims.get(tenant_claim) if tenant_claim else None
        if tenant is not None and not isinstance(tenant, str):
            raise _token_refused(f"the token's {tenant_claim!r} claim is not a string")
        # PyJWT honours the token until int(exp) + leeway; so does a websocket.
        exp = claims.get("exp")
        try:
            expires_at = None if exp is None else float(int(exp) + leeway)
        except OverflowError:  # an exp past what a float holds: never, in practice
            expires_at = None
        return Identity(user_id, tenant, _ReadOnlyDict(claims), expires_at=expires_at)

    if jwk_client is not None:
        import anyio.to_thread

        async def resolve_remote(scope: Mapping[str, Any]) -> Identity | None:
            token = _bearer_token(scope)
            if token is None:
                return None
            # PyJWKClient fetches (and caches) the key set with blocking I/O, which no
            # cancellation reaches: a fetch that outlasts the wait is left to end on its own.
            with anyio.move_on_after(key_set.patience(jwk_client)):
                return await anyio.to_thread.run_sync(
                    verify, token, limiter=key_set.limiter(), abandon_on_cancel=True
                )
            # A key fetched before may serve: it is at hand, and checking a signature with
            # it blocks no more than with a key given (which is checked in the event loop).
            return verify(token, waited=True)

        return _challenging(resolve_remote, _BEARER)

    def resolve(scope: Mapping[str, Any]) -> Identity | None:
        token = _bearer_token(scope)
        return None if token is None else verify(token)

    return _challenging(resolve, _BEARER)


# -- composition ----------------------------------------------------------------------------


def first_of(*resolvers: IdentityResolver) -> IdentityResolver:
    """Try ``resolvers`` in order; the first identity found wins.

    A resolver that raises :class:`~ambient.errors.IdentityError` stops the search: a
    malformed credential is refused, never skipped in favour of a weaker one. The 401 for a
    request that none of them identified offers the ``WWW-Authenticate`` challenges of all
    that have one (``Bearer`` for :func:`jwt_bearer`).

    Raises:
        ValueError: No resolver was given.
        TypeError: A resolver is not callable, or is a function that makes one, given
            without calling it (``trusted_header`` for ``trusted_header()``).
    """
    if not resolvers:
        msg = "first_of() needs at least one resolver"
        raise ValueError(msg)
    for number, resolver in enumerate(resolvers, 1):
        _check_resolver(resolver, f"first_of()'s resolver {number}")

    async def resolve(scope: Mapping[str, Any]) -> Identity | None:
        for resolver in resolvers:
            found = await resolve_identity(resolver, scope)
            if found is not None:
                return found
        return None

    # A 401 offers every scheme a client could answer with (RFC 9110 allows several).
    challenges = dict.fromkeys(filter(None, map(_challenge_of, resolvers)))
    return _challenging(resolve, ", ".join(challenges) or None)


def __getattr__(name: str) -> Callable[..., IdentityResolver]:
    # signed_context() is built on ambient.integrations.propagation, which imports this
    # module: it is imported when first asked for here, not when this module loads.
    if name == "signed_context":
        from ambient.integrations.propagation import signed_context

        return signed_context
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
