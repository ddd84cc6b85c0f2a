"""Request and response bodies of the API. The same models validate requests and generate OpenAPI."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.api.targets import address_problems, dns_name_problems, dns_server_problems, url_problems
from shared.conditions import ConditionError, compile_condition
from shared.events import CheckSummary, HaltReason, HostHealthStatus, WaitingFor, WindowEndsAt
from shared.group_policies import GroupPolicy
from shared.jobs import JobStatus
from shared.notification_channels import DEFAULT_EVENTS, NOTIFIABLE_EVENTS, InvalidSecret, check_secret

ItemT = TypeVar("ItemT")
ModelT = TypeVar("ModelT", bound=BaseModel)


def _explain_pattern(message: str) -> WrapValidator:
    """Say in words what a pattern asks for, instead of pydantic's "String should match pattern
    '...'"; the pattern itself stays in the OpenAPI document."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if any(error["type"] == "string_pattern_mismatch" for error in exc.errors()):
                raise PydanticCustomError("string_pattern_mismatch", message) from None
            raise

    return WrapValidator(validate)


def _not_a_boolean(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; a boolean where a number belongs is a mistake, not a 1.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "must be a number, not true or false")
    return value


def _no_control_characters(value: str) -> str:
    # Names end up in text logs, terminals and pages: control, format and line-separator characters
    # there would break lines or hide text.
    if any(unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp") for character in value):
        raise ValueError("must not contain control or invisible formatting characters")
    return value


def _checked(problems_of: Callable[[str], list[str]]) -> AfterValidator:
    """An after-validator from a function listing a value's problems (all of them in one message)."""

    def validate(value: str) -> str:
        problems = problems_of(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    return AfterValidator(validate)


TRIMMED = _explain_pattern("must not be blank, nor begin or end with whitespace")
NonBlank = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
HostName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255, pattern=r"^\S(.*\S)?$"),
    TRIMMED,
    AfterValidator(_no_control_characters),
]
GroupName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$"),
    TRIMMED,
    AfterValidator(_no_control_characters),
]
CheckName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$"),
    TRIMMED,
    AfterValidator(_no_control_characters),
]
# systemd unit names: the name becomes a path segment of the agent URL, so no '/' or '..'.
ServiceName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9:_@-][A-Za-z0-9:_.@-]*$"),
    _explain_pattern("a systemd unit name: letters, digits and ':_.@-', not beginning with '.'"),
]
# CONTRACT §3: a code 200-599, a class 2xx-5xx in either case, or a comma list of them. [0-9], not
# \d, which would also match other scripts' digits.
EXPECTED_STATUS_PATTERN = r"^\s*[2-5]([0-9][0-9]|[xX][xX])\s*(,\s*[2-5]([0-9][0-9]|[xX][xX])\s*)*$"
ExpectedStatus = Annotated[
    str,
    StringConstraints(max_length=1000, pattern=EXPECTED_STATUS_PATTERN),
    _explain_pattern("a status code 200-599, a class 2xx-5xx (2XX too), or a comma list of them, as 200,204"),
]
# Whole numbers: JSON 10 and 10.0 (and "10" from forms) are 10; 10.5, true and 1e400 are refused.
Whole = Annotated[int, BeforeValidator(_not_a_boolean)]
Seconds = Annotated[float, BeforeValidator(_not_a_boolean), Field(allow_inf_nan=False)]
HTTP_URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#]+\S*$"
ABSOLUTE_HTTP_URL = _explain_pattern("must be an absolute http or https URL, as https://host.example/health")
CheckUrl = Annotated[
    str,
    StringConstraints(max_length=2000, pattern=HTTP_URL_PATTERN),
    ABSOLUTE_HTTP_URL,
    _checked(lambda url: url_problems(url, base_url=False)),
]
AgentUrl = Annotated[
    str,
    StringConstraints(max_length=2000, pattern=HTTP_URL_PATTERN),
    ABSOLUTE_HTTP_URL,
    _checked(lambda url: url_problems(url, base_url=True)),
]
TcpAddress = Annotated[str, StringConstraints(min_length=1, max_length=255), _checked(address_problems)]
# A dns check's name: a host name (an IP address is not a name to look up).
DnsName = Annotated[str, StringConstraints(min_length=1, max_length=255), _checked(dns_name_problems)]
# A dns check's resolver: an IP address, with a port as ip:port or [ipv6]:port.
DnsServer = Annotated[str, StringConstraints(min_length=1, max_length=100), _checked(dns_server_problems)]
ExpectedValue = Annotated[
    str,
    StringConstraints(min_length=1, max_length=500, pattern=r"\S"),
    # A blank value matches no answer a server can send: refused rather than a check that always fails.
    _explain_pattern("must not be blank"),
    AfterValidator(_no_control_characters),
]


