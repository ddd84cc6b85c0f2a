"""Transactional outbox: an event commits with the change that caused it, a relay publishes it. This
module is the only one that writes the `outbox` table (docs/architecture.md, "Who writes which table").

`enqueue` runs inside the caller's transaction, so an event exists exactly when its change does.
`OutboxRelay` claims unsent rows (SKIP LOCKED: any number of relays may run), publishes them with
confirms and marks them sent in the same transaction; a failed publish rolls back and the rows are
tried again. Delivery is at least once; consumers drop duplicates by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.database import DATABASE_ERRORS, Connection, DatabaseWatch, delete_in_batches
from shared.events import CLOUDEVENTS_CONTENT_TYPE, EventModel, encode_cloudevent
from shared.messaging import Broker, OutgoingEvent, PublishFailed, Unroutable

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "healthgate_outbox"
BATCH_SIZE = 200
IDLE_POLL_SECONDS = 1.0
RETRY_DELAY_SECONDS = 1.0
BROKER_WAIT_SECONDS = 0.2


AMQP_SHORTSTR_BYTES = 255


def amqp_correlation_id(value: str | None) -> str | None:
    """`value` if it can be an AMQP correlation_id stored in the outbox, else None.

    correlation_id is an AMQP short string: at most 255 bytes of UTF-8. A job_id of 200 characters can
    be 800 bytes; aio-pika refuses to publish a longer one (TypeError), which would leave the row unsent
    and retried forever. The outbox column is PostgreSQL text, which holds no NUL and no lone
    surrogate (only invalid job_ids, answered as invalid requests, hold those). Such an event goes out
    without a correlation_id; its data always has the job_id."""
    if value is None or "\x00" in value:
        return None
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value if len(encoded) <= AMQP_SHORTSTR_BYTES else None


@dataclass(frozen=True)
class OutboxRow:
    """An outbox row ready to be written: the event's id, routing key, AMQP correlation_id (None when it has none
    or AMQP cannot carry it, see `amqp_correlation_id`) and CloudEvent body (structured-mode JSON, bytes)."""

    event_id: uuid.UUID
    routing_key: str
    correlation_id: str | None
    body: bytes

    def arguments(self) -> tuple[uuid.UUID, str, str | None, bytes]:
        """The four arguments of the SQL function `outbox_enqueue` (shared/migrations/0014), in order."""
        return self.event_id, self.routing_key, self.correlation_id, self.body


def outbox_row(
    routing_key: str,
    data: EventModel,
    *,
    source: str,
    event_id: uuid.UUID | None = None,
    correlation_id: str | None = None,
    time: dt.datetime | None = None,
) -> OutboxRow:
    """The outbox row of an event (a random id unless `event_id`; `time` now unless given), for `enqueue` or for a
    SQL function of a table's owner that writes it through `outbox_enqueue` with its change (shared/jobs.py's
    `gate_decide_fast`). Raises TypeError when `data` is not the event of `routing_key`."""
    event_id, body = encode_cloudevent(routing_key, data, source=source, event_id=event_id, time=time)
    return OutboxRow(event_id, routing_key, amqp_correlation_id(correlation_id), body)


async def enqueue(
    connection: Connection,
    routing_key: str,
    data: EventModel,
    *,
    source: str,
    event_id: uuid.UUID | None = None,
    correlation_id: str | None = None,
    time: dt.datetime | None = None,
) -> uuid.UUID:
    """Add an event to the outbox within the caller's transaction and wake the relays on commit (one round trip:
    the SQL function `outbox_enqueue` inserts the row and notifies).

    A `correlation_id` that AMQP or PostgreSQL cannot carry is left out (see `amqp_correlation_id`)."""
    row = outbox_row(
        routing_key, data, source=source, event_id=event_id, correlation_id=correlation_id, time=time
    )  # fmt: skip
    await connection.execute("SELECT outbox_enqueue($1, $2, $3, $4)", *row.arguments())
    return row.event_id


async def enqueue_many(
    connection: Connection,
    events: list[tuple[str, EventModel]],
    *,
    source: str,
    time: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """Add many events in one COPY within the caller's transaction (the poller's result batches)."""
    rows = []
    for routing_key, data in events:
        event_id, body = encode_cloudevent(routing_key, data, source=source, time=time)
        rows.append((event_id, routing_key, None, body))
    if rows:
        await connection.copy_records_to_table(
            "outbox", records=rows, columns=["event_id", "routing_key", "correlation_id", "body"]
        )
        await connection.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return [row[0] for row in rows]


async def prune_sent(pool: asyncpg.Pool, before: dt.datetime) -> int:
    """Delete the rows sent before `before` (the pruner: HEALTHGATE_OUTBOX_RETENTION_HOURS), in batches of
    short transactions; unsent rows are never deleted. Returns how many were deleted."""
    return await delete_in_batches(
        pool, "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < $1 LIMIT $2)", before
    )


class OutboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "healthgate_outbox_published",
            "Events published from the outbox",
            ["routing_key"],
            registry=registry,
        )
        self.unroutable = Counter(
            "healthgate_outbox_unroutable",
            "Outbox events no queue was bound for",
            ["routing_key"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "healthgate_outbox_publish_failures", "Outbox batches whose publishing failed", registry=registry
        )
        self.pending = Gauge(
            "healthgate_outbox_pending", "Unsent outbox rows seen by the last relay pass", registry=registry
        )


class OutboxRelay:
    """Publishes the outbox. Outages are reported, not logged here: a lost database goes to `database`
    (the process's watch, which logs it once and says when it is back; without one, the relay retries
    every second), a lost broker is logged by the Broker; a failed publish while the broker is up gets a
    warning of its own.

    `batch_size`: the most rows claimed and published at once. The relay shares its service's event loop, and a
    batch takes about seven of its turns (claim, publish, confirms, mark sent); a poller's loop, busy with hundreds
    of checks, turns slowly, so it relays in larger batches (services/poller/app.py)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: Broker,
        metrics: OutboxMetrics,
        database: DatabaseWatch | None = None,
        *,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self._pool = pool
        self._batch_size = batch_size
        self._broker = broker
        self._metrics = metrics
        self._database = database
        self._wakeup = asyncio.Event()

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until cancelled: on every NOTIFY, and at least once a second as a fallback."""
        while True:
            try:
                # One pooled connection is held for LISTEN while the relay runs.
                async with self._pool.acquire() as listener:
                    await listener.add_listener(NOTIFY_CHANNEL, self._on_notify)
                    try:
                        await self._relay_until_connection_lost(listener)
                    finally:
                        if not _lost(listener):
                            await listener.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            except DATABASE_ERRORS as exc:
                if self._database is None or not await self._database.wait_out(exc):
                    log.warning("outbox relay failed, will retry", extra={"error": str(exc)})
                    await asyncio.sleep(RETRY_DELAY_SECONDS)

    async def _relay_until_connection_lost(self, listener: Connection) -> None:
        while not _lost(listener):
            self._wakeup.clear()
            if not self._broker.ready:
                # Rows wait in the table while the broker is away; nothing is lost meanwhile.
                await asyncio.sleep(BROKER_WAIT_SECONDS)
                continue
            try:
                handled = await self.relay_batch()
            except PublishFailed as exc:
                self._metrics.publish_failures.inc()
                if self._broker.ready:  # else the broker's outage, which the Broker logs once
                    log.warning("outbox publish failed, will retry", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_DELAY_SECONDS)
                continue
            if handled < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_SECONDS)

    async def relay_batch(self) -> int:
        """Publish one batch of unsent events; returns how many were handled."""
        if not self._broker.ready:
            raise PublishFailed("not connected to RabbitMQ")
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                """
                SELECT id, event_id, routing_key, correlation_id, body
                FROM outbox
                WHERE sent_at IS NULL
                ORDER BY id
                LIMIT $1
                FOR UPDATE SKIP LOCKED
                """,
                self._batch_size,
            )
            if not rows:
                self._metrics.pending.set(0)
                return 0
            self._metrics.pending.set(len(rows))
            outcomes = await self._broker.publish_batch(
                [
                    OutgoingEvent(
                        row["routing_key"], row["body"], str(row["event_id"]), CLOUDEVENTS_CONTENT_TYPE,
                        row["correlation_id"],
                    )
                    for row in rows
                ]
            )  # fmt: skip
            # Only a confirmed row is marked sent; the others stay unsent, in this same transaction, and go again.
            sent_ids = []
            first_failure: PublishFailed | None = None
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, PublishFailed):
                    if first_failure is None:
                        first_failure = outcome
                    continue
                routing_key = row["routing_key"]
                if isinstance(outcome, Unroutable):
                    # Nobody subscribes to this routing key: the event is confirmed and has no reader.
                    self._metrics.unroutable.labels(routing_key).inc()
                    log.info(
                        "event had no subscriber", extra={"routing_key": routing_key, "event_id": str(row["event_id"])}
                    )
                self._metrics.published.labels(routing_key).inc()
                sent_ids.append(row["id"])
            if sent_ids:
                await connection.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)", sent_ids)
        if first_failure is not None:
            raise first_failure
        return len(rows)


def _lost(listener: Connection) -> bool:
    """Whether the LISTEN connection is gone. When the server closes a pooled connection, asyncpg
    releases it back to the pool at once, and every later call on it (`is_closed()` too) raises
    InterfaceError "connection has been released back to the pool": that means lost as well."""
    try:
        return listener.is_closed()
    except asyncpg.InterfaceError:
        return True
