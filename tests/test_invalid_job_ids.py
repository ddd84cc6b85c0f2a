"""Every job id works (CONTRACT §3), also one the gate answered as an invalid request (CONTRACT §5: longer than 200
characters, control characters, NUL, a lone surrogate): the API and the dashboard list it, find it by its path and
show it as received, never as the key it is stored under. With the real gate, broker, database and API."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from starlette.routing import Match

from services.api.dashboard.views import job_id_html, job_id_text
from services.api.paths import MAX_LINKED_SEGMENT, linkable, path_segment
from shared.events import INVALID_JOB_KEY_PREFIX, job_key, received_job_id, received_job_id_bytes
from tests.support.messages import EventCapture, Publisher, wait_decision
from tests.support.processes import ServiceProcess
from tests.support.tokens import TokenFactory
from tests.test_paths import JOB, matched, scope

pytestmark = pytest.mark.usefixtures("poller", "gate")
LATER = "2030-06-01T12:00:00Z"


def encoded(job_id: str) -> str:
    """The job id as one path segment, as a client percent-encodes it (a lone surrogate as its 3 bytes)."""
    return quote(job_id, safe="", errors="surrogatepass")


async def started_invalid(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, job_ids: list[str]
) -> dict[str, str]:
    """Each job id sent in a job.start to a host of group g, each answered invalid_request; job id → host id."""
    hosts = {}
    for job_id in job_ids:
        response = await admin.post("/api/v1/hosts", json={"name": f"h-{uuid.uuid4().hex[:8]}", "group": "g"})
        hosts[job_id] = response.json()["id"]
        await jobs.send("job.start", {"job_id": job_id, "host_id": hosts[job_id], "window_ends_at": LATER})
    for job_id in job_ids:
        decision = await wait_decision(events, job_id)
        assert decision.data["reason"] == "invalid_request" and decision.data["job_id"] == job_id
    return hosts


async def test_the_api_lists_finds_and_shows_an_invalid_job_id_as_received(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, client: httpx.AsyncClient,
    db: asyncpg.Connection, make_token: TokenFactory,
) -> None:  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    job_ids = [
        "x" * 201,
        f"ctl-{tag}\x01",
        f"nul-{tag}\x00after",
        f"sur-{tag}\ud800",
        f"c1-{tag}\x85",
        f"newline-{tag}\nsecond line",
        f"slash/{tag}/\x00/" + "é" * 300,
        "y" * 5000,
    ]
    hosts = await started_invalid(jobs, events, admin, job_ids)
    stored = await db.fetch("SELECT job_id, received_job_id FROM gate_jobs")
    assert sorted(received_job_id(row["job_id"], row["received_job_id"]) for row in stored) == sorted(job_ids)
    assert all(row["job_id"].startswith(INVALID_JOB_KEY_PREFIX) for row in stored)

    for job_id in job_ids:
        response = await admin.get(f"/api/v1/jobs/{encoded(job_id)}")
        assert response.status_code == 200, (job_id[:30], response.text[:300])
        body = response.json()
        assert body["job_id"] == job_id
        (host,) = body["hosts"]
        assert host["host_id"] == hosts[job_id] and host["status"] == "failed" and host["reason"] == "invalid_request"
        # Not the key, and every character JSON must escape is escaped (a lone surrogate as \ud800).
        assert "invalid-job-id" not in response.text and "\x00" not in response.text and "\x01" not in response.text
        # It was decided when it came: an override finds it, and answers 409 (already decided), not 404.
        override = await admin.post(
            f"/api/v1/jobs/{encoded(job_id)}/hosts/{hosts[job_id]}/override",
            json={"decision": "release", "reason": "r"},
        )
        assert override.status_code == 409, override.text
    assert json.loads((await admin.get(f"/api/v1/jobs/{encoded(job_ids[3])}")).content)["job_id"].endswith("\ud800")

    listed = (await admin.get("/api/v1/jobs", params={"status": "failed"})).json()
    assert sorted(item["job_id"] for item in listed["items"]) == sorted(job_ids)
    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 3}
    while True:  # page by page: the cursor holds the stored key, which is text PostgreSQL holds
        page = (await admin.get("/api/v1/jobs", params=params)).json()
        seen += [item["job_id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert sorted(seen) == sorted(job_ids)
    one = (await admin.get("/api/v1/jobs", params={"host_id": hosts[job_ids[2]]})).json()["items"]
    assert [item["job_id"] for item in one] == [job_ids[2]]

    # Scoped like any job: a viewer of another group does not find it.
    client.headers["Authorization"] = f"Bearer {await make_token('viewer', ('other',))}"
    assert (await client.get(f"/api/v1/jobs/{encoded(job_ids[1])}")).status_code == 404
    assert (await client.get("/api/v1/jobs")).json()["items"] == []


async def test_invalid_ids_that_were_never_received_are_not_found(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    host_id = (await admin.post("/api/v1/hosts", json={"name": "h", "group": "g"})).json()["id"]
    decision = {"decision": "release", "reason": "r"}
    for segment in ("a%00b", "%00", "j" * 201, "a%01b", "%ED%A0%80", "%FF", "a%C3"):
        for response in (
            await admin.get(f"/api/v1/jobs/{segment}"),
            await admin.post(f"/api/v1/jobs/{segment}/hosts/{host_id}/override", json=decision),
        ):
            assert response.status_code == 404, (segment, response.text)
            assert response.headers["content-type"] == "application/problem+json"
    # The key itself, sent as an id, is an invalid id of its own (a control character): it names its own key.
    key = job_key("z" * 201)
    await db.execute(
        "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, decided_at, reason, received_job_id)"
        " VALUES ($1, $2, 'failed', NULL, now(), 'invalid_request', $3)",
        key, uuid.UUID(host_id), received_job_id_bytes("z" * 201),
    )  # fmt: skip
    assert (await admin.get(f"/api/v1/jobs/{encoded(key)}")).status_code == 404
    assert (await admin.get(f"/api/v1/jobs/{'z' * 201}")).json()["job_id"] == "z" * 201


@contextlib.asynccontextmanager
async def signed_in(api: ServiceProcess, token: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client signed in to the dashboard through its /login form."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as browser:
        form = (await browser.get("/login")).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        response = await browser.post("/login", data={"token": token, "csrf": csrf.group(1)})
        assert response.status_code == 303, response.text
        yield browser


async def test_the_dashboard_lists_links_and_shows_an_invalid_job_id_as_received(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, api: ServiceProcess, make_token: TokenFactory
) -> None:
    tag = uuid.uuid4().hex[:8]
    long_id, control, nul, surrogate = "x" * 201 + tag, f"ctl-{tag}\x01", f"nul-{tag}\x00", f"sur-{tag}\ud800"
    huge = f"huge-{tag}-" + "z" * 2_000_000  # decided and shown, cut; too long for a URL: not linked
    await started_invalid(jobs, events, admin, [long_id, control, nul, surrogate, huge])
    async with signed_in(api, await make_token("admin")) as browser:
        page = (await browser.get("/jobs")).text
        for job_id in (long_id, control, nul, surrogate):
            assert f'<a href="/jobs/{encoded(job_id)}">{job_id_html(job_id)}</a>' in page, job_id[:30]
        assert f'data-job="ctl-{tag}U+0001"' in page
        assert '<span class="control-character" title="control character U+0000">U+0000</span>' in page
        assert '<span class="control-character" title="lone surrogate U+D800">U+D800</span>' in page
        assert f"huge-{tag}-" in page and "… (2000014 characters)" in page and f'href="/jobs/huge-{tag}' not in page
        assert "\x1a" not in page and "invalid-job-id" not in page and "\x00" not in page and "\x01" not in page
        assert len(page) < 100_000  # the 2 MB id is cut
        for job_id in (long_id, control, nul, surrogate):
            one = await browser.get(f"/jobs/{encoded(job_id)}")
            assert one.status_code == 200, (job_id[:30], one.text[:300])
            assert f'<h1>Job <span class="job-id">{job_id_html(job_id)}</span></h1>' in one.text
            assert f"<title>Job {job_id_text(job_id)}" in one.text and "invalid_request" in one.text
        assert (await browser.get("/jobs/a%00never-sent")).status_code == 404


# ---- the pieces, as pure functions ----------------------------------------------------------------


def test_received_job_ids_round_trip_through_storage_and_paths() -> None:
    for job_id in ("a\x00b", "\ud800", "x" * 201, "\U0001f600\udfff\x85", "é" * 1000):
        key = job_key(job_id)
        assert key.startswith(INVALID_JOB_KEY_PREFIX) and len(key) == 87 and "\x00" not in key
        assert received_job_id(key, received_job_id_bytes(job_id)) == job_id
        assert matched(JOB, scope("/api/v1/jobs/" + path_segment(job_id))) == (Match.FULL, {"job_id": job_id})
    for job_id in ("patch-1", "deploy/2026/42", "é" * 200):
        assert job_key(job_id) == job_id and received_job_id_bytes(job_id) is None
        assert received_job_id(job_id, None) == job_id
    assert received_job_id(job_key("\x01"), None) == job_key("\x01")  # a row from before migration 0009
    assert linkable("x" * MAX_LINKED_SEGMENT) and not linkable("x" * (MAX_LINKED_SEGMENT + 1))
    assert not linkable("é" * (MAX_LINKED_SEGMENT // 5))  # 6 characters each, encoded
    assert (
        str(job_id_html("a<b\x00"))
        == 'a&lt;b<span class="control-character" title="control character U+0000">U+0000</span>'
    )
    assert job_id_text("a\x01" + "b" * 300) == "aU+0001" + "b" * 198 + "… (302 characters)"
