"""Reading the checks a tick names, and writing a batch of their results in one transaction.

A batch writes every result (COPY), updates each check's state with its persisted streak counters,
adds them to the checks' hourly counts behind `uptime_24h`, publishes `check.result`, `check.status_changed` and
`host.status_changed` through the outbox and recomputes the summary of hosts whose checks flipped — all in one
commit, before the tick is acked.
Locks are taken hosts first, then check states, each in id order: the API takes them in the same
order, so the two never deadlock. Each table is written through its owner (shared/results.py, shared/uptime.py,
shared/check_state.py, shared/outbox.py, shared/hosts.py); the statements and their order are these.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import asyncpg

from services.poller.probes import CheckTarget, ProbeOutcome
from shared.check_state import StateAfter, Streak, advance, lock_for_results, store_states
from shared.checks import checks_to_run
from shared.crypto import SecretBox
from shared.database import Connection
from shared.details import safe_detail
from shared.events import CheckResult, CheckStatusChanged, EventModel
from shared.hosts import lock_hosts, refresh_host_status
from shared.jobs import maintenance_of_hosts
from shared.outbox import enqueue_many
from shared.results import copy_results
from shared.uptime import Counted, count_results

log = logging.getLogger(__name__)


# A check's configuration as a run saw it: when the check was last changed, its host's name and agent_url.
Configuration: TypeAlias = tuple[dt.datetime, str, str | None]


@dataclass(frozen=True)
class CheckRow:
    """A check as stored, its password still encrypted."""

    record: asyncpg.Record

    @property
    def check_id(self) -> uuid.UUID:
        check_id: uuid.UUID = self.record["id"]
        return check_id

    @property
    def enabled(self) -> bool:
        enabled: bool = self.record["enabled"]
        return enabled

    @property
    def configuration(self) -> Configuration:
        """What the run of this row probes, as loaded: when the check was last changed, and what of its host a
        check may probe (its name and agent_url)."""
        return self.record["check_updated_at"], self.record["host_name"], self.record["agent_url"]

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
            condition=row["condition"],
            min_cert_days=row["min_cert_days"],
            dns_name=row["dns_name"],
            record_type=row["record_type"] or "A",
            expected_values=tuple(row["expected_values"] or ()),
            dns_server=row["dns_server"],
            grpc_service=row["grpc_service"] or "",
            tls=bool(row["tls"]),
        )


async def load_checks(connection: Connection, check_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, CheckRow]:
    """The checks a tick names, by id; a check deleted since is missing."""
    return {row["id"]: CheckRow(row) for row in await checks_to_run(connection, check_ids)}


@dataclass(frozen=True)
class FinishedRun:
    """A probe's outcome, not yet stored. `secrets` are redacted from its detail when it is (the
    check's password and encoded credentials, should the target have echoed them). `configuration`: the check's
    as the run loaded it (`CheckRow.configuration`); a run whose check or host has changed since is not stored.
    None: not compared."""

    check_id: uuid.UUID
    host_id: uuid.UUID
    slot: dt.datetime | None
    outcome: ProbeOutcome
    checked_at: dt.datetime
    secrets: tuple[str, ...] = ()
    configuration: Configuration | None = None


def new_result_ids(count: int) -> Iterator[uuid.UUID]:
    """`count` random (version 4) UUIDs from one read of the system's randomness: `uuid.uuid4()` makes each the
    same way (`UUID(bytes=os.urandom(16), version=4)`), with a read of its own."""
    raw = os.urandom(16 * count)
    return (uuid.UUID(bytes=raw[start : start + 16], version=4) for start in range(0, len(raw), 16))


async def store_results(connection: Connection, runs: Sequence[FinishedRun], *, source: str) -> list[CheckResult]:
    """Write a batch of results in the caller's transaction. Returns the results stored: a run whose
    check is gone, or whose slot was already stored (a redelivered tick), is dropped.

    This is where a probe's outcome becomes a result: its detail goes through `safe_detail` here, once,
    for the stored row, the check's state, the events and the `/test` reply alike (CONTRACT §4: at most
    1,000 characters, no credential)."""
    if not runs:
        return []
    await lock_hosts(connection, sorted({run.host_id for run in runs}))
    state_rows = await lock_for_results(connection, sorted({run.check_id for run in runs}))
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
    # CONTRACT §6: status events say whether a job is patching the host, as read in this transaction (which
    # holds the hosts' locks); asked only for hosts whose check flips, once per batch.
    maintenance: dict[uuid.UUID, bool] = {}
    result_ids = new_result_ids(len(runs))
    for run in sorted(runs, key=lambda run: run.checked_at):
        state = states.get(run.check_id)
        if state is None:
            continue  # the check was deleted while it ran
        last_slot = last_slots[run.check_id]
        if run.slot is not None and last_slot is not None and run.slot <= last_slot:
            continue  # this slot's result is already stored: the tick was delivered twice
        if run.configuration is not None and run.configuration != (
            state["check_updated_at"],
            state["host_name"],
            state["agent_url"],
        ):
            # The check or its host changed while it ran (another target, other rules): the result judged a
            # configuration that is gone, and the changed check runs again within 5 s (schedule_first_run).
            continue
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
            (next(result_ids), run.check_id, state["host_id"], run.checked_at, outcome.healthy, outcome.reason,
             after.status, detail, outcome.latency_ms, outcome.cert_expires_at)
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
            cert_expires_at=outcome.cert_expires_at,
        )
        stored.append(result)
        events.append(("check.result", result))
        if after.status != before.status:
            flipped_hosts.add(state["host_id"])
            if state["host_id"] not in maintenance:
                in_patch = await maintenance_of_hosts(connection, [state["host_id"]])
                maintenance[state["host_id"]] = state["host_id"] in in_patch
            change = CheckStatusChanged(
                check_id=run.check_id,
                host_id=state["host_id"],
                previous=before.status,
                current=after.status,
                detail=detail,
                at=run.checked_at,
                in_maintenance=maintenance[state["host_id"]],
            )
            events.append(("check.status_changed", change))
            changes.append(change)
    if not results:
        return []
    await copy_results(connection, results)
    await count_results(connection, [Counted(result.check_id, result.checked_at, result.healthy) for result in stored])
    states_after = [
        StateAfter(
            check_id=check_id,
            streak=streaks[check_id],
            healthy=run.outcome.healthy,
            reason=run.outcome.reason,
            detail=details[check_id],
            latency_ms=run.outcome.latency_ms,
            checked_at=run.checked_at,
            last_slot=last_slots[check_id],
            cert_expires_at=run.outcome.cert_expires_at,
        )
        for check_id, run in last_run.items()
    ]
    await store_states(connection, states_after)
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
