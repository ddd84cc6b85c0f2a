"""`notification_channels`: where notifications go (CONTRACT §7). This module is the only one that writes the table
(docs/architecture.md, "Who writes which table"): the api creates, replaces and deletes channels; the notifier reads
the enabled ones (`enabled_channels`).

A webhook channel's Standard Webhooks secret is stored encrypted with the key file (`shared.crypto.SecretBox`,
bound to the channel id) and leaves this module only decrypted for signing (`Channel.secret`), never in a view
(`channel_view`). A slack URL holds its token: views show it masked (`display_url`).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from shared.crypto import SecretBox
from shared.database import Connection
from shared.details import names_a_secret
from shared.events import OUTBOUND_EVENTS

ChannelType = Literal["webhook", "slack"]

# The routing keys a channel may subscribe to: every outbound event (CONTRACT §5, §6) but check.result, which comes
# with every run of every check (a stream for AMQP consumers, not for people), and `healthgate.test` (only /test
# sends it).
NOTIFIABLE_EVENTS: tuple[str, ...] = tuple(key for key in OUTBOUND_EVENTS if key != "check.result")
DEFAULT_EVENTS: tuple[str, ...] = ("host.status_changed", "job.failed", "job.verification_failed", "job.halted")
TEST_EVENT_TYPE = "healthgate.test"

# Standard Webhooks secrets: "whsec_" + base64 of 24-64 random bytes (CONTRACT §7, standard-webhooks spec §Signing).
SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64
GENERATED_SECRET_BYTES = 32
MASK = "…"
# The PostgreSQL NOTIFY channel on which every insert, replace and delete of a channel is announced (in the writer's
# transaction, so delivered at its commit): notifiers LISTEN and read the channels again instead of per event.
CHANNELS_CHANGED = "healthgate_notification_channels"

CHANNEL_COLUMNS = """
    id, name, type, url, secret_encrypted, events, groups, include_maintenance, enabled, created_at, updated_at
