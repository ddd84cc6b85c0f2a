"""Attacks on the gate's fast release of a job.start (`shared.jobs.record_start` + `decide_fast`, through
`services.gate.evaluation.decide_at_once` and `Gate.start`): what lands between the two calls, many job.starts of
one group at once through two gates, clock edges, odd job ids, NULLs in what is fingerprinted, and a PostgreSQL
error inside `gate_decide_fast`.

Each test runs the gate's code in this process against a database of its own (no other gate decides there), as
tests/test_one_decision.py does. What lands between the two calls is committed between them, in the order a slow
gate would see it; no timing is asserted (a test that needs time to pass sleeps past a deadline it set itself).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from services.gate.consumer import Gate, GateMetrics
from services.gate.evaluation import cancel, decide_at_once
from shared import jobs
from shared.database import DatabaseWatch, create_pool
from shared.events import JobCancel, JobStart, decision_event_id, job_key
from shared.group_policies import GroupPolicy, put_policy
from shared.messaging import Broker
from shared.topology import Topology
from tests.support.messages import FakeMessage

OPEN_WINDOW = "2099-01-01T00:00:00Z"
DECISION_KEYS = ("job.released", "job.failed", "job.cancelled")


@pytest.fixture
def pool(private_pool: asyncpg.Pool) -> asyncpg.Pool:
    return private_pool


@pytest.fixture
def db(private_db: asyncpg.Connection) -> asyncpg.Connection:
    return private_db


def make_gate(pool: asyncpg.Pool, dsn: str, *, unknown_host: str = "release") -> Gate:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("hgtest-unused"), connection_name="test")
    return Gate(
        pool, broker, GateMetrics(CollectorRegistry()), DatabaseWatch(dsn, pool), retry_seconds=2,
        unknown_host=unknown_host,  # type: ignore[arg-type]
    )  # fmt: skip


async def add_host(
    db: asyncpg.Connection,
    group: str,
    name: str,
    *,
    checks: int = 1,
    interval: int = 60,
    checked_ago: float = 1.0,
    healthy_for: float = 3600.0,
    detail: str | None = "connected",
) -> uuid.UUID:
    """A host of `group` with `checks` critical tcp checks, each healthy by a result `checked_ago` seconds old,
    healthy for `healthy_for` seconds (None healthy_since when negative)."""
    host_id = uuid.uuid4()
    now = await db.fetchval("SELECT clock_timestamp()")
    await db.execute('INSERT INTO hosts (id, name, "group") VALUES ($1, $2, $3)', host_id, name, group)
    for index in range(checks):
        check_id = uuid.uuid4()
        await db.execute(
            "INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port,"
            " address) VALUES ($1, $2, $3, 'tcp', $4, 1, 9, '127.0.0.1')",
            check_id, host_id, f"port-{index}", interval,
        )  # fmt: skip
        since = None if healthy_for < 0 else now - dt.timedelta(seconds=healthy_for)
        await db.execute(
            "INSERT INTO check_state (check_id, host_id, status, last_healthy, last_detail, last_checked_at,"
            " healthy_since, status_changed_at) VALUES ($1, $2, 'healthy', true, $3, $4, $5, $4)",
            check_id, host_id, detail, now - dt.timedelta(seconds=checked_ago), since,
        )  # fmt: skip
    await db.execute("UPDATE hosts SET health_check_status = 'healthy' WHERE id = $1", host_id)
    return host_id


def job_start(job_id: str, host_id: uuid.UUID, window: str = OPEN_WINDOW) -> JobStart:
    return JobStart.model_validate({"job_id": job_id, "host_id": str(host_id), "window_ends_at": window})


async def record(pool: asyncpg.Pool, job: JobStart) -> jobs.StartedJobHost:
    async with pool.acquire() as connection:
        started = await jobs.record_start(connection, job)
    assert started is not None
    return started


async def at_once(pool: asyncpg.Pool, started: jobs.StartedJobHost, *, unknown_host: str = "release") -> bool:
    async with pool.acquire() as connection:
        return await decide_at_once(connection, started, unknown_host=unknown_host) is not None  # type: ignore[arg-type]


async def state(db: asyncpg.Connection, job: JobStart) -> tuple[str, str | None, list[str]]:
    """The job host's status and reason, and the routing keys of its decision events."""
    row = await db.fetchrow(
        "SELECT status, reason FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job.job_id), job.host_id
    )
    assert row is not None
    events = await db.fetch(
        "SELECT routing_key FROM outbox WHERE event_id = $1", decision_event_id(job.job_id, job.host_id)
    )
    return row["status"], row["reason"], [event["routing_key"] for event in events]


