"""An HTTP receiver of notifications on 127.0.0.1 (a port of its own): records each request and answers a status the
test sets. The `receiver` fixture (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web


@dataclass
class Receiver:
    """Where it listens (`url`), what it answers (`status`, with a short body when not 2xx) and what it received:
    (headers, body) per request, in order."""

    url: str = ""
    status: int = 204
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()

    async def record(request: web.Request) -> web.Response:
        found.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=found.status, text="no thanks" if found.status >= 300 else "")

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/hooks/healthgate"
    yield found
    await runner.cleanup()
