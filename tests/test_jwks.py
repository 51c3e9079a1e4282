"""jwt_bearer with a ``PyJWKClient``: the identity provider's key set fetched over HTTP from a
real server on loopback, while it works, fails, answers garbage, goes away and comes back.

A token the key set does not know is the token's fault (401); a key set that cannot be had
is the server's (503 with Retry-After), and never tells a client its good token is bad.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import socket
import struct
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from packaging.requirements import Requirement

from ambient import Registry
from ambient.errors import IdentityUnavailableError
from ambient.middleware import AmbientMiddleware, first_of, trusted_header
from ambient.middleware.identity import jwt_bearer
from tests.servers import serve
from tests.test_identity import AUDIENCE, ISSUER, PRIVATE_KEY, SECRET, _echo_app, token
from tests.test_middleware import drive, ws_scope
from tests.test_psycopg import _eventually

USERS = 30


# The identity provider's next key, once it rotates.
ROTATED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key: Any, kid: str, use: str = "sig") -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": use})
    return jwk


class KeySetServer:
    """An identity provider's JWKS endpoint whose answer the test chooses."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fetches = 0
        jwk = public_jwk(PRIVATE_KEY, "k1")
        self.document = json.dumps({"keys": [jwk]}).encode()
        self.odd_key = json.dumps({"keys": [{**jwk, "alg": ["RS256"]}]}).encode()

    def serve_keys(self, *keys: dict[str, Any]) -> None:
        """What the provider's key set holds from now on."""
        self.document = json.dumps({"keys": list(keys)}).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.fetches += 1
        status, body = {
            "ok": (200, self.document),
            "error": (500, b"upstream broke"),
            "garbage": (200, b'["not", "a", "key", "set"]'),
            "no keys": (200, b'{"keys": []}'),
            # What PyJWKClient does not turn into its own errors: a body that is not JSON
            # (a proxy's or captive portal's page, nothing, bytes of no text encoding), JSON
            # nested past the parser's recursion limit, a key whose "alg" is not a string.
            "html": (200, b"<html><body>Please sign in to the network</body></html>"),
            "empty": (200, b""),
            "binary": (200, b"\xff\xfe\x00\x81\x00garbage"),
            "nested": (200, b"[" * 100_000 + b"]" * 100_000),
            "odd key": (200, self.odd_key),
        }[self.mode]
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def provider() -> Iterator[tuple[KeySetServer, str]]:
    server = KeySetServer()
    with serve("uvicorn", server) as url:
        yield server, f"{url}/.well-known/jwks.json"


def protected(jwks_url: str) -> AmbientMiddleware:
    client = jwt.PyJWKClient(jwks_url, timeout=5)
    identity = jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
    return AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)


