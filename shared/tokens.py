"""`api_tokens`: the API's bearer tokens, stored as their SHA-256 only. This module is the only one that
writes the table (docs/architecture.md, "Who writes which table").

Tokens are created and revoked by `healthgate token create|revoke` (each change audited in its
transaction); the api looks a presented token up by its hash (`find_token`), for a request or a dashboard
sign-in. Revoking a token ends its dashboard sessions (ON DELETE CASCADE).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from typing import Literal

import asyncpg

from shared.audit import record_audit
from shared.database import Connection

Role = Literal["admin", "operator", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "operator", "viewer")
TOKEN_PREFIX = "hg_"


class TokenNameTaken(Exception):
    """A token with this name already exists."""


def generate_token() -> str:
    """A new token: TOKEN_PREFIX and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """What is stored of a token: its SHA-256 (tokens are 256-bit random strings, so a fast hash is safe)."""
    return hashlib.sha256(token.encode()).digest()


async def find_token(pool: asyncpg.Pool, token: str) -> asyncpg.Record | None:
    """The token's row (id, name, role, groups) by its hash, or None (unknown or revoked). Surrounding
    whitespace is not part of a token."""
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT id, name, role, groups FROM api_tokens WHERE token_sha256 = $1", hash_token(token.strip())
    )
    return row


async def create_token(connection: Connection, *, name: str, role: Role, groups: Sequence[str], actor: str) -> str:
    """Store a new token's hash and audit it; returns the token, which is never stored.

    Raises TokenNameTaken when a token of that name exists."""
    token = generate_token()
    unique_groups = sorted(set(groups))
    async with connection.transaction():
        try:
            await connection.execute(
                """
                INSERT INTO api_tokens (id, name, role, groups, token_sha256)
                VALUES ($1, $2, $3, $4, $5)
                """,
                uuid.uuid4(),
                name,
                role,
                unique_groups,
                hash_token(token),
            )
        except asyncpg.UniqueViolationError:
            raise TokenNameTaken(f"a token named {name!r} already exists") from None
        await record_audit(
            connection,
            actor=actor,
            action="token.create",
            entity_type="token",
            entity_id=name,
            changes={"name": name, "role": role, "groups": unique_groups},
        )
    return token


async def list_tokens(connection: Connection) -> list[asyncpg.Record]:
    """Every token's name, role, groups and creation time (never its hash), by name."""
    return await connection.fetch("SELECT name, role, groups, created_at FROM api_tokens ORDER BY name")


async def revoke_token(connection: Connection, *, name: str, actor: str) -> bool:
    """Delete the token named `name` and audit it; False if there is none."""
    async with connection.transaction():
        revoked = await connection.fetchval("DELETE FROM api_tokens WHERE name = $1 RETURNING name", name)
        if revoked is None:
            return False
        await record_audit(
            connection,
            actor=actor,
            action="token.revoke",
            entity_type="token",
            entity_id=name,
            changes={"name": name},
        )
    return True
