"""Every event of CONTRACT §5 as a pydantic model, and their CloudEvents encoding.

Outbound messages are CloudEvents 1.0 in structured JSON mode. Inbound messages may be structured
CloudEvents or the bare `data` object; the routing key says what a message is.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
EVENT_TYPE_PREFIX = "healthgate."
# Fixed namespace for deterministic event ids (uuid5): a decision always gets the same id.
EVENT_ID_NAMESPACE = uuid.UUID("5b0b3b9e-4a4b-4f0e-9d0a-6865616c7468")

CheckType = Literal["service", "http", "tcp"]
CheckStatus = Literal["healthy", "unhealthy", "unknown"]
HostHealthStatus = Literal["healthy", "degraded", "unhealthy", "unknown", "no_checks"]
# CONTRACT §4: how a result came out.
ResultReason = Literal[
    "ok", "dns", "connect", "tls", "timeout", "status", "body", "agent", "blocked", "protocol", "slow"
]
JobId = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class EventModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


EventT = TypeVar("EventT", bound=EventModel)


# ---- shared pieces -------------------------------------------------------------------------------


class CheckResultView(EventModel):
    """A result as the API shows it: `{healthy, reason, detail, latency_ms, checked_at}`."""

    healthy: bool
    reason: ResultReason
    detail: str
    latency_ms: float
    checked_at: AwareDatetime


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
    status: CheckStatus
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
    job_id: JobId
    host_id: uuid.UUID
    window_ends_at: AwareDatetime


class JobCancel(EventModel):
    job_id: JobId
    host_id: uuid.UUID


# ---- outbound ------------------------------------------------------------------------------------


class JobWaiting(EventModel):
    job_id: str
    host_id: uuid.UUID
    window_ends_at: AwareDatetime
    failing_checks: list[CheckSummary]


class JobReleased(EventModel):
    job_id: str
    host_id: uuid.UUID
    released_at: AwareDatetime
    waited_seconds: float
    checks: list[CheckSummary]
    overridden_by: str | None = None
    override_reason: str | None = None


class JobFailed(EventModel):
    job_id: str
    host_id: uuid.UUID
    failed_at: AwareDatetime
    reason: Literal["window_closed", "invalid_request", "overridden", "unknown_host"]
    detail: str
    checks: list[CheckSummary]
    overridden_by: str | None = None
    override_reason: str | None = None


class JobCancelled(EventModel):
    job_id: str
    host_id: uuid.UUID
    cancelled_at: AwareDatetime


class CheckResult(EventModel):
    check_id: uuid.UUID
    host_id: uuid.UUID
    healthy: bool
    reason: ResultReason
    status: CheckStatus
    detail: str
    latency_ms: float
    checked_at: AwareDatetime


class CheckStatusChanged(EventModel):
    check_id: uuid.UUID
    host_id: uuid.UUID
    previous: CheckStatus
    current: CheckStatus
    detail: str
    at: AwareDatetime


class HostStatusChanged(EventModel):
    host_id: uuid.UUID
    previous: HostHealthStatus
    current: HostHealthStatus
    at: AwareDatetime


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
INBOUND_EVENTS: dict[str, type[EventModel]] = {"job.start": JobStart, "job.cancel": JobCancel}
OUTBOUND_EVENTS: dict[str, type[EventModel]] = {
    "job.waiting": JobWaiting,
    "job.released": JobReleased,
    "job.failed": JobFailed,
    "job.cancelled": JobCancelled,
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
    return uuid.uuid5(EVENT_ID_NAMESPACE, "/".join(parts))


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
        data=data.model_dump(mode="json", exclude_unset=True),
    )
    return event_id, envelope.model_dump_json(exclude_none=True).encode()


class MalformedEvent(Exception):
    """An inbound message that can never be processed; it belongs in the dead-letter queue."""

    def __init__(self, message: str, *, data: object = None) -> None:
        super().__init__(message)
        self.data = data


def decode_event(body: bytes, model: type[EventT]) -> EventT:
    """Parse a structured CloudEvent or a bare data object into `model`."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedEvent("body is not a JSON object")
    data = document.get("data") if "specversion" in document else document
    if not isinstance(data, dict):
        raise MalformedEvent("CloudEvent has no JSON object in data", data=data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'data'}: {error['msg']}" for error in exc.errors()
        )
        raise MalformedEvent(f"invalid {model.__name__}: {problems}", data=data) from None
