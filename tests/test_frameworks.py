"""The middleware in every framework and on every server: 50 concurrent users, isolated.

Each example app under ``tests/frameworks/`` shows the middleware in its framework's idiom.
One suite drives them all over real sockets: 50 distinct identities (25 user ids in two
tenants, so equal user ids of different tenants must not meet), several requests each, all
in flight together. Every response is checked: its context, its REQUEST component, its
USER component and what a worker thread saw; afterwards every REQUEST component was
cleaned exactly once, and at shutdown every USER component too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

import ambient
from ambient import Registry
from tests.servers import granian_available, reset_on_close, serve, websocket_upgrade

USERS = 50
PER_USER = 2
GATE = 25

FRAMEWORKS = ("starlette", "fastapi", "litestar", "quart", "django")
# asgiref (Django) and Quart run on asyncio only; Starlette, FastAPI and Litestar on trio too.
ON_TRIO = ("starlette", "fastapi")
# The servers run the apps on loops of their own (hypercorn-trio's on trio), in a thread or
# in granian's process: the client's loop is not what these suites check, and one is enough.
ONE_CLIENT_LOOP = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def identities() -> list[tuple[str, str]]:
    return [(f"tenant-{n % 2}", f"user-{n // 2}") for n in range(USERS)]


# Who asks the app (in whatever process) what happened in it.
AUDITOR = {"x-user-id": "auditor"}


def build(framework: str) -> tuple[Any, Any, Any]:
    module = importlib.import_module(f"tests.frameworks.{framework}_app")
    return module.build()  # type: ignore[no-any-return]


async def drive(
    url: str, path: str = "/whoami", *, gated: bool = True, http2: bool = False
) -> list[dict[str, Any]]:
    """Send PER_USER requests for each of the USERS identities at once; check every answer.

    With ``http2`` every request is a stream of one HTTP/2 connection (prior knowledge, no
    TLS): all identities multiplexed together, as a gateway forwards its users' requests.
    """
    gate = uuid.uuid4().hex
    answers: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=1 if http2 else USERS * PER_USER)

    async def one(client: httpx.AsyncClient, tenant: str, user: str, n: int) -> None:
        request_id = f"{tenant}.{user}.{n}"
        params = {"gate": gate, "size": str(GATE)} if gated else {}
        response = await client.get(
            path,
            params=params,
            headers={"x-user-id": user, "x-tenant-id": tenant, "x-request-id": request_id},
        )
        assert response.status_code == 200, response.text
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert response.headers["x-request-id"] == request_id
        body = response.json()
        assert (body["user"], body["tenant"]) == (user, tenant)
        assert body["request_id"] == request_id
        assert (body["probe_user"], body["probe_tenant"]) == (user, tenant)
        assert body["probe_request"] == request_id
        assert (body["memory_user"], body["memory_tenant"]) == (user, tenant)
        assert body["thread_user"] == user
        assert body["thread_probe"] == body["probe"]
        if gated:
            assert body["overlapped"] is True
        answers.append(body)

    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30, http1=not http2, http2=http2
    ) as client:
        before = (await client.get("/stats", headers=AUDITOR)).json()
        async with anyio.create_task_group() as tg:
            for tenant, user in identities():
                for n in range(PER_USER):
                    tg.start_soon(one, client, tenant, user, n)
        stats = (await client.get("/stats", headers=AUDITOR)).json()

    assert len(answers) == USERS * PER_USER
    probes = [body["probe"] for body in answers]
    assert len(set(probes)) == len(probes), "a REQUEST component served two requests"
    memories: dict[tuple[str, str], set[int]] = defaultdict(set)
    for body in answers:
        memories[body["tenant"], body["user"]].add(body["memory"])
    assert all(len(numbers) == 1 for numbers in memories.values()), memories
    owners = [next(iter(numbers)) for numbers in memories.values()]
    assert len(set(owners)) == USERS, "two identities shared a USER component"
    assert stats["problems"] == []
    assert stats["open_scopes"] == 1  # the /stats request itself
    assert stats["probes"] == before["probes"] + len(probes)  # and no stray one
    return answers


# Frameworks with websockets (Django's ASGI handler serves HTTP only).
WEBSOCKETS = ("starlette", "fastapi", "litestar", "quart")
SOCKETS = 20


async def sockets(url: str, *, echoed: bool = True) -> None:
    """Open SOCKETS websockets for as many identities at once, each held at a gate until
    all are in their handlers: each one's message names its own user, tenant, request,
    REQUEST and USER components and a connection of its own; afterwards every socket's
    REQUEST component was cleaned exactly once. ``echoed``: the server sends the headers
    of the app's accept (granian sends none), so the request id is echoed there."""
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    gate = uuid.uuid4().hex
    target = f"ws{url[4:]}/whoami-socket?gate={gate}&size={SOCKETS}"

    def one(tenant: str, user: str) -> dict[str, Any]:
        request_id = f"{tenant}.{user}.socket"
        headers = {"x-user-id": user, "x-tenant-id": tenant, "x-request-id": request_id}
        with connect(target, additional_headers=headers, open_timeout=30) as client:
            assert client.response is not None
            assert not echoed or client.response.headers["x-request-id"] == request_id
            body: dict[str, Any] = json.loads(client.recv(timeout=30))
            # The handler closes it: a close of the client's own at the same moment makes
            # hypercorn's trio server fail its connection (two tasks writing to it).
            with pytest.raises(ConnectionClosedOK):
                client.recv(timeout=30)
        assert (body["user"], body["tenant"], body["request_id"]) == (user, tenant, request_id)
        assert (body["probe_user"], body["probe_tenant"]) == (user, tenant)
        assert body["probe_request"] == request_id
        assert (body["memory_user"], body["memory_tenant"]) == (user, tenant)
        assert body["overlapped"] is True
        return body

    answers: list[dict[str, Any]] = []

    async def run(tenant: str, user: str) -> None:
        answers.append(await anyio.to_thread.run_sync(one, tenant, user))

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        before = (await client.get("/stats", headers=AUDITOR)).json()
        async with anyio.create_task_group() as tg:
            for tenant, user in identities()[:SOCKETS]:
                tg.start_soon(run, tenant, user)
        stats = (await client.get("/stats", headers=AUDITOR)).json()
    assert len({body["probe"] for body in answers}) == SOCKETS
    assert len({body["connection_id"] for body in answers} - {None}) == SOCKETS
    assert stats["problems"] == []
    assert stats["open_scopes"] == 1  # the /stats request itself
    assert stats["probes"] == before["probes"] + SOCKETS


