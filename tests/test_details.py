"""Details are bounded and never hold a credential (CONTRACT §4): pure functions, no services."""

from __future__ import annotations

import pytest

from shared.details import (
    DETAIL_LIMIT,
    clip_detail,
    escape_controls,
    names_a_secret,
    redact_credentials,
    safe_detail,
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("redirected to https://bob:s3cret-pw@10.0.0.1/x", "s3cret-pw"),
        ("agent said: Authorization: Basic dXNlcjpzM2NyZXQ=", "dXNlcjpzM2NyZXQ="),
        ("Bearer eyJhbGciOi.payload.sig rejected", "eyJhbGciOi.payload.sig"),
        ("GET /health?access_token=abc123def&x=1 failed", "abc123def"),
        ('{"password": "hunter22", "ok": true}', "hunter22"),
        ("X-Api-Key: k-123456", "k-123456"),
        ("basic_auth_pass=zz-top-9", "zz-top-9"),
        ("token hg_" + "a" * 43 + " is revoked", "hg_" + "a" * 43),
        ("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw was refused", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("mode=password=pa-ss-77 set", "pa-ss-77"),  # a secret pair inside an ordinary pair's value
        ("x=1&db_password=zz9-top&y=2", "zz9-top"),
        ("see ftp+ssh://root:r00t-pw@10.0.0.2/", "r00t-pw"),
        # Userinfo: an "@" inside the password (everything up to the last "@" of the authority goes), a space,
        # scheme-relative, IPv6 hosts, percent-encoding, non-hierarchical schemes.
        ("redirect to http://admin:p@ss@127.0.0.1:99999/", "ss@127"),
        ("redirect to http://admin:p@ss@127.0.0.1:99999/", "admin"),
        ("redirect to http://admin:a@b@c@d-pw@127.0.0.1/x", "d-pw"),
        ("redirect to http://admin:pa ss@127.0.0.1/", "pa ss"),
        ("redirect to '//admin:s3cr3t@127.0.0.1:99999/'", "s3cr3t"),
        ("//admin:s3cr3t@127.0.0.1:99999/", "s3cr3t"),
        ("Location: //admin:s3cr3t@127.0.0.1/", "s3cr3t"),
        ("to http://u:p-w0rd@[::1]:1/", "p-w0rd"),
        ("to http://u%40x:p%40ss-w0rd@host/", "p%40ss-w0rd"),
        ("redirect to mailto:admin:s3cr3t@127.0.0.1", "s3cr3t"),
        ("see xmpp:bob:hunter2-pw@10.0.0.1 now", "hunter2-pw"),
        ('{"url": "https://svc:p@ss-w0rd@10.0.0.1"}', "ss-w0rd"),
        ("line one\nhttp://admin:p@ss-2@10.0.0.3/", "ss-2"),
        # Query credentials, as a last net under the poller's "?…" rule.
        ("GET /x?X-Amz-Signature=abcdef0123&y=1", "abcdef0123"),
        ("GET /x?a=1&sig=0a1b2c3d", "0a1b2c3d"),
        ("callback /cb?code=oauth-grant-77&state=x", "oauth-grant-77"),
        # Header and field names with a secret component, and strong secret words, before ": ".
        ("X-Auth-Token: tok-998877", "tok-998877"),
        ("access_token: at-445566", "at-445566"),
        ("password: hunter2-pw", "hunter2-pw"),
        ("passwd: s3-cret", "s3-cret"),
        ("secret: sh-h-h", "sh-h-h"),
        ("Authorization: Token tk-112233", "tk-112233"),
        ("'token': 'quoted-tk'", "quoted-tk"),
    ],
)
def test_credentials_are_redacted(text: str, secret: str) -> None:
    assert secret not in redact_credentials(text)


def test_a_given_secret_is_redacted_wherever_it_appears() -> None:
    assert "pa55word" not in redact_credentials("server echoed pa55word back", ["pa55word"])


@pytest.mark.parametrize(
    "text",
    [
        "status 503 Service Unavailable, expected 2xx",
        "connected to 10.0.0.1:443",
        "nginx.service is active (running)",
        "author: John, passage=3",
        "body does not contain 'token count'",
        # A path or file name ending in a secret word is not a key; prose words before ": " are not keys.
        "redirect to file:///etc/passwd: only http and https redirects are followed",
        "127.0.0.1:8080 sent an answer that is not valid HTTP: Invalid header token: 'this is not a header'",
        "wrote config.password: done",
        "the token: expired at noon",
        "key: value mismatch, auth: none offered",
        "unknown key: 'region'",
        # Prose after "basic" or "token" is not a credential; an address without a password is not userinfo.
        "basic health check failed",
        "the token expired yesterday",
        "redirect to mailto:ops@example.test: only http and https redirects are followed",
        "http://10.0.0.1 is down, ask ops@example.test",
        "exit code=1",
        "redirect to http://10.0.0.1:8080/login?…",
    ],
)
def test_ordinary_details_are_unchanged(text: str) -> None:
    assert redact_credentials(text) == text


