"""The notifier service (CONTRACT §7) as a real process, against the real broker and database and real HTTP receivers
on 127.0.0.1: signed webhooks delivered once, duplicates and several notifiers, retries with back-off, a hanging
receiver, maintenance, blocked networks, secrets kept out of logs, and a SIGKILL mid-burst."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from shared.crypto import SecretBox, load_or_create_key
from shared.events import HostStatusChanged, JobHalted, encode_cloudevent
from shared.notification_channels import ChannelFields, generate_secret, insert_channel
from shared.topology import Topology, declare_exchange
from tests.support.processes import ServiceProcess, free_port, start_service
from tests.support.receiver import Receiver
from tests.support.services import BackingServices
from tests.support.topology import delete_topology

# Short settings: the first retry after 0.2 s, POSTs that may take 3 s.
RETRY_SECONDS = "0.2"
TIMEOUT_SECONDS = "3"
BLOCKED = "127.0.0.2/32"
EXAMPLE_RECEIVER = Path(__file__).resolve().parent.parent / "docs" / "examples" / "webhook_receiver.py"


@pytest.fixture
def notifier_env(service_env: dict[str, str], backing: BackingServices) -> Iterator[dict[str, str]]:
    """The environment of the test's notifiers: the session's database (emptied by `db`) and an exchange of the
    test's own, so that only the test's events reach them."""
    exchange = f"hgtest-notify-{uuid.uuid4().hex[:8]}"
    yield service_env | {
        "HEALTHGATE_EXCHANGE": exchange,
        "HEALTHGATE_NOTIFIER_RETRY_SECONDS": RETRY_SECONDS,
        "HEALTHGATE_NOTIFIER_TIMEOUT_SECONDS": TIMEOUT_SECONDS,
        "HEALTHGATE_BLOCKED_NETWORKS": BLOCKED,
        # 8 slots per channel (the default is 32): a hanging receiver fills them with few events, and the
        # at-least-once window of a kill is as small as the tests count it.
        "HEALTHGATE_NOTIFIER_CONCURRENCY": "8",
    }
    asyncio.run(delete_topology(backing.amqp_url, exchange))


@pytest.fixture
def notifiers(notifier_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """start(**overrides): a notifier process on a health port of its own; all are stopped after the test."""
    started: list[ServiceProcess] = []

    def start(**overrides: str) -> ServiceProcess:
        port = free_port()
        env = notifier_env | {"HEALTHGATE_HEALTH_PORT": str(port)} | overrides
        service = start_service("notifier", env, tmp_path / f"notifier-{len(started)}.log", port=port)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
async def publish(
    backing: BackingServices, notifier_env: dict[str, str]
) -> AsyncIterator[Callable[[str, bytes], Awaitable[None]]]:
    """publish(routing_key, body): a persistent message on the test's exchange, with a confirm."""
    connection = await aio_pika.connect(backing.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_exchange(channel, Topology(notifier_env["HEALTHGATE_EXCHANGE"]))

        async def send(routing_key: str, body: bytes) -> None:
            message = aio_pika.Message(
                body, content_type="application/cloudevents+json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, routing_key)

        yield send


@pytest.fixture
def box(notifier_env: dict[str, str]) -> SecretBox:
    return SecretBox(load_or_create_key(Path(notifier_env["HEALTHGATE_KEY_FILE"])))


async def make_channel(
    db: asyncpg.Connection,
    box: SecretBox,
    url: str,
    *,
    kind: str = "webhook",
    events: tuple[str, ...] = ("host.status_changed",),
    groups: tuple[str, ...] = (),
    include_maintenance: bool = False,
    enabled: bool = True,
) -> tuple[uuid.UUID, str | None]:
    """A channel (its id and secret) written as the api writes it."""
    secret = generate_secret() if kind == "webhook" else None
    fields = ChannelFields(
        name=f"channel-{uuid.uuid4().hex[:8]}", type=kind, url=url, events=events, groups=groups,  # type: ignore[arg-type]
        include_maintenance=include_maintenance, enabled=enabled, secret=secret,
    )  # fmt: skip
    row = await insert_channel(db, fields, box)
    return row["id"], secret


async def make_host(db: asyncpg.Connection, name: str, group: str) -> uuid.UUID:
    host_id = uuid.uuid4()
    await db.execute(
        'INSERT INTO hosts (id, name, "group", health_check_status) VALUES ($1, $2, $3, $4)',
        host_id, name, group, "unhealthy",
    )  # fmt: skip
    return host_id


def host_event(host_id: uuid.UUID, *, in_maintenance: bool = False) -> tuple[uuid.UUID, bytes]:
    data = HostStatusChanged(
        host_id=host_id, previous="healthy", current="unhealthy", at=dt.datetime.now(dt.UTC),
        in_maintenance=in_maintenance,
    )  # fmt: skip
    return encode_cloudevent("host.status_changed", data, source="healthgate/test")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Wait until `condition()` holds, checking every 50 ms; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def statuses(db: asyncpg.Connection, channel_id: uuid.UUID) -> Counter[str]:
    rows = await db.fetch("SELECT status FROM notification_deliveries WHERE channel_id = $1", channel_id)
    return Counter(row["status"] for row in rows)


async def test_a_host_going_unhealthy_reaches_a_webhook_once_signed_and_slack_as_a_line(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifier = notifiers()
    async with Receiver() as hook, Receiver() as chat:
        webhook_id, secret = await make_channel(db, box, hook.url)
        slack_id, _ = await make_channel(db, box, chat.url, kind="slack")
        await make_channel(db, box, hook.url, enabled=False)  # disabled channels never get anything
        host_id = await make_host(db, "web-1", "web")
        event_id, body = host_event(host_id)
        await publish("host.status_changed", body)
        (request,) = await hook.wait_for(1)
        (line,) = await chat.wait_for(1)
        await until(lambda: _all_delivered(db, 2))
        assert secret is not None
        Webhook(secret).verify(request.body, request.headers)  # the reference library accepts it
        assert request.body == body and request.headers["webhook-id"] == str(event_id)
        assert request.headers["Content-Type"] == "application/cloudevents+json"
        text = json.loads(line.body)["text"]
        assert "web-1" in text and "web" in text, text
        record = await db.fetchrow("SELECT * FROM notification_deliveries WHERE channel_id = $1", webhook_id)
        assert (record["event_id"], record["attempts"], record["status_code"]) == (event_id, 1, 200)
        assert await statuses(db, slack_id) == Counter(delivered=1)
        await _quiet(notifier)
        assert len(hook.requests) == 1 and len(chat.requests) == 1
    assert secret not in notifier.log_text()


async def _all_delivered(db: asyncpg.Connection, count: int) -> bool:
    delivered = await db.fetchval("SELECT count(*) FROM notification_deliveries WHERE status = 'delivered'")
    return bool(delivered == count)


async def _quiet(notifier: ServiceProcess) -> None:
    """Let the notifier poll a few more times (a second delivery would show up)."""
    await asyncio.sleep(0.5)


async def test_the_same_event_twice_and_two_notifiers_deliver_once_per_channel(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    notifiers()
    async with Receiver() as first, Receiver() as second:
        ids = [(await make_channel(db, box, receiver.url))[0] for receiver in (first, second)]
        host_id = await make_host(db, "db-1", "db")
        events = [host_event(host_id) for _ in range(20)]
        for _, body in events:
            await publish("host.status_changed", body)
            await publish("host.status_changed", body)  # at-least-once: the same event again, same id
        await until(lambda: _all_delivered(db, 2 * len(events)))
        await asyncio.sleep(0.5)
        for receiver, channel_id in zip((first, second), ids, strict=True):
            received = Counter(request.headers["webhook-id"] for request in receiver.requests)
            assert received == Counter({str(event_id): 1 for event_id, _ in events})
            assert await statuses(db, channel_id) == Counter(delivered=len(events))


async def test_a_receiver_failing_three_times_gets_the_fourth_attempt_after_back_off(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifier = notifiers()
    async with Receiver(answers=[500, 500, 500, 200]) as receiver:
        # A password in the URL and the secret: neither may reach a log line or a detail.
        url = receiver.url.replace("127.0.0.1", "hook-user:url-password-1234@127.0.0.1")
        channel_id, secret = await make_channel(db, box, url)
        event_id, body = host_event(await make_host(db, "app-1", "app"))
        await publish("host.status_changed", body)
        requests = await receiver.wait_for(4)
        await until(lambda: _all_delivered(db, 1))
        record = await db.fetchrow("SELECT * FROM notification_deliveries WHERE channel_id = $1", channel_id)
        assert (record["attempts"], record["status"], record["status_code"]) == (4, "delivered", 200)
        # The back-off doubles from 0.2 s: each wait is at least its share (jitter only adds).
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps
        await _quiet(notifier)
        assert len(receiver.requests) == 4
    log = notifier.log_text()
    failures = [line for line in log.splitlines() if "notification delivery failed" in line]
    assert len(failures) == 3, log
    assert all(json.loads(line)["event_id"] == str(event_id) for line in failures)
    assert secret is not None
    for hidden in (secret, "url-password-1234"):
        assert hidden not in log
        assert not await db.fetchval(
            "SELECT count(*) FROM notification_deliveries WHERE detail LIKE '%' || $1 || '%'"
            " OR position(convert_to($1, 'UTF8') in body) > 0",
            hidden,
        )


async def test_a_receiver_that_never_answers_does_not_hold_up_other_channels(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    # POSTs may take 10 s here, so that the hanging channel's first attempts are still waiting when the others are
    # done: more events than a channel's 8 slots, so the hanging channel's slots are all taken.
    notifiers(HEALTHGATE_NOTIFIER_TIMEOUT_SECONDS="10")
    async with Receiver(hang=True) as hanging, Receiver() as first, Receiver() as second:
        hanging_id, _ = await make_channel(db, box, hanging.url)
        others = [(await make_channel(db, box, receiver.url))[0] for receiver in (first, second)]
        host_id = await make_host(db, "cache-1", "cache")
        for _ in range(20):
            await publish("host.status_changed", host_event(host_id)[1])
        await until(lambda: _all_delivered(db, 40))
        for channel_id in others:
            assert await statuses(db, channel_id) == Counter(delivered=20)
        # Meanwhile the hanging receiver has 8 requests open and no answer was stored for any of its records.
        assert len(hanging.requests) == 8
        answered = await db.fetchval(
            "SELECT count(*) FROM notification_deliveries WHERE channel_id = $1 AND detail IS NOT NULL", hanging_id
        )
        assert answered == 0 and await statuses(db, hanging_id) == Counter(pending=20)


async def test_events_in_maintenance_are_skipped_unless_the_channel_includes_them(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    async with Receiver() as plain, Receiver() as including, Receiver() as other_group:
        plain_id, _ = await make_channel(db, box, plain.url)
        including_id, _ = await make_channel(db, box, including.url, include_maintenance=True)
        other_id, _ = await make_channel(db, box, other_group.url, groups=("db",))
        host_id = await make_host(db, "web-2", "web")
        patched, body = host_event(host_id, in_maintenance=True)
        await publish("host.status_changed", body)
        marker, body = host_event(host_id)
        await publish("host.status_changed", body)  # after it: once it is delivered, the first was handled
        await plain.wait_for(1)
        await including.wait_for(2)
        await until(lambda: _all_delivered(db, 3))
        assert [request.headers["webhook-id"] for request in plain.requests] == [str(marker)]
        assert {request.headers["webhook-id"] for request in including.requests} == {str(patched), str(marker)}
        assert await statuses(db, plain_id) == Counter(delivered=1)
        assert await statuses(db, including_id) == Counter(delivered=2)
        assert await statuses(db, other_id) == Counter() and other_group.requests == []


async def test_job_events_without_a_host_match_by_the_groups_of_the_jobs_hosts(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    async with Receiver() as web, Receiver() as dbs:
        await make_channel(db, box, web.url, events=("job.halted",), groups=("web",))
        dbs_id, _ = await make_channel(db, box, dbs.url, events=("job.halted",), groups=("db",))
        host_id = await make_host(db, "web-3", "web")
        await db.execute(
            "INSERT INTO gate_jobs (job_id, host_id, status, window_ends_at, decided_at)"
            " VALUES ('patch-7', $1, 'failed', now(), now())",
            host_id,
        )
        halted = JobHalted(job_id="patch-7", at=dt.datetime.now(dt.UTC), reason="manual", failed_hosts=[],
                           detail="stop", by="ops")  # fmt: skip
        event_id, body = encode_cloudevent("job.halted", halted, source="healthgate/test")
        await publish("job.halted", body)
        (request,) = await web.wait_for(1)
        assert request.headers["webhook-id"] == str(event_id)
        await until(lambda: _all_delivered(db, 1))
        assert await statuses(db, dbs_id) == Counter() and dbs.requests == []


async def test_a_channel_url_into_a_blocked_network_fails_at_once(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    async with Receiver() as receiver:
        channel_id, _ = await make_channel(db, box, receiver.url.replace("127.0.0.1", "127.0.0.2"))
        await publish("host.status_changed", host_event(await make_host(db, "mail-1", "mail"))[1])

        async def failed() -> bool:
            return await statuses(db, channel_id) == Counter(failed=1)

        await until(failed)
        record = await db.fetchrow("SELECT * FROM notification_deliveries WHERE channel_id = $1", channel_id)
        assert record["attempts"] == 1 and "blocked" in record["detail"], dict(record)
        assert receiver.requests == []


async def test_a_notifier_killed_mid_burst_delivers_everything_after_a_restart_and_nothing_twice_that_was_done(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifier = notifiers(HEALTHGATE_NOTIFIER_TIMEOUT_SECONDS="1")  # leases of 6 s: a restart claims them again
    async with Receiver() as receiver:
        channel_id, _ = await make_channel(db, box, receiver.url)
        host_id = await make_host(db, "batch-1", "batch")
        events = [host_event(host_id) for _ in range(300)]
        for _, body in events:
            await publish("host.status_changed", body)
        await receiver.wait_for(60)
        notifier.stop(signal.SIGKILL)
        done_before = {
            row["event_id"]
            for row in await db.fetch(
                "SELECT event_id FROM notification_deliveries WHERE channel_id = $1 AND status = 'delivered'",
                channel_id,
            )
        }
        notifier.restart()
        await until(lambda: _all_delivered(db, len(events)), timeout=60)
        received = Counter(uuid.UUID(request.headers["webhook-id"]) for request in receiver.requests)
        assert set(received) == {event_id for event_id, _ in events}
        twice = {event_id for event_id, count in received.items() if count > 1}
        # Only what was in flight at the kill (at most the 8 slots of the channel) is sent again, never a record
        # that was delivered already.
        assert len(twice) <= 8 and not twice & done_before, (len(twice), len(done_before))
        assert all(count <= 2 for count in received.values())


async def test_the_receiver_example_of_the_docs_verifies_a_real_delivery(
    db: asyncpg.Connection, box: SecretBox, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    import importlib.util

    spec = importlib.util.spec_from_file_location("webhook_receiver", EXAMPLE_RECEIVER)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    notifiers()
    async with Receiver() as receiver:
        _, secret = await make_channel(db, box, receiver.url)
        event_id, body = host_event(await make_host(db, "docs-1", "docs"))
        await publish("host.status_changed", body)
        (request,) = await receiver.wait_for(1)
    seen: set[str] = set()
    event = example.verified_event(secret, request.body, request.headers, seen)
    assert event["id"] == str(event_id) and event["type"] == "healthgate.host.status_changed"
    assert example.verified_event(secret, request.body, request.headers, seen) is None  # a duplicate
    with pytest.raises(example.WebhookVerificationError):
        example.verified_event(secret, request.body + b" ", request.headers, set())
