"""AmbientMiddleware in process: identity, ids, refusals, errors, limits and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import pickle
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef
from ambient._binding import _current, bind
from ambient.errors import (
    AmbientError,
    BroadcastError,
    CleanupError,
    CleanupTimeoutError,
    IdentityError,
    IdentityUnavailableError,
    IncompleteResponseError,
    InvalidContextError,
    InvalidTokenError,
    NoActiveContextError,
    PoolExhaustedError,
    ResolutionError,
    RowSecurityError,
    ServerErrorResponseError,
    TooManyRequestsError,
)
from ambient.middleware import (
    AmbientMiddleware,
    Identity,
    Problem,
    answer_error,
    first_of,
    note_failure,
    trusted_header,
)
from ambient.middleware.identity import jwt_bearer
from ambient.telemetry import Telemetry
from tests.apps import (
    BUILT,
    Chunks,
    Ledger,
    Memory,
    Probe,
    build,
    build_registry,
    close_built,
    next_in_an_hour,
)
from tests.test_identity import (
    _is_valid,
    _visible_ascii,
    context_app,
    http_scope,
    served_or_refused,
)

Message = MutableMapping[str, Any]


@pytest.fixture(autouse=True)
def _close_built_registries() -> Iterator[None]:
    """Close the registries the test built (held until then, so none is garbage collected
    with USER components open inside the test's event loop)."""
    yield
    if BUILT:
        anyio.run(close_built)


def client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["type"].startswith("urn:ambient:problem:")
    assert body["detail"]
    return body


# Exception groups and what answers them: the first error when every error in the group
# (nested groups flattened) carries a status, nothing otherwise.
_GROUPS: list[tuple[BaseException, int | None]] = [
    (
        ExceptionGroup(
            "queries",
            [
                ExceptionGroup("inner", [TooManyRequestsError("slow down")]),
                PoolExhaustedError("no connection"),
            ],
        ),
        429,
    ),
    (ExceptionGroup("queries", [PoolExhaustedError("busy"), RuntimeError("bug")]), None),
    (ExceptionGroup("queries", [PoolExhaustedError("busy"), IdentityError("x")]), 503),
    (CleanupError("cleanups failed", [PoolExhaustedError("busy")]), None),
]


class TestIdentity:
    async def test_the_header_user_is_bound_and_the_request_id_echoed(self) -> None:
        app, ledger, registry = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers={"x-user-id": "alice", "x-request-id": "req-42"}
            )
        assert response.status_code == 200
        body = response.json()
        assert body["user"] == "alice"
        assert body["probe_user"] == "alice"
        assert body["request_id"] == "req-42"
        assert response.headers["x-request-id"] == "req-42"
        assert list(ledger.cleaned) == [body["probe"]]  # the user's Memory lives on
        await registry.aclose()
        assert ledger.problems() == []

    async def test_no_identity_is_401_and_the_app_is_not_called(self) -> None:
        app, ledger, _ = build()
        async with client(app) as http:
            response = await http.get("/whoami")
        body = assert_problem(response, 401)
        assert body["type"] == "urn:ambient:problem:unauthenticated"
        assert ledger.created == {}
        assert "x-request-id" in response.headers

    async def test_an_untrusted_peer_cannot_assert_a_user(self) -> None:
        app, ledger, _ = build()
        async with client(app, peer="203.0.113.9") as http:
            response = await http.get("/whoami", headers={"x-user-id": "admin"})
        assert_problem(response, 401)
        assert ledger.created == {}

    async def test_a_trusted_network_other_than_loopback(self) -> None:
        app, _, _ = build(trusted_header(trusted=("10.0.0.0/8",)))
        async with client(app, peer="10.1.2.3") as inside, client(app) as loopback:
            assert (await inside.get("/whoami", headers={"x-user-id": "bob"})).status_code == 200
            refused = await loopback.get("/whoami", headers={"x-user-id": "bob"})
        assert_problem(refused, 401)

    async def test_ipv4_mapped_ipv6_peer_is_judged_by_its_ipv4_address(self) -> None:
        app, _, _ = build()
        async with client(app, peer="::ffff:127.0.0.1") as http:
            response = await http.get("/whoami", headers={"x-user-id": "carol"})
        assert response.json()["user"] == "carol"

    async def test_a_repeated_identity_header_is_400_not_first_wins(self) -> None:
        app, ledger, _ = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers=[("x-user-id", "alice"), ("X-User-Id", "admin")]
            )
        body = assert_problem(response, 400)
        assert "2 times" in body["detail"]
        assert "admin" not in body["detail"]
        assert ledger.created == {}

    async def test_underscore_spelling_is_a_different_header(self) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get("/whoami", headers={"x_user_id": "alice"})
        assert_problem(response, 401)

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("null", "placeholder"),
            ("UNDEFINED", "placeholder"),
            (" alice", "whitespace"),
            ("a" * 300, "300 characters"),
            ("al\x00ice", "control character"),
            # Displays as "admin" but is another id.
            ("admin\u200b", "invisible format character U+200B"),
        ],
    )
    async def test_an_invalid_user_id_is_400_naming_the_rule(
        self, value: str, fragment: str
    ) -> None:
        """Refused before anything is created or bound, every time."""
        app, ledger, registry = build()
        headers = [(b"x-user-id", value.encode())]
        async with client(app) as http:
            response = await http.get("/whoami", headers=headers)
            # Twice, after a valid user: what is remembered about ids never lets one pass.
            await http.get("/whoami", headers={"x-user-id": "alice"})
            again = await http.get("/whoami", headers=headers)
        for answer in (response, again):
            body = assert_problem(answer, 400)
            assert body["detail"].startswith("user_id is invalid")
            assert fragment in body["detail"]
            assert value.strip() not in body["detail"] or value.lower() in ("null", "undefined")
        assert set(ledger.created.values()) <= {"alice"}  # the refused requests made nothing
        assert registry.stats().open_scopes == 0
        assert ambient.current_context_or_none() is None

    async def test_a_header_that_is_not_utf8_is_400(self) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get("/whoami", headers=[(b"x-user-id", b"\xff\xfe")])
        assert "UTF-8" in assert_problem(response, 400)["detail"]

    async def test_a_tenant_header(self) -> None:
        app, _, _ = build(trusted_header(tenant_header="x-tenant-id"))
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers={"x-user-id": "dave", "x-tenant-id": "acme"}
            )
        assert response.json()["tenant"] == "acme"

    async def test_async_resolver_and_claims_reach_the_context(self) -> None:
        seen: list[UserExecutionContext | None] = []

        async def resolver(scope: Any) -> Identity:
            seen.append(ambient.current_context_or_none())
            return Identity("erin", "t1", {"role": "admin"})

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            body = json.dumps({"claims": dict(ctx.metadata["claims"])}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=resolver)
        async with client(middleware) as http:
            response = await http.get("/")
        assert response.json() == {"claims": {"role": "admin"}}
        assert seen == [None]

    async def test_a_resolver_returning_the_wrong_type_fails_loudly(self) -> None:
        app, _, _ = build(lambda scope: "alice")
        async with client(app) as http:
            with pytest.raises(TypeError, match="returned str"):
                await http.get("/whoami")

    @pytest.mark.parametrize(
        "make",
        [NoActiveContextError, lambda: ResolutionError("no factory for 'users'")],
        ids=["no-context", "no-factory"],
    )
    async def test_a_resolvers_ambient_error_that_is_no_answer_propagates(
        self, make: Callable[[], AmbientError]
    ) -> None:
        """An ambient error without an HTTP status raised by a resolver (it looked a
        component up outside any scope) is a bug like any other: it reaches the server
        and its 500 handlers. It was answered as a 500 problem instead, with the internal
        message as its detail, and neither raised nor logged."""
        bug = make()

        def resolver(scope: Any) -> Identity:
            raise bug

        app, ledger, _ = build(resolver)
        async with client(app) as http:
            with pytest.raises(type(bug)) as raised:
                await http.get("/whoami")
        assert raised.value is bug
        assert ledger.created == {}


class TestIds:
    @pytest.mark.parametrize(
        "value",
        ["", "has space", "x" * 129, "null", "NULL", "ünïcode", "a\tb", "a\x7fb", "a\x00b"],
    )
    async def test_an_unusable_request_id_is_replaced_by_a_generated_one(self, value: str) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers=[(b"x-user-id", b"u1"), (b"x-request-id", value.encode())]
            )
        assert response.status_code == 200
        generated = response.json()["request_id"]
        assert generated != value
        assert len(generated) == 32
        assert response.headers["x-request-id"] == generated

    @pytest.mark.parametrize("value", ["!", "~" * 128, "Req-7_a.b/c:d=e~!"])
    async def test_a_request_id_of_visible_ascii_up_to_128_characters_is_taken(
        self, value: str
    ) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers=[(b"x-user-id", b"u1"), (b"x-request-id", value.encode())]
            )
        assert response.json()["request_id"] == value
        assert response.headers["x-request-id"] == value

    async def test_three_request_id_headers_are_replaced(self) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami",
                headers=[("x-user-id", "u1")] + [("x-request-id", "a")] * 3,
            )
        assert response.json()["request_id"] != "a"

    async def test_two_request_id_headers_are_replaced(self) -> None:
        app, _, _ = build()
        async with client(app) as http:
            response = await http.get(
                "/whoami",
                headers=[("x-user-id", "u1"), ("x-request-id", "a"), ("x-request-id", "b")],
            )
        assert response.json()["request_id"] not in ("a", "b")

    async def test_thread_id_from_the_header_or_generated(self) -> None:
        app, _, _ = build()
        async with client(app) as http:
            given = await http.get("/whoami", headers={"x-user-id": "u", "x-thread-id": "t-7"})
            first = await http.get("/whoami", headers={"x-user-id": "u"})
            second = await http.get("/whoami", headers={"x-user-id": "u"})
        assert given.json()["thread_id"] == "t-7"
        assert first.json()["thread_id"] != second.json()["thread_id"]

    @pytest.mark.parametrize(
        "headers",
        [
            [("x-user-id", "u"), ("x-thread-id", "none")],
            [("x-user-id", "u"), ("x-thread-id", "a"), ("x-thread-id", "b")],
            [("x-user-id", "u"), ("x-thread-id", "t" * 257)],
        ],
    )
    async def test_an_invalid_thread_id_is_400(self, headers: list[tuple[str, str]]) -> None:
        app, ledger, _ = build()
        async with client(app) as http:
            response = await http.get("/whoami", headers=headers)
        assert_problem(response, 400)
        assert ledger.created == {}

    @pytest.mark.parametrize(
        "thread_ids",
        [[b"a", b"b"], [b"t-\xff"], [b"null"], [b" t"], [b"t" * 257]],
        ids=["repeated", "not-utf8", "placeholder", "space", "too-long"],
    )
    async def test_a_request_without_identity_is_401_whatever_is_wrong_with_its_thread_id(
        self, thread_ids: list[bytes]
    ) -> None:
        """A request without a credential is told to authenticate (401 with the
        resolver's challenge) before anything about its ids, as one with a refused
        credential is, whatever is wrong with its thread id. A thread id sent twice or not
        in UTF-8 was answered 400 without a challenge, while a placeholder got the 401."""
        app, ledger, _ = build(jwt_bearer("x" * 32, algorithms=["HS256"]))
        async with client(app) as http:
            response = await http.get(
                "/whoami", headers=[(b"x-thread-id", value) for value in thread_ids]
            )
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert ledger.created == {}

    async def test_custom_header_names(self) -> None:
        app, _, _ = build(request_id_header="X-Correlation-ID", thread_id_header="x-conversation")
        async with client(app) as http:
            response = await http.get(
                "/whoami",
                headers={"x-user-id": "u", "x-correlation-id": "c-1", "x-conversation": "t-1"},
            )
        assert response.json()["request_id"] == "c-1"
        assert response.json()["thread_id"] == "t-1"
        assert response.headers["x-correlation-id"] == "c-1"

    async def test_an_app_that_sets_the_request_id_header_itself_is_not_doubled(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            headers = [(b"x-request-id", b"from-app")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
        assert response.headers.get_list("x-request-id") == ["from-app"]

    @pytest.mark.parametrize("headers", [[(b"content-type", b"text/plain")], None])
    async def test_a_start_message_the_app_sends_for_every_request_echoes_each_ones_id(
        self, headers: list[tuple[bytes, bytes]] | None
    ) -> None:
        """An app may send one prebuilt ``http.response.start`` dict for every response.
        The echo was written into that dict: the next request found the first request's
        id there, took it for the app's own, and answered with another user's request id."""
        start: dict[str, Any] = {"type": "http.response.start", "status": 200}
        if headers is not None:
            start["headers"] = headers
        body = {"type": "http.response.body", "body": b"ok"}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start)
            await send(body)

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        async with client(middleware) as http:
            echoed = [
                (
                    await http.get("/", headers={"x-user-id": user, "x-request-id": f"{user}-1"})
                ).headers.get_list("x-request-id")
                for user in ("ann", "bob")
            ]
        assert echoed == [["ann-1"], ["bob-1"]]
        assert start.get("headers") == headers


# -- property-based request and thread ids, and odd scopes --------------------------------------


id_value = st.one_of(
    st.binary(max_size=140),
    st.text(max_size=40).map(lambda text: text.encode("utf-8")),
    # About the limits: 128 visible ASCII characters for a request id, 256 for any id.
    st.sampled_from([126, 127, 128, 129, 130, 255, 256, 257]).map(lambda n: b"~" * n),
    st.sampled_from([b"null", b"NONE", b"Undefined", b"nil", b"0", b"default"]),
    st.sampled_from(
        [
            b"req-1",
            b"!",
            b"~" * 128,
            b"r" * 129,
            b"t" * 256,
            b"t" * 257,
            "é".encode() * 256,
            b"",
            b" lead",
            b"trail ",
            b"in side",
            b"a\tb",
            b"a\x00b",
            b"a\x7fb",
            b"caf\xe9",
            b"\xe2\x80\xa8",
            b"a,b",
        ]
    ),
)
id_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [b"x-request-id", b"X-Request-ID", b"x-thread-id", b"X-THREAD-ID", b"x_thread_id"]
        ),
        id_value,
    ),
    max_size=4,
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=id_headers,
    query=st.lists(id_value, max_size=2),
    websocket=st.booleans(),
    anonymous=st.booleans(),
)
def test_any_request_and_thread_ids_bind_what_was_sent_or_a_fresh_id_and_echo_the_bound_one(
    backend: str,
    headers: list[tuple[bytes, bytes]],
    query: list[bytes],
    websocket: bool,
    anonymous: bool,
) -> None:
    """Request and thread ids as a client may send them (any bytes, any case of the header
    name, repeated, at and past the length limits, placeholders, whitespace, controls,
    latin-1; a websocket's also in the ``thread`` query parameter): a request id is bound
    when one visible-ASCII id of at most 128 characters was sent, else a fresh one, and the
    one bound is echoed, once; a thread id is bound as sent when sent once and valid, a
    fresh one when none, and anything else is 400 (1008) with the app never called."""
    ledger = Ledger()
    middleware = AmbientMiddleware(
        context_app,
        registry=build_registry(ledger),
        identity=trusted_header(),
        anonymous=anonymous,
        thread_id_query="thread",
    )
    user = [] if anonymous else [(b"x-user-id", b"alice")]
    extra: dict[str, Any] = {}
    if websocket:
        pairs = [b"thread=" + urllib.parse.quote_from_bytes(value).encode() for value in query]
        extra["query_string"] = b"&".join(pairs)
    scope = (ws_scope if websocket else http_scope)([*user, *headers], **extra)
    seen, echoed, status, _ = served_or_refused(middleware, ledger, scope, backend)

    request_ids = [value for name, value in headers if name.lower() == b"x-request-id"]
    sent_request_id = (
        request_ids[0].decode()
        if len(request_ids) == 1
        and _visible_ascii(request_ids[0])
        and len(request_ids[0]) <= 128
        and _is_valid(request_ids[0].decode())
        else None
    )
    thread_ids = [value for name, value in headers if name.lower() == b"x-thread-id"]
    thread_ids += query if websocket else []
    try:
        sent_thread_id = thread_ids[0].decode() if len(thread_ids) == 1 else None
    except UnicodeDecodeError:
        sent_thread_id = None
    thread_ok = not thread_ids or (
        sent_thread_id is not None and len(sent_thread_id) <= 256 and _is_valid(sent_thread_id)
    )
    assert (seen is not None) == thread_ok, (status, thread_ids)
    if sent_request_id is not None and echoed:
        assert echoed == [sent_request_id.encode()]
    if seen is None:
        return
    assert echoed == [seen["request_id"].encode()]
    assert seen["user"].startswith("anonymous:") if anonymous else seen["user"] == "alice"
    if sent_request_id is None:
        assert len(seen["request_id"]) == 32, seen
    else:
        assert seen["request_id"] == sent_request_id
    if thread_ids:
        assert seen["thread_id"] == sent_thread_id
    else:
        assert len(seen["thread_id"]) == 32, seen


# What a server may put in ``client`` and ``server``, and whether trusted_header() with
# loopback and "unix" trusted must take the identity header of such a peer: a TCP peer on
# loopback (a list too, IPv6, IPv4-mapped), a foreign one, a Unix socket as uvicorn (the
# server a path, no port) and hypercorn (neither) give it, and a TCP peer whose address
# could not be read (no client, the server's port known), with the key or without it.
_ABSENT = object()
peers = st.sampled_from(
    [
        (("127.0.0.1", 50000), ("127.0.0.1", 8000), True),
        (["127.0.0.1", 50000], ["127.0.0.1", 8000], True),
        (("::1", 50000), ("::1", 8000), True),
        (("::ffff:127.0.0.1", 50000), ("::ffff:127.0.0.1", 8000), True),
        (("203.0.113.9", 50000), ("127.0.0.1", 8000), False),
        (None, ("/run/app.sock", None), True),
        (None, None, True),
        (None, ("127.0.0.1", 8000), False),
        (_ABSENT, ("127.0.0.1", 8000), False),
    ]
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    peer=peers,
    user_header=st.sampled_from([b"x-user-id", b"X-User-Id", b"X-USER-ID", None]),
    request_header=st.sampled_from([b"x-request-id", b"X-REQUEST-ID"]),
    no_headers=st.booleans(),
    http_version=st.sampled_from(["1.0", "1.1", "2"]),
    root_path=st.sampled_from([None, "", "/api"]),
    websocket=st.booleans(),
    anonymous=st.booleans(),
)
def test_odd_but_legal_scopes_are_served_or_refused_never_failed(
    backend: str,
    peer: tuple[Any, Any, bool],
    user_header: bytes | None,
    request_header: bytes,
    no_headers: bool,
    http_version: str,
    root_path: str | None,
    websocket: bool,
    anonymous: bool,
) -> None:
    """Scopes as servers make them, within the ASGI spec or just outside it: no client (a
    Unix socket, or an address that could not be read), a client and server given as
    lists, header names in upper case (a server that does not lower them), no
    ``headers`` at all, HTTP/2, a ``root_path``. The identity header is taken exactly
    when the peer is trusted, whatever the case of its name, and the request id with it;
    any other request is served anonymously or refused with 401 (1008), never failed."""
    client, server, trusted = peer
    ledger = Ledger()
    middleware = AmbientMiddleware(
        context_app,
        registry=build_registry(ledger),
        identity=trusted_header(trusted=("127.0.0.1/32", "::1/128", "unix")),
        anonymous=anonymous,
    )
    headers = [(request_header, b"req-7")]
    if user_header is not None:
        headers.append((user_header, b"alice"))
    scope = (ws_scope if websocket else http_scope)(headers, server=server)
    scope.pop("client")
    if client is not _ABSENT:
        scope["client"] = client
    if no_headers:
        del scope["headers"]
    if not websocket:
        scope["http_version"] = http_version
    if root_path is not None:
        scope["root_path"] = root_path
    seen, echoed, status, _ = served_or_refused(middleware, ledger, scope, backend)
    identified = trusted and user_header is not None and not no_headers
    if echoed and no_headers:
        assert len(echoed[0]) == 32
    elif echoed:
        assert echoed == [b"req-7"]
    if identified:
        assert seen is not None
        assert (seen["user"], seen["request_id"]) == ("alice", "req-7")
    elif anonymous:
        assert seen is not None
        assert seen["user"].startswith("anonymous:")
    else:
        assert seen is None
        assert status == (1008 if websocket else 401)


class TestAnonymous:
    async def test_each_anonymous_request_is_its_own_user(self) -> None:
        app, ledger, _ = build(anonymous=True)
        async with client(app) as http:
            bodies = [(await http.get("/whoami")).json() for _ in range(20)]
        users = {body["user"] for body in bodies}
        assert len(users) == 20
        assert all(user.startswith("anonymous:") for user in users)
        assert len({body["memory"] for body in bodies}) == 20
        assert all(body["memory_user"] == body["user"] for body in bodies)
        # Each anonymous user's USER component is cleaned with its one request.
        assert ledger.all_cleaned() is True
        assert app.registry.stats().live_users == 0
        await app.registry.aclose()
        assert ledger.problems() == []

    async def test_anonymous_traffic_never_evicts_known_users(self) -> None:
        """With room for 5 users, 200 anonymous requests between two of frank's leave his
        USER component in place: anonymous callers never take a place in the LRU."""
        app, ledger, _ = build(anonymous=True)
        app.registry.max_users = 5
        async with client(app) as http:
            first = (await http.get("/whoami", headers={"x-user-id": "frank"})).json()
            anonymous = [(await http.get("/whoami")).json() for _ in range(200)]
            second = (await http.get("/whoami", headers={"x-user-id": "frank"})).json()
        assert first["memory"] == second["memory"]
        assert all(body["user"].startswith("anonymous:") for body in anonymous)
        assert app.registry.stats().live_users == 1
        await app.registry.aclose()
        assert ledger.problems() == []

    async def test_an_anonymous_context_says_so(self) -> None:
        seen: list[Any] = []

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            seen.append(dict(ambient.get_current_context().metadata))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        stack = AmbientMiddleware(app, registry=Registry(), identity=None, anonymous=True)
        await drive(stack, http_scope([]), [{"type": "http.request", "body": b""}])
        assert seen == [{"anonymous": True}]

    async def test_an_identity_still_wins_in_anonymous_mode(self) -> None:
        app, _, _ = build(anonymous=True)
        async with client(app) as http:
            response = await http.get("/whoami", headers={"x-user-id": "frank"})
        assert response.json()["user"] == "frank"

    async def test_anonymous_without_resolver(self) -> None:
        app, _, _ = build(anonymous=True)
        bare = AmbientMiddleware(app.app, registry=app.registry, identity=None, anonymous=True)
        async with client(bare) as http:
            response = await http.get("/whoami", headers={"x-user-id": "frank"})
        assert response.json()["user"].startswith("anonymous:")


