"""Running one check against its target: http, service (through the host's agent) and tcp.

Every run ends in a `ProbeOutcome` with a `reason` (CONTRACT §4) and a `detail` an operator
understands; no exception escapes a probe. Targets that resolve into a blocked network are refused
before any packet is sent to them, on every redirect hop too.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from shared.events import ResultReason

BODY_LIMIT_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class BlockedTarget(Exception):
    """The target resolves into a network checks may not reach (cloud metadata services)."""


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


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _connection_failure(exc: BaseException, what: str) -> tuple[ResultReason, str]:
    """Classify a failure to reach a target into a reason and words for an operator."""
    if isinstance(exc, BlockedTarget):
        return "blocked", str(exc)
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
        return "connect", f"{what} closed the connection without answering"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connect", f"connection to {what} failed: {exc}"
    return "connect", f"{what}: {type(exc).__name__}: {exc}"


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT_BYTES:
        chunk = await response.content.read(BODY_LIMIT_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class Prober:
    """Runs checks; holds the HTTP session and TLS contexts created once at poller start."""

    def __init__(
        self, session: aiohttp.ClientSession, blocked: Sequence[Network], agent_ssl: ssl.SSLContext | None
    ) -> None:
        self._session = session
        self._blocked = blocked
        self._agent_ssl = agent_ssl
        self._verifying_ssl = ssl.create_default_context()

    async def run(self, target: CheckTarget) -> ProbeOutcome:
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
            reason, detail = _connection_failure(exc, _target_name(target))
            healthy = False
        return ProbeOutcome(healthy, reason, detail, _elapsed_ms(started))

    # ---- http ------------------------------------------------------------------------------------

    async def _http(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        assert target.url is not None
        headers = {}
        if target.basic_auth_user is not None:
            credentials = f"{target.basic_auth_user}:{target.basic_auth_pass or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        url = target.url
        ssl_option: ssl.SSLContext | bool = False if target.ignore_cert_errors else self._verifying_ssl
        for _hop in range(MAX_REDIRECTS + 1):
            self._refuse_ip_literal(url)
            async with self._session.request(
                target.method, url, headers=headers, ssl=ssl_option, allow_redirects=False
            ) as response:
                location = response.headers.get("Location")
                if target.follow_redirects and response.status in REDIRECT_STATUSES and location:
                    next_url = urljoin(url, location)
                    if urlsplit(next_url).netloc != urlsplit(url).netloc:
                        headers = {}  # credentials go only to the host they were configured for
                    url = next_url
                    continue
                return await self._judge_http(target, response)
        return False, "status", f"more than {MAX_REDIRECTS} redirects, last to {url}"

    async def _judge_http(
        self, target: CheckTarget, response: aiohttp.ClientResponse
    ) -> tuple[bool, ResultReason, str]:
        seen = describe_status(response.status)
        if not status_matches(response.status, target.expected_status):
            return False, "status", f"status {seen}, expected {target.expected_status}"
        if target.expected_body and target.method != "HEAD":
            body = await _read_body(response)
            if target.expected_body.encode() not in body:
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
        try:
            answer: Any = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False, "agent", f"agent answered {describe_status(response.status)} with a body that is not JSON"
        if response.status != 200:
            message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
            suffix = f": {message}" if message else ""
            return False, "agent", f"agent answered {describe_status(response.status)}{suffix}"
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
        assert target.port is not None
        host = target.address or target.host_name
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return False, "dns", f"cannot resolve {host}: {exc.strerror}"
        for info in infos:
            refuse_if_blocked(str(info[4][0]), self._blocked, name=host)
        family, _, _, _, address = infos[0]
        _, writer = await asyncio.open_connection(address[0], address[1], family=family)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True, "ok", f"connected to {address[0]}:{address[1]}"


def _target_name(target: CheckTarget) -> str:
    if target.check_type == "tcp":
        return f"{target.address or target.host_name}:{target.port}"
    url = target.url if target.check_type == "http" else target.agent_url
    return urlsplit(url or "").netloc or "the target"


def agent_ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for host agents: trust `ca_file`, present `cert_file`/`key_file` (mTLS)."""
    if not (ca_file or cert_file):
        return None
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context
