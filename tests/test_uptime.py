"""A check's `uptime_24h` through the API (CONTRACT §3), from results the session's real poller stores: null without
results, the share of healthy ones as a tcp check's port on 127.0.0.1 opens and closes, the same in a check's GET and
its host's list, only the hours of the window counted, and gone with the check."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx

from tests.support.grpc_server import GrpcHealthServer
from tests.support.processes import ServiceProcess, start_poller


class TogglingPort:
    """A 127.0.0.1 port that refuses connections until `open()` and again after `close()`: bound all along (so no
    other test takes it), listening only while open."""

    def __init__(self) -> None:
        self._socket = self._bound(0)
        self.port = int(self._socket.getsockname()[1])

    @staticmethod
    def _bound(port: int) -> socket.socket:
        bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind(("127.0.0.1", port))
        return bound

    def open(self) -> None:
        self._socket.listen(16)

    def close(self) -> None:
        """Stop listening: a listening socket cannot go back, so it is replaced by a bound one on the same port."""
        self._socket.close()
        self._socket = self._bound(self.port)

    def release(self) -> None:
        self._socket.close()


@contextlib.contextmanager
def toggling_port() -> Iterator[TogglingPort]:
    port = TogglingPort()
    try:
        yield port
    finally:
        port.release()


async def run_now(admin: httpx.AsyncClient, check_url: str) -> bool:
    """A run made now by the session's poller (`/test`: stored and counted like any other result); whether it
    was healthy."""
    response = await admin.post(f"{check_url}/test")
    assert response.status_code == 200, response.text
    healthy: bool = response.json()["healthy"]
    return healthy


async def test_uptime_follows_the_pollers_results_and_counts_only_the_window(
    api: ServiceProcess, poller: ServiceProcess, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "127.0.0.1", "group": "app"})).json()
    checks_url = f"/api/v1/hosts/{host['id']}/health-checks"
    with toggling_port() as target:
        # Disabled: no scheduled run comes between the runs made here, so the share is known exactly.
        created = await admin.post(
            checks_url,
            json={"name": "port", "check_type": "tcp", "address": "127.0.0.1", "port": target.port, "enabled": False},
        )
        assert created.status_code == 201, created.text
        check = created.json()
        check_url = f"{checks_url}/{check['id']}"
        assert check["uptime_24h"] is None  # no result yet
        assert (await admin.get(check_url)).json()["uptime_24h"] is None
        other = await admin.post(
            checks_url,
            json={"name": "never run", "check_type": "tcp", "address": "127.0.0.1", "port": 9, "enabled": False},
        )

        target.open()
        assert [await run_now(admin, check_url) for _ in range(3)] == [True, True, True]
        assert (await admin.get(check_url)).json()["uptime_24h"] == 1.0
        target.close()
        assert await run_now(admin, check_url) is False
        shown = (await admin.get(check_url)).json()
        assert shown["uptime_24h"] == 0.75 and shown["last_result"]["reason"] == "connect"
        listed = {item["name"]: item["uptime_24h"] for item in (await admin.get(checks_url)).json()["items"]}
        assert listed == {"port": 0.75, "never run": None}
        # A PUT's answer carries it too.
        updated = await admin.put(check_url, json=shown | {"timeout_seconds": 2})
        assert updated.status_code == 200 and updated.json()["uptime_24h"] == 0.75

    # The same share as the results the poller stored say.
    stored = (await admin.get(f"{check_url}/results")).json()["items"]
    assert [item["healthy"] for item in stored] == [False, True, True, True]

    # Hours before the window (the current UTC hour and the 23 before it) no longer count: moved back a day,
    # the check has no result in the last 24 h.
    check_id = uuid.UUID(check["id"])
    await db.execute("UPDATE check_uptime_hours SET hour = hour - interval '24 hours' WHERE check_id = $1", check_id)
    assert (await admin.get(check_url)).json()["uptime_24h"] is None

    # Deleting the check deletes its hours.
    assert (await admin.delete(check_url)).status_code == 204
    assert await db.fetchval("SELECT count(*) FROM check_uptime_hours WHERE check_id = $1", check_id) == 0
    assert other.status_code == 201


async def test_two_pollers_counting_the_same_checks_and_hour_lose_nothing(
    api: ServiceProcess,
    poller: ServiceProcess,
    admin: httpx.AsyncClient,
    db: asyncpg.Connection,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Two pollers store results of the same checks in the same hour at once (200 /test runs of five checks, taken
    by whichever poller is free): every result is counted once, and no batch fails (a deadlock would hand a run back
    or lose its reply)."""
    # The session's poller has logged the earlier tests too (a deadlock with the table emptying between tests, say):
    # only what it logs from here on is this test's.
    logged_before = len(poller.log_text())
    second = start_poller(service_env, tmp_path / "second.log")
    try:
        with GrpcHealthServer() as server:
            host = (await admin.post("/api/v1/hosts", json={"name": "127.0.0.1", "group": "app"})).json()
            checks_url = f"/api/v1/hosts/{host['id']}/health-checks"
            check_ids = []
            for index in range(5):
                created = await admin.post(checks_url, json={
                    "name": f"grpc-{index}", "check_type": "grpc", "address": "127.0.0.1", "port": server.port,
                    "enabled": False,
                })  # fmt: skip
                assert created.status_code == 201, created.text
                check_ids.append(created.json()["id"])
            answers = await asyncio.gather(
                *(admin.post(f"{checks_url}/{check_ids[index % 5]}/test") for index in range(200))
            )
    finally:
        second.stop()
    assert [answer.status_code for answer in answers] == [200] * 200
    ids = [uuid.UUID(check_id) for check_id in check_ids]
    stored = await db.fetchval("SELECT count(*) FROM check_results WHERE check_id = ANY($1)", ids)
    counted = await db.fetchval("SELECT sum(total) FROM check_uptime_hours WHERE check_id = ANY($1)", ids)
    assert stored == counted == 200
    for check_id in check_ids:
        assert (await admin.get(f"{checks_url}/{check_id}")).json()["uptime_24h"] == 1.0
    assert "deadlock" not in (poller.log_text()[logged_before:] + second.log_text()).lower()
