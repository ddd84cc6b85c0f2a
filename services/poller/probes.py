"""Running one check against its target: http, service (through the host's agent) and tcp.

Every run ends in a `ProbeOutcome` with a `reason` (CONTRACT §4) and a `detail` an operator
understands; no exception escapes a probe. Targets that resolve into a blocked network are refused
before any packet is sent to them, on every redirect hop too.

What a target answers is read by aiohttp (llhttp), never by a parser of ours: an answer it rejects is
reason `protocol`, described from aiohttp's own error (never with the 400 aiohttp files it under: the
target sent no status). Content-Encodings are undone here with zlib and Brotli (`read_body`), not by
aiohttp. A URL a target sent is shown only as `shown_url` makes it (no userinfo, no query). The detail is
otherwise raw here; `safe_detail` bounds, redacts and escapes it where it is stored.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import json
import re
import socket
import ssl
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import quote, urljoin, urlsplit

import aiohappyeyeballs
import aiohttp
import brotli
import idna
from aiohttp import http_exceptions
from yarl import URL

from services.poller.certificates import Validity, days_left, peer_certificate_validity
from services.poller.conditions import ConditionEvaluator, ResponseFacts, ResponseHeaders
from shared.addresses import host_port
from shared.blocked_networks import BlockedTarget, GuardedResolver, Network, refuse_if_blocked
from shared.events import ResultReason

BODY_LIMIT_BYTES = 1024 * 1024
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# CONTRACT §4: answers with headers as large as browsers accept are read normally: at least 16 KiB per
# line, 64 KiB in all and 200 headers. aiohttp's defaults (8190 bytes, 128 headers) are below that; it
# has no limit on the headers' total, which the per-line and count limits bound (256 x 16 KiB).
MAX_HEADER_LINE_BYTES = 16 * 1024
MAX_HEADERS = 256
# The Content-Encodings undone (CONTRACT §4), by zlib and the Brotli package (a dependency for this reason);
# x-gzip is gzip (RFC 9110 §8.4.1.3). The names are case-insensitive.
UNDONE_ENCODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate", "br": "br"}
# Stacked codings are legal (RFC 9110 §8.4); more than this many is no real server's answer.
MAX_STACKED_ENCODINGS = 4
# Encoded bytes read at most while the decoded body stays under BODY_LIMIT_BYTES: no real compressor needs
# more, and it bounds the work a stream of empty deflate blocks can cause.
ENCODED_LIMIT_BYTES = 8 * BODY_LIMIT_BYTES
READ_CHUNK_BYTES = 64 * 1024
# The codings we ask for: aiohttp would also offer zstd when a zstd module is importable, which we do not undo.
ACCEPT_ENCODING = "gzip, deflate, br"
# A path is shown in a detail up to this many characters (a Location may be kilobytes long).
SHOWN_PATH_CHARS = 100
# As aiohttp connects http checks: the next address is tried after 250 ms, or at once when one fails.
HAPPY_EYEBALLS_DELAY = 0.25
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
Resolve = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


@dataclass(frozen=True)
class ProbeOutcome:
    """How a run came out (CONTRACT §4): `cert_expires_at` is the server certificate's end of validity (UTC)
    for a TLS check, else None."""

    healthy: bool
    reason: ResultReason
    detail: str
    latency_ms: float
    cert_expires_at: dt.datetime | None = None


@dataclass(frozen=True)
class Verdict:
    """What a check type's probe concluded, before `Prober.run` adds the time it took and the `slow` rule:
    `cert_expires_at` is the end of validity of the certificate a TLS server presented (UTC), else None."""

    healthy: bool
    reason: ResultReason
    detail: str
    cert_expires_at: dt.datetime | None = None


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
    condition: str | None = None
    min_cert_days: int | None = None
    dns_name: str | None = None
    record_type: str = "A"
    expected_values: tuple[str, ...] = ()
    dns_server: str | None = None
    grpc_service: str = ""
    tls: bool = False

    def authorization(self) -> str | None:
        """The Basic credentials sent with an http check (RFC 7617), or None without a user."""
        if self.basic_auth_user is None:
            return None
        credentials = f"{self.basic_auth_user}:{self.basic_auth_pass or ''}".encode()
        return base64.b64encode(credentials).decode()

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a detail, should a target echo it: the password and the encoded
        credentials. A password without a user is never sent (the api refuses to store one), yet redacted all the
        same: a row written some other way must not leak it."""
        return tuple(secret for secret in (self.basic_auth_pass, self.authorization()) if secret)


class TypeProbe(Protocol):
    """A check type's probe that lives in a module of its own (dns_probe.DnsProbe, grpc_probe.GrpcProbe), created
    once at poller start and handed to the Prober."""

    async def check(self, target: CheckTarget) -> Verdict:
        """The verdict on one run; raises nothing but CancelledError (the run's timeout)."""
        ...


