"""shared/addresses.py: a dns check's `dns_server` as the API validates it and the poller reads it, and an address
with its port as details and pages write it."""

from __future__ import annotations

import pytest

from shared.addresses import host_port, parse_dns_server


@pytest.mark.parametrize(
    ("server", "parsed"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        ("192.0.2.1:053", ("192.0.2.1", 53)),
        ("2001:db8::1", ("2001:db8::1", 53)),
        ("2001:DB8:0::1", ("2001:db8::1", 53)),  # as the address is written canonically
        ("[2001:db8::1]", ("2001:db8::1", 53)),
        ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
        ("::ffff:169.254.169.254", ("::ffff:a9fe:a9fe", 53)),  # the poller maps it to IPv4 before the block check
    ],
)
def test_addresses_with_an_optional_port(server: str, parsed: tuple[str, int]) -> None:
    assert parse_dns_server(server) == parsed


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("resolver.test", "must be an IP address"),
        ("192.0.2.1:0", "port that is not a number from 1 to 65535"),
        ("192.0.2.1:65536", "port that is not a number from 1 to 65535"),
        ("192.0.2.1:+53", "port that is not a number from 1 to 65535"),
        ("192.0.2.1:\u0665\u0663", "port that is not a number from 1 to 65535"),  # Arabic-Indic digits
        ("[2001:db8::1]53", "with an IPv6 address in brackets"),
        ("[2001:db8::1", "with an IPv6 address in brackets"),
        ("[]:53", "must be an IP address"),
        ("[192.0.2.1]:53", "brackets are for IPv6 only"),
        ("[192.0.2.1]", "brackets are for IPv6 only"),
        ("fe80::1%eth0", "must not carry an IPv6 zone"),
        ("[fe80::1%eth0]:53", "must not carry an IPv6 zone"),
    ],
)
def test_what_is_not_an_address_is_refused_in_words(server: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_dns_server(server)


def test_an_ipv6_address_is_written_in_brackets_before_its_port() -> None:
    assert host_port("127.0.0.1", 53) == "127.0.0.1:53"
    assert host_port("db.test", "443") == "db.test:443"
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("fe80::1%eth0", 22) == "[fe80::1%eth0]:22"
    assert host_port("[::1]", 22) == "[::1]:22"  # already in brackets
