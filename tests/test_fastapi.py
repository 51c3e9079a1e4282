"""FastAPI (and Starlette) integration: dependencies, threads, yield dependencies, errors.

The 50-user run through a real uvicorn server is in ``test_frameworks.py``; these tests
pin the behaviours one at a time, in process.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import logging
import re
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

import ambient
from ambient import Observer, Registry, UserExecutionContext, bind_context
from ambient.errors import (
    AmbientError,
    IdentityError,
    InvalidContextError,
    PoolExhaustedError,
    ResolutionError,
    TooManyRequestsError,
)
from ambient.integrations import starlette as starlette_integration
from ambient.integrations.fastapi import (
    CurrentContext,
    Resolve,
    ambient_error_handler,
    install,
    problem_response,
)
from ambient.middleware import trusted_header
from ambient.middleware._problem import Problem
from tests.documented import documented_code
from tests.frameworks.common import Ledger, Memory, Probe, Work, build_registry


def client(app: Any, *, raise_errors: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(
        app=app, client=("127.0.0.1", 50000), raise_app_exceptions=raise_errors
    )
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


ALICE = {"x-user-id": "alice"}


class Unregistered:
    """A key nobody registered."""


async def websocket_exchange(
    app: Any, path: str, headers: dict[str, str], query: bytes = b""
) -> list[Any]:
    """Open a websocket on ``app`` in process (the client connects, then waits) and return
    what the app sent until it closed."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
    }
    sent: list[Any] = []
    closed = anyio.Event()
    connected = False

    async def receive() -> dict[str, Any]:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            closed.set()

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


def make_app(**options: Any) -> tuple[FastAPI, Registry, Ledger]:
    registry, ledger = build_registry()
    app = FastAPI()
    install(app, registry=registry, identity=trusted_header(), **options)
    return app, registry, ledger


