"""USER and APP lifetimes: reference counting, idle expiry, LRU eviction, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import anyio
import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

import ambient
from ambient import (
    ComponentEvent,
    Lifetime,
    Observer,
    Registry,
    Scope,
    UserExecutionContext,
    UserRef,
)
from ambient._context import ANONYMOUS
from tests.test_scope import ComponentEvents


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def fixture_clock() -> FakeClock:
    return FakeClock()


def ctx(user: str, tenant: str | None = None) -> UserExecutionContext:
    return UserExecutionContext.create(user, tenant_id=tenant)


class Tracked:
    """A USER component that records its cleanup."""

    def __init__(self, user: UserRef, cleaned: list[str]) -> None:
        self.user = user
        self._cleaned = cleaned

    def close(self) -> None:
        self._cleaned.append(self.user.user_id)


def user_registry(
    cleaned: list[str], *, clock: FakeClock | None = None, idle_ttl: float = 60, **kw: object
) -> Registry:
    registry = Registry(clock=clock or FakeClock(), **kw)  # type: ignore[arg-type]
    registry.register(
        Tracked, lambda user: Tracked(user, cleaned), lifetime=Lifetime.USER, idle_ttl=idle_ttl
    )
    return registry


class _CountedUsers(OrderedDict[UserRef, Any]):
    """A registry's users that count the entries of every walk over them, however it is
    taken (``walked``)."""

    walked = 0

    def items(self) -> Any:
        self.walked += len(self)
        return super().items()

    def values(self) -> Any:
        self.walked += len(self)
        return super().values()

    def __iter__(self) -> Any:
        self.walked += len(self)
        return super().__iter__()


async def burst(
    registry: Registry,
    contexts: list[UserExecutionContext],
    while_held: Callable[[], None] = lambda: None,
) -> None:
    """Open a scope for each of ``contexts`` at once, each resolving its user's
    ``Tracked``; once all are open, run ``while_held``, then let them all close."""
    held = 0
    all_held = anyio.Event()
    release = anyio.Event()

    async def request(context: UserExecutionContext) -> None:
        nonlocal held
        async with registry.open_scope(context):
            assert (await ambient.resolve(Tracked)).user.user_id == context.user_id
            held += 1
            if held == len(contexts):
                all_held.set()
            await release.wait()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for context in contexts:
                tg.start_soon(request, context)
            await all_held.wait()
            while_held()
            release.set()


async def use(registry: Registry, user: str) -> Tracked:
    async with registry.open_scope(ctx(user)):
        return await ambient.resolve(Tracked)


async def _refused_as_closed(scope: Scope, key: Any, threaded: bool) -> None:
    """Resolve ``key`` as work ``scope`` left running (a worker thread, or a task): its
    scope closes while the factory runs, so the resolution is refused."""
    with pytest.raises(ambient.errors.ScopeClosedError):
        if threaded:
            await anyio.to_thread.run_sync(scope.resolve_sync, key)
        else:
            await scope.resolve(key)


class TestUserLifetime:
    async def test_kept_while_idle_ttl_has_not_passed(self, clock: FakeClock) -> None:
        """Closing the last scope starts the idle clock; before the ttl it is reused."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        first = await use(registry, "alice")
        clock.now += 59
        assert await use(registry, "alice") is first
        assert cleaned == []

    async def test_freed_idle_ttl_after_last_scope(self, clock: FakeClock) -> None:
        """After idle_ttl the component is cleaned on the next scope open/close."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        first = await use(registry, "alice")
        clock.now += 61
        second = await use(registry, "bob")
        assert cleaned == ["alice"]
        assert second is not first
        assert registry.stats().live_users == 1

    async def test_freed_once_idle_ttl_has_passed_to_the_tick(self, clock: FakeClock) -> None:
        """idle_ttl seconds after the last scope closed, not a tick later, the component
        is due: at once for idle_ttl=0, whatever the clock's resolution."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        first = await use(registry, "alice")
        clock.now += 60
        assert await use(registry, "alice") is not first
        assert cleaned == ["alice"]
        at_once = user_registry(cleaned, clock=clock, idle_ttl=0)
        await use(at_once, "bob")
        assert cleaned == ["alice", "bob"]
        assert at_once.stats().live_users == 0
        await registry.aclose()

    async def test_a_scope_closing_at_the_tick_of_an_expiry_cleans_what_expired(
        self, clock: FakeClock
    ) -> None:
        """A scope that opened before a user's idle_ttl had passed, and uses no USER
        component, closes at its very tick: its close cleans that user's components, as a
        scope opening then would, not a tick later."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        await use(registry, "alice")
        clock.now += 30
        async with registry.open_scope(ctx("bob")):
            clock.now += 30
        assert cleaned == ["alice"]
        assert registry.stats().live_users == 0
        await registry.aclose()

    @pytest.mark.parametrize("call", ["resolve", "resolve_sync in a worker thread"])
    async def test_a_component_made_as_its_request_ended_expires_by_its_own_idle_ttl(
        self, clock: FakeClock, call: str
    ) -> None:
        """Work a request left running (a task, a worker thread) finishes making a USER
        component once the user's last scope has closed: it is kept with the user's other
        components, and expires idle_ttl after that close at the next scope that opens, as
        sweep() finds, not once the longer-lived one the close reckoned with does."""
        cleaned: list[str] = []
        registry = Registry(clock=clock)
        registry.register("kept", object, lifetime=Lifetime.USER, idle_ttl=3600)
        making, go = threading.Event(), threading.Event()

        def make(user: UserRef) -> Tracked:
            making.set()
            go.wait(10)
            return Tracked(user, cleaned)

        async def amake(user: UserRef) -> Tracked:
            making.set()
            await anyio.to_thread.run_sync(go.wait, 10)
            return Tracked(user, cleaned)

        threaded = call != "resolve"
        registry.register(Tracked, make if threaded else amake, lifetime=Lifetime.USER, idle_ttl=10)

        async with anyio.create_task_group() as group:
            async with registry.open_scope(ctx("alice")) as scope:
                await scope.resolve("kept")
                group.start_soon(_refused_as_closed, scope, Tracked, threaded)
                await anyio.to_thread.run_sync(making.wait, 10)
            go.set()
        assert registry.stats().live_user_components == 2
        clock.now += 11
        async with registry.open_scope(ctx("bob")):
            pass
        assert cleaned == ["alice"]
        assert registry.stats().live_user_components == 1
        await registry.aclose()

    async def test_an_expired_component_is_never_handed_out_beside_a_kept_one(
        self, clock: FakeClock
    ) -> None:
        """Of a user's two components, the one with the shorter idle_ttl expires and is
        cleaned while the other is kept: the user's next scope gets a fresh one, never the
        cleaned one."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock, idle_ttl=10)
        registry.register("kept", object, lifetime=Lifetime.USER, idle_ttl=3600)
        async with registry.open_scope(ctx("alice")):
            first = await ambient.resolve(Tracked)
            kept = await ambient.resolve("kept")
        clock.now += 11
        await use(registry, "bob")  # a scope of the registry runs the expiry
        assert cleaned == ["alice"]
        async with registry.open_scope(ctx("alice")):
            assert await ambient.resolve("kept") is kept
            assert await ambient.resolve(Tracked) is not first
        await registry.aclose()

    async def test_a_user_leaving_later_with_a_longer_idle_ttl_delays_no_earlier_expiry(
        self, clock: FakeClock
    ) -> None:
        """alice's component (idle_ttl 10) is cleaned by the first scope once her 10
        seconds have passed, though bob, whose component is kept for an hour, left after
        her: the registry's next expiry is the earliest of all, not the latest set."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock, idle_ttl=10)
        registry.register(
            "hour", lambda user: Tracked(user, cleaned), lifetime=Lifetime.USER, idle_ttl=3600
        )
        await use(registry, "alice")
        clock.now += 1
        async with registry.open_scope(ctx("bob")):
            await ambient.resolve("hour")
        clock.now += 10
        async with registry.open_scope(ctx("carol")):  # no USER component of its own
            pass
        assert cleaned == ["alice"]
        await registry.aclose()

    async def test_a_component_kept_past_another_ones_expiry_expires_in_its_turn(
        self, clock: FakeClock
    ) -> None:
        """Of alice's two components, the one with idle_ttl 10 is cleaned by the first
        scope 11 seconds after she left, the other (idle_ttl 100) by the first scope once
        its own 100 seconds have passed, with no sweep() and no other user leaving."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock, idle_ttl=10)
        registry.register(
            "longer", lambda user: Tracked(user, cleaned), lifetime=Lifetime.USER, idle_ttl=100
        )
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Tracked)
            await ambient.resolve("longer")
        clock.now += 11
        async with registry.open_scope(ctx("bob")):  # no USER component of its own
            pass
        assert cleaned == ["alice"]
        clock.now += 89
        async with registry.open_scope(ctx("carol")):
            pass
        assert cleaned == ["alice", "alice"]
        assert registry.stats().live_users == 0

    async def test_not_freed_while_a_scope_holds_it(self, clock: FakeClock) -> None:
        """An entry in use never expires, however long the request takes."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        async with registry.open_scope(ctx("alice")):
            held = await ambient.resolve(Tracked)
            clock.now += 10_000
            async with registry.open_scope(ctx("bob"), allow_switch=True):
                await ambient.resolve(Tracked)
            assert cleaned == []
            assert await ambient.resolve(Tracked) is held
        assert cleaned == []
        clock.now += 61
        await registry.sweep()
        assert sorted(cleaned) == ["alice", "bob"]

    async def test_sweep_cleans_expired_users(self, clock: FakeClock) -> None:
        """registry.sweep() cleans every expired entry at once."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        for user in ("a", "b", "c"):
            await use(registry, user)
        clock.now += 61
        await registry.sweep()
        assert sorted(cleaned) == ["a", "b", "c"]
        assert registry.stats().live_users == 0

    async def test_sweep_also_cleans_what_waits_for_the_next_close(self, clock: FakeClock) -> None:
        """Cleanups queued for the next scope that closes (users a request took out of use
        as it opened, components a worker thread made for a closed scope) are run by a
        periodic sweep() too: with no further request they waited for aclose()."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        await use(registry, "a")
        clock.now += 61
        registry._queue_expired()  # what AmbientMiddleware does as a request opens
        assert cleaned == []
        await registry.sweep()
        assert cleaned == ["a"]
        assert registry.stats().live_users == 0

    @pytest.mark.parametrize("how", ["expired", "evicted"])
    async def test_aclose_cleans_what_waits_for_the_next_close(
        self, clock: FakeClock, how: str
    ) -> None:
        """A user taken out of use with no scope closing since (expired as a request
        opened, or evicted for max_users by a user taken in use) has its components
        cleaned by aclose(), once: shutdown is the last chance, no scope comes after."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock, max_users=1)
        await use(registry, "alice")
        if how == "expired":
            clock.now += 61
            registry._queue_expired()  # what AmbientMiddleware does as a request opens
        else:
            registry.acquire_user(UserRef("bob"))
        assert (cleaned, registry.stats().live_users) == ([], 1 if how == "evicted" else 0)
        await registry.aclose()
        assert cleaned == ["alice"]

    async def test_stats_count_live_users_and_their_components_apart(
        self, clock: FakeClock
    ) -> None:
        """One user holding two USER components is one live user and two live USER
        components in stats(); none of either once aclose() cleaned them."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        registry.register("second", object, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Tracked)
            await ambient.resolve("second")
        stats = registry.stats()
        assert (stats.live_users, stats.live_user_components) == (1, 2)
        await registry.aclose()
        stats = registry.stats()
        assert (stats.live_users, stats.live_user_components) == (0, 0)

    async def test_reference_counting_over_concurrent_scopes(self, clock: FakeClock) -> None:
        """The idle clock starts only when the last of several concurrent scopes closes."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, clock=clock)
        first_closed = anyio.Event()
        second_may_close = anyio.Event()

        async def short() -> None:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Tracked)
            first_closed.set()

        async def long() -> None:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Tracked)
                await second_may_close.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            tg.start_soon(short)
            await first_closed.wait()
            clock.now += 1_000
            await registry.sweep()
            assert cleaned == []
            second_may_close.set()
        clock.now += 61
        await registry.sweep()
        assert cleaned == ["alice"]

    async def test_idle_ttl_is_five_minutes_unless_given(self, clock: FakeClock) -> None:
        """A USER component registered without an idle_ttl is kept 300 seconds after its
        user's last scope closes, and cleaned once they have passed."""
        cleaned: list[str] = []
        registry = Registry(clock=clock)
        registry.register(Tracked, lambda user: Tracked(user, cleaned), lifetime=Lifetime.USER)
        first = await use(registry, "alice")
        clock.now += 299
        await registry.sweep()
        assert await use(registry, "alice") is first
        clock.now += 300
        await registry.sweep()
        assert cleaned == ["alice"]

    async def test_tenants_are_separate_users(self) -> None:
        """The same user id in two tenants gets two instances."""
        registry = Registry()
        registry.register("mem", object, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx("alice", "acme")):
            one = await ambient.resolve("mem")
        async with registry.open_scope(ctx("alice", "globex")):
            two = await ambient.resolve("mem")
        assert one is not two
        await registry.aclose()

    async def test_max_users_evicts_least_recently_used_idle_entries(self) -> None:
        """Past max_users the least recently used idle user is evicted."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=2)
        await use(registry, "a")
        await use(registry, "b")
        await use(registry, "a")  # a is now more recent than b
        await use(registry, "c")
        assert cleaned == ["b"]
        assert registry.stats().live_users == 2

    async def test_max_users_orders_users_by_the_end_of_their_last_scope(self) -> None:
        """A user's last use is the end of the last scope that held it, not its start:
        ``a``'s long request began before ``b``'s short one and ended after it, so ``b``
        is the least recently used and goes first (``a`` used to, still being ordered by
        when its request began)."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=2)
        short_done = anyio.Event()

        async def long_request() -> None:
            async with registry.open_scope(ctx("a")):
                await ambient.resolve(Tracked)
                await short_done.wait()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_request)
                await anyio.wait_all_tasks_blocked()
                await use(registry, "b")
                short_done.set()
        await use(registry, "c")
        assert cleaned == ["b"]
        await registry.aclose()
        assert sorted(cleaned) == ["a", "b", "c"]

    def test_max_users_orders_users_by_the_end_of_their_last_scope_in_sync_code(self) -> None:
        """The same with the USER entries taken and released directly (the registry's
        bookkeeping is sync): released last means evicted last."""
        registry = Registry(max_users=2)
        a = registry.acquire_user(UserRef("a"))
        b = registry.acquire_user(UserRef("b"))
        registry.release_user(b)
        registry.release_user(a)
        registry.release_user(registry.acquire_user(UserRef("c")))
        assert registry._evicted == [b]

    async def test_a_user_evicted_by_a_scope_is_cleaned_while_that_scope_stays_open(
        self,
    ) -> None:
        """A scope opened outside the middleware (a websocket's, a job's) that evicts an
        idle user for max_users cleans that user's components as it evicts them, not when
        it closes, which for a websocket may be hours later."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=1)
        await use(registry, "a")
        async with registry.open_scope(ctx("b")):
            await ambient.resolve(Tracked)
            assert cleaned == ["a"]
        await registry.aclose()
        assert cleaned == ["a", "b"]

    async def test_max_users_never_evicts_an_entry_in_use(self) -> None:
        """Eviction skips users whose scopes are open."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=1)
        async with registry.open_scope(ctx("a")):
            held = await ambient.resolve(Tracked)
            async with registry.open_scope(ctx("b"), allow_switch=True):
                await ambient.resolve(Tracked)
            assert "a" not in cleaned
            assert await ambient.resolve(Tracked) is held
        await registry.aclose()
        assert sorted(cleaned) == ["a", "b"]

    async def test_a_burst_of_users_past_max_users_shrinks_back_as_their_scopes_close(
        self,
    ) -> None:
        """50 users at once with max_users=10: none can be evicted while in use, but once
        their scopes close the registry is back to 10 users, the least recently used
        cleaned, without waiting for another user to arrive (a burst used to leave all 50
        users' components, per-user pools and all, until then)."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=10, idle_ttl=3600)
        users = [f"user-{n}" for n in range(50)]

        def all_in_use() -> None:
            assert registry.stats().live_users == 50
            assert cleaned == []

        await burst(registry, [ctx(user) for user in users], all_in_use)
        stats = registry.stats()
        assert (stats.open_scopes, stats.live_users) == (0, 10)
        assert len(set(cleaned)) == len(cleaned) == 40
        await registry.aclose()
        assert sorted(cleaned) == sorted(users)  # each cleaned once

    async def test_a_burst_past_max_users_is_reported_once_not_once_per_user(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Two bursts of 30 users at once with max_users=10, a minute apart: each is one
        warning, not one per user admitted over the limit (a burst of thousands was
        thousands of lines)."""
        cleaned: list[str] = []
        clock = FakeClock()
        registry = user_registry(cleaned, clock=clock, max_users=10, idle_ttl=3600)

        with caplog.at_level("WARNING", logger="ambient"):
            await burst(registry, [ctx(f"first-{n}") for n in range(30)])
            assert registry.stats().live_users == 10
            clock.now += 60
            await burst(registry, [ctx(f"second-{n}") for n in range(30)])
        warnings = [r.getMessage() for r in caplog.records if "above max_users" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert all("above max_users=10" in warning for warning in warnings)
        await registry.aclose()

    async def test_a_registry_crossing_max_users_again_and_again_warns_once_a_minute(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Ten bursts of 12 users past max_users=10 within a minute, the registry back
        within the limit after each: one warning, not one per crossing; a burst after the
        minute is reported again."""
        cleaned: list[str] = []
        clock = FakeClock()
        registry = user_registry(cleaned, clock=clock, max_users=10, idle_ttl=3600)
        with caplog.at_level("WARNING", logger="ambient"):
            for round_ in range(10):
                await burst(registry, [ctx(f"r{round_}-{n}") for n in range(12)])
                assert registry.stats().live_users == 10
                clock.now += 5
            first = [r for r in caplog.records if "above max_users" in r.getMessage()]
            clock.now += 10
            await burst(registry, [ctx(f"late-{n}") for n in range(12)])
        warnings = [r for r in caplog.records if "above max_users" in r.getMessage()]
        assert len(first) == 1, [r.getMessage() for r in first]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
        assert len(set(cleaned)) == len(cleaned) == 11 * 12 - 10
        await registry.aclose()

    async def test_a_burst_past_max_users_walks_no_user_list_per_request(self) -> None:
        """300 users at once with max_users=100: admitting each user over the limit, and
        releasing each as its scope closes, looks at that user only. A walk over every
        user for each of them (under the registry's lock, on the event loop) made a
        burst quadratic: seconds of a blocked loop for a burst of thousands."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=100, idle_ttl=3600)
        registry._users = counted = _CountedUsers()
        users = [f"user-{n}" for n in range(300)]
        await burst(registry, [ctx(user) for user in users])
        assert registry.stats().live_users == 100
        assert len(set(cleaned)) == len(cleaned) == 200
        assert counted.walked <= len(users), counted.walked
        await registry.aclose()

    async def test_a_burst_just_after_an_eviction_walks_no_user_list_per_request(self) -> None:
        """max_users=1: bob's arrival evicts alice, the one idle user; a burst of 50 users
        after that finds no idle user to evict, and admitting or releasing each of them
        walks no list of users (the eviction left the registry counting alice as idle,
        and each of them walked every user looking for her)."""
        cleaned: list[str] = []
        registry = user_registry(cleaned, max_users=1, idle_ttl=3600)
        registry._users = counted = _CountedUsers()
        await use(registry, "alice")
        await use(registry, "bob")
        assert cleaned == ["alice"]
        walked = counted.walked
        users = [f"user-{n}" for n in range(50)]
        await burst(registry, [ctx(user) for user in users])
        assert counted.walked - walked <= len(users), counted.walked - walked
        assert registry.stats().live_users == 1
        await registry.aclose()

    async def test_a_burst_of_anonymous_users_past_max_users_leaves_the_next_burst_reported(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A burst of 30 anonymous users (whose USER components go as their scope closes)
        past max_users=10 is one warning; once they have gone the registry is back within
        the limit, so a later burst of signed-in users is reported again (the anonymous
        users left without the registry noticing, and every later burst went unreported)."""
        cleaned: list[str] = []
        clock = FakeClock()
        registry = user_registry(cleaned, clock=clock, max_users=10, idle_ttl=3600)
        anonymous = [
            UserExecutionContext.create(f"anonymous:{n}", metadata={ANONYMOUS: True})
            for n in range(30)
        ]
        with caplog.at_level("WARNING", logger="ambient"):
            await burst(registry, anonymous)
            assert registry.stats().live_users == 0
            clock.now += 60
            await burst(registry, [ctx(f"user-{n}") for n in range(30)])
        warnings = [r.getMessage() for r in caplog.records if "above max_users" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert len(cleaned) == 50  # the 30 anonymous users, and 20 users over the limit
        await registry.aclose()

    @pytest.mark.parametrize("leaving", ["anonymous", "signed in"])
    def test_a_user_leaving_the_registry_back_at_max_users_leaves_the_next_crossing_reported(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture, leaving: str
    ) -> None:
        """With max_users=2, alice, bob and a third user in use at once is one warning.
        Once the third has left (an anonymous caller cleaned as it goes, or a signed-in
        user evicted as the only idle one) the registry is at the limit, which is within
        it: carol arriving a minute later while alice and bob are still in use is reported
        again."""
        registry = Registry(clock=clock, max_users=2)
        with caplog.at_level("WARNING", logger="ambient"):
            registry.acquire_user(UserRef("alice"))
            registry.acquire_user(UserRef("bob"))
            third = registry.acquire_user(UserRef("third"), ephemeral=leaving == "anonymous")
            registry.release_user(third)
            assert registry.stats().live_users == 2
            clock.now += 60
            registry.acquire_user(UserRef("carol"))
        warnings = [r.getMessage() for r in caplog.records if "above max_users" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert "3 users hold USER components in open scopes, above max_users=2" in warnings[1]

    async def test_a_burst_past_max_users_after_a_restart_is_reported(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A registry closed (aclose()) while past max_users and started again reports
        the next burst past it: the close took every user, so the registry is within
        the limit again, not still "already reported"."""
        registry = Registry(clock=clock, max_users=1)
        with caplog.at_level("WARNING", logger="ambient"):
            registry.acquire_user(UserRef("alice"))
            registry.acquire_user(UserRef("bob"))
            await registry.aclose()
            async with registry.open_scope(ctx("carol")):  # the application started again
                clock.now += 60
                registry.acquire_user(UserRef("dave"))
                registry.acquire_user(UserRef("erin"))
        warnings = [r.getMessage() for r in caplog.records if "above max_users" in r.getMessage()]
        assert len(warnings) == 2, warnings
        await registry.aclose()

    async def test_aclose_closes_user_and_app_components(self) -> None:
        """registry.aclose() cleans every USER and APP component."""
        cleaned: list[str] = []
        registry = user_registry(cleaned)

        def app_component() -> Iterator[str]:
            yield "app"
            cleaned.append("app")

        registry.register("app", app_component, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Tracked)
            await ambient.resolve("app")
        await use(registry, "bob")
        await registry.aclose()
        # Users are cleaned side by side, then the app's components (theirs may use them).
        assert (sorted(cleaned[:2]), cleaned[2:]) == (["alice", "bob"], ["app"])
        stats = registry.stats()
        assert (stats.live_users, stats.created, stats.cleaned) == (0, 3, 3)


@contextlib.contextmanager
def _in_alices_trace() -> Iterator[otel_trace.Span]:
    """The OpenTelemetry context of alice's request: her server span and her baggage."""
    alices_request = otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(trace_id=7, span_id=8, is_remote=False)
    )
    token = otel_context.attach(
        baggage.set_baggage("tenant", "alice-corp", otel_trace.set_span_in_context(alices_request))
    )
    try:
        yield alices_request
    finally:
        otel_context.detach(token)


@pytest.mark.parametrize("how", ["idle expiry", "eviction"])
async def test_a_users_components_are_never_cleaned_as_another_user(
    clock: FakeClock, how: str
) -> None:
    """Bob's USER component is cleaned while Alice's request runs (it expires as her scope
    closes, or her arrival evicts him past max_users): its cleanup must not see Alice's
    context, nor her request's span and baggage, which its log records and spans would
    then carry (bob's cleanup span filed in alice's trace)."""
    seen: list[object] = []

    class Memory:
        def __init__(self, user: UserRef) -> None:
            self.user = user

        def close(self) -> None:
            span = otel_trace.get_current_span().get_span_context()
            seen.append((ambient.current_context_or_none(), span.is_valid, baggage.get_all()))

    registry = Registry(clock=clock, max_users=1 if how == "eviction" else 100)
    registry.register(Memory, Memory, lifetime=Lifetime.USER, idle_ttl=60)
    async with registry.open_scope(ctx("bob")):
        await ambient.resolve(Memory)
    with _in_alices_trace() as alices_request:
        async with registry.open_scope(ctx("alice")):
            if how == "eviction":
                await ambient.resolve(Memory)  # alice's entry pushes bob's out
            else:
                clock.now += 120  # bob's expires when alice's scope closes
        assert otel_trace.get_current_span() is alices_request
    assert seen == [(None, False, {})]
    await registry.aclose()


async def test_app_components_closed_inside_a_request_are_not_cleaned_as_its_user() -> None:
    """``registry.aclose()`` awaited inside alice's request (a test's teardown, an app that
    shuts down from a handler): the APP components' cleanups see no user, span or baggage
    of hers, as USER components cleaned there do not."""
    seen: list[object] = []

    class Pool:
        def close(self) -> None:
            span = otel_trace.get_current_span().get_span_context()
            seen.append((ambient.current_context_or_none(), span.is_valid, baggage.get_all()))

    registry = Registry()
    registry.register(Pool, Pool, lifetime=Lifetime.APP)
    with _in_alices_trace() as alices_request:
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Pool)
            await registry.aclose()
            assert ambient.get_current_context().user_id == "alice"
            assert otel_trace.get_current_span() is alices_request
    assert seen == [(None, False, {})]


@pytest.mark.parametrize("how", ["idle expiry", "aclose"])
async def test_a_scope_observer_sees_the_user_components_it_saw_made_cleaned(
    clock: FakeClock, how: str
) -> None:
    """The middleware hands its telemetry to each scope rather than to the registry: that
    observer saw USER and APP components made, so it must see them cleaned, which happens
    outside any scope (expiry, aclose). Its live-components gauge stayed up otherwise."""
    events: list[tuple[str, str]] = []

    class Watch(ambient.Observer):
        def component_created(self, event: ambient.ComponentEvent) -> None:
            events.append(("created", str(event.key)))

        def component_cleaned(self, event: ambient.ComponentEvent) -> None:
            events.append(("cleaned", str(event.key)))

    watch = Watch()
    cleaned: list[str] = []
    registry = user_registry(cleaned, clock=clock)
    registry.register("app", object, lifetime=Lifetime.APP)
    async with registry.open_scope(ctx("bob"), observer=watch):
        await ambient.resolve(Tracked)
        await ambient.resolve("app")
    if how == "idle expiry":
        clock.now += 120
        async with registry.open_scope(ctx("carol")):  # no observer of its own
            pass
        assert sorted(events) == sorted(
            [("cleaned", str(Tracked)), ("created", "app"), ("created", str(Tracked))]
        )
    await registry.aclose()
    made = [("created", "app"), ("created", str(Tracked))]
    assert sorted(events) == sorted([*made, ("cleaned", "app"), ("cleaned", str(Tracked))])


async def test_scope_observers_taking_turns_each_see_a_cleanup_once() -> None:
    """Scopes opened in turn with two observers (two middlewares' telemetries, say) make
    each of them seen once by the registry: each is told of the APP component's cleanup
    once, not once per scope it was given to."""
    events: list[str] = []

    class Named(ambient.Observer):
        def __init__(self, name: str) -> None:
            self.name = name

        def component_cleaned(self, event: ambient.ComponentEvent) -> None:
            events.append(f"{self.name} saw {event.key} cleaned")

    first, second = Named("first"), Named("second")
    registry = Registry()
    registry.register("app", object, lifetime=Lifetime.APP)
    for observer in (first, second, first, second, first):
        async with registry.open_scope(ctx("bob"), observer=observer):
            await ambient.resolve("app")
    await registry.aclose()
    assert sorted(events) == ["first saw app cleaned", "second saw app cleaned"]


async def test_a_scope_observer_no_longer_active_is_not_told_of_later_cleanups() -> None:
    """A scope's observer that saw USER and APP components made but is inactive by the
    time they are cleaned (its telemetry was switched off) is told nothing of it, as
    an inactive observer is left out of every scope."""
    events: list[str] = []

    class Switchable(ambient.Observer):
        on = True

        @property
        def active(self) -> bool:
            return self.on

        def component_created(self, event: ambient.ComponentEvent) -> None:
            events.append(f"created {event.key}")

        def component_cleaned(self, event: ambient.ComponentEvent) -> None:
            events.append(f"cleaned {event.key}")

    watch = Switchable()
    registry = user_registry([])
    registry.register("app", object, lifetime=Lifetime.APP)
    async with registry.open_scope(ctx("bob"), observer=watch):
        await ambient.resolve("app")
    watch.on = False
    await registry.aclose()
    assert events == ["created app"]


async def test_a_scope_observer_that_cannot_be_weakly_held_sees_cleanups_too() -> None:
    """A scope's observer whose class cannot be weakly referred to (``__slots__``
    without ``__weakref__``) is kept by the registry, once however many scopes it watched,
    and sees the USER and APP components it saw made cleaned outside any scope, once each,
    as one weakly held does."""
    events: list[str] = []

    class Slotted:
        __slots__ = ("events",)
        active = True
        inactive_until = None

        def __init__(self, events: list[str]) -> None:
            self.events = events

        def scope_opened(self, scope: Scope) -> None:
            pass

        def scope_closed(self, scope: Scope, failures: tuple[BaseException, ...]) -> None:
            pass

        def component_created(self, event: ambient.ComponentEvent) -> None:
            self.events.append(f"created {event.key}")

        def component_cleaned(self, event: ambient.ComponentEvent) -> None:
            self.events.append(f"cleaned {event.key}")

    watch: Any = Slotted(events)
    with pytest.raises(TypeError):
        weakref.ref(watch)
    cleaned: list[str] = []
    registry = user_registry(cleaned)
    registry.register("app", object, lifetime=Lifetime.APP)
    async with registry.open_scope(ctx("bob"), observer=watch):
        await ambient.resolve("app")
    async with registry.open_scope(ctx("dave"), observer=Slotted([])):
        await ambient.resolve("app")
    async with registry.open_scope(ctx("carol"), observer=watch):
        await ambient.resolve(Tracked)
    await registry.aclose()
    assert events == ["created app", f"created {Tracked}", f"cleaned {Tracked}", "cleaned app"]
    assert cleaned == ["carol"]


async def test_scope_observers_the_application_dropped_are_not_kept_by_the_registry(
    clock: FakeClock,
) -> None:
    """1,000 scopes, each opened with an observer of its own that saw a USER component
    made and was then dropped: the registry keeps none of them (it held every one, with
    all it had collected, for as long as it lived, and told each of every later cleanup).
    One still held by its owner, as the middleware holds its telemetry, still sees the
    components it saw made cleaned."""

    cleaned: list[str] = []
    registry = user_registry(cleaned, clock=clock)
    dropped: list[weakref.ref[ComponentEvents]] = []
    for n in range(1_000):
        collect = ComponentEvents()
        async with registry.open_scope(ctx(f"user-{n}"), observer=collect):
            await ambient.resolve(Tracked)
        dropped.append(weakref.ref(collect))
    kept = ComponentEvents()
    async with registry.open_scope(ctx("bob"), observer=kept):
        await ambient.resolve(Tracked)
    del collect
    gc.collect()
    assert [ref for ref in dropped if ref() is not None] == []
    clock.now += 120
    async with registry.open_scope(ctx("carol")):  # expiry runs here, outside bob's scope
        pass
    assert UserRef("bob") in [event.user for event in kept.events[1:] if event.cleanup_ran]
    assert len(cleaned) == 1_001


def test_scope_observers_noted_from_another_thread_never_break_a_cleanup() -> None:
    """Scopes opened with observers of their own in a second thread (its own event loop)
    while this one collects who sees a cleanup (expiry, ``aclose()``): the collection
    never fails with "Set changed size during iteration", which left a user's components
    uncleaned."""

    class Watch(ambient.Observer):
        pass

    registry = Registry()
    held = [Watch() for _ in range(2_000)]
    for watch in held:
        registry.scope_observers(watch)
    stop = threading.Event()

    def note_more() -> None:
        while not stop.is_set():
            watch = Watch()
            held.append(watch)
            registry.scope_observers(watch)

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    noter = threading.Thread(target=note_more)
    noter.start()
    try:
        for _ in range(300):
            seen = registry._cleanup_observers()
            assert len(seen) >= 2_000
    finally:
        stop.set()
        noter.join()
        sys.setswitchinterval(switching)


class TestAppLifetime:
    async def test_created_once_lazily(self) -> None:
        """An APP component is created on first use and shared by every scope and user."""
        calls = 0

        def make() -> object:
            nonlocal calls
            calls += 1
            return object()

        registry = Registry()
        registry.register("app", make, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            assert calls == 0
            one = await ambient.resolve("app")
        async with registry.open_scope(ctx("bob")):
            two = ambient.resolve_sync("app")
        assert one is two
        assert calls == 1
        await registry.aclose()

    async def test_registry_usable_after_aclose(self) -> None:
        """After aclose (a shutdown), a new start creates components afresh."""
        registry = Registry()
        registry.register("app", object, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            one = await ambient.resolve("app")
        await registry.aclose()
        async with registry.open_scope(ctx("alice")):
            two = await ambient.resolve("app")
        assert one is not two
        await registry.aclose()

    async def test_aclose_called_again_once_ended_cleans_nothing_twice(self) -> None:
        """A second aclose() after the first has ended (a server's shutdown, then a test's
        teardown) finds nothing left to clean: each USER and APP component's cleanup ran
        once, and is counted once."""
        cleaned: list[str] = []

        class Pool:
            def close(self) -> None:
                cleaned.append("pool")

        registry = user_registry(cleaned)
        registry.register(Pool, Pool, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Pool)
            await ambient.resolve(Tracked)
        await registry.aclose()
        await registry.aclose()
        assert sorted(cleaned) == ["alice", "pool"]
        stats = registry.stats()
        assert (stats.created, stats.cleaned, stats.cleanup_failures) == (2, 2, 0)

    async def test_an_anonymous_scope_open_across_aclose_closes_cleanly(self) -> None:
        """An anonymous request's scope is open when the registry closes (a shutdown): its
        user's entry is no longer the registry's when the scope releases it, and nothing
        of the registry's is touched then (it raised KeyError from the scope's close)."""
        cleaned: list[str] = []
        registry = user_registry(cleaned)
        anonymous = UserExecutionContext.create("anonymous:1", metadata={ANONYMOUS: True})
        async with registry.open_scope(anonymous):
            await ambient.resolve(Tracked)
            await registry.aclose()
            assert cleaned == ["anonymous:1"]
        assert cleaned == ["anonymous:1"]
        stats = registry.stats()
        assert (stats.open_scopes, stats.live_users, stats.cleanup_failures) == (0, 0, 0)

    async def test_a_scope_open_across_aclose_keeps_only_its_request_components(
        self,
    ) -> None:
        """aclose() while a scope is still open (a websocket at shutdown): the USER and APP
        components it cleaned are never handed out again from that scope's cache, nor made
        afresh (nothing would clean them after shutdown): resolving them raises
        ScopeClosedError. Its REQUEST components stay."""
        cleaned: list[str] = []
        registry = user_registry(cleaned)
        registry.register("app", lambda: Tracked(UserRef("app"), cleaned), lifetime=Lifetime.APP)
        registry.register("request", object)
        async with registry.open_scope(ctx("alice")) as scope:
            await ambient.resolve(Tracked)
            await ambient.resolve("app")
            request = await ambient.resolve("request")
            await registry.aclose()
            assert sorted(cleaned) == ["alice", "app"]
            with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
                await ambient.resolve(Tracked)
            with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
                scope.resolve_sync("app")
            assert await ambient.resolve("request") is request
        assert sorted(cleaned) == ["alice", "app"]
        assert registry._sharing == set()
        assert registry.stats().live_users == 0


async def test_every_shutdown_waiting_for_open_scopes_ends_when_they_close() -> None:
    """Several shutdowns sharing a registry wait for its open scopes at once, and one of
    them gives up early. Each returns as soon as the last scope closes: each waiter
    replaced the one event they wait for, and one that gave up dropped it, leaving the
    others to wait out the whole cleanup_timeout."""
    registry = Registry(cleanup_timeout=60)
    request_done = anyio.Event()
    still_open: list[int] = []

    async def request() -> None:
        async with registry.open_scope(ctx("alice")):
            await request_done.wait()

    async def shutdown() -> None:
        still_open.append(await registry.wait_for_scopes())

    impatient = anyio.CancelScope()

    async def give_up_early() -> None:
        with impatient:
            await registry.wait_for_scopes()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(shutdown)
            tg.start_soon(give_up_early)
            tg.start_soon(shutdown)
            await anyio.wait_all_tasks_blocked()
            impatient.cancel()
            await anyio.wait_all_tasks_blocked()
            request_done.set()
    assert still_open == [0, 0]


class TestAcloseUnderWay:
    """``registry.aclose()`` called again while a close is under way (two servers sharing
    a registry, a shutdown racing a test's teardown)."""

    @staticmethod
    def slow_registry(closing: anyio.Event, release: anyio.Event) -> Registry:
        registry = Registry()
        registry.register(
            Conn, lambda user: Conn(user.user_id, closing, release), lifetime=Lifetime.USER
        )
        registry.register("app", lambda: Conn("app", anyio.Event(), release), lifetime=Lifetime.APP)
        return registry

    @pytest.mark.parametrize("later", [1, 3])
    async def test_a_second_aclose_returns_once_the_first_has_cleaned_everything(
        self, later: int
    ) -> None:
        """The second call (and each later one meanwhile, sharing its wait) returns only
        when the USER and APP components are cleaned, each once: it used to return at
        once, with both still alive, to a caller that then checked (or a server that then
        exited)."""
        closing, release = anyio.Event(), anyio.Event()
        registry = self.slow_registry(closing, release)
        async with registry.open_scope(ctx("alice")):
            user, app = await ambient.resolve(Conn), await ambient.resolve("app")
        seen: list[tuple[bool, bool]] = []

        async def second() -> None:
            await registry.aclose()
            seen.append((user.closed, app.closed))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(registry.aclose)
                await closing.wait()
                for _ in range(later):
                    tg.start_soon(second)
                await anyio.wait_all_tasks_blocked()
                assert seen == []
                release.set()
        assert seen == [(True, True)] * later
        stats = registry.stats()
        assert (stats.created, stats.cleaned) == (2, 2)
        await registry.aclose()  # a later call closes again (nothing left), at once

    async def test_a_second_aclose_raises_the_failures_of_the_close_it_waited_for(self) -> None:
        """When the close under way fails, each call made meanwhile raises its failures as
        a CleanupError too: it waited for that close, and the components it failed to
        clean are not clean. The cleanup itself ran once."""
        closing, release = anyio.Event(), anyio.Event()
        reset = ConnectionResetError("connection reset")

        class Failing:
            async def aclose(self) -> None:
                closing.set()
                await release.wait()
                raise reset

        registry = Registry()
        registry.register(Failing, Failing, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Failing)
        raised: list[ambient.errors.CleanupError] = []

        async def close() -> None:
            try:
                await registry.aclose()
            except ambient.errors.CleanupError as exc:
                raised.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(close)
                await closing.wait()
                tg.start_soon(close)
                await anyio.wait_all_tasks_blocked()
                release.set()
        assert [exc.exceptions for exc in raised] == [(reset,), (reset,)]
        assert registry.stats().cleanup_failures == 1

    async def test_an_aclose_on_another_event_loop_waits_for_the_close_under_way(
        self, anyio_backend: str
    ) -> None:
        """A second server on an event loop of its own, in another thread, closes the
        registry while this loop's close runs: its call returns once the components are
        cleaned (an event of this loop could not wake it there)."""
        closing, release = anyio.Event(), anyio.Event()
        registry = self.slow_registry(closing, release)
        async with registry.open_scope(ctx("alice")):
            user, app = await ambient.resolve(Conn), await ambient.resolve("app")
        waiting = threading.Event()
        seen: list[tuple[bool, bool]] = []

        async def other_server() -> None:
            async with anyio.create_task_group() as tg:

                async def close() -> None:
                    await registry.aclose()
                    seen.append((user.closed, app.closed))

                tg.start_soon(close)
                await anyio.wait_all_tasks_blocked()
                waiting.set()

        other = threading.Thread(
            target=anyio.run, args=(other_server,), kwargs={"backend": anyio_backend}
        )
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(registry.aclose)
                await closing.wait()
                other.start()
                await anyio.to_thread.run_sync(waiting.wait)
                assert seen == []
                release.set()
            await anyio.to_thread.run_sync(other.join)
        assert seen == [(True, True)]

    async def test_an_aclose_waiting_for_a_stuck_loop_gives_up_after_cleanup_timeout(
        self, anyio_backend: str
    ) -> None:
        """The close under way runs on another event loop, blocked by a sync cleanup: a
        call on this loop raises RegistryError once a whole ``cleanup_timeout`` went by
        with no cleanup ending, instead of waiting for good (or returning at once)."""
        cleaning, release = threading.Event(), threading.Event()

        class Stuck:
            def close(self) -> None:
                cleaning.set()
                release.wait(10)

        registry = Registry(cleanup_timeout=0.2)
        registry.register(Stuck, Stuck, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(Stuck)
        other = threading.Thread(
            target=anyio.run, args=(registry.aclose,), kwargs={"backend": anyio_backend}
        )
        other.start()
        try:
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(cleaning.wait)
                with pytest.raises(ambient.errors.RegistryError, match="another event loop"):
                    await registry.aclose()
        finally:
            release.set()
            await anyio.to_thread.run_sync(other.join)
        assert registry.stats().cleaned == 1
        await registry.aclose()

    async def test_an_aclose_waiting_for_a_loop_still_cleaning_waits_past_cleanup_timeout(
        self, anyio_backend: str
    ) -> None:
        """The close under way on another event loop takes longer than a
        ``cleanup_timeout`` in all, each of its cleanups well within it: a call on this loop
        waits for its end as long as cleanups keep ending there, and returns with every
        component cleaned (not a RegistryError after the first ``cleanup_timeout``)."""
        timeout = 1.0
        started = threading.Event()
        cleaned: list[str] = []

        def slow(name: str) -> Iterator[str]:
            yield name
            started.set()
            threading.Event().wait(timeout / 4)
            cleaned.append(name)

        names = [f"pool-{i}" for i in range(6)]
        registry = Registry(cleanup_timeout=timeout)
        for name in names:
            registry.register(name, partial(slow, name), lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            for name in names:
                await ambient.resolve(name)
        other = threading.Thread(
            target=anyio.run, args=(registry.aclose,), kwargs={"backend": anyio_backend}
        )
        other.start()
        try:
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(started.wait)
                await registry.aclose()
                assert sorted(cleaned) == names
        finally:
            await anyio.to_thread.run_sync(other.join)
        assert registry.stats().cleanup_failures == 0


class TestAbnormalExits:
    async def test_refcounts_return_to_zero_after_cancellations_and_errors(
        self, clock: FakeClock
    ) -> None:
        """1,000 requests of 10 users, 30% cancelled at random points and 10% raising:
        afterwards no scope is open, every user entry is idle (its USER component expires
        after its idle_ttl, before any shutdown), and every component was created and
        cleaned the same number of times (none used after cleanup)."""
        import random

        from anyio.lowlevel import checkpoint

        rng = random.Random(1234)
        live: set[int] = set()
        used_after_close: list[str] = []

        class Session:
            def __init__(self, user: UserRef) -> None:
                self.user = user
                self.open = True
                live.add(id(self))

            async def aclose(self) -> None:
                await checkpoint()
                self.open = False
                live.discard(id(self))

        class Step:
            def __init__(self) -> None:
                self.open = True

            def close(self) -> None:
                self.open = False

        registry = Registry(clock=clock)
        registry.register(Session, Session, lifetime=Lifetime.USER, idle_ttl=60)
        registry.register(Step, Step)

        async def request(
            n: int, cancel_at: int | None, fail: bool, cancel_scope: anyio.CancelScope
        ) -> None:
            async with registry.open_scope(ctx(f"user-{n % 10}")):
                for step in range(6):
                    if step == cancel_at:
                        cancel_scope.cancel()
                        await checkpoint()
                    session = await ambient.resolve(Session)
                    part = await ambient.resolve(Step)
                    if not (session.open and part.open):
                        used_after_close.append(f"request {n}")
                    await checkpoint()
                if fail:
                    raise ValueError("handler failed")

        async def guarded(n: int) -> None:
            roll = rng.random()
            cancel_at = rng.randrange(6) if roll < 0.3 else None
            fail = 0.3 <= roll < 0.4
            with anyio.CancelScope() as cancel_scope:
                try:
                    await request(n, cancel_at, fail, cancel_scope)
                except ValueError:
                    cancelled_or_failed.append(n)
            if cancel_scope.cancelled_caught:
                cancelled_or_failed.append(n)

        cancelled_or_failed: list[int] = []
        async with anyio.create_task_group() as tg:
            for n in range(1000):
                tg.start_soon(guarded, n)
        assert 300 < len(cancelled_or_failed) < 500
        stats = registry.stats()
        assert used_after_close == []
        assert stats.open_scopes == 0
        assert stats.live_users == 10
        # A reference left behind by an abnormal exit would keep its user's entry in use:
        # never idle, never expired. Checked before shutdown, which closes entries anyway.
        assert [entry.refs for entry in registry._users.values()] == [0] * 10
        clock.now += 61
        await registry.sweep()
        stats = registry.stats()
        assert stats.live_users == 0
        assert stats.created == stats.cleaned
        assert live == set()


class Conn:
    """A USER or APP component whose close awaits (a network round trip)."""

    def __init__(self, owner: str, closing: anyio.Event, release: anyio.Event) -> None:
        self.owner = owner
        self.closed = False
        self._closing = closing
        self._release = release

    async def aclose(self) -> None:
        self._closing.set()
        await self._release.wait()
        self.closed = True


@pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
async def test_a_component_resolved_while_aclose_runs_is_refused(lifetime: Lifetime) -> None:
    """``registry.aclose()`` (shutdown) awaits an idle user's cleanup while a request still
    runs and resolves a USER or APP component: it gets ScopeClosedError. It used to get the
    old one, from a store aclose() had not closed yet, and keep it after aclose() had
    cleaned it under the request (and later a fresh one, which nothing cleaned)."""
    closing, release = anyio.Event(), anyio.Event()
    never = anyio.Event()
    registry = Registry()
    registry.register(
        "slow", lambda user: Conn(f"slow {user.user_id}", closing, release), lifetime=Lifetime.USER
    )
    if lifetime is Lifetime.USER:
        registry.register(Conn, lambda user: Conn(user.user_id, never, never), lifetime=lifetime)
    else:
        registry.register(Conn, lambda: Conn("app", never, never), lifetime=lifetime)
    async with registry.open_scope(ctx("idle")):
        await ambient.resolve("slow")
    async with registry.open_scope(ctx("alice")):
        before = await ambient.resolve(Conn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(registry.aclose)
            await closing.wait()  # aclose() waits on the idle user's cleanup
            with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
                await ambient.resolve(Conn)
            never.set()
            release.set()
        with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
            await ambient.resolve(Conn)
        assert before.closed
    stats = registry.stats()
    assert (stats.created, stats.cleaned) == (2, 2)


async def test_a_creation_in_flight_when_aclose_runs_is_cleaned_and_refused() -> None:
    """A USER component still being made when ``registry.aclose()`` closes its user's store:
    the one made is cleaned, and the open scope's resolve fails with ScopeClosedError
    saying the registry was closed at shutdown (not "the user it belongs to has closed"),
    instead of making one afresh that nothing would clean."""
    started, proceed = anyio.Event(), anyio.Event()
    made: list[Conn] = []
    never = anyio.Event()

    async def make(user: UserRef) -> Conn:
        started.set()
        await proceed.wait()
        conn = Conn(user.user_id, anyio.Event(), never)
        made.append(conn)
        return conn

    registry = Registry()
    registry.register(Conn, make, lifetime=Lifetime.USER)
    got: list[Conn] = []

    async def resolve() -> None:
        got.append(await ambient.resolve(Conn))

    never.set()  # cleanups finish at once
    async with registry.open_scope(ctx("alice")):
        with pytest.raises(ExceptionGroup) as raised:
            async with anyio.create_task_group() as tg:
                tg.start_soon(resolve)
                await started.wait()
                await registry.aclose()
                proceed.set()
        assert raised.group_contains(ambient.errors.ScopeClosedError, match="closed at shutdown")
        assert got == []
        assert len(made) == 1
        assert made[0].closed


class SlowReturns:
    """A registry whose USER "connection" (idle after a second) goes back to an APP pool
    slowly when its user's cleanup runs: ``returning[user]`` is set as it starts back,
    and it then waits for ``returned[user]``. ``order`` notes each return (to the pool,
    or to a closed one), the pool's close and, through :meth:`shutdown`, aclose()
    returning."""

    def __init__(self, clock: FakeClock, *users: str) -> None:
        self.registry = registry = Registry(clock=clock)
        self.order: list[str] = []
        self.returning = {user: anyio.Event() for user in users}
        self.returned = {user: anyio.Event() for user in users}
        self.done: defaultdict[str, anyio.Event] = defaultdict(anyio.Event)
        order, returning, returned = self.order, self.returning, self.returned

        class Pool:
            closed = False

            async def aclose(self) -> None:
                order.append("pool closed")
                self.closed = True

        async def connection(user: UserRef) -> AsyncIterator[str]:
            pool = await ambient.resolve(Pool)
            yield f"connection of {user.user_id}"
            returning[user.user_id].set()
            await returned[user.user_id].wait()
            where = "a closed pool" if pool.closed else "the pool"
            order.append(f"{user.user_id}'s returned to {where}")

        registry.register(Pool, Pool, lifetime=Lifetime.APP)
        registry.register("connection", connection, lifetime=Lifetime.USER, idle_ttl=1)

    async def take(self, user: str) -> None:
        """``user`` takes a connection in a scope of theirs, idle from then on."""
        async with self.registry.open_scope(ctx(user)):
            await ambient.resolve("connection")

    async def request(self, user: str) -> None:
        """A request of ``user``'s, which runs the cleanups due; ``done[user]`` once out."""
        async with self.registry.open_scope(ctx(user)):
            pass
        self.done[user].set()

    async def shutdown(self) -> None:
        await self.registry.aclose()
        self.order.append("aclose returned")


async def test_aclose_cleans_the_app_after_a_users_cleanup_already_under_way(
    clock: FakeClock,
) -> None:
    """A request that comes along just before shutdown runs an idle user's expiry: that
    user's connection goes back to the APP pool, slowly. ``registry.aclose()`` meanwhile
    waits for it before closing the pool: it used to close the pool at once, and return,
    with the connection still to go back (into a closed pool)."""
    app = SlowReturns(clock, "alice")
    await app.take("alice")
    clock.now += 5

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.request, "bob")
            await app.returning["alice"].wait()
            tg.start_soon(app.shutdown)
            await anyio.wait_all_tasks_blocked()
            app.returned["alice"].set()
    assert app.order == ["alice's returned to the pool", "pool closed", "aclose returned"]


async def test_aclose_cleans_the_app_after_every_users_cleanup_already_under_way(
    clock: FakeClock,
) -> None:
    """Two requests just before shutdown each run an idle user's expiry, alice's and then
    dave's, each connection going back to the APP pool slowly. ``registry.aclose()``
    closes the pool only once both are back: dave's coming back first does not let it
    close the pool with alice's still on its way."""
    app = SlowReturns(clock, "alice", "dave")
    with anyio.fail_after(10):
        await app.take("alice")
        clock.now += 5
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.request, "bob")  # runs alice's expiry
            await app.returning["alice"].wait()
            await app.take("dave")
            clock.now += 5
            tg.start_soon(app.request, "carol")  # runs dave's expiry
            await app.returning["dave"].wait()
            tg.start_soon(app.shutdown)
            await anyio.wait_all_tasks_blocked()
            app.returned["dave"].set()
            await app.done["carol"].wait()  # dave's cleanup has ended
            await anyio.wait_all_tasks_blocked()
            assert app.order == ["dave's returned to the pool"]
            app.returned["alice"].set()
    assert app.order == [
        "dave's returned to the pool",
        "alice's returned to the pool",
        "pool closed",
        "aclose returned",
    ]


class _Closable:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
async def test_a_component_a_worker_thread_gets_as_aclose_cleans_it_is_not_kept(
    lifetime: Lifetime,
) -> None:
    """A worker thread of a request still open at shutdown (a websocket's) makes a USER or
    APP component, and ``registry.aclose()`` on the event loop cleans it just before the
    thread caches it in the scope (paused here, by an observer, in between). The thread and
    the scope's later resolutions get ScopeClosedError: the scope used to keep the cleaned
    one cached, and hand it out for the rest of the request."""
    stored, go_on = threading.Event(), threading.Event()

    class PauseTheThread(Observer):
        def component_created(self, event: ComponentEvent) -> None:
            if event.key is _Closable and threading.current_thread() is not loop_thread:
                stored.set()
                go_on.wait(10)

    loop_thread = threading.current_thread()
    registry = Registry(telemetry=PauseTheThread())
    registry.register(_Closable, _Closable, lifetime=lifetime)
    refused: list[Exception] = []
    with anyio.fail_after(10):
        async with registry.open_scope(ctx("alice")) as scope:

            def in_thread() -> None:
                try:
                    scope.resolve_sync(_Closable)
                except ambient.errors.ScopeClosedError as exc:
                    refused.append(exc)

            # A daemon thread, waited for within a bound: a resolve_sync() that never
            # returns (retrying for good) fails the test instead of hanging the run.
            thread = threading.Thread(target=in_thread, daemon=True)
            thread.start()
            try:
                assert await anyio.to_thread.run_sync(stored.wait, 5), "the thread made nothing"
                await registry.aclose()
            finally:
                go_on.set()
            await anyio.to_thread.run_sync(thread.join, 5)
            assert not thread.is_alive(), "resolve_sync() did not return within 5 s"
            assert len(refused) == 1
            with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
                await ambient.resolve(_Closable)
    stats = registry.stats()
    assert (stats.created, stats.cleaned) == (1, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("users", [1, 3])
@pytest.mark.parametrize("how", ["idle expiry", "aclose"])
async def test_a_native_cancellation_during_other_users_cleanups_leaves_none_behind(
    clock: FakeClock, how: str, users: int
) -> None:
    """``asyncio.timeout`` around a request (a native cancellation, which anyio's shield does
    not hold back) arrives while its scope cleans other users' expired components, or while
    shutdown cleans them: every user's cleanups still run to their end, and the
    cancellation is raised after them. They were already taken out of the registry, so the
    users after the one being cleaned used to be left uncleaned for good."""
    in_cleanup, go_on = anyio.Event(), anyio.Event()
    cleaned: list[str] = []

    class Held:
        def __init__(self, user: UserRef) -> None:
            self.user = user.user_id

        async def aclose(self) -> None:
            if self.user == "u0":
                in_cleanup.set()
                await go_on.wait()
            cleaned.append(self.user)

    registry = Registry(clock=clock)
    registry.register(Held, Held, lifetime=Lifetime.USER, idle_ttl=60)
    for n in range(users):
        async with registry.open_scope(ctx(f"u{n}")):
            await ambient.resolve(Held)
    clock.now += 120

    async def request() -> None:
        if how == "aclose":
            await registry.aclose()
            return
        async with registry.open_scope(ctx("bob")):
            pass  # the idle users expire as bob's scope closes

    task = asyncio.ensure_future(request())
    await in_cleanup.wait()
    task.cancel()
    await anyio.wait_all_tasks_blocked()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    everyone = [f"u{n}" for n in range(users)]
    assert sorted(cleaned) == everyone
    await registry.aclose()
    assert sorted(cleaned) == everyone
    assert registry.stats().live_users == 0


@pytest.mark.parametrize("how", ["idle expiry", "aclose"])
async def test_users_are_cleaned_side_by_side_not_one_after_another(
    clock: FakeClock, how: str
) -> None:
    """Four users' USER components whose cleanups each wait for the others to have started
    (a close that needs a slow remote end): cleaned one user after another, the first
    waited out its whole cleanup_timeout, and so did every later one; a request that
    happened to expire them, or the shutdown, waited N times cleanup_timeout."""
    users = 4
    started: list[str] = []
    all_started = anyio.Event()
    timed_out: list[str] = []

    class Remote:
        def __init__(self, user: UserRef) -> None:
            self.user = user.user_id

        async def aclose(self) -> None:
            started.append(self.user)
            if len(started) == users:
                all_started.set()
            try:
                await all_started.wait()
            except anyio.get_cancelled_exc_class():
                timed_out.append(self.user)
                raise

    registry = Registry(clock=clock, cleanup_timeout=2)
    registry.register(Remote, Remote, lifetime=Lifetime.USER, idle_ttl=60)
    for n in range(users):
        async with registry.open_scope(ctx(f"u{n}")):
            await ambient.resolve(Remote)
    clock.now += 120
    with anyio.fail_after(10):
        if how == "aclose":
            await registry.aclose()
        else:
            async with registry.open_scope(ctx("bob")):
                pass
    assert timed_out == []
    assert sorted(started) == [f"u{n}" for n in range(users)]
    assert registry.stats().cleanup_failures == 0


def parts_noting(cleaned: list[str]) -> Any:
    """A component class whose instances hold the parts they were made with and note
    their name in ``cleaned`` as they close; closing one after a part it holds fails."""

    class Part:
        def __init__(self, name: str, *held: Part) -> None:
            self.name = name
            self.held = held
            self.closed = False

        def close(self) -> None:
            assert not any(part.closed for part in self.held), f"{self.name} outlived a part"
            self.closed = True
            cleaned.append(self.name)

    return Part


async def test_what_a_user_component_was_made_with_never_expires_before_it(
    clock: FakeClock,
) -> None:
    """``Agent`` (idle_ttl 600) is made with a ``Session`` (idle_ttl 10) that holds a
    ``Token`` (idle_ttl 5): after 60 idle seconds the session and token used to be cleaned
    while the agent, kept, still held them; the next request got that agent with a closed
    session, and a second session beside it. What a factory resolved now lives as long as
    what it was made for, and goes after it."""
    cleaned: list[str] = []
    Part = parts_noting(cleaned)

    async def make_session() -> Part:
        return Part("session", await ambient.resolve("token"))

    async def make_agent() -> Part:
        return Part("agent", await ambient.resolve("session"))

    registry = Registry(clock=clock)
    registry.register("token", lambda: Part("token"), lifetime=Lifetime.USER, idle_ttl=5)
    registry.register("session", make_session, lifetime=Lifetime.USER, idle_ttl=10)
    registry.register("agent", make_agent, lifetime=Lifetime.USER, idle_ttl=600)
    registry.register("cache", lambda: Part("cache"), lifetime=Lifetime.USER, idle_ttl=10)
    async with registry.open_scope(ctx("alice")):
        agent = await ambient.resolve("agent")
        await ambient.resolve("cache")  # made by no factory: keeps its own ttl
    clock.now += 60
    async with registry.open_scope(ctx("alice")):
        again = await ambient.resolve("agent")
        session = await ambient.resolve("session")
    assert again is agent
    assert session is agent.held[0]
    assert not session.closed
    assert cleaned == ["cache"]
    clock.now += 700
    async with registry.open_scope(ctx("bob")):
        pass
    assert cleaned == ["cache", "agent", "session", "token"]
    await registry.aclose()


async def test_what_two_user_components_were_made_with_lives_as_long_as_the_longer_lived(
    clock: FakeClock,
) -> None:
    """A ``Client`` (idle_ttl 5) that both a ``Chat`` (idle_ttl 10), made first, and an
    ``Agent`` (idle_ttl 600) were made with: after 60 idle seconds the chat goes, and
    the client stays, as long as the agent holding it, whatever order they were made in."""
    cleaned: list[str] = []
    Part = parts_noting(cleaned)

    async def make_chat() -> Part:
        return Part("chat", await ambient.resolve("client"))

    async def make_agent() -> Part:
        return Part("agent", await ambient.resolve("client"))

    registry = Registry(clock=clock)
    registry.register("client", lambda: Part("client"), lifetime=Lifetime.USER, idle_ttl=5)
    registry.register("chat", make_chat, lifetime=Lifetime.USER, idle_ttl=10)
    registry.register("agent", make_agent, lifetime=Lifetime.USER, idle_ttl=600)
    async with registry.open_scope(ctx("alice")):
        chat = await ambient.resolve("chat")
        agent = await ambient.resolve("agent")
    clock.now += 60
    async with registry.open_scope(ctx("bob")):
        pass
    assert cleaned == ["chat"]
    async with registry.open_scope(ctx("alice")):
        assert await ambient.resolve("agent") is agent
        assert await ambient.resolve("client") is chat.held[0] is agent.held[0]
    assert not agent.held[0].closed
    clock.now += 601
    async with registry.open_scope(ctx("bob")):
        pass
    assert cleaned == ["chat", "agent", "client"]
    await registry.aclose()


async def _refused_in_its_factory(scope: Scope, key: str, how: str) -> str:
    """What ``NoActiveContextError`` says as ``key``'s factory runs, resolved in ``scope`` by
    ``ambient.resolve`` or, from a worker thread, by ``scope.resolve_sync``."""
    with pytest.raises(ambient.NoActiveContextError) as raised:
        if how == "resolve":
            await ambient.resolve(key)
        else:
            await anyio.to_thread.run_sync(scope.resolve_sync, key)
    return str(raised.value)


class TestWhatASharedFactorySees:
    """A USER or APP factory makes an object shared by many requests: no one request's
    context may be baked into it."""

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    async def test_get_current_context_in_a_shared_factory_raises(
        self, lifetime: Lifetime, how: str
    ) -> None:
        """``get_current_context()`` inside a USER or APP factory raises
        NoActiveContextError saying why and what to use instead, and nothing is made: it
        used to answer the context of whichever request happened to resolve it first, whose
        ids then stayed in the object every later request of the user (or of anyone) got."""

        def make() -> str:
            return ambient.get_current_context().request_id

        registry = Registry()
        registry.register("baked", make, lifetime=lifetime)
        async with registry.open_scope(ctx("alice")) as scope:
            message = await _refused_in_its_factory(scope, "baked", how)
        assert f"{lifetime.name} component 'baked'" in message
        assert "shared" in message
        if lifetime is Lifetime.USER:
            assert "UserRef" in message
        assert registry.stats().created == 0
        await registry.aclose()

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    async def test_a_shared_factory_sees_no_context_but_resolves_its_dependencies(
        self, lifetime: Lifetime
    ) -> None:
        """Inside a USER or APP factory, sync or async, ``current_context_or_none()`` is
        ``None`` (as in its cleanup), while ``ambient.resolve`` and ``resolve_sync`` still
        reach the components it depends on."""
        seen: list[object] = []

        def config() -> dict[str, str]:
            seen.append(ambient.current_context_or_none())
            return {"dsn": "db"}

        def sync_client() -> tuple[str, str]:
            seen.append(ambient.current_context_or_none())
            return ("sync", ambient.resolve_sync("config")["dsn"])

        async def async_client() -> tuple[str, str]:
            seen.append(ambient.current_context_or_none())
            return ("async", (await ambient.resolve("config"))["dsn"])

        registry = Registry()
        registry.register("config", config, lifetime=Lifetime.APP)
        registry.register("sync", sync_client, lifetime=lifetime)
        registry.register("async", async_client, lifetime=lifetime)
        async with registry.open_scope(ctx("alice")):
            assert await ambient.resolve("sync") == ("sync", "db")
            assert await ambient.resolve("async") == ("async", "db")
            assert ambient.get_current_context().user_id == "alice"  # the request's again
        assert seen == [None, None, None]
        await registry.aclose()

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    @pytest.mark.parametrize("binds", [False, True], ids=["as-called", "binding-its-user"])
    async def test_current_scope_in_a_shared_factory_raises(
        self, lifetime: Lifetime, how: str, binds: bool
    ) -> None:
        """``current_scope()`` inside a USER or APP factory raises NoActiveContextError, as
        ``get_current_context()`` does, also under a context the factory binds itself for
        its own work, and nothing is made. It used to answer the request's own scope,
        through which the factory took the request's context and a REQUEST component that
        ``ambient.resolve()`` refuses it: the user's next request got that request's ids
        and its connection, closed when that request ended."""
        made: list[object] = []

        def connection(context: UserExecutionContext) -> str:
            return f"connection of {context.request_id}"

        def make() -> tuple[str, str]:
            with ambient.bind_context(ctx("alice")) if binds else contextlib.nullcontext():
                scope = ambient.current_scope()
                made.append(scope)
                return scope.context.request_id, scope.resolve_sync("connection")

        registry = Registry()
        registry.register("connection", connection)
        registry.register("cache", make, lifetime=lifetime)
        async with registry.open_scope(ctx("alice")) as scope:
            message = await _refused_in_its_factory(scope, "cache", how)
            assert ambient.current_scope() is scope  # the request's own, outside the factory
        assert f"{lifetime.name} component 'cache'" in message
        assert made == []
        assert registry.stats().created == 0
        await registry.aclose()

    async def test_a_request_factory_still_gets_the_requests_context(self) -> None:
        """A REQUEST factory, also one a USER factory's caller resolves right after, sees
        the request's context, through ``get_current_context()`` as through its argument."""
        registry = Registry()
        registry.register("user", lambda user: user, lifetime=Lifetime.USER)
        registry.register(
            "request", lambda c: (c, ambient.get_current_context(), ambient.resolve_sync("user"))
        )
        context = ctx("alice")
        async with registry.open_scope(context):
            assert await ambient.resolve("request") == (context, context, UserRef("alice"))
        await registry.aclose()

    @pytest.mark.parametrize("how", ["bind_context", "open_scope"])
    async def test_a_user_factory_binding_another_user_needs_allow_switch(self, how: str) -> None:
        """alice's USER factory binds bob's context (or opens a scope for him): that is a
        switch to another user inside what is made for alice, refused with
        ContextSwitchError unless ``allow_switch=True``, as it was before the factory stopped
        showing the request's context (and as it is in the request itself). alice's own
        context, and any user's in an APP factory, are bound as before."""

        async def bind(context: UserExecutionContext, *, allow_switch: bool = False) -> str:
            if how == "bind_context":
                with ambient.bind_context(context, allow_switch=allow_switch):
                    return ambient.get_current_context().user_id
            scope = registry.open_scope(context, allow_switch=allow_switch)
            async with scope:
                return ambient.get_current_context().user_id

        async def refused(user: UserRef) -> str:
            return await bind(ctx("bob"))

        async def switched(user: UserRef) -> tuple[str, str]:
            return await bind(ctx("bob"), allow_switch=True), await bind(ctx(user.user_id))

        async def app() -> str:
            return await bind(ctx("bob"))

        registry = Registry()
        registry.register("refused", refused, lifetime=Lifetime.USER)
        registry.register("switched", switched, lifetime=Lifetime.USER)
        registry.register("app", app, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            with pytest.raises(ambient.errors.ContextSwitchError):
                await ambient.resolve("refused")
            assert await ambient.resolve("switched") == ("bob", "alice")
            assert await ambient.resolve("app") == "bob"
        await registry.aclose()

    async def test_a_shared_factory_s_task_sees_no_request_past_its_own_bindings_ended(
        self,
    ) -> None:
        """A USER factory binds its user's context, starts a task and binds a child inside
        it, then ends the two out of order. The task, reading the context once both have
        ended, sees what the factory sees: no context, no scope, and no REQUEST component
        to resolve. It saw the request's context, and resolved through the request's
        scope, past the factory's binding."""
        seen: list[object] = []

        async def factory(user: UserRef) -> str:
            mine = ctx(user.user_id)
            outer, inner = ambient.bind_context(mine), ambient.bind_context(mine.child("step"))
            ended = anyio.Event()

            async def work() -> None:
                await ended.wait()
                seen.append(ambient.current_context_or_none())
                with pytest.raises(ambient.errors.NoActiveContextError):
                    ambient.current_scope()
                with pytest.raises(
                    ambient.errors.ResolutionError, match="cannot depend on REQUEST"
                ):
                    await ambient.resolve("request")
                seen.append("refused")

            async with anyio.create_task_group() as tg:
                outer.__enter__()
                tg.start_soon(work)
                inner.__enter__()
                outer.__exit__(None, None, None)
                inner.__exit__(None, None, None)
                ended.set()
            return user.user_id

        registry = Registry()
        registry.register("request", lambda: "request's")
        registry.register("made", factory, lifetime=Lifetime.USER)
        with anyio.fail_after(10):
            async with registry.open_scope(ctx("alice")):
                assert await ambient.resolve("made") == "alice"
        assert seen == [None, "refused"]
        await registry.aclose()

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("how", ["task", "worker thread"])
    async def test_a_shared_component_refused_as_its_scope_ended_is_cleaned_with_no_context(
        self, lifetime: Lifetime, how: str
    ) -> None:
        """Work a request left running (a task, a worker thread) finishes making a USER or
        APP component once its store has closed (the user's last scope released it and it
        expired; the registry closed at shutdown): the component is refused and cleaned up
        at once with no context bound, as at any expiry or shutdown, not as the request
        that asked for it."""
        seen: list[UserExecutionContext | None] = []
        making, go = threading.Event(), threading.Event()

        class Shared:
            def close(self) -> None:
                seen.append(ambient.current_context_or_none())

        def make() -> Shared:
            making.set()
            go.wait(10)
            return Shared()

        async def amake() -> Shared:
            making.set()
            await anyio.to_thread.run_sync(go.wait, 10)
            return Shared()

        threaded = how == "worker thread"
        registry = Registry()
        registry.register(Shared, make if threaded else amake, lifetime=lifetime)

        async with anyio.create_task_group() as group:
            async with registry.open_scope(ctx("alice")) as scope:
                group.start_soon(_refused_as_closed, scope, Shared, threaded)
                await anyio.to_thread.run_sync(making.wait, 10)
            if lifetime is Lifetime.APP:
                await registry.aclose()
            go.set()
        assert seen == [None]
        stats = registry.stats()
        assert stats.created == stats.cleaned == 1
        await registry.aclose()

    def test_get_current_context_in_a_shared_factory_raises_in_sync_code(self) -> None:
        """The same from sync code: a job's worker thread resolving a USER component with
        ``resolve_sync`` from a scope it was handed."""
        registry = Registry()
        registry.register(
            "baked", lambda: ambient.get_current_context().run_id, lifetime=Lifetime.USER
        )

        async def job() -> None:
            async with registry.open_scope(ctx("alice")):
                with pytest.raises(ambient.NoActiveContextError, match="UserRef"):
                    await anyio.to_thread.run_sync(ambient.wrap(ambient.resolve_sync), "baked")
            await registry.aclose()

        anyio.run(job)


class TestAfterShutdown:
    """Once ``registry.aclose()`` has closed the registry (shutdown), nothing makes USER or
    APP components that no later close would clean up."""

    @staticmethod
    def counting_registry(lifetime: Lifetime, made: list[_Closable]) -> Registry:
        def make() -> _Closable:
            made.append(_Closable())
            return made[-1]

        registry = Registry()
        registry.register(_Closable, make, lifetime=lifetime)
        return registry

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("hop", ["await", "to_thread", "run_sync_in_thread", "executor"])
    async def test_a_resolution_after_aclose_is_refused_and_makes_nothing(
        self, lifetime: Lifetime, hop: str
    ) -> None:
        """A request still open at shutdown (a websocket, a slow sync endpoint in a worker
        thread) resolves a USER or APP component after ``registry.aclose()`` returned: it
        gets ScopeClosedError saying the registry was closed at shutdown, and nothing is
        made. A component used to be made afresh, which nothing would ever clean."""
        from ambient.integrations.threads import ContextExecutor, run_sync_in_thread

        made: list[_Closable] = []
        registry = self.counting_registry(lifetime, made)
        async with registry.open_scope(ctx("alice")) as scope:
            first = await ambient.resolve(_Closable)
            await registry.aclose()
            with pytest.raises(ambient.errors.ScopeClosedError, match="closed at shutdown"):
                if hop == "await":
                    await ambient.resolve(_Closable)
                elif hop == "to_thread":
                    await anyio.to_thread.run_sync(ambient.resolve_sync, _Closable)
                elif hop == "run_sync_in_thread":
                    await run_sync_in_thread(scope.resolve_sync, _Closable)
                else:
                    with ContextExecutor(max_workers=1) as executor:
                        executor.submit(ambient.resolve_sync, _Closable).result(10)
        assert made == [first]
        assert first.closed
        stats = registry.stats()
        assert (stats.created, stats.cleaned, stats.live_users) == (1, 1, 0)

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("cleanup", ["close", "aclose"])
    async def test_a_creation_in_a_thread_racing_aclose_is_cleaned_and_refused(
        self, lifetime: Lifetime, cleanup: str
    ) -> None:
        """A worker thread's factory is still making a USER or APP component when
        ``registry.aclose()`` runs and returns: the component it then makes is cleaned up
        (its sync or async cleanup) and the thread gets ScopeClosedError. It used to be
        made a second time, into a fresh store that no later close would clean."""
        started, go_on = threading.Event(), threading.Event()
        made: list[Any] = []

        class Conn:
            def __init__(self) -> None:
                self.closed = False

        class Closing(Conn):
            def close(self) -> None:
                self.closed = True

        class AClosing(Conn):
            async def aclose(self) -> None:
                self.closed = True

        def make() -> Conn:
            started.set()
            go_on.wait(10)
            made.append(Closing() if cleanup == "close" else AClosing())
            return made[-1]

        registry = Registry()
        registry.register(Conn, make, lifetime=lifetime)
        outcome: list[BaseException] = []

        async def in_thread() -> None:
            try:
                await anyio.to_thread.run_sync(ambient.resolve_sync, Conn)
            except ambient.errors.ScopeClosedError as exc:
                outcome.append(exc)

        with anyio.fail_after(10):
            async with registry.open_scope(ctx("alice")), anyio.create_task_group() as tg:
                tg.start_soon(in_thread)
                await anyio.to_thread.run_sync(started.wait)
                await registry.aclose()
                go_on.set()
        assert len(outcome) == 1
        assert "closed at shutdown" in str(outcome[0])
        assert len(made) == 1
        assert made[0].closed
        stats = registry.stats()
        assert (stats.created, stats.cleaned, stats.live_users) == (1, 1, 0)

    async def test_an_abandoned_threads_creation_finished_after_aclose_is_cleaned(
        self,
    ) -> None:
        """A worker thread abandoned by its cancelled request is still making a USER
        component with an async cleanup when the request's scope closes and then the
        registry: what it makes is cleaned on the event loop as it is refused. It used to
        be queued for the next scope that closes, which after shutdown never comes."""
        started, go_on, done = threading.Event(), threading.Event(), threading.Event()
        made: list[Conn] = []
        released = anyio.Event()
        released.set()  # its cleanup ends at once

        def make(user: UserRef) -> Conn:
            started.set()
            go_on.wait(10)
            made.append(Conn(user.user_id, anyio.Event(), released))
            return made[-1]

        registry = Registry()
        registry.register(Conn, make, lifetime=Lifetime.USER)

        def work() -> None:
            try:
                ambient.resolve_sync(Conn)
            except ambient.errors.ScopeClosedError:
                pass
            finally:
                done.set()

        with anyio.fail_after(10):
            async with registry.open_scope(ctx("alice")), anyio.create_task_group() as tg:
                tg.start_soon(partial(anyio.to_thread.run_sync, work, abandon_on_cancel=True))
                await anyio.to_thread.run_sync(started.wait)
                tg.cancel_scope.cancel()
            await registry.aclose()
            go_on.set()
            await anyio.to_thread.run_sync(done.wait)
        assert len(made) == 1
        assert made[0].closed
        stats = registry.stats()
        assert (stats.created, stats.cleaned) == (1, 1)

    async def test_a_new_start_after_aclose_makes_components_again(self) -> None:
        """A scope opened after the close (the application started again, a test's second
        app) makes USER and APP components afresh; the next close cleans them."""
        made: list[_Closable] = []
        registry = self.counting_registry(Lifetime.USER, made)
        registry.register("app", _Closable, lifetime=Lifetime.APP)
        async with registry.open_scope(ctx("alice")):
            await ambient.resolve(_Closable)
            app = await ambient.resolve("app")
        await registry.aclose()
        async with registry.open_scope(ctx("alice")):
            again = await ambient.resolve(_Closable)
            app_again = await ambient.resolve("app")
        assert again is made[1]
        assert app_again is not app
        await registry.aclose()
        assert again.closed
        assert app_again.closed

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    async def test_a_scope_opening_while_aclose_runs_does_not_start_it_again(
        self, lifetime: Lifetime
    ) -> None:
        """A scope opens while ``registry.aclose()`` is still cleaning (a job, a request
        another server lets in during shutdown): the registry stays closed, so a websocket's
        scope still open refuses the USER or APP component it resolves then, as the new
        scope does. The opening used to start the registry again, and the websocket got a
        component made afresh that the close, past taking them, never cleaned up."""
        made: list[_Closable] = []
        registry = self.counting_registry(lifetime, made)
        closing, release = anyio.Event(), anyio.Event()

        class Slow:
            async def aclose(self) -> None:
                closing.set()
                await release.wait()

        registry.register(Slow, Slow, lifetime=Lifetime.APP)
        resolve, resolved = anyio.Event(), anyio.Event()
        refused: list[str] = []

        async def refusal() -> None:
            try:
                await ambient.resolve(_Closable)
            except ambient.errors.ScopeClosedError as exc:
                refused.append(str(exc))

        async def websocket() -> None:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(Slow)
                await resolve.wait()
                await refusal()
                resolved.set()

        async def late() -> None:
            async with registry.open_scope(ctx("bob")):
                await refusal()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(websocket)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(registry.aclose)
                await closing.wait()
                tg.start_soon(late)
                await anyio.wait_all_tasks_blocked()
                resolve.set()
                await resolved.wait()
                release.set()
        assert made == []
        assert len(refused) == 2
        assert all("closed at shutdown" in message for message in refused)
        stats = registry.stats()
        assert (stats.created, stats.cleaned, stats.live_users) == (1, 1, 0)
        async with registry.open_scope(ctx("alice")):  # started again once the close ended
            again = await ambient.resolve(_Closable)
        await registry.aclose()
        assert made == [again]
        assert again.closed

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    async def test_a_scope_open_across_aclose_is_refused_after_a_new_start(
        self, lifetime: Lifetime, how: str
    ) -> None:
        """A websocket's scope stays open across ``registry.aclose()``; then a scope opens (a
        job run after shutdown, the application started again) and opens the registry
        again. The websocket's scope is still refused the USER or APP component: it used to
        get one made afresh, which no close of its start, over already, would clean up."""
        made: list[_Closable] = []
        registry = self.counting_registry(lifetime, made)
        reopened = anyio.Event()
        refused: list[str] = []

        async def websocket() -> None:
            async with registry.open_scope(ctx("alice")) as scope:
                await reopened.wait()
                try:
                    if how == "resolve":
                        await ambient.resolve(_Closable)
                    else:
                        await anyio.to_thread.run_sync(scope.resolve_sync, _Closable)
                except ambient.errors.ScopeClosedError as exc:
                    refused.append(str(exc))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(websocket)
                await anyio.wait_all_tasks_blocked()
                await registry.aclose()
                async with registry.open_scope(ctx("bob")):
                    bobs = await ambient.resolve(_Closable)
                reopened.set()
        assert made == [bobs]
        assert len(refused) == 1
        assert "closed at shutdown" in refused[0]
        await registry.aclose()
        assert bobs.closed

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("how", ["resolve", "resolve_sync"])
    async def test_a_creation_under_way_across_aclose_and_a_new_start_is_not_made_again(
        self, lifetime: Lifetime, how: str
    ) -> None:
        """A websocket's scope is making a USER or APP component as ``registry.aclose()``
        runs, and a scope opens after the close (the application started again) before
        its factory returns. What the factory made is cleaned up and refused, as for any
        scope open across the close: it used to be made again, for a scope of the start
        that had ended, as though the resolution had begun after the new start."""
        made: list[_Closable] = []
        inside, release = threading.Event(), threading.Event()

        def make() -> _Closable:
            made.append(component := _Closable())
            if len(made) == 1:
                inside.set()
                release.wait(10)
            return component

        async def make_async() -> _Closable:
            if made:
                return make()
            made.append(component := _Closable())
            inside.set()
            await anyio.to_thread.run_sync(release.wait, 10)
            return component

        registry = Registry()
        registry.register(_Closable, make_async if how == "resolve" else make, lifetime=lifetime)
        refused: list[str] = []

        async def websocket() -> None:
            async with registry.open_scope(ctx("alice")) as scope:
                try:
                    if how == "resolve":
                        await ambient.resolve(_Closable)
                    else:
                        await anyio.to_thread.run_sync(scope.resolve_sync, _Closable)
                except ambient.errors.ScopeClosedError as exc:
                    refused.append(str(exc))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(websocket)
                await anyio.to_thread.run_sync(inside.wait, 10)
                await registry.aclose()
                async with registry.open_scope(ctx("bob")):
                    bobs = await ambient.resolve(_Closable)
                release.set()
        assert made[1:] == [bobs]
        assert made[0].closed
        assert len(refused) == 1
        assert "closed at shutdown" in refused[0]
        await registry.aclose()
        assert bobs.closed
        stats = registry.stats()
        assert (stats.created, stats.cleaned) == (2, 2)


class TestAcrossEventLoops:
    """A registry outlives the event loops it is used on (one ``asyncio.run`` per job, two
    servers in two threads): its USER and APP components are its own, not a loop's."""

    @staticmethod
    def generator_registry(lifetime: Lifetime, steps: list[str]) -> Registry:
        registry = Registry()

        async def connect() -> AsyncIterator[_Closable]:
            connection = _Closable()
            try:
                yield connection
            finally:
                steps.append("cleaned")
                connection.close()

        registry.register(_Closable, connect, lifetime=lifetime)
        return registry

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    def test_a_generator_component_outlives_the_event_loop_that_made_it(
        self, backend: str, lifetime: Lifetime
    ) -> None:
        """A USER or APP component from an async generator, made by a job on one event
        loop, is handed to the next job, on a loop of its own, as it was: the first loop's
        end used to close it (``shutdown_asyncgens``, trio's end of run), and the next job
        got a component already cleaned up. The registry's close cleans it, once."""
        steps: list[str] = []
        registry = self.generator_registry(lifetime, steps)
        seen: list[tuple[_Closable, bool]] = []

        async def job() -> None:
            async with registry.open_scope(ctx("alice")):
                component = await ambient.resolve(_Closable)
                seen.append((component, component.closed))

        anyio.run(job, backend=backend)
        anyio.run(job, backend=backend)
        assert steps == []
        assert seen[1] == (seen[0][0], False)
        anyio.run(registry.aclose, backend=backend)
        assert steps == ["cleaned"]
        assert registry.stats().cleaned == 1

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_a_loop_ending_while_another_cleans_its_component_logs_no_error(
        self, backend: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One server's event loop made a user's component from an async generator; a
        second server's loop, in another thread, closes the registry, and the first loop
        ends while that cleanup runs. The cleanup runs once, and nothing is logged: the
        first loop used to close the generator as it ended, and logged "aclose():
        asynchronous generator is already running"."""
        made, cleaning, release = threading.Event(), threading.Event(), threading.Event()
        steps: list[str] = []
        registry = Registry()

        async def connect() -> AsyncIterator[_Closable]:
            try:
                yield _Closable()
            finally:
                cleaning.set()
                await anyio.to_thread.run_sync(release.wait, 10)
                steps.append("cleaned")

        registry.register(_Closable, connect, lifetime=Lifetime.USER)

        async def first_server() -> None:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(_Closable)
            made.set()
            await anyio.to_thread.run_sync(cleaning.wait, 10)

        first = threading.Thread(
            target=anyio.run, args=(first_server,), kwargs={"backend": backend}
        )
        second = threading.Thread(
            target=anyio.run, args=(registry.aclose,), kwargs={"backend": backend}
        )
        first.start()
        try:
            assert made.wait(10)
            second.start()
            first.join(10)  # its loop has ended, the cleanup still running in the second
            assert not first.is_alive()
        finally:
            release.set()
            first.join(10)
        second.join(10)
        assert steps == ["cleaned"]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert registry.stats().cleaned == 1

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_a_registry_dropped_unclosed_after_its_loop_ended_warns(self, backend: str) -> None:
        """A registry never closed is garbage-collected after the event loop that made
        its USER component from an async generator has ended: the cleanup cannot run
        there any more, and a ResourceWarning names the component (asyncio's own
        finalizer drops such a generator without a word)."""
        steps: list[str] = []
        registry = self.generator_registry(Lifetime.USER, steps)

        async def job(registry: Registry) -> None:
            async with registry.open_scope(ctx("alice")):
                await ambient.resolve(_Closable)

        anyio.run(job, registry, backend=backend)
        with pytest.warns(ResourceWarning, match="cleanup of _Closable never ran"):
            del registry
            gc.collect()
        assert steps == []


async def test_requests_using_no_user_component_clean_the_idle_users_they_took_out_of_use(
    clock: FakeClock,
) -> None:
    """Many users' requests make USER components; once their idle_ttl has passed, requests
    that use none (health checks, of other users, at once) take them out of use as they
    open and clean them as they close. They were left for a later request that happened to
    use a USER component or to await a cleanup."""
    import httpx

    from ambient.middleware import AmbientMiddleware, trusted_header

    cleaned: list[str] = []
    registry = user_registry(cleaned, clock=clock, idle_ttl=60)

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/orders":
            assert (
                await ambient.resolve(Tracked)
            ).user.user_id == ambient.get_current_context().user_id
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = AmbientMiddleware(endpoint, registry=registry, identity=trusted_header())
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    users = [f"user-{i}" for i in range(30)]

    async def get(http: httpx.AsyncClient, path: str, user: str) -> None:
        response = await http.get(path, headers={"x-user-id": user})
        assert response.status_code == 200

    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(get, http, "/orders", user)
            assert cleaned == []
            clock.now += 61
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(get, http, "/health", f"monitor-{i}")
            assert sorted(cleaned) == sorted(users)
            assert registry.stats().live_users == 0
    await registry.aclose()
    assert sorted(cleaned) == sorted(users)


async def test_a_shutdown_waiting_for_open_scopes_waits_for_the_last_of_many() -> None:
    """Many users' scopes are open as shutdowns start waiting for them; they close one at
    a time: no shutdown goes on before the last one has closed, and each sees none open."""
    registry = Registry(cleanup_timeout=60)
    users = [f"user-{i}" for i in range(20)]
    done = {user: anyio.Event() for user in users}
    still_open: list[int] = []

    async def request(user: str) -> None:
        async with registry.open_scope(ctx(user)):
            await done[user].wait()

    async def shutdown() -> None:
        still_open.append(await registry.wait_for_scopes())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user)
            await anyio.wait_all_tasks_blocked()
            assert registry.stats().open_scopes == len(users)
            tg.start_soon(shutdown)
            tg.start_soon(shutdown)
            for user in users:
                await anyio.wait_all_tasks_blocked()
                assert still_open == []
                done[user].set()
    assert still_open == [0, 0]


async def test_max_users_evicts_an_idle_user_behind_users_in_use(clock: FakeClock) -> None:
    """Users in use come first in the users' order (their scopes opened before the idle
    user's closed): a new user past max_users evicts the idle one behind them, never one
    in use, whose component is kept and cleaned only once it is done with."""
    cleaned: list[str] = []
    registry = user_registry(cleaned, clock=clock, max_users=10, idle_ttl=3600)
    in_use = [f"user-{n}" for n in range(9)]
    held: dict[str, Tracked] = {}
    all_held, release = anyio.Event(), anyio.Event()
    again: dict[str, Tracked] = {}

    async def request(user: str) -> None:
        async with registry.open_scope(ctx(user)):
            held[user] = await ambient.resolve(Tracked)
            if len(held) == len(in_use):
                all_held.set()
            await release.wait()
            again[user] = await ambient.resolve(Tracked)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in in_use:
                tg.start_soon(request, user)
            await all_held.wait()
            await use(registry, "idle")  # the tenth user, idle once its request closed
            assert cleaned == []
            await use(registry, "newcomer")  # past max_users: the idle user makes room
            assert cleaned == ["idle"]
            release.set()
    assert again == held
    assert cleaned == ["idle"]
    await registry.aclose()
    assert sorted(cleaned) == sorted(["idle", "newcomer", *in_use])


async def test_users_who_came_back_then_expired_leave_a_later_burst_walking_no_user_list(
    clock: FakeClock,
) -> None:
    """Idle users who come back, then expire, are no longer counted as idle: a later burst
    of 300 users past max_users=100 still looks at each user only, not at every user for
    each (which it does while it believes some are idle)."""
    cleaned: list[str] = []
    registry = user_registry(cleaned, clock=clock, max_users=100, idle_ttl=60)
    early = [f"early-{n}" for n in range(40)]
    await burst(registry, [ctx(user) for user in early])  # 40 idle users
    clock.now += 30
    await burst(registry, [ctx(user) for user in early[:20]])  # 20 of them come back
    clock.now += 100
    await registry.sweep()  # and then they all expire
    assert sorted(cleaned) == sorted(early)
    assert registry.stats().live_users == 0
    registry._users = counted = _CountedUsers(registry._users)
    users = [f"user-{n}" for n in range(300)]
    await burst(registry, [ctx(user) for user in users])
    assert registry.stats().live_users == 100
    assert len(set(cleaned)) == len(cleaned) == len(early) + 200
    assert counted.walked <= len(users), counted.walked
    await registry.aclose()


async def test_a_cancelled_aclose_still_cleans_the_app_after_users_cleanups_under_way(
    clock: FakeClock,
) -> None:
    """Many idle users' connections are going back to the APP pool (an expiry a request
    ran) when shutdown calls ``registry.aclose()``, and the shutdown is then cancelled (its
    grace period ran out): the pool still closes only once every connection is back."""
    users = [f"user-{n}" for n in range(10)]
    app = SlowReturns(clock, *users)
    for user in users:
        await app.take(user)
    clock.now += 5
    shutdown_scope = anyio.CancelScope()

    async def shutdown() -> None:
        with shutdown_scope:
            await app.registry.aclose()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.request, "bob")
            for returning in app.returning.values():
                await returning.wait()
            tg.start_soon(shutdown)
            await anyio.wait_all_tasks_blocked()
            shutdown_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            for returned in app.returned.values():
                returned.set()
    back = sorted(f"{user}'s returned to the pool" for user in users)
    assert (sorted(app.order[:-1]), app.order[-1:]) == (back, ["pool closed"])


async def test_max_users_evicting_idle_users_one_at_a_time_warns_of_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Users come one after another, past max_users=5, each leaving before the next
    arrives: each newcomer evicts the least recently used idle user, which is what
    max_users is for. No warning that users in use are past the limit (none is)."""
    cleaned: list[str] = []
    registry = user_registry(cleaned, max_users=5, idle_ttl=3600)
    users = [f"user-{n}" for n in range(20)]
    with caplog.at_level("WARNING", logger="ambient"):
        for user in users:
            await use(registry, user)
    assert cleaned == users[:15]
    assert [r.getMessage() for r in caplog.records if "above max_users" in r.getMessage()] == []
    await registry.aclose()


class _Interrupt(BaseException):
    """What a cleanup lets through that is no Exception (a KeyboardInterrupt, say)."""


async def test_a_base_exception_from_a_users_cleanup_lets_aclose_clean_the_rest() -> None:
    """A USER component whose cleanup raises a BaseException at ``registry.aclose()``: the
    other users' components and then the APP's are all still cleaned, once each, and that
    exception is what aclose() raises, once they are."""
    cleaned: list[str] = []

    class Interrupting:
        def close(self) -> None:
            cleaned.append("interrupting")
            raise _Interrupt

    def per_user(user: UserRef) -> Iterator[str]:
        yield user.user_id
        cleaned.append(f"{user.user_id}'s")

    async def pool() -> AsyncIterator[str]:
        yield "pool"
        await anyio.lowlevel.checkpoint()
        cleaned.append("pool")

    registry = Registry()
    registry.register("pool", pool, lifetime=Lifetime.APP)
    registry.register("per user", per_user, lifetime=Lifetime.USER)
    registry.register(Interrupting, Interrupting, lifetime=Lifetime.USER)
    for user in ("alice", "bob", "carol"):
        async with registry.open_scope(ctx(user)) as scope:
            await scope.resolve("pool")
            await scope.resolve("per user")
            if user == "bob":
                await scope.resolve(Interrupting)
    assert cleaned == []
    with anyio.fail_after(10), pytest.raises(_Interrupt):
        await registry.aclose()
    assert sorted(cleaned[:-1]) == ["alice's", "bob's", "carol's", "interrupting"]
    assert cleaned[-1] == "pool"
    assert cleaned.index("interrupting") < cleaned.index("bob's")
    stats = registry.stats()
    assert (stats.live_users, stats.live_user_components) == (0, 0)
