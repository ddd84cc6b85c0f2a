"""The `detail` text of results, decisions and events: bounded in size and free of credentials.

CONTRACT §4: a detail is at most 1,000 characters (longer text is cut and ends with "…") and never
holds a credential. Details are built from what targets answer (agent messages, redirect URLs,
certificate subjects), so anything that reaches a stored or published detail goes through `safe_detail`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DETAIL_LIMIT = 1000
ELLIPSIS = "…"
REDACTED = "***"

# user:password@ (or user@) in anything that looks like a URL's authority. Anchored on "://" alone, not on
# the scheme before it: a scheme pattern is retried at every letter of a long word, which took seconds on a
# 200,000-character detail (quadratic); every pattern here must stay linear in the text's length.
_URL_USERINFO = re.compile(r"(?P<scheme>://)(?P<userinfo>[^/?#@\s]*)@")
# Authorization-style values: "Basic dXNlcjpwYXNz", "Bearer abc.def".
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>basic|bearer|token|digest)\s+(?P<value>[A-Za-z0-9._~+/=-]{6,})")
# key=value and "key": "value" pairs whose key names a secret (query strings, JSON, form bodies, logs).
_SECRET_WORD = (
    r"(?:password|passwd|pass|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|auth"
    r"|authorization|session|accesstoken|clientsecret|refreshtoken)"
)
# The secret word is a whole component of the key: "basic_auth_pass", "X-Api-Key", not "author". Any key is
# matched first and its name tested after: a pattern with the words inside the key's repetition backtracked
# quadratically on long "a_b_c_..." runs.
_SECRET_NAME = re.compile(rf"(?i)(?:^|[_-]){_SECRET_WORD}(?:[_-]|$)")
_KEY = re.compile(r"(?<![A-Za-z0-9_-])[\"']?(?P<name>[A-Za-z0-9_-]+)[\"']?\s*[:=]\s*")
_VALUE = re.compile(r"(?P<quote>[\"']?)[^\s\"'&,;}\]]+")
# Well-known secret shapes: our API tokens, Standard Webhooks secrets, Slack webhook paths, AWS keys.
_KNOWN_SECRETS = re.compile(
    r"\bhg_[A-Za-z0-9_-]{20,}|\bwhsec_[A-Za-z0-9+/=]{16,}|/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+|\bAKIA[0-9A-Z]{16}\b"
)


def _redact_pairs(text: str) -> str:
    """`key=value` / `"key": "value"` with a secret-naming key → `key=***`. The value of an ordinary key is
    not skipped over: in "a=password=x" the pair "password=x" is still found."""
    parts: list[str] = []
    done = 0
    for key in _KEY.finditer(text):
        if key.start() < done or _SECRET_NAME.search(key["name"]) is None:
            continue
        value = _VALUE.match(text, key.end())
        if value is None:
            continue
        parts += [text[done : key.end()], value["quote"], REDACTED]
        done = value.end()
    return "".join([*parts, text[done:]])


def redact_credentials(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with anything that looks like a credential replaced by "***".

    Removes URL userinfo (`https://user:pw@host` → `https://***@host`), Authorization-style values,
    `password=…`/`"token": "…"`-style pairs, known secret formats, and every literal in `secrets`
    (for example the check's own password, which a target might echo back).
    """
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)
    text = _AUTH_SCHEME.sub(lambda match: f"{match['scheme']} {REDACTED}", text)
    text = _redact_pairs(text)
    return _KNOWN_SECRETS.sub(REDACTED, text)


def clip_detail(text: str, limit: int = DETAIL_LIMIT) -> str:
    """At most `limit` characters; a longer text is cut and ends with "…" (CONTRACT §4)."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def safe_detail(text: str, secrets: Iterable[str | None] = (), limit: int = DETAIL_LIMIT) -> str:
    """A detail fit to store and publish: NUL-free and without lone surrogates (PostgreSQL text and
    UTF-8 cannot hold them; a surrogate becomes its escape, "\\ud800"), credentials redacted, then cut
    to `limit` characters."""
    storable = text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
    return clip_detail(redact_credentials(storable, secrets), limit)
