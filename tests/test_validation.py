"""Check and host fields that can never work are refused with a 422 naming each field, every problem
of a request in one answer, and nothing stored; the forms that can work are accepted (CONTRACT §3)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.messages import EventCapture
from tests.support.processes import ServiceProcess

HTTP = {"name": "web", "check_type": "http", "url": "http://127.0.0.1:8080/health"}
TCP = {"name": "port", "check_type": "tcp", "port": 22, "address": "127.0.0.1"}
SERVICE = {"name": "unit", "check_type": "service", "service_name": "nginx.service"}
# dns checks name their server (no test asks the machine's resolver); the port is closed (tests/README.md "No DNS").
DNS = {"name": "resolver", "check_type": "dns", "dns_name": "db.test", "dns_server": "127.0.0.1:9"}
GRPC = {"name": "health", "check_type": "grpc", "port": 50051, "address": "127.0.0.1"}


@pytest.fixture
async def host(admin: httpx.AsyncClient) -> dict[str, Any]:
    response = await admin.post(
        "/api/v1/hosts", json={"name": "app-1.example", "group": "app", "agent_url": "http://127.0.0.1:9100"}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def checks_url(host: dict[str, Any]) -> str:
    return f"/api/v1/hosts/{host['id']}/health-checks"


def errors_of(response: httpx.Response) -> dict[str, str]:
    """The 422's problems by field (several problems of one field joined)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    errors: dict[str, str] = {}
    for error in response.json()["errors"]:
        assert error["message"], error
        field = error["field"]
        errors[field] = f"{errors[field]}; {error['message']}" if field in errors else error["message"]
    return errors