class TestAnonymousPaths:
    """``anonymous_paths``: a health check or a login endpoint served without credentials
    while every other path requires them."""

    @staticmethod
    def echo(registry: Registry | None = None, **options: Any) -> AmbientMiddleware:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            body = json.dumps({"user": ctx.user_id, "anonymous": ctx.metadata.get("anonymous")})
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body.encode()})

        return AmbientMiddleware(
            app, registry=registry or Registry(), identity=trusted_header(), **options
        )

    async def test_a_request_without_a_path_is_on_no_anonymous_path(self) -> None:
        """A scope whose ``path`` is missing or no string (a broken server or an outer
        middleware) matches no anonymous path, not even ``/``: it needs an identity."""
        registry = Registry()
        BUILT.append(registry)
        app = self.echo(registry, anonymous_paths=["/", "/static/"])
        for path in (None, b"/"):
            scope = http_scope([], path=path)
            if path is None:
                del scope["path"]
            sent = await drive(app, scope, [{"type": "http.request", "body": b""}])
            assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401]

    async def test_only_the_listed_paths_are_served_without_identity(self) -> None:
        app = self.echo(anonymous_paths=["/", "/healthz", "/static/"])
        served = ["/", "/healthz", "/static/", "/static/app.js", "/static/css/site.css"]
        refused = [
            "//",
            "/index.html",
            "/healthz/",
            "/healthz2",
            "/static",
            "/staticx/app.js",
            "/private",
            "/static/../private",
            "/static/./app.js",
            "/static//private",
            "/static/css/..",
        ]
        async with client(app) as http:
            for path in served:
                response = await http.get(path)
                assert response.status_code == 200, path
                body = response.json()
                assert body["user"].startswith("anonymous:"), path
                assert body["anonymous"] is True, path
            for path in refused:
                # Sent as is: httpx would resolve the dot segments itself.
                scope = http_scope([], path=path, raw_path=path.encode())
                sent = await drive(app, scope, [{"type": "http.request", "body": b""}])
                assert sent[0]["status"] == 401, path

    async def test_they_are_the_paths_the_app_routes_under_its_root_path(self) -> None:
        """Behind a proxy with a root path (``uvicorn --root-path /api``) a request's
        ``scope["path"]`` starts with the root path, and the app routes what follows it
        (Starlette's and FastAPI's routers): the app's ``/healthz`` was refused 401 there.
        Matched as the app routes them; the rest is still refused. A path that only
        starts with the root path's text (``/apistatus``) is routed whole, as Starlette
        routes it."""
        app = self.echo(anonymous_paths=["/healthz", "/static/", "/apistatus"])
        # A server that does not prepend the root path to the path is routed the same.
        served = ["/api/healthz", "/api/static/app.js", "/healthz", "/apistatus"]
        refused = [
            "/api",
            "/api/",
            "/api/private",
            "/apihealthz",
            "/api/api/healthz",
            "/api/static/../private",
        ]
        for path in served + refused:
            scope = http_scope([], path=path, raw_path=path.encode(), root_path="/api")
            sent = await drive(app, scope, [{"type": "http.request", "body": b""}])
            assert sent[0]["status"] == (200 if path in served else 401), path

    async def test_the_root_path_itself_is_not_the_apps_path_of_the_same_name(self) -> None:
        """A request for the root path itself (``/api`` under ``--root-path /api``) routes
        the empty path, not the app's ``/api``: listing the app's ``/api`` serves
        ``/api/api`` without an identity, never the root path's own request."""
        app = self.echo(anonymous_paths=["/api"])
        for path, status in (("/api", 401), ("/api/api", 200)):
            scope = http_scope([], path=path, raw_path=path.encode(), root_path="/api")
            sent = await drive(app, scope, [{"type": "http.request", "body": b""}])
            assert sent[0]["status"] == status, path

    async def test_they_are_the_paths_of_a_mounted_app(self) -> None:
        """A sub-app mounted at ``/api`` with its own middleware sees the whole path, the
        mount's prefix in its root path, and routes what follows it."""
        from starlette.applications import Starlette
        from starlette.routing import Mount

        outer = Starlette(routes=[Mount("/api", app=self.echo(anonymous_paths=["/healthz"]))])
        async with client(outer) as http:
            response = await http.get("/api/healthz")
            assert response.status_code == 200
            assert response.json()["anonymous"] is True
            assert_problem(await http.get("/api/private"), 401)
            assert_problem(await http.get("/api/api/healthz"), 401)

    async def test_a_credential_sent_there_is_still_checked(self) -> None:
        app = self.echo(anonymous_paths=["/healthz"])
        async with client(app) as http:
            frank = await http.get("/healthz", headers={"x-user-id": "frank"})
            assert frank.json() == {"user": "frank", "anonymous": None}
        scope = http_scope([(b"x-user-id", b"frank ")], path="/healthz", raw_path=b"/healthz")
        sent = await drive(app, scope, [{"type": "http.request", "body": b""}])
        assert sent[0]["status"] == 400
        async with client(app, peer="203.0.113.9") as http:
            # A header an untrusted peer asserts is no identity, as anywhere: never frank.
            untrusted = (await http.get("/healthz", headers={"x-user-id": "frank"})).json()
            assert untrusted["user"].startswith("anonymous:")
            assert untrusted["anonymous"] is True

    async def test_their_user_components_are_cleaned_with_the_request(self) -> None:
        app, ledger, registry = build(anonymous_paths=["/whoami"])
        async with client(app) as http:
            bodies = [(await http.get("/whoami")).json() for _ in range(5)]
            assert_problem(await http.get("/stream"), 401)
        assert len({body["user"] for body in bodies}) == 5
        assert ledger.all_cleaned() is True
        assert registry.stats().live_users == 0
        await registry.aclose()
        assert ledger.problems() == []

    @pytest.mark.parametrize(
        ("paths", "error"),
        [
            ("/healthz", TypeError),
            ([b"/healthz"], ValueError),
            (["healthz"], ValueError),
            (["/a/../b"], ValueError),
            (["/a/./b"], ValueError),
            (["/a//b"], ValueError),
            (["/a?b=1"], ValueError),
            (["/a#b"], ValueError),
            (["/a\nb"], ValueError),
        ],
    )
    def test_a_path_that_could_never_match_as_meant_is_refused(
        self, paths: Any, error: type[Exception]
    ) -> None:
        with pytest.raises(error, match="anonymous_paths"):
            self.echo(anonymous_paths=paths)