def _basic_auth_user_problems(user: str) -> list[str]:
    problems = []
    if ":" in user:
        problems.append("must not contain ':' (Basic authentication puts it between user and password, RFC 7617)")
    if any(unicodedata.category(character) == "Cc" for character in user):
        problems.append("must not contain control characters (RFC 7617)")
    return problems


def _basic_auth_pass_problems(password: str) -> list[str]:
    # The message never repeats the password.
    if any(unicodedata.category(character) == "Cc" for character in password):
        return ["must not contain control characters (RFC 7617)"]
    return []


BasicAuthUser = Annotated[str, StringConstraints(min_length=1, max_length=100), _checked(_basic_auth_user_problems)]
BasicAuthPass = Annotated[str, StringConstraints(max_length=500), _checked(_basic_auth_pass_problems)]

# The fields every check has, and those of each type (a check holds only its own type's fields).
COMMON_WRITABLE_FIELDS = (
    "name", "check_type", "enabled", "critical", "interval_seconds", "timeout_seconds",
    "failures_before_unhealthy", "successes_before_healthy", "max_latency_ms",
)  # fmt: skip
FIELDS_OF_TYPE: dict[str, tuple[str, ...]] = {
    "service": ("service_name",),
    "http": (
        "url", "method", "expected_status", "expected_body", "ignore_cert_errors", "follow_redirects",
        "basic_auth_user", "basic_auth_pass", "condition", "min_cert_days",
    ),
    "tcp": ("port", "address"),
    "dns": ("dns_name", "record_type", "expected_values", "dns_server"),
    "grpc": ("port", "address", "grpc_service", "tls", "ignore_cert_errors"),
}  # fmt: skip
WRITE_ONLY_FIELDS = frozenset({"basic_auth_pass"})
READ_ONLY_HOST_FIELDS = (
    "id",
    "health_check_status",
    "checks_total",
    "checks_healthy",
    "created_at",
    "updated_at",
    "in_maintenance",
    "maintenance_job_id",
)
# Fields a client may echo back from a GET; they are not writable and are ignored on input.
READ_ONLY_CHECK_FIELDS = (
    "id",
    "host_id",
    "status",
    "healthy_since",
    "uptime_24h",
    "last_result",
    "basic_auth_pass_set",
    "created_at",
    "updated_at",
)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def rule_error(field: str, message: str) -> InitErrorDetails:
    """A problem found by a rule over several fields, as a pydantic error naming `field`."""
    return {"type": PydanticCustomError("rule", "{message}", {"message": message}), "loc": (field,), "input": None}


def with_rule_errors(
    data: Any, handler: ModelWrapValidatorHandler[ModelT], rules: Callable[[dict[str, Any]], list[InitErrorDetails]]
) -> ModelT:
    """Validate with `handler` and apply `rules` to the raw input as well, so that one answer lists the
    fields' problems and the rules' together (an after-validator would not run once a field failed).
    Rules read only the raw values they need and skip values of the wrong type."""
    problems = rules(data) if isinstance(data, dict) else []
    try:
        model = handler(data)
    except ValidationError as exc:
        if not problems:
            raise
        # Each error is carried over as it reads (type, place, words): a round trip through pydantic's
        # built-in error types would need each type's context again.
        carried: list[InitErrorDetails] = [
            {"type": PydanticCustomError(error["type"], error["msg"]), "loc": error["loc"], "input": None}
            for error in exc.errors(include_url=False)
        ]
        raise ValidationError.from_exception_data(exc.title, [*carried, *problems]) from None
    if problems:
        raise ValidationError.from_exception_data(type(model).__name__, problems)
    return model


# ---- hosts ---------------------------------------------------------------------------------------


