"""Who is calling: a bearer token looked up (shared/tokens.py), as the caller's role and groups."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from services.api.problems import unauthorized
from shared.tokens import Role, find_token


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


async def authenticate(pool: asyncpg.Pool, authorization: str | None) -> Principal:
    """The caller of an `Authorization: Bearer <token>` header; 401 without one, or for an unknown token."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("an API token is required: Authorization: Bearer <token>")
    row = await find_token(pool, token)
    if row is None:
        raise unauthorized("unknown or revoked API token")
    return Principal(name=row["name"], role=row["role"], groups=tuple(row["groups"]))
