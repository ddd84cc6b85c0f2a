"""The delivery records' owner (shared/notification_deliveries.py) against the real database: one record per channel
and event, claims that skip what others hold, back-off, giving up, the api's page and test records, pruning."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass

import asyncpg

from shared import notification_deliveries as deliveries
from shared.notification_deliveries import RetryPolicy


@dataclass(frozen=True)
class _Attempt:
    delivered: bool
    status_code: int | None
    detail: str
    final: bool = False


async def _channel(db: asyncpg.Connection, name: str) -> uuid.UUID:
    channel_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO notification_channels (id, name, type, url, events) VALUES ($1, $2, 'slack', $3, $4)",
        channel_id,
        name,
        "http://127.0.0.1:9/hook",
        ["host.status_changed"],
    )
    return channel_id


async def test_an_event_is_recorded_once_per_channel(db: asyncpg.Connection) -> None:
    first, second = await _channel(db, "one"), await _channel(db, "two")
    event_id = uuid.uuid4()
    bodies = {first: b"a", second: b"b"}
    assert await deliveries.record_deliveries(db, event_id, "host.status_changed", bodies) == 2
    assert await deliveries.record_deliveries(db, event_id, "host.status_changed", bodies) == 0
    assert await db.fetchval("SELECT count(*) FROM notification_deliveries") == 2


async def test_claims_skip_locked_records_and_respect_free_slots(db: asyncpg.Connection, database_url: str) -> None:
    channel = await _channel(db, "slots")
    for _ in range(5):
        await deliveries.record_deliveries(db, uuid.uuid4(), "host.status_changed", {channel: b"x"})
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            held = await deliveries.claim_due(other, {channel: 2}, lease_seconds=30)
            assert len(held) == 2 and all(claim.attempts == 1 for claim in held)
            # While the first claim's transaction holds its two, a second claimer gets the other three.
            rest = await deliveries.claim_due(db, {channel: 10}, lease_seconds=30)
            assert {claim.event_id for claim in rest}.isdisjoint({claim.event_id for claim in held})
            assert len(rest) == 3
    finally:
        await other.close()
    # Leased: nothing is due any more, and a channel without a free slot is not looked at.
    assert await deliveries.claim_due(db, {channel: 10}, lease_seconds=30) == []
    assert await deliveries.claim_due(db, {channel: 0}, lease_seconds=30) == []


async def test_failed_attempts_back_off_then_deliver(db: asyncpg.Connection) -> None:
    channel = await _channel(db, "backoff")
    event_id = uuid.uuid4()
    await deliveries.record_deliveries(db, event_id, "host.status_changed", {channel: b"x"})
    policy = RetryPolicy(first_seconds=100, max_seconds=250)
    gaps = []
    for _ in range(3):
        [claim] = await deliveries.claim_due(db, {channel: 1}, lease_seconds=30)
        outcome = await deliveries.finish_attempt(db, channel, event_id, _Attempt(False, 500, "HTTP 500"), policy)
        assert outcome == "retry"
        row = await db.fetchrow(
            "SELECT next_attempt_at - last_attempt_at AS gap, detail, status_code FROM notification_deliveries"
        )
        gaps.append(row["gap"].total_seconds())
        assert row["detail"] == "HTTP 500" and row["status_code"] == 500
        await db.execute("UPDATE notification_deliveries SET next_attempt_at = now()")  # due again
    assert 100 <= gaps[0] <= 111 and 200 <= gaps[1] <= 221 and 250 <= gaps[2] <= 276
    [claim] = await deliveries.claim_due(db, {channel: 1}, lease_seconds=30)
    assert claim.attempts == 4
    assert await deliveries.finish_attempt(db, channel, event_id, _Attempt(True, 200, "HTTP 200"), policy) == (
        "delivered"
    )
    row = await db.fetchrow("SELECT status, attempts, next_attempt_at FROM notification_deliveries")
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("delivered", 4, None)
    # Finished: a late finish (a lease that ran out) changes nothing.
    assert await deliveries.finish_attempt(db, channel, event_id, _Attempt(False, 500, "late"), policy) is None


async def test_final_attempts_and_old_records_fail(db: asyncpg.Connection) -> None:
    channel = await _channel(db, "final")
    blocked, old = uuid.uuid4(), uuid.uuid4()
    await deliveries.record_deliveries(db, blocked, "host.status_changed", {channel: b"x"})
    await deliveries.record_deliveries(db, old, "host.status_changed", {channel: b"x"})
    await db.execute(
        "UPDATE notification_deliveries SET created_at = now() - interval '25 hours' WHERE event_id = $1", old
    )
    assert len(await deliveries.claim_due(db, {channel: 5}, lease_seconds=30)) == 2
    attempt = _Attempt(False, None, "blocked: 127.0.0.2 is in HEALTHGATE_BLOCKED_NETWORKS", final=True)
    assert await deliveries.finish_attempt(db, channel, blocked, attempt, RetryPolicy()) == "failed"
    assert await deliveries.finish_attempt(db, channel, old, _Attempt(False, 503, "HTTP 503"), RetryPolicy()) == (
        "failed"
    )
    rows = await db.fetch("SELECT status, next_attempt_at FROM notification_deliveries")
    assert [(row["status"], row["next_attempt_at"]) for row in rows] == [("failed", None)] * 2


async def test_a_batch_is_recorded_in_one_statement_once_and_without_deleted_channels(db: asyncpg.Connection) -> None:
    first, second = await _channel(db, "batch-1"), await _channel(db, "batch-2")
    events = [uuid.uuid4() for _ in range(3)]
    wanted = [
        deliveries.NewDelivery(channel, event_id, "host.status_changed", b"x")
        for event_id in events
        for channel in (first, second, uuid.uuid4())  # the third: a channel deleted since it was read
    ]
    made = await deliveries.record_many(db, wanted)
    assert made == {(channel, event_id) for event_id in events for channel in (first, second)}
    assert await deliveries.record_many(db, wanted) == set()  # the batch again: nothing new
    assert await db.fetchval("SELECT count(*) FROM notification_deliveries") == 6


async def test_pending_records_of_disabled_channels_fail(db: asyncpg.Connection) -> None:
    disabled, other, enabled = await _channel(db, "disabled"), await _channel(db, "other"), await _channel(db, "on")
    event_id = uuid.uuid4()
    channels = (disabled, other, enabled)
    await deliveries.record_deliveries(db, event_id, "host.status_changed", dict.fromkeys(channels, b"x"))
    await db.execute("UPDATE notification_channels SET enabled = false WHERE id = ANY($1)", [disabled, other])
    assert await deliveries.fail_of_disabled_channels(db, channel_id=disabled) == 1  # the api's, as it disables one
    assert await deliveries.fail_of_disabled_channels(db) == 1  # the notifiers' sweep: the other one
    assert await deliveries.fail_of_disabled_channels(db) == 0
    rows = await db.fetch("SELECT channel_id, status, detail FROM notification_deliveries")
    assert {row["channel_id"]: (row["status"], row["detail"]) for row in rows} == {
        disabled: ("failed", deliveries.DISABLED_DETAIL),
        other: ("failed", deliveries.DISABLED_DETAIL),
        enabled: ("pending", None),  # an enabled channel's records end by their attempts
    }


async def test_page_test_records_and_pruning(db: asyncpg.Connection, database_url: str) -> None:
    channel = await _channel(db, "page")
    ids = [uuid.uuid4() for _ in range(3)]
    for event_id in ids:
        await deliveries.record_deliveries(db, event_id, "host.status_changed", {channel: b"x"})
        await asyncio.sleep(0.002)  # distinct created_at
    test_id = uuid.uuid4()
    await deliveries.record_test_delivery(db, channel, test_id, b"{}", _Attempt(True, 204, "HTTP 204"))
    page = await deliveries.delivery_page(db, channel, limit=2, before=None)
    assert [row["event_id"] for row in page] == [test_id, ids[2]]
    assert page[0]["event_type"] == "healthgate.test" and page[0]["status"] == "delivered"
    assert page[0]["attempts"] == 1 and page[0]["status_code"] == 204
    cursor = (page[-1]["created_at"], page[-1]["event_id"])
    rest = await deliveries.delivery_page(db, channel, limit=10, before=cursor)
    assert [row["event_id"] for row in rest] == [ids[1], ids[0]]
    # Pruning removes finished records only.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        assert await deliveries.prune_finished(pool, future) == 1
    finally:
        await pool.close()
    assert await db.fetchval("SELECT count(*) FROM notification_deliveries WHERE status = 'pending'") == 3
