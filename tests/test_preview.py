"""The gate's preview, `POST /api/v1/gate/preview` (CONTRACT §6 "Preview (before a deployment)"), against the real
API, gate, poller, broker and database: the preview agrees with what the gate then decides for the same hosts, counts
the previewed hosts against a budget in the order given (after the job hosts already waiting), answers hosts outside
the caller's groups exactly as unknown ones (HEALTHGATE_GATE_UNKNOWN_HOST, read by the API too), creates nothing, and
refuses a bad request with one 422 naming every problem."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.fake_agent import FakeAgent
from tests.support.messages import CapturedEvent, EventCapture, Publisher
from tests.support.processes import free_port, start_service
from tests.support.tokens import TokenFactory
from tests.test_budget import group_name, make_hosts, set_policy
from tests.test_gate import host_with_checks, run_checks

pytestmark = pytest.mark.usefixtures("poller", "gate")

PREVIEW = "/api/v1/gate/preview"
GATE_VERDICTS = {"job.released": "release", "job.waiting": "wait", "job.failed": "fail"}


async def preview(client: httpx.AsyncClient, host_ids: list[str], **body: Any) -> list[dict[str, Any]]:
    response = await client.post(PREVIEW, json={"host_ids": host_ids} | body)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    assert [item["host_id"] for item in items] == host_ids
    return items


def of_job_host(job_id: str, host_id: str) -> Any:
    return lambda event: event.data["job_id"] == job_id and event.data["host_id"] == host_id


async def first_verdict(events: EventCapture, job_id: str, host_id: str, timeout: float = 15) -> CapturedEvent:
    """The gate's first answer to the job.start of `host_id`: job.released, job.waiting or job.failed."""
    async with asyncio.timeout(timeout):
        while True:
            found = [event for key in GATE_VERDICTS for event in events.matching(key, of_job_host(job_id, host_id))]
            if found:
                return found[0]
            events.arrived.clear()
            await events.arrived.wait()


async def gate_answer(events: EventCapture, db: asyncpg.Connection, job_id: str, host_id: str) -> dict[str, Any]:
    """What the gate answered the job host, in the preview's terms: verdict, waiting_for, and the detail and checks
    (id, name, healthy) it stored with the job host."""
    event = await first_verdict(events, job_id, host_id)
    row = await db.fetchrow(
        "SELECT detail, checks FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_id, uuid.UUID(host_id)
    )
    assert row is not None
    checks = json.loads(row["checks"]) if isinstance(row["checks"], str) else row["checks"]
    return {
        "verdict": GATE_VERDICTS[event.routing_key],
        "waiting_for": event.data.get("waiting_for", []),
        "reason": event.data.get("reason"),
        "detail": row["detail"],
        "checks": [(check["check_id"], check["name"], check["healthy"]) for check in checks or []],
    }


def previewed(item: dict[str, Any]) -> dict[str, Any]:
    """A preview item in the terms of `gate_answer` (its reason is in its detail: the gate's words)."""
    return {
        "verdict": item["verdict"],
        "waiting_for": item["waiting_for"],
        "detail": item["detail"],
        "checks": [(check["check_id"], check["name"], check["healthy"]) for check in item["checks"]],
    }


def without_ages(detail: str) -> str:
    """A detail with how long checks have been healthy left out: the preview and the gate judge moments apart."""
    return re.sub(r"healthy for \d+ s", "healthy for N s", detail)


async def service_host(
    admin: httpx.AsyncClient, fake_agent: FakeAgent, group: str, name: str, behaviour: str
) -> tuple[str, list[dict[str, Any]]]:
    """A host of `group` with one critical service check on the fake agent, set to `behaviour` and run once."""
    service = f"{name}.service"
    fake_agent.set(service, behaviour)
    made = await host_with_checks(
        admin, [{"check_type": "service", "service_name": service}], name=name, group=group,
        agent_url=fake_agent.base_url,
    )  # fmt: skip
    await run_checks(admin, made[1])
    return made


