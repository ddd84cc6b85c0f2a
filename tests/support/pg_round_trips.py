"""A TCP proxy in front of PostgreSQL that counts the round trips its clients make (issue 16: "a release costs
at most three database round trips").

A round trip is a client message after which the client waits for the server: in PostgreSQL's protocol
(https://www.postgresql.org/docs/15/protocol-flow.html) a Sync ('S', which ends an extended-query cycle:
Parse/Bind/Describe/Execute are sent together before it) or a simple Query ('Q'). The proxy reads only the
framing of what clients send (a type byte and a 4-byte big-endian length including itself, after the
untyped start-up messages) and forwards every byte unchanged. Connect to it without TLS (`ssl=disable`):
encrypted traffic cannot be framed.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Iterator

# The untyped requests a client may send before its StartupMessage (each answered by one byte, then another
# untyped message follows): SSLRequest and GSSENCRequest.
_PRE_STARTUP_CODES = {80877103, 80877104}
_WAITS_FOR_SERVER = {ord("S"), ord("Q")}


class _Framer:
    """The frontend messages of one connection, fed its client bytes in any chunks; counts the round trips."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False
        self.round_trips = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return
                (length, code) = struct.unpack("!II", self._buffer[:8])
                if len(self._buffer) < length:
                    return
                del self._buffer[:length]
                self._started = code not in _PRE_STARTUP_CODES
                continue
            if len(self._buffer) < 5:
                return
            kind = self._buffer[0]
            (length,) = struct.unpack("!I", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return
            del self._buffer[: 1 + length]
            if kind in _WAITS_FOR_SERVER:
                self.round_trips += 1


class PostgresRoundTrips:
    """Forwards 127.0.0.1:<port> to PostgreSQL at `target`; `round_trips` is the number its clients made so far
    (every connection's), `reset()` starts counting again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._framers: list[_Framer] = []
        self._base = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def round_trips(self) -> int:
        with self._lock:
            return sum(framer.round_trips for framer in self._framers) - self._base

    def reset(self) -> None:
        with self._lock:
            self._base = sum(framer.round_trips for framer in self._framers)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framer: _Framer | None) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if framer is not None:
                    with self._lock:
                        framer.feed(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        framer = _Framer()
        with self._lock:
            self._framers.append(framer)
        self._writers |= {client_writer, upstream_writer}
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, framer), self._pipe(upstream_reader, client_writer, None)
        )
        self._writers -= {client_writer, upstream_writer}

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def start(self) -> None:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def postgres_round_trips(target_host: str, target_port: int) -> Iterator[PostgresRoundTrips]:
    """A started PostgresRoundTrips, stopped on leaving."""
    proxy = PostgresRoundTrips(target_host, target_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
