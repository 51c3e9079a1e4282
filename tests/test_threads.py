"""Threads and tasks: the scope follows the work, and work that outlives its request either
gets ScopeClosedError or holds the scope open, explicitly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

import ambient
from ambient import Lifetime, Registry, UserExecutionContext, UserRef, _loops
from ambient.errors import (
    NoActiveContextError,
    ResolutionError,
    ScopeClosedError,
    UnsupportedBackendError,
)
from ambient.integrations.fastapi import install
from ambient.integrations.logging import context_fields
from ambient.integrations.threads import (
    ContextExecutor,
    hold_scope,
    iterate_in_thread,
    run_sync_in_thread,
)
from ambient.middleware import AmbientMiddleware, trusted_header
from tests.frameworks.common import Ledger, Memory, Probe
from tests.servers import serve

try:  # not in the core runs on other Pythons, which install no framework but FastAPI
    from litestar import Litestar, get
    from litestar.background_tasks import BackgroundTask
    from litestar.middleware import DefineMiddleware
    from litestar.response import Response
except ImportError:
    Litestar = None  # type: ignore[assignment,misc]

USERS = 100


def make_registry(cleanup_timeout: float = 10.0) -> tuple[Registry, Ledger]:
    """A REQUEST Probe and a USER Memory, both with sync factories (threads can make them)."""
    registry = Registry(cleanup_timeout=cleanup_timeout)
    ledger = Ledger()

    def probe(ctx: UserExecutionContext) -> Iterator[Probe]:
        made = Probe(ledger.create("probe", ctx.user_id), ctx)
        try:
            yield made
        finally:
            made.closed = True
            ledger.clean(made.number)

    def memory(user: UserRef) -> Iterator[Memory]:
        made = Memory(ledger.create("memory", user.user_id), user)
        try:
            yield made
        finally:
            ledger.clean(made.number)

    registry.register(Probe, probe)
    registry.register(Memory, memory, lifetime=Lifetime.USER)
    return registry, ledger


def look() -> tuple[str, Probe]:
    """What a worker thread sees."""
    return ambient.get_current_context().user_id, ambient.resolve_sync(Probe)


async def many_users(registry: Registry, hop: Callable[[], Any]) -> None:
    """USERS concurrent scopes, all open at once, each hopping to a thread with ``hop``."""
    everyone_in = anyio.Event()
    arrived = 0

    async def user(n: int) -> None:
        nonlocal arrived
        ctx = UserExecutionContext.create(f"user-{n}")
        async with registry.open_scope(ctx):
            probe = await ambient.resolve(Probe)
            arrived += 1
            if arrived == USERS:
                everyone_in.set()
            await everyone_in.wait()
            seen_user, seen_probe = await hop()
            assert seen_user == ctx.user_id
            assert seen_probe is probe

    async with anyio.create_task_group() as tg:
        for n in range(USERS):
            tg.start_soon(user, n)


def assert_released_in_time(caplog: pytest.LogCaptureFixture) -> None:
    """The scope's cleanup was woken by the release, not by its timeout."""
    assert not [r for r in caplog.records if "still active" in r.getMessage()]