async def stored_checks(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM health_checks"))


# ---- every problem at once ---------------------------------------------------------------------------------------


async def test_one_answer_lists_every_problem_of_an_http_check(
    admin: httpx.AsyncClient, host: dict[str, Any], db: asyncpg.Connection
) -> None:
    response = await admin.post(
        checks_url(host),
        json={
            "name": "   ",
            "check_type": "http",
            "url": "http://monitor:s3cret@127.0.0.1/health",
            "method": "HEAD",
            "expected_body": "ok",
            "expected_status": "600",
            "basic_auth_user": "a:b",
            "interval_seconds": True,
            "timeout_seconds": 0.05,
            "max_latency_ms": 60001,
            "port": 80,
        },
    )
    errors = errors_of(response)
    assert set(errors) == {
        "name", "url", "expected_body", "expected_status", "basic_auth_user", "interval_seconds", "timeout_seconds",
        "max_latency_ms", "port",
    }  # fmt: skip
    assert "basic_auth_user" in errors["url"] and "HEAD" in errors["expected_body"]
    assert "s3cret" not in response.text  # a refused URL's credentials are not repeated
    assert all(field in response.json()["detail"] for field in errors)
    assert await stored_checks(db) == 0


async def test_host_rules_are_listed_with_the_bodys_problems(admin: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    bare = (await admin.post("/api/v1/hosts", json={"name": "bare", "group": "g"})).json()
    errors = errors_of(
        await admin.post(
            checks_url(bare),
            json=SERVICE | {"name": "", "interval_seconds": 10.5, "method": "HEAD", "expected_body": "x"},
        )
    )
    assert set(errors) == {"check_type", "name", "interval_seconds", "method", "expected_body"}
    assert "agent_url" in errors["check_type"] and "http checks" in errors["method"]

    # A tcp check without address connects to the host's name, which must then be a host name or IP.
    odd = (await admin.post("/api/v1/hosts", json={"name": "Web server (rack 4)", "group": "g"})).json()
    errors = errors_of(await admin.post(checks_url(odd), json={"name": "ssh", "check_type": "tcp", "port": 0}))
    assert set(errors) == {"address", "port"} and "Web server (rack 4)" in errors["address"]
    with_address = await admin.post(
        checks_url(odd), json={"name": "ssh", "check_type": "tcp", "port": 22, "address": "127.0.0.1"}
    )
    assert with_address.status_code == 201, with_address.text

    # An unknown type: the common fields are still checked.
    errors = errors_of(
        await admin.post(checks_url(bare), json={"name": " x", "check_type": "ping", "max_latency_ms": 0})
    )
    assert set(errors) == {"check_type", "name", "max_latency_ms"}
    assert await stored_checks(db) == 1


async def test_put_lists_every_problem_and_changes_nothing(
    admin: httpx.AsyncClient, host: dict[str, Any], db: asyncpg.Connection
) -> None:
    created = (await admin.post(checks_url(host), json=HTTP | {"max_latency_ms": 500})).json()
    url = f"{checks_url(host)}/{created['id']}"
    errors = errors_of(
        await admin.put(
            url,
            json=HTTP | {"url": "http://127.0.0.1:0/", "method": "HEAD", "expected_body": "x", "max_latency_ms": 1.5},
        )
    )
    assert set(errors) == {"url", "expected_body", "max_latency_ms"}
    assert (await admin.get(url)).json() == created


# ---- each kind of value that can never work ----------------------------------------------------------------------

BAD_STATUSES = (
    "600", "199", "1xx", "6xx", "2x", "2xxx", "", "200;204", "200,,204", "200,", "\u0662\u0660\u0660", "ok",
)  # fmt: skip
BAD_ADDRESSES = (
    "127.0.0.1:22", "host.test:22", "[::1]", "[::1]:22", "", "a b", "1.2.3", "0x7f000001", "256.1.1.1",
    "a..b", ".a.test", "-a.test", "a" * 64 + ".test", ".".join(["a" * 63] * 4), "\u2603.test", "xn--zz.test",
    "2001:db8::zz", "fe80::1%not a zone", "127.0.0.1%lo", "exa%6dple.test", "host/path", "http://host",
)  # fmt: skip
REFUSED: list[tuple[dict[str, Any], str]] = [
    # url: absolute http(s), no credentials, nothing readers disagree on, a port that can be connected to
    (HTTP | {"url": "http://user:pw@127.0.0.1/"}, "url"),
    (HTTP | {"url": "http://user@127.0.0.1/"}, "url"),
    (HTTP | {"url": "http://127.0.0.1:0/"}, "url"),
    (HTTP | {"url": "http://127.0.0.1:65536/"}, "url"),
    (HTTP | {"url": "http://127.0.0.1:port/"}, "url"),
    (HTTP | {"url": "ftp://127.0.0.1/"}, "url"),
    (HTTP | {"url": "file:///etc/passwd"}, "url"),
    (HTTP | {"url": "/health"}, "url"),
    (HTTP | {"url": "//127.0.0.1/health"}, "url"),
    (HTTP | {"url": "http:///health"}, "url"),
    (HTTP | {"url": "http://127.0.0.1/a b"}, "url"),
    (HTTP | {"url": "http://127.0.0.1/\u0001"}, "url"),
    (HTTP | {"url": "http://127.0.0.1/\u00a0"}, "url"),
    (HTTP | {"url": "http://127.0.0.1\\@169.254.169.254/"}, "url"),
    (HTTP | {"url": "http://0x7f000001/"}, "url"),
    (HTTP | {"url": "http://127.1/"}, "url"),
    (HTTP | {"url": "http://127.000.000.001/"}, "url"),
    (HTTP | {"url": "http://exa%6dple.test/"}, "url"),
    (HTTP | {"url": "http://-bad.test/"}, "url"),
    (HTTP | {"url": "http://\u2603.test/"}, "url"),
    (HTTP | {"url": "http://[::1/"}, "url"),
    (HTTP | {"url": "http://[fe80::1%25lo]/"}, "url"),
    (HTTP | {"url": "http://::1/"}, "url"),
    (HTTP | {"url": "http://127.0.0.1/" + "a" * 1984}, "url"),  # 2,001 characters
    (HTTP | {"url": 7}, "url"),
    # expected_status: 200-599, 2xx-5xx, or a comma list of them
    *((HTTP | {"expected_status": value}, "expected_status") for value in BAD_STATUSES),
    (HTTP | {"method": "get"}, "method"),
    (HTTP | {"method": "POST"}, "method"),
    (HTTP | {"expected_body": "x" * 501}, "expected_body"),
    (HTTP | {"method": "HEAD", "expected_body": "ok"}, "expected_body"),
    (HTTP | {"basic_auth_user": "a:b"}, "basic_auth_user"),
    (HTTP | {"basic_auth_user": ""}, "basic_auth_user"),
    (HTTP | {"basic_auth_user": "line\nbreak"}, "basic_auth_user"),
    (HTTP | {"basic_auth_user": "u" * 101}, "basic_auth_user"),
    (HTTP | {"basic_auth_pass": "alone"}, "basic_auth_pass"),
    (HTTP | {"basic_auth_user": "u", "basic_auth_pass": "p\r\nX-Injected: 1"}, "basic_auth_pass"),
    (HTTP | {"basic_auth_user": "u", "basic_auth_pass": "p" * 501}, "basic_auth_pass"),
    # numbers: whole where whole, in range, never booleans
    *((HTTP | {"interval_seconds": value}, "interval_seconds") for value in (10.5, True, 9, 86401, "often", 10**30)),
    *((HTTP | {"timeout_seconds": value}, "timeout_seconds") for value in (0.05, 0, 60.5, True, -1, "soon")),
    *((HTTP | {"failures_before_unhealthy": value}, "failures_before_unhealthy") for value in (0, 11, 1.5, False)),
    *((HTTP | {"successes_before_healthy": value}, "successes_before_healthy") for value in (0, 11, 2.5, True)),
    *((TCP | {"max_latency_ms": value}, "max_latency_ms") for value in (0, 60001, 1.5, True, "fast", -5)),
    # names
    *(
        (TCP | {"name": value}, "name")
        for value in ("", "   ", " padded", "n" * 101, "a\nb", "a\u202eb", "a\u0007b", 5)
    ),
    (TCP | {"enabled": "perhaps"}, "enabled"),
    # tcp: a port that can be connected to; an address that is a host name or IP, no brackets or port
    *((TCP | {"port": value}, "port") for value in (0, 65536, 22.5, True, "ssh", None)),
    *((TCP | {"address": value}, "address") for value in BAD_ADDRESSES),
    # service
    *((SERVICE | {"service_name": value}, "service_name") for value in ("../etc", "a/b", ".hidden", "", "a..b")),
    # dns: a host name to look up, a resolver's address, up to 20 expected answers
    *(
        (DNS | {"dns_name": value}, "dns_name")
        for value in (
            "192.0.2.1",
            "192.0.2.1.",
            "::1",
            "[::1]",
            "http://db.test/",
            "db.test:53",
            "db.test..",
            "..",
            ".",
            ".db.test",
            "db..test",
            "db test",
            "*.db.test",
            "-db.test",
            "db.123",
            "a" * 64 + ".test",
            "xn--zz.test",
            "db.test\u0000",
            "\u200ddb.test",
            "",
            53,
            None,
        )
    ),
    *(
        (DNS | {"dns_server": value}, "dns_server")
        for value in (
            "resolver.test",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:dns",
            "192.0.2.1: 53",
            " 192.0.2.1",
            "[::1",
            "[::1]53",
            "[::1]:",
            "[]:53",
            "[192.0.2.1]:53",
            "fe80::1%eth0",
            "[fe80::1%eth0]:53",
            "192.0.2.1:\u0665\u0663",
            "",
            53,
        )
    ),
    *((DNS | {"expected_values": value}, "expected_values") for value in (["a"] * 21, "192.0.2.1", {"a": 1})),
    *(
        (DNS | {"expected_values": ["ok", value]}, "expected_values.1")
        for value in ("", "   ", " \t", "x" * 501, "a\nb", "\u202e", 1, ["a"], None)
    ),
    *((DNS | {"record_type": value}, "record_type") for value in ("a", "PTR", "ANY", None, 1)),
    # grpc: a port and address as tcp, a service name of printable text
    *((GRPC | {"grpc_service": value}, "grpc_service") for value in ("x" * 201, "a\nb", "\u202e", 1, None)),
    *((GRPC | {"tls": value}, "tls") for value in (None, "perhaps", 2)),
    (GRPC | {"ignore_cert_errors": None}, "ignore_cert_errors"),
    *((GRPC | {"port": value}, "port") for value in (0, 65536, None)),
    *((GRPC | {"address": value}, "address") for value in ("[::1]", "127.0.0.1:50051", "http://127.0.0.1")),
    # fields of another type
    (TCP | {"url": "http://127.0.0.1/"}, "url"),
    (SERVICE | {"port": 22}, "port"),
    *((DNS | {field: value}, field) for field, value in (("port", 53), ("tls", True), ("address", "127.0.0.1"))),
    *((GRPC | {field: value}, field) for field, value in (("dns_name", "db.test"), ("url", "http://127.0.0.1/"))),
    (GRPC | {"expected_values": ["a"]}, "expected_values"),
    (GRPC | {"condition": "true"}, "condition"),
    (TCP | {"grpc_service": "x"}, "grpc_service"),
]


@pytest.mark.parametrize(
    ("body", "field"), REFUSED, ids=[f"{field}-{index}" for index, (_, field) in enumerate(REFUSED)]
)
async def test_values_that_cannot_work_are_refused(
    admin: httpx.AsyncClient, host: dict[str, Any], db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    errors = errors_of(await admin.post(checks_url(host), json=body))
    assert set(errors) == {field}, errors
    assert await stored_checks(db) == 0


async def test_json_numbers_and_strings_that_no_field_can_hold(
    admin: httpx.AsyncClient, host: dict[str, Any], db: asyncpg.Connection
) -> None:
    url = checks_url(host)
    base = '{"name": "port", "check_type": "tcp", "port": %s}'
    for number in ("1e400", "-1e400", "1" * 5000, "-" + "9" * 5000):
        assert set(errors_of(await admin.post(url, content=base % number))) == {"port"}, number
    for constant in ("NaN", "Infinity", "-Infinity"):
        refused = await admin.post(url, content=base % constant)
        assert refused.status_code == 400 and constant in refused.json()["detail"]
    deep = await admin.post(url, content=b"[" * 30000 + b"]" * 30000)
    assert deep.status_code == 400 and "nested" in deep.json()["detail"]
    # A lone surrogate is a valid JSON escape but not text PostgreSQL can hold.
    surrogate = await admin.post(url, content='{"name": "a\\ud800", "check_type": "tcp", "port": 22}')
    assert set(errors_of(surrogate)) == {"name"}
    assert await stored_checks(db) == 0


# ---- what is accepted works ---------------------------------------------------------------------------------------

# A check whose target is a host name is stored disabled: accepted all the same, and never run, so the session's
# poller does not look the name up in DNS. So are dns checks whose server is on port 53 of the loopback, where a
# resolver of the machine could forward their question.
NAMED = {"enabled": False}
ACCEPTED: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (HTTP | {"expected_status": "2XX"}, {"expected_status": "2xx"}),
    (HTTP | {"expected_status": "2xx"}, {"expected_status": "2xx"}),
    (HTTP | {"expected_status": "200, 204"}, {"expected_status": "200,204"}),
    (HTTP | {"expected_status": " 5Xx ,200,599 "}, {"expected_status": "5xx,200,599"}),
    (HTTP | {"url": "http://[::1]:8080/health"}, {"url": "http://[::1]:8080/health"}),
    (
        HTTP | NAMED | {"url": "HTTPS://b\u00fccher.example/p\u00e4th?x=1#top"},
        {"url": "HTTPS://b\u00fccher.example/p\u00e4th?x=1#top"},
    ),
    (HTTP | NAMED | {"url": "http://db-1.internal./"}, {}),
    (HTTP | {"url": "http://127.0.0.1:65535/"}, {}),
    (HTTP | {"method": "HEAD", "expected_body": ""}, {"expected_body": None}),
    (
        HTTP | {"basic_auth_user": "j\u00fcrgen", "basic_auth_pass": "p\u00e4ss word"},
        {"basic_auth_user": "j\u00fcrgen"},
    ),
    (HTTP | {"interval_seconds": 10.0, "timeout_seconds": 0.1, "max_latency_ms": 60000}, {"interval_seconds": 10}),
    (TCP | {"address": "::1"}, {"address": "::1"}),
    (TCP | {"address": "2001:db8::1"}, {}),
    (TCP | {"address": "fe80::1%lo"}, {}),
    (TCP | NAMED | {"address": "localhost"}, {}),
    (TCP | NAMED | {"address": "db-1.example."}, {}),
    (TCP | NAMED | {"address": "b\u00fccher.example"}, {}),
    (TCP | NAMED | {"address": "_sip.a_b.internal"}, {}),
    (TCP | NAMED | {"address": "a" * 63 + ".test"}, {}),
    (TCP | {"port": 65535, "max_latency_ms": 1}, {"port": 65535, "max_latency_ms": 1}),
    (TCP | {"name": "\u00e9t\u00e9 \u2603"}, {}),
    (SERVICE | {"service_name": "getty@tty1.service"}, {}),
    (DNS | NAMED, {"record_type": "A", "expected_values": None}),
    (DNS | NAMED | {"dns_name": "db.test.", "record_type": "TXT"}, {"dns_name": "db.test.", "record_type": "TXT"}),
    (DNS | NAMED | {"dns_name": "b\u00fccher.test"}, {"dns_name": "b\u00fccher.test"}),
    (DNS | NAMED | {"dns_name": "_sip._tcp.db.test", "record_type": "SRV"}, {}),
    (DNS | NAMED | {"dns_server": "127.0.0.1"}, {"dns_server": "127.0.0.1"}),
    (DNS | NAMED | {"dns_server": "::1"}, {}),
    (DNS | NAMED | {"dns_server": "[::1]"}, {}),
    (DNS | NAMED | {"dns_server": "[::1]:5353"}, {"dns_server": "[::1]:5353"}),
    (DNS | NAMED | {"expected_values": []}, {"expected_values": []}),
    (DNS | NAMED | {"expected_values": ["192.0.2.1", " padded ", "10 mail.test."] * 6}, {}),  # 18 values
    (GRPC, {"grpc_service": "", "tls": False, "ignore_cert_errors": True}),
    (GRPC | {"grpc_service": "pkg.Service/\u00e9t\u00e9 <b>", "tls": True, "ignore_cert_errors": False}, {}),
    (GRPC | {"address": "::1"}, {"address": "::1"}),
]


@pytest.mark.parametrize(("body", "expected"), ACCEPTED, ids=[str(index) for index in range(len(ACCEPTED))])
async def test_forms_that_can_work_are_accepted(
    admin: httpx.AsyncClient, host: dict[str, Any], body: dict[str, Any], expected: dict[str, Any]
) -> None:
    response = await admin.post(checks_url(host), json=body)
    assert response.status_code == 201, response.text
    check = response.json()
    assert check | expected == check
    assert (await admin.get(f"{checks_url(host)}/{check['id']}")).json() == check


@pytest.fixture
async def ipv6_listener() -> AsyncIterator[int]:
    """A TCP server on [::1] (the IPv6 loopback), or a skip where the machine has no IPv6."""
    try:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "::1", 0, family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_an_ipv6_address_literal_is_a_working_tcp_address(
    admin: httpx.AsyncClient, host: dict[str, Any], poller: ServiceProcess, ipv6_listener: int
) -> None:
    check = await admin.post(checks_url(host), json=TCP | {"address": "::1", "port": ipv6_listener})
    assert check.status_code == 201, check.text
    result = await admin.post(f"{checks_url(host)}/{check.json()['id']}/test")
    assert result.status_code == 200 and result.json()["healthy"] is True, result.text


# ---- max_latency_ms ----------------------------------------------------------------------------------------------


async def test_max_latency_round_trips_in_the_api_events_and_audit(
    admin: httpx.AsyncClient, host: dict[str, Any], events: EventCapture
) -> None:
    created = await admin.post(checks_url(host), json=HTTP | {"max_latency_ms": 250})
    assert created.status_code == 201 and created.json()["max_latency_ms"] == 250
    check_id = created.json()["id"]
    url = f"{checks_url(host)}/{check_id}"
    assert (await admin.get(url)).json()["max_latency_ms"] == 250
    assert [item["max_latency_ms"] for item in (await admin.get(checks_url(host))).json()["items"]] == [250]
    (event,) = await events.wait_for("check.config.created", lambda event: event.data["check"]["id"] == check_id)
    assert event.data["check"]["max_latency_ms"] == 250

    # Every type has it; PUT replaces it (omitted: no limit).
    changed = await admin.put(url, json=TCP | {"max_latency_ms": 900})
    assert changed.status_code == 200 and changed.json()["max_latency_ms"] == 900
    (event,) = await events.wait_for("check.config.updated", lambda event: event.data["check"]["id"] == check_id)
    assert event.data["check"]["max_latency_ms"] == 900
    cleared = await admin.put(url, json=TCP)
    assert cleared.status_code == 200 and cleared.json()["max_latency_ms"] is None

    audit = (await admin.get("/api/v1/audit")).json()["items"]
    changes = {entry["action"]: entry["changes"] for entry in audit if entry["entity_id"] == check_id}
    assert changes["health_check.create"]["max_latency_ms"] == 250
    entries = [entry["changes"] for entry in audit if entry["entity_id"] == check_id]
    assert any(change.get("max_latency_ms") == {"from": 250, "to": 900} for change in entries), entries
    assert any(change.get("max_latency_ms") == {"from": 900, "to": None} for change in entries), entries


# ---- hosts -------------------------------------------------------------------------------------------------------

REFUSED_AGENT_URLS = [
    "http://agent:s3cret@127.0.0.1:9100",
    "http://agent@127.0.0.1:9100",
    "http://127.0.0.1:9100/?token=x",
    "http://127.0.0.1:9100/?",
    "http://127.0.0.1:9100/#status",
    "http://127.0.0.1:9100/#",
    "http://127.0.0.1:0",
    "ftp://127.0.0.1:9100",
    "http://127.0.0.1:9100/a b",
    "http://0x7f000001:9100",
    "http://[::1:9100",
    "127.0.0.1:9100",
    "http://127.0.0.1/" + "a" * 1984,
]


@pytest.mark.parametrize("agent_url", REFUSED_AGENT_URLS)
async def test_agent_urls_that_cannot_work_are_refused(
    admin: httpx.AsyncClient, db: asyncpg.Connection, agent_url: str
) -> None:
    created = await admin.post("/api/v1/hosts", json={"name": "h", "group": "g", "agent_url": agent_url})
    assert set(errors_of(created)) == {"agent_url"}
    assert "s3cret" not in created.text
    assert await db.fetchval("SELECT count(*) FROM hosts") == 0
    host = (await admin.post("/api/v1/hosts", json={"name": "h", "group": "g"})).json()
    updated = await admin.put(f"/api/v1/hosts/{host['id']}", json={"name": "h", "group": "g", "agent_url": agent_url})
    assert set(errors_of(updated)) == {"agent_url"}
    assert (await admin.get(f"/api/v1/hosts/{host['id']}")).json()["agent_url"] is None


@pytest.mark.parametrize(
    "agent_url", ["https://[::1]:7443/agent/", "http://127.0.0.1:9100", "https://agent.example:7443"]
)
async def test_agent_urls_that_can_work_are_accepted(admin: httpx.AsyncClient, agent_url: str) -> None:
    created = await admin.post("/api/v1/hosts", json={"name": "h", "group": "g", "agent_url": agent_url})
    assert created.status_code == 201 and created.json()["agent_url"] == agent_url


async def test_host_update_lists_the_rules_of_its_checks_with_its_own_problems(
    admin: httpx.AsyncClient, host: dict[str, Any]
) -> None:
    url = f"/api/v1/hosts/{host['id']}"
    assert (await admin.post(checks_url(host), json=SERVICE)).status_code == 201
    # Disabled: the rule holds for every tcp check without address, and the host's name is never looked up.
    ssh = {"name": "ssh", "check_type": "tcp", "port": 22, "enabled": False}
    assert (await admin.post(checks_url(host), json=ssh)).status_code == 201
    # Without agent_url the service check cannot run; under this name the tcp check has nothing to reach.
    errors = errors_of(await admin.put(url, json={"name": "app 1", "group": " ", "agent_url": None}))
    assert set(errors) == {"agent_url", "name", "group"}
    assert "service check" in errors["agent_url"] and "tcp check" in errors["name"]
    after = (await admin.get(url)).json()
    assert (after["name"], after["group"], after["agent_url"]) == (host["name"], host["group"], host["agent_url"])
    # Another host name that can be reached is fine.
    renamed = await admin.put(url, json={"name": "app-2.example", "group": "app", "agent_url": host["agent_url"]})
    assert renamed.status_code == 200, renamed.text


async def test_a_host_named_anything_may_keep_tcp_checks_with_an_address(admin: httpx.AsyncClient) -> None:
    host = (await admin.post("/api/v1/hosts", json={"name": "rack-4", "group": "g"})).json()
    await admin.post(checks_url(host), json=TCP)
    renamed = await admin.put(f"/api/v1/hosts/{host['id']}", json={"name": "Rack 4 (old)", "group": "g"})
    assert renamed.status_code == 200, renamed.text


async def test_a_host_id_is_a_uuid(admin: httpx.AsyncClient) -> None:
    given = str(uuid.uuid4())
    assert (await admin.post("/api/v1/hosts", json={"id": given, "name": "a", "group": "g"})).json()["id"] == given
    assert set(errors_of(await admin.post("/api/v1/hosts", json={"id": 5, "name": "b", "group": "g"}))) == {"id"}
