"""shared/gate_rules.py: the gate's verdict for a waiting job host (CONTRACT §5 and §6), a pure function of the
window's end, the time, the host's gating checks, its group's policy, its job's halt and the group's disruption
budget; and the budget's arithmetic."""

from __future__ import annotations

import datetime as dt
import uuid
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.gate_rules import (
    NO_RESULT_BEFORE_CLOSE,
    BudgetView,
    Decision,
    GroupBudget,
    Holder,
    Verdict,
    closes_at,
    decide,
    holds_until,
    stable,
    window_closed,
)
from shared.gating import GatingCheck
from shared.group_policies import GroupPolicy

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(hours=1)
INTERVAL = 60


def check(
    name: str = "web",
    *,
    status: str = "healthy",
    age: float | None = 1.0,
    detail: str | None = "ok",
    interval: int = INTERVAL,
    at: dt.datetime = NOW,
    healthy_for: float | None = 3600,
) -> GatingCheck:
    """A gating check whose last result is `age` seconds before `at` (None: no result yet), healthy for
    `healthy_for` seconds when healthy (None: since an unknown time)."""
    checked_at = None if age is None else at - dt.timedelta(seconds=age)
    healthy = None if age is None else status == "healthy"
    since = at - dt.timedelta(seconds=healthy_for) if status == "healthy" and healthy_for is not None else None
    return GatingCheck(uuid.uuid4(), name, status, interval, healthy, detail, checked_at, since)


# ---- the rules in their order ------------------------------------------------------------------------


def test_every_gating_check_ready_releases() -> None:
    checks = [check("web"), check("db")]
    decision = decide(LATER, NOW, checks)
    assert decision == Decision(Verdict.RELEASE, checks, [])


def test_a_host_without_gating_checks_is_released_under_either_unknown_host_policy() -> None:
    for policy in ("release", "fail"):
        assert decide(LATER, NOW, [], unknown_host=policy) == Decision(Verdict.RELEASE, [], [])  # type: ignore[arg-type]


def test_any_check_not_ready_waits_and_names_only_those() -> None:
    ready = check("web")
    unhealthy = check("db", status="unhealthy", detail="connection refused")
    stale = check("cache", age=INTERVAL + 1)
    never_run = check("queue", age=None, status="unknown")
    decision = decide(LATER, NOW, [ready, unhealthy, stale, never_run])
    assert decision.verdict is Verdict.WAIT
    assert decision.checks == [ready, unhealthy, stale, never_run]
    assert decision.not_ready == [unhealthy, stale, never_run]


def test_an_unknown_host_is_released_by_default_and_failed_when_configured() -> None:
    assert decide(LATER, NOW, None) == Decision(Verdict.RELEASE, [], [])
    assert decide(LATER, NOW, None, unknown_host="release") == Decision(Verdict.RELEASE, [], [])
    assert decide(LATER, NOW, None, unknown_host="fail") == Decision(Verdict.UNKNOWN_HOST, [], [])


@pytest.mark.parametrize("window_ends_at", [NOW, NOW - dt.timedelta(microseconds=1), NOW - dt.timedelta(days=400)])
def test_a_closed_window_fails_first_whatever_the_checks(window_ends_at: dt.datetime) -> None:
    """A window ending exactly now is closed; that rule comes before every other one."""
    healthy = [check("web")]
    assert decide(window_ends_at, NOW, healthy).verdict is Verdict.WINDOW_CLOSED
    assert decide(window_ends_at, NOW, None, unknown_host="fail").verdict is Verdict.WINDOW_CLOSED
    assert decide(window_ends_at, NOW, None).verdict is Verdict.WINDOW_CLOSED
    failing = check("db", status="unhealthy")
    decision = decide(window_ends_at, NOW, [healthy[0], failing])
    assert (decision.checks, decision.not_ready) == ([healthy[0], failing], [failing])


def test_a_window_ending_a_microsecond_from_now_is_still_open() -> None:
    assert decide(NOW + dt.timedelta(microseconds=1), NOW, [check()]).verdict is Verdict.RELEASE


