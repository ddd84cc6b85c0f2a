"""A real HTTP receiver for notifications on 127.0.0.1 (aiohttp's server): it records every request and answers
as a test scripts it (statuses in turn, or never).

    async with Receiver() as receiver:
        receiver.answers = [500, 500, 500, 200]   # then the last one again
        ... url = receiver.url ...
        await receiver.wait_for(1)
        receiver.requests[0].headers["webhook-id"]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it: `at` is time.monotonic() on arrival."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int | None = None  # the status sent back; None while hanging


@dataclass
class Receiver:
    """Records requests to any path. `answers`: the statuses to answer in turn (the last repeats); `hang`: never
    answer (the request is recorded, then the handler waits until the receiver closes)."""

    answers: list[int] = field(default_factory=lambda: [200])
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = None if self.hang else self.answers[min(len(self.requests), len(self.answers) - 1)]
        received = Received(request.method, request.path, dict(request.headers), body, time.monotonic(), status)
        async with self._arrived:
            self.requests.append(received)
            self._arrived.notify_all()
        if status is None:
            await self._closing.wait()
            return web.Response(status=599)
        return web.Response(status=status, text="ok" if status < 300 else f"failing with {status}")

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """The requests once at least `count` have arrived; raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    def bodies(self) -> list[Any]:
        return [received.body for received in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A Receiver answering 200 for the test's length (tests/conftest.py registers it)."""
    async with Receiver() as started:
        yield started
