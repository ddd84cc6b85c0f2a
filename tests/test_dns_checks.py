"""dns checks through the API and the session's poller against a real DNS server of the test's own (dnsmasq on
127.0.0.1, tests/support/dns_server.py): answers of every record type as `dig +short` prints them, expected values,
NXDOMAIN, REFUSED, no answer, a silent server, a truncated answer asked again over TCP, and servers in blocked
networks, which are sent nothing. The machine's resolver is never asked: every check names its dns_server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.database import UNRESOLVABLE_NAME, set_columns
from tests.support.dns_server import (
    IDN_IPV4,
    IDN_NAME,
    MAIL_IPV4,
    SPF_TEXT,
    SPLIT_STRINGS,
    SRV_NAME,
    WEB_IPV4,
    WEB_IPV6,
    Dnsmasq,
    UdpSink,
)
from tests.support.processes import ServiceProcess, exclusive_poller
from tests.test_poller import check_once, create_check, new_host, run_now

pytestmark = pytest.mark.usefixtures("poller")


def dns(server: str, name: str, record_type: str = "A", *expected: str, **fields: Any) -> dict[str, Any]:
    body = {"check_type": "dns", "dns_server": server, "dns_name": name, "record_type": record_type}
    return body | ({"expected_values": list(expected)} if expected else {}) | fields


async def test_answers_of_every_record_type(admin: httpx.AsyncClient, dnsmasq: Dnsmasq) -> None:
    server = dnsmasq.address
    cases: list[tuple[dict[str, Any], list[str]]] = [
        (dns(server, "web.test", "A", *WEB_IPV4), list(WEB_IPV4)),
        (dns(server, "web.test."), list(WEB_IPV4)),  # a fully qualified name, no expected values
        # An address matches however it is written; case and a trailing dot do not matter.
        (dns(server, "WEB.test", "AAAA", "2001:DB8:0:0::10"), [WEB_IPV6]),
        (dns(server, "alias.test", "A", "web.test"), ["web.test.", *WEB_IPV4]),  # the CNAME chain, as dig prints it
        (dns(server, "alias.test", "CNAME", "WEB.TEST."), ["web.test."]),
        (dns(server, "mail.test", "A", MAIL_IPV4), [MAIL_IPV4]),
        (dns(server, "test", "MX", "10 mail.test."), ["10 mail.test."]),
        (dns(server, "test", "MX", "mail.test"), ["10 mail.test."]),  # the target alone
        (dns(server, "test", "NS", "ns.test"), ["ns.test."]),
        (dns(server, "web.test", "TXT", SPF_TEXT.upper()), [SPF_TEXT]),  # no quotes
        (dns(server, "split.test", "TXT", "".join(SPLIT_STRINGS)), ["".join(SPLIT_STRINGS)]),  # strings joined
        (dns(server, SRV_NAME, "SRV", "10 5 5060 sip.test."), ["10 5 5060 sip.test."]),
        (dns(server, SRV_NAME, "SRV", "sip.test"), ["10 5 5060 sip.test."]),  # the target alone
        (dns(server, IDN_NAME, "A", IDN_IPV4), [IDN_IPV4]),  # asked as xn--bcher-kva.test (IDNA 2008)
    ]
    results = await asyncio.gather(*(check_once(admin, **fields) for fields, _ in cases))
    for (fields, answers), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (True, "ok"), (fields, result)
        prefix = f"{fields['dns_name']} {fields['record_type']}: "
        assert result["detail"].startswith(prefix), (fields, result)
        assert sorted(result["detail"].removeprefix(prefix).split(", ")) == sorted(answers), (fields, result)
        assert result["cert_expires_at"] is None


async def test_a_truncated_answer_is_asked_again_over_tcp(admin: httpx.AsyncClient, dnsmasq: Dnsmasq) -> None:
    """big.test's TXT record (1,500 bytes) does not fit an EDNS answer of 1,232 bytes: dnsmasq truncates it over
    UDP, and only TCP gives it whole (dnsmasq answers TCP from a child process, which its log shows)."""
    result = await check_once(admin, **dns(dnsmasq.address, "big.test", "TXT"))
    assert (result["healthy"], result["reason"]) == (True, "ok"), result
    assert result["detail"] == "big.test TXT: " + "a" * 100 + "…"  # each answer cut to 100 characters
    served_big = [line for line in dnsmasq.log().splitlines() if "auth[TXT] big.test" in line]
    assert len({line.split("]")[0] for line in served_big}) >= 2  # the server's own pid and a TCP child's


async def test_unhealthy_answers(admin: httpx.AsyncClient, db: asyncpg.Connection, dnsmasq: Dnsmasq) -> None:
    server = dnsmasq.address
    cases: list[tuple[dict[str, Any], str, str]] = [
        (dns(server, "nope.test"), "dns", f"nope.test A: NXDOMAIN (no such name), answered by {server}"),
        (dns(server, "web.test", "A", WEB_IPV4[0], "127.0.0.99"), "dns",
         "web.test A: '127.0.0.99' is not among the answers: "),
        (dns(server, "test", "MX", "20 mail.test", "other.test"), "dns",
         "test MX: '20 mail.test', 'other.test' are not among the answers: 10 mail.test."),
        (dns(server, "web.test", "MX"), "dns", f"web.test MX: no MX record, answered by {server}"),
        (dns(server, "dangling.test"), "dns", f"dangling.test A: no A record, answered by {server} (answers: gone.test.)"),
        (dns(server, "outside.invalid"), "dns", f"outside.invalid A: {server} answered REFUSED"),
    ]  # fmt: skip
    results = await asyncio.gather(*(check_once(admin, **fields) for fields, *_ in cases))
    for (fields, reason, detail), result in zip(cases, results, strict=True):
        assert (result["healthy"], result["reason"]) == (False, reason), (fields, result)
        assert result["detail"].startswith(detail), (fields, result)
    with UdpSink() as silent:
        quiet = await check_once(admin, **dns(silent.address, "web.test", timeout_seconds=0.5))
    assert (quiet["reason"], quiet["detail"]) == ("timeout", "timed out after 0.5 s")
    assert silent.received >= 1
    # A name that cannot be encoded for DNS is refused before any question (the API refuses it: written in the row).
    unencodable = await create_check(admin, await new_host(admin), **dns(server, "web.test"))
    await set_columns(db, unencodable, dns_name=UNRESOLVABLE_NAME)
    result = await run_now(admin, unencodable)
    assert (result["reason"], result["detail"]) == ("dns", "cannot look up a..b: A DNS label is empty.")


async def test_a_dns_server_in_a_blocked_network_is_sent_nothing(
    admin: httpx.AsyncClient, service_env: dict[str, str], tmp_path: Path, poller: ServiceProcess
) -> None:
    metadata = await check_once(admin, **dns("169.254.169.254", "web.test"))
    assert (metadata["reason"], metadata["detail"]) == (
        "blocked", "dns server 169.254.169.254 is in a blocked network (169.254.0.0/16)"
    )  # fmt: skip
    blocking_loopback = {"HEALTHGATE_BLOCKED_NETWORKS": "127.0.0.0/8,::1/128,169.254.0.0/16"}
    with UdpSink() as sink, exclusive_poller(poller, service_env, tmp_path / "poller.log", **blocking_loopback):
        result = await check_once(admin, **dns(sink.address, "web.test"))
        assert (result["reason"], result["detail"]) == (
            "blocked", "dns server 127.0.0.1 is in a blocked network (127.0.0.0/8)"
        )  # fmt: skip
    assert sink.received == 0