class TestLeftoverContext:
    async def test_a_leftover_binding_never_reaches_the_next_request(self) -> None:
        """A server running a request inside a Context where user A is still bound."""
        app, _, registry = build(anonymous=True)
        leftover = UserExecutionContext.create("alice")
        async with client(app) as http:
            with ambient.bind_context(leftover):
                response = await http.get("/whoami")
                assert ambient.get_current_context() is leftover
        body = response.json()
        assert body["user"].startswith("anonymous:")
        assert body["probe_user"] == body["user"]
        assert registry.stats().open_scopes == 0

    async def test_what_runs_after_the_middleware_sees_no_other_requests_binding(
        self,
    ) -> None:
        """A server starts a request inside the Context of another request still under way
        (uvicorn's pipelined requests): once the middleware returns, what runs outside it
        for this request (Starlette's error handler, an outer middleware) sees no context,
        never that other request's. A caller's own binding (a request served inside it, a
        test's) is there again as it was."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = AmbientMiddleware(app, registry=Registry(), anonymous=True, identity=None)
        request: list[Message] = [{"type": "http.request", "body": b""}]
        after: list[UserExecutionContext | None] = []
        earlier = Registry().open_scope(UserExecutionContext.create("alice"))
        earlier._others_after = True  # as the middleware opens an HTTP request's scope
        async with earlier:

            async def next_request() -> None:
                await drive(middleware, http_scope([]), request)
                after.append(ambient.current_context_or_none())

            async with anyio.create_task_group() as tg:
                tg.start_soon(next_request)
            await drive(middleware, http_scope([]), request)
            after.append(ambient.current_context_or_none())
        assert after == [None, earlier.context]

    async def test_a_callers_own_scope_stays_bound_around_a_request_in_its_child_task(
        self,
    ) -> None:
        """A worker's scope (not a request's) is bound when one of its child tasks serves a
        request in process (an ASGI client, a test): that request gets its own context,
        and once it returns the child task still sees the worker's context, as when the
        worker itself makes the request. Only another request's binding is taken away."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = ambient.get_current_context().user_id.encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        request: list[Message] = [{"type": "http.request", "body": b""}]
        answers: list[bytes] = []
        after: list[UserExecutionContext | None] = []
        worker = Registry().open_scope(UserExecutionContext.create("worker"))
        async with worker:

            async def child(user: str) -> None:
                sent = await drive(middleware, http_scope([(b"x-user-id", user.encode())]), request)
                answers.append(sent[1]["body"])
                after.append(ambient.current_context_or_none())

            async with anyio.create_task_group() as tg:
                for user in ("ann", "bob", "cid"):
                    tg.start_soon(child, user)
            await child("dan")
        assert sorted(answers) == [b"ann", b"bob", b"cid", b"dan"]
        assert after == [worker.context] * 4

    async def test_a_request_started_inside_a_factory_waits_for_what_it_makes(self) -> None:
        """uvicorn starts the next request on a connection from inside the task of the
        request before it (as that one reads its body or sends its end), so in its Context:
        here while that request makes alice's Memory (a USER component). The next request,
        alice's too, took the creation under way for one of its own and was refused with
        "dependency cycle while resolving: Memory -> Memory" (a 500); it waits for the
        Memory instead, and both requests get the same one."""
        answers: list[object] = []
        request: list[Message] = [{"type": "http.request", "body": b""}]
        alice = http_scope([(b"x-user-id", b"alice")])

        async def app(scope: Any, receive: Any, send: Any) -> None:
            found = await ambient.resolve(Memory)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": str(id(found)).encode()})

        async def answer() -> None:
            try:
                sent = await drive(middleware, alice, request)
            except Exception as error:
                answers.append(repr(error))
            else:
                answers.append(sent[1]["body"])

        made: list[UserRef] = []
        async with anyio.create_task_group() as server:

            async def memory(user: UserRef) -> Memory:
                made.append(user)
                server.start_soon(answer)  # in this factory's Context, as uvicorn does
                await anyio.wait_all_tasks_blocked()
                return Memory(0, user)

            registry = Registry()
            registry.register(Memory, memory, lifetime=Lifetime.USER)
            middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
            server.start_soon(answer)
        await registry.aclose()
        assert len(made) == 1
        assert len(answers) == 2
        assert answers[0] == answers[1]
        assert isinstance(answers[0], bytes)

    async def test_a_factory_calling_the_app_in_its_own_task_is_still_a_named_cycle(
        self,
    ) -> None:
        """A factory that serves a request of its user in its own task (an in-process ASGI
        client) whose app needs what the factory makes: the request waiting for it would
        wait for itself. It is refused as the cycle it is, never left to hang."""
        request: list[Message] = [{"type": "http.request", "body": b""}]
        alice = http_scope([(b"x-user-id", b"alice")])

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve(Memory)

        async def memory(user: UserRef) -> Memory:
            await drive(middleware, alice, request)
            return Memory(0, user)

        registry = Registry()
        registry.register(Memory, memory, lifetime=Lifetime.USER)
        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with anyio.fail_after(5), pytest.raises(ResolutionError, match="cycle"):
            await drive(middleware, alice, request)
        await registry.aclose()

    async def test_a_live_leftover_is_reported_once_an_ended_one_never(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A context still bound when a request starts means the server copied another
        request's context into this one: warned about once per middleware. A leftover
        binding that has ended (what a copied Context holds once that request is over) is
        ignored without a word."""
        alice = UserExecutionContext.create("alice")
        app, _, _ = build(anonymous=True)
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            async with client(app) as http:
                with ambient.bind_context(alice):
                    for _ in range(3):
                        assert (await http.get("/whoami")).json()["user"] != "alice"
        assert sum("live context" in r.getMessage() for r in caplog.records) == 1
        caplog.clear()
        fresh, _, _ = build(anonymous=True)
        ended = bind(alice, None)
        ended.closed = True  # as the Context a server copied mid-request holds it later
        try:
            with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
                async with client(fresh) as http:
                    assert (await http.get("/whoami")).json()["user"] != "alice"
        finally:
            assert ended.token is not None
            _current.reset(ended.token)
        assert not [r for r in caplog.records if "live context" in r.getMessage()]

    async def test_a_factory_serving_a_request_in_its_own_task_still_resolves(
        self,
    ) -> None:
        """A USER factory serves a request through the middleware in its own task (an
        in-process ASGI client): once that request is over, the factory's binding is there
        again, and it resolves its dependencies. It is the factory's own, not a leftover
        of another request to drop, although no request's context is shown in it."""
        request: list[Message] = [{"type": "http.request", "body": b""}]

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = b"-"
            if ambient.get_current_context().user_id == "alice":
                body = repr(await ambient.resolve("memory")).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        async def memory(user: ambient.UserRef) -> tuple[str, str]:
            await drive(middleware, http_scope([(b"x-user-id", b"bob")]), request)
            return (user.user_id, (await ambient.resolve("config"))["dsn"])

        registry = Registry()
        registry.register("config", lambda: {"dsn": "db"}, lifetime=Lifetime.APP)
        registry.register("memory", memory, lifetime=Lifetime.USER)
        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        sent = await drive(middleware, http_scope([(b"x-user-id", b"alice")]), request)
        assert sent[-1]["body"] == repr(("alice", "db")).encode()
        await registry.aclose()


class UpstreamError(AmbientError):
    """An app's own server error that sets a status and nothing else."""

    http_status = 502


# What each error the library raises is answered with (status, type, title, detail, the
# Retry-After header): a 4xx says its message; a 5xx or a 429 says only its class's
# sentence, never its message (a backend's address, another user's id).
_ANSWERS: list[tuple[AmbientError, int, str, str, str, str | None]] = [
    (
        InvalidContextError("user_id", "must not be empty", "", echo=False),
        400,
        "urn:ambient:problem:invalid-context",
        "Invalid request context",
        "user_id is invalid: must not be empty",
        None,
    ),
    (
        IdentityError("the x-user-id header is not UTF-8"),
        400,
        "urn:ambient:problem:identity",
        "Invalid identity",
        "the x-user-id header is not UTF-8",
        None,
    ),
    (
        InvalidTokenError("expired", "the context token expired 3 s ago"),
        401,
        "urn:ambient:problem:identity",
        "Invalid identity",
        "the context token expired 3 s ago",
        None,
    ),
    (
        IdentityUnavailableError("the key set of idp.internal:8443 is unreachable"),
        503,
        "urn:ambient:problem:identity-unavailable",
        "Identity check unavailable",
        "the credential cannot be checked right now; try again later",
        "5",
    ),
    (
        TooManyRequestsError("user ann-7731 has 9 requests in flight"),
        429,
        "urn:ambient:problem:too-many-requests",
        "Too many concurrent requests",
        "this user has too many requests in flight; try again later",
        "1",
    ),
    (
        PoolExhaustedError("pool of db.internal:5432 for ann-7731 is full"),
        503,
        "urn:ambient:problem:pool-exhausted",
        "Service temporarily unavailable",
        "no database connection is available right now; try again later",
        "1",
    ),
    (
        BroadcastError("redis at cache.internal:6379 refused the connection"),
        503,
        "urn:ambient:problem:broadcast-unavailable",
        "Event delivery unavailable",
        "events cannot be delivered right now; try again later",
        "1",
    ),
    (
        UpstreamError("billing.internal:9000 answered 500"),
        502,
        "about:blank",
        "Error",
        "the server could not carry out the request",
        None,
    ),
]


@pytest.mark.parametrize(
    ("error", "status", "type_", "title", "detail", "retry_after"),
    _ANSWERS,
    ids=[type(answer[0]).__name__ for answer in _ANSWERS],
)
async def test_each_error_is_answered_with_its_status_type_title_detail_and_retry_after(
    error: AmbientError,
    status: int,
    type_: str,
    title: str,
    detail: str,
    retry_after: str | None,
) -> None:
    """An app raising one of the library's errors gets the problem+json answer of its
    class, with its default ``Retry-After``; the body of a server error or an overload
    never carries the error's own message."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise error

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    async with client(middleware) as http:
        response = await http.get("/", headers={"x-user-id": "u"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {"type": type_, "title": title, "status": status, "detail": detail}
    assert response.headers.get("retry-after") == retry_after
    if status >= 429:
        assert str(error) not in response.text


def _set(error: AmbientError, **values: object) -> AmbientError:
    for name, value in values.items():
        setattr(error, name, value)
    return error


@pytest.mark.parametrize(
    ("error", "status", "title", "detail", "retry_after"),
    [
        (_set(UpstreamError("x"), retry_after="5"), 502, "Error", None, None),
        (
            _set(TooManyRequestsError("x"), retry_after=b"5"),
            429,
            "Too many concurrent requests",
            None,
            None,
        ),
        (_set(UpstreamError("x"), http_status="404"), 502, "Error", None, None),
        (_set(AmbientError("x"), http_status=200), 500, "Error", None, None),
        (_set(UpstreamError("x"), http_status=True), 502, "Error", None, None),
        (_set(UpstreamError("x"), client_detail=None), 502, "Error", None, None),
        (_set(UpstreamError("x"), title=b"Upstream"), 502, "Error", None, None),
        (_set(UpstreamError("x"), problem_type=None), 502, "Error", None, None),
        (
            _set(IdentityError("who?", status=401), challenge="Bearer\r\nX: 1"),
            401,
            "Invalid identity",
            "who?",
            None,
        ),
    ],
    ids=[
        "retry-after-text",
        "retry-after-bytes",
        "status-text",
        "status-200",
        "status-bool",
        "client-detail-none",
        "title-bytes",
        "problem-type-none",
        "challenge-line-break",
    ],
)
async def test_a_value_set_on_an_error_that_no_answer_carries_is_logged_and_answered(
    error: AmbientError,
    status: int,
    title: str,
    detail: str | None,
    retry_after: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An answer's attribute set on an error after it was made (``err.retry_after = "5"``
    before raising it) to what no answer can carry is replaced by its class's value, with
    a warning naming it: the request is answered, where it got a bare 500 or no answer."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise error

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
    assert response.status_code == status
    body = response.json()
    assert (body["status"], body["title"], body["type"]) == (
        status,
        title,
        type(error).problem_type,
    )
    assert body["detail"] == detail or (
        detail is None and body["detail"] == type(error).client_detail
    )
    assert response.headers.get("retry-after") == retry_after
    assert "www-authenticate" not in response.headers
    logged = [r.getMessage() for r in caplog.records if "cannot be answered" in r.getMessage()]
    assert logged
    assert all(type(error).__name__ in line for line in logged)


class _StatusUnreadableError(AmbientError):
    """An app's error whose ``http_status`` is computed, and raises when read."""

    @property
    def http_status(self) -> int:  # type: ignore[override]
        raise LookupError("no status for this tenant")


class _StatusUnanswerableError(UpstreamError):
    """An app's error whose computed ``http_status`` is no status an answer carries."""

    @property
    def http_status(self) -> int:  # type: ignore[override]
        return 200


class _BaseStatusUnreadableError(UpstreamError):
    """An app's 502 error whose subclass computes its status, and fails to."""

    @property
    def http_status(self) -> int:  # type: ignore[override]
        raise LookupError("no status for this tenant")


@pytest.mark.parametrize("raised_by", ["app", "resolver"])
@pytest.mark.parametrize(
    ("error_class", "status"),
    [
        (_StatusUnreadableError, 500),
        (_StatusUnanswerableError, 502),
        (_BaseStatusUnreadableError, 502),
    ],
    ids=["raises", "status-200", "raises-under-a-502"],
)
async def test_a_computed_status_that_no_answer_carries_is_logged_and_answered(
    error_class: type[AmbientError],
    status: int,
    raised_by: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ``http_status`` property that raises (or gives a status no answer has), read
    when the error reaches the middleware, is logged and answered as the other values read
    then are: with the status of the nearest base class that has one (the 502 of the
    class it derives from), else a 500 problem, and the request's components are cleaned
    once; not a bare 500 with the property's traceback and the scope left open."""
    ledger = Ledger()
    registry = build_registry(ledger)
    header = trusted_header()

    def resolver(scope: Any) -> Any:
        if raised_by == "resolver":
            raise error_class("no status")
        return header(scope)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await ambient.resolve(Probe)
        raise error_class("no status")

    middleware = AmbientMiddleware(app, registry=registry, identity=resolver)
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == error_class.client_detail
    logged = [r.getMessage() for r in caplog.records if "cannot be answered" in r.getMessage()]
    assert logged
    assert all(error_class.__name__ in line for line in logged)
    assert len(ledger.cleaned) == len(ledger.created) == (raised_by == "app")
    assert registry.stats().open_scopes == 0


@pytest.mark.parametrize(
    "error",
    [
        AmbientError("a bug"),
        ResolutionError("no component 'db' is registered"),
        NoActiveContextError(),
        CleanupTimeoutError("cleanup of 'db' took over 5 s"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_an_error_that_is_no_answer_propagates_from_the_app(error: AmbientError) -> None:
    """An ambient error without an HTTP status is a bug of the app: it propagates as it
    was raised, for the server to log, instead of being answered with a problem."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise error

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    async with client(middleware) as http:
        with pytest.raises(AmbientError) as caught:
            await http.get("/", headers={"x-user-id": "u"})
    assert caught.value is error


class TestErrors:
    async def test_an_anonymous_request_whose_app_raises_an_answerable_error_gets_it(
        self,
    ) -> None:
        """An error with an HTTP status that an anonymous request's app raises before its
        answer is answered as for a user with an identity: there is no identity to give
        its refusal back to, and the client gets its 503 all the same."""
        registry = Registry()
        BUILT.append(registry)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise PoolExhaustedError("no connection within 2.0 s", retry_after=2)

        middleware = AmbientMiddleware(app, registry=registry, identity=None, anonymous=True)
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-request-id": "anon-1"})
        assert_problem(response, 503)
        assert response.headers["retry-after"] == "2"
        assert response.headers["x-request-id"] == "anon-1"

    async def test_an_app_exception_propagates_unchanged_and_cleanup_runs(self) -> None:
        failure = RuntimeError("handler broke")
        ledger = Ledger()
        registry = build_registry(ledger)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve(Probe)
            await ambient.resolve(Memory)
            raise failure

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        async with client(middleware) as http:
            with pytest.raises(RuntimeError) as caught:
                await http.get("/", headers={"x-user-id": "u"})
        assert caught.value is failure
        assert len(ledger.created) == 2
        assert len(ledger.cleaned) == 1  # the REQUEST probe; Memory lives for the user
        assert registry.stats().open_scopes == 0
        assert ambient.current_context_or_none() is None

    async def test_pool_exhaustion_before_the_response_becomes_503(self) -> None:
        ledger = Ledger()
        registry = build_registry(ledger)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve(Probe)
            raise PoolExhaustedError("no connection within 2.0 s", retry_after=2.5)

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u", "x-request-id": "r-503"})
        body = assert_problem(response, 503)
        assert body["type"] == "urn:ambient:problem:pool-exhausted"
        assert response.headers["retry-after"] == "3"
        assert response.headers["x-request-id"] == "r-503"
        assert ledger.problems() == []
        assert len(ledger.cleaned) == 1

    async def test_the_notes_of_an_answered_error_are_logged_not_answered(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The notes added to an error the middleware answers with a 503 (which backend,
        which pool) are logged with its message and the request id, never sent."""
        caplog.set_level(logging.INFO, logger="ambient.middleware")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            error = PoolExhaustedError("no connection within 2.0 s")
            error.add_note("pool orders-db of 5")
            raise error

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u", "x-request-id": "r-n"})
        assert_problem(response, 503)
        assert "orders-db" not in response.text
        logged = [r.getMessage() for r in caplog.records if "orders-db" in r.getMessage()]
        assert len(logged) == 1
        assert "no connection within 2.0 s (pool orders-db of 5)" in logged[0]
        assert "r-n" in logged[0]

    async def test_pool_exhaustion_in_a_task_group_becomes_503(self) -> None:
        """Queries run side by side in a task group: the group wraps the error in an
        ExceptionGroup, which was a 500 where ``gather`` gave 503. The request's work
        still sees the failure."""
        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)

        async def query(n: int) -> None:
            if n == 0:
                raise PoolExhaustedError("no connection within 2.0 s", retry_after=2)
            await anyio.sleep_forever()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(query, n)

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
        body = assert_problem(response, 503)
        assert body["type"] == "urn:ambient:problem:pool-exhausted"
        assert response.headers["retry-after"] == "2"
        assert len(seen) == 1
        assert isinstance(seen[0], ExceptionGroup)

    @pytest.mark.parametrize(("raised", "status"), _GROUPS)
    async def test_an_exception_group_is_answered_only_when_every_error_in_it_can_be(
        self, raised: BaseExceptionGroup[Any], status: int | None
    ) -> None:
        """The first error of the group (nested groups flattened) is the answer; a group
        holding anything else, or a CleanupError, propagates unchanged."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise raised

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        async with client(middleware) as http:
            if status is None:
                with pytest.raises(BaseExceptionGroup) as caught:
                    await http.get("/", headers={"x-user-id": "u"})
                assert caught.value is raised
            else:
                assert_problem(await http.get("/", headers={"x-user-id": "u"}), status)

    async def test_an_error_after_the_response_started_propagates(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise PoolExhaustedError("too late to answer")

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        async with client(middleware) as http:
            with pytest.raises(PoolExhaustedError):
                await http.get("/", headers={"x-user-id": "u"})

    async def test_a_cleanup_failure_after_the_response_is_logged_not_raised(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        registry = Registry()

        def flaky() -> Any:
            yield object()
            msg = "could not release"
            raise OSError(msg)

        registry.register("flaky", flaky)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("flaky")
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u", "x-request-id": "r-9"})
        assert response.status_code == 204
        assert registry.stats().cleanup_failures == 1
        failed = [r for r in caplog.records if "cleanup failed" in r.getMessage()]
        assert len(failed) == 1
        assert "r-9" in failed[0].getMessage()


class LockedOutError(AmbientError):
    """An app's own 401 that says when signing in may be tried again."""

    http_status = 401
    problem_type = "urn:ambient:problem:locked-out"
    title = "Locked out"
    retry_after = 30.0


class TestAnswerError:
    """``answer_error``: what a framework's own exception handler answers for an ambient
    error it caught, with the effects the middleware has when it answers the error
    itself."""

    @staticmethod
    def _app(raised: BaseException, *, in_thread: bool = False) -> Any:
        """A raw ASGI app whose "view" begins the request's work, then raises; its
        "exception handler" answers through answer_error, or lets the error through."""

        async def view() -> None:
            await ambient.resolve("tx")
            raise raised

        async def app(scope: Any, receive: Any, send: Any) -> None:
            try:
                await view()
            except BaseException as error:
                if in_thread:
                    answer = await anyio.to_thread.run_sync(answer_error, error)
                else:
                    answer = answer_error(error)
                if answer is None:
                    raise
                await answer.send_http(send)

        return app

    @pytest.mark.parametrize("in_thread", [False, True])
    async def test_a_401_gets_the_resolvers_challenge_and_its_scope_closes_with_it(
        self, in_thread: bool
    ) -> None:
        """An IdentityError(401) raised in a view (a token revoked since it was issued) is
        its problem+json with the challenge of the middleware's resolver, the request id
        echoed, and the request's work sees the error, also when the handler runs in a
        worker thread that carries the context (Django's ``process_exception``)."""
        seen: list[BaseException | None] = []
        revoked = IdentityError("the token was revoked", status=401)
        identity = first_of(trusted_header(), jwt_bearer("x" * 32, algorithms=["HS256"]))
        app = self._app(revoked, in_thread=in_thread)
        middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=identity)
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u", "x-request-id": "r-401"})
        body = assert_problem(response, 401)
        assert body["type"] == "urn:ambient:problem:identity"
        assert body["detail"] == "the token was revoked"
        assert response.headers.get_list("www-authenticate") == ["Bearer"]
        assert response.headers["x-request-id"] == "r-401"
        assert seen == [revoked]

    @pytest.mark.parametrize(
        ("raised", "status", "headers"),
        [
            (IdentityError("malformed", status=400), 400, {}),
            (
                IdentityError("sign in", status=401, challenge='Basic realm="a"'),
                401,
                {"www-authenticate": 'Basic realm="a"'},
            ),
            (TooManyRequestsError("slow down", retry_after=2.5), 429, {"retry-after": "3"}),
            (PoolExhaustedError("no connection", retry_after=2), 503, {"retry-after": "2"}),
            (InvalidContextError("run_id", "too long", echo=False), 400, {}),
            (
                LockedOutError("ann failed to sign in 5 times"),
                401,
                {"retry-after": "30", "www-authenticate": "Bearer"},
            ),
        ],
    )
    async def test_an_error_that_carries_an_answer_is_answered_with_its_headers(
        self, raised: AmbientError, status: int, headers: dict[str, str]
    ) -> None:
        """Its status and headers; a 401's own challenge is kept, a 401 without one gets
        the resolver's besides its own headers, a 400 gets none."""
        seen: list[BaseException | None] = []
        identity = first_of(trusted_header(), jwt_bearer("x" * 32, algorithms=["HS256"]))
        middleware = AmbientMiddleware(
            self._app(raised), registry=_tx_registry(seen), identity=identity
        )
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
        body = assert_problem(response, status)
        assert body["type"] == raised.problem_type
        for name, value in headers.items():
            assert response.headers.get_list(name) == [value]
        if "www-authenticate" not in headers:
            assert "www-authenticate" not in response.headers
        assert seen == [raised]

    @pytest.mark.parametrize(
        ("raised", "status"),
        [*_GROUPS, (NoActiveContextError(), None), (RuntimeError("bug"), None)],
    )
    async def test_an_exception_group_is_answered_as_its_first_error(
        self, raised: BaseException, status: int | None
    ) -> None:
        """A group whose every error (nested groups flattened) carries a status is answered
        as its first error and noted whole; anything else is ``None`` and not noted."""
        registry = Registry()
        async with registry.open_scope(UserExecutionContext.create("u")) as scope:
            answer = answer_error(raised)
            noted = scope.exception
        if status is None:
            assert answer is None
            assert noted is None
        else:
            assert answer is not None
            assert answer.status == status
            assert noted is raised

    async def test_the_answer_is_exactly_its_problem_document_and_headers(self) -> None:
        """RFC 9457's four members in this order, as ASCII JSON whatever the text (a title
        or detail with quotes or letters beyond ASCII), its length and type, then the
        error's own headers and those passed in."""

        class QuotaError(TooManyRequestsError):
            problem_type = "urn:example:problem:quota"
            title = "Quota überschritten"
            client_detail = 'the "monthly" quota is used up'

        answer = answer_error(QuotaError("ann's quota at db-7", retry_after=1))
        assert answer is not None
        body = (
            b'{"type": "urn:example:problem:quota", "title": "Quota \\u00fcberschritten", '
            b'"status": 429, "detail": "the \\"monthly\\" quota is used up"}'
        )
        assert answer.body() == body
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await answer.send_http(send, [(b"x-request-id", b"r-1")])
        assert sent == [
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                    (b"x-request-id", b"r-1"),
                ],
            },
            {"type": "http.response.body", "body": body},
        ]

    def test_an_error_of_no_status_is_a_500_that_keeps_its_message_to_itself(self) -> None:
        """``Problem.from_error`` of an error that carries no status (none a client was
        meant to get) answers as for a server error: 500, the class's client detail."""
        problem = Problem.from_error(AmbientError("the store at 10.0.0.5:5432 refused us"))
        assert (problem.status, problem.title, problem.detail, problem.type) == (
            500,
            AmbientError.title,
            AmbientError.client_detail,
            "about:blank",
        )

    @pytest.mark.parametrize("handled", [False, True], ids=["middleware", "handler"])
    async def test_an_invalid_context_the_app_made_names_the_rule_never_the_value(
        self, handled: bool
    ) -> None:
        """A context the app builds from what it stored (another user's address, read back
        with a space at its end) is refused naming the field and the rule, as the ids of a
        refused request are: the value, which the error's message shows for the server's
        logs, stays out of the body, whether the middleware or the app's exception handler
        (through answer_error) answers."""
        with pytest.raises(InvalidContextError) as caught:
            UserExecutionContext.create("carol@example.com ")
        refused = caught.value
        assert "carol@example.com" in str(refused)

        async def raising(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            raise refused

        seen: list[BaseException | None] = []
        app = self._app(refused) if handled else raising
        middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
        async with client(middleware) as http:
            response = await http.get("/", headers={"x-user-id": "u"})
        body = assert_problem(response, 400)
        assert body["type"] == "urn:ambient:problem:invalid-context"
        assert body["detail"] == "user_id is invalid: must not start or end with whitespace"
        assert "carol" not in response.text
        assert seen == [refused]

    @pytest.mark.parametrize("status", [409, 503])
    @pytest.mark.parametrize("handled", [False, True], ids=["middleware", "handler"])
    async def test_an_error_whose_message_cannot_be_read_is_still_answered(
        self, status: int, handled: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An error class whose ``str()`` raises (its message built from an attribute it
        was never given) is answered with its status and its class's client detail, not
        the ``AttributeError`` of its message in place of any answer; a 5xx is still
        logged, by its class's name."""

        class StaleError(AmbientError):
            http_status = status
            problem_type = "urn:ambient:problem:stale"
            title = "Stale record"
            client_detail = "the record changed meanwhile; reload it"

            def __str__(self) -> str:
                return f"record {self.record_id} changed"  # type: ignore[attr-defined]

        async def raising(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            raise StaleError

        seen: list[BaseException | None] = []
        app = self._app(StaleError()) if handled else raising
        middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
        with caplog.at_level(logging.INFO, logger="ambient.middleware"):
            async with client(middleware) as http:
                response = await http.get("/", headers={"x-user-id": "u"})
        body = assert_problem(response, status)
        assert (body["title"], body["detail"]) == (
            "Stale record",
            "the record changed meanwhile; reload it",
        )
        assert [type(error) for error in seen] == [StaleError]
        logged = [
            r.getMessage() for r in caplog.records if "does not tell the client" in r.getMessage()
        ]
        assert len(logged) == (status == 503)
        assert all("StaleError" in line for line in logged)

    def test_outside_a_request_nothing_is_noted_and_a_401_keeps_its_own_challenge(
        self,
    ) -> None:
        """With no scope bound (an app without the middleware) the answer is the error's
        own: no challenge is added to a 401 that has none."""
        bare = answer_error(IdentityError("who are you", status=401))
        assert bare is not None
        assert (bare.status, bare.headers) == (401, [])
        own = answer_error(IdentityError("sign in", status=401, challenge="Bearer"))
        assert own is not None
        assert own.headers == [(b"www-authenticate", b"Bearer")]


class TestNoteFailure:
    """``note_failure``: an error a framework answered in a way the middleware cannot read
    (Quart closes a websocket whose handler raised with 1000)."""

    async def test_the_first_noted_error_closes_the_scope_and_nothing_after_it(self) -> None:
        first, second = RuntimeError("a bug"), KeyError("another")
        registry = Registry()
        note_failure(second)  # nothing bound: nothing to note, nothing raised
        async with registry.open_scope(UserExecutionContext.create("u")) as scope:
            assert scope.exception is None
            note_failure(first)
            note_failure(second)
            noted = scope.exception
        assert noted is first
        note_failure(second)  # closed: nothing to note, nothing raised
        assert scope.closed

    async def test_an_error_noted_before_the_body_raised_another_stays_what_ended_it(
        self,
    ) -> None:
        """An error is noted, then the body raises another: the noted one stays what ended
        the scope for its observers (the first is kept), and the cleanups see what the
        body raised."""
        noted, raised = RuntimeError("answered by the framework"), KeyError("raised after")
        ended: list[BaseException | None] = []
        cleaned_with: list[BaseException | None] = []

        class Watch(ambient.Observer):
            def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
                ended.append(scope.exception)

        def component() -> Iterator[str]:
            try:
                yield "component"
            except BaseException as error:
                cleaned_with.append(error)
                raise
            else:
                cleaned_with.append(None)

        registry = Registry(telemetry=Watch())
        registry.register("component", component)
        with pytest.raises(KeyError):
            async with registry.open_scope(UserExecutionContext.create("u")) as scope:
                await scope.resolve("component")
                note_failure(noted)
                raise raised
        assert ended == [noted]
        assert cleaned_with == [raised]

    async def test_a_scope_left_cleanly_hands_its_noted_error_to_its_cleanups(self) -> None:
        """A scope not closed by the middleware (``open_scope``, ``message_scope``) that is
        left without an exception, after ``note_failure``: its cleanups see the noted
        error, as its observers do, and its transaction rolls back. They saw a clean exit
        and committed, while ``scope.exception`` said it failed."""
        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)
        bug = RuntimeError("a bug the app answered itself")
        async with registry.open_scope(UserExecutionContext.create("u")) as scope:
            await scope.resolve("tx")
            note_failure(bug)
        assert seen == [bug]

    async def test_an_error_noted_by_held_work_reaches_the_cleanups_it_held_back(
        self,
    ) -> None:
        """Work holding the scope (``scope.hold()``) notes a failure while the scope's close
        waits for it: the cleanups that run once it lets go see it. They saw the clean
        exit the close began with."""
        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)
        bug = RuntimeError("the held work failed")
        go = anyio.Event()

        async def held_work(hold: Any) -> None:
            with hold:
                await go.wait()  # set as the body ends: the close is waiting by now
                note_failure(bug)

        ctx = UserExecutionContext.create("u")
        async with anyio.create_task_group() as tg, registry.open_scope(ctx) as scope:
            await scope.resolve("tx")
            tg.start_soon(held_work, scope.hold())
            go.set()
        assert seen == [bug]


class TestConcurrencyLimit:
    async def test_a_user_over_the_limit_gets_429_and_others_do_not(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The refusal tells the client to come back later; how many of its requests were
        in flight, and the limit, are the server's to log."""
        caplog.set_level(logging.INFO, logger="ambient.middleware")
        gate = anyio.Event()
        inside = 0
        both_in = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal inside
            inside += 1
            if inside == 2:
                both_in.set()
            await gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), max_concurrent_per_user=2
        )
        statuses: list[int] = []
        # Bounded: a limit that refuses too much holds the third request at the gate.
        with anyio.fail_after(10):
            async with client(middleware) as http:

                async def call(user: str) -> None:
                    response = await http.get("/", headers={"x-user-id": user})
                    statuses.append(response.status_code)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "greedy")
                    tg.start_soon(call, "greedy")
                    await both_in.wait()
                    refused = await http.get("/", headers={"x-user-id": "greedy"})
                    body = assert_problem(refused, 429)
                    assert refused.headers["retry-after"] == "1"
                    assert body["detail"] == TooManyRequestsError.client_detail
                    assert "limit" not in refused.text
                    tg.start_soon(call, "patient")
                    gate.set()
                again = await http.get("/", headers={"x-user-id": "greedy"})
        assert sorted(statuses) == [200, 200, 200]
        assert again.status_code == 200
        assert middleware._active == {}
        logged = [r.getMessage() for r in caplog.records if r.name == "ambient.middleware"]
        assert [m for m in logged if "429" in m and "(limit 2)" in m], logged

    @pytest.mark.parametrize("denial", [False, True], ids=["close", "denial-response"])
    async def test_a_websocket_over_its_users_limit_is_refused_as_a_policy_violation(
        self, denial: bool
    ) -> None:
        """Five users each hold an open websocket with ``max_concurrent_per_user=1``; each
        one's second handshake is closed before accept with 1008 policy violation, as every
        refusal of the middleware (or answered 429 with Retry-After where the server offers
        the denial response), while the held sockets go on as their own users. It was
        closed with 1013, which the design keeps for the server's own overload (503)."""
        users = [f"user-{n}" for n in range(5)]
        release = anyio.Event()
        held: list[str] = []
        all_held = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            held.append(ambient.get_current_context().user_id)
            if len(held) == len(users):
                all_held.set()
            await release.wait()
            await send({"type": "websocket.send", "text": ambient.get_current_context().user_id})
            await send({"type": "websocket.close", "code": 1000})

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), max_concurrent_per_user=1
        )
        extensions = {"extensions": {"websocket.http.response": {}}} if denial else {}
        connect: list[Message] = [{"type": "websocket.connect"}]
        served: dict[str, list[Message]] = {}

        async def hold(user: str) -> None:
            served[user] = await drive(
                middleware, ws_scope([(b"x-user-id", user.encode())]), connect
            )

        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(hold, user)
            with anyio.fail_after(5):
                await all_held.wait()
            for user in users:
                sent = await drive(
                    middleware, ws_scope([(b"x-user-id", user.encode())], **extensions), connect
                )
                if denial:
                    start = sent[0]
                    assert (start["type"], start["status"]) == (
                        "websocket.http.response.start",
                        429,
                    )
                    assert (b"retry-after", b"1") in start["headers"]
                else:
                    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 1008)]
                    assert sent[0]["reason"] == TooManyRequestsError.client_detail
            release.set()
        assert {user: [m.get("text") for m in sent] for user, sent in served.items()} == {
            user: [None, user, None] for user in users
        }
        assert middleware._active == {}

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio's cancel stops at the shield
    async def test_a_socket_cancelled_as_it_expires_idle_users_gives_its_slot_back(
        self,
    ) -> None:
        """A websocket handshake arrives when idle users' components are due for cleanup,
        which it runs before calling its app. A native cancellation (``asyncio.timeout``
        around the request, a server cancelling its task) passes anyio's shield and is
        raised once those cleanups are done, before the app was called. The socket is no
        longer counted against its user then: the user's next socket is served, not
        refused with 429 for as long as the process lives; another user's socket, served
        meanwhile, is its own."""
        now = [0.0]
        in_cleanup, go_on = anyio.Event(), anyio.Event()

        class Held:
            def __init__(self, user: UserRef) -> None:
                self.user = user.user_id

            async def aclose(self) -> None:
                in_cleanup.set()
                await go_on.wait()

        registry = Registry(clock=lambda: now[0])
        registry.register(Held, Held, lifetime=Lifetime.USER, idle_ttl=60)
        async with registry.open_scope(UserExecutionContext.create("idle")):
            await ambient.resolve(Held)
        now[0] += 120

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            user = ambient.get_current_context().user_id
            await send({"type": "websocket.send", "text": user})
            await send({"type": "websocket.close", "code": 1000})

        middleware = AmbientMiddleware(
            app, registry=registry, identity=trusted_header(), max_concurrent_per_user=1
        )
        connect: list[Message] = [{"type": "websocket.connect"}]

        def socket_of(user: str) -> dict[str, Any]:
            return ws_scope([(b"x-user-id", user.encode())])

        cancelled = asyncio.ensure_future(drive(middleware, socket_of("alice"), connect))
        await in_cleanup.wait()
        served = await drive(middleware, socket_of("bob"), connect)
        assert [m.get("text") for m in served] == [None, "bob", None]
        cancelled.cancel()
        await anyio.wait_all_tasks_blocked()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert middleware._active == {}
        for user in ("alice", "bob", "alice"):
            sent = await drive(middleware, socket_of(user), connect)
            assert [m["type"] for m in sent] == [
                "websocket.accept",
                "websocket.send",
                "websocket.close",
            ]
            assert sent[1]["text"] == user
        assert registry.stats().open_scopes == 0
        await registry.aclose()

    @pytest.mark.parametrize("error", [PoolExhaustedError, RuntimeError], ids=["503", "500"])
    async def test_a_request_whose_app_raised_no_longer_counts(
        self, error: type[Exception]
    ) -> None:
        """A request whose app raised stops counting against its user's limit, whether the
        middleware answered the error (503) or let it through to the server (a bug: 500):
        with ``max_concurrent_per_user=1`` the user's next request is served."""
        calls = 0

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise error("no connection free")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), max_concurrent_per_user=1
        )
        transport = httpx.ASGITransport(
            app=middleware, raise_app_exceptions=False, client=("127.0.0.1", 50000)
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            failed = await http.get("/", headers={"x-user-id": "alice"})
            served = await http.get("/", headers={"x-user-id": "alice"})
        assert failed.status_code == (503 if error is PoolExhaustedError else 500)
        assert (served.status_code, served.text) == (200, "ok")
        assert middleware._active == {}

    @pytest.mark.parametrize("raises", [False, True], ids=["returned", "raised"])
    async def test_a_request_whose_cleanups_still_run_no_longer_counts(self, raises: bool) -> None:
        """A request counts against its user's limit until its app returns or raises, not
        while its cleanups run (a connection going back to its pool): with
        ``max_concurrent_per_user=1`` the user's next request is served meanwhile."""
        in_cleanup, go_on = anyio.Event(), anyio.Event()
        registry = Registry()

        async def held() -> AsyncIterator[str]:
            try:
                yield "held"
            finally:
                in_cleanup.set()
                await go_on.wait()

        registry.register("held", held)
        first = True

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal first
            if first:
                first = False
                await ambient.resolve("held")
                if raises:
                    raise PoolExhaustedError("no connection free")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = AmbientMiddleware(
            app, registry=registry, identity=trusted_header(), max_concurrent_per_user=1
        )
        scope = http_scope([(b"x-user-id", b"alice")])
        request: list[Message] = [{"type": "http.request", "body": b""}]
        answers: list[list[Message]] = []

        async def call() -> None:
            answers.append(await drive(middleware, dict(scope), request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(5):
                await in_cleanup.wait()
            served = await drive(middleware, dict(scope), request)
            go_on.set()
        assert [m.get("status") for m in served] == [200, None]
        assert answers[0][0]["status"] == (503 if raises else 200)
        assert middleware._active == {}

    def test_the_limit_must_be_a_positive_int(self) -> None:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="max_concurrent_per_user"):
                AmbientMiddleware(
                    build()[0].app,
                    registry=Registry(),
                    identity=trusted_header(),
                    max_concurrent_per_user=bad,  # type: ignore[arg-type]
                )


class TestConstruction:
    def test_bad_arguments_are_refused(self) -> None:
        app = build()[0].app
        with pytest.raises(TypeError, match="ambient.Registry"):
            AmbientMiddleware(app, registry=object(), identity=trusted_header())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="identity resolver"):
            AmbientMiddleware(app, registry=Registry(), identity=None)
        with pytest.raises(TypeError, match="callable"):
            AmbientMiddleware(app, registry=Registry(), identity="x-user-id")  # type: ignore[arg-type]
        for name in ("x y", "x-id\r\nset-cookie", "x\tid", "x:id", "", "x-idé"):
            for option in ("request_id_header", "thread_id_header"):
                with pytest.raises(ValueError, match="header name"):
                    AmbientMiddleware(
                        app, registry=Registry(), identity=trusted_header(), **{option: name}
                    )
        with pytest.raises(ValueError, match="CIDR"):
            trusted_header(trusted=("10.0.0.1/8",))
        with pytest.raises(ValueError, match="no network"):
            trusted_header(trusted=())

    @pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0"])
    async def test_trusting_every_address_is_warned_about(
        self, everyone: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Trusting 0.0.0.0/0 or ::/0 lets any client claim any user: allowed (a platform
        may guarantee it), but said loudly at construction."""
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            trusted_header(trusted=("10.0.0.0/8", everyone))
        assert [r.getMessage() for r in caplog.records if everyone in r.getMessage()] == [
            f"ambient: the trusted network {everyone} is every address: any client can "
            "assert any identity; name the networks of the proxies that set it"
        ]

    @pytest.mark.parametrize(
        ("halves", "version"),
        [(("0.0.0.0/1", "128.0.0.0/1"), 4), (("::/1", "8000::/1", "10.0.0.0/8"), 6)],
    )
    async def test_networks_that_together_are_every_address_are_warned_about(
        self, halves: tuple[str, ...], version: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            trusted_header(trusted=halves)
            trusted_header(trusted=halves[:1])  # half of them: no warning
        said = [r.getMessage() for r in caplog.records if "together" in r.getMessage()]
        named = ", ".join(h for h in halves if ":" in h) if version == 6 else ", ".join(halves)
        assert said == [
            f"ambient: the trusted networks {named} are together every IPv{version} address: "
            "any client can assert any identity; name the networks of the proxies that set it"
        ]


async def drive(app: Any, scope: dict[str, Any], incoming: list[Message]) -> list[Message]:
    """Run one ASGI call with scripted input; return what the app sent."""
    sent: list[Message] = []
    queue = list(incoming)
    more = anyio.Event()

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await more.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


class Session:
    """A USER component that knows whether it is still open."""

    open = True


def _noted_session(
    order: list[str], note: str
) -> Callable[[ambient.UserRef], AsyncIterator[Session]]:
    """A factory of :class:`Session` whose close appends ``note`` to ``order``."""

    async def session(user: ambient.UserRef) -> AsyncIterator[Session]:
        component = Session()
        try:
            yield component
        finally:
            component.open = False
            order.append(note)

    return session


class Link:
    """A USER component that knows whether it is still open."""

    open = True


def _noted_link(order: list[str], note: str) -> Callable[[ambient.UserRef], AsyncIterator[Link]]:
    """A factory of :class:`Link` whose close appends ``note`` to ``order``."""

    async def link(user: ambient.UserRef) -> AsyncIterator[Link]:
        component = Link()
        try:
            yield component
        finally:
            component.open = False
            order.append(note)

    return link


def _link_held_by_a_consumer(
    order: list[str], stop: anyio.Event, *, cleanup_timeout: float
) -> tuple[Registry, Callable[..., Awaitable[None]]]:
    """A registry (with ``cleanup_timeout``) whose USER :class:`Link` notes its close in
    ``order``, and a task of the app's own for ``tg.start()``: a scope of user "system"
    holding its link until ``stop``, then noting whether the link was still open."""
    registry = Registry(cleanup_timeout=cleanup_timeout)
    BUILT.append(registry)
    registry.register(Link, _noted_link(order, "link closed"), lifetime=Lifetime.USER)

    async def consumer(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with registry.open_scope(UserExecutionContext.create("system")):
            own = await ambient.resolve(Link)
            task_status.started()
            await stop.wait()
            order.append(f"consumer stopped, link open: {own.open}")

    return registry, consumer


async def _plain_lifespan(receive: Any, send: Any) -> None:
    """An app's lifespan with nothing to start or stop: it answers startup and shutdown."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def _tx_registry(seen: list[BaseException | None]) -> Registry:
    """A registry whose REQUEST "tx" notes how its request ended: the exception its cleanup
    saw, or ``None`` for a clean exit (a transaction around the ``yield`` commits then)."""
    registry = Registry()

    def tx(ctx: UserExecutionContext) -> Iterator[str]:
        try:
            yield ctx.user_id
        except Exception as exc:
            seen.append(exc)
            raise
        seen.append(None)

    registry.register("tx", tx)
    return registry


def ws_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "subprotocols": [],
        **extra,
    }


@pytest.mark.parametrize(
    ("code", "fails"),
    [(None, False), (1000, False), (1011, True), (4499, False), (4503, True), (4600, False)],
)
async def test_how_the_app_closes_a_websocket_tells_its_cleanups_how_it_ended(
    code: int | None, fails: bool
) -> None:
    """A close with a server error (1011, or 4000 plus a 5xx as Litestar sends) ends the
    socket's scope as failed; a normal close, or one whose code is None (the default 1000,
    as servers read it), as a clean end, without an error of the middleware's own."""
    seen: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await ambient.resolve("tx")
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": code})

    middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
    sent = await drive(
        middleware, ws_scope([(b"x-user-id", b"ann")]), [{"type": "websocket.connect"}]
    )
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert len(seen) == 1
    assert (seen[0] is not None) is fails


@pytest.mark.parametrize(
    "error",
    [
        IncompleteResponseError(started=True, client_gone=False),
        IncompleteResponseError(started=False),
        ServerErrorResponseError(502),
    ],
    ids=["cut-short", "unanswered", "server-error"],
)
def test_what_closes_a_scope_for_an_unfinished_answer_copies_and_pickles(
    error: Exception,
) -> None:
    """The error a scope is closed with when its request failed without raising (a cleanup
    may hand it to a process pool or a job queue, a reporter copies it) comes back from
    pickle and copy as it was, fields and message. Their keyword-only or extra constructor
    arguments made the default pickling raise TypeError when loading one."""
    for copied in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):  # noqa: S301 - our own bytes
        assert type(copied) is type(error)
        assert str(copied) == str(error)
        assert vars(copied) == vars(error)


