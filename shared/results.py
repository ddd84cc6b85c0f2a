"""`check_results`: every stored result, one partition per UTC day. This module is the only one that writes
the table or its partitions (docs/architecture.md, "Who writes which table").

- the pollers COPY each batch of results in (`copy_results`, inside the batch's transaction);
- the api deletes a deleted check's results with it (`delete_results_of_check`: a partitioned table
  carries no foreign key here, so nothing cascades);
- the partitions are created ahead (`ensure_result_partitions`) by `healthgate migrate`, by the pollers
  hourly and by every pruning pass, so that an insert never lacks one;
- the pruner removes expired results (`prune_expired`): whole days by detaching (CONCURRENTLY: writers and
  readers are not blocked) and dropping their partitions, and the boundary day's expired rows in batches.

The reads are here too: a check's results page (api), its recent history (dashboard), each check's latest
result as of a moment (the gate's window_closed detail), and the oldest result kept (pruner).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from shared.database import Connection, delete_in_batches

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms", "cert_expires_at"
]  # fmt: skip
RESULT_PARTITION_DAYS_AHEAD = 7
PARTITION_NAME = re.compile(r"^check_results_(\d{8})$")


def result_partition_name(day: dt.date) -> str:
    """The partition holding the results of one UTC day: `check_results_YYYYMMDD`."""
    return f"check_results_{day:%Y%m%d}"


# ---- writes ----------------------------------------------------------------------------------------


async def copy_results(connection: Connection, records: Sequence[tuple[object, ...]]) -> None:
    """Write a batch of results in one COPY, in the caller's transaction; each record holds RESULT_COLUMNS
    in that order."""
    await connection.copy_records_to_table("check_results", records=records, columns=RESULT_COLUMNS)


async def delete_results_of_check(connection: Connection, check_id: uuid.UUID) -> None:
    """Delete every result of a check that is being deleted, in the caller's transaction."""
    await connection.execute("DELETE FROM check_results WHERE check_id = $1", check_id)


async def ensure_result_partitions(
    connection: Connection, today: dt.date, days_ahead: int = RESULT_PARTITION_DAYS_AHEAD
) -> list[str]:
    """Create the daily result partitions from yesterday to `days_ahead` days on. Idempotent; returns
    the names of those it created."""
    existing = {row["relname"] for row in await connection.fetch(_PARTITIONS_SQL)}
    created = []
    for offset in range(-1, days_ahead + 1):
        day = today + dt.timedelta(days=offset)
        name = result_partition_name(day)
        if name in existing:
            continue
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        end = start + dt.timedelta(days=1)
        try:
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF check_results "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        except asyncpg.InvalidObjectDefinitionError:
            # Another process created an overlapping partition at the same moment.
            continue
        created.append(name)
    return created


_PARTITIONS_SQL = """
SELECT child.relname, inh.inhdetachpending
FROM pg_inherits inh
JOIN pg_class parent ON parent.oid = inh.inhparent
JOIN pg_class child ON child.oid = inh.inhrelid
WHERE parent.relname = 'check_results'
"""


@dataclass
class ResultsPruned:
    """What `prune_expired` removed: the partitions dropped, the rows they held (an estimate from
    `pg_class.reltuples`) and the boundary day's rows deleted one by one."""

    partitions_dropped: list[str] = field(default_factory=list)
    rows_in_dropped_partitions: int = 0
    rows_deleted: int = 0


async def prune_expired(pool: asyncpg.Pool, connection: Connection, cutoff: dt.datetime) -> ResultsPruned:
    """Remove the results older than `cutoff` at a cost that depends on the number of days, not the data.

    On `connection` (the pruner's, holding its advisory lock), each partition whose whole day lies before
    the cutoff is detached CONCURRENTLY and dropped; a partition an interrupted pass left "detach pending"
    gets `DETACH … FINALIZE`, and a table detached but not dropped is dropped. Then the expired rows of
    the boundary days (holding both expired and kept rows) are deleted in batches of short transactions
    on `pool`, each partition addressed by name (a ctid identifies a row within one table only).
    Idempotent: the next pass finishes whatever an interrupted one left."""
    pruned = ResultsPruned()
    boundary = await _drop_expired_partitions(connection, cutoff, pruned)
    for name in boundary:
        pruned.rows_deleted += await delete_in_batches(
            pool, f"DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {name} WHERE checked_at < $1 LIMIT $2))",
            cutoff,
        )  # fmt: skip
    return pruned


async def _result_partitions(connection: Connection) -> list[tuple[str, dt.date, bool]]:
    """(name, day, detach pending) of every daily result partition, oldest first."""
    partitions = []
    for row in await connection.fetch(_PARTITIONS_SQL):
        match = PARTITION_NAME.match(row["relname"])
        if match:
            day = dt.datetime.strptime(match.group(1), "%Y%m%d").date()
            partitions.append((row["relname"], day, row["inhdetachpending"]))
    return sorted(partitions, key=lambda partition: partition[1])


