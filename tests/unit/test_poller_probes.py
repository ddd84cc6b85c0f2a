"""services/poller/probes.py, in this process and without any network beyond 127.0.0.1: `expected_status`
matching, failure classification (CONTRACT §4 reasons and an operator's words), blocked networks, how URLs and
credentials are shown, the agent's answer, and names resolved by resolvers of the test's own (never DNS).

The same functions run against real peers in tests/test_probes.py and tests/test_poller.py."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import re
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
import yarl
from aiohttp import http_exceptions
from aiohttp.client_reqrep import ConnectionKey
from cryptography import x509
from hypothesis import example, given
from hypothesis import strategies as st

from services.api.schemas import EXPECTED_STATUS_PATTERN, HttpCheckWrite
from services.poller import probes
from services.poller.probes import (
    AddrInfo,
    CheckTarget,
    ProtocolViolation,
    UnencodableName,
    classify_failure,
    describe_status,
    host_port,
    judge_agent_answer,
    probe_session,
    refuse_invalid_status,
    shown_url,
    status_matches,
)
from shared.blocked_networks import BlockedTarget, blocked_network, refuse_if_blocked
from shared.events import ResultReason
from tests.support.blackhole import Blackhole, refused_port
from tests.support.nginx import write_self_signed_cert
from tests.support.raw_http import RawHttpServer
from tests.support.raw_http import response as raw_response

REASONS = set(get_args(ResultReason))
KEY = ConnectionKey("app.test", 443, True, True, None, None, None, None)
METADATA = [ipaddress.ip_network("169.254.0.0/16")]


# ---- expected_status -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "matches"),
    [
        (200, "200", True),
        (204, "200", False),
        (204, "2xx", True),
        (299, "2xx", True),
        (300, "2xx", False),
        (404, "2XX,4xx", True),
        (503, "200,204,3xx", False),
        (301, "200, 204 ,3xx", True),  # spaces as a client may write them
        (500, "5xx", True),
        (100, "1xx", True),  # not writable through the API (2xx-5xx), still matched truly
        (599, "599", True),
        (200, "", False),
        (200, ",", False),
        (200, "abc", False),
        (200, "20", False),
        (200, "2x", False),
        (200, "2xxx", False),
        (200, "0200", True),  # a number is compared as a number
        (200, "\u0662\u0660\u0660", False),  # Arabic-Indic digits: not a code the API takes ([0-9] only)
        (200, "200,\u00b2", True),
    ],
)
def test_status_matches_codes_classes_and_lists(status: int, expected: str, matches: bool) -> None:
    assert status_matches(status, expected) is matches


statuses = st.integers(min_value=100, max_value=599)
codes = st.integers(min_value=200, max_value=599).map(str)
classes = st.sampled_from("2345").flatmap(lambda digit: st.sampled_from([f"{digit}xx", f"{digit}XX", f"{digit}xX"]))
parts = st.lists(st.one_of(codes, classes), min_size=1, max_size=6)
spaces = st.sampled_from(["", " ", "  "])


@given(statuses, parts, spaces, spaces)
def test_an_expected_status_the_api_accepts_matches_when_one_of_its_parts_does(
    status: int, items: list[str], before: str, after: str
) -> None:
    """For every value the API's pattern accepts: stored as written or as the API normalises it, a status
    matches exactly when it is one of the codes or in one of the classes."""
    written = ",".join(f"{before}{item}{after}" for item in items)
    assert re.fullmatch(EXPECTED_STATUS_PATTERN, written)
    stored = HttpCheckWrite.model_validate(
        {"check_type": "http", "name": "web", "url": "http://127.0.0.1/", "expected_status": written}
    ).expected_status
    assert stored == ",".join(item.lower() for item in items)
    truth = any(str(status)[0] == item[0] if item.lower().endswith("xx") else int(item) == status for item in items)
    assert status_matches(status, written) is truth
    assert status_matches(status, stored) is truth


@given(statuses, st.text(max_size=40))
@example(100, "\u00b2")  # a digit to str.isdigit, not to int()
@example(200, "\u0662\u0660\u0660")  # Arabic-Indic 200: int() reads it, the API's pattern does not
def test_any_expected_status_text_is_answered_without_error(status: int, expected: str) -> None:
    assert status_matches(status, expected) in (True, False)


def test_status_codes_are_described_with_their_phrase_when_they_have_one() -> None:
    assert describe_status(200) == "200 OK"
    assert describe_status(418) == "418 I'm a Teapot"
    assert describe_status(599) == "599"


@pytest.mark.parametrize("status", [0, 99, 600, 999])
def test_a_status_outside_100_to_599_is_a_protocol_violation(status: int) -> None:
    with pytest.raises(ProtocolViolation, match=f"status code {status:03d} is not a valid HTTP status"):
        refuse_invalid_status(status, "app.test:80")
    refuse_invalid_status(100, "app.test:80")
    refuse_invalid_status(599, "app.test:80")


# ---- failure classification ---------------------------------------------------------------------------------


def _certificate_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    return error


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def _idna_error(name: str) -> UnicodeError:
    try:
        name.encode("idna")
    except UnicodeError as exc:
        return exc
    raise AssertionError(f"{name!r} encodes")


CLASSIFIED: list[tuple[str, Callable[[], BaseException], ResultReason, str]] = [
    ("blocked", lambda: BlockedTarget("169.254.169.254 is in a blocked network"), "blocked",
     "169.254.169.254 is in a blocked network"),
    ("protocol violation", lambda: ProtocolViolation("app.test:443 sent a body that is not gzip"), "protocol",
     "app.test:443 sent a body that is not gzip"),
    ("unencodable", lambda: UnencodableName("cannot resolve a..b: no"), "dns", "cannot resolve a..b: no"),
    ("idna", lambda: _idna_error("a..b"), "dns", "cannot resolve app.test: the name cannot be encoded for DNS (IDNA: *"),
    ("idna behind a ValueError", lambda: _chained(ValueError("bad host"), _idna_error("a" * 64 + ".test")), "dns",
     "cannot resolve app.test: the name cannot be encoded for DNS (IDNA: *"),
    ("certificate", lambda: aiohttp.ClientConnectorCertificateError(KEY, _certificate_error()), "tls",
     "certificate verify failed: self-signed certificate"),
    ("dns", lambda: aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
     "dns", "cannot resolve app.test:443: Name or service not known"),
    ("tls", lambda: aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "[SSL] wrong version number")), "tls",
     "TLS handshake with app.test:443 failed: *"),
    ("bare ssl", lambda: ssl.SSLError(1, "handshake failure"), "tls", "TLS handshake with app.test:443 failed: *"),
    ("refused", lambda: aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")),
     "connect", "connection refused by app.test:443"),
    ("unreachable", lambda: aiohttp.ClientConnectorError(KEY, OSError(113, "No route to host")), "connect",
     "cannot connect to app.test:443: No route to host"),
    ("bare gaierror", lambda: socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "dns",
     "cannot resolve app.test:443: Temporary failure in name resolution"),
    ("bare refused", lambda: ConnectionRefusedError(111, "Connection refused"), "connect",
     "connection refused by app.test:443"),
    ("closed without answering", lambda: aiohttp.ServerDisconnectedError(), "connect",
     "app.test:443 closed the connection without answering"),
    ("closed in the headers", lambda: aiohttp.ServerDisconnectedError(message=object()), "protocol",
     "app.test:443 closed the connection in the middle of the response headers"),
    ("short body", lambda: _chained(
        aiohttp.ClientPayloadError("Response payload is not completed"),
        http_exceptions.ContentLengthError("Not enough data to satisfy content length header. received 5 of 10 bytes"),
    ), "protocol", "app.test:443 ended the body after 5 of the 10 bytes its Content-Length announced"),
    ("long header line", lambda: _chained(
        aiohttp.ClientResponseError(None, (), message="bad"),  # type: ignore[arg-type]
        http_exceptions.LineTooLong("header", 16384, 20000),
    ), "protocol", "app.test:443 sent a header line longer than 16 KiB"),
    ("bad status line", lambda: _chained(
        aiohttp.ClientResponseError(None, (), message="bad"),  # type: ignore[arg-type]
        http_exceptions.BadStatusLine("HTTP/1.1 abc"),
    ), "protocol", "app.test:443 sent an answer that is not valid HTTP: *"),
    ("payload broke", lambda: aiohttp.ClientPayloadError("Response payload is not completed"), "connect",
     "the connection to app.test:443 broke while the body was read"),
    ("unreadable answer", lambda: aiohttp.ClientResponseError(None, (), message="Invalid\nanswer\n  ^"),  # type: ignore[arg-type]
     "protocol", "app.test:443 sent an answer that cannot be read: Invalid answer"),
    ("invalid url", lambda: aiohttp.InvalidURL("https://user:secret@app.test:8443/health?token=abc#x"), "connect",
     "cannot request https://app.test:8443/health?…"),
    ("non-http url", lambda: aiohttp.NonHttpUrlClientError("ftp://app.test/file"), "connect", "cannot request ftp://app.test/file"),
    ("timeout", lambda: TimeoutError(), "timeout", "app.test:443 did not answer in time"),
    ("other client error", lambda: aiohttp.ClientOSError(104, "Connection reset by peer"), "connect",
     "connection to app.test:443 failed: [Errno 104] Connection reset by peer"),
    ("anything else", lambda: KeyError("surprise"), "connect", "app.test:443: KeyError: 'surprise'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("error", "reason", "detail"), [case[1:] for case in CLASSIFIED], ids=[c[0] for c in CLASSIFIED]
)
def test_failures_are_classified_into_a_reason_and_words(
    error: Callable[[], BaseException], reason: str, detail: str
) -> None:
    """`detail` is the whole text, or its beginning when it ends with "*" (the rest is the library's words)."""
    got_reason, got_detail = classify_failure(error(), "app.test:443")
    assert got_reason == reason, got_detail
    if detail.endswith("*"):
        assert got_detail.startswith(detail[:-1]), got_detail
    else:
        assert got_detail == detail


def test_an_idna_failure_names_an_ipv6_target_whole() -> None:
    reason, detail = classify_failure(_idna_error("a..b"), "[::1]:443")
    assert reason == "dns" and detail.startswith("cannot resolve [::1]:443: the name cannot be encoded")


def test_an_invalid_url_never_shows_its_credentials_or_query() -> None:
    _, detail = classify_failure(aiohttp.InvalidURL("http://admin:hunter2@[::1/?key=s3cret"), "app.test")
    assert "hunter2" not in detail and "s3cret" not in detail and "admin" not in detail


exceptions = st.one_of(
    st.builds(OSError, st.integers(min_value=0, max_value=200), st.text(max_size=30)),
    st.builds(ValueError, st.text(max_size=30)),
    st.builds(RuntimeError, st.text(max_size=30)),
    st.builds(aiohttp.ClientPayloadError, st.text(max_size=30)),
    st.builds(aiohttp.InvalidURL, st.text(max_size=60)),
    st.builds(ProtocolViolation, st.text(min_size=1, max_size=30)),  # raised by the prober, always with words
    st.just(TimeoutError()),
    st.builds(lambda error: aiohttp.ClientConnectorError(KEY, error), st.builds(OSError, st.integers(0, 200), st.text(max_size=30))),
)  # fmt: skip


@given(exceptions, st.text(min_size=1, max_size=40))
def test_every_exception_gets_a_contract_reason_and_some_words(error: BaseException, what: str) -> None:
    reason, detail = classify_failure(error, what)
    assert reason in REASONS and reason != "ok"
    assert isinstance(detail, str) and detail


# ---- blocked networks ------------------------------------------------------------------------------------


def test_blocked_networks_catch_v4_mapped_v6_and_zoned_addresses() -> None:
    blocked = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fd00:ec2::/32")]
    assert blocked_network("169.254.169.254", blocked) == blocked[0]
    assert blocked_network("::ffff:169.254.169.254", blocked) == blocked[0]  # the IPv4 address inside
    assert blocked_network("fd00:ec2::254%eth0", blocked) == blocked[1]
    # The unspecified address connects to the local host: it is in whatever blocks the loopback.
    local = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert blocked_network("0.0.0.0", local) == local[0] and blocked_network("::", local) == local[1]
    assert blocked_network("0.0.0.0", blocked) is None
    assert blocked_network("169.255.0.1", blocked) is None
    assert blocked_network("app.test", blocked) is None  # a name is checked once resolved
    assert blocked_network("169.254.169.254", []) is None


def test_refusing_names_the_name_and_the_address_it_resolved_to() -> None:
    with pytest.raises(BlockedTarget, match=r"^169\.254\.1\.1 is in a blocked network \(169\.254\.0\.0/16\)$"):
        refuse_if_blocked("169.254.1.1", METADATA)
    with pytest.raises(BlockedTarget, match=r"^meta\.test resolves to 169\.254\.1\.1, in a blocked network"):
        refuse_if_blocked("169.254.1.1", METADATA, name="meta.test")
    refuse_if_blocked("127.0.0.1", METADATA, name="meta.test")


# ---- what details show --------------------------------------------------------------------------------------


def test_host_port_brackets_ipv6_addresses() -> None:
    assert host_port("127.0.0.1", 80) == "127.0.0.1:80"
    assert host_port("::1", 443) == "[::1]:443"
    assert host_port("[::1]", 443) == "[::1]:443"
    assert host_port("app.test", "8080") == "app.test:8080"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@app.test:8443/a/b?token=1#frag", "https://app.test:8443/a/b?…"),
        ("HTTP://APP.test/", "http://app.test/"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://[::1]/x", "http://[::1]/x"),
        ("mailto:ops@app.test", "a mailto URL"),
        ("data:text/plain,hello", "a data URL"),
        ("no-scheme", "a URL without a scheme"),
        ("//app.test/path", "//app.test/path"),
        ("http://app.test/" + "p" * 300, "http://app.test/" + "p" * 99 + "…"),
        ("http://[::1/", None),
        ("http://app.test:99999/", None),
        ("\x00 \thttp://app.test/\r\npath", "http://app.test/path"),
    ],
)
def test_a_url_is_shown_without_userinfo_query_or_fragment(url: str, shown: str | None) -> None:
    assert shown_url(url) == shown


@given(st.text(max_size=200))
def test_shown_url_never_fails_and_never_shows_a_userinfo(url: str) -> None:
    shown = shown_url(url)
    if shown is not None and "//" in shown:
        authority = shown.split("//", 1)[1].split("/", 1)[0]
        assert "@" not in authority, shown


def test_credentials_are_sent_only_with_a_user_and_a_password_is_a_secret_even_without_one() -> None:
    target = CheckTarget(uuid.uuid4(), uuid.uuid4(), "http", 5, "h", url="http://127.0.0.1/")
    assert (target.authorization(), target.secrets()) == (None, ())
    with_user = CheckTarget(
        uuid.uuid4(), uuid.uuid4(), "http", 5, "h", url="http://127.0.0.1/", basic_auth_user="ops",
        basic_auth_pass="pä:ss",
    )  # fmt: skip
    encoded = base64.b64encode("ops:pä:ss".encode()).decode()
    assert with_user.authorization() == encoded
    assert with_user.secrets() == ("pä:ss", encoded)
    user_only = CheckTarget(uuid.uuid4(), uuid.uuid4(), "http", 5, "h", url="http://x/", basic_auth_user="ops")
    assert user_only.authorization() == base64.b64encode(b"ops:").decode()
    assert user_only.secrets() == (base64.b64encode(b"ops:").decode(),)
    password_only = CheckTarget(uuid.uuid4(), uuid.uuid4(), "http", 5, "h", url="http://x/", basic_auth_pass="s3cr3t")
    assert (password_only.authorization(), password_only.secrets()) == (None, ("s3cr3t",))


# ---- the agent's answer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw", "whole", "judged"),
    [
        (200, b'{"success": true, "data": {"healthy": true, "active_state": "active", "sub_state": "running"}}',
         True, (True, "ok", "nginx.service is active (running)")),
        (200, b'{"success": true, "data": {"healthy": false, "active_state": "failed"}}', True,
         (False, "status", "nginx.service is failed (?)")),
        (200, b'\xef\xbb\xbf{"success": true, "data": {"healthy": true}}', True, (True, "ok", "nginx.service is ? (?)")),
        (200, '{"success": true, "data": {"healthy": true}}'.encode("utf-16"), True, (True, "ok", "nginx.service is ? (?)")),
        (200, b"{}", False, (False, "agent", "agent answered 200 OK with a body larger than 1 MiB")),
        (200, b"not json", True, (False, "agent", "agent answered 200 OK with a body that is not JSON")),
        (200, b'{"success": NaN}', True, (False, "agent", "agent answered 200 OK with a body that is not JSON (NaN is not a JSON value)")),
        (200, b"\xff\xfe\x00", True, (False, "agent", "agent answered 200 OK with a body that is not JSON (not UTF-8, UTF-16 or UTF-32 text)")),
        (200, b"[" * 100_000, True, (False, "agent", "agent answered 200 OK with JSON nested too deeply to read")),
        (200, b'{"n": ' + b"9" * 5000 + b"}", True, (False, "agent", "agent answered 200 OK with JSON holding a number too large to read (more than 4300 digits)")),
        (200, b"[]", True, (False, "agent", "agent answered 200 OK with JSON that is not an object (an array)")),
        (200, b'{"data": {"healthy": true}}', True, (False, "agent", "agent answer lacks success")),
        (200, b'{"success": 1, "data": {"healthy": true}}', True, (False, "agent", "agent answer's success is not a boolean (a number)")),
        (200, b'{"success": false, "error": "unit not found"}', True, (False, "agent", "agent answer says success false: unit not found")),
        (200, b'{"success": true}', True, (False, "agent", "agent answer lacks data")),
        (200, b'{"success": true, "data": []}', True, (False, "agent", "agent answer's data is not an object (an array)")),
        (200, b'{"success": true, "data": {}}', True, (False, "agent", "agent answer lacks data.healthy")),
        (200, b'{"success": true, "data": {"healthy": "yes"}}', True, (False, "agent", "agent answer's data.healthy is not a boolean (a string)")),
        (404, b'{"success": false, "error": "no such unit"}', True, (False, "agent", "agent answered 404 Not Found: no such unit")),
        (500, b'{"message": "boom"}', True, (False, "agent", "agent answered 500 Internal Server Error: boom")),
        (503, b"[1]", True, (False, "agent", "agent answered 503 Service Unavailable")),
    ],
)  # fmt: skip
def test_the_agents_answer_is_judged_by_data_healthy_and_anything_else_is_agent(
    status: int, raw: bytes, whole: bool, judged: tuple[bool, str, str]
) -> None:
    assert judge_agent_answer(status, raw, whole, "nginx.service") == judged