@pytest.mark.parametrize(
    "error",
    [
        InvalidContextError("user_id", "must not be empty", "", echo=False),
        InvalidContextError("tenant_id", "too long", "t" * 300),
        InvalidTokenError("expired", "the context token expired 3s ago"),
        IdentityError("no credential", status=401, challenge='Bearer realm="api"'),
        NoActiveContextError("scope"),
        NoActiveContextError("USER", component="'db'"),
        RowSecurityError(["role app is a superuser", "table notes is not forced"]),
        TooManyRequestsError("ann has 9 requests in flight", retry_after=3.0),
        PoolExhaustedError("pool db at 10.0.0.5 is full", retry_after=2.0),
        IdentityUnavailableError("keys unreachable", retry_after=7.0),
        BroadcastError("redis down", retry_after=4.0),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_error_copies_and_pickles_with_its_message_and_fields(error: AmbientError) -> None:
    """An error a job queue or a process pool carries back (pickled), or a reporter copies,
    comes back as it was: same class, message, fields and HTTP answer. Errors whose message
    is built from their constructor's arguments could not be loaded (TypeError: missing
    arguments), or came back with another message."""
    for copied in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):  # noqa: S301 - our own bytes
        assert type(copied) is type(error)
        assert str(copied) == str(error)
        assert copied.args == error.args
        assert vars(copied) == vars(error)
        assert (copied.http_status, copied.retry_after, copied.challenge) == (
            error.http_status,
            error.retry_after,
            error.challenge,
        )


def test_a_cleanup_error_copies_and_pickles_with_its_failures() -> None:
    """A ``CleanupError`` comes back from pickle and copy as the same group of failures."""
    error = CleanupError("2 cleanups failed", [ValueError("tx"), KeyError("cache")])
    for copied in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):  # noqa: S301 - our own bytes
        assert type(copied) is CleanupError
        assert str(copied) == str(error)
        assert [repr(e) for e in copied.exceptions] == [repr(e) for e in error.exceptions]


@pytest.mark.parametrize(("status", "fails"), [(403, False), (500, True), (503, True)])
async def test_an_app_denying_a_handshake_with_a_5xx_fails_its_cleanups(
    status: int, fails: bool
) -> None:
    """An app denies the handshake itself through the ``websocket.http.response``
    extension (Quart answers a handler's bug before accept with a 500). A 5xx denial tells
    the request failed: the cleanups see a ``ServerErrorResponseError`` with its status and
    a transaction around the ``yield`` rolls back; a 403 is an answer like any other."""
    seen: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await ambient.resolve("tx")
        start = {"type": "websocket.http.response.start", "status": status, "headers": []}
        await send(start)
        await send({"type": "websocket.http.response.body", "body": b"no"})

    middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
    scope = ws_scope([(b"x-user-id", b"ann")], extensions={"websocket.http.response": {}})
    sent = await drive(middleware, scope, [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == status
    assert len(seen) == 1
    if fails:
        assert isinstance(seen[0], ServerErrorResponseError)
        assert str(status) in str(seen[0])
    else:
        assert seen == [None]


@pytest.mark.parametrize("second", [1000, 1011])
@pytest.mark.parametrize(
    "first", [{"code": 1000}, {}, {"code": None}], ids=["1000", "no-code", "code-none"]
)
async def test_a_second_close_never_reaches_the_server_yet_tells_a_later_failure(
    first: dict[str, Any], second: int
) -> None:
    """The app closes its accepted socket, then closes it again (Litestar closes the
    socket of a handler that raised, also one closed already), the first close maybe
    without a code (ASGI's default, 1000). uvicorn raises on a second close: only the
    first goes out. A second close telling a server error (1011) is still what the
    cleanups see, a transaction around the ``yield`` rolling back; a clean one hides
    nothing."""
    seen: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await ambient.resolve("tx")
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", **first})
        await send({"type": "websocket.close", "code": second})

    middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
    sent = await drive(
        middleware, ws_scope([(b"x-user-id", b"ann")]), [{"type": "websocket.connect"}]
    )
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1] == {"type": "websocket.close", **first}
    assert len(seen) == 1
    if second == 1011:
        assert isinstance(seen[0], ServerErrorResponseError)
    else:
        assert seen == [None]


@pytest.mark.parametrize("heard", [True, False], ids=["client-gone", "client-waiting"])
async def test_a_socket_whose_app_returns_before_accepting_tells_its_cleanups_why(
    heard: bool,
) -> None:
    """The app returns without answering the handshake. When it heard the client leave
    first (its ``receive`` answered ``websocket.disconnect``), the socket ended as its
    client ended it: the cleanups see a clean end, as for an accepted socket its client
    closed. When the client still waits, the server refuses the handshake (a 500 or 403):
    the cleanups see the unanswered handshake, an ``IncompleteResponseError``, and a
    transaction around the ``yield`` rolls back."""
    seen: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await ambient.resolve("tx")
        if heard:
            assert (await receive())["type"] == "websocket.disconnect"

    middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=trusted_header())
    incoming: list[Message] = [{"type": "websocket.connect"}]
    if heard:
        incoming.append({"type": "websocket.disconnect", "code": 1006})
    sent = await drive(middleware, ws_scope([(b"x-user-id", b"ann")]), incoming)
    assert sent == []
    assert len(seen) == 1
    if heard:
        assert seen == [None]
    else:
        assert isinstance(seen[0], IncompleteResponseError)
        assert seen[0].client_gone is False


@pytest.mark.parametrize(
    ("kind", "number", "fails"),
    [
        ("http", "200", False),
        ("http", "503", True),
        ("http", b"502", True),
        ("websocket", "1000", False),
        ("websocket", "1011", True),
        ("websocket", "4503", True),
    ],
)
async def test_a_status_or_close_code_sent_as_text_is_read_as_the_server_reads_it(
    kind: str, number: object, fails: bool
) -> None:
    """hypercorn reads a response's status and a websocket's close code with ``int()``, so
    ``"status": "200"`` goes out as a 200. The middleware compared the text with numbers
    once the app had returned: a ``TypeError`` to the server, and the request's scope never
    closed (its cleanups left to the garbage collector)."""
    seen: list[BaseException | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await ambient.resolve("tx")
        if kind == "http":
            await send({"type": "http.response.start", "status": number, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        else:
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": number})

    registry = _tx_registry(seen)
    middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    headers = [(b"x-user-id", b"ann")]
    if kind == "http":
        incoming: list[Message] = [{"type": "http.request", "body": b""}]
        sent = await drive(middleware, http_scope(headers), incoming)
    else:
        sent = await drive(middleware, ws_scope(headers), [{"type": "websocket.connect"}])
    assert len(sent) == 2
    assert registry.stats().open_scopes == 0
    assert len(seen) == 1
    assert (seen[0] is not None) is fails


class TestWebsocketRefusal:
    async def test_no_identity_closes_with_1008_before_accept(self) -> None:
        app, ledger, _ = build()
        sent = await drive(app, ws_scope([]), [{"type": "websocket.connect"}])
        assert len(sent) == 1
        assert sent[0]["type"] == "websocket.close"
        assert sent[0]["code"] == 1008
        assert "identity" in sent[0]["reason"]
        assert ledger.created == {}

    @pytest.mark.parametrize("extensions", [{}, {"websocket.http.response": {}}])
    async def test_a_client_gone_before_the_handshake_gets_no_answer(
        self, extensions: dict[str, Any]
    ) -> None:
        """The client went away before its handshake finished: a refusal has no one to
        go to, and nothing is sent (a server refuses a close or a response then)."""
        app, ledger, _ = build()
        scope = ws_scope([], extensions=extensions)
        sent = await drive(app, scope, [{"type": "websocket.disconnect", "code": 1006}])
        assert sent == []
        assert ledger.created == {}

    async def test_the_denial_response_extension_gets_a_problem_answer(self) -> None:
        """With the length of its body and its request id echoed, as on an HTTP
        refusal."""
        app, _, _ = build()
        scope = ws_scope(
            [(b"x-user-id", b"a"), (b"x-user-id", b"b"), (b"x-request-id", b"ws-req-1")],
            extensions={"websocket.http.response": {}},
        )
        sent = await drive(app, scope, [{"type": "websocket.connect"}])
        assert [m["type"] for m in sent] == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert sent[0]["status"] == 400
        body = sent[1]["body"]
        assert sent[0]["headers"] == [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", b"ws-req-1"),
        ]
        assert json.loads(body)["status"] == 400

    async def test_a_long_reason_is_cut_to_the_close_frame_limit(self) -> None:
        async def resolver(scope: Any) -> Identity:
            raise IdentityError("é" * 200)

        app, _, _ = build(resolver)
        sent = await drive(app, ws_scope([]), [{"type": "websocket.connect"}])
        assert sent[0]["code"] == 1008
        reason = sent[0]["reason"].encode()
        assert 120 <= len(reason) <= 123
        assert reason.decode() == "é" * (len(reason) // 2)


async def _registry_closed_at_shutdown(lifespan: Callable[[Any, Any], Awaitable[None]]) -> None:
    """An app whose lifespan is ``lifespan(receive, send)`` serves user a one request that
    resolves the USER ``Memory``; a lifespan run by hand then gets its startup and
    shutdown answered, and the registry closed: Memory cleaned then, not before, and no
    problem in the ledger."""
    ledger = Ledger()
    registry = build_registry(ledger)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await ambient.resolve(Memory)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    async with client(middleware) as http:
        await http.get("/", headers={"x-user-id": "a"})
    assert ledger.cleaned == {}
    sent: list[Message] = []
    with anyio.fail_after(5):
        await run_lifespan(middleware, sent)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert ledger.cleaned
    assert ledger.problems() == []


async def run_lifespan(middleware: AmbientMiddleware, sent: list[Message]) -> None:
    """A server's lifespan through ``middleware``: startup, then shutdown; what the
    middleware sends goes to ``sent``."""
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)


class TestLifespan:
    async def test_shutdown_closes_user_components_before_the_apps_own_shutdown(self) -> None:
        """USER components are made from what the app's startup made, so they are closed
        first: when the app receives ``lifespan.shutdown``, before its hooks run."""
        ledger = Ledger()
        registry = build_registry(ledger)
        order: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    else:
                        order.append(f"app shutdown hooks, {len(ledger.cleaned)} cleaned")
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            await ambient.resolve(Memory)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        async with client(middleware) as http:
            for user in ("a", "b", "c"):
                await http.get("/", headers={"x-user-id": user})
        assert len(ledger.created) == 3
        assert ledger.cleaned == {}

        sent: list[Message] = []

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                order.append(f"server told, {len(ledger.cleaned)} cleaned")
            sent.append(message)

        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> Message:
            return incoming.pop(0)

        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert order == ["app shutdown hooks, 3 cleaned", "server told, 3 cleaned"]
        assert ledger.problems() == []

    async def test_shutdown_waits_for_requests_still_cleaning_up(self) -> None:
        """A request the server cancelled at its shutdown deadline may still be cleaning up,
        using its user's USER component, when lifespan shutdown starts: the registry is
        closed once that cleanup is done, never under it."""
        order: list[str] = []
        cleanup_started = anyio.Event()
        finish_cleanup = anyio.Event()
        registry = Registry()
        BUILT.append(registry)

        session = _noted_session(order, "user component closed")

        async def unit_of_work() -> AsyncIterator[str]:
            user_session = await ambient.resolve(Session)
            try:
                yield "work"
            finally:
                cleanup_started.set()
                await finish_cleanup.wait()
                order.append(f"request cleanup, session open: {user_session.open}")

        registry.register(Session, session, lifetime=Lifetime.USER)
        registry.register("work", unit_of_work)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _plain_lifespan(receive, send)
                return
            await ambient.resolve("work")
            await anyio.sleep_forever()  # until the server gives up on it

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        shutting_down = anyio.Event()

        async def lifespan_receive() -> Message:
            message = incoming.pop(0)
            if message["type"] == "lifespan.shutdown":
                shutting_down.set()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown"):
                order.append(message["type"])

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: Message) -> None:
            pass

        with anyio.fail_after(10):
            async with anyio.create_task_group() as server:
                request_scope = http_scope(headers=[(b"x-user-id", b"alice")])
                server.start_soon(middleware, request_scope, receive, send)
                await anyio.wait_all_tasks_blocked()
                server.cancel_scope.cancel()  # the graceful-shutdown deadline
                with anyio.CancelScope(shield=True):
                    await cleanup_started.wait()
                    async with anyio.create_task_group() as lifespan:
                        lifespan.start_soon(
                            middleware,
                            {"type": "lifespan", "asgi": {"version": "3.0"}},
                            lifespan_receive,
                            lifespan_send,
                        )
                        await shutting_down.wait()
                        await anyio.wait_all_tasks_blocked()
                        assert order == []  # the registry waits for the request's cleanup
                        finish_cleanup.set()
        assert order == [
            "request cleanup, session open: True",
            "user component closed",
            "lifespan.shutdown.complete",
        ]
        assert registry.stats().open_scopes == 0

    async def test_a_scope_the_apps_startup_opened_is_ended_by_its_shutdown_first(
        self,
    ) -> None:
        """A consumer the app starts at startup works in a scope of its own, with a USER
        component, until the app's shutdown stops it. Shutdown used to wait the whole
        cleanup_timeout for that scope (only the app's shutdown, not yet run, could end it),
        then close the consumer's component under it. The registry is closed after the
        app's shutdown now, at once, and the consumer finds its component open to the end."""
        order: list[str] = []
        registry = Registry(cleanup_timeout=30)
        BUILT.append(registry)

        session = _noted_session(order, "session closed")

        registry.register(Session, session, lifetime=Lifetime.USER)
        stop = anyio.Event()

        async def consumer(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with registry.open_scope(UserExecutionContext.create("system")):
                own = await ambient.resolve(Session)
                task_status.started()
                await stop.wait()
                order.append(f"consumer stopped, session open: {own.open}")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "lifespan"
            async with anyio.create_task_group() as tg:
                assert (await receive())["type"] == "lifespan.startup"
                await tg.start(consumer)
                await send({"type": "lifespan.startup.complete"})
                assert (await receive())["type"] == "lifespan.shutdown"
                order.append("app shutdown")
                stop.set()
            await send({"type": "lifespan.shutdown.complete"})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        sent: list[Message] = []
        with anyio.fail_after(10):  # far less than the cleanup_timeout it used to wait
            await run_lifespan(middleware, sent)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        assert order == ["app shutdown", "consumer stopped, session open: True", "session closed"]
        assert registry.stats().open_scopes == 0

    async def test_shutdown_waits_while_a_requests_cleanups_go_on(self) -> None:
        """A request cancelled at the server's shutdown deadline has two cleanups of 0.6 s
        each, each within cleanup_timeout=1: shutdown used to give up on it after one
        cleanup_timeout in all and close the user's component under its second cleanup."""
        order: list[str] = []
        registry = Registry(cleanup_timeout=1)
        BUILT.append(registry)
        cleaning = anyio.Event()

        session = _noted_session(order, "session closed")

        def step(name: str) -> Callable[[], AsyncIterator[str]]:
            async def make() -> AsyncIterator[str]:
                own = await ambient.resolve(Session)
                try:
                    yield name
                finally:
                    cleaning.set()
                    await anyio.sleep(0.6)  # a cleanup's own round trip, within its bound
                    order.append(f"{name} cleaned, session open: {own.open}")

            return make

        registry.register(Session, session, lifetime=Lifetime.USER)
        registry.register("a", step("a"))
        registry.register("b", step("b"))

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _plain_lifespan(receive, send)
                return
            await ambient.resolve("a")
            await ambient.resolve("b")
            await anyio.sleep_forever()

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: Message) -> None:
            pass

        sent: list[Message] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as server:
                server.start_soon(
                    middleware, http_scope(headers=[(b"x-user-id", b"al")]), receive, send
                )
                await anyio.wait_all_tasks_blocked()
                server.cancel_scope.cancel()  # the graceful-shutdown deadline
                with anyio.CancelScope(shield=True):
                    await cleaning.wait()
                    await run_lifespan(middleware, sent)
        assert order == [
            "b cleaned, session open: True",
            "a cleaned, session open: True",
            "session closed",
        ]
        assert sent[-1]["type"] == "lifespan.shutdown.complete"

    async def test_an_app_without_lifespan_support_still_gets_the_registry_closed(self) -> None:
        async def lifespan(receive: Any, send: Any) -> None:
            raise AssertionError("lifespan is not supported")

        await _registry_closed_at_shutdown(lifespan)

    async def test_an_app_that_returns_after_its_startup_still_gets_the_registry_closed(
        self,
    ) -> None:
        """An app whose lifespan answers ``lifespan.startup`` and returns (it has nothing to
        stop) never receives ``lifespan.shutdown``: the server, seeing the app's lifespan
        over, sends it to nobody. The middleware returned with the app, so the USER
        components of its requests were never closed at shutdown."""

        async def lifespan(receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})

        await _registry_closed_at_shutdown(lifespan)

    async def test_a_failing_startup_is_reported_by_the_app_and_raised(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "db down"})
            msg = "db down"
            raise ConnectionError(msg)

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        async def send(message: Message) -> None:
            sent.append(message)

        with pytest.raises(ConnectionError):
            await middleware({"type": "lifespan"}, receive, send)
        assert [m["type"] for m in sent] == ["lifespan.startup.failed"]

    async def test_a_failed_startup_closes_the_registry_before_the_server_hears_it(
        self,
    ) -> None:
        """The app makes an APP component at startup (a scope of its own), then fails its
        startup: the server exits on ``lifespan.startup.failed`` and sends no shutdown, so
        the component was never closed. It is closed before the failure goes out."""
        order: list[str] = []
        registry = Registry()
        BUILT.append(registry)

        async def session() -> AsyncIterator[Session]:
            yield Session()
            order.append("app component closed")

        registry.register(Session, session, lifetime=Lifetime.APP)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "lifespan.startup"
            async with registry.open_scope(UserExecutionContext.create("startup")):
                await ambient.resolve(Session)
            await send({"type": "lifespan.startup.failed", "message": "no database"})

        async def send(message: Message) -> None:
            order.append(f"server told {message['type']}")

        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        with anyio.fail_after(5):
            await middleware({"type": "lifespan"}, receive, send)
        assert order == ["app component closed", "server told lifespan.startup.failed"]

    async def test_a_startup_that_raises_is_raised_not_answered_as_complete(self) -> None:
        """The app receives ``lifespan.startup`` and raises without answering (a database
        unreachable at startup): the server gets the exception, as it would without the
        middleware, never a ``startup.complete`` the app did not send."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "lifespan.startup"
            msg = "database unreachable"
            raise ConnectionError(msg)

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        sent: list[Message] = []
        with pytest.raises(ConnectionError, match="database unreachable"):
            await run_lifespan(middleware, sent)
        assert sent == []

    @pytest.mark.parametrize("answered", [False, True], ids=["raises", "answers-and-raises"])
    async def test_a_lifespan_that_fails_while_serving_is_answered_at_the_servers_shutdown(
        self, answered: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A task the app's lifespan started crashes while the server serves; the app
        raises (after sending ``lifespan.shutdown.failed`` unasked, as Starlette does).
        Raised to the server, that left it serving and skipping its shutdown, so the
        registry was never closed (or closed at once, under the requests to come). The
        failure is logged once and kept from the server, the registry serves requests on,
        and the server's shutdown closes it and hears that the app's shutdown failed."""
        ledger = Ledger()
        registry = build_registry(ledger)
        crash = anyio.Event()

        async def crash_when_asked() -> None:
            await crash.wait()
            msg = "the background loop died"
            raise RuntimeError(msg)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                await ambient.resolve(Memory)
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            assert (await receive())["type"] == "lifespan.startup"
            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(crash_when_asked)
                    await send({"type": "lifespan.startup.complete"})
                    await receive()
            except Exception:
                if answered:
                    await send({"type": "lifespan.shutdown.failed", "message": "traceback"})
                raise

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        to_app, incoming = anyio.create_memory_object_stream[Message](2)
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        caplog.set_level(logging.ERROR, logger="ambient.middleware")
        with anyio.fail_after(5), to_app, incoming:
            async with anyio.create_task_group() as server:
                scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
                server.start_soon(middleware, scope, incoming.receive, send)
                await to_app.send({"type": "lifespan.startup"})
                await anyio.wait_all_tasks_blocked()
                crash.set()
                await anyio.wait_all_tasks_blocked()
                assert [m["type"] for m in sent] == ["lifespan.startup.complete"]
                async with client(middleware) as http:
                    for user in ("ann", "bob"):
                        await http.get("/", headers={"x-user-id": user})
                assert (len(ledger.created), ledger.cleaned) == (2, {})
                await to_app.send({"type": "lifespan.shutdown"})
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.failed",
        ]
        assert "RuntimeError('the background loop died')" in sent[1]["message"]
        assert ledger.problems() == []
        logged = [r for r in caplog.records if r.name == "ambient.middleware"]
        assert [r.levelno for r in logged] == [logging.ERROR]
        assert isinstance(logged[0].exc_info and logged[0].exc_info[1], ExceptionGroup)

    async def test_a_lifespan_that_fails_while_the_registry_closes_still_gets_it_closed(
        self,
    ) -> None:
        """The server sends its shutdown while a request is still under way, so the
        middleware waits for it before it closes the registry; meanwhile a task the app's
        lifespan started crashes. The failure reaches the server, as without the
        middleware, and the registry is closed all the same once the request is done. The
        crash cut the wait short and the registry was never closed: alice's Memory (USER)
        was never cleaned."""
        ledger = Ledger()
        registry = build_registry(ledger)
        crash, release = anyio.Event(), anyio.Event()

        async def crash_when_asked() -> None:
            await crash.wait()
            msg = "the background loop died"
            raise RuntimeError(msg)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                await ambient.resolve(Memory)
                await release.wait()
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            assert (await receive())["type"] == "lifespan.startup"
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(crash_when_asked)
                await send({"type": "lifespan.startup.complete"})
                await receive()
                tasks.cancel_scope.cancel()
            await send({"type": "lifespan.shutdown.complete"})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        to_app, incoming = anyio.create_memory_object_stream[Message](2)
        sent: list[Message] = []
        failures: list[BaseException] = []

        async def send(message: Message) -> None:
            sent.append(message)

        async def lifespan() -> None:
            try:
                await middleware({"type": "lifespan"}, incoming.receive, send)
            except Exception as error:
                failures.append(error)

        with anyio.fail_after(5), to_app, incoming:
            async with anyio.create_task_group() as server, client(middleware) as http:
                server.start_soon(lifespan)
                await to_app.send({"type": "lifespan.startup"})
                server.start_soon(functools.partial(http.get, "/", headers={"x-user-id": "alice"}))
                await anyio.wait_all_tasks_blocked()
                assert len(ledger.created) == 1
                await to_app.send({"type": "lifespan.shutdown"})
                await anyio.wait_all_tasks_blocked()
                crash.set()
                await anyio.wait_all_tasks_blocked()
                release.set()
        assert [m["type"] for m in sent] == ["lifespan.startup.complete"]
        [failure] = failures
        assert isinstance(failure, ExceptionGroup)
        assert failure.split(RuntimeError)[0] is not None
        assert ledger.problems() == []

    async def test_other_scope_types_pass_through(self) -> None:
        seen: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["type"])
            assert ambient.current_context_or_none() is None

        middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
        await middleware({"type": "webtransport"}, None, None)  # type: ignore[arg-type]
        assert seen == ["webtransport"]

    async def test_an_app_that_takes_its_startup_and_returns_unanswered_is_answered_once(
        self,
    ) -> None:
        """An app that receives ``lifespan.startup`` and returns without a word (a lifespan
        it does not support, read and dropped) has the startup answered for it: the startup
        it took is not waited for again, which would take the server's shutdown for it and
        leave the registry open, waiting for a message that never comes."""

        async def lifespan(receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "lifespan.startup"

        await _registry_closed_at_shutdown(lifespan)

    async def test_an_app_that_receives_on_after_its_shutdown_is_heard_to_complete_it(
        self,
    ) -> None:
        """An app whose lifespan reads its messages in a task of its own, which goes back
        to ``receive`` after the shutdown (it reads until cancelled), answers the shutdown
        while that receive waits: the server hears the answer. Taken for an app still
        serving, its answer would be held for a shutdown that came already, and the server
        would never hear it."""
        ledger = Ledger()
        registry = build_registry(ledger)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "lifespan"
            shutdown = anyio.Event()

            async def listen() -> None:
                told = False
                while True:
                    if told:
                        shutdown.set()  # then back to receive, before the answer below
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    else:
                        told = True

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await shutdown.wait()
                await send({"type": "lifespan.shutdown.complete"})
                tg.cancel_scope.cancel()

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[Message] = []

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.fail_after(5):
            await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        assert ledger.problems() == []

    async def test_shutdown_gives_up_on_a_request_whose_cleanup_made_no_progress(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A request the server cancelled at its shutdown deadline that goes on past a whole
        ``cleanup_timeout`` without any cleanup ending (a shielded wait that never returns)
        does not hold the shutdown: the registry is closed under it, with a warning."""
        order: list[str] = []
        registry = Registry(cleanup_timeout=0.2)
        BUILT.append(registry)
        registry.register(Link, _noted_link(order, "link closed"), lifetime=Lifetime.USER)
        holding = anyio.Event()
        release = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await _plain_lifespan(receive, send)
                return
            own = await ambient.resolve(Link)
            with anyio.CancelScope(shield=True):
                holding.set()
                await release.wait()
            order.append(f"request released, link open: {own.open}")

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError

        async def send(message: Message) -> None:
            pass

        sent: list[Message] = []
        with (
            anyio.fail_after(10),
            caplog.at_level(logging.WARNING, logger="ambient.middleware"),
        ):
            async with anyio.create_task_group() as server:
                server.start_soon(
                    middleware, http_scope(headers=[(b"x-user-id", b"al")]), receive, send
                )
                await holding.wait()
                server.cancel_scope.cancel()  # the graceful-shutdown deadline
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(5):
                            await run_lifespan(middleware, sent)
                        order.append("shutdown answered")
                    finally:
                        release.set()
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        assert order == [
            "link closed",
            "shutdown answered",
            "request released, link open: False",
        ]
        warned = [r.getMessage() for r in caplog.records]
        assert any("1 request(s) still cleaning up" in message for message in warned), warned

    async def test_shutdown_waits_for_a_scope_the_apps_shutdown_told_to_end(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An app whose shutdown tells its consumer to stop and answers at once, without
        waiting for it: the registry is closed once the consumer's scope has closed, its
        component open to its end, and nothing is warned of."""
        order: list[str] = []
        stop = anyio.Event()
        registry, consumer = _link_held_by_a_consumer(order, stop, cleanup_timeout=30)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "lifespan"
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            stop.set()
            await send({"type": "lifespan.shutdown.complete"})

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        sent: list[Message] = []
        with (
            anyio.fail_after(10),  # far less than the cleanup_timeout
            caplog.at_level(logging.WARNING, logger="ambient.middleware"),
        ):
            async with anyio.create_task_group() as tg:
                await tg.start(consumer)
                await run_lifespan(middleware, sent)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        assert order == ["consumer stopped, link open: True", "link closed"]
        assert not caplog.records

    async def test_shutdown_closes_the_registry_under_a_scope_the_apps_shutdown_left_open(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A scope the app opened itself that its own shutdown did not end is waited for a
        ``cleanup_timeout`` after that shutdown, then the registry is closed under it, with
        a warning naming it, and the server hears the shutdown complete."""
        order: list[str] = []
        stop = anyio.Event()
        registry, consumer = _link_held_by_a_consumer(order, stop, cleanup_timeout=0.2)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "lifespan"
            await _plain_lifespan(receive, send)
            order.append("app shutdown over")

        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        sent: list[Message] = []
        with (
            anyio.fail_after(10),
            caplog.at_level(logging.WARNING, logger="ambient.middleware"),
        ):
            async with anyio.create_task_group() as tg:
                await tg.start(consumer)
                await run_lifespan(middleware, sent)
                stop.set()
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        assert order == [
            "link closed",
            "app shutdown over",
            "consumer stopped, link open: False",
        ]
        warned = [r.getMessage() for r in caplog.records]
        assert any("1 scope(s) still open" in message for message in warned), warned


async def test_user_components_are_shared_by_one_users_requests_only() -> None:
    app, ledger, registry = build()
    async with client(app) as http:
        bodies = [
            (await http.get("/whoami", headers={"x-user-id": user})).json()
            for user in ("a", "b", "a", "b", "a")
        ]
    memories = {body["user"]: set() for body in bodies}
    for body in bodies:
        memories[body["user"]].add(body["memory"])
        assert body["memory_user"] == body["user"]
    assert all(len(numbers) == 1 for numbers in memories.values())
    assert memories["a"] != memories["b"]
    assert len({body["probe"] for body in bodies}) == 5
    await registry.aclose()
    assert ledger.problems() == []


class _Conn:
    """A REQUEST component standing for a pooled connection: whose it is, and if it closed."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.closed = 0


async def test_work_a_request_leaves_on_a_service_task_group_gets_no_component_of_anyones() -> None:
    """Each of 20 users' requests starts a job on a task group that outlives it (a service
    nursery opened at startup, where a trio task copies its starter's context) and answers.
    Every request's component is cleaned as its request ends, not held back by its job. The
    jobs then run while 20 other users' requests hold their own components: each sees no
    user or its own starter only, and resolving the component is a ScopeClosedError, never
    the closed component nor one of a request still in flight."""
    registry = Registry()
    made: list[_Conn] = []

    def conn(ctx: UserExecutionContext) -> Iterator[_Conn]:
        made.append(component := _Conn(ctx.user_id))
        yield component
        component.closed += 1

    registry.register(_Conn, conn)
    release = anyio.Event()
    jobs_done = anyio.Event()
    late_in = anyio.Event()
    outcomes: dict[str, tuple[str | None, object]] = {}
    service: anyio.abc.TaskGroup | None = None

    async def job(starter: str) -> None:
        await release.wait()
        seen = ambient.current_context_or_none()
        try:
            got: object = await ambient.resolve(_Conn)
        except ambient.ScopeClosedError as exc:
            got = exc
        outcomes[starter] = (None if seen is None else seen.user_id, got)
        if len(outcomes) == 20:
            jobs_done.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = ambient.get_current_context().user_id
        mine = await ambient.resolve(_Conn)
        assert mine.user == user
        if user.startswith("early"):
            assert service is not None
            service.start_soon(job, user)
        else:
            if sum(c.user.startswith("late") for c in made) == 20:
                late_in.set()
            await jobs_done.wait()
            assert await ambient.resolve(_Conn) is mine
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": user.encode()})

    wrapped = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    with anyio.fail_after(30):
        async with anyio.create_task_group() as service, client(wrapped) as http:

            async def call(user: str) -> None:
                answer = await http.get("/", headers={"x-user-id": user})
                assert (answer.status_code, answer.text) == (200, user)

            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(call, f"early-{n}")
            assert sorted(c.user for c in made) == sorted(f"early-{n}" for n in range(20))
            assert all(c.closed == 1 for c in made)
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(call, f"late-{n}")
                await late_in.wait()
                release.set()
    assert set(outcomes) == {f"early-{n}" for n in range(20)}
    for starter, (seen, got) in outcomes.items():
        assert seen in (None, starter), (starter, seen)
        assert isinstance(got, ambient.ScopeClosedError), (starter, got)
    assert all(c.closed == 1 for c in made)
    await registry.aclose()


class TestContinuedRuns:
    async def test_an_identity_with_a_parent_continues_its_run(self) -> None:
        parent = UserExecutionContext.create("ann", tenant_id="t1", thread_id="th-1")

        def resolver(scope: Any) -> Identity:
            headers = dict(scope["headers"])
            user = headers.get(b"x-as", b"ann").decode()
            return Identity(user, headers.get(b"x-tenant", b"t1").decode(), parent=parent)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            body = json.dumps(
                {
                    "user": ctx.user_id,
                    "thread": ctx.thread_id,
                    "parent": ctx.parent_run_id,
                    "depth": ctx.depth,
                    "run": ctx.run_id,
                }
            ).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=resolver)
        async with client(middleware) as http:
            continued = await http.get("/")
            mismatch = await http.get("/", headers={"x-as": "mallory"})
            other_tenant = await http.get("/", headers={"x-tenant": "t2"})
        body = continued.json()
        assert (body["user"], body["thread"], body["parent"], body["depth"]) == (
            "ann",
            "th-1",
            parent.run_id,
            1,
        )
        assert body["run"] != parent.run_id
        assert "different users" in assert_problem(mismatch, 400)["detail"]
        # The same user id in another tenant is another user.
        assert "different users" in assert_problem(other_tenant, 400)["detail"]

    async def test_a_websocket_continuing_a_run_is_a_connection_of_its_own(self) -> None:
        """A websocket that continues another run gets a connection id of its own, fresh
        for each socket, as any websocket does (never the parent's, nor none)."""
        parent = UserExecutionContext.create("ann", tenant_id="t1")

        def resolver(scope: Any) -> Identity:
            return Identity("ann", "t1", parent=parent)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            ctx = ambient.get_current_context()
            text = json.dumps([ctx.connection_id, ctx.parent_run_id])
            await send({"type": "websocket.send", "text": text})
            await send({"type": "websocket.close", "code": 1000})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=resolver)
        seen = []
        for _ in range(2):
            sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
            seen.append(json.loads(sent[1]["text"]))
        connections = {connection for connection, _ in seen}
        assert None not in connections
        assert len(connections) == 2
        assert parent.connection_id not in connections
        assert [run for _, run in seen] == [parent.run_id, parent.run_id]

    async def test_a_continued_run_echoes_a_request_id_of_its_own(self) -> None:
        """A request that continues another run keeps the parent's request id in its
        context, yet its answer echoes an id of its own: a fresh one for each request when
        the client sent none, else the client's."""
        parent = UserExecutionContext.create("ann", tenant_id="t1")

        def resolver(scope: Any) -> Identity:
            return Identity("ann", "t1", parent=parent)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = ambient.get_current_context().request_id.encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=resolver)
        async with client(middleware) as http:
            first = await http.get("/")
            second = await http.get("/")
            named = await http.get("/", headers={"x-request-id": "req-7"})
        assert {first.text, second.text, named.text} == {parent.request_id}
        echoed = {first.headers["x-request-id"], second.headers["x-request-id"]}
        assert len(echoed) == 2
        assert parent.request_id not in echoed
        assert named.headers["x-request-id"] == "req-7"


