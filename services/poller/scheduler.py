"""The scheduler: claims due checks from PostgreSQL and dispatches them as ticks on the work queue.

Each pass claims due rows with FOR UPDATE SKIP LOCKED, moves them to their next slot, publishes the
ticks with confirms and only then commits: any number of pollers claim disjoint checks, a failed
publish rolls the claim back, and a crash after publishing at worst sends a tick twice, whose second
delivery the result writer drops by its slot. Every check keeps its cadence (slot + interval); after a
downtime it runs once and resumes, rather than catching up on every missed slot. The claim's SQL,
like every write of `check_schedule`, is in `shared/schedule.py`; the gate's re-run requests arrive
through the same table (a pulled-forward `next_run_at`) and go out as ordinary slots.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.database import DATABASE_ERRORS, DatabaseWatch
from shared.events import ScheduledRun, Tick
from shared.messaging import Broker, PublishFailed, Unroutable
from shared.outages import OutageLog
from shared.schedule import claim_due
from shared.topology import POLLER_TICK_QUEUE

log = logging.getLogger(__name__)

CLAIM_LIMIT = 2000
TICK_SIZE = 50
PASS_INTERVAL_SECONDS = 0.2
RETRY_DELAY_SECONDS = 1.0
TICK_ROUTING_KEY = POLLER_TICK_QUEUE.bindings[0]
# What fails a pass without stopping the scheduler: a publish, or the database. One tuple, since a type
# checker cannot read an unpacked tuple in an except clause.
PASS_ERRORS: tuple[type[Exception], ...] = (PublishFailed, Unroutable, *DATABASE_ERRORS)


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.dispatched = Counter("healthgate_scheduler_dispatched", "Check runs dispatched", registry=registry)
        self.lateness = Histogram(
            "healthgate_scheduler_lateness_seconds",
            "How long after its slot a check run was dispatched",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )
        self.failures = Counter("healthgate_scheduler_failures", "Scheduler passes that failed", registry=registry)


class Scheduler:
    def __init__(self, pool: asyncpg.Pool, broker: Broker, metrics: SchedulerMetrics, database: DatabaseWatch) -> None:
        self._pool = pool
        self._broker = broker
        self._metrics = metrics
        self._database = database
        # A broker that holds the ticks' confirms (a paused connection the client still counts as up) fails pass
        # after pass: one warning for the run of failures and one line when a pass succeeds again.
        self._failing = OutageLog(
            log, "scheduler pass failed, will retry", "scheduler passes succeed again: checks are dispatched"
        )

    async def run(self) -> None:
        while True:
            try:
                claimed = await self.dispatch_due()
                if self._broker.ready:  # else nothing was tried
                    self._failing.up()
            except PASS_ERRORS as exc:
                self._metrics.failures.inc()
                if await self._database.wait_out(exc):  # an outage is logged once, by the watch
                    continue
                # Unroutable: no queue bound for the ticks (the Broker has declared its topology again); the claim
                # was rolled back, so the next pass dispatches these checks.
                if not isinstance(exc, PublishFailed) or self._broker.ready:  # else the broker's outage, logged once
                    self._failing.down(exc)
                await asyncio.sleep(RETRY_DELAY_SECONDS)
                continue
            if claimed < CLAIM_LIMIT:
                await asyncio.sleep(PASS_INTERVAL_SECONDS)

    async def dispatch_due(self) -> int:
        """One pass: claim what is due, publish it, commit. Returns how many checks were claimed."""
        if not self._broker.ready:
            return 0
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await claim_due(connection, CLAIM_LIMIT)
            runs = [ScheduledRun(check_id=row["check_id"], slot=row["slot"]) for row in rows if row["enabled"]]
            ticks = [Tick(runs=runs[start : start + TICK_SIZE]) for start in range(0, len(runs), TICK_SIZE)]
            await asyncio.gather(*(self._publish(tick) for tick in ticks))
        now = dt.datetime.now(dt.UTC)
        for run in runs:
            assert run.slot is not None
            self._metrics.lateness.observe(max(0.0, (now - run.slot).total_seconds()))
        self._metrics.dispatched.inc(len(runs))
        return len(rows)

    async def _publish(self, tick: Tick) -> None:
        first = tick.runs[0]
        await self._broker.publish(
            TICK_ROUTING_KEY,
            tick.model_dump_json().encode(),
            message_id=f"{first.check_id}/{first.slot.isoformat() if first.slot else 'now'}",
            content_type="application/json",
        )
