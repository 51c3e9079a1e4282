"""Steps 2 and 4 of the migration: the three singletons as per-user components.

The agent registry holds each user's conversations, so it lives per user (``USER``,
cleaned up when the user has been idle); so does the bridge, whose pending events must
outlast a request until the user's websocket takes them. The engine is per request and
receives the request's context instead of having it put on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import ambient
from ambient import Lifetime, Registry, UserExecutionContext
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from tests.migration_example.components import AgentRegistry, ExecutionEngine, WebSocketBridge


def build_registry() -> Registry:
    """The recipes for the three components."""
    registry = Registry()
    registry.register(AgentRegistry, AgentRegistry, lifetime=Lifetime.USER)
    registry.register(WebSocketBridge, WebSocketBridge, lifetime=Lifetime.USER)

    @registry.provide
    async def execution_engine(ctx: UserExecutionContext) -> AsyncIterator[ExecutionEngine]:
        engine = ExecutionEngine(
            await ambient.resolve(AgentRegistry), await ambient.resolve(WebSocketBridge), ctx
        )
        yield engine
        engine.user_context = None  # nothing can use it for this user after the request

    return registry


async def run_agent(agent: str, prompt: str) -> dict[str, Any]:
    engine = await ambient.resolve(ExecutionEngine)
    return await engine.run(agent, prompt)


async def list_agents() -> list[str]:
    return sorted(await ambient.resolve(AgentRegistry))


async def pending_events() -> list[dict[str, Any]]:
    bridge = await ambient.resolve(WebSocketBridge)
    return bridge.drain(ambient.get_current_context().user_id)


def create_app(registry: Registry | None = None) -> AmbientMiddleware:
    """The migrated application; its components come from ``registry`` (default:
    :func:`build_registry`)."""
    return build_app(run_agent, list_agents, pending_events, registry)


def build_app(
    run_agent: Callable[[str, str], Awaitable[dict[str, Any]]],
    list_agents: Callable[[], Awaitable[list[str]]],
    pending_events: Callable[[], Awaitable[list[dict[str, Any]]]],
    registry: Registry | None = None,
) -> AmbientMiddleware:
    """The example's routes over these three handlers (:mod:`.rollout` passes its own),
    behind the middleware; the components come from ``registry`` (default:
    :func:`build_registry`)."""

    async def run_endpoint(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await run_agent(request.path_params["agent"], body["prompt"]))

    async def agents_endpoint(request: Request) -> JSONResponse:
        return JSONResponse(await list_agents())

    async def events_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(await pending_events())
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/agents", agents_endpoint),
            Route("/agents/{agent}/run", run_endpoint, methods=["POST"]),
            WebSocketRoute("/events", events_endpoint),
        ]
    )
    if registry is None:
        registry = build_registry()
    return AmbientMiddleware(app, registry=registry, identity=trusted_header("x-user-id"))
