"""What a notification channel receives, and sending it (CONTRACT §7).

A `webhook` channel gets a POST of the event's CloudEvent as published (structured JSON, `Content-Type:
application/cloudevents+json`) with the Standard Webhooks headers `webhook-id` (the event id), `webhook-timestamp`
and `webhook-signature`, signed by the `standardwebhooks` library (the specification's reference implementation), so
that receivers verify and de-duplicate with any Standard Webhooks library. A `slack` channel gets `{"text": ...}`,
one line an operator reads (`slack_text`).

The notifier decides what to send when it records a delivery (`notification_body`) and signs at each attempt: the
signature covers the attempt's timestamp, which receivers check against their clock (five minutes of tolerance in
the reference libraries), so a retry hours later carries a fresh one.

`NotificationSender.send` never raises for the receiver's fault: every outcome is an `Attempt` whose `detail` holds
no secret, Slack token or URL password. Redirects are not followed (a 3xx is an answer like any other non-2xx, and a
redirect cannot lead a delivery into a blocked network).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from standardwebhooks.webhooks import Webhook

from shared.blocked_networks import BlockedTarget, GuardedResolver, Network, refuse_if_blocked
from shared.details import escape_controls, safe_detail
from shared.events import CLOUDEVENTS_CONTENT_TYPE, EVENT_TYPE_PREFIX, CloudEvent
from shared.notification_channels import TEST_EVENT_TYPE, Channel, display_url

DEFAULT_TIMEOUT_SECONDS = 10.0
# What of a receiver's answer is read: enough for the words it gives (Slack's "invalid_token"), never a whole page.
ANSWER_PREVIEW_BYTES = 512
# A Slack line stays readable (Slack itself cuts messages at 40,000 characters).
SLACK_TEXT_LIMIT = 3000
USER_AGENT = "healthgate-notifier"
# A slack URL's path segments this long with a digit or a capital are tokens or ids (Slack's ids have 9 or more).
TOKEN_MIN_CHARS = 6


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST to a channel.

    `delivered`: the receiver answered 2xx. `status_code`: its HTTP status, None when no answer came. `detail`: what
    happened in words (at most 1,000 characters; never a secret, Slack token or URL password). `final`: no retry can
    help (the URL is in HEALTHGATE_BLOCKED_NETWORKS, or cannot be sent to at all): the delivery fails at once."""

    delivered: bool
    status_code: int | None
    detail: str
    final: bool = False


@dataclass(frozen=True)
class EventContext:
    """What the notifier looked up about an event's host, for Slack's line: its name and group, and the checks the
    event is about as (check name, detail): a host's failing checks, or the one check of a check event. None and
    () when unknown (a host deleted since)."""

    host_name: str | None = None
    group: str | None = None
    checks: tuple[tuple[str, str], ...] = ()


def make_test_event(source: str, *, time: dt.datetime | None = None) -> tuple[uuid.UUID, bytes]:
    """A `healthgate.test` CloudEvent (CONTRACT §7, `/test`): its id and structured JSON body."""
    event_id = uuid.uuid4()
    at = time or dt.datetime.now(dt.UTC)
    envelope = CloudEvent(
        id=str(event_id),
        source=source,
        type=TEST_EVENT_TYPE,
        time=at,
        data={"message": "a test notification from healthgate", "at": at.isoformat().replace("+00:00", "Z")},
    )
    return event_id, envelope.model_dump_json(exclude_none=True).encode()


def notification_body(channel_type: str, routing_key: str, cloudevent: bytes, context: EventContext) -> bytes:
    """What to POST to a channel of `channel_type` for an event: the CloudEvent bytes as published for a webhook;
    `{"text": one line}` (`slack_text`) for Slack. `routing_key` is the event's (`healthgate.test` for /test)."""
    if channel_type == "webhook":
        return cloudevent
    try:
        envelope = json.loads(cloudevent)
    except ValueError:
        envelope = {}
    data = envelope.get("data") if isinstance(envelope, dict) else None
    text = slack_text(routing_key, data if isinstance(data, dict) else {}, context)
    return json.dumps({"text": text}, ensure_ascii=False).encode()


def post_body(channel_type: str, routing_key: str, cloudevent: bytes, slack_line: str | None) -> bytes:
    """What an attempt POSTs to a channel of `channel_type` now: the CloudEvent for a webhook; for Slack,
    `{"text": slack_line}`, or a line made from the event alone when none was made with it (the channel was a webhook
    when the event arrived: its host's name and failing checks are no longer known)."""
    if channel_type == "webhook" or slack_line is None:
        return notification_body(channel_type, routing_key, cloudevent, EventContext())
    return json.dumps({"text": slack_line}, ensure_ascii=False).encode()


