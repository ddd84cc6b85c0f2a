"""Hosts (ids, conflicts, paging, filters), jobs read from the gate's table, and the manual override."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import httpx
import pytest

from services.api.schemas import HostView, Page
from shared.events import deterministic_event_id
from tests.support.messages import EventCapture
from tests.support.processes import ServiceProcess, start_gate
from tests.support.services import BackingServices


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
    named = (await admin.get("/api/v1/hosts", params={"name": "node-03"})).json()
    assert [item["name"] for item in named["items"]] == ["node-03"] and named["next_cursor"] is None
    assert (await admin.get("/api/v1/hosts", params={"name": "node-3"})).json()["items"] == []
    assert (await admin.get("/api/v1/hosts", params={"name": "node-03", "group": "even"})).json()["items"] == []
    assert (await admin.get("/api/v1/hosts", params={"name": " "})).status_code == 422


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
    ssh = {"name": "ssh", "check_type": "tcp", "port": 22, "address": "127.0.0.1"}  # not "patch-me": no DNS
    await admin.post(f"/api/v1/hosts/{host['id']}/health-checks", json=ssh)
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


# ---- job ids in paths (CONTRACT §3: "A job_id in a path is percent-encoded: every job id works") ----------------

ID_HOST = "5f1c0d7e-0b0b-4c4c-8d8d-000000000042"  # a host id inside a job id, see below
# Each job id with its path segment exactly as a client sends it (urllib.parse.quote(job_id, safe="")), checked
# against what httpx puts on the wire: httpx keeps a percent-encoded path as it is.
ENCODED_JOB_IDS = {
    "deploy/2026/42": "deploy%2F2026%2F42",
    "a b": "a%20b",
    "x#y": "x%23y",
    "what?": "what%3F",
    "100%": "100%25",
    "déploiement-ü-日本": "d%C3%A9ploiement-%C3%BC-%E6%97%A5%E6%9C%AC",
    f"rollout/hosts/{ID_HOST}/override": f"rollout%2Fhosts%2F{ID_HOST}%2Foverride",
    "a%2Fb": "a%252Fb",  # an id that looks encoded is decoded once, not twice
    "..": "%2E%2E",  # quote() leaves dots: a client must encode a dot-segment id or it resolves it away
    "semi;colon&plus+=": "semi%3Bcolon%26plus%2B%3D",
    "j" * 200: "j" * 200,
}


def job_path(job_id: str) -> str:
    return "/api/v1/jobs/" + ENCODED_JOB_IDS[job_id]


def test_the_encoded_ids_are_what_quote_gives() -> None:
    for job_id, encoded in ENCODED_JOB_IDS.items():
        if job_id != "..":
            assert quote(job_id, safe="") == encoded


@pytest.mark.parametrize("job_id", list(ENCODED_JOB_IDS), ids=lambda job_id: job_id[:30])
async def test_every_job_id_works_in_the_paths(
    admin: httpx.AsyncClient, db: asyncpg.Connection, events: EventCapture, job_id: str
) -> None:
    first = uuid.UUID((await admin.post("/api/v1/hosts", json={"name": "first", "group": "g"})).json()["id"])
    second = uuid.UUID((await admin.post("/api/v1/hosts", json={"name": "second", "group": "g"})).json()["id"])
    await _waiting_job(db, first, job_id)
    await _waiting_job(db, second, job_id)

    shown = await admin.get(job_path(job_id))
    assert shown.request.url.raw_path == job_path(job_id).encode()  # what went on the wire
    assert shown.status_code == 200, shown.text
    assert shown.json()["job_id"] == job_id
    assert [host["status"] for host in shown.json()["hosts"]] == ["waiting_health_check"] * 2

    release = f"{job_path(job_id)}/hosts/{first}/override"
    released = await admin.post(release, json={"decision": "release", "reason": "checked by hand"})
    assert released.status_code == 200, released.text
    assert released.json()["status"] == "released"
    again = await admin.post(release, json={"decision": "fail", "reason": "too late"})
    assert again.status_code == 409 and again.headers["content-type"] == "application/problem+json"
    failed = await admin.post(
        f"{job_path(job_id)}/hosts/{second}/override", json={"decision": "fail", "reason": "bad disk"}
    )
    assert failed.status_code == 200 and failed.json()["reason"] == "overridden", failed.text

    statuses = {host["host_id"]: host["status"] for host in (await admin.get(job_path(job_id))).json()["hosts"]}
    assert statuses == {str(first): "released", str(second): "failed"}
    stored = await db.fetch("SELECT job_id, status FROM gate_jobs ORDER BY status DESC")
    assert [tuple(row) for row in stored] == [(job_id, "released"), (job_id, "failed")]
    (event,) = await events.wait_for("job.released")
    assert event.data["job_id"] == job_id and event.correlation_id == job_id
    audit = (await admin.get("/api/v1/audit")).json()["items"]
    assert {entry["entity_id"] for entry in audit if entry["action"] == "job.override"} == {job_id}
    listed = (await admin.get("/api/v1/jobs", params={"host_id": str(first)})).json()["items"]
    assert [(item["job_id"], item["status"]) for item in listed] == [(job_id, "released")]


async def test_a_job_id_that_ends_like_an_override_path_is_one_job(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Job "x/hosts/<H>/override" and job "x" on host H: each path names exactly one of them."""
    host_id = uuid.UUID(
        (await admin.post("/api/v1/hosts", json={"id": ID_HOST, "name": "h", "group": "g"})).json()["id"]
    )
    tricky = f"x/hosts/{host_id}/override"
    await _waiting_job(db, host_id, tricky)
    await _waiting_job(db, host_id, "x")
    tricky_path = f"/api/v1/jobs/x%2Fhosts%2F{host_id}%2Foverride"

    shown = await admin.get(tricky_path)
    assert shown.status_code == 200 and shown.json()["job_id"] == tricky
    # POSTing to the tricky job's own path is not an override of job "x": that path has only GET
    posted = await admin.post(tricky_path, json={"decision": "release", "reason": "r"})
    assert posted.status_code == 405 and posted.headers["content-type"] == "application/problem+json"
    # the unencoded form is the override of job "x" (as the contract says, a job id in a path is encoded)
    assert (await admin.get(f"/api/v1/jobs/x/hosts/{host_id}/override")).status_code == 405
    overridden = await admin.post(
        f"{tricky_path}/hosts/{host_id}/override", json={"decision": "fail", "reason": "the tricky one"}
    )
    assert overridden.status_code == 200, overridden.text
    stored = dict(await db.fetch("SELECT job_id, status FROM gate_jobs"))  # type: ignore[arg-type]
    assert stored == {tricky: "failed", "x": "waiting_health_check"}


