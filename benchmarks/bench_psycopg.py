"""SharedPool checkout against raw psycopg_pool doing the same by hand, in one run.

``python benchmarks/bench_psycopg.py [--quick] [--rounds N] [--url URL]``

Both sides run the same work per checkout on a real PostgreSQL: take a connection, open a
transaction, set ``app.user_id`` and ``app.tenant_id`` transaction-locally with one
``SELECT set_config(%s, %s, true), set_config(%s, %s, true)``, run one query, commit and
give the connection back. The raw side writes that by hand on an ``AsyncConnectionPool``;
ambient's side is ``async with pool.connection()`` under a bound context, which also takes
the per-user share, sends ``BEGIN`` and the settings in one round trip, makes the
checkout cancellation-safe, and resets and verifies the connection in the same round trip
as the commit (the by-hand side resets nothing).

Two loads, each interleaved round by round (fresh random order per round):

* sequential: one task, pool of 4 connections;
* concurrent: 32 tasks of 32 distinct users on a pool of 8 (saturated, so the reset's cost
  shows up as throughput).

Each query's answer is checked (it must name the checkout's own user). The target: ambient
within 1.3x of raw, judged on the median of the round-by-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_psycopg.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg_pool import AsyncConnectionPool

from ambient import UserExecutionContext, bind_context
from ambient.integrations.psycopg import SharedPool
from benchmarks import Options, Report, Stat, Table, Target, interleave, paired_ratio

URL = os.environ.get("AMBIENT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SET = "SELECT set_config(%s, %s, true), set_config(%s, %s, true)"
QUERY = "SELECT current_setting('app.user_id', true)"
LIMIT = 1.3
RAW = "raw psycopg_pool, by hand"
AMBIENT = "ambient SharedPool"
ROUNDS_PER_ROUND = 4


class WrongAnswerError(AssertionError):
    """A checkout saw another user's setting: the benchmark result would be meaningless."""


def _check(row: tuple[Any, ...] | None, user: str) -> None:
    if row is None or row[0] != user:
        msg = f"checkout for {user!r} read {row!r}"
        raise WrongAnswerError(msg)


async def raw_checkout(pool: AsyncConnectionPool[Any], user: str, tenant: str) -> None:
    """By hand: what an application writes without ambient."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(SET, ("app.user_id", user, "app.tenant_id", tenant))
        cur = await conn.execute(QUERY)
        _check(await cur.fetchone(), user)


async def ambient_checkout(pool: SharedPool, user: str) -> None:
    """ambient: the settings come from the bound context."""
    async with pool.connection() as conn:
        cur = await conn.execute(QUERY)
        _check(await cur.fetchone(), user)


def _chunk(
    tasks: int,
    per_task: int,
    work: Callable[[int, int], Awaitable[None]],
    cpu: list[float],
) -> Callable[[], Awaitable[float]]:
    """Seconds per checkout (wall clock); this process's CPU seconds go to ``cpu``."""

    async def run() -> float:
        async def worker(t: int) -> None:
            for i in range(per_task):
                await work(t, i)

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(t) for t in range(tasks)))
        cpu.append((time.process_time() - cpu_started) / (tasks * per_task))
        return (time.perf_counter() - started) / (tasks * per_task)

    return run


async def _load(
    report: Report, options: Options, title: str, *, tasks: int, size: int, per_task: int
) -> Stat:
    raw: AsyncConnectionPool[Any] = AsyncConnectionPool(
        URL, min_size=size, max_size=size, open=False
    )
    shared = SharedPool(URL, min_size=size, max_size=size, per_user_limit=size, rls_check="off")
    contexts = [UserExecutionContext.create(f"user-{t}", tenant_id="acme") for t in range(tasks)]
    await raw.open(wait=True)
    await shared.open()
    try:

        async def by_hand(t: int, i: int) -> None:
            await raw_checkout(raw, f"user-{t}", "acme")

        async def with_ambient(t: int, i: int) -> None:
            with bind_context(contexts[t]):
                await ambient_checkout(shared, contexts[t].user_id)

        # Short chunks, many rounds: a neighbour's load hits both variants of a round alike.
        # (The first chunk of each is a warm-up; its CPU figure is dropped below.)
        cpu: dict[str, list[float]] = {RAW: [], AMBIENT: []}
        results = await interleave(
            {
                RAW: _chunk(tasks, per_task, by_hand, cpu[RAW]),
                AMBIENT: _chunk(tasks, per_task, with_ambient, cpu[AMBIENT]),
            },
            options.rounds * ROUNDS_PER_ROUND,
        )
    finally:
        await shared.close()
        await raw.close()
    table = Table(title, ["variant", "us/checkout", "x raw", "client CPU us/checkout", "CPU x raw"])
    ratio = Stat.of(paired_ratio(results[AMBIENT], results[RAW]))
    cpu_ratio = Stat.of(paired_ratio(cpu[AMBIENT][1:], cpu[RAW][1:]))
    for name in (RAW, AMBIENT):
        reference = name == RAW
        table.add(
            name,
            Stat.of(results[name]).scaled(1e6).fmt(1),
            "1.000" if reference else ratio.fmt(3),
            Stat.of(cpu[name][1:]).scaled(1e6).fmt(1),
            "1.000" if reference else cpu_ratio.fmt(3),
        )
    table.notes.append(
        f"{tasks} task(s), pool of {size}, {per_task * tasks} checkouts per round, "
        f"{options.rounds * ROUNDS_PER_ROUND} rounds; every answer checked. Client CPU is "
        "this process only (the server's share is in the wall-clock time)"
    )
    report.table(table)
    return ratio


async def main(options: Options) -> int:
    """Run both loads; exit status 0 when the target is met."""
    try:
        with psycopg.connect(URL, connect_timeout=5) as conn:
            version = conn.info.server_version
    except psycopg.OperationalError as exc:
        print(f"psycopg benchmark: PostgreSQL at {URL} is not reachable: {exc}")
        return 2
    print(f"PostgreSQL {version // 10000}.{version % 10000}, {URL}\n")
    report = Report(options)
    sequential = await _load(
        report,
        options,
        "SharedPool checkout, sequential",
        tasks=1,
        size=4,
        per_task=options.size(400, 200),
    )
    concurrent = await _load(
        report,
        options,
        "SharedPool checkout, 32 concurrent users",
        tasks=32,
        size=8,
        per_task=options.size(15, 10),
    )
    targets = [
        Target("SharedPool vs raw psycopg_pool, sequential", sequential, LIMIT),
        Target("SharedPool vs raw psycopg_pool, 32 concurrent users", concurrent, LIMIT),
    ]
    print("targets (judged on the median; min-max in brackets)")
    for target in targets:
        print(target.render())
    return 0 if all(t.met for t in targets) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (15)")
    parser.add_argument("--url", default=None, help="PostgreSQL URL (superuser is fine)")
    args = parser.parse_args()
    if args.url:
        URL = args.url
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 15)
    sys.exit(asyncio.run(main(Options(quick=args.quick, rounds=rounds))))
