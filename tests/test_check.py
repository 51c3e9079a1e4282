"""`ambient check`, the demo and the pytest kit: the demo passes, and deliberately broken
apps are each reported with a useful message."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import decimal
import enum
import itertools
import json
import logging
import random
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest
import sniffio
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import ambient
from ambient import Lifetime, Registry, UserExecutionContext
from ambient.check import (
    _MAX_SHOWN,
    CheckReport,
    JWTIdentity,
    PlannedRequest,
    _cut,
    _growth_findings,
    _percentiles,
    parse_request,
    run_check,
)
from ambient.cli import main
from ambient.demo.app import (
    CHECK_PLAN,
    CHECK_WEBSOCKET,
    ConversationStore,
    build_registry,
    create_app,
)
from ambient.middleware import AmbientMiddleware, Identity, trusted_header
from ambient.middleware.identity import jwt_bearer
from ambient.testing import IsolationProbe, IsolationReport

if TYPE_CHECKING:
    import httpx

pytest_plugins = ["pytester"]


async def check(app: Any, **options: Any) -> CheckReport:
    options.setdefault("users", 30)
    options.setdefault("requests", 6)
    options.setdefault("growth_requests", 0)
    options.setdefault("measure_overhead", False)
    return await run_check(app, **options)


class Notes:
    def __init__(self) -> None:
        self.owner = ""


def notes_app(registry: Registry, *, middleware: type | None = None) -> AmbientMiddleware:
    async def endpoint(request: Request) -> Response:
        notes = await ambient.resolve(Notes)
        user = ambient.get_current_context().user_id
        if not notes.owner:
            notes.owner = user
        return JSONResponse({"user": user, "notes_of": notes.owner})

    inner = Starlette(routes=[Route("/", endpoint)])
    if middleware is not None:
        inner.add_middleware(middleware)
    return AmbientMiddleware(inner, registry=registry, identity=trusted_header())


def warmed_up_app(correct_for: int, fault: str) -> AmbientMiddleware:
    """An app correct for its first ``correct_for`` requests and wrong in every one after
    them, as an app that breaks only once warm is (a cache that fills, a global set after
    so many requests, a pool that runs dry): ``fault`` says how. ``"body"`` and
    ``"header"`` answer with the last other user served in the body or in a header,
    ``"status"`` with a 503, ``"raise"`` raises."""
    answered: list[str] = []

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        warm = len(answered) >= correct_for
        previous = next((other for other in reversed(answered) if other != user), user)
        answered.append(user)
        if not warm:
            return JSONResponse({"user": user})
        if fault == "body":
            return JSONResponse({"user": user, "cached_for": previous})
        if fault == "header":
            return JSONResponse({"user": user}, headers={"x-cached-for": previous})
        if fault == "status":
            return JSONResponse({"error": "the pool is exhausted"}, status_code=503)
        raise RuntimeError("the pool is exhausted")

    return AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
    )


def resolving_app(registry: Registry, key: Any) -> AmbientMiddleware:
    """An app whose one endpoint resolves ``key`` and answers with the user's id."""

    async def endpoint(request: Request) -> Response:
        await ambient.resolve(key)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    return AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=registry, identity=trusted_header()
    )


