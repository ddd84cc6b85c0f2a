"""Inline SVG for a check's recent results: a strip of squares and a latency sparkline."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from services.api.dashboard.wording import reason_phrase

SQUARE = 12
GAP = 2
SPARK_WIDTH = 180
SPARK_HEIGHT = 28


@dataclass(frozen=True)
class Point:
    healthy: bool
    reason: str
    detail: str
    latency_ms: float
    checked_at: dt.datetime


def history_strip(results: Sequence[Point]) -> str:
    """Oldest left, newest right; each square's <title> shows when, outcome and detail on hover."""
    if not results:
        return '<p class="muted">No results yet.</p>'
    ordered = sorted(results, key=lambda point: point.checked_at)
    width = len(ordered) * (SQUARE + GAP)
    squares = []
    for index, point in enumerate(ordered):
        outcome = "healthy" if point.healthy else f"unhealthy ({reason_phrase(point.reason)})"
        title = f"{point.checked_at:%Y-%m-%d %H:%M:%S} UTC: {outcome}, {point.latency_ms:.0f} ms. {point.detail}"
        css = "ok" if point.healthy else "bad"
        squares.append(
            f'<rect class="{css}" x="{index * (SQUARE + GAP)}" y="0" width="{SQUARE}" height="{SQUARE}" rx="2" '
            f'tabindex="0"><title>{escape(title)}</title></rect>'
        )
    healthy = sum(point.healthy for point in ordered)
    label = f"Last {len(ordered)} results: {healthy} healthy, {len(ordered) - healthy} unhealthy"
    return (
        f'<svg class="history" role="img" aria-label="{escape(label)}" width="{width}" height="{SQUARE}" '
        f'viewBox="0 0 {width} {SQUARE}">{"".join(squares)}</svg>'
    )


def latency_sparkline(results: Sequence[Point]) -> str:
    if len(results) < 2:
        return ""
    ordered = sorted(results, key=lambda point: point.checked_at)
    latencies = [point.latency_ms for point in ordered]
    top = max(latencies) or 1.0
    step = SPARK_WIDTH / (len(latencies) - 1)
    points = " ".join(
        f"{index * step:.1f},{SPARK_HEIGHT - 2 - (value / top) * (SPARK_HEIGHT - 4):.1f}"
        for index, value in enumerate(latencies)
    )
    label = (
        f"Latency of the last {len(latencies)} results: {min(latencies):.0f} to {top:.0f} ms, "
        f"last {latencies[-1]:.0f} ms"
    )
    return (
        f'<svg class="sparkline" role="img" aria-label="{escape(label)}" width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" '
        f'viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}"><title>{escape(label)}</title>'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>'
    )
