"""Microbenchmarks: the operations a request performs many times, beside the peers' own.

Each operation runs in a tight loop; the cost of the empty loop is subtracted (the call
itself, and for ``await`` the coroutine, is part of the cost). Groups:

* reading the current context: ``get_current_context()`` against a bare ``ContextVar.get()``,
  starlette-context's ``context[...]`` and asgi-correlation-id's ``correlation_id.get()``;
* a cached component: ``await ambient.resolve(K)``, ``resolve_sync``, ``Scope.resolve``
  against dishka's ``await container.get(K)`` and svcs's ``aget``/``get``;
* the first resolution of a sync and of an async factory in a fresh scope, against dishka
  and svcs (100 distinct keys per scope, so every resolution creates);
* building a context: ``UserExecutionContext.create`` against a frozen dataclass;
* opening and closing a scope: ``registry.open_scope(ctx)`` against a ContextVar set/reset,
  dishka's REQUEST container and an svcs ``Container``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import ambient
from ambient import Lifetime, Registry, UserExecutionContext
from benchmarks import Options, Report, Stat, Table, Target, interleave, ratio_of_medians
from benchmarks.bench_asgi import (
    Dispatcher,
    FloorContext,
    User,
    ambient_registry,
    dishka_container,
    floor_var,
    svcs_registry,
)

Op = Callable[[], Awaitable[float]]
KEYS = 100


def _sync_loop(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn`` (the empty loop's cost taken out)."""
    loop = itertools.repeat(None, n)
    started = time.perf_counter()
    for _ in loop:
        fn()
    spent = time.perf_counter() - started
    loop = itertools.repeat(None, n)
    started = time.perf_counter()
    for _ in loop:
        pass
    return (spent - (time.perf_counter() - started)) / n


async def _async_loop(fn: Callable[[], Awaitable[object]], n: int) -> float:
    """Seconds per ``await fn()`` (the empty loop's cost taken out)."""
    loop = itertools.repeat(None, n)
    started = time.perf_counter()
    for _ in loop:
        await fn()
    spent = time.perf_counter() - started
    loop = itertools.repeat(None, n)
    started = time.perf_counter()
    for _ in loop:
        pass
    return (spent - (time.perf_counter() - started)) / n


def _group(
    report: Report,
    title: str,
    results: dict[str, list[float]],
    reference: str,
    unit_label: str = "ns/op",
) -> dict[str, Stat]:
    table = Table(title, ["operation", unit_label, f"x {reference} (90% CI)"])
    stats = {}
    for name, values in results.items():
        stats[name] = Stat.of(values).scaled(1e9)
        ratio = ratio_of_medians(values, results[reference]).fmt(2)
        table.add(name, stats[name].fmt(0), "1" if name == reference else ratio)
    table.notes.append(
        "median over interleaved rounds (min-max), empty loop subtracted; ratio of medians "
        "(90% bootstrap interval)"
    )
    report.table(table)
    return stats


# -- reading the context -----------------------------------------------------------------


def context_reads(n: int) -> dict[str, Op]:
    """Each read runs with its library's context bound."""
    from asgi_correlation_id import correlation_id
    from starlette_context import context, request_cycle_context

    registry = Registry()
    ctx = UserExecutionContext.create("user-001")

    async def ambient_get() -> float:
        async with registry.open_scope(ctx):
            return _sync_loop(ambient.get_current_context, n)

    async def ambient_or_none() -> float:
        async with registry.open_scope(ctx):
            return _sync_loop(ambient.current_context_or_none, n)

    async def contextvar() -> float:
        token = floor_var.set(FloorContext("user-001"))
        try:
            return _sync_loop(floor_var.get, n)
        finally:
            floor_var.reset(token)

    async def starlette_context() -> float:
        with request_cycle_context({"x-user-id": "user-001"}):
            return _sync_loop(lambda: context["x-user-id"], n)

    async def correlation() -> float:
        token = correlation_id.set("user-001")
        try:
            return _sync_loop(correlation_id.get, n)
        finally:
            correlation_id.reset(token)

    return {
        "ContextVar.get() (floor)": contextvar,
        "ambient.get_current_context()": ambient_get,
        "ambient.current_context_or_none()": ambient_or_none,
        "starlette-context context[key]": starlette_context,
        "asgi-correlation-id correlation_id.get()": correlation,
    }


# -- cached resolution -------------------------------------------------------------------


