"""DNS peers of the poller's dns checks, on 127.0.0.1 only (the machine's resolver is never asked).

`Dnsmasq` runs a real DNS server (dnsmasq, `make test-deps` installs dnsmasq-base) on a free port of 127.0.0.1,
UDP and TCP, knowing only the records below; it reads no /etc/resolv.conf, no /etc/hosts, no configuration file,
and forwards nothing. It answers for the zone `test` with authority (`--auth-zone`, which also gives the zone its
NS record): NXDOMAIN for a name of the zone it does not know, REFUSED for any name outside it.

    with Dnsmasq() as server:
        server.address                      # "127.0.0.1:PORT", a check's dns_server

`UdpSink` is a UDP port that counts what it receives and never answers: a DNS server that is silent, or one that
must be sent nothing.

The records (RECORDS_DOC); answers as `dig +short` prints them:
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

ZONE = "test"
WEB_IPV4 = ("127.0.0.10", "127.0.0.11")
WEB_IPV6 = "2001:db8::10"
MAIL_IPV4 = "127.0.0.25"
IDN_NAME = "bücher.test"  # xn--bcher-kva.test
IDN_IPV4 = "127.0.0.20"
SPF_TEXT = "v=spf1 -all"
SPLIT_STRINGS = ("part one ", "part two")  # one TXT record of two strings: "part one part two"
BIG_STRINGS = tuple(chr(ord("a") + index) * 250 for index in range(6))  # 1,500 bytes: over EDNS's 1,232, so TCP
SRV_NAME = "_sip._tcp.test"

RECORDS_DOC = f"""
web.test            A     {WEB_IPV4[0]}, {WEB_IPV4[1]}
web.test            AAAA  {WEB_IPV6}
web.test            TXT   {SPF_TEXT}
split.test          TXT   {"".join(SPLIT_STRINGS)}   (two strings)
big.test            TXT   six strings of 250 letters (a..f): its answer is truncated over UDP, whole over TCP
alias.test          CNAME web.test.
dangling.test       CNAME gone.test.   (gone.test does not exist)
mail.test           A     {MAIL_IPV4}
test                MX    10 mail.test.
test                NS    ns.test.
{SRV_NAME}      SRV   10 5 5060 sip.test.
{IDN_NAME}         A     {IDN_IPV4}   (as xn--bcher-kva.test)
any other name of test: NXDOMAIN; any name outside test: REFUSED
"""
__doc__ = (__doc__ or "") + RECORDS_DOC

_DNSMASQ_CANDIDATES = ("/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq")


def find_dnsmasq() -> str | None:
    """The dnsmasq binary: on PATH, or in /usr/sbin (not always on PATH)."""
    found = shutil.which("dnsmasq")
    if found:
        return found
    return next((candidate for candidate in _DNSMASQ_CANDIDATES if os.access(candidate, os.X_OK)), None)


def _free_udp_and_tcp_port() -> int:
    """A port of 127.0.0.1 free for both UDP and TCP right now (dnsmasq takes both)."""
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port of 127.0.0.1 free for both UDP and TCP")


def _txt(name: str, strings: tuple[str, ...]) -> str:
    return f"--txt-record={name}," + ",".join(strings)


class Dnsmasq:
    """One dnsmasq process on 127.0.0.1 and a free port, serving RECORDS_DOC. `start()`/`stop()` or a context
    manager; its stderr (with every query logged) is in `log()`."""

    def __init__(self, *, start_timeout: float = 10) -> None:
        self.port = 0
        self.start_timeout = start_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="healthgate-dnsmasq-"))
        self.log_path = self.directory / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The server as a dns check's `dns_server` names it."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # no /etc/dnsmasq.conf, nor the directories it includes
            "--no-resolv", "--no-hosts", "--no-poll",
            "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={self.port}",
            "--pid-file=",  # none
            "--log-facility=-", "--log-queries",
            "--no-ident",  # no CHAOS TXT records about dnsmasq itself
            f"--local=/{ZONE}/",  # never forwarded: dnsmasq has no upstream anyway
            f"--auth-server=ns.{ZONE},127.0.0.1", f"--auth-zone={ZONE}",  # authoritative: NS, NXDOMAIN, REFUSED
            f"--host-record=web.{ZONE},{WEB_IPV4[0]},{WEB_IPV6}",
            f"--host-record=web.{ZONE},{WEB_IPV4[1]}",
            f"--host-record=mail.{ZONE},{MAIL_IPV4}",
            f"--host-record=xn--bcher-kva.{ZONE},{IDN_IPV4}",
            f"--cname=alias.{ZONE},web.{ZONE}",
            f"--cname=dangling.{ZONE},gone.{ZONE}",
            f"--mx-host={ZONE},mail.{ZONE},10",
            _txt(f"web.{ZONE}", (SPF_TEXT,)),
            _txt(f"split.{ZONE}", SPLIT_STRINGS),
            _txt(f"big.{ZONE}", BIG_STRINGS),
            f"--srv-host={SRV_NAME},sip.{ZONE},5060,10,5",
        ]  # fmt: skip

    def _answers(self) -> bool:
        query = dns.message.make_query(f"web.{ZONE}", "A")
        try:
            response = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        return response.rcode() == dns.rcode.NOERROR

    def start(self) -> Dnsmasq:
        binary = find_dnsmasq()
        if binary is None:
            raise RuntimeError("dnsmasq is not installed: run `make test-deps` (apt-get install dnsmasq-base)")
        for _attempt in range(3):  # a free port can be taken between probing and dnsmasq binding it
            self.port = _free_udp_and_tcp_port()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self._command(binary), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.05)
            self._terminate()
            if "Address already in use" not in self.log():
                break
        log_text = self.log()
        self.stop()
        raise RuntimeError(f"dnsmasq did not start:\n{log_text}")

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class UdpSink:
    """A UDP port of 127.0.0.1 that counts the datagrams it receives (`received`) and never answers."""

    def __init__(self) -> None:
        self.received = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.setblocking(False)
        self.port = int(self._socket.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="udp-sink", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        while True:
                            self._socket.recv(65536)
                            self.received += 1
                    except BlockingIOError:
                        pass

    def __enter__(self) -> UdpSink:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in (self._socket, self._wake_r, self._wake_w):
            sock.close()


@pytest.fixture(scope="session")
def dnsmasq() -> Iterator[Dnsmasq]:
    """One dnsmasq for the session (RECORDS_DOC)."""
    with Dnsmasq() as server:
        yield server
