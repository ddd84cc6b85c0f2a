"""The gate rules of CONTRACT §5 as a pure function of a job host and its gating checks."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from enum import Enum

from shared.events import CheckSummary


@dataclass(frozen=True)
class GatingCheck:
    """An enabled critical check of the host and what the pollers last learnt of it."""

    check_id: uuid.UUID
    name: str
    status: str
    interval_seconds: int
    last_healthy: bool | None
    last_detail: str | None
    last_checked_at: dt.datetime | None

    def ready(self, now: dt.datetime) -> bool:
        """Healthy by a result no older than its interval."""
        if self.status != "healthy" or self.last_checked_at is None:
            return False
        return now - self.last_checked_at <= dt.timedelta(seconds=self.interval_seconds)

    def why_not_ready(self, now: dt.datetime) -> str:
        if self.last_checked_at is None:
            return "no result yet"
        if self.status != "healthy":
            return self.last_detail or self.status
        age = (now - self.last_checked_at).total_seconds()
        return f"last result is {age:.0f} s old, older than its {self.interval_seconds} s interval"

    def summary(self) -> CheckSummary:
        return CheckSummary(
            check_id=self.check_id,
            name=self.name,
            healthy=self.last_healthy,
            detail=self.last_detail,
            checked_at=self.last_checked_at,
        )


class Verdict(Enum):
    RELEASE = "release"
    WINDOW_CLOSED = "window_closed"
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


def decide(window_ends_at: dt.datetime, now: dt.datetime, checks: list[GatingCheck] | None) -> Decision:
    """`checks` is None when the host is unknown. The window rule comes first (CONTRACT §5)."""
    gating = checks or []
    not_ready = [check for check in gating if not check.ready(now)]
    if window_ends_at <= now:
        return Decision(Verdict.WINDOW_CLOSED, gating, not_ready)
    if not not_ready:  # also an unknown host or one without enabled critical checks
        return Decision(Verdict.RELEASE, gating, [])
    return Decision(Verdict.WAIT, gating, not_ready)
