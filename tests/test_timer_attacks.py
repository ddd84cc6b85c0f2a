"""Attacks on the gate's timers after migration 0016 (a job.start's row is due for the timers 2 s after its record)
and on their bounded wait for a group whose lock they keep finding held (`Gate.run_due_timers`,
`shared.jobs.lock_group(wait_seconds=...)`).

The gate's code runs in this process against a database of its own (tests/test_fast_release_attacks.py's helpers);
locks are held by other connections in open transactions.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import pytest

from services.gate.consumer import TIMER_LOCK_WAIT_SECONDS, TIMER_SKIPS_BEFORE_WAIT
from shared import jobs
from shared.events import JobStart, job_key
from tests.test_fast_release_attacks import add_host, job_start, make_gate, record, state, timers_until_decided
from tests.test_gate_faults import StackFactory, own_stack  # noqa: F401 (own_stack: a fixture)
from tests.test_group_lock_modes import SETTLE_SECONDS, hold_lock


async def closing_soon(connection: asyncpg.Connection, group: str, name: str, seconds: float) -> JobStart:
    """A job host of an unhealthy host of `group`, recorded (not decided), its window closing in `seconds`."""
    host_id = await add_host(connection, group, name)
    await connection.execute(
        "UPDATE check_state SET status = 'unhealthy', last_healthy = false WHERE host_id = $1", host_id
    )
    now = await connection.fetchval("SELECT clock_timestamp()")
    return job_start(f"{name}-job", host_id, (now + dt.timedelta(seconds=seconds)).isoformat())


async def make_due(connection: asyncpg.Connection, job: JobStart) -> None:
    """Its first evaluation by the timers due now (as 2 s after the record)."""
    await connection.execute(
        "UPDATE gate_jobs SET next_retry_at = now() WHERE job_id = $1 AND host_id = $2",
        job_key(job.job_id),
        job.host_id,
    )


# ---- a gate that dies between record and decision ---------------------------------------------------------


async def test_a_redelivered_job_start_after_a_crash_is_a_duplicate_and_decided_once_by_the_timers(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    private_database: str,
) -> None:
    host_id = await add_host(private_db, "crash", "crash-1")
    job = job_start("crash-dup", host_id)
    await record(private_pool, job)  # the gate dies here; its job.start comes back
    gates = [make_gate(private_pool, private_database) for _ in range(2)]
    assert await gates[0].start(job) == "duplicate"
    assert (await state(private_db, job))[0] == "waiting_health_check"
    started = asyncio.get_running_loop().time()

    async def timers(gate: object) -> None:
        async with private_pool.acquire() as connection:
            await timers_until_decided(gate, connection, job, within=5)  # type: ignore[arg-type]

    await asyncio.gather(*(timers(gate) for gate in gates))
    assert asyncio.get_running_loop().time() - started <= 3.0
    assert await state(private_db, job) == ("released", None, ["job.released"])


# ---- the bounded wait -------------------------------------------------------------------------------------


async def test_many_held_groups_do_not_stretch_a_round_past_one_wait(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    holder: asyncpg.Connection,
    private_database: str,
) -> None:
    """Four groups held all along by a long transaction: one round of the timers still waits about
    TIMER_LOCK_WAIT_SECONDS in all, not once per group, and a free group's closed window is failed in that round."""
    held = [await closing_soon(private_db, f"held-{index}", f"held-{index}", 0.1) for index in range(4)]
    for job in held:
        await record(private_pool, job)
    free = await closing_soon(private_db, "free", "free", 0.4)
    await record(private_pool, free)
    await asyncio.sleep(0.5)
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    try:
        for index in range(4):
            await hold_lock(holder, f"held-{index}", shared=False)
        for _ in range(TIMER_SKIPS_BEFORE_WAIT):
            await gate.run_due_timers()
        # Due again (the free group was failed meanwhile): a new free job host, its window closed.
        free = await closing_soon(private_db, "free", "free-2", 0.0)
        await record(private_pool, free)
        await make_due(private_db, free)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(gate.run_due_timers(), SETTLE_SECONDS)
        took = loop.time() - started
        assert await state(private_db, free) == ("failed", "window_closed", ["job.failed"])
        assert took <= TIMER_LOCK_WAIT_SECONDS + 0.7, took
        for job in held:
            assert (await state(private_db, job))[0] == "waiting_health_check"
    finally:
        await transaction.commit()
    for job in held:
        await timers_until_decided(gate, private_db, job, within=5)
        assert await state(private_db, job) == ("failed", "window_closed", ["job.failed"])


async def test_every_held_group_is_waited_for_in_turn(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    holder: asyncpg.Connection,
    private_database: str,
) -> None:
    """Three groups kept busy by shared holders that come and go: each closed window is failed within a few rounds,
    whatever the bound on a round's wait."""
    jobs_ = [await closing_soon(private_db, f"busy-{index}", f"busy-{index}", 0.1) for index in range(3)]
    for job in jobs_:
        await record(private_pool, job)
    await asyncio.sleep(0.2)
    gate = make_gate(private_pool, private_database)
    stop = asyncio.Event()

    async def busy(index: int) -> None:
        connection = await asyncpg.connect(private_database)
        try:
            while not stop.is_set():
                async with connection.transaction():
                    await hold_lock(connection, f"busy-{index % 3}", shared=True)
                    await asyncio.sleep(0.05)
        finally:
            await connection.close()

    holders = [asyncio.create_task(busy(index)) for index in range(6)]
    try:
        started = asyncio.get_running_loop().time()
        deadline = started + 8
        while any([(await state(private_db, job))[0] == "waiting_health_check" for job in jobs_]):
            assert asyncio.get_running_loop().time() < deadline, [await state(private_db, job) for job in jobs_]
            await gate.run_due_timers()
    finally:
        stop.set()
        await asyncio.gather(*holders)
    for job in jobs_:
        assert await state(private_db, job) == ("failed", "window_closed", ["job.failed"])


