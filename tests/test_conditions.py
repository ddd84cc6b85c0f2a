"""http checks' `condition` (CEL) and `min_cert_days`, and every http result's `cert_expires_at` (CONTRACT §3, §4),
through the real API and poller against real peers: nginx, and raw servers on 127.0.0.1 (over TLS with
certificates made here with `cryptography`, expiring when a test needs).

Also what must never happen: a runaway condition holding up the other checks of its poller, or a worker process
outliving a poller that was stopped (SIGTERM) or killed (SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import itertools
import json
import os
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.nginx import JSON_BODY, NginxServer
from tests.support.processes import ServiceProcess, exclusive_poller
from tests.support.raw_http import RawHttpServer, response
from tests.test_poller import create_check, http, new_host, run_now

pytestmark = pytest.mark.usefixtures("poller")

# 9 million comparisons, all true: seconds of CPU with the GIL held, were it run on the poller's event loop.
RUNAWAY = "json.all(x, json.all(y, x == y))"
SAME_3000 = json.dumps([1] * 3000).encode()
# Each element doubles a 1 MiB body: past the workers' 256 MiB within a hundred or so, in about half a second.
MEMORY_HOG = "json.map(x, body + body).size() > 0"
HOG_BODY = (json.dumps([0] * 1000) + " " * (1024 * 1024 - 6000)).encode()
ACTUATOR = {
    "status": "UP",
    "components": {
        "db": {"status": "UP", "details": {"database": "PostgreSQL", "validationQuery": "isValid()"}},
        "diskSpace": {"status": "UP", "details": {"total": 499963174912, "free": 91300069376, "threshold": 10485760}},
        "ping": {"status": "UP"},
    },
}


# ---- certificates made here ---------------------------------------------------------------------------------


def certificate_files(directory: Path, not_after: dt.datetime, *, days_valid_before: float = 1) -> tuple[Path, Path]:
    """A new self-signed certificate for 127.0.0.1 that ends at `not_after`, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "healthgate-test")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=days_valid_before + 30))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{not_after.timestamp():.0f}.crt", directory / f"{not_after.timestamp():.0f}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def tls_context(directory: Path, not_after: dt.datetime, *, days_valid_before: float = 1) -> ssl.SSLContext:
    """A server context with a new self-signed certificate for 127.0.0.1 that ends at `not_after`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate_files(directory, not_after, days_valid_before=days_valid_before))
    return context


def in_days(days: float) -> dt.datetime:
    """A notAfter `days` from now, to the second (X.509 times have no fraction)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).replace(microsecond=0)


@contextlib.contextmanager
def tls_server(tmp_path: Path, not_after: dt.datetime) -> Iterator[RawHttpServer]:
    with RawHttpServer(ssl_context=tls_context(tmp_path, not_after)) as server:
        server.set("/json", response(headers=[("Content-Type", "application/json")], body=b'{"status":"UP"}'))
        server.set("/missing", response("404 Not Found", body=b"no"))
        server.set("/empty", response("204 No Content"))
        server.set("/head", response(headers=[("Content-Length", "15")], content_length=False))  # a HEAD's answer
        yield server


ANY_END = "any"


def expires(result: dict[str, Any]) -> dt.datetime | None:
    value = result["cert_expires_at"]
    return None if value is None else dt.datetime.fromisoformat(value)


