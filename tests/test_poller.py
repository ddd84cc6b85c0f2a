"""The poller against real peers: every outcome and reason of CONTRACT §4, streaks, events, the
scheduler with two pollers, a poller killed mid-batch, and a malformed tick."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from shared.events import ScheduledRun, Tick
from shared.topology import POLLER_TICK_QUEUE, Topology
from tests.support.blackhole import Blackhole, refused_port, unanswered_port
from tests.support.database import UNRESOLVABLE_NAME, set_columns
from tests.support.fake_agent import FakeAgent
from tests.support.messages import EventCapture
from tests.support.nginx import (
    BASIC_AUTH_PASSWORD,
    BASIC_AUTH_USER,
    BIG_EARLY_MARKER,
    BIG_LATE_MARKER,
    NginxServer,
)
from tests.support.processes import ServiceProcess, exclusive_poller, start_poller
from tests.support.services import BackingServices

pytestmark = pytest.mark.usefixtures("poller")


async def new_host(admin: httpx.AsyncClient, **fields: Any) -> str:
    body = {"name": f"host-{uuid.uuid4().hex[:8]}", "group": "poll"} | fields
    response = await admin.post("/api/v1/hosts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def create_check(admin: httpx.AsyncClient, host_id: str, **fields: Any) -> dict[str, Any]:
    body = {"name": f"check-{uuid.uuid4().hex[:6]}", "interval_seconds": 3600} | fields
    response = await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def run_now(admin: httpx.AsyncClient, check: dict[str, Any]) -> dict[str, Any]:
    response = await admin.post(f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}/test")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def check_once(admin: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    return await run_now(admin, await create_check(admin, await new_host(admin), **fields))


# ---- http -----------------------------------------------------------------------------------------


def http(url: str, **fields: Any) -> dict[str, Any]:
    return {"check_type": "http", "url": url} | fields


async def test_http_outcomes(admin: httpx.AsyncClient, db: asyncpg.Connection, nginx: NginxServer) -> None:
    cases: list[tuple[dict[str, Any], bool, str, str]] = [
        (http(nginx.http_url("/ok")), True, "ok", "200 OK"),
        (http(nginx.http_url("/ok"), method="HEAD"), True, "ok", "200"),
        (http(nginx.http_url("/status/503")), False, "status", "503 Service Unavailable, expected 2xx"),
        (http(nginx.http_url("/status/204"), expected_status="200,204"), True, "ok", "204"),
        (http(nginx.http_url("/status/301"), expected_status="3xx"), True, "ok", "301"),
        (http(nginx.http_url("/redirect")), False, "status", "302"),
        (http(nginx.http_url("/redirect-chain"), follow_redirects=True), True, "ok", "200"),
        (http(nginx.http_url("/redirect-loop"), follow_redirects=True), False, "status", "redirects"),
        (http(nginx.http_url("/big"), expected_body=BIG_EARLY_MARKER), True, "ok", BIG_EARLY_MARKER),
        (
            http(nginx.http_url("/big"), expected_body=BIG_LATE_MARKER),
            False,
            "body",
            f"does not contain '{BIG_LATE_MARKER}'",
        ),
        (http(nginx.http_url("/basic")), False, "status", "401"),
        (
            http(nginx.http_url("/basic"), basic_auth_user=BASIC_AUTH_USER, basic_auth_pass="wrong"),
            False,
            "status",
            "401",
        ),
        (
            http(nginx.http_url("/basic"), basic_auth_user=BASIC_AUTH_USER, basic_auth_pass=BASIC_AUTH_PASSWORD),
            True,
            "ok",
            "200",
        ),
        (http(nginx.https_url("/ok")), True, "ok", "200"),
        (http(nginx.https_url("/ok"), ignore_cert_errors=False), False, "tls", "certificate verify failed"),
        (
            http(nginx.https_url("/basic"), basic_auth_user=BASIC_AUTH_USER, basic_auth_pass=BASIC_AUTH_PASSWORD),
            True,
            "ok",
            "200",
        ),
        (http("http://169.254.169.254/latest/meta-data/"), False, "blocked", "169.254.0.0/16"),
        (http(nginx.http_url("/redirect-to-blocked"), follow_redirects=True), False, "blocked", "169.254.169.254"),
        (http(nginx.http_url("/redirect-to-blocked")), False, "status", "302"),
    ]
    results = await asyncio.gather(*(check_once(admin, **fields) for fields, *_ in cases))
    for (fields, healthy, reason, detail), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (healthy, reason), (fields, result)
        assert detail in result["detail"], (fields, result)
        assert result["latency_ms"] >= 0 and result["status"] == ("healthy" if healthy else "unhealthy")
    # A name that cannot resolve, without asking DNS (the API refuses it, so it is written into the row).
    unresolvable = await create_check(admin, await new_host(admin), **http("http://127.0.0.1/health"))
    await set_columns(db, unresolvable, url=f"http://{UNRESOLVABLE_NAME}/health")
    result = await run_now(admin, unresolvable)
    assert (result["healthy"], result["reason"]) == (False, "dns"), result
    assert f"cannot resolve {UNRESOLVABLE_NAME}" in result["detail"], result


async def test_http_connection_failures(admin: httpx.AsyncClient) -> None:
    with refused_port() as closed, Blackhole() as silent:
        refused = await check_once(admin, **http(f"http://127.0.0.1:{closed}/"))
        timed_out = await check_once(admin, **http(silent.url("/"), timeout_seconds=0.5))
    assert (refused["reason"], refused["detail"]) == ("connect", f"connection refused by 127.0.0.1:{closed}")
    assert (timed_out["reason"], timed_out["detail"]) == ("timeout", "timed out after 0.5 s")
    assert 450 <= timed_out["latency_ms"] < 3000


# ---- tcp ------------------------------------------------------------------------------------------


async def test_tcp_outcomes(admin: httpx.AsyncClient, db: asyncpg.Connection, nginx: NginxServer) -> None:
    host_id = await new_host(admin, name="127.0.0.1")
    other_host = await new_host(admin, name="127.0.0.2")
    with refused_port() as closed, unanswered_port() as unanswered:
        open_port = await run_now(admin, await create_check(admin, host_id, check_type="tcp", port=nginx.http_port))
        refused = await run_now(admin, await create_check(admin, host_id, check_type="tcp", port=closed))
        silent = await run_now(
            admin, await create_check(admin, host_id, check_type="tcp", port=unanswered, timeout_seconds=0.5)
        )
        unresolvable = await create_check(admin, host_id, check_type="tcp", port=80, address="127.0.0.1")
        await set_columns(db, unresolvable, address=UNRESOLVABLE_NAME)  # refused by the API; never looked up
        unknown = await run_now(admin, unresolvable)
        blocked = await run_now(
            admin, await create_check(admin, other_host, check_type="tcp", port=80, address="169.254.169.254")
        )
    assert (open_port["healthy"], open_port["reason"]) == (True, "ok")
    assert f"127.0.0.1:{nginx.http_port}" in open_port["detail"]  # the host's name is the default address
    assert (refused["reason"], refused["detail"]) == ("connect", f"connection refused by 127.0.0.1:{closed}")
    assert (silent["reason"], silent["detail"]) == ("timeout", "timed out after 0.5 s")
    assert unknown["reason"] == "dns" and f"cannot resolve {UNRESOLVABLE_NAME}" in unknown["detail"]
    assert blocked["reason"] == "blocked"


async def test_configured_blocked_networks_are_refused_before_any_packet(
    admin: httpx.AsyncClient, service_env: dict[str, str], tmp_path: Path, poller: ServiceProcess
) -> None:
    """HEALTHGATE_BLOCKED_NETWORKS reaches the poller's probes. That a name is judged by the address it resolves
    to, not by itself, is shown in process with names of the test's own (tests/unit/test_poller_probes.py):
    no name here is looked up in DNS."""
    blocking_loopback = {"HEALTHGATE_BLOCKED_NETWORKS": "127.0.0.0/8,::1/128,169.254.0.0/16"}
    with Blackhole() as target, exclusive_poller(poller, service_env, tmp_path / "poller.log", **blocking_loopback):
        host_id = await new_host(admin, name="127.0.0.1")
        tcp = await create_check(admin, host_id, check_type="tcp", port=target.port)
        web = await create_check(admin, host_id, check_type="http", url=f"http://127.0.0.1:{target.port}/")
        results = [await run_now(admin, check) for check in (tcp, web)]
        assert [(result["reason"], result["detail"]) for result in results] == [
            ("blocked", "127.0.0.1 is in a blocked network (127.0.0.0/8)")
        ] * 2
        assert target.accepted == 0


# ---- service --------------------------------------------------------------------------------------


async def test_service_outcomes(admin: httpx.AsyncClient, fake_agent: FakeAgent) -> None:
    fake_agent.services.update({
        "nginx.service": "healthy",
        "cron.service": "unhealthy",
        "gone.service": "status=404",
        "bad.service": "status=400",
        "broken.service": "status=500",
        "garbled.service": "bad_json",
        "stuck.service": "hang",
    })  # fmt: skip
    expected = {
        "nginx.service": (True, "ok", "nginx.service is active (running)"),
        "cron.service": (False, "status", "cron.service is failed (failed)"),
        "gone.service": (False, "agent", "agent answered 404"),
        "bad.service": (False, "agent", "agent answered 400"),
        "broken.service": (False, "agent", "agent answered 500"),
        "garbled.service": (False, "agent", "not JSON"),
        "stuck.service": (False, "timeout", "timed out after 0.5 s"),
    }
    checks = [
        await create_check(
            admin, await new_host(admin, agent_url=fake_agent.base_url),
            check_type="service", service_name=name, timeout_seconds=0.5,
        )
        for name in expected
    ]  # fmt: skip
    results = await asyncio.gather(*(run_now(admin, check) for check in checks))
    for name, result in zip(expected, results, strict=True):
        healthy, reason, detail = expected[name]
        assert (result["healthy"], result["reason"]) == (healthy, reason), (name, result)
        assert detail in result["detail"], (name, result)


async def test_service_check_over_mtls(
    admin: httpx.AsyncClient, mtls_agent: FakeAgent, service_env: dict[str, str], tmp_path: Path, poller: ServiceProcess
) -> None:
    mtls_agent.set("sshd.service", "healthy")
    host_id = await new_host(admin, agent_url=mtls_agent.base_url)
    check = await create_check(admin, host_id, check_type="service", service_name="sshd.service")
    # Without client certificates (the session's poller) the agent refuses; with them it answers.
    refused = await run_now(admin, check)
    assert not refused["healthy"] and refused["reason"] in ("tls", "connect")
    with exclusive_poller(poller, service_env, tmp_path / "poller.log", **mtls_agent.env()):
        result = await run_now(admin, check)
    assert (result["reason"], result["detail"]) == ("ok", "sshd.service is active (running)")
    assert any(subject == "CN=healthgate-poller" for _, subject in mtls_agent.requests_for("sshd.service"))


# ---- state, streaks, events -----------------------------------------------------------------------


async def test_streak_thresholds_and_status_events(
    admin: httpx.AsyncClient, fake_agent: FakeAgent, events: EventCapture, db: asyncpg.Connection
) -> None:
    fake_agent.set("app.service", "healthy")
    host_id = await new_host(admin, agent_url=fake_agent.base_url)
    # Only the test's own runs may count: the check is taken off the schedule before its first run
    # (due within 5 s of its creation), which would otherwise land somewhere in the sequence below.
    for _ in range(5):
        check = await create_check(
            admin, host_id, check_type="service", service_name="app.service",
            failures_before_unhealthy=3, successes_before_healthy=2,
        )  # fmt: skip
        unscheduled = await db.execute(
            "UPDATE check_schedule SET next_run_at = NULL WHERE check_id = $1"
            " AND NOT EXISTS (SELECT 1 FROM check_results WHERE check_id = $1)",
            uuid.UUID(check["id"]),
        )
        if unscheduled == "UPDATE 1":
            break
        await admin.delete(f"/api/v1/hosts/{host_id}/health-checks/{check['id']}")  # it ran first: again

    async def run(behaviour: str) -> str:
        fake_agent.set("app.service", behaviour)
        await run_now(admin, check)
        return str((await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{check['id']}")).json()["status"])

    assert await run("healthy") == "healthy"  # the first result sets the status directly
    assert [await run("unhealthy") for _ in range(3)] == ["healthy", "healthy", "unhealthy"]
    assert [await run("healthy") for _ in range(2)] == ["unhealthy", "healthy"]
    assert await run("unhealthy") == "healthy"
    state = await db.fetchrow(
        "SELECT consecutive_failures, consecutive_successes FROM check_state WHERE check_id = $1",
        uuid.UUID(check["id"]),
    )
    assert (state["consecutive_failures"], state["consecutive_successes"]) == (1, 0)  # persisted, so a restart keeps it

    changes = await events.wait_for(
        "check.status_changed", lambda event: event.data["check_id"] == check["id"], count=3
    )
    assert [(event.data["previous"], event.data["current"]) for event in changes] == [
        ("unknown", "healthy"),
        ("healthy", "unhealthy"),
        ("unhealthy", "healthy"),
    ]
    host_changes = await events.wait_for("host.status_changed", lambda event: event.data["host_id"] == host_id, count=4)
    assert [event.data["current"] for event in host_changes] == ["unknown", "healthy", "unhealthy", "healthy"]
    results = await events.wait_for("check.result", lambda event: event.data["check_id"] == check["id"], count=7)
    assert [event.data["status"] for event in results][:4] == ["healthy", "healthy", "healthy", "unhealthy"]
    listed = (await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{check['id']}/results")).json()["items"]
    assert len(listed) == 7 and listed[0]["healthy"] is False


# ---- scheduling -----------------------------------------------------------------------------------


async def run_times(db: asyncpg.Connection, check: dict[str, Any]) -> list[dt.datetime]:
    """When the check's results were taken, oldest first."""
    rows = await db.fetch(
        "SELECT checked_at FROM check_results WHERE check_id = $1 ORDER BY checked_at", uuid.UUID(check["id"])
    )
    return [row["checked_at"] for row in rows]


