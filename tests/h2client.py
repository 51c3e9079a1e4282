"""A minimal blocking HTTP/2 client (prior knowledge, no TLS) over one socket, for tests that
must control single streams of a connection: open many, read them as they arrive, reset some.

httpx multiplexes streams too, but closing a response early there sends no RST_STREAM.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events


@dataclass
class Stream:
    """What one stream received."""

    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    reset_by_server: bool = False


class H2Client:
    """One HTTP/2 connection to ``http://host:port``; every wait is bounded by ``timeout``."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.timeout = timeout
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self._flush()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def get(self, path: str, headers: dict[str, str]) -> int:
        """Open a stream for ``GET path``; return its id."""
        stream_id = self.conn.get_next_available_stream_id()
        pseudo = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "x")]
        self.conn.send_headers(stream_id, [*pseudo, *headers.items()], end_stream=True)
        self.streams[stream_id] = Stream()
        self._flush()
        return stream_id

    def reset(self, stream_id: int) -> None:
        """Cancel a stream (RST_STREAM with CANCEL), as a client giving up on it does."""
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()

    def read_once(self) -> None:
        """Read what the server sent next and take it in (acknowledging the data)."""
        data = self.sock.recv(65536)
        if not data:
            msg = "the server closed the connection"
            raise ConnectionError(msg)
        for event in self.conn.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if stream is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                stream.headers = dict(event.headers)
                stream.status = int(stream.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                stream.body += event.data or b""
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset):
                stream.reset_by_server = True
        self._flush()

    def read_until(self, done: Callable[[], bool], what: str) -> None:
        """Read until ``done()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                msg = f"timed out waiting for {what}"
                raise TimeoutError(msg)
            self.read_once()
