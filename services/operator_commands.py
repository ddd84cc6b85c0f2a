"""The operator commands over the HTTP API (CONTRACT §1): `healthgate hosts|checks|jobs|groups ...`.

Each command makes the API calls an operator would make with curl (services/api_client.py: `HEALTHGATE_URL`,
`HEALTHGATE_TOKEN`) and prints a readable table, or with `--json` exactly the JSON the API answered (for a list:
its page object). A host is named by its id or its name, a check by its id or its name on the host. Exit statuses:
0 done, 1 an API error (its problem's detail on stderr, one line) or no API, 2 bad usage, 3 `checks test` unhealthy.

`update` and `set-policy` read the current object, change the fields given as options and PUT the result (the
API's PUT replaces every field); `--from-json FILE` (or `-` for stdin) gives a whole body instead, options still
applying on top of it.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from services.api_client import ApiClient, ApiClientError, ApiError, api_path
from services.cli_output import (
    EXIT_UNHEALTHY,
    api_command,
    field_table,
    print_json,
    show,
    table,
)
from shared.group_policies import GroupPolicy, budget_limit

hosts_app = typer.Typer(help="Hosts: list, show, create, change and delete them (admin for changes).")
checks_app = typer.Typer(help="A host's health checks: list, show, add, change, delete and test them.")
jobs_app = typer.Typer(help="Jobs: list job hosts, show a job, decide a waiting host by hand, halt and resume.")
groups_app = typer.Typer(help="Groups: their hosts' states and their policies (disruption budget, verification).")


def register(app: typer.Typer) -> None:
    """Add `hosts`, `checks`, `jobs` and `groups` to the `healthgate` app."""
    for name, group in (("hosts", hosts_app), ("checks", checks_app), ("jobs", jobs_app), ("groups", groups_app)):
        group.info.no_args_is_help = True
        app.add_typer(group, name=name)


class NotFound(ApiClientError):
    """A host or check named on the command line is not among those the token sees."""


# ---- options shared by several commands ----------------------------------------------------------------------

JsonOutput = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer instead of a table.")]
Limit = Annotated[int | None, typer.Option(help="Items per page (the API's default: 50; 1-500).")]
Cursor = Annotated[str | None, typer.Option(help="The next_cursor of the previous page.")]
FromJson = Annotated[
    str | None,
    typer.Option("--from-json", metavar="FILE|-", help="A JSON body (a file, or - for stdin); options override it."),
]
HostRef = Annotated[str, typer.Argument(metavar="HOST", help="The host's id or name.")]
CheckRef = Annotated[str, typer.Argument(metavar="CHECK", help="The check's id or its name on the host.")]


def _job_id(value: str) -> str:
    # An empty id would make the path /api/v1/jobs/, which is the list's (and answers a redirect to it).
    if not value:
        raise typer.BadParameter("a job id is not empty", param_hint="JOB_ID")
    return value


JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id (any text, / included).", callback=_job_id)]
Reason = Annotated[str, typer.Option(help="Why, in your words (1-500 characters; audited).")]


def _client() -> ApiClient:
    return ApiClient.from_env()


def _read_json_body(source: str | None) -> dict[str, Any]:
    """The object in `source` (a file name, or `-` for stdin); {} without one. Bad JSON is bad usage (exit 2)."""
    if source is None:
        return {}
    try:
        # Bytes, decoded here: stdin's own decoding passes bytes that are not UTF-8 on as lone surrogates.
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {source}: {exc.strerror}", param_hint="--from-json") from None
    try:
        document = json.loads(data.decode("utf-8"))
        # JSON may escape a lone surrogate (\ud800), which no UTF-8 request body can carry.
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise typer.BadParameter(f"{source} is not UTF-8 text ({exc.reason})", param_hint="--from-json") from None
    except ValueError as exc:
        raise typer.BadParameter(f"{source} is not valid JSON: {exc}", param_hint="--from-json") from None
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{source} must hold a JSON object", param_hint="--from-json")
    return document


def _given(**fields: Any) -> dict[str, Any]:
    """The fields whose option was given (not None)."""
    return {name: value for name, value in fields.items() if value is not None}


def _require(body: dict[str, Any], *fields: tuple[str, str]) -> None:
    for field, option in fields:
        if body.get(field) in (None, ""):
            raise typer.BadParameter(f"missing: give {option} (or {field!r} in --from-json)", param_hint=option)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _host(client: ApiClient, ref: str) -> dict[str, Any]:
    """The host `ref` names: by id (GET /hosts/{id}), else by name (the first host of that name in the list)."""
    if _is_uuid(ref):
        try:
            host: dict[str, Any] = client.get(api_path("hosts", ref))
            return host
        except ApiError as exc:
            if exc.status != 404:
                raise
    try:
        named = client.get(api_path("hosts"), {"name": ref})["items"]
    except ApiError as exc:
        if exc.status != 422:  # not a possible host name (blank, too long): no host has it
            raise
        named = []
    if named:
        found: dict[str, Any] = named[0]
        return found
    raise NotFound(f"no host {ref!r} (by id or name) among the hosts this token sees")


def _check(client: ApiClient, host_id: str, ref: str) -> dict[str, Any]:
    """The check `ref` names on the host: by id, else by name."""
    if _is_uuid(ref):
        try:
            check: dict[str, Any] = client.get(api_path("hosts", host_id, "health-checks", ref))
            return check
        except ApiError as exc:
            if exc.status != 404:
                raise
    for item in client.get_page(api_path("hosts", host_id, "health-checks"))["items"]:
        if item["name"] == ref:
            return dict(item)
    raise NotFound(f"no check {ref!r} (by id or name) on this host")


def _page_footer(page: dict[str, Any]) -> None:
    cursor = page.get("next_cursor")
    if cursor:
        print(f"more: add --cursor {cursor}", file=sys.stderr)


# ---- hosts ---------------------------------------------------------------------------------------------------

HOST_FIELDS = (
    "id",
    "name",
    "group",
    "agent_url",
    "health_check_status",
    "checks_total",
    "checks_healthy",
    "in_maintenance",
    "maintenance_job_id",
    "created_at",
    "updated_at",
)


def _host_rows(items: list[dict[str, Any]]) -> Any:
    return table(
        [
            ("NAME", lambda h: h["name"]),
            ("GROUP", lambda h: h["group"]),
            ("STATUS", lambda h: h["health_check_status"]),
            ("CHECKS OK", lambda h: f"{h['checks_healthy']}/{h['checks_total']}"),
            ("MAINTENANCE", lambda h: h.get("maintenance_job_id") if h.get("in_maintenance") else None),
            ("AGENT URL", lambda h: h.get("agent_url")),
            ("ID", lambda h: h["id"]),
        ],
        items,
    )


class HostStatus(StrEnum):
    healthy = "healthy"
    degraded = "degraded"
    unhealthy = "unhealthy"
    unknown = "unknown"
    no_checks = "no_checks"


@hosts_app.command("list")
@api_command
def hosts_list(
    group: Annotated[str | None, typer.Option(help="Only hosts of this group.")] = None,
    status: Annotated[HostStatus | None, typer.Option(help="Only hosts in this state.")] = None,
    limit: Limit = None,
    cursor: Cursor = None,
    as_json: JsonOutput = False,
) -> None:
    """List hosts (one page, by name)."""
    with _client() as client:
        params = {"group": group, "health_check_status": status.value if status else None}
        page = client.get_page(api_path("hosts"), {**params, "limit": limit, "cursor": cursor})
    if as_json:
        print_json(page)
        return
    show([_host_rows(page["items"])])
    _page_footer(page)


@hosts_app.command("get")
@api_command
def hosts_get(host: HostRef, as_json: JsonOutput = False) -> None:
    """Show a host."""
    with _client() as client:
        found = _host(client, host)
    if as_json:
        print_json(found)
        return
    show([field_table(found, HOST_FIELDS)])


AgentUrl = Annotated[
    str | None, typer.Option("--agent-url", help="http(s) base URL of the host's agent (needed by service checks).")
]


@hosts_app.command("create")
@api_command
def hosts_create(
    name: Annotated[str | None, typer.Option(help="Unique name (1-255).")] = None,
    group: Annotated[str | None, typer.Option(help="The host's group (1-100).")] = None,
    agent_url: AgentUrl = None,
    host_id: Annotated[str | None, typer.Option("--id", help="Reuse another system's host id (a UUID).")] = None,
    from_json: FromJson = None,
    as_json: JsonOutput = False,
) -> None:
    """Create a host (admin)."""
    body = _read_json_body(from_json) | _given(name=name, group=group, agent_url=agent_url, id=host_id)
    _require(body, ("name", "--name"), ("group", "--group"))
    with _client() as client:
        created = client.post(api_path("hosts"), body)
    if as_json:
        print_json(created)
        return
    show([field_table(created, HOST_FIELDS)])


@hosts_app.command("update")
@api_command
def hosts_update(
    host: HostRef,
    name: Annotated[str | None, typer.Option(help="A new name.")] = None,
    group: Annotated[str | None, typer.Option(help="A new group.")] = None,
    agent_url: AgentUrl = None,
    no_agent_url: Annotated[bool, typer.Option("--no-agent-url", help="Clear the agent URL.")] = False,
    from_json: FromJson = None,
    as_json: JsonOutput = False,
) -> None:
    """Change a host (admin): the fields given; the others keep their values."""
    if agent_url is not None and no_agent_url:
        raise typer.BadParameter("give --agent-url or --no-agent-url, not both", param_hint="--no-agent-url")
    with _client() as client:
        current = _host(client, host)
        base = _read_json_body(from_json) or {key: current.get(key) for key in ("name", "group", "agent_url")}
        body = base | _given(name=name, group=group, agent_url=agent_url)
        if no_agent_url:
            body["agent_url"] = None
        updated = client.put(api_path("hosts", current["id"]), body)
    if as_json:
        print_json(updated)
        return
    show([field_table(updated, HOST_FIELDS)])


@hosts_app.command("delete")
@api_command
def hosts_delete(host: HostRef) -> None:
    """Delete a host with its checks and results (admin)."""
    with _client() as client:
        found = _host(client, host)
        client.delete(api_path("hosts", found["id"]))
    print(f"deleted host {found['name']} ({found['id']})", file=sys.stderr)


# ---- checks --------------------------------------------------------------------------------------------------

CHECK_FIELDS = (
    "id",
    "host_id",
    "name",
    "check_type",
    "status",
    "healthy_since",
    "uptime_24h",
    "enabled",
    "critical",
    "interval_seconds",
    "timeout_seconds",
    "failures_before_unhealthy",
    "successes_before_healthy",
    "max_latency_ms",
    "service_name",
    "url",
    "method",
    "expected_status",
    "expected_body",
    "ignore_cert_errors",
    "follow_redirects",
    "basic_auth_user",
    "basic_auth_pass_set",
    "condition",
    "min_cert_days",
    "dns_name",
    "record_type",
    "expected_values",
    "dns_server",
    "address",
    "port",
    "grpc_service",
    "tls",
    "last_result",
    "created_at",
    "updated_at",
)
# The fields every check type has (CONTRACT §3): they are kept when `update --type` changes the type.
COMMON_CHECK_FIELDS = (
    "name",
    "enabled",
    "critical",
    "interval_seconds",
    "timeout_seconds",
    "failures_before_unhealthy",
    "successes_before_healthy",
    "max_latency_ms",
)
RESULT_FIELDS = ("healthy", "reason", "status", "detail", "latency_ms", "checked_at", "cert_expires_at")


def check_target(check: dict[str, Any]) -> str:
    """What a check looks at, in a few words (a table's TARGET column)."""
    kind = check.get("check_type")
    if kind == "http":
        return f"{check.get('method', 'GET')} {check.get('url')} → {check.get('expected_status')}"
    if kind == "service":
        return f"unit {check.get('service_name')}"
    if kind == "dns":
        return f"{check.get('record_type', 'A')} {check.get('dns_name')}"
    if kind in ("tcp", "grpc"):
        address = check.get("address") or "(host name)"
        return f"{address}:{check.get('port')}"
    return ""


def _check_rows(items: list[dict[str, Any]]) -> Any:
    def uptime(check: dict[str, Any]) -> str | None:
        value = check.get("uptime_24h")
        return None if value is None else f"{value * 100:.1f}%"

    def last(check: dict[str, Any]) -> str | None:
        result = check.get("last_result")
        return None if result is None else f"{result['reason']}: {result['detail']}"

    return table(
        [
            ("NAME", lambda c: c["name"]),
            ("TYPE", lambda c: c["check_type"]),
            ("TARGET", check_target),
            ("STATUS", lambda c: c["status"] if c.get("enabled", True) else "disabled"),
            ("CRITICAL", lambda c: c.get("critical")),
            ("UPTIME 24H", uptime),
            ("LAST RESULT", last),
            ("ID", lambda c: c["id"]),
        ],
        items,
    )


class CheckType(StrEnum):
    service = "service"
    http = "http"
    tcp = "tcp"
    dns = "dns"
    grpc = "grpc"


class Method(StrEnum):
    GET = "GET"
    HEAD = "HEAD"


class RecordType(StrEnum):
    A = "A"
    AAAA = "AAAA"
    CNAME = "CNAME"
    MX = "MX"
    TXT = "TXT"
    NS = "NS"
    SRV = "SRV"


def _flag(name: str, off: str, text: str) -> Any:
    return typer.Option(f"--{name}/--{off}", help=text, show_default=False)


# The check fields of CONTRACT §3 as options (None: not given).
CheckName = Annotated[str | None, typer.Option(help="Name, unique on the host (1-100).")]
Type = Annotated[CheckType | None, typer.Option("--type", help="The check type (check_type).")]
Enabled = Annotated[bool | None, _flag("enabled", "disabled", "Run it (default: enabled).")]
Critical = Annotated[bool | None, _flag("critical", "non-critical", "Gates jobs (default: critical).")]
Interval = Annotated[int | None, typer.Option("--interval-seconds", "--interval", help="10-86400.")]
Timeout = Annotated[float | None, typer.Option("--timeout-seconds", "--timeout", help="Seconds to wait (0.1-60).")]
Failures = Annotated[int | None, typer.Option("--failures-before-unhealthy", help="1-10.")]
Successes = Annotated[int | None, typer.Option("--successes-before-healthy", help="1-10.")]
MaxLatency = Annotated[int | None, typer.Option("--max-latency-ms", help="1-60000: slower is unhealthy.")]
ServiceName = Annotated[str | None, typer.Option(help="service: the systemd unit.")]
Url = Annotated[str | None, typer.Option(help="http: the URL (no credentials in it).")]
MethodOption = Annotated[Method | None, typer.Option("--method", help="http: GET or HEAD.")]
ExpectedStatus = Annotated[str | None, typer.Option(help="http: 200, 2xx or a list such as 200,204.")]
ExpectedBody = Annotated[str | None, typer.Option(help="http: a substring the body must contain.")]
IgnoreCert = Annotated[
    bool | None, _flag("ignore-cert-errors", "verify-cert", "http, grpc: ignore TLS certificate errors.")
]
FollowRedirects = Annotated[bool | None, _flag("follow-redirects", "no-follow-redirects", "http: follow redirects.")]
BasicAuthUser = Annotated[str | None, typer.Option(help="http: basic auth user.")]
BasicAuthPassEnv = Annotated[
    str | None,
    typer.Option(
        "--basic-auth-pass-env",
        metavar="VARIABLE",
        help="http: read the basic auth password from this environment variable (kept off the command line).",
    ),
]
Condition = Annotated[str | None, typer.Option(help="http: a CEL expression that must be true as well.")]
MinCertDays = Annotated[int | None, typer.Option(help="http (https): days the certificate must stay valid.")]
Port = Annotated[int | None, typer.Option(help="tcp, grpc: the port.")]
Address = Annotated[str | None, typer.Option(help="tcp, grpc: host name or IP (default: the host's name).")]
DnsNameOption = Annotated[str | None, typer.Option("--dns-name", help="dns: the name to look up.")]
RecordTypeOption = Annotated[RecordType | None, typer.Option("--record-type", help="dns: the record type.")]
ExpectedValue = Annotated[
    list[str] | None, typer.Option("--expected-value", help="dns: a value that must be among the answers (repeat).")
]
DnsServer = Annotated[str | None, typer.Option(help="dns: ip or ip:port of the resolver to ask.")]
GrpcService = Annotated[str | None, typer.Option(help="grpc: the service asked for (default: the server).")]
Tls = Annotated[bool | None, _flag("tls", "no-tls", "grpc: connect with TLS.")]


def _check_body_options(**options: Any) -> dict[str, Any]:
    """The API's check fields from the options given."""
    names = {"interval_seconds": "interval", "timeout_seconds": "timeout"}
    fields = {field: options.pop(option) for field, option in names.items()}
    fields["failures_before_unhealthy"] = options.pop("failures")
    fields["successes_before_healthy"] = options.pop("successes")
    fields["max_latency_ms"] = options.pop("max_latency")
    fields["ignore_cert_errors"] = options.pop("ignore_cert")
    fields["expected_values"] = options.pop("expected_value") or None
    password_variable = options.pop("basic_auth_pass_env")
    body = _given(**fields, **options)
    for key, value in body.items():
        if isinstance(value, StrEnum):
            body[key] = value.value
    if password_variable is not None:
        if password_variable not in os.environ:
            raise typer.BadParameter(f"{password_variable} is not set", param_hint="--basic-auth-pass-env")
        body["basic_auth_pass"] = os.environ[password_variable]
    return body


def _show_check(check: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(check)
        return
    document = dict(check)
    result = document.get("last_result")
    if isinstance(result, dict):
        document["last_result"] = f"{'healthy' if result['healthy'] else 'unhealthy'}, {result['reason']}: " + str(
            result["detail"]
        )
    shown = [name for name in CHECK_FIELDS if name in document and (document[name] is not None or name in CHECK_CORE)]
    show([field_table(document, shown)])


# Shown even when null; other null fields (those of other check types, unset options) are left out of the table.
CHECK_CORE = {"status", "uptime_24h", "last_result", "healthy_since"}


@checks_app.command("list")
@api_command
def checks_list(host: HostRef, as_json: JsonOutput = False) -> None:
    """List a host's checks."""
    with _client() as client:
        found = _host(client, host)
        answer = client.get_page(api_path("hosts", found["id"], "health-checks"))
    if as_json:
        print_json(answer)
        return
    show([_check_rows(answer["items"])])


@checks_app.command("get")
@api_command
def checks_get(host: HostRef, check: CheckRef, as_json: JsonOutput = False) -> None:
    """Show a check with its last result."""
    with _client() as client:
        host_id = _host(client, host)["id"]
        found = _check(client, host_id, check)
        if not _is_uuid(check) or found["id"] != check:
            found = client.get(api_path("hosts", host_id, "health-checks", found["id"]))
    _show_check(found, as_json)


@checks_app.command("add")
@api_command
def checks_add(
    host: HostRef,
    name: CheckName = None,
    check_type: Type = None,
    enabled: Enabled = None,
    critical: Critical = None,
    interval: Interval = None,
    timeout: Timeout = None,
    failures: Failures = None,
    successes: Successes = None,
    max_latency: MaxLatency = None,
    service_name: ServiceName = None,
    url: Url = None,
    method: MethodOption = None,
    expected_status: ExpectedStatus = None,
    expected_body: ExpectedBody = None,
    ignore_cert: IgnoreCert = None,
    follow_redirects: FollowRedirects = None,
    basic_auth_user: BasicAuthUser = None,
    basic_auth_pass_env: BasicAuthPassEnv = None,
    condition: Condition = None,
    min_cert_days: MinCertDays = None,
    port: Port = None,
    address: Address = None,
    dns_name: DnsNameOption = None,
    record_type: RecordTypeOption = None,
    expected_value: ExpectedValue = None,
    dns_server: DnsServer = None,
    grpc_service: GrpcService = None,
    tls: Tls = None,
    from_json: FromJson = None,
    as_json: JsonOutput = False,
) -> None:
    """Add a check to a host (admin, operator); e.g. --name homepage --type http --url http://web-1/."""
    options = dict(locals())
    for key in ("host", "from_json", "as_json"):
        options.pop(key)
    body = _read_json_body(from_json) | _check_body_options(**options)
    _require(body, ("name", "--name"), ("check_type", "--type"))
    with _client() as client:
        host_id = _host(client, host)["id"]
        created = client.post(api_path("hosts", host_id, "health-checks"), body)
    _show_check(created, as_json)


@checks_app.command("update")
@api_command
def checks_update(
    host: HostRef,
    check: CheckRef,
    name: CheckName = None,
    check_type: Type = None,
    enabled: Enabled = None,
    critical: Critical = None,
    interval: Interval = None,
    timeout: Timeout = None,
    failures: Failures = None,
    successes: Successes = None,
    max_latency: MaxLatency = None,
    service_name: ServiceName = None,
    url: Url = None,
    method: MethodOption = None,
    expected_status: ExpectedStatus = None,
    expected_body: ExpectedBody = None,
    ignore_cert: IgnoreCert = None,
    follow_redirects: FollowRedirects = None,
    basic_auth_user: BasicAuthUser = None,
    basic_auth_pass_env: BasicAuthPassEnv = None,
    clear_basic_auth_pass: Annotated[
        bool, typer.Option("--clear-basic-auth-pass", help="http: remove the stored password.")
    ] = False,
    condition: Condition = None,
    min_cert_days: MinCertDays = None,
    port: Port = None,
    address: Address = None,
    dns_name: DnsNameOption = None,
    record_type: RecordTypeOption = None,
    expected_value: ExpectedValue = None,
    dns_server: DnsServer = None,
    grpc_service: GrpcService = None,
    tls: Tls = None,
    from_json: FromJson = None,
    as_json: JsonOutput = False,
) -> None:
    """Change a check (admin, operator): the fields given; the others keep their values (a stored password too)."""
    options = dict(locals())
    for key in ("host", "check", "from_json", "as_json", "clear_basic_auth_pass"):
        options.pop(key)
    changes = _check_body_options(**options)
    with _client() as client:
        host_id = _host(client, host)["id"]
        current = _check(client, host_id, check)
        base = _read_json_body(from_json)
        if not base:
            # What GET shows: the API ignores its read-only fields on PUT, and omitted basic_auth_pass = keep.
            base = {key: value for key, value in current.items() if key not in ("basic_auth_pass_set",)}
            if changes.get("check_type", current["check_type"]) != current["check_type"]:
                base = {key: base[key] for key in COMMON_CHECK_FIELDS if key in base}
        body = base | changes
        if clear_basic_auth_pass:
            body["basic_auth_pass"] = None
        updated = client.put(api_path("hosts", host_id, "health-checks", current["id"]), body)
    _show_check(updated, as_json)


@checks_app.command("delete")
@api_command
def checks_delete(host: HostRef, check: CheckRef) -> None:
    """Delete a check and its results (admin, operator)."""
    with _client() as client:
        host_id = _host(client, host)["id"]
        found = _check(client, host_id, check)
        client.delete(api_path("hosts", host_id, "health-checks", found["id"]))
    print(f"deleted check {found['name']} ({found['id']})", file=sys.stderr)


@checks_app.command("test")
@api_command
def checks_test(host: HostRef, check: CheckRef, as_json: JsonOutput = False) -> None:
    """Run a check now (by a poller) and show the result: exit 0 when healthy, 3 when not."""
    with _client() as client:
        host_id = _host(client, host)["id"]
        found = _check(client, host_id, check)
        result = client.post(api_path("hosts", host_id, "health-checks", found["id"], "test"))
    if as_json:
        print_json(result)
    else:
        show([field_table(result, RESULT_FIELDS)])
    if not result.get("healthy"):
        raise typer.Exit(EXIT_UNHEALTHY)


# ---- jobs ----------------------------------------------------------------------------------------------------

JOB_HOST_COLUMNS: list[tuple[str, Any]] = [
    ("STATUS", lambda j: j["status"]),
    ("WAITING FOR", lambda j: j.get("waiting_for") or None),
    ("RECEIVED", lambda j: j.get("received_at")),
    ("DECIDED", lambda j: j.get("decided_at")),
    ("WINDOW ENDS", lambda j: j.get("window_ends_at")),
    ("DETAIL", lambda j: j.get("detail")),
]


class JobStatus(StrEnum):
    waiting_health_check = "waiting_health_check"
    released = "released"
    failed = "failed"
    cancelled = "cancelled"
    verifying = "verifying"
    verified = "verified"
    verification_failed = "verification_failed"


def _host_names(client: ApiClient, host_ids: set[str]) -> dict[str, str]:
    """Each host id's name, for tables (ids the token cannot see, or that are gone, stay ids)."""
    names = {}
    for host_id in host_ids:
        try:
            names[host_id] = client.get(api_path("hosts", host_id))["name"]
        except ApiError:
            names[host_id] = host_id
    return names


@jobs_app.command("list")
@api_command
def jobs_list(
    status: Annotated[JobStatus | None, typer.Option(help="Only job hosts in this state.")] = None,
    host: Annotated[str | None, typer.Option(help="Only this host's job hosts (id or name).")] = None,
    limit: Limit = None,
    cursor: Cursor = None,
    as_json: JsonOutput = False,
) -> None:
    """List job hosts, newest first (one page)."""
    with _client() as client:
        host_id = (host if _is_uuid(host) else _host(client, host)["id"]) if host else None
        params = {"status": status.value if status else None, "host_id": host_id, "limit": limit, "cursor": cursor}
        page = client.get_page(api_path("jobs"), params)
        names = {} if as_json else _host_names(client, {item["host_id"] for item in page["items"]})
    if as_json:
        print_json(page)
        return
    columns = [("JOB", lambda j: j["job_id"]), ("HOST", lambda j: names.get(j["host_id"])), *JOB_HOST_COLUMNS]
    show([table(columns, page["items"])])
    _page_footer(page)


def _show_job(client: ApiClient, job: dict[str, Any]) -> None:
    names = _host_names(client, {item["host_id"] for item in job["hosts"]})
    header = field_table(job, ("job_id", "max_failed_hosts", "halted", "halted_at", "halt_reason"))
    hosts = table([("HOST", lambda j: names.get(j["host_id"])), *JOB_HOST_COLUMNS], job["hosts"])
    show([header, "", hosts])


@jobs_app.command("get")
@api_command
def jobs_get(job_id: JobId, as_json: JsonOutput = False) -> None:
    """Show a job and its hosts."""
    with _client() as client:
        job = client.get(api_path("jobs", job_id))
        if as_json:
            print_json(job)
            return
        _show_job(client, job)


class Decision(StrEnum):
    release = "release"
    fail = "fail"


@jobs_app.command("override")
@api_command
def jobs_override(
    job_id: JobId,
    host: HostRef,
    decision: Annotated[Decision, typer.Option(help="Release the waiting host, or fail it.")],
    reason: Reason,
    as_json: JsonOutput = False,
) -> None:
    """Decide a waiting job host by hand (admin)."""
    with _client() as client:
        host_id = host if _is_uuid(host) else _host(client, host)["id"]
        answer = client.post(
            api_path("jobs", job_id, "hosts", host_id, "override"), {"decision": decision.value, "reason": reason}
        )
    if as_json:
        print_json(answer)
        return
    show([field_table(answer)])


def _halt_or_resume(action: str, job_id: str, reason: str, as_json: bool) -> None:
    with _client() as client:
        job = client.post(api_path("jobs", job_id, action), {"reason": reason})
        if as_json:
            print_json(job)
            return
        _show_job(client, job)


@jobs_app.command("halt")
@api_command
def jobs_halt(job_id: JobId, reason: Reason, as_json: JsonOutput = False) -> None:
    """Halt a job (admin): its waiting hosts fail and later job.starts fail at once."""
    _halt_or_resume("halt", job_id, reason, as_json)


@jobs_app.command("resume")
@api_command
def jobs_resume(job_id: JobId, reason: Reason, as_json: JsonOutput = False) -> None:
    """Resume a halted job (admin)."""
    _halt_or_resume("resume", job_id, reason, as_json)


# ---- groups --------------------------------------------------------------------------------------------------

POLICY_FIELDS = (
    "stable_seconds",
    "release_cutoff_seconds",
    "no_checks",
    "max_unavailable",
    "verify_delay_seconds",
    "verify_timeout_seconds",
)


@groups_app.command("list")
@api_command
def groups_list(limit: Limit = None, cursor: Cursor = None, as_json: JsonOutput = False) -> None:
    """List groups with their hosts' states and disruption budget (one page)."""
    with _client() as client:
        page = client.get_page(api_path("groups"), {"limit": limit, "cursor": cursor})
    if as_json:
        print_json(page)
        return

    def budget(group: dict[str, Any]) -> str:
        # A share is shown as the hosts it allows now (CONTRACT §6): "0 of 10%" left the reader to do the sum.
        limit, in_use, total = group["policy"].get("max_unavailable"), group["budget_in_use"], group.get("hosts_total")
        if limit is None:
            return f"{in_use} (no limit)"
        try:
            allowed = budget_limit(GroupPolicy(max_unavailable=limit), total if isinstance(total, int) else 0)
        except ValidationError:
            return f"{in_use} of {limit}"  # not a budget this CLI knows: shown as the API gave it
        if isinstance(limit, str) and not isinstance(total, int):
            return f"{in_use} of {limit}"
        if isinstance(limit, str):
            return f"{in_use} of {allowed} ({limit} of {total} host{'' if total == 1 else 's'})"
        return f"{in_use} of {allowed}"

    columns: list[tuple[str, Any]] = [
        ("GROUP", lambda g: g["group"]),
        ("HOSTS", lambda g: g["hosts_total"]),
        ("UNHEALTHY", lambda g: g["hosts_unhealthy"]),
        ("IN MAINTENANCE", lambda g: g["hosts_in_maintenance"]),
        ("BUDGET IN USE", budget),
    ]
    show([table(columns, page["items"])])
    _page_footer(page)


@groups_app.command("get-policy")
@api_command
def groups_get_policy(group: Annotated[str, typer.Argument(help="The group.")], as_json: JsonOutput = False) -> None:
    """Show a group's policy (the defaults when it has none)."""
    with _client() as client:
        policy = client.get(api_path("groups", group, "policy"))
    if as_json:
        print_json(policy)
        return
    show([field_table(policy, POLICY_FIELDS)])


class NoChecks(StrEnum):
    release = "release"
    fail = "fail"


def _max_unavailable(value: str | None) -> str | int | None:
    """`none` → null (no limit), a number → int, `N%` stays text (the API checks the range)."""
    if value is None:
        return None
    if value.strip().lower() in ("none", "null", ""):
        return "none"
    if value.strip().isdigit():
        return int(value)
    return value


@groups_app.command("set-policy")
@api_command
def groups_set_policy(
    group: Annotated[str, typer.Argument(help="The group (it need not have hosts yet).")],
    stable_seconds: Annotated[int | None, typer.Option(help="Healthy this long before a release (0-86400).")] = None,
    release_cutoff_seconds: Annotated[
        int | None, typer.Option(help="No release later than this before the window ends (0-86400).")
    ] = None,
    no_checks: Annotated[
        NoChecks | None, typer.Option("--no-checks", help="A host without gating checks: release or fail.")
    ] = None,
    max_unavailable: Annotated[
        str | None,
        typer.Option(help="Disruption budget: a number ≥ 1, a share such as 25%, or none (no limit)."),
    ] = None,
    verify_delay_seconds: Annotated[int | None, typer.Option(help="Wait before verifying (0-3600).")] = None,
    verify_timeout_seconds: Annotated[int | None, typer.Option(help="Time to become healthy (10-86400).")] = None,
    from_json: FromJson = None,
    as_json: JsonOutput = False,
) -> None:
    """Change a group's policy (admin): the fields given; the others keep their values."""
    changes: dict[str, Any] = _given(
        stable_seconds=stable_seconds,
        release_cutoff_seconds=release_cutoff_seconds,
        no_checks=no_checks.value if no_checks else None,
        max_unavailable=_max_unavailable(max_unavailable),
        verify_delay_seconds=verify_delay_seconds,
        verify_timeout_seconds=verify_timeout_seconds,
    )
    if changes.get("max_unavailable") == "none":
        changes["max_unavailable"] = None
    with _client() as client:
        base = _read_json_body(from_json)
        if not base:
            try:
                base = client.get(api_path("groups", group, "policy"))
            except ApiError as exc:
                if exc.status != 404:  # a group no host or policy names yet: start from the defaults
                    raise
                base = {}
        policy = client.put(api_path("groups", group, "policy"), base | changes)
    if as_json:
        print_json(policy)
        return
    show([field_table(policy, POLICY_FIELDS)])
