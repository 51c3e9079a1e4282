"""Identity resolvers, and property-based bad input through the middleware: only 200, 400,
401 (or 1008) ever come back, and no context is ever bound with invalid ids."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import time
import tracemalloc
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient._context import validate_id
from ambient.errors import IdentityError, InvalidContextError
from ambient.middleware import (
    AmbientMiddleware,
    Identity,
    Problem,
    WebSocketTickets,
    first_of,
    scope_user,
    trusted_header,
)
from ambient.middleware.identity import header_values, jwt_bearer
from tests.apps import Ledger, Probe, build_registry

SECRET = "s3cret-key-that-is-long-enough-for-hs256!"
AUDIENCE = "ambient-tests"
ISSUER = "https://issuer.test"
PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = PRIVATE_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def http_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        **extra,
    }


def token(
    claims: Mapping[str, Any] | None = None,
    *,
    key: Any = SECRET,
    alg: str = "HS256",
    **headers: Any,
) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600, "iat": now}
    payload.update(claims or {})
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def unsigned(claims: Mapping[str, Any] | None = None) -> str:
    """An ``alg=none`` token (PyJWT refuses to make one)."""
    now = int(time.time())
    payload = {"sub": "mallory", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600, **(claims or {})}

    def part(data: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def hs_resolver(**options: Any) -> Any:
    return jwt_bearer(SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER, **options)


def bearer(value: str) -> dict[str, Any]:
    return http_scope([(b"authorization", f"Bearer {value}".encode())])


class TestIdentity:
    @pytest.mark.parametrize("expires_at", [math.nan, True, "1700000000", None.__class__])
    def test_an_expiry_that_is_no_seconds_since_the_epoch_is_refused(
        self, expires_at: object
    ) -> None:
        """An expiry that no clock reading could be compared with (NaN, a bool, text, ...)
        is refused when the identity is made, not met when a connection outlives it."""
        with pytest.raises(TypeError, match="seconds since the epoch or None"):
            Identity("alice", expires_at=expires_at)  # type: ignore[arg-type]

    @pytest.mark.parametrize("expires_at", [math.inf, -math.inf])
    def test_an_infinite_expiry_is_refused(self, expires_at: float) -> None:
        """``None`` says never: infinity was taken as never too, and minus infinity as an
        identity that had always expired, where each is a mistake in a resolver."""
        with pytest.raises(ValueError, match="^Identity.expires_at must be finite .+ None"):
            Identity("alice", expires_at=expires_at)

    @pytest.mark.parametrize("expires_at", [None, 0, 1_700_000_000, 1_700_000_000.5])
    def test_an_expiry_in_seconds_or_none_is_kept(self, expires_at: float | None) -> None:
        """An int or float of seconds, or None, is the identity's expiry."""
        assert Identity("alice", expires_at=expires_at).expires_at == expires_at


