"""An HTTP peer that answers with exact bytes: malformed, oversized, encoded or slow answers for the poller.

`RawHttpServer` listens on a free 127.0.0.1 port, from a background thread with its own event loop (sync and async
tests alike). It reads each request's head, looks up the request path and writes the bytes set for it, after an
optional delay, then closes the connection (at once, or after holding it open for `hold` seconds); a path with
nothing set gets a plain 404.

    with RawHttpServer() as server:
        server.set("/garbage", b"GARBAGE\\r\\n\\r\\n")
        server.set("/ok", response(body=b"fine"), delay=0.3)
        server.url("/garbage")            # "http://127.0.0.1:PORT/garbage"
        server.requests                   # request heads received, as bytes

`response(...)` builds well-formed bytes to start from (status line, headers, Content-Length unless told not to).
`RawHttpServer(ssl_context=context)` answers over TLS with that server context instead (`base_url` is https).
`RawHttpServer(keep_alive=True)` keeps each connection open for the next request, as most servers do (answer with
`response(..., close=False)` then, which leaves out `Connection: close`); `connections` counts those accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

T = TypeVar("T")
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
REQUEST_HEAD_LIMIT = 64 * 1024


def response(
    status: str = "200 OK",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: bool = True,
    close: bool = True,
) -> bytes:
    """`HTTP/1.1 {status}` with `headers` (latin-1), `Content-Length` (unless `content_length` is false),
    `Connection: close` (unless `close` is false), then `body`."""
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawHttpServer:
    """Answers each path with the bytes set for it (see the module docstring). Use as a context manager."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, keep_alive: bool = False) -> None:
        self.ssl_context = ssl_context
        self.keep_alive = keep_alive
        self.connections = 0
        self.port = 0
        self.answers: dict[str, tuple[bytes, float, float]] = {}
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def set(self, path: str, raw: bytes, *, delay: float = 0.0, hold: float = 0.0) -> None:
        """Answer requests for `path` (without query) with `raw`, `delay` seconds after the request head, and close
        the connection `hold` seconds after that (a peer that says something and then waits)."""
        with self._lock:
            self.answers[path] = (raw, delay, hold)

    def request_log(self) -> list[bytes]:
        with self._lock:
            return list(self.requests)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> RawHttpServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="raw-http", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, limit=REQUEST_HEAD_LIMIT, ssl=self.ssl_context
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = self._server = None

    def __enter__(self) -> RawHttpServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._lock:
            self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                with self._lock:
                    self.requests.append(head)
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                path = urlsplit(parts[1].decode("latin-1")).path if len(parts) == 3 else ""
                with self._lock:
                    raw, delay, hold = self.answers.get(path, (NOT_FOUND, 0.0, 0.0))
                if delay:
                    await asyncio.sleep(delay)
                writer.write(raw)
                await writer.drain()
                if hold:
                    await asyncio.sleep(hold)
                if not self.keep_alive:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


@pytest.fixture
def raw_http() -> Iterator[RawHttpServer]:
    """A `RawHttpServer` with nothing set (every path answers 404)."""
    with RawHttpServer() as server:
        yield server