"""


class InvalidSecret(ValueError):
    """A secret that is not "whsec_" + base64 of 24-64 bytes; the message says what is wrong."""


class DuplicateChannelName(Exception):
    """Another channel has this name (CONTRACT §7: 409)."""


def generate_secret() -> str:
    """A new Standard Webhooks secret: "whsec_" + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(GENERATED_SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """`secret` if it is a Standard Webhooks secret ("whsec_" + standard base64, padded, of 24-64 bytes).

    Raises InvalidSecret saying what is wrong (never echoing the secret)."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(f"must start with {SECRET_PREFIX!r} (a Standard Webhooks secret)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX).encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidSecret(f"must be {SECRET_PREFIX!r} followed by base64 (RFC 4648 §4, padded)") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise InvalidSecret(
            f"must hold {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes once base64-decoded, not {len(key)}"
        )
    return secret


def display_url(channel_type: str, url: str) -> str:
    """The URL as responses, audit entries, logs and details show it (CONTRACT §7): a slack URL with everything after
    the host replaced by "…" (its path is the token); any URL without the password of its user information, and
    without the values of query parameters named like secrets (`?token=…`, `?api_key=…`: shared.details'
    `names_a_secret`), shown as "***". A URL sent back as shown keeps the stored one (`kept_url`)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if channel_type == "slack":
        return f"{parts.scheme}://{netloc}/{MASK}"
    query = "&".join(_masked_parameter(parameter) for parameter in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _masked_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    return f"{name}=***" if equals and value and names_a_secret(unquote(name)) else parameter


def kept_url(channel_type: str, stored_url: str, submitted_url: str) -> str:
    """The URL a PUT stores: the stored one when `submitted_url` is exactly how responses show it (masked), so that
    a channel read, changed and sent back (GET then PUT, `healthgate export` then `apply`) keeps its token; else
    the submitted one."""
    shown = display_url(channel_type, stored_url)
    return stored_url if submitted_url == shown and shown != stored_url else submitted_url


@dataclass(frozen=True)
class Channel:
    """A channel as the notifier uses it: `secret` decrypted (webhooks; None for slack). Never logged whole."""

    id: uuid.UUID
    name: str
    type: ChannelType
    url: str
    secret: str | None
    events: tuple[str, ...]
    groups: tuple[str, ...]
    include_maintenance: bool
    enabled: bool

    def __repr__(self) -> str:  # a Channel in a traceback or log must not show its secret or slack token
        return f"Channel(id={self.id}, name={self.name!r}, type={self.type}, url={display_url(self.type, self.url)!r})"


def channel_from_row(row: asyncpg.Record, box: SecretBox) -> Channel:
    """The channel of a row of CHANNEL_COLUMNS, its secret decrypted. Raises shared.crypto.DecryptionError when the
    secret does not decrypt with this key."""
    encrypted = row["secret_encrypted"]
    return Channel(
        id=row["id"],
        name=row["name"],
        type=row["type"],
        url=row["url"],
        secret=box.decrypt(encrypted, row["id"]) if encrypted is not None else None,
        events=tuple(row["events"]),
        groups=tuple(row["groups"]),
        include_maintenance=row["include_maintenance"],
        enabled=row["enabled"],
    )


def channel_view(row: asyncpg.Record) -> dict[str, Any]:
    """A channel as the API shows it (CONTRACT §7): no secret (`secret_set` instead), a slack URL masked."""
    return {
        "id": row["id"],
        "name": row["name"],
        "type": row["type"],
        "url": display_url(row["type"], row["url"]),
        "secret_set": row["secret_encrypted"] is not None,
        "events": list(row["events"]),
        "groups": list(row["groups"]),
        "include_maintenance": row["include_maintenance"],
        "enabled": row["enabled"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


@dataclass(frozen=True)
class ChannelFields:
    """What a POST or PUT sets (CONTRACT §7). `secret`: the secret in clear for a webhook (already checked with
    `check_secret`), None for slack; on PUT, `keep_secret` keeps the stored one instead."""

    name: str
    type: ChannelType
    url: str
    events: tuple[str, ...]
    groups: tuple[str, ...]
    include_maintenance: bool
    enabled: bool
    secret: str | None = None
    keep_secret: bool = False


async def insert_channel(connection: Connection, fields: ChannelFields, box: SecretBox) -> asyncpg.Record:
    """Create a channel; returns its row (CHANNEL_COLUMNS). Raises DuplicateChannelName."""
    channel_id = uuid.uuid4()
    encrypted = box.encrypt(fields.secret, channel_id) if fields.secret is not None else None
    try:
        row = await connection.fetchrow(
            f"""
            INSERT INTO notification_channels
                (id, name, type, url, secret_encrypted, events, groups, include_maintenance, enabled)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING {CHANNEL_COLUMNS}
            """,
            channel_id,
            fields.name,
            fields.type,
            fields.url,
            encrypted,
            list(fields.events),
            list(fields.groups),
            fields.include_maintenance,
            fields.enabled,
        )
    except asyncpg.UniqueViolationError:
        raise DuplicateChannelName(fields.name) from None
    assert row is not None
    await _announce_change(connection)
    return row


async def replace_channel(
    connection: Connection, channel_id: uuid.UUID, fields: ChannelFields, box: SecretBox
) -> asyncpg.Record | None:
    """Replace a channel's fields (PUT); None when it does not exist. A webhook keeps its stored secret when
    `fields.keep_secret`; a channel turned into slack loses its secret. Raises DuplicateChannelName."""
    encrypted = box.encrypt(fields.secret, channel_id) if fields.secret is not None else None
    try:
        row = await connection.fetchrow(
            f"""
            UPDATE notification_channels SET
                name = $2, type = $3, url = $4,
                secret_encrypted = CASE WHEN $10 AND $3 = 'webhook' THEN secret_encrypted ELSE $5 END,
                events = $6, groups = $7, include_maintenance = $8, enabled = $9, updated_at = now()
            WHERE id = $1
            RETURNING {CHANNEL_COLUMNS}
            """,
            channel_id,
            fields.name,
            fields.type,
            fields.url,
            encrypted,
            list(fields.events),
            list(fields.groups),
            fields.include_maintenance,
            fields.enabled,
            fields.keep_secret,
        )
    except asyncpg.UniqueViolationError:
        raise DuplicateChannelName(fields.name) from None
    if row is not None:
        await _announce_change(connection)
    return row


async def delete_channel(connection: Connection, channel_id: uuid.UUID) -> asyncpg.Record | None:
    """Delete a channel (its delivery records go with it); its row as it was, or None when it did not exist."""
    row = await connection.fetchrow(
        f"DELETE FROM notification_channels WHERE id = $1 RETURNING {CHANNEL_COLUMNS}", channel_id
    )
    if row is not None:
        await _announce_change(connection)
    return row


async def _announce_change(connection: Connection) -> None:
    """NOTIFY CHANNELS_CHANGED: at the commit of the caller's transaction (at once without one)."""
    await connection.execute("SELECT pg_notify($1, '')", CHANNELS_CHANGED)


async def get_channel(connection: Connection, channel_id: uuid.UUID, *, lock: bool = False) -> asyncpg.Record | None:
    """One channel's row (CHANNEL_COLUMNS), locked FOR UPDATE when `lock`; None when it does not exist."""
    suffix = " FOR UPDATE" if lock else ""
    return await connection.fetchrow(
        f"SELECT {CHANNEL_COLUMNS} FROM notification_channels WHERE id = $1{suffix}", channel_id
    )


async def channel_page(
    connection: Connection, *, limit: int, after: tuple[str, uuid.UUID] | None
) -> list[asyncpg.Record]:
    """Channels by name (then id), after the (name, id) cursor `after`, at most `limit` rows."""
    if after is None:
        return await connection.fetch(
            f"SELECT {CHANNEL_COLUMNS} FROM notification_channels ORDER BY name, id LIMIT $1", limit
        )
    return await connection.fetch(
        f"""
        SELECT {CHANNEL_COLUMNS} FROM notification_channels
        WHERE (name, id) > ($1, $2)
        ORDER BY name, id LIMIT $3
        """,
        after[0],
        after[1],
        limit,
    )


async def enabled_channels(connection: Connection) -> list[asyncpg.Record]:
    """Every enabled channel's row (CHANNEL_COLUMNS): what the notifier matches events against
    (decrypt with `channel_from_row`)."""
    return await connection.fetch(f"SELECT {CHANNEL_COLUMNS} FROM notification_channels WHERE enabled ORDER BY id")
