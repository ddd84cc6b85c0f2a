"""The gate rules of CONTRACT §5 as a pure function of a job host and its gating checks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from shared.gating import GatingCheck

UnknownHostPolicy = Literal["release", "fail"]
NO_RESULT_BEFORE_CLOSE = "no result before the window closed"


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

    def failure_detail(self, window_ends_at: dt.datetime) -> str:
        """The detail of a window_closed failure: each check not ready when the window closed, and why."""
        if not self.not_ready:
            return "the maintenance window had closed"
        failing = "; ".join(
            f"{check.name}: {check.why_not_ready(window_ends_at, no_result=NO_RESULT_BEFORE_CLOSE)}"
            for check in self.not_ready
        )
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


def window_closed(checks_then: list[GatingCheck], window_ends_at: dt.datetime) -> Decision:
    """The window_closed verdict, with the gating checks as they stood when the window closed
    (`checks_then`, see `gating_checks_as_of`) and those not ready at that moment.

    CONTRACT §5: still unhealthy when the window closes → job.failed naming each failing check and its
    detail; and a job still waiting when its window ends is failed, also when the gate was down then.
    Applied later (the gate was down, or a job.start arrived after its window), the checks must be
    described as they were at `window_ends_at`, not as they are when the gate gets to it: a check that
    recovered since is still named, one that failed only since is not."""
    not_ready = [check for check in checks_then if not check.ready(window_ends_at)]
    return Decision(Verdict.WINDOW_CLOSED, checks_then, not_ready)
