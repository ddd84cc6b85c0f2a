"""services/poller/dns_probe.py in this process: answers as `dig +short` prints them, how expected values match,
the words of a detail, which servers are asked (blocked networks, the system resolver's list), and, against the
test's own dnsmasq on 127.0.0.1, a truncated answer asked again over TCP and the system resolver's path. The
machine's resolver is never asked. The same probe runs in the poller in tests/test_dns_checks.py."""

from __future__ import annotations

import ipaddress
import string
import uuid
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.poller.dns_probe import (
    DnsProbe,
    answer_records,
    answer_text,
    match_keys,
    missing_values,
    normalized,
    server_failures,
    shown_answers,
    system_nameservers,
)
from services.poller.probes import CheckTarget, Verdict
from tests.support.dns_server import BIG_STRINGS, WEB_IPV4, Dnsmasq, UdpSink

METADATA = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fd00:ec2::254/128")]


def rdata(record_type: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(record_type), text)


def target(**fields: Any) -> CheckTarget:
    body: dict[str, Any] = {"dns_name": "web.test", "record_type": "A"} | fields
    return CheckTarget(uuid.uuid4(), uuid.uuid4(), "dns", timeout_seconds=3, host_name="ignored", **body)


# ---- answers as dig +short prints them -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_type", "text", "shown"),
    [
        ("A", "192.0.2.1", "192.0.2.1"),
        ("AAAA", "2001:0db8:0000::0001", "2001:db8::1"),
        ("CNAME", "web.example.", "web.example."),
        ("NS", "ns1.example.", "ns1.example."),
        ("MX", "10 mail.example.", "10 mail.example."),
        ("SRV", "10 5 5060 sip.example.", "10 5 5060 sip.example."),
        ("TXT", '"v=spf1 -all"', "v=spf1 -all"),  # no quotes
        (
            "TXT",
            '"v=DKIM1; k=rsa; p=MIGf" "MA0GCSqGSIb3"',
            "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3",
        ),  # joined, as DKIM reads it
        ("TXT", '"caf\\195\\169"', "café"),  # UTF-8 bytes
        ("TXT", '"\\255x"', "\ufffdx"),  # not UTF-8: U+FFFD, never an error
    ],
)
def test_answer_text(record_type: str, text: str, shown: str) -> None:
    assert answer_text(rdata(record_type, text)) == shown


def test_answer_records_are_the_chain_and_the_type_asked() -> None:
    response = dns.message.make_response(dns.message.make_query("alias.example.", "A"))
    response.answer = [
        dns.rrset.from_text("alias.example.", 60, "IN", "CNAME", "web.example."),
        dns.rrset.from_text("web.example.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"),
        dns.rrset.from_text("web.example.", 60, "IN", "TXT", '"not asked"'),
        dns.rrset.from_text("web.example.", 60, "CH", "A", "chaos.example. 1234"),  # another class
    ]
    records = answer_records(response, dns.rdatatype.A)
    assert [answer_text(record) for record in records] == ["web.example.", "192.0.2.1", "192.0.2.2"]


# ---- matching ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("Mail.Example.", "mail.example"),
        ("  mail.example..  ", "mail.example"),
        ("10 MAIL.example.", "10 mail.example"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::ffff:192.0.2.1", str(ipaddress.ip_address("::ffff:192.0.2.1"))),
        ("192.0.2.1.", "192.0.2.1"),
        ("V=SPF1 -ALL", "v=spf1 -all"),
        ("0\x85.", "0"),  # NEL is whitespace to str.strip: stripped at the end like a space (found by hypothesis)
    ],
)
def test_normalized(value: str, key: str) -> None:
    assert normalized(value) == key


@given(st.text())
def test_normalized_is_idempotent(value: str) -> None:
    assert normalized(normalized(value)) == normalized(value)


@given(st.text(alphabet=string.ascii_letters + string.digits + "-_=;: ", min_size=1))
def test_case_and_trailing_dots_never_matter(value: str) -> None:
    assert normalized(value.upper() + "..") == normalized(value.lower())


def test_mx_and_srv_match_by_their_target_alone() -> None:
    assert match_keys(rdata("MX", "10 mail.example.")) == {"10 mail.example", "mail.example"}
    assert match_keys(rdata("SRV", "10 5 5060 sip.example.")) == {"10 5 5060 sip.example", "sip.example"}
    assert match_keys(rdata("CNAME", "web.example.")) == {"web.example"}
    assert match_keys(rdata("TXT", '"mail.example"')) == {"mail.example"}


def test_missing_values_in_the_order_given() -> None:
    records = [rdata("MX", "10 mail.example."), rdata("MX", "20 backup.example.")]
    assert missing_values(["backup.example", "10 MAIL.example."], records) == []
    assert missing_values(["z.example", "20 backup.example", "a.example", "30 mail.example"], records) == [
        "z.example", "a.example", "30 mail.example"
    ]  # fmt: skip
    assert missing_values([], []) == []


def test_shown_answers_are_cut() -> None:
    assert shown_answers(["a", "b"]) == "a, b"
    assert shown_answers([str(index) for index in range(13)]) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 3 more"
    assert shown_answers(["x" * 150]) == "x" * 100 + "…"


