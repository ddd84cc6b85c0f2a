"""services/gate/consumer.py: `salvage_identity` (pure), and the gate's message handlers run in this process with
a fake message (tests/support/messages.py `FakeMessage`) against the session's database: a message is acked only
once its decision has committed, an unreadable one is dead-lettered (rejected without requeue) on its first
delivery after its decision row is written when it names a job, and a failure that is not the message's fault
returns it (nack with requeue), while an outage of the database is raised for shared/consuming.py to hand the
message back. No broker: the handler never publishes (decisions go through the outbox).

The session's own gate may be running too (its timers read the same table); the cases here come out the same
whichever of the two evaluates a job host, as every decision goes through `shared.jobs.decide`."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import shared.jobs
from services.gate.consumer import Gate, GateMetrics, salvage_identity
from shared.database import DatabaseWatch, create_pool
from shared.events import decision_event_id, job_key
from shared.messaging import Broker
from shared.topology import Topology
from tests.support.messages import FakeMessage, in_seconds

HOST = "12345678-1234-5678-1234-567812345678"

# ---- salvage_identity -------------------------------------------------------------------------------------


def test_a_usable_job_id_and_host_id_are_salvaged_whatever_the_job_id_holds() -> None:
    host = uuid.UUID(HOST)
    for job_id in ("patch-42", "x" * 5000, "nul\x00", "lone\ud800", " "):
        assert salvage_identity({"job_id": job_id, "host_id": HOST, "window_ends_at": "soon"}) == (job_id, host)
    assert salvage_identity({"job_id": "j", "host_id": HOST.upper()}) == ("j", host)
    assert salvage_identity({"job_id": "j", "host_id": "{" + HOST + "}"}) == ("j", host)


@pytest.mark.parametrize(
    "data",
    [
        None, [], "job", 42, {},
        {"job_id": "j"},
        {"host_id": HOST},
        {"job_id": "", "host_id": HOST},
        {"job_id": 42, "host_id": HOST},
        {"job_id": ["j"], "host_id": HOST},
        {"job_id": None, "host_id": HOST},
        {"job_id": "j", "host_id": "not-a-uuid"},
        {"job_id": "j", "host_id": 42},
        {"job_id": "j", "host_id": None},
    ],
)  # fmt: skip
def test_nothing_is_salvaged_without_both(data: object) -> None:
    assert salvage_identity(data) is None


@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(),
        st.lists(st.text()),
        st.dictionaries(st.text(), st.text() | st.uuids().map(str)),
    )
)
def test_salvage_never_fails_and_gives_a_non_empty_job_id(data: object) -> None:
    identity = salvage_identity(data)
    if identity is not None:
        job_id, host_id = identity
        assert isinstance(job_id, str) and job_id and isinstance(host_id, uuid.UUID)


# ---- the handler, in process --------------------------------------------------------------------------------


@pytest.fixture
async def gate(database_url: str, db: asyncpg.Connection) -> AsyncIterator[Gate]:
    """A Gate on the session's (emptied) database; its broker is never connected, as the handlers never
    publish. Retries every 2 s, unknown hosts released (the defaults of the session's gate)."""
    pool = await create_pool(database_url, min_size=1, max_size=2)
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", Topology("hgtest-unused"), connection_name="test")
    try:
        yield Gate(pool, broker, GateMetrics(CollectorRegistry()), DatabaseWatch(database_url, pool), retry_seconds=2)
    finally:
        await pool.close()


async def job_row(db: asyncpg.Connection, job_id: str, host_id: str = HOST) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT status, reason, detail FROM gate_jobs WHERE job_id = $1 AND host_id = $2", job_key(job_id),
        uuid.UUID(host_id),
    )  # fmt: skip
    return row


async def decision_events(db: asyncpg.Connection, job_id: str, host_id: str = HOST) -> list[str]:
    rows = await db.fetch(
        "SELECT routing_key FROM outbox WHERE event_id = $1", decision_event_id(job_id, uuid.UUID(host_id))
    )
    return [row["routing_key"] for row in rows]


def message(routing_key: str, document: object, *, raw: bytes | None = None, **fields: Any) -> FakeMessage:
    body = raw if raw is not None else json.dumps(document).encode()
    return FakeMessage(body, routing_key=routing_key, **fields)


async def handle(gate: Gate, fake: FakeMessage) -> FakeMessage:
    await gate.on_job_message(cast(AbstractIncomingMessage, fake))
    return fake


