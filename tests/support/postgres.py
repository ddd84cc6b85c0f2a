"""A PostgreSQL cluster of the test's own, on a port of its own, that a test may stop and start.

The machine's shared PostgreSQL (127.0.0.1:5432) serves every test session at once and must never be
stopped by a test. `PostgresCluster` runs `initdb` into a temporary directory and `pg_ctl` on a free
port, with trust authentication and fsync off (a test cluster never outlives the machine's page cache). PostgreSQL
refuses to run as root, so when the tests run as root (CI does) the binaries run as the `postgres`
user, in a directory it owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import free_port

POSTGRES_BIN = Path(os.environ.get("HEALTHGATE_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


def postgres_available() -> bool:
    return (POSTGRES_BIN / "initdb").exists() and (POSTGRES_BIN / "pg_ctl").exists()


class PostgresCluster:
    """`url`: a server-level DSN (database `postgres`); `stop()` stops it as a crash would (immediate
    mode: no checkpoint, every connection cut), `start()` brings it back on the same port."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        self._frozen: list[int] = []
        if self._as_postgres:
            shutil.chown(base, "postgres", "postgres")

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120, cwd=self.base)

    def init(self) -> None:
        self._run(
            str(POSTGRES_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
            "--no-instructions", "-E", "UTF8", "--locale", "C",
        )  # fmt: skip

    def start(self) -> None:
        # fsync off: only the process is ever stopped here, never the machine, so the OS keeps what was
        # written. synchronous_commit stays on: an immediate stop must not lose a committed transaction.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run(
            str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.base / "server.log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def freeze(self) -> None:
        """Stop every process of the cluster with SIGSTOP: the server keeps its connections and port
        but answers nothing, as a hung database or one cut off by the network looks to its clients."""
        self._frozen = self._processes()
        for pid in self._frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Undo `freeze` (SIGCONT); a no-op if it is not frozen."""
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    def _processes(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True, timeout=30)
        return [postmaster, *(int(pid) for pid in children.stdout.split())]

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def ensure_running(self) -> None:
        self.thaw()
        if not self.running():
            self.start()

    def database_url(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + database


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started cluster of the test's own, stopped and deleted at the end."""
    base = Path(tempfile.mkdtemp(prefix="hg-postgres-"))
    cluster = PostgresCluster(base)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            with contextlib.suppress(subprocess.SubprocessError):
                cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