def test_windows_in_other_offsets_compare_as_instants() -> None:
    """An aware time in another offset is the same instant: 14:00+02:00 is 12:00Z, closed at 12:00Z."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert decide(dt.datetime(2030, 6, 1, 14, 0, tzinfo=plus_two), NOW, []).verdict is Verdict.WINDOW_CLOSED
    assert decide(dt.datetime(2030, 6, 1, 14, 1, tzinfo=plus_two), NOW, []).verdict is Verdict.RELEASE


def test_the_extremes_of_time_are_decided_without_error() -> None:
    earliest = dt.datetime.min.replace(tzinfo=dt.UTC)
    latest = dt.datetime.max.replace(tzinfo=dt.UTC)
    assert decide(earliest, NOW, [check()]).verdict is Verdict.WINDOW_CLOSED
    assert decide(latest, NOW, [check()]).verdict is Verdict.RELEASE


# ---- a window_closed failure's detail -------------------------------------------------------------------


def test_the_detail_of_a_window_that_closed_with_every_check_ready() -> None:
    decision = decide(NOW, NOW, [check()])
    assert decision.failure_detail(NOW) == "the maintenance window had closed"


def test_a_job_start_received_after_its_window_is_told_so_whatever_its_checks() -> None:
    late = NOW + dt.timedelta(minutes=3)
    said = (
        f"the job.start arrived (at {late.isoformat()}) after its maintenance window had ended (at {NOW.isoformat()})"
    )
    assert decide(NOW, NOW, [check()]).failure_detail(NOW, received_at=late) == said
    unready = decide(NOW, NOW, [check(status="unhealthy", detail="refused")]).failure_detail(NOW, received_at=late)
    assert unready == f"{said}; checks not healthy when it closed: web: refused"
    # A release cutoff may have been set after the job.start arrived: judged on the cutoff as before.
    cutoff = window_closed([check()], NOW, GroupPolicy(release_cutoff_seconds=60))
    assert cutoff.failure_detail(NOW, received_at=NOW - dt.timedelta(seconds=30)).startswith("the release cutoff")
    # Received before the close: the checks as they were then.
    assert "not healthy" in decide(NOW, NOW, [check(status="unhealthy")]).failure_detail(
        NOW, received_at=NOW - dt.timedelta(seconds=1)
    )


def test_the_detail_of_a_window_that_closed_while_the_budget_was_full_names_the_budget() -> None:
    full = BudgetView("web", 1, (Holder(uuid.uuid4(), "web-1", "J", False),))
    expected = "disruption budget of group web: 1 of 1 unavailable: web-1 (job J patching)"
    closed = decide(NOW, NOW, [check()], budget=full)
    assert closed.failure_detail(NOW) == f"the maintenance window closed while the host waited for the {expected}"
    cutoff = GroupPolicy(release_cutoff_seconds=60)
    assert window_closed([check()], NOW, cutoff, full).failure_detail(NOW).endswith(f"waited for the {expected}")
    # Room in the budget, or checks not ready (the budget is not what it waited for): not named.
    room = BudgetView("web", 2, full.holders)
    assert decide(NOW, NOW, [check()], budget=room).failure_detail(NOW) == "the maintenance window had closed"
    unready = decide(NOW, NOW, [check(status="unhealthy")], budget=full).failure_detail(NOW)
    assert "budget" not in unready and "not healthy" in unready


def test_the_detail_names_each_check_not_ready_and_why() -> None:
    unhealthy = check("db", status="unhealthy", detail="connection refused by 10.0.0.5:5432")
    unhealthy_without_detail = check("dns", status="unhealthy", detail=None)
    stale = check("cache", age=125)
    never_run = check("queue", age=None, status="unknown", detail=None)
    decision = decide(NOW, NOW, [check("web"), unhealthy, unhealthy_without_detail, stale, never_run])
    assert decision.failure_detail(NOW) == (
        "the maintenance window closed while checks were not healthy: "
        "db: connection refused by 10.0.0.5:5432; "
        "dns: unhealthy; "
        "cache: last result is 125 s old, older than its 60 s interval; "
        f"queue: {NO_RESULT_BEFORE_CLOSE}"
    )


def test_window_closed_judges_the_checks_as_they_stood_when_it_closed() -> None:
    """A result ready at the window's end, stale by now, is not named; one that was stale then is."""
    closed_at = NOW - dt.timedelta(minutes=10)
    fresh_then = check("web", age=5, at=closed_at)
    stale_then = check("db", age=INTERVAL + 5, at=closed_at)
    decision = window_closed([fresh_then, stale_then], closed_at)
    assert decision == Decision(Verdict.WINDOW_CLOSED, [fresh_then, stale_then], [stale_then])
    assert decision.failure_detail(closed_at) == (
        "the maintenance window closed while checks were not healthy: "
        "db: last result is 65 s old, older than its 60 s interval"
    )
    assert window_closed([], closed_at) == Decision(Verdict.WINDOW_CLOSED, [], [])


