"""`hosts`: the hosts and their denormalised health summary. This module is the only one that writes the
table (docs/architecture.md, "Who writes which table").

- the api creates, changes and deletes hosts (`insert_host`, `update_host`, `delete_host`);
- whoever changes a check or its state recomputes the host's summary in the same transaction
  (`refresh_host_status`): the api on every check change, the pollers when a check flips. The summary is
  stored on the host row so that listing and filtering hosts never aggregates checks.

**Lock order.** A transaction that changes a host's checks or their state locks the host row first
(`lock_host`, `lock_hosts` in id order), and only then `check_state` rows: the api and the pollers take
them in that order, so they never deadlock, and the host lock serialises the 5-check limit and the
summary (the last writer to commit sees every change).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from shared.database import Connection
from shared.events import HostHealthStatus, HostStatusChanged, received_job_id
from shared.jobs import maintenance_of_hosts
from shared.outbox import enqueue

log = logging.getLogger(__name__)

HOST_COLUMNS = """
    id, name, "group", agent_url, health_check_status, checks_total, checks_healthy, created_at, updated_at
"""
# A host as the api and the dashboard show it (`host_values`): its columns (of `h`) and whether a job is patching
# it (CONTRACT §3, §6 "Maintenance"): `in_maintenance`, and the earliest job in patch by release
# (`maintenance_job_key`, the key its job_id is stored under, with `maintenance_received_job_id`: see
# `host_values`). Read through `_IN_PATCH_JOIN`, which finds it by the partial index gate_jobs_in_patch_host_idx.
HOST_VIEW_COLUMNS = """
    h.id, h.name, h."group", h.agent_url, h.health_check_status, h.checks_total, h.checks_healthy, h.created_at,
    h.updated_at, m.job_id IS NOT NULL AS in_maintenance, m.job_id AS maintenance_job_key,
    m.received_job_id AS maintenance_received_job_id
