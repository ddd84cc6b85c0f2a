"""Who may call what (CONTRACT §3, "Authentication and roles"): every endpoint, every role.

Access is decided in a fixed order: no or unknown token → 401 (with `WWW-Authenticate: Bearer`); a
host or a group outside the caller's groups → 404; a role that may not do this → 403; else the handler answers.
The matrix is derived from `ENDPOINTS`, so an endpoint added without a request here fails
`test_every_endpoint_has_a_request`.

Each case starts from empty tables with two hosts: `host-a` in group "team-a" (seen by the operator
and viewer, whose tokens carry the groups ("team-a",)) and `host-b` in "team-b" (hidden from them),
each with one check and one waiting gate job.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from services.api.endpoints import Endpoint
from services.api.routes import ENDPOINTS
from shared.tokens import ROLES
from tests.support.processes import ServiceProcess
from tests.support.tokens import TokenFactory

VISIBLE_GROUP = "team-a"
HIDDEN_GROUP = "team-b"
SCOPED_ROLES = ("operator", "viewer")


@dataclass(frozen=True)
class Side:
    """A host with one check and one waiting gate job."""

    host_id: str
    host_name: str
    group: str
    check_id: str
    check_name: str
    job_id: str
    channel_id: str  # a notification channel (not scoped by group: admin only)


@dataclass
class World:
    visible: Side  # in team-a
    hidden: Side  # in team-b
    tokens: dict[str, str]  # role -> token; operator and viewer have the groups ("team-a",)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    json: Any = None


@dataclass(frozen=True)
class Case:
    """Who may call an endpoint, its success code, and how to call it against a side; `setup`: calls an admin
    makes first, for the success case only (a resume needs a halted job)."""

    who: frozenset[str]
    success: int
    build: Callable[[Side], Call]
    setup: Callable[[Side], list[Call]] = lambda side: []


def check_body(name: str, port: int = 22) -> dict[str, Any]:
    # A short timeout keeps a wrongly admitted /test request (no poller) from stalling the test. The address
    # keeps the poller from looking up the host's name ("host-a") in DNS.
    return {
        "name": name, "check_type": "tcp", "port": port, "address": "127.0.0.1", "timeout_seconds": 1,
        "interval_seconds": 3600,
    }  # fmt: skip


def host_url(side: Side) -> str:
    return f"/api/v1/hosts/{side.host_id}"


def check_url(side: Side) -> str:
    return f"{host_url(side)}/health-checks/{side.check_id}"


def job_url(side: Side) -> str:
    """The job's path with its id percent-encoded as one segment (the ids hold `/`)."""
    return f"/api/v1/jobs/{quote(side.job_id, safe='')}"


def channel_url(side: Side) -> str:
    return f"/api/v1/notification-channels/{side.channel_id}"


def channel_body(name: str) -> dict[str, Any]:
    # The discard port on loopback, where nothing listens: a /test is refused at once.
    return {"name": name, "type": "webhook", "url": "http://127.0.0.1:9/hook"}


def group_policy_url(side: Side) -> str:
    return f"/api/v1/groups/{quote(side.group, safe='')}/policy"


HOST = "/api/v1/hosts/{host_id}"
CHECK = HOST + "/health-checks/{check_id}"
GROUP_POLICY = "/api/v1/groups/{group}/policy"
CHANNELS = "/api/v1/notification-channels"
CHANNEL = CHANNELS + "/{channel_id}"

ALL = frozenset({"admin", "operator", "viewer"})
ADMIN = frozenset({"admin"})
EDITORS = frozenset({"admin", "operator"})