async def check_each(admin: httpx.AsyncClient, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Create each check (on hosts of 5) and run it once, all at the same time."""
    checks = []
    for start in range(0, len(cases), 5):
        host_id = await new_host(admin)
        checks += [await create_check(admin, host_id, **fields) for fields in cases[start : start + 5]]
    return list(await asyncio.gather(*(run_now(admin, check) for check in checks)))


# ---- the API --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ('json.status == "UP" &&', "does not compile: line 1, column 23: Syntax error: mismatched input '<EOF>'"),
        (
            'json.status == "UP"\n  && body.split(",").size() > 1',
            "does not compile: line 2, column 11: unknown function",
        ),
        ("(" * 120 + "true" + ")" * 120, "does not compile: line 1, column 97: nested too deeply"),
        ('status == 200 && "unterminated', "does not compile: line 1, column 18: Syntax error: token recognition"),
    ],
)
async def test_a_condition_that_does_not_compile_is_refused_saying_where(
    admin: httpx.AsyncClient, condition: str, message: str
) -> None:
    host_id = await new_host(admin)
    answer = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json={"name": "c", **http("http://127.0.0.1/", condition=condition)},
    )
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    (error,) = answer.json()["errors"]
    assert error["field"] == "condition" and error["message"].startswith(message), error


ODD_CONDITIONS = [
    "(" * 499 + "1" + ")" * 499,
    "[" * 500 + "]" * 500,
    "!" * 995 + "true",
    "1" + "+1" * 499,
    "true && \x00",
    'body == "\x00"',
    "\ud800 == 1",
    '"\ud83d" == body',
    "true \u202e&& false",
    '"' + "\\" * 998 + '"',
    "9" * 1000,
    "x" * 1000,
    "x" * 1001,
    "json.all(x, json.all(y, json.all(z, x == y)))",
    '"a".matches("(")',
    "\n" * 999 + "1",
    "\t\r\x0b\x0c true",
    "b'\\xff' == bytes(body)",
]


async def test_odd_conditions_are_stored_or_refused_never_a_crash(
    admin: httpx.AsyncClient, api: ServiceProcess
) -> None:
    host_id = await new_host(admin)
    url = f"/api/v1/hosts/{host_id}/health-checks"
    for number, condition in enumerate(ODD_CONDITIONS):
        started = time.monotonic()
        body = {"name": f"c{number}", **http("http://127.0.0.1/", condition=condition, enabled=False)}
        # As JSON escapes (a lone surrogate is valid JSON text as "\\ud800", not as UTF-8).
        answer = await admin.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert answer.status_code in (201, 422), (condition[:40], answer.text)
        assert time.monotonic() - started < 2, condition[:40]
        if answer.status_code == 201:
            assert answer.json()["condition"] == condition
            assert (await admin.delete(f"{url}/{answer.json()['id']}")).status_code == 204
        else:
            assert [error["field"] for error in answer.json()["errors"]] == ["condition"], answer.text
    async with httpx.AsyncClient(base_url=api.base_url) as plain:
        assert (await plain.get("/health/live")).status_code == 200


async def test_condition_and_min_cert_days_are_stored_and_shown(admin: httpx.AsyncClient, nginx: NginxServer) -> None:
    condition = 'json.status == "up"\n&& latency_ms < 5000'
    check = await create_check(
        admin, await new_host(admin), **http(nginx.https_url("/json"), condition=condition, min_cert_days=7)
    )
    assert (check["condition"], check["min_cert_days"]) == (condition, 7)
    result = await run_now(admin, check)
    assert (result["healthy"], result["reason"]) == (True, "ok"), result
    assert result["detail"].startswith("status 200 OK, certificate valid ")
    assert result["detail"].endswith(" more days, condition true")
    shown = (await admin.get(f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}")).json()
    assert shown["last_result"]["cert_expires_at"] == result["cert_expires_at"] is not None


# ---- conditions against real peers ----------------------------------------------------------------------------


async def test_conditions_over_json_headers_latency_and_body(admin: httpx.AsyncClient, nginx: NginxServer) -> None:
    url = nginx.http_url("/json")
    assert JSON_BODY == '{"status":"up"}'
    cases: list[tuple[dict[str, Any], bool, str, str]] = [
        (http(url, condition='json.status == "up"'), True, "ok", "status 200 OK, condition true"),
        (
            http(url, condition='json.status == "UP"'),
            False,
            "condition",
            'status 200 OK, but the condition is false: json.status == "UP"; it read json={"status":"up"}',
        ),
        (http(url, condition='headers["content-type"] == "application/json"'), True, "ok", "condition true"),
        (http(url, condition='headers["server"].startsWith("nginx") && status == 200'), True, "ok", "condition true"),
        (
            http(url, condition='headers["x-missing"] == "1"'),
            False,
            "condition",
            'status 200 OK, but the condition failed (no such key: \'x-missing\'): headers["x-missing"] == "1"; '
            'it read headers={"server":"nginx',
        ),
        (http(url, condition="latency_ms < 10000.0 && latency_ms > 0.0"), True, "ok", "condition true"),
        (
            http(url, condition="latency_ms < 0.001"),
            False,
            "condition",
            "the condition is false: latency_ms < 0.001; it read latency_ms=",
        ),
        (
            http(url, condition="json.nope == 1"),
            False,
            "condition",
            "status 200 OK, but the condition failed (no such key: 'nope'): json.nope == 1",
        ),
        (http(url, condition="json.status"), False, "condition", 'the condition gave a string ("up"), not true or'),
        (http(url, condition='body.contains("\\"up\\"") && body.matches("^\\\\{")'), True, "ok", "condition true"),
        (http(url, condition="cert_days_left == null"), True, "ok", "condition true"),  # no TLS
        (http(url, method="HEAD", condition='body == "" && json == null'), True, "ok", "condition true"),
        # The contract's rules come first: the status, then the body.
        (http(nginx.http_url("/status/503"), condition="true"), False, "status", "503 Service Unavailable"),
        (http(url, expected_body="down", condition="false"), False, "body", "does not contain 'down'"),
        (http(url, expected_body="up", condition="status == 200"), True, "ok", "body contains 'up', condition true"),
    ]
    results = await check_each(admin, [fields for fields, *_ in cases])
    for (fields, healthy, reason, words), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (healthy, reason), (fields, result)
        assert words in result["detail"], (fields, result)
        assert result["cert_expires_at"] is None


async def test_conditions_over_realistic_answers(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    actuator_type = ("Content-Type", "application/vnd.spring-boot.actuator.v3+json")
    raw_http.set("/actuator/health", response(headers=[actuator_type], body=json.dumps(ACTUATOR).encode()))
    readyz = "[+]ping ok\n[+]etcd ok\n[-]informer-sync failed: reason withheld\nreadyz check failed\n"
    raw_http.set("/readyz", response("500 Internal Server Error", body=readyz.encode()))
    raw_http.set(
        "/cookies",
        response(headers=[("Set-Cookie", "a=1"), ("X-Node", "n1"), ("Set-Cookie", "session=s3cr3t")], body=b"{}"),
    )
    actuator, ready, cookies = (raw_http.url(path) for path in ("/actuator/health", "/readyz", "/cookies"))
    all_up = 'json.status == "UP" && json.components.all(c, json.components[c].status == "UP")'
    cases: list[tuple[dict[str, Any], bool, str, str]] = [
        (http(actuator, condition=all_up), True, "ok", "condition true"),
        (
            http(actuator, condition="json.components.diskSpace.details.free > 100000000000"),
            False,
            "condition",
            "the condition is false",
        ),
        (
            http(ready, expected_status="200,500", condition='!body.matches("(?m)^\\\\[-\\\\]")'),
            False,
            "condition",
            '; it read body="[+]ping ok\\n[+]etcd ok\\n[-]informer-sync',
        ),
        (http(ready, expected_status="5xx", condition='body.contains("[+]etcd ok")'), True, "ok", "condition true"),
        (
            http(cookies, condition='headers["set-cookie"] == "a=1, session=s3cr3t" && headers["x-node"] == "n1"'),
            True,
            "ok",
            "condition true",
        ),
        (
            http(cookies, condition='headers["x-node"] == "n2"'),
            False,
            "condition",
            'it read headers={"set-cookie":"<redacted>","x-node":"n1","content-length":"2","connection":"close"}',
        ),
    ]
    results = await check_each(admin, [fields for fields, *_ in cases])
    for (fields, healthy, reason, words), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (healthy, reason), (fields, result)
        assert words in result["detail"], (fields, result)
        assert "s3cr3t" not in result["detail"]


# ---- certificates -------------------------------------------------------------------------------------------


async def test_certificates_and_min_cert_days(admin: httpx.AsyncClient, nginx: NginxServer, tmp_path: Path) -> None:
    soon, gone = in_days(5), in_days(-2)
    with tls_server(tmp_path, soon) as five_days, tls_server(tmp_path, gone) as expired:
        # The end of validity each result must carry: a date, None, or ANY_END (nginx's own, some date).
        json_url, expired_url = five_days.url("/json"), expired.url("/json")
        cases: list[tuple[dict[str, Any], bool, str, str, dt.datetime | str | None]] = [
            (
                http(json_url, min_cert_days=7),
                False,
                "cert",
                f"status 200 OK, but the certificate expires on {soon:%Y-%m-%d %H:%M:%S} UTC, in 5.0 days, fewer "
                "than min_cert_days (7)",
                soon,
            ),
            (http(json_url, min_cert_days=7, condition="true"), False, "cert", "fewer than", soon),
            (http(json_url, min_cert_days=3), True, "ok", "certificate valid 5.0 more days", soon),
            (
                http(json_url, condition="cert_days_left > 30.0"),
                False,
                "condition",
                "the condition is false: cert_days_left > 30.0; it read cert_days_left=5.0",
                soon,
            ),
            (http(json_url, condition="cert_days_left > 4.9 && cert_days_left < 5.0"), True, "ok", "true", soon),
            # Unhealthy for another reason, or answered without a body: the certificate is still read.
            (http(five_days.url("/missing"), min_cert_days=7), False, "status", "404 Not Found", soon),
            (http(five_days.url("/head"), method="HEAD"), True, "ok", "status 200 OK", soon),
            (http(five_days.url("/empty")), True, "ok", "status 204 No Content", soon),
            (
                http(expired_url, min_cert_days=0),
                False,
                "cert",
                f"the certificate expired on {gone:%Y-%m-%d %H:%M:%S} UTC, 2.0 days ago (min_cert_days is 0)",
                gone,
            ),
            (http(expired_url), True, "ok", "status 200 OK", gone),
            # Verified: a self-signed certificate fails the handshake (and is then not read).
            (
                http(json_url, ignore_cert_errors=False, min_cert_days=1),
                False,
                "tls",
                "certificate verify failed",
                None,
            ),
            (http(nginx.https_url("/ok"), min_cert_days=29), True, "ok", "certificate valid", ANY_END),
            (http(nginx.http_url("/ok")), True, "ok", "status 200 OK", None),
        ]
        results = await check_each(admin, [fields for fields, *_ in cases])
    for (fields, healthy, reason, words, end), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (healthy, reason), (fields, result)
        assert words in result["detail"], (fields, result)
        if end == ANY_END:
            assert expires(result) is not None and result["cert_expires_at"].endswith(("Z", "+00:00")), result
        else:
            assert expires(result) == end, (fields, result)


PASSWORD = 'pa"ss\\w0rd!Tr0ub4dor'  # a quote and a backslash, which a detail's JSON shows escaped


async def test_a_conditions_detail_never_shows_a_credential(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    """The check's password echoed by the target (escaped as JSON shows it, or where a value is cut), a cookie named
    by a condition's result or error, a token in a field named for it: none reaches a stored detail, not even in
    part, inline or in a worker."""
    echo = json.dumps({"ok": False, "you_sent": PASSWORD, "auth": {"token": "tok-8f2a3b1c"}}).encode()
    raw_http.set("/echo", response(headers=[("Content-Type", "application/json")], body=echo))
    raw_http.set("/echo-late", response(body=b"y" * 150 + PASSWORD.encode()))
    cookie = "JSESSIONID=8F2A3B1C9D7E6F5A"
    raw_http.set("/cookie", response(headers=[("Set-Cookie", cookie)], body=b"{}"))
    auth = {"basic_auth_user": "monitor", "basic_auth_pass": PASSWORD}
    conditions = [
        (raw_http.url("/echo"), "json.ok == true"),
        (raw_http.url("/echo"), 'json.exists(key, key == "nothing") || json.ok == true'),  # in a worker
        (raw_http.url("/echo"), "json[json.you_sent] == 1"),
        (raw_http.url("/echo"), "json.you_sent"),
        (raw_http.url("/echo-late"), 'body == "x"'),
        (raw_http.url("/echo-late"), 'body.matches("^x")'),
        (raw_http.url("/cookie"), 'headers["set-cookie"]'),
        (raw_http.url("/cookie"), 'json[headers["set-cookie"]] == 1'),
        (raw_http.url("/cookie"), 'headers.exists(name, name == "x") || json[headers["set-cookie"]] == 1'),
    ]
    results = await check_each(admin, [http(url, condition=condition, **auth) for url, condition in conditions])
    for (_url, condition), result in zip(conditions, results, strict=True):
        assert (result["healthy"], result["reason"]) == (False, "condition"), (condition, result)
        detail = result["detail"]
        for start in range(len(PASSWORD) - 5):
            part = PASSWORD[start : start + 6]
            assert part not in detail and json.dumps(part)[1:-1] not in detail, (condition, part, detail)
        assert "8f2a3b1c" not in detail.lower(), (condition, detail)


async def test_a_renewed_certificate_is_read_at_the_next_run(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    """A server that renews its certificate without closing the connections it has open (Go's GetCertificate,
    Envoy, Caddy, HAProxy do so): the next run reads the new certificate, not the one of a connection kept alive
    from an earlier run."""
    old, renewed = in_days(5), in_days(90)
    context = tls_context(tmp_path, old)
    with RawHttpServer(ssl_context=context, keep_alive=True) as server:
        server.set(
            "/json", response(headers=[("Content-Type", "application/json")], body=b'{"status":"UP"}', close=False)
        )
        check = await create_check(admin, await new_host(admin), **http(server.url("/json"), min_cert_days=30))
        first = await run_now(admin, check)
        assert (first["healthy"], first["reason"], expires(first)) == (False, "cert", old), first
        context.load_cert_chain(*certificate_files(tmp_path, renewed, days_valid_before=90))  # for new handshakes
        second = await run_now(admin, check)
        connections = server.connections
    assert (second["healthy"], second["reason"], expires(second)) == (True, "ok", renewed), second
    assert connections == 2  # one of its own for each run


async def test_a_certificate_not_valid_yet_fails_min_cert_days(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    """A certificate whose validity starts in two days (a clock ahead, a certificate deployed early): not valid now,
    so it does not "stay valid" any number of days, whether or not the check verifies it (by default it does not)."""
    ends = in_days(60)
    starts = ends - dt.timedelta(days=58)
    with RawHttpServer(ssl_context=tls_context(tmp_path, ends, days_valid_before=28)) as server:
        server.set("/json", response(headers=[("Content-Type", "application/json")], body=b'{"status":"UP"}'))
        results = await check_each(
            admin, [http(server.url("/json"), min_cert_days=0), http(server.url("/json"), min_cert_days=30)]
        )
        unchecked = await check_each(admin, [http(server.url("/json"))])
    for result in results:
        assert (result["healthy"], result["reason"], expires(result)) == (False, "cert", ends), result
        assert result["detail"].startswith(
            f"status 200 OK, but the certificate is not valid until {starts:%Y-%m-%d %H:%M:%S} UTC, in 2.0 days"
        ), result
    assert (unchecked[0]["healthy"], expires(unchecked[0])) == (True, ends)  # without min_cert_days: ignored


async def test_an_answer_that_is_not_http_still_carries_the_certificate(
    admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The handshake succeeded, then the server sent no valid HTTP: the result is `protocol`, and still carries the
    certificate's end of validity, as one whose body breaks off does (CONTRACT §4: for TLS checks)."""
    ends = in_days(20)
    with tls_server(tmp_path, ends) as server:
        server.set("/garbage", b"GARBAGE\r\n\r\n")
        server.set("/short", response(body=b"abc").replace(b"Content-Length: 3", b"Content-Length: 10"))
        results = await check_each(admin, [http(server.url("/garbage")), http(server.url("/short"), condition="true")])
    for result in results:
        assert (result["healthy"], result["reason"], expires(result)) == (False, "protocol", ends), result


# ---- runaways --------------------------------------------------------------------------------------------------


async def test_a_runaway_condition_does_not_hold_up_the_other_checks(
    admin: httpx.AsyncClient, nginx: NginxServer, raw_http: RawHttpServer
) -> None:
    raw_http.set("/same", response(body=SAME_3000))
    raw_http.set("/hog", response(body=HOG_BODY))
    runaway_host, quick_host = await new_host(admin), await new_host(admin)
    runaways = [
        await create_check(admin, runaway_host, **http(raw_http.url("/same"), condition=RUNAWAY)) for _ in range(3)
    ]
    hog = await create_check(admin, runaway_host, **http(raw_http.url("/hog"), condition=MEMORY_HOG))
    quick = [
        await create_check(admin, quick_host, **http(nginx.http_url("/json"), condition='json.status == "up"')),
        await create_check(admin, quick_host, **http(nginx.http_url("/ok"))),
        await create_check(admin, quick_host, check_type="tcp", address="127.0.0.1", port=nginx.http_port),
    ]

    async def quick_rounds(until: float) -> list[tuple[float, dict[str, Any]]]:
        seen = []
        while time.monotonic() < until:
            for check in quick:
                asked = time.monotonic()
                result = await run_now(admin, check)
                seen.append((time.monotonic() - asked, result))
                assert result["healthy"], result
            await asyncio.sleep(0.05)
        return seen

    started = time.monotonic()
    slow = asyncio.gather(*(run_now(admin, check) for check in [*runaways, hog, *runaways]))
    quick_results = await quick_rounds(started + 4)
    slow_results = await slow
    for result in slow_results[:3] + slow_results[4:]:
        assert (result["healthy"], result["reason"]) == (False, "condition"), result
        assert result["detail"] == f"status 200 OK, but the condition took longer than 1 s and was stopped: {RUNAWAY}"
    # The hog is stopped by whichever limit it reaches first: the memory cap in about half a second on a quiet
    # machine, the 1 s deadline on a loaded one (seen in a full run beside other test processes). Which words it
    # gets for the cap alone is tested in tests/unit/test_poller_conditions.py (test_memory_is_capped).
    assert (slow_results[3]["healthy"], slow_results[3]["reason"]) == (False, "condition"), slow_results[3]
    assert slow_results[3]["detail"] in (
        f"status 200 OK, but the condition ran out of memory (more than 256 MiB) and was stopped: {MEMORY_HOG}",
        f"status 200 OK, but the condition took longer than 1 s and was stopped: {MEMORY_HOG}",
    ), slow_results[3]
    # Meanwhile every quick check was answered, promptly and measured as quick by the poller: its event loop never
    # stalled behind the runaways (which keep both condition workers busy for several seconds).
    # (On the event loop, one runaway alone would have held it for about 3 s; the bounds leave room for a busy box.)
    assert len(quick_results) >= 10, quick_results
    assert max(result["latency_ms"] for _, result in quick_results) < 500, quick_results
    assert max(wall for wall, _ in quick_results) < 2.0, quick_results


async def test_an_edited_condition_takes_effect_at_the_next_run(
    admin: httpx.AsyncClient, raw_http: RawHttpServer
) -> None:
    """The poller caches compiled conditions, and remembers those that ran away, by their text: a PUT that changes
    the condition (a runaway fixed, a condition cleared) is what the very next run evaluates."""
    raw_http.set("/same", response(body=SAME_3000))
    # Its own runaway texts: RUNAWAY may be a known runaway of the shared poller already (another test's), and a
    # known one that finds both workers busy with other tests' conditions is answered "not evaluated".
    runaway = f'{RUNAWAY} || "{uuid.uuid4().hex}" == ""'
    # Disabled, so that only these /test runs evaluate it: the first run a create or an edit schedules would
    # otherwise race them for the two condition workers (a known runaway then finds none free, and is answered
    # "not evaluated": seen in a full run).
    check = await create_check(
        admin, await new_host(admin), **http(raw_http.url("/same"), condition=runaway, enabled=False)
    )
    path = f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}"
    fields = {"name": check["name"], "check_type": "http", "url": raw_http.url("/same"), "enabled": False}
    assert (await run_now(admin, check))["detail"].endswith(f"took longer than 1 s and was stopped: {runaway}")
    for condition, healthy, words in [
        ("json.all(x, x == 1)", True, "status 200 OK, condition true"),
        ("json.all(x, x == 2)", False, "the condition is false: json.all(x, x == 2)"),
        (None, True, "status 200 OK"),
        (runaway.replace(" ", ""), False, "took longer than 1 s and was stopped"),
    ]:
        assert (await admin.put(path, json=fields | {"condition": condition})).status_code == 200
        result = await run_now(admin, check)
        assert result["healthy"] is healthy and words in result["detail"], (condition, result)