def seen_at_settlement(db: asyncpg.Connection, fake: FakeMessage, job_id: str) -> list[tuple[str, str | None]]:
    """Record, at the moment the handler settles `fake`, the job host's committed status as another
    connection sees it (so: what had committed by then)."""
    seen: list[tuple[str, str | None]] = []

    async def look(how: str) -> None:
        row = await job_row(db, job_id)
        seen.append((how, None if row is None else row["status"]))

    fake.on_settle = look
    return seen


async def test_a_job_start_is_acked_after_its_decision_committed(gate: Gate, db: asyncpg.Connection) -> None:
    """An unknown host is released at once (HEALTHGATE_GATE_UNKNOWN_HOST=release); the release and its event
    are committed before the ack."""
    fake = message("job.start", {"job_id": "j-ack", "host_id": HOST, "window_ends_at": in_seconds(600)})
    seen = seen_at_settlement(db, fake, "j-ack")
    await handle(gate, fake)
    assert fake.settlements == [("ack", None)]
    assert seen == [("ack", "released")]
    assert await decision_events(db, "j-ack") == ["job.released"]


async def test_a_structured_cloudevent_is_handled_like_bare_data(gate: Gate, db: asyncpg.Connection) -> None:
    data = {"job_id": "j-ce", "host_id": HOST, "window_ends_at": in_seconds(600)}
    encoded = base64.b64encode(json.dumps(data).encode()).decode()
    fake = await handle(gate, message("job.start", {"specversion": "1.0", "id": "1", "data_base64": encoded}))
    assert fake.settlements == [("ack", None)]
    assert (await job_row(db, "j-ce"))["status"] == "released"  # type: ignore[index]


async def test_a_redelivered_job_start_decides_nothing_new(gate: Gate, db: asyncpg.Connection) -> None:
    document = {"job_id": "j-dup", "host_id": HOST, "window_ends_at": in_seconds(600)}
    first = await handle(gate, message("job.start", document))
    again = await handle(gate, message("job.start", document, redelivered=True, delivery_tag=2))
    assert first.settlements == again.settlements == [("ack", None)]
    assert await decision_events(db, "j-dup") == ["job.released"]


async def test_a_job_start_whose_window_closed_fails_before_the_ack(gate: Gate, db: asyncpg.Connection) -> None:
    fake = message("job.start", {"job_id": "j-late", "host_id": HOST, "window_ends_at": in_seconds(-60)})
    seen = seen_at_settlement(db, fake, "j-late")
    await handle(gate, fake)
    assert seen == [("ack", "failed")]
    row = await job_row(db, "j-late")
    assert row is not None and row["reason"] == "window_closed"
    # Arrived after its window: said first, and nothing blamed on the host's checks (it has none).
    assert row["detail"].startswith("the job.start arrived (at "), row["detail"]
    assert ") after its maintenance window had ended (at " in row["detail"] and row["detail"].endswith(")")


async def test_an_invalid_job_start_naming_a_job_is_decided_then_dead_lettered(
    gate: Gate, db: asyncpg.Connection
) -> None:
    """CONTRACT §5: answered with job.failed invalid_request (committed before the reject), and rejected without
    requeue on its first delivery: it can never get better."""
    fake = message("job.start", {"job_id": "j-bad", "host_id": HOST, "window_ends_at": "tomorrow"})
    seen = seen_at_settlement(db, fake, "j-bad")
    await handle(gate, fake)
    assert fake.settlements == [("reject", False)]
    assert seen == [("reject", "failed")]
    row = await job_row(db, "j-bad")
    assert row is not None and row["reason"] == "invalid_request"
    assert row["detail"].startswith("invalid job.start: window_ends_at: is not an RFC 3339 timestamp")
    assert await decision_events(db, "j-bad") == ["job.failed"]
    # The same message again (a publisher's retry): dead-lettered again, decided once.
    again = await handle(gate, message("job.start", {"job_id": "j-bad", "host_id": HOST, "window_ends_at": "tomorrow"}))
    assert again.settlements == [("reject", False)]
    assert await decision_events(db, "j-bad") == ["job.failed"]


