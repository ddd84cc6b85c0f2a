"""The pruner against the real PostgreSQL: only expired rows go, at every boundary; writers are not
blocked; two pruners at once; the database lost mid-pass and back; `healthgate prune --once`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from services.pruner.passes import Retention, prune_once
from shared.results import ensure_result_partitions
from tests.support.processes import free_port, start_service
from tests.support.tcp_proxy import tcp_proxy

RESULT_COLUMNS = ["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"]


def retention(hours: float) -> Retention:
    return Retention(
        results=dt.timedelta(hours=hours), decided_jobs=dt.timedelta(days=30), sent_outbox=dt.timedelta(hours=24)
    )


@pytest.fixture
async def pool(private_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of the test's own: the pruner drops partitions the session's services write to."""
    created = await asyncpg.create_pool(private_database, min_size=1, max_size=6)
    assert created is not None
    async with created.acquire() as connection:
        today = (await connection.fetchval("SELECT now()")).date()
        await ensure_result_partitions(connection, today - dt.timedelta(days=10), days_ahead=18)
    yield created
    await created.close()


async def insert_results(pool: asyncpg.Pool, times: list[dt.datetime]) -> list[uuid.UUID]:
    check_id, host_id = uuid.uuid4(), uuid.uuid4()
    ids = [uuid.uuid4() for _ in times]
    rows = [
        (row_id, check_id, host_id, at, True, "ok", "healthy", "fine", 1.0)
        for row_id, at in zip(ids, times, strict=True)
    ]
    async with pool.acquire() as connection:
        await connection.copy_records_to_table("check_results", records=rows, columns=RESULT_COLUMNS)
    return ids


async def remaining(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    return {row["id"] for row in await pool.fetch("SELECT id FROM check_results WHERE id = ANY($1)", ids)}


async def test_only_expired_rows_go_at_every_boundary(pool: asyncpg.Pool) -> None:
    now = await pool.fetchval("SELECT now()")
    midnight = dt.datetime.combine(now.date(), dt.time(), dt.UTC)
    # The cutoff lands mid-day, four days back; rows sit around it and around the older midnights.
    hours = (now - (midnight - dt.timedelta(days=4) + dt.timedelta(hours=12))).total_seconds() / 3600
    cutoff = now - dt.timedelta(hours=hours)
    second = dt.timedelta(seconds=30)  # the pass runs within seconds of `now`
    expired_times = [
        cutoff - second, cutoff - dt.timedelta(hours=6),
        midnight - dt.timedelta(days=4),  # the boundary day's first instant
        midnight - dt.timedelta(days=4, microseconds=1),  # the day before's last instant (whole day expired)
        midnight - dt.timedelta(days=6), midnight - dt.timedelta(days=9, hours=-23),
    ]  # fmt: skip
    kept_times = [
        cutoff + second, cutoff + dt.timedelta(hours=6),
        midnight - dt.timedelta(days=3),  # the next day's first instant
        midnight - dt.timedelta(days=3, microseconds=1),  # the boundary day's last instant
        now, now + dt.timedelta(days=2),
    ]  # fmt: skip
    expired = await insert_results(pool, expired_times)
    kept = await insert_results(pool, kept_times)
    report = await prune_once(pool, retention(hours))
    assert await remaining(pool, expired) == set()
    assert await remaining(pool, kept) == set(kept)
    boundary_day = (midnight - dt.timedelta(days=4)).date()
    assert f"check_results_{boundary_day:%Y%m%d}" not in report.partitions_dropped
    dropped_days = {dt.datetime.strptime(name[-8:], "%Y%m%d").date() for name in report.partitions_dropped}
    assert dropped_days and max(dropped_days) < boundary_day
    assert report.result_rows_deleted == 3  # only the boundary day's expired rows are deleted row by row
    assert report.oldest_result_age_seconds is not None and report.oldest_result_age_seconds <= hours * 3600
    # Partitions lie ahead for the coming week, whatever was dropped.
    for offset in range(8):
        day = now.date() + dt.timedelta(days=offset)
        assert await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f"check_results_{day:%Y%m%d}")


def noon_cutoff(now: dt.datetime, days_back: int) -> tuple[float, dt.datetime]:
    """A retention in hours whose cutoff is noon `days_back` days before `now`'s day, and that cutoff: rows a few
    hours before it lie in the boundary day (deleted row by row), whatever the time of day the test runs at. A
    fixed retention would put them in the day before near midnight UTC, whose partition is dropped whole."""
    cutoff = dt.datetime.combine(now.date(), dt.time(12), dt.UTC) - dt.timedelta(days=days_back)
    return (now - cutoff).total_seconds() / 3600, cutoff


