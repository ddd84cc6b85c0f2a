"""Sending notifications to real receivers on 127.0.0.1 (CONTRACT §7): Standard Webhooks signatures verified with
the `standardwebhooks` library itself, Slack's line, failures in words without secrets, blocked networks."""

from __future__ import annotations

import ipaddress
import json
import uuid

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.notification_channels import Channel, generate_secret
from shared.notification_sending import EventContext, NotificationSender, make_test_event, notification_body
from tests.support.blackhole import Blackhole, refused_port
from tests.support.raw_http import RawHttpServer, response
from tests.support.receiver import Receiver

SLACK_TOKEN_PATH = "/services/T000/B000/XXXXsecrettokenXXXX"


def webhook(url: str, secret: str | None = None) -> Channel:
    return Channel(uuid.uuid4(), "hooks", "webhook", url, secret or generate_secret(), ("host.status_changed",), (),
                   False, True)  # fmt: skip


def slack(url: str) -> Channel:
    return Channel(uuid.uuid4(), "chat", "slack", url, None, ("host.status_changed",), (), False, True)


async def test_a_webhook_is_signed_so_that_the_reference_library_verifies_it() -> None:
    channel = webhook("")
    event_id, body = make_test_event("healthgate/test")
    async with Receiver() as receiver, NotificationSender(()) as sender:
        channel = webhook(receiver.url, channel.secret)
        attempt = await sender.send(channel, event_id, body)
        (request,) = receiver.requests
    assert attempt.delivered and attempt.status_code == 200 and not attempt.final, attempt
    assert request.method == "POST" and request.body == body
    assert request.headers["Content-Type"] == "application/cloudevents+json"
    assert request.headers["webhook-id"] == str(event_id)
    assert channel.secret is not None
    assert Webhook(channel.secret).verify(request.body, request.headers) == json.loads(body)
    # Another secret, or a changed body, does not verify.
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(channel.secret).verify(request.body.replace(b"test", b"tent"), request.headers)


async def test_failures_are_words_that_hold_no_secret_and_blocked_is_final() -> None:
    async with Receiver(answers=[503]) as failing, NotificationSender(()) as sender:
        attempt = await sender.send(webhook(failing.url), uuid.uuid4(), b"{}")
    assert (attempt.delivered, attempt.status_code, attempt.final) == (False, 503, False)
    assert attempt.detail == f"{failing.url} answered 503: failing with 503"

    with refused_port() as port:
        async with NotificationSender(()) as sender:
            attempt = await sender.send(slack(f"http://127.0.0.1:{port}{SLACK_TOKEN_PATH}"), uuid.uuid4(), b"{}")
    assert attempt == type(attempt)(False, None, f"connection refused by http://127.0.0.1:{port}/…")

    blocked = (ipaddress.ip_network("127.0.0.2/32"),)
    async with NotificationSender(blocked) as sender:
        attempt = await sender.send(slack(f"http://127.0.0.2:9{SLACK_TOKEN_PATH}"), uuid.uuid4(), b"{}")
    assert attempt.final and not attempt.delivered, attempt
    assert attempt.detail == "blocked: 127.0.0.2 is in a blocked network (127.0.0.2/32)"


async def test_a_receiver_that_never_answers_is_a_timeout_not_a_hang() -> None:
    with Blackhole() as silent:
        async with NotificationSender((), timeout_seconds=0.3) as sender:
            attempt = await sender.send(webhook(f"http://127.0.0.1:{silent.port}/"), uuid.uuid4(), b"{}")
    assert attempt == type(attempt)(False, None, f"http://127.0.0.1:{silent.port}/ did not answer within 0.3 s")


async def test_slack_gets_one_readable_line() -> None:
    cloudevent = json.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "healthgate.host.status_changed",
                             "source": "healthgate/poller", "time": "2026-12-01T00:00:00Z",
                             "data": {"host_id": str(uuid.uuid4()), "previous": "healthy", "current": "unhealthy",
                                      "at": "2026-12-01T00:00:00Z", "in_maintenance": False}}).encode()  # fmt: skip
    context = EventContext("web-1", "web", (("homepage", "status 503"),))
    body = notification_body("slack", "host.status_changed", cloudevent, context)
    async with Receiver() as receiver, NotificationSender(()) as sender:
        attempt = await sender.send(slack(receiver.url), uuid.uuid4(), body)
        (request,) = receiver.requests
    assert attempt.delivered
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {"text": "web-1 (group web) is unhealthy: homepage: status 503"}


