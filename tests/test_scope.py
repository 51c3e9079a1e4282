"""Scope: single-flight creation, failures, cycles, cleanup semantics and closed scopes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

import ambient
from ambient import (
    CleanupError,
    Lifetime,
    Registry,
    ResolutionError,
    Scope,
    ScopeClosedError,
    UserExecutionContext,
)
from ambient._loops import loop_call_soon
from ambient.errors import CleanupTimeoutError


def ctx(user: str = "alice") -> UserExecutionContext:
    return UserExecutionContext.create(user)


class Counter:
    """A component whose factory and cleanup are counted."""

    created = 0

    def __init__(self) -> None:
        type(self).created += 1
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class _HeldFactory:
    """A sync factory that says when it runs, then returns only once released."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        self.inside.set()
        self.release.wait(10)
        return object()


async def _held_scope(
    registry: Registry, make: Callable[[], Iterator[str]]
) -> tuple[ambient.Scope, Any]:
    """An open scope of ``registry`` with a REQUEST component ``make`` makes, a USER one,
    and a hold taken on it."""
    registry.register("request", make)
    registry.register("user", lambda: "user", lifetime=Lifetime.USER)
    scope = registry.open_scope(ctx())
    await scope.__aenter__()
    await scope.resolve("request")
    await scope.resolve("user")
    return scope, scope.hold()


class TestSingleFlight:
    async def test_tasks_giving_up_on_a_thread_s_creation_leave_no_thread_behind(
        self,
    ) -> None:
        """Tasks awaiting a component that a worker thread's sync factory is making, each
        cancelled as it waits (a request timing out while the factory hangs), leave no
        thread behind: each left one blocked until the creation ended, so a server's
        threads grew with every timeout meanwhile. Then the creation ends: made once."""
        registry = Registry()
        inside, release = threading.Event(), threading.Event()

        def make() -> Counter:
            inside.set()
            release.wait(10)
            return Counter()

        registry.register(Counter, make, lifetime=Lifetime.APP)
        made: list[Counter] = []
        with anyio.fail_after(10):
            async with registry.open_scope(ctx()) as scope:
                thread = threading.Thread(target=lambda: made.append(scope.resolve_sync(Counter)))
                thread.start()
                await anyio.to_thread.run_sync(inside.wait)
                before = threading.active_count()
                for _ in range(20):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(scope.resolve, Counter)
                        await anyio.wait_all_tasks_blocked()
                        tg.cancel_scope.cancel()
                grown = threading.active_count() - before
                release.set()
                await anyio.to_thread.run_sync(thread.join)
                assert await scope.resolve(Counter) is made[0]
        assert grown < 5  # not one per cancelled wait
        await registry.aclose()
        assert registry.stats().created == registry.stats().cleaned == 1

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_a_creation_awaited_again_on_a_later_loop_of_the_thread_wakes_it(
        self, backend: str
    ) -> None:
        """A thread whose event loop gave up awaiting a creation another loop is making (a
        request timed out), then runs a new loop (asyncio.run per job) awaiting it again:
        the new loop's task is woken when it ends. The waiters of each loop were kept by
        thread, so the new loop's task waited on the finished loop's event: asyncio refused
        it (bound to a different event loop), trio never woke it."""
        registry = Registry()
        inside, release = threading.Event(), threading.Event()

        async def make() -> Counter:
            inside.set()
            await anyio.to_thread.run_sync(release.wait, 10)
            return Counter()

        registry.register(Counter, make, lifetime=Lifetime.APP)
        made: list[Counter] = []

        async def create() -> None:
            async with registry.open_scope(ctx()) as scope:
                made.append(await scope.resolve(Counter))

        creator = threading.Thread(target=anyio.run, args=(create,), kwargs={"backend": backend})
        creator.start()
        inside.wait(10)

        async def give_up() -> None:
            async with registry.open_scope(ctx()) as scope, anyio.create_task_group() as tg:
                tg.start_soon(scope.resolve, Counter)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()

        async def wait_again() -> Counter:
            async with registry.open_scope(ctx()) as scope:
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as tg:
                        got: list[Counter] = []

                        async def resolve() -> None:
                            got.append(await scope.resolve(Counter))

                        tg.start_soon(resolve)
                        await anyio.wait_all_tasks_blocked()
                        release.set()
                return got[0]

        try:
            anyio.run(give_up, backend=backend)
            found = anyio.run(wait_again, backend=backend)
        finally:
            release.set()
            creator.join(10)
        assert found is made[0]
        anyio.run(registry.aclose, backend=backend)
        assert registry.stats().created == registry.stats().cleaned == 1

    async def test_200_tasks_create_a_request_component_once(self) -> None:
        """200 concurrent resolutions of one key in one scope create it once."""
        calls = 0
        release = anyio.Event()
        results: list[object] = []

        async def make() -> object:
            nonlocal calls
            calls += 1
            await release.wait()
            return object()

        registry = Registry()
        registry.register("slow", make)
        # Bounded: waiters never woken must fail the test, not hang it.
        with anyio.fail_after(10):
            async with registry.open_scope(ctx()) as scope:

                async def resolve_it() -> None:
                    results.append(await scope.resolve("slow"))

                async with anyio.create_task_group() as tg:
                    for _ in range(200):
                        tg.start_soon(resolve_it)
                    await anyio.wait_all_tasks_blocked()
                    release.set()
        assert calls == 1
        assert len(results) == 200
        assert len({id(r) for r in results}) == 1

    async def test_8_threads_create_once(self) -> None:
        """8 threads calling resolve_sync at once create the component once."""
        barrier = threading.Barrier(8, timeout=10)
        make = _HeldFactory()
        inside, release = make.inside, make.release
        registry = Registry()
        registry.register("slow", make)
        async with registry.open_scope(ctx()) as scope:
            results: list[object] = []

            def worker() -> None:
                barrier.wait()
                results.append(scope.resolve_sync("slow"))

            def run_all() -> list[threading.Thread]:
                # Daemon threads, joined within a bound: a thread never woken from its wait
                # fails the test instead of hanging it (a pool would join it for good).
                threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
                for thread in threads:
                    thread.start()
                inside.wait(10)
                release.set()
                for thread in threads:
                    thread.join(10)
                return [thread for thread in threads if thread.is_alive()]

            stuck = await anyio.to_thread.run_sync(run_all)
        assert not stuck, f"{len(stuck)} thread(s) never woke from the wait for the creation"
        assert make.calls == 1
        assert len(results) == 8
        assert len({id(r) for r in results}) == 1

    async def test_tasks_and_threads_together_create_once(self) -> None:
        """Tasks and worker threads resolving one sync component share one instance."""
        calls = 0

        def make() -> object:
            nonlocal calls
            calls += 1
            return object()

        registry = Registry()
        registry.register("thing", make)
        results: list[object] = []
        async with registry.open_scope(ctx()) as scope:

            async def in_task() -> None:
                results.append(await scope.resolve("thing"))

            async def in_thread() -> None:
                results.append(await anyio.to_thread.run_sync(ambient.wrap(_resolve_thing)))

            async with anyio.create_task_group() as tg:
                for n in range(40):
                    tg.start_soon(in_task if n % 2 else in_thread)
        assert calls == 1
        assert len({id(r) for r in results}) == 1

    async def test_tasks_awaiting_a_component_a_thread_makes_leave_the_worker_threads_free(
        self,
    ) -> None:
        """A worker thread creates a slow component while 60 tasks await it. The tasks must
        not each sit on one of anyio's default worker threads (40, which the application's
        own thread work shares): those stay free until the component arrives, and then
        every task gets the one instance."""
        make = _HeldFactory()
        inside, release = make.inside, make.release
        registry = Registry()
        registry.register("slow", make)
        results: list[object] = []
        async with registry.open_scope(ctx()) as scope:

            async def in_thread() -> None:
                results.append(await anyio.to_thread.run_sync(scope.resolve_sync, "slow"))

            async def in_task() -> None:
                # Bounded: a task never woken by the thread's creation fails the test.
                with anyio.fail_after(10):
                    results.append(await scope.resolve("slow"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_thread)
                try:
                    assert await anyio.to_thread.run_sync(inside.wait, 10)
                    for _ in range(60):
                        tg.start_soon(in_task)
                    await anyio.wait_all_tasks_blocked()
                    with anyio.fail_after(5):
                        assert await anyio.to_thread.run_sync(lambda: "free") == "free"
                finally:
                    release.set()  # before the task group waits for the tasks
        assert make.calls == 1
        assert len(results) == 61
        assert len({id(r) for r in results}) == 1

    async def test_threads_first_using_a_scope_at_once_lose_no_component(self) -> None:
        """4 worker threads make the first REQUEST and USER resolutions of each of 1,500
        scopes at once: one instance each, every created component cleaned exactly once,
        and no user's reference left behind (its idle USER component expires)."""
        threads, scopes = 4, 1500
        counts = {"made": 0, "cleaned": 0, "user made": 0, "user cleaned": 0}
        lock = threading.Lock()

        def count(what: str) -> None:
            with lock:
                counts[what] += 1

        def per_request() -> Iterator[object]:
            count("made")
            yield object()
            count("cleaned")

        def per_user() -> Iterator[object]:
            count("user made")
            yield object()
            count("user cleaned")

        registry = Registry()
        registry.register("request", per_request)
        registry.register("user", per_user, lifetime=Lifetime.USER, idle_ttl=0)

        def first_use(scope: ambient.Scope, barrier: threading.Barrier) -> tuple[object, object]:
            barrier.wait()
            component = scope.resolve_sync("request")
            barrier.wait()
            return component, scope.resolve_sync("user")

        def first_uses(scope: ambient.Scope) -> list[tuple[object, object]]:
            # Daemon threads, joined within a bound: one never woken from its wait for
            # another's creation fails the test instead of hanging it (a pool's would be
            # joined for good as the pool shuts down).
            barrier = threading.Barrier(threads, timeout=10)
            results: list[tuple[object, object]] = []

            def run() -> None:
                results.append(first_use(scope, barrier))

            workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(10)
            return results

        switch_interval = sys.getswitchinterval()
        # Switch threads as often as the interpreter can, so that they interleave inside
        # the first resolution.
        sys.setswitchinterval(1e-6)
        try:
            for n in range(scopes):
                async with registry.open_scope(ctx(f"user-{n % 7}")) as scope:
                    results = await anyio.to_thread.run_sync(first_uses, scope)
                    assert len(results) == threads, "a thread never got its components"
                    assert len({id(request) for request, _ in results}) == 1
                    assert len({id(user) for _, user in results}) == 1
        finally:
            sys.setswitchinterval(switch_interval)
        await registry.sweep()
        assert counts == {
            "made": scopes,
            "cleaned": scopes,
            "user made": counts["user made"],
            "user cleaned": counts["user made"],
        }
        assert registry.stats().live_users == 0

    async def test_100_scopes_of_one_user_share_one_user_instance(self) -> None:
        """Concurrent scopes of one user share the USER component; another user does not."""
        calls = 0
        release = anyio.Event()

        async def make() -> object:
            nonlocal calls
            calls += 1
            await release.wait()
            return object()

        registry = Registry()
        registry.register("memory", make, lifetime=Lifetime.USER)
        seen: dict[str, set[int]] = {"alice": set(), "bob": set()}

        async def request(user: str) -> None:
            async with registry.open_scope(ctx(user)) as scope:
                seen[user].add(id(await scope.resolve("memory")))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(request, "alice")
            tg.start_soon(request, "bob")
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert calls == 2
        assert len(seen["alice"]) == 1
        assert len(seen["bob"]) == 1
        assert seen["alice"] != seen["bob"]
        await registry.aclose()

    async def test_one_users_scopes_tasks_and_threads_at_once_create_a_user_component_once(
        self,
    ) -> None:
        """A worker thread of one of alice's scopes is making her USER component when 20
        more of her scopes ask for it, each from 50 tasks and 10 worker threads (and bob's
        scope likewise): her factory runs once, all 1201 callers get that instance, bob
        gets his own, and each instance is cleaned exactly once when the registry closes."""
        calls: list[str] = []
        cleaned: list[str] = []
        inside, gate = threading.Event(), threading.Event()

        def memory(user: ambient.UserRef) -> Iterator[object]:
            calls.append(user.user_id)
            if not inside.is_set():  # the first creation waits until everyone asked
                inside.set()
                gate.wait(10)
            try:
                yield object()
            finally:
                cleaned.append(user.user_id)

        registry = Registry()
        registry.register("memory", memory, lifetime=Lifetime.USER)
        got: dict[str, list[int]] = {"alice": [], "bob": []}

        def in_thread(scope: Scope, user: str) -> None:
            got[user].append(id(scope.resolve_sync("memory")))

        async def request(user: str) -> None:
            async with registry.open_scope(ctx(user)) as scope:

                async def in_task() -> None:
                    got[user].append(id(await scope.resolve("memory")))

                async with anyio.create_task_group() as tg:
                    for _ in range(10):
                        tg.start_soon(anyio.to_thread.run_sync, in_thread, scope, user)
                    for _ in range(50):
                        tg.start_soon(in_task)

        async def first_request() -> None:
            async with registry.open_scope(ctx("alice")) as scope:
                await anyio.to_thread.run_sync(in_thread, scope, "alice")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first_request)
                await anyio.to_thread.run_sync(inside.wait, 10)
                for _ in range(20):
                    tg.start_soon(request, "alice")
                tg.start_soon(request, "bob")
                await anyio.wait_all_tasks_blocked()
                gate.set()
            await registry.aclose()
        assert sorted(calls) == ["alice", "bob"]
        assert len(got["alice"]) == 1 + 20 * 60
        assert len(set(got["alice"])) == 1
        assert len(got["bob"]) == 60
        assert len(set(got["bob"])) == 1
        assert set(got["alice"]) != set(got["bob"])
        assert sorted(cleaned) == ["alice", "bob"]


def _resolve_thing() -> object:
    return ambient.resolve_sync("thing")


