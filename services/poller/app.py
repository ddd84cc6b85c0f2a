"""The poller service: scheduler, workers, outbox relay and health endpoints in one process.

Everything it needs (pool, broker, HTTP session, TLS contexts, key) is created here once and passed
down. SIGTERM stops the consumers, lets running ticks finish and ack, then closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal

import aiohttp
import asyncpg
import uvloop
from prometheus_client import CollectorRegistry

from services.poller.probes import GuardedResolver, Prober, agent_ssl_context
from services.poller.scheduler import Scheduler, SchedulerMetrics
from services.poller.worker import Worker, WorkerMetrics
from shared.crypto import SecretBox, load_or_create_key
from shared.database import create_pool, ensure_result_partitions
from shared.health import ServiceHealth, serve_health
from shared.messaging import Broker
from shared.outbox import OutboxMetrics, OutboxRelay
from shared.settings import ServiceConfigError, Settings
from shared.supervision import TaskGroupOfService
from shared.topology import Topology

log = logging.getLogger(__name__)

PROBE_CONCURRENCY = 256
SHUTDOWN_GRACE_SECONDS = 15.0
PARTITION_CHECK_SECONDS = 3600.0


async def keep_result_partitions(pool: asyncpg.Pool) -> None:
    """Create the coming days' result partitions, now and hourly, so an insert never lacks one."""
    while True:
        try:
            async with pool.acquire() as connection:
                await ensure_result_partitions(connection, dt.datetime.now(dt.UTC).date())
        except Exception as exc:  # retried at the next pass; inserts have a week of partitions ahead
            log.warning("could not create result partitions", extra={"error": str(exc)})
        await asyncio.sleep(PARTITION_CHECK_SECONDS)


async def serve(settings: Settings, key: bytes) -> bool:
    """Run until SIGINT/SIGTERM; False if it stopped because one of its tasks failed."""
    ca_file, cert_file, key_file = (str(path) if path else None for path in settings.agent_tls_files())
    try:
        agent_ssl = agent_ssl_context(ca_file, cert_file, key_file)
    except (OSError, ValueError) as exc:
        raise ServiceConfigError(f"cannot load the agent TLS files: {exc}") from None
    registry = CollectorRegistry()
    pool = await create_pool(settings.database_url, min_size=0, max_size=10)
    broker = Broker(settings.amqp_url, Topology(settings.exchange), connection_name="healthgate-poller")
    health = ServiceHealth("poller", pool=pool, broker=broker, allowed_networks=settings.health_allowed_networks)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(settings.blocked_networks), limit=0, ttl_dns_cache=10)
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": "healthgate-poller"},
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )
    prober = Prober(session, settings.blocked_networks, agent_ssl)
    worker = Worker(pool, broker, prober, SecretBox(key), WorkerMetrics(registry), concurrency=PROBE_CONCURRENCY)
    scheduler = Scheduler(pool, broker, SchedulerMetrics(registry))
    relay = OutboxRelay(pool, broker, OutboxMetrics(registry))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    tasks = TaskGroupOfService(on_failure=stopping.set)
    tasks.start(broker.run(worker.start_consuming), "broker")
    tasks.start(relay.run(), "outbox-relay")
    scheduling = tasks.start(scheduler.run(), "scheduler")
    tasks.start(keep_result_partitions(pool), "partitions")
    tasks.start(serve_health(health, registry, settings.api_host, settings.health_port_for("poller")), "health")
    health.started = True
    log.info("poller started")
    try:
        await stopping.wait()
    finally:
        health.shutting_down = True
        log.info("poller stopping")
        scheduling.cancel()  # no new ticks from this process
        await worker.stop(SHUTDOWN_GRACE_SECONDS)
        await tasks.cancel_all()
        await session.close()
        await broker.close()
        await pool.close()
        log.info("poller stopped")
    return not tasks.failed


def run_poller(settings: Settings) -> int:
    key = load_or_create_key(settings.key_file)
    with contextlib.suppress(KeyboardInterrupt):
        return 0 if uvloop.run(serve(settings, key)) else 1
    return 0
