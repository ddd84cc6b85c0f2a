"""The gate's verification after patching and halting of jobs (CONTRACT §6).

Follow a job.finished: `GATE_FINISHED_QUEUE` → `Gate.on_job_message` → `Verifier.on_job_finished` → the released job
host locked → verifying (`shared.jobs.start_verifying`, delay and timeout from its group's policy) → verified at
once if it can be (`shared.verification_rules.verify`), else its gating checks re-run (shared/schedule.py) and its
timer set → ack after commit. Later, a healthy check.result of the host (`on_healthy_result`) or its timer
(`run_due_timers`) verifies it again; the outcome is recorded once by `shared.jobs.conclude_verification`
(an UPDATE … WHERE status = 'verifying' with its event in the outbox, one deterministic id), so crashes and racing
gates never yield two outcomes.

Halting: a job fails a host on job.finished with outcome failed and on job.verification_failed; both happen in a
transaction that locked the job's row first (`shared.jobs.lock_job`: jobs row, then gate_jobs rows, the lock order
of every writer), where the failed hosts are counted and the job halted once (`shared.jobs.halt_job`). That is why
a verification_failed is only ever concluded on the deadline path (`_fail_due`), which takes the job's lock before
the job host's: the wake-up and the batched timer lock job hosts only, and leave a verdict FAILED to it.
A job.start of a halted job fails at once with reason job_halted: the release rules say so
(`shared.gate_rules.decide`).

After an outcome the job host no longer holds its group's disruption budget: the gate's `budget_freed` callback (its
per-group release pass) runs for the group, in a transaction of its own after the outcome committed (a group's pass
takes the group's lock first, which must not come after a job host's lock), so that the group's next waiting job
host is released at once (CONTRACT §6 "A freed budget is used within a second").
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from shared import jobs
from shared.database import Connection, locked_now
from shared.details import safe_detail
from shared.events import JobFinished, decode_event, job_key
from shared.gating import gating_checks
from shared.group_policies import GroupPolicy, policy_of
from shared.jobs import VerificationOutcome
from shared.schedule import request_reruns
from shared.verification_rules import VerificationVerdict, verify

log = logging.getLogger(__name__)

EVENT_SOURCE = "/healthgate/gate"
ResultT = TypeVar("ResultT")


class VerificationMetrics:
    """`healthgate_verifications_total{outcome}` (verified, verification_failed) and
    `healthgate_jobs_halted_total` (halts by this gate: max_failed_hosts), CONTRACT §6 "Metrics"."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.verifications = Counter(
            "healthgate_verifications", "Verification outcomes of job hosts, by outcome", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.halted = Counter("healthgate_jobs_halted", "Jobs halted by the gate (max_failed_hosts)", registry=registry)
        for outcome in ("verified", "verification_failed"):
            self.verifications.labels(outcome)


@dataclass
class Done:
    """What a committed transaction did, for logging, metrics and budget passes after the commit."""

    outcomes: list[asyncpg.Record] = field(default_factory=list)
    halts: list[jobs.Halt] = field(default_factory=list)
    # Verifying job hosts found at their deadline without the job's lock: concluded by `_fail_due`.
    due_failures: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    handled: int = 0

    def add(self, other: Done) -> None:
        self.outcomes += other.outcomes
        self.halts += other.halts
        self.due_failures += other.due_failures
        self.handled += other.handled


