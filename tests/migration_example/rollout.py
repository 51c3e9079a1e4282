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

from ambient import Registry, get_current_context
from ambient.middleware import AmbientMiddleware
from ambient.migration import Rollout
from tests.migration_example import legacy
from tests.migration_example.components import ExecutionEngine
from tests.migration_example.migrated import build_app

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


def create_app(registry: Registry | None = None) -> AmbientMiddleware:
    """The application during the rollout: the migrated app's routes over these handlers;
    its components come from ``registry`` (default:
    :func:`~tests.migration_example.migrated.build_registry`)."""
    return build_app(run_agent, list_agents, pending_events, registry)
