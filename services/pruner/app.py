"""The pruner service: a pass at start and every HEALTHGATE_PRUNE_INTERVAL_SECONDS."""

from __future__ import annotations

import asyncio
import json
import logging

import asyncpg

from services.pruner.passes import PrunerMetrics, Retention, prune_once
from shared.database import DATABASE_ERRORS, DatabaseUnavailable, DatabaseWatch, create_pool
from shared.service import WorkerRuntime, run_service
from shared.settings import Settings

log = logging.getLogger(__name__)

FAILED_PASS_RETRY_SECONDS = 30.0


async def prune_forever(
    pool: asyncpg.Pool, retention: Retention, interval: float, metrics: PrunerMetrics, database: DatabaseWatch
) -> None:
    """A pass now and every `interval` seconds. Every step is idempotent: the next pass finishes what a
    failed one left, at once when the database is back after an outage (which the watch logs once),
    else after at most FAILED_PASS_RETRY_SECONDS."""
    while True:
        try:
            report = await prune_once(pool, retention)
        except DATABASE_ERRORS as exc:
            if await database.wait_out(exc):  # an outage is logged once, by the watch
                continue
            log.warning("pruning pass failed, will retry", extra={"error": str(exc)})
            await asyncio.sleep(min(interval, FAILED_PASS_RETRY_SECONDS))
            continue
        metrics.record(report)
        log.info("pruning pass done", extra=report.as_dict())
        await asyncio.sleep(interval)


async def serve(settings: Settings) -> bool:
    async with WorkerRuntime("pruner", settings, pool_size=3, with_broker=False) as runtime:
        metrics = PrunerMetrics(runtime.registry)
        retention = Retention.from_settings(settings)
        runtime.tasks.start(
            prune_forever(runtime.pool, retention, settings.prune_interval_seconds, metrics, runtime.database), "prune"
        )
        await runtime.stopped()
    return runtime.succeeded


def run_pruner(settings: Settings) -> int:
    """`healthgate pruner`: run until SIGINT/SIGTERM; the process's exit status (`run_service`)."""
    return run_service(serve(settings))


async def prune_command(settings: Settings) -> int:
    """`healthgate prune --once`: one pass; prints what it removed as JSON on stdout."""
    pool = await create_pool(settings.database_url, min_size=1, max_size=settings.pool_max_size(3))
    try:
        report = await prune_once(pool, Retention.from_settings(settings))
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"pruning pass failed: {exc}") from None
    finally:
        await pool.close()
    print(json.dumps(report.as_dict()))
    return 0