def shutting_down_with(inner: Any, shutdown: Callable[[], Awaitable[object]]) -> Any:
    """``inner`` (an ASGI app) under a lifespan of its own: it starts at once, and at
    shutdown awaits ``shutdown`` before it answers that it is done."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    return app


def _demo_database(anyio_backend: str = "asyncio") -> str | None:
    """The test database's URL for the demo, once PostgreSQL answers (else the test is
    skipped, or fails where the services are required); ``None`` on trio, once the demo
    refused to run on PostgreSQL there (psycopg's async pool is asyncio-only)."""
    import psycopg

    from ambient.errors import UnsupportedBackendError
    from tests.conftest import DATABASE_URL, service_unavailable

    try:
        with psycopg.connect(DATABASE_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
    if anyio_backend == "trio":
        with pytest.raises(UnsupportedBackendError, match="asyncio"):
            create_app(database_url=DATABASE_URL)
        return None
    return DATABASE_URL


async def _demo_store(anyio_backend: str, store: str) -> str | None:
    """The demo's ``database_url`` for ``store``: ``""`` in memory, or the test database
    with the demo's schema made; ``None`` as :func:`_demo_database` gives it."""
    if store == "memory":
        return ""
    from ambient.demo.app import create_schema

    if (found := _demo_database(anyio_backend)) is not None:
        await create_schema(found)
    return found


@contextlib.asynccontextmanager
async def _demo_client(
    app: Any, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client (from 127.0.0.1) of the demo ``app``. There is no lifespan
    here: on the way out the app's registry (the users' stores) is closed as shutdown
    would."""
    import httpx

    transport = httpx.ASGITransport(
        app=app, client=("127.0.0.1", 1), raise_app_exceptions=raise_app_exceptions
    )
    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(transport=transport, base_url="http://demo") as http,
    ):
        stack.push_async_callback(app.registry.aclose)
        yield http


class TestTheDemo:
    async def test_the_demo_passes_with_numbers_that_add_up(self) -> None:
        report = await check(create_app(), plan=CHECK_PLAN, growth_requests=400)
        assert report.ok, report.violations
        assert report.requests == 180
        assert report.scopes == 180
        # 3 POST runs x 3 request components + 1 store per user, all cleaned once.
        assert report.components_created == report.components_cleaned > 180
        assert set(report.latency_ms) == {"p50", "p95", "p99", "max"}
        assert report.throughput_rps > 0
        assert report.memory_growth_kib_per_1k < 64

    async def test_a_short_memory_measurement_is_no_leak_by_extrapolation(self) -> None:
        """Measured over 20 requests, what the demo allocates once (caches filling) was
        multiplied by 50 into "memory grew 600 KiB per 1,000 requests": a leak reported in
        a correct app. Fewer than 1,000 requests are held to the limit in all."""
        report = await check(create_app(), plan=CHECK_PLAN, users=5, requests=2, growth_requests=20)
        assert report.leaks == []

    async def test_memory_growth_skipped_is_not_reported_as_measured(self) -> None:
        """``growth_requests=0`` skips the memory phase: the report has no growth figure
        (``None``, as ``middleware_overhead_us`` without its measurement), not 0.0 KiB, a
        reading that was never taken."""
        skipped = await check(create_app(), plan=CHECK_PLAN, users=3, requests=2)
        assert skipped.ok, skipped.violations
        assert skipped.memory_growth_kib_per_1k is None
        measured = await check(
            create_app(), plan=CHECK_PLAN, users=3, requests=2, growth_requests=20
        )
        assert isinstance(measured.memory_growth_kib_per_1k, float)

    async def test_log_records_a_host_keeps_are_not_counted_as_the_apps_growth(self) -> None:
        """A host that logs the app at INFO into a handler keeping every record (a test
        runner's capture, a buffer): the memory phase counted what those records hold as
        the app's growth and reported a leak in a correct app."""
        kept: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                kept.append(record)

        demo_log = logging.getLogger("ambient.demo")
        handler = Keep(logging.INFO)
        old_level = demo_log.level
        demo_log.addHandler(handler)
        demo_log.setLevel(logging.INFO)
        try:
            report = await check(create_app(), plan=CHECK_PLAN, growth_requests=400)
        finally:
            demo_log.removeHandler(handler)
            demo_log.setLevel(old_level)
        assert kept  # the app did log at INFO during the run
        assert report.ok, report.violations

    async def test_the_demo_answers_each_user_with_their_own_history(self) -> None:

        app = create_app()
        async with _demo_client(app) as http:
            for user in ("alice", "bob"):
                response = await http.post(
                    "/agents/triage/runs",
                    json={"prompt": f"remember milk for {user}"},
                    headers={"x-user-id": user},
                )
                assert response.json()["answer"] == f"noted: milk for {user}"
            calc = await http.post(
                "/agents/research/runs",
                json={"prompt": "calc 2 * (3 + 4)"},
                headers={"x-user-id": "alice"},
            )
            history = await http.get("/history", headers={"x-user-id": "bob"})
            bad = await http.post(
                "/agents/nobody/runs", json={"prompt": "hi"}, headers={"x-user-id": "bob"}
            )
            empty = await http.post(
                "/agents/triage/runs", json={"prompt": ""}, headers={"x-user-id": "bob"}
            )
            unsafe = await http.post(
                "/agents/research/runs",
                json={"prompt": "calc __import__('os')"},
                headers={"x-user-id": "bob"},
            )
        assert calc.json()["answer"] == "14"
        texts = [m["text"] for m in history.json()["messages"]]
        assert "milk for bob" in texts
        assert not any("alice" in text for text in texts)
        assert bad.status_code == 404
        assert empty.status_code == 400
        assert unsafe.json()["answer"].startswith("cannot calculate")

    async def test_a_components_lookup_error_is_a_500_not_the_unknown_agents_404(
        self,
    ) -> None:
        """A KeyError raised by a component during a run (a bug) was taken for the unknown
        agent's LookupError: a 404 whose detail was the KeyError's text, what the server
        was looking up and where. It is the server's 500 now, which says nothing of it;
        an unknown agent is still a 404 that names the agents there are."""

        class BrokenStore(ConversationStore):
            async def add(self, thread_id: str, role: str, text: str) -> None:
                raise KeyError("tenant 'acme' has no shard in the map at 10.0.0.9")

        registry = build_registry()
        registry.register(ConversationStore, BrokenStore, lifetime=Lifetime.USER, replace=True)
        app = create_app(registry=registry)
        async with _demo_client(app, raise_app_exceptions=False) as http:
            broken = await http.post(
                "/agents/triage/runs", json={"prompt": "hi"}, headers={"x-user-id": "bob"}
            )
            unknown = await http.post(
                "/agents/nobody/runs", json={"prompt": "hi"}, headers={"x-user-id": "bob"}
            )
        assert broken.status_code == 500
        assert "10.0.0.9" not in broken.text
        assert unknown.status_code == 404
        assert unknown.json()["detail"] == "unknown agent 'nobody'; try one of triage, research"

    async def test_a_body_nested_too_deeply_is_a_400_problem_not_a_500(self) -> None:
        """A JSON body of arrays or objects nested 5,000 deep made the JSON parser raise
        RecursionError, which the run route did not take for a bad body: a 500. It is the
        400 problem of a body that is not JSON now, and each problem's title is its
        status's (an unknown agent's 404 was titled "Bad request")."""

        app = create_app(database_url="")
        headers = {"x-user-id": "bob", "content-type": "application/json"}
        async with _demo_client(app, raise_app_exceptions=False) as http:
            nested = [
                await http.post("/agents/triage/runs", content=body, headers=headers)
                for body in ("[" * 20_000, '{"prompt": ' * 5_000, "[" * 20_000 + "]" * 20_000)
            ]
            unknown = await http.post(
                "/agents/nobody/runs", json={"prompt": "hi"}, headers={"x-user-id": "bob"}
            )
            after = await http.post(
                "/agents/research/runs", json={"prompt": "calc 6 * 7"}, headers=headers
            )
        for response in nested:
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json() == {
                "type": "about:blank",
                "title": "Bad Request",
                "status": 400,
                "detail": 'the body must be JSON like {"prompt": "calc 1 + 2"}',
            }
        assert unknown.status_code == 404
        assert unknown.json()["title"] == "Not Found"
        assert after.json()["answer"] == "42"

    async def test_a_run_refuses_each_prompt_that_is_no_text_and_calculates_only_arithmetic(
        self,
    ) -> None:
        """The run route answers 400 to a body that is no object, a prompt that is no
        string, only blanks or over 4,000 characters (one of 4,000 is run), and its
        calculator answers arithmetic only: a power, a bitwise sign, a quoted number, a
        division by zero, a half expression and signs nested past what the parser takes
        are each said to be beyond it, not evaluated and not a 500."""

        app = create_app(database_url="")
        headers = {"x-user-id": "bob"}
        async with _demo_client(app, raise_app_exceptions=False) as http:

            async def run(body: object) -> httpx.Response:
                return await http.post("/agents/research/runs", json=body, headers=headers)

            refused = [
                await run(body)
                for body in (
                    ["calc 1 + 2"],
                    "calc 1 + 2",
                    {"prompt": 3},
                    {"prompt": ["calc 1 + 2"]},
                    {"prompt": " \t\n "},
                    {"prompt": "x" * 4001},
                )
            ]
            longest = await run({"prompt": "x" * 4000})
            answers = [
                (await run({"prompt": f"calc {expression}"})).json()["answer"]
                for expression in ("2 ** 3", "~1", "'12'", "1 / 0", "1 +", "-" * 3990 + "1")
            ]
        for response in refused:
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["detail"] == (
                "'prompt' must be a non-empty string of at most 4000 characters"
            )
        assert longest.status_code == 200
        assert longest.json()["answer"] == "you said: " + "x" * 4000
        assert [answer.startswith("cannot calculate") for answer in answers] == [True] * 6, answers

    def test_a_body_longer_than_a_run_needs_is_refused_unread(self) -> None:
        """A run's body of any length was read whole into memory and run when its prompt
        was short (a megabyte of padding beside it): one over 64 KiB is a 413 problem now,
        read no further, and the longest prompt, every character escaped as a surrogate
        pair, still fits."""
        import httpx

        from tests.servers import serve

        headers = {"x-user-id": "bob", "content-type": "application/json"}
        padded = json.dumps({"prompt": "hi", "pad": "y" * 1_000_000})
        over = json.dumps({"prompt": "hi", "pad": ""})
        over = over.replace('""', '"' + "y" * (65537 - len(over)) + '"')  # one byte over
        longest = json.dumps({"prompt": "\U0001f600" * 4000})
        assert len(longest) > 48_000
        with (
            serve("uvicorn", create_app(database_url="")) as base,
            httpx.Client(base_url=base, headers=headers) as http,
        ):
            padding = http.post("/agents/triage/runs", content=padded)
            just_over = http.post("/agents/triage/runs", content=over)
            fits = http.post("/agents/triage/runs", content=longest)
        assert padding.status_code == 413, padding.text
        assert just_over.status_code == 413, just_over.text
        assert padding.headers["content-type"] == "application/problem+json"
        assert padding.json()["detail"] == "the body must be at most 65536 bytes"
        assert fits.status_code == 200, fits.text
        assert fits.json()["answer"] == "you said: " + "\U0001f600" * 4000

    def test_a_prompt_it_cannot_calculate_is_answered_and_the_socket_lives_on(self) -> None:
        """A 400-digit number (float overflow) and a 1500-term sum or 1500 minus signs
        (recursion) used to end the request with 500, and the user's /events socket with
        it; now the answer says it cannot calculate them. On the socket, an empty frame is
        run as a greeting and a long one cut to a prompt's 4,000 characters."""
        _prompts_the_demo_cannot_answer(create_app(database_url=""))

    def test_the_demo_on_postgresql_refuses_a_prompt_it_cannot_store(self) -> None:
        """A NUL character ("\\u0000" in JSON), which PostgreSQL text refuses, used to end
        the request with 500 and the /events socket with it; now it is a 400 problem, or a
        run.refused event on the socket, and nothing is stored. A binary frame on the
        socket ended it with an error (the route read only text frames); now it is
        refused with a run.refused event, and the socket lives on."""
        _prompts_the_demo_cannot_answer(create_app(database_url=_demo_database()))

    @pytest.mark.parametrize("store", ["memory", "postgresql"])
    async def test_each_user_recalls_their_own_notes_and_keeps_their_last_fifty_messages(
        self, anyio_backend: str, store: str
    ) -> None:
        """``recall`` (in any case) answers with the user's own notes, or says there are
        none yet, and names the tool it called; /history is the user's last 50 messages,
        oldest first: in memory and in PostgreSQL alike. Its calculator subtracts, negates and
        adds up a sum of 150 terms."""

        if (database_url := await _demo_store(anyio_backend, store)) is None:
            return  # on trio, once the demo refused PostgreSQL (see _demo_database)
        app = create_app(database_url=database_url)
        # Users of their own: the PostgreSQL table outlives the test.
        alice, bob = (f"{name}-{uuid.uuid4().hex}" for name in ("alice", "bob"))
        async with _demo_client(app) as http:

            async def run(user: str, prompt: str) -> dict[str, Any]:
                response = await http.post(
                    "/agents/triage/runs", json={"prompt": prompt}, headers={"x-user-id": user}
                )
                assert response.status_code == 200, response.text
                result: dict[str, Any] = response.json()
                assert result["user"] == user
                return result

            nothing = await run(bob, "recall")
            await run(alice, "remember milk")
            await run(alice, "Remember eggs")
            await run(bob, "remember bread")
            recalled = {
                user: await run(user, prompt)
                for user, prompt in ((alice, "RECALL"), (bob, "recall"))
            }
            # 8 messages so far (a note is one more beside the prompt and the answer): 25
            # runs more push the first 8 out of the last 50.
            for i in range(25):
                await run(alice, f"calc 1 + {i}")
            history = (await http.get("/history", headers={"x-user-id": alice})).json()
            calculated = [
                (await run(bob, f"calc {expression}"))["answer"]
                for expression in ("-(1 + 2 + 3 + 4 + 5) - 6 * 2", "7 / 2", "+".join(["1"] * 150))
            ]
        assert calculated == ["-27", "3.5", "150"]
        assert nothing["answer"] == "nothing noted yet"
        assert nothing["tools"] == ["recall"]
        assert recalled[alice]["answer"] == "milk; eggs"
        assert recalled[bob]["answer"] == "bread"
        assert history["user"] == alice
        texts = [message["text"] for message in history["messages"]]
        assert len(texts) == 50
        assert texts[:3] == ["calc 1 + 0", "1", "calc 1 + 1"]
        assert texts[-1] == "25"
        assert {message["role"] for message in history["messages"]} == {"user", "agent"}

    async def test_a_users_store_forgets_their_history_when_it_is_cleaned(self) -> None:
        """The in-memory store of a user, cleaned at shutdown, drops the
        conversation it held; the whoami route answers with the user's id and tenant; a body
        of exactly 64 KiB is still run, and an unknown agent's problem says its 404."""

        registry = build_registry()
        async with registry.open_scope(UserExecutionContext.create("alice")):
            store = await ambient.resolve(ConversationStore)
            await store.add("thread", "user", "hello")
            assert await store.history() == [
                {"thread_id": "thread", "role": "user", "text": "hello"}
            ]
        assert await store.history()  # kept for the user's next request
        await registry.aclose()
        assert await store.history() == []
        app = create_app()
        async with _demo_client(app) as http:
            who = await http.get("/whoami", headers={"x-user-id": "bob", "x-tenant-id": "acme"})
            unknown = await http.post(
                "/agents/nobody/runs", json={"prompt": "hi"}, headers={"x-user-id": "bob"}
            )
            body = json.dumps({"prompt": "hi", "pad": ""})
            body = body.replace('""', '"' + "y" * (65536 - len(body)) + '"')
            assert len(body.encode()) == 65536
            fits = await http.post(
                "/agents/triage/runs",
                content=body,
                headers={"x-user-id": "bob", "content-type": "application/json"},
            )
        assert who.status_code == 200, who.text
        assert (who.json()["user"], who.json()["tenant"]) == ("bob", "acme")
        assert fits.status_code == 200, fits.text
        assert (unknown.status_code, unknown.json()["status"]) == (404, 404)

    @pytest.mark.parametrize("store", ["memory", "postgresql"])
    async def test_a_users_notes_are_theirs_in_their_tenant_and_thread_only(
        self, anyio_backend: str, store: str
    ) -> None:
        """One user id in two tenants is two users: a note remembered in one tenant is
        recalled there, with the thread it was taken in, and not in the other (in memory
        and in PostgreSQL, whose rows carry the tenant the pool set). The calculator takes
        decimals too."""
        if (database_url := await _demo_store(anyio_backend, store)) is None:
            return  # on trio, once the demo refused PostgreSQL (see _demo_database)
        app = create_app(database_url=database_url)
        # A user of its own: the PostgreSQL table outlives the test.
        user = f"alice-{uuid.uuid4().hex}"
        acme = {"x-user-id": user, "x-tenant-id": "acme", "x-thread-id": "thread-acme"}
        beta = {"x-user-id": user, "x-tenant-id": "beta"}
        async with _demo_client(app) as http:

            async def run(headers: dict[str, str], prompt: str) -> str:
                response = await http.post(
                    "/agents/research/runs", json={"prompt": prompt}, headers=headers
                )
                assert response.status_code == 200, response.text
                answer: str = response.json()["answer"]
                return answer

            noted = await run(acme, "remember milk")
            elsewhere = await run(beta, "recall")
            recalled = await run(acme, "recall")
            calculated = await run(beta, "calc 1.5 * 3")
            history = (await http.get("/history", headers=acme)).json()
            others = (await http.get("/history", headers=beta)).json()
        assert (noted, elsewhere, recalled) == ("noted: milk", "nothing noted yet", "milk")
        assert calculated == "4.5"
        notes = [m for m in history["messages"] if m["role"] == "note"]
        assert notes == [{"thread_id": "thread-acme", "role": "note", "text": "milk"}]
        assert "milk" not in json.dumps(others)

    async def test_a_requests_components_let_go_of_its_run_when_cleaned(self) -> None:
        """The tool dispatcher and the agent factory of a request hold what its run did
        (the tools it called, the agents it made, each bound to the run) until the request
        ends, and nothing of it after their cleanup: a reference kept to either past the
        request (a log record's arguments, a debugger) keeps no user's run alive."""
        from ambient.demo.app import AgentInstanceFactory, ExecutionEngine, ToolDispatcher

        registry = build_registry()
        ctx = UserExecutionContext.create("alice")
        async with registry.open_scope(ctx):
            engine = await ambient.resolve(ExecutionEngine)
            result = await engine.run("triage", "calc 2 * 3")
            tools = await ambient.resolve(ToolDispatcher)
            agents = await ambient.resolve(AgentInstanceFactory)
            assert (result["answer"], result["tools"]) == ("6", ["calc"])
            assert engine.agents is agents
            assert agents.tools is tools
            assert tools.calls == ["calc"]
            assert [(a.name, a.ctx.parent_run_id) for a in agents.created] == [
                ("triage", ctx.run_id)
            ]
            # The run is the agent's own, a child of the request's.
            assert result["run_id"] == agents.created[0].ctx.run_id != ctx.run_id
        assert (tools.calls, agents.created) == ([], [])
        assert result["tools"] == ["calc"]  # the answer given is not emptied with them
        await registry.aclose()

    async def test_one_user_has_at_most_fifty_requests_in_flight(self) -> None:
        """A user whose 50 runs are still sending their bodies gets a 429 for one more,
        while another user is served: one user cannot take every worker of the demo. The
        50 then end as usual."""
        arrived = 0
        all_in, finish = anyio.Event(), anyio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            nonlocal arrived
            yield b'{"prompt": '
            arrived += 1  # the app reads on: the middleware let the request in
            if arrived == 50:
                all_in.set()
            await finish.wait()
            yield b'"calc 1 + 1"}'

        app = create_app()
        statuses: list[int] = []
        async with _demo_client(app) as http:

            async def run() -> None:
                response = await http.post(
                    "/agents/triage/runs", content=slow_body(), headers={"x-user-id": "alice"}
                )
                statuses.append(response.status_code)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(run)
                    await all_in.wait()
                    refused = await http.get("/whoami", headers={"x-user-id": "alice"})
                    other = await http.get("/whoami", headers={"x-user-id": "bob"})
                    finish.set()
        assert (refused.status_code, other.status_code) == (429, 200)
        assert statuses == [200] * 50


def _prompts_the_demo_cannot_answer(app: AmbientMiddleware) -> None:
    """Send what the demo can neither calculate nor store, over HTTP and over the user's
    socket on real uvicorn; then check both still answer and nothing unstorable was kept."""
    import uuid

    import httpx
    from websockets.sync.client import connect

    from tests.servers import serve

    uncomputable = [
        "calc 1" + "0" * 400,
        "calc " + "+".join(["1"] * 1500),
        "calc " + "-" * 1500 + "1",
    ]
    unstorable = ["remember a\x00b", "remember \ud800"]
    user = f"refused-{uuid.uuid4().hex}"
    headers = {"x-user-id": user}
    with serve("uvicorn", app) as base, httpx.Client(base_url=base, headers=headers) as http:
        for prompt in uncomputable:
            response = http.post("/agents/research/runs", json={"prompt": prompt})
            assert response.status_code == 200, response.text
            assert response.json()["answer"].startswith("cannot calculate")
        for prompt in unstorable:
            response = http.post(
                "/agents/research/runs",
                content=json.dumps({"prompt": prompt}),
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/problem+json"
        with connect(
            base.replace("http://", "ws://") + "/events", additional_headers=headers
        ) as sock:
            assert json.loads(sock.recv(timeout=20))["type"] == "ready"
            sent = [*uncomputable, "remember a\x00b", b"calc 1", "", "y" * 5000, "calc 20 + 22"]
            for prompt in sent:
                sock.send(prompt)
            frames = [json.loads(sock.recv(timeout=20))]
            while frames[-1].get("answer") != "42":
                frames.append(json.loads(sock.recv(timeout=20)))
        answers = [f["answer"] for f in frames if f["type"] == "run.done"]
        assert len(answers) == 6
        assert all(answer.startswith("cannot calculate") for answer in answers[:3])
        # An empty frame is a greeting, a long one cut to the 4,000 characters of a prompt.
        assert answers[3:5] == ["you said: hello", "you said: " + "y" * 4000]
        refused = [f["detail"] for f in frames if f["type"] == "run.refused"]
        assert refused == [
            "'prompt' must not contain NUL characters",
            "a prompt must be sent as a text frame, not a binary one",
        ]
        texts = [m["text"] for m in http.get("/history").json()["messages"]]
    assert "calc 20 + 22" in texts
    assert not any("\x00" in text or "\ud800" in text for text in texts)


def _logs_the_cart_lookup_of_the_user_before(
    log: logging.Logger, message: str
) -> tuple[AmbientMiddleware, list[str]]:
    """An app whose requests each look up the cart of the user served before and log the
    failure with its exception (``message``, given that user when it has a ``%s``); and
    the users it served, in order."""
    last: list[str] = []

    def cart_of(user: str) -> None:
        raise LookupError(f"no cart for {user}")

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        if last:
            try:
                cart_of(last[-1])  # the one before's cart
            except LookupError:
                log.exception(message, *([last[-1]] if "%s" in message else []))
        last.append(user)
        return JSONResponse({"user": user})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
    )
    return app, last


class TestBrokenApps:
    async def test_a_component_cached_in_a_module_global(self) -> None:
        shared = Notes()
        registry = Registry()
        registry.register(Notes, lambda: shared)  # every user gets the same object
        report = await check(notes_app(registry))
        assert not report.ok
        assert any("one instance was handed to users" in line for line in report.isolation)
        assert any("contains" in line and "data" in line for line in report.isolation)

    async def test_a_user_kept_in_a_global_shows_with_users_in_flight_together(self) -> None:
        """The user of a request kept in a module global until its answer (what the
        middleware exists to prevent) reaches another user only when their requests are in
        flight together: the check runs its users so, and each answer naming the last
        user to arrive, for the others, is found."""
        users = 4
        current: dict[str, str] = {}
        arrived: list[str] = []
        everyone = anyio.Event()

        async def endpoint(request: Request) -> Response:
            current["user"] = ambient.get_current_context().user_id
            arrived.append(current["user"])
            if len(arrived) == users:
                everyone.set()
            await everyone.wait()  # answered once every user's request has begun
            return JSONResponse({"user": current["user"]})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
        )
        report = await check(app, users=users, requests=1, time_limit=5)
        assert report.failed_requests == []
        assert len(report.isolation) == users - 1, report.isolation
        said = rf"GET /: the response for check-\d{{5}}-[0-9a-f]{{6}} contains {arrived[-1]}'s data"
        assert all(re.fullmatch(said, line) for line in report.isolation), report.isolation

    async def test_request_components_kept_in_a_global_list(self) -> None:
        """Each request's component appended to a module-level list outlives its scope,
        though no scope is kept: reported among the leaks."""
        kept: list[Notes] = []
        registry = Registry()
        registry.register(Notes, Notes)

        async def endpoint(request: Request) -> Response:
            kept.append(await ambient.resolve(Notes))
            return JSONResponse({"user": ambient.get_current_context().user_id})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=registry, identity=trusted_header()
        )
        report = await check(app, users=5, requests=2)
        assert len(kept) == 10
        assert not report.ok
        assert [line.split(": ", 1)[1] for line in report.leaks] == [
            "10 instance(s) still alive after their scope closed (referenced from a global, "
            "a cache or a pending task?)"
        ]

    def test_growth_at_the_limit_is_no_leak(self) -> None:
        """max_growth_kib is the growth tolerated: at the limit per 1,000 requests (or, over
        fewer, in all) memory is not leaking; above it, it is."""
        assert _growth_findings(64.0, 1000, 64.0) == []
        assert _growth_findings(128.0, 500, 64.0) == []
        assert _growth_findings(64.5, 1000, 64.0) == [
            "memory grew 64.5 KiB per 1,000 requests (limit 64) after warm-up"
        ]
        assert len(_growth_findings(129.0, 500, 64.0)) == 1

    @pytest.mark.parametrize("lifespan", ["none", "forgets the registry"])
    async def test_user_components_are_held_to_a_cleanup_after_a_completed_shutdown(
        self, lifespan: str
    ) -> None:
        """USER components must be cleaned by the end of a check only when the app's
        lifespan shutdown completed: an app without lifespan support is not told to close
        anything, one whose shutdown completes without closing its registry leaks them."""

        class Memory:
            def close(self) -> None:
                pass

        registry = Registry()
        registry.register(Memory, Memory, lifetime=Lifetime.USER)

        inner = resolving_app(registry, Memory)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                await inner(scope, receive, send)
                return
            if lifespan == "none":
                msg = "no lifespan here"
                raise RuntimeError(msg)
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

        report = await check(app, users=3, requests=2)
        # Counted as they are, whether or not they are held to a cleanup.
        assert (report.components_created, report.components_cleaned) == (3, 0)
        if lifespan == "none":
            assert report.ok, report.violations
        else:
            assert [line.split("<locals>.")[-1] for line in report.cleanup] == [
                "Memory: 3 instance(s) created but never cleaned"
            ]
        await registry.aclose()

    async def test_a_scope_the_shutdown_leaves_open_after_the_memory_measurement(self) -> None:
        """The memory measurement records no new scope, but what the app does after it,
        in its lifespan shutdown, is checked again: a scope its shutdown opens and never
        closes is reported."""
        registry = Registry()
        registry.register(Notes, Notes)
        inner = notes_app(registry)
        forgotten: list[Any] = []

        async def forget_a_scope() -> None:
            job = registry.open_scope(UserExecutionContext.create("shutdown-job"))
            await job.__aenter__()  # a job that never closes its scope
            await job.resolve(Notes)
            forgotten.append(job)

        app = shutting_down_with(inner, forget_a_scope)
        try:
            report = await check(app, users=3, requests=2, growth_requests=20)
        finally:
            for job in forgotten:
                await job.__aexit__(None, None, None)
        assert len(forgotten) == 1
        assert not report.ok
        assert any("shutdown-job" in line for line in report.cleanup), report.cleanup

    async def test_a_component_cleaned_at_the_end_of_every_request_of_its_user(self) -> None:
        """A REQUEST registration whose factory hands each user the one object it keeps
        for them (a per-user cache behind it) has that object cleaned at the end of every
        request of its user: each is reported cleaned more than once, and alive after its
        scopes closed."""

        class Cart(CountsCloses):
            pass

        carts: dict[str, Cart] = {}
        registry = Registry()
        registry.register(
            Cart, lambda: carts.setdefault(ambient.get_current_context().user_id, Cart())
        )

        app = resolving_app(registry, Cart)
        report = await check(app, users=3, requests=2)
        assert [cart.closes for cart in carts.values()] == [2, 2, 2]
        assert not report.ok
        assert report.isolation == []
        assert [line.split("<locals>.")[-1] for line in report.cleanup] == [
            "Cart: cleaned more than once"
        ] * 3
        assert [line.split("<locals>.")[-1] for line in report.leaks] == [
            "Cart: 3 instance(s) still alive after their scope closed (referenced from a "
            "global, a cache or a pending task?)"
        ]

    async def test_a_cleanup_that_never_runs(self) -> None:
        # The app's shutdown waits up to cleanup_timeout for the scopes left open.
        registry = Registry(cleanup_timeout=0.5)
        registry.register(Notes, Notes)

        async def endpoint(request: Request) -> Response:
            ctx = ambient.get_current_context()
            # A sub-scope opened by hand and never closed: its cleanup never runs.
            forgotten = registry.open_scope(ctx.child("sub-agent"))
            await forgotten.__aenter__()
            await ambient.resolve(Notes)
            return JSONResponse({"user": ctx.user_id})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]),
            registry=registry,
            identity=trusted_header(),
        )
        with pytest.warns(ResourceWarning, match="garbage-collected"):
            report = await check(app, users=5, requests=2)
        assert not report.ok
        assert any("opened and never closed" in line for line in report.cleanup)
        assert any(
            line.endswith("(garbage-collected: its cleanups never ran)") for line in report.cleanup
        )
        assert any("never cleaned" in line for line in report.cleanup)

    async def test_a_context_leaking_into_a_fire_and_forget_task(self) -> None:
        registry = Registry()
        registry.register(Notes, Notes)
        group: list[anyio.abc.TaskGroup] = []

        async def lingering() -> None:
            await anyio.sleep_forever()  # holds the request's context, and its scope

        async def endpoint(request: Request) -> Response:
            await ambient.resolve(Notes)
            group[0].start_soon(lingering)  # inherits the request's context
            return JSONResponse({"user": ambient.get_current_context().user_id})

        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with anyio.create_task_group() as tg:
                group.append(tg)
                yield
                tg.cancel_scope.cancel()

        inner = Starlette(routes=[Route("/", endpoint)], lifespan=contextlib_lifespan(lifespan))
        app = AmbientMiddleware(inner, registry=registry, identity=trusted_header())
        report = await check(app, users=5, requests=2)
        assert not report.ok
        assert report.cleanup == []
        assert any("still alive" in line and "pending task" in line for line in report.leaks)

    async def test_a_base_http_middleware_that_drops_the_context(self) -> None:
        registry = Registry()
        registry.register(Notes, Notes)
        report = await check(notes_app(registry, middleware=ContextDropper), users=5)
        assert not report.ok
        assert report.failed_requests
        assert "NoActiveContextError" in report.failed_requests[0]

    @pytest.mark.parametrize("propagates", [True, False])
    async def test_a_log_record_naming_another_user(
        self, propagates: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Also from a logger with handlers of its own that does not propagate to the root
        (the check used to watch the root's records only, and passed such an app)."""
        last: list[str] = []
        log = logging.getLogger(f"tests.chatty.{propagates}")
        monkeypatch.setattr(log, "propagate", propagates)
        monkeypatch.setattr(log, "handlers", [logging.NullHandler()])
        factory = logging.getLogRecordFactory()

        async def endpoint(request: Request) -> Response:
            user = ambient.get_current_context().user_id
            if last:
                log.info("previous request was by %s", last[-1])  # leaks who came before
            last.append(user)
            return JSONResponse({"user": user})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]),
            registry=Registry(),
            identity=trusted_header(),
        )
        report = await check(app, users=10, requests=3)
        assert any(f"log record from {log.name}" in line for line in report.isolation)
        assert logging.getLogRecordFactory() is factory  # put back

    async def test_another_users_id_in_an_exception_logged_for_a_user(self) -> None:
        """``logger.exception()`` writes the exception out with the record: one naming the
        user who came before reaches the log as surely as a message naming them (the check
        read only the message, and passed such an app)."""
        log = logging.getLogger("tests.failing")
        app, _ = _logs_the_cart_lookup_of_the_user_before(log, "the cart lookup failed")
        report = await check(app, users=10, requests=3)
        assert not report.ok
        found = [line for line in report.isolation if line.startswith("log record from")]
        assert found
        assert all(
            f"log record from {log.name} emitted for " in line
            and " in the exception logged with it: 'LookupError: no cart for check-" in line
            for line in found
        ), found

    async def test_a_record_naming_another_user_twice_is_one_finding(self) -> None:
        """A record whose message and logged exception name the same other user is one
        finding (said for its message), not two: the findings count what leaked, once."""
        log = logging.getLogger("tests.failing.twice")
        app, last = _logs_the_cart_lookup_of_the_user_before(log, "the cart lookup for %s failed")
        report = await check(app, users=2, requests=1)
        assert len(last) == 2
        assert len(report.isolation) == 1, report.isolation
        assert report.isolation[0].startswith(f"log record from {log.name} emitted for ")
        assert report.isolation[0].endswith(
            f"names {last[0]}: 'the cart lookup for {last[0]} failed'"
        )

    async def test_an_exception_logged_in_a_request_keeps_no_scope_alive(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A record logged with its exception (``logger.exception``, as Django logs every
        500 and every disallowed host) holds the traceback, and through the frames of a
        worker thread the request ran code in, the request's Context and scope: the check
        kept each thread's latest such record to read its extra fields later, and reported
        those scopes as leaked by the app."""
        log = logging.getLogger("tests.handled")
        # Written out and dropped, as a production handler does (pytest's capture keeps them).
        monkeypatch.setattr(log, "propagate", False)
        monkeypatch.setattr(log, "handlers", [logging.NullHandler()])

        def load_cart() -> None:
            raise LookupError("no cart yet")

        async def endpoint(request: Request) -> Response:
            try:
                # The worker thread's frame, in the traceback, holds the request's Context.
                await anyio.to_thread.run_sync(load_cart)
            except LookupError:
                log.exception("the cart lookup failed")  # handled: the answer is a 200
            return JSONResponse({"user": ambient.get_current_context().user_id})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]),
            registry=Registry(),
            identity=trusted_header(),
        )
        report = await check(app, users=5, requests=2)
        assert report.leaks == []
        assert report.ok

    @pytest.mark.parametrize("in_a_thread", [False, True], ids=["async", "sync"])
    async def test_another_users_id_in_an_extra_field_of_a_log_record(
        self, in_a_thread: bool
    ) -> None:
        """A field given as ``extra`` is written out by structured logs: one naming the user
        who came before is found, in an ``async def`` endpoint and in a plain ``def`` one
        (run in a worker thread). The logger sets those fields after the record is made,
        where the check looked, and it passed such an app."""
        last: list[str] = []
        log = logging.getLogger("tests.structured")

        def serve() -> dict[str, str]:
            user = ambient.get_current_context().user_id
            if last:
                log.info("cart loaded", extra={"cart_owner": last[-1]})  # the one before's
            last.append(user)
            return {"user": user}

        async def endpoint(request: Request) -> Response:
            return JSONResponse(serve())

        def sync_endpoint(request: Request) -> Response:
            return JSONResponse(serve())

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", sync_endpoint if in_a_thread else endpoint)]),
            registry=Registry(),
            identity=trusted_header(),
        )
        report = await check(app, users=10, requests=3)
        assert not report.ok
        found = [line for line in report.isolation if line.startswith("log record from")]
        assert found
        assert all(
            f"log record from {log.name} emitted for " in line
            and " in its field 'cart_owner': 'check-" in line
            for line in found
        ), found

    async def test_another_users_id_in_an_extra_field_while_memory_is_measured(self) -> None:
        """The requests of the memory measurement are watched too: a record logged in one
        of them with an extra field naming another user is found, though no record comes
        after it in its thread to have its fields read."""
        served: list[str] = []
        log = logging.getLogger("tests.structured.measured")

        async def endpoint(request: Request) -> Response:
            user = ambient.get_current_context().user_id
            served.append(user)
            if len(served) == 7:  # the first request of the memory measurement
                other = next(u for u in served if u != user)
                log.warning("cart loaded", extra={"cart_owner": other})
            return JSONResponse({"user": user})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
        )
        report = await check(app, users=3, requests=2, growth_requests=20)
        assert len(served) == 6 + 2 * 20
        found = [line for line in report.isolation if line.startswith("log record from")]
        assert len(found) == 1, report.isolation
        assert f"log record from {log.name} emitted for {served[6]} names " in found[0]
        assert " in its field 'cart_owner': 'check-" in found[0]

    @pytest.mark.parametrize("header", ["set-cookie", "x-previous-user"])
    async def test_another_users_id_in_a_response_header(self, header: str) -> None:
        """A cookie or a header that carries the previous request's user reaches the next
        user as surely as a body would (the check read only bodies and passed such an app)."""
        last: list[str] = []

        async def endpoint(request: Request) -> Response:
            user = ambient.get_current_context().user_id
            response = JSONResponse({"user": user})
            if last:
                response.headers.append(header, f"last={last[-1]}")
            last.append(user)
            return response

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]),
            registry=Registry(),
            identity=trusted_header(),
        )
        report = await check(app, users=5, requests=2)
        assert not report.ok
        assert any("response headers for" in line for line in report.isolation)

    @pytest.mark.parametrize("fault", ["body", "header"])
    async def test_another_users_data_only_while_memory_is_measured(self, fault: str) -> None:
        """An app that starts answering with another user's data only after many requests
        (a cache that fills, a global set once warm) showed it only in the requests of the
        memory measurement, whose answers were not looked at: the check passed it. They are
        looked at as the simulated users' are, and each leak is said with its phase."""
        assert (await check(warmed_up_app(6, fault), users=3, requests=2)).ok
        report = await check(warmed_up_app(6, fault), users=3, requests=2, growth_requests=20)
        assert not report.ok
        assert report.failed_requests == []
        said = "response" if fault == "body" else "response headers"
        verb = "contains" if fault == "body" else "contain"
        user = r"check-\d{5}-[0-9a-f]{6}"
        line = rf"GET / in the memory phase: the {said} for {user} {verb} {user}'s data"
        # Each of the 40 answers of the measurement names another user.
        assert len(report.isolation) == 21, report.isolation
        assert all(re.fullmatch(line, found) for found in report.isolation[:20]), report.isolation
        assert report.isolation[20] == "... and 20 more"

    @pytest.mark.parametrize("fault", ["status", "raise"])
    async def test_requests_that_fail_only_while_memory_is_measured(self, fault: str) -> None:
        """An app that starts failing only after many requests (a pool that runs dry)
        failed only in the memory measurement, whose answers' statuses were not looked at:
        the check passed it. Its failures are said as the simulated users' are, with the
        phase they were found in."""
        assert (await check(warmed_up_app(6, fault), users=3, requests=2)).ok
        report = await check(warmed_up_app(6, fault), users=3, requests=2, growth_requests=20)
        assert not report.ok
        assert report.isolation == []
        answer = (
            '503 \'{"error":"the pool is exhausted"}\''
            if fault == "status"
            else "500 'RuntimeError: the pool is exhausted'"
        )
        user = r"check-\d{5}-[0-9a-f]{6}"
        line = rf"GET / in the memory phase for {user}: HTTP {re.escape(answer)}"
        assert len(report.failed_requests) == 21, report.failed_requests
        assert all(re.fullmatch(line, found) for found in report.failed_requests[:20]), (
            report.failed_requests
        )
        assert report.failed_requests[20] == "... and 20 more"

    @pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER])
    async def test_a_cleanup_that_fails(self, lifetime: Lifetime) -> None:
        """A cleanup that raises, at the end of a request or at shutdown, is logged by the
        registry, which goes on: the check reports it instead of passing the app because
        the cleanup ran."""

        class Leaky:
            def close(self) -> None:
                raise ConnectionError("the pool refused the connection back")

        registry = Registry()
        registry.register(Leaky, Leaky, lifetime=lifetime, name="Leaky")

        app = resolving_app(registry, Leaky)
        report = await check(app, users=3, requests=2)
        assert not report.ok
        count = 6 if lifetime is Lifetime.REQUEST else 3
        assert report.cleanup == [
            f"Leaky: {count} cleanup(s) failed (the first: ConnectionError: the pool refused "
            "the connection back)"
        ]

    async def test_memory_kept_by_every_request_over_a_short_measurement(self) -> None:
        kept: list[bytes] = []

        async def endpoint(request: Request) -> Response:
            kept.append(bytes(8192))  # never let go
            return JSONResponse({"user": ambient.get_current_context().user_id})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
        )
        report = await check(app, users=2, requests=1, growth_requests=50)
        assert len(report.leaks) == 1
        assert report.leaks[0].startswith("memory grew ")


