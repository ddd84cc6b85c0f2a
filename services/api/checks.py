"""Health checks of a host: `/api/v1/hosts/{host_id}/health-checks[/{check_id}[/test|/results]]`.

Every change commits together with its audit entry, the host's recomputed summary and its
`check.config.*` event in the outbox. Each table is written through its owner: shared/checks.py,
shared/check_state.py, shared/schedule.py, shared/hosts.py, shared/audit.py, shared/outbox.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import AwareDatetime, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import ApiContext, context_of
from services.api.problems import Problem, conflict, field_errors, not_found, validation_problem
from services.api.requests import Keyset, PageQuery, json_response, path_uuid, read_json, read_query
from services.api.schemas import (
    CHECK_WRITE_MODELS,
    COMMON_WRITABLE_FIELDS,
    FIELDS_OF_TYPE,
    WRITE_ONLY_FIELDS,
    CheckCommonFields,
    CheckWriteBase,
    GroupName,
    HttpCheckWrite,
    ItemList,
    Page,
    ResultView,
)
from services.api.targets import address_problems
from shared import checks, results, uptime
from shared.audit import diff, record_audit
from shared.check_state import create_state, forget_status
from shared.crypto import DecryptionError
from shared.database import Connection
from shared.events import CheckConfigChanged, CheckResult, CheckResultView, CheckRunRequest, CheckView
from shared.hosts import host_exists, lock_host, refresh_host_status
from shared.messaging import PublishFailed, Unroutable
from shared.outbox import enqueue
from shared.schedule import schedule_first_run

MAX_CHECKS_PER_HOST = 5
TEST_RUN_GRACE_SECONDS = 5

# A check's own type's columns as the API shows them (the password never), and every stored column.
TYPE_COLUMNS = {
    kind: tuple(name for name in names if name not in WRITE_ONLY_FIELDS) for kind, names in FIELDS_OF_TYPE.items()
}
# Types share some columns (port, address, ignore_cert_errors): each is listed once.
WRITABLE_COLUMNS = tuple(
    dict.fromkeys(
        (
            *COMMON_WRITABLE_FIELDS,
            *(name for names in TYPE_COLUMNS.values() for name in names),
            "basic_auth_pass_encrypted",
        )
    )
)
# What a check's status does not depend on: a change of anything else (its type, target, timeout, expectations,
# credentials) makes the check `unknown` until its first result of the new configuration (`forget_status`).
STATUS_KEEPING_FIELDS = frozenset(
    {"name", "enabled", "critical", "interval_seconds", "failures_before_unhealthy", "successes_before_healthy"}
)
VIEW_COLUMNS = ("id", "host_id", *COMMON_WRITABLE_FIELDS, "status", "healthy_since", "created_at", "updated_at")
# A check's results page newest first by (checked_at, id); the cursor holds the last row's.
RESULT_PAGES: Keyset[tuple[dt.datetime, uuid.UUID]] = Keyset(
    2,
    lambda checked_at, result_id: (dt.datetime.fromisoformat(checked_at), uuid.UUID(result_id)),
    lambda row: (row["checked_at"].isoformat(), str(row["id"])),
)


# Every visible check pages by id; the cursor holds the last id.
CHECK_PAGES: Keyset[uuid.UUID] = Keyset(1, uuid.UUID, lambda row: (str(row["id"]),))


class CheckListQuery(PageQuery):
    group: GroupName | None = Field(None, description="only checks of hosts of this group")


class ResultListQuery(PageQuery):
    since: AwareDatetime | None = Field(None, description="results at or after this time")
    until: AwareDatetime | None = Field(None, description="results before this time")


def check_view(row: asyncpg.Record, *, uptime_24h: float | None) -> CheckView:
    """The API's view of a check (`row`: shared.checks.CHECK_SELECT): common fields and its own type's fields, never
    the password; `uptime_24h` as shared.uptime.uptime_24h reads it."""
    last_result = None
    if row["last_checked_at"] is not None:
        last_result = CheckResultView(
            healthy=row["last_healthy"],
            reason=row["last_reason"],
            detail=row["last_detail"],
            latency_ms=row["last_latency_ms"],
            checked_at=row["last_checked_at"],
            cert_expires_at=row["last_cert_expires_at"],
        )
    values: dict[str, Any] = {name: row[name] for name in (*VIEW_COLUMNS, *TYPE_COLUMNS[row["check_type"]])}
    values["last_result"] = last_result
    values["basic_auth_pass_set"] = row["basic_auth_pass_encrypted"] is not None
    values["uptime_24h"] = uptime_24h
    return CheckView.model_validate(values)


async def check_views(connection: Connection, rows: list[asyncpg.Record]) -> list[CheckView]:
    """The API's views of these checks, in their order, their `uptime_24h` read at once (CONTRACT §3)."""
    shares = await uptime.uptime_24h(connection, [row["id"] for row in rows])
    return [check_view(row, uptime_24h=shares[row["id"]]) for row in rows]