async def test_a_row_lock_after_the_waited_group_lock_is_waited_for_past_the_lock_timeout(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    holder: asyncpg.Connection,
    private_database: str,
) -> None:
    """The timers' waited lock sets a 1 s lock_timeout: the pass after it waits for a row another transaction
    holds (a cancel in flight) longer than that, and decides the job host once it is free."""
    group = 'o\'brien "q" ☃ ' + "x" * 85
    job = await closing_soon(private_db, group, "rowlock", 0.1)
    await record(private_pool, job)
    await asyncio.sleep(0.2)
    gate = make_gate(private_pool, private_database)
    transaction = holder.transaction()
    await transaction.start()
    try:
        await hold_lock(holder, group, shared=True)
        for _ in range(TIMER_SKIPS_BEFORE_WAIT):
            await gate.run_due_timers()
            assert (await state(private_db, job))[0] == "waiting_health_check"
    finally:
        await transaction.commit()
    transaction = holder.transaction()
    await transaction.start()
    try:
        await holder.execute(
            "SELECT 1 FROM gate_jobs WHERE job_id = $1 AND host_id = $2 FOR UPDATE", job_key(job.job_id), job.host_id
        )
        task = asyncio.create_task(gate.run_due_timers())
        await asyncio.sleep(TIMER_LOCK_WAIT_SECONDS + 0.5)
        assert not task.done()
    finally:
        await transaction.commit()
    await asyncio.wait_for(task, SETTLE_SECONDS)
    assert await state(private_db, job) == ("failed", "window_closed", ["job.failed"])
    async with private_pool.acquire() as connection:
        assert await connection.fetchval("SHOW lock_timeout") == "0"


async def test_a_group_held_all_along_does_not_keep_a_busy_group_from_being_waited_for(
    private_pool: asyncpg.Pool,
    private_db: asyncpg.Connection,
    holder: asyncpg.Connection,
    private_database: str,
) -> None:
    """A group held all along (a long pass, due first) and a group kept busy by shared holders that come and go:
    the busy group's closed window is failed within a few rounds; the held one waits for its lock."""
    stuck = await closing_soon(private_db, "stuck", "stuck", 0.05)
    await record(private_pool, stuck)
    await asyncio.sleep(0.1)
    busy_job = await closing_soon(private_db, "busy", "busy", 0.1)
    await record(private_pool, busy_job)
    await asyncio.sleep(0.2)
    gate = make_gate(private_pool, private_database)
    stop = asyncio.Event()

    async def busy() -> None:
        connection = await asyncpg.connect(private_database)
        try:
            while not stop.is_set():
                async with connection.transaction():
                    await hold_lock(connection, "busy", shared=True)
                    await asyncio.sleep(0.05)
        finally:
            await connection.close()

    transaction = holder.transaction()
    await transaction.start()
    await hold_lock(holder, "stuck", shared=False)
    holders = [asyncio.create_task(busy()) for _ in range(4)]
    try:
        deadline = asyncio.get_running_loop().time() + 8
        while (await state(private_db, busy_job))[0] == "waiting_health_check":
            assert asyncio.get_running_loop().time() < deadline, "the busy group was never waited for"
            await gate.run_due_timers()
        assert await state(private_db, busy_job) == ("failed", "window_closed", ["job.failed"])
        assert (await state(private_db, stuck))[0] == "waiting_health_check"
    finally:
        stop.set()
        await asyncio.gather(*holders)
        await transaction.commit()


# ---- real processes ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_real_gate_decides_once_the_job_host_a_dead_gate_recorded_and_its_redelivered_job_start(
    own_stack: StackFactory,  # noqa: F811 (the fixture)
) -> None:
    """A gate recorded a job.start and died before deciding it (the record is done here, as it would have); its
    job.start comes back to a real gate process: a duplicate there, and the real gate's timers release the job host
    about 2 s after the record, with one job.released."""
    async with own_stack() as stack:
        host_id = await add_host(stack.db, "dead-gate", "dead-gate-1", interval=3600)
        job = job_start("dead-gate-job", host_id)
        loop = asyncio.get_running_loop()
        recorded = loop.time()
        assert await jobs.record_start(stack.db, job) is not None  # the dead gate's record
        await stack.jobs.start(job.job_id, str(host_id), window_seconds=600)  # its redelivery
        released = await stack.events.wait_for("job.released", timeout=10)
        took = loop.time() - recorded
        assert 1.5 <= took <= 4.5, took
        await asyncio.sleep(1.0)
        assert len(stack.events.matching("job.released")) == 1
        assert len(released) == 1
        row = await stack.db.fetchrow("SELECT status FROM gate_jobs WHERE host_id = $1", host_id)
        assert row is not None and row["status"] == "released"