@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200), st.booleans())
def test_any_agent_answer_is_judged_without_error(status: int, raw: bytes, whole: bool) -> None:
    healthy, reason, detail = judge_agent_answer(status, raw, whole, "app.service")
    assert reason in ("ok", "status", "agent") and detail
    assert healthy is (reason == "ok")


# ---- names resolved by resolvers of the test's own ------------------------------------------------------


def _stream(address: str, port: int) -> AddrInfo:
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


class FakeSystemResolver:
    """Stands in for getaddrinfo: `answers` maps a name to its addresses; any other name does not exist
    (EAI_NONAME, as the system answers for an unknown name). Records every name asked."""

    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def getaddrinfo(self, host: str, port: int, **_: Any) -> list[AddrInfo]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [_stream(address, port) for address in self.answers[host]]

    async def resolve_tcp(self, host: str, port: int) -> list[AddrInfo]:
        return await self.getaddrinfo(host, port)


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> FakeSystemResolver:
    """Names for this test only: the poller's http resolver (aiohttp's ThreadedResolver, which asks the event
    loop's getaddrinfo) gets them from a FakeSystemResolver instead of the system; so does a tcp check run by
    a Prober given `names.resolve_tcp`."""
    resolver = FakeSystemResolver({})
    threaded = aiohttp.ThreadedResolver
    monkeypatch.setattr(probes.aiohttp, "ThreadedResolver", lambda: threaded(loop=resolver))  # type: ignore[arg-type]
    return resolver


