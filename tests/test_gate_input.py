"""Every job.start gets a right answer at once (CONTRACT §5, issue 9): with the real broker, database and
gate process. A malformed job.start whose job_id is a non-empty string and host_id a UUID is decided
once, `job.failed` `invalid_request` carrying the job_id as received, and dead-lettered on its first
delivery; any other unreadable message is only dead-lettered; a repeat decides nothing new. Also
HEALTHGATE_GATE_UNKNOWN_HOST and the gate's one log line per decision."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.events import INVALID_JOB_KEY_PREFIX, decision_event_id, job_key
from tests.support.fake_agent import FakeAgent
from tests.support.logs import log_lines
from tests.support.messages import (
    DECISIONS,
    DeadLetters,
    EventCapture,
    Publisher,
    decision_of,
    rejected_once,
    wait_decision,
)
from tests.support.processes import ServiceProcess, start_gate
from tests.support.services import BackingServices
from tests.support.topology import delete_topology
from tests.test_gate import host_with_checks, run_checks

pytestmark = pytest.mark.usefixtures("poller", "gate")
LATER = "2030-06-01T12:00:00Z"


# ---- observing the gate ---------------------------------------------------------------------------


def metric(gate: ServiceProcess, name: str, **labels: str) -> float:
    text = httpx.get(gate.base_url + "/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    )


async def decisions_in_outbox(db: asyncpg.Connection, host_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT routing_key, body FROM outbox WHERE routing_key = ANY($1) AND convert_from(body, 'UTF8') LIKE $2",
        list(DECISIONS), f"%{host_id}%",
    )  # fmt: skip
    return [json.loads(row["body"])["data"] for row in rows]


@dataclass
class Bad:
    """A malformed job.start; `job_id` set when it must be decided invalid_request with that job_id."""

    body: dict[str, Any] | list[Any] | None = None
    raw: bytes | None = None
    job_id: str | None = None
    problem: str = ""
    host_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        body: Any = self.body
        if isinstance(body, dict):
            body = body | {"marker": self.marker}  # an extra field, ignored by the gate
        return json.dumps(body).encode()


def start_body(job_id: object, host_id: str, **fields: object) -> dict[str, Any]:
    return {"job_id": job_id, "host_id": host_id, "window_ends_at": LATER} | fields


def window(value: object, problem: str) -> Bad:
    job_id = f"bad-window-{uuid.uuid4().hex[:8]}"
    bad = Bad(job_id=job_id, problem=problem)
    bad.body = start_body(job_id, bad.host_id, window_ends_at=value)
    return bad


def job_id_case(job_id: str, problem: str, **fields: object) -> Bad:
    bad = Bad(job_id=job_id, problem=problem)
    bad.body = start_body(job_id, bad.host_id, **fields)
    return bad


async def send_all(jobs: Publisher, cases: list[Bad]) -> None:
    for case in cases:
        await jobs.send("job.start", None, raw=case.payload())


async def assert_decided_once_and_dead_lettered(
    cases: list[Bad], jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess,
    dead: DeadLetters,
) -> None:  # fmt: skip
    """Each case: one job.failed invalid_request with the job_id as received, dead-lettered on its first
    delivery; then the same message again: dead-lettered again, nothing decided."""
    log_start = gate.log_path.stat().st_size
    requeued_before = metric(gate, "healthgate_gate_messages_total", routing_key="job.start", outcome="requeued")
    await send_all(jobs, cases)
    for case in cases:
        assert case.job_id is not None
        decision = await wait_decision(events, case.job_id)
        assert decision.routing_key == "job.failed", case.problem
        assert decision.data["reason"] == "invalid_request" and decision.data["job_id"] == case.job_id, case.problem
        assert decision.data["host_id"] == case.host_id and decision.data["checks"] == []
        assert case.problem in decision.data["detail"], (case.problem, decision.data["detail"])
        assert len(decision.data["detail"]) <= 1000
        assert decision.message_id == str(decision_event_id(case.job_id, uuid.UUID(case.host_id)))
        (letter,) = await dead.wait_for(case.marker, 1)
        assert letter.routing_key == "job.start" and letter.body == case.payload() and rejected_once(letter)
    await send_all(jobs, cases)  # the same messages again: dead-lettered again, decided never again
    for case in cases:
        letters = await dead.wait_for(case.marker, 2)
        assert all(rejected_once(letter) for letter in letters)
    await asyncio.sleep(1)  # any late second decision would be in the outbox by now
    for case in cases:
        assert case.job_id is not None
        assert len(decision_of(events, case.job_id)) == 1, case.problem
        assert [data["reason"] for data in await decisions_in_outbox(db, case.host_id)] == ["invalid_request"]
        rows = await db.fetch(
            "SELECT job_id, status, reason FROM gate_jobs WHERE host_id = $1", uuid.UUID(case.host_id)
        )
        assert [tuple(row) for row in rows] == [(job_key(case.job_id), "failed", "invalid_request")]
    lines = log_lines(gate, log_start)
    for case in cases:
        mine = [line for line in lines if line.get("host_id") == case.host_id]
        assert [line["message"] for line in mine].count("malformed message dead-lettered") == 2, case.problem
        decided = [line for line in mine if line["message"] == "job failed"]
        assert len(decided) == 1 and decided[0]["reason"] == "invalid_request" and decided[0]["status"] == "failed"
    assert not [line for line in lines if line["message"].startswith("could not handle a message")]
    requeued_after = metric(gate, "healthgate_gate_messages_total", routing_key="job.start", outcome="requeued")
    assert requeued_after == requeued_before


# ---- window_ends_at -------------------------------------------------------------------------------


async def test_every_kind_of_bad_window_is_decided_invalid_request_once_at_once(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    missing = Bad(problem="window_ends_at: Field required")
    missing.job_id = f"no-window-{uuid.uuid4().hex[:8]}"
    missing.body = {"job_id": missing.job_id, "host_id": missing.host_id}
    cases = [
        window(1893456000, "not a number"),  # a Unix time: pydantic alone would take it
        window(1893456000.5, "not a number"),
        window(True, "not a boolean"),
        window(None, "not null"),
        window(["2030-01-01T00:00:00Z"], "not an array"),
        window({"at": "2030-01-01T00:00:00Z"}, "not an object"),
        missing,
        window("1893456000", "not an RFC 3339 timestamp"),
        window("tomorrow", "not an RFC 3339 timestamp"),
        window("2030-01-01", "Time is mandatory"),
        window("2030-01-01T12:00:00", "offset is mandatory"),
        window("2030-01-01T12:00Z", "second"),
        window("2030-01-01T12:00:00+0100", "offset"),
        window("20300101T120000Z", "not an RFC 3339 timestamp"),
        window("9999-12-31T23:59:59-14:00", "out of range once converted to UTC"),  # year 10000 in UTC
        window("9999-12-31T23:00:00-01:00", "out of range once converted to UTC"),
        window("0001-01-01T00:00:00+01:00", "out of range once converted to UTC"),  # year 0 in UTC
        window("0000-06-01T00:00:00Z", "year 0 is out of range"),
        window("10000-01-01T00:00:00Z", "not an RFC 3339 timestamp"),
        window("2016-12-31T23:59:60Z", "second must be in 0..59"),  # a leap second: Python has no :60
        window("2030-02-30T00:00:00Z", "day is out of range"),
        window("2030-01-01T00:00:00+24:00", "offset"),
        window("2030-01-01T00:00:00Z\x00", "not an RFC 3339 timestamp"),
        window("2030-01-01T00:00:00\x00Z", "not an RFC 3339 timestamp"),
        window("2030-01-01T00:00:00Z\ud800", "not an RFC 3339 timestamp"),
        window("9" * 1_000_000, "1000000 characters long"),
    ]
    await assert_decided_once_and_dead_lettered(cases, jobs, events, db, gate, dead)


async def test_edge_values_that_are_valid_are_decided_by_the_rules(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, admin: httpx.AsyncClient
) -> None:
    released = {
        "far-future": "9999-12-31T23:59:59Z",
        "last-instant": "9999-12-31T23:59:59.999999Z",  # asyncpg's "infinity": stored 1 µs earlier
        "far-future-offset": "9999-12-31T23:59:59+14:00",
        "lower-case": "2030-01-01t12:00:00.123456789z",
        "space": "2030-01-01 12:00:00-00:00",
    }
    host_id = str(uuid.uuid4())  # unknown: released at once while the window is open
    for job_id, value in released.items():
        await jobs.send("job.start", start_body(job_id, host_id, window_ends_at=value))
    await jobs.send("job.start", start_body("year-one", host_id, window_ends_at="0001-01-01T00:00:00Z"))
    for job_id in released:
        assert (await wait_decision(events, job_id)).routing_key == "job.released", job_id
    closed = await wait_decision(events, "year-one")
    assert closed.routing_key == "job.failed" and closed.data["reason"] == "window_closed"
    stored = dict(
        await db.fetch("SELECT job_id, window_ends_at::text FROM gate_jobs WHERE host_id = $1", uuid.UUID(host_id))
    )
    assert stored["far-future-offset"] == "9999-12-31 09:59:59+00"
    assert stored["last-instant"] == "9999-12-31 23:59:59.999998+00"  # not PostgreSQL's infinity
    assert stored["year-one"] == "0001-01-01 00:00:00.000001+00"  # not -infinity
    for job_id in ("year-one", "last-instant"):
        response = await admin.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["hosts"][0]["window_ends_at"].startswith(
            ("0001", "9999")
        )
    assert gate.process.poll() is None


# ---- job_id ---------------------------------------------------------------------------------------


async def test_every_kind_of_bad_job_id_is_decided_invalid_request_with_the_job_id_as_received(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    tag = uuid.uuid4().hex[:8]
    cases = [
        job_id_case(f"long-{tag}-" + "x" * 200, "at most 200 characters"),
        job_id_case(f"huge-{tag}-" + "y" * 500_000, "at most 200 characters"),
        job_id_case(f"nul-{tag}\x00after", "control character (U+0000 at index 12)"),
        job_id_case(f"\x00nul-first-{tag}", "U+0000 at index 0"),
        job_id_case(f"newline-{tag}\nforged log line", "U+000A"),
        job_id_case(f"tab-{tag}\t", "U+0009"),
        job_id_case(f"escape-{tag}\x1b[31m", "U+001B"),
        job_id_case(f"del-{tag}\x7f", "U+007F"),
        job_id_case(f"c1-{tag}\x85", "U+0085"),
        job_id_case(f"c1-{tag}\x9f", "U+009F"),
        job_id_case(f"surrogate-{tag}\ud800", "lone surrogate (U+D800"),
        job_id_case(f"both-{tag}\x00" + "z" * 300, "control character", window_ends_at=1893456000),
        job_id_case(f"bad-window-too-{tag}\x01", "window_ends_at", window_ends_at="9999-12-31T23:59:59-14:00"),
        job_id_case(f"backslash-{tag}\\x00\x00", "U+0000"),  # a literal "\x00" and a real NUL: distinct
    ]
    await assert_decided_once_and_dead_lettered(cases, jobs, events, db, gate, dead)
    # Keys: PostgreSQL text, at most 200 characters, distinct, and never a valid job_id's.
    keys = {job_key(case.job_id or "") for case in cases}
    assert len(keys) == len(cases) and all(key.startswith(INVALID_JOB_KEY_PREFIX) and len(key) <= 200 for key in keys)
    # correlation_id = job_id where AMQP and the outbox can carry it (no NUL, valid UTF-8, at most 255 bytes).
    for case in cases:
        job_id = case.job_id or ""
        (decision,) = decision_of(events, job_id)
        unfit = "\x00" in job_id or "\ud800" in job_id or len(job_id.encode("utf-8", "surrogatepass")) > 255
        assert decision.correlation_id == (None if unfit else job_id), job_id[:40]
    # A valid job_id spelling an escape is a job of its own.
    escaped = f"backslash-{tag}\\x00\\x00"
    await jobs.send("job.start", start_body(escaped, str(uuid.uuid4())))
    assert (await wait_decision(events, escaped)).routing_key == "job.released"


async def test_a_valid_job_id_longer_than_255_bytes_is_decided_and_published(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection
) -> None:
    """200 characters of 2 to 4 bytes: valid, but too long for AMQP's correlation_id (255 bytes)."""
    host_id = str(uuid.uuid4())
    job_ids = ["é" * 200, "\U0001f600" * 200, "z" * 200]
    for job_id in job_ids:
        await jobs.send("job.start", start_body(job_id, host_id))
    for job_id in job_ids:
        decision = await wait_decision(events, job_id)
        assert decision.routing_key == "job.released" and decision.data["job_id"] == job_id
        assert decision.correlation_id == (job_id if len(job_id.encode()) <= 255 else None)
    async with asyncio.timeout(10):  # every row is marked sent: none is stuck being retried
        while await db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"):
            await asyncio.sleep(0.1)