class TestUsersNotServedAsThemselves:
    """The check's claim "no data of another" holds only when each simulated user was served
    as a user of its own; otherwise no response could ever show another's data."""

    @pytest.mark.parametrize("requests", [1, 3])
    async def test_an_identity_the_app_does_not_read_falls_back_to_anonymous(
        self, requests: int
    ) -> None:
        """The app reads ``x-user-id``; the check sends ``x-account``: with
        ``anonymous=True`` every request is a fresh anonymous user and all answer 200."""
        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]),
            registry=Registry(),
            identity=trusted_header("x-user-id"),
            anonymous=True,
        )
        report = await check(app, users=5, requests=requests, identity=("header", "x-account"))
        assert not report.ok
        assert report.failed_requests == []
        assert report.isolation[0].startswith("5 simulated user(s) were served as anonymous")
        right = await check(app, users=5, requests=requests, identity=("header", "x-user-id"))
        assert right.ok, right.violations

    async def test_users_served_as_anonymous_are_said_so_once_with_the_memory_phase(
        self,
    ) -> None:
        """Each request of an app that falls back to anonymous users is a fresh anonymous
        user, in the memory phase as before it: said once, that they were served as
        anonymous users, not again for every request measured as one served otherwise."""
        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]),
            registry=Registry(),
            identity=trusted_header("x-user-id"),
            anonymous=True,
        )
        report = await check(
            app, users=3, requests=2, identity=("header", "x-account"), growth_requests=20
        )
        assert report.failed_requests == []
        assert report.isolation == [
            "3 simulated user(s) were served as anonymous users, so isolation between them "
            "was not tested: does --identity name what the app reads the user from?"
        ]

    async def test_an_app_without_the_middleware_is_not_reported_isolated(self) -> None:
        """A plain app (no AmbientMiddleware) that answers every user 200 opened no context,
        so no response could ever show another user's data: the check says so rather than
        "isolation ok"."""

        async def hello(request: Request) -> Response:
            return JSONResponse({"hello": "world"})

        report = await check(Starlette(routes=[Route("/", hello)]), users=4, requests=2)
        assert not report.ok
        assert report.failed_requests == []
        assert report.isolation == [
            "no request reached the app in an ambient context (is it wrapped in "
            "AmbientMiddleware, and does --identity name what that reads the user from?), "
            "so isolation between the users was not tested"
        ]

    @pytest.mark.parametrize("users", [2, 4])
    async def test_users_served_as_one_user(self, users: int) -> None:
        """An identity that maps every caller to one account (a misconfigured resolver);
        two users so served are as many as it takes."""

        def one_account(scope: Any) -> Identity:
            return Identity(user_id="service-account")

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]), registry=Registry(), identity=one_account
        )
        report = await check(app, users=users, requests=2)
        assert not report.ok
        assert len(report.isolation) == 1
        assert report.isolation[0].endswith("were all served as one user")
        assert report.isolation[0].count("check-") == users

    async def test_a_user_served_as_two_users_is_said_split(self) -> None:
        """An identity that serves one caller as a user of its own on each of two paths (an
        id suffixed with where it came in): no response could show that caller's data
        reaching another, and the check says its requests were split."""

        def per_path(scope: Any) -> Identity:
            caller = dict(scope["headers"])[b"x-user-id"].decode()
            return Identity(user_id=f"{caller}{scope['path']}")

        inner = Starlette(routes=[Route("/a", _whoami), Route("/b", _whoami)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=per_path)
        plan = [PlannedRequest("GET", "/a"), PlannedRequest("GET", "/b")]
        report = await check(app, plan=plan, users=3, requests=2)
        assert not report.ok
        assert report.failed_requests == []
        assert len(report.isolation) == 1
        assert re.fullmatch(
            r"the requests of check-\d{5}-[0-9a-f]{6} were served as 2 different users "
            r"\(3 simulated user\(s\) in all were split so\)",
            report.isolation[0],
        ), report.isolation

    async def test_users_served_as_another_only_while_memory_is_measured(self) -> None:
        """An identity that, once warm, serves every caller as the last one it resolved (a
        cache that fills): the simulated users' requests are served as themselves, those
        of the memory measurement as one user. Its answers carry no id, so only whom they
        were served as tells, and the memory measurement did not note it: the check passed
        the app. Each request served otherwise than its user's requests before is said,
        with the phase."""
        resolved: list[str] = []

        def cached(scope: Any) -> Identity:
            if len(resolved) < 6:
                resolved.append(dict(scope["headers"])[b"x-user-id"].decode())
            return Identity(user_id=resolved[-1])

        async def endpoint(request: Request) -> Response:
            return JSONResponse({"ok": True})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=cached
        )
        assert (await check(app, users=3, requests=2)).ok
        resolved.clear()
        report = await check(app, users=3, requests=2, growth_requests=20)
        assert not report.ok
        assert report.failed_requests == []
        last = re.escape(resolved[-1])
        # Served as another simulated user, which says more than "otherwise than before".
        line = (
            rf"GET / in the memory phase for check-\d{{5}}-[0-9a-f]{{6}}: served as {last}, "
            r"another simulated user"
        )
        # Two runs of 20 requests by the three users in turn (14, 14 and 12 requests each):
        # those of the two users not resolved last.
        assert len(report.isolation) == 21, report.isolation
        assert all(re.fullmatch(line, found) for found in report.isolation[:20]), report.isolation
        more = re.fullmatch(r"\.\.\. and (\d+) more", report.isolation[20])
        assert more is not None
        assert 20 + int(more[1]) in (26, 28)
        assert not any(f" for {resolved[-1]}:" in found for found in report.isolation)

    async def test_users_served_as_no_simulated_user_only_while_memory_is_measured(
        self,
    ) -> None:
        """As above, with an identity that, once warm, serves every caller as an account of
        its own (no simulated user's id): each request of the memory measurement is said as
        served otherwise than its user's requests before."""
        resolved: list[str] = []

        def cached(scope: Any) -> Identity:
            resolved.append(dict(scope["headers"])[b"x-user-id"].decode())
            return Identity(user_id=resolved[-1] if len(resolved) <= 6 else "account:shared")

        async def endpoint(request: Request) -> Response:
            return JSONResponse({"ok": True})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=cached
        )
        report = await check(app, users=3, requests=2, growth_requests=20)
        assert not report.ok
        assert report.failed_requests == []
        line = (
            r"GET / in the memory phase for check-\d{5}-[0-9a-f]{6}: served as account:shared, "
            r"where its requests before were served as check-\d{5}-[0-9a-f]{6}"
        )
        assert len(report.isolation) == 21, report.isolation
        assert all(re.fullmatch(line, found) for found in report.isolation[:20]), report.isolation
        more = re.fullmatch(r"\.\.\. and (\d+) more", report.isolation[20])
        assert more is not None
        assert 20 + int(more[1]) == 40

    async def test_an_opaque_bearer_token_is_the_users_id(self) -> None:
        """With ``identity=("bearer", "")`` each user presents its id as an opaque bearer
        token, as an app looking its tokens up reads them: each is served as itself."""

        def opaque(scope: Any) -> Identity | None:
            value = dict(scope["headers"]).get(b"authorization", b"").decode()
            scheme, _, token = value.partition(" ")
            return Identity(user_id=token) if scheme == "Bearer" and token else None

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]), registry=Registry(), identity=opaque
        )
        report = await check(app, users=3, requests=2, identity=("bearer", ""))
        assert report.ok, report.violations
        assert report.scopes == 6

    @pytest.mark.parametrize("status", [300, 302])
    async def test_a_redirect_is_not_a_served_request(self, status: int) -> None:
        async def to_login(request: Request) -> Response:
            return Response(status_code=status, headers={"location": "/login"})

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", to_login)]), registry=Registry(), identity=trusted_header()
        )
        report = await check(app, users=3, requests=2)
        assert not report.ok
        assert len(report.failed_requests) == 6
        assert all(f"HTTP {status}, a redirect" in line for line in report.failed_requests)

    @pytest.mark.parametrize("status", [400, 404, 500])
    async def test_an_error_answer_is_a_failed_request(self, status: int) -> None:
        async def refuse(request: Request) -> Response:
            return Response("no", status_code=status)

        app = AmbientMiddleware(
            Starlette(routes=[Route("/", refuse)]), registry=Registry(), identity=trusted_header()
        )
        report = await check(app, users=3, requests=2)
        assert not report.ok
        assert len(report.failed_requests) == 6
        assert all(f": HTTP {status} 'no'" in line for line in report.failed_requests)


# The demo's secret in these tests, and another one, neither a real one.
DEMO_SECRET = "demo-secret-for-the-check-0123456789abcdef"
OTHER_SECRET = "another-secret-for-the-check-0123456789ab"
# Taken for a public key by PyJWT, which refuses it as an HMAC secret.
PUBLIC_KEY = (
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
)


def _jwt_notes_app(secret: str, **options: Any) -> AmbientMiddleware:
    inner = Starlette(routes=[Route("/", _whoami)])
    resolver = jwt_bearer(secret, algorithms=["HS256"], **options)
    return AmbientMiddleware(inner, registry=Registry(), identity=resolver)


class TestJWTIdentity:
    """``identity=JWTIdentity(secret)`` (``--identity jwt``): each simulated user sends an
    HS256 JWT, as an app behind ``jwt_bearer()`` reads it; an opaque bearer token, the only
    kind there was, is refused by such an app on every request."""

    async def test_the_demo_in_jwt_mode_passes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        report = await check(create_app(), plan=CHECK_PLAN, identity=JWTIdentity(DEMO_SECRET))
        assert report.ok, report.violations
        assert report.scopes == report.requests == 180
        assert report.tokens_refused == 0
        # Not an opaque token: the user id itself is refused on every request.
        opaque = await check(create_app(), plan=CHECK_PLAN, identity=("bearer", ""))
        assert not opaque.ok

    async def test_tokens_the_app_refuses_are_said_refused_not_an_isolation_failure(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        report = await check(create_app(), plan=CHECK_PLAN, identity=JWTIdentity(OTHER_SECRET))
        assert not report.ok
        assert report.tokens_refused == 180
        assert report.isolation == []
        assert report.failed_requests == [
            "the app refused the tokens of 180 of 180 requests with HTTP 401 (the first "
            'answer: "the bearer token\'s signature is invalid"): does it verify HS256 '
            "tokens with the secret they are signed with (AMBIENT_JWT_SECRET), and expect "
            "the aud and iss they carry (--jwt-audience, --jwt-issuer)?"
        ]

    async def test_tokens_refused_while_memory_is_measured_too_are_said_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The requests of the memory measurement are looked at too, but the tokens an app
        refuses there as well are the ones already said refused: still one line, counting
        the simulated users' requests."""
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        report = await check(
            create_app(),
            plan=CHECK_PLAN,
            identity=JWTIdentity(OTHER_SECRET),
            users=3,
            requests=2,
            growth_requests=20,
        )
        assert report.tokens_refused == 6
        assert report.isolation == []
        assert len(report.failed_requests) == 1, report.failed_requests
        assert report.failed_requests[0].startswith(
            "the app refused the tokens of 6 of 6 requests with HTTP 401"
        )

    async def test_tokens_refused_only_while_memory_is_measured_are_failed_requests(
        self,
    ) -> None:
        """An app that takes the tokens at first and refuses them once warm (a revocation
        list that fills, a limit reached): its 401s in the memory phase are failed requests
        there, not passed over as the refusal already said, which there was none of."""
        inner = _jwt_notes_app(DEMO_SECRET)
        answered = itertools.count()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and next(answered) >= 6:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"revoked"})
                return
            await inner(scope, receive, send)

        identity = JWTIdentity(DEMO_SECRET)
        report = await check(app, identity=identity, users=3, requests=2, growth_requests=20)
        assert report.tokens_refused == 0
        assert report.isolation == []
        user = r"check-\d{5}-[0-9a-f]{6}"
        said = rf"GET / in the memory phase for {user}: HTTP 401 'revoked'"
        assert len(report.failed_requests) == 21, report.failed_requests
        assert all(re.fullmatch(said, line) for line in report.failed_requests[:20]), report
        assert report.failed_requests[20] == "... and 20 more"

    async def test_requests_served_as_anonymous_beside_refused_tokens_are_said_so(
        self,
    ) -> None:
        """The requests whose tokens the app refused tell nothing of isolation, and those
        it served as anonymous users (a part of the app behind another identity) tell
        nothing either: both are said, not only the refused tokens."""
        inner = Starlette(routes=[Route("/", _whoami), Route("/open", _whoami)])
        verified = AmbientMiddleware(
            inner, registry=Registry(), identity=jwt_bearer(OTHER_SECRET, algorithms=["HS256"])
        )
        open_to_all = AmbientMiddleware(
            inner, registry=Registry(), identity=trusted_header("x-account"), anonymous=True
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            part = open_to_all if scope.get("path") == "/open" else verified
            await part(scope, receive, send)

        plan = [PlannedRequest("GET", "/"), PlannedRequest("GET", "/open")]
        report = await check(app, plan=plan, identity=JWTIdentity(DEMO_SECRET), users=3, requests=2)
        assert report.tokens_refused == 3
        assert len(report.failed_requests) == 1
        assert report.failed_requests[0].startswith(
            "the app refused the tokens of 3 of 6 requests with HTTP 401"
        )
        assert len(report.isolation) == 1
        assert report.isolation[0].startswith("3 simulated user(s) were served as anonymous")

    async def test_websocket_handshakes_refused_for_their_token_are_said_with_the_requests(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """In the same one line, not once more for each socket."""
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        report = await check(
            create_app(),
            plan=CHECK_PLAN,
            websocket=CHECK_WEBSOCKET,
            identity=JWTIdentity(OTHER_SECRET),
            users=3,
            requests=2,
        )
        assert report.websockets == 3
        assert report.failed_requests == [
            "the app refused the tokens of 6 of 6 requests and 3 of 3 websocket handshakes "
            'with HTTP 401 (the first answer: "the bearer token\'s signature is invalid"): '
            "does it verify HS256 tokens with the secret they are signed with "
            "(AMBIENT_JWT_SECRET), and expect the aud and iss they carry (--jwt-audience, "
            "--jwt-issuer)?"
        ]

    async def test_a_body_streamed_in_messages_leaves_no_closed_scope_alive(self) -> None:
        """An app behind ``jwt_bearer()`` sending each body in two messages, as Quart
        does: the expiry its tokens carry, armed while the body streams, keeps no closed
        scope alive after the run (asyncio's cancelled timers keep their context)."""

        async def two_messages(scope: dict[str, Any], receive: Any, send: Any) -> None:
            user = ambient.get_current_context().user_id.encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": user, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        resolver = jwt_bearer(DEMO_SECRET, algorithms=["HS256"])
        app = AmbientMiddleware(two_messages, registry=Registry(), identity=resolver)
        async with anyio.create_task_group() as group:
            # Due before the tokens expire, as a pool's maintenance or a server's keep-alive
            # is: asyncio drops cancelled timers from the front of its queue only.
            group.start_soon(anyio.sleep, 60)
            report = await check(app, users=10, requests=2, identity=JWTIdentity(DEMO_SECRET))
            group.cancel_scope.cancel()
        assert report.leaks == []
        assert report.ok, report.violations
        assert report.scopes == report.requests == 20

    async def test_audience_and_issuer_are_the_tokens_aud_and_iss(self) -> None:
        options = {"audience": "notes-api", "issuer": "https://issuer.test"}
        app = _jwt_notes_app(DEMO_SECRET, **options)
        right = await check(app, users=5, requests=2, identity=JWTIdentity(DEMO_SECRET, **options))
        assert right.ok, right.violations
        without = await check(app, users=5, requests=2, identity=JWTIdentity(DEMO_SECRET))
        assert without.tokens_refused == 10
        assert "the bearer token lacks the 'iss' claim" in without.failed_requests[0]
        # An app expecting neither refuses a token naming an audience (RFC 7519).
        plain = _jwt_notes_app(DEMO_SECRET)
        aud = await check(plain, users=5, requests=2, identity=JWTIdentity(DEMO_SECRET, **options))
        assert aud.tokens_refused == 10

    @pytest.mark.parametrize("status", [401, 500])
    async def test_a_token_the_app_echoes_is_not_shown(self, status: int) -> None:
        async def echo(scope: Any, receive: Any, send: Any) -> None:
            sent = dict(scope["headers"])[b"authorization"]
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"you sent " + sent})

        report = await check(echo, users=2, requests=1, identity=JWTIdentity(DEMO_SECRET))
        assert len(report.failed_requests) == 1 if status == 401 else 2
        assert all("you sent Bearer <token>" in line for line in report.failed_requests)
        assert "eyJ" not in repr(report)

    def test_a_users_token_is_made_anew_once_half_its_lifetime_has_passed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import jwt

        from ambient import UserRef
        from ambient.check import _Driver

        now = [1_800_000_000.0]
        monkeypatch.setattr(time, "time", lambda: now[0])
        driver = _Driver(_whoami, JWTIdentity(DEMO_SECRET, lifetime=600))
        user = UserRef("check-00000-abcdef")
        first = driver.token(user)
        now[0] += 299
        assert driver.token(user) == first
        now[0] += 1
        second = driver.token(user)
        assert second is not None
        assert second != first
        claims = jwt.decode(
            second,
            DEMO_SECRET,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims == {
            "sub": "check-00000-abcdef",
            "iat": 1_800_000_300,
            "exp": 1_800_000_900,
        }

    def test_what_cannot_sign_is_refused(self) -> None:
        public_key = PUBLIC_KEY
        for secret, said in (("", "is empty"), (public_key, "cannot sign HS256 tokens")):
            with pytest.raises(ValueError, match=said):
                JWTIdentity(secret)
        with pytest.raises(ValueError, match="lifetime must be more than 0"):
            JWTIdentity(DEMO_SECRET, lifetime=0)
        assert DEMO_SECRET not in repr(JWTIdentity(DEMO_SECRET))
        rsa_private, rsa_public = _key_pair("RS256")
        ec_private, _ = _key_pair("ES256")
        refused = {
            (rsa_public, "RS256"): "cannot sign RS256 tokens: it must be a PEM private key",
            (ec_private, "RS256"): "cannot sign RS256 tokens: it must be a PEM private key",
            (rsa_private, "ES256"): "cannot sign ES256 tokens: it must be a PEM private key",
            (DEMO_SECRET, "EdDSA"): "cannot sign EdDSA tokens: it must be a PEM private key",
            (rsa_private, "HS256"): "cannot sign HS256 tokens",
            (DEMO_SECRET, "none"): "must be one of HS256, HS384",
            (DEMO_SECRET, "RS257"): "must be one of HS256, HS384",
        }
        for (secret, algorithm), said in refused.items():
            with pytest.raises(ValueError, match=said) as error:
                JWTIdentity(secret, algorithm=algorithm)
            assert secret not in str(error.value)
        with pytest.raises(ValueError, match="key id must be a non-empty string"):
            JWTIdentity(DEMO_SECRET, key_id="")
        assert rsa_private not in repr(JWTIdentity(rsa_private, algorithm="RS256"))

    @pytest.mark.parametrize("algorithm", ["RS256", "PS384", "ES256", "EdDSA", "HS512"])
    async def test_an_app_verifying_the_algorithm_passes(self, algorithm: str) -> None:
        private, public = _key_pair(algorithm)
        resolver = jwt_bearer(public, algorithms=[algorithm])
        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]), registry=Registry(), identity=resolver
        )
        identity = JWTIdentity(private, algorithm=algorithm)
        report = await check(app, users=4, requests=2, identity=identity)
        assert report.ok, report.violations
        assert report.tokens_refused == 0

    async def test_a_key_set_finds_the_key_by_the_tokens_kid(self) -> None:
        import jwt as pyjwt
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        private, public = _key_pair("RS256")
        jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(load_pem_public_key(public.encode())))
        key_set = {"keys": [{**jwk, "kid": "k2", "alg": "RS256", "use": "sig"}]}
        resolver = jwt_bearer(key_set, algorithms=["RS256"])
        app = AmbientMiddleware(
            Starlette(routes=[Route("/", _whoami)]), registry=Registry(), identity=resolver
        )
        named = await check(
            app, users=4, requests=2, identity=JWTIdentity(private, algorithm="RS256", key_id="k2")
        )
        assert named.ok, named.violations
        unnamed = await check(
            app, users=4, requests=2, identity=JWTIdentity(private, algorithm="RS256")
        )
        assert unnamed.tokens_refused == unnamed.requests == 8
        assert unnamed.failed_requests[0].endswith(
            "does it verify RS256 tokens with the public key of the private key they are "
            "signed with (AMBIENT_JWT_SECRET), or a key set holding it under their kid "
            "(--jwt-key-id), and expect the aud and iss they carry (--jwt-audience, "
            "--jwt-issuer)?"
        )


def broadcast_app(frame: str = "ran for {user}") -> AmbientMiddleware:
    """Announces every run on every open socket: the bug a per-user socket manager fixes."""
    sockets: set[WebSocket] = set()

    async def events(websocket: WebSocket) -> None:
        await websocket.accept()
        sockets.add(websocket)
        try:
            await websocket.send_json({"ready": ambient.get_current_context().user_id})
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            sockets.discard(websocket)

    async def run(request: Request) -> Response:
        said = frame.replace("{user}", ambient.get_current_context().user_id)
        for websocket in list(sockets):
            try:
                await websocket.send_text(said)
            except WebSocketDisconnect:  # its client left meanwhile
                sockets.discard(websocket)
        return JSONResponse({"ok": True})

    routes = [Route("/", run, methods=["POST"]), WebSocketRoute("/events", events)]
    return AmbientMiddleware(
        Starlette(routes=routes), registry=Registry(), identity=trusted_header()
    )


