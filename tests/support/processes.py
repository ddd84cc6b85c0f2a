"""Running healthgate services as real processes, the way `healthgate up` does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def restart(self, *, until: str = "ready") -> None:
        """Start it again, with the same environment and port, after a stop."""
        self.process = start_service(self.name, self.env, self.log_path, port=self.port, until=until).process


def start_service(
    name: str, env: dict[str, str], log_path: Path, *, port: int, ready_timeout: float = 30, until: str = "ready"
) -> ServiceProcess:
    """Start `healthgate NAME` and wait until its /health/ready answers 200, or only its /health/live with
    `until="live"` (a service whose database or broker is down is live but not ready)."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", name],
        env={**os.environ, **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    service = ServiceProcess(name, process, log_path, f"http://127.0.0.1:{port}", env, port)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{service.log_text()}")
        try:
            if httpx.get(f"{service.base_url}/health/{until}", timeout=1).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    service.stop(signal.SIGKILL)
    raise RuntimeError(f"{name} did not become ready:\n{service.log_text()}")
