"""shared/gating.py: when a gating check counts as ready (healthy by a result no older than its interval), and
how a check that is not ready is described."""

from __future__ import annotations

import datetime as dt
import uuid

from hypothesis import given
from hypothesis import strategies as st

from shared.events import CheckSummary
from shared.gating import GatingCheck

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def gating(status: str = "healthy", checked_at: dt.datetime | None = NOW, *, interval: int = 60) -> GatingCheck:
    healthy = None if checked_at is None else status == "healthy"
    return GatingCheck(uuid.uuid4(), "web", status, interval, healthy, "detail", checked_at)


def test_ready_is_healthy_by_a_result_no_older_than_the_interval() -> None:
    assert gating(checked_at=NOW).ready(NOW)
    assert gating(checked_at=NOW - dt.timedelta(seconds=60)).ready(NOW)  # exactly one interval old
    assert not gating(checked_at=NOW - dt.timedelta(seconds=60, microseconds=1)).ready(NOW)


def test_a_check_without_a_result_or_not_healthy_is_never_ready() -> None:
    assert not gating(checked_at=None).ready(NOW)
    assert not gating("unknown", checked_at=None).ready(NOW)
    assert not gating("unhealthy").ready(NOW)
    assert not gating("unknown").ready(NOW)


def test_a_result_stamped_after_now_counts_as_fresh() -> None:
    """The poller's clock may run ahead of the gate's: a result from "the future" is not stale."""
    assert gating(checked_at=NOW + dt.timedelta(seconds=5)).ready(NOW)


def test_why_not_ready_gives_the_detail_the_status_or_the_age() -> None:
    unhealthy = GatingCheck(uuid.uuid4(), "db", "unhealthy", 60, False, "connection refused", NOW)
    assert unhealthy.why_not_ready(NOW) == "connection refused"
    assert GatingCheck(uuid.uuid4(), "db", "unhealthy", 60, False, None, NOW).why_not_ready(NOW) == "unhealthy"
    assert GatingCheck(uuid.uuid4(), "db", "unhealthy", 60, False, "", NOW).why_not_ready(NOW) == "unhealthy"
    stale = gating(checked_at=NOW - dt.timedelta(seconds=90.4))
    assert stale.why_not_ready(NOW) == "last result is 90 s old, older than its 60 s interval"
    assert gating(checked_at=None).why_not_ready(NOW) == "no result yet"
    assert gating(checked_at=None).why_not_ready(NOW, no_result="none before the window closed") == (
        "none before the window closed"
    )


def test_the_summary_carries_the_last_result() -> None:
    check = GatingCheck(uuid.uuid4(), "db", "unhealthy", 60, False, "refused", NOW)
    assert check.summary() == CheckSummary(
        check_id=check.check_id, name="db", healthy=False, detail="refused", checked_at=NOW
    )
    never = gating(checked_at=None)
    assert never.summary() == CheckSummary(
        check_id=never.check_id, name="web", healthy=None, detail="detail", checked_at=None
    )


@given(
    st.sampled_from(["healthy", "unhealthy", "unknown"]),
    st.one_of(st.none(), st.integers(min_value=-86_400_000_000, max_value=86_400_000_000)),
    st.integers(min_value=10, max_value=86_400),
)
def test_a_check_is_ready_exactly_when_it_has_no_reason_not_to_be(
    status: str, age_microseconds: int | None, interval: int
) -> None:
    checked_at = None if age_microseconds is None else NOW - dt.timedelta(microseconds=age_microseconds)
    check = gating(status, checked_at, interval=interval)
    fresh = age_microseconds is not None and age_microseconds <= interval * 1_000_000
    assert check.ready(NOW) is (status == "healthy" and fresh)
    if not check.ready(NOW):
        assert check.why_not_ready(NOW)  # always says why, in words
