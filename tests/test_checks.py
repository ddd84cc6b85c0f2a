"""Health checks through the API: limits, per-type fields, PUT semantics, events, summaries, results."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import httpx
import pytest

from tests.support.blackhole import Blackhole
from tests.support.messages import EventCapture
from tests.support.processes import ServiceProcess


@pytest.fixture
async def host(admin: httpx.AsyncClient) -> dict[str, str]:
    # Named by its address: the tcp checks below have none, and the session's poller runs them against the
    # host's name, which must not be looked up in DNS.
    response = await admin.post(
        "/api/v1/hosts", json={"name": "127.0.0.1", "group": "app", "agent_url": "https://127.0.0.1:7443"}
    )
    assert response.status_code == 201
    return response.json()  # type: ignore[no-any-return]


def checks_url(host: dict[str, str]) -> str:
    return f"/api/v1/hosts/{host['id']}/health-checks"


async def test_sixth_check_is_refused_with_the_limit(admin: httpx.AsyncClient, host: dict[str, str]) -> None:
    for index in range(5):
        response = await admin.post(
            checks_url(host), json={"name": f"c{index}", "check_type": "tcp", "port": 80 + index}
        )
        assert response.status_code == 201
    sixth = await admin.post(checks_url(host), json={"name": "c5", "check_type": "tcp", "port": 90})
    assert sixth.status_code == 409
    assert "5" in sixth.json()["detail"]


async def test_duplicate_and_renamed_onto_existing_name_conflict(
    admin: httpx.AsyncClient, host: dict[str, str]
) -> None:
    first = await admin.post(checks_url(host), json={"name": "web", "check_type": "tcp", "port": 80})
    second = await admin.post(checks_url(host), json={"name": "tls", "check_type": "tcp", "port": 443})
    duplicate = await admin.post(checks_url(host), json={"name": "web", "check_type": "tcp", "port": 8080})
    assert duplicate.status_code == 409
    renamed = await admin.put(
        f"{checks_url(host)}/{second.json()['id']}", json={"name": "web", "check_type": "tcp", "port": 443}
    )
    assert renamed.status_code == 409
    assert first.status_code == 201


async def test_service_check_needs_an_agent(admin: httpx.AsyncClient) -> None:
    bare = await admin.post("/api/v1/hosts", json={"name": "bare", "group": "g"})
    url = f"/api/v1/hosts/{bare.json()['id']}/health-checks"
    refused = await admin.post(url, json={"name": "sshd", "check_type": "service", "service_name": "ssh.service"})
    assert refused.status_code == 422
    assert "agent_url" in refused.text


async def test_check_defaults_and_own_type_fields(admin: httpx.AsyncClient, host: dict[str, str]) -> None:
    response = await admin.post(
        checks_url(host), json={"name": "home", "check_type": "http", "url": "http://127.0.0.1/"}
    )
    check = response.json()
    assert (
        check
        | {
            "method": "GET",
            "expected_status": "2xx",
            "ignore_cert_errors": True,
            "follow_redirects": False,
            "enabled": True,
            "critical": True,
            "interval_seconds": 300,
            "timeout_seconds": 10.0,
            "failures_before_unhealthy": 1,
            "successes_before_healthy": 1,
            "status": "unknown",
            "last_result": None,
            "basic_auth_pass_set": False,
        }
        == check
    )
    assert "port" not in check and "service_name" not in check
    service = await admin.post(
        checks_url(host), json={"name": "nginx", "check_type": "service", "service_name": "nginx.service"}
    )
    assert service.status_code == 201 and "url" not in service.json()


async def test_put_replaces_every_field_with_defaults(admin: httpx.AsyncClient, host: dict[str, str]) -> None:
    created = await admin.post(
        checks_url(host),
        json={
            "name": "api",
            "check_type": "http",
            "url": "http://127.0.0.1/",
            "expected_body": "ok",
            "expected_status": "200, 204",
            "critical": False,
            "interval_seconds": 60,
        },
    )
    assert created.json()["expected_status"] == "200,204"
    url = f"{checks_url(host)}/{created.json()['id']}"
    replaced = await admin.put(url, json={"name": "api", "check_type": "http", "url": "http://127.0.0.1/v2"})
    body = replaced.json()
    assert body["expected_body"] is None and body["critical"] is True and body["interval_seconds"] == 300
    # Fields echoed back from a GET are read-only and ignored.
    echoed = await admin.put(url, json=body | {"timeout_seconds": 2})
    assert echoed.status_code == 200 and echoed.json()["timeout_seconds"] == 2
    # The type may change; the old type's fields go.
    to_tcp = await admin.put(url, json={"name": "api", "check_type": "tcp", "port": 8443})
    assert to_tcp.status_code == 200 and "url" not in to_tcp.json() and to_tcp.json()["port"] == 8443


# Every column of a check's own type, with a value that is not its default (the password as its ciphertext).
TYPE_BODIES: dict[str, dict[str, object]] = {
    "http": {
        "url": "http://127.0.0.1:9/health", "method": "GET", "expected_body": "ok", "ignore_cert_errors": False,
        "follow_redirects": True, "basic_auth_user": "monitor", "basic_auth_pass": "s3cret-pass",
        "condition": "status == 200", "min_cert_days": None,
    },
    "tcp": {"port": 9, "address": "127.0.0.1"},
    "grpc": {"port": 9, "address": "127.0.0.1", "grpc_service": "pkg.Svc", "tls": True, "ignore_cert_errors": False},
    "dns": {"dns_name": "db.test", "record_type": "MX", "expected_values": ["10 mail.test."], "dns_server": "127.0.0.1:9"},
    "service": {"service_name": "nginx.service"},
}  # fmt: skip
TYPE_COLUMNS = {
    "http": {"url", "method", "expected_status", "expected_body", "ignore_cert_errors", "follow_redirects",
             "basic_auth_user", "basic_auth_pass_encrypted", "condition"},
    "tcp": {"port", "address"},
    "grpc": {"port", "address", "grpc_service", "tls", "ignore_cert_errors"},
    "dns": {"dns_name", "record_type", "expected_values", "dns_server"},
    "service": {"service_name"},
}  # fmt: skip
ALL_TYPE_COLUMNS = set().union(*TYPE_COLUMNS.values()) | {"min_cert_days"}


async def test_put_to_another_type_clears_every_column_of_the_old_one(
    admin: httpx.AsyncClient, host: dict[str, str], db: asyncpg.Connection
) -> None:
    """Each type holds only its own columns (a constraint of the table, which would answer 500 if the API ever wrote
    one of another type): through every change of type and back, the row holds the new type's columns alone, the
    stored password goes with the http fields, and the answer shows the new type's fields alone."""
    created = await admin.post(checks_url(host), json={"name": "shape", "enabled": False, "check_type": "http"}
                               | TYPE_BODIES["http"])  # fmt: skip
    assert created.status_code == 201, created.text
    url = f"{checks_url(host)}/{created.json()['id']}"
    for kind in ("grpc", "dns", "tcp", "grpc", "http", "dns", "service", "http", "tcp", "dns", "grpc", "http"):
        answer = await admin.put(url, json={"name": "shape", "enabled": False, "check_type": kind} | TYPE_BODIES[kind])
        assert answer.status_code == 200, (kind, answer.text)
        row = dict(await db.fetchrow("SELECT * FROM health_checks WHERE id = $1", uuid.UUID(created.json()["id"])))
        assert {column for column in ALL_TYPE_COLUMNS if row[column] is not None} == TYPE_COLUMNS[kind], (kind, row)
        shown = answer.json()
        assert shown["check_type"] == kind and shown["basic_auth_pass_set"] is (kind == "http")
        own = TYPE_COLUMNS[kind] | ({"min_cert_days"} if kind == "http" else set())  # shown as null when unset
        others = ALL_TYPE_COLUMNS - own - {"basic_auth_pass_encrypted"}
        assert not others & shown.keys(), (kind, shown)


