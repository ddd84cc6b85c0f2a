"""Inline SVG for a check's recent results: a strip of squares, a latency chart with its scales, and the legend's
swatches. Server-rendered, no script: each page states its figures in its HTML (and in words for screen readers)."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from services.api.dashboard.wording import reason_phrase

SQUARE = 12
GAP = 2
# The latency chart: its size and the margins that hold the scales' labels (SVG user units, i.e. CSS pixels at
# full size; the chart scales down with its viewBox on narrow screens).
CHART_WIDTH = 440
CHART_HEIGHT = 150
MARGIN_LEFT = 70  # room for "1,000 ms" and the axis title beside it
MARGIN_RIGHT = 12
MARGIN_TOP = 10
MARGIN_BOTTOM = 34  # the time labels, then the axis caption
MAX_TICKS = 5
# Steps a time scale may take, in seconds: round to a reader (every 15 min, every 6 h), from 1 s to a week.
TIME_STEPS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
    2 * 86400, 7 * 86400,
)  # fmt: skip
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Point:
    healthy: bool
    reason: str
    detail: str
    latency_ms: float
    checked_at: dt.datetime


# ---- the squares ----------------------------------------------------------------------------------------------------


def _cross(x: float, y: float, size: float) -> str:
    """A white cross over an unhealthy square: the outcome is told by shape too, not by colour alone (WCAG 1.4.1)."""
    a, b = size * 0.27, size * 0.73
    return (
        f'<path class="mark" d="M{x + a:g} {y + a:g}L{x + b:g} {y + b:g}M{x + b:g} {y + a:g}L{x + a:g} {y + b:g}" '
        'pointer-events="none"/>'
    )


def history_strip(results: Sequence[Point]) -> str:
    """Oldest left, newest right; a healthy result a green square, an unhealthy one a red square with a white cross;
    each square's <title> shows when, outcome, latency and detail on hover or focus."""
    if not results:
        return '<p class="muted">No results yet.</p>'
    ordered = sorted(results, key=lambda point: point.checked_at)
    width = len(ordered) * (SQUARE + GAP)
    squares = []
    for index, point in enumerate(ordered):
        outcome = "healthy" if point.healthy else f"unhealthy ({reason_phrase(point.reason)})"
        title = f"{point.checked_at:%Y-%m-%d %H:%M:%S} UTC: {outcome}, {point.latency_ms:.0f} ms. {point.detail}"
        css = "ok" if point.healthy else "bad"
        x = index * (SQUARE + GAP)
        squares.append(
            f'<rect class="{css}" x="{x}" y="0" width="{SQUARE}" height="{SQUARE}" rx="2" '
            f'tabindex="0"><title>{escape(title)}</title></rect>'
        )
        if not point.healthy:
            squares.append(_cross(x, 0, SQUARE))
    healthy = sum(point.healthy for point in ordered)
    label = f"Last {len(ordered)} results: {healthy} healthy, {len(ordered) - healthy} unhealthy"
    return (
        f'<svg class="history" role="img" aria-label="{escape(label)}" width="{width}" height="{SQUARE}" '
        f'viewBox="0 0 {width} {SQUARE}">{"".join(squares)}</svg>'
    )


def legend_swatch(kind: str) -> str:
    """The legend's picture of a result square (`ok`, `bad`), of the latency line (`line`) or of an unhealthy
    result's dot on it (`dot`): the same shapes and classes as the charts draw."""
    size = SQUARE
    if kind in ("ok", "bad"):
        inner = f'<rect class="{kind}" x="0" y="0" width="{size}" height="{size}" rx="2"/>'
        inner += _cross(0, 0, size) if kind == "bad" else ""
        return f'<svg class="swatch swatch-squares" aria-hidden="true" width="{size}" height="{size}">{inner}</svg>'
    if kind == "line":
        inner = '<polyline class="line" points="0,9 6,4 12,7 18,3"/>'
    else:
        inner = '<circle class="bad" cx="6" cy="6" r="3"/>'
    width = 18 if kind == "line" else size
    return f'<svg class="swatch swatch-latency" aria-hidden="true" width="{width}" height="{size}">{inner}</svg>'


# ---- the latency chart ----------------------------------------------------------------------------------------------


def nice_step(span: float, max_ticks: int = MAX_TICKS) -> float:
    """The smallest step of 1, 2 or 5 times a power of ten that cuts `span` (> 0) into at most `max_ticks - 1`
    intervals: 0-230 ms → 50 ms (0, 50, …, 250)."""
    rough = span / (max_ticks - 1)
    power = 10.0 ** math.floor(math.log10(rough))
    for factor in (1, 2, 5, 10):
        if factor * power >= rough * (1 - 1e-9):
            return factor * power
    return 10 * power  # not reached: 10 * power >= rough always


def latency_ticks(top_ms: float) -> list[float]:
    """The millisecond scale for latencies up to `top_ms`: from 0 to the first nice step at or above it."""
    top = top_ms if top_ms > 0 else 1.0
    step = nice_step(top)
    count = math.ceil(top / step - 1e-9)
    return [round(index * step, 10) for index in range(count + 1)]


