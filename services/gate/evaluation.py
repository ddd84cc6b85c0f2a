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
from shared import jobs
from shared.database import Connection, locked_now
from shared.details import clip_detail, safe_detail
from shared.events import CheckSummary, is_valid_job_id
from shared.gate_rules import UnknownHostPolicy, Verdict
from shared.gating import GatingCheck, gating_checks, gating_checks_as_of
from shared.group_policies import GroupPolicy
from shared.hosts import host_group
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
    connection: Connection, job_id: str, host_id: uuid.UUID, problem: str
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


@dataclass(frozen=True)
class Context:
    """What a job host is judged on besides its row, read by the caller: the time (`locked_now`, read after
    the row's lock), its gating checks (None: unknown host), its group and the group's policy, whether its
    job is halted, and the verdict of the group's release order (`rules.ReleaseOrder`, which judged it
    against the budget the job hosts before it left; None: judge it alone, without a budget)."""

    now: dt.datetime
    checks: list[GatingCheck] | None
    group: str | None = None
    policy: GroupPolicy = field(default_factory=GroupPolicy)
    halted: bool = False
    decision: rules.Decision | None = None


@dataclass(frozen=True)
class GroupPass:
    """What a release pass over a group did: its evaluations (in arrival order), the budget's `limit` (None:
    none) and the group's unavailable hosts after it (`in_use`; None when the pass found nothing to judge and
    did not count them)."""

    group: str
    limit: int | None
    in_use: int | None
    evaluations: list[Evaluation]


async def evaluate_job_host(
    connection: Connection,
    job_id: str,
    host_id: uuid.UUID,
    *,
    retry_seconds: float,
    rerun_failing: bool,
    unknown_host: UnknownHostPolicy = "release",
) -> Evaluation | None:
    """Evaluate the job host if it is still waiting, in the caller's transaction; None when it was decided
    meanwhile (a timer of another gate, an override, a cancel).

    A host of a group goes through its group's release pass (`release_pass`, the group's lock first), which
    judges this job host alone, or with a disruption budget every waiting job host of the group in arrival
    order (releasing the ready ones before it); this returns the evaluation of this job host.
    `rerun_failing` applies to an unknown host (in a pass, a job host whose retry is due has its failing
    checks run again, as a new one's is)."""
    group = await host_group(connection, host_id)
    if group is not None:
        passed = await release_pass(
            connection, group, host_ids=[host_id], job_id=job_id, retry_seconds=retry_seconds,
            unknown_host=unknown_host,
        )  # fmt: skip
        assert passed is not None  # it waits for the group's lock
        return next((item for item in passed.evaluations if item.job_id == job_id and item.host_id == host_id), None)
    row = await jobs.lock_waiting(connection, job_id, host_id)
    if row is None:
        return None
    return await evaluate(
        connection, row, retry_seconds=retry_seconds, rerun_failing=rerun_failing, unknown_host=unknown_host
    )


