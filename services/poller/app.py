"""The poller service: scheduler, workers, outbox relay and health endpoints in one process.

Everything it needs (pool, broker, HTTP session, TLS contexts, the dns and grpc probes with the system
resolver's nameservers, the conditions' evaluator, key) is created here once and passed down. SIGTERM stops
the consumers, lets running ticks finish and ack (those that do not finish in time are handed back), then
closes the connections and the conditions' worker processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import resource

import asyncpg

from services.poller.agent_tls import agent_ssl_context
from services.poller.conditions import ConditionEvaluator
from services.poller.dns_probe import DnsProbe, system_nameservers
from services.poller.grpc_probe import GrpcProbe
from services.poller.probes import Prober, probe_session, system_resolve
from services.poller.scheduler import Scheduler, SchedulerMetrics
from services.poller.worker import Worker, WorkerMetrics
from shared.crypto import SecretBox, load_or_create_key
from shared.database import DATABASE_ERRORS, DatabaseWatch
from shared.results import ensure_result_partitions
from shared.service import WorkerRuntime, run_service
from shared.settings import Settings

log = logging.getLogger(__name__)

PROBE_CONCURRENCY = 256
# A grpc check holds four descriptors while it runs (its connection, the relay's listener and accepted end, gRPC's
# own socket), an http, tcp or dns check one or two; the process needs some of its own (database pool, broker,
# health endpoint, logs). PROBE_CONCURRENCY grpc checks at once need more than the soft limit of 1024 that systemd
# services and many container runtimes start a process with.
DESCRIPTORS_PER_CHECK = 4
DESCRIPTORS_RESERVED = 256
SHUTDOWN_GRACE_SECONDS = 15.0
# The outbox relay shares the poller's event loop, whose turns are slow with hundreds of checks at work: a batch of
# 200 rows (other services) took ~7 turns and fell behind (1,199 check.result/s published of 2,648 stored). With
# batches of up to 2,000 it keeps up: 2,583-2,633/s at 339-354 µs of CPU a check, where the relay on a thread of its
# own (until issue 16) made 2,050-2,200/s at 409-434 µs, both threads contending for the GIL (bench/poller.py).
RELAY_BATCH_SIZE = 2000
PARTITION_CHECK_SECONDS = 3600.0


async def keep_result_partitions(pool: asyncpg.Pool, database: DatabaseWatch) -> None:
    """Create the coming days' result partitions, now and hourly, so an insert never lacks one; after a
    database outage, as soon as it is back."""
    while True:
        try:
            async with pool.acquire() as connection:
                await ensure_result_partitions(connection, dt.datetime.now(dt.UTC).date())
        except DATABASE_ERRORS as exc:
            if await database.wait_out(exc):  # an outage is logged once, by the watch
                continue
            log.warning("could not create result partitions", extra={"error": str(exc)})
        await asyncio.sleep(PARTITION_CHECK_SECONDS)


async def serve(settings: Settings, key: bytes) -> bool:
    """Run until SIGINT/SIGTERM; False if it stopped because one of its tasks failed."""
    agent_ssl = agent_ssl_context(*settings.agent_tls_files())  # AgentTlsError: one line naming each file
    async with WorkerRuntime("poller", settings, relay_batch_size=RELAY_BATCH_SIZE) as runtime:
        session = probe_session(settings.blocked_networks)
        blocked = settings.blocked_networks
        conditions = ConditionEvaluator()  # its worker processes start when a condition first needs one
        prober = Prober(
            session, blocked, agent_ssl,
            dns=DnsProbe(blocked, system_nameservers()), grpc=GrpcProbe(blocked, system_resolve),
            conditions=conditions,
        )  # fmt: skip
        worker = Worker(
            runtime.pool, runtime.broker, prober, SecretBox(key), WorkerMetrics(runtime.registry),
            concurrency=PROBE_CONCURRENCY,
        )  # fmt: skip
        scheduler = Scheduler(runtime.pool, runtime.broker, SchedulerMetrics(runtime.registry), runtime.database)
        worker.consume(runtime.consumers)
        runtime.start_broker()
        scheduling = runtime.tasks.start(scheduler.run(), "scheduler")
        runtime.tasks.start(keep_result_partitions(runtime.pool, runtime.database), "partitions")
        try:
            await runtime.stopped()
        finally:
            scheduling.cancel()  # no new ticks from this process
            # Before the probes' HTTP session closes: the ticks at work finish, or are handed back.
            await runtime.consumers.stop(SHUTDOWN_GRACE_SECONDS)
            await session.close()
            await conditions.close()  # kills its worker processes, busy or not, and waits for them
    return runtime.succeeded


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit, as Go programs do at start (since Go 1.19):
    the soft limit is a guard for programs that use select(2), which the poller does not. Returns the soft limit
    before and after; an unlimited or unchangeable limit is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def run_poller(settings: Settings) -> int:
    """`healthgate poller`: run until SIGINT/SIGTERM; the process's exit status (`run_service`). Raises
    KeyFileError for an unusable key file, before anything starts."""
    key = load_or_create_key(settings.key_file)
    before, limit = raise_open_file_limit()
    needed = PROBE_CONCURRENCY * DESCRIPTORS_PER_CHECK + DESCRIPTORS_RESERVED
    if limit != resource.RLIM_INFINITY and limit < needed:
        log.warning(
            f"the open-file limit ({limit}) is below the {needed} that {PROBE_CONCURRENCY} grpc checks at once may "
            "need: checks beyond it fail saying so; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)",
            extra={"limit": limit, "needed": needed},
        )
    elif limit != before:
        log.info(f"raised the open-file limit from {before} to {limit}", extra={"before": before, "limit": limit})
    return run_service(serve(settings, key))
