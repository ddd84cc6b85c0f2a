"""The verification rule of CONTRACT §6 (shared/verification_rules.py), on its own: pure logic, no services."""

from __future__ import annotations

import datetime as dt
import uuid

from shared.events import CheckSummary
from shared.gating import GatingCheck
from shared.verification_rules import VerificationVerdict, verify

FINISHED = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
FROM = FINISHED + dt.timedelta(seconds=30)
DEADLINE = FROM + dt.timedelta(seconds=600)
WEB = uuid.UUID(int=1)
DB = uuid.UUID(int=2)


def at(seconds: float) -> dt.datetime:
    return FINISHED + dt.timedelta(seconds=seconds)


def check(check_id: uuid.UUID, name: str, status: str, checked: float | None, since: float | None = None,
          detail: str | None = None) -> GatingCheck:  # fmt: skip
    return GatingCheck(
        check_id=check_id, name=name, status=status, interval_seconds=60, last_healthy=status == "healthy",
        last_detail=detail, last_checked_at=None if checked is None else at(checked),
        healthy_since=None if since is None else at(since),
    )  # fmt: skip


def released(*items: tuple[uuid.UUID, str, bool]) -> list[CheckSummary]:
    return [
        CheckSummary(check_id=check_id, name=name, healthy=healthy, detail=None, checked_at=at(-100))
        for check_id, name, healthy in items
    ]


def run(now: float, checks: list[GatingCheck], release: list[CheckSummary] | None, stable: int = 0):  # type: ignore[no-untyped-def]
    return verify(
        at(now), release, checks, finished_at=FINISHED, verify_from_at=FROM, deadline=DEADLINE, stable_seconds=stable,
        retry_seconds=5,
    )  # fmt: skip


def test_no_gating_checks_is_verified_at_once() -> None:
    verdict = run(0, [], [])
    assert verdict.verdict is VerificationVerdict.VERIFIED and "no gating checks" in verdict.detail


def test_before_the_delay_it_waits_for_verify_from_at() -> None:
    verdict = run(10, [check(WEB, "web", "healthy", 5, since=-500)], released((WEB, "web", True)))
    assert verdict.verdict is VerificationVerdict.PENDING and verdict.next_at == FROM and verdict.rerun == []


def test_a_result_after_verify_from_at_is_needed() -> None:
    stale = run(40, [check(WEB, "web", "healthy", 20, since=-500)], released((WEB, "web", True)))
    assert stale.verdict is VerificationVerdict.PENDING and stale.rerun == [WEB]
    fresh = run(40, [check(WEB, "web", "healthy", 35, since=-500)], released((WEB, "web", True)))
    assert fresh.verdict is VerificationVerdict.VERIFIED


def test_unhealthy_is_pending_until_the_deadline_then_fails_naming_the_check() -> None:
    down = [check(WEB, "web", "unhealthy", 100, detail="status 503 Service Unavailable")]
    pending = run(100, down, released((WEB, "web", True)))
    assert pending.verdict is VerificationVerdict.PENDING and pending.rerun == [WEB]
    assert pending.next_at == at(105)
    failed = run(630, down, released((WEB, "web", True)))
    assert failed.verdict is VerificationVerdict.FAILED
    assert "web: status 503 Service Unavailable" in failed.detail and "630 s" in failed.detail


def test_stable_seconds_counts_from_finished_at_or_healthy_since() -> None:
    release = released((WEB, "web", True))
    # Healthy all along: stable from finished_at, so only 60 s after it.
    calm = [check(WEB, "web", "healthy", 50, since=-500)]
    assert run(50, calm, release, stable=60).verdict is VerificationVerdict.PENDING
    assert run(50, calm, release, stable=60).next_at == at(55)  # the next retry comes before stability
    assert run(60, calm, release, stable=60).verdict is VerificationVerdict.VERIFIED
    # Rebooted: healthy since 40 s, stable at 100 s; the timer is set to that moment when it is sooner.
    rebooted = [check(WEB, "web", "healthy", 98, since=40)]
    pending = run(98, rebooted, release, stable=60)
    assert pending.verdict is VerificationVerdict.PENDING and pending.next_at == at(100) and pending.rerun == []
    assert "(stable_seconds)" in pending.detail
    assert run(100, rebooted, release, stable=60).verdict is VerificationVerdict.VERIFIED


def test_pre_existing_failures_are_named_and_do_not_block() -> None:
    checks = [check(WEB, "web", "healthy", 40, since=35), check(DB, "db", "unhealthy", 40, detail="db down")]
    verdict = run(40, checks, released((WEB, "web", True), (DB, "db", False)))
    assert verdict.verdict is VerificationVerdict.VERIFIED
    assert "pre-existing failures (not healthy at release, not blocking): db: db down" in verdict.detail
    only_failing = run(0, [checks[1]], released((DB, "db", False)))
    assert only_failing.verdict is VerificationVerdict.VERIFIED and "db: db down" in only_failing.detail


def test_after_the_deadline_checks_are_judged_as_of_it() -> None:
    release = released((WEB, "web", True))
    recovered_late = [check(WEB, "web", "healthy", 700, since=690)]
    assert run(700, recovered_late, release).verdict is VerificationVerdict.FAILED
    recovered_in_time = [check(WEB, "web", "healthy", 700, since=100)]
    assert run(700, recovered_in_time, release).verdict is VerificationVerdict.VERIFIED


def test_checks_unknown_at_release_all_block() -> None:
    verdict = run(40, [check(WEB, "web", "unhealthy", 40, detail="down")], None)
    assert verdict.verdict is VerificationVerdict.PENDING and verdict.rerun == [WEB]
