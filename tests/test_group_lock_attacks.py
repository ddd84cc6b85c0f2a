"""Attacks on the group's lock modes of the fast release (shared/migrations/0016: SHARED without a disruption budget,
EXCLUSIVE with one): budgets set, raised, lowered and removed while two gates release; a group that gains a budget
while its job hosts arrive (FIFO); hosts moved between groups; cancels, halts, overrides, job.finished and timers
racing shared-lock releases; one job on many hosts at once, repeated job.starts and unknown hosts.

The budget and FIFO are checked at each release's commit by a deferred constraint trigger installed in the test's
own database (`install_release_watch`): a release of a group with a budget (not an override) must commit holding the
group's lock EXCLUSIVELY, with the group's unavailable hosts (itself counted) within the budget and, the hosts being
healthy, no job host of the group waiting that arrived before it. What it finds is written to `watch_violations`
(the trigger never raises: a release it doubts still commits, so the test reports every case, not the first).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from services.api.auth import Principal
from services.api.jobs import halt_or_resume_on, override_on
from services.api.problems import Problem
from services.api.schemas import HaltRequest, OverrideRequest
from services.gate.consumer import Gate
from services.gate.evaluation import cancel
from shared import hosts
from shared.database import create_pool
from shared.events import JobFinished, JobStart, decision_event_id, job_key
from shared.group_policies import GroupPolicy, lock_group, put_policy
from tests.test_fast_release_attacks import add_host, job_start, make_gate
from tests.test_one_decision import api_context

SETTLE_SECONDS = 60.0  # generous bound for what must finish: a hang or a deadlock fails the test

WATCH_SQL = """
CREATE TABLE watch_violations (what text, job_id text, host_id uuid, detail text);

CREATE FUNCTION watch_release() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    g text;
    p group_policies;
    total integer;
    lim integer;
    in_use integer;
    modes text;
    earlier integer;
BEGIN
    SELECT h."group" INTO g FROM hosts h WHERE h.id = NEW.host_id;
    IF g IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT * INTO p FROM group_policies gp WHERE gp."group" = g;
    IF p.max_unavailable_count IS NULL AND p.max_unavailable_percent IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO total FROM hosts h WHERE h."group" = g;
    lim := COALESCE(p.max_unavailable_count, greatest(1, total * p.max_unavailable_percent / 100));
    SELECT count(*) INTO in_use FROM hosts h
    WHERE h."group" = g AND (h.health_check_status = 'unhealthy' OR EXISTS (
        SELECT 1 FROM gate_jobs j WHERE j.host_id = h.id AND j.status IN ('released', 'verifying')));
    SELECT string_agg(l.mode, ',') INTO modes FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted AND l.objsubid = 1
      AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('healthgate.group:' || g, 0);
    IF modes IS NULL OR position('ExclusiveLock' IN modes) = 0 THEN
        INSERT INTO watch_violations VALUES ('lock', NEW.job_id, NEW.host_id, g || ': ' || COALESCE(modes, 'none'));
    END IF;
    IF in_use > lim THEN
        INSERT INTO watch_violations VALUES ('budget', NEW.job_id, NEW.host_id, g || ': ' || in_use || ' > ' || lim);
    END IF;
    SELECT count(*) INTO earlier FROM gate_jobs j
    WHERE j.status = 'waiting_health_check' AND j.host_id IN (SELECT id FROM hosts WHERE "group" = g)
      AND (j.received_at, j.job_id, j.host_id) < (NEW.received_at, NEW.job_id, NEW.host_id);
    IF earlier > 0 THEN
        INSERT INTO watch_violations VALUES ('fifo', NEW.job_id, NEW.host_id, g || ': ' || earlier || ' before it');
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER watch_release AFTER UPDATE ON gate_jobs DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.status = 'released' AND OLD.status = 'waiting_health_check' AND NEW.overridden_by IS NULL)
EXECUTE FUNCTION watch_release();
"""


async def install_release_watch(db: asyncpg.Connection) -> None:
    await db.execute(WATCH_SQL)


async def violations(db: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await db.fetch("SELECT what, job_id, detail FROM watch_violations ORDER BY what, job_id")
    return [(row["what"], row["job_id"], row["detail"]) for row in rows]


async def set_policy(db: asyncpg.Connection, group: str, budget: int | str | None) -> None:
    """A policy PUT as the api writes it: under the group's lock."""
    async with db.transaction():
        await lock_group(db, group)
        await put_policy(db, group, GroupPolicy(max_unavailable=budget))


