"""The latency chart's scales (services/api/dashboard/charts.py): round steps with units, from 0 ms, and UTC ticks."""

from __future__ import annotations

import datetime as dt

import pytest

from services.api.dashboard.charts import Point, latency_chart, latency_ticks, ms_label, time_label, time_ticks


@pytest.mark.parametrize(
    ("top", "ticks"),
    [
        (240, [0, 100, 200, 300]),
        (100, [0, 50, 100]),
        (1.3, [0, 0.5, 1, 1.5]),
        (4000, [0, 1000, 2000, 3000, 4000]),
        (0, [0, 0.5, 1]),
    ],
)
def test_millisecond_scale_starts_at_zero_and_covers_the_highest_in_round_steps(top: float, ticks: list[float]) -> None:
    assert latency_ticks(top) == ticks


def test_millisecond_labels_carry_the_unit_and_the_step_s_decimals() -> None:
    assert [ms_label(value, 0.5) for value in (0, 0.5, 1.5)] == ["0.0 ms", "0.5 ms", "1.5 ms"]
    assert ms_label(2000, 1000) == "2,000 ms"


def test_time_ticks_are_round_utc_moments_within_the_span() -> None:
    start = dt.datetime(2026, 6, 11, 10, 3, 20, tzinfo=dt.UTC)
    ticks, step = time_ticks(start, start + dt.timedelta(minutes=37))
    assert step == 600
    assert [time_label(tick, step) for tick in ticks] == ["10:10", "10:20", "10:30", "10:40"]
    ticks, step = time_ticks(start, start + dt.timedelta(seconds=50))
    assert step == 15 and time_label(ticks[0], step) == "10:03:30"
    ticks, step = time_ticks(start, start + dt.timedelta(days=3))
    assert step == 86400 and [time_label(tick, step) for tick in ticks] == ["06-12", "06-13", "06-14"]


def test_chart_places_results_by_time_and_names_its_axes() -> None:
    start = dt.datetime(2026, 6, 11, 23, 50, tzinfo=dt.UTC)
    points = [
        Point(index != 2, "ok" if index != 2 else "timeout", "", 10.0 * index, start + dt.timedelta(minutes=5 * index))
        for index in range(5)
    ]
    svg = latency_chart(points)
    assert ">latency (ms)</text>" in svg
    assert ">time (UTC, 2026-06-11 to 2026-06-12)</text>" in svg
    assert svg.count('class="bad"') == 1  # the unhealthy result's dot
    assert ">0 ms<" in svg and ">40 ms<" in svg
    assert latency_chart(points[:1]) == ""
