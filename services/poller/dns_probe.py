"""dns checks (CONTRACT §3): ask a resolver for a name's records and compare them with `expected_values`.

The question goes to the check's `dns_server` (ip or ip:port), or to the nameservers of the system resolver as
/etc/resolv.conf named them when the poller started. dnspython sends it, waits, retries the servers and asks again
over TCP when a UDP answer comes back truncated; nothing here reads DNS messages. Servers in a blocked network
(HEALTHGATE_BLOCKED_NETWORKS) are never sent a packet.

Answers are shown and compared as `dig +short` prints them (the records of the answer section, CNAMEs of the
chain included): A and AAAA as addresses, names with their trailing dot, MX as "10 mail.example.", SRV as
"10 5 5060 sip.example.", TXT without quotes, a record's strings joined without a separator (as SPF, RFC 7208
§3.3, and DKIM read them). An expected value matches an answer case-insensitively and without trailing dots; an
IP address matches however it is written (2001:db8::1 is 2001:0db8:0:0::1); for MX and SRV the target name
alone matches too.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.IN.SRV
import dns.rdtypes.txtbase
import dns.resolver
import dns.rrset

from services.poller.probes import CheckTarget, Verdict, dns_name
from shared.addresses import host_port, parse_dns_server
from shared.blocked_networks import Network, blocked_network

log = logging.getLogger(__name__)

# One attempt at one server: dnspython then asks the next server, or the same one again, until the check's
# timeout (which `Prober.run` enforces and words) ends the run. 2 s is dnspython's and dig's own default.
ATTEMPT_SECONDS = 2.0
# dnspython's own deadline lies past the check's, so that a run without an answer always ends at the check's
# timeout, in the same words as every other check type's.
LIFETIME_MARGIN_SECONDS = 1.0
# EDNS(0) with the payload size dig and the DNS flag day 2020 use; a larger answer comes back truncated and is
# asked for again over TCP.
EDNS_PAYLOAD_BYTES = 1232
# A detail shows this many answers, each cut to SHOWN_ANSWER_CHARS (a TXT record may hold kilobytes).
SHOWN_ANSWERS = 10
SHOWN_ANSWER_CHARS = 100
# Record types of an answer section that `dig +short` prints for a question: the type asked and the chain.
CHAIN_TYPES = frozenset({dns.rdatatype.CNAME, dns.rdatatype.DNAME})

RESOLV_CONF = "/etc/resolv.conf"

Server = tuple[str, int]


def system_nameservers(filename: str = RESOLV_CONF) -> list[Server]:
    """The system resolver's nameservers, (ip, port) in resolv.conf's order, as dnspython reads them; [] when there
    is no configuration (no file, or no `nameserver` line), which is logged. Read once, when the poller starts."""
    try:
        resolver = dns.resolver.Resolver(filename=filename, configure=True)
    except (dns.resolver.NoResolverConfiguration, OSError) as exc:
        log.warning("no system resolver for dns checks without dns_server", extra={"error": str(exc)})
        return []
    return [
        (server, resolver.nameserver_ports.get(server, resolver.port))
        for server in resolver.nameservers
        if isinstance(server, str)  # resolv.conf names addresses only (never DoH or DoT servers)
    ]


def answer_text(rdata: dns.rdata.Rdata) -> str:
    """One record as `dig +short` prints it, TXT without its quotes and its strings joined (undecodable bytes
    become U+FFFD)."""
    if isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
        return b"".join(rdata.strings).decode("utf-8", errors="replace")
    return rdata.to_text()


def normalized(value: str) -> str:
    """A value as answers and expected values are compared: without surrounding spaces and trailing dots (and spaces
    among them), in lower case, an IP address in its canonical form."""
    # `\s` is str.strip()'s whitespace (Unicode's, NEL included): one set for both ends keeps this idempotent.
    text = re.sub(r"[\s.]+\Z", "", value.strip()).lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def match_keys(rdata: dns.rdata.Rdata) -> set[str]:
    """What an expected value may equal (normalized) to match this record: its text, and for MX and SRV the
    target name alone."""
    keys = {normalized(answer_text(rdata))}
    if isinstance(rdata, dns.rdtypes.ANY.MX.MX):
        keys.add(normalized(rdata.exchange.to_text()))
    elif isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
        keys.add(normalized(rdata.target.to_text()))
    return keys


def answer_records(response: dns.message.Message, rdtype: dns.rdatatype.RdataType) -> list[dns.rdata.Rdata]:
    """The records of the answer section `dig +short` prints for a question of `rdtype`: those of that type and
    the CNAME/DNAME chain, in the section's order."""
    return [
        rdata
        for rrset in response.answer
        if isinstance(rrset, dns.rrset.RRset)
        and rrset.rdclass == dns.rdataclass.IN
        and (rrset.rdtype == rdtype or rrset.rdtype in CHAIN_TYPES)
        for rdata in rrset
    ]


