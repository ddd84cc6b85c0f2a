"""grpc checks (CONTRACT §3): the standard health protocol, `grpc.health.v1.Health/Check` for `grpc_service`.

A check runs in three steps:

1. The address (or the host's name), encoded with IDNA as tcp checks encode it, is resolved with the Prober's
   resolver; an address in a blocked network (HEALTHGATE_BLOCKED_NETWORKS) refuses the check before any packet.
2. The poller opens the TCP connection itself (happy eyeballs over the addresses, as tcp checks) and, with `tls`,
   the TLS session, with Python's ssl as http checks do: the name as SNI and for verification, the system's roots
   (OpenSSL's default paths, which SSL_CERT_FILE and SSL_CERT_DIR override), ALPN h2. With `ignore_cert_errors`
   nothing about the certificate is verified (self-signed, expired, another name, an unknown issuer all work). The
   certificate's end of validity is read from this session (`cert_expires_at`, on every result after the
   handshake, and after a failed verification by a second handshake that does not verify).
3. gRPC's own client (grpcio) speaks HTTP/2 over that connection: its channel is pointed at a Unix socket of
   this run (Linux abstract namespace, accepting only this process's connections) whose bytes this module relays
   to and from the connection, unread. The channel sends the name and port as `:authority` and `https` as
   `:scheme` over TLS, as a channel of gRPC's own would.

Why not let gRPC connect: gRPC Python cannot skip certificate verification, does not show a client the server's
certificate, and names connection failures only in its messages' text. Fetching the certificate with a first
handshake and trusting exactly it (`ssl_target_name_override`) works for a self-signed, misnamed or unknown-CA
certificate, but costs a second handshake per check, still fails on an expired one (tried with grpcio 1.85), and
without ignore_cert_errors verifies against gRPC's bundled roots, not the system's. The relay's price: Linux only
(abstract Unix sockets), and 0.5-1 ms of CPU per check on top of the channel's own 0.5-2 ms (measured against a
local server: a plaintext check 1-3 ms of CPU in all, a TLS check 2.5-5 ms, the lower figures with 20 checks at a
time).

Outcomes: SERVING → ok; any other serving status, an unknown `grpc_service` (NOT_FOUND) or another gRPC error
the server sent → `status`; refused or unreachable → `connect`; handshake or verification failure → `tls`; an
answer that is not gRPC over HTTP/2 (an HTTP/1 server, garbage), or a message that is not a HealthCheckResponse →
`protocol`; the deadline → `timeout`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import socket
import ssl
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiohappyeyeballs
import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from services.poller.certificates import peer_certificate_end
from services.poller.probes import (
    HAPPY_EYEBALLS_DELAY,
    AddrInfo,
    CheckTarget,
    Resolve,
    Verdict,
    connect_failure,
    dns_name,
)
from shared.addresses import host_port
from shared.blocked_networks import BlockedTarget, Network, refuse_if_blocked

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"  # the standard health protocol (grpc/grpc doc/health-checking.md)
# The relay copies at most this much at a time; a health check's exchange is a few hundred bytes.
RELAY_CHUNK_BYTES = 64 * 1024
# A HealthCheckResponse is a few bytes: a larger message is refused by gRPC (no memory for a hostile server).
MAX_ANSWER_BYTES = 64 * 1024
# How long a TLS session may take to close politely (close_notify) once a run is over, in the background.
TLS_SHUTDOWN_SECONDS = 2.0
# The first byte of a TLS record (handshake 0x16, alert 0x15): a plaintext check that gets one talks to TLS.
TLS_RECORD_TYPES = (0x15, 0x16)
# What gRPC writes when it could not set up HTTP/2 over a connection (the relay's, which always opens).
GRPC_CONNECT_FAILURE = "failed to connect to all addresses"
# What gRPC writes, after the server's connection closed, of its own side of the relay, never of the server: its
# reconnect is refused (the relay takes one connection); its write into the closed relay breaks the pipe.
GRPC_RELAY_SIDE = ("Connection refused", "Broken pipe")
# What gRPC writes when an HTTP/2 answer has a status other than 200: an HTTP/2 server that is not gRPC.
GRPC_HTTP_STATUS = "Received http2 header with status"
PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
# accept() errors that say the poller is short of something (descriptors, memory), not that the peer went away.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Descriptors that must be free before a gRPC channel is made: gRPC's C core crashed the whole process (a
# segmentation fault in grpc.aio.Channel.__init__, seen in a CI run of the short-of-descriptors test) when it ran
# out of them while setting a channel up. Its own needs are a few (wake-up fds, the socket to the relay).
CHANNEL_SPARE_DESCRIPTORS = 16
# HTTP/2 first, as gRPC offers it; HTTP/1.1 too, so that a TLS server without HTTP/2 (which would end the handshake
# with a no_application_protocol alert, RFC 7301) completes it and is named for what it is, its certificate read. A
# gRPC server picks h2.
ALPN_PROTOCOLS = ["h2", "http/1.1"]


def verifying_context() -> ssl.SSLContext:
    """TLS that verifies the server's certificate and name against the system's roots (SSL_CERT_FILE and
    SSL_CERT_DIR override them), offering HTTP/2 (ALPN, ALPN_PROTOCOLS)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def unverifying_context() -> ssl.SSLContext:
    """TLS that verifies nothing about the certificate (ignore_cert_errors), offering HTTP/2 (ALPN_PROTOCOLS)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def service_words(service: str) -> str:
    return f"service {service!r}" if service else "the server"


def status_name(status: int) -> str:
    """A serving status's name (SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN), or its number for one this
    version of the protocol does not know."""
    try:
        name: str = ServingStatus.Name(status)
    except ValueError:
        return f"status {status}"
    return name


def judge_status(status: int, service: str, what: str) -> Verdict:
    """The verdict on a Check answer (CONTRACT §3): healthy iff SERVING."""
    words = f"{what}: {service_words(service)} is {status_name(status)}"
    if status == SERVING:
        return Verdict(True, "ok", words)
    return Verdict(False, "status", words)


def judge_answer(message: bytes, service: str, what: str) -> Verdict:
    """The verdict on the message a Check call returned (its serialized bytes): a HealthCheckResponse's status, or
    `protocol` for bytes that are not one, in protobuf's words ("Error parsing message with type
    'grpc.health.v1.HealthCheckResponse'")."""
    try:
        answer = health_pb2.HealthCheckResponse.FromString(message)
    except DecodeError as exc:
        return Verdict(False, "protocol", f"{what} answered a message that cannot be read: {exc}")
    return judge_status(answer.status, service, what)


