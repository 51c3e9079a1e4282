"""The migration guide's example, before, during and after the migration.

Before: the report lists every use of the three globals, and users see each other's
answers. During: only the users still on legacy touch globals. After: the report is empty,
and the isolation check passes for 100 concurrent users.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import websockets.sync.client

import ambient
from ambient import ComponentEvent, Observer, Registry, UserExecutionContext
from ambient.migration import (
    GlobalStateWarning,
    global_state_report,
    reset_global_state_report,
)
from tests.migration_example import components, legacy, migrated, rollout
from tests.servers import serve

USERS = 100


def line_in(module: ModuleType, text: str) -> int:
    """The one line of ``module`` containing ``text``."""
    lines = Path(str(module.__file__)).read_text().splitlines()
    found = [n for n, line in enumerate(lines, 1) if text in line]
    assert len(found) == 1, (module.__name__, text, found)
    return found[0]


def site(module: ModuleType, text: str) -> str:
    return f"tests/migration_example/{module.__name__.rsplit('.', 1)[1]}.py:{line_in(module, text)}"


@pytest.fixture(autouse=True)
def _fresh_report() -> Iterator[None]:
    reset_global_state_report()
    yield
    reset_global_state_report()


@pytest.fixture(autouse=True)
def _rollout_back_to_legacy() -> Iterator[None]:
    yield
    rollout.engines.mode = "legacy"
    rollout.engines.percent = 100
    rollout.engines.reset()


class Probe(Observer):
    """Which users each component instance was created for, and how often it was cleaned."""

    def __init__(self) -> None:
        self.instances: dict[int, Any] = {}
        self.users: dict[int, set[str]] = {}
        self.cleaned: dict[int, int] = {}

    def component_created(self, event: ComponentEvent) -> None:
        if event.instance is not None and event.user is not None:
            self.instances[id(event.instance)] = event.instance
            self.users.setdefault(id(event.instance), set()).add(event.user.user_id)

    def component_cleaned(self, event: ComponentEvent) -> None:
        self.cleaned[id(event.instance)] = self.cleaned.get(id(event.instance), 0) + 1

    def violations(self) -> list[str]:
        found = [
            f"{type(self.instances[i]).__name__} seen by {sorted(users)}"
            for i, users in self.users.items()
            if len(users) > 1
        ]
        found += [
            f"{type(self.instances[i]).__name__} cleaned {self.cleaned.get(i, 0)} times"
            for i in self.instances
            if self.cleaned.get(i, 0) != 1
        ]
        return found


@dataclass
class UserRun:
    """What one simulated user asked and got back."""

    user: str
    requests: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """How this user's answers break isolation (empty when they do not)."""
        found = []
        for n, (request, result) in enumerate(zip(self.requests, self.results, strict=True)):
            if result["user"] != self.user or result["request"] != request:
                found.append(f"{self.user} got an answer for {result['user']}")
            if not result["answer"].endswith(f"(turn {n + 1})"):
                found.append(f"{self.user} got {result['answer']!r} for turn {n + 1}")
        expected = [
            (kind, request) for request in self.requests for kind in ("started", "finished")
        ]
        if [(e["type"], e["request"]) for e in self.events] != expected:
            found.append(f"{self.user} got events {self.events}")
        return found


@dataclass
class App:
    """One stage of the example: its handlers and the registry its scopes open from."""

    run_agent: Callable[[str, str], Awaitable[dict[str, Any]]]
    list_agents: Callable[[], Awaitable[list[str]]]
    pending_events: Callable[[], Awaitable[list[dict[str, Any]]]]
    registry: Registry


