"""The gate's message handling: job.start, job.cancel and job.finished in, check.result to wake waiting and
verifying jobs, and the timers that retry failing checks, close windows and verify (services/gate/verification.py).

Follow a job.start: `GATE_JOBS_QUEUE` → `on_job_message` → `start` → a waiting row and its turn
(`shared.jobs.record_start`) → decided at once with its event in the outbox when its host is ready
(`decide_at_once`, one more round trip), or else its group's release pass → `evaluate` under the row's lock →
a decision and its event in the outbox, or job.waiting and a re-run of the failing checks (their schedule
pulled forward, in the same transaction) → ack. A message is acked only after its transaction committed. The
consumers run on `shared.consuming.Consumers`: they
take messages only while the database answers, and a handler that meets a transient database error
raises it, so that the message is handed back without a delivery counted (an outage and the restarts
during it never dead-letter a valid message).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.gate.evaluation import (
    Evaluation,
    GroupPass,
    cancel,
    decide_at_once,
    evaluate_job_host,
    loggable_job_id,
    record_invalid_request,
    release_pass,
)
from services.gate.verification import VerificationMetrics, Verifier
from shared import jobs
from shared.consuming import Consumers
from shared.database import DATABASE_ERRORS, Connection, DatabaseWatch, is_transient_database_error
from shared.details import safe_detail
from shared.events import (
    CheckResult,
    JobCancel,
    JobStart,
    MalformedEvent,
    decode_event,
    parse_host_id,
)
from shared.gate_rules import UnknownHostPolicy, Verdict
from shared.group_policies import budget_limit, policies_of
from shared.hosts import host_group
from shared.messaging import Broker
from shared.topology import GATE_FINISHED_QUEUE, GATE_JOBS_QUEUE, GATE_RESULTS_QUEUE

log = logging.getLogger(__name__)

JOBS_PREFETCH = 64
RESULTS_PREFETCH = 256
TIMER_INTERVAL_SECONDS = 0.25
TIMER_BATCH = 200
# Groups with job hosts waiting for the budget get a pass this often, so that budget freed without an event
# of the gate's own (a policy raised, a host deleted or healthy again by the API) is used within about a second
# (BUDGET_SWEEP_GROUPS at a time: with more such groups, within a second per hundred of them).
BUDGET_SWEEP_SECONDS = 1.0
BUDGET_SWEEP_GROUPS = 100
# The budget gauges are refreshed from the database this often (and after every pass).
BUDGET_METRICS_SECONDS = 5.0
# A group whose lock the timers found held this many rounds running is waited for (at most
# TIMER_LOCK_WAIT_SECONDS) in the next: a group whose job.starts keep its lock held (shared, by fast releases that
# overlap) would otherwise never let a timer in, and a closed window would not fail its job host until they stop.
TIMER_SKIPS_BEFORE_WAIT = 2
TIMER_LOCK_WAIT_SECONDS = 1.0
ResultT = TypeVar("ResultT")


class GateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "healthgate_gate_decisions", "Job hosts decided, by outcome", ["outcome"], registry=registry
        )
        self.messages = Counter(
            "healthgate_gate_messages", "Inbound messages, by routing key and outcome", ["routing_key", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.handling = Histogram(
            "healthgate_gate_handling_seconds", "Time to handle an inbound message", ["routing_key"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=registry,
        )  # fmt: skip
        self.verification = VerificationMetrics(registry)
        # CONTRACT §6 "Metrics".
        self.budget_in_use = Gauge(
            "healthgate_group_budget_in_use", "Unavailable hosts of a group (in patch or unhealthy)", ["group"],
            registry=registry,
        )  # fmt: skip
        self.budget_limit = Gauge(
            "healthgate_group_budget_limit", "A group's disruption budget (max_unavailable as a count of hosts)",
            ["group"], registry=registry,
        )  # fmt: skip

    def budget(self, group: str, limit: int | None, in_use: int | None) -> None:
        """Show a group's budget: `in_use` when known; the limit, or no limit series for a group without one."""
        if in_use is not None:
            self.budget_in_use.labels(group).set(in_use)
        if limit is not None:
            self.budget_limit.labels(group).set(limit)
        else:
            try:
                self.budget_limit.remove(group)
            except KeyError:
                pass