def missing_values(expected: Iterable[str], records: Iterable[dns.rdata.Rdata]) -> list[str]:
    """The expected values that match no record, in the order given."""
    keys: set[str] = set()
    for rdata in records:
        keys |= match_keys(rdata)
    return [value for value in expected if normalized(value) not in keys]


def shown_answers(texts: Sequence[str]) -> str:
    """Answers for a detail: the first SHOWN_ANSWERS, each cut to SHOWN_ANSWER_CHARS, and how many more."""
    shown = [text if len(text) <= SHOWN_ANSWER_CHARS else text[:SHOWN_ANSWER_CHARS] + "…" for text in texts]
    more = len(shown) - SHOWN_ANSWERS
    return ", ".join(shown[:SHOWN_ANSWERS]) + (f" and {more} more" if more > 0 else "")


def shown_servers(servers: Sequence[Server]) -> str:
    return ", ".join(host_port(ip, port) for ip, port in servers)


def server_failures(errors: Sequence[tuple[object, ...]], names: dict[str, str]) -> tuple[bool, str]:
    """Words for what every server did (dnspython's NoNameservers errors: the server as dnspython names it, tcp,
    port, error or rcode text, response), one clause per distinct failure, each server named as `names` maps
    dnspython's names (else as dnspython names it); and whether each was a connection failure (an OSError: refused,
    unreachable) rather than an answer."""
    clauses: dict[str, None] = {}
    all_connection = bool(errors)
    for server, tcp, _port, error, *_ in errors:
        where = names.get(str(server), str(server))
        all_connection = all_connection and isinstance(error, OSError)
        if isinstance(error, str):  # an rcode: SERVFAIL, REFUSED, NOTIMP, ...
            clauses[f"{where} answered {error}"] = None
        elif isinstance(error, ConnectionRefusedError):
            clauses[f"connection refused by {where}"] = None
        elif isinstance(error, OSError):
            clauses[f"cannot reach {where}: {error.strerror or error}"] = None
        elif isinstance(error, EOFError):
            clauses[f"{where} closed the connection without answering"] = None
        elif isinstance(error, dns.message.Truncated):
            clauses[f"{where} sent a truncated answer{' over TCP' if tcp else ''}"] = None
        else:
            clauses[f"{where} sent an answer that cannot be read ({type(error).__name__}: {error})"] = None
    return all_connection, "; ".join(clauses) or "no server answered"