async def drive(app: App, users: list[str]) -> list[UserRun]:
    """Every user, concurrently: two agent runs, then the agent list and their events,
    each request in its own scope (as the middleware would open it)."""
    runs = [UserRun(user) for user in users]

    async def request(user: str, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        context = UserExecutionContext.create(user)
        async with app.registry.open_scope(context):
            return context.request_id, await call()

    async def one_user(run: UserRun) -> None:
        for prompt in ("hello", "and again"):
            call = functools.partial(app.run_agent, "triage", prompt)
            request_id, result = await request(run.user, call)
            run.requests.append(request_id)
            run.results.append(result)
        _, run.agents = await request(run.user, app.list_agents)
        _, run.events = await request(run.user, app.pending_events)

    async with anyio.create_task_group() as tg:
        for run in runs:
            tg.start_soon(one_user, run)
    return runs


def users(tag: str, n: int = USERS) -> list[str]:
    return [f"{tag}-user-{i}" for i in range(n)]


LEGACY_SITES = {
    ("engine", site(legacy, "engine.user_context = get_current_context()")): 2,
    ("engine", site(legacy, "return await engine.run(agent, prompt)")): 2,
    # sorted() asks for the length, then iterates: two uses
    ("agent_registry", site(legacy, "return sorted(agent_registry)")): 2,
    ("bridge", site(legacy, "return bridge.drain(")): 1,
    ("agent_registry", site(components, "agent = self.registry.get(agent_name)")): 2,
    ("bridge", site(components, "self.bridge.emit(ctx.user_id")): 4,
}


class TestLegacy:
    async def test_the_report_lists_every_global_access(self) -> None:
        """100 concurrent users through the guarded legacy app: one warning per call site
        (six), and the report counts every access at each of them."""
        app = App(legacy.run_agent, legacy.list_agents, legacy.pending_events, Registry())
        with pytest.warns(GlobalStateWarning) as record:
            await drive(app, users("report"))
        report = global_state_report()
        counted = {(a.name, a.site): a.count for a in report.accesses}
        assert counted == {key: per_user * USERS for key, per_user in LEGACY_SITES.items()}
        assert report.by_name() == {"agent_registry": 400, "bridge": 500, "engine": 400}
        assert len(record) == len(LEGACY_SITES)
        assert {Path(w.filename).parent.name for w in record} == {"migration_example"}

    async def test_users_see_each_others_answers(self) -> None:
        """The shared engine carries whichever user was put on it last: under concurrency
        answers and events reach the wrong users (what the migration fixes)."""
        app = App(legacy.run_agent, legacy.list_agents, legacy.pending_events, Registry())
        with pytest.warns(GlobalStateWarning):
            runs = await drive(app, users("leak"))
        problems = [p for run in runs for p in run.problems()]
        assert any("got an answer for" in p for p in problems)
        assert any("got events" in p for p in problems)


class TestRollout:
    async def test_half_way_only_legacy_users_touch_globals(self) -> None:
        """At 50 %, the users on the component path are isolated and touch no global;
        every access in the report comes from the users still on legacy."""
        rollout.engines.mode = "component"
        rollout.engines.percent = 50
        before = rollout.engines.state()
        registry = migrated.build_registry()
        app = App(rollout.run_agent, rollout.list_agents, rollout.pending_events, registry)
        everyone = users("half")
        moved = [u for u in everyone if rollout.engines.includes(u)]
        assert 30 <= len(moved) <= 70
        with pytest.warns(GlobalStateWarning):
            runs = await drive(app, everyone)
        for run in runs:
            if run.user in moved:
                assert run.problems() == [], run.user
        stayed = USERS - len(moved)
        # per legacy user: 2 runs x (user_context, run, registry.get, 2 x emit), the agent
        # list (user_context, .registry, length, iteration), the events (user_context,
        # .bridge, drain)
        assert global_state_report().total == stayed * (2 * 5 + 4 + 3)
        state = rollout.engines.state()
        assert (state.component - before.component, state.legacy - before.legacy) == (
            4 * len(moved),
            4 * stayed,
        )
        await registry.aclose()

    async def test_shadow_serves_legacy_and_cleans_the_components(self) -> None:
        """In shadow mode everyone is served by the legacy globals while each request
        also built (and cleaned up) the user's component."""
        rollout.engines.mode = "shadow"
        before = rollout.engines.state()
        registry = migrated.build_registry()
        app = App(rollout.run_agent, rollout.list_agents, rollout.pending_events, registry)
        probe = Probe()
        remove = ambient.add_observer(probe)
        try:
            with pytest.warns(GlobalStateWarning):
                await drive(app, users("shadow", 20))
            await registry.aclose()
        finally:
            remove()
        assert rollout.engines.state().shadow - before.shadow == 80
        engines = [i for i in probe.instances.values() if isinstance(i, components.ExecutionEngine)]
        assert len(engines) == 80
        assert probe.violations() == []
        assert global_state_report().by_name()["engine"] > 0

    async def test_at_100_percent_the_report_is_empty(self) -> None:
        """With everyone on the component path nothing touches a global (no warning
        either: pytest turns one into an error) and every user is isolated."""
        rollout.engines.mode = "component"
        registry = migrated.build_registry()
        app = App(rollout.run_agent, rollout.list_agents, rollout.pending_events, registry)
        runs = await drive(app, users("full"))
        assert [p for run in runs for p in run.problems()] == []
        assert global_state_report().total == 0
        await registry.aclose()


class TestMigrated:
    async def test_report_empty_and_isolation_check_passes(self) -> None:
        """100 concurrent users through the migrated app: every answer, turn count and
        event is the user's own; no component instance is seen by two users; every one is
        cleaned exactly once; the report is empty."""
        registry = migrated.build_registry()
        app = App(migrated.run_agent, migrated.list_agents, migrated.pending_events, registry)
        probe = Probe()
        remove = ambient.add_observer(probe)
        try:
            runs = await drive(app, users("migrated"))
            await registry.aclose()
        finally:
            remove()
        assert [p for run in runs for p in run.problems()] == []
        assert all(run.agents == ["billing", "triage"] for run in runs)
        kinds = {type(i).__name__ for i in probe.instances.values()}
        assert kinds == {"AgentRegistry", "ExecutionEngine", "WebSocketBridge"}
        assert len(probe.instances) == USERS * (2 + 2)  # two engines, a registry, a bridge
        assert probe.violations() == []
        assert global_state_report().total == 0
        assert str(global_state_report()) == "No guarded global was touched inside a user context."


def fetch_events(base_url: str, user: str) -> list[dict[str, Any]]:
    """What the user's websocket receives from /events (a real websockets client)."""
    url = base_url.replace("http://", "ws://") + "/events"
    with websockets.sync.client.connect(url, additional_headers={"x-user-id": user}) as ws:
        events: list[dict[str, Any]] = json.loads(ws.recv())
    return events


async def drive_http(base_url: str, users: list[str]) -> list[UserRun]:
    """``drive`` over HTTP and websockets against a real server."""
    runs = [UserRun(user) for user in users]

    async def one_user(client: httpx.AsyncClient, run: UserRun) -> None:
        headers = {"x-user-id": run.user}
        for prompt in ("hello", "and again"):
            response = await client.post(
                "/agents/triage/run", json={"prompt": prompt}, headers=headers
            )
            assert response.status_code == 200, response.text
            run.requests.append(response.headers["x-request-id"])
            run.results.append(response.json())
        response = await client.get("/agents", headers=headers)
        assert response.status_code == 200, response.text
        run.agents = response.json()
        run.events = await anyio.to_thread.run_sync(fetch_events, base_url, run.user)

    # every user is a concurrent task; 20 connections keep 20 requests in flight at once
    # (httpx opens new connections slowly, about 20 ms each)
    limits = httpx.Limits(max_connections=20)
    async with (
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client,
        anyio.create_task_group() as tg,
    ):
        for run in runs:
            tg.start_soon(one_user, client, run)
    return runs


class TestOverHttp:
    """The same checks through AmbientMiddleware on a real uvicorn server."""

    async def test_legacy_report_lists_every_global_access(self) -> None:
        """100 concurrent users over HTTP and websockets: the report of step 1."""
        with (
            pytest.warns(GlobalStateWarning) as record,
            serve("uvicorn", legacy.create_app()) as url,
        ):
            runs = await drive_http(url, users("http-legacy"))
        assert all(run.agents == ["billing", "triage"] for run in runs)
        counted = {(a.name, a.site): a.count for a in global_state_report().accesses}
        assert counted == {key: per_user * USERS for key, per_user in LEGACY_SITES.items()}
        assert len(record) == len(LEGACY_SITES)

    async def test_rollout_at_half_isolates_the_moved_users(self) -> None:
        """At 50 %, the users on the component path are isolated over HTTP too."""
        rollout.engines.mode = "component"
        rollout.engines.percent = 50
        everyone = users("http-half")
        moved = [u for u in everyone if rollout.engines.includes(u)]
        with pytest.warns(GlobalStateWarning), serve("uvicorn", rollout.create_app()) as url:
            runs = await drive_http(url, everyone)
        assert [p for run in runs if run.user in moved for p in run.problems()] == []
        assert global_state_report().total == (USERS - len(moved)) * (2 * 5 + 4 + 3)

    async def test_migrated_report_empty_and_isolation_check_passes(self) -> None:
        """100 concurrent users over HTTP and websockets against the migrated app: all
        answers and events their own, components never shared and cleaned exactly once
        (USER ones at the server's shutdown), the report empty."""
        probe = Probe()
        remove = ambient.add_observer(probe)
        try:
            with serve("uvicorn", migrated.create_app()) as url:
                runs = await drive_http(url, users("http-migrated"))
        finally:
            remove()
        assert [p for run in runs for p in run.problems()] == []
        assert all(run.agents == ["billing", "triage"] for run in runs)
        assert len(probe.instances) == USERS * (2 + 2)
        assert probe.violations() == []
        assert global_state_report().total == 0


GUIDE = Path(__file__).parents[2] / "docs" / "migration.md"


def guide_block(name: str) -> str:
    """The fenced block between ``<!-- report:NAME -->`` markers in the guide."""
    text = GUIDE.read_text()
    start = text.index(f"<!-- report:{name} -->")
    end = text.index(f"<!-- /report:{name} -->")
    block = text[start:end].split("```")[1]
    return block.strip("\n")


class TestGuide:
    """The reports printed in docs/migration.md are what this example really produces."""

    @pytest.fixture(autouse=True)
    def _from_the_repository_root(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(GUIDE.parents[1])

    async def test_legacy_report(self) -> None:
        """Step 1's report, for 100 users."""
        app = App(legacy.run_agent, legacy.list_agents, legacy.pending_events, Registry())
        with pytest.warns(GlobalStateWarning):
            await drive(app, users("report"))
        assert str(global_state_report()) == guide_block("legacy")

    async def test_rollout_report(self) -> None:
        """Step 3's report, for 100 users at 25 %."""
        rollout.engines.mode = "component"
        rollout.engines.percent = 25
        registry = migrated.build_registry()
        app = App(rollout.run_agent, rollout.list_agents, rollout.pending_events, registry)
        with pytest.warns(GlobalStateWarning):
            await drive(app, users("rollout"))
        await registry.aclose()
        assert str(global_state_report()) == guide_block("rollout")

    async def test_migrated_report(self) -> None:
        """Step 4's report, for 100 users."""
        registry = migrated.build_registry()
        app = App(migrated.run_agent, migrated.list_agents, migrated.pending_events, registry)
        await drive(app, users("migrated"))
        await registry.aclose()
        assert str(global_state_report()) == guide_block("migrated")