async def test_writers_keep_inserting_during_a_pass(pool: asyncpg.Pool) -> None:
    now = await pool.fetchval("SELECT now()")
    hours, cutoff = noon_cutoff(now, 2)
    old_day = cutoff - dt.timedelta(days=4)
    await insert_results(pool, [old_day + dt.timedelta(milliseconds=index) for index in range(200_000)])
    # Boundary rows, from 6.5 to 1 hours before the cutoff: the cutoff's own day.
    await insert_results(pool, [cutoff - dt.timedelta(hours=1, seconds=index) for index in range(20_000)])
    inserted = 0
    stop = asyncio.Event()

    async def keep_writing() -> None:
        nonlocal inserted
        while not stop.is_set():
            await insert_results(pool, [dt.datetime.now(dt.UTC)] * 50)
            inserted += 50

    writer = asyncio.create_task(keep_writing())
    await asyncio.sleep(0.2)
    report = await prune_once(pool, retention(hours))
    stop.set()
    await writer
    assert report.partitions_dropped and report.result_rows_deleted == 20_000
    fresh = await pool.fetchval("SELECT count(*) FROM check_results WHERE checked_at > now() - interval '1 hour'")
    assert fresh == inserted > 0


async def test_two_pruners_at_once(pool: asyncpg.Pool, private_database: str) -> None:
    now = await pool.fetchval("SELECT now()")
    expired = await insert_results(pool, [now - dt.timedelta(hours=30, seconds=index) for index in range(60_000)])
    kept = await insert_results(pool, [now - dt.timedelta(hours=1)] * 10)
    reports = await asyncio.gather(prune_once(pool, retention(24)), prune_once(pool, retention(24)))
    assert sorted(report.skipped for report in reports) == [False, True]
    assert await remaining(pool, expired) == set() and await remaining(pool, kept) == set(kept)
    # And two `healthgate prune --once` processes side by side both succeed.
    env = {**os.environ, "HEALTHGATE_DATABASE_URL": private_database, "HEALTHGATE_RESULT_RETENTION_HOURS": "24"}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "prune", "--once", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]  # fmt: skip
    outputs = [await process.communicate() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert all(json.loads(stdout)["result_rows_deleted"] == 0 for stdout, _ in outputs)


def _through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


async def test_database_lost_mid_pass_and_back(pool: asyncpg.Pool, private_database: str) -> None:
    now = await pool.fetchval("SELECT now()")
    hours, cutoff = noon_cutoff(now, 1)
    # In the boundary day (so deleted in batches, which the proxy cuts), and kept rows after the cutoff.
    expired = await insert_results(
        pool, [cutoff - dt.timedelta(hours=6, milliseconds=index) for index in range(300_000)]
    )
    kept = await insert_results(pool, [cutoff + dt.timedelta(hours=4)] * 10)
    target = urlsplit(private_database)
    with tcp_proxy(target.hostname or "127.0.0.1", target.port or 5432) as proxy:
        proxied = await asyncpg.create_pool(_through(private_database, proxy.port), min_size=1, max_size=3)
        assert proxied is not None
        try:
            passing = asyncio.create_task(prune_once(proxied, retention(hours)))
            async with asyncio.timeout(30):
                while not await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'DELETE FROM check_results_%'"
                ):
                    await asyncio.sleep(0.002)
            await asyncio.sleep(0.05)
            proxy.cut()  # the database is gone in the middle of the batches
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await passing
            left = len(await remaining(pool, expired))
            assert 0 < left < len(expired)
            proxy.restore()
            report = await prune_once(proxied, retention(hours))
            assert report.result_rows_deleted == left
        finally:
            await proxied.close()
    assert await remaining(pool, expired) == set() and await remaining(pool, kept) == set(kept)


