"""The RabbitMQ connection of a service and publishing with confirms.

A service starts even while the broker is down: `Broker.run` keeps trying to connect in the
background, and from the first success on aio-pika's robust connection restores channels, the
topology and consumers after every broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.connection import make_url
from aiormq.abc import ChannelFrame
from pamqp.header import ContentHeader

from shared.outages import OutageLog
from shared.settings import redact_url
from shared.topology import REQUEUE_HEADER, Topology, declare_requeue_exchange, declare_topology

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 10.0
RECONNECT_DELAY_SECONDS = 1.0
MAX_RECONNECT_DELAY_SECONDS = 15.0
# How long the publishing channel may stay closed while the connection is up before the Broker reopens it itself
# (`Broker._reopen_when_left_closed`), and the longest wait between its tries.
CHANNEL_LEFT_CLOSED_SECONDS = 5.0
MAX_CHANNEL_REOPEN_DELAY_SECONDS = 30.0
_REOPEN_FAILURES = (TimeoutError, aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError)
# How often a Broker declares its topology again (`Broker.restore_topology`): an exchange deleted and re-created by
# someone else (a definitions import, a broker restored from a backup) has lost every binding, and RabbitMQ tells no
# client, so consumers would receive nothing and our own publishes be unroutable until a service restarted.
TOPOLOGY_REDECLARE_SECONDS = 30.0
TOPOLOGY_DECLARE_TIMEOUT_SECONDS = 10.0
# Encoded Basic.Publish frames kept by a Broker (routing keys x channel numbers; a handful in practice).
PUBLISH_FRAMES_KEPT = 256

ConnectedHook = Callable[[AbstractRobustConnection], Awaitable[None]]


class PublishFailed(Exception):
    """The broker did not confirm the message (down, nack or no confirm within the timeout)."""


class Unroutable(Exception):
    """The broker confirmed but no queue was bound for the routing key (a mandatory publish)."""


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """One message of `Broker.publish_batch`."""

    routing_key: str
    body: bytes
    message_id: str
    content_type: str
    correlation_id: str | None = None


class Broker:
    """The service's one robust connection to RabbitMQ, with a confirm channel for publishing.

    A lost connection is logged once as a warning ("lost the connection to RabbitMQ, reconnecting",
    with the error) and its return once ("RabbitMQ recovered: reconnected to RabbitMQ", with the
    outage's length), however many attempts the robust connection makes in between."""

    def __init__(self, url: str, topology: Topology, *, connection_name: str) -> None:
        self.url = url
        self.topology = topology
        self.connection_name = connection_name
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._requeue_exchange: AbstractExchange | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._publish_frames: dict[tuple[int, str], bytes] = {}  # see `_publish_frame`
        self._channel_guard: asyncio.Task[None] | None = None  # see `_reopen_when_left_closed`
        self._topology_keeper: asyncio.Task[None] | None = None  # see `_keep_topology`
        self._topology_lock = asyncio.Lock()
        self.topology_redeclare_seconds = TOPOLOGY_REDECLARE_SECONDS
        self.channel_left_closed_seconds = CHANNEL_LEFT_CLOSED_SECONDS
        self.outage = OutageLog(
            log, "lost the connection to RabbitMQ, reconnecting", "RabbitMQ recovered: reconnected to RabbitMQ",
            fields={"url": redact_url(url)},
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and self.connection is not None
            and not self.connection.is_closed
            and self.connection.connected.is_set()  # cleared while the robust connection reconnects
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def run(self, on_connected: ConnectedHook | None = None) -> None:
        """Connect (retrying with backoff), declare the topology, then let the robust connection
        reconnect by itself. Returns once connected; cancel the task to give up."""
        delay = RECONNECT_DELAY_SECONDS
        while True:
            connection = aio_pika.RobustConnection(
                make_url(self.url), client_properties={"connection_name": self.connection_name}
            )
            try:
                await connection.connect(timeout=CONNECT_TIMEOUT_SECONDS)
                break
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                await _abandon(connection)
                log.warning(
                    "cannot connect to RabbitMQ, retrying",
                    extra={
                        "url": redact_url(self.url),
                        "error": str(exc) or type(exc).__name__,
                        "retry_in_seconds": delay,
                    },
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_SECONDS)
            except BaseException:
                # Cancelled (the service stops) mid-attempt: close it, or its reconnect loop, which survives
                # cancellation, keeps the process from ever exiting and logs every 5 s meanwhile.
                await _abandon(connection)
                raise
        self.connection = connection
        connection.reconnect_callbacks.add(self._on_reconnected)
        connection.close_callbacks.add(self._on_connection_lost)
        self._channel = await connection.channel(publisher_confirms=True)
        self._channel.close_callbacks.add(self._on_channel_closed)
        self._exchange = await declare_topology(self._channel, self.topology)
        self._requeue_exchange = await declare_requeue_exchange(self._channel, self.topology)
        if on_connected is not None:
            await on_connected(connection)
        self._ready.set()
        log.info("connected to RabbitMQ", extra={"url": redact_url(self.url)})
        if self._topology_keeper is None:
            self._topology_keeper = asyncio.get_running_loop().create_task(self._keep_topology())

    def _on_connection_lost(self, _: object, error: BaseException | None = None) -> None:
        # aiormq and aio-pika log the loss and every reconnect attempt in their own words (shared/logs.py
        # drops those lines); this is the one line an operator gets.
        if self._closing:
            return
        self.outage.down(error if error is not None and not isinstance(error, asyncio.CancelledError) else "closed")

    def _on_reconnected(self, *_: object) -> None:
        self.outage.up()

    def _on_channel_closed(self, *_: object) -> None:
        if self._closing or (self._channel_guard is not None and not self._channel_guard.done()):
            return
        self._channel_guard = asyncio.get_running_loop().create_task(self._reopen_when_left_closed())

    async def _reopen_when_left_closed(self) -> None:
        """Reopen the publishing channel when aio-pika has left it closed while the connection is up.

        The robust channel reopens itself after the broker closes it (a publish to a deleted exchange), but gives up
        for good when that reopening fails, for instance on an RPC timeout while the connection is busy with a large
        batch (seen in a breaker's run: the Broker never published again, though connected). Waits
        `channel_left_closed_seconds`, then restores it (reopened, the topology declared again) with backoff, for as
        long as it stays closed, the connection is up and the Broker is not closing; a reconnecting connection
        restores its channels by itself. Logs a warning per reopening and per failed try."""
        delay = self.channel_left_closed_seconds
        while True:
            await asyncio.sleep(delay)
            channel, connection = self._channel, self.connection
            if self._closing or channel is None or connection is None or not channel.is_closed:
                return
            if connection.is_closed or not connection.connected.is_set():
                continue  # the robust connection restores its channels when it is back
            try:
                await channel.restore()
            except _REOPEN_FAILURES as exc:
                log.warning("cannot reopen the publishing channel to RabbitMQ, retrying", extra={"error": repr(exc)})
                delay = min(delay * 2, MAX_CHANNEL_REOPEN_DELAY_SECONDS)
                continue
            log.warning("reopened the publishing channel to RabbitMQ, which had stayed closed")
            return

    async def restore_topology(self) -> bool:
        """Declare every exchange, queue and binding of the topology again (idempotent: what exists is left as it
        is), on a short-lived channel of its own: a robust channel would keep each declared object to restore it,
        growing with every call, and a refused declaration closes only that channel. True if all was declared;
        False if the Broker is not ready, or the broker refused or did not answer within
        TOPOLOGY_DECLARE_TIMEOUT_SECONDS (logged as a warning; a lost connection is logged by the Broker itself)."""
        connection = self.connection
        if not self.ready or connection is None:
            return False
        async with self._topology_lock:
            try:
                async with asyncio.timeout(TOPOLOGY_DECLARE_TIMEOUT_SECONDS):
                    async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
                        await declare_topology(channel, self.topology)
                        await declare_requeue_exchange(channel, self.topology)
            except _REOPEN_FAILURES as exc:
                if self.ready:
                    log.warning("cannot declare the topology on RabbitMQ again", extra={"error": repr(exc)})
                return False
        return True

    async def _keep_topology(self) -> None:
        """Every `topology_redeclare_seconds`, `restore_topology` while the Broker is ready, until it closes."""
        while not self._closing:
            await asyncio.sleep(self.topology_redeclare_seconds)
            await self.restore_topology()

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        content_type: str,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: float | None = None,
        timeout: float = PUBLISH_TIMEOUT_SECONDS,
    ) -> None:
        """Publish persistent and mandatory, and wait for the broker's confirm. Raises PublishFailed (not confirmed)
        or Unroutable (no queue bound: the topology is declared again before it is raised)."""
        if not self.ready or self._exchange is None:
            raise PublishFailed("not connected to RabbitMQ")
        message = aio_pika.Message(
            body,
            message_id=message_id,
            content_type=content_type,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=expiration,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=time.time(),
        )
        try:
            await _confirmed(
                self._exchange, message, routing_key, timeout,
                unroutable=f"no queue is bound for {routing_key!r} on {self.topology.exchange!r}",
            )  # fmt: skip
        except Unroutable:
            # A single publish is a request to a queue of our own (a tick, a /test): none bound means the exchange
            # was declared again without our bindings. Bound again here, the caller's retry goes through.
            await self.restore_topology()
            raise

    async def publish_batch(
        self, messages: Sequence[OutgoingEvent], *, timeout: float = PUBLISH_TIMEOUT_SECONDS
    ) -> list[PublishFailed | Unroutable | None]:
        """Publish many messages persistent and mandatory with their confirms pipelined: all of them are
        written to the channel at once and their confirms awaited together, within one `timeout` for the whole
        batch (one round trip per batch rather than per message). Returns one outcome per message, in order:
        None when the broker confirmed it (routed); Unroutable when it confirmed it but no queue was bound for
        its routing key; PublishFailed when it was not confirmed (not connected, nack, lost connection, no
        confirm in time): such a message may or may not have reached the broker, so the caller publishes it
        again (at least once)."""
        if not messages:
            return []
        if not self.ready or self._exchange is None:
            return [PublishFailed("not connected to RabbitMQ")] * len(messages)
        try:
            # A robust channel's underlay waits for the connection while it reconnects: bounded like the publish.
            async with asyncio.timeout(timeout):
                channel = await self._channel.get_underlay_channel() if self._channel is not None else None
        except (TimeoutError, aiormq.exceptions.ChannelInvalidStateError) as exc:
            return [PublishFailed(repr(exc))] * len(messages)
        if isinstance(channel, aiormq.Channel) and all(hasattr(channel, name) for name in _PIPELINE_NEEDS):
            return await self._publish_pipelined(channel, messages, timeout)
        return await self._publish_each(self._exchange, messages, timeout)

    async def _publish_pipelined(
        self, channel: aiormq.Channel, messages: Sequence[OutgoingEvent], timeout: float
    ) -> list[PublishFailed | Unroutable | None]:
        """The batch as aiormq's `basic_publish` sends one message, for all of them at once: under the channel's
        lock each message gets its delivery tag and confirm future, the frames of the whole batch go to the
        connection's writer as one write, then the confirms are awaited together. Per message this costs no task,
        lock, write or drain of its own, and no callback: the confirms are plain futures, awaited in delivery-tag
        order (the order the broker confirms in), and one future of the channel's own, which aiormq fails when
        the channel closes, stands for the whole batch. The Basic.Publish frame of a routing key is the same for
        every message of this channel: it is encoded once (`_publish_frame`). Relies on aiormq's channel internals
        (`_PIPELINE_NEEDS`, checked before use); without them, `_publish_each`."""
        exchange = self.topology.exchange
        stamp = dt.datetime.fromtimestamp(int(time.time()), dt.UTC)
        outcomes: list[PublishFailed | Unroutable | None] = [None] * len(messages)
        encoded: list[tuple[int, bytes]] = []  # (index, frames) of the messages that go
        for index, message in enumerate(messages):
            properties = aiormq.spec.Basic.Properties(
                content_type=message.content_type,
                delivery_mode=_PERSISTENT,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                timestamp=stamp,
            )
            frames: list[Any] = [
                ContentHeader(properties=properties, body_size=len(message.body)),
                *channel._split_body(message.body),
            ]
            try:
                method = self._publish_frame(channel.number, message.routing_key)
                encoded.append(
                    (index, method + b"".join(pamqp.frame.marshal(frame, channel.number) for frame in frames))
                )
            except Exception as exc:  # a property AMQP cannot carry: this message is not sent, the rest go on
                outcomes[index] = PublishFailed(f"{message.routing_key}: {exc!r}")
        loop = asyncio.get_running_loop()
        confirms: list[tuple[int, int, asyncio.Future[Any]]] = []  # (index, delivery tag, confirm)
        failure: PublishFailed | None = None
        closed = channel.create_future()  # never resolved by us; aiormq fails it when the channel closes
        try:
            try:
                async with asyncio.timeout(timeout):
                    async with channel.lock:
                        if channel.is_closed:
                            # Closed while this batch waited for the lock: frames on its number now make RabbitMQ
                            # close the whole connection (504 CHANNEL_ERROR), every consumer with it.
                            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
                        encoded = _without_ids_in_flight(channel, messages, encoded, outcomes)
                        first = channel.delivery_tag + 1
                        drained = channel.create_future()
                        frame = ChannelFrame(
                            payload=b"".join(frames for _, frames in encoded), should_close=False, drain_future=drained
                        )
                        for tag, (index, _) in enumerate(encoded, first):
                            confirm = loop.create_future()
                            channel.confirmations[tag] = confirm
                            channel.message_id_delivery_tag[messages[index].message_id] = tag
                            confirms.append((index, tag, confirm))
                        channel.delivery_tag = first + len(encoded) - 1
                        try:
                            await channel.write_queue.put(frame)
                        except BaseException:
                            # Not sent: the broker has not seen these delivery tags; give them back, as basic_publish
                            # does.
                            channel.delivery_tag = first - 1
                            for _, tag, confirm in confirms:
                                channel.confirmations.pop(tag, None)
                                confirm.cancel()
                            raise
                        await asyncio.wait([drained])  # a channel closing meanwhile fails it
                    for _, _, confirm in confirms:
                        if not confirm.done():
                            await asyncio.wait([confirm, closed], return_when=asyncio.FIRST_COMPLETED)
                        if closed.done():
                            failure = PublishFailed(f"the channel closed: {closed.exception()!r}")
                            break
            except TimeoutError:
                failure = PublishFailed(f"no confirm within {timeout:g} s")
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError) as exc:
                failure = PublishFailed(repr(exc))
            if failure is not None and not confirms:
                return [outcome or failure for outcome in outcomes]
            for index, _, confirm in confirms:
                message = messages[index]
                if not confirm.done():
                    confirm.cancel()  # its confirm, should it still come, is dropped (aiormq logs that at DEBUG)
                    outcomes[index] = failure or PublishFailed("no confirm")
                elif confirm.cancelled():
                    outcomes[index] = failure or PublishFailed("cancelled: the channel closed")
                elif (error := confirm.exception()) is not None:
                    if isinstance(error, aiormq.exceptions.PublishError):  # returned, with on_return_raises
                        outcomes[index] = Unroutable(_no_queue(message.routing_key, exchange))
                    else:  # a nack (DeliveryError)
                        outcomes[index] = PublishFailed(f"{message.routing_key}: {error!r}")
                elif isinstance(confirm.result(), aiormq.abc.DeliveredMessage):  # returned: no queue was bound
                    outcomes[index] = Unroutable(_no_queue(message.routing_key, exchange))
            return outcomes
        finally:
            # What aiormq's `basic_publish` does once a publish is settled: forget its message id's delivery tag
            # (kept so that a returned message finds its confirm). One still in flight (this task was cancelled)
            # is forgotten when it settles.
            for index, tag, confirm in confirms:
                forget = _forget_message_id(channel, messages[index].message_id, tag)
                if confirm.done():
                    forget(confirm)
                else:
                    confirm.add_done_callback(forget)
            if closed.done():
                closed.exception()  # retrieved: asyncio would log it as never retrieved
            else:
                closed.cancel()

    def _publish_frame(self, channel_number: int, routing_key: str) -> bytes:
        """The encoded Basic.Publish frame (mandatory, to the topology's exchange) of `routing_key` on channel
        `channel_number`, made by pamqp once per routing key and channel. Raises what pamqp raises for a routing
        key AMQP cannot carry (longer than 255 bytes)."""
        key = (channel_number, routing_key)
        frame = self._publish_frames.get(key)
        if frame is None:
            frame = pamqp.frame.marshal(
                aiormq.spec.Basic.Publish(exchange=self.topology.exchange, routing_key=routing_key, mandatory=True),
                channel_number,
            )
            if len(self._publish_frames) < PUBLISH_FRAMES_KEPT:
                self._publish_frames[key] = frame
        return frame

    async def _publish_each(
        self, exchange: AbstractExchange, messages: Sequence[OutgoingEvent], timeout: float
    ) -> list[PublishFailed | Unroutable | None]:
        """The batch as one aio-pika publish per message, all in flight together."""
        timestamp = time.time()
        # Each publish records its own outcome: after a timeout, those confirmed in time still count as sent.
        late = PublishFailed(f"no confirm within {timeout:g} s")
        outcomes: list[PublishFailed | Unroutable | None] = [late] * len(messages)

        async def publish_one(index: int, message: OutgoingEvent) -> None:
            try:
                await _confirmed(
                    exchange,
                    aio_pika.Message(
                        message.body,
                        message_id=message.message_id,
                        content_type=message.content_type,
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        timestamp=timestamp,
                    ),
                    message.routing_key,
                    None,  # the batch's timeout bounds them all
                    unroutable=_no_queue(message.routing_key, self.topology.exchange),
                )
            except (PublishFailed, Unroutable) as exc:
                outcomes[index] = exc
            except Exception as exc:  # e.g. a property aio-pika refuses: that message is not sent, the rest go on
                outcomes[index] = PublishFailed(f"{message.routing_key}: {exc!r}")
            else:
                outcomes[index] = None

        going: list[tuple[int, OutgoingEvent]] = []
        taken: set[str] = set()
        for index, message in enumerate(messages):
            if message.message_id in taken:  # see `_without_ids_in_flight`
                outcomes[index] = _id_in_flight(message)
            else:
                taken.add(message.message_id)
                going.append((index, message))
        with contextlib.suppress(TimeoutError):  # those without a confirm by then stay `late`
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(publish_one(index, message) for index, message in going))
        return outcomes

    async def publish_reply(self, reply_to: str, body: bytes, *, correlation_id: str) -> None:
        """Answer a request: to the asker's reply queue through the default exchange, with confirm."""
        if not self.ready or self._channel is None:
            raise PublishFailed("not connected to RabbitMQ")
        message = aio_pika.Message(body, correlation_id=correlation_id, content_type="application/json")
        await _confirmed(
            self._channel.default_exchange, message, reply_to, PUBLISH_TIMEOUT_SECONDS,
            unroutable=f"reply queue {reply_to!r} is gone",
        )  # fmt: skip

    async def requeue(self, message: AbstractIncomingMessage, queue_name: str, headers: HeadersType) -> None:
        """Put a copy of a delivered message back at the end of one queue, with confirm: the same body,
        routing key and properties, `headers` added, and without `x-delivery-count`, so that the copy starts
        with no delivery counted. It goes through the requeue exchange, which routes only to `queue_name`:
        other subscribers of the main exchange never see it twice. PublishFailed or Unroutable if it does
        not go; the caller still holds the original then."""
        if not self.ready or self._channel is None or self._requeue_exchange is None:
            raise PublishFailed("not connected to RabbitMQ")
        kept = {key: value for key, value in (message.headers or {}).items() if key != "x-delivery-count"}
        copy = aio_pika.Message(
            message.body,
            headers=kept | headers | {REQUEUE_HEADER: queue_name},
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            expiration=message.expiration,
            message_id=message.message_id,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        await _confirmed(
            self._requeue_exchange, copy, message.routing_key or "", PUBLISH_TIMEOUT_SECONDS,
            unroutable=f"queue {queue_name!r} is not bound to {self.topology.requeue_exchange!r}",
        )  # fmt: skip

    async def ping(self, timeout: float = 2.0) -> float:
        """Round trip to the broker in milliseconds (a passive declare of our exchange)."""
        if not self.ready or self._channel is None:
            raise PublishFailed("not connected to RabbitMQ")
        started = time.perf_counter()
        await asyncio.wait_for(self._channel.get_exchange(self.topology.exchange, ensure=True), timeout)
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        self._ready.clear()
        self._closing = True
        for task in (self._channel_guard, self._topology_keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.connection is not None:
            await self.connection.close()


async def _abandon(connection: aio_pika.RobustConnection) -> None:
    """Close a connection whose first attempt failed or was cancelled. A RobustConnection whose connect()
    did not succeed still owns a reconnect task; left open, it retries forever in the background, ignores
    cancellation and keeps the event loop (and so the process) from finishing."""
    try:
        await asyncio.shield(connection.close())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # closing a half-open connection may fail in many ways; it is gone either way
        log.debug("closing a failed RabbitMQ connection", extra={"error": repr(exc)})


async def _confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    timeout: float | None,
    *,
    unroutable: str,
) -> None:
    """Publish mandatory and wait for the confirm; PublishFailed or Unroutable when it does not go."""
    try:
        confirmation = await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
    except (
        TimeoutError,
        aiormq.exceptions.AMQPError,
        aiormq.exceptions.ChannelInvalidStateError,
        OSError,
        RuntimeError,
    ) as exc:
        raise PublishFailed(f"{routing_key}: {exc!r}") from None
    if isinstance(confirmation, aiormq.abc.DeliveredMessage):
        raise Unroutable(unroutable)


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
# The aiormq channel internals `Broker._publish_pipelined` uses, as `basic_publish` uses them.
_PIPELINE_NEEDS = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "_split_body")


