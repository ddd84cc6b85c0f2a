"""grpc checks through the API and the session's poller against real gRPC servers of the test's own (grpcio's
health servicer on 127.0.0.1, tests/support/grpc_server.py), plaintext and TLS with certificates made here:
serving statuses, unknown services, TLS verified against a test CA (SSL_CERT_FILE), not verified, or ignored,
`cert_expires_at`, and peers that refuse, stay silent, speak HTTP/1 or garbage, or sit in a blocked network."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from shared.events import ScheduledRun, Tick
from shared.topology import POLLER_TICK_QUEUE
from tests.support.blackhole import Blackhole, refused_port
from tests.support.certificates import CertificateAuthority, KeyPair, self_signed
from tests.support.grpc_server import GrpcHealthServer
from tests.support.nginx import NginxServer
from tests.support.processes import ServiceProcess, exclusive_poller, start_poller
from tests.support.raw_http import RawHttpServer
from tests.support.services import BackingServices
from tests.test_poller import check_once, create_check, new_host

pytestmark = pytest.mark.usefixtures("poller")


def grpc(port: int, **fields: Any) -> dict[str, Any]:
    return {"check_type": "grpc", "address": "127.0.0.1", "port": port} | fields


def ends_at(result: dict[str, Any]) -> dt.datetime | None:
    value = result["cert_expires_at"]
    return None if value is None else dt.datetime.fromisoformat(value)


async def test_serving_statuses(admin: httpx.AsyncClient, grpc_health: GrpcHealthServer) -> None:
    what = f"127.0.0.1:{grpc_health.port}"
    cases: list[tuple[dict[str, Any], bool, str, str]] = [
        (grpc(grpc_health.port), True, "ok", f"{what}: the server is SERVING"),
        (grpc(grpc_health.port, grpc_service="payments"), True, "ok", f"{what}: service 'payments' is SERVING"),
        (grpc(grpc_health.port, grpc_service="batch"), False, "status", f"{what}: service 'batch' is NOT_SERVING"),
        (grpc(grpc_health.port, grpc_service="legacy"), False, "status", f"{what}: service 'legacy' is UNKNOWN"),
        (grpc(grpc_health.port, grpc_service="nope"), False, "status",
         f"{what}: service 'nope' is unknown to the server (NOT_FOUND)"),
    ]  # fmt: skip
    results = await asyncio.gather(*(check_once(admin, **fields) for fields, *_ in cases))
    for (fields, healthy, reason, detail), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"], result["detail"]) == (healthy, reason, detail), fields
        assert result["cert_expires_at"] is None  # no TLS


async def test_tls_without_verification(admin: httpx.AsyncClient) -> None:
    """ignore_cert_errors (the default) takes any certificate: self-signed, expired, another name's. Without it,
    the system's roots decide. Every result after a handshake carries the certificate's end, unhealthy ones too."""
    lone, expired, other = self_signed(), self_signed(days=-1), self_signed(dns_names=["other.test"], ips=())
    with GrpcHealthServer(tls=lone) as server, GrpcHealthServer(tls=expired) as old, \
            GrpcHealthServer(tls=other) as misnamed:  # fmt: skip
        server.set("batch", "NOT_SERVING")
        cases: list[tuple[dict[str, Any], KeyPair, bool, str, str]] = [
            (grpc(server.port, tls=True), lone, True, "ok", "the server is SERVING"),
            (grpc(server.port, tls=True, grpc_service="batch"), lone, False, "status", "'batch' is NOT_SERVING"),
            (grpc(old.port, tls=True), expired, True, "ok", "the server is SERVING"),
            (grpc(misnamed.port, tls=True), other, True, "ok", "the server is SERVING"),
            (grpc(server.port, tls=True, ignore_cert_errors=False), lone, False, "tls",
             "certificate verify failed: self-signed certificate"),
        ]  # fmt: skip
        results = await asyncio.gather(*(check_once(admin, **fields) for fields, *_ in cases))
    for (fields, pair, healthy, reason, detail), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (healthy, reason), (fields, result)
        assert detail in result["detail"], (fields, result)
        assert ends_at(result) == pair.not_after, (fields, result)


async def test_tls_verified_against_the_roots_the_poller_trusts(
    admin: httpx.AsyncClient, service_env: dict[str, str], tmp_path: Path, poller: ServiceProcess
) -> None:
    """The poller verifies with OpenSSL's default roots, which SSL_CERT_FILE replaces (as for http checks): a
    poller given the test CA verifies its certificates, and still refuses one for another name."""
    ca = CertificateAuthority()
    good, misnamed = ca.issue(ips=["127.0.0.1"]), ca.issue(dns_names=["other.test"])
    trusting = {"SSL_CERT_FILE": str(ca.write(tmp_path / "ca.pem"))}
    with GrpcHealthServer(tls=good) as server, GrpcHealthServer(tls=misnamed) as other, \
            exclusive_poller(poller, service_env, tmp_path / "poller.log", **trusting):  # fmt: skip
        verified = await check_once(admin, **grpc(server.port, tls=True, ignore_cert_errors=False))
        wrong_name = await check_once(admin, **grpc(other.port, tls=True, ignore_cert_errors=False))
        plaintext = await check_once(admin, **grpc(server.port))  # a TLS server asked without TLS
    assert (verified["healthy"], verified["reason"]) == (True, "ok"), verified
    assert ends_at(verified) == good.not_after
    assert (wrong_name["reason"], wrong_name["detail"]) == (
        "tls", "certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1'."
    )  # fmt: skip
    assert ends_at(wrong_name) == misnamed.not_after
    assert (plaintext["healthy"], plaintext["cert_expires_at"]) == (False, None)
    assert plaintext["reason"] in ("connect", "protocol"), plaintext


async def test_peers_that_are_not_grpc_servers(
    admin: httpx.AsyncClient, nginx: NginxServer, raw_http: RawHttpServer, grpc_health: GrpcHealthServer
) -> None:
    raw_http.set("*", b"garbage, not HTTP/2\r\n\r\n")  # gRPC's HTTP/2 preface reads as "PRI * HTTP/2.0"
    with refused_port() as closed, Blackhole() as silent:
        refused = await check_once(admin, **grpc(closed))
        quiet = await check_once(admin, **grpc(silent.port, timeout_seconds=0.5))
        http1 = await check_once(admin, **grpc(nginx.http_port))
        garbage = await check_once(admin, **grpc(raw_http.port))
        https1 = await check_once(admin, **grpc(nginx.https_port, tls=True))
        tls_to_plaintext = await check_once(admin, **grpc(grpc_health.port, tls=True))
    assert (refused["reason"], refused["detail"]) == ("connect", f"connection refused by 127.0.0.1:{closed}")
    assert (quiet["reason"], quiet["detail"]) == ("timeout", "timed out after 0.5 s")
    assert silent.accepted >= 1  # the connection opened (the scheduled first run may open one too); no answer came
    assert http1["reason"] == "protocol" and "Trying to connect an http1.x server" in http1["detail"], http1
    assert http1["detail"].startswith(f"127.0.0.1:{nginx.http_port} did not answer as a gRPC server: ")
    assert garbage["reason"] == "protocol" and "Failed parsing HTTP/2" in garbage["detail"], garbage
    # nginx's TLS port has no HTTP/2: it picks http/1.1 of the protocols offered (ALPN).
    assert (https1["reason"], https1["detail"]) == (
        "protocol", f"127.0.0.1:{nginx.https_port} chose http/1.1 in TLS (ALPN), not HTTP/2: not a gRPC server"
    )  # fmt: skip
    assert https1["cert_expires_at"] is not None
    assert tls_to_plaintext["reason"] == "tls" and "TLS handshake with" in tls_to_plaintext["detail"], tls_to_plaintext
    assert "unix-abstract" not in " ".join(result["detail"] for result in (http1, garbage, https1))


async def test_blocked_addresses_are_refused_before_any_packet(
    admin: httpx.AsyncClient, service_env: dict[str, str], tmp_path: Path, poller: ServiceProcess
) -> None:
    metadata = await check_once(admin, **grpc(50051, address="169.254.169.254"))
    assert (metadata["reason"], metadata["detail"]) == (
        "blocked", "169.254.169.254 is in a blocked network (169.254.0.0/16)"
    )  # fmt: skip
    blocking_loopback = {"HEALTHGATE_BLOCKED_NETWORKS": "127.0.0.0/8,::1/128,169.254.0.0/16"}
    with Blackhole() as target, exclusive_poller(poller, service_env, tmp_path / "poller.log", **blocking_loopback):
        result = await check_once(admin, **grpc(target.port, tls=True))
        assert (result["reason"], result["detail"]) == ("blocked", "127.0.0.1 is in a blocked network (127.0.0.0/8)")
    assert target.accepted == 0


def http2_frame(kind: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 §4.1) on stream 0, without flags: a test peer's bytes, never parsed here."""
    return struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", kind, 0, 0) + payload


SETTINGS, GOAWAY = 0x4, 0x7
ENHANCE_YOUR_CALM = 0xB


def new_log_lines(poller: ServiceProcess, since: int) -> list[str]:
    return poller.log_text()[since:].splitlines()


async def test_what_a_server_sends_reaches_the_pollers_log_only_as_its_own_json_lines(
    admin: httpx.AsyncClient, raw_http: RawHttpServer, poller: ServiceProcess
) -> None:
    """A GOAWAY's debug data is the server's text: gRPC's C core would write it to stderr itself (absl logging, not
    JSON, escape sequences and all). The check says what happened; the log holds only the poller's JSON lines."""
    marker = f"debug-{uuid.uuid4().hex}"
    debug = f"\x1b[31m{marker}\nforged line".encode()
    goaway = struct.pack("!II", 0, ENHANCE_YOUR_CALM) + debug  # last stream id 0, error code, debug data
    # gRPC's preface reads as the request line "PRI * HTTP/2.0"; the connection stays open after the GOAWAY.
    raw_http.set("*", http2_frame(SETTINGS, b"") + http2_frame(GOAWAY, goaway), hold=5)
    since = len(poller.log_text())
    result = await check_once(admin, **grpc(raw_http.port))
    assert (result["reason"], result["detail"].split(" (")[0]) == (
        "status", f"127.0.0.1:{raw_http.port} answered UNAVAILABLE: Stream removed"
    ), result  # fmt: skip
    assert "GOAWAY received; Error code: 11" in result["detail"], result
    assert "\\x1b[31m" in result["detail"] and "\\x0aforged line" in result["detail"], result  # escaped, one line
    await asyncio.sleep(0.5)  # anything the poller wrote about the run is in its log by now
    lines = new_log_lines(poller, since)
    assert not any(marker in line or "GOAWAY" in line for line in lines), lines
    assert all(isinstance(json.loads(line), dict) for line in lines), lines


