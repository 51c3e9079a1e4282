"""A background-job worker in its own process: contexts arrive as signed tokens on a queue.

The secret comes from configuration (``AMBIENT_CONTEXT_SECRET`` in the environment), as it
would in a Celery, RQ or arq worker. Each job restores its token with the worker's own
registry, resolves the user's components and reports what it saw; a refused token is
reported with its reason.
"""

from __future__ import annotations

from multiprocessing.queues import Queue
from typing import Any

import anyio
import anyio.to_thread

import ambient
from ambient.integrations.propagation import InvalidTokenError, restore
from tests.frameworks.common import Memory, Probe, build_registry


def run(jobs: Queue[str | None], results: Queue[dict[str, Any]]) -> None:
    """Process entry point: serve jobs until ``None`` arrives."""
    anyio.run(_serve, jobs, results)


async def _serve(jobs: Queue[str | None], results: Queue[dict[str, Any]]) -> None:
    registry, ledger = build_registry()
    while (token := await anyio.to_thread.run_sync(jobs.get)) is not None:
        try:
            async with restore(token, registry=registry, operation="send-receipt") as ctx:
                probe = await ambient.resolve(Probe)
                memory = await ambient.resolve(Memory)
                answer: dict[str, Any] = {
                    "user": ctx.user_id,
                    "tenant": ctx.tenant_id,
                    "thread": ctx.thread_id,
                    "request": ctx.request_id,
                    "run": ctx.run_id,
                    "parent_run": ctx.parent_run_id,
                    "depth": ctx.depth,
                    "operation": ctx.metadata.get("operation"),
                    "probe_user": probe.user_id,
                    "memory_user": memory.user_id,
                }
        except InvalidTokenError as refused:
            answer = {"refused": refused.reason, "detail": str(refused)}
        answer["open_probes"] = ledger.open_probes()
        results.put(answer)
    await registry.aclose()
    results.put({"problems": ledger.problems()})
