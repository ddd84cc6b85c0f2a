"""The exchange deleted and declared again without our bindings (a definitions import, a broker restored from a
backup), against the real broker: RabbitMQ tells no client, so each Broker declares its topology again, at once
where a publish of its own finds no queue and every TOPOLOGY_REDECLARE_SECONDS otherwise. The poller's scheduler
meets the unroutable ticks without stopping and dispatches them once the bindings are back."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from services.poller.scheduler import TICK_ROUTING_KEY, Scheduler, SchedulerMetrics
from shared.checks import insert_check
from shared.database import DatabaseWatch
from shared.hosts import insert_host
from shared.messaging import Broker, Unroutable
from shared.topology import POLLER_TICK_QUEUE, Topology
from tests.support.services import BackingServices
from tests.support.topology import delete_topology


@pytest.fixture
async def own_exchange(backing: BackingServices) -> AsyncIterator[str]:
    name = f"hgtest-topology-{uuid.uuid4().hex[:8]}"
    yield name
    await delete_topology(backing.amqp_url, name)


async def declare_again_without_bindings(amqp_url: str, exchange: str) -> None:
    """What a definitions import does to our exchange: deleted, then declared again, bare."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def tick_count(amqp_url: str, topology: Topology) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.queue_name(POLLER_TICK_QUEUE), passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


async def publish_tick(broker: Broker) -> None:
    await broker.publish(
        TICK_ROUTING_KEY, b'{"runs": []}', message_id=uuid.uuid4().hex, content_type="application/json"
    )


async def test_a_publish_that_finds_no_queue_is_routed_once_the_topology_is_declared_again(
    backing: BackingServices, own_exchange: str
) -> None:
    topology = Topology(own_exchange)
    broker = Broker(backing.amqp_url, topology, connection_name="test-topology-restore")
    await broker.run()
    try:
        await publish_tick(broker)
        await declare_again_without_bindings(backing.amqp_url, own_exchange)
        with pytest.raises(Unroutable):
            await publish_tick(broker)
        assert await broker.restore_topology()
        await publish_tick(broker)
        assert await tick_count(backing.amqp_url, topology) == 2
        for _ in range(3):  # idempotent, and the channels it opens are closed again
            assert await broker.restore_topology()
        await publish_tick(broker)
        assert await tick_count(backing.amqp_url, topology) == 3
    finally:
        await broker.close()
    assert not await broker.restore_topology()  # closed: nothing to declare on


async def test_a_broker_binds_its_queues_again_by_itself(backing: BackingServices, own_exchange: str) -> None:
    """No publish of its own needed: a consumer's queue gets its bindings back within the redeclare period."""
    topology = Topology(own_exchange)
    broker = Broker(backing.amqp_url, topology, connection_name="test-topology-keeper")
    broker.topology_redeclare_seconds = 0.3
    await broker.run()
    other = Broker(backing.amqp_url, topology, connection_name="test-topology-publisher")
    other.topology_redeclare_seconds = 3600.0
    await other.run()
    try:
        await declare_again_without_bindings(backing.amqp_url, own_exchange)
        for _ in range(50):
            try:
                await publish_tick(other)
                break
            except Unroutable:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the queues were not bound again")
        assert await tick_count(backing.amqp_url, topology) == 1
    finally:
        await other.close()
        await broker.close()


async def test_the_scheduler_meets_unroutable_ticks_without_stopping_and_dispatches_them_after(
    backing: BackingServices,
    own_exchange: str,
    private_pool: asyncpg.Pool,
    private_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The breaker's case: the scheduler task failed on Unroutable and stopped the poller. Now the pass is rolled
    back (the check stays due), the topology declared again, and the next pass dispatches the check."""
    caplog.set_level(logging.INFO, logger="services.poller.scheduler")
    topology = Topology(own_exchange)
    broker = Broker(backing.amqp_url, topology, connection_name="test-topology-scheduler")
    broker.topology_redeclare_seconds = 3600.0  # only the scheduler's own call may bind the queues again
    await broker.run()
    watch = DatabaseWatch(private_database, private_pool)
    watching = asyncio.create_task(watch.run())
    scheduling: asyncio.Task[None] | None = None
    try:
        await declare_again_without_bindings(backing.amqp_url, own_exchange)
        async with private_pool.acquire() as connection:
            host_id, check_id = uuid.uuid4(), uuid.uuid4()
            await insert_host(connection, host_id, name="127.0.0.1", group="unit", agent_url=None)
            values = {
                "name": "tcp",
                "check_type": "tcp",
                "enabled": True,
                "interval_seconds": 3600,
                "port": 22,
                "timeout_seconds": 1.0,
            }
            await insert_check(connection, check_id, host_id, values)
            await connection.execute(
                "INSERT INTO check_schedule (check_id, next_run_at) VALUES ($1, $2)",
                check_id,
                dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1),
            )
        scheduler = Scheduler(private_pool, broker, SchedulerMetrics(CollectorRegistry()), watch)
        scheduling = asyncio.create_task(scheduler.run())
        for _ in range(100):
            if await tick_count(backing.amqp_url, topology) == 1:
                break
            assert not scheduling.done(), scheduling
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no tick was dispatched")
        assert not scheduling.done()
        async with private_pool.acquire() as connection:
            next_run_at = await connection.fetchval(
                "SELECT next_run_at FROM check_schedule WHERE check_id = $1", check_id
            )
        assert next_run_at > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)  # claimed once, for its next slot
        for _ in range(50):  # the pass that published the tick ends (commits) just after
            lines = [record.getMessage() for record in caplog.records if record.name == "services.poller.scheduler"]
            if len(lines) > 1:
                break
            await asyncio.sleep(0.05)
        assert lines == ["scheduler pass failed, will retry", "scheduler passes succeed again: checks are dispatched"]
    finally:
        for task in (scheduling, watching):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await broker.close()
