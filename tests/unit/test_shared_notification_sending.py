"""Slack's one line per event and the bodies of notifications (pure functions of shared/notification_sending.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.notification_sending import EventContext, make_test_event, notification_body, slack_text

WEB_1 = EventContext("web-1", "web", (("homepage", "status 503"), ("api", "timed out after 10 s")))


@pytest.mark.parametrize(
    ("routing_key", "data", "context", "line"),
    [
        ("host.status_changed", {"current": "unhealthy", "in_maintenance": False}, WEB_1,
         "web-1 (group web) is unhealthy: homepage: status 503; api: timed out after 10 s"),
        ("host.status_changed", {"current": "healthy"}, EventContext("web-1", "web"), "web-1 (group web) is healthy again"),
        ("host.status_changed", {"current": "degraded", "in_maintenance": True}, WEB_1,
         "web-1 (group web) is degraded: homepage: status 503; api: timed out after 10 s (in maintenance)"),
        ("check.status_changed", {"current": "unhealthy", "detail": "status 503"},
         EventContext("web-1", "web", (("homepage", "status 503"),)), "web-1 (group web): homepage is unhealthy: status 503"),
        ("job.failed", {"job_id": "patch-42", "reason": "window_closed", "detail": "homepage: status 503"},
         EventContext("web-1", "web"), "job patch-42 failed on web-1 (group web): window_closed: homepage: status 503"),
        ("job.verification_failed", {"job_id": "patch-42", "detail": "homepage: status 503"},
         EventContext("web-1", "web"),
         "job patch-42: web-1 (group web) did not become healthy after patching: homepage: status 503"),
        ("job.halted", {"job_id": "patch-42", "reason": "manual", "by": "alice", "detail": "stop"}, EventContext(),
         "job patch-42 halted (manual, by alice): stop"),
        ("job.resumed", {"job_id": "patch-42", "by": "alice", "detail": "fixed"}, EventContext(),
         "job patch-42 resumed by alice: fixed"),
        ("job.released", {"job_id": "j", "host_id": "7"}, EventContext(), "job j released host 7"),
        # A detail cannot break the line, link or mention anyone in Slack.
        ("job.failed", {"job_id": "j\n<!channel>", "reason": "overridden", "detail": "a & b"}, EventContext("h"),
         "job j\\x0a&lt;!channel&gt; failed on h: overridden: a &amp; b"),
    ],
)  # fmt: skip
def test_slack_lines(routing_key: str, data: dict[str, Any], context: EventContext, line: str) -> None:
    assert slack_text(routing_key, data, context) == line


def test_a_slack_line_is_cut() -> None:
    line = slack_text("job.failed", {"job_id": "j", "reason": "r", "detail": "x" * 10_000}, EventContext())
    assert len(line) == 3000 and line.endswith("…")


def test_bodies() -> None:
    event_id, cloudevent = make_test_event("healthgate/api")
    envelope = json.loads(cloudevent)
    assert envelope["id"] == str(event_id) and envelope["type"] == "healthgate.test"
    assert notification_body("webhook", "healthgate.test", cloudevent, EventContext()) == cloudevent
    text = json.loads(notification_body("slack", "healthgate.test", cloudevent, EventContext()))["text"]
    assert text == "healthgate: a test notification (this channel works)"
    # A body that is not JSON still makes a line.
    assert json.loads(notification_body("slack", "job.halted", b"\xff", EventContext())) == {"text": "job  halted ()"}