@pytest.fixture
async def session(names: FakeSystemResolver) -> AsyncIterator[aiohttp.ClientSession]:
    async with probe_session([ipaddress.ip_network("127.0.0.2/32"), *METADATA]) as http_session:
        yield http_session


def _target(check_type: str, **fields: Any) -> CheckTarget:
    return CheckTarget(uuid.uuid4(), uuid.uuid4(), check_type, timeout_seconds=5, host_name="ignored", **fields)


async def test_a_name_that_does_not_exist_is_dns(session: aiohttp.ClientSession, names: FakeSystemResolver) -> None:
    prober = probes.Prober(session, [ipaddress.ip_network("127.0.0.2/32")], None, resolve=names.resolve_tcp)
    web = await prober.run(_target("http", url="http://no-such-host.test/health"))
    tcp = await prober.run(_target("tcp", address="no-such-host.test", port=80))
    assert (web.healthy, web.reason, web.detail) == (
        False, "dns", "cannot resolve no-such-host.test: Name or service not known"
    )  # fmt: skip
    assert (tcp.healthy, tcp.reason, tcp.detail) == (
        False, "dns", "cannot resolve no-such-host.test: Name or service not known"
    )  # fmt: skip
    assert names.asked == ["no-such-host.test", "no-such-host.test"]