async def timers_until_decided(gate: Gate, db: asyncpg.Connection, job: JobStart, *, within: float = 10.0) -> None:
    """Run the gate's timers until the job host is no longer waiting (its first evaluation by the timers is due 2 s
    after its record: shared/migrations/0016); fails after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while (await state(db, job))[0] == "waiting_health_check":
        assert asyncio.get_running_loop().time() < deadline, "the timers did not decide the job host"
        await gate.run_due_timers()
        await asyncio.sleep(0.1)


# ---- many job.starts of one group through two gates --------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
async def test_two_gates_and_many_job_starts_never_exceed_the_budget_and_release_in_arrival_order(
    private_database: str, db: asyncpg.Connection, limit: int
) -> None:
    group = "burst"
    host_ids = [await add_host(db, group, f"burst-{index}") for index in range(12)]
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(max_unavailable=limit))
    pools = [await create_pool(private_database, min_size=1, max_size=6) for _ in range(2)]
    try:
        gates = [make_gate(pool, private_database) for pool in pools]
        starts = [job_start(f"burst-job-{index}", host_id) for index, host_id in enumerate(host_ids)]
        await asyncio.gather(*(gates[index % 2].start(job) for index, job in enumerate(starts)))
    finally:
        for pool in pools:
            await pool.close()
    rows = await db.fetch("SELECT job_id, status FROM gate_jobs ORDER BY received_at, job_id, host_id")
    statuses = [row["status"] for row in rows]
    # Every host is ready: the first `limit` to arrive are released, the others wait (FIFO, budget never exceeded).
    assert statuses == ["released"] * limit + ["waiting_health_check"] * (len(host_ids) - limit), rows
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'job.released'") == limit


# ---- what lands between record_start and decide_fast ------------------------------------------------------------


async def test_a_release_by_another_path_between_the_two_calls_is_not_exceeded(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Budget 1: A is recorded (its turn: budget free); before its decide_fast, an override-like release of another
    host's job (committed under the group's lock, as the api's override does) takes the unit. A must not be
    released by the fast path."""
    group = "squeeze"
    first, second = await add_host(db, group, "sq-1"), await add_host(db, group, "sq-2")
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(max_unavailable=1))
    job_a = job_start("squeeze-a", first)
    started = await record(pool, job_a)
    assert not started.queued
    # Another job of the other host, already released (as an override's decision would leave it).
    async with db.transaction():
        await jobs.lock_group(db, group)
        await db.execute(
            "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)"
            " VALUES ('other', $1, 'released', '2099-01-01', clock_timestamp(), clock_timestamp())",
            second,
        )
    assert not await at_once(pool, started)
    assert (await state(db, job_a))[0] == "waiting_health_check"


