"""Which channels an event goes to (CONTRACT §7): pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from shared.notification_channels import Channel


class Match(Enum):
    """What a channel makes of an event."""

    SEND = "send"
    # The event is about a host in maintenance and the channel does not include those: counted as skipped.
    SKIP_MAINTENANCE = "skip_maintenance"
    # Not for this channel (another event type, another group, disabled).
    NONE = "none"


def match(channel: Channel, routing_key: str, groups: Sequence[str] | None, in_maintenance: bool) -> Match:
    """Whether `channel` gets the event of `routing_key` about hosts in `groups` (None: unknown, e.g. a host deleted
    since; such an event reaches only channels of all groups), `in_maintenance` as the event says.

    A disabled channel never gets anything; a channel with groups gets an event when one of the event's groups is
    among them; one without groups gets every event of its types."""
    if not channel.enabled or routing_key not in channel.events:
        return Match.NONE
    if channel.groups and not (groups and set(groups) & set(channel.groups)):
        return Match.NONE
    if in_maintenance and not channel.include_maintenance:
        return Match.SKIP_MAINTENANCE
    return Match.SEND
