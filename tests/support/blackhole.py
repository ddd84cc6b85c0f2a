"""TCP peers that misbehave on purpose, for timeout and "connection refused" tests. All are context managers
on 127.0.0.1 and hold their port for as long as they are open, so no other test can take it meanwhile.

    with Blackhole() as hole:            # accepts connections, never sends a byte: an HTTP check times out
        hole.port, hole.url("/ok"), hole.accepted
    with refused_port() as port:         # nothing listens: connecting is refused at once (reason `connect`)
        ...
    with unanswered_port() as port:      # connecting itself hangs (SYNs dropped): a tcp check times out
        ...
    with slow_port(0.3) as port:         # connecting succeeds, but only after 0.3 s or more, however late it begins
        ...
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from types import TracebackType


class Blackhole:
    """A listener that accepts every connection and then stays silent, reading and discarding what it is sent,
    until the peer closes or the blackhole stops. `accepted` counts the connections taken.

    Note: a TCP connection to it *opens* (a tcp check is healthy); what never comes is an answer."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def start(self) -> Blackhole:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name="blackhole", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._listener is not None
        connections: list[socket.socket] = []
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    for key, _events in selector.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is self._wake_r:
                            return
                        if sock is self._listener:
                            with contextlib.suppress(BlockingIOError, InterruptedError):
                                connection, _ = sock.accept()
                                connection.setblocking(False)
                                connections.append(connection)
                                selector.register(connection, selectors.EVENT_READ)
                                self.accepted += 1
                            continue
                        try:
                            data = sock.recv(65536)  # swallow the request; never answer
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            selector.unregister(sock)
                            connections.remove(sock)
                            sock.close()
            finally:
                for connection in connections:
                    connection.close()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Blackhole:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def blackhole() -> Iterator[Blackhole]:
    """`with blackhole() as hole:` — the same as `with Blackhole() as hole:`."""
    with Blackhole() as hole:
        yield hole


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port on which nothing listens: connections are refused (RST) at once.

    The port is kept bound but not listening for the duration, so nothing else can start listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


def _listener_with_full_queue(max_fillers: int) -> tuple[socket.socket, list[socket.socket]]:
    """A 127.0.0.1 listener with backlog 0 whose accept queue our own connections fill: Linux then drops further
    SYNs (the client retransmits). Checked before it is handed out; the caller closes both."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(max_fillers):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                return listener, fillers  # the queue is full: connects now hang
            fillers.append(probe)
        raise RuntimeError("could not make connects to a local port hang (accept queue never filled)")
    except BaseException:
        for filler in fillers:
            filler.close()
        listener.close()
        raise


@contextlib.contextmanager
def unanswered_port(max_fillers: int = 8) -> Iterator[int]:
    """A 127.0.0.1 port where a TCP connect neither succeeds nor is refused, it hangs until the client's timeout.

    A listener with backlog 0 that never accepts, with its accept queue filled by our own connections: Linux then
    drops further SYNs (the client retransmits until it gives up). Checked before it is handed out."""
    listener, fillers = _listener_with_full_queue(max_fillers)
    try:
        yield int(listener.getsockname()[1])
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def _listen_overflows() -> int | None:
    """Linux's count of SYNs dropped because an accept queue was full (TcpExt ListenOverflows in /proc/net/netstat,
    per network namespace), or None where it cannot be read."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as netstat:
            lines = netstat.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(counters["ListenOverflows"]) if "ListenOverflows" in counters else None
    return None


@contextlib.contextmanager
def slow_port(opens_after: float = 0.3, max_fillers: int = 8) -> Iterator[int]:
    """A 127.0.0.1 port where a TCP connect succeeds, but slowly: its accept queue stays full until a connect has
    been tried (its SYN dropped) and `opens_after` more seconds have passed; then a thread accepts (and closes)
    everything. The connect completes only with the client's SYN retransmission, about 1 s after it began on Linux,
    so it takes at least `opens_after` (< 1 s) however late the caller connects.

    Where the kernel's ListenOverflows counter cannot be read, the port opens `opens_after` seconds after it is
    handed out: a caller must then connect before that."""
    listener, fillers = _listener_with_full_queue(max_fillers)
    stopping = threading.Event()
    dropped_before = _listen_overflows()

    def drain() -> None:
        # Counting from the first dropped SYN, not from when the port is handed out: a test may take its time
        # (creating checks, a poller's round trip) before anything connects.
        while dropped_before is not None and _listen_overflows() == dropped_before:
            if stopping.wait(0.01):
                return
        if stopping.wait(opens_after):
            return
        listener.settimeout(0.1)
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            connection.close()

    thread = threading.Thread(target=drain, name="slow-port", daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        thread.join(10)
        for filler in fillers:
            filler.close()
        listener.close()
