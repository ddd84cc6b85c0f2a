"""shared/check_state.py `advance`: a check's status and streaks after one more result (CONTRACT §3: the first
result sets the status; later flips need `failures_before_unhealthy` / `successes_before_healthy` in a row)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.check_state import Streak, advance

NEW = Streak("unknown", 0, 0)


def run(results: list[bool], *, failures: int = 1, successes: int = 1, start: Streak = NEW) -> list[Streak]:
    """The streak after each of `results`, in turn."""
    streaks = []
    streak = start
    for healthy in results:
        streak = advance(streak, healthy, failures_needed=failures, successes_needed=successes)
        streaks.append(streak)
    return streaks


def test_the_first_result_sets_the_status_whatever_the_thresholds() -> None:
    assert advance(NEW, True, failures_needed=5, successes_needed=5) == Streak("healthy", 0, 1)
    assert advance(NEW, False, failures_needed=5, successes_needed=5) == Streak("unhealthy", 1, 0)


def test_a_healthy_check_turns_unhealthy_on_the_nth_failure_in_a_row() -> None:
    statuses = [streak.status for streak in run([True, False, False, False], failures=3)]
    assert statuses == ["healthy", "healthy", "healthy", "unhealthy"]


def test_a_success_between_failures_starts_the_count_again() -> None:
    streaks = run([True, False, False, True, False, False], failures=3)
    assert [streak.status for streak in streaks] == ["healthy"] * 6
    assert streaks[-1] == Streak("healthy", 2, 0)


def test_an_unhealthy_check_turns_healthy_on_the_nth_success_in_a_row() -> None:
    streaks = run([False, True, False, True, True], successes=2)
    assert [streak.status for streak in streaks] == ["unhealthy", "unhealthy", "unhealthy", "unhealthy", "healthy"]
    assert streaks[-1] == Streak("healthy", 0, 2)


def test_thresholds_of_one_follow_every_result() -> None:
    results = [True, False, True, True, False, False, True]
    assert [streak.status for streak in run(results)] == ["healthy" if ok else "unhealthy" for ok in results]


def test_a_threshold_lowered_while_a_streak_runs_applies_at_the_next_result() -> None:
    """A check edited from 5 to 2 failures with 3 already counted flips on its next failure."""
    three_failures = Streak("healthy", 3, 0)
    assert advance(three_failures, False, failures_needed=2, successes_needed=1) == Streak("unhealthy", 4, 0)
    assert advance(three_failures, True, failures_needed=2, successes_needed=1) == Streak("healthy", 0, 1)


def trailing(results: list[bool], value: bool) -> int:
    count = 0
    for result in reversed(results):
        if result is not value:
            break
        count += 1
    return count


thresholds = st.integers(min_value=1, max_value=10)


@given(st.lists(st.booleans(), min_size=1, max_size=60), thresholds, thresholds)
def test_streaks_count_the_trailing_run_and_flips_need_a_full_run(
    results: list[bool], failures: int, successes: int
) -> None:
    streaks = run(results, failures=failures, successes=successes)
    for index, streak in enumerate(streaks):
        seen = results[: index + 1]
        assert (streak.failures, streak.successes) == (trailing(seen, False), trailing(seen, True))
        assert streak.status in ("healthy", "unhealthy")  # never unknown once a result is in
        if index == 0:
            continue
        previous = streaks[index - 1].status
        if streak.status != previous:  # a flip: the threshold was reached just now, by a run of that result
            needed = successes if streak.status == "healthy" else failures
            assert max(streak.failures, streak.successes) == needed
        if trailing(seen, False) >= failures:
            assert streak.status == "unhealthy"
        if trailing(seen, True) >= successes:
            assert streak.status == "healthy"
