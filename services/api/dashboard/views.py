"""The dashboard: server-rendered pages over the same operations, roles and scoping as the API.

Every page needs a session (else: the sign-in page); every form carries the session's CSRF token;
every action is checked on the server for the role, whatever the page showed.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import asyncpg
import jinja2
from markupsafe import Markup, escape
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from services.api.audit import AUDIT_PAGES
from services.api.auth import Principal
from services.api.checks import (
    MAX_CHECKS_PER_HOST,
    check_views,
    create_check_on,
    delete_check_on,
    parse_check_write,
    run_check_now,
    update_check_on,
)
from services.api.context import ApiContext, context_of
from services.api.dashboard import sessions
from services.api.dashboard.charts import Point, history_strip, latency_chart, legend_swatch
from services.api.dashboard.wording import cert_validity, reason_phrase, uptime_percent
from services.api.endpoints import ADMIN, CHECK_EDITORS
from services.api.groups import GROUP_PAGES
from services.api.hosts import (
    HostListQuery,
    create_host_on,
    delete_host_on,
    fetch_host_page,
    fetch_visible_host,
    update_host_on,
)
from services.api.jobs import halt_or_resume_on, override_on, require_visible_job
from services.api.notifications import CHANNEL_PAGES, channel_view, test_channel_on
from services.api.paths import SegmentRoute, browser_reachable, linkable, path_segment
from services.api.preview import preview_on
from services.api.problems import Problem, validation_problem
from services.api.requests import PageQuery, path_job_id
from services.api.schemas import MAX_PREVIEW_HOSTS, HaltRequest, HostCreate, OverrideRequest, PreviewRequest
from shared import (
    audit,
    checks,
    group_policies,
    hosts,
    jobs,
    notification_channels,
    notification_deliveries,
    results,
    uptime,
)
from shared.addresses import host_port
from shared.database import Connection
from shared.events import CheckView, control_character, job_key
from shared.gating import gating_check_summaries
from shared.group_policies import GroupPolicy, budget_limit
from shared.hosts import HOST_STATUSES
from shared.jobs import WAITING

HERE = Path(__file__).parent
HISTORY_LENGTH = 40
STALE_FORM = Problem(403, "the form was stale or forged; reload the page")
PAGE_SIZE = 50
# The most fields a dashboard form may have: the preview's takes up to MAX_PREVIEW_HOSTS host ids and its csrf, more
# than the form parser's default of 1000 (which answered 400 "Too many fields" for a selection the API takes); the
# margin lets a few more reach the page's own 422 saying why, and still bounds what a request can make us parse.
FORM_FIELDS = MAX_PREVIEW_HOSTS + 100
JOBS_SHOWN = 100  # waiting ones, and decided ones, on the jobs page
DELIVERIES_SHOWN = 10  # each channel's last deliveries on the notifications page
# A job host's status as the jobs pages say it (CONTRACT §3 "every job row shows its status as a word").
STATUS_WORDS = {
    "waiting_health_check": "waiting",
    "released": "released",
    "failed": "failed",
    "cancelled": "cancelled",
    "verifying": "verifying",
    "verified": "verified",
    "verification_failed": "verification failed",
}
# A job's page shows its hosts by status, in the order a job host goes through them, the failures last.
JOB_PAGE_ORDER = (
    "waiting_health_check", "released", "verifying", "verified", "verification_failed", "failed", "cancelled",
)  # fmt: skip
# What a waiting job host waits for (gate_jobs.waiting_for, CONTRACT §6), in words.
WAITING_FOR_WORDS = {
    "checks": "its gating checks to be healthy",
    "stability": "its checks to stay healthy for the group's stable_seconds",
    "budget": "the group's disruption budget",
}
# Why a job is halted (jobs.halt_reason, CONTRACT §6), in words.
HALT_REASON_WORDS = {
    "max_failed_hosts": "more hosts failed than its max_failed_hosts allows",
    "manual": "halted by hand",
}
HaltAction = Literal["halt", "resume"]
DONE: dict[HaltAction, str] = {"halt": "halted", "resume": "resumed"}
Page = Callable[[Request, sessions.Session], Awaitable[Response]]


@dataclass(frozen=True)
class Holder:
    """A host that holds its group's disruption budget, and why: in patch by a job (`job_id` as received),
    unhealthy, or both."""

    host_id: uuid.UUID
    name: str
    job_id: str | None
    unhealthy: bool

    @property
    def why(self) -> str:
        reasons = ([f"job {self.job_id} patching"] if self.job_id is not None else []) + (
            ["unhealthy"] if self.unhealthy else []
        )
        return ", ".join(reasons)


@dataclass(frozen=True)
class GroupSummary:
    """One group on the groups page."""

    name: str
    hosts_total: int
    by_status: dict[str, int]
    in_maintenance: int
    budget_in_use: int
    budget_limit: int | None
    policy: GroupPolicy
    holders: list[Holder]

    @property
    def over_budget(self) -> bool:
        return self.budget_limit is not None and self.budget_in_use > self.budget_limit


def group_summary(row: asyncpg.Record, policy: GroupPolicy, members: list[dict[str, Any]]) -> GroupSummary:
    """A group of `group_policies.group_page` (`row`) with its policy and its hosts (`members`: hosts as shown,
    `shared.hosts.host_values`, of this and other groups)."""
    own = [host for host in members if host["group"] == row["group"]]
    by_status: dict[str, int] = dict.fromkeys(HOST_STATUSES, 0)
    for host in own:
        by_status[host["health_check_status"]] += 1
    holders = [
        Holder(host["id"], host["name"], host["maintenance_job_id"], host["health_check_status"] == "unhealthy")
        for host in own
        if host["in_maintenance"] or host["health_check_status"] == "unhealthy"
    ]
    return GroupSummary(
        name=row["group"], hosts_total=row["hosts_total"], by_status=by_status,
        in_maintenance=row["hosts_in_maintenance"], budget_in_use=row["budget_in_use"],
        budget_limit=budget_limit(policy, row["hosts_total"]), policy=policy, holders=holders,
    )  # fmt: skip


class Dashboard:
    def __init__(self) -> None:
        environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
        self.templates = Jinja2Templates(env=environment)
        self.templates.env.filters["ago"] = _ago
        self.templates.env.filters["until"] = _until
        # Links and form actions carry ids as one path segment each: `/jobs/deploy%2F2026%2F42`.
        self.templates.env.filters["path_segment"] = path_segment
        self.templates.env.globals["job_url"] = job_url
        self.templates.env.globals["override_url"] = override_url
        self.templates.env.globals["halt_url"] = halt_url
        self.templates.env.tests["linkable"] = linkable
        # Job ids as received (the gate answers invalid ones too): control characters made visible, cut if long.
        self.templates.env.filters["job_id_html"] = job_id_html
        self.templates.env.filters["job_id_text"] = job_id_text
        self.templates.env.filters["status_word"] = lambda status: STATUS_WORDS.get(status, status.replace("_", " "))
        self.templates.env.filters["waiting_for_words"] = lambda item: WAITING_FOR_WORDS.get(item, item)
        self.templates.env.filters["halt_reason_words"] = lambda reason: HALT_REASON_WORDS.get(reason, reason)
        self.templates.env.filters["reason_phrase"] = reason_phrase
        self.templates.env.filters["uptime_percent"] = uptime_percent
        self.templates.env.filters["host_port"] = host_port
        self.templates.env.filters["cert_validity"] = cert_validity
        self.templates.env.filters["change_words"] = change_words
        self.templates.env.globals["legend_swatch"] = legend_swatch

    def routes(self) -> list[SegmentRoute | Mount]:
        """Every page is matched segment by segment on the raw path, as the API is (services/api/paths.py)."""
        page = self._page
        return [
            SegmentRoute("/", self.home, methods=["GET"]),
            SegmentRoute("/login", self.login_form, methods=["GET"]),
            SegmentRoute("/login", self.login, methods=["POST"]),
            SegmentRoute("/logout", self.logout, methods=["GET", "POST"]),
            SegmentRoute("/hosts", page(self.hosts), methods=["GET"]),
            SegmentRoute("/hosts/preview", page(self.preview), methods=["POST"]),  # GET: /hosts/{host_id}, a 404
            # Before /hosts/{host_id}: "new" is no host id. The host form (admin).
            SegmentRoute("/hosts/new", page(self.new_host_form), methods=["GET"]),
            SegmentRoute("/hosts/new", page(self.create_host), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}", page(self.host), methods=["GET"]),
            SegmentRoute("/hosts/{host_id}/edit", page(self.edit_host_form), methods=["GET"]),
            SegmentRoute("/hosts/{host_id}/edit", page(self.update_host), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}/delete", page(self.delete_host_form), methods=["GET"]),
            SegmentRoute("/hosts/{host_id}/delete", page(self.delete_host), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}/checks", page(self.create_check), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}/checks/{check_id}", page(self.update_check), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}/checks/{check_id}/delete", page(self.delete_check), methods=["POST"]),
            SegmentRoute("/hosts/{host_id}/checks/{check_id}/test", page(self.test_check), methods=["POST"]),
            SegmentRoute("/groups", page(self.groups), methods=["GET"]),
            SegmentRoute("/jobs", page(self.jobs), methods=["GET"]),  # with ?job_id=: that job's page
            SegmentRoute("/jobs/{job_id}", page(self.job), methods=["GET"]),
            SegmentRoute("/jobs/{job_id}/hosts/{host_id}/override", page(self.override), methods=["POST"]),
            SegmentRoute("/jobs/hosts/{host_id}/override", page(self.override), methods=["POST"]),  # ?job_id=
            SegmentRoute("/jobs/{job_id}/halt", page(self.halt), methods=["POST"]),
            SegmentRoute("/jobs/{job_id}/resume", page(self.resume), methods=["POST"]),
            SegmentRoute("/jobs/halt", page(self.halt), methods=["POST"]),  # ?job_id= (see `halt_url`)
            SegmentRoute("/jobs/resume", page(self.resume), methods=["POST"]),  # ?job_id=
            SegmentRoute("/notifications", page(self.notifications), methods=["GET"]),
            SegmentRoute("/audit", page(self.audit), methods=["GET"]),
            SegmentRoute("/notifications/{channel_id}/test", page(self.test_channel), methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]

    # ---- plumbing --------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        response = self.templates.TemplateResponse(request, template, values, status_code=status_code)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
        )
        return response

    def _page(self, handler: Page) -> Callable[[Request], Awaitable[Response]]:
        """Require a session and, for POSTs, its CSRF token; show problems as pages."""

        async def guarded(request: Request) -> Response:
            context = context_of(request)
            session = await sessions.current_session(context.pool, request)
            if session is None:
                if _wants_json(request):  # "Test now": say so in place rather than follow to the sign-in page
                    return JSONResponse({"detail": "your session has ended; sign in again"}, status_code=401)
                target = _raw_target(request)
                return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
            form = await request.form(max_fields=FORM_FIELDS) if request.method == "POST" else None
            try:
                if form is not None and not sessions.same_token(session.csrf_token, form.get("csrf")):
                    raise Problem(403, "the form was stale or forged; reload the page")
                return await handler(request, session)
            except Problem as problem:
                if _wants_json(request):
                    return JSONResponse(
                        {"detail": problem.detail, "errors": problem.errors}, status_code=problem.status
                    )
                return self._problem_page(request, session, problem)

        return guarded

    def _problem_page(self, request: Request, session: sessions.Session, problem: Problem) -> HTMLResponse:
        return self.render(request, "error.html", status_code=problem.status, session=session, problem=problem)

    @staticmethod
    def _require(session: sessions.Session, roles: Collection[str], what: str) -> None:
        """403 unless the session's role is one of `roles` (the API's: services/api/endpoints.py)."""
        if session.principal.role not in roles:
            role = session.principal.role
            raise Problem(403, f"{'an' if role[0] in 'aeiou' else 'a'} {role} may not {what}")

    # ---- sign-in ---------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/hosts", status_code=303)

    async def login_form(self, request: Request, error: str | None = None, status_code: int = 200) -> Response:
        csrf = sessions.new_login_csrf()
        response = self.render(
            request, "login.html", status_code=status_code, csrf=csrf, error=error,
            next=_safe_next(request.query_params.get("next")),
        )  # fmt: skip
        sessions.set_login_csrf_cookie(response, request, csrf)
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not sessions.same_token(request.cookies.get(sessions.LOGIN_CSRF_COOKIE), form.get("csrf")):
            return await self.login_form(request, "The sign-in form expired; please try again.", 403)
        token = form.get("token")
        signed_in = (
            await sessions.sign_in(context_of(request).pool, token) if isinstance(token, str) and token else None
        )
        if signed_in is None:
            return await self.login_form(request, "That token is not valid.", 401)
        session_id, _ = signed_in
        response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
        sessions.set_session_cookie(response, request, session_id)
        return response

    async def logout(self, request: Request) -> Response:
        """POST (with the session's CSRF token) signs out; GET asks, so another site cannot sign anyone out."""
        context = context_of(request)
        session = await sessions.current_session(context.pool, request)
        if session is not None:
            if request.method == "GET":
                return self.render(request, "logout.html", session=session)
            form = await request.form()
            if not sessions.same_token(session.csrf_token, form.get("csrf")):
                return self._problem_page(request, session, STALE_FORM)
            await sessions.sign_out(context.pool, request)
        response = RedirectResponse("/login", status_code=303)
        sessions.clear_session_cookie(response)
        return response

    # ---- hosts -----------------------------------------------------------------------------------

    async def hosts(
        self, request: Request, session: sessions.Session, *, status_code: int = 200, **preview_state: Any
    ) -> Response:
        """The hosts page (`preview_state`: a preview's `preview`, the `selected` host ids kept checked, an `alert`
        saying why there is no preview; shown with `status_code`). With ?fragment=1 only its refreshing region."""
        principal = session.principal
        params = request.query_params
        group = params.get("group") or None
        status = params.get("status") or None
        if status not in (None, *HOST_STATUSES):
            raise Problem(422, f"unknown status {status!r}")
        try:
            query = HostListQuery(
                group=group, health_check_status=status, cursor=params.get("cursor") or None, limit=PAGE_SIZE
            )
        except ValidationError:
            raise Problem(422, "invalid filter") from None
        context = context_of(request)
        rows, next_cursor = await fetch_host_page(context.pool, principal, query)
        counts, groups = await _summary(context.pool, principal)
        host_uptime = await uptime.host_uptime_24h(context.pool, [row["id"] for row in rows])
        template = "_hosts_region.html" if params.get("fragment") else "hosts.html"
        return self.render(
            request, template, status_code=status_code, session=session, hosts=rows, next_cursor=next_cursor,
            counts=counts, total=sum(counts.values()), groups=groups, group=group, status=status,
            statuses=HOST_STATUSES, host_uptime=host_uptime, can_manage_hosts=principal.is_admin,
            filters=urlencode({key: value for key, value in (("group", group), ("status", status)) if value}),
            # This page's address (filters and cursor), where the preview form posts to show it again.
            this_page=urlencode(
                {key: value for key, value in (("group", group), ("status", status), ("cursor", query.cursor)) if value}
            ),
            selected=preview_state.pop("selected", set()), names={str(row["id"]): row["name"] for row in rows},
            **preview_state,
        )  # fmt: skip

    async def preview(self, request: Request, session: sessions.Session) -> Response:
        """The gate's preview (CONTRACT §6) for the hosts selected on the hosts page (`host_id` checkboxes), through
        the API's own `preview_on` (every role, scoped: a host outside the caller's groups is answered as unknown).
        Shown on the hosts page, with the same filters and page (the form posts them in its query) and the
        selection kept; a selection the API would refuse (none, more than 1000, a host twice, not a host id) shows
        the page with why, answered 422."""
        form = await request.form()
        selected = [value for value in form.getlist("host_id") if isinstance(value, str)]
        try:
            body = PreviewRequest.model_validate({"host_ids": selected})
        except ValidationError as exc:
            messages = "; ".join(dict.fromkeys(error["message"] for error in validation_problem(exc).errors or []))
            alert = "No preview: select 1 to 1000 hosts, each once" + (f" ({messages})" if selected else "") + "."
            return await self.hosts(request, session, status_code=422, alert=alert, selected=set(selected))
        context = context_of(request)
        shown = await preview_on(
            context.pool, session.principal, body.host_ids, at=None, unknown_host=context.settings.gate_unknown_host
        )
        return await self.hosts(request, session, preview=shown, selected={str(host_id) for host_id in body.host_ids})

    async def host(self, request: Request, session: sessions.Session, **form_state: Any) -> Response:
        host_id = _path_uuid(request, "host_id")
        context = context_of(request)
        async with context.pool.acquire() as connection:
            host = hosts.host_values(await fetch_visible_host(connection, session.principal, host_id))
            rows = await checks.checks_of_host(connection, host_id)
            views = await check_views(connection, rows)
            history = await _recent_results(connection, [row["id"] for row in rows])
            host_uptime = (await uptime.host_uptime_24h(connection, [host_id]))[host_id]
        editing, edit_values = form_state.get("editing"), form_state.get("edit_values")
        if editing is not None and edit_values is not None:
            # A form shown again with its errors holds what was sent; whether a password is stored (the hint
            # "set; leave empty to keep" and the box that clears it) comes from the check.
            stored = next((row for row in rows if str(row["id"]) == editing), None)
            if stored is not None:
                form_state["edit_values"] = edit_values | {
                    "basic_auth_pass_set": stored["basic_auth_pass_encrypted"] is not None
                }
        shown = [
            {
                "view": view,
                "form_values": check_form_values(view),
                "strip": history_strip(history.get(view.id, [])),
                "chart": latency_chart(history.get(view.id, [])),
            }
            for view in views
        ]
        return self.render(
            request, "host.html", status_code=form_state.pop("status_code", 200), session=session, host=host,
            checks=shown, can_edit=session.principal.role in CHECK_EDITORS, max_checks=MAX_CHECKS_PER_HOST,
            host_uptime=host_uptime, can_manage_hosts=session.principal.is_admin,
            **form_state,
        )  # fmt: skip

    async def create_check(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, CHECK_EDITORS, "change health checks")
        host_id = _path_uuid(request, "host_id")
        context = context_of(request)
        form = await request.form()
        await _require_visible_host(context, session, host_id)
        try:
            check = parse_check_write(check_document(form, editing=False))
            await create_check_on(context, session.principal.name, host_id, check)
        except Problem as problem:
            if problem.status not in (409, 422):
                raise
            return await self.host(
                request, session, new_errors=_errors(problem), new_values=submitted_values(form),
                status_code=problem.status,
            )  # fmt: skip
        return RedirectResponse(f"/hosts/{host_id}", status_code=303)

    async def update_check(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, CHECK_EDITORS, "change health checks")
        host_id, check_id = _path_uuid(request, "host_id"), _path_uuid(request, "check_id")
        context = context_of(request)
        form = await request.form()
        await _require_visible_host(context, session, host_id)
        try:
            check = parse_check_write(check_document(form, editing=True))
            await update_check_on(context, session.principal.name, host_id, check_id, check)
        except Problem as problem:
            if problem.status not in (409, 422):
                raise
            return await self.host(
                request, session, edit_errors=_errors(problem), edit_values=submitted_values(form),
                editing=str(check_id), status_code=problem.status,
            )  # fmt: skip
        return RedirectResponse(f"/hosts/{host_id}", status_code=303)

    async def delete_check(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, CHECK_EDITORS, "delete health checks")
        host_id, check_id = _path_uuid(request, "host_id"), _path_uuid(request, "check_id")
        context = context_of(request)
        await _require_visible_host(context, session, host_id)
        await delete_check_on(context, session.principal.name, host_id, check_id)
        return RedirectResponse(f"/hosts/{host_id}", status_code=303)

    async def test_check(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, CHECK_EDITORS, "test health checks")
        host_id, check_id = _path_uuid(request, "host_id"), _path_uuid(request, "check_id")
        context = context_of(request)
        await _require_visible_host(context, session, host_id)
        result = await run_check_now(context, session.principal.name, host_id, check_id)
        if _wants_json(request):
            return JSONResponse(result.model_dump(mode="json"))
        return RedirectResponse(f"/hosts/{host_id}#check-{check_id}", status_code=303)

    # ---- the host form (admin) ------------------------------------------------------------------

    async def _host_form(
        self, request: Request, session: sessions.Session, *, host: dict[str, Any] | None, values: dict[str, Any],
        errors: dict[str, str] | None = None, status_code: int = 200,
    ) -> Response:  # fmt: skip
        """The host form: a new host (`host` None) or `host`'s edit, showing `values` and the API's `errors` by
        field. The group field offers the groups that exist (an admin sees every group) and takes a new one."""
        _, groups = await _summary(context_of(request).pool, session.principal)
        return self.render(
            request, "host_form.html", status_code=status_code, session=session, host=host, values=values,
            errors=errors or {}, groups=groups,
        )  # fmt: skip

    async def new_host_form(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, ADMIN, "add hosts")
        group = request.query_params.get("group") or ""
        return await self._host_form(request, session, host=None, values={"group": group})

    async def create_host(self, request: Request, session: sessions.Session) -> Response:
        """The API's host creation (`create_host_on`: the same row, audit entry and rules) from the form; its
        problems (422 by field, 409 for a taken name) show the form again with them by their fields."""
        self._require(session, ADMIN, "add hosts")
        form = await request.form()
        document = host_document(form)
        try:
            try:
                body = HostCreate.model_validate(document)
            except ValidationError as exc:
                raise validation_problem(exc) from None
            row = await create_host_on(context_of(request).pool, session.principal, body)
        except Problem as problem:
            if problem.status not in (409, 422):
                raise
            return await self._host_form(
                request, session, host=None, values=document, errors=_host_errors(problem), status_code=problem.status
            )
        return RedirectResponse(f"/hosts/{row['id']}", status_code=303)

    async def edit_host_form(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, ADMIN, "change hosts")
        host = await self._visible_host(request, session)
        return await self._host_form(request, session, host=host, values=host)

    async def update_host(self, request: Request, session: sessions.Session) -> Response:
        """The API's PUT (`update_host_on`: the same rules, including those of the host's checks, and audit
        entry) from the form; its problems show the form again with them by their fields."""
        self._require(session, ADMIN, "change hosts")
        host = await self._visible_host(request, session)
        form = await request.form()
        document = host_document(form)
        try:
            await update_host_on(context_of(request).pool, session.principal, host["id"], document)
        except Problem as problem:
            if problem.status not in (409, 422):
                raise
            return await self._host_form(
                request, session, host=host, values=document, errors=_host_errors(problem), status_code=problem.status
            )
        return RedirectResponse(f"/hosts/{host['id']}", status_code=303)

    async def delete_host_form(self, request: Request, session: sessions.Session) -> Response:
        """Asks before a host goes: what goes with it (its checks and their results) and a button that does it.
        A page rather than a script's dialog, so that it works without scripts too."""
        self._require(session, ADMIN, "delete hosts")
        host = await self._visible_host(request, session)
        async with context_of(request).pool.acquire() as connection:
            check_names = [row["name"] for row in await checks.checks_of_host(connection, host["id"])]
        return self.render(request, "host_delete.html", session=session, host=host, check_names=check_names)

    async def delete_host(self, request: Request, session: sessions.Session) -> Response:
        """The API's DELETE (`delete_host_on`: the checks, their results, audit entries and events), then the
        hosts page."""
        self._require(session, ADMIN, "delete hosts")
        host_id = _path_uuid(request, "host_id")
        await delete_host_on(context_of(request), session.principal, host_id)
        return RedirectResponse("/hosts", status_code=303)

    async def _visible_host(self, request: Request, session: sessions.Session) -> dict[str, Any]:
        """The `{host_id}` of the path as shown (`hosts.host_values`); 404 outside the caller's groups."""
        host_id = _path_uuid(request, "host_id")
        async with context_of(request).pool.acquire() as connection:
            return hosts.host_values(await fetch_visible_host(connection, session.principal, host_id))

    # ---- audit log (admin) ----------------------------------------------------------------------

    async def audit(self, request: Request, session: sessions.Session) -> Response:
        """The audit log (CONTRACT §3 `GET /api/v1/audit`, admin): PAGE_SIZE entries a page, newest first, each
        with when, who, what, on which entity and its changes, read as the API reads them (shared/audit.py,
        which stores secrets only as "<changed>"). The next page by the API's cursor."""
        self._require(session, ADMIN, "read the audit log")
        cursor = request.query_params.get("cursor") or None
        try:
            before_id = AUDIT_PAGES.after(PageQuery(cursor=cursor, limit=PAGE_SIZE).cursor)
        except (ValidationError, Problem):
            raise Problem(422, "invalid page") from None
        async with context_of(request).pool.acquire() as connection:
            rows = await audit.audit_page(connection, limit=AUDIT_PAGES.rows_to_fetch(PAGE_SIZE), before_id=before_id)
        rows, next_cursor = AUDIT_PAGES.page(rows, PAGE_SIZE)
        entries = [dict(row) | {"changes": json.loads(row["changes"])} for row in rows]
        return self.render(
            request, "audit.html", session=session, entries=entries, next_cursor=next_cursor, first_page=cursor is None
        )

    # ---- groups ----------------------------------------------------------------------------------

    async def groups(self, request: Request, session: sessions.Session) -> Response:
        """The caller's groups (CONTRACT §3 "Dashboard", §6): each group's hosts by state, its policy, its
        disruption budget in use against its limit, and the hosts that hold it (in patch, by which job; or
        unhealthy). A page of PAGE_SIZE groups by name, as the API's `GET /api/v1/groups`."""
        cursor = request.query_params.get("cursor") or None
        try:
            query = PageQuery(cursor=cursor, limit=PAGE_SIZE)
            after = GROUP_PAGES.after(query.cursor)
        except (ValidationError, Problem):
            raise Problem(422, "invalid page") from None
        context = context_of(request)
        async with context.pool.acquire() as connection:
            rows = await group_policies.group_page(
                connection, groups=session.principal.visible_groups(), after=after,
                limit=GROUP_PAGES.rows_to_fetch(PAGE_SIZE),
            )  # fmt: skip
            rows, next_cursor = GROUP_PAGES.page(rows, PAGE_SIZE)
            names = [row["group"] for row in rows]
            policies = await group_policies.policies_of(connection, names)
            members = [hosts.host_values(row) for row in await hosts.hosts_of_groups(connection, names)]
        shown = [group_summary(row, policies[row["group"]], members) for row in rows]
        return self.render(
            request, "groups.html", session=session, groups=shown, next_cursor=next_cursor, statuses=HOST_STATUSES
        )

    # ---- notifications ---------------------------------------------------------------------------

    async def notifications(self, request: Request, session: sessions.Session, **state: Any) -> Response:
        """The notification channels (CONTRACT §7, admin): each channel as the API shows it (URL masked, no
        secret) with its last DELIVERIES_SHOWN deliveries, and a "Send test" button. `state`: a test's `tested`
        channel id and its `answer`, shown by that channel (the page without scripts)."""
        self._require(session, ADMIN, "see notification channels")
        cursor = request.query_params.get("cursor") or None
        try:
            after = CHANNEL_PAGES.after(PageQuery(cursor=cursor, limit=PAGE_SIZE).cursor)
        except (ValidationError, Problem):
            raise Problem(422, "invalid page") from None
        context = context_of(request)
        async with context.pool.acquire() as connection:
            rows = await notification_channels.channel_page(
                connection, limit=CHANNEL_PAGES.rows_to_fetch(PAGE_SIZE), after=after
            )
            rows, next_cursor = CHANNEL_PAGES.page(rows, PAGE_SIZE)
            shown = [
                {
                    "view": channel_view(row),
                    "deliveries": await notification_deliveries.delivery_page(
                        connection, row["id"], limit=DELIVERIES_SHOWN, before=None
                    ),
                }
                for row in rows
            ]
        return self.render(
            request, "notifications.html", session=session, channels=shown, next_cursor=next_cursor, **state
        )

    async def test_channel(self, request: Request, session: sessions.Session) -> Response:
        """Send a test notification through the API's own `test_channel_on` (audited, recorded): JSON for the
        page's script, else the page again with the outcome by the channel."""
        self._require(session, ADMIN, "test notification channels")
        channel_id = _path_uuid(request, "channel_id")
        answer = await test_channel_on(context_of(request), session.principal.name, channel_id)
        if _wants_json(request):
            return JSONResponse(answer.model_dump(mode="json"))
        return await self.notifications(request, session, tested=str(channel_id), answer=answer)

    # ---- jobs ------------------------------------------------------------------------------------

    async def jobs(self, request: Request, session: sessions.Session) -> Response:
        """The jobs page; `/jobs?job_id=ID` is the page of the job ID (see `job_url`)."""
        if "job_id" in request.query_params:
            return await self.job(request, session)
        context = context_of(request)
        groups = session.principal.visible_groups()
        async with context.pool.acquire() as connection:
            waiting = await _jobs(connection, groups, waiting=True)
            decided = await _jobs(connection, groups, waiting=False)
            failing = await _failing_checks(connection, waiting)
        return self.render(
            request, "jobs.html", session=session, waiting=waiting, decided=decided, failing=failing,
            can_override=session.principal.is_admin, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip

    async def job(
        self, request: Request, session: sessions.Session, *, alert: str | None = None, status_code: int = 200
    ) -> Response:
        """One job's hosts in the caller's groups (404 when none is), each with its status and, while it
        waits, its failing checks and the admin's override; the job's halt state (CONTRACT §6) and, for admins,
        the halt or resume form. At `/jobs/{job_id}` or `/jobs?job_id=`. `alert`: why the last action failed,
        shown above the halt state (with `status_code`)."""
        job_id = dashboard_job_id(request)
        context = context_of(request)
        key = job_key(job_id)
        async with context.pool.acquire() as connection:
            # As the API does: an invalid job_id's row is under its key.
            rows = await jobs.job_with_host_names(connection, key, session.principal.visible_groups())
            job_hosts = [jobs.as_received(row) for row in rows]
            if not job_hosts:
                raise Problem(404, "job not found")
            failing = await _failing_checks(connection, [row for row in job_hosts if row["status"] == WAITING])
            job = await jobs.job_of(connection, key)  # None for a job recorded before migration 0010
            # The job's failed hosts (the halting rule's count, shared.jobs.failed_hosts), those in the caller's
            # groups only: for an admin, every one.
            shown = {row["host_id"] for row in job_hosts}
            failed_hosts = [host_id for host_id in await jobs.failed_hosts(connection, key) if host_id in shown]
        by_status = [
            (status, [row for row in job_hosts if row["status"] == status])
            for status in JOB_PAGE_ORDER
            if any(row["status"] == status for row in job_hosts)
        ]
        return self.render(
            request, "job.html", status_code=status_code, session=session, job_id=job_id, hosts=job_hosts,
            by_status=by_status, failing=failing, can_override=session.principal.is_admin,
            can_halt=session.principal.is_admin, halted=job is not None and job["halted_at"] is not None,
            halt=job, failed_hosts=len(failed_hosts), scoped=session.principal.visible_groups() is not None,
            alert=alert,
        )  # fmt: skip

    async def halt(self, request: Request, session: sessions.Session) -> Response:
        """An admin halts a job by hand (CONTRACT §6), from its page."""
        return await self._halt_or_resume(request, session, "halt")

    async def resume(self, request: Request, session: sessions.Session) -> Response:
        """An admin lets a halted job go on (CONTRACT §6), from its page."""
        return await self._halt_or_resume(request, session, "resume")

    async def _halt_or_resume(self, request: Request, session: sessions.Session, action: HaltAction) -> Response:
        """The API's halt or resume (`services.api.jobs.halt_or_resume_on`: the same transaction, audit entry
        and events, `by` the session's token name): 403 for a non-admin, 404 for a job with no host in the
        caller's groups; a reason that is not 1 to 500 characters (422) or a job already halted / not halted (409)
        shows the job's page again, as it is now, saying so. Back to the job's page when done."""
        self._require(session, ADMIN, f"{action} a job")
        job_id = dashboard_job_id(request)
        context = context_of(request)
        await require_visible_job(context, session.principal, job_id)
        form = await request.form()
        try:
            body = HaltRequest.model_validate({"reason": form.get("reason")})
            await halt_or_resume_on(context, session.principal, job_id, body, halt=action == "halt")
        except ValidationError:
            alert = f"The job was not {DONE[action]}: give a reason of 1 to 500 characters."
            return await self.job(request, session, alert=alert, status_code=422)
        except Problem as problem:
            if problem.status != 409:
                raise
            alert = f"The job was not {DONE[action]}: {problem.detail}."
            return await self.job(request, session, alert=alert, status_code=409)
        return RedirectResponse(job_url(job_id), status_code=303)

    async def override(self, request: Request, session: sessions.Session) -> Response:
        self._require(session, ADMIN, "override a job")
        job_id = dashboard_job_id(request)
        host_id = _path_uuid(request, "host_id")
        form = await request.form()
        try:
            body = OverrideRequest.model_validate({"decision": form.get("decision"), "reason": form.get("reason")})
        except ValidationError:
            raise Problem(422, "choose release or fail and give a reason (1 to 500 characters)") from None
        await override_on(context_of(request), session.principal.name, job_id, host_id, body)
        # Back to the page the form was on: the job's own page, or the jobs page.
        back = job_url(job_id) if form.get("back") == "job" else "/jobs"
        return RedirectResponse(back, status_code=303)


def job_url(job_id: str) -> str:
    """The dashboard address of a job's page (CONTRACT §3 "Dashboard": every job id works there).

    `/jobs/<id as one percent-encoded segment>` for every id a browser keeps in a path; for `.` and `..`,
    which browsers resolve as dot-segments even percent-encoded (services/api/paths.py `browser_reachable`),
    `/jobs?job_id=<id>`: a browser leaves a query alone. The two cannot be confused: `/jobs` with a `job_id`
    query is never the jobs list, and a job id is always one whole path segment after `/jobs/`.
    """
    if browser_reachable(job_id):
        return "/jobs/" + path_segment(job_id)
    return "/jobs?" + urlencode({"job_id": job_id}, quote_via=quote)


def override_url(job_id: str, host_id: uuid.UUID | str) -> str:
    """Where the override form of a job host posts: `/jobs/<id>/hosts/<host>/override`, or for the ids a browser
    cannot keep in a path `/jobs/hosts/<host>/override?job_id=<id>` (four segments: never a job's page, which
    has two, nor the other override path, which has five)."""
    host = path_segment(str(host_id))
    if browser_reachable(job_id):
        return f"/jobs/{path_segment(job_id)}/hosts/{host}/override"
    return f"/jobs/hosts/{host}/override?" + urlencode({"job_id": job_id}, quote_via=quote)


def halt_url(job_id: str, action: HaltAction) -> str:
    """Where a job page's halt or resume form posts: `/jobs/<id>/halt`, or for the ids a browser cannot keep in a
    path (`job_url`) `/jobs/halt?job_id=<id>`. The latter has the two segments of a job's page, but is POST
    only, and a job's page GET only: no request can mean both; the former has three, as nothing else does."""
    if browser_reachable(job_id):
        return f"/jobs/{path_segment(job_id)}/{action}"
    return f"/jobs/{action}?" + urlencode({"job_id": job_id}, quote_via=quote)


def dashboard_job_id(request: Request) -> str:
    """The job id of a dashboard request: the `{job_id}` path segment, else the `job_id` query parameter (`job_url`).

    The query's id follows the path's rules (`path_job_id`): any text, looked up by its `job_key`; an empty or
    repeated `job_id` names no one job → 404.
    """
    if "job_id" in request.path_params:
        return path_job_id(request)
    values = request.query_params.getlist("job_id")
    if len(values) != 1 or not values[0]:
        raise Problem(404, "job not found")
    return values[0]


def host_document(form: FormData) -> dict[str, Any]:
    """A host's API body from the host form: its name, group and agent URL as typed, an empty agent URL as none
    (null: the host has no agent)."""
    agent_url = form.get("agent_url")
    return {
        "name": form.get("name", ""),
        "group": form.get("group", ""),
        "agent_url": agent_url if isinstance(agent_url, str) and agent_url.strip() else None,
    }


def _host_errors(problem: Problem) -> dict[str, str]:
    """A host problem's messages by field (`_errors`); a 409 (a taken name or id) is the name's."""
    if problem.status == 409:
        return {"name": problem.detail}
    return _errors(problem)


def change_words(changes: Any) -> list[tuple[str, str]]:
    """An audit entry's `changes` as (field, what) pairs to show: `{"from": a, "to": b}` as `a → b`, other values
    as they are (a created or deleted entity's fields), `"<changed>"` (a secret, shared/audit.py) as it is. Values
    are JSON, so that `null` and strings read as in the API."""
    if not isinstance(changes, dict):
        return [("", _json(changes))] if changes else []
    shown: list[tuple[str, str]] = []
    for field, value in changes.items():
        if isinstance(value, dict) and set(value) == {"from", "to"}:
            shown.append((field, f"{_json(value['from'])} \u2192 {_json(value['to'])}"))
        elif value == audit.SECRET_MARK:
            shown.append((field, value))
        else:
            shown.append((field, _json(value)))
    return shown


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


# The check form's checkboxes, by the check type whose fields they are: a box left unchecked is not sent at all, so a
# form shown again must be told it was off (a box of another type was not sent because its fields were hidden).
CHECKBOXES = {"http": ("ignore_cert_errors", "follow_redirects"), "grpc": ("ignore_cert_errors", "tls")}
COMMON_CHECKBOXES = ("enabled", "critical")


def check_document(form: FormData, *, editing: bool) -> dict[str, Any]:
    """A check's API body from a form: only the chosen type's fields, booleans from checkboxes, empty
    inputs left out so that defaults apply, and the write-only password kept unless given or cleared (by its
    checkbox, or by emptying the user field). tcp and grpc share the port and address fields, http and grpc the
    certificate box: one input each, so the form also works without scripts, when every type's fields are shown.
    A dns check's expected values are the textarea's non-empty lines."""
    check_type = form.get("check_type")
    document: dict[str, Any] = {
        "name": form.get("name", ""),
        "check_type": check_type,
        "enabled": "enabled" in form,
        "critical": "critical" in form,
    }
    numbers = (
        "interval_seconds", "timeout_seconds", "failures_before_unhealthy", "successes_before_healthy",
        "max_latency_ms",
    )  # fmt: skip
    for field in numbers:
        if form.get(field):
            document[field] = form.get(field)
    if check_type == "service":
        document["service_name"] = form.get("service_name", "")
    elif check_type in ("tcp", "grpc"):
        document["port"] = form.get("port") or None
        if form.get("address"):
            document["address"] = form.get("address")
        if check_type == "grpc":
            document |= {
                "grpc_service": form.get("grpc_service", ""),
                "tls": "tls" in form,
                "ignore_cert_errors": "ignore_cert_errors" in form,
            }
    elif check_type == "dns":
        document |= {"dns_name": form.get("dns_name", ""), "record_type": form.get("record_type") or "A"}
        values = form.get("expected_values")
        lines = [line.strip() for line in values.splitlines()] if isinstance(values, str) else []
        if any(lines):
            document["expected_values"] = [line for line in lines if line]
        if form.get("dns_server"):
            document["dns_server"] = form.get("dns_server")
    elif check_type == "http":
        document |= {
            "url": form.get("url", ""),
            "method": form.get("method") or "GET",
            "ignore_cert_errors": "ignore_cert_errors" in form,
            "follow_redirects": "follow_redirects" in form,
        }
        for field in ("expected_status", "expected_body", "basic_auth_user", "min_cert_days"):
            if form.get(field):
                document[field] = form.get(field)
        condition = form.get("condition")
        if isinstance(condition, str) and condition:
            # A browser sends a textarea's line breaks as CRLF (HTML's form encoding): stored as typed, a condition
            # written with LF over the API would read as changed each time its form is saved unchanged.
            document["condition"] = condition.replace("\r\n", "\n")
        if form.get("basic_auth_pass"):
            document["basic_auth_pass"] = form.get("basic_auth_pass")
        elif editing and ("clear_basic_auth_pass" in form or not form.get("basic_auth_user")):
            # An emptied user field means no basic auth: the stored password goes too (the API refuses a PUT
            # that drops the user of a stored password without saying basic_auth_pass: null).
            document["basic_auth_pass"] = None
    return document


def submitted_values(form: FormData) -> dict[str, Any]:
    """What a check form sent, to show it again with the API's messages: every field as typed, and each checkbox of
    the chosen type left unchecked as "off" (an unchecked box is not sent, and the form would otherwise show its
    default); those of other types keep their defaults, for when the type is changed."""
    values: dict[str, Any] = dict(form)
    check_type = form.get("check_type")
    boxes = (*COMMON_CHECKBOXES, *CHECKBOXES.get(check_type if isinstance(check_type, str) else "", ()))
    return values | {box: "off" for box in boxes if box not in form}


def check_form_values(view: CheckView) -> dict[str, Any]:
    """A stored check as its edit form shows it: its fields by name, a dns check's expected values one per line."""
    values = view.model_dump()
    values["expected_values"] = "\n".join(view.expected_values or ())
    return values


async def _summary(pool: asyncpg.Pool, principal: Principal) -> tuple[dict[str, int], list[str]]:
    rows = await hosts.status_counts(pool, principal.visible_groups())
    counts: dict[str, int] = dict.fromkeys(HOST_STATUSES, 0)
    for row in rows:
        counts[row["health_check_status"]] += row["hosts"]
    return counts, sorted({row["group"] for row in rows})


async def _recent_results(connection: Connection, check_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Point]]:
    rows = await results.recent_results(connection, check_ids, HISTORY_LENGTH)
    history: dict[uuid.UUID, list[Point]] = {}
    for row in rows:
        history.setdefault(row["id"], []).append(
            Point(row["healthy"], row["reason"], row["detail"], row["latency_ms"], row["checked_at"])
        )
    return history


async def _jobs(connection: Connection, groups: list[str] | None, *, waiting: bool) -> list[dict[str, Any]]:
    """The jobs page's waiting or decided job hosts, each with its job_id as received (`shared.jobs.as_received`)."""
    rows = await jobs.job_hosts_with_host_names(connection, groups, waiting=waiting, limit=JOBS_SHOWN)
    return [jobs.as_received(row) for row in rows]


# A job_id shown on a page: the gate answers (and stores) job_ids of any length, 2 MB too.
SHOWN_JOB_ID_LENGTH = 200


def job_id_html(job_id: str) -> Markup:
    """A job_id as HTML: escaped, each control character or lone surrogate (which HTML cannot carry: NUL becomes
    U+FFFD, a surrogate cannot even be encoded) shown as a marked `U+0000`, and cut after 200 characters with
    how long it is."""
    parts: list[str] = []
    text, rest = _cut(job_id)
    while (found := control_character(text)) is not None:
        index, character = found
        parts.append(str(escape(text[:index])))
        code = f"U+{ord(character):04X}"
        kind = "lone surrogate" if 0xD800 <= ord(character) <= 0xDFFF else "control character"
        parts.append(f'<span class="control-character" title="{kind} {code}">{code}</span>')
        text = text[index + 1 :]
    parts.append(str(escape(text)))
    if rest:
        parts.append(f'<span class="muted">… ({len(job_id)} characters)</span>')
    return Markup("".join(parts))


def job_id_text(job_id: str) -> str:
    """A job_id as plain text (a page title, an attribute): as `job_id_html`, without the markup."""
    text, rest = _cut(job_id)
    shown = "".join(
        f"U+{ord(character):04X}" if control_character(character) is not None else character for character in text
    )
    return f"{shown}… ({len(job_id)} characters)" if rest else shown


def _cut(job_id: str) -> tuple[str, str]:
    return job_id[:SHOWN_JOB_ID_LENGTH], job_id[SHOWN_JOB_ID_LENGTH:]


async def _failing_checks(connection: Connection, waiting: list[dict[str, Any]]) -> dict[uuid.UUID, list[Any]]:
    """For each waiting job host's host: its gating checks that are not healthy (what it waits for)."""
    failing = {}
    for host_id in {row["host_id"] for row in waiting}:
        failing[host_id] = [
            check for check in await gating_check_summaries(connection, host_id) if check.healthy is not True
        ]
    return failing


async def _require_visible_host(context: ApiContext, session: sessions.Session, host_id: uuid.UUID) -> None:
    """404 unless the host is in the caller's groups: the same rule as the API's."""
    async with context.pool.acquire() as connection:
        await fetch_visible_host(connection, session.principal, host_id)


def _errors(problem: Problem) -> dict[str, str]:
    """The problem's messages by field (a field with several problems shows them all). A problem of one of a dns
    check's expected values (`expected_values.2`) is shown by their textarea, naming the value by its place."""
    errors: dict[str, str] = {}
    for error in problem.errors or []:
        field, message = error["field"], error["message"]
        list_field, _, index = field.partition(".")
        if list_field == "expected_values" and index.isdigit():
            field, message = list_field, f"value {int(index) + 1}: {message}"
        errors[field] = f"{errors[field]}; {message}" if field in errors else message
    return errors or {"form": problem.detail}


def _path_uuid(request: Request, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise Problem(404, "no such page") from None


def _raw_target(request: Request) -> str:
    """The request's path and query as the browser sent them, still percent-encoded: a `next` that leads back to
    `/jobs/deploy%2F2026%2F42`, which `request.url.path` (decoded: `/jobs/deploy/2026/42`) would not."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path is not None else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    return path + (f"?{query}" if query else "")


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _safe_next(target: object) -> str:
    """Only a path on this site: no scheme, no host, no `//` (an open redirect)."""
    if isinstance(target, str) and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/hosts"


def _ago(moment: dt.datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (dt.datetime.now(dt.UTC) - moment).total_seconds()
    if seconds < 60:
        return f"{max(0, int(seconds))} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def _until(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - dt.datetime.now(dt.UTC)).total_seconds()
    if seconds <= 0:
        return "closed"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s left"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min left"
