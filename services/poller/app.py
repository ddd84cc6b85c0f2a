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
SHUTDOWN_GRACE_SECONDS = 15.0
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
    async with WorkerRuntime("poller", settings, relay_on_own_thread=True) as runtime:
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


def run_poller(settings: Settings) -> int:
    """`healthgate poller`: run until SIGINT/SIGTERM; the process's exit status (`run_service`). Raises
    KeyFileError for an unusable key file, before anything starts."""
    key = load_or_create_key(settings.key_file)
    return run_service(serve(settings, key))
