"""Running healthgate services as real processes, the way `healthgate up` does.

Used by the test fixtures (tests/conftest.py) and by the benchmarks (bench/_support.py `BenchRun.start_service`),
so that there is one way of starting a healthgate service and waiting for it to be ready; `start_poller`,
`start_gate` and `exclusive_poller` start the tests' own pollers and gates beside the session's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Send `sig` to a running process and wait up to `timeout` seconds for it to exit, then SIGKILL it;
    returns its exit status (negative: the signal that ended it). A process that has already exited is only
    asked for its status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def stop_processes(
    processes: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 20
) -> list[int]:
    """`stop_process` for several processes at once: `sig` goes to every running one first, then each gets up to
    `timeout` seconds from that moment to exit before it is SIGKILLed (as each would alone, but the waits overlap
    instead of adding up); returns their exit statuses in order."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return [process.returncode for process in processes]


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    base_url: str
    env: dict[str, str]
    port: int

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        return stop_process(self.process, sig, timeout)

    def restart(self, *, until: str = "ready") -> None:
        """Start it again, with the same environment and port, after a stop."""
        self.process = start_service(self.name, self.env, self.log_path, port=self.port, until=until).process


# Sets the soft limit of open files (argv[1]) and becomes the command that follows (exec: the same process).
WITH_OPEN_FILE_LIMIT = (
    "import os, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def start_service(
    name: str,
    env: dict[str, str],
    log_path: Path,
    *,
    port: int,
    ready_timeout: float = 30,
    until: str = "ready",
    open_files: int | None = None,
) -> ServiceProcess:
    """Start `healthgate NAME` (its environment: this process's, then `env`; output appended to `log_path`) and
    wait until its /health/ready on 127.0.0.1:`port` answers 200, or only its /health/live with `until="live"`
    (a service whose database or broker is down is live but not ready). `open_files` starts it with that soft
    limit of open files (a container's or systemd service's 1024, say). Raises RuntimeError with the log when
    it exits first or does not get there within `ready_timeout` seconds; then, and when the wait is interrupted
    (Ctrl-C, a signal turned into an exception), the process is not left running."""
    command = [sys.executable, "-m", "services.cli", name]
    if open_files is not None:
        command = [sys.executable, "-c", WITH_OPEN_FILE_LIMIT, str(open_files), *command]
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    service = ServiceProcess(name, process, log_path, f"http://127.0.0.1:{port}", env, port)
    deadline = time.monotonic() + ready_timeout
    try:
        # One client for every try: httpx loads its CA bundle for each new client (some 30 ms of CPU, taken from
        # the starting service on a busy machine if it were done ten times a second).
        with httpx.Client(timeout=1) as http:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{service.log_text()}")
                try:
                    if http.get(f"{service.base_url}/health/{until}").status_code == 200:
                        return service
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready:\n{service.log_text()}")
    except BaseException:
        service.stop(signal.SIGKILL)
        raise


def start_together(*starts: Callable[[], ServiceProcess]) -> list[ServiceProcess]:
    """Call these (start_service, start_poller, start_gate, with their arguments bound) at the same time, each in a
    thread of its own, and return what they started, in order: services that do not need each other to start wait
    for their readiness side by side instead of one after the other (most of a start is Python importing the
    service, on one core). If one fails, the others are stopped and its error is raised."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
        concurrent.futures.wait(futures)
    errors = [error for future in futures if (error := future.exception()) is not None]
    if errors:
        for future in futures:
            if future.exception() is None:
                future.result().stop(signal.SIGKILL)
        raise errors[0]
    return [future.result() for future in futures]


# The tests' gates retry failing checks every 2 s instead of the default 300 s.
GATE_RETRY_SECONDS = "2"


def start_poller(
    service_env: dict[str, str], log_path: Path, *, open_files: int | None = None, **overrides: str
) -> ServiceProcess:
    """A poller with the session's environment (`service_env`) and `overrides`, on a health port of its own;
    `open_files`: started with that soft limit of open files."""
    port = free_port()
    env = service_env | {"HEALTHGATE_HEALTH_PORT": str(port)} | overrides
    return start_service("poller", env, log_path, port=port, open_files=open_files)


def start_gate(service_env: dict[str, str], log_path: Path, **overrides: str) -> ServiceProcess:
    """A gate with the session's environment, retrying every GATE_RETRY_SECONDS unless `overrides` say otherwise."""
    port = free_port()
    env = service_env | {"HEALTHGATE_HEALTH_PORT": str(port), "HEALTHGATE_GATE_RETRY_SECONDS": GATE_RETRY_SECONDS}
    return start_service("gate", env | overrides, log_path, port=port)


@contextlib.contextmanager
def exclusive_poller(
    session_poller: ServiceProcess, service_env: dict[str, str], log_path: Path, **overrides: str
) -> Iterator[ServiceProcess]:
    """A poller of the test's own (other settings) as the only one running, the session's back after."""
    session_poller.stop()
    try:
        own = start_poller(service_env, log_path, **overrides)
        try:
            yield own
        finally:
            own.stop()
    finally:
        session_poller.restart()