def _without_ids_in_flight(
    channel: aiormq.Channel,
    messages: Sequence[OutgoingEvent],
    encoded: list[tuple[int, bytes]],
    outcomes: list[PublishFailed | Unroutable | None],
) -> list[tuple[int, bytes]]:
    """The encoded messages but those whose message id is already in flight on the channel (another publish's, or
    an earlier message's of this batch), which fail as not sent and go again later. aiormq finds the confirm of a
    returned message by its message id: with one id twice in flight, the return of one lands on the other's
    confirm, and a nacked message would be reported returned (Unroutable, which the relay marks sent). The outbox
    may hold one event id twice (no unique constraint; decision ids are deterministic). Call under the lock."""
    in_flight = channel.message_id_delivery_tag
    taken: set[str] = set()
    kept = []
    for index, frames in encoded:
        message_id = messages[index].message_id
        if message_id in in_flight or message_id in taken:
            outcomes[index] = _id_in_flight(messages[index])
        else:
            taken.add(message_id)
            kept.append((index, frames))
    return kept


def _id_in_flight(message: OutgoingEvent) -> PublishFailed:
    return PublishFailed(f"{message.routing_key}: message id {message.message_id!r} is in flight; not sent this time")


def _no_queue(routing_key: str, exchange: str) -> str:
    return f"no queue is bound for {routing_key!r} on {exchange!r}"


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int) -> Callable[[asyncio.Future[Any]], None]:
    """What aiormq's `basic_publish` does once a publish is settled: forget its message id's delivery tag (kept
    so that a returned message finds its confirm). The confirm's exception (a nack) is retrieved too: after its
    batch was cancelled nobody reads it, and asyncio would log each one as never retrieved."""

    def forget(confirm: asyncio.Future[Any]) -> None:
        if not confirm.cancelled():
            confirm.exception()
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget
