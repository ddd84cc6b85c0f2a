"""The test peers themselves work: the real nginx, the fake host agent, the blackholes, dnsmasq and the gRPC health
servers (tests/support)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.blackhole import Blackhole, refused_port, slow_port, unanswered_port
from tests.support.certificates import CertificateAuthority, self_signed
from tests.support.dns_server import BIG_STRINGS, WEB_IPV4, Dnsmasq, UdpSink
from tests.support.fake_agent import CLIENT_CN, SERVICES_PREFIX, FakeAgent
from tests.support.grpc_server import GrpcHealthServer
from tests.support.nginx import (
    BASIC_AUTH_PASSWORD,
    BASIC_AUTH_USER,
    BIG_EARLY_MARKER,
    BIG_LATE_MARKER,
    BIG_SIZE,
    BLOCKED_REDIRECT_TARGET,
    GZIP_BODY,
    STATUS_CODES,
    NginxServer,
)
from tests.support.raw_http import RawHttpServer, response


def _both(server: NginxServer, path: str) -> list[tuple[str, ssl.SSLContext | bool]]:
    return [(server.http_url(path), True), (server.https_url(path), server.ssl_context())]


# --- nginx ------------------------------------------------------------------------------------------------------
def test_nginx_ok_on_both_ports(nginx: NginxServer) -> None:
    for url, verify in _both(nginx, "/ok"):
        response = httpx.get(url, verify=verify)
        assert response.status_code == 200
        assert response.text == "all good\n"
        assert response.headers["content-type"].startswith("text/plain")


def test_nginx_json(nginx: NginxServer) -> None:
    response = httpx.get(nginx.http_url("/json"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "up"}


def test_nginx_gzip(nginx: NginxServer) -> None:
    compressed = httpx.get(nginx.http_url("/gzip"), headers={"Accept-Encoding": "gzip"})
    assert compressed.headers["content-encoding"] == "gzip"
    assert compressed.text == GZIP_BODY  # httpx undid it
    plain = httpx.get(nginx.http_url("/gzip"), headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == GZIP_BODY


def test_nginx_https_verifies_against_its_cert(nginx: NginxServer) -> None:
    assert nginx.cert_path.exists() and nginx.key_path.exists()
    by_ip = httpx.get(nginx.https_url("/ok"), verify=nginx.ssl_context())

    def by(name: str) -> httpx.Response:
        """Verified against `name` (TLS server name and hostname check) while connecting to 127.0.0.1: the name
        is never looked up. A client of its own each time: a pooled connection would skip the handshake."""
        with httpx.Client(verify=nginx.ssl_context()) as client:
            return client.get(nginx.https_url("/ok"), extensions={"sni_hostname": name})

    by_name = by("localhost")
    with pytest.raises(httpx.ConnectError, match="certificate"):  # the name is what is verified
        by("other.test")
    assert by_ip.status_code == by_name.status_code == 200

    strict = nginx.ssl_context()  # the default from Python 3.13 on
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    assert httpx.get(nginx.https_url("/ok"), verify=strict).status_code == 200


def test_nginx_https_without_trust_fails_with_a_certificate_error(nginx: NginxServer) -> None:
    with pytest.raises(httpx.ConnectError) as failure:
        httpx.get(nginx.https_url("/ok"))  # the system trust store does not know the self-signed cert
    assert "CERTIFICATE_VERIFY_FAILED" in str(failure.value)
    # ...and ignoring certificate errors gets through.
    assert httpx.get(nginx.https_url("/ok"), verify=False).status_code == 200


def test_nginx_basic_auth(nginx: NginxServer) -> None:
    for url, verify in _both(nginx, "/basic"):
        anonymous = httpx.get(url, verify=verify)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic ")
        wrong = httpx.get(url, verify=verify, auth=(BASIC_AUTH_USER, "wrong"))
        assert wrong.status_code == 401
        right = httpx.get(url, verify=verify, auth=(BASIC_AUTH_USER, BASIC_AUTH_PASSWORD))
        assert right.status_code == 200
        assert right.text == "authorised\n"
    assert (nginx.basic_auth_user, nginx.basic_auth_password) == ("monitor", "s3cret-pass")


def test_nginx_big_body(nginx: NginxServer) -> None:
    response = httpx.get(nginx.http_url("/big"))
    assert response.status_code == 200
    assert len(response.content) == BIG_SIZE == 2 * 1024 * 1024
    assert 0 <= response.content.find(BIG_EARLY_MARKER.encode()) < 1024 - len(BIG_EARLY_MARKER)
    assert response.content.find(BIG_LATE_MARKER.encode()) > 1536 * 1024
    assert response.content.count(b"NEEDLE") == 2


@pytest.mark.parametrize("code", STATUS_CODES)
def test_nginx_status_codes(nginx: NginxServer, code: int) -> None:
    for url, verify in _both(nginx, f"/status/{code}"):
        response = httpx.get(url, verify=verify)
        assert response.status_code == code
        if code in (301, 302):
            assert response.headers["location"] == "/ok"
    assert httpx.get(nginx.http_url("/no-such-path")).status_code == 404


def test_nginx_redirects(nginx: NginxServer) -> None:
    one = httpx.get(nginx.http_url("/redirect"), follow_redirects=True)
    assert (one.status_code, one.url.path, len(one.history)) == (200, "/ok", 1)

    chain = httpx.get(nginx.https_url("/redirect-chain"), verify=nginx.ssl_context(), follow_redirects=True)
    assert (chain.status_code, chain.text, len(chain.history)) == (200, "all good\n", 2)
    assert [hop.headers["location"] for hop in chain.history] == ["/redirect", "/ok"]

    loop = httpx.get(nginx.http_url("/redirect-loop"))
    assert (loop.status_code, loop.headers["location"]) == (302, "/redirect-loop")
    with pytest.raises(httpx.TooManyRedirects):
        with httpx.Client(follow_redirects=True, max_redirects=5) as client:
            client.get(nginx.http_url("/redirect-loop"))

    blocked = httpx.get(nginx.http_url("/redirect-to-blocked"))  # never follow this one here
    assert (blocked.status_code, blocked.headers["location"]) == (302, BLOCKED_REDIRECT_TARGET)


def test_nginx_server_stops_cleanly() -> None:
    with NginxServer() as server:
        assert server.process is not None
        pid = server.process.pid
        directory = server.directory
        assert httpx.get(server.http_url("/ok")).status_code == 200
    assert server.process is None
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # master and workers are gone
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- fake agent -------------------------------------------------------------------------------------------------
def test_agent_healthy_and_unhealthy(fake_agent: FakeAgent) -> None:
    fake_agent.services.update({"nginx": "healthy", "cron": "unhealthy", "old": "inactive"})
    healthy = httpx.get(fake_agent.url("nginx"))
    assert healthy.status_code == 200
    body = healthy.json()
    assert body["success"] is True
    assert body["data"]["name"] == "nginx"
    assert (body["data"]["active_state"], body["data"]["sub_state"], body["data"]["healthy"]) == (
        "active",
        "running",
        True,
    )
    assert isinstance(body["data"]["description"], str)

    unhealthy = httpx.get(fake_agent.url("cron")).json()["data"]
    assert (unhealthy["active_state"], unhealthy["sub_state"], unhealthy["healthy"]) == ("failed", "failed", False)
    inactive = httpx.get(fake_agent.url("old")).json()["data"]
    assert (inactive["active_state"], inactive["sub_state"], inactive["healthy"]) == ("inactive", "dead", False)

    assert fake_agent.base_url.startswith("http://127.0.0.1:")
    assert fake_agent.requests == [
        (SERVICES_PREFIX + "nginx", None),
        (SERVICES_PREFIX + "cron", None),
        (SERVICES_PREFIX + "old", None),
    ]


@pytest.mark.parametrize("code", [400, 404, 500, 503])
def test_agent_error_statuses(fake_agent: FakeAgent, code: int) -> None:
    fake_agent.services["svc"] = f"status={code}"
    response = httpx.get(fake_agent.url("svc"))
    assert response.status_code == code
    assert response.json()["success"] is False
    assert response.json()["error"]


def test_agent_unknown_service_and_paths(fake_agent: FakeAgent) -> None:
    unknown = httpx.get(fake_agent.url("nope"))
    assert unknown.status_code == 404
    assert unknown.json() == {"success": False, "error": "service 'nope' not found"}
    assert httpx.get(fake_agent.base_url + "/elsewhere").status_code == 404
    fake_agent.services["svc"] = "healthy"
    assert httpx.post(fake_agent.url("svc")).status_code == 405


def test_agent_bad_json(fake_agent: FakeAgent) -> None:
    fake_agent.services["svc"] = "bad_json"
    response = httpx.get(fake_agent.url("svc"))
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_agent_hang_times_out_and_slow_is_slow(fake_agent: FakeAgent) -> None:
    fake_agent.services.update({"stuck": "hang", "lazy": "slow=0.5", "lazy-bad": "slow=0.2:unhealthy"})
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(fake_agent.url("stuck"), timeout=0.5)
    assert time.monotonic() - started < 3

    started = time.monotonic()
    slow = httpx.get(fake_agent.url("lazy"), timeout=5)
    assert time.monotonic() - started >= 0.5
    assert slow.json()["data"]["healthy"] is True
    assert httpx.get(fake_agent.url("lazy-bad"), timeout=5).json()["data"]["healthy"] is False
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(fake_agent.url("lazy"), timeout=0.1)
    assert fake_agent.requests[0][0] == SERVICES_PREFIX + "stuck"  # recorded even unanswered


def test_agent_behaviour_changes_and_custom_data(fake_agent: FakeAgent) -> None:
    fake_agent.services["svc"] = "healthy"
    with httpx.Client() as client:  # keep-alive across changes
        assert client.get(fake_agent.url("svc")).json()["data"]["healthy"] is True
        fake_agent.set("svc", "status=500")
        assert client.get(fake_agent.url("svc")).status_code == 500
        fake_agent.services["svc"] = {"name": "svc", "active_state": "reloading", "sub_state": "x", "healthy": True}
        assert client.get(fake_agent.url("svc")).json()["data"]["active_state"] == "reloading"
    assert len(fake_agent.requests_for("svc")) == 3


async def test_agent_from_async_code(fake_agent: FakeAgent) -> None:
    fake_agent.services.update({"a": "healthy", "b": "slow=0.3"})
    async with httpx.AsyncClient(base_url=fake_agent.base_url) as client:
        started = time.monotonic()
        responses = [await client.get(SERVICES_PREFIX + "a"), await client.get(SERVICES_PREFIX + "b")]
    assert [r.status_code for r in responses] == [200, 200]
    assert time.monotonic() - started >= 0.3


def test_agent_tls_without_client_certificates() -> None:
    with FakeAgent({"svc": "healthy"}, tls=True) as agent:
        assert agent.base_url.startswith("https://")
        context = agent.client_ssl_context(with_client_cert=False)
        assert httpx.get(agent.url("svc"), verify=context).json()["data"]["healthy"] is True
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(agent.url("svc"))
        assert agent.requests == [(SERVICES_PREFIX + "svc", None)]


def test_agent_mtls_requires_a_client_certificate_from_its_ca(mtls_agent: FakeAgent) -> None:
    mtls_agent.services["svc"] = "healthy"
    assert mtls_agent.env() == {
        "HEALTHGATE_AGENT_CA_FILE": str(mtls_agent.ca_path),
        "HEALTHGATE_AGENT_CERT_FILE": str(mtls_agent.client_cert_path),
        "HEALTHGATE_AGENT_KEY_FILE": str(mtls_agent.client_key_path),
    }
    with pytest.raises(httpx.TransportError):
        httpx.get(mtls_agent.url("svc"), verify=mtls_agent.client_ssl_context(with_client_cert=False))

    rogue = ssl.create_default_context(cafile=str(mtls_agent.ca_path))
    rogue.load_cert_chain(str(mtls_agent.certs.rogue_client_cert), str(mtls_agent.certs.rogue_client_key))
    with pytest.raises(httpx.TransportError):
        httpx.get(mtls_agent.url("svc"), verify=rogue)
    assert mtls_agent.requests == []  # refused during the handshake, before any request

    # What a poller built from HEALTHGATE_AGENT_* does: trust the CA, present the client cert.
    context = ssl.create_default_context(cafile=str(mtls_agent.ca_path))
    context.load_cert_chain(str(mtls_agent.client_cert_path), str(mtls_agent.client_key_path))
    strict = mtls_agent.client_ssl_context()
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    for verify in (context, strict):
        response = httpx.get(mtls_agent.url("svc"), verify=verify)
        assert response.status_code == 200
        assert response.json()["data"]["healthy"] is True
    assert mtls_agent.requests == [(SERVICES_PREFIX + "svc", f"CN={CLIENT_CN}")] * 2


def test_agent_stops_cleanly() -> None:
    before = threading.active_count()
    agent = FakeAgent({"stuck": "hang"}).start()
    cert_dir = agent.certs.directory
    port = agent.port
    outcome: list[BaseException] = []

    def wait_for_stuck() -> None:
        try:
            httpx.get(agent.url("stuck"), timeout=10)
        except httpx.TransportError as error:
            outcome.append(error)

    hanging = threading.Thread(target=wait_for_stuck)
    hanging.start()
    deadline = time.monotonic() + 5
    while not agent.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.stop()  # cuts the hanging request too
    hanging.join(5)
    assert not hanging.is_alive()
    assert len(outcome) == 1  # the client saw the connection end, not an answer
    assert threading.active_count() == before
    assert not cert_dir.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/")


# --- blackholes -------------------------------------------------------------------------------------------------
def test_blackhole_accepts_and_never_answers() -> None:
    with Blackhole() as hole:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(hole.url("/ok"), timeout=0.5)
        assert time.monotonic() - started < 3
        assert hole.accepted == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(hole.url("/ok"), timeout=1)


def test_refused_port() -> None:
    with refused_port() as port:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError, match=r"refused|Connect call failed|111"):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert time.monotonic() - started < 1


def test_unanswered_port_makes_connects_time_out() -> None:
    with unanswered_port() as port:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3


# --- raw HTTP server and slow port ------------------------------------------------------------------------------
def test_raw_http_server_answers_exact_bytes(raw_http: RawHttpServer) -> None:
    raw_http.set("/exact", response(headers=[("X-Thing", "1")], body=b"hello"))
    raw_http.set("/late", response(body=b"late"), delay=0.3)
    answer = httpx.get(raw_http.url("/exact?q=1"))
    assert (answer.status_code, answer.headers["x-thing"], answer.text) == (200, "1", "hello")
    started = time.monotonic()
    assert httpx.get(raw_http.url("/late")).text == "late"
    assert time.monotonic() - started >= 0.3
    assert httpx.get(raw_http.url("/unset")).status_code == 404
    assert raw_http.request_log()[0].startswith(b"GET /exact?q=1 HTTP/1.1\r\n")
    raw_http.set("/garbage", b"NOT HTTP AT ALL\r\n\r\n")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(raw_http.url("/garbage"))


def test_slow_port_opens_late() -> None:
    with slow_port(0.3) as port:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert time.monotonic() - started >= 0.3


def test_slow_port_is_slow_however_late_the_connect_begins() -> None:
    with slow_port(0.3) as port:
        time.sleep(0.6)  # a test that takes its time before its check connects
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert time.monotonic() - started >= 0.3


# --- dnsmasq and the UDP sink -----------------------------------------------------------------------------------
def _ask(server: Dnsmasq, name: str, record_type: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, record_type), "127.0.0.1", port=server.port, timeout=5)


def test_dnsmasq_serves_its_records_and_nothing_else(dnsmasq: Dnsmasq) -> None:
    web = _ask(dnsmasq, "web.test", "A")
    assert sorted(item.to_text() for rrset in web.answer for item in rrset) == sorted(WEB_IPV4)
    assert web.flags & dns.flags.AA  # authoritative for test
    assert [rrset.to_text() for rrset in _ask(dnsmasq, "test", "NS").answer] == ["test. 600 IN NS ns.test."]
    assert dns.rcode.to_text(_ask(dnsmasq, "nope.test", "A").rcode()) == "NXDOMAIN"
    assert dns.rcode.to_text(_ask(dnsmasq, "outside.invalid", "A").rcode()) == "REFUSED"  # never forwarded
    assert _ask(dnsmasq, "big.test", "TXT").flags & dns.flags.TC  # too large for UDP without EDNS
    whole = dns.query.tcp(dns.message.make_query("big.test", "TXT"), "127.0.0.1", port=dnsmasq.port, timeout=5)
    assert b"".join(whole.answer[0][0].strings) == "".join(BIG_STRINGS).encode()


def test_udp_sink_counts_and_never_answers() -> None:
    with UdpSink() as sink:
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("web.test", "A"), "127.0.0.1", port=sink.port, timeout=0.3)
        assert sink.received == 1


# --- gRPC health servers ----------------------------------------------------------------------------------------
def _check(channel: grpc.Channel, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def test_grpc_health_server_statuses(grpc_health: GrpcHealthServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_health.port}") as channel:
        statuses = [_check(channel, service) for service in ("", "payments", "batch", "legacy", "nope")]
    assert statuses == ["SERVING", "SERVING", "NOT_SERVING", "UNKNOWN", "NOT_FOUND"]


def test_grpc_tls_server_with_a_certificate_of_a_test_ca() -> None:
    ca = CertificateAuthority()
    pair = ca.issue(dns_names=["grpc.test"], ips=(), days=10)
    with GrpcHealthServer(tls=pair) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        options = [("grpc.ssl_target_name_override", "grpc.test")]  # verified by the name; connected to 127.0.0.1
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials, options=options) as channel:
            assert _check(channel, "") == "SERVING"
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    assert cert.not_valid_after_utc == pair.not_after
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["grpc.test"]
    expired = x509.load_pem_x509_certificate(self_signed(days=-1).cert_pem)
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC) and expired.issuer == expired.subject