async def test_config_events_carry_the_check_without_secrets(
    admin: httpx.AsyncClient, host: dict[str, str], events: EventCapture
) -> None:
    created = await admin.post(
        checks_url(host),
        json={
            "name": "auth",
            "check_type": "http",
            "url": "http://127.0.0.1/",
            "basic_auth_user": "u",
            "basic_auth_pass": "p4ss",
        },
    )
    check_id = created.json()["id"]
    # The user kept, the password omitted: kept (a PUT dropping the user of a stored password is a 422).
    updated = await admin.put(
        f"{checks_url(host)}/{check_id}",
        json={"name": "auth", "check_type": "http", "url": "http://127.0.0.1/x", "basic_auth_user": "u"},
    )
    assert updated.status_code == 200, updated.text
    await admin.delete(f"{checks_url(host)}/{check_id}")
    for routing_key in ("check.config.created", "check.config.updated", "check.config.deleted"):
        (event,) = await events.wait_for(routing_key, lambda event: event.data["check"]["id"] == check_id)
        document = event.document
        assert document["specversion"] == "1.0" and document["type"] == f"healthgate.{routing_key}"
        assert event.content_type == "application/cloudevents+json" and event.message_id == document["id"]
        assert "basic_auth_pass" not in event.data["check"] and "p4ss" not in event.body.decode()


