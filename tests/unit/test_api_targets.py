"""services/api/targets.py: which host names, tcp addresses and URLs a check may point at (CONTRACT §3), and the
words for each problem. Nothing here is resolved: the functions only read the text."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest
import yarl
from hypothesis import example, given
from hypothesis import strategies as st

from services.api.targets import (
    MAX_HOST_NAME_LENGTH,
    address_problems,
    dns_name_problems,
    dns_server_problems,
    has_unprintable,
    host_name_problems,
    url_problems,
)

# ---- host names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "db-1",
        "db-1.internal",
        "db-1.internal.",  # fully qualified
        "_sip._tcp.a_b.test",  # underscores: resolvers accept them, internal zones use them
        "A.B.TEST",
        "b\u00fccher.example",  # IDNA: xn--bcher-kva.example
        "xn--bcher-kva.example",
        "\u2168.test",  # UTS #46 maps the Roman numeral to "ix"
        "a" * 63 + ".test",
        ".".join(["a" * 63] * 3 + ["a" * 61]),  # 253 characters
        "1a.test",
        "test.1a",  # a last label that is not only a number
    ],
)
def test_host_names_that_can_be_resolved_are_accepted(name: str) -> None:
    assert host_name_problems(name) == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "has an empty label"),
        (".", "has an empty label"),
        ("a..b", "has an empty label"),
        (".a.test", "has an empty label"),
        ("a b.test", "must not contain spaces or control characters"),
        ("a\tb", "must not contain spaces or control characters"),
        ("a\u200bb.test", "must not contain spaces or control characters"),  # a zero-width space
        ("-a.test", "no label may begin or end with '-'"),
        ("a-.test", "no label may begin or end with '-'"),
        ("exa%6dple.test", "may hold only letters, digits"),
        ("a/b", "may hold only letters, digits"),
        ("a" * 64 + ".test", "has a label longer than 63 characters"),
        (".".join(["a" * 63] * 4), "is longer than 253 characters"),
        ("xn--zz.test", "cannot be encoded for DNS (IDNA)"),
        ("\u2603.test", "cannot be encoded for DNS (IDNA)"),  # a snowman is not allowed in IDNA 2008
        ("1.2.3", "its last label is a number"),
        ("0x7f000001", "its last label is a number"),
        ("host.0X1F", "its last label is a number"),
        ("10", "its last label is a number"),
    ],
)
def test_host_names_that_cannot_work_are_refused_in_words(name: str, problem: str) -> None:
    problems = host_name_problems(name)
    assert problems and any(problem in text for text in problems), problems


@given(st.text(max_size=300))
def test_any_text_is_judged_without_error(name: str) -> None:
    problems = host_name_problems(name)
    assert all(isinstance(problem, str) and problem for problem in problems)
    if not problems:
        assert not has_unprintable(name) and name.strip(".")


LABEL = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,20}[A-Za-z0-9_])?", fullmatch=True)


@given(st.lists(LABEL, min_size=1, max_size=6), st.booleans())
def test_ascii_names_of_valid_labels_are_accepted_unless_the_last_is_a_number(labels: list[str], dot: bool) -> None:
    name = ".".join(labels) + ("." if dot else "")
    problems = host_name_problems(name)
    last = labels[-1]
    number = last.isdigit() or (last[:2].lower() == "0x" and all(c in "0123456789abcdefABCDEF" for c in last[2:]))
    if len(name.rstrip(".")) > MAX_HOST_NAME_LENGTH or last.lower().startswith("xn--") or "xn--" in name.lower():
        return  # judged by their length or as IDNA: covered above
    assert (problems != []) is number, (name, problems)


# ---- tcp addresses ---------------------------------------------------------------------------------------


@given(st.ip_addresses())
def test_every_ip_address_is_a_tcp_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert address_problems(str(address)) == []


@pytest.mark.parametrize(
    "address", ["fe80::1%eth0", "fe80::1%2", "fe80::1%br-1a2b.100", "::ffff:127.0.0.1", "app.test"]
)
def test_zoned_ipv6_and_names_are_tcp_addresses(address: str) -> None:
    assert address_problems(address) == []


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1:22", "must not hold a port"),
        ("app.test:22", "must not hold a port"),
        ("[::1]", "without brackets"),
        ("[::1]:22", "without brackets"),
        ("http://app.test", "not a URL, path or network"),
        ("10.0.0.0/8", "not a URL, path or network"),
        ("user@app.test", "not a URL, path or network"),
        ("2001:db8::zz", "is not a valid IPv6 address"),
        ("fe80::1%not a zone", "has an IPv6 zone that is not an interface name or index"),
        ("fe80::1%" + "x" * 16, "has an IPv6 zone that is not an interface name or index"),
        ("256.1.1.1", "its last label is a number"),
        ("127.1", "its last label is a number"),
        ("", "has an empty label"),
    ],
)
def test_tcp_addresses_that_cannot_work_are_refused(address: str, problem: str) -> None:
    problems = address_problems(address)
    assert problems and any(problem in text for text in problems), problems


@given(st.text(max_size=100))
def test_any_tcp_address_text_is_judged_without_error(address: str) -> None:
    assert all(problem for problem in address_problems(address))


# ---- URLs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "https://127.0.0.1:8443/health?full=1#top",
        "HTTP://127.0.0.1",
        "http://[::1]:8080/x",
        "http://[fe80::1]/",
        "https://b\u00fccher.example/p\u00e4th",
        "http://db-1.internal./",
        "http://127.0.0.1:65535/",
    ],
)
def test_check_urls_that_can_work_are_accepted(url: str) -> None:
    assert url_problems(url, base_url=False) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://user:pw@127.0.0.1/", "they go in basic_auth_user and basic_auth_pass"),
        ("http://user@127.0.0.1/", "must not contain credentials"),
        ("http://127.0.0.1:0/", "port 0 cannot be connected to"),
        ("http://127.0.0.1:65536/", "not a valid URL"),
        ("ftp://127.0.0.1/", "URL scheme should be 'http' or 'https'"),
        ("/health", "not a valid URL"),
        ("http://127.0.0.1/a b", "must not contain spaces or control characters"),
        ("http://127.0.0.1\\@169.254.169.254/", "must not contain a backslash"),
        ("http://0x7f000001/", "its last label is a number"),
        ("http://127.1/", "its last label is a number"),
        ("http://exa%6dple.test/", "may hold only letters, digits"),
        ("http://[::1/", "not a valid URL"),
        ("http://[fe80::1%25lo]/", "not a valid URL: invalid IPv6 address"),  # no zone in a URL's host
    ],
)
def test_check_urls_that_cannot_work_are_refused(url: str, problem: str) -> None:
    problems = url_problems(url, base_url=False)
    assert problems and any(problem in text for text in problems), problems


def test_a_base_url_has_no_query_fragment_or_credentials() -> None:
    assert url_problems("http://127.0.0.1:9100/agent/", base_url=True) == []
    assert url_problems("http://127.0.0.1:9100/?x=1", base_url=True) == [
        "must not have a query string (a base URL: the agent's paths are appended to it)"
    ]
    assert url_problems("http://127.0.0.1:9100/#x", base_url=True) == [
        "must not have a fragment (a base URL: the agent's paths are appended to it)"
    ]
    assert url_problems("http://u:p@127.0.0.1:9100/", base_url=True) == [
        "must not contain credentials (user:password@)"
    ]


def test_no_problem_repeats_a_password_of_the_url() -> None:
    for url in ("http://admin:s3cret@127.0.0.1/", "http://admin:s3cret@[::1/", "http://admin:s3cret@host:0/"):
        assert "s3cret" not in " ".join(url_problems(url, base_url=False))


URL_CHARACTERS = st.sampled_from("htps:/[]@%\\.-_019afxX?#\u00e9\u2168 ")
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
    st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    st.text(alphabet=URL_CHARACTERS, max_size=12),
)
urls = st.builds(
    lambda scheme, userinfo, host, port, rest: f"{scheme}://{userinfo}{host}{port}{rest}",
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(["", "user@", "u:p@", "[@"]),
    hosts,
    st.one_of(st.just(""), st.integers(min_value=0, max_value=70000).map(lambda port: f":{port}"), st.just(":x")),
    st.text(alphabet=URL_CHARACTERS, max_size=12).map(lambda rest: "/" + rest),
)


@given(st.one_of(urls, st.text(max_size=80), st.text(max_size=60).map(lambda rest: "http://" + rest)))
@example("http://[@0")  # WHATWG reads host 0 behind the userinfo "[", urllib.parse refuses the "["
def test_any_url_text_is_judged_in_words_without_error(url: str) -> None:
    for base_url in (False, True):
        assert all(isinstance(problem, str) and problem for problem in url_problems(url, base_url=base_url))


@given(urls)
def test_an_accepted_url_names_the_same_host_and_port_for_the_api_and_the_poller(url: str) -> None:
    """The module's promise: a URL is accepted only if urllib.parse (the API) and yarl (aiohttp, the poller)
    read it alike, naming the same host and port."""
    if url_problems(url, base_url=False):
        return
    parts, parsed = urlsplit(url), yarl.URL(url)
    assert parsed.scheme == parts.scheme.lower()
    assert parsed.port == (parts.port or (443 if parts.scheme.lower() == "https" else 80))
    assert parsed.raw_host == yarl.URL.build(scheme="http", host=parts.hostname or "").raw_host, url


# ---- dns checks: the name to look up and the server to ask ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["db.test", "db.test.", "b\u00fccher.test", "_sip._tcp.db.test", "test", "db.test\u3002"]
)
def test_dns_names_to_look_up(name: str) -> None:
    assert dns_name_problems(name) == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("192.0.2.1", "is an IP address"),
        ("192.0.2.1.", "is an IP address"),
        ("2001:db8::1", "is an IP address"),
        ("db.test:53", "not a URL, address or port"),
        ("db.test..", "empty label"),  # one trailing dot is a fully qualified name; a second is an empty label
        ("..", "empty label"),
        (".", "empty label"),
    ],
)
def test_dns_names_that_cannot_be_looked_up(name: str, problem: str) -> None:
    assert any(problem in text for text in dns_name_problems(name)), dns_name_problems(name)


def test_dns_servers_are_addresses_with_an_optional_port() -> None:
    for server in ("192.0.2.1", "192.0.2.1:5353", "2001:db8::1", "[2001:db8::1]", "[2001:db8::1]:5353"):
        assert dns_server_problems(server) == [], server
    assert dns_server_problems("[192.0.2.1]:53") == [
        "has brackets around an IPv4 address: brackets are for IPv6 only ([::1]:53), as in URLs"
    ]
    assert dns_server_problems("resolver.test") == [
        "must be an IP address (a name would need a resolver itself), or ip:port"
    ]
