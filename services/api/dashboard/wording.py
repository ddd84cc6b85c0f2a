"""How the dashboard says a check's outcome in words: its result's reason, its uptime and its certificate's end."""

from __future__ import annotations

import datetime as dt
import math

# A result's `reason` (CONTRACT §4) as an operator reads it beside the code; `ok` needs no words.
REASON_WORDS = {
    "ok": "",
    "dns": "the name did not resolve as expected",
    "connect": "no connection",
    "tls": "TLS failed",
    "timeout": "no answer in time",
    "status": "unexpected status",
    "body": "unexpected body",
    "agent": "the agent's answer was not usable",
    "blocked": "the target is in a blocked network",
    "protocol": "the answer broke the protocol",
    "slow": "answered, but too slowly",
    "cert": "the certificate ends too soon",
    "condition": "the condition was not met",
}


def reason_words(reason: str) -> str:
    """The words for a result's reason (empty for `ok`, the code itself for a reason this dashboard does not know)."""
    return REASON_WORDS.get(reason, reason)


def reason_phrase(reason: str) -> str:
    """A reason's code with its words, as a result's outcome is shown: `slow: answered, but too slowly`; `ok`."""
    words = reason_words(reason)
    return f"{reason}: {words}" if words and words != reason else reason


def uptime_percent(share: float | None) -> str:
    """A check's `uptime_24h` (0-1, None without results) as a percentage with one decimal, rounded down so that
    a check with one failure in thousands never reads 100 %: `99.9 %`, `100 %`, `0 %`, `no results`."""
    if share is None:
        return "no results"
    if share >= 1:
        return "100 %"
    if share <= 0:
        return "0 %"
    return f"{math.floor(share * 1000) / 10:.1f} %"


def cert_validity(expires_at: dt.datetime, now: dt.datetime | None = None) -> str:
    """When a server certificate stops being valid (a result's `cert_expires_at`), in UTC, with how long that is from
    `now` (default: the current time): `2026-03-01 12:00 UTC (in 41 days)`, `(in 5 h)`, `(in 90 min)`,
    `(expired just now)`, `(expired 2 days ago)`."""
    now = now or dt.datetime.now(dt.UTC)
    left = expires_at - now
    seconds = abs(left.total_seconds())
    if seconds >= 2 * 86400:
        span = f"{int(seconds // 86400)} days"
    elif seconds >= 2 * 3600:
        span = f"{int(seconds // 3600)} h"
    else:
        span = f"{max(1, int(seconds // 60))} min"
    if left.total_seconds() > 0:
        when = f"in {span}"
    else:
        when = "expired just now" if seconds < 60 else f"expired {span} ago"
    return f"{expires_at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC ({when})"
