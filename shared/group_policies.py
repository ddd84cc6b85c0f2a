"""`group_policies`: a group's patch-campaign policy (CONTRACT §6 "Group policies"). This module is the only one
that writes the table (docs/architecture.md, "Who writes which table"); the gate, the API and the dashboard read
policies through it. A group without a row has the defaults (`GroupPolicy()`).

`max_unavailable` is the group's disruption budget: None (no limit), a count ≥ 1, or a share of the group's hosts
written "N%" (1-100), rounded down and at least 1 (`budget_limit`). It is stored as two columns, at most one set.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from shared.database import Connection

NoChecksPolicy = Literal["release", "fail"]
PERCENT_PATTERN = r"^[0-9]{1,3}%$"
_PERCENT = re.compile(r"^(?P<value>[0-9]{1,3})%$")
# The count is stored as a PostgreSQL integer.
MAX_BUDGET_COUNT = 2**31 - 1
BudgetCount = Annotated[StrictInt, Field(ge=1, le=MAX_BUDGET_COUNT)]
BudgetPercent = Annotated[str, Field(pattern=PERCENT_PATTERN)]
BUDGET_MESSAGE = f'must be null, an integer from 1 to {MAX_BUDGET_COUNT}, or a percentage "N%" with N from 1 to 100'

POLICY_COLUMNS = (
    "stable_seconds, release_cutoff_seconds, no_checks, max_unavailable_count, max_unavailable_percent, "
    "verify_delay_seconds, verify_timeout_seconds"
)


class GroupPolicy(BaseModel):
    """A group's policy, as the API takes and shows it (CONTRACT §6). Omitted fields take their defaults;
    unknown fields are refused (a misspelt field would otherwise silently keep its default). Raises
    pydantic.ValidationError for a value outside its range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stable_seconds: Annotated[StrictInt, Field(ge=0, le=86400)] = 0
    release_cutoff_seconds: Annotated[StrictInt, Field(ge=0, le=86400)] = 0
    no_checks: NoChecksPolicy = "release"
    max_unavailable: BudgetCount | BudgetPercent | None = None
    verify_delay_seconds: Annotated[StrictInt, Field(ge=0, le=3600)] = 0
    verify_timeout_seconds: Annotated[StrictInt, Field(ge=10, le=86400)] = 900

    @field_validator("max_unavailable", mode="wrap")
    @classmethod
    def _budget(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> int | str | None:
        # One message for any bad value: pydantic's own would be one per alternative of the union
        # ("max_unavailable.constrained-int", "max_unavailable.str"), which names no field a client sent.
        try:
            budget: int | str | None = handler(value)
        except ValidationError:
            raise ValueError(BUDGET_MESSAGE) from None
        if isinstance(budget, str) and percent_of(budget) is None:
            raise ValueError(BUDGET_MESSAGE)
        return budget

    @property
    def max_unavailable_count(self) -> int | None:
        return self.max_unavailable if isinstance(self.max_unavailable, int) else None

    @property
    def max_unavailable_percent(self) -> int | None:
        return percent_of(self.max_unavailable) if isinstance(self.max_unavailable, str) else None


def percent_of(text: str) -> int | None:
    """N of a budget written "N%" (1-100), else None."""
    match = _PERCENT.match(text)
    if match is None:
        return None
    value = int(match["value"])
    return value if 1 <= value <= 100 else None


def budget_limit(policy: GroupPolicy, hosts_total: int) -> int | None:
    """How many hosts of the group may be unavailable at once: None (no limit), the count, or the percentage
    of `hosts_total` rounded down and at least 1 (CONTRACT §6 `max_unavailable`)."""
    if policy.max_unavailable_count is not None:
        return policy.max_unavailable_count
    percent = policy.max_unavailable_percent
    if percent is None:
        return None
    return max(1, hosts_total * percent // 100)


def policy_from_row(row: asyncpg.Record | None) -> GroupPolicy:
    """A `group_policies` row (POLICY_COLUMNS at least; a whole row as the gate's `gate_turn.policy` holds it) as a
    GroupPolicy; None (no row) gives the defaults."""
    if row is None:
        return GroupPolicy()
    budget: int | str | None = row["max_unavailable_count"]
    if row["max_unavailable_percent"] is not None:
        budget = f"{row['max_unavailable_percent']}%"
    return GroupPolicy(
        stable_seconds=row["stable_seconds"],
        release_cutoff_seconds=row["release_cutoff_seconds"],
        no_checks=row["no_checks"],
        max_unavailable=budget,
        verify_delay_seconds=row["verify_delay_seconds"],
        verify_timeout_seconds=row["verify_timeout_seconds"],
    )


async def policy_of(connection: Connection | asyncpg.Pool, group: str) -> GroupPolicy:
    """The group's policy, the defaults when it has none."""
    row = await connection.fetchrow(f'SELECT {POLICY_COLUMNS} FROM group_policies WHERE "group" = $1', group)
    return policy_from_row(row)


async def policies_of(connection: Connection | asyncpg.Pool, groups: list[str]) -> dict[str, GroupPolicy]:
    """The policies of `groups`, by group; the defaults for a group without one."""
    rows = await connection.fetch(
        f'SELECT "group", {POLICY_COLUMNS} FROM group_policies WHERE "group" = ANY($1::text[])', groups
    )
    found = {row["group"]: policy_from_row(row) for row in rows}
    return {group: found.get(group, GroupPolicy()) for group in groups}


async def has_policy(connection: Connection | asyncpg.Pool, group: str) -> bool:
    """Whether the group has a stored policy (a group exists while a host or a policy names it)."""
    return bool(await connection.fetchval('SELECT true FROM group_policies WHERE "group" = $1', group))


async def lock_group(connection: Connection, group: str) -> None:
    """Take the group's transaction-scoped advisory lock (key hashtextextended('healthgate.group:' || group, 0):
    the lock under which the gate decides every release of the group), in the caller's transaction. A policy
    change then waits for a budget pass of the group in progress, and the next pass reads the new policy."""
    await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended('healthgate.group:' || $1, 0))", group)


async def put_policy(connection: Connection, group: str, policy: GroupPolicy) -> GroupPolicy:
    """Store the group's policy, replacing every field (CONTRACT §6: PUT replaces; omitted → default), in the
    caller's transaction (which also writes the audit entry). Returns the policy as stored."""
    row = await connection.fetchrow(
        f"""
        INSERT INTO group_policies ("group", {POLICY_COLUMNS}, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
        ON CONFLICT ("group") DO UPDATE SET
            stable_seconds = EXCLUDED.stable_seconds,
            release_cutoff_seconds = EXCLUDED.release_cutoff_seconds,
            no_checks = EXCLUDED.no_checks,
            max_unavailable_count = EXCLUDED.max_unavailable_count,
            max_unavailable_percent = EXCLUDED.max_unavailable_percent,
            verify_delay_seconds = EXCLUDED.verify_delay_seconds,
            verify_timeout_seconds = EXCLUDED.verify_timeout_seconds,
            updated_at = now()
        RETURNING {POLICY_COLUMNS}
        """,
        group,
        policy.stable_seconds,
        policy.release_cutoff_seconds,
        policy.no_checks,
        policy.max_unavailable_count,
        policy.max_unavailable_percent,
        policy.verify_delay_seconds,
        policy.verify_timeout_seconds,
    )
    return policy_from_row(row)


# ---- groups (reads of hosts and gate_jobs, for the API's and the dashboard's group pages) ------------------------

# A host is unavailable while one of its job hosts is in patch (released or verifying), and while its summary is
# unhealthy (CONTRACT §6 "Disruption budget"). `h` is the host.
_IN_PATCH = "EXISTS (SELECT 1 FROM gate_jobs j WHERE j.host_id = h.id AND j.status IN ('released', 'verifying'))"


async def group_exists(connection: Connection | asyncpg.Pool, group: str) -> bool:
    """Whether the group exists: a host or a policy names it (CONTRACT §6 "Group policies")."""
    return bool(
        await connection.fetchval(
            'SELECT EXISTS (SELECT 1 FROM hosts WHERE "group" = $1) OR EXISTS (SELECT 1 FROM group_policies '
            'WHERE "group" = $1)',
            group,
        )
    )


async def group_page(
    connection: Connection | asyncpg.Pool, *, groups: list[str] | None, after: str | None, limit: int
) -> list[asyncpg.Record]:
    """Up to `limit` groups of `groups` (None: every group) by name after `after`, each a row of `group`,
    `hosts_total`, `hosts_unhealthy` (summary unhealthy), `hosts_in_maintenance` (a job host in patch) and
    `budget_in_use` (hosts that are either: the group's unavailable hosts, each counted once). A group exists
    while a host or a policy names it; a policy's group without hosts has zeros. The policies are read apart
    (`policies_of`)."""
    return await connection.fetch(
        f"""
        WITH names AS (
            SELECT "group" FROM hosts
            WHERE ($1::text[] IS NULL OR "group" = ANY($1)) AND ($2::text IS NULL OR "group" > $2)
            UNION
            SELECT "group" FROM group_policies
            WHERE ($1::text[] IS NULL OR "group" = ANY($1)) AND ($2::text IS NULL OR "group" > $2)
        ), page AS (
            SELECT "group" FROM names ORDER BY "group" LIMIT $3
        ), state AS (
            SELECT h."group", h.health_check_status = 'unhealthy' AS unhealthy, {_IN_PATCH} AS in_patch
            FROM hosts h
            WHERE h."group" IN (SELECT "group" FROM page)
        )
        SELECT p."group",
               count(s."group") AS hosts_total,
               count(s."group") FILTER (WHERE s.unhealthy) AS hosts_unhealthy,
               count(s."group") FILTER (WHERE s.in_patch) AS hosts_in_maintenance,
               count(s."group") FILTER (WHERE s.unhealthy OR s.in_patch) AS budget_in_use
        FROM page p
        LEFT JOIN state s ON s."group" = p."group"
        GROUP BY p."group"
        ORDER BY p."group"
        """,
        groups,
        after,
        limit,
    )
