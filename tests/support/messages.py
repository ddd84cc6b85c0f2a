"""Messages in tests: capturing what healthgate publishes, sending job events, reading the dead-letter queue,
and a fake incoming message for handlers run in the test's own process.

Used by the fixtures `events`, `jobs` and `dead` (tests/conftest.py) and by the tests themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from shared.topology import Topology, declare_exchange

# The routing keys of a job host's decision (CONTRACT §5).
DECISIONS = ("job.released", "job.failed", "job.cancelled")


def in_seconds(seconds: float) -> str:
    """An RFC 3339 time `seconds` from now, as a job.start's `window_ends_at`."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


# ---- capturing what is published -------------------------------------------------------------------


@dataclass
class CapturedEvent:
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    body: bytes

    @property
    def document(self) -> dict[str, object]:
        """The body as JSON (a structured CloudEvent for everything healthgate publishes)."""
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def data(self) -> dict[str, object]:
        return self.document["data"]  # type: ignore[return-value]


@dataclass
class EventCapture:
    """Every message published on an exchange while the test runs (the `events` fixture: the session's)."""

    events: list[CapturedEvent] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.events.append(
            CapturedEvent(
                message.routing_key or "",
                message.message_id,
                message.correlation_id,
                message.content_type,
                message.body,
            )
        )
        self.arrived.set()

    def matching(
        self, routing_key: str, predicate: Callable[[CapturedEvent], bool] = lambda _: True
    ) -> list[CapturedEvent]:
        return [event for event in self.events if event.routing_key == routing_key and predicate(event)]

    async def wait_for(
        self,
        routing_key: str,
        predicate: Callable[[CapturedEvent], bool] = lambda _: True,
        *,
        count: int = 1,
        timeout: float = 10,
    ) -> list[CapturedEvent]:
        async with asyncio.timeout(timeout):
            while len(found := self.matching(routing_key, predicate)) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return found


@contextlib.asynccontextmanager
async def capture_events(amqp_url: str, exchange_name: str) -> AsyncIterator[EventCapture]:
    """Every message published on the exchange while the caller runs (the `events` fixture)."""
    capture = EventCapture()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_exchange(channel, Topology(exchange_name))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(capture.on_message, no_ack=True)
        yield capture


def decision_of(events: EventCapture, job_id: str) -> list[CapturedEvent]:
    """The decision events captured for `job_id` (any host), in the order of DECISIONS."""
    return [event for key in DECISIONS for event in events.matching(key, lambda event: event.data["job_id"] == job_id)]


async def wait_decision(events: EventCapture, job_id: str, timeout: float = 15) -> CapturedEvent:
    """The first decision event of `job_id`, waiting up to `timeout` seconds for it."""
    async with asyncio.timeout(timeout):
        while not (found := decision_of(events, job_id)):
            events.arrived.clear()
            await events.arrived.wait()
    return found[0]


# ---- sending job events ----------------------------------------------------------------------------


class Publisher:
    """Sends job.start/job.cancel (or any body) to an exchange, persistent, as an executor would."""

    def __init__(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        self.exchange = exchange

    async def send(self, routing_key: str, body: object, *, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else json.dumps(body).encode()
        message = aio_pika.Message(
            payload, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.exchange.publish(message, routing_key)

    async def start(self, job_id: str, host_id: str, window_seconds: float = 60, *, cloudevent: bool = False) -> None:
        data: dict[str, Any] = {"job_id": job_id, "host_id": host_id, "window_ends_at": in_seconds(window_seconds)}
        if cloudevent:
            data = {
                "specversion": "1.0", "id": str(uuid.uuid4()), "source": "/patcher", "type": "patch.job.start",
                "data": data,
            }  # fmt: skip
        await self.send("job.start", data)


# ---- the dead-letter queue -------------------------------------------------------------------------


@dataclass
class DeadLetters:
    """Messages taken out of `<exchange>.dead` (shared by the session: each test takes what is there)."""

    queue: aio_pika.abc.AbstractQueue
    messages: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)

    async def drain(self) -> None:
        while (message := await self.queue.get(fail=False)) is not None:
            await message.ack()
            self.messages.append(message)

    def with_marker(self, marker: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        return [message for message in self.messages if marker.encode() in message.body]

    async def wait_for(
        self, marker: str, count: int, timeout: float = 15
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        async with asyncio.timeout(timeout):
            while len(self.with_marker(marker)) < count:
                await self.drain()
                await asyncio.sleep(0.1)
        return self.with_marker(marker)


def rejected_once(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """Dead-lettered by a reject on its first delivery, not after a loop of redeliveries."""
    deaths = (message.headers or {}).get("x-death") or []
    return len(deaths) == 1 and deaths[0]["reason"] == "rejected" and deaths[0]["count"] == 1


# ---- a message for a handler run in this process ------------------------------------------------------


@dataclass
class FakeMessage:
    """An incoming message as a consumer's handler sees it (the attributes and methods the handlers of
    services/ read), without a broker: `settlements` records each ack, reject and nack in order, as
    ("ack", None), ("reject", requeue) or ("nack", requeue). `on_settle`, if given, runs inside each
    settlement before it is recorded (to look at the database at the moment the message is acked)."""

    body: bytes
    routing_key: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_tag: int = 1
    redelivered: bool = False
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = "application/json"
    reply_to: str | None = None
    on_settle: Callable[[str], Awaitable[None]] | None = None
    settlements: list[tuple[str, bool | None]] = field(default_factory=list)

    @property
    def processed(self) -> bool:
        return bool(self.settlements)

    async def _settle(self, how: str, requeue: bool | None) -> None:
        if self.settlements:
            raise RuntimeError(f"message settled twice: {self.settlements[0][0]}, then {how}")
        if self.on_settle is not None:
            await self.on_settle(how)
        self.settlements.append((how, requeue))

    async def ack(self, multiple: bool = False) -> None:
        await self._settle("ack", None)

    async def reject(self, requeue: bool = False) -> None:
        await self._settle("reject", requeue)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self._settle("nack", requeue)
