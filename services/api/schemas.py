"""Request and response bodies of the API. The same models validate requests and generate OpenAPI."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from shared.events import CheckSummary, HostHealthStatus

ItemT = TypeVar("ItemT")

NonBlank = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
HostName = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^\S(.*\S)?$")]
GroupName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$")]
CheckName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$")]
# systemd unit names: the name becomes a path segment of the agent URL, so no '/' or '..'.
ServiceName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9:_@-][A-Za-z0-9:_.@-]*$")
]
ExpectedStatus = Annotated[
    str,
    StringConstraints(pattern=r"^\s*([1-5](\d\d|xx))\s*(,\s*([1-5](\d\d|xx))\s*)*$"),
]
TcpAddress = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:%\[\]-]+$")]

HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#]+\S*$"
# The fields every check has, and those of each type (a check holds only its own type's fields).
COMMON_WRITABLE_FIELDS = (
    "name", "check_type", "enabled", "critical", "interval_seconds", "timeout_seconds",
    "failures_before_unhealthy", "successes_before_healthy",
)  # fmt: skip
FIELDS_OF_TYPE: dict[str, tuple[str, ...]] = {
    "service": ("service_name",),
    "http": (
        "url", "method", "expected_status", "expected_body", "ignore_cert_errors", "follow_redirects",
        "basic_auth_user", "basic_auth_pass",
    ),
    "tcp": ("port", "address"),
}  # fmt: skip
WRITE_ONLY_FIELDS = frozenset({"basic_auth_pass"})
READ_ONLY_HOST_FIELDS = (
    "id",
    "health_check_status",
    "checks_total",
    "checks_healthy",
    "created_at",
    "updated_at",
)
# Fields a client may echo back from a GET; they are not writable and are ignored on input.
READ_ONLY_CHECK_FIELDS = (
    "id",
    "host_id",
    "status",
    "last_result",
    "basic_auth_pass_set",
    "created_at",
    "updated_at",
)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _http_url(value: str, field: str) -> str:
    parsed = AnyHttpUrl(value)
    if not parsed.host:
        raise ValueError(f"{field} must be an absolute http or https URL")
    return value


# ---- hosts ---------------------------------------------------------------------------------------


class HostWrite(RequestModel):
    """PUT body; fields a client echoes back from a GET (id, summary, timestamps) are ignored."""

    name: HostName
    group: GroupName
    agent_url: str | None = Field(
        None, max_length=2000, pattern=HTTP_URL_PATTERN, description="http(s) base URL of the host's agent"
    )

    @field_validator("agent_url")
    @classmethod
    def _agent_url_is_http(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value, "agent_url")

    @model_validator(mode="before")
    @classmethod
    def _drop_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in READ_ONLY_HOST_FIELDS}
        return data


class HostCreate(HostWrite):
    id: uuid.UUID | None = Field(None, description="reuse another system's host id")

    @model_validator(mode="before")
    @classmethod
    def _drop_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key == "id" or key not in READ_ONLY_HOST_FIELDS}
        return data


class HostView(BaseModel):
    id: uuid.UUID
    name: str
    group: str
    agent_url: str | None
    health_check_status: HostHealthStatus
    checks_total: int
    checks_healthy: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


# ---- health checks -------------------------------------------------------------------------------


class CheckWriteBase(RequestModel):
    name: CheckName
    enabled: bool = True
    critical: bool = True
    interval_seconds: int | None = Field(None, ge=10, le=86400, description="default from configuration")
    timeout_seconds: float | None = Field(None, ge=0.1, le=60, description="default from configuration")
    failures_before_unhealthy: int = Field(1, ge=1, le=10)
    successes_before_healthy: int = Field(1, ge=1, le=10)

    @model_validator(mode="before")
    @classmethod
    def _drop_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in READ_ONLY_CHECK_FIELDS}
        return data


class ServiceCheckWrite(CheckWriteBase):
    check_type: Literal["service"]
    service_name: ServiceName

    @field_validator("service_name")
    @classmethod
    def _no_parent_segment(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("a systemd unit name cannot contain '..'")
        return value


class HttpCheckWrite(CheckWriteBase):
    check_type: Literal["http"]
    url: str = Field(max_length=2000, pattern=HTTP_URL_PATTERN, description="absolute http or https URL")
    method: Literal["GET", "HEAD"] = "GET"
    expected_status: ExpectedStatus = Field("2xx", description="a code (200), a class (3xx) or a comma list (200,204)")
    expected_body: str | None = Field(None, max_length=500, description="substring of the first 1 MiB")
    ignore_cert_errors: bool = True
    follow_redirects: bool = False
    basic_auth_user: str | None = Field(None, min_length=1, max_length=100)
    basic_auth_pass: str | None = Field(
        None,
        max_length=500,
        json_schema_extra={"writeOnly": True},
        description="write-only; on PUT omitted keeps the stored password, null clears it",
    )

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        return _http_url(value, "url")

    @field_validator("expected_status")
    @classmethod
    def _normalise_status(cls, value: str) -> str:
        return ",".join(part.strip() for part in value.split(","))

    @model_validator(mode="after")
    def _password_needs_user(self) -> HttpCheckWrite:
        if self.basic_auth_pass is not None and self.basic_auth_user is None:
            raise ValueError("basic_auth_pass needs basic_auth_user")
        return self


class TcpCheckWrite(CheckWriteBase):
    check_type: Literal["tcp"]
    port: int = Field(ge=1, le=65535)
    address: TcpAddress | None = Field(None, description="defaults to the host's name")


CheckWrite = Annotated[ServiceCheckWrite | HttpCheckWrite | TcpCheckWrite, Field(discriminator="check_type")]
CHECK_WRITE_MODELS: dict[str, type[CheckWriteBase]] = {
    "service": ServiceCheckWrite,
    "http": HttpCheckWrite,
    "tcp": TcpCheckWrite,
}

# ---- results, jobs, audit ------------------------------------------------------------------------


class ResultView(BaseModel):
    healthy: bool
    reason: str
    status: str
    detail: str
    latency_ms: float
    checked_at: AwareDatetime


class JobHostView(BaseModel):
    host_id: uuid.UUID
    status: Literal["waiting_health_check", "released", "failed", "cancelled"]
    window_ends_at: AwareDatetime | None = Field(description="null only for an invalid request")
    received_at: AwareDatetime
    decided_at: AwareDatetime | None
    reason: str | None
    detail: str | None
    checks: list[CheckSummary]
    overridden_by: str | None
    override_reason: str | None


class JobView(BaseModel):
    job_id: str
    hosts: list[JobHostView]


class JobListItem(JobHostView):
    job_id: str


class OverrideRequest(RequestModel):
    decision: Literal["release", "fail"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"\S")]


class AuditEntry(BaseModel):
    id: int
    at: AwareDatetime
    actor: str
    action: str
    entity_type: str
    entity_id: str
    host_id: uuid.UUID | None
    changes: dict[str, Any]


class Page(BaseModel, Generic[ItemT]):
    items: list[ItemT]
    next_cursor: str | None


class ItemList(BaseModel, Generic[ItemT]):
    items: list[ItemT]


class ProblemDetails(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] | None = None