class ProbeMissing(Exception):
    """The Prober was created without the probe of a check's type (tests and benchmarks that run no such checks)."""


class ProtocolViolation(Exception):
    """The target's answer is not valid HTTP, or its body cannot be decoded; the message says how."""


class UnencodableName(Exception):
    """A host name that cannot be encoded for DNS (IDNA); no lookup was made."""


class TlsAwareResponse(aiohttp.ClientResponse):
    """A response that keeps the TLS object of the connection it came on (`ssl_object`, None without TLS), for the
    server certificate's end of validity (CONTRACT §4 `cert_expires_at`, §3 `min_cert_days`). It is taken as the
    response starts: aiohttp hands the connection back to its pool, and `response.connection` becomes None, as soon
    as the body has arrived, which for a small body, a HEAD or a 204 is before the caller sees the response.

    An answer that is not valid HTTP fails in `start`, before any response reaches the caller: the certificate of
    its connection, presented all the same, rides on the exception (`certificate_of_failure`)."""

    ssl_object: ssl.SSLObject | None = None

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        transport = connection.transport
        self.ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        try:
            return await super().start(connection)
        except Exception as exc:
            with contextlib.suppress(AttributeError):  # an exception type with __slots__ keeps none
                exc.healthgate_certificate = peer_certificate_validity(self.ssl_object)  # type: ignore[attr-defined]
            raise


def certificate_of_failure(exc: BaseException) -> Validity | None:
    """The certificate of the connection whose answer `exc` is about (see `TlsAwareResponse`), or None."""
    certificate = getattr(exc, "healthgate_certificate", None)
    return certificate if isinstance(certificate, Validity) else None


def response_certificate(response: aiohttp.ClientResponse) -> Validity | None:
    """The validity period of the certificate the server presented for `response` (verified or not), or None
    without TLS. From `TlsAwareResponse`, else from the connection while the response still holds it."""
    ssl_object = response.ssl_object if isinstance(response, TlsAwareResponse) else None
    if ssl_object is None and response.connection is not None and response.connection.transport is not None:
        ssl_object = response.connection.transport.get_extra_info("ssl_object")
    return peer_certificate_validity(ssl_object)


def response_certificate_end(response: aiohttp.ClientResponse) -> dt.datetime | None:
    """The end of validity of the certificate the server presented for `response` (`response_certificate`)."""
    certificate = response_certificate(response)
    return None if certificate is None else certificate.end


def probe_session(blocked: Sequence[Network]) -> aiohttp.ClientSession:
    """The poller's one HTTP session (create it inside the running event loop; close it at shutdown).

    Names are resolved by `GuardedResolver`; no connection limit (the worker bounds concurrency); no
    cookies; header limits as large as CONTRACT §4 asks; bodies arrive still encoded (see `read_body`);
    responses keep their TLS object (`TlsAwareResponse`).

    Every run opens its own connection (`force_close`), as blackbox_exporter's and Kubernetes' probes do: a run
    tells whether the server accepts connections now, and reads the certificate it presents now. A connection
    kept alive from an earlier run (of this check or another of the same origin, which at intervals under
    aiohttp's 15 s keep-alive may never close) kept showing a certificate the server had since renewed: a server
    that renews without closing its open connections (Go's GetCertificate, Envoy, Caddy) failed `min_cert_days`
    on the old certificate, and `cert_expires_at` showed the old date."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(blocked), limit=0, ttl_dns_cache=10, force_close=True)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": "healthgate-poller", "Accept-Encoding": ACCEPT_ENCODING},
        cookie_jar=aiohttp.DummyCookieJar(),
        response_class=TlsAwareResponse,
        # No timers of aiohttp's own per request (its default: 300 s in all, 30 s to connect): `Prober.run` bounds
        # every run with the check's timeout.
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=None),
        # Bodies are decoded by `read_body`: aiohttp undoes only the first of stacked codings, does not notice
        # a gzip stream that breaks off, and would try zstd.
        auto_decompress=False,
        max_line_size=MAX_HEADER_LINE_BYTES,
        max_field_size=MAX_HEADER_LINE_BYTES,
        max_headers=MAX_HEADERS,
    )


def dns_name(host: str) -> str:
    """`host` as a tcp check asks the resolver for it: ASCII as it is (an IP literal, a name already encoded),
    any other name encoded with IDNA 2008 and UTS #46, as yarl encodes an http check's host and as the API
    validated it (services/api/targets.py). Left to getaddrinfo, a str would be encoded with Python's IDNA 2003
    codec, which makes another name of some: "faß.test" becomes "fass.test", a final sigma a plain one. Raises
    UnicodeError (idna.IDNAError) for a name that cannot be encoded, before any lookup."""
    if host.isascii():
        return host
    return idna.encode(host, uts46=True).decode("ascii")


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
        # isascii: str.isdigit also takes other digits ("²", "٢"), which int() refuses or reads as another code.
        elif part.isascii() and part.isdigit() and int(part) == status:
            return True
    return False


def describe_status(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def refuse_invalid_status(status: int, what: str) -> None:
    """Raise ProtocolViolation for a status code outside 100-599 (RFC 9110 §15: three digits, first 1-5).
    llhttp reads any three digits ("099", "600"); the code is shown as the three digits the target sent."""
    if not 100 <= status <= 599:
        raise ProtocolViolation(
            f"{what} sent an answer whose status code {status:03d} is not a valid HTTP status (100-599)"
        )


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_PATH_CHARS else text[:SHOWN_PATH_CHARS] + "…"


def shown_url(url: str) -> str | None:
    """A URL a target sent (a Location, resolved), as a detail may show it: `scheme://host[:port]/path`, its
    userinfo removed, its query replaced by "?…", without fragment, host and path cut to SHOWN_PATH_CHARS. A
    URL without an authority (mailto:, data:) shows only its scheme ("a mailto URL"). None when urllib.parse
    cannot parse it (a bad IPv6 address or port). Userinfo, queries and fragments are where credentials travel
    (passwords, X-Amz-Signature, OAuth codes), so no rule about their words is needed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = _cut(parts.scheme.lower())
    # urlsplit drops leading C0 controls and spaces, and tabs and line breaks anywhere (WHATWG); so does this.
    text = url.lstrip("".join(map(chr, range(0x21)))).translate({9: None, 10: None, 13: None})
    if not parts.netloc and not text[len(parts.scheme) + 1 if parts.scheme else 0 :].startswith("//"):
        return f"a {scheme} URL" if scheme else "a URL without a scheme"
    host = _cut(parts.hostname or "")
    authority = host_port(host, port) if port is not None else (f"[{host}]" if ":" in host else host)
    query = "?…" if parts.query else ""
    return f"{scheme}:" * bool(scheme) + f"//{authority}{_cut(parts.path)}{query}"


