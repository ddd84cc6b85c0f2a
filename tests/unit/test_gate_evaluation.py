"""services/gate/evaluation.py: the rules applied to a waiting job host and what follows from each verdict, in this
process against a database of the test's own (`private_database`: no gate of the session evaluates these rows):
a release or failure with its event, waiting with job.waiting announced once and the failing checks' re-run
requested, a window_closed failure described as the checks stood when the window closed, cancels and invalid
requests. Also `loggable_job_id` (pure)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.gate.evaluation import (
    CANCELLED,
    CANCELLED_BEFORE_START,
    LOGGED_JOB_ID_LIMIT,
    Evaluation,
    cancel,
    evaluate_job_host,
    loggable_job_id,
    record_invalid_request,
)
from shared import jobs
from shared.check_state import StateAfter, Streak, create_state, store_states
from shared.checks import insert_check
from shared.events import JobStart, control_character
from shared.gate_rules import UnknownHostPolicy, Verdict
from shared.hosts import insert_host
from shared.results import copy_results, ensure_result_partitions
from shared.schedule import schedule_first_run

RETRY_SECONDS = 30.0

# ---- loggable_job_id ---------------------------------------------------------------------------------------


def test_a_valid_job_id_is_logged_as_it_is() -> None:
    for job_id in ("patch-42", "émoji ✓", "j" * 200, 'quote"and\\backslash'):
        assert loggable_job_id(job_id) == job_id


def test_an_invalid_job_id_is_escaped_and_cut() -> None:
    assert loggable_job_id("a\x00b\nc") == "a\\x00b\\nc"
    assert loggable_job_id("x\u0085\ud800") == "x\\x85\\ud800"
    assert loggable_job_id("ünïcode\x00") == "\\xfcn\\xefcode\\x00"
    long = loggable_job_id("j" * 5000)
    assert len(long) == LOGGED_JOB_ID_LIMIT and long.endswith("…")


@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=400))
@example('\x1b[31mforged\r\n{"level": "error"}')
def test_a_logged_job_id_can_neither_break_a_line_nor_flood_the_log(job_id: str) -> None:
    logged = loggable_job_id(job_id)
    assert control_character(logged) is None
    assert len(logged) <= LOGGED_JOB_ID_LIMIT
    logged.encode("utf-8")  # storable and printable as UTF-8: no lone surrogate left


# ---- evaluating a waiting job host --------------------------------------------------------------------------


@pytest.fixture
async def connection(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(private_database)
    await ensure_result_partitions(connection, dt.datetime.now(dt.UTC).date())
    yield connection
    await connection.close()


async def now(connection: asyncpg.Connection) -> dt.datetime:
    value: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    return value


async def new_host(connection: asyncpg.Connection) -> uuid.UUID:
    host_id = uuid.uuid4()
    await insert_host(connection, host_id, name=f"host-{host_id.hex[:8]}", group="unit", agent_url=None)
    return host_id


async def new_check(
    connection: asyncpg.Connection,
    host_id: uuid.UUID,
    name: str,
    *,
    healthy: bool | None,
    age: float = 1.0,
    critical: bool = True,
    enabled: bool = True,
) -> uuid.UUID:
    """A tcp check with a state: its last result `healthy` `age` seconds ago (None: no result yet), scheduled an
    hour from now."""
    check_id = uuid.uuid4()
    values = {
        "name": name, "check_type": "tcp", "enabled": enabled, "critical": critical, "interval_seconds": 60,
        "timeout_seconds": 1.0, "port": 22, "address": "127.0.0.1",
    }  # fmt: skip
    await insert_check(connection, check_id, host_id, values)
    await create_state(connection, check_id, host_id)
    await schedule_first_run(connection, check_id, enabled=enabled)
    await connection.execute(
        "UPDATE check_schedule SET next_run_at = clock_timestamp() + interval '1 hour' WHERE check_id = $1", check_id
    )
    if healthy is not None:
        await result(
            connection, check_id, host_id, healthy=healthy, at=await now(connection) - dt.timedelta(seconds=age)
        )
    return check_id


async def result(
    connection: asyncpg.Connection, check_id: uuid.UUID, host_id: uuid.UUID, *, healthy: bool, at: dt.datetime
) -> None:
    """A stored result and the check's state after it (thresholds of 1: the status follows the result)."""
    status = "healthy" if healthy else "unhealthy"
    detail = "connected" if healthy else "connection refused"
    await copy_results(
        connection,
        [(uuid.uuid4(), check_id, host_id, at, healthy, "ok" if healthy else "connect", status, detail, 1.0, None)],
    )
    streak = Streak(status, 0 if healthy else 1, 1 if healthy else 0)
    state = StateAfter(check_id, streak, healthy, "ok" if healthy else "connect", detail, 1.0, at, None)
    await store_states(connection, [state])


async def start(
    connection: asyncpg.Connection,
    host_id: uuid.UUID,
    window: dt.timedelta,
    job_id: str = "j-1",
    *,
    received_before_close: bool = False,
) -> None:
    """Record a job.start whose window ends `window` from now; with `received_before_close`, as if it had arrived a
    minute before its window ended (the gate was down when it ended) rather than now."""
    ends = await now(connection) + window
    job = JobStart.model_validate({"job_id": job_id, "host_id": str(host_id), "window_ends_at": ends.isoformat()})
    assert await jobs.record_start(connection, job)
    if received_before_close:
        await connection.execute(
            "UPDATE gate_jobs SET received_at = $1 WHERE job_id = $2", ends - dt.timedelta(minutes=1), job_id
        )


async def evaluate(
    connection: asyncpg.Connection,
    host_id: uuid.UUID,
    job_id: str = "j-1",
    *,
    rerun: bool = True,
    unknown_host: UnknownHostPolicy = "release",
) -> Evaluation | None:
    async with connection.transaction():
        return await evaluate_job_host(
            connection, job_id, host_id, retry_seconds=RETRY_SECONDS, rerun_failing=rerun, unknown_host=unknown_host
        )


async def outbox(connection: asyncpg.Connection) -> list[tuple[str, dict[str, object]]]:
    rows = await connection.fetch("SELECT routing_key, body FROM outbox ORDER BY id")
    return [(row["routing_key"], json.loads(row["body"])["data"]) for row in rows]


async def row_of(connection: asyncpg.Connection, host_id: uuid.UUID, job_id: str = "j-1") -> asyncpg.Record:
    row: asyncpg.Record = await connection.fetchrow(
        "SELECT * FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_id, host_id
    )
    return row


async def test_a_host_whose_gating_checks_are_ready_is_released_with_them(connection: asyncpg.Connection) -> None:
    host_id = await new_host(connection)
    web = await new_check(connection, host_id, "web", healthy=True)
    await new_check(connection, host_id, "optional", healthy=False, critical=False)  # not gating
    await new_check(connection, host_id, "off", healthy=False, enabled=False)  # not gating
    await start(connection, host_id, dt.timedelta(hours=1))
    evaluation = await evaluate(connection, host_id)
    assert evaluation == Evaluation("j-1", host_id, Verdict.RELEASE, detail="all gating checks healthy")
    row = await row_of(connection, host_id)
    assert (row["status"], row["detail"], row["next_retry_at"]) == ("released", "all gating checks healthy", None)
    [(routing_key, data)] = await outbox(connection)
    assert routing_key == "job.released"
    assert [check["check_id"] for check in data["checks"]] == [str(web)]  # type: ignore[union-attr]
    assert await evaluate(connection, host_id) is None  # decided: nothing more to evaluate


async def test_a_host_without_gating_checks_is_released_saying_so(connection: asyncpg.Connection) -> None:
    host_id = await new_host(connection)
    await start(connection, host_id, dt.timedelta(hours=1))
    evaluation = await evaluate(connection, host_id)
    assert evaluation is not None and evaluation.detail == "no gating checks on this host"


async def test_an_unknown_host_is_released_or_failed_as_configured(connection: asyncpg.Connection) -> None:
    unknown = uuid.uuid4()
    await start(connection, unknown, dt.timedelta(hours=1), job_id="released")
    await start(connection, unknown, dt.timedelta(hours=1), job_id="failed")
    released = await evaluate(connection, unknown, "released")
    failed = await evaluate(connection, unknown, "failed", unknown_host="fail")
    assert released is not None and released.verdict is Verdict.RELEASE
    assert failed is not None and (failed.verdict, failed.reason) == (Verdict.UNKNOWN_HOST, "unknown_host")
    assert failed.detail == (
        f"host {unknown} is not known to healthgate, and unknown hosts are failed (HEALTHGATE_GATE_UNKNOWN_HOST=fail)"
    )
    assert [key for key, _ in await outbox(connection)] == ["job.released", "job.failed"]


async def test_a_waiting_host_announces_once_and_asks_for_its_failing_checks_again(
    connection: asyncpg.Connection,
) -> None:
    host_id = await new_host(connection)
    await new_check(connection, host_id, "web", healthy=True)
    db = await new_check(connection, host_id, "db", healthy=False)
    never = await new_check(connection, host_id, "cache", healthy=None)
    await start(connection, host_id, dt.timedelta(hours=1))

    first = await evaluate(connection, host_id)
    assert first is not None
    assert (first.verdict, first.announced, first.detail) == (Verdict.WAIT, True, "waiting for checks: cache, db")
    assert sorted(first.rerun) == sorted([db, never])
    pulled = await connection.fetch(
        "SELECT check_id FROM check_schedule WHERE next_run_at <= clock_timestamp() ORDER BY check_id"
    )
    assert sorted(row["check_id"] for row in pulled) == sorted([db, never])
    row = await row_of(connection, host_id)
    assert row["status"] == "waiting_health_check" and row["waiting_announced"]
    retry_in = (row["next_retry_at"] - await now(connection)).total_seconds()
    assert RETRY_SECONDS - 5 < retry_in <= RETRY_SECONDS

    # A later evaluation (a result woke it) keeps it waiting without a second job.waiting or timer change.
    second = await evaluate(connection, host_id, rerun=False)
    assert second is not None and (second.verdict, second.announced, second.rerun) == (Verdict.WAIT, False, [])
    assert (await row_of(connection, host_id))["next_retry_at"] == row["next_retry_at"]
    [(routing_key, data)] = await outbox(connection)
    assert routing_key == "job.waiting"
    assert sorted(check["name"] for check in data["failing_checks"]) == ["cache", "db"]  # type: ignore[union-attr]


async def test_a_waiting_host_is_released_once_its_checks_recover(connection: asyncpg.Connection) -> None:
    host_id = await new_host(connection)
    db = await new_check(connection, host_id, "db", healthy=False)
    await start(connection, host_id, dt.timedelta(hours=1))
    assert (await evaluate(connection, host_id)).verdict is Verdict.WAIT  # type: ignore[union-attr]
    await result(connection, db, host_id, healthy=True, at=await now(connection))
    assert (await evaluate(connection, host_id, rerun=False)).verdict is Verdict.RELEASE  # type: ignore[union-attr]
    assert [key for key, _ in await outbox(connection)] == ["job.waiting", "job.released"]


