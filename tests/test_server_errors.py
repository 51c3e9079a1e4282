"""A handler's bug under ``install()``: the 500 Starlette's ``ServerErrorMiddleware`` answers.

``ServerErrorMiddleware`` is the outermost layer of every Starlette and FastAPI app, outside
``AmbientMiddleware``: the 500 it answers for an exception that escaped the app, the app's
own 500 handler (``exception_handlers={500: ...}`` or ``{Exception: ...}``) and the debug
traceback page all happen after the request's scope closed. With ``install()`` the 500
carries the request id, as every other answer does, and the 500 handler runs in the
request's context (its scope closed: it resolves nothing); the exception still reaches the
server, cleanups see it once, and answers that did not fail are as they were.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

import ambient
from ambient import Registry, UserExecutionContext
from ambient.errors import NoActiveContextError, ScopeClosedError
from ambient.integrations.logging import ContextFilter
from ambient.integrations.starlette import install
from ambient.middleware import Identity, IdentityResolver, trusted_header
from tests.documented import documented_code
from tests.frameworks.common import build_registry, gate
from tests.servers import serve

IDENTITY = trusted_header(tenant_header="x-tenant-id")
USERS = 40
GENERATED = re.compile(r"[0-9a-f]{32}")
# What a ContextFilter's log line made where no context is bound has for its user and request.
NO_CONTEXT = ("", "")


class Boom(Exception):  # noqa: N818 - named as the tests read it
    """A handler's bug, naming the user whose request it ended."""

    def __init__(self, tenant: str | None, user: str, overlapped: bool | None) -> None:
        super().__init__(f"{tenant}/{user}")
        self.overlapped = overlapped


class Witness:
    """A REQUEST component whose cleanup notes what ended its request."""


