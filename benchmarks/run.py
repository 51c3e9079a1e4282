"""Run the benchmarks: ``python -m benchmarks [--only asgi,micro] [--quick] [--markdown]``.

Sections (all by default, in this order):

* ``asgi``: in-process ASGI driver, ambient against the floor and the peers, sequential and
  100-user concurrent;
* ``fastapi``: FastAPI's ``Depends`` chain against ambient's FastAPI integration;
* ``micro``: ``get_current_context()``, cached and first ``resolve``,
  ``UserExecutionContext.create``, scope open+close, beside the peers' equivalents;
* ``memory``: bytes per open scope (10,000 open at once) and RSS growth over 1,000,000
  sequential requests;
* ``server``: uvicorn over loopback driven by ``wrk`` (or a Python load generator in a
  separate process when ``wrk`` is not installed), req/s against the floor app;
* ``telemetry`` and ``psycopg``: the standalone ``bench_telemetry.py`` and
  ``bench_psycopg.py`` scripts, run in a subprocess when present (``psycopg`` needs
  PostgreSQL, so it runs only when named in ``--only``);
* ``instructions``: CPU instructions per request of the in-process stacks, counted by
  valgrind's callgrind (deterministic where timings are noise; needs ``valgrind``, so it
  runs only when named in ``--only``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import Options, Report

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "asgi",
    "fastapi",
    "micro",
    "memory",
    "server",
    "telemetry",
    "psycopg",
    "instructions",
)
DEFAULT = ("asgi", "fastapi", "micro", "memory", "server", "telemetry")
PACKAGES = (
    "ambient-context",
    "starlette",
    "fastapi",
    "starlette-context",
    "asgi-correlation-id",
    "svcs",
    "dishka",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "uvicorn",
    "anyio",
)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH is intended
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def environment() -> list[str]:
    """Date, machine and versions, for the header of a published table."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return [
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit {_commit()}",
        f"machine: {_cpu()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        f"python: {platform.python_implementation()} {platform.python_version()}",
        "versions: " + ", ".join(versions),
    ]


def _script(report: Report, options: Options, name: str, args: Sequence[str]) -> None:
    path = HERE / f"bench_{name}.py"
    if not path.exists():
        report.unavailable(f"{name} section", f"{path.name} is not present")
        return
    command = [sys.executable, str(path), *args]
    print(f"$ python benchmarks/{path.name} {' '.join(args)}".rstrip(), flush=True)
    missed = False
    # Streamed, not captured: a section runs for minutes. Its target lines say whether it
    # missed one; its exit status alone cannot (an exception exits with 1 too).
    with subprocess.Popen(  # noqa: S603 - our own interpreter and script
        command, cwd=HERE.parent, stdout=subprocess.PIPE, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            missed = missed or line.startswith("MISSED")
    if missed:
        report.missed_in(f"{name} section")
    elif process.returncode != 0:
        report.unavailable(f"{name} section", f"{path.name} exited with {process.returncode}")
    print(flush=True)


async def _sections(report: Report, options: Options, chosen: Sequence[str]) -> None:
    for name in chosen:
        started = time.perf_counter()
        print(f"## {name}\n", flush=True)
        if name in ("asgi", "fastapi", "micro", "memory", "server", "instructions"):
            module = importlib.import_module(f"benchmarks.bench_{name}")
            await module.run(report, options)
        elif name == "telemetry":
            _script(report, options, "telemetry", ["--blocks", "8"] if options.quick else [])
        elif name == "psycopg":
            args = ["--rounds", str(options.rounds)]
            _script(report, options, "psycopg", ["--quick", *args] if options.quick else args)
        print(f"({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)


def parse(argv: Sequence[str] | None) -> tuple[Options, list[str]]:
    """Options and the chosen sections from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ambient against its peers, side by side in one run.",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated sections out of {', '.join(SECTIONS)} (default: "
        f"{', '.join(DEFAULT)})",
    )
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and 3 rounds: a smoke run"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (15; 3 with --quick); the in-process ASGI sections run four "
        "times as many short blocks",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = (set(chosen) | skipped) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 15)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    options = Options(quick=args.quick, rounds=rounds, markdown=args.markdown)
    return options, [s for s in SECTIONS if s in chosen and s not in skipped]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections; exit status 1 when a target was missed."""
    options, chosen = parse(argv)
    # svcs imports starlette.testclient, which warns about httpx on every import.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    report = Report(options)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    print("\n".join([f"$ {command.rstrip()}", *environment()]), end="\n\n", flush=True)
    asyncio.run(_sections(report, options, chosen))
    if report.targets:
        print("## targets (judged on the median; its range in brackets: min-max or 90% CI)\n")
        for target in report.targets:
            print(target.render())
    for line in [*report.missed_elsewhere, *report.missing]:
        print(line)
    missed = [t for t in report.targets if not t.informative and not t.met]
    return 1 if missed or report.missed_elsewhere else 0


if __name__ == "__main__":
    sys.exit(main())
