"""The gate's release side of patch campaigns (CONTRACT §6) with the real broker, database, poller and gate
processes: disruption budgets (a count and "N%", FIFO as the budget frees, an unhealthy host holding it, two
and three gates racing on one group), stable_seconds, the release cutoff, no_checks and an override beyond
the budget. Policies are stored with shared.group_policies.put_policy.

Until job.finished and verification land, the tests free a host's unit of budget by ending its patch in the
database: a released job host is set `verified` (as verification will), and the gate's pass over groups with
job hosts waiting for the budget (every second, from its timers) uses the freed unit."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from shared.group_policies import GroupPolicy, put_policy
from tests.support.fake_agent import Behaviour, FakeAgent
from tests.support.messages import CapturedEvent, EventCapture, Publisher
from tests.support.nginx import NginxServer
from tests.support.processes import GATE_RETRY_SECONDS, ServiceProcess, start_gate, start_together
from tests.test_gate import host_with_checks, run_checks

pytestmark = pytest.mark.usefixtures("poller", "gate")


def group_name() -> str:
    return f"web-{uuid.uuid4().hex[:6]}"


async def make_hosts(
    admin: httpx.AsyncClient, group: str, count: int, checks: Sequence[dict[str, Any]] = (), **host: Any
) -> list[tuple[str, list[dict[str, Any]]]]:
    """`count` hosts named <group>-1… in `group`, each with `checks`: (host_id, checks) each."""
    return [
        await host_with_checks(admin, list(checks), name=f"{group}-{index}", group=group, **host)
        for index in range(1, count + 1)
    ]


async def service_hosts(
    admin: httpx.AsyncClient, fake_agent: FakeAgent, count: int, behaviour: Behaviour
) -> tuple[str, str, list[tuple[str, list[dict[str, Any]]]]]:
    """A new group of `count` hosts, each with a critical service check on `fake_agent`, the service set to
    `behaviour`: (group, service, hosts)."""
    group = group_name()
    service = f"{group}.service"
    fake_agent.set(service, behaviour)
    made = await make_hosts(
        admin, group, count, [{"check_type": "service", "service_name": service}], agent_url=fake_agent.base_url
    )
    return group, service, made


async def set_policy(db: asyncpg.Connection, group: str, **fields: Any) -> None:
    await put_policy(db, group, GroupPolicy(**fields))


def of_job(job_id: str) -> Any:
    return lambda event: event.data["job_id"] == job_id


async def free(db: asyncpg.Connection, job_id: str, host_id: str) -> dt.datetime:
    """End a released job host's patch as verification will (verified), so its host no longer holds the budget;
    returns when, by the database's clock."""
    freed: dt.datetime = await db.fetchval(
        """
        UPDATE gate_jobs SET status = 'verified', verified_at = clock_timestamp(), finished_at = clock_timestamp()
        WHERE job_id = $1 AND host_id = $2 AND status = 'released'
        RETURNING verified_at
        """,
        job_id,
        uuid.UUID(host_id),
    )
    assert freed is not None
    return freed


def most_in_patch(releases: list[CapturedEvent], freed: dict[tuple[str, str], dt.datetime]) -> int:
    """The largest number of distinct hosts in patch at any release, replayed from the job.released events
    (released_at: the database's clock) and the moments the test freed them (each host counted once)."""
    intervals = [
        (event.data["host_id"], dt.datetime.fromisoformat(str(event.data["released_at"])),
         freed.get((str(event.data["job_id"]), str(event.data["host_id"]))))
        for event in releases
    ]  # fmt: skip
    most = 0
    for _, moment, _ in intervals:
        hosts = {host for host, start, end in intervals if start <= moment and (end is None or end > moment)}
        most = max(most, len(hosts))
    return most


async def released_rows(db: asyncpg.Connection, job_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT host_id, decided_at FROM gate_jobs WHERE job_id = $1 AND status = 'released' ORDER BY decided_at",
        job_id,
    )


