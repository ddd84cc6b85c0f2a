"""A fake host agent (CONTRACT §4, service checks): the one peer of the poller that does not exist here.

It answers `GET /api/v1/system/services/{name}` with
`{"success": true, "data": {"name", "active_state", "sub_state", "description", "healthy": bool}}`, per service as
the test says, from a small HTTP/1.1 server of its own (plain asyncio, keep-alive) on a free 127.0.0.1 port. It
runs in a background thread with its own event loop, so sync and async tests can use it alike; optionally over TLS,
and with `mtls=True` it requires a client certificate signed by the CA it generated (ssl.CERT_REQUIRED).

    with FakeAgent({"nginx": "healthy", "cron": "unhealthy", "db": "hang"}) as agent:
        agent.base_url                      # "http://127.0.0.1:PORT" (https with tls/mtls)
        agent.services["cron"] = "status=500"   # change a behaviour at any time
        agent.requests                      # [(path, client certificate subject or None), ...]

Behaviours (a string per service name; unknown names answer 404 JSON):
    "healthy"                 200, active/running, healthy true
    "unhealthy"               200, failed/failed, healthy false
    "inactive"                200, inactive/dead, healthy false
    "status=CODE"             that status (e.g. 400, 404, 500) with {"success": false, "error": "..."}
    "bad_json"                200 application/json whose body is not JSON
    "hang"                    never answers (the connection stays open until the agent stops)
    "slow=SECONDS"            healthy after a delay; "slow=SECONDS:BEHAVIOUR" for another behaviour after it
A dict instead of a string is answered as the `data` object as given (200, success true).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import shutil
import ssl
import tempfile
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES_PREFIX = "/api/v1/system/services/"
CLIENT_CN = "healthgate-poller"
Behaviour = str | Mapping[str, Any]
T = TypeVar("T")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


# --- certificates -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgentCerts:
    """PEM files for TLS/mTLS with the agent. `rogue_client_*` is signed by another CA: a cert the agent refuses."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path

    def env(self) -> dict[str, str]:
        """The poller's settings for mTLS to this agent (CONTRACT §2)."""
        return {
            "HEALTHGATE_AGENT_CA_FILE": str(self.ca_cert),
            "HEALTHGATE_AGENT_CERT_FILE": str(self.client_cert),
            "HEALTHGATE_AGENT_KEY_FILE": str(self.client_key),
        }

    def client_ssl_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        """Trusts the agent's CA and, unless told otherwise, presents the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_agent_certs(directory: Path) -> AgentCerts:
    """A tiny CA, a server cert (SAN localhost, 127.0.0.1) and a client cert (CN healthgate-poller) it signed,
    plus a client cert from an unrelated CA; all as PEM files in `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca("healthgate test agent CA")
    _write_pair(directory, "ca", ca_cert, ca_key)
    _write_pair(directory, "server", *_issue(ca_cert, ca_key, "localhost", server=True))
    _write_pair(directory, "client", *_issue(ca_cert, ca_key, CLIENT_CN, server=False))
    rogue_ca_cert, rogue_ca_key = _make_ca("some other CA")
    _write_pair(directory, "rogue-client", *_issue(rogue_ca_cert, rogue_ca_key, "intruder", server=False))
    return AgentCerts(
        directory=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        rogue_client_cert=directory / "rogue-client.crt",
        rogue_client_key=directory / "rogue-client.key",
    )


# --- the server ---------------------------------------------------------------------------------------------------
class _BadRequest(Exception):
    pass


def _service_data(name: str, active_state: str, sub_state: str, healthy: bool) -> dict[str, Any]:
    return {
        "name": name,
        "active_state": active_state,
        "sub_state": sub_state,
        "load_state": "loaded",
        "description": f"{name} (fake agent)",
        "healthy": healthy,
    }


class FakeAgent:
    """`FakeAgent(services=None, *, tls=False, mtls=False, cert_dir=None)`.

    `services`: name → behaviour (see the module docstring); kept as the mutable dict `self.services`.
    `tls`: serve HTTPS with a server cert from the generated CA; `mtls`: also require a client cert signed by it.
    `cert_dir`: where the PEM files go (a temporary directory, removed on stop, when not given); the files exist
    from construction on, as `self.certs`, even for a plain agent."""

    def __init__(
        self,
        services: Mapping[str, Behaviour] | None = None,
        *,
        tls: bool = False,
        mtls: bool = False,
        cert_dir: Path | None = None,
    ) -> None:
        self.services: dict[str, Behaviour] = dict(services or {})
        self.tls = tls or mtls
        self.mtls = mtls
        self._own_cert_dir = cert_dir is None
        self.certs = make_agent_certs(
            Path(tempfile.mkdtemp(prefix="healthgate-agent-")) if cert_dir is None else cert_dir
        )
        self.port = 0
        self.requests: list[tuple[str, str | None]] = []
        self._requests_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # --- what tests read ----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, service: str) -> str:
        return f"{self.base_url}{SERVICES_PREFIX}{service}"

    @property
    def ca_path(self) -> Path:
        return self.certs.ca_cert

    @property
    def client_cert_path(self) -> Path:
        return self.certs.client_cert

    @property
    def client_key_path(self) -> Path:
        return self.certs.client_key

    def env(self) -> dict[str, str]:
        """HEALTHGATE_AGENT_CA_FILE / _CERT_FILE / _KEY_FILE for a poller talking to this agent."""
        return self.certs.env()

    def client_ssl_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        return self.certs.client_ssl_context(with_client_cert=with_client_cert)

    def set(self, name: str, behaviour: Behaviour) -> None:
        self.services[name] = behaviour

    def requests_for(self, service: str) -> list[tuple[str, str | None]]:
        return [entry for entry in self.request_log() if entry[0] == SERVICES_PREFIX + service]

    def request_log(self) -> list[tuple[str, str | None]]:
        """A copy of `requests`, safe to read while the agent thread appends."""
        with self._requests_lock:
            return list(self.requests)

    def clear_requests(self) -> None:
        with self._requests_lock:
            self.requests.clear()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def _server_ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.certs.server_cert), str(self.certs.server_key))
        if self.mtls:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.certs.ca_cert))
        return context

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> FakeAgent:
        if self._thread is not None:
            raise RuntimeError("the fake agent is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-agent", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> int:
        context = self._server_ssl_context()
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=10 if context else None
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = self._server = None
        if self._own_cert_dir:
            shutil.rmtree(self.certs.directory, ignore_errors=True)

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # --- HTTP ---------------------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            subject = _peer_subject(writer)
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest:
                    await _respond(writer, 400, {"success": False, "error": "malformed request"}, keep_alive=False)
                    break
                if request is None:
                    break
                method, target, keep_alive = request
                with self._requests_lock:
                    self.requests.append((target, subject))
                status, body, content_type = await self._answer(method, target)
                await _respond(writer, status, body, keep_alive=keep_alive, content_type=content_type)
                if not keep_alive:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            # Stopping: cancel was asked by _shutdown; fall through to close the connection.
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _answer(self, method: str, target: str) -> tuple[int, Any, str]:
        path = urlsplit(target).path
        if not path.startswith(SERVICES_PREFIX) or "/" in path[len(SERVICES_PREFIX) :]:
            return 404, {"success": False, "error": f"no route for {path}"}, "application/json"
        if method != "GET":
            return 405, {"success": False, "error": f"method {method} not allowed"}, "application/json"
        name = unquote(path[len(SERVICES_PREFIX) :])
        behaviour = self.services.get(name)
        if behaviour is None:
            return 404, {"success": False, "error": f"service {name!r} not found"}, "application/json"
        return await _behave(name, behaviour)


async def _behave(name: str, behaviour: Behaviour) -> tuple[int, Any, str]:
    if not isinstance(behaviour, str):
        return 200, {"success": True, "data": dict(behaviour)}, "application/json"
    kind, _, argument = behaviour.partition("=")
    if kind == "healthy":
        return 200, {"success": True, "data": _service_data(name, "active", "running", True)}, "application/json"
    if kind == "unhealthy":
        return 200, {"success": True, "data": _service_data(name, "failed", "failed", False)}, "application/json"
    if kind == "inactive":
        return 200, {"success": True, "data": _service_data(name, "inactive", "dead", False)}, "application/json"
    if kind == "status":
        code = int(argument)
        return code, {"success": False, "error": f"agent error {code} for {name}"}, "application/json"
    if kind == "bad_json":
        return 200, '{"success": true, "data": <html>this is not JSON', "application/json"
    if kind == "hang":
        await asyncio.Event().wait()  # until cancelled by stop()
    if kind == "slow":
        seconds, _, then = argument.partition(":")
        await asyncio.sleep(float(seconds))
        return await _behave(name, then or "healthy")
    raise ValueError(f"unknown fake agent behaviour {behaviour!r} for {name!r}")


def _peer_subject(writer: asyncio.StreamWriter) -> str | None:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bool] | None:
    """(method, target, keep-alive) of the next request, or None at a clean end of the connection."""
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        header = await reader.readline()
        if not header:
            raise _BadRequest
        if header in (b"\r\n", b"\n"):
            break
        key, _, value = header.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if length:
        await reader.readexactly(length)
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return method, target, keep_alive


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: Any,
    *,
    keep_alive: bool,
    content_type: str = "application/json",
) -> None:
    payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        "Server: healthgate-fake-agent\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + payload)
    await writer.drain()


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    """A plain-HTTP fake agent with no services; set `fake_agent.services[name] = behaviour` in the test."""
    with FakeAgent() as agent:
        yield agent


@pytest.fixture
def mtls_agent() -> Iterator[FakeAgent]:
    """A fake agent that requires a client certificate signed by its CA (`mtls_agent.env()` for the poller)."""
    with FakeAgent(mtls=True) as agent:
        yield agent
