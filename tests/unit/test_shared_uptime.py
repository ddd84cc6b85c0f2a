"""shared/uptime.py: each check's results counted per UTC hour, and `uptime_24h` read from those counts (CONTRACT §3).
Its logic is SQL, so it runs against a database of the test's own (`private_database`: no poller of the session
counts results into these rows meanwhile); no broker, no services.

- `count_results`: a batch's results are added to their (check, UTC hour) rows, in one statement, whatever the
  session's time zone; rows are locked in (check_id, hour) order;
- `uptime_24h`: healthy over all results in the current UTC hour and the 23 before it; None without results;
- `prune_expired`: removes exactly the hours before that window; a check's hours go with it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.checks import insert_check
from shared.hosts import insert_host
from shared.uptime import WINDOW_HOURS, Counted, count_results, hour_of, prune_expired, uptime_24h, window_start

HOUR = dt.timedelta(hours=1)
SECOND = dt.timedelta(seconds=1)


@pytest.fixture
async def connection(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(private_database)
    yield connection
    await connection.close()


@pytest.fixture
async def pool(private_database: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(private_database, min_size=1, max_size=4) as pool:
        yield pool


async def new_check(connection: asyncpg.Connection) -> uuid.UUID:
    """A tcp check on a new host."""
    host_id, check_id = uuid.uuid4(), uuid.uuid4()
    await insert_host(connection, host_id, name=f"host-{host_id.hex[:8]}", group="unit", agent_url=None)
    values = {
        "name": "tcp", "check_type": "tcp", "enabled": True, "interval_seconds": 60, "timeout_seconds": 1.0,
        "port": 22, "address": "127.0.0.1",
    }  # fmt: skip
    await insert_check(connection, check_id, host_id, values)
    return check_id


async def hours(connection: asyncpg.Connection, check_id: uuid.UUID) -> dict[dt.datetime, tuple[int, int]]:
    rows = await connection.fetch(
        "SELECT hour, healthy, total FROM check_uptime_hours WHERE check_id = $1 ORDER BY hour", check_id
    )
    return {row["hour"]: (row["healthy"], row["total"]) for row in rows}


async def database_now(connection: asyncpg.Connection) -> dt.datetime:
    """`now()`: inside a transaction, the moment every statement of it reads as now."""
    value: dt.datetime = await connection.fetchval("SELECT now()")
    return value


def results(check_id: uuid.UUID, at: dt.datetime, healthy: int, unhealthy: int) -> list[Counted]:
    return [Counted(check_id, at, True)] * healthy + [Counted(check_id, at, False)] * unhealthy


# ---- counting ----------------------------------------------------------------------------------------


async def test_a_batch_is_counted_per_check_and_utc_hour_and_later_batches_add_to_it(
    connection: asyncpg.Connection,
) -> None:
    first, second = await new_check(connection), await new_check(connection)
    hour = dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)
    await count_results(
        connection,
        [
            *results(first, hour + 5 * SECOND, healthy=2, unhealthy=1),
            *results(first, hour + 59 * 60 * SECOND, healthy=1, unhealthy=0),  # 10:59: the same hour
            *results(first, hour + HOUR, healthy=0, unhealthy=1),  # 11:00: the next one
            *results(second, hour + 30 * 60 * SECOND, healthy=1, unhealthy=0),
        ],
    )
    assert await hours(connection, first) == {hour: (3, 4), hour + HOUR: (0, 1)}
    assert await hours(connection, second) == {hour: (1, 1)}

    await count_results(connection, results(first, hour + 10 * 60 * SECOND, healthy=1, unhealthy=1))
    assert await hours(connection, first) == {hour: (4, 6), hour + HOUR: (0, 1)}
    await count_results(connection, [])  # an empty batch writes nothing
    assert await hours(connection, second) == {hour: (1, 1)}


async def test_hours_are_utc_hours_whatever_the_sessions_time_zone(connection: asyncpg.Connection) -> None:
    """India is 5:30 ahead of UTC: a local `date_trunc('hour', …)` would start an hour at :30 UTC."""
    check_id = await new_check(connection)
    await connection.execute("SET TimeZone = 'Asia/Kolkata'")
    moment = dt.datetime(2026, 3, 1, 10, 45, tzinfo=dt.UTC)
    await count_results(connection, results(check_id, moment, healthy=1, unhealthy=0))
    assert list(await hours(connection, check_id)) == [dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)]
    assert hour_of(moment.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))) == dt.datetime(
        2026, 3, 1, 10, tzinfo=dt.UTC
    )


async def test_rows_are_locked_in_check_and_hour_order(private_database: str, connection: asyncpg.Connection) -> None:
    """Two batches can only deadlock on these rows if they lock them in opposite orders. A batch that names B
    before A still takes A first: while another transaction holds A, it waits there without holding B, so a
    third transaction updates B at once."""
    low, high = sorted([await new_check(connection), await new_check(connection)])
    hour = hour_of(dt.datetime.now(dt.UTC))
    await count_results(connection, results(low, hour, 1, 0) + results(high, hour, 1, 0))
    holder, waiter, third = [await asyncpg.connect(private_database) for _ in range(3)]
    try:
        holding = holder.transaction()
        await holder.execute("SET lock_timeout = '10s'")
        await holding.start()
        await count_results(holder, results(low, hour, 1, 0))  # holds the low row
        waiting = asyncio.create_task(count_results(waiter, results(high, hour, 1, 0) + results(low, hour, 1, 0)))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # blocked on the low row
        await third.execute("SET lock_timeout = '2s'")
        await count_results(third, results(high, hour, 0, 1))  # the high row is free: the waiter has not taken it
        await holding.commit()
        await asyncio.wait_for(waiting, 10)
    finally:
        for other in (holder, waiter, third):
            await other.close()
    assert await hours(connection, low) == {hour: (3, 3)}
    assert await hours(connection, high) == {hour: (2, 3)}


# ---- reading -----------------------------------------------------------------------------------------


async def test_uptime_is_the_share_of_healthy_results_in_the_window_and_none_without_results(
    connection: asyncpg.Connection,
) -> None:
    counted, all_healthy, none_healthy, without, old_only = [await new_check(connection) for _ in range(5)]
    async with connection.transaction():
        now = await database_now(connection)
        start = window_start(now)
        assert start == hour_of(now) - (WINDOW_HOURS - 1) * HOUR
        await count_results(
            connection,
            [
                *results(counted, now, healthy=3, unhealthy=1),
                *results(counted, start, healthy=1, unhealthy=3),  # the oldest hour counted
                *results(counted, start - SECOND, healthy=0, unhealthy=50),  # just before it: not counted
                *results(counted, now - 25 * HOUR, healthy=0, unhealthy=50),
                *results(all_healthy, now - 5 * HOUR, healthy=7, unhealthy=0),
                *results(none_healthy, now - 12 * HOUR, healthy=0, unhealthy=2),
                *results(old_only, start - HOUR, healthy=5, unhealthy=0),
            ],
        )
        shares = await uptime_24h(connection, [counted, all_healthy, none_healthy, without, old_only])
    assert shares == {counted: 0.5, all_healthy: 1.0, none_healthy: 0.0, without: None, old_only: None}
    assert await uptime_24h(connection, []) == {}


async def test_many_checks_are_read_at_once_each_from_at_most_24_rows(connection: asyncpg.Connection) -> None:
    checks = [await new_check(connection) for _ in range(3)]
    async with connection.transaction():
        now = await database_now(connection)
        for index, check_id in enumerate(checks):
            # One result an hour for 30 hours, the last `index` of them unhealthy.
            await count_results(
                connection,
                [Counted(check_id, now - back * HOUR, back >= index) for back in range(30)],
            )
        shares = await uptime_24h(connection, checks)
        rows = await connection.fetchval(
            """
            SELECT count(*) FROM check_uptime_hours
            WHERE check_id = ANY($1::uuid[]) AND hour >= date_trunc('hour', now(), 'UTC') - interval '23 hours'
            """,
            checks,
        )
    assert rows == 3 * WINDOW_HOURS
    assert shares == {check_id: (WINDOW_HOURS - index) / WINDOW_HOURS for index, check_id in enumerate(checks)}


# ---- pruning and deletion ----------------------------------------------------------------------------


async def test_the_pruner_removes_exactly_the_hours_before_the_window(
    pool: asyncpg.Pool, connection: asyncpg.Connection
) -> None:
    check_id, other = await new_check(connection), await new_check(connection)
    now = await database_now(connection)
    start = window_start(now)
    await count_results(
        connection,
        [
            *results(check_id, start - 3 * 24 * HOUR, 1, 0),  # a pruner down for days
            *results(check_id, start - HOUR, 1, 0),
            *results(check_id, start - SECOND, 0, 1),  # the same hour as the one before
            *results(check_id, start, 1, 1),
            *results(check_id, now, 1, 0),
            *results(other, start - 2 * HOUR, 1, 0),
        ],
    )
    before = await uptime_24h(connection, [check_id, other])
    assert await prune_expired(pool, now) == 3
    assert set(await hours(connection, check_id)) == {start, hour_of(now)}
    assert await hours(connection, other) == {}
    # What a read counts is untouched; a second pass finds nothing.
    assert await uptime_24h(connection, [check_id, other]) == before
    assert await prune_expired(pool, now) == 0


async def test_a_checks_hours_go_with_it(connection: asyncpg.Connection) -> None:
    check_id, kept = await new_check(connection), await new_check(connection)
    now = await database_now(connection)
    await count_results(connection, results(check_id, now, 1, 0) + results(kept, now, 1, 0))
    await connection.execute("DELETE FROM health_checks WHERE id = $1", check_id)
    assert await hours(connection, check_id) == {}
    assert await hours(connection, kept) != {}
