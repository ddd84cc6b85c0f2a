"""shared/schedule.py: when each check runs next. Its logic is SQL, so it runs against a database of the test's
own (`private_database`: no poller of the session claims these rows meanwhile); no broker, no services.

- `schedule_first_run`: a created, changed or re-enabled check runs within 5 s, never later than a run
  already due sooner; a disabled one is not scheduled;
- `claim_due`: due rows are claimed oldest first and moved to `slot + interval` (the cadence), or after a
  downtime to `now() + interval` with up to 10 % jitter; other claimers skip rows being claimed;
- `request_reruns`: the gate pulls a check's next run to now, at most once per retry period (counted from the
  moment a verification wants results from).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.checks import insert_check
from shared.hosts import insert_host
from shared.schedule import FIRST_RUN_WITHIN_SECONDS, claim_due, request_reruns, schedule_first_run

INTERVAL = 60
SECOND = dt.timedelta(seconds=1)


@pytest.fixture
async def connection(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(private_database)
    yield connection
    await connection.close()


async def new_check(connection: asyncpg.Connection, *, enabled: bool = True, interval: int = INTERVAL) -> uuid.UUID:
    """A tcp check (on a new host) without a schedule row yet."""
    host_id, check_id = uuid.uuid4(), uuid.uuid4()
    await insert_host(connection, host_id, name=f"host-{host_id.hex[:8]}", group="unit", agent_url=None)
    values = {
        "name": "tcp", "check_type": "tcp", "enabled": enabled, "interval_seconds": interval,
        "timeout_seconds": 1.0, "port": 22, "address": "127.0.0.1",
    }  # fmt: skip
    await insert_check(connection, check_id, host_id, values)
    return check_id


async def scheduled(connection: asyncpg.Connection, check_id: uuid.UUID, next_run_at: dt.datetime | None) -> None:
    """Seed the check's schedule row directly (a test sets up the state it needs)."""
    await connection.execute(
        """
        INSERT INTO check_schedule (check_id, next_run_at) VALUES ($1, $2)
        ON CONFLICT (check_id) DO UPDATE SET next_run_at = EXCLUDED.next_run_at
        """,
        check_id,
        next_run_at,
    )


async def next_run(connection: asyncpg.Connection, check_id: uuid.UUID) -> dt.datetime | None:
    value: dt.datetime | None = await connection.fetchval(
        "SELECT next_run_at FROM check_schedule WHERE check_id = $1", check_id
    )
    return value


async def clock(connection: asyncpg.Connection) -> dt.datetime:
    value: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    return value


# ---- the first run -----------------------------------------------------------------------------------


async def test_a_new_check_runs_within_five_seconds_and_a_disabled_one_not_at_all(
    connection: asyncpg.Connection,
) -> None:
    enabled, disabled = await new_check(connection), await new_check(connection, enabled=False)
    before = await clock(connection)
    await schedule_first_run(connection, enabled, enabled=True)
    await schedule_first_run(connection, disabled, enabled=False)
    after = await clock(connection)
    first = await next_run(connection, enabled)
    assert first is not None and before <= first <= after + FIRST_RUN_WITHIN_SECONDS * SECOND
    assert await next_run(connection, disabled) is None
    assert await connection.fetchval("SELECT count(*) FROM check_schedule WHERE check_id = $1", disabled) == 1


async def test_a_change_never_postpones_a_run_due_sooner_but_pulls_a_later_one_in(
    connection: asyncpg.Connection,
) -> None:
    soon, far = await new_check(connection), await new_check(connection)
    now = await clock(connection)
    await scheduled(connection, soon, now - SECOND)  # already due
    await scheduled(connection, far, now + dt.timedelta(hours=1))
    await schedule_first_run(connection, soon, enabled=True)
    await schedule_first_run(connection, far, enabled=True)
    assert await next_run(connection, soon) == now - SECOND
    pulled = await next_run(connection, far)
    assert pulled is not None and pulled <= await clock(connection) + FIRST_RUN_WITHIN_SECONDS * SECOND