def _until(condition: Callable[[], bool]) -> None:
    """Block (in a worker thread) until ``condition`` holds; bounded."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.005)


class TestFailures:
    async def test_failed_factory_leaves_nothing_and_retries(self) -> None:
        """A factory that raises caches nothing; the next resolve calls it again."""
        attempts = 0

        def flaky() -> str:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionError("first try fails")
            return "ok"

        registry = Registry()
        registry.register("flaky", flaky)
        async with registry.open_scope(ctx()) as scope:
            with pytest.raises(ConnectionError):
                await scope.resolve("flaky")
            with anyio.fail_after(10):  # not waiting for the failed creation
                assert await scope.resolve("flaky") == "ok"
        assert attempts == 2
        assert registry.stats().created == 1

    async def test_an_awaitable_a_sync_factory_returned_that_fails_leaves_nothing(
        self,
    ) -> None:
        """A plain function returning a coroutine that raises: nothing is cached or left
        in progress, and the next resolve calls the factory again."""
        attempts = 0

        async def build() -> str:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionError("first try fails")
            return "ok"

        registry = Registry()
        registry.register("flaky", lambda: build())
        async with registry.open_scope(ctx()) as scope:
            with pytest.raises(ConnectionError):
                await scope.resolve("flaky")
            with anyio.fail_after(10):  # not waiting for the failed creation
                assert await scope.resolve("flaky") == "ok"
        assert attempts == 2
        assert registry.stats().created == 1

    async def test_waiters_retry_when_the_creator_fails(self) -> None:
        """Tasks waiting on a creation that fails try again themselves, once each turn."""
        attempts = 0
        release = anyio.Event()

        async def flaky() -> str:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                await release.wait()
                raise ConnectionError("boom")
            return "ok"

        registry = Registry()
        registry.register("flaky", flaky)
        outcomes: list[str] = []
        async with registry.open_scope(ctx()) as scope:

            async def resolve_it() -> None:
                try:
                    outcomes.append(await scope.resolve("flaky"))
                except ConnectionError:
                    outcomes.append("failed")

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(10):
                        tg.start_soon(resolve_it)
                    await anyio.wait_all_tasks_blocked()
                    release.set()
        assert sorted(outcomes) == ["failed"] + ["ok"] * 9
        assert attempts == 2

    @pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER])
    async def test_threads_waiting_on_a_thread_s_creation_that_fails_make_it_once(
        self, lifetime: Lifetime
    ) -> None:
        """Worker threads wait in resolve_sync() for a component another thread's factory
        is making; that factory raises. The creator gets its error, and the waiters try
        again themselves: one of them makes the component, once, and every waiter gets
        that one instance."""
        inside, release = threading.Event(), threading.Event()
        attempts = 0

        def flaky() -> Counter:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                inside.set()
                release.wait(10)
                raise ConnectionError("first try fails")
            return Counter()

        registry = Registry()
        registry.register(Counter, flaky, lifetime=lifetime)
        outcomes: dict[str, object] = {}

        def resolve(name: str) -> None:
            try:
                outcomes[name] = scope.resolve_sync(Counter)
            except ConnectionError as exc:
                outcomes[name] = exc

        def waiting(thread: threading.Thread) -> bool:
            frame = sys._current_frames().get(thread.ident or 0)
            while frame is not None:
                if frame.f_code.co_name == "wait_blocking":
                    return True
                frame = frame.f_back
            return False

        def run_all() -> list[threading.Thread]:
            creator = threading.Thread(target=resolve, args=("creator",), daemon=True)
            creator.start()
            inside.wait(10)
            waiters = [
                threading.Thread(target=resolve, args=(f"waiter {n}",), daemon=True)
                for n in range(4)
            ]
            for thread in waiters:
                thread.start()
            try:
                _until(lambda: all(waiting(thread) for thread in waiters))
            finally:
                release.set()
            for thread in (creator, *waiters):
                thread.join(10)
            return [thread for thread in (creator, *waiters) if thread.is_alive()]

        async with registry.open_scope(ctx()) as scope:
            stuck = await anyio.to_thread.run_sync(run_all)
            assert not stuck, f"{len(stuck)} thread(s) never woke from the wait"
            made = await scope.resolve(Counter)
        assert isinstance(outcomes.pop("creator"), ConnectionError)
        assert list(outcomes.values()) == [made] * 4
        assert attempts == 2
        await registry.aclose()
        assert made.closed == 1
        stats = registry.stats()
        assert (stats.created, stats.cleaned) == (1, 1)

    async def test_dependency_cycle_is_named(self) -> None:
        """A cycle raises ResolutionError naming the path, in async and sync resolution."""
        registry = Registry()

        async def make_a() -> object:
            return await ambient.resolve("b")

        async def make_b() -> object:
            return await ambient.resolve("a")

        registry.register("a", make_a)
        registry.register("b", make_b)
        registry.register("c", lambda: ambient.resolve_sync("d"))
        registry.register("d", lambda: ambient.resolve_sync("c"))
        async with registry.open_scope(ctx()) as scope:
            with (
                anyio.fail_after(10),
                pytest.raises(ResolutionError, match="cycle.*'a' -> 'b' -> 'a'"),
            ):
                await scope.resolve("a")
            with pytest.raises(ResolutionError, match="cycle.*'c' -> 'd' -> 'c'"):
                scope.resolve_sync("c")

    async def test_cycle_through_sync_and_async_factories_is_named(self) -> None:
        """Cycles that pass between async and sync factories are found and named too,
        and leave nothing behind: the keys resolve once the cycle is broken."""
        registry = Registry()
        broken = False

        async def make_e() -> object:
            return await ambient.resolve("f")

        def make_f() -> object:
            return "f" if broken else ambient.resolve_sync("e")

        def make_g() -> object:
            return ambient.resolve_sync("h")

        def make_h() -> object:
            return "h" if broken else ambient.resolve_sync("g")

        for key, make in (("e", make_e), ("f", make_f), ("g", make_g), ("h", make_h)):
            registry.register(key, make)
        async with registry.open_scope(ctx()) as scope:
            with anyio.fail_after(10):
                with pytest.raises(ResolutionError, match="cycle.*'e' -> 'f' -> 'e'"):
                    await scope.resolve("e")
                with pytest.raises(ResolutionError, match="cycle.*'g' -> 'h' -> 'g'"):
                    await scope.resolve("g")
                with pytest.raises(ResolutionError, match="cycle.*'h' -> 'g' -> 'h'"):
                    scope.resolve_sync("h")
                broken = True
                assert await scope.resolve("e") == "f"
                assert await scope.resolve("g") == "h"

    async def test_user_component_cannot_depend_on_a_request_component(self) -> None:
        """A USER factory resolving a REQUEST component is refused, cached or not."""
        registry = Registry()
        registry.register("per_request", object)
        registry.register(
            "per_user", lambda: ambient.resolve_sync("per_request"), lifetime=Lifetime.USER
        )
        registry.register("app_thing", object, lifetime=Lifetime.APP)
        registry.register(
            "user_ok", lambda: ambient.resolve_sync("app_thing"), lifetime=Lifetime.USER
        )
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve("per_request")
            with pytest.raises(ResolutionError, match="USER component 'per_user' cannot depend"):
                await scope.resolve("per_user")
            assert await scope.resolve("user_ok") is await scope.resolve("app_thing")
        await registry.aclose()


async def _hang_until_abandoned() -> NoReturn:
    """What a cleanup that hangs awaits: only its cleanup_timeout ends it. Bounded all the
    same (a cleanup is shielded from the test's own deadline): one that is not abandoned
    fails the test, where it would hang it."""
    with anyio.move_on_after(3):
        await anyio.sleep_forever()
    raise AssertionError("a hanging cleanup was not abandoned after the cleanup_timeout")


class TestCleanup:
    async def test_reverse_creation_order_exactly_once(self) -> None:
        """Cleanups run newest first, each exactly once."""
        order: list[str] = []
        registry = Registry()
        for name in ("a", "b", "c"):

            def make(name: str = name) -> Iterator[str]:
                yield name
                order.append(name)

            registry.register(name, make)
        scope = registry.open_scope(ctx())
        async with scope:
            await scope.resolve("b")
            await scope.resolve("a")
            await scope.resolve("c")
        await scope.aclose()
        assert order == ["c", "a", "b"]

    async def test_a_factory_handing_out_another_component_does_not_clean_it(self) -> None:
        """A factory that returns a component it resolved (an alias: an interface mapped
        to its implementation, a request-level view of the user's memory) hands it out as
        is: the component's own store cleans it, once, when it goes. Closed (or entered and
        exited) by the alias too, a USER component was closed at the end of the first
        request, handed closed to the next, and closed again at shutdown."""

        class Memory:  # the user's, closed when the user's components go
            def __init__(self) -> None:
                self.closed = 0

            def close(self) -> None:
                self.closed += 1

        class Session:  # a context manager, entered and exited by its own registration
            def __init__(self) -> None:
                self.entered = self.exited = 0

            def __enter__(self) -> Session:
                self.entered += 1
                return self

            def __exit__(self, *exc_info: object) -> None:
                self.exited += 1

        registry = Registry()
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        registry.register(Session, Session)
        registry.register("memory", lambda: ambient.resolve_sync(Memory))

        async def memory_view() -> Memory:
            return await ambient.resolve(Memory)  # type: ignore[no-any-return]

        registry.register("memory, async", memory_view)
        registry.register("session", lambda: ambient.resolve_sync(Session))

        async def session_view() -> Session:
            return await ambient.resolve(Session)  # type: ignore[no-any-return]

        registry.register("session, async", session_view)
        registry.register("session, sync", lambda: ambient.resolve_sync(Session))

        class MemoryHandle:  # a class whose construction hands out the user's memory
            def __new__(cls) -> Any:
                return ambient.resolve_sync(Memory)

        registry.register(MemoryHandle, MemoryHandle)

        class HandsOutMemory(type):  # a metaclass whose call does the same
            def __call__(cls) -> Any:
                return ambient.resolve_sync(Memory)

        class MemoryByMetaclass(metaclass=HandsOutMemory):
            pass

        registry.register(MemoryByMetaclass, MemoryByMetaclass)
        async with registry.open_scope(ctx()) as scope:
            memory = await scope.resolve("memory")
            assert await scope.resolve("memory, async") is memory
            assert await scope.resolve(MemoryHandle) is memory
            assert await scope.resolve(MemoryByMetaclass) is memory
            session = await scope.resolve("session")
            assert scope.resolve_sync(Session) is session
            assert await scope.resolve("session, async") is session
            assert scope.resolve_sync("session, sync") is session
        assert (session.entered, session.exited) == (1, 1)
        assert memory.closed == 0  # the user's components outlive the request
        async with registry.open_scope(ctx()) as scope:
            assert await scope.resolve(Memory) is memory
            assert memory.closed == 0
        await registry.aclose()
        assert memory.closed == 1

    async def test_an_alias_made_as_its_scope_closes_leaves_the_component_open(self) -> None:
        """An alias still being made when its scope closes (work that outlived the request
        resolves it; the factory awaits something after resolving the user's component)
        is refused, and its component is not cleaned by it: the close had emptied what
        the alias was checked against, so the refused alias closed the user's component,
        which the user's next request was then handed, closed."""

        class Memory:
            def __init__(self) -> None:
                self.closed = 0

            def close(self) -> None:
                self.closed += 1

        registry = Registry()
        registry.register(Memory, Memory, lifetime=Lifetime.USER)
        resolved = anyio.Event()
        go_on = anyio.Event()

        async def memory_view() -> Memory:
            memory: Memory = await ambient.resolve(Memory)
            resolved.set()
            await go_on.wait()
            return memory

        registry.register("memory view", memory_view)
        errors: list[Exception] = []
        async with anyio.create_task_group() as tg:
            async with registry.open_scope(ctx()) as scope:

                async def outliving_work() -> None:
                    try:
                        await scope.resolve("memory view")
                    except ScopeClosedError as exc:
                        errors.append(exc)

                tg.start_soon(outliving_work)
                await resolved.wait()
            go_on.set()
        assert len(errors) == 1  # the scope had closed: the alias was refused
        async with registry.open_scope(ctx()) as scope:
            memory = await scope.resolve(Memory)
            assert memory.closed == 0
        await registry.aclose()
        assert memory.closed == 1

    async def test_cleanups_complete_when_the_owner_is_cancelled(self) -> None:
        """Cancelling the task while cleanups run does not cut them short."""
        done: list[str] = []
        cleanup_started = anyio.Event()
        registry = Registry()

        async def slow() -> AsyncIterator[str]:
            yield "slow"
            cleanup_started.set()
            await anyio.sleep(0.05)
            done.append("slow")

        def quick() -> Iterator[str]:
            yield "quick"
            done.append("quick")

        registry.register("quick", quick)
        registry.register("slow", slow)

        async def request() -> None:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("quick")
                await scope.resolve("slow")

        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await cleanup_started.wait()
            tg.cancel_scope.cancel()
        assert done == ["slow", "quick"]
        assert registry.stats().cleaned == 2

    async def test_cleanup_survives_cancellation_of_the_body(self) -> None:
        """A body cancelled mid-way still cleans every component, and the cleanup sees the
        cancellation thrown in at its ``yield``, as with ``contextlib``."""
        cleaned: list[str] = []
        entered = anyio.Event()
        registry = Registry()
        cancelled = anyio.get_cancelled_exc_class()

        async def component() -> AsyncIterator[str]:
            try:
                yield "x"
            except cancelled:
                cleaned.append("saw the cancellation")
                raise
            finally:
                await anyio.lowlevel.checkpoint()  # an await inside a cancelled task's cleanup
                cleaned.append("x")

        registry.register("x", component)

        async def request() -> None:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("x")
                entered.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await entered.wait()
            tg.cancel_scope.cancel()
        assert cleaned == ["saw the cancellation", "x"]
        assert registry.stats().cleaned == 1

    @pytest.mark.parametrize("ending", ["returns", "raises", "cancelled", "interrupted"])
    async def test_a_transaction_around_yield_commits_only_a_body_that_returned(
        self, ending: str
    ) -> None:
        """A generator factory that opens a transaction around its ``yield`` commits only
        when the scope's body returned: an error, a cancellation (a client gone) or any
        other BaseException rolls the request's partial work back."""
        ledger: list[str] = []
        entered = anyio.Event()

        class Transaction:
            """Commits on a clean exit, rolls back on any exception (as psycopg's do)."""

            def __enter__(self) -> list[str]:
                return []

            def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
                ledger.append("rollback" if kind is not None else "commit")

        def transaction() -> Iterator[list[str]]:
            with Transaction() as writes:
                yield writes

        registry = Registry()
        registry.register("tx", transaction)

        class Interrupt(BaseException):
            pass

        async def request() -> None:
            async with registry.open_scope(ctx()) as scope:
                writes = await scope.resolve("tx")
                writes.append("first half")
                entered.set()
                if ending == "raises":
                    raise ValueError("the second half failed")
                if ending == "interrupted":
                    raise Interrupt
                if ending == "cancelled":
                    await anyio.sleep_forever()

        with anyio.fail_after(5):
            if ending == "cancelled":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(request)
                    await entered.wait()
                    tg.cancel_scope.cancel()
            elif ending == "returns":
                await request()
            else:
                with pytest.raises((ValueError, Interrupt)):
                    await request()
        assert ledger == ["commit" if ending == "returns" else "rollback"]
        assert registry.stats().cleaned == 1
        assert registry.stats().cleanup_failures == 0

    async def test_hanging_cleanup_is_abandoned_and_reported(self) -> None:
        """A cleanup past cleanup_timeout is abandoned; the others still run."""
        cleaned: list[str] = []
        registry = Registry(cleanup_timeout=0.05)

        async def hangs() -> AsyncIterator[str]:
            yield "hang"
            await _hang_until_abandoned()

        def fine() -> Iterator[str]:
            yield "fine"
            cleaned.append("fine")

        registry.register("fine", fine)
        registry.register("hang", hangs)
        with anyio.fail_after(5), pytest.raises(CleanupError) as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("fine")
                await scope.resolve("hang")
        assert cleaned == ["fine"]
        assert len(info.value.exceptions) == 1
        assert isinstance(info.value.exceptions[0], CleanupTimeoutError)
        assert "hang" in str(info.value.exceptions[0])
        assert registry.stats().cleanup_failures == 1

    @pytest.mark.parametrize("shape", ["async generator", "aclose"])
    async def test_a_cleanup_that_swallows_its_deadlines_cancellation_is_reported(
        self, shape: str
    ) -> None:
        """A cleanup still waiting at cleanup_timeout that catches the cancellation and
        returns (as a `try: await ... except CancelledError: pass` does) ran past its bound
        all the same: a CleanupTimeoutError saying so, counted and reported, and the other
        cleanups still run."""
        cleaned: list[str] = []
        registry = Registry(cleanup_timeout=0.05)
        cancelled = anyio.get_cancelled_exc_class()

        async def swallow() -> None:
            try:
                await anyio.sleep_forever()
            except cancelled:
                cleaned.append("swallowed")

        async def generator() -> AsyncIterator[str]:
            yield "swallows"
            await swallow()

        class Client:
            async def aclose(self) -> None:
                await swallow()

        def fine() -> Iterator[str]:
            yield "fine"
            cleaned.append("fine")

        registry.register("fine", fine)
        registry.register("swallows", generator if shape == "async generator" else Client)
        with anyio.fail_after(5), pytest.raises(CleanupError) as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("fine")
                await scope.resolve("swallows")
        assert cleaned == ["swallowed", "fine"]
        [error] = info.value.exceptions
        assert isinstance(error, CleanupTimeoutError)
        assert str(error) == (
            "cleanup of 'swallows' did not finish within 0.05 s (the registry's "
            "cleanup_timeout); it caught its cancellation and returned"
        )
        assert registry.stats().cleaned == 2
        assert registry.stats().cleanup_failures == 1

    @pytest.mark.parametrize("others", [0, 2])
    async def test_an_async_cleanup_that_waits_is_shielded_and_bounded(self, others: int) -> None:
        """An async cleanup that waits runs to its end though the scope closes inside a
        cancelled scope, a second one that hangs is abandoned after cleanup_timeout; alone
        (its bound is the shield too) or beside others (each bound inside the shield)."""
        cleaned: list[str] = []
        registry = Registry(cleanup_timeout=0.2)

        async def waits() -> AsyncIterator[str]:
            yield "waits"
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            cleaned.append("waits")

        async def hangs() -> AsyncIterator[str]:
            yield "hangs"
            cleaned.append("hanging")
            await _hang_until_abandoned()

        def other() -> Iterator[str]:
            yield "other"
            cleaned.append("other")

        registry.register("waits", waits)
        registry.register("hangs", hangs)
        for n in range(others):
            registry.register(f"other{n}", other)
        with anyio.fail_after(5):
            with anyio.CancelScope() as outer:
                async with registry.open_scope(ctx()) as scope:
                    for n in range(others):
                        await scope.resolve(f"other{n}")
                    await scope.resolve("waits")
                    outer.cancel()
            assert cleaned == ["waits"] + ["other"] * others
            cleaned.clear()
            with pytest.raises(CleanupError) as info:
                async with registry.open_scope(ctx()) as scope:
                    for n in range(others):
                        await scope.resolve(f"other{n}")
                    await scope.resolve("hangs")
        assert cleaned == ["hanging"] + ["other"] * others
        assert [type(e) for e in info.value.exceptions] == [CleanupTimeoutError]
        assert registry.stats().cleaned == 2 + 2 * others
        assert registry.stats().cleanup_failures == 1

    @pytest.mark.parametrize("others", [0, 2])
    async def test_an_async_cleanup_may_wait_inside_cancel_scopes_of_its_own(
        self, others: int
    ) -> None:
        """A cleanup that enters cancel scopes and a task group of its own, and waits inside
        them, leaves them in order: the scope bounding it was entered before it started."""
        cleaned: list[str] = []
        registry = Registry(cleanup_timeout=5)

        async def connection() -> AsyncIterator[str]:
            yield "connection"
            with anyio.move_on_after(5):
                await anyio.lowlevel.checkpoint()
                async with anyio.create_task_group() as group:
                    group.start_soon(anyio.lowlevel.checkpoint)
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()
            cleaned.append("connection")

        def other() -> Iterator[str]:
            yield "other"
            cleaned.append("other")

        registry.register("connection", connection)
        for n in range(others):
            registry.register(f"other{n}", other)
        with anyio.fail_after(5):
            async with registry.open_scope(ctx()) as scope:
                for n in range(others):
                    await scope.resolve(f"other{n}")
                await scope.resolve("connection")
        assert cleaned == ["connection"] + ["other"] * others
        assert registry.stats().cleanup_failures == 0

    async def test_failures_are_collected_into_cleanup_error(self) -> None:
        """Two failing cleanups both run and both appear in one CleanupError group."""
        ran: list[str] = []
        registry = Registry()

        def failing(name: str) -> Iterator[str]:
            yield name
            ran.append(name)
            raise RuntimeError(f"{name} failed")

        def ok() -> Iterator[str]:
            yield "ok"
            ran.append("ok")

        registry.register("f1", lambda: failing("f1"))
        registry.register("ok", ok)
        registry.register("f2", lambda: failing("f2"))
        with pytest.raises(CleanupError) as info:
            async with registry.open_scope(ctx()) as scope:
                for key in ("f1", "ok", "f2"):
                    await scope.resolve(key)
        assert ran == ["f2", "ok", "f1"]
        assert [str(e) for e in info.value.exceptions] == ["f2 failed", "f1 failed"]
        assert isinstance(info.value, ExceptionGroup)
        assert isinstance(info.value, ambient.AmbientError)

    async def test_generator_cleanups_that_return_or_yield_again(self) -> None:
        """A generator factory whose cleanup returns a value is cleaned; one that yields
        again is closed and reported as a failed cleanup."""
        steps: list[str] = []
        registry = Registry()

        def returns() -> Iterator[str]:
            yield "returns"
            steps.append("returned")
            return "ignored"

        def yields_again() -> Iterator[str]:
            try:
                yield "again"
                yield "more"
            finally:
                steps.append("closed")

        registry.register("returns", returns)
        registry.register("again", yields_again)
        with pytest.raises(CleanupError) as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("returns")
                await scope.resolve("again")
        assert steps == ["closed", "returned"]
        [failure] = info.value.exceptions
        assert isinstance(failure, RuntimeError)
        assert str(failure) == "generator factory of 'again' yielded more than once"
        assert registry.stats().cleanup_failures == 1

    @pytest.mark.parametrize("kind", ["generator", "async generator"])
    @pytest.mark.parametrize("ending", ["returns", "raises"])
    async def test_a_factory_yielding_again_at_its_cleanup_fails_it_whatever_ended_the_body(
        self, kind: str, ending: str
    ) -> None:
        """A generator or async generator factory that yields a second time at its cleanup
        (one that swallowed the body's error thrown in at its ``yield``, too) is closed,
        its ``finally`` run, and that is a cleanup failure, in a scope whose other
        cleanup is async as in one whose is sync; a generator the body's error went
        through is a cleanup that ran, no failure. The second yield used to pass for a
        cleanup that ran, and the error going through for one that failed."""
        steps: list[str] = []

        def sync_again() -> Iterator[str]:
            try:
                with contextlib.suppress(ValueError):
                    yield "again"
                yield "more"
            finally:
                steps.append("again closed")

        async def async_again() -> AsyncIterator[str]:
            try:
                with contextlib.suppress(ValueError):
                    yield "again"
                yield "more"
            finally:
                steps.append("again closed")

        def sync_through() -> Iterator[str]:
            try:
                yield "through"
            finally:
                steps.append("through closed")

        async def async_through() -> AsyncIterator[str]:
            try:
                yield "through"
            finally:
                steps.append("through closed")

        async def other() -> AsyncIterator[str]:
            try:
                yield "other"
            finally:
                steps.append("other cleaned")

        registry = Registry()
        registry.register("again", sync_again if kind == "generator" else async_again)
        registry.register("through", sync_through if kind == "generator" else async_through)
        registry.register("other", other)
        expected = f"{kind} factory of 'again' yielded more than once"
        with pytest.raises((CleanupError, ValueError)) as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("again")
                await scope.resolve("through")
                await scope.resolve("other")
                if ending == "raises":
                    raise ValueError("the body failed")
        assert sorted(steps) == ["again closed", "other cleaned", "through closed"]
        if ending == "returns":
            assert isinstance(info.value, CleanupError)
            [failure] = info.value.exceptions
            assert str(failure) == expected
        else:
            assert str(info.value) == "the body failed"
            notes = getattr(info.value, "__notes__", [])
            assert len(notes) == 1
            assert expected in notes[0]
        assert registry.stats().cleanup_failures == 1
        assert registry.stats().cleaned == 3

    async def test_body_exception_wins_with_cleanup_failures_as_notes(self) -> None:
        """When the body raised, its exception propagates with cleanup failures noted."""
        registry = Registry()

        class Failing:
            def close(self) -> None:
                raise RuntimeError("cleanup broke")

        registry.register("x", Failing)
        with pytest.raises(KeyError) as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("x")
                raise KeyError("body")
        notes = getattr(info.value, "__notes__", [])
        assert any("cleanup broke" in note for note in notes)

    async def test_a_generator_that_takes_the_bodys_error_and_returns_cleaned_once(
        self,
    ) -> None:
        """A generator factory that catches the body's error thrown in at its ``yield`` and
        returns (a transaction rolled back in an ``except``) ran its cleanup, once: no
        cleanup failure, and the body's error still propagates, untouched."""
        steps: list[str] = []

        def transaction() -> Iterator[str]:
            try:
                yield "tx"
            except ValueError as error:
                steps.append(f"rolled back on {error}")
                return
            steps.append("committed")

        registry = Registry()
        registry.register("tx", transaction)
        with pytest.raises(ValueError, match="the body failed") as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("tx")
                raise ValueError("the body failed")
        assert steps == ["rolled back on the body failed"]
        assert not getattr(info.value, "__notes__", [])
        stats = registry.stats()
        assert (stats.cleaned, stats.cleanup_failures) == (1, 0)

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_a_context_manager_raising_anew_as_it_exits_on_the_bodys_error(
        self, kind: str
    ) -> None:
        """A context manager (sync or async) whose exit raises an error of its own while
        the scope closes on the body's error: that is a cleanup failure, counted and noted
        on the body's error, which is the one that propagates; the other cleanups run."""
        steps: list[str] = []

        class Sync:
            def __enter__(self) -> str:
                return "sync"

            def __exit__(self, *exc_info: object) -> None:
                steps.append(f"exit saw {exc_info[0].__name__}")  # type: ignore[attr-defined]
                raise RuntimeError("rollback broke")

        class Async:
            async def __aenter__(self) -> str:
                return "async"

            async def __aexit__(self, *exc_info: object) -> None:
                steps.append(f"exit saw {exc_info[0].__name__}")  # type: ignore[attr-defined]
                await anyio.lowlevel.checkpoint()
                raise RuntimeError("rollback broke")

        def other() -> Iterator[str]:
            try:
                yield "other"
            finally:
                steps.append("other cleaned")

        registry = Registry()
        registry.register("other", other)
        registry.register("cm", Sync if kind == "sync" else Async)
        with pytest.raises(ValueError, match="the body failed") as info:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("other")
                assert await scope.resolve("cm") == kind
                raise ValueError("the body failed")
        assert steps == ["exit saw ValueError", "other cleaned"]
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1
        assert "rollback broke" in notes[0]
        stats = registry.stats()
        assert (stats.cleaned, stats.cleanup_failures) == (2, 1)

    @pytest.mark.parametrize("where", ["class", "instance", "proxy"])
    @pytest.mark.parametrize("fails", [False, True])
    async def test_a_component_whose_close_is_a_coroutine_function_is_awaited_once(
        self, where: str, fails: bool
    ) -> None:
        """A component whose ``close`` is a coroutine function (and which has no
        ``aclose()``) has it awaited as the scope closes, once, and a failure of it is a
        cleanup failure: an ``async def close()`` of its class, one the instance holds
        itself, or one a proxy forwards from what it wraps."""
        closed: list[str] = []

        class Connection:
            async def close(self) -> None:
                await anyio.lowlevel.checkpoint()
                closed.append("closed")
                if fails:
                    raise RuntimeError("close broke")

        class Holding:
            def __init__(self) -> None:
                self.close = Connection().close

        class Proxy:
            def __init__(self) -> None:
                self._wrapped = Connection()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._wrapped, name)

        factory = {"class": Connection, "instance": Holding, "proxy": Proxy}[where]
        registry = Registry()
        registry.register("connection", factory)
        with contextlib.ExitStack() as stack:
            if fails:
                info = stack.enter_context(pytest.raises(CleanupError))
            for _ in range(2):  # the second scope finds the class already looked at
                async with registry.open_scope(ctx()) as scope:
                    component = await scope.resolve("connection")
                    assert isinstance(component, factory)
                    assert await scope.resolve("connection") is component
                    assert closed == []
                if fails:
                    break
                assert closed == ["closed"]
                closed.clear()
        if fails:
            assert [str(e) for e in info.value.exceptions] == ["close broke"]
            assert closed == ["closed"]
        assert registry.stats().cleanup_failures == (1 if fails else 0)

    @pytest.mark.parametrize(
        "made_by",
        [
            "a plain function returning an async generator",
            "an async function returning an async generator",
            "an async function returning a generator",
            "an async function returning a context manager",
        ],
    )
    @pytest.mark.parametrize("ending", ["returns", "raises"])
    async def test_what_a_factory_returns_to_be_iterated_or_entered_is_cleaned_once(
        self, made_by: str, ending: str
    ) -> None:
        """A generator, an async generator or a context manager that a factory returns
        (rather than is) is iterated or entered as the factory itself would be: the
        component is what it yields or enters, and its cleanup runs once as the scope
        closes, seeing the body's error if there was one."""
        steps: list[str] = []

        def gen() -> Iterator[str]:
            try:
                yield "made"
            except ValueError:
                steps.append("saw the error")
                raise
            finally:
                steps.append("cleaned")

        async def agen() -> AsyncIterator[str]:
            try:
                yield "made"
            except ValueError:
                steps.append("saw the error")
                raise
            finally:
                await anyio.lowlevel.checkpoint()
                steps.append("cleaned")

        cm = contextlib.contextmanager(gen)

        async def returns_agen() -> AsyncIterator[str]:
            return agen()

        async def returns_gen() -> Iterator[str]:
            return gen()

        async def returns_cm() -> contextlib.AbstractContextManager[str]:
            return cm()

        factory: Callable[[], Any] = {
            "a plain function returning an async generator": lambda: agen(),
            "an async function returning an async generator": returns_agen,
            "an async function returning a generator": returns_gen,
            "an async function returning a context manager": returns_cm,
        }[made_by]
        registry = Registry()
        registry.register("made", factory)
        raised = pytest.raises(ValueError, match="the body failed")
        with raised if ending == "raises" else contextlib.nullcontext():
            async with registry.open_scope(ctx()) as scope:
                assert await scope.resolve("made") == "made"
                assert await scope.resolve("made") == "made"
                assert steps == []
                if ending == "raises":
                    raise ValueError("the body failed")
        assert steps == (["saw the error"] if ending == "raises" else []) + ["cleaned"]
        stats = registry.stats()
        assert (stats.cleaned, stats.cleanup_failures) == (1, 0)

    async def test_an_unentered_async_context_manager_is_closed_by_its_aclose(self) -> None:
        """A component registered with ``enter=False`` that is an async context manager
        with an ``aclose()`` (a client such as ``httpx.AsyncClient``) is handed out as is,
        not entered, and closed by its ``aclose()`` once as the scope closes."""
        steps: list[str] = []

        class Client:
            async def __aenter__(self) -> Client:
                steps.append("entered")
                return self

            async def __aexit__(self, *exc_info: object) -> None:
                steps.append("exited")

            async def aclose(self) -> None:
                await anyio.lowlevel.checkpoint()
                steps.append("aclosed")

        registry = Registry()
        registry.register(Client, Client, enter=False)
        async with registry.open_scope(ctx()) as scope:
            client = await scope.resolve(Client)
            assert isinstance(client, Client)
            assert steps == []
        assert steps == ["aclosed"]
        stats = registry.stats()
        assert (stats.cleaned, stats.cleanup_failures) == (1, 0)

    async def test_base_exception_from_a_cleanup_runs_the_others_first(self) -> None:
        """A cleanup raising a BaseException (KeyboardInterrupt) does not skip the others;
        it propagates once all ran, and the scope is unbound."""
        ran: list[str] = []
        registry = Registry()

        class Interrupting:
            def close(self) -> None:
                ran.append("interrupting")
                raise KeyboardInterrupt

        def other() -> Iterator[str]:
            yield "other"
            ran.append("other")

        registry.register("other", other)
        registry.register("interrupting", Interrupting)
        with pytest.raises(KeyboardInterrupt):
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("other")
                await scope.resolve("interrupting")
        assert ran == ["interrupting", "other"]
        assert ambient.current_context_or_none() is None
        assert registry.stats().open_scopes == 0

    async def test_closed_scope_refuses_resolution(self) -> None:
        """Resolving from a closed scope raises ScopeClosedError."""
        registry = Registry()
        registry.register("x", object)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve("x")
        with pytest.raises(ScopeClosedError, match="closed"):
            await scope.resolve("x")
        with pytest.raises(ScopeClosedError):
            scope.resolve_sync("x")
        assert scope.closed

    @pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER, Lifetime.APP])
    async def test_a_closed_scope_refuses_a_component_without_making_it(
        self, lifetime: Lifetime
    ) -> None:
        """A closed scope refuses a component it never made, with ScopeClosedError, and
        never calls its factory: an APP component made for a closed scope was made (and
        kept by the application) only to be refused."""

        class Refused(Counter):
            created = 0  # its own count, not the other tests'

        registry = Registry()
        registry.register(Refused, Refused, lifetime=lifetime)
        async with registry.open_scope(ctx()) as scope:
            pass
        with pytest.raises(ScopeClosedError, match="scope has closed"):
            await scope.resolve(Refused)
        with pytest.raises(ScopeClosedError, match="scope has closed"):
            scope.resolve_sync(Refused)
        assert Refused.created == 0
        assert registry.stats().created == 0
        await registry.aclose()

    @pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER, Lifetime.APP])
    async def test_a_closed_scope_hands_out_nothing_it_resolved(self, lifetime: Lifetime) -> None:
        """What a scope resolved while open is refused once it has closed, whatever its
        lifetime: an APP component, alive with the application, is still not handed out
        by the closed scope of a request that made nothing of its own."""
        registry = Registry()
        registry.register(Counter, Counter, lifetime=lifetime)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve(Counter)
        with pytest.raises(ScopeClosedError, match="scope has closed"):
            await scope.resolve(Counter)
        with pytest.raises(ScopeClosedError, match="scope has closed"):
            scope.resolve_sync(Counter)
        await registry.aclose()

    async def test_unopened_scope_refuses_resolution(self) -> None:
        """A scope must be entered before it resolves."""
        registry = Registry()
        registry.register("x", object)
        scope = registry.open_scope(ctx())
        with pytest.raises(ScopeClosedError, match="not open"):
            await scope.resolve("x")

    async def test_scope_enters_once(self) -> None:
        """Re-entering a scope is refused."""
        registry = Registry()
        async with registry.open_scope(ctx()) as scope:
            pass
        with pytest.raises(RuntimeError, match="entered once"):
            async with scope:
                pass  # pragma: no cover

    async def test_scope_closed_before_entering_refuses_to_open(self) -> None:
        """A scope closed before it was entered (an error path that closed it) cannot be
        entered afterwards: it would bind its context and never unbind it, and count as
        open for good (shutdown's wait_for_scopes() waiting out cleanup_timeout)."""
        registry = Registry()
        scope = registry.open_scope(ctx())
        await scope.aclose()
        with pytest.raises(ScopeClosedError, match="closed"):
            async with scope:
                pass  # pragma: no cover
        assert ambient.current_context_or_none() is None
        assert registry.stats().open_scopes == 0

    async def test_a_closing_scope_hands_out_no_user_component_being_cleaned(self) -> None:
        """Work still running in a scope whose close is cleaning its user's components (the
        last scope of an idle_ttl=0 user) gets ScopeClosedError, never the component from
        the scope's cache while, or after, it is cleaned (a per-user pool being closed)."""
        registry = Registry()
        cleaning = anyio.Event()
        resolved = anyio.Event()

        class Pool:
            closed = False

            async def aclose(self) -> None:
                cleaning.set()
                await resolved.wait()
                self.closed = True

        registry.register(Pool, Pool, lifetime=Lifetime.USER, idle_ttl=0)
        got: list[object] = []
        # Bounded: a close that skips the expiry never reaches the cleanup the task waits on.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg, registry.open_scope(ctx()) as scope:
                await scope.resolve(Pool)

                async def late() -> None:  # started in the request, without a hold
                    await cleaning.wait()
                    try:
                        got.append(await ambient.resolve(Pool))
                    except ScopeClosedError as exc:
                        got.append(exc)
                    finally:
                        resolved.set()

                tg.start_soon(late)
        assert len(got) == 1
        assert isinstance(got[0], ScopeClosedError)
        await registry.aclose()

    @pytest.mark.parametrize("cleanup", ["sync", "async"])
    async def test_a_cleanup_resolves_nothing_from_its_closing_scope(self, cleanup: str) -> None:
        """A cleanup that resolves from the scope it is cleaned with gets ScopeClosedError,
        never a component from the scope's cache: cleanups run newest first, so that one
        has been cleaned already."""
        registry = Registry()
        got: list[object] = []

        def resolve_newer() -> None:
            try:
                got.append(ambient.resolve_sync("newer"))
            except ScopeClosedError as exc:
                got.append(exc)

        def older_sync() -> Iterator[str]:
            yield "older"
            resolve_newer()

        async def older_async() -> AsyncIterator[str]:
            yield "older"
            resolve_newer()

        registry.register("older", older_sync if cleanup == "sync" else older_async)
        registry.register("newer", Counter)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve("older")
            newer = await scope.resolve("newer")
        assert newer.closed == 1
        assert len(got) == 1
        assert isinstance(got[0], ScopeClosedError)

    async def test_creation_finishing_after_close_is_cleaned(self) -> None:
        """A component whose factory finishes after its scope closed is cleaned at once."""
        registry = Registry()
        started = anyio.Event()
        finish = anyio.Event()
        cleaned: list[str] = []

        async def slow() -> AsyncIterator[str]:
            started.set()
            await finish.wait()
            yield "late"
            cleaned.append("late")

        registry.register("late", slow)
        errors: list[BaseException] = []
        scope = registry.open_scope(ctx())
        async with scope, anyio.create_task_group() as tg:

            async def late_resolver() -> None:
                try:
                    await scope.resolve("late")
                except ScopeClosedError as exc:
                    errors.append(exc)

            tg.start_soon(late_resolver)
            await started.wait()
            await scope.aclose()
            finish.set()
        assert cleaned == ["late"]
        assert len(errors) == 1

    async def test_resource_warning_when_collected_with_pending_cleanups(self) -> None:
        """A scope garbage-collected with cleanups pending warns."""
        registry = Registry()
        registry.register("x", lambda: Counter())
        scope = registry.open_scope(ctx())
        await scope.__aenter__()
        await scope.resolve("x")
        from ambient._binding import _current

        binding = _current.get()
        assert binding is not None
        ambient._binding.unbind(binding)
        binding.scope = None
        del binding
        with pytest.warns(ResourceWarning, match="cleanup"):
            del scope
            gc.collect()

    async def test_stats_count_what_happened(self) -> None:
        """stats() counts scopes, components, cleanups and failures."""
        registry = Registry()

        def failing() -> Iterator[str]:
            yield "f"
            raise RuntimeError("x")

        registry.register("a", object)
        registry.register("f", failing)
        registry.register("u", object, lifetime=Lifetime.USER)
        async with registry.open_scope(ctx()) as scope:
            await scope.resolve("a")
            await scope.resolve("u")
            assert registry.stats().open_scopes == 1
        with pytest.raises(CleanupError):
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("f")
        stats = registry.stats()
        assert (stats.open_scopes, stats.created, stats.cleaned) == (0, 3, 2)
        assert (stats.live_users, stats.live_user_components, stats.cleanup_failures) == (1, 1, 1)
        await registry.aclose()
        assert registry.stats().cleaned == 3


