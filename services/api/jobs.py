"""Gate jobs as the API shows them, read from the gate's table, and the admin's manual override."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Literal

import asyncpg
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import ApiContext, context_of
from services.api.problems import conflict, field_errors, not_found
from services.api.requests import (
    PageQuery,
    decode_cursor,
    encode_cursor,
    json_response,
    path_job_id,
    path_uuid,
    read_model,
    read_query,
)
from services.api.schemas import JobHostView, JobListItem, JobView, OverrideRequest, Page
from shared.audit import record_audit
from shared.database import locked_now
from shared.events import JobFailed, JobReleased, decision_event_id, job_key, received_job_id
from shared.gating import gating_check_summaries
from shared.outbox import enqueue

JOB_COLUMNS = """
    j.job_id, j.host_id, j.status, j.window_ends_at, j.received_at, j.decided_at, j.reason, j.detail,
    j.checks, j.overridden_by, j.override_reason, j.received_job_id
"""
# Scoping: admins see every job host; others those whose host is in one of their groups.
VISIBLE = '($1::text[] IS NULL OR EXISTS (SELECT 1 FROM hosts h WHERE h.id = j.host_id AND h."group" = ANY($1)))'


class JobListQuery(PageQuery):
    """`GET /api/v1/jobs?status=&host_id=` (CONTRACT §3): both filters optional, combined with AND."""

    status: Literal["waiting_health_check", "released", "failed", "cancelled"] | None = Field(
        None, description="only job hosts in this state"
    )
    host_id: uuid.UUID | None = Field(
        None, description="only this host's job hosts (a host outside the caller's groups gives an empty page)"
    )


def job_host_fields(row: asyncpg.Record) -> dict[str, Any]:
    """A gate_jobs row (JOB_COLUMNS) as the fields of a job host view, its `job_id` the one received."""
    values = dict(row)
    values["checks"] = json.loads(values["checks"]) if isinstance(values["checks"], str) else values["checks"]
    values["job_id"] = received_job_id(values["job_id"], values.pop("received_job_id"))
    return values


async def get_job(request: Request, principal: Principal) -> Response:
    """A job's hosts, found by the key the gate stored the job_id under (`job_key`: the job_id itself when it
    is valid), and shown with the job_id as received (CONTRACT §3: every job id works)."""
    job_id = path_job_id(request)
    rows = await context_of(request).pool.fetch(
        f"SELECT {JOB_COLUMNS} FROM gate_jobs j WHERE j.job_id = $2 AND {VISIBLE} ORDER BY j.received_at, j.host_id",
        principal.visible_groups(),
        job_key(job_id),
    )
    if not rows:
        raise not_found("job")
    hosts = [JobHostView.model_validate(job_host_fields(row)) for row in rows]
    return json_response(JobView(job_id=job_id, hosts=hosts))


async def list_jobs(request: Request, principal: Principal) -> Response:
    """A page of job hosts, newest first, scoped, optionally by status and host, each with its job_id as received.

    Keyset pagination on (received_at, job_id, host_id), all descending: a total order (the primary key is in
    it), so pages never repeat or skip a row, whatever the filters. The cursor holds the last row's key only;
    the client sends the same filters with it. Only the conditions in use are in the statement, so that each
    filter gets its index (shared/migrations/0007_job_filters.sql) in a prepared, generic plan too.
    """
    query = read_query(request, JobListQuery)
    conditions: list[str] = []
    values: list[Any] = []

    def value(item: Any) -> str:
        values.append(item)
        return f"${len(values)}"

    groups = principal.visible_groups()
    if groups is not None:
        conditions.append(f'EXISTS (SELECT 1 FROM hosts h WHERE h.id = j.host_id AND h."group" = ANY({value(groups)}))')
    if query.status is not None:
        conditions.append(f"j.status = {value(query.status)}")
    if query.host_id is not None:
        conditions.append(f"j.host_id = {value(query.host_id)}")
    if query.cursor is not None:
        received_at, job_id, host_id = _job_cursor(query.cursor)
        conditions.append(
            f"(j.received_at, j.job_id, j.host_id) < ({value(received_at)}, {value(job_id)}, {value(host_id)})"
        )
    where = " AND ".join(conditions) or "true"
    rows = await context_of(request).pool.fetch(
        f"""
        SELECT {JOB_COLUMNS} FROM gate_jobs j
        WHERE {where}
        ORDER BY j.received_at DESC, j.job_id DESC, j.host_id DESC
        LIMIT {value(query.limit + 1)}
        """,
        *values,
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor(last["received_at"].isoformat(), last["job_id"], str(last["host_id"]))
    items = [JobListItem.model_validate(job_host_fields(row)) for row in rows]
    return json_response(Page[JobListItem](items=items, next_cursor=next_cursor))


def _job_cursor(cursor: str) -> tuple[dt.datetime, str, uuid.UUID]:
    """The (received_at, job_id, host_id) key a job list cursor holds; 422 naming `query.cursor` otherwise."""
    received_at, job_id, host_id = decode_cursor(cursor, 3)
    try:
        key = (dt.datetime.fromisoformat(received_at), job_id, uuid.UUID(host_id))
        # NUL or a lone surrogate (JSON allows "\ud800") would fail in PostgreSQL or the driver, not here.
        valid = key[0].tzinfo is not None and isinstance(job_id, str) and "\x00" not in job_id
        job_id.encode()
    except (TypeError, ValueError, AttributeError):  # UnicodeEncodeError is a ValueError
        valid = False
    if not valid:
        raise field_errors([{"field": "query.cursor", "message": "not a cursor this list returned"}])
    return key


async def override_job(request: Request, principal: Principal) -> Response:
    """Decide a waiting job host by hand. An invalid job_id's row (found by its key) was decided when it came:
    409, like any decided one."""
    job_id = path_job_id(request)
    host_id = path_uuid(request, "host_id")
    body: OverrideRequest = await read_model(request, OverrideRequest)
    return json_response(await override_on(context_of(request), principal.name, job_id, host_id, body))


async def override_on(
    context: ApiContext, actor: str, job_id: str, host_id: uuid.UUID, body: OverrideRequest
) -> JobHostView:
    """Decide a waiting job host by hand (the API and the dashboard): audited, one decision only.

    The row is locked first and its decision time read after that (`locked_now`): a gate evaluating the
    same job host holds the lock while it stamps its job.waiting, so the override's time is later than
    any job.waiting, as the order of the two changes is (a time from now(), the transaction's start,
    could precede it).

    `job_id` as received (in the path); the row is found by `job_key(job_id)`. Only a valid job_id, its own
    key, can be waiting: the gate decides every invalid one when it comes."""
    async with context.pool.acquire() as connection, connection.transaction():
        current = await connection.fetchval(
            "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2 FOR UPDATE", job_key(job_id), host_id
        )
        if current is None:
            raise not_found("job host")
        if current != "waiting_health_check":
            raise conflict(f"this job host was already decided: {current}")
        decided_at = await locked_now(connection)
        checks = await gating_check_summaries(connection, host_id)
        status = "released" if body.decision == "release" else "failed"
        detail = f"{status} by {actor}: {body.reason}"
        row = await connection.fetchrow(
            f"""
            UPDATE gate_jobs j
            SET status = $3, decided_at = $9, reason = $4, detail = $5, checks = $6::jsonb,
                overridden_by = $7, override_reason = $8, next_retry_at = NULL
            WHERE j.job_id = $1 AND j.host_id = $2 AND j.status = 'waiting_health_check'
            RETURNING {JOB_COLUMNS}
            """,
            job_id,
            host_id,
            status,
            "overridden" if status == "failed" else None,
            detail,
            json.dumps([check.model_dump(mode="json") for check in checks]),
            actor,
            body.reason,
            decided_at,
        )
        assert row is not None  # locked and seen waiting above
        event: JobReleased | JobFailed
        if status == "released":
            event = JobReleased(
                job_id=job_id,
                host_id=host_id,
                released_at=decided_at,
                waited_seconds=(decided_at - row["received_at"]).total_seconds(),
                checks=checks,
                overridden_by=actor,
                override_reason=body.reason,
            )
        else:
            event = JobFailed(
                job_id=job_id,
                host_id=host_id,
                failed_at=decided_at,
                reason="overridden",
                detail=detail,
                checks=checks,
                overridden_by=actor,
                override_reason=body.reason,
            )
        await enqueue(
            connection,
            f"job.{status}",
            event,
            source=context.source,
            correlation_id=job_id,
            event_id=decision_event_id(job_id, host_id),
            time=decided_at,
        )
        await record_audit(
            connection,
            actor=actor,
            action="job.override",
            entity_type="job",
            entity_id=job_id,
            host_id=host_id,
            changes={
                "decision": body.decision,
                "reason": body.reason,
                "status": {"from": "waiting_health_check", "to": status},
            },
        )
    return JobHostView.model_validate(job_host_fields(row))