def _thread_recorder(seen: list[str]) -> AmbientMiddleware:
    """A socket app behind the middleware (thread ids also from ``?thread=``) that notes
    the thread id of each socket it serves."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(ambient.get_current_context().thread_id)
        await receive()
        await send({"type": "websocket.close", "code": 1000})

    return AmbientMiddleware(
        app, registry=Registry(), identity=trusted_header(), thread_id_query="thread"
    )


class TestWebsocketThreadQuery:
    async def test_a_browser_socket_names_its_thread_in_the_query(self) -> None:
        seen: list[str] = []
        middleware = _thread_recorder(seen)
        user = [(b"x-user-id", b"ann")]
        await drive(
            middleware,
            ws_scope(user, query_string=b"thread=t-%C3%A9"),
            [{"type": "websocket.connect"}],
        )
        twice = await drive(
            middleware,
            ws_scope([*user, (b"x-thread-id", b"a")], query_string=b"thread=b"),
            [{"type": "websocket.connect"}],
        )
        assert seen == ["t-é"]
        assert twice[0]["code"] == 1008
        assert "2 times" in twice[0]["reason"]

    async def test_an_http_request_takes_no_thread_id_from_its_query(self) -> None:
        """The query names a socket's thread only: an HTTP request can set headers, and a
        ``?thread=`` in a link someone follows must not put them in another thread."""
        seen: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(ambient.get_current_context().thread_id)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), thread_id_query="thread"
        )
        user = [(b"x-user-id", b"ann")]
        request: list[Message] = [{"type": "http.request", "body": b""}]
        await drive(middleware, http_scope(user, query_string=b"thread=t-1"), request)
        await drive(
            middleware,
            http_scope([*user, (b"x-thread-id", b"t-2")], query_string=b"thread=t-1"),
            request,
        )
        assert len(seen) == 2
        assert seen[0] != "t-1"
        assert seen[1] == "t-2"

    async def test_a_thread_id_sent_twice_or_not_utf8_is_an_invalid_context_named_as_sent(
        self,
    ) -> None:
        """A thread id sent twice or not in UTF-8 was refused as an "Invalid identity"
        (other broken thread ids are an invalid request context), and one sent in the query
        was said to have come in the x-thread-id header."""
        entered: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            entered.append(ambient.get_current_context().thread_id)

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), thread_id_query="thread"
        )
        user = [(b"x-user-id", b"ann")]
        request: list[Message] = [{"type": "http.request", "body": b""}]
        for headers, detail in (
            ([(b"x-thread-id", b"a"), (b"x-thread-id", b"b")], "was sent 2 times"),
            ([(b"x-thread-id", b"t-\xff")], "is not valid UTF-8"),
        ):
            sent = await drive(middleware, http_scope([*user, *headers]), request)
            body = json.loads(sent[1]["body"])
            assert (sent[0]["status"], body["type"], body["detail"]) == (
                400,
                "urn:ambient:problem:invalid-context",
                f"thread_id is invalid: {detail} (the x-thread-id header)",
            )
        for query in (b"thread=a&thread=b", b"thread=t-%FF"):
            closed = await drive(
                middleware, ws_scope(user, query_string=query), [{"type": "websocket.connect"}]
            )
            assert closed[0]["code"] == 1008
            assert closed[0]["reason"].endswith(
                "(the x-thread-id header or the thread query parameter)"
            )
        assert entered == []

    async def test_a_query_thread_id_that_is_not_utf8_is_refused_as_the_headers_is(
        self,
    ) -> None:
        """``%FF`` and ``%FE`` are two different ids, neither UTF-8: both are refused (1008)
        as the same bytes in the header are, never both read as U+FFFD, one thread."""
        entered: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            entered.append(ambient.get_current_context().thread_id)

        middleware = AmbientMiddleware(
            app, registry=Registry(), identity=trusted_header(), thread_id_query="thread"
        )
        user = [(b"x-user-id", b"ann")]
        for raw in (b"%FF", b"%FE", b"t-%FF"):
            by_query = await drive(
                middleware,
                ws_scope(user, query_string=b"thread=" + raw),
                [{"type": "websocket.connect"}],
            )
            by_header = await drive(
                middleware,
                ws_scope([*user, (b"x-thread-id", urllib.parse.unquote_to_bytes(raw))]),
                [{"type": "websocket.connect"}],
            )
            assert [m["type"] for m in by_query] == ["websocket.close"]
            assert (by_query[0]["code"], by_query[0]["reason"]) == (
                by_header[0]["code"],
                by_header[0]["reason"],
            )
            assert by_query[0]["code"] == 1008
        assert entered == []


class TestWebsocketIdentityExpiry:
    """A websocket never outlives its identity's ``expires_at``: the app is cancelled and
    the socket closed with 4001, and nothing more runs under the expired context."""

    @staticmethod
    def expiring(seconds: float) -> Any:
        def resolve(scope: Any) -> Identity:
            return Identity("ann", expires_at=time.time() + seconds)

        return resolve

    async def test_an_open_socket_is_closed_with_4001_at_expiry(self) -> None:
        """The connection's components are cleaned, told that its work was cut short
        (IncompleteResponseError), not that it ended cleanly."""
        handled: list[str] = []
        cleaned: list[str] = []
        ended_by: list[Exception] = []
        registry = Registry()

        def session(ctx: UserExecutionContext) -> Iterator[str]:
            try:
                yield ctx.user_id
            except Exception as error:
                ended_by.append(error)
                raise
            finally:
                cleaned.append(ctx.user_id)

        registry.register("session", session)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            handled.append(await ambient.resolve("session"))
            while True:
                message = await receive()  # the client stays silent: only expiry ends this
                handled.append(message["type"])

        middleware = AmbientMiddleware(app, registry=registry, identity=self.expiring(0.3))
        started = time.monotonic()
        sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        waited = time.monotonic() - started
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == 4001
        # Told at the expiry that the client is gone; receiving on, cancelled a second (the
        # grace) later.
        assert handled == ["ann", "websocket.disconnect"]
        assert cleaned == ["ann"]
        assert len(ended_by) == 1
        assert isinstance(ended_by[0], IncompleteResponseError)
        assert 0.2 < waited < 2.0

    async def test_a_message_received_after_expiry_never_reaches_the_app(self) -> None:
        """A message the server hands over once the identity has expired, before the loop
        got to cancel the app (here a receive that blocks past the expiry without yielding,
        as a busy loop can), is not handled as the expired user: the socket is closed with
        4001 instead."""
        handled: list[str] = []
        later = anyio.Event()
        messages = iter(["websocket.connect", "late"])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is None:
                await later.wait()
                return {"type": "websocket.disconnect", "code": 1000}
            if message == "late":
                time.sleep(0.3)  # noqa: ASYNC251 - the point: past the expiry, no checkpoint
                return {"type": "websocket.receive", "text": "late"}
            return {"type": message}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                handled.append(message.get("text", message["type"]))

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.2))
        with anyio.fail_after(10):
            await middleware(ws_scope([]), receive, send)
        # Told the client is gone instead.
        assert handled == ["websocket.disconnect"]
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == 4001

    async def test_an_app_busy_past_expiry_that_sends_and_returns_is_closed_with_4001(
        self,
    ) -> None:
        """An app busy past its identity's expiry (no checkpoint), which then sends a
        message and its own close and returns before the loop got to cancel it: neither
        goes out, the socket is closed with 4001 and its cleanups see its work cut off,
        not a clean end."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.2

        def ann(scope: Any) -> Identity:
            return Identity("ann", expires_at=expires_at)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await ambient.resolve("tx")
            await send({"type": "websocket.accept"})
            # The point: past the expiry, no checkpoint (within the grace, not cancelled).
            time.sleep(max(0.0, expires_at - time.time() + 0.05))  # noqa: ASYNC251
            await send({"type": "websocket.send", "text": "late"})
            await send({"type": "websocket.close", "code": 1000})

        middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=ann)
        sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert [(m["type"], m.get("code")) for m in sent] == [
            ("websocket.accept", None),
            ("websocket.close", 4001),
        ]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    async def test_a_disconnect_received_after_expiry_is_not_answered_with_a_close(
        self,
    ) -> None:
        """A client that hangs up just after the identity expired, before the loop got to
        cancel the app: the app is cancelled, but no close is sent on the socket the client
        already closed (uvicorn raises ClientDisconnected for a send after the disconnect)."""
        handled: list[str] = []
        messages = iter(["websocket.connect", "gone"])

        async def receive() -> dict[str, Any]:
            message = next(messages)
            if message == "gone":
                time.sleep(0.3)  # noqa: ASYNC251 - the point: past the expiry, no checkpoint
                return {"type": "websocket.disconnect", "code": 1000}
            return {"type": message}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            message = await receive()
            handled.append(message["type"])

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.2))
        with anyio.fail_after(10):
            await middleware(ws_scope([]), receive, send)
        assert [m["type"] for m in sent] == ["websocket.accept"]
        # The client's own disconnect: the app ends on it.
        assert handled == ["websocket.disconnect"]

    async def test_an_app_told_at_expiry_sends_nothing_more_and_may_raise(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past the expiry nothing the app sends goes out, and its ``receive`` answers
        that the client is gone (4001); an app that raises on that (Starlette's
        WebSocketDisconnect) ends as the expiry ends it: closed with 4001, its cleanups
        told its work was cut short, nothing raised to the server."""
        from starlette.websockets import WebSocketDisconnect

        from ambient.middleware import _asgi

        # The app's grace after it is told, long enough that a loaded machine cannot make
        # the app's step past the expiry outlast it: an app that ends in it is the point.
        monkeypatch.setattr(_asgi, "_TOLD_GRACE", 30.0)
        ended_by: list[BaseException | None] = []
        told: list[dict[str, Any]] = []
        expiry: list[float] = []

        def expiring(scope: Any) -> Identity:
            expiry.append(time.time() + 0.2)
            return Identity("ann", expires_at=expiry[0])

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            await ambient.resolve("tx")
            # Until the clock the middleware reads is past the expiry: that is the event.
            await anyio.sleep(max(0.0, expiry[0] - time.time()) + 0.01)
            await send({"type": "websocket.send", "text": "late"})
            message = await receive()
            told.append(message)
            raise WebSocketDisconnect(message["code"])

        middleware = AmbientMiddleware(app, registry=_tx_registry(ended_by), identity=expiring)
        with anyio.fail_after(10):
            sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == 4001
        assert told == [
            {"type": "websocket.disconnect", "code": 4001, "reason": "identity expired"}
        ]
        assert len(ended_by) == 1
        assert isinstance(ended_by[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(ended_by[0])

    async def test_an_error_with_an_answer_raised_when_told_is_what_the_cleanups_see(
        self,
    ) -> None:
        """An app told at the expiry that the client is gone raises an error that has an
        answer (no database connection free): the socket is closed with the expiry's 4001
        all the same, nothing is raised to the server, and the cleanups see that error, not
        only that the socket was cut off at the expiry."""
        ended_by: list[BaseException | None] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            await ambient.resolve("tx")
            message = await receive()  # the expiry is the event
            assert message["code"] == 4001
            raise PoolExhaustedError("no connection free", retry_after=1)

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(ended_by), identity=self.expiring(0.2)
        )
        with anyio.fail_after(10):
            sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == 4001
        assert len(ended_by) == 1
        assert isinstance(ended_by[0], PoolExhaustedError)

    @pytest.mark.parametrize("ended_by", ["the app's denial", "the client's close"])
    async def test_a_socket_already_ended_gets_no_close_at_the_expiry(self, ended_by: str) -> None:
        """The app denied the handshake with a response of its own, or the client closed
        the socket and the app received its disconnect; the app is still cleaning up when
        the identity expires: it is cancelled, and no close follows the denial, nor goes to
        a client already gone (uvicorn raises on it)."""
        denied = ended_by == "the app's denial"
        cancelled: list[bool] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            if denied:
                await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
                await send({"type": "websocket.http.response.body", "body": b"no"})
            else:
                await send({"type": "websocket.accept"})
                assert (await receive())["type"] == "websocket.disconnect"
            try:
                await anyio.Event().wait()  # still cleaning up when the identity expires
            except anyio.get_cancelled_exc_class():
                cancelled.append(True)
                raise

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.2))
        incoming: list[Message] = [{"type": "websocket.connect"}]
        if denied:
            scope = ws_scope([], extensions={"websocket.http.response": {}})
            answer = ["websocket.http.response.start", "websocket.http.response.body"]
        else:
            scope = ws_scope([])
            incoming.append({"type": "websocket.disconnect", "code": 1001})
            answer = ["websocket.accept"]
        sent = await drive(middleware, scope, incoming)
        assert [m["type"] for m in sent] == answer
        assert cancelled == [True]

    async def test_a_socket_the_app_closed_is_not_closed_again(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.close", "code": 1000})
            await anyio.sleep_forever()  # still cleaning up when the identity expires

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.2))
        sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert sent == [{"type": "websocket.close", "code": 1000}]

    @pytest.mark.parametrize("denial", ["problem response", "close"])
    @pytest.mark.parametrize("took_connect", [True, False])
    async def test_an_identity_expired_before_accept_denies_the_handshake(
        self, denial: str, took_connect: bool
    ) -> None:
        """The identity expires while the app prepares the socket (subscribing, loading
        state), before it accepts, whether or not it took the handshake's connect yet. A
        close with 4001 before accept was answered by servers with a bare 403: the handshake
        is refused as an expired credential is, a 401 problem (or 1008 with the reason
        where the server cannot send a response)."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if took_connect:
                await receive()
            await anyio.sleep_forever()

        extensions = {"websocket.http.response": {}} if denial == "problem response" else {}
        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.05))
        sent = await drive(
            middleware, ws_scope([], extensions=extensions), [{"type": "websocket.connect"}]
        )
        if denial == "problem response":
            assert [m["type"] for m in sent] == [
                "websocket.http.response.start",
                "websocket.http.response.body",
            ]
            assert sent[0]["status"] == 401
            assert b"expired before the websocket was accepted" in sent[1]["body"]
        else:
            assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 1008)]
            assert "expired before the websocket was accepted" in sent[0]["reason"]

    @pytest.mark.parametrize(
        ("expires_at", "expected"),
        [
            (-(10**400), [("websocket.close", 1008)]),
            (
                10**400,
                [("websocket.accept", None), ("websocket.send", None), ("websocket.close", 1000)],
            ),
        ],
        ids=["long-past", "never"],
    )
    async def test_an_expiry_no_float_holds_is_past_or_never_on_every_path(
        self, expires_at: int, expected: list[tuple[str, int | None]]
    ) -> None:
        """An ``expires_at`` of a custom resolver that no float holds: one long past was
        "never" for the socket's deadline but "past" for its sends, so the accept was
        dropped and the client got no answer at all. It is refused as any expired
        credential is; one far ahead never expires."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": "hi"})
            await send({"type": "websocket.close", "code": 1000})

        def ann(scope: Any) -> Identity:
            return Identity("ann", expires_at=expires_at)

        middleware = AmbientMiddleware(app, registry=Registry(), identity=ann)
        with anyio.fail_after(10):
            sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert [(m["type"], m.get("code")) for m in sent] == expected

    async def test_http_requests_are_not_cut_at_expiry(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await anyio.sleep(0.2)  # the identity expires meanwhile
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.expiring(0.05))
        async with client(middleware) as http:
            response = await http.get("/")
        assert (response.status_code, response.text) == (200, "done")

    @pytest.mark.parametrize("bad", ["soon", True, float("nan"), [1.0]])
    def test_expires_at_must_be_a_number(self, bad: object) -> None:
        with pytest.raises(TypeError, match="expires_at"):
            Identity("ann", expires_at=bad)  # type: ignore[arg-type]


class TestStreamedResponseIdentityExpiry:
    """A streamed HTTP response (server-sent events) does not go on past its identity's
    ``expires_at``: once its body is streaming, the app is cancelled at the expiry and the
    response ended, and a body message sent after the expiry does not go out (the app's
    ``send`` raises); the request's components see the response cut short. The first body
    message always goes out."""

    @staticmethod
    def ann(expires_at: float) -> Any:
        def resolve(scope: Any) -> Identity:
            return Identity("ann", expires_at=expires_at)

        return resolve

    @staticmethod
    def streaming(
        raised: list[BaseException], headers: list[tuple[bytes, bytes]] | None = None
    ) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            user = await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": headers or []})
            try:
                for n in range(3):
                    body = f"{user} {n}\n".encode()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except IncompleteResponseError as error:
                raised.append(error)
                raise

        return app

    @pytest.mark.parametrize("expired", [True, False])
    async def test_a_stream_past_expiry_is_ended_after_its_first_chunk(self, expired: bool) -> None:
        seen: list[BaseException | None] = []
        raised: list[BaseException] = []
        expires_at = time.time() + (-1 if expired else 3600)
        middleware = AmbientMiddleware(
            self.streaming(raised), registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent = await drive(middleware, http_scope([]), [{"type": "http.request"}])
        bodies = [(m.get("body"), m.get("more_body", False)) for m in sent[1:]]
        if expired:
            assert bodies == [(b"ann 0\n", True), (b"", False)]
            assert len(raised) == 1
            assert "cut off when its identity expired" in str(raised[0])
            assert len(seen) == 1
            assert isinstance(seen[0], IncompleteResponseError)
        else:
            assert bodies == [
                (b"ann 0\n", True),
                (b"ann 1\n", True),
                (b"ann 2\n", True),
                (b"", False),
            ]
            assert raised == []
            assert seen == [None]

    async def test_an_error_the_app_raises_over_the_cut_still_propagates(self) -> None:
        """The stream was cut at its identity's expiry, and the app raised an error of its
        own in handling that, not raised from the cut (a framework's error raised from it
        is the cut, see above): the error reaches the server (and the last-resort handler
        outside), it is not taken for the cut-off, and the cleanups see it."""
        seen: list[BaseException | None] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            try:
                await send({"type": "http.response.body", "body": b"late", "more_body": True})
            except IncompleteResponseError:
                raise RuntimeError("the app's own bug") from None

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        with pytest.raises(RuntimeError, match="own bug"):
            await drive(middleware, http_scope([]), [{"type": "http.request"}])
        assert len(seen) == 1
        assert isinstance(seen[0], RuntimeError)

    async def test_a_stream_whose_client_left_is_cut_without_an_end_sent(self) -> None:
        """The client disconnected, then the app sent more past the identity's expiry: the
        stream is cut (the app's ``send`` raises, the cleanups see it cut short), and no
        end of body goes to the server for a client that is gone."""
        seen: list[BaseException | None] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            with pytest.raises(IncompleteResponseError):
                await send({"type": "http.response.body", "body": b"late", "more_body": True})

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        incoming: list[Message] = [{"type": "http.request"}, {"type": "http.disconnect"}]
        sent = await drive(middleware, http_scope([]), incoming)
        assert [(m.get("body"), m.get("more_body", False)) for m in sent[1:]] == [(b"first", True)]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    @pytest.mark.parametrize("last", ["empty end", "last chunk"])
    async def test_a_stream_whose_end_alone_comes_after_expiry_ends_cleanly(
        self, last: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """All of the body went out in time; only its empty last message comes after the
        expiry: that message goes out, and the request's cleanups see a clean end (a
        transaction around their yield commits). A last message with bytes is cut."""
        from ambient.middleware import _asgi

        seen: list[BaseException | None] = []
        expires_at = time.time() + 3600

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"all", "more_body": True})
            # The identity expires now, as the middleware's clock reads it.
            monkeypatch.setattr(_asgi, "time", types.SimpleNamespace(time=lambda: expires_at))
            with contextlib.suppress(IncompleteResponseError):
                await send(
                    {"type": "http.response.body", "body": b"" if last == "empty end" else b"more"}
                )

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent = await drive(middleware, http_scope([]), [{"type": "http.request"}])
        assert [(m.get("body"), m.get("more_body", False)) for m in sent[1:]] == [
            (b"all", True),
            (b"", False),
        ]
        if last == "empty end":
            assert seen == [None]
        else:
            assert len(seen) == 1
            assert isinstance(seen[0], IncompleteResponseError)

    @pytest.mark.parametrize("trailers", [False, True])
    async def test_an_end_sent_by_a_busy_app_past_the_expiry_ends_cleanly(
        self, trailers: bool
    ) -> None:
        """The app works on without waiting through its identity's expiry (the deadline
        passes, no checkpoint comes), then sends its empty last message: it goes out and
        the cleanups see a clean end, on either event loop, as when the middleware's clock
        alone says the expiry passed. On trio the end was refused and the cleanups saw the
        response cut: asking the expiry whether it was cancelled cancels it there once its
        deadline passed."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "trailers": trailers})
            await send({"type": "http.response.body", "body": b"all", "more_body": True})
            busy_until = time.monotonic() + (expires_at - time.time()) + 0.05
            for _ in range(10**9):  # bounded: work that never waits, through the expiry
                if time.monotonic() >= busy_until:
                    break
            await send({"type": "http.response.body", "body": b""})
            if trailers:
                await send({"type": "http.response.trailers", "headers": [(b"s", b"0")]})

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended
        assert time.time() > expires_at
        assert [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]] == [
            ("http.response.body", b"all", None),
            ("http.response.body", b"", None),
            *([("http.response.trailers", None, [(b"s", b"0")])] if trailers else []),
        ]
        assert seen == [None]

    async def test_an_app_cancelled_at_the_expiry_may_end_its_own_body(self) -> None:
        """Cancelled at the expiry, the app catches the cancellation and ends its body
        itself, then raises it again: its end goes out and the middleware ends the response
        with the trailers its start announced, never with a second end of the body; the
        cleanups see the response cut at the expiry."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "trailers": True})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                await send({"type": "http.response.body", "body": b""})
                raise

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([(b"x-request-id", b"req-1")], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended
        assert [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]] == [
            ("http.response.body", b"x", None),
            ("http.response.body", b"", None),
            ("http.response.trailers", None, [(b"x-request-id", b"req-1")]),
        ]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    @pytest.mark.parametrize("trailers", [True, False], ids=["trailers", "no-trailers"])
    async def test_an_app_told_the_client_is_gone_may_end_its_own_body(
        self, trailers: bool
    ) -> None:
        """Told at the expiry that the client is gone (its receive answers
        ``http.disconnect``), the app ends its body itself and returns, as a framework
        does: its end goes out and its send does not raise, the middleware ends the
        response with the trailers its start announced only, never with a second end of
        the body, and the cleanups see the response cut at the expiry, also when the
        app's end ended the response (no trailers announced)."""
        seen: list[BaseException | None] = []
        told: list[str] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await receive()  # the request
            await send({"type": "http.response.start", "status": 200, "trailers": trailers})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            told.append((await receive())["type"])
            await send({"type": "http.response.body", "body": b""})
            told.append("ended")

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([(b"x-request-id", b"req-1")], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended
        assert told == ["http.disconnect", "ended"]
        assert [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]] == [
            ("http.response.body", b"x", None),
            ("http.response.body", b"", None),
            *[("http.response.trailers", None, [(b"x-request-id", b"req-1")])] * trailers,
        ]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    @pytest.mark.parametrize("then", ["ends", "waits"])
    async def test_a_stream_begun_past_the_expiry_is_cut_only_if_it_goes_on(
        self, then: str
    ) -> None:
        """The app begins streaming after its identity expired (its work took that long):
        the first message goes out, and an end sent right after it ends the response
        cleanly, the work after it (a background task) not cut: the request was admitted
        in time and its answer went out whole. An app that waits instead is cancelled then
        and the response ended. The end was refused and the cleanups saw the response
        cut, the expiry having cancelled the app as the first message went out."""
        seen: list[BaseException | None] = []
        after: list[str] = []
        cancelled: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"all", "more_body": True})
            try:
                if then == "waits":
                    await anyio.sleep_forever()  # the next event
                await send({"type": "http.response.body", "body": b""})
                await anyio.lowlevel.checkpoint()  # work after the response
                after.append("done")
            except anyio.get_cancelled_exc_class():
                cancelled.append(then)
                raise

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended
        assert [(m.get("body"), m.get("more_body", False)) for m in sent[1:]] == [
            (b"all", True),
            (b"", False),
        ]
        if then == "ends":
            assert (after, cancelled) == (["done"], [])
            assert seen == [None]
        else:
            assert (after, cancelled) == ([], ["waits"])
            assert len(seen) == 1
            assert "cut off when its identity expired" in str(seen[0])

    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    async def test_a_starlette_stream_of_one_chunk_begun_past_the_expiry_ends_cleanly(
        self, spec: str
    ) -> None:
        """A ``StreamingResponse`` of one chunk, returned after the identity expired: its
        client gets it whole, its background task runs, and the cleanups see a clean end
        (a transaction around their yield commits). Its send raised, the background task
        never ran, and the cleanups saw the response cut."""
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        seen: list[BaseException | None] = []
        ran: list[str] = []

        async def one(user: str) -> AsyncIterator[str]:
            yield f"{user}'s answer"

        async def note() -> None:
            ran.append("background")

        async def stream(request: Request) -> StreamingResponse:
            user = await ambient.resolve("tx")
            return StreamingResponse(one(user), background=BackgroundTask(note))

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", stream)]),
            registry=_tx_registry(seen),
            identity=self.ann(time.time() - 1),
        )
        scope = http_scope([], asgi={"version": "3.0", "spec_version": spec})
        sent, ended = await self.serve_idle(app, scope)
        assert ended
        assert [m["body"] for m in sent[1:]] == [b"ann's answer", b""]
        assert ran == ["background"]
        assert seen == [None]

    async def test_a_sized_response_is_not_ended_early_but_stopped(self) -> None:
        """With a ``content-length`` the response cannot end early: nothing more is sent and
        the server closes the connection."""
        seen: list[BaseException | None] = []
        raised: list[BaseException] = []
        app = self.streaming(raised, headers=[(b"content-length", b"18")])
        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        sent = await drive(middleware, http_scope([]), [{"type": "http.request"}])
        assert [m.get("body") for m in sent[1:]] == [b"ann 0\n"]
        assert len(raised) == 1
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    async def test_an_app_that_swallows_the_error_cannot_send_more(self) -> None:
        seen: list[BaseException | None] = []
        refused: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for n in range(3):
                try:
                    await send({"type": "http.response.body", "body": b"x", "more_body": True})
                except IncompleteResponseError:
                    refused.append(f"chunk {n}")

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        sent = await drive(middleware, http_scope([]), [{"type": "http.request"}])
        assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [
            (b"x", True),
            (b"", False),
        ]
        assert refused == ["chunk 1", "chunk 2"]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    @pytest.mark.parametrize("own_trailers", [False, True])
    async def test_a_stream_announcing_trailers_is_ended_with_them(
        self, own_trailers: bool
    ) -> None:
        """A response whose start announced trailers (the ``http.response.trailers``
        extension, a gRPC-style stream) ends with its last trailers, not its body: it was
        cut with a last body message only, which the server took for the body's end and
        waited for the trailers after it (hypercorn resets the HTTP/2 stream when the app
        returns). Trailers the app sends after the cut do not go out either."""
        seen: list[BaseException | None] = []
        refused: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "trailers": True})
            try:
                for _ in range(3):
                    await send({"type": "http.response.body", "body": b"x", "more_body": True})
            except IncompleteResponseError:
                refused.append("body")
                if not own_trailers:
                    raise
            trailers = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"4")]}
            try:
                await send(trailers)
            except IncompleteResponseError:
                refused.append("trailers")

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() - 1)
        )
        scope = http_scope([(b"x-request-id", b"req-1")], extensions={"http.response.trailers": {}})
        sent = await drive(middleware, scope, [{"type": "http.request"}])
        # Not empty (h2 fails to send an empty block): the request id echoed again.
        assert [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]] == [
            ("http.response.body", b"x", None),
            ("http.response.body", b"", None),
            ("http.response.trailers", None, [(b"x-request-id", b"req-1")]),
        ]
        assert sent[-1]["more_trailers"] is False
        assert refused == (["body", "trailers"] if own_trailers else ["body"])
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    async def test_a_starlette_event_stream_ends_at_expiry(self, spec: str) -> None:
        """Starlette's ``StreamingResponse`` (in a task group below ASGI 2.4): the error its
        ``send`` raised comes back, alone or grouped, and is not raised to the server; no
        event after the first is taken from the body."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        seen: list[BaseException | None] = []
        taken: list[int] = []

        def events(user: str) -> Chunks[str]:
            """Endless events naming the user."""

            def event(n: int) -> str:
                taken.append(n)
                return f"data: {user} {n}\n\n"

            return Chunks(event)

        async def stream(request: Request) -> StreamingResponse:
            user = await ambient.resolve("tx")
            return StreamingResponse(events(user), media_type="text/event-stream")

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", stream)]),
            registry=_tx_registry(seen),
            identity=self.ann(time.time() - 1),
        )
        scope = http_scope([], asgi={"version": "3.0", "spec_version": spec})
        sent = await drive(app, scope, [{"type": "http.request"}])
        assert sent[0]["status"] == 200
        assert [m["body"] for m in sent[1:]] == [b"data: ann 0\n\n", b""]
        assert taken == [0, 1]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    @staticmethod
    def expiring_events(monkeypatch: pytest.MonkeyPatch, expires_at: float) -> Any:
        """An iterator class of three events naming the user, whose identity expires (as the
        middleware's clock reads it) once the first event is out, so that the second is
        refused by the app's ``send`` rather than cut by the expiry's deadline."""
        from ambient.middleware import _asgi

        async def expire_after_the_first(n: int) -> None:
            if n == 1:
                clock = types.SimpleNamespace(time=lambda: expires_at)
                monkeypatch.setattr(_asgi, "time", clock)

        def events(user: str) -> Chunks[str]:
            return Chunks(lambda n: f"data: {user} {n}\n\n", count=3, before=expire_after_the_first)

        return events

    @pytest.mark.parametrize("framework", ["starlette", "fastapi"])
    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    async def test_an_event_stream_of_an_installed_app_ends_at_expiry(
        self, framework: str, spec: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With ``install()``, whose handler for ambient's errors matches the cut-off error
        too, Starlette's routing raises a ``RuntimeError`` ("response already started") from
        it: that is still the stream the middleware cut, not raised to the server, and the
        cleanups see the response cut short. They saw the ``RuntimeError``, and the server
        logged it as the app's crash."""
        from fastapi import FastAPI
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        from ambient.integrations.starlette import install

        seen: list[BaseException | None] = []
        expires_at = time.time() + 3600
        events = self.expiring_events(monkeypatch, expires_at)

        async def stream(request: Request) -> StreamingResponse:
            user = await ambient.resolve("tx")
            return StreamingResponse(events(user), media_type="text/event-stream")

        app = (FastAPI if framework == "fastapi" else Starlette)(routes=[Route("/", stream)])
        install(app, registry=_tx_registry(seen), identity=self.ann(expires_at))
        scope = http_scope([], asgi={"version": "3.0", "spec_version": spec})
        sent = await drive(app, scope, [{"type": "http.request"}])
        assert sent[0]["status"] == 200
        assert [m["body"] for m in sent[1:]] == [b"data: ann 0\n\n", b""]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    async def test_a_litestar_event_stream_ends_at_expiry(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Litestar raises a ``LitestarException`` from the task group of its streamed
        response, which holds the error its ``send`` raised: still the stream the middleware
        cut, not raised to the server, and the cleanups see the response cut short. They
        saw the ``LitestarException``, and the server logged it as the app's crash."""
        # The core suite runs on other Pythons without the frameworks' extras.
        pytest.importorskip("litestar")
        from litestar import Litestar, get
        from litestar.response import Stream

        seen: list[BaseException | None] = []
        expires_at = time.time() + 3600
        events = self.expiring_events(monkeypatch, expires_at)

        async def stream() -> Stream:
            user = await ambient.resolve("tx")
            return Stream(events(user), media_type="text/event-stream")

        # Litestar reads the return annotation, a string under this module's annotations.
        stream.__annotations__["return"] = Stream
        app = AmbientMiddleware(
            Litestar(route_handlers=[get("/")(stream)]),
            registry=_tx_registry(seen),
            identity=self.ann(expires_at),
        )
        scope = http_scope([], asgi={"version": "3.0", "spec_version": "2.4"})
        sent = await drive(app, scope, [{"type": "http.request"}])
        assert sent[0]["status"] == 200
        assert [m["body"] for m in sent[1:]] == [b"data: ann 0\n\n", b""]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    @staticmethod
    async def serve_idle(
        middleware: Any, scope: dict[str, Any], gone: anyio.Event | None = None
    ) -> tuple[list[Message], bool]:
        """Serve one request whose client reads on and never leaves (unless ``gone`` is
        set); return what went out and whether the request ended within 3 s."""
        sent: list[Message] = []
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request"}
            await (gone or anyio.Event()).wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.move_on_after(3) as waited:
            await middleware(scope, receive, send)
        return sent, not waited.cancelled_caught

    @pytest.mark.parametrize("waits", ["for its next event", "for a disconnect"])
    @pytest.mark.parametrize("shape", ["chunked", "with trailers", "sized"])
    async def test_an_idle_stream_is_ended_at_expiry(self, waits: str, shape: str) -> None:
        """A stream waiting for its next event (which comes in an hour), or for the
        client's disconnect, is cancelled when its identity expires and ended then, as a
        message past the expiry ends it. It held the expired credential's connection and
        its components until its next message."""
        seen: list[BaseException | None] = []
        cancelled_at: list[float] = []
        expires_at = time.time() + 0.3

        async def app(scope: Any, receive: Any, send: Any) -> None:
            user = await ambient.resolve("tx")
            await receive()  # the request
            start: Message = {"type": "http.response.start", "status": 200, "headers": []}
            if shape == "with trailers":
                start["trailers"] = True
            elif shape == "sized":
                start["headers"] = [(b"content-length", b"12")]
            await send(start)
            body = f"{user} 0\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            try:
                if waits == "for its next event":
                    await anyio.Event().wait()
                else:
                    # Told at the expiry that the client is gone, as a server tells it.
                    told.append(await receive())
                    cancelled_at.append(time.time())
            except anyio.get_cancelled_exc_class():
                cancelled_at.append(time.time())
                raise

        told: list[Message] = []
        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([(b"x-request-id", b"req-1")], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended, "the idle stream outlived its identity's expiry"
        assert len(cancelled_at) == 1
        if waits == "for its next event":
            # Cancelled if it did not end within the grace after being told the client is gone.
            from ambient.middleware import _asgi

            grace = _asgi._TOLD_GRACE
            assert expires_at + grace <= cancelled_at[0] < expires_at + grace + 1
        else:
            assert told == [{"type": "http.disconnect"}]
            assert expires_at <= cancelled_at[0] < expires_at + 1
        out = [(m["type"], m.get("body"), m.get("more_body", False)) for m in sent[1:]]
        if shape == "sized":
            # Nothing more: the server closes the connection.
            assert out == [("http.response.body", b"ann 0\n", True)]
        else:
            assert out[:2] == [
                ("http.response.body", b"ann 0\n", True),
                ("http.response.body", b"", False),
            ]
        if shape == "with trailers":
            assert out[2:] == [("http.response.trailers", None, False)]
            assert sent[-1]["headers"] == [(b"x-request-id", b"req-1")]
            assert sent[-1]["more_trailers"] is False
        elif shape == "chunked":
            assert len(out) == 2
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    async def test_a_receive_waiting_before_the_stream_began_is_told_at_the_expiry(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An app that listens for the client's disconnect from before its body starts
        streaming (a framework's listener task): its waiting ``receive`` answers
        ``http.disconnect`` at the expiry, and the app ends on it, never cancelled."""
        from ambient.middleware import _asgi

        # Long enough that only the told disconnect can end the app in time.
        monkeypatch.setattr(_asgi, "_TOLD_GRACE", 30.0)
        seen: list[BaseException | None] = []
        told: list[Message] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await receive()  # the request
            listening = anyio.Event()

            async def listen() -> None:
                listening.set()
                told.append(await receive())
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await listening.wait()
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"0\n", "more_body": True})
                await anyio.Event().wait()  # its next event comes in an hour

        registry = _tx_registry(seen)
        middleware = AmbientMiddleware(app, registry=registry, identity=self.ann(expires_at))
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended, "the listening app was not told at the expiry"
        assert told == [{"type": "http.disconnect"}]
        assert [(m["type"], m.get("body")) for m in sent[1:]] == [
            ("http.response.body", b"0\n"),
            ("http.response.body", b""),
        ]
        assert len(seen) == 1
        assert "cut off when its identity expired" in str(seen[0])

    @pytest.mark.parametrize("then", ["works on", "sends its trailers"])
    async def test_an_app_told_that_ends_its_body_is_still_ended_at_its_grace(
        self, then: str
    ) -> None:
        """Told at the expiry that the client is gone, the app ends its body and then
        either works on (a background task, still holding the expired credential) or
        sends the trailers its start announced and returns: one that works on is cancelled
        after its grace all the same, and the trailers go out once, its own."""
        cancelled: list[bool] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()  # the request
            trailers = then == "sends its trailers"
            await send({"type": "http.response.start", "status": 200, "trailers": trailers})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            assert (await receive())["type"] == "http.disconnect"
            await send({"type": "http.response.body", "body": b""})
            if trailers:
                await send({"type": "http.response.trailers", "headers": [(b"x-n", b"1")]})
                return
            try:
                await anyio.Event().wait()  # work that comes to no end of its own
            except anyio.get_cancelled_exc_class():
                cancelled.append(True)
                raise

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.ann(expires_at))
        scope = http_scope([], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended, "the app told the client is gone ran on past its grace"
        out = [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]]
        if then == "works on":
            assert cancelled == [True]
            assert out == [("http.response.body", b"x", None), ("http.response.body", b"", None)]
        else:
            assert out == [
                ("http.response.body", b"x", None),
                ("http.response.body", b"", None),
                ("http.response.trailers", None, [(b"x-n", b"1")]),
            ]

    async def test_a_message_ready_past_the_expiry_never_reaches_the_app(self) -> None:
        """Past the expiry of a streaming response, the app's ``receive`` answers that the
        client is gone, even when the server has a message ready for it (more of the
        request's body): nothing more of the client's reaches the expired credential's
        app."""
        received: list[Message] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await anyio.sleep(max(0.0, expires_at - time.time()) + 0.05)  # the expiry: the event
            received.append(await receive())
            await send({"type": "http.response.body", "body": b""})

        chunks: list[Message] = [
            {"type": "http.request", "body": b"a", "more_body": True},
            {"type": "http.request", "body": b"b", "more_body": False},
        ]

        async def receive() -> Message:
            return chunks.pop(0)  # always ready: the server holds it already

        middleware = AmbientMiddleware(app, registry=Registry(), identity=self.ann(expires_at))
        sent: list[Message] = []
        with anyio.fail_after(5):
            await middleware(http_scope([]), receive, _recorder(sent))
        assert [m.get("body") for m in received] == [b"a", None]
        assert received[1]["type"] == "http.disconnect"

    async def test_an_app_deaf_to_the_expiry_is_cancelled_within_the_cleanup_timeout(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The grace an app told the client is gone has before it is cancelled is at most
        the registry's ``cleanup_timeout``: with a grace far longer, a stream that never
        receives is cancelled ``cleanup_timeout`` after the expiry, not the grace."""
        from ambient.middleware import _asgi

        monkeypatch.setattr(_asgi, "_TOLD_GRACE", 30.0)
        cancelled_at: list[float] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()  # the request
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"0\n", "more_body": True})
            try:
                await anyio.Event().wait()  # its next event comes in an hour
            except anyio.get_cancelled_exc_class():
                cancelled_at.append(time.time())
                raise

        registry = Registry(cleanup_timeout=0.5)
        middleware = AmbientMiddleware(app, registry=registry, identity=self.ann(expires_at))
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended, "the stream's app ran on for the whole grace"
        assert len(cancelled_at) == 1
        assert expires_at + 0.4 <= cancelled_at[0]  # not at the expiry: after its grace
        assert [(m["type"], m.get("body")) for m in sent[1:]] == [
            ("http.response.body", b"0\n"),
            ("http.response.body", b""),
        ]

    @pytest.mark.parametrize("then", ["raises the cancellation", "sends an event anyway"])
    @pytest.mark.parametrize("app_kind", ["raw", "starlette"])
    async def test_an_event_stream_waiting_for_its_first_event_is_ended_at_expiry(
        self, app_kind: str, then: str
    ) -> None:
        """A server-sent event stream is streaming from its start: one that sent its start
        and waits for its first event (no ping) is cancelled at the identity's expiry and
        ended (an empty last body); an event the app sends after catching the cancellation
        does not go out. Armed only by the first body message, it outlived the expiry."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        seen: list[BaseException | None] = []
        cancelled_at: list[float] = []
        refused: list[BaseException] = []
        expires_at = time.time() + 0.3

        async def first_event() -> None:
            try:
                await anyio.Event().wait()
            except anyio.get_cancelled_exc_class():
                cancelled_at.append(time.time())
                if then == "raises the cancellation":
                    raise

        async def raw(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await receive()
            # A media type is case-insensitive.
            headers = [(b"Content-Type", b"Text/Event-Stream; charset=utf-8")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await first_event()
            try:
                await send({"type": "http.response.body", "body": b"data: x\n\n"})
            except IncompleteResponseError as error:
                refused.append(error)
                raise

        async def stream(request: Request) -> StreamingResponse:
            await ambient.resolve("tx")
            # One event, once it comes.
            events = Chunks(lambda n: "data: x\n\n", count=1, before=lambda n: first_event())
            return StreamingResponse(events, media_type="text/event-stream")

        app = raw if app_kind == "raw" else Starlette(routes=[Route("/", stream)])
        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended, "the event stream outlived its identity's expiry"
        assert len(cancelled_at) == 1
        # Told at the expiry that the client is gone; not listening, cancelled a second
        # (the grace) later.
        assert expires_at <= cancelled_at[0] < expires_at + 2
        assert sent[0]["type"] == "http.response.start"
        out = [(m["type"], m.get("body"), m.get("more_body", False)) for m in sent[1:]]
        assert out == [("http.response.body", b"", False)]
        if app_kind == "raw" and then == "sends an event anyway":
            assert len(refused) == 1
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    async def test_a_bug_raised_with_the_cut_off_in_one_group_reaches_the_server(
        self,
    ) -> None:
        """An app whose stream was cut at the expiry and that raises the cut-off error in
        one group with a bug of its own (a task group around the work): the bug is no
        part of the cut, so the group reaches the server, and the cleanups see it."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            start: Message = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            event: Message = {"type": "http.response.body", "body": b"0\n", "more_body": True}
            await send(event)
            await anyio.sleep(expires_at - time.time() + 0.05)  # the expiry is the event
            try:
                await send(event)
            except IncompleteResponseError as cut:
                raise ExceptionGroup("work", [cut, LookupError("the handler's bug")]) from None

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        with pytest.raises(ExceptionGroup) as raised:
            await self.serve_idle(middleware, http_scope([]))
        assert raised.value.split(LookupError)[0] is not None
        assert len(seen) == 1
        assert seen[0] is raised.value

    async def test_an_event_stream_begun_past_the_expiry_is_ended_without_its_first_event(
        self,
    ) -> None:
        """An event stream that sends its start only after its identity expired (a request
        admitted in time, its handler slow) and then waits for its first event is ended
        right after its start, not left to hold the expired credential until an event
        comes."""
        seen: list[BaseException | None] = []
        cancelled: list[bool] = []
        expires_at = time.time() + 0.1

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await anyio.sleep(expires_at - time.time() + 0.05)  # the expiry is the event
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                await anyio.Event().wait()  # no event ever comes
            except anyio.get_cancelled_exc_class():
                cancelled.append(True)
                raise

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended, "the event stream begun past the expiry waited for its first event"
        assert cancelled == [True]
        assert sent[0]["type"] == "http.response.start"
        out = [(m["type"], m.get("body"), m.get("more_body", False)) for m in sent[1:]]
        assert out == [("http.response.body", b"", False)]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    async def test_an_event_streams_first_event_sent_past_the_expiry_does_not_go_out(
        self,
    ) -> None:
        """An event stream whose first event comes after its identity's expiry, within the
        grace before its app (which does not listen for the disconnect) is cancelled: the
        event does not go out, the app's send raises, the stream is ended with an empty
        last body and its cleanups see it cut off."""
        seen: list[BaseException | None] = []
        refused: list[BaseException] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            # The expiry is the event; the grace (a quarter of a second) is not over.
            await anyio.sleep(expires_at - time.time() + 0.05)
            event: Message = {"type": "http.response.body", "body": b"data: late\n\n"}
            try:
                await send({**event, "more_body": True})
            except IncompleteResponseError as error:
                refused.append(error)
                raise

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended
        assert len(refused) == 1
        out = [(m["type"], m.get("body"), m.get("more_body", False)) for m in sent[1:]]
        assert out == [("http.response.body", b"", False)]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    async def test_an_event_stream_answered_in_one_message_keeps_the_work_after_it(
        self,
    ) -> None:
        """An event stream whose whole body went out in one message before the expiry: the
        work after it (a background task) runs past the expiry, and cleanups see a clean
        end."""
        seen: list[BaseException | None] = []
        past: list[float] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"data: x\n\n"})
            await anyio.sleep(expires_at - time.time() + 0.1)  # the expiry is the event
            past.append(time.time())

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended
        assert len(past) == 1
        assert past[0] > expires_at
        assert [m.get("body") for m in sent[1:]] == [b"data: x\n\n"]
        assert seen == [None]

    @pytest.mark.parametrize(
        "headers",
        [
            [(b"content-type", b"application/json")],
            [(b"content-type", b"text/event-stream"), (b"content-length", b"2")],
        ],
        ids=["json", "sized-event-stream"],
    )
    async def test_a_stream_of_another_kind_waiting_for_its_first_body_is_not_cut(
        self, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """A response that is no event stream (nor one that declared its size) and has sent
        only its start is not cut at the expiry: it may be a plain answer still being
        made, which a request admitted while its credential was valid gets."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await anyio.sleep(expires_at - time.time() + 0.1)  # the expiry is the event
            await send({"type": "http.response.body", "body": b"{}"})

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]))
        assert ended
        assert [m.get("body") for m in sent[1:]] == [b"{}"]
        assert seen == [None]

    @pytest.mark.parametrize("then", ["returns", "raises the cancellation"])
    async def test_an_app_that_catches_its_cancellation_gets_nothing_out_after_the_end(
        self, then: str
    ) -> None:
        """Cancelled at the expiry, the app catches the cancellation and sends on (another
        event, its own end, its trailers): none of it goes out, each ``send`` raises, and
        the response ends once, as the middleware ends it."""
        seen: list[BaseException | None] = []
        refused: list[str] = []
        cancelled_at: list[float] = []
        expires_at = time.time() + 0.2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "trailers": True})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            try:
                await anyio.Event().wait()
            except anyio.get_cancelled_exc_class():
                cancelled_at.append(time.time())
                for name, message in [
                    ("event", {"type": "http.response.body", "body": b"y", "more_body": True}),
                    ("end", {"type": "http.response.body", "body": b""}),
                    ("trailers", {"type": "http.response.trailers", "headers": []}),
                ]:
                    try:
                        await send(message)
                    except IncompleteResponseError:
                        refused.append(name)
                if then != "returns":
                    raise

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([(b"x-request-id", b"req-1")], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended
        assert len(cancelled_at) == 1
        # Told at the expiry that the client is gone; not listening, cancelled a second
        # (the grace) later.
        assert expires_at <= cancelled_at[0] < expires_at + 2, "not cancelled at the expiry"
        assert refused == ["event", "end", "trailers"]
        assert [(m["type"], m.get("body"), m.get("headers")) for m in sent[1:]] == [
            ("http.response.body", b"x", None),
            ("http.response.body", b"", None),
            ("http.response.trailers", None, [(b"x-request-id", b"req-1")]),
        ]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)

    async def test_a_client_gone_before_the_expiry_is_sent_nothing(self) -> None:
        """The client of an idle stream leaves before the expiry: the app waiting for the
        disconnect gets it and returns, nothing more is sent, and the cleanups see the
        response cut short by the client, as before."""
        seen: list[BaseException | None] = []
        gone = anyio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await receive()  # the request
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            gone.set()  # the client leaves
            assert (await receive())["type"] == "http.disconnect"

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(time.time() + 3600)
        )
        sent, ended = await self.serve_idle(middleware, http_scope([]), gone)
        assert ended
        assert [m.get("body") for m in sent[1:]] == [b"x"]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "identity expired" not in str(seen[0])

    @pytest.mark.parametrize("trailers", [False, True])
    async def test_work_after_a_body_ended_in_time_is_not_cut(self, trailers: bool) -> None:
        """A stream whose body ended before the expiry is not cancelled at the expiry: what
        the app does after it (a background task, its trailers) runs to its end, and the
        cleanups see a clean end."""
        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.1

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "trailers": trailers})
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            await anyio.sleep(max(expires_at - time.time(), 0) + 0.1)  # work past the expiry
            if trailers:
                await send({"type": "http.response.trailers", "headers": [(b"s", b"0")]})

        middleware = AmbientMiddleware(
            app, registry=_tx_registry(seen), identity=self.ann(expires_at)
        )
        scope = http_scope([], extensions={"http.response.trailers": {}})
        sent, ended = await self.serve_idle(middleware, scope)
        assert ended
        assert time.time() > expires_at
        assert [(m["type"], m.get("body")) for m in sent[1:]] == [
            ("http.response.body", b"x"),
            ("http.response.body", b""),
            *([("http.response.trailers", None)] if trailers else []),
        ]
        assert seen == [None]

    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    async def test_an_idle_starlette_event_stream_ends_at_expiry(self, spec: str) -> None:
        """Starlette's ``StreamingResponse`` waiting for its next event (below ASGI 2.4 in a
        task group beside a task waiting for the disconnect) is cancelled at the expiry and
        ended; nothing is raised to the server."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        seen: list[BaseException | None] = []
        expires_at = time.time() + 0.3

        async def stream(request: Request) -> StreamingResponse:
            user = await ambient.resolve("tx")
            events = Chunks(lambda n: f"data: {user}\n\n", before=next_in_an_hour)
            return StreamingResponse(events, media_type="text/event-stream")

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", stream)]),
            registry=_tx_registry(seen),
            identity=self.ann(expires_at),
        )
        scope = http_scope([], asgi={"version": "3.0", "spec_version": spec})
        sent, ended = await self.serve_idle(app, scope)
        assert ended, "the idle stream outlived its identity's expiry"
        assert time.time() >= expires_at
        assert sent[0]["status"] == 200
        assert [m["body"] for m in sent[1:]] == [b"data: ann\n\n", b""]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert "cut off when its identity expired" in str(seen[0])

    @pytest.mark.parametrize("ping", [0, 0.02])
    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    async def test_an_idle_sse_starlette_stream_ends_at_expiry(
        self, spec: str, ping: float
    ) -> None:
        """sse-starlette's ``EventSourceResponse`` runs its event stream, its pings and its
        disconnect listener as tasks of one task group: waiting for its next event at the
        expiry (pinging or not), it is cancelled and ended once, its generator closed;
        nothing is raised to the server, and the cleanups see the cut."""
        pytest.importorskip("sse_starlette")  # not in the core suite's installs
        from sse_starlette import EventSourceResponse
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.routing import Route

        seen: list[BaseException | None] = []
        closed: list[str] = []
        expires_at = time.time() + 0.3

        async def events(user: str) -> AsyncIterator[dict[str, str]]:
            try:
                yield {"data": user}
                await anyio.sleep(3600)  # the next event
                yield {"data": "late"}
            finally:
                closed.append(user)

        async def stream(request: Request) -> EventSourceResponse:
            user = await ambient.resolve("tx")
            return EventSourceResponse(events(user), ping=ping)

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", stream)]),
            registry=_tx_registry(seen),
            identity=self.ann(expires_at),
        )
        scope = http_scope([], asgi={"version": "3.0", "spec_version": spec})
        sent, ended = await self.serve_idle(app, scope)
        assert ended, "the idle stream outlived its identity's expiry"
        assert time.time() >= expires_at
        assert sent[0]["status"] == 200
        bodies = [m["body"] for m in sent[1:]]
        assert bodies[0] == b"data: ann\r\n\r\n"
        assert bodies[-1] == b""
        assert all(body.startswith(b": ping") for body in bodies[1:-1])
        assert [m.get("more_body", False) for m in sent[1:]].count(False) == 1
        assert closed == ["ann"]
        assert len(seen) == 1
        assert "cut off when its identity expired" in str(seen[0])