class TestHold:
    async def test_task_without_hold_gets_scope_closed_error(self) -> None:
        """Work that outlives its request cannot use the request's components."""
        registry = Registry()
        registry.register("x", object)
        closed = anyio.Event()
        outcome: list[BaseException] = []

        async def later() -> None:
            await closed.wait()
            try:
                await ambient.resolve("x")
            except ScopeClosedError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            async with registry.open_scope(ctx()):
                tg.start_soon(later)
            closed.set()
        assert len(outcome) == 1
        assert "outlives its request" in str(outcome[0]) or "closed" in str(outcome[0])

    async def test_hold_keeps_components_alive_until_released(self) -> None:
        """A held scope waits for the holder before cleaning up."""
        registry = Registry()
        order: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            order.append("cleaned")

        registry.register("x", make)
        body_done = anyio.Event()

        async def job(hold: object) -> None:
            with hold:  # type: ignore[attr-defined]
                await body_done.wait()
                order.append(await ambient.resolve("x"))

        async with anyio.create_task_group() as tg:
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve("x")
                tg.start_soon(job, scope.hold())
                body_done.set()
            order.append("closed")
        assert order == ["component", "cleaned", "closed"]

    async def test_a_native_cancel_while_waiting_for_a_hold_still_cleans_up(
        self, anyio_backend: str
    ) -> None:
        """asyncio's own ``task.cancel()`` gets through anyio's shield: a scope cancelled
        that way while it waits for a hold still cleans its components, releases its user's
        and ends, then lets the cancellation through."""
        if anyio_backend != "asyncio":
            pytest.skip("task.cancel() is asyncio's; trio has only cancel scopes")
        import asyncio

        registry = Registry()
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            try:
                yield "request"
            finally:
                cleaned.append("request")

        scope, hold = await _held_scope(registry, make)
        closing = asyncio.ensure_future(scope.__aexit__(None, None, None))
        await anyio.wait_all_tasks_blocked()
        assert not closing.done()  # waiting for the hold
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert cleaned == ["request"]
        assert scope.closed
        assert registry.stats().open_scopes == 0
        assert [entry.refs for entry in registry._users.values()] == [0]
        with hold:
            pass  # releasing it late is harmless
        await registry.aclose()

    async def test_a_native_cancel_while_waiting_for_a_hold_is_what_ended_the_scope(
        self, anyio_backend: str
    ) -> None:
        """The body ended well, then asyncio's own ``task.cancel()`` cut the close short
        while it waited for a hold: the observers see that cancellation as what ended the
        scope, not a scope that ended normally."""
        if anyio_backend != "asyncio":
            pytest.skip("task.cancel() is asyncio's; trio has only cancel scopes")
        import asyncio

        ended: list[BaseException | None] = []

        class Watch(ambient.Observer):
            def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
                ended.append(scope.exception)

        registry = Registry(telemetry=Watch())
        scope, hold = await _held_scope(registry, lambda: iter(["request"]))
        closing = asyncio.ensure_future(scope.__aexit__(None, None, None))
        await anyio.wait_all_tasks_blocked()
        assert not closing.done()  # waiting for the hold
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert [type(error) for error in ended] == [asyncio.CancelledError]
        hold.release()
        await registry.aclose()

    async def test_a_native_cancel_during_expiry_keeps_the_failure_of_a_lone_cleanup(
        self, anyio_backend: str
    ) -> None:
        """A scope's one async cleanup fails, then asyncio's own ``task.cancel()`` lands
        while its close runs another user's expiry: the scope still ends with that
        failure, for its observers and in ``cleanup_failures``."""
        if anyio_backend != "asyncio":
            pytest.skip("task.cancel() is asyncio's; trio has only cancel scopes")
        import asyncio

        clock = _Clock()
        seen: list[tuple[Exception, ...]] = []

        class Watch(ambient.Observer):
            def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
                seen.append(failures)

        registry = Registry(clock=clock, telemetry=Watch())
        expiring, release = anyio.Event(), anyio.Event()

        async def session() -> AsyncIterator[str]:
            yield "session"
            expiring.set()
            await release.wait()

        async def connection() -> AsyncIterator[str]:
            yield "connection"
            await anyio.lowlevel.checkpoint()
            raise LookupError("connection lost")

        registry.register("session", session, lifetime=Lifetime.USER, idle_ttl=10)
        registry.register("connection", connection)
        async with registry.open_scope(ctx("bob")) as scope:
            await scope.resolve("session")
        scope = registry.open_scope(ctx("alice"))
        await scope.__aenter__()
        await scope.resolve("connection")
        clock.now = 100.0  # bob's session expires as alice's scope closes
        seen.clear()
        closing = asyncio.ensure_future(scope.__aexit__(None, None, None))
        with anyio.fail_after(5):
            await expiring.wait()
            closing.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await closing
        assert scope.closed
        assert [[type(e) for e in failures] for failures in seen] == [[LookupError]]
        assert scope.cleanup_failures == 1
        await registry.aclose()

    async def test_a_close_cancelled_while_waiting_for_a_hold_still_waits_for_it(
        self,
    ) -> None:
        """The task closing a held scope is cancelled (a server cancelling the request):
        the wait for the hold is shielded, so the held work keeps its components until
        it releases the hold, and only then are they cleaned."""
        registry = Registry()
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            yield "request"
            cleaned.append("request")

        scope, hold = await _held_scope(registry, make)
        cancelled = anyio.CancelScope()

        async def closing() -> None:
            with cancelled:
                await scope.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(closing)
            await anyio.wait_all_tasks_blocked()
            cancelled.cancel()
            await anyio.wait_all_tasks_blocked()
            assert cleaned == []  # still waiting for the hold
            assert await scope.resolve("request") == "request"
            hold.release()
        assert cleaned == ["request"]
        assert scope.closed
        await registry.aclose()

    async def test_a_closed_scope_cannot_be_held(self) -> None:
        """A hold taken once the scope has closed would keep nothing open: refused."""
        registry = Registry()
        async with registry.open_scope(ctx()) as scope:
            pass
        with pytest.raises(ScopeClosedError, match="already closed"):
            scope.hold()
        assert scope._holds == 0

    async def test_a_hold_released_twice_leaves_the_other_holds_keeping_the_scope(
        self,
    ) -> None:
        """A hold released twice (``with hold:`` and then ``hold.release()``) counts once:
        the close still waits for another task's hold, whose work goes on using the
        request's component, which is cleaned once, after that hold's release."""
        cleaned: list[str] = []

        def component() -> Iterator[str]:
            yield "component"
            cleaned.append("component")

        registry = Registry(cleanup_timeout=60)
        registry.register("component", component)
        release = anyio.Event()
        used: list[str] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg, registry.open_scope(ctx()) as scope:
                await scope.resolve("component")
                first, second = scope.hold(), scope.hold()
                with first:
                    pass
                first.release()

                async def held_work() -> None:
                    with second:
                        await release.wait()
                        used.append(await scope.resolve("component"))

                tg.start_soon(held_work)
                closing = anyio.Event()

                async def watch() -> None:
                    await anyio.wait_all_tasks_blocked()
                    closing.set()
                    assert cleaned == [], "cleaned while a hold was still active"
                    release.set()

                tg.start_soon(watch)
            assert closing.is_set()
        assert used == ["component"]
        assert cleaned == ["component"]

    async def test_two_closes_waiting_for_one_hold_end_the_scope_once(self) -> None:
        """Two tasks close a held scope (the request's end and a shutdown, say): the
        release wakes both, the scope is cleaned and counted once, and neither waits out
        the cleanup timeout."""
        closed: list[ambient.Scope] = []

        class Closes(ambient.Observer):
            def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
                closed.append(scope)

        registry = Registry(cleanup_timeout=60, telemetry=Closes())
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            cleaned.append("component")

        scope, hold = await _held_scope(registry, make)
        with anyio.fail_after(10):  # the old code waited for cleanup_timeout (60 s)
            async with anyio.create_task_group() as tg:
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                hold.release()
        assert (cleaned, closed) == (["component"], [scope])
        assert registry.stats().open_scopes == 0
        assert [entry.refs for entry in registry._users.values()] == [0]
        await registry.aclose()

    async def test_a_hold_taken_as_the_last_one_is_released_is_waited_for_too(self) -> None:
        """Held work that hands over to more held work (it takes a new hold, or
        ``hold_scope`` does, right as its own goes) keeps the scope open: a close waiting
        for the first hold waits for the second too, instead of cleaning the components
        under it because the first release had woken it."""
        registry = Registry(cleanup_timeout=60)
        order: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            order.append("cleaned")

        scope, first = await _held_scope(registry, make)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                first.release()
                second = scope.hold()
                await anyio.wait_all_tasks_blocked()
                order.append("second hold still active")
                assert await scope.resolve("request") == "component"
                second.release()
        assert order == ["second hold still active", "cleaned"]
        assert registry.stats().open_scopes == 0
        await registry.aclose()

    async def test_a_hold_released_in_a_worker_thread_lets_the_scope_close(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hold handed to a thread with the work it keeps the scope for (``executor.submit
        (ambient.wrap(job), hold)``) and released there wakes the closing scope on its event
        loop: it neither fails in the thread (trio: "must be called from async context")
        nor leaves the close waiting out cleanup_timeout (asyncio's loop was not woken by
        the release, only by whatever woke it next)."""
        registry = Registry(cleanup_timeout=5)
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            cleaned.append("component")

        scope, hold = await _held_scope(registry, make)
        errors: list[BaseException] = []

        def job() -> None:
            try:
                hold.release()
            except BaseException as exc:  # asserted below
                errors.append(exc)

        thread = threading.Thread(target=job)
        with caplog.at_level(logging.WARNING, logger="ambient"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                thread.start()
        thread.join()
        assert errors == []
        # A lost release shows as the close giving up on the hold after cleanup_timeout.
        assert not [r for r in caplog.records if "still active" in r.getMessage()]
        assert cleaned == ["component"]
        assert registry.stats().open_scopes == 0
        await registry.aclose()

    async def test_a_hold_taken_in_a_worker_thread_is_released_on_the_scope_s_loop(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hold taken where a sync endpoint runs (a worker thread of the loop,
        ``anyio.to_thread.run_sync``) and released in the thread its work went to wakes
        the closing scope on its event loop, as one taken on the loop does: it knew no loop,
        so its release failed there (trio: "must be called from async context") and the
        close waited out cleanup_timeout."""
        registry = Registry(cleanup_timeout=5)
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            cleaned.append("component")

        scope, first = await _held_scope(registry, make)
        hold = await anyio.to_thread.run_sync(scope.hold)
        first.release()
        errors: list[BaseException] = []

        def job() -> None:
            try:
                hold.release()
            except BaseException as exc:  # asserted below
                errors.append(exc)

        thread = threading.Thread(target=job)
        with caplog.at_level(logging.WARNING, logger="ambient"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                assert cleaned == []  # the hold taken in the thread keeps the scope open
                thread.start()
        thread.join()
        assert errors == []
        # A lost release shows as the close giving up on the hold after cleanup_timeout.
        assert not [r for r in caplog.records if "still active" in r.getMessage()]
        assert cleaned == ["component"]
        assert registry.stats().open_scopes == 0
        await registry.aclose()

    async def test_a_hold_a_raw_thread_takes_as_the_scope_closes_still_gets_its_cleanup(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A raw thread has found the scope open and takes a hold just as the close,
        finding no hold yet but an async cleanup to await, marks the scope closed: the close
        waits for that hold, then cleans up. It took the scope marked closed for another
        close that had taken over, and returned: the cleanup never ran."""
        import ambient._scope

        registry = Registry(cleanup_timeout=20)
        cleaned: list[str] = []

        async def make() -> AsyncIterator[str]:
            yield "component"
            cleaned.append("component")

        registry.register("component", make)
        scope = registry.open_scope(ctx())
        await scope.__aenter__()
        await scope.resolve("component")
        holds: list[Any] = []
        checked, marked, held = threading.Event(), threading.Event(), threading.Event()
        loop_call_soon = ambient._scope.loop_call_soon

        def paused_call_soon() -> Any:
            if threading.current_thread() is thread:
                checked.set()  # the thread found the scope open
                marked.wait(10)  # the close marks it closed meanwhile
            return loop_call_soon()

        def job() -> None:
            try:
                holds.append(scope.hold())
            finally:
                held.set()

        close_now = Scope._close_now

        def close_now_then_hold(self: Scope, exc: BaseException | None) -> Any:
            done = close_now(self, exc)
            marked.set()
            held.wait(10)  # the thread's hold lands before the close goes on
            return done

        monkeypatch.setattr(ambient._scope, "loop_call_soon", paused_call_soon)
        monkeypatch.setattr(Scope, "_close_now", close_now_then_hold)
        thread = threading.Thread(target=job)
        with anyio.fail_after(10):
            thread.start()
            # Bounded (a wait in a worker thread is no deadline's to cancel): else a hang.
            assert await anyio.to_thread.run_sync(checked.wait, 10), (
                "hold() in a thread did not look for the event loop to be taken on its thread"
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(scope.aclose)
                await anyio.wait_all_tasks_blocked()
                assert len(holds) == 1
                assert cleaned == []  # waiting for the thread's hold
                holds[0].release()
            await anyio.to_thread.run_sync(thread.join, 10)
            assert not thread.is_alive(), "the thread taking the hold did not end within 10 s"
        assert cleaned == ["component"]

    async def test_a_hold_taken_in_a_raw_thread_wakes_the_close_when_released_there(
        self,
    ) -> None:
        """A hold taken in a thread no anyio loop started (``threading.Thread(target=
        ambient.wrap(job))``, whose ``job`` holds ``ambient.current_scope()``) and released
        there once the request's body has ended wakes the closing scope on its event loop:
        the release failed there on trio ("must be called from async context"), and on
        asyncio it did not wake the loop, so the close waited out cleanup_timeout (or
        whatever woke the loop next)."""
        registry = Registry(cleanup_timeout=20)
        cleaned: list[str] = []

        def make() -> Iterator[str]:
            yield "component"
            cleaned.append("component")

        scope, first = await _held_scope(registry, make)
        taken, go_on = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def job() -> None:
            try:
                hold = ambient.current_scope().hold()
                taken.set()
                go_on.wait(10)
                hold.release()
            except BaseException as exc:  # asserted below
                errors.append(exc)
                taken.set()

        thread = threading.Thread(target=ambient.wrap(job))  # _held_scope bound the scope
        thread.start()
        await anyio.to_thread.run_sync(taken.wait)
        first.release()
        closed = anyio.Event()

        async def close() -> None:
            await scope.aclose()
            closed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            assert cleaned == []  # the hold taken in the thread keeps the scope open
            go_on.set()
            # Woken by the release alone: nothing else here wakes the loop before this
            # deadline (well within the close's own bound, cleanup_timeout).
            with anyio.move_on_after(5) as waited:
                await closed.wait()
        assert not waited.cancel_called
        await anyio.to_thread.run_sync(thread.join)
        assert errors == []
        assert cleaned == ["component"]
        assert registry.stats().open_scopes == 0
        await registry.aclose()

    async def test_scope_messages_name_the_run_never_the_user(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A scope's repr goes into warnings and error messages, and from there into log
        records and spans: it names the run, not the user (whose id may be personal data
        that telemetry and logging hash)."""
        registry = Registry(cleanup_timeout=0.05)
        context = ctx("alice-secret@example.com")
        scope = registry.open_scope(context)
        await scope.__aenter__()
        hold = scope.hold()
        with caplog.at_level(logging.WARNING, logger="ambient"):
            await scope.aclose()  # the hold outlives cleanup_timeout: a warning
        hold.release()
        messages = [r.getMessage() for r in caplog.records]
        assert any("still active" in m for m in messages), messages
        assert context.run_id in repr(scope)
        assert not any("alice" in text for text in [*messages, repr(scope)])


class ComponentEvents(ambient.Observer):
    """Keeps every component event it is told of, in order."""

    def __init__(self) -> None:
        self.events: list[ambient.ComponentEvent] = []

    def component_created(self, event: ambient.ComponentEvent) -> None:
        self.events.append(event)

    def component_cleaned(self, event: ambient.ComponentEvent) -> None:
        self.events.append(event)


class TestObservers:
    async def test_an_inactive_observer_sees_nothing_of_the_scope(self) -> None:
        calls: list[str] = []

        class Dormant(ambient.Observer):
            @property
            def active(self) -> bool:
                return False

            def scope_opened(self, scope: ambient.Scope) -> None:
                calls.append("opened")

            def component_created(self, event: ambient.ComponentEvent) -> None:
                calls.append("created")

        class Awake(ambient.Observer):
            def component_created(self, event: ambient.ComponentEvent) -> None:
                calls.append("awake created")

        registry = Registry(telemetry=Dormant())
        registry.register(Counter, Counter)
        async with registry.open_scope(ctx(), observer=Awake()) as scope:
            await ambient.resolve(Counter)
            assert len(scope.observers) == 1
        assert calls == ["awake created"]

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    @pytest.mark.parametrize("call", ["resolve", "resolve_sync"])
    async def test_observers_see_a_shared_component_fail_then_made(
        self, lifetime: Lifetime, call: str
    ) -> None:
        """A USER or APP component whose factory raises once: the scope's observers are
        told of the failure (no instance, the error), then of the component made on the
        next try; nothing is cached from the failure."""
        tries: list[str] = []

        def make() -> str:
            tries.append("try")
            if len(tries) == 1:
                raise ConnectionError("the store is not up yet")
            return f"store #{len(tries)}"

        observer = ComponentEvents()
        registry = Registry()
        registry.register("store", make, lifetime=lifetime)

        async def resolve(scope: Scope) -> Any:
            if call == "resolve":
                return await scope.resolve("store")
            return scope.resolve_sync("store")

        async with registry.open_scope(ctx("alice"), observer=observer) as scope:
            with pytest.raises(ConnectionError, match="not up yet"):
                await resolve(scope)
            [failed] = observer.events
            assert (failed.key, failed.lifetime, failed.instance, failed.scope) == (
                "store",
                lifetime,
                None,
                scope,
            )
            assert isinstance(failed.error, ConnectionError)
            assert await resolve(scope) == "store #2"
            assert await resolve(scope) == "store #2"
        assert [(event.instance, event.error is None) for event in observer.events] == [
            (None, False),
            ("store #2", True),
        ]
        assert tries == ["try", "try"]
        await registry.aclose()

    @pytest.mark.parametrize("shape", ["awaitable", "async context manager"])
    async def test_observers_see_a_plain_factorys_awaited_result_made_or_failed(
        self, shape: str
    ) -> None:
        """A plain function that returns an awaitable, or an async context manager, is
        finished by awaiting it: observers are told of the component then, made (with the
        instance) or failed (with the error), as of any other."""
        entered: list[str] = []

        @contextlib.asynccontextmanager
        async def managed(user: str) -> AsyncIterator[str]:
            entered.append(user)
            if user == "bob":
                raise LookupError("bob has no session")
            yield f"session of {user}"
            entered.append(f"{user} left")

        async def awaited(user: str) -> str:
            await anyio.lowlevel.checkpoint()
            if user == "bob":
                raise LookupError("bob has no session")
            return f"session of {user}"

        def plain(context: UserExecutionContext) -> Any:
            make = awaited if shape == "awaitable" else managed
            return make(context.user_id)

        observer = ComponentEvents()
        registry = Registry(telemetry=observer)
        registry.register("session", plain)
        async with registry.open_scope(ctx("alice")) as scope:
            assert await scope.resolve("session") == "session of alice"
            [made] = observer.events
            assert (made.key, made.lifetime, made.instance, made.error) == (
                "session",
                Lifetime.REQUEST,
                "session of alice",
                None,
            )
            assert made.scope is scope
            assert made.user is not None
            assert made.user.user_id == "alice"
            assert made.duration >= 0
        with pytest.raises(LookupError, match="bob has no session"):
            async with registry.open_scope(ctx("bob")) as scope:
                await scope.resolve("session")
        failed = observer.events[-1]
        assert (failed.key, failed.instance, failed.scope) == ("session", None, scope)
        assert isinstance(failed.error, LookupError)
        assert failed.user is not None
        assert failed.user.user_id == "bob"
        # alice's made, alice's cleaned, bob's failed: nothing else, nothing twice.
        assert [(event.instance, event.error is None) for event in observer.events] == [
            ("session of alice", True),
            ("session of alice", True),
            (None, False),
        ]
        if shape == "async context manager":
            assert entered == ["alice", "alice left", "bob"]
        await registry.aclose()

    async def test_observers_see_what_ended_the_body(self) -> None:
        ended: list[BaseException | None] = []

        class Watcher(ambient.Observer):
            def scope_closed(
                self, scope: ambient.Scope, failures: tuple[BaseException, ...]
            ) -> None:
                ended.append(scope.exception)

        registry = Registry(telemetry=Watcher())
        failure = ValueError("body failed")
        async with registry.open_scope(ctx()):
            pass
        with pytest.raises(ValueError, match="body failed"):
            async with registry.open_scope(ctx()):
                raise failure
        with anyio.CancelScope() as cancelled:
            async with registry.open_scope(ctx()):
                cancelled.cancel()
                await anyio.sleep_forever()
        assert ended[0] is None
        assert ended[1] is failure
        assert ended[2] is not None
        assert not isinstance(ended[2], Exception)

    async def test_a_closed_scope_keeps_nothing_of_what_ended_it(self) -> None:
        """Observers see what ended the body as the scope closes; the closed scope then
        answers ``None`` and keeps neither that exception (whose traceback holds every
        frame's locals) nor its state, whatever still refers to the scope."""
        ended: list[BaseException | None] = []

        class Watcher(ambient.Observer):
            def scope_closed(
                self, scope: ambient.Scope, failures: tuple[BaseException, ...]
            ) -> None:
                ended.append(scope.exception)

        registry = Registry(telemetry=Watcher())
        registry.register(Counter, Counter)
        failure = ValueError("body failed")
        with pytest.raises(ValueError, match="body failed"):
            async with registry.open_scope(ctx()) as scope:
                await scope.resolve(Counter)
                scope.state["seen"] = True
                raise failure
        assert ended == [failure]
        assert scope.exception is None
        assert scope.state == {}

    async def test_a_failing_observer_is_logged_once_and_the_requests_go_on(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An observer that fails at every event is logged once, with its traceback, not
        once per event (a broken telemetry under load would flood the log); every request
        goes on, and another observer, failing too (with any exception), is logged once of
        its own."""
        seen: list[str] = []

        class Broken(ambient.Observer):
            def scope_opened(self, scope: ambient.Scope) -> None:
                raise RuntimeError("opened")

            def component_created(self, event: ambient.ComponentEvent) -> None:
                raise RuntimeError("created")

        class AlsoBroken(ambient.Observer):
            def component_cleaned(self, event: ambient.ComponentEvent) -> None:
                seen.append(event.user.user_id if event.user else "")
                raise ValueError("cleaned")

        broken, also = Broken(), AlsoBroken()
        registry = Registry(telemetry=broken)
        registry.register(Counter, Counter)
        caplog.set_level(logging.ERROR, logger="ambient")
        for n in range(5):
            async with registry.open_scope(UserExecutionContext.create(f"u{n}"), observer=also):
                assert isinstance(await ambient.resolve(Counter), Counter)
        assert seen == [f"u{n}" for n in range(5)]
        failed = [r for r in caplog.records if "observer" in r.getMessage()]
        assert [(r.args[0], r.args[1]) for r in failed] == [  # type: ignore[index]
            (broken, "scope_opened"),
            (also, "component_cleaned"),
        ]
        assert all(r.exc_info is not None for r in failed)
        await registry.aclose()

    async def test_each_failing_observer_is_logged_even_at_a_reused_address(self) -> None:
        """Observers made and dropped one after the other (a registry's telemetry per job,
        per test) often get the address, and so the id(), of the one before: each one that
        fails is logged all the same. One at the address of an observer already logged
        used to be taken for it, and its failures were never logged."""

        class Broken(ambient.Observer):
            def scope_opened(self, scope: ambient.Scope) -> None:
                raise RuntimeError("opened")

        messages: list[str] = []

        class Formatted(logging.Handler):
            """Keeps the message alone, as a handler writing lines does: not the record,
            whose arguments would keep each observer, and its address, taken."""

            def emit(self, record: logging.LogRecord) -> None:
                messages.append(record.getMessage())

        ambient_logger = logging.getLogger("ambient")
        handler = Formatted(logging.ERROR)
        ambient_logger.addHandler(handler)
        ambient_logger.propagate = False
        registry = Registry()
        addresses: set[int] = set()
        try:
            for n in range(5):
                watcher = Broken()
                addresses.add(id(watcher))
                remove = ambient.add_observer(watcher)
                del watcher
                async with registry.open_scope(UserExecutionContext.create(f"u{n}")):
                    assert ambient.get_current_context().user_id == f"u{n}"
                remove()
                del remove
        finally:
            ambient_logger.propagate = True
            ambient_logger.removeHandler(handler)
            await registry.aclose()
        assert len(messages) == 5, (messages, len(addresses))
        assert all("failed in scope_opened" in message for message in messages)

    async def test_an_observer_that_cannot_be_weakly_referred_to_is_logged_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An observer that is also a tuple (no weak reference can be made to it) and fails
        in every scope is logged once, as any other: it is kept alive to be known again,
        not logged anew at each scope."""

        class Labelled(ambient.Observer, tuple[str, ...]):
            def scope_opened(self, scope: ambient.Scope) -> None:
                raise RuntimeError("opened")

        watcher = Labelled(("audit",))
        with pytest.raises(TypeError):
            weakref.ref(watcher)
        registry = Registry(telemetry=watcher)
        caplog.set_level(logging.ERROR, logger="ambient")
        for n in range(3):
            async with registry.open_scope(UserExecutionContext.create(f"u{n}")):
                pass
        failed = [r for r in caplog.records if "failed in scope_opened" in r.getMessage()]
        assert len(failed) == 1
        await registry.aclose()

    async def test_removing_an_observer_leaves_one_equal_to_it(self) -> None:
        """The function ``add_observer()`` returns removes that observer alone: another
        one equal to it (dataclass observers with the same fields are) still sees every
        scope. Removed by equality, both would have gone."""
        seen: list[str] = []

        @dataclasses.dataclass(eq=True)
        class Opened(ambient.Observer):
            label: str

            def scope_opened(self, scope: ambient.Scope) -> None:
                seen.append(f"{self.label}: {scope.context.user_id}")

        first, second = Opened("probe"), Opened("probe")
        assert first == second
        remove_first = ambient.add_observer(first)
        remove_second = ambient.add_observer(second)
        registry = Registry()
        try:
            remove_first()
            async with registry.open_scope(UserExecutionContext.create("alice")):
                pass
        finally:
            remove_second()
            await registry.aclose()
        assert seen == ["probe: alice"]

    async def test_events_are_frozen_component_events_with_every_field(self) -> None:
        watcher = ComponentEvents()
        events = watcher.events

        registry = Registry(telemetry=watcher)
        registry.register(Counter, Counter, name="counter")
        async with registry.open_scope(ctx()) as scope:
            counter = await ambient.resolve(Counter)
        created, cleaned = events
        assert type(created) is ambient.ComponentEvent
        assert type(cleaned) is ambient.ComponentEvent
        assert (created.key, created.name) == (Counter, "counter")
        assert created.lifetime is Lifetime.REQUEST
        assert (created.instance, created.user) == (counter, scope.context.user)
        assert created.scope is scope
        assert (created.error, created.cleanup_ran) == (None, True)
        assert created.start_ns > 0
        assert created.duration >= 0
        assert cleaned.cleanup_ran
        assert created != cleaned
        with pytest.raises(dataclasses.FrozenInstanceError):
            created.name = "other"  # type: ignore[misc]

    async def test_an_events_duration_is_how_long_its_factory_or_cleanup_took(self) -> None:
        """A factory and a cleanup that each take at least 2 ms are reported with at least
        that duration (the clock is waited on, not slept on)."""
        watcher = ComponentEvents()
        events = watcher.events

        def take_2_ms() -> None:
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass

        def slow() -> Iterator[object]:
            take_2_ms()
            yield object()
            take_2_ms()

        registry = Registry(telemetry=watcher)
        registry.register("slow", slow)
        async with registry.open_scope(ctx()):
            await ambient.resolve("slow")
        created, cleaned = events
        assert created.duration >= 0.002
        assert cleaned.duration >= 0.002
        await registry.aclose()

    def test_an_event_built_without_its_last_fields_has_no_error_and_a_cleanup_that_ran(
        self,
    ) -> None:
        """``error`` and ``cleanup_ran`` are optional: an observer's own tests build events
        with the fields they need."""
        event = ambient.ComponentEvent(
            key="db",
            name="db",
            lifetime=Lifetime.REQUEST,
            instance=None,
            user=None,
            scope=None,
            start_ns=1,
            duration=0.0,
        )
        assert (event.error, event.cleanup_ran) == (None, True)


def test_a_cleanup_error_split_by_except_star_stays_a_cleanup_error() -> None:
    """``except*`` (and ``split``/``subgroup``) hands a handler of one kind of cleanup
    failure a CleanupError, with the group's message and that kind's failures alone, and
    leaves the rest one too: ``except CleanupError`` further up still matches what was
    not handled. A plain ExceptionGroup came out of the split."""
    timeout, broken = TimeoutError("slow"), ValueError("broken")
    error = CleanupError("2 cleanups failed", [timeout, broken])
    handled: list[BaseExceptionGroup[BaseException]] = []
    with pytest.raises(CleanupError) as rest:
        try:
            raise error
        except* TimeoutError as caught:
            handled.append(caught)
    [timeouts] = handled
    assert type(timeouts) is CleanupError
    assert (timeouts.message, timeouts.exceptions) == ("2 cleanups failed", (timeout,))
    assert rest.value.exceptions == (broken,)
    assert type(error.subgroup(ValueError)) is CleanupError


async def test_a_cleanup_cut_short_is_reported_as_such_not_as_done(anyio_backend: str) -> None:
    """asyncio's own ``task.cancel()`` gets through the shield into an async cleanup: the
    observers' event carries that cancellation (telemetry marks the span
    ``ambient.cancelled``), where it used to read as a cleanup that finished."""
    if anyio_backend != "asyncio":
        pytest.skip("task.cancel() is asyncio's; trio has only cancel scopes")
    import asyncio

    ended: list[BaseException | None] = []

    class Watch(ambient.Observer):
        def component_cleaned(self, event: ambient.ComponentEvent) -> None:
            ended.append(event.error)

    entered, never = asyncio.Event(), asyncio.Event()

    class Slow:
        async def aclose(self) -> None:
            entered.set()
            await never.wait()

    registry = Registry(telemetry=Watch())
    registry.register(Slow, Slow)
    scope = registry.open_scope(ctx())
    await scope.__aenter__()
    await scope.resolve(Slow)
    closing = asyncio.ensure_future(scope.aclose())
    with anyio.fail_after(10):
        await entered.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert [type(error) for error in ended] == [asyncio.CancelledError]
    assert registry.stats().cleanup_failures == 0


_attached: contextvars.ContextVar[str] = contextvars.ContextVar("_attached", default="none")


async def test_a_token_set_before_a_components_yield_is_reset_after_it() -> None:
    """A REQUEST async generator that sets a context variable before its yield and resets
    its token after it (as OpenTelemetry's context.attach and detach do, or structlog's
    bound contextvars): the body sees the value, the reset at the scope's end succeeds, and
    the variable is back as it was. Run in a copy of the request's context (a task of its
    own), the reset raises ValueError (created in a different Context): a CleanupError."""
    seen: list[str] = []

    async def attached() -> AsyncIterator[str]:
        token = _attached.set(ambient.get_current_context().user_id)
        try:
            yield "attached"
        finally:
            await anyio.lowlevel.checkpoint()
            seen.append(_attached.get())
            _attached.reset(token)

    registry = Registry()
    registry.register("attached", attached)
    async with registry.open_scope(ctx("bob")) as scope:
        await scope.resolve("attached")
        seen.append(_attached.get())
    seen.append(_attached.get())
    assert seen == ["bob", "bob", "none"]
    assert registry.stats().cleanup_failures == 0


async def test_a_lock_held_across_a_components_yield_is_released_after_it() -> None:
    """A REQUEST component holding a task-owned lock for its request (one agent run per
    user at a time: ``async with lock: yield agent``) releases it at the scope's end. Its
    cleanup must run in the task that took the lock: run in a task of its own, anyio's
    lock refuses the release (the current task is not holding this lock) and stays held."""
    lock = anyio.Lock()

    async def agent() -> AsyncIterator[str]:
        async with lock:
            yield "agent"
            await anyio.lowlevel.checkpoint()

    registry = Registry()
    registry.register("agent", agent)
    for user in ("bob", "alice"):
        async with registry.open_scope(ctx(user)) as scope:
            await scope.resolve("agent")
            assert lock.locked()
        assert not lock.locked()
    assert registry.stats().cleanup_failures == 0


class TestAbandonedGenerators:
    # trio warns about an async generator left to the garbage collector: that is the point.
    @pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
    @pytest.mark.parametrize("ending", ["aclose", "garbage"])
    @pytest.mark.parametrize("acting_for", ["child run", "another user"])
    async def test_a_sub_scope_in_an_abandoned_stream_generator(
        self, ending: str, acting_for: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A stream generator opens a sub-scope (acting for a child run, with a component
        of its own) and yields 5 chunks; its consumer takes 2 and stops: it closes the
        generator, or drops it to the garbage collector, whose finaliser closes it later
        in another task and Context. Either way the sub-scope's component is cleaned once,
        nothing is logged, and the consumer sees its own context again, and resolves from
        its own scope (the finaliser could not reset the consumer's Context, but an ended
        binding shows the live one it shadows), and nothing once its own scope has closed,
        not even the sub-scope's context (that of another user, for an admin acting for
        one)."""
        cleaned: list[str] = []
        done = anyio.Event()
        registry = Registry()

        def part(ctx: UserExecutionContext) -> Iterator[str]:
            try:  # the closed generator's GeneratorExit is thrown in at the yield
                yield ctx.run_id
            finally:
                cleaned.append(ctx.run_id)
                done.set()

        registry.register("part", part)
        registry.register("whole", lambda ctx: ctx.run_id)
        request = ctx("alice")
        caplog.set_level(logging.DEBUG)

        async def stream() -> AsyncIterator[str]:
            child = request.child("stream") if acting_for == "child run" else ctx("bob")
            async with registry.open_scope(child, allow_switch=acting_for != "child run"):
                for n in range(5):
                    assert await ambient.resolve("part") == child.run_id
                    yield f"chunk {n}"

        async with registry.open_scope(request) as outer:
            chunks = stream()
            taken = [await chunks.__anext__() for _ in range(2)]
            if ending == "aclose":
                await chunks.aclose()
            else:
                del chunks
                gc.collect()
            with anyio.fail_after(5):
                await done.wait()
            assert ambient.get_current_context() is request
            assert ambient.current_context_or_none() is request
            assert ambient.current_scope() is outer
            assert await ambient.resolve("whole") == request.run_id
        assert ambient.current_context_or_none() is None
        assert taken == ["chunk 0", "chunk 1"]
        assert len(cleaned) == 1
        assert registry.stats().open_scopes == 0
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_a_scope_never_closed_has_its_generator_cleaned_once_as_its_loop_ends(
        self, backend: str
    ) -> None:
        """A scope left open when its event loop ends (its task returned without closing
        it) has a component's async generator closed by the loop's end, once; closing the
        scope later (from another loop) does not run that cleanup again."""
        steps: list[str] = []
        registry = Registry()

        async def connect() -> AsyncIterator[str]:
            try:
                yield "connection"
            finally:
                steps.append("cleaned")

        registry.register("connection", connect)
        scopes: list[Scope] = []

        async def request() -> None:
            scope = registry.open_scope(ctx())
            await scope.__aenter__()
            await scope.resolve("connection")
            scopes.append(scope)

        anyio.run(request, backend=backend)
        assert steps == ["cleaned"]
        anyio.run(scopes[0].aclose, backend=backend)
        assert steps == ["cleaned"]
        assert registry.stats().open_scopes == 0

    def test_a_request_task_cancelled_as_asyncio_run_ends_cleans_up_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``asyncio.run()`` returns while a request's task still runs (trio has no task
        outliving its nursery): asyncio cancels the task, its scope closes with the
        cancellation thrown into the component's generator, whose cleanup runs once;
        the loop's own closing of generators then finds nothing to do, and logs nothing."""
        seen: list[str] = []
        registry = Registry()

        async def connect() -> AsyncIterator[str]:
            try:
                yield "connection"
            except BaseException as exc:
                seen.append(type(exc).__name__)
                raise
            finally:
                await anyio.lowlevel.checkpoint()
                seen.append("cleaned")

        registry.register("connection", connect)

        async def main() -> None:
            opened = asyncio.Event()

            async def request() -> None:
                async with registry.open_scope(ctx()):
                    await ambient.resolve("connection")
                    opened.set()
                    await asyncio.Event().wait()

            running.append(asyncio.get_running_loop().create_task(request()))
            await opened.wait()

        running: list[asyncio.Task[None]] = []
        asyncio.run(main())
        assert running[0].cancelled()
        assert seen == ["CancelledError", "cleaned"]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        stats = registry.stats()
        assert (stats.open_scopes, stats.cleaned, stats.cleanup_failures) == (0, 1, 0)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _AsyncCleaned:
    """A component made by a plain function whose cleanup awaits (an HTTP client, say)."""

    def __init__(self) -> None:
        self.closed = 0

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.closed += 1


async def _close_as_a_thread_resolves(
    scope: Scope, reached: threading.Event, go_on: threading.Event
) -> list[object]:
    """Close ``scope`` once a worker thread's ``resolve_sync(Counter)`` has ``reached`` the
    point where it pauses, then let it go on; what the thread got (or the error)."""
    outcome: list[object] = []

    def work() -> None:
        try:
            outcome.append(scope.resolve_sync(Counter))
        except ScopeClosedError as refused:
            outcome.append(refused)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    # Bounded, as the join: a thread that never gets there fails the test, not hangs it.
    if not await anyio.to_thread.run_sync(reached.wait, 10):
        go_on.set()
        pytest.fail(f"resolve_sync() in a thread did not reach the pause within 10 s: {outcome}")
    await scope.aclose()  # the request ends
    go_on.set()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive(), "resolve_sync() in a thread did not end within 10 s"
    return outcome


class TestClosingWhileResolving:
    """A scope that closes while something still resolves from it (work that outlived its
    request, without a hold): the resolution is refused, nothing it made is lost or kept
    by the closed scope, and every component is cleaned exactly once."""

    async def test_an_app_component_whose_scope_and_registry_closed_is_not_made_again(
        self,
    ) -> None:
        """The registry closed (a shutdown) while an APP component was made, and the
        scope closed too: the resolution is refused, and the component is not made again
        in the registry's fresh store for a scope that can no longer hand it out."""
        registry = Registry()
        entered = anyio.Event()
        go_on = anyio.Event()
        calls: list[str] = []

        async def make() -> Counter:
            calls.append("made")
            entered.set()
            await go_on.wait()
            return Counter()

        registry.register("app", make, lifetime=Lifetime.APP)
        outcome: list[BaseException] = []
        scope = registry.open_scope(ctx())
        await scope.__aenter__()
        async with anyio.create_task_group() as tg:

            async def resolving() -> None:
                try:
                    await scope.resolve("app")
                except ScopeClosedError as exc:
                    outcome.append(exc)

            tg.start_soon(resolving)
            await entered.wait()
            await registry.aclose()
            await scope.aclose()
            go_on.set()
        assert [type(error) for error in outcome] == [ScopeClosedError]
        assert calls == ["made"]
        assert registry.stats().created == registry.stats().cleaned == 1

    async def test_a_user_component_made_while_its_scope_closed_is_not_handed_out(
        self,
    ) -> None:
        clock = _Clock()
        registry = Registry(clock=clock)
        inside, release = anyio.Event(), anyio.Event()
        made: list[Counter] = []

        async def make() -> Counter:
            inside.set()
            await release.wait()
            made.append(Counter())
            return made[-1]

        registry.register(Counter, make, lifetime=Lifetime.USER, idle_ttl=10)
        registry.register("other", object, lifetime=Lifetime.USER, idle_ttl=10)
        first, second = registry.open_scope(ctx()), registry.open_scope(ctx())
        outcome: list[BaseException] = []

        async def late() -> None:  # the first request's work, still running at its end
            try:
                await first.resolve(Counter)
            except ScopeClosedError as refused:
                outcome.append(refused)

        with anyio.fail_after(10):
            async with second:  # another request of the same user keeps her USER entry
                await second.resolve("other")
                async with anyio.create_task_group() as tg:
                    async with first:
                        tg.start_soon(late)
                        await inside.wait()
                    release.set()
            assert [type(e) for e in outcome] == [ScopeClosedError]
            with pytest.raises(ScopeClosedError):
                await first.resolve(Counter)
            with pytest.raises(ScopeClosedError):
                first.resolve_sync(Counter)
            clock.now = 100.0
            await registry.sweep()
        assert [c.closed for c in made] == [1]
        assert registry.stats().live_users == 0

    @pytest.mark.parametrize("sync", [False, True], ids=["resolve", "resolve_sync"])
    async def test_a_component_made_on_the_loop_while_its_scope_closed_is_cleaned_once(
        self, sync: bool
    ) -> None:
        """The scope closes (from another thread) while a sync factory runs on the event
        loop's thread: the resolution is refused, and what the factory made is cleaned
        once, there and then."""
        registry = Registry()
        steps: list[str] = []
        scope = registry.open_scope(ctx())

        def make() -> Iterator[str]:
            closing = threading.Thread(target=asyncio.run, args=(scope.aclose(),))
            closing.start()
            closing.join(10)
            steps.append("made")
            yield "component"
            steps.append("cleaned")

        registry.register("closing", make)
        await scope.__aenter__()
        with pytest.raises(ScopeClosedError):
            if sync:
                scope.resolve_sync("closing")
            else:
                await scope.resolve("closing")
        assert steps == ["made", "cleaned"]
        stats = registry.stats()
        assert stats.created == stats.cleaned == 1
        assert stats.open_scopes == 0

    async def test_a_thread_made_component_with_an_async_cleanup_is_still_cleaned(
        self,
    ) -> None:
        """A sync factory in a worker thread returns after its scope closed: the thread gets
        ScopeClosedError, and the component's async cleanup (which the thread cannot
        await) runs once, on the event loop, when the next scope opens and closes."""
        registry = Registry()
        made: list[_AsyncCleaned] = []
        inside, release = threading.Event(), threading.Event()

        def make() -> _AsyncCleaned:
            inside.set()
            release.wait(10)
            made.append(_AsyncCleaned())
            return made[-1]

        registry.register(_AsyncCleaned, make)
        outcome: list[BaseException] = []
        with anyio.fail_after(10):
            async with registry.open_scope(ctx()) as scope:

                def work() -> None:
                    try:
                        scope.resolve_sync(_AsyncCleaned)
                    except ScopeClosedError as refused:
                        outcome.append(refused)

                thread = threading.Thread(target=work)
                thread.start()
                await anyio.to_thread.run_sync(inside.wait)
            release.set()
            await anyio.to_thread.run_sync(thread.join)
            assert [type(e) for e in outcome] == [ScopeClosedError]
            async with registry.open_scope(ctx("bob")):
                pass
        assert [c.closed for c in made] == [1]
        stats = registry.stats()
        assert (stats.created, stats.cleaned) == (1, 1)

    async def test_an_async_cleanup_a_thread_stores_as_the_scope_closes_is_awaited(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A worker thread's sync factory stores a component whose cleanup awaits just as
        the scope, having found only sync cleanups, closes without awaiting: that cleanup
        is still awaited, once, never run as a sync one (it failed, unawaited, with an
        AttributeError for a close() the component does not have)."""
        import ambient._scope

        registry = Registry()
        made: list[_AsyncCleaned] = []
        inside, go_on, stored = threading.Event(), threading.Event(), threading.Event()

        def make() -> _AsyncCleaned:
            inside.set()
            go_on.wait(10)
            made.append(_AsyncCleaned())
            return made[-1]

        class PausedStore(ambient._scope._RequestInstances):  # type: ignore[misc]
            __slots__ = ()

            def close_sync(self) -> Any:
                # The close has found only sync cleanups so far: where the GIL could switch
                # to the thread before the close takes what was made.
                go_on.set()
                stored.wait(10)
                return super().close_sync()

        monkeypatch.setattr(ambient._scope, "_RequestInstances", PausedStore)
        registry.register(_AsyncCleaned, make)
        with anyio.fail_after(10):
            scope = registry.open_scope(ctx())
            await scope.__aenter__()

            def work() -> None:
                try:
                    scope.resolve_sync(_AsyncCleaned)
                finally:
                    stored.set()

            thread = threading.Thread(target=work)
            thread.start()
            await anyio.to_thread.run_sync(inside.wait)
            await scope.aclose()
            await anyio.to_thread.run_sync(thread.join)
        assert [c.closed for c in made] == [1]
        stats = registry.stats()
        assert (stats.created, stats.cleaned, stats.cleanup_failures) == (1, 1, 0)

    @pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER])
    async def test_a_thread_resolving_while_the_scope_closes_takes_nothing_along(
        self, monkeypatch: pytest.MonkeyPatch, lifetime: Lifetime
    ) -> None:
        """A worker thread's resolve_sync() has found the scope open and is taking what
        the first component of its kind needs (the scope's store, the user's entry) when
        the scope closes: it gets ScopeClosedError, and neither a store nobody closes nor
        a reference that keeps the user's entry from ever expiring is left behind."""
        import ambient._scope

        clock = _Clock()
        registry = Registry(clock=clock)
        ttl = {"idle_ttl": 1.0} if lifetime is Lifetime.USER else {}
        registry.register(Counter, Counter, lifetime=lifetime, **ttl)
        taking, go_on = threading.Event(), threading.Event()

        def paused() -> None:  # the thread stops where the GIL could switch to the close
            taking.set()
            go_on.wait(10)

        if lifetime is Lifetime.REQUEST:

            class PausedStore(ambient._scope._RequestInstances):  # type: ignore[misc]
                def __init__(self, *args: object) -> None:
                    paused()
                    super().__init__(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(ambient._scope, "_RequestInstances", PausedStore)
        else:
            acquire = registry.acquire_user

            def paused_acquire(*args: object, **kwargs: object) -> object:
                entry = acquire(*args, **kwargs)  # type: ignore[arg-type]
                paused()
                return entry

            monkeypatch.setattr(registry, "acquire_user", paused_acquire)
        with anyio.fail_after(10):
            scope = registry.open_scope(ctx())
            await scope.__aenter__()
            outcome = await _close_as_a_thread_resolves(scope, taking, go_on)
            clock.now = 100.0
            await registry.sweep()
        assert [type(o) for o in outcome] == [ScopeClosedError]
        stats = registry.stats()
        assert (stats.open_scopes, stats.live_users, stats.created, stats.cleaned) == (0, 0, 0, 0)
        assert scope._own is None or scope._own.closed  # no store that takes components

    @pytest.mark.parametrize("lifetime", [Lifetime.USER, Lifetime.APP])
    async def test_a_thread_keeping_a_shared_component_as_the_scope_closes_leaves_no_scope(
        self, monkeypatch: pytest.MonkeyPatch, lifetime: Lifetime
    ) -> None:
        """A worker thread's resolve_sync() has its USER or APP component and found the
        scope open, and is noting that the scope holds one, when the scope closes: it gets
        ScopeClosedError, and the registry keeps no reference to the closed scope (one per
        such close would pile up for as long as the server runs)."""
        registry = Registry()
        registry.register(Counter, Counter, lifetime=lifetime)
        noting, go_on = threading.Event(), threading.Event()
        share = Scope._share

        def paused_share(self: Scope) -> None:  # where the GIL could switch to the close
            noting.set()
            go_on.wait(10)
            share(self)

        monkeypatch.setattr(Scope, "_share", paused_share)
        with anyio.fail_after(10):
            scope = registry.open_scope(ctx())
            await scope.__aenter__()
            outcome = await _close_as_a_thread_resolves(scope, noting, go_on)
        assert [type(o) for o in outcome] == [ScopeClosedError]
        assert scope not in registry._sharing
        assert Counter not in scope._cache


@pytest.mark.parametrize("how", ["task", "wrap"])
async def test_work_started_in_a_scope_for_another_user_never_turns_into_the_outer_user(
    how: str,
) -> None:
    """An admin's request (alice) opens a scope acting for bob and starts work for him in
    it: a task, or a callable made with ``ambient.wrap``, run after bob's scope ended in
    alice's task. That work must go on seeing bob (whose scope refuses to resolve), never
    alice and her components: it used to fall back to the nearest open binding, hers."""
    registry = Registry()
    registry.register("mailbox", lambda user: f"mailbox of {user.user_id}", lifetime=Lifetime.USER)
    seen: list[tuple[str, str | None]] = []
    bob_done = anyio.Event()

    async def for_bob() -> None:
        await bob_done.wait()
        who = ambient.current_context_or_none()
        seen.append(("context", None if who is None else who.user_id))
        try:
            seen.append(("mailbox", await ambient.resolve("mailbox")))
        except ScopeClosedError:
            seen.append(("mailbox", "refused"))

    with anyio.fail_after(10):
        async with registry.open_scope(UserExecutionContext.create("alice")):
            async with anyio.create_task_group() as tg:
                async with registry.open_scope(
                    UserExecutionContext.create("bob"), allow_switch=True
                ):
                    if how == "task":
                        tg.start_soon(for_bob)
                    else:
                        later = ambient.wrap(for_bob)
                if how == "wrap":
                    tg.start_soon(later)
                bob_done.set()
            assert ambient.get_current_context().user_id == "alice"
    assert seen == [("context", "bob"), ("mailbox", "refused")]
    await registry.aclose()


@pytest.mark.parametrize("ended", ["in the admin's task", "from another task"])
async def test_work_for_another_user_goes_on_as_that_user_after_the_scope_ends(
    ended: str,
) -> None:
    """An admin's request (alice) opens a scope acting for bob and starts a task for him in
    it; the scope ends, in alice's task or from another task (a generator finalised
    elsewhere). The task goes on as bob: it sees bob, binds a child of his context, opens
    a scope of its own for him and, once that ends, sees bob again, never alice. Ended from
    another task, the task used to see alice and resolve her mailbox; in alice's task, its
    own scope for bob was refused as a switch away from alice, and with allow_switch it
    turned into alice once that scope ended."""
    registry = Registry()
    registry.register("mailbox", lambda user: f"mailbox of {user.user_id}", lifetime=Lifetime.USER)
    seen: list[tuple[str, str]] = []
    bob_done = anyio.Event()

    async def look(label: str) -> None:
        seen.append((label, ambient.get_current_context().user_id))
        try:
            seen.append((f"mailbox {label}", await ambient.resolve("mailbox")))
        except ScopeClosedError:
            seen.append((f"mailbox {label}", "refused"))

    async def for_bob() -> None:
        await bob_done.wait()
        await look("at first")
        me = ambient.get_current_context()
        with ambient.bind_context(me.child("step")):
            seen.append(("in a child", ambient.get_current_context().user_id))
        async with registry.open_scope(me.child("later")):
            await look("in its own scope")
        await look("after it")

    with anyio.fail_after(10):
        async with registry.open_scope(ctx("alice")):
            async with anyio.create_task_group() as tg:
                bob = registry.open_scope(ctx("bob"), allow_switch=True)
                await bob.__aenter__()
                tg.start_soon(for_bob)
                if ended == "in the admin's task":
                    await bob.aclose()
                else:
                    async with anyio.create_task_group() as closer:
                        closer.start_soon(bob.aclose)
                assert ambient.get_current_context().user_id == "alice"
                bob_done.set()
            assert ambient.get_current_context().user_id == "alice"
    assert seen == [
        ("at first", "bob"),
        ("mailbox at first", "refused"),
        ("in a child", "bob"),
        ("in its own scope", "bob"),
        ("mailbox in its own scope", "mailbox of bob"),
        ("after it", "bob"),
        ("mailbox after it", "refused"),
    ]


@pytest.mark.parametrize("within", ["no other scope", "an admin's scope"])
async def test_work_whose_user_component_was_made_as_its_scope_closed_keeps_its_user(
    within: str,
) -> None:
    """Work started in bob's scope (a task, a worker thread) resolves a USER component whose
    factory is still running when the scope closes: it is refused the component, and then
    goes on seeing bob, as any work that outlived its scope does. Leaving the factory's
    restricted view used to drop what was bound: the work then had no context at all
    (NoActiveContextError, in its logging too), or, in an admin's request acting for bob,
    turned into the admin and was handed her components."""
    registry = Registry()
    inside, release = anyio.Event(), anyio.Event()

    async def make_mailbox(user: ambient.UserRef) -> str:
        inside.set()
        await release.wait()
        return f"mailbox of {user.user_id}"

    registry.register("mailbox", make_mailbox, lifetime=Lifetime.USER)
    seen: list[tuple[str, str | None]] = []

    async def mailbox() -> None:
        try:
            seen.append(("mailbox", await ambient.resolve("mailbox")))
        except ScopeClosedError:
            seen.append(("mailbox", "refused"))

    async def for_bob() -> None:
        await mailbox()  # made as the scope closes
        who = ambient.current_context_or_none()
        seen.append(("context", None if who is None else who.user_id))
        await mailbox()

    with anyio.fail_after(10):
        async with contextlib.AsyncExitStack() as outer:
            if within == "an admin's scope":
                await outer.enter_async_context(registry.open_scope(ctx("alice")))
            async with anyio.create_task_group() as tg:
                async with registry.open_scope(ctx("bob"), allow_switch=True):
                    tg.start_soon(for_bob)
                    await inside.wait()
                release.set()
    assert seen == [("mailbox", "refused"), ("context", "bob"), ("mailbox", "refused")]
    await registry.aclose()


@pytest.mark.parametrize("when", ["after it is made", "while it is made"])
async def test_a_task_a_factory_starts_may_resolve_what_the_factory_makes(when: str) -> None:
    """An APP factory starts its consumer task (in the app's task group, ``detached`` as
    documented): the task resolves the component the factory makes, once made or while it
    is still being made (it waits). Either used to fail with a false "dependency cycle:
    Queue -> Queue", the task having inherited the factory's stack of creations."""
    registry = Registry()
    got: list[object] = []
    go = anyio.Event()

    class Queue:
        pass

    async with anyio.create_task_group() as service:

        async def consumer() -> None:
            if when == "after it is made":
                await go.wait()
            async with registry.open_scope(ctx("carol")):
                got.append(await ambient.resolve(Queue))

        async def make_queue() -> Queue:
            with ambient.detached():
                service.start_soon(consumer)
            if when == "while it is made":
                await anyio.wait_all_tasks_blocked()  # the consumer waits for the queue
            return Queue()

        registry.register(Queue, make_queue, lifetime=Lifetime.APP)
        with anyio.fail_after(10):
            async with registry.open_scope(ctx("alice")):
                made = await ambient.resolve(Queue)
            go.set()
    assert got == [made]
    await registry.aclose()


@pytest.mark.usefixtures("eager_tasks")
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "inheriting"])
@pytest.mark.parametrize("factory", ["sync", "async"])
async def test_an_eager_task_a_factory_starts_may_resolve_what_the_factory_makes(
    factory: str, detached: bool
) -> None:
    """With asyncio's eager task factory, a task that a factory starts with
    ``asyncio.create_task`` (``detached`` as documented, or not) runs its first step inside
    that call, before the factory returned, and resolves the component being made: it gets
    it once made, as without eager tasks. It used to fail with a false "dependency cycle:
    Queue -> Queue"."""
    registry = Registry()
    got: list[object] = []
    tasks: list[asyncio.Task[None]] = []

    class Queue:
        pass

    async def consumer() -> None:
        if not detached:  # in the request's scope, which it inherited
            got.append(await ambient.resolve(Queue))
            return
        async with registry.open_scope(ctx("carol")):
            got.append(await ambient.resolve(Queue))

    def start_consumer() -> None:
        with ambient.detached() if detached else contextlib.nullcontext():
            tasks.append(asyncio.create_task(consumer()))
        assert not got  # it started, and waits for the queue

    def make_sync() -> Queue:
        start_consumer()
        return Queue()

    async def make_async() -> Queue:
        start_consumer()
        return Queue()

    registry.register(Queue, make_sync if factory == "sync" else make_async, lifetime=Lifetime.APP)
    with anyio.fail_after(10):
        async with registry.open_scope(ctx("alice")):
            made = await ambient.resolve(Queue)
            await asyncio.gather(*tasks)
    assert got == [made]
    await registry.aclose()


@pytest.mark.parametrize("factory", ["done in time", "waits for the loop"])
async def test_resolve_sync_on_the_loop_waits_for_a_worker_threads_creation_within_a_bound(
    factory: str,
) -> None:
    """A worker thread of the request is making a component when code on the event loop's
    thread (a module-level proxy, ``resolve_sync``) asks for it. It waits for the thread, as
    it always did, and gets the same component. But a factory that waits for the loop
    (``anyio.from_thread``) would never be done while the loop waits: after the registry's
    ``cleanup_timeout`` the wait gives up with ResolutionError (it used to last forever),
    and the thread's creation then finishes."""
    started, asked = threading.Event(), threading.Event()

    class Settings:
        pass

    def make_settings() -> Settings:
        started.set()
        if factory == "waits for the loop":
            # Once the loop is about to block in resolve_sync(), which it does without
            # yielding: the callback below cannot run on it until that returns. Waited
            # for within a bound, as anyio.from_thread would not: a wait on the loop's
            # side without its own bound then fails the test instead of hanging it.
            asked.wait(10)
            loop_ran = threading.Event()
            call_soon(loop_ran.set)
            if not loop_ran.wait(10):
                stood_still.append("the loop did not run for 10 s")
        else:
            finish.wait(10)
        return Settings()

    finish = threading.Event()
    call_soon = loop_call_soon()
    assert call_soon is not None
    stood_still: list[str] = []
    registry = Registry(cleanup_timeout=0.5)
    registry.register(Settings, make_settings)
    made: list[object] = []
    async with registry.open_scope(ctx()) as scope:
        async with anyio.create_task_group() as tg:

            async def in_worker() -> None:
                made.append(await anyio.to_thread.run_sync(scope.resolve_sync, Settings))

            tg.start_soon(in_worker)
            await anyio.to_thread.run_sync(started.wait)
            if factory == "waits for the loop":
                asked.set()
                with pytest.raises(ResolutionError, match="was not done within 0.5 s"):
                    try:
                        scope.resolve_sync(Settings)
                    finally:
                        assert not stood_still, "resolve_sync() on the loop waited without a bound"
            else:
                # The creation ends while the loop waits (a timer, as another thread would).
                threading.Timer(0.05, finish.set).start()
                on_the_loop = scope.resolve_sync(Settings)
        assert scope.resolve_sync(Settings) is made[0]
        if factory == "done in time":
            assert on_the_loop is made[0]


async def test_resolve_sync_on_the_loop_waits_for_a_thread_past_what_a_thread_wait_takes() -> None:
    """A ``cleanup_timeout`` longer than a thread's wait can be (``threading.TIMEOUT_MAX``,
    292 years) bounds resolve_sync() on the loop as a shorter one does: it waits for the
    worker thread's creation and gets the component, where it raised OverflowError at once.
    """

    class Settings:
        pass

    started, finish = threading.Event(), threading.Event()

    def make_settings() -> Settings:
        started.set()
        finish.wait(10)
        return Settings()

    def release_once_the_loop_waits(loop_thread: int) -> None:
        def waiting() -> bool:
            frame = sys._current_frames().get(loop_thread)
            while frame is not None:
                if frame.f_code.co_name == "wait_blocking":
                    return True
                frame = frame.f_back
            return False

        try:
            _until(waiting)
        finally:
            finish.set()

    registry = Registry(cleanup_timeout=threading.TIMEOUT_MAX * 2)
    registry.register(Settings, make_settings)
    made: list[object] = []
    async with registry.open_scope(ctx()) as scope, anyio.create_task_group() as tg:

        async def in_worker() -> None:
            made.append(await anyio.to_thread.run_sync(scope.resolve_sync, Settings))

        tg.start_soon(in_worker)
        await anyio.to_thread.run_sync(started.wait)
        releaser = threading.Thread(
            target=release_once_the_loop_waits, args=(threading.get_ident(),), daemon=True
        )
        releaser.start()
        try:
            on_the_loop = scope.resolve_sync(Settings)
        finally:
            finish.set()
            await anyio.to_thread.run_sync(releaser.join, 10)
    assert on_the_loop is made[0]


@pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER, Lifetime.APP])
async def test_resolve_sync_on_the_loop_refuses_at_once_a_component_a_task_is_making(
    lifetime: Lifetime,
) -> None:
    """A task on the event loop is making a component (its async factory awaits) when code
    on the loop's thread asks for it with ``resolve_sync``: waiting would block the loop
    that must finish it, so it is refused at once, saying to await ``resolve`` instead, not
    after blocking the loop for ``cleanup_timeout``. The task's creation then finishes, and
    is the one every later resolution gets."""
    started, release = anyio.Event(), anyio.Event()
    calls = 0

    async def make() -> Counter:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return Counter()

    registry = Registry(cleanup_timeout=3)
    registry.register(Counter, make, lifetime=lifetime)
    made: list[Counter] = []
    with anyio.fail_after(10):
        async with registry.open_scope(ctx()) as scope:
            async with anyio.create_task_group() as tg:

                async def in_task() -> None:
                    made.append(await scope.resolve(Counter))

                tg.start_soon(in_task)
                await started.wait()
                before = anyio.current_time()
                with pytest.raises(ResolutionError, match=r"another task on this event loop"):
                    scope.resolve_sync(Counter)
                assert anyio.current_time() - before < 1
                release.set()
            assert await scope.resolve(Counter) is made[0]
    assert calls == 1
    await registry.aclose()


@pytest.mark.parametrize("shape", ["async def", "returns an awaitable"])
@pytest.mark.parametrize("length", [2, 3])
async def test_a_cycle_resolved_from_several_tasks_at_once_is_named_not_a_hang(
    length: int, shape: str
) -> None:
    """A -> B (-> C) -> A, each key resolved by its own task of one request at the same time
    (a task group fetching components in parallel): each task makes its key and waits for
    the next one, made by another task, which waits in turn. One task alone gets
    ResolutionError naming the cycle; several used to wait for each other forever. So did
    they when the factories were plain functions returning what to await (a lambda around
    a coroutine): such a creation was not followed to what it waits for."""
    keys = ["a", "b", "c"][:length]
    all_started = anyio.Event()
    started: list[str] = []
    registry = Registry()

    def factory(key: str, needs: str) -> Callable[[], Any]:
        async def make() -> tuple[str, object]:
            started.append(key)
            if len(started) == length:
                all_started.set()
            await all_started.wait()  # every key is being made before any asks for the next
            return (key, await ambient.resolve(needs))

        return make if shape == "async def" else lambda: make()

    for index, key in enumerate(keys):
        registry.register(key, factory(key, keys[(index + 1) % length]))
    errors: list[str] = []

    async def get(key: str) -> None:
        try:
            await ambient.resolve(key)
        except ResolutionError as exc:
            errors.append(str(exc))

    with anyio.fail_after(10):
        async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(get, key)
    rotations = set()
    for start in range(length):
        path = [*keys[start:], *keys[:start], keys[start]]
        rotations.add("dependency cycle while resolving: " + " -> ".join(f"'{k}'" for k in path))
    assert len(errors) == length
    assert set(errors) <= rotations


async def test_a_cycle_through_one_of_several_tasks_a_factory_waits_for_is_named_not_a_hang() -> (
    None
):
    """A's factory fetches x and y in tasks of its own; x, made by another task, needs A.
    Once y's wait had ended, A counted as waiting for nothing: x's creator then waited for
    A, which waits (in its other task) for x, forever. It is the cycle, named."""
    registry = Registry()
    x_started, y_started, y_go, a_waits = (anyio.Event() for _ in range(4))

    async def make_a() -> str:
        async with anyio.create_task_group() as fetch:
            fetch.start_soon(ambient.resolve, "x")
            fetch.start_soon(ambient.resolve, "y")
            await anyio.wait_all_tasks_blocked()  # both wait: x and y are being made
            a_waits.set()
        return "a"

    async def make_x() -> tuple[str, object]:
        x_started.set()
        await a_waits.wait()
        y_go.set()
        await anyio.wait_all_tasks_blocked()  # y is made, and its wait in A's factory ended
        return ("x", await ambient.resolve("a"))

    async def make_y() -> str:
        y_started.set()
        await y_go.wait()
        return "y"

    registry.register("a", make_a)
    registry.register("x", make_x)
    registry.register("y", make_y)
    errors: dict[str, list[str]] = {"a": [], "x": [], "y": []}

    async def get(key: str) -> None:
        try:
            await ambient.resolve(key)
        except Exception as exc:  # A's arrives in its task group's ExceptionGroup
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            errors[key].append(str(exc))

    with anyio.fail_after(10):
        async with registry.open_scope(ctx()), anyio.create_task_group() as tg:
            tg.start_soon(get, "x")
            await x_started.wait()
            tg.start_soon(get, "y")
            await y_started.wait()
            tg.start_soon(get, "a")
    assert errors == {
        "a": ["dependency cycle while resolving: 'a' -> 'x' -> 'a'"],
        "x": ["dependency cycle while resolving: 'x' -> 'a' -> 'x'"],
        "y": [],
    }


async def test_scopes_closed_again_each_end_once() -> None:
    """Many users' scopes, each closed in its body and then again by ``async with`` and a
    third time after: every scope ends once (counted once, one ``scope_closed`` each) and
    every component is cleaned once."""
    closed: list[str] = []
    cleaned: list[str] = []

    class Watch(ambient.Observer):
        def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
            closed.append(scope.context.user_id)

    def connection(context: UserExecutionContext) -> Iterator[str]:
        yield context.user_id
        cleaned.append(context.user_id)

    registry = Registry(telemetry=Watch())
    registry.register("conn", connection)
    users = [f"user-{i}" for i in range(40)]
    resolved = 0
    all_resolved = anyio.Event()

    async def request(user: str) -> None:
        nonlocal resolved
        async with registry.open_scope(ctx(user)) as scope:
            assert await scope.resolve("conn") == user
            resolved += 1
            if resolved == len(users):
                all_resolved.set()
            await all_resolved.wait()  # every user's scope open at once
            await scope.aclose()
        await scope.aclose()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user)
    assert sorted(closed) == sorted(users)
    assert sorted(cleaned) == sorted(users)
    stats = registry.stats()
    assert (stats.open_scopes, stats.created, stats.cleaned) == (0, len(users), len(users))


async def test_a_failure_held_work_notes_while_the_close_waits_reaches_the_cleanups() -> None:
    """Work holding a scope past its body notes a failure (``note_failure``) while the
    close waits for it: the cleanups see that failure, so a transaction around a
    generator factory's ``yield`` rolls back, for the users whose work failed only."""
    from ambient.middleware import note_failure

    ledger: dict[str, str] = {}

    def transaction(context: UserExecutionContext) -> Iterator[str]:
        try:
            yield context.user_id
        except BaseException:
            ledger[context.user_id] = "rollback"
            raise
        ledger[context.user_id] = "commit"

    registry = Registry()
    registry.register("tx", transaction)
    users = [f"user-{i}" for i in range(20)]
    failing = set(users[::2])

    async def job(user: str, hold: Any, body_done: anyio.Event) -> None:
        with hold:
            await body_done.wait()
            assert await ambient.resolve("tx") == user
            if user in failing:
                note_failure(RuntimeError(f"the background work of {user} failed"))

    async def request(user: str, tg: anyio.abc.TaskGroup) -> None:
        body_done = anyio.Event()
        async with registry.open_scope(ctx(user)) as scope:
            await scope.resolve("tx")
            tg.start_soon(job, user, scope.hold(), body_done)
            body_done.set()
        # The close waited for the job, which noted its failure meanwhile.
        assert user in ledger

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user, tg)
    assert ledger == {user: "rollback" if user in failing else "commit" for user in users}