def descriptors_to_spare(count: int = CHANNEL_SPARE_DESCRIPTORS) -> OSError | None:
    """None when `count` more file descriptors can be opened now (each opened on /dev/null and closed again at
    once), else the OSError that said no (EMFILE, ENFILE). Costs 2 x `count` system calls."""
    opened: list[int] = []
    try:
        for _ in range(count):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        return exc
    finally:
        for descriptor in opened:
            os.close(descriptor)
    return None


def unrelayed(what: str, why: str) -> Verdict:
    """The verdict when the poller could not give gRPC the connection it opened to `what` (the relay had no socket,
    or gRPC none to reach it: out of descriptors or memory): the poller's failure, said so, not the server's."""
    return Verdict(False, "connect", f"the poller could not give gRPC its connection to {what}: {why}")


def _before_controls(text: str) -> str:
    """`text` up to its first control character: gRPC follows some messages with the raw bytes of a socket address."""
    end = next((index for index, character in enumerate(text) if not character.isprintable()), len(text))
    return text[:end]


def grpc_words(details: str, what: str) -> str:
    """gRPC's own message about a connection it could not use, from its last error on: "failed to connect to all
    addresses; last error: INTERNAL: <where>: Failed parsing HTTP/2 (...)" → "Failed parsing HTTP/2 (...)"."""
    _, marker, rest = details.rpartition("last error: ")
    if marker:
        details = rest
    _, marker, rest = details.partition(f"{what}: ")
    return rest if marker else details


@dataclass
class RelayTraffic:
    """What the relay saw of the server: bytes received, the first of them, and whether it closed."""

    received: int = 0
    first_byte: int | None = None
    server_closed: bool = False


