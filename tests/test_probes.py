"""What targets answer, read truthfully (CONTRACT §4): large headers, answers that are not valid HTTP,
Content-Encodings and charsets, `max_latency_ms`, names that cannot be encoded, addresses tried in turn,
and details that stay bounded and free of credentials wherever a result is stored or published.

Runs go through the session's poller (`/test`) against real peers: nginx, the fake agent, and raw
servers on 127.0.0.1 that write exact bytes. Address ordering for tcp runs the prober in-process with
a resolver of the test's own, since no name here resolves to two addresses."""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import ipaddress
import json
import re
import socket
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg
import brotli
import httpx
import pytest
import uvloop

from services.poller.probes import (
    AddrInfo,
    CheckTarget,
    Prober,
    content_codings,
    decode_body,
    probe_session,
    shown_latency,
)
from shared.details import DETAIL_LIMIT
from tests.support.blackhole import refused_port, slow_port
from tests.support.database import set_columns
from tests.support.fake_agent import SERVICES_PREFIX, FakeAgent
from tests.support.messages import EventCapture
from tests.support.nginx import GZIP_BODY, NginxServer
from tests.support.processes import ServiceProcess
from tests.support.raw_http import RawHttpServer, response
from tests.test_poller import create_check, http, new_host, run_now

pytestmark = pytest.mark.usefixtures("poller")