async def test_a_user_entry_a_thread_takes_as_the_close_begins_is_released() -> None:
    """A worker thread takes the user's entry (its first USER component) just as the scope
    begins to close, after the close looked for one and before it marked the scope closed
    (here: while it reads the registry's clock, another user being idle): the thread gets
    its component, and the close still releases the entry, so that the component expires
    like any other. It was kept in use for good."""
    armed = False
    taken = threading.Event()
    outcome: list[object] = []
    scope: Scope | None = None
    clock = _Clock()

    def take() -> None:
        assert scope is not None
        try:
            outcome.append(scope.resolve_sync(Counter))
        finally:
            taken.set()

    def racing_clock() -> float:
        nonlocal armed
        if armed:
            armed = False
            threading.Thread(target=take).start()
            assert taken.wait(10)
        return clock.now

    registry = Registry(clock=racing_clock)
    registry.register(Counter, Counter, lifetime=Lifetime.USER, idle_ttl=1.0)
    with anyio.fail_after(10):
        async with registry.open_scope(ctx("bob")) as other:
            await other.resolve(Counter)  # bob's entry is idle once this scope closes
        async with registry.open_scope(ctx("alice")) as scope:
            armed = True
        assert not armed  # the close read the clock, and the thread ran meanwhile
        assert [type(o) for o in outcome] == [Counter]
        assert [entry.refs for entry in registry._users.values()] == [0, 0]
        clock.now = 100.0
        await registry.sweep()
    stats = registry.stats()
    assert (stats.open_scopes, stats.live_users, stats.created, stats.cleaned) == (0, 0, 2, 2)
    assert outcome[0].closed == 1  # type: ignore[attr-defined]