@pytest.mark.slow
async def test_two_pollers_run_each_check_once_per_interval(
    admin: httpx.AsyncClient, nginx: NginxServer, db: asyncpg.Connection, service_env: dict[str, str], tmp_path: Path
) -> None:
    second = start_poller(service_env, tmp_path / "second.log")
    try:
        host_id = await new_host(admin)
        other = await new_host(admin)
        checks = [
            await create_check(admin, host, check_type="http", url=nginx.http_url("/ok"), interval_seconds=10)
            for host in (host_id, other) for _ in range(5)
        ]  # fmt: skip
        # Until every check has run twice (a first run, then one interval) within the 24 s the checks below allow,
        # and a little longer: a run the other poller took too would come within a scheduling pass or two.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 24
        while loop.time() < deadline and any([len(await run_times(db, check)) < 2 for check in checks]):
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, min(3.0, deadline - loop.time())))
    finally:
        second.stop()
    for check in checks:
        times = await run_times(db, check)
        assert 2 <= len(times) <= 3, (check["name"], times)
        gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
        assert all(9 <= gap <= 11.5 for gap in gaps), gaps
        assert (times[0] - dt.datetime.fromisoformat(check["created_at"])).total_seconds() <= 5.5


# ---- crash safety and poison ticks ----------------------------------------------------------------