async def start_campaign(
    jobs: Publisher, admin: httpx.AsyncClient, db: asyncpg.Connection, prefix: str, count: int,
    max_unavailable: int,
) -> tuple[str, list[str], str]:  # fmt: skip
    """A new group of `count` hosts without checks and that budget, and a job.start for each, in order: (group,
    host ids, job id)."""
    group = group_name()
    hosts = [host_id for host_id, _ in await make_hosts(admin, group, count)]
    await set_policy(db, group, max_unavailable=max_unavailable)
    job = f"{prefix}-{uuid.uuid4().hex[:6]}"
    for host_id in hosts:
        await jobs.start(job, host_id)
    return group, hosts, job


# ---- the budget -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_unavailable", [2, "40%"])
async def test_budget_of_two_releases_at_most_two_then_in_arrival_order_as_it_frees(
    max_unavailable: int | str, jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient,
    db: asyncpg.Connection, gate: ServiceProcess,
) -> None:  # fmt: skip
    group = group_name()
    hosts = [host_id for host_id, _ in await make_hosts(admin, group, 5)]  # no checks: ready at once
    await set_policy(db, group, max_unavailable=max_unavailable)
    job = f"campaign-{uuid.uuid4().hex[:6]}"
    for host_id in hosts:
        await jobs.start(job, host_id)
    first = await events.wait_for("job.released", of_job(job), count=2)
    waiting = await events.wait_for("job.waiting", of_job(job), count=3)
    assert all(event.data["waiting_for"] == ["budget"] for event in waiting)
    arrival = [str(row["host_id"]) for row in await db.fetch(
        "SELECT host_id FROM gate_jobs WHERE job_id = $1 ORDER BY received_at, job_id, host_id", job
    )]  # fmt: skip
    assert [event.data["host_id"] for event in first] == arrival[:2]
    rows = await db.fetch("SELECT host_id, waiting_for, detail FROM gate_jobs WHERE job_id = $1 AND status = $2",
                          job, "waiting_health_check")  # fmt: skip
    holders = sorted(f"{group}-{hosts.index(host) + 1} (job {job} patching)" for host in arrival[:2])
    for row in rows:
        assert row["waiting_for"] == ["budget"]
        assert row["detail"] == f"waiting for the disruption budget of group {group}: 2 of 2 unavailable: " + ", ".join(
            holders
        )
    async with httpx.AsyncClient(timeout=5) as plain:
        metrics = (await plain.get(gate.base_url + "/metrics")).text
    assert f'healthgate_group_budget_in_use{{group="{group}"}} 2.0' in metrics
    assert f'healthgate_group_budget_limit{{group="{group}"}} 2.0' in metrics
    await asyncio.sleep(2)  # a retry period: nothing else is released while the budget is full
    assert len(events.matching("job.released", of_job(job))) == 2

    freed: dict[tuple[str, str], dt.datetime] = {}
    order: list[str] = [event.data["host_id"] for event in first]  # type: ignore[misc]
    for count in range(3, 6):
        oldest = str((await released_rows(db, job))[0]["host_id"])
        freed[(job, oldest)] = await free(db, job, oldest)
        released = await events.wait_for("job.released", of_job(job), count=count)
        order.append(released[-1].data["host_id"])  # type: ignore[arg-type]
        await asyncio.sleep(1.5)  # one freed unit, one release
        assert len(events.matching("job.released", of_job(job))) == count
    assert order == arrival
    releases = events.matching("job.released", of_job(job))
    assert most_in_patch(releases, freed) == 2
    assert await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id = $1 AND waiting_for <> '{}'", job) == 0


