"""Many hosts with their checks in one request: `POST /api/v1/hosts:batchCreate` (the `:batchCreate` custom
method of Google's API design guide, AIP-233: all or none).

`healthgate apply` creates a new fleet through it: a 5,000-host, 20,000-check file is 50 requests of 100 hosts
instead of 25,000, and each request writes its rows with one statement per table (shared/hosts.py, checks.py,
check_state.py, schedule.py, audit.py, outbox.py own them) instead of ten round trips per check. What is written
is what the single-item endpoints write: each host's and each check's audit entry, each check's state, first run
and `check.config.created` event, and each host's summary (with `host.status_changed` on a flip).

Every problem of the batch is answered in one 422 naming `hosts[i].field` and `hosts[i].checks[j].field` (the
same messages as POST /api/v1/hosts and POST .../health-checks); a name or id already taken is a 409 naming it;
in both cases nothing is created.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.checks import audited_fields, check_view, column_values, parse_check_write, writable_columns
from services.api.context import ApiContext, context_of
from services.api.hosts import host_fields, host_view
from services.api.problems import conflict, field_errors, validation_problem
from services.api.requests import json_response, read_json
from services.api.schemas import MAX_BATCH_HOSTS, CheckWriteBase, HostCreate, HostView, ItemList
from shared import checks, hosts
from shared.audit import AuditEntry, record_audits
from shared.check_state import create_states
from shared.events import CheckConfigChanged
from shared.outbox import enqueue_many
from shared.schedule import schedule_first_runs

MAX_CHECKS_PER_HOST = 5
# 100 hosts of 5 checks with long URLs, conditions and expected bodies stay well under this.
MAX_BATCH_BYTES = 2 * 1024 * 1024
# How many taken names a 409 lists before "and N more".
NAMED_IN_CONFLICT = 5


@dataclass(frozen=True)
class NewHost:
    """A host of a batch, validated: its id (the body's or a new one), its fields and its checks' bodies."""

    id: uuid.UUID
    body: HostCreate
    checks: list[CheckWriteBase]


async def batch_create_hosts(request: Request, principal: Principal) -> Response:
    context = context_of(request)
    new_hosts = read_batch(await read_json(request, limit=MAX_BATCH_BYTES))
    rows = await create_hosts_on(context, principal, new_hosts)
    return json_response(ItemList[HostView](items=[host_view(row) for row in rows]), 201)


def read_batch(document: Any) -> list[NewHost]:
    """The hosts of a batch body `{"hosts": [{...host fields, "checks": [...]}]}` (1 to MAX_BATCH_HOSTS), or a
    422 Problem listing every problem found in it, with its place (`hosts[3].checks[1].port`)."""
    if not isinstance(document, dict):
        raise field_errors([{"field": "body", "message": "must be a JSON object"}])
    errors: list[dict[str, str]] = [{"field": name, "message": "unknown field"} for name in document if name != "hosts"]
    items = document.get("hosts")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_HOSTS:
        errors.append({"field": "hosts", "message": f"must be a list of 1 to {MAX_BATCH_HOSTS} hosts"})
        raise field_errors(errors)
    new_hosts: list[NewHost] = []
    names: dict[str, int] = {}
    ids: dict[uuid.UUID, int] = {}
    for index, item in enumerate(items):
        place = f"hosts[{index}]"
        if not isinstance(item, dict):
            errors.append({"field": place, "message": "must be a JSON object"})
            continue
        host: HostCreate | None = None
        try:
            host = HostCreate.model_validate({key: value for key, value in item.items() if key != "checks"})
        except ValidationError as exc:
            errors.extend(validation_problem(exc, prefix=f"{place}.").errors or [])
        if host is not None:
            if host.name in names:
                errors.append(
                    {"field": f"{place}.name", "message": f"named twice in this batch (hosts[{names[host.name]}])"}
                )
            names.setdefault(host.name, index)
            if host.id is not None:
                if host.id in ids:
                    errors.append({"field": f"{place}.id", "message": f"the same id as hosts[{ids[host.id]}]"})
                ids.setdefault(host.id, index)
        bodies = _read_checks(item.get("checks", []), place, host, errors)
        if host is not None and bodies is not None:
            new_hosts.append(NewHost(host.id or uuid.uuid4(), host, bodies))
    if errors:
        raise field_errors(errors)
    return new_hosts


def _read_checks(
    raw: Any, place: str, host: HostCreate | None, errors: list[dict[str, str]]
) -> list[CheckWriteBase] | None:
    """A batch host's checks as the single-check endpoint reads them (their rules about the host too, when the
    host itself is valid); None when one is not valid, its problems added to `errors`."""
    if not isinstance(raw, list) or len(raw) > MAX_CHECKS_PER_HOST:
        errors.append(
            {"field": f"{place}.checks", "message": f"must be a list of at most {MAX_CHECKS_PER_HOST} checks"}
        )
        return None
    bodies: list[CheckWriteBase] = []
    seen: dict[str, int] = {}
    valid = True
    for number, document in enumerate(raw):
        check_place = f"{place}.checks[{number}]"
        submitted = parse_check_write(document)
        problems = (
            submitted.problems_on({"name": host.name, "agent_url": host.agent_url})
            if host is not None
            else submitted.errors
        )
        errors.extend(
            {"field": check_place if problem["field"] == "body" else f"{check_place}.{problem['field']}",
             "message": problem["message"]}
            for problem in problems
        )  # fmt: skip
        body = submitted.body
        if problems or body is None:
            valid = False
            continue
        if body.name in seen:
            errors.append(
                {"field": f"{check_place}.name", "message": f"named twice on this host (checks[{seen[body.name]}])"}
            )
            valid = False
        seen.setdefault(body.name, number)
        bodies.append(body)
    return bodies if valid else None


async def create_hosts_on(context: ApiContext, principal: Principal, new_hosts: list[NewHost]) -> list[asyncpg.Record]:
    """Create the hosts and their checks in one transaction, as POST /api/v1/hosts and POST .../health-checks
    would one by one (audit, state, first run, event, host summary); the hosts' rows after (HOST_VIEW_COLUMNS,
    by name). Raises a 409 Problem naming the names or ids already taken (nothing is created then)."""
    host_ids = [host.id for host in new_hosts]
    host_rows = [(host.id, host.body.name, host.body.group, host.body.agent_url) for host in new_hosts]
    check_rows: list[tuple[uuid.UUID, uuid.UUID, dict[str, Any]]] = []
    entries: list[AuditEntry] = []
    for host in new_hosts:
        entries.append(AuditEntry("host.create", "host", str(host.id), host_fields(host.body), host.id))
        for body in host.checks:
            check_id = uuid.uuid4()
            values = column_values(body, context, check_id, stored_password=None)
            check_rows.append((check_id, host.id, writable_columns(values)))
            entries.append(
                AuditEntry("health_check.create", "health_check", str(check_id), audited_fields(values), host.id)
            )
    async with context.pool.acquire() as connection, connection.transaction():
        taken = await hosts.taken_names_and_ids(connection, [host.body.name for host in new_hosts], host_ids)
        if taken:
            raise conflict(_taken_detail(taken, {host.body.name for host in new_hosts}))
        try:
            await hosts.insert_hosts(connection, host_rows)
        except asyncpg.UniqueViolationError:
            raise conflict("a host of this batch was created meanwhile; nothing was created") from None
        await checks.insert_checks(connection, check_rows)
        await create_states(connection, [(check_id, host_id) for check_id, host_id, _ in check_rows])
        await schedule_first_runs(
            connection, [(check_id, bool(values["enabled"])) for check_id, _, values in check_rows]
        )
        for host_id in host_ids:
            await hosts.refresh_host_status(connection, host_id, source=context.source)
        views = [check_view(row, uptime_24h=None) for row in await checks.checks_of_hosts(connection, host_ids)]
        await record_audits(connection, actor=principal.name, entries=entries)
        await enqueue_many(
            connection, [("check.config.created", CheckConfigChanged(check=view)) for view in views],
            source=context.source,
        )  # fmt: skip
        return await hosts.fetch_hosts(connection, host_ids)


def _taken_detail(taken: list[asyncpg.Record], names: set[str]) -> str:
    shown = [
        f"a host named {row['name']!r}" if row["name"] in names else f"a host with id {row['id']}"
        for row in taken[:NAMED_IN_CONFLICT]
    ]
    more = f" and {len(taken) - NAMED_IN_CONFLICT} more" if len(taken) > NAMED_IN_CONFLICT else ""
    return f"{', '.join(shown)}{more} already exist(s); nothing was created"
