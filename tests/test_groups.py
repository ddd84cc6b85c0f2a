"""Groups and their policies, hosts in maintenance, checks' healthy_since (CONTRACT §3, §6), against the real API.

Job hosts in patch are written straight into `gate_jobs`, as the gate would leave them: these tests are about what
the API shows of them, not about how the gate gets there (tests/test_gate*.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from services.api.schemas import GroupView, HostView, Page
from shared.events import CheckView
from shared.group_policies import GroupPolicy
from tests.support.nginx import NginxServer
from tests.support.processes import ServiceProcess
from tests.support.tokens import TokenFactory

DEFAULTS = {
    "stable_seconds": 0,
    "release_cutoff_seconds": 0,
    "no_checks": "release",
    "max_unavailable": None,
    "verify_delay_seconds": 0,
    "verify_timeout_seconds": 900,
}


def policy_url(group: str) -> str:
    return f"/api/v1/groups/{quote(group, safe='')}/policy"


async def create_host(admin: httpx.AsyncClient, name: str, group: str, **extra: Any) -> dict[str, Any]:
    response = await admin.post("/api/v1/hosts", json={"name": name, "group": group} | extra)
    assert response.status_code == 201, response.text
    host: dict[str, Any] = response.json()
    return host


async def job_host(db: asyncpg.Connection, job_id: str, host_id: str, status: str, *, decided_ago: float = 60) -> None:
    """A job host in `status` as the gate leaves it, decided `decided_ago` seconds ago (waiting: undecided)."""
    now = dt.datetime.now(dt.UTC)
    await db.execute(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, decided_at)
        VALUES ($1, $2, $3, $4, $5)
        """,
        job_id,
        uuid.UUID(host_id),
        status,
        now + dt.timedelta(hours=1),
        None if status == "waiting_health_check" else now - dt.timedelta(seconds=decided_ago),
    )


async def last_audit(admin: httpx.AsyncClient) -> dict[str, Any]:
    entry: dict[str, Any] = (await admin.get("/api/v1/audit", params={"limit": 1})).json()["items"][0]
    return entry


# ---- policies --------------------------------------------------------------------------------------------------


async def test_policy_before_hosts_is_stored_audited_and_replaced_whole(admin: httpx.AsyncClient) -> None:
    assert (await admin.get(policy_url("web"))).status_code == 404  # no host, no policy: no group

    put = await admin.put(policy_url("web"), json={"max_unavailable": "40%", "stable_seconds": 120})
    assert put.status_code == 200, put.text
    assert put.json() == DEFAULTS | {"max_unavailable": "40%", "stable_seconds": 120}
    assert (await admin.get(policy_url("web"))).json() == put.json()
    entry = await last_audit(admin)
    assert (entry["action"], entry["entity_type"], entry["entity_id"], entry["host_id"]) == (
        "group.policy_update",
        "group",
        "web",
        None,
    )
    # A group's first policy records every field, from the defaults the group had until then.
    assert entry["changes"] == {name: {"from": value, "to": put.json()[name]} for name, value in DEFAULTS.items()}

    # PUT replaces every field: stable_seconds, omitted, goes back to its default.
    again = await admin.put(policy_url("web"), json={"max_unavailable": 2, "no_checks": "fail"})
    assert again.status_code == 200, again.text
    assert again.json() == DEFAULTS | {"max_unavailable": 2, "no_checks": "fail"}
    assert (await last_audit(admin))["changes"] == {
        "max_unavailable": {"from": "40%", "to": 2},
        "no_checks": {"from": "release", "to": "fail"},
        "stable_seconds": {"from": 120, "to": 0},
    }

    # The policy alone makes the group exist: listed, without hosts.
    groups = (await admin.get("/api/v1/groups")).json()
    assert groups == {
        "items": [
            {
                "group": "web",
                "hosts_total": 0,
                "hosts_unhealthy": 0,
                "hosts_in_maintenance": 0,
                "budget_in_use": 0,
                "policy": again.json(),
            }
        ],
        "next_cursor": None,
    }
    Page[GroupView].model_validate(groups)


async def test_group_with_hosts_and_no_policy_has_the_defaults(admin: httpx.AsyncClient) -> None:
    await create_host(admin, "db-1", "db")
    response = await admin.get(policy_url("db"))
    assert response.status_code == 200, response.text
    assert response.json() == DEFAULTS
    assert (await admin.get("/api/v1/groups")).json()["items"][0]["policy"] == DEFAULTS
    assert (await admin.get(policy_url("dbx"))).status_code == 404


