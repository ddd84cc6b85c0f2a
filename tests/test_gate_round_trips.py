"""Round trips to PostgreSQL per release (issue 16: "a release costs at most three database round trips").

The gate's job.start handler (`Gate.start`, as its consumer calls it) runs in this process on a pool whose one
connection goes through a proxy that counts the round trips it makes (tests/support/pg_round_trips.py), against a
database of the test's own with real hosts, checks and check states. A job.start of a healthy host is released in
two: `gate_record_start` and `gate_decide_fast` (shared/jobs.py), in a group with or without a disruption budget.
A host that must wait still goes through the group's release pass (more round trips, not counted against the goal).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from services.gate.consumer import Gate, GateMetrics
from shared.database import DatabaseWatch, create_pool
from shared.events import JobStart, decision_event_id, job_key
from shared.group_policies import GroupPolicy, put_policy
from shared.messaging import Broker
from shared.topology import Topology
from tests.support.pg_round_trips import PostgresRoundTrips, postgres_round_trips

HOSTS = 8
MEASURED = 6
WINDOW = "2099-01-01T00:00:00Z"


@pytest.fixture
async def counted(private_database: str) -> AsyncIterator[tuple[Gate, PostgresRoundTrips, asyncpg.Connection]]:
    """A Gate whose pool (one connection) goes through a round-trip counter to the test's own database, and a
    direct connection to that database for seeding and reading."""
    parts = urlsplit(private_database)
    with postgres_round_trips(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
        dsn = urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable"))
        pool = await create_pool(dsn, min_size=1, max_size=1)
        broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("hgtest-unused"), connection_name="test")
        db = await asyncpg.connect(private_database)
        try:
            yield (
                Gate(pool, broker, GateMetrics(CollectorRegistry()), DatabaseWatch(dsn, pool), retry_seconds=2),
                proxy,
                db,
            )
        finally:
            await db.close()
            await pool.close()


async def healthy_hosts(db: asyncpg.Connection, group: str, count: int) -> list[uuid.UUID]:
    """`count` hosts of `group`, each with two critical tcp checks whose last result, a second ago, was healthy,
    healthy for an hour."""
    host_ids = [uuid.uuid4() for _ in range(count)]
    now = await db.fetchval("SELECT clock_timestamp()")
    for index, host_id in enumerate(host_ids):
        await db.execute(
            'INSERT INTO hosts (id, name, "group") VALUES ($1, $2, $3)', host_id, f"{group}-{index}", group
        )
        for name in ("port-a", "port-b"):
            check_id = uuid.uuid4()
            await db.execute(
                "INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port,"
                " address) VALUES ($1, $2, $3, 'tcp', 60, 1, 9, '127.0.0.1')",
                check_id, host_id, name,
            )  # fmt: skip
            await db.execute(
                "INSERT INTO check_state (check_id, host_id, status, last_healthy, last_detail, last_checked_at,"
                " healthy_since, status_changed_at) VALUES ($1, $2, 'healthy', true, 'connected', $3, $4, $4)",
                check_id, host_id, now - dt.timedelta(seconds=1), now - dt.timedelta(hours=1),
            )  # fmt: skip
    await db.execute("UPDATE hosts SET health_check_status = 'healthy' WHERE \"group\" = $1", group)
    return host_ids


@pytest.mark.parametrize("budget", [None, GroupPolicy(max_unavailable=HOSTS)], ids=["no-budget", "budget"])
async def test_a_healthy_hosts_job_start_is_released_in_two_round_trips(
    counted: tuple[Gate, PostgresRoundTrips, asyncpg.Connection], budget: GroupPolicy | None
) -> None:
    gate, proxy, db = counted
    group = "web"
    host_ids = await healthy_hosts(db, group, HOSTS)
    if budget is not None:
        async with db.transaction():
            await put_policy(db, group, budget)
    trips: list[int] = []
    for index, host_id in enumerate(host_ids[: MEASURED + 1]):
        job = JobStart.model_validate({"job_id": f"patch-{index}", "host_id": str(host_id), "window_ends_at": WINDOW})
        proxy.reset()
        assert await gate.start(job) == "started"
        trips.append(proxy.round_trips)
        row = await db.fetchrow(
            "SELECT status, reason FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job.job_id), host_id
        )
        assert (row["status"], row["reason"]) == ("released", None)
        assert (
            await db.fetchval(
                "SELECT routing_key FROM outbox WHERE event_id = $1", decision_event_id(job.job_id, host_id)
            )
            == "job.released"
        )
    # The first prepares its statements (a Parse and a Sync more each); the steady state is what counts.
    steady = trips[1:]
    assert max(steady) <= 3, trips
    assert steady == [2] * MEASURED, trips


async def test_a_host_that_must_wait_is_not_released_by_the_fast_path(
    counted: tuple[Gate, PostgresRoundTrips, asyncpg.Connection],
) -> None:
    """A stale result (older than its interval) makes the host wait: nothing is decided in two round trips, the
    release pass keeps it waiting."""
    gate, proxy, db = counted
    [host_id] = await healthy_hosts(db, "stale", 1)
    await db.execute("UPDATE check_state SET last_checked_at = now() - interval '2 hours' WHERE host_id = $1", host_id)
    job = JobStart.model_validate({"job_id": "stale-1", "host_id": str(host_id), "window_ends_at": WINDOW})
    proxy.reset()
    assert await gate.start(job) == "started"
    assert proxy.round_trips > 2
    assert (
        await db.fetchval(
            "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job.job_id), host_id
        )
        == "waiting_health_check"
    )
