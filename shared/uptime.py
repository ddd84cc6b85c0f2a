"""`check_uptime_hours`: each check's results counted per UTC hour, behind its `uptime_24h` (CONTRACT §3). This
module is the only one that writes the table (docs/architecture.md, "Who writes which table").

A check's `uptime_24h` is the share of its healthy results in the last 24 h. Reading a day of results per request
(up to 8,640 rows for a 10 s interval, for each of a page's checks) would make the API's cost grow with the
interval, so the pollers count each batch's results per check and UTC hour as they store them, and a read sums at
most WINDOW_HOURS rows per check:

- the pollers add a batch's results to their hours (`count_results`, one statement in the batch's transaction,
  after it locked the checks' states; `/test` runs are results like any other and count too);
- the api and the dashboard read the uptime of many checks at once (`uptime_24h`);
- the pruner deletes the hours no read counts any more (`prune_expired`).

The window (`window_start`): whole UTC hours, the current one included: the current hour and the 23 before it. It
is therefore between 23 and 24 hours long, and never counts a result older than 24 h: at 10:20 the results from
11:00 yesterday on count, those from 10:00 to 11:00 yesterday no longer do.

A check's hours go with it (ON DELETE CASCADE).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from shared.database import Connection, delete_in_batches

WINDOW_HOURS = 24
HOUR = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Counted:
    """One stored result, as the hourly counts need it: its check, when it was taken and whether it was healthy."""

    check_id: uuid.UUID
    checked_at: dt.datetime
    healthy: bool


def hour_of(moment: dt.datetime) -> dt.datetime:
    """The start of the UTC hour holding `moment` (an aware datetime), in UTC."""
    return moment.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def window_start(now: dt.datetime) -> dt.datetime:
    """The start of the oldest hour counted in `uptime_24h` at `now`: the current UTC hour's start minus 23 h."""
    return hour_of(now) - (WINDOW_HOURS - 1) * HOUR


# ---- writes ----------------------------------------------------------------------------------------


async def count_results(connection: Connection, counted: Sequence[Counted]) -> None:
    """Add a batch's stored results to their checks' hourly counts: one statement, in the batch's transaction.

    The batch holds its checks' `check_state` locks (shared/check_state.py `lock_for_results`), so two batches
    never count the same check at once; the rows are still inserted and updated in (check_id, hour) order, as
    every writer of the table does, so that no two transactions can ever take their locks in opposite orders.
    The hours are UTC hours (`date_trunc` in UTC, whatever the session's time zone)."""
    if not counted:
        return
    await connection.execute(
        """
        INSERT INTO check_uptime_hours AS u (check_id, hour, healthy, total)
        SELECT r.check_id, date_trunc('hour', r.checked_at, 'UTC'), count(*) FILTER (WHERE r.healthy), count(*)
        FROM unnest($1::uuid[], $2::timestamptz[], $3::bool[]) AS r(check_id, checked_at, healthy)
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (check_id, hour)
        DO UPDATE SET healthy = u.healthy + EXCLUDED.healthy, total = u.total + EXCLUDED.total
        """,
        [result.check_id for result in counted],
        [result.checked_at for result in counted],
        [result.healthy for result in counted],
    )


async def prune_expired(pool: asyncpg.Pool, now: dt.datetime) -> int:
    """Delete the hours before the window at `now` (`window_start`), which no read counts any more (the pruner),
    in batches of short transactions; returns how many rows went. The pollers only add to recent hours, so the
    two never wait for each other's rows."""
    return await delete_in_batches(
        pool,
        "DELETE FROM check_uptime_hours WHERE (check_id, hour) IN ("
        "SELECT check_id, hour FROM check_uptime_hours WHERE hour < $1 LIMIT $2)",
        window_start(now),
    )


# ---- reads -----------------------------------------------------------------------------------------


async def uptime_24h(connection: Connection, check_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, float | None]:
    """Each check's `uptime_24h` at the database's `now()`: its healthy results over all its results in the window
    (`window_start`: the current UTC hour and the 23 before it), from 0 to 1; None for a check without a result
    in the window. At most WINDOW_HOURS rows per check, read by the primary key (check_id, hour)."""
    if not check_ids:
        return {}
    rows = await connection.fetch(
        """
        SELECT check_id, sum(healthy)::float8 / sum(total) AS uptime
        FROM check_uptime_hours
        WHERE check_id = ANY($1::uuid[])
          AND hour >= date_trunc('hour', now(), 'UTC') - make_interval(hours => $2)
          AND total > 0
        GROUP BY check_id
        """,
        list(check_ids),
        WINDOW_HOURS - 1,
    )
    shares: dict[uuid.UUID, float | None] = dict.fromkeys(check_ids)
    for row in rows:
        shares[row["check_id"]] = row["uptime"]
    return shares


async def host_uptime_24h(
    connection: Connection | asyncpg.Pool, host_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, float | None]:
    """Each host's uptime over 24 h (the dashboard's hosts list and host page): the mean of its enabled checks'
    `uptime_24h` (0 to 1), each check weighing the same whatever its interval, so that a check run every 10 s
    does not drown one run hourly; checks without a result in the window are left out; None for a host none of
    whose enabled checks has one. One statement for a page of hosts: at most WINDOW_HOURS rows per check."""
    if not host_ids:
        return {}
    rows = await connection.fetch(
        """
        SELECT c.host_id, avg(u.share) AS uptime
        FROM health_checks c
        CROSS JOIN LATERAL (
            SELECT sum(h.healthy)::float8 / sum(h.total) AS share
            FROM check_uptime_hours h
            WHERE h.check_id = c.id
              AND h.hour >= date_trunc('hour', now(), 'UTC') - make_interval(hours => $2)
              AND h.total > 0
        ) u
        WHERE c.host_id = ANY($1::uuid[]) AND c.enabled AND u.share IS NOT NULL
        GROUP BY c.host_id
        """,
        list(host_ids),
        WINDOW_HOURS - 1,
    )
    shares: dict[uuid.UUID, float | None] = dict.fromkeys(host_ids)
    for row in rows:
        shares[row["host_id"]] = row["uptime"]
    return shares
