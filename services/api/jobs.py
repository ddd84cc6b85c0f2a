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

from services.api.audit import record_audit
from services.api.auth import Principal
from services.api.context import ApiContext, context_of
from services.api.problems import conflict, field_errors, not_found
from services.api.requests import (
    PageQuery,
    decode_cursor,
    encode_cursor,
    json_response,
    path_text,
    path_uuid,
    read_model,
    read_query,
)
from services.api.schemas import JobHostView, JobListItem, JobView, OverrideRequest, Page
from shared.events import JobFailed, JobReleased, decision_event_id
from shared.host_status import gating_check_summaries
from shared.outbox import enqueue

JOB_COLUMNS = """
    j.job_id, j.host_id, j.status, j.window_ends_at, j.received_at, j.decided_at, j.reason, j.detail,
    j.checks, j.overridden_by, j.override_reason
"""
# Scoping: admins see every job host; others those whose host is in one of their groups.
VISIBLE = '($1::text[] IS NULL OR EXISTS (SELECT 1 FROM hosts h WHERE h.id = j.host_id AND h."group" = ANY($1)))'


class JobListQuery(PageQuery):
    status: Literal["waiting_health_check", "released", "failed", "cancelled"] | None = Field(
        None, description="only job hosts in this state"
    )


def job_host_fields(row: asyncpg.Record) -> dict[str, Any]:
    values = dict(row)
    values["checks"] = json.loads(values["checks"]) if isinstance(values["checks"], str) else values["checks"]
    return values


async def get_job(request: Request, principal: Principal) -> Response:
    job_id = path_text(request, "job_id")
    rows = await context_of(request).pool.fetch(
        f"SELECT {JOB_COLUMNS} FROM gate_jobs j WHERE j.job_id = $2 AND {VISIBLE} ORDER BY j.received_at, j.host_id",
        principal.visible_groups(),
        job_id,
    )
    if not rows:
        raise not_found("job")
    hosts = [JobHostView.model_validate(job_host_fields(row)) for row in rows]
    return json_response(JobView(job_id=job_id, hosts=hosts))


async def list_jobs(request: Request, principal: Principal) -> Response:
    query = read_query(request, JobListQuery)
    after: list[Any] = [None, None, None]
    if query.cursor is not None:
        received_at, job_id, host_id = decode_cursor(query.cursor, 3)
        try:
            after = [dt.datetime.fromisoformat(received_at), str(job_id), str(host_id)]
        except (TypeError, ValueError):
            raise field_errors([{"field": "query.cursor", "message": "not a cursor this list returned"}]) from None
    rows = await context_of(request).pool.fetch(
        f"""
        SELECT {JOB_COLUMNS} FROM gate_jobs j
        WHERE {VISIBLE}
          AND ($2::text IS NULL OR j.status = $2)
          AND ($3::timestamptz IS NULL OR (j.received_at, j.job_id, j.host_id::text) < ($3, $4, $5))
        ORDER BY j.received_at DESC, j.job_id DESC, j.host_id::text DESC
        LIMIT $6
        """,
        principal.visible_groups(),
        query.status,
        *after,
        query.limit + 1,
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor(last["received_at"].isoformat(), last["job_id"], str(last["host_id"]))
    items = [JobListItem.model_validate(job_host_fields(row)) for row in rows]
    return json_response(Page[JobListItem](items=items, next_cursor=next_cursor))


async def override_job(request: Request, principal: Principal) -> Response:
    job_id = path_text(request, "job_id")
    host_id = path_uuid(request, "host_id")
    body: OverrideRequest = await read_model(request, OverrideRequest)
    return json_response(await override_on(context_of(request), principal.name, job_id, host_id, body))


async def override_on(
    context: ApiContext, actor: str, job_id: str, host_id: uuid.UUID, body: OverrideRequest
) -> JobHostView:
    """Decide a waiting job host by hand (the API and the dashboard): audited, one decision only."""
    async with context.pool.acquire() as connection, connection.transaction():
        checks = await gating_check_summaries(connection, host_id)
        status = "released" if body.decision == "release" else "failed"
        detail = f"{status} by {actor}: {body.reason}"
        row = await connection.fetchrow(
            f"""
            UPDATE gate_jobs j
            SET status = $3, decided_at = now(), reason = $4, detail = $5, checks = $6::jsonb,
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
        )
        if row is None:
            current = await connection.fetchval(
                "SELECT status FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_id, host_id
            )
            if current is None:
                raise not_found("job host")
            raise conflict(f"this job host was already decided: {current}")
        decided_at: dt.datetime = row["decided_at"]
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
