"""`GET /api/v1/audit`: the audit log, newest first. Entries are written by shared/audit.py."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import context_of
from services.api.problems import field_errors
from services.api.requests import PageQuery, decode_cursor, encode_cursor, json_response, read_query
from services.api.schemas import AuditEntry, Page
from shared.audit import audit_page


async def list_audit(request: Request, principal: Principal) -> Response:
    query = read_query(request, PageQuery)
    before_id = None
    if query.cursor is not None:
        (before_id,) = decode_cursor(query.cursor, 1)
        if not isinstance(before_id, int):
            raise field_errors([{"field": "query.cursor", "message": "not a cursor this list returned"}])
    async with context_of(request).pool.acquire() as connection:
        rows = await audit_page(connection, limit=query.limit + 1, before_id=before_id)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    items = [AuditEntry.model_validate(dict(row) | {"changes": json.loads(row["changes"])}) for row in rows]
    return json_response(Page[AuditEntry](items=items, next_cursor=encode_cursor(rows[-1]["id"]) if more else None))
