"""`GET /api/v1/audit`: the audit log, newest first. Entries are written by shared/audit.py."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import context_of
from services.api.requests import Keyset, PageQuery, json_response, read_query
from services.api.schemas import AuditEntry, Page
from shared.audit import audit_page


def _entry_id(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError("an audit cursor holds an entry id")
    return value


# The log pages newest first by id; the cursor holds the last entry's.
AUDIT_PAGES: Keyset[int] = Keyset(1, _entry_id, lambda row: (row["id"],))


async def list_audit(request: Request, principal: Principal) -> Response:
    query = read_query(request, PageQuery)
    before_id = AUDIT_PAGES.after(query.cursor)
    async with context_of(request).pool.acquire() as connection:
        rows = await audit_page(connection, limit=AUDIT_PAGES.rows_to_fetch(query.limit), before_id=before_id)
    rows, next_cursor = AUDIT_PAGES.page(rows, query.limit)
    items = [AuditEntry.model_validate(dict(row) | {"changes": json.loads(row["changes"])}) for row in rows]
    return json_response(Page[AuditEntry](items=items, next_cursor=next_cursor))
