"""The gate's pure rules (shared/gate_rules.py, CONTRACT §5 and §6): the order of the rules, stability, the
release cutoff, no_checks, a halted job and the disruption budget. No services."""

from __future__ import annotations

import datetime as dt
import uuid

from shared.gate_rules import (
    BudgetView,
    GroupBudget,
    Holder,
    Verdict,
    closes_at,
    decide,
    window_closed,
)
from shared.gating import GatingCheck
from shared.group_policies import GroupPolicy

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(hours=1)
HOST = uuid.UUID(int=1)


def check(
    name: str = "web", *, status: str = "healthy", age: float = 1, healthy_for: float | None = 3600, interval: int = 60
) -> GatingCheck:
    return GatingCheck(
        check_id=uuid.uuid5(uuid.NAMESPACE_DNS, name),
        name=name,
        status=status,
        interval_seconds=interval,
        last_healthy=status == "healthy",
        last_detail="ok" if status == "healthy" else "status 503",
        last_checked_at=NOW - dt.timedelta(seconds=age),
        healthy_since=None if healthy_for is None or status != "healthy" else NOW - dt.timedelta(seconds=healthy_for),
    )


def budget(limit: int, *holders: Holder, counted: bool = False) -> BudgetView:
    return BudgetView("web", limit, holders, counted=counted)


def holder(index: int, *, job: str | None = "J", unhealthy: bool = False) -> Holder:
    return Holder(uuid.UUID(int=100 + index), f"web-{index}", job, unhealthy)


def test_without_policy_the_rules_are_those_of_section_5() -> None:
    assert decide(LATER, NOW, [check()]).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, []).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, None).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, None, unknown_host="fail").verdict is Verdict.UNKNOWN_HOST
    waiting = decide(LATER, NOW, [check(), check("db", status="unhealthy")])
    assert waiting.verdict is Verdict.WAIT and waiting.waiting_for == ["checks"]
    assert [item.name for item in waiting.not_ready] == ["db"]
    assert waiting.waiting_detail(NOW) == "waiting for checks: db"
    assert decide(NOW, NOW, [check()]).verdict is Verdict.WINDOW_CLOSED


def test_the_window_comes_first_then_a_halted_job_then_an_unknown_host() -> None:
    assert decide(NOW, NOW, None, unknown_host="fail", halted=True).verdict is Verdict.WINDOW_CLOSED
    assert decide(LATER, NOW, None, unknown_host="fail", halted=True).verdict is Verdict.JOB_HALTED
    assert decide(LATER, NOW, [check()], halted=True).verdict is Verdict.JOB_HALTED


def test_release_cutoff_closes_the_window_early_and_names_itself() -> None:
    policy = GroupPolicy(release_cutoff_seconds=600)
    assert closes_at(LATER, policy) == LATER - dt.timedelta(seconds=600)
    assert decide(NOW + dt.timedelta(seconds=601), NOW, [check()], policy=policy).verdict is Verdict.RELEASE
    at_cutoff = decide(NOW + dt.timedelta(seconds=600), NOW, [check("db", status="unhealthy")], policy=policy)
    assert at_cutoff.verdict is Verdict.WINDOW_CLOSED
    detail = at_cutoff.failure_detail(NOW + dt.timedelta(seconds=600))
    assert "release cutoff (600 s before the window's end" in detail and "db: status 503" in detail
    assert "release cutoff" not in decide(NOW, NOW, [check("db", status="unhealthy")]).failure_detail(NOW)
    # A window ending within the cutoff of the earliest instant does not overflow.
    assert closes_at(dt.datetime.min.replace(tzinfo=dt.UTC), policy) == dt.datetime.min.replace(tzinfo=dt.UTC)


def test_no_checks_fail_fails_a_known_host_without_gating_checks_only() -> None:
    policy = GroupPolicy(no_checks="fail")
    assert decide(LATER, NOW, [], policy=policy).verdict is Verdict.NO_CHECKS
    assert decide(LATER, NOW, [check()], policy=policy).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, None, policy=policy).verdict is Verdict.RELEASE  # unknown host: §5


