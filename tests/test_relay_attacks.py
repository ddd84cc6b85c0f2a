"""Attacks on the relay's pipelined batch publishing (Broker.publish_batch) against the real broker: the exchange
deleted and restored, a channel that closed and reopened under a batch, single publishes and batches interleaved on
one channel with nacks and returns, odd properties and sizes, two relays on one outbox with cuts, and one event id
twice in flight."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
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
from tests.support.topology import delete_topology


@pytest.fixture
async def own_exchange(backing: BackingServices) -> AsyncIterator[str]:
    """An exchange of the test's own; its whole topology (the quorum queues a Broker declares with it too) is
    deleted after the test: left behind, each run's queues kept files open in RabbitMQ until it ran out of them
    and accepted no connection."""
    name = f"hgtest-break-{uuid.uuid4().hex[:8]}"
    yield name
    await delete_topology(backing.amqp_url, name)


@pytest.fixture
async def broker(backing: BackingServices, own_exchange: str) -> AsyncIterator[Broker]:
    connected = Broker(backing.amqp_url, Topology(own_exchange), connection_name="test-relay-attacks")
    await connected.run()
    yield connected
    await connected.close()


@pytest.fixture
async def channel(backing: BackingServices) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(backing.amqp_url)
    yield await connection.channel()
    await connection.close()


async def _bound_queue(channel: AbstractChannel, exchange: str, routing_key: str) -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key)
    return queue


async def _drain(queue: AbstractQueue) -> list[str]:
    ids = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        ids.append(message.message_id or "")
    return ids


def _event(routing_key: str, number: int, body: bytes | None = None) -> OutgoingEvent:
    return OutgoingEvent(
        routing_key, body or f'{{"n": {number}}}'.encode(), str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE
    )


async def test_exchange_deleted_mid_run_then_restored(
    broker: Broker, channel: AbstractChannel, own_exchange: str
) -> None:
    """The exchange deleted under the broker (the channel closes, 404): the batch fails whole, the next fails fast
    while the channel reopens; once the exchange is back, batches and single publishes interleaved are confirmed
    each for its own message."""
    routing_key = "test.break.gone"
    await channel.exchange_delete(own_exchange)
    outcomes = await broker.publish_batch([_event(routing_key, n) for n in range(5)], timeout=3)
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes)
    outcomes = await broker.publish_batch([_event(routing_key, n) for n in range(5)], timeout=3)
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes)
    assert broker.connection is not None and not broker.connection.is_closed
    await channel.declare_exchange(own_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await _bound_queue(channel, own_exchange, routing_key)
    await _until_ready(broker)
    batch = [_event(routing_key, n) for n in range(50)]
    singles = [_event(routing_key, 100 + n) for n in range(10)]
    results = await asyncio.gather(
        broker.publish_batch(batch, timeout=5),
        *(broker.publish(m.routing_key, m.body, message_id=m.message_id, content_type=m.content_type) for m in singles),
    )
    assert results[0] == [None] * 50 and results[1:] == [None] * 10
    await asyncio.sleep(0.3)
    assert set(await _drain(queue)) == {m.message_id for m in batch + singles}


async def _until_ready(broker: Broker) -> None:
    for _ in range(300):
        if broker.ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the broker did not come back")


async def test_a_batch_on_a_channel_closed_and_reopened_meanwhile(
    broker: Broker, channel: AbstractChannel, own_exchange: str
) -> None:
    """The batch took the underlay channel, then waited (for its lock) while the broker closed it and the robust
    channel reopened one on the same number: it fails, writes nothing on the new channel (no stray confirms for the
    new channel's delivery tags), and the next batch is confirmed right."""
    routing_key = "test.break.stale"
    queue = await _bound_queue(channel, own_exchange, routing_key)
    assert broker._channel is not None
    old = await broker._channel.get_underlay_channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):  # closes the channel from the broker's side
        await broker._channel.get_exchange("hgtest-no-such-exchange", ensure=True)
    for _ in range(300):
        new = await broker._channel.get_underlay_channel()
        if new is not old and broker.ready:
            break
        await asyncio.sleep(0.05)
    assert new is not old and new.number == old.number
    stale = [_event(routing_key, n) for n in range(5)]
    outcomes = await broker._publish_pipelined(old, stale, 3)  # type: ignore[arg-type]
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes)
    fresh = [_event(routing_key, 100 + n) for n in range(5)]
    assert await broker.publish_batch(fresh, timeout=3) == [None] * 5
    await asyncio.sleep(0.3)
    assert await _drain(queue) == [m.message_id for m in fresh]
    assert broker.connection is not None and not broker.connection.is_closed