async def test_a_name_without_addresses_is_dns(session: aiohttp.ClientSession, names: FakeSystemResolver) -> None:
    names.answers["empty.test"] = []
    prober = probes.Prober(session, [], None, resolve=names.resolve_tcp)
    outcome = await prober.run(_target("tcp", address="empty.test", port=80))
    assert (outcome.reason, outcome.detail) == ("dns", "cannot resolve empty.test: no address")


async def test_a_name_resolving_into_a_blocked_network_is_refused_before_any_packet(
    session: aiohttp.ClientSession, names: FakeSystemResolver
) -> None:
    """The resolved address is checked, not the name, for http (aiohttp's resolver) and tcp alike, and on a
    redirect's hop too; the target never sees a connection."""
    with Blackhole() as target:
        names.answers["inside.test"] = ["127.0.0.2"]
        prober = probes.Prober(session, [ipaddress.ip_network("127.0.0.2/32")], None, resolve=names.resolve_tcp)
        web = await prober.run(_target("http", url=f"http://inside.test:{target.port}/"))
        tcp = await prober.run(_target("tcp", address="inside.test", port=target.port))
        assert target.accepted == 0
    blocked = "inside.test resolves to 127.0.0.2, in a blocked network (127.0.0.2/32)"
    assert (web.reason, web.detail) == ("blocked", blocked)
    assert (tcp.reason, tcp.detail) == ("blocked", blocked)


async def test_a_name_resolving_outside_the_blocked_networks_is_connected_to(
    session: aiohttp.ClientSession, names: FakeSystemResolver
) -> None:
    with refused_port() as closed:
        names.answers["allowed.test"] = ["127.0.0.1"]
        prober = probes.Prober(session, [ipaddress.ip_network("127.0.0.2/32")], None, resolve=names.resolve_tcp)
        web = await prober.run(_target("http", url=f"http://allowed.test:{closed}/"))
        tcp = await prober.run(_target("tcp", address="allowed.test", port=closed))
    assert (web.reason, web.detail) == ("connect", f"connection refused by allowed.test:{closed}")
    assert (tcp.reason, tcp.detail) == ("connect", f"connection refused by allowed.test:{closed}")


async def test_a_port_outside_1_to_65535_is_refused_before_resolving(names: FakeSystemResolver) -> None:
    async with probe_session([]) as http_session:
        prober = probes.Prober(http_session, [], None, resolve=names.resolve_tcp)
        outcomes = await asyncio.gather(
            *(prober.run(_target("tcp", address="app.test", port=port)) for port in (0, 65536, -1))
        )
    assert [(outcome.reason, outcome.detail) for outcome in outcomes] == [
        ("connect", "port 0 is not a TCP port (1-65535)"),
        ("connect", "port 65536 is not a TCP port (1-65535)"),
        ("connect", "port -1 is not a TCP port (1-65535)"),
    ]
    assert names.asked == []


