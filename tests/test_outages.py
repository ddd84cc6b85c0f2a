"""Outages of the database and the broker (issue 10, CONTRACT §5 "No job is lost or decided twice across
restarts or crashes of any service, the broker or the database"): no valid message is dead-lettered
because of a fault outside it, however many times the services restart meanwhile, and each outage is
logged as one warning and one "recovered" line per service.

Real processes, the real broker and database. PostgreSQL and RabbitMQ are stopped only where the test
owns them (`own_postgres`, `own_rabbit`: a cluster and a node of the tests' own, on other ports), never
the shared ones. Time limits here only guard against a hang; no test asserts how fast something happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import inspect
import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import CollectorRegistry

import shared.consuming
from shared.consuming import HANDBACK_HEADER, ConsumerMetrics, Consumers
from shared.database import DatabaseWatch, create_pool, is_transient_database_error
from shared.events import ScheduledRun, Tick
from shared.messaging import Broker
from shared.topology import GATE_JOBS_QUEUE, POLLER_TICK_QUEUE, Topology
from tests.support.postgres import PostgresCluster
from tests.support.processes import ServiceProcess, free_port, start_service, start_together, stop_processes
from tests.support.rabbitmq import RabbitNode
from tests.support.services import BackingServices
from tests.support.topology import delete_topology

GUARD_SECONDS = 90  # against a hang, not a speed goal
NOISE = ("Traceback", "never retrieved", "was destroyed but it is pending", '"exception":')
DB_DOWN = "PostgreSQL unavailable, waiting for it"
DB_BACK = "PostgreSQL recovered"
BROKER_DOWN = "lost the connection to RabbitMQ, reconnecting"
BROKER_BACK = "RabbitMQ recovered: reconnected to RabbitMQ"
DECISIONS = ("job.released", "job.failed", "job.cancelled")
QUORUM_QUEUE_SETTLING_SECONDS = 8


# ---- helpers --------------------------------------------------------------------------------------------------------


def own_exchange(purpose: str) -> str:
    return f"hgtest-{uuid.uuid4().hex[:10]}-{purpose}"


def start_unready(name: str, env: dict[str, str], log_path: Path) -> ServiceProcess:
    """Start a service whose database or broker may be down: wait only until it is live."""
    port = free_port()
    variable = "HEALTHGATE_API_PORT" if name == "api" else "HEALTHGATE_HEALTH_PORT"
    return start_service(name, env | {variable: str(port)}, log_path, port=port, until="live")


def log_records(service: ServiceProcess) -> list[dict[str, Any]]:
    """The service's log, one JSON record per line, without a traceback or asyncio's leftovers."""
    text = service.log_text()
    assert not any(noise in text for noise in NOISE), text
    return [json.loads(line) for line in text.splitlines()]


def messages(service: ServiceProcess, text: str) -> list[dict[str, Any]]:
    return [record for record in log_records(service) if record["message"] == text]


async def wait_for_log(service: ServiceProcess, text: str, count: int = 1) -> None:
    async with asyncio.timeout(GUARD_SECONDS):
        while service.log_text().count(text) < count:
            assert service.process.poll() is None, f"{service.name} exited:\n{service.log_text()}"
            await asyncio.sleep(0.1)


async def wait_until(condition: Callable[[], object], timeout: float = GUARD_SECONDS) -> None:
    """Until `condition()` (or what it returns, if awaitable) is true."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.2)


def in_an_hour() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()


Publish = Callable[[str, object], Awaitable[None]]


@contextlib.asynccontextmanager
async def publisher(amqp_url: str, exchange: str) -> AsyncIterator[Publish]:
    """Publishes JSON persistent, with confirms, on `exchange` (declared by the services)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)

        async def publish(routing_key: str, body: object) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            message = aio_pika.Message(
                data, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await target.publish(message, routing_key)

        yield publish


async def ready_messages(amqp_url: str, queue_name: str) -> int:
    """Messages waiting in the queue, not held by any consumer."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def no_consumer(amqp_url: str, queue_name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return not queue.declaration_result.consumer_count


