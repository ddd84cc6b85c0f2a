"""`notification_deliveries`: one record per notification channel and event (CONTRACT §7). This module is the only
one that writes the table (docs/architecture.md, "Who writes which table"): the notifier records, claims and finishes
deliveries, the api records its `/test` runs and reads a channel's page, the pruner removes old finished records.

A record's life: `record_deliveries` inserts it `pending`, due at once (the primary key (channel_id, event_id) and
ON CONFLICT DO NOTHING make a duplicate event, or several notifiers, record it once). `claim_due` takes due records
with FOR UPDATE SKIP LOCKED and moves their `next_attempt_at` past the attempt's timeout (a lease: a notifier killed
mid-attempt leaves the record to be claimed again when the lease ends), counting the attempt. `finish_attempt` then
marks it `delivered`, or sets the next attempt's time (exponential back-off with jitter), or `failed` when the
attempt was final (a blocked network) or 24 h have passed since the record was made. The timers live in the table,
never in a sleeping task.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import asyncpg

from shared.database import Connection, delete_in_batches

TEST_EVENT_TYPE = "healthgate.test"
# CONTRACT §7: retried for 24 h after the record was made, then `failed`; back-off at most every 10 min.
GIVE_UP_AFTER = dt.timedelta(hours=24)
DEFAULT_FIRST_RETRY_SECONDS = 10.0
DEFAULT_MAX_RETRY_SECONDS = 600.0
# Up to this fraction is added to each back-off, so that the retries of one receiver's outage spread out.
RETRY_JITTER = 0.1
DETAIL_MAX_CHARS = 1000
# The detail of a pending record that ended `failed` because its channel was disabled.
DISABLED_DETAIL = "the channel was disabled"


class Attempt(Protocol):
    """What an attempt gave, as this module stores it: `shared.notification_sending.Attempt` is one (a protocol here,
    so that the table's owner does not depend on the HTTP client's module)."""

    @property
    def delivered(self) -> bool: ...
    @property
    def status_code(self) -> int | None: ...
    @property
    def detail(self) -> str: ...
    @property
    def final(self) -> bool: ...


@dataclass(frozen=True)
class DueDelivery:
    """A record `claim_due` took: `body` is the event's CloudEvent and `slack_text` the Slack line made with it (None
    when the channel was a webhook then); `attempts` counts this attempt; `created_at` is when the record was made
    (the event's arrival at the notifier)."""

    channel_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    body: bytes
    slack_text: str | None
    attempts: int
    created_at: dt.datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off of failed attempts: `first_seconds` after the first, doubling, at most `max_seconds`, each with up to
    RETRY_JITTER more; `give_up_after` since the record was made → `failed`."""

    first_seconds: float = DEFAULT_FIRST_RETRY_SECONDS
    max_seconds: float = DEFAULT_MAX_RETRY_SECONDS
    give_up_after: dt.timedelta = GIVE_UP_AFTER


async def record_deliveries(
    connection: Connection, event_id: uuid.UUID, event_type: str, bodies: Mapping[uuid.UUID, bytes]
) -> int:
    """Record a pending delivery, due now, of the event `event_id` (routing key `event_type`) to each channel of
    `bodies` (channel id → the event's CloudEvent; no Slack line: `record_many` takes one). A record that exists
    already is left as it is (the event arrived again, or another notifier recorded it). Returns how many records
    were made."""
    wanted = [NewDelivery(channel_id, event_id, event_type, body) for channel_id, body in bodies.items()]
    return len(await record_many(connection, wanted))


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to record (`record_many`): the channel, the event's id and routing key, its CloudEvent (`body`),
    and the Slack line of the event for a slack channel (None for a webhook)."""

    channel_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    body: bytes
    slack_text: str | None = None


async def record_many(connection: Connection, wanted: Sequence[NewDelivery]) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """Record each of `wanted` as a pending delivery, due now, in one statement (atomic on its own, or part of the
    caller's transaction). A record that exists already is left as it is (the event arrived again, or another
    notifier recorded it), and so is one whose channel no longer exists (deleted since the caller read it).
    Returns the (channel id, event id) of the records made. The rows are inserted in key order, so that two
    notifiers recording overlapping batches never deadlock."""
    if not wanted:
        return set()
    ordered = sorted(wanted, key=lambda new: (new.channel_id, new.event_id))
    rows = await connection.fetch(
        """
        INSERT INTO notification_deliveries (channel_id, event_id, event_type, body, slack_text, next_attempt_at)
        SELECT wanted.channel_id, wanted.event_id, wanted.event_type, wanted.body, wanted.slack_text, clock_timestamp()
        FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bytea[], $5::text[]) WITH ORDINALITY
            AS wanted (channel_id, event_id, event_type, body, slack_text, position)
        WHERE EXISTS (SELECT FROM notification_channels c WHERE c.id = wanted.channel_id)
        ORDER BY wanted.position
        ON CONFLICT (channel_id, event_id) DO NOTHING
        RETURNING channel_id, event_id
        """,
        [new.channel_id for new in ordered],
        [new.event_id for new in ordered],
        [new.event_type for new in ordered],
        [new.body for new in ordered],
        [new.slack_text for new in ordered],
    )
    return {(row["channel_id"], row["event_id"]) for row in rows}


async def claim_due(
    connection: Connection, free_slots: Mapping[uuid.UUID, int], lease_seconds: float
) -> list[DueDelivery]:
    """Claim the due pending records, oldest due first, at most `free_slots[channel]` of each channel (a channel
    absent or at 0 is skipped: this process has no room to send to it now). Each claimed record counts an attempt
    and is leased: its next_attempt_at moves `lease_seconds` ahead (the attempt's timeout and a margin), so that no
    other notifier claims it meanwhile, and one does when this process dies before finishing it. Records other
    notifiers hold locked are skipped (SKIP LOCKED), not waited for. Each channel's records are found through its
    own index (channel_id, next_attempt_at), and updated by their row address (ctid, locked): the cost does not grow
    with the table nor with another channel's backlog."""
    channels = [channel for channel, free in free_slots.items() if free > 0]
    if not channels:
        return []
    rows = await connection.fetch(
        """
        WITH slots AS (
            SELECT channel_id, free FROM unnest($1::uuid[], $2::int[]) AS slots (channel_id, free)
        ), due AS (
            SELECT picked.ctid
            FROM slots CROSS JOIN LATERAL (
                SELECT d.ctid FROM notification_deliveries d
                WHERE d.status = 'pending' AND d.channel_id = slots.channel_id
                  AND d.next_attempt_at <= statement_timestamp()
                ORDER BY d.channel_id, d.next_attempt_at
                LIMIT slots.free
                FOR UPDATE SKIP LOCKED
            ) AS picked
        )
        UPDATE notification_deliveries AS d SET
            attempts = d.attempts + 1,
            last_attempt_at = clock_timestamp(),
            next_attempt_at = clock_timestamp() + make_interval(secs => $3)
        WHERE d.ctid = ANY (ARRAY(SELECT ctid FROM due))
        RETURNING d.channel_id, d.event_id, d.event_type, d.body, d.slack_text, d.attempts, d.created_at
        """,
        channels,
        [free_slots[channel] for channel in channels],
        lease_seconds,
    )
    return [
        DueDelivery(
            channel_id=row["channel_id"],
            event_id=row["event_id"],
            event_type=row["event_type"],
            body=bytes(row["body"]),
            slack_text=row["slack_text"],
            attempts=row["attempts"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class Finished:
    """What one attempt at a claimed record gave, and what `finish_attempts` made of it: `outcome` "delivered",
    "retry" (still pending, due at `next_attempt_at`) or "failed"; `created_at`: when the record was made."""

    channel_id: uuid.UUID
    event_id: uuid.UUID
    outcome: Literal["delivered", "retry", "failed"]
    next_attempt_at: dt.datetime | None
    created_at: dt.datetime


async def finish_attempts(
    connection: Connection,
    attempts: Sequence[tuple[uuid.UUID, uuid.UUID, Attempt]],
    policy: RetryPolicy,
) -> list[Finished]:
    """Store what attempts of claimed records gave, one statement for many ((channel id, event id, attempt) each):
    `delivered` (2xx); `failed` when the attempt is final or `policy.give_up_after` has passed since the record was
    made; else still pending, due again after the back-off of its attempt count. Returns what became of each record
    that was still pending (one that is not any more — another notifier finished it after this one's lease ran out,
    or the channel was deleted — is left alone and absent). Locks rows in key order, so batches never deadlock;
    finds each by its primary key, so the cost does not grow with the pending records of other channels."""
    if not attempts:
        return []
    ordered = sorted(attempts, key=lambda item: (item[0], item[1]))  # rows are locked in this order
    rows = await connection.fetch(
        """
        WITH results AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::int[], $5::text[], $6::bool[])
                AS r (channel_id, event_id, delivered, status_code, detail, final)
        ), next AS (
            SELECT r.channel_id, r.event_id, r.status_code, r.detail,
                CASE
                    WHEN r.delivered THEN 'delivered'
                    WHEN r.final OR clock_timestamp() >= d.created_at + make_interval(secs => $9) THEN 'failed'
                    ELSE 'pending'
                END AS status,
                clock_timestamp() + make_interval(secs =>
                    least($7 * power(2::float8, least(greatest(d.attempts - 1, 0), 60)), $8) * (1 + $10 * random())
                ) AS retry_at
            FROM results r CROSS JOIN LATERAL (
                -- Each record by its primary key, never by a scan of its channel's pending ones (a hanging
                -- channel's thousands): LIMIT keeps the status test below out of this subquery, where it would
                -- make the partial index of pending records look the better way in.
                SELECT d.status, d.attempts, d.created_at FROM notification_deliveries d
                WHERE d.channel_id = r.channel_id AND d.event_id = r.event_id
                LIMIT 1
                FOR UPDATE
            ) AS d
            WHERE d.status = 'pending'
        )
        UPDATE notification_deliveries AS d SET
            status = next.status,
            status_code = next.status_code,
            detail = next.detail,
            next_attempt_at = CASE WHEN next.status = 'pending' THEN next.retry_at END
        FROM next
        WHERE d.channel_id = next.channel_id AND d.event_id = next.event_id
        RETURNING d.channel_id, d.event_id, d.status, d.next_attempt_at, d.created_at
        """,
        [channel_id for channel_id, _, _ in ordered],
        [event_id for _, event_id, _ in ordered],
        [attempt.delivered for _, _, attempt in ordered],
        [attempt.status_code for _, _, attempt in ordered],
        [attempt.detail[:DETAIL_MAX_CHARS] for _, _, attempt in ordered],
        [attempt.final for _, _, attempt in ordered],
        policy.first_seconds,
        policy.max_seconds,
        policy.give_up_after.total_seconds(),
        RETRY_JITTER,
    )
    outcomes: dict[str, Literal["delivered", "retry", "failed"]] = {
        "delivered": "delivered", "pending": "retry", "failed": "failed"
    }  # fmt: skip
    return [
        Finished(
            channel_id=row["channel_id"],
            event_id=row["event_id"],
            outcome=outcomes[row["status"]],
            next_attempt_at=row["next_attempt_at"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


async def finish_attempt(
    connection: Connection, channel_id: uuid.UUID, event_id: uuid.UUID, attempt: Attempt, policy: RetryPolicy
) -> Literal["delivered", "retry", "failed"] | None:
    """`finish_attempts` of one attempt: its outcome, or None when the record was no longer pending."""
    finished = await finish_attempts(connection, [(channel_id, event_id, attempt)], policy)
    return finished[0].outcome if finished else None


async def fail_of_disabled_channels(
    connection: Connection, *, channel_id: uuid.UUID | None = None, limit: int = 1000
) -> int:
    """Mark `failed` (detail DISABLED_DETAIL) the pending records of disabled channels (of `channel_id` alone when
    given), at most `limit` at once: a disabled channel gets nothing, and an old event sent when it is enabled again
    hours later would be news to no one. The api calls it in the transaction that disables a channel; the notifiers
    sweep for records recorded in the moment before (a batch that read the channel while still enabled). Records
    another notifier holds locked (in flight) are skipped; their answers are stored as usual. Returns how many were
    marked."""
    status = await connection.execute(
        """
        WITH stale AS (
            SELECT d.channel_id, d.event_id
            FROM notification_channels c JOIN notification_deliveries d ON d.channel_id = c.id
            WHERE NOT c.enabled AND d.status = 'pending' AND ($1::uuid IS NULL OR c.id = $1)
            ORDER BY d.channel_id, d.event_id
            LIMIT $2
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE notification_deliveries AS d SET status = 'failed', detail = $3, status_code = NULL,
            next_attempt_at = NULL
        FROM stale WHERE d.channel_id = stale.channel_id AND d.event_id = stale.event_id
        """,
        channel_id,
        limit,
        DISABLED_DETAIL,
    )
    return int(status.split()[-1])


async def oldest_due_age_seconds(connection: Connection) -> float:
    """How long the oldest due pending record of an enabled channel has been due (seconds; 0 when none is): the
    notifiers' queue lag (a disabled channel's records wait on purpose, they are not late)."""
    age: float | None = await connection.fetchval(
        """
        SELECT extract(epoch FROM clock_timestamp() - min(oldest.next_attempt_at))::float8
        FROM notification_channels c CROSS JOIN LATERAL (
            SELECT d.next_attempt_at FROM notification_deliveries d
            WHERE d.status = 'pending' AND d.channel_id = c.id AND d.next_attempt_at <= statement_timestamp()
            ORDER BY d.channel_id, d.next_attempt_at LIMIT 1
        ) AS oldest
        WHERE c.enabled
        """
    )
    return max(0.0, age or 0.0)


async def delivery_page(
    connection: Connection, channel_id: uuid.UUID, *, limit: int, before: tuple[dt.datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    """A channel's delivery records, newest first by (created_at, event_id) descending, those strictly before the
    cursor `before` when given, at most `limit`. Columns: event_id, event_type, attempts, last_attempt_at, status,
    status_code, detail, created_at (never the body)."""
    columns = "event_id, event_type, attempts, last_attempt_at, status, status_code, detail, created_at"
    if before is None:
        return await connection.fetch(
            f"""
            SELECT {columns} FROM notification_deliveries WHERE channel_id = $1
            ORDER BY created_at DESC, event_id DESC LIMIT $2
            """,
            channel_id,
            limit,
        )
    return await connection.fetch(
        f"""
        SELECT {columns} FROM notification_deliveries
        WHERE channel_id = $1 AND (created_at, event_id) < ($2, $3)
        ORDER BY created_at DESC, event_id DESC LIMIT $4
        """,
        channel_id,
        before[0],
        before[1],
        limit,
    )


async def record_test_delivery(
    connection: Connection, channel_id: uuid.UUID, event_id: uuid.UUID, body: bytes, attempt: Attempt
) -> None:
    """The record of a `/test` run (already sent, once): event_type "healthgate.test", attempts 1, `delivered` when
    the receiver answered 2xx else `failed` (never retried), with the attempt's status code and detail."""
    await connection.execute(
        """
        INSERT INTO notification_deliveries
            (channel_id, event_id, event_type, body, status, attempts, last_attempt_at, status_code, detail)
        VALUES ($1, $2, $3, $4, $5, 1, clock_timestamp(), $6, $7)
        ON CONFLICT (channel_id, event_id) DO NOTHING
        """,
        channel_id,
        event_id,
        TEST_EVENT_TYPE,
        body,
        "delivered" if attempt.delivered else "failed",
        attempt.status_code,
        attempt.detail[:DETAIL_MAX_CHARS],
    )


async def prune_finished(pool: asyncpg.Pool, before: dt.datetime) -> int:
    """Delete the delivered and failed records made before `before` (the pruner: HEALTHGATE_OUTBOX_RETENTION_HOURS),
    in batches of short transactions; pending records are never deleted. Returns how many were deleted."""
    return await delete_in_batches(
        pool,
        """
        DELETE FROM notification_deliveries WHERE (channel_id, event_id) IN (
            SELECT channel_id, event_id FROM notification_deliveries
            WHERE status <> 'pending' AND created_at < $1 LIMIT $2
        )
        """,
        before,
    )
