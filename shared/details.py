"""The `detail` text of results, decisions and events: bounded in size and free of credentials.

CONTRACT §4: a detail is at most 1,000 characters (longer text is cut and ends with "…") and never
holds a credential. Details are built from what targets answer (agent messages, redirect URLs,
certificate subjects), so anything that reaches a stored or published detail goes through `safe_detail`.
Producers show what a target sent in a safe form first (the poller shows a redirect's URL without
userinfo or query); the patterns here are the last net under them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

DETAIL_LIMIT = 1000
ELLIPSIS = "…"
REDACTED = "***"

# Every pattern here must stay linear in the text's length: a scheme pattern retried at every letter of a long
# word took seconds on a 200,000-character detail (quadratic), so each one is anchored on a literal or a
# lookbehind that fails at once inside a word.
#
# An authority: "//" after a scheme's ":" (http://…), or scheme-relative at the start of a word (//host/…), up to
# the path, query or fragment. Its userinfo is everything before the LAST "@" in it (a password may hold "@").
# Spaces are allowed (a target may send "user:pa ss@host"); line breaks, quotes and angle brackets end it.
# A run cannot hold another "//" (it stops at "/"), so the matches never overlap: linear.
_AUTHORITY = re.compile(r"(?:(?<=:)|(?<![^\s\"'(<\[=,;]))//(?P<authority>[^/?#\r\n\t\"<>\\]*)")
# A non-hierarchical URL (mailto:, …) holding "user:password@": the scheme starts a word (the lookbehind fails at
# once inside one) and is at most 32 characters, so each attempt costs a bounded number of steps.
_OPAQUE = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}):(?!//)(?P<rest>[^\s/?#\"'<>]*)")
# Authorization-style values: "Basic dXNlcjpwYXNz", "Bearer abc.def".
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>basic|bearer|token|digest)\s+(?P<value>[A-Za-z0-9._~+/=-]{6,})")
# A word of prose after "basic" or "token" ("basic health check", "token expired") is not a credential: a
# credential holds a digit, a capital, or a sign (base64, JWTs, opaque tokens).
_PROSE_WORD = re.compile(r"[a-z]+")
# key=value and "key": "value" pairs whose key names a secret (query strings, JSON, form bodies, logs).
_SECRET_WORD = (
    r"(?:password|passwd|pass|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|auth"
    r"|authorization|session|accesstoken|clientsecret|refreshtoken|signature|sig)"
)
# The secret word is a whole component of the key: "basic_auth_pass", "X-Api-Key", not "author". Any key is
# matched first and its name tested after: a pattern with the words inside the key's repetition backtracked
# quadratically on long "a_b_c_..." runs.
_SECRET_NAME = re.compile(rf"(?i)(?:^|[_-]){_SECRET_WORD}(?:[_-]|$)")
# Where a camelCase name starts a new word ("clientSecret", "apiKey", "sessionId"), for `names_a_secret`.
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Keys that name a secret on their own, even before a ":" in prose ("password: x"); "token", "key" and "auth"
# alone are ordinary words there ("Invalid header token: 'x'").
_STRONG_NAMES = frozenset({"password", "passwd", "secret", "authorization"})
# Query parameters that carry a grant rather than naming it (OAuth's authorization code), counted only in a
# query ("?code=…", "&code=…"): elsewhere "code" is an ordinary word ("exit code=1").
_QUERY_SECRETS = frozenset({"code"})
_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?P<open>[\"']?)(?P<name>[A-Za-z0-9_-]+)(?P<close>[\"']?)\s*(?P<separator>[:=])\s*"
)
_VALUE = re.compile(r"(?P<quote>[\"']?)[^\s\"'&,;}\]]+")
# Well-known secret shapes: our API tokens, Standard Webhooks secrets, Slack webhook paths, AWS keys.
_KNOWN_SECRETS = re.compile(
    r"\bhg_[A-Za-z0-9_-]{20,}|\bwhsec_[A-Za-z0-9+/=]{16,}|/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+|\bAKIA[0-9A-Z]{16}\b"
)
# C0 and C1 control characters, DEL, and the Unicode line separators and bidirectional overrides that would let
# a target break a detail's line or reorder how it is shown (an agent's ESC sequences, newlines).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _userinfo_redacted(authority: str) -> str | None:
    """`authority` with everything before its last "@" replaced, or None when it holds no userinfo. A userinfo
    with a space counts only if it has a ":" before the space ("user:pa ss"): "host is down, ask ops@x" is prose."""
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return None
    first_word = re.split(r"\s", userinfo, maxsplit=1)[0]
    if first_word != userinfo and ":" not in first_word:
        return None
    return f"{REDACTED}@{host}"


def _redact_userinfo(text: str) -> str:
    def authority(match: re.Match[str]) -> str:
        redacted = _userinfo_redacted(match["authority"])
        return match[0] if redacted is None else "//" + redacted

    def opaque(match: re.Match[str]) -> str:
        userinfo, at, host = match["rest"].rpartition("@")
        if not at or ":" not in userinfo:  # "mailto:bob@x" is an address, "mailto:bob:pw@x" holds a password
            return match[0]
        return f"{match['scheme']}:{REDACTED}@{host}"

    return _OPAQUE.sub(opaque, _AUTHORITY.sub(authority, text))


def names_a_secret(name: str) -> bool:
    """Whether a field or header name names a secret: one of the secret words `redact_credentials` knows is a whole
    component of it ("password", "api_key", "X-Auth-Token", and in camelCase "clientSecret", "sessionId"), not
    part of a longer word ("author", "passengers")."""
    return _SECRET_NAME.search(_CAMEL_BOUNDARY.sub("_", name)) is not None or name.lower() in _STRONG_NAMES


def _is_secret_key(text: str, key: re.Match[str]) -> bool:
    """Whether `key` names a secret. `key=value` counts whenever a component of the name is a secret word; a
    `key: value` only when the key is quoted JSON-style, or is a header or field name (holding "-" or "_") with a
    secret component, or a strong secret word — and is not the end of a path or name ("/etc/passwd: …")."""
    name = key["name"]
    before = text[key.start() - 1] if key.start() > 0 else ""
    if key["separator"] == "=" and before in ("?", "&") and name.lower() in _QUERY_SECRETS:
        return True
    if _SECRET_NAME.search(name) is None and name.lower() not in _STRONG_NAMES:
        return False
    if key["separator"] == "=":
        return True
    if key["open"] and key["close"] == key["open"]:
        return True
    if before in ("/", ".") or before.isalpha():
        return False
    return ("-" in name or "_" in name) or name.lower() in _STRONG_NAMES


def _redact_pairs(text: str) -> str:
    """`key=value` / `"key": "value"` with a secret-naming key → `key=***`. The value of an ordinary key is
    not skipped over: in "a=password=x" the pair "password=x" is still found."""
    parts: list[str] = []
    done = 0
    for key in _KEY.finditer(text):
        if key.start() < done or not _is_secret_key(text, key):
            continue
        value = _VALUE.match(text, key.end())
        if value is None:
            continue
        parts += [text[done : key.end()], value["quote"], REDACTED]
        done = value.end()
    return "".join([*parts, text[done:]])


def _redact_auth_scheme(match: re.Match[str]) -> str:
    scheme, value = match["scheme"], match["value"]
    if scheme.lower() != "bearer" and _PROSE_WORD.fullmatch(value):
        return match[0]
    return f"{scheme} {REDACTED}"


def redact_credentials(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with anything that looks like a credential replaced by "***".

    Removes URL userinfo (`https://user:p@ss@host` → `https://***@host`, scheme-relative `//user:pw@host` and
    `mailto:user:pw@host` too), Authorization-style values, `password=…`/`"token": "…"`/`X-Api-Key: …` pairs,
    known secret formats, and every literal in `secrets` (for example the check's own password, which a
    target might echo back).
    """
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    text = _redact_userinfo(text)
    text = _AUTH_SCHEME.sub(_redact_auth_scheme, text)
    text = _redact_pairs(text)
    return _KNOWN_SECRETS.sub(REDACTED, text)


