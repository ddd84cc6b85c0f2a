"""Adversarial tests of patch campaigns (CONTRACT §6) with the real broker, database, poller, gates and api: bad
job.start input, halts racing the release passes, and a whole campaign driven as an executor would (duplicate
job.finished, several gates, one of them killed) checked from the event stream for budget overruns and double
decisions or outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import random
import signal
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support.fake_agent import FakeAgent
from tests.support.messages import CapturedEvent, EventCapture, Publisher, in_seconds
from tests.support.processes import ServiceProcess, start_gate, start_together
from tests.support.services import BackingServices
from tests.test_budget import group_name, make_hosts, set_policy
from tests.test_gate import drain_dead_letters, run_checks
from tests.test_verification import finish, jobs, metric, metrics_of, start  # noqa: F401  (jobs: fixture)

pytestmark = pytest.mark.usefixtures("poller", "gate")
DECISIONS = ("job.released", "job.failed", "job.cancelled")
OUTCOMES = ("job.verified", "job.verification_failed")


def of_job(job_id: str) -> object:
    return lambda event: event.data["job_id"] == job_id


# ---- job.start with a max_failed_hosts the database cannot hold -----------------------------------------


@pytest.mark.parametrize("max_failed_hosts", [2**31, 10**30])
async def test_a_max_failed_hosts_too_large_to_store_is_an_invalid_request_at_once(
    max_failed_hosts: int, jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient,  # noqa: F811
    backing: BackingServices, exchange_name: str, gate: ServiceProcess,
) -> None:  # fmt: skip
    """A count no job can reach is still a count the jobs table (integer) cannot hold: the job.start must be
    answered invalid_request at once and dead-lettered, never retried until its delivery limit."""
    group = group_name()
    [(host_id, _)] = await make_hosts(admin, group, 1)
    job = f"huge-{uuid.uuid4().hex[:6]}"
    await jobs.send(
        "job.start",
        {"job_id": job, "host_id": host_id, "window_ends_at": in_seconds(60), "max_failed_hosts": max_failed_hosts},
    )
    [failed] = await events.wait_for("job.failed", of_job(job))
    assert failed.data["reason"] == "invalid_request"
    assert "max_failed_hosts" in str(failed.data["detail"])
    dead = await drain_dead_letters(
        backing.amqp_url, f"{exchange_name}.dead", expected=1, matching=lambda message: job.encode() in message.body
    )
    assert len(dead) == 1
    assert not events.matching("job.released", of_job(job))


# ---- a manual halt racing the group's release passes ------------------------------------------------------


async def test_manual_halt_racing_release_passes_never_deadlocks(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
    database_url: str,
) -> None:  # fmt: skip
    """A release pass locks its group's waiting job hosts in arrival order; a halt locks its job's waiting job
    hosts. Both at once on the same rows must never deadlock (PostgreSQL would abort one: the admin's halt
    answering 500, or the gate's pass failing). The passes here are the gate's own function, run back to back
    from the test so that they overlap every halt."""
    from services.gate.evaluation import release_pass

    group = group_name()
    hosts = [host_id for host_id, _ in await make_hosts(admin, group, 31)]  # no checks: ready at once
    await set_policy(db, group, max_unavailable=1)
    holder = f"hold-{uuid.uuid4().hex[:6]}"
    await start(jobs, holder, hosts[0])
    await events.wait_for("job.released", of_job(holder))
    errors: list[BaseException] = []
    for round_number in range(8):
        job = f"halt-race-{round_number}-{uuid.uuid4().hex[:6]}"
        waiting = hosts[1:]
        random.shuffle(waiting)  # arrival order unrelated to host_id order
        for host_id in waiting:
            await start(jobs, job, host_id)
        await events.wait_for("job.waiting", of_job(job), count=len(waiting), timeout=30)
        halted = asyncio.Event()

        async def passes(halted: asyncio.Event) -> None:
            connection = await asyncpg.connect(database_url)
            try:
                while not halted.is_set():
                    try:
                        async with connection.transaction():
                            await release_pass(connection, group, retry_seconds=2)
                    except asyncpg.PostgresError as exc:
                        errors.append(exc)
            finally:
                await connection.close()

        runners = [asyncio.create_task(passes(halted)) for _ in range(2)]
        await asyncio.sleep(0.05)
        response = await admin.post(f"/api/v1/jobs/{job}/halt", json={"reason": "stop"})
        halted.set()
        await asyncio.gather(*runners)
        assert response.status_code == 200, response.text
        assert not errors, errors
        failed = await events.wait_for("job.failed", of_job(job), count=len(waiting), timeout=30)
        assert {event.data["reason"] for event in failed} == {"job_halted"}


# ---- a whole campaign, as an executor drives it, over three gates, one killed --------------------------


def at(event: CapturedEvent, field: str) -> dt.datetime:
    return dt.datetime.fromisoformat(str(event.data[field]))


def most_in_patch_of(releases: list[CapturedEvent], outcomes: list[CapturedEvent]) -> int:
    """The largest number of distinct hosts in patch at any release, replayed from the event stream alone: a
    host is in patch from its job.released (released_at) to its verification outcome (verified_at or
    failed_at), all stamped by the database's clock."""
    ended = {
        (event.data["job_id"], event.data["host_id"]): at(event, "verified_at" if event.routing_key == "job.verified"
                                                           else "failed_at")
        for event in outcomes
    }  # fmt: skip
    intervals = [
        (event.data["host_id"], at(event, "released_at"), ended.get((event.data["job_id"], event.data["host_id"])))
        for event in releases
    ]
    return max(
        len({host for host, start, end in intervals if start <= moment and (end is None or end > moment)})
        for _, moment, _ in intervals
    )


@pytest.mark.slow
async def test_campaign_over_three_gates_with_one_killed_keeps_the_budget_and_one_outcome_each(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
    fake_agent: FakeAgent, gate: ServiceProcess, service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    """An executor's campaign: one job over 8 hosts of a group with max_unavailable 2; on each job.released it
    sends job.finished three times (duplicates, one of them with outcome failed racing the others); a job.finished
    before its job.start and one for a cancelled job host change nothing; a gate is SIGKILLed mid-campaign and
    started again. From the event stream: one decision and one outcome per job host, never more than 2 hosts in
    patch, and the job never halted (max_failed_hosts 8 is not exceeded)."""
    extra = start_together(
        *(functools.partial(start_gate, service_env, tmp_path / f"gate-{index}.log") for index in range(2))
    )
    try:
        group = group_name()
        service = f"{group}.service"
        fake_agent.set(service, "healthy")
        made = await make_hosts(
            admin, group, 8, [{"check_type": "service", "service_name": service}], agent_url=fake_agent.base_url
        )
        await run_checks(admin, [check for _, checks in made for check in checks])
        hosts = [host_id for host_id, _ in made]
        await set_policy(db, group, max_unavailable=2, verify_timeout_seconds=60)
        job = f"campaign-{uuid.uuid4().hex[:6]}"
        await finish(jobs, job, hosts[0])  # before its job.start: changes nothing
        for host_id in hosts:
            await start(jobs, job, host_id, window_seconds=300, max_failed_hosts=8)
        finished: set[str] = set()
        killed = False
        async with asyncio.timeout(120):
            # Distinct job hosts, not events: after the kill an outcome may come twice (at least once), and
            # counting the copy would stop waiting before the last host's verification is in.
            while {str(e.data["host_id"]) for key in OUTCOMES for e in events.matching(key, of_job(job))} != set(hosts):
                for event in events.matching("job.released", of_job(job)):
                    host_id = str(event.data["host_id"])
                    if host_id not in finished:
                        finished.add(host_id)
                        await asyncio.gather(
                            finish(jobs, job, host_id), finish(jobs, job, host_id), finish(jobs, job, host_id, "failed")
                        )
                if not killed and len(events.matching("job.verified", of_job(job))) >= 3:
                    killed = True
                    gate.stop(signal.SIGKILL)
                    gate.restart()
                events.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await events.arrived.wait()
        await asyncio.sleep(3)  # anything doubled would have come by now
        decisions = [event for key in DECISIONS for event in events.matching(key, of_job(job))]
        outcomes = [event for key in OUTCOMES for event in events.matching(key, of_job(job))]
        releases = events.matching("job.released", of_job(job))
        # At least once: a redelivered event keeps its id; count distinct ids, and one id per job host.
        assert sorted(event.data["host_id"] for event in {e.message_id: e for e in decisions}.values()) == sorted(hosts)
        assert sorted(event.data["host_id"] for event in {e.message_id: e for e in outcomes}.values()) == sorted(hosts)
        assert {event.routing_key for event in releases} == {"job.released"} and len(
            {e.message_id for e in releases}
        ) == 8
        assert most_in_patch_of(releases, outcomes) <= 2
        assert not events.matching("job.halted", of_job(job))
        rows = await db.fetch("SELECT status, count(*) FROM gate_jobs WHERE job_id = $1 GROUP BY status", job)
        assert {row["status"]: row["count"] for row in rows} == {"verified": 8}
    finally:
        for process in extra:
            process.stop()


# ---- an operator changing things while a campaign runs -------------------------------------------------


async def test_budget_changed_while_job_hosts_wait(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
) -> None:  # fmt: skip
    """Raised: the waiting job hosts are released as it allows. Lowered below what is in patch: nothing more is
    released until the group is back under it, whatever verifications free meanwhile."""
    group = group_name()
    hosts = [host_id for host_id, _ in await make_hosts(admin, group, 4)]  # no checks: ready at once
    assert (await admin.put(f"/api/v1/groups/{group}/policy", json={"max_unavailable": 1})).status_code == 200
    job = f"changed-{uuid.uuid4().hex[:6]}"
    for host_id in hosts:
        await start(jobs, job, host_id)
    await events.wait_for("job.released", of_job(job))
    await events.wait_for("job.waiting", of_job(job), count=3)
    assert (await admin.put(f"/api/v1/groups/{group}/policy", json={"max_unavailable": "75%"})).status_code == 200
    first = await events.wait_for("job.released", of_job(job), count=3)
    assert (await admin.put(f"/api/v1/groups/{group}/policy", json={"max_unavailable": 1})).status_code == 200
    for event in first:
        await finish(jobs, job, str(event.data["host_id"]))
    verified = await events.wait_for("job.verified", of_job(job), count=3)
    (last,) = [event for event in await events.wait_for("job.released", of_job(job), count=4) if event not in first]
    assert at(last, "released_at") >= max(at(event, "verified_at") for event in verified)
    assert len(events.matching("job.released", of_job(job))) == 4


async def test_hosts_moved_or_deleted_during_a_campaign(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
) -> None:  # fmt: skip
    """A host moved to another group while in patch frees its old group's budget (the next waiting job host
    there is released) and counts in its new group; a host deleted while in patch is still verified once."""
    old, new = group_name(), group_name()
    moved, left = [host_id for host_id, _ in await make_hosts(admin, old, 2)]
    [(other, _)] = await make_hosts(admin, new, 1)
    await set_policy(db, old, max_unavailable=1)
    await set_policy(db, new, max_unavailable=1)
    job = f"moving-{uuid.uuid4().hex[:6]}"
    await start(jobs, job, moved)
    await events.wait_for("job.released", lambda event: event.data["host_id"] == moved)
    await start(jobs, job, left)
    await events.wait_for("job.waiting", lambda event: event.data["host_id"] == left)
    host = (await admin.get(f"/api/v1/hosts/{moved}")).json()
    response = await admin.put(f"/api/v1/hosts/{moved}", json={"name": host["name"], "group": new})
    assert response.status_code == 200, response.text
    await events.wait_for("job.released", lambda event: event.data["host_id"] == left, timeout=15)
    await start(jobs, job, other)
    (waiting,) = await events.wait_for("job.waiting", lambda event: event.data["host_id"] == other)
    assert waiting.data["waiting_for"] == ["budget"]
    assert (await admin.delete(f"/api/v1/hosts/{moved}")).status_code == 204
    await finish(jobs, job, moved)
    (verified,) = await events.wait_for("job.verified", lambda event: event.data["host_id"] == moved)
    assert verified.data["checks"] == []
    await events.wait_for("job.released", lambda event: event.data["host_id"] == other, timeout=15)
    for host_id in (moved, left, other):
        assert len(events.matching("job.released", lambda event, h=host_id: event.data["host_id"] == h)) == 1


async def test_resume_then_more_failures_halts_again_once_per_halt_over_two_gates(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient,  # noqa: F811
    service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    """max_failed_hosts 0: the first failed host halts the job (one job.halted, whichever gate counts it); a
    duplicate failed job.finished after a resume changes nothing; the next failure halts it again."""
    extra = start_gate(service_env, tmp_path / "gate-2.log")
    try:
        group = group_name()
        hosts = [host_id for host_id, _ in await make_hosts(admin, group, 3)]
        job = f"rehalt-{uuid.uuid4().hex[:6]}"
        for host_id in hosts[:2]:
            await start(jobs, job, host_id, max_failed_hosts=0)
        await events.wait_for("job.released", of_job(job), count=2)
        await asyncio.gather(*(finish(jobs, job, hosts[0], "failed") for _ in range(4)))
        (first_halt,) = await events.wait_for("job.halted", of_job(job))
        assert first_halt.data["failed_hosts"] == [hosts[0]]
        await events.wait_for("job.verified", lambda event: event.data["host_id"] == hosts[0])
        response = await admin.post(f"/api/v1/jobs/{job}/resume", json={"reason": "false alarm"})
        assert response.status_code == 200, response.text
        await events.wait_for("job.resumed", of_job(job))
        await finish(jobs, job, hosts[0], "failed")  # a duplicate: the host is verified already
        await start(jobs, job, hosts[2])
        await events.wait_for("job.released", lambda event: event.data["host_id"] == hosts[2])
        await finish(jobs, job, hosts[1], "failed")
        halts = await events.wait_for("job.halted", of_job(job), count=2)
        await asyncio.sleep(2)
        halts = events.matching("job.halted", of_job(job))
        assert len({event.message_id for event in halts}) == 2, [event.data for event in halts]
        assert sorted(halts[1].data["failed_hosts"]) == sorted(hosts[:2])
    finally:
        extra.stop()


# ---- job.finished that must change nothing ---------------------------------------------------------------


async def test_job_finished_that_changes_nothing_records_nothing(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
    fake_agent: FakeAgent, gate: ServiceProcess,
) -> None:  # fmt: skip
    """CONTRACT §6: job.finished for an unknown job, a waiting or a cancelled job host changes nothing, whatever
    its outcome: no job is recorded for it (the jobs table is never pruned of a job that has no hosts, so a
    stream of such messages would grow it without bound), and a waiting job host goes on waiting."""
    group = group_name()
    service = f"{group}.service"
    fake_agent.set(service, "unhealthy")
    [(host_id, checks)] = await make_hosts(
        admin, group, 1, [{"check_type": "service", "service_name": service}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    waiting, cancelled = f"fin-waiting-{uuid.uuid4().hex[:6]}", f"fin-cancelled-{uuid.uuid4().hex[:6]}"
    for job in (waiting, cancelled):
        await start(jobs, job, host_id)
        await events.wait_for("job.waiting", of_job(job))
    await jobs.send("job.cancel", {"job_id": cancelled, "host_id": host_id})
    await events.wait_for("job.cancelled", of_job(cancelled))
    ignored = 'healthgate_gate_messages_total{outcome="%s",routing_key="job.finished"}'
    before = await metrics_of(gate)
    unknown = [f"fin-unknown-{index}-{uuid.uuid4().hex[:6]}" for index in range(5)]
    for job in unknown:
        await finish(jobs, job, host_id, "failed")
    await finish(jobs, waiting, host_id, "failed")
    await finish(jobs, cancelled, host_id, "failed")
    async with asyncio.timeout(15):  # until the only gate has handled them all
        while True:
            now = await metrics_of(gate)
            if all(
                metric(now, ignored % outcome) - metric(before, ignored % outcome) >= count
                for outcome, count in (("unknown_job_host", 5), ("not_released", 2))
            ):
                break
            await asyncio.sleep(0.1)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE job_id = ANY($1)", unknown) == 0
    statuses = await db.fetch(
        "SELECT job_id, status, outcome FROM gate_jobs WHERE job_id = ANY($1)", [waiting, cancelled]
    )
    assert {row["job_id"]: (row["status"], row["outcome"]) for row in statuses} == {
        waiting: ("waiting_health_check", None), cancelled: ("cancelled", None),
    }  # fmt: skip


async def test_window_end_while_the_gate_is_down_verifies_and_frees_the_budget_after_restart(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,  # noqa: F811
    gate: ServiceProcess,
) -> None:  # fmt: skip
    """A released job host whose window ends without job.finished while no gate runs starts verifying when a
    gate is back (finished_at = the window's end, outcome null), is verified once, and the job host waiting
    for its unit of budget is released then, once."""
    group = group_name()
    first, second = [host_id for host_id, _ in await make_hosts(admin, group, 2)]
    await set_policy(db, group, max_unavailable="50%")
    job = f"down-{uuid.uuid4().hex[:6]}"
    await start(jobs, job, first, window_seconds=3)
    await events.wait_for("job.released", of_job(job))
    await start(jobs, job, second, window_seconds=120)
    await events.wait_for("job.waiting", of_job(job))
    gate.stop(signal.SIGKILL)
    try:
        window_ends_at = await db.fetchval("SELECT window_ends_at FROM gate_jobs WHERE job_id = $1 AND host_id = $2",
                                           job, uuid.UUID(first))  # fmt: skip
        while await db.fetchval("SELECT now()") < window_ends_at + dt.timedelta(seconds=1):
            await asyncio.sleep(0.2)
    finally:
        gate.restart()
    (verified,) = await events.wait_for("job.verified", of_job(job), timeout=15)
    assert verified.data["host_id"] == first and verified.data["outcome"] is None
    finished_at = await db.fetchval("SELECT finished_at FROM gate_jobs WHERE job_id = $1 AND host_id = $2",
                                    job, uuid.UUID(first))  # fmt: skip
    assert finished_at == window_ends_at
    releases = await events.wait_for("job.released", of_job(job), count=2, timeout=15)
    assert at(releases[1], "released_at") >= at(verified, "verified_at")
    await asyncio.sleep(1)
    assert len(events.matching("job.released", of_job(job))) == 2
    assert len(events.matching("job.verified", of_job(job))) == 1