def judge_error(
    code: grpc.StatusCode,
    details: str,
    traffic: RelayTraffic,
    *,
    service: str,
    what: str,
    tls: bool,
    timeout_seconds: float,
    relayed: bool = True,
    relay_failure: OSError | None = None,
) -> Verdict:
    """The verdict on a failed Check call. `details` is gRPC's message with the relay's socket already replaced by
    `what`. gRPC that never got its connection through the relay (`relayed` false: the poller out of descriptors or
    memory, `relay_failure` the relay's own error if it had one) is the poller's failure, not the server's
    (`connect`, in those words). A failure to set up HTTP/2, or the server closing the connection, is the server not
    speaking gRPC (`protocol`; `connect` when it closed without sending a byte); anything else is an answer
    (`status`)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Verdict(False, "timeout", f"timed out after {timeout_seconds:g} s")  # as Prober.run words it
    if not relayed:
        why = relay_failure.strerror if relay_failure is not None else None
        return unrelayed(what, why or _before_controls(grpc_words(details, what)))
    if GRPC_HTTP_STATUS in details:
        return Verdict(False, "protocol", f"{what} is not a gRPC server: {details}")
    if details.startswith(GRPC_CONNECT_FAILURE) or traffic.server_closed:
        if traffic.received == 0:
            return Verdict(False, "connect", f"{what} closed the connection without answering")
        if not tls and traffic.first_byte in TLS_RECORD_TYPES:
            return Verdict(False, "protocol", f"{what} answered with TLS: set tls to check a TLS gRPC server")
        words = grpc_words(details, what)
        if traffic.server_closed and any(relay_side in words for relay_side in GRPC_RELAY_SIDE):
            # The server had closed the connection it sent bytes on; what gRPC then saw was its own side of the relay.
            words = f"it closed the connection after {traffic.received} bytes, without answering the call"
        return Verdict(False, "protocol", f"{what} did not answer as a gRPC server: {words}")
    if code == grpc.StatusCode.NOT_FOUND:
        return Verdict(False, "status", f"{what}: {service_words(service)} is unknown to the server (NOT_FOUND)")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Verdict(False, "status", f"{what} does not implement the gRPC health protocol (UNIMPLEMENTED)")
    suffix = f": {details}" if details else ""
    return Verdict(False, "status", f"{what} answered {code.name}{suffix}")


def handshake_failure(exc: Exception, what: str) -> Verdict:
    """The verdict on a connection that opened but whose TLS handshake failed, or that broke before any use."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Verdict(False, "tls", f"certificate verify failed: {exc.verify_message or exc.reason}")
    if isinstance(exc, ssl.SSLError):
        return Verdict(False, "tls", f"TLS handshake with {what} failed: {exc.reason or exc}")
    if isinstance(exc, OSError):  # the server closed or reset the connection during the handshake
        return Verdict(False, "tls", f"TLS handshake with {what} failed: {exc.strerror or exc}")
    return Verdict(False, "tls", f"TLS handshake with {what} failed: {type(exc).__name__}: {exc}")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, traffic: RelayTraffic | None) -> None:
    """Copy `reader` to `writer` until either side ends; then close `writer`. `traffic` counts what the server
    sent (when `reader` is the server)."""
    try:
        while chunk := await reader.read(RELAY_CHUNK_BYTES):
            if writer.is_closing():  # the run is over (asyncio's TLS transport must not be written to then)
                break
            if traffic is not None:
                traffic.first_byte = chunk[0] if traffic.first_byte is None else traffic.first_byte
                traffic.received += len(chunk)
            writer.write(chunk)
            await writer.drain()
        if traffic is not None:
            traffic.server_closed = True
    except (OSError, ssl.SSLError):
        if traffic is not None:
            traffic.server_closed = True
    finally:
        writer.close()


