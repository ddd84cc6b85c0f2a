"""Verification after patching (CONTRACT §6) as a pure function of a verifying job host and its gating checks.

A job host that was released is patched; once the executor is done (job.finished, or the window's end) it is
verified: every gating check that was healthy at release must be healthy again, by a result taken at or after
`verify_from_at` (`finished_at` + the group's `verify_delay_seconds`), and must have been healthy since a moment
no earlier than `finished_at` for at least the group's `stable_seconds`. Checks that were not healthy at release
(released by an override) are pre-existing failures: named, never blocking. A host without gating checks is
verified at once. When `verify_deadline_at` (`verify_from_at` + `verify_timeout_seconds`) comes without that, the
verification fails, naming each failing check and why.

The gate applies it (services/gate/verification.py) and the owner of the rows, shared/jobs.py, records the
outcome once. No I/O here: the rule is tested on its own (tests/test_verification_rules.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from shared.events import CheckSummary
from shared.gating import GatingCheck


class VerificationVerdict(Enum):
    VERIFIED = "verified"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True)
class Verification:
    """What `verify` found.

    `detail`: the outcome's detail (VERIFIED, FAILED), or what the verification still waits for (PENDING).
    `rerun`: the blocking checks that need a new result (not healthy, or no result since `verify_from_at`);
    a check that is healthy and only waits to be stable long enough needs none. `next_at`: when to look again
    (PENDING): `verify_from_at` before it; else the soonest of the next retry, the moment a check becomes stable
    enough, and the deadline."""

    verdict: VerificationVerdict
    detail: str
    rerun: list[uuid.UUID] = field(default_factory=list)
    next_at: dt.datetime | None = None


def _seconds(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds():.0f} s"


def _blocking_and_pre_existing(
    release_checks: Sequence[CheckSummary] | None, checks: Sequence[GatingCheck]
) -> tuple[list[GatingCheck], list[GatingCheck]]:
    """The current gating checks that block verification (healthy at release) and the pre-existing failures (a
    gating check then, not healthy then). A check that is no longer a gating check (deleted, disabled, made
    non-critical) blocks nothing; one that became a gating check after the release neither: the release did not
    depend on it. `release_checks` None (a job host released before migration 0010): every gating check blocks."""
    if release_checks is None:
        return list(checks), []
    healthy_then = {check.check_id for check in release_checks if check.healthy is True}
    failing_then = {check.check_id for check in release_checks if check.healthy is not True}
    blocking = [check for check in checks if check.check_id in healthy_then]
    pre_existing = [check for check in checks if check.check_id in failing_then]
    return blocking, pre_existing


def _pre_existing_note(pre_existing: Sequence[GatingCheck]) -> str:
    if not pre_existing:
        return ""
    named = "; ".join(f"{check.name}: {check.last_detail or check.status}" for check in pre_existing)
    return f"; pre-existing failures (not healthy at release, not blocking): {named}"


def verify(
    now: dt.datetime,
    release_checks: Sequence[CheckSummary] | None,
    checks: Sequence[GatingCheck] | None,
    *,
    finished_at: dt.datetime,
    verify_from_at: dt.datetime,
    deadline: dt.datetime,
    stable_seconds: int,
    retry_seconds: float,
) -> Verification:
    """The verification verdict for a verifying job host at `now` (CONTRACT §6 "Verification after patching").

    `release_checks`: the gating checks as they were at release (job.released's `checks`; None when unknown);
    `checks`: the host's gating checks now, with `healthy_since` (None: the host is gone, like no checks).
    `finished_at`, `verify_from_at`, `deadline` (`verify_deadline_at`): the job host's; `stable_seconds`: the
    group's policy; `retry_seconds`: HEALTHGATE_GATE_RETRY_SECONDS, for `next_at`.

    A blocking check is good when it is healthy, its last result was taken at or after `verify_from_at`, and it
    has been healthy since `max(healthy_since, finished_at)` for at least `stable_seconds`. VERIFIED when every
    blocking check is good (at once when there is none); FAILED when `now` has reached `deadline` otherwise;
    else PENDING. At or after the deadline (a gate that was down, a timer that fires late) the checks are judged
    as of the deadline: a check stable only after it does not count, one that was stable before it and still is
    does."""
    current = list(checks or [])
    blocking, pre_existing = _blocking_and_pre_existing(release_checks, current)
    note = _pre_existing_note(pre_existing)
    if not blocking:
        if not current:
            return Verification(VerificationVerdict.VERIFIED, "no gating checks on this host: verified at once")
        return Verification(
            VerificationVerdict.VERIFIED, "no gating check was healthy at release: nothing to verify" + note
        )
    if now < verify_from_at:
        return Verification(
            VerificationVerdict.PENDING,
            f"verification begins at {verify_from_at.isoformat()} (verify_delay_seconds)",
            next_at=verify_from_at,
        )
    moment = min(now, deadline)
    stable = dt.timedelta(seconds=stable_seconds)
    problems: list[str] = []
    rerun: list[uuid.UUID] = []
    stable_at: list[dt.datetime] = []
    for check in blocking:
        if check.status != "healthy" or check.last_checked_at is None:
            problems.append(f"{check.name}: {check.last_detail or check.status}")
            rerun.append(check.check_id)
            continue
        if check.last_checked_at < verify_from_at:
            problems.append(f"{check.name}: no result since verification began at {verify_from_at.isoformat()}")
            rerun.append(check.check_id)
            continue
        # A healthy check without healthy_since (a state stored before it existed) counts from its last result.
        since = max(check.healthy_since or check.last_checked_at, finished_at)
        if since > moment:
            problems.append(f"{check.name}: healthy only since {since.isoformat()}, after the deadline")
            continue
        if since + stable > moment:
            problems.append(
                f"{check.name}: healthy for {_seconds(moment - since)} of the {stable_seconds} s required"
                " (stable_seconds)"
            )
            stable_at.append(since + stable)
    if not problems:
        detail = "every gating check healthy at release is healthy again"
        if stable_seconds:
            detail += f", stable for at least {stable_seconds} s"
        return Verification(VerificationVerdict.VERIFIED, detail + note)
    if now >= deadline:
        waited = _seconds(deadline - finished_at)
        return Verification(
            VerificationVerdict.FAILED,
            f"not healthy again within {waited} after the job finished: " + "; ".join(problems) + note,
        )
    next_at = min([now + dt.timedelta(seconds=retry_seconds), deadline, *stable_at])
    return Verification(VerificationVerdict.PENDING, "verifying: " + "; ".join(problems) + note, rerun, next_at)
