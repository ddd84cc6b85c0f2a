"""shared/events.py: decoding inbound messages (structured CloudEvents or bare data, CONTRACT §5), the inbound
fields (`job_id`, `host_id`, `window_ends_at`), the keys and ids derived from a job_id, and the outbound
CloudEvents encoding. No broker: bodies are bytes."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shared.events import (
    INVALID_JOB_KEY_PREFIX,
    JOB_ID_MAX_LENGTH,
    CheckResult,
    CheckStatusChanged,
    CloudEvent,
    HostStatusChanged,
    JobCancel,
    JobCancelled,
    JobFailed,
    JobStart,
    MalformedEvent,
    control_character,
    decision_event_id,
    decode_event,
    deterministic_event_id,
    encode_cloudevent,
    is_valid_job_id,
    job_key,
    parse_host_id,
    received_job_id,
    received_job_id_bytes,
)
from shared.json_input import OutOfRangeNumber

HOST = "12345678-1234-5678-1234-567812345678"
WINDOW = "2030-06-01T12:00:00Z"
START = {"job_id": "patch-42", "host_id": HOST, "window_ends_at": WINDOW}


def envelope(data: object = None, **attributes: Any) -> bytes:
    document = {"specversion": "1.0", "id": "e-1", "source": "/patcher", "type": "patch.job.start", **attributes}
    if data is not None:
        document["data"] = data
    return json.dumps(document).encode()


def malformed(body: bytes, model: type = JobStart) -> MalformedEvent:
    with pytest.raises(MalformedEvent) as raised:
        decode_event(body, model)
    return raised.value


# ---- the two forms of a message ------------------------------------------------------------------------


def test_bare_data_and_a_structured_cloudevent_decode_alike() -> None:
    expected = JobStart(
        job_id="patch-42", host_id=uuid.UUID(HOST), window_ends_at=dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)
    )
    assert decode_event(json.dumps(START).encode(), JobStart) == expected
    assert decode_event(envelope(START), JobStart) == expected
    encoded = base64.b64encode(json.dumps(START).encode()).decode()
    assert decode_event(envelope(data_base64=encoded), JobStart) == expected


def test_unknown_fields_are_ignored_at_both_levels() -> None:
    data = START | {"priority": "high", "nested": {"deep": [1, 2, {"x": None}]}, "huge": 0}
    body = envelope(data, extension="value", time="not even a time").replace(b'"huge": 0', b'"huge": ' + b"9" * 5000)
    assert decode_event(body, JobStart).job_id == "patch-42"


def test_a_number_no_python_number_holds_is_refused_where_a_field_is_typed() -> None:
    body = (
        json.dumps(START | {"window_ends_at": 0}).encode().replace(b'"window_ends_at": 0', b'"window_ends_at": 1e400')
    )
    assert "window_ends_at: must be an RFC 3339 string with an offset such as 2026-12-01T02:00:00Z, not a number" in (
        malformed(body).problems
    )


def test_the_routing_keys_model_decides_what_is_read() -> None:
    cancel = decode_event(json.dumps(START).encode(), JobCancel)  # window_ends_at ignored for a cancel
    assert (cancel.job_id, cancel.host_id) == ("patch-42", uuid.UUID(HOST))


def test_a_body_in_utf16_or_with_a_bom_is_json_too() -> None:
    assert decode_event(json.dumps(START).encode("utf-16"), JobStart).job_id == "patch-42"
    assert decode_event(b"\xef\xbb\xbf" + json.dumps(START).encode(), JobStart).job_id == "patch-42"


# ---- what cannot be read at all --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body is not JSON"),
        (b"{", "body is not JSON"),
        (b"\xff\xfe\xfd", "body is not JSON"),
        (b'{"job_id": NaN}', "NaN is not a JSON value"),
        (b"[]", "body is not a JSON object"),
        (b'"job"', "body is not a JSON object"),
        (b"42", "body is not a JSON object"),
        (b"null", "body is not a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_malformed_with_no_data(body: bytes, message: str) -> None:
    error = malformed(body)
    assert message in str(error) and error.data is None


@pytest.mark.parametrize(
    ("body", "message", "data"),
    [
        (envelope(), "CloudEvent has no JSON object in data", None),
        (envelope([START]), "CloudEvent has no JSON object in data", [START]),
        (envelope("text"), "CloudEvent has no JSON object in data", "text"),
        (envelope(START, data_base64="e30="), "both data and data_base64", START),
        (envelope([1], data_base64="e30="), "both data and data_base64", None),
        (envelope(data_base64=7), "data_base64 must be a base64 string, not a number", None),
        (envelope(data_base64=None), "data_base64 must be a base64 string, not null", None),
        (envelope(data_base64="e30"), "data_base64 is not base64", None),  # unpadded
        (envelope(data_base64="e30=="), "data_base64 is not base64", None),  # excess padding
        (envelope(data_base64="e3 0="), "data_base64 is not base64", None),
        (envelope(data_base64="e30=e30="), "data_base64 is not base64", None),  # data after the padding
        (envelope(data_base64="\u00e930="), "data_base64 is not base64", None),
        (envelope(data_base64="aGVsbG8="), "data_base64 is not JSON", None),
        (envelope(data_base64="WzFd"), "data_base64 holds an array, not a JSON object", [1]),
    ],
)
def test_a_cloudevent_without_a_readable_data_object_is_malformed(body: bytes, message: str, data: object) -> None:
    """`data` is kept when the event still names a job (both data and data_base64): the job can be answered."""
    error = malformed(body)
    assert message in str(error)
    assert error.data == data


# ---- the fields of a job.start ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("job_id", "", "job_id: String should have at least 1 character"),
        ("job_id", "j" * (JOB_ID_MAX_LENGTH + 1), "job_id: String should have at most 200 characters"),
        ("job_id", 42, "job_id: Input should be a valid string"),
        ("job_id", None, "job_id: Input should be a valid string"),
        ("job_id", "a\x00b", "job_id: holds a control character (U+0000 at index 1); none is allowed"),
        ("job_id", "tab\there", "job_id: holds a control character (U+0009 at index 3)"),
        ("job_id", "c1\x85", "job_id: holds a control character (U+0085 at index 2)"),
        ("job_id", "lone\ud800", "job_id: holds a lone surrogate (U+D800 at index 4)"),
        ("host_id", "not-a-uuid", "host_id: Input should be a valid UUID"),
        ("host_id", 42, "host_id: UUID input should be a string, bytes or UUID object"),
        ("window_ends_at", "2030-06-01T12:00:00", "UTC offset is mandatory"),
        ("window_ends_at", "2030-06-01", "Time is mandatory"),
        ("window_ends_at", "1893456000", "is not an RFC 3339 timestamp"),
        ("window_ends_at", 1893456000, "must be an RFC 3339 string with an offset such as 2026-12-01T02:00:00Z, not a number"),
        ("window_ends_at", None, "not null"),
        ("window_ends_at", "2030-06-01T23:59:60Z", "second must be in 0..59"),
        ("window_ends_at", "0000-01-01T00:00:00Z", "year 0 is out of range"),
        ("window_ends_at", "2030-06-01T00:00:00+24:00", "offset must be"),
        ("window_ends_at", "9999-12-31T23:59:59-14:00", "is out of range once converted to UTC (years 1 to 9999)"),
        ("window_ends_at", "2030-06-01T12:00:00,5Z", "RFC 3339 writes a fraction of a second with '.'"),
        ("window_ends_at", "2030-06-01T12:00:00\x00Z", "it holds U+0000 at index 19"),
        ("window_ends_at", "2030-06-01T12:00:00.5.5Z", "'.5.5Z' follows the seconds"),
        ("window_ends_at", "2" * 65, "is 65 characters long"),
    ],
)  # fmt: skip
def test_each_bad_field_is_named_with_its_problem_and_the_data_kept(field: str, value: object, problem: str) -> None:
    data = START | {field: value}
    error = malformed(json.dumps(data).encode())  # ensure_ascii: a lone surrogate travels as "\ud800"
    assert problem in error.problems, error.problems
    assert str(error) == f"invalid JobStart: {error.problems}"
    assert isinstance(error.data, dict) and error.data["job_id"] == data["job_id"]


def test_every_problem_of_a_job_start_is_listed() -> None:
    error = malformed(json.dumps({"job_id": "", "host_id": "x"}).encode())
    assert [part.split(":")[0] for part in error.problems.split("; ")] == ["job_id", "host_id", "window_ends_at"]


@pytest.mark.parametrize(
    ("window", "utc"),
    [
        ("2030-06-01T12:00:00Z", dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)),
        ("2030-06-01t12:00:00z", dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)),
        ("2030-06-01 12:00:00Z", dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)),
        ("2030-06-01T14:00:00+02:00", dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)),
        ("2030-06-01T12:00:00.123456789-00:30", dt.datetime(2030, 6, 1, 12, 30, 0, 123456, tzinfo=dt.UTC)),
        ("0001-01-01T00:00:00Z", dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
        ("9999-12-31T23:59:59Z", dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
    ],
)
def test_windows_are_read_as_rfc_3339_and_kept_in_utc(window: str, utc: dt.datetime) -> None:
    job = decode_event(json.dumps(START | {"window_ends_at": window}).encode(), JobStart)
    assert job.window_ends_at == utc and job.window_ends_at.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "host_id",
    [HOST, HOST.upper(), "{" + HOST + "}", "urn:uuid:" + HOST, HOST.replace("-", "")],
)
def test_a_host_id_is_any_form_of_uuid_the_models_accept(host_id: str) -> None:
    assert parse_host_id(host_id) == uuid.UUID(HOST)
    assert decode_event(json.dumps(START | {"host_id": host_id}).encode(), JobStart).host_id == uuid.UUID(HOST)


@pytest.mark.parametrize("value", [None, 42, "", "x", HOST + "0", [HOST], {"id": HOST}, OutOfRangeNumber("9" * 5000)])
def test_parse_host_id_answers_none_for_anything_else(value: object) -> None:
    assert parse_host_id(value) is None


# ---- job_id: validity, keys and the id as received -------------------------------------------------------------


def test_valid_job_ids() -> None:
    assert is_valid_job_id("j") and is_valid_job_id("j" * 200) and is_valid_job_id("émoji ✓ 🚀")
    for invalid in ("", "j" * 201, "a\x00", "a\x7f", "a\x9f", "a\ud800", 5, None, b"j"):
        assert not is_valid_job_id(invalid), invalid


def test_the_first_control_character_or_lone_surrogate_is_found() -> None:
    assert control_character("plain text ✓") is None
    assert control_character("a\nb\x00") == (1, "\n")
    assert control_character("ok\udfff") == (2, "\udfff")
    assert control_character("\x9f") == (0, "\x9f")
    assert control_character("\xa0") is None  # NBSP is no control character


def test_an_invalid_job_id_has_a_fixed_key_of_its_own() -> None:
    invalid = "x" * 201
    key = job_key(invalid)
    assert key == INVALID_JOB_KEY_PREFIX + hashlib.sha256(invalid.encode()).hexdigest()
    assert len(key) == 87 and is_valid_job_id(key) is False  # no valid job_id is ever such a key
    assert job_key("patch-42") == "patch-42"
    assert job_key("a\ud800") == INVALID_JOB_KEY_PREFIX + hashlib.sha256(b"a\xed\xa0\x80").hexdigest()
    assert job_key("a\x00") != job_key("a\x01")


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=300)


@given(any_text)
@example("a\ud800")
@example("\x00")
@example("j" * 201)
def test_every_job_id_round_trips_through_its_key_and_stored_bytes(job_id: str) -> None:
    key, stored = job_key(job_id), received_job_id_bytes(job_id)
    if is_valid_job_id(job_id):
        assert (key, stored) == (job_id, None)
    else:
        assert key.startswith(INVALID_JOB_KEY_PREFIX) and stored is not None
        assert "\x00" not in key and len(key) == 87
    assert received_job_id(key, stored) == job_id
    assert job_key(job_id) == key  # the same for every copy of it


# ---- event ids ----------------------------------------------------------------------------------------------------


@given(st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_deterministic_ids_are_uuid5_of_the_parts(parts: list[str]) -> None:
    from shared.events import EVENT_ID_NAMESPACE

    assert deterministic_event_id(*parts) == uuid.uuid5(EVENT_ID_NAMESPACE, "/".join(parts))


def test_every_decider_of_a_job_host_uses_one_id_and_a_lone_surrogate_has_one_too() -> None:
    host = uuid.UUID(HOST)
    assert decision_event_id("j", host) == decision_event_id("j", host)
    assert decision_event_id("j", host) != decision_event_id("k", host)
    assert decision_event_id("j", host) != deterministic_event_id("job-waiting", "j", HOST)
    assert decision_event_id("a\ud800", host).version == 5


# ---- outbound ----------------------------------------------------------------------------------------------------


def test_an_outbound_event_is_a_structured_cloudevent_without_nulls() -> None:
    at = dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)
    event = JobFailed(
        job_id="patch-42", host_id=uuid.UUID(HOST), failed_at=at, reason="window_closed", detail="closed", checks=[]
    )
    event_id, body = encode_cloudevent("job.failed", event, source="/healthgate/gate", time=at)
    document = json.loads(body)
    assert document == {
        "specversion": "1.0", "id": str(event_id), "source": "/healthgate/gate", "type": "healthgate.job.failed",
        "time": "2030-06-01T12:00:00Z", "datacontenttype": "application/json",
        "data": {"job_id": "patch-42", "host_id": HOST, "failed_at": "2030-06-01T12:00:00Z",
                 "reason": "window_closed", "detail": "closed", "checks": []},
    }  # fmt: skip
    given_id = uuid.uuid4()
    assert encode_cloudevent("job.failed", event, source="/s", event_id=given_id)[0] == given_id


def test_an_event_under_another_routing_key_is_refused() -> None:
    event = JobCancelled(job_id="j", host_id=uuid.UUID(HOST), cancelled_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    for routing_key in ("job.released", "job.start", "nonsense"):
        with pytest.raises(TypeError, match="is not the event of routing key"):
            encode_cloudevent(routing_key, event, source="/s")


def test_a_job_id_with_a_lone_surrogate_is_sent_as_a_json_escape() -> None:
    event = JobFailed(
        job_id="bad\ud800", host_id=uuid.UUID(HOST), failed_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        reason="invalid_request", detail="invalid job.start", checks=[],
    )  # fmt: skip
    _, body = encode_cloudevent("job.failed", event, source="/s")
    assert b"bad\\ud800" in body and body.isascii()
    assert json.loads(body)["data"]["job_id"] == "bad\ud800"


# ---- any input -------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
start_like = st.fixed_dictionaries(
    {},
    optional={
        "job_id": st.one_of(st.text(max_size=210), json_values),
        "host_id": st.one_of(st.uuids().map(str), json_values),
        "window_ends_at": st.one_of(st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()), json_values),
        "specversion": st.just("1.0"),
        "data": json_values,
        "data_base64": st.one_of(st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()), json_values),
    },
)


@given(st.one_of(st.binary(max_size=200), start_like.map(lambda d: json.dumps(d).encode())))
def test_any_body_decodes_or_is_malformed_never_another_error(body: bytes) -> None:
    for model in (JobStart, JobCancel, CheckResult):
        try:
            decode_event(body, model)
        except MalformedEvent as error:
            assert str(error) and error.problems


def _encoding_as_before(routing_key: str, data: Any, *, source: str, event_id: uuid.UUID, time: dt.datetime) -> bytes:
    """encode_cloudevent as it was before issue 16: the envelope with the data as a dict, dumped whole."""
    envelope = CloudEvent(
        id=str(event_id), source=source, type="healthgate." + routing_key, time=time,
        data=data.model_dump(mode="json", exclude_unset=True),
    )  # fmt: skip
    return envelope.model_dump_json(exclude_none=True).encode()


@given(
    detail=st.text(max_size=60).filter(lambda text: not any("\ud800" <= c <= "\udfff" for c in text)),
    latency=st.floats(min_value=0, max_value=1e12, allow_nan=False),
    healthy=st.booleans(),
    with_cert=st.booleans(),
    microsecond=st.integers(0, 999_999),
)
def test_the_spliced_encoding_is_byte_identical_to_the_previous_one(
    detail: str, latency: float, healthy: bool, with_cert: bool, microsecond: int
) -> None:
    at = dt.datetime(2030, 6, 1, 12, 0, 0, microsecond, tzinfo=dt.UTC)
    offset = dt.timezone(dt.timedelta(hours=5, minutes=30))
    check_id, host_id, event_id = uuid.uuid4(), uuid.UUID(HOST), uuid.uuid4()
    result_fields = {
        "check_id": check_id, "host_id": host_id, "healthy": healthy, "reason": "ok" if healthy else "status",
        "status": "healthy" if healthy else "unhealthy", "detail": detail, "latency_ms": latency, "checked_at": at,
    }  # fmt: skip
    if with_cert:
        result_fields["cert_expires_at"] = at.astimezone(offset)
    events = [
        ("check.result", CheckResult(**result_fields)),  # type: ignore[arg-type]
        ("check.status_changed", CheckStatusChanged(
            check_id=check_id, host_id=host_id, previous="healthy", current="unhealthy", detail=detail, at=at,
            in_maintenance=with_cert,
        )),
        ("host.status_changed", HostStatusChanged(host_id=host_id, previous="unknown", current="healthy", at=at)),
        ("job.failed", JobFailed(
            job_id=detail or "j", host_id=host_id, failed_at=at, reason="window_closed", detail=detail, checks=[],
        )),
        ("job.cancelled", JobCancelled(job_id="j", host_id=host_id, cancelled_at=at.astimezone(offset))),
    ]  # fmt: skip
    for routing_key, event in events:
        for source in ("/healthgate/poller", "/s\u00e9"):
            expected = _encoding_as_before(routing_key, event, source=source, event_id=event_id, time=at)
            assert encode_cloudevent(routing_key, event, source=source, event_id=event_id, time=at) == (
                event_id,
                expected,
            )
