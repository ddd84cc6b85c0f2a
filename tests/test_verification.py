"""Verification after patching and halting (CONTRACT §6) with the real broker, database, poller, gate and api:
job.finished → verifying → job.verified / job.verification_failed exactly once (duplicates, a gate killed
mid-verification, the window's end without job.finished, stable_seconds), max_failed_hosts halting, and the
admin's halt and resume."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from shared.group_policies import GroupPolicy, put_policy
from shared.jobs import verification_event_id
from tests.support.fake_agent import FakeAgent
from tests.support.messages import CapturedEvent, EventCapture, Publisher, in_seconds
from tests.support.processes import ServiceProcess
from tests.support.services import BackingServices
from tests.support.tokens import TokenFactory
from tests.test_gate import host_with_checks, run_checks

pytestmark = pytest.mark.usefixtures("poller", "gate")
OUTCOMES = ("job.verified", "job.verification_failed")


@pytest.fixture
async def jobs(backing: BackingServices, exchange_name: str) -> AsyncIterator[Publisher]:
    """A publisher of inbound messages (job.start, job.finished) on the session's exchange."""
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield Publisher(await channel.get_exchange(exchange_name))


async def policy(db: asyncpg.Connection, group: str, **fields: Any) -> None:
    async with db.transaction():
        await put_policy(db, group, GroupPolicy(**fields))


async def patched_host(
    admin: httpx.AsyncClient, fake_agent: FakeAgent, service: str, group: str, *, healthy: bool = True
) -> str:
    """A host of `group` with one gating service check on the fake agent, run once (its state known)."""
    fake_agent.set(service, "healthy" if healthy else "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": service}], agent_url=fake_agent.base_url, group=group
    )
    await run_checks(admin, checks)
    return host_id


async def start(jobs: Publisher, job_id: str, host_id: str, window_seconds: float = 120, **extra: Any) -> None:
    await jobs.send(
        "job.start", {"job_id": job_id, "host_id": host_id, "window_ends_at": in_seconds(window_seconds)} | extra
    )


async def finish(jobs: Publisher, job_id: str, host_id: str, outcome: str = "succeeded", **extra: Any) -> None:
    await jobs.send("job.finished", {"job_id": job_id, "host_id": host_id, "outcome": outcome} | extra)


async def released(events: EventCapture, job_id: str, host_id: str) -> None:
    decision = await wait_decision_of(events, job_id, host_id)
    assert decision.routing_key == "job.released", decision.data


async def first_of(
    events: EventCapture, keys: tuple[str, ...], job_id: str, host_id: str, timeout: float = 15
) -> CapturedEvent:
    """The first event of `keys` about the job host, once it came."""

    def mine(event: CapturedEvent) -> bool:
        return event.data["job_id"] == job_id and event.data["host_id"] == host_id

    async with asyncio.timeout(timeout):
        while not (found := [event for key in keys for event in events.matching(key, mine)]):
            events.arrived.clear()
            await events.arrived.wait()
    return found[0]


async def wait_decision_of(events: EventCapture, job_id: str, host_id: str) -> CapturedEvent:
    return await first_of(events, ("job.released", "job.failed", "job.cancelled"), job_id, host_id)


async def outcome_of(events: EventCapture, job_id: str, host_id: str, timeout: float = 30) -> CapturedEvent:
    return await first_of(events, OUTCOMES, job_id, host_id, timeout)


async def status_of(db: asyncpg.Connection, job_id: str, host_id: str) -> str:
    status: str = await db.fetchval(
        "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_id, uuid.UUID(host_id)
    )
    return status


