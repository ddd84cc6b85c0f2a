"""Groups and their patch-campaign policies: `/api/v1/groups` and `/api/v1/groups/{group}/policy` (CONTRACT §6
"Group policies"). Policies are read and written through their owner, shared/group_policies.py, which also reads
the groups' host counts; the audit entry is written in the policy's transaction."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import context_of
from services.api.problems import field_errors, not_found, validation_problem
from services.api.requests import Keyset, PageQuery, json_response, path_text, read_json, read_query, text_key
from services.api.schemas import GroupName, GroupView, Page
from shared import group_policies
from shared.audit import diff, record_audit
from shared.group_policies import GroupPolicy

# Groups page by name (unique); the cursor holds the last name.
GROUP_PAGES: Keyset[str] = Keyset(1, text_key, lambda row: (row["group"],))
_GROUP_NAME: TypeAdapter[str] = TypeAdapter(GroupName)


def shown(policy: GroupPolicy) -> GroupPolicy:
    """The policy with every field set, so that the answer (written without unset fields, `json_response`) shows
    each one, defaults included."""
    return GroupPolicy.model_validate(policy.model_dump())


async def list_groups(request: Request, principal: Principal) -> Response:
    """The caller's groups by name, each with its host counts, budget in use and policy (defaults without one)."""
    query = read_query(request, PageQuery)
    pool = context_of(request).pool
    rows = await group_policies.group_page(
        pool, groups=principal.visible_groups(), after=GROUP_PAGES.after(query.cursor),
        limit=GROUP_PAGES.rows_to_fetch(query.limit),
    )  # fmt: skip
    rows, next_cursor = GROUP_PAGES.page(rows, query.limit)
    policies = await group_policies.policies_of(pool, [row["group"] for row in rows])
    items = [GroupView.model_validate(dict(row) | {"policy": shown(policies[row["group"]])}) for row in rows]
    return json_response(Page[GroupView](items=items, next_cursor=next_cursor))


async def get_policy(request: Request, principal: Principal) -> Response:
    """A group's policy; the defaults when it has hosts but no policy. 404 outside the caller's groups (the
    endpoint's guard) and for a group that does not exist."""
    group = path_text(request, "group")
    pool = context_of(request).pool
    if not await group_policies.group_exists(pool, group):
        raise not_found("group")
    return json_response(shown(await group_policies.policy_of(pool, group)))


async def put_policy(request: Request, principal: Principal) -> Response:
    """Replace a group's policy (omitted fields take their defaults), audited `group.policy_update` with the
    fields that changed. Allowed before the group has hosts: the policy makes the group exist. One 422 lists
    the problems of the path's group name and of the body together."""
    group = path_text(request, "group")
    document = await read_json(request)
    errors: list[dict[str, str]] = []
    try:
        _GROUP_NAME.validate_python(group)
    except ValidationError as exc:
        errors += [error | {"field": "path.group"} for error in validation_problem(exc).errors or []]
    policy: GroupPolicy | None = None
    try:
        policy = GroupPolicy.model_validate(document)
    except ValidationError as exc:
        errors += validation_problem(exc).errors or []
    if errors or policy is None:
        raise field_errors(errors)
    async with context_of(request).pool.acquire() as connection, connection.transaction():
        # Under the group's lock, so that of two PUTs racing the second audits the first's values as "from".
        await group_policies.lock_group(connection, group)
        existed = await group_policies.has_policy(connection, group)
        before = (await group_policies.policy_of(connection, group)).model_dump()
        stored = await group_policies.put_policy(connection, group, policy)
        after = stored.model_dump()
        changes = diff(before, after)
        if not existed:
            # A group's first policy records every field, from the defaults it had until now.
            changes = {name: {"from": before[name], "to": value} for name, value in after.items()}
        await record_audit(
            connection, actor=principal.name, action="group.policy_update", entity_type="group", entity_id=group,
            changes=changes,
        )  # fmt: skip
    return json_response(shown(stored))