def test_server_failures() -> None:
    names = {"Do53:192.0.2.53@53": "192.0.2.53:53", "Do53:192.0.2.54@5353": "192.0.2.54:5353"}
    assert server_failures([("Do53:192.0.2.53@53", False, 53, "SERVFAIL", None)] * 2, names) == (
        False, "192.0.2.53:53 answered SERVFAIL"
    )  # fmt: skip
    refused = ConnectionRefusedError(111, "Connection refused")
    unreachable = OSError(101, "Network is unreachable")
    assert server_failures(
        [("Do53:192.0.2.53@53", True, 53, refused, None), ("Do53:192.0.2.54@5353", False, 5353, unreachable, None)],
        names,
    ) == (True, "connection refused by 192.0.2.53:53; cannot reach 192.0.2.54:5353: Network is unreachable")
    mixed = [("Do53:192.0.2.53@53", True, 53, EOFError(), None), ("Do53:192.0.2.54@5353", False, 5353, "REFUSED", None)]
    assert server_failures(mixed, names) == (
        False, "192.0.2.53:53 closed the connection without answering; 192.0.2.54:5353 answered REFUSED"
    )  # fmt: skip
    assert server_failures([], names) == (False, "no server answered")


# ---- which servers are asked ------------------------------------------------------------------------------


def test_the_dns_server_of_the_check() -> None:
    probe = DnsProbe(METADATA, [("192.0.2.53", 53)])
    assert probe.servers(target(dns_server="192.0.2.1")) == ([("192.0.2.1", 53)], None)
    assert probe.servers(target(dns_server="[2001:db8::1]:5353")) == ([("2001:db8::1", 5353)], None)
    assert probe.servers(target(dns_server="169.254.169.253:53")) == (
        [], Verdict(False, "blocked", "dns server 169.254.169.253 is in a blocked network (169.254.0.0/16)")
    )  # fmt: skip
    assert probe.servers(target(dns_server="fd00:ec2::254"))[1] == Verdict(
        False, "blocked", "dns server fd00:ec2::254 is in a blocked network (fd00:ec2::254/128)"
    )
    assert probe.servers(target(dns_server="::ffff:169.254.1.1"))[1] is not None  # IPv4-mapped: still blocked
    assert probe.servers(target(dns_server="dns.example"))[1] == Verdict(
        False, "dns", "dns_server 'dns.example' must be an IP address (a name would need a resolver itself), or ip:port"
    )


def test_the_system_resolver_without_its_blocked_nameservers() -> None:
    system = [("169.254.169.253", 53), ("192.0.2.53", 53), ("fd00:ec2::254", 53)]
    assert DnsProbe(METADATA, system).servers(target()) == ([("192.0.2.53", 53)], None)
    assert DnsProbe(METADATA, system[::2]).servers(target()) == ([], Verdict(
        False, "blocked", "every nameserver of the system resolver is in a blocked network: "
        "169.254.169.253 (169.254.0.0/16), fd00:ec2::254 (fd00:ec2::254/128)",
    ))  # fmt: skip
    assert DnsProbe(METADATA, []).servers(target()) == (
        [], Verdict(False, "dns", "no system resolver: /etc/resolv.conf names no nameserver")
    )  # fmt: skip


def test_system_nameservers_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions edns0 timeout:1\n")
    assert system_nameservers(str(conf)) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    conf.write_text("search example\n")
    assert system_nameservers(str(conf)) == []
    assert system_nameservers(str(tmp_path / "missing")) == []


# ---- against the test's own dnsmasq ------------------------------------------------------------------------


async def test_a_truncated_answer_arrives_whole_over_tcp(dnsmasq: Dnsmasq) -> None:
    """1,500 bytes of TXT do not fit the 1,232 of EDNS: only the TCP answer holds the whole record (an expected
    value longer than the API's 500 characters can be given here)."""
    whole = "".join(BIG_STRINGS)
    verdict = await DnsProbe([], []).check(target(dns_name="big.test", record_type="TXT", dns_server=dnsmasq.address,
                                                  expected_values=(whole,)))  # fmt: skip
    assert (verdict.healthy, verdict.reason) == (True, "ok"), verdict


async def test_the_system_resolvers_nameservers_are_asked_without_dns_server(dnsmasq: Dnsmasq) -> None:
    with UdpSink() as blocked_one:
        # The first nameserver is blocked (never sent a packet), the second answers.
        system = [("127.0.0.2", blocked_one.port), ("127.0.0.1", dnsmasq.port)]
        probe = DnsProbe([ipaddress.ip_network("127.0.0.2/32")], system)
        verdict = await probe.check(target(expected_values=WEB_IPV4))
    assert (verdict.healthy, verdict.reason) == (True, "ok"), verdict
    assert blocked_one.received == 0


async def test_a_silent_server_is_asked_again_and_then_the_next(dnsmasq: Dnsmasq) -> None:
    with UdpSink() as silent:
        probe = DnsProbe([], [("127.0.0.1", silent.port), ("127.0.0.1", dnsmasq.port)])
        verdict = await probe.check(target())
    assert (verdict.healthy, verdict.reason) == (True, "ok"), verdict
    assert silent.received >= 1


async def test_names_that_cannot_be_asked() -> None:
    probe = DnsProbe([], [("127.0.0.1", 9)])
    too_long = await probe.check(target(dns_name="a" * 64 + ".test"))
    idna = await probe.check(target(dns_name="bücher-.test"))
    empty = await probe.check(target(dns_name="a..b"))
    assert (too_long.reason, too_long.detail) == (
        "dns",
        f"cannot look up {'a' * 64}.test: A DNS label is > 63 octets long.",
    )
    assert (idna.reason, idna.detail) == (
        "dns", "cannot look up bücher-.test: the name cannot be encoded for DNS (IDNA: Label must not start or end "
        "with a hyphen)"
    )  # fmt: skip
    assert (empty.reason, empty.detail) == ("dns", "cannot look up a..b: A DNS label is empty.")