class Relay:
    """A Unix socket of one run (abstract namespace) that gRPC's channel connects to, and the copying of its bytes
    to and from the server's connection. Only one connection from this process is taken: any other process could
    connect to an abstract socket, and a second connection of gRPC's (a reconnect) is refused, which fails the call.

    Create it in the running loop, point the channel at `target`, and `await close()` when the call is over,
    however it ended. A connection is accepted in a reader callback, which owns it at once (no accept future that a
    cancellation could orphan, as `loop.sock_accept` or an `asyncio.Server` closed mid-accept can)."""

    def __init__(self, server_reader: asyncio.StreamReader, server_writer: asyncio.StreamWriter) -> None:
        self.name = f"healthgate-grpc-{uuid.uuid4().hex}"
        self.traffic = RelayTraffic()
        # Why no connection could be taken (out of descriptors or memory), if that is what happened.
        self.failure: OSError | None = None
        self._server_reader = server_reader
        self._server_writer = server_writer
        self._loop = asyncio.get_running_loop()
        self._connection: socket.socket | None = None
        self._client_writer: asyncio.StreamWriter | None = None
        self._copying: asyncio.Task[None] | None = None
        self._listener: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind("\0" + self.name)
            self._listener.listen(1)
            self._listener.setblocking(False)
            self._loop.add_reader(self._listener.fileno(), self._accept)
        except BaseException:
            self._listener.close()
            raise

    @property
    def target(self) -> str:
        """The gRPC target naming this socket."""
        return f"unix-abstract:{self.name}"

    @property
    def relayed(self) -> bool:
        """Whether gRPC's connection was taken (and its bytes relayed)."""
        return self._connection is not None

    def _accept(self) -> None:
        """The listener is readable: take the connection if it is this process's, else close it."""
        if self._listener is None:
            return
        try:
            connection, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                # The connection stays in the backlog and the listener readable: trying again at once would keep
                # the event loop busy until the check's timeout. Closing the listener refuses gRPC's connection.
                self.failure = exc
                self._stop_listening()
            return  # else the peer gave up before the accept (ECONNABORTED)
        try:
            pid, _uid, _gid = PEER_CREDENTIALS.unpack(
                connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
            )
        except OSError:
            pid = None
        if pid != os.getpid():
            connection.close()
            return
        self._stop_listening()
        self._connection = connection
        self._copying = self._loop.create_task(self._copy(connection))

    async def _copy(self, connection: socket.socket) -> None:
        client_reader, self._client_writer = await asyncio.open_unix_connection(sock=connection)
        try:
            await asyncio.gather(
                _pump(client_reader, self._server_writer, None),
                _pump(self._server_reader, self._client_writer, self.traffic),
            )
        finally:  # also when cancelled before the pumps ran (their own `finally` never does then)
            self._client_writer.close()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        """Stop listening, stop copying, close both connections."""
        self._stop_listening()
        if self._copying is not None:
            self._copying.cancel()
            await asyncio.gather(self._copying, return_exceptions=True)
        if self._connection is not None and self._client_writer is None:
            # Never given to a transport (or given to one that failed, and is closing): closed here. A transport's
            # socket is closed by the transport only: closing its descriptor under it would let another socket reuse
            # the number while the transport still holds it.
            self._connection.close()
        self._server_writer.close()