async def assert_one_event_per_decision(db: asyncpg.Connection) -> None:
    """Every decided job host has exactly one decision event, of its status; no event id twice; no waiting job
    host has a decision event."""
    duplicates = await db.fetch("SELECT event_id, count(*) FROM outbox GROUP BY event_id HAVING count(*) > 1")
    assert duplicates == []
    # ('patching': a test's job host written as released directly, without an event.)
    rows = await db.fetch("SELECT job_id, host_id, status FROM gate_jobs WHERE job_id <> 'patching'")
    keys = {
        row["event_id"]: row["routing_key"]
        for row in await db.fetch(
            "SELECT event_id, routing_key FROM outbox WHERE routing_key IN ('job.released', 'job.failed',"
            " 'job.cancelled')"
        )
    }
    for row in rows:
        key = keys.get(decision_event_id(row["job_id"], row["host_id"]))
        status = row["status"]
        if status == "waiting_health_check":
            assert key is None, (row["job_id"], status, key)
        else:
            decided = "released" if status in ("released", "verifying", "verified", "verification_failed") else status
            assert key == f"job.{decided}", (row["job_id"], status, key)


async def drain(gates: list[Gate], db: asyncpg.Connection, *, rounds: int = 40) -> None:
    """Run the gates' timers until no job host is due (each round both gates)."""
    for _ in range(rounds):
        for gate in gates:
            await gate.run_due_timers()
        due = await db.fetchval(
            "SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check' AND next_retry_at <= now()"
        )
        if not due:
            return


async def free_budget(db: asyncpg.Connection, group: str) -> int:
    """The group's patched job hosts verified (as a verification outcome writes them: no group lock)."""
    result = await db.execute(
        "UPDATE gate_jobs SET status = 'verified', verified_at = clock_timestamp() WHERE status IN"
        " ('released', 'verifying') AND host_id IN (SELECT id FROM hosts WHERE \"group\" = $1)",
        group,
    )
    return int(result.split()[-1])


async def two_gates(dsn: str) -> tuple[list[asyncpg.Pool], list[Gate]]:
    pools = [await create_pool(dsn, min_size=1, max_size=8) for _ in range(2)]
    return pools, [make_gate(pool, dsn) for pool in pools]


async def close(pools: list[asyncpg.Pool]) -> None:
    for pool in pools:
        await pool.close()


async def gather_all(work: list[Awaitable[Any]]) -> list[Any]:
    results = await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), SETTLE_SECONDS)
    errors = [result for result in results if isinstance(result, BaseException)]
    assert errors == [], errors
    return results


