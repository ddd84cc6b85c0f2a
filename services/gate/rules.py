"""The gate rules of CONTRACT §5 as a pure function of a job host and its gating checks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from shared.host_status import GatingCheck

UnknownHostPolicy = Literal["release", "fail"]


class Verdict(Enum):
    RELEASE = "release"
    WINDOW_CLOSED = "window_closed"
    UNKNOWN_HOST = "unknown_host"
    INVALID_REQUEST = "invalid_request"  # never from `decide`: a job.start that did not validate
    WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    checks: list[GatingCheck]
    not_ready: list[GatingCheck]

    def failure_detail(self, now: dt.datetime) -> str:
        if not self.not_ready:
            return "the maintenance window had closed"
        failing = "; ".join(f"{check.name}: {check.why_not_ready(now)}" for check in self.not_ready)
        return f"the maintenance window closed while checks were not healthy: {failing}"


def decide(
    window_ends_at: dt.datetime,
    now: dt.datetime,
    checks: list[GatingCheck] | None,
    *,
    unknown_host: UnknownHostPolicy = "release",
) -> Decision:
    """The verdict for a waiting job host at `now`.

    `checks` are the host's enabled critical checks, None when the host is unknown. Rules in the order
    of CONTRACT §5: a window already closed fails first; an unknown host fails when `unknown_host` is
    "fail" (HEALTHGATE_GATE_UNKNOWN_HOST), else it is released like a host without gating checks; all
    gating checks ready releases; anything else waits."""
    gating = checks or []
    not_ready = [check for check in gating if not check.ready(now)]
    if window_ends_at <= now:
        return Decision(Verdict.WINDOW_CLOSED, gating, not_ready)
    if checks is None and unknown_host == "fail":
        return Decision(Verdict.UNKNOWN_HOST, [], [])
    if not not_ready:  # also an unknown host or one without enabled critical checks
        return Decision(Verdict.RELEASE, gating, [])
    return Decision(Verdict.WAIT, gating, not_ready)
