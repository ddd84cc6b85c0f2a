"""`gate_jobs`: one row per (job_id, host_id), decided at most once. This module is the only one that writes
the table (docs/architecture.md, "Who writes which table"), and it holds the reads of it too.

- the gate records a job.start as waiting, with its job, and reads its turn (`record_start`), decides it at once
  when it can (`decide_fast`), locks waiting rows to evaluate them
  (`lock_waiting`; a group's release pass: `lock_group`, then `lock_waiting_in_group`; the timers find due
  rows with `due_waiting`), keeps a row waiting with its
  job.waiting announced once and its retry timer moved on (`keep_waiting`), and decides;
- the api's override (and the dashboard's) locks the row (`lock_job_host`) and decides;
- the api and the dashboard list and show job hosts; the pruner deletes decided rows past their
  retention (`prune_decided`).

**Exactly one decision per job host.** `decide` and `decide_fast` are the only ways a job host is decided: the
gate's release and failures (window closed, unknown host), an invalid job.start, a job.cancel, and the api's
override call `decide`; a job.start whose host is ready when it arrives is decided by `decide_fast`. Both change a
row only while it is still waiting (the SQL function `gate_decide_waiting`: an UPDATE … WHERE status =
'waiting_health_check'; or for a job host not recorded yet an INSERT … ON CONFLICT DO NOTHING), and only when
they did, they write the decision's event to the outbox in the same transaction, under the one id every decider
uses (`shared.events.decision_event_id`). So a decision and its event commit together, and of two deciders
racing on one job host the second changes nothing and publishes nothing. The callers lock the row before
they read the time they stamp (`shared.database.locked_now`), so times follow the order of the changes;
`decide_fast` stamps the moment it judged, read under the group's lock, and writes only if nothing it judged
changed since.

Timers (retries, window ends) are columns of the row, so any gate process, including one started after a
crash, picks them up.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import asyncpg

from shared.database import Connection, delete_in_batches, locked_now
from shared.details import clip_detail
from shared.events import (
    CheckSummary,
    FailureReason,
    HaltReason,
    JobCancelled,
    JobFailed,
    JobHalted,
    JobReleased,
    JobResumed,
    JobStart,
    JobVerificationFailed,
    JobVerified,
    JobWaiting,
    WaitingFor,
    decision_event_id,
    deterministic_event_id,
    job_key,
    received_job_id,
    received_job_id_bytes,
)
from shared.gate_rules import GroupBudget, Holder, Turn
from shared.gating import GatingCheck, gating_check, gating_checks_of_hosts
from shared.group_policies import GroupPolicy, budget_limit, policy_from_row, policy_of
from shared.outbox import enqueue, outbox_row

JobStatus = Literal[
    "waiting_health_check", "released", "failed", "cancelled", "verifying", "verified", "verification_failed"
]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
WAITING: Final = "waiting_health_check"
DecidedStatus = Literal["released", "failed", "cancelled"]

# What the gate reads of a row it evaluates.
LOCKED_COLUMNS = (
    "job_id, host_id, status, window_ends_at, received_at, waiting_announced, waiting_for, detail, next_retry_at"
)
# What the api and the dashboard show of a job host (`received_job_id`: see `as_received`).
VIEW_COLUMNS = """
    j.job_id, j.host_id, j.status, j.window_ends_at, j.received_at, j.decided_at, j.reason, j.detail,
    j.checks, j.overridden_by, j.override_reason, j.received_job_id, j.waiting_for, j.finished_at, j.outcome,
    j.verified_at
"""
# Scoping: admins (groups None) see every job host; others those whose host is in one of their groups.
_VISIBLE = '($1::text[] IS NULL OR EXISTS (SELECT 1 FROM hosts h WHERE h.id = j.host_id AND h."group" = ANY($1)))'
_WITH_HOST_NAME = "SELECT j.*, h.name AS host_name FROM gate_jobs j LEFT JOIN hosts h ON h.id = j.host_id"
_HOST_VISIBLE = '($1::text[] IS NULL OR h."group" = ANY($1))'

# asyncpg stores exactly datetime.min and datetime.max (in UTC) as PostgreSQL's -infinity/infinity
# and reads those back as *naive* datetimes, which then cannot be compared with now (the timers would
# crash) nor shown as RFC 3339 with an offset. A window ending at either instant is stored one
# microsecond inside them: no decision changes by that.
EARLIEST_STORED = dt.datetime.min.replace(tzinfo=dt.UTC) + dt.timedelta(microseconds=1)
LATEST_STORED = dt.datetime.max.replace(tzinfo=dt.UTC) - dt.timedelta(microseconds=1)


def storable_time(moment: dt.datetime) -> dt.datetime:
    """`moment` (aware) as a timestamptz that asyncpg writes and reads back as itself: the two
    instants it maps to -infinity/infinity are moved one microsecond inward."""
    return min(max(moment, EARLIEST_STORED), LATEST_STORED)


def aware(moment: dt.datetime) -> dt.datetime:
    """A timestamptz as read: asyncpg gives -infinity/infinity as naive datetime.min/max (UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _checks_json(checks: list[CheckSummary] | None) -> str | None:
    return None if checks is None else json.dumps([check.model_dump(mode="json") for check in checks])


# ---- waiting ---------------------------------------------------------------------------------------


async def lock_waiting(connection: Connection, job_id: str, host_id: uuid.UUID) -> asyncpg.Record | None:
    """The job host (LOCKED_COLUMNS), locked, if it is still waiting; waits for whoever holds it."""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"""
        SELECT {LOCKED_COLUMNS} FROM gate_jobs
        WHERE job_id = $1 AND host_id = $2 AND status = 'waiting_health_check'
        FOR UPDATE
        """,
        job_id,
        host_id,
    )
    return row


async def lock_job_host(connection: Connection, key: str, host_id: uuid.UUID) -> str | None:
    """Lock the job host stored under `key` (`job_key` of its job_id), whatever its status, and return
    that status; None if there is no such job host."""
    status: str | None = await connection.fetchval(
        "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2 FOR UPDATE", key, host_id
    )
    return status