def cached_resolves(n: int) -> dict[str, Op]:
    """A component resolved once, then read again ``n`` times."""
    import svcs

    registry = ambient_registry(components=True)
    ctx = UserExecutionContext.create("user-001")
    dishka = dishka_container()
    svcs_reg = svcs_registry()
    dispatcher_accessor = ambient.accessor(Dispatcher)

    async def ambient_resolve() -> float:
        async with registry.open_scope(ctx):
            await ambient.resolve(Dispatcher)
            return await _async_loop(lambda: ambient.resolve(Dispatcher), n)

    async def ambient_accessor() -> float:
        async with registry.open_scope(ctx):
            await dispatcher_accessor()
            return await _async_loop(dispatcher_accessor, n)

    async def ambient_resolve_sync() -> float:
        async with registry.open_scope(ctx):
            ambient.resolve_sync(Dispatcher)
            return _sync_loop(lambda: ambient.resolve_sync(Dispatcher), n)

    async def scope_resolve() -> float:
        async with registry.open_scope(ctx) as scope:
            await scope.resolve(Dispatcher)
            return await _async_loop(lambda: scope.resolve(Dispatcher), n)

    async def dishka_get() -> float:
        async with dishka(context={User: User("user-001")}) as container:
            await container.get(Dispatcher)
            return await _async_loop(lambda: container.get(Dispatcher), n)

    async def svcs_aget() -> float:
        async with svcs.Container(svcs_reg) as container:
            container.register_local_value(User, User("user-001"))
            await container.aget(Dispatcher)
            return await _async_loop(lambda: container.aget(Dispatcher), n)

    async def svcs_get() -> float:
        async with svcs.Container(svcs_reg) as container:
            container.register_local_value(User, User("user-001"))
            container.get(Dispatcher)
            return _sync_loop(lambda: container.get(Dispatcher), n)

    return {
        "dishka await container.get(K)": dishka_get,
        "await ambient.resolve(K)": ambient_resolve,
        "await accessor(K)()": ambient_accessor,
        "ambient.resolve_sync(K)": ambient_resolve_sync,
        "await scope.resolve(K)": scope_resolve,
        "svcs await container.aget(K)": svcs_aget,
        "svcs container.get(K)": svcs_get,
    }


# -- first resolution --------------------------------------------------------------------


def _thing_classes() -> list[type]:
    return [type(f"Thing{i}", (), {"__slots__": ()}) for i in range(KEYS)]


def _async_factory(cls: type) -> Callable[[], Awaitable[Any]]:
    async def make() -> Any:
        return cls()

    return make


def first_resolves(scopes: int) -> dict[str, Op]:
    """``KEYS`` distinct components created in each of ``scopes`` fresh scopes."""
    import svcs
    from dishka import Provider, make_async_container
    from dishka import Scope as DishkaScope

    classes = _thing_classes()
    sync_reg, async_reg = Registry(), Registry()
    dishka_sync, dishka_async = (
        Provider(scope=DishkaScope.REQUEST),
        Provider(scope=DishkaScope.REQUEST),
    )
    svcs_sync, svcs_async = svcs.Registry(), svcs.Registry()
    for cls in classes:
        make_async = _async_factory(cls)
        sync_reg.register(cls, cls)
        async_reg.register(cls, make_async)
        dishka_sync.provide(cls)
        dishka_async.provide(make_async, provides=cls)
        svcs_sync.register_factory(cls, cls)
        svcs_async.register_factory(cls, make_async)
    dishka_sync_container = make_async_container(dishka_sync)
    dishka_async_container = make_async_container(dishka_async)

    def ambient_first(registry: Registry, use_sync: bool) -> Op:
        async def run() -> float:
            spent = 0.0
            for i in range(scopes):
                ctx = UserExecutionContext.create(f"user-{i % 100}")
                async with registry.open_scope(ctx) as scope:
                    started = time.perf_counter()
                    if use_sync:
                        for cls in classes:
                            scope.resolve_sync(cls)
                    else:
                        for cls in classes:
                            await scope.resolve(cls)
                    spent += time.perf_counter() - started
            return spent / (scopes * KEYS)

        return run

    def dishka_first(container: Any) -> Op:
        async def run() -> float:
            spent = 0.0
            for _ in range(scopes):
                async with container() as request_container:
                    started = time.perf_counter()
                    for cls in classes:
                        await request_container.get(cls)
                    spent += time.perf_counter() - started
            return spent / (scopes * KEYS)

        return run

    def svcs_first(registry: svcs.Registry, use_sync: bool) -> Op:
        async def run() -> float:
            spent = 0.0
            for _ in range(scopes):
                async with svcs.Container(registry) as container:
                    started = time.perf_counter()
                    if use_sync:
                        for cls in classes:
                            container.get(cls)
                    else:
                        for cls in classes:
                            await container.aget(cls)
                    spent += time.perf_counter() - started
            return spent / (scopes * KEYS)

        return run

    return {
        "dishka, sync factory": dishka_first(dishka_sync_container),
        "ambient await resolve, sync factory": ambient_first(sync_reg, use_sync=False),
        "ambient resolve_sync, sync factory": ambient_first(sync_reg, use_sync=True),
        "svcs get, sync factory": svcs_first(svcs_sync, use_sync=True),
        "dishka, async factory": dishka_first(dishka_async_container),
        "ambient await resolve, async factory": ambient_first(async_reg, use_sync=False),
        "svcs aget, async factory": svcs_first(svcs_async, use_sync=False),
    }


