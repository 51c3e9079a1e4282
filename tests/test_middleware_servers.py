"""AmbientMiddleware on real servers over loopback: many users, pipelining, streaming,
disconnects, websockets, lifespan and composition with other middleware."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import pathlib
import socket
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import jwt as pyjwt
import pytest
from hypercorn.utils import LifespanFailureError
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import ambient
from ambient import Registry
from ambient._binding import _current, _live
from ambient.errors import AmbientError, IncompleteResponseError, PoolExhaustedError
from ambient.integrations.starlette import install
from ambient.middleware import AmbientMiddleware, scope_user, trusted_header
from ambient.middleware.identity import Identity, jwt_bearer
from tests.apps import (
    BUILT,
    CRASH,
    Chunks,
    Ledger,
    Memory,
    Probe,
    build,
    build_app,
    build_crashing_lifespan,
    build_registry,
    close_built,
    next_in_an_hour,
)
from tests.h2client import H2Client
from tests.servers import (
    granian_available,
    reset_on_close,
    serve,
    serve_unix,
    shutdown_under_open_streams,
    websocket_upgrade,
)

SERVERS = ["uvicorn", "hypercorn", "hypercorn-trio"]
USERS = 200
# The full 50 requests per user once (asyncio client, uvicorn); 10 elsewhere keeps the suite
# quick: the server is the same whichever loop the client runs on.
FULL_RUN = ("asyncio", "uvicorn")


@pytest.fixture(autouse=True)
def _close_built_registries() -> Iterator[None]:
    """Close the registries the test built (held until then, so none is garbage collected
    with USER components open inside the test's event loop)."""
    yield
    if BUILT:
        anyio.run(close_built)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(server: str) -> Iterator[tuple[str, Ledger, AmbientMiddleware]]:
    app, ledger, _ = build()
    with serve(server, app) as url:
        yield url, ledger, app


async def wait_for(ledger: Ledger, predicate: Any) -> None:
    """Cleanup runs after the response is sent; wait for it on the ledger's condition."""
    assert await anyio.to_thread.run_sync(ledger.wait, predicate), ledger.problems()


@pytest.mark.load
async def test_many_users_on_keep_alive_connections_never_see_each_other(
    server: str, anyio_backend: str
) -> None:
    """200 users x 20 requests: every response carries its own user, request and component."""
    per_user = 20 if (anyio_backend, server) == FULL_RUN else 5
    app, ledger, _ = build()
    seen_probes: dict[int, str] = {}
    failures: list[str] = []
    # httpcore's trio backend loses sockets ("this socket was already closed") with 200 open
    # connections on a loaded machine; 50 shared keep-alive connections still interleave
    # every user's requests on every connection.
    connections = USERS if anyio_backend == "asyncio" else 50
    # Ten clients, each with a tenth of the users and of the connections: every connection
    # still carries many users' requests in turn, and httpcore's pool, whose cost per request
    # grows with connections times waiting requests, stops dominating the run.
    groups = 10
    limits = httpx.Limits(
        max_connections=connections // groups, max_keepalive_connections=connections // groups
    )
    with serve(server, app) as url:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=url, limits=limits, timeout=60)
                )
                for _ in range(groups)
            ]

            async def user(number: int) -> None:
                http = clients[number % groups]
                name = f"user-{number}"
                for i in range(per_user):
                    request_id = f"{name}-r{i}"
                    response = await http.get(
                        "/whoami", headers={"x-user-id": name, "x-request-id": request_id}
                    )
                    body = response.json()
                    if (
                        response.status_code != 200
                        or body["user"] != name
                        or body["probe_user"] != name
                        or body["memory_user"] != name
                        or body["request_id"] != request_id
                        or body["probe_request"] != request_id
                        or response.headers["x-request-id"] != request_id
                    ):
                        failures.append(f"{name} request {i} got {body}")
                    if body["probe"] in seen_probes:
                        failures.append(f"probe {body['probe']} served twice")
                    seen_probes[body["probe"]] = name

            async with anyio.create_task_group() as tg:
                for number in range(USERS):
                    tg.start_soon(user, number)
        await wait_for(ledger, lambda led: len(led.cleaned) >= USERS * per_user)
    # Leaving `serve` ran the lifespan shutdown, which closed every user's Memory.
    assert failures == []
    assert len(seen_probes) == USERS * per_user
    assert ledger.problems() == []
    owners = set(ledger.created.values())
    assert len(owners) == USERS
    assert len(ledger.created) == USERS * per_user + USERS  # probes + one Memory each


def raw_exchange(url: str, payload: bytes, responses: int) -> list[bytes]:
    """Send ``payload`` on one socket and read ``responses`` HTTP responses back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(b"HTTP/1.1 ") < responses or not _complete(data, responses):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:]]


def _complete(data: bytes, responses: int) -> bool:
    parts = data.split(b"HTTP/1.1 ")[1:]
    if len(parts) < responses:
        return False
    last = parts[-1]
    head, _, body = last.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


async def test_pipelined_requests_do_not_inherit_the_previous_users_context(server: str) -> None:
    app, ledger, _ = build(anonymous=True)
    request_a = b"GET /whoami HTTP/1.1\r\nHost: x\r\nx-user-id: alice\r\n\r\n"
    request_b = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"
    with serve(server, app) as url:
        answers = await anyio.to_thread.run_sync(
            raw_exchange, url, request_a + request_b + request_b, 3
        )
    assert len(answers) == 3
    bodies = [httpx.Response(200, content=a.partition(b"\r\n\r\n")[2]).json() for a in answers]
    assert bodies[0]["user"] == "alice"
    for body in bodies[1:]:
        assert body["user"].startswith("anonymous:")
        assert body["probe_user"] == body["user"]
        assert body["memory_user"] == body["user"]
    assert len({b["user"] for b in bodies}) == 3
    assert ledger.problems() == []


async def test_streamed_body_and_background_task_see_the_context(
    served: tuple[str, Ledger, AmbientMiddleware],
) -> None:
    url, ledger, _ = served
    async with httpx.AsyncClient(base_url=url) as http:
        streamed = await http.get("/stream", headers={"x-user-id": "sam"})
        background = await http.get("/background", headers={"x-user-id": "bea"})
    lines = streamed.text.splitlines()
    assert lines[0] == "first"
    assert lines[1].startswith("sam ")
    assert background.json() == {"ok": True}
    await wait_for(ledger, lambda led: ("background bea", "bea") in led.events)
    await wait_for(ledger, lambda led: len(led.cleaned) == 2)
    assert ("streamed", "sam") in ledger.events
    assert sorted(ledger.created.values()) == ["bea", "sam"]


async def test_client_disconnect_mid_stream_still_cleans_everything_once(
    served: tuple[str, Ledger, AmbientMiddleware],
) -> None:
    url, ledger, app = served
    clients = 20
    host, port = url.removeprefix("http://").split(":")

    def stream_and_leave(n: int) -> None:
        request = f"GET /stream?endless=1 HTTP/1.1\r\nHost: x\r\nx-user-id: quitter-{n}\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request.encode())
            received = b""
            while received.count(b"more") < 3:
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream early"
                received += chunk
        # Leaving the block closed the socket mid-body: the client is gone.
        assert f"quitter-{n} ".encode() in received

    async with anyio.create_task_group() as tg:
        for n in range(clients):
            tg.start_soon(anyio.to_thread.run_sync, stream_and_leave, n)
    await wait_for(ledger, lambda led: len(led.cleaned) == clients)
    assert ledger.problems() == []
    assert app.registry.stats().open_scopes == 0


@pytest.mark.parametrize("server", ["hypercorn", "hypercorn-trio"])
async def test_a_reset_http2_stream_is_cleaned_up_while_its_connection_goes_on(
    server: str,
) -> None:
    """HTTP/2's disconnect is per stream: a client cancels one stream (RST_STREAM) and keeps
    the connection, which carries other users' streams. The cancelled streams' components
    are cleaned at once, the others' only when they end, and the connection still serves."""
    app, ledger, _ = build()
    users = 20

    def exercise(url: str) -> None:
        with H2Client(url) as client:
            user_of = {
                client.get("/stream?endless=1", {"x-user-id": f"streamer-{n}"}): f"streamer-{n}"
                for n in range(users)
            }
            streams = client.streams
            client.read_until(
                lambda: all(s.body.count(b"\n") >= 2 for s in streams.values()), "every probe"
            )
            probe_of: dict[int, int] = {}
            for stream_id, user in user_of.items():
                assert streams[stream_id].status == 200
                probe_user, number = streams[stream_id].body.split(b"\n")[1].decode().split()
                assert probe_user == user
                probe_of[stream_id] = int(number)
            cancelled, kept = list(user_of)[::2], list(user_of)[1::2]
            for stream_id in cancelled:
                client.reset(stream_id)
            sizes = {stream_id: len(streams[stream_id].body) for stream_id in kept}
            client.read_until(
                lambda: (
                    all(probe_of[s] in ledger.cleaned for s in cancelled)
                    and all(len(streams[s].body) > sizes[s] + 50 for s in kept)
                ),
                "the cancelled streams' cleanup, with the others still streaming",
            )
            assert not [s for s in kept if probe_of[s] in ledger.cleaned]
            assert not [s for s in kept if streams[s].ended or streams[s].reset_by_server]
            late = client.get("/whoami", {"x-user-id": "late", "x-request-id": "late-1"})
            client.read_until(lambda: streams[late].ended, "a new stream's answer")
            assert streams[late].status == 200
            assert streams[late].headers[b"x-request-id"] == b"late-1"
            assert json.loads(streams[late].body)["probe_user"] == "late"
            for stream_id in kept:
                client.reset(stream_id)
        assert ledger.wait(lambda led: all(p in led.cleaned for p in probe_of.values()))

    with serve(server, app) as url:
        await anyio.to_thread.run_sync(exercise, url)
    assert ledger.problems() == []
    assert app.registry.stats().open_scopes == 0


async def test_anonymous_websockets_each_get_a_connection_of_their_own(server: str) -> None:
    """With ``anonymous=True``, 12 sockets without identity and 12 of distinct users at
    once: every socket's context has a connection id, the same for all of its messages and
    no other socket's, as an identified socket's has (an anonymous one had none), and
    every anonymous socket is a user of its own."""
    app, ledger, _ = build(anonymous=True)
    results: dict[str, list[dict[str, Any]]] = {}

    def talk(name: str) -> None:
        headers = {} if name.startswith("anon") else {"x-user-id": name}
        with connect(ws_url, additional_headers=headers, open_timeout=20) as sock:
            replies = []
            for _ in range(3):
                sock.send("hi")
                replies.append(json.loads(sock.recv(timeout=20)))
            results[name] = replies

    names = [f"anon-{n}" for n in range(12)] + [f"ws-{n}" for n in range(12)]
    with serve(server, app) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(anyio.to_thread.run_sync, talk, name)
        await wait_for(ledger, lambda led: len(led.events) == len(names))
    assert sorted(results) == sorted(names)
    connections = set()
    anonymous = set()
    for name, replies in results.items():
        (user,) = {r["user"] for r in replies}
        (connection_id,) = {r["connection_id"] for r in replies}
        assert isinstance(connection_id, str)
        assert connection_id
        connections.add(connection_id)
        if name.startswith("anon"):
            assert user.startswith("anonymous:")
            anonymous.add(user)
        else:
            assert user == name
    assert len(connections) == len(names)
    assert len(anonymous) == 12
    assert ledger.problems() == []