class TestStreamsCutShort:
    """A streamed response cut short by the client (B06): before the first chunk, after the
    second, or by a ``send`` that raises OSError, on ASGI spec 2.3 and 2.4. The request's
    components are cleaned exactly once and its scope closes, whatever becomes of the body
    iterator (Starlette does not close it in every case; ambient does not depend on it)."""

    @pytest.mark.parametrize("spec", ["2.3", "2.4"])
    @pytest.mark.parametrize("cut", ["before-first-chunk", "after-second-chunk", "send-raises"])
    async def test_cleanup_runs_once_and_the_scope_closes(self, spec: str, cut: str) -> None:
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        cleaned: list[str] = []
        registry = Registry()

        def session(ctx: UserExecutionContext) -> Iterator[str]:
            try:
                yield ctx.user_id
            finally:
                cleaned.append(ctx.user_id)

        registry.register("session", session)

        async def stream(request: Request) -> StreamingResponse:
            user = await ambient.resolve("session")
            # Five chunks naming the user.
            return StreamingResponse(Chunks(lambda n: f"{user} {n + 1}\n".encode(), count=5))

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", stream)]), registry=registry, identity=trusted_header()
        )
        scope = http_scope([(b"x-user-id", b"ann")], asgi={"version": "3.0", "spec_version": spec})
        gone = anyio.Event()
        if cut == "before-first-chunk":
            gone.set()
        chunks = 0

        async def receive() -> Message:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal chunks
            if message["type"] != "http.response.body" or not message.get("body"):
                return
            chunks += 1
            if cut == "send-raises":
                raise OSError("the client went away")
            if chunks == 2:
                gone.set()
                await anyio.lowlevel.checkpoint()  # the disconnect listener runs first

        # The failed send reaches the server as OSError (spec 2.3) or Starlette's
        # ClientDisconnect (2.4), as it would without ambient.
        with anyio.fail_after(5), contextlib.suppress(OSError, ClientDisconnect):
            await app(scope, receive, send)
        assert cleaned == ["ann"]
        assert registry.stats().open_scopes == 0


