"""Addresses written in check fields, which the api (validation, pages) and the pollers (connecting, details) read."""

from __future__ import annotations

import ipaddress

DNS_PORT = 53


def parse_dns_server(server: str) -> tuple[str, int]:
    """`dns_server` as (ip, port): "192.0.2.1", "192.0.2.1:5353", "2001:db8::1", "[2001:db8::1]:5353". Port 53
    when none is given. Raises ValueError saying what is wrong."""
    host, port = server, DNS_PORT
    if server.startswith("["):
        inside, bracket, rest = server[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("must be an IP address, or ip:port with an IPv6 address in brackets ([::1]:53)")
        host, port_text = inside, rest[1:] if rest else str(DNS_PORT)
        port = _dns_port(port_text)
    elif server.count(":") == 1:
        host, _, port_text = server.partition(":")
        port = _dns_port(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("must be an IP address (a name would need a resolver itself), or ip:port") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError("must not carry an IPv6 zone")
    if server.startswith("[") and not isinstance(ip, ipaddress.IPv6Address):
        raise ValueError("has brackets around an IPv4 address: brackets are for IPv6 only ([::1]:53), as in URLs")
    return str(ip), port


def _dns_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return int(text)


def host_port(host: str, port: int | str) -> str:
    """`host:port` as a detail or a page shows it; an IPv6 address in brackets (`[::1]:443`, as in a URL, RFC 3986),
    where `::1:443` would read as another address."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