def audited_fields(values: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """A check's writable fields for the audit log; the password appears only as changed or not."""
    fields = {name: values[name] for name in WRITABLE_COLUMNS if name != "basic_auth_pass_encrypted"}
    if values["basic_auth_pass_encrypted"] is not None:
        fields["basic_auth_pass"] = values["basic_auth_pass_encrypted"]
    return {key: value for key, value in fields.items() if value is not None}


async def audit_check(
    connection: Connection,
    actor: str,
    action: str,
    host_id: uuid.UUID,
    check_id: uuid.UUID,
    changes: dict[str, Any],
) -> None:
    await record_audit(
        connection, actor=actor, action=action, entity_type="health_check", entity_id=str(check_id),
        host_id=host_id, changes=changes,
    )  # fmt: skip


@dataclass(frozen=True)
class CheckRequest:
    """A check's body as read: its model when the body is valid, every problem found in it, and what
    the rules about the host need. Nothing raises here, so that one 422 can list the body's problems
    together with the host's (`checked_against`)."""

    body: CheckWriteBase | None
    errors: list[dict[str, str]]
    check_type: str | None
    has_address: bool
    # What the body says of basic auth, read from the raw document (the rules about a stored password need it
    # whether or not the rest of the body is valid): a user given (not null), and basic_auth_pass present at all.
    has_basic_auth_user: bool = False
    mentions_basic_auth_pass: bool = False

    def problems_on(self, host: asyncpg.Record | Mapping[str, Any]) -> list[dict[str, str]]:
        """Every problem of the body and of the rules about `host` (its `name` and `agent_url`) as 422 errors
        ({"field", "message"}); none for a new check that may be created on that host."""
        return [*self.errors, *_host_rule_errors(self, host)]

    def checked_against(self, host: asyncpg.Record, before: asyncpg.Record | None = None) -> CheckWriteBase:
        """The valid body, or a 422 listing every problem of the body, of the rules about `host` (a service
        check needs the host's agent_url; a tcp check without address connects to the host's name, which must
        then be a host name or an IP address) and, on an update, of the rules about the check as stored
        (`before`: a stored password needs a user, see `_stored_password_errors`)."""
        errors = [*self.problems_on(host), *_stored_password_errors(self, before)]
        if errors or self.body is None:
            raise field_errors(errors or [{"field": "body", "message": "not a valid check"}])
        return self.body


STORED_PASSWORD_NEEDS_USER = (
    "required while a basic_auth_pass is stored: the password is sent only with a user. Give the user to keep "
    "the password, or send basic_auth_pass: null to clear it"
)


def _stored_password_errors(submitted: CheckRequest, before: asyncpg.Record | None) -> list[dict[str, str]]:
    """CONTRACT §3: on PUT an omitted basic_auth_pass is kept and only null clears it. A password without a
    user cannot be kept (Basic authentication is sent only when basic_auth_user is set, §4), so an http PUT
    that drops the user of a check with a stored password, and does not say basic_auth_pass: null, would
    either erase the password silently or keep one that is never sent: it is refused, naming
    basic_auth_user. A change to another check type drops every http field, the password included."""
    if (
        before is not None
        and before["basic_auth_pass_encrypted"] is not None
        and submitted.check_type == "http"
        and not submitted.has_basic_auth_user
        and not submitted.mentions_basic_auth_pass
    ):
        return [{"field": "basic_auth_user", "message": STORED_PASSWORD_NEEDS_USER}]
    return []


def _host_rule_errors(submitted: CheckRequest, host: asyncpg.Record | Mapping[str, Any]) -> list[dict[str, str]]:
    errors = []
    if submitted.check_type == "service" and host["agent_url"] is None:
        errors.append(
            {"field": "check_type", "message": "a service check needs the host's agent_url; set it on the host first"}
        )
    if submitted.check_type in ("tcp", "grpc") and not submitted.has_address:
        problems = address_problems(host["name"])
        if problems:
            errors.append(
                {
                    "field": "address",
                    "message": f"required: without it the check connects to the host's name {host['name']!r}, "
                    f"which {'; '.join(problems)}",
                }
            )
    return errors


async def read_check_write(request: Request) -> CheckRequest:
    return parse_check_write(await read_json(request))


def parse_check_write(document: object) -> CheckRequest:
    """A body as the model of its `check_type`, with every problem found: fields of another check type
    are refused by name, and with no known `check_type` the common fields are still checked."""
    if not isinstance(document, dict):
        return CheckRequest(None, [{"field": "body", "message": "must be a JSON object"}], None, False)
    check_type = document.get("check_type")
    model = CHECK_WRITE_MODELS.get(check_type) if isinstance(check_type, str) else None
    known_type = check_type if model is not None else None
    has_address = document.get("address") is not None
    basic_auth = {
        "has_basic_auth_user": document.get("basic_auth_user") is not None,
        "mentions_basic_auth_pass": "basic_auth_pass" in document,
    }
    errors: list[dict[str, str]] = []
    if model is None:
        errors.append({"field": "check_type", "message": f"must be one of: {', '.join(CHECK_WRITE_MODELS)}"})
        model = CheckCommonFields
    try:
        body = model.model_validate(document)
    except ValidationError as exc:
        for error in validation_problem(exc).errors or []:
            owners = [kind for kind, names in FIELDS_OF_TYPE.items() if error["field"] in names]
            if error["message"] == "unknown field" and owners:
                error["message"] = f"a field of {' and '.join(owners)} checks, not of {check_type} checks"
            errors.append(error)
        return CheckRequest(None, errors, known_type, has_address, **basic_auth)
    return CheckRequest(body if not errors else None, errors, known_type, has_address, **basic_auth)


def column_values(
    body: CheckWriteBase, context: ApiContext, check_id: uuid.UUID, stored_password: bytes | None
) -> dict[str, Any]:
    """The row to store for a validated body: other types' columns NULL, defaults from configuration."""
    values: dict[str, Any] = dict.fromkeys(WRITABLE_COLUMNS)
    values |= {
        "name": body.name,
        "enabled": body.enabled,
        "critical": body.critical,
        "interval_seconds": body.interval_seconds or context.settings.poll_interval_seconds,
        "timeout_seconds": body.timeout_seconds or context.settings.check_timeout_seconds,
        "failures_before_unhealthy": body.failures_before_unhealthy,
        "successes_before_healthy": body.successes_before_healthy,
        "max_latency_ms": body.max_latency_ms,
    }
    if not isinstance(body, HttpCheckWrite):
        # The other types store their fields as the body holds them (FIELDS_OF_TYPE names them).
        fields = body.model_dump()
        values |= {name: fields[name] for name in ("check_type", *TYPE_COLUMNS[fields["check_type"]])}
    else:
        if "basic_auth_pass" in body.model_fields_set:
            password = _stored_password(context, check_id, body.basic_auth_pass, stored_password)
        else:
            password = stored_password
        values |= {
            "check_type": "http",
            "url": body.url,
            "method": body.method,
            "expected_status": body.expected_status,
            "expected_body": body.expected_body or None,
            "ignore_cert_errors": body.ignore_cert_errors,
            "follow_redirects": body.follow_redirects,
            "basic_auth_user": body.basic_auth_user,
            # Without a user there is nothing to send a password with. A PUT that drops the user of a stored
            # password is refused before this (`_stored_password_errors`) unless it clears the password.
            "basic_auth_pass_encrypted": password if body.basic_auth_user is not None else None,
            "condition": body.condition,
            "min_cert_days": body.min_cert_days,
        }
    return values


def writable_columns(values: dict[str, Any]) -> dict[str, Any]:
    """The stored columns of `column_values`, in WRITABLE_COLUMNS order."""
    return {name: values[name] for name in WRITABLE_COLUMNS}


def _stored_password(
    context: ApiContext, check_id: uuid.UUID, submitted: str | None, stored: bytes | None
) -> bytes | None:
    """The ciphertext to store for a submitted password: the stored one when it holds the same password
    (a fresh nonce would make the same password look changed, and an update that changes nothing must
    change nothing: no `updated_at`, no event, no reschedule), else a new encryption."""
    if submitted is None:
        return None
    if stored is not None:
        try:
            if context.secrets.decrypt(stored, check_id) == submitted:
                return stored
        except DecryptionError:
            pass  # written under another key: the submitted password replaces it
    return context.secrets.encrypt(submitted, check_id)


async def _lock_host_for_checks(connection: Connection, host_id: uuid.UUID) -> asyncpg.Record:
    """Lock the host: serialises the 5-check limit and the host summary against concurrent writers."""
    host = await lock_host(connection, host_id)
    if host is None:
        raise not_found("host")
    return host


async def _fetch_check(
    connection: Connection, host_id: uuid.UUID, check_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record:
    row = await checks.fetch_check(connection, host_id, check_id, for_update=for_update)
    if row is None:
        raise not_found("health check")
    return row


async def list_checks(request: Request, principal: Principal) -> Response:
    host_id = path_uuid(request, "host_id")
    async with context_of(request).pool.acquire() as connection:
        if not await host_exists(connection, host_id):
            raise not_found("host")
        views = await check_views(connection, await checks.checks_of_host(connection, host_id))
    return json_response(ItemList[CheckView](items=views))


async def list_all_checks(request: Request, principal: Principal) -> Response:
    """Every check of the caller's hosts, a page at a time by id (optionally of one group): a fleet's checks
    without one read per host (`healthgate apply` and `export`)."""
    query = read_query(request, CheckListQuery)
    async with context_of(request).pool.acquire() as connection:
        rows = await checks.check_page(
            connection, groups=principal.visible_groups(), group=query.group,
            after_id=CHECK_PAGES.after(query.cursor), limit=CHECK_PAGES.rows_to_fetch(query.limit),
        )  # fmt: skip
        rows, next_cursor = CHECK_PAGES.page(rows, query.limit)
        views = await check_views(connection, rows)
    return json_response(Page[CheckView](items=views, next_cursor=next_cursor))


async def create_check(request: Request, principal: Principal) -> Response:
    submitted = await read_check_write(request)
    view = await create_check_on(context_of(request), principal.name, path_uuid(request, "host_id"), submitted)
    return json_response(view, 201)


async def create_check_on(context: ApiContext, actor: str, host_id: uuid.UUID, submitted: CheckRequest) -> CheckView:
    """Create a check (the API's POST and the dashboard's form): rules, limit, audit, event."""
    check_id = uuid.uuid4()
    async with context.pool.acquire() as connection, connection.transaction():
        host = await _lock_host_for_checks(connection, host_id)
        body = submitted.checked_against(host)
        values = column_values(body, context, check_id, stored_password=None)
        existing = await checks.count_checks(connection, host_id)
        if existing >= MAX_CHECKS_PER_HOST:
            raise conflict(f"a host may have at most {MAX_CHECKS_PER_HOST} health checks; this one has {existing}")
        try:
            await checks.insert_check(connection, check_id, host_id, writable_columns(values))
        except asyncpg.UniqueViolationError:
            raise conflict(f"this host already has a check named {body.name!r}") from None
        await create_state(connection, check_id, host_id)
        await schedule_first_run(connection, check_id, enabled=body.enabled)
        await refresh_host_status(connection, host_id, source=context.source)
        row = await _fetch_check(connection, host_id, check_id)
        view = check_view(row, uptime_24h=None)  # a new check has no result yet
        await audit_check(connection, actor, "health_check.create", host_id, check_id, audited_fields(values))
        await enqueue(connection, "check.config.created", CheckConfigChanged(check=view), source=context.source)
    return view


async def get_check(request: Request, principal: Principal) -> Response:
    host_id, check_id = path_uuid(request, "host_id"), path_uuid(request, "check_id")
    async with context_of(request).pool.acquire() as connection:
        [view] = await check_views(connection, [await _fetch_check(connection, host_id, check_id)])
    return json_response(view)


async def update_check(request: Request, principal: Principal) -> Response:
    host_id, check_id = path_uuid(request, "host_id"), path_uuid(request, "check_id")
    submitted = await read_check_write(request)
    return json_response(await update_check_on(context_of(request), principal.name, host_id, check_id, submitted))


async def update_check_on(
    context: ApiContext, actor: str, host_id: uuid.UUID, check_id: uuid.UUID, submitted: CheckRequest
) -> CheckView:
    """Replace a check's writable fields (PUT semantics; the password omitted is kept). A change of what it probes
    or how a result is judged (any field outside STATUS_KEEPING_FIELDS) makes it `unknown` again."""
    async with context.pool.acquire() as connection, connection.transaction():
        host = await _lock_host_for_checks(connection, host_id)
        before = await _fetch_check(connection, host_id, check_id, for_update=True)
        body = submitted.checked_against(host, before)
        values = column_values(body, context, check_id, stored_password=before["basic_auth_pass_encrypted"])
        changes = diff(audited_fields(before), audited_fields(values))
        # An update that changes nothing writes nothing: `updated_at` stays, no event, no reschedule.
        if changes:
            try:
                await checks.update_check(connection, check_id, host_id, writable_columns(values))
            except asyncpg.UniqueViolationError:
                raise conflict(f"this host already has a check named {body.name!r}") from None
            await schedule_first_run(connection, check_id, enabled=body.enabled)
            if set(changes) - STATUS_KEEPING_FIELDS:
                # Its last result judged another target or by other rules: the gate must not release on it.
                await forget_status(connection, [check_id])
        await refresh_host_status(connection, host_id, source=context.source)
        [view] = await check_views(connection, [await _fetch_check(connection, host_id, check_id)])
        await audit_check(connection, actor, "health_check.update", host_id, check_id, changes)
        if changes:
            await enqueue(connection, "check.config.updated", CheckConfigChanged(check=view), source=context.source)
    return view


async def delete_check_rows(
    connection: Connection,
    context: ApiContext,
    host_id: uuid.UUID,
    check_id: uuid.UUID,
    *,
    actor: str,
    refresh_host: bool = True,
) -> None:
    """Delete a check with its state and results, audited, and publish `check.config.deleted`."""
    before = await _fetch_check(connection, host_id, check_id, for_update=True)
    [view] = await check_views(connection, [before])  # read before its hourly counts go with it
    await checks.delete_check(connection, check_id)
    if refresh_host:
        await refresh_host_status(connection, host_id, source=context.source)
    await audit_check(connection, actor, "health_check.delete", host_id, check_id, audited_fields(before))
    await enqueue(connection, "check.config.deleted", CheckConfigChanged(check=view), source=context.source)


async def delete_check(request: Request, principal: Principal) -> Response:
    host_id, check_id = path_uuid(request, "host_id"), path_uuid(request, "check_id")
    await delete_check_on(context_of(request), principal.name, host_id, check_id)
    return Response(status_code=204)


async def delete_check_on(context: ApiContext, actor: str, host_id: uuid.UUID, check_id: uuid.UUID) -> None:
    async with context.pool.acquire() as connection, connection.transaction():
        await _lock_host_for_checks(connection, host_id)
        await delete_check_rows(connection, context, host_id, check_id, actor=actor)


async def test_check(request: Request, principal: Principal) -> Response:
    host_id, check_id = path_uuid(request, "host_id"), path_uuid(request, "check_id")
    result = await run_check_now(context_of(request), principal.name, host_id, check_id)
    return json_response(ResultView.model_validate(result.model_dump()))


async def run_check_now(context: ApiContext, actor: str, host_id: uuid.UUID, check_id: uuid.UUID) -> CheckResult:
    """Ask a poller to run the check now (audited); 503 without a broker, 504 without an answer, 404 when the
    check was deleted while it ran (a poller stores no result of a deleted check, and answers with none)."""
    async with context.pool.acquire() as connection, connection.transaction():
        row = await _fetch_check(connection, host_id, check_id)
        await audit_check(connection, actor, "health_check.test", host_id, check_id, {})
    timeout = row["timeout_seconds"] + TEST_RUN_GRACE_SECONDS
    try:
        result = await context.check_runs.run(
            CheckRunRequest(check_id=check_id, host_id=host_id, requested_by=actor), timeout
        )
    except PublishFailed:
        raise Problem(503, "the message broker is unavailable; try again shortly") from None
    except Unroutable:  # the exchange was declared again without our bindings; the Broker has bound them again
        raise Problem(503, "no poller queue was bound on the message broker; bound again, try again shortly") from None
    if result is None:
        async with context.pool.acquire() as connection:
            gone = await checks.fetch_check(connection, host_id, check_id) is None
        if gone:  # deleted while it ran: the poller stored no result of it, and so sent none
            raise Problem(404, "health check not found: it was deleted while it ran")
        raise Problem(504, f"no poller answered within {timeout:g} s")
    return result


async def list_results(request: Request, principal: Principal) -> Response:
    host_id, check_id = path_uuid(request, "host_id"), path_uuid(request, "check_id")
    query = read_query(request, ResultListQuery)
    after = RESULT_PAGES.after(query.cursor)
    async with context_of(request).pool.acquire() as connection:
        await _fetch_check(connection, host_id, check_id)
        rows = await results.result_page(
            connection, check_id, since=query.since, until=query.until, after=after,
            limit=RESULT_PAGES.rows_to_fetch(query.limit),
        )  # fmt: skip
    rows, next_cursor = RESULT_PAGES.page(rows, query.limit)
    items = [ResultView.model_validate(dict(row)) for row in rows]
    return json_response(Page[ResultView](items=items, next_cursor=next_cursor))