def _url_fault(url: str) -> str:
    """Why urllib.parse refuses `url`, in fixed words (its own messages repeat the text)."""
    try:
        _port = urlsplit(url).port
    except ValueError as exc:
        if "IPv6" in str(exc):
            return "a Location that is not a valid URL (a bracketed IPv6 host that does not close)"
        if "Port" in str(exc) or "port" in str(exc):
            return "a Location that is not a valid URL (its port is not a number from 0 to 65535)"
    return "a Location that is not a valid URL"


def _shown_location(current: str, location: str) -> tuple[str, str | None]:
    """What a detail shows for a Location received while at `current`, and the host it names (None when
    urllib.parse cannot read it; its words then only say that)."""
    try:
        absolute = urljoin(current, location)
        shown = shown_url(absolute)
        host = urlsplit(absolute).hostname if shown is not None else None
    except ValueError:
        shown, host, absolute = None, None, location
    if shown is None:
        return _url_fault(absolute), None
    return shown, host or ""


def shown_latency(latency_ms: float, limit: int) -> str:
    """`latency_ms` with as few decimals as show it above `limit` ("1.4", not "1", for 1.4 ms over 1 ms)."""
    for decimals in range(3):
        shown = f"{latency_ms:.{decimals}f}"
        if float(shown) > limit:
            return shown
    return f"{latency_ms:.3f}"


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
    chosen = specific or found
    return chosen[-1] if chosen else None


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
        name = what.rsplit(":", 1)[0] if what.count(":") == 1 else what  # an IPv6 literal needs no IDNA
        return "dns", _unencodable(name, idna)
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
        parser_error = _http_error(exc)
        if parser_error is not None:
            return "protocol", _parser_failure(parser_error, what)
        if isinstance(exc, aiohttp.ClientPayloadError):
            return "connect", f"the connection to {what} broke while the body was read"
        return "protocol", f"{what} sent an answer that cannot be read: {_one_line(exc.message)}"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        # The URL is shown as a Location is (it may be one), never aiohttp's text of it. InvalidURL keeps it
        # as `url`; NonHttpUrlClientError (a scheme aiohttp does not request) only as its argument.
        url = exc.url if isinstance(exc, aiohttp.InvalidURL) else exc.args[0] if exc.args else None
        shown = shown_url(str(url)) if url is not None else None
        return "connect", f"cannot request {shown or 'a URL that is not valid'}"
    if isinstance(exc, TimeoutError):
        return "timeout", f"{what} did not answer in time"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connect", f"connection to {what} failed: {exc}"
    return "connect", f"{what}: {type(exc).__name__}: {exc}"


class _BadEncoding(Exception):
    """Bytes that are not valid in the Content-Encoding `coding`."""

    def __init__(self, coding: str) -> None:
        super().__init__(coding)
        self.coding = coding