# The "who" column and success answer of CONTRACT §3's tables, and a request that succeeds.
CASES: dict[tuple[str, str], Case] = {
    ("GET", "/api/v1/me"): Case(ALL, 200, lambda s: Call("GET", "/api/v1/me")),
    ("POST", "/api/v1/hosts"): Case(
        ADMIN,
        201,
        lambda s: Call("POST", "/api/v1/hosts", {"name": f"new-{uuid.uuid4().hex[:8]}", "group": s.group}),
    ),
    ("POST", "/api/v1/hosts:batchCreate"): Case(
        ADMIN,
        201,
        lambda s: Call(
            "POST",
            "/api/v1/hosts:batchCreate",
            {"hosts": [{"name": f"new-{uuid.uuid4().hex[:8]}", "group": s.group, "checks": [check_body("ssh")]}]},
        ),
    ),
    ("GET", "/api/v1/hosts"): Case(ALL, 200, lambda s: Call("GET", "/api/v1/hosts")),
    ("GET", HOST): Case(ALL, 200, lambda s: Call("GET", host_url(s))),
    ("PUT", HOST): Case(
        ADMIN,
        200,
        lambda s: Call(
            "PUT", host_url(s), {"name": s.host_name, "group": s.group, "agent_url": "http://agent.example:9100"}
        ),
    ),
    ("DELETE", HOST): Case(ADMIN, 204, lambda s: Call("DELETE", host_url(s))),
    ("GET", "/api/v1/health-checks"): Case(ALL, 200, lambda s: Call("GET", "/api/v1/health-checks")),
    ("GET", HOST + "/health-checks"): Case(ALL, 200, lambda s: Call("GET", f"{host_url(s)}/health-checks")),
    ("POST", HOST + "/health-checks"): Case(
        EDITORS, 201, lambda s: Call("POST", f"{host_url(s)}/health-checks", check_body("second"))
    ),
    ("GET", CHECK): Case(ALL, 200, lambda s: Call("GET", check_url(s))),
    ("PUT", CHECK): Case(EDITORS, 200, lambda s: Call("PUT", check_url(s), check_body(s.check_name, port=2222))),
    ("DELETE", CHECK): Case(EDITORS, 204, lambda s: Call("DELETE", check_url(s))),
    ("POST", CHECK + "/test"): Case(EDITORS, 200, lambda s: Call("POST", f"{check_url(s)}/test")),
    ("GET", CHECK + "/results"): Case(ALL, 200, lambda s: Call("GET", f"{check_url(s)}/results")),
    ("GET", "/api/v1/jobs"): Case(ALL, 200, lambda s: Call("GET", "/api/v1/jobs")),
    ("GET", "/api/v1/jobs/{job_id}"): Case(ALL, 200, lambda s: Call("GET", job_url(s))),
    ("POST", "/api/v1/jobs/{job_id}/hosts/{host_id}/override"): Case(
        ADMIN,
        200,
        lambda s: Call(
            "POST",
            f"{job_url(s)}/hosts/{s.host_id}/override",
            {"decision": "release", "reason": "approved by the change board"},
        ),
    ),
    ("POST", "/api/v1/jobs/{job_id}/halt"): Case(
        ADMIN, 200, lambda s: Call("POST", f"{job_url(s)}/halt", {"reason": "patch breaks hosts"})
    ),
    ("POST", "/api/v1/jobs/{job_id}/resume"): Case(
        ADMIN,
        200,
        lambda s: Call("POST", f"{job_url(s)}/resume", {"reason": "fixed"}),
        setup=lambda s: [Call("POST", f"{job_url(s)}/halt", {"reason": "patch breaks hosts"})],
    ),
    ("POST", "/api/v1/gate/preview"): Case(
        ALL, 200, lambda s: Call("POST", "/api/v1/gate/preview", {"host_ids": [s.host_id]})
    ),
    ("GET", "/api/v1/audit"): Case(ADMIN, 200, lambda s: Call("GET", "/api/v1/audit")),
    ("GET", "/api/v1/groups"): Case(ALL, 200, lambda s: Call("GET", "/api/v1/groups")),
    ("GET", GROUP_POLICY): Case(ALL, 200, lambda s: Call("GET", group_policy_url(s))),
    ("PUT", GROUP_POLICY): Case(
        ADMIN, 200, lambda s: Call("PUT", group_policy_url(s), {"max_unavailable": "40%", "stable_seconds": 30})
    ),
    ("POST", CHANNELS): Case(ADMIN, 201, lambda s: Call("POST", CHANNELS, channel_body(f"new-{uuid.uuid4().hex[:8]}"))),
    ("GET", CHANNELS): Case(ADMIN, 200, lambda s: Call("GET", CHANNELS)),
    ("GET", CHANNEL): Case(ADMIN, 200, lambda s: Call("GET", channel_url(s))),
    ("PUT", CHANNEL): Case(ADMIN, 200, lambda s: Call("PUT", channel_url(s), channel_body(f"renamed-{s.group}"))),
    ("DELETE", CHANNEL): Case(ADMIN, 204, lambda s: Call("DELETE", channel_url(s))),
    ("POST", CHANNEL + "/test"): Case(ADMIN, 200, lambda s: Call("POST", f"{channel_url(s)}/test")),
    ("GET", CHANNEL + "/deliveries"): Case(ADMIN, 200, lambda s: Call("GET", f"{channel_url(s)}/deliveries")),
}

