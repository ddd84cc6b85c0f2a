"""`audit_log`: one entry per change of hosts, checks, tokens, notification channels and job overrides, never
pruned. This module is the only one that writes the table (docs/architecture.md, "Who writes which table").

Every entry is written in the transaction of the change it records (`record_audit`), so an entry exists
exactly when its change does. Secrets never reach it: a check's `basic_auth_pass` and a notification channel's
`secret` are only marked "<changed>" (`redact`, `diff`); a slack URL is audited masked by its caller.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.database import Connection

# A check's basic-auth password and a notification channel's Standard Webhooks secret (CONTRACT §3, §7).
SECRET_FIELDS = frozenset({"basic_auth_pass", "secret"})
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
    connection: Connection,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    changes: Mapping[str, Any],
    host_id: uuid.UUID | None = None,
) -> None:
    """Write one entry in the caller's transaction; `changes` is stored redacted (`redact`), as JSON."""
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


@dataclass(frozen=True)
class AuditEntry:
    """One entry for `record_audits`: what `record_audit` takes, but the actor."""

    action: str
    entity_type: str
    entity_id: str
    changes: Mapping[str, Any]
    host_id: uuid.UUID | None = None


async def record_audits(connection: Connection, *, actor: str, entries: Sequence[AuditEntry]) -> None:
    """Write many entries of one actor in the caller's transaction (a batch create), each as `record_audit` would."""
    await connection.executemany(
        """
        INSERT INTO audit_log (actor, action, entity_type, entity_id, host_id, changes)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb)
        """,
        [
            (actor, entry.action, entry.entity_type, entry.entity_id, entry.host_id,
             json.dumps(redact(entry.changes), default=str))
            for entry in entries
        ],
    )  # fmt: skip


async def audit_page(connection: Connection, *, limit: int, before_id: int | None) -> list[asyncpg.Record]:
    """Up to `limit` entries, newest first, with an id below `before_id` (the previous page's last)."""
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
