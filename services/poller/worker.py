"""The worker: consumes ticks and test-run requests, runs the checks, stores the results, acks.

A tick is acked only after its results are committed, so a poller that dies mid-batch loses nothing:
RabbitMQ redelivers the tick and the writer drops slots already stored. A tick that cannot be parsed
is rejected into the dead-letter queue at once; one that keeps failing for another reason reaches the
queue's delivery limit and is dead-lettered too. The consumers run on `shared.consuming.Consumers`:
while the database is unreachable no tick is taken, and one that meets the outage is handed back
without a delivery counted, to run once the database is back.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
from collections.abc import Sequence

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from services.poller.probes import ProbeOutcome, Prober
from services.poller.results import CheckRow, FinishedRun, load_checks, store_results
from shared.consuming import Consumers
from shared.crypto import DecryptionError, SecretBox
from shared.database import DATABASE_ERRORS, is_transient_database_error
from shared.events import CheckResult, CheckRunRequest, ScheduledRun, Tick
from shared.messaging import Broker, PublishFailed, Unroutable
from shared.topology import POLLER_TEST_QUEUE, POLLER_TICK_QUEUE

log = logging.getLogger(__name__)

EVENT_SOURCE = "/healthgate/poller"
TICK_PREFETCH = 16
TEST_PREFETCH = 8
FAILED_TICK_BACKOFF_SECONDS = 1.0
FLUSH_AFTER_SECONDS = 0.2


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "healthgate_checks_run", "Checks run, by type and reason", ["check_type", "reason"], registry=registry
        )
        self.duration = Histogram(
            "healthgate_check_duration_seconds",
            "Time a check took",
            ["check_type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.ticks = Counter("healthgate_ticks", "Ticks handled, by outcome", ["outcome"], registry=registry)
        self.results = Counter("healthgate_results_stored", "Results written", registry=registry)
        # The labelled children, looked up once per label set rather than once per check.
        self._ran: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def ran(self, check_type: str, reason: str, seconds: float) -> None:
        """Count a check run and observe its duration."""
        try:
            count, duration = self._ran[check_type, reason]
        except KeyError:
            count, duration = self._ran[check_type, reason] = (
                self.checks.labels(check_type, reason), self.duration.labels(check_type)
            )  # fmt: skip
        count.inc()
        duration.observe(seconds)


class ProbeSlots:
    """At most `size` probes at once; the others wait in arrival order. asyncio.Semaphore does the same, but its
    acquire walks its whole queue of waiters on every call (Python 3.11's `locked()`): with the hundreds of checks
    of the ticks at work waiting, that was 3% of the poller's CPU (py-spy, issue 16). Here each step is O(1)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def __aenter__(self) -> None:
        if self._free > 0:  # never while others wait: a freed slot goes to the first waiter directly
            self._free -= 1
            return
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()  # given a slot as it was cancelled: pass it on
            raise  # a cancelled waiter's future is skipped by `_release`

    async def __aexit__(self, *_: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self._free += 1


class Worker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        prober: Prober,
        secrets: SecretBox,
        metrics: WorkerMetrics,
        *,
        concurrency: int,
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._prober = prober
        self._secrets = secrets
        self._metrics = metrics
        self._probe_slots = ProbeSlots(concurrency)

    def consume(self, consumers: Consumers) -> None:
        """Register the tick and test-request consumers (they run while the database answers; on SIGTERM
        the ticks at work get the runtime's grace period to finish and be acked)."""
        consumers.add(POLLER_TICK_QUEUE, self._on_tick, prefetch=TICK_PREFETCH)
        consumers.add(POLLER_TEST_QUEUE, self._on_test_request, prefetch=TEST_PREFETCH)

    # ---- ticks -----------------------------------------------------------------------------------

    async def _on_tick(self, message: AbstractIncomingMessage) -> None:
        try:
            tick = Tick.model_validate_json(message.body)
        except ValidationError as exc:
            log.error(
                "malformed tick dead-lettered",
                extra={"error": str(exc).splitlines()[0], "message_id": message.message_id},
            )
            self._metrics.ticks.labels("dead_lettered").inc()
            await message.reject(requeue=False)
            return
        try:
            await self.run_tick(tick.runs)
        except Exception as exc:
            if is_transient_database_error(exc):
                raise  # handed back without a delivery counted; it runs once the database is back
            # Back off, then let RabbitMQ deliver the tick again (to any poller); past the delivery
            # limit the tick is dead-lettered rather than looping forever.
            log.warning("tick failed, returning it to the queue", extra={"error": repr(exc)}, exc_info=True)
            self._metrics.ticks.labels("requeued").inc()
            await asyncio.sleep(FAILED_TICK_BACKOFF_SECONDS)
            await message.nack(requeue=True)
            return
        self._metrics.ticks.labels("done").inc()
        await message.ack()

    async def run_tick(self, runs: Sequence[ScheduledRun], *, include_disabled: bool = False) -> list[CheckResult]:
        """Run the checks of one tick and store their results in one transaction. Disabled checks
        are skipped, unless an operator asked for this run (`/test`)."""
        async with self._pool.acquire() as connection:
            checks = await load_checks(connection, [run.check_id for run in runs])
        wanted = [(run, checks[run.check_id]) for run in runs if run.check_id in checks]
        wanted = [(run, check) for run, check in wanted if check.enabled or include_disabled]
        # Results are written as they come, in small batches: a check that hangs until its timeout does
        # not hold back the results of the quick checks of its tick.
        pending = {asyncio.create_task(self._run_one(check, run.slot)) for run, check in wanted}
        stored: list[CheckResult] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=FLUSH_AFTER_SECONDS)
                if not done:
                    continue
                async with self._pool.acquire() as connection, connection.transaction():
                    batch = await store_results(connection, [task.result() for task in done], source=EVENT_SOURCE)
                self._metrics.results.inc(len(batch))
                stored += batch
        finally:
            for task in pending:
                task.cancel()
        return stored

    async def _run_one(self, check: CheckRow, slot: dt.datetime | None) -> FinishedRun:
        async with self._probe_slots:
            checked_at = dt.datetime.now(dt.UTC)
            secrets: tuple[str, ...] = ()
            try:
                target = check.target(self._secrets)
            except DecryptionError:
                detail = "not run: the stored password does not decrypt with this poller's key file"
                outcome = ProbeOutcome(False, "connect", detail, 0.0)
            else:
                outcome = await self._prober.run(target)
                secrets = target.secrets()
        self._metrics.ran(check.record["check_type"], outcome.reason, outcome.latency_ms / 1000)
        return FinishedRun(
            check.check_id, check.record["host_id"], slot, outcome, checked_at, secrets, check.configuration
        )

    # ---- /test -----------------------------------------------------------------------------------

    async def _on_test_request(self, message: AbstractIncomingMessage) -> None:
        try:
            request = CheckRunRequest.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("malformed test request dropped", extra={"error": str(exc).splitlines()[0]})
            await message.reject(requeue=False)
            return
        try:
            stored = await self.run_tick([ScheduledRun(check_id=request.check_id)], include_disabled=True)
        except DATABASE_ERRORS as exc:
            if is_transient_database_error(exc):
                raise  # handed back: no request is taken while the database is away
            log.warning("test run failed", extra={"error": str(exc), "check_id": str(request.check_id)})
            await message.reject(requeue=False)  # the asking API answers 504; a retry would come too late
            return
        if stored and message.reply_to:
            await self._reply(message, stored[0])
        await message.ack()

    async def _reply(self, message: AbstractIncomingMessage, result: CheckResult) -> None:
        try:
            await self._broker.publish_reply(
                message.reply_to or "", result.model_dump_json().encode(), correlation_id=message.correlation_id or ""
            )
        except (PublishFailed, Unroutable) as exc:
            log.info("could not answer a test request", extra={"error": str(exc), "check_id": str(result.check_id)})