# ---- properties ----------------------------------------------------------------------------------------

ages = st.one_of(st.none(), st.floats(min_value=-3600, max_value=3 * INTERVAL, allow_nan=False))
statuses = st.sampled_from(["healthy", "unhealthy", "unknown"])
gating_check = st.builds(lambda status, age: check(status=status, age=age), statuses, ages)
check_lists = st.one_of(st.none(), st.lists(gating_check, max_size=8))
windows = st.floats(min_value=-10 * INTERVAL, max_value=10 * INTERVAL, allow_nan=False).map(
    lambda seconds: NOW + dt.timedelta(seconds=seconds)
)
policies = st.sampled_from(["release", "fail"])


@given(windows, check_lists, policies)
def test_the_verdict_follows_the_rules_in_order(
    window_ends_at: dt.datetime, checks: list[GatingCheck] | None, policy: str
) -> None:
    """With the default group policy (no cutoff, stability or budget) and a job not halted."""
    decision = decide(window_ends_at, NOW, checks, unknown_host=policy)  # type: ignore[arg-type]
    not_ready = [gating for gating in checks or [] if not gating.ready(NOW)]
    if window_ends_at <= NOW:
        assert (decision.verdict, decision.checks, decision.not_ready) == (
            Verdict.WINDOW_CLOSED,
            checks or [],
            not_ready,
        )
    elif checks is None:
        assert decision.verdict is (Verdict.UNKNOWN_HOST if policy == "fail" else Verdict.RELEASE)
        assert (decision.checks, decision.not_ready) == ([], [])
    elif not not_ready:
        assert (decision.verdict, decision.checks, decision.not_ready) == (Verdict.RELEASE, checks, [])
    else:
        assert (decision.verdict, decision.not_ready, decision.waiting_for) == (Verdict.WAIT, not_ready, ["checks"])
    assert decision.verdict is not Verdict.INVALID_REQUEST  # only for a job.start that did not validate


@given(windows, st.lists(gating_check, max_size=8), st.randoms(use_true_random=False))
def test_the_order_of_the_checks_does_not_change_the_verdict(
    window_ends_at: dt.datetime, checks: list[GatingCheck], rng: Random
) -> None:
    shuffled = list(checks)
    rng.shuffle(shuffled)
    before, after = decide(window_ends_at, NOW, checks), decide(window_ends_at, NOW, shuffled)
    assert before.verdict is after.verdict
    assert sorted(map(id, before.not_ready)) == sorted(map(id, after.not_ready))


@given(st.lists(gating_check, min_size=1, max_size=8), st.data())
def test_a_check_becoming_ready_never_holds_back_a_release(checks: list[GatingCheck], data: st.DataObject) -> None:
    """Monotonic: replacing any check by a ready one keeps a release a release, and an open window stays
    open (the only verdicts before a window's end are release and wait)."""
    index = data.draw(st.integers(min_value=0, max_value=len(checks) - 1))
    improved = [*checks[:index], check(checks[index].name), *checks[index + 1 :]]
    before, after = decide(LATER, NOW, checks), decide(LATER, NOW, improved)
    assert {before.verdict, after.verdict} <= {Verdict.RELEASE, Verdict.WAIT}
    if before.verdict is Verdict.RELEASE:
        assert after.verdict is Verdict.RELEASE
    assert len(after.not_ready) <= len(before.not_ready)


# ---- the group's policy, the job's halt and the budget (CONTRACT §6) ------------------------------------------


def test_a_release_cutoff_closes_the_window_early() -> None:
    policy = GroupPolicy(release_cutoff_seconds=600)
    assert closes_at(LATER, policy) == LATER - dt.timedelta(minutes=10)
    assert closes_at(LATER, GroupPolicy()) == LATER
    assert closes_at(dt.datetime.min.replace(tzinfo=dt.UTC), policy) == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert decide(NOW + dt.timedelta(minutes=10), NOW, [check()], policy=policy).verdict is Verdict.WINDOW_CLOSED
    assert decide(NOW + dt.timedelta(minutes=11), NOW, [check()], policy=policy).verdict is Verdict.RELEASE
    decision = decide(
        NOW + dt.timedelta(minutes=5), NOW, [check("db", status="unhealthy", detail="down")], policy=policy
    )
    assert decision.failure_detail(NOW + dt.timedelta(minutes=5)) == (
        "the release cutoff (600 s before the window's end, release_cutoff_seconds) passed while checks were not "
        "healthy: db: down"
    )


