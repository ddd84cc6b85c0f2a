"""`check_schedule`: when each check runs next. This module is the only one that writes the table.

Three writers share it, and each statement here keeps one invariant: **a pending `next_run_at` is
always later than every slot already dispatched**. The pollers' result writer drops a scheduled
result whose slot is not newer than the check's `last_slot` (a tick delivered twice), so a slot
written below one already dispatched would be run and then thrown away. Every value written is
therefore taken from `clock_timestamp()` evaluated *after* the row's lock is held (never `now()`, the
transaction's start, which can precede a claim that committed while this transaction waited), or
kept from a pending value, or moved past the claimed slot.

- the api: a created, changed or re-enabled check first runs within `FIRST_RUN_WITHIN_SECONDS`
  (CONTRACT §4), and a later change never postpones a run already due sooner (`schedule_first_run`);
- the pollers' scheduler: claims due rows and moves each to its next slot (`claim_due`);
- the gate: asks for a re-run of failing or stale checks by pulling their next run to now, at most
  once per retry period per check however many jobs wait on it (`request_reruns`). The request
  commits with the evaluation that made it, so neither a gate crash nor a broker outage loses it, and
  the scheduler dispatches it as an ordinary slot as soon as a poller's broker connection is up.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import asyncpg

from shared.database import Connection

FIRST_RUN_WITHIN_SECONDS = 5

_FIRST_RUN_SQL = f"""
INSERT INTO check_schedule (check_id, next_run_at)
VALUES ($1, CASE WHEN $2 THEN clock_timestamp() + random() * interval '{FIRST_RUN_WITHIN_SECONDS} seconds' END)
ON CONFLICT (check_id) DO UPDATE
-- DO UPDATE's expressions are evaluated once the existing row is locked, so clock_timestamp() is
-- later than any slot a scheduler claimed before. LEAST: a pending run due sooner stays (a check
-- changed every 2 s would otherwise be pushed back on every change and never run); LEAST ignores
-- the NULL of a check that was disabled.
SET next_run_at = CASE WHEN $2 THEN LEAST(
    check_schedule.next_run_at,
    clock_timestamp() + random() * interval '{FIRST_RUN_WITHIN_SECONDS} seconds'
) END
"""

CLAIM_SQL = """
WITH due AS (
    SELECT s.check_id, s.next_run_at AS slot
    FROM check_schedule s
    WHERE s.next_run_at <= now()
    ORDER BY s.next_run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE check_schedule s
SET next_run_at = CASE
    WHEN due.slot + make_interval(secs => c.interval_seconds) > now()
        THEN due.slot + make_interval(secs => c.interval_seconds)
    -- Late (the pollers were down): resume with a jitter of up to a tenth of the interval, so that
    -- the checks that fell due together do not stay bunched.
    ELSE now() + make_interval(secs => c.interval_seconds * (1 + random() / 10))
END
FROM due
JOIN health_checks c ON c.id = due.check_id
WHERE s.check_id = due.check_id
RETURNING due.check_id, due.slot, c.enabled
"""

_RERUN_SQL = """
WITH pulled AS (
    SELECT check_id
    FROM check_schedule
    WHERE check_id = ANY($1::uuid[])
      -- disabled (NULL) checks are not run; one already due runs anyway
      AND next_run_at > clock_timestamp()
      -- now(), the transaction's start, is also what the gate's retry timer (next_retry_at) is
      -- computed from: a retry that comes due one period later finds the period passed exactly.
      AND (rerun_requested_at IS NULL OR rerun_requested_at <= now() - make_interval(secs => $2)
           OR rerun_requested_at < $3)
    -- A row locked by a scheduler is being dispatched now, by the api being rescheduled within
    -- seconds, by another gate being pulled: each means a run is coming, so skip it, never wait.
    FOR UPDATE SKIP LOCKED
)
UPDATE check_schedule s
SET next_run_at = clock_timestamp(), rerun_requested_at = now()
FROM pulled
WHERE s.check_id = pulled.check_id
RETURNING s.check_id
"""


async def schedule_first_run(connection: Connection, check_id: uuid.UUID, *, enabled: bool) -> None:
    """Schedule a created, changed or re-enabled check to run within FIRST_RUN_WITHIN_SECONDS (a random
    offset, so that a bulk import does not start every check in the same instant), unless a run is
    already due sooner; a disabled check is not scheduled (NULL). In the caller's transaction, which
    holds the check's row (CONTRACT §4: "A created, changed or re-enabled check first runs within 5 s")."""
    await connection.execute(_FIRST_RUN_SQL, check_id, enabled)


async def schedule_first_runs(connection: Connection, checks: Sequence[tuple[uuid.UUID, bool]]) -> None:
    """`schedule_first_run` for many checks at once (`checks`: (check_id, enabled)), in the caller's transaction."""
    await connection.executemany(_FIRST_RUN_SQL, checks)


async def claim_due(connection: Connection, limit: int) -> list[asyncpg.Record]:
    """Claim up to `limit` due checks (oldest first; rows other schedulers hold are skipped) and move
    each to its next slot: `slot + interval_seconds` if that is still ahead (a cadence that does not
    drift with dispatch delays), else `now() + interval` with up to 10 % jitter (after a downtime a
    check runs once and resumes). Rows of (`check_id`, `slot`, `enabled`); the caller dispatches the
    enabled ones before it commits."""
    return await connection.fetch(CLAIM_SQL, limit)


async def request_reruns(
    connection: Connection,
    check_ids: Sequence[uuid.UUID],
    *,
    retry_seconds: float,
    results_from: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """Ask for these checks to run now: pull each one's next run to the present, unless it is disabled,
    already due, locked by another writer (a run is coming anyway), or was pulled less than
    `retry_seconds` (HEALTHGATE_GATE_RETRY_SECONDS) ago. So a check runs at most once per retry period
    for the gate, plus its own interval, however many jobs wait on it. `results_from`: only a result from
    this moment on will do (a verification's `verify_from_at`, after the patch), so a pull before it does
    not hold this one back. In the caller's transaction; returns the checks pulled."""
    if not check_ids:
        return []
    rows = await connection.fetch(_RERUN_SQL, sorted(set(check_ids)), float(retry_seconds), results_from)
    return [row["check_id"] for row in rows]