def slack_text(routing_key: str, data: Mapping[str, Any], context: EventContext) -> str:
    """One line an operator reads (CONTRACT §7), e.g. "web-1 (group web) is unhealthy: homepage: status 503".

    Names the host and group, the checks and their details, and for job events the job and its reason. Values are
    one line each (control characters escaped), Slack's `&`, `<` and `>` escaped (so nothing in a detail becomes a
    link or a mention), and the whole cut to SLACK_TEXT_LIMIT characters."""
    key = routing_key.removeprefix(EVENT_TYPE_PREFIX)
    host = _host_words(data, context)
    checks = "; ".join(f"{name}: {detail}" if detail else name for name, detail in context.checks)
    job = f"job {_text(data.get('job_id'))}"
    detail = _text(data.get("detail"))
    if key == "host.status_changed":
        line = f"{host} {_status_words(data.get('current'))}" + (f": {checks}" if checks and _unwell(data) else "")
    elif key == "check.status_changed":
        name = context.checks[0][0] if context.checks else f"check {_text(data.get('check_id'))}"
        line = f"{host}: {name} {_status_words(data.get('current'))}" + (f": {detail}" if detail else "")
    elif key == "job.failed":
        line = f"{job} failed on {host}: {_text(data.get('reason'))}" + (f": {detail}" if detail else "")
    elif key == "job.verification_failed":
        line = f"{job}: {host} did not become healthy after patching" + (f": {detail}" if detail else "")
    elif key == "job.verified":
        line = f"{job}: {host} is healthy again after patching ({_text(data.get('outcome'))})"
    elif key == "job.halted":
        by = _text(data.get("by"))
        line = f"{job} halted ({_text(data.get('reason'))}" + (f", by {by}" if by else "") + ")"
        line += f": {detail}" if detail else ""
    elif key == "job.resumed":
        by = _text(data.get("by"))
        line = f"{job} resumed" + (f" by {by}" if by else "") + (f": {detail}" if detail else "")
    elif key == "job.waiting":
        waiting = ", ".join(_text(item) for item in data.get("waiting_for") or [] if item is not None)
        line = f"{job} waits for {host}" + (f" ({waiting})" if waiting else "") + (f": {checks}" if checks else "")
    elif key == "job.released":
        line = f"{job} released {host}"
    elif key == "job.cancelled":
        line = f"{job} on {host} cancelled"
    elif key.startswith("check.config."):
        check = data.get("check") if isinstance(data.get("check"), dict) else {}
        assert isinstance(check, dict)
        line = f"{host}: check {_text(check.get('name'))} {key.removeprefix('check.config.')}"
    elif routing_key == TEST_EVENT_TYPE:
        line = "healthgate: a test notification (this channel works)"
    else:
        line = f"healthgate {key}" + (f": {detail}" if detail else "")
    if data.get("in_maintenance") is True:
        line += " (in maintenance)"
    return _slack_escape(_cut(line, SLACK_TEXT_LIMIT))


def _text(value: object) -> str:
    """One line of an event's value ("" for None)."""
    return "" if value is None else escape_controls(str(value))


def _host_words(data: Mapping[str, Any], context: EventContext) -> str:
    name = context.host_name or (f"host {_text(data.get('host_id'))}" if data.get("host_id") else "a host")
    return f"{escape_controls(name)} (group {escape_controls(context.group)})" if context.group else name


def _status_words(status: object) -> str:
    return {
        "healthy": "is healthy again",
        "unhealthy": "is unhealthy",
        "degraded": "is degraded",
        "unknown": "is unknown",
        "no_checks": "has no enabled checks",
    }.get(str(status), f"is {_text(status)}")