class TestTrustedHeader:
    def test_what_it_remembers_never_bypasses_a_check(self) -> None:
        """A user seen before from a trusted peer is still refused from an untrusted one,
        a repeated header is still an error, and ids keep resolving past the memo's bound."""
        resolve = trusted_header()
        trusted = {"client": ("127.0.0.1", 4000)}
        untrusted = {"client": ("203.0.113.9", 4000)}
        alice = [(b"x-user-id", b"alice")]
        assert resolve(http_scope(alice, **trusted)) == Identity("alice")
        assert resolve(http_scope(alice, **trusted)) == Identity("alice")
        assert resolve(http_scope(alice, **untrusted)) is None
        with pytest.raises(IdentityError, match="2 times"):
            resolve(http_scope(alice * 2, **trusted))
        for number in range(3000):  # more users than it keeps
            user = f"user-{number}"
            found = resolve(http_scope([(b"x-user-id", user.encode())], **trusted))
            assert found == Identity(user)
        assert resolve(http_scope(alice, **trusted)) == Identity("alice")

    def test_a_peers_remembered_verdict_is_never_another_addresses(self) -> None:
        """Whether a peer is trusted is remembered for its own address only: neither a
        trusted nor an untrusted one decides for an address that shares its start."""
        resolve = trusted_header(trusted=("10.0.0.1/32",))
        alice = [(b"x-user-id", b"alice")]
        for peer in ("10.0.0.10", "10.0.0.1", "10.0.0.2", "10.0.0.100", "10.0.0.11", "10.0.0.1"):
            expected = Identity("alice") if peer == "10.0.0.1" else None
            assert resolve(http_scope(alice, client=(peer, 4000))) == expected, peer

    def test_what_it_remembers_answers_for_the_user_header_only(self) -> None:
        """A user seen before is never the answer for a request whose user header names
        another, whatever value its other headers carry."""
        resolve = trusted_header()
        assert resolve(http_scope([(b"x-user-id", b"bob")])) == Identity("bob")
        headers = [(b"x-user-id", b"alice"), (b"x-request-id", b"bob")]
        assert resolve(http_scope(headers)) == Identity("alice")
        assert resolve(http_scope([(b"x-request-id", b"bob")])) is None

    @pytest.mark.parametrize("client", [("testclient", 50000), ("localhost", 4000), ("", 0)])
    def test_a_client_address_that_is_no_ip_address_asserts_nothing(
        self, client: tuple[str, int]
    ) -> None:
        """A peer whose address is no IP address (a test client's name, a host name) lies
        in no trusted network, whatever the networks."""
        alice = [(b"x-user-id", b"alice")]
        for trusted in (("127.0.0.1/32", "::1/128"), ("0.0.0.0/0", "::/0")):
            resolve = trusted_header(trusted=trusted)
            assert resolve(http_scope(alice, client=client)) is None

    def test_a_refused_peer_with_an_address_is_not_explained_as_the_unix_socket(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An untrusted TCP peer is refused without a word about the Unix socket, even from a
        server that gives no address of its own."""
        resolve = trusted_header(trusted=("127.0.0.1/32",))
        scope = http_scope([(b"x-user-id", b"alice")], client=("203.0.113.9", 4000), server=None)
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            assert resolve(scope) is None
        assert caplog.records == []

    @pytest.mark.parametrize("tenant_header", [None, "x-tenant-id"])
    def test_what_it_remembers_stays_bounded_however_many_users_and_peers(
        self, tenant_header: str | None
    ) -> None:
        """Users and peer addresses it has seen are remembered up to a bound: a server
        that sees ever new ones (clients of a large network, sent by one proxy) does not
        grow for each."""
        resolve = trusted_header(tenant_header=tenant_header, trusted=("10.0.0.0/8",))

        def users(first: int, count: int) -> None:
            for number in range(first, first + count):
                headers = [(b"x-user-id", b"user-%d" % number), (b"x-tenant-id", b"t")]
                peer = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
                assert resolve(http_scope(headers, client=(peer, 4000))) is not None

        users(0, 4096)  # past every bound
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            users(4096, 20_000)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 1_000_000, grown

    def test_one_network_given_as_a_str_is_that_network(self) -> None:
        """``trusted="10.0.0.0/8"`` is one network, not its characters."""
        resolve = trusted_header(trusted="10.0.0.0/8")
        alice = [(b"x-user-id", b"alice")]
        assert resolve(http_scope(alice, client=("10.1.2.3", 4000))) == Identity("alice")
        assert resolve(http_scope(alice, client=("127.0.0.1", 4000))) is None
        unix = trusted_header(trusted="unix")
        assert unix(http_scope(alice, client=None, server=None)) == Identity("alice")

    @pytest.mark.parametrize("peer", ["10.1.2.3", "::ffff:10.1.2.3", "10.200.3.4"])
    def test_an_ipv4_mapped_trusted_network_trusts_its_ipv4_peers(self, peer: str) -> None:
        """A peer's IPv4-mapped address is checked as the IPv4 address it maps: a trusted
        network written in the IPv4-mapped form (as a dual-stack server shows its IPv4
        peers) never matched, and its proxies' requests had no identity."""
        resolve = trusted_header(trusted=("::ffff:10.0.0.0/104",))
        alice = [(b"x-user-id", b"alice")]
        assert resolve(http_scope(alice, client=(peer, 4000))) == Identity("alice")
        assert resolve(http_scope(alice, client=("11.1.2.3", 4000))) is None
        assert resolve(http_scope(alice, client=("::ffff:11.1.2.3", 4000))) is None

    def test_every_ipv4_mapped_address_is_every_ipv4_address(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``::ffff:0.0.0.0/96`` maps all of IPv4: its peers are trusted as IPv4 peers,
        and the operator is warned that any client can assert any identity."""
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            resolve = trusted_header(trusted=("::ffff:0.0.0.0/96",))
        assert ["any client can assert" in r.getMessage() for r in caplog.records] == [True]
        alice = [(b"x-user-id", b"alice")]
        assert resolve(http_scope(alice, client=("203.0.113.9", 4000))) == Identity("alice")
        assert resolve(http_scope(alice, client=("2001:db8::1", 4000))) is None

    @pytest.mark.parametrize(
        ("headers", "named"),
        [
            ([(b"x-user-id", b"bob, admin")], "x-user-id"),
            ([(b"x-user-id", b"bob,admin")], "x-user-id"),
            ([(b"x-user-id", b"bob"), (b"x-tenant-id", b"acme, globex")], "x-tenant-id"),
        ],
    )
    def test_a_header_a_proxy_joined_from_two_copies_is_refused(
        self, headers: list[tuple[bytes, bytes]], named: str
    ) -> None:
        """RFC 9110 lets a proxy join the copies of a repeated header into one line with
        commas: that is two identities, refused as two lines are (never "bob, admin" as one
        user, nor the first)."""
        resolve = trusted_header(tenant_header="x-tenant-id")
        scope = http_scope(headers, client=("127.0.0.1", 4000))
        with pytest.raises(IdentityError, match=f"the {named} header holds a comma") as caught:
            resolve(scope)
        assert caught.value.http_status == 400
        assert resolve(http_scope([(b"x-user-id", b"bob")], client=("127.0.0.1", 4000))) == (
            Identity("bob")
        )

    @pytest.mark.parametrize(
        ("client", "forwarding"),
        [
            # uvicorn's proxy headers: the node, port 0 (or the port the node names)
            (("127.0.0.1", 0), [(b"x-forwarded-for", b"127.0.0.1")]),
            (("127.0.0.1", 4444), [(b"X-Forwarded-For", b"10.0.0.1, 127.0.0.1:4444")]),
            (("::1", 0), [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-for", b"::1")]),
            # hypercorn's ProxyFixMiddleware, legacy and modern (a quoted node kept quoted)
            (("127.0.0.1:80", 0), [(b"x-forwarded-for", b"127.0.0.1:80")]),
            (('"[::1]:4711"', 0), [(b"forwarded", b'for="[::1]:4711";proto=http')]),
            (("::1", 4711), [(b"forwarded", b'proto=https;for="[::1]:4711", for=10.0.0.2')]),
            # a server that keeps the node's host and drops its port
            (("127.0.0.1", 0), [(b"x-forwarded-for", b"127.0.0.1:4444")]),
            # RFC 7239: parameter names are case-insensitive
            (("127.0.0.1", 0), [(b"forwarded", b"proto=http; For=127.0.0.1")]),
            # read from the first of two forwarding headers, the second naming another
            (
                ("127.0.0.1", 0),
                [(b"x-forwarded-for", b"127.0.0.1"), (b"forwarded", b"for=203.0.113.9")],
            ),
        ],
    )
    @pytest.mark.parametrize("tenant_header", [None, "x-tenant-id"])
    def test_a_client_address_read_from_forwarding_headers_asserts_nothing(
        self,
        client: tuple[str, int],
        forwarding: list[tuple[bytes, bytes]],
        tenant_header: str | None,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A server that rewrote scope["client"] from X-Forwarded-For or Forwarded hid the
        peer that connected: the trusted address may be the client's own claim. Refused,
        and the operator is told once which setting did it; with a tenant header too (its
        resolver reads the headers in a pass of its own)."""
        resolve = trusted_header(tenant_header=tenant_header)
        scope = http_scope([(b"x-user-id", b"admin"), *forwarding], client=client)
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            assert resolve(scope) is None
            assert resolve(scope) is None
        warnings = [r for r in caplog.records if "--no-proxy-headers" in r.getMessage()]
        assert len(warnings) == 1
        assert forwarding[0][0].decode().lower() in warnings[0].getMessage()

    @pytest.mark.parametrize("host", [None, b"127.0.0.1", 2130706433, b"\x7f\x00\x00\x01"])
    @pytest.mark.parametrize("tenant_header", [None, "x-tenant-id"])
    def test_a_client_host_that_is_not_text_is_refused_without_an_error(
        self, host: object, tenant_header: str | None, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A server (or a test transport) that puts a host other than a str into
        scope["client"]: the peer is no trusted address, whatever a forwarding header names
        (no identity, never a server error), and the log blames no proxy headers."""
        resolve = trusted_header(tenant_header=tenant_header)
        headers = [(b"x-user-id", b"admin"), (b"x-forwarded-for", b"127.0.0.1")]
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            assert resolve(http_scope(headers, client=(host, 0))) is None
        assert caplog.records == []

    def test_a_proxy_that_connected_may_forward_its_clients_addresses(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The proxy's own connection (its socket's port) is the peer: forwarding headers
        that name its clients, even a client on its own host, change nothing."""
        resolve = trusted_header()
        alice = (b"x-user-id", b"alice")
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            for forwarding in (
                (b"x-forwarded-for", b"127.0.0.1"),
                (b"x-forwarded-for", b"203.0.113.9, 127.0.0.1:80"),
                (b"forwarded", b"for=127.0.0.1;proto=http"),
            ):
                scope = http_scope([alice, forwarding], client=("127.0.0.1", 50123))
                assert resolve(scope) == Identity("alice")
            # Only a colon after a bracketed host starts a port: no server reads 80 here.
            scope = http_scope([alice, (b"x-forwarded-for", b"[::1]x80")], client=("::1", 80))
            assert resolve(scope) == Identity("alice")
        assert caplog.records == []

    @pytest.mark.parametrize("tenant_header", [None, "x-tenant-id"])
    def test_an_untrusted_address_from_forwarding_headers_is_explained_once(
        self, tenant_header: str | None, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Behind a proxy on this host, uvicorn's default proxy headers put the proxy's
        client into scope["client"]: every request is refused, and the log says why, once,
        with a tenant header or without."""
        resolve = trusted_header(tenant_header=tenant_header)
        headers = [(b"x-user-id", b"alice"), (b"x-forwarded-for", b"203.0.113.9")]
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            # A request that asserts no identity (a health check) is no sign of it.
            assert resolve(http_scope(headers[1:], client=("203.0.113.9", 0))) is None
            assert caplog.records == []
            for _ in range(3):
                assert resolve(http_scope(headers, client=("203.0.113.9", 0))) is None
            assert resolve(http_scope(headers[:1], client=("203.0.113.9", 0))) is None
        assert [r.getMessage().count("203.0.113.9") for r in caplog.records] == [1]

    def test_unix_trusts_the_servers_unix_socket_and_nothing_else(self) -> None:
        """Over a Unix socket a request has no client address: uvicorn gives the socket's
        path as the server, hypercorn no server at all. A TCP request whose peer address is
        missing still has the server's port, and is not taken for the socket."""
        alice = [(b"x-user-id", b"alice")]
        over_socket = [
            {"client": None, "server": ("/run/app.sock", None)},
            {"client": None, "server": None},
        ]
        not_socket = [
            {"client": None, "server": ("127.0.0.1", 8000)},
            {"client": ("203.0.113.9", 4000), "server": ("/run/app.sock", None)},
        ]
        resolve = trusted_header(trusted=("unix",))
        both = trusted_header(trusted=("unix", "127.0.0.1/32"))
        default = trusted_header()
        for extra in over_socket:
            assert resolve(http_scope(alice, **extra)) == Identity("alice")
            assert default(http_scope(alice, **extra)) is None
        for extra in not_socket:
            assert resolve(http_scope(alice, **extra)) is None
        assert resolve(http_scope(alice)) is None  # 127.0.0.1 over TCP
        assert both(http_scope(alice)) == Identity("alice")
        with pytest.raises(ValueError, match="'unix', for the server's Unix socket"):
            trusted_header(trusted=("Unix",))


_ALICE = (b"x-user-id", b"alice")
_TENANT_CASES = [
    # (tenant_header, headers, status, user, tenant or problem detail)
    ("x-tenant-id", [_ALICE], 200, "alice", None),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"acme")], 200, "alice", "acme"),
    ("x-tenant-id", [(b"x-tenant-id", b"acme"), _ALICE], 200, "alice", "acme"),
    ("x-tenant-id", [_ALICE, (b"X-Tenant-ID", b"acme")], 200, "alice", "acme"),
    ("X-Tenant-Id", [_ALICE, (b"x-tenant-id", b"acme")], 200, "alice", "acme"),
    ("x-tenant-id", [_ALICE, (b"x_tenant_id", b"acme")], 200, "alice", None),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"a b")], 200, "alice", "a b"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", "ünï".encode())], 200, "alice", "ünï"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"")], 400, None, "tenant_id is invalid"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"\x00")], 400, None, "U+0000"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"\xff")], 400, None, "not valid UTF-8"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"\xff,")], 400, None, "not valid UTF-8"),
    ("x-tenant-id", [_ALICE, (b"x-tenant-id", b"a,b")], 400, None, "holds a comma"),
    (
        "x-tenant-id",
        [_ALICE, (b"x-tenant-id", b"acme"), (b"X-TENANT-ID", b"acme")],
        400,
        None,
        "the x-tenant-id header was sent 2 times",
    ),
    (
        "X-Tenant-ID",
        [_ALICE, *[(b"x-tenant-id", b"acme")] * 3],
        400,
        None,
        "the X-Tenant-ID header was sent 3 times",
    ),
    # the user header's errors come first
    (
        "x-tenant-id",
        [_ALICE, _ALICE, (b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")],
        400,
        None,
        "the x-user-id header was sent 2 times",
    ),
    (
        "x-tenant-id",
        [(b"x-user-id", b"\xff"), (b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")],
        400,
        None,
        "the x-user-id header is not valid UTF-8",
    ),
    (
        "x-tenant-id",
        [(b"x-user-id", b"a,b"), (b"x-tenant-id", b"\xff")],
        400,
        None,
        "the x-user-id header holds a comma",
    ),
    # no user, no identity, whatever the tenant header holds
    ("x-tenant-id", [(b"x-tenant-id", b"acme")], 401, None, "carried none"),
    ("x-tenant-id", [(b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")], 401, None, "carried none"),
    # the tenant header named as the user header, or as a forwarding header
    ("X-User-Id", [_ALICE], 200, "alice", "alice"),
    (
        "X-Forwarded-For",
        [_ALICE, (b"x-forwarded-for", b"10.0.0.1")],
        200,
        "alice",
        "10.0.0.1",
    ),
    ("forwarded", [_ALICE, (b"Forwarded", b"for=10.0.0.1")], 200, "alice", "for=10.0.0.1"),
    (
        "X-Forwarded-For",
        [_ALICE, (b"x-forwarded-for", b"10.0.0.1, 10.0.0.2")],
        400,
        None,
        "the X-Forwarded-For header holds a comma",
    ),
]


class TestTrustedHeaderTenants:
    @pytest.mark.parametrize(("tenant_header", "headers", "status", "user", "what"), _TENANT_CASES)
    async def test_a_tenant_header_gives_these_answers(
        self,
        tenant_header: str,
        headers: list[tuple[bytes, bytes]],
        status: int,
        user: str | None,
        what: str | None,
    ) -> None:
        """Every way a tenant header can be sent, named or configured, answered as
        documented: a repeated, joined or undecodable tenant is 400 after the user
        header's own checks, an empty or invalid one is refused as a context id."""
        app = AmbientMiddleware(
            _echo_app, registry=Registry(), identity=trusted_header(tenant_header=tenant_header)
        )
        for _ in range(2):  # what the resolver remembers changes no answer
            answered, _, body = await _exchange(app, http_scope(headers))
            assert answered == status, body
            if status == 200:
                assert (body["user"], body["tenant"]) == (user, what)
            else:
                assert what is not None
                assert what in body["detail"]

    @pytest.mark.parametrize(
        "tenant_header",
        ["", "X-TÉNANT", "x-租户", "x tenant", "x-tenant:", "x-t\r\nx-user-id", b"x-tenant-id"],
    )
    def test_a_tenant_header_name_no_request_can_carry_is_refused_at_construction(
        self, tenant_header: str
    ) -> None:
        """Such a name read no tenant at all (empty; a space, a colon or a line break, which
        no server passes in a header name), or let every trusted request fail with an error
        the middleware did not answer (not latin-1)."""
        with pytest.raises(ValueError, match="tenant_header must be a non-empty HTTP token"):
            trusted_header(tenant_header=tenant_header)

    @pytest.mark.parametrize(
        "name", ["", "X-ÜSER", "x-用户", "x user", "x-user:", "x-u\r\nx-a", b"x-user-id", None]
    )
    def test_a_user_header_name_no_request_can_carry_is_refused_at_construction(
        self, name: str
    ) -> None:
        """Such a name would never match a header (empty; a space, a colon or a line break:
        every request answered 401 without a word why), or fail every trusted request with
        an error the middleware does not answer (not latin-1): refused at start-up."""
        with pytest.raises(ValueError, match="header name must be a non-empty HTTP token"):
            trusted_header(name=name)

    @pytest.mark.parametrize("trusted", [(), []])
    def test_no_trusted_network_is_refused_at_construction(self, trusted: Any) -> None:
        """With no network to trust, no peer could ever assert an identity: every request
        would be 401 without a word why. Refused at start-up instead."""
        with pytest.raises(ValueError, match="trusted names no network"):
            trusted_header(trusted=trusted)

    async def test_untrusted_or_forwarded_peers_assert_no_tenant(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """From an untrusted peer, or a client address read from forwarding headers, the
        request has no identity (401), even with a tenant header that would be refused."""
        app = AmbientMiddleware(
            _echo_app, registry=Registry(), identity=trusted_header(tenant_header="x-tenant-id")
        )
        tenants = [(b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")]
        good = [_ALICE, (b"x-tenant-id", b"acme")]
        forwarded = [(b"x-forwarded-for", b"127.0.0.1")]
        modern = [(b"forwarded", b"for=127.0.0.1;proto=http")]
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            for headers, client in [
                (good, ("203.0.113.9", 4000)),
                ([_ALICE, *tenants], ("203.0.113.9", 4000)),
                ([*good, *forwarded], ("127.0.0.1", 0)),
                ([*good, *modern], ("127.0.0.1", 0)),
                ([_ALICE, *tenants, *forwarded], ("127.0.0.1", 0)),
            ]:
                for _ in range(2):
                    status, _, body = await _exchange(app, http_scope(headers, client=client))
                    assert status == 401, body
            status, _, body = await _exchange(app, http_scope(good))
            assert (status, body["tenant"]) == (200, "acme")
        assert len([r for r in caplog.records if "--no-proxy-headers" in r.getMessage()]) == 1

    @pytest.mark.parametrize(
        ("tenant_header", "forwarding"),
        [
            ("X-Forwarded-For", (b"x-forwarded-for", b"127.0.0.1")),
            ("Forwarded", (b"forwarded", b"for=127.0.0.1")),
        ],
    )
    def test_a_tenant_header_named_as_a_forwarding_header_still_reveals_a_forwarded_peer(
        self, tenant_header: str, forwarding: tuple[bytes, bytes]
    ) -> None:
        """A tenant read from a forwarding header is still a forwarding header: a client
        address the server read from it asserts nothing, tenant or user."""
        resolve = trusted_header(tenant_header=tenant_header)
        assert resolve(http_scope([_ALICE, forwarding], client=("127.0.0.1", 0))) is None
        found = resolve(http_scope([_ALICE, forwarding], client=("127.0.0.1", 4000)))
        assert found == Identity("alice", forwarding[1].decode())

    def test_what_it_remembers_never_bypasses_a_check(self) -> None:
        """A user and tenant seen before are still refused from an untrusted peer, with a
        repeated tenant, or another tenant's header joined in; each tenant of a user is
        its own, and ids keep resolving past the memo's bound."""
        resolve = trusted_header(tenant_header="x-tenant-id")
        trusted = {"client": ("127.0.0.1", 4000)}
        untrusted = {"client": ("203.0.113.9", 4000)}
        acme = [_ALICE, (b"x-tenant-id", b"acme")]
        assert resolve(http_scope(acme, **trusted)) == Identity("alice", "acme")
        assert resolve(http_scope(acme, **trusted)) == Identity("alice", "acme")
        assert resolve(http_scope([_ALICE], **trusted)) == Identity("alice")
        assert resolve(http_scope([_ALICE], **trusted)) == Identity("alice")
        globex = [_ALICE, (b"x-tenant-id", b"globex")]
        assert resolve(http_scope(globex, **trusted)) == Identity("alice", "globex")
        assert resolve(http_scope(acme, **untrusted)) is None
        with pytest.raises(IdentityError, match="x-tenant-id header was sent 2 times"):
            resolve(http_scope([*acme, acme[1]], **trusted))
        with pytest.raises(IdentityError, match="x-user-id header was sent 2 times"):
            resolve(http_scope([*acme, _ALICE], **trusted))
        for number in range(3000):  # more identities than it keeps
            user, tenant = f"user-{number}", f"tenant-{number % 7}"
            headers = [(b"x-user-id", user.encode()), (b"x-tenant-id", tenant.encode())]
            assert resolve(http_scope(headers, **trusted)) == Identity(user, tenant)
        assert resolve(http_scope(acme, **trusted)) == Identity("alice", "acme")


class TestJwtBearer:
    def test_a_valid_token_gives_its_subject_and_claims(self) -> None:
        identity = hs_resolver(tenant_claim="org")(bearer(token({"org": "acme"})))
        assert identity == Identity(
            "alice", "acme", identity.claims, expires_at=identity.expires_at
        )
        assert identity.claims["aud"] == AUDIENCE

    def test_the_identity_expires_with_the_token_and_its_leeway(self) -> None:
        exp = int(time.time()) + 600
        assert hs_resolver(leeway=0)(bearer(token({"exp": exp}))).expires_at == exp
        assert hs_resolver(leeway=30)(bearer(token({"exp": exp}))).expires_at == exp + 30
        unlimited = hs_resolver(require=())(bearer(token({"exp": None})))
        assert unlimited.expires_at is None

    def test_a_tokens_claims_cannot_be_changed(self) -> None:
        """The claims of a token's identity are read-only, as the context's metadata is."""
        identity = hs_resolver(tenant_claim="org")(bearer(token({"org": "acme"})))
        with pytest.raises(TypeError, match="does not support changes"):
            identity.claims["org"] = "other"  # type: ignore[index]
        assert identity.claims["org"] == "acme"

    def test_no_authorization_header_is_no_identity(self) -> None:
        assert hs_resolver()(http_scope([])) is None

    @pytest.mark.parametrize(
        ("claims", "reason"),
        [
            ({"exp": int(time.time()) - 3600}, "expired"),
            ({"nbf": int(time.time()) + 3600}, "not valid yet (nbf or iat)"),
            ({"iat": int(time.time()) + 3600}, "not valid yet (nbf or iat)"),
            ({"aud": "someone-else"}, "another audience"),
            ({"aud": None}, "lacks the 'aud' claim"),  # audience= given: aud is required
            ({"iss": "https://evil.test"}, "wrong issuer"),
            ({"exp": None}, "lacks the 'exp' claim"),
            ({"sub": None}, "lacks the 'sub' claim"),
            ({"sub": 42}, "malformed"),
        ],
    )
    def test_each_broken_rule_is_a_401_naming_it(self, claims: dict[str, Any], reason: str) -> None:
        with pytest.raises(IdentityError) as refused:
            hs_resolver()(bearer(token(claims)))
        assert refused.value.http_status == 401
        assert reason in str(refused.value)

    @pytest.mark.parametrize("value", [42, 4.2, True, ["alice"], {"id": "alice"}])
    def test_a_user_or_tenant_claim_that_is_no_string_is_a_401_naming_it(
        self, value: object
    ) -> None:
        """A custom ``user_claim`` or ``tenant_claim`` (PyJWT checks only ``sub``) holding a
        number, a list or an object is a token that fails validation: 401 naming the
        claim, never an identity whose id is not a string."""
        with pytest.raises(IdentityError, match="'uid' claim is not a string") as refused:
            hs_resolver(user_claim="uid")(bearer(token({"uid": value})))
        assert refused.value.http_status == 401
        assert refused.value.challenge == 'Bearer error="invalid_token"'
        with pytest.raises(IdentityError, match="'org' claim is not a string") as refused:
            hs_resolver(tenant_claim="org")(bearer(token({"org": value})))
        assert refused.value.http_status == 401
        assert refused.value.challenge == 'Bearer error="invalid_token"'

    def test_audiences_given_as_an_iterator_serve_every_request(self) -> None:
        """``audience=`` is any iterable of strings: a generator (or ``map``) used to be
        used up by the first token, after which every valid token was refused as "for
        another audience"."""
        resolver = jwt_bearer(
            SECRET,
            algorithms=["HS256"],
            issuer=ISSUER,
            audience=(name for name in ("other-api", AUDIENCE)),
        )
        for user in ("alice", "bob", "carol"):
            assert resolver(bearer(token({"sub": user}))).user_id == user
        with pytest.raises(IdentityError, match="another audience"):
            resolver(bearer(token({"aud": "someone-else"})))

    def test_without_an_audience_a_token_naming_one_is_refused(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """RFC 7519: a service not among a token's audiences must refuse it. Without
        ``audience=`` every token was accepted, one meant for another service (an ID token,
        another API's access token from the same issuer) included. A token without ``aud``
        is still accepted; the operator is told once what to configure."""
        resolver = jwt_bearer(SECRET, algorithms=["HS256"], issuer=ISSUER)
        assert resolver(bearer(token({"sub": "alice", "aud": None}))).user_id == "alice"
        for aud in ("another-api", [AUDIENCE, "another-api"]):
            with pytest.raises(IdentityError) as refused:
                resolver(bearer(token({"aud": aud})))
            assert refused.value.http_status == 401
            assert "this service accepts none" in str(refused.value)
        warnings = [r for r in caplog.records if "audience=" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING

    @pytest.mark.parametrize("audience", [[], [""], [AUDIENCE, b"api"], ""])
    def test_an_audience_no_token_could_match_is_refused_at_once(self, audience: Any) -> None:
        """An empty list of audiences would refuse every token at request time."""
        with pytest.raises(ValueError, match="audience must be a non-empty string"):
            jwt_bearer(SECRET, algorithms=["HS256"], audience=audience)

    @pytest.mark.parametrize("require", ["exp", ["exp", "iat"], ("exp",)])
    def test_required_claims_given_as_one_name_or_several_are_claims_not_letters(
        self, require: Any
    ) -> None:
        """``require="exp"`` is the claim ``exp``: it was read as the claims ``e``, ``x``
        and ``p``, which no token carries, so every token was 401. A token without a
        required claim is still refused."""
        resolve = hs_resolver(require=require)
        assert resolve(bearer(token({"sub": "alice"}))).user_id == "alice"
        with pytest.raises(IdentityError, match="exp"):
            resolve(bearer(token({"sub": "alice", "exp": None})))

    @pytest.mark.parametrize(
        ("options", "error", "words"),
        [
            ({"user_claim": ""}, ValueError, "user_claim must be a claim's name"),
            ({"user_claim": None}, TypeError, "user_claim must be a claim's name"),
            ({"tenant_claim": ""}, ValueError, "tenant_claim must be a claim's name"),
            ({"tenant_claim": 7}, TypeError, "tenant_claim must be a claim's name"),
            ({"require": ["exp", ""]}, ValueError, "require must name claims"),
            ({"require": [b"exp"]}, TypeError, "require must name claims"),
            ({"require": 7}, TypeError, "require must be claim names"),
        ],
    )
    def test_claim_names_no_token_could_carry_are_refused_at_once(
        self, options: dict[str, Any], error: type[Exception], words: str
    ) -> None:
        """An empty claim name (or one that is no str) was taken, and every token was 401
        at request time: no token carries it, or a tenant claim named nothing was read."""
        with pytest.raises(error, match=words):
            hs_resolver(**options)

    def test_leeway_tolerates_small_clock_skew_only(self) -> None:
        just_expired = token({"exp": int(time.time()) - 10})
        assert hs_resolver(leeway=30)(bearer(just_expired)) is not None
        with pytest.raises(IdentityError, match="expired"):
            hs_resolver(leeway=0)(bearer(just_expired))

    @pytest.mark.parametrize(
        ("leeway", "error"),
        [
            (math.inf, ValueError),  # every expired token would pass
            (math.nan, ValueError),  # every valid token would be a 500
            (-1.0, ValueError),  # every token would be refused as not valid yet
            (10**400, ValueError),  # past what a float holds: was an OverflowError
            (datetime.timedelta(seconds=30), TypeError),  # PyJWT's form: a 500 per token
            ("30", TypeError),
            (True, TypeError),
        ],
    )
    def test_a_leeway_that_is_not_seconds_of_skew_is_refused_at_once(
        self, leeway: Any, error: type[Exception]
    ) -> None:
        """Tokens are checked against ``leeway`` only at request time: a value no check can
        use must fail where it is configured, not in every request (or pass them all)."""
        with pytest.raises(error, match="leeway"):
            hs_resolver(leeway=leeway)

    @pytest.mark.parametrize(
        ("seconds", "error", "words"),
        [
            (-1.0, ValueError, ">= 0"),
            (math.nan, ValueError, ">= 0"),
            (math.inf, ValueError, "finite"),  # a key set fetched once would serve for ever
            pytest.param(10**400, ValueError, "finite", id="10**400"),
            (datetime.timedelta(hours=1), TypeError, "int or float"),
            ("3600", TypeError, "int or float"),
            (None, TypeError, "int or float"),
            (True, TypeError, "int or float"),
        ],
    )
    def test_a_stale_keys_for_that_is_not_seconds_is_refused_at_once(
        self, seconds: Any, error: type[Exception], words: str
    ) -> None:
        with pytest.raises(error, match="stale_keys_for") as refused:
            hs_resolver(stale_keys_for=seconds)
        assert words in str(refused.value)
        for fine in (0, 0.5, 600, 3600.0):
            assert hs_resolver(stale_keys_for=fine)

    def test_alg_none_is_refused(self) -> None:
        with pytest.raises(IdentityError, match="algorithm"):
            hs_resolver()(bearer(unsigned()))

    def test_a_tampered_payload_fails_the_signature(self) -> None:
        header, payload, signature = token().split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["sub"] = "admin"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        with pytest.raises(IdentityError, match="signature"):
            hs_resolver()(bearer(f"{header}.{forged}.{signature}"))

    def test_a_token_signed_with_another_secret_is_refused(self) -> None:
        with pytest.raises(IdentityError, match="signature"):
            hs_resolver()(bearer(token(key="another-secret-that-is-long-enough!!")))

    def test_hmac_signed_with_the_public_key_is_refused_by_an_rsa_resolver(self) -> None:
        """The key-confusion attack: the attacker signs HS256 with the published key."""
        resolver = jwt_bearer(PUBLIC_PEM, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
        assert resolver(bearer(token(key=PRIVATE_KEY, alg="RS256"))).user_id == "alice"
        header = {"alg": "HS256", "typ": "JWT"}
        now = int(time.time())
        payload = json.dumps(
            {"sub": "admin", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600}
        ).encode()
        # Sign by hand: PyJWT itself refuses to use a PEM key as an HMAC secret.
        import hashlib
        import hmac

        def b64(data: bytes) -> bytes:
            return base64.urlsafe_b64encode(data).rstrip(b"=")

        signing_input = b64(json.dumps(header).encode()) + b"." + b64(payload)
        mac = hmac.new(PUBLIC_PEM, signing_input, hashlib.sha256).digest()
        confused = (signing_input + b"." + b64(mac)).decode()
        with pytest.raises(IdentityError, match="algorithm"):
            resolver(bearer(confused))

    def test_one_algorithm_given_as_a_str_is_that_algorithm(self) -> None:
        """``algorithms="HS256"`` is the one algorithm, not its letters (none of which
        PyJWT knows: the resolver would be refused at construction)."""
        resolver = jwt_bearer(SECRET, algorithms="HS256", audience=AUDIENCE, issuer=ISSUER)
        assert resolver(bearer(token())).user_id == "alice"

    def test_construction_refuses_dangerous_configurations(self) -> None:
        for unsigned in ("none", "None", "NONE"):
            # Refused as unsigned whatever its case, not as a name PyJWT does not know.
            with pytest.raises(ValueError, match="refuses the 'none' algorithm"):
                jwt_bearer(SECRET, algorithms=[unsigned])
        with pytest.raises(ValueError, match="at least one algorithm"):
            jwt_bearer(SECRET, algorithms=[])
        with pytest.raises(ValueError, match="cannot mix"):
            jwt_bearer(SECRET, algorithms=["HS256", "RS256"])
        with pytest.raises(ValueError, match="key-confusion"):
            jwt_bearer(PUBLIC_PEM, algorithms=["HS256"])

    @pytest.mark.parametrize(
        ("algorithms", "signed"),
        [(["HS256", "HS256"], "HS256"), (["HS256", "HS384", "HS256"], "HS256")],
    )
    def test_an_algorithm_named_twice_is_that_algorithm(
        self, algorithms: list[str], signed: str
    ) -> None:
        """An HMAC algorithm listed twice is one family, not a mix of two refused as key
        confusion: the resolver is made and verifies tokens of it."""
        resolve = jwt_bearer(SECRET, algorithms=algorithms, audience=AUDIENCE, issuer=ISSUER)
        assert resolve(bearer(token(alg=signed))).user_id == "alice"

    @pytest.mark.parametrize("algorithm", [None, b"HS256", 256])
    def test_an_algorithm_that_is_no_name_is_a_type_error_naming_it(
        self, algorithm: object
    ) -> None:
        """An algorithm that is not a str is refused at construction for what it is, not
        with an AttributeError from inside the check."""
        with pytest.raises(TypeError, match="algorithms must be names"):
            jwt_bearer(SECRET, algorithms=["HS256", algorithm])  # type: ignore[list-item]

    @pytest.mark.parametrize("algorithms", [["HS256"], ["HS384", "HS512"]])
    def test_hmac_with_a_key_set_client_is_refused_when_configured(
        self, algorithms: list[str]
    ) -> None:
        """A key set fetched from a URL is public: a secret key in it would let anyone who
        reads it sign tokens, so HMAC algorithms with a PyJWKClient are refused at once."""
        client = jwt.PyJWKClient("http://127.0.0.1:9/.well-known/jwks.json", timeout=1)
        with pytest.raises(ValueError, match="cannot verify HMAC algorithms with a PyJWKClient"):
            jwt_bearer(client, algorithms=algorithms)

    def test_an_hmac_secret_pyjwt_refuses_for_another_reason_is_named_for_it(self) -> None:
        """An empty secret, or a JWK given as its JSON text, was refused as "a public key or
        certificate; that is the key-confusion attack": the wrong mistake to look for."""
        for empty in ("", b""):
            with pytest.raises(ValueError, match="secret given is empty"):
                jwt_bearer(empty, algorithms=["HS256"])
        secret = b"a-json-web-key-secret-of-40-bytes-long!!"
        encoded = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
        jwk = json.dumps({"kty": "oct", "k": encoded})
        with pytest.raises(ValueError, match="JWK as text: give it as a dict"):
            jwt_bearer(jwk, algorithms=["HS256"])
        resolver = jwt_bearer(json.loads(jwk), algorithms=["HS256"], audience=AUDIENCE)
        assert resolver(bearer(token(key=secret))).user_id == "alice"

    def test_an_hmac_secret_that_is_a_key_set_as_text_is_named_for_it(self) -> None:
        """A key set given as its JSON text, as a JWK is, was refused as "a public key or
        certificate; that is the key-confusion attack"; as a dict it verifies tokens."""
        secret = b"a-json-web-key-secret-of-40-bytes-long!!"
        encoded = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
        jwks = json.dumps({"keys": [{"kty": "oct", "k": encoded, "kid": "k1"}]})
        for text in (jwks, jwks.encode()):
            with pytest.raises(ValueError, match="key set as text: give it as a dict"):
                jwt_bearer(text, algorithms=["HS256"])
        resolver = jwt_bearer(json.loads(jwks), algorithms=["HS256"], audience=AUDIENCE)
        assert resolver(bearer(token(key=secret, kid="k1"))).user_id == "alice"

    @pytest.mark.parametrize("shape", ["list", "member"])
    def test_an_hmac_secret_that_is_json_holding_a_jwk_is_named_for_it(self, shape: str) -> None:
        """JSON text holding a JWK deeper than at its top (a list of JWKs, a JWK as a member
        of an object), which PyJWT refuses as a secret as it refuses a JWK, was refused as
        "a public key or certificate; that is the key-confusion attack"."""
        jwk = {"kty": "oct", "k": "c2VjcmV0"}
        text = json.dumps([jwk] if shape == "list" else {"key": jwk})
        with pytest.raises(ValueError, match="JSON text holding a JWK") as refused:
            jwt_bearer(text, algorithms=["HS256"])
        assert "key-confusion" not in str(refused.value)

    def test_an_hmac_secret_nested_past_the_json_parsers_limit_is_refused_as_a_value(
        self,
    ) -> None:
        """A secret PyJWT refuses as JSON text nested too deep to parse is refused with
        ``ValueError`` at construction, as any other refused secret, not ``RecursionError``
        from looking at it again."""
        for nested in ('{"k": ' + "[" * 100_000, b'{"k": ' + b"[" * 100_000):
            with pytest.raises(ValueError, match="HMAC"):
                jwt_bearer(nested, algorithms=["HS256"])

    @pytest.mark.parametrize("encoding", ["PEM", "DER", "OpenSSH"])
    def test_an_hmac_secret_that_is_a_public_key_is_refused_in_any_encoding(
        self, encoding: str
    ) -> None:
        """A public key is no HMAC secret, however it is encoded: a DER key (bytes with no
        BEGIN line) would otherwise be taken as one, and every request then refused."""
        from cryptography.hazmat.primitives import serialization

        public = PRIVATE_KEY.public_key().public_bytes(
            getattr(serialization.Encoding, encoding),
            serialization.PublicFormat.OpenSSH
            if encoding == "OpenSSH"
            else serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        with pytest.raises(ValueError, match="key-confusion"):
            jwt_bearer(public, algorithms=["HS256"])
        if encoding != "DER":  # text encodings are also passed as str
            with pytest.raises(ValueError, match="key-confusion"):
                jwt_bearer(public.decode(), algorithms=["HS384", "HS512"])

    def test_a_jwks_selects_the_key_by_kid(self) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
        resolver = jwt_bearer({"keys": [jwk]}, algorithms=["RS256"], audience=AUDIENCE)
        good = token(key=PRIVATE_KEY, alg="RS256", kid="k1")
        assert resolver(bearer(good)).user_id == "alice"
        with pytest.raises(IdentityError, match="not trusted"):
            resolver(bearer(token(key=PRIVATE_KEY, alg="RS256", kid="k2")))
        with pytest.raises(IdentityError, match="names no key"):
            resolver(bearer(token(key=PRIVATE_KEY, alg="RS256")))

    def test_a_jwks_key_meant_for_encryption_verifies_no_signature(self) -> None:
        """``"use": "enc"`` marks a key for encryption only (RFC 7517): a token naming it
        is not trusted, as PyJWKClient already filters such keys out of a fetched set."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        for use, trusted in (("enc", False), ("sig", True), (None, True)):
            key = {**jwk, "kid": "k1", "alg": "RS256", **({"use": use} if use else {})}
            signing = {**jwk, "kid": "k2", "alg": "RS256", "use": "sig"}  # a usable set
            resolver = jwt_bearer({"keys": [key, signing]}, algorithms=["RS256"], audience=AUDIENCE)
            good = bearer(token(key=PRIVATE_KEY, alg="RS256", kid="k1"))
            if trusted:
                assert resolver(good).user_id == "alice"
            else:
                with pytest.raises(IdentityError, match="not trusted") as refused:
                    resolver(good)
                assert refused.value.status == 401

    def test_a_single_jwk_meant_for_encryption_is_refused_when_configured(self) -> None:
        """A lone JWK (not a set) marked ``"use": "enc"`` was used to verify signatures,
        unlike the same key in a set: refused where it is configured."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        with pytest.raises(ValueError, match="'enc'"):
            jwt_bearer({**jwk, "use": "enc"}, algorithms=["RS256"], audience=AUDIENCE)
        resolver = jwt_bearer({**jwk, "use": "sig"}, algorithms=["RS256"], audience=AUDIENCE)
        assert resolver(bearer(token(key=PRIVATE_KEY, alg="RS256"))).user_id == "alice"

    def test_keys_that_verify_none_of_the_algorithms_are_refused_when_configured(self) -> None:
        """PyJWT verifies with a JWK only tokens of the JWK's own algorithm: a JWK, or a key
        set, with no signing key for any of ``algorithms`` would refuse every token (401s
        for all, from a typo in the configuration). Refused where it is configured."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        rs256 = {**jwk, "kid": "k1", "alg": "RS256"}
        with pytest.raises(ValueError, match="verifies RS256 tokens only"):
            jwt_bearer(rs256, algorithms=["HS256"])
        with pytest.raises(ValueError, match="verifies RS256 tokens only"):
            jwt_bearer(rs256, algorithms=["RS512"])
        with pytest.raises(ValueError, match=r"no signing key of the key set .* \['RS256'\]"):
            jwt_bearer({"keys": [{**rs256, "use": "enc"}]}, algorithms=["RS256"])
        with pytest.raises(ValueError, match=r"its keys are for \['RS256'\]"):
            jwt_bearer({"keys": [rs256]}, algorithms=["ES256"])
        resolver = jwt_bearer({"keys": [rs256]}, algorithms=["ES256", "RS256"], audience=AUDIENCE)
        assert resolver(bearer(token(key=PRIVATE_KEY, alg="RS256", kid="k1"))).user_id == "alice"

    @pytest.mark.parametrize(
        ("key", "algorithms"),
        [
            (PRIVATE_KEY, ["RS256"]),
            (
                PRIVATE_KEY.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                ["RS256", "PS256"],
            ),
            (PRIVATE_KEY.public_key(), ["HS256"]),
            (None, ["HS256"]),
            (SECRET, ["RS256"]),
            (
                jwt.PyJWKSet.from_dict(
                    {"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY))]}
                ),
                ["RS256"],
            ),
        ],
        ids=["private-key", "private-pem", "public-for-hmac", "none", "secret-for-rsa", "key-set"],
    )
    def test_a_key_that_verifies_no_token_is_refused_when_configured(
        self, key: Any, algorithms: list[str]
    ) -> None:
        """A key with which none of the algorithms verifies a signature (a private key for
        its public key, a key object of another kind, a key set object for its dict) was
        taken, and PyJWT failed at each token: a 500 (TypeError, AttributeError) for every
        request with a token, or a 401 for every one. Refused where it is configured."""
        with pytest.raises(ValueError, match="cannot verify tokens"):
            jwt_bearer(key, algorithms=algorithms)

    def test_a_public_key_object_or_pem_verifies(self) -> None:
        for key in (PRIVATE_KEY.public_key(), PUBLIC_PEM, PUBLIC_PEM.decode()):
            resolver = jwt_bearer(key, algorithms=["RS256"], audience=AUDIENCE)
            assert resolver(bearer(token(key=PRIVATE_KEY, alg="RS256"))).user_id == "alice"

    @pytest.mark.parametrize("algorithms", [["HS257"], ["RS256", "rs256"]])
    def test_an_algorithm_pyjwt_does_not_know_is_refused_when_configured(
        self, algorithms: list[str]
    ) -> None:
        """A misspelt algorithm verified no token (every one of it a 401)."""
        with pytest.raises(ValueError, match="does not know the algorithm"):
            jwt_bearer(PUBLIC_PEM if "RS256" in algorithms else SECRET, algorithms=algorithms)

    @pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
    def test_the_scheme_is_case_insensitive(self, scheme: str) -> None:
        """RFC 9110 (11.1): the auth scheme is case-insensitive, so a client writing
        ``bearer`` or ``BEARER`` sends a bearer token like one writing ``Bearer``."""
        good = token()
        identity = hs_resolver()(http_scope([(b"authorization", f"{scheme} {good}".encode())]))
        assert identity is not None
        assert identity.user_id == "alice"

    @pytest.mark.parametrize(
        "headers",
        [
            [(b"authorization", b"Basic YWxpY2U6cHc=")],
            [(b"authorization", b"Digest username=alice")],
            [(b"authorization", b"bearertoken")],
        ],
    )
    def test_another_authorization_scheme_is_401(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Credentials of another scheme are no bearer token: 401, as for none at all."""
        with pytest.raises(IdentityError, match="not 'Bearer <token>'") as refused:
            hs_resolver()(http_scope(headers))
        assert refused.value.http_status == 401

    @pytest.mark.parametrize(
        ("headers", "reason"),
        [
            ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], "2 times"),
            ([(b"Authorization", b"Bearer a"), (b"authorization", b"Basic YQ==")], "2 times"),
            ([(b"authorization", b"Bearer ")], "no token"),
            ([(b"authorization", b"Bearer   ")], "no token"),
            ([(b"authorization", b"Bearer")], "no token"),
            ([(b"authorization", b"Bearer \xff")], "not valid UTF-8"),
        ],
    )
    def test_a_malformed_bearer_request_is_400(
        self, headers: list[tuple[bytes, bytes]], reason: str
    ) -> None:
        """RFC 6750 invalid_request: a repeated header or a Bearer scheme without its token
        is a malformed request (400), never "first wins" and never an unchecked credential."""
        with pytest.raises(IdentityError, match=reason) as refused:
            hs_resolver()(http_scope(headers))
        assert refused.value.http_status == 400

    def test_a_websocket_may_carry_the_token_as_subprotocol(self) -> None:
        scope = http_scope([], type="websocket", subprotocols=["bearer", token()])
        assert hs_resolver()(scope).user_id == "alice"
        scope = http_scope([], type="websocket", subprotocols=["chat", "bearer", token(), "v2"])
        assert hs_resolver()(scope).user_id == "alice"
        scope = http_scope([(b"authorization", f"Bearer {token()}".encode())], type="websocket")
        assert hs_resolver()(scope).user_id == "alice"

    @pytest.mark.parametrize(
        ("headers", "subprotocols", "reason"),
        [
            ([], ["bearer"], "not followed by a token"),
            ([], ["chat", "bearer", ""], "not followed by a token"),
            ([], ["bearer", " \t "], "not followed by a token"),
            ([], ["bearer", "t1", "bearer", "t2"], "2 times"),
            ([], ["bearer", "bearer"], "2 times"),
            ([(b"authorization", b"Bearer t1")], ["bearer", "t2"], "both"),
            ([(b"authorization", b"Basic YQ==")], ["bearer", "t2"], "both"),
        ],
    )
    def test_a_malformed_websocket_bearer_request_is_400(
        self, headers: list[tuple[bytes, bytes]], subprotocols: list[str], reason: str
    ) -> None:
        """One token, sent one way: a token in the header and in the subprotocol (the header
        used to win silently), a repeated ``bearer`` or one without its token is 400."""
        scope = http_scope(headers, type="websocket", subprotocols=subprotocols)
        with pytest.raises(IdentityError, match=reason) as refused:
            hs_resolver()(scope)
        assert refused.value.http_status == 400
        assert "t1" not in str(refused.value)
        assert "t2" not in str(refused.value)

    def test_a_valid_token_sent_two_ways_is_still_refused(self) -> None:
        """Even when both copies are the same valid token: which one counts is not guessed."""
        good = token()
        scope = http_scope(
            [(b"authorization", f"Bearer {good}".encode())],
            type="websocket",
            subprotocols=["bearer", good],
        )
        with pytest.raises(IdentityError, match="both") as refused:
            hs_resolver()(scope)
        assert refused.value.http_status == 400

    async def test_through_the_middleware_a_bad_token_is_a_401_problem(self) -> None:
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver())
        bad = token({"exp": int(time.time()) - 3600})
        status, body, bound = await _call(app, bearer(bad))
        assert status == 401
        assert "expired" in body["detail"]
        assert bad not in json.dumps(body)
        assert bound is None

    @pytest.mark.parametrize(
        ("headers", "reason"),
        [
            ([(b"authorization", b"Bearer "), (b"authorization", b"Bearer b")], "2 times"),
            ([(b"authorization", b"Bearer ")], "no token"),
        ],
    )
    async def test_through_the_middleware_a_malformed_bearer_request_is_a_400_problem(
        self, headers: list[tuple[bytes, bytes]], reason: str
    ) -> None:
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver())
        status, body, bound = await _call(app, http_scope(headers))
        assert status == 400
        assert body["status"] == 400
        assert reason in body["detail"]
        assert bound is None

    async def test_through_the_middleware_a_token_sent_two_ways_refuses_the_websocket(
        self,
    ) -> None:
        good = token()
        scope = http_scope(
            [(b"authorization", f"Bearer {good}".encode())],
            type="websocket",
            subprotocols=["bearer", good],
            extensions={"websocket.http.response": {}},
        )
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver())
        sent = await _handshake(app, scope)
        assert [m["type"] for m in sent] == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert sent[0]["status"] == 400
        body = json.loads(sent[1]["body"])
        assert body["status"] == 400
        assert "both" in body["detail"]
        assert good not in json.dumps(body)
        assert ambient.current_context_or_none() is None


def _challenge_app(identity: Any) -> httpx.AsyncClient:
    app = AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def _problem_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == response.status_code
    return body


INVALID_TOKEN = 'Bearer error="invalid_token"'
INVALID_REQUEST = 'Bearer error="invalid_request"'


class TestChallenges:
    """RFC 9110 15.5.2: a 401 carries ``WWW-Authenticate``; RFC 6750 3 says which."""

    @pytest.mark.parametrize(
        ("headers", "status", "challenge"),
        [
            ([], 401, "Bearer"),
            ([(b"authorization", b"Basic YWxpY2U6cHc=")], 401, "Bearer"),
            ([(b"authorization", f"Bearer {token({'exp': 1})}".encode())], 401, INVALID_TOKEN),
            ([(b"authorization", f"Bearer {token(key='x' * 40)}".encode())], 401, INVALID_TOKEN),
            ([(b"authorization", f"Bearer {token({'aud': 'else'})}".encode())], 401, INVALID_TOKEN),
            ([(b"authorization", f"Bearer {token({'sub': 7})}".encode())], 401, INVALID_TOKEN),
            ([(b"authorization", b"Bearer not.a.jwt")], 401, INVALID_TOKEN),
            ([(b"authorization", b"Bearer ")], 400, INVALID_REQUEST),
            (
                [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")],
                400,
                INVALID_REQUEST,
            ),
            ([(b"authorization", b"Bearer \xff")], 400, INVALID_REQUEST),
        ],
    )
    async def test_jwt_bearer_answers_carry_the_rfc_6750_challenge(
        self, headers: list[tuple[bytes, bytes]], status: int, challenge: str
    ) -> None:
        """No token or another scheme: ``Bearer``; a token that fails a check:
        ``error="invalid_token"``; a malformed request: ``error="invalid_request"``. The
        problem+json body is unchanged. Before, no answer had the header."""
        async with _challenge_app(hs_resolver()) as http:
            response = await http.get("/", headers=headers)
            good = await http.get("/", headers={"authorization": f"Bearer {token()}"})
        assert response.status_code == status
        assert response.headers.get_list("www-authenticate") == [challenge]
        body = _problem_of(response)
        assert body["type"].startswith("urn:ambient:problem:")
        assert good.status_code == 200
        assert "www-authenticate" not in good.headers

    async def test_a_key_set_without_the_tokens_key_is_invalid_token(self) -> None:
        """A token whose ``kid`` the key set lacks (or that names none) is a token that
        fails validation; it was a 401 without a challenge."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        resolver = jwt_bearer(
            {"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}, algorithms=["RS256"]
        )
        async with _challenge_app(resolver) as http:
            for kid in ("k2", None):
                signed = token(key=PRIVATE_KEY, alg="RS256", **({"kid": kid} if kid else {}))
                response = await http.get("/", headers={"authorization": f"Bearer {signed}"})
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == INVALID_TOKEN

    async def test_the_401_offers_the_challenges_of_its_resolvers(self) -> None:
        """``first_of`` offers every scheme once; a 401 raised by a resolver without a
        scheme of its own (a ticket) gets them too. A resolver whose credential has no
        standard scheme (a trusted proxy's header) has no challenge to offer."""
        tickets = WebSocketTickets()
        cases: list[tuple[Any, str | None]] = [
            (first_of(trusted_header(), hs_resolver()), "Bearer"),
            (first_of(hs_resolver(), first_of(trusted_header(), hs_resolver())), "Bearer"),
            (first_of(tickets, hs_resolver()), "Bearer"),
            (trusted_header(), None),
            (first_of(trusted_header(), scope_user()), None),
        ]
        for resolver, challenge in cases:
            async with _challenge_app(resolver) as http:
                response = await http.get("/", headers={"x-user-id": "mallory"})
            assert response.status_code == 401
            _problem_of(response)
            assert response.headers.get("www-authenticate") == challenge, resolver
        # A refused ticket (401) on a websocket that offers bearer tokens as well.
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=cases[2][0])
        scope = http_scope(
            [],
            type="websocket",
            query_string=b"ticket=" + b"t" * 43,
            subprotocols=[],
            extensions={"websocket.http.response": {}},
        )
        sent = await _handshake(app, scope)
        assert sent[0]["status"] == 401
        assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]

    async def test_a_refused_websocket_handshake_carries_the_challenge(self) -> None:
        """Over the denial-response extension a 401 handshake has the header too."""
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver())
        expired = token({"exp": 1})
        for subprotocols, challenge in (([], "Bearer"), (["bearer", expired], INVALID_TOKEN)):
            scope = http_scope(
                [],
                type="websocket",
                subprotocols=subprotocols,
                extensions={"websocket.http.response": {}},
            )
            sent = await _handshake(app, scope)
            assert sent[0]["type"] == "websocket.http.response.start"
            assert sent[0]["status"] == 401
            challenges = [
                value for name, value in sent[0]["headers"] if name == b"www-authenticate"
            ]
            assert challenges == [challenge.encode()]

    async def test_an_app_raising_a_401_gets_the_resolvers_challenge(self) -> None:
        """An IdentityError(401) the app raises before answering is answered by the
        middleware with the resolver's challenge; it had none."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise IdentityError("this run belongs to someone else", status=401)

        middleware = AmbientMiddleware(app, registry=Registry(), identity=hs_resolver())
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/", headers={"authorization": f"Bearer {token()}"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"

    def test_a_challenge_must_be_a_header_value(self) -> None:
        """An error's challenge becomes its problem's header, and nothing that would break
        the header (or add another) is accepted."""
        for bad in ("", " ", "Bearer\r\nSet-Cookie: x=1", "Bearer é", 7):
            with pytest.raises(ValueError, match="challenge"):
                IdentityError("x", status=401, challenge=bad)  # type: ignore[arg-type]
        error = IdentityError("x", status=401, challenge='Basic realm="app"')
        assert Problem.from_error(error).headers == [(b"www-authenticate", b'Basic realm="app"')]

    @pytest.mark.parametrize("status", [200, 403, 500, "401", 401.0, 400.0, True])
    def test_an_identity_error_answers_400_or_401_only(self, status: object) -> None:
        """An IdentityError is a refusal of the client's identity: any other status (a
        403, a 5xx, the 401 as a str) is refused where it is made, not sent as the
        problem's status with the error's own message, which a 5xx must never show. A
        401.0 is no status either: the answer's start and its body would carry the
        float."""
        with pytest.raises(ValueError, match="must be 400 or 401"):
            IdentityError("x", status=status)  # type: ignore[arg-type]
        for allowed in (400, 401):
            error = IdentityError("x", status=allowed)
            assert (error.status, error.http_status) == (allowed, allowed)

    def test_on_uvicorn(self) -> None:
        """A real server sends the header, for an HTTP request and a websocket handshake."""
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        from tests.servers import serve

        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver())
        with serve("uvicorn", app) as url:
            none = httpx.get(url)
            expired = httpx.get(url, headers={"authorization": f"Bearer {token({'exp': 1})}"})
            with pytest.raises(InvalidStatus) as refused:
                connect(url.replace("http", "ws"), open_timeout=20)
        assert (none.status_code, none.headers["www-authenticate"]) == (401, "Bearer")
        assert (expired.status_code, expired.headers["www-authenticate"]) == (401, INVALID_TOKEN)
        handshake = refused.value.response
        assert (handshake.status_code, handshake.headers["www-authenticate"]) == (401, "Bearer")


async def _handshake(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


class TestScopeUser:
    def test_starlette_users(self) -> None:
        from starlette.authentication import AuthCredentials, SimpleUser, UnauthenticatedUser

        resolve = scope_user()
        assert resolve({"user": UnauthenticatedUser()}) is None
        assert resolve({}) is None
        found = resolve({"user": SimpleUser("ann"), "auth": AuthCredentials(["read"])})
        assert found == Identity("ann", None, {"scopes": ("read",)})
        both = resolve({"user": SimpleUser("ann"), "auth": AuthCredentials(["read", "write"])})
        assert both == Identity("ann", None, {"scopes": ("read", "write")})

    def test_a_user_class_without_identity_is_known_by_its_display_name(self) -> None:
        """Starlette's ``BaseUser.identity`` raises ``NotImplementedError``: a user class of
        an application that implements only ``display_name`` is that user (not a 500 on
        every request), as one without the attribute at all is."""
        from starlette.authentication import BaseUser

        class Member(BaseUser):
            @property
            def is_authenticated(self) -> bool:
                return True

            @property
            def display_name(self) -> str:
                return "ann"

        class Plain:
            is_authenticated = True
            display_name = "bob"

        assert scope_user()({"user": Member()}) == Identity("ann")
        assert scope_user()({"user": Plain()}) == Identity("bob")

    def test_a_user_class_with_identity_and_tenant(self) -> None:
        class Member:
            is_authenticated = True
            identity = "u-17"
            display_name = "Ann"
            tenant_id = "acme"

        assert scope_user()({"user": Member()}) == Identity("u-17", "acme")

    def test_the_tenant_is_read_from_the_attribute_named(self) -> None:
        """``tenant_attribute`` names where the tenant is, and the type check holds there:
        the default attribute of a user class that has both is not read."""

        class Member:
            is_authenticated = True
            identity = "u-17"
            tenant_id = "default-attribute"
            org = "acme"

        class Odd(Member):
            org = 7  # type: ignore[assignment]

        resolve = scope_user(tenant_attribute="org")
        assert resolve({"user": Member()}) == Identity("u-17", "acme")
        with pytest.raises(TypeError, match="has a org that is int"):
            resolve({"user": Odd()})

    def test_a_user_without_a_usable_id_is_refused(self) -> None:
        class Odd:
            is_authenticated = True
            identity = 17

        with pytest.raises(TypeError, match="identity"):
            scope_user()({"user": Odd()})

    @pytest.mark.parametrize("tenant", [uuid.UUID(int=7), 7, b"acme"])
    def test_a_tenant_that_is_not_a_str_is_refused_not_dropped(self, tenant: object) -> None:
        """A tenant id of another type (a UUID column, an int key) was taken for no tenant:
        users of different tenants with the same id would share one user's components."""

        class Member:
            is_authenticated = True
            identity = "u-17"
            tenant_id = tenant

        with pytest.raises(TypeError, match="tenant_id"):
            scope_user()({"user": Member()})

    def test_a_user_whose_is_authenticated_is_not_true_is_no_identity(self) -> None:
        """Old-style user classes make is_authenticated a method: a bound method is truthy,
        so an anonymous user of such a class passed for signed in."""

        class Visitor:
            identity = "visitor-1"

            def is_authenticated(self) -> bool:
                return False

        class Flagged:
            identity = "u-1"
            is_authenticated = 1  # not a bool: no telling what was meant

        assert scope_user()({"user": Visitor()}) is None
        assert scope_user()({"user": Flagged()}) is None


class TestComposition:
    async def test_first_of_takes_the_first_identity_and_stops_on_errors(self) -> None:
        calls: list[str] = []

        def nobody(scope: Any) -> None:
            calls.append("nobody")

        async def header(scope: Any) -> Identity | None:
            calls.append("header")
            return trusted_header()(scope)  # type: ignore[return-value]

        def never(scope: Any) -> Identity:
            calls.append("never")
            return Identity("x")

        resolver = first_of(nobody, header, never)
        found = await resolver(http_scope([(b"x-user-id", b"zoe")]))
        assert found == Identity("zoe")
        assert calls == ["nobody", "header"]
        calls.clear()
        with pytest.raises(IdentityError):
            await resolver(http_scope([(b"x-user-id", b"a"), (b"x-user-id", b"b")]))
        assert calls == ["nobody", "header"]
        with pytest.raises(ValueError, match="at least one"):
            first_of()

    def test_a_factory_of_resolvers_is_refused_however_its_return_is_annotated(self) -> None:
        """The alias itself (a module without postponed annotations) or its dotted name
        marks a function that makes resolvers, as the bare name does."""
        from ambient.middleware.identity import IdentityResolver

        def make() -> Any:
            return trusted_header()

        for returns in (
            IdentityResolver,
            "IdentityResolver",
            "identity.IdentityResolver",
            "ambient.middleware.identity.IdentityResolver",
        ):
            make.__annotations__["return"] = returns
            with pytest.raises(TypeError, match="resolver 1 is make, which makes an identity"):
                first_of(make)

    async def test_a_resolver_may_return_any_awaitable(self) -> None:
        """Not only a coroutine: an object whose ``__await__`` gives the identity (a
        future, an application's own awaitable) is awaited too."""

        class Later:
            def __init__(self, identity: Identity) -> None:
                self.identity = identity

            def __await__(self) -> Iterator[None]:
                if False:
                    yield
                return self.identity

        def resolver(scope: Any) -> Any:
            return Later(Identity("zoe", "acme"))

        for identity in (resolver, first_of(resolver)):
            app = AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)
            status, _, body = await _exchange(app, http_scope([]))
            assert (status, body["user"], body["tenant"]) == (200, "zoe", "acme")

    async def test_a_resolver_answering_every_attribute_offers_no_challenge(self) -> None:
        """A resolver object that answers any attribute asked of it (as a test double
        does) has no ``WWW-Authenticate`` challenge: its 401 goes out without one."""

        class Lenient:
            def __getattr__(self, name: str) -> Any:
                return lambda *args: None

            def __call__(self, scope: Any) -> None:
                return None

        for identity in (Lenient(), first_of(Lenient(), trusted_header())):
            app = AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)
            status, headers, body = await _exchange(app, http_scope([]))
            assert (status, body["status"]) == (401, 401)
            assert b"www-authenticate" not in headers

    def test_header_values_fold_case_but_not_underscores(self) -> None:
        scope = http_scope([(b"X-User-Id", b"1"), (b"x-user-id", b"2"), (b"x_user_id", b"3")])
        assert header_values(scope, "x-user-id") == [b"1", b"2"]
        assert header_values(scope, "X_USER_ID") == [b"3"]


# -- property-based bad input through the middleware ------------------------------------------

Seen = dict[str, Any]


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    ctx = ambient.get_current_context()
    body = json.dumps(
        {
            "user": ctx.user_id,
            "tenant": ctx.tenant_id,
            "request_id": ctx.request_id,
            "thread_id": ctx.thread_id,
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def _call(app: Any, scope: dict[str, Any]) -> tuple[int, Seen, UserExecutionContext | None]:
    status, _, body = await _exchange(app, scope)
    return status, body, ambient.current_context_or_none()


async def _exchange(app: Any, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], Seen]:
    """One HTTP request through ``app``: the status, the headers and the JSON body."""
    start, body = (await _http_sent(app, scope))[:2]
    return start["status"], dict(start["headers"]), json.loads(body["body"])


async def _http_sent(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """What ``app`` sends for one HTTP request."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


async def context_app(scope: Any, receive: Any, send: Any) -> None:
    """An app that resolves a :class:`Probe` (a REQUEST component, counted in its ledger)
    and answers the context it runs in: as a JSON body, or for a websocket as the text of
    one message after its accept."""
    probe = await ambient.resolve(Probe)
    ctx = ambient.get_current_context()
    text = json.dumps(
        {
            "user": ctx.user_id,
            "tenant": ctx.tenant_id,
            "request_id": ctx.request_id,
            "thread_id": ctx.thread_id,
            "parent_run_id": ctx.parent_run_id,
            "depth": ctx.depth,
            "probe_request": probe.request_id,
        }
    )
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text.encode()})


def _visible_ascii(value: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in value)


def served_or_refused(
    middleware: AmbientMiddleware, ledger: Ledger, scope: dict[str, Any], backend: str
) -> tuple[dict[str, Any] | None, list[bytes], int, str]:
    """One request (or handshake) through ``middleware`` on ``backend``, checked against
    what holds for any input: it is served, or refused before the app with a problem
    answer (a websocket: a close with 1008 before any accept, or the problem itself with
    the denial response extension); nothing stays bound; every REQUEST component made is
    cleaned once; one request id is echoed, visible ASCII of at most 128 characters.
    Returns the ids the app saw (``None`` when refused), the request ids echoed, the
    status (a websocket's close code) and what a refusal said (detail or close reason)."""
    websocket = scope["type"] == "websocket"

    async def call() -> tuple[list[dict[str, Any]], object]:
        sent = await (_handshake if websocket else _http_sent)(middleware, scope)
        bound = ambient.current_context_or_none()
        await middleware.registry.aclose()
        return sent, bound

    sent, bound = anyio.run(call, backend=backend)
    assert bound is None
    assert ledger.problems() == []
    start = sent[0]
    if start["type"] == "websocket.close":
        assert (len(sent), start["code"]) == (1, 1008), sent
        assert ledger.created == {}
        return None, [], 1008, start["reason"]
    echoed = [value for name, value in start.get("headers", []) if name == b"x-request-id"]
    assert len(echoed) == 1, start
    assert _visible_ascii(echoed[0]), echoed
    assert len(echoed[0]) <= 128, echoed
    if start["type"] == "websocket.accept":
        seen: dict[str, Any] = json.loads(sent[1]["text"])
    elif start["status"] == 200 and not websocket:
        seen = json.loads(sent[1]["body"])
    else:
        assert start["status"] in (400, 401), sent
        assert (b"content-type", b"application/problem+json") in start["headers"]
        problem = json.loads(sent[1]["body"])
        assert set(problem) == {"type", "title", "status", "detail"}
        assert problem["status"] == start["status"]
        assert ledger.created == {}
        return None, echoed, start["status"], problem["detail"]
    assert list(ledger.created.values()) == [seen["user"]]
    assert seen["probe_request"] == seen["request_id"]
    return seen, echoed, 200, ""


header_value = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"", b" ", b"null", b"None", b"undefined", b"\x00", b"a\r\nb", b"ok-id"]),
)
identity_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"x-user-id",
                b"X-User-Id",
                b"x_user_id",
                b"x-tenant-id",
                b"x-request-id",
                b"x-thread-id",
                b"X-Request-ID",
            ]
        ),
        header_value,
    ),
    max_size=6,
)