class _Decoding:
    """Undoes one Content-Encoding a bounded amount at a time (a gzip bomb stays cheap): `feed` gives it
    encoded bytes, `read(limit)` returns at most `limit` decoded bytes and b"" once it needs more input.
    `fed` says whether any input arrived, `finished` whether the coding's stream has ended."""

    coding: str
    fed: bool = False

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, limit: int) -> bytes:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        raise NotImplementedError


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950 §2.2: method 8, window at most 32 KiB, check bits)."""
    cmf, flg = data[0], data[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf * 256 + flg) % 31 == 0


class _ZlibDecoding(_Decoding):
    """gzip (RFC 1952; members one after another, as Python's gzip reads them: NUL padding after a member is
    skipped, anything else must be another member) or deflate: zlib-wrapped as RFC 9110 §8.4.1.2 says, or raw
    deflate as some servers send it and browsers accept (told apart by the first two bytes, as aiohttp does);
    bytes after a deflate stream are ignored."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._pending = b""
        self._ended = False
        self._object: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else None

    def feed(self, data: bytes) -> None:
        self.fed = self.fed or bool(data)
        self._pending += data

    @property
    def finished(self) -> bool:
        return self._ended

    def read(self, limit: int) -> bytes:
        while self._pending:
            if self._ended:
                rest = self._pending.lstrip(b"\0") if self.coding == "gzip" else b""
                if not rest:  # after a deflate stream: ignored, as browsers do
                    self._pending = b""
                    return b""
                self._object, self._pending, self._ended = zlib.decompressobj(16 + zlib.MAX_WBITS), rest, False
            if self._object is None:
                if len(self._pending) < 2:
                    return b""
                wbits = zlib.MAX_WBITS if _zlib_header(self._pending) else -zlib.MAX_WBITS
                self._object = zlib.decompressobj(wbits)
            try:
                out: bytes = self._object.decompress(self._pending, limit)
            except zlib.error as exc:
                raise _BadEncoding(self.coding) from exc
            self._pending = self._object.unconsumed_tail
            if self._object.eof:
                self._ended, self._pending = True, self._object.unused_data
            if out:
                return out
        return b""


class _BrotliDecoding(_Decoding):
    """br (RFC 7932) through the Brotli package, its output bounded by `output_buffer_limit`."""

    coding = "br"

    def __init__(self) -> None:
        self._object = brotli.Decompressor()
        self._pending = b""
        self._out = b""

    def feed(self, data: bytes) -> None:
        self.fed = self.fed or bool(data)
        self._pending += data

    @property
    def finished(self) -> bool:
        return bool(self._object.is_finished())

    def read(self, limit: int) -> bytes:
        while not self._out:
            if self._object.is_finished():
                self._pending = b""  # after the stream: ignored, as browsers do
                return b""
            data = b""
            if self._object.can_accept_more_data():  # else it still holds output for empty calls to give
                if not self._pending:
                    return b""
                data, self._pending = self._pending, b""
            try:
                self._out = self._object.process(data, output_buffer_limit=limit)
            except brotli.error as exc:
                raise _BadEncoding("br") from exc
            if not self._out and not data:
                return b""
        out, self._out = self._out[:limit], self._out[limit:]
        return out


def _decoding(coding: str) -> _Decoding:
    return _BrotliDecoding() if coding == "br" else _ZlibDecoding(coding)


def content_codings(values: Sequence[str]) -> tuple[list[str], str | None]:
    """The codings of a response's Content-Encoding lines, in the order they were applied (RFC 9110 §8.4: a
    comma list, possibly over several lines, names case-insensitive), as names `_decoding` takes: empty members
    and `identity` dropped, `x-gzip` read as gzip. The second item says why they cannot be undone, or None."""
    names = [member.strip(" \t").lower() for value in values for member in value.split(",")]
    codings: list[str] = []
    for name in names:
        if name in ("", "identity"):
            continue
        if name not in UNDONE_ENCODINGS:
            shown = name if len(name) <= 40 else name[:40] + "…"
            return [], (
                f"Content-Encoding {shown!r}, which cannot be undone: Content-Encoding {shown} is not supported "
                "(gzip, deflate and br are)"
            )
        codings.append(UNDONE_ENCODINGS[name])
    if len(codings) > MAX_STACKED_ENCODINGS:
        return [], (
            f"{len(codings)} stacked Content-Encodings, which are not undone (at most {MAX_STACKED_ENCODINGS} are)"
        )
    return codings, None


