"""`health_checks`: the checks' configuration, all three types in one table. This module is the only one
that writes the table (docs/architecture.md, "Who writes which table").

Only the api changes checks (`insert_check`, `update_check`, `delete_check`), each in a transaction that
has locked the host first (shared/hosts.py `lock_host`), and that also writes the check's state
(shared/check_state.py), its schedule (shared/schedule.py), the host summary, the audit entry and the
event. The column values come validated from the api; which columns exist is the api's schema.

The reads of checks are here as well: the api's and dashboard's view (a check with its state), the
counts behind the host rules, and the checks a poller's tick names.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from shared.database import Connection
from shared.results import delete_results_of_check

# A check with what the pollers last learnt of it, as the api and the dashboard show it.
CHECK_SELECT = """
    SELECT c.*, s.status, s.healthy_since, s.last_healthy, s.last_reason, s.last_detail, s.last_latency_ms,
           s.last_checked_at, s.last_cert_expires_at
    FROM health_checks c
    JOIN check_state s ON s.check_id = c.id
"""


# ---- writes ----------------------------------------------------------------------------------------


async def insert_check(
    connection: Connection, check_id: uuid.UUID, host_id: uuid.UUID, values: Mapping[str, Any]
) -> None:
    """Create a check: `values` maps each writable column to its value. Raises
    asyncpg.UniqueViolationError when the host has a check of that name."""
    columns = ", ".join(values)
    placeholders = ", ".join(f"${index}" for index in range(3, len(values) + 3))
    await connection.execute(
        f"INSERT INTO health_checks (id, host_id, {columns}) VALUES ($1, $2, {placeholders})",
        check_id,
        host_id,
        *values.values(),
    )


async def insert_checks(connection: Connection, rows: Sequence[tuple[uuid.UUID, uuid.UUID, Mapping[str, Any]]]) -> None:
    """Create many checks at once (`rows`: (check_id, host_id, values), every `values` mapping the same writable
    columns in the same order), in the caller's transaction. Raises asyncpg.UniqueViolationError when a host has
    two checks of one name."""
    if not rows:
        return
    names = list(rows[0][2])
    columns = ", ".join(names)
    placeholders = ", ".join(f"${index}" for index in range(3, len(names) + 3))
    await connection.executemany(
        f"INSERT INTO health_checks (id, host_id, {columns}) VALUES ($1, $2, {placeholders})",
        [(check_id, host_id, *(values[name] for name in names)) for check_id, host_id, values in rows],
    )


async def checks_of_hosts(connection: Connection, host_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """The checks (CHECK_SELECT) of these hosts, by host and then oldest first."""
    return await connection.fetch(
        f"{CHECK_SELECT} WHERE c.host_id = ANY($1::uuid[]) ORDER BY c.host_id, c.created_at, c.name", list(host_ids)
    )


async def update_check(
    connection: Connection, check_id: uuid.UUID, host_id: uuid.UUID, values: Mapping[str, Any]
) -> None:
    """Replace a check's writable columns (`values`) and stamp `updated_at`. Raises
    asyncpg.UniqueViolationError when the host has another check of that name."""
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(values, start=3))
    await connection.execute(
        f"UPDATE health_checks SET {assignments}, updated_at = now() WHERE id = $1 AND host_id = $2",
        check_id,
        host_id,
        *values.values(),
    )


async def delete_check(connection: Connection, check_id: uuid.UUID) -> None:
    """Delete a check and its results (a partitioned table has no foreign key here, so they are deleted
    explicitly); its state and schedule cascade."""
    await delete_results_of_check(connection, check_id)
    await connection.execute("DELETE FROM health_checks WHERE id = $1", check_id)


# ---- reads -----------------------------------------------------------------------------------------


async def fetch_check(
    connection: Connection, host_id: uuid.UUID, check_id: uuid.UUID, *, for_update: bool = False
) -> asyncpg.Record | None:
    """A check of the host (CHECK_SELECT: the check with its state), its row locked when `for_update`;
    None if the host has no such check."""
    lock = " FOR UPDATE OF c" if for_update else ""
    row: asyncpg.Record | None = await connection.fetchrow(
        f"{CHECK_SELECT} WHERE c.id = $1 AND c.host_id = $2{lock}", check_id, host_id
    )
    return row


async def checks_of_host(connection: Connection, host_id: uuid.UUID) -> list[asyncpg.Record]:
    """The host's checks (CHECK_SELECT), oldest first."""
    return await connection.fetch(f"{CHECK_SELECT} WHERE c.host_id = $1 ORDER BY c.created_at, c.name", host_id)


