"""The gate with the real broker, database, poller and targets: every rule of CONTRACT §5, exactly one
decision per job host through duplicates, crashes, restarts of the gate and of the broker, and two
gates at once."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from shared.events import decision_event_id
from shared.tokens import create_token
from tests.support.blackhole import refused_port
from tests.support.fake_agent import FakeAgent
from tests.support.messages import DECISIONS, EventCapture, Publisher, decision_of, wait_decision
from tests.support.nginx import NginxServer
from tests.support.processes import ServiceProcess, free_port, start_gate, start_poller, start_service, start_together
from tests.support.rabbitmq import RabbitNode
from tests.support.raw_http import RawHttpServer, response
from tests.support.services import BackingServices

pytestmark = pytest.mark.usefixtures("poller", "gate")


async def assert_one_decision_each(db: asyncpg.Connection) -> None:
    """No job host was decided twice: every decision event id is in the outbox once."""
    duplicated = await db.fetch(
        "SELECT event_id, count(*) FROM outbox WHERE routing_key = ANY($1) GROUP BY event_id HAVING count(*) > 1",
        list(DECISIONS),
    )
    assert duplicated == []


async def host_with_checks(
    admin: httpx.AsyncClient, checks: list[dict[str, Any]], **host: Any
) -> tuple[str, list[dict[str, Any]]]:
    response = await admin.post("/api/v1/hosts", json={"name": f"gated-{uuid.uuid4().hex[:8]}", "group": "gate"} | host)
    host_id = response.json()["id"]
    created = []
    for index, check in enumerate(checks):
        body = {"name": f"check-{index}", "interval_seconds": 3600} | check
        answer = await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json=body)
        assert answer.status_code == 201, answer.text
        created.append(answer.json())
    return host_id, created


async def run_checks(admin: httpx.AsyncClient, checks: list[dict[str, Any]]) -> None:
    for check in checks:
        response = await admin.post(f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}/test")
        assert response.status_code == 200, response.text


# ---- the rules ------------------------------------------------------------------------------------


async def test_window_already_past_fails_first(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, nginx: NginxServer
) -> None:
    host_id, checks = await host_with_checks(admin, [{"check_type": "http", "url": nginx.http_url("/ok")}])
    await run_checks(admin, checks)  # healthy and fresh: the window rule still comes first
    await jobs.start("late", host_id, window_seconds=-3600)
    decision = await wait_decision(events, "late")
    assert decision.routing_key == "job.failed" and decision.data["reason"] == "window_closed"
    # Healthy checks or not, the host never had a chance: the detail says so first, then names the checks as they
    # stood when the window ended (this one had no result yet then: it was created an hour later).
    assert decision.data["detail"].startswith("the job.start arrived (at "), decision.data["detail"]
    assert decision.data["detail"].endswith(
        "; checks not healthy when it closed: check-0: no result before the window closed"
    ), decision.data["detail"]
    assert decision.correlation_id == "late" and decision.message_id == str(
        decision_event_id("late", uuid.UUID(host_id))
    )


async def test_unknown_host_or_no_gating_checks_release_at_once(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, nginx: NginxServer
) -> None:
    await jobs.start("unknown-host", str(uuid.uuid4()))
    host_id, _ = await host_with_checks(admin, [
        {"check_type": "http", "url": nginx.http_url("/status/503"), "critical": False},
        {"check_type": "http", "url": nginx.http_url("/status/503"), "enabled": False},
    ])  # fmt: skip
    await jobs.start("no-gating", host_id)
    for job_id in ("unknown-host", "no-gating"):
        decision = await wait_decision(events, job_id)
        assert decision.routing_key == "job.released" and decision.data["checks"] == []


async def test_fresh_healthy_checks_release_at_once(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, nginx: NginxServer
) -> None:
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "http", "url": nginx.http_url("/ok")}, {"check_type": "tcp", "port": nginx.http_port}],
        name="127.0.0.1",
    )  # fmt: skip
    await run_checks(admin, checks)
    await jobs.start("fresh", host_id, cloudevent=True)
    decision = await wait_decision(events, "fresh")
    assert decision.routing_key == "job.released"
    assert sorted(check["name"] for check in decision.data["checks"]) == ["check-0", "check-1"]
    assert all(check["healthy"] for check in decision.data["checks"])
    assert events.matching("job.waiting", lambda event: event.data["job_id"] == "fresh") == []


async def test_stale_result_is_run_again_then_released(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, nginx: NginxServer, db: asyncpg.Connection
) -> None:
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "http", "url": nginx.http_url("/ok"), "interval_seconds": 60}]
    )
    await run_checks(admin, checks)
    await db.execute(
        "UPDATE check_state SET last_checked_at = now() - interval '2 hours' WHERE host_id = $1", uuid.UUID(host_id)
    )
    await jobs.start("stale", host_id)
    (waiting,) = await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "stale")
    assert [check["name"] for check in waiting.data["failing_checks"]] == ["check-0"]
    decision = await wait_decision(events, "stale", timeout=10)
    assert decision.routing_key == "job.released"


async def check_status(admin: httpx.AsyncClient, check: dict[str, Any]) -> str:
    response = await admin.get(f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}")
    status: str = response.json()["status"]
    return status


async def until_status(admin: httpx.AsyncClient, check: dict[str, Any], wanted: str, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.1)):
        if await check_status(admin, check) == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the check is {await check_status(admin, check)!r}, not {wanted!r}, after {timeout} s")


async def test_a_check_pointed_elsewhere_is_not_released_on_its_old_healthy_result(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, nginx: NginxServer
) -> None:
    """A healthy result says nothing of the check's new target: after the PUT the check is unknown, a job.start
    waits, and only a result of the new target decides (here: refused, then pointed back to a healthy one)."""
    body = {"name": "check-0", "check_type": "http", "url": nginx.http_url("/ok"), "interval_seconds": 3600}
    host_id, [check] = await host_with_checks(admin, [body])
    await run_checks(admin, [check])
    assert await check_status(admin, check) == "healthy"
    check_url = f"/api/v1/hosts/{host_id}/health-checks/{check['id']}"
    with refused_port() as port:
        changed = await admin.put(check_url, json=body | {"url": f"http://127.0.0.1:{port}/"})
        assert changed.status_code == 200 and changed.json()["status"] == "unknown", changed.text
        assert changed.json()["last_result"]["healthy"] is True  # the last result stays, as what it was
        await jobs.start("repointed", host_id)
        (waiting,) = await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "repointed")
        assert [failing["name"] for failing in waiting.data["failing_checks"]] == ["check-0"]
        await until_status(admin, check, "unhealthy")  # its first run against the new target (within 5 s)
        assert decision_of(events, "repointed") == []
    renamed = await admin.put(check_url, json=body | {"url": nginx.http_url("/ok"), "name": "web"})
    assert renamed.json()["status"] == "unknown"
    decision = await wait_decision(events, "repointed", timeout=15)
    assert decision.routing_key == "job.released"
    # A change of what the status does not depend on keeps it.
    kept = await admin.put(check_url, json=body | {"name": "www", "failures_before_unhealthy": 5})
    assert kept.json()["status"] == "healthy"


async def test_a_run_of_the_old_target_that_ends_after_the_change_is_not_stored(
    admin: httpx.AsyncClient, raw_http: RawHttpServer
) -> None:
    """The check's run is in flight (a slow, healthy answer) when a PUT points it elsewhere, and disables it so that
    no run of the new target comes: the slow answer arrives after the change and judges a target that is gone, so
    it is not stored and the check stays unknown."""
    raw_http.set("/slow", response(body=b"fine"), delay=2)
    body = {"name": "slow", "check_type": "http", "url": raw_http.url("/slow"), "interval_seconds": 3600}
    host_id, [check] = await host_with_checks(admin, [body])  # its first run comes within 5 s
    for _ in range(100):
        if any(b"/slow" in request for request in raw_http.request_log()):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the check never ran")
    check_url = f"/api/v1/hosts/{host_id}/health-checks/{check['id']}"
    changed = await admin.put(check_url, json=body | {"url": raw_http.url("/elsewhere"), "enabled": False})
    assert changed.json()["status"] == "unknown"
    await asyncio.sleep(3)  # the slow answer has come meanwhile, and its run has ended
    assert await check_status(admin, check) == "unknown"
    assert (await admin.get(f"{check_url}/results")).json()["items"] == []


async def test_a_host_renamed_makes_its_checks_of_the_old_name_unknown(
    admin: httpx.AsyncClient, fake_agent: FakeAgent
) -> None:
    """A tcp check without an address connects to its host's name, a service check asks its agent_url: a PUT of the
    host that changes them makes those checks unknown until they have run against the new ones; the others keep
    their status."""
    fake_agent.set("db.service", "healthy")
    with refused_port() as refused:
        host = await admin.post(
            "/api/v1/hosts", json={"name": "127.0.0.1", "group": "gate", "agent_url": fake_agent.base_url}
        )
        host_id = host.json()["id"]
        made = [
            await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json=body | {"interval_seconds": 3600})
            for body in (
                {"name": "by-name", "check_type": "tcp", "port": fake_agent.port},
                {"name": "by-address", "check_type": "tcp", "port": fake_agent.port, "address": "127.0.0.1"},
                {"name": "agent", "check_type": "service", "service_name": "db.service"},
            )
        ]
        checks = [answer.json() for answer in made]
        await run_checks(admin, checks)
        assert [await check_status(admin, check) for check in checks] == ["healthy"] * 3
        moved = await admin.put(
            f"/api/v1/hosts/{host_id}",
            json={"name": "127.0.0.2", "group": "gate", "agent_url": f"http://127.0.0.1:{refused}"},
        )
        assert moved.status_code == 200 and moved.json()["health_check_status"] == "unknown", moved.text
        # Unknown, or already their first result of the new target (within 5 s): either way not the old one.
        statuses = [await check_status(admin, check) for check in checks]
        assert statuses[0] in ("unknown", "unhealthy") and statuses[2] in ("unknown", "unhealthy"), statuses
        assert statuses[1] == "healthy", statuses
        await until_status(admin, checks[0], "unhealthy")  # nothing listens on 127.0.0.2
        await until_status(admin, checks[2], "unhealthy")  # the new agent_url refuses


async def test_waiting_job_released_when_its_check_recovers_and_waiting_sent_once(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection
) -> None:
    fake_agent.set("db.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "db.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    await jobs.start("recover", host_id)
    (waiting,) = await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "recover")
    assert waiting.data["failing_checks"][0]["detail"] == "db.service is failed (failed)"
    await asyncio.sleep(5)  # at least two retries: the gate runs the failing check again each time
    assert len(fake_agent.requests_for("db.service")) >= 3
    assert decision_of(events, "recover") == []
    fake_agent.set("db.service", "healthy")
    decision = await wait_decision(events, "recover", timeout=10)
    assert decision.routing_key == "job.released" and decision.data["waited_seconds"] >= 5
    assert len(events.matching("job.waiting", lambda event: event.data["job_id"] == "recover")) == 1
    job = (await admin.get("/api/v1/jobs/recover")).json()
    assert job["hosts"][0]["status"] == "released"
    await assert_one_decision_each(db)


async def test_window_closing_fails_naming_each_failing_check(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, nginx: NginxServer
) -> None:
    fake_agent.set("web.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin,
        [
            {"check_type": "service", "service_name": "web.service"},
            {"check_type": "http", "url": nginx.http_url("/status/503")},
            {"check_type": "http", "url": nginx.http_url("/ok")},
        ],
        agent_url=fake_agent.base_url,
    )
    await run_checks(admin, checks)
    await jobs.start("closing", host_id, window_seconds=3)
    decision = await wait_decision(events, "closing", timeout=10)
    assert decision.routing_key == "job.failed" and decision.data["reason"] == "window_closed"
    detail = decision.data["detail"]
    assert "check-0: web.service is failed (failed)" in detail and "check-1: status 503 Service Unavailable" in detail
    assert "check-2" not in detail
    assert {check["name"]: check["healthy"] for check in decision.data["checks"]} == {
        "check-0": False, "check-1": False, "check-2": True,
    }  # fmt: skip


async def test_duplicate_start_before_and_after_the_decision_is_one_decision(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection
) -> None:
    fake_agent.set("dup.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "dup.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    for _ in range(3):
        await jobs.start("dup", host_id)
    await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "dup")
    fake_agent.set("dup.service", "healthy")
    await wait_decision(events, "dup")
    for _ in range(3):
        await jobs.start("dup", host_id)
    await asyncio.sleep(2)
    assert len({event.message_id for event in decision_of(events, "dup")}) == 1
    assert await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id = 'dup'") == 1
    await assert_one_decision_each(db)


async def test_malformed_start_is_dead_lettered_and_fails_when_identifiable(
    jobs: Publisher, events: EventCapture, backing: BackingServices, exchange_name: str
) -> None:
    host_id = str(uuid.uuid4())
    await jobs.start("fine-before", host_id)
    await jobs.send("job.start", {"job_id": "bad-window", "host_id": host_id, "window_ends_at": "tomorrow"})
    await jobs.send("job.start", {"job_id": 42, "host_id": host_id})
    await jobs.send("job.start", None, raw=b"\x00 not json")
    await jobs.send("job.cancel", {"job_id": f"x-{host_id}"})
    await jobs.start("fine-after", host_id)
    failed = await wait_decision(events, "bad-window")
    assert failed.routing_key == "job.failed" and failed.data["reason"] == "invalid_request"
    assert "window_ends_at" in failed.data["detail"]
    for job_id in ("fine-before", "fine-after"):
        assert (await wait_decision(events, job_id)).routing_key == "job.released"
    dead = await drain_dead_letters(
        backing.amqp_url,
        f"{exchange_name}.dead",
        expected=4,
        matching=lambda message: host_id.encode() in message.body or message.body == b"\x00 not json",
    )
    assert sorted(message.routing_key or "" for message in dead) == [
        "job.cancel",
        "job.start",
        "job.start",
        "job.start",
    ]
    assert any(b"tomorrow" in message.body for message in dead)


async def drain_dead_letters(
    amqp_url: str,
    queue_name: str,
    *,
    expected: int,
    matching: Callable[[aio_pika.abc.AbstractIncomingMessage], bool] = lambda _: True,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take the gate's dead letters out of the session's shared dead-letter queue: the first `expected` job
    messages that are `matching` (this test's own). Others are taken out and dropped: an earlier test's leftovers,
    which would otherwise stand in for this test's."""
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        async with asyncio.timeout(10):
            while len(found) < expected:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                await message.ack()
                if message.routing_key in ("job.start", "job.cancel") and matching(message):
                    found.append(message)
    return found


