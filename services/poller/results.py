"""Reading the checks a tick names, and writing a batch of their results in one transaction.

A batch writes every result (COPY), updates each check's state with its persisted streak counters,
publishes `check.result`, `check.status_changed` and `host.status_changed` through the outbox and
recomputes the summary of hosts whose checks flipped — all in one commit, before the tick is acked.
Locks are taken hosts first, then check states, each in id order: the API takes them in the same
order, so the two never deadlock.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.poller.probes import CheckTarget, ProbeOutcome
from shared.crypto import SecretBox
from shared.details import safe_detail
from shared.events import CheckResult, CheckStatus, CheckStatusChanged, EventModel
from shared.host_status import refresh_host_status
from shared.outbox import enqueue_many

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"]


@dataclass(frozen=True)
class Streak:
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
class CheckRow:
    """A check as stored, its password still encrypted."""

    record: asyncpg.Record

    @property
    def check_id(self) -> uuid.UUID:
        return self.record["id"]  # type: ignore[no-any-return]

    @property
    def enabled(self) -> bool:
        return self.record["enabled"]  # type: ignore[no-any-return]

    def target(self, secrets: SecretBox) -> CheckTarget:
        """The probe's view; the password is decrypted here, just before the run, and only in memory."""
        row = self.record
        password = None
        if row["basic_auth_pass_encrypted"] is not None:
            password = secrets.decrypt(row["basic_auth_pass_encrypted"], row["id"])
        return CheckTarget(
            check_id=row["id"],
            host_id=row["host_id"],
            check_type=row["check_type"],
            timeout_seconds=row["timeout_seconds"],
            host_name=row["host_name"],
            agent_url=row["agent_url"],
            service_name=row["service_name"],
            url=row["url"],
            method=row["method"] or "GET",
            expected_status=row["expected_status"] or "2xx",
            expected_body=row["expected_body"],
            ignore_cert_errors=row["ignore_cert_errors"] if row["ignore_cert_errors"] is not None else True,
            follow_redirects=bool(row["follow_redirects"]),
            basic_auth_user=row["basic_auth_user"],
            basic_auth_pass=password,
            port=row["port"],
            address=row["address"],
            max_latency_ms=row["max_latency_ms"],
        )


async def load_checks(connection: asyncpg.Connection, check_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, CheckRow]:
    rows = await connection.fetch(
        """
        SELECT c.id, c.host_id, c.check_type, c.enabled, c.timeout_seconds, c.service_name, c.url, c.method,
               c.expected_status, c.expected_body, c.ignore_cert_errors, c.follow_redirects, c.basic_auth_user,
               c.basic_auth_pass_encrypted, c.port, c.address, c.max_latency_ms, h.name AS host_name, h.agent_url
        FROM health_checks c
        JOIN hosts h ON h.id = c.host_id
        WHERE c.id = ANY($1::uuid[])
        """,
        list(check_ids),
    )
    return {row["id"]: CheckRow(row) for row in rows}


@dataclass(frozen=True)
class FinishedRun:
    """A probe's outcome, not yet stored. `secrets` are redacted from its detail when it is (the
    check's password and encoded credentials, should the target have echoed them)."""

    check_id: uuid.UUID
    host_id: uuid.UUID
    slot: dt.datetime | None
    outcome: ProbeOutcome
    checked_at: dt.datetime
    secrets: tuple[str, ...] = ()