async def _limited_queue(channel: AbstractChannel, exchange: str, routing_key: str, limit: int) -> AbstractQueue:
    queue = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": limit, "x-overflow": "reject-publish"}
    )
    await queue.bind(exchange, routing_key)
    return queue


async def test_concurrent_publish_and_batches_get_their_own_confirms(
    broker: Broker, channel: AbstractChannel, own_exchange: str
) -> None:
    """Batches and single publishes interleaved on one channel, to a queue that nacks beyond its length, a key no
    queue is bound to and a plain queue: every outcome is the broker's answer to that very message."""
    routed, limited, nobody = "test.break.routed", "test.break.limited", "test.break.nobody"
    routed_queue = await _bound_queue(channel, own_exchange, routed)
    limited_queue = await _limited_queue(channel, own_exchange, limited, 37)
    keys = [routed, limited, nobody]
    sent: list[tuple[OutgoingEvent, object]] = []

    async def one(message: OutgoingEvent) -> None:
        try:
            await broker.publish(
                message.routing_key, message.body, message_id=message.message_id, content_type=message.content_type
            )
            sent.append((message, None))
        except Exception as exc:
            sent.append((message, exc))

    async def batch(messages: list[OutgoingEvent]) -> None:
        sent.extend(zip(messages, await broker.publish_batch(messages, timeout=10), strict=True))

    work = []
    for round_ in range(8):
        messages = [_event(keys[(round_ + n) % 3], n) for n in range(40)]
        work.append(batch(messages))
        work.extend(one(_event(keys[n % 3], n)) for n in range(5))
    await asyncio.gather(*work)
    await asyncio.sleep(0.5)
    on_routed = set(await _drain(routed_queue))
    on_limited = set(await _drain(limited_queue))
    for message, outcome in sent:
        name = type(outcome).__name__
        if message.routing_key == nobody:
            assert name == "Unroutable", (message, outcome)
        elif message.routing_key == routed:
            assert outcome is None and message.message_id in on_routed, (message, outcome)
        elif outcome is None:
            assert message.message_id in on_limited
        else:
            assert name == "PublishFailed" and message.message_id not in on_limited, (message, outcome)
    assert len(on_limited) == 37
    assert sum(1 for m, o in sent if m.routing_key == limited and o is None) == 37
    underlay = await broker._channel.get_underlay_channel()  # type: ignore[union-attr]
    assert not underlay.confirmations and not underlay.message_id_delivery_tag