@pytest.mark.parametrize(
    "budget", [None, 1, 5, 2**31 - 1, "1%", "40%", "100%"], ids=lambda value: f"max_unavailable={value!r}"
)
async def test_every_kind_of_budget_is_taken(admin: httpx.AsyncClient, budget: object) -> None:
    response = await admin.put(policy_url("g"), json={"max_unavailable": budget})
    assert response.status_code == 200, response.text
    assert response.json()["max_unavailable"] == budget
    assert (await admin.get(policy_url("g"))).json()["max_unavailable"] == budget


@pytest.mark.parametrize(
    "budget",
    [0, -1, True, 1.5, 2**31, "0%", "101%", "5", "%", "40 %", " 40%", "40%%", "-5%", "x%", [1], {"n": 1}],
    ids=lambda value: f"max_unavailable={value!r}",
)
async def test_a_bad_budget_is_422_naming_the_field(admin: httpx.AsyncClient, budget: object) -> None:
    response = await admin.put(policy_url("g"), json={"max_unavailable": budget})
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == ["max_unavailable"]
    assert '"N%"' in errors[0]["message"]
    assert (await admin.get(policy_url("g"))).status_code == 404  # nothing stored


async def test_every_problem_is_listed_at_once(admin: httpx.AsyncClient) -> None:
    body = {
        "stable_seconds": -1,
        "release_cutoff_seconds": 86401,
        "no_checks": "wait",
        "max_unavailable": "0%",
        "verify_delay_seconds": 3601,
        "verify_timeout_seconds": 9,
        "unknown": 1,
    }
    response = await admin.put(policy_url(" padded "), json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    fields = [error["field"] for error in response.json()["errors"]]
    assert sorted(fields) == sorted(["path.group", *body])
    for wrong in ("x" * 101, "tab\there"):
        response = await admin.put(policy_url(wrong), json={})
        assert response.status_code == 422, response.text
        assert [error["field"] for error in response.json()["errors"]] == ["path.group"]
    for not_an_object in (b"[]", b'"x"', b"1", b"null"):
        response = await admin.put(policy_url("g"), content=not_an_object, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
    response = await admin.put(policy_url("g"), content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert (await admin.get("/api/v1/groups")).json()["items"] == []
    assert all(entry["action"] != "group.policy_update" for entry in (await admin.get("/api/v1/audit")).json()["items"])


async def test_a_group_name_with_a_slash_is_one_segment(admin: httpx.AsyncClient) -> None:
    response = await admin.put(policy_url("eu/web"), json={"max_unavailable": 1})
    assert response.status_code == 200, response.text
    assert (await admin.get("/api/v1/groups")).json()["items"][0]["group"] == "eu/web"
    assert (await admin.get(policy_url("eu/web"))).json()["max_unavailable"] == 1
    assert (await admin.get("/api/v1/groups/eu/web/policy")).status_code == 404  # two segments: no such path


# ---- scoping and roles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["operator", "viewer"])
async def test_groups_are_scoped_to_the_callers_groups(
    role: str, admin: httpx.AsyncClient, client: httpx.AsyncClient, make_token: TokenFactory, api: ServiceProcess
) -> None:
    await create_host(admin, "a-1", "team-a")
    await create_host(admin, "b-1", "team-b")
    await admin.put(policy_url("team-c"), json={"max_unavailable": 1})  # a group by its policy alone
    token = await make_token(role, groups=("team-a", "team-c", "team-d"))
    async with httpx.AsyncClient(base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}) as caller:
        listed = (await caller.get("/api/v1/groups")).json()["items"]
        assert [item["group"] for item in listed] == ["team-a", "team-c"]
        assert (await caller.get(policy_url("team-a"))).status_code == 200
        assert (await caller.get(policy_url("team-c"))).json()["max_unavailable"] == 1
        # Another group's policy is not revealed, nor is a group of the caller's that does not exist.
        assert (await caller.get(policy_url("team-b"))).status_code == 404
        assert (await caller.get(policy_url("team-d"))).status_code == 404
        # Only an admin changes a policy: 403 on a group the caller sees, 404 on one it does not.
        assert (await caller.put(policy_url("team-a"), json={})).status_code == 403
        assert (await caller.put(policy_url("team-d"), json={})).status_code == 403
        assert (await caller.put(policy_url("team-b"), json={})).status_code == 404
    admin_groups = [item["group"] for item in (await admin.get("/api/v1/groups")).json()["items"]]
    assert admin_groups == ["team-a", "team-b", "team-c"]


async def test_groups_page_by_name(admin: httpx.AsyncClient) -> None:
    names = ["g-3", "g-1", "g-5", "g-2", "g-4"]
    for name in names[:3]:
        await create_host(admin, f"{name}-host", name)
    for name in names[3:]:
        await admin.put(policy_url(name), json={})
    await create_host(admin, "g-4-host", "g-4")  # a group with both hosts and a policy is listed once
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await admin.get("/api/v1/groups", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["group"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(names)
    for params in ({"limit": 0}, {"limit": 501}, {"cursor": "nonsense"}, {"cursor": "WzFd"}, {"group": "g-1"}):
        response = await admin.get("/api/v1/groups", params=params)
        assert response.status_code == 422, (params, response.text)


# ---- counts, budget in use and maintenance ---------------------------------------------------------------------


async def test_group_counts_budget_and_hosts_in_maintenance(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    await admin.put(policy_url("web"), json={"max_unavailable": 2})
    hosts = [await create_host(admin, f"web-{index}", "web") for index in range(1, 7)]
    other = await create_host(admin, "db-1", "db")
    ids = [host["id"] for host in hosts]
    await job_host(db, "patch/1", ids[0], "released")
    await job_host(db, "patch/1", ids[1], "verifying")
    await job_host(db, "patch/1", ids[2], "waiting_health_check")
    await job_host(db, "patch/1", ids[3], "verified")
    await job_host(db, "patch/0", ids[0], "verification_failed")
    await job_host(db, "patch/2", ids[0], "released", decided_ago=10)  # a second job patching web-1
    await job_host(db, "patch/1", other["id"], "released")
    # Unhealthy hosts: web-2, also in patch, counts once; web-5 by its status alone. Written as the pollers would.
    await db.execute(
        "UPDATE hosts SET health_check_status = 'unhealthy' WHERE id = ANY($1::uuid[])",
        [uuid.UUID(ids[1]), uuid.UUID(ids[4])],
    )
    items = {item["group"]: item for item in (await admin.get("/api/v1/groups")).json()["items"]}
    assert items["web"] == {
        "group": "web",
        "hosts_total": 6,
        "hosts_unhealthy": 2,
        "hosts_in_maintenance": 2,
        "budget_in_use": 3,
        "policy": DEFAULTS | {"max_unavailable": 2},
    }
    assert {key: items["db"][key] for key in ("hosts_total", "hosts_in_maintenance", "budget_in_use")} == {
        "hosts_total": 1,
        "hosts_in_maintenance": 1,
        "budget_in_use": 1,
    }

    listed = {
        host["name"]: host for host in (await admin.get("/api/v1/hosts", params={"group": "web"})).json()["items"]
    }
    Page[HostView].model_validate({"items": list(listed.values()), "next_cursor": None})
    in_maintenance = {name: (host["in_maintenance"], host["maintenance_job_id"]) for name, host in listed.items()}
    assert in_maintenance == {
        "web-1": (True, "patch/1"),  # the earliest job in patch by release
        "web-2": (True, "patch/1"),
        "web-3": (False, None),
        "web-4": (False, None),
        "web-5": (False, None),
        "web-6": (False, None),
    }
    shown = (await admin.get(f"/api/v1/hosts/{ids[0]}")).json()
    assert (shown["in_maintenance"], shown["maintenance_job_id"]) == (True, "patch/1")
    updated = await admin.put(f"/api/v1/hosts/{ids[0]}", json={"name": "web-1", "group": "web"})
    assert (updated.json()["in_maintenance"], updated.json()["maintenance_job_id"]) == (True, "patch/1")

    # Its verification outcome ends a job host's patch: the next job in patch is shown.
    await db.execute(
        "UPDATE gate_jobs SET status = 'verified' WHERE job_id = 'patch/1' AND host_id = $1", uuid.UUID(ids[0])
    )
    shown = (await admin.get(f"/api/v1/hosts/{ids[0]}")).json()
    assert (shown["in_maintenance"], shown["maintenance_job_id"]) == (True, "patch/2")
    await db.execute("UPDATE gate_jobs SET status = 'verified' WHERE host_id = $1", uuid.UUID(ids[0]))
    shown = (await admin.get(f"/api/v1/hosts/{ids[0]}")).json()
    assert (shown["in_maintenance"], shown["maintenance_job_id"]) == (False, None)
    web = next(item for item in (await admin.get("/api/v1/groups")).json()["items"] if item["group"] == "web")
    assert (web["hosts_in_maintenance"], web["budget_in_use"]) == (1, 2)


async def test_a_host_created_while_a_job_patches_its_id_is_in_maintenance(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The gate releases jobs of hosts it does not know (HEALTHGATE_GATE_UNKNOWN_HOST=release); a host created
    later with that id (`id` may be given) is in maintenance from its first answer."""
    host_id = str(uuid.uuid4())
    await job_host(db, "early", host_id, "released")
    created = await create_host(admin, "late", "g", id=host_id)
    assert (created["in_maintenance"], created["maintenance_job_id"]) == (True, "early")
    fresh = await create_host(admin, "fresh", "g")
    assert (fresh["in_maintenance"], fresh["maintenance_job_id"]) == (False, None)


async def test_host_fields_are_read_only_and_in_the_openapi_document(admin: httpx.AsyncClient) -> None:
    host = await create_host(admin, "echo", "g")
    echoed = await admin.put(f"/api/v1/hosts/{host['id']}", json=host | {"in_maintenance": True})
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["in_maintenance"] is False
    document = (await admin.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"in_maintenance", "maintenance_job_id"} <= set(schemas["HostView"]["required"])
    assert "healthy_since" in schemas["CheckView"]["properties"]
    assert set(schemas["GroupView"]["properties"]) == {
        "group",
        "hosts_total",
        "hosts_unhealthy",
        "hosts_in_maintenance",
        "budget_in_use",
        "policy",
    }
    assert set(schemas["GroupPolicy"]["properties"]) == set(DEFAULTS)
    assert {"/api/v1/groups", "/api/v1/groups/{group}/policy"} <= set(document["paths"])


# ---- checks: healthy_since -------------------------------------------------------------------------------------


async def test_a_check_is_healthy_since_its_first_healthy_result(
    admin: httpx.AsyncClient, nginx: NginxServer, poller: ServiceProcess
) -> None:
    host = await create_host(admin, "since", "g")
    checks_url = f"/api/v1/hosts/{host['id']}/health-checks"
    created = await admin.post(
        checks_url, json={"name": "web", "check_type": "http", "url": nginx.http_url("/ok"), "interval_seconds": 3600}
    )
    assert created.status_code == 201, created.text
    assert created.json()["healthy_since"] is None  # unknown until its first result
    check_url = f"{checks_url}/{created.json()['id']}"
    first = await admin.post(f"{check_url}/test")
    assert first.status_code == 200 and first.json()["healthy"], first.text
    shown = CheckView.model_validate((await admin.get(check_url)).json())
    assert shown.status == "healthy" and shown.last_result is not None
    assert shown.healthy_since == shown.last_result.checked_at
    await admin.post(f"{check_url}/test")  # still healthy: the moment it became healthy stays
    again = CheckView.model_validate((await admin.get(check_url)).json())
    assert again.healthy_since == shown.healthy_since
    assert again.last_result is not None and again.last_result.checked_at > shown.last_result.checked_at
    listed = (await admin.get(checks_url)).json()["items"]
    assert [CheckView.model_validate(item).healthy_since for item in listed] == [shown.healthy_since]

    # Unhealthy: null again.
    body = created.json() | {"url": nginx.http_url("/status/500")}
    assert (await admin.put(check_url, json=body)).status_code == 200
    assert not (await admin.post(f"{check_url}/test")).json()["healthy"]
    down = (await admin.get(check_url)).json()
    assert (down["status"], down["healthy_since"]) == ("unhealthy", None)


def test_policy_model_shows_every_field() -> None:
    """The API answers with every field of a policy, defaults included (the answer leaves out unset fields)."""
    from services.api.groups import shown

    assert shown(GroupPolicy()).model_dump_json(exclude_unset=True) == GroupPolicy().model_dump_json()
