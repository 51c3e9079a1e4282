"""Memory at scale: bytes per open scope, per in-flight request, and RSS over 1M requests.

* 10,000 scopes open at once, each in its own task waiting on an event, measured with
  ``tracemalloc`` against the same 10,000 tasks holding the same prebuilt contexts without
  a scope (so only what the scope adds is counted; the context's own size is shown apart);
  beside dishka's REQUEST container and an svcs ``Container`` for the same user.
* 10,000 requests in flight at once through the middleware (the endpoint waits on an event),
  ambient against the floor, over the bare endpoint.
* 1,000,000 sequential requests through ``AmbientMiddleware`` with 3 components (1,000
  distinct users), RSS after a warm-up and at the end; the floor alongside.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ambient
from ambient import UserExecutionContext
from benchmarks import Options, Report, Stat, Table, Target
from benchmarks.bench_asgi import (
    App,
    FloorMiddleware,
    Session,
    User,
    _Exchange,
    ambient_app,
    ambient_components_endpoint,
    ambient_endpoint,
    ambient_registry,
    dishka_container,
    floor_endpoint,
    http_scope,
    svcs_registry,
)

Holder = Callable[[Any, asyncio.Event, Callable[[], None]], Awaitable[None]]


async def _hold_many(holder: Holder, items: list[Any]) -> int:
    """Bytes traced while every item is held open by ``holder`` in its own task."""
    release = asyncio.Event()
    opened = 0
    all_open = asyncio.Event()

    def started() -> None:
        nonlocal opened
        opened += 1
        if opened == len(items):
            all_open.set()

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(holder(item, release, started)) for item in items]
        await all_open.wait()
        gc.collect()
        during = tracemalloc.get_traced_memory()[0]
        release.set()
        await asyncio.gather(*tasks)
    finally:
        tracemalloc.stop()
    del tasks
    return during - before


async def _nothing(ctx: Any, release: asyncio.Event, started: Callable[[], None]) -> None:
    started()
    await release.wait()


def _scope_holders(components: bool) -> dict[str, Holder]:
    import svcs

    registry = ambient_registry(components=True)
    dishka = dishka_container()
    svcs_reg = svcs_registry()

    async def ambient_scope(ctx: Any, release: asyncio.Event, started: Callable[[], None]) -> None:
        async with registry.open_scope(ctx):
            if components:
                await ambient.resolve(Session)
            started()
            await release.wait()

    async def dishka_scope(ctx: Any, release: asyncio.Event, started: Callable[[], None]) -> None:
        async with dishka(context={User: User(ctx.user_id)}) as container:
            if components:
                await container.get(Session)
            started()
            await release.wait()

    async def svcs_scope(ctx: Any, release: asyncio.Event, started: Callable[[], None]) -> None:
        async with svcs.Container(svcs_reg) as container:
            container.register_local_value(User, User(ctx.user_id))
            if components:
                await container.aget(Session)
            started()
            await release.wait()

    suffix = " + 3 components" if components else ""
    return {
        f"ambient scope{suffix}": ambient_scope,
        f"dishka REQUEST container{suffix}": dishka_scope,
        f"svcs Container + local value{suffix}": svcs_scope,
    }


async def _in_flight(wrap: Callable[[App], App], count: int) -> int:
    """Bytes traced with ``count`` requests through ``wrap(endpoint)`` suspended in it."""
    release = asyncio.Event()
    entered = 0
    all_in = asyncio.Event()

    async def waiting_endpoint(scope: Any, receive: Any, send: Any) -> None:
        nonlocal entered
        entered += 1
        if entered == count:
            all_in.set()
        await release.wait()

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        exchanges = [_Exchange() for _ in range(count)]
        scopes = [http_scope(f"user-{i:05d}") for i in range(count)]
        wrapped = wrap(waiting_endpoint)
        tasks = [
            asyncio.ensure_future(wrapped(scope, ex.receive, ex.send))
            for scope, ex in zip(scopes, exchanges, strict=True)
        ]
        await all_in.wait()
        gc.collect()
        during = tracemalloc.get_traced_memory()[0]
        release.set()
        await asyncio.gather(*tasks)
    finally:
        tracemalloc.stop()
    return during - before


def _rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def _sequential(app: App, n: int, users: list[str]) -> None:
    expected = [u.encode() for u in users]
    count = len(users)
    for i in range(n):
        j = i % count
        exchange = _Exchange()
        await app(http_scope(users[j]), exchange.receive, exchange.send)
        if exchange.status != 200 or exchange.body != expected[j]:
            msg = f"request {i} for {users[j]!r} answered {exchange.status} {exchange.body!r}"
            raise AssertionError(msg)


async def rss_growth(app: App, n: int, warmup: int) -> tuple[int, int, float]:
    """RSS growth in bytes and Python object count growth over ``n`` requests."""
    users = [f"user-{i:04d}" for i in range(1000)]
    await _sequential(app, warmup, users)
    gc.collect()
    rss, objects = _rss(), len(gc.get_objects())
    started = time.perf_counter()
    await _sequential(app, n, users)
    seconds = time.perf_counter() - started
    gc.collect()
    return _rss() - rss, len(gc.get_objects()) - objects, seconds


async def run(report: Report, options: Options) -> None:
    """The memory tables and their targets."""
    count = options.size(10_000, 2_000)
    repeats = 3
    contexts = [UserExecutionContext.create(f"user-{i:05d}") for i in range(count)]
    table = Table(
        f"Bytes per open scope ({count} open at once, tracemalloc, median of {repeats})",
        ["what stays open", "bytes each", "x ambient scope"],
    )
    results: dict[str, list[float]] = {}
    for components in (False, True):
        holders = {"(tasks only)": _nothing, **_scope_holders(components)}
        for _ in range(repeats):
            for name, holder in holders.items():
                results.setdefault(name, []).append(
                    await _hold_many(holder, contexts) / len(contexts)
                )
    base = statistics.median(results.pop("(tasks only)"))
    per_scope = {name: Stat.of([v - base for v in values]) for name, values in results.items()}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    extra = [UserExecutionContext.create(f"user-{i:05d}") for i in range(count)]
    context_bytes = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    del extra
    reference = per_scope["ambient scope"].median
    for name, stat in per_scope.items():
        table.add(name, stat.fmt(0), f"{stat.median / reference:.2f}")
    table.notes.append(
        f"the context itself (UserExecutionContext.create, not counted above): "
        f"{context_bytes:.0f} bytes"
    )
    report.table(table)
    scope_and_context = Stat(
        per_scope["ambient scope"].median + context_bytes,
        per_scope["ambient scope"].low + context_bytes,
        per_scope["ambient scope"].high + context_bytes,
    )
    report.target(Target("bytes per open scope (context included)", scope_and_context, 2048, " B"))

    flight = Table(
        f"Bytes per request in flight ({count} at once through the middleware, tracemalloc)",
        ["stack", "bytes each", "above bare"],
    )
    stacks: dict[str, Callable[[App], App]] = {
        "bare endpoint": lambda endpoint: endpoint,
        "floor": FloorMiddleware,
        "ambient": lambda endpoint: ambient_app(endpoint, components=False),
    }
    flights: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, wrap in stacks.items():
            flights.setdefault(name, []).append(await _in_flight(wrap, count) / count)
    bare = statistics.median(flights["bare endpoint"])
    for name, values in flights.items():
        stat = Stat.of(values)
        above = "-" if name == "bare endpoint" else f"{stat.median - bare:.0f}"
        flight.add(name, stat.fmt(0), above)
    report.table(flight)

    n = options.size(1_000_000, 100_000)
    warmup = options.size(50_000, 10_000)
    growth = Table(
        f"RSS over {n:,} sequential requests (1,000 users, after {warmup:,} warm-up requests)",
        ["stack", "RSS growth MiB", "Python objects growth", "us/request"],
    )
    grown: dict[str, int] = {}
    for name, app in (
        ("floor", FloorMiddleware(floor_endpoint)),
        ("ambient + 3 components", ambient_app(ambient_components_endpoint, components=True)),
        ("ambient", ambient_app(ambient_endpoint, components=False)),
    ):
        rss, objects, seconds = await rss_growth(app, n, warmup)
        grown[name] = rss
        growth.add(name, f"{rss / 2**20:.2f}", f"{objects:+d}", f"{seconds / n * 1e6:.1f}")
    report.table(growth)
    mib = grown["ambient + 3 components"] / 2**20
    report.target(
        Target(f"RSS growth over {n:,} requests (ambient + 3)", Stat(mib, mib, mib), 5, " MiB")
    )
