"""API tokens: creation, hashing, lookup, and the caller's role and groups."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from services.api.audit import record_audit
from services.api.problems import unauthorized

Role = Literal["admin", "operator", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "operator", "viewer")
TOKEN_PREFIX = "hg_"


class TokenNameTaken(Exception):
    """A token with this name already exists."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name, role and groups."""

    name: str
    role: Role
    groups: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def visible_groups(self) -> list[str] | None:
        """The groups whose hosts the caller may see; None means every group."""
        return None if self.is_admin else list(self.groups)

    def sees_group(self, group: str) -> bool:
        return self.is_admin or group in self.groups


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def authenticate(pool: asyncpg.Pool, authorization: str | None) -> Principal:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("an API token is required: Authorization: Bearer <token>")
    row = await pool.fetchrow(
        "SELECT name, role, groups FROM api_tokens WHERE token_sha256 = $1", hash_token(token.strip())
    )
    if row is None:
        raise unauthorized("unknown or revoked API token")
    return Principal(name=row["name"], role=row["role"], groups=tuple(row["groups"]))


async def create_token(
    connection: asyncpg.Connection, *, name: str, role: Role, groups: Sequence[str], actor: str
) -> str:
    """Store a new token's hash and audit it; returns the token, which is never stored."""
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


async def list_tokens(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    return await connection.fetch("SELECT name, role, groups, created_at FROM api_tokens ORDER BY name")


async def revoke_token(connection: asyncpg.Connection, *, name: str, actor: str) -> bool:
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
