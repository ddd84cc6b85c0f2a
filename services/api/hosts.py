"""Hosts: `/api/v1/hosts` and `/api/v1/hosts/{host_id}`. The rows are written by shared/hosts.py."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pydantic_core
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.checks import delete_check_rows
from services.api.context import EVENT_SOURCE, ApiContext, context_of
from services.api.problems import conflict, field_errors, not_found, validation_problem
from services.api.requests import (
    Keyset,
    PageQuery,
    json_response,
    path_uuid,
    read_json,
    read_model,
    read_query,
    text_key,
)
from services.api.schemas import GroupName, HostCreate, HostName, HostView, HostWrite
from services.api.targets import address_problems
from shared import checks, hosts
from shared.audit import diff, record_audit
from shared.check_state import forget_status
from shared.database import Connection
from shared.events import HostHealthStatus
from shared.schedule import schedule_first_runs

# Hosts page by name (unique); the cursor holds the last name.
HOST_PAGES: Keyset[str] = Keyset(1, text_key, lambda row: (row["name"],))


class HostListQuery(PageQuery):
    group: GroupName | None = Field(None, description="only hosts of this group")
    health_check_status: HostHealthStatus | None = Field(None, description="only hosts in this state")
    name: HostName | None = Field(None, description="only the host of this name (names are unique): a lookup by name")


def host_view(row: asyncpg.Record) -> HostView:
    """A host row (shared.hosts.HOST_VIEW_COLUMNS) as the API shows it."""
    return HostView.model_validate(hosts.host_values(row))


def host_fields(row: asyncpg.Record | HostWrite) -> dict[str, Any]:
    """The writable fields of a host, as audited."""
    if isinstance(row, BaseModel):
        return {"name": row.name, "group": row.group, "agent_url": row.agent_url}
    return {"name": row["name"], "group": row["group"], "agent_url": row["agent_url"]}


async def fetch_visible_host(
    connection: Connection, principal: Principal, host_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record:
    row = await hosts.fetch_host(connection, host_id, for_update=for_update)
    if row is None or not principal.sees_group(row["group"]):
        raise not_found("host")
    return row


async def list_hosts(request: Request, principal: Principal) -> Response:
    query = read_query(request, HostListQuery)
    rows, next_cursor = await fetch_host_page(context_of(request).pool, principal, query)
    # The hottest page: rows go straight to JSON (the same bytes as Page[HostView]) without building
    # a model per row, which was a third of the handler's time.
    page = {"items": [hosts.host_values(row) for row in rows], "next_cursor": next_cursor}
    return Response(pydantic_core.to_json(page), media_type="application/json")


async def fetch_host_page(
    pool: asyncpg.Pool, principal: Principal, query: HostListQuery
) -> tuple[list[asyncpg.Record], str | None]:
    """A page of the caller's hosts by name, and the cursor of the next page (the API and dashboard)."""
    rows = await hosts.host_page(
        pool, groups=principal.visible_groups(), group=query.group, status=query.health_check_status,
        name=query.name, after_name=HOST_PAGES.after(query.cursor), limit=HOST_PAGES.rows_to_fetch(query.limit),
    )  # fmt: skip
    return HOST_PAGES.page(rows, query.limit)


async def create_host(request: Request, principal: Principal) -> Response:
    body: HostCreate = await read_model(request, HostCreate)
    row = await create_host_on(context_of(request).pool, principal, body)
    return json_response(host_view(row), 201)


async def create_host_on(pool: asyncpg.Pool, principal: Principal, body: HostCreate) -> asyncpg.Record:
    """Create a host and its audit entry in one transaction (the API's POST and the dashboard's host form);
    the new row (HOST_VIEW_COLUMNS). Raises a 409 Problem when the name or the id is taken."""
    host_id = body.id or uuid.uuid4()
    async with pool.acquire() as connection, connection.transaction():
        try:
            row = await hosts.insert_host(
                connection, host_id, name=body.name, group=body.group, agent_url=body.agent_url
            )
        except asyncpg.UniqueViolationError as exc:
            raise _host_conflict(exc, body.name, host_id) from None
        await audit_host(connection, principal, "host.create", host_id, host_fields(body))
    return row


async def get_host(request: Request, principal: Principal) -> Response:
    host_id = path_uuid(request, "host_id")
    async with context_of(request).pool.acquire() as connection:
        row = await fetch_visible_host(connection, principal, host_id)
    return json_response(host_view(row))


async def update_host(request: Request, principal: Principal) -> Response:
    host_id = path_uuid(request, "host_id")
    document = await read_json(request)
    row = await update_host_on(context_of(request).pool, principal, host_id, document)
    return json_response(host_view(row))


