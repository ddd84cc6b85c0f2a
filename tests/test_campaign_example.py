"""The example executor of docs/campaigns.md (docs/examples/campaign_executor.py) compiles, imports, and drives a
job as the guide says, over the real broker.

In the run below the test plays healthgate on an exchange of its own (no healthgate process listens there): it
answers each `job.start` the script publishes, and each `job.finished` with a verification outcome, so that the
script's side of the protocol is checked on its own: one `job.start` per host, persistent and confirmed; a
`job.finished` only after `job.released`, once per host however often the release is delivered; the outcome of
every host reported, and the exit status.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import py_compile
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from tests.support.services import BackingServices

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "campaign_executor.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("campaign_executor", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as an import would: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_example_compiles_and_imports_without_running() -> None:
    py_compile.compile(str(EXAMPLE), doraise=True)
    example = load_example()
    arguments = example.parse_arguments(["--job-id", "j", "--max-failed-hosts", "1", "h-1", "h-2"])
    assert (arguments.job_id, arguments.hosts, arguments.max_failed_hosts) == ("j", ["h-1", "h-2"], 1)
    start = example.job_start("j", "h-1", example.dt.datetime(2030, 1, 1, tzinfo=example.dt.UTC), 1)
    assert start == {
        "job_id": "j",
        "host_id": "h-1",
        "window_ends_at": "2030-01-01T00:00:00+00:00",
        "max_failed_hosts": 1,
    }
    assert example.job_finished("j", "h-1", False, "x" * 2000) == {
        "job_id": "j",
        "host_id": "h-1",
        "outcome": "failed",
        "detail": "x" * 1000,
    }


def test_the_events_it_sends_are_what_healthgate_reads() -> None:
    """The script's job.start and job.finished decode as healthgate's own inbound models."""
    from shared.events import JobFinished, JobStart, decode_event

    example = load_example()
    host_id = str(uuid.uuid4())
    window = example.dt.datetime.now(example.dt.UTC)
    _, start = example.cloudevent("job.start", example.job_start("patch/1", host_id, window, 2))
    assert decode_event(start, JobStart).max_failed_hosts == 2
    _, finished = example.cloudevent("job.finished", example.job_finished("patch/1", host_id, True, "ok"))
    assert decode_event(finished, JobFinished).outcome == "succeeded"


@pytest.fixture
async def exchange_of_its_own(backing: BackingServices) -> AsyncIterator[tuple[str, AbstractExchange]]:
    name = f"hgtest-example-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        try:
            yield name, exchange
        finally:
            await channel.exchange_delete(name)


async def test_the_example_drives_a_job_over_the_broker(
    backing: BackingServices, exchange_of_its_own: tuple[str, AbstractExchange]
) -> None:
    exchange_name, exchange = exchange_of_its_own
    hosts = [str(uuid.uuid4()) for _ in range(3)]
    verified, broken, refused = hosts
    job_id = "patch/2026-12"
    queue_name = f"{exchange_name}.executor"
    received: dict[str, list[AbstractIncomingMessage]] = {"job.start": [], "job.finished": []}
    finished = asyncio.Event()

    async def answer(routing_key: str, data: dict[str, object]) -> None:
        body = json.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/test", "type": routing_key,
                           "time": "2026-12-01T00:00:00Z", "data": data})  # fmt: skip
        await exchange.publish(
            aio_pika.Message(body.encode(), correlation_id=job_id), routing_key=routing_key, mandatory=True
        )

    async def healthgate(message: AbstractIncomingMessage) -> None:
        """What the gate would answer: release two hosts, fail the third; verify one patched host, not the other.
        The first release is delivered twice (same event id), as a redelivery would."""
        received[message.routing_key or ""].append(message)
        data = json.loads(message.body)["data"]
        host_id = data["host_id"]
        if message.routing_key == "job.start":
            if host_id == refused:
                await answer("job.failed", {"job_id": job_id, "host_id": host_id, "reason": "window_closed",
                                            "detail": "the window closed", "checks": []})  # fmt: skip
                return
            release = json.dumps({"specversion": "1.0", "id": f"release-{host_id}", "source": "/test",
                                  "type": "job.released", "time": "2026-12-01T00:00:00Z",
                                  "data": {"job_id": job_id, "host_id": host_id, "waited_seconds": 0.1}})  # fmt: skip
            for _ in range(2 if host_id == verified else 1):
                await exchange.publish(aio_pika.Message(release.encode()), routing_key="job.released", mandatory=True)
        elif message.routing_key == "job.finished":
            outcome = "job.verified" if host_id == verified else "job.verification_failed"
            await answer(outcome, {"job_id": job_id, "host_id": host_id, "detail": "homepage: status 503"})
            if len(received["job.finished"]) == 2:
                finished.set()

    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel()
        listener = await channel.declare_queue(exclusive=True)
        for routing_key in ("job.start", "job.finished"):
            await listener.bind(exchange_name, routing_key)
        await listener.consume(healthgate, no_ack=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--amqp-url", backing.amqp_url, "--exchange", exchange_name,
            "--queue", queue_name, "--job-id", job_id, "--patch-seconds", "0.2", "--max-failed-hosts", "1", *hosts,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):  # a guard against a hang, not a measurement
                stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
        await channel.queue_delete(queue_name)

    log = stderr.decode()
    assert process.returncode == 1, log  # not every host was verified
    outcomes = dict(line.split("\t") for line in stdout.decode().splitlines())
    assert outcomes == {verified: "verified", broken: "verification failed", refused: "failed"}, log
    starts = [json.loads(message.body) for message in received["job.start"]]
    assert [start["data"]["host_id"] for start in starts] == hosts  # one each, in the order given
    assert all(start["data"]["max_failed_hosts"] == 1 for start in starts)
    for message in received["job.start"] + received["job.finished"]:
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.correlation_id == job_id and message.message_id == json.loads(message.body)["id"]
    # Only released hosts were patched, each once although the first release came twice.
    finishes = sorted((json.loads(message.body)["data"]["host_id"], json.loads(message.body)["data"]["outcome"])
                      for message in received["job.finished"])  # fmt: skip
    assert finishes == sorted([(verified, "succeeded"), (broken, "succeeded")])
    assert finished.is_set()
