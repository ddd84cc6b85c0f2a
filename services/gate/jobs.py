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
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from services.gate.rules import Decision, UnknownHostPolicy, Verdict, decide, window_closed
from shared.database import locked_now
from shared.details import clip_detail, safe_detail
from shared.events import (
    EventModel,
    JobCancelled,
    JobFailed,
    JobReleased,
    JobStart,
    JobWaiting,
    decision_event_id,
    deterministic_event_id,
    is_valid_job_id,
    job_key,
    received_job_id_bytes,
)
from shared.gating import GatingCheck, gating_checks, gating_checks_as_of
from shared.outbox import enqueue
from shared.schedule import request_reruns

EVENT_SOURCE = "/healthgate/gate"
JOB_COLUMNS = "job_id, host_id, status, window_ends_at, received_at, waiting_announced"
LOGGED_JOB_ID_LIMIT = 200
# asyncpg stores exactly datetime.min and datetime.max (in UTC) as PostgreSQL's -infinity/infinity
# and reads those back as *naive* datetimes, which then cannot be compared with now (the timers would
# crash) nor shown as RFC 3339 with an offset. A window ending at either instant is stored one
# microsecond inside them: no decision changes by that.
EARLIEST_STORED = dt.datetime.min.replace(tzinfo=dt.UTC) + dt.timedelta(microseconds=1)
LATEST_STORED = dt.datetime.max.replace(tzinfo=dt.UTC) - dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation of a job host did, for the caller to count and log once it has committed.

    `verdict` WAIT: still waiting; `announced`: this evaluation sent its job.waiting; `rerun`: the
    checks to run again now; `reason` and `detail` as stored with the decision."""

    job_id: str
    host_id: uuid.UUID
    verdict: Verdict
    rerun: list[uuid.UUID] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None
    announced: bool = False


def loggable_job_id(job_id: str) -> str:
    """The job_id for a log line: a valid one as it is; any other with every non-ASCII and control
    character escaped ("\\x00", "\\u0085", "\\ud800"; backslash as "\\\\") and cut to 200 characters,
    so that it can neither forge a log line nor flood the log."""
    if is_valid_job_id(job_id):
        return job_id
    return clip_detail(job_id.encode("unicode_escape").decode("ascii"), LOGGED_JOB_ID_LIMIT)


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
        storable_time(job.window_ends_at),
    )
    return bool(inserted)


def storable_time(moment: dt.datetime) -> dt.datetime:
    """`moment` (aware) as a timestamptz that asyncpg writes and reads back as itself: the two
    instants it maps to -infinity/infinity are moved one microsecond inward."""
    return min(max(moment, EARLIEST_STORED), LATEST_STORED)


def _aware(moment: dt.datetime) -> dt.datetime:
    """A timestamptz as read: asyncpg gives -infinity/infinity as naive datetime.min/max (UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


async def record_invalid_request(
    connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID, problem: str
) -> Evaluation | None:
    """Decide an invalid job.start as failed (invalid_request), unless the job host is known already.

    `job_id` is any non-empty string as received: it is recorded under `job_key(job_id)`, so that a
    repeat of the same message finds the row and decides nothing, while the job.failed event carries
    it unchanged, and so does the row (`received_job_id`, for the API, when it is not its own key).
    None when the job host had been recorded before (a repeat)."""
    now = dt.datetime.now(dt.UTC)
    detail = safe_detail(f"invalid job.start: {problem}")
    inserted = await connection.fetchval(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, decided_at, reason, detail, received_job_id)
        VALUES ($1, $2, 'failed', NULL, $3, 'invalid_request', $4, $5)
        ON CONFLICT (job_id, host_id) DO NOTHING
        RETURNING true
        """,
        job_key(job_id),
        host_id,
        now,
        detail,
        received_job_id_bytes(job_id),
    )
    if not inserted:
        return None
    event = JobFailed(job_id=job_id, host_id=host_id, failed_at=now, reason="invalid_request", detail=detail, checks=[])
    await _publish_decision(connection, "job.failed", event, job_id, host_id, now)
    return Evaluation(job_id, host_id, Verdict.INVALID_REQUEST, reason="invalid_request", detail=detail)


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
    connection: asyncpg.Connection,
    job: asyncpg.Record,
    *,
    retry_seconds: float,
    rerun_failing: bool,
    unknown_host: UnknownHostPolicy = "release",
) -> Evaluation:
    """Apply the rules to a locked waiting job host and act on the verdict, in the caller's transaction.

    `rerun_failing`: when the job must go on waiting, ask for its failing or stale checks to run again
    now (`shared.schedule.request_reruns`, in this transaction: the request commits with the
    evaluation or not at all, and needs no broker) and move its retry timer on (at start and on each
    retry, not on every result). `unknown_host`: HEALTHGATE_GATE_UNKNOWN_HOST.

    Every time it stamps (decision, job.waiting) is read after the row's lock is held (`locked_now`).
    A window_closed failure describes the checks as they were when the window closed (`window_closed`)."""
    now = await locked_now(connection)
    job_id, host_id = job["job_id"], job["host_id"]
    checks = await gating_checks(connection, host_id)
    window_ends_at = _aware(job["window_ends_at"])
    decision = decide(window_ends_at, now, checks, unknown_host=unknown_host)
    if decision.verdict is Verdict.RELEASE:
        detail = await _release(connection, job, decision, now)
        return Evaluation(job_id, host_id, Verdict.RELEASE, detail=detail)
    if decision.verdict is Verdict.WINDOW_CLOSED:
        decision = window_closed(await gating_checks_as_of(connection, checks or [], window_ends_at), window_ends_at)
        detail = decision.failure_detail(window_ends_at)
        await _fail(connection, job, "window_closed", detail, decision, now)
        return Evaluation(job_id, host_id, Verdict.WINDOW_CLOSED, reason="window_closed", detail=detail)
    if decision.verdict is Verdict.UNKNOWN_HOST:
        detail = (
            f"host {host_id} is not known to healthgate, and unknown hosts are failed "
            "(HEALTHGATE_GATE_UNKNOWN_HOST=fail)"
        )
        await _fail(connection, job, "unknown_host", detail, decision, now)
        return Evaluation(job_id, host_id, Verdict.UNKNOWN_HOST, reason="unknown_host", detail=detail)
    waiting_detail = "waiting for checks: " + ", ".join(check.name for check in decision.not_ready)
    if not job["waiting_announced"]:
        event = JobWaiting(
            job_id=job["job_id"],
            host_id=job["host_id"],
            window_ends_at=_aware(job["window_ends_at"]),
            failing_checks=[check.summary() for check in decision.not_ready],
        )
        await enqueue(
            connection, "job.waiting", event, source=EVENT_SOURCE, correlation_id=job["job_id"],
            event_id=deterministic_event_id("job-waiting", job["job_id"], str(job["host_id"])), time=now,
        )  # fmt: skip
    announced = not job["waiting_announced"]
    if not rerun_failing and not announced:
        return Evaluation(job_id, host_id, Verdict.WAIT, detail=waiting_detail)
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
    rerun = []
    if rerun_failing:
        rerun = [check.check_id for check in decision.not_ready]
        await request_reruns(connection, rerun, retry_seconds=retry_seconds)
    return Evaluation(job_id, host_id, Verdict.WAIT, rerun, detail=waiting_detail, announced=announced)


async def cancel(connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID) -> bool:
    """Cancel a waiting job host (job.cancel); False if it is already decided.

    A job.cancel may overtake its job.start: a job.start being handled when the database went away is
    handed back to the end of the queue (shared/consuming.py), behind a cancel sent after it. So a cancel
    for a job host the gate has not seen yet is recorded as that job host's decision (`cancelled`, with
    job.cancelled), and the job.start that follows is a duplicate: the job host is never released after
    its executor cancelled it."""
    if await lock_waiting(connection, job_id, host_id) is None:
        return await _cancel_before_start(connection, job_id, host_id)
    now = await locked_now(connection)
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


async def _cancel_before_start(connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID) -> bool:
    """Record a cancel that arrived before its job.start; False when the job host exists (decided)."""
    now = await locked_now(connection)
    inserted = await connection.fetchval(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at, detail)
        VALUES ($1, $2, 'cancelled', NULL, $3, $3, 'cancelled by job.cancel before its job.start arrived')
        ON CONFLICT (job_id, host_id) DO NOTHING
        RETURNING true
        """,
        job_id,
        host_id,
        now,
    )
    if inserted:
        event = JobCancelled(job_id=job_id, host_id=host_id, cancelled_at=now)
        await _publish_decision(connection, "job.cancelled", event, job_id, host_id, now)
    return bool(inserted)


async def _release(connection: asyncpg.Connection, job: asyncpg.Record, decision: Decision, now: dt.datetime) -> str:
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
    return detail


async def _fail(
    connection: asyncpg.Connection,
    job: asyncpg.Record,
    reason: Literal["window_closed", "unknown_host"],
    detail: str,
    decision: Decision,
    now: dt.datetime,
) -> None:
    if await _decide(connection, job, "failed", reason, detail, decision, now):
        event = JobFailed(
            job_id=job["job_id"],
            host_id=job["host_id"],
            failed_at=now,
            reason=reason,
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