async def update_host_on(pool: asyncpg.Pool, principal: Principal, host_id: uuid.UUID, document: Any) -> asyncpg.Record:
    """Replace a host's writable fields from a PUT body (`document`, parsed JSON or the dashboard's form as a
    dict) and audit the change, in one transaction (the API's PUT and the dashboard's host form); the row after.
    Checks whose target is the host's name or agent_url, when that changes, are `unknown` until they have run
    against the new one (within 5 s). Raises a 404 Problem for a host outside the caller's groups, a 422 listing
    every field problem (the body's and the host's checks' rules, `_rule_errors`) and a 409 when the new name is
    taken."""
    try:
        body: HostWrite | None = HostWrite.model_validate(document)
        errors: list[dict[str, str]] = []
    except ValidationError as exc:
        body, errors = None, validation_problem(exc).errors or []
    async with pool.acquire() as connection, connection.transaction():
        before = await fetch_visible_host(connection, principal, host_id, for_update=True)
        errors += await _rule_errors(connection, host_id, before, document, errors)
        if errors or body is None:
            raise field_errors(errors)
        try:
            row = await hosts.update_host(
                connection, host_id, name=body.name, group=body.group, agent_url=body.agent_url
            )
        except asyncpg.UniqueViolationError as exc:
            raise _host_conflict(exc, body.name, host_id) from None
        await audit_host(connection, principal, "host.update", host_id, diff(host_fields(before), host_fields(body)))
        retargeted = await checks.checks_probing_host(
            connection, host_id, name=body.name != before["name"], agent_url=body.agent_url != before["agent_url"]
        )
        if retargeted:
            # Their last results judged another target: unknown until they have run against the new one, at once.
            await forget_status(connection, [check_id for check_id, _ in retargeted])
            await schedule_first_runs(connection, retargeted)
            await hosts.refresh_host_status(connection, host_id, source=EVENT_SOURCE)
            row = await hosts.fetch_host(connection, host_id) or row
    return row


async def _rule_errors(
    connection: Connection,
    host_id: uuid.UUID,
    before: asyncpg.Record,
    document: Any,
    field_problems: list[dict[str, str]],
) -> list[dict[str, str]]:
    """What the host's checks need of a changed host (CONTRACT §3), read from the raw body so that the
    answer lists these with the body's own problems: service checks need an `agent_url`; tcp checks
    without an address connect to the host's `name`, which must then be a host name or IP address."""
    if not isinstance(document, dict):
        return []
    bad_fields = {problem["field"] for problem in field_problems}
    errors = []
    if document.get("agent_url") is None and before["agent_url"] is not None:
        service_checks = await checks.count_service_checks(connection, host_id)
        if service_checks:
            message = f"required: the host has {service_checks} service check(s)"
            errors.append({"field": "agent_url", "message": message})
    name = document.get("name")
    if "name" not in bad_fields and isinstance(name, str) and name != before["name"]:
        problems = address_problems(name)
        counts = await checks.count_checks_without_address(connection, host_id) if problems else {}
        if counts:
            held = " and ".join(f"{count} {kind} check(s)" for kind, count in counts.items())
            errors.append(
                {
                    "field": "name",
                    "message": f"the host has {held} without an address, which connect to its name; "
                    f"this name {'; '.join(problems)}",
                }
            )
    return errors


async def delete_host(request: Request, principal: Principal) -> Response:
    await delete_host_on(context_of(request), principal, path_uuid(request, "host_id"))
    return Response(status_code=204)


async def delete_host_on(context: ApiContext, principal: Principal, host_id: uuid.UUID) -> None:
    """Delete a host with its checks (each through `delete_check_rows`: results, audit entry, event) and audit
    it, in one transaction (the API's DELETE and the dashboard's host form). A 404 Problem for a host outside the
    caller's groups."""
    async with context.pool.acquire() as connection, connection.transaction():
        before = await fetch_visible_host(connection, principal, host_id, for_update=True)
        for check_id in await checks.check_ids_of_host(connection, host_id):
            await delete_check_rows(connection, context, host_id, check_id, actor=principal.name, refresh_host=False)
        await hosts.delete_host(connection, host_id)
        await audit_host(connection, principal, "host.delete", host_id, host_fields(before))


async def audit_host(
    connection: Connection, principal: Principal, action: str, host_id: uuid.UUID, changes: dict[str, Any]
) -> None:
    await record_audit(
        connection, actor=principal.name, action=action, entity_type="host", entity_id=str(host_id),
        host_id=host_id, changes=changes,
    )  # fmt: skip


def _host_conflict(exc: asyncpg.UniqueViolationError, name: str, host_id: uuid.UUID) -> Exception:
    if exc.constraint_name == "hosts_name_unique":
        return conflict(f"a host named {name!r} already exists")
    return conflict(f"a host with id {host_id} already exists")
