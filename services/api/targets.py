"""What a check may point at: http(s) URLs, host names and IP addresses (CONTRACT §3).

Each function returns the problems of one value, in words for an operator; an empty list means the
value can work. The poller reads URLs with aiohttp (yarl, which splits a URL as `urllib.parse` does)
and resolves names with `getaddrinfo`, while pydantic parses URLs the WHATWG way. A value is accepted
only if it is well formed for both and names the same host for both: a backslash, an IPv4 address in
a legacy form (`0x7f000001`, `1.2.3`) or a percent sign in a host name would make them disagree.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import idna
from pydantic import AnyHttpUrl, ValidationError

from shared.addresses import parse_dns_server

# RFC 1035 §2.3.4: 255 octets on the wire, i.e. 253 characters written without the trailing dot.
MAX_HOST_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# Letters, digits, hyphens (RFC 1123), and underscores, which resolvers accept and internal zones use.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
# A last label that is a number makes getaddrinfo (inet_aton) and WHATWG read the name as an IPv4
# address in a legacy form ("1.2.3" is 1.2.0.3, "0x7f000001" is 127.0.0.1): it is not a host name.
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
# An IPv6 zone (RFC 4007) is an interface name (at most 15 characters on Linux) or an index.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

IP_FORMS = "IPv4 is written as four decimal numbers, 192.0.2.10, and IPv6 as 2001:db8::1"


def has_unprintable(text: str) -> bool:
    """True if `text` holds whitespace, control or format characters (nothing a URL or name may hold)."""
    return any(character.isspace() or not character.isprintable() for character in text)


def host_name_problems(name: str) -> list[str]:
    """Problems of a DNS host name: letters, digits, `-` and `_` in labels of 1-63 characters, at most
    253 characters in all, an optional trailing dot; a name with other letters is encoded with IDNA
    2008 (UTS #46 mapping, as aiohttp's yarl does), and must be encodable."""
    if has_unprintable(name):
        return ["must not contain spaces or control characters"]
    try:
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        return [f"cannot be encoded for DNS (IDNA): {exc}"]
    bare = mapped[:-1] if mapped.endswith(".") else mapped
    labels = bare.split(".")
    encoded = []
    for label in labels:
        if not label:
            return ["has an empty label (a leading dot or two dots in a row)"]
        try:
            # An ASCII label stays as written (underscores allowed); others, and xn-- labels, are IDNA.
            if label.isascii() and not label.lower().startswith("xn--"):
                encoded.append(label)
            else:
                encoded.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError) as exc:
            return [f"cannot be encoded for DNS (IDNA): label {label!r}: {exc}"]
    problems = []
    if len(".".join(encoded)) > MAX_HOST_NAME_LENGTH:
        problems.append(f"is longer than {MAX_HOST_NAME_LENGTH} characters (as DNS writes it)")
    if any(len(label) > MAX_LABEL_LENGTH for label in encoded):
        problems.append(f"has a label longer than {MAX_LABEL_LENGTH} characters")
    if not all(_LABEL.fullmatch(label) for label in encoded):
        problems.append("may hold only letters, digits, '-' and '_', and no label may begin or end with '-'")
    if _NUMBER.fullmatch(encoded[-1]):
        problems.append(f"is neither an IP address nor a host name (its last label is a number): {IP_FORMS}")
    return problems


def address_problems(address: str) -> list[str]:
    """Problems of a tcp/grpc `address`: a host name or an IP address, without brackets or port."""
    if "/" in address or "@" in address:
        return ["must be a host name or an IP address alone, not a URL, path or network"]
    if "[" in address or "]" in address:
        return [f"must be written without brackets: {IP_FORMS}"]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None and not _ZONE.fullmatch(ip.scope_id):
            return ["has an IPv6 zone that is not an interface name or index (fe80::1%eth0)"]
        return []
    if address.count(":") == 1:
        return ["must not hold a port (it goes in `port`): a host name or an IP address alone"]
    if ":" in address:
        return [f"is not a valid IPv6 address: {IP_FORMS}"]
    return host_name_problems(address)


def dns_name_problems(name: str) -> list[str]:
    """Problems of a dns check's `dns_name`: a host name to look up (not an IP address, URL or port). A
    trailing dot (a fully qualified name) is allowed."""
    bare = name[:-1] if name.endswith(".") and name != "." else name
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return ["is an IP address: a dns check looks up a host name"]
    if "/" in bare or "@" in bare or ":" in bare or "[" in bare:
        return ["must be a host name alone, not a URL, address or port"]
    return host_name_problems(name)  # which allows one trailing dot itself: "db.test.." has an empty label


def dns_server_problems(server: str) -> list[str]:
    """Problems of a dns check's `dns_server`: an IP address, or ip:port with the IPv6 address in brackets
    ([::1]:53). A name is refused: the resolver's own address would need a resolver."""
    try:
        parse_dns_server(server)
    except ValueError as exc:
        return [str(exc)]
    return []


def url_problems(url: str, *, base_url: bool, credentials: bool = False) -> list[str]:
    """Problems of an absolute http(s) URL: a check's `url`, or (`base_url`) a host's `agent_url`,
    which has no query string or fragment either. Neither may hold credentials; a notification channel's `url`
    (`credentials`) may: responses show it without the password (shared.notification_channels.display_url)."""
    if has_unprintable(url):
        return ["must not contain spaces or control characters (percent-encode them, as %20)"]
    if "\\" in url:
        return ["must not contain a backslash"]
    try:
        AnyHttpUrl(url)
    except ValidationError as exc:
        return [exc.errors(include_url=False)[0]["msg"].replace("Input should be a valid URL, ", "not a valid URL: ")]
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # WHATWG reads "http://[@0" as userinfo "[" and host 0; urllib.parse refuses it
        return [f"not a valid URL: {exc}"]
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return ["must be an absolute http or https URL"]
    problems = []
    if "@" in parts.netloc and not credentials:
        if base_url:
            problems.append("must not contain credentials (user:password@)")
        else:
            problems.append(
                "must not contain credentials (user:password@): they go in basic_auth_user and basic_auth_pass"
            )
    try:
        if parts.port == 0:
            problems.append("port 0 cannot be connected to; a port is 1-65535")
    except ValueError:
        problems.append("has an invalid port; a port is 1-65535")
    host = parts.hostname or ""
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            problems.append(f"has an invalid IPv6 address in brackets: {IP_FORMS}")
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            problems.extend(f"host {host!r} {problem}" for problem in host_name_problems(host))
    if base_url and "?" in url:
        problems.append("must not have a query string (a base URL: the agent's paths are appended to it)")
    if base_url and "#" in url:
        problems.append("must not have a fragment (a base URL: the agent's paths are appended to it)")
    return problems