async def waiting_host(db: asyncpg.Connection) -> str:
    """A host with one critical check that has no result yet: a job on it waits."""
    host_id, check_id = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        'INSERT INTO hosts (id, name, "group") VALUES ($1, $2, $3)', host_id, f"h-{host_id.hex[:6]}", "outage"
    )
    await db.execute(
        "INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port, address)"
        " VALUES ($1, $2, 'port', 'tcp', 3600, 1, 9, '127.0.0.1')",
        check_id, host_id,
    )  # fmt: skip
    await db.execute("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", check_id, host_id)
    return str(host_id)


async def unscheduled_tcp_check(db: asyncpg.Connection, port: int) -> uuid.UUID:
    """A tcp check the scheduler leaves alone (no schedule row): only the test's ticks run it."""
    host_id, check_id = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        'INSERT INTO hosts (id, name, "group") VALUES ($1, $2, $3)', host_id, f"t-{host_id.hex[:6]}", "outage"
    )
    await db.execute(
        "INSERT INTO health_checks (id, host_id, name, check_type, interval_seconds, timeout_seconds, port, address)"
        " VALUES ($1, $2, 'port', 'tcp', 3600, 2, $3, '127.0.0.1')",
        check_id, host_id, port,
    )  # fmt: skip
    await db.execute("INSERT INTO check_state (check_id, host_id) VALUES ($1, $2)", check_id, host_id)
    return check_id


@contextlib.contextmanager
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield int(server.getsockname()[1])


async def decisions_by_job(db: asyncpg.Connection) -> dict[tuple[str, str], int]:
    rows = await db.fetch(
        """
        SELECT convert_from(body, 'UTF8')::jsonb -> 'data' ->> 'job_id' AS job_id, routing_key, count(*) AS events
        FROM outbox WHERE routing_key = ANY($1) GROUP BY 1, 2
        """,
        list(DECISIONS),
    )
    return {(row["job_id"], row["routing_key"]): row["events"] for row in rows}


def handed_back(metrics: str, queue: str) -> float:
    prefix = f'healthgate_messages_handed_back_total{{queue="{queue}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def stop_with(service: ServiceProcess, round_number: int) -> None:
    """Rounds alternate kill -9 and a plain SIGTERM (as a deploy does); a SIGTERM stop is clean."""
    if round_number % 2 == 0:
        service.stop(signal.SIGKILL)
    else:
        assert service.stop(signal.SIGTERM) == 0, service.log_text()


# ---- the gate and the poller restarted during a database outage -------------------------------------------------------