async def _drop_expired_partitions(connection: Connection, cutoff: dt.datetime, pruned: ResultsPruned) -> list[str]:
    """Drop every partition whose whole day lies before the cutoff, without blocking writers.
    Returns the boundary partitions: those holding both expired and kept rows."""
    boundary = []
    for name, day, detaching in await _result_partitions(connection):
        day_starts = dt.datetime.combine(day, dt.time(), dt.UTC)
        if day_starts + dt.timedelta(days=1) > cutoff:
            if day_starts < cutoff:
                boundary.append(name)
            continue
        rows = await connection.fetchval(f"SELECT reltuples::bigint FROM pg_class WHERE relname = '{name}'")
        if detaching:
            # A pass that was interrupted during the detach left it pending: finish it.
            await connection.execute(f"ALTER TABLE check_results DETACH PARTITION {name} FINALIZE")
        else:
            await connection.execute(f"ALTER TABLE check_results DETACH PARTITION {name} CONCURRENTLY")
        await connection.execute(f"DROP TABLE {name}")
        pruned.partitions_dropped.append(name)
        pruned.rows_in_dropped_partitions += max(0, rows or 0)
        log.info("dropped an expired result partition", extra={"partition": name, "approximate_rows": rows})
    # Detached (not dropped) leftovers of an interrupted pass.
    leftovers = """
        SELECT relname FROM pg_class
        WHERE relname ~ '^check_results_[0-9]{8}$' AND relkind = 'r' AND NOT relispartition
    """
    for row in await connection.fetch(leftovers):
        await connection.execute(f"DROP TABLE IF EXISTS {row['relname']}")
        pruned.partitions_dropped.append(row["relname"])
    return boundary


# ---- reads -----------------------------------------------------------------------------------------


async def oldest_result_since(connection: Connection, cutoff: dt.datetime) -> dt.datetime | None:
    """The time of the oldest result at or after `cutoff` (the pruner's figure after a pass). Bounded by
    the cutoff: the index entries of rows just deleted would otherwise be walked."""
    oldest: dt.datetime | None = await connection.fetchval(
        "SELECT min(checked_at) FROM check_results WHERE checked_at >= $1", cutoff
    )
    return oldest


async def result_page(
    connection: Connection,
    check_id: uuid.UUID,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` results of a check, newest first, from `since` (inclusive) to `until` (exclusive),
    after the key (checked_at, id) of the previous page's last row."""
    return await connection.fetch(
        """
        SELECT id, healthy, reason, status, detail, latency_ms, checked_at, cert_expires_at
        FROM check_results
        WHERE check_id = $1
          AND ($2::timestamptz IS NULL OR checked_at >= $2)
          AND ($3::timestamptz IS NULL OR checked_at < $3)
          AND ($4::timestamptz IS NULL OR (checked_at, id) < ($4, $5::uuid))
        ORDER BY checked_at DESC, id DESC
        LIMIT $6
        """,
        check_id,
        since,
        until,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def recent_results(connection: Connection, check_ids: list[uuid.UUID], per_check: int) -> list[asyncpg.Record]:
    """The `per_check` newest results of each check, as rows (id = the check's id, healthy, reason,
    detail, latency_ms, checked_at), newest first within a check."""
    return await connection.fetch(
        f"""
        SELECT c.id, r.healthy, r.reason, r.detail, r.latency_ms, r.checked_at
        FROM unnest($1::uuid[]) AS c(id)
        CROSS JOIN LATERAL (
            SELECT healthy, reason, detail, latency_ms, checked_at FROM check_results
            WHERE check_id = c.id ORDER BY checked_at DESC LIMIT {int(per_check)}
        ) r
        """,
        check_ids,
    )


async def latest_results_at(
    connection: Connection, check_ids: list[uuid.UUID], moment: dt.datetime
) -> dict[uuid.UUID, asyncpg.Record]:
    """Each check's latest result whose `checked_at` is at or before `moment` (status, healthy, detail,
    checked_at: all NULL when it had none by then, or none is kept any more). One backward step of the
    primary key (check_id, checked_at, id) per check: the partitions are scanned newest first (an
    ordered Append) and the first row found ends it."""
    rows = await connection.fetch(
        """
        SELECT c.check_id, r.status, r.healthy, r.detail, r.checked_at
        FROM unnest($1::uuid[]) AS c(check_id)
        LEFT JOIN LATERAL (
            SELECT status, healthy, detail, checked_at
            FROM check_results
            WHERE check_id = c.check_id AND checked_at <= $2
            ORDER BY checked_at DESC
            LIMIT 1
        ) r ON true
        """,
        check_ids,
        moment,
    )
    return {row["check_id"]: row for row in rows}
