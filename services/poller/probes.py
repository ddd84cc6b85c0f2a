"""Running one check against its target: http, service (through the host's agent) and tcp.

Every run ends in a `ProbeOutcome` with a `reason` (CONTRACT §4) and a `detail` an operator
understands; no exception escapes a probe. Targets that resolve into a blocked network are refused
before any packet is sent to them, on every redirect hop too.

What a target answers is read by aiohttp (llhttp), never by a parser of ours: an answer it rejects is
reason `protocol`, described from aiohttp's own error (never with the 400 aiohttp files it under: the
target sent no status). The detail is raw here; `safe_detail` bounds and redacts it where it is stored.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import json
import re
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit

import aiohappyeyeballs
import aiohttp
from aiohttp import http_exceptions
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from shared.events import ResultReason

BODY_LIMIT_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# CONTRACT §4: answers with headers as large as browsers accept are read normally: at least 16 KiB per
# line, 64 KiB in all and 200 headers. aiohttp's defaults (8190 bytes, 128 headers) are below that; it
# has no limit on the headers' total, which the per-line and count limits bound (256 x 16 KiB).
MAX_HEADER_LINE_BYTES = 16 * 1024
MAX_HEADERS = 256
# The Content-Encodings aiohttp undoes (br through the Brotli package, a dependency for this reason).
UNDONE_ENCODINGS = frozenset({"gzip", "deflate", "br"})
# As aiohttp connects http checks: the next address is tried after 250 ms, or at once when one fails.
HAPPY_EYEBALLS_DELAY = 0.25
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
Resolve = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


@dataclass(frozen=True)
class ProbeOutcome:
    healthy: bool
    reason: ResultReason
    detail: str
    latency_ms: float


@dataclass(frozen=True)
class CheckTarget:
    """What a probe needs to know of a check and its host (the password already decrypted)."""

    check_id: uuid.UUID
    host_id: uuid.UUID
    check_type: str
    timeout_seconds: float
    host_name: str
    agent_url: str | None = None
    service_name: str | None = None
    url: str | None = None
    method: str = "GET"
    expected_status: str = "2xx"
    expected_body: str | None = None
    ignore_cert_errors: bool = True
    follow_redirects: bool = False
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    port: int | None = None
    address: str | None = None
    max_latency_ms: int | None = None

    def authorization(self) -> str | None:
        """The Basic credentials sent with an http check (RFC 7617), or None without a user."""
        if self.basic_auth_user is None:
            return None
        credentials = f"{self.basic_auth_user}:{self.basic_auth_pass or ''}".encode()
        return base64.b64encode(credentials).decode()

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a detail, should a target echo it: the password and the encoded
        credentials."""
        if self.basic_auth_user is None:
            return ()
        return tuple(secret for secret in (self.basic_auth_pass, self.authorization()) if secret)


class BlockedTarget(Exception):
    """The target resolves into a network checks may not reach (cloud metadata services)."""


class ProtocolViolation(Exception):
    """The target's answer is not valid HTTP, or its body cannot be decoded; the message says how."""


class UnencodableName(Exception):
    """A host name that cannot be encoded for DNS (IDNA); no lookup was made."""


def blocked_network(address: str, blocked: Sequence[Network]) -> Network | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return next((network for network in blocked if ip in network), None)


def refuse_if_blocked(address: str, blocked: Sequence[Network], *, name: str | None = None) -> None:
    """Raise BlockedTarget if `address` (which `name` resolved to, if given) is in a blocked network."""
    network = blocked_network(address, blocked)
    if network is None:
        return
    if name is None or name == address:
        raise BlockedTarget(f"{address} is in a blocked network ({network})")
    raise BlockedTarget(f"{name} resolves to {address}, in a blocked network ({network})")


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