async def keep_waiting(
    connection: Connection,
    job: asyncpg.Record,
    *,
    checks: list[CheckSummary],
    failing: list[CheckSummary],
    retry_in: float | None,
    at: dt.datetime,
    source: str,
    waiting_for: list[WaitingFor] | None = None,
    detail: str | None = None,
    wake_at: dt.datetime | None = None,
) -> bool:
    """A locked waiting job host (`job`: LOCKED_COLUMNS) goes on waiting, in the caller's transaction.

    The first time, its job.waiting (`failing`: the checks it waits for; `waiting_for`: what it waits for,
    CONTRACT §6) goes to the outbox, stamped `at`, under a deterministic id (`job-waiting/<job_id>/<host_id>`).
    The row keeps `checks` as its snapshot, `waiting_for` and `detail` (what it waits for, in words: the
    budget's holders) as they are now, and with `retry_in` (seconds) its retry timer moves on from now;
    `wake_at` brings the timer forward to that moment if it is sooner (a release cutoff, the moment its checks
    become stable). Nothing is written when none of that changes. True if this call announced it."""
    announce = not job["waiting_announced"]
    waiting_for = waiting_for if waiting_for is not None else (["checks"] if failing else [])
    if announce:
        event = JobWaiting(
            job_id=job["job_id"], host_id=job["host_id"], window_ends_at=aware(job["window_ends_at"]),
            failing_checks=failing, waiting_for=waiting_for,
        )  # fmt: skip
        await enqueue(
            connection, "job.waiting", event, source=source, correlation_id=job["job_id"],
            event_id=deterministic_event_id("job-waiting", job["job_id"], str(job["host_id"])), time=at,
        )  # fmt: skip
    current_retry = job["next_retry_at"]
    sooner = wake_at is not None and (current_retry is None or wake_at < aware(current_retry))
    changed = list(job["waiting_for"]) != waiting_for or job["detail"] != detail
    if retry_in is None and not announce and not sooner and not changed:
        return False
    await connection.execute(
        """
        UPDATE gate_jobs
        SET waiting_announced = true,
            next_retry_at = LEAST(
                CASE WHEN $3 THEN now() + make_interval(secs => $4) ELSE next_retry_at END, $8::timestamptz
            ),
            checks = $5::jsonb,
            waiting_for = $6::text[],
            detail = $7
        WHERE job_id = $1 AND host_id = $2
        """,
        job["job_id"],
        job["host_id"],
        retry_in is not None,
        retry_in or 0.0,
        _checks_json(checks),
        waiting_for,
        detail,
        wake_at,
    )
    return announce


# ---- the decision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobDecision:
    """How one job host is decided.

    `job_id` as received, whatever it holds: the events carry it, and the row is keyed by `job_key(job_id)`
    (the job_id itself when it is valid). `reason`: a failure's (CONTRACT §5). `checks`: the gating checks
    the decision was made on, stored as the row's snapshot and carried by job.released and job.failed;
    None keeps the row's snapshot (a cancel). `overridden_by` and `override_reason`: an override's."""

    job_id: str
    host_id: uuid.UUID
    status: DecidedStatus
    detail: str
    reason: FailureReason | None = None
    checks: list[CheckSummary] | None = None
    overridden_by: str | None = None
    override_reason: str | None = None


# The row's change is the SQL function's (shared/migrations/0014), which the gate's fast release runs too.
_DECIDE_WAITING_SQL = f"SELECT {VIEW_COLUMNS} FROM gate_decide_waiting($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9) j"
_DECIDE_UNSEEN_SQL = f"""
INSERT INTO gate_jobs AS j (
    job_id, host_id, status, reason, detail, checks, decided_at, overridden_by, override_reason, window_ends_at,
    received_at, received_job_id
)
VALUES ($1, $2, $3, $4, $5, COALESCE($6::jsonb, '[]'::jsonb), $7, $8, $9, NULL, $7, $10)
ON CONFLICT (job_id, host_id) DO NOTHING
RETURNING {VIEW_COLUMNS}
"""


async def decide(
    connection: Connection, decision: JobDecision, *, at: dt.datetime, source: str, unseen: bool = False
) -> asyncpg.Record | None:
    """Decide a job host at `at`, with its event, in the caller's transaction; the row after (VIEW_COLUMNS),
    or None when it was decided already, by anyone (nothing is written then).

    `unseen` False: the job host is waiting (the caller holds its lock: `lock_waiting`, `lock_job_host`),
    and its row is updated if it still is. `unseen` True: the job host has not been recorded (an invalid
    job.start; a job.cancel that overtook its job.start): it is recorded decided, received at `at`, with
    the job_id as received beside its key (`received_job_id`), unless it exists; a waiting row is then
    left alone. The event (job.released, job.failed or job.cancelled) has the id `decision_event_id(job_id,
    host_id)`, the time `at` and the correlation_id `job_id` (where AMQP can carry it)."""
    key = job_key(decision.job_id)
    arguments: list[Any] = [
        key, decision.host_id, decision.status, decision.reason, decision.detail, _checks_json(decision.checks), at,
        decision.overridden_by, decision.override_reason,
    ]  # fmt: skip
    if unseen:
        row = await connection.fetchrow(_DECIDE_UNSEEN_SQL, *arguments, received_job_id_bytes(decision.job_id))
    else:
        row = await connection.fetchrow(_DECIDE_WAITING_SQL, *arguments)
    if row is None:
        return None
    await enqueue(
        connection, f"job.{decision.status}", _decision_event(decision, at, row["received_at"]), source=source,
        correlation_id=decision.job_id, event_id=decision_event_id(decision.job_id, decision.host_id), time=at,
    )  # fmt: skip
    return row


def _decision_event(
    decision: JobDecision, at: dt.datetime, received_at: dt.datetime
) -> JobReleased | JobFailed | JobCancelled:
    """The event of a decision made at `at` of a job host received at `received_at` (job.released's
    waited_seconds)."""
    override: dict[str, Any] = {}
    if decision.overridden_by is not None:
        override = {"overridden_by": decision.overridden_by, "override_reason": decision.override_reason}
    if decision.status == "released":
        return JobReleased(
            job_id=decision.job_id, host_id=decision.host_id, released_at=at,
            waited_seconds=round((at - received_at).total_seconds(), 3), checks=decision.checks or [], **override,
        )  # fmt: skip
    if decision.status == "failed":
        assert decision.reason is not None, "a failure has a reason"
        return JobFailed(
            job_id=decision.job_id, host_id=decision.host_id, failed_at=at, reason=decision.reason,
            detail=decision.detail, checks=decision.checks or [], **override,
        )  # fmt: skip
    return JobCancelled(job_id=decision.job_id, host_id=decision.host_id, cancelled_at=at)


