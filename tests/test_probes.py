"""What targets answer, read truthfully (CONTRACT §4): large headers, answers that are not valid HTTP,
Content-Encodings and charsets, `max_latency_ms`, names that cannot be encoded, addresses tried in turn,
and details that stay bounded and free of credentials wherever a result is stored or published.

Runs go through the session's poller (`/test`) against real peers: nginx, the fake agent, and raw
servers on 127.0.0.1 that write exact bytes. Address ordering for tcp runs the prober in-process with
a resolver of the test's own, since no name here resolves to two addresses."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import json
import socket
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg
import brotli
import httpx
import pytest

from services.poller.probes import (
    AddrInfo,
    CheckTarget,
    Prober,
    decode_body,
    probe_session,
)
from shared.details import DETAIL_LIMIT
from tests.conftest import EventCapture
from tests.support.blackhole import refused_port, slow_port
from tests.support.fake_agent import SERVICES_PREFIX, FakeAgent
from tests.support.nginx import GZIP_BODY, NginxServer
from tests.support.processes import ServiceProcess
from tests.support.raw_http import RawHttpServer, response
from tests.test_poller import create_check, http, new_host, run_now

pytestmark = pytest.mark.usefixtures("poller")

FRENCH = "Système opérationnel"


async def set_columns(db: asyncpg.Connection, check: dict[str, Any], **columns: Any) -> None:
    """Write check columns the API does not take here (or refuses on purpose) straight into the row."""
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(columns, start=2))
    await db.execute(f"UPDATE health_checks SET {assignments} WHERE id = $1", uuid.UUID(check["id"]), *columns.values())


async def run_all(admin: httpx.AsyncClient, checks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(run_now(admin, check) for check in checks)))


async def create_checks(
    admin: httpx.AsyncClient, bodies: Sequence[dict[str, Any]], **host: Any
) -> list[dict[str, Any]]:
    """The checks, on as many new hosts as the limit of 5 checks per host needs."""
    checks: list[dict[str, Any]] = []
    for start in range(0, len(bodies), 5):
        host_id = await new_host(admin, **host)
        checks += [await create_check(admin, host_id, **body) for body in bodies[start : start + 5]]
    return checks


async def http_checks(admin: httpx.AsyncClient, urls: Sequence[str], **fields: Any) -> list[dict[str, Any]]:
    return await create_checks(admin, [http(url, **fields) for url in urls])


# ---- headers as large as browsers accept -----------------------------------------------------------------------


async def test_headers_as_large_as_browsers_accept_are_read(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    line_16k = "a" * (16 * 1024 - len("X-Line: "))  # the whole line, name included, is 16 KiB
    answers = {
        "/one-10k-header": [("X-Big", "a" * 10 * 1024)],
        "/one-16k-line": [("X-Line", line_16k)],
        "/70k-in-all": [(f"X-Part-{index}", "b" * 1000) for index in range(70)],
        "/200-headers": [(f"X-H{index}", str(index)) for index in range(200)],
        "/all-at-once": [("X-Big", "c" * 10 * 1024)] + [(f"X-H{index}", "d" * 300) for index in range(199)],
    }
    for path, headers in answers.items():
        raw_http.set(path, response(headers=headers, body=b"fine"))
    assert sum(len(name) + len(value) + 4 for name, value in answers["/all-at-once"]) > 64 * 1024
    checks = await http_checks(admin, [raw_http.url(path) for path in answers], expected_body="fine")
    for path, result in zip(answers, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (True, "ok"), (path, result)
        assert result["detail"] == "status 200 OK, body contains 'fine'"


async def test_headers_beyond_the_limits_are_protocol(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    raw_http.set("/long-line", response(headers=[("X-Big", "a" * 20 * 1024)]))
    raw_http.set("/many", response(headers=[(f"X-H{index}", "v") for index in range(300)]))
    long_line, many = await run_all(
        admin, await http_checks(admin, [raw_http.url("/long-line"), raw_http.url("/many")])
    )
    assert (long_line["reason"], many["reason"]) == ("protocol", "protocol")
    assert "header line longer than 16 KiB" in long_line["detail"]
    assert "more than 256 headers" in many["detail"]


# ---- answers that are not valid HTTP ---------------------------------------------------------------------------

CHUNKED = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
INVALID_ANSWERS: dict[str, tuple[bytes, str]] = {
    "/garbage-status-line": (b"GARBAGE LINE\r\n\r\n", "not valid HTTP: Bad status line"),
    "/http-0.9": (b"<html>just a body</html>", "not valid HTTP: Bad status line"),
    "/status-not-a-number": (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "not valid HTTP"),
    "/header-without-colon": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nNoColonHere\r\n\r\nok",
        "not valid HTTP: Invalid header token",
    ),
    "/two-content-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "not valid HTTP",
    ),
    "/body-shorter-than-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nshort",
        "ended the body after 5 of the 100 bytes its Content-Length announced",
    ),
    "/bad-chunk-size": ((CHUNKED + "zz\r\nabc\r\n0\r\n\r\n").encode(), "chunk"),
    "/chunked-cut-short": ((CHUNKED + "10\r\nabc").encode(), "broken chunked body"),
    "/headers-cut-short": (b"HTTP/1.1 200 OK\r\nContent-Ty", "closed the connection in the middle of the response"),
    "/bad-gzip": (
        response(headers=[("Content-Encoding", "gzip")], body=b"this is not gzip"),
        "not valid gzip",
    ),
    "/bad-deflate": (
        response(headers=[("Content-Encoding", "deflate")], body=b"this is not deflate"),
        "not valid deflate",
    ),
    "/bad-br": (response(headers=[("Content-Encoding", "br")], body=b"this is not brotli"), "not valid br"),
    "/unknown-encoding": (
        response(headers=[("Content-Encoding", "compress")], body=b"\x1f\x9d\x90abc"),
        "Content-Encoding 'compress', which cannot be undone",
    ),
    "/stacked-encodings": (
        response(headers=[("Content-Encoding", "gzip, br")], body=brotli.compress(gzip.compress(b"fine"))),
        "Content-Encoding 'gzip, br', which cannot be undone",
    ),
}


async def test_answers_that_are_not_valid_http_are_protocol(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    for path, (raw, _) in INVALID_ANSWERS.items():
        raw_http.set(path, raw)
    checks = await http_checks(admin, [raw_http.url(path) for path in INVALID_ANSWERS])
    for (path, (_, words)), result in zip(INVALID_ANSWERS.items(), await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (False, "protocol"), (path, result)
        assert words in result["detail"], (path, result)
        assert result["detail"].startswith(f"127.0.0.1:{raw_http.port} "), (path, result)
        # aiohttp files its parse errors under 400; the target sent no status, so none is reported.
        assert "400" not in result["detail"] and not result["detail"].startswith("status"), (path, result)


async def test_a_server_that_closes_without_answering_is_connect(
    admin: httpx.AsyncClient, raw_http: RawHttpServer
) -> None:
    raw_http.set("/silent-close", b"")
    (result,) = await run_all(admin, await http_checks(admin, [raw_http.url("/silent-close")]))
    assert (result["reason"], result["detail"]) == (
        "connect",
        f"127.0.0.1:{raw_http.port} closed the connection without answering",
    )


async def test_the_body_is_read_even_without_expected_body(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    """A body that breaks off makes the answer invalid whether or not the check looks into it; HEAD reads none."""
    head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"  # the length of a GET
    raw_http.set("/get", head_only)
    raw_http.set("/head", head_only)
    get, head = await run_all(
        admin,
        [
            *(await http_checks(admin, [raw_http.url("/get")])),
            *(await http_checks(admin, [raw_http.url("/head")], method="HEAD")),
        ],
    )
    assert (get["reason"], get["detail"]) == (
        "protocol",
        f"127.0.0.1:{raw_http.port} ended the body after 0 of the 100 bytes its Content-Length announced",
    )
    assert (head["reason"], head["detail"]) == ("ok", "status 200 OK")


# ---- Content-Encoding and charsets -----------------------------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


async def test_content_encodings_are_undone(
    admin: httpx.AsyncClient, raw_http: RawHttpServer, nginx: NginxServer
) -> None:
    text = f"{FRENCH}: all fine".encode()
    encoded = {
        "/gzip": ("gzip", gzip.compress(text)),
        "/gzip-upper-case": ("GZIP", gzip.compress(text)),
        "/deflate": ("deflate", zlib.compress(text)),
        "/raw-deflate": ("deflate", _raw_deflate(text)),
        "/br": ("br", brotli.compress(text)),
        "/identity": ("identity", text),
    }
    for path, (coding, body) in encoded.items():
        raw_http.set(path, response(headers=[("Content-Encoding", coding)], body=body))
    checks = await http_checks(admin, [raw_http.url(path) for path in encoded], expected_body=f"{FRENCH}: all fine")
    checks += await http_checks(admin, [nginx.http_url("/gzip")], expected_body=GZIP_BODY.strip())
    for check, result in zip(checks, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (True, "ok"), (check["url"], result)


async def test_the_body_is_decoded_with_its_declared_charset(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    windows_text = f"{FRENCH} \u2013 5 \u20ac"  # en dash and euro: bytes 0x96 and 0x80 in windows-1252 only
    bodies = {
        "/latin-1": ("text/html; charset=ISO-8859-1", FRENCH.encode("latin-1"), FRENCH),
        "/latin-1-quoted": ('text/plain; charset="latin1"', FRENCH.encode("latin-1"), FRENCH),
        "/windows-1252": ("text/plain; charset=windows-1252", windows_text.encode("cp1252"), windows_text),
        "/utf-16": ("text/plain; charset=utf-16", FRENCH.encode("utf-16"), FRENCH),
        "/no-charset": ("text/plain", FRENCH.encode(), FRENCH),
        "/no-content-type": (None, FRENCH.encode(), FRENCH),
        "/unknown-charset": ("text/plain; charset=x-no-such-charset", FRENCH.encode(), FRENCH),
        "/not-a-text-codec": ("text/plain; charset=base64", FRENCH.encode(), FRENCH),
    }
    for path, (content_type, body, _) in bodies.items():
        headers = [("Content-Type", content_type)] if content_type else []
        raw_http.set(path, response(headers=headers, body=body))
    checks = await create_checks(
        admin, [http(raw_http.url(path), expected_body=expected) for path, (_, _, expected) in bodies.items()]
    )
    for path, result in zip(bodies, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (True, "ok"), (path, result)

    # The declared charset is believed, not guessed around: latin-1 bytes declared UTF-8 do not match.
    raw_http.set(
        "/mislabelled", response(headers=[("Content-Type", "text/plain; charset=utf-8")], body=bodies["/latin-1"][1])
    )
    (mislabelled,) = await run_all(
        admin, await http_checks(admin, [raw_http.url("/mislabelled")], expected_body=FRENCH)
    )
    assert mislabelled["reason"] == "body"


def test_decode_body_falls_back_to_utf8() -> None:
    assert decode_body(FRENCH.encode("latin-1"), "iso-8859-1") == FRENCH
    assert decode_body(FRENCH.encode(), None) == FRENCH
    assert decode_body(FRENCH.encode(), "no-such-charset") == FRENCH
    for not_text in ("rot13", "zlib", "base64", "idna", "undefined"):
        assert decode_body(FRENCH.encode(), not_text) == FRENCH, not_text
    assert decode_body(b"\xff\xfeok", "utf-8") == "\ufffd\ufffdok"  # bad bytes are replaced, never an error


# ---- max_latency_ms -----------------------------------------------------------------------------------------------


async def test_max_latency_makes_slow_successes_unhealthy(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer, fake_agent: FakeAgent
) -> None:
    raw_http.set("/slow", response(body=b"fine"), delay=0.3)
    raw_http.set("/slow-and-failing", response("503 Service Unavailable"), delay=0.3)
    fake_agent.set("lazy.service", "slow=0.3")
    web_host = await new_host(admin)
    agent_host = await new_host(admin, agent_url=fake_agent.base_url)
    tcp_host = await new_host(admin, name="127.0.0.1")
    with slow_port(0.3) as port:
        checks = {
            "http": await create_check(admin, web_host, **http(raw_http.url("/slow"))),
            "http, failing": await create_check(admin, web_host, **http(raw_http.url("/slow-and-failing"))),
            "http, generous": await create_check(admin, web_host, **http(raw_http.url("/slow"))),
            "service": await create_check(admin, agent_host, check_type="service", service_name="lazy.service"),
            "tcp": await create_check(admin, tcp_host, check_type="tcp", port=port),
        }
        for name, check in checks.items():
            await set_columns(db, check, max_latency_ms=60000 if name == "http, generous" else 100)
        results = dict(zip(checks, await run_all(admin, list(checks.values())), strict=True))
    for name in ("http", "service", "tcp"):
        result = results[name]
        assert (result["healthy"], result["reason"]) == (False, "slow"), (name, result)
        assert result["latency_ms"] >= 300, (name, result)
        assert "ms, more than the 100 ms allowed" in result["detail"], (name, result)
    assert results["http"]["detail"].endswith("(status 200 OK)")
    assert results["service"]["detail"].endswith("(lazy.service is active (running))")
    assert f"(connected to 127.0.0.1:{port})" in results["tcp"]["detail"]
    assert results["http, failing"]["reason"] == "status"  # only a success can be too slow
    assert (results["http, generous"]["healthy"], results["http, generous"]["reason"]) == (True, "ok")


# ---- names that cannot be encoded for DNS ------------------------------------------------------------------------

UNENCODABLE_NAMES = ["a..b", "a" * 64 + ".test"]  # an empty label; a label longer than 63 octets


def test_unencodable_names_fail_before_any_lookup() -> None:
    """Python's IDNA codec refuses these names, and getaddrinfo encodes before it sends a query: no DNS traffic."""
    for name in UNENCODABLE_NAMES:
        with pytest.raises(UnicodeError):
            name.encode("idna")


