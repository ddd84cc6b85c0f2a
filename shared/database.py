"""PostgreSQL: the connection pool, what an outage looks like and the watch that waits it out, the
database's clock, and batched deletes. The schema and its migrations are in `shared/schema.py`; each table's
rows are written by its owner (docs/architecture.md, "Who writes which table")."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from typing import TypeAlias

import asyncpg
import asyncpg.pool

from shared.outages import OutageLog, describe_error
from shared.settings import redact_url

log = logging.getLogger(__name__)

# What a function that runs queries takes: a connection of its own (`asyncpg.connect`) or one acquired from
# the pool. `Pool.acquire()` yields a PoolConnectionProxy, which forwards every call to its Connection but
# is not a subclass of it (asyncpg's design), so annotating either alone would refuse the other.
Connection: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# Rows per DELETE of `delete_in_batches`: each batch is its own short transaction.
DELETE_BATCH = 5000


# What PostgreSQL being unreachable looks like to a client: the one list every service uses to tell "the
# database is down (or restarting), wait for it" from "this failed" (a bug, a bad query, a conflict).
# - OSError: refused, reset, unreachable, and TimeoutError (a connect or command timeout);
# - PostgresConnectionError: SQLSTATE class 08 (and asyncpg's "connection was closed in the middle of
#   operation", ConnectionDoesNotExistError);
# - InterfaceError: a connection used after it closed, or a pool closing;
# - 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now (starting, shutting down, in
#   recovery) — not the rest of class 57, such as 57014 query_canceled (a statement timeout);
# - 53300 too many connections: the server is full, not our query;
# - asyncpg's InternalClientError "cannot switch to state N; another operation (M) is in progress": a pooled
#   connection whose server session was terminated (pg_terminate_backend, a failover) while it was idle; asyncpg
#   raises it on the connection's next use instead of a connection error (MagicStack/asyncpg#784, #1069).
#   Only that message is an outage (`is_transient_database_error`); another InternalClientError is a failure.
TRANSIENT_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,
)
# Every error of the database or of the connection to it: an outage (above), or PostgreSQL refusing the
# work (asyncpg.PostgresError: a bad query, a constraint, a conflict). What a task that must not die on
# either catches, before it asks `is_transient_database_error` (or `DatabaseWatch.wait_out`) which it was.
DATABASE_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_DATABASE_ERRORS, asyncpg.PostgresError)
# PostgreSQL rolled the transaction back because of a concurrent one (SQLSTATE 40001 serialization_failure, 40P01
# deadlock_detected): neither an outage nor the request's fault; the same work may simply be tried again.
ROLLED_BACK_BY_CONCURRENCY: tuple[type[Exception], ...] = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
# asyncpg InterfaceErrors that are our mistake, not an outage.
_NOT_TRANSIENT: tuple[type[Exception], ...] = (
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)
# asyncpg's words for a connection that another operation still holds: the one that failed when its session was
# terminated (coreproto.pyx `_set_state`). Its other state faults ("protocol is in the failed state") are failures.
_TERMINATED_SESSION = re.compile(r"cannot switch to state \d+; another operation \(\d+\) is in progress")
PROBE_INTERVAL_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 3.0
POOL_CLOSE_SECONDS = 3.0


def is_transient_database_error(error: BaseException) -> bool:
    """True if `error` says that PostgreSQL is unreachable (down, restarting, full), not that the work
    failed: see TRANSIENT_DATABASE_ERRORS."""
    if isinstance(error, asyncpg.InternalClientError):
        return _TERMINATED_SESSION.fullmatch(str(error)) is not None
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
    `run()` must be running (a service task)."""

    def __init__(self, dsn: str, pool: asyncpg.Pool | None = None) -> None:
        self._dsn = dsn
        self._pool = pool
        self._log = OutageLog(
            log, "PostgreSQL unavailable, waiting for it", "PostgreSQL recovered",
            fields={"url": redact_url(dsn)},
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

    async def wait_out(self, error: BaseException) -> bool:
        """For a task that loops: if `error` is transient (`is_transient_database_error`), report it, wait
        until the database answers again and return True (try again at once; the watch logs the outage
        once). False for any other error, which the caller logs and backs off from."""
        if not is_transient_database_error(error):
            return False
        self.report(error)
        await self.wait_up()
        return True

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


async def _keep_session_state(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (a round trip on every pooled call: about 100 µs of a
    1 ms request). asyncpg still rolls back open transactions and drops listeners; code that sets
    other session state (session advisory locks, SET) must undo it before releasing."""


async def locked_now(connection: Connection) -> dt.datetime:
    """The database's clock now, for a transaction that holds the rows it is about to stamp.

    Writers of one row serialise on its lock, so times read after the lock order their changes as they
    happened: a gate's job.waiting is never stamped after the decision that ended the wait (an override
    racing the gate). PostgreSQL's now() cannot serve, being the transaction's *start*, possibly before
    the wait for the lock; and the database's clock (clock_timestamp()) is the one every gate and api
    shares, where the processes' own clocks may differ between machines."""
    moment: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    return moment


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, server_settings: dict[str, str] | None = None
) -> asyncpg.Pool:
    """The service's one pool (or a second one whose sessions have other `server_settings`, e.g. the notifier's
    `synchronous_commit` off for what it may lose in a crash of PostgreSQL). With min_size=0 it connects on first
    use, not here."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=30, reset=_keep_session_state,
            server_settings=server_settings,
        )  # fmt: skip
    except DATABASE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(dsn)}: {exc}") from None
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, timeout: float = POOL_CLOSE_SECONDS) -> None:
    """Close the pool politely if it can be done within `timeout` seconds, else cut every connection
    (`terminate`). A plain `close()` waits for every connection in use to be released and each to say
    goodbye to the server: on a database that stopped answering (hung, or cut off by the network) it
    would wait for ever, and a service asked to stop (a deploy's SIGTERM) would be killed instead."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.info("PostgreSQL did not answer while closing the pool; closing its connections at once")
        pool.terminate()


async def delete_in_batches(pool: asyncpg.Pool, statement: str, before: dt.datetime, batch: int = DELETE_BATCH) -> int:
    """Run a batched DELETE (`$1` the time bound, `$2` the batch size), each batch in a transaction of its
    own, until a batch deletes fewer than `batch` rows; returns how many were deleted. The statement comes
    from the table's owner (a pruning function), which alone spells a write of its table."""
    total = 0
    while True:
        async with pool.acquire() as connection:
            status = await connection.execute(statement, before, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total