async def test_answers_that_are_not_http_are_said_in_words(raw_http: RawHttpServer) -> None:
    # Found breaking issue 14: these were "sending to … failed: ClientResponseError" / "ServerDisconnectedError",
    # class names that tell an operator nothing about what the receiver did.
    raw_http.set("/garbage", b"GARBAGE\r\n\r\n")
    raw_http.set("/status", b"HTTP/1.1 999999 X\r\nContent-Length: 0\r\n\r\n")
    raw_http.set("/hangup", b"")
    raw_http.set(
        "/broken", response("500 Oops", [("Transfer-Encoding", "chunked")], b"zz\r\nnot a chunk", content_length=False)
    )
    async with NotificationSender(()) as sender:
        garbage = await sender.send(webhook(raw_http.url("/garbage")), uuid.uuid4(), b"{}")
        status = await sender.send(webhook(raw_http.url("/status")), uuid.uuid4(), b"{}")
        hangup = await sender.send(webhook(raw_http.url("/hangup")), uuid.uuid4(), b"{}")
        broken = await sender.send(webhook(raw_http.url("/broken")), uuid.uuid4(), b"{}")
    for attempt in (garbage, status):
        assert (attempt.delivered, attempt.status_code, attempt.final) == (False, None, False), attempt
        assert "ClientResponseError" not in attempt.detail and "\n" not in attempt.detail
    assert garbage.detail.startswith(f"{raw_http.url('/garbage')} sent an answer that is not valid HTTP: ")
    assert "GARBAGE" in garbage.detail
    assert status.detail.startswith(f"{raw_http.url('/status')} sent an answer that is not valid HTTP: ")
    assert hangup == type(hangup)(False, None, f"{raw_http.url('/hangup')} closed the connection without answering")
    assert broken.detail.startswith(f"{raw_http.url('/broken')} sent an answer that is not valid HTTP: "), broken
    assert "chunk" in broken.detail


async def test_a_receiver_echoing_a_slack_token_or_a_decoded_password_shows_neither(raw_http: RawHttpServer) -> None:
    # Found breaking issue 14: only the whole slack path and the URL's password as written were redacted, so an
    # answer naming the token alone ("no webhook for token …"), or the password percent-decoded, kept it.
    token = SLACK_TOKEN_PATH.rsplit("/", 1)[1]
    raw_http.set(SLACK_TOKEN_PATH, response("404 Not Found", body=f"no webhook for token {token}".encode()))
    raw_http.set("/basic", response("401 Unauthorized", body=b"wrong password p@ss!word for hooks"))
    raw_http.set("/garbage" + SLACK_TOKEN_PATH, f"{token}\r\n\r\n".encode())
    async with NotificationSender(()) as sender:
        echoed = await sender.send(slack(raw_http.url(SLACK_TOKEN_PATH)), uuid.uuid4(), b"{}")
        garbage = await sender.send(slack(raw_http.url("/garbage" + SLACK_TOKEN_PATH)), uuid.uuid4(), b"{}")
        password = await sender.send(
            webhook(raw_http.url("/basic").replace("://", "://hooks:p%40ss%21word@")), uuid.uuid4(), b"{}"
        )
    assert echoed.status_code == 404 and token not in echoed.detail, echoed
    assert echoed.detail == f"{raw_http.base_url}/… answered 404: no webhook for token ***"
    assert garbage.status_code is None and token not in garbage.detail, garbage
    assert password.status_code == 401 and "p@ss!word" not in password.detail, password
    assert "p%40ss%21word" not in password.detail


async def test_the_unspecified_address_is_the_local_host_to_blocked_networks() -> None:
    # Found breaking issue 14: with 127.0.0.0/8 blocked, http://0.0.0.0:PORT/ still reached a receiver on
    # 127.0.0.1 (Linux connects the unspecified address to the local host), so it slipped past the guard.
    blocked = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    async with Receiver() as receiver, NotificationSender(blocked) as sender:
        attempt = await sender.send(webhook(f"http://0.0.0.0:{receiver.port}/hook"), uuid.uuid4(), b"{}")
        assert receiver.requests == []
    assert attempt.final and not attempt.delivered, attempt
    assert attempt.detail == "blocked: 0.0.0.0 is the local host, in a blocked network (127.0.0.0/8)"