def probe_session(blocked: Sequence[Network]) -> aiohttp.ClientSession:
    """The poller's one HTTP session (create it inside the running event loop; close it at shutdown).

    Names are resolved by `GuardedResolver`; no connection limit (the worker bounds concurrency); no
    cookies; header limits as large as CONTRACT §4 asks."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(blocked), limit=0, ttl_dns_cache=10)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": "healthgate-poller"},
        cookie_jar=aiohttp.DummyCookieJar(),
        max_line_size=MAX_HEADER_LINE_BYTES,
        max_field_size=MAX_HEADER_LINE_BYTES,
        max_headers=MAX_HEADERS,
    )


async def system_resolve(host: str, port: int) -> Sequence[AddrInfo]:
    """The system resolver's TCP addresses for `host`, in its order (getaddrinfo). Raises
    socket.gaierror, or UnicodeError for a name that cannot be encoded for DNS (before any lookup)."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


def status_matches(status: int, expected: str) -> bool:
    """`expected` is a code (200), a class (3xx) or a comma list of either (200,204,3xx)."""
    for part in expected.split(","):
        part = part.strip().lower()
        if part.endswith("xx") and len(part) == 3:
            if str(status)[0] == part[0]:
                return True
        elif part.isdigit() and int(part) == status:
            return True
    return False


