"""The tests' databases: naming and dropping them, and the per-test cleanup (every application table emptied,
the list read from the schema itself)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import idna
import pytest

# Kept across tests: which migrations ran (owned by shared/schema.py, created outside the migration files).
KEPT_TABLES = frozenset({"schema_migrations"})
DEADLOCK_RETRIES = 20
# From this many rows on, empty_tables TRUNCATEs a table rather than DELETE its rows.
MANY_ROWS = 1000


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
    """Empty every application table, as `TRUNCATE <all of them> CASCADE` would, in a fraction of its time.

    TRUNCATE gives every table, partition and index a new file whether it held rows or not (some 100 relations
    here): about 0.1 to 0.5 s, before each of more than a thousand tests. Instead, one transaction takes the lock
    TRUNCATE would take (ACCESS EXCLUSIVE, on every table and partition: it waits for the session's services'
    transactions on them, and they for it, as before), then DELETEs the rows of the tables that have a few, and
    TRUNCATEs only those that have many (a DELETE of thousands of rows would be slower and leave them dead).
    Within the lock, no row can come or go meanwhile: the tables end as empty as a TRUNCATE of all leaves them.

    The session's services keep running between tests and take row and table locks in their own order, so
    PostgreSQL may pick this transaction as a deadlock victim; it is then simply tried again (a victim's
    transaction changed nothing).
    """
    tables = await application_tables(connection)
    names = ", ".join(f'"{name}"' for name in tables)
    sizes = " UNION ALL ".join(
        f"SELECT '{name}' AS name, (SELECT count(*) FROM (SELECT FROM \"{name}\" LIMIT {MANY_ROWS}) AS sample) AS rows"
        for name in tables
    )
    for attempt in range(DEADLOCK_RETRIES):
        try:
            async with connection.transaction():
                await connection.execute(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE")
                rows = {row["name"]: row["rows"] for row in await connection.fetch(sizes)}
                many = [name for name in tables if rows[name] >= MANY_ROWS]
                if many:
                    await connection.execute("TRUNCATE " + ", ".join(f'"{name}"' for name in many) + " CASCADE")
                for name in tables:
                    if 0 < rows[name] < MANY_ROWS:
                        await connection.execute(f'DELETE FROM "{name}"')
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == DEADLOCK_RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))


@contextlib.asynccontextmanager
async def emptied_database(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session's database with every table emptied first (the `db` fixture). When the caller is
    done, no enabled check may have a target the session's poller would look up in DNS: pytest.fail names them."""
    connection = await asyncpg.connect(database_url)
    await empty_tables(connection)
    yield connection
    try:
        leaks = await checks_resolving_names(connection)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        leaks = []  # the test broke its connection: nothing to look at
    finally:
        await connection.close()
    if leaks:
        pytest.fail("enabled checks whose targets would be looked up in DNS (use 127.0.0.x, or enabled: false):\n"
                    + "\n".join(leaks))  # fmt: skip


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


async def set_columns(db: asyncpg.Connection, check: dict[str, Any], **columns: Any) -> None:
    """Write check columns the API does not take here (or refuses on purpose) straight into the row of `check`
    (the API's view of it)."""
    assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(columns, start=2))
    await db.execute(f"UPDATE health_checks SET {assignments} WHERE id = $1", uuid.UUID(check["id"]), *columns.values())


# A host name that cannot resolve and is never looked up: IDNA refuses its empty label before any query.
UNRESOLVABLE_NAME = "a..b"


def resolves_by_dns(name: str) -> bool:
    """Whether a poller connecting to `name` would ask DNS for it: not for an IP literal, nor for a name that
    cannot be encoded for DNS (the poller encodes a name with IDNA 2008 as yarl does, getaddrinfo then with
    Python's codec, and either fails without a lookup)."""
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return False
    try:
        (name if name.isascii() else idna.encode(name, uts46=True).decode("ascii")).encode("idna")
    except UnicodeError:  # idna.IDNAError is one
        return False
    return True


async def checks_resolving_names(connection: asyncpg.Connection) -> list[str]:
    """The enabled checks whose target a poller would look up in DNS (tcp and grpc: `address`, else the host's name;
    http: the URL's host; service: the agent_url's host; dns: a dns check without `dns_server` asks the system's
    resolver), one line each. Tests store such targets only on disabled checks: the session's poller runs every
    enabled check within seconds, and test traffic never leaves 127.0.0.0/8."""
    rows = await connection.fetch(
        """
        SELECT c.name AS check_name, c.check_type, c.address, c.url, c.dns_name, c.dns_server,
               h.name AS host_name, h.agent_url
        FROM health_checks c JOIN hosts h ON h.id = c.host_id
        WHERE c.enabled
        ORDER BY h.name, c.name
        """
    )
    found = []
    for row in rows:
        if row["check_type"] == "dns":
            if row["dns_server"] is None:
                found.append(f"dns check {row['check_name']!r} of host {row['host_name']!r} asks the system resolver "
                             f"for {row['dns_name']!r} (set dns_server to a server of the test's own)")  # fmt: skip
            continue
        if row["check_type"] in ("tcp", "grpc"):
            target = row["address"] or row["host_name"]
        else:
            try:
                target = urlsplit(row["url"] if row["check_type"] == "http" else row["agent_url"] or "").hostname or ""
            except ValueError:
                continue
        if target and resolves_by_dns(target):
            found.append(f"{row['check_type']} check {row['check_name']!r} of host {row['host_name']!r} -> {target!r}")
    return found