class TestWebsockets:
    """``websocket=PATH`` (``--websocket PATH``): each user holds a socket open while its
    requests run, and what the app sends on it is checked as its responses are."""

    async def test_the_demo_announces_each_run_to_its_own_users_sockets_only(self) -> None:
        report = await check(
            create_app(), plan=CHECK_PLAN, websocket=CHECK_WEBSOCKET, users=12, requests=4
        )
        assert report.ok, report.violations
        assert (report.websockets, report.scopes) == (12, 12 * 4 + 12)
        # A "ready" frame, then each of its two runs started and done, on each socket.
        assert report.websocket_frames == 12 * 5
        assert report.components_created == report.components_cleaned

    async def test_sockets_served_as_anonymous_users_are_said_so(self) -> None:
        """An app that reads the user from what its requests carry but serves its sockets
        as anonymous users (a websocket route behind another identity) never showed a
        socket another user's frame: the check says so, though every request was served
        as its user."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        requests = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        sockets = AmbientMiddleware(
            inner, registry=Registry(), identity=trusted_header("x-account"), anonymous=True
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await (sockets if scope["type"] == "websocket" else requests)(scope, receive, send)

        report = await check(app, websocket="/events", users=4, requests=2)
        assert not report.ok
        assert report.failed_requests == []
        assert report.websockets == 4
        assert report.isolation[0].startswith("4 simulated user(s) were served as anonymous")

    async def test_frames_sent_to_every_socket_are_caught(self) -> None:
        plan = [PlannedRequest("POST", "/")]
        report = await check(broadcast_app(), plan=plan, websocket="/events", users=6, tenants=3)
        assert not report.ok
        assert report.failed_requests == []
        user = r"check-\d{5}-[0-9a-f]{6} \(tenant check-tenant-\d{5}-[0-9a-f]{6}\)"
        # Served without their tenants (the app reads none), said so; and each run is
        # announced in the request of a user that is not the socket's.
        said = rf"WS /events: a frame sent to {user} was sent while serving check-\d{{5}}-\w{{6}}"
        assert any(re.fullmatch(said, line) for line in report.isolation), report.isolation
        # Each such frame is said once, sent while serving another, not again for the id of
        # that user it carries.
        assert not [line for line in report.isolation if line.endswith("'s data")], report
        alone = await check(broadcast_app(), plan=plan, websocket="/events", users=1)
        assert alone.ok, alone.violations
        assert (alone.websockets, alone.websocket_frames) == (1, 7)

    async def test_a_frame_sent_while_serving_another_user_is_caught_whatever_it_says(
        self,
    ) -> None:
        """A frame the app sends in one user's request to another user's socket is that
        user's event reaching the other, also one carrying no id (a bare "run done")."""
        plan = [PlannedRequest("POST", "/")]
        app = broadcast_app('{"type": "run.done"}')
        report = await check(app, plan=plan, websocket="/events", users=6)
        assert report.failed_requests == []
        user = r"check-\d{5}-[0-9a-f]{6}"
        said = rf"WS /events: a frame sent to {user} was sent while serving {user}"
        assert len(report.isolation) > 1
        assert all(re.fullmatch(said, line) for line in report.isolation[:-1]), report
        alone = await check(app, plan=plan, websocket="/events", users=1)
        assert alone.ok, alone.violations

    async def test_a_frame_sent_while_serving_another_user_to_a_socket_of_no_context_is_caught(
        self,
    ) -> None:
        """An app that serves its requests in an ambient context but its sockets in none (a
        websocket route outside the middleware) and sends each run to every socket: a frame
        sent in one user's request to another user's socket is that user's event reaching
        the other, though the socket itself was served as nobody."""
        sockets: set[WebSocket] = set()

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            sockets.add(websocket)
            try:
                while True:
                    await websocket.receive_text()
            except WebSocketDisconnect:
                sockets.discard(websocket)

        async def run(request: Request) -> Response:
            for websocket in list(sockets):
                try:
                    await websocket.send_text('{"type": "run.done"}')
                except (WebSocketDisconnect, RuntimeError):  # its client left meanwhile
                    sockets.discard(websocket)
            return JSONResponse({"user": ambient.get_current_context().user_id})

        routes = [Route("/", run, methods=["POST"]), WebSocketRoute("/events", events)]
        inner = Starlette(routes=routes)
        wrapped = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await (inner if scope["type"] == "websocket" else wrapped)(scope, receive, send)

        plan = [PlannedRequest("POST", "/")]
        report = await check(app, plan=plan, websocket="/events", users=6, requests=3)
        assert not report.ok
        assert report.failed_requests == []
        user = r"check-\d{5}-[0-9a-f]{6}"
        said = rf"WS /events: a frame sent to ({user}) was sent while serving ({user})"
        matched = [re.fullmatch(said, line) for line in report.isolation[:_MAX_SHOWN]]
        assert all(matched), report.isolation
        assert all(found[1] != found[2] for found in matched if found)
        # Each user's own runs reach its own socket: no finding.
        alone = await check(app, plan=plan, websocket="/events", users=1, requests=3)
        assert alone.ok, alone.violations
        assert alone.websocket_frames == 3

    async def test_a_frame_sent_in_a_context_of_the_apps_own_is_no_other_users(self) -> None:
        """A frame the app sends to a user's socket in a context of its own (a notifier's
        service account, not a simulated user) was sent while serving no other user: no
        finding, as a frame of the app's own job is none."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            notifier = UserExecutionContext.create("notifier")
            with ambient.bind_context(notifier, allow_switch=True):
                await websocket.send_text("welcome")
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=3, requests=2)
        assert report.ok, report.violations
        assert report.websocket_frames == 3

    async def test_frames_are_looked_at_as_they_come_and_only_the_shown_findings_kept(
        self,
    ) -> None:
        """An app may send more than a check could keep (every run announced on every
        socket grows with the square of the users): each frame is looked at as it comes,
        not kept, and findings past those shown are only counted."""
        first: list[str] = []

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            user = ambient.get_current_context().user_id
            first.append(first[0] if first else user)
            if user != first[0]:
                for _ in range(4000):
                    await websocket.send_text(f"{first[0]} " + "x" * 1000)
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        tracemalloc.start()
        try:
            report = await check(app, websocket="/events", users=2, requests=1, concurrency=1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.websocket_frames == 4000
        assert len(report.isolation) == 21
        assert report.isolation[-1] == "... and 3980 more"
        assert peak < 2**20, peak  # the frames alone are 4 MB

    async def test_a_frame_each_user_sends_is_answered_on_its_own_socket_only(self) -> None:
        """``websocket_send``: each user sends a prompt once the demo listens; its run is
        announced on that user's socket (started and done) in a scope of its own."""
        report = await check(
            create_app(),
            plan=CHECK_PLAN,
            websocket=CHECK_WEBSOCKET,
            websocket_send="remember {user} on the socket",
            users=12,
            requests=4,
        )
        assert report.ok, report.violations
        assert report.websocket_frames == 12 * 7
        assert report.scopes == 12 * 4 + 12 * 2  # requests, sockets, their messages
        with pytest.raises(ValueError, match="needs a websocket path"):
            await check(create_app(), websocket_send="hello")

    async def test_a_message_answered_on_the_wrong_socket_is_caught(self) -> None:
        """An app that answers each message on the first socket still open (a module-level
        "the socket" set once): the answer of one user's message reaches another."""
        latest: list[WebSocket] = []

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            latest.append(websocket)
            try:
                while True:
                    said = await websocket.receive_text()
                    await latest[0].send_text(f"noted: {said}")
            except (WebSocketDisconnect, OSError):
                latest.remove(websocket)

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        sends = "I am {user}"
        report = await check(app, websocket="/events", websocket_send=sends, users=8)
        assert any(
            re.fullmatch(
                r"WS /events: a frame sent to check-\d{5}-[0-9a-f]{6} was sent while "
                r"serving check-\d{5}-[0-9a-f]{6}",
                line,
            )
            for line in report.isolation
        ), report.isolation
        alone = await check(app, websocket="/events", websocket_send=sends, users=1)
        assert alone.ok, alone.violations

    @pytest.mark.parametrize(
        ("ending", "said"),
        [
            ("refuse", "the app refused the handshake with close code 4003"),
            ("deny", "the app refused the handshake with HTTP 403"),
            # Without a JWTIdentity, a 401 is no refusal of the check's tokens: a failure.
            ("unauthorized", "the app refused the handshake with HTTP 401"),
            ("close", "the app closed the socket with close code 1011"),
            ("raise", "the app raised RuntimeError: socket broke"),
            ("return", "the app returned without accepting the socket"),
        ],
    )
    async def test_a_socket_the_app_refuses_or_ends_first_is_a_failed_request(
        self, ending: str, said: str
    ) -> None:
        async def events(websocket: WebSocket) -> None:
            if ending == "return":  # neither accepted nor closed: no socket either
                return
            if ending == "refuse":
                await websocket.close(code=4003)
                return
            if ending in ("deny", "unauthorized"):
                status = 403 if ending == "deny" else 401
                await websocket.send_denial_response(Response(status_code=status))
                return
            await websocket.accept()
            if ending == "close":
                await websocket.close(code=1011)
                return
            raise RuntimeError("socket broke")

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=3, requests=2)
        assert report.isolation == []
        assert len(report.failed_requests) == 3
        assert all(
            re.fullmatch(rf"WS /events for check-\d{{5}}-[0-9a-f]{{6}}: {said}", line)
            for line in report.failed_requests
        ), report.failed_requests

    @pytest.mark.parametrize("framework", ["starlette", "asgi"])
    async def test_an_app_that_only_sends_ends_when_its_client_leaves(self, framework: str) -> None:
        """A socket the app only sends on (a feed, heartbeats) learns that its client left
        from its next send, which raises an ``OSError`` as a server's does: Starlette's
        ``WebSocketDisconnect``, or the error itself let through by a bare ASGI app."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            user = ambient.get_current_context().user_id
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.send_json({"heartbeat": user})
                    await anyio.sleep(0.005)

        async def bare(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})
                return
            await receive()
            await send({"type": "websocket.accept"})
            user = ambient.get_current_context().user_id
            while True:
                await send({"type": "websocket.send", "text": f"heartbeat of {user}"})
                await anyio.sleep(0.005)

        inner = (
            Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
            if framework == "starlette"
            else bare
        )
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=2, requests=1, time_limit=1)
        assert report.ok, report.violations
        assert report.websocket_frames >= 2

    async def test_a_socket_the_app_listens_on_lets_its_users_requests_start_at_once(
        self,
    ) -> None:
        """A user's requests start once the app listens on its socket (awaits a message),
        not after the wait for an app that never says so: ten users one after another
        take far less than the ten seconds of that wait."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        with anyio.fail_after(5):
            report = await check(app, websocket="/events", users=10, requests=1, concurrency=1)
        assert report.ok, report.violations

    async def test_an_app_closing_the_socket_once_its_client_left_is_no_failure(self) -> None:
        """A socket the app closes once the client left (a ``close()`` in a ``finally``)
        was not closed first by the app: no failure."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            try:
                while True:
                    await websocket.receive_text()
            except WebSocketDisconnect:
                pass
            finally:
                await websocket.close(code=1001)

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=2, requests=1)
        assert report.ok, report.violations
        assert report.websockets == 2

    async def test_an_app_failing_once_its_client_left_is_said_so(self) -> None:
        """The disconnect a send raises, let out of the app, is an error a server logs
        with its traceback (uvicorn's "Exception in ASGI application")."""

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            while True:
                await websocket.send_json({"heartbeat": True})
                await anyio.sleep(0.005)

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=1, requests=1, time_limit=1)
        said = (
            r"WS /events for check-\d{5}-[0-9a-f]{6}: the app raised WebSocketDisconnect "
            r"after its client left"
        )
        assert len(report.failed_requests) == 1
        assert re.fullmatch(said, report.failed_requests[0]), report.failed_requests

    async def test_a_socket_never_accepted_is_said_so_at_the_time_limit(self) -> None:
        """A handshake the app neither accepts nor refuses fails at the time limit."""

        async def events(websocket: WebSocket) -> None:
            await anyio.sleep_forever()  # neither accepts nor refuses

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=1, requests=1, time_limit=0.1)
        said = (
            r"WS /events for check-\d{5}-[0-9a-f]{6}: the app did not accept the socket "
            r"within 0.1 s"
        )
        assert [line for line in report.failed_requests if re.fullmatch(said, line)], report

    async def test_a_handshake_denied_is_said_with_what_the_denial_says(self) -> None:
        """A denial response's problem+json detail says why (here the check's handshakes,
        like any client's but a browser's, carry no Origin)."""
        from ambient.integrations.websockets import OriginAllowList

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", _whoami)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        guarded = OriginAllowList(app, allowed_origins=["https://app.example.com"])
        report = await check(guarded, websocket="/events", users=2, requests=1)
        said = (
            r"WS /events for check-\d{5}-[0-9a-f]{6}: the app refused the handshake with "
            r"HTTP 403: the websocket handshake carried no Origin header"
        )
        assert len(report.failed_requests) == 2
        assert all(re.fullmatch(said, line) for line in report.failed_requests), report

    async def test_a_socket_that_never_ends_is_cancelled_at_the_time_limit(self) -> None:
        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            await anyio.sleep_forever()  # deaf to the disconnect

        inner = Starlette(routes=[Route("/", _whoami), WebSocketRoute("/events", events)])
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, websocket="/events", users=2, requests=1, time_limit=0.2)
        said = (
            r"WS /events for check-\d{5}-[0-9a-f]{6}: the app did not end within 0.2 s of its close"
        )
        assert len(report.failed_requests) == 2
        assert all(re.fullmatch(said, line) for line in report.failed_requests), report
        assert report.websockets == 2
        with pytest.raises(ValueError, match="the websocket path must start with '/'"):
            await check(app, websocket="events")


def _key_pair(algorithm: str) -> tuple[str, str]:
    """A PEM private key and its public key for ``algorithm`` (an HMAC one: a secret, twice)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if algorithm.startswith("HS"):
        secret = DEMO_SECRET * 2  # long enough for HS512
        return secret, secret
    key: Any
    if algorithm.startswith(("RS", "PS")):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


def tenants_app(registry: Registry, *, tenant_header: str | None = "x-tenant-id") -> Any:
    """Each user's notes, named by whose they are, and a route whose path names the user."""

    async def notes(request: Request) -> Response:
        ctx = ambient.get_current_context()
        held = await ambient.resolve(Notes)
        if not held.owner:
            held.owner = f"{ctx.user_id} of {ctx.tenant_id}"
        return JSONResponse({"user": ctx.user_id, "tenant": ctx.tenant_id, "notes": held.owner})

    async def named(request: Request) -> Response:
        ctx = ambient.get_current_context()
        path = request.path_params
        mine = (path["user"], path["tenant"]) == (ctx.user_id, ctx.tenant_id)
        return JSONResponse({"mine": mine}, status_code=200 if mine else 409)

    routes = [Route("/", notes), Route("/t/{tenant}/u/{user}", named)]
    identity = trusted_header(tenant_header=tenant_header)
    return AmbientMiddleware(Starlette(routes=routes), registry=registry, identity=identity)


def _registry_of(factory: Callable[[], Notes]) -> Registry:
    registry = Registry()
    registry.register(Notes, factory)
    return registry


class TestTenants:
    """``tenants=N`` (``--tenants N``): the users are spread over tenants, user ids repeat
    across them, and the check tells a user of one tenant from the same id in another."""

    async def test_the_demo_passes_with_users_of_one_id_in_several_tenants(self) -> None:
        report = await check(create_app(), plan=CHECK_PLAN, users=12, requests=3, tenants=4)
        assert report.ok, report.violations
        assert (report.tenants, report.scopes) == (4, 36)

    async def test_the_path_names_each_users_own_ids(self) -> None:
        plan = [PlannedRequest("GET", "/t/{tenant}/u/{user}"), PlannedRequest()]
        report = await check(tenants_app(_registry_of(Notes)), plan=plan, users=9, tenants=3)
        assert report.ok, report.violations

    async def test_a_cache_keyed_by_the_user_id_alone_is_caught(self) -> None:
        """Users of one id in two tenants get one cached object: the probe sees it handed
        to both, and the second one's answer names the first one's tenant."""
        cache: dict[str, Notes] = {}

        def by_user_id() -> Notes:
            return cache.setdefault(ambient.get_current_context().user_id, Notes())

        report = await check(tenants_app(_registry_of(by_user_id)), users=8, tenants=4)
        assert not report.ok
        assert any("one instance was handed to users" in line for line in report.isolation)
        assert any(
            re.search(r"contains tenant check-tenant-\d{5}-[0-9a-f]{6}'s data", line)
            for line in report.isolation
        ), report.isolation
        # Every user id is its own without tenants: nothing crosses users then.
        alone = await check(tenants_app(_registry_of(by_user_id)), users=8)
        assert alone.isolation == []

    async def test_users_started_one_after_another_differ_in_id_and_tenant(self) -> None:
        """So that users in flight together are users of other ids, also when fewer run at
        once than there are tenants: a race between two users (a module-level "current
        user" overwritten across an await) is run, not only users of one id in turn."""
        seen: list[tuple[str, str | None]] = []

        async def record(scope: Any, receive: Any, send: Any) -> None:
            ctx = ambient.get_current_context()
            seen.append((ctx.user_id, ctx.tenant_id))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = AmbientMiddleware(
            record, registry=Registry(), identity=trusted_header(tenant_header="x-tenant-id")
        )
        report = await check(app, users=12, requests=1, tenants=4, concurrency=1)
        assert report.ok, report.violations
        assert len(set(seen)) == 12
        for before, after in itertools.pairwise(seen):
            assert before[0] != after[0], seen
            assert before[1] != after[1], seen

    async def test_an_app_that_reads_the_tenant_on_some_routes_only_is_told_so(self) -> None:
        """An app that reads the tenant behind one route and not behind another serves each
        user once with their tenant and once without: said as served without their tenant,
        which is why they were served as two users."""
        with_tenants = tenants_app(_registry_of(Notes))
        without = tenants_app(_registry_of(Notes), tenant_header=None)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            part = without if scope.get("query_string") == b"untenanted" else with_tenants
            await part(scope, receive, send)

        plan = [PlannedRequest("GET", "/"), PlannedRequest("GET", "/?untenanted")]
        report = await check(app, plan=plan, users=6, requests=2, tenants=3)
        assert report.failed_requests == []
        assert report.isolation[0] == (
            "6 simulated user(s) of a tenant were served as users of no tenant, so users of "
            "one id in two tenants were not told apart: does the app read the tenant from "
            "the x-tenant-id header (--tenant-header names another)?"
        )

    async def test_a_log_record_naming_its_own_user_and_tenant_is_no_finding(self) -> None:
        """A record made for a user of a tenant naming that user and that tenant names no
        other: no finding (the tenant is the user's own, not another's)."""
        log = logging.getLogger("tests.tenants")

        async def endpoint(request: Request) -> Response:
            ctx = ambient.get_current_context()
            log.warning("served %s of %s", ctx.user_id, ctx.tenant_id)
            return JSONResponse({"user": ctx.user_id, "tenant": ctx.tenant_id})

        identity = trusted_header(tenant_header="x-tenant-id")
        app = AmbientMiddleware(
            Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=identity
        )
        report = await check(app, users=6, requests=2, tenants=3)
        assert report.ok, report.violations

    async def test_an_app_that_does_not_read_the_tenant_is_told_so(self) -> None:
        app = tenants_app(_registry_of(Notes), tenant_header=None)
        report = await check(app, users=6, requests=2, tenants=3)
        assert report.isolation == [
            "6 simulated user(s) of a tenant were served as users of no tenant, so users of "
            "one id in two tenants were not told apart: does the app read the tenant from "
            "the x-tenant-id header (--tenant-header names another)?"
        ]
        one = await check(app, users=3, requests=1, tenants=1)
        assert one.isolation == [
            "3 simulated user(s) of a tenant were served as users of no tenant: does the app "
            "read the tenant from the x-tenant-id header (--tenant-header names another)?"
        ]
        named = await check(
            tenants_app(_registry_of(Notes), tenant_header="x-org"),
            users=6,
            tenants=3,
            tenant_header="x-org",
        )
        assert named.ok, named.violations

    async def test_jwt_users_carry_their_tenant_in_a_claim(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        identity = JWTIdentity(DEMO_SECRET)
        report = await check(create_app(), users=6, requests=2, tenants=2, identity=identity)
        assert report.ok, report.violations
        app = _jwt_notes_app(DEMO_SECRET, tenant_claim="org")
        report = await check(app, users=4, requests=1, tenants=2, identity=identity)
        assert report.isolation[0].endswith(
            "from the tokens' 'tenant_id' claim (--tenant-claim names another)?"
        )
        org = JWTIdentity(DEMO_SECRET, tenant_claim="org")
        right = await check(app, users=4, requests=1, tenants=2, identity=org)
        assert right.ok, right.violations

    async def test_tenants_that_cannot_be_simulated_are_refused(self) -> None:
        app = tenants_app(_registry_of(Notes))
        with pytest.raises(ValueError, match="from 0 to the number of users"):
            await check(app, users=3, tenants=4)
        with pytest.raises(ValueError, match="from 0 to the number of users"):
            await check(app, users=3, tenants=-1)
        with pytest.raises(ValueError, match="an opaque bearer token is the user id alone"):
            await check(app, users=3, tenants=2, identity=("bearer", ""))
        with pytest.raises(ValueError, match="tenant claim must be a non-empty"):
            JWTIdentity(DEMO_SECRET, tenant_claim="")


async def _whoami(request: Request) -> Response:
    return JSONResponse({"user": ambient.get_current_context().user_id})


async def _never_answers(scope: Any, receive: Any, send: Any) -> None:
    return


async def _never_finishes(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"half", "more_body": True})


