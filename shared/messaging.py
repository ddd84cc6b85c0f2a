"""The RabbitMQ connection of a service and publishing with confirms.

A service starts even while the broker is down: `Broker.run` keeps trying to connect in the
background, and from the first success on aio-pika's robust connection restores channels, the
topology and consumers after every broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.connection import make_url

from shared.outages import OutageLog
from shared.settings import redact_url
from shared.topology import REQUEUE_HEADER, Topology, declare_requeue_exchange, declare_topology

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 10.0
RECONNECT_DELAY_SECONDS = 1.0
MAX_RECONNECT_DELAY_SECONDS = 15.0

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
    outage's length), however many attempts the robust connection makes in between. `quiet` logs both
    at DEBUG: for a second connection of the same process (the poller's relay thread)."""

    def __init__(self, url: str, topology: Topology, *, connection_name: str, quiet: bool = False) -> None:
        self.url = url
        self.topology = topology
        self.connection_name = connection_name
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._requeue_exchange: AbstractExchange | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self.outage = OutageLog(
            log, "lost the connection to RabbitMQ, reconnecting", "RabbitMQ recovered: reconnected to RabbitMQ",
            fields={"url": redact_url(url)}, quiet=quiet,
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
        self._exchange = await declare_topology(self._channel, self.topology)
        self._requeue_exchange = await declare_requeue_exchange(self._channel, self.topology)
        if on_connected is not None:
            await on_connected(connection)
        self._ready.set()
        log.info("connected to RabbitMQ", extra={"url": redact_url(self.url)})

    def _on_connection_lost(self, _: object, error: BaseException | None = None) -> None:
        # aiormq and aio-pika log the loss and every reconnect attempt in their own words (shared/logs.py
        # drops those lines); this is the one line an operator gets.
        if self._closing:
            return
        self.outage.down(error if error is not None and not isinstance(error, asyncio.CancelledError) else "closed")

    def _on_reconnected(self, *_: object) -> None:
        self.outage.up()

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
        """Publish persistent and mandatory, and wait for the broker's confirm."""
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
        await _confirmed(
            self._exchange, message, routing_key, timeout,
            unroutable=f"no queue is bound for {routing_key!r} on {self.topology.exchange!r}",
        )  # fmt: skip

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
        exchange = self._exchange
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
                    unroutable=f"no queue is bound for {message.routing_key!r} on {self.topology.exchange!r}",
                )
            except (PublishFailed, Unroutable) as exc:
                outcomes[index] = exc
            except Exception as exc:  # e.g. a property aio-pika refuses: that message is not sent, the rest go on
                outcomes[index] = PublishFailed(f"{message.routing_key}: {exc!r}")
            else:
                outcomes[index] = None

        with contextlib.suppress(TimeoutError):  # those without a confirm by then stay `late`
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(publish_one(index, message) for index, message in enumerate(messages)))
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
