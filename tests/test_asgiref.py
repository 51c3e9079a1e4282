"""asgiref's thread hops (Django's sync middleware and views) on a real uvicorn server.

Django runs a sync middleware's ``process_request`` and ``process_response`` in two
separate ``sync_to_async`` calls (thread-sensitive: one shared thread), each in its own copy
of the context, whose changes asgiref copies back. A binding entered in the first hop and
exited in the second is exited from another Context than the one that made its token: the
exit must still restore the request's own context, never raise, and never show another
user's. Nested hops (``async_to_sync`` in a worker thread, a task started there, and
``sync_to_async`` inside it) must carry the user through and finish without deadlock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async

import ambient
from ambient import Registry, bind_context
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.servers import serve

USERS = 50


def _who() -> str:
    return ambient.get_current_context().user_id


def _nested() -> str:
    """In a worker thread: back to the loop, a task there, and a hop out of it again."""

    async def on_the_loop() -> str:
        task = asyncio.get_running_loop().create_task(sync_to_async(_who)())
        return await task

    return async_to_sync(on_the_loop)()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A sync middleware's request hook binds a child context (acting for a sub-operation)
    in one hop; the view reads it in another, then through nested hops; the response hook
    exits the binding in a third hop."""
    request_ctx = ambient.get_current_context()
    binder = bind_context(request_ctx.child("acting"))
    acting = await sync_to_async(binder.__enter__)()
    await anyio.lowlevel.checkpoint()  # let the other requests interleave here
    in_view = await sync_to_async(ambient.get_current_context)()
    nested = await sync_to_async(_nested)()
    await sync_to_async(binder.__exit__)(None, None, None)
    after = ambient.current_context_or_none()
    body = {
        "user": request_ctx.user_id,
        "acting_is_child": acting.parent_run_id == request_ctx.run_id,
        "view_user": in_view.user_id,
        "view_is_acting": in_view.run_id == acting.run_id,
        "nested_user": nested,
        "after_is_request": after is request_ctx,
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def test_bindings_across_sync_to_async_hops_stay_per_user(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50 users at once: every hop sees its own user, the binding made in one hop and
    exited in another leaves the request's own context current, no error is logged, and
    every request finishes within 5 s (no deadlock among the nested hops)."""
    registry = Registry()
    stack = AmbientMiddleware(app, registry=registry, identity=trusted_header())
    answers: dict[str, dict[str, Any]] = {}

    async def one(client: httpx.AsyncClient, user: str) -> None:
        response = await client.get("/", headers={"x-user-id": user})
        assert response.status_code == 200, response.text
        answers[user] = response.json()

    users = [f"user-{n}" for n in range(USERS)]
    with caplog.at_level(logging.WARNING), serve("uvicorn", stack) as url:
        limits = httpx.Limits(max_connections=USERS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5) as client:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    for user in users:
                        tg.start_soon(one, client, user)
    assert answers == {
        user: {
            "user": user,
            "acting_is_child": True,
            "view_user": user,
            "view_is_acting": True,
            "nested_user": user,
            "after_is_request": True,
        }
        for user in users
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def _answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_caller_s_binding_survives_an_app_called_through_async_to_sync() -> None:
    """A sync caller bound to a user (a job, a sync test harness) that calls an app behind
    the middleware through ``async_to_sync`` keeps its binding afterwards: the app runs in a
    copy of the caller's context whose changes asgiref copies back, and the middleware
    cleared the caller's binding there as if a server had copied another request's in, so
    the rest of the caller's block ran with nothing bound."""
    stack = AmbientMiddleware(_answer, registry=Registry(), identity=trusted_header())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-user-id", b"bob")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    alice = ambient.UserExecutionContext.create("alice")
    with bind_context(alice):
        async_to_sync(stack)(scope, receive, send)
        after = ambient.current_context_or_none()
    assert sent[0]["status"] == 200
    assert after is alice
    assert ambient.current_context_or_none() is None