async def wait_status(db: asyncpg.Connection, job_id: str, host_id: str, status: str, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while await status_of(db, job_id, host_id) != status:
            await asyncio.sleep(0.1)


async def outcomes_in_outbox(db: asyncpg.Connection, job_id_prefix: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        SELECT routing_key, event_id, convert_from(body, 'UTF8')::jsonb -> 'data' AS data FROM outbox
        WHERE routing_key = ANY($1) AND convert_from(body, 'UTF8')::jsonb -> 'data' ->> 'job_id' LIKE $2
        """,
        list(OUTCOMES),
        job_id_prefix + "%",
    )


async def metrics_of(service: ServiceProcess) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{service.base_url}/metrics")).text


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ---- verification ---------------------------------------------------------------------------------


async def test_host_that_recovers_is_verified(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    gate: ServiceProcess,
) -> None:  # fmt: skip
    await policy(db, "verify-ok", verify_timeout_seconds=60)
    host_id = await patched_host(admin, fake_agent, "ok.service", "verify-ok")
    await start(jobs, "v-ok", host_id)
    await released(events, "v-ok", host_id)
    assert (await admin.get(f"/api/v1/hosts/{host_id}")).status_code == 200
    fake_agent.set("ok.service", "unhealthy")  # the patch reboots it
    await finish(jobs, "v-ok", host_id, detail="kernel 6.8 installed")
    (flipped,) = await events.wait_for(
        "check.status_changed", lambda event: event.data["host_id"] == host_id and event.data["current"] == "unhealthy"
    )
    assert flipped.data["in_maintenance"] is True  # the job is patching it: alerting can ignore this
    (host_flip,) = await events.wait_for(
        "host.status_changed", lambda event: event.data["host_id"] == host_id and event.data["current"] == "unhealthy"
    )
    assert host_flip.data["in_maintenance"] is True
    job = (await admin.get("/api/v1/jobs/v-ok")).json()
    assert job["hosts"][0]["status"] == "verifying" and job["hosts"][0]["outcome"] == "succeeded"
    assert job["hosts"][0]["finished_at"] is not None and job["hosts"][0]["verified_at"] is None
    assert events.matching("job.verified", lambda event: event.data["job_id"] == "v-ok") == []
    fake_agent.set("ok.service", "healthy")
    verified = await outcome_of(events, "v-ok", host_id)
    assert verified.routing_key == "job.verified"
    assert verified.message_id == str(verification_event_id("v-ok", uuid.UUID(host_id)))
    assert verified.correlation_id == "v-ok" and verified.data["outcome"] == "succeeded"
    assert [(check["name"], check["healthy"]) for check in verified.data["checks"]] == [("check-0", True)]
    job = (await admin.get("/api/v1/jobs/v-ok")).json()
    host = job["hosts"][0]
    assert host["status"] == "verified" and host["verified_at"] is not None and host["waiting_for"] == []
    assert job["halted"] is False and job["halt_reason"] is None and job["max_failed_hosts"] is None
    metrics = await metrics_of(gate)
    assert metric(metrics, 'healthgate_verifications_total{outcome="verified"}') >= 1


async def test_host_that_stays_down_fails_verification_at_the_timeout_and_duplicates_change_nothing(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    gate: ServiceProcess,
) -> None:  # fmt: skip
    await policy(db, "verify-down", verify_delay_seconds=1, verify_timeout_seconds=10)
    host_id = await patched_host(admin, fake_agent, "down.service", "verify-down")
    await start(jobs, "v-down", host_id)
    await released(events, "v-down", host_id)
    fake_agent.set("down.service", "unhealthy")
    await finish(jobs, "v-down", host_id)
    await wait_status(db, "v-down", host_id, "verifying")
    row = await db.fetchrow(
        "SELECT finished_at, verify_from_at, verify_deadline_at FROM gate_jobs WHERE job_id = 'v-down'"
    )
    assert row["verify_from_at"] - row["finished_at"] == dt.timedelta(seconds=1)
    assert row["verify_deadline_at"] - row["verify_from_at"] == dt.timedelta(seconds=10)
    await finish(jobs, "v-down", host_id, outcome="failed")  # a duplicate (another outcome, even): ignored
    await finish(jobs, "v-none", host_id)  # an unknown job: acked, not dead-lettered
    await finish(jobs, "v-down", host_id, outcome="maybe")  # malformed: dead-lettered
    failed = await outcome_of(events, "v-down", host_id, timeout=30)
    assert failed.routing_key == "job.verification_failed"
    assert failed.data["outcome"] == "succeeded"  # the first job.finished's
    assert "check-0: down.service is failed (failed)" in failed.data["detail"]
    assert "within 11 s" in failed.data["detail"]
    failed_at = dt.datetime.fromisoformat(failed.data["failed_at"])
    assert failed_at >= row["verify_deadline_at"]
    await finish(jobs, "v-down", host_id)  # after the outcome: ignored too
    await asyncio.sleep(2)
    assert len(await outcomes_in_outbox(db, "v-down")) == 1
    assert await db.fetchval("SELECT outcome FROM gate_jobs WHERE job_id = 'v-down'") == "succeeded"
    metrics = await metrics_of(gate)
    assert metric(metrics, 'healthgate_gate_messages_total{outcome="not_released",routing_key="job.finished"}') >= 2
    assert metric(metrics, 'healthgate_gate_messages_total{outcome="unknown_job_host",routing_key="job.finished"}') >= 1
    assert metric(metrics, 'healthgate_verifications_total{outcome="verification_failed"}') >= 1
    assert metric(metrics, 'healthgate_gate_messages_total{outcome="dead_lettered",routing_key="job.finished"}') >= 1


async def test_gate_killed_during_verification_gives_exactly_one_outcome_each(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    gate: ServiceProcess,
) -> None:  # fmt: skip
    await policy(db, "verify-kill", verify_timeout_seconds=120)
    hosts = [await patched_host(admin, fake_agent, f"kill-{index}.service", "verify-kill") for index in range(6)]
    for host_id in hosts:
        for index in range(4):
            await start(jobs, f"vk-{index}", host_id)
    for host_id in hosts:
        for index in range(4):
            await released(events, f"vk-{index}", host_id)
    for number, host_id in enumerate(hosts):
        fake_agent.set(f"kill-{number}.service", "unhealthy")
        for index in range(4):
            await finish(jobs, f"vk-{index}", host_id)
    async with asyncio.timeout(15):
        while (
            await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'vk-%' AND status = 'verifying'") < 24
        ):
            await asyncio.sleep(0.1)
    for number in range(6):
        fake_agent.set(f"kill-{number}.service", "healthy")
    await asyncio.sleep(1.5)  # some are being verified now
    gate.stop(signal.SIGKILL)
    gate.restart()
    async with asyncio.timeout(60):
        while await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'vk-%' AND status = 'verified'") < 24:
            await asyncio.sleep(0.2)
    outcomes = await outcomes_in_outbox(db, "vk-")
    assert len(outcomes) == 24 and len({row["event_id"] for row in outcomes}) == 24
    assert {row["routing_key"] for row in outcomes} == {"job.verified"}


async def test_window_end_without_job_finished_starts_verification(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection
) -> None:
    await policy(db, "verify-window", verify_timeout_seconds=30)
    host_id = await patched_host(admin, fake_agent, "window.service", "verify-window")
    await start(jobs, "v-window", host_id, window_seconds=3)
    await released(events, "v-window", host_id)
    verified = await outcome_of(events, "v-window", host_id, timeout=30)
    assert verified.routing_key == "job.verified" and verified.data["outcome"] is None
    row = await db.fetchrow("SELECT finished_at, window_ends_at, outcome FROM gate_jobs WHERE job_id = 'v-window'")
    assert row["finished_at"] == row["window_ends_at"] and row["outcome"] is None
    job = (await admin.get("/api/v1/jobs/v-window")).json()
    assert job["hosts"][0]["outcome"] is None
    assert dt.datetime.fromisoformat(job["hosts"][0]["finished_at"]) == row["finished_at"]


async def test_verification_waits_for_stable_seconds(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection
) -> None:
    await policy(db, "verify-stable", stable_seconds=4, verify_timeout_seconds=60)
    host_id = await patched_host(admin, fake_agent, "stable.service", "verify-stable")
    await start(jobs, "v-stable", host_id)
    await released(events, "v-stable", host_id)
    await finish(jobs, "v-stable", host_id)
    verified = await outcome_of(events, "v-stable", host_id, timeout=30)
    assert verified.routing_key == "job.verified"
    finished_at = await db.fetchval("SELECT finished_at FROM gate_jobs WHERE job_id = 'v-stable'")
    # Healthy all along: stable counts from finished_at, never from before it.
    assert dt.datetime.fromisoformat(verified.data["verified_at"]) - finished_at >= dt.timedelta(seconds=4)


async def test_host_without_gating_checks_is_verified_at_once(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await policy(db, "verify-none", verify_delay_seconds=600)
    host_id, _ = await host_with_checks(admin, [], group="verify-none")
    await start(jobs, "v-nocheck", host_id)
    await released(events, "v-nocheck", host_id)
    await finish(jobs, "v-nocheck", host_id)
    verified = await outcome_of(events, "v-nocheck", host_id)
    assert verified.routing_key == "job.verified" and verified.data["checks"] == []
    detail = await db.fetchval("SELECT detail FROM gate_jobs WHERE job_id = 'v-nocheck'")
    assert "no gating checks" in detail


# ---- halting --------------------------------------------------------------------------------------


async def test_max_failed_hosts_halts_at_the_second_failure_and_fails_waiting_hosts(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    gate: ServiceProcess,
) -> None:  # fmt: skip
    await policy(db, "halting", verify_timeout_seconds=10)
    first = await patched_host(admin, fake_agent, "h1.service", "halting")
    second = await patched_host(admin, fake_agent, "h2.service", "halting")
    waiting = await patched_host(admin, fake_agent, "h3.service", "halting", healthy=False)
    for host_id in (first, second, waiting):
        await start(jobs, "halt-me", host_id, max_failed_hosts=1)
    await released(events, "halt-me", first)
    await released(events, "halt-me", second)
    await events.wait_for("job.waiting", lambda event: event.data["host_id"] == waiting)
    await finish(jobs, "halt-me", first, outcome="failed")  # one failed host: not more than 1
    # It goes on to its outcome: verified (its check is healthy), although its patch failed; the job goes on.
    assert (await outcome_of(events, "halt-me", first)).routing_key == "job.verified"
    assert events.matching("job.halted", lambda event: event.data["job_id"] == "halt-me") == []
    fake_agent.set("h2.service", "unhealthy")
    await finish(jobs, "halt-me", second)  # succeeded, but the host stays down: the second failure
    (halted,) = await events.wait_for("job.halted", lambda event: event.data["job_id"] == "halt-me", timeout=30)
    assert halted.data["reason"] == "max_failed_hosts" and halted.data["by"] is None
    assert sorted(halted.data["failed_hosts"]) == sorted([first, second])
    failure = await outcome_of(events, "halt-me", second)
    assert failure.routing_key == "job.verification_failed"
    stopped = await wait_decision_of(events, "halt-me", waiting)
    assert stopped.routing_key == "job.failed" and stopped.data["reason"] == "job_halted"
    assert (await outcome_of(events, "halt-me", first)).data["outcome"] == "failed"
    late = await patched_host(admin, fake_agent, "h4.service", "halting")
    await start(jobs, "halt-me", late)
    refused = await wait_decision_of(events, "halt-me", late)
    assert refused.routing_key == "job.failed" and refused.data["reason"] == "job_halted"
    job = (await admin.get("/api/v1/jobs/halt-me")).json()
    assert job["halted"] is True and job["halt_reason"] == "max_failed_hosts" and job["max_failed_hosts"] == 1
    assert job["halted_at"] is not None
    assert len(events.matching("job.halted", lambda event: event.data["job_id"] == "halt-me")) == 1
    assert metric(await metrics_of(gate), "healthgate_jobs_halted_total") >= 1


async def test_admin_halts_and_resumes_a_job_audited(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    make_token: TokenFactory, client: httpx.AsyncClient,
) -> None:  # fmt: skip
    waiting = await patched_host(admin, fake_agent, "m1.service", "manual", healthy=False)
    await start(jobs, "by-hand", waiting)
    await events.wait_for("job.waiting", lambda event: event.data["host_id"] == waiting)
    operator = {"Authorization": f"Bearer {await make_token('operator', ('manual',))}"}
    stranger = {"Authorization": f"Bearer {await make_token('viewer', ('elsewhere',))}"}
    body = {"reason": "bad kernel"}
    assert (await client.post("/api/v1/jobs/by-hand/halt", json=body, headers=stranger)).status_code == 404
    assert (await client.post("/api/v1/jobs/by-hand/halt", json=body, headers=operator)).status_code == 403
    assert (await admin.post("/api/v1/jobs/nobody/halt", json=body)).status_code == 404
    assert (await admin.post("/api/v1/jobs/by-hand/halt", json={"reason": ""})).status_code == 422
    assert (await admin.post("/api/v1/jobs/by-hand/resume", json=body)).status_code == 409
    answer = await admin.post("/api/v1/jobs/by-hand/halt", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["halted"] is True and answer.json()["halt_reason"] == "manual"
    assert (await admin.post("/api/v1/jobs/by-hand/halt", json=body)).status_code == 409
    admin_name = (await admin.get("/api/v1/me")).json()["name"]
    (halted,) = await events.wait_for("job.halted", lambda event: event.data["job_id"] == "by-hand")
    assert (
        halted.data["by"] == admin_name and halted.data["detail"] == "bad kernel" and halted.data["reason"] == "manual"
    )
    stopped = await wait_decision_of(events, "by-hand", waiting)
    assert stopped.data["reason"] == "job_halted" and "bad kernel" in stopped.data["detail"]
    answer = await admin.post("/api/v1/jobs/by-hand/resume", json={"reason": "fixed image"})
    assert answer.status_code == 200 and answer.json()["halted"] is False and answer.json()["halt_reason"] is None
    (resumed,) = await events.wait_for("job.resumed", lambda event: event.data["job_id"] == "by-hand")
    assert resumed.data["by"] == admin_name and resumed.data["detail"] == "fixed image"
    assert (await admin.post("/api/v1/jobs/by-hand/resume", json=body)).status_code == 409
    again = await patched_host(admin, fake_agent, "m2.service", "manual")
    await start(jobs, "by-hand", again)  # gated again after the resume
    await released(events, "by-hand", again)
    assert await status_of(db, "by-hand", waiting) == "failed"  # stays failed
    audit = (await admin.get("/api/v1/audit")).json()["items"]
    actions = [
        (entry["action"], entry["entity_id"], entry["actor"]) for entry in audit if entry["entity_id"] == "by-hand"
    ]
    assert sorted(actions) == [("job.halt", "by-hand", admin_name), ("job.resume", "by-hand", admin_name)]
    halt_entry = next(entry for entry in audit if entry["action"] == "job.halt")
    assert halt_entry["changes"]["reason"] == "bad kernel" and halt_entry["changes"]["failed_waiting_hosts"] == [
        waiting
    ]