class Record:
    """What the app saw, from the server's threads: each cleanup, each 500 handler call,
    each log line made in a 500 handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cleanups: list[tuple[str, str | None]] = []
        self.handled: list[dict[str, Any]] = []
        self.records: list[logging.LogRecord] = []

    def cleanup(self, request_id: str, error: BaseException | None) -> None:
        with self._lock:
            self.cleanups.append((request_id, None if error is None else str(error)))

    def handle(self, seen: dict[str, Any]) -> None:
        with self._lock:
            self.handled.append(seen)


class Keep(logging.Handler):
    """Keeps the records it handles in a :class:`Record`."""

    def __init__(self, record: Record) -> None:
        super().__init__(logging.DEBUG)
        self.record = record
        self.addFilter(ContextFilter(user_id="raw"))

    def emit(self, record: logging.LogRecord) -> None:
        with self.record._lock:
            self.record.records.append(record)


def build_app(
    framework: str,
    handler: str | None,
    *,
    debug: bool = False,
    identity: IdentityResolver = IDENTITY,
) -> tuple[Starlette, Registry, Record]:
    """A Starlette or FastAPI app with ``install()``: ``/boom`` raises :class:`Boom` (after
    ``size`` requests met at ``gate``), ``/ok`` answers; ``handler`` is the app's 500
    handler (``"async"``, ``"sync"`` or ``None`` for Starlette's own)."""
    registry, _ = build_registry()
    record = Record()
    log = logging.getLogger(f"tests.server_errors.{uuid.uuid4().hex}")
    log.propagate = False
    log.addHandler(Keep(record))

    def witness(ctx: UserExecutionContext) -> Iterator[Witness]:
        try:
            yield Witness()
        except BaseException as exc:
            record.cleanup(ctx.request_id, exc)
            raise
        record.cleanup(ctx.request_id, None)

    registry.register(Witness, witness)

    async def boom(request: Request) -> Response:
        ctx = ambient.get_current_context()
        await ambient.resolve(Witness)
        overlapped = await gate(
            request.query_params.get("gate"), int(request.query_params.get("size", 0))
        )
        raise Boom(ctx.tenant_id, ctx.user_id, overlapped)

    async def ok(request: Request) -> Response:
        ctx = ambient.get_current_context()
        await ambient.resolve(Witness)
        return JSONResponse({"user": ctx.user_id, "request_id": ctx.request_id})

    def seen(exc: Exception, overlapped: bool | None) -> dict[str, Any]:
        ctx = ambient.current_context_or_none()
        if ctx is None:
            # A request that failed before it had a context (its identity resolver's bug).
            log.error("request failed: %s", exc)
            body = {"error": str(exc), "context": None, "handler_overlapped": overlapped}
            record.handle(body)
            return body
        try:
            ambient.resolve_sync(Witness)
        except ScopeClosedError as closed:
            resolved = f"ScopeClosedError: {closed}"
        else:
            resolved = "resolved"
        log.error("request failed: %s", exc)
        body = {
            "error": str(exc),
            "user": f"{ctx.tenant_id}/{ctx.user_id}",
            "request_id": ctx.request_id,
            "resolve": resolved,
            "overlapped": getattr(exc, "overlapped", None),
            "handler_overlapped": overlapped,
        }
        record.handle(body)
        return body

    async def on_error(request: Request, exc: Exception) -> Response:
        # Every handler in flight at once, each then reading its own context.
        name = request.query_params.get("gate")
        size = int(request.query_params.get("size", 0))
        overlapped = await gate(name and f"{name}-handler", size)
        return JSONResponse(seen(exc, overlapped), status_code=500)

    def on_error_sync(request: Request, exc: Exception) -> Response:
        return JSONResponse(seen(exc, None), status_code=500)

    handlers = {"async": on_error, "sync": on_error_sync}
    app: Starlette
    if framework == "starlette":
        # The 500 handler given before install().
        exception_handlers: Any = {} if handler is None else {500: handlers[handler]}
        app = Starlette(
            debug=debug,
            routes=[Route("/boom", boom), Route("/ok", ok)],
            exception_handlers=exception_handlers,
        )
        install(app, registry=registry, identity=identity)
    else:
        app = FastAPI(debug=debug)
        install(app, registry=registry, identity=identity)
        # The 500 handler registered after install().
        if handler is not None:
            app.add_exception_handler(Exception, handlers[handler])
        app.add_route("/boom", boom)
        app.add_route("/ok", ok)
    return app, registry, record


def identities() -> list[tuple[str, str]]:
    """USERS identities: equal user ids in two tenants, which must never meet."""
    return [(f"tenant-{n % 2}", f"user-{n // 2}") for n in range(USERS)]


def boom_handled(body: Any, tenant: str, user: str, request_id: str) -> None:
    """What the app's 500 handler answered for a failed ``/boom``: its own user's error,
    in its user's context, under its request id, unable to resolve from the closed scope."""
    assert body["error"] == f"{tenant}/{user}"
    assert body["user"] == f"{tenant}/{user}"
    assert body["request_id"] == request_id
    assert body["resolve"] == "ScopeClosedError: cannot resolve Witness: the scope has closed"
    assert body["overlapped"] is True
    assert body["handler_overlapped"] in (True, None)


async def drive(
    url: str,
    *,
    handled: Callable[[Any, str, str, str], None] | None,
    accept: str = "*/*",
    failing: Callable[[int], str] = lambda n: "/boom",
) -> tuple[list[httpx.Response], dict[str, str]]:
    """For every identity at once (the ``n``-th): a request to ``failing(n)`` with a request
    id, one without, and one to ``/ok``. Checks every answer (with ``handled``, the body
    of a 500 the app's handler answered); returns the 500s and, per request id echoed on a
    500, the ``tenant/user`` it was sent for."""
    failing_count = 2 * USERS
    name = uuid.uuid4().hex
    failed: list[httpx.Response] = []
    owners: dict[str, str] = {}

    async def one(client: httpx.AsyncClient, n: int, tenant: str, user: str, kind: str) -> None:
        headers = {"x-user-id": user, "x-tenant-id": tenant, "accept": accept}
        sent = f"{tenant}.{user}.{kind}"
        if kind != "generated":
            headers["x-request-id"] = sent
        if kind == "ok":
            response = await client.get("/ok", headers=headers)
            # As it always was: the id once, the body the view's.
            assert response.status_code == 200, response.text
            assert response.headers.get_list("x-request-id") == [sent]
            assert response.json() == {"user": user, "request_id": sent}
            return
        params = {"gate": name, "size": str(failing_count)}
        response = await client.get(failing(n), params=params, headers=headers)
        assert response.status_code == 500, response.text
        echoed = response.headers.get_list("x-request-id")
        assert len(echoed) == 1, response.headers
        if kind == "given":
            assert echoed == [sent]
        else:
            assert GENERATED.fullmatch(echoed[0]), echoed
        if handled is not None:
            handled(response.json(), tenant, user, echoed[0])
        owners[echoed[0]] = f"{tenant}/{user}"
        failed.append(response)

    limits = httpx.Limits(max_connections=3 * USERS)
    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client,
        anyio.create_task_group() as tg,
    ):
        for n, (tenant, user) in enumerate(identities()):
            for kind in ("given", "generated", "ok"):
                tg.start_soon(one, client, n, tenant, user, kind)
    assert len(failed) == failing_count
    assert len(owners) == failing_count, "two failed requests were answered with one request id"
    return failed, owners