async def test_disabling_unschedules_and_re_enabling_schedules_again(connection: asyncpg.Connection) -> None:
    check_id = await new_check(connection)
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=1))
    await schedule_first_run(connection, check_id, enabled=False)
    assert await next_run(connection, check_id) is None
    await schedule_first_run(connection, check_id, enabled=True)
    again = await next_run(connection, check_id)
    assert again is not None and again <= await clock(connection) + FIRST_RUN_WITHIN_SECONDS * SECOND


# ---- claiming due checks -------------------------------------------------------------------------------


async def test_a_due_check_moves_on_by_its_interval_from_its_slot(connection: asyncpg.Connection) -> None:
    """The cadence does not drift with dispatch delays: next = slot + interval, not claim time + interval."""
    check_id = await new_check(connection)
    slot = await clock(connection) - dt.timedelta(seconds=10)
    await scheduled(connection, check_id, slot)
    async with connection.transaction():
        claimed = await claim_due(connection, 10)
    assert [(row["check_id"], row["slot"], row["enabled"]) for row in claimed] == [(check_id, slot, True)]
    assert await next_run(connection, check_id) == slot + INTERVAL * SECOND


async def test_a_late_check_runs_once_and_resumes_from_now_with_jitter(connection: asyncpg.Connection) -> None:
    """After a downtime of many intervals the check is not caught up slot by slot: it resumes one interval
    (plus up to 10 %) after the claim."""
    check_id = await new_check(connection)
    slot = await clock(connection) - dt.timedelta(hours=3)
    await scheduled(connection, check_id, slot)
    async with connection.transaction():
        now = await connection.fetchval("SELECT now()")
        assert [row["slot"] for row in await claim_due(connection, 10)] == [slot]
    following = await next_run(connection, check_id)
    assert following is not None
    assert now + INTERVAL * SECOND <= following <= now + INTERVAL * 1.1 * SECOND
    async with connection.transaction():
        assert await claim_due(connection, 10) == []  # not due again until then


async def test_claims_take_the_oldest_first_up_to_the_limit_and_skip_what_is_not_due(
    connection: asyncpg.Connection,
) -> None:
    now = await clock(connection)
    oldest, older, old, future, unscheduled = [await new_check(connection) for _ in range(5)]
    await scheduled(connection, old, now - 1 * SECOND)
    await scheduled(connection, oldest, now - 3 * SECOND)
    await scheduled(connection, older, now - 2 * SECOND)
    await scheduled(connection, future, now + dt.timedelta(minutes=5))
    await scheduled(connection, unscheduled, None)
    async with connection.transaction():
        first = [row["check_id"] for row in await claim_due(connection, 2)]
    async with connection.transaction():
        rest = [row["check_id"] for row in await claim_due(connection, 10)]
    assert (first, rest) == ([oldest, older], [old])


async def test_a_disabled_check_still_on_the_schedule_is_claimed_as_disabled(connection: asyncpg.Connection) -> None:
    """The caller dispatches only the enabled rows; the claim still moves a disabled one's slot on."""
    check_id = await new_check(connection, enabled=False)
    slot = await clock(connection) - SECOND
    await scheduled(connection, check_id, slot)
    async with connection.transaction():
        claimed = await claim_due(connection, 10)
    assert [(row["check_id"], row["enabled"]) for row in claimed] == [(check_id, False)]
    assert await next_run(connection, check_id) == slot + INTERVAL * SECOND


async def test_claimers_skip_the_rows_another_claimer_holds(
    connection: asyncpg.Connection, private_database: str
) -> None:
    first, second = await new_check(connection), await new_check(connection)
    now = await clock(connection)
    await scheduled(connection, first, now - 2 * SECOND)
    await scheduled(connection, second, now - SECOND)
    other = await asyncpg.connect(private_database)
    try:
        async with connection.transaction():
            mine = [row["check_id"] for row in await claim_due(connection, 1)]
            async with other.transaction():
                theirs = [row["check_id"] for row in await claim_due(other, 10)]  # does not wait for mine
        assert (mine, theirs) == ([first], [second])
    finally:
        await other.close()