async def _no_answer(scope: Any, receive: Any, send: Any) -> None:
    await ambient.resolve("tx")


async def _body_never_ended(scope: Any, receive: Any, send: Any) -> None:
    await ambient.resolve("tx")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"half", "more_body": True})


async def _trailers_never_sent(scope: Any, receive: Any, send: Any) -> None:
    await ambient.resolve("tx")
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    await send({"type": "http.response.body", "body": b"all of it"})


async def _trailers_sent(scope: Any, receive: Any, send: Any) -> None:
    await _trailers_never_sent(scope, receive, send)
    trailers = [(b"grpc-status", b"0")]
    await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": True})
    await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})


async def _answered_503(scope: Any, receive: Any, send: Any) -> None:
    await ambient.resolve("tx")
    await send({"type": "http.response.start", "status": 503, "headers": []})
    await send({"type": "http.response.body", "body": b"try later"})


def _starlette(tmp: Any) -> Any:
    """One route per kind of whole answer, and a handler that turns an error into a 500."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response, StreamingResponse
    from starlette.routing import Route

    (tmp / "report.txt").write_bytes(b"a file")

    async def endpoint(request: Request) -> Response:
        await ambient.resolve("tx")
        kind = request.path_params["kind"]
        if kind == "streamed":

            async def chunks() -> AsyncIterator[bytes]:
                for n in range(3):
                    yield f"{n}\n".encode()

            return StreamingResponse(chunks())
        if kind == "file":
            return FileResponse(tmp / "report.txt")
        if kind == "broken":
            msg = "the handler failed"
            raise LookupError(msg)
        return Response(b"" if kind in ("204", "304") else b"ok", status_code=int(kind))

    async def as_500(request: Request, exc: Exception) -> Response:
        return Response(b"sorry", status_code=500)

    return Starlette(routes=[Route("/{kind}", endpoint)], exception_handlers={LookupError: as_500})


class TestHowTheRequestEnded:
    """What a REQUEST component's cleanup sees once the app returned: nothing for an answer
    sent whole (HEAD, 204, 304, streamed, a file, by ``pathsend`` too), an error for a
    request that failed without raising. Before, every return was a success: a
    transaction around a ``yield`` committed a request that got no answer, half of one, or
    a 5xx its framework had answered."""

    @pytest.mark.parametrize(
        ("path", "method", "extensions", "status"),
        [
            ("/200", "GET", {}, 200),
            ("/200", "HEAD", {}, 200),
            ("/204", "GET", {}, 204),
            ("/304", "GET", {}, 304),
            ("/streamed", "GET", {}, 200),
            ("/file", "GET", {}, 200),
            ("/file", "HEAD", {}, 200),
            ("/file", "GET", {"http.response.pathsend": {}}, 200),
        ],
    )
    async def test_an_answer_sent_whole_is_a_success(
        self, tmp_path: Any, path: str, method: str, extensions: dict[str, Any], status: int
    ) -> None:
        seen = await self._request(
            _starlette(tmp_path), path, method=method, extensions=extensions, status=status
        )
        assert seen == [None]

    @pytest.mark.parametrize(
        ("app", "path", "status", "error", "said"),
        [
            (_no_answer, "/", None, IncompleteResponseError, "no response"),
            (_body_never_ended, "/", 200, IncompleteResponseError, "cut short"),
            (_answered_503, "/", 503, ServerErrorResponseError, "status 503"),
            (None, "/broken", 500, ServerErrorResponseError, "status 500"),
        ],
    )
    async def test_a_request_that_failed_without_raising_is_a_failure(
        self,
        tmp_path: Any,
        app: Any,
        path: str,
        status: int | None,
        error: type[Exception],
        said: str,
    ) -> None:
        seen = await self._request(app or _starlette(tmp_path), path, status=status)
        assert len(seen) == 1
        assert isinstance(seen[0], error)
        assert said in str(seen[0])

    async def test_a_body_ended_after_the_client_disconnected_is_cut_short(self) -> None:
        """The client disconnected mid-body and the app sent the end all the same (a
        ``BaseHTTPMiddleware`` inside re-sends a stream Starlette cancelled, then ends it):
        that end never reached the client, so the cleanups see the response cut short."""

        async def ended_after_the_client_left(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            await send({"type": "http.response.body", "body": b"rest"})

        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)
        middleware = AmbientMiddleware(
            ended_after_the_client_left, registry=registry, identity=trusted_header()
        )
        incoming: list[Message] = [
            {"type": "http.request", "body": b""},
            {"type": "http.disconnect"},
        ]
        sent = await drive(middleware, http_scope([(b"x-user-id", b"ann")]), incoming)
        assert [m["body"] for m in sent if m["type"] == "http.response.body"] == [b"half", b"rest"]
        assert len(seen) == 1
        assert isinstance(seen[0], IncompleteResponseError)
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("sent", [True, False])
    async def test_a_response_with_trailers_ends_at_its_last_trailers(self, sent: bool) -> None:
        """With ``trailers`` in its start (the ``http.response.trailers`` extension) a
        response ends with its last trailers message, not its last body message: an app
        that returned without sending them left it unfinished (the server resets the
        stream), yet its cleanups were told it succeeded."""
        app = _trailers_sent if sent else _trailers_never_sent
        seen = await self._request(app, "/", extensions={"http.response.trailers": {}}, status=200)
        assert len(seen) == 1
        if sent:
            assert seen == [None]
        else:
            assert isinstance(seen[0], IncompleteResponseError)
            assert "cut short" in str(seen[0])

    @pytest.mark.parametrize("ended", [True, False])
    async def test_a_body_sent_by_zerocopysend_ends_at_its_last_message(self, ended: bool) -> None:
        """A body sent from a file descriptor (the ``http.response.zerocopysend``
        extension) ends with its message without ``more_body``: an app that returned after
        one saying more follows left the response unfinished, and one that ended it
        succeeded."""

        async def zerocopy(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            part: Message = {"type": "http.response.zerocopysend", "file": 0, "count": 4}
            await send({**part, "more_body": True})
            if ended:
                await send(part)

        extensions = {"http.response.zerocopysend": {}}
        seen = await self._request(zerocopy, "/", extensions=extensions, status=200)
        assert len(seen) == 1
        if ended:
            assert seen == [None]
        else:
            assert isinstance(seen[0], IncompleteResponseError)
            assert "cut short" in str(seen[0])

    @pytest.mark.parametrize("ended", [True, False])
    async def test_a_trailers_only_response_ends_at_its_last_trailers(self, ended: bool) -> None:
        """A "trailers-only" response (trailers before any start, which hypercorn answers
        over HTTP/2 with a 200) sent in more than one trailers message ends with the last:
        an app that returned after one saying more follow left it unfinished."""

        async def trailers_only(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            status = [(b"grpc-status", b"0")]
            await send({"type": "http.response.trailers", "headers": status, "more_trailers": True})
            if ended:
                last: Message = {"type": "http.response.trailers", "headers": []}
                await send({**last, "more_trailers": False})

        extensions = {"http.response.trailers": {}}
        seen = await self._request(trailers_only, "/", extensions=extensions, status=None)
        assert len(seen) == 1
        if ended:
            assert seen == [None]
        else:
            assert isinstance(seen[0], IncompleteResponseError)
            assert "cut short" in str(seen[0])

    async def test_a_trailers_only_response_echoes_the_request_id(self) -> None:
        """hypercorn answers trailers sent before any start (over HTTP/2: a gRPC-style
        "trailers-only" response) with a 200 whose headers are those trailers. They went
        out without the request id, and the response passed for not started: an error the
        app raised after it was answered with a problem the server refused."""

        async def trailers_only(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve("tx")
            status = [(b"grpc-status", b"5")]
            await send({"type": "http.response.trailers", "headers": status})
            raise PoolExhaustedError("too late to answer")

        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)
        middleware = AmbientMiddleware(trailers_only, registry=registry, identity=trusted_header())
        scope = http_scope(
            [(b"x-user-id", b"ann"), (b"x-request-id", b"grpc-1")],
            extensions={"http.response.trailers": {}},
        )
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.fail_after(5), pytest.raises(PoolExhaustedError):
            await middleware(scope, receive, send)
        assert [m["type"] for m in sent] == ["http.response.trailers"]
        assert (b"x-request-id", b"grpc-1") in sent[0]["headers"]
        assert [type(error) for error in seen] == [PoolExhaustedError]
        assert registry.stats().open_scopes == 0

    @staticmethod
    async def _request(
        app: Any,
        path: str,
        *,
        method: str = "GET",
        extensions: dict[str, Any] | None = None,
        status: int | None,
    ) -> list[BaseException | None]:
        """Run one request through the middleware; what the "tx" cleanup saw."""
        seen: list[BaseException | None] = []
        registry = _tx_registry(seen)
        middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
        scope = http_scope(
            [(b"x-user-id", b"ann")],
            method=method,
            path=path,
            raw_path=path.encode(),
            extensions=extensions or {},
        )
        sent = await drive(middleware, scope, [{"type": "http.request", "body": b""}])
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == (
            [status] if status else []
        )
        assert registry.stats().open_scopes == 0
        return seen


@pytest.mark.parametrize("kind", ["generator", "iterator", "map"])
@pytest.mark.parametrize("own_id", [False, True])
@pytest.mark.parametrize("expiring", [False, True])
async def test_response_headers_given_as_any_iterable_all_arrive(
    kind: str, own_id: bool, expiring: bool
) -> None:
    """ASGI takes any iterable of headers: the middleware looked through it for the
    request id header and then rebuilt the list from the same, used-up, iterator, so the
    app's headers (content type, cookies) never reached the client. The same for a
    request whose identity expires (a bearer token's ``exp``), whose start was looked
    through once more for its content length."""
    wanted = [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        *([(b"x-request-id", b"mine")] if own_id else []),
        (b"x-after", b"1"),
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if kind == "generator":
            headers: Any = (pair for pair in wanted)
        elif kind == "iterator":
            headers = iter(wanted)
        else:
            headers = map(tuple, wanted)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    def until_later(scope: Any) -> Identity:
        return Identity("u", expires_at=time.time() + 600)

    identity = until_later if expiring else trusted_header()
    middleware = AmbientMiddleware(app, registry=Registry(), identity=identity)
    async with client(middleware) as http:
        response = await http.get("/", headers={"x-user-id": "u", "x-request-id": "r-1"})
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["set-cookie"] == "a=1"
    assert response.headers["x-after"] == "1"
    assert response.headers["x-request-id"] == ("mine" if own_id else "r-1")


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [
        (float("inf"), "86400"),
        (float("nan"), "1"),
        (10**400, "86400"),
        (90_000.5, "86400"),
        (0, "1"),
        (-5, "1"),
    ],
)
async def test_an_error_with_a_retry_after_of_no_number_of_seconds_is_still_answered(
    retry_after: float, header: str
) -> None:
    """``math.ceil`` of inf or nan raised while the 503 was being written: no answer. An
    int no float holds must not raise either, nor a header of hundreds of digits go out:
    at most a day. Nor does a client get told to retry at once, or in the past: at least
    a second."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise PoolExhaustedError("no connection", retry_after=retry_after)

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    async with client(middleware) as http:
        response = await http.get("/", headers={"x-user-id": "u"})
    assert_problem(response, 503)
    assert response.headers["retry-after"] == header


async def test_a_query_thread_id_sent_as_raw_utf8_is_the_same_thread_as_its_escaped_form() -> None:
    """A server that passes the query's raw bytes: ``thread=\xc3\xa9`` was read byte by
    byte as latin-1 ('Ã©'), a thread other than the header's or the escaped query's 'é',
    and a raw '\xff' was taken as 'ÿ' where the header refuses it."""
    seen: list[str] = []
    middleware = _thread_recorder(seen)
    user = [(b"x-user-id", b"ann")]
    for query in (b"thread=t-\xc3\xa9", b"thread=t-%C3%A9"):
        await drive(middleware, ws_scope(user, query_string=query), [{"type": "websocket.connect"}])
    refused = await drive(
        middleware, ws_scope(user, query_string=b"thread=t-\xff"), [{"type": "websocket.connect"}]
    )
    assert seen == ["t-é", "t-é"]
    assert refused[0]["code"] == 1008


@pytest.mark.parametrize("context", ["alice", None])
def test_a_scope_takes_a_context_only(context: Any) -> None:
    """``Scope(registry, "alice")`` bound the string as "the context":
    ``get_current_context()`` returned it."""
    with pytest.raises(TypeError, match="takes a UserExecutionContext"):
        ambient.Scope(Registry(), context)


async def test_an_accepted_websocket_echoes_the_request_id_as_a_response_does() -> None:
    """The request id "is echoed on the response": on an accepted websocket it was not,
    only on a refused one. It goes with the handshake's 101 now (the accept's headers),
    kept when the app set its own."""

    def app_accepting(headers: list[tuple[bytes, bytes]]) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept", "headers": headers})
            await send({"type": "websocket.close", "code": 1000})

        return app

    user = [(b"x-user-id", b"ann"), (b"x-request-id", b"req-1")]
    for own, expected in (([], b"req-1"), ([(b"x-request-id", b"mine")], b"mine")):
        middleware = AmbientMiddleware(
            app_accepting(own), registry=Registry(), identity=trusted_header()
        )
        sent = await drive(middleware, ws_scope(user), [{"type": "websocket.connect"}])
        accept = sent[0]
        assert accept["type"] == "websocket.accept"
        assert [v for k, v in accept["headers"] if k == b"x-request-id"] == [expected]


async def test_a_websocket_the_app_denies_with_a_response_echoes_the_request_id() -> None:
    """An app's own denial of a handshake (the ``websocket.http.response`` extension, as
    Starlette's ``send_denial_response``) is the answer to the request as much as the
    middleware's denial or an accept: it went out without the request id, kept when the
    app set its own."""

    def app_denying(headers: list[tuple[bytes, bytes]]) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            start = {"type": "websocket.http.response.start", "status": 403, "headers": headers}
            await send(start)
            await send({"type": "websocket.http.response.body", "body": b"no"})

        return app

    user = [(b"x-user-id", b"ann"), (b"x-request-id", b"req-1")]
    scope = ws_scope(user, extensions={"websocket.http.response": {}})
    for own, expected in (([], b"req-1"), ([(b"x-request-id", b"mine")], b"mine")):
        middleware = AmbientMiddleware(
            app_denying(own), registry=Registry(), identity=trusted_header()
        )
        sent = await drive(middleware, scope, [{"type": "websocket.connect"}])
        start = sent[0]
        assert start["type"] == "websocket.http.response.start"
        assert [v for k, v in start["headers"] if k == b"x-request-id"] == [expected]


async def test_a_websocket_whose_identity_expires_past_what_a_float_holds_is_served() -> None:
    """``Identity(expires_at=10**400)`` is accepted (an expiry that never comes); the socket
    it opened raised OverflowError computing the time left, and was never served."""
    served: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        served.append(ambient.get_current_context().user_id)
        await send({"type": "websocket.close", "code": 1000})

    def forever(scope: Any) -> Identity:
        return Identity("ann", expires_at=10**400)

    middleware = AmbientMiddleware(app, registry=Registry(), identity=forever)
    sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert served == ["ann"]


def test_two_telemetries_on_the_registry_and_the_middleware_are_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each would trace and count every scope: two spans per request, doubled metrics."""
    once = Telemetry()
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        AmbientMiddleware(
            _no_answer,
            registry=Registry(telemetry=once),
            identity=None,
            anonymous=True,
            telemetry=Telemetry(),
        )
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        # The same one on both, or one of them only: nothing to say.
        AmbientMiddleware(
            _no_answer,
            registry=Registry(telemetry=once),
            identity=None,
            anonymous=True,
            telemetry=once,
        )
        AmbientMiddleware(
            _no_answer, registry=Registry(), identity=None, anonymous=True, telemetry=once
        )
        AmbientMiddleware(
            _no_answer, registry=Registry(telemetry=once), identity=None, anonymous=True
        )
    assert len(warned) == 1
    assert "traced and counted twice" in warned[0]
    assert not caplog.records


class _Mailbox:
    """A USER component whose async cleanup waits until the test lets it end."""

    def __init__(self, user: ambient.UserRef, release: anyio.Event, log: list[str]) -> None:
        self.user = user
        self._release = release
        self._log = log

    async def aclose(self) -> None:
        self._log.append(f"closing {self.user.user_id}")
        await self._release.wait()
        self._log.append(f"closed {self.user.user_id}")


async def test_a_websocket_cleans_expired_users_before_its_app_runs() -> None:
    """A socket may stay open for hours: the USER components it finds past their idle_ttl
    as it opens are cleaned then, before its app runs, not left until a scope closes."""
    now = [1000.0]
    cleaned: list[str] = []

    class Box:
        def __init__(self, user: ambient.UserRef) -> None:
            self.user = user

        def close(self) -> None:
            cleaned.append(self.user.user_id)

    registry = Registry(clock=lambda: now[0])
    registry.register(Box, Box, lifetime=Lifetime.USER, idle_ttl=60)
    async with registry.open_scope(UserExecutionContext.create("alice")):
        await ambient.resolve(Box)
    now[0] += 61
    seen: list[list[str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        seen.append(list(cleaned))
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    middleware = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    sent = await drive(
        middleware, ws_scope([(b"x-user-id", b"bob")]), [{"type": "websocket.connect"}]
    )
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert seen == [["alice"]]
    assert registry.stats().live_users == 0


async def test_a_user_back_after_their_idle_ttl_gets_fresh_components() -> None:
    """alice's USER component has been idle past its idle_ttl when her next request comes:
    that request gets a fresh one, never the expired one (cleaned once, after the answer)."""
    now = [1000.0]
    cleaned: list[object] = []

    class Box:
        def close(self) -> None:
            cleaned.append(self)

    registry = Registry(clock=lambda: now[0])
    registry.register(Box, Box, lifetime=Lifetime.USER, idle_ttl=60)
    seen: list[Box] = []

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await ambient.resolve(Box))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = AmbientMiddleware(endpoint, registry=registry, identity=trusted_header())
    request: list[Message] = [{"type": "http.request", "body": b""}]
    await drive(app, http_scope([(b"x-user-id", b"alice")]), request)
    now[0] += 61
    await drive(app, http_scope([(b"x-user-id", b"alice")]), request)
    assert len(seen) == 2
    assert seen[1] is not seen[0]
    assert cleaned == [seen[0]]
    await registry.aclose()
    assert cleaned == seen


@pytest.mark.parametrize("how", ["expired", "evicted"])
async def test_another_users_cleanups_run_after_the_response(how: str) -> None:
    """bob's request comes along once alice's mailbox has been idle past its idle_ttl, or
    when it takes the room of max_users=1 from her, and her mailbox's cleanup is slow:
    bob's response goes out first, then the cleanup runs (bob's call returns once it has
    ended, and it runs once). Before, bob's handler waited for alice's cleanup. alice
    coming back afterwards gets a fresh mailbox."""
    now = [1000.0]
    release = anyio.Event()
    log: list[str] = []
    registry = Registry(clock=lambda: now[0], max_users=1 if how == "evicted" else 10)
    registry.register(
        _Mailbox,
        lambda user: _Mailbox(user, release, log),
        lifetime=Lifetime.USER,
        idle_ttl=60,
    )
    seen: list[tuple[str, _Mailbox]] = []  # the mailboxes themselves: ids get reused

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        mailbox = await ambient.resolve(_Mailbox)
        seen.append((mailbox.user.user_id, mailbox))
        body = mailbox.user.user_id.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app = AmbientMiddleware(endpoint, registry=registry, identity=trusted_header())

    async def request(user: str, answered: anyio.Event) -> None:
        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                assert message["body"] == user.encode()
                answered.set()

        await app(http_scope([(b"x-user-id", user.encode())]), receive, send)

    with anyio.fail_after(5):
        await request("alice", anyio.Event())
        if how == "expired":
            now[0] += 61
        bob_answered = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(request, "bob", bob_answered)
            await bob_answered.wait()
            # alice's cleanup has not ended: bob's answer did not wait for it.
            assert "closed alice" not in log
            release.set()
        assert log == ["closing alice", "closed alice"]
        await request("alice", anyio.Event())
        await registry.aclose()
    assert [user for user, _ in seen] == ["alice", "bob", "alice"]
    assert seen[0][1] is not seen[2][1]
    assert sorted(log) == sorted(
        2 * ["closing alice", "closed alice"] + ["closing bob", "closed bob"]
    )


def _after_accept(
    error: BaseException, before: list[Message] | None = None
) -> Callable[[Any, Any, Any], Any]:
    """A websocket app that accepts, resolves the request's "tx", sends ``before`` (a close
    of its own), then raises ``error``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await ambient.resolve("tx")
        for message in before or ():
            if message["type"] == "receive":
                await receive()
            else:
                await send(message)
        raise error

    return app


