"""The dashboard's issue 15 pages in a real browser (CONTRACT §3 "Dashboard"): the admin's host form, each check's
and host's uptime over 24 h, the latency chart's scales with the legend of the result squares, and the audit log.

As tests/test_dashboard.py: Playwright drives Debian's Chromium; every test signs in through /login against the
session's real API. Each test also takes a screenshot of its page, written into docs/screenshots/ (for the README)
only with HEALTHGATE_UPDATE_SCREENSHOTS=1, else into the test's temporary directory.
"""

# ruff: noqa: F811  (the fixtures of tests/test_dashboard.py, imported below, are the tests' arguments)
from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, expect

from tests.support.processes import ServiceProcess
from tests.support.tokens import TokenFactory
from tests.test_dashboard import (  # noqa: F401 - the fixtures on the module's event loop, one Chromium per module
    DOCS_SCREENSHOTS,
    UPDATE_SCREENSHOTS,
    admin,
    browser,
    check_item,
    chromium,
    client,
    create_check,
    create_host,
    db,
    new_page,
    script_problems,
    session_csrf,
    sign_in,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

# A refused port on loopback: checks that the session's poller may run, and that never look a name up in DNS.
NOWHERE = "http://127.0.0.1:9/"


def screenshots(tmp_path: Path) -> Path:
    folder = DOCS_SCREENSHOTS if UPDATE_SCREENSHOTS else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def audit_actions(db: asyncpg.Connection, entity_id: str) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT actor, action FROM audit_log WHERE entity_id = $1 ORDER BY id", entity_id)
    return [(row["actor"], row["action"]) for row in rows]


async def test_admin_adds_edits_and_deletes_a_host_with_errors_by_field(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    await create_host(admin, "b-web-1", "team-b")
    base = api.base_url
    page = await new_page(browser)
    await sign_in(page, base, await make_token("admin", name="alice"))
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Add host").click()
    await page.wait_for_url(f"{base}/hosts/new")

    # The API's messages, each by its field: an agent URL with a query string (422), then a taken name (409).
    await page.get_by_label("Name").fill("a-web-1")
    await page.get_by_label("Group").fill("team-a")
    await page.get_by_label("Agent URL").fill("http://127.0.0.1:9100/?token=x")
    await page.get_by_role("button", name="Add host").click()
    agent_url = page.get_by_label("Agent URL")
    await expect(agent_url).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#host-agent_url-error")).to_contain_text("query")
    await expect(page.get_by_label("Name")).to_have_value("a-web-1")  # what was typed stays
    await page.screenshot(path=screenshots(tmp_path) / "host-form.png")
    await agent_url.fill("http://127.0.0.1:9100")
    await page.get_by_label("Name").fill("b-web-1")
    await page.get_by_role("button", name="Add host").click()
    await expect(page.locator("#host-name-error")).to_contain_text("a host named 'b-web-1' already exists")
    await page.get_by_label("Name").fill("a-web-1")
    await page.get_by_role("button", name="Add host").click()
    await page.wait_for_url(re.compile(r"/hosts/[0-9a-f-]{36}$"))
    host_id = page.url.rsplit("/", 1)[1]
    shown = (await admin.get(f"/api/v1/hosts/{host_id}")).json()
    assert (shown["name"], shown["group"], shown["agent_url"]) == ("a-web-1", "team-a", "http://127.0.0.1:9100")
    assert await audit_actions(db, host_id) == [("alice", "host.create")]

    # Edit: the group changes; the agent URL may not go while a service check needs it (the API's rule).
    await create_check(admin, host_id, name="sshd", check_type="service", service_name="ssh.service", enabled=False)
    await page.reload()
    await page.get_by_role("link", name="Edit host").click()
    await expect(page.get_by_label("Group")).to_have_value("team-a")
    await page.get_by_label("Group").fill("team-c")
    await page.get_by_label("Agent URL").fill("")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#host-agent_url-error")).to_have_text("required: the host has 1 service check(s)")
    assert (await admin.get(f"/api/v1/hosts/{host_id}")).json()["group"] == "team-a"
    await page.get_by_label("Agent URL").fill("http://127.0.0.1:9100")
    await page.get_by_role("button", name="Save changes").click()
    await page.wait_for_url(f"{base}/hosts/{host_id}")
    await expect(page.locator("p.muted").first).to_contain_text("Group team-c")
    update = await db.fetchval("SELECT changes FROM audit_log WHERE action = 'host.update'")
    assert json.loads(update) == {"group": {"from": "team-a", "to": "team-c"}}

    # Delete, after a confirmation page that says what goes with the host.
    await page.get_by_role("link", name="Delete host…").click()
    await expect(page.locator("[data-delete-host]")).to_contain_text("with its 1 health check (sshd)")
    await page.get_by_role("button", name="Delete a-web-1").click()
    await page.wait_for_url(f"{base}/hosts")
    await expect(page.locator('tr[data-host="a-web-1"]')).to_have_count(0)
    assert (await admin.get(f"/api/v1/hosts/{host_id}")).status_code == 404
    assert [action for _, action in await audit_actions(db, host_id)][-1] == "host.delete"
    assert script_problems(page) == []

    # An operator has no host form, no link to it, and the server refuses a forged one.
    operator = await new_page(browser)
    await sign_in(operator, base, await make_token("operator", ("team-b",), name="op-1"))
    await expect(operator.get_by_role("link", name="Add host")).to_have_count(0)
    await expect(operator.get_by_role("link", name="Audit log")).to_have_count(0)
    response = await operator.goto(f"{base}/hosts/new")
    assert response is not None and response.status == 403
    csrf = await session_csrf(db, "op-1")
    forged = await operator.request.post(
        f"{base}/hosts/new", form={"csrf": csrf, "name": "x", "group": "team-b"}, max_redirects=0
    )
    assert forged.status == 403
    assert await db.fetchval("SELECT count(*) FROM hosts") == 1


async def seed_uptime(db: asyncpg.Connection, check_id: str, healthy: int, total: int) -> None:
    """A check's count two hours ago: large, so that a result the session's poller adds now moves no shown digit."""
    await db.execute(
        "INSERT INTO check_uptime_hours (check_id, hour, healthy, total)"
        " VALUES ($1, date_trunc('hour', now(), 'UTC') - interval '2 hours', $2, $3)",
        uuid.UUID(check_id),
        healthy,
        total,
    )


async def test_uptime_of_each_check_and_host_on_the_hosts_list_and_host_page(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    host_id = await create_host(admin, "a-web-1", "team-a")
    home = await create_check(admin, host_id, name="homepage", check_type="http", url=NOWHERE)
    api_check = await create_check(admin, host_id, name="api", check_type="http", url=NOWHERE + "api")
    idle = await create_check(admin, host_id, name="idle", check_type="http", url=NOWHERE + "idle", enabled=False)
    await create_host(admin, "a-web-2", "team-a")  # no checks: no figure
    await seed_uptime(db, home, 666_667, 1_000_000)  # 66.6 %
    await seed_uptime(db, api_check, 955_500, 1_000_000)  # 95.5 %
    await seed_uptime(db, idle, 100_000, 1_000_000)  # 10.0 %, but disabled: not in the host's figure
    # The host's: the mean of its enabled checks' (0.666667 + 0.9555) / 2 = 0.811 → 81.1 %.

    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("viewer", ("team-a",)))
    await expect(page.locator('tr[data-host="a-web-1"] td.uptime')).to_contain_text("81.1 %")
    await expect(page.locator('tr[data-host="a-web-2"] td.uptime')).to_contain_text("no results")
    await page.get_by_role("link", name="a-web-1").click()
    await expect(page.locator("[data-host-uptime] strong")).to_have_text("81.1 %")
    await expect(check_item(page, "homepage").locator("[data-uptime]")).to_have_text("Uptime (24 h): 66.6 %")
    await expect(check_item(page, "api").locator("[data-uptime]")).to_have_text("Uptime (24 h): 95.5 %")
    await expect(check_item(page, "idle").locator("[data-uptime]")).to_have_text("Uptime (24 h): 10.0 %")
    # The same figures as the API's uptime_24h.
    shares = {
        c["name"]: c["uptime_24h"] for c in (await admin.get(f"/api/v1/hosts/{host_id}/health-checks")).json()["items"]
    }
    assert (shares["homepage"], shares["api"], shares["idle"]) == pytest.approx((0.666667, 0.9555, 0.1), abs=1e-4)
    assert script_problems(page) == []


async def test_latency_chart_has_time_and_millisecond_scales_and_a_legend(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    host_id = await create_host(admin, "a-web-1", "team-a")
    check_id = await create_check(admin, host_id, name="idle", check_type="http", url=NOWHERE, enabled=False)
    # 12 results a minute apart ending 2 minutes ago, 20 to 240 ms, the 4th and 9th unhealthy.
    end = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    rows = [
        (uuid.uuid4(), uuid.UUID(check_id), uuid.UUID(host_id), end - dt.timedelta(minutes=11 - index),
         index not in (3, 8), "ok" if index not in (3, 8) else "timeout", "healthy", "detail", 20.0 + index * 20)
        for index in range(12)
    ]  # fmt: skip
    await db.copy_records_to_table(
        "check_results",
        records=rows,
        columns=["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"],
    )
    await seed_uptime(db, check_id, 10, 12)
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("viewer", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    chart = check_item(page, "idle").locator("svg.latency")
    # Milliseconds from 0 to the first round step above 240 ms, each tick with its unit.
    await expect(chart.locator(".y-tick")).to_have_text(["0 ms", "100 ms", "200 ms", "300 ms"])
    await expect(chart.locator(".y-title")).to_have_text("latency (ms)")
    # Time: round UTC minutes within the 11 minutes shown, each label its tick's time, and the date in the caption.
    ticks = chart.locator(".x-tick")
    labels = await ticks.all_text_contents()
    moments = [dt.datetime.fromisoformat(at or "") for at in await ticks.evaluate_all("t => t.map(e => e.dataset.at)")]
    assert 2 <= len(labels) <= 5, labels
    assert labels == [f"{moment:%H:%M}" for moment in moments]
    assert all(end - dt.timedelta(minutes=11) <= moment <= end for moment in moments)
    assert len({(b - a) for a, b in itertools.pairwise(moments)}) <= 1  # evenly spaced
    await expect(chart.locator(".x-title")).to_have_text(
        f"time (UTC, {end:%Y-%m-%d})"
        if (end - dt.timedelta(minutes=11)).date() == end.date()
        else re.compile(r"time \(UTC, .* to .*\)")
    )
    # The unhealthy results: red dots on the line and red squares with a cross, explained by the legend.
    await expect(chart.locator("circle.bad")).to_have_count(2)
    await expect(check_item(page, "idle").locator("svg.history path.mark")).to_have_count(2)
    legend = page.get_by_role("region", name="Legend")
    await expect(legend).to_contain_text("a healthy result")
    await expect(legend).to_contain_text("an unhealthy result (red, with a cross)")
    await expect(legend).to_contain_text("latency of each result, in ms, over time (UTC)")
    await check_item(page, "idle").scroll_into_view_if_needed()
    await page.screenshot(path=screenshots(tmp_path) / "host-chart.png", full_page=True)
    assert script_problems(page) == []


async def test_audit_page_shows_newest_first_paged_without_secrets_to_admins_only(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    alice = await make_token("admin", name="alice")  # audited too (token.create), as the admin fixture's token
    # 55 older entries, then the API's own: a host, a check with a password, and the password changed.
    await db.executemany(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id, changes) VALUES ('robot', 'token.create',"
        " 'token', $1, '{}'::jsonb)",
        [(f"token-{index}",) for index in range(55)],
    )
    host_id = await create_host(admin, "a-web-1", "team-a")
    check = {"name": "homepage", "check_type": "http", "url": NOWHERE, "enabled": False,
             "basic_auth_user": "monitor", "basic_auth_pass": "hunter2-secret"}  # fmt: skip
    check_id = await create_check(admin, host_id, **check)
    changed = await admin.put(
        f"/api/v1/hosts/{host_id}/health-checks/{check_id}", json=check | {"basic_auth_pass": "other-secret"}
    )
    assert changed.status_code == 200, changed.text

    page = await new_page(browser)
    await sign_in(page, api.base_url, alice)
    await page.get_by_role("link", name="Audit log").click()
    await page.wait_for_url(f"{api.base_url}/audit")
    rows = page.locator("tr[data-audit]")
    await expect(rows).to_have_count(50)
    # Newest first: the check's update, its creation, the host's creation, then the older ones.
    actions = await rows.evaluate_all("rows => rows.slice(0, 4).map(row => row.dataset.action)")
    assert actions == ["health_check.update", "health_check.create", "host.create", "token.create"]
    newest = rows.first
    await expect(newest.locator("[data-changes]")).to_have_text("basic_auth_pass: <changed>")
    await expect(rows.nth(2).locator("[data-changes]")).to_contain_text('group: "team-a"')
    assert (await rows.nth(0).locator("[data-actor]").inner_text()) == (
        await rows.nth(2).locator("[data-actor]").inner_text()
    )
    content = await page.content()
    assert "hunter2-secret" not in content and "other-secret" not in content
    await page.screenshot(path=tmp_path / "audit-paged.png")  # the README's is test_dashboard.py's, of real changes
    # The next page: the oldest (two tokens, 55 older entries and the API's 3: 60 in all), then no further link.
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 60
    await page.get_by_role("link", name="Older entries").click()
    await expect(rows).to_have_count(10)
    await expect(page.get_by_role("link", name="Older entries")).to_have_count(0)
    assert set(await rows.evaluate_all("rows => rows.map(row => row.dataset.action)")) == {"token.create"}
    assert script_problems(page) == []

    viewer = await new_page(browser)
    await sign_in(viewer, api.base_url, await make_token("viewer", ("team-a",)))
    response = await viewer.goto(f"{api.base_url}/audit")
    assert response is not None and response.status == 403
