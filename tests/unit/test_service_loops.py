"""Every worker service and its outbox relay thread run on uvloop (issue 16: the poller's relay thread ran on a
plain asyncio loop, a third of the poller's CPU in the profile)."""

from __future__ import annotations

import asyncio

import uvloop
from prometheus_client import CollectorRegistry

from shared.outbox import OutboxMetrics, RelayThread
from shared.service import run_service
from shared.topology import Topology


def test_run_service_runs_the_service_on_uvloop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def service() -> bool:
        loops.append(asyncio.get_running_loop())
        return True

    assert run_service(service()) == 0
    assert isinstance(loops[0], uvloop.Loop)


def test_the_relay_thread_runs_on_uvloop() -> None:
    # Nothing listens on port 9 (discard): the relay keeps trying to connect until it is stopped.
    relay = RelayThread(
        "postgresql://nobody@127.0.0.1:9/none", "amqp://guest:guest@127.0.0.1:9/", Topology("hg-unit-loops"),
        "unit", OutboxMetrics(CollectorRegistry()),
    )  # fmt: skip
    relay.start()
    try:
        assert isinstance(relay._loop, uvloop.Loop)
    finally:
        relay.stop(timeout=10)
