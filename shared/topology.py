"""The whole AMQP topology, in one place: exchanges, queues, bindings, dead-lettering, delivery limits.

Every service declares all of it at start (declarations are idempotent), so a message published before
its consumer first ran still waits in the consumer's queue. No other module spells a queue name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection, FieldValue

from shared.notification_channels import NOTIFIABLE_EVENTS

# A message redelivered this many times (consumer crashes, nacks) is dead-lettered, never looped.
DEFAULT_DELIVERY_LIMIT = 5
# The header by which the requeue exchange routes a message back into one queue (headers exchanges
# ignore headers starting with "x-" for matching, so it has none).
REQUEUE_HEADER = "healthgate-requeue-to"


@dataclass(frozen=True)
class QueueSpec:
    suffix: str
    bindings: tuple[str, ...] = ()
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    dead_letter: bool = True
    extra_arguments: dict[str, FieldValue] = field(default_factory=dict)


# Test-run requests are answered within seconds or not at all: an expired request is dropped rather
# than dead-lettered, since the API that asked has already answered 504.
POLLER_TEST_QUEUE = QueueSpec("poller.test", bindings=("poller.test",), dead_letter=False)

# Ticks: checks due to run. A poller that dies leaves its unacked ticks to be redelivered to another.
POLLER_TICK_QUEUE = QueueSpec("poller.ticks", bindings=("poller.tick",))

# Inbound job requests for the gate; they wait here while no gate runs.
GATE_JOBS_QUEUE = QueueSpec("gate.jobs", bindings=("job.start", "job.cancel"))
# The executors' job.finished, apart: a burst of job.start (a campaign starting on 2,000 hosts) must not hold up
# the verification of the hosts already released, whose outcomes free the disruption budget (CONTRACT §6).
GATE_FINISHED_QUEUE = QueueSpec("gate.finished", bindings=("job.finished",))
# Results wake waiting jobs at once. The gate re-reads check state from the database, so a result it
# never saw costs at most one retry interval: while no gate runs, results older than a minute (or
# beyond 100,000) are dropped instead of piling up, and none is dead-lettered.
GATE_RESULTS_QUEUE = QueueSpec(
    "gate.results",
    bindings=("check.result",),
    dead_letter=False,
    extra_arguments={"x-message-ttl": 60_000, "x-max-length": 100_000, "x-overflow": "drop-head"},
)

# Every event a notification channel may subscribe to (CONTRACT §7), for the notifiers. Durable and dead-lettered
# like the gate's: an event published while no notifier runs is delivered when one starts, and the record of its
# delivery is made before it is acked. An event that waited longer than the deliveries' retry window (24 h: no
# notifier ran all that time) is not worth telling any more: it expires into the dead-letter queue instead.
NOTIFIER_EVENTS_TTL_MS = 24 * 3600 * 1000
NOTIFIER_EVENTS_QUEUE = QueueSpec(
    "notifier.events", bindings=NOTIFIABLE_EVENTS, extra_arguments={"x-message-ttl": NOTIFIER_EVENTS_TTL_MS}
)

QUEUES: tuple[QueueSpec, ...] = (
    POLLER_TEST_QUEUE, POLLER_TICK_QUEUE, GATE_JOBS_QUEUE, GATE_FINISHED_QUEUE, GATE_RESULTS_QUEUE,
    NOTIFIER_EVENTS_QUEUE,
)  # fmt: skip


@dataclass(frozen=True)
class Topology:
    """Names derived from the configured exchange (HEALTHGATE_EXCHANGE)."""

    exchange: str

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.exchange}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.exchange}.dead"

    @property
    def requeue_exchange(self) -> str:
        """Headers exchange that puts a message back into one queue of the topology (the one named in its
        REQUEUE_HEADER), keeping its routing key: see shared/consuming.py."""
        return f"{self.exchange}.requeue"

    def queue_name(self, spec: QueueSpec) -> str:
        return f"{self.exchange}.{spec.suffix}"

    def reply_queue_name(self, instance_id: str) -> str:
        """A process's own queue for replies to its requests, addressed through the default exchange."""
        return f"{self.exchange}.replies.{instance_id}"

    def queue_arguments(self, spec: QueueSpec) -> dict[str, FieldValue]:
        arguments: dict[str, FieldValue] = {"x-queue-type": "quorum", "x-delivery-limit": spec.delivery_limit}
        if spec.dead_letter:
            # at-least-once dead-lettering keeps a poison message even if the dead-letter queue's
            # node is briefly unavailable; RabbitMQ requires reject-publish overflow for it.
            arguments |= {
                "x-dead-letter-exchange": self.dead_letter_exchange,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        return arguments | spec.extra_arguments


async def declare_exchange(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    return await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_requeue_exchange(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    """The durable headers exchange through which consumers hand messages back (`Topology.requeue_exchange`)."""
    return await channel.declare_exchange(topology.requeue_exchange, aio_pika.ExchangeType.HEADERS, durable=True)


async def declare_topology(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    """Declare every exchange, queue and binding. Returns the main exchange."""
    exchange = await declare_exchange(channel, topology)
    # Fanout keeps each dead message's original routing key for whoever inspects the queue.
    dead_letter_exchange = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_letter_queue = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_letter_queue.bind(dead_letter_exchange)
    for spec in QUEUES:
        await declare_queue(channel, topology, spec, exchange)
    return exchange


async def declare_reply_queue(channel: AbstractChannel, topology: Topology, instance_id: str) -> AbstractQueue:
    # Exclusive: it lives and dies with the connection; the robust connection re-declares it.
    return await channel.declare_queue(
        topology.reply_queue_name(instance_id), exclusive=True, auto_delete=True, durable=False
    )


async def declare_queue(
    channel: AbstractChannel, topology: Topology, spec: QueueSpec, exchange: AbstractExchange
) -> AbstractQueue:
    name = topology.queue_name(spec)
    queue = await channel.declare_queue(name, durable=True, arguments=topology.queue_arguments(spec))
    for routing_key in spec.bindings:
        await queue.bind(exchange, routing_key)
    # A binding, unlike the queue's arguments, can be added to a queue that already exists.
    requeue = await declare_requeue_exchange(channel, topology)
    await queue.bind(requeue, "", arguments={"x-match": "all", REQUEUE_HEADER: name})
    return queue


async def open_queue(
    connection: AbstractRobustConnection, topology: Topology, spec: QueueSpec, *, prefetch: int
) -> AbstractQueue:
    """A queue of the topology on a channel of its own with this prefetch, ready to consume (which
    `shared.consuming.Consumers` does, only while the database answers). The robust connection restores
    the channel, the queue and its consumers after reconnects."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    return await declare_queue(channel, topology, spec, await declare_exchange(channel, topology))