"""
# A job host is in patch from its release until its verification outcome (CONTRACT §6, migration 0010).
_IN_PATCH_JOIN = """
LEFT JOIN LATERAL (
    SELECT j.job_id, j.received_job_id FROM gate_jobs j
    WHERE j.host_id = h.id AND j.status IN ('released', 'verifying')
    ORDER BY j.decided_at, j.job_id
    LIMIT 1
) m ON true
"""
# Every summary, in the order of precedence of CONTRACT §3 (a critical check unhealthy first, then any
# unknown, then any unhealthy: degraded), and a host without enabled checks last.
HOST_STATUSES: tuple[HostHealthStatus, ...] = ("unhealthy", "unknown", "degraded", "healthy", "no_checks")

# Precedence: unhealthy, unknown, degraded, healthy (CONTRACT §3).
_RECOMPUTE_SQL = """
WITH checks AS (
    SELECT c.critical, s.status
    FROM health_checks c
    JOIN check_state s ON s.check_id = c.id
    WHERE c.host_id = $1 AND c.enabled
), summary AS (
    SELECT
        count(*) AS total,
        count(*) FILTER (WHERE status = 'healthy') AS healthy,
        CASE
            WHEN count(*) = 0 THEN 'no_checks'
            WHEN bool_or(critical AND status = 'unhealthy') THEN 'unhealthy'
            WHEN bool_or(status = 'unknown') THEN 'unknown'
            WHEN bool_or(status = 'unhealthy') THEN 'degraded'
            ELSE 'healthy'
        END AS status
    FROM checks
)
UPDATE hosts
SET health_check_status = summary.status, checks_total = summary.total, checks_healthy = summary.healthy
FROM summary
WHERE hosts.id = $1
RETURNING hosts.health_check_status
"""


# ---- writes ----------------------------------------------------------------------------------------


async def insert_host(
    connection: Connection, host_id: uuid.UUID, *, name: str, group: str, agent_url: str | None
) -> asyncpg.Record:
    """Create a host (HOST_VIEW_COLUMNS of the new row: a host id may be reused, and the gate may have released a
    job for it before it existed, CONTRACT §5 unknown hosts). Raises asyncpg.UniqueViolationError when the name
    (constraint `hosts_name_unique`) or the id is taken."""
    row = await connection.fetchrow(
        f"""
        WITH h AS (
            INSERT INTO hosts (id, name, "group", agent_url) VALUES ($1, $2, $3, $4)
            RETURNING {HOST_COLUMNS}
        )
        SELECT {HOST_VIEW_COLUMNS} FROM h {_IN_PATCH_JOIN}
        """,
        host_id,
        name,
        group,
        agent_url,
    )
    assert row is not None  # INSERT ... RETURNING returns the row it inserted, or raises
    return row


async def insert_hosts(connection: Connection, rows: Sequence[tuple[uuid.UUID, str, str, str | None]]) -> None:
    """Create many hosts at once (`rows`: (id, name, group, agent_url)), in the caller's transaction (the API's
    batch create). Raises asyncpg.UniqueViolationError when a name (`hosts_name_unique`) or an id is taken."""
    await connection.executemany('INSERT INTO hosts (id, name, "group", agent_url) VALUES ($1, $2, $3, $4)', rows)


async def taken_names_and_ids(
    connection: Connection, names: Sequence[str], host_ids: Sequence[uuid.UUID]
) -> list[asyncpg.Record]:
    """The hosts (id, name) holding any of these names or ids: a batch create names them in its 409."""
    return await connection.fetch(
        "SELECT id, name FROM hosts WHERE name = ANY($1::text[]) OR id = ANY($2::uuid[]) ORDER BY name",
        list(names),
        list(host_ids),
    )


async def update_host(
    connection: Connection, host_id: uuid.UUID, *, name: str, group: str, agent_url: str | None
) -> asyncpg.Record:
    """Replace a host's writable fields (HOST_VIEW_COLUMNS of the row after). The host must exist: the caller
    holds its row lock (`fetch_host(..., for_update=True)`). Raises asyncpg.UniqueViolationError when the
    name is taken."""
    row = await connection.fetchrow(
        f"""
        WITH h AS (
            UPDATE hosts SET name = $2, "group" = $3, agent_url = $4, updated_at = now()
            WHERE id = $1
            RETURNING {HOST_COLUMNS}
        )
        SELECT {HOST_VIEW_COLUMNS} FROM h {_IN_PATCH_JOIN}
        """,
        host_id,
        name,
        group,
        agent_url,
    )
    assert row is not None  # the caller holds the host's row lock: it still exists
    return row


async def delete_host(connection: Connection, host_id: uuid.UUID) -> None:
    """Delete a host; its checks, their state and schedule cascade (the caller deletes each check first,
    through shared.checks, for its results, audit entry and event)."""
    await connection.execute("DELETE FROM hosts WHERE id = $1", host_id)


async def refresh_host_status(connection: Connection, host_id: uuid.UUID, *, source: str) -> tuple[str, str] | None:
    """Recompute and store the host's summary; publish `host.status_changed` (via the outbox) on a flip.

    Must run inside a transaction. Returns (previous, current), or None if the host is gone.
    """
    previous = await connection.fetchval("SELECT health_check_status FROM hosts WHERE id = $1 FOR UPDATE", host_id)
    if previous is None:
        return None
    current = await connection.fetchval(_RECOMPUTE_SQL, host_id)
    if current != previous:
        log.info(
            "host status changed",
            extra={"host_id": str(host_id), "previous": previous, "current": current},
        )
        # CONTRACT §6: whether a job is patching the host, as read in this transaction (it holds the host's lock).
        in_maintenance = host_id in await maintenance_of_hosts(connection, [host_id])
        await enqueue(
            connection,
            "host.status_changed",
            HostStatusChanged(
                host_id=host_id, previous=previous, current=current, at=dt.datetime.now(dt.UTC),
                in_maintenance=in_maintenance,
            ),
            source=source,
        )  # fmt: skip
    return previous, current


# ---- locks -----------------------------------------------------------------------------------------


async def lock_host(connection: Connection, host_id: uuid.UUID) -> asyncpg.Record | None:
    """Lock the host row (id, name, agent_url) before its checks are changed: serialises the 5-check limit
    and the host summary against concurrent writers. None if there is no such host."""
    row: asyncpg.Record | None = await connection.fetchrow(
        "SELECT id, name, agent_url FROM hosts WHERE id = $1 FOR UPDATE", host_id
    )
    return row


async def lock_hosts(connection: Connection, host_ids: Sequence[uuid.UUID]) -> None:
    """Lock these host rows in id order (`host_ids` sorted): a result batch, before its check states."""
    await connection.execute("SELECT 1 FROM hosts WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", host_ids)


# ---- reads -----------------------------------------------------------------------------------------


async def fetch_host(connection: Connection, host_id: uuid.UUID, *, for_update: bool = False) -> asyncpg.Record | None:
    """A host's HOST_VIEW_COLUMNS (`host_values` makes them the host as shown), its row locked when `for_update`;
    None if there is none."""
    lock = " FOR UPDATE OF h" if for_update else ""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"SELECT {HOST_VIEW_COLUMNS} FROM hosts h {_IN_PATCH_JOIN} WHERE h.id = $1{lock}", host_id
    )
    return row


async def fetch_hosts(connection: Connection, host_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """The HOST_VIEW_COLUMNS of these hosts (those that exist), by name."""
    return await connection.fetch(
        f"SELECT {HOST_VIEW_COLUMNS} FROM hosts h {_IN_PATCH_JOIN} WHERE h.id = ANY($1::uuid[]) ORDER BY h.name",
        list(host_ids),
    )


def host_values(row: asyncpg.Record) -> dict[str, Any]:
    """A host row (HOST_VIEW_COLUMNS) as the host is shown (CONTRACT §3): its fields, `in_maintenance`, and
    `maintenance_job_id` the job_id as received (`shared.events.received_job_id`; a released job's is always
    its own key, as only valid job_ids are ever released, but the row says so rather than this module)."""
    values = dict(row)
    key = values.pop("maintenance_job_key")
    received = values.pop("maintenance_received_job_id")
    values["maintenance_job_id"] = None if key is None else received_job_id(key, received)
    return values


async def host_exists(connection: Connection, host_id: uuid.UUID) -> bool:
    """Whether there is a host with this id."""
    return bool(await connection.fetchval("SELECT true FROM hosts WHERE id = $1", host_id))


async def host_group(pool: asyncpg.Pool | Connection, host_id: uuid.UUID) -> str | None:
    """The host's group; None if there is no such host."""
    group: str | None = await pool.fetchval('SELECT "group" FROM hosts WHERE id = $1', host_id)
    return group