class TestCarryingTheScope:
    async def test_run_sync_in_thread(self) -> None:
        """100 users at once: each worker thread sees its caller's user and Probe."""
        registry, ledger = make_registry()
        await many_users(registry, lambda: run_sync_in_thread(look))
        assert ledger.problems() == []
        assert len(ledger.created) == USERS

    async def test_context_executor_submit(self) -> None:
        """ContextExecutor.submit carries the submitter's scope into a pooled thread."""
        registry, ledger = make_registry()
        with ContextExecutor(max_workers=8) as executor:

            async def hop() -> Any:
                future = executor.submit(look)
                return await anyio.to_thread.run_sync(future.result)

            await many_users(registry, hop)
        assert len(ledger.created) == USERS
        assert ledger.problems() == []

    async def test_a_pooled_thread_keeps_nothing_of_its_previous_job(self) -> None:
        """One pooled thread runs alice's job, then one submitted with nothing bound, then
        bob's, each in a trace of its own (the last in none): every job sees its
        submitter's user, Probe, trace and baggage, or nothing at all, never what the
        previous job on that thread ran with."""
        registry, _ = make_registry()

        def seen(in_scope: bool) -> tuple[str, Probe | None, str, dict[str, object]]:
            probe = ambient.resolve_sync(Probe) if in_scope else None
            here = context_fields(user_id="raw")
            return here["user_id"], probe, here["trace_id"], dict(baggage.get_all())

        async def job(executor: ContextExecutor, trace_id: int, user: str) -> tuple[Any, ...]:
            request = otel_context.Context()
            if trace_id:
                span = trace.NonRecordingSpan(trace.SpanContext(trace_id, 1, is_remote=False))
                request = baggage.set_baggage("plan", user, trace.set_span_in_context(span))
            token = otel_context.attach(request)
            try:
                if not user:
                    return await anyio.to_thread.run_sync(executor.submit(seen, False).result)
                async with registry.open_scope(UserExecutionContext.create(user)):
                    probe = await ambient.resolve(Probe)
                    found = await anyio.to_thread.run_sync(executor.submit(seen, True).result)
                    assert found[1] is probe
                    return found
            finally:
                otel_context.detach(token)

        with ContextExecutor(max_workers=1) as executor:
            alice = await job(executor, 0xA11CE, "alice")
            nobody = await job(executor, 0xF00D, "")
            bob = await job(executor, 0, "bob")
        assert (alice[0], alice[2:]) == ("alice", (f"{0xA11CE:032x}", {"plan": "alice"}))
        assert nobody == ("", None, f"{0xF00D:032x}", {"plan": ""})
        assert (bob[0], bob[2:]) == ("bob", ("", {}))

    async def test_run_in_executor_and_map(self, anyio_backend: str) -> None:
        """loop.run_in_executor goes through submit, so it carries the scope too."""
        if anyio_backend != "asyncio":
            pytest.skip("loop.run_in_executor is asyncio's API")
        registry, _ = make_registry()
        with ContextExecutor(max_workers=4) as executor:

            async def hop() -> Any:
                return await asyncio.get_running_loop().run_in_executor(executor, look)

            await many_users(registry, hop)
            async with registry.open_scope(UserExecutionContext.create("mapper")):
                probe = await ambient.resolve(Probe)
                users = list(executor.map(lambda _: look()[1], range(10)))
            assert all(found is probe for found in users)

    async def test_threads_of_one_scope_create_a_component_once(self) -> None:
        """Twenty threads resolving the same key in one scope get one instance."""
        registry, ledger = make_registry()
        async with registry.open_scope(UserExecutionContext.create("alice")):
            with ContextExecutor(max_workers=20) as executor:
                futures = [executor.submit(ambient.resolve_sync, Memory) for _ in range(20)]
                found = [await anyio.to_thread.run_sync(f.result) for f in futures]
        assert len({id(memory) for memory in found}) == 1
        assert [kind for kind, _ in ledger.created.values()] == ["memory"]

    async def test_a_plain_executor_has_no_context_never_someone_elses(self) -> None:
        """Raw ThreadPoolExecutor threads start empty, even when reused across users."""
        registry, _ = make_registry()
        errors: list[BaseException] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
            for n in range(10):
                async with registry.open_scope(UserExecutionContext.create(f"user-{n}")):
                    future = executor.submit(ambient.get_current_context)
                    errors.append(await anyio.to_thread.run_sync(future.exception))
        assert all(isinstance(error, NoActiveContextError) for error in errors)

    @pytest.mark.parametrize(
        "hop", ["to_thread", "default_executor", "thread", "wrapped_thread", "wrapped_executor"]
    )
    async def test_every_hop_sees_its_callers_user_or_none_never_another(
        self, anyio_backend: str, hop: str
    ) -> None:
        """100 users at once, each hopping to a thread that makes the first Probe of their
        request: through the event loop's own hop (asyncio.to_thread, trio's to_thread,
        which copy the context), the loop's default executor and a raw Thread (which do
        not: their threads, reused across users, have no context), or either of those
        with ``ambient.wrap``. A thread sees its caller's user and makes the Probe the
        request then resolves, or has no context at all: never another user's."""
        if hop == "default_executor" and anyio_backend != "asyncio":
            pytest.skip("loop.run_in_executor is asyncio's API")
        registry, ledger = make_registry()
        copies = hop in {"to_thread", "wrapped_thread", "wrapped_executor"}

        def seen() -> tuple[str, Probe] | BaseException:
            try:
                return look()
            except NoActiveContextError as error:
                return error

        async def in_thread(fn: Callable[[], Any]) -> Any:
            done = threading.Event()
            result: list[Any] = []
            threading.Thread(target=lambda: (result.append(fn()), done.set())).start()
            await anyio.to_thread.run_sync(done.wait)
            return result[0]

        async def hop_to_thread() -> Any:
            if hop == "to_thread":
                if anyio_backend == "asyncio":
                    return await asyncio.to_thread(seen)
                import trio

                return await trio.to_thread.run_sync(seen)
            if hop in {"default_executor", "wrapped_executor"}:
                fn = seen if hop == "default_executor" else ambient.wrap(seen)
                if anyio_backend == "asyncio":
                    return await asyncio.get_running_loop().run_in_executor(None, fn)
                with concurrent.futures.ThreadPoolExecutor(max_workers=4) as executor:
                    return await anyio.to_thread.run_sync(executor.submit(fn).result)
            return await in_thread(seen if hop == "thread" else ambient.wrap(seen))

        everyone_in = anyio.Event()
        arrived = 0

        async def user(n: int) -> None:
            nonlocal arrived
            ctx = UserExecutionContext.create(f"user-{n}")
            async with registry.open_scope(ctx):
                arrived += 1
                if arrived == USERS:
                    everyone_in.set()
                await everyone_in.wait()
                found = await hop_to_thread()
                probe = await ambient.resolve(Probe)
                if copies:
                    assert found == (ctx.user_id, probe)
                else:
                    assert isinstance(found, NoActiveContextError)

        async with anyio.create_task_group() as tg:
            for n in range(USERS):
                tg.start_soon(user, n)
        assert len(ledger.created) == USERS
        assert ledger.problems() == []

    async def test_asgiref_sync_to_async(self, anyio_backend: str) -> None:
        """asgiref's sync_to_async (Django's thread hop) copies the context: same scope."""
        if anyio_backend != "asyncio":
            pytest.skip("asgiref runs on asyncio only")
        from asgiref.sync import sync_to_async

        registry, _ = make_registry()
        await many_users(registry, sync_to_async(look, thread_sensitive=False))

    async def test_outside_any_context_the_executor_is_a_plain_one(self) -> None:
        with ContextExecutor(max_workers=1) as executor:
            assert executor.submit(pow, 2, 10).result() == 1024
            with pytest.raises(NoActiveContextError):
                executor.submit(ambient.get_current_context).result()

    def test_async_functions_are_refused(self) -> None:
        async def job() -> None:
            pass

        with ContextExecutor(max_workers=1) as executor, pytest.raises(TypeError, match="task"):
            executor.submit(job)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="await"):
            anyio.run(run_sync_in_thread, job)


class _Engine:
    pass


class _Tools:
    pass


@pytest.mark.parametrize("hop", ["ContextExecutor", "ContextExecutor.submit_held", "ambient.wrap"])
async def test_a_cycle_through_a_thread_hop_is_reported_not_a_deadlock(hop: str) -> None:
    """A sync factory builds part of its component in another thread and waits for it;
    that part resolves what the factory is making. Without the hop that is a cycle
    reported at once; through ambient's thread helpers it is the same ResolutionError,
    not a thread waiting for itself (bounded here by the future's timeout)."""
    registry = Registry()
    with (
        ContextExecutor(max_workers=2) as executor,
        concurrent.futures.ThreadPoolExecutor(max_workers=2) as plain,
    ):

        def make_engine() -> _Engine:
            if hop == "ContextExecutor":
                part = executor.submit(ambient.resolve_sync, _Tools)
            elif hop == "ContextExecutor.submit_held":
                part = executor.submit_held(ambient.resolve_sync, _Tools)
            else:
                part = plain.submit(ambient.wrap(ambient.resolve_sync), _Tools)
            part.result(timeout=10)
            return _Engine()

        def make_tools() -> _Tools:
            ambient.resolve_sync(_Engine)
            return _Tools()

        registry.register(_Engine, make_engine)
        registry.register(_Tools, make_tools)
        with anyio.fail_after(20):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                cycle = "cycle.*_Engine -> _Tools -> _Engine"
                for _ in range(2):  # nothing is left half-made: the second try is the same
                    with pytest.raises(ResolutionError, match=cycle):
                        await anyio.to_thread.run_sync(ambient.resolve_sync, _Engine)
        assert registry.stats().created == 0