# ---- a job.start decided at once (issue 16) --------------------------------------------------------------------


@dataclass(frozen=True)
class StartedJobHost:
    """A job.start recorded by `record_start`, with what its job host is judged on, read under its group's lock
    just after the insert (the SQL function `gate_turn`).

    `turn`: the job host as a turn of its group's release order (checks None: an unknown host); `group`: its
    host's group (None: unknown host); `policy` and `budget` (None: no `max_unavailable`) the group's; `queued`:
    another job host of the group waits before it, with a budget (it must be judged in the group's order);
    `locked_group`: the group whose lock the insert took (differs from `group` only when the host moved meanwhile);
    `now`: the database's clock read after the insert, under that lock; `received_at`: the row's;
    `fingerprint`: of the turn as read, for `decide_fast`."""

    turn: Turn
    group: str | None
    policy: GroupPolicy
    budget: GroupBudget | None
    queued: bool
    locked_group: str | None
    now: dt.datetime
    received_at: dt.datetime
    fingerprint: str


class TurnUnread(Exception):
    """`record_start` recorded the job.start (committed) but could not read the turn it returned: a migration
    changed a type the answer holds since the connection cached it (`gate_turn.policy` is a whole `group_policies`
    row, so a column added to that table changes it). asyncpg has dropped its cached types by then; the caller
    judges the job host through its group's release pass, which reads named columns."""


async def record_start(connection: Connection, job: JobStart) -> StartedJobHost | None:
    """Record a valid job.start and read its job host's turn, in ONE round trip (the SQL function
    `gate_record_start`; outside a transaction it is one of its own, committed when this returns).

    Under the host's group lock (`lock_group`), which the two-step path took in a transaction of five more round
    trips: the job (keyed by `job_key`), with `max_failed_hosts` if this is its first job.start to carry one (CONTRACT
    §6 "Halting a job": a later value never replaces it); the job host waiting, its first evaluation due at once (a
    gate that dies before deciding leaves it to the timers). Its `received_at` is the database's clock at the
    insert, under the group's lock: that orders the job hosts of a group as their inserts commit, so a release pass
    always sees a prefix of the arrival order (CONTRACT §6: FIFO). None when the job host existed already (a
    repeated job.start, or one decided before it came: an invalid request, an early job.cancel; nothing is written).
    Raises TurnUnread when the job host was recorded but its turn could not be decoded."""
    key = job_key(job.job_id)
    try:
        row = await connection.fetchrow(
            "SELECT * FROM gate_record_start($1, $2, $3, $4)",
            key,
            job.host_id,
            storable_time(job.window_ends_at),
            job.max_failed_hosts,
        )
    except asyncpg.OutdatedSchemaCacheError as exc:
        # Raised while decoding the answer, after the statement ran (and, autocommitted, committed): only a job host
        # just recorded has an answer to decode.
        raise TurnUnread(str(exc)) from exc
    if row is None:
        return None
    turn = row["turn"]
    group: str | None = turn["group"]
    policy = policy_from_row(turn["policy"])
    checks = None if group is None else [gating_check(check) for check in turn["checks"]]
    budget = budget_of(group, policy, turn["hosts"]) if group is not None and turn["hosts"] is not None else None
    return StartedJobHost(
        turn=Turn(job.job_id, job.host_id, aware(job.window_ends_at), checks, bool(turn["halted"])),
        group=group,
        policy=policy,
        budget=budget,
        queued=bool(turn["queued"]),
        locked_group=row["locked_group"],
        now=row["now"],
        received_at=row["received_at"],
        fingerprint=row["fingerprint"],
    )


FastOutcome = Literal["decided", "changed", "late", "not_waiting"]


async def decide_fast(
    connection: Connection,
    started: StartedJobHost,
    decision: JobDecision,
    *,
    valid_until: dt.datetime,
    source: str,
) -> FastOutcome:
    """Decide the job host `record_start` recorded, on the turn it read, with its event, in ONE round trip and its
    own transaction (the SQL function `gate_decide_fast`, autocommitted: call it outside a transaction).

    Under the host's group lock it reads the turn again, and writes the decision (as `decide` does) and its event
    (the outbox, through `outbox_enqueue`) only if the turn is unchanged, the database's clock is before
    `valid_until` (the first moment the verdict could change with time alone: the window closing, a result
    growing stale) and the job host is still waiting. The decision and the event are stamped `started.now`, the
    moment the verdict was judged. Returns "decided", or why nothing was written: "changed", "late",
    "not_waiting" (decided meanwhile, by a result's pass, a timer, an override, a cancel)."""
    at = started.now
    event = outbox_row(
        f"job.{decision.status}", _decision_event(decision, at, started.received_at), source=source,
        correlation_id=decision.job_id, event_id=decision_event_id(decision.job_id, decision.host_id), time=at,
    )  # fmt: skip
    outcome: FastOutcome = await connection.fetchval(
        "SELECT gate_decide_fast($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14)",
        job_key(decision.job_id),
        decision.host_id,
        started.fingerprint,
        valid_until,
        started.received_at,
        decision.status,
        decision.reason,
        decision.detail,
        _checks_json(decision.checks),
        at,
        *event.arguments(),
    )
    return outcome


# ---- the disruption budget: the release side (CONTRACT §6) ------------------------------------------
# A group's releases are serialised by a transaction-scoped advisory lock on the group, taken before any
# row of it is locked (lock order everywhere: group lock → jobs row → gate_jobs rows), so that the count of
# its unavailable hosts that a release pass reads stays true until the pass commits, however many gates run.

_GROUP_LOCK_KEY = "hashtextextended('healthgate.group:' || $1, 0)"


async def lock_group(
    connection: Connection, group: str, *, wait: bool = True, wait_seconds: float | None = None
) -> bool:
    """Take the group's advisory lock (exclusive) for the rest of the caller's transaction; with `wait` False only
    if it is free at once (False then: another transaction holds it, shared or exclusive). With `wait` and
    `wait_seconds`, wait that long at most: asyncpg.LockNotAvailableError then (PostgreSQL's lock_timeout), which
    aborts the caller's transaction; once it has the lock, the transaction's lock_timeout is what it was before.
    A waiting exclusive request queues ahead of shared requests made after it
    (PostgreSQL's lock manager), so it gets the lock once the holders of the moment commit."""
    if not wait:
        return bool(await connection.fetchval(f"SELECT pg_try_advisory_xact_lock({_GROUP_LOCK_KEY})", group))
    if wait_seconds is None:
        await connection.execute(f"SELECT pg_advisory_xact_lock({_GROUP_LOCK_KEY})", group)
        return True
    # The caller's own lock_timeout, restored after: DEFAULT would be the session's, not what its transaction set.
    before = await connection.fetchval("SELECT current_setting('lock_timeout')")
    await connection.execute("SELECT set_config('lock_timeout', $1, true)", f"{max(1, round(wait_seconds * 1000))}ms")
    await connection.execute(f"SELECT pg_advisory_xact_lock({_GROUP_LOCK_KEY})", group)
    await connection.execute("SELECT set_config('lock_timeout', $1, true)", before)
    return True