def _is_valid(value: str) -> bool:
    try:
        validate_id("id", value)
    except InvalidContextError:
        return False
    return True


def _check_headers(backend: str, headers: list[tuple[bytes, bytes]]) -> None:
    app = AmbientMiddleware(
        _echo_app, registry=Registry(), identity=trusted_header(tenant_header="x-tenant-id")
    )
    status, body, bound = anyio.run(_call, app, http_scope(headers), backend=backend)
    assert bound is None
    assert status in (200, 400, 401), (status, body)
    if status != 200:
        assert set(body) == {"type", "title", "status", "detail"}
        return
    users = [v for k, v in headers if k.lower() == b"x-user-id"]
    assert [body["user"].encode()] == users
    for field in ("user", "request_id", "thread_id"):
        assert _is_valid(body[field])
    request_ids = [v for k, v in headers if k.lower() == b"x-request-id"]
    if body["request_id"].encode() not in request_ids:
        assert len(body["request_id"]) == 32
    else:
        assert body["request_id"].isascii()
        assert body["request_id"].isprintable()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=identity_headers)
def test_any_identity_headers_give_200_400_or_401_and_only_valid_contexts(
    backend: str, headers: list[tuple[bytes, bytes]]
) -> None:
    _check_headers(backend, headers)


claims_choice = st.fixed_dictionaries(
    {
        "exp": st.sampled_from(["future", "past", "missing"]),
        "nbf": st.sampled_from(["none", "past", "future"]),
        "aud": st.sampled_from(["right", "wrong", "missing"]),
        "iss": st.sampled_from(["right", "wrong", "missing"]),
        "sub": st.sampled_from(["user", "missing", "number", "invalid-id"]),
        "signing": st.sampled_from(["right", "wrong-secret", "none", "rsa", "tampered"]),
    }
)