async def check_page(
    connection: Connection | asyncpg.Pool,
    *,
    groups: list[str] | None,
    group: str | None,
    after_id: uuid.UUID | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` checks (CHECK_SELECT) by id after `after_id`, of the hosts of `groups` (None: every group),
    optionally of one group: a whole fleet's checks in a few reads (`healthgate apply` plans against it)."""
    conditions: list[str] = []
    arguments: list[Any] = []
    if groups is not None:
        arguments.append(groups)
        conditions.append(f'h."group" = ANY(${len(arguments)}::text[])')
    if group is not None:
        arguments.append(group)
        conditions.append(f'h."group" = ${len(arguments)}')
    if after_id is not None:
        arguments.append(after_id)
        conditions.append(f"c.id > ${len(arguments)}")
    arguments.append(limit)
    sql = (
        f"{CHECK_SELECT} JOIN hosts h ON h.id = c.host_id"
        + (" WHERE " + " AND ".join(conditions) if conditions else "")
        + f" ORDER BY c.id LIMIT ${len(arguments)}"
    )
    return await connection.fetch(sql, *arguments)


async def failing_checks_of_hosts(
    connection: Connection | asyncpg.Pool, host_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[str, str]]]:
    """(name, detail of the last result) of each enabled, unhealthy check of each of `host_ids`, in one query (the
    notifier's context of a batch of events: what a person reads first): {host_id: [(name, detail), ...] by name};
    a host without failing checks is absent."""
    rows = await connection.fetch(
        """
        SELECT c.host_id, c.name, coalesce(s.last_detail, '') AS detail
        FROM health_checks c JOIN check_state s ON s.check_id = c.id
        WHERE c.host_id = ANY($1::uuid[]) AND c.enabled AND s.status = 'unhealthy'
        ORDER BY c.host_id, c.name
        """,
        list(set(host_ids)),
    )
    found: dict[uuid.UUID, list[tuple[str, str]]] = {}
    for row in rows:
        found.setdefault(row["host_id"], []).append((row["name"], row["detail"]))
    return found


async def check_names(connection: Connection | asyncpg.Pool, check_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The name of each of `check_ids` that exists, in one query; deleted checks are absent."""
    rows = await connection.fetch("SELECT id, name FROM health_checks WHERE id = ANY($1::uuid[])", list(set(check_ids)))
    return {row["id"]: row["name"] for row in rows}


async def check_ids_of_host(connection: Connection, host_id: uuid.UUID) -> list[uuid.UUID]:
    """The ids of the host's checks (a host being deleted deletes each one first)."""
    return [row["id"] for row in await connection.fetch("SELECT id FROM health_checks WHERE host_id = $1", host_id)]


async def count_checks(connection: Connection, host_id: uuid.UUID) -> int:
    """How many checks the host has (the api's 5-check limit; the caller holds the host's lock)."""
    count: int = await connection.fetchval("SELECT count(*) FROM health_checks WHERE host_id = $1", host_id)
    return count


async def checks_probing_host(
    connection: Connection, host_id: uuid.UUID, *, name: bool, agent_url: bool
) -> list[tuple[uuid.UUID, bool]]:
    """The host's checks whose target is its `name` (tcp and grpc checks without an address), with `name`, and
    those that ask its `agent_url` (service checks), with `agent_url`: (check_id, enabled), in id order."""
    rows = await connection.fetch(
        """
        SELECT id, enabled FROM health_checks
        WHERE host_id = $1
          AND (($2 AND check_type IN ('tcp', 'grpc') AND address IS NULL) OR ($3 AND check_type = 'service'))
        ORDER BY id
        """,
        host_id,
        name,
        agent_url,
    )
    return [(row["id"], row["enabled"]) for row in rows]


async def count_service_checks(connection: Connection, host_id: uuid.UUID) -> int:
    """The host's service checks, which need its agent_url."""
    count: int = await connection.fetchval(
        "SELECT count(*) FROM health_checks WHERE host_id = $1 AND check_type = 'service'", host_id
    )
    return count


async def count_checks_without_address(connection: Connection, host_id: uuid.UUID) -> dict[str, int]:
    """The host's tcp and grpc checks without an address, which connect to the host's name, by check type
    (a type without one is absent)."""
    rows = await connection.fetch(
        """
        SELECT check_type, count(*) AS count FROM health_checks
        WHERE host_id = $1 AND check_type IN ('tcp', 'grpc') AND address IS NULL
        GROUP BY check_type ORDER BY check_type DESC
        """,
        host_id,
    )
    return {row["check_type"]: row["count"] for row in rows}


async def checks_to_run(connection: Connection, check_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """What a poller needs to run these checks: each check's settings (its password still encrypted), its
    host's name (`host_name`) and `agent_url`, and when the check was last changed (`check_updated_at`). A check
    deleted since has no row."""
    return await connection.fetch(
        """
        SELECT c.id, c.host_id, c.check_type, c.enabled, c.timeout_seconds, c.service_name, c.url, c.method,
               c.expected_status, c.expected_body, c.ignore_cert_errors, c.follow_redirects, c.basic_auth_user,
               c.basic_auth_pass_encrypted, c.port, c.address, c.max_latency_ms, c.condition, c.min_cert_days,
               c.dns_name, c.record_type, c.expected_values, c.dns_server, c.grpc_service, c.tls,
               h.name AS host_name, h.agent_url, c.updated_at AS check_updated_at
        FROM health_checks c
        JOIN hosts h ON h.id = c.host_id
        WHERE c.id = ANY($1::uuid[])
        """,
        list(check_ids),
    )