async def lock_waiting_in_group(
    connection: Connection,
    group: str,
    *,
    host_ids: list[uuid.UUID] | None = None,
    job_id: str | None = None,
    budget_only: bool = False,
    closing_within: float | None = None,
) -> list[asyncpg.Record]:
    """The waiting job hosts (LOCKED_COLUMNS) of the group's hosts, locked, in the order their job.start
    arrived (received_at, job_id, host_id); with `host_ids` only those hosts' and, with `closing_within`
    (seconds: the group's release cutoff), those whose window ends within that of now too (their cutoff has come);
    with `job_id` only that job's (its key), with `budget_only` only those waiting for the budget. The caller
    holds the group's lock (`lock_group`)."""
    return await _waiting_in_group(
        connection, group, host_ids=host_ids, job_id=job_id, budget_only=budget_only, lock=True,
        closing_within=closing_within,
    )  # fmt: skip


async def waiting_in_group(connection: Connection, group: str) -> list[asyncpg.Record]:
    """Every waiting job host (LOCKED_COLUMNS) of the group's hosts in arrival order, as a release pass with a
    budget judges them (`lock_waiting_in_group`), read without locking anything: the API's preview, which
    judges them as the gate would, in a read-only snapshot."""
    return await _waiting_in_group(connection, group, host_ids=None, job_id=None, budget_only=False, lock=False)


async def _waiting_in_group(
    connection: Connection,
    group: str,
    *,
    host_ids: list[uuid.UUID] | None,
    job_id: str | None,
    budget_only: bool,
    lock: bool,
    closing_within: float | None = None,
) -> list[asyncpg.Record]:
    conditions = ["j.status = 'waiting_health_check'", 'j.host_id IN (SELECT id FROM hosts WHERE "group" = $1)']
    arguments: list[Any] = [group]
    if host_ids is not None:
        arguments.append(host_ids)
        chosen = f"j.host_id = ANY(${len(arguments)}::uuid[])"
        if closing_within is not None:
            arguments.append(closing_within)
            chosen += f" OR j.window_ends_at <= clock_timestamp() + make_interval(secs => ${len(arguments)})"
        conditions.append(f"({chosen})")
    if job_id is not None:
        arguments.append(job_id)
        conditions.append(f"j.job_id = ${len(arguments)}")
    if budget_only:
        conditions.append("'budget' = ANY(j.waiting_for)")
    return await connection.fetch(
        f"""
        SELECT {", ".join("j." + column.strip() for column in LOCKED_COLUMNS.split(","))}
        FROM gate_jobs j
        WHERE {" AND ".join(conditions)}
        ORDER BY j.received_at, j.job_id, j.host_id
        {"FOR UPDATE" if lock else ""}
        """,
        *arguments,
    )


async def set_budget_waiting_detail(connection: Connection, group: str, detail: str) -> None:
    """Set the detail of the group's waiting job hosts that wait for the budget alone (`waiting_for` budget):
    it names the group's holders (CONTRACT §6), the same for each. The caller holds the group's lock; rows whose
    detail is that already are not written. A row another transaction holds is skipped (SKIP LOCKED): it is being
    decided (a halt, a cancel, an override), and waiting here, with some of the group's rows locked already in
    another order, could deadlock with it."""
    await connection.execute(
        """
        UPDATE gate_jobs j SET detail = $2
        FROM (
            SELECT job_id, host_id FROM gate_jobs
            WHERE status = 'waiting_health_check' AND host_id IN (SELECT id FROM hosts WHERE "group" = $1)
              AND waiting_for = '{budget}' AND detail IS DISTINCT FROM $2
            ORDER BY received_at, job_id, host_id
            FOR UPDATE SKIP LOCKED
        ) s
        WHERE j.job_id = s.job_id AND j.host_id = s.host_id
        """,
        group,
        detail,
    )


def turn_of(row: asyncpg.Record, checks: list[GatingCheck] | None, *, halted: bool) -> Turn:
    """A waiting job host (LOCKED_COLUMNS) as a turn of its group's release order (`shared.gate_rules.ReleaseOrder`),
    with its host's gating checks (None: an unknown host) and whether its job is halted."""
    return Turn(row["job_id"], row["host_id"], aware(row["window_ends_at"]), checks, halted)


async def turns_of(connection: Connection, rows: Sequence[asyncpg.Record]) -> list[Turn]:
    """The waiting job hosts `rows` (LOCKED_COLUMNS, in their order) as turns of their group's release order, each
    with its host's gating checks and its job's halt state, read in two statements: what the gate's release pass
    and the API's preview judge them on."""
    halted = await halted_jobs(connection, sorted({row["job_id"] for row in rows}))
    checks = await gating_checks_of_hosts(connection, sorted({row["host_id"] for row in rows}))
    return [turn_of(row, checks.get(row["host_id"]), halted=row["job_id"] in halted) for row in rows]


async def group_hosts(connection: Connection, group: str) -> list[asyncpg.Record]:
    """Every host of the group with what makes it unavailable (CONTRACT §6): `host_id`, `name`, `unhealthy`
    (its health_check_status) and `patching_job`, the earliest (by decision) of its job hosts released or
    verifying, NULL when none is."""
    return await connection.fetch("SELECT * FROM gate_group_hosts($1)", group)


async def group_budget(connection: Connection, group: str) -> tuple[GroupPolicy, GroupBudget | None]:
    """The group's policy and its disruption budget now (None when it has no `max_unavailable`): the limit for
    its hosts_total and its unavailable hosts, as the gate's release pass, the override and the preview judge
    it. Consistent with the gate's releases only under the group's lock (`lock_group`)."""
    policy = await policy_of(connection, group)
    if policy.max_unavailable is None:
        return policy, None
    return policy, budget_of(group, policy, await group_hosts(connection, group))