async def test_the_watch_sees_a_release_under_a_shared_lock_over_the_budget(
    private_db: asyncpg.Connection,
) -> None:
    """The watch itself: a release of a group with a budget written under the SHARED lock while the budget is full
    is reported (lock and budget); one under the exclusive lock within the budget is not."""
    await install_release_watch(private_db)
    first, second = await add_host(private_db, "watched", "w-1"), await add_host(private_db, "watched", "w-2")
    await set_policy(private_db, "watched", 1)
    for job_id, host_id in (("a", first), ("b", second)):
        await private_db.execute(
            "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at)"
            " VALUES ($1, $2, 'waiting_health_check', '2099-01-01', clock_timestamp())",
            job_id, host_id,
        )  # fmt: skip
    async with private_db.transaction():
        await lock_group(private_db, "watched")
        await private_db.execute(
            "UPDATE gate_jobs SET status = 'released', decided_at = clock_timestamp() WHERE job_id = 'a'"
        )
    assert await violations(private_db) == []
    async with private_db.transaction():
        await private_db.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended('healthgate.group:watched', 0))")
        await private_db.execute(
            "UPDATE gate_jobs SET status = 'released', decided_at = clock_timestamp() WHERE job_id = 'b'"
        )
    assert await violations(private_db) == [("budget", "b", "watched: 2 > 1"), ("lock", "b", "watched: ShareLock")]


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_budget_set_raised_lowered_and_removed_while_two_gates_release_is_never_exceeded(
    private_database: str, private_db: asyncpg.Connection, seed: int
) -> None:
    """Two gates start 3 rounds of job.starts on 24 healthy hosts of one group while its policy is PUT over and over
    (none, 1, 3, 25%, 2, none...) and patched hosts are verified (freeing the budget) with budget passes: every
    release under a budget commits under the exclusive lock, within the budget, in arrival order; every job host is
    decided once, with one event."""
    rng = random.Random(seed)
    group = "flip"
    await install_release_watch(private_db)
    host_ids = [await add_host(private_db, group, f"flip-{index}") for index in range(24)]
    pools, gates = await two_gates(private_database)
    try:
        for round_ in range(3):
            starts = [job_start(f"flip-{round_}-{index}", host_id) for index, host_id in enumerate(host_ids)]
            rng.shuffle(starts)

            async def started(job: JobStart, index: int) -> str:
                await asyncio.sleep(rng.random() * 0.05)
                return await gates[index % 2].start(job)

            async def policies() -> None:
                for budget in [None, 1, 3, "25%", 2, None, 1, None]:
                    await asyncio.sleep(rng.random() * 0.01)
                    await set_policy(private_db, group, budget)

            async def freeing() -> None:
                async with pools[0].acquire() as connection:
                    for _ in range(6):
                        await asyncio.sleep(rng.random() * 0.02)
                        await free_budget(connection, group)
                        await gates[1]._budget_freed(group)

            results = await gather_all(
                [policies(), freeing(), *(started(job, index) for index, job in enumerate(starts))]
            )
            assert results[2:] == ["started"] * len(starts)
            # The rest of the round: patches finished, the budget passes release the others.
            for _ in range(30):
                await free_budget(private_db, group)
                await gates[round_ % 2]._budget_freed(group)
                await drain(gates, private_db, rounds=1)
                if not await private_db.fetchval(
                    "SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'"
                ):
                    break
            assert (
                await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'") == 0
            )
            await free_budget(private_db, group)
    finally:
        await close(pools)
    assert await violations(private_db) == []
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs") == 3 * len(host_ids)
    await assert_one_event_per_decision(private_db)


async def test_a_group_that_gains_a_budget_while_job_hosts_arrive_releases_them_in_arrival_order(
    private_database: str, private_db: asyncpg.Connection
) -> None:
    """One host of the group is in patch; 30 job.starts of healthy hosts arrive through two gates while a budget of
    1 is PUT. Those released before the PUT stay released; the others wait, and as the budget frees, one at a time,
    each budget pass releases the earliest arrived of them (received_at, job_id, host_id)."""
    group = "fifo"
    await install_release_watch(private_db)
    patched = await add_host(private_db, group, "fifo-patched")
    await private_db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)"
        " VALUES ('patching', $1, 'released', '2099-01-01', clock_timestamp(), clock_timestamp())",
        patched,
    )
    host_ids = [await add_host(private_db, group, f"fifo-{index}") for index in range(30)]
    pools, gates = await two_gates(private_database)
    try:
        starts = [job_start(f"fifo-{index}", host_id) for index, host_id in enumerate(host_ids)]

        async def put_budget() -> None:
            await asyncio.sleep(0.01)
            await set_policy(private_db, group, 1)

        await gather_all([put_budget(), *(gates[index % 2].start(job) for index, job in enumerate(starts))])
        await drain(gates, private_db)
        while True:
            waiting = await private_db.fetch(
                "SELECT job_id, host_id FROM gate_jobs WHERE status = 'waiting_health_check'"
                " ORDER BY received_at, job_id, host_id"
            )
            if not waiting:
                break
            await free_budget(private_db, group)
            await gates[len(waiting) % 2]._budget_freed(group)
            released = await private_db.fetch("SELECT job_id FROM gate_jobs WHERE status = 'released'")
            assert [row["job_id"] for row in released] == [waiting[0]["job_id"]]
    finally:
        await close(pools)
    assert await violations(private_db) == []
    await assert_one_event_per_decision(private_db)