FRENCH = "Système opérationnel"


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
    # Codings that cannot be undone, bodies that break off inside their coding, and status codes outside 100-599
    # (RFC 9110 §15): each says what was wrong, even without expected_body.
    "/zstd": (
        response(headers=[("Content-Encoding", "zstd")], body=b"\x28\xb5\x2f\xfd\x00\x58abc"),
        "Content-Encoding zstd is not supported (gzip, deflate and br are)",
    ),
    "/unknown-among-known": (
        response(headers=[("Content-Encoding", "gzip, x-snappy")], body=gzip.compress(b"fine")),
        "Content-Encoding x-snappy is not supported",
    ),
    "/gzip-cut-short": (
        response(headers=[("Content-Encoding", "gzip")], body=gzip.compress(b"fine " * 1000)[:-20]),
        "sent a body that breaks off inside its gzip stream (its Content-Encoding), so it cannot be undone",
    ),
    "/deflate-cut-short": (
        response(headers=[("Content-Encoding", "deflate")], body=zlib.compress(b"fine " * 1000)[:-8]),
        "breaks off inside its deflate stream",
    ),
    "/br-cut-short": (
        response(headers=[("Content-Encoding", "br")], body=brotli.compress(b"fine " * 1000)[:-4]),
        "breaks off inside its br stream",
    ),
    "/inner-gzip-cut-short": (
        response(
            headers=[("Content-Encoding", "gzip, br")], body=brotli.compress(gzip.compress(b"fine " * 1000)[:-20])
        ),
        "breaks off inside its gzip stream",
    ),
    "/stacked-in-the-wrong-order": (  # gzip(br(text)) labelled as br applied last: br is undone first
        response(headers=[("Content-Encoding", "br, gzip")], body=brotli.compress(gzip.compress(b"fine"))),
        "not valid gzip",
    ),
    "/five-stacked-encodings": (
        response(headers=[("Content-Encoding", "gzip, gzip, gzip, gzip, gzip")], body=b"\x1f\x8b"),
        "5 stacked Content-Encodings, which are not undone (at most 4 are)",
    ),
    "/status-099": (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", "status code 099 is not a valid HTTP status"),
    "/status-000": (b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", "status code 000 is not a valid HTTP status"),
    "/status-600": (b"HTTP/1.1 600 Big\r\nContent-Length: 0\r\n\r\n", "status code 600 is not a valid HTTP status"),
    "/status-999": (b"HTTP/1.1 999 Bigger\r\nContent-Length: 0\r\n\r\n", "status code 999 is not a valid HTTP status"),
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
        assert not re.search(r"\bstatus \d", result["detail"]), (path, result)  # no invented "status 99"
        assert len(result["detail"]) <= DETAIL_LIMIT


async def test_an_invalid_status_is_protocol_on_every_hop_and_from_the_agent(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer
) -> None:
    """A status outside 100-599 is no status: never "status 99", not even when a stored expected_status would
    match it (the API refuses one, a row may hold it)."""
    raw_http.set("/hop", response("302 Found", headers=[("Location", "/odd")]))
    raw_http.set("/odd", b"HTTP/1.1 099 Odd\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
    raw_http.set(SERVICES_PREFIX + "odd.service", b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\n{}")
    hop, expecting_99 = await http_checks(admin, [raw_http.url("/hop"), raw_http.url("/odd")], follow_redirects=True)
    await set_columns(db, expecting_99, expected_status="99")
    (agent,) = await create_checks(
        admin, [{"check_type": "service", "service_name": "odd.service"}], agent_url=raw_http.base_url
    )
    for result in await run_all(admin, [hop, expecting_99, agent]):
        assert (result["healthy"], result["reason"]) == (False, "protocol"), result
        assert result["detail"] == (
            f"127.0.0.1:{raw_http.port} sent an answer whose status code 099 is not a valid HTTP status (100-599)"
        )


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
    half = len(text) // 2
    encoded: dict[str, tuple[str | list[str], bytes]] = {
        "/gzip": ("gzip", gzip.compress(text)),
        "/gzip-upper-case": ("GZIP", gzip.compress(text)),
        "/x-gzip": ("x-gzip", gzip.compress(text)),  # RFC 9110 §8.4.1.3: x-gzip is gzip
        "/deflate": ("deflate", zlib.compress(text)),
        "/raw-deflate": ("deflate", _raw_deflate(text)),
        "/deflate-upper-case": ("Deflate", zlib.compress(text, 9)),
        "/br": ("br", brotli.compress(text)),
        "/identity": ("identity", text),
        # Stacked codings (RFC 9110 §8.4), listed in the order applied and undone in reverse: on one line, on two
        # lines, in either order; empty members and identity are nothing.
        "/gzip-then-br-one-line": ("gzip, br", brotli.compress(gzip.compress(text))),
        "/gzip-then-br-two-lines": (["gzip", "br"], brotli.compress(gzip.compress(text))),
        "/br-then-gzip": ("br, gzip", gzip.compress(brotli.compress(text))),
        "/deflate-then-gzip": ("deflate,gzip", gzip.compress(zlib.compress(text))),
        "/trailing-comma": ("gzip,", gzip.compress(text)),
        "/empty-members": (" , gzip ,, ", gzip.compress(text)),
        "/identity-and-gzip": (["identity", "gzip"], gzip.compress(text)),
        "/tab-separated": ("gzip,\tbr", brotli.compress(gzip.compress(text))),
        # Two gzip members one after another (RFC 1952 §2.2), the text split across them, NUL padding after.
        "/gzip-members": ("gzip", gzip.compress(text[:half]) + gzip.compress(text[half:]) + b"\0\0"),
    }
    for path, (coding, body) in encoded.items():
        lines = [coding] if isinstance(coding, str) else coding
        raw_http.set(path, response(headers=[("Content-Encoding", line) for line in lines], body=body))
    checks = await http_checks(admin, [raw_http.url(path) for path in encoded], expected_body=f"{FRENCH}: all fine")
    checks += await http_checks(admin, [nginx.http_url("/gzip")], expected_body=GZIP_BODY.strip())
    for check, result in zip(checks, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"]) == (True, "ok"), (check["url"], result)


def test_a_healthy_http_check_leaves_nothing_to_the_cyclic_collector(nginx: NginxServer) -> None:
    """A check that passes frees its response, connection and buffers as soon as it is done, by reference counting:
    it makes no reference cycle, so the poller's garbage collector has nothing to walk for it. A closure that
    called itself in `read_body` once made about 30 objects a check into cyclic garbage (issue 16). On uvloop, as
    the poller runs: asyncio's own selector transports make a cycle of their own per connection."""
    targets = [
        CheckTarget(
            check_id=uuid.uuid4(),
            host_id=uuid.uuid4(),
            check_type="http",
            timeout_seconds=5,
            host_name="nginx",
            url=url,
            expected_body=body,
            condition=condition,
        )
        for url, body, condition in [
            (nginx.http_url("/ok"), "all good", None),
            (nginx.http_url("/gzip"), GZIP_BODY.strip(), None),
            (nginx.https_url("/ok"), None, "status == 200 && body.contains('good')"),
        ]
    ]

    async def count_garbage() -> Counter[str]:
        async with probe_session([]) as session:
            prober = Prober(session, [], None)
            for target in targets:  # connections, TLS contexts and compiled conditions are made once, uncounted
                assert (await prober.run(target)).healthy
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable stays in gc.garbage, counted
            try:
                for _ in range(20):
                    for target in targets:
                        outcome = await prober.run(target)
                        assert outcome.healthy, outcome
                gc.collect()
                return Counter(type(item).__qualname__ for item in gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()

    garbage = uvloop.run(count_garbage())
    assert not garbage, garbage.most_common(10)


async def test_empty_bodies_need_no_undoing(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    """A Content-Encoding on an empty body (servers send one on empty 200s) has nothing to undo."""
    codings = {"/empty-gzip": "gzip", "/empty-br": "br", "/empty-zstd": "zstd", "/empty-stacked": "gzip, br"}
    for path, coding in codings.items():
        raw_http.set(path, response(headers=[("Content-Encoding", coding)]))
    checks = await http_checks(admin, [raw_http.url(path) for path in codings])
    for path, result in zip(codings, await run_all(admin, checks), strict=True):
        assert (result["healthy"], result["reason"], result["detail"]) == (True, "ok", "status 200 OK"), (path, result)


@pytest.mark.parametrize(
    ("lines", "codings"),
    [
        (["gzip"], ["gzip"]),
        (["GZIP"], ["gzip"]),
        (["x-gzip"], ["gzip"]),
        (["gzip, br"], ["gzip", "br"]),
        (["gzip", "br"], ["gzip", "br"]),
        (["br,gzip"], ["br", "gzip"]),
        (["gzip,"], ["gzip"]),
        ([" , gzip ,,\t"], ["gzip"]),
        (["identity"], []),
        (["identity, deflate"], ["deflate"]),
        ([], []),
    ],
)
def test_content_encoding_lines_are_read_as_rfc_9110_says(lines: list[str], codings: list[str]) -> None:
    assert content_codings(lines) == (codings, None)


def test_codings_that_are_not_undone_are_named() -> None:
    assert content_codings(["zstd"])[1] == (
        "Content-Encoding 'zstd', which cannot be undone: Content-Encoding zstd is not supported (gzip, deflate and br are)"
    )
    assert "Content-Encoding compress is not supported" in str(content_codings(["gzip", "compress"])[1])
    assert content_codings(["gzip"] * 5)[1] == "5 stacked Content-Encodings, which are not undone (at most 4 are)"
    long_name = content_codings(["x" * 5000])[1]
    assert long_name is not None and len(long_name) < 200


def _zeros_gzip(size: int) -> bytes:
    """gzip of `size` zero bytes, compressed piece by piece (a bomb: about 1/1000 of its size)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    piece = bytes(1024 * 1024)
    parts = [compressor.compress(piece) for _ in range(size // len(piece))]
    return b"".join([*parts, compressor.flush()])


async def test_a_compression_bomb_is_read_only_to_the_limit(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    """The 1 MiB limit holds for the decoded body: 64 MiB of zeros behind "fine" (gzip, and br over gzip)
    are judged on their first 1 MiB, whose text is found; the run ends, whatever it costs is bounded."""
    head = gzip.compress(b"fine ")
    bomb = _zeros_gzip(64 * 1024 * 1024)
    raw_http.set("/bomb", response(headers=[("Content-Encoding", "gzip")], body=head + bomb))
    raw_http.set(
        "/stacked-bomb", response(headers=[("Content-Encoding", "gzip, br")], body=brotli.compress(head + bomb))
    )
    raw_http.set(SERVICES_PREFIX + "bomb.service", response(headers=[("Content-Encoding", "gzip")], body=bomb))
    checks = await http_checks(admin, [raw_http.url("/bomb"), raw_http.url("/stacked-bomb")], expected_body="fine")
    checks += await create_checks(
        admin, [{"check_type": "service", "service_name": "bomb.service"}], agent_url=raw_http.base_url
    )
    plain, stacked, agent = await run_all(admin, checks)
    for result in (plain, stacked):
        assert (result["healthy"], result["reason"], result["detail"]) == (
            True,
            "ok",
            "status 200 OK, body contains 'fine'",
        ), result
    assert (agent["reason"], agent["detail"]) == ("agent", "agent answered 200 OK with a body larger than 1 MiB")


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


async def test_ipv6_addresses_are_shown_in_brackets_with_their_port(session: Any) -> None:
    """`[::1]:port`, never `::1:port` (loopback only)."""
    prober = Prober(session, [], None)
    with socket.socket(socket.AF_INET6) as unused:
        unused.bind(("::1", 0))
        closed = int(unused.getsockname()[1])
    refused = await prober.run(_tcp("::1", closed))
    assert (refused.reason, refused.detail) == ("connect", f"connection refused by [::1]:{closed}")
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        port = int(server.getsockname()[1])
        connected = await prober.run(_tcp("::1", port))
    assert (connected.reason, connected.detail) == ("ok", f"connected to [::1]:{port}")


async def test_a_url_aiohttp_refuses_to_request_is_named_in_the_detail(session: Any) -> None:
    """A check URL that is not http(s) (the API refuses one; a row written otherwise may hold it): aiohttp
    raises NonHttpUrlClientError, which has no `url` attribute, unlike InvalidURL. Found by mypy."""
    target = CheckTarget(
        check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="http", timeout_seconds=5,
        host_name="ignored", url="ftp://127.0.0.1/health",
    )  # fmt: skip
    outcome = await Prober(session, [], None).run(target)
    assert (outcome.healthy, outcome.reason, outcome.detail) == (
        False,
        "connect",
        "cannot request ftp://127.0.0.1/health",
    )


def test_latency_is_shown_precisely_enough_to_be_over_the_limit() -> None:
    """A 1.4 ms run over a 1 ms limit "took 1.4 ms", not "took 1 ms, more than the 1 ms allowed"."""
    assert shown_latency(1.4, 1) == "1.4"
    assert shown_latency(1.04, 1) == "1.04"
    assert shown_latency(1.001, 1) == "1.001"
    assert shown_latency(300.4, 100) == "300"
    assert shown_latency(100.6, 100) == "101"
    assert shown_latency(100.4, 100) == "100.4"


async def test_a_slow_run_reports_a_latency_above_its_limit(session: Any, raw_http: RawHttpServer) -> None:
    raw_http.set("/ok", response(body=b"fine"), delay=0.002)
    target = CheckTarget(
        check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="http", timeout_seconds=5,
        host_name="ignored", url=raw_http.url("/ok"), max_latency_ms=1,
    )  # fmt: skip
    outcome = await Prober(session, [], None).run(target)
    assert outcome.reason == "slow"
    taken = re.fullmatch(r"took ([0-9.]+) ms, more than the 1 ms allowed \(status 200 OK\)", outcome.detail)
    assert taken is not None, outcome.detail
    assert 1 < float(taken[1]) and abs(float(taken[1]) - outcome.latency_ms) < 1


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
            "agent answered 200 OK with JSON holding a number too large to read (more than 4300 digits)",
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


def _agent_json(data: Any, **answer: Any) -> bytes:
    return json.dumps({"success": True, "data": data} | answer).encode()


AGENT_STATE = {"name": "x.service", "active_state": "active", "sub_state": "running"}


async def test_agent_answers_are_judged_truly(admin: httpx.AsyncClient, raw_http: RawHttpServer) -> None:
    """Each agent answer gets a detail that names what was wrong with it (CONTRACT §4: reason agent for an
    answer that cannot be read; data.healthy decides only when the answer is what the contract says)."""
    json_type = [("Content-Type", "application/json")]
    healthy = _agent_json(AGENT_STATE | {"healthy": True})
    exactly_1_mib = healthy + b" " * (1024 * 1024 - len(healthy))  # trailing whitespace is valid JSON
    seen = "agent answered 200 OK"
    answers: dict[str, tuple[bytes, tuple[bool, str, str]]] = {
        # Larger than the 1 MiB read: valid JSON or not, it is not judged on a part.
        "large.service": (
            _agent_json(AGENT_STATE | {"healthy": True, "active_state": "a" * 5_000_000}),
            (False, "agent", f"{seen} with a body larger than 1 MiB"),
        ),
        "exactly-1-mib.service": (exactly_1_mib, (True, "ok", "{name} is active (running)")),
        "1-mib-and-a-byte.service": (exactly_1_mib + b" ", (False, "agent", f"{seen} with a body larger than 1 MiB")),
        "number.service": (
            b'{"success": true, "data": {"healthy": true, "pid": ' + b"7" * 5000 + b"}}",
            (False, "agent", f"{seen} with JSON holding a number too large to read (more than 4300 digits)"),
        ),
        "negative-number.service": (
            b'{"success": true, "data": {"healthy": true, "pid": -' + b"7" * 5000 + b"}}",
            (False, "agent", f"{seen} with JSON holding a number too large to read (more than 4300 digits)"),
        ),
        # json.loads takes NaN and Infinity by default; JSON has neither (RFC 8259 §6).
        "nan.service": (
            b'{"success": true, "data": {"healthy": true, "load": NaN}}',
            (False, "agent", f"{seen} with a body that is not JSON (NaN is not a JSON value)"),
        ),
        "infinity.service": (
            b'{"success": true, "data": {"healthy": true, "load": Infinity}}',
            (False, "agent", f"{seen} with a body that is not JSON (Infinity is not a JSON value)"),
        ),
        "minus-infinity.service": (
            b'{"success": true, "data": {"healthy": -Infinity}}',
            (False, "agent", f"{seen} with a body that is not JSON (-Infinity is not a JSON value)"),
        ),
        "not-utf8.service": (
            b'{"success": true, "data": {"healthy": true, "x": "\xff\xfe\xfd"}}',
            (False, "agent", f"{seen} with a body that is not JSON (not UTF-8, UTF-16 or UTF-32 text)"),
        ),
        # Fields of the wrong type are named as such, not as missing.
        "healthy-string.service": (
            _agent_json(AGENT_STATE | {"healthy": "true"}),
            (False, "agent", "agent answer's data.healthy is not a boolean (a string)"),
        ),
        "healthy-number.service": (
            _agent_json(AGENT_STATE | {"healthy": 1}),
            (False, "agent", "agent answer's data.healthy is not a boolean (a number)"),
        ),
        "healthy-null.service": (
            _agent_json(AGENT_STATE | {"healthy": None}),
            (False, "agent", "agent answer's data.healthy is not a boolean (null)"),
        ),
        "healthy-missing.service": (_agent_json(AGENT_STATE), (False, "agent", "agent answer lacks data.healthy")),
        "success-string.service": (
            _agent_json(AGENT_STATE | {"healthy": True}, success="true"),
            (False, "agent", "agent answer's success is not a boolean (a string)"),
        ),
        "success-false.service": (
            _agent_json(AGENT_STATE | {"healthy": True}, success=False, error="unit lookup failed"),
            (False, "agent", "agent answer says success false: unit lookup failed"),
        ),
        "success-missing.service": (
            json.dumps({"data": AGENT_STATE | {"healthy": True}}).encode(),
            (False, "agent", "agent answer lacks success"),
        ),
        "data-array.service": (
            _agent_json([AGENT_STATE]),
            (False, "agent", "agent answer's data is not an object (an array)"),
        ),
        "data-missing.service": (b'{"success": true}', (False, "agent", "agent answer lacks data")),
        "top-level-array.service": (
            json.dumps([{"success": True, "data": AGENT_STATE | {"healthy": True}}]).encode(),
            (False, "agent", f"{seen} with JSON that is not an object (an array)"),
        ),
        "top-level-string.service": (
            b'"healthy"',
            (False, "agent", f"{seen} with JSON that is not an object (a string)"),
        ),
        # JSON's own encodings are read: a UTF-8 BOM (RFC 8259 §8.1 lets a parser ignore it), UTF-16.
        "bom.service": (b"\xef\xbb\xbf" + healthy, (True, "ok", "{name} is active (running)")),
        "utf-16.service": (healthy.decode().encode("utf-16"), (True, "ok", "{name} is active (running)")),
        "unhealthy-in-gzip.service": (
            gzip.compress(_agent_json(AGENT_STATE | {"healthy": False})),
            (False, "status", "{name} is active (running)"),
        ),
    }
    for name, (body, _) in answers.items():
        headers = [*json_type, *([("Content-Encoding", "gzip")] if "gzip" in name else [])]
        raw_http.set(SERVICES_PREFIX + name, response(headers=headers, body=body))
    checks = await create_checks(
        admin, [{"check_type": "service", "service_name": name} for name in answers], agent_url=raw_http.base_url
    )
    for (name, (_, expected)), result in zip(answers.items(), await run_all(admin, checks), strict=True):
        healthy, reason, detail = expected
        assert (result["healthy"], result["reason"], result["detail"]) == (healthy, reason, detail.format(name=name))


async def test_control_characters_from_an_agent_are_escaped(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer, events: EventCapture
) -> None:
    """ESC sequences, line breaks and bidi overrides an agent sends reach no detail raw: not the reply, the
    stored rows, the events or the API."""
    state = AGENT_STATE | {
        "active_state": "active\x1b[2J\x1b[31m\nFAKE: all good\r\x07",
        "sub_state": "\u202erun",
        "healthy": True,
    }
    raw_http.set(SERVICES_PREFIX + "esc.service", response(body=_agent_json(state)))
    error = json.dumps({"success": False, "error": "bad\r\nthing\x07\x9b"}).encode()
    raw_http.set(SERVICES_PREFIX + "esc-error.service", response("500 Internal Server Error", body=error))
    checks = await create_checks(
        admin,
        [{"check_type": "service", "service_name": name} for name in ("esc.service", "esc-error.service")],
        agent_url=raw_http.base_url,
    )
    ok, failed = await run_all(admin, checks)
    assert (ok["reason"], ok["detail"]) == (
        "ok",
        "esc.service is active\\x1b[2J\\x1b[31m\\x0aFAKE: all good\\x0d\\x07 (\\u202erun)",
    )
    assert (failed["reason"], failed["detail"]) == (
        "agent",
        "agent answered 500 Internal Server Error: bad\\x0d\\x0athing\\x07\\x9b",
    )
    check_ids = [uuid.UUID(check["id"]) for check in checks]
    kept = [
        row["detail"] for row in await db.fetch("SELECT detail FROM check_results WHERE check_id = ANY($1)", check_ids)
    ]
    kept += [
        row["last_detail"]
        for row in await db.fetch("SELECT last_detail FROM check_state WHERE check_id = ANY($1)", check_ids)
    ]
    published = await events.wait_for(
        "check.result", lambda event: event.data["check_id"] in {c["id"] for c in checks}, count=2
    )
    kept += [str(event.data["detail"]) for event in published]
    for check in checks:
        shown = (await admin.get(f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}")).json()
        kept.append(shown["last_result"]["detail"])
    assert sorted(set(kept)) == sorted({ok["detail"], failed["detail"]})


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


async def test_a_location_shows_only_scheme_host_port_and_path(
    admin: httpx.AsyncClient, db: asyncpg.Connection, raw_http: RawHttpServer, events: EventCapture
) -> None:
    """A URL a target sent appears in a detail only as scheme://host[:port]/path: no userinfo (an "@" or a space
    in the password, scheme-relative, IPv6, percent-encoded), no query (signatures, OAuth codes), no fragment,
    the path cut; a Location urllib.parse cannot read is described, never shown; a non-hierarchical one shows
    its scheme alone. Nowhere: the reply, the stored rows, the events, the API."""
    port = raw_http.port
    long_path = "/" + "p" * 10_000
    with refused_port() as closed:
        locations = {
            "/scheme-relative": (
                "//user-A:s3cr3t-A@127.0.0.1:99999/",
                "protocol",
                "redirect to a Location that is not a valid URL (its port is not a number from 0 to 65535)",
            ),
            "/at-in-password": (
                "http://user-B:p@ss-B@127.0.0.1:99999/",
                "protocol",
                "redirect to a Location that is not a valid URL (its port is not a number from 0 to 65535)",
            ),
            "/space-in-password": (
                f"http://user-C:pa ss-C@127.0.0.1:{closed}/",
                "connect",
                f"connection refused by 127.0.0.1:{closed}",
            ),
            "/mailto": (
                "mailto:user-D:s3cr3t-D@127.0.0.1",
                "protocol",
                "redirect to a mailto URL: only http and https redirects are followed",
            ),
            "/ipv6-userinfo": (
                "ftp://user-E:pw-E@[::1]:1/x?sig=sig-E",
                "protocol",
                "redirect to ftp://[::1]:1/x?…: only http and https redirects are followed",
            ),
            "/percent-encoded": (
                "ftp://us%65r-F:s%33cr%33t-F@127.0.0.1/file",
                "protocol",
                "redirect to ftp://127.0.0.1/file: only http and https redirects are followed",
            ),
            "/query-credentials": (
                "ftp://127.0.0.1/f?X-Amz-Signature=amz-G&sig=sig-G&code=code-G&access_token=at-G#frag-G",
                "protocol",
                "redirect to ftp://127.0.0.1/f?…: only http and https redirects are followed",
            ),
            "/ten-kilobytes": (
                "ftp://127.0.0.1" + long_path + "?token=tok-H",
                "protocol",
                f"redirect to ftp://127.0.0.1{long_path[:100]}…?…: only http and https redirects are followed",
            ),
            "/unclosed-ipv6": (
                "http://user-I:pw-I@[::1/x",
                "protocol",
                "redirect to a Location that is not a valid URL (a bracketed IPv6 host that does not close)",
            ),
            "/bad-port": (
                "http://user-J:pw-J@127.0.0.1:port-J/",
                "protocol",
                "redirect to a Location that is not a valid URL (its port is not a number from 0 to 65535)",
            ),
            "/data": (
                "data:text/plain,secret-K",
                "protocol",
                "redirect to a data URL: only http and https redirects are followed",
            ),
            "/javascript": (
                "javascript:alert('secret-L')",
                "protocol",
                "redirect to a javascript URL: only http and https redirects are followed",
            ),
            "/file": (
                "file:///etc/passwd",
                "protocol",
                "redirect to file:///etc/passwd: only http and https redirects are followed",
            ),
            "/idna": (
                "http://user-M:pw-M@a..b/health?code=code-M",
                "dns",
                "cannot resolve a..b: the name cannot be encoded for DNS (IDNA: label empty or too long)",
            ),
            "/loop-secret": (
                "/loop-secret?X-Amz-Signature=amz-N&sig=sig-N&code=code-N",
                "status",
                f"more than 10 redirects, last to http://127.0.0.1:{port}/loop-secret?…",
            ),
            "/then-refused": (
                f"http://user-O:pw-O@127.0.0.1:{closed}/x?sig=sig-O",
                "connect",
                f"connection refused by 127.0.0.1:{closed}",
            ),
        }
        for path, (location, _, _) in locations.items():
            raw_http.set(path, response("302 Found", headers=[("Location", location)]))
        checks = await http_checks(admin, [raw_http.url(path) for path in locations], follow_redirects=True)
        results = await run_all(admin, checks)
    for (path, (_, reason, detail)), result in zip(locations.items(), results, strict=True):
        assert (result["healthy"], result["reason"]) == (False, reason), (path, result)
        assert result["detail"] == detail, (path, result)
        assert len(result["detail"]) <= DETAIL_LIMIT

    check_ids = [uuid.UUID(check["id"]) for check in checks]
    kept = [json.dumps(results)]
    kept += [
        row["detail"] for row in await db.fetch("SELECT detail FROM check_results WHERE check_id = ANY($1)", check_ids)
    ]
    kept += [
        row["last_detail"]
        for row in await db.fetch("SELECT last_detail FROM check_state WHERE check_id = ANY($1)", check_ids)
    ]
    ids = {check["id"] for check in checks}
    kept += [
        event.body.decode()
        for event in await events.wait_for("check.result", lambda e: e.data["check_id"] in ids, count=len(ids))
    ]
    for check in checks:
        base = f"/api/v1/hosts/{check['host_id']}/health-checks/{check['id']}"
        kept += [(await admin.get(base)).text, (await admin.get(base + "/results")).text]
    seen = "\n".join(kept)
    letters = "ABCDEFGHIJKLMNO"
    secrets = [
        f"{kind}-{letter}"
        for letter in letters
        for kind in ("user", "s3cr3t", "ss", "pw", "sig", "amz", "code", "at", "tok", "frag", "secret", "port")
    ]
    secrets += ["us%65r-F", "s%33cr%33t-F", "pa ss-C"]
    for secret in secrets:
        assert secret not in seen, secret


async def test_details_built_from_target_text_are_not_over_redacted(
    admin: httpx.AsyncClient, raw_http: RawHttpServer
) -> None:
    """What looked like a key ("passwd:", "token:") no longer eats the next word of a true detail."""
    raw_http.set("/header", b"HTTP/1.1 200 OK\r\nthis is not a header\r\nContent-Length: 0\r\n\r\n")
    (result,) = await run_all(admin, await http_checks(admin, [raw_http.url("/header")]))
    assert result["detail"] == (
        f"127.0.0.1:{raw_http.port} sent an answer that is not valid HTTP: Invalid header token: b'this is not a header'"
    )


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
