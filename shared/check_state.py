"""`check_state`: what the pollers learnt of each check, one row per check. This module is the only one
that writes the table (docs/architecture.md, "Who writes which table").

- the api creates a check's state with it (`create_state`: status unknown, no streak);
- the api forgets the status of a check whose target or rules changed (`forget_status`: unknown again until the
  first result of the new configuration);
- the pollers' result writer locks the states of a batch (`lock_for_results`, after the hosts: see
  shared/hosts.py on lock order), advances each streak (`advance`) and stores the streaks, the last
  result and `last_slot` of every check in one statement (`store_states`).

The row goes with its check (ON DELETE CASCADE).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from shared.database import Connection
from shared.events import CheckStatus, ResultReason


@dataclass(frozen=True)
class Streak:
    """A check's status and its current run of consecutive failures and successes."""

    status: CheckStatus
    failures: int
    successes: int


def advance(streak: Streak, healthy: bool, *, failures_needed: int, successes_needed: int) -> Streak:
    """The check's state after one more result. The first result sets the status directly; later
    flips need `failures_needed` / `successes_needed` consecutive results (CONTRACT §3)."""
    failures = 0 if healthy else streak.failures + 1
    successes = streak.successes + 1 if healthy else 0
    status = streak.status
    if status == "unknown":
        status = "healthy" if healthy else "unhealthy"
    elif healthy and status == "unhealthy" and successes >= successes_needed:
        status = "healthy"
    elif not healthy and status == "healthy" and failures >= failures_needed:
        status = "unhealthy"
    return Streak(status, failures, successes)


@dataclass(frozen=True)
class StateAfter:
    """A check's state after the last result of a batch: its streak, that result and the batch's last slot."""

    check_id: uuid.UUID
    streak: Streak
    healthy: bool
    reason: ResultReason
    detail: str
    latency_ms: float
    checked_at: dt.datetime
    last_slot: dt.datetime | None
    cert_expires_at: dt.datetime | None = None


async def create_state(connection: Connection, check_id: uuid.UUID, host_id: uuid.UUID) -> None:
    """The state of a new check (unknown, no result yet), in the transaction that creates the check."""
    await connection.execute("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", check_id, host_id)


async def create_states(connection: Connection, checks: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> None:
    """`create_state` for many new checks at once (`checks`: (check_id, host_id))."""
    await connection.executemany("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", checks)


async def forget_status(connection: Connection, check_ids: Sequence[uuid.UUID]) -> None:
    """Set these checks back to `unknown` with no streak, after a change of what they probe or how a result is
    judged (the API's PUT of a check, or of its host's name or agent_url): a result of the old configuration says
    nothing of the new one, and the gate releases only on a healthy status (CONTRACT §3: `unknown` until the first
    result, which sets the status directly). The last result stays, as what it was. In the caller's transaction,
    which holds the checks' host: the pollers lock the host before its states too (shared/hosts.py, lock order),
    so the order in which this statement takes the rows cannot deadlock with them."""
    await connection.execute(
        """
        UPDATE check_state
        SET status = 'unknown', consecutive_failures = 0, consecutive_successes = 0, healthy_since = NULL,
            status_changed_at = CASE WHEN status <> 'unknown' THEN now() ELSE status_changed_at END
        WHERE check_id = ANY($1::uuid[])
        """,
        list(set(check_ids)),
    )


async def lock_for_results(connection: Connection, check_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """Lock the states of these checks in id order (`check_ids` sorted), after their hosts: rows of
    check_id, host_id, status, consecutive_failures, consecutive_successes, last_slot, the check's
    failures_before_unhealthy and successes_before_healthy, when the check was last changed (`check_updated_at`)
    and its host's `host_name` and `agent_url` (a run of a configuration changed since is not stored). A deleted
    check has no row."""
    return await connection.fetch(
        """
        SELECT s.check_id, s.host_id, s.status, s.consecutive_failures, s.consecutive_successes, s.last_slot,
               c.failures_before_unhealthy, c.successes_before_healthy,
               c.updated_at AS check_updated_at, h.name AS host_name, h.agent_url
        FROM check_state s
        JOIN health_checks c ON c.id = s.check_id
        JOIN hosts h ON h.id = c.host_id
        WHERE s.check_id = ANY($1::uuid[])
        ORDER BY s.check_id
        FOR UPDATE OF s
        """,
        check_ids,
    )


async def store_states(connection: Connection, states: Sequence[StateAfter]) -> None:
    """Store each check's state after a batch in one statement, in the batch's transaction (rows locked
    by `lock_for_results`); `status_changed_at` moves to the result's time when the status changed, and
    `healthy_since` (CONTRACT §3, §6 stable_seconds) is that time when the check becomes healthy, kept while it
    stays healthy, NULL otherwise."""
    await connection.execute(
        """
        UPDATE check_state s
        SET status = u.status,
            consecutive_failures = u.failures,
            consecutive_successes = u.successes,
            last_healthy = u.healthy,
            last_reason = u.reason,
            last_detail = u.detail,
            last_latency_ms = u.latency_ms,
            last_checked_at = u.checked_at,
            last_slot = u.last_slot,
            last_cert_expires_at = u.cert_expires_at,
            status_changed_at = CASE WHEN s.status <> u.status THEN u.checked_at ELSE s.status_changed_at END,
            healthy_since = CASE
                WHEN u.status <> 'healthy' THEN NULL
                WHEN s.status = 'healthy' THEN COALESCE(s.healthy_since, u.checked_at)
                ELSE u.checked_at
            END
        FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::bool[], $6::text[], $7::text[],
                    $8::float8[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[])
            AS u(check_id, status, failures, successes, healthy, reason, detail, latency_ms, checked_at, last_slot,
                 cert_expires_at)
        WHERE s.check_id = u.check_id
        """,
        [state.check_id for state in states],
        [state.streak.status for state in states],
        [state.streak.failures for state in states],
        [state.streak.successes for state in states],
        [state.healthy for state in states],
        [state.reason for state in states],
        [state.detail for state in states],
        [state.latency_ms for state in states],
        [state.checked_at for state in states],
        [state.last_slot for state in states],
        [state.cert_expires_at for state in states],
    )