class Verifier:
    """Verification after patching and halting, for one gate process. `retry_seconds`:
    HEALTHGATE_GATE_RETRY_SECONDS (re-runs of the checks and the timer while verifying); `decisions`: the gate's
    decisions counter (job hosts failed job_halted)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: VerificationMetrics,
        decisions: Counter,
        *,
        retry_seconds: float,
        batch: int,
        budget_freed: Callable[[str], Awaitable[None]],
    ) -> None:
        """`budget_freed(group)`: run after a job host of `group` reached its outcome (the gate's release pass)."""
        self._budget_freed = budget_freed
        self._pool = pool
        self._metrics = metrics
        self._decisions = decisions
        self._retry_seconds = retry_seconds
        self._batch = batch

    # ---- job.finished ----------------------------------------------------------------------------

    async def on_job_finished(self, body: bytes) -> str:
        """Handle a job.finished (a MalformedEvent is raised for the caller to dead-letter). Returns the outcome
        for the messages counter: "verifying", or why it changed nothing ("unknown_job_host", "not_released")."""
        finished = decode_event(body, JobFinished)
        outcome, done = await self._transaction(lambda c: self._finish(c, finished))
        await self._after(done)
        return outcome

    async def _finish(self, connection: Connection, finished: JobFinished) -> tuple[str, Done]:
        key = job_key(finished.job_id)
        done = Done()
        if finished.outcome == "failed" and await jobs.job_host_status(connection, key, finished.host_id) == "released":
            # The job's row before the job host's: a failed outcome counts toward max_failed_hosts below. Only for
            # a job host that is released (seen without a lock, checked again under it below): `lock_job` records
            # a job it does not know, and a job.finished that changes nothing must not record one.
            await jobs.lock_job(connection, key)
        row = await jobs.lock_for_finish(connection, key, finished.host_id)
        fields = {"job_id": finished.job_id, "host_id": str(finished.host_id), "outcome": finished.outcome}
        if row is None or row["status"] != "released":
            # A duplicate, an unknown job, a job host still waiting or already verified: nothing changes.
            status = None if row is None else row["status"]
            log.info("job.finished for a job host that is not released ignored", extra=fields | {"status": status})
            return ("unknown_job_host" if row is None else "not_released"), done
        now = await locked_now(connection)
        policy = await self._policy(connection, row["group"])
        detail = f"verifying after job.finished (outcome {finished.outcome})"
        if finished.detail:
            detail += f": {finished.detail}"
        started = await jobs.start_verifying(
            connection, key, finished.host_id, finished_at=now, outcome=finished.outcome, detail=safe_detail(detail),
            delay_seconds=policy.verify_delay_seconds, timeout_seconds=policy.verify_timeout_seconds,
        )  # fmt: skip
        assert started is not None  # locked and seen released above
        log.info("job finished, verifying", extra=fields | {"status": "verifying", "detail": detail})
        done.add(await self._verify(connection, started, policy, rerun=True, may_fail=False))
        if finished.outcome == "failed":
            done.add(await self._count_failure(connection, finished.job_id))
        return "verifying", done

    # ---- check.result ----------------------------------------------------------------------------

    async def on_healthy_result(self, host_id: uuid.UUID) -> None:
        """A healthy result of the host came: verify its verifying job hosts now (verified within a second of
        the result that shows it). A verdict FAILED is left to the deadline timer, which holds the job's lock."""
        done = await self._transaction(lambda c: self._wake(c, host_id))
        await self._after(done)

    async def _wake(self, connection: Connection, host_id: uuid.UUID) -> Done:
        done = Done()
        for row in await jobs.lock_verifying_on_host(connection, host_id):
            policy = await self._policy(connection, row["group"])
            done.add(await self._verify(connection, row, policy, rerun=False, may_fail=False))
        return done

    # ---- timers ----------------------------------------------------------------------------------

    async def run_due_timers(self) -> int:
        """One round of the verification timers, from the database (any gate, also after a crash): released job
        hosts whose window ended start verifying (finished_at = the window's end, outcome null), verifying ones
        whose timer came are verified again, and those at their deadline fail through `_fail_due`. Returns how
        many job hosts it handled."""
        done = await self._transaction(self._due)
        for key, host_id in list(done.due_failures):
            done.add(await self._fail_due_alone(key, host_id))
        await self._after(done)
        return done.handled

    async def _due(self, connection: Connection) -> Done:
        done = Done()
        policies: dict[str | None, GroupPolicy] = {}
        ended = await jobs.lock_ended_windows(connection, self._batch)
        for row in ended:
            policy = await self._policy(connection, row["group"], policies)
            started = await jobs.start_verifying(
                connection, row["job_id"], row["host_id"], finished_at=row["window_ends_at"], outcome=None,
                detail="verifying: the window ended without job.finished", delay_seconds=policy.verify_delay_seconds,
                timeout_seconds=policy.verify_timeout_seconds,
            )  # fmt: skip
            assert started is not None  # locked and seen released above
            log.info(
                "window ended without job.finished, verifying",
                extra={"job_id": row["job_id"], "host_id": str(row["host_id"]), "status": "verifying"},
            )
            done.add(await self._verify(connection, started, policy, rerun=True, may_fail=False))
        due = await jobs.lock_due_verifications(connection, self._batch)
        for row in due:
            policy = await self._policy(connection, row["group"], policies)
            done.add(await self._verify(connection, row, policy, rerun=True, may_fail=False))
        done.handled = max(len(ended), len(due))
        return done

    async def _fail_due_alone(self, key: str, host_id: uuid.UUID) -> Done:
        async with self._pool.acquire() as connection, connection.transaction():
            return await self._fail_due(connection, key, host_id)

    async def _fail_due(self, connection: Connection, key: str, host_id: uuid.UUID) -> Done:
        """A verifying job host whose deadline came: the job's row locked, then the job host's, verified once more
        (it may have recovered meanwhile), and its outcome recorded; a failure counts toward halting."""
        await jobs.lock_job(connection, key)
        row = await jobs.lock_verifying(connection, key, host_id)
        if row is None:
            return Done()  # concluded meanwhile, by another gate or a wake-up
        policy = await self._policy(connection, row["group"])
        done = await self._verify(connection, row, policy, rerun=True, may_fail=True)
        if any(outcome["status"] == "verification_failed" for outcome in done.outcomes):
            done.add(await self._count_failure(connection, row["job_id"]))
        return done

    # ---- the rule and its outcome ----------------------------------------------------------------

    async def _verify(
        self, connection: Connection, row: asyncpg.Record, policy: GroupPolicy, *, rerun: bool, may_fail: bool
    ) -> Done:
        """Apply the rule to a locked verifying job host and act on it, in the caller's transaction. `rerun`: ask
        for the checks it waits for to run again and move its timer on (at start and on each timer, not on
        every result). `may_fail`: the caller holds the job's lock, so a verdict FAILED is recorded; otherwise
        the job host is left due, for `_fail_due`."""
        done = Done()
        now = await locked_now(connection)
        checks = await gating_checks(connection, row["host_id"])
        verdict = verify(
            now, jobs.release_checks_of(row), checks, finished_at=row["finished_at"],
            verify_from_at=row["verify_from_at"], deadline=row["verify_deadline_at"],
            stable_seconds=policy.stable_seconds, retry_seconds=self._retry_seconds,
        )  # fmt: skip
        if verdict.verdict is VerificationVerdict.FAILED and not may_fail:
            done.due_failures.append((row["job_id"], row["host_id"]))
            await jobs.keep_verifying(connection, row["job_id"], row["host_id"], next_at=now, sooner_only=True)
            return done
        if verdict.verdict is VerificationVerdict.PENDING:
            assert verdict.next_at is not None
            if rerun:
                # A pull made before verification began (while the job waited, say) ran before the patch.
                await request_reruns(
                    connection, verdict.rerun, retry_seconds=self._retry_seconds, results_from=row["verify_from_at"]
                )
            await jobs.keep_verifying(
                connection, row["job_id"], row["host_id"], next_at=verdict.next_at, sooner_only=not rerun
            )
            return done
        outcome = VerificationOutcome(
            job_id=row["job_id"], host_id=row["host_id"], verified=verdict.verdict is VerificationVerdict.VERIFIED,
            detail=safe_detail(verdict.detail), checks=[check.summary() for check in checks or []],
        )  # fmt: skip
        concluded = await jobs.conclude_verification(connection, outcome, at=now, source=EVENT_SOURCE)
        if concluded is not None:
            done.outcomes.append(concluded)
        return done

    async def _count_failure(self, connection: Connection, job_id: str) -> Done:
        """The job failed a host (the caller holds the job's lock, taken before the job host's): halt it once when
        more hosts failed than its max_failed_hosts (CONTRACT §6 "Halting a job")."""
        done = Done()
        job = await jobs.job_of(connection, job_key(job_id))
        if job is None or job["max_failed_hosts"] is None or job["halted_at"] is not None:
            return done
        failed = await jobs.failed_hosts(connection, job_key(job_id))
        if len(failed) <= job["max_failed_hosts"]:
            return done
        detail = f"{len(failed)} hosts failed, more than max_failed_hosts {job['max_failed_hosts']}: " + ", ".join(
            str(host_id) for host_id in failed
        )
        halt = await jobs.halt_job(
            connection, job_id, reason="max_failed_hosts", detail=safe_detail(detail), by=None, source=EVENT_SOURCE
        )
        if halt is not None:
            done.halts.append(halt)
        return done

    # ---- helpers ---------------------------------------------------------------------------------

    async def _policy(
        self, connection: Connection, group: str | None, cache: dict[str | None, GroupPolicy] | None = None
    ) -> GroupPolicy:
        # An unknown host has no group: the defaults.
        if cache is not None and group in cache:
            return cache[group]
        policy = GroupPolicy() if group is None else await policy_of(connection, group)
        if cache is not None:
            cache[group] = policy
        return policy

    async def _after(self, done: Done) -> None:
        """Count and log what committed, then free the budget of each group whose job host left patch."""
        for outcome in done.outcomes:
            self._metrics.verifications.labels(outcome["status"]).inc()
            log.info(
                "job verified" if outcome["status"] == "verified" else "job verification failed",
                extra={"job_id": outcome["job_id"], "host_id": str(outcome["host_id"]), "status": outcome["status"],
                       "detail": outcome["detail"]},
            )  # fmt: skip
        for halt in done.halts:
            self._metrics.halted.inc()
            self._decisions.labels("job_halted").inc(len(halt.failed_waiting))
            log.warning(
                "job halted",
                extra={"job_id": halt.job["job_id"], "reason": halt.job["halt_reason"],
                       "detail": halt.job["halt_detail"], "failed_waiting": len(halt.failed_waiting)},
            )  # fmt: skip
        groups = sorted({outcome["group"] for outcome in done.outcomes if outcome["group"] is not None})
        for group in groups:
            await self._budget_freed(group)

    async def _transaction(self, work: Callable[[Connection], Awaitable[ResultT]]) -> ResultT:
        async with self._pool.acquire() as connection, connection.transaction():
            return await work(connection)