@pytest.mark.parametrize(
    ("name", "asked"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("db-1.internal", "db-1.internal"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
        ("fa\u00df.test", "xn--fa-hia.test"),  # IDNA 2003 (Python's codec) would ask for fass.test
        ("\u03c2.test", "xn--3xa.test"),  # final sigma: IDNA 2003 would ask for xn--4xa.test
        ("\u216b.test.", "xii.test."),
    ],
)
async def test_a_tcp_check_looks_up_the_name_an_http_check_of_it_would(
    names: FakeSystemResolver, name: str, asked: str
) -> None:
    """The API validates names with IDNA 2008 (UTS #46) and aiohttp connects http checks to that encoding: a tcp
    check must reach the same host, not the one Python's IDNA 2003 codec would make of it inside getaddrinfo."""
    assert yarl.URL(f"http://{name}/").raw_host == asked.rstrip(".") or name.endswith(".")
    async with probe_session([]) as http_session:
        prober = probes.Prober(http_session, [], None, resolve=names.resolve_tcp)
        outcome = await prober.run(_target("tcp", address=name, port=80))
    assert names.asked == [asked]
    assert outcome.detail == f"cannot resolve {name}: Name or service not known"  # named as configured


async def test_a_tcp_name_that_cannot_be_encoded_is_dns_before_any_lookup(names: FakeSystemResolver) -> None:
    async with probe_session([]) as http_session:
        prober = probes.Prober(http_session, [], None, resolve=names.resolve_tcp)
        outcome = await prober.run(_target("tcp", address="a\u2603.test", port=80))
    assert outcome.reason == "dns" and outcome.detail.startswith(
        "cannot resolve a\u2603.test: the name cannot be encoded"
    )
    assert names.asked == []


# ---- min_cert_days ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "min_days", "problem"),
    [
        (40.0, 7, None),
        (7.0, 7, None),
        (6.99, 7, "the certificate expires on 2030-01-02 03:04:05 UTC, in 7.0 days, fewer than min_cert_days (7)"),
        (0.2, 1, "the certificate expires on 2030-01-02 03:04:05 UTC, in 0.2 days, fewer than min_cert_days (1)"),
        (0.0, 0, None),
        (-2.04, 0, "the certificate expired on 2030-01-02 03:04:05 UTC, 2.0 days ago (min_cert_days is 0)"),
    ],
)
def test_certificate_problem(left: float, min_days: int, problem: str | None) -> None:
    end = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert probes.certificate_problem(end, left, min_days) == problem


@pytest.mark.parametrize(
    ("starts_in", "problem"),
    [
        (None, None),
        (-1.0, None),
        (0.0, None),
        (2.04, "the certificate is not valid until 2029-12-01 00:00:00 UTC, in 2.0 days (min_cert_days is 7)"),
        (0.001, "the certificate is not valid until 2029-12-01 00:00:00 UTC, in 0.0 days (min_cert_days is 7)"),
    ],
)
def test_a_certificate_not_valid_yet_fails_min_cert_days(starts_in: float | None, problem: str | None) -> None:
    end = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    start = datetime.datetime(2029, 12, 1, tzinfo=datetime.UTC)
    assert probes.certificate_problem(end, 40.0, 7, start=start, starts_in=starts_in) == problem


def test_a_missing_certificate_fails_min_cert_days() -> None:
    assert probes.certificate_problem(None, None, 0) == "no server certificate could be read (min_cert_days needs one)"


async def test_the_certificate_is_read_even_once_aiohttp_let_go_of_the_connection(tmp_path: Path) -> None:
    cert_path, key_path = write_self_signed_cert(tmp_path)
    end = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    with RawHttpServer(ssl_context=context) as server:
        server.set("/small", raw_response(body=b"ok"))
        server.set("/none", raw_response("204 No Content"))
        async with probe_session([]) as session:
            for path in ("/small", "/none"):
                async with session.get(server.url(path), ssl=False) as answer:
                    assert answer.connection is None  # released: the whole answer came with the headers
                    assert probes.response_certificate_end(answer) == end
        async with aiohttp.ClientSession() as plain, plain.get(server.url("/small"), ssl=False) as answer:
            assert probes.response_certificate_end(answer) is None  # another session's responses keep no TLS object
