"""Batch publishing with pipelined confirms (Broker.publish_batch) and the outbox relay on it, against the real
broker: a message the broker nacks, one no queue is bound for, or a connection lost in the middle of a batch
loses nothing; only confirmed rows are marked sent."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from prometheus_client import CollectorRegistry

from shared import messaging
from shared.events import CLOUDEVENTS_CONTENT_TYPE
from shared.messaging import Broker, OutgoingEvent, PublishFailed, Unroutable
from shared.outbox import OutboxMetrics, OutboxRelay
from shared.topology import Topology
from tests.support.services import BackingServices
from tests.support.tcp_proxy import tcp_proxy


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


@pytest.fixture
async def broker(backing: BackingServices, exchange_name: str) -> AsyncIterator[Broker]:
    connected = Broker(backing.amqp_url, Topology(exchange_name), connection_name="test-outbox-batches")
    await connected.run()
    yield connected
    await connected.close()


@pytest.fixture
async def channel(backing: BackingServices) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(backing.amqp_url)
    yield await connection.channel()
    await connection.close()


async def _bound_queue(
    channel: AbstractChannel, exchange_name: str, routing_key: str, max_length: int | None = None
) -> AbstractQueue:
    """An exclusive queue of the test's own bound to `routing_key`; with `max_length`, the broker nacks every
    publish beyond that many messages waiting (overflow reject-publish)."""
    arguments: dict[str, object] = {}
    if max_length is not None:
        arguments = {"x-max-length": max_length, "x-overflow": "reject-publish"}
    queue = await channel.declare_queue(exclusive=True, arguments=arguments)  # type: ignore[arg-type]
    await queue.bind(exchange_name, routing_key)
    return queue


async def _drain(queue: AbstractQueue) -> list[str]:
    """The message ids waiting on `queue`, in order; takes them off it."""
    ids = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        ids.append(message.message_id or "")
    return ids


def _event(routing_key: str, number: int) -> OutgoingEvent:
    return OutgoingEvent(routing_key, f'{{"n": {number}}}'.encode(), str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE)


@pytest.fixture(params=["pipelined", "each"])
def publish_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of publishing a batch: pipelined on aiormq's channel internals, and one aio-pika publish per
    message (what runs should those internals change)."""
    if request.param == "each":
        monkeypatch.setattr(messaging, "_PIPELINE_NEEDS", (*messaging._PIPELINE_NEEDS, "no_such_attribute"))
    else:

        async def not_this_way(*_: object) -> None:
            raise AssertionError("the pipelined path fell back to one publish per message")

        monkeypatch.setattr(Broker, "_publish_each", not_this_way)
    return str(request.param)


async def test_a_message_amqp_cannot_carry_fails_alone(
    broker: Broker, channel: AbstractChannel, exchange_name: str, publish_path: str
) -> None:
    routing_key = f"test.batch.{uuid.uuid4().hex[:8]}.carry"
    queue = await _bound_queue(channel, exchange_name, routing_key)
    too_long = OutgoingEvent(routing_key, b"{}", str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE, "é" * 200)
    messages = [_event(routing_key, 0), too_long, _event(routing_key, 2)]
    outcomes = await broker.publish_batch(messages)
    assert outcomes[0] is None and isinstance(outcomes[1], PublishFailed) and outcomes[2] is None
    assert await _drain(queue) == [messages[0].message_id, messages[2].message_id]


async def test_publish_batch_reports_each_message_in_order(
    broker: Broker, channel: AbstractChannel, exchange_name: str, publish_path: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    routed, limited, nobody = f"test.batch.{tag}.routed", f"test.batch.{tag}.limited", f"test.batch.{tag}.nobody"
    routed_queue = await _bound_queue(channel, exchange_name, routed)
    limited_queue = await _bound_queue(channel, exchange_name, limited, max_length=2)
    # Routed, unroutable and nacked messages interleaved: a failure in the middle of the batch.
    messages = [
        _event(routed, 0), _event(limited, 1), _event(nobody, 2), _event(limited, 3), _event(routed, 4),
        _event(limited, 5), _event(limited, 6), _event(routed, 7),
    ]  # fmt: skip
    outcomes = await broker.publish_batch(messages)

    kinds = [type(outcome).__name__ if outcome is not None else "ok" for outcome in outcomes]
    assert kinds == ["ok", "ok", "Unroutable", "ok", "ok", "PublishFailed", "PublishFailed", "ok"]
    assert isinstance(outcomes[2], Unroutable) and nobody in str(outcomes[2])
    # Every confirmed message is on its queue, in order; the nacked ones are not.
    assert await _drain(routed_queue) == [messages[i].message_id for i in (0, 4, 7)]
    assert await _drain(limited_queue) == [messages[i].message_id for i in (1, 3)]
    # The properties are those of Broker.publish: persistent, the content type and the message id.
    await broker.publish_batch([messages[0]])
    received = await routed_queue.get(no_ack=True)
    assert received.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert received.content_type == CLOUDEVENTS_CONTENT_TYPE and received.message_id == messages[0].message_id
    assert received.body == messages[0].body and received.timestamp is not None


async def test_publish_batch_not_connected_fails_every_message(backing: BackingServices, exchange_name: str) -> None:
    never_connected = Broker(backing.amqp_url, Topology(exchange_name), connection_name="test-never")
    outcomes = await never_connected.publish_batch([_event("x", 0), _event("y", 1)])
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes) and len(outcomes) == 2
    assert await never_connected.publish_batch([]) == []