async def test_equal_plain_values_are_not_taken_for_a_shared_instance() -> None:
    """Two users' REQUEST components that are equal plain values (a quota computed from the
    id, a setting string, a tuple of them) may be one object to Python (small ints,
    interned strings) but share no state: the probe passes them, and still flags a list
    handed to both."""
    api_base = "https://api.example.com/v1"
    shared_list: list[str] = []
    registry = Registry()
    registry.register("quota", lambda ctx: len(ctx.user_id) * 10)
    registry.register("api_base", lambda: api_base)
    registry.register("limits", lambda: (api_base, 10))
    registry.register("notes", lambda: shared_list)
    with IsolationProbe() as probe:
        for user in ("alice", "carol"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                for key in ("quota", "api_base", "limits"):
                    await scope.resolve(key)
        del scope  # the probe looks for closed scopes kept alive
    assert probe.report().ok, probe.report().violations
    with IsolationProbe() as probe:
        for user in ("alice", "carol"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                await scope.resolve("notes")
        del scope
    assert any("handed to users alice, carol" in v for v in probe.report().violations)
    await registry.aclose()


async def test_a_factory_handing_out_another_component_is_not_a_second_cleanup() -> None:
    """A factory returning a component it resolved (an alias: an interface mapped to its
    implementation, a request's view of the user's memory) hands it out uncleaned, and
    its own registration cleans it once: the probe took the alias's end for a second
    cleanup and reported the component "cleaned more than once". One a factory really
    closes again and again (a global handed out by every request) is still reported, in
    one line, not one per cleanup past the first."""

    class Memory:
        def close(self) -> None:
            pass

    class Session:
        def close(self) -> None:
            pass

    class Closed:
        def close(self) -> None:
            pass

    closed_twice = Closed()
    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("memory", lambda: ambient.resolve_sync(Memory))
    registry.register(Session, Session)
    registry.register("session", lambda: ambient.resolve_sync(Session))
    registry.register(Closed, lambda: closed_twice)
    with IsolationProbe(expect_closed=True) as probe:
        for _ in range(2):
            async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
                assert await scope.resolve("memory") is await scope.resolve(Memory)
                assert await scope.resolve("session") is await scope.resolve(Session)
        del scope  # the probe looks for closed scopes kept alive
        await registry.aclose()
    assert probe.report().ok, probe.report().violations
    with IsolationProbe() as probe:
        for _ in range(3):
            async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
                await scope.resolve(Closed)
        del scope
    # Said once, however many times more it was cleaned.
    assert [line.split("<locals>.")[-1] for line in probe.report().cleanup] == [
        "Closed: cleaned more than once"
    ]
    await registry.aclose()


async def test_an_alias_with_a_cleanup_of_its_own_is_no_second_cleanup() -> None:
    """A generator factory yielding a component it resolved (a transaction over the
    request's session, committed after the yield; a request's view of the user's memory,
    flushed) or a context manager whose ``__enter__`` gives one: the alias's own cleanup
    runs, but it does not clean the component it hands out, which its own registration
    cleans once. The probe counted both and reported the component "cleaned more than
    once"."""

    class Session:
        def __init__(self) -> None:
            self.commits = 0

        def close(self) -> None:
            pass

    class Memory:
        def __init__(self) -> None:
            self.flushes = 0

        def close(self) -> None:
            pass

    class Locked:
        def __init__(self, memory: Memory) -> None:
            self.memory = memory

        def __enter__(self) -> Memory:
            return self.memory

        def __exit__(self, *exc_info: object) -> None:
            self.memory.flushes += 1

    def transaction() -> Iterator[Session]:
        session = ambient.resolve_sync(Session)
        yield session
        session.commits += 1

    def memory_view() -> Iterator[Memory]:
        memory = ambient.resolve_sync(Memory)
        yield memory
        memory.flushes += 1

    registry = Registry()
    registry.register(Session, Session)
    registry.register("transaction", transaction)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("memory view", memory_view)
    registry.register("locked memory", lambda: Locked(ambient.resolve_sync(Memory)))
    with IsolationProbe(expect_closed=True) as probe:
        for user in ("alice", "bob", "alice"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                session = await scope.resolve("transaction")
                assert session is await scope.resolve(Session)
                memory = await scope.resolve("memory view")
                assert memory is await scope.resolve("locked memory") is await scope.resolve(Memory)
            assert session.commits == 1
        del scope, session  # the probe looks for closed scopes and components kept alive
        assert memory.flushes == 4  # alice's, by the view and the lock in both her requests
        del memory
        await registry.aclose()
    assert probe.report().ok, probe.report().violations


class CountsCloses:
    """A component that counts its cleanups."""

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


async def test_an_alias_in_one_request_hides_no_cleanup_in_another() -> None:
    """Two requests of one user hand out one existing object (a global a REQUEST factory
    returns) under two keys, in opposite orders: in each, the key resolved second is an
    alias and the first cleans it, so it is cleaned twice. The end of the key that cleaned
    it in one request was taken for the end of the same key's alias in the other request,
    and the second cleanup went unreported."""

    shared = CountsCloses()
    registry = Registry()
    registry.register("primary", lambda: shared)
    registry.register("replica", lambda: shared)
    with IsolationProbe() as probe:
        first = registry.open_scope(UserExecutionContext.create("alice"))
        second = registry.open_scope(UserExecutionContext.create("alice"))
        async with first:
            assert await first.resolve("primary") is await first.resolve("replica") is shared
            async with second:
                assert await second.resolve("replica") is await second.resolve("primary")
        assert shared.closes == 2
        del first, second
    assert any("cleaned more than once" in line for line in probe.report().cleanup), (
        probe.report().violations
    )


async def test_an_application_component_handed_out_by_an_alias_is_not_shared() -> None:
    """The application's component (an HTTP client) handed out to each user by a REQUEST
    or USER alias of it (``lambda: ambient.resolve_sync(Client)``) belongs to no user: the
    probe reported it handed to "(application), alice, bob", as a global cached in a
    factory. A REQUEST component handed to two users still is."""

    class Client:
        def close(self) -> None:
            pass

    shared_list: list[str] = []
    registry = Registry()
    registry.register(Client, Client, lifetime=Lifetime.APP)
    registry.register("client", lambda: ambient.resolve_sync(Client))
    registry.register("user client", lambda: ambient.resolve_sync(Client), lifetime=Lifetime.USER)
    registry.register("notes", lambda: shared_list)
    with IsolationProbe(expect_closed=True) as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                assert await scope.resolve("client") is await scope.resolve(Client)
                assert await scope.resolve("user client") is await scope.resolve(Client)
        del scope  # the probe looks for closed scopes kept alive
        await registry.aclose()
    assert probe.report().ok, probe.report().violations
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                await scope.resolve("notes")
        del scope
    assert any(
        "'notes': one instance was handed to users alice, bob" in v for v in probe.report().shared
    )
    await registry.aclose()


async def test_aliases_of_components_made_before_the_probe_are_not_shared() -> None:
    """A probe installed once the application's client and a user's memory exist (an app
    fixture wider than the test, a probe entered mid-test) first sees them handed out by
    aliases: it took the alias's lifetime for theirs, and reported the client handed to
    alice and bob and both still alive after their scope closed."""

    class Client:
        def close(self) -> None:
            pass

    class Memory:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Client, Client, lifetime=Lifetime.APP)
    registry.register("client", lambda: ambient.resolve_sync(Client))
    registry.register("user client", lambda: ambient.resolve_sync(Client), lifetime=Lifetime.USER)
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("memory", lambda: ambient.resolve_sync(Memory))
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        await scope.resolve(Client)
        await scope.resolve(Memory)
    with IsolationProbe(expect_closed=True) as probe:
        for user in ("alice", "bob", "alice"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                assert await scope.resolve("client") is await scope.resolve(Client)
                assert await scope.resolve("user client") is await scope.resolve(Client)
                assert await scope.resolve("memory") is await scope.resolve(Memory)
        del scope  # the probe looks for closed scopes kept alive
        await registry.aclose()
    assert probe.report().ok, probe.report().violations


async def test_equal_components_of_two_keys_are_not_taken_for_aliases() -> None:
    """Two keys whose factories make equal but distinct objects (a dataclass with value
    equality, one window per key): each is its own component, cleaned by its own key.
    Taken for one handed out twice, the second's end was an alias's, no cleanup, and it
    was reported "created but never cleaned"."""

    @dataclasses.dataclass
    class Window:
        size: int

        def close(self) -> None:
            pass

    registry = Registry()
    registry.register("reads", lambda: Window(10))
    registry.register("writes", lambda: Window(10))
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                reads, writes = await scope.resolve("reads"), await scope.resolve("writes")
                assert reads == writes
                assert reads is not writes
        del scope, reads, writes  # the probe looks for closed scopes and components kept alive
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned) == (4, 4)
    await registry.aclose()


async def test_an_application_component_first_seen_under_several_aliases_is_not_shared() -> None:
    """A probe installed once the application's client exists and a user's alias of it
    (``lambda: ambient.resolve_sync(Client)`` with USER lifetime) holds it too first sees
    the client handed out by a REQUEST alias while the scope holds it under both keys: it
    belongs to the application, the longest lifetime of those keys. Taken for the user's,
    the same client handed to bob through his USER alias was reported shared by alice and
    bob."""

    class Client:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Client, Client, lifetime=Lifetime.APP)
    registry.register("user client", lambda: ambient.resolve_sync(Client), lifetime=Lifetime.USER)
    registry.register("client", lambda: ambient.resolve_sync(Client))
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        assert await scope.resolve("user client") is await scope.resolve(Client)
    with IsolationProbe() as probe:
        for user in ("alice", "bob", "alice"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                client = await scope.resolve(Client)
                assert await scope.resolve("user client") is client
                assert await scope.resolve("client") is client
        del scope, client  # the probe looks for closed scopes and components kept alive
    report = probe.report()
    assert report.ok, report.violations
    await registry.aclose()


async def test_an_alias_that_ended_hides_no_later_cleanup_under_its_key() -> None:
    """A user's two USER factories hand out one global connection: in the user's first
    life the second key resolved is an alias, in the next (after the registry closed and
    started again) the other is, so the key that was an alias cleans it the second time:
    cleaned twice. The alias's record outlived its end and that later cleanup was taken
    for it, so the second cleanup went unreported."""

    shared = CountsCloses()
    registry = Registry()
    registry.register("primary", lambda: shared, lifetime=Lifetime.USER)
    registry.register("replica", lambda: shared, lifetime=Lifetime.USER)
    with IsolationProbe() as probe:
        for order in (("primary", "replica"), ("replica", "primary")):
            async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
                for key in order:
                    assert await scope.resolve(key) is shared
            await registry.aclose()
        del scope  # the probe looks for closed scopes kept alive
    assert shared.closes == 2
    assert probe.report().cleanup == ["'primary': cleaned more than once"]


async def test_an_object_handed_out_in_overlapping_requests_is_ended_by_its_first_key() -> None:
    """A REQUEST factory returning one kept object without a cleanup to two overlapping
    requests: the inner request's end is that of its hand-out, the outer's the end of the
    object, which outlives its scope. The inner end's record was kept and taken for the
    outer's, so the object was reported "created but never cleaned" instead."""

    class Plain:
        pass

    kept = Plain()
    registry = Registry()
    registry.register("plain", lambda: kept)
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as outer:
            assert await outer.resolve("plain") is kept
            async with registry.open_scope(UserExecutionContext.create("alice")) as inner:
                assert await inner.resolve("plain") is kept
        del outer, inner  # the probe looks for closed scopes kept alive
    report = probe.report()
    assert report.cleanup == []
    assert report.outlived == [
        "'plain': 1 instance(s) still alive after their scope closed (referenced from a "
        "global, a cache or a pending task?)"
    ]
    await registry.aclose()


async def test_a_component_made_before_the_probe_first_seen_through_a_generator_alias() -> None:
    """A user's memory made before the probe, first seen handed out by a generator alias
    (a request's view, flushed after its ``yield``): the view's end is its own cleanup,
    not the memory's, and is counted as one end, as the memory's own at shutdown. Taken
    for the memory's, the memory was reported "cleaned more than once"; left uncounted,
    fewer ends than hand-outs were reported."""

    class Memory:
        def __init__(self) -> None:
            self.flushes = 0

        def close(self) -> None:
            pass

    def view() -> Iterator[Memory]:
        memory = ambient.resolve_sync(Memory)
        yield memory
        memory.flushes += 1

    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("view", view)
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        memory = await scope.resolve(Memory)
    with IsolationProbe(expect_closed=True) as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            assert await scope.resolve("view") is memory
        assert memory.flushes == 1
        del scope, memory  # the probe looks for closed scopes and components kept alive
        await registry.aclose()
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned) == (1, 2)


async def test_a_users_component_the_application_hands_out_too_is_shared_with_it() -> None:
    """One object (a list cached in a global) handed to alice by a REQUEST factory and to
    the application by an APP factory is the user's state shared with every user: the
    probe reports it handed to the application and alice. It took the application's
    hand-out, an alias of the request's, for alice's own and reported nothing."""
    cached: list[str] = []
    registry = Registry()
    registry.register("notes", lambda: cached)
    registry.register("all notes", lambda: cached, lifetime=Lifetime.APP)
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            assert await scope.resolve("notes") is await scope.resolve("all notes") is cached
        del scope  # the probe looks for closed scopes kept alive
    assert [line.split(" (a factory")[0] for line in probe.report().shared] == [
        "'notes': one instance was handed to users (application), alice"
    ]
    await registry.aclose()


async def test_hand_outs_of_a_kept_object_while_memory_is_measured_are_no_ends() -> None:
    """An app whose REQUEST factory hands each user the one object it keeps for them: the
    ends of its hand-outs during the memory-growth phase, which the probe does not record,
    were counted as ends, and ``ambient check`` reported more components cleaned than
    created."""

    class Cart:
        pass

    carts: dict[str, Cart] = {}
    registry = Registry()
    registry.register("cart", lambda ctx: carts.setdefault(ctx.user_id, Cart()))

    app = resolving_app(registry, "cart")
    report = await check(app, users=3, requests=2, growth_requests=30)
    assert len(carts) == 3
    assert report.components_created == report.components_cleaned == 3 * 2
    assert report.leaks == [
        "'cart': 3 instance(s) still alive after their scope closed (referenced from a "
        "global, a cache or a pending task?)"
    ]


async def test_an_alias_made_before_the_probe_is_no_cleanup_when_it_ends() -> None:
    """A user's memory and the user's alias of it (``lambda: ambient.resolve_sync(Memory)``
    with USER lifetime) made before the probe (an app fixture wider than the test), then
    handed out under the probe by a request's alias: at shutdown the user's alias ends,
    with nothing to clean, before the memory's own cleanup. The probe had not seen that
    alias made, took its end for a cleanup of the memory, and reported a correct app's
    memory "cleaned more than once". A component really cleaned twice still is."""

    class Memory(CountsCloses):
        pass

    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("user memory", lambda: ambient.resolve_sync(Memory), lifetime=Lifetime.USER)
    registry.register("memory", lambda: ambient.resolve_sync(Memory))
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        memory = await scope.resolve("user memory")
        assert memory is await scope.resolve(Memory)
    with IsolationProbe(expect_closed=True) as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            assert await scope.resolve("memory") is memory
        del scope  # the probe looks for closed scopes kept alive
        await registry.aclose()
    assert memory.closes == 1
    del memory
    report = probe.report()
    assert report.ok, report.violations
    shared = Memory()
    registry = Registry()
    registry.register("kept", lambda: shared, lifetime=Lifetime.USER)
    registry.register("kept again", lambda: shared, lifetime=Lifetime.USER)
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        assert await scope.resolve("kept") is shared
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("bob")) as scope:
            assert await scope.resolve("kept again") is shared
        del scope
        await registry.aclose()
    assert shared.closes == 2
    assert probe.report().cleanup == ["'kept again': cleaned more than once"]


async def test_an_uncleaned_hand_out_in_an_inner_request_is_not_taken_for_an_alias() -> None:
    """A kept connection entered by one key (its exit is its cleanup) and viewed through a
    generator alias in one request, and handed out as is (not entered, nothing to clean)
    by another key in a request inside it: the inner hand-out's end is its own, so the
    alias's end, a cleanup of its own, is still the alias's. Taken for the alias's, the
    inner end left the alias's end to count as a cleanup of the connection, reported
    "cleaned more than once" though only its exit ran."""

    class Connection:
        def __init__(self) -> None:
            self.exits = 0

        def __enter__(self) -> Connection:
            return self

        def __exit__(self, *exc_info: object) -> None:
            self.exits += 1

    def view() -> Iterator[Connection]:
        yield ambient.resolve_sync("entered")

    kept = Connection()
    registry = Registry()
    registry.register("entered", lambda: kept)
    registry.register("view", view)
    registry.register("raw", lambda: kept, enter=False)
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as outer:
            assert await outer.resolve("entered") is kept
            assert await outer.resolve("view") is kept
            async with registry.open_scope(UserExecutionContext.create("alice")) as inner:
                assert await inner.resolve("raw") is kept
        del outer, inner  # the probe looks for closed scopes kept alive
    assert kept.exits == 1
    report = probe.report()
    assert report.cleanup == []
    assert [line.split(" (")[0] for line in report.violations] == [
        "'entered': 1 instance(s) still alive after their scope closed"
    ]
    await registry.aclose()


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


@dataclasses.dataclass(frozen=True)
class Limits:
    requests_per_minute: int


NAMESPACE = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
RATE = decimal.Decimal("0.15")


async def test_objects_shared_by_design_are_not_taken_for_a_shared_instance() -> None:
    """An enum member chosen per user, a compiled pattern (re caches it), timezone.utc, a
    UUID, a Decimal, a function, a class or a module is one object for every user but
    shares no state: the probe used to report them as handed to several users, cleaned
    more than once and alive after their scope. A type given as shared_types is passed
    too; a list is not."""
    users = [f"user-{n}" for n in range(20)]
    limits = Limits(60)
    shared_list: list[str] = []
    registry = Registry()
    registry.register(
        Plan, lambda user: Plan(("free", "pro")[len(user.user_id) % 2]), lifetime=Lifetime.USER
    )
    registry.register("word", lambda: re.compile(r"\w+"))
    registry.register("zone", lambda: datetime.UTC)
    registry.register("day", lambda: datetime.timedelta(days=1))
    registry.register("parse", lambda: json.loads)
    registry.register("kind", lambda: Notes)
    registry.register("module", lambda: json)
    registry.register("pair", lambda: (Plan.PRO, datetime.UTC))
    registry.register("namespace", lambda: NAMESPACE)
    registry.register("rate", lambda: RATE)
    registry.register(Limits, lambda: limits)
    registry.register("notes", lambda: shared_list)
    keys = [Plan, "word", "zone", "day", "parse", "kind", "module", "pair", "namespace", "rate"]
    keys.append(Limits)

    async def requests(probe: IsolationProbe, *keys: Any) -> IsolationReport:
        with probe:
            for user in users:
                async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                    for key in keys:
                        await scope.resolve(key)
            del scope  # the probe looks for closed scopes kept alive
        return probe.report()

    report = await requests(IsolationProbe(shared_types=[Limits]), *keys)
    assert report.ok, report.violations
    report = await requests(IsolationProbe(), *keys)
    assert report.shared == [
        f"Limits: one instance was handed to users {', '.join(sorted(users[: n + 2]))} "
        "(a factory returning a shared object, e.g. one cached in a module global?)"
        for n in range(len(users) - 1)
    ]
    report = await requests(IsolationProbe(shared_types=[Limits]), "notes")
    assert any("'notes': one instance was handed to users" in v for v in report.violations)
    await registry.aclose()


async def test_shared_types_that_are_not_classes_are_refused() -> None:
    """``shared_types=["Limits"]`` (a name for the class) was accepted: every check of a
    created component then raised inside the probe's hook, which was only logged, so the
    probe recorded nothing and reported an instance handed to two users as clean. It is
    refused when the probe is made; classes are taken as before."""
    with pytest.raises(TypeError, match=r"takes classes, not 'Limits' \(a str\)"):
        IsolationProbe(shared_types=["Limits"])  # type: ignore[list-item]
    shared = Notes()
    registry = Registry()
    registry.register(Notes, lambda: shared)
    with IsolationProbe(shared_types=[Limits]) as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)):
                await ambient.resolve(Notes)
    assert probe.report().shared == [
        "Notes: one instance was handed to users alice, bob (a factory returning a shared "
        "object, e.g. one cached in a module global?)"
    ]


async def test_a_user_of_a_tenant_is_told_apart_from_a_user_named_like_it() -> None:
    """User "bob" of tenant "acme" and user "acme/bob" without a tenant were both labelled
    "acme/bob", so one instance handed to both went unreported."""
    shared_list: list[str] = []
    registry = Registry()
    registry.register("notes", lambda: shared_list)
    principals = [
        UserExecutionContext.create(f"{tenant}/{user}")
        for tenant in ("acme", "globex")
        for user in ("bob", "carol")
    ] + [
        UserExecutionContext.create(user, tenant_id=tenant)
        for tenant in ("acme", "globex")
        for user in ("bob", "carol")
    ]
    for first, second in itertools.combinations(principals, 2):
        with IsolationProbe() as probe:
            for ctx in (first, second):
                async with registry.open_scope(ctx) as scope:
                    await scope.resolve("notes")
            del scope
        shared = probe.report().shared
        assert len(shared) == 1, (first, second)
    with IsolationProbe() as probe:
        for ctx in (principals[0], principals[4]):
            async with registry.open_scope(ctx) as scope:
                await scope.resolve("notes")
        del scope
    assert probe.report().shared == [
        "'notes': one instance was handed to users acme/bob, bob (tenant acme) (a factory "
        "returning a shared object, e.g. one cached in a module global?)"
    ]
    await registry.aclose()


async def test_expect_closed_requires_user_and_app_components_to_be_cleaned() -> None:
    """``expect_closed=True`` holds USER and APP components to a cleanup too: before
    ``registry.aclose()`` each is reported, after it none is. Without it, only REQUEST
    components must be cleaned by the time of the report."""

    class Memory:
        def close(self) -> None:
            pass

    class Client:
        def close(self) -> None:
            pass

    for expect_closed in (False, True):
        registry = Registry()
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        registry.register(Client, Client, lifetime=Lifetime.APP)
        with IsolationProbe(expect_closed=expect_closed) as probe:
            for user in ("alice", "bob"):
                async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                    await scope.resolve(Memory)
                    await scope.resolve(Client)
            del scope  # the probe looks for closed scopes kept alive
            open_report = probe.report()
            await registry.aclose()
        if expect_closed:
            assert [line.split("<locals>.")[-1] for line in open_report.cleanup] == [
                "Memory: 2 instance(s) created but never cleaned",
                "Client: 1 instance(s) created but never cleaned",
            ]
        else:
            assert open_report.ok, open_report.violations
        assert probe.report().ok, probe.report().violations
        assert probe.report().cleaned == 3


async def test_one_tuple_holding_a_mutable_object_handed_to_two_users_is_shared() -> None:
    """A tuple is a plain value only when all it holds is: one holding a list, handed to
    two users as the same object, shares that list between them."""
    settings = ("https://api.example.com/v1", 10)
    pending = ("https://api.example.com/v1", [])
    registry = Registry()
    registry.register("settings", lambda: settings)
    registry.register("pending", lambda: pending)

    async def requests(key: str) -> IsolationReport:
        with IsolationProbe() as probe:
            for user in ("alice", "bob"):
                async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                    assert await scope.resolve(key) is globals_of[key]
            del scope  # the probe looks for closed scopes kept alive
        return probe.report()

    globals_of = {"settings": settings, "pending": pending}
    assert (await requests("settings")).ok
    assert (await requests("pending")).shared == [
        "'pending': one instance was handed to users alice, bob (a factory returning a "
        "shared object, e.g. one cached in a module global?)"
    ]
    await registry.aclose()


async def test_a_report_while_a_scope_is_open_leaves_its_cleanups_to_come() -> None:
    """A report made while a scope is open says the scope is open, and does not count its
    REQUEST components as never cleaned: they are cleaned when it closes."""

    class Session:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Session, Session)
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            await scope.resolve(Session)
            during = probe.report()
        del scope  # the probe looks for closed scopes kept alive
    assert (during.cleanup, during.outlived) == ([], [])
    assert len(during.open_scopes) == 1
    assert "alice" in during.open_scopes[0]
    assert during.violations == during.open_scopes
    assert not during.ok
    assert probe.report().ok, probe.report().violations
    await registry.aclose()


async def test_one_user_component_handed_to_two_users_is_shared() -> None:
    """A USER factory returning one cached object gives every user the same "per-user"
    component: reported as shared, as a REQUEST one is."""

    class Memory:
        pass

    cached = Memory()
    registry = Registry()
    registry.register(Memory, lambda: cached, lifetime=Lifetime.USER)
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                assert await scope.resolve(Memory) is cached
        del scope  # the probe looks for closed scopes kept alive
    assert [line.split("<locals>.")[-1] for line in probe.report().shared] == [
        "Memory: one instance was handed to users alice, bob (a factory returning a shared "
        "object, e.g. one cached in a module global?)"
    ]
    await registry.aclose()


async def test_an_object_without_a_cleanup_handed_out_again_is_not_cleaned_twice() -> None:
    """A REQUEST factory returning one kept object that has nothing to clean up (no
    ``close()``), to the same user in two requests: the end of each request is no cleanup
    of it, so it is not "cleaned more than once" (it is reported as outliving its
    scope). One with a ``close()`` is closed by both requests, and reported so."""

    class Plain:
        pass

    class Closing:
        def close(self) -> None:
            pass

    kept = {"plain": Plain(), "closing": Closing()}
    registry = Registry()
    registry.register("plain", lambda: kept["plain"])
    registry.register("closing", lambda: kept["closing"])

    async def requests(key: str) -> IsolationReport:
        with IsolationProbe() as probe:
            for _ in range(2):
                async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
                    assert await scope.resolve(key) is kept[key]
            del scope  # the probe looks for closed scopes kept alive
        return probe.report()

    plain = await requests("plain")
    assert plain.cleanup == []
    assert plain.outlived == [
        "'plain': 1 instance(s) still alive after their scope closed (referenced from a "
        "global, a cache or a pending task?)"
    ]
    assert plain.violations == plain.outlived
    assert not plain.ok
    assert (await requests("closing")).cleanup == ["'closing': cleaned more than once"]
    await registry.aclose()


async def test_plain_values_are_counted_neither_created_nor_cleaned() -> None:
    """The probe does not track plain values, so their ends are not cleanups either: the
    counts of a request resolving a value and an object are one created, one cleaned."""

    class Session:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register("quota", lambda ctx: len(ctx.user_id) * 10)
    registry.register(Session, Session)
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                await scope.resolve("quota")
                await scope.resolve(Session)
        del scope  # the probe looks for closed scopes kept alive
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned, report.scopes) == (2, 2, 2)
    await registry.aclose()


async def test_request_components_that_cannot_be_weakly_referenced_are_reported_on() -> None:
    """A REQUEST component that is a dict or a list (no weak reference to it) is kept by
    the probe itself: its report neither fails on it nor takes it for outliving its scope,
    and still finds one handed to two users."""
    registry = Registry()
    registry.register("headers", lambda ctx: {"user": ctx.user_id})
    registry.register("trail", lambda ctx: [ctx.user_id])
    kept: dict[str, str] = {}
    registry.register("kept", lambda: kept)
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                assert (await scope.resolve("headers"))["user"] == user
                assert await scope.resolve("trail") == [user]
        del scope  # the probe looks for closed scopes kept alive
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned) == (4, 4)
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                await scope.resolve("kept")
        del scope
    assert [line.split(" (a factory")[0] for line in probe.report().violations] == [
        "'kept': one instance was handed to users alice, bob"
    ]
    await registry.aclose()


async def test_a_closed_scope_kept_alive_fails_the_probe() -> None:
    """A closed scope something still holds is a violation: the report is not ok and
    assert_clean raises naming it."""
    registry = Registry()
    kept: list[Any] = []
    with IsolationProbe() as probe:
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            kept.append(scope)
        del scope
    report = probe.report()
    assert len(report.leaked_scopes) == 1
    assert "alice" in report.leaked_scopes[0]
    assert report.violations == report.leaked_scopes
    assert not report.ok
    with pytest.raises(AssertionError, match="still alive after garbage collection"):
        probe.assert_clean()
    kept.clear()
    assert probe.report().ok
    await registry.aclose()


async def test_a_probe_watches_only_while_installed_and_once() -> None:
    """Installed twice, a probe would see every event twice (each cleanup a second one);
    left installed after its block, it would go on recording other tests' components."""
    registry = Registry()
    registry.register(Notes, Notes)
    probe = IsolationProbe()
    with probe:
        with pytest.raises(RuntimeError, match="this IsolationProbe is already installed"):
            probe.__enter__()
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            await scope.resolve(Notes)
    async with registry.open_scope(UserExecutionContext.create("bob")) as scope:
        await scope.resolve(Notes)
    del scope  # the probe looks for closed scopes kept alive
    report = probe.report()
    assert (report.scopes, report.created, report.cleaned) == (1, 1, 1)
    assert report.ok, report.violations
    await registry.aclose()


async def test_user_components_expiring_while_memory_is_measured_are_seen_cleaned() -> None:
    """A correct app whose USER components expire by idle_ttl (a fast clock makes them
    expire during the run): those expiring during the memory-growth phase were reported
    "created but never cleaned", since the probe looked away then."""

    class Session:
        def close(self) -> None:
            pass

    def fast_clock() -> float:
        return time.monotonic() * 1000  # idle_ttl=5 passes in 5 ms

    registry = Registry(clock=fast_clock)
    registry.register(Session, lambda: Session(), lifetime=Lifetime.USER, idle_ttl=5)

    app = resolving_app(registry, Session)
    report = await check(app, users=10, requests=2, growth_requests=300)
    assert report.ok, report.violations