@pytest.fixture
async def tick_channel(backing: BackingServices, exchange_name: str) -> AsyncIterator[aio_pika.abc.AbstractExchange]:
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await channel.get_exchange(exchange_name)


async def publish_tick(exchange: aio_pika.abc.AbstractExchange, body: bytes) -> None:
    message = aio_pika.Message(body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await exchange.publish(message, POLLER_TICK_QUEUE.bindings[0])


async def unscheduled_service_checks(db: asyncpg.Connection, agent: FakeAgent, count: int) -> list[uuid.UUID]:
    """Checks the scheduler leaves alone (no schedule row), so only the test's ticks run them."""
    host_id = uuid.uuid4()
    await db.execute(
        'INSERT INTO hosts (id, name, "group", agent_url) VALUES ($1, $2, $3, $4)',
        host_id, f"crash-{host_id.hex[:6]}", "poll", agent.base_url,
    )  # fmt: skip
    check_ids = [uuid.uuid4() for _ in range(count)]
    for index, check_id in enumerate(check_ids):
        await db.execute(
            """
            INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, service_name)
            VALUES ($1, $2, $3, 'service', 3600, 10, $4)
            """,
            check_id, host_id, f"svc-{index}", f"unit{index}.service",
        )  # fmt: skip
        await db.execute("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", check_id, host_id)
        agent.set(f"unit{index}.service", "slow=2:healthy")
    return check_ids


@pytest.mark.slow
async def test_poller_killed_mid_batch_loses_no_tick_and_writes_no_duplicate(
    db: asyncpg.Connection,
    fake_agent: FakeAgent,
    tick_channel: aio_pika.abc.AbstractExchange,
    service_env: dict[str, str],
    tmp_path: Path,
    poller: ServiceProcess,
) -> None:
    poller.stop()  # only the pollers of this test may take the tick
    try:
        check_ids = await unscheduled_service_checks(db, fake_agent, 20)
        slot = dt.datetime.now(dt.UTC).replace(microsecond=0)
        tick = (
            Tick(runs=[ScheduledRun(check_id=check_id, slot=slot) for check_id in check_ids]).model_dump_json().encode()
        )
        victim = start_poller(service_env, tmp_path / "victim.log")
        await publish_tick(tick_channel, tick)
        async with asyncio.timeout(20):
            while len(fake_agent.request_log()) < 20:  # every check is running, none has answered yet
                await asyncio.sleep(0.05)
        victim.stop(signal.SIGKILL)
        assert await db.fetchval("SELECT count(*) FROM check_results WHERE check_id = ANY($1)", check_ids) == 0

        survivor = start_poller(service_env, tmp_path / "survivor.log")
        try:
            await publish_tick(tick_channel, tick)  # and the same tick once more, as a duplicate delivery would
            async with asyncio.timeout(30):
                while len(fake_agent.request_log()) < 60:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)
        finally:
            survivor.stop()
        rows = await db.fetch(
            "SELECT check_id, count(*) AS results FROM check_results WHERE check_id = ANY($1) GROUP BY check_id",
            check_ids,
        )
        assert {row["check_id"]: row["results"] for row in rows} == dict.fromkeys(check_ids, 1)
        slots = await db.fetch("SELECT last_slot FROM check_state WHERE check_id = ANY($1)", check_ids)
        assert {row["last_slot"] for row in slots} == {slot}
    finally:
        poller.restart()


