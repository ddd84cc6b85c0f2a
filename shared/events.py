"""Every event of CONTRACT §5 as a pydantic model, and their CloudEvents encoding.

Outbound messages are CloudEvents 1.0 in structured JSON mode. Inbound messages may be structured
CloudEvents or the bare `data` object; the routing key says what a message is.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import json
import re
import unicodedata
import uuid
from typing import Annotated, Any, Literal, TypeVar

import ciso8601
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticSerializationError

from shared.json_input import JsonInputError, json_type, load_json

CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
EVENT_TYPE_PREFIX = "healthgate."
# Fixed namespace for deterministic event ids (uuid5): a decision always gets the same id.
EVENT_ID_NAMESPACE = uuid.UUID("5b0b3b9e-4a4b-4f0e-9d0a-6865616c7468")

CheckType = Literal["service", "http", "tcp", "dns", "grpc"]
CheckStatus = Literal["healthy", "unhealthy", "unknown"]
HostHealthStatus = Literal["healthy", "degraded", "unhealthy", "unknown", "no_checks"]
# CONTRACT §4: how a result came out.
ResultReason = Literal[
    "ok",
    "dns",
    "connect",
    "tls",
    "timeout",
    "status",
    "body",
    "agent",
    "blocked",
    "protocol",
    "slow",
    "cert",
    "condition",
]
# CONTRACT §5 job.failed reasons; §6 adds no_checks and job_halted.
FailureReason = Literal["window_closed", "invalid_request", "overridden", "unknown_host", "no_checks", "job_halted"]
# CONTRACT §6: what a waiting job host waits for.
WaitingFor = Literal["checks", "stability", "budget"]
HaltReason = Literal["max_failed_hosts", "manual"]
JOB_ID_MAX_LENGTH = 200
# The largest max_failed_hosts a job.start may carry: the jobs table holds it as a PostgreSQL integer, and no
# job reaches that many hosts, so a larger count is refused (invalid_request) rather than failing at the insert.
MAX_FAILED_HOSTS_LIMIT = 2**31 - 1
# Longer than any RFC 3339 timestamp anyone sends ("2024-06-01T12:00:00.123456789+01:00" is 35): a
# longer string is refused before parsing, so a huge value never reaches the parser or an error message.
TIMESTAMP_MAX_LENGTH = 64


# Unicode categories Cc (C0, DEL and C1, NUL included: exactly U+0000 to U+001F and U+007F to U+009F) and Cs
# (surrogates, U+D800 to U+DFFF), as one character class: a scan in C, so a 2 MB job_id costs milliseconds.
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def control_character(text: str) -> tuple[int, str] | None:
    """The first control character of `text` (Unicode category Cc: C0, DEL and C1, NUL included) or
    lone surrogate (Cs: not valid Unicode, so no UTF-8 encoder, PostgreSQL included, can store it),
    as (index, character); None if there is none."""
    found = _CONTROL_OR_SURROGATE.search(text)
    return None if found is None else (found.start(), found.group())


def _job_id_characters(value: object) -> object:
    # Before pydantic's str validation, which would refuse a lone surrogate without saying where.
    found = control_character(value) if isinstance(value, str) else None
    if found is not None:
        index, character = found
        kind = "a lone surrogate" if unicodedata.category(character) == "Cs" else "a control character"
        raise ValueError(f"holds {kind} (U+{ord(character):04X} at index {index}); none is allowed")
    return value


# CONTRACT §5: 1 to 200 characters, no control characters. A valid job_id is therefore always storable
# as PostgreSQL text (no NUL, valid UTF-8) and fits gate_jobs' CHECK (char_length BETWEEN 1 AND 200).
JobId = Annotated[
    str,
    Strict(),
    StringConstraints(min_length=1, max_length=JOB_ID_MAX_LENGTH),
    BeforeValidator(_job_id_characters),
    Field(json_schema_extra={"pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}),
]
_JOB_ID = TypeAdapter(JobId)


def is_valid_job_id(value: object) -> bool:
    """Whether `value` is a job_id the contract allows (a string of 1 to 200 characters, no control
    characters). Every other non-empty string is still answered, as an invalid request."""
    try:
        _JOB_ID.validate_python(value)
    except ValidationError:
        return False
    return True


def job_key(job_id: str) -> str:
    """The key under which a received job_id is stored (`gate_jobs.job_id`) and looked up (the API's paths).

    A valid job_id (CONTRACT §5: 1 to 200 characters, no control characters) is its own key. Any other
    non-empty string (too long, with NUL or other control characters, with a lone surrogate) gets a key
    PostgreSQL text can hold and that is the same for every copy of it: INVALID_JOB_KEY_PREFIX and the
    SHA-256 of its UTF-8 ("surrogatepass", so a lone surrogate hashes too), 87 characters. The gate stores
    such a row with the job_id as received beside it (`received_job_id_bytes`), and the API finds it by
    the same key when a path holds that job_id."""
    if is_valid_job_id(job_id):
        return job_id
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()
    return INVALID_JOB_KEY_PREFIX + digest


# The key of an invalid job_id starts with U+001A SUBSTITUTE, the control character meant to stand
# for a value that cannot be represented: no valid job_id holds a control character, so no valid
# job_id is ever this key, and the key is short, NUL-free text that gate_jobs can hold.
INVALID_JOB_KEY_PREFIX = "\x1ainvalid-job-id:sha256:"


def received_job_id_bytes(job_id: str) -> bytes | None:
    """What `gate_jobs.received_job_id` (bytea) holds for a received job_id: None for a valid one (its
    own key), else its UTF-8 with "surrogatepass", which holds every Python string, NUL and lone
    surrogates included, and which `received_job_id` turns back into the same string."""
    return None if is_valid_job_id(job_id) else job_id.encode("utf-8", "surrogatepass")


def received_job_id(key: str, stored: bytes | None) -> str:
    """The job_id as received, from a `gate_jobs` row's `job_id` (the key) and `received_job_id`.

    A row keyed by an invalid job_id's key from before migration 0009 has no received id: its key is
    all there is, and is shown."""
    return key if stored is None else bytes(stored).decode("utf-8", "surrogatepass")


# RFC 3339 §5.6 timestamps are ASCII: digits, "-", ":", "T", ".", "Z", "+" (either case for T and Z),
# and a space for the T (allowed by its §5.6 note; ciso8601 takes it).
RFC3339_CHARACTERS = frozenset("0123456789-:.+TtZz ")
RFC3339_EXAMPLE = "2026-12-01T02:00:00Z"
NOT_RFC3339 = f"is not an RFC 3339 timestamp with an offset such as {RFC3339_EXAMPLE}"
_OFFSET_AT_END = re.compile(r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})\Z")
# RFC 3339's date-time up to its seconds is of fixed width: "2026-12-01T02:00:00".
_SECONDS_END = 19


def _rfc3339_in_utc(value: object) -> object:
    """`window_ends_at` of a job.start: an RFC 3339 string with an offset, as a UTC datetime.

    Parsed by ciso8601's strict RFC 3339 mode (pydantic's own datetime parsing also takes numbers,
    "1893456000" strings, dates without a time and times without an offset). Converted to UTC here so
    that a value Python cannot represent once in UTC (`9999-12-31T23:59:59-14:00` is in year 10000)
    is refused now, not later in a comparison or a query. Also refused: year 0 or 10000, a leap second
    (`23:59:60`: Python's datetime has no second 60), an offset of ±24:00 or more. An aware datetime
    (a model built in Python, never a decoded message) is taken as it is, in UTC.

    Every error says what is wrong in true words: a character no timestamp holds is named with its
    index before ciso8601 sees it (a C parser: it takes NUL for the end of the text, and says "UTC
    offset is mandatory" for any stray character after the seconds), and so is what follows the
    seconds when ciso8601 asks for an offset that is there (`_parser_reason`)."""
    if isinstance(value, dt.datetime) and value.utcoffset() is not None:
        return value.astimezone(dt.UTC)
    if not isinstance(value, str):
        raise ValueError(f"must be an RFC 3339 string with an offset such as {RFC3339_EXAMPLE}, not {json_type(value)}")
    if len(value) > TIMESTAMP_MAX_LENGTH:
        raise ValueError(f"is {len(value)} characters long: {NOT_RFC3339}")
    for index, character in enumerate(value):
        if character not in RFC3339_CHARACTERS:
            shown = f"{character!r} (U+{ord(character):04X})" if character.isprintable() else f"U+{ord(character):04X}"
            hint = " (RFC 3339 writes a fraction of a second with '.')" if character == "," else ""
            raise ValueError(f"{NOT_RFC3339}: it holds {shown} at index {index}, which no such timestamp holds{hint}")
    try:
        parsed = ciso8601.parse_rfc3339(value)
    except ValueError as exc:
        raise ValueError(f"{NOT_RFC3339}: {_parser_reason(value, exc)}") from None
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC (years 1 to 9999)") from None


def _parser_reason(value: str, error: ValueError) -> str:
    """ciso8601's reason, unless it is untrue: it says "UTC offset is mandatory" for whatever it finds
    after the seconds (and a fraction) that does not start an offset, also when the value does end with
    one (`2030-01-01T00:00:00.5.5Z`, `2030-01-01T00:00:00 +01:00`); then what is there is named."""
    reason = str(error).rstrip(".")
    if reason.startswith("UTC offset is mandatory") and _OFFSET_AT_END.search(value):
        return (
            f"{value[_SECONDS_END:]!r} follows the seconds, where RFC 3339 allows only a fraction of a second "
            "('.' and digits) and then the offset"
        )
    return reason


# In UTC, years 1 to 9999 (Python's range; PostgreSQL's timestamptz is wider).
WindowEndsAt = Annotated[AwareDatetime, BeforeValidator(_rfc3339_in_utc)]
HostId = uuid.UUID
_HOST_ID = TypeAdapter(HostId)


def parse_host_id(value: object) -> uuid.UUID | None:
    """`value` as a host id if the inbound models accept it as one, else None."""
    try:
        return _HOST_ID.validate_python(value)
    except ValidationError:
        return None


class EventModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


EventT = TypeVar("EventT", bound=EventModel)


# ---- shared pieces -------------------------------------------------------------------------------


class CheckResultView(EventModel):
    """A result as the API shows it: `{healthy, reason, detail, latency_ms, checked_at, cert_expires_at}`
    (CONTRACT §4; `cert_expires_at`: the server certificate's end of validity for TLS checks, else null)."""

    healthy: bool
    reason: ResultReason
    detail: str
    latency_ms: float
    checked_at: AwareDatetime
    cert_expires_at: AwareDatetime | None = None


class CheckView(EventModel):
    """A health check without secrets: the API's response body and the payload of config events."""

    id: uuid.UUID
    host_id: uuid.UUID
    name: str
    check_type: CheckType
    enabled: bool
    critical: bool
    interval_seconds: int
    timeout_seconds: float
    failures_before_unhealthy: int
    successes_before_healthy: int
    service_name: str | None = None
    url: str | None = None
    method: Literal["GET", "HEAD"] | None = None
    expected_status: str | None = None
    expected_body: str | None = None
    ignore_cert_errors: bool | None = None
    follow_redirects: bool | None = None
    basic_auth_user: str | None = None
    basic_auth_pass_set: bool | None = None
    port: int | None = None
    address: str | None = None
    max_latency_ms: int | None = None
    condition: str | None = None
    min_cert_days: int | None = None
    dns_name: str | None = None
    record_type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "NS", "SRV"] | None = None
    expected_values: list[str] | None = None
    dns_server: str | None = None
    grpc_service: str | None = None
    tls: bool | None = None
    status: CheckStatus
    # CONTRACT §3, §6 stable_seconds: when the check last became healthy; null unless it is healthy.
    healthy_since: AwareDatetime | None = None
    # CONTRACT §3: the share of healthy results in the last 24 h (0-1), null without results.
    uptime_24h: float | None = None
    last_result: CheckResultView | None
    created_at: AwareDatetime
    updated_at: AwareDatetime


class CheckSummary(EventModel):
    check_id: uuid.UUID
    name: str
    healthy: bool | None
    detail: str | None
    checked_at: AwareDatetime | None


# ---- inbound -------------------------------------------------------------------------------------


class JobStart(EventModel):
    """A job is about to start on a host (CONTRACT §5). Unknown fields are ignored."""

    job_id: JobId
    host_id: HostId
    window_ends_at: WindowEndsAt
    # CONTRACT §6 "Halting a job": the job halts once more hosts than this failed; None: no limit. Taken
    # from the job's first job.start that carries it. A bool is not a count (StrictInt).
    max_failed_hosts: Annotated[StrictInt, Field(ge=0, le=MAX_FAILED_HOSTS_LIMIT)] | None = None


class JobCancel(EventModel):
    job_id: JobId
    host_id: HostId


class JobFinished(EventModel):
    """The executor is done with a released host (CONTRACT §5, §6 "Verification after patching")."""

    job_id: JobId
    host_id: HostId
    outcome: Literal["succeeded", "failed"]
    detail: Annotated[str, Field(max_length=1000)] | None = None


# ---- outbound ------------------------------------------------------------------------------------


class JobWaiting(EventModel):
    job_id: str
    host_id: uuid.UUID
    window_ends_at: AwareDatetime
    failing_checks: list[CheckSummary]
    waiting_for: list[WaitingFor] = []


class JobReleased(EventModel):
    job_id: str
    host_id: uuid.UUID
    released_at: AwareDatetime
    waited_seconds: float
    checks: list[CheckSummary]
    overridden_by: str | None = None
    override_reason: str | None = None


class JobFailed(EventModel):
    """A job host failed. For `invalid_request`, `job_id` is the job_id as received, whatever it holds
    (control characters, NUL, more than 200 characters): JSON escapes what needs escaping."""

    job_id: str
    host_id: uuid.UUID
    failed_at: AwareDatetime
    reason: FailureReason
    detail: str
    checks: list[CheckSummary]
    overridden_by: str | None = None
    override_reason: str | None = None


class JobCancelled(EventModel):
    job_id: str
    host_id: uuid.UUID
    cancelled_at: AwareDatetime


class JobVerified(EventModel):
    """After job.finished (or the window's end), the host is healthy again (CONTRACT §6). `outcome`: the
    executor's, null when no job.finished came."""

    job_id: str
    host_id: uuid.UUID
    verified_at: AwareDatetime
    outcome: Literal["succeeded", "failed"] | None
    checks: list[CheckSummary]


class JobVerificationFailed(EventModel):
    """The host did not become healthy (and stable) in time after job.finished (CONTRACT §6)."""

    job_id: str
    host_id: uuid.UUID
    failed_at: AwareDatetime
    outcome: Literal["succeeded", "failed"] | None
    detail: str
    checks: list[CheckSummary]


class JobHalted(EventModel):
    """A job stops releasing hosts (CONTRACT §6 "Halting a job"). `by`: the admin token's name for a manual
    halt, else None; `detail`: the admin's reason, or which hosts failed."""

    job_id: str
    at: AwareDatetime
    reason: HaltReason
    failed_hosts: list[uuid.UUID]
    detail: str
    by: str | None


class JobResumed(EventModel):
    """An admin lets a halted job go on (CONTRACT §6)."""

    job_id: str
    at: AwareDatetime
    detail: str
    by: str | None


class CheckResult(EventModel):
    check_id: uuid.UUID
    host_id: uuid.UUID
    healthy: bool
    reason: ResultReason
    status: CheckStatus
    detail: str
    latency_ms: float
    checked_at: AwareDatetime
    # CONTRACT §4: the server certificate's end of validity for TLS checks, else null.
    cert_expires_at: AwareDatetime | None = None


class CheckStatusChanged(EventModel):
    check_id: uuid.UUID
    host_id: uuid.UUID
    previous: CheckStatus
    current: CheckStatus
    detail: str
    at: AwareDatetime
    in_maintenance: bool = False


class HostStatusChanged(EventModel):
    host_id: uuid.UUID
    previous: HostHealthStatus
    current: HostHealthStatus
    at: AwareDatetime
    in_maintenance: bool = False


class CheckConfigChanged(EventModel):
    check: CheckView


# ---- internal requests ---------------------------------------------------------------------------


class CheckRunRequest(EventModel):
    """The API asks a poller to run a check now (routing key `poller.test`); the reply is a CheckResult."""

    check_id: uuid.UUID
    host_id: uuid.UUID
    requested_by: str


class ScheduledRun(EventModel):
    """One check to run; `slot` is the scheduled time it runs for (None: an extra run on request)."""

    check_id: uuid.UUID
    slot: AwareDatetime | None = None


class Tick(EventModel):
    """Work for a poller (routing key `poller.tick`): several checks per message keep the per-check
    messaging cost low. The scheduler sends slotted runs; the gate asks for extra runs."""

    runs: Annotated[list[ScheduledRun], Field(min_length=1, max_length=1000)]


# Routing key -> model. The routing key, not the CloudEvent type, says what a message is.
INBOUND_EVENTS: dict[str, type[EventModel]] = {
    "job.start": JobStart,
    "job.cancel": JobCancel,
    "job.finished": JobFinished,
}
OUTBOUND_EVENTS: dict[str, type[EventModel]] = {
    "job.waiting": JobWaiting,
    "job.released": JobReleased,
    "job.failed": JobFailed,
    "job.cancelled": JobCancelled,
    "job.verified": JobVerified,
    "job.verification_failed": JobVerificationFailed,
    "job.halted": JobHalted,
    "job.resumed": JobResumed,
    "check.result": CheckResult,
    "check.status_changed": CheckStatusChanged,
    "host.status_changed": HostStatusChanged,
    "check.config.created": CheckConfigChanged,
    "check.config.updated": CheckConfigChanged,
    "check.config.deleted": CheckConfigChanged,
}


# ---- encoding ------------------------------------------------------------------------------------


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 envelope in structured JSON mode."""

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    time: AwareDatetime
    datacontenttype: Literal["application/json"] = "application/json"
    subject: str | None = None
    data: dict[str, Any]


def deterministic_event_id(*parts: str) -> uuid.UUID:
    """uuid5 of the parts joined by "/", in EVENT_ID_NAMESPACE.

    The same as `uuid.uuid5`, whose Python 3.11 version takes only a str it can encode as UTF-8; a
    job_id received with a lone surrogate (invalid, but still answered) is hashed with "surrogatepass",
    so every string has an id and every other string keeps the id uuid.uuid5 gives it."""
    name = "/".join(parts).encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(EVENT_ID_NAMESPACE.bytes + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


def decision_event_id(job_id: str, host_id: uuid.UUID) -> uuid.UUID:
    """The same id for whatever decides a job host (the gate, a timer, an override, a cancel), so a
    consumer that drops duplicates by id sees one decision."""
    return deterministic_event_id("job-decision", job_id, str(host_id))


def encode_cloudevent(
    routing_key: str,
    data: EventModel,
    *,
    source: str,
    event_id: uuid.UUID | None = None,
    time: dt.datetime | None = None,
) -> tuple[uuid.UUID, bytes]:
    """The event id and the structured-mode JSON body of one outbound event."""
    expected = OUTBOUND_EVENTS.get(routing_key)
    if expected is None or not isinstance(data, expected):
        raise TypeError(f"{type(data).__name__} is not the event of routing key {routing_key!r}")
    event_id = event_id or uuid.uuid4()
    envelope = CloudEvent(
        id=str(event_id),
        source=source,
        type=EVENT_TYPE_PREFIX + routing_key,
        time=time or dt.datetime.now(dt.UTC),
        data={},
    )
    try:
        # The envelope without its data, then the data model's JSON spliced in as its last member: the same bytes
        # as dumping the envelope with the data as a dict (`data` is the envelope's last field, and exclude_none
        # does not reach into a dict), without building that dict (the poller encodes a check.result per check;
        # tests/unit/test_shared_events.py holds the two encodings equal).
        head = envelope.model_dump_json(exclude_none=True, exclude={"data"})
        return event_id, (head[:-1] + ',"data":' + data.model_dump_json(exclude_unset=True) + "}").encode()
    except PydanticSerializationError:
        envelope = envelope.model_copy(update={"data": data.model_dump(mode="json", exclude_unset=True)})
        # A string UTF-8 cannot encode: a lone surrogate in a job_id received as "\ud800" (the
        # job.failed of that invalid request carries the job_id as received). The standard library
        # writes it back as the same JSON escape, and every other character as an escape too.
        return event_id, json.dumps(
            envelope.model_dump(mode="json", exclude_none=True), ensure_ascii=True, separators=(",", ":")
        ).encode()


class MalformedEvent(Exception):
    """An inbound message that can never be processed; it belongs in the dead-letter queue."""

    def __init__(self, message: str, *, data: object = None, problems: str | None = None) -> None:
        super().__init__(message)
        self.data = data  # the data object as decoded, if the body was JSON
        self.problems = problems or message  # what is wrong with `data`, field by field


def decode_event(body: bytes, model: type[EventT]) -> EventT:
    """Parse an inbound message into `model`: the one decoding of every inbound message (CONTRACT §5).

    `body` is a structured CloudEvent (an object with `specversion`) whose data is in `data`, or in
    `data_base64` as base64 of a JSON object (CloudEvents JSON format §3.1; never both), or else the
    bare data object. Any valid JSON is read (`shared.json_input.load_json`: integers of any length,
    any depth); unknown fields are ignored.

    Raises MalformedEvent. Its `data` is the data object when there is one (so a caller can salvage
    the job's identity from it), with what is wrong in `problems`."""
    try:
        document = load_json(body)
    except JsonInputError as exc:
        raise MalformedEvent(str(exc)) from None
    if not isinstance(document, dict):
        raise MalformedEvent("body is not a JSON object")
    data = _cloudevent_data(document) if "specversion" in document else document
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'data'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise MalformedEvent(f"invalid {model.__name__}: {problems}", data=data, problems=problems) from None


def _cloudevent_data(envelope: dict[str, Any]) -> dict[str, Any]:
    """The data object of a structured CloudEvent, from `data` or `data_base64`."""
    data = envelope.get("data")
    if "data_base64" in envelope:
        if "data" in envelope:
            # The data object still names the job: the caller may answer it (invalid_request).
            problem = "the CloudEvent has both data and data_base64 (CloudEvents JSON format §3.1 allows one)"
            raise MalformedEvent(problem, data=data if isinstance(data, dict) else None)
        encoded = envelope["data_base64"]
        if not isinstance(encoded, str):
            raise MalformedEvent(f"data_base64 must be a base64 string, not {json_type(encoded)}")
        try:
            # Strict: the base64 alphabet only, padded, nothing after the padding (b64decode's validate=True
            # still takes excess padding and what follows it).
            decoded = binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: a character that is not ASCII
            raise MalformedEvent(f"data_base64 is not base64 (RFC 4648 §4): {exc}") from None
        try:
            data = load_json(decoded, what="data_base64")
        except JsonInputError as exc:
            raise MalformedEvent(str(exc)) from None
        if not isinstance(data, dict):
            raise MalformedEvent(f"data_base64 holds {json_type(data)}, not a JSON object", data=data)
        return data
    if not isinstance(data, dict):
        raise MalformedEvent("CloudEvent has no JSON object in data", data=data)
    return data