async def test_decided_jobs_and_sent_outbox_rows_expire(pool: asyncpg.Pool) -> None:
    host_id = uuid.uuid4()
    await pool.execute(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)
        VALUES ('old', $1, 'failed', now(), now() - interval '40 days', now() - interval '31 days'),
               ('recent', $1, 'cancelled', now(), now() - interval '2 days', now() - interval '1 day'),
               ('waiting', $1, 'waiting_health_check', now() + interval '1 hour', now() - interval '40 days', NULL),
               -- In patch (CONTRACT §6), however old: kept.
               ('patching', $1, 'released', now(), now() - interval '40 days', now() - interval '31 days'),
               ('verifying', $1, 'verifying', now(), now() - interval '40 days', now() - interval '31 days')
        """,
        host_id,
    )
    await pool.execute(
        """
        INSERT INTO outbox (event_id, routing_key, body, created_at, sent_at)
        VALUES (gen_random_uuid(), 'x', '\\x7b7d', now() - interval '2 days', now() - interval '2 days'),
               (gen_random_uuid(), 'x', '\\x7b7d', now() - interval '2 days', NULL),
               (gen_random_uuid(), 'x', '\\x7b7d', now(), now())
        """
    )
    await pool.execute(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id, at) VALUES ('cli', 'host.create', 'host', 'x', now() - interval '400 days')"
    )
    report = await prune_once(pool, retention(96))
    assert (report.gate_jobs_deleted, report.outbox_rows_deleted) == (1, 1)
    assert {row["job_id"] for row in await pool.fetch("SELECT job_id FROM gate_jobs")} == {
        "recent", "waiting", "patching", "verifying",
    }  # fmt: skip
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 1  # the audit log is kept


def test_pruner_service_runs_a_pass_at_start_and_stops_cleanly(service_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = service_env | {"HEALTHGATE_HEALTH_PORT": str(port)}
    pruner = start_service("pruner", env, tmp_path / "pruner.log", port=port)
    try:
        deadline = time.monotonic() + 10
        while "pruning pass done" not in pruner.log_text():
            assert time.monotonic() < deadline, pruner.log_text()
            time.sleep(0.1)
        metrics = httpx.get(f"{pruner.base_url}/metrics").text
        assert (
            "healthgate_prune_pass_seconds_count 1.0" in metrics and "healthgate_oldest_result_age_seconds" in metrics
        )
        ready = httpx.get(f"{pruner.base_url}/health/ready").json()
        assert ready["status"] == "pass" and "rabbitmq:responseTime" not in ready["checks"]
    finally:
        assert pruner.stop() == 0


async def test_jobs_without_hosts_left_expire_with_them(pool: asyncpg.Pool) -> None:
    """A job's row (its max_failed_hosts and halt state, CONTRACT §6) goes once none of its job hosts is left and
    it is older than the job retention: one row per job ever started would otherwise grow without bound."""
    host_id = uuid.uuid4()
    await pool.execute(
        """
        INSERT INTO jobs (job_id, max_failed_hosts, created_at, halted_at, halt_reason, halt_count)
        VALUES ('gone', 1, now() - interval '40 days', NULL, NULL, 0),
               ('gone-halted', 0, now() - interval '40 days', now() - interval '39 days', 'manual', 1),
               ('old-with-host', 1, now() - interval '40 days', NULL, NULL, 0),
               ('young', 1, now() - interval '1 day', NULL, NULL, 0)
        """
    )
    await pool.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at) "
        "VALUES ('old-with-host', $1, 'waiting_health_check', now() + interval '1 hour', now() - interval '40 days')",
        host_id,
    )
    report = await prune_once(pool, retention(96))
    assert report.jobs_deleted == 2
    assert {row["job_id"] for row in await pool.fetch("SELECT job_id FROM jobs")} == {"old-with-host", "young"}


async def test_hourly_result_counts_before_the_uptime_window_expire(pool: asyncpg.Pool) -> None:
    """`check_uptime_hours` (behind a check's uptime_24h, CONTRACT §3): the hours before the window the API counts
    (the current UTC hour and the 23 before it) go, whatever the result retention; the window's stay."""
    host_id, check_id = uuid.uuid4(), uuid.uuid4()
    await pool.execute("INSERT INTO hosts (id, name, \"group\") VALUES ($1, 'uptime-host', 'g')", host_id)
    await pool.execute(
        "INSERT INTO health_checks (id, host_id, name, check_type, port, interval_seconds, timeout_seconds) "
        "VALUES ($1, $2, 'tcp', 'tcp', 22, 60, 1)",
        check_id,
        host_id,
    )
    await pool.execute(
        """
        INSERT INTO check_uptime_hours (check_id, hour, healthy, total)
        SELECT $1, date_trunc('hour', now(), 'UTC') - make_interval(hours => back), 1, 2
        FROM generate_series(0, 40) AS back
        """,
        check_id,
    )
    report = await prune_once(pool, retention(96))
    assert report.uptime_hours_deleted == 41 - 24 and report.as_dict()["uptime_hours_deleted"] == 17
    oldest = await pool.fetchval(
        "SELECT date_trunc('hour', now(), 'UTC') - min(hour) FROM check_uptime_hours WHERE check_id = $1", check_id
    )
    assert oldest == dt.timedelta(hours=23)
    assert (await prune_once(pool, retention(96))).uptime_hours_deleted == 0