async def test_an_invalid_job_id_is_answered_as_received(gate: Gate, db: asyncpg.Connection) -> None:
    job_id = "nul\x00" + "x" * 300
    fake = await handle(
        gate, message("job.start", {"job_id": job_id, "host_id": HOST, "window_ends_at": in_seconds(60)})
    )
    assert fake.settlements == [("reject", False)]
    stored = await db.fetchrow(
        "SELECT status, reason, received_job_id FROM gate_jobs WHERE job_id = $1", job_key(job_id)
    )
    assert stored is not None and (stored["status"], stored["reason"]) == ("failed", "invalid_request")
    assert bytes(stored["received_job_id"]).decode() == job_id


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"job_id": "j-x", "host_id": "not-a-uuid", "window_ends_at": "2030-01-01T00:00:00Z"}).encode(),
        json.dumps({"job_id": "", "host_id": HOST, "window_ends_at": "2030-01-01T00:00:00Z"}).encode(),
        json.dumps({"specversion": "1.0", "data": "text"}).encode(),
    ],
)
async def test_a_message_naming_no_usable_job_is_only_dead_lettered(
    gate: Gate, db: asyncpg.Connection, body: bytes
) -> None:
    fake = await handle(gate, message("job.start", None, raw=body))
    assert fake.settlements == [("reject", False)]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_a_message_with_an_unexpected_routing_key_is_dead_lettered(gate: Gate, db: asyncpg.Connection) -> None:
    document = {"job_id": "j-odd", "host_id": HOST, "window_ends_at": in_seconds(60)}
    for routing_key in ("job.stop", "", None):
        fake = await handle(gate, message(routing_key, document))  # type: ignore[arg-type]
        assert fake.settlements == [("reject", False)]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 0


async def test_a_cancel_before_its_start_is_the_decision(gate: Gate, db: asyncpg.Connection) -> None:
    cancel = message("job.cancel", {"job_id": "j-cancel", "host_id": HOST})
    seen = seen_at_settlement(db, cancel, "j-cancel")
    await handle(gate, cancel)
    assert seen == [("ack", "cancelled")]
    start = await handle(
        gate, message("job.start", {"job_id": "j-cancel", "host_id": HOST, "window_ends_at": in_seconds(60)})
    )
    assert start.settlements == [("ack", None)]
    assert await decision_events(db, "j-cancel") == ["job.cancelled"]  # never released after its cancel
    late_cancel = await handle(gate, message("job.cancel", {"job_id": "j-cancel", "host_id": HOST}))
    assert late_cancel.settlements == [("ack", None)]


async def test_an_invalid_cancel_is_dead_lettered_without_a_decision(gate: Gate, db: asyncpg.Connection) -> None:
    fake = await handle(gate, message("job.cancel", {"job_id": "j", "host_id": "nope"}))
    assert fake.settlements == [("reject", False)]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 0


async def test_a_failure_that_is_not_the_messages_fault_returns_it(
    gate: Gate, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or a conflict: nacked with requeue (counted by the broker, dead-lettered past the queue's limit),
    and nothing committed."""

    async def broken(*_: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(shared.jobs, "record_start", broken)
    fake = await handle(
        gate, message("job.start", {"job_id": "j-bug", "host_id": HOST, "window_ends_at": in_seconds(60)})
    )
    assert fake.settlements == [("nack", True)]
    assert await job_row(db, "j-bug") is None


async def test_an_outage_of_the_database_is_raised_with_the_message_unsettled(
    gate: Gate, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """shared/consuming.py hands such a message back without a delivery counted: the handler must not settle it."""

    async def gone(*_: object) -> bool:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    monkeypatch.setattr(shared.jobs, "record_start", gone)
    fake = message("job.start", {"job_id": "j-outage", "host_id": HOST, "window_ends_at": in_seconds(60)})
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await handle(gate, fake)
    assert fake.settlements == []


async def test_a_malformed_check_result_is_dead_lettered_and_a_valid_one_acked(
    gate: Gate, db: asyncpg.Connection
) -> None:
    bad = FakeMessage(b'{"check_id": 1}', routing_key="check.result")
    await gate.on_result_message(cast(AbstractIncomingMessage, bad))
    assert bad.settlements == [("reject", False)]
    result = {
        "check_id": str(uuid.uuid4()), "host_id": HOST, "healthy": True, "reason": "ok", "status": "healthy",
        "detail": "ok", "latency_ms": 1.0, "checked_at": "2030-01-01T00:00:00Z",
    }  # fmt: skip
    good = FakeMessage(json.dumps(result).encode(), routing_key="check.result")
    await gate.on_result_message(cast(AbstractIncomingMessage, good))
    assert good.settlements == [("ack", None)]


async def test_concurrent_copies_of_one_job_start_decide_once(gate: Gate, db: asyncpg.Connection) -> None:
    document = {"job_id": "j-race", "host_id": HOST, "window_ends_at": in_seconds(600)}
    copies = [message("job.start", document, delivery_tag=tag) for tag in range(1, 9)]
    await asyncio.gather(*(handle(gate, copy) for copy in copies))
    assert all(copy.settlements == [("ack", None)] for copy in copies)
    assert await decision_events(db, "j-race") == ["job.released"]