async def refusals(url: str) -> None:
    """A PoolExhaustedError from a view is 503 problem+json with Retry-After; a request
    without identity is 401 with the resolver's challenge, and one whose user id no context
    takes is 400, before any view runs."""
    async with httpx.AsyncClient(base_url=url) as client:
        busy = await client.get("/busy", headers={"x-user-id": "alice", "x-request-id": "busy.1"})
        anonymous = await client.get("/whoami")
        invalid = await client.get(
            "/whoami", headers={"x-user-id": "u" * 300, "x-request-id": "invalid.1"}
        )
    assert busy.status_code == 503, busy.text
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.headers["retry-after"] == "2"
    assert busy.headers["x-request-id"] == "busy.1"
    assert busy.json()["type"] == "urn:ambient:problem:pool-exhausted"
    assert anonymous.status_code == 401
    assert anonymous.headers.get_list("www-authenticate") == ["Bearer"]
    assert anonymous.json()["type"] == "urn:ambient:problem:unauthenticated"
    assert invalid.status_code == 400, invalid.text
    assert invalid.headers["content-type"] == "application/problem+json"
    assert invalid.headers["x-request-id"] == "invalid.1"
    assert "www-authenticate" not in invalid.headers
    assert invalid.json() == {
        "type": "urn:ambient:problem:invalid-context",
        "title": "Invalid request context",
        "status": 400,
        "detail": "user_id is invalid: is 300 characters long; the limit is 256",
    }


