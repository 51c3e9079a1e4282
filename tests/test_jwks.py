"""jwt_bearer with a ``PyJWKClient``: the identity provider's key set fetched over HTTP from a
real server on loopback, while it works, fails, answers garbage, goes away and comes back.

A token the key set does not know is the token's fault (401); a key set that cannot be had
is the server's (503 with Retry-After), and never tells a client its good token is bad.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from packaging.requirements import Requirement

from ambient import Registry
from ambient.errors import IdentityUnavailableError
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import jwt_bearer
from tests.servers import serve
from tests.test_identity import AUDIENCE, ISSUER, PRIVATE_KEY, SECRET, _echo_app, token
from tests.test_middleware import drive, ws_scope
from tests.test_psycopg import _eventually

USERS = 30


class KeySetServer:
    """An identity provider's JWKS endpoint whose answer the test chooses."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fetches = 0
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE_KEY.public_key()))
        jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
        self.document = json.dumps({"keys": [jwk]}).encode()
        self.odd_key = json.dumps({"keys": [{**jwk, "alg": ["RS256"]}]}).encode()

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
    app: AmbientMiddleware, user: str = "alice", kid: str | None = "k1"
) -> httpx.Response:
    bearer = token({"sub": user}, key=PRIVATE_KEY, alg="RS256", **({"kid": kid} if kid else {}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get("/", headers={"authorization": f"Bearer {bearer}"})


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
    for kid in ("k9", None):
        response = await ask(app, kid=kid)
        assert response.status_code == 401, response.text
        assert response.json()["type"] == "urn:ambient:problem:identity"
        assert "not trusted" in response.json()["detail"]


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

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await anyio.to_thread.run_sync(self.gate.wait, abandon_on_cancel=True)
        await super().__call__(scope, receive, send)


async def test_a_slow_identity_provider_leaves_the_applications_threads_free() -> None:
    """60 requests wait for the key set while the provider is slow to answer. The
    application's own worker threads (anyio's default limiter, which Starlette's sync
    endpoints and file responses use too) stay free for it; once the key set arrives,
    one fetch serves every request."""
    server = GatedKeySetServer()
    answers: list[httpx.Response] = []
    with serve("uvicorn", server) as url:
        app = protected(f"{url}/.well-known/jwks.json")

        async def one(n: int) -> None:
            answers.append(await ask(app, f"user-{n}"))

        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(one, n)
            try:
                await anyio.wait_all_tasks_blocked()
                with anyio.fail_after(5):
                    assert await anyio.to_thread.run_sync(lambda: "free") == "free"
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
    """``time.monotonic`` for the key set's pause, moved by the test instead of waited out."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("ambient.middleware.identity._monotonic", fake)
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
