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
import functools
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
from shared.notification_channels import (
    CHANNELS_CHANGED,
    NOTIFIABLE_EVENTS,
    Channel,
    channel_from_row,
    display_url,
    enabled_channels,
)
from shared.notification_deliveries import DueDelivery, RetryPolicy
from shared.notification_sending import Attempt, EventContext, NotificationSender, post_body, slack_text

log = logging.getLogger(__name__)

# The longest a due record waits for a dispatcher that was not woken (records another notifier made).
POLL_SECONDS = 1.0
# A claimed record is leased for the POST's timeout and this much more (storing its answer): a notifier killed
# mid-attempt leaves it to the next claim after that.
LEASE_MARGIN_SECONDS = 5.0
# How long the channels read from the database are used before being read again, although no change was announced
# (a fallback: each change is announced by NOTIFY), and while the announcements cannot be heard (no LISTEN).
CHANNELS_MAX_AGE_SECONDS = 5.0
CHANNELS_UNHEARD_MAX_AGE_SECONDS = 1.0
LISTEN_RETRY_SECONDS = 1.0
LISTEN_ERRORS: tuple[type[Exception], ...] = (*DATABASE_ERRORS, OSError)
# Answers are stored in batches of at most this many, by up to STORE_WORKERS statements at once.
FINISH_BATCH = 500
STORE_WORKERS = 3
# Events recorded in one statement at most (a batch of 5-channel events is 2,500 rows).
RECORD_BATCH = 500
# How often the pending records of disabled channels are looked for (the api fails them as it disables a channel;
# this finds those a batch recorded in the moment before).
DISABLED_SWEEP_SECONDS = 10.0
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
    """The enabled channels, decrypted once per (id, updated_at).

    Read once and kept: every insert, replace and delete of a channel NOTIFYs CHANNELS_CHANGED at its commit
    (shared/notification_channels.py) and `follow_changes` (a service task, LISTENing) marks the cache stale, so the
    next event reads them again. A channel made a moment before an event gets it once the notification has arrived
    (milliseconds after the commit); while the listening connection is down (a database outage), or should a
    notification be lost, the channels are read again when older than CHANNELS_MAX_AGE_SECONDS."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box
        self._decrypted: dict[tuple[uuid.UUID, object], Channel] = {}
        self._undecryptable: set[tuple[uuid.UUID, object]] = set()  # logged once each
        self.channels: dict[uuid.UUID, Channel] = {}
        self.read_at = float("-inf")
        # Bumped by each change announced; the channels are fresh when read after the latest one arrived.
        self._changes = 0
        self._read_changes = -1
        self._reading: asyncio.Task[None] | None = None
        self.listening = False

    def changed(self) -> None:
        """A channel changed (a notification arrived): read them again before the next use."""
        self._changes += 1

    def _fresh(self) -> bool:
        max_age = CHANNELS_MAX_AGE_SECONDS if self.listening else CHANNELS_UNHEARD_MAX_AGE_SECONDS
        return self._read_changes == self._changes and time.monotonic() - self.read_at <= max_age

    async def current(self, pool: asyncpg.Pool) -> dict[uuid.UUID, Channel]:
        """The channels, read again first when stale (see the class's docstring); concurrent callers share one read.
        Raises what the read raises (database errors)."""
        while not self._fresh():
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read(pool))
            await asyncio.shield(self._reading)
        return self.channels

    async def _read(self, pool: asyncpg.Pool) -> None:
        changes = self._changes  # a change announced during the read may not be in it: read again then
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
        self._read_changes = changes

    async def follow_changes(self, pool: asyncpg.Pool, database: DatabaseWatch) -> None:
        """LISTEN to CHANNELS_CHANGED on a connection of its own until cancelled (a service task); after each
        (re)connection the channels count as changed (what was announced meanwhile was not heard)."""
        while True:
            try:
                async with pool.acquire() as connection:
                    lost = asyncio.Event()
                    connection.add_termination_listener(functools.partial(_set_event, lost))
                    await connection.add_listener(CHANNELS_CHANGED, self._heard)
                    self.listening = True
                    self.changed()
                    try:
                        await lost.wait()
                    finally:
                        self.listening = False
                        with contextlib.suppress(*LISTEN_ERRORS):
                            await connection.remove_listener(CHANNELS_CHANGED, self._heard)
            except LISTEN_ERRORS as exc:
                if not await database.wait_out(exc):
                    log.warning("listening for channel changes failed, will retry", extra={"error": str(exc)})
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    def _heard(self, *_notification: object) -> None:
        self.changed()


def _set_event(event: asyncio.Event, *_arguments: object) -> None:
    event.set()


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
    """Records the deliveries of each event (see the module's docstring), then wakes the dispatcher.

    Concurrent messages (the queue's prefetch) are recorded together: each handler call joins the next batch and
    returns once that batch has committed, so a message is still acked only after its records are stored. A batch
    is one read of the context its events need (host names and groups, failing checks: one query each for all of
    the batch's hosts, and only when a channel needs them: a group filter, a Slack line) and one INSERT of all its
    records. One batch is written at a time; the messages that arrive meanwhile make the next one, so a burst is
    recorded in few statements and a lone event without waiting."""

    def __init__(
        self, pool: asyncpg.Pool, channels: ChannelCache, dispatcher: Dispatcher, metrics: NotifierMetrics
    ) -> None:
        self._pool = pool
        self._channels = channels
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._waiting: list[tuple[Event, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None

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

    async def record(self, event: Event) -> int:
        """Record the event's deliveries in the next batch; how many records were made, once committed. Raises what
        recording its batch raised (a database error fails every event of the batch; an error in preparing one
        event's records fails that event only)."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches())
        return await done

    async def _write_batches(self) -> None:
        await asyncio.sleep(0)  # the messages delivered together join the first batch
        while self._waiting:
            batch, self._waiting = self._waiting[:RECORD_BATCH], self._waiting[RECORD_BATCH:]
            try:
                outcomes = await self._record_batch([event for event, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException:  # cancelled (the loop ends): the handlers give up, their messages go back
                for _, done in batch + self._waiting:
                    done.cancel()
                raise
            made = 0
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():
                    continue  # its handler gave up waiting (stopping); the message is handed back
                if isinstance(outcome, Exception):
                    done.set_exception(outcome)
                else:
                    made += outcome
                    done.set_result(outcome)
            if made:
                self._dispatcher.wake()

    async def _record_batch(self, events: Sequence[Event]) -> list[int | Exception]:
        """Match the channels and record the deliveries of `events` in one statement; for each event, how many
        records were made, or the exception that preparing its records raised."""
        channels = list((await self._channels.current(self._pool)).values())
        wanted = {event.routing_key: [c for c in channels if event.routing_key in c.events] for event in events}
        async with self._pool.acquire() as connection:
            contexts = await event_contexts(connection, events, wanted)
            records: list[deliveries.NewDelivery] = []
            outcomes: list[int | Exception] = []
            for event in events:
                try:
                    groups, context = contexts.get(event.event_id, (None, EventContext()))
                    bodies = self._bodies(event, wanted[event.routing_key], groups, context)
                except Exception as exc:  # a bug with one event's data must not fail the others
                    log.exception("preparing an event's deliveries failed", extra={"event_id": str(event.event_id)})
                    outcomes.append(exc)
                    continue
                outcomes.append(0)
                records += (deliveries.NewDelivery(channel_id, event.event_id, event.routing_key, event.body, line)
                            for channel_id, line in bodies.items())  # fmt: skip
            made = await deliveries.record_many(connection, records)
        counts: dict[uuid.UUID, int] = defaultdict(int)
        for _, event_id in made:
            counts[event_id] += 1
        return [
            outcome if isinstance(outcome, Exception) else counts[event.event_id]
            for event, outcome in zip(events, outcomes, strict=True)
        ]

    def _bodies(
        self, event: Event, wanted: Sequence[Channel], groups: list[str] | None, context: EventContext
    ) -> dict[uuid.UUID, str | None]:
        """The channels that get the event, each with the Slack line to record (None for a webhook: it gets the
        CloudEvent, which every record holds)."""
        in_maintenance = bool(getattr(event.data, "in_maintenance", False))
        lines: dict[uuid.UUID, str | None] = {}
        line: str | None = None
        for channel in wanted:
            verdict = match(channel, event.routing_key, groups, in_maintenance)
            if verdict is Match.SKIP_MAINTENANCE:
                self._metrics.deliveries.labels("skipped").inc()
            if verdict is not Match.SEND:
                continue
            if channel.type == "slack" and line is None:
                line = slack_text(event.routing_key, event.data.model_dump(mode="json"), context)
            lines[channel.id] = line if channel.type == "slack" else None
        return lines


async def event_contexts(
    connection: asyncpg.pool.PoolConnectionProxy, events: Sequence[Event], wanted: dict[str, list[Channel]]
) -> dict[uuid.UUID, tuple[list[str] | None, EventContext]]:
    """For each event of `events` whose channels need it, the groups it is about (None: unknown) and what a
    person reads with it (event id → (groups, context)), read for the whole batch at once: a group filter needs
    the host's group, a Slack line its name, group and failing checks (or the name of the event's check). An
    event absent needs nothing (webhooks without groups)."""
    needs: dict[uuid.UUID, tuple[Event, bool]] = {}  # event id → (event, whether its text is needed)
    for event in events:
        chosen = wanted[event.routing_key]
        text = any(channel.type == "slack" for channel in chosen)
        if text or any(channel.groups for channel in chosen):
            needs[event.event_id] = (event, text)
    if not needs:
        return {}
    host_of = {event_id: host_id for event_id, (event, _) in needs.items() if (host_id := _host_of(event)) is not None}
    found = await hosts.names_and_groups(connection, list(host_of.values())) if host_of else {}
    check_of = {
        event_id: event.data.check_id  # type: ignore[attr-defined]
        for event_id, (event, text) in needs.items()
        if text and event_id in host_of and event.routing_key == "check.status_changed"
    }
    names = await checks.check_names(connection, list(check_of.values())) if check_of else {}
    failing_hosts = [
        host_of[event_id] for event_id, (_, text) in needs.items()
        if text and event_id in host_of and event_id not in check_of
    ]  # fmt: skip
    failing = await checks.failing_checks_of_hosts(connection, failing_hosts) if failing_hosts else {}
    contexts: dict[uuid.UUID, tuple[list[str] | None, EventContext]] = {}
    for event_id, (event, _) in needs.items():
        host_id = host_of.get(event_id)
        if host_id is not None:
            if event_id in check_of:
                name = names.get(check_of[event_id])
                about = [(name, event.data.detail)] if name is not None else []  # type: ignore[attr-defined]
            else:
                about = failing.get(host_id, [])
            host = found.get(host_id)
            if host is None:
                contexts[event_id] = (None, EventContext(checks=tuple(about)))
            else:
                context = EventContext(host_name=host[0], group=host[1], checks=tuple(about))
                contexts[event_id] = ([host[1]], context)
            continue
        job_id = getattr(event.data, "job_id", None)
        if isinstance(job_id, str):  # job.halted, job.resumed: no host, the groups of the job's hosts (rare)
            groups = await jobs.groups_of_job(connection, job_id)
            contexts[event_id] = ((groups or None), EventContext(group=", ".join(groups) or None))
    return contexts


def _host_of(event: Event) -> uuid.UUID | None:
    """The host an event is about: `host_id` of its data, or of the check of a check.config.* event; None for the
    job events that name no host."""
    host_id = getattr(event.data, "host_id", None)
    if isinstance(host_id, uuid.UUID):
        return host_id
    check = getattr(event.data, "check", None)
    host_id = getattr(check, "host_id", None)
    return host_id if isinstance(host_id, uuid.UUID) else None


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
        self._swept_at = float("-inf")

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
            try:
                await self._fail_of_disabled_channels()
            except DATABASE_ERRORS as exc:
                log.warning("failing the deliveries of disabled channels failed, will retry", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _fail_of_disabled_channels(self) -> None:
        """Every DISABLED_SWEEP_SECONDS: the pending records of disabled channels end `failed` (they are never
        claimed while the channel is disabled, so no attempt would ever end them)."""
        if time.monotonic() - self._swept_at < DISABLED_SWEEP_SECONDS:
            return
        self._swept_at = time.monotonic()
        async with self._pool.acquire() as connection:
            failed = await deliveries.fail_of_disabled_channels(connection)
        if failed:
            self._metrics.deliveries.labels("failed").inc(failed)
            log.warning("pending deliveries of disabled channels failed", extra={"count": failed})

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
                    line = claim.slack_text
                    if channel.type == "slack" and line is None:
                        line = await self._late_slack_text(claim, channel)
                    body = post_body(channel.type, claim.event_type, claim.body, line)
                    attempt = await self._sender.send(channel, claim.event_id, body)
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

    async def _late_slack_text(self, claim: DueDelivery, channel: Channel) -> str | None:
        """The Slack line of a record made while its channel was a webhook (its type changed since): read now, with
        the host's name and failing checks as they are now; None (a line from the event alone) when it cannot be."""
        try:
            event = read_event(claim.event_type, claim.body)
            async with self._pool.acquire() as connection:
                contexts = await event_contexts(connection, [event], {event.routing_key: [channel]})
        except MalformedNotification:
            return None
        except DATABASE_ERRORS:
            return None
        _, context = contexts.get(event.event_id, (None, EventContext()))
        return slack_text(event.routing_key, event.data.model_dump(mode="json"), context)

    def _release(self, channel_id: uuid.UUID) -> None:
        self._in_flight[channel_id] -= 1
        self.wake()

    async def store_answers(self) -> None:
        """Store the answers of the POSTs in batches until cancelled (a service task): STORE_WORKERS batches at once
        at most, each of what has come since the previous one was taken, so that an answer (and its channel's slot)
        waits for the statement storing it rather than for the one before. A batch that fails for a database outage
        is kept and stored once the database answers; its records stay leased meanwhile."""
        await asyncio.gather(*(self._store_batches() for _ in range(STORE_WORKERS)))

    async def _store_batches(self) -> None:
        while True:
            while not self._answers:
                self._answered.clear()
                await self._answered.wait()
            batch, self._answers = self._answers[:FINISH_BATCH], self._answers[FINISH_BATCH:]
            try:
                await self._store(batch)
            except DATABASE_ERRORS as exc:
                self._answers = batch + self._answers
                self._answered.set()
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