async def test_aliases_resolved_while_memory_is_measured_are_no_cleanups() -> None:
    """A correct app whose requests each resolve an alias of the user's memory and of the
    application's client (``lambda: ambient.resolve_sync(Memory)``): the ends of the
    aliases made during the memory-growth phase, which the probe does not record, were
    counted as cleanups of the components they hand out, and ``ambient check`` (whose
    growth phase is on by default) reported them "cleaned more than once"."""

    class Memory:
        def close(self) -> None:
            pass

    class Client:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("memory", lambda: ambient.resolve_sync(Memory))
    registry.register(Client, Client, lifetime=Lifetime.APP)
    registry.register("client", lambda: ambient.resolve_sync(Client))

    async def endpoint(request: Request) -> Response:
        assert await ambient.resolve("memory") is await ambient.resolve(Memory)
        assert await ambient.resolve("client") is await ambient.resolve(Client)
        return JSONResponse({"user": ambient.get_current_context().user_id})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=registry, identity=trusted_header()
    )
    report = await check(app, users=5, requests=2, growth_requests=50)
    assert report.ok, report.violations
    assert report.components_created == report.components_cleaned == 5 * 2 * 2 + 5 + 1


async def test_each_user_cycles_through_the_whole_plan() -> None:
    """Each user sends its requests in the plan's order, starting over at its end, with
    ``{user}`` in a body replaced by its id: every planned request is sent as planned, so
    what each one serves is checked."""
    hits: dict[str, list[str]] = {}

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        said = (await request.json())["of"] if request.method == "POST" else None
        hits.setdefault(user, []).append(f"{request.method} {request.url.path} {said}")
        return JSONResponse({"user": user})

    inner = Starlette(routes=[Route("/a", endpoint), Route("/b", endpoint, methods=["POST"])])
    app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
    plan = [PlannedRequest("GET", "/a"), PlannedRequest("POST", "/b", '{"of": "{user}"}')]
    report = await check(app, plan=plan, users=2, requests=3)
    assert report.ok, report.violations
    assert len(hits) == 2
    assert all(
        sent == ["GET /a None", f"POST /b {user}", "GET /a None"] for user, sent in hits.items()
    ), hits


@pytest.mark.parametrize(
    ("size", "said"),
    [
        ({"users": 10_001}, "users must be from 1 to 10000, not 10001"),
        ({"requests": 10_001}, "requests must be from 1 to 10000, not 10001"),
        ({"users": 0}, "users must be from 1 to 10000, not 0"),
        ({"users": -3}, "users must be from 1 to 10000, not -3"),
        ({"requests": 0}, "requests must be from 1 to 10000, not 0"),
        (
            {"users": 200, "requests": 10_000},
            "users=200 and requests=10000 make 2000000 requests; at most 1000000",
        ),
        ({"growth_requests": 1_000_001}, "growth_requests must be from 0 to 1000000, not"),
        ({"growth_requests": -1}, "growth_requests must be from 0 to 1000000, not -1"),
        # None waits as long as a request takes; infinity is no limit to cancel at.
        ({"time_limit": float("inf")}, "time_limit must be a finite number of seconds"),
        ({"time_limit": 0}, "time_limit must be more than 0 seconds, not 0"),
        # Fewer than one user in flight sent no request and passed any app.
        ({"concurrency": 0}, "concurrency must be at least 1 (None: all the users), not 0"),
        ({"concurrency": -1}, "concurrency must be at least 1 (None: all the users), not -1"),
    ],
)
async def test_run_check_refuses_more_users_or_requests_than_it_can_drive(
    size: dict[str, int], said: str
) -> None:
    """The bounds of ``ambient check`` hold for ``run_check`` too, before anything runs
    (the app's startup, which fails here, is never reached)."""

    async def fails_at_startup(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "not to be reached"})

    with pytest.raises(ValueError, match=re.escape(said)):
        await run_check(fails_at_startup, **{"growth_requests": 0, **size}, measure_overhead=False)


async def failing_startup(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "db down"})


def _app_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """Write module ``name`` with ``source`` into ``tmp_path`` and run the test from there,
    so that ``ambient check name:attr`` imports it afresh."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)


def _noted_registry() -> Registry:
    registry = Registry()
    registry.register(Notes, Notes)
    return registry


class TestAppsThatDoNotAnswer:
    @pytest.mark.parametrize(
        ("endpoint", "said"),
        [
            (_never_answers, "returned without answering"),
            (_never_finishes, "before its response body ended"),
        ],
    )
    async def test_a_request_without_a_whole_response_fails_the_check(
        self, endpoint: Any, said: str
    ) -> None:
        """No response at all, or a body never ended: each request is a failure (the
        check used to pass such an app, its status counting as 0 < 400)."""
        app = AmbientMiddleware(endpoint, registry=Registry(), identity=trusted_header())
        report = await check(app, users=3, requests=2)
        assert not report.ok
        assert len(report.failed_requests) == 6
        assert all(said in line for line in report.failed_requests)

    @pytest.mark.parametrize(
        ("status", "body", "said"),
        [
            (200, "text", "TypeError: a response body must be bytes, not 'str'"),
            ("200", b"ok", "TypeError: the response status must be an int, not '200'"),
            (True, b"ok", "TypeError: the response status must be an int, not True"),
        ],
    )
    async def test_a_response_of_the_wrong_types_fails_its_requests(
        self, status: Any, body: Any, said: str
    ) -> None:
        """A ``str`` body or status, or a ``bool`` status (an ``int`` to Python, but no HTTP
        status), is refused in the app's ``send``, as a server refuses it: each request
        fails, where the check used to end in a traceback."""

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": status, "headers": []})
                await send({"type": "http.response.body", "body": body})

        report = await check(app, users=2, requests=1)
        assert len(report.failed_requests) == 2
        assert all(said in line for line in report.failed_requests)

    @pytest.mark.parametrize("status", [-1, 0, 99, 101, 199, 1000])
    async def test_a_status_of_no_final_response_fails_its_requests(self, status: int) -> None:
        """A status below 200 (none, or an informational one) or past 999 is no final
        response, refused in the app's ``send`` as an HTTP/1.1 server refuses it: each
        request fails, where the check took one below 200 for neither a success nor a
        failure and passed the app."""

        async def endpoint(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = AmbientMiddleware(endpoint, registry=Registry(), identity=trusted_header())
        report = await check(app, users=2, requests=1)
        assert not report.ok
        said = f"ValueError: the response status must be from 200 to 999, not {status}"
        assert report.failed_requests == [
            f"GET / for {user}: HTTP 500 {said!r}"
            for user in re.findall(r"check-\d{5}-[0-9a-f]{6}", " ".join(report.failed_requests))
        ]
        assert len(report.failed_requests) == 2
        assert report.isolation == []

    async def test_an_app_that_returns_from_the_lifespan_is_checked_not_waited_for(
        self,
    ) -> None:
        """A hand-written app that ignores every scope but http (``return`` at once, as
        uvicorn accepts): the check goes on instead of waiting forever for a startup
        answer."""
        inner = notes_app(_noted_registry())

        async def http_only(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                await inner(scope, receive, send)

        with anyio.fail_after(30):
            report = await check(http_only, users=3, requests=2)
        assert report.ok, report.violations

    async def test_the_state_the_lifespan_sets_is_each_requests_and_sockets_own_copy(
        self,
    ) -> None:
        """What the app's startup puts in the lifespan state (Starlette's lifespan yielding
        a dict, a pool as often) is in each request's and socket's state, as servers give it,
        a shallow copy each: a correct app reading it there used to fail every request."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
            yield {"greeting": "hello"}

        async def endpoint(request: Request) -> Response:
            user = ambient.get_current_context().user_id
            # Set by no request before, whoever it was for: each has a copy of its own.
            said = getattr(request.state, "user", user)
            request.state.user = user
            return JSONResponse({"greeting": request.state.greeting, "user": said})

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text(websocket.state.greeting)
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        routes = [Route("/", endpoint), WebSocketRoute("/events", events)]
        inner = Starlette(routes=routes, lifespan=lifespan)
        app = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        report = await check(app, users=3, requests=2, websocket="/events")
        assert report.ok, report.violations
        assert report.websocket_frames == 3

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio raises no cancellation unasked
    @pytest.mark.parametrize("where", ["request", "socket", "lifespan"])
    async def test_a_cancellation_nobody_asked_for_is_the_apps_failure(self, where: str) -> None:
        """An app that cancels a task of its own and awaits it without suppressing its
        CancelledError (a common slip) raises a cancellation while nothing cancels it. In a
        request or a socket, that is a failure of the app's: it used to end the simulated
        users' tasks quietly, their requests never looked at, and the check passed. In the
        lifespan, it is the lifespan's error, as any other (a lifespan the check goes on
        without), where the check ended in a traceback."""

        async def slip() -> None:
            task = asyncio.ensure_future(asyncio.Event().wait())
            await asyncio.sleep(0)
            task.cancel()
            await task  # the slip: the task's CancelledError comes out

        async def endpoint(request: Request) -> Response:
            if where == "request":
                await slip()
            return JSONResponse({"user": ambient.get_current_context().user_id})

        async def events(websocket: WebSocket) -> None:
            await websocket.accept()
            if where == "socket":
                await slip()
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()

        routes = [Route("/", endpoint), WebSocketRoute("/events", events)]
        inner = Starlette(routes=routes)
        middleware = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan" and where == "lifespan":
                await receive()  # a hand-written lifespan, which lets the slip out
                await slip()
            await middleware(scope, receive, send)

        with anyio.fail_after(30):
            report = await check(app, users=3, requests=2, websocket="/events")
        if where == "lifespan":
            assert report.ok, report.violations
            return
        assert not report.ok
        user = r"check-\d{5}-[0-9a-f]{6}"
        said = (
            rf"GET / for {user}: HTTP 500 'CancelledError'"
            if where == "request"
            else rf"WS /events for {user}: the app raised CancelledError"
        )
        assert len(report.failed_requests) == (6 if where == "request" else 3)
        assert all(re.fullmatch(said, line) for line in report.failed_requests), report
        assert report.isolation == []

    async def test_user_components_are_not_held_to_a_cleanup_after_a_failed_shutdown(
        self,
    ) -> None:
        """A shutdown that failed is said so, once: the users' components its registry never
        closed are what a failed shutdown leaves, not findings of their own as after a
        shutdown that completed."""
        registry = Registry()
        registry.register(Notes, Notes, lifetime=Lifetime.USER)
        inner = notes_app(registry)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                await inner(scope, receive, send)
                return
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.failed", "message": "the database went away"})

        report = await check(app, users=3, requests=2)
        assert report.cleanup == ["the app's shutdown failed: the database went away"]
        assert report.components_created == 3
        assert report.components_cleaned == 0

    async def test_a_shutdown_that_hangs_fails_the_check_at_the_timeout(self) -> None:
        hangs_at_shutdown = shutting_down_with(notes_app(_noted_registry()), anyio.sleep_forever)
        with anyio.fail_after(30):
            report = await check(hangs_at_shutdown, users=3, requests=2, time_limit=0.2)
        assert report.cleanup == ["the app's shutdown did not answer within 0.2 s"]
        assert not report.ok

    @pytest.mark.parametrize(
        ("ending", "said"),
        [
            (
                "failed",
                "the app's shutdown failed: ConnectionError: the database went away",
            ),
            (
                "raised",
                "the app's lifespan raised ConnectionError: the database went away before "
                "its shutdown completed",
            ),
        ],
    )
    async def test_a_shutdown_that_fails_fails_the_check(self, ending: str, said: str) -> None:
        """A shutdown answered with ``lifespan.shutdown.failed``, or a lifespan that raises
        at shutdown, is a finding as a shutdown that hangs is (the check passed both)."""

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            raise ConnectionError("the database went away")

        inner = Starlette(routes=[Route("/", lambda request: JSONResponse({}))], lifespan=lifespan)
        app: Any = AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())
        if ending == "raised":
            starlette_app = app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                async def send_or_raise(message: Any) -> None:
                    if message["type"] == "lifespan.shutdown.failed":
                        raise ConnectionError("the database went away")
                    await send(message)

                await starlette_app(scope, receive, send_or_raise)

        with anyio.fail_after(30):
            report = await check(app, users=3, requests=2)
        assert report.cleanup == [said]
        assert not report.ok

    async def test_a_request_that_hangs_is_cancelled_at_the_timeout_and_cleaned(self) -> None:
        """An endpoint that never answers: with a timeout each request is cancelled and
        counted as failed, its components still cleaned (the check used to wait forever)."""
        registry = _noted_registry()

        async def hangs(scope: Any, receive: Any, send: Any) -> None:
            await ambient.resolve(Notes)
            await anyio.sleep_forever()

        app = AmbientMiddleware(hangs, registry=registry, identity=trusted_header())
        with anyio.fail_after(30):
            report = await check(app, users=3, requests=2, time_limit=0.2)
        assert len(report.failed_requests) == 6
        assert all("no whole response within 0.2 s" in line for line in report.failed_requests)
        assert report.components_created == report.components_cleaned == 6
        assert not report.cleanup

    async def test_work_past_the_timeout_after_a_whole_response_is_no_failed_request(
        self,
    ) -> None:
        """An app whose call goes on after its whole response (a background task that
        outlasts the time limit) answered each request: cut short at the time limit, its
        requests are no failures."""

        async def answers_then_works(scope: Any, receive: Any, send: Any) -> None:
            user = ambient.get_current_context().user_id
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": user.encode()})
            await anyio.sleep_forever()  # the background task after the response

        app = AmbientMiddleware(answers_then_works, registry=Registry(), identity=trusted_header())
        with anyio.fail_after(30):
            report = await check(app, users=3, requests=2, time_limit=0.1)
        assert report.failed_requests == []
        assert report.isolation == []


def contextlib_lifespan(fn: Callable[[Starlette], AsyncIterator[None]]) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(fn)


