"""Run an ASGI app on a real server over loopback for the duration of a test.

uvicorn and hypercorn run in a background thread with their own event loop (the app object
is shared with the test, so counters and probes can be inspected directly); granian runs in
a subprocess and therefore needs an importable ``module:attr`` path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from hypercorn.config import Config

SERVERS = ("uvicorn", "hypercorn", "hypercorn-trio")
STARTUP_TIMEOUT = 20.0
# Both servers close a keep-alive connection after 5 idle seconds by default. A client that
# picks that connection for its next request at the same moment gets a ReadError, which HTTP
# allows; a loaded test run easily leaves a pooled connection idle that long, so tests keep
# connections open longer than any test runs.
KEEP_ALIVE = 300
# For a test that shuts hypercorn's asyncio server down while clients hold streams open.
_NO_HYPERCORN_SHUTDOWN_UNDER_OPEN_STREAMS = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="on Python 3.12+ hypercorn's asyncio server first waits for every client to close "
    "its connection (asyncio.Server.wait_closed() waits for them there), so it never "
    "reaches its graceful timeout while a client holds a stream open",
)


def shutdown_under_open_streams(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``test(server, options)`` on each server that can be shut down, by its own grace
    period of a second, while clients hold streams open and background work goes on."""
    servers = pytest.mark.parametrize(
        ("server", "options"),
        [
            pytest.param("uvicorn", {"timeout_graceful_shutdown": 1}, id="uvicorn"),
            pytest.param(
                "hypercorn",
                {"graceful_timeout": 1},
                id="hypercorn",
                marks=_NO_HYPERCORN_SHUTDOWN_UNDER_OPEN_STREAMS,
            ),
            pytest.param("hypercorn-trio", {"graceful_timeout": 1}, id="hypercorn-trio"),
        ],
    )
    # trio warns about the async generators the shutdown cancels (Starlette does not close
    # them).
    quiet = pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
    return quiet(servers(test))


def websocket_upgrade(path: str, key: int, headers: Mapping[str, str]) -> bytes:
    """A websocket handshake request for ``path`` written by hand (its key made from the
    number ``key``), for a client that must do what no websocket library does: reset its
    connection mid-handshake or mid-message (:func:`reset_on_close`)."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(key.to_bytes(16, 'big')).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reset_on_close(sock: socket.socket) -> None:
    """Make the closing of ``sock`` a reset, not a close: no closing handshake of either
    protocol."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``process`` accepts on 127.0.0.1:``port`` (at most 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"the process meant to listen on {port} exited with {process.returncode}"
            raise RuntimeError(msg)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    msg = f"nothing listens on {port} after 20 s"
    raise RuntimeError(msg)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its pid."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def granian_available() -> bool:
    """Whether granian can be imported here."""
    try:
        import granian  # noqa: F401
    except ImportError:
        return False
    return True