async def test_malformed_tick_is_dead_lettered_and_the_worker_goes_on(
    db: asyncpg.Connection,
    fake_agent: FakeAgent,
    tick_channel: aio_pika.abc.AbstractExchange,
    backing: BackingServices,
    exchange_name: str,
) -> None:
    marker = uuid.uuid4().hex
    await publish_tick(tick_channel, f'{{"not": "a tick", "marker": "{marker}"}}'.encode())
    (check_id,) = await unscheduled_service_checks(db, fake_agent, 1)
    fake_agent.set("unit0.service", "healthy")
    await publish_tick(tick_channel, Tick(runs=[ScheduledRun(check_id=check_id)]).model_dump_json().encode())
    async with asyncio.timeout(15):
        while not await db.fetchval("SELECT count(*) FROM check_results WHERE check_id = $1", check_id):
            await asyncio.sleep(0.1)
    dead = await _find_dead_letter(backing.amqp_url, Topology(exchange_name).dead_letter_queue, marker)
    assert dead.routing_key == POLLER_TICK_QUEUE.bindings[0]


async def _find_dead_letter(amqp_url: str, queue_name: str, marker: str) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        async with asyncio.timeout(10):
            while True:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                if marker.encode() in message.body:
                    await message.ack()
                    return message
                await message.nack(requeue=True)