class ContextDropper(BaseHTTPMiddleware):
    """Hands the request to a task started in an empty Context, as a middleware with its own
    worker pool would: the endpoint no longer sees the request's context."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        empty = contextvars.Context()
        if sniffio.current_async_library() == "asyncio":
            return await asyncio.create_task(call_next(request), context=empty)
        import trio

        outcome: list[Any] = []
        done = trio.Event()

        async def run() -> None:
            # A system task must not raise (it would crash the run): hand the error back.
            try:
                outcome.append(await call_next(request))
            except Exception as exc:
                outcome.append(exc)
            finally:
                done.set()

        trio.lowlevel.spawn_system_task(run, context=empty)
        await done.wait()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]  # type: ignore[no-any-return]


class TestCommandLine:
    def test_check_of_the_demo_as_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        code = main(
            ["check", "--users", "12", "--requests", "4", "--json", "--growth-requests", "200"]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        assert report["ok"] is True
        assert report["users"] == 12
        assert report["requests"] == 48
        assert report["middleware_overhead_us"] is not None
        # The demo's own plan: each user holds its event stream open too.
        assert (report["websockets"], report["scopes"]) == (12, 48 + 12)

    def test_a_skipped_memory_measurement_says_so(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--growth-requests 0`` ("0 skips it"): the table says memory growth was not
        measured and the JSON has ``null`` for it; both said 0.0 KiB per 1,000 requests."""
        options = ["check", "--users", "3", "--requests", "2", "--growth-requests", "0"]
        assert main(options) == 0
        table = " ".join(capsys.readouterr().out.replace("│", " ").split())
        assert "memory growth not measured (--growth-requests 0)" in table
        assert "KiB per 1,000" not in table
        assert main([*options, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["memory_growth_kib_per_1k"] is None

    def test_json_stays_json_when_the_app_prints(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """What the app prints or logs to stdout (at import, startup or in a request) goes
        to stderr with ``--json``: stdout is the report alone, which CI parses."""
        _app_module(
            tmp_path,
            monkeypatch,
            "prints_for_check",
            "import logging, sys\n"
            "from ambient import Registry\n"
            "from ambient.middleware import AmbientMiddleware, trusted_header\n"
            "print('importing')\n"
            "async def inner(scope, receive, send):\n"
            "    if scope['type'] == 'lifespan':\n"
            "        await receive()\n"
            "        print('started')\n"
            "        await send({'type': 'lifespan.startup.complete'})\n"
            "        await receive()\n"
            "        await send({'type': 'lifespan.shutdown.complete'})\n"
            "        return\n"
            "    print('serving')\n"
            "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
            "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
            "def create_app():\n"
            "    print('building')\n"
            "    return AmbientMiddleware(inner, registry=Registry(), identity=trusted_header())\n",
        )
        code = main(
            [
                *("check", "prints_for_check:create_app", "--users", "2", "--requests", "1"),
                *("--growth-requests", "0", "--json"),
            ]
        )
        captured = capsys.readouterr()
        assert code == 0
        assert json.loads(captured.out)["ok"] is True
        assert captured.err.split() == ["importing", "building", "started", "serving", "serving"]

    @pytest.mark.parametrize(
        ("target", "said"),
        [
            ("tests.test_check:no_such_app", "module 'tests.test_check' has no attribute"),
            ("tests.test_check:failing_startup", "the app's startup failed: db down"),
        ],
    )
    def test_json_says_a_check_that_cannot_run(
        self, target: str, said: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An app that cannot be loaded or started: with ``--json`` stdout is still JSON
        (it was empty), and the line on stderr and the exit status are as without it."""
        with pytest.raises(SystemExit) as refused:
            main(["check", target, "--growth-requests", "0", "--json"])
        assert isinstance(refused.value.code, str)
        assert said in refused.value.code
        report = json.loads(capsys.readouterr().out)
        assert report == {"app": target, "ok": False, "error": refused.value.code}

    def test_check_of_a_broken_app_exits_nonzero_with_a_table(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(
            [
                "check",
                "tests.test_check:broken_app",
                "--users",
                "8",
                "--requests",
                "2",
                "--growth-requests",
                "0",
            ]
        )
        out = capsys.readouterr().out
        assert code == 1
        assert "FAILED" in out
        assert "handed to users" in out
        assert "data crossed users" in out
        assert "no data of another" not in out

    def test_check_of_a_broken_app_as_json_is_not_ok(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With ``--json`` the report CI parses says ``ok: false`` for an app that fails the
        check, next to the findings that fail it, and the exit status says so too."""
        target = "tests.test_check:broken_app"
        options = ["--users", "5", "--requests", "1", "--growth-requests", "0", "--json"]
        code = main(["check", target, *options])
        report = json.loads(capsys.readouterr().out)
        assert code == 1
        assert report["ok"] is False
        assert any("one instance was handed to users" in line for line in report["isolation"])

    def test_the_table_counts_every_problem_of_a_row_cut_short(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """30 users of one shared Notes: 29 "handed to users" findings and 29 responses
        naming the first user, each list cut to 20 lines and "... and 9 more". The row
        counted only the last list's "more" and said 50 problems, not 58."""
        target = "tests.test_check:broken_app"
        code = main(["check", target, "--users", "30", "--requests", "1", "--growth-requests", "0"])
        out = capsys.readouterr().out
        assert code == 1
        assert out.count("... and 9 more") == 2
        assert "58 problem(s)" in out

    def test_bad_arguments(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["check", "--users", "0"])
        with pytest.raises(SystemExit, match="module:attr"):
            main(["check", "nocolon"])
        wrongs = {
            "--growth-requests=-50": "must be from 0 to 1000000, not -50",
            "--request=GET history": "the path must start with '/'",
            "--identity=cookie": "must be header:NAME, bearer or jwt, not 'cookie'",
            "--identity=header: ": "must be header:NAME, bearer or jwt, not 'header: '",
            "--identity=bearer:authorization": "must be header:NAME, bearer or jwt, not",
            "--identity=jwt:HS256": "must be header:NAME, bearer or jwt, not",
            "--identity=header:x user": "header name must be a non-empty HTTP token",
            "--jwt-audience=": "must not be empty",
            "--websocket=events": "the path must start with '/', not 'events'",
            "--websocket-send={tenant}": "--websocket-send '{tenant}' names {tenant}: give",
        }
        for wrong, said in wrongs.items():
            with pytest.raises(SystemExit) as refused:
                main(["check", wrong])
            # argparse's, with the usage: not a traceback, nor the status of a failed check
            assert refused.value.code == 2
            err = capsys.readouterr().err
            assert "usage: ambient check" in err
            assert said in err
        for wrong in ("GET nopath", "nopath", "", "  "):
            with pytest.raises(ValueError, match="must start with"):
                parse_request(wrong)
        assert parse_request("/only/a/path") == PlannedRequest("GET", "/only/a/path")
        assert parse_request('POST /x {"a": 1}') == PlannedRequest("POST", "/x", '{"a": 1}')

    def test_a_request_body_that_is_not_json_is_refused_before_the_run(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every body goes out as application/json: one that was not JSON ran the whole
        check, and each request failed as the app's error (a 500 for a JSON parser)."""
        with pytest.raises(SystemExit) as refused:
            main(["check", "--request", "POST /x {bad json", "--growth-requests", "0"])
        assert refused.value.code == 2
        assert "the body is not JSON" in capsys.readouterr().err
        with pytest.raises(ValueError, match="the body is not JSON"):
            parse_request("POST /x prompt={user}")
        assert parse_request('POST /x {"to": "{user}"}').body == '{"to": "{user}"}'

    def test_a_request_body_nested_too_deeply_is_refused_in_one_line(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """JSON nested deeper than the parser recurses: refused as an argument, not a
        RecursionError's traceback."""
        body = "[" * 100_000 + "]" * 100_000
        with pytest.raises(SystemExit) as refused:
            main(["check", "--request", f"POST /x {body}", "--growth-requests", "0"])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            "ambient check: error: argument --request: request POST /x: the body's JSON is "
            "nested too deeply to be read"
        )

    def test_the_demo_in_jwt_mode_passes_with_jwt_identity(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        options = ["--users", "12", "--requests", "4", "--growth-requests", "200"]
        code = main(["check", "--identity", "jwt", *options])
        out, err = capsys.readouterr()
        assert code == 0, out
        assert "PASSED" in out
        code = main(["check", "--identity", "jwt", *options, "--json"])
        said, err_json = capsys.readouterr()
        assert code == 0
        assert json.loads(said)["tokens_refused"] == 0
        for text in (out, err, said, err_json):
            assert DEMO_SECRET not in text
            assert "eyJ" not in text  # how every JWT begins

    def test_tokens_the_app_refuses_fail_the_check_saying_so(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The demo verifies tokens with another secret than the check signs them with."""
        _app_module(
            tmp_path,
            monkeypatch,
            "other_secret_app_for_check",
            "import os\n"
            "from unittest import mock\n"
            "from ambient.demo import app\n"
            "from tests.test_check import OTHER_SECRET\n"
            "def create_app():\n"
            "    with mock.patch.dict(os.environ, {'AMBIENT_JWT_SECRET': OTHER_SECRET}):\n"
            "        return app.create_app()\n",
        )
        monkeypatch.setenv("AMBIENT_JWT_SECRET", DEMO_SECRET)
        argv = ["check", "other_secret_app_for_check:create_app", "--identity", "jwt"]
        argv += ["--users", "4", "--requests", "2", "--growth-requests", "0"]
        code = main([*argv, "--json"])
        said, err_json = capsys.readouterr()
        report = json.loads(said)
        assert code == 1
        assert report["isolation"] == []
        assert report["tokens_refused"] == 8
        assert report["failed_requests"] == [
            "the app refused the tokens of 8 of 8 requests with HTTP 401 (the first answer: "
            '"the bearer token\'s signature is invalid"): does it verify HS256 tokens with '
            "the secret they are signed with (AMBIENT_JWT_SECRET), and expect the aud and iss "
            "they carry (--jwt-audience, --jwt-issuer)?"
        ]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 1
        assert re.search(r"isolation\W+not tested\W+the app refused every token \(401\)", out)
        assert "the app refused the tokens of 8 of 8 requests with HTTP 401" in out
        assert "ambient context" not in out
        assert "FAILED" in out
        for text in (out, err, said, err_json):
            assert DEMO_SECRET not in text
            assert OTHER_SECRET not in text
            assert "eyJ" not in text

    @pytest.mark.parametrize(
        ("secret", "said"),
        [
            (None, "the AMBIENT_JWT_SECRET environment variable, which is not set"),
            ("", "the AMBIENT_JWT_SECRET environment variable, which is empty"),
            (
                PUBLIC_KEY,
                "--identity jwt: the JWT secret cannot sign HS256 tokens (is it a public key?)",
            ),
        ],
    )
    def test_a_secret_missing_or_unusable_is_said_in_one_line(
        self,
        secret: str | None,
        said: str,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        if secret is None:
            monkeypatch.delenv("AMBIENT_JWT_SECRET", raising=False)
        else:
            monkeypatch.setenv("AMBIENT_JWT_SECRET", secret)
        with pytest.raises(SystemExit) as refused:
            main(["check", "--identity", "jwt", "--users", "2", "--requests", "1"])
        out, err = capsys.readouterr()
        assert refused.value.code == 2
        assert said in err
        assert "Traceback" not in out + err
        assert not secret or secret not in out + err

    def test_jwt_claims_without_jwt_identity_are_refused(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        options = {
            "--jwt-audience": "api",
            "--jwt-issuer": "api",
            "--jwt-algorithm": "RS256",
            "--jwt-key-id": "k1",
        }
        for option, value in options.items():
            with pytest.raises(SystemExit) as refused:
                main(["check", option, value, "--users", "2", "--requests", "1"])
            assert refused.value.code == 2
            assert f"{option}: for --identity jwt only" in capsys.readouterr().err
        with pytest.raises(SystemExit) as refused:
            main(["check", "--jwt-issuer", "i", "--jwt-key-id", "k", "--users", "2"])
        assert "--jwt-issuer and --jwt-key-id: for --identity jwt only" in (capsys.readouterr().err)

    def test_tokens_signed_with_a_private_key(
        self, tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        private, public = _key_pair("ES256")
        source = (
            "from starlette.applications import Starlette\n"
            "from starlette.responses import JSONResponse\n"
            "from starlette.routing import Route\n"
            "import ambient\n"
            "from ambient.middleware import AmbientMiddleware\n"
            "from ambient.middleware.identity import jwt_bearer\n"
            "async def whoami(request):\n"
            "    return JSONResponse({'user': ambient.get_current_context().user_id})\n"
            "app = AmbientMiddleware(Starlette(routes=[Route('/', whoami)]),\n"
            "    registry=ambient.Registry(),\n"
            f"    identity=jwt_bearer({public!r}, algorithms=['ES256']))\n"
        )
        _app_module(tmp_path, monkeypatch, "signed_app", source)
        monkeypatch.setenv("AMBIENT_JWT_SECRET", private)
        options = ["signed_app:app", "--identity", "jwt", "--users", "4", "--requests", "2"]
        assert main(["check", *options, "--growth-requests", "0", "--jwt-algorithm", "ES256"]) == 0
        assert "PASSED" in capsys.readouterr().out
        # Signed HS256 with the PEM text as its secret: refused before the run.
        with pytest.raises(SystemExit) as refused:
            main(["check", *options])
        out, err = capsys.readouterr()
        assert refused.value.code == 2
        assert (
            "--identity jwt: the JWT secret cannot sign HS256 tokens: it is a PEM private key, "
            "which signs RS, PS, ES or EdDSA tokens (AMBIENT_JWT_SECRET): give the app's with "
            "--jwt-algorithm"
        ) in err
        assert private not in out + err
        monkeypatch.delenv("AMBIENT_JWT_SECRET")
        with pytest.raises(SystemExit):
            main(["check", *options, "--jwt-algorithm", "ES256"])
        assert "set it to the PEM private key whose public key the app verifies ES256" in (
            capsys.readouterr().err
        )

    def test_tenant_options_that_do_not_fit_are_refused(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        wrongs = {
            ("--tenants", "3", "--users", "2"): "--tenants 3 is more than --users 2",
            ("--tenants", "-1"): "must be from 0 to 10000, not -1",
            ("--tenants", "2", "--identity", "bearer"): "an opaque bearer token is the user",
            ("--tenant-header", "x-org"): "--tenant-header is for --tenants with --identity",
            ("--tenants", "2", "--tenant-claim", "org"): "--tenant-claim is for --tenants with",
            ("--tenants", "2", "--tenant-header", ""): "must be a non-empty HTTP token",
            ("--tenants", "2", "--tenant-header", "x org"): "must be a non-empty HTTP token",
            ("--request", "GET /t/{tenant}/notes"): "--request 'GET /t/{tenant}/notes' names "
            "{tenant}: give --tenants N (without tenants it would be empty)",
            ("--websocket", "/t/{tenant}/events"): "--websocket '/t/{tenant}/events' names "
            "{tenant}: give --tenants N",
        }
        for wrong, said in wrongs.items():
            with pytest.raises(SystemExit) as refused:
                main(["check", *wrong])
            assert refused.value.code == 2
            assert said in capsys.readouterr().err

    def test_the_demo_with_tenants_as_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        args = ["--users", "6", "--requests", "2", "--growth-requests", "0", "--tenants", "3"]
        assert main(["check", *args, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["ok"], report["tenants"], report["users"]) == (True, 3, 6)
        assert main(["check", *args]) == 0
        assert "6 users in 3 tenants, no data of another" in capsys.readouterr().out
        assert main(["check", *args[:-1], "1"]) == 0
        assert "6 users in 1 tenant, no data of another" in capsys.readouterr().out
        one = ["--users", "1", "--requests", "1", "--growth-requests", "0"]
        assert main(["check", *one, "--tenants", "1"]) == 0
        said = capsys.readouterr().out
        assert "1 user in 1 tenant, no data of another" in said
        assert "1 request, 1 websocket (" in said

    def test_an_error_text_with_brackets_is_printed_as_it_is(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The table prints the app's own error texts: brackets in them are text, not
        markup (``[/]`` used to crash the printing before the verdict)."""
        code = main(
            [
                *("check", "tests.test_check:bracket_app", "--users", "2", "--requests", "1"),
                *("--growth-requests", "0"),
            ]
        )
        out = capsys.readouterr().out
        assert code == 1
        assert "no route for [/] of [str, int]" in out
        assert "FAILED" in out

    def test_a_factory_may_import_from_the_working_directory_when_called(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``ambient check lazy:create_app`` run in the project's folder: the factory imports
        a sibling module only when called, as uvicorn allows."""
        (tmp_path / "lazy_routes_for_check.py").write_text(
            "from tests.test_check import _noted_registry, notes_app\n"
            "def build():\n    return notes_app(_noted_registry())\n"
        )
        (tmp_path / "lazy_app_for_check.py").write_text(
            "def create_app():\n"
            "    import lazy_routes_for_check\n"
            "    return lazy_routes_for_check.build()\n"
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
        for name in ("lazy_app_for_check", "lazy_routes_for_check"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        code = main(
            [
                *("check", "lazy_app_for_check:create_app", "--users", "2", "--requests", "1"),
                *("--growth-requests", "0", "--json"),
            ]
        )
        assert code == 0, capsys.readouterr().out

    def test_an_async_factory_is_awaited_on_the_checks_loop(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``async def create_app()`` (it awaits its own start-up work): the check awaits it
        and runs the app it returns (it used to take the coroutine for the app)."""
        _app_module(
            tmp_path,
            monkeypatch,
            "async_app_for_check",
            "import asyncio\n"
            "from tests.test_check import _noted_registry, notes_app\n"
            "async def create_app():\n"
            "    await asyncio.sleep(0)\n"
            "    return notes_app(_noted_registry())\n",
        )
        code = main(
            [
                *("check", "async_app_for_check:create_app", "--users", "3", "--requests", "2"),
                *("--growth-requests", "0", "--json"),
            ]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0, report
        assert report["scopes"] == 6

    @pytest.mark.parametrize(
        ("source", "target", "said"),
        [
            ("", "no_such_module_for_check:app", "No module named 'no_such_module_for_check'"),
            ("def f(:\n", "m:app", "SyntaxError"),
            ("raise RuntimeError('no config')\n", "m:app", "RuntimeError: no config (/"),
            ("app = 42\n", "m:app", "m:app is 'int': not an ASGI app"),
            ("class App:\n    pass\n", "m:App", "m:App is a class: not an ASGI app"),
            ("def app(a, b):\n    pass\n", "m:app", "cannot be called with (scope, receive"),
            ("def make():\n    raise ValueError('no key')\n", "m:make", "ValueError: no key"),
            ("def make():\n    return None\n", "m:make", "m:make gave None: not an ASGI"),
            ("async def make():\n    return None\n", "m:make", "m:make gave None"),
            ("async def make():\n    raise ValueError('no key')\n", "m:make", "no key"),
        ],
    )
    def test_an_app_that_cannot_be_loaded_is_said_in_one_line(
        self, source: str, target: str, said: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A module that does not import, a factory that raises or gives nothing, an object
        that is no ASGI app: one line saying so and a non-zero exit, not a traceback nor a
        table of every request failing with ``'int' object is not callable``."""
        module = f"unloadable_for_check_{abs(hash((source, target)))}"
        _app_module(tmp_path, monkeypatch, module, source)
        if target.startswith("m:"):
            target = module + target[1:]
            said = said.replace("m:", f"{module}:")
        with pytest.raises(SystemExit) as refused:
            main(["check", target, "--users", "2", "--requests", "1", "--growth-requests", "0"])
        assert isinstance(refused.value.code, str)
        assert said in refused.value.code

    @pytest.mark.parametrize(
        ("lifespan", "said"),
        [
            (
                "await send({'type': 'lifespan.startup.failed', 'message': 'db down'})",
                "the app's startup failed: db down",
            ),
            ("await anyio.sleep_forever()", "the app's startup did not answer within 0.2 s"),
        ],
    )
    def test_a_startup_that_fails_or_hangs_is_said_in_one_line(
        self, lifespan: str, said: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        module = f"startup_for_check_{abs(hash(lifespan))}"
        _app_module(
            tmp_path,
            monkeypatch,
            module,
            "import anyio\n"
            "async def app(scope, receive, send):\n"
            "    await receive()\n"
            f"    {lifespan}\n",
        )
        with pytest.raises(SystemExit) as refused:
            main(["check", f"{module}:app", "--timeout", "0.2", "--growth-requests", "0"])
        assert refused.value.code == said

    def test_a_startup_failure_is_said_without_the_traceback_starlette_sends(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _app_module(
            tmp_path,
            monkeypatch,
            "starlette_startup_for_check",
            "import contextlib\n"
            "from starlette.applications import Starlette\n"
            "@contextlib.asynccontextmanager\n"
            "async def lifespan(app):\n"
            "    raise ConnectionError('the database refused')\n"
            "    yield\n"
            "app = Starlette(lifespan=lifespan)\n",
        )
        with pytest.raises(SystemExit) as refused:
            main(["check", "starlette_startup_for_check:app", "--growth-requests", "0"])
        assert refused.value.code == (
            "the app's startup failed: ConnectionError: the database refused"
        )

    def test_a_request_that_hangs_fails_the_check_at_the_timeout(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _app_module(
            tmp_path,
            monkeypatch,
            "hanging_app_for_check",
            "import anyio\n"
            "async def app(scope, receive, send):\n"
            "    if scope['type'] == 'http':\n"
            "        await anyio.sleep_forever()\n",
        )
        code = main(
            [
                *("check", "hanging_app_for_check:app", "--users", "2", "--requests", "1"),
                *("--growth-requests", "0", "--timeout", "0.2", "--json"),
            ]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 1
        assert len(report["failed_requests"]) == 2
        assert all("no whole response within 0.2 s" in line for line in report["failed_requests"])

    def test_numbers_out_of_range_are_refused_by_name(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for wrong, said in [
            (["check", "--users", "many"], "--users: must be a whole number, not 'many'"),
            (["check", "--requests", "1e3"], "--requests: must be a whole number, not '1e3'"),
            (["check", "--timeout", "0"], "--timeout: must be more than 0 seconds, not 0"),
            (["check", "--timeout", "nan"], "--timeout: must be more than 0 seconds, not nan"),
            (["check", "--timeout", "soon"], "--timeout: must be a number of seconds"),
            (["demo", "--port", "99999"], "--port: must be from 1 to 65535, not 99999"),
            (["demo", "--port", "-1"], "--port: must be from 1 to 65535, not -1"),
        ]:
            with pytest.raises(SystemExit) as refused:
                main(wrong)
            assert refused.value.code == 2
            assert said in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("wrong", "said"),
        [
            (["--users", "100000000"], "--users: must be from 1 to 10000, not 100000000"),
            (["--users", "10001"], "--users: must be from 1 to 10000, not 10001"),
            (["--requests", "10001"], "--requests: must be from 1 to 10000, not 10001"),
            (["--users", "0"], "--users: must be from 1 to 10000, not 0"),
            (["--users", "-5"], "--users: must be from 1 to 10000, not -5"),
            (["--requests", "0"], "--requests: must be from 1 to 10000, not 0"),
            (["--requests", "-1"], "--requests: must be from 1 to 10000, not -1"),
            (
                ["--users", "200", "--requests", "10000"],
                "--users 200 and --requests 10000 make 2000000 requests; at most 1000000",
            ),
            (
                ["--growth-requests", "1000001"],
                "--growth-requests: must be from 0 to 1000000, not 1000001",
            ),
            (["--growth-requests", "-1"], "--growth-requests: must be from 0 to 1000000, not -1"),
        ],
    )
    def test_users_and_requests_beyond_what_one_process_can_drive_are_refused(
        self, wrong: list[str], said: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--users 100000000`` was accepted and the check ran out of memory making its
        users: each bound is refused by name before the app is loaded (``nocolon`` would
        be refused next, with another message)."""
        with pytest.raises(SystemExit) as refused:
            main(["check", "nocolon", *wrong])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert said in err
        assert err.count("error:") == 1

    def test_the_largest_users_and_requests_are_accepted(self) -> None:
        for allowed in (["--users", "10000", "--requests", "100"], ["--requests", "10000"]):
            with pytest.raises(SystemExit, match="module:attr"):  # parsed; the app is next
                main(["check", "nocolon", *allowed])

    def test_an_interrupted_check_exits_with_a_line_not_a_traceback(self, tmp_path: Any) -> None:
        """Ctrl-C while an app is being checked: one line and exit status 130."""
        (tmp_path / "slow_app_for_check.py").write_text(
            "import sys, anyio\n"
            "async def app(scope, receive, send):\n"
            "    if scope['type'] == 'http':\n"
            "        print('serving', flush=True)\n"
            "        await anyio.sleep_forever()\n"
        )
        out: list[str] = []
        returncode, err = _interrupted_check("slow_app_for_check:app", "serving", tmp_path, out)
        assert returncode == 130
        assert "Traceback" not in err
        assert "interrupted" in err
        # With --json, still JSON on stdout for whoever parses it, as for an app that
        # cannot be loaded.
        assert json.loads(out[0]) == {
            "app": "slow_app_for_check:app",
            "ok": False,
            "error": "interrupted; no report",
        }

    @pytest.mark.parametrize(
        ("source", "attribute"),
        [
            ("print('waiting', flush=True)\nsys.stdin.readline()\n", "app"),
            (
                "def create_app():\n"
                "    print('waiting', flush=True)\n"
                "    sys.stdin.readline()\n"
                "    return app\n",
                "create_app",
            ),
        ],
        ids=["import", "factory"],
    )
    def test_an_interrupt_while_the_app_is_loaded_exits_with_a_line(
        self, source: str, attribute: str, tmp_path: Any
    ) -> None:
        """Ctrl-C while the app's module is still importing, or its factory building it (it
        waits on its input, as one may wait on a database): one line and exit status 130,
        not a traceback."""
        (tmp_path / "blocking_app_for_check.py").write_text(
            f"import sys\nasync def app(scope, receive, send):\n    pass\n{source}"
        )
        returncode, err = _interrupted_check(
            f"blocking_app_for_check:{attribute}", "waiting", tmp_path
        )
        assert returncode == 130, err
        assert err == "ambient check: interrupted; no report\n"

    def test_the_console_script_prints_help(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "ambient", "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0
        assert "check" in result.stdout
        assert "demo" in result.stdout


def bracket_app() -> AmbientMiddleware:
    """An app for the command-line test whose error text holds brackets."""

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        msg = f"no route for [{scope['path']}] of [str, int]"
        raise LookupError(msg)

    return AmbientMiddleware(endpoint, registry=Registry(), identity=trusted_header())


def broken_app() -> AmbientMiddleware:
    """An app for the command-line test: one Notes object for everybody."""
    shared = Notes()
    registry = Registry()
    registry.register(Notes, lambda: shared)
    return notes_app(registry)


class TestPytestKit:
    async def test_fixtures(
        self, ambient_context: UserExecutionContext, make_context: Callable[..., Any]
    ) -> None:
        assert ambient.get_current_context() is ambient_context
        other = make_context("bob", tenant_id="acme")
        assert (other.user_id, other.tenant_id) == ("bob", "acme")

    async def test_the_probe_is_quiet_for_a_correct_registry(
        self, isolation_probe: IsolationProbe, make_context: Callable[..., Any]
    ) -> None:
        registry = Registry()
        registry.register(Notes, Notes)
        for user in ("alice", "bob"):
            async with registry.open_scope(make_context(user)):
                await ambient.resolve(Notes)
        isolation_probe.assert_clean()
        assert isolation_probe.report().created == 2

    def test_the_probe_fixture_fails_a_test_that_shares_an_instance(
        self, pytester: pytest.Pytester
    ) -> None:
        pytester.makepyfile(
            """
            import anyio
            import ambient
            from ambient import Registry

            SHARED = object()

            def test_shared(isolation_probe, make_context):
                registry = Registry()
                registry.register("tool", lambda: SHARED)

                async def main():
                    for user in ("alice", "bob"):
                        async with registry.open_scope(make_context(user)):
                            await ambient.resolve("tool")

                anyio.run(main)
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider")
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*one instance was handed to users alice, bob*"])

    @pytest.mark.parametrize("fails", [False, True], ids=["passing", "failing"])
    def test_the_fixtures_leave_nothing_behind_for_the_next_test(
        self, pytester: pytest.Pytester, fails: bool
    ) -> None:
        """After a test using ambient_context and isolation_probe, sync or async, passing
        or failing in the middle of its work, the next test runs with no context bound and
        no probe installed: neither leaks into other tests."""
        pytester.makepyfile(
            f"""
            import anyio
            import pytest
            import ambient
            import ambient._observe as observe
            from ambient.testing import IsolationProbe

            FAILS = {fails}

            def test_first(ambient_context, isolation_probe):
                assert ambient.current_context_or_none() is ambient_context
                assert isolation_probe in observe.observers
                assert not FAILS, "the test body failed"

            @pytest.fixture
            def anyio_backend():
                return "asyncio"

            @pytest.mark.anyio
            async def test_async(ambient_context, isolation_probe):
                registry = ambient.Registry()
                registry.register("tool", object)
                async with registry.open_scope(ambient_context):
                    await ambient.resolve("tool")
                    assert not FAILS, "the test body failed"
                await registry.aclose()

            def test_second():
                assert ambient.current_context_or_none() is None
                assert not any(isinstance(o, IsolationProbe) for o in observe.observers)
            """
        )
        result = pytester.runpytest("-p", "no:cacheprovider")
        if fails:
            result.assert_outcomes(passed=1, failed=2)
            result.stdout.no_fnmatch_line("*isolation probe found problems*")
        else:
            result.assert_outcomes(passed=3)


async def test_the_demo_streams_each_run_to_its_own_users_sockets() -> None:
    """On real uvicorn: runs announced on the websocket of their user, never another's."""
    import threading

    import httpx
    from websockets.sync.client import connect

    from tests.servers import serve

    users = [f"ws-user-{n}" for n in range(6)]
    ready = threading.Barrier(len(users) + 1, timeout=30)
    received: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, set[str]] = {user: set() for user in users}

    def listen(url: str, user: str) -> None:
        with connect(url, additional_headers={"x-user-id": user}, open_timeout=20) as sock:
            frames = [json.loads(sock.recv(timeout=20))]  # "ready": registered
            ready.wait()
            sock.send("remember from the socket")
            while len([f for f in frames if f["type"] == "run.done"]) < 3:
                frames.append(json.loads(sock.recv(timeout=20)))
            received[user] = frames

    with serve("uvicorn", create_app()) as base:
        ws_url = base.replace("http://", "ws://") + "/events"
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(anyio.to_thread.run_sync, listen, ws_url, user)
            await anyio.to_thread.run_sync(ready.wait)
            async with httpx.AsyncClient(base_url=base) as http:
                for user in users:
                    for prompt in ("calc 1 + 1", f"remember {user}"):
                        response = await http.post(
                            "/agents/research/runs",
                            json={"prompt": prompt},
                            headers={"x-user-id": user},
                        )
                        assert response.status_code == 200
                        runs[user].add(response.json()["run_id"])
    for user, frames in received.items():
        assert frames[0] == {"type": "ready", "user": user, "thread_id": frames[0]["thread_id"]}
        answers = sorted((f["agent"], f["answer"]) for f in frames if f["type"] == "run.done")
        # A prompt sent on the socket is the triage agent's.
        assert answers == sorted(
            [
                ("research", "2"),
                ("research", f"noted: {user}"),
                ("triage", "noted: from the socket"),
            ]
        )
        # Each run is announced with the run id its answer carries: the agent's own.
        done = {f["run_id"] for f in frames if f["type"] == "run.done" and f["agent"] == "research"}
        assert done == runs[user]
        others = [u for u in users if u != user]
        assert not any(other in json.dumps(frames) for other in others)
    assert sorted(received) == sorted(users)


async def test_the_demo_on_postgresql_passes_the_check(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History in PostgreSQL through the shared pool: isolated, cleaned, nothing kept alive
    (the pool's worker tasks used to keep the first request's scope alive); with tenants
    too, where a query that forgot the tenant is caught."""
    from tests.conftest import DATABASE_URL

    if _demo_database(anyio_backend) is None:
        return
    report = await check(create_app(database_url=DATABASE_URL), plan=CHECK_PLAN, users=20)
    assert report.ok, report.violations
    assert report.components_created == report.components_cleaned
    options: dict[str, Any] = {"plan": CHECK_PLAN, "users": 12, "requests": 4, "tenants": 4}
    tenanted = await check(create_app(database_url=DATABASE_URL), **options)
    assert tenanted.ok, tenanted.violations
    import ambient.demo.app as demo

    forgot = demo._RECENT.replace("tenant = current_setting('app.tenant_id')", "TRUE")
    assert forgot != demo._RECENT
    monkeypatch.setattr(demo, "_RECENT", forgot)
    leaky = await check(create_app(database_url=DATABASE_URL), **options)
    assert any(
        line.startswith("GET /history: the response for") and "contains tenant check-" in line
        for line in leaky.isolation
    ), leaky.isolation


async def test_the_migration_guide_example_fails_before_and_passes_after() -> None:
    """What docs/migration.md shows: the legacy app leaks across users, the migrated one
    does not."""
    from tests.migration_example import legacy, migrated

    plan = [
        parse_request('POST /agents/triage/run {"prompt": "hello from {user}"}'),
        parse_request("GET /agents"),
    ]
    before = await check(legacy.create_app(), plan=plan, users=20, requests=4)
    after = await check(migrated.create_app(), plan=plan, users=20, requests=4)
    assert any("contains" in line for line in before.isolation)
    assert before.global_state_accesses["total"] > 0
    assert after.ok, after.violations
    assert after.global_state_accesses == {}


async def test_global_state_accesses_are_the_simulated_requests_own() -> None:
    """The memory measurement after the run sends requests of its own: their accesses to
    guarded globals are not added to those the report gives for its requests (6 requests
    touching a global once each were reported as 26 accesses)."""
    from ambient.migration import guard_global

    cache = guard_global({}, name="cache", mode="off")

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"cached": cache.get(ambient.get_current_context().user_id)})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
    )
    report = await check(app, users=3, requests=2, growth_requests=10)
    assert report.global_state_accesses["total"] == 6


def test_ambient_demo_on_a_port_in_use_says_so_in_one_line_without_the_banner() -> None:
    """Another server listens on the port: the demo says so and exits non-zero before it
    prints the URLs to try (it printed them, then uvicorn's lines ending in a bind error)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "ambient", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr == (
        f"ambient demo: cannot listen on 127.0.0.1:{port}: the address is in use "
        "(another server? choose another --port)\n"
    )


@pytest.mark.parametrize(
    "host",
    ["\u00e9" * 70, "\u00e9..example", "local\x00host"],
    ids=["label-too-long", "empty-label", "nul"],
)
def test_ambient_demo_on_a_host_name_it_cannot_encode_says_so_in_one_line(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --host the socket cannot encode (a label over 63 characters once made ASCII, an
    empty label, a NUL) ended the demo with a TypeError's traceback; it is said in one
    line now, before the banner, as a host that does not resolve is."""
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--host", host, "--port", "8000"])
    said = str(exited.value)
    assert said.startswith(f"ambient demo: cannot listen on {host}:8000: not a host name: ")
    assert "\n" not in said
    assert capsys.readouterr().out == ""


def test_an_interrupt_while_the_demo_builds_its_app_exits_with_a_line(tmp_path: Any) -> None:
    """Ctrl-C before the demo serves (its imports, its app being built): one line and exit
    status 130, not a traceback. The app's build is made to wait on its input here."""
    from tests.servers import free_port

    (tmp_path / "slow_demo_build.py").write_text(
        "import sys\n"
        "import ambient.demo.app\n"
        "from ambient.cli import main\n"
        "built = ambient.demo.app.create_app\n"
        "def create_app():\n"
        "    print('building', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    return built()\n"
        "ambient.demo.app.create_app = create_app\n"
        "sys.exit(main(['demo', '--port', sys.argv[1]]))\n"
    )
    returncode, err = _interrupted(
        ["slow_demo_build.py", str(free_port())], "building", tmp_path
    )  # the banner comes before the app is built
    assert returncode == 130, err
    assert err == "ambient demo: interrupted\n"


def test_ambient_demo_serves_the_backend_on_uvicorn() -> None:
    """`ambient demo --port N` in its own process: it prints how to try it, and answers."""
    import httpx

    from tests.servers import _wait_listening, free_port

    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "ambient", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_listening(port, lambda: process.poll() is None)
        response = httpx.post(
            f"http://127.0.0.1:{port}/agents/research/runs",
            json={"prompt": "calc 20 + 22"},
            headers={"x-user-id": "demo-user"},
            timeout=10,
        )
        assert response.json()["answer"] == "42"
        assert response.json()["user"] == "demo-user"
        refused = httpx.get(f"http://127.0.0.1:{port}/whoami", timeout=10)
        assert refused.status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "curl" in output
    assert "x-user-id: alice" in output


async def test_a_record_logged_for_a_user_the_check_does_not_simulate_is_no_finding() -> None:
    """A record the app logs under a context of its own (a service account auditing the
    request) names the user it works for: made for no simulated user, it shows no user
    another's data."""
    log = logging.getLogger("tests.audit")

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        service = UserExecutionContext.create("audit-service")
        with ambient.bind_context(service, allow_switch=True):
            log.warning("audited the request of %s", user)
        return JSONResponse({"user": user})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
    )
    report = await check(app, users=4, requests=2)
    assert report.ok, report.violations


async def test_a_record_logged_for_a_user_the_app_serves_under_its_own_id_is_looked_at() -> None:
    """An app that serves each user under an id of its own (an account looked up by the id
    presented) and logs, in one user's request, the user served before: the record is
    made for the simulated user that request was sent for, and names another. It used to
    be passed over as made for no simulated user. A record naming the request's own user
    is still no finding."""
    log = logging.getLogger("tests.accounts")
    served: list[str] = []

    def account(scope: Any) -> Identity | None:
        for name, value in scope["headers"]:
            if name == b"x-user-id":
                return Identity(f"account:{value.decode()}")
        return None

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        log.warning("served %s after %s", user, served[-1] if served else "nobody")
        served.append(user)
        return JSONResponse({"ok": True})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=account
    )
    report = await check(app, users=4, requests=2, concurrency=1)
    user = r"check-\d{5}-[0-9a-f]{6}"
    said = (
        rf"log record from tests.accounts emitted for ({user}) names ({user}): "
        rf"'served account:{user} after account:{user}'"
    )
    assert len(report.isolation) == 3, report.isolation  # each user after the first
    matched = [re.fullmatch(said, line) for line in report.isolation]
    assert all(found is not None and found[1] != found[2] for found in matched), report
    alone = await check(app, users=1, requests=3)
    assert alone.ok, alone.violations


def test_the_json_report_says_ok_and_keeps_its_keys_in_order() -> None:
    """``to_json()`` holds every field and ``ok``, its keys sorted (a CI job diffing two
    runs' reports sees what changed, not a reordering)."""
    report = CheckReport(app="app", users=2, requests=4, leaks=["a leak"])
    said = report.to_json()
    data = json.loads(said)
    assert list(data) == sorted(data)
    assert data["ok"] is False
    assert data["leaks"] == ["a leak"]
    assert said == json.dumps(data, indent=2, sort_keys=True)


def test_findings_past_those_shown_are_said_as_a_count() -> None:
    shown = [f"finding {n}" for n in range(20)]
    assert _cut(shown) == shown  # all of them shown: nothing more to count
    assert _cut([*shown, "one more", "and another"]) == [*shown, "... and 2 more"]


def test_latency_percentiles_are_the_nearest_ranks_in_milliseconds() -> None:
    """The report's latencies (seconds measured, milliseconds said): each percentile the
    sample at its nearest rank, whatever order the requests finished in."""
    hundred_and_one = [n / 1000 for n in range(101)]
    random.Random(7).shuffle(hundred_and_one)
    assert _percentiles(hundred_and_one) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    # Between two ranks, the nearer one (rank 9.5 rounds to 10, 9.9 to 10).
    eleven = [n / 1000 for n in range(11)]
    assert _percentiles(eleven) == {"p50": 5.0, "p95": 10.0, "p99": 10.0, "max": 10.0}
    assert _percentiles([0.0012345]) == dict.fromkeys(("p50", "p95", "p99", "max"), 1.234)
    assert _percentiles([]) == {}


def test_every_simulated_user_named_in_a_text_is_found_among_ten_thousand() -> None:
    """A response naming other simulated users is caught whichever they are, among the
    most users a check drives, without searching the text once per user: each id the
    check makes up has the shape its search looks for."""
    from ambient import UserRef
    from ambient.check import _MAX_USERS, _mentions, _simulated_ids

    ids = _simulated_ids(_MAX_USERS)
    assert len(set(ids)) == _MAX_USERS
    users = set(ids)
    own, first, last = UserRef(ids[17]), ids[0], ids[-1]
    text = f'{{"owner": "{own.user_id}", "seen": ["{first}", "{last}", "{first}"], "x": "check-"}}'
    assert sorted(_mentions(text, users, own)) == sorted([first, last])
    assert _mentions(f"only {own.user_id} here", users, own) == []
    # An id of another check run (not one of these users) is not a mention.
    stranger = _simulated_ids(1)[0]
    assert stranger not in users
    assert _mentions(f"{stranger} and {last}", users, own) == [last]
    # Every id is found in any text that holds it.
    assert all(_mentions(f"<{user}>", users, own) == [user] for user in ids if user != own.user_id)


def test_another_id_beside_a_users_own_named_again_and_again_is_found() -> None:
    """A text naming its own user and tenant alone, however often, names nobody else
    (told by counting, as most answers are); one more id, or a "check-" that is no id of
    theirs, sends it to the search, which finds the other user's id and nothing else."""
    from ambient.check import _ids_of, _mentions, _simulated_users

    users = _simulated_users(6, 2)
    known = _ids_of(users)
    own, other = users[0], users[3]
    assert own.tenant_id is not None
    assert other.tenant_id is not None
    assert other.tenant_id != own.tenant_id
    said = f"{own.user_id} {own.tenant_id} " * 5
    assert _mentions(said, known, own) == []
    assert _mentions(f"{said} ambient-check-1", known, own) == []
    assert _mentions(f"{said}{other.user_id}", known, own) == [other.user_id]
    assert _mentions(f"{said}{other.tenant_id}", known, own) == [other.tenant_id]
    assert _mentions(f"{own.user_id}{other.user_id}{own.user_id}", known, own) == [other.user_id]


def test_response_headers_are_text_only_when_one_may_hold_an_id() -> None:
    """Most answers' headers hold no simulated id and are not made into text; those that
    may are, whether the app sent bytes or (as the check takes them too) text."""
    from ambient.check import _header_text

    plain = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    assert _header_text(plain) == ""
    assert _header_text([]) == ""
    marked = [*plain, (b"x-last", b"check-00001-abcdef")]
    assert _header_text(marked) == (
        "content-type: application/json\ncontent-length: 2\nx-last: check-00001-abcdef"
    )
    as_text: Any = [("x-last", "check-00001-abcdef")]
    assert _header_text(as_text) == "x-last: check-00001-abcdef"
    assert _header_text([(b"check-name", b"v")]) == "check-name: v"


def test_simulated_tenants_share_user_ids_and_their_ids_are_found_in_a_text() -> None:
    """With tenants, each user id is used in several tenants (an id is unique only in its
    tenant), every (user, tenant) pair is one simulated user, and another tenant's id in a
    text is found as its user's are, but not the user's own tenant's."""
    from ambient.check import _ids_of, _mentions, _simulated_users

    users = _simulated_users(10, 4)
    assert len(set(users)) == 10
    assert len({user.user_id for user in users}) == 3  # 4 + 4 + 2
    assert len({user.tenant_id for user in users}) == 4
    assert {user.tenant_id for user in users if user.user_id == users[0].user_id} == {
        user.tenant_id for user in users[:4]
    }
    known = _ids_of(users)
    own, neighbour = users[0], users[1]  # one user id, two tenants
    assert own.user_id == neighbour.user_id
    assert neighbour.tenant_id is not None
    said = f"{own.user_id} of {own.tenant_id} sees {neighbour.tenant_id}"
    assert _mentions(said, known, own) == [neighbour.tenant_id]
    assert _mentions(said, known, neighbour) == [own.tenant_id]


def _interrupted_check(
    target: str, ready: str, cwd: Any, out: list[str] | None = None
) -> tuple[int, str]:
    """Run ``ambient check target --json`` in ``cwd``, interrupted once the app prints
    ``ready`` (which ``--json`` sends to stderr; see :func:`_interrupted`); what it wrote
    to stdout goes into ``out`` when given."""
    return _interrupted(
        ["-m", "ambient", "check", target, "--json"], ready, cwd, printed_to="stderr", out=out
    )


def _interrupted(
    args: list[str],
    ready: str,
    cwd: Any,
    *,
    printed_to: str = "stdout",
    out: list[str] | None = None,
) -> tuple[int, str]:
    """Run our interpreter with ``args`` in ``cwd``, send it SIGINT once it prints the line
    ``ready`` to ``printed_to`` (lines before it are passed over), and return its exit
    status and what it wrote to stderr (after ``ready`` when that went there too); what it
    wrote to stdout goes into ``out`` when given (with ``ready`` on stderr). Its stdin stays
    open: a program waiting on it is ended by the interrupt alone."""
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, *args],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, process.kill)  # bounds the blocking reads below
    watchdog.start()
    try:
        watched = process.stdout if printed_to == "stdout" else process.stderr
        assert watched is not None
        line = watched.readline()
        while line and line != f"{ready}\n":
            line = watched.readline()
        assert line == f"{ready}\n"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)  # not communicate(): it would close stdin
        assert process.stderr is not None
        err = process.stderr.read()
        if out is not None and process.stdout is not None:
            out.append(process.stdout.read())
    finally:
        watchdog.cancel()
        process.kill()
        process.wait(timeout=30)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    return process.returncode, err


async def test_a_log_record_factory_the_app_installs_on_top_stays_installed() -> None:
    """An app that installs a log record factory of its own while it is checked, on top of
    the one the check looks at records with, keeps it: the check does not put back the
    factory from before it, which would drop the app's."""
    before = logging.getLogRecordFactory()
    installed: list[Callable[..., logging.LogRecord]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            below = logging.getLogRecordFactory()

            def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
                return below(*args, **kwargs)

            installed.append(tagged)
            logging.setLogRecordFactory(tagged)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await notes_app(_noted_registry())(scope, receive, send)

    try:
        report = await check(app, users=2, requests=1)
        assert report.ok, report.violations
        assert logging.getLogRecordFactory() is installed[0]
    finally:
        logging.setLogRecordFactory(before)


async def test_the_root_loggers_level_is_given_back() -> None:
    """The check lowers the root logger's level to INFO while it watches the app's log
    records; it sets the host's level back after, with or without a memory measurement."""
    registry = Registry()
    registry.register(Notes, Notes)
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        for growth in (0, 20):
            report = await check(notes_app(registry), users=2, requests=1, growth_requests=growth)
            assert report.ok, report.violations
            assert root.level == logging.ERROR, growth
    finally:
        root.setLevel(before)
    await registry.aclose()


async def test_a_host_tracing_memory_still_traces_after_the_check() -> None:
    """The memory measurement starts tracemalloc when it is off and stops it after; a host
    that traces allocations itself (a profiler, a test checking its peak) is left tracing:
    the check stopped it, and the host's own measurement failed after it."""
    registry = Registry()
    registry.register(Notes, Notes)
    report = await check(notes_app(registry), users=2, requests=1, growth_requests=20)
    assert report.memory_growth_kib_per_1k is not None
    assert not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        report = await check(notes_app(registry), users=2, requests=1, growth_requests=20)
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()
    assert report.memory_growth_kib_per_1k is not None
    await registry.aclose()


async def test_the_time_limit_of_each_request_is_not_the_apps_memory_growth() -> None:
    """A correct app whose requests never wait for anything, checked with a time limit per
    request (the command line's ``--timeout``): each request's limit left a cancelled
    timer in asyncio's event loop, which frees them only when it runs, after the
    requests; the memory-growth phase counted them as the app's and reported a leak
    (about 200 KiB per 1,000 requests)."""

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"user": ambient.get_current_context().user_id})

    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=Registry(), identity=trusted_header()
    )
    report = await check(app, users=10, requests=1, growth_requests=1000, time_limit=30.0)
    assert report.leaks == [], report.memory_growth_kib_per_1k
    assert report.memory_growth_kib_per_1k < 64


def test_log_findings_past_those_shown_are_only_counted() -> None:
    """An app that logs another user's id on every request makes as many findings as
    requests (up to 1,000,000): past those shown, the check counts them, as it does its
    frames' findings, rather than keep them all."""
    from ambient.check import _MAX_SHOWN, _LogWatch, _simulated_ids

    own, other = _simulated_ids(2)
    watch = _LogWatch({own, other})
    log = logging.getLogger("tests.check.many")
    watch.start()
    try:
        with ambient.bind_context(UserExecutionContext.create(own)):
            for _ in range(500):
                log.warning("served after %s", other)
    finally:
        watch.stop()
    said = watch.findings.cut()
    assert len(said) == _MAX_SHOWN + 1
    assert said[-1] == f"... and {500 - _MAX_SHOWN} more"
    assert all(f"names {other}" in line for line in said[:-1])


@pytest.mark.parametrize("holds", ["its Context", "its component"])
async def test_a_worker_thread_letting_go_of_a_request_late_is_no_leak(
    monkeypatch: pytest.MonkeyPatch, holds: str
) -> None:
    """A worker thread hands a request its result before it lets go of that request's
    Context (anyio's does), and the run may end in between: the scope it still holds for
    that moment is not the app's leak. Here a thread holds the last request's Context, or
    only its REQUEST component, until the check first looks, then lets go; the check
    looked again for a scope only, and reported the component as outliving its scope. A
    scope kept for good is still reported (the module-global test above)."""
    import ambient._probe as probe_module

    looked = threading.Event()
    let_go = threading.Event()
    report = probe_module.IsolationProbe.report

    def first_look(self: Any) -> Any:
        said = report(self)
        looked.set()
        return said

    monkeypatch.setattr(probe_module.IsolationProbe, "report", first_look)
    held: list[object] = []

    def hold_until_looked() -> None:
        looked.wait(30)
        held.clear()
        let_go.set()

    async def endpoint(request: Request) -> Response:
        user = ambient.get_current_context().user_id
        notes = await ambient.resolve(Notes)
        if not held:
            held.append(contextvars.copy_context() if holds == "its Context" else notes)
            threading.Thread(target=hold_until_looked).start()
        return JSONResponse({"user": user})

    registry = Registry()
    registry.register(Notes, Notes)
    app = AmbientMiddleware(
        Starlette(routes=[Route("/", endpoint)]), registry=registry, identity=trusted_header()
    )
    result = await check(app, users=1, requests=1)
    assert let_go.wait(30)
    assert result.leaks == [], result.leaks


@pytest.mark.parametrize("swapped", ["user", "tenant"])
async def test_users_served_as_each_other_are_caught_though_no_answer_names_them(
    swapped: str,
) -> None:
    """An app whose identity serves the simulated users swapped in pairs (alice as bob and
    bob as alice, each consistently, over requests and sockets) with answers naming no id:
    no user is served as two users, nor two as one, and no answer shows another's data,
    yet each request and socket is another user's. Each is said as served as another
    simulated user (or in another simulated tenant). It used to pass."""
    users = 4
    seen: dict[tuple[str, str | None], None] = {}
    all_seen = anyio.Event()

    def presented(scope: Any) -> tuple[str, str | None]:
        headers = dict(scope["headers"])
        tenant = headers.get(b"x-tenant-id")
        return headers[b"x-user-id"].decode(), None if tenant is None else tenant.decode()

    async def swap(scope: Any) -> Identity:
        # Paired once every simulated user has been seen, so that each is served as the
        # same other user from its first request on.
        seen.setdefault(presented(scope), None)
        if len(seen) == users:
            all_seen.set()
        await all_seen.wait()
        order = sorted(seen)
        index = order.index(presented(scope))
        user_id, tenant = order[index ^ 1]
        if swapped == "tenant":
            user_id = presented(scope)[0]
            assert tenant != presented(scope)[1]
        return Identity(user_id, tenant)

    async def ok(request: Request) -> Response:
        ambient.get_current_context()
        return JSONResponse({"ok": True})

    async def events(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()

    inner = Starlette(routes=[Route("/", ok), WebSocketRoute("/events", events)])
    app = AmbientMiddleware(inner, registry=Registry(), identity=swap)
    # With tenants, each user id is used in both tenants: sorted, the pairs are one id's
    # two tenants, swapped.
    tenants = {"tenants": 2} if swapped == "tenant" else {}
    report = await check(app, websocket="/events", users=users, requests=2, **tenants)
    assert not report.ok
    assert report.failed_requests == []
    said = "another simulated user" if swapped == "user" else "in another simulated tenant"
    requests = [line for line in report.isolation if line.startswith("GET /")]
    sockets = [line for line in report.isolation if line.startswith("WS /events")]
    assert len(requests) == users * 2, report.isolation
    assert len(sockets) == users, report.isolation
    assert all(said in line for line in requests + sockets), report.isolation


@pytest.mark.parametrize("said_in", ["close reason", "denial response"])
async def test_another_users_id_in_a_sockets_close_reason_or_denial_is_caught(
    said_in: str,
) -> None:
    """An app that closes each socket, or refuses its handshake with an HTTP response,
    saying why with the user whose socket it served before: another user's id reaches
    this one in the close frame's reason or the denial's body, not in any frame. Each is
    an isolation finding (it passed, but for the socket's failure)."""
    before: list[str] = []

    async def sockets(scope: Any, receive: Any, send: Any) -> None:
        user = ambient.get_current_context().user_id
        await receive()  # websocket.connect
        said = f"replaced by {before[-1]}" if before else "first"
        before.append(user)
        if said_in == "close reason":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 4000, "reason": said})
            return
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": said.encode()})

    inner = Starlette(routes=[Route("/", _whoami)])

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        await (sockets if scope["type"] == "websocket" else inner)(scope, receive, send)

    app = AmbientMiddleware(routed, registry=Registry(), identity=trusted_header())
    report = await check(app, websocket="/events", users=4, requests=1, concurrency=1)
    assert not report.ok
    user = r"check-\d{5}-[0-9a-f]{6}"
    line = rf"WS /events: the {said_in} sent to ({user}) contains ({user})'s data"
    matched = [re.fullmatch(line, found) for found in report.isolation]
    assert len(matched) == 3, report.isolation
    assert all(found is not None and found[1] != found[2] for found in matched), report
    alone = await check(app, websocket="/events", users=1)
    assert alone.isolation == [], alone.isolation


async def test_a_frame_sent_before_the_socket_is_accepted_fails_the_socket() -> None:
    """An app that sends a frame before accepting its socket: refused as servers refuse
    it, so the socket fails with the app's error (the frame reached no client)."""

    async def sockets(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.send", "text": "early"})
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    inner = Starlette(routes=[Route("/", _whoami)])

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        await (sockets if scope["type"] == "websocket" else inner)(scope, receive, send)

    app = AmbientMiddleware(routed, registry=Registry(), identity=trusted_header())
    report = await check(app, websocket="/events", users=2, requests=1)
    assert not report.ok
    assert report.websocket_frames == 0
    failed = [line for line in report.failed_requests if line.startswith("WS /events")]
    assert len(failed) == 2, report.failed_requests
    assert all("before the socket was accepted" in line for line in failed), failed


class _UnreadableError(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message")


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (RuntimeError(), "RuntimeError"),
        (_UnreadableError(), "_UnreadableError (its message could not be read)"),
    ],
    ids=["empty", "unreadable"],
)
async def test_an_app_error_with_no_message_is_said_by_its_class(
    error: Exception, said: str
) -> None:
    """An app whose requests and sockets raise an error with an empty message, or one whose
    ``str()`` raises: each failure is said by the error's class (not ``RuntimeError: ``),
    and the check reports instead of ending in the error of its message."""

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        ambient.get_current_context()
        if scope["type"] == "websocket":
            await receive()
        raise error

    app = AmbientMiddleware(failing, registry=Registry(), identity=trusted_header())
    report = await check(app, websocket="/events", users=2, requests=1)
    assert not report.ok
    requests = [line for line in report.failed_requests if line.startswith("GET /")]
    sockets = [line for line in report.failed_requests if line.startswith("WS /events")]
    assert len(requests) == 2, report.failed_requests
    assert all(line.endswith(f": HTTP 500 {said!r}") for line in requests), requests
    assert len(sockets) == 2, report.failed_requests
    assert all(line.endswith(f": the app raised {said}") for line in sockets), sockets
