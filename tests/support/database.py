"""The tests' databases: naming and dropping them, and the per-test cleanup (every application table emptied,
the list read from the schema itself)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# Kept across tests: which migrations ran (owned by shared/schema.py, created outside the migration files).
KEPT_TABLES = frozenset({"schema_migrations"})
DEADLOCK_RETRIES = 20


async def application_tables(connection: asyncpg.Connection) -> list[str]:
    """Every table of the public schema but the kept ones; partitions are left to their parent's TRUNCATE."""
    rows = await connection.fetch(
        """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
        ORDER BY c.relname
        """
    )
    return [row["relname"] for row in rows if row["relname"] not in KEPT_TABLES]


async def empty_tables(connection: asyncpg.Connection) -> None:
    """TRUNCATE every application table.

    The session's services keep running between tests and take row and table locks in their own order, so
    PostgreSQL may pick the TRUNCATE as a deadlock victim; it is then simply tried again (a victim's
    transaction changed nothing).
    """
    tables = ", ".join(f'"{name}"' for name in await application_tables(connection))
    for attempt in range(DEADLOCK_RETRIES):
        try:
            await connection.execute(f"TRUNCATE {tables} CASCADE")
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == DEADLOCK_RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database replaced by `database`."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


def database_name(dsn: str) -> str:
    """The database a DSN names."""
    return urlsplit(dsn).path.lstrip("/")


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop the database `name` (if it exists), closing its connections; `server_dsn` is any database of the
    same server to connect to."""
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
