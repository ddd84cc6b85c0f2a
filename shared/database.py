"""PostgreSQL: the connection pool, database creation, migrations and result partitions."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.outages import OutageLog, describe_error
from shared.settings import redact_url

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every process: serialises concurrent `healthgate migrate`.
MIGRATION_LOCK_ID = 0x6865616C74686761  # "healthga"
RESULT_PARTITION_DAYS_AHEAD = 7


# What PostgreSQL being unreachable looks like to a client: the one list every service uses to tell "the
# database is down (or restarting), wait for it" from "this failed" (a bug, a bad query, a conflict).
# - OSError: refused, reset, unreachable, and TimeoutError (a connect or command timeout);
# - PostgresConnectionError: SQLSTATE class 08 (and asyncpg's "connection was closed in the middle of
#   operation", ConnectionDoesNotExistError);
# - InterfaceError: a connection used after it closed, or a pool closing;
# - 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now (starting, shutting down, in
#   recovery) — not the rest of class 57, such as 57014 query_canceled (a statement timeout);
# - 53300 too many connections: the server is full, not our query.
TRANSIENT_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
# asyncpg InterfaceErrors that are our mistake, not an outage.
_NOT_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)
PROBE_INTERVAL_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 3.0


def is_transient_database_error(error: BaseException) -> bool:
    """True if `error` says that PostgreSQL is unreachable (down, restarting, full), not that the work
    failed: see TRANSIENT_DATABASE_ERRORS."""
    return isinstance(error, TRANSIENT_DATABASE_ERRORS) and not isinstance(error, _NOT_TRANSIENT)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached or refused the connection."""


class DatabaseWatch:
    """Whether PostgreSQL answers, as one process sees it; logs each outage once.

    Any part of the service that meets a transient error calls `report(error)`. The watch then stops
    counting the database as up at once (`wait_down` returns: consumers stop taking messages) and
    probes it (a fresh connection and `SELECT 1`): if it answers at once, the error was a single lost
    connection and nothing is logged; otherwise one warning "PostgreSQL unavailable" is logged and the
    probe repeats every `PROBE_INTERVAL_SECONDS` until it answers, then one "PostgreSQL recovered" line
    with the outage's length. It starts as not up: the first probe decides (a service that starts
    while PostgreSQL is down logs the outage once, and its consumers wait for the database).

    On every report the pool's idle connections are expired, so that after a recovery (or a server
    restart quicker than the probe) no task is handed a connection that died with the old server.
    `run()` must be running (a service task); `quiet` logs at DEBUG (a second pool of the same process,
    whose outages the first logs)."""

    def __init__(self, dsn: str, pool: asyncpg.Pool | None = None, *, quiet: bool = False) -> None:
        self._dsn = dsn
        self._pool = pool
        self._log = OutageLog(
            log, "PostgreSQL unavailable, waiting for it", "PostgreSQL recovered",
            fields={"url": redact_url(dsn)}, quiet=quiet,
        )  # fmt: skip
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._suspect = asyncio.Event()
        self._suspect.set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def wait_up(self) -> None:
        await self._up.wait()

    async def wait_down(self) -> None:
        await self._down.wait()

    def report(self, error: BaseException) -> None:
        """A task met a transient error: count the database as down until a probe says otherwise."""
        if self._up.is_set():
            log.debug("database error reported", extra={"error": describe_error(error)})
        self._up.clear()
        self._down.set()
        self._suspect.set()

    async def run(self) -> None:
        """Probe whenever an error was reported (and at start) until the database answers. Never returns."""
        while True:
            await self._suspect.wait()
            self._suspect.clear()
            if self._pool is not None:
                # The pool's idle connections may have died with the server (even if it is back already,
                # after a quick restart): each would fail once more. Connections in use close on release.
                await self._pool.expire_connections()
            confirmed = False
            while (error := await self.probe()) is not None:
                if not confirmed:
                    confirmed = True
                    self._log.down(error)
                await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            self._suspect.clear()  # reports made while probing are answered by this success
            self._log.up()
            self._down.clear()
            self._up.set()

    async def probe(self) -> BaseException | None:
        """One `SELECT 1` on a connection of its own (the pool may be full or hold dead connections);
        None if it answered, else the error."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                connection = await asyncpg.connect(self._dsn, timeout=PROBE_TIMEOUT_SECONDS)
                try:
                    await connection.fetchval("SELECT 1")
                finally:
                    await connection.close(timeout=PROBE_TIMEOUT_SECONDS)
        except Exception as exc:  # whatever keeps it from answering (refused, auth, missing database, timeout)
            return exc
        return None


@dataclass(frozen=True)
class Migration:
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


async def _keep_session_state(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (a round trip on every pooled call: about 100 µs of a
    1 ms request). asyncpg still rolls back open transactions and drops listeners; code that sets
    other session state (session advisory locks, SET) must undo it before releasing."""


async def locked_now(connection: asyncpg.Connection) -> dt.datetime:
    """The database's clock now, for a transaction that holds the rows it is about to stamp.

    Writers of one row serialise on its lock, so times read after the lock order their changes as they
    happened: a gate's job.waiting is never stamped after the decision that ended the wait (an override
    racing the gate). PostgreSQL's now() cannot serve, being the transaction's *start*, possibly before
    the wait for the lock; and the database's clock (clock_timestamp()) is the one every gate and api
    shares, where the processes' own clocks may differ between machines."""
    moment: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    return moment


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """The service's one pool. With min_size=0 it connects on first use, not here."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=30, reset=_keep_session_state
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(dsn)}: {exc}") from None
    assert pool is not None
    return pool


async def ensure_database(dsn: str) -> bool:
    """Create the database named in the DSN when it does not exist. True if it was created."""
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/") or parts.username or "postgres"
    maintenance_dsn = urlunsplit(parts._replace(path="/postgres"))
    try:
        connection = await asyncpg.connect(maintenance_dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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


async def apply_migrations(connection: asyncpg.Connection, migrations: Iterable[Migration]) -> list[int]:
    """Apply the migrations not yet recorded, each in its own transaction, under an advisory lock."""
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
    """`healthgate migrate`: create the database if needed and apply pending migrations."""
    await ensure_database(dsn)
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(dsn)}: {exc}") from None
    try:
        return await apply_migrations(connection, bundled_migrations())
    finally:
        await connection.close()


def result_partition_name(day: dt.date) -> str:
    return f"check_results_{day:%Y%m%d}"


async def ensure_result_partitions(
    connection: asyncpg.Connection, today: dt.date, days_ahead: int = RESULT_PARTITION_DAYS_AHEAD
) -> list[str]:
    """Create the daily result partitions from yesterday to `days_ahead` days on. Idempotent."""
    existing = {
        row["relname"]
        for row in await connection.fetch(
            """
            SELECT child.relname
            FROM pg_inherits
            JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
            JOIN pg_class child ON child.oid = pg_inherits.inhrelid
            WHERE parent.relname = 'check_results'
            """
        )
    }
    created = []
    for offset in range(-1, days_ahead + 1):
        day = today + dt.timedelta(days=offset)
        name = result_partition_name(day)
        if name in existing:
            continue
        start = dt.datetime.combine(day, dt.time(), dt.UTC)
        end = start + dt.timedelta(days=1)
        try:
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF check_results "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        except asyncpg.InvalidObjectDefinitionError:
            # Another process created an overlapping partition at the same moment.
            continue
        created.append(name)
    return created