async def test_host_summary_follows_its_checks(
    admin: httpx.AsyncClient, host: dict[str, str], db: asyncpg.Connection, events: EventCapture
) -> None:
    assert host["health_check_status"] == "no_checks"
    gating = await admin.post(checks_url(host), json={"name": "gating", "check_type": "tcp", "port": 1})
    optional = await admin.post(
        checks_url(host), json={"name": "optional", "check_type": "tcp", "port": 2, "critical": False}
    )
    host_url = f"/api/v1/hosts/{host['id']}"
    assert (await admin.get(host_url)).json()["health_check_status"] == "unknown"
    await events.wait_for("host.status_changed", lambda event: event.data["current"] == "unknown")

    async def set_status(check: httpx.Response, status: str) -> None:
        await db.execute(
            "UPDATE check_state SET status = $2 WHERE check_id = $1", uuid.UUID(check.json()["id"]), status
        )

    await set_status(gating, "healthy")
    await set_status(optional, "unhealthy")
    # Disabling a check recomputes the summary: only the gating check is left, and it is healthy.
    await admin.put(
        f"{checks_url(host)}/{optional.json()['id']}",
        json={"name": "optional", "check_type": "tcp", "port": 2, "critical": False, "enabled": True},
    )
    summary = (await admin.get(host_url)).json()
    assert (summary["health_check_status"], summary["checks_total"], summary["checks_healthy"]) == ("degraded", 2, 1)
    await admin.put(
        f"{checks_url(host)}/{optional.json()['id']}",
        json={"name": "optional", "check_type": "tcp", "port": 2, "enabled": False},
    )
    summary = (await admin.get(host_url)).json()
    assert (summary["health_check_status"], summary["checks_total"], summary["checks_healthy"]) == ("healthy", 1, 1)
    filtered = await admin.get("/api/v1/hosts", params={"health_check_status": "healthy"})
    assert [item["id"] for item in filtered.json()["items"]] == [host["id"]]