def _through(url: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{port}"))


async def test_two_relays_on_one_outbox_with_cuts_lose_nothing(
    backing: BackingServices, private_database: str, channel: AbstractChannel, own_exchange: str
) -> None:
    """Two relays (one through a proxy cut twice mid-run) on one outbox, rows added while they run: in the end every
    row is marked sent and every event has arrived (duplicates allowed: at least once)."""
    from urllib.parse import urlsplit

    routing_key = "test.break.two"
    pool = await asyncpg.create_pool(private_database, min_size=1, max_size=8)
    assert pool is not None
    amqp = urlsplit(backing.amqp_url)
    direct = Broker(backing.amqp_url, Topology(own_exchange), connection_name="test-relay-a")
    await direct.run()
    queue = await _bound_queue(channel, own_exchange, routing_key)
    received: list[str] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(message.message_id or "")

    await queue.consume(on_message, no_ack=True)
    event_ids: list[uuid.UUID] = []
    with tcp_proxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as proxy:
        proxied = Broker(_through(backing.amqp_url, proxy.port), Topology(own_exchange), connection_name="test-b")
        await proxied.run()
        relays = [
            asyncio.create_task(OutboxRelay(pool, broker, OutboxMetrics(CollectorRegistry())).run())
            for broker in (direct, proxied)
        ]
        try:
            for chunk in range(12):
                ids = [uuid.uuid4() for _ in range(250)]
                event_ids += ids
                async with pool.acquire() as db:
                    await db.executemany(
                        "INSERT INTO outbox (event_id, routing_key, body) VALUES ($1, $2, $3)",
                        [(event_id, routing_key, b"y" * 4000) for event_id in ids],
                    )
                    await db.execute("NOTIFY healthgate_outbox")
                if chunk in (3, 8):
                    proxy.cut()
                    await asyncio.sleep(0.2)
                    proxy.restore()
                await asyncio.sleep(0.05)
            for _ in range(1200):
                async with pool.acquire() as db:
                    left = await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                if not left and len(set(received)) >= len(event_ids):
                    break
                await asyncio.sleep(0.1)
        finally:
            for relay in relays:
                relay.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            await proxied.close()
            await direct.close()
            await pool.close()
    assert left == 0
    missing = {str(event_id) for event_id in event_ids} - set(received)
    assert not missing, f"{len(missing)} events marked sent never arrived"


async def test_odd_messages_fail_alone_and_the_next_batch_is_confirmed_right(
    broker: Broker, channel: AbstractChannel, own_exchange: str
) -> None:
    """Properties AMQP cannot carry, a routing key too long, an empty body, bodies around the frame size and far
    beyond it, in one batch: each fails or goes on its own, and the channel's delivery tags stay right after."""
    key = "test.break.odd"
    queue = await _bound_queue(channel, own_exchange, key)
    underlay = await broker._channel.get_underlay_channel()  # type: ignore[union-attr]
    frame_max = underlay.connection.connection_tune.frame_max
    good = [
        _event(key, 0),
        OutgoingEvent(key, b"", str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"a" * (frame_max - 8), str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"b" * (frame_max - 7), str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"c" * (frame_max * 40 + 1), str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"{}", "\u00e9" * 127, CLOUDEVENTS_CONTENT_TYPE, "\u2603" * 85),
    ]
    bad = [
        OutgoingEvent(key, b"{}", "x" * 256, CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"{}", "\u00e9" * 128, CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"{}", str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE, "\ud800"),
        OutgoingEvent("k" * 256, b"{}", str(uuid.uuid4()), CLOUDEVENTS_CONTENT_TYPE),
        OutgoingEvent(key, b"{}", str(uuid.uuid4()), "t" * 300),
    ]
    messages = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    outcomes = await broker.publish_batch(messages, timeout=20)
    kinds = ["ok" if o is None else type(o).__name__ for o in outcomes]
    assert kinds == ["ok", "PublishFailed"] * 5 + ["ok"], outcomes
    assert broker.ready
    after = [_event(key, n) for n in range(20)]
    assert await broker.publish_batch(after) == [None] * 20
    await asyncio.sleep(0.3)
    assert await _drain(queue) == [m.message_id for m in good + after]


@pytest.mark.parametrize("path", ["pipelined", "each"])
async def test_a_shared_message_id_does_not_pass_a_nack_off_as_unroutable(
    broker: Broker, channel: AbstractChannel, own_exchange: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two outbox rows may carry one event id (the outbox has no unique event_id; decision ids are deterministic).
    aiormq finds a returned message's confirm by its message id: with the id twice in flight, the return of the
    first (no queue bound) lands on the second's confirm. When the broker nacks the second, the batch must not
    report it confirmed (Unroutable is marked sent by the relay): that event would be lost. (It was, before the
    fix: the second came back Unroutable.) The second goes in a later batch instead."""
    if path == "each":
        monkeypatch.setattr(messaging, "_PIPELINE_NEEDS", (*messaging._PIPELINE_NEEDS, "no_such_attribute"))
    nobody, limited = "test.break.dup.nobody", "test.break.dup.limited"
    limited_queue = await _limited_queue(channel, own_exchange, limited, 1)
    await broker.publish_batch([_event(limited, 0)])  # the queue is full: the next publish to it is nacked
    shared_id = str(uuid.uuid4())
    first = OutgoingEvent(nobody, b"{}", shared_id, CLOUDEVENTS_CONTENT_TYPE)
    second = OutgoingEvent(limited, b"{}", shared_id, CLOUDEVENTS_CONTENT_TYPE)
    outcomes = await broker.publish_batch([first, second])
    assert len(await _drain(limited_queue)) == 1  # the second did not arrive
    assert isinstance(outcomes[0], Unroutable) and isinstance(outcomes[1], PublishFailed), outcomes
    # Alone, in a later batch, it goes (the queue was emptied just above).
    assert await broker.publish_batch([second]) == [None]
    assert await _drain(limited_queue) == [shared_id]


async def test_nacks_of_a_cancelled_batch_are_not_logged_as_never_retrieved(
    broker: Broker, channel: AbstractChannel, own_exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch cancelled (a relay stopping) while its confirms are outstanding, and the broker then nacks them: no
    "Future exception was never retrieved" error per message, nothing left in the channel's bookkeeping, and the
    next batch is answered right."""
    limited = "test.break.cancelled.nacked"
    await _limited_queue(channel, own_exchange, limited, 0)  # every publish to it is nacked
    publishing = asyncio.create_task(broker.publish_batch([_event(limited, n) for n in range(50)], timeout=10))
    for _ in range(3):  # written, the confirms not yet in
        await asyncio.sleep(0)
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    await asyncio.sleep(1)  # the nacks arrive
    gc.collect()  # an unretrieved exception is logged when its future is freed
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    underlay = await broker._channel.get_underlay_channel()  # type: ignore[union-attr]
    assert not underlay.confirmations and not underlay.message_id_delivery_tag
    outcomes = await broker.publish_batch([_event(limited, 100 + n) for n in range(3)], timeout=5)
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes), outcomes


async def test_a_publishing_channel_left_closed_by_a_failed_reopening_is_reopened(
    backing: BackingServices, channel: AbstractChannel, own_exchange: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aio-pika's robust channel reopens itself after the broker closes it, but gives up for good when that
    reopening fails (a breaker saw "Channel closed by RPC timeout" while the connection was busy with large
    batches; the Broker stayed connected and never published again). The Broker reopens it itself."""
    broker = Broker(backing.amqp_url, Topology(own_exchange), connection_name="test-channel-left-closed")
    broker.channel_left_closed_seconds = 0.2
    await broker.run()
    try:
        routing_key = "test.break.reopened"
        queue = await _bound_queue(channel, own_exchange, routing_key)
        robust = broker._channel
        assert robust is not None
        reopen = type(robust).reopen
        failures = []

        async def reopen_failing_once(self: Any) -> None:
            if not failures:
                failures.append(self)
                raise aiormq.exceptions.ChannelInvalidStateError("Channel closed by RPC timeout")
            await reopen(self)

        monkeypatch.setattr(type(robust), "reopen", reopen_failing_once)
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):  # the broker closes the channel
            await robust.get_exchange("hgtest-no-such-exchange", ensure=True)
        await _until_ready(broker)
        assert failures, "aio-pika's own reopening did not run: the test tested nothing"
        event = _event(routing_key, 1)
        assert await broker.publish_batch([event], timeout=5) == [None]
        await broker.publish(routing_key, b"{}", message_id="single", content_type="application/json")
        await asyncio.sleep(0.3)
        assert sorted(await _drain(queue)) == sorted([event.message_id, "single"])
    finally:
        await broker.close()


class _PausingProxy:
    """A TCP proxy on the test's loop whose broker-to-client direction can be held (confirms delayed, not lost)."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool) -> None:
        try:
            while data := await reader.read(65536):
                if held:
                    await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (
            asyncio.create_task(self._pipe(reader, upstream_writer, False)),
            asyncio.create_task(self._pipe(upstream_reader, writer, True)),
        ):
            self.tasks.add(task)

    async def cut(self) -> None:
        """Close the connections made so far (both directions), as a lost network would; new ones are accepted."""
        tasks, self.tasks = self.tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.cut()


@pytest.fixture
async def held_broker(backing: BackingServices, own_exchange: str) -> AsyncIterator[tuple[_PausingProxy, Broker]]:
    """A running Broker on `own_exchange` connected through a `_PausingProxy` (flowing at first); both closed after
    the test, the proxy set flowing first so the Broker's close is not held."""
    from urllib.parse import urlsplit

    proxy = _PausingProxy(urlsplit(backing.amqp_url).port or 5672)
    port = await proxy.start()
    broker = Broker(_through(backing.amqp_url, port), Topology(own_exchange), connection_name="test-held-confirms")
    try:
        await broker.run()
        yield proxy, broker
    finally:
        proxy.flowing.set()
        await broker.close()
        await proxy.close()


async def test_confirms_arriving_after_the_batch_timed_out_confirm_nothing_else(
    held_broker: tuple[_PausingProxy, Broker], channel: AbstractChannel, own_exchange: str
) -> None:
    """The broker's confirms held back past the batch's timeout: the batch fails whole (nothing reported sent that
    the client did not see confirmed); when the late confirms arrive they settle nothing of the next batch, whose
    own confirms (and nacks) are its own."""
    routed, limited = "test.break.late", "test.break.late.limited"
    proxy, broker = held_broker
    queue = await _bound_queue(channel, own_exchange, routed)
    limited_queue = await _limited_queue(channel, own_exchange, limited, 3)
    late = [_event(routed, n) for n in range(30)]
    proxy.flowing.clear()
    outcomes = await broker.publish_batch(late, timeout=1)
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes), outcomes
    underlay = await broker._channel.get_underlay_channel()  # type: ignore[union-attr]
    next_batch = [_event(limited, n) for n in range(6)] + [_event(routed, 100 + n) for n in range(4)]
    publishing = asyncio.create_task(broker.publish_batch(next_batch, timeout=10))
    await asyncio.sleep(0.2)
    proxy.flowing.set()  # the late confirms, then those of the next batch
    outcomes = await publishing
    kinds = ["ok" if outcome is None else type(outcome).__name__ for outcome in outcomes]
    assert kinds == ["ok"] * 3 + ["PublishFailed"] * 3 + ["ok"] * 4
    await asyncio.sleep(0.3)
    assert await _drain(limited_queue) == [m.message_id for m in next_batch[:3]]
    # The timed-out batch did reach the broker (at least once): it is sent again by the relay, duplicates only.
    assert await _drain(queue) == [m.message_id for m in late + next_batch[6:]]
    assert not underlay.confirmations and not underlay.message_id_delivery_tag


async def test_a_connection_lost_while_confirms_are_awaited_fails_the_batch_at_once(
    held_broker: tuple[_PausingProxy, Broker], channel: AbstractChannel, own_exchange: str
) -> None:
    """The whole batch written, its confirms held back, then the connection lost: the batch fails whole at once
    (aiormq fails the closed channel's futures; the batch does not sit out its timeout), and once the broker is
    back the next batch is confirmed right."""
    routed = "test.break.lost"
    proxy, broker = held_broker
    queue = await _bound_queue(channel, own_exchange, routed)
    proxy.flowing.clear()
    timeout = 60.0
    publishing = asyncio.create_task(broker.publish_batch([_event(routed, n) for n in range(200)], timeout=timeout))
    for _ in range(200):  # every message reached the broker: only the confirms are missing
        declared = await channel.declare_queue(queue.name, passive=True)
        if declared.declaration_result.message_count == 200:
            break
        await asyncio.sleep(0.05)
    assert not publishing.done()
    cut_at = time.monotonic()
    await proxy.cut()
    outcomes = await publishing
    assert time.monotonic() - cut_at < timeout / 2
    assert all(isinstance(outcome, PublishFailed) for outcome in outcomes), outcomes
    proxy.flowing.set()
    await _until_ready(broker)
    fresh = [_event(routed, 1000 + n) for n in range(20)]
    for _ in range(100):  # the robust connection may still be settling its channel
        outcomes = await broker.publish_batch(fresh, timeout=5)
        if outcomes == [None] * 20:
            break
        await asyncio.sleep(0.1)
    assert outcomes == [None] * 20