async def ask(
    app: AmbientMiddleware, user: str = "alice", kid: str | None = "k1", key: Any = PRIVATE_KEY
) -> httpx.Response:
    bearer = token({"sub": user}, key=key, alg="RS256", **({} if kid is None else {"kid": kid}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get("/", headers={"authorization": f"Bearer {bearer}"})


async def test_a_token_naming_no_key_is_401_without_a_fetch_even_with_the_provider_down(
    provider: tuple[KeySetServer, str],
) -> None:
    """PyJWKClient matches no key to a token without a ``kid``: such a token is refused
    401 at once, with the provider up or down, and the provider is not asked; nor to one
    whose ``kid`` is empty. It was fetched for (again after each cooldown), and answered
    503 while the provider was down, telling the client to retry a token that can never
    pass; a token with a ``kid`` still gets its key."""
    server, url = provider
    app = protected(url)
    for mode in ("ok", "error"):
        server.mode = mode
        for user, kid in (("alice", None), ("bob", "")):
            refused = await ask(app, user, kid=kid)
            assert refused.status_code == 401, refused.text
            assert "names no key (kid)" in refused.json()["detail"]
    assert server.fetches == 0
    server.mode = "ok"
    answered = await ask(app, "carol")
    assert (answered.status_code, answered.json()["user"]) == (200, "carol")
    assert server.fetches == 1


async def test_a_request_without_a_bearer_token_goes_to_the_next_resolver_unfetched(
    provider: tuple[KeySetServer, str],
) -> None:
    """A request with no ``Authorization`` header (a service behind the proxy, asserting
    its user in a trusted header) has no identity from the key set's resolver: the next
    resolver answers, and the provider is not asked, up or down. A bearer token after it
    is still verified against the key set."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5)
    identity = first_of(
        jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER),
        trusted_header(),
    )
    app = AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        for mode in ("ok", "error"):
            server.mode = mode
            answered = await http.get("/", headers={"x-user-id": "svc"})
            assert (answered.status_code, answered.json()["user"]) == (200, "svc")
        assert server.fetches == 0
        server.mode = "ok"
        bearer = token({"sub": "alice"}, key=PRIVATE_KEY, alg="RS256", kid="k1")
        answered = await http.get("/", headers={"authorization": f"Bearer {bearer}"})
        assert (answered.status_code, answered.json()["user"]) == (200, "alice")
    assert server.fetches == 1


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    problem = response.json()
    assert problem["type"] == "urn:ambient:problem:identity-unavailable"
    # What failed on the server's side (the provider, its address) is for its log only.
    assert problem["detail"] == IdentityUnavailableError.client_detail


async def test_many_users_verified_against_one_fetch_of_the_key_set(
    provider: tuple[KeySetServer, str],
) -> None:
    server, url = provider
    app = protected(url)
    answers: dict[str, httpx.Response] = {}

    async def one(user: str) -> None:
        answers[user] = await ask(app, user)

    first = await ask(app, "warm-up")  # one fetch fills PyJWKClient's cache
    assert first.status_code == 200, first.text
    async with anyio.create_task_group() as tg:
        for n in range(USERS):
            tg.start_soon(one, f"user-{n}")
    assert {user: (r.status_code, r.json()["user"]) for user, r in answers.items()} == {
        f"user-{n}": (200, f"user-{n}") for n in range(USERS)
    }
    assert server.fetches == 1


async def test_a_key_the_key_set_does_not_have_is_the_tokens_fault(
    provider: tuple[KeySetServer, str],
) -> None:
    _, url = provider
    app = protected(url)
    for kid, detail in (("k9", "not trusted"), (None, "names no key (kid)")):
        response = await ask(app, kid=kid)
        assert response.status_code == 401, response.text
        assert response.json()["type"] == "urn:ambient:problem:identity"
        assert detail in response.json()["detail"]


@pytest.mark.parametrize(
    "mode", ["error", "garbage", "no keys", "html", "empty", "binary", "nested", "odd key"]
)
async def test_a_key_set_that_cannot_be_had_is_503_and_logged_once_per_outage(
    provider: tuple[KeySetServer, str],
    mode: str,
    caplog: pytest.LogCaptureFixture,
    clock: _Clock,
) -> None:
    """The endpoint fails: every request is 503 with Retry-After (its token may be fine),
    the provider is not asked again until the Retry-After has passed, the log says so once,
    and again once when the key set works again."""
    server, url = provider
    app = protected(url)
    server.mode = mode
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        for _ in range(3):
            assert_unavailable(await ask(app))
        assert server.fetches == 1
        clock.now += 5.01
        assert_unavailable(await ask(app))
        assert server.fetches == 2
        server.mode = "ok"
        clock.now += 5.01
        back = await ask(app)
    assert back.status_code == 200, back.text
    messages = [r.getMessage() for r in caplog.records if "jwt_bearer()" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "key set" in messages[0]
    assert "works again" in messages[1]


async def test_an_identity_provider_that_is_gone_is_503_and_1013_for_a_websocket() -> None:
    """Nothing listens where the key set should be (connection refused): 503 for a request;
    a websocket handshake is closed before accept with 1013, "try again later"."""
    server = KeySetServer()
    with serve("uvicorn", server) as url:
        pass  # the server has stopped: its port refuses connections now
    app = protected(f"{url}/.well-known/jwks.json")
    assert_unavailable(await ask(app))
    bearer = token(key=PRIVATE_KEY, alg="RS256", kid="k1")
    handshake = ws_scope([(b"authorization", f"Bearer {bearer}".encode())])
    sent = await drive(app, handshake, [{"type": "websocket.connect"}])
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1013)]
    assert sent[0]["reason"] == IdentityUnavailableError.client_detail
    assert server.fetches == 0


class GatedKeySetServer(KeySetServer):
    """A slow identity provider: it answers only once the test opens its gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.asked = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.asked.set()
            await anyio.to_thread.run_sync(self.gate.wait, abandon_on_cancel=True)
        await super().__call__(scope, receive, send)


async def test_a_slow_identity_provider_leaves_the_applications_threads_free() -> None:
    """60 requests wait for the key set while the provider is slow to answer. The
    application's own worker threads (anyio's default limiter, which Starlette's sync
    endpoints and file responses use too) stay free for it; once the key set arrives,
    one fetch serves every request."""
    async with sixty_waiting_for_a_slow_provider():
        with anyio.fail_after(5):
            assert await anyio.to_thread.run_sync(lambda: "free") == "free"


@contextlib.asynccontextmanager
async def sixty_waiting_for_a_slow_provider() -> AsyncIterator[int]:
    """60 users' requests waiting for the key set from a provider that answers once the
    block is left (also when it raised): then each is verified as itself, after one
    fetch. Gives the number of threads there were before the requests began."""
    server = GatedKeySetServer()
    answers: list[httpx.Response] = []
    with serve("uvicorn", server) as url:
        app = protected(f"{url}/.well-known/jwks.json")

        async def one(n: int) -> None:
            answers.append(await ask(app, f"user-{n}"))

        before = threading.active_count()
        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(one, n)
            try:
                await anyio.wait_all_tasks_blocked()
                yield before
            finally:
                # Before the task group waits for the requests, whatever happened above.
                server.gate.set()
    assert sorted(r.json()["user"] for r in answers) == sorted(f"user-{n}" for n in range(60))
    assert server.fetches == 1


class HangingKeySetServer(KeySetServer):
    """An identity provider that takes connections and never answers (a hung host): every
    fetch ends in the client's timeout. Counts the fetches that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.mode == "hang":
            self.arrived += 1
            while (await receive())["type"] != "http.disconnect":
                pass  # no answer until the client gives up and closes the connection
            return
        await super().__call__(scope, receive, send)


@pytest.fixture
def hanging() -> Iterator[tuple[HangingKeySetServer, str]]:
    server = HangingKeySetServer()
    with serve("uvicorn", server) as url:
        yield server, f"{url}/.well-known/jwks.json"


class _Clock:
    """``time.monotonic`` for the key set's pause and PyJWKClient's cache, moved by the test
    instead of waited out."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _TimeWith:
    """The ``time`` module as PyJWT's key set modules see it: ``monotonic`` is the test's."""

    def __init__(self, clock: _Clock) -> None:
        self.monotonic = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("ambient.middleware.identity._monotonic", fake)
    # PyJWT's too: when the client fetched its key set, its lifespan and its cooldown.
    for module in ("jwt.api_jwk", "jwt.jwk_set_cache", "jwt.jwks_client"):
        monkeypatch.setattr(f"{module}.time", _TimeWith(fake))
    return fake


def hung_protected(jwks_url: str) -> AmbientMiddleware:
    # No refresh cooldown: an unknown kid makes PyJWKClient ask the provider again at once.
    client = jwt.PyJWKClient(jwks_url, timeout=0.5, lifespan=300, cooldown_duration=0)
    identity = jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
    return AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)


async def test_a_hung_identity_provider_is_asked_once_not_once_per_waiting_request(
    hanging: tuple[HangingKeySetServer, str], clock: _Clock
) -> None:
    """The provider takes the connection and never answers. 20 users arrive at once: one
    fetch waits out the client's timeout and the other 19 get their 503 then, instead of
    each waiting its own timeout in turn behind PyJWKClient's lock (20 timeouts for the
    last one). Until the pause (the Retry-After) ends, nobody asks the provider again."""
    server, url = hanging
    server.mode = "hang"
    app = hung_protected(url)
    answers: list[httpx.Response] = []

    async def one(n: int) -> None:
        answers.append(await ask(app, f"user-{n}"))

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, n)
    assert len(answers) == 20
    for response in answers:
        assert response.status_code == 503, response.text
        assert 1 <= int(response.headers["retry-after"]) <= 5
    assert server.arrived == 1
    assert_unavailable(await ask(app))
    assert server.arrived == 1

    clock.now += 5.01  # the pause is over: the next request asks the provider again
    server.mode = "ok"
    back = await ask(app, "after")
    assert (back.status_code, back.json()["user"]) == (200, "after")
    assert server.fetches == 1