class _BodyReader:
    """The network and the decoding stages of one body, pulled from the last stage (`read_body`). A class, not a
    closure that calls itself: such a closure is a reference cycle, which kept each response, its connection and
    buffers (about 30 objects a check) alive until the cyclic garbage collector came by. Without it a check that
    passes is freed by reference counting alone; the poller's collections took half the time and its CPU per
    check fell from 884-935 to 809-830 µs (bench/poller.py, issue 16)."""

    def __init__(self, response: aiohttp.ClientResponse, stages: list[_Decoding], what: str) -> None:
        self.response = response
        self.stages = stages
        self.what = what
        self.encoded = 0
        self.cut = False

    async def pull(self, index: int, limit: int) -> bytes:
        """Up to `limit` bytes out of stage `index` (-1: the network); b"" once its input has ended."""
        if index < 0:
            if self.encoded >= ENCODED_LIMIT_BYTES:
                self.cut = True
                return b""
            chunk = await self.response.content.read(min(limit, ENCODED_LIMIT_BYTES - self.encoded))
            self.encoded += len(chunk)
            return chunk
        stage = self.stages[index]
        while True:
            try:
                out = stage.read(limit)
            except _BadEncoding as exc:
                raise ProtocolViolation(
                    f"{self.what} sent a body that is not valid {exc.coding} (its Content-Encoding), so it cannot be "
                    "undone"
                ) from exc
            if out:
                return out
            data = await self.pull(index - 1, READ_CHUNK_BYTES)
            if not data:
                return b""
            stage.feed(data)