async def test_results_newest_first_with_time_range_and_cursor(
    admin: httpx.AsyncClient, host: dict[str, str], db: asyncpg.Connection
) -> None:
    check = (await admin.post(checks_url(host), json={"name": "t", "check_type": "tcp", "port": 1})).json()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    rows = [
        (
            uuid.uuid4(),
            uuid.UUID(check["id"]),
            uuid.UUID(host["id"]),
            now - dt.timedelta(minutes=minute),
            minute % 2 == 0,
            "ok" if minute % 2 == 0 else "connect",
            "healthy",
            f"run {minute}",
            1.5,
        )
        for minute in range(7)
    ]
    await db.copy_records_to_table(
        "check_results",
        records=rows,
        columns=["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"],
    )
    url = f"{checks_url(host)}/{check['id']}/results"
    first = (await admin.get(url, params={"limit": 3})).json()
    assert [item["detail"] for item in first["items"]] == ["run 0", "run 1", "run 2"]
    second = (await admin.get(url, params={"limit": 3, "cursor": first["next_cursor"]})).json()
    assert [item["detail"] for item in second["items"]] == ["run 3", "run 4", "run 5"]
    ranged = (
        await admin.get(
            url,
            params={
                "since": (now - dt.timedelta(minutes=4)).isoformat(),
                "until": (now - dt.timedelta(minutes=1)).isoformat(),
            },
        )
    ).json()
    assert [item["detail"] for item in ranged["items"]] == ["run 2", "run 3", "run 4"] and ranged["next_cursor"] is None

    # Deleting the host deletes its checks and their results.
    assert (await admin.delete(f"/api/v1/hosts/{host['id']}")).status_code == 204
    assert await db.fetchval("SELECT count(*) FROM check_results WHERE host_id = $1", uuid.UUID(host["id"])) == 0
    assert await db.fetchval("SELECT count(*) FROM health_checks WHERE host_id = $1", uuid.UUID(host["id"])) == 0
    assert (await admin.get(url)).status_code == 404


async def test_a_check_deleted_while_it_is_tested_answers_404_not_a_timeout(
    admin: httpx.AsyncClient, host: dict[str, str], poller: ServiceProcess
) -> None:
    """The poller runs it, finds it gone when it stores the result, and so stores and sends none: the API, left
    without an answer, says the check is gone rather than that no poller answered."""
    with Blackhole() as silent:
        created = await admin.post(checks_url(host), json={
            "name": "going", "check_type": "grpc", "address": "127.0.0.1", "port": silent.port, "timeout_seconds": 1,
            "enabled": False,
        })  # fmt: skip
        url = f"{checks_url(host)}/{created.json()['id']}"
        testing = asyncio.create_task(admin.post(f"{url}/test", timeout=30))
        async with asyncio.timeout(10):
            while silent.accepted == 0:  # the poller is running it
                await asyncio.sleep(0.05)
        assert (await admin.delete(url)).status_code == 204
        answer = await testing
    assert answer.status_code == 404, answer.text
    assert answer.json()["detail"] == "health check not found: it was deleted while it ran"


async def test_a_request_rolled_back_by_a_deadlock_is_503_with_retry_after(
    admin: httpx.AsyncClient, host: dict[str, str], database_url: str
) -> None:
    """A real deadlock: another session holds the check's row, the api's PUT locks the host and waits for the check,
    then the other session asks for the host. PostgreSQL aborts the api's transaction (the other session waits
    longer before it looks for deadlocks): the answer says to try again (503, Retry-After), not 500, and the same
    request sent again succeeds."""
    created = await admin.post(checks_url(host), json={"name": "web", "check_type": "tcp", "port": 80})
    check_url = f"{checks_url(host)}/{created.json()['id']}"
    other = await asyncpg.connect(database_url)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SET LOCAL deadlock_timeout = '60s'")
        await other.execute("SELECT 1 FROM health_checks WHERE id = $1 FOR UPDATE", uuid.UUID(created.json()["id"]))
        put = asyncio.create_task(admin.put(check_url, json={"name": "web", "check_type": "tcp", "port": 81}))
        for _ in range(200):  # until the api's session waits for the check's row
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting
        await other.execute("SELECT 1 FROM hosts WHERE id = $1 FOR UPDATE", uuid.UUID(host["id"]))
        response = await put
        await transaction.rollback()
    finally:
        await other.close()
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert "try again" in response.json()["detail"]
    again = await admin.put(check_url, json={"name": "web", "check_type": "tcp", "port": 81})
    assert (again.status_code, again.json()["port"]) == (200, 81)