def _unwell(data: Mapping[str, Any]) -> bool:
    return data.get("current") in ("unhealthy", "degraded", "unknown")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    """Slack's escaping of message text (api.slack.com "Formatting text for app surfaces": escape &, <, >)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class NotificationSender:
    """POSTs notifications: one aiohttp session, created in the running loop by `async with` and closed with it;
    created once at a service's start and passed down.

    Names resolve through `GuardedResolver` (HEALTHGATE_BLOCKED_NETWORKS, `blocked_networks`) and an IP literal is
    checked before connecting: a URL into a blocked network is an `Attempt` with `final` set and "blocked" in its
    detail. Each POST may take `timeout_seconds` in all (connecting, sending, the answer's headers and the part of
    its body read)."""

    def __init__(
        self, blocked_networks: Sequence[Network], *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self._blocked = tuple(blocked_networks)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NotificationSender:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._blocked), limit=0, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, channel: Channel, event_id: uuid.UUID, body: bytes) -> Attempt:
        """POST `body` (as `notification_body` made it) to `channel` now; the outcome, never an exception for the
        receiver's fault (CancelledError passes through)."""
        if self._session is None:
            raise RuntimeError("NotificationSender used outside `async with`")
        shown = display_url(channel.type, channel.url)
        secrets = _secrets_of(channel)
        parts = urlsplit(channel.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Attempt(False, None, safe_detail(f"cannot send to {shown}: not an http(s) URL", secrets), True)
        try:
            refuse_if_blocked(parts.hostname, self._blocked)
            headers = self._headers(channel, event_id, body)
            async with self._session.post(channel.url, data=body, headers=headers, allow_redirects=False) as answer:
                preview = await answer.content.read(ANSWER_PREVIEW_BYTES)
                status = answer.status
        except BlockedTarget as exc:
            return Attempt(False, None, safe_detail(f"blocked: {exc}", secrets), final=True)
        except TimeoutError:
            seconds = self._timeout.total or 0
            return Attempt(False, None, f"{shown} did not answer within {seconds:g} s")
        except aiohttp.InvalidURL:
            return Attempt(False, None, safe_detail(f"cannot send to {shown}: invalid URL", secrets), final=True)
        except aiohttp.ClientConnectorCertificateError as exc:
            why = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
            return Attempt(False, None, safe_detail(f"{shown}: certificate verify failed: {why}", secrets))
        except aiohttp.ClientConnectorError as exc:
            error = exc.os_error
            if isinstance(error, ConnectionRefusedError):
                return Attempt(False, None, safe_detail(f"connection refused by {shown}", secrets))
            return Attempt(False, None, safe_detail(f"cannot connect to {shown}: {error.strerror or error}", secrets))
        except aiohttp.ServerDisconnectedError:
            return Attempt(False, None, safe_detail(f"{shown} closed the connection without answering", secrets))
        except aiohttp.ClientResponseError as exc:
            # aiohttp's parser refused the answer (its "400" is not the receiver's: no status_code). Its message,
            # never str(exc), which holds the URL and so a slack token.
            words = " ".join(str(exc.message).split())
            return Attempt(False, None, safe_detail(f"{shown} sent an answer that is not valid HTTP: {words}", secrets))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: a header or URL aiohttp refuses to send; the words name the class, never the URL.
            what = getattr(exc, "strerror", None) or type(exc).__name__
            return Attempt(False, None, safe_detail(f"sending to {shown} failed: {what}", secrets))
        words = preview.decode("utf-8", "replace").strip()
        if 200 <= status < 300:
            return Attempt(True, status, f"delivered: {status}")
        answered = f"{shown} answered {status}" + (f": {words}" if words else "")
        return Attempt(False, status, safe_detail(answered, secrets))

    @staticmethod
    def _headers(channel: Channel, event_id: uuid.UUID, body: bytes) -> dict[str, str]:
        if channel.type != "webhook":
            return {"Content-Type": "application/json"}
        if channel.secret is None:
            raise ValueError("a webhook channel without a secret")  # the table's constraint forbids it
        now = dt.datetime.now(dt.UTC)
        message_id = str(event_id)
        signature = Webhook(channel.secret).sign(message_id, now, body.decode("utf-8"))
        return {
            "Content-Type": CLOUDEVENTS_CONTENT_TYPE,
            "webhook-id": message_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": signature,
        }


def _secrets_of(channel: Channel) -> tuple[str, ...]:
    """What must never appear in a detail: the secret, the URL's password (as written and percent-decoded) and
    (slack) the URL, whose path is a token, and each part of that path that looks like a token or an id (a
    receiver may name the token alone: "no webhook for token …"). Longest first, so that a part never breaks up
    a longer secret before it is replaced."""
    parts = urlsplit(channel.url)
    found = [channel.secret or "", parts.password or "", unquote(parts.password or "")]
    if channel.type == "slack":
        found += [channel.url, parts.path if len(parts.path) > 1 else "", parts.query]
        segments = [segment for segment in parts.path.split("/") if _token_like(segment)]
        found += segments + [unquote(segment) for segment in segments]
    return tuple(sorted({value for value in found if value}, key=len, reverse=True))


def _token_like(segment: str) -> bool:
    """A path segment of a slack URL that is a token or an id (T0123ABCD, B0123ABCD, 24 random characters), not a
    word such as "services" or "hooks"."""
    return len(segment) >= TOKEN_MIN_CHARS and any(character.isdigit() or character.isupper() for character in segment)