@ONE_CLIENT_LOOP
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_fifty_users_through_uvicorn(framework: str) -> None:
    """Identity, context in handlers and threads, components isolated and cleaned; ambient
    errors answered as problem+json in the framework's own error handling."""
    app, registry, ledger = build(framework)
    with serve("uvicorn", app) as url:
        await drive(url)
        await drive(url, "/sync", gated=False)
        await refusals(url)
        if framework in WEBSOCKETS:
            await sockets(url)
    # Shutdown (lifespan, or Litestar's on_shutdown) closed the USER components too.
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0
    assert registry.stats().live_users == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_401_a_view_raises_carries_the_challenge_and_rolls_back(framework: str) -> None:
    """A view begins its Work, then raises IdentityError(401) (a token revoked since it was
    issued), which the framework's own exception handler answers with ``answer_error``:
    a problem+json 401 with the resolver's ``WWW-Authenticate`` challenge and the request
    id, and the Work rolls back. Litestar's, Quart's and Django's handlers answered it
    without a challenge (RFC 9110 requires one on a 401), and the request's scope closed
    as a success: its Work committed the work of a refused request."""
    app, registry, ledger = build(framework)
    with serve("uvicorn", app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get(
                "/refused", headers={"x-user-id": "alice", "x-request-id": "refused.1"}
            )
        outcome = await anyio.to_thread.run_sync(
            ledger.wait_for_work, "refused.1", ("commit", "rollback")
        )
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers.get_list("www-authenticate") == ["Bearer"]
    assert response.headers["x-request-id"] == "refused.1"
    body = response.json()
    assert body["type"] == "urn:ambient:problem:identity"
    assert (body["status"], body["detail"]) == (401, "the token was revoked since it was issued")
    assert outcome == "rollback"
    assert registry.stats().open_scopes == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_an_error_from_a_task_group_is_answered_as_its_first(framework: str) -> None:
    """A view's task group fails with a PoolExhaustedError: the exception group that holds
    it is answered 503 with Retry-After, as the error alone is, and the Work rolls back.
    Litestar and Quart look their exception handlers up by the exception's class: with
    the handler registered for ``AmbientError`` alone, as docs/frameworks.md showed it,
    the group was their plain 500."""
    app, registry, ledger = build(framework)
    with serve("uvicorn", app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get(
                "/grouped", headers={"x-user-id": "alice", "x-request-id": "grouped.1"}
            )
        outcome = await anyio.to_thread.run_sync(
            ledger.wait_for_work, "grouped.1", ("commit", "rollback")
        )
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-request-id"] == "grouped.1"
    assert response.json()["type"] == "urn:ambient:problem:pool-exhausted"
    assert outcome == "rollback"
    assert registry.stats().open_scopes == 0


def talk_on_socket(url: str) -> int | None:
    """Open the websocket at ``url``, read its first message and wait for its close; the
    close code, or the HTTP status its handshake was refused with."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    headers = {"x-user-id": "alice", "x-request-id": "socket.1"}
    try:
        with connect(url, additional_headers=headers) as client:
            assert client.recv(timeout=30) == "begun"
            with contextlib.suppress(ConnectionClosed):
                client.recv(timeout=30)  # until the server closes it
            return client.protocol.close_rcvd.code if client.protocol.close_rcvd else None
    except InvalidStatus as refused:
        return refused.response.status_code


def hang_up_on_socket(url: str) -> None:
    """Open the websocket at ``url``, read its first message and hang up (a close of the
    client's own) while its handler still waits for a message."""
    from websockets.sync.client import connect

    headers = {"x-user-id": "alice", "x-request-id": "socket.1"}
    with connect(url, additional_headers=headers) as client:
        assert client.recv(timeout=30) == "begun"


async def socket_outcome(framework: str, fail: str, accept: bool) -> tuple[int | None, str]:
    """Serve the framework's ``/socket`` on uvicorn, failing as asked (``wait``: the
    client hangs up while the handler waits); how the socket ended for the client, and
    how its Work ended. Its components were cleaned exactly once."""
    app, registry, ledger = build(framework)
    with serve("uvicorn", app) as url:
        target = f"ws{url[4:]}/socket?fail={fail}&accept={str(accept).lower()}"
        if fail == "wait":
            closed = await anyio.to_thread.run_sync(hang_up_on_socket, target)
        else:
            closed = await anyio.to_thread.run_sync(talk_on_socket, target)
        ended = await anyio.to_thread.run_sync(
            ledger.wait_for_work, "socket.1", ("commit", "rollback")
        )
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0
    return closed, ended


@pytest.mark.parametrize(
    ("fail", "accept", "closed", "outcome"),
    [
        ("", True, 1000, "commit"),
        ("wait", True, None, "commit"),
        ("busy", True, 4500, "rollback"),
        ("bug", True, 4500, "rollback"),
        ("busy", False, 403, "rollback"),
    ],
)
async def test_a_litestar_websocket_that_fails_rolls_back(
    fail: str, accept: bool, closed: int, outcome: str
) -> None:
    """Litestar answers a websocket handler's exception itself: it closes the socket with
    4000 plus the status (4500) and returns, never calling the exception handlers. The
    socket's Work must roll back; it committed, the middleware taking the close for a
    clean end. A socket the handler closes itself ends cleanly, as does one whose client
    hangs up while the handler waits for a message (a websocket's client may end it)."""
    assert await socket_outcome("litestar", fail, accept) == (closed, outcome)


@pytest.mark.parametrize(
    ("fail", "accept", "closed", "outcome"),
    [
        ("", True, 1000, "commit"),
        ("wait", True, None, "commit"),
        ("busy", True, 1000, "rollback"),
        ("bug", True, 1000, "rollback"),
        ("busy", False, 503, "rollback"),
        ("bug", False, 500, "rollback"),
    ],
)
async def test_a_quart_websocket_that_fails_rolls_back(
    fail: str, accept: bool, closed: int, outcome: str
) -> None:
    """Quart answers a websocket handler's exception with its error handlers: an ambient
    error through ``answer_error`` (noted on the scope), a bug before accept with a 500
    denial of the handshake. The 500 denial's Work committed: the middleware looked at
    a websocket's denial status no more than at its close code. A bug after accept is
    closed with 1000, as a clean end: nothing on the wire tells it apart, so the app
    notes it with ``note_failure`` from Quart's ``got_websocket_exception`` signal. A
    client that hangs up while the handler waits (Quart cancels it) ends it cleanly."""
    assert await socket_outcome("quart", fail, accept) == (closed, outcome)


@ONE_CLIENT_LOOP
@pytest.mark.parametrize(
    ("server", "framework"),
    [
        ("hypercorn", "starlette"),
        ("hypercorn", "litestar"),
        ("hypercorn", "quart"),
        ("hypercorn", "django"),
        ("hypercorn-trio", "starlette"),
        ("hypercorn-trio", "fastapi"),
    ],
)
async def test_the_same_suite_under_hypercorn(server: str, framework: str) -> None:
    """hypercorn on asyncio and on trio (the app itself then runs on trio)."""
    assert server != "hypercorn-trio" or framework in ON_TRIO
    app, registry, ledger = build(framework)
    with serve(server, app) as url:
        await drive(url)
        await drive(url, "/sync", gated=False)
        await refusals(url)
        if framework in WEBSOCKETS:
            await sockets(url)
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0


@ONE_CLIENT_LOOP
@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_the_same_suite_under_granian(framework: str) -> None:
    """granian runs the app in its own process: everything is checked over HTTP."""
    with serve("granian", None, target=f"tests.frameworks.{framework}_app:app") as url:
        await drive(url)
        await drive(url, "/sync", gated=False)
        await refusals(url)
        if framework in WEBSOCKETS:
            await sockets(url, echoed=False)


@ONE_CLIENT_LOOP
@pytest.mark.parametrize(
    ("server", "framework"),
    [
        ("hypercorn", "starlette"),
        ("hypercorn", "django"),
        ("hypercorn-trio", "fastapi"),
    ],
)
async def test_every_user_multiplexed_on_one_http2_connection(server: str, framework: str) -> None:
    """A gateway forwards many users' requests as streams of one HTTP/2 connection: each
    stream still gets its own context and components, and the connection's other streams
    never show through."""
    app, registry, ledger = build(framework)
    with serve(server, app) as url:
        await drive(url, http2=True)
        await drive(url, "/sync", gated=False, http2=True)
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0


@ONE_CLIENT_LOOP
@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
async def test_every_user_multiplexed_on_one_http2_connection_under_granian() -> None:
    with serve("granian", None, target="tests.frameworks.starlette_app:app", http="2") as url:
        await drive(url, http2=True)
        await drive(url, "/sync", gated=False, http2=True)


# Frameworks whose /work answer is streamed: the client hangs up after its first chunk, and
# the framework (below ASGI spec 2.4, as uvicorn and hypercorn speak it) cancels the stream.
# The others' views are cancelled before they answer.
STREAMED = ("starlette", "fastapi", "litestar")


@pytest.mark.parametrize(
    ("server", "framework"),
    [
        *(("uvicorn", framework) for framework in FRAMEWORKS),
        ("hypercorn", "starlette"),
        ("hypercorn", "litestar"),
        ("hypercorn", "quart"),
        ("hypercorn", "django"),
        ("hypercorn-trio", "fastapi"),
        ("hypercorn-trio", "litestar"),
    ],
)
async def test_a_request_whose_client_hangs_up_rolls_back(server: str, framework: str) -> None:
    """Half of 20 users hang up mid-request: the framework cancels the view or the stream
    and returns normally. Their Work (a transaction around a ``yield``) rolls back; the
    others' requests, answered whole, commit. Before, a request cut short closed its scope
    as a success, and its Work committed half a request."""
    app, registry, ledger = build(framework)
    outcomes = await hang_up_half(server, app, ledger, streamed=framework in STREAMED)
    assert sorted(outcomes) == [(False, "commit")] * 10 + [(True, "rollback")] * 10
    assert registry.stats().open_scopes == 0


@ONE_CLIENT_LOOP
@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
async def test_a_request_whose_client_hangs_up_rolls_back_under_granian() -> None:
    """The same under granian, which runs the app in its own process: each request's
    outcome, and the components' cleanups, are asked of the app over HTTP."""
    target = "tests.frameworks.starlette_app:app"
    outcomes = await hang_up_half("granian", None, None, streamed=True, target=target)
    assert sorted(outcomes) == [(False, "commit")] * 10 + [(True, "rollback")] * 10


def asked_over_http(url: str) -> Callable[[str, tuple[str, ...]], str]:
    """``Ledger.wait_for_work`` for an app in another process: its ``/outcome`` view waits
    (at most 30 s) in the app and answers the state of the request's Work."""

    def wait_for_work(request_id: str, states: tuple[str, ...]) -> str:
        answer = httpx.get(
            f"{url}/outcome",
            params={"request": request_id, "states": ",".join(states)},
            headers=AUDITOR,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return answer.text

    return wait_for_work


async def assert_settled(url: str) -> None:
    """Ask the app (in whatever process) whether every request's scope has closed and
    every Probe and Work been cleaned exactly once; its ``/stats``."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        stats = (await client.get("/stats", headers=AUDITOR)).json()
    assert stats["problems"] == []
    assert stats["open_scopes"] == 1  # the /stats request itself


async def hang_up_half(
    server: str, app: Any, ledger: Any, *, streamed: bool, target: str | None = None
) -> list[Any]:
    """Send 20 users' ``/work`` requests at once, every other one hanging up mid-request;
    return ``(hung up, how its Work ended)`` for each. Without a ``ledger`` (the app runs
    in another process, at ``target``) the app is asked over HTTP, and at the end whether
    every component was cleaned exactly once."""

    def one(port: int, n: int) -> tuple[bool, str]:
        hang = n % 2 == 0
        request_id = f"work.{n}"
        request = (
            f"GET /work{'?hang=1' if hang else ''} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"x-user-id: user-{n}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request.encode())
            if hang and not streamed:
                assert wait_for_work(request_id, ("begun",)) == "begun"
            elif hang:
                read_until(sock, lambda received: b"begun\n" in received)
            else:
                # The whole answer, not only "done": Quart's has a length, the others' end
                # with a chunked body's last chunk.
                ends = (b"\r\n\r\ndone", b"done\r\n0\r\n\r\n", b"done\n\r\n0\r\n\r\n")
                read_until(sock, lambda received: received.endswith(ends))
        # The socket is closed: a client that hung up, or one that read its whole answer.
        return hang, wait_for_work(request_id, ("commit", "rollback"))

    def read_until(sock: socket.socket, enough: Callable[[bytes], bool]) -> None:
        received = b""
        while not enough(received):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk

    outcomes: list[tuple[bool, str]] = []

    async def run(port: int, n: int) -> None:
        outcomes.append(await anyio.to_thread.run_sync(one, port, n))

    with serve(server, app, target=target) as url:
        port = int(url.rsplit(":", 1)[1])
        wait_for_work = asked_over_http(url) if ledger is None else ledger.wait_for_work
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(run, port, n)
        if ledger is None:
            await assert_settled(url)
    return outcomes


_NEEDS_GRANIAN = pytest.mark.skipif(not granian_available(), reason="granian is not installed")
# granian takes a websocket.send to a client that has left without raising.
_GRANIAN_SENDS_TO_NOBODY = pytest.mark.skip(
    reason="granian takes a websocket.send to a client that has left without raising (it "
    "reports ASGI spec 2.3), and tells of the client's leaving only when the app receives: "
    "nothing tells the app, or the middleware, that a handler that sends its result and "
    "returns lost its client"
)


@ONE_CLIENT_LOOP
@pytest.mark.parametrize(
    ("server", "then"),
    [
        ("uvicorn", "return"),  # uvicorn raises from the send
        pytest.param("granian", "read", marks=_NEEDS_GRANIAN),
        pytest.param("granian", "return", marks=[_NEEDS_GRANIAN, _GRANIAN_SENDS_TO_NOBODY]),
    ],
)
async def test_a_websocket_whose_client_hangs_up_mid_handler_rolls_back(
    server: str, then: str
) -> None:
    """20 users' websockets, each handler held at work once it told its client it began;
    every other client hangs up (a TCP reset) before the handler is let go. The handler
    then sends its result and returns, or (``then=read``) waits for the client's thanks:
    the sockets whose client left roll their Work back, the others, which read a result
    naming their own user, commit. The outcomes, and that every component was cleaned
    exactly once in its own socket's context, are asked of the app over HTTP, as of one
    granian runs in its own process."""
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    def one(url: str, n: int) -> tuple[bool, str]:
        hang, user, request_id = n % 2 == 0, f"user-{n}", f"socket.{n}"
        release = {"request": request_id}
        path = f"/work-socket?then={then}"
        if hang:
            upgrade = websocket_upgrade(path, n, {"x-user-id": user, "x-request-id": request_id})
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(upgrade)
                received = b""
                while b"\x81\x05begun" not in received:  # the handler's first message
                    chunk = sock.recv(4096)
                    assert chunk, received
                    received += chunk
                reset_on_close(sock)
            assert httpx.get(f"{url}/release", params=release, headers=AUDITOR).status_code == 200
        else:
            headers = {"x-user-id": user, "x-request-id": request_id}
            with connect(f"ws{url[4:]}{path}", additional_headers=headers) as client:
                assert client.recv(timeout=30) == "begun"
                released = httpx.get(f"{url}/release", params=release, headers=AUDITOR)
                assert released.status_code == 200
                assert client.recv(timeout=30) == f"done for {user}"
                if then == "read":
                    client.send("thanks")
                with pytest.raises(ConnectionClosedOK):  # the handler closes it
                    client.recv(timeout=30)
        return hang, asked_over_http(url)(request_id, ("commit", "rollback"))

    outcomes: list[tuple[bool, str]] = []

    async def run(url: str, n: int) -> None:
        outcomes.append(await anyio.to_thread.run_sync(one, url, n))

    app = build("starlette")[0] if server != "granian" else None
    with serve(server, app, target="tests.frameworks.starlette_app:app") as url:
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(run, url, n)
        await assert_settled(url)
    assert sorted(outcomes) == [(False, "commit")] * 10 + [(True, "rollback")] * 10


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "hypercorn-trio"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_a_stream_cut_short_behind_an_http_middleware_inside_rolls_back(
    server: str, framework: str
) -> None:
    """A ``BaseHTTPMiddleware`` (FastAPI's ``@app.middleware("http")``) added before
    install() runs inside AmbientMiddleware and re-sends the endpoint's stream: when the
    client hangs up, Starlette cancels the endpoint's stream and the outer copy still ends
    the response normally. The middleware took that for a whole answer, and the Work of
    a request cut short committed. The client's disconnect, received before the end of the
    response, now makes it incomplete."""
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from ambient.integrations.starlette import install
    from tests.frameworks import starlette_app
    from tests.frameworks.common import IDENTITY, build_registry

    registry, ledger = build_registry()
    app = FastAPI() if framework == "fastapi" else Starlette()
    app.router.routes.append(Route("/work", starlette_app.work))

    async def tag(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["x-served-for"] = ambient.get_current_context().user_id
        return response

    app.add_middleware(BaseHTTPMiddleware, dispatch=tag)
    install(app, registry=registry, identity=IDENTITY)
    outcomes = await hang_up_half(server, app, ledger, streamed=True)
    assert sorted(outcomes) == [(False, "commit")] * 10 + [(True, "rollback")] * 10
    assert ledger.problems(("probe", "memory")) == []
    assert registry.stats().open_scopes == 0


class _HeldView:
    """A sync view whose thread holds its request's connection while its client hangs up:
    it reads, waits to be let go, then writes. What the connection was used for, and when
    its cleanup came, end up in ``events``."""

    def __init__(self) -> None:
        import threading

        self.events: list[str] = []
        self.started, self.proceed, self.finished = (threading.Event() for _ in range(3))
        self.cleaned, self.disconnected = threading.Event(), threading.Event()
        events, cleaned = self.events, self.cleaned

        class Connection:
            def __init__(self) -> None:
                self.in_pool = False

            def execute(self, sql: str) -> None:
                events.append(f"{sql} {'after' if self.in_pool else 'before'} its cleanup")

        def connection() -> Iterator[Connection]:
            conn = Connection()
            try:
                yield conn
            finally:  # the request ended with an error: its client hung up
                conn.in_pool = True
                events.append("cleanup")
                cleaned.set()

        self.connection_key = Connection
        self.registry = Registry()
        self.registry.register(Connection, connection)

    def work(self) -> None:
        """The view's body, in its thread."""
        conn = ambient.resolve_sync(self.connection_key)
        conn.execute("SELECT")
        self.started.set()
        self.proceed.wait(30)
        conn.execute("UPDATE")
        self.finished.set()

    def watched(self, app: Any) -> Any:
        """``app`` behind ``AmbientMiddleware``, noting the client's disconnect."""
        from ambient.middleware import AmbientMiddleware, trusted_header

        inner = AmbientMiddleware(app, registry=self.registry, identity=trusted_header())

        async def watch(scope: Any, receive: Any, send: Any) -> None:
            async def noted() -> Any:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected.set()
                return message

            await inner(scope, noted, send)

        return watch

    async def hang_up_on(self, server_app: Any, target: str) -> None:
        """Serve ``server_app`` on uvicorn, ask for ``target`` and hang up while the view's
        thread works; its cleanup must come after the thread's last use, never before."""

        def hang_up(port: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                request = f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-user-id: alice\r\n\r\n"
                sock.sendall(request.encode())
                assert self.started.wait(30)
            assert self.disconnected.wait(30)
            # Bounded wait for what must not happen (a cleanup while the thread still works).
            assert not self.cleaned.wait(1.0), self.events
            self.proceed.set()
            assert self.finished.wait(30)
            assert self.cleaned.wait(30), (self.events, self.registry.stats())

        try:
            with serve("uvicorn", server_app) as url:
                await anyio.to_thread.run_sync(hang_up, int(url.rsplit(":", 1)[1]))
        finally:
            self.proceed.set()
        assert self.events == [
            "SELECT before its cleanup",
            "UPDATE before its cleanup",
            "cleanup",
        ]
        assert self.registry.stats().open_scopes == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Quart runs on asyncio only
async def test_a_quart_sync_view_keeps_its_components_until_its_thread_is_done() -> None:
    """Quart runs a sync view in a thread and, when the client hangs up, cancels the view's
    task and abandons the thread, which goes on. With the ``ensure_async`` override that
    docs/frameworks.md shows, the request's cleanup waits for the thread: without it, the
    view's connection went back to its pool while the thread still used it."""
    import functools
    import inspect
    from collections.abc import Coroutine

    from quart import Quart

    from ambient.integrations.threads import run_sync_in_thread

    class HeldQuart(Quart):  # as docs/frameworks.md shows it
        def ensure_async(  # type: ignore[override]
            self, func: Callable[..., Any]
        ) -> Callable[..., Coroutine[Any, Any, Any]]:
            if inspect.iscoroutinefunction(func):
                return func

            @functools.wraps(func)
            async def run(*args: Any, **kwargs: Any) -> Any:
                call = functools.partial(func, *args, **kwargs)
                return await run_sync_in_thread(call, abandon_on_cancel=True)

            return run

    held = _HeldView()
    app = HeldQuart(__name__)

    @app.get("/report")
    def report() -> str:
        held.work()
        return "ok"

    app.asgi_app = held.watched(app.asgi_app)  # type: ignore[method-assign]
    await held.hang_up_on(app, "/report")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Quart runs on asyncio only
@pytest.mark.parametrize("view", ["async", "sync"])
async def test_a_quart_sync_stream_keeps_its_components_until_its_thread_is_done(
    view: str,
) -> None:
    """Quart steps a sync generator streamed as a body in its executor, a thread per step,
    and when the client hangs up it cancels the view's task and abandons the step's thread,
    as it does a sync view's. With the ``response_class`` that docs/frameworks.md shows,
    the request's cleanup waits for the step: with the ``ensure_async`` override alone, the
    stream's connection went back to its pool while the step still used it."""
    from quart import Quart

    from tests.documented import documented_code

    namespace: dict[str, Any] = {"Quart": Quart, "__name__": __name__}
    exec(documented_code("docs/frameworks.md", "Sync views run in Quart's executor"), namespace)  # noqa: S102 - our own docs

    held = _HeldView()
    app = namespace["App"](__name__)

    def rows() -> Iterator[bytes]:
        yield b"report\n"
        held.work()
        yield b"done\n"

    if view == "async":

        @app.get("/report")
        async def report() -> Any:
            return rows()

    else:

        @app.get("/report")
        def report() -> Any:
            return rows()

    app.asgi_app = held.watched(app.asgi_app)  # type: ignore[method-assign]
    await held.hang_up_on(app, "/report")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asgiref runs on asyncio only
async def test_a_django_sync_view_keeps_its_components_until_its_thread_is_done() -> None:
    """Django runs a sync view in asgiref's thread and, when the client hangs up, cancels
    the view's task. asgiref then waits for the thread before the task ends (unlike
    Quart's executor, which abandons it), so with no override the request's cleanup still
    comes after the thread's last use of the view's connection, never before it."""
    from django.core.asgi import get_asgi_application
    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    from tests.frameworks import django_app

    held = _HeldView()

    def report(request: HttpRequest) -> HttpResponse:
        held.work()
        return HttpResponse("ok")

    route = path("held-report", report)
    django_app.urlpatterns.append(route)
    try:
        await held.hang_up_on(held.watched(get_asgi_application()), "/held-report")
    finally:
        django_app.urlpatterns.remove(route)


class _ExpiringView:
    """A streamed view (or a websocket) idle past its identity's expiry: what it did with
    its REQUEST component, and what was still going on when the middleware returned."""

    def __init__(self) -> None:
        import threading

        self.events: list[str] = []
        self.seen: list[BaseException | None] = []
        self.tasks: list[asyncio.Task[Any]] = []
        # At each return of the middleware: whether the view's task was done, the events.
        self.returned: list[tuple[bool, list[str]]] = []
        self.done = threading.Event()
        events, seen = self.events, self.seen

        class Tx:
            cleaned = False

        def tx(ctx: ambient.UserExecutionContext) -> Iterator[Tx]:
            held = Tx()
            events.append("resolved")
            try:
                yield held
            except Exception as exc:
                seen.append(exc)
                raise
            else:
                seen.append(None)
            finally:
                held.cleaned = True
                events.append("cleanup")

        self.key = Tx
        self.registry = Registry()
        self.registry.register(Tx, tx)

    async def idle(self) -> None:
        """The view's part once its first message went out: resolve, wait for an event
        that never comes; note when it stops, and whether its component was cleaned
        under it."""
        self.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        held = await ambient.resolve(self.key)
        try:
            await asyncio.Event().wait()
        finally:
            self.events.append("view stopped" + (" after its cleanup" if held.cleaned else ""))

    def watched(self, app: Any) -> Any:
        """``app`` behind ``AmbientMiddleware`` with an identity expiring half a second
        after the request came, noting what still ran when the middleware returned."""
        from ambient.middleware import AmbientMiddleware, Identity

        def expiring(scope: Any) -> Identity:
            return Identity("ann", expires_at=time.time() + 0.5)

        inner = AmbientMiddleware(app, registry=self.registry, identity=expiring)

        async def watch(scope: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)
            if scope["type"] in ("http", "websocket"):
                # Django 6 runs the view in the app's own task (this one, which the view
                # has left once the app returned); Django 5 in a task of its own.
                here = asyncio.current_task()
                done = bool(self.tasks) and all(t.done() or t is here for t in self.tasks)
                self.returned.append((done, list(self.events)))
                self.done.set()

        return watch

    async def stream_from(self, app: Any, target: str, caplog: pytest.LogCaptureFixture) -> None:
        """Stream ``target`` on uvicorn until the expiry ends it; the view must have
        stopped, told the client is gone, before the middleware returned, and its
        component be cleaned once, after that."""
        import gc

        with serve("uvicorn", self.watched(app)) as url:
            async with (
                httpx.AsyncClient(base_url=url, timeout=30) as client,
                client.stream("GET", target) as response,
            ):
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert await anyio.to_thread.run_sync(self.done.wait, 30)
        gc.collect()  # a task left with its error is reported as it is collected
        assert response.status_code == 200
        assert body == b"data: 0\n\n"
        assert self.returned == [(True, ["resolved", "view stopped", "cleanup"])]
        assert len(self.seen) == 1
        assert "cut off when its identity expired" in str(self.seen[0])
        assert "never retrieved" not in caplog.text
        assert "destroyed but it is pending" not in caplog.text


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asgiref runs on asyncio only
async def test_a_django_stream_idle_past_its_expiry_ends_its_view_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Django runs the view in a task of its own and cancels it when the client leaves.
    At the identity's expiry the middleware tells the app the client is gone, so the view
    ends before the request's components are cleaned. Cancelling the app (Django's wait
    for its task) left the view's task running after the middleware returned."""
    from django.core.asgi import get_asgi_application
    from django.http import HttpRequest, StreamingHttpResponse
    from django.urls import path

    from tests.frameworks import django_app

    view = _ExpiringView()

    async def events(request: HttpRequest) -> StreamingHttpResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: 0\n\n"
            await view.idle()
            yield b"data: 1\n\n"

        return StreamingHttpResponse(body(), content_type="text/event-stream")

    route = path("expiring-events", events)
    django_app.urlpatterns.append(route)
    try:
        await view.stream_from(get_asgi_application(), "/expiring-events", caplog)
    finally:
        django_app.urlpatterns.remove(route)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Quart runs on asyncio only
async def test_a_quart_stream_idle_past_its_expiry_ends_its_view_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Quart runs the view and the reading of the request in tasks of its own and cancels
    them when the client leaves: at the identity's expiry the middleware tells it the
    client is gone, so they end before the request's components are cleaned."""
    from quart import Quart

    view = _ExpiringView()
    app = Quart(__name__)

    @app.get("/events")
    async def events() -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: 0\n\n"
            await view.idle()
            yield b"data: 1\n\n"

        return body(), 200, {"content-type": "text/event-stream"}

    await view.stream_from(app.asgi_app, "/events", caplog)


def test_a_quart_websocket_idle_past_its_expiry_ends_its_view_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Quart runs the websocket's handler and its reading in tasks of its own and cancels
    them when the client leaves: at the identity's expiry the middleware tells it the
    client is gone, so they end before the socket's components are cleaned, and the
    socket is closed with 4001."""
    import gc

    from quart import Quart, websocket

    view = _ExpiringView()
    app = Quart(__name__)

    @app.websocket("/socket")
    async def socket() -> None:
        await websocket.accept()
        await websocket.send("begun")
        await view.idle()

    with serve("uvicorn", view.watched(app.asgi_app)) as url:
        closed = talk_on_socket(f"ws{url[4:]}/socket")
        assert view.done.wait(30)
    gc.collect()  # a task left with its error is reported as it is collected
    assert closed == 4001
    assert view.returned == [(True, ["resolved", "view stopped", "cleanup"])]
    assert len(view.seen) == 1
    assert "cut off when its identity expired" in str(view.seen[0])
    assert "never retrieved" not in caplog.text
    assert "destroyed but it is pending" not in caplog.text


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asgiref runs on asyncio only
async def test_ambient_check_drives_the_django_app_past_its_allowed_hosts() -> None:
    """``ambient check`` on the Django app: every simulated request is served. Its requests
    named the host ``ambient-check``, which no ``ALLOWED_HOSTS`` lists, so Django answered
    each with a 400 and the check of any Django app failed; they now name the address the
    check's scopes claim to reach (127.0.0.1:8000), as a local client of the server does."""
    from ambient.check import PlannedRequest, run_check

    app, _, _ = build("django")
    report = await run_check(
        app,
        users=5,
        requests=2,
        plan=[PlannedRequest("GET", "/whoami")],
        growth_requests=0,
        measure_overhead=False,
    )
    assert report.failed_requests == []
    assert report.ok


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asgiref runs on asyncio only
async def test_a_django_sync_view_hands_work_past_its_response_to_a_held_thread() -> None:
    """A sync view (asgiref's thread) gives ``ContextExecutor.submit_held`` work that uses
    its component after the response: the work gets the same component, not yet cleaned,
    and the request's cleanup comes after it. Taking the hold insisted on the event loop's
    thread or an anyio worker thread, so the view failed with a RuntimeError (a 500)."""
    import threading

    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    from ambient.integrations.threads import ContextExecutor
    from tests.frameworks import django_app
    from tests.frameworks.common import Probe

    release, done = threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []
    executor = ContextExecutor(max_workers=1)

    def audit(request: HttpRequest) -> HttpResponse:
        probe = ambient.resolve_sync(Probe)

        def write_audit_log() -> None:
            release.wait(10)  # until the client has its answer
            seen.append((ambient.resolve_sync(Probe) is probe, probe.closed))
            done.set()

        executor.submit_held(write_audit_log)
        return HttpResponse("ok")

    route = path("held-audit", audit)
    django_app.urlpatterns.append(route)
    app, registry, ledger = build("django")
    try:
        with serve("uvicorn", app) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.get("/held-audit", headers={"x-user-id": "alice"})
            assert response.status_code == 200, response.text
            assert ledger.open_probes() == 1  # held: not cleaned after the response
            release.set()
            assert await anyio.to_thread.run_sync(done.wait, 10)
    finally:
        release.set()
        executor.shutdown()
        django_app.urlpatterns.remove(route)
    assert seen == [(True, False)]
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0