@pytest.mark.parametrize("budget", [None, 2])
async def test_cancels_halts_overrides_finishes_and_timers_racing_shared_releases_never_deadlock(
    private_database: str, private_db: asyncpg.Connection, budget: int | None
) -> None:
    """Per round, one job on 16 hosts of a group started through two gates, while job.cancels, overrides, a manual
    halt of the job, job.finished of released job hosts, timers, budget passes and policy PUTs land on the same group
    and job hosts. Everything finishes (no deadlock, no error), and each job host is decided once, with one event."""
    group = "storm"
    await install_release_watch(private_db)
    if budget is not None:
        await set_policy(private_db, group, budget)
    host_ids = [await add_host(private_db, group, f"storm-{index}") for index in range(16)]
    pools, gates = await two_gates(private_database)
    context = api_context(pools[0])
    admin = Principal("admin-1", "admin", ())
    rng = random.Random(7)
    try:
        for round_ in range(4):
            job_id = f"storm-{round_}"
            starts = [job_start(job_id, host_id) for host_id in host_ids]

            async def later(work: Callable[[], Awaitable[Any]]) -> Any:
                await asyncio.sleep(rng.random() * 0.03)
                return await work()

            async def cancelled(job: JobStart) -> None:
                async with pools[1].acquire() as connection, connection.transaction():
                    await cancel(connection, job.job_id, job.host_id)

            async def overridden(job: JobStart) -> None:
                try:
                    await override_on(context, "admin-1", job.job_id, job.host_id,
                                      OverrideRequest(decision="release", reason="now"))  # fmt: skip
                except Problem as exc:  # 404 (not recorded yet) or 409 (decided)
                    assert exc.status in (404, 409), exc.detail

            async def halted(job_id: str = job_id) -> None:
                try:
                    await halt_or_resume_on(context, admin, job_id, HaltRequest(reason="stop"), halt=True)
                except Problem as exc:  # 404 (no job host yet) or 409 (halted already)
                    assert exc.status in (404, 409), exc.detail

            async def finished(job: JobStart, gate: Gate) -> None:
                # The bare data object, as the gate accepts it (CONTRACT §5).
                body = (
                    JobFinished(job_id=job.job_id, host_id=job.host_id, outcome="succeeded").model_dump_json().encode()
                )
                await gate._verifier.on_job_finished(body)

            async def policies() -> None:
                for value in [None, 1, None] if budget is None else [1, 3, budget]:
                    await later(lambda value=value: set_policy(private_db, group, value))

            work: list[Awaitable[Any]] = []
            for index, job in enumerate(starts):
                work.append(later(lambda job=job, index=index: gates[index % 2].start(job)))
                if index % 5 == 0:
                    work.append(later(lambda job=job: cancelled(job)))
                if index % 5 == 1:
                    work.append(later(lambda job=job: overridden(job)))
                if index % 4 == 2:
                    work.append(later(lambda job=job, index=index: finished(job, gates[(index + 1) % 2])))
                if index % 3 == 0:
                    work.append(later(lambda index=index: gates[index % 2].run_due_timers()))
            if round_ % 2 == 1:
                work.append(later(halted))
            work.append(later(lambda: gates[0]._budget_freed(group)))
            work.append(policies())
            await gather_all(work)
            await free_budget(private_db, group)
            await gates[1]._budget_freed(group)
    finally:
        await close(pools)
    await assert_one_event_per_decision(private_db)
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs") == 4 * len(host_ids)
    # Overrides may exceed the budget (they say so); the watch skips them. Gate releases never.
    assert [v for v in await violations(private_db) if v[0] != "fifo"] == []