@pytest.mark.parametrize(
    "change",
    ["unhealthy_result", "fresh_healthy_result", "check_added", "check_disabled", "stable_seconds", "no_checks_fail",
     "budget_added", "host_unhealthy_in_budget"],
)  # fmt: skip
async def test_a_change_between_the_two_calls_is_seen(pool: asyncpg.Pool, db: asyncpg.Connection, change: str) -> None:
    """A change to what the turn was judged on, committed between record_start and decide_fast: the fast path
    writes nothing (the release pass judges it again), except where the verdict could not change."""
    group = f"change-{change}"
    host_id = await add_host(db, group, f"c-{change}", healthy_for=30)
    other = await add_host(db, group, f"c-{change}-other")
    job = job_start(f"change-{change}", host_id)
    started = await record(pool, job)
    if change == "unhealthy_result":
        await db.execute(
            "UPDATE check_state SET status = 'unhealthy', last_healthy = false, last_checked_at = clock_timestamp(),"
            " healthy_since = NULL WHERE host_id = $1",
            host_id,
        )
    elif change == "fresh_healthy_result":
        await db.execute("UPDATE check_state SET last_checked_at = clock_timestamp() WHERE host_id = $1", host_id)
    elif change == "check_added":
        await db.execute(
            "INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port,"
            " address) VALUES ($1, $2, 'new', 'tcp', 60, 1, 9, '127.0.0.1')",
            uuid.uuid4(), host_id,
        )  # fmt: skip
    elif change == "check_disabled":
        await db.execute("UPDATE health_checks SET enabled = false WHERE host_id = $1", host_id)
    elif change == "stable_seconds":
        async with db.transaction():
            await put_policy(db, group, GroupPolicy(stable_seconds=3600))
    elif change == "no_checks_fail":
        await db.execute("UPDATE health_checks SET enabled = false WHERE host_id = $1", host_id)
        async with db.transaction():
            await put_policy(db, group, GroupPolicy(no_checks="fail"))
    elif change == "budget_added":
        await db.execute("UPDATE hosts SET health_check_status = 'unhealthy' WHERE id = $1", other)
        async with db.transaction():
            await put_policy(db, group, GroupPolicy(max_unavailable=1))
    elif change == "host_unhealthy_in_budget":
        pass
    decided = await at_once(pool, started)
    status = (await state(db, job))[0]
    if change == "fresh_healthy_result":
        # Nothing it was judged on got worse; the fast path may still fall back (the turn changed): either way
        # the job host is released or still waiting for the release pass, never failed.
        assert status in ("released", "waiting_health_check")
    elif change == "host_unhealthy_in_budget":
        assert decided and status == "released"
    else:
        assert not decided and status == "waiting_health_check", change


@pytest.mark.parametrize("change", ["moved_to_full_group", "deleted"])
async def test_a_host_moved_or_deleted_between_the_two_calls(
    pool: asyncpg.Pool, db: asyncpg.Connection, change: str
) -> None:
    host_id = await add_host(db, "from", f"mv-{change}")
    full = await add_host(db, "full", f"full-{change}")
    await db.execute("UPDATE hosts SET health_check_status = 'unhealthy' WHERE id = $1", full)
    async with db.transaction():
        await put_policy(db, "full", GroupPolicy(max_unavailable=1))
    job = job_start(f"moved-{change}", host_id)
    started = await record(pool, job)
    if change == "deleted":
        await db.execute("DELETE FROM hosts WHERE id = $1", host_id)
    else:
        await db.execute("UPDATE hosts SET \"group\" = 'full' WHERE id = $1", host_id)
    assert not await at_once(pool, started)
    assert (await state(db, job))[0] == "waiting_health_check"


