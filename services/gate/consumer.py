"""The gate's message handling: job.start and job.cancel in, check.result to wake waiting jobs, and
the timers that retry failing checks and close windows.

Follow a job.start: `GATE_JOBS_QUEUE` → `on_job_message` → `start` → a waiting row (`insert_job`)
→ `evaluate` under the row's lock → a decision and its event in the outbox, or job.waiting and a
re-run of the failing checks → ack. A message is acked only after its transaction committed; while
the database is unreachable the message is held and retried, so an outage burns no delivery attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.gate import jobs
from services.gate.rules import Verdict
from shared.events import CheckResult, JobCancel, JobStart, MalformedEvent, ScheduledRun, Tick, decode_event
from shared.messaging import Broker, PublishFailed, Unroutable
from shared.topology import GATE_JOBS_QUEUE, GATE_RESULTS_QUEUE, POLLER_TICK_QUEUE, consume

log = logging.getLogger(__name__)

JOBS_PREFETCH = 64
RESULTS_PREFETCH = 256
TIMER_INTERVAL_SECONDS = 0.25
TIMER_BATCH = 200
RERUN_TICK_SIZE = 50
DATABASE_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
# Lost connections, and a server shutting down or starting (57P01, 57P03): wait for it, don't give up.
DATABASE_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)
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


def salvage_identity(data: object) -> tuple[str, uuid.UUID] | None:
    """job_id and host_id of a malformed job.start, when they are usable (CONTRACT §5)."""
    if not isinstance(data, dict):
        return None
    job_id, host_id = data.get("job_id"), data.get("host_id")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 200 or not isinstance(host_id, str):
        return None
    try:
        return job_id, uuid.UUID(host_id)
    except ValueError:
        return None


class Gate:
    def __init__(self, pool: asyncpg.Pool, broker: Broker, metrics: GateMetrics, *, retry_seconds: float) -> None:
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self._retry_seconds = retry_seconds

    async def start_consuming(self, connection: AbstractRobustConnection) -> None:
        topology = self._broker.topology
        await consume(connection, topology, GATE_JOBS_QUEUE, self.on_job_message, prefetch=JOBS_PREFETCH)
        await consume(connection, topology, GATE_RESULTS_QUEUE, self.on_result_message, prefetch=RESULTS_PREFETCH)

    # ---- job.start / job.cancel ------------------------------------------------------------------

    async def on_job_message(self, message: AbstractIncomingMessage) -> None:
        routing_key = message.routing_key or ""
        started = time.perf_counter()
        try:
            if routing_key == "job.start":
                outcome = await self._on_job_start(message.body)
            elif routing_key == "job.cancel":
                outcome = await self._on_job_cancel(message.body)
            else:
                outcome = "unexpected"
        except MalformedEvent as exc:
            log.warning("malformed message dead-lettered", extra={"routing_key": routing_key, "error": str(exc)})
            self._metrics.messages.labels(routing_key, "dead_lettered").inc()
            await message.reject(requeue=False)
            return
        except Exception:
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
                problem = str(exc)
                decided = await self._with_database(lambda c: jobs.record_invalid_request(c, job_id, host_id, problem))
                if decided:
                    self._metrics.decisions.labels("invalid_request").inc()
            raise
        return await self.start(job)

    async def start(self, job: JobStart) -> str:
        if not await self._with_database(lambda c: jobs.insert_job(c, job)):
            return "duplicate"
        # The row is committed before it is evaluated: a result committed after this evaluation read
        # the checks finds the row (and waits for its lock), so no wake-up falls between the two.
        evaluation = await self._with_database(
            lambda c: self._evaluate_one(c, job.job_id, job.host_id, rerun_failing=True)
        )
        await self._request_runs(evaluation.rerun if evaluation else [])
        return "started"

    async def _evaluate_one(
        self, connection: asyncpg.Connection, job_id: str, host_id: uuid.UUID, *, rerun_failing: bool
    ) -> jobs.Evaluation | None:
        row = await jobs.lock_waiting(connection, job_id, host_id)
        if row is None:
            return None  # decided meanwhile (a timer of another gate, an override, a cancel)
        evaluation = await jobs.evaluate(
            connection, row, retry_seconds=self._retry_seconds, rerun_failing=rerun_failing
        )
        self._count(evaluation)
        return evaluation

    async def _on_job_cancel(self, body: bytes) -> str:
        request = decode_event(body, JobCancel)
        cancelled = await self._with_database(lambda c: jobs.cancel(c, request.job_id, request.host_id))
        if cancelled:
            self._metrics.decisions.labels("cancelled").inc()
        return "cancelled" if cancelled else "not_waiting"

    # ---- check.result ----------------------------------------------------------------------------

    async def on_result_message(self, message: AbstractIncomingMessage) -> None:
        try:
            result = decode_event(message.body, CheckResult)
        except MalformedEvent as exc:
            log.warning("malformed check.result dropped", extra={"error": str(exc)})
            await message.reject(requeue=False)
            return
        # Only a result that leaves its check healthy can complete a host's set of healthy checks.
        if result.status == "healthy":
            try:
                await self._with_database(lambda c: self._wake_host(c, result.host_id))
            except Exception:
                # A missed wake-up costs one retry interval at most: the timers re-evaluate every job.
                log.exception("could not evaluate a host's waiting jobs on a result")
        await message.ack()

    async def _wake_host(self, connection: asyncpg.Connection, host_id: uuid.UUID) -> None:
        for row in await jobs.lock_waiting_on_host(connection, host_id):
            self._count(await jobs.evaluate(connection, row, retry_seconds=self._retry_seconds, rerun_failing=False))

    # ---- timers ----------------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """Retries and window ends, from the database: any gate runs them, also after a crash."""
        while True:
            try:
                handled = await self.run_due_timers()
            except (*DATABASE_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("gate timers failed, will retry", extra={"error": str(exc)})
                await asyncio.sleep(1)
                continue
            if handled < TIMER_BATCH:
                await asyncio.sleep(TIMER_INTERVAL_SECONDS)

    async def run_due_timers(self) -> int:
        rerun: list[uuid.UUID] = []
        async with self._pool.acquire() as connection, connection.transaction():
            due = await jobs.lock_due(connection, TIMER_BATCH)
            for row in due:
                evaluation = await jobs.evaluate(connection, row, retry_seconds=self._retry_seconds, rerun_failing=True)
                self._count(evaluation)
                rerun += evaluation.rerun
        await self._request_runs(rerun)
        return len(due)

    # ---- helpers ---------------------------------------------------------------------------------

    def _count(self, evaluation: jobs.Evaluation) -> None:
        if evaluation.verdict is Verdict.RELEASE:
            self._metrics.decisions.labels("released").inc()
        elif evaluation.verdict is Verdict.WINDOW_CLOSED:
            self._metrics.decisions.labels("window_closed").inc()

    async def _request_runs(self, check_ids: list[uuid.UUID]) -> None:
        """Ask the pollers to run these checks now. Best effort: the retry timer asks again."""
        unique = list(dict.fromkeys(check_ids))
        for start in range(0, len(unique), RERUN_TICK_SIZE):
            tick = Tick(runs=[ScheduledRun(check_id=check_id) for check_id in unique[start : start + RERUN_TICK_SIZE]])
            try:
                await self._broker.publish(
                    POLLER_TICK_QUEUE.bindings[0], tick.model_dump_json().encode(),
                    message_id=str(uuid.uuid4()), content_type="application/json",
                )  # fmt: skip
            except (PublishFailed, Unroutable) as exc:
                log.warning("could not ask for a re-run of failing checks", extra={"error": str(exc)})
                return

    async def _with_database(self, work: Callable[[asyncpg.Connection], Awaitable[ResultT]]) -> ResultT:
        """Run `work` in a transaction; while PostgreSQL is unreachable, wait and try again."""
        attempt = 0
        while True:
            try:
                async with self._pool.acquire() as connection, connection.transaction():
                    return await work(connection)
            except DATABASE_ERRORS as exc:
                delay = DATABASE_RETRY_SECONDS[min(attempt, len(DATABASE_RETRY_SECONDS) - 1)]
                log.warning("database unavailable, holding the message", extra={"error": str(exc), "retry_in": delay})
                attempt += 1
                await asyncio.sleep(delay)
