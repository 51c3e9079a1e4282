"""The example's domain classes, unchanged by the migration: only who owns an instance,
and for how long, changes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import anyio.lowlevel

from ambient import UserExecutionContext


class Agent:
    """An agent with a conversation memory: state that belongs to one user."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.history: list[str] = []

    async def answer(self, prompt: str) -> str:
        self.history.append(prompt)
        await anyio.lowlevel.checkpoint()  # stands for the model call
        return f"{self.name}: {prompt} (turn {len(self.history)})"


class AgentRegistry:
    """The agents by name."""

    def __init__(self, names: Iterable[str] = ("triage", "billing")) -> None:
        self._agents = {name: Agent(name) for name in names}

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            msg = f"no agent named {name!r}"
            raise LookupError(msg) from None

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)

    def __len__(self) -> int:
        return len(self._agents)


class WebSocketBridge:
    """Events for each user's websocket connections, kept until the connection takes them."""

    def __init__(self) -> None:
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self.closed = False

    def emit(self, user_id: str, event: dict[str, Any]) -> None:
        self._pending.setdefault(user_id, []).append(event)

    def drain(self, user_id: str) -> list[dict[str, Any]]:
        return self._pending.pop(user_id, [])

    def close(self) -> None:
        self.closed = True


class ExecutionEngine:
    """Runs an agent for a user and reports progress through the bridge."""

    def __init__(
        self,
        registry: AgentRegistry,
        bridge: WebSocketBridge,
        user_context: UserExecutionContext | None,
    ) -> None:
        self.registry = registry
        self.bridge = bridge
        self.user_context = user_context

    def _user(self) -> UserExecutionContext:
        if self.user_context is None:
            msg = "the engine has no user context"
            raise RuntimeError(msg)
        return self.user_context

    def _emit(self, kind: str, agent: str) -> None:
        ctx = self._user()
        self.bridge.emit(ctx.user_id, {"type": kind, "agent": agent, "request": ctx.request_id})

    async def run(self, agent_name: str, prompt: str) -> dict[str, Any]:
        agent = self.registry.get(agent_name)
        self._emit("started", agent_name)
        answer = await agent.answer(prompt)
        self._emit("finished", agent_name)
        ctx = self._user()
        return {"user": ctx.user_id, "request": ctx.request_id, "answer": answer}
