"""`dashboard_sessions`: signed-in dashboard sessions, each standing for an API token without holding it.
This module is the only one that writes the table (docs/architecture.md, "Who writes which table").

A row is keyed by the SHA-256 of the random session id the browser's cookie carries (never the id itself),
next to the token's row id and the session's CSRF token. The api creates and deletes them (sign-in,
sign-out, services/api/dashboard/sessions.py); the pruner deletes the expired ones; revoking a token
ends its sessions (ON DELETE CASCADE).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid

import asyncpg

from shared.database import delete_in_batches


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


async def create_session(pool: asyncpg.Pool, token_id: uuid.UUID, lifetime: dt.timedelta) -> str:
    """A new session of the token (its row id) for `lifetime`, with a fresh CSRF token; returns the
    session id for the cookie, which is not stored."""
    session_id = secrets.token_urlsafe(32)
    await pool.execute(
        """
        INSERT INTO dashboard_sessions (id_sha256, token_id, csrf_token, expires_at)
        VALUES ($1, $2, $3, now() + $4::interval)
        """,
        _digest(session_id),
        token_id,
        secrets.token_urlsafe(32),
        lifetime,
    )
    return session_id


async def find_session(pool: asyncpg.Pool, session_id: str) -> asyncpg.Record | None:
    """The unexpired session's token (name, role, groups) and csrf_token, or None."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        SELECT t.name, t.role, t.groups, s.csrf_token
        FROM dashboard_sessions s
        JOIN api_tokens t ON t.id = s.token_id
        WHERE s.id_sha256 = $1 AND s.expires_at > now()
        """,
        _digest(session_id),
    )
    return row


async def delete_session(pool: asyncpg.Pool, session_id: str) -> None:
    """End a session (sign-out); nothing happens for an unknown one."""
    await pool.execute("DELETE FROM dashboard_sessions WHERE id_sha256 = $1", _digest(session_id))


async def prune_expired(pool: asyncpg.Pool, now: dt.datetime) -> int:
    """Delete the sessions expired before `now` (the pruner), in batches; returns how many."""
    return await delete_in_batches(
        pool,
        "DELETE FROM dashboard_sessions WHERE id_sha256 IN ("
        "SELECT id_sha256 FROM dashboard_sessions WHERE expires_at < $1 LIMIT $2)",
        now,
    )