@pytest.mark.parametrize("budget", [None, 3])
async def test_one_job_on_many_hosts_started_twice_through_two_gates_with_unknown_hosts(
    private_database: str, private_db: asyncpg.Connection, budget: int | None
) -> None:
    """One job's job.start for 40 hosts of one group and 10 unknown hosts, each sent twice (once to each gate), all
    at once: each job host is recorded once (one "started", one "duplicate"), released once with one event (with a
    budget: as it frees), and the job recorded once."""
    group = "same"
    await install_release_watch(private_db)
    if budget is not None:
        await set_policy(private_db, group, budget)
    host_ids = [await add_host(private_db, group, f"same-{index}") for index in range(40)]
    unknown = [uuid.uuid4() for _ in range(10)]
    pools, gates = await two_gates(private_database)
    try:
        starts = [job_start("same-job", host_id) for host_id in host_ids + unknown]
        work = [gate.start(job) for job in starts for gate in gates]
        random.Random(3).shuffle(work)
        results = await gather_all(work)
        assert sorted(results) == sorted(["started", "duplicate"] * len(starts))
        for _ in range(60):
            await free_budget(private_db, group)
            await gates[0]._budget_freed(group)
            if not await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'"):
                break
    finally:
        await close(pools)
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'") == 0
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs") == len(starts)
    assert await private_db.fetchval("SELECT count(*) FROM jobs WHERE job_id = $1", job_key("same-job")) == 1
    assert await violations(private_db) == []
    await assert_one_event_per_decision(private_db)


async def test_hosts_moved_between_groups_during_fast_releases_lose_no_job_host(
    private_database: str, private_db: asyncpg.Connection
) -> None:
    """16 hosts move back and forth between a group without a budget and one with a budget of 2 (the api's host
    update: the host's row locked, no group lock) while two gates start three jobs on each. No error, no job host
    lost: each is released (as the budget frees) or was decided once, with one event."""
    await set_policy(private_db, "right", 2)
    host_ids = [await add_host(private_db, "left" if index % 2 else "right", f"mv-{index}") for index in range(16)]
    pools, gates = await two_gates(private_database)
    rng = random.Random(11)
    try:
        starts = [job_start(f"mv-{round_}", host_id) for round_ in range(3) for host_id in host_ids]

        async def move(host_id: uuid.UUID) -> None:
            for _ in range(4):
                await asyncio.sleep(rng.random() * 0.02)
                async with pools[1].acquire() as connection, connection.transaction():
                    row = await hosts.fetch_host(connection, host_id, for_update=True)
                    assert row is not None
                    group = "left" if row["group"] == "right" else "right"
                    await hosts.update_host(connection, host_id, name=row["name"], group=group, agent_url=None)

        async def started(job: JobStart, index: int) -> str:
            await asyncio.sleep(rng.random() * 0.05)
            return await gates[index % 2].start(job)

        await gather_all([*(move(host_id) for host_id in host_ids), *(started(j, i) for i, j in enumerate(starts))])
        for _ in range(60):
            for group in ("left", "right"):
                await free_budget(private_db, group)
                await gates[0]._budget_freed(group)
            await drain(gates, private_db, rounds=1)
            if not await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'"):
                break
            # A job host whose pass looked in the group its host just left is the timers', 2 s after its record
            # (shared/migrations/0016): let that time pass.
            await asyncio.sleep(0.1)
    finally:
        await close(pools)
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs") == len(starts)
    assert await private_db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'waiting_health_check'") == 0
    await assert_one_event_per_decision(private_db)