def condition_workers(poller: ServiceProcess) -> list[int]:
    """The pids of the poller's condition worker processes (its children running services.poller.conditions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == poller.process.pid and fields[0] != "Z":
                if b"services.poller.conditions" in (stat.parent / "cmdline").read_bytes():
                    found.append(int(stat.parent.name))
    return found


def child_states(pid: int) -> dict[int, str]:
    """The state letters (R, S, Z, ...) of a process's children, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(stat.parent.name)] = fields[0]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# A worker's start (Python, then the library, which imports its command-line tool too) takes about 0.25 s of CPU:
# a worker past this is evaluating.
BUSY_CPU_SECONDS = 0.45


@contextlib.asynccontextmanager
async def runaway_running(admin: httpx.AsyncClient, url: str, poller: ServiceProcess) -> AsyncIterator[list[int]]:
    """A /test of a runaway condition in flight, and the pids of the poller's condition workers once one of them is
    evaluating it (tried again if the poller stopped it at its 1 s deadline before this saw it busy)."""
    check = await create_check(admin, await new_host(admin), **http(url, condition=RUNAWAY, timeout_seconds=30))
    asking: asyncio.Future[dict[str, Any]] | None = None
    try:
        for _attempt in range(5):
            asking = asyncio.ensure_future(run_now(admin, check))
            deadline = time.monotonic() + 20
            while not asking.done() and time.monotonic() < deadline:
                workers = condition_workers(poller)
                if any(cpu_seconds(pid) >= BUSY_CPU_SECONDS for pid in workers):
                    yield workers
                    return
                await asyncio.sleep(0.02)
            await asking
        raise AssertionError("no condition worker was seen evaluating")
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
async def test_a_stopped_poller_leaves_no_condition_worker(
    admin: httpx.AsyncClient,
    raw_http: RawHttpServer,
    poller: ServiceProcess,
    service_env: dict[str, str],
    tmp_path: Path,
    stop: signal.Signals,
) -> None:
    raw_http.set("/same", response(body=SAME_3000))
    with exclusive_poller(poller, service_env, tmp_path / "poller.log") as own:
        async with runaway_running(admin, raw_http.url("/same"), own) as workers:
            status = await asyncio.to_thread(own.stop, stop)
        assert status == (0 if stop == signal.SIGTERM else -signal.SIGKILL), own.log_text()[-2000:]
        # Within a second: sooner than the runaway would end by itself (seconds), which would also close the worker
        # (it exits when its stdin closes); after SIGKILL only PR_SET_PDEATHSIG can end it that soon.
        deadline = time.monotonic() + 1
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)]
        if stop == signal.SIGTERM:
            assert "Traceback" not in own.log_text()


