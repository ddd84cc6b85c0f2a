"""shared/jobs.py: `decide`, the one way a job host is decided (at most once, its event in the same transaction),
and the time helpers around asyncpg's infinities. Against a database of the test's own (`private_database`); the
races between deciders are in tests/test_one_decision.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared import jobs
from shared.events import JobStart, decision_event_id, job_key
from shared.jobs import EARLIEST_STORED, LATEST_STORED, JobDecision, as_received, aware, storable_time

HOST = uuid.UUID("12345678-1234-5678-1234-567812345678")
SOURCE = "/healthgate/test"

# ---- times ---------------------------------------------------------------------------------------------------


def test_the_two_instants_asyncpg_maps_to_infinity_are_moved_inward() -> None:
    earliest, latest = dt.datetime.min.replace(tzinfo=dt.UTC), dt.datetime.max.replace(tzinfo=dt.UTC)
    assert storable_time(earliest) == EARLIEST_STORED == earliest + dt.timedelta(microseconds=1)
    assert storable_time(latest) == LATEST_STORED == latest - dt.timedelta(microseconds=1)
    ordinary = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)
    assert storable_time(ordinary) == ordinary


def test_a_naive_infinity_as_read_becomes_aware() -> None:
    assert aware(dt.datetime.max) == dt.datetime.max.replace(tzinfo=dt.UTC)
    moment = dt.datetime(2030, 6, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert aware(moment) is moment


# ---- decide --------------------------------------------------------------------------------------------------


@pytest.fixture
async def connection(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(private_database)
    yield connection
    await connection.close()


async def waiting(connection: asyncpg.Connection, job_id: str = "j-1", window: str = "2030-06-01T12:00:00Z") -> None:
    job = JobStart.model_validate({"job_id": job_id, "host_id": str(HOST), "window_ends_at": window})
    assert await jobs.record_start(connection, job)


async def decision_events(connection: asyncpg.Connection, job_id: str) -> list[dict[str, object]]:
    rows = await connection.fetch(
        "SELECT routing_key, correlation_id, body FROM outbox WHERE event_id = $1", decision_event_id(job_id, HOST)
    )
    return [{"key": row["routing_key"], "correlation": row["correlation_id"]} | json.loads(row["body"]) for row in rows]


async def test_a_waiting_job_host_is_decided_once_with_its_event(connection: asyncpg.Connection) -> None:
    await waiting(connection)
    received_at = await connection.fetchval("SELECT received_at FROM gate_jobs")
    at = received_at + dt.timedelta(seconds=12.3456)
    released = JobDecision("j-1", HOST, "released", "all gating checks healthy", checks=[])
    async with connection.transaction():
        row = await jobs.decide(connection, released, at=at, source=SOURCE)
    assert row is not None and (row["status"], row["decided_at"]) == ("released", at)
    failed = JobDecision("j-1", HOST, "failed", "too late", reason="window_closed", checks=[])
    async with connection.transaction():
        assert await jobs.decide(connection, failed, at=at, source=SOURCE) is None  # decided already
        assert await jobs.decide(connection, released, at=at, source=SOURCE, unseen=True) is None
    [event] = await decision_events(connection, "j-1")
    assert (event["key"], event["correlation"], event["source"], event["type"]) == (
        "job.released", "j-1", SOURCE, "healthgate.job.released"
    )  # fmt: skip
    assert event["data"]["waited_seconds"] == 12.346  # type: ignore[index]
    assert await connection.fetchval("SELECT count(*) FROM outbox") == 1


async def test_an_override_carries_who_and_why(connection: asyncpg.Connection) -> None:
    await waiting(connection)
    decision = JobDecision(
        "j-1", HOST, "failed", "overridden by ops", reason="overridden", checks=[], overridden_by="ops",
        override_reason="change freeze",
    )  # fmt: skip
    row = await jobs.decide(connection, decision, at=dt.datetime.now(dt.UTC), source=SOURCE)
    assert row is not None and (row["overridden_by"], row["override_reason"]) == ("ops", "change freeze")
    [event] = await decision_events(connection, "j-1")
    data = event["data"]
    assert (data["reason"], data["overridden_by"], data["override_reason"]) == (  # type: ignore[index]
        "overridden", "ops", "change freeze"
    )  # fmt: skip


async def test_a_cancel_keeps_the_rows_check_snapshot(connection: asyncpg.Connection) -> None:
    await waiting(connection)
    await connection.execute('UPDATE gate_jobs SET checks = \'[{"name": "kept"}]\'::jsonb')
    decision = JobDecision("j-1", HOST, "cancelled", "cancelled by job.cancel")  # checks None: keep
    row = await jobs.decide(connection, decision, at=dt.datetime.now(dt.UTC), source=SOURCE)
    assert row is not None and json.loads(row["checks"]) == [{"name": "kept"}]
    [event] = await decision_events(connection, "j-1")
    assert event["key"] == "job.cancelled" and set(event["data"]) == {"job_id", "host_id", "cancelled_at"}  # type: ignore[arg-type]


async def test_an_unseen_job_host_is_recorded_decided_and_a_waiting_one_left_alone(
    connection: asyncpg.Connection,
) -> None:
    job_id = "bad\x00id"  # an invalid job_id: stored under its key, answered as received
    decision = JobDecision(job_id, HOST, "failed", "invalid job.start: job_id: …", reason="invalid_request", checks=[])
    at = dt.datetime.now(dt.UTC)
    row = await jobs.decide(connection, decision, at=at, source=SOURCE, unseen=True)
    assert row is not None and row["job_id"] == job_key(job_id) and row["received_at"] == at
    assert as_received(row)["job_id"] == job_id and "received_job_id" not in as_received(row)
    [event] = await decision_events(connection, job_id)
    assert event["data"]["job_id"] == job_id  # type: ignore[index]
    assert event["correlation"] is None  # AMQP cannot carry a NUL there (shared/outbox.py)

    await waiting(connection, "j-2")
    early = JobDecision("j-2", HOST, "cancelled", "cancelled before its job.start")
    assert await jobs.decide(connection, early, at=at, source=SOURCE, unseen=True) is None
    assert await connection.fetchval("SELECT status FROM gate_jobs WHERE job_id = 'j-2'") == "waiting_health_check"


async def test_a_window_at_the_end_of_time_is_stored_and_read_back_aware(connection: asyncpg.Connection) -> None:
    await waiting(connection, window="9999-12-31T23:59:59.999999Z")
    assert await jobs.due_waiting(connection, 10) == []  # a job.start's row is the timers' 2 s after its record
    await connection.execute("UPDATE gate_jobs SET next_retry_at = now() WHERE job_id = 'j-1'")
    [due] = await jobs.due_waiting(connection, 10)
    assert (due["job_id"], due["host_id"], due["group"]) == ("j-1", HOST, None)
    async with connection.transaction():
        row = await jobs.lock_waiting(connection, "j-1", HOST)
    assert row is not None and aware(row["window_ends_at"]) == LATEST_STORED
