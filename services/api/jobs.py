"""Gate jobs as the API shows them, read from the gate's table, the admin's manual override, and halting and
resuming a job by hand (CONTRACT §6).

The rows are read and written by their owner, shared/jobs.py; an override decides through
`shared.jobs.decide`, the same function as the gate's own decisions, so a job host is decided once; a manual halt
goes through `shared.jobs.halt_job`, the gate's own halt.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import asyncpg
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

import shared.jobs
from services.api.auth import Principal
from services.api.context import ApiContext, context_of
from services.api.problems import conflict, not_found
from services.api.requests import Keyset, PageQuery, json_response, path_job_id, path_uuid, read_model, read_query
from services.api.schemas import HaltRequest, JobHostView, JobListItem, JobView, OverrideRequest, Page
from shared.audit import record_audit
from shared.database import locked_now
from shared.events import job_key
from shared.gating import gating_check_summaries
from shared.hosts import host_group
from shared.jobs import WAITING, DecidedStatus, JobDecision, JobStatus


class JobListQuery(PageQuery):
    """`GET /api/v1/jobs?status=&host_id=` (CONTRACT §3): both filters optional, combined with AND."""

    status: JobStatus | None = Field(None, description="only job hosts in this state")
    host_id: uuid.UUID | None = Field(
        None, description="only this host's job hosts (a host outside the caller's groups gives an empty page)"
    )


def _job_key_of_cursor(received_at: Any, job_id: Any, host_id: Any) -> tuple[dt.datetime, str, uuid.UUID]:
    """The (received_at, job_id, host_id) key a job list cursor holds; ValueError when it is not one."""
    if not isinstance(job_id, str):
        raise TypeError("not a job list key")
    # A naive time, NUL or a lone surrogate (JSON allows "\ud800"): Keyset's `_check_bindable`.
    return dt.datetime.fromisoformat(received_at), job_id, uuid.UUID(host_id)


# Job hosts page newest first by (received_at, job_id, host_id), all descending: a total order (the primary
# key is in it), so pages never repeat or skip a row, whatever the filters. The cursor holds the last row's
# key only, the stored key (`job_key`) of its job_id.
JOB_PAGES: Keyset[tuple[dt.datetime, str, uuid.UUID]] = Keyset(
    3, _job_key_of_cursor, lambda row: (row["received_at"].isoformat(), row["job_id"], str(row["host_id"]))
)


def job_host_fields(row: asyncpg.Record) -> dict[str, Any]:
    """A gate_jobs row (VIEW_COLUMNS) as the fields of a job host view, its `job_id` the one received."""
    values = shared.jobs.as_received(row)
    values["checks"] = json.loads(values["checks"]) if isinstance(values["checks"], str) else values["checks"]
    # CONTRACT §6: `waiting_for` is [] for a job host that is not waiting, whatever the row last held.
    values["waiting_for"] = list(values["waiting_for"] or []) if values["status"] == WAITING else []
    return values


async def get_job(request: Request, principal: Principal) -> Response:
    """A job's hosts, found by the key the gate stored the job_id under (`job_key`: the job_id itself when it
    is valid), and shown with the job_id as received (CONTRACT §3: every job id works)."""
    job_id = path_job_id(request)
    rows = await shared.jobs.job_hosts_of_job(context_of(request).pool, job_key(job_id), principal.visible_groups())
    if not rows:
        raise not_found("job")
    return json_response(await _job_view(context_of(request).pool, job_id, rows))


async def _job_view(pool: asyncpg.Pool, job_id: str, rows: list[asyncpg.Record]) -> JobView:
    """The job (its halt state from `jobs`, none for a job recorded before migration 0010) and its hosts `rows`."""
    job = await shared.jobs.job_of(pool, job_key(job_id))
    hosts = [JobHostView.model_validate(job_host_fields(row)) for row in rows]
    halted_at = None if job is None else job["halted_at"]
    return JobView(
        job_id=job_id, max_failed_hosts=None if job is None else job["max_failed_hosts"], halted=halted_at is not None,
        halted_at=halted_at, halt_reason=None if job is None else job["halt_reason"], hosts=hosts,
    )  # fmt: skip


async def list_jobs(request: Request, principal: Principal) -> Response:
    """A page of job hosts, newest first, scoped, optionally by status and host, each with its job_id as received
    (`JOB_PAGES`; the client sends the same filters with the cursor)."""
    query = read_query(request, JobListQuery)
    after = JOB_PAGES.after(query.cursor)
    rows = await shared.jobs.job_host_page(
        context_of(request).pool, groups=principal.visible_groups(), status=query.status, host_id=query.host_id,
        after=after, limit=JOB_PAGES.rows_to_fetch(query.limit),
    )  # fmt: skip
    rows, next_cursor = JOB_PAGES.page(rows, query.limit)
    items = [JobListItem.model_validate(job_host_fields(row)) for row in rows]
    return json_response(Page[JobListItem](items=items, next_cursor=next_cursor))


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
    could precede it). The decision is `shared.jobs.decide`'s, as the gate's are.

    `job_id` as received (in the path); the row is found by `job_key(job_id)`. Only a valid job_id, its own
    key, can be waiting: the gate decides every invalid one when it comes. 404 without such a job host,
    409 once it is decided.

    The host's group lock comes first, as in the gate's release passes (lock order: group lock, then
    gate_jobs rows). A release may exceed the group's disruption budget (CONTRACT §6), and then says so in
    its detail, naming the budget's holders."""
    async with context.pool.acquire() as connection, connection.transaction():
        group = await host_group(connection, host_id)
        if group is not None:
            await shared.jobs.lock_group(connection, group)
        current = await shared.jobs.lock_job_host(connection, job_key(job_id), host_id)
        if current is None:
            raise not_found("job host")
        if current != WAITING:
            raise conflict(f"this job host was already decided: {current}")
        decided_at = await locked_now(connection)
        checks = await gating_check_summaries(connection, host_id)
        status: DecidedStatus = "released" if body.decision == "release" else "failed"
        detail = f"{status} by {actor}: {body.reason}"
        if status == "released" and group is not None:
            budget = (await shared.jobs.group_budget(connection, group))[1]
            if budget is not None and not budget.view(host_id).fits():
                detail += f"; disruption budget exceeded: {budget.view(host_id).describe()}"
        decision = JobDecision(
            job_id, host_id, status, detail,
            reason="overridden" if status == "failed" else None, checks=checks, overridden_by=actor,
            override_reason=body.reason,
        )  # fmt: skip
        row = await shared.jobs.decide(connection, decision, at=decided_at, source=context.source)
        assert row is not None  # locked and seen waiting above
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