class GrpcProbe:
    """Runs grpc checks. Created once at poller start with the blocked networks, the Prober's resolver and the TLS
    contexts (made here unless given: tests pass a verifying context that trusts their own CA)."""

    def __init__(
        self, blocked: Sequence[Network], resolve: Resolve, *, verifying: ssl.SSLContext | None = None
    ) -> None:
        self._blocked = blocked
        self._resolve = resolve
        self._verifying = verifying or verifying_context()
        self._unverifying = unverifying_context()

    async def check(self, target: CheckTarget) -> Verdict:
        """Run one Check call (CONTRACT §3). Never raises, except CancelledError: the caller's timeout ends a run
        that takes too long, and everything opened here is closed on the way out."""
        assert target.port is not None
        host, port = target.address or target.host_name, target.port
        what = host_port(host, port)
        try:
            name = dns_name(host)
            infos = list(await self._resolve(name, port))
        except UnicodeError as exc:
            error = exc.__cause__ or exc
            return Verdict(False, "dns", f"cannot resolve {host}: the name cannot be encoded for DNS (IDNA: {error})")
        except socket.gaierror as exc:
            return Verdict(False, "dns", f"cannot resolve {host}: {exc.strerror}")
        if not infos:
            return Verdict(False, "dns", f"cannot resolve {host}: no address")
        try:
            for info in infos:
                refuse_if_blocked(str(info[4][0]), self._blocked, name=host)
        except BlockedTarget as exc:
            return Verdict(False, "blocked", str(exc))
        try:
            sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError for some failures
            return Verdict(False, "connect", connect_failure(exc, what, infos))
        context = (self._unverifying if target.ignore_cert_errors else self._verifying) if target.tls else None
        try:
            reader, writer = await self._open(sock, context, name)
        except Exception as exc:
            verdict = handshake_failure(exc, what)
            if isinstance(exc, ssl.SSLCertVerificationError):
                verdict = replace(verdict, cert_expires_at=await self._unverified_certificate_end(infos, name))
            return verdict
        cert_end = peer_certificate_end(writer.get_extra_info("ssl_object")) if context else None
        try:
            verdict = await self._call(reader, writer, target, name, what)
        finally:
            writer.close()
        return replace(verdict, cert_expires_at=cert_end)

    @staticmethod
    async def _open(
        sock: socket.socket, context: ssl.SSLContext | None, name: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams over the connected `sock`, after a TLS handshake with `context` (SNI and verification by `name`)
        unless it is None. The transport takes the socket before anything can fail or be cancelled, and closes it
        then (asyncio and uvloop alike): closing it here too could close a descriptor number already reused."""
        return await asyncio.open_connection(
            sock=sock, ssl=context, server_hostname=name if context else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN_SECONDS if context else None,
        )  # fmt: skip

    async def _call(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: CheckTarget, name: str, what: str
    ) -> Verdict:
        """The Check call over the open connection."""
        ssl_object = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if protocol not in (None, "h2"):
            return Verdict(False, "protocol", f"{what} chose {protocol} in TLS (ALPN), not HTTP/2: not a gRPC server")
        try:
            relay = Relay(reader, writer)
        except OSError as exc:  # no socket for it: out of descriptors or memory
            return unrelayed(what, exc.strerror or str(exc))
        # No await between this and the channel's creation: nothing of this process opens a descriptor meanwhile.
        short = descriptors_to_spare()
        if short is not None:
            await relay.close()
            return unrelayed(what, short.strerror or str(short))
        options = [
            ("grpc.default_authority", host_port(name, target.port or 0)),
            ("grpc.http2_scheme", "https" if target.tls else "http"),
            ("grpc.enable_retries", 0),
            ("grpc.enable_http_proxy", 0),
            ("grpc.use_local_subchannel_pool", 1),  # nothing of a run's connection outlives its channel
            ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            ("grpc.primary_user_agent", "healthgate-poller"),
        ]
        try:
            async with grpc.aio.insecure_channel(relay.target, options=options) as channel:
                # HealthStub(channel).Check, spelled out: typeshed's stub of HealthStub declares no methods, and
                # this way the call is typed by grpc.aio's own annotations.
                # The answer is read here, not by gRPC: grpcio would log a message that does not parse with a
                # traceback and hand back None.
                check = channel.unary_unary(
                    HEALTH_CHECK_METHOD,
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=bytes,
                )
                request = health_pb2.HealthCheckRequest(service=target.grpc_service)
                try:
                    message = await check(request, timeout=target.timeout_seconds)
                except grpc.aio.AioRpcError as exc:
                    details = (exc.details() or "").replace(relay.target, what)
                    return judge_error(
                        exc.code(), details, relay.traffic, service=target.grpc_service, what=what, tls=target.tls,
                        timeout_seconds=target.timeout_seconds, relayed=relay.relayed, relay_failure=relay.failure,
                    )  # fmt: skip
            return judge_answer(message, target.grpc_service, what)
        finally:
            await relay.close()

    async def _unverified_certificate_end(self, infos: Sequence[AddrInfo], name: str) -> dt.datetime | None:
        """After a failed verification, the end of validity of the certificate the server presents, read by a
        second handshake that verifies nothing (what was wrong with it is often its dates); None if that fails."""
        try:
            sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
            _reader, writer = await self._open(sock, self._unverifying, name)
        except (OSError, RuntimeError, ssl.SSLError):
            return None
        try:
            return peer_certificate_end(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()