def budget_of(group: str, policy: GroupPolicy, hosts: Sequence[asyncpg.Record]) -> GroupBudget | None:
    """The group's disruption budget from its policy and its hosts (`group_hosts` rows, or `gate_turn.hosts`);
    None when the policy has no `max_unavailable`."""
    limit = budget_limit(policy, len(hosts))
    if limit is None:
        return None
    holders = {
        row["host_id"]: Holder(row["host_id"], row["name"], row["patching_job"], bool(row["unhealthy"]))
        for row in hosts
        if row["patching_job"] is not None or row["unhealthy"]
    }
    return GroupBudget(group, limit, holders, {row["host_id"]: row["name"] for row in hosts})


async def halted_jobs(connection: Connection, job_ids: list[str]) -> set[str]:
    """Which of `job_ids` (keys, as gate_jobs stores them) are halted now."""
    rows = await connection.fetch(
        "SELECT job_id FROM jobs WHERE job_id = ANY($1::text[]) AND halted_at IS NOT NULL", job_ids
    )
    return {row["job_id"] for row in rows}


async def due_waiting(connection: Connection, limit: int) -> list[asyncpg.Record]:
    """Waiting job hosts whose retry or window end has come, soonest first, not locked: `job_id`, `host_id`
    and the host's `group` (NULL for an unknown host). The timers run a release pass for each group among
    them (a pass locks the group first, then its rows), and evaluate those of unknown hosts alone."""
    return await connection.fetch(
        """
        SELECT j.job_id, j.host_id, h."group"
        FROM gate_jobs j LEFT JOIN hosts h ON h.id = j.host_id
        WHERE j.status = 'waiting_health_check' AND (j.next_retry_at <= now() OR j.window_ends_at <= now())
        ORDER BY LEAST(j.next_retry_at, j.window_ends_at)
        LIMIT $1
        """,
        limit,
    )


async def groups_waiting_for_budget(connection: Connection, limit: int, *, after: str | None = None) -> list[str]:
    """Groups with a job host waiting for the budget, by name, the first `limit` after `after` (None: from the
    start): the gate passes over them every second or so, so that budget freed without an event of the gate's own
    (a policy raised, a host deleted) is used soon. In name order from a cursor, so that a sweep that takes `limit`
    at a time goes round every such group; unordered, the same `limit` came back each time while they waited."""
    rows = await connection.fetch(
        """
        SELECT DISTINCT h."group" FROM gate_jobs j JOIN hosts h ON h.id = j.host_id
        WHERE j.status = 'waiting_health_check' AND 'budget' = ANY(j.waiting_for)
          AND ($2::text IS NULL OR h."group" > $2)
        ORDER BY h."group"
        LIMIT $1
        """,
        limit,
        after,
    )
    return [row["group"] for row in rows]


