"""The notifier (CONTRACT §7) while channels change under it, found breaking issue 14: a channel disabled, or made
another type, while a delivery to it is being retried, and check.config events of a group's hosts. A real notifier
process, the real broker and database, channels changed through the real API, real receivers on 127.0.0.1.

Each was a finding: a disabled channel's records pending for ever (and the queue lag growing), the body made for
the type the channel had when the event arrived, check.config events never matched to their host's group."""

# ruff: noqa: F811  (the notifier fixtures of tests/test_notifier.py, imported below, are the tests' arguments)
from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from shared.crypto import SecretBox
from tests.support.processes import ServiceProcess
from tests.support.receiver import Receiver
from tests.test_notifier import (  # noqa: F401  (fixtures)
    box,
    host_event,
    make_channel,
    make_host,
    notifier_env,
    notifiers,
    publish,
    until,
)

CHANNELS = "/api/v1/notification-channels"


async def channel_body(admin: httpx.AsyncClient, channel_id: uuid.UUID, **changes: Any) -> dict[str, Any]:
    """The channel as GET shows it, with `changes`: a PUT body (the read-only fields are ignored by the API)."""
    answer = await admin.get(f"{CHANNELS}/{channel_id}")
    assert answer.status_code == 200, answer.text
    return answer.json() | changes


async def record_of(db: asyncpg.Connection, channel_id: uuid.UUID) -> asyncpg.Record:
    record = await db.fetchrow("SELECT * FROM notification_deliveries WHERE channel_id = $1", channel_id)
    assert record is not None
    return record


def queue_lag(notifier: ServiceProcess) -> float:
    text = httpx.get(f"{notifier.base_url}/metrics", timeout=5).text
    (line,) = [line for line in text.splitlines() if line.startswith("healthgate_notification_queue_lag_seconds ")]
    return float(line.split()[1])


async def test_disabling_a_channel_finishes_its_pending_deliveries_and_clears_the_queue_lag(
    db: asyncpg.Connection, box: SecretBox, admin: httpx.AsyncClient, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifier = notifiers()
    async with Receiver(answers=[503]) as receiver:
        channel_id, _ = await make_channel(db, box, receiver.url)
        await publish("host.status_changed", host_event(await make_host(db, "web-9", "web"))[1])
        await receiver.wait_for(1)
        answer = await admin.put(f"{CHANNELS}/{channel_id}", json=await channel_body(admin, channel_id, enabled=False))
        assert answer.status_code == 200, answer.text

        async def finished() -> bool:
            return bool((await record_of(db, channel_id))["status"] != "pending")

        # Disabled: nothing more is sent, and the record says so instead of "being retried" for ever.
        await until(finished, timeout=5)
        record = await record_of(db, channel_id)
        assert record["status"] == "failed" and "disabled" in record["detail"], dict(record)

        async def no_lag() -> bool:
            return queue_lag(notifier) == 0

        await until(no_lag, timeout=5)


async def test_a_channel_made_slack_while_a_delivery_is_retried_gets_a_slack_line(
    db: asyncpg.Connection, box: SecretBox, admin: httpx.AsyncClient, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    async with Receiver(answers=[503]) as old, Receiver() as chat:
        channel_id, _ = await make_channel(db, box, old.url)
        await publish("host.status_changed", host_event(await make_host(db, "web-8", "web"))[1])
        await old.wait_for(1)
        body = await channel_body(admin, channel_id, type="slack", url=chat.url + "/services/T0/B0/tokentoken")
        answer = await admin.put(f"{CHANNELS}/{channel_id}", json=body)
        assert answer.status_code == 200, answer.text
        request, *_ = await chat.wait_for(1, timeout=10)
        assert request.headers["Content-Type"] == "application/json"
        assert "webhook-signature" not in request.headers
        assert json.loads(request.body) == {"text": "web-8 (group web) is unhealthy"}


async def test_check_config_events_reach_the_channels_of_the_checks_group(
    db: asyncpg.Connection, admin: httpx.AsyncClient, notifiers: Callable[..., ServiceProcess],
    publish: Callable[[str, bytes], Awaitable[None]],
) -> None:  # fmt: skip
    notifiers()
    async with Receiver() as web, Receiver() as chat:
        for name, kind, url in (("web-checks", "webhook", web.url), ("chat-checks", "slack", chat.url + "/T0/B0/x")):
            answer = await admin.post(
                CHANNELS,
                json={"name": name, "type": kind, "url": url, "events": ["check.config.created"], "groups": ["web"]},
            )
            assert answer.status_code == 201, answer.text
        host = (await admin.post("/api/v1/hosts", json={"name": "web-7", "group": "web"})).json()
        check = await admin.post(
            f"/api/v1/hosts/{host['id']}/health-checks",
            json={"name": "homepage", "check_type": "tcp", "port": 9, "address": "127.0.0.1", "enabled": False},
        )
        assert check.status_code == 201, check.text
        # The event as the API publishes it (on the session's exchange; here on the test notifier's).
        event = {
            "specversion": "1.0", "id": str(uuid.uuid4()), "source": "healthgate/api",
            "type": "healthgate.check.config.created", "time": check.json()["created_at"],
            "datacontenttype": "application/json", "data": {"check": check.json()},
        }  # fmt: skip
        await publish("check.config.created", json.dumps(event).encode())
        # The API's own event may come too (the test notifier's outbox relay shares the session's outbox): look for
        # the one published here.

        async def arrived() -> bool:
            return any(request.headers["webhook-id"] == event["id"] for request in web.requests) and any(
                json.loads(request.body) == {"text": "web-7 (group web): check homepage created"}
                for request in chat.requests
            )

        await until(arrived, timeout=5)