async def test_an_app_that_sets_the_request_id_header_in_any_case_gets_no_second_one(
    server: str,
) -> None:
    """An app that sets the request id header itself, its name in another case (Django
    sends header names as they were set: ``X-Request-ID``), keeps it as the only one: a
    second ``x-request-id`` with the middleware's id went out beside it, two ids for one
    answer. Sixteen users at once, half of them on such a route; each answer carries
    exactly one id, the app's or the one its client sent."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        user = ambient.get_current_context().user_id
        headers = [(b"content-type", b"text/plain")]
        if scope["path"] == "/own":
            headers.append((b"X-Request-ID", f"app-{user}".encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": user.encode()})

    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    answers: dict[str, httpx.Response] = {}
    with serve(server, middleware, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def call(n: int) -> None:
                user, path = f"user-{n}", "/own" if n % 2 else "/"
                headers = {"x-user-id": user, "x-request-id": f"client-{n}"}
                answers[user] = await http.get(path, headers=headers)

            async with anyio.create_task_group() as tg:
                for n in range(16):
                    tg.start_soon(call, n)
    for n in range(16):
        answer = answers[f"user-{n}"]
        assert answer.status_code == 200
        assert answer.text == f"user-{n}"
        expected = f"app-user-{n}" if n % 2 else f"client-{n}"
        assert answer.headers.get_list("x-request-id") == [expected]


async def test_an_app_exception_gives_500_and_cleanup_still_runs(
    served: tuple[str, Ledger, AmbientMiddleware],
) -> None:
    url, ledger, _ = served
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/boom", headers={"x-user-id": "oops"})
    assert response.status_code == 500
    await wait_for(ledger, lambda led: len(led.cleaned) == 1)
    assert ledger.problems() == []


async def test_websockets_are_bound_per_connection_and_never_mixed(
    served: tuple[str, Ledger, AmbientMiddleware],
) -> None:
    url, ledger, _ = served
    ws_url = url.replace("http://", "ws://") + "/ws"
    results: dict[str, list[dict[str, Any]]] = {}

    def talk(user: str) -> None:
        # The websockets library's asyncio client cannot run on trio; its sync client
        # in a worker thread serves both loops.
        with connect(ws_url, additional_headers={"x-user-id": user}, open_timeout=20) as sock:
            replies = []
            for _ in range(5):
                sock.send("hi")
                replies.append(json.loads(sock.recv(timeout=20)))
            results[user] = replies

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(anyio.to_thread.run_sync, talk, f"ws-{n}")
    for user, replies in results.items():
        assert {r["user"] for r in replies} == {user}
        assert {r["probe_user"] for r in replies} == {user}
        assert len({r["connection_id"] for r in replies}) == 1
        # One REQUEST scope per connection: the probe lives as long as the socket.
        assert len({r["probe"] for r in replies}) == 1
    assert len({replies[0]["connection_id"] for replies in results.values()}) == 20
    await wait_for(ledger, lambda led: len(led.cleaned) == 20)
    await wait_for(ledger, lambda led: len(led.events) == 20)
    assert sorted(user for _, user in ledger.events) == sorted(results)


async def test_an_unauthenticated_websocket_is_refused(
    served: tuple[str, Ledger, AmbientMiddleware],
) -> None:
    url, ledger, _ = served
    ws_url = url.replace("http://", "ws://") + "/ws"

    def refused_handshake() -> InvalidStatus:
        with pytest.raises(InvalidStatus) as refused, connect(ws_url, open_timeout=20):
            pass
        return refused.value

    refusal = await anyio.to_thread.run_sync(refused_handshake)
    # Servers with the denial-response extension answer 401; the others close the
    # handshake with 1008, which the client sees as a 403 refusal.
    assert refusal.response.status_code in (401, 403)
    assert ledger.created == {}


class UpstreamError(AmbientError):
    """An application's own error with an answer: its upstream failed (502)."""

    http_status = 502
    problem_type = "urn:example:problem:upstream"
    title = "Upstream failed"


class QuotaStoreError(AmbientError):
    """An application's own 500, with a sentence of its own for the client."""

    http_status = 500
    title = "Quota unknown"
    client_detail = "the quota could not be checked"


async def test_a_server_errors_own_message_reaches_the_log_never_the_client(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An app raises its own ambient errors with a server-side status, their messages
    quoting what failed (an upstream's address, an exception's text), before it answers a
    request or accepts a socket. The client gets the problem with the class's
    client_detail (a sentence any client may hear), in the body or the refusal; the
    message, with its traceback, is logged."""
    secret = "10.0.0.7:8443 said: psycopg.OperationalError: password authentication failed"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        error = QuotaStoreError if scope["path"] == "/quota" else UpstreamError
        raise error(f"the upstream at {secret}")

    caplog.set_level(logging.WARNING, logger="ambient.middleware")
    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    headers = {"x-user-id": "ann"}
    with serve(server, middleware) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            upstream = await http.get("/", headers=headers)
            quota = await http.get("/quota", headers=headers)

        def refused_handshake() -> InvalidStatus:
            ws_url = url.replace("http://", "ws://") + "/ws"
            with (
                pytest.raises(InvalidStatus) as refused,
                connect(ws_url, additional_headers=headers, open_timeout=10),
            ):
                pass
            return refused.value

        refusal = await anyio.to_thread.run_sync(refused_handshake)
    assert (upstream.status_code, upstream.json()) == (
        502,
        {
            "type": "urn:example:problem:upstream",
            "title": "Upstream failed",
            "status": 502,
            "detail": "the server could not carry out the request",
        },
    )
    assert (quota.status_code, quota.json()["detail"]) == (500, "the quota could not be checked")
    # Every server here answers a refused handshake over HTTP (the denial extension).
    assert refusal.response.status_code == 502
    assert json.loads(refusal.response.body) == upstream.json()
    for answer in (upstream.text, quota.text, bytes(refusal.response.body).decode()):
        assert "10.0.0.7" not in answer
        assert "password" not in answer
    logged = [r for r in caplog.records if r.name == "ambient.middleware"]
    assert len(logged) == 3, logged
    for record in logged:
        assert secret in record.getMessage()
        assert record.exc_info is not None


async def test_a_handshake_refused_with_a_close_gives_the_client_detail_as_reason() -> None:
    """Without the ``websocket.http.response`` extension (every server here has it) a
    refused handshake is closed, its reason the problem's detail: for a server error, the
    class's client_detail."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise UpstreamError("the upstream at 10.0.0.7:8443 refused the connection")

    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "websocket.connect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"x-user-id", b"ann")],
        "client": ("127.0.0.1", 50000),
        "query_string": b"",
    }
    middleware = AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
    await middleware(scope, receive, send)
    assert sent == [
        {
            "type": "websocket.close",
            "code": 1011,
            "reason": "the server could not carry out the request",
        }
    ]


