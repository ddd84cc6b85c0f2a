"""API tokens made directly in the database (shared/tokens.py), for tests that call the API as some role."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from shared.tokens import Role, create_token

# make_token(role, groups=(), name=None) -> the token's secret (the `make_token` fixture).
TokenFactory = Callable[..., Awaitable[str]]


def token_factory(connection: asyncpg.Connection) -> TokenFactory:
    """A function that creates a token of a role (and groups) on `connection`, named `<role>-<random>` unless
    a name is given, and returns its secret for an Authorization header."""

    async def make(role: Role, groups: tuple[str, ...] = (), name: str | None = None) -> str:
        return await create_token(
            connection,
            name=name or f"{role}-{uuid.uuid4().hex[:8]}",
            role=role,
            groups=groups,
            actor="test",
        )

    return make