class _Interrupt(BaseException):
    """What a cleanup lets through in place of finishing (a KeyboardInterrupt, say)."""


class _BodyError(Exception):
    pass


async def _cleanups_interrupted_at_once(
    factory: Callable[..., Any], *, body_fails: bool
) -> dict[str, BaseException | None]:
    """Twenty users' scopes open at once, each resolving ``"conn"`` made by ``factory``,
    whose cleanup lets :class:`_Interrupt` through; once all are open, each body returns,
    or fails with ``_BodyError(user)`` when ``body_fails``. Every close must let the
    interruption through; returns what the observers saw end each user's scope."""
    ended: dict[str, BaseException | None] = {}

    class Watch(ambient.Observer):
        def scope_closed(self, scope: ambient.Scope, failures: tuple[Exception, ...]) -> None:
            ended[scope.context.user_id] = scope.exception

    registry = Registry(telemetry=Watch())
    registry.register("conn", factory)
    users = [f"user-{i}" for i in range(20)]
    opened = 0
    all_open = anyio.Event()
    interrupted: list[str] = []

    async def request(user: str) -> None:
        nonlocal opened
        try:
            async with registry.open_scope(ctx(user)) as scope:
                await scope.resolve("conn")
                opened += 1
                if opened == len(users):
                    all_open.set()
                await all_open.wait()
                if body_fails:
                    raise _BodyError(user)
        except _Interrupt:
            interrupted.append(user)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user)
    assert sorted(interrupted) == sorted(users)
    assert sorted(ended) == sorted(users)
    return ended


