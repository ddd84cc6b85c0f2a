"""Every worker service runs on uvloop (issue 16)."""

from __future__ import annotations

import asyncio

import uvloop

from shared.service import run_service


def test_run_service_runs_the_service_on_uvloop() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def service() -> bool:
        loops.append(asyncio.get_running_loop())
        return True

    assert run_service(service()) == 0
    assert isinstance(loops[0], uvloop.Loop)