# ---- messages that are only dead-lettered ---------------------------------------------------------


def raw_case(make: Callable[[bytes], bytes]) -> Bad:
    """A case whose body `make` builds around its marker."""
    bad = Bad()
    bad.raw = make(bad.marker.encode())
    return bad


async def test_unusable_identity_or_unreadable_body_is_only_dead_lettered(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    host_id = str(uuid.uuid4())
    bad_hosts: list[object] = [
        "not-a-uuid",
        "",
        42,
        None,
        True,
        [host_id],
        {"id": host_id},
        host_id + "0",
        host_id[:-1] + "g",
    ]
    cases = [Bad(body=start_body(f"no-uuid-{index}", host)) for index, host in enumerate(bad_hosts)]
    cases += [Bad(body={"job_id": "no-host", "window_ends_at": LATER})]
    cases += [Bad(body=start_body(job_id, host_id)) for job_id in (42, 4.2, "", None, True, ["j"], {"id": "j"})]
    cases += [Bad(body={"host_id": host_id, "window_ends_at": LATER})]
    cases += [
        raw_case(lambda marker: b"\xff\xfe not UTF-8 " + marker),
        raw_case(lambda marker: b'{"job_id": "x", "host_id": "' + host_id.encode() + b'", "m": "' + marker),
        raw_case(lambda marker: b"[" * 100_000 + b'"' + marker + b'"' + b"]" * 100_000),  # too deep to parse
        raw_case(lambda marker: b'{"a": ' + b"9" * 5000 + b', "m": "' + marker + b'"}'),  # a too long integer
        raw_case(lambda marker: b'["job.start", "' + marker + b'"]'),
        raw_case(lambda marker: b'"' + marker + b'"'),
        raw_case(lambda marker: b"NaN " + marker),
        raw_case(lambda marker: b""),  # empty: the marker is nowhere, counted in the log below
    ]
    for data in ([start_body("ce-array", host_id)], "job", None, 7):
        cloudevent = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/p", "type": "t", "data": data}
        cases.append(
            raw_case(lambda marker, cloudevent=cloudevent: json.dumps(cloudevent | {"m": marker.decode()}).encode())
        )
    log_start = gate.log_path.stat().st_size
    requeued_before = metric(gate, "healthgate_gate_messages_total", routing_key="job.start", outcome="requeued")
    await send_all(jobs, cases)
    await jobs.start("after-the-bad-ones", host_id)  # not held up behind them
    assert (await wait_decision(events, "after-the-bad-ones")).routing_key == "job.released"
    for case in cases:
        if case.marker.encode() in case.payload():
            (letter,) = await dead.wait_for(case.marker, 1)
            assert letter.body == case.payload() and rejected_once(letter), case.payload()[:200]
    await asyncio.sleep(1)
    assert [data["job_id"] for data in await decisions_in_outbox(db, host_id)] == ["after-the-bad-ones"]
    assert not [event for event in events.matching("job.failed") if event.data["reason"] == "invalid_request"]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 1
    lines = log_lines(gate, log_start)
    assert [line["message"] for line in lines].count("malformed message dead-lettered") == len(cases)
    assert not [line for line in lines if line["message"].startswith("could not handle a message")]
    assert (
        metric(gate, "healthgate_gate_messages_total", routing_key="job.start", outcome="requeued") == requeued_before
    )
    assert gate.process.poll() is None


async def test_malformed_cancel_with_a_control_character_is_dead_lettered_not_looped(
    jobs: Publisher, events: EventCapture, gate: ServiceProcess, dead: DeadLetters, admin: httpx.AsyncClient,
    fake_agent: FakeAgent,
) -> None:  # fmt: skip
    fake_agent.set("input.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "input.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    await jobs.start("cancel-me", host_id)
    await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "cancel-me")
    requeued_before = metric(gate, "healthgate_gate_messages_total", routing_key="job.cancel", outcome="requeued")
    marker = uuid.uuid4().hex
    for job_id in ("cancel-me\x00", "x" * 201, 7):
        await jobs.send("job.cancel", {"job_id": job_id, "host_id": host_id, "marker": marker})
    letters = await dead.wait_for(marker, 3)
    assert all(rejected_once(letter) and letter.routing_key == "job.cancel" for letter in letters)
    assert (
        metric(gate, "healthgate_gate_messages_total", routing_key="job.cancel", outcome="requeued") == requeued_before
    )
    assert decision_of(events, "cancel-me") == []
    await jobs.send("job.cancel", {"job_id": "cancel-me", "host_id": host_id, "extra": [1, {"x": None}]})
    assert (await wait_decision(events, "cancel-me")).routing_key == "job.cancelled"


# ---- one decision per job host, whichever comes first ---------------------------------------------


async def test_invalid_then_valid_and_valid_then_invalid_decide_once(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, dead: DeadLetters
) -> None:
    host_id = str(uuid.uuid4())
    await jobs.send("job.start", start_body("invalid-first", host_id, window_ends_at=1893456000))
    assert (await wait_decision(events, "invalid-first")).data["reason"] == "invalid_request"
    await jobs.send("job.start", start_body("invalid-first", host_id))  # valid now: a repeat all the same
    await jobs.send("job.start", start_body("valid-first", host_id, extra_field={"ignored": True}, max_failed_hosts=2))
    assert (await wait_decision(events, "valid-first")).routing_key == "job.released"
    await jobs.send("job.start", start_body("valid-first", host_id, window_ends_at="2030-01-01"))
    await dead.wait_for(host_id, 2)
    await asyncio.sleep(1)
    assert len(decision_of(events, "invalid-first")) == len(decision_of(events, "valid-first")) == 1
    assert sorted(data["job_id"] for data in await decisions_in_outbox(db, host_id)) == ["invalid-first", "valid-first"]


# ---- HEALTHGATE_GATE_UNKNOWN_HOST -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def own_exchange(amqp_url: str, name: str) -> AsyncIterator[tuple[Publisher, EventCapture]]:
    """A publisher and an event capture on an exchange of the test's own (declared by its gate)."""
    capture = EventCapture()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(name)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(capture.on_message, no_ack=True)
        yield Publisher(exchange), capture


@contextlib.asynccontextmanager
async def gate_of_its_own(
    service_env: dict[str, str], amqp_url: str, log_path: Path, **overrides: str
) -> AsyncIterator[ServiceProcess]:
    """A gate with other settings, on its own database and exchange (`overrides`), removed after."""
    own = start_gate(service_env, log_path, **overrides)
    try:
        yield own
    finally:
        own.stop()
        await delete_topology(amqp_url, overrides["HEALTHGATE_EXCHANGE"])


async def test_unknown_host_fails_when_configured_and_is_released_by_default(
    jobs: Publisher, events: EventCapture, backing: BackingServices, service_env: dict[str, str],
    private_database: str, tmp_path: Path,
) -> None:  # fmt: skip
    await jobs.start("default-unknown", str(uuid.uuid4()))  # the session's gate: release (the default)
    default = await wait_decision(events, "default-unknown")
    assert default.routing_key == "job.released" and default.data["checks"] == []

    exchange = f"hgtest-{uuid.uuid4().hex[:10]}-unknown"
    env = {"HEALTHGATE_DATABASE_URL": private_database, "HEALTHGATE_EXCHANGE": exchange}
    async with gate_of_its_own(
        service_env, backing.amqp_url, tmp_path / "gate.log", HEALTHGATE_GATE_UNKNOWN_HOST="fail", **env
    ) as gate:
        known = uuid.uuid4()
        connection = await asyncpg.connect(private_database)
        try:
            await connection.execute("INSERT INTO hosts (id, name, \"group\") VALUES ($1, 'known', 'g')", known)
        finally:
            await connection.close()
        async with own_exchange(backing.amqp_url, exchange) as (publisher, capture):
            unknown = str(uuid.uuid4())
            await publisher.start("unknown", unknown, cloudevent=True)
            await publisher.start("unknown-late", unknown, window_seconds=-5)  # the window rule comes first
            await publisher.start("known-no-checks", str(known))
            await publisher.start("unknown", unknown)  # a repeat
            failed = await wait_decision(capture, "unknown")
            assert failed.routing_key == "job.failed" and failed.data["reason"] == "unknown_host"
            assert unknown in failed.data["detail"] and "HEALTHGATE_GATE_UNKNOWN_HOST" in failed.data["detail"]
            assert failed.data["checks"] == [] and failed.correlation_id == "unknown"
            late = await wait_decision(capture, "unknown-late")
            assert late.routing_key == "job.failed" and late.data["reason"] == "window_closed"
            assert (await wait_decision(capture, "known-no-checks")).routing_key == "job.released"
            await asyncio.sleep(1)
            assert len(decision_of(capture, "unknown")) == 1
        lines = log_lines(gate, 0)
        (logged,) = [line for line in lines if line.get("job_id") == "unknown" and line["message"] == "job failed"]
        assert logged["host_id"] == unknown and logged["reason"] == "unknown_host" and logged["status"] == "failed"
        assert metric(gate, "healthgate_gate_decisions_total", outcome="unknown_host") == 1


# ---- one log line per decision --------------------------------------------------------------------


async def test_the_gate_logs_one_line_per_decision(
    jobs: Publisher, events: EventCapture, gate: ServiceProcess, admin: httpx.AsyncClient, fake_agent: FakeAgent
) -> None:
    log_start = gate.log_path.stat().st_size
    fake_agent.set("logged.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "logged.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    unknown = str(uuid.uuid4())
    await jobs.start("logged-released", unknown)
    await jobs.start("logged-closed", unknown, window_seconds=-1)
    await jobs.start("logged-waiting", host_id)
    await jobs.send("job.start", start_body("logged-invalid\nnot a log line", unknown, window_ends_at="soon"))
    for job_id in ("logged-released", "logged-closed", "logged-invalid\nnot a log line"):
        await wait_decision(events, job_id)
    await events.wait_for("job.waiting", lambda event: event.data["job_id"] == "logged-waiting")
    await asyncio.sleep(2.5)  # a retry at least: the wait is logged once, not on every retry
    await jobs.send("job.cancel", {"job_id": "logged-waiting", "host_id": host_id})
    await wait_decision(events, "logged-waiting")
    await asyncio.sleep(0.5)
    lines = [line for line in log_lines(gate, log_start) if line["message"].startswith("job ")]
    seen = [(line["message"], line["job_id"], line["host_id"], line["status"], line["reason"]) for line in lines]
    assert sorted(seen) == sorted([
        ("job released", "logged-released", unknown, "released", None),
        ("job failed", "logged-closed", unknown, "failed", "window_closed"),
        ("job waiting", "logged-waiting", host_id, "waiting_health_check", None),
        ("job cancelled", "logged-waiting", host_id, "cancelled", None),
        ("job failed", "logged-invalid\\nnot a log line", unknown, "failed", "invalid_request"),
    ])  # fmt: skip
    assert all(line["level"] == "info" and line.get("detail") for line in lines)
    assert "checks: check-0" in next(line["detail"] for line in lines if line["message"] == "job waiting")


# ---- the pieces, as pure functions ----------------------------------------------------------------


def test_event_ids_keys_and_correlation_ids_for_any_received_job_id() -> None:
    from services.gate.evaluation import loggable_job_id
    from shared.details import safe_detail
    from shared.events import EVENT_ID_NAMESPACE, deterministic_event_id
    from shared.jobs import storable_time
    from shared.outbox import amqp_correlation_id

    for name in ("patch-1", "é" * 200, "\U0001f600", "a/b"):  # the ids uuid.uuid5 gave before stay the same
        assert deterministic_event_id("job-decision", name) == uuid.uuid5(EVENT_ID_NAMESPACE, f"job-decision/{name}")
    assert deterministic_event_id("x\ud800") != deterministic_event_id("x\ud801")  # and a lone surrogate has one
    assert job_key("patch-1") == "patch-1" and job_key("x" * 200) == "x" * 200
    assert job_key("a\x00") == job_key("a\x00") != job_key("a\x01")
    assert loggable_job_id("a\nb\x00\ud800") == "a\\nb\\x00\\ud800" and len(loggable_job_id("\x00" * 500)) == 200
    assert [amqp_correlation_id(value) for value in ("x" * 255, "x" * 256, "é" * 128, "a\x00", "\ud800", None)] == [
        "x" * 255, None, None, None, None, None,
    ]  # fmt: skip
    assert safe_detail("a\x00b\ud800") == "a\\0b\\ud800"
    assert storable_time(dt.datetime.min.replace(tzinfo=dt.UTC)).microsecond == 1
    moment = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert storable_time(moment) is moment