async def release_pass(
    connection: Connection,
    group: str,
    *,
    retry_seconds: float,
    unknown_host: UnknownHostPolicy = "release",
    host_ids: list[uuid.UUID] | None = None,
    job_id: str | None = None,
    wait: bool = True,
    wait_seconds: float | None = None,
) -> GroupPass | None:
    """The group's release pass (CONTRACT §6 "Disruption budget"), in the caller's transaction.

    Takes the group's advisory lock (`shared.jobs.lock_group`; with `wait` False only if it is free, else
    None; with `wait_seconds`, waiting that long at most, else asyncpg.LockNotAvailableError), reads the group's
    policy, and locks the waiting job hosts to judge in arrival order (received_at,
    job_id, host_id): with a budget (`max_unavailable`), every waiting job host of the group; without one,
    those of `host_ids` (and of the job `job_id`, its key, when given: a job.start judges its own job host,
    as without a budget nothing else changed), or with `host_ids` None those left waiting for a budget that
    is gone (a policy changed). It counts the group's
    unavailable hosts (released or verifying job hosts, unhealthy hosts; each host once) and evaluates each
    row (`evaluate`), releasing the ready ones in order while the budget allows: each release takes its
    host's unit for the rows after it; the others keep waiting with `waiting_for` and the detail naming the
    holders. A row whose retry is due (`next_retry_at`, or its window's end) has its failing checks run again
    and its timer moved on, as the timers do.

    The lock serialises every release of the group, however many gates run: the count read under it stays
    true until the pass commits (an override takes it too). Call it after anything that frees budget (a
    verification outcome, a cancel): in the freeing transaction after its change, or in a new one after it
    committed. Lock order: the group's lock first, never while holding a gate_jobs row of another group."""
    if not await jobs.lock_group(connection, group, wait=wait, wait_seconds=wait_seconds):
        return None
    policy, budget = await jobs.group_budget(connection, group)
    if budget is not None and budget.in_use >= budget.limit:
        # Full: no job host can take a unit, so only those whose host holds one already (a second job on a host
        # in patch) and those something happened to (`host_ids`: a job.start, a result, a timer) are judged.
        # Judging every waiting job host of a large group on every job.start and result made a campaign's
        # passes quadratic (bench/campaign.py).
        # Those whose window closes (its end, less the release cutoff) are judged too: they fail window_closed at
        # that moment, also when the cutoff came with a policy changed while they waited (no timer of theirs knew).
        rows = await jobs.lock_waiting_in_group(
            connection, group, host_ids=sorted(set(host_ids or ()) | set(budget.holders)),
            closing_within=float(policy.release_cutoff_seconds),
        )  # fmt: skip
    elif budget is not None:
        rows = await jobs.lock_waiting_in_group(connection, group)
    elif host_ids is not None:
        rows = await jobs.lock_waiting_in_group(connection, group, host_ids=host_ids, job_id=job_id)
    else:
        rows = await jobs.lock_waiting_in_group(connection, group, budget_only=True)
    limit = budget.limit if budget is not None else None
    if not rows:
        if budget is not None:
            await jobs.set_budget_waiting_detail(connection, group, rules.budget_waiting_detail(budget))
        return GroupPass(group, limit, budget.in_use if budget is not None else None, [])
    now = await locked_now(connection)
    order = rules.ReleaseOrder(now=now, policy=policy, budget=budget, unknown_host=unknown_host)
    evaluations = []
    triggered = set(host_ids) if host_ids is not None else set()
    for row, turn in zip(rows, await jobs.turns_of(connection, rows), strict=True):
        due = row["next_retry_at"] is None or jobs.aware(row["next_retry_at"]) <= now
        # Its first evaluation (never judged to wait: no job.waiting yet) is due whatever its timer says: a
        # job.start's timer is set 2 s on (shared/migrations/0016) only to keep the timers off a row its gate is
        # deciding, and that first wait still asks for its failing checks at once and starts its retry period.
        due = due or not row["waiting_announced"]
        due = due or rules.closes_at(jobs.aware(row["window_ends_at"]), policy) <= now
        if (
            order.budget is not None
            and not due
            and row["host_id"] not in triggered
            and _cannot_change(row, order.budget)
        ):
            # The budget filled up in this pass and nothing this row is judged on changed since it was last judged
            # (no result of its host, no timer): it keeps waiting as it is. Its detail names the holders, which
            # did change: that of every job host waiting for the budget alone is brought up to date below.
            continue
        context = Context(now, turn.checks, group, policy, turn.halted, order.judge(turn))
        evaluation = await evaluate(
            connection, row, retry_seconds=retry_seconds, rerun_failing=due, unknown_host=unknown_host,
            context=context,
        )  # fmt: skip
        evaluations.append(evaluation)
    if order.budget is not None:
        await jobs.set_budget_waiting_detail(connection, group, rules.budget_waiting_detail(order.budget))
    return GroupPass(group, limit, order.budget.in_use if order.budget is not None else None, evaluations)


def _cannot_change(row: asyncpg.Record, budget: rules.GroupBudget) -> bool:
    """Whether a waiting row that is not due and whose host had no result since it was last judged must keep
    waiting: the budget is full and its host is not counted in it already (a host in patch may take a second job)."""
    return budget.in_use >= budget.limit and row["host_id"] not in budget.holders


async def _context(connection: Connection, job: asyncpg.Record) -> Context:
    """The context of a job host judged alone (an unknown host, or a caller outside a pass)."""
    now = await locked_now(connection)
    checks = await gating_checks(connection, job["host_id"])
    halted = bool(await jobs.halted_jobs(connection, [job["job_id"]]))
    return Context(now, checks, halted=halted)


