"""The gate's preview (CONTRACT §6 "Preview (before a deployment)"): `POST /api/v1/gate/preview`, and the dashboard's
hosts page, which calls `preview_on`.

What a `job.start` for each of the given hosts would get at a moment (default now), under the current checks, group
policies and disruption budgets, creating nothing and publishing nothing. It judges through the gate's own rules,
with the inputs the gate's release pass builds (services/gate/evaluation.py `release_pass`):

- the group's policy and budget from `shared.jobs.group_budget`, the gating checks from
  `shared.gating.gating_checks_of_hosts`;
- one `shared.gate_rules.ReleaseOrder` per group, through which the gate judges too: with a budget, the group's
  waiting job hosts first, in arrival order (a new job.start arrives after them, and the gate's pass releases the
  ready ones ahead of it, each taking its unit), then the previewed hosts of the group in the order given, each
  release taking its host's unit for the hosts after it ("counting the previewed hosts against the budget in the
  order given"); without a budget each host alone, as the gate judges a job.start then;
- the verdict's detail from `Decision.detail`, the words the gate stores.

Readings where the preview has less to go on than a job.start:
- The window: a preview names none, so it is judged without one (`window_ends_at` None; not the largest instant,
  which an `at` of 9999-12-31T23:59:59.999999Z would reach): neither the window nor a group's
  `release_cutoff_seconds` can close it, and the verdict says what the checks, the
  stability and the budget allow. The contract's preview carries no window, and the only time it names, `at`, is
  when to judge, not when a window would end.
- The job: a preview has no job id, so the job is never halted (a halted job's job.start fails `job_halted`; the
  preview cannot know which job the caller means), and a host released earlier in the same preview holds the
  budget as "released earlier in this preview".
- Unknown hosts follow HEALTHGATE_GATE_UNKNOWN_HOST, which the API reads from the same environment as the gate
  (shared.settings.Settings.gate_unknown_host): `release` (released, no checks) or `fail` (fail, unknown_host).
- Scoping: a host outside the caller's groups is judged exactly as a host healthgate does not know: nothing of it
  (its group, checks or budget) is read into the answer.
- `at` judges the current state at that moment: a result older than its check's interval at `at` is stale there,
  and stability counts up to `at`; the budget and the waiting job hosts are those of now.

Everything is read in one read-only REPEATABLE READ transaction, a single snapshot, taking no lock: the gate's group
locks are never waited for, and a preview can never write (PostgreSQL refuses any write in a read-only transaction).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import context_of
from services.api.requests import json_response, read_model
from services.api.schemas import PreviewAnswer, PreviewItem, PreviewRequest
from shared import gate_rules as rules
from shared import jobs
from shared.database import Connection, locked_now
from shared.gate_rules import UnknownHostPolicy, Verdict
from shared.gating import GatingCheck, gating_checks_of_hosts
from shared.hosts import host_groups

PreviewVerdict = Literal["release", "wait", "fail"]


@dataclass(frozen=True)
class Preview:
    """A preview's answer (`items`, in the order of the host ids) and the moment it judged at (`at`)."""

    at: dt.datetime
    items: list[PreviewItem]


def verdict_of(decision: rules.Decision) -> PreviewVerdict:
    """release, wait, or fail (any verdict with a job.failed reason)."""
    if decision.verdict is Verdict.RELEASE:
        return "release"
    return "wait" if decision.verdict is Verdict.WAIT else "fail"


async def preview_on(
    pool: asyncpg.Pool,
    principal: Principal,
    host_ids: list[uuid.UUID],
    *,
    at: dt.datetime | None,
    unknown_host: UnknownHostPolicy,
) -> Preview:
    """What a job.start for each of `host_ids` (in this order, each once) would get at `at` (None: the database's
    clock now, the gate's), as `principal` may see it; `unknown_host`: HEALTHGATE_GATE_UNKNOWN_HOST."""
    async with pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
        # The database's clock, which the gate stamps its decisions with (nothing is locked here).
        now = at if at is not None else await locked_now(connection)
        groups = {
            host_id: group
            for host_id, group in (await host_groups(connection, host_ids)).items()
            if principal.sees_group(group)
        }
        checks = await gating_checks_of_hosts(connection, list(groups))
        orders: dict[str, rules.ReleaseOrder] = {}
        for group in dict.fromkeys(groups[host_id] for host_id in host_ids if host_id in groups):
            orders[group] = await _group_order(connection, group, now=now, unknown_host=unknown_host)
    # A host of no visible group is judged as an unknown one: alone, without checks, policy or budget.
    alone = rules.ReleaseOrder(now=now, policy=None, budget=None, unknown_host=unknown_host)
    items = []
    for host_id in host_ids:
        seen_group = groups.get(host_id)
        order = orders[seen_group] if seen_group is not None else alone
        host_checks: list[GatingCheck] | None = checks.get(host_id, []) if seen_group is not None else None
        decision = order.judge(rules.Turn(None, host_id, None, host_checks))
        detail = decision.detail(job_id=None, host_id=host_id, group=seen_group, window_ends_at=None,
                                 now=now)  # fmt: skip
        items.append(PreviewItem(
            host_id=host_id, verdict=verdict_of(decision), waiting_for=decision.waiting_for, detail=detail,
            checks=[check.summary() for check in decision.checks],
        ))  # fmt: skip
    return Preview(now, items)


async def _group_order(
    connection: Connection,
    group: str,
    *,
    now: dt.datetime,
    unknown_host: UnknownHostPolicy,
) -> rules.ReleaseOrder:
    """The group's release order as a new job.start would find it at `now`: its policy and budget, and with a
    budget its waiting job hosts already judged in arrival order, as the gate's pass judges them before the new
    one (only a release changes what comes after: it takes a unit)."""
    policy, budget = await jobs.group_budget(connection, group)
    order = rules.ReleaseOrder(now=now, policy=policy, budget=budget, unknown_host=unknown_host)
    if budget is None:
        return order
    for turn in await jobs.turns_of(connection, await jobs.waiting_in_group(connection, group)):
        order.judge(turn)
    return order


async def gate_preview(request: Request, principal: Principal) -> Response:
    """`POST /api/v1/gate/preview` (all roles, scoped): one item per host id, in the order given."""
    body: PreviewRequest = await read_model(request, PreviewRequest)
    context = context_of(request)
    preview = await preview_on(
        context.pool, principal, body.host_ids, at=body.at, unknown_host=context.settings.gate_unknown_host
    )
    return json_response(PreviewAnswer(items=preview.items))