@pytest.mark.slow
async def test_gate_restarted_ten_times_during_a_database_outage_decides_each_job_once(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    exchange = own_exchange("gate-outage")
    topology = Topology(exchange)
    env = service_env | {"HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange}
    db = await asyncpg.connect(own_database)
    host_id = await waiting_host(db)
    gates = [start_unready("gate", env, tmp_path / "gate-0.log")]
    try:
        await wait_for_log(gates[0], "connected to RabbitMQ")
        async with publisher(backing.amqp_url, exchange) as publish:
            await publish("job.start", {"job_id": "waiting", "host_id": host_id, "window_ends_at": in_an_hour()})
            await wait_until(lambda: db.fetchval("SELECT waiting_announced FROM gate_jobs WHERE job_id = 'waiting'"))
            await db.close()

            own_postgres.stop()
            unknown_host = str(uuid.uuid4())  # released as soon as the gate can decide it
            await publish("job.start", {"job_id": "in-outage", "host_id": unknown_host, "window_ends_at": in_an_hour()})
            await publish("job.cancel", {"job_id": "waiting", "host_id": host_id})
            for round_number in range(10):
                stop_with(gates[-1], round_number)
                gate = start_unready("gate", env, tmp_path / f"gate-{round_number + 1}.log")
                gates.append(gate)
                await wait_for_log(gate, "connected to RabbitMQ")
                await wait_for_log(gate, DB_DOWN)
                await asyncio.sleep(0.5)  # a gate that consumed now would hold both messages
                assert await ready_messages(backing.amqp_url, topology.queue_name(GATE_JOBS_QUEUE)) == 2
            own_postgres.start()

        db = await asyncpg.connect(own_database)
        await wait_until(
            lambda: db.fetchval("SELECT count(*) = 2 FROM gate_jobs WHERE status <> 'waiting_health_check'")
        )
        await asyncio.sleep(1)  # time for anything that should not happen (a second decision) to happen
        statuses = dict(await db.fetch("SELECT job_id, status FROM gate_jobs"))
        assert statuses == {"waiting": "cancelled", "in-outage": "released"}
        assert await decisions_by_job(db) == {("waiting", "job.cancelled"): 1, ("in-outage", "job.released"): 1}
        assert await ready_messages(backing.amqp_url, topology.dead_letter_queue) == 0
        assert await ready_messages(backing.amqp_url, topology.queue_name(GATE_JOBS_QUEUE)) == 0
        await db.close()
    finally:
        gates[-1].stop()
        await delete_topology(backing.amqp_url, exchange)

    # Each gate started during the outage said so once, and the last one said once that it was over.
    for gate in gates[1:]:
        assert len(messages(gate, DB_DOWN)) == 1, gate.log_text()
        assert not any(record["level"] == "error" for record in log_records(gate)), gate.log_text()
    assert len(messages(gates[-1], DB_BACK)) == 1


@pytest.mark.slow
async def test_database_stopping_under_load_and_gate_restarts_lose_no_job(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The database stops while the gate is busy: the jobs it was handling are handed back, not counted."""
    exchange = own_exchange("gate-load")
    topology = Topology(exchange)
    env = service_env | {"HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange}
    gates = [start_unready("gate", env, tmp_path / "gate-0.log")]
    db: asyncpg.Connection | None = None
    try:
        await wait_for_log(gates[0], "connected to RabbitMQ")
        async with publisher(backing.amqp_url, exchange) as publish:
            window = in_an_hour()
            await asyncio.gather(*(
                publish("job.start", {"job_id": f"load-{index:03}", "host_id": str(uuid.uuid4()), "window_ends_at": window})
                for index in range(300)
            ))  # fmt: skip
        own_postgres.stop()  # while the gate works through them
        await wait_for_log(gates[0], DB_DOWN)
        async with httpx.AsyncClient(timeout=10) as client:  # those it held went back to the queue, uncounted
            metrics = (await client.get(gates[0].base_url + "/metrics")).text
        assert handed_back(metrics, topology.queue_name(GATE_JOBS_QUEUE)) > 0
        for round_number in range(6):
            stop_with(gates[-1], round_number)
            gates.append(start_unready("gate", env, tmp_path / f"gate-{round_number + 1}.log"))
            await wait_for_log(gates[-1], DB_DOWN)
        own_postgres.start()
        db = await asyncpg.connect(own_database)
        await wait_until(lambda: db.fetchval("SELECT count(*) = 300 FROM gate_jobs WHERE status = 'released'"))  # type: ignore[union-attr]
        await asyncio.sleep(1)
        decided = await decisions_by_job(db)
        assert len(decided) == 300 and set(decided.values()) == {1}
        assert await ready_messages(backing.amqp_url, topology.dead_letter_queue) == 0
    finally:
        if db is not None:
            await db.close()
        gates[-1].stop()
        await delete_topology(backing.amqp_url, exchange)
    for gate in gates:
        log_records(gate)  # no traceback anywhere


@pytest.mark.slow
async def test_poller_restarted_during_a_database_outage_runs_the_tick_once_it_is_back(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    exchange = own_exchange("poller-outage")
    topology = Topology(exchange)
    env = service_env | {"HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange}
    pollers = [start_unready("poller", env, tmp_path / "poller-0.log")]
    try:
        with listening_port() as port:
            db = await asyncpg.connect(own_database)
            check_id = await unscheduled_tcp_check(db, port)
            await db.close()
            await wait_for_log(pollers[0], "connected to RabbitMQ")
            slot = dt.datetime.now(dt.UTC).replace(microsecond=0)
            own_postgres.stop()
            async with publisher(backing.amqp_url, exchange) as publish:
                await publish(
                    POLLER_TICK_QUEUE.bindings[0],
                    Tick(runs=[ScheduledRun(check_id=check_id, slot=slot)]).model_dump_json().encode(),
                )
            # The first poller may have taken the tick before it saw the outage; it hands the tick back (a
            # confirmed copy, then the ack of the original) and stops consuming. Killed between the two, it
            # would leave two copies, which is at-least-once and not what this test is about: let it finish.
            tick_queue = topology.queue_name(POLLER_TICK_QUEUE)
            await wait_for_log(pollers[0], DB_DOWN)
            await wait_until(lambda: no_consumer(backing.amqp_url, tick_queue))
            await asyncio.sleep(0.5)
            assert await ready_messages(backing.amqp_url, tick_queue) == 1
            for round_number in range(6):
                stop_with(pollers[-1], round_number)
                poller = start_unready("poller", env, tmp_path / f"poller-{round_number + 1}.log")
                pollers.append(poller)
                await wait_for_log(poller, "connected to RabbitMQ")
                await wait_for_log(poller, DB_DOWN)
                await asyncio.sleep(0.5)
                assert await ready_messages(backing.amqp_url, topology.queue_name(POLLER_TICK_QUEUE)) == 1
            own_postgres.start()

            db = await asyncpg.connect(own_database)
            try:
                await wait_until(
                    lambda: db.fetchval("SELECT count(*) > 0 FROM check_results WHERE check_id = $1", check_id)
                )
                await asyncio.sleep(1)
                results = await db.fetch("SELECT healthy FROM check_results WHERE check_id = $1", check_id)
                assert [row["healthy"] for row in results] == [True]
                assert await db.fetchval("SELECT last_slot FROM check_state WHERE check_id = $1", check_id) == slot
            finally:
                await db.close()
        assert await ready_messages(backing.amqp_url, topology.dead_letter_queue) == 0
    finally:
        pollers[-1].stop()
        await delete_topology(backing.amqp_url, exchange)
    for poller in pollers[1:]:
        assert len(messages(poller, DB_DOWN)) == 1, poller.log_text()
    assert len(messages(pollers[-1], DB_BACK)) == 1


# ---- a database that stops answering (hung, or cut off by the network) ------------------------------------------------


async def take_messages(amqp_url: str, queue_name: str, expected: int) -> list[AbstractIncomingMessage]:
    """Take `expected` messages out of the queue (acked), waiting for them."""
    taken: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection, asyncio.timeout(GUARD_SECONDS):
        queue = await (await connection.channel()).get_queue(queue_name)
        while len(taken) < expected:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            taken.append(message)
    return taken


@pytest.mark.slow
async def test_a_gate_stopped_while_the_database_hangs_exits_and_hands_its_messages_back(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    """A deploy's SIGTERM while PostgreSQL answers nothing (SIGSTOP: connections stay open, no reply, no
    refusal): the gate's handlers wait on queries that end only at their command timeout, and closing
    the pool would wait for them for ever. The gate must still exit cleanly within its grace period
    (or its supervisor kills it, and every message it holds counts a delivery) and hand back what it
    holds without a count."""
    exchange = own_exchange("gate-hang")
    topology = Topology(exchange)
    env = service_env | {"HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange}
    gate = start_unready("gate", env, tmp_path / "gate.log")
    try:
        await wait_until(lambda: _ready(gate))
        own_postgres.freeze()
        async with publisher(backing.amqp_url, exchange) as publish:
            for index in range(5):
                job = {"job_id": f"hung-{index}", "host_id": str(uuid.uuid4()), "window_ends_at": in_an_hour()}
                await publish("job.start", job)
        # The gate cannot tell a hung database from a slow one yet: it takes the messages and waits.
        await wait_until(lambda: _all_taken(backing.amqp_url, topology.queue_name(GATE_JOBS_QUEUE)))
        assert gate.stop(signal.SIGTERM, timeout=30) == 0, gate.log_text()
        back = await take_messages(backing.amqp_url, topology.queue_name(GATE_JOBS_QUEUE), 5)
        assert sorted(json.loads(message.body)["job_id"] for message in back) == [f"hung-{i}" for i in range(5)]
        for message in back:
            headers = message.headers or {}
            assert headers.get("x-delivery-count", 0) == 0 and headers[HANDBACK_HEADER] == 1, headers
    finally:
        own_postgres.thaw()
        gate.stop(signal.SIGKILL)
        await delete_topology(backing.amqp_url, exchange)
    log_records(gate)  # no traceback


async def _all_taken(amqp_url: str, queue_name: str) -> bool:
    return await ready_messages(amqp_url, queue_name) == 0


@pytest.mark.slow
async def test_every_service_stopped_while_the_database_hangs_exits_cleanly(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    exchange = own_exchange("all-hang")
    env = service_env | {
        "HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange,
        "HEALTHGATE_PRUNE_INTERVAL_SECONDS": "0.5",
    }  # fmt: skip
    services = await ready_services(("api", "gate", "poller", "pruner"), env, tmp_path)
    try:
        own_postgres.freeze()
        async with httpx.AsyncClient(timeout=1) as client:  # a request in flight on the api's side too
            with contextlib.suppress(httpx.HTTPError):
                await client.get(services[0].base_url + "/api/v1/hosts", headers={"Authorization": "Bearer x"})
        await asyncio.sleep(2)  # every task of every service now waits on the database
        # Stopped together, as `healthgate up` and a deploy stop them: each still has its 30 s.
        codes = stop_processes([service.process for service in services], signal.SIGTERM, timeout=30)
    finally:
        own_postgres.thaw()
        for service in services:
            service.stop(signal.SIGKILL)
        await delete_topology(backing.amqp_url, exchange)
    assert codes == [0, 0, 0, 0], [service.log_text()[-2000:] for service in services]
    # Not the api: uvicorn logs the traceback of the request it cancels when its graceful period ends.
    for service in services[1:]:
        log_records(service)


# ---- one warning and one "recovered" line per service -----------------------------------------------------------------


def warnings_of(service: ServiceProcess) -> list[str]:
    return [record["message"] for record in log_records(service) if record["level"] in ("warning", "error", "critical")]


@pytest.mark.slow
async def test_a_database_restart_is_one_warning_and_one_recovered_line_per_service(
    own_postgres: PostgresCluster, own_database: str, backing: BackingServices, service_env: dict[str, str],
    tmp_path: Path,
) -> None:  # fmt: skip
    exchange = own_exchange("db-restart")
    env = service_env | {
        "HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange,
        "HEALTHGATE_PRUNE_INTERVAL_SECONDS": "0.5",  # so that the pruner meets the outage too
    }  # fmt: skip
    services = await ready_services(("api", "gate", "poller", "pruner"), env, tmp_path)
    try:
        own_postgres.stop()
        for service in services:
            await wait_for_log(service, DB_DOWN)
        await asyncio.sleep(2)  # every task of every service meets the outage
        own_postgres.start()
        for service in services:
            await wait_for_log(service, DB_BACK)
            await wait_until(lambda service=service: _ready(service))
        async with publisher(backing.amqp_url, exchange) as publish:  # and work goes on
            await publish(
                "job.start", {"job_id": "after", "host_id": str(uuid.uuid4()), "window_ends_at": in_an_hour()}
            )
        db = await asyncpg.connect(own_database)
        try:
            await wait_until(lambda: db.fetchval("SELECT count(*) = 1 FROM gate_jobs WHERE status = 'released'"))
        finally:
            await db.close()
    finally:
        codes = [service.stop() for service in services]
        await delete_topology(backing.amqp_url, exchange)
    assert codes == [0, 0, 0, 0]
    for service in services:
        assert warnings_of(service) == [DB_DOWN], service.log_text()
        assert len(messages(service, DB_BACK)) == 1, service.log_text()
        assert messages(service, DB_DOWN)[0]["error"]


async def ready_services(names: tuple[str, ...], env: dict[str, str], tmp_path: Path) -> list[ServiceProcess]:
    """Start these services (logs in `tmp_path`) and wait until each is ready."""
    services = start_together(
        *(functools.partial(start_unready, name, env, tmp_path / f"{name}.log") for name in names)
    )
    for service in services:
        await wait_until(lambda service=service: _ready(service))
    return services


async def _ready(service: ServiceProcess) -> bool:
    async with httpx.AsyncClient(timeout=5) as client:
        with contextlib.suppress(httpx.HTTPError):
            return (await client.get(service.base_url + "/health/ready")).status_code == 200
    return False


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["restart", "crash"])
async def test_a_broker_restart_is_one_warning_and_one_recovered_line_per_service(
    outage: str, own_rabbit: RabbitNode, private_database: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    exchange = own_exchange("broker-restart")
    env = service_env | {
        "HEALTHGATE_DATABASE_URL": private_database, "HEALTHGATE_AMQP_URL": own_rabbit.amqp_url,
        "HEALTHGATE_EXCHANGE": exchange,
    }  # fmt: skip
    services = start_together(
        *(functools.partial(start_unready, name, env, tmp_path / f"{name}.log") for name in ("api", "gate", "poller"))
    )
    try:
        for service in services:
            await wait_until(lambda service=service: _ready(service))
        if outage == "restart":
            await asyncio.to_thread(own_rabbit.stop_app)
            for service in services:
                await wait_for_log(service, BROKER_DOWN)
            await asyncio.sleep(2)
            await asyncio.to_thread(own_rabbit.start_app)
        else:
            # RabbitMQ 3.10 may never recover a quorum queue created a second or two before the node was
            # killed (its Ra member waits for a leader forever: "leader not known"), and a consumer of it then
            # hangs the client's reconnect. A deployed system's queues are long-lived; so are these, here.
            await asyncio.sleep(QUORUM_QUEUE_SETTLING_SECONDS)
            await asyncio.to_thread(own_rabbit.kill)
            for service in services:
                await wait_for_log(service, BROKER_DOWN)
            await asyncio.sleep(2)
            await asyncio.to_thread(own_rabbit.start)
        for service in services:
            await wait_for_log(service, BROKER_BACK)
            await wait_until(lambda service=service: _ready(service))

        # Work resumes: a job is decided and its event published, and a tick runs.
        with listening_port() as port:
            db = await asyncpg.connect(private_database)
            try:
                check_id = await unscheduled_tcp_check(db, port)
                async with publisher(own_rabbit.amqp_url, exchange) as publish:
                    await publish(
                        "job.start", {"job_id": "after", "host_id": str(uuid.uuid4()), "window_ends_at": in_an_hour()}
                    )
                    await publish(
                        POLLER_TICK_QUEUE.bindings[0],
                        Tick(runs=[ScheduledRun(check_id=check_id)]).model_dump_json().encode(),
                    )
                await wait_until(
                    lambda: db.fetchval("SELECT count(*) > 0 FROM check_results WHERE check_id = $1", check_id)
                )
                await wait_until(
                    lambda: db.fetchval(
                        "SELECT count(*) = 1 FROM outbox WHERE routing_key = 'job.released' AND sent_at IS NOT NULL"
                    )
                )
            finally:
                await db.close()
    finally:
        codes = [service.stop() for service in services]
    assert codes == [0, 0, 0]
    for service in services:
        assert warnings_of(service) == [BROKER_DOWN], service.log_text()
        assert len(messages(service, BROKER_BACK)) == 1, service.log_text()


# ---- the mechanism itself (shared/consuming.py), in this process, with the real broker and database --------------------


SPEC = GATE_JOBS_QUEUE  # any dead-lettered queue of the topology


class Harness:
    """One `Consumers` with one handler, on an exchange of its own, as a service runs it."""

    def __init__(self, amqp_url: str, dsn: str, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        self.topology = Topology(own_exchange("consuming"))
        self.amqp_url = amqp_url
        self.dsn = dsn
        self.handler = handler
        self.tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> Harness:
        self.pool = await create_pool(self.dsn, min_size=0, max_size=4)
        self.database = DatabaseWatch(self.dsn, self.pool)
        self.broker = Broker(self.amqp_url, self.topology, connection_name="hg-test-consuming")
        self.consumers = Consumers(self.broker, self.database, ConsumerMetrics(CollectorRegistry()))
        self.consumers.add(SPEC, self.handler, prefetch=4)
        self.tasks.append(asyncio.create_task(self.database.run()))
        await self.broker.run(self.consumers.attach)
        self.tasks.append(asyncio.create_task(self.consumers.run()))
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.consumers.stop(1)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.broker.close()
        await self.pool.close()
        await delete_topology(self.amqp_url, self.topology.exchange)

    async def publish(self, body: bytes, routing_key: str = "job.start") -> None:
        await self.broker.publish(routing_key, body, message_id=str(uuid.uuid4()), content_type="application/json")

    async def dead_letters(self, expected: int) -> list[AbstractIncomingMessage]:
        return await take_messages(self.amqp_url, self.topology.dead_letter_queue, expected)


async def test_a_handler_bug_still_reaches_the_delivery_limit(backing: BackingServices, database_url: str) -> None:
    deliveries: list[int] = []

    async def buggy(message: AbstractIncomingMessage) -> None:
        deliveries.append(int((message.headers or {}).get("x-delivery-count", 0)))
        raise ZeroDivisionError("a bug, not an outage")

    async with Harness(backing.amqp_url, database_url, buggy) as harness:
        await harness.publish(b'{"bug": true}')
        (dead,) = await harness.dead_letters(1)
        assert dead.routing_key == "job.start" and dead.body == b'{"bug": true}'
        assert deliveries == list(range(SPEC.delivery_limit + 1))  # the first delivery and five more


async def test_a_bug_that_looks_like_an_outage_is_not_handed_back_forever(
    backing: BackingServices, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.consuming, "HANDBACK_LIMIT", 3)
    handbacks: list[int] = []

    async def confused(message: AbstractIncomingMessage) -> None:
        handbacks.append(int((message.headers or {}).get(HANDBACK_HEADER, 0)))
        raise ConnectionRefusedError("not really the database")  # the probe finds it up every time

    async with Harness(backing.amqp_url, database_url, confused) as harness:
        await harness.publish(b'{"loop": true}')
        (dead,) = await harness.dead_letters(1)
    # Handed back three times without a count, then returned with one each time, up to the delivery limit.
    assert dead.body == b'{"loop": true}' and (dead.headers or {})[HANDBACK_HEADER] == 3
    assert handbacks[:3] == [0, 1, 2] and max(handbacks) == 3


async def test_a_message_that_meets_an_outage_is_handed_back_without_a_delivery_counted(
    backing: BackingServices, own_postgres: PostgresCluster, own_database: str
) -> None:
    seen: list[tuple[bytes, dict[str, Any], str | None]] = []
    holding = asyncio.Event()
    release = asyncio.Event()
    harness: Harness

    async def uses_the_database(message: AbstractIncomingMessage) -> None:
        seen.append((message.body, dict(message.headers or {}), message.routing_key))
        if message.body == b"first" and not release.is_set():
            holding.set()
            await release.wait()
        await harness.pool.fetchval("SELECT 1")

    async with Harness(backing.amqp_url, own_database, uses_the_database) as harness:
        await harness.publish(b"first", routing_key="job.cancel")
        await asyncio.wait_for(holding.wait(), GUARD_SECONDS)
        await asyncio.to_thread(own_postgres.stop)
        release.set()  # the handler now meets the outage
        await wait_until(lambda: not harness.database.is_up)
        await harness.publish(b"second")  # not taken while the database is down
        await asyncio.sleep(1)
        queue_name = harness.topology.queue_name(SPEC)
        assert await ready_messages(backing.amqp_url, queue_name) == 2
        assert [body for body, _, _ in seen] == [b"first"]
        await asyncio.to_thread(own_postgres.start)
        await wait_until(lambda: len(seen) == 3)
        await asyncio.sleep(0.5)
        assert await ready_messages(backing.amqp_url, queue_name) == 0
        assert await ready_messages(backing.amqp_url, harness.topology.dead_letter_queue) == 0
    handed_back = [(headers, key) for body, headers, key in seen[1:] if body == b"first"]
    assert len(handed_back) == 1
    headers, routing_key = handed_back[0]
    assert routing_key == "job.cancel"  # the copy keeps its routing key
    assert headers.get("x-delivery-count", 0) == 0 and headers[HANDBACK_HEADER] == 1


async def test_messages_still_at_work_when_the_grace_period_ends_are_handed_back(
    backing: BackingServices, database_url: str
) -> None:
    started = asyncio.Event()

    async def hangs(message: AbstractIncomingMessage) -> None:
        started.set()
        await asyncio.Event().wait()

    async with Harness(backing.amqp_url, database_url, hangs) as harness:
        await harness.publish(b"stuck")
        await asyncio.wait_for(started.wait(), GUARD_SECONDS)
        await harness.consumers.stop(0.5)
        connection = await aio_pika.connect(backing.amqp_url)
        async with connection:
            queue = await (await connection.channel()).get_queue(harness.topology.queue_name(SPEC))
            async with asyncio.timeout(GUARD_SECONDS):
                while (message := await queue.get(fail=False)) is None:
                    await asyncio.sleep(0.1)
            await message.ack()
    assert message.body == b"stuck"
    assert (message.headers or {}).get("x-delivery-count", 0) == 0 and (message.headers or {})[HANDBACK_HEADER] == 1


async def test_services_whose_database_sessions_are_terminated_under_load_keep_running(
    own_database: str, backing: BackingServices, service_env: dict[str, str], tmp_path: Path
) -> None:
    """PostgreSQL's sessions of a busy poller and gate are terminated again and again (pg_terminate_backend, as an
    operator or a failover does): asyncpg then fails the next use of a pooled connection, some with
    InternalClientError "cannot switch to state". Each service goes on (no task of it dies, it does not exit) and
    its work is done once the terminations stop: the poller stores the last tick's result of every check."""
    exchange = own_exchange("terminated")
    env = service_env | {"HEALTHGATE_DATABASE_URL": own_database, "HEALTHGATE_EXCHANGE": exchange}
    db = await asyncpg.connect(own_database)
    services: list[ServiceProcess] = []
    try:
        with listening_port() as port:
            check_ids = [await unscheduled_tcp_check(db, port) for _ in range(40)]
            services = [start_unready(name, env, tmp_path / f"{name}.log") for name in ("poller", "gate")]
            for service in services:
                await wait_for_log(service, "connected to RabbitMQ")
            slot = dt.datetime.now(dt.UTC).replace(microsecond=0)
            async with publisher(backing.amqp_url, exchange) as publish:
                for round_number in range(30):
                    slot += dt.timedelta(seconds=1)
                    tick = Tick(runs=[ScheduledRun(check_id=check_id, slot=slot) for check_id in check_ids])
                    await publish(POLLER_TICK_QUEUE.bindings[0], tick.model_dump_json().encode())
                    await asyncio.sleep(0.1)
                    if round_number % 2 == 0:
                        await db.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
            # A tick that failed on a terminated session is handed back or retried: every check gets its last slot.
            await wait_until(
                lambda: db.fetchval(
                    "SELECT count(*) = $1 FROM check_state WHERE check_id = ANY($2) AND last_slot = $3",
                    len(check_ids), check_ids, slot,
                )
            )  # fmt: skip
        for service in services:
            assert service.process.poll() is None, service.log_text()
            assert "a service task failed" not in service.log_text()
    finally:
        await db.close()
        stop_processes([service.process for service in services])
        await delete_topology(backing.amqp_url, exchange)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), True),
        (asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"), True),
        (asyncpg.InternalClientError("unexpected codec state"), False),
        (asyncpg.InternalClientError('cannot switch to state 12; protocol is in the "failed" state'), False),
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.DataError("invalid input for query argument $1"), False),
        (asyncpg.UniqueViolationError("duplicate key"), False),
        (asyncpg.exceptions.ClientConfigurationError("bad option"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_database_errors_are_an_outage(error: BaseException, transient: bool) -> None:
    assert is_transient_database_error(error) is transient