def ms_label(value: float, step: float) -> str:
    """A millisecond tick: `0 ms`, `250 ms`, `1,000 ms`, `0.5 ms` (as many decimals as the step needs)."""
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f} ms"


def time_ticks(start: dt.datetime, end: dt.datetime) -> tuple[list[dt.datetime], int]:
    """The time scale from `start` to `end` (UTC): ticks at round multiples of the first step of TIME_STEPS that
    leaves at most MAX_TICKS of them in the span (always one or more), and that step in seconds."""
    span = max((end - start).total_seconds(), 1.0)
    step = next((step for step in TIME_STEPS if span / step <= MAX_TICKS - 1), TIME_STEPS[-1])
    first = math.ceil((start - EPOCH).total_seconds() / step) * step
    ticks = []
    moment = first
    while moment <= (end - EPOCH).total_seconds():
        ticks.append(EPOCH + dt.timedelta(seconds=moment))
        moment += step
    return ticks or [start], step


def time_label(moment: dt.datetime, step: int) -> str:
    """A time tick in UTC: seconds shown for steps under a minute, the date instead of the time for steps of days."""
    if step >= 86400:
        return f"{moment:%m-%d}"
    return f"{moment:%H:%M:%S}" if step < 60 else f"{moment:%H:%M}"


def latency_chart(results: Sequence[Point]) -> str:
    """A line of the results' latencies over time, with its scales: milliseconds up the left (from 0, ticks with
    units), UTC time along the bottom (round ticks, and a caption naming the dates), each unhealthy result a red
    dot on the line (its <title> says when and why). Empty under two results. Each result is placed at its time,
    so a gap in the results shows as one."""
    if len(results) < 2:
        return ""
    ordered = sorted(results, key=lambda point: point.checked_at)
    latencies = [point.latency_ms for point in ordered]
    start, end = ordered[0].checked_at.astimezone(dt.UTC), ordered[-1].checked_at.astimezone(dt.UTC)
    if end <= start:  # every result at one moment: a minute around it
        start, end = start - dt.timedelta(seconds=30), end + dt.timedelta(seconds=30)
    y_ticks = latency_ticks(max(latencies))
    y_top = y_ticks[-1]
    y_step = y_ticks[1] - y_ticks[0]
    x_ticks, x_step = time_ticks(start, end)
    plot_width = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    span = (end - start).total_seconds()
    bottom = MARGIN_TOP + plot_height

    def x_of(moment: dt.datetime) -> float:
        return MARGIN_LEFT + (moment - start).total_seconds() / span * plot_width

    def y_of(value: float) -> float:
        return bottom - value / y_top * plot_height

    parts = [f'<rect class="plot" x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_width}" height="{plot_height}"/>']
    for value in y_ticks:
        y = y_of(value)
        parts.append(
            f'<line class="grid" x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{MARGIN_LEFT + plot_width}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick y-tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(ms_label(value, y_step))}</text>"
        )
    for moment in x_ticks:
        x = x_of(moment)
        parts.append(f'<line class="tick-mark" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}"/>')
        parts.append(
            f'<text class="tick x-tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" '
            f'data-at="{moment.isoformat()}">{time_label(moment, x_step)}</text>'
        )
    days = f"{start:%Y-%m-%d}" if start.date() == end.date() else f"{start:%Y-%m-%d} to {end:%Y-%m-%d}"
    caption = f"time (UTC, {days})"
    parts.append(
        f'<text class="axis-title x-title" x="{MARGIN_LEFT + plot_width / 2:.1f}" y="{CHART_HEIGHT - 3}" '
        f'text-anchor="middle">{caption}</text>'
    )
    parts.append(
        f'<text class="axis-title y-title" x="12" y="{MARGIN_TOP + plot_height / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {MARGIN_TOP + plot_height / 2:.1f})">latency (ms)</text>'
    )
    points = " ".join(f"{x_of(point.checked_at):.1f},{y_of(point.latency_ms):.1f}" for point in ordered)
    parts.append(f'<polyline class="line" points="{points}"/>')
    for point in ordered:
        if not point.healthy:
            title = (
                f"{point.checked_at:%Y-%m-%d %H:%M:%S} UTC: unhealthy ({reason_phrase(point.reason)}), "
                f"{point.latency_ms:.0f} ms"
            )
            parts.append(
                f'<circle class="bad" cx="{x_of(point.checked_at):.1f}" cy="{y_of(point.latency_ms):.1f}" r="3">'
                f"<title>{escape(title)}</title></circle>"
            )
    label = (
        f"Latency of the last {len(latencies)} results, {start:%H:%M} to {end:%H:%M} UTC: "
        f"{min(latencies):.0f} to {max(latencies):.0f} ms, last {latencies[-1]:.0f} ms"
    )
    return (
        f'<svg class="latency" role="img" aria-label="{escape(label)}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" data-y-top="{y_top:g}"><title>{escape(label)}</title>'
        f"{''.join(parts)}</svg>"
    )