# -- building a context ------------------------------------------------------------------


def context_builds(n: int) -> dict[str, Op]:
    """Constructing the per-request context object."""

    async def floor() -> float:
        return _sync_loop(lambda: FloorContext("user-001"), n)

    async def create() -> float:
        return _sync_loop(lambda: UserExecutionContext.create("user-001"), n)

    async def create_given() -> float:
        return _sync_loop(
            lambda: UserExecutionContext.create(
                "user-001", thread_id="thread-1", run_id="run-1", request_id="request-1"
            ),
            n,
        )

    async def child() -> float:
        parent = UserExecutionContext.create("user-001")
        return _sync_loop(lambda: parent.child("tool"), n)

    return {
        "frozen dataclass (floor)": floor,
        "UserExecutionContext.create(user)": create,
        "create(user, thread/run/request ids given)": create_given,
        "ctx.child(operation)": child,
    }


# -- opening and closing a scope ---------------------------------------------------------


def scope_cycles(n: int) -> dict[str, Op]:
    """One open+close per iteration, nothing resolved."""
    import svcs

    registry = ambient_registry(components=True)
    user_registry = Registry()
    user_registry.register(Dispatcher, lambda: Dispatcher("u"), lifetime=Lifetime.USER)
    ctx = UserExecutionContext.create("user-001")
    dishka = dishka_container()
    svcs_reg = svcs_registry()
    user = User("user-001")

    async def floor() -> float:
        async def cycle() -> None:
            token = floor_var.set(FloorContext("user-001"))
            floor_var.reset(token)

        return await _async_loop(cycle, n)

    async def ambient_scope() -> float:
        async def cycle() -> None:
            async with registry.open_scope(ctx):
                pass

        return await _async_loop(cycle, n)

    async def ambient_scope_user() -> float:
        async def cycle() -> None:
            async with user_registry.open_scope(ctx):
                await ambient.resolve(Dispatcher)

        return await _async_loop(cycle, n)

    async def dishka_scope() -> float:
        async def cycle() -> None:
            async with dishka(context={User: user}):
                pass

        return await _async_loop(cycle, n)

    async def svcs_scope() -> float:
        async def cycle() -> None:
            async with svcs.Container(svcs_reg) as container:
                container.register_local_value(User, user)

        return await _async_loop(cycle, n)

    async def exit_stack() -> float:
        async def cycle() -> None:
            async with AsyncExitStack():
                pass

        return await _async_loop(cycle, n)

    return {
        "ContextVar set+reset (floor)": floor,
        "AsyncExitStack enter+exit": exit_stack,
        "ambient open_scope + close": ambient_scope,
        "ambient scope + cached USER component": ambient_scope_user,
        "dishka REQUEST container enter+exit": dishka_scope,
        "svcs Container + local value, enter+exit": svcs_scope,
    }


async def run(report: Report, options: Options) -> None:
    """The microbenchmark tables and their targets."""
    rounds = options.rounds
    n = options.size(200_000, 20_000)
    reads = _group(
        report,
        f"Reading the current context ({n} calls x {rounds} rounds)",
        await interleave(context_reads(n), rounds),
        "ContextVar.get() (floor)",
    )
    resolves = _group(
        report,
        f"Resolving a cached component ({n} calls x {rounds} rounds)",
        await interleave(cached_resolves(n), rounds),
        "dishka await container.get(K)",
    )
    scopes = options.size(100, 10)
    _group(
        report,
        f"First resolution in a fresh scope ({KEYS} keys x {scopes} scopes x {rounds} rounds)",
        await interleave(first_resolves(scopes), rounds),
        "dishka, sync factory",
    )
    builds = options.size(100_000, 10_000)
    _group(
        report,
        f"Building a context ({builds} x {rounds} rounds)",
        await interleave(context_builds(builds), rounds),
        "frozen dataclass (floor)",
    )
    cycles = options.size(20_000, 2_000)
    _group(
        report,
        f"Opening and closing a scope ({cycles} x {rounds} rounds)",
        await interleave(scope_cycles(cycles), rounds),
        "ContextVar set+reset (floor)",
    )
    report.target(
        Target("get_current_context()", reads["ambient.get_current_context()"], 100, " ns")
    )
    report.target(
        Target("cached await ambient.resolve(K)", resolves["await ambient.resolve(K)"], 400, " ns")
    )
