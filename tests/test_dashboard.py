"""The dashboard in a real browser (issue 6, CONTRACT §3 "Dashboard").

Playwright's async API drives Debian's Chromium (`/usr/bin/chromium`, installed by `make test-deps`); no
browser is ever downloaded. Every test signs in through the real /login form with a token, against the
session's real API, poller, nginx and fake agent. The last test also writes the screenshots in
docs/screenshots/ that the README shows.

One browser serves every test of the module (launching one takes about a second). Playwright's objects belong to
the event loop that made them, so every test here runs on the module's event loop, and so do the database, client
and event fixtures it uses (`db`, `client`, `admin`, `events`: the conftest's, made on this loop). Each test still
has browser contexts of its own (its own cookies), closed when it ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import ssl
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, Page, ViewportSize, async_playwright, expect

from shared.group_policies import GroupPolicy, put_policy
from tests.support.blackhole import refused_port
from tests.support.database import emptied_database
from tests.support.fake_agent import FakeAgent
from tests.support.messages import EventCapture, capture_events
from tests.support.nginx import NginxServer
from tests.support.processes import ServiceProcess
from tests.support.receiver import Receiver
from tests.support.services import BackingServices
from tests.support.tokens import TokenFactory

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# The README's screenshots are rewritten only on request, so that a test run leaves the checkout clean:
# HEALTHGATE_UPDATE_SCREENSHOTS=1 make test PYTEST_ARGS="tests/test_dashboard.py -k screenshots"
UPDATE_SCREENSHOTS = os.environ.get("HEALTHGATE_UPDATE_SCREENSHOTS") == "1"
LAPTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}


# ---- browser and page helpers ----------------------------------------------------------------------------------


def chromium_installed() -> bool:
    return Path(CHROMIUM).exists()


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """The module's browser."""
    if not chromium_installed():
        pytest.fail(f"{CHROMIUM} is missing: run `make test-deps` (apt-get install chromium chromium-driver)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The module's browser, for one test: every context (and page) the test opened is closed after it, so that
    no page of one test keeps refreshing itself during the next."""
    assert chromium.is_connected(), "the module's browser is gone"
    yield chromium
    for context in chromium.contexts:
        await context.close()


@pytest_asyncio.fixture(loop_scope="module")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The conftest's `db`, on the module's event loop."""
    async with emptied_database(database_url) as connection:
        yield connection


@pytest_asyncio.fixture(loop_scope="module")
async def client(
    api: ServiceProcess, db: asyncpg.Connection, http_tls: ssl.SSLContext
) -> AsyncIterator[httpx.AsyncClient]:
    """The conftest's `client`, on the module's event loop."""
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30, verify=http_tls) as http:
        yield http


@pytest_asyncio.fixture(loop_scope="module")
async def admin(client: httpx.AsyncClient, make_token: TokenFactory) -> httpx.AsyncClient:
    """The conftest's `admin`, on the module's event loop."""
    client.headers["Authorization"] = f"Bearer {await make_token('admin')}"
    return client


@pytest_asyncio.fixture(loop_scope="module")
async def events(backing: BackingServices, exchange_name: str) -> AsyncIterator[EventCapture]:
    """The conftest's `events`, on the module's event loop."""
    async with capture_events(backing.amqp_url, exchange_name) as capture:
        yield capture