async def test_what_cut_a_failed_bodys_cleanup_short_does_not_replace_its_failure() -> None:
    """Many users' bodies each fail, and a cleanup of each lets a BaseException through
    (a KeyboardInterrupt, say): the observers still see each body's own failure as what
    ended its scope, not the interruption of its cleanup."""

    def connection() -> Iterator[str]:
        try:
            yield "conn"
        finally:
            raise _Interrupt  # in place of what the yield raised

    ended = await _cleanups_interrupted_at_once(connection, body_fails=True)
    assert {user: (type(error), str(error)) for user, error in ended.items()} == {
        user: (_BodyError, user) for user in ended
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_what_cut_a_cleanup_short_after_a_body_that_returned_is_what_ended_the_scope(
    kind: str,
) -> None:
    """Many users' bodies return, and a cleanup of each (sync, or one that awaits) lets a
    BaseException through (a KeyboardInterrupt, say): the observers see that interruption
    as what ended each scope, not a scope that ended normally."""

    def connection(context: UserExecutionContext) -> Iterator[str]:
        yield context.user_id
        raise _Interrupt(context.user_id)

    async def async_connection(context: UserExecutionContext) -> AsyncIterator[str]:
        yield context.user_id
        await anyio.lowlevel.checkpoint()
        raise _Interrupt(context.user_id)

    factory = connection if kind == "sync" else async_connection
    ended = await _cleanups_interrupted_at_once(factory, body_fails=False)
    assert {user: (type(error), str(error)) for user, error in ended.items()} == {
        user: (_Interrupt, user) for user in ended
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_of_cleanups_letting_base_exceptions_through_the_first_is_raised(kind: str) -> None:
    """Each of a scope's components lets a different BaseException out of its cleanup:
    every cleanup still runs, newest first, and the close raises the first that got
    through (the newest component's), for each of many users at once."""

    class Interrupt(BaseException):
        pass

    cleaned: list[tuple[str, str]] = []

    def factory(name: str) -> Callable[[UserExecutionContext], Any]:
        def sync(context: UserExecutionContext) -> Iterator[str]:
            yield name
            cleaned.append((context.user_id, name))
            raise Interrupt(f"{name} of {context.user_id}")

        async def async_(context: UserExecutionContext) -> AsyncIterator[str]:
            yield name
            await anyio.lowlevel.checkpoint()
            cleaned.append((context.user_id, name))
            raise Interrupt(f"{name} of {context.user_id}")

        return sync if kind == "sync" else async_

    registry = Registry()
    for name in ("older", "newer"):
        registry.register(name, factory(name))
    users = [f"user-{i}" for i in range(10)]
    raised: dict[str, str] = {}

    async def request(user: str) -> None:
        try:
            async with registry.open_scope(ctx(user)) as scope:
                await scope.resolve("older")
                await scope.resolve("newer")
        except Interrupt as interrupt:
            raised[user] = str(interrupt)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user)
    assert raised == {user: f"newer of {user}" for user in users}
    assert sorted(cleaned) == sorted((user, name) for user in users for name in ("older", "newer"))
    stats = registry.stats()
    assert (stats.created, stats.cleaned) == (2 * len(users), 2 * len(users))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio raises no cancellation unasked
async def test_a_cleanup_raising_a_cancellation_nobody_asked_for_fails_only_that_cleanup() -> None:
    """Many users' scopes each have a cleanup that cancels a task of its own and awaits it
    without suppressing its CancelledError: that is each cleanup's failure (CleanupError,
    counted), not a cancellation of the request, and the other cleanups still run."""
    cleaned: list[str] = []

    async def poller(context: UserExecutionContext) -> AsyncIterator[str]:
        task = asyncio.ensure_future(asyncio.Event().wait())
        yield context.user_id
        task.cancel()
        await task  # the slip: the task's CancelledError comes out of the cleanup

    def connection(context: UserExecutionContext) -> Iterator[str]:
        yield context.user_id
        cleaned.append(context.user_id)

    registry = Registry()
    registry.register("connection", connection)
    registry.register("poller", poller)
    users = [f"user-{i}" for i in range(20)]
    failed: dict[str, list[str]] = {}

    async def request(user: str) -> None:
        try:
            async with registry.open_scope(ctx(user)) as scope:
                await scope.resolve("connection")
                await scope.resolve("poller")
        except CleanupError as error:
            failed[user] = [type(e).__name__ for e in error.exceptions]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for user in users:
                tg.start_soon(request, user)
    assert failed == {user: ["RuntimeError"] for user in users}
    assert sorted(cleaned) == sorted(users)
    assert registry.stats().cleanup_failures == len(users)


async def test_a_component_refused_to_a_cancelled_task_after_its_scope_closed_is_cleaned() -> None:
    """Work outliving many users' requests (no hold) is still making each one's connection
    when the request closes, and is then cancelled (its task group shuts down) as the
    connection arrives: the connection is refused, and its cleanup, which awaits, still
    runs to its end instead of being cut short by that cancellation."""
    users = [f"user-{i}" for i in range(10)]
    started = {user: anyio.Event() for user in users}
    release = anyio.Event()
    cleaned: list[str] = []
    outcome: dict[str, str] = {}

    async def connection(context: UserExecutionContext) -> AsyncIterator[str]:
        started[context.user_id].set()
        with anyio.CancelScope(shield=True):
            await release.wait()
        yield context.user_id
        await anyio.lowlevel.checkpoint()
        cleaned.append(context.user_id)

    registry = Registry()
    registry.register("conn", connection)

    async def job(user: str) -> None:
        try:
            await ambient.resolve("conn")
        except ScopeClosedError:
            outcome[user] = "refused"

    async with anyio.create_task_group() as background:

        async def request(user: str) -> None:
            async with registry.open_scope(ctx(user)):
                background.start_soon(job, user)  # no hold: the request does not wait
                await started[user].wait()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(request, user)
            background.cancel_scope.cancel()  # shutting down, as the connections arrive
            release.set()
    assert outcome == dict.fromkeys(users, "refused")
    assert sorted(cleaned) == sorted(users)
    stats = registry.stats()
    assert (stats.created, stats.cleaned, stats.cleanup_failures) == (len(users), len(users), 0)