async def evaluate(
    connection: Connection,
    job: asyncpg.Record,
    *,
    retry_seconds: float,
    rerun_failing: bool,
    unknown_host: UnknownHostPolicy = "release",
    context: Context | None = None,
) -> Evaluation:
    """Apply the rules to a locked waiting job host (`shared.jobs.LOCKED_COLUMNS`) and act on the verdict,
    in the caller's transaction.

    `context`: what it is judged on (a release pass reads it for the whole group); None reads it for this
    job host alone, without policy or budget (an unknown host). `rerun_failing`: when the job must go on
    waiting, ask for its failing or stale checks to run again now (`shared.schedule.request_reruns`, in
    this transaction: the request commits with the evaluation or not at all, and needs no broker) and move
    its retry timer on (at start and on each retry, not on every result). The timer is brought forward to
    the release cutoff and to the moment its checks become stable, when these come sooner.
    `unknown_host`: HEALTHGATE_GATE_UNKNOWN_HOST.

    Every time it stamps (decision, job.waiting) is read after the row's lock is held (`locked_now`).
    A window_closed failure describes the checks as they were when the window closed (`window_closed`), or
    when the release cutoff passed."""
    context = context if context is not None else await _context(connection, job)
    now, checks, policy = context.now, context.checks, context.policy
    job_id, host_id = job["job_id"], job["host_id"]
    window_ends_at = jobs.aware(job["window_ends_at"])
    decision = context.decision
    if decision is None:  # judged alone: a release order of one, without a budget
        alone = rules.ReleaseOrder(now=now, policy=policy, budget=None, unknown_host=unknown_host)
        decision = alone.judge(jobs.turn_of(job, checks, halted=context.halted))
    if decision.verdict is Verdict.WINDOW_CLOSED:
        closed_at = rules.closes_at(window_ends_at, policy)
        then = await gating_checks_as_of(connection, checks or [], closed_at)
        # The budget is named only for a host whose last wait was for it: one whose checks got ready while the gate
        # was away, or whose job.start came after the close, never waited for a budget (it may be full now).
        waited_for_budget = "budget" in (job["waiting_for"] or ())
        decision = rules.window_closed(then, window_ends_at, policy, decision.budget if waited_for_budget else None)
    detail = decision.detail(
        job_id=job_id, host_id=host_id, group=context.group, window_ends_at=window_ends_at, now=now,
        received_at=jobs.aware(job["received_at"]),
    )  # fmt: skip
    final = _final(decision, job_id, host_id, detail)
    if final is not None:  # released; failed window_closed, job_halted, unknown_host, no_checks
        await jobs.decide(connection, final[0], at=now, source=EVENT_SOURCE)
        return final[1]
    waiting_detail = detail
    wake_at = rules.closes_at(window_ends_at, policy) if policy.release_cutoff_seconds > 0 else None
    stable_at = decision.stable_at()
    if stable_at is not None:
        wake_at = stable_at if wake_at is None else min(wake_at, stable_at)
    announced = await jobs.keep_waiting(
        connection, job, checks=_summaries(decision.checks), failing=_summaries(decision.not_ready),
        retry_in=retry_seconds if rerun_failing else None, at=now, source=EVENT_SOURCE,
        waiting_for=decision.waiting_for, detail=waiting_detail, wake_at=wake_at,
    )  # fmt: skip
    rerun = []
    if rerun_failing and decision.not_ready:
        rerun = [check.check_id for check in decision.not_ready]
        await request_reruns(connection, rerun, retry_seconds=retry_seconds)
    return Evaluation(job_id, host_id, Verdict.WAIT, rerun, detail=waiting_detail, announced=announced)


def _final(
    decision: rules.Decision, job_id: str, host_id: uuid.UUID, detail: str
) -> tuple[JobDecision, Evaluation] | None:
    """How a verdict that decides the job host is stored, and what the evaluation reports; None for WAIT."""
    if decision.verdict is Verdict.RELEASE:
        released = JobDecision(job_id, host_id, "released", detail, checks=_summaries(decision.checks))
        return released, Evaluation(job_id, host_id, Verdict.RELEASE, detail=detail)
    reason = decision.failure_reason
    if reason is None:
        return None
    failed = JobDecision(job_id, host_id, "failed", detail, reason=reason, checks=_summaries(decision.checks))
    return failed, Evaluation(job_id, host_id, Verdict(reason), reason=reason, detail=detail)


