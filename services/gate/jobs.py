"""The gate's job rows: one per (job_id, host_id), decided at most once.

Every decision is a conditional update of a waiting row that commits together with its event in the
outbox, under a deterministic event id; the row is locked for the evaluation, so two gates evaluating
the same job host serialise and the second finds it decided. Timers (retries, window ends) are
columns of the row, so any gate process, including one started after a crash, picks them up.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass

import asyncpg

from services.gate.rules import Decision, Verdict, decide
from shared.events import (
    EventModel,
    JobCancelled,
    JobFailed,
    JobReleased,
    JobStart,
    JobWaiting,
    decision_event_id,
    deterministic_event_id,
)
from shared.host_status import GatingCheck, gating_checks
from shared.outbox import enqueue

EVENT_SOURCE = "/healthgate/gate"
JOB_COLUMNS = "job_id, host_id, status, window_ends_at, received_at, waiting_announced"


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation did: the verdict, and the checks to run again now (a waiting job)."""

    verdict: Verdict | None
    rerun: list[uuid.UUID]


async def insert_job(connection: asyncpg.Connection, job: JobStart) -> bool:
    """Record a new job host as waiting. False if it exists already (a repeated job.start).

    Its first evaluation is due at once: if the gate dies before evaluating, the timer finds it."""
    inserted = await connection.fetchval(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, next_retry_at)
        VALUES ($1, $2, 'waiting_health_check', $3, now())
        ON CONFLICT (job_id, host_id) DO NOTHING
        RETURNING true
        """,
        job.job_id,
        job.host_id,
        job.window_ends_at,
    )
    return bool(inserted)


async def record_invalid_request(connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID, problem: str) -> bool:
    """Decide an invalid job.start as failed (invalid_request), unless the job host is known."""
    now = dt.datetime.now(dt.UTC)
    detail = f"invalid job.start: {problem}"
    inserted = await connection.fetchval(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, decided_at, reason, detail)
        VALUES ($1, $2, 'failed', NULL, $3, 'invalid_request', $4)
        ON CONFLICT (job_id, host_id) DO NOTHING
        RETURNING true
        """,
        job_id,
        host_id,
        now,
        detail,
    )
    if inserted:
        event = JobFailed(
            job_id=job_id, host_id=host_id, failed_at=now, reason="invalid_request", detail=detail, checks=[]
        )
        await _publish_decision(connection, "job.failed", event, job_id, host_id, now)
    return bool(inserted)


async def lock_waiting(connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID) -> asyncpg.Record | None:
    return await connection.fetchrow(
        f"""
        SELECT {JOB_COLUMNS} FROM gate_jobs
        WHERE job_id = $1 AND host_id = $2 AND status = 'waiting_health_check'
        FOR UPDATE
        """,
        job_id,
        host_id,
    )


async def lock_waiting_on_host(connection: asyncpg.Connection, host_id: uuid.UUID) -> list[asyncpg.Record]:
    """Waiting jobs of a host, locked; waits for a gate evaluating them now, then sees its outcome."""
    return await connection.fetch(
        f"""
        SELECT {JOB_COLUMNS} FROM gate_jobs
        WHERE host_id = $1 AND status = 'waiting_health_check'
        ORDER BY job_id
        FOR UPDATE
        """,
        host_id,
    )


async def lock_due(connection: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Waiting jobs whose retry or window end has come; other gates take the others (SKIP LOCKED)."""
    return await connection.fetch(
        f"""
        SELECT {JOB_COLUMNS} FROM gate_jobs
        WHERE status = 'waiting_health_check' AND (next_retry_at <= now() OR window_ends_at <= now())
        ORDER BY LEAST(next_retry_at, window_ends_at)
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )


