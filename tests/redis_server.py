"""A redis-server of a test's own, on a spare loopback port, to kill and restart."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import service_unavailable
from tests.servers import free_port, stop, wait_listening


class RedisProcess:
    """A redis-server of our own on a spare port, to kill and restart."""

    def __init__(self, snapshots: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        # Where SAVE writes its snapshot, loaded at the next start (none: nothing kept).
        self.snapshots = snapshots

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_unavailable("redis-server", "the binary is not on PATH")
            return
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        if self.snapshots is not None:
            argv += ["--dir", str(self.snapshots)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # noqa: S603 - fixed argv
        wait_listening(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGKILL)
            self.process = None


@contextlib.contextmanager
def own_redis(snapshots: Path | None = None) -> Iterator[RedisProcess]:
    """A :class:`RedisProcess` started for the block (the test may kill and start it again
    inside), killed on the way out: the one it runs then, by its pid, and nothing else."""
    own = RedisProcess(snapshots)
    try:
        own.start()
        yield own
    finally:
        own.kill()