async def gate_state(db: asyncpg.Connection) -> dict[str, Any]:
    """What a preview must not change: the job hosts, the jobs, the job events in the outbox, the re-runs the gate
    asked the pollers for (check_schedule.rerun_requested_at: only the gate's evaluations write it), the audit log."""
    return {
        "gate_jobs": await db.fetch(
            "SELECT job_id, host_id, status, waiting_for, detail, next_retry_at FROM gate_jobs ORDER BY 1, 2"
        ),
        "jobs": await db.fetchval("SELECT count(*) FROM jobs"),
        "outbox": await db.fetchval("SELECT count(*) FROM outbox WHERE routing_key LIKE 'job.%'"),
        "check_schedule": await db.fetch("SELECT check_id, rerun_requested_at FROM check_schedule ORDER BY check_id"),
        "audit": await db.fetchval("SELECT count(*) FROM audit_log"),
    }


# ---- the preview agrees with the gate -------------------------------------------------------------------


async def test_the_preview_agrees_with_what_the_gate_then_decides(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    plain, strict, steady, tight = (group_name() for _ in range(4))
    ok, _ = await service_host(admin, fake_agent, plain, f"{plain}-ok", "healthy")
    sick, _ = await service_host(admin, fake_agent, plain, f"{plain}-sick", "unhealthy")
    bare, _ = await host_with_checks(admin, [], name=f"{strict}-bare", group=strict)
    fresh, _ = await service_host(admin, fake_agent, steady, f"{steady}-fresh", "healthy")
    down, _ = await service_host(admin, fake_agent, tight, f"{tight}-down", "unhealthy")
    spare, _ = await service_host(admin, fake_agent, tight, f"{tight}-spare", "healthy")
    await set_policy(db, strict, no_checks="fail")
    await set_policy(db, steady, stable_seconds=3600)
    await set_policy(db, tight, max_unavailable=1)
    unknown = str(uuid.uuid4())
    hosts = [ok, sick, bare, fresh, down, spare, unknown]

    items = await preview(admin, hosts)
    expected = {
        ok: ("release", []), sick: ("wait", ["checks"]), bare: ("fail", []), fresh: ("wait", ["stability"]),
        down: ("wait", ["checks"]), spare: ("wait", ["budget"]), unknown: ("release", []),
    }  # fmt: skip
    assert {item["host_id"]: (item["verdict"], item["waiting_for"]) for item in items} == expected
    by_host = {item["host_id"]: item for item in items}
    assert "no_checks: fail" in by_host[bare]["detail"]
    assert by_host[spare]["detail"] == (
        f"waiting for the disruption budget of group {tight}: 1 of 1 unavailable: {tight}-down (unhealthy)"
    )
    assert by_host[unknown] == {
        "host_id": unknown, "verdict": "release", "waiting_for": [], "detail": "no gating checks on this host",
        "checks": [],
    }  # fmt: skip

    job = f"agree-{uuid.uuid4().hex[:6]}"
    for host_id in hosts:
        await jobs.start(job, host_id, window_seconds=600)
    for item in items:
        gate = await gate_answer(events, db, job, item["host_id"])
        assert gate["reason"] == ("no_checks" if item["host_id"] == bare else None)
        del gate["reason"]
        mine = previewed(item)
        mine["detail"], gate["detail"] = without_ages(mine["detail"]), without_ages(gate["detail"])
        assert mine == gate, item["host_id"]


async def test_the_budget_is_counted_in_the_order_given(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    group = group_name()
    hosts = [(await service_host(admin, fake_agent, group, f"{group}-{index}", "healthy"))[0] for index in range(1, 5)]
    await set_policy(db, group, max_unavailable=2)

    items = await preview(admin, hosts)
    assert [(item["verdict"], item["waiting_for"]) for item in items] == [
        ("release", []), ("release", []), ("wait", ["budget"]), ("wait", ["budget"]),
    ]  # fmt: skip
    assert items[0]["detail"] == (
        f"all gating checks healthy; disruption budget of group {group}: 1 of 2 unavailable with this host"
    )
    assert items[1]["detail"].endswith("2 of 2 unavailable with this host")
    for item in items[2:]:
        assert item["detail"] == (
            f"waiting for the disruption budget of group {group}: 2 of 2 unavailable: "
            f"{group}-1 (released earlier in this preview), {group}-2 (released earlier in this preview)"
        )
    # The order is the caller's: reversed, the last two are released.
    reversed_items = await preview(admin, hosts[::-1])
    assert [item["verdict"] for item in reversed_items] == ["release", "release", "wait", "wait"]

    # The gate, given the job.starts in that order (each answered before the next is sent), decides alike.
    job = f"order-{uuid.uuid4().hex[:6]}"
    for host_id, item in zip(hosts, items, strict=True):
        await jobs.start(job, host_id, window_seconds=600)
        gate = await gate_answer(events, db, job, host_id)
        assert (gate["verdict"], gate["waiting_for"]) == (item["verdict"], item["waiting_for"])

    # Now the first two are in patch: a preview of the third finds the budget held by them, and says what the gate
    # says to it, word for word.
    (third,) = await preview(admin, hosts[2:3])
    stored = await db.fetchval("SELECT detail FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job,
                               uuid.UUID(hosts[2]))  # fmt: skip
    assert third["verdict"] == "wait" and third["waiting_for"] == ["budget"]
    assert (
        third["detail"]
        == stored
        == (
            f"waiting for the disruption budget of group {group}: 2 of 2 unavailable: "
            f"{group}-1 (job {job} patching), {group}-2 (job {job} patching)"
        )
    )


async def test_job_hosts_already_waiting_come_first_and_nothing_is_created(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, db: asyncpg.Connection,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    """A job host already waiting in the group and ready is released by the gate's pass ahead of a new job.start:
    the preview judges it first too, and leaves it waiting (it creates, changes and publishes nothing)."""
    group = group_name()
    (first, _), (second, _) = await make_hosts(admin, group, 2)  # no checks: ready at once
    sick, _ = await service_host(admin, fake_agent, group_name(), "preview-sick", "unhealthy")
    await set_policy(db, group, max_unavailable=1)
    # A job host that came before, waiting and ready, that no pass has judged yet (no timer is due: none runs).
    earlier = f"earlier-{uuid.uuid4().hex[:6]}"
    await db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at) "
        "VALUES ($1, $2, 'waiting_health_check', now() + interval '10 minutes', clock_timestamp())",
        earlier,
        uuid.UUID(first),
    )
    before = await gate_state(db)

    items = await preview(admin, [second, first, sick])
    assert [(item["verdict"], item["waiting_for"]) for item in items] == [
        ("wait", ["budget"]), ("release", []), ("wait", ["checks"]),
    ]  # fmt: skip
    assert items[0]["detail"] == (
        f"waiting for the disruption budget of group {group}: 1 of 1 unavailable: {group}-1 (job {earlier} patching)"
    )
    # A second job on a host in patch takes no second unit.
    assert items[1]["detail"].endswith(f"disruption budget of group {group}: 1 of 1 unavailable with this host")
    for at in (None, (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=20)).isoformat()):
        await preview(admin, [second, first, sick], **({"at": at} if at else {}))
    assert await gate_state(db) == before
    ours = {first, second, sick}
    assert [event for key in GATE_VERDICTS for event in events.matching(key) if event.data["host_id"] in ours] == []

    job = f"later-{uuid.uuid4().hex[:6]}"
    await jobs.start(job, second, window_seconds=600)
    assert (await first_verdict(events, earlier, first)).routing_key == "job.released"
    gate = await gate_answer(events, db, job, second)
    assert (gate["verdict"], gate["waiting_for"], gate["detail"]) == ("wait", ["budget"], items[0]["detail"])


