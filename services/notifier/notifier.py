"""The notifier's two halves (CONTRACT §7).

`EventHandler` takes each notifiable event from the notifier's queue, matches the enabled channels, looks up what a
person needs to read it (the host's name and group, its failing checks), and records one pending delivery per
matched channel (shared/notification_deliveries.py) before the message is acked: the record, keyed by (channel,
event id), is what makes a duplicate event or several notifiers deliver once.

`Dispatcher` sends what is due: it claims due records (woken at once by this process's handler, and at least every
POLL_SECONDS for the records other notifiers made and for retries, whose times are in the table), at most
`concurrency` in flight per channel, so a receiver that hangs holds its own slots and nobody else's. Each answer is
stored (delivered, retry with back-off, failed) in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from services.notifier.matching import Match, match
from shared import checks, hosts, jobs
from shared import notification_deliveries as deliveries
from shared.crypto import DecryptionError, SecretBox
from shared.database import DATABASE_ERRORS, DatabaseWatch
from shared.details import safe_detail
from shared.events import OUTBOUND_EVENTS, CloudEvent, EventModel
from shared.json_input import JsonInputError, load_json
from shared.notification_channels import NOTIFIABLE_EVENTS, Channel, channel_from_row, display_url, enabled_channels
from shared.notification_deliveries import DueDelivery, RetryPolicy
from shared.notification_sending import Attempt, EventContext, NotificationSender, notification_body

log = logging.getLogger(__name__)

# The longest a due record waits for a dispatcher that was not woken (records another notifier made).
POLL_SECONDS = 1.0
# A claimed record is leased for the POST's timeout and this much more (storing its answer): a notifier killed
# mid-attempt leaves it to the next claim after that.
LEASE_MARGIN_SECONDS = 5.0
# How long the channels read from the database are used before being read again (a handler reads them at once).
CHANNELS_MAX_AGE_SECONDS = 1.0
# Answers are stored in batches of at most this many, as soon as the previous batch is stored.
FINISH_BATCH = 500
# The queue lag gauge is measured at most this often.
LAG_EVERY_SECONDS = 1.0


class NotifierMetrics:
    """`healthgate_notification_deliveries_total{outcome}` (delivered | retry | failed | skipped),
    `healthgate_notification_queue_lag_seconds`, `healthgate_notification_delivery_seconds` (record to delivered),
    `healthgate_notifications_in_flight`, `healthgate_notification_events_total{outcome}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "healthgate_notification_deliveries", "Delivery attempts and skips, by outcome", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.lag = Gauge(
            "healthgate_notification_queue_lag_seconds", "How long the oldest due pending delivery has been due",
            registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "healthgate_notification_delivery_seconds", "From a delivery's record to the receiver's 2xx",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600), registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge("healthgate_notifications_in_flight", "POSTs waiting for an answer", registry=registry)
        self.events = Counter(
            "healthgate_notification_events", "Events taken from the queue, by outcome", ["outcome"], registry=registry
        )


class ChannelCache:
    """The enabled channels, decrypted once per (id, updated_at): the handler reads the rows for each event (a
    channel made a moment ago counts), the dispatcher uses them for up to CHANNELS_MAX_AGE_SECONDS."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box
        self._decrypted: dict[tuple[uuid.UUID, object], Channel] = {}
        self._undecryptable: set[tuple[uuid.UUID, object]] = set()  # logged once each
        self.channels: dict[uuid.UUID, Channel] = {}
        self.read_at = float("-inf")

    async def refresh(self, pool: asyncpg.Pool) -> list[Channel]:
        """Read the enabled channels now; returns them."""
        async with pool.acquire() as connection:
            rows = await enabled_channels(connection)
        fresh: dict[tuple[uuid.UUID, object], Channel] = {}
        for row in rows:
            key = (row["id"], row["updated_at"])
            channel = self._decrypted.get(key)
            if channel is None:
                if key in self._undecryptable:
                    continue
                try:
                    channel = channel_from_row(row, self._box)
                except DecryptionError:
                    self._undecryptable.add(key)
                    # Another key file than the api's: the channel cannot be signed for; the others go on.
                    log.error("a channel's secret does not decrypt with this key file; skipping the channel",
                              extra={"channel_id": str(row["id"]), "channel": row["name"]})  # fmt: skip
                    continue
            fresh[key] = channel
        self._decrypted = fresh
        self.channels = {channel.id: channel for channel in fresh.values()}
        self.read_at = time.monotonic()
        return list(self.channels.values())

    async def current(self, pool: asyncpg.Pool) -> dict[uuid.UUID, Channel]:
        """The channels, read again when older than CHANNELS_MAX_AGE_SECONDS."""
        if time.monotonic() - self.read_at > CHANNELS_MAX_AGE_SECONDS:
            await self.refresh(pool)
        return self.channels


@dataclass(frozen=True)
class Event:
    """A notifiable event as the handler reads it."""

    routing_key: str
    event_id: uuid.UUID
    data: EventModel
    body: bytes


class MalformedNotification(Exception):
    """A message of the notifier's queue that can never be delivered (not a CloudEvent of a notifiable type)."""


def read_event(routing_key: str, body: bytes) -> Event:
    """The event of a message: a structured CloudEvent whose id is a UUID and whose data is the model of its routing
    key (shared/events.py). Raises MalformedNotification saying what is wrong."""
    model = OUTBOUND_EVENTS.get(routing_key)
    if model is None or routing_key not in NOTIFIABLE_EVENTS:
        raise MalformedNotification(f"routing key {routing_key!r} is not a notifiable event")
    try:
        envelope = CloudEvent.model_validate(load_json(body))
        event_id = uuid.UUID(envelope.id)
        data = model.model_validate(envelope.data)
    except (JsonInputError, ValidationError, ValueError) as exc:
        raise MalformedNotification(f"not a CloudEvent of {routing_key}: {exc}") from None
    return Event(routing_key, event_id, data, body)


class EventHandler:
    """Records the deliveries of each event (see the module's docstring), then wakes the dispatcher."""

    def __init__(
        self, pool: asyncpg.Pool, channels: ChannelCache, dispatcher: Dispatcher, metrics: NotifierMetrics
    ) -> None:
        self._pool = pool
        self._channels = channels
        self._dispatcher = dispatcher
        self._metrics = metrics

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The queue's handler: records, then returns (shared/consuming.py acks after the commit); a malformed
        message is dead-lettered; a database error is raised (handed back or returned by Consumers)."""
        try:
            event = read_event(message.routing_key or "", message.body)
        except MalformedNotification as exc:
            log.warning(
                "malformed event dead-lettered",
                extra={"routing_key": message.routing_key, "error": safe_detail(str(exc))},
            )
            self._metrics.events.labels("dead_lettered").inc()
            await message.reject(requeue=False)
            return
        recorded = await self.record(event)
        self._metrics.events.labels("recorded" if recorded else "no_channel").inc()
        if recorded:
            self._dispatcher.wake()

    async def record(self, event: Event) -> int:
        """Match the channels and record the event's deliveries; how many records were made."""
        channels = await self._channels.refresh(self._pool)
        wanted = [channel for channel in channels if event.routing_key in channel.events]
        if not wanted:
            return 0
        groups, context = await self._context(event)
        in_maintenance = bool(getattr(event.data, "in_maintenance", False))
        bodies: dict[uuid.UUID, bytes] = {}
        by_type: dict[str, bytes] = {}
        for channel in wanted:
            verdict = match(channel, event.routing_key, groups, in_maintenance)
            if verdict is Match.SKIP_MAINTENANCE:
                self._metrics.deliveries.labels("skipped").inc()
            if verdict is not Match.SEND:
                continue
            if channel.type not in by_type:
                by_type[channel.type] = notification_body(channel.type, event.routing_key, event.body, context)
            bodies[channel.id] = by_type[channel.type]
        if not bodies:
            return 0
        async with self._pool.acquire() as connection, connection.transaction():
            return await deliveries.record_deliveries(connection, event.event_id, event.routing_key, bodies)

    async def _context(self, event: Event) -> tuple[list[str] | None, EventContext]:
        """The groups the event is about (None: unknown) and what a person reads with it."""
        data = event.data
        host_id = getattr(data, "host_id", None)
        if isinstance(host_id, uuid.UUID):
            async with self._pool.acquire() as connection:
                found = await hosts.host_name_and_group(connection, host_id)
                if event.routing_key == "check.status_changed":
                    name = await checks.check_name(connection, data.check_id)  # type: ignore[attr-defined]
                    failing = [(name, data.detail)] if name is not None else []  # type: ignore[attr-defined]
                else:
                    failing = await checks.failing_checks_of_host(connection, host_id)
            if found is None:
                return None, EventContext(checks=tuple(failing))
            return [found[1]], EventContext(host_name=found[0], group=found[1], checks=tuple(failing))
        job_id = getattr(data, "job_id", None)
        if isinstance(job_id, str):  # job.halted, job.resumed: no host, the groups of the job's hosts
            groups = await jobs.groups_of_job(self._pool, job_id)
            return (groups or None), EventContext(group=", ".join(groups) or None)
        return None, EventContext()


@dataclass(frozen=True)
class _Answer:
    claim: DueDelivery
    channel: Channel
    attempt: Attempt


class Dispatcher:
    """Claims due deliveries and sends them, at most `concurrency` per channel at once (see the module's docstring).
    `run()` is a service task; `drain(timeout)` lets the POSTs at work finish and their answers be stored."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        sender: NotificationSender,
        channels: ChannelCache,
        metrics: NotifierMetrics,
        database: DatabaseWatch,
        *,
        policy: RetryPolicy,
        timeout_seconds: float,
        concurrency: int,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._channels = channels
        self._metrics = metrics
        self._database = database
        self._policy = policy
        self._timeout = timeout_seconds
        self._lease = timeout_seconds + LEASE_MARGIN_SECONDS
        self._concurrency = concurrency
        # Retries come due between polls: poll at least as often as the first back-off, so that a short one (tests)
        # is kept; the default (10 s) polls every second.
        self._poll = min(POLL_SECONDS, policy.first_seconds / 2)
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[uuid.UUID, int] = defaultdict(int)
        self._sending: set[asyncio.Task[None]] = set()
        self._answers: list[_Answer] = []
        self._answered = asyncio.Event()
        self._lag_at = float("-inf")

    def wake(self) -> None:
        """Claim again now (a record was made, a slot freed)."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and send until cancelled; the answers are stored by `store_answers`, run beside it."""
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim_and_send()
            except DATABASE_ERRORS as exc:
                if await self._database.wait_out(exc):
                    continue
                log.warning("claiming deliveries failed, will retry", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _claim_and_send(self) -> None:
        channels = await self._channels.current(self._pool)
        free = {channel_id: self._concurrency - self._in_flight[channel_id] for channel_id in channels}
        async with self._pool.acquire() as connection:
            claims = await deliveries.claim_due(connection, free, self._lease)
            if time.monotonic() - self._lag_at >= LAG_EVERY_SECONDS:
                self._lag_at = time.monotonic()
                self._metrics.lag.set(await deliveries.oldest_due_age_seconds(connection))
        for claim in claims:
            channel = channels[claim.channel_id]
            self._in_flight[channel.id] += 1
            self._metrics.in_flight.inc()
            task = asyncio.create_task(self._send(claim, channel))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, claim: DueDelivery, channel: Channel) -> None:
        try:
            try:
                # The sender bounds each POST itself; this only makes sure the lease is never outlived.
                async with asyncio.timeout(self._timeout + LEASE_MARGIN_SECONDS / 2):
                    attempt = await self._sender.send(channel, claim.event_id, claim.body)
            except TimeoutError:
                shown = display_url(channel.type, channel.url)
                attempt = Attempt(False, None, f"{shown} did not answer within {self._timeout:g} s")
            except Exception as exc:  # a bug in sending must not leave the slot taken
                log.exception("sending a notification failed", extra={"channel_id": str(channel.id)})
                attempt = Attempt(False, None, f"sending failed: {type(exc).__name__}")
        except BaseException:
            self._release(channel.id)
            raise
        finally:
            self._metrics.in_flight.dec()
        # The channel's slot stays taken until the answer is stored (`_store`): a process never holds more than
        # `concurrency` leased, unfinished records of a channel, which bounds what a kill can have sent twice.
        self._answers.append(_Answer(claim, channel, attempt))
        self._answered.set()

    def _release(self, channel_id: uuid.UUID) -> None:
        self._in_flight[channel_id] -= 1
        self.wake()

    async def store_answers(self) -> None:
        """Store the answers of the POSTs in batches until cancelled (a service task). A batch that fails for a
        database outage is kept and stored once the database answers; its records stay leased meanwhile."""
        while True:
            await self._answered.wait()
            self._answered.clear()
            while self._answers:
                batch, self._answers = self._answers[:FINISH_BATCH], self._answers[FINISH_BATCH:]
                try:
                    await self._store(batch)
                except DATABASE_ERRORS as exc:
                    self._answers = batch + self._answers
                    if not await self._database.wait_out(exc):
                        log.warning("storing delivery answers failed, will retry", extra={"error": str(exc)})
                        await asyncio.sleep(1)

    async def _store(self, batch: Sequence[_Answer]) -> None:
        async with self._pool.acquire() as connection:
            finished = await deliveries.finish_attempts(
                connection, [(answer.claim.channel_id, answer.claim.event_id, answer.attempt) for answer in batch],
                self._policy,
            )  # fmt: skip
        for answer in batch:
            self._release(answer.channel.id)
        outcomes = {(done.channel_id, done.event_id): done for done in finished}
        now = time.time()
        for answer in batch:
            done = outcomes.get((answer.claim.channel_id, answer.claim.event_id))
            if done is None:
                continue  # another notifier finished it after this one's lease ran out
            self._metrics.deliveries.labels(done.outcome).inc()
            if done.outcome == "delivered":
                self._metrics.latency.observe(max(0.0, now - done.created_at.timestamp()))
                continue
            channel = answer.channel
            log.warning(
                "notification delivery failed" + (", will retry" if done.outcome == "retry" else ""),
                extra={
                    "channel_id": str(channel.id),
                    "channel": channel.name,
                    "url": display_url(channel.type, channel.url),
                    "event_id": str(answer.claim.event_id),
                    "event_type": answer.claim.event_type,
                    "attempt": answer.claim.attempts,
                    "status_code": answer.attempt.status_code,
                    "detail": answer.attempt.detail,
                    "outcome": done.outcome,
                    "next_attempt_at": done.next_attempt_at.isoformat() if done.next_attempt_at else None,
                },
            )

    async def drain(self, timeout: float) -> None:
        """Stop claiming; give the POSTs at work `timeout` seconds, then store what they answered (those still
        at work stay leased and are sent again by a notifier once the lease ends)."""
        self._stopping = True
        self._wake.set()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=timeout)
        if self._answers:
            with contextlib.suppress(*DATABASE_ERRORS, TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._store(self._answers)
            self._answers = []
