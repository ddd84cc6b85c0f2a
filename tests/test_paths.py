"""Unit tests of pure logic: routes matched segment by segment on the raw path (services/api/paths.py).

The scopes are built as uvicorn builds them: `raw_path` the bytes as sent (after `root_path`), `path` the
same percent-decoded, with `root_path` in front of both. The API and dashboard tests drive the same routes
through a real server.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.routing import Match
from starlette.types import Scope

from services.api.paths import SegmentRoute, path_segment, request_segments


async def endpoint(request: Any) -> None:
    """Never called: only matching is tested here."""


JOB = SegmentRoute("/api/v1/jobs/{job_id}", endpoint, methods=["GET"])
OVERRIDE = SegmentRoute("/api/v1/jobs/{job_id}/hosts/{host_id}/override", endpoint, methods=["POST"])
HOST_ID = "0b1e8f0e-7f41-4a38-9d43-5f0d1c1f9a11"


def scope(raw_path: str, method: str = "GET", root_path: str = "") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": root_path + unquote(raw_path),
        "raw_path": (root_path + raw_path).encode("ascii"),
        "root_path": root_path,
    }


def matched(route: SegmentRoute, request: Scope) -> tuple[Match, dict[str, str] | None]:
    match, child = route.matches(request)
    return match, child.get("path_params")


@pytest.mark.parametrize(
    ("raw", "job_id"),
    [
        ("deploy%2F2026%2F42", "deploy/2026/42"),
        ("deploy%2f2026%2f42", "deploy/2026/42"),
        ("a%20b", "a b"),
        ("x%23y", "x#y"),
        ("what%3F", "what?"),
        ("100%25", "100%"),
        ("a%252Fb", "a%2Fb"),  # decoded once, not twice
        ("d%C3%A9ploiement-%C3%BC-%E6%97%A5%E6%9C%AC", "déploiement-ü-日本"),
        ("%2E%2E", ".."),
        ("a%00b", "a\x00b"),  # matched; the handler looks it up by its key (an invalid job id the gate answered)
        ("a%ED%A0%80", "a\ud800"),  # a lone surrogate as its 3 bytes ("surrogatepass"): JSON can carry one
        ("50%", "50%"),  # a lone `%` is not an escape (RFC 3986 readers keep it)
        (f"x%2Fhosts%2F{HOST_ID}%2Foverride", f"x/hosts/{HOST_ID}/override"),
    ],
)
def test_a_job_id_is_one_segment_decoded_once(raw: str, job_id: str) -> None:
    assert matched(JOB, scope(f"/api/v1/jobs/{raw}")) == (Match.FULL, {"job_id": job_id})
    override = scope(f"/api/v1/jobs/{raw}/hosts/{HOST_ID}/override", "POST")
    assert matched(OVERRIDE, override) == (Match.FULL, {"job_id": job_id, "host_id": HOST_ID})
    # and neither route mistakes the other's path for its own
    assert matched(OVERRIDE, scope(f"/api/v1/jobs/{raw}", "POST"))[0] is Match.NONE
    assert matched(JOB, scope(f"/api/v1/jobs/{raw}/hosts/{HOST_ID}/override"))[0] is Match.NONE


def test_a_job_id_ending_like_the_override_path_is_still_a_job_id() -> None:
    job_id = f"x/hosts/{HOST_ID}/override"
    assert matched(JOB, scope("/api/v1/jobs/" + path_segment(job_id))) == (Match.FULL, {"job_id": job_id})
    # POSTed, it is the job's path with the wrong method (405), not an override of job "x"
    assert matched(JOB, scope("/api/v1/jobs/" + path_segment(job_id), "POST"))[0] is Match.PARTIAL
    assert matched(OVERRIDE, scope("/api/v1/jobs/" + path_segment(job_id), "POST"))[0] is Match.NONE


@pytest.mark.parametrize(
    "raw",
    [
        "/api/v1/jobs/deploy/2026/42",  # unencoded `/`: three segments, no job route has that shape
        "/api/v1/jobs/",  # an empty id
        "/api/v1/jobs",
        "/api/v1/jobs/%FF",  # not UTF-8 once decoded: no id holds that
        "/api/v1/jobs/a%C3",  # a cut UTF-8 sequence
        "/api/v1/jobs/a/",
        "/api/v1/jobs%2Fa",  # the separator before the id encoded: one segment "jobs/a"
    ],
)
def test_paths_that_name_no_job(raw: str) -> None:
    assert matched(JOB, scope(raw))[0] is Match.NONE


def test_literal_segments_may_be_percent_encoded_too() -> None:
    assert matched(JOB, scope("/api/v1/%6Aobs/x")) == (Match.FULL, {"job_id": "x"})


def test_root_path_is_not_part_of_the_route() -> None:
    request = scope("/api/v1/jobs/a%2Fb", root_path="/healthgate")
    assert matched(JOB, request) == (Match.FULL, {"job_id": "a/b"})


def test_a_rewritten_path_is_matched_as_rewritten() -> None:
    """Starlette's trailing-slash redirect tries a copy of the scope whose path it changed."""
    request = scope("/api/v1/jobs/a/") | {"path": "/api/v1/jobs/a"}
    assert matched(JOB, request) == (Match.FULL, {"job_id": "a"})


def test_without_raw_path_the_decoded_path_is_used() -> None:
    request = scope("/api/v1/jobs/a%20b")
    del request["raw_path"]
    assert matched(JOB, request) == (Match.FULL, {"job_id": "a b"})


def test_other_methods_are_a_partial_match() -> None:
    assert matched(JOB, scope("/api/v1/jobs/a%2Fb", "DELETE"))[0] is Match.PARTIAL


def test_a_parameter_must_be_a_whole_segment() -> None:
    with pytest.raises(ValueError, match="whole segment"):
        SegmentRoute("/jobs/job-{job_id}", endpoint)
    with pytest.raises(ValueError, match="whole segment"):
        SegmentRoute("/files/{rest:path}", endpoint)


@pytest.mark.parametrize("job_id", [".", "..", "./x", "a/../b", "%2F", " ", "?", "#"])
def test_path_segment_never_leaves_a_dot_segment_or_delimiter(job_id: str) -> None:
    segment = path_segment(job_id)
    assert segment not in (".", "..") and not set(segment) & set("/?# ")
    assert request_segments(scope("/jobs/" + segment)) == ("jobs", job_id)


# Any text a received job id may hold (the gate answers invalid ones too, and the API finds them): every code
# point, NUL and lone surrogates included, and more than 200 characters.
JOB_IDS = st.text(st.characters(), min_size=1, max_size=400)


@given(JOB_IDS)
def test_every_job_id_round_trips(job_id: str) -> None:
    assert matched(JOB, scope("/api/v1/jobs/" + path_segment(job_id))) == (Match.FULL, {"job_id": job_id})
    override = scope(f"/api/v1/jobs/{path_segment(job_id)}/hosts/{HOST_ID}/override", "POST")
    assert matched(OVERRIDE, override) == (Match.FULL, {"job_id": job_id, "host_id": HOST_ID})
