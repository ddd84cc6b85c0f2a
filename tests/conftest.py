"""Test fixtures: a fresh database and exchange per session, real services as processes.

Each session gets its own database (`healthgate_test_<id>`) and exchange (`hgtest-<id>`), never the
`healthgate` database of `make run`. Tests that touch data start from empty tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from shared.schema import migrate
from shared.tokens import create_token
from shared.topology import QUEUES, Topology, declare_exchange
from tests.support.database import empty_tables
from tests.support.fake_agent import fake_agent, mtls_agent  # noqa: F401  (fixtures)
from tests.support.nginx import nginx  # noqa: F401  (fixture)
from tests.support.postgres import PostgresCluster, postgres_available, postgres_cluster
from tests.support.processes import ServiceProcess, free_port, start_service
from tests.support.rabbitmq import RabbitNode, rabbit_node, rabbitmq_available
from tests.support.raw_http import raw_http  # noqa: F401  (fixture)
from tests.support.services import BackingServices, backing_services


@pytest.fixture(scope="session")
def backing() -> Iterator[BackingServices]:
    with backing_services() as found:
        yield found


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:10]


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@pytest.fixture(scope="session")
def database_url(backing: BackingServices, session_id: str) -> Iterator[str]:
    name = f"healthgate_test_{session_id}"
    dsn = _with_database(backing.database_url, name)
    asyncio.run(migrate(dsn))
    yield dsn

    async def drop() -> None:
        connection = await asyncpg.connect(_with_database(backing.database_url, "postgres"))
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    asyncio.run(drop())


@pytest.fixture
async def private_database(backing: BackingServices, session_id: str) -> AsyncIterator[str]:
    """A database of the test's own, for processes that must not share rows with the session's API."""
    name = f"healthgate_test_{session_id}_{uuid.uuid4().hex[:6]}"
    dsn = _with_database(backing.database_url, name)
    await migrate(dsn)
    yield dsn
    connection = await asyncpg.connect(_with_database(backing.database_url, "postgres"))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
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
    connection = await asyncpg.connect(own_postgres.url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path.lstrip("/")}" WITH (FORCE)')
    finally:
        await connection.close()


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

    async def delete_topology() -> None:
        topology = Topology(name)
        connection = await aio_pika.connect(backing.amqp_url)
        async with connection:
            channel = await connection.channel()
            for queue in [topology.dead_letter_queue, *(topology.queue_name(spec) for spec in QUEUES)]:
                await channel.queue_delete(queue)
            for exchange in (topology.exchange, topology.dead_letter_exchange, topology.requeue_exchange):
                await channel.exchange_delete(exchange)

    asyncio.run(delete_topology())


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
    }


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "api.log"
    service = start_service("api", service_env | {"HEALTHGATE_API_PORT": str(port)}, log_path, port=port)
    yield service
    service.stop()


def start_poller(service_env: dict[str, str], log_path: Path, **overrides: str) -> ServiceProcess:
    port = free_port()
    env = service_env | {"HEALTHGATE_HEALTH_PORT": str(port)} | overrides
    return start_service("poller", env, log_path, port=port)


@pytest.fixture(scope="session")
def poller(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The session's poller process (the API's /test and every scheduled check go through it)."""
    service = start_poller(service_env, tmp_path_factory.mktemp("logs") / "poller.log")
    yield service
    service.stop()


GATE_RETRY_SECONDS = "2"


def start_gate(service_env: dict[str, str], log_path: Path, **overrides: str) -> ServiceProcess:
    port = free_port()
    env = service_env | {"HEALTHGATE_HEALTH_PORT": str(port), "HEALTHGATE_GATE_RETRY_SECONDS": GATE_RETRY_SECONDS}
    return start_service("gate", env | overrides, log_path, port=port)


@pytest.fixture(scope="session")
def gate(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The session's gate process, retrying failing checks every 2 s instead of 300 s."""
    service = start_gate(service_env, tmp_path_factory.mktemp("logs") / "gate.log")
    yield service
    service.stop()


@contextlib.contextmanager
def exclusive_poller(
    session_poller: ServiceProcess, service_env: dict[str, str], log_path: Path, **overrides: str
) -> Iterator[ServiceProcess]:
    """A poller of the test's own (other settings) as the only one running, the session's back after."""
    session_poller.stop()
    try:
        own = start_poller(service_env, log_path, **overrides)
        try:
            yield own
        finally:
            own.stop()
    finally:
        session_poller.restart()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session's database, with every table emptied first."""
    connection = await asyncpg.connect(database_url)
    await empty_tables(connection)
    yield connection
    await connection.close()


TokenFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def make_token(db: asyncpg.Connection) -> TokenFactory:
    async def make(role: str, groups: tuple[str, ...] = (), name: str | None = None) -> str:
        return await create_token(
            db,
            name=name or f"{role}-{uuid.uuid4().hex[:8]}",
            role=role,
            groups=groups,
            actor="test",  # type: ignore[arg-type]
        )

    return make


@pytest.fixture
async def client(api: ServiceProcess, db: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        yield http


@pytest.fixture
async def admin(client: httpx.AsyncClient, make_token: TokenFactory) -> httpx.AsyncClient:
    """The client with an admin token set."""
    client.headers["Authorization"] = f"Bearer {await make_token('admin')}"
    return client


@dataclass
class CapturedEvent:
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    body: bytes

    @property
    def document(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def data(self) -> dict[str, object]:
        return self.document["data"]  # type: ignore[return-value]


@dataclass
class EventCapture:
    """Every message published on the session's exchange while the test runs."""

    events: list[CapturedEvent] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.events.append(
            CapturedEvent(
                message.routing_key or "",
                message.message_id,
                message.correlation_id,
                message.content_type,
                message.body,
            )
        )
        self.arrived.set()

    def matching(
        self, routing_key: str, predicate: Callable[[CapturedEvent], bool] = lambda _: True
    ) -> list[CapturedEvent]:
        return [event for event in self.events if event.routing_key == routing_key and predicate(event)]

    async def wait_for(
        self,
        routing_key: str,
        predicate: Callable[[CapturedEvent], bool] = lambda _: True,
        *,
        count: int = 1,
        timeout: float = 10,
    ) -> list[CapturedEvent]:
        async with asyncio.timeout(timeout):
            while len(found := self.matching(routing_key, predicate)) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return found


@pytest.fixture
async def events(backing: BackingServices, exchange_name: str) -> AsyncIterator[EventCapture]:
    capture = EventCapture()
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await declare_exchange(channel, Topology(exchange_name))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(capture.on_message, no_ack=True)
        yield capture


@pytest.fixture
def key_file(service_env: dict[str, str]) -> Path:
    return Path(service_env["HEALTHGATE_KEY_FILE"])
