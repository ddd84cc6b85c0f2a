"""Test fixtures: a fresh database and exchange per session, real services as processes.

Each session gets its own database (`healthgate_test_<id>`) and exchange (`hgtest-<id>`), never the
`healthgate` database of `make run`. Tests that touch data start from empty tables.

Only fixtures live here; what they are made of (starting services, capturing and sending messages, tokens,
database helpers) is in tests/support/, where tests import it from too.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from shared.database import create_pool
from shared.schema import migrate
from shared.topology import Topology
from tests.support.cli_forks import CliForks
from tests.support.database import database_name, drop_database, emptied_database, with_database
from tests.support.dns_server import dnsmasq  # noqa: F401  (fixture)
from tests.support.fake_agent import fake_agent, mtls_agent  # noqa: F401  (fixtures)
from tests.support.grpc_server import grpc_health  # noqa: F401  (fixture)
from tests.support.messages import DeadLetters, EventCapture, Publisher, capture_events
from tests.support.nginx import nginx  # noqa: F401  (fixture)
from tests.support.postgres import PostgresCluster, postgres_available, postgres_cluster
from tests.support.processes import ServiceProcess, free_port, start_gate, start_poller, start_service
from tests.support.rabbitmq import RabbitNode, rabbit_node, rabbitmq_available
from tests.support.raw_http import raw_http  # noqa: F401  (fixture)
from tests.support.receiver import receiver  # noqa: F401  (fixture)
from tests.support.schemathesis_run import BackgroundSchemathesis
from tests.support.services import BackingServices, backing_services
from tests.support.tokens import TokenFactory, token_factory
from tests.support.topology import delete_topology


@pytest.fixture(scope="session")
def backing() -> Iterator[BackingServices]:
    with backing_services() as found:
        yield found


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def database_url(backing: BackingServices, session_id: str) -> Iterator[str]:
    name = f"healthgate_test_{session_id}"
    dsn = with_database(backing.database_url, name)
    asyncio.run(migrate(dsn))
    yield dsn
    asyncio.run(drop_database(with_database(backing.database_url, "postgres"), name))


@pytest.fixture
async def private_database(backing: BackingServices, session_id: str) -> AsyncIterator[str]:
    """A database of the test's own, for processes that must not share rows with the session's API."""
    name = f"healthgate_test_{session_id}_{uuid.uuid4().hex[:6]}"
    dsn = with_database(backing.database_url, name)
    await migrate(dsn)
    yield dsn
    await drop_database(with_database(backing.database_url, "postgres"), name)


@pytest.fixture
async def private_pool(private_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool (1 to 20 connections, as the services make theirs: shared.database.create_pool) on `private_database`."""
    pool = await create_pool(private_database, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def private_db(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to `private_database`."""
    connection = await asyncpg.connect(private_database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def holder(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection to `private_database`, to hold a lock (a group's, a row's) in an open transaction."""
    connection = await asyncpg.connect(private_database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_of_our_own() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the tests' own (tests/support/postgres.py), created at first use."""
    if not postgres_available():
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_postgres(postgres_of_our_own: PostgresCluster) -> Iterator[PostgresCluster]:
    """The tests' own PostgreSQL, which this test may stop and start: never the shared one. It is
    running again after the test, whatever the test did."""
    postgres_of_our_own.ensure_running()
    yield postgres_of_our_own
    postgres_of_our_own.ensure_running()


@pytest.fixture
async def own_database(own_postgres: PostgresCluster) -> AsyncIterator[str]:
    """A migrated database of the test's own on `own_postgres`."""
    dsn = own_postgres.database_url(f"healthgate_{uuid.uuid4().hex[:8]}")
    await migrate(dsn)
    yield dsn
    own_postgres.ensure_running()
    await drop_database(own_postgres.url, database_name(dsn))


@pytest.fixture(scope="session")
def rabbit_of_our_own() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the tests' own (tests/support/rabbitmq.py), started at first use."""
    if not rabbitmq_available():
        pytest.skip("RabbitMQ's server (rabbitmq-server, rabbitmqctl) is not installed")
    with rabbit_node() as node:
        yield node


@pytest.fixture
def own_rabbit(rabbit_of_our_own: RabbitNode) -> Iterator[RabbitNode]:
    """The tests' own RabbitMQ node, which this test may stop, restart or kill: never the shared broker.
    It is running again after the test."""
    rabbit_of_our_own.ensure_running()
    yield rabbit_of_our_own
    rabbit_of_our_own.ensure_running()


@pytest.fixture(scope="session")
def exchange_name(backing: BackingServices, session_id: str) -> Iterator[str]:
    name = f"hgtest-{session_id}"
    yield name

    asyncio.run(delete_topology(backing.amqp_url, name))


@pytest.fixture(scope="session")
def service_env(
    backing: BackingServices, database_url: str, exchange_name: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment of every healthgate process the tests start."""
    key_dir = tmp_path_factory.mktemp("keys")
    return {
        "HEALTHGATE_DATABASE_URL": database_url,
        "HEALTHGATE_AMQP_URL": backing.amqp_url,
        "HEALTHGATE_EXCHANGE": exchange_name,
        "HEALTHGATE_KEY_FILE": str(key_dir / "health-check.key"),
        "HEALTHGATE_LOG_FORMAT": "json",
        "HEALTHGATE_API_HOST": "127.0.0.1",
        # Two test sessions side by side (make test) share the machine's PostgreSQL and its 100 connection slots:
        # at their own sizes (up to 20) the pools of two sessions' services, grown under load, took them all.
        "HEALTHGATE_DATABASE_POOL_MAX": "5",
    }


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "api.log"
    service = start_service("api", service_env | {"HEALTHGATE_API_PORT": str(port)}, log_path, port=port)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def poller(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The session's poller process (the API's /test and every scheduled check go through it)."""
    service = start_poller(service_env, tmp_path_factory.mktemp("logs") / "poller.log")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gate(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The session's gate process, retrying failing checks every 2 s instead of 300 s."""
    service = start_gate(service_env, tmp_path_factory.mktemp("logs") / "gate.log")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def cli_forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliForks]:
    """`healthgate ...` commands without Python's start-up for each (tests/support/cli_forks.py): one server that
    imported services.cli forks a copy per command, with the command's environment, stdin, output and exit status."""
    with CliForks((), tmp_path_factory.mktemp("cli-forks") / "server.stderr") as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def schemathesis_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundSchemathesis | None]:
    """tests/test_schemathesis.py's run, started with the session when that test is among those selected, so that
    its minute of fuzzing overlaps the other tests (tests/support/schemathesis_run.py); None when it is not."""
    if not any(item.path.name == "test_schemathesis.py" for item in request.session.items):
        yield None
        return
    run = BackgroundSchemathesis(
        request.getfixturevalue("backing"),
        request.getfixturevalue("service_env"),
        request.getfixturevalue("session_id"),
        tmp_path_factory.mktemp("schemathesis"),
    )
    run.start()
    yield run
    run.join()  # not left running past the session, whatever the test did


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session's database, with every table emptied first. After the test, no enabled check
    may have a target the session's poller would look up in DNS (tests/support/database.py)."""
    async with emptied_database(database_url) as connection:
        yield connection


@pytest.fixture
def make_token(db: asyncpg.Connection) -> TokenFactory:
    """make_token(role, groups=(), name=None): a new API token's secret (tests/support/tokens.py)."""
    return token_factory(db)


@pytest.fixture(scope="session")
def http_tls() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CA bundle), made once. httpx makes it anew for every client, whether
    it will speak TLS or not: loading the bundle takes some 30 ms, before each of over a thousand tests."""
    return httpx.create_ssl_context()


@pytest.fixture
async def client(
    api: ServiceProcess, db: asyncpg.Connection, http_tls: ssl.SSLContext
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30, verify=http_tls) as http:
        yield http


@pytest.fixture
async def admin(client: httpx.AsyncClient, make_token: TokenFactory) -> httpx.AsyncClient:
    """The client with an admin token set."""
    client.headers["Authorization"] = f"Bearer {await make_token('admin')}"
    return client


@pytest.fixture
async def events(backing: BackingServices, exchange_name: str) -> AsyncIterator[EventCapture]:
    """Every message published on the session's exchange while the test runs."""
    async with capture_events(backing.amqp_url, exchange_name) as capture:
        yield capture


@pytest.fixture
async def jobs(backing: BackingServices, exchange_name: str) -> AsyncIterator[Publisher]:
    """Sends job events to the session's exchange, with publisher confirms."""
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield Publisher(await channel.get_exchange(exchange_name))


@pytest.fixture
async def dead(backing: BackingServices, exchange_name: str, gate: ServiceProcess) -> AsyncIterator[DeadLetters]:
    """What is dead-lettered on the session's exchange while the test runs (earlier tests' letters removed)."""
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        letters = DeadLetters(await channel.get_queue(Topology(exchange_name).dead_letter_queue))
        await letters.drain()
        letters.messages.clear()
        yield letters


@pytest.fixture
def key_file(service_env: dict[str, str]) -> Path:
    return Path(service_env["HEALTHGATE_KEY_FILE"])
