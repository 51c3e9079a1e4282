"""Step 1 of the migration: the legacy backend, its three singletons guarded.

Everything below ``# -- the legacy code`` is how the backend was written: one agent
registry, one websocket bridge and one execution engine for the whole process, the
request's user put on the shared engine. The guards are the only change (and
``AmbientMiddleware`` in :func:`create_app`, which binds each request's context): they
record every use of a singleton made during a request.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ambient import Registry, get_current_context
from ambient.middleware import AmbientMiddleware
from ambient.middleware.identity import trusted_header
from ambient.migration import guard_global
from tests.migration_example.components import AgentRegistry, ExecutionEngine, WebSocketBridge

agent_registry = guard_global(
    AgentRegistry(),
    name="agent_registry",
    replacement="await ambient.resolve(AgentRegistry)",
)
bridge = guard_global(
    WebSocketBridge(),
    name="bridge",
    replacement="await ambient.resolve(WebSocketBridge)",
)
engine = guard_global(
    ExecutionEngine(agent_registry, bridge, None),
    name="engine",
    replacement="await ambient.resolve(ExecutionEngine)",
)

# -- the legacy code -------------------------------------------------------------------------


async def run_agent(agent: str, prompt: str) -> dict[str, Any]:
    engine.user_context = get_current_context()
    return await engine.run(agent, prompt)


async def list_agents() -> list[str]:
    return sorted(agent_registry)


async def pending_events() -> list[dict[str, Any]]:
    return bridge.drain(get_current_context().user_id)


async def run_endpoint(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse(await run_agent(request.path_params["agent"], body["prompt"]))


async def agents_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(await list_agents())


async def events_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(await pending_events())
    await websocket.close()


def create_app() -> AmbientMiddleware:
    """The legacy application, behind the middleware that binds each request's context
    (the user id comes from an ``x-user-id`` header sent from loopback: for the example)."""
    app = Starlette(
        routes=[
            Route("/agents", agents_endpoint),
            Route("/agents/{agent}/run", run_endpoint, methods=["POST"]),
            WebSocketRoute("/events", events_endpoint),
        ]
    )
    return AmbientMiddleware(app, registry=Registry(), identity=trusted_header("x-user-id"))