async def test_keys_already_fetched_keep_working_while_the_provider_is_down(
    hanging: tuple[HangingKeySetServer, str], clock: _Clock
) -> None:
    """The key set was fetched while the provider worked; then it hangs. A token with an
    unknown kid makes PyJWKClient ask again and fail: that request is 503 (the key may be a
    new one), and during the pause tokens whose key is in the fetched set still pass, while
    another unknown kid is 503 at once without asking the hung provider."""
    server, url = hanging
    app = hung_protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "hang"
    assert_unavailable(await ask(app, kid="k-rotated"))
    assert server.arrived == 1
    for n in range(5):
        ok = await ask(app, f"user-{n}")
        assert (ok.status_code, ok.json()["user"]) == (200, f"user-{n}")
    assert_unavailable(await ask(app, kid="k-other"))
    assert server.arrived == 1
    assert server.fetches == 1


@pytest.fixture
def cut_off() -> Iterator[str]:
    """An identity provider whose connection breaks mid-answer: it sends the head and the
    start of the key set, then resets the connection (RST, not a clean close)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve_forever() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b'content-length: 4096\r\n\r\n{"keys": [{"kty": "RSA", '
                )
                # Linger 0: close() sends a reset instead of a FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/.well-known/jwks.json"
    finally:
        done.set()
        thread.join(5)
        listener.close()


async def test_a_connection_reset_in_the_middle_of_the_key_set_is_503(
    cut_off: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ambient.middleware"):
        response = await ask(protected(cut_off))
    assert_unavailable(response)
    logged = [r.getMessage() for r in caplog.records if r.name == "ambient.middleware"]
    assert [m for m in logged if "503" in m and "could not be fetched" in m], logged


class TricklingKeySetServer(KeySetServer):
    """An identity provider that sends its key set one byte at a time, each well within the
    client's timeout (which bounds every read, not the whole answer), until the test lets
    the rest go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.sent = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        self.fetches += 1
        body = self.document
        length = str(len(body)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", length)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        sent = 0
        while sent < len(body) - 1 and not self.release.is_set():
            await send(
                {"type": "http.response.body", "body": body[sent : sent + 1], "more_body": True}
            )
            sent += 1
            await anyio.sleep(0.05)
        await send({"type": "http.response.body", "body": body[sent:]})
        self.sent.set()


async def test_a_key_set_that_trickles_in_is_503_within_the_clients_timeout(
    clock: _Clock,
) -> None:
    """The provider answers a byte at a time, never pausing long enough for the client's
    timeout: the fetch would take as long as the provider likes, every request waiting for
    it. Requests are answered 503 once the client's timeout has passed instead, all at
    once, the provider asked once; the fetch goes on, and once it ends its keys serve."""
    server = TricklingKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=0.5)
        identity = jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
        app = AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)
        answers: list[httpx.Response] = []

        async def one(n: int) -> None:
            answers.append(await ask(app, f"user-{n}"))

        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for n in range(10):
                        tg.start_soon(one, n)
            assert len(answers) == 10
            for response in answers:
                assert_unavailable(response)
            assert server.fetches == 1
        finally:
            server.release.set()
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(server.sent.wait)

        async def cached() -> bool:
            return client.jwk_set_cache is not None and client.jwk_set_cache.get() is not None

        await _eventually(cached, "the key set fetched after all")
        back = await ask(app, "after")
    assert (back.status_code, back.json()["user"]) == (200, "after")
    assert server.fetches == 1


def test_hmac_algorithms_are_refused_with_a_key_set_fetched_from_a_url() -> None:
    """A key set served at a URL is public: a secret (oct) key in it would let anyone who
    reads it sign tokens, so HMAC with a PyJWKClient is refused where it is configured."""
    client = jwt.PyJWKClient("http://127.0.0.1:9/.well-known/jwks.json", timeout=1)
    for algorithms in (["HS256"], ["HS256", "HS512"]):
        with pytest.raises(ValueError, match="PyJWKClient"):
            jwt_bearer(client, algorithms=algorithms, audience=AUDIENCE, issuer=ISSUER)
    assert jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nested(where: str, alg: str = "RS256") -> str:
    """A token whose header or payload is JSON nested past the parser's recursion limit
    (under 3 KB: a header any server takes), signed with nothing."""
    deep = b"[" * 1000 + b"]" * 1000
    header = json.dumps({"alg": alg, "kid": "k1"}).encode()
    payload = json.dumps({"sub": "mallory"}).encode()
    if where == "header":
        header = header[:-1] + b', "x": ' + deep + b"}"
    else:
        payload = payload[:-1] + b', "x": ' + deep + b"}"
    return f"{_b64(header)}.{_b64(payload)}.{_b64(b'x' * 256)}"


async def test_tokens_naming_unknown_keys_do_not_fetch_the_key_set_each_time(
    provider: tuple[KeySetServer, str],
) -> None:
    """Thirty requests whose tokens name keys the key set does not have, each a new one:
    each is 401, and the identity provider is not asked again for each (PyJWT before 2.14
    fetched the key set for every one, so a client could keep the provider busy and the
    requests with good tokens queued behind those fetches)."""
    server, url = provider
    app = protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    for n in range(30):
        response = await ask(app, kid=f"unknown-{n}")
        assert response.status_code == 401, response.text
    assert server.fetches == 1
    assert (await ask(app, "after")).status_code == 200