class HostWrite(RequestModel):
    """PUT body; fields a client echoes back from a GET (id, summary, timestamps) are ignored."""

    name: HostName
    group: GroupName
    agent_url: AgentUrl | None = Field(
        None, description="http(s) base URL of the host's agent; no credentials, query string or fragment"
    )

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
    in_maintenance: bool = Field(
        description="a job is patching the host: one of its job hosts is released or verifying (CONTRACT §6)"
    )
    maintenance_job_id: str | None = Field(
        description="the job_id of the earliest job in patch on the host (by release), or null"
    )


# ---- health checks -------------------------------------------------------------------------------


class CheckWriteBase(RequestModel):
    name: CheckName
    enabled: bool = True
    critical: bool = True
    interval_seconds: Whole | None = Field(None, ge=10, le=86400, description="default from configuration")
    timeout_seconds: Seconds | None = Field(None, ge=0.1, le=60, description="default from configuration")
    failures_before_unhealthy: Whole = Field(1, ge=1, le=10)
    successes_before_healthy: Whole = Field(1, ge=1, le=10)
    max_latency_ms: Whole | None = Field(
        None, ge=1, le=60000, description="a check that succeeds more slowly is unhealthy, reason slow"
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in READ_ONLY_CHECK_FIELDS}
        return data


class CheckCommonFields(CheckWriteBase):
    """The common fields alone: they are checked too when `check_type` is missing or unknown."""

    model_config = ConfigDict(extra="ignore")


class ServiceCheckWrite(CheckWriteBase):
    check_type: Literal["service"]
    service_name: ServiceName

    @field_validator("service_name")
    @classmethod
    def _no_parent_segment(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("a systemd unit name cannot contain '..'")
        return value


def _http_rules(data: dict[str, Any]) -> list[InitErrorDetails]:
    """CONTRACT §3's rules over several http fields."""
    problems = []
    body = data.get("expected_body")
    if data.get("method") == "HEAD" and isinstance(body, str) and body:
        problems.append(rule_error("expected_body", "a HEAD answer has no body: use method GET, or no expected_body"))
    if isinstance(data.get("basic_auth_pass"), str) and data.get("basic_auth_user") is None:
        problems.append(rule_error("basic_auth_pass", "needs basic_auth_user"))
    url = data.get("url")
    if data.get("min_cert_days") is not None and isinstance(url, str) and not url.lower().startswith("https:"):
        problems.append(rule_error("min_cert_days", "only for https URLs: a plain http answer has no certificate"))
    return problems


class HttpCheckWrite(CheckWriteBase):
    check_type: Literal["http"]
    url: CheckUrl = Field(description="absolute http or https URL; credentials go in basic_auth_user/_pass")
    method: Literal["GET", "HEAD"] = "GET"
    expected_status: ExpectedStatus = Field(
        "2xx", description="a code (200-599), a class (2xx-5xx, either case) or a comma list (200,204)"
    )
    expected_body: str | None = Field(None, max_length=500, description="substring of the first 1 MiB; not with HEAD")
    ignore_cert_errors: bool = True
    follow_redirects: bool = False
    basic_auth_user: BasicAuthUser | None = Field(
        None, description="no ':'; required on PUT while a password is stored, unless basic_auth_pass is null"
    )
    basic_auth_pass: BasicAuthPass | None = Field(
        None,
        json_schema_extra={"writeOnly": True},
        description="write-only; on PUT omitted keeps the stored password, null clears it",
    )
    condition: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="a CEL expression over status, headers, body, json, latency_ms and cert_days_left that must be "
        "true as well (docs/conditions.md)",
    )
    min_cert_days: Whole | None = Field(
        None, ge=0, le=3650, description="https only: the server certificate must stay valid this many days"
    )

    @field_validator("expected_status")
    @classmethod
    def _normalise_status(cls, value: str) -> str:
        return ",".join(part.strip().lower() for part in value.split(","))

    @field_validator("condition")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        # "does not compile: line 1, column 23: ..." (shared/conditions.py); the poller compiles it the same way.
        if value is not None:
            try:
                compile_condition(value)
            except ConditionError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _with_rules(cls, data: Any, handler: ModelWrapValidatorHandler[HttpCheckWrite]) -> HttpCheckWrite:
        return with_rule_errors(data, handler, _http_rules)


