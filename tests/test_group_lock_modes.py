"""The group's lock on the fast release path (shared/migrations/0016): SHARED for a group without a disruption
budget, so that its job.starts are released side by side instead of queueing behind each other's commits, and
EXCLUSIVE for a group with one, and for whatever counts or changes the group (a policy PUT, a release pass), which
holds fast releases off until it commits.

The gate's code runs in this process against a database of its own (tests/test_fast_release_attacks.py's
helpers). Where a test shows that a release is held back, it checks that the release has not finished while the
other transaction is open and has finished once it commits; no duration is asserted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import pytest

from services.gate.consumer import TIMER_LOCK_WAIT_SECONDS, TIMER_SKIPS_BEFORE_WAIT
from services.gate.evaluation import release_pass
from shared import jobs
from shared.database import create_pool
from shared.events import JobStart, job_key
from shared.group_policies import GroupPolicy, lock_group, put_policy
from tests.test_fast_release_attacks import add_host, at_once, job_start, make_gate, record, state

HELD_OFF_SECONDS = 0.5  # how long a held-back release is watched not to finish (not a timing claim)
SETTLE_SECONDS = 30.0  # generous bound for what must finish (a hang fails the test instead of stalling the suite)


async def hold_lock(connection: asyncpg.Connection, group: str, *, shared: bool) -> None:
    """Take the group's lock in `connection`'s open transaction, as a fast release (shared) or a pass (exclusive)."""
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    await connection.execute(f"SELECT {function}(hashtextextended('healthgate.group:' || $1, 0))", group)


async def status_of(private_db: asyncpg.Connection, job_id: str, host_id: uuid.UUID) -> str:
    return str(
        await private_db.fetchval(
            "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job_id), host_id
        )
    )


async def test_a_release_without_a_budget_does_not_wait_for_another_in_flight(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """Another fast release of the group holds the group's lock (shared) and has not committed: this one is
    released all the same, with its event."""
    host_id = await add_host(private_db, "wide", "wide-1")
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    try:
        await hold_lock(holder, "wide", shared=True)
        job = job_start("wide-job", host_id)
        assert await asyncio.wait_for(gate.start(job), SETTLE_SECONDS) == "started"
        assert await state(private_db, job) == ("released", None, ["job.released"])
    finally:
        await transaction.rollback()


@pytest.mark.parametrize("budget", [False, True])
async def test_an_exclusive_holder_holds_a_release_back_until_it_commits(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    holder: asyncpg.Connection,
    private_database: str,
    budget: bool,
) -> None:
    """A pass or a policy PUT (the exclusive lock) holds a job.start of the group back, budget or not."""
    host_id = await add_host(private_db, "narrow", "narrow-1")
    if budget:
        async with private_db.transaction():
            await put_policy(private_db, "narrow", GroupPolicy(max_unavailable=1))
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    job = job_start("narrow-job", host_id)
    task = asyncio.create_task(gate.start(job))
    try:
        await hold_lock(holder, "narrow", shared=False)
        done, _ = await asyncio.wait({task}, timeout=HELD_OFF_SECONDS)
        # The lock was taken before the job.start reached the database, or the job.start was recorded first and
        # its decision is what waits: either way nothing is released while the lock is held.
        assert not done
        assert await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'released'") == 0
    finally:
        await transaction.commit()
    assert await asyncio.wait_for(task, SETTLE_SECONDS) == "started"
    assert await state(private_db, job) == ("released", None, ["job.released"])


async def test_a_group_with_a_budget_releases_one_at_a_time(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """With a budget, a fast release takes the lock exclusively: one in flight (a shared holder, as a release
    judged just before the budget was set) holds it back until it commits."""
    host_id = await add_host(private_db, "counted", "counted-1")
    async with private_db.transaction():
        await put_policy(private_db, "counted", GroupPolicy(max_unavailable=2))
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    await hold_lock(holder, "counted", shared=True)
    job = job_start("counted-job", host_id)
    task = asyncio.create_task(gate.start(job))
    try:
        done, _ = await asyncio.wait({task}, timeout=HELD_OFF_SECONDS)
        assert not done
    finally:
        await transaction.commit()
    assert await asyncio.wait_for(task, SETTLE_SECONDS) == "started"
    assert await state(private_db, job) == ("released", None, ["job.released"])


async def test_a_budget_set_while_a_release_is_judged_without_one_is_respected(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, private_database: str
) -> None:
    """A job.start recorded in a group without a budget (its turn: no budget, lock shared); then a budget of 1 is
    set while another host of the group is in patch. The fast write answers nothing and the release pass keeps the
    job host waiting for the budget."""
    group = "late-budget"
    first, second = await add_host(private_db, group, "lb-1"), await add_host(private_db, group, "lb-2")
    await private_db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)"
        " VALUES ('patching', $1, 'released', '2099-01-01', clock_timestamp(), clock_timestamp())",
        second,
    )
    job = job_start("late-budget-job", first)
    started = await record(private_pool, job)
    assert started.budget is None
    async with private_db.transaction():
        await lock_group(private_db, group)
        await put_policy(private_db, group, GroupPolicy(max_unavailable=1))
    assert not await at_once(private_pool, started)
    assert (await state(private_db, job))[0] == "waiting_health_check"
    # The group's release pass, as the gate runs it after a fast write that wrote nothing.
    async with private_pool.acquire() as connection, connection.transaction():
        await release_pass(connection, group, host_ids=[first], job_id=job.job_id, wait=True, retry_seconds=60)
    row = await private_db.fetchrow(
        "SELECT status, waiting_for FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job.job_id), first
    )
    assert row["status"] == "waiting_health_check"
    assert "budget" in row["waiting_for"]


async def test_many_job_starts_of_two_gates_with_a_budget_put_in_the_middle(
    private_database: str, private_db: asyncpg.Connection
) -> None:
    """Two gates release 20 job.starts of a group without a budget side by side; then a budget of 1 is PUT (under
    the group's lock, as the api does) while they run; 10 more job.starts after the PUT committed release none
    (the group has hosts in patch), and every job host is decided at most once, with at most one event."""
    group = "fleet"
    host_ids = [await add_host(private_db, group, f"fleet-{index}") for index in range(30)]
    pools = [await create_pool(private_database, min_size=1, max_size=6) for _ in range(2)]
    try:
        gates = [make_gate(pool, private_database) for pool in pools]
        first = [job_start(f"fleet-a-{index}", host_id) for index, host_id in enumerate(host_ids[:20])]
        running = [asyncio.create_task(gates[index % 2].start(job)) for index, job in enumerate(first)]

        async def put_budget() -> None:
            await asyncio.sleep(0)
            async with private_db.transaction():
                await lock_group(private_db, group)
                await put_policy(private_db, group, GroupPolicy(max_unavailable=1))

        await asyncio.gather(put_budget(), *running)
        released_before = await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'released'")
        assert released_before >= 1
        later = [job_start(f"fleet-b-{index}", host_id) for index, host_id in enumerate(host_ids[20:])]
        await asyncio.gather(*(gates[index % 2].start(job) for index, job in enumerate(later)))
    finally:
        for pool in pools:
            await pool.close()
    for job in later:
        assert await status_of(private_db, job.job_id, job.host_id) == "waiting_health_check"
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'released'") == released_before
    duplicates = await private_db.fetch("SELECT event_id FROM outbox GROUP BY event_id HAVING count(*) > 1")
    assert duplicates == []
    assert (
        await private_db.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'job.released'") == released_before
    )
    # Every job host of the first 20 was either released or kept waiting for the budget set meanwhile.
    statuses = {
        row["status"] for row in await private_db.fetch("SELECT status FROM gate_jobs WHERE job_id LIKE 'fleet-a-%'")
    }
    assert statuses <= {"released", "waiting_health_check"}


async def test_a_fast_release_and_a_pass_of_the_same_group_never_deadlock(
    private_database: str, private_db: asyncpg.Connection
) -> None:
    """Fast releases (shared lock, then their row) and timer passes and cancels of the same group (exclusive lock,
    then rows; a cancel: a row alone) interleaved many times: all finish, each job host decided once."""
    group = "mixed"
    host_ids = [await add_host(private_db, group, f"mixed-{index}") for index in range(8)]
    pools = [await create_pool(private_database, min_size=1, max_size=6) for _ in range(2)]
    try:
        gates = [make_gate(pool, private_database) for pool in pools]
        work = []
        for round_ in range(5):
            for index, host_id in enumerate(host_ids):
                job = job_start(f"mixed-{round_}-{index}", host_id)
                work.append(gates[index % 2].start(job))
                if index % 3 == 0:
                    work.append(gates[(index + 1) % 2].run_due_timers())
        results = await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), SETTLE_SECONDS * 2)
    finally:
        for pool in pools:
            await pool.close()
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'released'") == 40
    duplicates = await private_db.fetch("SELECT event_id FROM outbox GROUP BY event_id HAVING count(*) > 1")
    assert duplicates == []


async def waiting_past_its_window(
    private_db: asyncpg.Connection, private_pool: asyncpg.Pool, private_database: str, group: str
) -> JobStart:
    """A job host of an unhealthy host of `group`, waiting, whose window closed (due for the timers)."""
    host_id = await add_host(private_db, group, f"{group}-sick")
    await private_db.execute(
        "UPDATE check_state SET status = 'unhealthy', last_healthy = false WHERE host_id = $1", host_id
    )
    now = await private_db.fetchval("SELECT clock_timestamp()")
    job = job_start(f"{group}-job", host_id, (now + dt.timedelta(seconds=0.5)).isoformat())
    assert await make_gate(private_pool, private_database).start(job) == "started"
    assert (await state(private_db, job))[0] == "waiting_health_check"
    await asyncio.sleep(0.6)
    return job


async def test_the_timers_wait_for_a_group_whose_lock_they_keep_finding_held(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """Fast releases that overlap keep a busy group's lock held (shared) all the time: the timers skip the group a
    few rounds, then wait for the lock (queued ahead of new shared holders), and a closed window fails its job host."""
    job = await waiting_past_its_window(private_db, private_pool, private_database, "busy")
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    try:
        await hold_lock(holder, "busy", shared=True)
        for _ in range(TIMER_SKIPS_BEFORE_WAIT):
            await gate.run_due_timers()
            assert (await state(private_db, job))[0] == "waiting_health_check"
        task = asyncio.create_task(gate.run_due_timers())
        done, _ = await asyncio.wait({task}, timeout=TIMER_LOCK_WAIT_SECONDS / 3)
        assert not done  # waiting for the lock
    finally:
        await transaction.commit()
    await asyncio.wait_for(task, SETTLE_SECONDS)
    assert await state(private_db, job) == ("failed", "window_closed", ["job.failed"])


async def test_the_timers_give_up_a_lock_held_too_long_and_try_again(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """A lock held longer than the timers wait for it (a long pass): the round ends without an error, the job host
    stays due, and a later round decides it once the lock is free."""
    job = await waiting_past_its_window(private_db, private_pool, private_database, "long")
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    try:
        await hold_lock(holder, "long", shared=False)
        for _ in range(TIMER_SKIPS_BEFORE_WAIT + 2):
            await asyncio.wait_for(gate.run_due_timers(), SETTLE_SECONDS)
            assert (await state(private_db, job))[0] == "waiting_health_check"
    finally:
        await transaction.commit()
    await gate.run_due_timers()
    assert await state(private_db, job) == ("failed", "window_closed", ["job.failed"])


async def test_job_starts_of_one_job_do_not_wait_for_each_other(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """Another job.start of the same job is being recorded (the job's row locked FOR SHARE, not committed): a
    job.start of that job on another host is released all the same (a campaign's job.starts side by side)."""
    first, second = await add_host(private_db, "campaign", "cp-1"), await add_host(private_db, "campaign", "cp-2")
    gate = make_gate(private_pool, private_database)
    assert await gate.start(job_start("one-job", first)) == "started"
    transaction = holder.transaction()
    await transaction.start()
    try:
        await holder.execute("SELECT 1 FROM jobs WHERE job_id = 'one-job' FOR SHARE")
        job = job_start("one-job", second)
        assert await asyncio.wait_for(gate.start(job), SETTLE_SECONDS) == "started"
        assert await state(private_db, job) == ("released", None, ["job.released"])
    finally:
        await transaction.rollback()


async def test_a_halt_in_flight_holds_a_job_start_of_its_job_back_and_fails_it(
    private_pool: asyncpg.Pool, private_db: asyncpg.Connection, holder: asyncpg.Connection, private_database: str
) -> None:
    """An admin's halt holds the job's row (`lock_job`) while it fails the job's waiting hosts: a job.start of that
    job handled meanwhile waits for it, then is failed job_halted, never released."""
    first, second = await add_host(private_db, "halting", "hl-1"), await add_host(private_db, "halting", "hl-2")
    gate = make_gate(private_pool, private_database)
    assert await gate.start(job_start("halted-job", first)) == "started"
    transaction = holder.transaction()
    await transaction.start()
    await jobs.lock_job(holder, "halted-job")
    job = job_start("halted-job", second)
    task = asyncio.create_task(gate.start(job))
    try:
        done, _ = await asyncio.wait({task}, timeout=HELD_OFF_SECONDS)
        assert not done
        halt = await jobs.halt_job(
            holder, "halted-job", reason="manual", detail="halted by a test", by="tester", source="test"
        )
        assert halt is not None
    finally:
        await transaction.commit()
    assert await asyncio.wait_for(task, SETTLE_SECONDS) == "started"
    assert await state(private_db, job) == ("failed", "job_halted", ["job.failed"])


async def test_a_waited_group_lock_leaves_the_transactions_own_lock_timeout_as_it_was(
    private_db: asyncpg.Connection, holder: asyncpg.Connection
) -> None:
    """`lock_group(wait_seconds=...)` bounds its own wait with lock_timeout, then gives the transaction back the
    lock_timeout it had (its own SET LOCAL, not the session's default); a wait that runs out aborts with
    LockNotAvailableError."""
    async with private_db.transaction():
        await private_db.execute("SET LOCAL lock_timeout = '7s'")
        assert await jobs.lock_group(private_db, "timeouts", wait_seconds=1.0)
        assert await private_db.fetchval("SHOW lock_timeout") == "7s"
    assert await private_db.fetchval("SHOW lock_timeout") == "0"
    async with holder.transaction():
        await hold_lock(holder, "timeouts", shared=False)
        with pytest.raises(asyncpg.LockNotAvailableError):
            async with private_db.transaction():
                await jobs.lock_group(private_db, "timeouts", wait_seconds=0.2)