async def test_the_next_run_is_always_later_than_the_slot_claimed(connection: asyncpg.Connection) -> None:
    """The invariant every writer keeps: a pending next_run_at is later than every slot dispatched."""
    now = await clock(connection)
    lateness = [0, 1, 9, 10, 11, 59, 60, 61, 600, 86_400]
    checks = {}
    for seconds in lateness:
        check_id = await new_check(connection, interval=10)
        await scheduled(connection, check_id, now - seconds * SECOND)
        checks[check_id] = now - seconds * SECOND
    async with connection.transaction():
        claimed = await claim_due(connection, 100)
    assert {row["check_id"] for row in claimed} == set(checks)
    for check_id, slot in checks.items():
        following = await next_run(connection, check_id)
        assert following is not None and following > slot


# ---- re-runs for the gate --------------------------------------------------------------------------------


async def test_a_rerun_pulls_the_next_run_to_now_once_per_retry_period(connection: asyncpg.Connection) -> None:
    check_id = await new_check(connection)
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=5))
    async with connection.transaction():
        assert await request_reruns(connection, [check_id, check_id], retry_seconds=30) == [check_id]
    pulled = await next_run(connection, check_id)
    assert pulled is not None and pulled <= await clock(connection)

    # Run and moved on again by a scheduler; another job waiting on it asks again within the period.
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=5))
    async with connection.transaction():
        assert await request_reruns(connection, [check_id], retry_seconds=30) == []

    # Once the period has passed since the last request, it is pulled again.
    await connection.execute(
        "UPDATE check_schedule SET rerun_requested_at = now() - interval '31 seconds' WHERE check_id = $1", check_id
    )
    async with connection.transaction():
        assert await request_reruns(connection, [check_id], retry_seconds=30) == [check_id]


async def test_a_pull_before_the_results_wanted_does_not_hold_a_verification_rerun_back(
    connection: asyncpg.Connection,
) -> None:
    """A job waited on the check (pulled), then the host was patched: verification wants a result from after the
    patch, so the earlier pull does not count against the retry period; a pull made since does."""
    check_id = await new_check(connection)
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=5))
    async with connection.transaction():
        assert await request_reruns(connection, [check_id], retry_seconds=300) == [check_id]
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=5))  # it ran
    patched = await clock(connection)
    async with connection.transaction():
        assert await request_reruns(connection, [check_id], retry_seconds=300) == []  # waiting jobs: once a period
        assert await request_reruns(connection, [check_id], retry_seconds=300, results_from=patched) == [check_id]
    await scheduled(connection, check_id, await clock(connection) + dt.timedelta(minutes=5))
    async with connection.transaction():
        assert await request_reruns(connection, [check_id], retry_seconds=300, results_from=patched) == []


async def test_no_rerun_for_a_check_already_due_disabled_or_unknown(connection: asyncpg.Connection) -> None:
    due, disabled = await new_check(connection), await new_check(connection, enabled=False)
    due_at = await clock(connection) - SECOND
    await scheduled(connection, due, due_at)
    await scheduled(connection, disabled, None)
    async with connection.transaction():
        assert await request_reruns(connection, [due, disabled, uuid.uuid4()], retry_seconds=30) == []
    assert (await next_run(connection, due), await next_run(connection, disabled)) == (due_at, None)
    assert await request_reruns(connection, [], retry_seconds=30) == []


async def test_a_rerun_skips_a_row_another_writer_holds(connection: asyncpg.Connection, private_database: str) -> None:
    """A locked row is being dispatched or rescheduled: a run is coming anyway, so the gate does not wait."""
    check_id = await new_check(connection)
    later = await clock(connection) + dt.timedelta(minutes=5)
    await scheduled(connection, check_id, later)
    other = await asyncpg.connect(private_database)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM check_schedule WHERE check_id = $1 FOR UPDATE", check_id)
            async with connection.transaction():
                assert await request_reruns(connection, [check_id], retry_seconds=30) == []
    finally:
        await other.close()
    assert await next_run(connection, check_id) == later
