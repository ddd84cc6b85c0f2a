"""What every worker service (poller, gate, pruner) runs on: one pool, one broker connection, the
outbox relay, the database watch and the consumers that follow it, health endpoints and /metrics,
signal handling, and an orderly stop.

    async with WorkerRuntime("gate", settings) as runtime:
        runtime.consumers.add(GATE_JOBS_QUEUE, gate.on_job_message, prefetch=64)
        runtime.start_broker()
        await runtime.stopped()
    return runtime.succeeded

and its process runs that with `run_service(serve(settings))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry

from shared.consuming import ConsumerMetrics, Consumers
from shared.database import DatabaseWatch, close_pool, create_pool
from shared.health import ServiceHealth, base_url, listen, serve_health
from shared.messaging import Broker
from shared.outbox import BATCH_SIZE, OutboxMetrics, OutboxRelay
from shared.settings import Settings
from shared.supervision import TaskGroupOfService
from shared.topology import Topology

log = logging.getLogger(__name__)

# SIGTERM: how long the handlers at work get to finish before their messages are handed back.
CONSUMER_GRACE_SECONDS = 10.0


GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, pools, models' schemas, metrics) out of the cyclic garbage
    collector's reach (`gc.freeze`), and let it run its youngest generation every 10,000 allocations instead of
    Python's 700. Called once a service has started. Its work on messages and checks allocates and frees
    millions of short-lived objects; each collection of the older generations walked the whole startup heap, and
    the frequent young collections promoted objects still in flight (bench/poller.py, issue 16, one session: the
    one-process poller made 2,016 to 2,149 checks/s at 422 to 448 µs a check with this, against 1,682 to 1,849
    at 495 to 535 µs without: the collector's walks were about 15 % of its CPU). Objects frozen are never
    collected: only those alive at start, which live as long as the process anyway. Only the first call of a process
    freezes: a second service run in the same process (a test, an embedding program) would otherwise pin what the
    first one left behind for good."""
    if gc.get_freeze_count() > 0:
        return
    gc.collect()  # what is already garbage is freed, not frozen
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


SETTLE_SECONDS = 1.0


async def settle_library_tasks(timeout: float) -> None:
    """Let the tasks still pending (other than the caller's) finish, `timeout` seconds at most, before the event loop
    closes. Closing the broker connection makes aio-pika run its channels' close callbacks as tasks of their own
    (`OneShotCallback`); one still pending when the loop closes is destroyed later by the garbage collector, which
    logs "Task was destroyed but it is pending!" and a RuntimeError ("Event loop is closed") as the service
    exits (seen stopping a gate while PostgreSQL was down, on a loaded machine)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    current = asyncio.current_task()
    while (left := deadline - loop.time()) > 0:
        pending = {task for task in asyncio.all_tasks() if task is not current and not task.done()}
        if not pending:
            return
        await asyncio.wait(pending, timeout=left)
    left_over = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if left_over:
        log.debug("tasks still pending at shutdown", extra={"tasks": [repr(task) for task in left_over][:5]})


def run_service(service: Coroutine[Any, Any, bool]) -> int:
    """Run a worker service's `serve(...)` (True when it stopped as asked) on uvloop until it returns, and
    give the process's exit status: 0 after SIGINT/SIGTERM or Ctrl-C (KeyboardInterrupt ends it without a
    traceback), 1 when it stopped because one of its tasks failed, so that its supervisor restarts it."""
    with contextlib.suppress(KeyboardInterrupt):
        return 0 if uvloop.run(service) else 1
    return 0


class WorkerRuntime:
    """`database` (a DatabaseWatch, running) is where every task reports transient database errors;
    `consumers` (with a broker) consume only while it says PostgreSQL answers; `consumer_grace_seconds`
    bounds how long SIGTERM waits for the handlers at work."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        pool_size: int = 10,
        with_broker: bool = True,
        relay_batch_size: int = BATCH_SIZE,
        consumer_grace_seconds: float = CONSUMER_GRACE_SECONDS,
    ) -> None:
        self.name = name
        self.settings = settings
        self.pool_size = pool_size
        self.with_broker = with_broker
        self.relay_batch_size = relay_batch_size
        self.consumer_grace_seconds = consumer_grace_seconds
        self.registry = CollectorRegistry()
        self._stopping = asyncio.Event()
        self.tasks = TaskGroupOfService(on_failure=self._stopping.set)

    async def __aenter__(self) -> WorkerRuntime:
        """Start everything; raises CannotListen (before anything else starts) if the health port is taken."""
        settings = self.settings
        # First of all, so that a taken port stops the service at once with one line (CONTRACT §1).
        self._listeners = listen(settings.api_host, settings.health_port_for(self.name))
        # Connections open on demand: the service starts, and reports not ready, while PostgreSQL is down.
        self.pool = await create_pool(
            settings.database_url, min_size=0, max_size=settings.pool_max_size(self.pool_size)
        )
        self.broker = Broker(settings.amqp_url, Topology(settings.exchange), connection_name=f"healthgate-{self.name}")
        self.database = DatabaseWatch(settings.database_url, self.pool)
        self.consumers = Consumers(self.broker, self.database, ConsumerMetrics(self.registry))
        self.health = ServiceHealth(
            self.name, pool=self.pool, broker=self.broker if self.with_broker else None,
            allowed_networks=settings.health_allowed_networks,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, self._stopping.set)
        self.tasks.start(serve_health(self.health, self.registry, self._listeners), "health")
        self.tasks.start(self.database.run(), "database-watch")
        if self.with_broker:
            relay = OutboxRelay(
                self.pool, self.broker, OutboxMetrics(self.registry), self.database, batch_size=self.relay_batch_size
            )
            self.tasks.start(relay.run(), "outbox-relay")
        return self

    def start_broker(self) -> None:
        """Connect to the broker (retrying until it answers) and run the consumers added so far."""
        self.tasks.start(self.broker.run(self.consumers.attach), "broker")
        self.tasks.start(self.consumers.run(), "consumers")

    async def stopped(self) -> None:
        """Mark the service started, log the one start line with the URLs it serves, then wait for
        SIGINT/SIGTERM or a failed task."""
        self.health.started = True
        freeze_startup_heap()
        url = base_url(self._listeners)
        log.info(
            f"{self.name} started: health {url}/health, metrics {url}/metrics",
            extra={"port": self._listeners[0].getsockname()[1]},
        )
        await self._stopping.wait()
        self.health.shutting_down = True
        log.info(f"{self.name} stopping")

    @property
    def succeeded(self) -> bool:
        return not self.tasks.failed

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.health.shutting_down = True
        # Consumers first: no message is taken any more, and those at work finish or are handed back
        # while the broker and the pool are still there.
        await self.consumers.stop(self.consumer_grace_seconds)
        await self.tasks.cancel_all()
        if self.with_broker:
            await self.broker.close()
        await close_pool(self.pool)
        await settle_library_tasks(SETTLE_SECONDS)
        log.info(f"{self.name} stopped")
