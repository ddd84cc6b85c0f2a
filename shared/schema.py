"""The schema: `healthgate migrate` creates the database if needed and applies shared/migrations/NNNN_*.sql.

Each migration runs in its own transaction, under an advisory lock (any number of `healthgate migrate` may
run at once), and is recorded in `schema_migrations`, which this module owns. The result partitions of the
coming days are created last (`shared.results`), so that the pollers can store results at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.database import DATABASE_ERRORS, Connection, DatabaseUnavailable
from shared.results import ensure_result_partitions
from shared.settings import redact_url

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every process: serialises concurrent `healthgate migrate`.
MIGRATION_LOCK_ID = 0x6865616C74686761  # "healthga"


@dataclass(frozen=True)
class Migration:
    """One file of shared/migrations: NNNN (version), its name and its SQL."""

    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The ordered SQL files shipped in shared/migrations, named NNNN_description.sql."""
    migrations = []
    for entry in resources.files("shared.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            migrations.append(Migration(int(version), name, entry.read_text()))
    return sorted(migrations, key=lambda migration: migration.version)


async def ensure_database(dsn: str) -> bool:
    """Create the database named in the DSN when it does not exist. True if it was created.

    The database itself is tried first: a managed PostgreSQL (a cloud's, a Kubernetes operator's) often lets the
    service's user connect only to its own database, never to `postgres`. Only when it does not exist is
    `postgres` asked to create it.

    Raises DatabaseUnavailable when the server cannot be reached."""
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/") or parts.username or "postgres"
    try:
        await (await asyncpg.connect(dsn)).close()
        return False
    except asyncpg.InvalidCatalogNameError:
        pass  # it does not exist: create it below
    except DATABASE_ERRORS:
        pass  # unreachable, refused, ...: the maintenance database's answer says why below
    maintenance_dsn = urlunsplit(parts._replace(path="/postgres"))
    try:
        connection = await asyncpg.connect(maintenance_dsn)
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(maintenance_dsn)}: {exc}") from None
    try:
        exists = await connection.fetchval("SELECT true FROM pg_database WHERE datname = $1", database)
        if exists:
            return False
        quoted = '"' + database.replace('"', '""') + '"'
        try:
            await connection.execute(f"CREATE DATABASE {quoted}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another `healthgate migrate` created it at the same moment.
            return False
        log.info("created database", extra={"database": database})
        return True
    finally:
        await connection.close()


async def apply_migrations(connection: Connection, migrations: Iterable[Migration]) -> list[int]:
    """Apply the migrations not yet recorded, each in its own transaction, under an advisory lock; then
    create the result partitions from yesterday to a week ahead. Returns the versions applied now."""
    applied_now = []
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations:
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.version)
            log.info("applied migration", extra={"version": migration.version, "migration": migration.name})
        await ensure_result_partitions(connection, dt.datetime.now(dt.UTC).date())
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def migrate(dsn: str) -> list[int]:
    """`healthgate migrate`: create the database if needed and apply pending migrations.

    Raises DatabaseUnavailable when the server cannot be reached."""
    await ensure_database(dsn)
    try:
        connection = await asyncpg.connect(dsn)
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(dsn)}: {exc}") from None
    try:
        return await apply_migrations(connection, bundled_migrations())
    finally:
        await connection.close()
