"""One pruning pass: bounded storage at a cost that does not grow with the data.

Expired results go by whole daily partitions (detached CONCURRENTLY, so writers are not blocked, then
dropped); only the boundary day's expired rows are deleted, in small batches of short transactions.
Partitions for the coming days are created first, so an insert never lacks one, also after the pruner
was down for days. Decided gate jobs, sent outbox rows and finished notification deliveries past their
retention, expired dashboard sessions and the hourly result counts older than `uptime_24h`'s window go in batches too.
The audit log is kept. One pass at a time across all pruners (an advisory lock); a pass that was
interrupted leaves nothing half-done that the next pass does not finish.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared import jobs, notification_deliveries, outbox, results, sessions, uptime
from shared.settings import Settings

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every pruner: one pass at a time.
PRUNE_LOCK_ID = 0x6865616C74687072  # "healthpr"


@dataclass
class PassReport:
    """What a pass removed, for `healthgate prune --once` and the metrics."""

    skipped: bool = False
    partitions_created: list[str] = field(default_factory=list)
    partitions_dropped: list[str] = field(default_factory=list)
    result_rows_deleted: int = 0
    partition_rows_dropped: int = 0
    gate_jobs_deleted: int = 0
    jobs_deleted: int = 0
    outbox_rows_deleted: int = 0
    notification_deliveries_deleted: int = 0
    sessions_deleted: int = 0
    uptime_hours_deleted: int = 0
    seconds: float = 0.0
    oldest_result_age_seconds: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "skipped": self.skipped,
            "partitions_created": self.partitions_created,
            "partitions_dropped": self.partitions_dropped,
            "result_rows_deleted": self.result_rows_deleted,
            "result_rows_in_dropped_partitions": self.partition_rows_dropped,
            "gate_jobs_deleted": self.gate_jobs_deleted,
            "jobs_deleted": self.jobs_deleted,
            "outbox_rows_deleted": self.outbox_rows_deleted,
            "notification_deliveries_deleted": self.notification_deliveries_deleted,
            "expired_sessions_deleted": self.sessions_deleted,
            "uptime_hours_deleted": self.uptime_hours_deleted,
            "seconds": round(self.seconds, 3),
            "oldest_result_age_seconds": (
                None if self.oldest_result_age_seconds is None else round(self.oldest_result_age_seconds, 1)
            ),
        }


class PrunerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter("healthgate_pruned_rows", "Rows removed, by table", ["table"], registry=registry)
        self.partitions = Counter("healthgate_pruned_partitions", "Result partitions dropped", registry=registry)
        self.duration = Histogram(
            "healthgate_prune_pass_seconds", "Duration of a pruning pass",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=registry,
        )  # fmt: skip
        self.oldest = Gauge(
            "healthgate_oldest_result_age_seconds", "Age of the oldest stored result after the last pass",
            registry=registry,
        )  # fmt: skip
        self.skipped = Counter(
            "healthgate_prune_passes_skipped", "Passes skipped: another pruner ran", registry=registry
        )

    def record(self, report: PassReport) -> None:
        if report.skipped:
            self.skipped.inc()
            return
        self.rows.labels("check_results").inc(report.result_rows_deleted + report.partition_rows_dropped)
        self.rows.labels("gate_jobs").inc(report.gate_jobs_deleted)
        self.rows.labels("jobs").inc(report.jobs_deleted)
        self.rows.labels("outbox").inc(report.outbox_rows_deleted)
        self.rows.labels("notification_deliveries").inc(report.notification_deliveries_deleted)
        self.rows.labels("dashboard_sessions").inc(report.sessions_deleted)
        self.rows.labels("check_uptime_hours").inc(report.uptime_hours_deleted)
        self.partitions.inc(len(report.partitions_dropped))
        self.duration.observe(report.seconds)
        if report.oldest_result_age_seconds is not None:
            self.oldest.set(report.oldest_result_age_seconds)


@dataclass(frozen=True)
class Retention:
    results: dt.timedelta
    decided_jobs: dt.timedelta
    sent_outbox: dt.timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(
            results=dt.timedelta(hours=settings.result_retention_hours),
            decided_jobs=dt.timedelta(days=settings.job_retention_days),
            sent_outbox=dt.timedelta(hours=settings.outbox_retention_hours),
        )


async def prune_once(pool: asyncpg.Pool, retention: Retention) -> PassReport:
    """One pass, unless another pruner is running one (then `skipped`)."""
    started = time.perf_counter()
    report = PassReport()
    async with pool.acquire() as lock_connection:
        if not await lock_connection.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK_ID):
            report.skipped = True
            return report
        try:
            now = await lock_connection.fetchval("SELECT now()")
            report.partitions_created = await results.ensure_result_partitions(lock_connection, now.date())
            cutoff = now - retention.results
            pruned = await results.prune_expired(pool, lock_connection, cutoff)
            report.partitions_dropped = pruned.partitions_dropped
            report.partition_rows_dropped = pruned.rows_in_dropped_partitions
            report.result_rows_deleted = pruned.rows_deleted
            report.gate_jobs_deleted = await jobs.prune_decided(pool, now - retention.decided_jobs)
            # After their job hosts: a job goes once none is left.
            report.jobs_deleted = await jobs.prune_jobs(pool, now - retention.decided_jobs)
            report.outbox_rows_deleted = await outbox.prune_sent(pool, now - retention.sent_outbox)
            # Delivered and failed records, kept as long as the outbox's (pending ones are never pruned).
            report.notification_deliveries_deleted = await notification_deliveries.prune_finished(
                pool, now - retention.sent_outbox
            )
            report.sessions_deleted = await sessions.prune_expired(pool, now)
            report.uptime_hours_deleted = await uptime.prune_expired(pool, now)
            oldest = await results.oldest_result_since(lock_connection, cutoff)
            if oldest is not None:
                report.oldest_result_age_seconds = max(0.0, (now - oldest).total_seconds())
        finally:
            await lock_connection.execute("SELECT pg_advisory_unlock($1)", PRUNE_LOCK_ID)
    report.seconds = time.perf_counter() - started
    return report