def test_a_halted_job_fails_after_the_window_rule_and_before_every_other() -> None:
    assert decide(LATER, NOW, [check()], halted=True).verdict is Verdict.JOB_HALTED
    assert decide(LATER, NOW, None, unknown_host="fail", halted=True).verdict is Verdict.JOB_HALTED
    assert decide(NOW, NOW, [check()], halted=True).verdict is Verdict.WINDOW_CLOSED


def test_no_checks_fail_applies_to_known_hosts_without_gating_checks_only() -> None:
    fail = GroupPolicy(no_checks="fail")
    assert decide(LATER, NOW, [], policy=fail).verdict is Verdict.NO_CHECKS
    assert decide(LATER, NOW, [check()], policy=fail).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, None, policy=fail).verdict is Verdict.RELEASE  # unknown: its own setting decides


def test_checks_must_be_healthy_for_stable_seconds() -> None:
    policy = GroupPolicy(stable_seconds=300)
    settled, fresh = check("web", healthy_for=300), check("db", healthy_for=299)
    unknown_age = check("cache", healthy_for=None)
    decision = decide(LATER, NOW, [settled, fresh, unknown_age], policy=policy)
    assert (decision.verdict, decision.waiting_for, decision.unstable) == (
        Verdict.WAIT, ["stability"], [fresh, unknown_age]
    )  # fmt: skip
    assert decision.waiting_detail(NOW) == (
        "waiting for stability: healthy for less than 300 s (stable_seconds): db (healthy for 299 s), "
        "cache (healthy since an unknown time)"
    )
    assert decision.stable_at() is None  # one of unknown age: no moment to wake at
    assert decide(LATER, NOW, [settled, fresh], policy=policy).stable_at() == NOW + dt.timedelta(seconds=1)
    assert decide(LATER, NOW, [settled], policy=policy).verdict is Verdict.RELEASE
    assert stable(unknown_age, NOW, 0) and not stable(unknown_age, NOW, 1)


def test_a_check_not_ready_is_waited_on_as_a_check_not_for_stability() -> None:
    policy = GroupPolicy(stable_seconds=300)
    failing = check("db", status="unhealthy")
    decision = decide(LATER, NOW, [failing, check("web", healthy_for=10)], policy=policy)
    assert decision.waiting_for == ["checks", "stability"]
    assert failing not in decision.unstable


def holder(name: str, *, job: str | None = None, unhealthy: bool = False) -> Holder:
    return Holder(uuid.uuid4(), name, job, unhealthy)


def test_the_budget_counts_each_unavailable_host_once_and_the_host_itself_once() -> None:
    web1, web3 = holder("web-1", job="J"), holder("web-3", unhealthy=True)
    full = BudgetView("web", 2, (web1, web3))
    assert (full.in_use, full.fits()) == (2, False)
    assert (
        full.describe()
        == "disruption budget of group web: 2 of 2 unavailable: web-1 (job J patching), web-3 (unhealthy)"
    )
    assert BudgetView("web", 2, (web1, web3), counted=True).fits()  # a second job on a host already counted
    assert BudgetView("web", 3, (web1, web3)).fits()
    assert BudgetView("web", 1, ()).describe() == "disruption budget of group web: 0 of 1 unavailable"
    assert holder("db", job="K", unhealthy=True).why() == "job K patching, unhealthy"


def test_the_budget_is_waited_for_only_once_checks_and_stability_are_met() -> None:
    full = BudgetView("web", 1, (holder("web-1", job="J"),))
    waiting = decide(LATER, NOW, [check()], budget=full)
    assert (waiting.verdict, waiting.waiting_for) == (Verdict.WAIT, ["budget"])
    assert waiting.waiting_detail(NOW) == (
        "waiting for the disruption budget of group web: 1 of 1 unavailable: web-1 (job J patching)"
    )
    not_ready = decide(LATER, NOW, [check(status="unhealthy")], budget=full)
    assert not_ready.waiting_for == ["checks"]  # whether it would fit depends on who gets ready first
    assert decide(LATER, NOW, [check()], budget=BudgetView("web", 2, full.holders)).verdict is Verdict.RELEASE
    assert decide(LATER, NOW, None, budget=full).verdict is Verdict.RELEASE  # an unknown host has no budget