def assert_problem(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == type_
    assert set(body) == {"type", "title", "status", "detail"}
    return body


async def test_the_docs_and_a_health_check_are_served_without_identity() -> None:
    """FastAPI's ``/docs`` and ``/openapi.json`` and a health check, listed in
    ``anonymous_paths``, answer a caller without credentials; the API itself still 401s."""
    app, registry, ledger = make_app(anonymous_paths=["/docs", "/openapi.json", "/healthz"])

    @app.get("/healthz")
    async def healthz(ctx: CurrentContext) -> dict[str, Any]:
        await ambient.resolve(Memory)  # a USER component, cleaned with the request
        return {"anonymous": ctx.metadata.get("anonymous") is True}

    @app.get("/me")
    async def me(ctx: CurrentContext) -> dict[str, str]:
        await ambient.resolve(Memory)
        return {"user": ctx.user_id}

    async with client(app) as http:
        assert (await http.get("/healthz")).json() == {"anonymous": True}
        assert "/me" in (await http.get("/openapi.json")).json()["paths"]
        assert (await http.get("/docs")).status_code == 200
        assert_problem(await http.get("/me"), 401, "urn:ambient:problem:unauthenticated")
        assert (await http.get("/me", headers=ALICE)).json() == {"user": "alice"}
    assert registry.stats().live_users == 1  # alice's, not the anonymous callers'
    await registry.aclose()
    assert ledger.problems() == []


class TestDependencies:
    async def test_current_context_and_resolve_in_an_async_endpoint(self) -> None:
        """The endpoint gets the bound context and the request's own components."""
        app, registry, ledger = make_app()
        seen: list[Any] = []

        @app.get("/")
        async def home(
            ctx: CurrentContext,
            probe: Annotated[Probe, Resolve(Probe)],
            memory: Memory = Resolve(Memory),  # noqa: B008 - FastAPI's default-value style
        ) -> dict[str, str]:
            seen.append((ctx, ambient.get_current_context(), probe, await ambient.resolve(Probe)))
            return {"user": ctx.user_id, "memory_user": memory.user_id}

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert response.json() == {"user": "alice", "memory_user": "alice"}
        ((ctx, bound, probe, again),) = seen
        assert ctx is bound
        assert probe is again
        assert probe.closed
        await registry.aclose()
        assert ledger.problems() == []

    async def test_a_resolved_component_can_be_replaced_with_dependency_overrides(self) -> None:
        """``Resolve(key)`` gives the same dependency function for one key every time, so a
        test replaces it as any FastAPI dependency (each call made a new function, and an
        override of one never matched the route's). The function is named after its key, as
        a traceback or a profile shows it."""
        app, registry, _ = make_app()

        @app.get("/")
        async def home(probe: Annotated[Probe, Resolve(Probe)]) -> dict[str, str]:
            return {"probe": type(probe).__name__}

        class FakeProbe:
            pass

        assert Resolve(Probe).dependency is Resolve(Probe).dependency
        assert Resolve(Probe).dependency is not Resolve(Memory).dependency
        assert Resolve(Probe).dependency.__name__ == "resolve_Probe"
        assert Resolve("engine").dependency.__qualname__ == "resolve_'engine'"
        async with client(app) as http:
            assert (await http.get("/", headers=ALICE)).json() == {"probe": "Probe"}
            app.dependency_overrides[Resolve(Probe).dependency] = FakeProbe
            assert (await http.get("/", headers=ALICE)).json() == {"probe": "FakeProbe"}
            app.dependency_overrides.clear()
            assert (await http.get("/", headers=ALICE)).json() == {"probe": "Probe"}
        await registry.aclose()

    def test_resolve_keeps_nothing_once_nothing_uses_its_dependency(self) -> None:
        """``Resolve(key)`` keeps a key's dependency function only while something (a route)
        holds it: made for keys created at run time (a key per plugin, per tenant's
        model), the functions and their keys go once nothing uses them, instead of living
        as long as the process."""

        class Plugin:
            pass

        dependency = Resolve(Plugin).dependency
        assert Resolve(Plugin).dependency is dependency  # while it is held
        function, key = weakref.ref(dependency), weakref.ref(Plugin)
        del dependency, Plugin
        gc.collect()
        assert (function(), key()) == (None, None)

    @pytest.mark.parametrize("exits", ["request", "function"])
    async def test_every_kind_of_dependency_sees_one_context_and_one_scope(
        self, exits: Literal["request", "function"]
    ) -> None:
        """async/sync x plain/yield dependencies: one context object, the Probe created once
        (first in a sync dependency, in a worker thread), and the exit halves of yield
        dependencies run before the scope's cleanup, with the context still bound, whether
        they exit after the response (``Depends(scope="request")``, the default) or as the
        endpoint returns (``scope="function"``)."""
        if exits == "function" and "scope" not in inspect.signature(Depends).parameters:
            pytest.skip("Depends(scope=...) came with FastAPI 0.121")
        app, registry, ledger = make_app()
        seen: dict[str, tuple[UserExecutionContext, Probe]] = {}

        def look(where: str) -> None:
            seen[where] = (ambient.get_current_context(), ambient.resolve_sync(Probe))

        loop_thread = threading.get_ident()
        first_use: list[tuple[int, bool]] = []

        def sync_plain() -> None:
            probes_before = [kind for kind, _ in ledger.created.values()].count("probe")
            first_use.append((probes_before, threading.get_ident() != loop_thread))
            look("sync plain")

        async def async_plain(_: None = Depends(sync_plain)) -> None:
            look("async plain")

        def sync_yield() -> Iterator[None]:
            look("sync yield")
            yield
            probe = seen["sync yield"][1]
            assert not probe.closed
            look("sync yield exit")

        async def async_yield() -> AsyncIterator[None]:
            look("async yield")
            yield
            assert not seen["async yield"][1].closed
            look("async yield exit")

        @app.get("/")
        def endpoint(
            # FastAPI solves dependencies in parameter order: the sync dependency under
            # async_plain makes the first resolution, in a worker thread.
            _a: None = Depends(async_plain),
            *,
            ctx: CurrentContext,
            probe: Annotated[Probe, Resolve(Probe)],
            _b: None = Depends(sync_yield, scope=exits),
            _c: None = Depends(async_yield, scope=exits),
        ) -> dict[str, int]:
            look("endpoint (threadpool)")
            assert probe is ambient.resolve_sync(Probe)
            return {"probe": probe.number}

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert response.status_code == 200
        assert first_use == [(0, True)]
        assert set(seen) == {
            "sync plain",
            "async plain",
            "sync yield",
            "sync yield exit",
            "async yield",
            "async yield exit",
            "endpoint (threadpool)",
        }
        contexts = {id(ctx) for ctx, _ in seen.values()}
        probes = {probe.number for _, probe in seen.values()}
        assert len(contexts) == 1
        assert probes == {response.json()["probe"]}
        assert [kind for kind, _ in ledger.created.values()].count("probe") == 1
        await registry.aclose()
        assert ledger.problems() == []

    async def test_a_sync_endpoint_resolves_in_the_threadpool(self) -> None:
        """A plain ``def`` endpoint runs in a worker thread with the request's scope."""
        app, _, _ = make_app()

        @app.get("/")
        def endpoint(ctx: CurrentContext) -> dict[str, Any]:
            probe = ambient.resolve_sync(Probe)
            return {"user": ctx.user_id, "probe_user": probe.user_id}

        async with client(app) as http:
            answers = [
                (await http.get("/", headers={"x-user-id": f"user-{n}"})).json() for n in range(5)
            ]
        assert answers == [{"user": f"user-{n}", "probe_user": f"user-{n}"} for n in range(5)]

    async def test_background_tasks_and_streaming_bodies_still_see_the_scope(self) -> None:
        """The scope closes when the app's call returns: after the streamed body and after
        BackgroundTasks, which both still resolve the request's own Probe."""
        app, _, ledger = make_app()
        events: list[tuple[str, int, bool]] = []

        async def later(number: int) -> None:
            probe = await ambient.resolve(Probe)
            events.append(("background", probe.number, probe.closed))

        @app.get("/background")
        async def background(
            tasks: BackgroundTasks, probe: Annotated[Probe, Resolve(Probe)]
        ) -> dict[str, int]:
            tasks.add_task(later, probe.number)
            return {"probe": probe.number}

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            async def body() -> AsyncIterator[bytes]:
                yield b"first "
                probe = await ambient.resolve(Probe)
                events.append(("stream", probe.number, probe.closed))
                yield str(probe.number).encode()

            return StreamingResponse(body())

        async with client(app) as http:
            first = await http.get("/background", headers=ALICE)
            second = await http.get("/stream", headers=ALICE)
        streamed = int(second.text.split()[1])
        assert events == [
            ("background", first.json()["probe"], False),
            ("stream", streamed, False),
        ]
        assert ledger.open_probes() == 0

    async def test_a_sync_stream_acting_for_another_user_stays_that_user_when_wrapped(
        self,
    ) -> None:
        """Starlette runs each step of a sync streaming body in a worker thread, with a
        fresh copy of the request's context: a binding the body makes (an admin acting
        for bob) is gone after its first yield, and the rest of the stream runs as the
        admin. Wrapped with ``ambient.wrap``, the body's steps share one copy of the
        context: every chunk is bob's."""
        app, _, _ = make_app()

        def body() -> Iterator[bytes]:
            ctx = UserExecutionContext.create("bob")
            with bind_context(ctx, allow_switch=True):
                for _ in range(3):
                    yield f"{ambient.get_current_context().user_id} ".encode()

        @app.get("/plain")
        async def plain() -> StreamingResponse:
            return StreamingResponse(body())

        @app.get("/wrapped")
        async def wrapped() -> StreamingResponse:
            return StreamingResponse(ambient.wrap(body)())

        async with client(app) as http:
            unwrapped = await http.get("/plain", headers=ALICE)
            rewrapped = await http.get("/wrapped", headers=ALICE)
        assert unwrapped.text.split() == ["bob", "alice", "alice"]
        assert rewrapped.text.split() == ["bob", "bob", "bob"]

    async def test_a_websocket_endpoint_gets_the_context(self) -> None:
        """CurrentContext and Resolve work in websocket endpoints too."""
        app, _, _ = make_app()

        @app.websocket("/ws")
        async def socket(
            websocket: WebSocket, ctx: CurrentContext, probe: Annotated[Probe, Resolve(Probe)]
        ) -> None:
            await websocket.accept()
            await websocket.send_json({"user": ctx.user_id, "probe_user": probe.user_id})
            await websocket.close()

        sent = await websocket_exchange(app, "/ws", ALICE)
        assert (sent[0]["type"], sent[0]["subprotocol"]) == ("websocket.accept", None)
        assert [name for name, _ in sent[0]["headers"]] == [b"x-request-id"]
        assert json.loads(sent[1]["text"]) == {"user": "alice", "probe_user": "alice"}
        assert sent[2]["type"] == "websocket.close"

    async def test_resolving_an_unknown_key_is_a_500_naming_what_is_registered(self) -> None:
        """ResolutionError carries no HTTP status: it is a bug, and propagates."""
        app, _, _ = make_app()

        @app.get("/")
        async def endpoint(thing: Annotated[Unregistered, Resolve(Unregistered)]) -> None:
            raise AssertionError

        async with client(app) as http:
            with pytest.raises(ResolutionError, match="registered: Memory, Probe, Stats"):
                await http.get("/", headers=ALICE)


class TestErrors:
    @pytest.mark.parametrize(
        ("error", "status", "type_", "retry_after"),
        [
            (
                PoolExhaustedError("no connection within 0.5 s", retry_after=2.5),
                503,
                "urn:ambient:problem:pool-exhausted",
                "3",
            ),
            (
                TooManyRequestsError("slow down", retry_after=1),
                429,
                "urn:ambient:problem:too-many-requests",
                "1",
            ),
            (
                IdentityError("the token was revoked", status=401),
                401,
                "urn:ambient:problem:identity",
                None,
            ),
            (
                InvalidContextError("thread_id", "too long"),
                400,
                "urn:ambient:problem:invalid-context",
                None,
            ),
        ],
    )
    async def test_an_ambient_error_with_a_status_is_answered_as_problem_json(
        self, error: Exception, status: int, type_: str, retry_after: str | None
    ) -> None:
        """Raised in an endpoint (behind ServerErrorMiddleware, which would make it a bare
        500), it becomes the middleware's own problem+json answer; the request's components
        are still cleaned."""
        app, _, ledger = make_app()

        @app.get("/")
        async def endpoint(probe: Annotated[Probe, Resolve(Probe)]) -> None:
            raise error

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        body = assert_problem(response, status, type_)
        # A refusal of the client's request says what was wrong with it (an invalid
        # context its field and reason, never the value it shows); the server's failure or
        # overload says only what any client may hear.
        assert isinstance(error, AmbientError)
        if isinstance(error, InvalidContextError):
            said = f"{error.field} is invalid: {error.reason}"
        else:
            said = str(error) if status < 429 else error.client_detail
        assert body["detail"] == said
        assert response.headers.get("retry-after") == retry_after
        assert response.headers["x-request-id"]
        assert ledger.open_probes() == 0
        assert len(ledger.created) == 1

    async def test_an_error_is_answered_inside_the_apps_own_middleware(self) -> None:
        """Middleware the app added before install() runs inside AmbientMiddleware: the
        exception handler answers an ambient error innermost, so that middleware sees the
        503 go by (and stamps it), and its own catch-all, which makes any exception that
        reaches it a 500, never meets the error."""
        registry, ledger = build_registry()
        app = FastAPI()

        class StampAndCatchAll:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await self.app(scope, receive, send)
                    return

                async def stamped(message: Any) -> None:
                    if message["type"] == "http.response.start":
                        headers = [*message.get("headers", []), (b"x-stamp", b"1")]
                        message = {**message, "headers": headers}
                    await send(message)

                try:
                    await self.app(scope, receive, stamped)
                except Exception:  # the catch-all under test
                    await stamped({"type": "http.response.start", "status": 500})
                    await send({"type": "http.response.body", "body": b"caught"})

        app.add_middleware(StampAndCatchAll)
        install(app, registry=registry, identity=trusted_header())

        @app.get("/")
        async def endpoint(probe: Annotated[Probe, Resolve(Probe)]) -> None:
            raise PoolExhaustedError("no connection within 0.5 s", retry_after=1)

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert_problem(response, 503, "urn:ambient:problem:pool-exhausted")
        assert response.headers["x-stamp"] == "1"
        assert response.headers["retry-after"] == "1"
        assert ledger.open_probes() == 0
        await registry.aclose()

    @pytest.mark.parametrize("framework", ["fastapi", "starlette"])
    @pytest.mark.parametrize(
        "error",
        [
            PoolExhaustedError("no connection within 0.5 s", retry_after=1),
            TooManyRequestsError("slow down"),
            IdentityError("the token was revoked", status=401),
        ],
    )
    async def test_an_error_the_handler_answers_rolls_the_request_back(
        self, framework: str, error: AmbientError
    ) -> None:
        """install()'s handler answers inside the app, so the middleware saw a normal
        return and closed the scope as a success: the request's Work committed its first
        half. Now the error is thrown into the cleanup, as when the middleware answers it;
        a request that succeeds still commits."""
        registry, ledger = build_registry()

        async def transfer(request: Request) -> Response:
            await ambient.resolve(Work)
            if request.query_params.get("fail"):
                raise error
            return JSONResponse({"ok": True})

        if framework == "fastapi":
            app: Any = FastAPI()
            app.add_route("/transfer", transfer)
            install(app, registry=registry, identity=trusted_header())
        else:
            app = Starlette(routes=[Route("/transfer", transfer)])
            starlette_integration.install(app, registry=registry, identity=trusted_header())
        async with client(app) as http:
            failed = await http.get("/transfer?fail=1", headers={**ALICE, "x-request-id": "failed"})
            done = await http.get("/transfer", headers={**ALICE, "x-request-id": "done"})
        assert failed.status_code == error.http_status
        assert done.status_code == 200
        assert ledger.work == {"failed": "rollback", "done": "commit"}
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("framework", ["fastapi", "starlette"])
    async def test_an_ambient_error_in_a_websocket_endpoint_closes_it_and_rolls_back(
        self, framework: str
    ) -> None:
        """install()'s handler leaves a websocket's ambient error to the middleware, which
        closes the accepted socket with 1013 and the problem's title, and closes the scope
        with the error (the Work rolls back). Starlette ignores what a handler returns for
        a websocket: answered there as an HTTP error, the error was swallowed, the socket
        was left without a close and the request's Work committed."""
        registry, ledger = build_registry()

        async def busy(websocket: WebSocket) -> None:
            await ambient.resolve(Work)
            await websocket.accept()
            raise PoolExhaustedError("no connection within 0.5 s", retry_after=1)

        if framework == "fastapi":
            app: Any = FastAPI()
            app.add_api_websocket_route("/ws", busy)
            install(app, registry=registry, identity=trusted_header())
        else:
            app = Starlette(routes=[WebSocketRoute("/ws", busy)])
            starlette_integration.install(app, registry=registry, identity=trusted_header())
        sent = await websocket_exchange(app, "/ws", {**ALICE, "x-request-id": "ws-1"})
        assert [message["type"] for message in sent] == ["websocket.accept", "websocket.close"]
        assert (sent[1]["code"], sent[1]["reason"]) == (1013, "Service temporarily unavailable")
        assert ledger.work == {"ws-1": "rollback"}
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("framework", ["fastapi", "starlette"])
    async def test_a_401_the_handler_answers_carries_the_resolvers_challenge(
        self, framework: str
    ) -> None:
        """An IdentityError(401) raised in an endpoint (a token revoked since it was issued)
        is answered by install()'s handler: that 401 went without WWW-Authenticate, which
        the middleware adds when it answers the same error itself. It now carries the
        resolver's challenge; an error's own challenge is kept, and a 400 gets none."""
        import jwt as pyjwt

        from ambient.middleware.identity import jwt_bearer

        secret = "a-test-secret-of-at-least-32-bytes"
        errors = {
            "revoked": IdentityError("the token was revoked", status=401),
            "basic": IdentityError("sign in again", status=401, challenge='Basic realm="a"'),
            "malformed": IdentityError("the run id is malformed", status=400),
        }

        async def check(request: Request) -> Response:
            raise errors[request.path_params["case"]]

        identity = jwt_bearer(secret, algorithms=["HS256"])
        registry, _ = build_registry()
        if framework == "fastapi":
            app: Any = FastAPI()
            app.add_route("/{case}", check)
            install(app, registry=registry, identity=identity)
        else:
            app = Starlette(routes=[Route("/{case}", check)])
            starlette_integration.install(app, registry=registry, identity=identity)
        token = pyjwt.encode({"sub": "alice", "exp": 4_000_000_000}, secret, algorithm="HS256")
        headers = {"authorization": f"Bearer {token}"}
        async with client(app) as http:
            answers = {case: await http.get(f"/{case}", headers=headers) for case in errors}
        assert_problem(answers["revoked"], 401, "urn:ambient:problem:identity")
        assert answers["revoked"].headers.get_list("www-authenticate") == ["Bearer"]
        assert answers["basic"].headers.get_list("www-authenticate") == ['Basic realm="a"']
        assert_problem(answers["malformed"], 400, "urn:ambient:problem:identity")
        assert "www-authenticate" not in answers["malformed"].headers
        assert registry.stats().open_scopes == 0

    async def test_pool_exhaustion_in_a_task_group_is_503(self) -> None:
        """An endpoint that runs its queries in a task group: the PoolExhaustedError comes
        wrapped in an ExceptionGroup, which was a bare 500 (``gather`` gave 503)."""
        app, _, ledger = make_app()

        async def query(n: int) -> None:
            await ambient.resolve(Work)
            raise PoolExhaustedError("no connection within 0.5 s", retry_after=2)

        @app.get("/")
        async def endpoint() -> None:
            async with anyio.create_task_group() as tg:
                for n in range(2):
                    tg.start_soon(query, n)

        async with client(app) as http:
            response = await http.get("/", headers={**ALICE, "x-request-id": "grouped"})
        assert_problem(response, 503, "urn:ambient:problem:pool-exhausted")
        assert response.headers["retry-after"] == "2"
        assert ledger.work == {"grouped": "rollback"}

    async def test_the_body_is_the_middlewares_serializer(self) -> None:
        """One serializer: the handler's response equals Problem.from_error's."""
        error = PoolExhaustedError("busy", retry_after=4)
        response = problem_response(error)
        problem = Problem.from_error(error)
        assert response.body == problem.body()
        assert response.status_code == problem.status
        assert response.headers["retry-after"] == "4"
        assert json.loads(response.body)["title"] == PoolExhaustedError.title

    async def test_a_status_that_cannot_be_read_is_answered_as_the_middleware_does(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An error whose ``http_status`` property raises is answered with a logged 500,
        as the middleware answers it, not with the property's error."""

        class TenantError(AmbientError):
            @property
            def http_status(self) -> int:  # type: ignore[override]
                raise LookupError("no status for this tenant")

        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            response = problem_response(TenantError("x"))
        assert response.status_code == 500
        assert json.loads(response.body)["detail"] == AmbientError.client_detail
        assert "the http_status of a TenantError cannot be answered" in caplog.text

    async def test_an_error_without_a_status_is_not_an_answer(self) -> None:
        """problem_response refuses errors that are bugs; they stay 500s."""
        with pytest.raises(ValueError, match="carries no HTTP status"):
            problem_response(ResolutionError("nope"))
        app, _, ledger = make_app()

        @app.get("/")
        async def endpoint(probe: Annotated[Probe, Resolve(Probe)]) -> None:
            raise ResolutionError("a bug")

        async with client(app, raise_errors=False) as http:
            response = await http.get("/", headers=ALICE)
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("text/plain")
        assert ledger.open_probes() == 0

    async def test_the_middleware_refuses_before_any_endpoint_runs(self) -> None:
        """No identity: 401; over max_concurrent_per_user: 429 (install passes options on)."""
        app, _, ledger = make_app(max_concurrent_per_user=1)
        inside = anyio.Event()
        release = anyio.Event()

        @app.get("/")
        async def endpoint() -> None:
            inside.set()
            await release.wait()

        with anyio.fail_after(10):
            async with client(app) as http, anyio.create_task_group() as tg:
                assert_problem(await http.get("/"), 401, "urn:ambient:problem:unauthenticated")
                tg.start_soon(functools.partial(http.get, "/", headers=ALICE))
                await inside.wait()
                second = await http.get("/", headers=ALICE)
                release.set()
        assert_problem(second, 429, "urn:ambient:problem:too-many-requests")
        assert ledger.created == {}


class ScopeCounter(Observer):
    """Counts the scopes opened for the requests."""

    def __init__(self) -> None:
        self.opened = 0

    def scope_opened(self, scope: ambient.Scope) -> None:
        self.opened += 1


class TestDocumentedSetups:
    async def test_the_readmes_middleware_example_answers_503_with_retry_after(self) -> None:
        """The README's example, run as written: it wrapped the Starlette app in
        AmbientMiddleware, and the 503 promised right below it was Starlette's bare 500."""
        registry, ledger = build_registry()

        async def busy(request: Request) -> Response:
            await ambient.resolve(Work)
            raise PoolExhaustedError("no connection within 0.5 s", retry_after=2)

        namespace: dict[str, Any] = {"routes": [Route("/busy", busy)], "registry": registry}
        exec(documented_code("README.md", "\n## Middleware\n"), namespace)  # noqa: S102 - our own docs
        async with client(namespace["app"]) as http:
            response = await http.get("/busy", headers={**ALICE, "x-request-id": "busy"})
        assert_problem(response, 503, "urn:ambient:problem:pool-exhausted")
        assert response.headers["retry-after"] == "2"
        assert ledger.work == {"busy": "rollback"}

    async def test_the_fastapi_guides_app_runs_as_written(self) -> None:
        """docs/frameworks.md's FastAPI app, run as written with RS256 tokens: the async
        and the thread-pool endpoint get the token's user, its documentation paths are
        served without a token, and a request without one is a 401 with the challenge."""
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        from ambient.middleware.identity import jwt_bearer

        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        class ExecutionEngine:
            def __init__(self, ctx: UserExecutionContext) -> None:
                self.ctx = ctx

            async def start(self, thread_id: str) -> str:
                return f"run of {self.ctx.user_id} on {thread_id}"

        class ReportBuilder:
            def __init__(self, ctx: UserExecutionContext) -> None:
                self.ctx = ctx

        def render(builder: ReportBuilder, user_id: str) -> dict[str, str]:
            assert builder.ctx.user_id == user_id
            return {"report": user_id, "thread": threading.current_thread().name}

        registry = Registry()
        registry.register(ExecutionEngine, ExecutionEngine)
        registry.register(ReportBuilder, ReportBuilder)
        namespace: dict[str, Any] = {
            "ambient": ambient,
            "registry": registry,
            "jwt_bearer": jwt_bearer,
            "KEY": private_key.public_key(),
            "ExecutionEngine": ExecutionEngine,
            "ReportBuilder": ReportBuilder,
            "render": render,
        }
        exec(documented_code("docs/frameworks.md", "\n## FastAPI\n"), namespace)  # noqa: S102 - our own docs

        def bearer(user: str) -> dict[str, str]:
            claims = {"sub": user, "aud": "runs-api", "exp": 4_000_000_000}
            return {"authorization": f"Bearer {jwt.encode(claims, private_key, 'RS256')}"}

        async with client(namespace["app"]) as http:
            run = await http.post("/runs", headers={**bearer("alice"), "x-thread-id": "t-1"})
            report = await http.get("/report", headers=bearer("bob"))
            documentation = [
                (await http.get(path)).status_code for path in ("/docs", "/openapi.json")
            ]
            refused = await http.post("/runs")
        assert (run.status_code, run.json()) == (200, {"run": "run of alice on t-1"})
        assert report.status_code == 200
        assert report.json()["report"] == "bob"
        assert report.json()["thread"] != threading.current_thread().name
        assert documentation == [200, 200]
        assert_problem(refused, 401, "urn:ambient:problem:unauthenticated")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert registry.stats().open_scopes == 0

    async def test_a_mounted_sub_app_answers_ambient_errors_in_the_one_scope(self) -> None:
        """The documented setup for a sub-app mounted under an app that called install():
        its own ServerErrorMiddleware answered PoolExhaustedError with a 500. With the
        handler registered on it, it is 503, in the request's one scope, rolled back."""
        registry, ledger = build_registry()
        scopes = ScopeCounter()
        namespace: dict[str, Any] = {
            "FastAPI": FastAPI,
            "registry": registry,
            "identity": trusted_header(),
        }
        code = documented_code("docs/frameworks.md", "**Mounted sub-applications.**")
        exec(code, namespace)  # noqa: S102 - our own docs
        app, api = namespace["app"], namespace["api"]

        @api.get("/busy")
        async def busy(work: Annotated[Work, Resolve(Work)], ctx: CurrentContext) -> None:
            assert ctx.request_id == "busy"
            raise PoolExhaustedError("no connection within 0.5 s", retry_after=2)

        remove = ambient.add_observer(scopes)
        try:
            async with client(app) as http:
                response = await http.get("/v1/busy", headers={**ALICE, "x-request-id": "busy"})
        finally:
            remove()
        assert_problem(response, 503, "urn:ambient:problem:pool-exhausted")
        assert response.headers["retry-after"] == "2"
        assert ledger.work == {"busy": "rollback"}
        assert scopes.opened == 1

    async def test_a_mounted_sub_app_answers_a_task_groups_ambient_errors(self) -> None:
        """The same documented setup, the error raised in a task group: an ExceptionGroup,
        which no handler registered for AmbientError is looked up for, so the sub-app's own
        ServerErrorMiddleware answered it with a 500 (the app that called install() answers
        the same group 503). The documented setup registers the handler for
        ExceptionGroup too; a group holding a bug stays a 500."""
        registry, ledger = build_registry()
        namespace: dict[str, Any] = {
            "FastAPI": FastAPI,
            "registry": registry,
            "identity": trusted_header(),
        }
        exec(documented_code("docs/frameworks.md", "**Mounted sub-applications.**"), namespace)  # noqa: S102 - our own docs
        app, api = namespace["app"], namespace["api"]

        async def query(error: Exception) -> None:
            await ambient.resolve(Work)
            raise error

        @api.get("/busy")
        async def busy() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(query, PoolExhaustedError("no connection", retry_after=2))

        @api.get("/bug")
        async def bug() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(query, PoolExhaustedError("no connection", retry_after=2))
                tg.start_soon(query, KeyError("a bug"))

        async with client(app, raise_errors=False) as http:
            busy_answer = await http.get("/v1/busy", headers={**ALICE, "x-request-id": "busy"})
            bug_answer = await http.get("/v1/bug", headers={**ALICE, "x-request-id": "bug"})
        assert_problem(busy_answer, 503, "urn:ambient:problem:pool-exhausted")
        assert busy_answer.headers["retry-after"] == "2"
        assert bug_answer.status_code == 500
        assert ledger.work == {"busy": "rollback", "bug": "rollback"}


class TestInstall:
    def test_installing_twice_is_refused(self) -> None:
        app, registry, _ = make_app()
        with pytest.raises(RuntimeError, match="already installed"):
            install(app, registry=registry, identity=trusted_header())

    async def test_a_handler_the_app_registered_before_is_kept_and_warned_of(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An AmbientError handler of the app's own, registered before install(), was
        silently replaced: it is kept (as a later registration would be), with a warning
        that cleanups see its 4xx answers as successes unless it calls ours."""
        registry, _ = build_registry()
        app = FastAPI()

        async def teapot(request: Any, exc: Exception) -> JSONResponse:
            return JSONResponse({"own": type(exc).__name__}, status_code=418)

        app.add_exception_handler(AmbientError, teapot)
        with caplog.at_level(logging.WARNING, logger="ambient.integrations.starlette"):
            install(app, registry=registry, identity=trusted_header())
        assert len(caplog.records) == 1
        assert "ambient_error_handler" in caplog.records[0].getMessage()

        @app.get("/")
        async def home() -> None:
            raise IdentityError("not you")

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert (response.status_code, response.json()) == (418, {"own": "IdentityError"})
        await registry.aclose()

    async def test_ambient_error_handler_registered_before_is_no_handler_of_the_apps_own(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An app that registered ``ambient_error_handler`` itself before install() gets no
        warning about a handler of its own: it is the one install() would register."""
        registry, _ = build_registry()
        app = FastAPI()
        app.add_exception_handler(AmbientError, ambient_error_handler)
        with caplog.at_level(logging.WARNING, logger="ambient.integrations.starlette"):
            install(app, registry=registry, identity=trusted_header())
        assert caplog.records == []

        @app.get("/")
        async def home() -> None:
            raise IdentityError("not you")

        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        await registry.aclose()

    async def test_installing_after_start_is_refused(self) -> None:
        registry, _ = build_registry()
        app = FastAPI()
        async with client(app) as http:
            await http.get("/")
        with pytest.raises(RuntimeError, match="before the app serves"):
            install(app, registry=registry, identity=trusted_header())

    def test_bad_arguments_fail_at_install_not_at_the_first_request(self) -> None:
        registry, _ = build_registry()
        with pytest.raises(ValueError, match="identity resolver"):
            install(FastAPI(), registry=registry, identity=None)
        with pytest.raises(ValueError, match="max_concurrent_per_user"):
            install(
                FastAPI(), registry=registry, identity=trusted_header(), max_concurrent_per_user=0
            )

    @pytest.mark.parametrize("factory", ["trusted_header", "jwt_bearer", "signed_context", "own"])
    def test_a_resolver_factory_given_uncalled_fails_at_install(self, factory: str) -> None:
        """``identity=trusted_header`` (the function that makes a resolver, not one) was
        accepted, and every request then failed with a 500 about the factory's own
        arguments ("'dict' object has no attribute 'isascii'"). It is refused at install,
        saying to call it; the same inside ``first_of()``."""
        from ambient.integrations.propagation import signed_context
        from ambient.middleware.identity import IdentityResolver, first_of, jwt_bearer

        def own() -> IdentityResolver:  # an application's own factory
            return trusted_header("x-api-user")

        given: Any = {
            "trusted_header": trusted_header,
            "jwt_bearer": jwt_bearer,
            "signed_context": signed_context,
            "own": own,
        }[factory]
        registry, _ = build_registry()
        call_it = rf"is {factory}, which makes an identity resolver .*: call it \({factory}\("
        with pytest.raises(TypeError, match=rf"^identity {call_it}"):
            install(FastAPI(), registry=registry, identity=given)
        with pytest.raises(TypeError, match=rf"^first_of\(\)'s resolver 2 {call_it}"):
            first_of(trusted_header(), given)
        install(FastAPI(), registry=registry, identity=first_of(own(), trusted_header()))

    async def test_two_telemetry_objects_are_warned_of_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A Telemetry on the registry and another given to install(): one warning, at
        install, not a second one when the app builds its middleware stack."""
        from ambient.telemetry import Telemetry

        registry = Registry(telemetry=Telemetry())
        app = FastAPI()

        @app.get("/")
        async def home(ctx: CurrentContext) -> dict[str, str]:
            return {"user": ctx.user_id}

        with caplog.at_level(logging.WARNING, logger="ambient.middleware"):
            install(app, registry=registry, identity=trusted_header(), telemetry=Telemetry())
            async with client(app) as http:
                assert (await http.get("/", headers=ALICE)).json() == {"user": "alice"}
        warned = [r.getMessage() for r in caplog.records if "counted twice" in r.getMessage()]
        assert len(warned) == 1, warned

    def test_install_takes_every_option_of_the_middleware(self) -> None:
        """install() says its arguments are the middleware's: every one of them."""
        import inspect

        from ambient.middleware import AmbientMiddleware

        middleware = set(inspect.signature(AmbientMiddleware.__init__).parameters) - {
            "self",
            "app",
        }
        assert set(inspect.signature(install).parameters) - {"app"} == middleware

    async def test_install_passes_each_option_on_to_the_middleware(self) -> None:
        """The options given to install() are the middleware's: anonymous callers served,
        and the request and thread ids read from the headers named (max_concurrent_per_user
        just above)."""
        registry, _ = build_registry()
        app = FastAPI()
        install(
            app,
            registry=registry,
            identity=trusted_header(),
            anonymous=True,
            request_id_header="x-correlation-id",
            thread_id_header="x-conversation",
        )

        @app.get("/")
        async def whoami(ctx: CurrentContext) -> dict[str, str]:
            return {"user": ctx.user_id, "request": ctx.request_id, "thread": ctx.thread_id}

        ids = {"x-correlation-id": "corr-1", "x-conversation": "chat-9"}
        async with client(app) as http:
            anonymous = await http.get("/")
            named = await http.get("/", headers={**ALICE, **ids})
        assert anonymous.json()["user"].startswith("anonymous:")
        assert named.json() == {"user": "alice", "request": "corr-1", "thread": "chat-9"}
        assert named.headers["x-correlation-id"] == "corr-1"
        await registry.aclose()

    async def test_a_browser_websocket_names_its_thread_through_install(self) -> None:
        registry, _ = build_registry()
        app = FastAPI()
        install(app, registry=registry, identity=trusted_header(), thread_id_query="thread")

        @app.websocket("/ws")
        async def socket(websocket: WebSocket, ctx: CurrentContext) -> None:
            await websocket.accept()
            await websocket.send_json({"user": ctx.user_id, "thread": ctx.thread_id})
            await websocket.close()

        sent = await websocket_exchange(app, "/ws", ALICE, query=b"thread=chat-7")
        assert json.loads(sent[1]["text"]) == {"user": "alice", "thread": "chat-7"}

    async def test_starlette_install_maps_errors_and_needs_no_request_state(self) -> None:
        """The Starlette integration: handlers reach the context with nothing passed down."""
        registry, ledger = build_registry()

        async def home(request: Request) -> Response:
            probe = await ambient.resolve(Probe)
            return JSONResponse(
                {"user": ambient.get_current_context().user_id, "probe": probe.user_id}
            )

        async def busy(request: Request) -> Response:
            raise PoolExhaustedError("busy", retry_after=1)

        app = Starlette(routes=[Route("/", home), Route("/busy", busy)])
        starlette_integration.install(app, registry=registry, identity=trusted_header())
        async with client(app) as http:
            ok = await http.get("/", headers=ALICE)
            refused = await http.get("/busy", headers=ALICE)
        assert ok.json() == {"user": "alice", "probe": "alice"}
        assert_problem(refused, 503, "urn:ambient:problem:pool-exhausted")
        assert ledger.open_probes() == 0


class First(Probe):
    """The first of three REQUEST components (cleaned last)."""


class Middle(Probe):
    """The second: its cleanup fails."""


class Last(Probe):
    """The third (cleaned first)."""


USERS = 10
REQUESTS = 20


class TestCleanupFailures:
    @pytest.mark.parametrize("cleanups", ["sync", "async"])
    @pytest.mark.parametrize("endpoint_raises", [True, False], ids=["raises", "returns"])
    async def test_a_failing_cleanup_neither_stops_the_others_nor_buries_the_error(
        self, caplog: pytest.LogCaptureFixture, cleanups: str, endpoint_raises: bool
    ) -> None:
        """B04: three REQUEST components, the middle one's cleanup raising, 20 requests of
        10 users in flight at once. The endpoint's ValueError reaches its own handler as a
        ValueError (never a CleanupError or a group in the catch-all handler) and is
        answered by it; every request cleans its three components exactly once, newest
        first, the two around the failure included; each failure is counted once and
        logged at ERROR naming its request; nothing escapes to the server."""
        app, registry, ledger = make_app()
        cleaned: dict[str, list[str]] = {}

        def note(made: Probe, kind: str) -> None:
            made.closed = True
            ledger.clean(made.number)
            cleaned.setdefault(made.request_id, []).append(kind)

        def sync_factory(cls: type[Probe], fails: bool) -> Any:
            def factory(ctx: UserExecutionContext) -> Iterator[Probe]:
                made = cls(ledger.create(cls.__name__, ctx.user_id), ctx)
                try:
                    yield made
                finally:
                    note(made, cls.__name__)
                    if fails:
                        raise RuntimeError(f"releasing {cls.__name__} of {ctx.user_id} failed")

            return factory

        def async_factory(cls: type[Probe], fails: bool) -> Any:
            async def factory(ctx: UserExecutionContext) -> AsyncIterator[Probe]:
                made = cls(ledger.create(cls.__name__, ctx.user_id), ctx)
                try:
                    yield made
                finally:
                    await anyio.lowlevel.checkpoint()  # a real await in the cleanup
                    note(made, cls.__name__)
                    if fails:
                        raise RuntimeError(f"releasing {cls.__name__} of {ctx.user_id} failed")

            return factory

        factory = sync_factory if cleanups == "sync" else async_factory
        for cls in (First, Middle, Last):
            registry.register(cls, factory(cls, fails=cls is Middle))

        # Every request resolves its components, then waits until all are in flight.
        arrived = 0
        all_in = anyio.Event()

        @app.get("/run")
        async def run(
            ctx: CurrentContext,
            first: Annotated[First, Resolve(First)],
            middle: Annotated[Middle, Resolve(Middle)],
            last: Annotated[Last, Resolve(Last)],
        ) -> dict[str, Any]:
            nonlocal arrived
            arrived += 1
            if arrived == REQUESTS:
                all_in.set()
            await all_in.wait()
            if endpoint_raises:
                raise ValueError(f"the run of {ctx.user_id} failed")
            return {"user": ctx.user_id, "components": [c.user_id for c in (first, middle, last)]}

        value_errors: list[BaseException] = []
        other_errors: list[BaseException] = []

        @app.exception_handler(ValueError)
        async def on_value_error(request: Request, exc: ValueError) -> Response:
            value_errors.append(exc)
            user = ambient.get_current_context().user_id
            body = {"error": type(exc).__name__, "detail": str(exc), "user": user}
            return JSONResponse(body, status_code=418)

        @app.exception_handler(Exception)
        async def on_anything(request: Request, exc: Exception) -> Response:
            other_errors.append(exc)
            return JSONResponse({"error": type(exc).__name__}, status_code=500)

        responses: dict[int, httpx.Response] = {}
        escaped: list[BaseException] = []

        async def call(http: httpx.AsyncClient, n: int) -> None:
            headers = {"x-user-id": f"user-{n % USERS}", "x-request-id": f"req-{n}"}
            try:
                responses[n] = await http.get("/run", headers=headers)
            except Exception as exc:  # what escaped the app to the server: asserted below
                escaped.append(exc)

        caplog.set_level(logging.WARNING)
        with anyio.fail_after(20):
            async with client(app) as http, anyio.create_task_group() as tg:
                for n in range(REQUESTS):
                    tg.start_soon(call, http, n)

        assert escaped == []
        assert other_errors == []
        for n, response in sorted(responses.items()):
            user = f"user-{n % USERS}"
            assert response.headers["x-request-id"] == f"req-{n}"
            if endpoint_raises:
                assert response.status_code == 418, response.text
                assert response.json() == {
                    "error": "ValueError",
                    "detail": f"the run of {user} failed",
                    "user": user,
                }
            else:
                assert response.status_code == 200, response.text
                assert response.json() == {"user": user, "components": [user] * 3}
        assert len(responses) == REQUESTS
        if endpoint_raises:
            assert len(value_errors) == REQUESTS
            assert all(type(exc) is ValueError for exc in value_errors), value_errors
        else:
            assert value_errors == []

        # Newest first, every one of them, once, in every request.
        assert cleaned == {f"req-{n}": ["Last", "Middle", "First"] for n in range(REQUESTS)}
        assert ledger.problems(("First", "Middle", "Last")) == []
        assert len(ledger.created) == 3 * REQUESTS
        stats = registry.stats()
        assert stats.cleanup_failures == REQUESTS  # one per request: the middle one's
        assert stats.open_scopes == 0
        errors = [
            record
            for record in caplog.records
            if record.levelno == logging.ERROR and "cleanup failed" in record.getMessage()
        ]
        logged = Counter(
            re.findall(r"\(request (req-\d+)\)", record.getMessage())[0] for record in errors
        )
        assert logged == {f"req-{n}": 1 for n in range(REQUESTS)}
        for record in errors:
            assert record.exc_info is not None
            assert type(record.exc_info[1]) is RuntimeError
            assert "releasing Middle of user-" in str(record.exc_info[1])
        await registry.aclose()
