"""schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS in schemathesis's process).

The fuzzed API stores whatever it accepts, and the session's poller runs every enabled check within seconds
and every check on /test: a generated host name, URL or address the API accepts would be looked up in DNS,
and no test traffic may leave 127.0.0.0/8. So before each request, a target the API would accept and the
poller would resolve is replaced by a loopback address: a check's `url` and `address`, a host's `agent_url`
and its `name` (a tcp check without address connects to it), and a dns check's `dns_server` (or its absence:
the system resolver). A notification channel's `url` the API would accept is sent as a loopback port where
nothing listens (its /test POSTs to it at once). A value the API refuses is sent as generated,
so every validator still meets what schemathesis makes up; an accepted one stays accepted.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import schemathesis

from services.api.targets import address_problems, dns_server_problems, host_name_problems, url_problems
from shared.addresses import parse_dns_server
from tests.support.database import resolves_by_dns

HOSTS = "/api/v1/hosts"
CHANNELS = "/api/v1/notification-channels"
# Where fuzzed notification channels point: the discard port on loopback, where nothing listens (refused at once).
NO_RECEIVER = "http://127.0.0.1:9/"
# Where fuzzed dns checks send their questions: a loopback port no DNS server listens on (the discard port), never
# the machine's resolver (a dns check without dns_server asks it).
NO_DNS_SERVER = "127.0.0.1:9"


def loopback_for(name: str) -> str:
    """A 127.0.0.0/8 address of its own for `name` (host names are unique: one address each)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return f"127.{digest[0]}.{digest[1]}.{max(digest[2], 1)}"


def local_url(url: object, *, base_url: bool) -> object:
    """`url` with its host replaced by 127.0.0.1 when the API would accept it and the poller resolve it."""
    if not isinstance(url, str) or url_problems(url, base_url=base_url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not resolves_by_dns(host):
        return url
    netloc = "127.0.0.1" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def off_loopback_dns_server(server: object) -> bool:
    """Whether a dns check's `dns_server` is one the API accepts that is not on 127.0.0.0/8 (it would be asked)."""
    if not isinstance(server, str) or dns_server_problems(server):
        return False
    return not ipaddress.ip_address(parse_dns_server(server)[0]).is_loopback


def local_targets(path: str, body: dict[str, Any]) -> None:
    """Replace, in place, the targets of a host or check body that the poller would look up in DNS."""
    if path.startswith(f"{HOSTS}/{{host_id}}/health-checks"):
        if "url" in body:
            body["url"] = local_url(body["url"], base_url=False)
        address = body.get("address")
        if isinstance(address, str) and not address_problems(address) and resolves_by_dns(address):
            body["address"] = "127.0.0.1"
        server = body.get("dns_server")
        if body.get("check_type") == "dns" and (server is None or off_loopback_dns_server(server)):
            body["dns_server"] = NO_DNS_SERVER
    elif path.startswith(CHANNELS):
        url = body.get("url")
        if isinstance(url, str) and not url_problems(url, base_url=False, credentials=True):
            body["url"] = NO_RECEIVER
    elif path in (HOSTS, f"{HOSTS}/{{host_id}}"):
        if "agent_url" in body:
            body["agent_url"] = local_url(body["agent_url"], base_url=True)
        name = body.get("name")
        if isinstance(name, str) and not host_name_problems(name) and resolves_by_dns(name):
            body["name"] = loopback_for(name)


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    if isinstance(case.body, dict):
        local_targets(case.path, case.body)