async def test_a_cycle_through_a_worker_threads_wait_for_another_task_is_named() -> None:
    """A's async factory hands work to a worker thread, which resolves B (``resolve_sync``);
    B is being made by another task, whose factory waits for A. The thread waited for B and
    the task for A, each forever (the thread holding A's factory, so that not even a
    cancellation ended it). The thread's wait now counts as A's: the cycle is named."""
    registry = Registry()
    a_started, b_started = anyio.Event(), anyio.Event()

    async def make_a() -> tuple[str, object]:
        a_started.set()
        await anyio.wait_all_tasks_blocked()  # B's creator waits for A
        # Abandoned on cancel here only so that a hang fails the test instead of lasting.
        b = await anyio.to_thread.run_sync(ambient.resolve_sync, "b", abandon_on_cancel=True)
        return ("a", b)

    async def make_b() -> tuple[str, object]:
        b_started.set()
        await a_started.wait()
        return ("b", await ambient.resolve("a"))

    registry.register("a", make_a)
    registry.register("b", make_b)
    errors: dict[str, str] = {}

    async def get(key: str) -> None:
        try:
            await ambient.resolve(key)
        except ResolutionError as exc:
            errors[key] = str(exc)

    with anyio.fail_after(10):
        async with (
            registry.open_scope(UserExecutionContext.create("alice")),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(get, "b")
            await b_started.wait()
            tg.start_soon(get, "a")
    assert errors == {
        "a": "dependency cycle while resolving: 'a' -> 'b' -> 'a'",
        "b": "dependency cycle while resolving: 'b' -> 'a' -> 'b'",
    }
    assert registry.stats().created == 0


async def _cut_short_once_started(
    started: anyio.Event, consume: Callable[[], Awaitable[object]]
) -> None:
    """``consume`` (work in a thread) cancelled once ``started`` is set (a client hanging
    up mid-step): it must end through that cancellation."""
    with anyio.CancelScope() as cancel:
        async with anyio.create_task_group() as inner:

            async def cancel_when_started() -> None:
                await started.wait()
                cancel.cancel()

            inner.start_soon(cancel_when_started)
            await consume()
    assert cancel.cancelled_caught


async def _abandoned_in_a_scope_of_alice(
    registry: Registry,
    started: anyio.Event,
    go: threading.Event,
    consume: Callable[[], Awaitable[None]],
) -> Probe:
    """In a scope of alice's, ``consume`` (work in a thread) is cancelled once ``started``
    is set (a client hanging up mid-step); ``go`` lets the abandoned thread on once the
    scope's body has ended. Returns the probe resolved in that scope, once it closed."""
    body_ended = anyio.Event()

    async def let_go() -> None:
        await body_ended.wait()
        go.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            async with registry.open_scope(UserExecutionContext.create("alice")):
                probe = await ambient.resolve(Probe)
                await _cut_short_once_started(started, consume)
                body_ended.set()
    return probe


class TestWorkThatOutlivesTheRequest:
    async def test_without_a_hold_a_late_task_gets_scope_closed_error(self) -> None:
        """A task spawned on a long-lived task group (a lifespan nursery) keeps the
        request's context, but resolving after the scope closed raises ScopeClosedError:
        it can never be handed a component that was cleaned up."""
        registry, _ = make_registry()
        scope_closed = anyio.Event()
        outcome: dict[str, Any] = {}

        async def job() -> None:
            await scope_closed.wait()
            outcome["user"] = ambient.get_current_context().user_id
            for key in (Probe, Memory):
                with pytest.raises(ScopeClosedError, match="has closed"):
                    await ambient.resolve(key)
            with pytest.raises(ScopeClosedError):
                ambient.resolve_sync(Probe)
            outcome["checked"] = True

        async with anyio.create_task_group() as service:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                probe = await ambient.resolve(Probe)
                await ambient.resolve(Memory)
                service.start_soon(job)
            assert probe.closed
            scope_closed.set()
        assert outcome == {"user": "alice", "checked": True}

    async def test_hold_scope_keeps_the_components_until_the_task_ends(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With hold_scope the task uses the request's Probe after the body ended, and the
        scope's cleanup waits for it."""
        registry, _ = make_registry(cleanup_timeout=2.0)
        body_ended = anyio.Event()
        events: list[str] = []

        async def job(label: str) -> None:
            await body_ended.wait()
            probe = await ambient.resolve(Probe)
            events.append(f"{label} used probe {probe.number} closed={probe.closed}")

        async with anyio.create_task_group() as service:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                probe = await ambient.resolve(Probe)
                service.start_soon(hold_scope(job), "job")
                body_ended.set()
            events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            f"job used probe {probe.number} closed=False",
            "scope closed, probe closed=True",
        ]
        assert_released_in_time(caplog)

    async def test_a_hold_is_bounded_by_the_cleanup_timeout(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A held task that never finishes delays cleanup by cleanup_timeout only; then it
        is warned about, and its later resolutions fail."""
        registry, _ = make_registry(cleanup_timeout=0.2)
        release = anyio.Event()
        outcome: list[str] = []

        async def stuck() -> None:
            # Bounded: a close that waited for the hold without its bound would otherwise
            # wait for this task for good, hanging the test instead of failing it.
            with anyio.move_on_after(5):
                await release.wait()
            with pytest.raises(ScopeClosedError):
                await ambient.resolve(Probe)
            outcome.append("refused")

        with caplog.at_level(logging.WARNING, logger="ambient"):
            async with anyio.create_task_group() as service:
                started = anyio.current_time()
                async with registry.open_scope(UserExecutionContext.create("alice")):
                    probe = await ambient.resolve(Probe)
                    service.start_soon(hold_scope(stuck))
                waited = anyio.current_time() - started
                assert probe.closed
                release.set()
        assert 0.2 <= waited < 2
        assert outcome == ["refused"]
        assert "hold(s)" in caplog.text

    async def test_a_held_task_cancelled_before_it_started_releases_the_scope(
        self, anyio_backend: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An asyncio.TaskGroup whose body fails cancels the held task before it ever ran:
        the hold goes with it, and the scope cleans up at once instead of waiting for the
        cleanup timeout."""
        if anyio_backend != "asyncio":
            pytest.skip("asyncio's tasks can be cancelled before they start")
        registry, ledger = make_registry(cleanup_timeout=2.0)
        ran: list[str] = []

        async def job() -> None:
            ran.append("job")

        with caplog.at_level(logging.WARNING, logger="ambient"), pytest.raises(ExceptionGroup):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                await ambient.resolve(Probe)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(hold_scope(job)())
                    raise ValueError("the handler failed")
        assert ran == []
        assert ledger.open_probes() == 0
        assert_released_in_time(caplog)

    def test_a_held_function_is_still_an_async_function(self) -> None:
        """Frameworks that ask whether a callable is async (Starlette's background tasks)
        await what hold_scope returns instead of sending it to a thread."""
        from starlette._utils import is_async_callable

        registry, _ = make_registry()

        async def job() -> None:
            pass

        async def check() -> None:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                held = hold_scope(job)
                assert is_async_callable(held)
                await held()

        anyio.run(check)

    def test_a_held_partial_is_an_async_function_to_inspect(self) -> None:
        """What Litestar asks of a background task (``inspect.iscoroutinefunction``) holds for
        a held ``functools.partial`` of an async function too, which has no name of its own."""
        import functools
        import inspect

        registry, _ = make_registry()

        async def job(order: str) -> str:
            return order

        async def check() -> None:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                held = hold_scope(functools.partial(job, "order-1"))
                assert inspect.iscoroutinefunction(held)
                assert await held() == "order-1"

        anyio.run(check)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Litestar, as tests/test_frameworks.py
    async def test_a_held_function_runs_as_a_litestar_background_task(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Litestar asks ``inspect.iscoroutinefunction`` whether a background task is async.
        On Python 3.11 (no ``inspect.markcoroutinefunction``) a held function passed for a
        sync one there: Litestar ran it in a worker thread, which made its coroutine and
        dropped it unawaited. The work never ran, and the request's cleanup waited out its
        whole cleanup_timeout for the hold."""
        if Litestar is None:
            pytest.skip("Litestar is not installed (the core runs on other Pythons)")
        registry, ledger = make_registry(cleanup_timeout=5.0)
        ran = threading.Event()
        seen: list[tuple[str, str]] = []

        async def send_receipt(order: str) -> None:
            probe = await ambient.resolve(Probe)
            seen.append((order, probe.user_id))
            ran.set()

        @get("/checkout")
        async def checkout() -> Response[dict[str, bool]]:
            receipt = BackgroundTask(hold_scope(send_receipt), "order-1")
            return Response({"ok": True}, background=receipt)

        app = Litestar(
            route_handlers=[checkout],
            middleware=[
                DefineMiddleware(AmbientMiddleware, registry=registry, identity=trusted_header())
            ],
        )
        with serve("uvicorn", app) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                answer = await client.get("/checkout", headers={"x-user-id": "alice"})
            assert answer.json() == {"ok": True}
            assert await anyio.to_thread.run_sync(ran.wait, 4.0), "the held task never ran"
        assert seen == [("order-1", "alice")]
        assert ledger.open_probes() == 0
        assert_released_in_time(caplog)

    async def test_a_held_task_is_named_after_its_function(self, anyio_backend: str) -> None:
        """asyncio names a task's coroutine in its repr, and in its warnings about a task
        destroyed while pending or an exception never retrieved: the held function's
        name, as the coroutine of an async function has, not hold_scope's own."""
        if anyio_backend != "asyncio":
            pytest.skip("asyncio's task repr")
        registry, _ = make_registry()

        async def send_receipt() -> None:
            pass

        async with registry.open_scope(UserExecutionContext.create("alice")):
            task = asyncio.create_task(hold_scope(send_receipt)())
            assert f"coro=<{send_receipt.__qualname__}()" in repr(task)
            await task

    async def test_a_second_call_that_never_ran_keeps_the_first_ones_hold(self) -> None:
        """The held function may be called once: a second call's coroutine, closed without
        running, leaves the hold of the first call, still running, in place; the scope
        stays open for it."""
        registry, ledger = make_registry(cleanup_timeout=2.0)
        started = anyio.Event()
        go = anyio.Event()
        seen: list[bool] = []

        async def job() -> None:
            started.set()
            await go.wait()
            seen.append((await ambient.resolve(Probe)).closed)

        async with (
            anyio.create_task_group() as tg,
            registry.open_scope(UserExecutionContext.create("alice")),
        ):
            await ambient.resolve(Probe)
            held = hold_scope(job)
            tg.start_soon(held)
            await started.wait()
            held().close()
            go.set()
        assert seen == [False]
        assert ledger.open_probes() == 0
        with pytest.raises(RuntimeError, match="called once"):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                held = hold_scope(job)
                held().close()
                await held()

    async def test_hold_scope_misuse(self) -> None:
        registry, _ = make_registry()

        async def job() -> None:
            pass

        with pytest.raises(NoActiveContextError):
            hold_scope(job)
        async with registry.open_scope(UserExecutionContext.create("alice")) as scope:
            with pytest.raises(TypeError, match="async function"):
                hold_scope(look)  # type: ignore[arg-type]
            held = hold_scope(job)
            await held()
            with pytest.raises(RuntimeError, match="called once"):
                await held()
        with pytest.raises(ScopeClosedError):
            scope.hold()

    async def test_submit_held_keeps_the_scope_for_a_thread(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A thread submitted with submit_held uses the Probe after the body ended; its
        release, in the executor's thread, wakes the cleanup waiting on the event loop."""
        registry, _ = make_registry(cleanup_timeout=2.0)
        go = threading.Event()
        body_ended = anyio.Event()
        events: list[str] = []

        def work() -> None:
            go.wait(10)
            user, probe = look()
            events.append(f"thread used probe of {user} closed={probe.closed}")

        async def let_go() -> None:
            await body_ended.wait()
            go.set()

        with ContextExecutor(max_workers=1) as executor:
            async with anyio.create_task_group() as tg:
                tg.start_soon(let_go)
                async with registry.open_scope(UserExecutionContext.create("alice")):
                    probe = await ambient.resolve(Probe)
                    future = executor.submit_held(work)
                    body_ended.set()
                events.append(f"scope closed, probe closed={probe.closed}")
            future.result(timeout=10)
        assert events == [
            "thread used probe of alice closed=False",
            "scope closed, probe closed=True",
        ]
        assert_released_in_time(caplog)

    @pytest.mark.parametrize("how", ["future.cancel()", "shutdown(cancel_futures=True)"])
    async def test_a_held_call_cancelled_before_it_started_releases_the_scope(
        self, how: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A submit_held call still queued behind a busy worker and then cancelled never
        runs: the hold goes with it, and the scope cleans up at once instead of waiting for
        the cleanup timeout."""
        registry, ledger = make_registry(cleanup_timeout=2.0)
        busy = threading.Event()
        ran: list[str] = []
        executor = ContextExecutor(max_workers=1)
        try:
            with caplog.at_level(logging.WARNING, logger="ambient"):
                async with registry.open_scope(UserExecutionContext.create("alice")):
                    await ambient.resolve(Probe)
                    blocker = executor.submit(busy.wait, 10)
                    queued = executor.submit_held(ran.append, "ran")
                    if how == "future.cancel()":
                        assert queued.cancel()
                    else:
                        executor.shutdown(wait=False, cancel_futures=True)
                    assert queued.cancelled()
        finally:
            busy.set()
            executor.shutdown(wait=True)
        assert blocker.result() is True
        assert ran == []
        assert ledger.open_probes() == 0
        assert_released_in_time(caplog)

    async def test_a_held_call_in_a_pool_whose_initializer_failed_releases_the_scope(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A worker's initializer fails: the pool breaks and fails its queued calls with
        BrokenThreadPool without running them. The hold of a submit_held call goes with
        it, and the scope cleans up at once instead of waiting for the cleanup timeout."""
        registry, ledger = make_registry(cleanup_timeout=2.0)
        ran: list[str] = []

        def initializer() -> None:
            raise RuntimeError("no database")

        with (
            ContextExecutor(max_workers=1, initializer=initializer) as executor,
            caplog.at_level(logging.WARNING, logger="ambient"),
        ):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                await ambient.resolve(Probe)
                future = executor.submit_held(ran.append, "ran")
                failure = await anyio.to_thread.run_sync(future.exception, 10)
        assert isinstance(failure, concurrent.futures.thread.BrokenThreadPool)
        assert ran == []
        assert ledger.open_probes() == 0
        assert_released_in_time(caplog)

    async def test_submit_held_from_a_worker_thread(self) -> None:
        """From an anyio worker thread the hold is taken on the loop's thread."""
        registry, _ = make_registry()
        with ContextExecutor(max_workers=1) as executor:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                probe = await ambient.resolve(Probe)

                def from_worker() -> Probe:
                    return executor.submit_held(lambda: look()[1]).result(timeout=10)

                assert await run_sync_in_thread(from_worker) is probe
        assert probe.closed

    def test_submit_held_from_a_thread_no_event_loop_started(self) -> None:
        """From a thread no anyio loop started (asgiref's, where a Django sync view runs)
        the hold is taken there, and released in the executor's thread: the work sees the
        request's component, and the scope cleans it up after the work. It used to raise
        a RuntimeError asking for the event loop's thread."""
        registry, ledger = make_registry()
        seen: list[tuple[str, bool]] = []

        def work() -> None:
            user, probe = look()
            seen.append((user, probe.closed))

        async def main() -> None:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                captured = ambient.wrap(lambda: executor.submit_held(work))
                thread = threading.Thread(target=captured)
                thread.start()
                await anyio.to_thread.run_sync(thread.join)

        with ContextExecutor(max_workers=1) as executor:
            anyio.run(main)
        assert seen == [("alice", False)]
        assert ledger.problems() == []

    async def test_an_abandoned_thread_holds_the_scope(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """run_sync_in_thread(abandon_on_cancel=True): the caller is cancelled, the thread
        runs on, and the scope's cleanup waits for it instead of cleaning up under it."""
        registry, _ = make_registry(cleanup_timeout=2.0)
        started = anyio.Event()
        go = threading.Event()
        events: list[str] = []

        def work() -> None:
            anyio.from_thread.run_sync(started.set)
            go.wait(10)
            user, probe = look()
            events.append(f"thread used probe of {user} closed={probe.closed}")

        async def consume() -> None:
            await run_sync_in_thread(work, abandon_on_cancel=True)

        probe = await _abandoned_in_a_scope_of_alice(registry, started, go, consume)
        events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            "thread used probe of alice closed=False",
            "scope closed, probe closed=True",
        ]
        assert_released_in_time(caplog)

    async def test_an_abandoned_step_of_a_sync_iterator_holds_the_scope(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """iterate_in_thread: each step runs in a thread with the scope; a consumer cancelled
        during a step (a stream whose client hung up) goes on at once, and the scope's
        cleanup waits for the abandoned step instead of cleaning up under it."""
        registry, _ = make_registry(cleanup_timeout=2.0)
        started = anyio.Event()
        go = threading.Event()
        events: list[str] = []

        def rows() -> Iterator[str]:
            user, probe = look()
            yield f"first row of {user}"
            anyio.from_thread.run_sync(started.set)
            go.wait(10)
            events.append(f"step used probe of {user} closed={probe.closed}")
            yield "second row"

        async def consume() -> None:
            async for row in iterate_in_thread(rows()):
                events.append(row)  # noqa: PERF401 - as it comes, before the cancel

        probe = await _abandoned_in_a_scope_of_alice(registry, started, go, consume)
        events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            "first row of alice",
            "step used probe of alice closed=False",
            "scope closed, probe closed=True",
        ]
        assert_released_in_time(caplog)

    async def test_iterate_in_thread_closes_a_body_left_early_in_a_thread_with_the_scope(
        self,
    ) -> None:
        """A sync generator whose stream is closed early (a framework closing the body of a
        client that hung up) is closed as that happens: its ``finally`` runs in a worker
        thread, with the scope, before the scope's cleanup."""
        registry, _ = make_registry()
        loop_thread = threading.get_ident()
        events: list[str] = []

        def rows() -> Iterator[str]:
            try:
                yield "first row"
                yield "second row"
            finally:
                user, probe = look()
                in_thread = threading.get_ident() != loop_thread
                events.append(f"closed for {user} in a thread={in_thread} closed={probe.closed}")

        async with registry.open_scope(UserExecutionContext.create("alice")):
            probe = await ambient.resolve(Probe)
            body = iterate_in_thread(rows())
            events.append(await body.__anext__())
            await body.aclose()
            events.append("body closed")
        events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            "first row",
            "closed for alice in a thread=True closed=False",
            "body closed",
            "scope closed, probe closed=True",
        ]

    async def test_iterate_in_thread_closes_a_body_after_its_abandoned_step(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A sync generator whose consumer was cancelled during a step is closed by the
        abandoned step's thread once the step returns, still holding the scope: its
        ``finally`` runs before the scope's cleanup."""
        registry, _ = make_registry(cleanup_timeout=2.0)
        started = anyio.Event()
        go = threading.Event()
        events: list[str] = []

        def rows() -> Iterator[str]:
            try:
                yield "first row"
                anyio.from_thread.run_sync(started.set)
                go.wait(10)
                yield "second row"
            finally:
                user, probe = look()
                events.append(f"closed for {user}, probe closed={probe.closed}")

        async def consume() -> None:
            async for row in iterate_in_thread(rows()):
                events.append(row)  # noqa: PERF401 - as it comes, before the cancel

        probe = await _abandoned_in_a_scope_of_alice(registry, started, go, consume)
        events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            "first row",
            "closed for alice, probe closed=False",
            "scope closed, probe closed=True",
        ]
        assert_released_in_time(caplog)

    async def test_iterate_in_thread_steps_to_the_end_in_the_callers_scope(self) -> None:
        registry, _ = make_registry()
        async with registry.open_scope(UserExecutionContext.create("bob")):
            probe = await ambient.resolve(Probe)
            seen = [row async for row in iterate_in_thread(look() for _ in range(3))]
        assert seen == [("bob", probe)] * 3
        assert [row async for row in iterate_in_thread([])] == []

    async def test_iterate_in_thread_gives_every_item_none_and_falsy_ones_included(
        self,
    ) -> None:
        """Items that are None, or false, are items like any other: a body streaming a
        sync generator's rows gets them all, in order, to its end."""
        rows: list[object] = [None, 0, "", b"", None, "last"]
        assert [row async for row in iterate_in_thread(rows)] == rows
        assert [row async for row in iterate_in_thread(iter([None]))] == [None]

    @pytest.mark.parametrize("ending", ["exhausted", "raised"])
    async def test_iterate_in_thread_gives_an_iterator_that_ended_no_close(
        self, ending: str
    ) -> None:
        """An iterator that ran to its end, or raised, has ended: iterate_in_thread calls
        no close() of it (only one left before its end is closed, its finally blocks to
        run), so a close() that is no mere formality runs only for the early leaver."""
        closed: list[str] = []

        class Rows:
            def __init__(self) -> None:
                self.rows = iter([1, 2])

            def __iter__(self) -> Rows:
                return self

            def __next__(self) -> int:
                row = next(self.rows, None)
                if row is not None:
                    return row
                if ending == "raised":
                    raise ValueError("broken")
                raise StopIteration

            def close(self) -> None:
                closed.append("closed")

        seen: list[int] = []
        with anyio.fail_after(10):
            if ending == "exhausted":
                seen = [row async for row in iterate_in_thread(Rows())]
            else:
                with pytest.raises(ValueError, match="broken"):
                    async for row in iterate_in_thread(Rows()):
                        seen.append(row)
        assert seen == [1, 2]
        assert closed == []

    async def test_a_thread_cancelled_before_it_started_releases_the_scope(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """run_sync_in_thread(abandon_on_cancel=True) in a cancelled caller: no thread
        ever runs ``fn``, so the hold it took is released at once, and the scope's cleanup
        does not wait for its timeout."""
        registry, ledger = make_registry(cleanup_timeout=2.0)
        ran: list[str] = []
        async with registry.open_scope(UserExecutionContext.create("alice")):
            await ambient.resolve(Probe)
            with anyio.CancelScope() as cancel:
                cancel.cancel()
                await run_sync_in_thread(ran.append, "ran", abandon_on_cancel=True)
            assert cancel.cancelled_caught
        assert ran == []
        assert ledger.problems() == []
        assert len(ledger.cleaned) == 1
        assert_released_in_time(caplog)

    async def test_a_held_call_the_executor_refuses_releases_the_scope(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """submit_held() on an executor already shut down raises as submit() does: the
        hold it took is released, so the scope's cleanup does not wait for its timeout."""
        registry, ledger = make_registry(cleanup_timeout=2.0)
        executor = ContextExecutor(max_workers=1)
        executor.shutdown()
        ran: list[str] = []
        async with registry.open_scope(UserExecutionContext.create("alice")):
            await ambient.resolve(Probe)
            with pytest.raises(RuntimeError, match="shutdown"):
                executor.submit_held(ran.append, "ran")
        assert ran == []
        assert ledger.problems() == []
        assert len(ledger.cleaned) == 1
        assert_released_in_time(caplog)

    async def test_submit_held_refuses_an_async_function_and_holds_nothing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """submit_held() of an async function raises TypeError, as submit() does, before it
        takes a hold: the scope cleans up at once. Unrefused, a thread made the coroutine
        and dropped it unawaited (the work never ran); refused after the hold was taken,
        the scope's cleanup waited out its timeout for a call that never existed."""
        registry, ledger = make_registry(cleanup_timeout=2.0)

        async def job() -> None:
            pass

        with ContextExecutor(max_workers=1) as executor:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                await ambient.resolve(Probe)
                with pytest.raises(TypeError, match="task"):
                    executor.submit_held(job)  # type: ignore[arg-type]
        assert ledger.open_probes() == 0
        assert_released_in_time(caplog)

    def test_a_held_function_keeps_its_functions_name_and_docs(self) -> None:
        """What hold_scope returns has the held function's name, qualified name, docstring
        and ``__wrapped__`` (what frameworks show and log of a background task), not the
        name of ambient's own wrapper."""
        registry, _ = make_registry()

        async def send_receipt() -> None:
            """Mail the receipt."""

        async def check() -> None:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                held = hold_scope(send_receipt)
                assert held.__name__ == "send_receipt"
                assert held.__qualname__ == send_receipt.__qualname__
                assert held.__doc__ == "Mail the receipt."
                assert held.__wrapped__ is send_receipt  # type: ignore[attr-defined]
                await held()

        anyio.run(check)

    async def test_a_thread_not_abandoned_keeps_its_cancelled_caller_until_it_returns(
        self,
    ) -> None:
        """run_sync_in_thread() without abandon_on_cancel, in a scope: a cancelled caller
        waits for its thread to return before it goes on, as anyio's run_sync does (the
        thread may still be using what the caller owns). Taking the path that holds the
        scope for an abandoned thread, the caller went on while the thread still ran."""
        registry, _ = make_registry()
        started = anyio.Event()
        go = threading.Event()
        events: list[str] = []

        def work() -> None:
            anyio.from_thread.run_sync(started.set)
            go.wait(10)
            events.append("thread returned")

        async def cancel_then_let_go(cancel: anyio.CancelScope) -> None:
            await started.wait()
            cancel.cancel()
            await anyio.wait_all_tasks_blocked()  # a caller that went on has done so now
            go.set()

        with anyio.fail_after(10):
            async with (
                anyio.create_task_group() as tg,
                registry.open_scope(UserExecutionContext.create("alice")),
            ):
                with anyio.CancelScope() as cancel:
                    tg.start_soon(cancel_then_let_go, cancel)
                    await run_sync_in_thread(work)
                events.append("caller went on")
        assert events == ["thread returned", "caller went on"]

    @pytest.mark.parametrize(
        "hop", ["plain", "abandon_on_cancel", "iterate_in_thread", "iterate_in_thread closing"]
    )
    async def test_every_thread_hop_takes_its_thread_from_the_given_limiter(self, hop: str) -> None:
        """The ``limiter`` of run_sync_in_thread (with or without abandon_on_cancel, with a
        scope bound) and of iterate_in_thread (its steps, and the close of a body left
        early) is the one each thread is borrowed from: a call it was not passed to ran
        outside the application's bound on its threads, on anyio's default limiter."""
        registry, _ = make_registry()
        limiter = anyio.CapacityLimiter(1)

        def borrowed() -> float:
            return anyio.from_thread.run_sync(lambda: limiter.borrowed_tokens)

        seen: list[float] = []

        def rows() -> Iterator[str]:
            try:
                seen.append(borrowed())
                yield "first row"
                yield "second row"
            finally:
                seen.append(borrowed())

        with anyio.fail_after(10):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                if hop == "plain":
                    seen.append(await run_sync_in_thread(borrowed, limiter=limiter))
                elif hop == "abandon_on_cancel":
                    seen.append(
                        await run_sync_in_thread(borrowed, abandon_on_cancel=True, limiter=limiter)
                    )
                else:
                    body = iterate_in_thread(rows(), limiter=limiter)
                    assert await body.__anext__() == "first row"
                    if hop == "iterate_in_thread closing":
                        await body.aclose()
                    else:
                        assert [row async for row in body] == ["second row"]
        assert seen == ([1] if hop in {"plain", "abandon_on_cancel"} else [1, 1])
        assert limiter.borrowed_tokens == 0

    async def test_iterate_in_thread_closes_a_body_left_in_a_cancelled_caller(self) -> None:
        """A caller cancelled between two steps closes the body in its cancelled scope (an
        ``aclosing()`` around the loop of a cancelled task): the sync generator's
        ``finally`` still runs, in a worker thread with the scope, before the scope's
        cleanup. Unshielded, the cancellation stopped the close before its thread started,
        and the generator was left for the garbage collector to finish in any thread, with
        no scope, after the request's components had been cleaned up."""
        registry, _ = make_registry()
        events: list[str] = []

        def rows() -> Iterator[str]:
            try:
                yield "first row"
                yield "second row"
            finally:
                user, probe = look()
                events.append(f"closed for {user}, probe closed={probe.closed}")

        with anyio.fail_after(10):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                probe = await ambient.resolve(Probe)
                body = iterate_in_thread(rows())
                with anyio.CancelScope() as cancel:
                    try:
                        async for row in body:
                            events.append(row)
                            cancel.cancel()
                            await anyio.sleep_forever()
                    finally:
                        await body.aclose()
                assert cancel.cancelled_caught
            events.append(f"scope closed, probe closed={probe.closed}")
        assert events == [
            "first row",
            "closed for alice, probe closed=False",
            "scope closed, probe closed=True",
        ]


@pytest.mark.parametrize("bound", ["nothing", "a context without a scope"])
async def test_abandon_on_cancel_with_no_scope_bound_runs_as_anyio_would(bound: str) -> None:
    """``run_sync_in_thread(fn, abandon_on_cancel=True)`` outside a request (a script, a
    job with only a bound context): there is no scope to hold, and it runs ``fn`` as
    without the option. It raised NoActiveContextError, which the docs did not mention."""
    seen: list[str | None] = []

    def work() -> str:
        ctx = ambient.current_context_or_none()
        seen.append(None if ctx is None else ctx.user_id)
        return "ran"

    if bound == "nothing":
        assert await run_sync_in_thread(work, abandon_on_cancel=True) == "ran"
        assert seen == [None]
    else:
        with ambient.bind_context(UserExecutionContext.create("alice")):
            assert await run_sync_in_thread(work, abandon_on_cancel=True) == "ran"
        assert seen == ["alice"]


@pytest.mark.parametrize("bound", ["nothing", "a context without a scope"])
async def test_abandon_on_cancel_with_no_scope_bound_lets_a_cancelled_caller_go(
    bound: str,
) -> None:
    """Outside a request, ``abandon_on_cancel=True`` still does what it says: a caller
    cancelled while ``fn`` runs goes on at once, and the thread runs on after it."""
    started = anyio.Event()
    release = threading.Event()
    ended = threading.Event()

    def work() -> None:
        anyio.from_thread.run_sync(started.set)
        release.wait(6)
        ended.set()

    async def call() -> None:
        await _cut_short_once_started(
            started, lambda: run_sync_in_thread(work, abandon_on_cancel=True)
        )

    try:
        with anyio.fail_after(5):
            if bound == "nothing":
                await call()
            else:
                with ambient.bind_context(UserExecutionContext.create("alice")):
                    await call()
        assert not ended.is_set()
    finally:
        release.set()
    assert await anyio.to_thread.run_sync(ended.wait, 10)


async def test_abandon_on_cancel_in_work_that_outlived_its_request_runs_without_a_hold() -> None:
    """A task that outlived its request (started on a long-lived task group) calls
    ``run_sync_in_thread(fn, abandon_on_cancel=True)``: there is no open scope left to hold,
    and ``fn`` runs as without the option, seeing the request's context and refused its
    components. It raised ScopeClosedError ("cannot hold a scope that has already
    closed") without running ``fn``, which the docs did not mention."""
    registry, _ = make_registry()
    scope_closed = anyio.Event()
    seen: list[str] = []

    def work() -> str:
        seen.append(ambient.get_current_context().user_id)
        with pytest.raises(ScopeClosedError):
            ambient.resolve_sync(Probe)
        return "ran"

    async def job() -> None:
        await scope_closed.wait()
        seen.append(await run_sync_in_thread(work, abandon_on_cancel=True))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as service:
            async with registry.open_scope(UserExecutionContext.create("alice")):
                service.start_soon(job)
            scope_closed.set()
    assert seen == ["alice", "ran"]


async def test_abandon_on_cancel_in_a_user_factory_runs_in_the_requests_scope() -> None:
    """A USER component's async factory loads it with ``run_sync_in_thread(...,
    abandon_on_cancel=True)``: the factory sees a view of the request's scope, and the hold
    is the request scope's own, and the thread loads the component. Holding the view
    itself raised AttributeError, and the component was never made."""
    registry = Registry()
    loop_thread = threading.get_ident()

    async def profile(user: UserRef) -> tuple[str, bool]:
        def load() -> bool:
            return threading.get_ident() != loop_thread

        return (user.user_id, await run_sync_in_thread(load, abandon_on_cancel=True))

    registry.register("profile", profile, lifetime=Lifetime.USER)
    with anyio.fail_after(10):
        async with registry.open_scope(UserExecutionContext.create("alice")):
            assert await ambient.resolve("profile") == ("alice", True)
    await registry.aclose()


def _until(condition: Callable[[], bool]) -> None:
    """Block (in a worker thread) until ``condition`` holds; bounded."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.005)


async def test_fire_and_forget_behind_a_real_server() -> None:
    """Under uvicorn: an endpoint's asyncio.create_task outlives the response. Without a
    hold it gets ScopeClosedError once the request's scope closed; with hold_scope it uses
    the request's Probe after the response arrived, while another user is served, and the
    request's cleanup waits for it."""
    registry, ledger = make_registry()
    app = FastAPI()
    install(app, registry=registry, identity=trusted_header())
    jobs: dict[str, dict[str, Any]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def job(name: str) -> None:
        state = jobs[name]
        await state["go"].wait()
        try:
            probe = await ambient.resolve(Probe)
            state["result"] = f"probe {probe.number} closed={probe.closed}"
        except ScopeClosedError:
            state["result"] = "ScopeClosedError"
        state["done"].set()

    @app.get("/spawn/{name}")
    async def spawn(name: str, held: bool = False) -> dict[str, int]:
        probe = await ambient.resolve(Probe)
        jobs[name] = {
            "go": asyncio.Event(),
            "done": threading.Event(),
            "loop": asyncio.get_running_loop(),
        }
        task = asyncio.create_task(hold_scope(job)(name) if held else job(name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {"probe": probe.number}

    @app.get("/whoami")
    async def whoami() -> dict[str, str]:
        return {"user": ambient.get_current_context().user_id}

    def go(name: str) -> None:
        state = jobs[name]
        state["loop"].call_soon_threadsafe(state["go"].set)

    with serve("uvicorn", app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            loose = (await http.get("/spawn/loose", headers={"x-user-id": "alice"})).json()
            await anyio.to_thread.run_sync(_until, lambda: ledger.open_probes() == 0)
            go("loose")
            assert await anyio.to_thread.run_sync(jobs["loose"]["done"].wait, 10)

            held = (await http.get("/spawn/held?held=true", headers={"x-user-id": "alice"})).json()
            other = await http.get("/whoami", headers={"x-user-id": "bob"})
            assert other.json() == {"user": "bob"}
            assert ledger.open_probes() == 1  # alice's, held
            go("held")
            assert await anyio.to_thread.run_sync(jobs["held"]["done"].wait, 10)
            await anyio.to_thread.run_sync(_until, lambda: ledger.open_probes() == 0)

    assert loose["probe"] != held["probe"]
    assert jobs["loose"]["result"] == "ScopeClosedError"
    assert jobs["held"]["result"] == f"probe {held['probe']} closed=False"
    assert ledger.problems() == []


def _user_here() -> str | None:
    """What a worker process sees (module level: a process pool pickles it by name)."""
    ctx = ambient.current_context_or_none()
    return None if ctx is None else ctx.user_id


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
# Python 3.12+ warns about forking a process that has threads (other tests leave some).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_process_has_no_context_never_the_one_that_started_it() -> None:
    """A process pool forks its workers at its first submit, in the submitting request's
    context: they start empty, as spawned ones do, so a later user's job never runs as
    the user whose request happened to start the pool."""
    fork = multiprocessing.get_context("fork")
    seen = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
        for user in ("alice", "bob"):
            with ambient.bind_context(UserExecutionContext.create(user)):
                seen.append(pool.submit(_user_here).result(timeout=30))
    assert seen == [None, None]


def _creations_here() -> tuple[int, int]:
    """How many creations a worker process's resolutions would take for ones it is inside
    of: those awaited in its task, and those handed over to it by a sync factory."""
    from ambient import _binding

    return len(_binding._resolving.get()), len(_binding._handed_over.get())


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("factory", ["async", "sync handing work to a thread"])
async def test_a_worker_process_forked_inside_a_factory_is_inside_none_of_its_creations(
    factory: str,
) -> None:
    """A process pool first used inside a component's factory forks its worker there: the
    worker starts outside that creation, so a job resolving the component in it is never
    taken for a dependency cycle of the factory that happened to start the pool."""
    fork = multiprocessing.get_context("fork")
    seen: list[tuple[int, int]] = []
    inside: list[tuple[int, int]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:

        def start_pool() -> str:
            inside.append(_creations_here())
            seen.append(pool.submit(_creations_here).result(timeout=30))
            return "pool"

        async def make_async() -> str:
            return await anyio.to_thread.run_sync(start_pool)

        def make_sync() -> str:
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as threads:
                return threads.submit(ambient.wrap(start_pool)).result(timeout=30)

        registry = Registry()
        registry.register(
            "pool", make_async if factory == "async" else make_sync, lifetime=Lifetime.APP
        )
        with anyio.fail_after(60):
            async with registry.open_scope(UserExecutionContext.create("alice")):
                assert await ambient.resolve("pool") == "pool"
        await registry.aclose()
    # Where the pool forked, the creation was under way.
    assert inside == [(1, 0) if factory == "async" else (0, 1)]
    assert seen == [(0, 0)]


def _trace_here() -> tuple[str, dict[str, object]]:
    """The trace id a worker process's log lines carry, and the baggage it sees."""
    return context_fields()["trace_id"], dict(baggage.get_all())


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_process_is_not_in_the_trace_that_started_it() -> None:
    """Nor does a forked worker stay in the trace of the request that started the pool: a
    later request's job neither logs that request's trace id nor sees its baggage."""
    fork = multiprocessing.get_context("fork")
    seen = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
        for trace_id in (0xA11CE, 0xB0B):
            span = trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id=1, is_remote=False))
            request = baggage.set_baggage("plan", f"{trace_id:x}", trace.set_span_in_context(span))
            token = otel_context.attach(request)
            try:
                seen.append(pool.submit(_trace_here).result(timeout=30))
            finally:
                otel_context.detach(token)
    assert seen == [("", {}), ("", {})]


class _RemoteConn:
    """A component whose cleanup awaits (a network close)."""

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("lifetime", [Lifetime.REQUEST, Lifetime.USER])
def test_a_raw_threads_async_cleanup_after_shutdown_is_reported_not_skipped(
    backend: str, lifetime: Lifetime, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``threading.Thread`` (no anyio loop started it) is still making a component with
    an async cleanup when its request ends, the registry is closed and the event loop has
    ended. The thread gets ScopeClosedError; the cleanup, which no loop is left to await
    and no later close would run, is reported as a failed cleanup naming the component
    and why: logged, counted. It used to be queued for a scope that never came, and
    skipped without a word."""
    started, go_on = threading.Event(), threading.Event()
    made: list[_RemoteConn] = []
    outcome: list[BaseException] = []

    def make() -> _RemoteConn:
        started.set()
        go_on.wait(10)
        made.append(_RemoteConn())
        return made[-1]

    registry = Registry()
    registry.register(_RemoteConn, make, lifetime=lifetime, name="RemoteConn")

    def work() -> None:
        try:
            ambient.resolve_sync(_RemoteConn)
        except ScopeClosedError as exc:
            outcome.append(exc)

    threads: list[threading.Thread] = []

    async def serve_and_shut_down() -> None:
        async with registry.open_scope(UserExecutionContext.create("alice")):
            threads.append(threading.Thread(target=ambient.wrap(work)))
            threads[0].start()
            await anyio.to_thread.run_sync(started.wait, 10)
        await registry.aclose()

    try:
        anyio.run(serve_and_shut_down, backend=backend)
    finally:
        go_on.set()
        for thread in threads:
            thread.join(10)
    assert len(outcome) == 1
    assert [conn.closed for conn in made] == [False]
    reported = [r.getMessage() for r in caplog.records if r.name == "ambient"]
    assert len(reported) == 1
    assert reported[0].startswith("cleanup of RemoteConn failed: it is async and could not run")
    stats = registry.stats()
    assert (stats.created, stats.cleaned, stats.cleanup_failures) == (1, 1, 1)


async def test_a_worker_thread_is_handed_no_event_loop(anyio_backend: str) -> None:
    """On the loop's thread the loop's own thread-safe call is handed out, and the
    asyncio-only integrations refuse trio; in a worker thread (a sync endpoint's) no loop
    runs, even with trio imported: nothing is handed out, and they refuse to start there."""
    import trio

    assert _loops.on_loop_thread()
    assert _loops.in_trio() == (anyio_backend == "trio")
    if anyio_backend == "asyncio":
        assert _loops.loop_call_soon() == asyncio.get_running_loop().call_soon_threadsafe
        _loops.require_asyncio("asyncio only")
        _loops.refuse_trio("asyncio only")
    else:
        assert _loops.loop_call_soon() == trio.lowlevel.current_trio_token().run_sync_soon
        with pytest.raises(UnsupportedBackendError, match="^asyncio only"):
            _loops.require_asyncio("asyncio only")
        with pytest.raises(UnsupportedBackendError, match="^asyncio only"):
            _loops.refuse_trio("asyncio only")

    def in_worker() -> None:
        assert not _loops.on_loop_thread()
        assert not _loops.in_trio()
        assert _loops.loop_call_soon() is None
        with pytest.raises(UnsupportedBackendError, match="^asyncio only"):
            _loops.require_asyncio("asyncio only")
        _loops.refuse_trio("asyncio only")  # no trio run here either

    await anyio.to_thread.run_sync(in_worker)


def test_a_thread_is_handed_no_event_loop_where_trio_was_never_imported() -> None:
    """An application on asyncio alone never imports trio: a thread with no loop is
    handed no call to make, as where trio is imported."""
    code = (
        "import sys\n"
        "from ambient import _loops\n"
        "assert _loops.loop_call_soon() is None\n"
        "assert not _loops.on_loop_thread() and not _loops.in_trio()\n"
        "assert 'trio' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # noqa: S603