async def test_a_halt_a_cancel_and_a_repeat_between_the_two_calls(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    host_id = await add_host(db, "hcr", "hcr-1")
    # A halt: the job's waiting job hosts fail job_halted; the fast release writes nothing.
    halted = job_start("hcr-halted", host_id)
    started = await record(pool, halted)
    async with pool.acquire() as connection, connection.transaction():
        await jobs.lock_job(connection, job_key(halted.job_id))
        await jobs.halt_job(connection, halted.job_id, reason="manual", detail="stop", by="admin", source="test")
    assert not await at_once(pool, started)
    assert await state(db, halted) == ("failed", "job_halted", ["job.failed"])
    # A cancel: cancelled, and only its event.
    cancelled = job_start("hcr-cancelled", host_id)
    started = await record(pool, cancelled)
    async with pool.acquire() as connection, connection.transaction():
        assert await cancel(connection, cancelled.job_id, host_id)
    assert not await at_once(pool, started)
    assert await state(db, cancelled) == ("cancelled", None, ["job.cancelled"])
    # A repeat of the job.start while the first is between its two calls: a duplicate; one decision.
    repeated = job_start("hcr-repeated", host_id)
    started = await record(pool, repeated)
    async with pool.acquire() as connection:
        assert await jobs.record_start(connection, repeated) is None
    assert await at_once(pool, started)
    assert await state(db, repeated) == ("released", None, ["job.released"])


# ---- time between the two calls -----------------------------------------------------------------------------


async def test_a_window_that_closes_or_a_result_that_goes_stale_between_the_two_calls(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The verdict was RELEASE when judged; before decide_fast the window closes (one job host) or the only
    check's result grows older than its interval (another): nothing is written."""
    closing_host = await add_host(db, "clock", "clock-1")
    stale_host = await add_host(db, "clock", "clock-2", interval=10, checked_ago=7)
    now = await db.fetchval("SELECT clock_timestamp()")
    window = (now + dt.timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    closing = job_start("clock-closing", closing_host, window)
    stale = job_start("clock-stale", stale_host)
    started = [await record(pool, closing), await record(pool, stale)]
    deadline = now + dt.timedelta(seconds=3)
    while await db.fetchval("SELECT clock_timestamp()") < deadline + dt.timedelta(milliseconds=200):
        await asyncio.sleep(0.5)
    for item, job in zip(started, (closing, stale), strict=True):
        assert not await at_once(pool, item), job.job_id
        assert (await state(db, job))[0] == "waiting_health_check"


@pytest.mark.parametrize(
    "window", ["9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "0001-01-01T23:59:59Z"]
)
@pytest.mark.parametrize("cutoff", [0, 86400])
async def test_clock_edges_of_the_window(pool: asyncpg.Pool, db: asyncpg.Connection, window: str, cutoff: int) -> None:
    group = "edges"
    host_id = await add_host(db, group, f"edge-{window}-{cutoff}")
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(release_cutoff_seconds=cutoff, max_unavailable=5))
    job = job_start(f"edge-{window}-{cutoff}", host_id, window)
    gate = make_gate(pool, "postgresql://unused")
    assert await gate.start(job) == "started"
    status, reason, events = await state(db, job)
    if window.startswith("9999"):
        assert (status, reason, events) == ("released", None, ["job.released"])
    else:
        assert (status, reason, events) == ("failed", "window_closed", ["job.failed"])


# ---- policies that fail at once -------------------------------------------------------------------------------


async def test_unknown_hosts_and_hosts_without_checks_fail_at_once_with_one_event(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    gate = make_gate(pool, "postgresql://unused", unknown_host="fail")
    unknown = job_start("unknown-1", uuid.uuid4())
    assert await gate.start(unknown) == "started"
    assert await state(db, unknown) == ("failed", "unknown_host", ["job.failed"])
    bare = await add_host(db, "bare", "bare-1", checks=0)
    async with db.transaction():
        await put_policy(db, "bare", GroupPolicy(no_checks="fail", max_unavailable=1))
    no_checks = job_start("no-checks-1", bare)
    assert await gate.start(no_checks) == "started"
    assert await state(db, no_checks) == ("failed", "no_checks", ["job.failed"])
    # A repeated job.start of each: duplicates, no second event.
    assert await gate.start(unknown) == "duplicate" and await gate.start(no_checks) == "duplicate"
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE routing_key = ANY($1)", list(DECISION_KEYS)) == 2


# ---- the fingerprint and odd values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "detail", [None, "", "NULL", 'a "quoted", (paren) {brace} \\back\\slash', "x" * 5000, "ünïcødé ☃"]
)
async def test_the_fingerprint_is_stable_with_nulls_quotes_and_odd_job_ids(
    pool: asyncpg.Pool, db: asyncpg.Connection, detail: str | None
) -> None:
    """A turn with NULLs (no healthy_since, no detail), quoting characters in a check's detail and in a patching
    job's id (budget hosts), read twice with nothing changed: the fast path decides (the fingerprint of the same
    turn is the same)."""
    group = "fp"
    host_id = await add_host(db, group, "fp-1", detail=detail, healthy_for=-1, checks=2)
    other = await add_host(db, group, "fp-2")
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(max_unavailable=3))
    await db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)"
        " VALUES ($1, $2, 'released', '2099-01-01', clock_timestamp(), clock_timestamp())",
        'odd "job", {1,2} (x) \\ NULL',
        other,
    )
    job = job_start('odd "job", {1,2} (x) \\ NULL ☃', host_id)
    started = await record(pool, job)
    assert await at_once(pool, started)
    assert await state(db, job) == ("released", None, ["job.released"])