def test_long_details_are_cut_with_an_ellipsis() -> None:
    assert clip_detail("x" * DETAIL_LIMIT) == "x" * DETAIL_LIMIT
    cut = clip_detail("y" * 200_000)
    assert len(cut) == DETAIL_LIMIT and cut.endswith("…")


def test_safe_detail_removes_nul_and_bounds_the_text() -> None:
    detail = safe_detail("a\x00b " + "z" * 5000)
    assert "\x00" not in detail and len(detail) == DETAIL_LIMIT


@pytest.mark.parametrize(
    "text",
    ["a" * 200_000, "x_token_" * 25_000, "a-" * 100_000 + "=", "password" * 25_000, "b." * 100_000 + "://"],
    ids=["letters", "key-like", "dashes", "secret-words", "scheme-like"],
)
def test_long_adversarial_texts_are_bounded(text: str) -> None:
    """Each pattern is linear in the text: a target's 200,000 characters once took minutes (no timing asserted)."""
    assert len(safe_detail(text, ["s3cret"])) == DETAIL_LIMIT


def test_the_examples_from_the_tester_read_true() -> None:
    """Over-redaction made details untrue: a word eaten after "passwd:" or "token:"."""
    assert safe_detail("redirect to file:///etc/passwd: only http and https redirects are followed") == (
        "redirect to file:///etc/passwd: only http and https redirects are followed"
    )
    assert safe_detail("Invalid header token: 'this is not a header'") == "Invalid header token: 'this is not a header'"
    assert safe_detail("redirect to http://admin:p@ss@127.0.0.1:99999/") == "redirect to http://***@127.0.0.1:99999/"
    assert safe_detail("redirect to mailto:admin:s3cr3t@127.0.0.1") == "redirect to mailto:***@127.0.0.1"
    assert safe_detail('{"password": "hunter22"}') == '{"password": "***"}'


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("line\nbreak\r\ttab", "line\\x0abreak\\x0d\\x09tab"),
        ("nul\x00 del\x7f c1\x85\x9b", "nul\\0 del\\x7f c1\\x85\\x9b"),
        ("bidi \u202eevil\u2066 sep\u2028", "bidi \\u202eevil\\u2066 sep\\u2028"),
        ("Système opérationnel \u2013 5 €", "Système opérationnel \u2013 5 €"),  # printable non-ASCII stays as it is
    ],
)
def test_control_characters_are_escaped(text: str, shown: str) -> None:
    assert escape_controls(text) == shown
    assert safe_detail(text) == shown


def test_control_characters_never_reach_a_detail() -> None:
    every = "".join(chr(code) for code in range(0x00, 0xA0)) + "\u2028\u2029\u202a\u202e\u2066\u2069"
    detail = safe_detail(every)
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in detail)
    assert not set(detail) & set("\u2028\u2029\u202a\u202e\u2066\u2069")


def test_escaping_is_counted_in_the_limit_and_redaction_sees_real_line_breaks() -> None:
    detail = safe_detail("\n" * 5000)
    assert len(detail) == DETAIL_LIMIT and detail.endswith("…")
    # "password=x" then a newline: the value ends at the line break, the next line survives.
    assert safe_detail("password=x-secret\nnext line") == "password=***\\x0anext line"
    # A secret given literally is redacted even when it holds a control character.
    assert "pa\tss" not in safe_detail("echo pa\tss-word", ["pa\tss-word"])
    assert "pa\\x09ss" not in safe_detail("echo pa\tss-word", ["pa\tss-word"])


@pytest.mark.parametrize(
    "text",
    [
        "://" * 70_000,
        "//a@" * 50_000,
        ":a" * 100_000,
        "a:" * 100_000 + "@",
        "http://" + "a@" * 100_000,
        "x-y: " * 40_000,
        "\x1b" * 200_000,
    ],
    ids=["schemes", "scheme-relative", "colons", "opaque", "many-at", "header-like", "escapes"],
)
def test_new_patterns_stay_linear(text: str) -> None:
    """No timing asserted: a quadratic pattern would make this test take minutes, not fail."""
    detail = safe_detail(text, ["s3cret"])
    assert len(detail) <= DETAIL_LIMIT


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True), ("basic_auth_pass", True), ("X-Auth-Token", True), ("api_key", True), ("apiKey", True),
        ("clientSecret", True), ("accessToken", True), ("sessionId", True), ("Authorization", True),
        ("PRIVATE_KEY", True), ("secretKey", True),
        ("author", False), ("passengers", False), ("status", False), ("tokens_used", False), ("keyId", False),
        ("JSESSIONID", False), ("content-type", False),
    ],
)  # fmt: skip
def test_names_a_secret(name: str, secret: bool) -> None:
    assert names_a_secret(name) is secret
