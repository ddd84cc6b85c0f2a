"""Every endpoint of the API, in one explicit list."""

from __future__ import annotations

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from services.api import audit, checks, groups, host_batches, hosts, jobs, notifications, preview
from services.api.auth import Principal
from services.api.endpoints import ADMIN, ALL_ROLES, CHECK_EDITORS, Endpoint
from services.api.requests import PageQuery, json_response
from services.api.schemas import (
    AuditEntry,
    ChannelTestAnswer,
    ChannelView,
    ChannelWrite,
    CheckWrite,
    DeliveryView,
    GroupView,
    HaltRequest,
    HostBatchCreate,
    HostCreate,
    HostView,
    HostWrite,
    ItemList,
    JobHostView,
    JobListItem,
    JobView,
    OverrideRequest,
    Page,
    PreviewAnswer,
    PreviewRequest,
    ResultView,
)
from shared.events import CheckView
from shared.group_policies import GroupPolicy


class Caller(BaseModel):
    name: str
    role: str
    groups: list[str]


async def who_am_i(request: Request, principal: Principal) -> Response:
    return json_response(Caller(name=principal.name, role=principal.role, groups=list(principal.groups)))


HOST = "/api/v1/hosts/{host_id}"
CHECK = HOST + "/health-checks/{check_id}"
# A job id is one percent-encoded path segment, whatever it holds (`/` as `%2F`): see services/api/paths.py.
JOB = "/api/v1/jobs/{job_id}"
# A group name is one percent-encoded path segment too (`/` as `%2F`).
GROUP_POLICY = "/api/v1/groups/{group}/policy"
CHANNELS = "/api/v1/notification-channels"
CHANNEL = CHANNELS + "/{channel_id}"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/api/v1/me", who_am_i, "Show the calling token", ALL_ROLES, "tokens", response=Caller),
    Endpoint(
        "POST",
        "/api/v1/hosts",
        hosts.create_host,
        "Create a host",
        ADMIN,
        "hosts",
        body=HostCreate,
        response=HostView,
        status_code=201,
        errors=(400, 409, 413, 422),
    ),
    Endpoint(
        "POST",
        "/api/v1/hosts:batchCreate",
        host_batches.batch_create_hosts,
        "Create hosts with their checks",
        ADMIN,
        "hosts",
        body=HostBatchCreate,
        response=ItemList[HostView],
        status_code=201,
        errors=(400, 409, 413, 422),
        description="Up to 100 hosts, each with up to 5 checks, created in one transaction: all or none (AIP-233). "
        "What is written is what POST /api/v1/hosts and POST .../health-checks write one by one (audit entries, "
        "`check.config.created` events); a problem is named as `hosts[i].checks[j].field`. `healthgate apply` "
        "creates new hosts through it.",
    ),
    Endpoint(
        "GET",
        "/api/v1/hosts",
        hosts.list_hosts,
        "List hosts",
        ALL_ROLES,
        "hosts",
        query=hosts.HostListQuery,
        response=Page[HostView],
        errors=(422,),
    ),
    Endpoint("GET", HOST, hosts.get_host, "Show a host", ALL_ROLES, "hosts", response=HostView, errors=(404, 422)),
    Endpoint(
        "PUT",
        HOST,
        hosts.update_host,
        "Update a host",
        ADMIN,
        "hosts",
        body=HostWrite,
        response=HostView,
        errors=(400, 404, 409, 413, 422),
    ),
    Endpoint(
        "DELETE",
        HOST,
        hosts.delete_host,
        "Delete a host",
        ADMIN,
        "hosts",
        status_code=204,
        errors=(404, 422),
        description="Deletes its checks and their results too.",
    ),
    Endpoint(
        "GET",
        "/api/v1/health-checks",
        checks.list_all_checks,
        "List every check",
        ALL_ROLES,
        "checks",
        query=checks.CheckListQuery,
        response=Page[CheckView],
        errors=(422,),
        description="Every check of the caller's hosts (scoped by group), by id; `group` narrows to one group. "
        "Reads a whole fleet's checks in a few pages (`healthgate apply`, `healthgate export`).",
    ),
    Endpoint(
        "GET",
        HOST + "/health-checks",
        checks.list_checks,
        "List a host's checks",
        ALL_ROLES,
        "checks",
        response=ItemList[CheckView],
        errors=(404, 422),
    ),
    Endpoint(
        "POST",
        HOST + "/health-checks",
        checks.create_check,
        "Create a check",
        CHECK_EDITORS,
        "checks",
        body=CheckWrite,
        response=CheckView,
        status_code=201,
        errors=(400, 404, 409, 413, 422),
        description="At most 5 checks per host; a service check needs the host's agent_url.",
    ),
    Endpoint(
        "GET", CHECK, checks.get_check, "Show a check", ALL_ROLES, "checks", response=CheckView, errors=(404, 422)
    ),
    Endpoint(
        "PUT",
        CHECK,
        checks.update_check,
        "Update a check",
        CHECK_EDITORS,
        "checks",
        body=CheckWrite,
        response=CheckView,
        errors=(400, 404, 409, 413, 422),
        description=(
            "Replaces every writable field; basic_auth_pass omitted keeps it, null clears it. A stored password"
            " needs basic_auth_user: an http check's PUT without the user answers 422 naming basic_auth_user"
            " unless it sends basic_auth_pass: null. Changing check_type away from http clears the password."
        ),
    ),
    Endpoint(
        "DELETE",
        CHECK,
        checks.delete_check,
        "Delete a check",
        CHECK_EDITORS,
        "checks",
        status_code=204,
        errors=(404, 422),
    ),
    Endpoint(
        "POST",
        CHECK + "/test",
        checks.test_check,
        "Run a check now",
        CHECK_EDITORS,
        "checks",
        response=ResultView,
        errors=(404, 422, 503, 504),
        description="A poller runs the check now; the result is stored and published like any other.",
    ),
    Endpoint(
        "GET",
        CHECK + "/results",
        checks.list_results,
        "List a check's results",
        ALL_ROLES,
        "checks",
        query=checks.ResultListQuery,
        response=Page[ResultView],
        errors=(404, 422),
        description="Newest first.",
    ),
    Endpoint(
        "GET",
        "/api/v1/jobs",
        jobs.list_jobs,
        "List job hosts",
        ALL_ROLES,
        "jobs",
        query=jobs.JobListQuery,
        response=Page[JobListItem],
        errors=(422,),
        description="Newest first, scoped by the hosts' groups; `status` and `host_id` filter (both: AND). "
        "The `next_cursor` continues the same filtered list: send the filters again with it.",
    ),
    Endpoint(
        "GET",
        JOB,
        jobs.get_job,
        "Show a job",
        ALL_ROLES,
        "jobs",
        response=JobView,
        errors=(404, 422),
        description="Scoped: only the job's hosts in the caller's groups; 404 when there is none.",
    ),
    Endpoint(
        "POST",
        JOB + "/hosts/{host_id}/override",
        jobs.override_job,
        "Decide a waiting job by hand",
        ADMIN,
        "jobs",
        body=OverrideRequest,
        response=JobHostView,
        errors=(400, 404, 409, 413, 422),
    ),
    *(
        Endpoint(
            "POST",
            JOB + "/" + action,
            handler,
            summary,
            ADMIN,
            "jobs",
            body=HaltRequest,
            response=JobView,
            errors=(400, 403, 404, 409, 413, 422),
            description="404 when none of the job's hosts is in the caller's groups, 403 for a non-admin who sees"
            " it; audited job." + action + ". " + effect,
        )
        for action, handler, summary, effect in (
            (
                "halt",
                jobs.halt_job,
                "Halt a job",
                "Its waiting hosts fail with reason job_halted and later job.starts fail at once; job.halted (reason"
                " manual) is published. 409 when the job is already halted.",
            ),
            (
                "resume",
                jobs.resume_job,
                "Resume a halted job",
                "New job.starts are gated again; hosts that failed stay failed; job.resumed is published. 409 when the"
                " job is not halted.",
            ),
        )
    ),
    Endpoint(
        "GET",
        "/api/v1/groups",
        groups.list_groups,
        "List groups",
        ALL_ROLES,
        "groups",
        query=PageQuery,
        response=Page[GroupView],
        errors=(422,),
        description="The caller's groups by name: every group a host or a policy names, with its host counts, "
        "disruption budget in use (hosts in maintenance or unhealthy, each once) and policy (the defaults "
        "without one).",
    ),
    Endpoint(
        "GET",
        GROUP_POLICY,
        groups.get_policy,
        "Show a group's policy",
        ALL_ROLES,
        "groups",
        response=GroupPolicy,
        errors=(404, 422),
        description="The defaults when the group has hosts but no policy; 404 for a group outside the caller's "
        "groups or one that no host or policy names.",
    ),
    Endpoint(
        "PUT",
        GROUP_POLICY,
        groups.put_policy,
        "Replace a group's policy",
        ADMIN,
        "groups",
        body=GroupPolicy,
        response=GroupPolicy,
        errors=(400, 404, 413, 422),
        description="Replaces every field (omitted ones take their defaults); allowed before the group has "
        'hosts. `max_unavailable`: null (no limit), an integer ≥ 1, or "N%" (1-100) of the group\'s hosts, '
        "rounded down, at least 1. Audited as group.policy_update.",
    ),
    Endpoint(
        "POST",
        "/api/v1/gate/preview",
        preview.gate_preview,
        "Preview the gate's verdicts",
        ALL_ROLES,
        "jobs",
        body=PreviewRequest,
        response=PreviewAnswer,
        errors=(400, 413, 422),
        description="What a job.start for each host would get at `at` (default now) under the current checks, "
        "group policies and disruption budgets, judged by the gate's own rules: `release`, `wait` (with "
        "`waiting_for`) or `fail` (the detail says why). The hosts are counted against their groups' budgets in "
        "the order given, after the job hosts already waiting there. Creates nothing and publishes nothing. A "
        "preview has no window (none closes it) and no job (never halted). A host outside the caller's groups is "
        "answered as one healthgate does not know (HEALTHGATE_GATE_UNKNOWN_HOST). A host id given twice → 422.",
    ),
    Endpoint(
        "GET",
        "/api/v1/audit",
        audit.list_audit,
        "List the audit log",
        ADMIN,
        "audit",
        query=PageQuery,
        response=Page[AuditEntry],
        errors=(422,),
        description="Newest first.",
    ),
    Endpoint(
        "POST",
        CHANNELS,
        notifications.create_channel,
        "Create a notification channel",
        ADMIN,
        "notifications",
        body=ChannelWrite,
        response=ChannelView,
        status_code=201,
        errors=(400, 409, 413, 422),
        description="A webhook channel without a secret gets a generated one, returned in this answer only (as "
        "`secret`): keep it to verify signatures, it is never shown again. Audited as notification_channel.create.",
    ),
    Endpoint(
        "GET",
        CHANNELS,
        notifications.list_channels,
        "List notification channels",
        ADMIN,
        "notifications",
        query=PageQuery,
        response=Page[ChannelView],
        errors=(422,),
        description="By name.",
    ),
    Endpoint(
        "GET",
        CHANNEL,
        notifications.get_channel,
        "Show a notification channel",
        ADMIN,
        "notifications",
        response=ChannelView,
        errors=(404, 422),
    ),
    Endpoint(
        "PUT",
        CHANNEL,
        notifications.update_channel,
        "Update a notification channel",
        ADMIN,
        "notifications",
        body=ChannelWrite,
        response=ChannelView,
        errors=(400, 404, 409, 413, 422),
        description="Replaces every writable field (omitted ones take their defaults) except `secret`: omitted "
        "keeps the stored one, null → 422. A channel made a webhook without a stored secret gets a generated one, "
        "returned in this answer only; a channel made slack loses its secret. Audited as "
        "notification_channel.update.",
    ),
    Endpoint(
        "DELETE",
        CHANNEL,
        notifications.delete_channel,
        "Delete a notification channel",
        ADMIN,
        "notifications",
        status_code=204,
        errors=(404, 422),
        description="Its delivery records go with it. Audited as notification_channel.delete.",
    ),
    Endpoint(
        "POST",
        CHANNEL + "/test",
        notifications.test_channel,
        "Send a test notification",
        ADMIN,
        "notifications",
        response=ChannelTestAnswer,
        errors=(404, 409, 422),
        description="Sends a healthgate.test event to the channel now (once, no retry; enabled or not) and answers "
        "what the receiver did. Recorded as one of the channel's deliveries; audited as notification_channel.test.",
    ),
    Endpoint(
        "GET",
        CHANNEL + "/deliveries",
        notifications.list_deliveries,
        "List a notification channel's deliveries",
        ADMIN,
        "notifications",
        query=PageQuery,
        response=Page[DeliveryView],
        errors=(404, 422),
        description="Newest first: one per event delivered to the channel (pending, delivered or failed) and per test.",
    ),
)