class TcpCheckWrite(CheckWriteBase):
    check_type: Literal["tcp"]
    port: Whole = Field(ge=1, le=65535)
    address: TcpAddress | None = Field(
        None, description="a host name or an IP address, without brackets or port; defaults to the host's name"
    )


class DnsCheckWrite(CheckWriteBase):
    check_type: Literal["dns"]
    dns_name: DnsName = Field(description="the host name to look up")
    record_type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "NS", "SRV"] = "A"
    expected_values: list[ExpectedValue] | None = Field(
        None,
        max_length=20,
        description="each must be among the answers (case-insensitive, trailing dots ignored, as dig +short prints "
        "them; for MX and SRV the target name alone matches too)",
    )
    dns_server: DnsServer | None = Field(
        None, description="ip or ip:port ([ipv6]:port) of the resolver to ask; default the system resolver"
    )


class GrpcCheckWrite(CheckWriteBase):
    check_type: Literal["grpc"]
    port: Whole = Field(ge=1, le=65535)
    address: TcpAddress | None = Field(
        None, description="a host name or an IP address, without brackets or port; defaults to the host's name"
    )
    grpc_service: str = Field(
        "", max_length=200, description="the service asked for (grpc.health.v1); empty: the server as a whole"
    )
    tls: bool = False
    ignore_cert_errors: bool = True

    @field_validator("grpc_service")
    @classmethod
    def _printable_service(cls, value: str) -> str:
        return _no_control_characters(value)


CheckWrite = Annotated[
    ServiceCheckWrite | HttpCheckWrite | TcpCheckWrite | DnsCheckWrite | GrpcCheckWrite,
    Field(discriminator="check_type"),
]
CHECK_WRITE_MODELS: dict[str, type[CheckWriteBase]] = {
    "service": ServiceCheckWrite,
    "http": HttpCheckWrite,
    "tcp": TcpCheckWrite,
    "dns": DnsCheckWrite,
    "grpc": GrpcCheckWrite,
}

# A batch create (POST /api/v1/hosts:batchCreate) holds at most this many hosts, with their checks.
MAX_BATCH_HOSTS = 100


class HostBatchItem(HostCreate):
    checks: list[CheckWrite] = Field(
        default_factory=list, max_length=5, description="the host's checks (at most 5, each name once)"
    )


class HostBatchCreate(RequestModel):
    """POST /api/v1/hosts:batchCreate: hosts created with their checks in one transaction, all or none."""

    hosts: list[HostBatchItem] = Field(min_length=1, max_length=MAX_BATCH_HOSTS)


# ---- results, jobs, audit ------------------------------------------------------------------------


class ResultView(BaseModel):
    healthy: bool
    reason: str
    status: str
    detail: str
    latency_ms: float
    checked_at: AwareDatetime
    cert_expires_at: AwareDatetime | None = Field(
        None, description="the server certificate's end of validity for TLS checks, else null"
    )


class JobHostView(BaseModel):
    host_id: uuid.UUID
    status: JobStatus
    waiting_for: list[WaitingFor] = Field(
        description="what a waiting job host waits for (CONTRACT §6); [] when it is not waiting"
    )
    window_ends_at: AwareDatetime | None = Field(description="null only for an invalid request")
    received_at: AwareDatetime
    decided_at: AwareDatetime | None
    finished_at: AwareDatetime | None = Field(
        description="when the executor was done (job.finished), or the window's end without one; null before"
    )
    outcome: Literal["succeeded", "failed"] | None = Field(
        description="the executor's outcome from job.finished; null without one"
    )
    verified_at: AwareDatetime | None = Field(
        description="when verification after patching ended (verified or verification_failed); null before"
    )
    reason: str | None
    detail: str | None
    checks: list[CheckSummary]
    overridden_by: str | None
    override_reason: str | None


class JobView(BaseModel):
    job_id: str
    max_failed_hosts: int | None = Field(description="from the job's first job.start that carried it; null: no limit")
    halted: bool
    halted_at: AwareDatetime | None
    halt_reason: HaltReason | None = Field(description="max_failed_hosts or manual; null when not halted")
    hosts: list[JobHostView]


class JobListItem(JobHostView):
    job_id: str


class OverrideRequest(RequestModel):
    decision: Literal["release", "fail"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"\S")]