async def test_at_judges_the_current_state_at_that_moment(admin: httpx.AsyncClient, fake_agent: FakeAgent) -> None:
    host_id, _ = await service_host(admin, fake_agent, group_name(), f"at-{uuid.uuid4().hex[:6]}", "healthy")
    (now,) = await preview(admin, [host_id])
    assert now["verdict"] == "release"
    # Two hours on, its last result (an hour's interval) is stale: a job.start then would wait for its checks.
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).astimezone(dt.timezone(dt.timedelta(hours=-5)))
    (then,) = await preview(admin, [host_id], at=later.isoformat())
    assert (then["verdict"], then["waiting_for"]) == ("wait", ["checks"])
    assert then["detail"] == "waiting for checks: check-0"


# ---- scoping ---------------------------------------------------------------------------------------------


async def test_hosts_outside_the_callers_groups_are_answered_as_unknown(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, make_token: TokenFactory, fake_agent: FakeAgent,
    service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    mine_group, their_group = group_name(), group_name()
    mine, _ = await service_host(admin, fake_agent, mine_group, f"{mine_group}-1", "healthy")
    theirs, _ = await service_host(admin, fake_agent, their_group, f"{their_group}-1", "unhealthy")
    unknown = str(uuid.uuid4())
    (as_admin,) = await preview(admin, [theirs])
    assert as_admin["verdict"] == "wait" and as_admin["checks"]

    for role in ("operator", "viewer"):
        token = await make_token(role, (mine_group,))
        caller = httpx.AsyncClient(base_url=str(client.base_url), headers={"Authorization": f"Bearer {token}"})
        async with caller:
            items = await preview(caller, [mine, theirs, unknown])
        assert items[0]["verdict"] == "release" and items[0]["checks"]
        hidden, unseen = items[1], items[2]
        assert hidden == unseen | {"host_id": theirs}, role
        assert hidden == {
            "host_id": theirs, "verdict": "release", "waiting_for": [], "detail": "no gating checks on this host",
            "checks": [],
        }  # fmt: skip

    # With HEALTHGATE_GATE_UNKNOWN_HOST=fail (the gate's setting, which the API reads too), both fail alike.
    port = free_port()
    api = start_service(
        "api", service_env | {"HEALTHGATE_API_PORT": str(port), "HEALTHGATE_GATE_UNKNOWN_HOST": "fail"},
        tmp_path / "api.log", port=port,
    )  # fmt: skip
    try:
        token = await make_token("operator", (mine_group,))
        async with httpx.AsyncClient(base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}) as caller:
            items = await preview(caller, [theirs, unknown, mine])
    finally:
        api.stop()
    for item in items[:2]:
        assert item == {
            "host_id": item["host_id"], "verdict": "fail", "waiting_for": [], "checks": [],
            "detail": f"host {item['host_id']} is not known to healthgate, and unknown hosts are failed "
            "(HEALTHGATE_GATE_UNKNOWN_HOST=fail)",
        }  # fmt: skip
    assert items[2]["verdict"] == "release"


