"""The gate's evaluation of a job host: the rules (shared/gate_rules.py) applied to a waiting row, and what
follows from the verdict. The rows are written by their owner, shared/jobs.py: every decision goes through
`shared.jobs.decide`, the one function the api's override calls too, so a job host is decided at most once
and its event commits with it.

An evaluation runs in the caller's transaction on a row it has locked, and stamps everything with the
database's clock read after that lock (`locked_now`); a job host that goes on waiting gets its job.waiting
once, its retry timer moved on, and a re-run of its failing checks (shared/schedule.py) in the same
transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

import asyncpg

from shared import gate_rules as rules
from shared.gate_rules import UnknownHostPolicy, Verdict
from shared import jobs
from shared.database import locked_now
from shared.details import clip_detail, safe_detail
from shared.events import CheckSummary, is_valid_job_id
from shared.gating import GatingCheck, gating_checks, gating_checks_as_of
from shared.jobs import JobDecision
from shared.schedule import request_reruns

EVENT_SOURCE = "/healthgate/gate"
LOGGED_JOB_ID_LIMIT = 200
CANCELLED = "cancelled by job.cancel"
CANCELLED_BEFORE_START = "cancelled by job.cancel before its job.start arrived"


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


def _summaries(checks: list[GatingCheck]) -> list[CheckSummary]:
    return [check.summary() for check in checks]


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
    decision = JobDecision(job_id, host_id, "failed", detail, reason="invalid_request", checks=[])
    if await jobs.decide(connection, decision, at=now, source=EVENT_SOURCE, unseen=True) is None:
        return None
    return Evaluation(job_id, host_id, Verdict.INVALID_REQUEST, reason="invalid_request", detail=detail)


async def evaluate_job_host(
    connection: asyncpg.Connection,
    job_id: str,
    host_id: uuid.UUID,
    *,
    retry_seconds: float,
    rerun_failing: bool,
    unknown_host: UnknownHostPolicy = "release",
) -> Evaluation | None:
    """Lock the job host if it is still waiting and evaluate it (`evaluate`), in the caller's transaction;
    None when it was decided meanwhile (a timer of another gate, an override, a cancel)."""
    row = await jobs.lock_waiting(connection, job_id, host_id)
    if row is None:
        return None
    return await evaluate(
        connection, row, retry_seconds=retry_seconds, rerun_failing=rerun_failing, unknown_host=unknown_host
    )


async def evaluate(
    connection: asyncpg.Connection,
    job: asyncpg.Record,
    *,
    retry_seconds: float,
    rerun_failing: bool,
    unknown_host: UnknownHostPolicy = "release",
) -> Evaluation:
    """Apply the rules to a locked waiting job host (`shared.jobs.LOCKED_COLUMNS`) and act on the verdict,
    in the caller's transaction.

    `rerun_failing`: when the job must go on waiting, ask for its failing or stale checks to run again
    now (`shared.schedule.request_reruns`, in this transaction: the request commits with the
    evaluation or not at all, and needs no broker) and move its retry timer on (at start and on each
    retry, not on every result). `unknown_host`: HEALTHGATE_GATE_UNKNOWN_HOST.

    Every time it stamps (decision, job.waiting) is read after the row's lock is held (`locked_now`).
    A window_closed failure describes the checks as they were when the window closed (`window_closed`)."""
    now = await locked_now(connection)
    job_id, host_id = job["job_id"], job["host_id"]
    checks = await gating_checks(connection, host_id)
    window_ends_at = jobs.aware(job["window_ends_at"])
    decision = rules.decide(window_ends_at, now, checks, unknown_host=unknown_host)
    if decision.verdict is Verdict.RELEASE:
        detail = "all gating checks healthy" if decision.checks else "no gating checks on this host"
        released = JobDecision(job_id, host_id, "released", detail, checks=_summaries(decision.checks))
        await jobs.decide(connection, released, at=now, source=EVENT_SOURCE)
        return Evaluation(job_id, host_id, Verdict.RELEASE, detail=detail)
    if decision.verdict is Verdict.WINDOW_CLOSED:
        then = await gating_checks_as_of(connection, checks or [], window_ends_at)
        decision = rules.window_closed(then, window_ends_at)
        detail = decision.failure_detail(window_ends_at)
        failed = JobDecision(
            job_id, host_id, "failed", detail, reason="window_closed", checks=_summaries(decision.checks)
        )
        await jobs.decide(connection, failed, at=now, source=EVENT_SOURCE)
        return Evaluation(job_id, host_id, Verdict.WINDOW_CLOSED, reason="window_closed", detail=detail)
    if decision.verdict is Verdict.UNKNOWN_HOST:
        detail = (
            f"host {host_id} is not known to healthgate, and unknown hosts are failed "
            "(HEALTHGATE_GATE_UNKNOWN_HOST=fail)"
        )
        failed = JobDecision(
            job_id, host_id, "failed", detail, reason="unknown_host", checks=_summaries(decision.checks)
        )
        await jobs.decide(connection, failed, at=now, source=EVENT_SOURCE)
        return Evaluation(job_id, host_id, Verdict.UNKNOWN_HOST, reason="unknown_host", detail=detail)
    waiting_detail = "waiting for checks: " + ", ".join(check.name for check in decision.not_ready)
    announced = await jobs.keep_waiting(
        connection, job, checks=_summaries(decision.checks), failing=_summaries(decision.not_ready),
        retry_in=retry_seconds if rerun_failing else None, at=now, source=EVENT_SOURCE,
    )  # fmt: skip
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
    waiting = await jobs.lock_waiting(connection, job_id, host_id)
    now = await locked_now(connection)
    if waiting is None:
        decision = JobDecision(job_id, host_id, "cancelled", CANCELLED_BEFORE_START)
        return await jobs.decide(connection, decision, at=now, source=EVENT_SOURCE, unseen=True) is not None
    decision = JobDecision(job_id, host_id, "cancelled", CANCELLED)
    return await jobs.decide(connection, decision, at=now, source=EVENT_SOURCE) is not None