# ---- a gate that stops between the two calls, and an error inside decide_fast ------------------------------------


async def test_a_job_host_left_waiting_between_the_two_calls_is_decided_by_the_timers(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    host_id = await add_host(db, "crash", "crash-1")
    job = job_start("crash-1", host_id)
    await record(pool, job)  # the gate dies here
    gate = make_gate(pool, private_database)
    # Not before its first evaluation is due (2 s after the record: shared/migrations/0016), then at once.
    await gate.run_due_timers()
    assert (await state(db, job))[0] == "waiting_health_check"
    due = await db.fetchval(
        "SELECT next_retry_at - received_at FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job.job_id, host_id
    )
    assert dt.timedelta(seconds=1.9) <= due <= dt.timedelta(seconds=2.1)
    await asyncio.sleep(2.1)
    await gate.run_due_timers()
    assert await state(db, job) == ("released", None, ["job.released"])


async def test_an_error_inside_decide_fast_neither_loops_nor_loses_the_job_host(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    """The outbox refuses the event (a constraint): `gate_decide_fast` fails and writes nothing; the message is
    returned (nack, requeue) once; its redelivery is a duplicate (acked); once the outbox takes events again the
    timers decide the job host, with one event."""
    host_id = await add_host(db, "error", "error-1")
    job = job_start("error-1", host_id)
    await db.execute("ALTER TABLE outbox ADD CONSTRAINT refuse CHECK (routing_key <> 'job.released') NOT VALID")
    gate = make_gate(pool, private_database)
    envelope = job.model_dump_json().encode()
    first = FakeMessage(envelope, routing_key="job.start")
    await gate.on_job_message(first)  # type: ignore[arg-type]
    assert first.settlements == [("nack", True)], first.settlements
    assert (await state(db, job))[0] == "waiting_health_check"
    again = FakeMessage(envelope, routing_key="job.start")
    await gate.on_job_message(again)  # type: ignore[arg-type]
    assert again.settlements == [("ack", None)], again.settlements
    await db.execute("ALTER TABLE outbox DROP CONSTRAINT refuse")
    await timers_until_decided(gate, db, job)
    assert await state(db, job) == ("released", None, ["job.released"])


# ---- a migration that adds a column to group_policies while a gate runs ------------------------------------------


async def test_a_column_added_to_group_policies_while_the_gate_runs(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    """A BUG found by the break-gate attacks, fixed (shared/jobs.py `TurnUnread`): `gate_turn.policy` is the whole `group_policies` row, whose composite
    type asyncpg caches per pool. A later migration adding a policy column (applied by a newer api while this
    gate runs: a rolling upgrade) made the next job.start's `record_start` raise OutdatedSchemaCacheError AFTER
    its row committed: the message was returned (nack, a delivery counted), came back a duplicate, and the job
    host waited for the timers. Before the fast release the gate read named policy columns and never noticed.

    Expected: each job.start is acked once decided, the first one after the migration too."""
    group = "schema"
    host_ids = [await add_host(db, group, f"schema-{index}") for index in range(3)]
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(max_unavailable=3))
    gate = make_gate(pool, private_database)
    assert await gate.start(job_start("schema-0", host_ids[0])) == "started"
    await db.execute("ALTER TABLE group_policies ADD COLUMN later_setting integer NOT NULL DEFAULT 7")
    for index in (1, 2):
        job = job_start(f"schema-{index}", host_ids[index])
        message = FakeMessage(job.model_dump_json().encode(), routing_key="job.start")
        await gate.on_job_message(message)  # type: ignore[arg-type]
        assert message.settlements == [("ack", None)], (index, message.settlements)
        assert await state(db, job) == ("released", None, ["job.released"])


# ---- everything at once ---------------------------------------------------------------------------------------


async def test_job_starts_results_cancels_and_timers_of_three_gates_at_once_keep_the_budget(
    private_database: str, db: asyncpg.Connection
) -> None:
    """Three gates on one group with a budget of 3: two take 48 job.starts (three jobs per host, so a host in patch
    takes a second job), while results flip hosts' checks between healthy and unhealthy, job.cancels come, and
    the third runs its timers. Nothing fails (no deadlock), each job host has at most one decision and one event,
    and at most 3 hosts are ever released (none finishes, so none frees its unit)."""
    group = "storm"
    limit = 3
    host_ids = [await add_host(db, group, f"storm-{index}") for index in range(16)]
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(max_unavailable=limit))
    pools = [await create_pool(private_database, min_size=1, max_size=6) for _ in range(3)]
    try:
        gates = [make_gate(pool, private_database) for pool in pools]
        starts = [job_start(f"storm-{job}", host_id) for job in range(3) for host_id in host_ids]
        stop = asyncio.Event()

        async def timers() -> None:
            while not stop.is_set():
                await gates[2].run_due_timers()
                await asyncio.sleep(0.05)

        async def flips() -> None:
            for round_number in range(24):
                host_id = host_ids[(round_number * 5) % len(host_ids)]
                healthy = round_number % 2 == 1
                async with pools[2].acquire() as connection, connection.transaction():
                    await connection.execute(
                        "UPDATE check_state SET status = $2, last_healthy = $3, last_checked_at = clock_timestamp(),"
                        " healthy_since = CASE WHEN $3 THEN clock_timestamp() - interval '1 hour' END"
                        " WHERE host_id = $1",
                        host_id, "healthy" if healthy else "unhealthy", healthy,
                    )  # fmt: skip
                    await connection.execute(
                        "UPDATE hosts SET health_check_status = $2 WHERE id = $1",
                        host_id, "healthy" if healthy else "unhealthy",
                    )  # fmt: skip
                await asyncio.sleep(0.01)

        async def cancels() -> None:
            for job in starts[5::7]:
                await asyncio.sleep(0.02)
                async with pools[2].acquire() as connection, connection.transaction():
                    await cancel(connection, job.job_id, job.host_id)

        timer_task = asyncio.create_task(timers())
        await asyncio.gather(*(gates[index % 2].start(job) for index, job in enumerate(starts)), flips(), cancels())
        stop.set()
        await timer_task
    finally:
        for pool in pools:
            await pool.close()
    released_hosts = await db.fetchval("SELECT count(DISTINCT host_id) FROM gate_jobs WHERE status = 'released'")
    assert released_hosts <= limit
    decided = await db.fetch("SELECT job_id, host_id, status FROM gate_jobs WHERE status <> 'waiting_health_check'")
    events = await db.fetch("SELECT event_id, routing_key FROM outbox WHERE routing_key = ANY($1)", list(DECISION_KEYS))
    by_id = {event["event_id"]: event["routing_key"] for event in events}
    assert len(by_id) == len(events) == len(decided)
    for row in decided:
        assert by_id[decision_event_id(row["job_id"], row["host_id"])] == f"job.{row['status']}"


@pytest.mark.parametrize(
    "job_id",
    [" ", "\u2028", "\ufeff", "\U0001f600" * 200, "a\u202eb", "\ufffe", "\U0010ffff", "%_\\'\"", "x" * 200, "é" * 200],
    ids=["space", "line-sep", "bom", "astral-200", "rtl", "nonchar", "max-codepoint", "sql-like", "ascii-200", "e-200"],
)
async def test_odd_valid_job_ids_are_released_at_once_with_one_event(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str, job_id: str
) -> None:
    host_id = await add_host(db, "odd", f"odd-{uuid.uuid4().hex[:8]}")
    async with db.transaction():
        await put_policy(db, "odd", GroupPolicy(max_unavailable=100))
    gate = make_gate(pool, private_database)
    job = job_start(job_id, host_id)
    message = FakeMessage(job.model_dump_json().encode(), routing_key="job.start")
    await gate.on_job_message(message)  # type: ignore[arg-type]
    assert message.settlements == [("ack", None)]
    assert await state(db, job) == ("released", None, ["job.released"])
    again = FakeMessage(job.model_dump_json().encode(), routing_key="job.start")
    await gate.on_job_message(again)  # type: ignore[arg-type]
    assert again.settlements == [("ack", None)]
    assert await state(db, job) == ("released", None, ["job.released"])


# ---- the clock read before a wait for the row ----------------------------------------------------------------


@pytest.mark.parametrize("ends", ["window", "stale_result"])
async def test_a_release_is_not_written_after_the_window_closed_while_decide_fast_waited_for_the_row(
    pool: asyncpg.Pool, db: asyncpg.Connection, ends: str
) -> None:
    """A BUG found by the break-gate attacks, fixed (migration 0015). A job.cancel's transaction (`cancel`: `jobs.lock_waiting` first) holds the waiting row and then fails
    (rolled back: its connection lost, a timeout). `gate_decide_fast`, judged while the window was open, read the
    clock, then waited for that row: when the cancel rolls back, the window has closed (or the only check's result
    has grown older than its interval), and the fast write must not release the job host then. The release pass
    reads its clock after the row's lock, and would fail it window_closed."""
    now = await db.fetchval("SELECT clock_timestamp()")
    deadline = now + dt.timedelta(seconds=3)
    if ends == "window":
        host_id = await add_host(db, f"wait-{ends}", f"wait-{ends}")
        window = deadline.isoformat().replace("+00:00", "Z")
    else:
        host_id = await add_host(db, f"wait-{ends}", f"wait-{ends}", interval=10, checked_ago=7)
        window = OPEN_WINDOW
    job = job_start(f"wait-{ends}", host_id, window)
    started = await record(pool, job)
    blocker = await pool.acquire()
    transaction = blocker.transaction()
    await transaction.start()
    try:
        assert await jobs.lock_waiting(blocker, job.job_id, host_id) is not None
        fast = asyncio.create_task(at_once(pool, started))
        while not await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%gate_decide_fast%'"
        ):
            assert not fast.done()
            await asyncio.sleep(0.05)
        while await db.fetchval("SELECT clock_timestamp()") < deadline + dt.timedelta(milliseconds=300):
            await asyncio.sleep(0.2)
    finally:
        await transaction.rollback()
        await pool.release(blocker)
    decided = await fast
    assert not decided, "released after the window closed (or a result went stale) while decide_fast waited"
    assert (await state(db, job))[0] == "waiting_health_check"


