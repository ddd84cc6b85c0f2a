"""The gate's view of a host's checks: its enabled critical checks ("gating checks") and what the pollers
last learnt of each, now (`gating_checks`, from `check_state`) or as they stood at a moment
(`gating_checks_as_of`, from `check_results`). Read-only: the tables are written by their owners
(docs/architecture.md, "Who writes which table"). The gate's rules (shared/gate_rules.py) judge these,
and the job events and the API's override describe a job host's checks with them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass

import asyncpg

from shared.database import Connection
from shared.events import CheckSummary
from shared.results import latest_results_at


@dataclass(frozen=True)
class GatingCheck:
    """An enabled critical check of the host and what the pollers last learnt of it."""

    check_id: uuid.UUID
    name: str
    status: str
    interval_seconds: int
    last_healthy: bool | None
    last_detail: str | None
    last_checked_at: dt.datetime | None
    # When the check last became healthy (check_state.healthy_since; None unless healthy): CONTRACT §6
    # stable_seconds counts from it.
    healthy_since: dt.datetime | None = None

    def ready(self, now: dt.datetime) -> bool:
        """Healthy by a result no older than its interval."""
        if self.status != "healthy" or self.last_checked_at is None:
            return False
        return now - self.last_checked_at <= dt.timedelta(seconds=self.interval_seconds)

    def why_not_ready(self, now: dt.datetime, *, no_result: str = "no result yet") -> str:
        """Why the check is not `ready(now)`, in words: its last detail (or status), or how stale its
        last result is; `no_result` when it has none."""
        if self.last_checked_at is None:
            return no_result
        if self.status != "healthy":
            return self.last_detail or self.status
        age = (now - self.last_checked_at).total_seconds()
        return f"last result is {age:.0f} s old, older than its {self.interval_seconds} s interval"

    def summary(self) -> CheckSummary:
        return CheckSummary(
            check_id=self.check_id,
            name=self.name,
            healthy=self.last_healthy,
            detail=self.last_detail,
            checked_at=self.last_checked_at,
        )


# The SQL function (shared/migrations/0014) is the one reading of gating checks: the gate's fast release reads them
# through it too (`gate_turn`), so both judge the same rows. A known host without gating checks gives one row with
# id NULL, an unknown host none.
_GATING_CHECKS_SQL = "SELECT * FROM gate_gating_checks($1::uuid[])"


def gating_check(row: asyncpg.Record) -> GatingCheck:
    """A row of the SQL function `gate_gating_checks` (or an element of `gate_turn.checks`, of its type
    `gate_gating_check`) as a GatingCheck; the row's `id` is not NULL."""
    return GatingCheck(
        check_id=row["id"],
        name=row["name"],
        status=row["status"] or "unknown",
        interval_seconds=row["interval_seconds"],
        last_healthy=row["last_healthy"],
        last_detail=row["last_detail"],
        last_checked_at=row["last_checked_at"],
        healthy_since=row["healthy_since"],
    )


async def gating_checks(connection: Connection, host_id: uuid.UUID) -> list[GatingCheck] | None:
    """The host's enabled critical checks; None if the host is unknown."""
    return (await gating_checks_of_hosts(connection, [host_id])).get(host_id)


async def gating_checks_of_hosts(
    connection: Connection, host_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[GatingCheck]]:
    """The enabled critical checks of each of `host_ids`, by host, in one statement (a group's release pass
    reads all its waiting hosts at once); an unknown host is absent."""
    found: dict[uuid.UUID, list[GatingCheck]] = {}
    for row in await connection.fetch(_GATING_CHECKS_SQL, host_ids):
        checks = found.setdefault(row["host_id"], [])
        if row["id"] is not None:
            checks.append(gating_check(row))
    return found


async def gating_checks_as_of(
    connection: Connection, checks: list[GatingCheck], moment: dt.datetime
) -> list[GatingCheck]:
    """`checks` as they stood at `moment`: each with its latest result whose `checked_at` is at or before
    `moment` (the result's `status`, `healthy`, `detail` and time, from `check_results`), or with no
    result (status "unknown") if it had none by then, or none is kept any more (pruned). One backward
    step of the primary key (check_id, checked_at, id) per check: the partitions are scanned newest
    first (an ordered Append) and the first row found ends it. Same order as `checks`."""
    if not checks:
        return []
    then = await latest_results_at(connection, [check.check_id for check in checks], moment)
    return [
        dataclasses.replace(
            check,
            status=then[check.check_id]["status"] or "unknown",
            last_healthy=then[check.check_id]["healthy"],
            last_detail=then[check.check_id]["detail"],
            last_checked_at=then[check.check_id]["checked_at"],
            # Only a healthy_since from before `moment` held then; a later one is unknown as of then.
            healthy_since=_healthy_since_then(check, then[check.check_id]["status"], moment),
        )
        for check in checks
    ]


def _healthy_since_then(check: GatingCheck, status_then: str | None, moment: dt.datetime) -> dt.datetime | None:
    if status_then != "healthy" or check.healthy_since is None or check.healthy_since > moment:
        return None
    return check.healthy_since


async def gating_check_summaries(connection: Connection, host_id: uuid.UUID) -> list[CheckSummary]:
    """The host's enabled critical checks with their last result, as job events and jobs show them."""
    return [check.summary() for check in await gating_checks(connection, host_id) or []]