class UpstreamError(AmbientError):
    """An app's own error with a server-side status (no policy violation, no overload)."""

    http_status = 502
    title = "Upstream unavailable"


class LedgerError(AmbientError):
    """An app's own error answered with a plain 500."""

    http_status = 500
    title = "Ledger unavailable"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamError("the model server"), 1011),
        (LedgerError("the ledger at 10.0.0.5"), 1011),
        (PoolExhaustedError("busy"), 1013),
        (InvalidContextError("thread_id", "too long", "x"), 1008),
    ],
    ids=["own-5xx", "own-500", "overload", "4xx"],
)
async def test_an_error_before_accept_closes_the_websocket_with_its_kind_of_code(
    error: AmbientError, code: int
) -> None:
    """An app's own ambient error with a 502, raised before it accepted the websocket,
    closed it with 1008 "policy violation": the client was told its request broke a rule
    when the server failed. A server error other than overload is 1011."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise error

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    sent = await drive(
        middleware, ws_scope([(b"x-user-id", b"ann")]), [{"type": "websocket.connect"}]
    )
    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", code)]


def _expiring_in_an_hour(scope: Any) -> Identity:
    return Identity("ann", expires_at=time.time() + 3600)


class TestWebsocketAnsweredAfterAccept:
    """An ambient error that carries an HTTP answer, raised by the app once its websocket
    was accepted, closes the socket with 1013 (a 503) or 1008, the problem's title as
    reason, instead of reaching the server (which drops the connection, a crash to the
    client); cleanups still see the error."""

    @pytest.mark.parametrize("expiring", [False, True], ids=["plain", "expiring"])
    @pytest.mark.parametrize(
        ("error", "code", "reason"),
        [
            (
                PoolExhaustedError("pool of ann's", retry_after=2),
                1013,
                "Service temporarily unavailable",
            ),
            (TooManyRequestsError("too many of ann's"), 1008, "Too many concurrent requests"),
            (IdentityError("the token of ann was revoked", status=401), 1008, "Invalid identity"),
            (
                InvalidContextError("thread_id", "too long", "x" * 300),
                1008,
                "Invalid request context",
            ),
            (
                ExceptionGroup("work", [PoolExhaustedError("first"), IdentityError("second")]),
                1013,
                "Service temporarily unavailable",
            ),
            (UpstreamError("the model server of ann's run"), 1011, "Upstream unavailable"),
        ],
        ids=["pool", "too-many", "identity", "invalid-context", "group", "own-5xx"],
    )
    async def test_the_socket_is_closed_with_the_errors_code(
        self, error: Exception, code: int, reason: str, expiring: bool
    ) -> None:
        seen: list[BaseException | None] = []
        identity = _expiring_in_an_hour if expiring else trusted_header()
        middleware = AmbientMiddleware(
            _after_accept(error), registry=_tx_registry(seen), identity=identity
        )
        sent = await drive(
            middleware, ws_scope([(b"x-user-id", b"ann")]), [{"type": "websocket.connect"}]
        )
        assert sent[1:] == [{"type": "websocket.close", "code": code, "reason": reason}]
        assert sent[0]["type"] == "websocket.accept"
        assert seen == [error]

    @pytest.mark.parametrize(
        ("error", "level"),
        [
            (PoolExhaustedError("pool at db-7 has 0 of 5 free"), logging.INFO),
            (UpstreamError("model server at 10.0.0.5 timed out"), logging.WARNING),
        ],
        ids=["503", "502"],
    )
    async def test_what_the_close_leaves_out_is_logged_with_the_request_id(
        self, error: AmbientError, level: int, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The close's reason is the problem's title; the error's own message, which names
        what only the server may know, is logged with the request id: information for an
        unavailable backend (503), a warning with its traceback for another server
        error."""
        caplog.set_level(logging.INFO, logger="ambient.middleware")
        seen: list[BaseException | None] = []
        middleware = AmbientMiddleware(
            _after_accept(error), registry=_tx_registry(seen), identity=trusted_header()
        )
        headers = [(b"x-user-id", b"ann"), (b"x-request-id", b"req-ws-9")]
        sent = await drive(middleware, ws_scope(headers), [{"type": "websocket.connect"}])
        assert str(error) not in sent[1]["reason"]
        withheld = [r for r in caplog.records if str(error) in r.getMessage()]
        assert [(r.levelno, r.exc_info is not None) for r in withheld] == [
            (level, level == logging.WARNING)
        ]
        assert "req-ws-9" in withheld[0].getMessage()

    @pytest.mark.parametrize(
        "error",
        [
            RuntimeError("a bug"),
            ExceptionGroup("work", [PoolExhaustedError("busy"), RuntimeError("a bug")]),
        ],
        ids=["bug", "mixed-group"],
    )
    async def test_any_other_error_still_reaches_the_server(self, error: Exception) -> None:
        seen: list[BaseException | None] = []
        middleware = AmbientMiddleware(
            _after_accept(error), registry=_tx_registry(seen), identity=trusted_header()
        )
        sent: list[Message] = []
        with pytest.raises(type(error)) as raised:
            await middleware(
                ws_scope([(b"x-user-id", b"ann")]),
                _script([{"type": "websocket.connect"}]),
                _recorder(sent),
            )
        assert raised.value is error
        assert [m["type"] for m in sent] == ["websocket.accept"]
        assert seen == [error]

    @pytest.mark.parametrize("expiring", [False, True], ids=["plain", "expiring"])
    @pytest.mark.parametrize(
        "before",
        [
            [{"type": "websocket.close", "code": 1000}],
            [{"type": "receive"}],
        ],
        ids=["closed-by-the-app", "client-gone"],
    )
    async def test_nothing_is_sent_on_a_socket_already_closed(
        self, before: list[Message], expiring: bool
    ) -> None:
        """The app closed the socket itself, or received the client's disconnect (a close
        sent then is refused: uvicorn raises), before raising: nothing more is sent, and
        the error does not reach the server either."""
        seen: list[BaseException | None] = []
        error = PoolExhaustedError("busy")
        identity = _expiring_in_an_hour if expiring else trusted_header()
        middleware = AmbientMiddleware(
            _after_accept(error, before), registry=_tx_registry(seen), identity=identity
        )
        incoming: list[Message] = [
            {"type": "websocket.connect"},
            {"type": "websocket.disconnect", "code": 1001},
        ]
        sent = await drive(middleware, ws_scope([(b"x-user-id", b"ann")]), incoming)
        closes = [m for m in before if m["type"] == "websocket.close"]
        assert sent == [{"type": "websocket.accept", "headers": sent[0]["headers"]}, *closes]
        assert seen == [error]

    async def test_a_client_gone_unnoticed_refuses_the_close_quietly(self) -> None:
        """The client went away before its disconnect was received: the server's send
        refuses the close (uvicorn's ClientDisconnected, an OSError), and nobody is left to
        answer; the error does not reach the server."""
        seen: list[BaseException | None] = []
        error = PoolExhaustedError("busy")
        middleware = AmbientMiddleware(
            _after_accept(error), registry=_tx_registry(seen), identity=trusted_header()
        )
        sent: list[Message] = []

        async def send(message: Message) -> None:
            if message["type"] == "websocket.close":
                raise ConnectionResetError("the client is gone")
            sent.append(message)

        with anyio.fail_after(5):
            await middleware(
                ws_scope([(b"x-user-id", b"ann")]), _script([{"type": "websocket.connect"}]), send
            )
        assert [m["type"] for m in sent] == ["websocket.accept"]
        assert seen == [error]

    async def test_an_error_raised_as_the_expiry_cancels_the_app_gets_the_expirys_close(
        self,
    ) -> None:
        """The app, cancelled at its identity's expiry, raises such an error as it unwinds
        (its pool's wait cut short): the socket is closed with 4001 "identity expired",
        not with the error's 1013; trying again with the same credential is no use."""
        seen: list[BaseException | None] = []
        error = PoolExhaustedError("no connection while unwinding")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "websocket.accept"})
            await ambient.resolve("tx")
            try:
                await anyio.sleep_forever()  # the client stays silent: only expiry ends this
            except anyio.get_cancelled_exc_class():
                raise error from None

        def expiring(scope: Any) -> Identity:
            return Identity("ann", expires_at=time.time() + 0.2)

        middleware = AmbientMiddleware(app, registry=_tx_registry(seen), identity=expiring)
        sent = await drive(middleware, ws_scope([]), [{"type": "websocket.connect"}])
        assert sent[1:] == [{"type": "websocket.close", "code": 4001, "reason": "identity expired"}]
        assert seen == [error]

    async def test_a_long_title_is_cut_to_the_close_frame_limit(self) -> None:
        class LongTitledError(PoolExhaustedError):
            title = "é" * 100

        middleware = AmbientMiddleware(
            _after_accept(LongTitledError("busy")),
            registry=_tx_registry([]),
            identity=trusted_header(),
        )
        sent = await drive(
            middleware, ws_scope([(b"x-user-id", b"ann")]), [{"type": "websocket.connect"}]
        )
        assert sent[1]["code"] == 1013
        assert sent[1]["reason"] == "é" * 61


def _script(incoming: list[Message]) -> Callable[[], Any]:
    queue = list(incoming)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    return receive


def _recorder(sent: list[Message]) -> Callable[[Message], Any]:
    async def send(message: Message) -> None:
        sent.append(message)

    return send