async def test_cancel_of_a_waiting_job_and_override(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection
) -> None:
    fake_agent.set("can.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "can.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    await jobs.start("to-cancel", host_id)
    await jobs.start("to-override", host_id)
    for job_id in ("to-cancel", "to-override"):
        await events.wait_for("job.waiting", lambda event, job_id=job_id: event.data["job_id"] == job_id)
    await jobs.send("job.cancel", {"job_id": "to-cancel", "host_id": host_id})
    cancelled = await wait_decision(events, "to-cancel")
    assert cancelled.routing_key == "job.cancelled" and cancelled.correlation_id == "to-cancel"
    response = await admin.post(
        f"/api/v1/jobs/to-override/hosts/{host_id}/override", json={"decision": "release", "reason": "vendor said so"}
    )
    assert response.status_code == 200
    overridden = await wait_decision(events, "to-override")
    assert overridden.data["overridden_by"] and overridden.data["override_reason"] == "vendor said so"
    await jobs.send("job.cancel", {"job_id": "to-override", "host_id": host_id})  # too late: nothing happens
    fake_agent.set("can.service", "healthy")
    await asyncio.sleep(3)
    assert len(decision_of(events, "to-cancel")) == len(decision_of(events, "to-override")) == 1
    await assert_one_decision_each(db)


async def test_a_cancel_that_overtakes_its_start_decides_the_job_host(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A job.start handed back during a database outage goes behind a later job.cancel: the cancel must
    still win, the start then being a duplicate (never released after its executor cancelled it)."""
    host_id, _ = await host_with_checks(admin, [])  # no checks: a job.start alone would be released at once
    await jobs.send("job.cancel", {"job_id": "cancel-first", "host_id": host_id})
    cancelled = await wait_decision(events, "cancel-first")
    assert cancelled.routing_key == "job.cancelled"
    await jobs.start("cancel-first", host_id)
    await jobs.send("job.cancel", {"job_id": "cancel-first", "host_id": host_id})  # a repeat: nothing new
    await asyncio.sleep(2)
    assert [event.routing_key for event in decision_of(events, "cancel-first")] == ["job.cancelled"]
    row = await db.fetchrow("SELECT status, detail FROM gate_jobs WHERE job_id = 'cancel-first'")
    assert row["status"] == "cancelled" and "before its job.start" in row["detail"]
    await assert_one_decision_each(db)


# ---- crashes, restarts, concurrency ---------------------------------------------------------------


async def waiting_host(admin: httpx.AsyncClient, fake_agent: FakeAgent, service: str) -> str:
    fake_agent.set(service, "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": service}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    return host_id


async def wait_all_decided(db: asyncpg.Connection, prefix: str, count: int, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while (
            await db.fetchval(
                "SELECT count(*) FROM gate_jobs WHERE job_id LIKE $1 AND status <> 'waiting_health_check'", prefix + "%"
            )
            < count
        ):
            await asyncio.sleep(0.2)


async def decisions_in_outbox(db: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await db.fetch(
        """
        SELECT convert_from(body, 'UTF8')::jsonb -> 'data' ->> 'job_id' AS job_id, count(*) AS decisions
        FROM outbox WHERE routing_key = ANY($1) AND convert_from(body, 'UTF8')::jsonb -> 'data' ->> 'job_id' LIKE $2
        GROUP BY 1
        """,
        list(DECISIONS), prefix + "%",
    )  # fmt: skip
    return {row["job_id"]: row["decisions"] for row in rows}


@pytest.mark.slow
async def test_gate_killed_while_jobs_wait_decides_each_once_after_restart(
    jobs: Publisher, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection, gate: ServiceProcess
) -> None:
    host_id = await waiting_host(admin, fake_agent, "kill.service")
    for index in range(20):
        await jobs.start(f"kill-{index:02}", host_id, window_seconds=4 if index < 5 else 120)
    async with asyncio.timeout(15):
        while await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'kill-%' AND waiting_announced") < 20:
            await asyncio.sleep(0.1)
    gate.stop(signal.SIGKILL)
    fake_agent.set("kill.service", "healthy")
    await asyncio.sleep(5)  # five windows close while no gate runs
    gate.restart()
    await wait_all_decided(db, "kill-", 20)
    statuses = dict(await db.fetch("SELECT job_id, status FROM gate_jobs WHERE job_id LIKE 'kill-%'"))
    assert sorted(statuses.values()).count("failed") == 5 and sorted(statuses.values()).count("released") == 15
    assert (
        set((await decisions_in_outbox(db, "kill-")).values()) == {1}
        and len(await decisions_in_outbox(db, "kill-")) == 20
    )


@pytest.mark.slow
async def test_broker_restart_while_jobs_wait(
    own_rabbit: RabbitNode, private_database: str, service_env: dict[str, str], fake_agent: FakeAgent, tmp_path: Path
) -> None:
    # On a RabbitMQ node of the test's own: restarting the shared broker would disturb every other test session.
    env = service_env | {
        "HEALTHGATE_DATABASE_URL": private_database, "HEALTHGATE_AMQP_URL": own_rabbit.amqp_url,
        "HEALTHGATE_EXCHANGE": f"hgtest-{uuid.uuid4().hex[:10]}-broker",
    }  # fmt: skip
    api_port = free_port()
    services = start_together(
        lambda: start_service("api", env | {"HEALTHGATE_API_PORT": str(api_port)}, tmp_path / "api.log", port=api_port),
        lambda: start_poller(env, tmp_path / "poller.log"),
        lambda: start_gate(env, tmp_path / "gate.log"),
    )
    db = await asyncpg.connect(private_database)
    try:
        token = await create_token(db, name="broker-admin", role="admin", groups=(), actor="test")  # type: ignore[arg-type]
        connection = await aio_pika.connect(own_rabbit.amqp_url)
        async with (
            connection,
            httpx.AsyncClient(
                base_url=services[0].base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
            ) as admin,
        ):
            jobs = Publisher(
                await (await connection.channel(publisher_confirms=True)).get_exchange(env["HEALTHGATE_EXCHANGE"])
            )
            host_id = await waiting_host(admin, fake_agent, "broker.service")
            for index in range(10):
                await jobs.start(f"broker-{index}", host_id)
            async with asyncio.timeout(15):
                while (
                    await db.fetchval(
                        "SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'broker-%' AND waiting_announced"
                    )
                    < 10
                ):
                    await asyncio.sleep(0.1)
        await asyncio.to_thread(own_rabbit.stop_app)
        await asyncio.to_thread(own_rabbit.start_app)
        fake_agent.set("broker.service", "healthy")
        await wait_all_decided(db, "broker-", 10, timeout=90)
        assert set((await db.fetch("SELECT DISTINCT status FROM gate_jobs WHERE job_id LIKE 'broker-%'"))[0]) == {
            "released"
        }
        assert set((await decisions_in_outbox(db, "broker-")).values()) == {1}
        async with asyncio.timeout(30):  # and the decisions reach the broker once it is back
            while await db.fetchval(
                "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND routing_key = ANY($1)", list(DECISIONS)
            ):
                await asyncio.sleep(0.2)
    finally:
        await db.close()
        for service in services:
            service.stop()


@pytest.mark.slow
async def test_thousand_jobs_with_a_gate_restart_in_the_middle(
    jobs: Publisher, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection, gate: ServiceProcess
) -> None:
    hosts = [str(uuid.uuid4()) for _ in range(10)]  # unknown hosts: released as soon as they are handled
    sending = asyncio.gather(*(jobs.start(f"k-{index:04}", hosts[index % 10]) for index in range(1000)))
    await asyncio.sleep(0.3)
    gate.stop(signal.SIGKILL)
    decided_before_the_crash = await db.fetchval(
        "SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'k-%' AND status <> 'waiting_health_check'"
    )
    await sending
    assert decided_before_the_crash < 1000
    gate.restart()
    await wait_all_decided(db, "k-", 1000, timeout=120)
    decided = await decisions_in_outbox(db, "k-")
    assert len(decided) == 1000 and set(decided.values()) == {1}


@pytest.mark.slow
async def test_two_gates_never_decide_twice(
    jobs: Publisher, admin: httpx.AsyncClient, fake_agent: FakeAgent, db: asyncpg.Connection,
    service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    second = start_gate(service_env, tmp_path / "second-gate.log")
    try:
        host_id = await waiting_host(admin, fake_agent, "pair.service")
        for index in range(200):
            await jobs.start(f"pair-{index:03}", host_id, window_seconds=30)
            await jobs.start(f"pair-{index:03}", host_id, window_seconds=30)  # and each twice
        async with asyncio.timeout(30):
            while (
                await db.fetchval("SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'pair-%' AND waiting_announced")
                < 200
            ):
                await asyncio.sleep(0.1)
        fake_agent.set("pair.service", "healthy")
        await wait_all_decided(db, "pair-", 200, timeout=60)
    finally:
        second.stop()
    decided = await decisions_in_outbox(db, "pair-")
    assert len(decided) == 200 and set(decided.values()) == {1}
    waiting = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'job.waiting' AND convert_from(body, 'UTF8') LIKE '%pair-%'"
    )
    assert waiting == 200
