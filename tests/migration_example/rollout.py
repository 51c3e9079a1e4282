"""Step 3 of the migration: the component path switched on user by user.

One :class:`~ambient.migration.Rollout` switches the three singletons together: the
handlers reach the agent registry and the bridge through the engine, so a request uses
either the legacy trio or the user's own components, never a mix. Deploy it at
``mode="shadow"`` first, then ``"component"`` at a growing ``percent``
(``AMBIENT_ROLLOUT_EXECUTION_ENGINE_MODE`` / ``_PERCENT`` set them without a code change);
when the component path fails too often it falls back to legacy by itself.
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
from ambient.migration import Rollout
from tests.migration_example import legacy
from tests.migration_example.components import ExecutionEngine
from tests.migration_example.migrated import build_registry

engines = Rollout(ExecutionEngine, legacy=legacy.engine, mode="legacy", max_error_rate=0.05)


async def current_engine() -> ExecutionEngine:
    engine = await engines.resolve()
    if engine is legacy.engine:  # the legacy engine still needs the user put on it
        engine.user_context = get_current_context()
    return engine


async def run_agent(agent: str, prompt: str) -> dict[str, Any]:
    engine = await current_engine()
    return await engine.run(agent, prompt)


async def list_agents() -> list[str]:
    engine = await current_engine()
    return sorted(engine.registry)


async def pending_events() -> list[dict[str, Any]]:
    engine = await current_engine()
    return engine.bridge.drain(get_current_context().user_id)


async def run_endpoint(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse(await run_agent(request.path_params["agent"], body["prompt"]))


async def agents_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(await list_agents())


async def events_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json(await pending_events())
    await websocket.close()


def create_app(registry: Registry | None = None) -> AmbientMiddleware:
    """The application during the rollout; its components come from ``registry`` (default:
    :func:`build_registry`)."""
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
