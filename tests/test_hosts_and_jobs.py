"""Hosts (ids, conflicts, paging, filters), jobs read from the gate's table, and the manual override."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import httpx

from services.api.schemas import HostView, Page
from shared.events import deterministic_event_id
from tests.conftest import EventCapture


async def test_host_id_may_be_given_and_conflicts_are_409(admin: httpx.AsyncClient) -> None:
    given = str(uuid.uuid4())
    created = await admin.post("/api/v1/hosts", json={"id": given, "name": "db-1", "group": "db"})
    assert created.status_code == 201 and created.json()["id"] == given
    same_id = await admin.post("/api/v1/hosts", json={"id": given, "name": "db-2", "group": "db"})
    same_name = await admin.post("/api/v1/hosts", json={"name": "db-1", "group": "other"})
    assert same_id.status_code == same_name.status_code == 409
    other = await admin.post("/api/v1/hosts", json={"name": "db-3", "group": "db"})
    renamed = await admin.put(f"/api/v1/hosts/{other.json()['id']}", json={"name": "db-1", "group": "db"})
    assert renamed.status_code == 409
    moved = await admin.put(f"/api/v1/hosts/{given}", json={"name": "db-1", "group": "archive"})
    assert moved.status_code == 200 and moved.json()["group"] == "archive"


async def test_host_list_pages_and_filters(admin: httpx.AsyncClient) -> None:
    for index in range(7):
        await admin.post(
            "/api/v1/hosts", json={"name": f"node-{index:02}", "group": "even" if index % 2 == 0 else "odd"}
        )
    names: list[str] = []
    cursor = None
    while True:
        page = (await admin.get("/api/v1/hosts", params={"limit": 3} | ({"cursor": cursor} if cursor else {}))).json()
        names += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == [f"node-{index:02}" for index in range(7)]
    first_page = await admin.get("/api/v1/hosts", params={"limit": 3})
    assert Page[HostView].model_validate_json(first_page.content).model_dump_json(exclude_unset=True) == first_page.text
    odd = (await admin.get("/api/v1/hosts", params={"group": "odd"})).json()
    assert [item["name"] for item in odd["items"]] == ["node-01", "node-03", "node-05"]
    assert (await admin.get("/api/v1/hosts", params={"health_check_status": "no_checks"})).json()["items"]


async def test_agent_url_stays_while_service_checks_need_it(admin: httpx.AsyncClient) -> None:
    host = (
        await admin.post("/api/v1/hosts", json={"name": "svc", "group": "g", "agent_url": "http://127.0.0.1:9"})
    ).json()
    await admin.post(
        f"/api/v1/hosts/{host['id']}/health-checks",
        json={"name": "cron", "check_type": "service", "service_name": "cron.service"},
    )
    refused = await admin.put(f"/api/v1/hosts/{host['id']}", json={"name": "svc", "group": "g"})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "agent_url"


async def _waiting_job(db: asyncpg.Connection, host_id: uuid.UUID, job_id: str) -> None:
    await db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at) VALUES ($1, $2, 'waiting_health_check', $3)",
        job_id,
        host_id,
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )


async def test_override_decides_once_and_is_audited(
    admin: httpx.AsyncClient, db: asyncpg.Connection, events: EventCapture
) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "patch-me", "group": "g"})).json()
    await admin.post(f"/api/v1/hosts/{host['id']}/health-checks", json={"name": "ssh", "check_type": "tcp", "port": 22})
    host_id = uuid.UUID(host["id"])
    await _waiting_job(db, host_id, "job-release")
    await _waiting_job(db, host_id, "job-fail")

    job = (await admin.get("/api/v1/jobs/job-release")).json()
    assert job["job_id"] == "job-release" and job["hosts"][0]["status"] == "waiting_health_check"

    url = f"/api/v1/jobs/job-release/hosts/{host_id}/override"
    released = await admin.post(url, json={"decision": "release", "reason": "checked by hand"})
    assert released.status_code == 200 and released.json()["status"] == "released"
    again = await admin.post(url, json={"decision": "fail", "reason": "too late"})
    assert again.status_code == 409

    failed = await admin.post(
        f"/api/v1/jobs/job-fail/hosts/{host_id}/override", json={"decision": "fail", "reason": "bad disk"}
    )
    assert failed.status_code == 200 and failed.json()["reason"] == "overridden"

    (release_event,) = await events.wait_for("job.released")
    assert (
        release_event.data["overridden_by"].startswith("admin-")
        and release_event.data["override_reason"] == "checked by hand"
    )
    assert release_event.correlation_id == "job-release"
    assert release_event.message_id == str(deterministic_event_id("job-decision", "job-release", str(host_id)))
    assert [check["name"] for check in release_event.data["checks"]] == ["ssh"]
    (fail_event,) = await events.wait_for("job.failed")
    assert fail_event.data["reason"] == "overridden" and "bad disk" in fail_event.data["detail"]

    audit = (await admin.get("/api/v1/audit")).json()["items"]
    overrides = [entry for entry in audit if entry["action"] == "job.override"]
    assert {entry["entity_id"] for entry in overrides} == {"job-release", "job-fail"}
    assert (
        await admin.post(f"/api/v1/jobs/nope/hosts/{host_id}/override", json={"decision": "fail", "reason": "x"})
    ).status_code == 404


async def test_job_list_newest_first_and_by_status(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "lister", "group": "g"})).json()
    for index in range(3):
        await _waiting_job(db, uuid.UUID(host["id"]), f"job-{index}")
    await db.execute("UPDATE gate_jobs SET status = 'released', decided_at = now() WHERE job_id = 'job-1'")
    listed = (await admin.get("/api/v1/jobs", params={"limit": 2})).json()
    assert [item["job_id"] for item in listed["items"]] == ["job-2", "job-1"]
    rest = (await admin.get("/api/v1/jobs", params={"limit": 2, "cursor": listed["next_cursor"]})).json()
    assert [item["job_id"] for item in rest["items"]] == ["job-0"] and rest["next_cursor"] is None
    waiting = (await admin.get("/api/v1/jobs", params={"status": "waiting_health_check"})).json()
    assert {item["job_id"] for item in waiting["items"]} == {"job-0", "job-2"}