async def results_of(db: asyncpg.Connection, check: dict[str, Any]) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT checked_at, healthy, reason, detail FROM check_results WHERE check_id = $1 ORDER BY checked_at",
        uuid.UUID(check["id"]),
    )


STOPPED_WORDS = (
    "the condition took longer than 1 s and was stopped",
    "the condition was not evaluated: it was stopped at its last evaluation, and every condition worker is busy",
)


@pytest.mark.slow
async def test_many_runaway_conditions_on_a_schedule_hold_up_no_other_check(
    admin: httpx.AsyncClient,
    db: asyncpg.Connection,
    nginx: NginxServer,
    raw_http: RawHttpServer,
    poller: ServiceProcess,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Forty runaway conditions on a 10 s interval, far more than two workers can stop in time: the poller's other
    checks keep their interval, and a condition that runs in a worker in milliseconds is still evaluated. (Before,
    the runaways queued for a worker until their timeouts, holding every tick the poller takes at once: a plain http
    check ran 22 s after its first run instead of 10, and the quick condition timed out.)"""
    raw_http.set("/same", response(body=SAME_3000))
    with exclusive_poller(poller, service_env, tmp_path / "poller.log") as own:
        runaway_hosts = [await new_host(admin) for _ in range(8)]
        runaways = [
            await create_check(
                admin,
                host_id,
                **http(raw_http.url("/same"), condition=RUNAWAY, interval_seconds=10, timeout_seconds=30),
            )
            for host_id in runaway_hosts
            for _ in range(5)
        ]
        quick_host = await new_host(admin)
        quick = [
            await create_check(admin, quick_host, **http(nginx.http_url("/ok"), interval_seconds=10)),
            await create_check(
                admin, quick_host, check_type="tcp", address="127.0.0.1", port=nginx.http_port, interval_seconds=10
            ),
            # `matches` runs in a worker: this one waits for the same two workers as the runaways.
            await create_check(
                admin,
                quick_host,
                **http(nginx.http_url("/json"), condition='json.status.matches("^up$")', interval_seconds=10),
            ),
        ]
        # Until every check has three results, within the 36 s the checks below allow.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 36
        while loop.time() < deadline and any([len(await results_of(db, check)) < 3 for check in quick + runaways]):
            await asyncio.sleep(0.5)
        # Dozens of workers were killed at their deadline and replaced meanwhile: each was reaped, none is left over.
        children = child_states(own.process.pid)
        assert "Z" not in children.values() and len(condition_workers(own)) <= 2, children
        quick_results = [await results_of(db, check) for check in quick]
        runaway_results = [await results_of(db, check) for check in runaways]
        for host_id in [*runaway_hosts, quick_host]:  # before the session's poller is back
            assert (await admin.delete(f"/api/v1/hosts/{host_id}")).status_code == 204
        log_text = own.log_text()
    for check, rows in zip(quick, quick_results, strict=True):
        assert len(rows) >= 3 and all(row["healthy"] for row in rows), (check, rows)
        gaps = [
            (later["checked_at"] - earlier["checked_at"]).total_seconds() for earlier, later in itertools.pairwise(rows)
        ]
        assert all(gap <= 11.5 for gap in gaps), (check, gaps)
    for check, rows in zip(runaways, runaway_results, strict=True):  # each ends in a result, in words, on time too
        assert len(rows) >= 3, (check, rows)
        for row in rows:
            assert (row["healthy"], row["reason"]) == (False, "condition"), row
            assert row["detail"].startswith(tuple(f"status 200 OK, but {words}" for words in STOPPED_WORDS)), row
    assert "Traceback" not in log_text