async def test_job_ids_that_cannot_exist_in_a_path(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    """An id that no job has (NUL, too long, control characters: looked up by the key the gate would have stored
    it under, and not found) or that is not UTF-8 → 404; a bad host id → 422; all RFC 9457 problems.
    tests/test_invalid_job_ids.py finds such ids once the gate has answered them."""
    host_id = uuid.UUID((await admin.post("/api/v1/hosts", json={"name": "h", "group": "g"})).json()["id"])
    await _waiting_job(db, host_id, "deploy/2026/42")
    decision = {"decision": "release", "reason": "r"}

    def problem(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        body: dict[str, Any] = response.json()
        assert body["status"] == status and body["detail"]
        return body

    for segment in (
        "a%00b",  # NUL: no job.start with this id was answered
        "j" * 201,  # longer than any valid job id
        "a%01b",  # control characters: the gate stores such an id only when it answered it
        "%FF",  # not UTF-8 once decoded
        "deploy",
        "nope",
    ):
        problem(await admin.get(f"/api/v1/jobs/{segment}"), 404)
        problem(await admin.post(f"/api/v1/jobs/{segment}/hosts/{host_id}/override", json=decision), 404)
    # a `/` sent unencoded is a separator: these paths name no job and no override
    problem(await admin.get("/api/v1/jobs/deploy/2026/42"), 404)
    problem(await admin.post(f"/api/v1/jobs/deploy/2026/42/hosts/{host_id}/override", json=decision), 404)
    body = problem(await admin.post("/api/v1/jobs/deploy%2F2026%2F42/hosts/not-a-uuid/override", json=decision), 422)
    assert [error["field"] for error in body["errors"]] == ["path.host_id"]
    body = problem(await admin.post("/api/v1/jobs/deploy%2F2026%2F42/hosts/%FF/override", json=decision), 404)
    assert await db.fetchval("SELECT status FROM gate_jobs") == "waiting_health_check"


@pytest.fixture
def own_gate(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    """A gate for this test alone: the session's `gate` would stay up and decide the waiting jobs that later
    tests of other files insert by hand, depending on the order the files run in."""
    gate = start_gate(service_env, tmp_path / "gate.log")
    try:
        yield gate
    finally:
        gate.stop()


async def test_jobs_started_through_the_gate_are_reached_by_their_encoded_id(
    admin: httpx.AsyncClient, backing: BackingServices, exchange_name: str, own_gate: ServiceProcess
) -> None:
    host_id = (await admin.post("/api/v1/hosts", json={"name": "no-checks", "group": "g"})).json()["id"]
    job_ids = ["deploy/2026/42", "déploiement-ü-日本", f"rollout/hosts/{ID_HOST}/override"]
    window = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name)
        for job_id in job_ids:
            body = {"job_id": job_id, "host_id": host_id, "window_ends_at": window}
            await exchange.publish(aio_pika.Message(json.dumps(body).encode()), "job.start")
    for job_id in job_ids:
        async with asyncio.timeout(15):  # a host without checks is released at once (CONTRACT §5)
            while True:
                response = await admin.get(job_path(job_id))
                assert response.status_code in (200, 404), response.text
                if response.status_code == 200 and response.json()["hosts"][0]["status"] != "waiting_health_check":
                    break
                await asyncio.sleep(0.2)
        assert response.json()["job_id"] == job_id
        assert [host["status"] for host in response.json()["hosts"]] == ["released"]


# ---- the job list's filters ----------------------------------------------------------------------------------------


async def _job_at(
    db: asyncpg.Connection, job_id: str, host_id: uuid.UUID, received_at: dt.datetime, status: str
) -> None:
    await db.execute(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at)
        VALUES ($1, $2, $3, now() + interval '1 hour', $4, CASE WHEN $3 = 'waiting_health_check' THEN NULL ELSE $4::timestamptz END)
        """,
        job_id,
        host_id,
        status,
        received_at,
    )


async def _all_pages(client: httpx.AsyncClient, params: dict[str, Any], headers: dict[str, str] | None = None) -> list:
    """Every item of the list, two at a time, following next_cursor with the same filters."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_params = params | {"limit": 2} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/api/v1/jobs", params=page_params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_job_list_filters_by_status_and_host_across_pages(
    admin: httpx.AsyncClient, db: asyncpg.Connection, make_token: Any
) -> None:
    hosts = {}
    for name, group in (("a", "g1"), ("b", "g1"), ("c", "g2")):
        hosts[name] = uuid.UUID((await admin.post("/api/v1/hosts", json={"name": name, "group": group})).json()["id"])
    start = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    statuses = ("waiting_health_check", "released", "failed", "cancelled")
    rows = []  # (received_at, job_id, host name, status); equal times and equal job ids on purpose
    for index in range(14):
        received_at = start + dt.timedelta(seconds=index // 3)  # three rows share each second
        job_id = f"job-{index % 5}"
        host = "abc"[index % 3]
        rows.append((received_at, job_id, host, statuses[index % 4]))
    rows = list({(row[1], row[2]): row for row in rows}.values())  # one row per (job, host): the primary key
    for received_at, job_id, host, status in rows:
        await _job_at(db, job_id, hosts[host], received_at, status)

    def expected(keep: Any) -> list[tuple[str, str, str]]:
        chosen = sorted(
            (row for row in rows if keep(row)), key=lambda row: (row[0], row[1], str(hosts[row[2]])), reverse=True
        )
        return [(job_id, str(hosts[host]), status) for _, job_id, host, status in chosen]

    def seen(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return [(item["job_id"], item["host_id"], item["status"]) for item in items]

    assert seen(await _all_pages(admin, {})) == expected(lambda row: True)
    assert seen(await _all_pages(admin, {"status": "released"})) == expected(lambda row: row[3] == "released")
    assert seen(await _all_pages(admin, {"host_id": str(hosts["b"])})) == expected(lambda row: row[2] == "b")
    for status in statuses:
        both = await _all_pages(admin, {"host_id": str(hosts["a"]), "status": status})
        assert seen(both) == expected(lambda row, status=status: row[2] == "a" and row[3] == status)
        assert both, f"the fixture should give host a a job in state {status}"
    assert (await admin.get("/api/v1/jobs", params={"host_id": str(uuid.uuid4())})).json() == {
        "items": [],
        "next_cursor": None,
    }

    # scoped: an operator of g2 sees host c's job hosts only, and nothing of g1's hosts even when asking by id
    operator = {"Authorization": f"Bearer {await make_token('operator', groups=('g2',))}"}
    assert seen(await _all_pages(admin, {}, operator)) == expected(lambda row: row[2] == "c")
    assert seen(await _all_pages(admin, {"status": "failed"}, operator)) == expected(
        lambda row: row[2] == "c" and row[3] == "failed"
    )
    assert await _all_pages(admin, {"host_id": str(hosts["a"])}, operator) == []

    for params, field in (
        ({"host_id": "not-a-uuid"}, "query.host_id"),
        ({"host_id": ""}, "query.host_id"),
        ({"status": "verify"}, "query.status"),
        ({"status": "unknown"}, "query.status"),
        ({"status": "released", "host_id": "x"}, "query.host_id"),
        ({"host_id": "a\x00b"}, "query.host_id"),
    ):
        response = await admin.get("/api/v1/jobs", params=params)
        assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
        assert [error["field"] for error in response.json()["errors"]] == [field], response.text


@pytest.mark.parametrize(
    "values",
    [
        ["2026-03-01T12:00:00", "job", str(uuid.uuid4())],  # no offset
        ["2026-03-01T12:00:00+00:00", "a\x00b", str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", "\ud800", str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", 7, str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", "job", "not-a-uuid"],
        ["2026-03-01T12:00:00+00:00", "job", None],
        [None, "job", str(uuid.uuid4())],
    ],
)
async def test_job_list_refuses_forged_cursors(admin: httpx.AsyncClient, values: list[Any]) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")
    response = await admin.get("/api/v1/jobs", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == ["query.cursor"]