# What a job.start can be decided as at once, on the turn read with its insert (`decide_at_once`). A
# WINDOW_CLOSED failure describes the checks as they were when the window closed (another read): the release pass
# decides it, as every WAIT.
_AT_ONCE = frozenset({Verdict.RELEASE, Verdict.JOB_HALTED, Verdict.UNKNOWN_HOST, Verdict.NO_CHECKS})


async def decide_at_once(
    connection: Connection, started: jobs.StartedJobHost, *, unknown_host: UnknownHostPolicy = "release"
) -> Evaluation | None:
    """Decide a job host just recorded (`shared.jobs.record_start`, which read its turn) in one more round trip,
    outside a transaction: the common case of a job.start, whose host is healthy (issue 16: a release in at most
    three round trips, where the two-step path took about ten).

    The rules judge the turn as the group's release pass would (a release order of one: `record_start` read the
    turn as the pass reads it for a job host with none waiting before it); a verdict that decides the job host
    (`_AT_ONCE`) is written by `shared.jobs.decide_fast`, which writes nothing if the turn changed since, the
    verdict could have changed with time (`rules.holds_until`) or the job host was decided meanwhile. None when
    nothing was decided here: the caller runs the release pass (`release_pass`), which judges it again under the
    group's lock, and keeps it waiting when it must wait (its job.waiting, the re-run of its failing checks)."""
    if started.queued or started.group != started.locked_group:
        return None
    order = rules.ReleaseOrder(now=started.now, policy=started.policy, budget=started.budget, unknown_host=unknown_host)
    decision = order.judge(started.turn)
    if decision.verdict not in _AT_ONCE:
        return None
    turn = started.turn
    assert turn.job_id is not None and turn.window_ends_at is not None  # a job.start's
    detail = decision.detail(
        job_id=turn.job_id, host_id=turn.host_id, group=started.group, window_ends_at=turn.window_ends_at,
        now=started.now, received_at=started.now,
    )  # fmt: skip
    final = _final(decision, turn.job_id, turn.host_id, detail)
    assert final is not None  # every verdict of _AT_ONCE decides
    outcome = await jobs.decide_fast(
        connection, started, final[0], valid_until=rules.holds_until(decision, turn.window_ends_at),
        source=EVENT_SOURCE,
    )  # fmt: skip
    return final[1] if outcome == "decided" else None


async def cancel(connection: Connection, job_id: str, host_id: uuid.UUID) -> bool:
    """Cancel a waiting job host (job.cancel); False if it is already decided.

    A job.cancel may overtake its job.start: a job.start being handled when the database went away is
    handed back to the end of the queue (shared/consuming.py), behind a cancel sent after it. So a cancel
    for a job host the gate has not seen yet is recorded as that job host's decision (`cancelled`, with
    job.cancelled), and the job.start that follows is a duplicate: the job host is never released after
    its executor cancelled it.

    The job.start may also be handled at the same moment (the gate takes up to JOBS_PREFETCH messages at once):
    its row, not yet committed when this looked, makes the insert of the early cancel conflict once it commits.
    The row is then locked and cancelled as a waiting job host, unless it was decided meanwhile."""
    waiting = await jobs.lock_waiting(connection, job_id, host_id)
    now = await locked_now(connection)
    if waiting is None:
        decision = JobDecision(job_id, host_id, "cancelled", CANCELLED_BEFORE_START)
        if await jobs.decide(connection, decision, at=now, source=EVENT_SOURCE, unseen=True) is not None:
            return True
        # The job host exists: decided already, or recorded by a job.start whose insert committed while this
        # cancel's waited for it (each statement here reads what was committed before it started).
        if await jobs.lock_waiting(connection, job_id, host_id) is None:
            return False
        now = await locked_now(connection)
    decision = JobDecision(job_id, host_id, "cancelled", CANCELLED)
    return await jobs.decide(connection, decision, at=now, source=EVENT_SOURCE) is not None