async def read_body(response: aiohttp.ClientResponse, what: str) -> tuple[bytes, bool]:
    """The first BODY_LIMIT_BYTES of the body with its Content-Encodings undone (the session leaves them on),
    and whether that is the whole body.

    Stacked codings are undone in reverse order (RFC 9110 §8.4), each a bounded amount at a time, so the limit
    holds for the decoded body and a small bomb costs little. A body read whole must end where its codings'
    streams end. Raises ProtocolViolation (words with `what`, host:port) for a coding that is not undone, bytes
    not valid in their coding or a stream that breaks off; aiohttp raises ClientPayloadError for a body
    shorter than announced or broken chunking."""
    codings, refused = content_codings(response.headers.getall("Content-Encoding", ()))
    if refused is not None:
        if not await response.content.read(1):
            return b"", True  # nothing was encoded
        raise ProtocolViolation(f"{what} sent a body with {refused}")
    reader = _BodyReader(response, [_decoding(coding) for coding in reversed(codings)], what)
    chunks: list[bytes] = []
    size, wanted = 0, BODY_LIMIT_BYTES + 1  # one byte more tells a body of exactly the limit from a larger one
    while size < wanted:
        chunk = await reader.pull(len(reader.stages) - 1, wanted - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    whole = size <= BODY_LIMIT_BYTES and not reader.cut
    if whole:
        for stage in reader.stages:
            if stage.fed and not stage.finished:
                raise ProtocolViolation(
                    f"{what} sent a body that breaks off inside its {stage.coding} stream (its Content-Encoding), "
                    "so it cannot be undone"
                )
    return b"".join(chunks)[:BODY_LIMIT_BYTES], whole


def _redirect_target(current: str, location: str) -> str:
    """The URL a Location header leads to from `current`, without userinfo (credentials go only where
    the check configures them). Raises ProtocolViolation for a Location that is not an http(s) URL,
    UnencodableName for one whose host cannot be encoded for DNS. Their words show the Location only as
    `shown_url` does."""
    shown, host_named = _shown_location(current, location)
    try:
        target = URL(current).join(URL(location))
        host, _port = target.host, target.port  # yarl checks both lazily
    except UnicodeError as exc:
        name = host_named or "its host"
        raise UnencodableName(f"redirect to {shown}: " + _unencodable(name, exc.__cause__ or exc)) from exc
    except (ValueError, TypeError) as exc:
        words = shown if host_named is None else f"{shown}, which is not a valid URL"
        raise ProtocolViolation(f"redirect to {words}") from exc
    if target.scheme not in ("http", "https"):
        raise ProtocolViolation(f"redirect to {shown}: only http and https redirects are followed")
    if not host:
        raise ProtocolViolation(f"redirect to {shown}, which names no host")
    return str(target.with_user(None))


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


IP_LITERAL_VERDICTS_KEPT = 65_536  # URLs whose IP-literal verdict a prober remembers (then it starts over)


class Prober:
    """Runs checks; holds the HTTP session and TLS contexts created once at poller start.

    `resolve` turns a tcp check's host name into addresses (the system resolver; tests pass their own). `dns` and
    `grpc` run those check types (services/poller/dns_probe.py, grpc_probe.py); without one, such a check fails.
    `conditions` evaluates http checks' conditions (services/poller/app.py creates it and closes it at shutdown);
    without one the prober makes its own, whose worker processes, if a condition ever needs one, end with this
    process."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        blocked: Sequence[Network],
        agent_ssl: ssl.SSLContext | None,
        *,
        resolve: Resolve = system_resolve,
        dns: TypeProbe | None = None,
        grpc: TypeProbe | None = None,
        conditions: ConditionEvaluator | None = None,
    ) -> None:
        self._session = session
        self._blocked = blocked
        self._agent_ssl = agent_ssl
        self._resolve = resolve
        self._dns = dns
        self._grpc = grpc
        self._conditions = conditions if conditions is not None else ConditionEvaluator()
        self._verifying_ssl = ssl.create_default_context()
        self._ip_literal_verdicts: dict[str, str | None] = {}

    async def run(self, target: CheckTarget) -> ProbeOutcome:
        """Run the check once within its timeout. A run that succeeds more slowly than the check's
        `max_latency_ms` is unhealthy, reason `slow` (CONTRACT §3, every type)."""
        started = time.perf_counter()
        cert_expires_at = None
        try:
            async with asyncio.timeout(target.timeout_seconds):
                if target.check_type == "http":
                    verdict = await self._http(target)
                elif target.check_type == "service":
                    verdict = Verdict(*await self._service(target))
                elif target.check_type == "dns":
                    verdict = await _probe_of(self._dns, "dns").check(target)
                elif target.check_type == "grpc":
                    verdict = await _probe_of(self._grpc, "grpc").check(target)
                else:
                    verdict = Verdict(*await self._tcp(target))
            healthy, reason, detail, cert_expires_at = (
                verdict.healthy, verdict.reason, verdict.detail, verdict.cert_expires_at
            )  # fmt: skip
        except TimeoutError:
            healthy, reason, detail = False, "timeout", f"timed out after {_seconds(target.timeout_seconds)}"
        except Exception as exc:  # a probe reports every failure as a result, never raises
            reason, detail = classify_failure(exc, _target_name(target))
            healthy = False
        latency_ms = _elapsed_ms(started)
        if healthy and target.max_latency_ms is not None and latency_ms > target.max_latency_ms:
            healthy, reason = False, "slow"
            shown = shown_latency(latency_ms, target.max_latency_ms)
            detail = f"took {shown} ms, more than the {target.max_latency_ms} ms allowed ({detail})"
        return ProbeOutcome(healthy, reason, detail, latency_ms, cert_expires_at)

    # ---- http ------------------------------------------------------------------------------------

    async def _http(self, target: CheckTarget) -> Verdict:
        """Request the URL (following redirects if asked) and judge the final response. A result that reached TLS
        carries the end of validity of the certificate of the connection its last response came on, also when
        the check failed after the handshake (a status, a body, a broken answer)."""
        assert target.url is not None
        started = time.perf_counter()
        headers = {}
        authorization = target.authorization()
        if authorization is not None:
            headers["Authorization"] = "Basic " + authorization
        url = target.url
        ssl_option: ssl.SSLContext | bool = False if target.ignore_cert_errors else self._verifying_ssl
        for _hop in range(MAX_REDIRECTS + 1):
            certificate_end = None
            try:
                self._refuse_ip_literal(url)
                async with self._session.request(
                    target.method, url, headers=headers, ssl=ssl_option, allow_redirects=False
                ) as response:
                    certificate = response_certificate(response)
                    certificate_end = None if certificate is None else certificate.end
                    refuse_invalid_status(response.status, _authority(url))
                    location = response.headers.get("Location")
                    if not (target.follow_redirects and response.status in REDIRECT_STATUSES and location):
                        return await self._judge_http(target, response, _authority(url), started, certificate)
                    next_url = _redirect_target(url, location)
            except Exception as exc:  # named after this hop's target, not the first one's
                reason, detail = classify_failure(exc, _authority(url))
                failed_on = certificate_of_failure(exc)
                if certificate_end is None and failed_on is not None:
                    certificate_end = failed_on.end
                return Verdict(False, reason, detail, certificate_end)
            if _origin(next_url) != _origin(url):
                headers = {}  # credentials go only to the origin they were configured for
            url = next_url
        last = shown_url(url) or "a URL that is not valid"
        return Verdict(False, "status", f"more than {MAX_REDIRECTS} redirects, last to {last}", certificate_end)

    async def _judge_http(
        self,
        target: CheckTarget,
        response: aiohttp.ClientResponse,
        what: str,
        started: float,
        certificate: Validity | None,
    ) -> Verdict:
        """Judge the final response, the rules in this order, the first that fails giving the reason: the status
        (`status`), the body (`body`), the certificate's days left (`cert`, with `min_cert_days`), the condition
        (`condition`); `slow` is judged after all of them, by `run`. The cheap rules of the contract come first,
        so a condition reads a response that already passed them. The body (first 1 MiB) is read whole on GET, as
        blackbox_exporter does: a body that breaks off or cannot be decoded makes the answer invalid (`protocol`);
        a HEAD has none (a condition sees ""). `latency_ms` is the time until the body was read."""
        certificate_end = None if certificate is None else certificate.end
        seen = describe_status(response.status)
        if not status_matches(response.status, target.expected_status):
            return Verdict(False, "status", f"status {seen}, expected {target.expected_status}", certificate_end)
        passed = [f"status {seen}"]
        text = ""
        if target.method != "HEAD":
            body, _whole = await read_body(response, what)  # the first 1 MiB is judged (CONTRACT §4)
            if target.expected_body or target.condition is not None:
                text = decode_body(body, response.charset)
            if target.expected_body:
                if target.expected_body not in text:
                    detail = f"status {seen} but the body does not contain {target.expected_body!r}"
                    return Verdict(False, "body", detail, certificate_end)
                passed.append(f"body contains {target.expected_body!r}")
        now = dt.datetime.now(dt.UTC)
        cert_days_left = None if certificate is None else days_left(certificate.end, now)
        if target.min_cert_days is not None:
            start = None if certificate is None else certificate.start
            starts_in = None if start is None else days_left(start, now)
            problem = certificate_problem(
                certificate_end, cert_days_left, target.min_cert_days, start=start, starts_in=starts_in
            )
            if problem is not None:
                return Verdict(False, "cert", f"{', '.join(passed)}, but {problem}", certificate_end)
            passed.append(f"certificate valid {cert_days_left:.1f} more days")
        if target.condition is not None:
            latency_ms = _elapsed_ms(started)
            facts = ResponseFacts(
                response.status, ResponseHeaders(response.headers.items()), text, latency_ms, cert_days_left,
                target.secrets(),
            )  # fmt: skip
            time_left = target.timeout_seconds - latency_ms / 1000
            judged = await self._conditions.judge(target.condition, facts, time_left=time_left)
            if not judged.holds:
                return Verdict(False, "condition", f"{', '.join(passed)}, but {judged.detail}", certificate_end)
            passed.append("condition true")
        return Verdict(True, "ok", ", ".join(passed), certificate_end)

    def _refuse_ip_literal(self, url: str) -> None:
        # Names are checked by the resolver; an address in the URL never reaches it. The verdict depends on the URL
        # and this prober's blocked networks only: remembered per URL (the same URLs are checked again and again),
        # as the BlockedTarget message to raise, or None.
        try:
            refusal = self._ip_literal_verdicts[url]
        except KeyError:
            refusal = None
            host = urlsplit(url).hostname
            if host is not None:
                try:
                    refuse_if_blocked(host, self._blocked)
                except BlockedTarget as exc:
                    refusal = str(exc)
            if len(self._ip_literal_verdicts) >= IP_LITERAL_VERDICTS_KEPT:
                self._ip_literal_verdicts.clear()
            self._ip_literal_verdicts[url] = refusal
        if refusal is not None:
            raise BlockedTarget(refusal)

    # ---- service ---------------------------------------------------------------------------------

    async def _service(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        assert target.agent_url is not None and target.service_name is not None
        url = target.agent_url.rstrip("/") + "/api/v1/system/services/" + quote(target.service_name, safe="@:.")
        self._refuse_ip_literal(url)
        ssl_option: ssl.SSLContext | bool = self._agent_ssl or self._verifying_ssl
        if not url.lower().startswith("https"):
            ssl_option = False
        what = _authority(url)
        async with self._session.get(url, ssl=ssl_option, allow_redirects=False) as response:
            refuse_invalid_status(response.status, what)
            raw, whole = await read_body(response, what)
        return judge_agent_answer(response.status, raw, whole, target.service_name)

    # ---- tcp -------------------------------------------------------------------------------------

    async def _tcp(self, target: CheckTarget) -> tuple[bool, ResultReason, str]:
        """Resolve, refuse blocked addresses, then connect to the addresses in the resolver's order
        (happy eyeballs, as aiohttp does for http): the check fails only if none accepts."""
        assert target.port is not None
        host, port = target.address or target.host_name, target.port
        if not 1 <= port <= 65535:  # getaddrinfo would silently wrap it
            return False, "connect", f"port {port} is not a TCP port (1-65535)"
        try:
            infos = list(await self._resolve(dns_name(host), port))
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
            return False, "connect", connect_failure(exc, host_port(host, port), infos)
        try:
            address, connected_port = sock.getpeername()[:2]
        finally:
            sock.close()
        return True, "ok", f"connected to {host_port(address, connected_port)}"


def certificate_problem(
    end: dt.datetime | None,
    left: float | None,
    min_days: int,
    *,
    start: dt.datetime | None = None,
    starts_in: float | None = None,
) -> str | None:
    """Why a certificate fails `min_cert_days` (CONTRACT §3), or None when it stays valid long enough: none could
    be read, it is not valid yet (its validity `start`s in `starts_in` days: a certificate not valid now does not
    "stay valid" any number of days), or it expires within `min_days` days (`left` days from now, negative once
    expired)."""
    if end is None or left is None:
        return "no server certificate could be read (min_cert_days needs one)"
    if start is not None and starts_in is not None and starts_in > 0:
        begins = start.strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"the certificate is not valid until {begins}, in {starts_in:.1f} days (min_cert_days is {min_days})"
    if left >= min_days:
        return None
    ends = end.strftime("%Y-%m-%d %H:%M:%S UTC")
    if left < 0:
        return f"the certificate expired on {ends}, {-left:.1f} days ago (min_cert_days is {min_days})"
    return f"the certificate expires on {ends}, in {left:.1f} days, fewer than min_cert_days ({min_days})"


class _NotJson(ValueError):
    """A body json.loads would take by default that is not JSON (RFC 8259); the message names what."""


class _NumberTooLarge(ValueError):
    """JSON with an integer of more digits than Python converts (sys.get_int_max_str_digits)."""


def _refuse_constant(name: str) -> Any:
    # json.loads takes NaN, Infinity and -Infinity by default; RFC 8259 has no such values.
    raise _NotJson(f"{name} is not a JSON value")


def _parse_int(digits: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise _NumberTooLarge(f"more than {limit} digits")
    return int(digits)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for a detail (the value itself may be anything)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def judge_agent_answer(status: int, raw: bytes, whole: bool, service_name: str) -> tuple[bool, ResultReason, str]:
    """Judge an agent's answer (CONTRACT §4): `{"success": true, "data": {..., "healthy": bool}}` with 200;
    `data.healthy` decides (false → reason `status`). Anything else is reason `agent`, the detail naming what
    was wrong: a status other than 200, a body larger than BODY_LIMIT_BYTES (`whole` false), not JSON (RFC
    8259: no NaN or Infinity; UTF-8, -16 or -32, a BOM allowed), nested too deeply, a number beyond Python's
    digit limit, or a field missing or of the wrong type."""
    seen = describe_status(status)
    if not whole:
        return False, "agent", f"agent answered {seen} with a body larger than {BODY_LIMIT_BYTES // 1024 // 1024} MiB"
    try:
        answer: Any = json.loads(raw, parse_constant=_refuse_constant, parse_int=_parse_int)
    except RecursionError:
        return False, "agent", f"agent answered {seen} with JSON nested too deeply to read"
    except _NumberTooLarge as exc:
        return False, "agent", f"agent answered {seen} with JSON holding a number too large to read ({exc})"
    except _NotJson as exc:
        return False, "agent", f"agent answered {seen} with a body that is not JSON ({exc})"
    except UnicodeDecodeError:
        return False, "agent", f"agent answered {seen} with a body that is not JSON (not UTF-8, UTF-16 or UTF-32 text)"
    except ValueError:
        return False, "agent", f"agent answered {seen} with a body that is not JSON"
    if status != 200:
        message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
        suffix = f": {message}" if message else ""
        return False, "agent", f"agent answered {seen}{suffix}"
    if not isinstance(answer, dict):
        return False, "agent", f"agent answered {seen} with JSON that is not an object ({_json_type(answer)})"
    problem = next(_agent_answer_problems(answer), None)
    if problem is not None:
        return False, "agent", problem
    data = answer["data"]
    state = f"{service_name} is {data.get('active_state', '?')} ({data.get('sub_state', '?')})"
    if data["healthy"]:
        return True, "ok", state
    return False, "status", state


def _agent_answer_problems(answer: dict[str, Any]) -> Iterator[str]:
    """What is wrong with a 200 answer's fields, the first problem first."""
    if "success" not in answer:
        yield "agent answer lacks success"
    elif not isinstance(answer["success"], bool):
        yield f"agent answer's success is not a boolean ({_json_type(answer['success'])})"
    elif not answer["success"]:
        message = answer.get("error") or answer.get("message")
        yield "agent answer says success false" + (f": {message}" if message else "")
    if "data" not in answer:
        yield "agent answer lacks data"
    elif not isinstance(answer["data"], dict):
        yield f"agent answer's data is not an object ({_json_type(answer['data'])})"
    elif "healthy" not in answer["data"]:
        yield "agent answer lacks data.healthy"
    elif not isinstance(answer["data"]["healthy"], bool):
        yield f"agent answer's data.healthy is not a boolean ({_json_type(answer['data']['healthy'])})"


def connect_failure(exc: BaseException, what: str, infos: Sequence[AddrInfo]) -> str:
    """Words for a TCP connection that did not open to `what` at any of `infos`' addresses (tcp and grpc checks)."""
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    every = f" at every address ({', '.join(addresses)})" if len(addresses) > 1 else ""
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return f"connection refused by {what}{every}"
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot connect to {what}{every}: {why}"


def _probe_of(probe: TypeProbe | None, check_type: str) -> TypeProbe:
    if probe is None:
        raise ProbeMissing(f"this poller was started without a probe for {check_type} checks")
    return probe


def _target_name(target: CheckTarget) -> str:
    if target.check_type == "tcp":
        return host_port(target.address or target.host_name, target.port or 0)
    return _authority(target.url if target.check_type == "http" else target.agent_url)
