"""The audit log: one entry per change of hosts, checks, tokens and job overrides. Secrets redacted."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from services.api.context import context_of
from services.api.problems import field_errors
from services.api.requests import PageQuery, decode_cursor, encode_cursor, json_response, read_query
from services.api.schemas import AuditEntry, Page

if TYPE_CHECKING:
    from services.api.auth import Principal

SECRET_FIELDS = frozenset({"basic_auth_pass"})
SECRET_MARK = "<changed>"


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values with every secret replaced by a mark, whatever its value."""
    return {key: SECRET_MARK if key in SECRET_FIELDS else value for key, value in values.items()}


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """`{field: {"from": old, "to": new}}` for changed fields; a changed secret is only marked."""
    changes: dict[str, Any] = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        changes[key] = SECRET_MARK if key in SECRET_FIELDS else {"from": old, "to": new}
    return changes


async def record_audit(
    connection: asyncpg.Connection,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    changes: Mapping[str, Any],
    host_id: uuid.UUID | None = None,
) -> None:
    await connection.execute(
        """
        INSERT INTO audit_log (actor, action, entity_type, entity_id, host_id, changes)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb)
        """,
        actor,
        action,
        entity_type,
        entity_id,
        host_id,
        json.dumps(redact(changes), default=str),
    )


async def fetch_audit_page(
    connection: asyncpg.Connection, *, limit: int, before_id: int | None
) -> list[asyncpg.Record]:
    return await connection.fetch(
        """
        SELECT id, at, actor, action, entity_type, entity_id, host_id, changes
        FROM audit_log
        WHERE $1::bigint IS NULL OR id < $1
        ORDER BY id DESC
        LIMIT $2
        """,
        before_id,
        limit,
    )


async def list_audit(request: Request, principal: Principal) -> Response:
    query = read_query(request, PageQuery)
    before_id = None
    if query.cursor is not None:
        (before_id,) = decode_cursor(query.cursor, 1)
        if not isinstance(before_id, int):
            raise field_errors([{"field": "query.cursor", "message": "not a cursor this list returned"}])
    async with context_of(request).pool.acquire() as connection:
        rows = await fetch_audit_page(connection, limit=query.limit + 1, before_id=before_id)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    items = [AuditEntry.model_validate(dict(row) | {"changes": json.loads(row["changes"])}) for row in rows]
    return json_response(Page[AuditEntry](items=items, next_cursor=encode_cursor(rows[-1]["id"]) if more else None))