def describe_status(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def decode_body(body: bytes, charset: str | None) -> str:
    """The body as text, in the charset the response declares (CONTRACT §4); UTF-8 when it declares
    none or one Python has no text codec for. Undecodable bytes become U+FFFD, never an error."""
    if charset:
        try:
            return body.decode(charset, errors="replace")
        except (LookupError, ValueError):  # unknown name, a bytes-to-bytes codec, a strict-only codec
            pass
    return body.decode("utf-8", errors="replace")


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _authority(url: str | None) -> str:
    """host[:port] of a URL for a detail, without any userinfo."""
    try:
        netloc = urlsplit(url or "").netloc
    except ValueError:
        netloc = ""
    return netloc.rpartition("@")[2] or "the target"


def _shown(url: URL) -> str:
    """A URL for a detail: without userinfo."""
    return str(url.with_user(None)) if url.user is not None or url.password is not None else str(url)


def _one_line(message: str) -> str:
    """llhttp's multi-line messages (the bytes in question, a caret under the fault) on one line."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_error(exc: BaseException) -> http_exceptions.HttpProcessingError | None:
    """The most specific error aiohttp's parser raised behind `exc` (it re-wraps them generically)."""
    found = [error for error in _chain(exc) if isinstance(error, http_exceptions.HttpProcessingError)]
    specific = [error for error in found if type(error) is not http_exceptions.HttpProcessingError]
    return (specific or found or [None])[-1]


def _idna_failure(exc: BaseException) -> UnicodeError | None:
    """A UnicodeError behind `exc`: Python's and yarl's IDNA encoding of a host name failed."""
    for error in (exc, exc.__cause__):
        if isinstance(error, UnicodeError) and not isinstance(error, UnicodeDecodeError):
            return error.__cause__ if isinstance(error.__cause__, UnicodeError) else error
    return None


def _unencodable(name: str, error: BaseException) -> str:
    return f"cannot resolve {name}: the name cannot be encoded for DNS (IDNA: {error})"


def _parser_failure(error: http_exceptions.HttpProcessingError, what: str) -> str:
    """Words for an answer aiohttp could not read; its 400 is not repeated (the target sent none)."""
    message = _one_line(error.message)
    if isinstance(error, http_exceptions.ContentEncodingError):
        coding = re.search(r"content-encoding: ([\w-]+)", message, re.IGNORECASE)
        if coding is not None and "install" not in message:
            return f"{what} sent a body that is not valid {coding[1]} (its Content-Encoding), so it cannot be undone"
        return f"{what} sent a body whose Content-Encoding cannot be undone: {message}"
    if isinstance(error, http_exceptions.ContentLengthError):
        counts = re.search(r"received (\d+) of (\d+) bytes", message)
        if counts is not None:
            return f"{what} ended the body after {counts[1]} of the {counts[2]} bytes its Content-Length announced"
        return f"{what} ended the body before its Content-Length: {message}"
    if isinstance(error, http_exceptions.TransferEncodingError):
        return f"{what} sent a broken chunked body: {message}"
    if isinstance(error, http_exceptions.LineTooLong):
        return f"{what} sent a header line longer than {MAX_HEADER_LINE_BYTES // 1024} KiB"
    if "Too many headers" in message:
        return f"{what} sent more than {MAX_HEADERS} headers"
    return f"{what} sent an answer that is not valid HTTP: {message}"


def classify_failure(exc: BaseException, what: str) -> tuple[ResultReason, str]:
    """Classify an exception raised while reaching or reading a target into a reason (CONTRACT §4) and
    words for an operator. `what` names the target (host:port), never with credentials."""
    if isinstance(exc, BlockedTarget):
        return "blocked", str(exc)
    if isinstance(exc, ProtocolViolation):
        return "protocol", str(exc)
    if isinstance(exc, UnencodableName):
        return "dns", str(exc)
    idna = _idna_failure(exc)
    if idna is not None:
        return "dns", _unencodable(what.rsplit(":", 1)[0] if what.count(":") == 1 else what, idna)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        why = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
        return "tls", f"certificate verify failed: {why}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns", f"cannot resolve {what}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        inner = getattr(exc, "os_error", exc)
        return "tls", f"TLS handshake with {what} failed: {getattr(inner, 'reason', None) or inner}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if isinstance(error, ConnectionRefusedError):
            return "connect", f"connection refused by {what}"
        return "connect", f"cannot connect to {what}: {error.strerror or error}"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve {what}: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "connect", f"connection refused by {what}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        if exc.message is not None and not isinstance(exc.message, str):
            # aiohttp hands over the partly parsed response: the headers had begun and never ended.
            return "protocol", f"{what} closed the connection in the middle of the response headers"
        return "connect", f"{what} closed the connection without answering"
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        error = _http_error(exc)
        if error is not None:
            return "protocol", _parser_failure(error, what)
        if isinstance(exc, aiohttp.ClientPayloadError):
            return "connect", f"the connection to {what} broke while the body was read"
        return "protocol", f"{what} sent an answer that cannot be read: {_one_line(exc.message)}"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        cause = exc.__cause__
        return "connect", f"cannot request {exc}: {cause}" if cause else f"cannot request {exc}"
    if isinstance(exc, TimeoutError):
        return "timeout", f"{what} did not answer in time"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connect", f"connection to {what} failed: {exc}"
    return "connect", f"{what}: {type(exc).__name__}: {exc}"


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    """The first BODY_LIMIT_BYTES of the body, its Content-Encoding undone. Raises ClientPayloadError
    for a body shorter than announced, broken chunking or undecodable content."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT_BYTES:
        chunk = await response.content.read(BODY_LIMIT_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _refuse_unknown_encoding(response: aiohttp.ClientResponse, body: bytes, what: str) -> None:
    """aiohttp undoes a single gzip, deflate or br and passes anything else through still encoded."""
    header = response.headers.get("Content-Encoding", "")
    codings = [coding.strip().lower() for coding in header.split(",") if coding.strip()]
    codings = [coding for coding in codings if coding != "identity"]
    if not body or not codings or (len(codings) == 1 and codings[0] in UNDONE_ENCODINGS):
        return
    raise ProtocolViolation(
        f"{what} sent a body with Content-Encoding {header.strip()!r}, which cannot be undone "
        "(one of gzip, deflate or br can)"
    )


def _redirect_target(current: str, location: str) -> str:
    """The URL a Location header leads to from `current`, without userinfo (credentials go only where
    the check configures them). Raises ProtocolViolation for a Location that is not an http(s) URL,
    UnencodableName for one whose host cannot be encoded for DNS."""
    try:
        target = URL(current).join(URL(location))
        host, _port = target.host, target.port  # yarl checks both lazily
    except UnicodeError as exc:
        name = _authority(location) if "//" in location else location
        raise UnencodableName(f"redirect to {location!r}: " + _unencodable(name, exc.__cause__ or exc)) from exc
    except (ValueError, TypeError) as exc:
        raise ProtocolViolation(f"redirect to {location!r}, which is not a valid URL ({exc})") from exc
    if target.scheme not in ("http", "https"):
        raise ProtocolViolation(f"redirect to {_shown(target)}: only http and https redirects are followed")
    if not host:
        raise ProtocolViolation(f"redirect to {location!r}, which names no host")
    return str(target.with_user(None))


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class Prober:
    """Runs checks; holds the HTTP session and TLS contexts created once at poller start.

    `resolve` turns a tcp check's host name into addresses (the system resolver; tests pass their own)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        blocked: Sequence[Network],
        agent_ssl: ssl.SSLContext | None,
        *,
        resolve: Resolve = system_resolve,
    ) -> None:
        self._session = session
        self._blocked = blocked
        self._agent_ssl = agent_ssl
        self._resolve = resolve
        self._verifying_ssl = ssl.create_default_context()

    async def run(self, target: CheckTarget) -> ProbeOutcome:
        """Run the check once within its timeout. A run that succeeds more slowly than the check's
        `max_latency_ms` is unhealthy, reason `slow` (CONTRACT §3, every type)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(target.timeout_seconds):
                if target.check_type == "http":
                    healthy, reason, detail = await self._http(target)
                elif target.check_type == "service":
                    healthy, reason, detail = await self._service(target)
                else:
                    healthy, reason, detail = await self._tcp(target)
        except TimeoutError:
            healthy, reason, detail = False, "timeout", f"timed out after {_seconds(target.timeout_seconds)}"
        except Exception as exc:  # a probe reports every failure as a result, never raises
            reason, detail = classify_failure(exc, _target_name(target))
            healthy = False
        latency_ms = _elapsed_ms(started)
        if healthy and target.max_latency_ms is not None and latency_ms > target.max_latency_ms:
            healthy, reason = False, "slow"
            detail = f"took {latency_ms:.0f} ms, more than the {target.max_latency_ms} ms allowed ({detail})"
        return ProbeOutcome(healthy, reason, detail, latency_ms)

    # ---- http ------------------------------------------------------------------------------------

    async def _http(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        assert target.url is not None
        headers = {}
        authorization = target.authorization()
        if authorization is not None:
            headers["Authorization"] = "Basic " + authorization
        url = target.url
        ssl_option: ssl.SSLContext | bool = False if target.ignore_cert_errors else self._verifying_ssl
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                self._refuse_ip_literal(url)
                async with self._session.request(
                    target.method, url, headers=headers, ssl=ssl_option, allow_redirects=False
                ) as response:
                    location = response.headers.get("Location")
                    if not (target.follow_redirects and response.status in REDIRECT_STATUSES and location):
                        return await self._judge_http(target, response, _authority(url))
                    next_url = _redirect_target(url, location)
            except Exception as exc:  # named after this hop's target, not the first one's
                reason, detail = classify_failure(exc, _authority(url))
                return False, reason, detail
            if _origin(next_url) != _origin(url):
                headers = {}  # credentials go only to the origin they were configured for
            url = next_url
        return False, "status", f"more than {MAX_REDIRECTS} redirects, last to {url}"

    async def _judge_http(
        self, target: CheckTarget, response: aiohttp.ClientResponse, what: str
    ) -> tuple[bool, ResultReason, str]:
        """Judge the final response. Its body (first 1 MiB) is read whole on GET, as blackbox_exporter
        does: a body that breaks off or cannot be decoded makes the answer invalid (`protocol`)."""
        seen = describe_status(response.status)
        if not status_matches(response.status, target.expected_status):
            return False, "status", f"status {seen}, expected {target.expected_status}"
        if target.method == "HEAD":
            return True, "ok", f"status {seen}"
        body = await _read_body(response)
        _refuse_unknown_encoding(response, body, what)
        if target.expected_body:
            if target.expected_body not in decode_body(body, response.charset):
                return False, "body", f"status {seen} but the body does not contain {target.expected_body!r}"
            return True, "ok", f"status {seen}, body contains {target.expected_body!r}"
        return True, "ok", f"status {seen}"

    def _refuse_ip_literal(self, url: str) -> None:
        # Names are checked by the resolver; an address in the URL never reaches it.
        host = urlsplit(url).hostname
        if host is not None:
            refuse_if_blocked(host, self._blocked)

    # ---- service ---------------------------------------------------------------------------------

    async def _service(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        assert target.agent_url is not None and target.service_name is not None
        url = target.agent_url.rstrip("/") + "/api/v1/system/services/" + quote(target.service_name, safe="@:.")
        self._refuse_ip_literal(url)
        ssl_option: ssl.SSLContext | bool = self._agent_ssl or self._verifying_ssl
        if not url.lower().startswith("https"):
            ssl_option = False
        async with self._session.get(url, ssl=ssl_option, allow_redirects=False) as response:
            raw = await _read_body(response)
            _refuse_unknown_encoding(response, raw, _authority(url))
        seen = describe_status(response.status)
        try:
            answer: Any = json.loads(raw)
        except RecursionError:
            return False, "agent", f"agent answered {seen} with JSON nested too deeply to read"
        except ValueError:  # not JSON, not UTF-8/16/32, an integer beyond Python's digit limit
            return False, "agent", f"agent answered {seen} with a body that is not JSON"
        if response.status != 200:
            message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
            suffix = f": {message}" if message else ""
            return False, "agent", f"agent answered {seen}{suffix}"
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(answer, dict) or answer.get("success") is not True or not isinstance(data, dict):
            return False, "agent", "agent answer lacks success and data"
        if not isinstance(data.get("healthy"), bool):
            return False, "agent", "agent answer lacks data.healthy"
        state = f"{target.service_name} is {data.get('active_state', '?')} ({data.get('sub_state', '?')})"
        if data["healthy"]:
            return True, "ok", state
        return False, "status", state

    # ---- tcp -------------------------------------------------------------------------------------

    async def _tcp(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        """Resolve, refuse blocked addresses, then connect to the addresses in the resolver's order
        (happy eyeballs, as aiohttp does for http): the check fails only if none accepts."""
        assert target.port is not None
        host, port = target.address or target.host_name, target.port
        if not 1 <= port <= 65535:  # getaddrinfo would silently wrap it
            return False, "connect", f"port {port} is not a TCP port (1-65535)"
        try:
            infos = list(await self._resolve(host, port))
        except UnicodeError as exc:
            return False, "dns", _unencodable(host, exc.__cause__ or exc)
        except socket.gaierror as exc:
            return False, "dns", f"cannot resolve {host}: {exc.strerror}"
        if not infos:
            return False, "dns", f"cannot resolve {host}: no address"
        for info in infos:
            refuse_if_blocked(str(info[4][0]), self._blocked, name=host)
        try:
            sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError for some failures
            return False, "connect", _tcp_failure(exc, f"{host}:{port}", infos)
        try:
            address, connected_port = sock.getpeername()[:2]
        finally:
            sock.close()
        shown = f"[{address}]" if ":" in address else address
        return True, "ok", f"connected to {shown}:{connected_port}"


def _tcp_failure(exc: BaseException, what: str, infos: Sequence[AddrInfo]) -> str:
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    every = f" at every address ({', '.join(addresses)})" if len(addresses) > 1 else ""
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return f"connection refused by {what}{every}"
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot connect to {what}{every}: {why}"


def _target_name(target: CheckTarget) -> str:
    if target.check_type == "tcp":
        return f"{target.address or target.host_name}:{target.port}"
    return _authority(target.url if target.check_type == "http" else target.agent_url)
