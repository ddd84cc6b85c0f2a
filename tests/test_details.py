"""Details are bounded and never hold a credential (CONTRACT §4): pure functions, no services."""

from __future__ import annotations

import pytest

from shared.details import DETAIL_LIMIT, clip_detail, redact_credentials, safe_detail


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
