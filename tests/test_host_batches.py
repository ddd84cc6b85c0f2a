"""POST /api/v1/hosts:batchCreate against the real API, database and broker: hosts with their checks in one
transaction, writing what the single-item endpoints write, all or none.

Every check's target is on 127.0.0.1 (nothing is looked up in DNS, no traffic leaves the machine); checks that
would run are disabled where the test does not need a poller.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx

from tests.support.messages import EventCapture
from tests.support.tokens import TokenFactory

BATCH = "/api/v1/hosts:batchCreate"
PASSWORD = "batch-Pa55-word"


def host(index: int, *, checks: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """A batch item: host-NNN in group web with an agent, and by default a tcp and an http check (password set)."""
    item = {"name": f"host-{index:03d}", "group": "web", "agent_url": f"http://127.0.0.1:{9100 + index}"} | fields
    item["checks"] = (
        checks
        if checks is not None
        else [
            {"name": "ssh", "check_type": "tcp", "port": 22, "address": "127.0.0.1", "enabled": False},
            {
                "name": "homepage",
                "check_type": "http",
                "url": f"http://127.0.0.1:9/{index}",
                "basic_auth_user": "monitor",
                "basic_auth_pass": PASSWORD,
                "enabled": False,
            },
        ]
    )
    return item


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = ("hosts", "health_checks", "check_state", "check_schedule", "audit_log", "outbox")
    return {table: await db.fetchval(f"SELECT count(*) FROM {table}") for table in tables}


async def test_a_batch_writes_what_one_by_one_creates_write(
    admin: httpx.AsyncClient, db: asyncpg.Connection, events: EventCapture
) -> None:
    answer = await admin.post(BATCH, json={"hosts": [host(index) for index in range(3)]})
    assert answer.status_code == 201, answer.text
    created = answer.json()["items"]
    assert [item["name"] for item in created] == ["host-000", "host-001", "host-002"]
    assert {item["checks_total"] for item in created} == {0}  # both checks disabled: nothing gates the host
    assert PASSWORD not in answer.text

    # The same host and checks one by one, for comparison.
    single = host(3)
    checks = single.pop("checks")
    one = (await admin.post("/api/v1/hosts", json=single)).json()
    for check in checks:
        assert (await admin.post(f"/api/v1/hosts/{one['id']}/health-checks", json=check)).status_code == 201

    ignored = {"id", "host_id", "created_at", "updated_at", "name", "url", "uptime_24h"}
    views = (await admin.get("/api/v1/health-checks", params={"limit": 500})).json()["items"]
    by_host: dict[str, list[dict[str, Any]]] = {}
    for view in views:
        by_host.setdefault(view["host_id"], []).append({k: v for k, v in view.items() if k not in ignored})
    shapes = [sorted(map(str, by_host[item["id"]])) for item in [*created, one]]
    assert len({tuple(shape) for shape in shapes}) == 1  # same checks, same defaults, password set on each
    assert {view["basic_auth_pass_set"] for view in views if view["check_type"] == "http"} == {True}

    audit = await db.fetch("SELECT actor, action, entity_type, host_id, changes::text FROM audit_log ORDER BY id")
    actions = [row["action"] for row in audit]
    assert actions.count("host.create") == 4 and actions.count("health_check.create") == 8
    assert not any(PASSWORD in row["changes"] for row in audit)
    stored = await db.fetch("SELECT basic_auth_pass_encrypted FROM health_checks WHERE check_type = 'http'")
    assert all(row[0] is not None and PASSWORD.encode() not in row[0] for row in stored)
    assert await db.fetchval("SELECT count(*) FROM check_state") == 8
    assert await db.fetchval("SELECT count(*) FROM check_schedule WHERE next_run_at IS NULL") == 8  # disabled

    configs = await events.wait_for("check.config.created", count=8)
    assert {event.data["check"]["host_id"] for event in configs} == {item["id"] for item in [*created, one]}
    assert not any(PASSWORD.encode() in event.body for event in events.events)


async def test_enabled_checks_are_scheduled_and_the_host_summary_follows(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    checks = [{"name": "ssh", "check_type": "tcp", "port": 9, "address": "127.0.0.1", "interval_seconds": 3600}]
    answer = await admin.post(BATCH, json={"hosts": [host(1, checks=checks), host(2, checks=[])]})
    assert answer.status_code == 201, answer.text
    by_name = {item["name"]: item for item in answer.json()["items"]}
    assert by_name["host-001"]["checks_total"] == 1
    assert by_name["host-001"]["health_check_status"] == "unknown"
    assert by_name["host-002"]["health_check_status"] == "no_checks"
    due = await db.fetchval("SELECT next_run_at FROM check_schedule")
    assert due is not None  # CONTRACT §4: a created check first runs within 5 s


async def test_one_bad_check_anywhere_refuses_the_whole_batch_naming_its_place(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    before = await counts(db)
    items = [host(index) for index in range(60)]
    items[57]["checks"][1]["port"] = 22  # a tcp field on an http check
    items[12]["checks"][0]["port"] = 70000
    items[30]["agent_url"] = "ftp://127.0.0.1"
    items[41]["checks"].append({"name": "agent", "check_type": "service", "service_name": "sshd"})
    items[41]["agent_url"] = None  # a service check needs the host's agent
    answer = await admin.post(BATCH, json={"hosts": items})
    assert answer.status_code == 422, answer.text
    fields = {error["field"] for error in answer.json()["errors"]}
    assert {"hosts[57].checks[1].port", "hosts[12].checks[0].port", "hosts[30].agent_url"} <= fields
    assert "hosts[41].checks[2].check_type" in fields
    assert PASSWORD not in answer.text
    assert await counts(db) == before


async def test_names_given_twice_or_taken_refuse_the_batch(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    twice = [host(1), host(1), host(2, checks=[host(0)["checks"][0], host(0)["checks"][0]])]
    answer = await admin.post(BATCH, json={"hosts": twice})
    assert answer.status_code == 422
    assert {error["field"] for error in answer.json()["errors"]} == {"hosts[1].name", "hosts[2].checks[1].name"}

    taken_id = str(uuid.uuid4())
    assert (await admin.post(BATCH, json={"hosts": [host(5, id=taken_id)]})).status_code == 201
    before = await counts(db)
    answer = await admin.post(BATCH, json={"hosts": [host(6), host(5)]})
    assert answer.status_code == 409
    assert "'host-005'" in answer.json()["detail"] and "nothing was created" in answer.json()["detail"]
    answer = await admin.post(BATCH, json={"hosts": [host(7, id=taken_id)]})
    assert answer.status_code == 409 and taken_id in answer.json()["detail"]
    assert await counts(db) == before


async def test_bad_envelopes_and_roles(
    client: httpx.AsyncClient, admin: httpx.AsyncClient, db: asyncpg.Connection, make_token: TokenFactory
) -> None:
    for body, field in (
        ([], "body"),
        ({}, "hosts"),
        ({"hosts": []}, "hosts"),
        ({"hosts": [host(index, checks=[]) for index in range(101)]}, "hosts"),
        ({"hosts": "host-1"}, "hosts"),
        ({"hosts": [host(1)], "dry_run": True}, "dry_run"),
        ({"hosts": [7]}, "hosts[0]"),
        ({"hosts": [host(1, checks=[host(0)["checks"][0]] * 6)]}, "hosts[0].checks"),
        ({"hosts": [host(1, checks={"name": "x"})]}, "hosts[0].checks"),
        ({"hosts": [host(1, checks=["tcp"])]}, "hosts[0].checks[0]"),
    ):
        answer = await admin.post(BATCH, json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert field in {error["field"] for error in answer.json()["errors"]}, (body, answer.json())
    huge = await admin.post(BATCH, content=b'{"hosts": ["' + b"x" * (3 * 1024 * 1024) + b'"]}')
    assert huge.status_code == 413
    assert (await admin.post(BATCH, content=b"{not json")).status_code == 400

    client.headers["Authorization"] = f"Bearer {await make_token('operator', groups=['web'])}"
    assert (await client.post(BATCH, json={"hosts": [host(1)]})).status_code == 403
    client.headers["Authorization"] = f"Bearer {await make_token('viewer')}"
    assert (await client.post(BATCH, json={"hosts": [host(1)]})).status_code == 403
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


async def test_two_batches_racing_for_one_name_create_one_of_them_whole(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = [host(index) for index in range(0, 50)]
    second = [host(index) for index in range(49, 99)]  # host-049 in both
    answers = await asyncio.gather(*(admin.post(BATCH, json={"hosts": items}) for items in (first, second)))
    assert sorted(answer.status_code for answer in answers) == [201, 409]
    won = first if answers[0].status_code == 201 else second
    names = {row[0] for row in await db.fetch("SELECT name FROM hosts")}
    assert names == {item["name"] for item in won}
    assert await db.fetchval("SELECT count(*) FROM health_checks") == 100