async def test_a_release_cutoff_longer_than_the_window_fails_the_job_start_at_once(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    host_id = await add_host(db, "cutoff", "cutoff-1")
    async with db.transaction():
        await put_policy(db, "cutoff", GroupPolicy(release_cutoff_seconds=86400))
    now = await db.fetchval("SELECT clock_timestamp()")
    job = job_start("cutoff-1", host_id, (now + dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z"))
    assert await make_gate(pool, private_database).start(job) == "started"
    assert await state(db, job) == ("failed", "window_closed", ["job.failed"])


async def test_the_budget_gauge_after_a_fast_release(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    """A BUG found by the break-gate attacks (a regression of the fast release, minor), fixed. Before it, every job.start of a budget group went through a release pass, which set the
    group's gauges (`healthgate_group_budget_in_use`) when it committed. A fast release ran no pass, and the gauge
    waited for the timers' refresh (every BUDGET_METRICS_SECONDS); now `Gate.start` sets it from the turn."""
    host_ids = [await add_host(db, "gauge", f"gauge-{index}") for index in range(3)]
    async with db.transaction():
        await put_policy(db, "gauge", GroupPolicy(max_unavailable=3))
    registry = CollectorRegistry()
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("hgtest-unused"), connection_name="test")
    gate = Gate(pool, broker, GateMetrics(registry), DatabaseWatch(private_database, pool), retry_seconds=2)
    for index, host_id in enumerate(host_ids[:2]):
        assert await gate.start(job_start(f"gauge-{index}", host_id)) == "started"
    in_use = registry.get_sample_value("healthgate_group_budget_in_use", {"group": "gauge"})
    assert in_use == 2


async def test_a_job_cancel_handled_while_its_job_start_is_recorded_cancels_the_job_host(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str
) -> None:
    """job.start and job.cancel of one job host handled at once (the gate takes many messages at a time): the
    cancel looks before the job.start's row is committed, so it records an early cancel, whose insert conflicts
    with the row once that commits. The job host is cancelled all the same (one job.cancelled), and never released
    (found by a new user's attack: a budget-full group's job host was released after its cancel)."""
    host_id = await add_host(db, "racing", "racing-1")
    job = job_start("racing-cancel", host_id)
    recorder = await asyncpg.connect(private_database)
    try:
        transaction = recorder.transaction()
        await transaction.start()
        await recorder.fetchrow(
            "SELECT * FROM gate_record_start($1, $2, $3, NULL)", job.job_id, host_id, job.window_ends_at
        )

        async def cancelled() -> bool:
            async with pool.acquire() as connection, connection.transaction():
                return await cancel(connection, job.job_id, host_id)

        racing = asyncio.create_task(cancelled())
        done, _ = await asyncio.wait({racing}, timeout=0.5)
        assert not done  # its insert waits for the job.start's
        await transaction.commit()
    finally:
        await recorder.close()
    assert await asyncio.wait_for(racing, 30)
    assert await state(db, job) == ("cancelled", None, ["job.cancelled"])
    gate = make_gate(pool, private_database)
    assert await gate.start(job) == "duplicate"
    await gate.run_due_timers()
    assert await state(db, job) == ("cancelled", None, ["job.cancelled"])


async def test_a_job_cancel_for_a_job_host_no_longer_waiting_is_logged_not_silent(
    pool: asyncpg.Pool, db: asyncpg.Connection, private_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A job.cancel after the release changes nothing, publishes nothing, and says so in one log line."""
    host_id = await add_host(db, "late-cancel", "lc-1")
    job = job_start("late-cancel", host_id)
    gate = make_gate(pool, private_database)
    assert await gate.start(job) == "started"
    body = JobCancel(job_id=job.job_id, host_id=host_id).model_dump_json().encode()
    message = FakeMessage(body, routing_key="job.cancel")
    with caplog.at_level("INFO", logger="services.gate.consumer"):
        await gate.on_job_message(message)  # type: ignore[arg-type]
    assert message.settlements == [("ack", None)]
    assert await state(db, job) == ("released", None, ["job.released"])
    lines = [record for record in caplog.records if record.getMessage().startswith("job.cancel ignored")]
    assert len(lines) == 1
    assert lines[0].__dict__["job_id"] == "late-cancel"