def check_cleanups(record: Record, owners: dict[str, str]) -> None:
    """Each failed request's cleanup saw its own Boom, once; each other request's nothing."""
    cleanups = Counter(record.cleanups)
    assert {key for key in cleanups if key[1] is not None} == set(owners.items())
    assert all(count == 1 for count in cleanups.values()), cleanups
    assert sum(1 for _, error in cleanups if error is None) == USERS  # the /ok requests


# Servers, frameworks and kinds of 500 handler the tests under real servers run on: each
# server with each framework, and each framework with each kind of handler.
STACKS = [
    ("uvicorn", "starlette", "async"),
    ("uvicorn", "fastapi", "sync"),
    ("hypercorn-trio", "starlette", "sync"),
    ("hypercorn-trio", "fastapi", "async"),
]


def server_errors(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    """The exceptions uvicorn logged, by message."""
    return Counter(
        str(record.exc_info[1])
        for record in caplog.records
        if record.name == "uvicorn.error" and record.exc_info and record.exc_info[1]
    )


class TestUnderUvicorn:
    @pytest.mark.parametrize(("server", "framework", "handler"), STACKS)
    async def test_the_apps_500_handler_answers_in_the_requests_context(
        self, caplog: pytest.LogCaptureFixture, server: str, framework: str, handler: str
    ) -> None:
        """80 failing requests of 40 users in flight at once, their 500 handlers too: each
        500 carries its request's id (the client's, or the one generated for it), and its
        handler saw the context of the user whose request failed, logged with its ids,
        and could resolve nothing from the closed scope. Cleanups saw each exception once;
        the server still got every exception; answers that did not fail are unchanged."""
        app, registry, record = build_app(framework, handler)
        caplog.set_level(logging.ERROR)
        options = {"log_config": None} if server == "uvicorn" else {}
        with serve(server, app, **options) as url:
            _, owners = await drive(url, handled=boom_handled)
        check_cleanups(record, owners)
        assert len(record.handled) == len(owners)
        assert sorted(
            (record.request_id, f"{record.tenant_id}/{record.user_id}", record.getMessage())
            for record in record.records
        ) == sorted(
            (request_id, owner, f"request failed: {owner}") for request_id, owner in owners.items()
        )
        if server == "uvicorn":
            assert server_errors(caplog) == Counter(owners.values())
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("framework", ["starlette", "fastapi"])
    @pytest.mark.parametrize(
        ("debug", "accept"),
        [(False, "*/*"), (True, "text/plain"), (True, "text/html")],
        ids=["plain", "debug-text", "debug-html"],
    )
    async def test_starlettes_own_500_carries_the_request_id(
        self, caplog: pytest.LogCaptureFixture, framework: str, debug: bool, accept: str
    ) -> None:
        """Without a 500 handler of the app's: Starlette's plain 500, or its traceback page
        in debug mode, carries each request's id, under 40 concurrent users."""
        app, registry, record = build_app(framework, None, debug=debug)
        caplog.set_level(logging.ERROR)
        with serve("uvicorn", app, log_config=None) as url:
            failed, owners = await drive(url, handled=None, accept=accept)
        for response in failed:
            if debug:
                assert "Boom" in response.text
                assert response.headers["content-type"].startswith(accept)
            else:
                assert response.text == "Internal Server Error"
        check_cleanups(record, owners)
        assert server_errors(caplog) == Counter(owners.values())
        assert registry.stats().open_scopes == 0


class ResolverBug(Exception):  # noqa: N818 - named as the tests read it
    """An identity resolver's bug (or its database's error), naming the user it failed for."""


class ClaimsFromTheDatabase(Mapping[str, Any]):
    """Claims read from a database when first used, whose read fails: the request fails
    while the middleware builds its context, after its identity was resolved."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def __getitem__(self, key: str) -> Any:
        raise ResolverBug(self.owner)

    def __iter__(self) -> Iterator[str]:
        raise ResolverBug(self.owner)

    def __len__(self) -> int:
        raise ResolverBug(self.owner)


def failing_identity(scope: Any) -> Identity | Awaitable[Identity | None] | None:
    """``IDENTITY``, failing for ``/resolver-bug`` (in the resolver, at once or after
    ``size`` requests met at ``gate``) and ``/context-bug`` (in the context's claims)."""
    identity = IDENTITY(scope)
    path = scope["path"]
    if identity is None or path not in ("/resolver-bug", "/context-bug"):
        return identity
    owner = f"{identity.tenant_id}/{identity.user_id}"
    failed = Identity(identity.user_id, identity.tenant_id, claims=ClaimsFromTheDatabase(owner))
    query = dict(
        pair.split("=", 1) for pair in scope["query_string"].decode().split("&") if "=" in pair
    )
    if "gate" not in query:
        if path == "/resolver-bug":
            raise ResolverBug(owner)
        return failed

    async def resolve() -> Identity:
        await gate(query["gate"], int(query["size"]))
        if path == "/resolver-bug":
            raise ResolverBug(owner)
        return failed

    return resolve()


def resolver_bug(n: int) -> str:
    """Where the ``n``-th identity's request fails: its resolver (half), or building its
    context (the other half)."""
    return "/resolver-bug" if n % 4 < 2 else "/context-bug"


def resolver_bug_handled(body: Any, tenant: str, user: str, request_id: str) -> None:
    """What the app's 500 handler answered for a resolver's bug: this request's own
    exception, in no context (there was none)."""
    assert body["error"] == f"{tenant}/{user}"
    assert body["context"] is None
    assert body["handler_overlapped"] in (True, None)


class TestAResolversBug:
    """An identity resolver that raises something other than an ambient error (a bug, its
    database's error), or a context that fails to build: the request has no context, and
    its 500 still carries its request id."""

    @pytest.mark.parametrize(("server", "framework", "handler"), STACKS)
    async def test_the_apps_500_handler_answers_with_the_request_id_in_no_context(
        self, caplog: pytest.LogCaptureFixture, server: str, framework: str, handler: str
    ) -> None:
        """80 requests of 40 users whose resolver fails, in flight at once, their 500
        handlers too: each 500 carries its request's id (the client's, or a unique
        generated one), and its handler got that request's exception with no context
        bound (nobody else's). The server still got every exception; nothing was opened,
        and answers that did not fail are unchanged."""
        app, registry, record = build_app(framework, handler, identity=failing_identity)
        caplog.set_level(logging.ERROR)
        options = {"log_config": None} if server == "uvicorn" else {}
        with serve(server, app, **options) as url:
            _, owners = await drive(url, handled=resolver_bug_handled, failing=resolver_bug)
        assert sorted(seen["error"] for seen in record.handled) == sorted(owners.values())
        assert all(seen["context"] is None for seen in record.handled)
        assert sorted(logged.getMessage() for logged in record.records) == sorted(
            f"request failed: {owner}" for owner in owners.values()
        )
        # The handler's log lines name no user and no request: there was none.
        assert {(logged.user_id, logged.request_id) for logged in record.records} == {NO_CONTEXT}
        if server == "uvicorn":
            assert server_errors(caplog) == Counter(owners.values())
        assert [error for _, error in record.cleanups] == [None] * USERS  # the /ok requests
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("framework", ["starlette", "fastapi"])
    @pytest.mark.parametrize(
        ("debug", "accept"),
        [(False, "*/*"), (True, "text/plain"), (True, "text/html")],
        ids=["plain", "debug-text", "debug-html"],
    )
    async def test_starlettes_own_500_carries_the_request_id(
        self, caplog: pytest.LogCaptureFixture, framework: str, debug: bool, accept: str
    ) -> None:
        """Without a 500 handler of the app's: Starlette's plain 500, or its traceback page
        in debug mode, carries each failed request's id, under 40 concurrent users."""
        app, registry, _ = build_app(framework, None, debug=debug, identity=failing_identity)
        caplog.set_level(logging.ERROR)
        with serve("uvicorn", app, log_config=None) as url:
            failed, owners = await drive(url, handled=None, accept=accept, failing=resolver_bug)
        for response in failed:
            if debug:
                assert "ResolverBug" in response.text
                assert response.headers["content-type"].startswith(accept)
            else:
                assert response.text == "Internal Server Error"
        assert server_errors(caplog) == Counter(owners.values())
        assert registry.stats().open_scopes == 0

    @pytest.mark.parametrize("handler", ["async", "sync", None])
    @pytest.mark.parametrize("path", ["/resolver-bug", "/context-bug"])
    @pytest.mark.parametrize("framework", ["starlette", "fastapi"])
    async def test_the_500_handler_sees_no_context_not_the_callers(
        self, framework: str, path: str, handler: str | None
    ) -> None:
        """A resolver that raises at once, or a context that fails to build, under a caller
        that had bound another user's context: the 500 (the app's handler's or Starlette's)
        carries the request's id, the handler sees no context, not the caller's, and the
        exception still reaches the server."""
        app, _, record = build_app(framework, handler, identity=failing_identity)
        other = UserExecutionContext.create("mallory", request_id="mallory-1")

        async def server(scope: Any, receive: Any, send: Any) -> None:
            with ambient.bind_context(other):
                await app(scope, receive, send)

        escaped = Escaped(server)
        async with client(escaped) as http:
            response = await http.get(path, headers=ALICE)
            generated = await http.get(path, headers={**ALICE, "x-request-id": "not valid"})
        for answer in (response, generated):
            assert answer.status_code == 500
            if handler is None:
                assert answer.text == "Internal Server Error"
            else:
                assert answer.json() == {
                    "error": "acme/alice",
                    "context": None,
                    "handler_overlapped": None,
                }
        assert response.headers.get_list("x-request-id") == ["alice-1"]
        [echoed] = generated.headers.get_list("x-request-id")
        assert GENERATED.fullmatch(echoed), echoed
        assert [type(error) for error in escaped.errors] == [ResolverBug, ResolverBug]
        assert [str(error) for error in escaped.errors] == ["acme/alice", "acme/alice"]
        assert record.cleanups == []


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(
        app=app, client=("127.0.0.1", 50000), raise_app_exceptions=False
    )
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


ALICE = {"x-user-id": "alice", "x-tenant-id": "acme", "x-request-id": "alice-1"}


class Escaped:
    """The app as a server runs it, noting what escaped it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.errors.append(exc)
            raise


class TestInProcess:
    @pytest.mark.parametrize("framework", ["starlette", "fastapi"])
    async def test_the_exception_reaches_the_server_unchanged(self, framework: str) -> None:
        """The handler's own exception, the very object, still escapes the app after the
        500 went out."""
        app, _, record = build_app(framework, "async")
        escaped = Escaped(app)
        async with client(escaped) as http:
            response = await http.get("/boom", headers=ALICE)
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "alice-1"
        assert [type(error) for error in escaped.errors] == [Boom]
        assert str(escaped.errors[0]) == "acme/alice"
        assert record.cleanups == [("alice-1", "acme/alice")]

    async def test_a_stream_that_fails_after_its_start_is_as_it_was(self) -> None:
        """A response that fails after its start cannot get a header any more: it keeps
        the start it sent (the id once), no second answer follows, and the 500 handler
        still runs in the request's context."""
        registry, _ = build_registry()
        seen: list[str] = []

        async def chunks() -> Any:
            yield b"begun\n"
            raise Boom("acme", "alice", None)

        async def stream(request: Request) -> Response:
            return StreamingResponse(chunks())

        async def on_error(request: Request, exc: Exception) -> Response:
            seen.append(ambient.get_current_context().request_id)
            return PlainTextResponse("failed", status_code=500)

        app = Starlette(routes=[Route("/stream", stream)], exception_handlers={500: on_error})
        install(app, registry=registry, identity=IDENTITY)
        starts: list[Any] = []

        async def server(scope: Any, receive: Any, send: Any) -> None:
            async def sent(message: Any) -> None:
                if message["type"] == "http.response.start":
                    starts.append(message)
                await send(message)

            await app(scope, receive, sent)

        escaped = Escaped(server)
        async with client(escaped) as http:
            response = await http.get("/stream", headers=ALICE)
        assert response.status_code == 200
        assert [start["status"] for start in starts] == [200]
        assert [v for k, v in starts[0]["headers"] if k == b"x-request-id"] == [b"alice-1"]
        assert seen == ["alice-1"]
        assert [type(error) for error in escaped.errors] == [Boom]

    @pytest.mark.parametrize("kind", ["async", "sync", "none"])
    async def test_the_500_handler_outside_a_request_sees_no_context(self, kind: str) -> None:
        """An exception that never went through the middleware's scope (an outer layer's
        bug) reaches the 500 handler as before: nothing bound, no id; as does Starlette's
        own 500 (``kind="none"``)."""
        registry, _ = build_registry()
        seen: list[str] = []

        def answer() -> Response:
            try:
                ambient.get_current_context()
            except NoActiveContextError:
                seen.append("nothing bound")
            return PlainTextResponse("failed", status_code=500)

        async def on_error(request: Request, exc: Exception) -> Response:
            return answer()

        def on_error_sync(request: Request, exc: Exception) -> Response:
            return answer()

        async def home(request: Request) -> Response:  # pragma: no cover - never reached
            return PlainTextResponse("home")

        handlers: dict[str, Any] = {"async": on_error, "sync": on_error_sync}
        exception_handlers = {500: handlers[kind]} if kind in handlers else {}
        app = Starlette(routes=[Route("/", home)], exception_handlers=exception_handlers)
        install(app, registry=registry, identity=IDENTITY)

        class Broken:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                raise RuntimeError("an outer middleware's bug")

        app.add_middleware(Broken)
        async with client(app) as http:
            response = await http.get("/", headers=ALICE)
        assert response.status_code == 500
        assert "x-request-id" not in response.headers
        if kind == "none":
            assert response.text == "Internal Server Error"
        else:
            assert response.text == "failed"
            assert seen == ["nothing bound"]

    @pytest.mark.parametrize("path", ["/boom", "/resolver-bug"])
    async def test_a_500_handler_that_raises_leaves_the_500_to_the_server(self, path: str) -> None:
        """A 500 handler that raises itself: Starlette sends nothing and raises the
        handler's exception on, as without ambient; the server answers with its own 500,
        which no ASGI layer sends, so it goes without the request id."""
        registry, _ = build_registry()

        async def boom(request: Request) -> Response:
            raise Boom("acme", "alice", None)

        async def on_error(request: Request, exc: Exception) -> Response:
            raise RuntimeError(f"the 500 handler failed on {exc}")

        app = Starlette(routes=[Route("/boom", boom)], exception_handlers={500: on_error})
        install(app, registry=registry, identity=failing_identity)
        sent: list[str] = []

        async def server(scope: Any, receive: Any, send: Any) -> None:
            async def sending(message: Any) -> None:
                sent.append(message["type"])
                await send(message)

            await app(scope, receive, sending)

        escaped = Escaped(server)
        async with client(escaped) as http:
            response = await http.get(path, headers=ALICE)
        assert response.status_code == 500
        assert "x-request-id" not in response.headers
        assert sent == []
        assert [str(error) for error in escaped.errors] == ["the 500 handler failed on acme/alice"]

    async def test_a_request_id_the_500_handler_set_is_kept(self) -> None:
        """A 500 handler that names the request itself (another header value, another
        case) keeps its own: the header is not sent twice."""
        registry, _ = build_registry()

        async def boom(request: Request) -> Response:
            raise Boom("acme", "alice", None)

        async def on_error(request: Request, exc: Exception) -> Response:
            ctx = ambient.get_current_context()
            headers = {"X-Request-ID": f"{ctx.request_id}/500"}
            return PlainTextResponse("failed", status_code=500, headers=headers)

        app = Starlette(routes=[Route("/boom", boom)], exception_handlers={500: on_error})
        install(app, registry=registry, identity=IDENTITY)
        async with client(app) as http:
            response = await http.get("/boom", headers=ALICE)
        assert response.status_code == 500
        assert response.headers.get_list("x-request-id") == ["alice-1/500"]

    async def test_a_500_handler_answering_with_a_plain_asgi_app_is_sent_as_it_is(self) -> None:
        """A 500 handler may return any ASGI app, not only a Starlette Response (Starlette
        just calls it): its answer goes out as it is, in the request's context, with no
        header added (it has none to add to). Given a request id as a Response is, it
        failed with AttributeError, and the client got the server's bare 500 instead."""
        registry, _ = build_registry()

        async def boom(request: Request) -> Response:
            raise Boom("acme", "alice", None)

        async def on_error(request: Request, exc: Exception) -> Any:
            user = ambient.get_current_context().user_id

            async def answer(scope: Any, receive: Any, send: Any) -> None:
                headers = [(b"content-type", b"text/plain")]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": f"failed for {user}".encode()})

            return answer

        app = Starlette(routes=[Route("/boom", boom)], exception_handlers={500: on_error})
        install(app, registry=registry, identity=IDENTITY)
        escaped = Escaped(app)
        async with client(escaped) as http:
            response = await http.get("/boom", headers=ALICE)
        assert response.status_code == 500
        assert response.text == "failed for alice"
        assert "x-request-id" not in response.headers
        assert [type(error) for error in escaped.errors] == [Boom]

    async def test_a_sub_app_that_called_install_answers_its_500_with_the_id(self) -> None:
        """A FastAPI app that called install(), mounted under an app that did not: its own
        ServerErrorMiddleware is the one outside the middleware."""
        api, _, _ = build_app("fastapi", "sync")
        app = Starlette(routes=[Mount("/v1", app=api)])
        escaped = Escaped(app)
        async with client(escaped) as http:
            response = await http.get("/v1/boom", headers=ALICE)
            ok = await http.get("/v1/ok", headers={**ALICE, "x-request-id": "alice-2"})
        assert response.status_code == 500
        assert response.headers.get_list("x-request-id") == ["alice-1"]
        assert response.json()["user"] == "acme/alice"
        assert ok.headers.get_list("x-request-id") == ["alice-2"]
        assert [type(error) for error in escaped.errors] == [Boom]

    async def test_the_documented_mounted_sub_app_answers_its_500_inside_the_scope(
        self,
    ) -> None:
        """The documented mount (install() on the outer app, the handler alone on the
        sub-app): the sub-app's ServerErrorMiddleware is inside the request's scope, so its
        500 goes out with the request id, its 500 handler sees the context with the scope
        open, and the cleanups then see the exception."""
        registry, _ = build_registry()
        record = Record()

        def witness(ctx: UserExecutionContext) -> Iterator[Witness]:
            try:
                yield Witness()
            except BaseException as exc:
                record.cleanup(ctx.request_id, exc)
                raise

        registry.register(Witness, witness)
        namespace: dict[str, Any] = {
            "FastAPI": FastAPI,
            "registry": registry,
            "identity": IDENTITY,
        }
        exec(documented_code("docs/frameworks.md", "**Mounted sub-applications.**"), namespace)  # noqa: S102 - our own docs
        app, api = namespace["app"], namespace["api"]

        @api.get("/boom")
        async def boom() -> None:
            await ambient.resolve(Witness)
            raise Boom("acme", "alice", None)

        async def on_error(request: Request, exc: Exception) -> Response:
            witness = await ambient.resolve(Witness)  # the scope is still open
            record.handle({"user": ambient.get_current_context().user_id, "witness": witness})
            return PlainTextResponse("failed", status_code=500)

        api.add_exception_handler(Exception, on_error)
        escaped = Escaped(app)
        async with client(escaped) as http:
            response = await http.get("/v1/boom", headers=ALICE)
        assert response.status_code == 500
        assert response.text == "failed"
        assert response.headers.get_list("x-request-id") == ["alice-1"]
        assert [seen["user"] for seen in record.handled] == ["alice"]
        assert record.cleanups == [("alice-1", "acme/alice")]
        assert [type(error) for error in escaped.errors] == [Boom]

    async def test_an_app_the_server_error_middleware_is_wrapped_around(self) -> None:
        """A stack whose build was wrapped before install() (an instrumentation's tracing
        middleware, with a ServerErrorMiddleware of its own, outside the app's): the app's
        500 handler, inside, still answers in the request's context and with its id, and
        the instrumentation's own layers stay in the stack."""
        registry, _ = build_registry()
        seen: list[str] = []
        traced: list[str] = []

        async def boom(request: Request) -> Response:
            raise Boom("acme", "alice", None)

        async def on_error(request: Request, exc: Exception) -> Response:
            seen.append(ambient.get_current_context().user_id)
            return PlainTextResponse("failed", status_code=500)

        app = Starlette(routes=[Route("/boom", boom)], exception_handlers={500: on_error})
        build = app.build_middleware_stack

        class Tracing:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                traced.append(scope["path"])
                await self.app(scope, receive, send)

        def instrumented() -> Any:
            return ServerErrorMiddleware(Tracing(build()))

        app.build_middleware_stack = instrumented  # type: ignore[method-assign]
        install(app, registry=registry, identity=IDENTITY)
        async with client(app) as http:
            response = await http.get("/boom", headers=ALICE)
        assert response.status_code == 500
        assert response.text == "failed"
        assert response.headers.get_list("x-request-id") == ["alice-1"]
        assert seen == ["alice"]
        assert traced == ["/boom"]

    async def test_the_documented_500_handler_names_the_failed_request(self) -> None:
        """The 500 handler of docs/frameworks.md, run as written on a FastAPI app: its body
        and its log line name the failed request."""
        app, _, record = build_app("fastapi", None, identity=failing_identity)
        log = logging.getLogger(f"tests.server_errors.{uuid.uuid4().hex}")
        log.propagate = False
        log.addHandler(Keep(record))
        namespace: dict[str, Any] = {
            "app": app,
            "ambient": ambient,
            "logger": log,
            "Request": Request,
            "Response": Response,
            "JSONResponse": JSONResponse,
        }
        exec(documented_code("docs/frameworks.md", "**A bug in a handler: the 500.**"), namespace)  # noqa: S102 - our own docs
        async with client(app) as http:
            response = await http.get("/boom", headers=ALICE)
            # A resolver's bug: no context, the id on the header only.
            unresolved = await http.get(
                "/resolver-bug", headers={**ALICE, "x-request-id": "alice-2"}
            )
        assert response.status_code == 500
        assert response.headers.get_list("x-request-id") == ["alice-1"]
        assert response.json() == {"error": "internal", "request_id": "alice-1"}
        assert unresolved.status_code == 500
        assert unresolved.headers.get_list("x-request-id") == ["alice-2"]
        assert unresolved.json() == {"error": "internal", "request_id": None}
        assert [
            (logged.user_id, logged.tenant_id, logged.request_id, logged.getMessage())
            for logged in record.records
        ] == [("alice", "acme", "alice-1", "unhandled error"), ("", "", "", "unhandled error")]
