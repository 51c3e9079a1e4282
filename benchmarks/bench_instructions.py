"""CPU instructions per request, counted by valgrind's callgrind: a figure noise cannot move.

``python -m benchmarks --only instructions`` (needs ``valgrind``; not run by default).

Timed overheads of a few microseconds on a shared machine wander by 10-20% from run to
run, and a difference of two timed stacks (what ``Telemetry()`` adds, say) is mostly that
noise. Instructions are counted, not timed: each stack of the in-process ASGI table runs in
its own interpreter under callgrind, once for 1,000 sequential requests and once for
6,000 (after 200 to warm up, every answer checked as in the ``asgi`` section, with
``PYTHONHASHSEED=0``); the difference divided by 5,000 is what one request costs, start-up
and imports cancelled out. Instructions are not time (a cache miss costs more than an
addition), so the targets stay judged on the timed sections; these rows say where the
timed ratios would sit without the noise.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_instructions.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import Options, Report, Stat, Table, Target
from benchmarks import bench_asgi as asgi

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 200
NO_SDK = asgi.NO_SDK


def _no_sdk() -> asgi.App:
    from ambient.telemetry import Telemetry

    endpoint = asgi.ambient_components_endpoint
    return asgi.ambient_app(endpoint, components=True, telemetry=Telemetry())


# Built in the child, one per interpreter: only that stack's modules are imported there.
STACKS: dict[str, Callable[[], asgi.App]] = {
    "bare endpoint": lambda: asgi.bare_endpoint,
    asgi.FLOOR: lambda: asgi.FloorMiddleware(asgi.floor_endpoint),
    asgi.AMBIENT: lambda: asgi.ambient_app(asgi.ambient_endpoint, components=False),
    asgi.DUTIES: lambda: asgi.DutiesMiddleware(asgi.duties_endpoint),
    asgi.AMBIENT3: lambda: asgi.ambient_app(asgi.ambient_components_endpoint, components=True),
    NO_SDK: _no_sdk,
    asgi.SVCS: asgi.svcs_app,
    asgi.DISHKA: asgi.dishka_app,
    asgi.AMBIENT_ASYNC_GEN: asgi.ambient_async_gen_app,
}
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _child(name: str, requests: int) -> None:
    """Serve ``requests`` sequential requests through the stack ``name`` (in the child)."""
    app = STACKS[name]()

    async def serve() -> None:
        await asgi.sequential(app, WARM_UP)
        await asgi.sequential(app, requests)

    asyncio.run(serve())


def count(valgrind: str, name: str, requests: int) -> int:
    """Instructions callgrind counts for a child serving ``requests`` through ``name``."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={Path(folder) / 'callgrind.out'}",
            sys.executable,
            "-m",
            "benchmarks.bench_instructions",
            "child",
            name,
            str(requests),
        ]
        done = subprocess.run(  # noqa: S603 - our own interpreter under valgrind
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=False,
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        msg = f"callgrind run of {name!r} failed ({done.returncode}):\n{tail}"
        raise RuntimeError(msg)
    return int(found.group(1))


def per_request(valgrind: str, name: str, small: int, large: int) -> float:
    """Instructions one request through ``name`` costs: the difference of two runs."""
    return (count(valgrind, name, large) - count(valgrind, name, small)) / (large - small)


def _exact(value: float) -> Stat:
    return Stat(value, value, value)


async def run(report: Report, options: Options) -> None:
    """The section: every stack counted, a table and the informative rows."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        report.unavailable("instructions section", "valgrind is not installed")
        return
    small, large = options.size(1_000, 200), options.size(6_000, 1_200)
    names = list(STACKS)
    # Counts do not depend on what else runs: one child per CPU at a time.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counted = await asyncio.gather(
            *(
                asyncio.wrap_future(pool.submit(per_request, valgrind, name, small, large))
                for name in names
            )
        )
    per = dict(zip(names, counted, strict=True))
    bare, floor = per["bare endpoint"], per[asgi.FLOOR] - per["bare endpoint"]
    table = Table(
        f"Instructions per request (callgrind, {small:,} vs {large:,} sequential requests)",
        ["stack", "instructions", "overhead", "x floor overhead"],
    )
    for name in names:
        overhead = per[name] - bare
        ratio = "-" if name == "bare endpoint" else f"{overhead / floor:.2f}"
        table.add(name, f"{per[name]:,.0f}", f"{overhead:,.0f}", ratio)
    dishka = per[asgi.DISHKA] - bare
    table.notes.append(
        "overhead = stack minus the bare endpoint; ambient + 3 components vs dishka's "
        f"overhead: {(per[asgi.AMBIENT3] - bare) / dishka:.2f}x; Telemetry() with no SDK "
        f"adds {per[NO_SDK] - per[asgi.AMBIENT3]:,.0f} instructions; {asgi.AMBIENT_ASYNC_GEN}: "
        "its async cleanup closes the scope through the awaiting path (not a peer row)"
    )
    report.table(table)
    ambient, duties = per[asgi.AMBIENT] - bare, per[asgi.DUTIES] - bare
    rows: list[tuple[str, float, str]] = [
        ("ambient middleware alone vs the floor's overhead", ambient / floor, "x"),
        ("ambient's duties written by hand vs the floor's overhead (bound)", duties / floor, "x"),
        ("ambient + 3 components vs dishka's overhead", (per[asgi.AMBIENT3] - bare) / dishka, "x"),
        ("Telemetry() with no SDK, added per request", per[NO_SDK] - per[asgi.AMBIENT3], ""),
    ]
    for what, value, unit in rows:
        target = Target(
            f"{what} (instructions)", _exact(value), float("inf"), unit, False, "counted"
        )
        report.target(target)


def _main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "child":
        _child(argv[1], int(argv[2]))
        return
    options = Options(quick="--quick" in argv)
    report = Report(options)
    asyncio.run(run(report, options))
    for target in report.targets:
        print(target.render())
    for line in report.missing:
        print(line)


if __name__ == "__main__":
    _main(sys.argv[1:])