async def names_and_groups(
    connection: Connection | asyncpg.Pool, host_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[str, str]]:
    """(name, group) of each of `host_ids` that exists, in one query (the notifier's context of a batch of events);
    unknown hosts are absent."""
    rows = await connection.fetch('SELECT id, name, "group" FROM hosts WHERE id = ANY($1::uuid[])', list(set(host_ids)))
    return {row["id"]: (row["name"], row["group"]) for row in rows}


async def host_groups(connection: Connection | asyncpg.Pool, host_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The group of each of `host_ids` that exists: {host_id: group}; unknown hosts are absent."""
    rows = await connection.fetch('SELECT id, "group" FROM hosts WHERE id = ANY($1::uuid[])', list(set(host_ids)))
    return {row["id"]: row["group"] for row in rows}


async def host_page(
    pool: asyncpg.Pool,
    *,
    groups: list[str] | None,
    group: str | None,
    status: str | None,
    after_name: str | None,
    limit: int,
    name: str | None = None,
) -> list[asyncpg.Record]:
    """Up to `limit` hosts (HOST_VIEW_COLUMNS: see `host_values`) by name after `after_name`, of `groups` (None:
    every group), optionally of one group, one summary and one name. Only the conditions in use are in the
    statement, so each finds its index."""
    conditions: list[str] = []
    arguments: list[Any] = []

    def where(condition: str, value: Any) -> None:
        arguments.append(value)
        conditions.append(condition.format(f"${len(arguments)}"))

    if groups is not None:
        where('h."group" = ANY({}::text[])', groups)
    if group is not None:
        where('h."group" = {}', group)
    if status is not None:
        where("h.health_check_status = {}", status)
    if name is not None:
        where("h.name = {}", name)
    if after_name is not None:
        where("h.name > {}", after_name)
    arguments.append(limit)
    # The page is chosen first and only its rows look for a job in patch.
    sql = (
        f"SELECT {HOST_VIEW_COLUMNS} FROM (SELECT * FROM hosts h"
        + (" WHERE " + " AND ".join(conditions) if conditions else "")
        + f" ORDER BY h.name LIMIT ${len(arguments)}) h {_IN_PATCH_JOIN} ORDER BY h.name"
    )
    return await pool.fetch(sql, *arguments)


async def hosts_of_groups(connection: Connection | asyncpg.Pool, groups: list[str]) -> list[asyncpg.Record]:
    """Every host of `groups` (HOST_VIEW_COLUMNS: see `host_values`), by group and name: the dashboard's groups
    page shows each group's hosts by state and who holds its disruption budget."""
    return await connection.fetch(
        f'SELECT {HOST_VIEW_COLUMNS} FROM hosts h {_IN_PATCH_JOIN} WHERE h."group" = ANY($1::text[]) '
        'ORDER BY h."group", h.name',
        groups,
    )


async def status_counts(pool: asyncpg.Pool, groups: list[str] | None) -> list[asyncpg.Record]:
    """How many hosts of `groups` (None: every group) have each summary: rows of (health_check_status,
    group, hosts)."""
    return await pool.fetch(
        """
        SELECT health_check_status, "group", count(*) AS hosts FROM hosts
        WHERE $1::text[] IS NULL OR "group" = ANY($1)
        GROUP BY 1, 2
        """,
        groups,
    )
