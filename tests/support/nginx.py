"""A real nginx as the HTTP, HTTPS and basic-auth peer of the poller's http checks.

`NginxServer` writes a configuration, a self-signed certificate (CN and SAN `localhost`, SAN IP 127.0.0.1) and
the served files into a temporary directory and runs its own nginx process on two free 127.0.0.1 ports, one plain
HTTP and one HTTPS; every location answers on both. Use it as a context manager, or through the session-scoped
`nginx` fixture (import it into a conftest or test module):

    with NginxServer() as server:
        httpx.get(server.http_url("/ok"))                                   # 200 "all good\\n"
        httpx.get(server.https_url("/ok"), verify=server.ssl_context())     # trusts the self-signed cert

Locations: see `LOCATIONS_DOC` below. The system nginx service is never involved (`make test-deps` installs the
package, the tests run their own processes).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BASIC_AUTH_USER = "monitor"
BASIC_AUTH_PASSWORD = "s3cret-pass"
BASIC_AUTH_REALM = "healthgate test"

OK_BODY = "all good\n"
AUTHORISED_BODY = "authorised\n"
JSON_BODY = '{"status":"up"}'
GZIP_BODY = "compressed and fine\n"
STATUS_CODES = (204, 301, 302, 404, 500, 503)
BLOCKED_REDIRECT_TARGET = "http://169.254.169.254/latest/meta-data/"

BIG_SIZE = 2 * 1024 * 1024
BIG_EARLY_MARKER = "NEEDLE-EARLY"
BIG_EARLY_OFFSET = 100  # inside the first KiB
BIG_LATE_MARKER = "NEEDLE-LATE"
BIG_LATE_OFFSET = 1536 * 1024 + 4096  # after 1.5 MiB, so beyond the first 1 MiB a check reads

LOCATIONS_DOC = """
/ok                   200 text/plain "all good\\n"
/json                 200 application/json {"status":"up"}
/status/<code>        204, 301 and 302 (Location: /ok), 404, 500, 503
/redirect             302 -> /ok
/redirect-chain       302 -> /redirect -> /ok
/redirect-loop        302 -> /redirect-loop, forever
/redirect-to-blocked  302 -> http://169.254.169.254/latest/meta-data/ (a cloud metadata address)
/big                  200 application/octet-stream, 2 MiB: NEEDLE-EARLY at byte 100, NEEDLE-LATE after 1.5 MiB
/basic                auth_basic monitor / s3cret-pass: 200 text/plain "authorised\\n", else 401
/gzip                 200 text/plain "compressed and fine\\n", gzip-encoded for clients that accept gzip
"""

_NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or where Debian and source builds put it (/usr/sbin is not always on PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_self_signed_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed server certificate for `localhost` and 127.0.0.1; returns (cert path, key path).

    It carries the extensions strict verifiers expect (SKI/AKI, key usage, serverAuth), so it also verifies under
    `VERIFY_X509_STRICT` (the default of `ssl.create_default_context` from Python 3.13 on)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _big_file_content() -> bytes:
    content = bytearray(b"x" * BIG_SIZE)
    for offset in range(0, BIG_SIZE, 64):  # line breaks, so the body looks like text but has no markers
        content[offset + 63 : offset + 64] = b"\n"
    content[BIG_EARLY_OFFSET : BIG_EARLY_OFFSET + len(BIG_EARLY_MARKER)] = BIG_EARLY_MARKER.encode()
    content[BIG_LATE_OFFSET : BIG_LATE_OFFSET + len(BIG_LATE_MARKER)] = BIG_LATE_MARKER.encode()
    return bytes(content)


def _server_block(listen: str, locations: str) -> str:
    return f"""
    server {{
        listen {listen};
        server_name localhost;
{locations}
    }}
