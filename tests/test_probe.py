"""The isolation probe and the pytest kit of ``ambient.testing``: a component seen by the
wrong user, or not cleaned as its lifetime says, always fails the report; what the kit's
fixtures change is given back after the test."""

from __future__ import annotations

import datetime
import fractions
import gc
from collections.abc import Callable, Iterator

import anyio
import pytest

import ambient
from ambient import Lifetime, Registry, UserExecutionContext
from ambient.testing import IsolationProbe
from tests.test_check import CountsCloses, check, notes_app
from tests.test_check import Notes as AppNotes

pytest_plugins = ["pytester"]


class Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []


async def test_the_context_fixtures_defaults(
    ambient_context: UserExecutionContext, make_context: Callable[..., UserExecutionContext]
) -> None:
    """``ambient_context`` is bound for ``test-user``, as ``make_context()`` makes one."""
    assert ambient.get_current_context() is ambient_context
    assert (ambient_context.user_id, ambient_context.tenant_id) == ("test-user", None)
    assert make_context().user_id == "test-user"
    assert make_context("bob", tenant_id="acme").tenant_id == "acme"


def test_the_probe_fixture_leaves_user_components_to_the_registrys_close(
    pytester: pytest.Pytester,
) -> None:
    """The ``isolation_probe`` fixture checks what a test can see through: a USER
    component still alive in an open registry is no failure (``expect_closed`` is for a
    probe made by hand, reporting after ``registry.aclose()``)."""
    pytester.makepyfile(
        """
        import anyio
        import ambient
        from ambient import Lifetime, Registry

        class Memory:
            def close(self):
                pass

        REGISTRY = Registry()
        REGISTRY.register(Memory, Memory, lifetime=Lifetime.USER)

        def test_user_memory(isolation_probe, make_context):
            async def main():
                for user in ("alice", "bob"):
                    async with REGISTRY.open_scope(make_context(user)):
                        await ambient.resolve(Memory)

            anyio.run(main)
            assert isolation_probe.report().created == 2
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


async def test_a_user_alias_with_a_cleanup_of_its_own_is_no_second_cleanup() -> None:
    """A USER generator handing out the user's memory it resolved (a view flushed after
    its ``yield``) ends with the user's components, outside any request: its end is the
    alias's, not a second cleanup of the memory, which its own registration closes once."""

    class Memory(CountsCloses):
        flushes = 0

    def view() -> Iterator[Memory]:
        memory = ambient.resolve_sync(Memory)
        yield memory
        memory.flushes += 1

    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    registry.register("view", view, lifetime=Lifetime.USER)
    memories: list[Memory] = []
    with IsolationProbe(expect_closed=True) as probe:
        for user in ("alice", "bob", "alice"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                memory = await scope.resolve("view")
                assert memory is await scope.resolve(Memory)
                memories.append(memory)
        del scope, memory  # the probe looks for closed scopes and components kept alive
        await registry.aclose()
    assert [(m.closes, m.flushes) for m in memories] == [(1, 1), (1, 1), (1, 1)]
    assert memories[0] is memories[2]
    memories.clear()
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned) == (4, 4)


async def test_the_cleanup_of_a_component_made_before_the_probe_is_counted() -> None:
    """A probe installed once a user's memory exists (an app fixture wider than the
    test) sees it cleaned at the registry's close: one cleanup, and no problem."""

    class Memory:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Memory, Memory, lifetime=Lifetime.USER)
    async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
        await scope.resolve(Memory)
    del scope
    with IsolationProbe(expect_closed=True) as probe:
        await registry.aclose()
    report = probe.report()
    assert report.ok, report.violations
    assert (report.created, report.cleaned, report.scopes) == (0, 1, 0)


class Cyclic:
    """A component in a reference cycle: dead once its scope drops it, but freed only by a
    garbage collection."""

    def __init__(self) -> None:
        self.me = self

    def close(self) -> None:
        pass


async def test_a_component_in_a_cycle_is_collected_before_the_report() -> None:
    """The report collects garbage first: a REQUEST component in a reference cycle that
    nothing else holds is not taken for one outliving its scope (automatic collections are
    off here, so only the report's own collection frees it)."""
    registry = Registry()
    registry.register(Cyclic, Cyclic)
    gc.disable()
    try:
        with IsolationProbe() as probe:
            for user in ("alice", "bob"):
                async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                    await scope.resolve(Cyclic)
            del scope  # the probe looks for closed scopes kept alive
        report = probe.report()
    finally:
        gc.enable()
    assert report.ok, report.violations
    assert (report.created, report.cleaned) == (2, 2)
    await registry.aclose()


async def test_a_scope_dropped_without_being_closed_is_reported_with_its_components() -> None:
    """A scope entered in a task that ends without closing it (a request handler that
    forgot its ``async with``) is garbage: the report says it was never closed and never
    will be, and that its component was never cleaned (a scope still open would clean it
    later, a dropped one cannot)."""

    class Connection:
        def close(self) -> None:
            pass

    registry = Registry()
    registry.register(Connection, Connection)

    async def forgetful() -> None:
        scope = registry.open_scope(UserExecutionContext.create("alice"))
        await scope.__aenter__()
        await scope.resolve(Connection)

    # The scope itself warns as it is collected.
    warned = pytest.warns(ResourceWarning, match="garbage-collected with 1 component cleanup")
    with IsolationProbe() as probe, warned:
        async with anyio.create_task_group() as group:
            group.start_soon(forgetful)
        gc.collect()
    report = probe.report()
    assert [line.split(" for ")[0] for line in report.open_scopes] == ["a scope"]
    assert "alice" in report.open_scopes[0]
    assert report.open_scopes[0].endswith(
        "was opened and never closed (garbage-collected: its cleanups never ran)"
    )
    assert [line.split("<locals>.")[-1] for line in report.cleanup] == [
        "Connection: 1 instance(s) created but never cleaned"
    ]
    assert not report.ok
    await registry.aclose()


@pytest.mark.parametrize(
    "value",
    [
        frozenset({"read", "write"}),
        fractions.Fraction(1, 3),
        range(10),
        datetime.timedelta(days=1),
        datetime.time(9, 30),
    ],
    ids=["frozenset", "fraction", "range", "timedelta", "time"],
)
async def test_one_constant_value_handed_to_every_user_is_not_shared(value: object) -> None:
    """A USER factory returning one module-level constant (a set of roles, a share, a
    range, a period, an opening time) gives every user the same object, which holds no
    state: not reported as handed to several users."""
    registry = Registry()
    registry.register("value", lambda: value, lifetime=Lifetime.USER)
    with IsolationProbe() as probe:
        for user in ("alice", "bob"):
            async with registry.open_scope(UserExecutionContext.create(user)) as scope:
                assert await scope.resolve("value") is value
        del scope  # the probe looks for closed scopes kept alive
    report = probe.report()
    assert report.ok, report.violations
    await registry.aclose()


async def test_the_memory_phase_adds_no_scope_nor_component_to_the_report() -> None:
    """The probe records nothing new while ``run_check`` measures memory growth: the
    scopes, components created and components cleaned the report counts are the users'
    requests' whatever the phase's length, and every component created is cleaned."""
    counts = []
    for growth in (0, 50):
        registry = Registry()
        registry.register(AppNotes, AppNotes)
        report = await check(notes_app(registry), users=3, requests=2, growth_requests=growth)
        assert report.ok, report.violations
        counts.append((report.scopes, report.components_created, report.components_cleaned))
        await registry.aclose()
    assert counts[0] == counts[1] == (6, 6, 6)
