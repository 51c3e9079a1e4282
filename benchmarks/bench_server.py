"""Server mode: uvicorn over loopback, driven by ``wrk``, req/s against the floor app.

Each app runs in its own uvicorn process (one worker, access log off); the load generator
runs in another process: ``wrk`` (one thread, 50 keep-alive connections, a Lua script
sending the identity of 100 users in turn) when it is installed, else this module's own
asyncio load generator (``python -m benchmarks.bench_server load ...``), which also checks
every body. Every app's endpoint compares the user its context names with the identity
header it was sent and answers 500 on a mismatch, so a wrong user shows up as non-2xx
answers (which fail the run). Before the timed rounds, every app answers 2,000 requests
from the Python generator with every body checked. Rounds are interleaved: in each round
every app runs once, in a shuffled order.

The apps (importable by uvicorn as ``benchmarks.bench_server:<name>``): ``bare``,
``floor``, ``correlation`` (asgi-correlation-id, a peer costing ~2 us in process),
``floor_busy5`` (the floor plus 5 us of CPU work per request: a calibration of how this
server and machine turn in-process cost into lost req/s), ``duties`` (ambient's per-request
duties written by hand: a bound, not a peer), ``ambient``
(``AmbientMiddleware`` with ``trusted_header()``) and ``ambient3`` (plus three REQUEST
components).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported once: an import statement in an endpoint would be billed to every request.
from asgi_correlation_id import correlation_id

from ambient import current_context_or_none, resolve
from benchmarks import Options, Report, Stat, Table, Target, paired_ratio
from benchmarks.bench_asgi import (
    App,
    Dispatcher,
    DutiesMiddleware,
    Engine,
    FloorMiddleware,
    Receive,
    Scope,
    Send,
    Session,
    _header_user,
    _respond,
    ambient_app,
    correlation_id_app,
    duties_var,
    floor_var,
)

ROOT = Path(__file__).absolute().parent.parent
APPS = ("bare", "floor", "correlation", "floor_busy5", "duties", "ambient", "ambient3")
WRK_SCRIPT = """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/work", {["x-user-id"] = string.format("user-%03d", counter % 100)})
end
"""


# -- the apps ----------------------------------------------------------------------------


async def _answer(send: Send, seen: str | None, sent: str) -> None:
    if seen != sent:
        body = f"context names {seen!r}, request was sent for {sent!r}".encode()
        length = str(len(body)).encode()
        await send(
            {"type": "http.response.start", "status": 500, "headers": [(b"content-length", length)]}
        )
        await send({"type": "http.response.body", "body": body})
        return
    await _respond(send, sent.encode())


async def _bare(scope: Scope, receive: Receive, send: Send) -> None:
    user = _header_user(scope)
    await _answer(send, user, user)


async def _floor(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = floor_var.get()
    await _answer(send, None if ctx is None else ctx.user_id, _header_user(scope))


async def _duties(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = duties_var.get()
    await _answer(send, None if ctx is None else ctx.user_id, _header_user(scope))


async def _ambient(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = current_context_or_none()
    await _answer(send, None if ctx is None else ctx.user_id, _header_user(scope))


async def _ambient3(scope: Scope, receive: Receive, send: Send) -> None:
    session = await resolve(Session)
    engine = await resolve(Engine)
    dispatcher = await resolve(Dispatcher)
    seen = dispatcher.user_id if session.engine is engine else "two engines"
    await _answer(send, seen, _header_user(scope))


async def _correlation(scope: Scope, receive: Receive, send: Send) -> None:
    await _answer(send, correlation_id.get(), _header_user(scope))


def _busy(microseconds: float) -> App:
    """The floor plus a fixed amount of CPU work per request: a calibration of how much
    req/s a middleware costing that much in process loses on this server and machine."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            end = time.perf_counter() + microseconds / 1e6
            while time.perf_counter() < end:
                pass
        await floor(scope, receive, send)

    return app


bare = _bare
floor = FloorMiddleware(_floor)
correlation = correlation_id_app(_correlation)
floor_busy5 = _busy(5)
duties = DutiesMiddleware(_duties)
ambient = ambient_app(_ambient, components=False)
ambient3 = ambient_app(_ambient3, components=True)


# -- servers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"uvicorn on port {port} exited with {process.returncode}"
            raise RuntimeError(msg)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    msg = f"uvicorn on port {port} did not listen within 30 s"
    raise RuntimeError(msg)


@contextlib.contextmanager
def servers(names: tuple[str, ...], loop: str, http: str) -> Iterator[dict[str, int]]:
    """One uvicorn process per app; yields each app's port; stops them afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for name in names:
            port = _free_port()
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                f"benchmarks.bench_server:{name}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "--lifespan",
                "off",
                "--loop",
                loop,
                "--http",
                http,
            ]
            process = subprocess.Popen(command, cwd=ROOT)  # noqa: S603 - fixed argv
            started.append(process)
            _wait_listening(port, process)
            ports[name] = port
        yield ports
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- load generators ---------------------------------------------------------------------


@dataclass
class Load:
    """What one load run measured."""

    requests_per_second: float
    bad: int
    p50_ms: float | None = None
    p99_ms: float | None = None


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000  # "s"


def wrk(port: int, seconds: float, connections: int, script: Path) -> Load:
    """One ``wrk`` run against ``port``."""
    done = subprocess.run(  # noqa: S603 - fixed argv
        [  # noqa: S607 - wrk from PATH is intended
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/work",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        msg = f"cannot read wrk's output:\n{out}"
        raise RuntimeError(msg)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    return Load(
        float(rate.group(1)),
        (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
        _ms(p50.group(1)) if p50 else None,
        _ms(p99.group(1)) if p99 else None,
    )


async def _client(
    port: int, deadline: float, limit: int | None, counts: list[int], latencies: list[float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        i = random.randrange(100)
        while time.perf_counter() < deadline and (limit is None or counts[0] < limit):
            user = f"user-{i % 100:03d}"
            i += 1
            started = time.perf_counter()
            writer.write(f"GET /work HTTP/1.1\r\nhost: bench\r\nx-user-id: {user}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            counts[0] += 1
            if status != 200 or body != user.encode():
                counts[1] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def python_load(
    port: int, seconds: float, connections: int, limit: int | None = None
) -> Load:
    """Keep-alive HTTP/1.1 from ``connections`` clients, every body checked."""
    counts = [0, 0]
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_client(port, deadline, limit, counts, latencies) for _ in range(connections))
    )
    spent = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else None
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None
    return Load(counts[0] / spent, counts[1], p50, p99)


def python_load_process(port: int, seconds: float, connections: int, limit: int | None) -> Load:
    """:func:`python_load` in a separate process (so it does not share our GIL)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_server",
        "load",
        "--port",
        str(port),
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        msg = f"the load generator failed:\n{done.stderr}"
        raise RuntimeError(msg)
    return Load(**json.loads(done.stdout))