def test_a_release_in_a_pass_takes_its_hosts_unit_for_the_rows_after_it() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    budget = GroupBudget("web", 1, {}, {first: "web-1", second: "web-2"})
    assert budget.view(first).fits()
    after = budget.patching(first, "J")
    assert after.in_use == 1 and after.holders[first] == Holder(first, "web-1", "J")
    assert not after.view(second).fits() and after.view(first).fits()  # the same host again: counted once
    again = after.patching(first, "K")
    assert again.holders[first].patching_job == "J"  # a host keeps the first job that holds it


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=12), st.integers(min_value=1, max_value=6))
def test_a_pass_never_takes_more_than_the_budget(rows: list[tuple[bool, bool]], limit: int) -> None:
    """Releasing ready hosts in arrival order while each fits keeps the group within its limit, whatever the
    unavailable hosts it started with (each row: ready or not, and whether its host is already unavailable)."""
    hosts = [uuid.uuid4() for _ in rows]
    holders = {
        host: Holder(host, f"h{index}", unhealthy=True)
        for index, (host, (_, held)) in enumerate(zip(hosts, rows, strict=True))
        if held
    }
    budget = GroupBudget("g", limit, holders)
    started = budget.in_use
    for host, (ready, _) in zip(hosts, rows, strict=True):
        decision = decide(LATER, NOW, [check() if ready else check(status="unhealthy")], budget=budget.view(host))
        if decision.verdict is Verdict.RELEASE:
            budget = budget.patching(host, "J")
    assert budget.in_use <= max(limit, started)


# ---- holds_until: how long a verdict stands with time alone ------------------------------------------------


@st.composite
def judged(draw: st.DrawFn) -> tuple[dt.datetime | None, list[GatingCheck] | None, GroupPolicy, bool]:
    """A waiting job host at NOW: its window's end (None: none), gating checks (None: unknown host), its group's
    policy and whether its job is halted."""
    window = draw(st.none() | st.floats(-120, 7200).map(lambda s: NOW + dt.timedelta(seconds=s)))
    one = st.builds(
        check,
        name=st.sampled_from(["web", "db", "cache"]),
        status=st.sampled_from(["healthy", "unhealthy", "unknown"]),
        age=st.none() | st.floats(0, 3 * INTERVAL),
        interval=st.sampled_from([10, INTERVAL, 600]),
        healthy_for=st.none() | st.floats(0, 7200),
    )
    checks = draw(st.none() | st.lists(one, max_size=3, unique_by=lambda c: c.name))
    policy = GroupPolicy(
        stable_seconds=draw(st.sampled_from([0, 30, 3600])),
        release_cutoff_seconds=draw(st.sampled_from([0, 60, 600])),
        no_checks=draw(st.sampled_from(["release", "fail"])),
    )
    return window, checks, policy, draw(st.booleans())


@given(judged(), st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8))
def test_a_verdict_holds_until_holds_until(
    case: tuple[dt.datetime | None, list[GatingCheck] | None, GroupPolicy, bool], fractions: list[float]
) -> None:
    """The gate's fast release writes a verdict judged at NOW at a later moment before `holds_until`: at any such
    moment, the rules give the same verdict (shared/jobs.py `decide_fast`)."""
    window, checks, policy, halted = case
    decision = decide(window, NOW, checks, policy=policy, halted=halted, unknown_host="release")
    if decision.verdict is Verdict.WAIT:
        with pytest.raises(ValueError):
            holds_until(decision, window)
        return
    until = holds_until(decision, window)
    assert until > NOW or decision.verdict is not Verdict.RELEASE
    span = min(until - NOW, dt.timedelta(days=3))
    for fraction in fractions:
        later = NOW + span * fraction
        if later >= until:
            continue
        again = decide(window, later, checks, policy=policy, halted=halted, unknown_host="release")
        assert again.verdict is decision.verdict, (later, until)


def test_a_release_holds_until_the_first_result_grows_stale_or_the_window_closes() -> None:
    fresh, older = check("web", age=1), check("db", age=50)
    decision = decide(LATER, NOW, [fresh, older])
    assert holds_until(decision, LATER) == NOW + dt.timedelta(seconds=INTERVAL - 50)
    assert holds_until(decide(None, NOW, [fresh]), None) == NOW + dt.timedelta(seconds=INTERVAL - 1)
    closed = decide(NOW, NOW, [fresh])
    assert closed.verdict is Verdict.WINDOW_CLOSED
    assert holds_until(closed, NOW) == dt.datetime.max.replace(tzinfo=dt.UTC)