# ---- bad requests ----------------------------------------------------------------------------------------


async def test_bad_requests_are_refused_naming_every_problem(
    admin: httpx.AsyncClient, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    host = str(uuid.uuid4())

    async def problems(body: Any) -> list[dict[str, str]]:
        response = await admin.post(PREVIEW, json=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        errors: list[dict[str, str]] = response.json()["errors"]
        return errors

    errors = await problems({"host_ids": [host, "not-a-uuid", host.upper()], "at": "2030-01-01T00:00:00"})
    assert {error["field"] for error in errors} == {"host_ids.1", "host_ids.2", "at"}
    assert any("given twice: also at host_ids.0" in error["message"] for error in errors)
    errors = await problems({"host_ids": [str(uuid.uuid4()) for _ in range(1001)], "at": "yesterday"})
    assert {error["field"] for error in errors} == {"host_ids", "at"}
    assert [error["field"] for error in await problems({"host_ids": []})] == ["host_ids"]
    assert [error["field"] for error in await problems({})] == ["host_ids"]
    assert [error["field"] for error in await problems({"host_ids": [host], "job_id": "x"})] == ["job_id"]
    assert [error["field"] for error in await problems({"host_ids": [host], "at": 1893456000})] == ["at"]
    assert [error["field"] for error in await problems(
        {"host_ids": [host], "at": "9999-12-31T23:59:59-14:00"}
    )] == ["at"]  # fmt: skip
    assert [error["field"] for error in await problems([host])] == ["body"]

    assert (await admin.post(PREVIEW, content=b"{not json")).status_code == 400
    assert (await client.post(PREVIEW, json={"host_ids": [host]}, headers={"Authorization": ""})).status_code == 401
    # 1000 is allowed.
    assert len(await preview(admin, [str(uuid.uuid4()) for _ in range(1000)])) == 1000
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 0


async def test_no_at_closes_the_previewed_window(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """A preview has no window, so no `at` closes one, not even the largest instant (the window was once taken as
    that instant, and a job.start previewed there or within a release cutoff of it failed window_closed)."""
    plain, cutoff = group_name(), group_name()
    ((plain_host, _),) = await make_hosts(admin, plain, 1)
    ((cutoff_host, _),) = await make_hosts(admin, cutoff, 1)
    await set_policy(db, cutoff, release_cutoff_seconds=86400)
    for at in ("9999-12-31T23:59:59.999999Z", "9999-12-31T12:00:00+00:00"):
        items = await preview(admin, [plain_host, cutoff_host], at=at)
        assert [(item["verdict"], item["detail"]) for item in items] == [
            ("release", "no gating checks on this host")
        ] * 2, at