def _wait_listening(port: int | str, alive: Any) -> None:
    """Wait until the server accepts on 127.0.0.1:``port``, or on the Unix socket ``port``
    when it is a path."""
    family, address = (
        (socket.AF_UNIX, port) if isinstance(port, str) else (socket.AF_INET, ("127.0.0.1", port))
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not alive():
            msg = f"server on {port} exited before it listened"
            raise RuntimeError(msg)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(address) == 0:
                return
        time.sleep(0.02)
    msg = f"server on {port} did not listen within {STARTUP_TIMEOUT} s"
    raise RuntimeError(msg)


@contextlib.contextmanager
def _uvicorn(app: Any, port: int | str, **options: Any) -> Iterator[None]:
    import uvicorn

    defaults = {"log_level": "warning", "access_log": False, "timeout_keep_alive": KEEP_ALIVE}
    where = {"uds": port} if isinstance(port, str) else {"host": "127.0.0.1", "port": port}
    config = uvicorn.Config(app, **where, **{**defaults, **options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        _wait_listening(port, thread.is_alive)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if thread.is_alive():
            msg = f"uvicorn on port {port} did not shut down"
            raise RuntimeError(msg)


def _hypercorn_config(port: int | str, options: Mapping[str, Any]) -> Config:
    """hypercorn's ``Config`` for 127.0.0.1:``port`` (or the Unix socket ``port`` names),
    quiet, with ``options`` set on it."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"unix:{port}" if isinstance(port, str) else f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 10
    # hypercorn's default backlog is 100; tests open up to 200 connections at once (uvicorn's
    # default is 2048), and an overflowing accept queue resets connections on a busy machine.
    config.backlog = 2048
    config.keep_alive_timeout = KEEP_ALIVE
    for name, value in options.items():
        setattr(config, name, value)
    return config


@contextlib.contextmanager
def _hypercorn(app: Any, port: int | str, **options: Any) -> Iterator[None]:
    from hypercorn.asyncio import serve

    config = _hypercorn_config(port, options)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"hypercorn-{port}", daemon=True)
    thread.start()
    try:
        _wait_listening(port, thread.is_alive)
        yield
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        if thread.is_alive():
            msg = f"hypercorn on port {port} did not shut down"
            raise RuntimeError(msg)
        if failure:
            raise failure[0]


@contextlib.contextmanager
def _hypercorn_trio(app: Any, port: int | str, **options: Any) -> Iterator[None]:
    """hypercorn's trio worker: the app runs on trio, as it would under `--worker-class trio`."""
    import trio
    from hypercorn.trio import serve

    config = _hypercorn_config(port, options)
    started = threading.Event()
    handles: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        stop = trio.Event()
        handles["stop"] = stop
        handles["token"] = trio.lowlevel.current_trio_token()
        started.set()
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=run, name=f"hypercorn-trio-{port}", daemon=True)
    thread.start()
    try:
        started.wait(STARTUP_TIMEOUT)
        _wait_listening(port, thread.is_alive)
        yield
    finally:
        if "token" in handles and thread.is_alive():
            # Non-blocking and thread-safe, even when the caller itself runs trio.
            handles["token"].run_sync_soon(handles["stop"].set)
        thread.join(timeout=30)
        if thread.is_alive():
            msg = f"hypercorn (trio) on port {port} did not shut down"
            raise RuntimeError(msg)
        if failure:
            raise failure[0]


@contextlib.contextmanager
def _granian(target: str, port: int, **options: Any) -> Iterator[None]:
    command = [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    command.append(target)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(command, env=env)  # noqa: S603 - fixed argv, our own interpreter
    try:
        _wait_listening(port, lambda: process.poll() is None)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def serve(server: str, app: Any, *, target: str | None = None, **options: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 with ``server``; yield its base URL.

    Args:
        server: ``"uvicorn"``, ``"hypercorn"`` (asyncio), ``"hypercorn-trio"`` (the app
            runs on trio) or ``"granian"``.
        app: The ASGI app (uvicorn and hypercorn).
        target: ``"module:attr"`` of the same app, required for granian (a subprocess).
        options: Server options (``uvicorn.Config`` keywords, hypercorn ``Config``
            attributes, granian command-line flags).
    """
    port = free_port()
    if server == "uvicorn":
        runner = _uvicorn(app, port, **options)
    elif server == "hypercorn":
        runner = _hypercorn(app, port, **options)
    elif server == "hypercorn-trio":
        runner = _hypercorn_trio(app, port, **options)
    elif server == "granian":
        if target is None:
            msg = "granian runs in a subprocess and needs target='module:attr'"
            raise ValueError(msg)
        runner = _granian(target, port, **options)
    else:
        msg = f"unknown server {server!r}"
        raise ValueError(msg)
    with runner:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve_unix(server: str, app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` with ``server`` (uvicorn or hypercorn) on a fresh Unix domain socket, as
    behind a proxy on the same host; yield the socket's path."""
    runners = {"uvicorn": _uvicorn, "hypercorn": _hypercorn, "hypercorn-trio": _hypercorn_trio}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "app.sock")
        with runners[server](app, path, **options):
            yield path