TEST_RUN = ("POST", CHECK + "/test")


def key(endpoint: Endpoint) -> tuple[str, str]:
    return endpoint.method, endpoint.path


def name(endpoint: Endpoint) -> str:
    return f"{endpoint.method} {endpoint.path}"


def scoped(endpoint: Endpoint) -> bool:
    """Whether the path names a host, a group or a job, which may be outside the caller's groups (CONTRACT §3,
    §6: a job with no host in the caller's groups answers 404)."""
    return "{host_id}" in endpoint.path or "{group}" in endpoint.path or "{job_id}" in endpoint.path


def as_role(endpoint: Endpoint, role: str) -> Any:
    return pytest.param(endpoint, role, id=f"{name(endpoint)} as {role}")


ALLOWED = [as_role(e, role) for e in ENDPOINTS for role in ROLES if role in e.roles]
FORBIDDEN = [as_role(e, role) for e in ENDPOINTS for role in ROLES if role not in e.roles]
HIDDEN = [as_role(e, role) for e in ENDPOINTS if scoped(e) for role in SCOPED_ROLES]
EVERY_ENDPOINT = [pytest.param(e, id=name(e)) for e in ENDPOINTS]


# ---- fixtures ------------------------------------------------------------------------------------


async def create_side(
    client: httpx.AsyncClient, db: asyncpg.Connection, admin: dict[str, str], label: str, group: str
) -> Side:
    response = await client.post("/api/v1/hosts", json={"name": f"host-{label}", "group": group}, headers=admin)
    assert response.status_code == 201, response.text
    host = response.json()
    response = await client.post(f"/api/v1/hosts/{host['id']}/health-checks", json=check_body("ssh"), headers=admin)
    assert response.status_code == 201, response.text
    check = response.json()
    job_id = f"deploy/{label}/42"  # a `/` in every job id: each request below sends it as %2F
    await insert_job(db, job_id, host["id"])
    response = await client.post(CHANNELS, json=channel_body(f"channel-{label}"), headers=admin)
    assert response.status_code == 201, response.text
    return Side(host["id"], host["name"], group, check["id"], check["name"], job_id, response.json()["id"])