async def halt_job(request: Request, principal: Principal) -> Response:
    """Halt a job by hand (CONTRACT §6): `POST /api/v1/jobs/{job_id}/halt` with {"reason"}."""
    return await _halt_or_resume(request, principal, halt=True)


async def resume_job(request: Request, principal: Principal) -> Response:
    """Let a halted job go on (CONTRACT §6): `POST /api/v1/jobs/{job_id}/resume` with {"reason"}."""
    return await _halt_or_resume(request, principal, halt=False)


async def _halt_or_resume(request: Request, principal: Principal, *, halt: bool) -> Response:
    """Halt or resume a job (admins: the endpoint's guard answered 404 or 403 to the others): 404 without such a
    job, then the body (422), then 409 when it is already halted / not halted (`halt_or_resume_on`)."""
    job_id = path_job_id(request)
    context = context_of(request)
    await require_visible_job(context, principal, job_id)
    body: HaltRequest = await read_model(request, HaltRequest)
    return json_response(await halt_or_resume_on(context, principal, job_id, body, halt=halt))


async def require_visible_job(context: ApiContext, principal: Principal, job_id: str) -> None:
    """404 unless the job (`job_id` as received, found by its `job_key`) has a host in the caller's groups."""
    if not await shared.jobs.job_hosts_of_job(context.pool, job_key(job_id), principal.visible_groups()):
        raise not_found("job")


async def halt_or_resume_on(
    context: ApiContext, principal: Principal, job_id: str, body: HaltRequest, *, halt: bool
) -> JobView:
    """Halt or resume a job by hand (the API and the dashboard; the caller checked the role and
    `require_visible_job`): 409 when it is already halted / not halted.

    One transaction: the job's row locked (`shared.jobs.lock_job`, before any job host: the lock order of
    halting), the halt (its waiting job hosts failed job_halted, job.halted with `by` = the token's name) or
    the resume (job.resumed), and the audit entry (`job.halt` / `job.resume`) commit together. Returns the job
    as `GET /api/v1/jobs/{job_id}` shows it to the caller."""
    key = job_key(job_id)
    async with context.pool.acquire() as connection, connection.transaction():
        await shared.jobs.lock_job(connection, key)
        if halt:
            done = await shared.jobs.halt_job(
                connection, job_id, reason="manual", detail=body.reason, by=principal.name, source=context.source
            )
            if done is None:
                raise conflict("this job is already halted")
            changes: dict[str, Any] = {
                "reason": body.reason,
                "halted": {"from": False, "to": True},
                "failed_waiting_hosts": [str(host_id) for host_id in done.failed_waiting],
            }
        else:
            if await shared.jobs.resume_job(
                connection, job_id, detail=body.reason, by=principal.name, source=context.source
            ) is None:  # fmt: skip
                raise conflict("this job is not halted")
            changes = {"reason": body.reason, "halted": {"from": True, "to": False}}
        await record_audit(
            connection, actor=principal.name, action="job.halt" if halt else "job.resume", entity_type="job",
            entity_id=job_id, changes=changes,
        )  # fmt: skip
    rows = await shared.jobs.job_hosts_of_job(context.pool, key, principal.visible_groups())
    return await _job_view(context.pool, job_id, rows)