async def store_results(
    connection: asyncpg.Connection, runs: Sequence[FinishedRun], *, source: str
) -> list[CheckResult]:
    """Write a batch of results in the caller's transaction. Returns the results stored: a run whose
    check is gone, or whose slot was already stored (a redelivered tick), is dropped.

    This is where a probe's outcome becomes a result: its detail goes through `safe_detail` here, once,
    for the stored row, the check's state, the events and the `/test` reply alike (CONTRACT §4: at most
    1,000 characters, no credential)."""
    if not runs:
        return []
    host_ids = sorted({run.host_id for run in runs})
    await connection.execute("SELECT 1 FROM hosts WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", host_ids)
    state_rows = await connection.fetch(
        """
        SELECT s.check_id, s.host_id, s.status, s.consecutive_failures, s.consecutive_successes, s.last_slot,
               c.failures_before_unhealthy, c.successes_before_healthy
        FROM check_state s
        JOIN health_checks c ON c.id = s.check_id
        WHERE s.check_id = ANY($1::uuid[])
        ORDER BY s.check_id
        FOR UPDATE OF s
        """,
        sorted({run.check_id for run in runs}),
    )
    states = {row["check_id"]: row for row in state_rows}
    streaks = {
        check_id: Streak(row["status"], row["consecutive_failures"], row["consecutive_successes"])
        for check_id, row in states.items()
    }
    last_slots: dict[uuid.UUID, dt.datetime | None] = {check_id: row["last_slot"] for check_id, row in states.items()}
    results: list[tuple[object, ...]] = []
    stored: list[CheckResult] = []
    events: list[tuple[str, EventModel]] = []
    flipped_hosts: set[uuid.UUID] = set()
    last_run: dict[uuid.UUID, FinishedRun] = {}
    details: dict[uuid.UUID, str] = {}
    changes: list[CheckStatusChanged] = []
    for run in sorted(runs, key=lambda run: run.checked_at):
        state = states.get(run.check_id)
        if state is None:
            continue  # the check was deleted while it ran
        last_slot = last_slots[run.check_id]
        if run.slot is not None and last_slot is not None and run.slot <= last_slot:
            continue  # this slot's result is already stored: the tick was delivered twice
        before = streaks[run.check_id]
        after = advance(
            before,
            run.outcome.healthy,
            failures_needed=state["failures_before_unhealthy"],
            successes_needed=state["successes_before_healthy"],
        )
        streaks[run.check_id] = after
        if run.slot is not None:
            last_slots[run.check_id] = run.slot
        last_run[run.check_id] = run
        outcome = run.outcome
        detail = details[run.check_id] = safe_detail(outcome.detail, run.secrets)
        results.append(
            (uuid.uuid4(), run.check_id, state["host_id"], run.checked_at, outcome.healthy, outcome.reason,
             after.status, detail, outcome.latency_ms)
        )  # fmt: skip
        result = CheckResult(
            check_id=run.check_id,
            host_id=state["host_id"],
            healthy=outcome.healthy,
            reason=outcome.reason,
            status=after.status,
            detail=detail,
            latency_ms=outcome.latency_ms,
            checked_at=run.checked_at,
        )
        stored.append(result)
        events.append(("check.result", result))
        if after.status != before.status:
            flipped_hosts.add(state["host_id"])
            change = CheckStatusChanged(
                check_id=run.check_id,
                host_id=state["host_id"],
                previous=before.status,
                current=after.status,
                detail=detail,
                at=run.checked_at,
            )
            events.append(("check.status_changed", change))
            changes.append(change)
    if not results:
        return []
    await connection.copy_records_to_table("check_results", records=results, columns=RESULT_COLUMNS)
    updated = list(last_run)
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
            status_changed_at = CASE WHEN s.status <> u.status THEN u.checked_at ELSE s.status_changed_at END
        FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::bool[], $6::text[], $7::text[],
                    $8::float8[], $9::timestamptz[], $10::timestamptz[])
            AS u(check_id, status, failures, successes, healthy, reason, detail, latency_ms, checked_at, last_slot)
        WHERE s.check_id = u.check_id
        """,
        updated,
        [streaks[check_id].status for check_id in updated],
        [streaks[check_id].failures for check_id in updated],
        [streaks[check_id].successes for check_id in updated],
        [last_run[check_id].outcome.healthy for check_id in updated],
        [last_run[check_id].outcome.reason for check_id in updated],
        [details[check_id] for check_id in updated],
        [last_run[check_id].outcome.latency_ms for check_id in updated],
        [last_run[check_id].checked_at for check_id in updated],
        [last_slots[check_id] for check_id in updated],
    )
    await enqueue_many(connection, events, source=source)
    for change in changes:
        log.info(
            "check status changed",
            extra={
                "check_id": str(change.check_id),
                "host_id": str(change.host_id),
                "previous": change.previous,
                "current": change.current,
            },
        )
    for host_id in sorted(flipped_hosts):
        await refresh_host_status(connection, host_id, source=source)
    return stored