async def test_an_unhealthy_host_uses_the_budget_until_it_is_healthy(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    group, service, ((sick_id, sick_checks), (host_id, _)) = await service_hosts(admin, fake_agent, 2, "unhealthy")
    await db.execute("DELETE FROM health_checks WHERE host_id = $1", uuid.UUID(host_id))  # the patched one: none
    await run_checks(admin, sick_checks)
    assert await db.fetchval("SELECT health_check_status FROM hosts WHERE id = $1", uuid.UUID(sick_id)) == "unhealthy"
    await set_policy(db, group, max_unavailable=1)
    job = f"sick-{uuid.uuid4().hex[:6]}"
    await jobs.start(job, host_id)
    (waiting,) = await events.wait_for("job.waiting", of_job(job))
    assert waiting.data["waiting_for"] == ["budget"] and waiting.data["failing_checks"] == []
    detail = await db.fetchval("SELECT detail FROM gate_jobs WHERE job_id = $1", job)
    assert detail == f"waiting for the disruption budget of group {group}: 1 of 1 unavailable: {group}-1 (unhealthy)"
    await asyncio.sleep(2)
    assert events.matching("job.released", of_job(job)) == []
    fake_agent.set(service, "healthy")
    await run_checks(admin, sick_checks)  # a healthy check.result: a pass over the host's group
    (released,) = await events.wait_for("job.released", of_job(job))
    assert released.data["host_id"] == host_id


@pytest.mark.slow
@pytest.mark.parametrize("gate_count", [2, 3])
async def test_gates_racing_on_one_group_never_exceed_the_budget(
    gate_count: int, jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient,
    db: asyncpg.Connection, service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    extra = start_together(
        *(functools.partial(start_gate, service_env, tmp_path / f"gate-{index}.log") for index in range(gate_count - 1))
    )
    try:
        group = group_name()
        hosts = [host_id for host_id, _ in await make_hosts(admin, group, 8)]
        await set_policy(db, group, max_unavailable=2)
        job_ids = [f"race-{index}-{uuid.uuid4().hex[:6]}" for index in range(3)]
        # Three jobs over the same 8 hosts, all at once: the job.starts spread over the gates.
        await asyncio.gather(*(jobs.start(job_id, host_id) for job_id in job_ids for host_id in hosts))
        total = len(job_ids) * len(hosts)
        freed: dict[tuple[str, str], dt.datetime] = {}
        of_race = lambda event: event.data["job_id"] in job_ids  # noqa: E731
        async with asyncio.timeout(120):
            while len(freed) < total:
                await events.wait_for("job.released", of_race, count=len(freed) + 1, timeout=30)
                rows = await db.fetch(
                    "SELECT job_id, host_id FROM gate_jobs WHERE job_id = ANY($1) AND status = 'released' ORDER BY decided_at",
                    job_ids,
                )  # fmt: skip
                for row in rows[:1]:  # free one at a time: every gate's pass races for the unit
                    freed[(row["job_id"], str(row["host_id"]))] = await free(db, row["job_id"], str(row["host_id"]))
        releases = events.matching("job.released", of_race)
        assert (
            len(releases) == total
            and len({(event.data["job_id"], event.data["host_id"]) for event in releases}) == total
        )
        assert most_in_patch(releases, freed) <= 2
    finally:
        for process in extra:
            process.stop()


# ---- stability, cutoff, no_checks ---------------------------------------------------------------------


async def test_stable_seconds_delays_release_until_healthy_that_long(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    group, _, ((host_id, checks),) = await service_hosts(admin, fake_agent, 1, "healthy")
    stable_seconds = 4
    await set_policy(db, group, stable_seconds=stable_seconds)
    await run_checks(admin, checks)
    healthy_since = await db.fetchval("SELECT healthy_since FROM check_state WHERE host_id = $1", uuid.UUID(host_id))
    assert healthy_since is not None
    job = f"stable-{uuid.uuid4().hex[:6]}"
    await jobs.start(job, host_id)
    (waiting,) = await events.wait_for("job.waiting", of_job(job))
    assert waiting.data["waiting_for"] == ["stability"]
    (released,) = await events.wait_for("job.released", of_job(job), timeout=15)
    released_at = dt.datetime.fromisoformat(str(released.data["released_at"]))
    # Released once healthy that long, and no later than one retry period beyond it (CONTRACT §6, issue 12).
    assert released_at - healthy_since >= dt.timedelta(seconds=stable_seconds)
    assert released_at - healthy_since <= dt.timedelta(seconds=stable_seconds + float(GATE_RETRY_SECONDS))


async def test_release_cutoff_fails_a_waiting_job_host_before_the_window_ends(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    nginx: NginxServer,
) -> None:  # fmt: skip
    group = group_name()
    ((host_id, checks),) = await make_hosts(
        admin, group, 1, [{"check_type": "http", "url": nginx.http_url("/status/503")}]
    )
    await run_checks(admin, checks)
    await set_policy(db, group, release_cutoff_seconds=5)
    job = f"cutoff-{uuid.uuid4().hex[:6]}"
    window_ends_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)
    await jobs.send("job.start", {"job_id": job, "host_id": host_id, "window_ends_at": window_ends_at.isoformat()})
    (failed,) = await events.wait_for("job.failed", of_job(job), timeout=15)
    assert failed.data["reason"] == "window_closed"
    assert "release cutoff (5 s before the window's end" in str(failed.data["detail"])
    assert "check-0: status 503" in str(failed.data["detail"])
    assert dt.datetime.fromisoformat(str(failed.data["failed_at"])) < window_ends_at  # failed at the cutoff

    # A job.start arriving after the cutoff fails at once, however healthy.
    ((healthy_id, _),) = await make_hosts(admin, f"{group}-b", 1)
    await set_policy(db, f"{group}-b", release_cutoff_seconds=600)
    late = f"late-{uuid.uuid4().hex[:6]}"
    await jobs.start(late, healthy_id, window_seconds=300)
    (failed,) = await events.wait_for("job.failed", of_job(late))
    assert failed.data["reason"] == "window_closed" and "release cutoff (600 s" in str(failed.data["detail"])
    assert events.matching("job.waiting", of_job(late)) == []


async def test_no_checks_fail_fails_a_host_without_gating_checks(
    jobs: Publisher,
    events: EventCapture,
    admin: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    group = group_name()
    ((host_id, _),) = await make_hosts(admin, group, 1)
    await set_policy(db, group, no_checks="fail")
    job = f"nochecks-{uuid.uuid4().hex[:6]}"
    await jobs.start(job, host_id)
    (failed,) = await events.wait_for("job.failed", of_job(job))
    assert failed.data["reason"] == "no_checks" and "no_checks: fail" in str(failed.data["detail"])
    assert await db.fetchval("SELECT reason FROM gate_jobs WHERE job_id = $1", job) == "no_checks"


async def test_override_may_exceed_the_budget_and_says_so(
    jobs: Publisher,
    events: EventCapture,
    admin: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    group, hosts, job = await start_campaign(jobs, admin, db, "over", 2, max_unavailable=1)
    (released,) = await events.wait_for("job.released", of_job(job))
    await events.wait_for("job.waiting", of_job(job))
    (waiting_host,) = [host for host in hosts if host != released.data["host_id"]]
    holder = f"{group}-{hosts.index(str(released.data['host_id'])) + 1}"
    response = await admin.post(
        f"/api/v1/jobs/{job}/hosts/{waiting_host}/override", json={"decision": "release", "reason": "urgent fix"}
    )
    assert response.status_code == 200, response.text
    detail = response.json()["detail"]
    assert detail.endswith(
        f"; disruption budget exceeded: disruption budget of group {group}: 1 of 1 unavailable: {holder} (job {job} patching)"
    )
    await events.wait_for("job.released", of_job(job), count=2)


async def test_job_start_of_a_halted_job_fails_at_once(
    jobs: Publisher,
    events: EventCapture,
    admin: httpx.AsyncClient,
    db: asyncpg.Connection,
) -> None:
    """The release side reads jobs.halted_at (halting itself is written by shared/jobs.py's halting section):
    here the job is halted in SQL; a host of a group and an unknown host both fail job_halted."""
    ((host_id, _),) = await make_hosts(admin, group_name(), 1)
    job = f"halted-{uuid.uuid4().hex[:6]}"
    await db.execute(
        "INSERT INTO jobs (job_id, halted_at, halt_reason, halt_count) VALUES ($1, now(), 'manual', 1)", job
    )
    for host in (host_id, str(uuid.uuid4())):
        await jobs.start(job, host)
    failed = await events.wait_for("job.failed", of_job(job), count=2)
    assert {event.data["reason"] for event in failed} == {"job_halted"}
    assert events.matching("job.released", of_job(job)) == []


async def test_a_budget_freed_by_a_policy_is_used_in_every_group_however_many_wait(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    gate: ServiceProcess, service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    """More groups waiting for their budget than the gate's sweep takes at once (100), with a gate that retries
    only every 600 s: a policy raised frees a unit in each group without an event of the gate's own, and only the
    sweep uses it. Each group keeps a job host waiting after that, so every group stays among those waiting for
    the budget: each must still be swept in turn, not the same 100 every second."""
    gate.stop()
    own = start_gate(service_env, tmp_path / "gate.log", HEALTHGATE_GATE_RETRY_SECONDS="600")
    try:
        groups = [group_name() for _ in range(130)]
        made = await asyncio.gather(*(make_hosts(admin, group, 3) for group in groups))
        for group in groups:
            await set_policy(db, group, max_unavailable=1)
        job = f"sweep-{uuid.uuid4().hex[:6]}"
        await asyncio.gather(*(jobs.start(job, host_id) for hosts in made for host_id, _ in hosts))
        await events.wait_for("job.released", of_job(job), count=len(groups), timeout=60)
        await events.wait_for("job.waiting", of_job(job), count=2 * len(groups), timeout=60)
        for group in groups:
            await set_policy(db, group, max_unavailable=2)
        released = await events.wait_for("job.released", of_job(job), count=2 * len(groups), timeout=60)
        assert len(released) == 2 * len(groups)
    finally:
        own.stop()
        gate.restart()


# ---- a release pass over a full budget (services/gate/evaluation.py `release_pass`) ---------------------


async def job_hosts(admin: httpx.AsyncClient, job: str) -> dict[str, dict[str, Any]]:
    """GET /api/v1/jobs/{job_id}: its job hosts by host id."""
    response = await admin.get(f"/api/v1/jobs/{job}")
    assert response.status_code == 200, response.text
    return {host["host_id"]: host for host in response.json()["hosts"]}


async def test_job_hosts_waiting_for_the_budget_name_the_current_holders_after_each_release(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
) -> None:  # fmt: skip
    """A full budget's pass judges only some job hosts and brings the others' detail up to date in one statement:
    after each release, every job host still waiting names the hosts patching now, as the API shows it."""
    group, hosts, job = await start_campaign(jobs, admin, db, "holders", 5, max_unavailable=2)
    await events.wait_for("job.released", of_job(job), count=2)
    await events.wait_for("job.waiting", of_job(job), count=3)
    for count in range(3, 6):
        await free(db, job, str((await released_rows(db, job))[0]["host_id"]))
        await events.wait_for("job.released", of_job(job), count=count)
        patching = [str(row["host_id"]) for row in await released_rows(db, job)]
        holders = ", ".join(sorted(f"{group}-{hosts.index(host) + 1} (job {job} patching)" for host in patching))
        for host in (await job_hosts(admin, job)).values():
            if host["status"] == "waiting_health_check":
                assert host["waiting_for"] == ["budget"]
                assert (
                    host["detail"]
                    == f"waiting for the disruption budget of group {group}: 2 of 2 unavailable: {holders}"
                )


async def test_a_job_host_whose_checks_recover_while_the_budget_is_full_waits_for_it(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    group, _, ((first, first_checks), (second, second_checks)) = await service_hosts(admin, fake_agent, 2, "healthy")
    await run_checks(admin, first_checks)
    await set_policy(db, group, max_unavailable=1)
    job = f"recover-{uuid.uuid4().hex[:6]}"
    await jobs.start(job, first)
    await events.wait_for("job.released", of_job(job))
    await jobs.start(job, second)  # no result yet: it waits for its checks, and the budget is full
    (waiting,) = await events.wait_for("job.waiting", of_job(job))
    assert waiting.data["waiting_for"] == ["checks"]
    await run_checks(admin, second_checks)  # healthy: the pass over the full budget judges it
    async with asyncio.timeout(10):
        while (await job_hosts(admin, job))[second]["waiting_for"] != ["budget"]:
            await asyncio.sleep(0.2)
    assert (await job_hosts(admin, job))[second]["detail"] == (
        f"waiting for the disruption budget of group {group}: 1 of 1 unavailable: {group}-1 (job {job} patching)"
    )


async def test_a_job_start_after_its_window_while_the_budget_is_full_does_not_name_the_budget(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection, gate: ServiceProcess
) -> None:
    """A job.start that arrives after its window fails window_closed at once: it never waited for the budget, full as
    it is, so its detail does not name it (only a host whose last wait was for the budget does)."""
    _, _, job = await start_campaign(jobs, admin, db, "late-full", 2, max_unavailable=1)
    await events.wait_for("job.released", of_job(job))
    (waiting,) = await events.wait_for("job.waiting", of_job(job))
    late = f"late-{uuid.uuid4().hex[:6]}"
    await jobs.start(late, str(waiting.data["host_id"]), window_seconds=-5)
    (failed,) = await events.wait_for("job.failed", of_job(late))
    assert failed.data["reason"] == "window_closed" and "budget" not in str(failed.data["detail"]), failed.data


async def test_a_release_cutoff_set_while_the_budget_is_full_fails_its_waiters_at_the_cutoff(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    gate: ServiceProcess, service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    """A job host waiting for a full budget whose group gets a release cutoff that has passed fails window_closed
    then (CONTRACT §6: "fails window_closed at that moment"), not at its next retry (600 s here) or its window's
    end: a full budget's pass does not judge it for the budget, but the cutoff closes its window."""
    gate.stop()
    own = start_gate(service_env, tmp_path / "gate.log", HEALTHGATE_GATE_RETRY_SECONDS="600")
    try:
        group, hosts, job = await start_campaign(jobs, admin, db, "cutoff-full", 2, max_unavailable=1)
        (released,) = await events.wait_for("job.released", of_job(job))
        (waiting,) = await events.wait_for("job.waiting", of_job(job))
        assert waiting.data["waiting_for"] == ["budget"]
        await set_policy(db, group, max_unavailable=1, release_cutoff_seconds=3600)  # the window ends in 60 s
        (failed,) = await events.wait_for("job.failed", of_job(job), timeout=20)
        assert failed.data["host_id"] == waiting.data["host_id"] != released.data["host_id"]
        assert failed.data["reason"] == "window_closed" and "release cutoff (3600 s" in str(failed.data["detail"])
        # Its checks were ready: the detail says what it waited for, and who held the budget: the released host
        # (<group>-N, N its place among the hosts; the two job.starts may be released in either order).
        holder = f"{group}-{hosts.index(str(released.data['host_id'])) + 1}"
        assert str(failed.data["detail"]).endswith(
            f"while the host waited for the disruption budget of group {group}: 1 of 1 unavailable: "
            f"{holder} (job {job} patching)"
        ), failed.data["detail"]
    finally:
        own.stop()
        gate.restart()
