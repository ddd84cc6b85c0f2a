"""The transactional outbox: changes commit without the broker, and every event follows once it is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from shared.events import HostStatusChanged
from shared.messaging import Broker
from shared.outbox import OutboxMetrics, OutboxRelay, enqueue
from shared.tokens import create_token
from shared.topology import Topology
from tests.support.messages import EventCapture
from tests.support.processes import free_port, start_service
from tests.support.services import BackingServices
from tests.support.tcp_proxy import tcp_proxy


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


async def _unsent(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")


async def test_changes_commit_while_the_broker_is_down_and_events_follow(
    backing: BackingServices,
    service_env: dict[str, str],
    private_database: str,
    events: EventCapture,
    tmp_path: Path,
) -> None:
    # A database of its own: no other API's relay may publish these rows behind the cut broker.
    db = await asyncpg.connect(private_database)
    try:
        await _broker_down_scenario(
            backing, service_env | {"HEALTHGATE_DATABASE_URL": private_database}, db, events, tmp_path
        )
    finally:
        await db.close()


async def _broker_down_scenario(
    backing: BackingServices, service_env: dict[str, str], db: asyncpg.Connection, events: EventCapture, tmp_path: Path
) -> None:
    amqp = urlsplit(backing.amqp_url)
    with tcp_proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as proxy:
        port = free_port()
        env = service_env | {
            "HEALTHGATE_AMQP_URL": _through(backing.amqp_url, proxy.port),
            "HEALTHGATE_API_PORT": str(port),
        }
        api = start_service("api", env, tmp_path / "api.log", port=port)
        try:
            token = await create_token(db, name="outbox-admin", role="admin", groups=(), actor="test")
            async with httpx.AsyncClient(base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}) as admin:
                proxy.cut()
                host = await admin.post("/api/v1/hosts", json={"name": "db-1", "group": "db"})
                assert host.status_code == 201
                checks_url = f"/api/v1/hosts/{host.json()['id']}/health-checks"
                created = []
                for index in range(4):
                    response = await admin.post(
                        checks_url, json={"name": f"port-{index}", "check_type": "tcp", "port": 5432 + index}
                    )
                    assert response.status_code == 201, response.text
                    created.append(response.json()["id"])
                updated = await admin.put(
                    f"{checks_url}/{created[0]}", json={"name": "renamed", "check_type": "tcp", "port": 1}
                )
                assert updated.status_code == 200
                assert (await admin.delete(f"{checks_url}/{created[1]}")).status_code == 204

                ready = await admin.get("/health/ready")
                assert ready.status_code == 503  # the broker is gone, and readiness says so
                await asyncio.sleep(1.5)
                assert events.matching("check.config.created") == []
                expected = {str(row["event_id"]) for row in await db.fetch("SELECT event_id FROM outbox")}
                assert await _unsent(db) == len(expected) >= 6

                proxy.restore()
                async with asyncio.timeout(30):
                    while await _unsent(db):
                        await asyncio.sleep(0.2)
                await events.wait_for("check.config.deleted")
                await asyncio.sleep(0.5)
                received = [event.message_id for event in events.events if event.message_id in expected]
                assert set(received) == expected
                assert len(events.matching("check.config.created")) == 4
                assert len(events.matching("check.config.updated")) == 1
                assert events.matching("check.config.updated")[0].data["check"]["name"] == "renamed"
        finally:
            api.stop()


@pytest.fixture
async def broker(backing: BackingServices, exchange_name: str) -> AsyncIterator[Broker]:
    connected = Broker(backing.amqp_url, Topology(exchange_name), connection_name="test-outbox")
    await connected.run()
    yield connected
    await connected.close()


@pytest.fixture
async def pool(private_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of the test's own: no API process relays its outbox behind the test's back."""
    created = await asyncpg.create_pool(private_database, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


@pytest.fixture
async def db(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


def _status_event(host_id: uuid.UUID) -> HostStatusChanged:
    return HostStatusChanged(host_id=host_id, previous="unknown", current="healthy", at="2026-01-01T00:00:00Z")  # type: ignore[arg-type]


async def test_rolled_back_change_sends_nothing_and_a_stopped_relay_catches_up(
    db: asyncpg.Connection, pool: asyncpg.Pool, broker: Broker, events: EventCapture
) -> None:
    committed, rolled_back = uuid.uuid4(), uuid.uuid4()
    async with db.transaction():
        await enqueue(db, "host.status_changed", _status_event(committed), source="/test")
    transaction = db.transaction()
    await transaction.start()
    await enqueue(db, "host.status_changed", _status_event(rolled_back), source="/test")
    await transaction.rollback()

    # No relay ran so far: the committed event waits in the table.
    assert await _unsent(db) == 1
    relay = OutboxRelay(pool, broker, OutboxMetrics(CollectorRegistry()))
    running = asyncio.create_task(relay.run())
    try:
        await events.wait_for("host.status_changed")
        await asyncio.sleep(0.3)
    finally:
        running.cancel()
    host_ids = [event.data["host_id"] for event in events.matching("host.status_changed")]
    assert host_ids == [str(committed)]
    assert await _unsent(db) == 0


async def test_relays_running_together_publish_each_event_once(
    db: asyncpg.Connection, pool: asyncpg.Pool, broker: Broker, events: EventCapture
) -> None:
    async with db.transaction():
        for _ in range(600):
            await enqueue(db, "host.status_changed", _status_event(uuid.uuid4()), source="/test")
    relays = [OutboxRelay(pool, broker, OutboxMetrics(CollectorRegistry())) for _ in range(3)]
    await asyncio.gather(*(relay.relay_batch() for relay in relays))
    while await _unsent(db):
        await asyncio.gather(*(relay.relay_batch() for relay in relays))
    found = await events.wait_for("host.status_changed", count=600)
    await asyncio.sleep(0.3)
    ids = [event.message_id for event in events.matching("host.status_changed")]
    assert len(found) == 600 and len(ids) == len(set(ids)) == 600