async def test_a_window_closed_failure_describes_the_checks_as_they_stood_when_it_closed(
    connection: asyncpg.Connection,
) -> None:
    """Decided late (the gate was down): `db` was healthy when the window closed and fails only since, so it is
    not blamed; `web` was failing then and has recovered since, so it is."""
    host_id = await new_host(connection)
    clock = await now(connection)
    closed_at = clock - dt.timedelta(minutes=10)
    web = await new_check(connection, host_id, "web", healthy=None)
    db = await new_check(connection, host_id, "db", healthy=None)
    await result(connection, web, host_id, healthy=False, at=closed_at - dt.timedelta(seconds=30))
    await result(connection, db, host_id, healthy=True, at=closed_at - dt.timedelta(seconds=30))
    await result(connection, web, host_id, healthy=True, at=clock - dt.timedelta(seconds=5))
    await result(connection, db, host_id, healthy=False, at=clock - dt.timedelta(seconds=5))
    await start(connection, host_id, closed_at - clock, received_before_close=True)

    evaluation = await evaluate(connection, host_id)
    assert evaluation is not None and (evaluation.verdict, evaluation.reason) == (
        Verdict.WINDOW_CLOSED,
        "window_closed",
    )
    assert evaluation.detail == "the maintenance window closed while checks were not healthy: web: connection refused"
    [(routing_key, data)] = await outbox(connection)
    assert routing_key == "job.failed" and data["reason"] == "window_closed"
    assert {check["name"]: check["healthy"] for check in data["checks"]} == {"web": False, "db": True}  # type: ignore[union-attr]


async def test_a_window_that_closed_before_any_result_names_the_checks_without_one(
    connection: asyncpg.Connection,
) -> None:
    host_id = await new_host(connection)
    await new_check(connection, host_id, "web", healthy=True)  # its only result is after the window closed
    await start(connection, host_id, -dt.timedelta(minutes=5), received_before_close=True)
    evaluation = await evaluate(connection, host_id)
    assert evaluation is not None and evaluation.detail == (
        "the maintenance window closed while checks were not healthy: web: no result before the window closed"
    )
    # The same checks for a job.start that arrived after its window: that comes first, then the checks.
    await start(connection, host_id, -dt.timedelta(minutes=5), job_id="j-late")
    late = await evaluate(connection, host_id, "j-late")
    assert late is not None and late.detail.startswith("the job.start arrived (at "), late.detail
    assert late.detail.endswith(
        ") after its maintenance window had ended (at "
        + late.detail.split("had ended (at ")[1].split(")")[0]
        + "); checks not healthy when it closed: web: no result before the window closed"
    ), late.detail


async def test_a_cancel_decides_a_waiting_host_or_one_not_seen_yet(connection: asyncpg.Connection) -> None:
    host_id = await new_host(connection)
    await new_check(connection, host_id, "db", healthy=False)
    await start(connection, host_id, dt.timedelta(hours=1))
    async with connection.transaction():
        assert await cancel(connection, "j-1", host_id)
    async with connection.transaction():
        assert not await cancel(connection, "j-1", host_id)  # decided already
    assert (await row_of(connection, host_id))["detail"] == CANCELLED

    async with connection.transaction():
        assert await cancel(connection, "j-early", host_id)
    early = await row_of(connection, host_id, "j-early")
    assert (early["status"], early["detail"], early["window_ends_at"]) == ("cancelled", CANCELLED_BEFORE_START, None)
    assert [key for key, _ in await outbox(connection)] == ["job.cancelled", "job.cancelled"]


async def test_an_invalid_request_is_decided_once(connection: asyncpg.Connection) -> None:
    host_id = uuid.uuid4()
    async with connection.transaction():
        first = await record_invalid_request(connection, "j-bad", host_id, "window_ends_at: is not a timestamp")
    async with connection.transaction():
        again = await record_invalid_request(connection, "j-bad", host_id, "window_ends_at: is not a timestamp")
    assert first == Evaluation(
        "j-bad", host_id, Verdict.INVALID_REQUEST, reason="invalid_request",
        detail="invalid job.start: window_ends_at: is not a timestamp",
    )  # fmt: skip
    assert again is None
    [(routing_key, data)] = await outbox(connection)
    assert (routing_key, data["reason"], data["checks"]) == ("job.failed", "invalid_request", [])
