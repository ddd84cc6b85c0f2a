"""Where the tests' PostgreSQL and RabbitMQ are: environment variables, else testcontainers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class BackingServices:
    database_url: str  # a server-level DSN; each test session creates its own database on it
    amqp_url: str


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


@contextlib.contextmanager
def backing_services() -> Iterator[BackingServices]:
    database_url = os.environ.get("HEALTHGATE_TEST_DATABASE_URL")
    amqp_url = os.environ.get("HEALTHGATE_TEST_AMQP_URL")
    if database_url and amqp_url:
        yield BackingServices(database_url, amqp_url)
        return
    if not _docker_available():
        raise RuntimeError(
            "set HEALTHGATE_TEST_DATABASE_URL and HEALTHGATE_TEST_AMQP_URL (make test does), "
            "or make a Docker engine available for testcontainers"
        )
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    with contextlib.ExitStack() as stack:
        if not database_url:
            postgres = stack.enter_context(PostgresContainer("postgres:16", driver=None))
            database_url = postgres.get_connection_url()
        if not amqp_url:
            rabbitmq = stack.enter_context(RabbitMqContainer("rabbitmq:3.13"))
            amqp_url = (
                f"amqp://{rabbitmq.username}:{rabbitmq.password}@"
                f"{rabbitmq.get_container_host_ip()}:{rabbitmq.get_exposed_port(rabbitmq.port)}/"
            )
        yield BackingServices(database_url, amqp_url)