@pytest.mark.parametrize("where", ["header", "payload"])
async def test_a_token_nested_past_the_parsers_limit_is_malformed_not_an_outage(
    provider: tuple[KeySetServer, str], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A token whose header or payload nests JSON past the parser's limit is 401 (with a
    key set, and with a secret). PyJWT 2.13 let the parser's RecursionError through, and
    PyJWT 2.14 still did for a key set's look at the payload: with a secret that was a 500,
    with a key set a 503 that also made every token whose key was not fetched yet a 503
    for the next 5 seconds, whoever sent it."""
    server, url = provider
    app = protected(url)
    hmac_app = AmbientMiddleware(
        _echo_app,
        registry=Registry(),
        identity=jwt_bearer(SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER),
    )
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        for target, alg in ((app, "RS256"), (hmac_app, "HS256")):
            transport = httpx.ASGITransport(app=target)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                bearer = nested(where, alg)
                response = await client.get("/", headers={"authorization": f"Bearer {bearer}"})
            assert response.status_code == 401, response.text
            assert response.json()["type"] == "urn:ambient:problem:identity"
        assert (await ask(app, "after")).status_code == 200
    assert not [r for r in caplog.records if "jwt_bearer()" in r.getMessage()]
    assert server.fetches == 1


def test_the_jwt_extra_leaves_out_pyjwt_releases_that_hostile_tokens_get_past() -> None:
    """The two tests above fail with PyJWT 2.13, the second one with PyJWT 2.14 too: the
    jwt extra allowed both."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["jwt"]]
    [pyjwt] = [r for r in wanted if r.name.lower() == "pyjwt"]
    assert not any(pyjwt.specifier.contains(old) for old in ("2.13.0", "2.14.0"))
    assert pyjwt.specifier.contains(jwt.__version__)