def test_stability_waits_until_every_check_was_healthy_long_enough() -> None:
    policy = GroupPolicy(stable_seconds=60)
    fresh = decide(LATER, NOW, [check(healthy_for=20), check("db", healthy_for=61)], policy=policy)
    assert fresh.verdict is Verdict.WAIT and fresh.waiting_for == ["stability"]
    assert [item.name for item in fresh.unstable] == ["web"]
    assert fresh.stable_at() == NOW + dt.timedelta(seconds=40)
    assert "web (healthy for 20 s)" in fresh.waiting_detail(NOW) and "60 s" in fresh.waiting_detail(NOW)
    assert decide(LATER, NOW, [check(healthy_for=60)], policy=policy).verdict is Verdict.RELEASE
    unknown_since = decide(LATER, NOW, [check(healthy_for=None)], policy=policy)
    assert unknown_since.waiting_for == ["stability"] and unknown_since.stable_at() is None
    assert decide(LATER, NOW, [check(healthy_for=None)]).verdict is Verdict.RELEASE  # stable_seconds 0


def test_checks_and_stability_are_exclusive_per_check_and_both_listed() -> None:
    policy = GroupPolicy(stable_seconds=60)
    decision = decide(LATER, NOW, [check(healthy_for=5), check("db", status="unhealthy")], policy=policy)
    assert decision.waiting_for == ["checks", "stability"]
    assert [item.name for item in decision.not_ready] == ["db"] and [item.name for item in decision.unstable] == ["web"]


def test_budget_holds_a_ready_host_and_names_the_holders() -> None:
    full = budget(2, holder(3, job=None, unhealthy=True), holder(1))
    decision = decide(LATER, NOW, [check()], budget=full)
    assert decision.verdict is Verdict.WAIT and decision.waiting_for == ["budget"]
    assert decision.waiting_detail(NOW) == (
        "waiting for the disruption budget of group web: 2 of 2 unavailable: web-1 (job J patching), web-3 (unhealthy)"
    )
    assert decide(LATER, NOW, [check()], budget=budget(3, holder(1), holder(2))).verdict is Verdict.RELEASE
    # Its own host is counted once: a host already in patch (another job) or unhealthy does not take a second unit.
    assert (
        decide(LATER, NOW, [check()], budget=budget(2, holder(1), holder(2), counted=True)).verdict is Verdict.RELEASE
    )
    assert Holder(HOST, "web-9", "J", True).why() == "job J patching, unhealthy"


def test_budget_is_reported_only_once_checks_and_stability_are_met() -> None:
    full = budget(1, holder(1))
    not_ready = decide(LATER, NOW, [check(status="unhealthy")], budget=full)
    assert not_ready.waiting_for == ["checks"]
    unstable = decide(LATER, NOW, [check(healthy_for=1)], budget=full, policy=GroupPolicy(stable_seconds=60))
    assert unstable.waiting_for == ["stability"]
    # The window and a halted job come before the budget.
    assert decide(NOW, NOW, [check()], budget=full).verdict is Verdict.WINDOW_CLOSED
    assert decide(LATER, NOW, [check()], budget=full, halted=True).verdict is Verdict.JOB_HALTED


def test_a_group_budget_in_a_pass_counts_each_release_for_the_hosts_after_it() -> None:
    first, second, third = (uuid.UUID(int=index) for index in (1, 2, 3))
    group = GroupBudget("web", 2, {}, {first: "web-1", second: "web-2", third: "web-3"})
    assert decide(LATER, NOW, [check()], budget=group.view(first)).verdict is Verdict.RELEASE
    group = group.patching(first, "J")
    assert decide(LATER, NOW, [check()], budget=group.view(second)).verdict is Verdict.RELEASE
    group = group.patching(second, "J")
    held = decide(LATER, NOW, [check()], budget=group.view(third))
    assert held.waiting_for == ["budget"]
    assert held.budget is not None and held.budget.describe().endswith("web-1 (job J patching), web-2 (job J patching)")
    # A second job on a host in patch keeps the first job as the holder and takes no second unit.
    assert group.patching(first, "K").holders[first].patching_job == "J" and group.patching(first, "K").in_use == 2
    assert decide(LATER, NOW, [check()], budget=group.view(first)).verdict is Verdict.RELEASE


def test_window_closed_describes_the_checks_at_the_cutoff() -> None:
    policy = GroupPolicy(release_cutoff_seconds=60, stable_seconds=600)
    then = [check(age=10, healthy_for=30)]
    decision = window_closed(then, NOW + dt.timedelta(seconds=60), policy)
    assert decision.not_ready == [] and [item.name for item in decision.unstable] == ["web"]
    assert "not yet stable" in decision.failure_detail(NOW + dt.timedelta(seconds=60))