async def test_a_server_that_says_goaway_and_closes_is_never_said_to_refuse(
    admin: httpx.AsyncClient, raw_http: RawHttpServer
) -> None:
    """gRPC either reports the GOAWAY or, having reconnected, its reconnect, which the relay refuses (it takes one
    connection): "Connection refused" there is the relay's, not the server's, which accepted the connection."""
    goaway = struct.pack("!II", 0, ENHANCE_YOUR_CALM)
    raw_http.set("*", http2_frame(SETTINGS, b"") + http2_frame(GOAWAY, goaway))  # and closes
    what = f"127.0.0.1:{raw_http.port}"
    for _ in range(3):  # which of the two gRPC reports depends on timing
        result = await check_once(admin, **grpc(raw_http.port))
        assert result["reason"] in ("protocol", "status"), result
        assert "refused" not in result["detail"].lower(), result
        closed = "it closed the connection after 26 bytes, without answering the call"
        assert result["detail"] == f"{what} did not answer as a gRPC server: {closed}" or (
            "GOAWAY received; Error code: 11" in result["detail"]
        ), result


async def test_an_answer_that_is_not_a_health_check_response_is_protocol(
    admin: httpx.AsyncClient, poller: ServiceProcess
) -> None:
    """grpcio would log its failure to read the message with a traceback and hand back None; the result says what
    the server answered instead."""
    since = len(poller.log_text())
    with GrpcHealthServer(answer=b"\xff\xff\xff") as broken:
        result = await check_once(admin, **grpc(broken.port))
    assert (result["healthy"], result["reason"]) == (False, "protocol"), result
    assert result["detail"].startswith(f"127.0.0.1:{broken.port} answered a message that cannot be read: "), result
    assert "grpc.health.v1.HealthCheckResponse" in result["detail"], result
    await asyncio.sleep(0.5)
    lines = new_log_lines(poller, since)
    assert not any('"exception"' in line or "deserializ" in line for line in lines), lines