@pytest_asyncio.fixture(loop_scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    """The conftest's `receiver`, on the module's event loop (a server on another loop would never answer)."""
    async with Receiver() as started:
        yield started


_problems: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()


def watch(page: Page) -> Page:
    """Record the page's uncaught script errors and Content-Security-Policy violations."""
    problems = _problems.setdefault(page, [])
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return page


def script_problems(page: Page) -> list[str]:
    return _problems[page]


async def new_page(browser: Browser, viewport: ViewportSize = LAPTOP, **options: Any) -> Page:
    """A watched page in a fresh context (its own cookies)."""
    context = await browser.new_context(viewport=viewport, **options)
    context.set_default_timeout(10_000)
    return watch(await context.new_page())


async def sign_in(page: Page, base_url: str, token: str) -> None:
    await page.goto(f"{base_url}/login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{base_url}/hosts")


async def listed_hosts(page: Page) -> list[str]:
    hosts: list[str] = await page.locator("#hosts-region tr[data-host]").evaluate_all(
        "rows => rows.map(row => row.dataset.host)"
    )
    return hosts


def host_badge(page: Page, name: str) -> Locator:
    return page.locator(f'#hosts-region tr[data-host="{name}"] [data-status]')


def check_item(page: Page, name: str) -> Locator:
    return page.locator(f'li.check[data-check="{name}"]')


def add_form(page: Page) -> Locator:
    return page.locator("section[aria-labelledby=add-check] form")


async def session_csrf(db: asyncpg.Connection, token_name: str) -> str:
    """The CSRF token of a signed-in token's session, as a forger who somehow had it would send it."""
    value = await db.fetchval(
        "SELECT s.csrf_token FROM dashboard_sessions s JOIN api_tokens t ON t.id = s.token_id WHERE t.name = $1",
        token_name,
    )
    assert isinstance(value, str) and value, f"no dashboard session for {token_name}"
    return value


async def wait_for_last_result(page: Page, check: str, word: str, timeout: float = 12) -> str:
    """Reload the host page until the check's "Last result" says `word` (healthy or unhealthy)."""
    last = check_item(page, check).locator("[data-last-result]")
    async with asyncio.timeout(timeout):
        while True:
            text = " ".join((await last.inner_text()).split())
            if text.startswith(f"Last result: {word} "):
                return text
            await asyncio.sleep(0.5)
            await page.reload()


# ---- data helpers ------------------------------------------------------------------------------------------------


async def create_host(admin: httpx.AsyncClient, name: str, group: str, agent_url: str | None = None) -> str:
    response = await admin.post("/api/v1/hosts", json={"name": name, "group": group, "agent_url": agent_url})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def create_check(admin: httpx.AsyncClient, host_id: str, **body: Any) -> str:
    response = await admin.post(f"/api/v1/hosts/{host_id}/health-checks", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def insert_job(
    db: asyncpg.Connection,
    job_id: str,
    host_id: str,
    *,
    window: dt.timedelta = dt.timedelta(minutes=30),
    status: str = "waiting_health_check",
    decided_ago: dt.timedelta | None = None,
    reason: str | None = None,
    detail: str | None = None,
) -> None:
    now = dt.datetime.now(dt.UTC)
    decided_at = None if status == "waiting_health_check" else now - (decided_ago or dt.timedelta(minutes=5))
    await db.execute(
        """
        INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, received_at, decided_at, reason, detail)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        """,
        job_id,
        uuid.UUID(host_id),
        status,
        now + window,
        (decided_at or now) - dt.timedelta(seconds=40),
        decided_at,
        reason,
        detail,
    )


# ---- 1. sign-in as each role ----------------------------------------------------------------------------------


async def test_each_role_signs_in_sees_its_hosts_and_signs_out(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    for name, group in (("a-web-1", "team-a"), ("a-db-1", "team-a"), ("b-web-1", "team-b")):
        await create_host(admin, name, group)
    roles = {
        "admin": ((), ["a-db-1", "a-web-1", "b-web-1"]),
        "operator": (("team-a",), ["a-db-1", "a-web-1"]),
        "viewer": (("team-a",), ["a-db-1", "a-web-1"]),
    }
    for role, (groups, visible) in roles.items():
        token = await make_token(role, groups, name=f"{role}-browser")
        page = await new_page(browser)
        await sign_in(page, api.base_url, token)
        assert await listed_hosts(page) == visible, role
        await expect(page.locator(".who .role")).to_have_text(role)
        await expect(page.locator(".summary .total .count")).to_have_text(str(len(visible)))

        # The session cookie: HttpOnly, SameSite=Lax, not the token; the database does not hold it either.
        (cookie,) = [c for c in await page.context.cookies() if c["name"] == "healthgate_session"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax", cookie
        assert token not in cookie["value"] and cookie["value"] not in token
        assert await page.evaluate("document.cookie") == "", "the session cookie is readable from scripts"
        stored = await db.fetchval("SELECT string_agg(row_to_json(s)::text, ' ') FROM dashboard_sessions s")
        assert token not in stored and cookie["value"] not in stored

        # Sign-out ends the session on the server: the old cookie, put back, no longer signs anyone in.
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(f"{api.base_url}/login")
        await page.context.add_cookies([cookie])
        await page.goto(f"{api.base_url}/hosts")
        assert page.url == f"{api.base_url}/login?next=%2Fhosts"
        assert script_problems(page) == []
        await page.context.close()

    # An admin can filter by group; the filter form round-trips through the URL.
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin"))
    await page.get_by_label("Group").select_option("team-b")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url(re.compile(r"/hosts\?group=team-b"))
    assert await listed_hosts(page) == ["b-web-1"]

    # A wrong token: an error, no session.
    page = await new_page(browser)
    await page.goto(f"{api.base_url}/login")
    await page.get_by_label("API token").fill("hg_" + "x" * 43)
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_role("button", name="Sign in").click()
    assert (await answer.value).status == 401
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    assert [c for c in await page.context.cookies() if c["name"] == "healthgate_session"] == []
    # And a sign-in POST without the form's CSRF token is refused before the token is even looked at.
    forged = await page.request.post(f"{api.base_url}/login", form={"token": "hg_whatever"}, max_redirects=0)
    assert forged.status == 403


# ---- 2. add a check, see its result, test it --------------------------------------------------------------------


async def test_operator_adds_a_check_sees_its_result_and_tests_it_in_place(
    api: ServiceProcess,
    poller: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    nginx: NginxServer,
) -> None:
    await create_host(admin, "a-web-1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.get_by_role("link", name="a-web-1").click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("a-web-1")

    form = add_form(page)
    await form.get_by_label("Name", exact=True).fill("homepage")
    await form.get_by_label("Type").select_option("http")
    await form.get_by_label("URL", exact=True).fill(nginx.http_url("/ok"))
    await form.get_by_label("Body contains").fill("all good")
    await expect(form.get_by_label("Port")).to_be_hidden()  # only the chosen type's fields are shown
    await form.get_by_role("button", name="Add check").click()

    item = check_item(page, "homepage")
    await expect(item).to_be_visible()
    await expect(item.locator(".target")).to_contain_text(f"GET {nginx.http_url('/ok')} expecting 2xx")
    # The poller runs a new check within 5 s.
    text = await wait_for_last_result(page, "homepage", "healthy")
    assert "(ok)" in text and "all good" in text
    await expect(item.locator(".check-head [data-status]")).to_have_attribute("data-status", "healthy")
    results = await item.locator("svg.history rect").count()
    assert results >= 1

    # "Test now" shows the result in place: no navigation (the marker survives), the output filled by fetch().
    await page.evaluate("window.stillTheSamePage = true")
    await item.get_by_role("button", name="Test now").click()
    await expect(item.locator(".test-result")).to_have_text(
        re.compile(r"^Healthy: status 200 OK, body contains 'all good' · \d+ ms")
    )
    assert await page.evaluate("window.stillTheSamePage") is True
    await page.reload()
    await expect(item.locator("svg.history rect")).to_have_count(results + 1)  # a test run is stored like any other
    assert script_problems(page) == []


# ---- 3. a host turns unhealthy when its target fails ----------------------------------------------------------


async def test_host_turns_unhealthy_when_its_service_fails(
    api: ServiceProcess,
    poller: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    fake_agent: FakeAgent,
    db: asyncpg.Connection,
) -> None:
    fake_agent.set("nginx.service", "healthy")
    host_id = await create_host(admin, "a-app-1", "team-a", agent_url=fake_agent.base_url)
    token = await make_token("operator", ("team-a",))

    host_page = await new_page(browser)
    await sign_in(host_page, api.base_url, token)
    await host_page.goto(f"{api.base_url}/hosts/{host_id}")
    form = add_form(host_page)
    await form.get_by_label("Name", exact=True).fill("web server")
    await form.get_by_label("Type").select_option("service")
    await expect(form.get_by_label("URL", exact=True)).to_be_hidden()
    await form.get_by_label("systemd unit").fill("nginx.service")
    await form.get_by_role("button", name="Add check").click()
    await wait_for_last_result(host_page, "web server", "healthy")
    await expect(host_page.locator("h1 [data-status]")).to_have_attribute("data-status", "healthy")

    # A second tab on the hosts page, left alone from here on: it must update itself.
    hosts_page = watch(await host_page.context.new_page())
    await hosts_page.goto(f"{api.base_url}/hosts")
    await expect(host_badge(hosts_page, "a-app-1")).to_have_attribute("data-status", "healthy")
    await hosts_page.evaluate("window.stillTheSamePage = true")

    fake_agent.set("nginx.service", "unhealthy")
    item = check_item(host_page, "web server")
    await item.get_by_role("button", name="Test now").click()
    await expect(item.locator(".test-result")).to_have_text(re.compile(r"^Unhealthy \(\w+\): .*failed"))

    # The hosts page refreshes its region every 5 s without a page load.
    await expect(host_badge(hosts_page, "a-app-1")).to_have_attribute("data-status", "unhealthy", timeout=12_000)
    await expect(host_badge(hosts_page, "a-app-1")).to_have_text("unhealthy")
    assert await hosts_page.evaluate("window.stillTheSamePage") is True
    await expect(hosts_page.locator(".summary .status-unhealthy .count")).to_have_text("1")
    # And a plain reload of the host page agrees.
    await host_page.reload()
    await expect(host_page.locator("h1 [data-status]")).to_have_attribute("data-status", "unhealthy")
    assert script_problems(host_page) == [] and script_problems(hosts_page) == []

    # When the session ends (here: revoked with its token), the next refresh loads the sign-in page
    # instead of pasting it into the table; "Test now" says so in place.
    await db.execute("DELETE FROM dashboard_sessions")
    await hosts_page.wait_for_url(f"{api.base_url}/login?next=%2Fhosts", timeout=12_000)
    await item.get_by_role("button", name="Test now").click()
    await expect(item.locator(".test-result")).to_have_text("your session has ended; sign in again")


# ---- 4. refused what the role may not do -----------------------------------------------------------------------


async def test_each_role_is_refused_what_it_may_not_do(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    nginx: NginxServer,
) -> None:
    mine = await create_host(admin, "a-web-1", "team-a")
    # A failing check (404): the job on the host waits until someone overrides it. (A healthy one released it as soon
    # as the session's poller ran the check, within 5 s: on a busy machine, before the job's status is looked at.)
    check_id = await create_check(admin, mine, name="homepage", check_type="http", url=nginx.http_url("/no-such-path"))
    theirs = await create_host(admin, "b-web-1", "team-b")
    await insert_job(db, "patch-42", mine)
    # With an address: the one accepted below is run by the session's poller, which must not look up "a-web-1".
    new_check = {
        "name": "forged", "check_type": "tcp", "port": "22", "address": "127.0.0.1", "enabled": "on", "critical": "on"
    }  # fmt: skip
    base = api.base_url

    # A viewer sees the check but no control to change anything.
    viewer = await new_page(browser)
    await sign_in(viewer, base, await make_token("viewer", ("team-a",), name="viewer-1"))
    await viewer.goto(f"{base}/hosts/{mine}")
    await expect(check_item(viewer, "homepage")).to_be_visible()
    for hidden in (
        viewer.get_by_role("heading", name="Add a health check"),
        viewer.locator("form.check-form"),
        viewer.get_by_role("button", name="Test now"),
        viewer.get_by_text("Edit", exact=True),
        viewer.get_by_role("button", name="Delete"),
    ):
        await expect(hidden).to_have_count(0)
    await viewer.goto(f"{base}/jobs")
    await expect(viewer.locator('tr[data-job="patch-42"]')).to_be_visible()
    await expect(viewer.locator("form.override")).to_have_count(0)
    await expect(viewer.get_by_role("button", name="Override")).to_have_count(0)

    # ... and the server refuses the viewer's forged requests, even with the session's own CSRF token.
    csrf = await session_csrf(db, "viewer-1")
    for path, form in (
        (f"/hosts/{mine}/checks", new_check),
        (f"/hosts/{mine}/checks/{check_id}/test", {}),
        (f"/hosts/{mine}/checks/{check_id}/delete", {}),
        (f"/jobs/patch-42/hosts/{mine}/override", {"decision": "release", "reason": "forged"}),
    ):
        answer = await viewer.request.post(f"{base}{path}", form=form | {"csrf": csrf}, max_redirects=0)
        assert answer.status == 403, (path, answer.status)
        assert "a viewer may not" in await answer.text()
    assert await db.fetchval("SELECT count(*) FROM health_checks") == 1

    # An operator may edit checks but not override a job; without (or with a wrong) CSRF token, nothing.
    operator = await new_page(browser)
    await sign_in(operator, base, await make_token("operator", ("team-a",)))
    await operator.goto(f"{base}/hosts/{mine}")
    await expect(operator.get_by_role("button", name="Test now")).to_have_count(1)
    csrf = await operator.locator("input[name=csrf]").first.input_value()
    answer = await operator.request.post(
        f"{base}/jobs/patch-42/hosts/{mine}/override",
        form={"csrf": csrf, "decision": "release", "reason": "forged"},
        max_redirects=0,
    )
    assert answer.status == 403 and "an operator may not override a job" in await answer.text()
    await operator.goto(f"{base}/jobs")
    await expect(operator.locator("form.override")).to_have_count(0)
    for form in (new_check, new_check | {"csrf": "not-the-token"}, new_check | {"csrf": ""}):
        answer = await operator.request.post(f"{base}/hosts/{mine}/checks", form=form, max_redirects=0)
        assert answer.status == 403 and "stale or forged" in await answer.text()
    # "Test now" asks for JSON: its refusal comes as JSON too, for the page to show in place.
    answer = await operator.request.post(
        f"{base}/hosts/{mine}/checks/{check_id}/test", form={}, headers={"Accept": "application/json"}
    )
    assert answer.status == 403 and (await answer.json())["detail"] == "the form was stale or forged; reload the page"
    # The same body with the token is accepted, which shows the refusals above were for the token alone.
    answer = await operator.request.post(
        f"{base}/hosts/{mine}/checks", form=new_check | {"csrf": csrf}, max_redirects=0
    )
    assert answer.status == 303
    assert await db.fetchval("SELECT status FROM gate_jobs WHERE job_id = 'patch-42'") == "waiting_health_check"

    # A host outside the operator's groups does not exist for it, as in the API.
    response = await operator.goto(f"{base}/hosts/{theirs}")
    assert response is not None and response.status == 404
    await expect(operator.get_by_role("alert")).to_have_text("host not found")
    answer = await operator.request.post(f"{base}/hosts/{theirs}/checks", form=new_check | {"csrf": csrf})
    assert answer.status == 404
    assert script_problems(viewer) == [] and script_problems(operator) == []


# ---- 5. validation messages as the API gives them ---------------------------------------------------------------


async def page_errors(page: Page) -> dict[str, str]:
    errors = {}
    for paragraph in await add_form(page).locator("p.error[id]").all():
        field = (await paragraph.get_attribute("id") or "").removeprefix("new-").removesuffix("-error")
        errors[field] = await paragraph.inner_text()
    return errors


async def test_form_shows_the_apis_validation_messages(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    host_id = await create_host(admin, "a-web-1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    common = {"enabled": True, "critical": True, "failures_before_unhealthy": 1, "successes_before_healthy": 1}

    # A URL the browser accepts (type=url) but the API refuses, and a bad expected status.
    form = add_form(page)
    await form.get_by_label("Name", exact=True).fill("docs")
    await form.get_by_label("URL", exact=True).fill("ftp://files.example.net/health")
    await form.get_by_label("Expected status").fill("2xx,abc")
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await form.get_by_role("button", name="Add check").click()
    assert (await answer.value).status == 422
    api_answer = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json=common | {"name": "docs", "check_type": "http", "url": "ftp://files.example.net/health",
                       "method": "GET", "expected_status": "2xx,abc", "ignore_cert_errors": True,
                       "follow_redirects": False},
    )  # fmt: skip
    assert api_answer.status_code == 422
    api_errors = {error["field"]: error["message"] for error in api_answer.json()["errors"]}
    assert set(api_errors) == {"url", "expected_status"}
    assert await page_errors(page) == api_errors
    # The form keeps what was typed, marks the fields, and announces the problem.
    form = add_form(page)
    await expect(form.get_by_label("URL", exact=True)).to_have_value("ftp://files.example.net/health")
    await expect(form.get_by_label("URL", exact=True)).to_have_attribute("aria-invalid", "true")
    await expect(form.get_by_role("alert")).to_have_text("Please correct the fields marked below.")

    # A port out of range: the browser would stop it first (min/max), so submit as a browser without
    # constraint validation would, to show the server's own message.
    await form.get_by_label("Name", exact=True).fill("ssh")
    await form.get_by_label("Type").select_option("tcp")
    await form.get_by_label("Port").fill("70000")
    await form.evaluate("form => { form.noValidate = true; }")
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await form.get_by_role("button", name="Add check").click()
    assert (await answer.value).status == 422
    api_answer = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks", json=common | {"name": "ssh", "check_type": "tcp", "port": 70000}
    )
    api_errors = {error["field"]: error["message"] for error in api_answer.json()["errors"]}
    assert set(api_errors) == {"port"}
    assert await page_errors(page) == api_errors
    await expect(add_form(page).get_by_label("Port")).to_be_visible()  # the tcp fields stay shown
    assert (await admin.get(f"/api/v1/hosts/{host_id}/health-checks")).json()["items"] == []
    assert script_problems(page) == []


async def test_form_sets_changes_and_clears_max_latency(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    host_id = await create_host(admin, "a-web-1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    form = add_form(page)
    await form.get_by_label("Name", exact=True).fill("ssh")
    await form.get_by_label("Type").select_option("tcp")
    await form.get_by_label("Port").fill("22")
    await form.get_by_label("Address (default: the host's name)").fill("127.0.0.1")
    await form.get_by_label("Slower than (ms) is unhealthy").fill("250")
    await form.get_by_role("button", name="Add check").click()
    item = check_item(page, "ssh")
    await expect(item.locator(".target")).to_contain_text("unhealthy above 250 ms")
    checks_url = f"/api/v1/hosts/{host_id}/health-checks"
    (check,) = (await admin.get(checks_url)).json()["items"]
    assert check["max_latency_ms"] == 250

    # The edit form shows it, changes it, and an empty field clears it.
    for typed, stored in (("900", 900), ("", None)):
        await item.get_by_text("Edit", exact=True).click()
        field = item.get_by_label("Slower than (ms) is unhealthy")
        await expect(field).to_have_value(str(check["max_latency_ms"] or ""))
        await field.fill(typed)
        await item.get_by_role("button", name="Save changes").click()
        await expect(check_item(page, "ssh")).to_be_visible()
        check = (await admin.get(f"{checks_url}/{check['id']}")).json()
        assert check["max_latency_ms"] == stored
        item = check_item(page, "ssh")

    # Out of range: the API's message, shown by the field.
    form = add_form(page)
    await form.get_by_label("Name", exact=True).fill("web")
    await form.get_by_label("Type").select_option("tcp")
    await form.get_by_label("Port").fill("80")
    await form.get_by_label("Address (default: the host's name)").fill("127.0.0.1")
    await form.get_by_label("Slower than (ms) is unhealthy").fill("60001")
    await form.evaluate("form => { form.noValidate = true; }")
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await form.get_by_role("button", name="Add check").click()
    assert (await answer.value).status == 422
    assert await page_errors(page) == {"max_latency_ms": "Input should be less than or equal to 60000"}
    assert len((await admin.get(checks_url)).json()["items"]) == 1
    assert script_problems(page) == []


async def test_form_keeps_the_password_with_its_user_and_clearing_the_user_clears_it(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, nginx: NginxServer
) -> None:
    """The edit form leaves the password field empty: saved with the user it keeps the password; with the user
    field emptied it clears the password (the API refuses a PUT that drops the user of a stored password
    unless it says basic_auth_pass: null), never showing an error for it."""
    host_id = await create_host(admin, "a-web-1", "team-a")
    check_id = await create_check(
        admin, host_id, name="login", check_type="http", url=nginx.http_url("/basic"), interval_seconds=3600,
        basic_auth_user="monitor", basic_auth_pass="s3cret-pass",
    )  # fmt: skip
    check_url = f"/api/v1/hosts/{host_id}/health-checks/{check_id}"
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")

    for user, password_set in (("monitor", True), ("", False)):
        item = check_item(page, "login")
        await item.get_by_text("Edit", exact=True).click()
        await expect(item.get_by_label(re.compile("^Basic-auth password"))).to_have_value("")
        await item.get_by_label("Basic-auth user").fill(user)
        async with page.expect_response(lambda r: r.request.method == "POST") as answer:
            await item.get_by_role("button", name="Save changes").click()
        assert (await answer.value).status == 303
        await page.wait_for_url(f"{api.base_url}/hosts/{host_id}")
        check = (await admin.get(check_url)).json()
        assert (check["basic_auth_user"], check["basic_auth_pass_set"]) == (user or None, password_set)
    assert script_problems(page) == []


# ---- 5b. dns and grpc checks, conditions and certificates (issue 13) ---------------------------------------------


async def test_operator_adds_dns_and_grpc_checks_and_edits_the_dns_ones_answers(
    api: ServiceProcess, poller: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Each type shows its own fields: dns its name, record, server and expected answers; grpc the port and address
    it shares with tcp, its service, TLS and the certificate box it shares with http; every type max_latency_ms.
    The targets fail on purpose and stay on 127.0.0.1: a resolver on a closed port, a gRPC server that is not."""
    # Named by its address: whatever the poller does with these checks, it never looks the host's name up.
    host_id = await create_host(admin, "127.0.0.1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    checks_url = f"/api/v1/hosts/{host_id}/health-checks"

    with refused_port() as closed:
        form = add_form(page)
        await form.get_by_label("Name", exact=True).fill("resolver")
        await form.get_by_label("Type").select_option("dns")
        await expect(form.get_by_label("URL", exact=True)).to_be_hidden()
        await expect(form.get_by_label("Port")).to_be_hidden()
        await form.get_by_label("Name to look up").fill("db.example.internal")
        await form.get_by_label("DNS record").select_option("TXT")
        await expect(form.get_by_label("DNS server")).to_have_accessible_description(
            "an IP address, with :number for another port than 53; empty: the system resolver"
        )
        await form.get_by_label("DNS server").fill(f"127.0.0.1:{closed}")
        await form.get_by_label("Expected answers").fill("v=spf1 -all\n\n  second answer  \n")
        await form.get_by_label("Slower than (ms) is unhealthy").fill("800")
        await form.get_by_role("button", name="Add check").click()
        await expect(check_item(page, "resolver").locator(".target")).to_contain_text(
            f"DNS TXT db.example.internal via 127.0.0.1:{closed} expecting v=spf1 -all, second answer"
        )

        form = add_form(page)
        await form.get_by_label("Name", exact=True).fill("grpc")
        await form.get_by_label("Type").select_option("grpc")
        await expect(form.get_by_label("Name to look up")).to_be_hidden()
        await form.get_by_label("Port").fill(str(closed))
        await form.get_by_label("Address (default: the host's name)").fill("127.0.0.1")
        await form.get_by_label("Service to ask for").fill("healthgate.Probe")
        await form.get_by_label("Use TLS").check()
        await form.get_by_label("Ignore certificate errors").uncheck()
        await form.get_by_role("button", name="Add check").click()
        await expect(check_item(page, "grpc").locator(".target")).to_contain_text(
            f"gRPC health of “healthgate.Probe” at 127.0.0.1:{closed} over TLS"
        )

        checks = {check["name"]: check for check in (await admin.get(checks_url)).json()["items"]}
        assert {key: checks["resolver"][key] for key in ("dns_name", "record_type", "expected_values", "dns_server")} == {
            "dns_name": "db.example.internal", "record_type": "TXT",
            "expected_values": ["v=spf1 -all", "second answer"], "dns_server": f"127.0.0.1:{closed}",
        }  # fmt: skip
        assert checks["resolver"]["max_latency_ms"] == 800 and "port" not in checks["resolver"]
        grpc_fields = ("port", "address", "grpc_service", "tls", "ignore_cert_errors", "max_latency_ms")
        assert {key: checks["grpc"][key] for key in grpc_fields} == {
            "port": closed, "address": "127.0.0.1", "grpc_service": "healthgate.Probe", "tls": True,
            "ignore_cert_errors": False, "max_latency_ms": None,
        }  # fmt: skip

        # The edit form shows what is stored, one expected answer a line, and replaces them.
        item = check_item(page, "resolver")
        await item.get_by_text("Edit", exact=True).click()
        await expect(item.get_by_label("Expected answers")).to_have_value("v=spf1 -all\nsecond answer")
        await expect(item.get_by_label("DNS record")).to_have_value("TXT")
        await item.get_by_label("Expected answers").fill("third")
        await item.get_by_role("button", name="Save changes").click()
        await expect(check_item(page, "resolver").locator(".target")).to_contain_text("expecting third")
        stored = (await admin.get(f"{checks_url}/{checks['resolver']['id']}")).json()
        assert stored["expected_values"] == ["third"] and stored["dns_server"] == f"127.0.0.1:{closed}"
        item = check_item(page, "grpc")
        await item.get_by_text("Edit", exact=True).click()
        await expect(item.get_by_label("Use TLS")).to_be_checked()
        await expect(item.get_by_label("Ignore certificate errors")).not_to_be_checked()
        await expect(item.get_by_label("Port")).to_have_value(str(closed))
    assert script_problems(page) == []


async def test_host_page_writes_an_ipv6_address_with_its_port_in_brackets(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """ "::1:50051" would read as another IPv6 address (::0.1:0.50051); a page writes "[::1]:50051", as details do."""
    host_id = await create_host(admin, "::1", "team-a")
    await create_check(admin, host_id, name="grpc", check_type="grpc", port=50051, enabled=False)  # the host's name
    await create_check(admin, host_id, name="port", check_type="tcp", address="2001:db8::7", port=22, enabled=False)
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("viewer", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    await expect(check_item(page, "grpc").locator(".target")).to_contain_text(
        "gRPC health of the server at [::1]:50051"
    )
    await expect(check_item(page, "port").locator(".target")).to_contain_text("TCP [2001:db8::7]:22 ·")
    assert script_problems(page) == []


async def test_form_shows_the_apis_messages_for_conditions_and_certificate_limits(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """The http fields of issue 13 (condition, a textarea; min_cert_days) get the API's messages by the field, as
    every field does; the first field in error takes the focus, and each says why through its description."""
    host_id = await create_host(admin, "a-web-1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    form = add_form(page)
    await form.get_by_label("Name", exact=True).fill("ready")
    await form.get_by_label("URL", exact=True).fill("http://127.0.0.1:9/ready")
    # Longer than the 1000 characters the textarea takes: set as a script could, past the browser's own limit.
    condition = "json.ready == true && " * 50 + "true"
    await form.get_by_label("Condition (CEL)").evaluate("(area, text) => { area.value = text; }", condition)
    await form.get_by_label("Certificate valid for at least (days)").fill("30")  # https only
    await form.get_by_label("Ignore certificate errors").uncheck()
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await form.get_by_role("button", name="Add check").click()
    assert (await answer.value).status == 422
    api_answer = await admin.post(
        f"/api/v1/hosts/{host_id}/health-checks",
        json={"name": "ready", "check_type": "http", "url": "http://127.0.0.1:9/ready", "condition": condition,
              "min_cert_days": 30},
    )  # fmt: skip
    assert api_answer.status_code == 422
    api_errors = {error["field"]: error["message"] for error in api_answer.json()["errors"]}
    assert set(api_errors) == {"condition", "min_cert_days"}
    assert await page_errors(page) == api_errors
    form = add_form(page)
    field = form.get_by_label("Condition (CEL)")
    await expect(field).to_be_focused()
    await expect(field).to_have_value(condition)
    await expect(field).to_have_attribute("aria-invalid", "true")
    await expect(field).to_have_accessible_description(re.compile(re.escape(api_errors["condition"]) + "$"))
    await expect(form.get_by_label("Certificate valid for at least (days)")).to_have_accessible_description(
        re.compile(re.escape(api_errors["min_cert_days"]) + "$")
    )
    await expect(form.get_by_label("Ignore certificate errors")).not_to_be_checked()  # as it was sent, not the default
    assert (await admin.get(f"/api/v1/hosts/{host_id}/health-checks")).json()["items"] == []

    # A condition that does not compile: the API's message says where (line and column), by the field.
    await field.fill("status == 200 &&\n  json.ready ==")
    await form.get_by_label("Certificate valid for at least (days)").fill("")
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await form.get_by_role("button", name="Add check").click()
    assert (await answer.value).status == 422
    form = add_form(page)
    field = form.get_by_label("Condition (CEL)")
    await expect(field).to_be_focused()
    await expect(field).to_have_accessible_description(re.compile(r"does not compile: line 2, column \d+"))

    # Corrected, with a condition on several lines (sent by the browser with CRLF), it is stored as typed.
    await field.fill("status == 200 &&\n  json.ready == true")
    await form.get_by_label("Certificate valid for at least (days)").fill("")
    await form.get_by_role("button", name="Add check").click()
    item = check_item(page, "ready")
    await expect(item.locator("[data-condition]")).to_have_text("status == 200 &&\n  json.ready == true")
    (check,) = (await admin.get(f"/api/v1/hosts/{host_id}/health-checks")).json()["items"]
    assert (check["condition"], check["min_cert_days"]) == ("status == 200 &&\n  json.ready == true", None)
    assert check["ignore_cert_errors"] is False
    assert script_problems(page) == []


async def test_host_page_shows_uptime_certificate_end_and_readable_reasons(
    api: ServiceProcess,
    poller: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    nginx: NginxServer,
    fake_agent: FakeAgent,
) -> None:
    fake_agent.set("lazy.service", "slow=0.3")
    host_id = await create_host(admin, "a-web-1", "team-a", agent_url=fake_agent.base_url)
    https = await create_check(admin, host_id, name="tls endpoint", check_type="http", url=nginx.https_url("/ok"))
    await create_check(
        admin, host_id, name="lazy", check_type="service", service_name="lazy.service", max_latency_ms=100
    )
    idle = await create_check(
        admin, host_id, name="idle", check_type="http", url="https://127.0.0.1:9/ready", enabled=False
    )
    # The idle check's results, stored as a poller would have: 1 of 4 healthy in the last hour, three of them
    # failing for the reasons of issue 13, the last one with its certificate's end of validity.
    now = dt.datetime.now(dt.UTC)
    outcomes = [
        ("ok", "status 200 OK"), ("cert", "the certificate ends in 3 days, before the 30 required"),
        ("protocol", "sent an answer that is not valid HTTP"), ("condition", "condition json.ready == true is false"),
    ]  # fmt: skip
    records = [
        (uuid.uuid4(), uuid.UUID(idle), uuid.UUID(host_id), now - dt.timedelta(minutes=4 - index), reason == "ok",
         reason, "unhealthy", detail, 2.0)
        for index, (reason, detail) in enumerate(outcomes)
    ]  # fmt: skip
    await db.copy_records_to_table(
        "check_results",
        records=records,
        columns=["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"],
    )
    await db.execute(
        "INSERT INTO check_uptime_hours (check_id, hour, healthy, total) VALUES ($1, date_trunc('hour', now(), 'UTC'), 1, 4)",
        uuid.UUID(idle),
    )
    expires = (now + dt.timedelta(days=41, hours=3)).replace(microsecond=0)
    await db.execute(
        """
        UPDATE check_state SET status = 'unhealthy', last_healthy = false, last_reason = 'condition',
            last_detail = 'condition json.ready == true is false', last_latency_ms = 2, last_checked_at = now(),
            last_cert_expires_at = $2
        WHERE check_id = $1
        """,
        uuid.UUID(idle),
        expires,
    )
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("viewer", ("team-a",)))
    await page.goto(f"{api.base_url}/hosts/{host_id}")
    await wait_for_last_result(page, "tls endpoint", "healthy")
    lazy_text = await wait_for_last_result(page, "lazy", "unhealthy")

    # A slow success: the reason in words, and why.
    assert lazy_text.startswith("Last result: unhealthy (slow: answered, but too slowly) — took ")
    assert "more than the 100 ms allowed" in lazy_text
    await expect(check_item(page, "lazy").locator("[data-reason]")).to_have_attribute("data-reason", "slow")
    await expect(check_item(page, "lazy").locator("[data-uptime]")).to_have_text("Uptime (24 h): 0 %")

    # Every real result counts: the API and the page agree.
    assert (await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{https}")).json()["uptime_24h"] == 1.0
    await expect(check_item(page, "tls endpoint").locator("[data-uptime]")).to_have_text("Uptime (24 h): 100 %")
    await expect(check_item(page, "lazy").locator("[data-cert-expires]")).to_have_count(0)  # no TLS, no certificate

    # The seeded check: its uptime, its last result in words, its certificate's end of validity (as the API
    # reports it) and its history in words.
    idle_item = check_item(page, "idle")
    await expect(idle_item.locator("[data-uptime]")).to_have_text("Uptime (24 h): 25.0 %")
    await expect(idle_item.locator("[data-last-result]")).to_contain_text(
        "unhealthy (condition: the condition was not met) — condition json.ready == true is false"
    )
    checked = (await admin.get(f"/api/v1/hosts/{host_id}/health-checks/{idle}")).json()
    assert dt.datetime.fromisoformat(checked["last_result"]["cert_expires_at"]) == expires
    assert checked["uptime_24h"] == 0.25
    certificate = idle_item.locator("[data-cert-expires]")
    await expect(certificate).to_have_text(f"Certificate valid until {expires:%Y-%m-%d %H:%M} UTC (in 41 days)")
    assert dt.datetime.fromisoformat(await certificate.locator("time").get_attribute("datetime") or "") == expires
    titles = await idle_item.locator("svg.history rect title").all_text_contents()
    assert [title.split(": ", 1)[1].split(",")[0] for title in titles] == [
        "healthy",
        "unhealthy (cert: the certificate ends too soon)",
        "unhealthy (protocol: the answer broke the protocol)",
        "unhealthy (condition: the condition was not met)",
    ]
    assert script_problems(page) == []

    # At phone width nothing sticks out sideways, the operator's form with its new fields included.
    phone = await new_page(browser, PHONE, is_mobile=True, has_touch=True)
    await sign_in(phone, api.base_url, await make_token("operator", ("team-a",)))
    await phone.goto(f"{api.base_url}/hosts/{host_id}")
    await expect(check_item(phone, "idle").locator("[data-uptime]")).to_be_visible()
    for kind in ("http", "dns", "grpc"):
        await add_form(phone).get_by_label("Type").select_option(kind)
        assert await phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), kind
    assert script_problems(phone) == []


# ---- 6. admin override --------------------------------------------------------------------------------------------


async def test_admin_overrides_a_waiting_job(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    nginx: NginxServer,
) -> None:
    host_id = await create_host(admin, "a-db-1", "team-a")
    await create_check(admin, host_id, name="replication", check_type="http", url=nginx.http_url("/status/503"))
    await insert_job(db, "patch-2024-06-01", host_id, window=dt.timedelta(minutes=30))
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin", name="alice"))
    await page.get_by_role("link", name="Jobs").click()

    waiting = page.get_by_role("table", name="Waiting")
    row = waiting.locator('tr[data-job="patch-2024-06-01"]')
    await expect(row).to_contain_text("a-db-1")
    await expect(row).to_contain_text(re.compile(r"(29|30) min \d+ s left"))
    await expect(row).to_contain_text("replication")
    await row.get_by_label("Decision").select_option("release")
    await row.get_by_label("Reason").fill("replica checked by hand")
    await row.get_by_role("button", name="Override").click()
    await page.wait_for_url(f"{api.base_url}/jobs")

    await expect(waiting.locator("tr[data-job]")).to_have_count(0)
    decided = page.get_by_role("table", name="Decided").locator('tr[data-job="patch-2024-06-01"]')
    await expect(decided.locator("[data-status]")).to_have_attribute("data-status", "released")
    await expect(decided).to_contain_text("released by alice: replica checked by hand")
    stored = await db.fetchrow("SELECT status, overridden_by, override_reason FROM gate_jobs")
    assert dict(stored) == {
        "status": "released",
        "overridden_by": "alice",
        "override_reason": "replica checked by hand",
    }
    assert script_problems(page) == []


async def test_every_job_id_is_shown_linked_and_overridden(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    """Job ids with `/`, spaces, `#`, `?`, `%`, non-ASCII, one ending like an override path, one of 200
    characters: each row says its status in a word and links to the job's page, whose URL carries the id as
    one percent-encoded segment; both pages override it."""
    host_id = await create_host(admin, "a-db-1", "team-a")
    other = await create_host(admin, "a-db-2", "team-a")
    job_ids = [
        "deploy/2026/42",
        "a b",
        "x#y",
        "what?",
        "100%",
        "déploiement-ü-日本",
        f"x/hosts/{host_id}/override",
        "j" * 200,
    ]
    for job_id in job_ids:
        await insert_job(db, job_id, host_id)
    await insert_job(db, "done/1", other, status="failed", reason="window_closed", detail="closed")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin", name="alice"))
    await page.goto(f"{api.base_url}/jobs")

    waiting = page.get_by_role("table", name="Waiting")
    for job_id in job_ids:
        row = waiting.locator("tr[data-job]").filter(has=page.get_by_role("rowheader", name=job_id, exact=True))
        await expect(row.locator("[data-status]")).to_have_text("waiting")
        link = row.get_by_role("link", name=job_id, exact=True)
        await expect(link).to_have_attribute("href", "/jobs/" + quote(job_id, safe=""))
    decided = page.get_by_role("table", name="Decided").locator('tr[data-job="done/1"]')
    await expect(decided.locator("[data-status]")).to_have_text("failed")

    # Every link leads to its job's page, the URL as sent keeping the encoding.
    for job_id in job_ids:
        await page.goto(f"{api.base_url}/jobs")
        await page.get_by_role("link", name=job_id, exact=True).click()
        await page.wait_for_url(f"{api.base_url}/jobs/{quote(job_id, safe='')}")
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Job {job_id}")
        await expect(page.locator("[data-status]")).to_have_text(["waiting"])

    # Overridden from the job's page (back to it) and from the jobs page (back there).
    await page.goto(f"{api.base_url}/jobs/deploy%2F2026%2F42")
    await page.get_by_label("Decision").select_option("release")
    await page.get_by_label("Reason").fill("checked by hand")
    await page.get_by_role("button", name="Override").click()
    await page.wait_for_url(f"{api.base_url}/jobs/deploy%2F2026%2F42")
    await expect(page.locator("[data-status]")).to_have_text(["released"])
    tricky = f"x/hosts/{host_id}/override"
    await page.goto(f"{api.base_url}/jobs")
    row = waiting.locator("tr[data-job]").filter(has=page.get_by_role("rowheader", name=tricky, exact=True))
    await row.get_by_label("Decision").select_option("fail")
    await row.get_by_label("Reason").fill("bad disk")
    await row.get_by_role("button", name="Override").click()
    await page.wait_for_url(f"{api.base_url}/jobs")
    decided_row = (
        page.get_by_role("table", name="Decided")
        .locator("tr[data-job]")
        .filter(has=page.get_by_role("rowheader", name=tricky, exact=True))
    )
    await expect(decided_row.locator("[data-status]")).to_have_text("failed")
    stored = dict(await db.fetch("SELECT job_id, status FROM gate_jobs WHERE host_id = $1", uuid.UUID(host_id)))
    assert stored == dict.fromkeys(job_ids, "waiting_health_check") | {
        "deploy/2026/42": "released",
        tricky: "failed",
    }

    # Signed out, a job's page sends to the sign-in page and back to the same encoded URL.
    fresh = await new_page(browser)
    await fresh.goto(f"{api.base_url}/jobs/100%25")
    await fresh.get_by_label("API token").fill(await make_token("viewer", ("team-a",)))
    await fresh.get_by_role("button", name="Sign in").click()
    await fresh.wait_for_url(f"{api.base_url}/jobs/100%25")
    await expect(fresh.get_by_role("heading", level=1)).to_have_text("Job 100%")
    await expect(fresh.locator("form.override")).to_have_count(0)  # a viewer sees, never overrides
    # A job of no host in the viewer's groups does not exist for it.
    response = await fresh.goto(f"{api.base_url}/jobs/nope%2Fnothing")
    assert response is not None and response.status == 404
    assert script_problems(page) == [] and script_problems(fresh) == []


async def test_dot_job_ids_have_pages_links_overrides_and_a_sign_in_return(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
) -> None:
    """Job ids `.` and `..`: a browser resolves `/jobs/%2E%2E` to `/` (WHATWG URL), so their pages are at
    `/jobs?job_id=..`: linked from the jobs page, overridden from both pages (each form reaching its own job and
    host, no other), and the sign-in page leads back there. `...` is no dot-segment: a path like any other."""
    host_id = await create_host(admin, "a-db-1", "team-a")
    other = await create_host(admin, "a-db-2", "team-a")
    for job_id in (".", ".."):
        await insert_job(db, job_id, host_id)
        await insert_job(db, job_id, other)
    await insert_job(db, "...", host_id)
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin", name="alice"))
    addresses = {".": "/jobs?job_id=.", "..": "/jobs?job_id=..", "...": "/jobs/..."}

    waiting = page.get_by_role("table", name="Waiting")
    for job_id, address in addresses.items():
        await page.goto(f"{api.base_url}/jobs")
        rows = waiting.locator(f'tr[data-job="{job_id}"]')
        await expect(rows).to_have_count(1 if job_id == "..." else 2)
        await expect(rows.locator("form.override")).to_have_count(1 if job_id == "..." else 2)
        for index in range(await rows.count()):
            link = rows.nth(index).get_by_role("link", name=job_id, exact=True)
            await expect(link).to_have_attribute("href", address)
        await expect(page.get_by_text("override it with the API")).to_have_count(0)
        await rows.first.get_by_role("link", name=job_id, exact=True).click()
        await page.wait_for_url(lambda url, address=address: url == api.base_url + address)
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Job {job_id}")
        statuses = ["waiting"] if job_id == "..." else ["waiting", "waiting"]
        await expect(page.locator("[data-status]")).to_have_text(statuses)

    # From the job page of "..": back to that page, one host released, nothing else touched.
    await page.goto(f"{api.base_url}/jobs?job_id=..")
    row = page.locator(f'tr[data-host-id="{host_id}"]')
    await row.get_by_label("Decision").select_option("release")
    await row.get_by_label("Reason").fill("checked by hand")
    await row.get_by_role("button", name="Override").click()
    await page.wait_for_url(lambda url: url == f"{api.base_url}/jobs?job_id=..")
    await expect(page.locator(f'tr[data-host-id="{host_id}"] [data-status]')).to_have_text("released")
    await expect(page.locator(f'tr[data-host-id="{other}"] [data-status]')).to_have_text("waiting")

    # From the jobs page, the "." row of a-db-2: back to the jobs page.
    await page.goto(f"{api.base_url}/jobs")
    row = waiting.locator('tr[data-job="."]').filter(has_text="a-db-2")
    await row.get_by_label("Decision").select_option("fail")
    await row.get_by_label("Reason").fill("bad disk")
    await row.get_by_role("button", name="Override").click()
    await page.wait_for_url(f"{api.base_url}/jobs")
    decided = page.get_by_role("table", name="Decided").locator('tr[data-job="."]')
    await expect(decided.locator("[data-status]")).to_have_text("failed")
    await expect(decided.get_by_role("link", name=".", exact=True)).to_have_attribute("href", "/jobs?job_id=.")

    rows = await db.fetch("SELECT job_id, host_id, status, overridden_by FROM gate_jobs")
    assert {(row["job_id"], str(row["host_id"])): (row["status"], row["overridden_by"]) for row in rows} == {
        (".", host_id): ("waiting_health_check", None),
        (".", other): ("failed", "alice"),
        ("..", host_id): ("released", "alice"),
        ("..", other): ("waiting_health_check", None),
        ("...", host_id): ("waiting_health_check", None),
    }

    # Signed out, each page sends to the sign-in page and back to itself.
    viewer_token = await make_token("viewer", ("team-a",))
    for job_id in (".", ".."):
        fresh = await new_page(browser)
        await fresh.goto(f"{api.base_url}{addresses[job_id]}")
        await fresh.get_by_label("API token").fill(viewer_token)
        await fresh.get_by_role("button", name="Sign in").click()
        await fresh.wait_for_url(lambda url, job_id=job_id: url == api.base_url + addresses[job_id])
        await expect(fresh.get_by_role("heading", level=1)).to_have_text(f"Job {job_id}")
        await expect(fresh.locator("form.override")).to_have_count(0)  # a viewer sees, never overrides
        assert script_problems(fresh) == []

    # The query names one existing job, or the answer is 404.
    for query in ("job_id=", "job_id=nope", "job_id=.&job_id=..", "job_id=" + "j" * 201):
        response = await page.goto(f"{api.base_url}/jobs?{query}")
        assert response is not None and response.status == 404, query
    assert script_problems(page) == []


# ---- 6b. patch campaigns: groups and a job's hosts by status (CONTRACT §3 "Dashboard", §6) ---------------------


async def test_groups_page_shows_hosts_by_state_policy_budget_and_who_holds_it(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    web = [await create_host(admin, f"web-{index}", "team-a") for index in range(1, 6)]
    await create_host(admin, "b-web-1", "team-b")
    assert (await admin.put("/api/v1/groups/team-a/policy", json={"max_unavailable": "40%"})).status_code == 200
    assert (await admin.put("/api/v1/groups/team-c/policy", json={"stable_seconds": 60})).status_code == 200
    await insert_job(db, "patch/7", web[0], status="released")
    await insert_job(db, "patch/7", web[1], status="verifying")
    await insert_job(db, "patch/7", web[2], status="waiting_health_check")
    await db.execute("UPDATE hosts SET health_check_status = 'unhealthy' WHERE id = $1", uuid.UUID(web[3]))

    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("viewer", ("team-a", "team-c")))
    await page.get_by_role("link", name="Groups").click()
    await page.wait_for_url(f"{api.base_url}/groups")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Groups")
    sections = page.locator("section[data-group]")
    await expect(sections).to_have_count(2)  # team-b is not the viewer's
    team_a = page.locator('section[data-group="team-a"]')
    await expect(team_a.locator('[data-count="total"] .count')).to_have_text("5")
    await expect(team_a.locator('[data-count="unhealthy"] .count')).to_have_text("1")
    await expect(team_a.locator('[data-count="no_checks"] .count')).to_have_text("4")
    await expect(team_a.locator('[data-count="in_maintenance"] .count')).to_have_text("2")
    # 40% of 5 hosts is 2; web-1 and web-2 are in patch and web-4 is unhealthy: 3 of 2.
    budget = " ".join((await team_a.locator("[data-budget]").inner_text()).split())
    assert budget == "Disruption budget: 3 of 2 in use (40% of 5 hosts) — over the limit", budget
    holders = team_a.locator("[data-holder]")
    await expect(holders).to_have_text(
        ["web-1 (job patch/7 patching)", "web-2 (job patch/7 patching)", "web-4 (unhealthy)"]
    )
    await expect(holders.first.get_by_role("link", name="patch/7")).to_have_attribute("href", "/jobs/patch%2F7")
    await team_a.get_by_text("Policy").click()
    await expect(team_a.locator('[data-field="max_unavailable"]')).to_have_text("40%")
    team_c = page.locator('section[data-group="team-c"]')
    await expect(team_c.locator('[data-count="total"] .count')).to_have_text("0")
    await expect(team_c.locator("[data-budget]")).to_contain_text("0 unavailable, no limit")
    await team_c.get_by_text("Policy").click()
    await expect(team_c.locator('[data-field="stable_seconds"]')).to_have_text("60 s")

    # A state's count leads to the hosts page, filtered by the group and the state.
    await team_a.locator('[data-count="unhealthy"] a').click()
    await page.wait_for_url(re.compile(r"/hosts\?group=team-a&status=unhealthy$"))
    assert await listed_hosts(page) == ["web-4"]
    await page.goto(f"{api.base_url}/hosts")
    await expect(page.locator('tr[data-host="web-1"] [data-maintenance]')).to_have_text("in maintenance")
    await expect(page.locator('tr[data-host="web-3"] [data-maintenance]')).to_have_count(0)
    await page.goto(f"{api.base_url}/hosts/{web[0]}")
    await expect(page.locator("[data-maintenance]")).to_have_text("In maintenance: job patch/7 is patching this host.")
    assert script_problems(page) == []


def preview_row(page: Page, name: str) -> Locator:
    return page.locator(f'section[data-preview] tr[data-preview-host="{name}"]')


async def test_operator_selects_hosts_and_sees_the_gates_preview_for_them(
    api: ServiceProcess, poller: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection,
    nginx: NginxServer,
) -> None:  # fmt: skip
    """CONTRACT §6 "Preview": the hosts page's checkboxes and the verdicts of `POST /api/v1/gate/preview` for the
    selected hosts (the same code), in the table's order, each with its detail; nothing is created."""
    web = [await create_host(admin, f"web-{index}", "team-a") for index in range(1, 5)]
    await create_host(admin, "b-web-1", "team-b")
    check_id = await create_check(admin, web[3], name="homepage", check_type="http", url=nginx.http_url("/status/503"))
    assert (await admin.post(f"/api/v1/hosts/{web[3]}/health-checks/{check_id}/test")).status_code == 200
    assert (await admin.put("/api/v1/groups/team-a/policy", json={"max_unavailable": 2})).status_code == 200

    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",), name="operator-preview"))
    await expect(page.get_by_label("Select b-web-1")).to_have_count(0)  # not the operator's
    for index in range(1, 5):
        await page.get_by_label(f"Select web-{index}").check()
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_role("button", name="Preview selected hosts").click()
    assert (await answer.value).status == 200
    section = page.get_by_role("region", name="Preview of a job.start")
    await expect(section.locator("tr[data-preview-host]")).to_have_count(4)
    verdicts = [await preview_row(page, f"web-{index}").locator("[data-verdict]").get_attribute("data-verdict")
                for index in range(1, 5)]  # fmt: skip
    # web-4 is unhealthy and holds one unit of the budget of 2: web-1 takes the other, web-2 and web-3 wait.
    assert verdicts == ["release", "wait", "wait", "wait"]
    await expect(preview_row(page, "web-1").locator("[data-detail]")).to_have_text(
        "no gating checks on this host; disruption budget of group team-a: 2 of 2 unavailable with this host"
    )
    for name in ("web-2", "web-3"):
        await expect(preview_row(page, name).locator("[data-waiting-for]")).to_have_attribute(
            "data-waiting-for", "budget"
        )
        await expect(preview_row(page, name).locator("[data-detail]")).to_have_text(
            "waiting for the disruption budget of group team-a: 2 of 2 unavailable: "
            "web-1 (released earlier in this preview), web-4 (unhealthy)"
        )
    sick = preview_row(page, "web-4")
    await expect(sick.locator("[data-waiting-for]")).to_have_attribute("data-waiting-for", "checks")
    await expect(sick.locator("[data-waiting-for]")).to_contain_text("its gating checks to be healthy")
    await expect(sick.locator("[data-detail]")).to_have_text("waiting for checks: homepage")
    await expect(sick.locator(".preview-checks")).to_contain_text("homepage: unhealthy")
    # The selection stays, also when the table refreshes itself (every 5 s) under it.
    await page.locator("#hosts-region input[name=host_id]").first.evaluate("box => box.dataset.old = '1'")
    async with page.expect_response(lambda r: "fragment=1" in r.url, timeout=15_000):
        pass
    await expect(page.locator("#hosts-region input[data-old]")).to_have_count(0)
    for index in range(1, 5):
        await expect(page.get_by_label(f"Select web-{index}")).to_be_checked()
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 0

    # Nothing selected: the page says so. Without the session's CSRF token: refused.
    for index in range(1, 5):
        await page.get_by_label(f"Select web-{index}").uncheck()
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_role("button", name="Preview selected hosts").click()
    assert (await answer.value).status == 422
    await expect(page.get_by_role("alert")).to_have_text("No preview: select 1 to 1000 hosts, each once.")
    await expect(page.locator("section[data-preview]")).to_have_count(0)
    forged = await page.request.post(f"{api.base_url}/hosts/preview", form={"host_id": web[0]}, max_redirects=0)
    assert forged.status == 403
    csrf = await session_csrf(db, "operator-preview")
    answer_page = await page.request.post(
        f"{api.base_url}/hosts/preview?group=team-a", form={"host_id": web[0], "csrf": csrf}, max_redirects=0
    )
    assert answer_page.status == 200 and 'data-verdict="release"' in await answer_page.text()
    assert script_problems(page) == []


async def test_the_preview_form_takes_a_selection_of_1000_hosts(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    """The API takes 1 to 1000 hosts, and so does the form (1000 host_id fields and its csrf: more fields than a
    form parser's default of 1000, which answered 400 "Too many fields"); more than 1000 is the page's 422."""
    host_id = await create_host(admin, "web-1", "team-a")
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("operator", ("team-a",), name="operator-many"))
    csrf = await session_csrf(db, "operator-many")
    for count, status in ((1000, 200), (1001, 422)):
        others = [("host_id", str(uuid.uuid4())) for _ in range(count - 1)]
        answer = await page.request.post(
            f"{api.base_url}/hosts/preview", data=urlencode([("csrf", csrf), ("host_id", host_id), *others]),
            headers={"Content-Type": "application/x-www-form-urlencoded"}, max_redirects=0,
        )  # fmt: skip
        assert answer.status == status, (count, await answer.text())
        if status == 200:
            assert 'data-verdict="release"' in await answer.text()
        else:
            assert "No preview: select 1 to 1000 hosts, each once" in await answer.text()


STATUS_HEADINGS = {
    "waiting_health_check": "Waiting",
    "released": "Released",
    "verifying": "Verifying",
    "verified": "Verified",
    "verification_failed": "Verification failed",
    "failed": "Failed",
}


async def test_job_page_groups_hosts_by_status_with_what_each_waits_for(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    statuses = ["waiting_health_check", "released", "verifying", "verified", "verification_failed", "failed"]
    hosts = {status: await create_host(admin, f"h-{status}", "team-a") for status in statuses}
    waiting_too = await create_host(admin, "h-waiting-2", "team-a")
    for status, host_id in hosts.items():
        await insert_job(db, "wave", host_id, status=status, reason="window_closed" if status == "failed" else None)
    await insert_job(db, "wave", waiting_too)
    # The budget of team-a full (2 of 2: the released and the verifying host), as the rows say: else the session's
    # gate, sweeping the groups with job hosts waiting for a budget, would release the budget waiter (its group
    # has no budget) while the page loads.
    await put_policy(db, "team-a", GroupPolicy(max_unavailable=2))
    await db.execute(
        "UPDATE gate_jobs SET waiting_for = $2, detail = $3 WHERE host_id = $1",
        uuid.UUID(hosts["waiting_health_check"]),
        ["budget"],
        "disruption budget of group team-a: 2 of 2 unavailable",
    )
    await db.execute(
        "UPDATE gate_jobs SET waiting_for = $2 WHERE host_id = $1", uuid.UUID(waiting_too), ["checks", "stability"]
    )
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin"))
    await page.goto(f"{api.base_url}/jobs/wave")
    await expect(page.get_by_role("heading", level=2)).to_have_text(
        ["Waiting (2)", "Released (1)", "Verifying (1)", "Verified (1)", "Verification failed (1)", "Failed (1)"]
    )
    # Each host in the table of its status, named by its heading.
    for status, host_id in hosts.items():
        table = page.get_by_role("table", name=re.compile(f"^{STATUS_HEADINGS[status]} \\("))
        row = table.locator(f'tr[data-host-id="{host_id}"]')
        await expect(row.locator("[data-status]")).to_have_attribute("data-status", status)
    waiting = page.get_by_role("table", name="Waiting (2)")
    budget_row = waiting.locator(f'tr[data-host-id="{hosts["waiting_health_check"]}"]')
    await expect(budget_row.locator("[data-waiting-for]")).to_have_attribute("data-waiting-for", "budget")
    await expect(budget_row.locator("[data-waiting-for]")).to_contain_text("the group's disruption budget")
    await expect(budget_row.locator("[data-waiting-for]")).to_contain_text("2 of 2 unavailable")
    checks_row = waiting.locator(f'tr[data-host-id="{waiting_too}"]')
    await expect(checks_row.locator("[data-waiting-for]")).to_have_attribute("data-waiting-for", "checks stability")
    await expect(checks_row.locator(".waiting-for li")).to_have_count(2)
    await expect(waiting.locator("form.override")).to_have_count(2)  # only waiting job hosts can be overridden
    await expect(page.locator("form.override")).to_have_count(2)
    assert script_problems(page) == []


def halt_state(page: Page) -> Locator:
    return page.get_by_role("region", name="Halt state")


async def halt_or_resume(page: Page, action: str, why: str) -> int:
    """Fill the job page's halt or resume form and send it; the answer's status."""
    await page.get_by_label(f"Why {action} this job").fill(why)
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_role("button", name=f"{action.capitalize()} job").click()
    return (await answer.value).status


async def test_admin_halts_and_resumes_a_job_from_its_page(
    api: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    events: EventCapture,
) -> None:
    """CONTRACT §3 "Dashboard", §6 "Halting a job": the job page shows the halt state; an admin halts the job
    (its waiting host fails job_halted; the same audit entry and events as the API's, `by` the token's name)
    and resumes it; a stale form answers 409 with a clear message; job ids with `/`, spaces, `#`, `?`, `%` and
    non-ASCII (a path segment) and `..` (in the query) work."""
    job_id = "deploy/2026 #1?100%-日本"
    waiting = await create_host(admin, "a-db-1", "team-a")
    broken = await create_host(admin, "a-db-2", "team-a")
    await insert_job(db, job_id, waiting)
    await insert_job(db, job_id, broken, status="verification_failed", detail="replication: down")
    await db.execute("INSERT INTO jobs (job_id, max_failed_hosts) VALUES ($1, 2)", job_id)
    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin", name="alice"))
    address = f"{api.base_url}/jobs/{quote(job_id, safe='')}"
    await page.goto(address)
    state = halt_state(page)
    await expect(state).to_have_attribute("data-halted", "false")
    await expect(state).to_contain_text("Not halted")
    await expect(state.locator("[data-failed-hosts]")).to_have_attribute("data-failed-hosts", "1")
    await expect(state.locator("[data-failed-hosts]")).to_contain_text("it halts when more than 2 fail")
    await expect(state.get_by_role("button", name="Resume job")).to_have_count(0)
    # A second tab on the same page, its halt form sent after the halt: 409, said in words.
    stale = watch(await page.context.new_page())
    await stale.goto(address)

    assert await halt_or_resume(page, "halt", "bad kernel") == 303
    await page.wait_for_url(address)
    await expect(state).to_have_attribute("data-halted", "true")
    await expect(state.locator("[data-halt-reason]")).to_have_attribute("data-halt-reason", "manual")
    await expect(state).to_contain_text("Halted")
    await expect(state).to_contain_text("halted by hand by alice: bad kernel")
    failed = page.get_by_role("table", name="Failed (1)").locator(f'tr[data-host-id="{waiting}"]')
    await expect(failed.locator("[data-status]")).to_have_attribute("data-status", "failed")
    await expect(failed).to_contain_text("job_halted")
    await expect(page.get_by_role("heading", level=2)).to_have_text(["Verification failed (1)", "Failed (1)"])
    await expect(state.get_by_role("button", name="Halt job")).to_have_count(0)
    stored = await db.fetchrow("SELECT status, reason FROM gate_jobs WHERE host_id = $1", uuid.UUID(waiting))
    assert dict(stored) == {"status": "failed", "reason": "job_halted"}
    (halted,) = await events.wait_for("job.halted", lambda event: event.data["job_id"] == job_id)
    assert halted.data["reason"] == "manual" and halted.data["by"] == "alice" and halted.data["detail"] == "bad kernel"
    assert halted.data["failed_hosts"] == [broken]
    (stopped,) = await events.wait_for("job.failed", lambda event: event.data["host_id"] == waiting)
    assert stopped.data["reason"] == "job_halted" and "bad kernel" in str(stopped.data["detail"])

    assert await halt_or_resume(stale, "halt", "bad kernel too") == 409
    await expect(stale.get_by_role("alert")).to_have_text("The job was not halted: this job is already halted.")
    await expect(halt_state(stale)).to_have_attribute("data-halted", "true")  # the page as it is now
    await expect(halt_state(stale).get_by_role("button", name="Resume job")).to_be_visible()

    assert await halt_or_resume(page, "resume", "fixed image") == 303
    await page.wait_for_url(address)
    await expect(state).to_have_attribute("data-halted", "false")
    await expect(failed.locator("[data-status]")).to_have_attribute("data-status", "failed")  # stays failed
    (resumed,) = await events.wait_for("job.resumed", lambda event: event.data["job_id"] == job_id)
    assert resumed.data["by"] == "alice" and resumed.data["detail"] == "fixed image"
    # The stale tab, which the 409 left showing the resume form, resumes too late: not halted, 409.
    assert await halt_or_resume(stale, "resume", "fixed image too") == 409
    await expect(stale.get_by_role("alert")).to_have_text("The job was not resumed: this job is not halted.")
    await expect(halt_state(stale)).to_have_attribute("data-halted", "false")

    # A reason of spaces (past the browser's own check) is refused with the page and a message.
    csrf = await page.locator("input[name=csrf]").first.input_value()
    answer = await page.request.post(f"{address}/halt", form={"csrf": csrf, "reason": "   "}, max_redirects=0)
    assert answer.status == 422 and "give a reason of 1 to 500 characters" in await answer.text()

    audit = await db.fetch(
        "SELECT actor, action, entity_id, changes->'failed_waiting_hosts' AS failed_waiting FROM audit_log"
        " WHERE action LIKE 'job.%' ORDER BY id"
    )
    assert [(row["actor"], row["action"], row["entity_id"]) for row in audit] == [
        ("alice", "job.halt", job_id),
        ("alice", "job.resume", job_id),
    ]
    assert json.loads(audit[0]["failed_waiting"]) == [waiting]

    # `..`: the page at /jobs?job_id=.., its forms posting to /jobs/halt?job_id=.. and /jobs/resume?job_id=..
    await insert_job(db, "..", waiting)
    await page.goto(f"{api.base_url}/jobs?job_id=..")
    assert await halt_or_resume(page, "halt", "dots") == 303
    await page.wait_for_url(lambda url: url == f"{api.base_url}/jobs?job_id=..")
    await expect(state).to_have_attribute("data-halted", "true")
    await expect(page.locator(f'tr[data-host-id="{waiting}"] [data-status]')).to_have_text("failed")
    assert await halt_or_resume(page, "resume", "dots again") == 303
    await page.wait_for_url(lambda url: url == f"{api.base_url}/jobs?job_id=..")
    await expect(state).to_have_attribute("data-halted", "false")
    halts = await db.fetch("SELECT job_id, halt_count, halted_at FROM jobs ORDER BY job_id")
    assert [(row["job_id"], row["halt_count"], row["halted_at"]) for row in halts] == [
        ("..", 1, None),
        (job_id, 1, None),
    ]
    assert script_problems(page) == [] and script_problems(stale) == []


async def test_operator_sees_the_halt_state_but_no_form_and_may_not_halt(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, db: asyncpg.Connection
) -> None:
    mine = await create_host(admin, "a-db-1", "team-a")
    theirs = await create_host(admin, "b-db-1", "team-b")
    await insert_job(db, "patch/9", mine)
    await insert_job(db, "patch/9", theirs, status="verification_failed")
    await db.execute(
        "INSERT INTO jobs (job_id, max_failed_hosts, halted_at, halt_reason, halt_count)"
        " VALUES ('patch/9', 0, now(), 'max_failed_hosts', 1)"
    )
    operator = await new_page(browser)
    await sign_in(operator, api.base_url, await make_token("operator", ("team-a",), name="olga"))
    await operator.goto(f"{api.base_url}/jobs/patch%2F9")
    state = halt_state(operator)
    await expect(state).to_have_attribute("data-halted", "true")
    await expect(state.locator("[data-halt-reason]")).to_have_attribute("data-halt-reason", "max_failed_hosts")
    await expect(state).to_contain_text("more hosts failed than its max_failed_hosts allows")
    # The failed host of team-b is not the operator's: counted among its groups' hosts only.
    await expect(state.locator("[data-failed-hosts]")).to_have_attribute("data-failed-hosts", "0")
    await expect(state.locator("[data-failed-hosts]")).to_contain_text("Failed hosts in your groups: 0")
    await expect(operator.locator("form.halt-form")).to_have_count(0)
    await expect(operator.get_by_role("button", name=re.compile("^(Halt|Resume) job$"))).to_have_count(0)

    # Posted anyway, with the session's own CSRF token: 403, and nothing changes.
    csrf = await session_csrf(db, "olga")
    for path in ("/jobs/patch%2F9/resume", "/jobs/patch%2F9/halt", "/jobs/resume?job_id=patch%2F9"):
        answer = await operator.request.post(
            f"{api.base_url}{path}", form={"csrf": csrf, "reason": "forged"}, max_redirects=0
        )
        assert answer.status == 403, (path, answer.status)
        assert "an operator may not" in await answer.text()
    # An admin's form without the CSRF token: refused too.
    admin_page = await new_page(browser)
    await sign_in(admin_page, api.base_url, await make_token("admin"))
    answer = await admin_page.request.post(
        f"{api.base_url}/jobs/patch%2F9/resume", form={"reason": "forged"}, max_redirects=0
    )
    assert answer.status == 403 and "stale or forged" in await answer.text()
    assert await db.fetchval("SELECT halted_at IS NOT NULL FROM jobs WHERE job_id = 'patch/9'") is True
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action LIKE 'job.%'") == 0
    # A job with no host in the admin's view does not exist.
    answer = await admin_page.request.post(
        f"{api.base_url}/jobs/nope%2Fnothing/halt",
        form={"csrf": await admin_page.locator("input[name=csrf]").first.input_value(), "reason": "why"},
        max_redirects=0,
    )
    assert answer.status == 404
    assert script_problems(operator) == []


# ---- 7. screenshots -----------------------------------------------------------------------------------------------


async def insert_history(
    db: asyncpg.Connection, host_id: str, check_id: str, failures: set[int], base_ms: float
) -> None:
    """36 results a minute apart before the real ones, some failing, with a plausible latency wobble."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for index in range(36):
        healthy = index not in failures
        latency = base_ms + (index * 7 % 11) * 1.7 + (index % 5) * 2.3 if healthy else base_ms * 3.2
        rows.append(
            (
                uuid.uuid4(),
                uuid.UUID(check_id),
                uuid.UUID(host_id),
                now - dt.timedelta(minutes=37 - index),
                healthy,
                "ok" if healthy else "status",
                "healthy" if healthy or index - 1 not in failures else "unhealthy",
                "status 200" if healthy else "status 503, expected 2xx",
                latency,
            )
        )
    await db.copy_records_to_table(
        "check_results",
        records=rows,
        columns=["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"],
    )
    # Counted in the check's uptime as a poller counts its results (shared/uptime.py), so that the page's figure
    # agrees with its squares.
    await db.execute(
        """
        INSERT INTO check_uptime_hours AS u (check_id, hour, healthy, total)
        SELECT $1, date_trunc('hour', at, 'UTC'), count(*) FILTER (WHERE ok), count(*)
        FROM unnest($2::timestamptz[], $3::bool[]) AS r(at, ok) GROUP BY 2
        ON CONFLICT (check_id, hour) DO UPDATE SET healthy = u.healthy + EXCLUDED.healthy, total = u.total + EXCLUDED.total
        """,
        uuid.UUID(check_id),
        [row[3] for row in rows],
        [row[4] for row in rows],
    )


async def wait_for_statuses(
    db: asyncpg.Connection, expected: dict[str, str], pending: int, timeout: float = 15
) -> None:
    """Until the hosts have these statuses and all but `pending` checks have a result."""
    seen: tuple[dict[str, str], list[str]] = ({}, [])
    try:
        async with asyncio.timeout(timeout):
            while True:
                rows = await db.fetch("SELECT name, health_check_status FROM hosts")
                waiting = await db.fetch(
                    "SELECT c.name FROM check_state s JOIN health_checks c ON c.id = s.check_id"
                    " WHERE s.last_checked_at IS NULL"
                )
                seen = ({row["name"]: row["health_check_status"] for row in rows}, [row["name"] for row in waiting])
                if seen[0] == expected and len(seen[1]) == pending:
                    return
                await asyncio.sleep(0.3)
    except TimeoutError:
        pytest.fail(f"after {timeout} s: host statuses {seen[0]}, checks without a result {seen[1]}")


async def test_admin_sees_notification_channels_and_sends_a_test(
    api: ServiceProcess, browser: Browser, admin: httpx.AsyncClient, make_token: TokenFactory, receiver: Receiver
) -> None:
    slack_url = "https://hooks.slack.com/services/T000/B000/" + "t" * 24
    receiver.answers = [204]
    created = await admin.post(
        "/api/v1/notification-channels",
        json={"name": "ops", "type": "webhook", "url": receiver.url, "groups": ["web"], "events": ["job.failed"]},
    )
    assert created.status_code == 201, created.text
    slack = await admin.post(
        "/api/v1/notification-channels",
        json={"name": "team-slack", "type": "slack", "url": slack_url, "enabled": False},
    )
    assert slack.status_code == 201, slack.text

    page = await new_page(browser)
    await sign_in(page, api.base_url, await make_token("admin"))
    await page.get_by_role("link", name="Notifications").click()
    await page.wait_for_url(f"{api.base_url}/notifications")
    ops = page.locator('section[data-channel="ops"]')
    await expect(ops.locator('[data-field="url"]')).to_have_text(receiver.url)
    await expect(ops.locator('[data-field="events"]')).to_have_text("job.failed")
    await expect(ops.locator('[data-field="groups"]')).to_have_text("web")
    team = page.locator('section[data-channel="team-slack"]')
    await expect(team.locator('[data-field="url"]')).to_have_text("https://hooks.slack.com/…")
    await expect(team.locator('[data-field="enabled"]')).to_have_text("no")
    await expect(ops.locator("[data-no-deliveries]")).to_be_visible()

    await ops.get_by_role("button", name="Send test").click()
    await expect(ops.locator("[data-test-result]")).to_have_text("Delivered (204): delivered: 204")
    assert len(receiver.requests) == 1
    await page.reload()
    await expect(ops.locator("tr[data-delivery] [data-delivery-status]")).to_have_text(["delivered"])
    assert "t" * 24 not in await page.content()
    assert script_problems(page) == []

    operator = await new_page(browser)
    await sign_in(operator, api.base_url, await make_token("operator", ("web",)))
    await expect(operator.get_by_role("link", name="Notifications")).to_have_count(0)
    response = await operator.goto(f"{api.base_url}/notifications")
    assert response is not None and response.status == 403


async def test_screenshots_of_each_page(
    api: ServiceProcess,
    poller: ServiceProcess,
    browser: Browser,
    admin: httpx.AsyncClient,
    make_token: TokenFactory,
    db: asyncpg.Connection,
    nginx: NginxServer,
    fake_agent: FakeAgent,
    tmp_path: Path,
) -> None:
    fake_agent.set("postgresql.service", "healthy")
    fake_agent.set("redis-server.service", "hang")  # no answer until the timeout: the check stays unknown
    fake_agent.set("pgbouncer.service", "inactive")
    agent = fake_agent.base_url
    ok, port = nginx.http_url("/ok"), nginx.http_port
    with refused_port() as closed:
        web1 = await create_host(admin, "web-01.example.net", "web")
        homepage = await create_check(admin, web1, name="homepage", check_type="http", url=ok, expected_body="all good")
        https = await create_check(admin, web1, name="tls endpoint", check_type="http", url=nginx.https_url("/ok"))
        ssh = await create_check(
            admin, web1, name="ssh", check_type="tcp", port=port, address="127.0.0.1", critical=False
        )
        web2 = await create_host(admin, "web-02.example.net", "web")
        await create_check(admin, web2, name="homepage", check_type="http", url=ok)
        await create_check(
            admin, web2, name="metrics", check_type="http", url=nginx.http_url("/status/503"), critical=False
        )
        lb = await create_host(admin, "lb-01.example.net", "web")
        await create_check(admin, lb, name="haproxy", check_type="tcp", port=port, address="127.0.0.1")
        db1 = await create_host(admin, "db-01.example.net", "payments", agent_url=agent)
        await create_check(admin, db1, name="postgres", check_type="service", service_name="postgresql.service")
        await create_check(admin, db1, name="pgbouncer", check_type="service", service_name="pgbouncer.service")
        await create_check(admin, db1, name="replica port", check_type="tcp", port=closed, address="127.0.0.1")
        db2 = await create_host(admin, "db-02.example.net", "payments", agent_url=agent)
        await create_check(admin, db2, name="postgres", check_type="service", service_name="postgresql.service")
        cache = await create_host(admin, "cache-01.example.net", "payments", agent_url=agent)
        await create_host(admin, "batch-01.example.net", "batch")
        await wait_for_statuses(
            db,
            {
                "web-01.example.net": "healthy",
                "web-02.example.net": "degraded",
                "lb-01.example.net": "healthy",
                "db-01.example.net": "unhealthy",
                "db-02.example.net": "healthy",
                "cache-01.example.net": "no_checks",
                "batch-01.example.net": "no_checks",
            },
            pending=0,
        )
    # Added last: a poller stores a tick's results together, so a hanging check would hold back the others'.
    await create_check(
        admin, cache, name="redis", check_type="service", service_name="redis-server.service", timeout_seconds=20
    )
    await insert_history(db, web1, homepage, failures={14, 15, 16}, base_ms=11)
    await insert_history(db, web1, https, failures=set(), base_ms=19)
    await insert_history(db, web1, ssh, failures={30}, base_ms=1.2)
    await insert_job(db, "kernel-patch-0611", db1, window=dt.timedelta(minutes=42, seconds=10))
    await insert_job(
        db, "kernel-patch-0611", web1, status="released", decided_ago=dt.timedelta(minutes=3),
        detail="all gating checks healthy",
    )  # fmt: skip
    await insert_job(
        db, "nginx-upgrade-0610", web2, status="released", decided_ago=dt.timedelta(hours=20),
        detail="released by alice: metrics endpoint is not customer-facing",
    )  # fmt: skip
    await insert_job(
        db, "kernel-patch-0609", db2, status="failed", reason="window_closed", decided_ago=dt.timedelta(days=2),
        detail="the maintenance window closed while checks were not healthy: "
        "postgres: inactive (dead)",
    )  # fmt: skip

    SCREENSHOTS = DOCS_SCREENSHOTS if UPDATE_SCREENSHOTS else tmp_path / "screenshots"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = await new_page(browser)
    await page.goto(f"{api.base_url}/login")
    await page.screenshot(path=SCREENSHOTS / "login.png")
    await sign_in(page, api.base_url, await make_token("admin", name="alice"))
    await expect(host_badge(page, "cache-01.example.net")).to_have_text("unknown")
    await page.screenshot(path=SCREENSHOTS / "hosts.png")
    await page.goto(f"{api.base_url}/hosts/{web1}")
    await expect(page.locator("svg.history")).to_have_count(3)
    await expect(page.locator("svg.latency")).to_have_count(3)
    await check_item(page, "homepage").get_by_role("button", name="Test now").click()
    await expect(check_item(page, "homepage").locator(".test-result")).to_contain_text("Healthy")
    await page.screenshot(path=SCREENSHOTS / "host.png", full_page=True)
    await page.goto(f"{api.base_url}/jobs")
    await expect(page.get_by_role("table", name="Waiting").locator("tr[data-job]")).to_have_count(1)
    await expect(page.get_by_role("table", name="Decided").locator("tr[data-job]")).to_have_count(3)
    await page.screenshot(path=SCREENSHOTS / "jobs.png")
    # The admin's audit log (issue 15) of everything above.
    await page.get_by_role("link", name="Audit log").click()
    await expect(page.locator("tr[data-audit]").first).to_be_visible()
    await page.screenshot(path=SCREENSHOTS / "audit.png")
    assert script_problems(page) == []

    phone = await new_page(browser, PHONE, is_mobile=True, has_touch=True)
    await sign_in(phone, api.base_url, await make_token("operator", ("web", "payments"), name="bob"))
    # Nothing sticks out sideways at phone width.
    assert await phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await phone.screenshot(path=SCREENSHOTS / "hosts-phone.png")
    # The other pages at phone width go to the test's temporary directory, to look at when one breaks.
    for path, name in ((f"/hosts/{web1}", "host"), ("/jobs", "jobs")):
        await phone.goto(api.base_url + path)
        await phone.screenshot(path=tmp_path / f"{name}-phone.png", full_page=True)
        assert await phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
    assert script_problems(phone) == []
    for name in ("login", "hosts", "host", "jobs", "audit", "hosts-phone"):
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000, name