BATCH_TIMEOUT_SECONDS = 60


async def test_a_connection_lost_in_the_middle_of_a_batch_loses_no_confirmed_message(
    backing: BackingServices, channel: AbstractChannel, exchange_name: str, publish_path: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    routing_key = f"test.batch.{tag}.cut"
    amqp = urlsplit(backing.amqp_url)
    with tcp_proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as proxy:
        broker = Broker(_through(backing.amqp_url, proxy.port), Topology(exchange_name), connection_name="test-cut")
        await broker.run()  # declares the exchange
        try:
            queue = await _bound_queue(channel, exchange_name, routing_key)
            body = b"x" * 20_000
            messages = [
                OutgoingEvent(routing_key, body, str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE) for _ in range(3000)
            ]
            publishing = asyncio.create_task(broker.publish_batch(messages, timeout=BATCH_TIMEOUT_SECONDS))
            while len(await _peek_count(channel, queue)) == 0:  # the first messages have arrived
                await asyncio.sleep(0.001)
            proxy.cut()
            cut_at = time.monotonic()
            outcomes = await publishing
            waited = time.monotonic() - cut_at
        finally:
            proxy.restore()
            await broker.close()
    confirmed = {message.message_id for message, outcome in zip(messages, outcomes, strict=True) if outcome is None}
    failed = [outcome for outcome in outcomes if outcome is not None]
    assert failed, "the cut came after the whole batch was confirmed: the test did not test anything"
    assert all(isinstance(outcome, PublishFailed) for outcome in failed)
    # The closed channel fails the batch at once, not when its timeout runs out.
    assert waited < BATCH_TIMEOUT_SECONDS / 2, waited
    # What the broker confirmed is on the queue (some unconfirmed messages may be there too: at least once).
    await asyncio.sleep(0.5)
    assert confirmed <= set(await _drain(queue))


async def _peek_count(channel: AbstractChannel, queue: AbstractQueue) -> list[int]:
    declared = await channel.declare_queue(queue.name, passive=True)
    count = int(declared.declaration_result.message_count or 0)
    return [count] if count else []


@pytest.fixture
async def pool(private_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of the test's own: no API process relays its outbox behind the test's back."""
    created = await asyncpg.create_pool(private_database, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


async def test_relay_marks_only_confirmed_rows_sent_and_publishes_the_rest_later(
    pool: asyncpg.Pool, broker: Broker, channel: AbstractChannel, exchange_name: str, publish_path: str
) -> None:
    """A batch whose middle the broker nacks: the confirmed rows are marked sent, the nacked ones stay unsent
    and go out on a later pass; in the end every event has arrived, none is lost."""
    tag = uuid.uuid4().hex[:8]
    routing_key = f"test.relay.{tag}"
    queue = await _bound_queue(channel, exchange_name, routing_key, max_length=4)
    # Rows as `enqueue` writes them, on a routing key of the test's own (which `enqueue` would refuse).
    event_ids = [str(uuid.uuid4()) for _ in range(10)]
    async with pool.acquire() as db:
        await db.executemany(
            "INSERT INTO outbox (event_id, routing_key, body) VALUES ($1, $2, $3)",
            [(uuid.UUID(event_id), routing_key, b'{"n": 1}') for event_id in event_ids],
        )
    metrics = OutboxMetrics(CollectorRegistry())
    relay = OutboxRelay(pool, broker, metrics)
    with pytest.raises(PublishFailed):
        await relay.relay_batch()
    async with pool.acquire() as db:
        sent = await db.fetch("SELECT event_id FROM outbox WHERE sent_at IS NOT NULL ORDER BY id")
    received = await _drain(queue)
    assert [str(row["event_id"]) for row in sent] == received == event_ids[:4]
    assert metrics.publish_failures._value.get() == 0  # counted by the relay loop, not by relay_batch
    # Each later pass publishes four more (the queue is emptied in between), until none is left.
    for _ in range(5):
        try:
            await relay.relay_batch()
        except PublishFailed:
            pass
        received += await _drain(queue)
        async with pool.acquire() as db:
            if not await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"):
                break
    assert received == event_ids