"""


class NginxServer:
    """One nginx process on a plain HTTP port and an HTTPS port of 127.0.0.1, from a temporary directory.

    `NginxServer(directory=None, *, start_timeout=15)`: without a directory, a temporary one is made and removed
    on `stop()`. `start()`/`stop()` or `with NginxServer() as server:`."""

    basic_auth_user = BASIC_AUTH_USER
    basic_auth_password = BASIC_AUTH_PASSWORD

    def __init__(self, directory: Path | None = None, *, start_timeout: float = 15) -> None:
        self._own_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="healthgate-nginx-")) if directory is None else directory
        self.start_timeout = start_timeout
        self.http_port = 0
        self.https_port = 0
        self.cert_path = self.directory / "server.crt"
        self.key_path = self.directory / "server.key"
        self.config_path = self.directory / "nginx.conf"
        self.error_log_path = self.directory / "error.log"
        self.pid_path = self.directory / "nginx.pid"
        self.big_path = self.directory / "big.bin"
        self.process: subprocess.Popen[bytes] | None = None

    # --- URLs -------------------------------------------------------------------------------------------------
    @property
    def http_base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_base_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def http_url(self, path: str = "/") -> str:
        return self.http_base_url + path

    def https_url(self, path: str = "/") -> str:
        """An HTTPS URL on 127.0.0.1 (the cert names both 127.0.0.1 and localhost: to verify it by name, send
        the name as TLS server name, as tests/test_peers.py does, rather than look it up)."""
        return f"https://127.0.0.1:{self.https_port}{path}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this server's self-signed certificate."""
        return ssl.create_default_context(cafile=str(self.cert_path))

    def error_log(self) -> str:
        try:
            return self.error_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- lifecycle --------------------------------------------------------------------------------------------
    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.directory / "tmp" / name).mkdir(parents=True, exist_ok=True)
        write_self_signed_cert(self.directory, "server")
        self.big_path.write_bytes(_big_file_content())
        (self.directory / "authorised.txt").write_text(AUTHORISED_BODY)
        # {PLAIN} is one of the schemes nginx's auth_basic_user_file understands.
        (self.directory / "htpasswd").write_text(f"{BASIC_AUTH_USER}:{{PLAIN}}{BASIC_AUTH_PASSWORD}\n")

    def _config(self) -> str:
        d = self.directory
        status_locations = "".join(
            f"        location = /status/{code} {{ return {code} /ok; }}\n"
            if code in (301, 302)
            else f"        location = /status/{code} {{ return {code}; }}\n"
            for code in STATUS_CODES
        )
        locations = f"""        default_type text/plain;
        location = /ok {{ return 200 "all good\\n"; }}
        location = /json {{ default_type application/json; return 200 '{JSON_BODY}'; }}
{status_locations}        location = /redirect {{ return 302 /ok; }}
        location = /redirect-chain {{ return 302 /redirect; }}
        location = /redirect-loop {{ return 302 /redirect-loop; }}
        location = /redirect-to-blocked {{ return 302 {BLOCKED_REDIRECT_TARGET}; }}
        location = /gzip {{
            gzip on; gzip_min_length 1; gzip_types text/plain;
            return 200 "compressed and fine\\n";
        }}
        location = /big {{ default_type application/octet-stream; alias {self.big_path}; }}
        # `return` runs before the access phase and would skip auth_basic: serve a file instead.
        location = /basic {{
            auth_basic "{BASIC_AUTH_REALM}";
            auth_basic_user_file {d}/htpasswd;
            alias {d}/authorised.txt;
        }}
        location / {{ return 404; }}
"""
        # As root, workers would switch to `nobody`, which cannot read the 0700 temporary directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""# written by tests/support/nginx.py
{user}worker_processes 1;
error_log {self.error_log_path} info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    server_tokens off;
    absolute_redirect off;
    keepalive_timeout 30s;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    ssl_certificate {self.cert_path};
    ssl_certificate_key {self.key_path};
    ssl_protocols TLSv1.2 TLSv1.3;
{_server_block(f"127.0.0.1:{self.http_port}", locations)}{_server_block(f"127.0.0.1:{self.https_port} ssl", locations)}}}
"""

    def start(self) -> NginxServer:
        binary = find_nginx()
        if binary is None:
            raise RuntimeError("nginx is not installed: run `make test-deps` (apt-get install nginx-light)")
        self._write_files()
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probing and nginx binding it
            self.http_port, self.https_port = _free_port(), _free_port()
            while self.https_port == self.http_port:
                self.https_port = _free_port()
            self.config_path.write_text(self._config())
            self.error_log_path.write_text("")
            if self._launch(binary):
                return self
            last_error = self.error_log()
            if "Address already in use" not in last_error:
                break
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{last_error}")

    def _launch(self, binary: str) -> bool:
        command = [
            binary,
            "-p", f"{self.directory}/",
            "-c", str(self.config_path),
            "-e", str(self.error_log_path),  # the log before the configuration is read (else /var/log/nginx)
            "-g", f"daemon off; pid {self.pid_path};",
        ]  # fmt: skip
        with self.error_log_path.open("ab") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group, so a kill also takes the workers
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if all(_accepts(port) for port in (self.http_port, self.https_port)):
                return True
            time.sleep(0.05)
        self._terminate()
        return False

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGTERM, 5.0)):
            process.send_signal(sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Workers leave when the master does; a SIGKILLed master can leave them behind in its group.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self._terminate()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def nginx() -> Iterator[NginxServer]:
    """A running nginx for the whole session (see `LOCATIONS_DOC`); fails the test if nginx is not installed."""
    if find_nginx() is None:
        pytest.fail("nginx is not installed: run `make test-deps` (apt-get install nginx-light)")
    with NginxServer() as server:
        yield server