class GroupView(BaseModel):
    """A group (CONTRACT §6 "Group policies"): it exists while a host or a policy names it."""

    group: str
    hosts_total: int
    hosts_unhealthy: int = Field(description="hosts whose health_check_status is unhealthy")
    hosts_in_maintenance: int = Field(description="hosts a job is patching (a job host released or verifying)")
    budget_in_use: int = Field(
        description="the group's unavailable hosts: in maintenance or unhealthy, each counted once"
    )
    policy: GroupPolicy


class HaltRequest(RequestModel):
    """`POST /api/v1/jobs/{job_id}/halt` and `/resume` (CONTRACT §6): why, in the admin's words."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"\S")]


# ---- the gate's preview (CONTRACT §6 "Preview") ----------------------------------------------------

MAX_PREVIEW_HOSTS = 1000


def _duplicate_host_ids(data: dict[str, Any]) -> list[InitErrorDetails]:
    """Each host id given again (compared as UUIDs, so letter case and braces do not matter), named by its place
    and the place it repeats. A job.start per host is one job host; a second one of the same host would be the
    same job host again, so a list with one twice is refused (422) rather than answered twice or silently once."""
    host_ids = data.get("host_ids")
    if not isinstance(host_ids, list) or len(host_ids) > MAX_PREVIEW_HOSTS:
        return []  # too many: that is the list's problem, whatever it repeats
    first: dict[uuid.UUID, int] = {}
    problems: list[InitErrorDetails] = []
    for index, value in enumerate(host_ids):
        try:
            host_id = uuid.UUID(value) if isinstance(value, str) else None
        except ValueError:
            host_id = None
        if host_id is None:
            continue  # not a UUID: the field's own error says so
        if host_id in first:
            message = f"host {host_id} is given twice: also at host_ids.{first[host_id]}"
            problems.append({
                "type": PydanticCustomError("rule", "{message}", {"message": message}),
                "loc": ("host_ids", index), "input": None,
            })  # fmt: skip
        else:
            first[host_id] = index
    return problems


class PreviewRequest(RequestModel):
    """`POST /api/v1/gate/preview` (CONTRACT §6): the hosts a job would start on, in the order its job.starts
    would be sent, and when (default: now)."""

    host_ids: list[uuid.UUID] = Field(
        min_length=1, max_length=MAX_PREVIEW_HOSTS,
        description="1 to 1000 host ids, each once, in the order the job.starts would arrive: the disruption "
        "budget is counted in this order",
    )  # fmt: skip
    at: WindowEndsAt | None = Field(
        None, description="RFC 3339 with an offset: the moment to judge at, against the current state (default now)"
    )

    @model_validator(mode="wrap")
    @classmethod
    def _rules(cls, data: Any, handler: ModelWrapValidatorHandler[PreviewRequest]) -> PreviewRequest:
        return with_rule_errors(data, handler, _duplicate_host_ids)


class PreviewItem(BaseModel):
    """What a job.start for one host would get (CONTRACT §6 "Preview")."""

    host_id: uuid.UUID
    verdict: Literal["release", "wait", "fail"] = Field(
        description="release: job.released at once; wait: job.waiting; fail: job.failed (the detail says why)"
    )
    waiting_for: list[WaitingFor] = Field(description="for wait: checks, stability and/or budget; else []")
    detail: str = Field(description="the verdict in the gate's words, as it would store it with the job host")
    checks: list[CheckSummary] = Field(description="the host's gating checks; [] for an unknown host")


class PreviewAnswer(BaseModel):
    items: list[PreviewItem] = Field(description="one per host id, in the order given")


# ---- notification channels (CONTRACT §7) ------------------------------------------------------------

READ_ONLY_CHANNEL_FIELDS = ("id", "secret_set", "created_at", "updated_at")
MAX_CHANNEL_GROUPS = 100


def _notifiable(event: str) -> str:
    if event not in NOTIFIABLE_EVENTS:
        raise ValueError(f"must be one of: {', '.join(NOTIFIABLE_EVENTS)}")
    return event


def _secret(secret: str | None) -> str | None:
    # Validators run only on values sent, so None here is an explicit null (omitted keeps the stored secret).
    if secret is None:
        raise ValueError("must not be null: omit it to keep the stored secret, or send a new one")
    try:
        return check_secret(secret)
    except InvalidSecret as exc:  # its message never repeats the secret
        raise ValueError(str(exc)) from None


def _once_each(values: list[str]) -> list[str]:
    """The list in its order, each value once (a repeated event or group means nothing more)."""
    return list(dict.fromkeys(values))


ChannelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^\S(.*\S)?$"),
    TRIMMED,
    AfterValidator(_no_control_characters),
]
ChannelUrl = Annotated[
    str,
    StringConstraints(max_length=2000, pattern=HTTP_URL_PATTERN),
    ABSOLUTE_HTTP_URL,
    _checked(lambda url: url_problems(url, base_url=False, credentials=True)),
]
NotifiableEvent = Annotated[
    str, AfterValidator(_notifiable), WithJsonSchema({"type": "string", "enum": list(NOTIFIABLE_EVENTS)})
]
ChannelSecret = Annotated[
    str | None,
    AfterValidator(_secret),
    WithJsonSchema(
        {"type": "string", "pattern": r"^whsec_[A-Za-z0-9+/]+={0,2}$", "minLength": 38, "maxLength": 94},
        mode="validation",
    ),
]


def _write_only_secret(schema: dict[str, Any]) -> None:
    # No "default": null in the document: null is refused (omitted keeps the stored secret).
    schema.pop("default", None)
    schema["writeOnly"] = True


def _channel_rules(data: dict[str, Any]) -> list[InitErrorDetails]:
    """CONTRACT §7: only a webhook has a secret."""
    if data.get("type") == "slack" and data.get("secret") is not None:
        return [rule_error("secret", "only webhook channels have a secret: a slack URL carries its own token")]
    return []


class ChannelWrite(RequestModel):
    """POST and PUT body of a notification channel (CONTRACT §7); fields a client echoes back from a GET (id,
    secret_set, timestamps) are ignored."""

    name: ChannelName
    type: Literal["webhook", "slack"]
    url: ChannelUrl = Field(
        description="http or https URL the notifications are POSTed to; a slack URL holds its token and is shown "
        "masked, a password in a webhook URL is shown as ***"
    )
    secret: ChannelSecret = Field(
        None,
        json_schema_extra=_write_only_secret,
        description="webhook only, write-only: a Standard Webhooks secret, whsec_ + base64 of 24-64 bytes. "
        "Without one, a webhook channel gets a generated secret, returned once in that answer. On PUT omitted "
        "keeps the stored one; null is refused",
    )
    events: Annotated[list[NotifiableEvent], AfterValidator(_once_each)] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=100,
        description="routing keys to notify (CONTRACT §5, §6); each once",
    )
    groups: Annotated[list[GroupName], AfterValidator(_once_each)] = Field(
        default_factory=list, max_length=MAX_CHANNEL_GROUPS, description="host groups to notify of; empty: all"
    )
    include_maintenance: bool = Field(False, description="also events with in_maintenance: true")
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _drop_read_only_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in READ_ONLY_CHANNEL_FIELDS}
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _with_rules(cls, data: Any, handler: ModelWrapValidatorHandler[ChannelWrite]) -> ChannelWrite:
        return with_rule_errors(data, handler, _channel_rules)


class ChannelView(BaseModel):
    id: uuid.UUID
    name: str
    type: Literal["webhook", "slack"]
    url: str = Field(description="a slack URL with everything after the host as …; a webhook URL's password as ***")
    secret_set: bool
    secret: str | None = Field(
        None,
        description="only in the answer that generated the secret (a webhook created, or made from a slack "
        "channel, without one): keep it, it is never shown again",
    )
    events: list[str]
    groups: list[str]
    include_maintenance: bool
    enabled: bool
    created_at: AwareDatetime
    updated_at: AwareDatetime


class ChannelTestAnswer(BaseModel):
    delivered: bool = Field(description="the receiver answered 2xx")
    status_code: int | None = Field(description="the receiver's HTTP status; null when no answer came")
    detail: str


class DeliveryView(BaseModel):
    event_id: uuid.UUID
    event_type: str = Field(description="the event's routing key, or healthgate.test")
    attempts: int
    last_attempt_at: AwareDatetime | None
    status: Literal["pending", "delivered", "failed"]
    status_code: int | None
    detail: str | None


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