async def unscheduled_grpc_checks(db: asyncpg.Connection, port: int, count: int) -> list[uuid.UUID]:
    """`count` grpc checks of 127.0.0.1:`port` on one host, which the scheduler leaves alone (no schedule row, and
    more than the API's five per host): only the test's tick runs them, all at once."""
    host_id = uuid.uuid4()
    await db.execute(
        'INSERT INTO hosts (id, name, "group") VALUES ($1, $2, $3)', host_id, f"fds-{host_id.hex[:6]}", "grpc"
    )
    check_ids = [uuid.uuid4() for _ in range(count)]
    for index, check_id in enumerate(check_ids):
        await db.execute(
            """
            INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port, address,
                                       grpc_service, tls, ignore_cert_errors)
            VALUES ($1, $2, $3, 'grpc', 3600, 10, $4, '127.0.0.1', '', false, true)
            """,
            check_id, host_id, f"grpc-{index}", port,
        )  # fmt: skip
        await db.execute("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", check_id, host_id)
    return check_ids


def open_file_limits(pid: int) -> tuple[int, int]:
    """A process's soft and hard limits of open files, as the kernel shows them (/proc/PID/limits)."""
    line = next(
        line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if line.startswith("Max open files")
    )
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.mark.slow
async def test_a_poller_started_with_a_low_open_file_limit_runs_many_grpc_checks_at_once(
    db: asyncpg.Connection,
    backing: BackingServices,
    exchange_name: str,
    service_env: dict[str, str],
    tmp_path: Path,
    poller: ServiceProcess,
) -> None:
    """A grpc check holds four descriptors while it runs; containers and systemd services start a process with a
    soft limit of 1024, which 256 checks at once (the poller's concurrency) exceed. The poller raises its soft limit
    to the hard one at start (as Go programs do), so a tick of many grpc checks runs whole. Here: a soft limit of
    128 and 64 checks in one tick."""
    poller.stop()  # only the test's poller takes the tick
    try:
        with GrpcHealthServer() as server:
            own = start_poller(service_env, tmp_path / "low-limit.log", open_files=128)
            try:
                assert open_file_limits(own.process.pid)[0] == open_file_limits(own.process.pid)[1] > 128
                check_ids = await unscheduled_grpc_checks(db, server.port, 64)
                tick = Tick(runs=[ScheduledRun(check_id=check_id) for check_id in check_ids])
                connection = await aio_pika.connect(backing.amqp_url)
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange(exchange_name)
                    message = aio_pika.Message(tick.model_dump_json().encode(), content_type="application/json")
                    await exchange.publish(message, POLLER_TICK_QUEUE.bindings[0])
                async with asyncio.timeout(30):
                    while await db.fetchval(
                        "SELECT count(*) FROM check_results WHERE check_id = ANY($1)", check_ids
                    ) < len(check_ids):
                        await asyncio.sleep(0.2)
            finally:
                own.stop()
        rows = await db.fetch("SELECT healthy, detail FROM check_results WHERE check_id = ANY($1)", check_ids)
        failed = [row["detail"] for row in rows if not row["healthy"]]
        assert failed == [], failed[:3]
        assert "raised the open-file limit from 128 to " in own.log_text()
    finally:
        poller.restart()


@pytest.mark.slow
async def test_sigterm_with_grpc_calls_in_flight_stops_the_poller_in_time_and_quietly(
    admin: httpx.AsyncClient,
    raw_http: RawHttpServer,
    service_env: dict[str, str],
    tmp_path: Path,
    poller: ServiceProcess,
) -> None:
    """Calls to a server that opens HTTP/2 and never answers, with a 60 s timeout: on SIGTERM the poller hands its
    tick back after its grace period and exits, within the 20 s of CONTRACT §1, its log JSON lines only (no
    traceback of a cancelled channel, relay or gRPC shutdown)."""
    raw_http.set("*", http2_frame(SETTINGS, b""), hold=90)
    poller.stop()  # only the test's poller runs the checks
    try:
        own = start_poller(service_env, tmp_path / "own.log")
        host_id = await new_host(admin)
        for _ in range(5):
            await create_check(admin, host_id, **grpc(raw_http.port, timeout_seconds=60))
        async with asyncio.timeout(15):
            while len(raw_http.request_log()) < 5:  # every check's call is in flight (first runs within 5 s)
                await asyncio.sleep(0.1)
        started = time.monotonic()
        code = own.stop(signal.SIGTERM, timeout=30)
        took = time.monotonic() - started
        assert code == 0 and took < 20, (code, took, own.log_text()[-2000:])
        lines = own.log_text().splitlines()
        assert all(isinstance(json.loads(line), dict) for line in lines), lines
        assert not any('"exception"' in line for line in lines), lines
    finally:
        poller.restart()