def salvage_identity(data: object) -> tuple[str, uuid.UUID] | None:
    """job_id and host_id of a malformed job.start, when they are usable (CONTRACT §5): a job_id that
    is a non-empty string, whatever it holds (too long, control characters: it is answered as received),
    and a host_id the inbound models accept as a UUID. None otherwise (only dead-lettered then)."""
    if not isinstance(data, dict):
        return None
    job_id = data.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        return None
    host_id = parse_host_id(data.get("host_id"))
    return None if host_id is None else (job_id, host_id)


class Gate:
    """Decides job hosts: consumes job.start/job.cancel and check.result, and runs the timers.

    `retry_seconds`: HEALTHGATE_GATE_RETRY_SECONDS; `unknown_host`: HEALTHGATE_GATE_UNKNOWN_HOST;
    `database`: the process's watch, told of transient database errors."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        metrics: GateMetrics,
        database: DatabaseWatch,
        *,
        retry_seconds: float,
        unknown_host: UnknownHostPolicy = "release",
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self._database = database
        self._retry_seconds = retry_seconds
        self._unknown_host = unknown_host
        self._next_sweep = 0.0
        # Where the budget sweep goes on from (the last group it passed over; None: from the first).
        self._sweep_after: str | None = None
        self._verifier = Verifier(
            pool,
            metrics.verification,
            metrics.decisions,
            retry_seconds=retry_seconds,
            batch=TIMER_BATCH,
            budget_freed=self._budget_freed,
        )
        self._next_budget_metrics = 0.0
        # Groups with due job hosts whose lock the timers found held, and how many rounds running.
        self._timer_skips: dict[str, int] = {}
        # When the timers last waited for each of those groups (time.monotonic()): the one waited for longest ago
        # is waited for first.
        self._timer_waited_at: dict[str, float] = {}

    def consume(self, consumers: Consumers) -> None:
        """Register the gate's two consumers (they run while the database answers)."""
        consumers.add(GATE_JOBS_QUEUE, self.on_job_message, prefetch=JOBS_PREFETCH)
        consumers.add(GATE_FINISHED_QUEUE, self.on_job_message, prefetch=JOBS_PREFETCH)
        consumers.add(GATE_RESULTS_QUEUE, self.on_result_message, prefetch=RESULTS_PREFETCH)

    # ---- job.start / job.cancel ------------------------------------------------------------------

    async def on_job_message(self, message: AbstractIncomingMessage) -> None:
        routing_key = message.routing_key or ""
        started = time.perf_counter()
        try:
            if routing_key == "job.start":
                outcome = await self._on_job_start(message.body)
            elif routing_key == "job.cancel":
                outcome = await self._on_job_cancel(message.body)
            elif routing_key == "job.finished":
                outcome = await self._verifier.on_job_finished(message.body)
            else:
                outcome = "unexpected"
        except MalformedEvent as exc:
            # Rejected without requeue at once: a message that cannot be read never gets better, and a
            # malformed job.start was decided (invalid_request) before this, when it could be.
            fields: dict[str, object] = {"routing_key": routing_key, "error": safe_detail(str(exc))}
            identity = salvage_identity(exc.data)
            if identity is not None:
                fields |= {"job_id": loggable_job_id(identity[0]), "host_id": str(identity[1])}
            log.warning("malformed message dead-lettered", extra=fields)
            self._metrics.messages.labels(routing_key, "dead_lettered").inc()
            await message.reject(requeue=False)
            return
        except Exception as exc:
            if is_transient_database_error(exc):
                raise  # the database is away: handed back without a delivery counted (shared/consuming.py)
            # Not the message's fault as far as we know (a deadlock, a bug): deliver it again later;
            # past the queue's delivery limit it is dead-lettered rather than looping forever.
            log.exception("could not handle a message, returning it", extra={"routing_key": routing_key})
            self._metrics.messages.labels(routing_key, "requeued").inc()
            await asyncio.sleep(1)
            await message.nack(requeue=True)
            return
        if outcome == "unexpected":
            log.warning("message with an unexpected routing key dead-lettered", extra={"routing_key": routing_key})
            await message.reject(requeue=False)
            return
        self._metrics.messages.labels(routing_key, outcome).inc()
        self._metrics.handling.labels(routing_key).observe(time.perf_counter() - started)
        await message.ack()

    async def _on_job_start(self, body: bytes) -> str:
        try:
            job = decode_event(body, JobStart)
        except MalformedEvent as exc:
            identity = salvage_identity(exc.data)
            if identity is not None:
                job_id, host_id = identity
                problem = exc.problems
                decided = await self._transaction(lambda c: record_invalid_request(c, job_id, host_id, problem))
                if decided is not None:
                    self._decided(decided)
            raise
        return await self.start(job)

    async def start(self, job: JobStart) -> str:
        """Record a valid job.start (its job too) and decide it at once when its turn allows (`decide_at_once`: a
        healthy host, two round trips in all), else evaluate it through its group's release pass; "duplicate" if
        the job host was known."""
        async with self._pool.acquire() as connection:
            # Both autocommitted: the row is committed before it is judged, so a result committed after
            # `record_start` read the checks finds the row (and waits for the group's lock): no wake-up falls
            # between the two.
            try:
                started = await jobs.record_start(connection, job)
            except jobs.TurnUnread as exc:
                # Recorded, its turn unreadable (a migration changed a type it holds): judged by the release pass.
                log.warning("job.start recorded, its turn unread: a release pass judges it", extra={"error": str(exc)})
                started, decided = None, None
            else:
                if started is None:
                    return "duplicate"
                decided = await decide_at_once(connection, started, unknown_host=self._unknown_host)
        if decided is not None:
            self._decided(decided)
            if started is not None and started.budget is not None:
                # The group's budget as this decision left it, as the release pass it stands for would show it.
                budget = started.budget
                if decided.verdict is Verdict.RELEASE:
                    budget = budget.patching(job.host_id, job.job_id)
                self._metrics.budget(budget.group, budget.limit, budget.in_use)
        else:
            await self._pass_for_host(job.host_id, job_id=job.job_id)
        return "started"

    async def _pass_for_host(self, host_id: uuid.UUID, *, job_id: str | None = None) -> None:
        """Evaluate the host's waiting job hosts: through its group's release pass (every waiting job host of
        the group with a budget), or, for an unknown host, the job host `job_id` alone."""

        async def work(connection: Connection) -> GroupPass | Evaluation | None:
            group = await host_group(connection, host_id)
            if group is not None:
                return await self._release_pass(connection, group, host_ids=[host_id], job_id=job_id)
            if job_id is None:
                return None
            return await evaluate_job_host(
                connection, job_id, host_id, retry_seconds=self._retry_seconds, rerun_failing=True,
                unknown_host=self._unknown_host,
            )  # fmt: skip

        self._done(await self._transaction(work))

    async def _budget_freed(self, group: str) -> None:
        """A job host of `group` left patch: release the group's next waiting job hosts now, as the budget allows."""
        self._done(await self._transaction(partial(self._timer_pass, group=group, host_ids=None, wait=True)))

    async def _release_pass(
        self,
        connection: Connection,
        group: str,
        *,
        host_ids: list[uuid.UUID] | None,
        job_id: str | None = None,
        wait: bool = True,
        wait_seconds: float | None = None,
    ) -> GroupPass | None:
        return await release_pass(
            connection, group, host_ids=host_ids, job_id=job_id, wait=wait, wait_seconds=wait_seconds,
            retry_seconds=self._retry_seconds, unknown_host=self._unknown_host,
        )  # fmt: skip

    def _done(self, outcome: GroupPass | Evaluation | None) -> None:
        """Count and log what a committed pass or evaluation did, and show the group's budget."""
        if isinstance(outcome, Evaluation):
            self._decided(outcome)
        elif outcome is not None:
            for evaluation in outcome.evaluations:
                self._decided(evaluation)
            self._metrics.budget(outcome.group, outcome.limit, outcome.in_use)

    async def _on_job_cancel(self, body: bytes) -> str:
        request = decode_event(body, JobCancel)
        cancelled = await self._transaction(lambda c: cancel(c, request.job_id, request.host_id))
        if cancelled:
            self._metrics.decisions.labels("cancelled").inc()
            log.info(
                "job cancelled",
                extra={"job_id": request.job_id, "host_id": str(request.host_id), "status": "cancelled",
                       "reason": None, "detail": "cancelled by job.cancel"},
            )  # fmt: skip
        else:
            # Nothing to cancel: decided already (released, failed, cancelled). Said, so that an executor's cancel
            # never vanishes without a trace.
            log.info(
                "job.cancel ignored: the job host is not waiting",
                extra={"job_id": loggable_job_id(request.job_id), "host_id": str(request.host_id)},
            )
        return "cancelled" if cancelled else "not_waiting"

    # ---- check.result ----------------------------------------------------------------------------

    async def on_result_message(self, message: AbstractIncomingMessage) -> None:
        try:
            result = decode_event(message.body, CheckResult)
        except MalformedEvent as exc:
            log.warning("malformed check.result dropped", extra={"error": str(exc)})
            await message.reject(requeue=False)
            return
        # Only a result that leaves its check healthy can complete a host's set of healthy checks, or free
        # the budget of its group (a host healthy again): a pass over the host's group.
        if result.status == "healthy":
            try:
                await self._pass_for_host(result.host_id)
            except Exception as exc:
                if is_transient_database_error(exc):
                    raise  # handed back: it wakes the host's jobs once the database is back
                # A missed wake-up costs one retry interval at most: the timers re-evaluate every job.
                log.exception("could not evaluate a host's waiting jobs on a result")
            try:
                await self._verifier.on_healthy_result(result.host_id)
            except Exception as exc:
                if is_transient_database_error(exc):
                    raise
                # A missed wake-up costs one retry interval at most: the verification timer comes.
                log.exception("could not verify a host's verifying jobs on a result")
        await message.ack()

    # ---- timers ----------------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """Retries and window ends, from the database: any gate runs them, also after a crash.

        They need only the database, not the broker: a re-run is asked for in the evaluation's own
        transaction (`shared.schedule.request_reruns`) and decisions go through the outbox. So a gate
        (re)started acts on every timer that came due while none could, as soon as PostgreSQL answers,
        even before its broker connection is up, and a broker outage delays no re-run request."""
        while True:
            try:
                handled = await self.run_due_timers()
            except DATABASE_ERRORS as exc:
                if not await self._database.wait_out(exc):  # an outage is logged once, by the watch
                    log.warning("gate timers failed, will retry", extra={"error": str(exc)})
                    await asyncio.sleep(1)
                continue
            if handled < TIMER_BATCH:
                await asyncio.sleep(TIMER_INTERVAL_SECONDS)

    async def run_due_timers(self) -> int:
        """One round of the timers: a release pass for each group with job hosts due (retry, window end,
        release cutoff, stability), one transaction per group, skipping a group whose lock another
        transaction holds (its rows stay due for the next round); the due job hosts of unknown hosts alone;
        every second a pass over the groups with job hosts waiting for the budget; every few seconds the
        budget gauges. Returns how many due job hosts it handled."""
        async with self._pool.acquire() as connection:
            due = await jobs.due_waiting(connection, TIMER_BATCH)
        by_group: dict[str, list[uuid.UUID]] = {}
        alone: list[tuple[str, uuid.UUID]] = []
        for row in due:
            if row["group"] is None:
                alone.append((row["job_id"], row["host_id"]))
            else:
                by_group.setdefault(row["group"], []).append(row["host_id"])
        handled = 0
        skips = {group: count for group, count in self._timer_skips.items() if group in by_group}
        waited_at = {group: at for group, at in self._timer_waited_at.items() if group in by_group}
        # The groups to wait for last, the one waited for longest ago first, and TIMER_LOCK_WAIT_SECONDS for them
        # all in one round: waiting that long for each of many held groups stretched the round (every other group's
        # due job hosts, the verification timers) to as many seconds, and a group held all along (a long pass)
        # waited for first every round kept the others from ever being waited for.
        to_wait = sorted(
            (group for group in by_group if skips.get(group, 0) >= TIMER_SKIPS_BEFORE_WAIT),
            key=lambda group: waited_at.get(group, float("-inf")),
        )
        waiting = set(to_wait)
        order = [group for group in by_group if group not in waiting] + to_wait
        loop = asyncio.get_running_loop()
        wait_until = None
        for group in order:
            host_ids = by_group[group]
            wait_seconds = None
            if group in waiting:
                if wait_until is None:
                    wait_until = loop.time() + TIMER_LOCK_WAIT_SECONDS
                left = wait_until - loop.time()
                if left >= 0.01:
                    wait_seconds = left
                    waited_at[group] = time.monotonic()
            try:
                passed = await self._transaction(
                    partial(self._timer_pass, group=group, host_ids=host_ids, wait_seconds=wait_seconds)
                )
            except asyncpg.LockNotAvailableError:
                passed = None  # held all that while (a long pass): waited for again next round
            if passed is None:
                skips[group] = skips.get(group, 0) + 1
                continue
            skips.pop(group, None)
            waited_at.pop(group, None)
            handled += len(host_ids)
            self._done(passed)
        self._timer_skips = skips
        self._timer_waited_at = waited_at
        for job_id, host_id in alone:
            self._done(await self._transaction(partial(self._evaluate_alone, job_id=job_id, host_id=host_id)))
            handled += 1
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + BUDGET_SWEEP_SECONDS
            await self._sweep_budget_waits()
        if now >= self._next_budget_metrics:
            self._next_budget_metrics = now + BUDGET_METRICS_SECONDS
            await self.refresh_budget_metrics()
        return max(handled, await self._verifier.run_due_timers())

    async def _timer_pass(
        self,
        connection: Connection,
        *,
        group: str,
        host_ids: list[uuid.UUID] | None,
        wait: bool = False,
        wait_seconds: float | None = None,
    ) -> GroupPass | None:
        # From the timers (wait False), a group whose lock is held is skipped: its rows stay due for the next round;
        # with `wait_seconds`, the lock is waited for that long (a group the timers kept finding locked).
        return await self._release_pass(
            connection, group, host_ids=host_ids, wait=wait or wait_seconds is not None, wait_seconds=wait_seconds
        )

    async def _evaluate_alone(self, connection: Connection, *, job_id: str, host_id: uuid.UUID) -> Evaluation | None:
        return await evaluate_job_host(
            connection, job_id, host_id, retry_seconds=self._retry_seconds, rerun_failing=True,
            unknown_host=self._unknown_host,
        )  # fmt: skip

    async def _sweep_budget_waits(self) -> None:
        """A pass over the next BUDGET_SWEEP_GROUPS groups with job hosts waiting for the budget, going round them
        all in name order: with more such groups than that, each is still passed over every few sweeps."""
        async with self._pool.acquire() as connection:
            groups = await jobs.groups_waiting_for_budget(connection, BUDGET_SWEEP_GROUPS, after=self._sweep_after)
            if len(groups) < BUDGET_SWEEP_GROUPS and self._sweep_after is not None:
                # The end of the round: the rest of this sweep starts it again from the first group.
                more = await jobs.groups_waiting_for_budget(connection, BUDGET_SWEEP_GROUPS - len(groups))
                groups += [group for group in more if group not in groups]
        # A full page: the next sweep goes on after its last group (after a wrap, one near the start of the order).
        self._sweep_after = groups[-1] if len(groups) == BUDGET_SWEEP_GROUPS else None
        for group in groups:
            self._done(await self._transaction(partial(self._timer_pass, group=group, host_ids=None)))

    async def refresh_budget_metrics(self) -> None:
        """Every group's unavailable hosts and budget limit, read from the database, into the gauges."""
        async with self._pool.acquire() as connection:
            usage = await jobs.budget_usage(connection)
            policies = await policies_of(connection, [row["group"] for row in usage])
        for row in usage:
            limit = budget_limit(policies[row["group"]], row["hosts_total"])
            self._metrics.budget(row["group"], limit, row["in_use"])

    # ---- helpers ---------------------------------------------------------------------------------

    def _decided(self, evaluation: Evaluation) -> None:
        """Count and log what a committed evaluation did: one line per decision (released, failed
        with its reason), and one when a job host starts waiting (CONTRACT §2, HEALTHGATE_LOG_FORMAT)."""
        if evaluation.verdict is Verdict.WAIT:
            if not evaluation.announced:
                return
            message, status = "job waiting", "waiting_health_check"
        elif evaluation.verdict is Verdict.RELEASE:
            message, status = "job released", "released"
        else:
            message, status = "job failed", "failed"
        if evaluation.verdict is not Verdict.WAIT:
            self._metrics.decisions.labels(evaluation.reason or status).inc()
        log.info(
            message,
            extra={
                "job_id": loggable_job_id(evaluation.job_id),
                "host_id": str(evaluation.host_id),
                "status": status,
                "reason": evaluation.reason,
                "detail": evaluation.detail,
            },
        )

    async def _transaction(self, work: Callable[[Connection], Awaitable[ResultT]]) -> ResultT:
        """Run `work` in a transaction of its own. A transient database error is raised as it is: the
        consumer hands the message back and waits for the database (shared/consuming.py)."""
        async with self._pool.acquire() as connection, connection.transaction():
            return await work(connection)