async def test_a_key_the_provider_added_since_the_last_fetch_is_401_until_the_cooldown(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """PyJWKClient fetches the key set again for a kid it lacks only once its last fetch is
    ``cooldown_duration`` old (30 s by default): a token signed with a key the provider
    added since is 401 until then, and verified after."""
    server, url = provider
    app = protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    server.serve_keys(public_jwk(PRIVATE_KEY, "k1"), public_jwk(ROTATED_KEY, "k2"))
    clock.now += 29
    early = await ask(app, "early", kid="k2", key=ROTATED_KEY)
    assert early.status_code == 401, early.text
    assert "not trusted" in early.json()["detail"]
    assert server.fetches == 1
    clock.now += 1.01
    later = await ask(app, "later", kid="k2", key=ROTATED_KEY)
    assert (later.status_code, later.json()["user"]) == (200, "later")
    assert server.fetches == 2


async def test_an_outage_is_not_said_to_be_over_by_a_key_the_clients_cache_held(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A token naming a key the client lacks makes it ask the provider, which is down: one
    warning. Tokens whose key the client's cache holds pass meanwhile, each as its own user,
    but the provider is no more answering for that: the outage is over (one warning says
    so) only once a fetch works. Before, the first token the cache served said "works
    again", and the next failing fetch warned of the same outage once more."""
    server, url = provider
    app = protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        for _ in range(2):
            clock.now += 30.01  # past PyJWKClient's cooldown: an unknown kid is fetched for
            assert_unavailable(await ask(app, kid="k-new"))
            clock.now += 5.01  # past the pause: the cache's key is asked of the client
            assert await users_at_once(app) == each_as_itself()
        assert server.fetches == 3
        assert len(key_set_warnings(caplog)) == 1, key_set_warnings(caplog)
        server.mode = "ok"
        clock.now += 30.01
        refused = await ask(app, "unknown", kid="k-new")
    assert refused.status_code == 401, refused.text
    assert server.fetches == 4
    warnings = key_set_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "could not be fetched" in warnings[0]
    assert warnings[1].endswith("works again"), warnings[1]


async def test_a_fetch_that_works_ends_the_outage_though_it_lacks_the_tokens_key(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider is back, with its keys rotated: the first token, signed with the key it
    removed, is 401, and the log says at once that the key set works again (it did not
    until a token with a key of the new set came)."""
    server, url = provider
    app = protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    clock.now += LIFESPAN + 1
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        assert_unavailable(await ask(app, kid="k-new"))  # k1 would serve from the last set
        server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
        server.mode = "ok"
        clock.now += 5.01
        refused = await ask(app, "old-key")
        assert refused.status_code == 401, refused.text
        assert "not trusted" in refused.json()["detail"]
        warnings = key_set_warnings(caplog)
        assert len(warnings) == 2, warnings
        assert warnings[1].endswith("works again"), warnings[1]
        rotated = await ask(app, "new-key", kid="k2", key=ROTATED_KEY)
    assert (rotated.status_code, rotated.json()["user"]) == (200, "new-key")
    assert len(key_set_warnings(caplog)) == 2


# -- the last key set fetched, while the provider is down past the client's cache -----------

# PyJWKClient's default lifespan of its cached key set, and jwt_bearer's default bound on
# serving the last key set fetched once that has expired.
LIFESPAN = 300.0
STALE_KEYS_FOR = 3600.0


def stale_protected(
    jwks_url: str, client: jwt.PyJWKClient | None = None, **options: Any
) -> AmbientMiddleware:
    client = client or jwt.PyJWKClient(jwks_url, timeout=5)
    identity = jwt_bearer(client, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER, **options)
    return AmbientMiddleware(_echo_app, registry=Registry(), identity=identity)


async def users_at_once(app: AmbientMiddleware, users: int = USERS) -> dict[str, Any]:
    """``users`` distinct users asking at once: each one's status and the user it ran as."""
    answers: dict[str, httpx.Response] = {}

    async def one(user: str) -> None:
        answers[user] = await ask(app, user)

    async with anyio.create_task_group() as tg:
        for n in range(users):
            tg.start_soon(one, f"user-{n}")
    return {user: (r.status_code, r.json().get("user")) for user, r in answers.items()}


def each_as_itself(users: int = USERS) -> dict[str, Any]:
    return {f"user-{n}": (200, f"user-{n}") for n in range(users)}


def key_set_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "jwt_bearer()" in r.getMessage()]


@pytest.mark.parametrize("mode", ["error", "html"])
async def test_the_last_key_set_fetched_serves_while_the_provider_is_down_past_the_cache(
    provider: tuple[KeySetServer, str],
    mode: str,
    clock: _Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client's cached key set has expired (its lifespan) when the provider goes down
    (an error, or an answer that is no key set): tokens whose key was in the last key set
    fetched still pass, each request as its own user, while a token whose key the provider
    cannot be asked about is 503. One warning says so, one says when it works again."""
    server, url = provider
    app = stale_protected(url)
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        assert (await ask(app, "warm-up")).status_code == 200
        server.mode = mode
        clock.now += LIFESPAN + 1
        assert await users_at_once(app) == each_as_itself()
        assert server.fetches == 2  # one try during the outage, then the pause
        assert_unavailable(await ask(app, kid="k-new"))
        clock.now += 5.01  # past the pause: the provider is asked again, and still fails
        assert await users_at_once(app) == each_as_itself()
        assert server.fetches == 3
        server.mode = "ok"
        clock.now += 5.01
        back = await ask(app, "back")
    assert (back.status_code, back.json()["user"]) == (200, "back")
    assert server.fetches == 4
    warnings = key_set_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "serves meanwhile" in warnings[0]
    assert "works again" in warnings[1]
    assert "served meanwhile" in warnings[1]


@pytest.mark.parametrize("stale_keys_for", [None, 600.0])
async def test_the_last_key_set_fetched_serves_for_stale_keys_for_at_most(
    provider: tuple[KeySetServer, str],
    clock: _Clock,
    stale_keys_for: float | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Counted from the last fetch that worked: a second before the bound a token whose key
    was fetched passes, a second after it is 503, and so is every later one. An outage that
    begins past the bound says so in its warning."""
    server, url = provider
    options = {} if stale_keys_for is None else {"stale_keys_for": stale_keys_for}
    bound = STALE_KEYS_FOR if stale_keys_for is None else stale_keys_for
    app = stale_protected(url, **options)
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        assert (await ask(app, "warm-up")).status_code == 200
        server.mode = "error"
        clock.now += bound - 1
        ok = await ask(app, "just-in-time")
        assert (ok.status_code, ok.json()["user"]) == (200, "just-in-time")
        clock.now += 2  # still in the pause
        late = await ask(app)
        assert (late.status_code, late.headers["retry-after"]) == (503, "3"), late.text
        clock.now += 5.01
        assert_unavailable(await ask(app))
        assert server.fetches == 3

        server.mode = "ok"  # it works again, then is left alone past the bound
        clock.now += 5.01
        assert (await ask(app)).status_code == 200
        server.mode = "html"
        clock.now += bound + 1
        assert_unavailable(await ask(app))
    assert server.fetches == 5
    warnings = key_set_warnings(caplog)
    assert len(warnings) == 3, warnings
    assert "serves meanwhile, for 1 s more at most" in warnings[0]
    assert "works again; keys fetched before it served meanwhile" in warnings[1]
    assert "serves no more" in warnings[2]


async def test_stale_keys_for_0_leaves_the_keys_to_the_clients_cache(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``stale_keys_for=0``: once the client's cache has expired, an outage is 503 for
    every token, as it was before the option; within the lifespan the cache serves."""
    server, url = provider
    app = stale_protected(url, stale_keys_for=0)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    assert (await ask(app, "cached")).status_code == 200
    clock.now += LIFESPAN + 1
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        for _ in range(2):
            assert_unavailable(await ask(app))
            clock.now += 5.01
    assert server.fetches == 3
    [warning] = key_set_warnings(caplog)
    assert "while in the client's cache (stale_keys_for=0)" in warning


async def test_a_key_for_encryption_never_serves_during_an_outage(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """The key set holds the same public key twice, for signatures (k1) and marked for
    encryption (k-enc): a token naming k-enc is refused while the provider works, and during
    an outage it is 503, never verified with the key remembered, while k1 still passes."""
    server, url = provider
    server.serve_keys(public_jwk(PRIVATE_KEY, "k1"), public_jwk(PRIVATE_KEY, "k-enc", "enc"))
    app = stale_protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    assert (await ask(app, kid="k-enc")).status_code == 401
    server.mode = "error"
    clock.now += LIFESPAN + 1
    assert_unavailable(await ask(app, kid="k-enc"))
    ok = await ask(app, "signer")
    assert (ok.status_code, ok.json()["user"]) == (200, "signer")
    assert_unavailable(await ask(app, kid="k-enc"))


async def test_the_provider_back_with_rotated_keys_replaces_the_set_remembered(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """During the outage k1 serves from the last key set fetched. The provider comes back
    having rotated its key: k2 is verified with the key set fetched anew, k1 is 401, and in
    the next outage past the client's cache the set remembered is the new one: k2 serves,
    the removed k1 is 503, not verified with the set fetched before."""
    server, url = provider
    app = stale_protected(url)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    clock.now += LIFESPAN + 1
    assert (await ask(app, "during")).status_code == 200
    server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
    server.mode = "ok"
    clock.now += 5.01
    rotated = await ask(app, "rotated", kid="k2", key=ROTATED_KEY)
    assert (rotated.status_code, rotated.json()["user"]) == (200, "rotated")
    removed = await ask(app, "removed")
    assert removed.status_code == 401, removed.text
    assert "not trusted" in removed.json()["detail"]
    assert server.fetches == 3

    server.mode = "html"
    clock.now += LIFESPAN + 1
    assert_unavailable(await ask(app, "removed"))
    assert server.fetches == 4
    again = await ask(app, "rotated-again", kid="k2", key=ROTATED_KEY)
    assert (again.status_code, again.json()["user"]) == (200, "rotated-again")
    assert_unavailable(await ask(app, "removed"))


async def _rotated_by_another_resolver(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> tuple[KeySetServer, AmbientMiddleware]:
    """Two resolvers share one client. The first saw k1; the provider then rotated to k2
    alone, which the second fetched past the client's cache: the provider, and the first."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5)
    first, second = stale_protected(url, client), stale_protected(url, client)
    assert (await ask(first, "warm-up")).status_code == 200
    server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
    clock.now += LIFESPAN + 1
    assert (await ask(second, "second", kid="k2", key=ROTATED_KEY)).status_code == 200
    return server, first


async def test_a_client_shared_by_two_resolvers_serves_the_last_key_set_either_fetched(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """Two resolvers share one client. The first saw k1; the provider then rotated to k2
    alone, which the second fetched. In an outage past the client's cache the first serves
    what was fetched last: k2, not the k1 the provider removed."""
    server, first = await _rotated_by_another_resolver(provider, clock)
    assert server.fetches == 2
    server.mode = "error"
    clock.now += LIFESPAN + 1
    assert_unavailable(await ask(first, "removed"))
    ok = await ask(first, "rotated", kid="k2", key=ROTATED_KEY)
    assert (ok.status_code, ok.json()["user"]) == (200, "rotated")


async def test_a_client_that_caches_no_key_set_serves_the_last_key_it_found(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """``cache_jwk_set=False``: each token's lookup fetches the key set, and only the key
    found is seen. During an outage that key serves, for ``stale_keys_for`` at most; a key
    of the set no token named before is 503."""
    server, url = provider
    server.serve_keys(public_jwk(PRIVATE_KEY, "k1"), public_jwk(ROTATED_KEY, "k2"))
    client = jwt.PyJWKClient(url, timeout=5, cache_jwk_set=False)
    app = stale_protected(url, client)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    assert await users_at_once(app, 10) == each_as_itself(10)
    assert_unavailable(await ask(app, kid="k2", key=ROTATED_KEY))
    clock.now += STALE_KEYS_FOR + 1
    assert_unavailable(await ask(app))
    assert server.fetches == 3


class LaterTricklingKeySetServer(TricklingKeySetServer):
    """An identity provider that answers at once until the test makes it trickle."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.mode == "trickle":
            await super().__call__(scope, receive, send)
        else:
            await KeySetServer.__call__(self, scope, receive, send)


@contextlib.asynccontextmanager
async def trickling_past_the_cache(
    clock: _Clock, *, client_timeout: float
) -> AsyncIterator[tuple[LaterTricklingKeySetServer, AmbientMiddleware]]:
    """A provider whose key set a resolver fetched once, and which now sends it a byte at a
    time, the client's cached set expired: the provider, and the app behind the resolver."""
    server = LaterTricklingKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=client_timeout)
        app = stale_protected(url, client)
        try:
            assert (await ask(app, "warm-up")).status_code == 200
            server.mode = "trickle"
            clock.now += LIFESPAN + 1
            yield server, app
        finally:
            server.release.set()
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(server.sent.wait)


async def test_a_key_set_that_trickles_in_past_the_clients_cache_leaves_the_last_one_serving(
    clock: _Clock,
) -> None:
    """The client's cached set has expired when the provider starts sending its key set a
    byte at a time: once they have waited twice the client's timeout, the requests are
    verified with the last key set fetched, each as its own user, instead of 503."""
    async with trickling_past_the_cache(clock, client_timeout=0.5) as (server, app):
        with anyio.fail_after(10):
            assert await users_at_once(app, 10) == each_as_itself(10)
        assert server.fetches == 2


# -- the key set's handling, one protective line at a time ------------------------------


def test_one_resolver_serves_event_loops_of_both_libraries_in_turn(
    provider: tuple[KeySetServer, str],
) -> None:
    """One resolver, asked from an asyncio event loop, then from a trio one, then from
    asyncio again (an anyio limiter belongs to one async library): each request waits
    for its key in a worker thread and passes as its own user."""
    server, url = provider
    app = protected(url)
    for n, backend in enumerate(("asyncio", "trio", "asyncio")):
        user = f"{backend}-{n}"
        response = anyio.run(ask, app, user, backend=backend)
        assert (response.status_code, response.json()["user"]) == (200, user)
    assert server.fetches == 1


async def test_a_key_the_provider_no_longer_has_never_serves_from_a_client_without_a_cache(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """``cache_jwk_set=False``: k1 was found, then the provider rotated to k2 alone and a
    token naming k1 was refused for it (the set fetched lacked k1). In the outage that
    follows, k1 is 503, never verified with the key found before the provider removed it."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5, cache_jwk_set=False)
    app = stale_protected(url, client)
    assert (await ask(app, "warm-up")).status_code == 200
    server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
    removed = await ask(app, "removed")
    assert removed.status_code == 401, removed.text
    assert "not trusted" in removed.json()["detail"]
    assert server.fetches == 3  # without a cache, a kid not found is fetched for twice
    server.mode = "error"
    assert_unavailable(await ask(app, "removed"))
    assert server.fetches == 4


async def test_requests_during_a_stuck_fetch_are_answered_at_once_after_the_first_wait(
    clock: _Clock,
) -> None:
    """The client's cache has expired and the provider trickles its key set in. The first
    requests wait twice the client's timeout for it, then pass with the last key set
    fetched; the fetch goes on. Requests arriving after that wait neither for that fetch
    nor for a worker thread held by one: they pass at once, each as its own user."""
    async with trickling_past_the_cache(clock, client_timeout=1) as (server, app):
        with anyio.fail_after(10):
            assert await users_at_once(app, 6) == each_as_itself(6)
        with anyio.fail_after(1):  # well within the two seconds the first ones waited
            assert await users_at_once(app, 6) == each_as_itself(6)
        assert server.fetches == 2


async def test_a_slow_identity_provider_holds_a_few_worker_threads_not_one_per_request() -> None:
    """60 requests wait for the key set from a provider slow to answer: the resolver's own
    limiter lets a few of them hold a worker thread, not one each (nor anyio's default 40)."""
    async with sixty_waiting_for_a_slow_provider() as before:
        held = threading.active_count() - before
    assert held <= 8, held  # the resolver's 4, and what the event loop starts for itself


async def test_once_a_stuck_fetch_ends_a_key_the_set_lacks_is_401_not_503(
    clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests gave up on a fetch that trickled in (503, and a pause before the provider
    is asked again). Once that fetch ends, the key set works again: a token whose key the
    set lacks is the token's fault again (401), not 503 until the pause would have ended,
    while the keys the set holds pass."""
    server = TricklingKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=0.5)
        app = stale_protected(url, client)
        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            try:
                with anyio.fail_after(10):
                    assert_unavailable(await ask(app, "early"))
            finally:
                server.release.set()

            async def works_again() -> bool:
                return any("works again" in m for m in key_set_warnings(caplog))

            await _eventually(works_again, "the fetch that trickled in to end")
        unknown = await ask(app, kid="k9")
        assert unknown.status_code == 401, unknown.text
        assert "not trusted" in unknown.json()["detail"]
        known = await ask(app, "after")
    assert (known.status_code, known.json()["user"]) == (200, "after")
    assert server.fetches == 1


async def test_the_warning_of_an_outage_served_by_no_key_says_none_served(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A first outage is served by the last key set fetched, and its end says so. A second
    outage begins past ``stale_keys_for``: no key serves in it, and its end says nothing of
    keys served meanwhile."""
    server, url = provider
    app = stale_protected(url)
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        assert (await ask(app, "warm-up")).status_code == 200
        server.mode = "error"
        clock.now += LIFESPAN + 1
        assert (await ask(app, "during")).status_code == 200
        server.mode = "ok"
        clock.now += 5.01
        assert (await ask(app, "back")).status_code == 200
        server.mode = "error"
        clock.now += STALE_KEYS_FOR + 1
        assert_unavailable(await ask(app, "too-late"))
        server.mode = "ok"
        clock.now += 5.01
        again = await ask(app, "back-again")
    assert (again.status_code, again.json()["user"]) == (200, "back-again")
    warnings = key_set_warnings(caplog)
    assert len(warnings) == 4, warnings
    assert "serves meanwhile" in warnings[0]
    assert "served meanwhile" in warnings[1]
    assert "serves no more" in warnings[2]
    assert warnings[3].endswith("works again"), warnings[3]


async def test_a_key_set_another_resolver_fetched_serves_for_stale_keys_for_from_its_fetch(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """Two resolvers share one client; the second fetched the set holding k2, which the
    first never saw. In an outage that begins past ``stale_keys_for`` after that fetch, the
    first does not serve k2: the bound counts from when the set was fetched, not from when
    a resolver first looked at it."""
    server, first = await _rotated_by_another_resolver(provider, clock)
    server.mode = "error"
    clock.now += STALE_KEYS_FOR + 1
    assert_unavailable(await ask(first, "late", kid="k2", key=ROTATED_KEY))
    assert_unavailable(await ask(first, "removed"))
    assert server.fetches == 3


async def test_a_client_without_a_cache_serves_the_key_found_last_counted_from_that_find(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """``cache_jwk_set=False``: k1 was found, then the provider rotated to k2 alone and k2
    was found, near the end of ``stale_keys_for`` after the first find. In the outage that
    follows, k2 serves (its find is recent), and k1, found before it, is 503."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5, cache_jwk_set=False)
    app = stale_protected(url, client)
    assert (await ask(app, "warm-up")).status_code == 200
    server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
    clock.now += STALE_KEYS_FOR - 10
    assert (await ask(app, "rotated", kid="k2", key=ROTATED_KEY)).status_code == 200
    server.mode = "error"
    clock.now += 20
    ok = await ask(app, "during", kid="k2", key=ROTATED_KEY)
    assert (ok.status_code, ok.json()["user"]) == (200, "during")
    assert_unavailable(await ask(app, "removed"))
    assert server.fetches == 3


class _SlowToTell(jwt.PyJWKClientError):
    """A key set that is no use, whose words take a while to tell each time: until someone
    asks the client again, a second at most."""

    def __init__(self, asked: threading.Event) -> None:
        super().__init__("The JWKS endpoint did not contain any signing keys")
        self.asked = asked

    def __str__(self) -> str:
        self.asked.wait(1)
        return super().__str__()


class _UselessOnce(jwt.PyJWKClient):
    """A client whose first answer is a key set of no use; the later ones ask the provider."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=5)
        self.asked = threading.Event()
        self.calls = 0

    def get_signing_key(self, kid: str) -> jwt.PyJWK:
        self.calls += 1
        if self.calls == 1:
            raise _SlowToTell(self.asked)
        self.asked.set()
        return super().get_signing_key(kid)


async def test_a_request_queued_behind_a_fetch_that_failed_keeps_to_its_pause(
    provider: tuple[KeySetServer, str],
) -> None:
    """Two requests at once: one asks the client, whose key set is of no use; the other,
    queued behind that, is 503 in the pause that failure starts, without asking the client
    again, however long the failure takes to make sense of once the first is done asking."""
    server, url = provider
    client = _UselessOnce(url)
    app = stale_protected(url, client)
    answers = await users_at_once(app, 2)
    assert [status for status, _ in answers.values()] == [503, 503], answers
    assert client.calls == 1
    assert server.fetches == 0


async def test_in_its_pause_a_resolver_serves_the_key_set_another_fetched_since(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """Two resolvers share one client. The first's fetch failed, past the client's cache,
    and it is in its pause; meanwhile the provider came back having rotated k1 out for k2,
    which the second fetched. In that pause the first serves what the client holds now: k2
    passes, and k1, which the provider removed, is 503, not verified with the set before."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5)
    first, second = stale_protected(url, client), stale_protected(url, client)
    assert (await ask(first, "warm-up")).status_code == 200
    server.mode = "error"
    clock.now += LIFESPAN + 1
    assert (await ask(first, "during")).status_code == 200
    server.serve_keys(public_jwk(ROTATED_KEY, "k2"))
    server.mode = "ok"
    assert (await ask(second, "second", kid="k2", key=ROTATED_KEY)).status_code == 200
    rotated = await ask(first, "rotated", kid="k2", key=ROTATED_KEY)
    assert (rotated.status_code, rotated.json()["user"]) == (200, "rotated")
    removed = await ask(first, "removed")
    assert removed.status_code == 503, removed.text
    assert server.fetches == 3


async def test_the_last_key_set_fetched_serves_up_to_stale_keys_for_itself(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``stale_keys_for`` seconds to the tick after the last fetch, the set still serves,
    and the outage's warning says so; the next request in that pause, a moment later, is
    503."""
    server, url = provider
    app = stale_protected(url, stale_keys_for=600)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    clock.now += 600
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        ok = await ask(app, "at-the-bound")
    assert (ok.status_code, ok.json()["user"]) == (200, "at-the-bound")
    [warning] = key_set_warnings(caplog)
    assert "serves meanwhile, for 0 s more at most" in warning, warning
    clock.now += 0.01
    late = await ask(app, "past-it")
    assert late.status_code == 503, late.text
    assert server.fetches == 2


async def test_requests_that_give_up_on_a_stuck_fetch_never_wait_for_it_in_the_event_loop(
    clock: _Clock,
) -> None:
    """No key set was fetched yet and the provider trickles it in: the requests give up
    after twice the client's timeout (2 s) and are 503, and meanwhile the event loop
    keeps running: none of them waits for the fetch, or the lock it holds, in the loop."""
    server = TricklingKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=1)
        app = stale_protected(url, client)
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await anyio.sleep(0.05)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                with anyio.fail_after(10):
                    answers = await users_at_once(app, 3)
                tg.cancel_scope.cancel()
        finally:
            server.release.set()
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(server.sent.wait)
    assert answers == {f"user-{n}": (503, None) for n in range(3)}
    assert max(gaps) < 1, max(gaps)
    assert server.fetches == 1


async def test_a_client_that_caches_no_key_set_says_when_the_provider_works_again(
    provider: tuple[KeySetServer, str], clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """``cache_jwk_set=False``: every lookup fetches, and a fetch that works is the provider
    answering, whatever no cache can say. Each outage is warned of once and its end once:
    before, the end of the first was never told, and the second outage was never warned of."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5, cache_jwk_set=False)
    app = stale_protected(url, client)
    with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
        assert (await ask(app, "warm-up")).status_code == 200
        for n in range(2):
            server.mode = "error"
            assert_unavailable(await ask(app, kid="k2", key=ROTATED_KEY))
            clock.now += 5.01
            server.mode = "ok"
            back = await ask(app, f"back-{n}")
            assert (back.status_code, back.json()["user"]) == (200, f"back-{n}")
    warnings = key_set_warnings(caplog)
    assert [("could not be fetched" in w, w.endswith("works again")) for w in warnings] == [
        (True, False),
        (False, True),
    ] * 2, warnings


async def test_a_client_whose_timeout_is_infinite_still_serves_the_key_set_it_holds(
    provider: tuple[KeySetServer, str],
) -> None:
    """A ``PyJWKClient`` whose timeout is infinite (set so once it had fetched): tokens are
    verified with the key set it holds, each request waiting for its key as long as with
    PyJWT's default timeout at most, not for ever (which no lock takes: each was a 500)."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5)
    app = stale_protected(url, client)
    assert (await ask(app, "warm-up")).status_code == 200
    client.timeout = math.inf
    ok = await ask(app, "after")
    assert (ok.status_code, ok.json()["user"]) == (200, "after")
    assert server.fetches == 1


async def test_requests_wait_twice_the_clients_timeout_for_a_key_set_that_trickles_in(
    clock: _Clock,
) -> None:
    """The provider sends its key set a byte at a time, each well within the client's
    timeout (1 s): the requests give up, 503, once twice that timeout has passed, not
    sooner (a provider that connects, then answers, each within the timeout, is waited
    for) nor much later (every request waits that long)."""
    server = TricklingKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", timeout=1)
        app = stale_protected(url, client)
        try:
            started = time.monotonic()
            with anyio.fail_after(10):
                answers = await users_at_once(app, 3)
            waited = time.monotonic() - started
        finally:
            server.release.set()
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(server.sent.wait)
    assert answers == {f"user-{n}": (503, None) for n in range(3)}
    assert 1.9 < waited < 3, waited


async def test_stale_keys_for_0_serves_no_key_a_client_without_a_cache_found(
    provider: tuple[KeySetServer, str], clock: _Clock
) -> None:
    """``stale_keys_for=0`` with ``cache_jwk_set=False``: the key found last never serves
    in an outage, not even one found at the same tick of the clock."""
    server, url = provider
    client = jwt.PyJWKClient(url, timeout=5, cache_jwk_set=False)
    app = stale_protected(url, client, stale_keys_for=0)
    assert (await ask(app, "warm-up")).status_code == 200
    server.mode = "error"
    assert_unavailable(await ask(app))
    assert server.fetches == 2


async def test_event_loops_on_two_threads_at_once_each_have_their_own_worker_threads(
    anyio_backend: str,
) -> None:
    """One resolver serves two event loops running at once, each on its own thread (a
    server with a loop per thread). The requests of the first hold every worker thread the
    resolver lets that loop have, waiting for a slow provider; a request of the second
    still gets one of its own, and passes as soon as the key set arrives. An anyio limiter
    belongs to one event loop: shared, the second loop's request waited for a thread of
    the first, which could not wake it (until its own wait ran out)."""
    server = GatedKeySetServer()
    with serve("uvicorn", server) as url:
        app = protected(f"{url}/.well-known/jwks.json")
        other_waits = threading.Event()
        answers: list[httpx.Response] = []

        async def on_the_other_loop() -> httpx.Response:
            async def tell_when_waiting() -> None:
                await anyio.wait_all_tasks_blocked()
                other_waits.set()

            with anyio.fail_after(3):  # the key set arrives once it waits; it waits 10 s at most
                async with anyio.create_task_group() as tg:
                    tg.start_soon(tell_when_waiting)
                    return await ask(app, "other-loop")

        async def one(n: int) -> None:
            answers.append(await ask(app, f"user-{n}"))

        other = functools.partial(anyio.run, on_the_other_loop, backend=anyio_backend)
        async with anyio.create_task_group() as tg:
            for n in range(8):  # more than the resolver lets one loop have threads
                tg.start_soon(one, n)
            try:
                assert await anyio.to_thread.run_sync(server.asked.wait, 5)
                await anyio.wait_all_tasks_blocked()
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as both:

                        async def run_other() -> None:
                            answers.append(await anyio.to_thread.run_sync(other))

                        both.start_soon(run_other)
                        assert await anyio.to_thread.run_sync(other_waits.wait, 5)
                        server.gate.set()
            finally:
                server.gate.set()
    users = sorted(r.json()["user"] for r in answers)
    assert users == sorted(["other-loop", *(f"user-{n}" for n in range(8))])
    assert server.fetches == 1


async def test_a_client_without_a_timeout_is_waited_for_as_with_pyjwts_default() -> None:
    """``PyJWKClient`` with ``timeout=None`` would wait for ever; a request waits for its
    key as with PyJWT's default timeout (30 s), twice that at most, not for ever and not
    for less: a provider that answers after 2.5 s is waited for."""
    server = GatedKeySetServer()
    with serve("uvicorn", server) as url:
        client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json")
        client.timeout = None  # type: ignore[assignment]
        app = stale_protected(url, client)

        async def answer_late() -> None:
            await anyio.sleep(2.5)
            server.gate.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_late)
                with anyio.fail_after(10):
                    ok = await ask(app, "patient")
        finally:
            server.gate.set()
    assert (ok.status_code, ok.json()["user"]) == (200, "patient")
    assert server.fetches == 1
