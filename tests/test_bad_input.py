"""Bad input gets a clear 4xx problem answer, never a 500, and changes nothing."""

from __future__ import annotations

import base64
import json
import uuid

import asyncpg
import httpx
import pytest

PROBLEM_FIELDS = {"type", "title", "status", "detail"}


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert PROBLEM_FIELDS <= body.keys() and body["status"] == status and body["detail"]
    return body  # type: ignore[no-any-return]


@pytest.fixture
async def host_id(admin: httpx.AsyncClient) -> str:
    response = await admin.post("/api/v1/hosts", json={"name": "bad-input-host", "group": "g"})
    return str(response.json()["id"])


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b"\xff\xfe\x00", b'{"name": "x", "group": ', b"NaN-ish"],
    ids=["broken", "empty", "not-utf8", "truncated", "bare-word"],
)
async def test_malformed_json_is_400(admin: httpx.AsyncClient, body: bytes) -> None:
    assert_problem(await admin.post("/api/v1/hosts", content=body), 400)


async def test_wrong_types_name_every_bad_field(admin: httpx.AsyncClient, host_id: str) -> None:
    response = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json={
            "name": "",
            "check_type": "http",
            "url": "ftp://nowhere",
            "interval_seconds": "often",
            "timeout_seconds": 99,
            "expected_status": "600",
            "method": "POST",
            "port": 80,
        },
    )
    body = assert_problem(response, 422)
    fields = {error["field"] for error in body["errors"]}  # type: ignore[union-attr]
    assert fields == {"name", "url", "interval_seconds", "timeout_seconds", "expected_status", "method", "port"}
    port_error = next(error for error in body["errors"] if error["field"] == "port")  # type: ignore[union-attr]
    assert "tcp" in port_error["message"]


@pytest.mark.parametrize("check_type", ["ping", None, 7, ""])
async def test_unknown_check_type_is_422(admin: httpx.AsyncClient, host_id: str, check_type: object) -> None:
    body = assert_problem(
        await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json={"name": "x", "check_type": check_type}), 422
    )
    assert body["errors"] == [{"field": "check_type", "message": "must be one of: service, http, tcp, dns, grpc"}]


async def test_huge_body_is_413(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    huge = {"name": "x" * (2 * 1024 * 1024), "group": "g"}
    assert_problem(await admin.post("/api/v1/hosts", json=huge), 413)

    async def chunks():  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(100):
            yield b" " * 10_000

    assert_problem(await admin.post("/api/v1/hosts", content=chunks()), 413)
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"3", b"null", b'[{"name": "a", "group": "b"}]'])
async def test_body_that_is_not_an_object_is_422(admin: httpx.AsyncClient, body: bytes) -> None:
    assert_problem(await admin.post("/api/v1/hosts", content=body), 422)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=abc",
        "cursor=%%%",
        "cursor=bm90LWEtY3Vyc29y",
        "health_check_status=sick",
        "colour=red",
        "limit=5&limit=6",
    ],
)
async def test_bad_query_is_422(admin: httpx.AsyncClient, query: str) -> None:
    body = assert_problem(await admin.get(f"/api/v1/hosts?{query}"), 422)
    assert str(body["errors"][0]["field"]).startswith("query.")  # type: ignore[index]