class DnsProbe:
    """Runs dns checks. Created once at poller start: it holds the blocked networks and the system resolver's
    nameservers (a change to /etc/resolv.conf takes effect when the poller restarts)."""

    def __init__(self, blocked: Sequence[Network], system_servers: Sequence[Server]) -> None:
        self._blocked = blocked
        self._system_servers = list(system_servers)

    def servers(self, target: CheckTarget) -> tuple[list[Server], Verdict | None]:
        """The servers to ask, or the verdict that none may be asked (blocked, or no system resolver)."""
        if target.dns_server is not None:
            try:
                ip, port = parse_dns_server(target.dns_server)
            except ValueError as exc:  # the API validated it; a row written otherwise still gets words
                return [], Verdict(False, "dns", f"dns_server {target.dns_server!r} {exc}")
            network = blocked_network(ip, self._blocked)
            if network is not None:
                return [], Verdict(False, "blocked", f"dns server {ip} is in a blocked network ({network})")
            return [(ip, port)], None
        if not self._system_servers:
            return [], Verdict(False, "dns", "no system resolver: /etc/resolv.conf names no nameserver")
        allowed = [server for server in self._system_servers if blocked_network(server[0], self._blocked) is None]
        if not allowed:
            blocked = ", ".join(f"{ip} ({blocked_network(ip, self._blocked)})" for ip, _ in self._system_servers)
            words = f"every nameserver of the system resolver is in a blocked network: {blocked}"
            return [], Verdict(False, "blocked", words)
        return allowed, None

    async def check(self, target: CheckTarget) -> Verdict:
        """Ask for `dns_name`'s `record_type` records and judge the answer (CONTRACT §3). Never raises, except
        CancelledError: the caller's timeout ends a run without an answer."""
        assert target.dns_name is not None
        name, rdtype_text = target.dns_name, target.record_type
        what = f"{name} {rdtype_text}"
        try:
            qname = dns.name.from_text(dns_name(name))  # IDNA 2008 / UTS #46, as tcp and http checks encode names
            rdtype = dns.rdatatype.from_text(rdtype_text)
        except UnicodeError as exc:
            error = exc.__cause__ or exc
            return Verdict(False, "dns", f"cannot look up {name}: the name cannot be encoded for DNS (IDNA: {error})")
        except dns.exception.DNSException as exc:  # an empty label, a label or name too long
            return Verdict(False, "dns", f"cannot look up {name}: {exc}")
        servers, refusal = self.servers(target)
        if refusal is not None:
            return refusal
        resolver = dns.asyncresolver.Resolver(configure=False)
        nameservers = {host_port(ip, port): dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers}
        resolver.nameservers = list(nameservers.values())
        resolver.timeout = min(ATTEMPT_SECONDS, target.timeout_seconds)
        resolver.lifetime = target.timeout_seconds + LIFETIME_MARGIN_SECONDS
        resolver.use_edns(0, 0, EDNS_PAYLOAD_BYTES)
        asked = shown_servers(servers)
        try:
            answer = await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Verdict(False, "dns", f"{what}: NXDOMAIN (no such name), answered by {asked}")
        except dns.resolver.NoNameservers as exc:
            names = {str(nameserver): shown for shown, nameserver in nameservers.items()}
            connection, words = server_failures(exc.kwargs.get("errors") or [], names)
            return Verdict(False, "connect" if connection else "dns", f"{what}: {words}")
        except dns.resolver.LifetimeTimeout:
            return Verdict(False, "timeout", f"{what}: no answer from {asked} in time")
        except dns.exception.DNSException as exc:  # YXDOMAIN (a DNAME making the name too long), ...
            return Verdict(False, "dns", f"{what}: {exc} ({asked})")
        records = answer_records(answer.response, rdtype)
        texts = [answer_text(rdata) for rdata in records]
        if answer.rrset is None:
            seen = f" (answers: {shown_answers(texts)})" if texts else ""
            return Verdict(False, "dns", f"{what}: no {rdtype_text} record, answered by {asked}{seen}")
        missing = missing_values(target.expected_values, records)
        if missing:
            wanted = ", ".join(repr(value) for value in missing)
            verb = "is" if len(missing) == 1 else "are"
            return Verdict(False, "dns", f"{what}: {wanted} {verb} not among the answers: {shown_answers(texts)}")
        return Verdict(True, "ok", f"{what}: {shown_answers(texts)}")
