"""Every valid JSON job.start is decided, whatever else it holds (CONTRACT §5: unknown fields are ignored; one
decision, at once): integers longer than Python converts, numbers beyond a float, nesting far deeper than Python's
json recurses, the data as a CloudEvent's `data_base64`; a `window_ends_at` that is such a value is an invalid
request, and its detail says in true words what is wrong. With the real broker, database and gate process."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from shared.events import JobCancel, JobStart, MalformedEvent, decode_event
from shared.json_input import KEPT_DEPTH, MAX_DEEP_TEXT_BYTES, NestedTooDeep, OutOfRangeNumber, load_json
from tests.support.fake_agent import FakeAgent
from tests.support.logs import log_lines
from tests.support.messages import DeadLetters, EventCapture, Publisher, decision_of, rejected_once, wait_decision
from tests.support.processes import ServiceProcess
from tests.test_gate import host_with_checks, run_checks
from tests.test_gate_input import Bad, assert_decided_once_and_dead_lettered, start_body

pytestmark = pytest.mark.usefixtures("poller", "gate")
HUGE = b"9" * 4301  # one digit more than Python's int() converts by default


def nested(depth: int, *, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a": ' * depth + b"1" + b"}" * depth


def cloudevent(data: bytes, **attributes: object) -> bytes:
    """A structured CloudEvent around `data` (raw JSON text), or with `data_base64` when data is empty."""
    envelope = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/patcher", "type": "t"} | attributes
    text = json.dumps(envelope).encode()
    return text[:-1] + b', "data": ' + data + b"}" if data else text


def with_raw_field(bad: Bad, name: str, raw: bytes, *, wrap: bool = False, **fields: object) -> Bad:
    """`bad` as a job.start (its job_id, host_id and marker) with one more field of raw JSON text."""
    assert bad.job_id is not None
    body = json.dumps(start_body(bad.job_id, bad.host_id, **fields) | {"marker": bad.marker}).encode()
    data = body[:-1] + b', "' + name.encode() + b'": ' + raw + b"}"
    bad.raw = cloudevent(data) if wrap else data
    return bad


def valid(name: str, raw: bytes, *, wrap: bool = False) -> Bad:
    return with_raw_field(Bad(job_id=f"{name}-{uuid.uuid4().hex[:8]}"), "extra", raw, wrap=wrap)


def bad_window(raw: bytes, problem: str, *, wrap: bool = False, extra: bytes | None = None) -> Bad:
    """A job.start whose window_ends_at is the raw JSON text `raw` (and maybe a deep `extra` field after it)."""
    bad = Bad(job_id=f"window-{uuid.uuid4().hex[:8]}", problem=problem)
    body = json.dumps({"job_id": bad.job_id, "host_id": bad.host_id, "marker": bad.marker}).encode()
    data = body[:-1] + b', "window_ends_at": ' + raw + (b', "extra": ' + extra if extra else b"") + b"}"
    bad.raw = cloudevent(data) if wrap else data
    return bad


# ---- valid job.start with any extra field: decided by the rules ------------------------------------


async def test_a_valid_job_start_with_any_extra_json_is_decided(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    log_start = gate.log_path.stat().st_size
    cases = [
        valid("huge-int", HUGE),
        valid("huge-negative-int", b"-" + HUGE),
        valid("hundred-thousand-digits", b"7" * 100_000),
        valid("float-overflow", b"1e400"),
        valid("float-negative-overflow", b"-1e400"),
        valid("float-underflow", b"1e-400"),
        valid("long-fraction", b"0." + b"3" * 5000),
        valid("huge-exponent", b"1e" + HUGE),
        valid("arrays-1000", nested(1000)),
        valid("arrays-10000", nested(10_000)),
        valid("arrays-100000", nested(100_000)),
        valid("objects-10000", nested(10_000, kind="object")),
        valid("in-data-10000", nested(10_000), wrap=True),
        valid("in-data-100000", nested(100_000), wrap=True),
        valid(
            "in-data-deep-and-huge",
            b'{"n": -' + HUGE + b', "l": ' + nested(50_000) + b', "s": "' + HUGE + b'"}',
            wrap=True,
        ),
        valid("deep-then-huge-exponent", b"[" + nested(5000) + b", 1e" + HUGE + b"]"),
    ]
    # The data as base64 (CloudEvents JSON format §3.1), also with deep nesting inside it.
    for name, extra in (("base64", b"1"), ("base64-deep", nested(20_000)), ("base64-huge", HUGE)):
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        bad = Bad(job_id=job_id)
        data = json.dumps(start_body(job_id, bad.host_id)).encode()[:-1] + b', "extra": ' + extra + b"}"
        bad.raw = cloudevent(b"", data_base64=base64.b64encode(data).decode(), marker=bad.marker)
        cases.append(bad)
    for case in cases:
        await jobs.send("job.start", None, raw=case.payload())
    for case in cases:
        assert case.job_id is not None
        decision = await wait_decision(events, case.job_id)
        assert decision.routing_key == "job.released", (case.job_id, decision.data)
        assert decision.data["host_id"] == case.host_id
    await asyncio.sleep(1)
    await dead.drain()
    assert not [case.job_id for case in cases if dead.with_marker(case.marker)]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs WHERE status = 'released'") == len(cases)
    lines = log_lines(gate, log_start)
    assert not [line for line in lines if "dead-lettered" in line["message"] or "could not handle" in line["message"]]
    assert gate.process.poll() is None


async def test_job_cancel_with_any_extra_json_is_carried_out(
    jobs: Publisher, events: EventCapture, admin: httpx.AsyncClient, fake_agent: FakeAgent, dead: DeadLetters
) -> None:
    fake_agent.set("any-json.service", "unhealthy")
    host_id, checks = await host_with_checks(
        admin, [{"check_type": "service", "service_name": "any-json.service"}], agent_url=fake_agent.base_url
    )
    await run_checks(admin, checks)
    extras = {"cancel-huge": HUGE, "cancel-deep": nested(100_000), "cancel-float": b"1e400"}
    for job_id in extras:
        await jobs.start(job_id, host_id)
        await events.wait_for("job.waiting", lambda event, job_id=job_id: event.data["job_id"] == job_id)
    for job_id, extra in extras.items():
        body = json.dumps({"job_id": job_id, "host_id": host_id}).encode()[:-1] + b', "extra": ' + extra + b"}"
        await jobs.send("job.cancel", None, raw=cloudevent(body) if job_id == "cancel-deep" else body)
    for job_id in extras:
        assert (await wait_decision(events, job_id)).routing_key == "job.cancelled"


# ---- window_ends_at that is no timestamp: invalid_request, once, with a true detail ----------------


async def test_a_window_that_is_a_huge_number_deep_nesting_or_a_bad_timestamp_is_an_invalid_request(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    both = Bad(job_id=f"both-{uuid.uuid4().hex[:8]}", problem="both data and data_base64")
    data = start_body(both.job_id, both.host_id)
    both.raw = cloudevent(
        json.dumps(data).encode(), data_base64=base64.b64encode(json.dumps(data).encode()).decode(), marker=both.marker
    )
    in_base64 = Bad(job_id=f"base64-window-{uuid.uuid4().hex[:8]}", problem="not a number")
    data = start_body(in_base64.job_id, in_base64.host_id, window_ends_at=1893456000)
    in_base64.raw = cloudevent(
        b"", data_base64=base64.b64encode(json.dumps(data).encode()).decode(), marker=in_base64.marker
    )
    cases = [
        bad_window(HUGE, "must be an RFC 3339 string with an offset such as 2026-12-01T02:00:00Z, not a number"),
        bad_window(b"-" + HUGE, "not a number"),
        bad_window(b"1e400", "not a number"),
        bad_window(nested(1000), "not an array"),
        bad_window(nested(1000, kind="object"), "not an object"),
        bad_window(nested(100_000), "not an array"),
        bad_window(nested(10_000), "not an array", wrap=True),
        bad_window(HUGE, "not a number", extra=nested(10_000)),  # read event by event, the number too
        both,
        in_base64,
    ]
    # The window after a deep field, itself nested just below the depth that is built.
    deep_first = Bad(job_id=f"deep-first-{uuid.uuid4().hex[:8]}", problem="not an array")
    deep_first.raw = (
        b'{"extra": ' + nested(10_000) + b', "job_id": "' + deep_first.job_id.encode() + b'", "host_id": "'
        + deep_first.host_id.encode() + b'", "marker": "' + deep_first.marker.encode() + b'", "window_ends_at": '
        + nested(KEPT_DEPTH + 5) + b"}"
    )  # fmt: skip
    cases.append(deep_first)
    # CONTRACT §5 details: true words. Python's parser (ciso8601) says "UTC offset is mandatory" for each of these.
    not_rfc3339 = "is not an RFC 3339 timestamp with an offset such as 2026-12-01T02:00:00Z"
    timestamps = {
        "2030-01-01T00:00:00,5Z": f"{not_rfc3339}: it holds ',' (U+002C) at index 19",
        "2030-01-01T00:00:00\x00Z": f"{not_rfc3339}: it holds U+0000 at index 19",
        "2030-01-01T00:00:00.\x00Z": "U+0000 at index 20",
        "2030-01-01T00:00:00\u00a0Z": "U+00A0 at index 19",
        "2030-01-01T00:00:00Z\x00": "U+0000 at index 20",
        "2030-01-01T00:00:00.5.5Z": "'.5.5Z' follows the seconds",
        "2030-01-01T00:00:00 +01:00": "' +01:00' follows the seconds",
        "2030-01-01T00:00:00x": "'x' (U+0078) at index 19",
    }
    for value, problem in timestamps.items():
        bad = Bad(job_id=f"timestamp-{uuid.uuid4().hex[:8]}", problem=problem)
        bad.body = start_body(bad.job_id, bad.host_id, window_ends_at=value)
        cases.append(bad)
    await assert_decided_once_and_dead_lettered(cases, jobs, events, db, gate, dead)
    for case in cases:
        assert case.job_id is not None
        (decision,) = decision_of(events, case.job_id)
        assert "mandatory" not in decision.data["detail"], decision.data["detail"]
    # Still true where it is true: no offset at all.
    missing = Bad(job_id=f"no-offset-{uuid.uuid4().hex[:8]}", problem=f"{not_rfc3339}: UTC offset is mandatory")
    missing.body = start_body(missing.job_id, missing.host_id, window_ends_at="2030-01-01T00:00:00")
    await assert_decided_once_and_dead_lettered([missing], jobs, events, db, gate, dead)


# ---- not JSON, or no data object: only dead-lettered ------------------------------------------------


async def test_bodies_that_are_not_json_or_whose_data_base64_is_not_an_object_are_only_dead_lettered(
    jobs: Publisher, events: EventCapture, db: asyncpg.Connection, gate: ServiceProcess, dead: DeadLetters
) -> None:
    host_id = str(uuid.uuid4())

    def start_with(extra: bytes) -> Bad:
        bad = Bad()
        body = json.dumps(start_body(f"not-json-{bad.marker[:8]}", host_id) | {"marker": bad.marker}).encode()
        bad.raw = body[:-1] + b', "extra": ' + extra + b"}"
        return bad

    def base64_case(data_base64: object) -> Bad:
        bad = Bad()
        bad.raw = cloudevent(b"", data_base64=data_base64, marker=bad.marker)
        return bad

    start = json.dumps(start_body("b64-job", host_id)).encode()
    cases = [
        start_with(b"NaN"),  # Python reads these; JSON (RFC 8259) has none of them
        start_with(b"Infinity"),
        start_with(b"-Infinity"),
        start_with(b"[NaN, " + nested(5000) + b"]"),  # the same, too deep for Python's json
        start_with(b"[" + nested(5000) + b", 01]"),  # a leading zero, too deep for Python's json
        start_with(nested(MAX_DEEP_TEXT_BYTES // 2 + 1)),  # too deep and too long to read event by event
        base64_case("!!!not base64"),
        base64_case("eyJhIjogMX0"),  # '{"a": 1}' without its padding
        base64_case("eyJhIjogMX0=="),  # with too much of it
        base64_case("eyJhIjogMX0=eyJhIjogMX0="),  # something after it
        base64_case("eyJh IjogMX0="),  # a space
        base64_case(base64.b64encode(b"hello, not JSON").decode()),
        base64_case(base64.b64encode(b"[1, 2]").decode()),
        base64_case(base64.b64encode(b"\xff\xfe\x00").decode()),
        base64_case(base64.urlsafe_b64encode(b"\xfb\xff" + start).decode()),  # base64url, not base64
        base64_case(42),
        base64_case(None),
    ]
    log_start = gate.log_path.stat().st_size
    for case in cases:
        await jobs.send("job.start", None, raw=case.payload())
    await jobs.start("after-the-unreadable-ones", host_id)
    assert (await wait_decision(events, "after-the-unreadable-ones")).routing_key == "job.released"
    for case in cases:
        (letter,) = await dead.wait_for(case.marker, 1)
        assert letter.body == case.payload() and rejected_once(letter), case.payload()[:200]
    await asyncio.sleep(1)
    assert not [event for event in events.matching("job.failed") if event.data["reason"] == "invalid_request"]
    assert await db.fetchval("SELECT count(*) FROM gate_jobs") == 1
    lines = log_lines(gate, log_start)
    assert [line["message"] for line in lines].count("malformed message dead-lettered") == len(cases)
    assert not [line for line in lines if line["message"].startswith("could not handle a message")]
    assert gate.process.poll() is None


# ---- the decoding, as pure functions ----------------------------------------------------------------


def test_load_json_reads_every_json_text_and_stands_in_for_what_python_cannot_hold() -> None:
    document = load_json(b'{"i": ' + HUGE + b', "f": 1e400, "n": -1e400, "s": "' + HUGE + b'", "ok": 12}')
    assert isinstance(document["i"], OutOfRangeNumber) and isinstance(document["f"], OutOfRangeNumber)
    assert document["s"] == HUGE.decode() and document["ok"] == 12
    deep = load_json(b'{"a": ' + nested(100_000) + b', "b": "\\ud800", "c": ' + HUGE + b', "d": [1, 2.5, null]}')
    assert deep["b"] == "\ud800" and isinstance(deep["c"], OutOfRangeNumber) and deep["d"] == [1, 2.5, None]
    level = deep["a"]  # the object is level 1, its array level 2; levels down to KEPT_DEPTH are built
    for _ in range(KEPT_DEPTH - 2):
        (level,) = level
    assert len(level) == 1 and isinstance(level[0], NestedTooDeep) and level[0].kind == "an array"
    assert load_json(b'{"a": 1, "a": 2, "x": ' + nested(3000) + b"}")["a"] == 2  # the last one, as json.loads
    assert load_json(('{"a": "é", "x": ' + "[" * 3000 + "]" * 3000 + "}").encode("utf-16"))["a"] == "é"
    # Read event by event up to MAX_DEEP_TEXT_BYTES, not beyond (bounded work on the consumer's event loop).
    depth = (MAX_DEEP_TEXT_BYTES - len(b'{"a": , "b": 1}')) // 2
    assert load_json(b'{"a": ' + nested(depth) + b', "b": 1}')["b"] == 1
    with pytest.raises(ValueError, match="nested deeper than Python's json decoder goes"):
        load_json(b'{"a": ' + nested(depth) + b', "b": 123}')
    for text in (b"NaN", b'{"a": Infinity}', b"{", b"", b'{"a": 1} x', b"[NaN, " + nested(3000) + b"]", b"\xff"):
        with pytest.raises(ValueError, match="body is not JSON"):
            load_json(text)


def test_decode_event_reads_data_base64_and_refuses_it_beside_data() -> None:
    host_id = str(uuid.uuid4())
    data = {"job_id": "j", "host_id": host_id, "window_ends_at": "2030-01-01T00:00:00Z"}
    encoded = base64.b64encode(json.dumps(data).encode()).decode()
    assert decode_event(cloudevent(b"", data_base64=encoded), JobStart).job_id == "j"
    assert decode_event(cloudevent(b"", data_base64=encoded), JobCancel).job_id == "j"
    with pytest.raises(MalformedEvent, match="both data and data_base64") as refused:
        decode_event(cloudevent(json.dumps(data).encode(), data_base64=encoded), JobStart)
    assert refused.value.data == data  # its job_id and host_id still get the job answered
    problems: dict[str, Any] = {
        "!": "data_base64 is not base64",
        "aGVsbG8=": "data_base64 is not JSON",
        "WzFd": "data_base64 holds an array, not a JSON object",
        7: "data_base64 must be a base64 string, not a number",
    }
    for value, message in problems.items():
        with pytest.raises(MalformedEvent, match=message):
            decode_event(cloudevent(b"", data_base64=value), JobStart)