async def test_a_websocket_the_app_refuses_after_taking_its_connect_is_refused_at_once(
    server: str,
) -> None:
    """A raw ASGI app receives the handshake's ``websocket.connect``, then fails before
    accepting with an error that has an answer (no database connection free: 503). The
    refusal goes out at once; it used to wait for a second connect that never comes, so
    the handshake hung until the client gave up (with the user's concurrency slot held)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        msg = "no database connection free for this user"
        raise PoolExhaustedError(msg, retry_after=2)

    middleware = AmbientMiddleware(
        app, registry=Registry(), identity=trusted_header(), max_concurrent_per_user=1
    )
    with serve(server, middleware) as url:
        ws_url = url.replace("http://", "ws://") + "/ws"

        def refused_handshake() -> InvalidStatus:
            with (
                pytest.raises(InvalidStatus) as refused,
                connect(ws_url, additional_headers={"x-user-id": "ann"}, open_timeout=10),
            ):
                pass
            return refused.value

        for _ in range(2):  # the slot of the first is free again for the second
            refusal = await anyio.to_thread.run_sync(refused_handshake)
            # With the denial-response extension 503; otherwise a close (1013) before accept.
            assert refusal.response.status_code in (503, 403)


def test_shutdown_with_requests_in_flight_loses_no_cleanup() -> None:
    import uvicorn

    from tests.servers import free_port

    ledger = Ledger()
    registry = build_registry(ledger)
    gate = threading.Event()
    inside = threading.Semaphore(0)

    async def slow(request: Request) -> Response:
        await ambient.resolve(Probe)
        inside.release()
        await anyio.to_thread.run_sync(gate.wait, 30)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    inner = build_app(ledger)
    inner.router.routes.append(Route("/slow", slow))
    app = AmbientMiddleware(inner, registry=registry, identity=trusted_header())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    statuses: list[int] = []

    def call(n: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            http.get("/whoami", headers={"x-user-id": f"early-{n}"})
            statuses.append(http.get("/slow", headers={"x-user-id": f"slow-{n}"}).status_code)

    import time

    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    callers = [threading.Thread(target=call, args=(n,)) for n in range(10)]
    for caller in callers:
        caller.start()
    for _ in callers:
        assert inside.acquire(timeout=20)
    server.should_exit = True  # shut down while 10 requests are in flight
    gate.set()
    for caller in callers:
        caller.join(30)
    thread.join(30)
    assert statuses == [200] * 10
    # 10 + 10 probes and the 10 early users' Memory, every one cleaned exactly once.
    assert len(ledger.created) == 30
    assert ledger.problems() == []


@shutdown_under_open_streams
def test_shutdown_under_open_streams_and_background_tasks_loses_no_cleanup(
    server: str, options: dict[str, Any]
) -> None:
    """10 users each hold an endless streamed response and a background task still at
    work, both using the request's Probe and the user's Memory, when the server shuts
    down; it gives up on them after its 1 s grace period and cancels them. No stream or
    task ever finds one of its components cleaned while it still runs, every component is
    cleaned exactly once (the USER ones after the requests that held them, whose own
    cleanups still write to them), no scope is left open, and the shutdown ends within a
    few seconds."""
    ledger = Ledger()
    registry = build_registry(ledger)
    misuse: list[str] = []
    working = threading.Semaphore(0)

    async def flush(ctx: ambient.UserExecutionContext) -> AsyncIterator[str]:
        """A REQUEST component whose cleanup writes to the user's Memory, taking a while."""
        memory = await ambient.resolve(Memory)
        yield "flush"
        await anyio.sleep(0.2)
        if memory.number in ledger.cleaned:
            misuse.append(f"{ctx.user_id}'s request flushed to a cleaned Memory")

    registry.register("flush", flush)

    async def keep_using(user: str, what: str) -> AsyncIterator[bytes]:
        await ambient.resolve("flush")
        probe = await ambient.resolve(Probe)
        memory = await ambient.resolve(Memory)
        working.release()
        while True:  # until the server cancels it
            misuse.extend(
                f"{user}'s {what} used component {number} after its cleanup"
                for number in (probe.number, memory.number)
                if number in ledger.cleaned
            )
            if ambient.get_current_context().user_id != user:
                misuse.append(f"{user}'s {what} changed user")
            yield b"more\n"
            await anyio.sleep(0.01)

    async def chat(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        return StreamingResponse(keep_using(user, "stream"))

    async def later(request: Request) -> Response:
        user = ambient.get_current_context().user_id

        async def job() -> None:
            async for _ in keep_using(user, "background task"):
                pass

        return Response("accepted", background=BackgroundTask(job))

    inner = build_app(ledger)
    inner.router.routes += [Route("/chat", chat), Route("/later", later)]
    app = AmbientMiddleware(inner, registry=registry, identity=trusted_header())
    users = 10
    with contextlib.ExitStack() as sockets:
        with serve(server, app, **options) as url:
            host, port = url.removeprefix("http://").split(":")
            for n, path in itertools.product(range(users), ("/chat", "/later")):
                sock = sockets.enter_context(socket.create_connection((host, int(port)), 10))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nx-user-id: u-{n}\r\n\r\n".encode())
            for _ in range(2 * users):
                assert working.acquire(timeout=20)
            shutdown_began = time.monotonic()
        took = time.monotonic() - shutdown_began
    assert misuse == []
    assert len(ledger.created) == 3 * users  # two Probes and one Memory per user
    assert ledger.problems() == []
    assert registry.stats().open_scopes == 0
    assert took < 10


# trio warns about an async generator left to the garbage collector (Starlette does not
# close a stream whose client has gone): that is the case under test.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.parametrize("acting_for", ["child run", "another user"])
def test_a_sub_scope_in_a_stream_the_client_left_is_cleaned_once_and_ends_nowhere(
    server: str, acting_for: str, caplog: pytest.LogCaptureFixture
) -> None:
    """10 users' streams each open a sub-scope inside their body generator (acting for a
    child run, or for another user, as an admin would) and resolve a component there
    for every chunk; each client hangs up mid-stream. Whether the server or the
    generator's finaliser ends it, and in whichever task: each sub-scope's component and
    each request's are cleaned exactly once, every scope closes, what runs outside the
    middleware after each request sees no context (neither the request's nor the
    sub-scope's), and nothing is logged at warning or above."""
    caplog.set_level(logging.DEBUG, logger="ambient")
    made: list[str] = []
    cleaned: list[str] = []
    after: list[str] = []
    changed = threading.Condition()
    registry = Registry()

    def part(ctx: ambient.UserExecutionContext) -> Iterator[str]:
        with changed:
            made.append(ctx.run_id)
        try:
            yield ctx.user_id
        finally:
            with changed:
                cleaned.append(ctx.run_id)
                changed.notify_all()

    registry.register("part", part)

    async def stream(request: Request) -> Response:
        request_ctx = ambient.get_current_context()
        await ambient.resolve("part")
        if acting_for == "child run":
            sub = request_ctx.child("stream")
        else:
            sub = ambient.UserExecutionContext.create(f"for-{request_ctx.user_id}")

        async def body() -> AsyncIterator[bytes]:
            async with registry.open_scope(sub, allow_switch=acting_for != "child run"):
                while True:  # until the client leaves
                    yield f"{await ambient.resolve('part')}\n".encode()
                    await anyio.sleep(0.005)

        return StreamingResponse(body())

    app = AmbientMiddleware(
        Starlette(routes=[Route("/stream", stream)]), registry=registry, identity=trusted_header()
    )

    async def outside(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                ctx = ambient.current_context_or_none()
                with changed:
                    after.append("nobody" if ctx is None else ctx.user_id)
                    changed.notify_all()

    users = 10

    def stream_and_leave(port: int, n: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(f"GET /stream HTTP/1.1\r\nHost: x\r\nx-user-id: u-{n}\r\n\r\n".encode())
            received = b""
            while received.count(b"\n") < 12:  # the headers and a few chunks
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk

    def settled() -> bool:
        return len(after) == users and len(cleaned) == 2 * users

    with serve(server, outside) as url:
        port = int(url.rsplit(":", 1)[1])
        callers = [threading.Thread(target=stream_and_leave, args=(port, n)) for n in range(users)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        with changed:
            changed.wait_for(settled, timeout=10)
        gc.collect()  # a generator nobody closed is finalised now at the latest
        with changed:
            assert changed.wait_for(settled, timeout=10), (after, made, cleaned)
    assert sorted(cleaned) == sorted(made)
    assert len(set(cleaned)) == 2 * users
    assert after == ["nobody"] * users
    assert registry.stats().open_scopes == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def _read_response(sock: socket.socket) -> bytes:
    """Read one whole HTTP/1.1 response (a fixed length or chunked body) from ``sock``."""
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        if _:
            fields = head.lower()
            if b"transfer-encoding: chunked" in fields and body.endswith(b"0\r\n\r\n"):
                return data
            for line in fields.split(b"\r\n"):
                if line.startswith(b"content-length:") and len(body) >= int(line[15:]):
                    return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def assert_quiet(app: AmbientMiddleware) -> None:
    """Wait (bounded) until ``app`` has no request or socket in flight, counted against a
    user's limit or with a scope open; then no user entry may be referenced either."""
    registry = app.registry

    def quiet() -> bool:
        return not (app._requests or app._active or registry.stats().open_scopes)

    deadline = time.monotonic() + 20
    while not quiet() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert quiet(), (app._requests, app._active, registry.stats())
    assert {ref: entry.refs for ref, entry in registry._users.items() if entry.refs} == {}


@pytest.mark.parametrize("server", SERVERS)
def test_requests_cut_short_at_every_moment_leave_no_count_scope_or_reference(
    server: str,
) -> None:
    """10 users, 20 requests each, 40 at a time, with a per-user limit: whole answers,
    whole streams, and clients that hang up at once, while the handler waits (before its
    answer starts) or in the middle of an endless stream. Every answer a client read
    whole names its own user; afterwards no request is counted against its user's limit
    or as in flight, no scope is open, no user entry is referenced, and every component
    was cleaned exactly once."""
    app, ledger, _ = build(max_concurrent_per_user=20)

    async def long_poll(request: Request) -> Response:
        await ambient.resolve(Probe)
        await ambient.resolve(Memory)
        ledger.note("waiting", request.headers["x-request-id"])
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return Response(status_code=204)

    app.app.router.routes.append(Route("/poll", long_poll))  # type: ignore[attr-defined]
    kinds = ("whole", "stream", "gone-at-once", "gone-while-waiting", "gone-mid-stream")
    paths = {
        "whole": "/whoami",
        "stream": "/stream",
        "gone-at-once": "/whoami",
        "gone-while-waiting": "/poll",
        "gone-mid-stream": "/stream?endless=1",
    }
    wrong: list[str] = []

    def one(port: int, n: int) -> None:
        user, kind, request_id = f"cut-{n % 10}", kinds[n % len(kinds)], f"cut.{n}"
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(
                f"GET {paths[kind]} HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n"
                f"x-request-id: {request_id}\r\n\r\n".encode()
            )
            if kind == "gone-while-waiting":
                assert ledger.wait(lambda led: ("waiting", request_id) in led.events)
            elif kind == "gone-mid-stream":
                received = b""
                while b"more" not in received:
                    chunk = sock.recv(4096)
                    assert chunk, received
                    received += chunk
            elif kind != "gone-at-once":
                answer = _read_response(sock)
                if not answer.startswith(b"HTTP/1.1 200") or f"{user}".encode() not in answer:
                    wrong.append(f"{request_id} ({user}, {kind}): {answer[-120:]!r}")
        # Leaving the block closed the socket: the client has gone.

    with serve(server, app) as url:
        port = int(url.rsplit(":", 1)[1])
        for batch in range(5):
            callers = [
                threading.Thread(target=one, args=(port, n))
                for n in range(batch * 40, batch * 40 + 40)
            ]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(30)

        assert_quiet(app)
    assert wrong == []
    assert [what for what, _ in ledger.events].count("waiting") == 40
    assert len(ledger.created) >= 160 + 10  # a Probe for each request that got in, Memories
    assert ledger.problems() == []


def test_websockets_dropped_at_every_moment_leave_no_count_or_scope_behind(server: str) -> None:
    """60 websockets of 10 users under a per-user limit, each dropped by its client with a
    TCP reset: while the handler holds the handshake (before accept), once accepted, or
    right after the upgrade request was sent. No socket stays counted against its user's
    limit or in flight, no scope stays open, and every component is cleaned once."""
    ledger = Ledger()
    registry = build_registry(ledger)

    async def chat(websocket: WebSocket) -> None:
        await ambient.resolve(Probe)
        socket_id = websocket.headers["x-request-id"]
        ledger.note("inside", socket_id)
        if websocket.query_params.get("when") == "before-accept":
            await anyio.to_thread.run_sync(
                ledger.wait, lambda led: ("gone", socket_id) in led.events
            )
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{ambient.get_current_context().user_id} {text}")

    app = AmbientMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", chat)]),
        registry=registry,
        identity=trusted_header(),
        max_concurrent_per_user=10,
    )

    def drop(port: int, n: int) -> None:
        socket_id, when = f"ws.{n}", ("before-accept", "accepted", "at-once")[n % 3]
        headers = {"x-user-id": f"ws-{n % 10}", "x-request-id": socket_id}
        upgrade = websocket_upgrade(f"/ws?when={when}", n, headers)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(upgrade)
            if when == "before-accept":
                assert ledger.wait(lambda led: ("inside", socket_id) in led.events)
            elif when == "accepted":
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = sock.recv(4096)
                    assert chunk, answer
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 101"), answer
            reset_on_close(sock)
        ledger.note("gone", socket_id)

    with serve(server, app) as url:
        port = int(url.rsplit(":", 1)[1])
        callers = [threading.Thread(target=drop, args=(port, n)) for n in range(60)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert_quiet(app)
    assert len(ledger.created) >= 40  # every socket but those dropped at once got in
    assert ledger.problems() == []


@pytest.mark.parametrize("answered", [False, True], ids=["unanswered", "after-complete"])
def test_a_startup_failure_stops_uvicorn_as_it_would_without_the_middleware(
    answered: bool,
) -> None:
    """An app whose startup raises without answering (a plain ASGI app; Starlette answers
    ``startup.failed`` itself), or as it answers ``startup.complete``, before it waits for
    anything more: under ``--lifespan on`` uvicorn must refuse to start, with the
    middleware as without it, and never serve after a failed startup."""
    import uvicorn

    from tests.servers import free_port

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            if answered:
                await send({"type": "lifespan.startup.complete"})
            msg = "database unreachable"
            raise ConnectionError(msg)
        await Response("served")(scope, receive, send)

    outcome: dict[bool, tuple[bool, Any]] = {}
    for wrapped in (False, True):
        served: Any = (
            AmbientMiddleware(app, registry=Registry(), identity=trusted_header())
            if wrapped
            else app
        )
        config = uvicorn.Config(
            served, host="127.0.0.1", port=free_port(), lifespan="on", log_level="critical"
        )
        server = uvicorn.Server(config)
        exits: list[Any] = []

        def run(server: uvicorn.Server = server, exits: list[Any] = exits) -> None:
            try:
                server.run()
            except SystemExit as stop:  # uvicorn's exit status for a failed startup
                exits.append(stop.code)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(15)
        if thread.is_alive():  # it went on serving: stop it
            server.should_exit = True
            thread.join(30)
        outcome[wrapped] = (server.started, exits)
    assert outcome[True] == outcome[False] == (False, [3])


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        token = conn.headers.get("authorization")
        if token is None or not token.startswith("Token "):
            return None
        return AuthCredentials(["chat"]), SimpleUser(token.removeprefix("Token "))


class Tagger(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware placed inside AmbientMiddleware: reads the context too."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        user = ambient.get_current_context().user_id
        response = await call_next(request)
        response.headers["x-seen-by-tagger"] = user
        return response


def composed_app(ledger: Ledger) -> Starlette:
    registry = build_registry(ledger)
    inner = build_app(ledger)
    inner.add_middleware(Tagger)
    return _outer(inner, registry)


def _outer(inner: Starlette, registry: Any) -> Starlette:
    outer = Starlette(
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["https://app.example"]),
            Middleware(GZipMiddleware, minimum_size=10),
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
            Middleware(AmbientMiddleware, registry=registry, identity=scope_user()),
        ]
    )
    outer.mount("/", inner)
    return outer


async def test_behind_auth_cors_and_gzip_with_base_http_middleware_inside(server: str) -> None:
    ledger = Ledger()
    app = composed_app(ledger)
    counter = itertools.count()
    with serve(server, app) as url:
        async with httpx.AsyncClient(base_url=url) as http:

            async def user(n: int) -> None:
                for _ in range(5):
                    next(counter)
                    response = await http.get(
                        "/whoami",
                        headers={
                            "authorization": f"Token member-{n}",
                            "origin": "https://app.example",
                            "accept-encoding": "gzip",
                        },
                    )
                    assert response.status_code == 200
                    assert response.json()["user"] == f"member-{n}"
                    assert response.json()["probe_user"] == f"member-{n}"
                    assert response.headers["x-seen-by-tagger"] == f"member-{n}"
                    assert response.headers["access-control-allow-origin"] == "https://app.example"
                    assert response.headers["content-encoding"] == "gzip"

            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(user, n)
            anonymous = await http.get("/whoami", headers={"origin": "https://app.example"})
            assert anonymous.status_code == 401
            assert anonymous.headers["access-control-allow-origin"] == "https://app.example"
    assert next(counter) == 100
    assert ledger.problems() == []


class UUIDUser(SimpleUser):
    """An application's user class whose identity is its database key, a UUID."""

    @property
    def identity(self) -> Any:
        return uuid.uuid5(uuid.NAMESPACE_OID, self.username)


class UUIDAuth(AuthenticationBackend):
    """Signs in "Token name" users, those named uuid-* with the UUIDUser class."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = (conn.headers.get("authorization") or "").removeprefix("Token ")
        return AuthCredentials(), UUIDUser(name) if name.startswith("uuid-") else SimpleUser(name)


async def test_a_user_class_without_a_str_identity_is_the_servers_500(server: str) -> None:
    """scope_user() given a user whose identity is a UUID: the application's bug, not the
    client's request, so a 500 whose body does not name the app's user class (the server
    logs its traceback), while users of a sound class go on being served as themselves."""

    async def whoami(request: Request) -> Response:
        return PlainTextResponse(ambient.get_current_context().user_id)

    app = Starlette(
        routes=[Route("/", whoami)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=UUIDAuth()),
            Middleware(AmbientMiddleware, registry=Registry(), identity=scope_user()),
        ],
    )
    answers: dict[str, tuple[int, str]] = {}
    with serve(server, app) as url:
        async with httpx.AsyncClient(base_url=url) as http:

            async def user(name: str) -> None:
                response = await http.get("/", headers={"authorization": f"Token {name}"})
                answers[name] = (response.status_code, response.text)

            async with anyio.create_task_group() as tg:
                for n in range(10):
                    tg.start_soon(user, f"member-{n}")
                    tg.start_soon(user, f"uuid-{n}")
    for n in range(10):
        assert answers[f"member-{n}"] == (200, f"member-{n}")
        status, body = answers[f"uuid-{n}"]
        assert status == 500
        assert "UUIDUser" not in body
        assert "identity" not in body


@pytest.mark.parametrize(
    ("server", "wrap", "options", "forwarding"),
    [
        # uvicorn trusting proxy headers from every peer, as containers often configure it
        ("uvicorn", False, {"forwarded_allow_ips": "*"}, {"x-forwarded-for": "10.9.9.9"}),
        ("uvicorn", False, {"forwarded_allow_ips": "*"}, {"x-forwarded-for": "10.9.9.9:8443"}),
        # ports that uvicorn reads with int() and no digit test does
        ("uvicorn", False, {"forwarded_allow_ips": "*"}, {"x-forwarded-for": "10.9.9.9:-1"}),
        ("uvicorn", False, {"forwarded_allow_ips": "*"}, {"x-forwarded-for": "10.9.9.9:08443"}),
        ("hypercorn", True, {}, {"x-forwarded-for": "10.9.9.9"}),
        ("hypercorn", True, {}, {"forwarded": "for=10.9.9.9;proto=http"}),
    ],
)
async def test_a_client_cannot_claim_the_gateways_address_through_proxy_headers(
    server: str, wrap: bool, options: dict[str, Any], forwarding: dict[str, str]
) -> None:
    """Only the gateway (10.9.9.9) may assert users. A client connecting from elsewhere
    names the gateway's address in a proxy header, and the server's proxy-header handling
    (uvicorn's, hypercorn's ProxyFixMiddleware) makes it scope["client"]: still 401, and
    no component is made for the user it claimed."""
    app, ledger, _ = build(trusted_header(trusted=("10.9.9.9/32",)))
    served: Any = app
    if wrap:
        from hypercorn.middleware import ProxyFixMiddleware

        mode = "modern" if "forwarded" in forwarding else "legacy"
        served = ProxyFixMiddleware(app, mode=mode)
    with serve(server, served, **options) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            forged = await http.get("/whoami", headers={"x-user-id": "admin", **forwarding})
            plain = await http.get("/whoami", headers={"x-user-id": "admin"})
    assert (forged.status_code, plain.status_code) == (401, 401), forged.text
    assert ledger.created == {}


async def test_behind_a_proxy_on_this_host_uvicorns_proxy_headers_are_named_as_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway on this host sets the user and appends its client to X-Forwarded-For, as
    proxies do. With uvicorn's default proxy headers the client's address replaces the
    gateway's: refused, with a warning naming the setting; without them the gateway is
    the peer and the user gets in."""
    gateway = {"x-user-id": "alice", "x-forwarded-for": "203.0.113.9"}
    answers = {}
    for proxy_headers in (True, False):
        app, _, _ = build()
        with (
            caplog.at_level(logging.WARNING, logger="ambient.middleware"),
            serve("uvicorn", app, proxy_headers=proxy_headers) as url,
        ):
            async with httpx.AsyncClient(base_url=url) as http:
                response = await http.get("/whoami", headers=gateway)
        answers[proxy_headers] = (response.status_code, response.json().get("user"))
    assert answers == {True: (401, None), False: (200, "alice")}
    warned = [r.getMessage() for r in caplog.records if "--no-proxy-headers" in r.getMessage()]
    assert len(warned) == 1
    assert "'203.0.113.9'" in warned[0]


@pytest.mark.parametrize("server", SERVERS)
async def test_a_proxy_on_the_unix_socket_asserts_users_once_trusted(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy on this host reaching the app through a Unix socket (nginx in front of
    `gunicorn --bind unix:...`): requests carry no client address. Refused by default, with
    a warning naming the `"unix"` entry; trusted with it, every user gets their own context
    and components."""
    headers = {"x-user-id": "alice"}
    app, _, _ = build()
    with (
        caplog.at_level(logging.WARNING, logger="ambient.middleware"),
        serve_unix(server, app) as path,
    ):
        async with _unix_client(path) as http:
            refused = [(await http.get("/whoami", headers=headers)).status_code for _ in "ab"]
    assert refused == [401, 401]
    warned = [r.getMessage() for r in caplog.records if "Unix domain socket" in r.getMessage()]
    assert len(warned) == 1
    assert "'unix'" in warned[0]

    app, ledger, _ = build(trusted_header(trusted=("unix",)))
    failures: list[str] = []
    with serve_unix(server, app) as path:
        async with _unix_client(path) as http:

            async def user(number: int) -> None:
                name = f"user-{number}"
                for i in range(3):
                    response = await http.get("/whoami", headers={"x-user-id": name})
                    body = response.json()
                    if response.status_code != 200 or (body["user"], body["probe_user"]) != (
                        name,
                        name,
                    ):
                        failures.append(f"{name} request {i}: {response.status_code} {body}")

            async with anyio.create_task_group() as tg:
                for number in range(20):
                    tg.start_soon(user, number)
        await wait_for(ledger, lambda led: len(led.cleaned) >= 60)
    assert failures == []
    assert ledger.problems() == []


@contextlib.asynccontextmanager
async def _unix_client(path: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(uds=path)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as http:
        yield http


async def test_an_untrusted_peer_sending_the_identity_header_gets_401(server: str) -> None:
    app, ledger, _ = build(trusted_header(trusted=("10.0.0.0/8",)))
    with serve(server, app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.get("/whoami", headers={"x-user-id": "admin"})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert ledger.created == {}


class _Sessions:
    """A registry whose REQUEST "session" is its request's user id, noting how each ended:
    the exception its cleanup saw, or ``None`` for a clean end."""

    def __init__(self, **options: Any) -> None:
        self.cleaned: list[str] = []
        self.ended_by: list[Exception | None] = []
        self.all_cleaned = threading.Event()
        self.registry = ambient.Registry(**options)
        self.registry.register("session", self._session)

    def _session(self, ctx: ambient.UserExecutionContext) -> Iterator[str]:
        try:
            yield ctx.user_id
        except Exception as error:
            self.ended_by.append(error)
            raise
        else:
            self.ended_by.append(None)
        finally:
            self.cleaned.append(ctx.user_id)
            self.all_cleaned.set()


# Synchronous: the client is the websockets library's own, in this thread; the server runs
# its own loop, and a second client loop would only wait out the expiry again.
@pytest.mark.parametrize("credential", ["jwt", "signed context"])
def test_a_websocket_is_closed_when_its_token_expires(server: str, credential: str) -> None:
    """A socket authenticated by a JWT, or by another service's signed context, is closed
    with 4001 when the token expires, though the client keeps talking: no message is
    handled after expiry, and the connection's components are cleaned once, told that the
    socket was cut short (IncompleteResponseError), so that a transaction around their
    yield rolls back rather than commits: they used to see a clean end."""

    from ambient.integrations.propagation import HEADER, ContextSigner, signed_context

    secret = "a-test-secret-of-at-least-32-bytes!"
    handled_at: list[float] = []
    ledger = _Sessions()
    registry, cleaned, ended_by, all_cleaned = (
        ledger.registry,
        ledger.cleaned,
        ledger.ended_by,
        ledger.all_cleaned,
    )

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            await websocket.receive_text()
            handled_at.append(time.time())
            user = ambient.get_current_context().user_id
            await websocket.send_json({"user": user, "session": await ambient.resolve("session")})

    signer = ContextSigner(secret, leeway=0)
    app = AmbientMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", chat)]),
        registry=registry,
        identity=jwt_bearer(secret, algorithms=["HS256"], leeway=0)
        if credential == "jwt"
        else signed_context(signer),
    )
    # A whole second, as JWTs count; 1.6 to 2.6 s from now: enough for a handful of replies.
    expires = int(time.time() + 1.6) + 1
    if credential == "jwt":
        token = pyjwt.encode({"sub": "alice", "exp": expires}, secret, algorithm="HS256")
        headers = {"authorization": f"Bearer {token}"}
    else:
        caller = ambient.UserExecutionContext.create("alice")
        token = signer.sign(caller, ttl=expires - time.time())
        expires = int(signer._verified(token, None)[1])  # the token's own exp, rounded up
        headers = {HEADER: token}

    def talk(ws_url: str) -> tuple[list[Any], Any]:
        replies: list[Any] = []
        with connect(ws_url, additional_headers=headers, open_timeout=20) as sock:
            try:
                for _ in range(100):  # bounded: expiry comes after about 20 of them
                    sock.send("hi")
                    replies.append(json.loads(sock.recv(timeout=5)))
                    time.sleep(0.1)  # a chatty client's pace, not a wait for the server
            except ConnectionClosed as closed:
                return replies, closed.rcvd
        return replies, None

    with serve(server, app) as url:
        replies, close = talk(url.replace("http", "ws") + "/ws")
        closed_at = time.time()
        assert all_cleaned.wait(10)
    assert close is not None
    assert close.code == 4001
    assert expires - 0.2 <= closed_at <= expires + 1.0
    assert len(replies) >= 5
    assert all(reply == {"user": "alice", "session": "alice"} for reply in replies)
    assert max(handled_at) < expires + 0.1
    assert cleaned == ["alice"]
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])


async def test_an_event_stream_ends_when_its_token_expires(server: str) -> None:
    """A server-sent event stream authenticated by a JWT ends when the token expires, though
    the app would go on: no event goes out after the expiry, the stream ends cleanly for
    the client, and the request's components are cleaned once, told that the response was
    cut short. It used to go on serving the expired credential for as long as it ran."""
    secret = "a-test-secret-of-at-least-32-bytes!"
    ledger = _Sessions()
    registry, cleaned, ended_by, all_cleaned = (
        ledger.registry,
        ledger.cleaned,
        ledger.ended_by,
        ledger.all_cleaned,
    )

    async def paced(n: int) -> None:
        if n:
            await anyio.sleep(0.05)

    def event(session: str) -> Callable[[int], str]:
        return lambda n: f"data: {ambient.get_current_context().user_id} {session}\n\n"

    async def events(request: Request) -> StreamingResponse:
        # An event every 0.05 s (an event source's pace), 200 at most.
        session = await ambient.resolve("session")
        body = Chunks(event(session), count=200, before=paced)
        return StreamingResponse(body, media_type="text/event-stream")

    bearer = jwt_bearer(secret, algorithms=["HS256"], leeway=0)
    # 0.8 s after the request arrives, to the microsecond (a JWT's exp counts whole seconds;
    # that it becomes the identity's expiry is tested with the resolver): a handful of events.
    expires = math.inf

    def identity(scope: Any) -> Any:
        nonlocal expires
        found = bearer(scope)
        if found is None:
            return None
        expires = time.time() + 0.8
        return dataclasses.replace(found, expires_at=expires)

    app = AmbientMiddleware(
        Starlette(routes=[Route("/events", events)]), registry=registry, identity=identity
    )
    token = pyjwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    received: list[tuple[float, str]] = []
    with serve(server, app) as url:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream(
                "GET", url + "/events", headers={"authorization": f"Bearer {token}"}
            ) as response,
        ):
            assert response.status_code == 200
            received.extend([(time.time(), line) async for line in response.aiter_lines() if line])
        ended_at = time.time()
        assert await anyio.to_thread.run_sync(all_cleaned.wait, 10)
    assert expires - 0.2 <= ended_at <= expires + 1.0
    assert len(received) >= 5
    assert {line for _, line in received} == {"data: alice alice"}
    assert max(at for at, _ in received) < expires + 0.2
    assert cleaned == ["alice"]
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])


@pytest.mark.parametrize("server", ["hypercorn", "hypercorn-trio"])
def test_an_http2_stream_with_trailers_ends_when_its_token_expires(server: str) -> None:
    """A gRPC-style HTTP/2 stream (its start announces trailers, its client asks for them
    with ``te: trailers``) whose identity has expired ends at its second message with the
    trailers it announced, and its client sees the stream end. It was ended with a last
    body message only: hypercorn waited for the trailers and left the stream open, its
    client waiting for ever."""
    ledger = _Sessions()
    registry, ended_by, cleaned = ledger.registry, ledger.ended_by, ledger.all_cleaned

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = (await ambient.resolve("session")).encode()
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        for _ in range(3):
            await send({"type": "http.response.body", "body": user, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})

    def expired(scope: Any) -> Identity:
        return Identity("ann", expires_at=time.time() - 1)

    def exercise(url: str) -> Any:
        with H2Client(url) as client:
            stream_id = client.get("/", {"te": "trailers"})
            stream = client.streams[stream_id]
            client.read_until(lambda: stream.ended or stream.reset_by_server, "the stream's end")
            return stream

    with serve(server, AmbientMiddleware(app, registry=registry, identity=expired)) as url:
        stream = exercise(url)
        assert cleaned.wait(10)
    assert (stream.status, stream.body, stream.ended, stream.reset_by_server) == (
        200,
        b"ann",
        True,
        False,
    )
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)


@pytest.mark.parametrize("client", ["reads on", "leaves"])
@pytest.mark.parametrize("kind", ["starlette", "raw"])
async def test_an_idle_event_stream_ends_when_its_token_expires(
    server: str, kind: str, client: str
) -> None:
    """An event stream waiting for its next event (which comes in an hour; Starlette's
    ``StreamingResponse``), or for its client's disconnect (a raw ASGI app), ends when its
    identity expires: its client, reading on, sees the stream end then, and the request's
    components are cleaned once, told that the response was cut short. The stream held the
    expired credential's connection and components until its next message. A client that
    leaves before the expiry ends it then, as before: its cleanups see the disconnect.
    Nothing is raised to the server either way."""
    ledger = _Sessions()
    registry, cleaned, ended_by, all_cleaned = (
        ledger.registry,
        ledger.cleaned,
        ledger.ended_by,
        ledger.all_cleaned,
    )

    async def events(request: Request) -> StreamingResponse:
        user = await ambient.resolve("session")
        body = Chunks(lambda n: f"data: {user}\n\n", before=next_in_an_hour)
        return StreamingResponse(body, media_type="text/event-stream")

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        user = await ambient.resolve("session")
        await receive()  # the request
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = f"data: {user}\n\n".encode()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await receive()  # the client's disconnect

    expires = math.inf

    def identity(scope: Any) -> Identity:
        nonlocal expires
        expires = time.time() + (0.8 if client == "reads on" else 3.0)
        return Identity("alice", expires_at=expires)

    inner = Starlette(routes=[Route("/events", events)]) if kind == "starlette" else raw
    middleware = AmbientMiddleware(inner, registry=registry, identity=identity)
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await middleware(scope, receive, send)
        except BaseException as exc:
            raised.append(exc)
            raise

    def read_one_event_and_leave(url: str) -> list[str]:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            for _ in range(100):  # bounded: the event comes in the first reads
                if b"data: alice" in received:
                    break
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream early"
                received += chunk
        # Leaving the block closed the socket mid-body: the client is gone.
        lines = received.decode().split("\r\n")  # chunked: "data: alice\n\n" in a chunk
        return [line.strip() for line in lines if line.startswith("data:")]

    received: list[str] = []
    with serve(server, app) as url:
        if client == "leaves":
            received = await anyio.to_thread.run_sync(read_one_event_and_leave, url)
        else:
            received = await _read_event_stream(url + "/events")
            ended_at = time.time()
        assert await anyio.to_thread.run_sync(all_cleaned.wait, 10)
        cleaned_at = time.time()
    assert received == ["data: alice"]
    assert cleaned == ["alice"]
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    if client == "reads on":
        assert expires <= ended_at <= expires + 1.0
        assert "identity expired" in str(ended_by[0])
    else:
        assert cleaned_at < expires
        assert "identity expired" not in str(ended_by[0])
    assert raised == []


async def _read_event_stream(url: str) -> list[str]:
    """The lines of an event stream that must end (its identity expires) within 5 s."""
    received: list[str] = []
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        with anyio.move_on_after(5) as waited:
            received.extend([line async for line in response.aiter_lines() if line])
    assert not waited.cancelled_caught, "the event stream outlived its identity's expiry"
    return received


async def test_an_event_stream_begun_past_its_token_expiry_ends_while_it_waits(
    server: str,
) -> None:
    """The handler's work outlasts the identity, then it answers with an event stream whose
    first event comes in an hour: the stream ends at once, its client sees it end with no
    event, and the request's components are cleaned once, told the response was cut at the
    expiry. Armed only by a first body message, it held the expired credential's
    connection and components until that event."""
    ledger = _Sessions()
    registry, cleaned, ended_by, all_cleaned = (
        ledger.registry,
        ledger.cleaned,
        ledger.ended_by,
        ledger.all_cleaned,
    )
    expires = math.inf

    async def in_an_hour(n: int) -> None:
        await anyio.sleep(3600)

    async def events(request: Request) -> StreamingResponse:
        user = await ambient.resolve("session")
        await anyio.sleep(max(expires - time.time(), 0) + 0.05)  # work past the expiry
        body = Chunks(lambda n: f"data: {user}\n\n", before=in_an_hour)
        return StreamingResponse(body, media_type="text/event-stream")

    def identity(scope: Any) -> Identity:
        nonlocal expires
        expires = time.time() + 0.2
        return Identity("alice", expires_at=expires)

    middleware = AmbientMiddleware(
        Starlette(routes=[Route("/events", events)]), registry=registry, identity=identity
    )
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await middleware(scope, receive, send)
        except BaseException as exc:
            raised.append(exc)
            raise

    with serve(server, app) as url:
        received = await _read_event_stream(url + "/events")
        ended_at = time.time()
        assert await anyio.to_thread.run_sync(all_cleaned.wait, 10)
    assert received == []
    assert ended_at <= expires + 2.0
    assert cleaned == ["alice"]
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])
    assert raised == []


# hypercorn on trio shields its writes: no cancellation reaches a send its client does not take.
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("held", ["a later message", "the first message"])
def test_a_stream_to_a_client_that_stopped_reading_ends_at_its_token_expiry(
    server: str, held: str
) -> None:
    """A client that stopped reading holds the stream's sends, and at the expiry the end
    of the response the middleware sends would wait for it forever, holding the expired
    credential's components and connection: the end waits at most the registry's
    ``cleanup_timeout``, then the request's components are cleaned, told of the cut. The
    body's first message, held by such a client (hypercorn waits for its write), is cut at
    the expiry too: the expiry was armed only once it went out."""
    ledger = _Sessions(cleanup_timeout=0.5)
    registry, ended_by, cleaned = ledger.registry, ledger.ended_by, ledger.all_cleaned
    expires = math.inf

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = (await ambient.resolve("session")).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if held == "a later message":
            await send({"type": "http.response.body", "body": user, "more_body": True})
        else:  # more than the client's and the server's buffers take
            await send({"type": "http.response.body", "body": user * (1 << 24), "more_body": True})
        chunk = b"x" * (1 << 20)
        for _ in range(256):  # bounded: the client's and the server's buffers fill first
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def identity(scope: Any) -> Identity:
        nonlocal expires
        expires = time.time() + 0.8
        return Identity("ann", expires_at=expires)

    with serve(server, AmbientMiddleware(app, registry=registry, identity=identity)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect((host, int(port)))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
            # The client reads no more, and stays.
            ended = cleaned.wait(0.8 + 0.5 + 5)
            cleaned_at = time.time()
    assert ended, "the response's end waited on a client that stopped reading"
    assert cleaned_at <= expires + 0.5 + 3
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])


@pytest.mark.parametrize("server", ["hypercorn", "hypercorn-trio"])
def test_an_idle_http2_stream_with_trailers_ends_when_its_token_expires(
    server: str,
) -> None:
    """A gRPC-style HTTP/2 stream (its start announces trailers) waiting for its next
    message when its identity expires ends then with the trailers it announced, and its
    client sees the stream end, not a reset."""
    ledger = _Sessions()
    registry, ended_by, cleaned = ledger.registry, ledger.ended_by, ledger.all_cleaned
    expires = math.inf

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = (await ambient.resolve("session")).encode()
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": user, "more_body": True})
        await anyio.sleep(3600)  # the next message

    def identity(scope: Any) -> Identity:
        nonlocal expires
        expires = time.time() + 0.5
        return Identity("ann", expires_at=expires)

    def exercise(url: str) -> tuple[Any, float]:
        with H2Client(url, timeout=5) as client:
            stream_id = client.get("/", {"te": "trailers"})
            stream = client.streams[stream_id]
            client.read_until(lambda: stream.ended or stream.reset_by_server, "the stream's end")
            return stream, time.time()

    with serve(server, AmbientMiddleware(app, registry=registry, identity=identity)) as url:
        stream, ended_at = exercise(url)
        assert cleaned.wait(10)
    # Told at the expiry that the client is gone; not listening, cancelled a second (the
    # grace) later.
    assert expires <= ended_at <= expires + 2.0
    assert (stream.status, stream.body, stream.ended, stream.reset_by_server) == (
        200,
        b"ann",
        True,
        False,
    )
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)


def test_a_client_hanging_up_just_after_expiry_gets_no_close_and_the_server_no_error(
    server: str,
) -> None:
    """The client closes its socket just after its identity expired, and the server hands
    the app that disconnect before the loop got to cancel the app (a busy loop, here a
    receive that blocks past the expiry): the app ends on it, and the middleware sends
    no close on the socket the client closed, which uvicorn refused by raising
    ClientDisconnected into the server."""
    from ambient.middleware.identity import Identity

    expires_at = time.time() + 1.0

    def identity(scope: dict[str, Any]) -> Identity:
        return Identity("ann", expires_at=expires_at)

    handled: list[str] = []
    raised: list[BaseException] = []
    done = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            handled.append(message["type"])
            if message["type"] == "websocket.disconnect":
                return

    middleware = AmbientMiddleware(app, registry=Registry(), identity=identity)

    async def busy_server(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await middleware(scope, receive, send)
            return

        async def late_receive() -> Any:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                # The point: past the expiry without a checkpoint, as on a busy loop.
                time.sleep(max(expires_at - time.time(), 0) + 0.2)  # noqa: ASYNC251
            return message

        try:
            await middleware(scope, late_receive, send)
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            done.set()

    with serve(server, busy_server) as url:
        with connect(url.replace("http", "ws") + "/ws", open_timeout=20):
            pass  # the client closes at once, before the expiry
        assert done.wait(10)
    assert raised == []
    # The client's own disconnect (it was cancelled before it, when the expiry cancelled
    # the app at once).
    assert handled == ["websocket.disconnect"]


def test_a_client_hanging_up_while_its_app_ends_at_expiry_gets_no_close(
    server: str,
) -> None:
    """The app, told at its identity's expiry that the client is gone, takes a moment to
    end, and the client closes the socket meanwhile: the middleware's close, sent once the
    app returned, finds the socket closed. Nothing is raised to the server, and the
    cleanups see the socket cut at the expiry. uvicorn refused the close by raising
    ClientDisconnected, which reached the server and the cleanups instead."""
    from ambient.middleware.identity import Identity

    ledger = _Sessions()
    registry, ended_by, all_cleaned = ledger.registry, ledger.ended_by, ledger.all_cleaned
    told = threading.Event()
    client_closed = threading.Event()
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await ambient.resolve("session")
        await send({"type": "websocket.accept"})
        for _ in range(100):  # bounded: the client stays silent, the expiry ends it
            if (await receive())["type"] == "websocket.disconnect":
                told.set()
                # Its own end takes until the client closed the socket.
                await anyio.to_thread.run_sync(client_closed.wait, 5, abandon_on_cancel=True)
                return

    def identity(scope: Any) -> Identity:
        return Identity("ann", expires_at=time.time() + 0.3)

    middleware = AmbientMiddleware(app, registry=registry, identity=identity)

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await middleware(scope, receive, send)
            return
        try:
            await middleware(scope, receive, send)
        except BaseException as exc:
            raised.append(exc)
            raise

    def hang_up_when_told(ws_url: str) -> bool:
        with connect(ws_url, open_timeout=20) as sock:
            if not told.wait(5):
                return False
            sock.close()  # sent, and answered by the server
        client_closed.set()
        return True

    with serve(server, watched) as url:
        assert hang_up_when_told(url.replace("http", "ws") + "/ws")
        assert all_cleaned.wait(10)
    assert raised == []
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])


@contextlib.contextmanager
def _stalled_websocket(url: str, user: str = "ann") -> Iterator[socket.socket]:
    """A websocket client of ``user`` that reads nothing past the handshake's 101, and
    stays: once its (small) receive buffer and the server's are full, the server's sends
    wait on it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        key = base64.b64encode(b"sixteen byte key").decode()
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            + f"Sec-WebSocket-Key: {key}\r\nx-user-id: {user}\r\n\r\n".encode()
        )
        assert sock.recv(12) == b"HTTP/1.1 101"
        yield sock


# hypercorn shields its writes: no cancellation reaches the app's send its client does not
# take, and the app is never cut at the expiry.
@pytest.mark.parametrize("server", ["uvicorn"])
def test_a_websocket_to_a_client_that_stopped_reading_ends_at_its_token_expiry(
    server: str,
) -> None:
    """A client that stopped reading holds the socket's sends: at the expiry the app,
    stuck in one, is cancelled, and the 4001 close the middleware sends then would wait
    for the client as long as the server keeps the connection, holding the expired
    credential's components. The close waits at most the registry's ``cleanup_timeout``,
    as the end of a streamed response does, and the components are cleaned, told of the
    cut."""
    ledger = _Sessions(cleanup_timeout=0.3)
    registry, ended_by, cleaned = ledger.registry, ledger.ended_by, ledger.all_cleaned
    expires = math.inf

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await ambient.resolve("session")
        await send({"type": "websocket.accept"})
        chunk = b"x" * (1 << 20)
        for _ in range(256):  # bounded: the client's and the server's buffers fill first
            await send({"type": "websocket.send", "bytes": chunk})

    def identity(scope: Any) -> Identity:
        nonlocal expires
        expires = time.time() + 0.5
        return Identity("ann", expires_at=expires)

    with (
        serve(server, AmbientMiddleware(app, registry=registry, identity=identity)) as url,
        _stalled_websocket(url),
    ):
        ended = cleaned.wait(0.5 + 0.25 + 0.3 + 4)
        cleaned_at = time.time()
    assert ended, "the close at the expiry waited on a client that stopped reading"
    assert cleaned_at <= expires + 0.25 + 0.3 + 2
    assert len(ended_by) == 1
    assert isinstance(ended_by[0], IncompleteResponseError)
    assert "identity expired" in str(ended_by[0])


@pytest.mark.parametrize("server", ["uvicorn"])  # hypercorn shields its writes, as above
def test_the_close_of_an_answered_error_waits_at_most_cleanup_timeout(server: str) -> None:
    """The app's sender waits on a client that stopped reading when another of its tasks
    finds no database connection free: the 1013 close the middleware sends then waited
    for that client as long as the server kept the connection (on uvicorn its ping
    timeout), the request counted against its user's limit all that time. It waits at
    most the registry's ``cleanup_timeout``."""
    ledger = _Sessions(cleanup_timeout=0.3)
    returned = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await ambient.resolve("session")
        await send({"type": "websocket.accept"})

        async def stream() -> None:
            chunk = b"x" * (1 << 20)
            for _ in range(256):  # bounded: the client's and the server's buffers fill first
                await send({"type": "websocket.send", "bytes": chunk})

        async def query() -> None:
            await anyio.sleep(0.2)  # the sender is stuck by then
            raise PoolExhaustedError("no connection for ann's run", retry_after=1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            tg.start_soon(query)

    middleware = AmbientMiddleware(app, registry=ledger.registry, identity=trusted_header())

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        try:
            await middleware(scope, receive, send)
        finally:
            if scope["type"] == "websocket":
                returned.set()

    with serve(server, outer) as url, _stalled_websocket(url):
        ended = returned.wait(0.2 + 0.3 + 4)
    assert ended, "the close of the answered error waited on a client that stopped reading"
    assert len(ledger.ended_by) == 1
    assert isinstance(ledger.ended_by[0], BaseExceptionGroup)


EXPIRING_USERS = 20


def test_twenty_sockets_expiring_one_after_another_each_end_at_their_own_expiry(
    server: str,
) -> None:
    """20 users on sockets at once, each identity expiring 50 ms after the previous one,
    behind opentelemetry-instrumentation-asgi, each message handled in a message scope
    through the hub, the clients talking all along. Each socket is closed with 4001 at its
    own user's expiry (never at another's), answers only as its own user until then, and
    handles no message after it; every span started ends, none is an error, and every
    message's scope span sits under its own connection's, with its user."""
    import asyncio
    from contextlib import aclosing

    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
    from opentelemetry.trace import StatusCode
    from websockets.asyncio.client import connect as connect_async

    from ambient.integrations.websockets import (
        ConnectionHub,
        UserWebSocketManager,
        message_scope,
    )
    from ambient.middleware.identity import Identity
    from ambient.telemetry import Telemetry, hash_id

    class Spans(SpanProcessor):
        def __init__(self) -> None:
            self.started = 0
            self.ended: list[ReadableSpan] = []
            self.lock = threading.Lock()

        def on_start(self, span: Span, parent_context: Any = None) -> None:
            with self.lock:
                self.started += 1

        def on_end(self, span: ReadableSpan) -> None:
            with self.lock:
                self.ended.append(span)

    spans = Spans()
    provider = TracerProvider()
    provider.add_span_processor(spans)
    # Late enough that every handshake is done before the first expiry on a busy machine.
    first = time.time() + 1.5
    expiry = {f"user-{n}": first + 0.05 * n for n in range(EXPIRING_USERS)}

    def identity(scope: dict[str, Any]) -> Identity | None:
        for name, value in scope["headers"]:
            if name == b"x-user-id":
                user = value.decode()
                return Identity(user, expires_at=expiry[user])
        return None

    registry = Registry(telemetry=Telemetry(tracer_provider=provider, hash_key=b"k"))
    hub = ConnectionHub()
    hub.install(registry)
    handled: dict[str, list[float]] = {user: [] for user in expiry}

    async def chat(websocket: WebSocket) -> None:
        manager = await ambient.resolve(UserWebSocketManager)
        async with (
            manager.connect(websocket) as connection,
            aclosing(websocket.iter_text()) as texts,
        ):
            async for _ in texts:
                async with message_scope():
                    user = ambient.get_current_context().user_id
                    handled[user].append(time.time())
                    await connection.send({"user": user})

    app = OpenTelemetryMiddleware(
        AmbientMiddleware(
            Starlette(routes=[WebSocketRoute("/ws", chat)]), registry=registry, identity=identity
        ),
        tracer_provider=provider,
    )

    async def talk(url: str, user: str) -> tuple[int | None, float, int]:
        replies = 0
        async with connect_async(url, additional_headers={"x-user-id": user}) as sock:
            try:
                for _ in range(1000):  # bounded: the expiry comes long before
                    await sock.send("hi")
                    assert json.loads(await sock.recv()) == {"user": user}
                    replies += 1
                    await asyncio.sleep(0.02)  # a chatty client's pace
            except ConnectionClosed as closed:
                return (closed.rcvd.code if closed.rcvd else None), time.time(), replies
        return None, time.time(), replies

    async def everyone(url: str) -> list[tuple[int | None, float, int]]:
        async with asyncio.timeout(30):
            return await asyncio.gather(*(talk(url, user) for user in expiry))

    with serve(server, app) as url:
        ends = asyncio.run(everyone(url.replace("http://", "ws://") + "/ws"))
        with anyio.from_thread.start_blocking_portal() as portal:
            portal.call(registry.aclose)
    for (user, expires), (code, closed_at, replies) in zip(expiry.items(), ends, strict=True):
        assert code == 4001, user
        assert expires - 0.05 <= closed_at <= expires + 1.0, (user, closed_at - expires)
        assert replies >= 10, user
        assert handled[user], user
        assert max(handled[user]) < expires + 0.25, (user, max(handled[user]) - expires)
    assert hub.stats().connections == 0
    assert registry.stats().open_scopes == 0
    with spans.lock:
        assert spans.started == len(spans.ended)
        ended = list(spans.ended)
    assert [s.name for s in ended if s.status.status_code is StatusCode.ERROR] == []
    by_id = {s.context.span_id: s for s in ended if s.context is not None}
    scopes = [s for s in ended if s.name == "ambient.scope"]
    connections = [s for s in scopes if s.parent and by_id[s.parent.span_id].name != s.name]
    assert len(connections) == EXPIRING_USERS
    for connection in connections:
        assert (connection.attributes or {})["ambient.cancelled"] is True
    for scope_span in scopes:
        assert scope_span.parent is not None
        parent = by_id[scope_span.parent.span_id]
        if parent.name == "ambient.scope":  # a message's, under its connection's
            user = (scope_span.attributes or {})["ambient.user_id"]
            assert user == (parent.attributes or {})["ambient.user_id"]
            assert user in {hash_id(u, b"k") for u in expiry}


# The servers whose lifespan handling the shutdown tests run under (uvicorn's "auto" and
# "on" treat a lifespan that fails differently).
lifespan_servers = pytest.mark.parametrize(
    ("server", "options"),
    [
        ("uvicorn", {}),
        ("uvicorn", {"lifespan": "on"}),
        ("hypercorn", {}),
        ("hypercorn-trio", {}),
    ],
    ids=["uvicorn", "uvicorn-lifespan-on", "hypercorn", "hypercorn-trio"],
)


@pytest.mark.parametrize("framework", [False, True], ids=["plain-lifespan", "starlette"])
@lifespan_servers
def test_a_lifespan_that_fails_while_serving_still_gets_the_registry_closed_at_shutdown(
    server: str, options: dict[str, Any], framework: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A task the app's lifespan started crashes while the server serves. Raised to the
    server, the failure left it serving and skipping its lifespan shutdown: the USER and
    APP components of the requests served after it were never closed (after Starlette's
    ``shutdown.failed``, the middleware closed the registry at once, under the requests to
    come). Now it is logged once, requests go on with their components, the server's
    shutdown closes each one once and the server hears that the app's shutdown failed."""
    caplog.set_level(logging.ERROR, logger="ambient.middleware")
    ledger = Ledger()
    app = build_crashing_lifespan(ledger, framework=framework)
    # hypercorn raises the failure the server hears out of the app's send; its asyncio
    # worker raises it again out of serve() (its trio worker drops it as it cancels).
    hypercorn_raises = contextlib.suppress(LifespanFailureError)
    with (
        hypercorn_raises if server.startswith("hypercorn") else contextlib.nullcontext(),
        serve(server, app, **options) as url,
        httpx.Client(base_url=url) as http,
    ):
        before = http.get("/", headers={"x-user-id": "ann"}).json()
        assert http.get("/crash", headers={"x-user-id": "ann"}).text == "crashed"
        after = [http.get("/", headers={"x-user-id": user}).json() for user in ("ann", "bob")]
    assert after[0] == before  # the same Memory and Pool
    assert after[1][1] == before[1] != after[1][0]  # bob's own Memory, the same Pool
    assert len(ledger.created) == 3
    assert ledger.problems() == []
    told = ledger.events
    assert [kind for kind, _ in told] == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert CRASH in told[1][1]
    logged = [r for r in caplog.records if r.name == "ambient.middleware"]
    assert [r.levelno for r in logged] == [logging.ERROR]
    assert logged[0].exc_info is not None
    assert CRASH in "".join(traceback.format_exception(logged[0].exc_info[1]))


@pytest.mark.parametrize(
    ("server", "options"),
    [
        ("uvicorn", {}),
        ("uvicorn", {"reset_contextvars": True}),
        ("hypercorn", {}),
        ("hypercorn-trio", {}),
    ],
    ids=["uvicorn", "uvicorn-reset-contextvars", "hypercorn", "hypercorn-trio"],
)
async def test_lifespan_never_runs_in_a_user_context(server: str, options: dict[str, Any]) -> None:
    """Whatever the server does with the lifespan task's context, startup and shutdown see
    no user bound, requests in between see only their own user, and shutdown still closes
    the USER components the requests made."""
    seen: dict[str, Any] = {}
    cleaned: list[str] = []
    registry = ambient.Registry()

    async def memory(user: ambient.UserRef) -> AsyncIterator[str]:
        yield user.user_id
        cleaned.append(user.user_id)

    registry.register("memory", memory, lifetime=ambient.Lifetime.USER)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        seen["startup"] = ambient.current_context_or_none()
        yield
        seen["shutdown"] = ambient.current_context_or_none()

    async def whoami(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        return JSONResponse({"user": user, "memory": await ambient.resolve("memory")})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/whoami", whoami)], lifespan=lifespan),
        registry=registry,
        identity=trusted_header(),
    )
    with serve(server, app, **options) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            for user in ("ann", "bob", "cid"):
                answer = await http.get("/whoami", headers={"x-user-id": user})
                assert answer.json() == {"user": user, "memory": user}
    assert seen == {"startup": None, "shutdown": None}
    assert sorted(cleaned) == ["ann", "bob", "cid"]


@pytest.mark.parametrize("server", SERVERS)
async def test_lifespan_state_reaches_every_users_request_through_the_middleware(
    server: str,
) -> None:
    """The app's startup yields its state (an application-wide client), which the server
    hands every request as ``scope["state"]``, and each request writes its own user and
    component into ``request.state``. 20 users x 5 requests on 4 keep-alive connections:
    every request finds the startup's client (the middleware hands the app the lifespan
    scope and each request's scope with their state, neither dropped nor replaced), and is
    bound to the user of its own header with its own component, whatever earlier requests
    on its connection wrote into their state."""
    users = [f"user-{n}" for n in range(20)]
    registry = ambient.Registry()

    class Client:
        """What the app's startup makes and every request uses."""

    class Tag:
        def __init__(self, ctx: ambient.UserExecutionContext) -> None:
            self.user = ctx.user_id
            self.request = ctx.request_id

    registry.register(Tag, Tag)
    made: list[Client] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        made.append(Client())
        yield {"client": made[0]}

    async def whoami(request: Request) -> Response:
        ctx = ambient.get_current_context()
        tag = await ambient.resolve(Tag)
        answer = {
            "user": ctx.user_id,
            "request": ctx.request_id,
            "tag": [tag.user, tag.request],
            "client": request.state.client is made[0],
        }
        request.state.user = ctx.user_id
        request.state.tag = tag
        return JSONResponse(answer)

    app = AmbientMiddleware(
        Starlette(routes=[Route("/whoami", whoami)], lifespan=lifespan),
        registry=registry,
        identity=trusted_header(),
    )
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    with serve(server, app) as url, anyio.fail_after(60):
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:

            async def user(name: str) -> None:
                for n in range(5):
                    request_id = f"{name}-r{n}"
                    response = await http.get(
                        "/whoami", headers={"x-user-id": name, "x-request-id": request_id}
                    )
                    assert response.status_code == 200, (name, response.text)
                    assert response.json() == {
                        "user": name,
                        "request": request_id,
                        "tag": [name, request_id],
                        "client": True,
                    }, name

            async with anyio.create_task_group() as tg:
                for name in users:
                    tg.start_soon(user, name)
    assert len(made) == 1


@lifespan_servers
def test_a_cleanup_failing_at_shutdown_never_skips_the_apps_own_shutdown(
    server: str, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Eight users each make a USER component; two of them fail their cleanup as the
    server shuts down. The registry is closed before the app's own shutdown, and its
    failure is logged there: raised into the app's ``receive``, it ended a Starlette
    lifespan at its ``yield``, so the app's own shutdown (closing what its startup made)
    never ran, and the server heard ``lifespan.shutdown.failed``. The app's shutdown runs,
    after every cleanup, the server hears ``lifespan.shutdown.complete``, and the failures
    are logged once, on the ``ambient.middleware`` logger."""
    caplog.set_level(logging.ERROR, logger="ambient.middleware")
    users = [f"user-{n}" for n in range(8)]
    failing = {"user-2", "user-5"}
    events: list[str] = []
    told: list[str] = []

    class Session:
        def __init__(self, user: str) -> None:
            self.user = user

        def close(self) -> None:
            events.append(f"cleaned {self.user}")
            if self.user in failing:
                raise RuntimeError(f"{self.user}'s session did not close")

    registry = ambient.Registry()
    registry.register(Session, lambda ref: Session(ref.user_id), lifetime=ambient.Lifetime.USER)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        events.append("app shutdown")

    async def whoami(request: Request) -> Response:
        session = await ambient.resolve(Session)
        return JSONResponse({"user": ambient.get_current_context().user_id, "of": session.user})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/whoami", whoami)], lifespan=lifespan),
        registry=registry,
        identity=trusted_header(),
    )

    async def server_side(scope: Any, receive: Any, send: Any) -> None:
        async def heard(message: Any) -> None:
            if scope["type"] == "lifespan":
                told.append(message["type"])
            await send(message)

        await app(scope, receive, heard)

    with serve(server, server_side, **options) as url, httpx.Client(base_url=url) as http:
        for user in users:
            answer = http.get("/whoami", headers={"x-user-id": user})
            assert answer.json() == {"user": user, "of": user}
    assert told == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events[0] == "app startup"
    assert events[-1] == "app shutdown"
    assert sorted(events[1:-1]) == sorted(f"cleaned {user}" for user in users)
    logged = [r for r in caplog.records if r.name == "ambient.middleware"]
    assert [r.getMessage() for r in logged] == ["ambient: closing the registry at shutdown failed"]
    assert logged[0].exc_info is not None
    failure = "".join(traceback.format_exception(logged[0].exc_info[1]))
    assert "user-2's session" in failure
    assert "user-5's session" in failure


async def test_bearer_tokens_reach_no_log_span_or_close_reason() -> None:
    """A websocket's bearer token (sent as its subprotocol), valid or expired, shows up in
    no log record (uvicorn's access and error logs at INFO, ambient's at DEBUG), no
    exported span, event or status, and no refusal. (At DEBUG, uvicorn's websockets
    implementation logs every handshake header, this one included.)"""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ambient.telemetry import Telemetry

    secret = "a-test-secret-of-at-least-32-bytes!"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = ambient.Registry(telemetry=Telemetry(tracer_provider=provider, span_threshold=0))
    registry.register("session", lambda ctx: ctx.user_id)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="bearer")
        await websocket.receive_text()
        await websocket.send_text(await ambient.resolve("session"))
        await websocket.close()

    app = AmbientMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", chat)]),
        registry=registry,
        identity=jwt_bearer(secret, algorithms=["HS256"], leeway=0),
    )
    now = int(time.time())
    valid = pyjwt.encode({"sub": "alice", "exp": now + 600}, secret, algorithm="HS256")
    expired = pyjwt.encode({"sub": "alice", "exp": now - 600}, secret, algorithm="HS256")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")

    keep = Keep(logging.DEBUG)
    # On each logger itself: a server started earlier in this process may have stopped
    # uvicorn's loggers from propagating to the root.
    names = {"": logging.INFO, "uvicorn": logging.INFO, "uvicorn.access": logging.INFO}
    names["ambient"] = logging.DEBUG
    loggers = {logging.getLogger(name): level for name, level in names.items()}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.addHandler(keep)
        logger.setLevel(level)

    def talk(ws_url: str) -> tuple[str, str]:
        with connect(ws_url, subprotocols=["bearer", valid], open_timeout=20) as sock:  # type: ignore[list-item]
            sock.send("hi")
            answer = str(sock.recv(timeout=10))
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, subprotocols=["bearer", expired], open_timeout=20)  # type: ignore[list-item]
        response = refused.value.response
        return answer, f"{response.status_code} {response.headers} {response.body!r}"

    try:
        # No log_config: uvicorn's records reach the root logger's handler.
        with serve("uvicorn", app, access_log=True, log_level="info", log_config=None) as url:
            answer, refusal = await anyio.to_thread.run_sync(
                talk, url.replace("http", "ws") + "/ws"
            )
    finally:
        for logger, level in saved.items():
            logger.removeHandler(keep)
            logger.setLevel(level)
    provider.force_flush()
    spans = exporter.get_finished_spans()
    exported = [
        f"{span.name} {dict(span.attributes or {})} {span.status.description} "
        f"{[(event.name, dict(event.attributes or {})) for event in span.events]}"
        for span in spans
    ]
    assert answer == "alice"
    assert any("ambient.scope" in text for text in exported)
    assert any("WebSocket /ws" in text for text in seen)  # the access log was captured
    for token in (valid, expired):
        signature = token.rsplit(".", 1)[1]
        for text in [*seen, *exported, refusal]:
            assert signature not in text, text


@pytest.mark.parametrize(
    ("server", "options"),
    [
        ("uvicorn", {"http": "h11", "loop": "asyncio"}),
        ("uvicorn", {"http": "httptools", "loop": "uvloop"}),
        ("uvicorn", {"http": "h11", "loop": "asyncio", "reset_contextvars": True}),
        ("uvicorn", {"http": "httptools", "loop": "uvloop", "reset_contextvars": True}),
        ("hypercorn", {}),
        ("hypercorn-trio", {}),
    ],
    ids=["h11", "httptools", "h11-reset", "httptools-reset", "hypercorn", "hypercorn-trio"],
)
async def test_a_request_after_a_large_body_on_one_connection_is_its_own(
    server: str, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """On one connection, in one write: alice's request with a 2 MB body, then bob's and
    carol's. Whatever context the server starts them in (a probe outside the middleware
    records it: uvicorn without reset_contextvars starts each inside a copy of the previous
    request's, whose binding has ended by then), each request's app sees only its own
    user, and a request started inside another's live binding is reported."""

    async def echo(request: Request) -> Response:
        size = len(await request.body())
        return JSONResponse(
            {
                "user": ambient.get_current_context().user_id,
                "entry": request.scope["entry"],
                "size": size,
            }
        )

    inner = AmbientMiddleware(
        Starlette(routes=[Route("/echo", echo, methods=["POST"])]),
        registry=ambient.Registry(),
        identity=trusted_header(),
    )

    live: list[bool] = []

    async def probe(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            found = _current.get()
            scope["entry"] = None if found is None else found.ctx.user_id
            live.append(_live(found) is not None)
        await inner(scope, receive, send)

    def post(user: str, body: bytes) -> bytes:
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n"
        return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body

    payload = post("alice", b"a" * 2_000_000) + post("bob", b"b") + post("carol", b"")
    warnings_seen = caplog.at_level(logging.WARNING, logger="ambient.middleware")
    with warnings_seen, serve(server, probe, **options) as url:
        answers = await anyio.to_thread.run_sync(raw_exchange, url, payload, 3)
    bodies = [json.loads(answer.partition(b"\r\n\r\n")[2]) for answer in answers]
    assert [(b["user"], b["size"]) for b in bodies] == [
        ("alice", 2_000_000),
        ("bob", 1),
        ("carol", 0),
    ]
    if options.get("reset_contextvars") or server.startswith("hypercorn"):
        assert [b["entry"] for b in bodies] == [None, None, None]
    warned = [r for r in caplog.records if "live context" in r.getMessage()]
    assert len(warned) == (1 if any(live) else 0)


@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
def test_a_request_after_a_large_body_on_one_connection_is_its_own_under_granian() -> None:
    """The same connection under granian (its own process, its own way of starting each
    request's task): alice's 2 MB body, then bob's and carol's requests in one write, then
    dan's and eve's pipelined on a second connection. Each request finds nothing live
    bound as it arrives, and its handler sees only its own user."""

    def post(user: str, body: bytes) -> bytes:
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n"
        return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body

    first = post("alice", b"a" * 2_000_000) + post("bob", b"b") + post("carol", b"")
    with serve("granian", None, target="tests.granian_entry_app:app") as url:
        answers = raw_exchange(url, first, 3) + raw_exchange(
            url, post("dan", b"") + post("eve", b"e"), 2
        )
    bodies = [json.loads(answer.partition(b"\r\n\r\n")[2]) for answer in answers]
    assert [(b["user"], b["size"]) for b in bodies] == [
        ("alice", 2_000_000),
        ("bob", 1),
        ("carol", 0),
        ("dan", 0),
        ("eve", 1),
    ]
    assert [b["entry_live"] for b in bodies] == [False] * 5


@pytest.mark.skipif(not granian_available(), reason="granian is not installed")
@pytest.mark.parametrize("framework", [False, True], ids=["plain-lifespan", "starlette"])
def test_a_lifespan_that_fails_while_serving_under_granian(
    framework: bool, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan that fails while the server serves, under granian: it went on serving
    and skipped its lifespan shutdown, and the components were never closed. The failure
    is logged once, and granian's shutdown closes each component once, then hears of it."""
    written = tmp_path / "ledger"
    monkeypatch.setenv("AMBIENT_TEST_LEDGER", str(written))
    monkeypatch.setenv("AMBIENT_TEST_FRAMEWORK", "1" if framework else "0")
    with (
        serve("granian", None, target="tests.granian_lifespan_app:app") as url,
        httpx.Client(base_url=url) as http,
    ):
        before = http.get("/", headers={"x-user-id": "ann"}).json()
        assert http.get("/crash", headers={"x-user-id": "ann"}).text == "crashed"
        after = [http.get("/", headers={"x-user-id": user}).json() for user in ("ann", "bob")]
    assert after[0] == before
    assert after[1][1] == before[1] != after[1][0]
    lines = written.read_text().splitlines()
    logged = [line for line in lines if line.startswith("logged")]
    assert len(logged) == 1
    assert logged[0].startswith("logged ERROR ")
    assert repr(CRASH) in logged[0]
    created = [line.split()[1] for line in lines if line.startswith("created")]
    cleaned = [line.split()[1] for line in lines if line.startswith("cleaned")]
    assert sorted(cleaned) == sorted(created) == ["1", "2", "3"]
    told = [line.split()[1] for line in lines if line.startswith("told")]
    assert told == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert lines[-1].startswith("told lifespan.shutdown.failed ")  # after every cleanup
    assert CRASH in lines[-1]


@pytest.mark.parametrize("running", [False, True], ids=["ended", "still-running"])
@pytest.mark.parametrize(
    "options",
    [{"http": "h11", "loop": "asyncio"}, {"http": "httptools", "loop": "uvloop"}],
    ids=["h11", "httptools"],
)
async def test_code_outside_the_middleware_never_sees_the_previous_request_s_user(
    options: dict[str, Any], running: bool
) -> None:
    """uvicorn (without reset_contextvars) starts a request that follows a large body on
    its connection inside a copy of the previous request's context. The middleware set
    that user aside for the request, then put it back: what runs outside it afterwards,
    in the same request, saw the previous user as its own: Starlette's error handler (its
    ServerErrorMiddleware is always outside) logged bob's failure as carol's, and an outer
    middleware saw alice or carol when their answers went out; ``running``: with the
    earlier requests still in their background tasks. (uvicorn closes a connection after
    an error that reached it: bob's request comes last.) The error handler sees bob's own
    context, which install() binds again there; an outer middleware sees none."""
    after: list[tuple[str, str | None]] = []
    failed: list[tuple[str, str | None]] = []
    bob_failed = threading.Event()

    def user_of(headers: Any) -> str:
        return str(dict(headers)[b"x-user-id"].decode())

    async def until_bob_failed() -> None:
        await anyio.to_thread.run_sync(bob_failed.wait, 10)

    async def echo(request: Request) -> Response:
        await request.body()
        user = ambient.get_current_context().user_id
        if user == "bob":
            msg = f"the request of {user} failed"
            raise RuntimeError(msg)
        later = BackgroundTask(until_bob_failed) if running else None
        return JSONResponse({"user": user}, background=later)

    async def on_error(request: Request, exc: Exception) -> Response:
        ctx = ambient.current_context_or_none()
        failed.append((request.headers["x-user-id"], None if ctx is None else ctx.user_id))
        bob_failed.set()
        return JSONResponse({"error": str(exc)}, status_code=500)

    app = Starlette(
        routes=[Route("/echo", echo, methods=["POST"])], exception_handlers={Exception: on_error}
    )
    install(app, registry=Registry(), identity=trusted_header())

    class Outer:
        """A pure ASGI middleware added after install(): outside the middleware."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                if scope["type"] == "http":
                    ctx = ambient.current_context_or_none()
                    after.append((user_of(scope["headers"]), None if ctx is None else ctx.user_id))

    app.add_middleware(Outer)

    def post(user: str, body: bytes) -> bytes:
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n"
        return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body

    payload = post("alice", b"a" * 2_000_000) + post("carol", b"c") + post("bob", b"")
    with serve("uvicorn", app, **options) as url:
        answers = await anyio.to_thread.run_sync(raw_exchange, url, payload, 3)
    assert [answer[9:12] for answer in answers] == [b"200", b"200", b"500"]
    assert failed == [("bob", "bob")]
    assert sorted(after) == [("alice", None), ("bob", None), ("carol", None)]


class Outside(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware placed outside AmbientMiddleware: runs before any context."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        before = ambient.current_context_or_none()
        response = await call_next(request)
        response.headers["x-outside-saw"] = "nobody" if before is None else before.user_id
        return response


async def test_a_base_http_middleware_outside_ambient_changes_nothing(server: str) -> None:
    """With a BaseHTTPMiddleware outside ambient's, 20 users at once still each get their
    own context and components, streamed bodies still see them after the first chunk, the
    outer middleware sees no context, and every request's components are cleaned once."""
    ledger = Ledger()
    outer = Starlette(
        middleware=[
            Middleware(Outside),
            Middleware(
                AmbientMiddleware, registry=build_registry(ledger), identity=trusted_header()
            ),
        ]
    )
    outer.mount("/", build_app(ledger))
    with serve(server, outer) as url:
        async with httpx.AsyncClient(base_url=url) as http:

            async def user(n: int) -> None:
                name = f"outer-{n}"
                for _ in range(3):
                    answer = await http.get("/whoami", headers={"x-user-id": name})
                    assert answer.json()["user"] == name
                    assert answer.json()["probe_user"] == name
                    assert answer.headers["x-outside-saw"] == "nobody"
                streamed = await http.get("/stream", headers={"x-user-id": name})
                assert streamed.text.splitlines()[1].startswith(f"{name} ")

            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(user, n)
    await wait_for(ledger, lambda led: led.all_cleaned())
    assert ledger.problems() == []
    assert set(ledger.created.values()) == {f"outer-{n}" for n in range(20)}


# How each socket of the test below fails after accept: the error its handler raises, what
# it does before, and the close the client gets (None: the connection drops, no 1008/1013).
_AFTER_ACCEPT: dict[str, tuple[str, int | None, str]] = {
    "busy": ("raise", 1013, "Service temporarily unavailable"),
    "refused": ("raise", 1008, "Invalid identity"),
    "closed": ("close", 1000, ""),
    "gone": ("wait", None, ""),
    "bug": ("raise", None, ""),
}


def _failing_after_accept(
    stack: str, seen: dict[str, BaseException | None]
) -> tuple[Any, threading.Condition]:
    """A Starlette or FastAPI app (under install(), or wrapped by the middleware) whose
    socket ``/fail?how=...`` fails after accept as ``_AFTER_ACCEPT`` says, with a REQUEST
    "tx" whose cleanup notes in ``seen`` the error it saw, by request id; and the
    condition notified as it does."""
    from fastapi import FastAPI

    from ambient.errors import IdentityError, PoolExhaustedError

    registry = Registry()
    done = threading.Condition()

    def tx(ctx: ambient.UserExecutionContext) -> Iterator[str]:
        error: BaseException | None = None
        try:
            yield ctx.user_id
        except Exception as exc:
            error = exc
            raise
        finally:
            with done:
                seen[str(ctx.request_id)] = error
                done.notify_all()

    registry.register("tx", tx)

    async def fail(websocket: WebSocket) -> None:
        how = websocket.query_params["how"]
        await websocket.accept()
        await ambient.resolve("tx")
        await websocket.send_text("begun")
        if how == "closed":
            await websocket.close(1000)
        elif how == "gone":
            assert (await websocket.receive())["type"] == "websocket.disconnect"
        if how == "bug":
            raise RuntimeError("a bug after accept")
        if how == "refused":
            raise IdentityError("the token was revoked since it was issued", status=401)
        raise PoolExhaustedError("no database connection free for this user", retry_after=2)

    app: Any
    if stack.startswith("fastapi"):
        app = FastAPI()
        app.add_api_websocket_route("/fail", fail)
    else:
        app = Starlette(routes=[WebSocketRoute("/fail", fail)])
    if stack.endswith("install"):
        install(app, registry=registry, identity=trusted_header())
    else:
        app = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    return app, done


@pytest.mark.parametrize("stack", ["starlette-install", "starlette", "fastapi-install"])
async def test_an_ambient_error_after_accept_closes_the_socket_with_its_code(
    server: str, stack: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler raises, once its socket was accepted, an ambient error that has an answer:
    the client gets a close with 1013 (no database connection free: try again later) or
    1008 and the problem's title, where it used to see the connection drop as after a
    crash; the server logs no crash, and the socket's cleanups see the error. A socket the
    handler closed itself, or whose client went away, gets nothing more; a bug still
    reaches the server."""
    options: dict[str, Any] = (
        {"log_config": None}
        if server == "uvicorn"
        else {"errorlog": logging.getLogger("hypercorn.error")}
    )
    await _fail_after_accept(server, stack, caplog, options)


# The legacy implementation, and the websockets module it is built on, are deprecated.
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:websockets")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:uvicorn")
@pytest.mark.parametrize("ws", ["wsproto", "websockets"])
async def test_an_ambient_error_after_accept_under_uvicorns_other_websocket_implementations(
    ws: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same under uvicorn's wsproto and legacy websockets implementations; the legacy
    one raises for a close sent once the client's disconnect was received."""
    await _fail_after_accept("uvicorn", "starlette", caplog, {"log_config": None, "ws": ws})


async def _fail_after_accept(
    server: str, stack: str, caplog: pytest.LogCaptureFixture, options: dict[str, Any]
) -> None:
    seen: dict[str, BaseException | None] = {}
    app, done = _failing_after_accept(stack, seen)
    caplog.set_level(logging.ERROR)

    def talk(url: str, how: str) -> tuple[int | None, str]:
        headers = {"x-user-id": "ann", "x-request-id": f"socket.{how}"}
        with connect(f"{url}/fail?how={how}", additional_headers=headers) as client:
            assert client.recv(timeout=20) == "begun"
            if how == "gone":
                client.close()
            with contextlib.suppress(ConnectionClosed):
                client.recv(timeout=20)  # until the server closes it
            closed = client.protocol.close_rcvd
        with done:  # the close goes out once the cleanups ran; a bug's close before
            assert done.wait_for(lambda: f"socket.{how}" in seen, timeout=20)
        return (closed.code, closed.reason) if closed is not None else (None, "")

    with serve(server, app, **options) as url:
        ws_base = url.replace("http://", "ws://")
        for how, (_, code, reason) in _AFTER_ACCEPT.items():
            got_code, got_reason = await anyio.to_thread.run_sync(talk, ws_base, how)
            if code in (1008, 1013):
                assert (got_code, got_reason) == (code, reason), how
            elif how == "bug":
                assert got_code not in (1000, 1008, 1013), how
            elif how == "closed":
                assert (got_code, got_reason) == (1000, ""), how
    crashes = [
        record
        for record in caplog.records
        if record.name in ("uvicorn.error", "hypercorn.error") and record.exc_info
    ]
    from ambient.errors import IdentityError, PoolExhaustedError

    assert {how: type(error) for how, error in seen.items()} == {
        "socket.busy": PoolExhaustedError,
        "socket.refused": IdentityError,
        "socket.closed": PoolExhaustedError,
        "socket.gone": PoolExhaustedError,
        "socket.bug": RuntimeError,
    }
    assert [str(record.exc_info[1]) for record in crashes if record.exc_info] == [
        "a bug after accept"
    ]


class Poller:
    """A REQUEST component that runs a task of its own while the request lasts."""


async def _read_one_response(sock: socket.socket) -> bytes:
    """Read one whole HTTP/1.1 response from ``sock`` (in a worker thread); what came if the
    server closed the connection first."""

    def read() -> bytes:
        data = b""
        while not _complete(data, 1):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    return await anyio.to_thread.run_sync(read)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio raises no cancellation unasked
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_a_cleanup_raising_a_cancellation_nobody_asked_for_is_a_cleanup_failure(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cleanup that cancels a task of its own and awaits it without suppressing its
    CancelledError (a common slip) raises a cancellation while nothing cancels the request.
    That is the cleanup's failure, logged and counted after the response as any other. It
    reached the server instead, uncounted: uvicorn then closed the keep-alive connection,
    and the next request on it (another user's, behind a gateway) got no answer."""
    registry = Registry()

    async def poller() -> AsyncIterator[Poller]:
        task = asyncio.ensure_future(asyncio.Event().wait())
        yield Poller()
        task.cancel()
        await task  # the slip: the task's CancelledError comes out of the cleanup

    registry.register(Poller, poller)

    async def whoami(request: Request) -> Response:
        await ambient.resolve(Poller)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    middleware = AmbientMiddleware(
        Starlette(routes=[Route("/", whoami)]), registry=registry, identity=trusted_header()
    )
    reached: list[BaseException] = []
    ended = threading.Semaphore(0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # What the server gets from the middleware.
        try:
            await middleware(scope, receive, send)
        except BaseException as exc:
            reached.append(exc)
            raise
        finally:
            if scope["type"] == "http":
                ended.release()

    answers: list[bytes] = []
    with serve(server, app, lifespan="off") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            for user in ("alice", "bob"):
                sock.sendall(f"GET / HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n\r\n".encode())
                answers.append(await _read_one_response(sock))
                assert answers[-1], f"the connection was closed before {user}'s answer"
                # The request's call has returned (or raised): its cleanups are done.
                assert await anyio.to_thread.run_sync(ended.acquire, True, 10)
    assert reached == []
    assert [answer.partition(b"\r\n\r\n")[2] for answer in answers] == [
        b'{"user":"alice"}',
        b'{"user":"bob"}',
    ]
    assert registry.stats().cleanup_failures == 2
    failed = [r for r in caplog.records if r.name == "ambient" and "cleanup of" in r.getMessage()]
    assert len(failed) == 2, [r.getMessage() for r in failed]
    await registry.aclose()


class Connection:
    """A REQUEST component whose cleanup takes a while (a connection going back to its
    pool, its transaction rolled back)."""


async def test_users_over_their_limit_get_429_with_retry_after_and_no_one_else_does(
    server: str,
) -> None:
    """Ten users with ``max_concurrent_per_user=2``, each with two requests held inside the
    app: a third request of each user is refused with a 429 problem carrying
    ``Retry-After`` and its request id, without reaching the app, while the twenty held
    requests are answered afterwards, each naming its own user, and every user's next
    request is served: no slot stays counted."""
    users = [f"user-{n}" for n in range(10)]
    lock = threading.Lock()
    inside: list[str] = []
    all_in, gate = threading.Event(), threading.Event()

    async def held(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        with lock:
            inside.append(user)
            if len(inside) == 2 * len(users):
                all_in.set()
        await anyio.to_thread.run_sync(gate.wait, 20)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", held)]),
        registry=Registry(),
        identity=trusted_header(),
        max_concurrent_per_user=2,
    )
    answers: dict[str, list[httpx.Response]] = {user: [] for user in users}
    with serve(server, app, lifespan="off") as url:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

            async def call(user: str) -> None:
                answers[user].append(await http.get("/", headers={"x-user-id": user}))

            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(call, user)
                    tg.start_soon(call, user)
                try:
                    assert await anyio.to_thread.run_sync(all_in.wait, 20)
                    for user in users:
                        refused = await http.get(
                            "/", headers={"x-user-id": user, "x-request-id": f"over-{user}"}
                        )
                        assert refused.status_code == 429, refused.text
                        assert refused.headers["retry-after"] == "1"
                        assert refused.headers["x-request-id"] == f"over-{user}"
                        assert refused.headers["content-type"] == "application/problem+json"
                        problem = refused.json()
                        assert problem["status"] == 429
                        assert problem["title"]
                        assert problem["detail"]
                finally:
                    gate.set()  # the held requests answer now (or the test fails at once)
            again = {user: await http.get("/", headers={"x-user-id": user}) for user in users}
    assert sorted(inside) == sorted(users * 3)  # the refused ones never reached the app
    for user in users:
        assert [a.status_code for a in answers[user]] == [200, 200]
        assert [a.json()["user"] for a in answers[user]] == [user, user]
        assert again[user].status_code == 200
        assert again[user].json() == {"user": user}
    assert app._active == {}


async def test_a_request_whose_answer_went_out_no_longer_counts_while_it_cleans_up(
    server: str,
) -> None:
    """With ``max_concurrent_per_user=1``, a client that waits for each answer before its
    next request is never refused: a request whose app has returned is no longer in
    flight. Its slot was held until its cleanups ended, so a connection slow to go back
    to its pool had the user's next request refused with 429 (half of a sequential
    client's requests, with a cleanup of a millisecond)."""
    registry = Registry()
    events: dict[str, anyio.Event] = {}

    def answered() -> anyio.Event:
        # Made on the server's loop, by whichever of its requests comes first.
        return events.setdefault("next answered", anyio.Event())

    async def connection() -> AsyncIterator[Connection]:
        yield Connection()
        with anyio.fail_after(5):
            await answered().wait()

    registry.register(Connection, connection)

    async def first(request: Request) -> Response:
        await ambient.resolve(Connection)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    async def then(request: Request) -> Response:
        answered().set()
        return JSONResponse({"user": ambient.get_current_context().user_id})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/first", first), Route("/then", then)]),
        registry=registry,
        identity=trusted_header(),
        max_concurrent_per_user=1,
    )
    with serve(server, app, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            one = await http.get("/first", headers={"x-user-id": "alice"})
            # The first request's answer is in; its connection is still going back.
            two = await http.get("/then", headers={"x-user-id": "alice"})
    assert (one.status_code, two.status_code) == (200, 200), two.text
    assert registry.stats().cleanup_failures == 0
    assert app._active == {}
