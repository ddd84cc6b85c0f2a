"""Consumers that need PostgreSQL: they take messages only while the database answers, and hand back
what they hold without burning a delivery.

Every queue of the topology is a quorum queue with `x-delivery-limit` 5, and RabbitMQ counts a delivery
both when a consumer nacks with requeue and when the channel holding an unacked message closes (the
process stopped, was killed, lost its connection). A consumer that kept taking messages while the
database was down would hold them, and each restart of the service during the outage would count one
delivery for each: after five, a valid job.start would be dead-lettered and never decided. So:

- `Consumers` consumes (basic.consume) only while the process's `DatabaseWatch` says PostgreSQL answers:
  not at start until the first probe succeeds, and not from the moment any task reports a transient
  database error (`shared.database.is_transient_database_error`) until a probe answers again. Then it
  cancels its consumers (basic.cancel), so nothing new is delivered, and the messages of the queue stay
  in the queue, held by no one: killing or stopping the service meanwhile counts nothing.
- A message whose handler meets a transient database error, and one delivered while consuming stops, is
  *handed back* without a count: a copy (same body, routing key and properties, without
  `x-delivery-count`) is published with confirm through the requeue exchange, which routes it to the same
  queue only, and the original is acked. If that publish fails, the original is nacked with requeue as a
  last resort (counted).
- On SIGTERM (`stop`), consuming stops first, the handlers at work get `grace_seconds` to finish, and
  the messages of those that do not are handed back at once, without waiting for the handler to end (a
  query to a database that stopped answering ends only at its command timeout, past what a supervisor
  waits before it kills the process, which would count a delivery for each message held).

What still counts a delivery is what the limit is for: a handler that fails for another reason (a bug,
a conflict) nacks with requeue after a second, and a process that dies while it handles a message (in
milliseconds for a job, up to a check's timeout for a tick). A malformed message is rejected by its
handler into `<exchange>.dead` at once. A copy handed back is a second delivery of the same message,
which every consumer of the topology tolerates (they are idempotent by the state they write).

A handler settles the message itself (ack, reject) or returns and lets this module ack it; it raises a
transient database error to have the message handed back, and any other exception to have it nacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import MessageProcessError
from prometheus_client import CollectorRegistry, Counter

from shared.database import DatabaseWatch, is_transient_database_error
from shared.messaging import Broker, PublishFailed, Unroutable
from shared.outages import describe_error
from shared.topology import QueueSpec, open_queue

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]
# How many times one message may be handed back without a count. Each outage hands back at most the
# messages in flight when it starts, so a valid message never gets near this; it only stops a handler
# whose own bug looks like an outage (an error of that list that a probe does not confirm) from looping
# without ever reaching the delivery limit.
HANDBACK_HEADER = "healthgate-handbacks"
HANDBACK_LIMIT = 50
FAILED_MESSAGE_BACKOFF_SECONDS = 1.0
RECONCILE_SECONDS = 1.0
# After the grace period: how long the messages still at work get to be handed back (one confirmed publish).
HAND_BACK_SECONDS = 6.0
# What acking, nacking or consuming raises when the message was settled already or its channel is gone.
SETTLE_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    MessageProcessError,
    RuntimeError,
)


class ConsumerMetrics:
    """`healthgate_messages_handed_back_total{queue}` and `healthgate_messages_failed_total{queue}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handed_back = Counter(
            "healthgate_messages_handed_back", "Messages put back in their queue without counting a delivery",
            ["queue"], registry=registry,
        )  # fmt: skip
        self.failed = Counter(
            "healthgate_messages_failed", "Messages whose handler failed (returned with a delivery counted)",
            ["queue"], registry=registry,
        )  # fmt: skip


@dataclass
class _Consumer:
    spec: QueueSpec
    handler: Handler
    prefetch: int
    queue: AbstractQueue | None = None
    tag: str | None = None


class Consumers:
    """The consumers of one process that need PostgreSQL (see the module's docstring).

    Register with `add` before the broker connects, pass `attach` to `Broker.run` as its on-connected
    hook, run `run()` as a service task, and call `stop(grace_seconds)` before the broker closes."""

    def __init__(self, broker: Broker, database: DatabaseWatch, metrics: ConsumerMetrics) -> None:
        self._broker = broker
        self._database = database
        self._metrics = metrics
        self._consumers: list[_Consumer] = []
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._stopping = False
        self._working: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        # Set by `stop` when the grace period is over: deliveries stop waiting for their handlers.
        self._given_up = asyncio.Event()

    def add(self, spec: QueueSpec, handler: Handler, *, prefetch: int) -> None:
        """Consume the topology's queue `spec` with `handler`, at most `prefetch` messages at once."""
        self._consumers.append(_Consumer(spec, handler, prefetch))

    async def attach(self, connection: AbstractRobustConnection) -> None:
        """Open each queue on a channel of its own (Broker.run's on-connected hook); consuming starts
        when the database answers."""
        for consumer in self._consumers:
            consumer.queue = await open_queue(
                connection, self._broker.topology, consumer.spec, prefetch=consumer.prefetch
            )
        # A consume that failed while the broker was away is tried again as soon as it is back.
        connection.reconnect_callbacks.add(lambda *_: self._changed.set())
        self._changed.set()

    async def run(self) -> None:
        """Follow the database: consume while it answers, stop while it does not. Never returns."""
        while True:
            await self._reconcile()
            self._changed.clear()
            change = self._database.wait_down() if self._database.is_up else self._database.wait_up()
            waiting = {asyncio.ensure_future(change), asyncio.ensure_future(self._changed.wait())}
            try:
                await asyncio.wait(waiting, timeout=RECONCILE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for future in waiting:
                    future.cancel()

    async def stop(self, grace_seconds: float) -> None:
        """Stop consuming, give the handlers at work `grace_seconds` to finish, hand back the messages of
        those that do not. Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        await self._reconcile()
        if self._working:
            await asyncio.wait(set(self._working), timeout=grace_seconds)
        self._given_up.set()
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=HAND_BACK_SECONDS)

    async def _reconcile(self) -> None:
        """Subscribe or cancel each consumer so that it consumes exactly while it should."""
        wanted = self._database.is_up and not self._stopping
        async with self._lock:
            for consumer in self._consumers:
                if consumer.queue is None:
                    continue
                if wanted and consumer.tag is None:
                    try:
                        consumer.tag = await consumer.queue.consume(functools.partial(self._deliver, consumer))
                    except (Exception, asyncio.CancelledError) as exc:  # tried again on the broker's return, or soon
                        _log_broker_error("could not start consuming", consumer.queue.name, exc)
                elif not wanted and consumer.tag is not None:
                    tag, consumer.tag = consumer.tag, None
                    try:
                        # The robust queue forgets the consumer first, so it is not restored on a reconnect
                        # even if this fails (the channel is gone: its messages went back with it).
                        await consumer.queue.cancel(tag, timeout=5)
                    except (Exception, asyncio.CancelledError) as exc:
                        _log_broker_error("could not cancel a consumer", consumer.queue.name, exc)

    async def _deliver(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        delivery = asyncio.current_task()
        assert delivery is not None
        self._deliveries.add(delivery)
        try:
            if self._stopping or not self._database.is_up:
                # Delivered between the decision to stop consuming and the broker's cancel-ok.
                await self._pause_then_hand_back(consumer, message)
                return
            work = asyncio.ensure_future(consumer.handler(message))
            work.add_done_callback(_retrieve)
            self._working.add(work)
            giving_up = asyncio.ensure_future(self._given_up.wait())
            try:
                await asyncio.wait({work, giving_up}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                work.cancel()  # the channel closed under us: the broker has the message back already
                raise
            finally:
                giving_up.cancel()
                self._working.discard(work)
            if not work.done() or work.cancelled():
                # stop() ran out of patience. The work may be stuck where a cancel does not reach at
                # once (a query to a database that stopped answering ends only at its command timeout):
                # the message is handed back now, not when the work ends. Should the work still commit
                # later, the copy is a second delivery, which every handler tolerates.
                work.cancel()
                await self._pause_then_hand_back(consumer, message)
                return
            error = work.exception()
            if isinstance(error, Exception):
                await self._failed(consumer, message, error)
                return
            if error is not None:
                raise error
            if not _processed(message):  # the handler may have settled it (a reject)
                await _settle(message.ack())
        finally:
            self._deliveries.discard(delivery)

    async def _failed(self, consumer: _Consumer, message: AbstractIncomingMessage, error: Exception) -> None:
        queue = self._broker.topology.queue_name(consumer.spec)
        if is_transient_database_error(error):
            self._database.report(error)
            await self._pause_then_hand_back(consumer, message)
            return
        # Not an outage, as far as we can tell: a bug, a conflict. Deliver it again later; past the queue's
        # delivery limit it is dead-lettered rather than looping forever.
        log.error(
            "could not handle a message, returning it", exc_info=error,
            extra={"queue": queue, "routing_key": message.routing_key, "message_id": message.message_id},
        )  # fmt: skip
        self._metrics.failed.labels(queue).inc()
        await asyncio.sleep(FAILED_MESSAGE_BACKOFF_SECONDS)
        await _settle(message.nack(requeue=True))

    async def _pause_then_hand_back(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        # Cancel the consumers first (a no-op when already done): a copy published while this process
        # still consumed would come straight back to it, to be handed back again.
        await self._reconcile()
        await self._hand_back(consumer, message)

    async def _hand_back(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        """Put the message back in its queue without counting a delivery (see the module's docstring)."""
        if _processed(message):
            return
        queue = self._broker.topology.queue_name(consumer.spec)
        handbacks = _handbacks(message) + 1
        if handbacks > HANDBACK_LIMIT:
            log.warning(
                "message handed back too often, returning it with a delivery counted",
                extra={"queue": queue, "routing_key": message.routing_key, "handbacks": handbacks - 1},
            )  # fmt: skip
            await _settle(message.nack(requeue=True))
            return
        try:
            await self._broker.requeue(message, queue, {HANDBACK_HEADER: handbacks})
        except (PublishFailed, Unroutable) as exc:
            # The broker may be going away too; a nack (counted) is the last resort, and if the channel is
            # gone the broker already has the message back.
            log.info(
                "could not hand a message back, returning it", extra={"queue": queue, "error": describe_error(exc)}
            )
            await _settle(message.nack(requeue=True))
            return
        self._metrics.handed_back.labels(queue).inc()
        await _settle(message.ack())


def _log_broker_error(message: str, queue: str, error: BaseException) -> None:
    """While the broker is away these fail as expected (its outage is logged once by the Broker); anything
    else is worth a line. A CancelledError is re-raised when this task is being cancelled (the service
    stops); one that only says that aiormq closed the channel under the call is an error like the others."""
    current = asyncio.current_task()
    if isinstance(error, asyncio.CancelledError) and (current is None or current.cancelling()):
        raise error
    expected = (*SETTLE_ERRORS, TimeoutError, OSError, asyncio.CancelledError)
    level = logging.DEBUG if isinstance(error, expected) else logging.WARNING
    log.log(level, message, extra={"queue": queue, "error": describe_error(error)})


def _retrieve(work: asyncio.Future[None]) -> None:
    """Done callback of a handler's task: one that `stop` abandoned may end later with an error (its
    message was handed back meanwhile, so acking it fails); that is expected, not "never retrieved"."""
    if not work.cancelled():
        work.exception()


def _handbacks(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(HANDBACK_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _processed(message: AbstractIncomingMessage) -> bool:
    return bool(getattr(message, "processed", False))  # aio-pika's IncomingMessage has it; the ABC does not


async def _settle(settling: Awaitable[object]) -> None:
    """Ack or nack; a message already settled, or whose channel is gone, needs nothing more."""
    with contextlib.suppress(*SETTLE_ERRORS):
        await settling