# -- the section -------------------------------------------------------------------------


def _configs(options: Options) -> list[tuple[str, str]]:
    configs = []
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        pass
    else:
        configs.append(("uvloop", "httptools"))
    if not configs or not options.quick:
        configs.append(("asyncio", "h11"))
    return configs


async def run(report: Report, options: Options) -> None:
    """req/s of each app, interleaved rounds, per uvicorn configuration."""
    rounds = 2 if options.quick else 5
    seconds = 2.0 if options.quick else 5.0
    connections = 50
    use_wrk = shutil.which("wrk") is not None
    generator = (
        "wrk -t1 -c50 (Lua: 100 users in turn)"
        if use_wrk
        else (
            "Python asyncio load generator in a separate process, 50 connections "
            "(wrk is not installed)"
        )
    )
    if not use_wrk:
        report.unavailable("wrk", "not installed; the Python load generator stands in")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "users.lua"
        script.write_text(WRK_SCRIPT)
        for loop, http in _configs(options):
            with servers(APPS, loop, http) as ports:
                for name, port in ports.items():
                    check = await asyncio.to_thread(
                        python_load_process, port, 60.0, connections, 2000
                    )
                    if check.bad:
                        msg = f"{name}: {check.bad} wrong answers in the checked warm-up"
                        raise AssertionError(msg)

                def measure(port: int) -> Load:
                    if use_wrk:
                        return wrk(port, seconds, connections, script)
                    return python_load_process(port, seconds, connections, None)

                results: dict[str, list[Load]] = {name: [] for name in APPS}
                order = list(APPS)
                rng = random.Random(0)
                for _ in range(rounds):
                    rng.shuffle(order)
                    for name in order:
                        results[name].append(await asyncio.to_thread(measure, ports[name]))
            _table(report, results, loop, http, generator, rounds, seconds)


def _table(
    report: Report,
    results: dict[str, list[Load]],
    loop: str,
    http: str,
    generator: str,
    rounds: int,
    seconds: float,
) -> None:
    table = Table(
        f"uvicorn ({loop}, {http}) over loopback, {rounds} rounds x {seconds:g} s per app",
        ["app", "req/s", "x floor", "p50 ms", "p99 ms", "non-2xx"],
    )
    floor_rates = [load.requests_per_second for load in results["floor"]]
    for name, loads in results.items():
        rates = [load.requests_per_second for load in loads]
        bad = sum(load.bad for load in loads)
        if bad:
            msg = f"{name}: {bad} non-2xx answers or socket errors under load"
            raise AssertionError(msg)
        ratio = Stat.of(paired_ratio(rates, floor_rates))
        p50 = [load.p50_ms for load in loads if load.p50_ms is not None]
        p99 = [load.p99_ms for load in loads if load.p99_ms is not None]
        table.add(
            name,
            Stat.of(rates).fmt(0),
            "1" if name == "floor" else ratio.fmt(3),
            f"{Stat.of(p50).median:.2f}" if p50 else "-",
            f"{Stat.of(p99).median:.2f}" if p99 else "-",
            bad,
        )
        if name == "ambient":
            report.target(
                Target(
                    f"server mode req/s vs the floor app (uvicorn {loop}+{http})",
                    ratio,
                    0.95,
                    higher_is_better=True,
                )
            )
        if name == "duties":
            report.target(
                Target(
                    f"server mode req/s, ambient's duties written by hand vs the floor app "
                    f"(uvicorn {loop}+{http}, bound)",
                    ratio,
                    float("inf"),
                    higher_is_better=True,
                )
            )
        if name == "ambient3":
            report.target(
                Target(
                    f"server mode req/s, ambient + 3 components vs the floor app "
                    f"(uvicorn {loop}+{http})",
                    ratio,
                    float("inf"),
                )
            )
    table.notes.append(f"load: {generator}; median (min-max) over rounds")
    table.notes.append(
        "floor_busy5 = the floor plus 5 us of CPU work per request: what any middleware "
        "costing 5 us in process keeps of the floor's req/s on this server and machine; "
        "duties = ambient's per-request duties written by hand (a bound, see the asgi section)"
    )
    report.table(table)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_server")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="run the Python load generator, print JSON")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--seconds", type=float, default=5.0)
    load.add_argument("--connections", type=int, default=50)
    load.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    result: Any = asyncio.run(python_load(args.port, args.seconds, args.connections, args.limit))
    print(json.dumps(result.__dict__))


if __name__ == "__main__":
    _main()