def escape_controls(text: str) -> str:
    """`text` with control characters shown as escapes: NUL as `\\0`, the rest of C0, DEL and C1 as `\\xNN`, the
    Unicode line separators and bidirectional overrides as `\\uNNNN`. A detail stays one line and shows what a
    target sent as it was sent, never terminal escapes or reordered text."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match[0])
        if code == 0:
            return "\\0"  # as details have shown NUL since PostgreSQL refused it
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROL.sub(escape, text)


def clip_detail(text: str, limit: int = DETAIL_LIMIT) -> str:
    """At most `limit` characters; a longer text is cut and ends with "…" (CONTRACT §4)."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def safe_detail(text: str, secrets: Iterable[str | None] = (), limit: int = DETAIL_LIMIT) -> str:
    """A detail fit to store and publish: credentials redacted, control characters escaped (NUL too, which
    PostgreSQL text cannot hold), lone surrogates escaped ("\\ud800"; UTF-8 cannot hold them), then cut to
    `limit` characters. Redaction runs before escaping, so its patterns see real line breaks."""
    if secrets == () and limit == DETAIL_LIMIT:
        return _safe_detail_without_secrets(text)
    return _safe_detail(text, secrets, limit)


def _safe_detail(text: str, secrets: Iterable[str | None], limit: int) -> str:
    storable = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return clip_detail(escape_controls(redact_credentials(storable, secrets)), limit)


@functools.lru_cache(maxsize=4096)
def _safe_detail_without_secrets(text: str) -> str:
    """`safe_detail` of a detail of a check without a password, remembered: the poller stores the same few details
    ("status 200 OK, body contains …") again and again. Details with secrets of their check's to redact are never
    cached. The keys are details as the probe made them, before redaction: a URL with credentials a target echoed
    stays in this process's memory (up to 4,096 entries) as it already was in the probe's, never in a result, event
    or log."""
    return _safe_detail(text, (), DETAIL_LIMIT)