def forged_cursor(values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


# Cursors of the right length whose values are not a key the list wrote: each list answers 422 naming
# query.cursor (services/api/requests.py Keyset), never 500.
FORGED_CURSORS = {
    "hosts": [[None, None], "name", {"name": "x"}, ["a\u0000b"], ["\ud800"], [None], [5], [["web"]]],
    "results": [
        ["2026-03-01T12:00:00+00:00", 5],
        [7, str(uuid.uuid4())],
        ["yesterday", str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", "not-a-uuid"],
        ["2026-03-01T12:00:00+00:00", None],
        ["0001-01-01T00:00:00+01:00", str(uuid.uuid4())],
        ["9999-12-31T23:59:59-01:00", str(uuid.uuid4())],
        ["2026-03-01T12:00:00", str(uuid.uuid4())],
    ],
    "audit": [["7"], [None], [1.5], [[1]], [1, 2], [2**63], [-(2**63) - 1], [True]],
    "jobs": [
        ["2026-03-01T12:00:00+00:00", "job", 5],
        ["2026-03-01T12:00:00+00:00", ["job"], str(uuid.uuid4())],
        ["0001-01-01T00:00:00+01:00", "job", str(uuid.uuid4())],
        ["2026-03-01T12:00:00", "job", str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", "a\u0000b", str(uuid.uuid4())],
        ["2026-03-01T12:00:00+00:00", "\ud800", str(uuid.uuid4())],
    ],
    "groups": [[None], [5], [["web"]], ["a\u0000b"], ["\ud800"], ["web", "db"]],
}


async def test_forged_cursors_of_every_list_are_422(admin: httpx.AsyncClient, host_id: str) -> None:
    check = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json={"name": "c", "check_type": "tcp", "port": 1, "address": "127.0.0.1"},
    )
    lists = {
        "hosts": "/api/v1/hosts",
        "results": f"/api/v1/hosts/{host_id}/health-checks/{check.json()['id']}/results",
        "audit": "/api/v1/audit",
        "jobs": "/api/v1/jobs",
        "groups": "/api/v1/groups",
    }
    wrong = []
    for name, cursors in FORGED_CURSORS.items():
        for values in cursors:
            response = await admin.get(lists[name], params={"cursor": forged_cursor(values)})
            fields = [error["field"] for error in response.json().get("errors", [])]
            if response.status_code != 422 or fields != ["query.cursor"]:
                wrong.append(f"{name} {values!r}: {response.status_code} {response.text}")
    assert not wrong, "\n".join(wrong)


async def test_bad_path_values_are_4xx(admin: httpx.AsyncClient, host_id: str) -> None:
    assert_problem(await admin.get("/api/v1/hosts/not-a-uuid"), 422)
    assert_problem(await admin.get(f"/api/v1/hosts/{uuid.uuid4()}"), 404)
    assert_problem(await admin.get(f"/api/v1/hosts/{host_id}/health-checks/nope"), 422)
    assert_problem(await admin.get("/api/v1/no-such-thing"), 404)
    assert_problem(await admin.patch(f"/api/v1/hosts/{host_id}", json={}), 405)
    assert_problem(await admin.get("/api/v1/jobs/" + "j" * 300), 404)
    # NUL in a job id: looked up by the key an invalid job id the gate answered is stored under (CONTRACT §3,
    # every job id works; tests/test_invalid_job_ids.py), and no job has it.
    assert_problem(await admin.get("/api/v1/jobs/a%00b"), 404)
    assert_problem(await admin.get("/api/v1/hosts?group=a%00b"), 422)
    assert_problem(await admin.get("/api/v1/groups/a%00b/policy"), 422)
    assert_problem(await admin.put("/api/v1/groups/a%00b/policy", json={}), 422)
    assert_problem(await admin.get("/api/v1/groups/%ED%A0%80/policy"), 422)  # a lone surrogate: no group holds one


async def test_results_time_range_must_be_aware(admin: httpx.AsyncClient, host_id: str) -> None:
    check = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json={"name": "t", "check_type": "tcp", "port": 1, "address": "127.0.0.1"},  # never the host's name: no DNS
    )
    url = f"/api/v1/hosts/{host_id}/health-checks/{check.json()['id']}/results"
    assert_problem(await admin.get(url, params={"since": "yesterday"}), 422)
    assert_problem(await admin.get(url, params={"since": "2026-01-01T00:00:00"}), 422)
    assert (await admin.get(url, params={"since": "2026-01-01T00:00:00Z"})).status_code == 200


async def test_invalid_values_of_every_kind_change_nothing(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    bad_hosts = [
        {"name": "", "group": "g"},
        {"name": "a", "group": "g" * 101},
        {"name": "a", "group": "g", "agent_url": "not a url"},
        {"name": "a", "group": "g", "agent_url": "file:///etc/passwd"},
        {"name": "a", "group": "g", "id": "123"},
        {"name": "a", "group": "g", "extra": True},
        {"name": " padded ", "group": "g"},
        {"name": "a\u0000b", "group": "g"},
        {"name": "a", "group": "g", "agent_url": "http://x/\u0000"},
    ]
    for body in bad_hosts:
        response = await admin.post("/api/v1/hosts", json=body)
        assert response.status_code in (400, 422), (body, response.text)
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0


async def test_problem_for_unauthenticated_request(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/hosts", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