async def test_names_that_cannot_be_encoded_are_dns(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer
) -> None:
    checks = await create_checks(
        admin, [http("http://127.0.0.1/"), {"check_type": "tcp", "port": 80, "address": "127.0.0.1"}] * 2
    )
    for web, tcp, name in zip(checks[::2], checks[1::2], UNENCODABLE_NAMES, strict=True):
        await set_columns(db, web, url=f"http://{name}/health")
        await set_columns(db, tcp, address=name)
    raw_http.set("/away", response("302 Found", headers=[("Location", "http://a..b/health")]))
    checks += await http_checks(admin, [raw_http.url("/away")], follow_redirects=True)
    for check, result in zip(checks, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (False, "dns"), (check, result)
        assert "cannot be encoded for DNS (IDNA" in result["detail"], result


# ---- tcp: every address of a name ----------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    """A port listening on 127.0.0.1 only: the same port on 127.0.0.2 and 127.0.0.3 refuses."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield int(server.getsockname()[1])


@pytest.fixture
async def session() -> AsyncIterator[Any]:
    async with probe_session([]) as http_session:
        yield http_session


def _stream(address: str, port: int) -> AddrInfo:
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


def _answers(*addresses: str) -> Any:
    async def resolve(host: str, port: int) -> list[AddrInfo]:
        assert host == "two-addresses.test"
        return [_stream(address, port) for address in addresses]

    return resolve


def _tcp(address: str, port: int) -> CheckTarget:
    return CheckTarget(
        check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="tcp", timeout_seconds=5,
        host_name="ignored", address=address, port=port,
    )  # fmt: skip


async def test_tcp_tries_each_address_in_turn(session: Any, listener: int) -> None:
    prober = Prober(session, [], None, resolve=_answers("127.0.0.2", "127.0.0.1"))
    outcome = await prober.run(_tcp("two-addresses.test", listener))
    assert (outcome.healthy, outcome.reason, outcome.detail) == (True, "ok", f"connected to 127.0.0.1:{listener}")

    refusing = Prober(session, [], None, resolve=_answers("127.0.0.2", "127.0.0.3"))
    outcome = await refusing.run(_tcp("two-addresses.test", listener))
    assert (outcome.reason, outcome.detail) == (
        "connect",
        f"connection refused by two-addresses.test:{listener} at every address (127.0.0.2, 127.0.0.3)",
    )


async def test_tcp_refuses_a_name_with_any_blocked_address(session: Any, listener: int) -> None:
    blocked = [ipaddress.ip_network("127.0.0.2/32")]
    outcome = await Prober(session, blocked, None, resolve=_answers("127.0.0.1", "127.0.0.2")).run(
        _tcp("two-addresses.test", listener)
    )
    assert (outcome.reason, outcome.detail) == (
        "blocked",
        "two-addresses.test resolves to 127.0.0.2, in a blocked network (127.0.0.2/32)",
    )


async def test_tcp_with_the_system_resolver(session: Any, listener: int) -> None:
    prober = Prober(session, [], None)
    assert (await prober.run(_tcp("127.0.0.1", listener))).detail == f"connected to 127.0.0.1:{listener}"
    unencodable = await prober.run(_tcp("a..b", listener))
    assert (unencodable.reason, unencodable.detail) == (
        "dns",
        "cannot resolve a..b: the name cannot be encoded for DNS (IDNA: label empty or too long)",
    )
    bad_port = await prober.run(_tcp("127.0.0.1", 70000))
    assert (bad_port.reason, bad_port.detail) == ("connect", "port 70000 is not a TCP port (1-65535)")


# ---- the agent ---------------------------------------------------------------------------------------------------


async def test_unreadable_agent_answers_are_agent(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    json_type = [("Content-Type", "application/json")]
    deep = b"[" * 100_000 + b"]" * 100_000
    answers = {
        "deep.service": (response(headers=json_type, body=deep), "agent", "JSON nested too deeply to read"),
        "deep-error.service": (
            response("500 Internal Server Error", headers=json_type, body=deep),
            "agent",
            "agent answered 500 Internal Server Error with JSON nested too deeply to read",
        ),
        "huge-number.service": (
            response(headers=json_type, body=b'{"success": true, "data": {"healthy": ' + b"1" * 5000 + b"}}"),
            "agent",
            "not JSON",
        ),
        "garbled-http.service": (b"NOT HTTP\r\n\r\n", "protocol", "not valid HTTP"),
    }
    for name, (raw, _, _) in answers.items():
        raw_http.set(SERVICES_PREFIX + name, raw)
    checks = await create_checks(
        admin, [{"check_type": "service", "service_name": name} for name in answers], agent_url=raw_http.base_url
    )
    for (name, (_, reason, words)), result in zip(answers.items(), await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (False, reason), (name, result)
        assert words in result["detail"], (name, result)


async def test_a_long_agent_answer_is_cut_everywhere_it_is_kept(
    admin: httpx.AsyncClient, db: asyncpg.Connection, fake_agent: FakeAgent, events: EventCapture
) -> None:
    long_state = "activating-" + "x" * 200_000
    fake_agent.set(
        "long.service", {"name": "long.service", "active_state": long_state, "sub_state": "start", "healthy": False}
    )
    host_id = await new_host(admin, agent_url=fake_agent.base_url)
    check = await create_check(admin, host_id, check_type="service", service_name="long.service")
    reply = await run_now(admin, check)
    check_id = uuid.UUID(check["id"])

    def bounded(detail: str) -> None:
        assert len(detail) == DETAIL_LIMIT and detail.endswith("…"), len(detail)
        assert detail.startswith("long.service is activating-xxx")

    assert reply["reason"] == "status"
    bounded(reply["detail"])
    for row in await db.fetch("SELECT detail FROM check_results WHERE check_id = $1", check_id):
        bounded(row["detail"])
    bounded(await db.fetchval("SELECT last_detail FROM check_state WHERE check_id = $1", check_id))
    for event in await events.wait_for("check.result", lambda event: event.data["check_id"] == check["id"]):
        bounded(str(event.data["detail"]))
    for event in await events.wait_for("check.status_changed", lambda event: event.data["check_id"] == check["id"]):
        bounded(str(event.data["detail"]))
    shown = (await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{check['id']}")).json()
    bounded(shown["last_result"]["detail"])
    for item in (await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{check['id']}/results")).json()["items"]:
        bounded(item["detail"])


# ---- credentials never in a detail ------------------------------------------------------------------------------


async def test_no_credential_reaches_a_detail(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer, events: EventCapture
) -> None:
    secrets = ["pw-SECRET-1", "pw-SECRET-2", "pw-SECRET-3", "pw-SECRET-4", "hunter2-SECRET-5", "db-SECRET-6"]
    with refused_port() as closed:
        redirects = {
            "/to-credentials": f"http://user:pw-SECRET-1@127.0.0.1:{closed}/x",
            "/to-ftp": "ftp://user:pw-SECRET-2@127.0.0.1/",
            "/to-no-url": "http://user:pw-SECRET-3@[::1",
            "/loop": f"http://user:pw-SECRET-4@127.0.0.1:{raw_http.port}/loop",
        }
        for path, location in redirects.items():
            raw_http.set(path, response("302 Found", headers=[("Location", location)]))
        host_id = await new_host(admin)
        checks = [
            await create_check(admin, host_id, **http(raw_http.url(path), follow_redirects=True)) for path in redirects
        ]
        # A target that echoes the check's own password and Authorization back in a broken answer.
        encoded = base64.b64encode(b"monitor:hunter2-SECRET-5").decode()
        raw_http.set("/echo", f"GARBAGE hunter2-SECRET-5 {encoded}\r\n\r\n".encode())
        checks.append(
            await create_check(
                admin,
                host_id,
                **http(raw_http.url("/echo"), basic_auth_user="monitor", basic_auth_pass="hunter2-SECRET-5"),
            )
        )
        # An agent whose error message names a password.
        error = {"success": False, "error": "login failed: password=db-SECRET-6 for user app"}
        raw_http.set(
            SERVICES_PREFIX + "db.service", response("500 Internal Server Error", body=json.dumps(error).encode())
        )
        agent_host = await new_host(admin, agent_url=raw_http.base_url)
        checks.append(await create_check(admin, agent_host, check_type="service", service_name="db.service"))
        results = await run_all(admin, checks)

    to_credentials, to_ftp, to_no_url, loop, echo, agent = results
    assert (to_credentials["reason"], to_credentials["detail"]) == (
        "connect",
        f"connection refused by 127.0.0.1:{closed}",
    )
    assert to_ftp["reason"] == "protocol" and "only http and https redirects are followed" in to_ftp["detail"]
    assert to_no_url["reason"] == "protocol" and "not a valid URL" in to_no_url["detail"]
    assert loop["reason"] == "status" and "more than 10 redirects" in loop["detail"]
    assert echo["reason"] == "protocol" and "***" in echo["detail"]
    assert (agent["reason"], agent["detail"]) == (
        "agent",
        "agent answered 500 Internal Server Error: login failed: password=*** for user app",
    )
    check_ids = [uuid.UUID(check["id"]) for check in checks]
    stored = [
        row["detail"] for row in await db.fetch("SELECT detail FROM check_results WHERE check_id = ANY($1)", check_ids)
    ]
    stored += [
        row["last_detail"]
        for row in await db.fetch("SELECT last_detail FROM check_state WHERE check_id = ANY($1)", check_ids)
    ]
    published = await events.wait_for(
        "check.result", lambda event: event.data["check_id"] in {c["id"] for c in checks}, count=len(checks)
    )
    seen = "\n".join([json.dumps(results), *stored, *(event.body.decode() for event in published)])
    for secret in [*secrets, encoded]:
        assert secret not in seen, secret


# ---- logs --------------------------------------------------------------------------------------------------------


async def test_status_changes_are_logged_one_line_each(
    admin: httpx.AsyncClient, fake_agent: FakeAgent, poller: ServiceProcess
) -> None:
    fake_agent.set("app.service", "unhealthy")
    host_id = await new_host(admin, agent_url=fake_agent.base_url)
    check = await create_check(admin, host_id, check_type="service", service_name="app.service")
    await run_now(admin, check)

    def logged(message: str, **fields: str) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in poller.log_text().splitlines() if line.startswith("{")]
        return [entry for entry in entries if entry["message"] == message and fields.items() <= entry.items()]

    async with asyncio.timeout(10):
        while not (
            logged("check status changed", check_id=check["id"]) and logged("host status changed", host_id=host_id)
        ):
            await asyncio.sleep(0.1)
    (check_line,) = logged("check status changed", check_id=check["id"])
    assert check_line | {"host_id": host_id, "previous": "unknown", "current": "unhealthy"} == check_line
    (host_line,) = logged("host status changed", host_id=host_id)
    assert (host_line["previous"], host_line["current"]) == ("unknown", "unhealthy")