async def insert_job(db: asyncpg.Connection, job_id: str, host_id: str) -> None:
    await db.execute(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at)
        VALUES ($1, $2, 'waiting_health_check', now() + interval '1 hour')
        """,
        job_id,
        uuid.UUID(host_id),
    )


@pytest.fixture
async def world(client: httpx.AsyncClient, db: asyncpg.Connection, make_token: TokenFactory) -> World:
    tokens = {
        "admin": await make_token("admin"),
        "operator": await make_token("operator", groups=(VISIBLE_GROUP,)),
        "viewer": await make_token("viewer", groups=(VISIBLE_GROUP,)),
    }
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    visible = await create_side(client, db, admin, "a", VISIBLE_GROUP)
    hidden = await create_side(client, db, admin, "b", HIDDEN_GROUP)
    return World(visible, hidden, tokens)


async def snapshot(db: asyncpg.Connection) -> dict[str, Any]:
    """Everything a request could change: a refused request must leave all of it as it was."""

    async def rows(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await db.fetch(sql)]

    return {
        "audit": await db.fetchval("SELECT count(*) FROM audit_log"),
        "outbox": await db.fetchval("SELECT count(*) FROM outbox"),
        "hosts": await rows('SELECT id, name, "group", agent_url, updated_at FROM hosts ORDER BY id'),
        "checks": await rows("SELECT id, name, port, updated_at FROM health_checks ORDER BY id"),
        "jobs": await rows("SELECT job_id, host_id, status, decided_at FROM gate_jobs ORDER BY 1, 2"),
        "policies": await rows('SELECT "group", updated_at FROM group_policies ORDER BY 1'),
        "channels": await rows("SELECT id, name, updated_at FROM notification_channels ORDER BY id"),
        "deliveries": await db.fetchval("SELECT count(*) FROM notification_deliveries"),
    }


async def send(client: httpx.AsyncClient, call: Call, headers: dict[str, str]) -> httpx.Response:
    return await client.request(call.method, call.url, json=call.json, headers=headers)


# ---- the matrix ----------------------------------------------------------------------------------


def test_every_endpoint_has_a_request() -> None:
    declared = {key(endpoint) for endpoint in ENDPOINTS}
    assert len(declared) == len(ENDPOINTS), "an endpoint is declared twice"
    missing, stale = sorted(declared - set(CASES)), sorted(set(CASES) - declared)
    assert not missing, f"endpoints without a request here: {missing}"
    assert not stale, f"requests here for no endpoint: {stale}"


@pytest.mark.parametrize("endpoint", EVERY_ENDPOINT)
def test_declaration_matches_the_contract(endpoint: Endpoint) -> None:
    """The matrix below trusts `endpoint.roles`; this pins them (and the success code) to CONTRACT §3."""
    case = CASES[key(endpoint)]
    assert endpoint.roles == case.who
    assert endpoint.status_code == case.success


@pytest.mark.parametrize("credentials", ["missing", "unknown", "not bearer"])
@pytest.mark.parametrize("endpoint", EVERY_ENDPOINT)
async def test_without_a_valid_token_401(
    endpoint: Endpoint, credentials: str, client: httpx.AsyncClient, db: asyncpg.Connection, world: World
) -> None:
    headers = {
        "missing": {},
        "unknown": {"Authorization": f"Bearer hg_{secrets.token_urlsafe(32)}"},
        "not bearer": {"Authorization": f"Basic {world.tokens['admin']}"},
    }[credentials]
    before = await snapshot(db)
    response = await send(client, CASES[key(endpoint)].build(world.visible), headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].split()[0] == "Bearer"
    assert response.headers["content-type"] == "application/problem+json"
    assert await snapshot(db) == before


@pytest.mark.parametrize(("endpoint", "role"), HIDDEN)
async def test_host_or_group_outside_the_callers_groups_404(
    endpoint: Endpoint, role: str, client: httpx.AsyncClient, db: asyncpg.Connection, world: World
) -> None:
    """Even where the role could not act anyway: the host's or group's existence is not revealed."""
    before = await snapshot(db)
    response = await send(client, CASES[key(endpoint)].build(world.hidden), world.auth(role))
    assert response.status_code == 404, response.text
    assert await snapshot(db) == before


@pytest.mark.parametrize(("endpoint", "role"), FORBIDDEN)
async def test_role_that_may_not_403(
    endpoint: Endpoint, role: str, client: httpx.AsyncClient, db: asyncpg.Connection, world: World
) -> None:
    before = await snapshot(db)
    response = await send(client, CASES[key(endpoint)].build(world.visible), world.auth(role))
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert await snapshot(db) == before


@pytest.mark.parametrize(("endpoint", "role"), ALLOWED)
async def test_role_that_may_succeeds(
    endpoint: Endpoint, role: str, client: httpx.AsyncClient, world: World, poller: ServiceProcess
) -> None:
    case = CASES[key(endpoint)]
    for call in case.setup(world.visible):
        assert (await send(client, call, world.auth("admin"))).is_success
    response = await send(client, case.build(world.visible), world.auth(role))
    assert response.status_code == case.success, response.text
    if key(endpoint) == TEST_RUN:
        # The real poller ran it: the check's port 22 on a host named like no real one.
        assert response.json()["reason"] in ("dns", "connect", "timeout")


# ---- scoping of lists and jobs -------------------------------------------------------------------


@pytest.mark.parametrize("role", SCOPED_ROLES)
async def test_host_list_shows_only_the_callers_groups(role: str, client: httpx.AsyncClient, world: World) -> None:
    response = await client.get("/api/v1/hosts", headers=world.auth(role))
    assert response.status_code == 200, response.text
    assert [host["id"] for host in response.json()["items"]] == [world.visible.host_id]
    # asking for the other group by name reveals nothing either
    response = await client.get("/api/v1/hosts", params={"group": HIDDEN_GROUP}, headers=world.auth(role))
    assert response.status_code == 200, response.text
    assert response.json()["items"] == []


async def test_admin_and_multi_group_tokens_see_every_group(
    client: httpx.AsyncClient, world: World, make_token: TokenFactory
) -> None:
    both = await make_token("viewer", groups=(VISIBLE_GROUP, HIDDEN_GROUP))
    for headers in (world.auth("admin"), {"Authorization": f"Bearer {both}"}):
        response = await client.get("/api/v1/hosts", headers=headers)
        assert response.status_code == 200, response.text
        assert {host["id"] for host in response.json()["items"]} == {world.visible.host_id, world.hidden.host_id}
        response = await client.get("/api/v1/jobs", headers=headers)
        assert response.status_code == 200, response.text
        assert {job["job_id"] for job in response.json()["items"]} == {world.visible.job_id, world.hidden.job_id}


@pytest.mark.parametrize("role", SCOPED_ROLES)
async def test_job_list_shows_only_the_callers_groups(
    role: str, client: httpx.AsyncClient, db: asyncpg.Connection, world: World
) -> None:
    # a job the gate heard of for a host it does not know belongs to no group: admins only
    await insert_job(db, "job-unknown-host", str(uuid.uuid4()))
    response = await client.get("/api/v1/jobs", headers=world.auth(role))
    assert response.status_code == 200, response.text
    seen = [(job["job_id"], job["host_id"]) for job in response.json()["items"]]
    assert seen == [(world.visible.job_id, world.visible.host_id)]
    response = await client.get("/api/v1/jobs", headers=world.auth("admin"))
    assert {job["job_id"] for job in response.json()["items"]} == {
        world.visible.job_id,
        world.hidden.job_id,
        "job-unknown-host",
    }


@pytest.mark.parametrize("role", SCOPED_ROLES)
async def test_job_of_another_group_404(role: str, client: httpx.AsyncClient, world: World) -> None:
    response = await client.get(job_url(world.hidden), headers=world.auth(role))
    assert response.status_code == 404, response.text
    response = await client.get(job_url(world.hidden), headers=world.auth("admin"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("role", SCOPED_ROLES)
async def test_job_list_filters_stay_in_the_callers_groups(role: str, client: httpx.AsyncClient, world: World) -> None:
    """Asking for a hidden host's job hosts by id, or by status, reveals nothing of them."""
    for params, expected in (
        ({"host_id": world.hidden.host_id}, []),
        ({"host_id": world.visible.host_id}, [world.visible.job_id]),
        ({"status": "waiting_health_check"}, [world.visible.job_id]),
        ({"status": "waiting_health_check", "host_id": world.hidden.host_id}, []),
    ):
        response = await client.get("/api/v1/jobs", params=params, headers=world.auth(role))
        assert response.status_code == 200, response.text
        assert [job["job_id"] for job in response.json()["items"]] == expected, params


@pytest.mark.parametrize("role", SCOPED_ROLES)
async def test_job_spanning_groups_shows_only_the_callers_hosts(
    role: str, client: httpx.AsyncClient, db: asyncpg.Connection, world: World
) -> None:
    await insert_job(db, "job-both", world.visible.host_id)
    await insert_job(db, "job-both", world.hidden.host_id)
    response = await client.get("/api/v1/jobs/job-both", headers=world.auth(role))
    assert response.status_code == 200, response.text
    assert [entry["host_id"] for entry in response.json()["hosts"]] == [world.visible.host_id]
    response = await client.get("/api/v1/jobs/job-both", headers=world.auth("admin"))
    assert {entry["host_id"] for entry in response.json()["hosts"]} == {world.visible.host_id, world.hidden.host_id}