async def budget_usage(connection: Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    """Each group with hosts: `group`, `hosts_total` and `in_use` (its unavailable hosts, CONTRACT §6)."""
    return await connection.fetch(
        """
        SELECT h."group", count(*) AS hosts_total,
               count(*) FILTER (WHERE h.health_check_status = 'unhealthy' OR EXISTS (
                   SELECT 1 FROM gate_jobs j WHERE j.host_id = h.id AND j.status IN ('released', 'verifying')
               )) AS in_use
        FROM hosts h
        GROUP BY h."group"
        """
    )


# ---- reads -----------------------------------------------------------------------------------------


def as_received(row: asyncpg.Record) -> dict[str, Any]:
    """A job host row as shown: its fields, with `job_id` the one received (`received_job_id` taken out),
    not the key an invalid one is stored under (migration 0009)."""
    values = dict(row)
    values["job_id"] = received_job_id(values["job_id"], values.pop("received_job_id"))
    return values


async def groups_of_job(connection: Connection | asyncpg.Pool, job_id: str) -> list[str]:
    """The groups of the hosts of the job (as received: its key is looked up), sorted; unknown hosts count for
    none (the notifier matches job.halted and job.resumed, which name no host, by these)."""
    rows = await connection.fetch(
        """
        SELECT DISTINCT h."group" FROM gate_jobs j JOIN hosts h ON h.id = j.host_id
        WHERE j.job_id = $1 ORDER BY h."group"
        """,
        job_key(job_id),
    )
    return [row["group"] for row in rows]


async def job_hosts_of_job(pool: asyncpg.Pool, key: str, groups: list[str] | None) -> list[asyncpg.Record]:
    """The hosts (VIEW_COLUMNS) of the job stored under `key`, in `groups` (None: all), oldest first."""
    return await pool.fetch(
        f"SELECT {VIEW_COLUMNS} FROM gate_jobs j WHERE j.job_id = $2 AND {_VISIBLE} ORDER BY j.received_at, j.host_id",
        groups,
        key,
    )


async def job_host_page(
    pool: asyncpg.Pool,
    *,
    groups: list[str] | None,
    status: str | None,
    host_id: uuid.UUID | None,
    after: tuple[dt.datetime, str, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` job hosts (VIEW_COLUMNS) of `groups` (None: all), newest first, optionally of one
    status and one host, after the key (received_at, job_id, host_id) of the previous page's last row.

    All three descending: a total order (the primary key is in it), so pages never repeat or skip a row,
    whatever the filters. Only the conditions in use are in the statement, so that each filter gets its
    index (shared/migrations/0007_job_filters.sql) in a prepared, generic plan too."""
    conditions: list[str] = []
    values: list[Any] = []

    def value(item: Any) -> str:
        values.append(item)
        return f"${len(values)}"

    if groups is not None:
        conditions.append(f'EXISTS (SELECT 1 FROM hosts h WHERE h.id = j.host_id AND h."group" = ANY({value(groups)}))')
    if status is not None:
        conditions.append(f"j.status = {value(status)}")
    if host_id is not None:
        conditions.append(f"j.host_id = {value(host_id)}")
    if after is not None:
        received_at, job_id, after_host_id = after
        conditions.append(
            f"(j.received_at, j.job_id, j.host_id) < ({value(received_at)}, {value(job_id)}, {value(after_host_id)})"
        )
    where = " AND ".join(conditions) or "true"
    return await pool.fetch(
        f"""
        SELECT {VIEW_COLUMNS} FROM gate_jobs j
        WHERE {where}
        ORDER BY j.received_at DESC, j.job_id DESC, j.host_id DESC
        LIMIT {value(limit)}
        """,
        *values,
    )


async def job_hosts_with_host_names(
    connection: Connection, groups: list[str] | None, *, waiting: bool, limit: int
) -> list[asyncpg.Record]:
    """For the dashboard's jobs page: up to `limit` job hosts of `groups` (None: all), every column and the
    host's name (`host_name`, NULL for an unknown host); the waiting ones by window end, soonest first, or
    the decided ones, newest decision first."""
    order = "j.window_ends_at" if waiting else "j.decided_at DESC"
    condition = f"j.status = '{WAITING}'" if waiting else f"j.status <> '{WAITING}'"
    return await connection.fetch(
        f"{_WITH_HOST_NAME} WHERE {condition} AND {_HOST_VISIBLE} ORDER BY {order} LIMIT {int(limit)}", groups
    )


async def job_with_host_names(connection: Connection, key: str, groups: list[str] | None) -> list[asyncpg.Record]:
    """For the dashboard's job page: the hosts of the job stored under `key`, in `groups`, every column and
    the host's name, oldest first."""
    return await connection.fetch(
        f"{_WITH_HOST_NAME} WHERE j.job_id = $2 AND {_HOST_VISIBLE} ORDER BY j.received_at, j.host_id", groups, key
    )


# ---- pruning ---------------------------------------------------------------------------------------


# A job host in one of these states changes no more: only these are pruned. A released or verifying one is
# in patch (CONTRACT §6), whatever its age: it holds its group's budget and awaits its verification outcome.
FINAL_STATUSES: Final = ("failed", "cancelled", "verified", "verification_failed")
_FINAL_LIST = ", ".join(f"'{status}'" for status in FINAL_STATUSES)


async def prune_decided(pool: asyncpg.Pool, before: dt.datetime) -> int:
    """Delete the job hosts in a final status (`FINAL_STATUSES`) whose last change (the verification outcome,
    else the decision) came before `before` (the pruner: HEALTHGATE_JOB_RETENTION_DAYS), in batches; waiting,
    released and verifying ones are never deleted. Returns how many were deleted."""
    return await delete_in_batches(
        pool,
        "DELETE FROM gate_jobs WHERE (job_id, host_id) IN ("
        f"SELECT job_id, host_id FROM gate_jobs WHERE status IN ({_FINAL_LIST}) "
        "AND COALESCE(verified_at, decided_at) < $1 LIMIT $2)",
        before,
    )


async def prune_jobs(pool: asyncpg.Pool, before: dt.datetime) -> int:
    """Delete the jobs (`jobs` rows: max_failed_hosts and halt state) created before `before` that have no job
    host left (the pruner, after `prune_decided`, with the same HEALTHGATE_JOB_RETENTION_DAYS), in batches;
    returns how many were deleted. A job with any job host keeps its row, so a job in progress never loses its
    max_failed_hosts or its halt. A row a job.start holds locked (recording its job) is skipped (SKIP LOCKED);
    a job.start of a job pruned already records it anew, without its old halt."""
    return await delete_in_batches(
        pool,
        "DELETE FROM jobs WHERE job_id IN ("
        "SELECT job_id FROM jobs j WHERE j.created_at < $1 "
        "AND NOT EXISTS (SELECT 1 FROM gate_jobs g WHERE g.job_id = j.job_id) "
        "LIMIT $2 FOR UPDATE SKIP LOCKED)",
        before,
    )


# ---- verification after patching (CONTRACT §6) -----------------------------------------------------
# A released job host is in patch until its verification outcome: released → verifying (job.finished, or the
# window's end without one) → verified | verification_failed, exactly once, like a decision: the outcome is an
# UPDATE … WHERE status = 'verifying' and its event goes to the outbox in the same transaction, under one id
# (`verification_event_id`), so of two gates racing on a job host (a crash, a timer and a wake-up) the second
# changes nothing and publishes nothing. The timer (`next_retry_at`) is a column, as for waiting rows.

# What the gate reads of a job host it verifies, and its host's group (NULL for an unknown host). A scalar
# subquery rather than a join: FOR UPDATE then locks the job host alone, never the host row the pollers lock.
VERIFY_COLUMNS = """
    j.job_id, j.host_id, j.status, j.window_ends_at, j.finished_at, j.outcome, j.verify_from_at,
    j.verify_deadline_at, j.release_checks, (SELECT h."group" FROM hosts h WHERE h.id = j.host_id) AS "group"
"""


def verification_event_id(job_id: str, host_id: uuid.UUID) -> uuid.UUID:
    """The id of a job host's verification outcome (job.verified or job.verification_failed): one outcome per
    job host, whichever gate publishes it."""
    return deterministic_event_id("job-verification", job_id, str(host_id))


def release_checks_of(row: asyncpg.Record) -> list[CheckSummary] | None:
    """The gating checks a job host was released on (`release_checks`), None when they were not recorded (a job
    host released before migration 0010)."""
    value = row["release_checks"]
    if value is None:
        return None
    items = json.loads(value) if isinstance(value, str) else value
    return [CheckSummary.model_validate(item) for item in items]


async def lock_for_finish(connection: Connection, key: str, host_id: uuid.UUID) -> asyncpg.Record | None:
    """The job host stored under `key` (VERIFY_COLUMNS), locked, whatever its status; None if there is none."""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"SELECT {VERIFY_COLUMNS} FROM gate_jobs j WHERE j.job_id = $1 AND j.host_id = $2 FOR UPDATE", key, host_id
    )
    return row


async def job_host_status(connection: Connection, key: str, host_id: uuid.UUID) -> str | None:
    """The status of the job host stored under `key`, read without a lock; None if there is no such job host."""
    status: str | None = await connection.fetchval(
        "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2", key, host_id
    )
    return status


async def lock_verifying(connection: Connection, key: str, host_id: uuid.UUID) -> asyncpg.Record | None:
    """The job host (VERIFY_COLUMNS), locked, if it is still verifying; waits for whoever holds it."""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"""
        SELECT {VERIFY_COLUMNS} FROM gate_jobs j
        WHERE j.job_id = $1 AND j.host_id = $2 AND j.status = 'verifying'
        FOR UPDATE
        """,
        key,
        host_id,
    )
    return row


async def lock_verifying_on_host(connection: Connection, host_id: uuid.UUID) -> list[asyncpg.Record]:
    """The host's verifying job hosts (VERIFY_COLUMNS), locked in job order (a healthy result wakes them)."""
    return await connection.fetch(
        f"""
        SELECT {VERIFY_COLUMNS} FROM gate_jobs j
        WHERE j.host_id = $1 AND j.status = 'verifying'
        ORDER BY j.job_id
        FOR UPDATE
        """,
        host_id,
    )


async def lock_due_verifications(connection: Connection, limit: int) -> list[asyncpg.Record]:
    """Verifying job hosts whose timer came (a retry, the end of the delay, the deadline: `next_retry_at` is
    never later than `verify_deadline_at`), locked; other gates take the others (SKIP LOCKED)."""
    return await connection.fetch(
        f"""
        SELECT {VERIFY_COLUMNS} FROM gate_jobs j
        WHERE j.status = 'verifying' AND j.next_retry_at <= now()
        ORDER BY j.next_retry_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )


async def lock_ended_windows(connection: Connection, limit: int) -> list[asyncpg.Record]:
    """Released job hosts whose window ended without a job.finished (VERIFY_COLUMNS), locked; other gates take
    the others (SKIP LOCKED). Found after the fact too, when no gate ran at the window's end."""
    return await connection.fetch(
        f"""
        SELECT {VERIFY_COLUMNS} FROM gate_jobs j
        WHERE j.status = 'released' AND j.window_ends_at <= now()
        ORDER BY j.window_ends_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
        """,
        limit,
    )


async def start_verifying(
    connection: Connection,
    key: str,
    host_id: uuid.UUID,
    *,
    finished_at: dt.datetime,
    outcome: Literal["succeeded", "failed"] | None,
    detail: str,
    delay_seconds: int,
    timeout_seconds: int,
) -> asyncpg.Record | None:
    """A released job host (locked by the caller) starts verifying, in the caller's transaction: `finished_at`
    and the executor's `outcome` (None when the window ended without job.finished) are recorded,
    `verify_from_at` = finished_at + `delay_seconds`, `verify_deadline_at` = verify_from_at + `timeout_seconds`
    (the group's verify_delay_seconds and verify_timeout_seconds, fixed now), and its timer is set to
    verify_from_at. The row after (VERIFY_COLUMNS), or None when it is not released (nothing written)."""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"""
        UPDATE gate_jobs j
        SET status = 'verifying', finished_at = $3::timestamptz, outcome = $4, detail = $5,
            verify_from_at = $3::timestamptz + make_interval(secs => $6),
            verify_deadline_at = $3::timestamptz + make_interval(secs => $6 + $7),
            next_retry_at = $3::timestamptz + make_interval(secs => $6)
        WHERE j.job_id = $1 AND j.host_id = $2 AND j.status = 'released'
        RETURNING {VERIFY_COLUMNS}
        """,
        key,
        host_id,
        finished_at,
        outcome,
        detail,
        float(delay_seconds),
        float(timeout_seconds),
    )
    return row


async def keep_verifying(
    connection: Connection, key: str, host_id: uuid.UUID, *, next_at: dt.datetime, sooner_only: bool = False
) -> None:
    """Set a verifying job host's timer to `next_at` (never past its deadline), in the caller's transaction, which
    holds the row. `sooner_only`: only move it earlier (a wake-up that found a check to become stable sooner)."""
    await connection.execute(
        """
        UPDATE gate_jobs
        SET next_retry_at = CASE WHEN $4 THEN LEAST(next_retry_at, $3, verify_deadline_at)
                                 ELSE LEAST($3, verify_deadline_at) END
        WHERE job_id = $1 AND host_id = $2 AND status = 'verifying'
        """,
        key,
        host_id,
        next_at,
        sooner_only,
    )


@dataclass(frozen=True)
class VerificationOutcome:
    """A verifying job host's outcome. `job_id` as received (a verifying job_id is always valid: its own key);
    `verified`: job.verified, else job.verification_failed; `checks`: the host's gating checks now."""

    job_id: str
    host_id: uuid.UUID
    verified: bool
    detail: str
    checks: list[CheckSummary]


_CONCLUDE_SQL = f"""
UPDATE gate_jobs j
SET status = $3, detail = $4, checks = $5::jsonb, verified_at = $6, next_retry_at = NULL
WHERE j.job_id = $1 AND j.host_id = $2 AND j.status = 'verifying'
RETURNING {VIEW_COLUMNS}, (SELECT h."group" FROM hosts h WHERE h.id = j.host_id) AS "group"
"""


async def conclude_verification(
    connection: Connection, outcome: VerificationOutcome, *, at: dt.datetime, source: str
) -> asyncpg.Record | None:
    """Record a verifying job host's outcome at `at` with its event, in the caller's transaction (which holds the
    row, and read `at` after locking it); the row after (VIEW_COLUMNS and `group`), or None when it was not
    verifying any more (nothing written, nothing published). `verified_at` is the outcome's time, either way.

    The event, job.verified or job.verification_failed, has the id `verification_event_id(job_id, host_id)`, the
    time `at`, the correlation_id `job_id`, and carries the executor's `outcome` (null without job.finished)."""
    status = "verified" if outcome.verified else "verification_failed"
    row = await connection.fetchrow(
        _CONCLUDE_SQL, job_key(outcome.job_id), outcome.host_id, status, outcome.detail,
        _checks_json(outcome.checks), at,
    )  # fmt: skip
    if row is None:
        return None
    event: JobVerified | JobVerificationFailed
    if outcome.verified:
        event = JobVerified(
            job_id=outcome.job_id, host_id=outcome.host_id, verified_at=at, outcome=row["outcome"],
            checks=outcome.checks,
        )  # fmt: skip
    else:
        event = JobVerificationFailed(
            job_id=outcome.job_id, host_id=outcome.host_id, failed_at=at, outcome=row["outcome"],
            detail=outcome.detail, checks=outcome.checks,
        )  # fmt: skip
    await enqueue(
        connection, f"job.{status}", event, source=source, correlation_id=outcome.job_id,
        event_id=verification_event_id(outcome.job_id, outcome.host_id), time=at,
    )  # fmt: skip
    return row


# ---- halting a job (CONTRACT §6) -------------------------------------------------------------------
# A job fails a host on job.finished with outcome failed or on job.verification_failed; when more hosts failed
# than its max_failed_hosts, it halts once: job.halted, and each of its waiting job hosts fails job_halted.
# Lock order: the jobs row (`lock_job`) before any of the job's gate_jobs rows, in every writer; the count of
# failed hosts is read under that lock, so two failures committing at once are counted by the second.

JOB_COLUMNS = "job_id, max_failed_hosts, created_at, halted_at, halt_reason, halt_detail, halted_by, halt_count"


async def lock_job(connection: Connection, key: str) -> asyncpg.Record:
    """The job stored under `key` (JOB_COLUMNS), locked; recorded first (without max_failed_hosts) when it is
    not: a job whose hosts came before migration 0010."""
    await connection.execute("INSERT INTO jobs (job_id) VALUES ($1) ON CONFLICT (job_id) DO NOTHING", key)
    row: asyncpg.Record | None = await connection.fetchrow(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1 FOR UPDATE", key
    )
    assert row is not None  # inserted above, and jobs rows are never deleted
    return row


async def job_of(connection: Connection | asyncpg.Pool, key: str) -> asyncpg.Record | None:
    """The job stored under `key` (JOB_COLUMNS), None when there is no such row."""
    row: asyncpg.Record | None = await connection.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1", key)
    return row


async def failed_hosts(connection: Connection, key: str) -> list[uuid.UUID]:
    """The hosts the job failed (CONTRACT §6): job.finished with outcome failed, or verification_failed."""
    rows = await connection.fetch(
        """
        SELECT host_id FROM gate_jobs
        WHERE job_id = $1 AND (outcome = 'failed' OR status = 'verification_failed')
        ORDER BY host_id
        """,
        key,
    )
    return [row["host_id"] for row in rows]


@dataclass(frozen=True)
class Halt:
    """A halt that happened: the job after (JOB_COLUMNS), the hosts it had failed, and the waiting job hosts
    this halt failed (reason job_halted)."""

    job: asyncpg.Record
    failed_hosts: list[uuid.UUID]
    failed_waiting: list[uuid.UUID]


def _summaries_of(value: Any) -> list[CheckSummary]:
    items = json.loads(value) if isinstance(value, str) else (value or [])
    return [CheckSummary.model_validate(item) for item in items]


async def halt_job(
    connection: Connection, job_id: str, *, reason: HaltReason, detail: str, by: str | None, source: str
) -> Halt | None:
    """Halt the job (the caller holds `lock_job`), in the caller's transaction; None when it is halted already.

    Its waiting job hosts are locked (after the job, in arrival order: the lock order), the time read after that
    (`locked_now`), the job marked halted (`halt_count` + 1), job.halted put in the outbox (id
    `job-halted/<job_id>/<halt_count>`: once per halt), and each waiting job host decided failed with reason
    job_halted through `decide` (its snapshot of checks kept). `by`: the admin's token name for a manual halt,
    else None."""
    key = job_key(job_id)
    # Locked in arrival order, the order in which a release pass locks a group's waiting job hosts
    # (`lock_waiting_in_group`): locked by host_id, a halt and a pass holding some of the job's rows each waited for
    # the other's (a deadlock: the pass's gate or the admin's halt failed).
    waiting = await connection.fetch(
        "SELECT host_id, checks FROM gate_jobs WHERE job_id = $1 AND status = 'waiting_health_check' "
        "ORDER BY received_at, job_id, host_id FOR UPDATE",
        key,
    )
    at = await locked_now(connection)
    job: asyncpg.Record | None = await connection.fetchrow(
        f"""
        UPDATE jobs SET halted_at = $2, halt_reason = $3, halt_detail = $4, halted_by = $5, halt_count = halt_count + 1
        WHERE job_id = $1 AND halted_at IS NULL
        RETURNING {JOB_COLUMNS}
        """,
        key,
        at,
        reason,
        detail,
        by,
    )
    if job is None:
        return None
    failed = await failed_hosts(connection, key)
    event = JobHalted(job_id=job_id, at=at, reason=reason, failed_hosts=failed, detail=detail, by=by)
    await enqueue(
        connection, "job.halted", event, source=source, correlation_id=job_id,
        event_id=deterministic_event_id("job-halted", job_id, str(job["halt_count"])), time=at,
    )  # fmt: skip
    decided: list[uuid.UUID] = []
    failure = clip_detail(f"job {job_id} halted ({reason}): {detail}")
    for row in waiting:
        decision = JobDecision(
            job_id, row["host_id"], "failed", failure, reason="job_halted", checks=_summaries_of(row["checks"])
        )
        if await decide(connection, decision, at=at, source=source) is not None:
            decided.append(row["host_id"])
    return Halt(job, failed, sorted(decided))  # by host_id, as before they were locked in arrival order


async def resume_job(
    connection: Connection, job_id: str, *, detail: str, by: str | None, source: str
) -> asyncpg.Record | None:
    """Let a halted job go on (the caller holds `lock_job`), in the caller's transaction: the job after
    (JOB_COLUMNS), with job.resumed in the outbox (id `job-resumed/<job_id>/<halt_count>`), or None when it is
    not halted. Job hosts that failed stay failed; new job.starts are gated again."""
    at = await locked_now(connection)
    job: asyncpg.Record | None = await connection.fetchrow(
        f"""
        UPDATE jobs SET halted_at = NULL, halt_reason = NULL, halt_detail = NULL, halted_by = NULL
        WHERE job_id = $1 AND halted_at IS NOT NULL
        RETURNING {JOB_COLUMNS}
        """,
        job_key(job_id),
    )
    if job is None:
        return None
    event = JobResumed(job_id=job_id, at=at, detail=detail, by=by)
    await enqueue(
        connection, "job.resumed", event, source=source, correlation_id=job_id,
        event_id=deterministic_event_id("job-resumed", job_id, str(job["halt_count"])), time=at,
    )  # fmt: skip
    return job


# ---- maintenance (CONTRACT §6) ---------------------------------------------------------------------


async def maintenance_of_hosts(
    connection: Connection | asyncpg.Pool, host_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, str]:
    """The hosts among `host_ids` that are in maintenance (a job host of theirs is released or verifying), each
    with the earliest such job by `decided_at` (its release): {host_id: job_id}. Hosts not in patch are absent."""
    if not host_ids:
        return {}
    rows = await connection.fetch(
        """
        SELECT DISTINCT ON (host_id) host_id, job_id FROM gate_jobs
        WHERE host_id = ANY($1::uuid[]) AND status IN ('released', 'verifying')
        ORDER BY host_id, decided_at, job_id
        """,
        list(set(host_ids)),
    )
    return {row["host_id"]: row["job_id"] for row in rows}
