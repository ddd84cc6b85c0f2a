"""The notification channel API (CONTRACT §7): CRUD and its validation, the write-only secret shown once, slack URLs
masked, roles, audit entries, `/test` against a real receiver on 127.0.0.1 (its signature verified with the
`standardwebhooks` library itself) and `/deliveries`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook

from tests.support.processes import ServiceProcess, free_port, start_service
from tests.support.receiver import Receiver
from tests.support.tokens import TokenFactory

CHANNELS = "/api/v1/notification-channels"
SLACK_TOKEN = "T000/B000/" + "x" * 24
SLACK_URL = f"https://hooks.slack.com/services/{SLACK_TOKEN}"
GIVEN_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes of base64


def webhook(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "webhook", "url": url, **fields}


async def create(admin: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await admin.post(CHANNELS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def fields_of(response: httpx.Response) -> set[str]:
    assert response.status_code == 422, response.text
    return {error["field"] for error in response.json()["errors"]}


async def test_crud_and_the_secret_shown_once(
    admin: httpx.AsyncClient, db: asyncpg.Connection, receiver: Receiver, api: ServiceProcess
) -> None:
    seen: list[str] = []
    created = await create(admin, webhook("ops", receiver.url))
    secret = created.pop("secret")
    assert secret.startswith("whsec_") and created["secret_set"] is True
    assert created["events"] == ["host.status_changed", "job.failed", "job.verification_failed", "job.halted"]
    assert (created["groups"], created["include_maintenance"], created["enabled"]) == ([], False, True)
    channel = f"{CHANNELS}/{created['id']}"

    shown = await admin.get(channel)
    assert shown.json() == created
    listed = await admin.get(CHANNELS)
    assert listed.json() == {"items": [created], "next_cursor": None}
    seen += [shown.text, listed.text]

    # PUT without secret keeps it (the /test signature still verifies with it); fields echoed from GET are ignored.
    kept = await admin.put(channel, json=created | {"events": ["job.failed", "job.failed"], "groups": ["web"]})
    assert kept.status_code == 200, kept.text
    assert "secret" not in kept.json() and kept.json()["secret_set"] is True
    assert (kept.json()["events"], kept.json()["groups"]) == (["job.failed"], ["web"])
    tested = await admin.post(f"{channel}/test")
    assert tested.status_code == 200 and tested.json()["delivered"] is True, tested.text
    [request] = receiver.requests
    headers, body = request.headers, request.body
    Webhook(secret).verify(body, headers)
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert json.loads(body)["type"] == "healthgate.test" and headers["webhook-id"] == json.loads(body)["id"]

    assert fields_of(await admin.put(channel, json=webhook("ops", receiver.url, secret=None))) == {"secret"}
    replaced = await admin.put(channel, json=webhook("ops", receiver.url, secret=GIVEN_SECRET))
    assert replaced.status_code == 200 and "secret" not in replaced.json()
    assert (await admin.post(f"{channel}/test")).json()["delivered"] is True
    Webhook(GIVEN_SECRET).verify(receiver.requests[-1].body, receiver.requests[-1].headers)

    # Made slack: the secret goes, the URL (its token) is masked; made a webhook again: a new secret, shown once.
    slack = await admin.put(channel, json={"name": "ops", "type": "slack", "url": SLACK_URL})
    assert slack.status_code == 200, slack.text
    assert (slack.json()["url"], slack.json()["secret_set"]) == ("https://hooks.slack.com/…", False)
    again = await admin.put(channel, json=webhook("ops", "http://monitor:hunter2@127.0.0.1:9/in"))
    assert again.status_code == 200 and again.json()["url"] == "http://monitor:***@127.0.0.1:9/in"
    second_secret = again.json()["secret"]
    assert second_secret.startswith("whsec_") and second_secret != secret
    seen += [kept.text, replaced.text, slack.text, (await admin.get(channel)).text]
    seen.append((await admin.get(f"{channel}/deliveries")).text)

    assert (await admin.delete(channel)).status_code == 204
    assert (await admin.get(channel)).status_code == 404
    assert (await admin.delete(channel)).status_code == 404

    audit = (await admin.get("/api/v1/audit?limit=500")).json()["items"]
    entries = [entry for entry in audit if entry["entity_id"] == created["id"]][::-1]
    assert [entry["action"] for entry in entries] == [
        "notification_channel.create", "notification_channel.update", "notification_channel.test",
        "notification_channel.update", "notification_channel.test", "notification_channel.update",
        "notification_channel.update", "notification_channel.delete",
    ]  # fmt: skip
    assert all(entry["entity_type"] == "notification_channel" for entry in entries)
    assert entries[0]["changes"]["secret"] == "<changed>"
    assert entries[3]["changes"]["secret"] == "<changed>"
    assert entries[5]["changes"]["url"] == {"from": receiver.url, "to": "https://hooks.slack.com/…"}
    seen.append(json.dumps(audit))
    everything = "\n".join(seen) + api.log_text()
    for hidden in (secret, GIVEN_SECRET, second_secret, SLACK_TOKEN, "hunter2"):
        assert hidden not in everything


async def test_a_given_secret_is_checked_and_never_echoed(admin: httpx.AsyncClient) -> None:
    created = await create(admin, webhook("given", "https://127.0.0.1:9/", secret=GIVEN_SECRET))
    assert "secret" not in created and created["secret_set"] is True
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_" + "QUJD", 5):
        response = await admin.post(CHANNELS, json=webhook("bad-secret", "https://127.0.0.1:9/", secret=bad))
        assert fields_of(response) == {"secret"}
        assert not isinstance(bad, str) or bad not in response.text
    slack = await admin.post(CHANNELS, json={"name": "s", "type": "slack", "url": SLACK_URL, "secret": GIVEN_SECRET})
    assert fields_of(slack) == {"secret"} and GIVEN_SECRET not in slack.text


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"name", "type", "url"}),
        ({"name": "", "type": "email", "url": "ftp://127.0.0.1/x"}, {"name", "type", "url"}),
        ({"name": " padded", "type": "webhook", "url": "javascript:alert(1)"}, {"name", "url"}),
        ({"name": "x" * 101, "type": "webhook", "url": "http://127.0.0.1/" + "a" * 2000}, {"name", "url"}),
        ({"name": "tab\tname", "type": "webhook", "url": "http://127.0.0.1/a b"}, {"name", "url"}),
        ({"name": "n", "type": "webhook", "url": "http:///no-host"}, {"url"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "events": []}, {"events"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "events": ["check.result"]}, {"events.0"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "events": ["nope", "job.failed"]}, {"events.0"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "groups": [""]}, {"groups.0"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "groups": "web"}, {"groups"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "enabled": "maybe"}, {"enabled"}),
        (
            {"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "include_maintenance": 2},
            {"include_maintenance"},
        ),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "colour": "red"}, {"colour"}),
        ({"name": "n", "type": "webhook", "url": "http://127.0.0.1/", "secret": None}, {"secret"}),
    ],
)
async def test_invalid_bodies_name_each_field(admin: httpx.AsyncClient, body: dict[str, Any], fields: set[str]) -> None:
    assert fields_of(await admin.post(CHANNELS, json=body)) == fields


async def test_names_ids_and_roles(admin: httpx.AsyncClient, make_token: TokenFactory) -> None:
    first = await create(admin, webhook("first", "https://127.0.0.1:9/"))
    second = await create(admin, {"name": "second", "type": "slack", "url": SLACK_URL, "events": ["job.halted"]})
    assert (await admin.post(CHANNELS, json=webhook("first", "https://127.0.0.1:9/"))).status_code == 409
    renamed = await admin.put(f"{CHANNELS}/{second['id']}", json=webhook("first", "https://127.0.0.1:9/"))
    assert renamed.status_code == 409
    assert (await admin.post(CHANNELS, content=b"{")).status_code == 400
    assert fields_of(await admin.get(f"{CHANNELS}/not-a-uuid")) == {"path.channel_id"}
    assert fields_of(await admin.get(f"{CHANNELS}?limit=0")) == {"query.limit"}
    assert fields_of(await admin.get(f"{CHANNELS}?cursor=bm9wZQ")) == {"query.cursor"}
    for path in ("", "/deliveries"):
        assert (await admin.get(f"{CHANNELS}/{uuid.uuid4()}{path}")).status_code == 404
    assert (await admin.post(f"{CHANNELS}/{uuid.uuid4()}/test")).status_code == 404
    assert (await admin.put(f"{CHANNELS}/{uuid.uuid4()}", json=webhook("x", "https://127.0.0.1:9/"))).status_code == 404

    page = (await admin.get(f"{CHANNELS}?limit=1")).json()
    assert [item["name"] for item in page["items"]] == ["first"] and page["next_cursor"]
    rest = (await admin.get(f"{CHANNELS}?limit=1&cursor={page['next_cursor']}")).json()
    assert [item["id"] for item in rest["items"]] == [second["id"]] and rest["next_cursor"] is None

    for role in ("operator", "viewer"):
        headers = {"Authorization": f"Bearer {await make_token(role, ('web',))}"}
        for method, path in (
            ("GET", CHANNELS), ("POST", CHANNELS), ("GET", f"{CHANNELS}/{first['id']}"),
            ("PUT", f"{CHANNELS}/{first['id']}"), ("DELETE", f"{CHANNELS}/{first['id']}"),
            ("POST", f"{CHANNELS}/{first['id']}/test"), ("GET", f"{CHANNELS}/{first['id']}/deliveries"),
        ):  # fmt: skip
            response = await admin.request(method, path, headers=headers, json=webhook("y", "https://127.0.0.1:9/"))
            assert response.status_code == 403, (role, method, path, response.text)
    anonymous = await admin.get(CHANNELS, headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert (await admin.get(f"{CHANNELS}/{first['id']}")).status_code == 200


async def test_test_failures_are_recorded_and_deliveries_page_newest_first(
    admin: httpx.AsyncClient, receiver: Receiver
) -> None:
    created = await create(admin, webhook("flaky", receiver.url))
    channel = f"{CHANNELS}/{created['id']}"
    receiver.answers = [204]
    delivered = (await admin.post(f"{channel}/test")).json()
    assert delivered == {"delivered": True, "status_code": 204, "detail": "delivered: 204"}

    receiver.answers = [500]
    failed = (await admin.post(f"{channel}/test")).json()
    assert (failed["delivered"], failed["status_code"]) == (False, 500)
    assert "500" in failed["detail"] and "failing with 500" in failed["detail"]

    refused_port = free_port()
    await admin.put(channel, json=webhook("flaky", f"http://127.0.0.1:{refused_port}/in"))
    refused = (await admin.post(f"{channel}/test")).json()
    assert (refused["delivered"], refused["status_code"]) == (False, None)
    assert "refused" in refused["detail"]

    first = (await admin.get(f"{channel}/deliveries?limit=2")).json()
    rest = (await admin.get(f"{channel}/deliveries?limit=2&cursor={first['next_cursor']}")).json()
    assert rest["next_cursor"] is None
    items = first["items"] + rest["items"]
    assert [(item["status"], item["status_code"]) for item in items] == [
        ("failed", None), ("failed", 500), ("delivered", 204)
    ]  # fmt: skip
    assert all(item["event_type"] == "healthgate.test" and item["attempts"] == 1 for item in items)
    assert items[1]["detail"] == failed["detail"] and items[0]["last_attempt_at"] is not None
    assert {item["event_id"] for item in items} == {json.loads(request.body)["id"] for request in receiver.requests} | {
        items[0]["event_id"]
    }
    assert fields_of(await admin.get(f"{channel}/deliveries?cursor=bm9wZQ")) == {"query.cursor"}


@pytest.fixture
def blocking_api(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    """An api of its own (same database) whose HEALTHGATE_BLOCKED_NETWORKS holds the loopback network."""
    port = free_port()
    env = service_env | {"HEALTHGATE_API_PORT": str(port), "HEALTHGATE_BLOCKED_NETWORKS": "127.0.0.0/8,::1/128"}
    service = start_service("api", env, tmp_path / "api.log", port=port)
    yield service
    service.stop()


async def test_a_test_into_a_blocked_network_is_refused(
    admin: httpx.AsyncClient, receiver: Receiver, blocking_api: ServiceProcess
) -> None:
    created = await create(admin, webhook("blocked", receiver.url))
    async with httpx.AsyncClient(base_url=blocking_api.base_url, headers=admin.headers, timeout=30) as other:
        answer = (await other.post(f"{CHANNELS}/{created['id']}/test")).json()
    assert (answer["delivered"], answer["status_code"]) == (False, None)
    assert "blocked" in answer["detail"]
    assert receiver.requests == []
    [record] = (await admin.get(f"{CHANNELS}/{created['id']}/deliveries")).json()["items"]
    assert (record["status"], record["detail"]) == ("failed", answer["detail"])


async def test_a_channel_read_and_sent_back_keeps_its_masked_token(
    admin: httpx.AsyncClient, receiver: Receiver
) -> None:
    """GET then PUT of what GET showed (as `healthgate export` then `apply` do) must not store the mask: the slack
    token, a webhook URL's password and a secret-named query parameter stay as stored; a new URL replaces them."""
    token_path = f"/services/{SLACK_TOKEN}"
    slack = await create(admin, {"name": "chat", "type": "slack", "url": receiver.url.replace("/hook", token_path)})
    with_token = receiver.url.replace("127.0.0.1", "user:p%40ss@127.0.0.1") + "?channel=ops&token=s3cr3t-t0ken"
    hook = await create(admin, webhook("hook", with_token))
    shown = (await admin.get(f"{CHANNELS}/{hook['id']}")).json()
    assert shown["url"] == receiver.url.replace("127.0.0.1", "user:***@127.0.0.1") + "?channel=ops&token=***"
    for created in (slack, hook):
        channel = f"{CHANNELS}/{created['id']}"
        current = (await admin.get(channel)).json()
        body = {key: current[key] for key in ("name", "type", "url", "events", "groups", "include_maintenance")}
        replaced = await admin.put(channel, json=body | {"enabled": False})
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["url"] == current["url"] and not replaced.json()["enabled"]
        assert (await admin.post(f"{channel}/test")).json()["delivered"]
    slack_request, hook_request = receiver.requests
    assert slack_request.path == token_path
    assert hook_request.path == "/hook" and hook_request.headers["Authorization"].startswith("Basic ")
    # A URL that is not the shown one replaces the stored one.
    body = {"name": "chat", "type": "slack", "url": receiver.url}
    assert (await admin.put(f"{CHANNELS}/{slack['id']}", json=body)).status_code == 200
    assert (await admin.post(f"{CHANNELS}/{slack['id']}/test")).json()["delivered"]
    assert receiver.requests[-1].path == "/hook"
