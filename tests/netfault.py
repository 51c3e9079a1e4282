"""A TCP relay on loopback that can make the network between a client and a server go
silent: sockets stay open, no byte gets through, no error is seen (a partition, a peer
that hangs).

The relay runs in a process of its own, so that it keeps its promise to thaw after
``hold`` seconds even when the process under test is frozen (a C call holding the GIL
while it waits on the network). A test can then fail on the time something took instead
of hanging.
"""

from __future__ import annotations

import sys
from types import TracebackType

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream


class SilentNetwork:
    """Relays ``127.0.0.1:port`` to ``host:target_port``; :meth:`freeze` stops every byte
    both ways, on open connections and new ones alike, for at most ``hold`` seconds;
    :meth:`thaw` lets them through."""

    def __init__(self, host: str, target_port: int, *, hold: float) -> None:
        self._argv = [sys.executable, __file__, host, str(target_port)]
        self.hold = hold
        self.port = 0
        self._process: anyio.abc.Process | None = None
        self._lines: BufferedByteReceiveStream | None = None

    async def __aenter__(self) -> SilentNetwork:
        self._process = await anyio.open_process(self._argv, stderr=None)
        assert self._process.stdout is not None
        self._lines = BufferedByteReceiveStream(self._process.stdout)
        self.port = int(await self._line())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        assert process is not None
        with anyio.CancelScope(shield=True):
            assert process.stdin is not None
            await process.stdin.aclose()  # the relay ends when its control input does
            with anyio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()

    async def freeze(self) -> None:
        """From now on (for at most ``hold`` seconds), nothing gets through."""
        await self._command(f"freeze {self.hold}")

    async def thaw(self) -> None:
        """Let everything held back through, and what follows."""
        await self._command("thaw")

    async def _command(self, text: str) -> None:
        assert self._process is not None
        assert self._process.stdin is not None
        await self._process.stdin.send(f"{text}\n".encode())
        assert await self._line() == "ok"

    async def _line(self) -> str:
        assert self._lines is not None
        with anyio.fail_after(10):
            return (await self._lines.receive_until(b"\n", 100)).decode()


class _Relay:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._flowing = anyio.Event()
        self._flowing.set()

    def freeze(self, hold: float, group: anyio.abc.TaskGroup) -> None:
        if self._flowing.is_set():
            self._flowing = anyio.Event()
        group.start_soon(self._thaw_after, hold, self._flowing)

    def thaw(self) -> None:
        self._flowing.set()

    @staticmethod
    async def _thaw_after(hold: float, flowing: anyio.Event) -> None:
        await anyio.sleep(hold)
        flowing.set()

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            await self._flowing.wait()
            try:
                server = await anyio.connect_tcp(self._host, self._port)
            except OSError:
                return
            async with server, anyio.create_task_group() as group:
                group.start_soon(self._pump, client, server, group.cancel_scope)
                await self._pump(server, client, group.cancel_scope)

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        both: anyio.CancelScope,
    ) -> None:
        try:
            async for chunk in source:
                while not self._flowing.is_set():
                    await self._flowing.wait()
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        # One side closed: close the other (while frozen, only after the thaw).
        both.cancel()


async def _main(host: str, port: int) -> None:
    relay = _Relay(host, port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, relay.handle)
        print(listener.extra(anyio.abc.SocketAttribute.local_port), flush=True)  # noqa: S610
        async with anyio.wrap_file(sys.stdin) as control:
            async for line in control:
                command, *args = line.split()
                if command == "freeze":
                    relay.freeze(float(args[0]), group)
                else:
                    relay.thaw()
                print("ok", flush=True)
        group.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(_main, sys.argv[1], int(sys.argv[2]))
