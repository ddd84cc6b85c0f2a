"""A check's `uptime_24h` through the API (CONTRACT §3), from results the session's real poller stores: null without
results, the share of healthy ones as a tcp check's port on 127.0.0.1 opens and closes, the same in a check's GET and
its host's list, only the hours of the window counted, and gone with the check."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator

import asyncpg
import httpx

from tests.support.processes import ServiceProcess


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
            checks_url, json={"name": "never run", "check_type": "tcp", "address": "127.0.0.1", "port": 9, "enabled": False}
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
