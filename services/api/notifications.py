"""Notification channels: `/api/v1/notification-channels[/{channel_id}[/test|/deliveries]]` (CONTRACT §7, admin).

Every change commits together with its audit entry. The rows are written by their owners:
shared/notification_channels.py (channels), shared/notification_deliveries.py (the /test run's record) and
shared/audit.py. A webhook's secret leaves the service once, in the answer that generated it, and never again: not
in a view, an audit entry (only "<changed>"), a log line or a problem's detail; a slack URL (its token) appears only
masked (`display_url`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal
from services.api.context import ApiContext, context_of
from services.api.problems import Problem, conflict, not_found, validation_problem
from services.api.requests import Keyset, PageQuery, json_response, path_uuid, read_json, read_query
from services.api.schemas import ChannelTestAnswer, ChannelView, ChannelWrite, DeliveryView, Page
from shared import notification_channels as channels
from shared.audit import SECRET_MARK, diff, record_audit
from shared.crypto import DecryptionError
from shared.database import Connection
from shared.notification_deliveries import delivery_page, fail_of_disabled_channels, record_test_delivery
from shared.notification_sending import make_test_event

ENTITY_TYPE = "notification_channel"
# Channels page by name (unique), then id; the cursor holds the last row's.
CHANNEL_PAGES: Keyset[tuple[str, uuid.UUID]] = Keyset(
    2,
    lambda name, channel_id: (_text(name), uuid.UUID(channel_id)),
    lambda row: (row["name"], str(row["id"])),
)
# A channel's deliveries page newest first by (created_at, event_id); the cursor holds the last row's.
DELIVERY_PAGES: Keyset[tuple[dt.datetime, uuid.UUID]] = Keyset(
    2,
    lambda created_at, event_id: (dt.datetime.fromisoformat(created_at), uuid.UUID(event_id)),
    lambda row: (row["created_at"].isoformat(), str(row["event_id"])),
)
UNDECRYPTABLE = (
    "the channel's secret does not decrypt with this key file (HEALTHGATE_KEY_FILE changed?): "
    "give it a new secret with PUT"
)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("this cursor holds a name")
    return value


def channel_view(row: asyncpg.Record, *, secret: str | None = None) -> ChannelView:
    """A channel as the API shows it: no secret (`secret_set`), a slack URL masked; `secret` only in the answer
    that generated it."""
    values = channels.channel_view(row)
    if secret is not None:
        values["secret"] = secret
    return ChannelView.model_validate(values)


def audited_fields(row: asyncpg.Record) -> dict[str, Any]:
    """A channel's writable fields for the audit log: the URL as shown (a slack token never), the secret only as
    its ciphertext, which shared/audit.py turns into "<changed>"."""
    fields: dict[str, Any] = {
        "name": row["name"],
        "type": row["type"],
        "url": channels.display_url(row["type"], row["url"]),
        "events": list(row["events"]),
        "groups": list(row["groups"]),
        "include_maintenance": row["include_maintenance"],
        "enabled": row["enabled"],
    }
    if row["secret_encrypted"] is not None:
        fields["secret"] = bytes(row["secret_encrypted"]).hex()
    return fields


def audited_changes(before: asyncpg.Record, after: asyncpg.Record) -> dict[str, Any]:
    """The audited difference of an update. A slack URL whose token changed looks the same masked: it is marked
    "<changed>" as a secret is."""
    changes = diff(audited_fields(before), audited_fields(after))
    if before["url"] != after["url"] and "url" not in changes:
        changes["url"] = SECRET_MARK
    return changes


async def audit_channel(
    connection: Connection, actor: str, action: str, channel_id: uuid.UUID, changes: dict[str, Any]
) -> None:
    await record_audit(
        connection, actor=actor, action=action, entity_type=ENTITY_TYPE, entity_id=str(channel_id), changes=changes
    )


@dataclass(frozen=True)
class SubmittedChannel:
    """A valid body, and whether it says `secret` at all (omitted on PUT keeps the stored secret)."""

    body: ChannelWrite
    mentions_secret: bool


async def read_channel_write(request: Request) -> SubmittedChannel:
    return parse_channel_write(await read_json(request))


def parse_channel_write(document: object) -> SubmittedChannel:
    """A channel body as read (the API's and the dashboard's): 422 naming every bad field."""
    try:
        body = ChannelWrite.model_validate(document)
    except ValidationError as exc:
        raise validation_problem(exc) from None
    return SubmittedChannel(body, "secret" in body.model_fields_set)


def _fields(
    body: ChannelWrite, *, secret: str | None, keep_secret: bool, url: str | None = None
) -> channels.ChannelFields:
    return channels.ChannelFields(
        name=body.name, type=body.type, url=url or body.url, events=tuple(body.events), groups=tuple(body.groups),
        include_maintenance=body.include_maintenance, enabled=body.enabled, secret=secret, keep_secret=keep_secret,
    )  # fmt: skip


async def _fetch_channel(connection: Connection, channel_id: uuid.UUID, *, lock: bool = False) -> asyncpg.Record:
    row = await channels.get_channel(connection, channel_id, lock=lock)
    if row is None:
        raise not_found("notification channel")
    return row


def _duplicate(name: str) -> Problem:
    return conflict(f"a notification channel named {name!r} already exists")


async def list_channels(request: Request, principal: Principal) -> Response:
    query = read_query(request, PageQuery)
    after = CHANNEL_PAGES.after(query.cursor)
    async with context_of(request).pool.acquire() as connection:
        rows = await channels.channel_page(connection, limit=CHANNEL_PAGES.rows_to_fetch(query.limit), after=after)
    rows, next_cursor = CHANNEL_PAGES.page(rows, query.limit)
    return json_response(Page[ChannelView](items=[channel_view(row) for row in rows], next_cursor=next_cursor))


async def create_channel(request: Request, principal: Principal) -> Response:
    submitted = await read_channel_write(request)
    return json_response(await create_channel_on(context_of(request), principal.name, submitted), 201)


async def create_channel_on(context: ApiContext, actor: str, submitted: SubmittedChannel) -> ChannelView:
    """Create a channel, audited; a webhook without a secret gets one generated, shown in this answer only."""
    body = submitted.body
    generated = channels.generate_secret() if body.type == "webhook" and body.secret is None else None
    secret = body.secret if body.type == "webhook" and body.secret is not None else generated
    async with context.pool.acquire() as connection, connection.transaction():
        try:
            row = await channels.insert_channel(
                connection, _fields(body, secret=secret, keep_secret=False), context.secrets
            )
        except channels.DuplicateChannelName:
            raise _duplicate(body.name) from None
        await audit_channel(connection, actor, "notification_channel.create", row["id"], audited_fields(row))
    return channel_view(row, secret=generated)


async def get_channel(request: Request, principal: Principal) -> Response:
    channel_id = path_uuid(request, "channel_id")
    async with context_of(request).pool.acquire() as connection:
        row = await _fetch_channel(connection, channel_id)
    return json_response(channel_view(row))


async def update_channel(request: Request, principal: Principal) -> Response:
    channel_id = path_uuid(request, "channel_id")
    submitted = await read_channel_write(request)
    return json_response(await update_channel_on(context_of(request), principal.name, channel_id, submitted))


async def update_channel_on(
    context: ApiContext, actor: str, channel_id: uuid.UUID, submitted: SubmittedChannel
) -> ChannelView:
    """Replace a channel's fields (PUT), audited. A URL sent back as responses show it (masked) keeps the stored one
    (`kept_url`). A webhook keeps its stored secret when the body omits it; one
    without a stored secret (it was slack) gets a generated one, shown in this answer only; slack loses it."""
    body = submitted.body
    generated = None
    async with context.pool.acquire() as connection, connection.transaction():
        before = await _fetch_channel(connection, channel_id, lock=True)
        keep = body.type == "webhook" and not submitted.mentions_secret and before["secret_encrypted"] is not None
        if body.type == "webhook" and not keep and body.secret is None:
            generated = channels.generate_secret()
        secret = (body.secret or generated) if body.type == "webhook" and not keep else None
        url = channels.kept_url(before["type"], before["url"], body.url)
        try:
            row = await channels.replace_channel(
                connection, channel_id, _fields(body, secret=secret, keep_secret=keep, url=url), context.secrets
            )
        except channels.DuplicateChannelName:
            raise _duplicate(body.name) from None
        assert row is not None  # locked above
        if not row["enabled"]:
            await fail_of_disabled_channels(connection, channel_id=channel_id)
        await audit_channel(connection, actor, "notification_channel.update", channel_id, audited_changes(before, row))
    return channel_view(row, secret=generated)


async def delete_channel(request: Request, principal: Principal) -> Response:
    channel_id = path_uuid(request, "channel_id")
    await delete_channel_on(context_of(request), principal.name, channel_id)
    return Response(status_code=204)


async def delete_channel_on(context: ApiContext, actor: str, channel_id: uuid.UUID) -> None:
    """Delete a channel and its delivery records, audited."""
    async with context.pool.acquire() as connection, connection.transaction():
        before = await channels.delete_channel(connection, channel_id)
        if before is None:
            raise not_found("notification channel")
        await audit_channel(connection, actor, "notification_channel.delete", channel_id, audited_fields(before))


async def test_channel(request: Request, principal: Principal) -> Response:
    channel_id = path_uuid(request, "channel_id")
    return json_response(await test_channel_on(context_of(request), principal.name, channel_id))


async def test_channel_on(context: ApiContext, actor: str, channel_id: uuid.UUID) -> ChannelTestAnswer:
    """Send a `healthgate.test` event to the channel now (enabled or not: the operator asked), and record it as one
    delivery, audited. No connection is held while the receiver is waited for; a channel deleted meanwhile
    answers 404."""
    async with context.pool.acquire() as connection:
        row = await _fetch_channel(connection, channel_id)
    try:
        channel = channels.channel_from_row(row, context.secrets)
    except DecryptionError:
        raise conflict(UNDECRYPTABLE) from None
    event_id, body = make_test_event(context.source)
    attempt = await context.notifications.send(channel, event_id, body)
    answer = ChannelTestAnswer(delivered=attempt.delivered, status_code=attempt.status_code, detail=attempt.detail)
    async with context.pool.acquire() as connection, connection.transaction():
        if await channels.get_channel(connection, channel_id, lock=True) is None:
            raise Problem(404, "notification channel not found: it was deleted while the test ran")
        await record_test_delivery(connection, channel_id, event_id, body, attempt)
        changes = {"event_id": str(event_id), "delivered": attempt.delivered, "status_code": attempt.status_code}
        await audit_channel(connection, actor, "notification_channel.test", channel_id, changes)
    return answer


async def list_deliveries(request: Request, principal: Principal) -> Response:
    channel_id = path_uuid(request, "channel_id")
    query = read_query(request, PageQuery)
    before = DELIVERY_PAGES.after(query.cursor)
    async with context_of(request).pool.acquire() as connection:
        await _fetch_channel(connection, channel_id)
        rows = await delivery_page(
            connection, channel_id, limit=DELIVERY_PAGES.rows_to_fetch(query.limit), before=before
        )
    rows, next_cursor = DELIVERY_PAGES.page(rows, query.limit)
    items = [DeliveryView.model_validate(dict(row)) for row in rows]
    return json_response(Page[DeliveryView](items=items, next_cursor=next_cursor))