def _make_token(choice: Mapping[str, str]) -> tuple[str, int]:
    """A token built from ``choice`` and the status a correct validator must answer."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "exp": {"future": now + 600, "past": now - 3600, "missing": None}[choice["exp"]],
        "nbf": {"none": None, "past": now - 60, "future": now + 3600}[choice["nbf"]],
        "aud": {"right": AUDIENCE, "wrong": "other", "missing": None}[choice["aud"]],
        "iss": {"right": ISSUER, "wrong": "https://evil", "missing": None}[choice["iss"]],
        "sub": {"user": "u-1", "missing": None, "number": 7, "invalid-id": "null"}[choice["sub"]],
    }
    signing = choice["signing"]
    if signing == "none":
        text = unsigned(claims)
    elif signing == "rsa":
        text = token(claims, key=PRIVATE_KEY, alg="RS256")
    elif signing == "wrong-secret":
        text = token(claims, key="not-the-secret-but-long-enough-too!!")
    else:
        text = token(claims)
    if signing == "tampered":
        header, payload, signature = text.split(".")
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=="))
        decoded["sub"] = "admin"
        payload = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
        text = f"{header}.{payload}.{signature}"
    token_valid = (
        choice["exp"] == "future"
        and choice["nbf"] != "future"
        and choice["aud"] == "right"
        and choice["iss"] == "right"
        and choice["sub"] in ("user", "invalid-id")
        and signing == "right"
    )
    if not token_valid:
        return text, 401
    # A valid token whose subject breaks the id rules is a malformed identity.
    return text, 200 if choice["sub"] == "user" else 400


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(choice=claims_choice)
def test_jwts_are_accepted_exactly_when_every_rule_holds(
    backend: str, choice: dict[str, str]
) -> None:
    text, expected = _make_token(choice)
    app = AmbientMiddleware(_echo_app, registry=Registry(), identity=hs_resolver(leeway=0))
    status, body, bound = anyio.run(_call, app, bearer(text), backend=backend)
    assert bound is None
    assert status == expected, (choice, body)
    if status == 200:
        assert body["user"] == "u-1"
    else:
        assert text not in json.dumps(body)


# How a websocket offers subprotocols, and what they carry: no token, a token after
# "bearer" (the one offered: good or not), or a malformed offer (400).
_OFFERS: dict[str, tuple[list[str], str | None]] = {
    "none": ([], None),
    "another protocol": (["chat"], None),
    "Bearer in capitals": (["Bearer", "{token}"], None),
    "bearer, token": (["bearer", "{token}"], "token"),
    "among others": (["chat", "bearer", "{token}", "v2"], "token"),
    "bearer last": (["chat", "bearer"], "malformed"),
    "bearer twice": (["bearer", "{token}", "bearer"], "malformed"),
    "bearer, blank": (["bearer", " "], "malformed"),
}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer:", "Token"]),
    gap=st.sampled_from([" ", "  ", "   "]),
    trailing=st.sampled_from(["", " ", "  "]),
    sent=st.sampled_from(["good", "expired", "garbage", ""]),
    copies=st.sampled_from([0, 1, 1, 2]),
    name=st.sampled_from([b"authorization", b"Authorization", b"AUTHORIZATION"]),
    websocket=st.sampled_from([None, "closed", "denied"]),
    offer=st.sampled_from(sorted(_OFFERS)),
    offered=st.sampled_from(["good", "garbage"]),
)
def test_a_bearer_token_counts_only_sent_once_and_one_way(
    backend: str,
    scheme: str,
    gap: str,
    trailing: str,
    sent: str,
    copies: int,
    name: bytes,
    websocket: str | None,
    offer: str,
    offered: str,
) -> None:
    """A JWT in the Authorization header (any case of the scheme, of the header's name,
    spaces after the scheme or the token; another scheme; sent twice) or, on a websocket,
    as the subprotocol after ``bearer``: served exactly when one valid token was sent one
    way; a header sent twice, ``Bearer`` without a token, a malformed ``bearer`` offer or
    a token sent both ways is 400, anything else 401 (a websocket closed with 1008, or
    denied with that status), and no refusal shows the token."""
    good = token({"sub": "alice"})
    tokens = {"good": good, "expired": token({"exp": int(time.time()) - 3600}), "garbage": "x.y.z"}
    value = f"{scheme}{gap}{tokens.get(sent, '')}{trailing}".encode()
    headers = [(name, value)] * copies
    protocols, carried = _OFFERS[offer] if websocket else ([], None)
    protocols = [p.format(token=tokens[offered]) for p in protocols]
    scope = http_scope(headers, type="websocket" if websocket else "http", subprotocols=protocols)
    if websocket == "denied":
        scope["extensions"] = {"websocket.http.response": {}}
    ledger = Ledger()
    middleware = AmbientMiddleware(
        context_app, registry=build_registry(ledger), identity=hs_resolver()
    )
    seen, _, status, said = served_or_refused(middleware, ledger, scope, backend)

    if copies > 1 or carried == "malformed" or (copies and carried == "token"):
        expected = 400
    elif copies:
        if scheme.lower() != "bearer":
            expected = 401
        elif not sent:
            expected = 400
        else:
            expected = 200 if sent == "good" else 401
    elif carried == "token":
        expected = 200 if offered == "good" else 401
    else:
        expected = 401
    if websocket == "closed" and expected != 200:
        expected = 1008
    assert status == expected, (status, said)
    assert all(text not in said for text in tokens.values())
    if seen is not None:
        assert seen["user"] == "alice"


@pytest.mark.parametrize("value", ["42\x00admin", "42\x00"])
@pytest.mark.parametrize("source", ["header", "jwt"])
async def test_an_id_with_a_nul_byte_is_refused_and_never_read_as_the_id_before_it(
    source: str, value: str
) -> None:
    """A user id holding a NUL byte, in the user header or a valid token's subject, is a
    malformed identity (400): the app never runs, so nothing reaches a database (which
    cannot store NUL, and whose older drivers cut text at it), and no user 42 is made."""
    made: list[str] = []
    registry = Registry()
    registry.register("memory", lambda user: made.append(user.user_id), lifetime=Lifetime.USER)
    if source == "header":
        identity, scope = trusted_header(), http_scope([(b"x-user-id", value.encode())])
    else:
        identity, scope = hs_resolver(), bearer(token({"sub": value}))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await ambient.resolve("memory")
        await _echo_app(scope, receive, send)

    status, body, bound = await _call(
        AmbientMiddleware(app, registry=registry, identity=identity), scope
    )
    assert status == 400
    assert "U+0000" in str(body["detail"])
    assert bound is None
    assert made == []
    await registry.aclose()


async def test_a_thousand_rotated_tokens_of_one_user_share_one_user_entry() -> None:
    """A user whose token rotates on every request (a new ``jti`` and ``iat`` each time)
    is still one user: one USER component, one live user entry, keyed by the validated
    subject and never by the credential."""
    registry = Registry()
    made: list[str] = []

    def memory(user: ambient.UserRef) -> list[str]:
        made.append(user.user_id)
        return made

    registry.register("memory", memory, lifetime=ambient.Lifetime.USER)
    resolver = jwt_bearer(SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    users: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await ambient.resolve("memory")
        users.append(ambient.get_current_context().user_id)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    stack = AmbientMiddleware(app, registry=registry, identity=resolver)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    now = int(time.time())
    for n in range(1000):
        rotated = token({"jti": f"token-{n}", "iat": now - n})
        await stack(http_scope([(b"authorization", f"Bearer {rotated}".encode())]), receive, send)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [204] * 1000
    assert users == ["alice"] * 1000
    assert made == ["alice"]
    assert registry.stats().live_users == 1
    await registry.aclose()


@dataclass(frozen=True)
class Memo:
    """A USER component: which user it was made for."""

    number: int
    user_id: str


class TestAnonymousAndRefusedIdentities:
    async def test_anonymous_and_refused_requests_never_share_user_components(self) -> None:
        """E10: with ``anonymous=True``, requests without identity, requests whose identity
        is refused and two real users run interleaved, all resolved and in flight at once.
        Each anonymous request is its own ``anonymous:`` user with its own USER component
        (never another anonymous caller's, never a real user's; an untrusted peer claiming
        to be alice is anonymous too, as documented), cleaned when its request ends;
        refused requests get a 400 problem and create nothing; each real user's requests
        share one USER component, which outlives them; a valid request right after a
        refusal is served."""
        registry = Registry()
        made: list[Memo] = []
        cleaned: list[int] = []

        def memo(user: UserRef) -> Iterator[Memo]:
            mine = Memo(len(made) + 1, user.user_id)
            made.append(mine)
            try:
                yield mine
            finally:
                cleaned.append(mine.number)

        registry.register(Memo, memo, lifetime=Lifetime.USER)
        untrusted = ("203.0.113.9", 4000)
        alice = [(b"x-user-id", b"alice")]
        bob = [(b"x-user-id", b"bob")]
        # The real users first: their identities are then known (and memoised by the
        # resolver) when the anonymous requests and the untrusted "alice" come in.
        real_requests = {
            "alice-1": http_scope(alice, path="/held"),
            "alice-2": http_scope(alice, path="/held"),
            "bob-1": http_scope(bob, path="/held"),
            "bob-2": http_scope(bob, path="/held"),
        }
        anonymous_requests = {
            "anon-1": http_scope([], path="/held"),
            "untrusted-alice": http_scope(alice, path="/held", client=untrusted),
            "anon-2": http_scope([], path="/held"),
        }
        held_requests = real_requests | anonymous_requests
        held = 0
        # Set once the real users' requests, then every request, are held in the app.
        reached = {len(real_requests): anyio.Event(), len(held_requests): anyio.Event()}
        release = anyio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            nonlocal held
            ctx = ambient.get_current_context()
            mine = await ambient.resolve(Memo)
            if scope["path"] == "/held":
                held += 1
                if held in reached:
                    reached[held].set()
                await release.wait()
                assert await ambient.resolve(Memo) is mine
            body = {
                "user": ctx.user_id,
                "anonymous": ctx.metadata.get("anonymous", False),
                "memo": mine.number,
                "memo_user": mine.user_id,
            }
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})

        stack = AmbientMiddleware(app, registry=registry, identity=trusted_header(), anonymous=True)
        refused_requests = {
            "alice-twice": http_scope(alice * 2),
            "zero-width-bob": http_scope([(b"x-user-id", "b\u200bob".encode())]),
        }
        answers: dict[str, tuple[int, dict[bytes, bytes], Seen]] = {}

        async def call(name: str, scope: dict[str, Any]) -> None:
            answers[name] = await _exchange(stack, scope)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for name, scope in real_requests.items():
                    tg.start_soon(call, name, scope)
                await reached[len(real_requests)].wait()
                for name, scope in anonymous_requests.items():
                    tg.start_soon(call, name, scope)
                await reached[len(held_requests)].wait()
                # Seven scopes are open, their USER components resolved: now the refusals.
                before = registry.stats()
                async with anyio.create_task_group() as refusals:
                    for name, scope in refused_requests.items():
                        refusals.start_soon(call, name, scope)
                after = registry.stats()
                assert (after.open_scopes, after.created) == (before.open_scopes, before.created)
                # In flight at once: five users' entries, one per anonymous request.
                assert (before.open_scopes, before.live_users) == (len(held_requests), 5)
                assert (len(made), cleaned) == (5, [])
                release.set()

        for name in refused_requests:
            status, headers, body = answers[name]
            assert status == 400, (name, body)
            assert headers[b"content-type"] == b"application/problem+json"
            assert set(body) == {"type", "title", "status", "detail"}
            assert body["status"] == 400
        bodies = {name: answers[name][2] for name in held_requests}
        assert {name: answers[name][0] for name in held_requests} == dict.fromkeys(
            held_requests, 200
        )
        for body in bodies.values():
            assert body["memo_user"] == body["user"]
        anonymous = [bodies[name] for name in ("anon-1", "anon-2", "untrusted-alice")]
        for body in anonymous:
            assert body["user"].startswith("anonymous:")
            assert body["anonymous"] is True
        assert len({body["user"] for body in anonymous}) == 3
        assert bodies["alice-1"]["memo"] == bodies["alice-2"]["memo"]
        assert bodies["bob-1"]["memo"] == bodies["bob-2"]["memo"]
        real = {bodies["alice-1"]["memo"], bodies["bob-1"]["memo"]}
        anonymous_memos = {body["memo"] for body in anonymous}
        assert len(real) == 2
        assert len(anonymous_memos) == 3
        assert not real & anonymous_memos
        # Nothing else was made (the refusals made nothing), and only anonymous users'
        # components are gone: each with its own request.
        assert sorted(m.user_id for m in made) == sorted(
            ["alice", "bob", *(body["user"] for body in anonymous)]
        )
        assert sorted(cleaned) == sorted(anonymous_memos)
        stats = registry.stats()
        assert (stats.live_users, stats.open_scopes) == (2, 0)

        # Refused, then served: the refusal leaves nothing behind that the next one sees.
        status, _, body = await _exchange(stack, http_scope(bob * 2))
        assert status == 400
        status, _, body = await _exchange(stack, http_scope(bob))
        assert status == 200
        assert (body["user"], body["memo"]) == ("bob", bodies["bob-1"]["memo"])
        assert registry.stats().live_users == 2
        await registry.aclose()
        assert sorted(cleaned) == sorted(anonymous_memos | real)


@pytest.mark.parametrize(
    ("client", "headers"),
    [
        (("127.0.0.1", 4000), [(b"x-forwarded-for", b"127.0.0.1:\xb2")]),
        (("127.0.0.1", 4000), [(b"forwarded", b'for="127.0.0.1:\xb3"')]),
        (
            ("203.0.113.9", 4000),
            [(b"x-user-id", b"bob"), (b"x-forwarded-for", b"1:\xb2, 203.0.113.9:4000")],
        ),
    ],
)
def test_a_forwarded_port_of_digits_int_refuses_is_no_port(
    client: tuple[str, int], headers: list[tuple[bytes, bytes]]
) -> None:
    """Header bytes are read as latin-1, where '\xb2' is '²': a digit to ``isdigit()``
    that ``int()`` refuses. Any client could make the peer check raise ValueError (no
    answer at all) with such a port in a forwarding header."""
    scope = http_scope([(b"x-user-id", b"alice"), *headers], client=client)
    identity = trusted_header()(scope)
    assert identity is None or identity.user_id == "alice"


def test_a_token_whose_exp_no_float_holds_never_expires_instead_of_failing() -> None:
    """PyJWT takes ``exp=2**1024`` (or a string of 400 nines); adding the leeway to it
    raised OverflowError: a 500 for a validly signed token."""
    for exp in (2**1024, "9" * 400):
        identity = hs_resolver(leeway=5)(bearer(token({"exp": exp})))
        assert identity is not None
        assert identity.expires_at is None


@pytest.mark.parametrize(
    "forwarded_for",
    [
        "127.0.0.1:-1",
        "127.0.0.1:0443",
        "127.0.0.1:+443",
        "127.0.0.1:4_43",
        "127.0.0.1: 443",
        "[::1]:-80",
        "[::1]:080",
    ],
)
async def test_a_forwarded_port_only_int_reads_still_names_the_client(forwarded_for: str) -> None:
    """uvicorn's proxy headers (trusting every peer, as ``--forwarded-allow-ips='*'``) take
    ``host:port`` from X-Forwarded-For with ``int()``, which reads a sign, leading zeros,
    underscores and spaces: the client address became 127.0.0.1 with a port no socket has.
    A client anywhere then asserted any identity to ``trusted_header()``."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    app = ProxyHeadersMiddleware(
        AmbientMiddleware(_echo_app, registry=Registry(), identity=trusted_header()),
        trusted_hosts="*",
    )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.get(
            "/", headers={"x-user-id": "admin", "x-forwarded-for": forwarded_for}
        )
    assert response.status_code == 401, response.text