async def evaluate(
    connection: asyncpg.Connection, job: asyncpg.Record, *, retry_seconds: float, rerun_failing: bool
) -> Evaluation:
    """Apply the rules to a locked waiting job host and act on the verdict, in the caller's transaction.

    `rerun_failing`: when the job must go on waiting, ask for its failing or stale checks to run again
    now and move its retry timer on (at start and on each retry, not on every result)."""
    now = dt.datetime.now(dt.UTC)
    checks = await gating_checks(connection, job["host_id"])
    decision = decide(job["window_ends_at"], now, checks)
    if decision.verdict is Verdict.RELEASE:
        await _release(connection, job, decision, now)
        return Evaluation(Verdict.RELEASE, [])
    if decision.verdict is Verdict.WINDOW_CLOSED:
        await _fail_window_closed(connection, job, decision, now)
        return Evaluation(Verdict.WINDOW_CLOSED, [])
    if not job["waiting_announced"]:
        event = JobWaiting(
            job_id=job["job_id"],
            host_id=job["host_id"],
            window_ends_at=job["window_ends_at"],
            failing_checks=[check.summary() for check in decision.not_ready],
        )
        await enqueue(
            connection, "job.waiting", event, source=EVENT_SOURCE, correlation_id=job["job_id"],
            event_id=deterministic_event_id("job-waiting", job["job_id"], str(job["host_id"])), time=now,
        )  # fmt: skip
    if not rerun_failing and job["waiting_announced"]:
        return Evaluation(None, [])
    await connection.execute(
        """
        UPDATE gate_jobs
        SET waiting_announced = true,
            next_retry_at = CASE WHEN $3 THEN now() + make_interval(secs => $4) ELSE next_retry_at END,
            checks = $5::jsonb
        WHERE job_id = $1 AND host_id = $2
        """,
        job["job_id"],
        job["host_id"],
        rerun_failing,
        retry_seconds,
        _checks_json(decision.checks),
    )
    return Evaluation(None, [check.check_id for check in decision.not_ready] if rerun_failing else [])


async def cancel(connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID) -> bool:
    now = dt.datetime.now(dt.UTC)
    cancelled = await connection.fetchval(
        """
        UPDATE gate_jobs
        SET status = 'cancelled', decided_at = $3, detail = 'cancelled by job.cancel', next_retry_at = NULL
        WHERE job_id = $1 AND host_id = $2 AND status = 'waiting_health_check'
        RETURNING true
        """,
        job_id,
        host_id,
        now,
    )
    if cancelled:
        event = JobCancelled(job_id=job_id, host_id=host_id, cancelled_at=now)
        await _publish_decision(connection, "job.cancelled", event, job_id, host_id, now)
    return bool(cancelled)


async def _release(connection: asyncpg.Connection, job: asyncpg.Record, decision: Decision, now: dt.datetime) -> None:
    detail = "all gating checks healthy" if decision.checks else "no gating checks on this host"
    if await _decide(connection, job, "released", None, detail, decision, now):
        event = JobReleased(
            job_id=job["job_id"],
            host_id=job["host_id"],
            released_at=now,
            waited_seconds=round((now - job["received_at"]).total_seconds(), 3),
            checks=[check.summary() for check in decision.checks],
        )
        await _publish_decision(connection, "job.released", event, job["job_id"], job["host_id"], now)


async def _fail_window_closed(
    connection: asyncpg.Connection, job: asyncpg.Record, decision: Decision, now: dt.datetime
) -> None:
    detail = decision.failure_detail(now)
    if await _decide(connection, job, "failed", "window_closed", detail, decision, now):
        event = JobFailed(
            job_id=job["job_id"],
            host_id=job["host_id"],
            failed_at=now,
            reason="window_closed",
            detail=detail,
            checks=[check.summary() for check in decision.checks],
        )
        await _publish_decision(connection, "job.failed", event, job["job_id"], job["host_id"], now)


async def _decide(
    connection: asyncpg.Connection,
    job: asyncpg.Record,
    status: str,
    reason: str | None,
    detail: str,
    decision: Decision,
    now: dt.datetime,
) -> bool:
    decided = await connection.fetchval(
        """
        UPDATE gate_jobs
        SET status = $3, reason = $4, detail = $5, checks = $6::jsonb, decided_at = $7, next_retry_at = NULL
        WHERE job_id = $1 AND host_id = $2 AND status = 'waiting_health_check'
        RETURNING true
        """,
        job["job_id"],
        job["host_id"],
        status,
        reason,
        detail,
        _checks_json(decision.checks),
        now,
    )
    return bool(decided)


async def _publish_decision(
    connection: asyncpg.Connection,
    routing_key: str,
    event: EventModel,
    job_id: str,
    host_id: uuid.UUID,
    now: dt.datetime,
) -> None:
    await enqueue(
        connection, routing_key, event, source=EVENT_SOURCE, correlation_id=job_id,
        event_id=decision_event_id(job_id, host_id), time=now,
    )  # fmt: skip


def _checks_json(checks: list[GatingCheck]) -> str:
    return json.dumps([check.summary().model_dump(mode="json") for check in checks])
