"""HEALTHGATE_BLOCKED_NETWORKS (CONTRACT §2): addresses that neither checks (CONTRACT §4, reason `blocked`) nor
notifications (§7, a delivery `failed` at once) may reach, cloud metadata services by default. One guard for the
poller, the notifier and the API's channel tests: a name is refused when any address it resolves to is blocked, an
IP literal when it is (`refuse_if_blocked`), and connections go only to the addresses the guard saw
(`GuardedResolver`, which aiohttp connects with), so a name cannot resolve once harmlessly and again into a blocked
network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Where a connection to the unspecified address (0.0.0.0, ::) of each IP version goes.
_LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


class BlockedTarget(Exception):
    """The target resolves into a blocked network; the message names the address and the network."""


def blocked_network(address: str, blocked: Sequence[Network]) -> Network | None:
    """The blocked network `address` (an IP address, maybe with an IPv6 zone) connects into, or None (also for a
    name). An IPv4-mapped IPv6 address is the IPv4 address inside; the unspecified address (0.0.0.0, ::) is also
    the local host's loopback, which is where a connection to it goes (Linux, and most systems)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if ip.is_unspecified:
        candidates.append(_LOOPBACK[ip.version])
    return next((network for network in blocked for candidate in candidates if candidate in network), None)


def refuse_if_blocked(address: str, blocked: Sequence[Network], *, name: str | None = None) -> None:
    """Raise BlockedTarget if `address` (which `name` resolved to, if given) is in a blocked network."""
    network = blocked_network(address, blocked)
    if network is None:
        return
    where = "the local host, in" if ipaddress.ip_address(address.split("%", 1)[0]).is_unspecified else "in"
    if name is None or name == address:
        raise BlockedTarget(f"{address} is {where} a blocked network ({network})")
    raise BlockedTarget(f"{name} resolves to {address}, {where} a blocked network ({network})")


class GuardedResolver(AbstractResolver):
    """Resolves like the system does, then refuses names with any address in a blocked network."""

    def __init__(self, blocked: Sequence[Network]) -> None:
        self._blocked = blocked
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            refuse_if_blocked(result["host"], self._blocked, name=host)
        return results

    async def close(self) -> None:
        await self._resolver.close()
