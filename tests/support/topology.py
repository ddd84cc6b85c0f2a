"""Removing a test's own AMQP topology (its exchange's queues and exchanges) once the test is done."""

from __future__ import annotations

import aio_pika

from shared.topology import QUEUES, Topology


async def delete_topology(amqp_url: str, name: str) -> None:
    """Delete everything `shared.topology` declares for the exchange `name`: every queue, the dead-letter queue,
    the exchange, its dead-letter and its requeue exchanges. Missing ones are no error."""
    topology = Topology(name)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue_name in [topology.dead_letter_queue, *(topology.queue_name(spec) for spec in QUEUES)]:
            await channel.queue_delete(queue_name)
        for exchange_name in (topology.exchange, topology.dead_letter_exchange, topology.requeue_exchange):
            await channel.exchange_delete(exchange_name)
