"""The schemathesis run of tests/test_schemathesis.py, started in the background when the test session starts.

The run takes about a minute, most of it schemathesis generating cases and waiting for answers, one request at a
time: the rest of the session's tests run meanwhile, and the test only collects the outcome. So that neither
side sees the other's rows or messages (every other test empties the session's tables first; the fuzzed hosts
and checks would be in theirs), the run has a database, an exchange, a key file, an api and a poller of its own;
they are stopped and dropped when it ends.

What is run is what the test ran before in the foreground: the same command, hooks and seed, against a real api
with an admin token and a running poller (so /test answers 200 rather than 504); the outcome carries the run's
output, the api's log, and the enabled checks the run left whose targets a poller would look up in DNS (which the
`db` fixture checked after the test when the run used the session's database).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shared.schema import migrate
from shared.tokens import create_token
from tests.support.database import checks_resolving_names, database_name, drop_database, with_database
from tests.support.processes import ServiceProcess, free_port, start_poller, start_service, start_together
from tests.support.services import BackingServices
from tests.support.topology import delete_topology

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ROOT = Path(__file__).resolve().parent.parent.parent
# Targets the API accepts and the poller would look up in DNS are sent as loopback addresses instead.
HOOKS = ROOT / "tests" / "support" / "schemathesis_hooks.py"
# A guard against a hang (the run itself is bounded by --max-time), not a speed goal.
RUN_GUARD_SECONDS = 600


def schemathesis_command(base_url: str, token: str) -> list[str]:
    """The schemathesis command line: every phase, at most 25 examples per operation, 60 s in all."""
    return [
        str(SCHEMATHESIS), "run", f"{base_url}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", "not_a_server_error",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "25",
        "--max-time", "60",
        "--workers", "1",  # hypothesis parses source with ast in each worker thread; Python 3.11 races there (SystemError: AST constructor recursion depth mismatch, CPython gh-106905)
        "--request-timeout", "20",
        "--seed", "20261121",
        "--suppress-health-check", "all",
    ]  # fmt: skip


@dataclass(frozen=True)
class SchemathesisOutcome:
    returncode: int
    output: str  # schemathesis's stdout and stderr
    api_log: str
    leaks: list[str]  # enabled checks left whose targets would be looked up in DNS (checks_resolving_names)


class BackgroundSchemathesis:
    """`start()` runs it all in a thread of its own; `outcome()` waits for it and returns what it found, or raises
    what went wrong on the way (a service that did not start, say)."""

    def __init__(self, backing: BackingServices, service_env: dict[str, str], session_id: str, directory: Path) -> None:
        self.backing = backing
        self.directory = directory
        self.database_url = with_database(backing.database_url, f"healthgate_test_{session_id}_schemathesis")
        self.exchange = f"hgtest-{session_id}-schemathesis"
        self.env = service_env | {
            "HEALTHGATE_DATABASE_URL": self.database_url,
            "HEALTHGATE_EXCHANGE": self.exchange,
            "HEALTHGATE_KEY_FILE": str(directory / "health-check.key"),
            # The fuzzed checks' targets are loopback ports, and other tests run meanwhile with listeners of their
            # own on loopback ports: the run's poller answers every check "blocked" instead of connecting, so that
            # no test's server ("nothing was sent to it") is ever reached. The API's answers are what it tests.
            "HEALTHGATE_BLOCKED_NETWORKS": "0.0.0.0/0,::/0",
        }
        self._thread = threading.Thread(target=self._run, name="schemathesis", daemon=True)
        self._outcome: SchemathesisOutcome | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait until the run has ended and its services are stopped and its database dropped."""
        self._thread.join(RUN_GUARD_SECONDS + 120)
        assert not self._thread.is_alive(), "the schemathesis run did not end"

    def outcome(self) -> SchemathesisOutcome:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def _run(self) -> None:
        try:
            self._outcome = self._run_schemathesis()
        except BaseException as exc:  # raised to the test by outcome()
            self._error = exc

    def _run_schemathesis(self) -> SchemathesisOutcome:
        asyncio.run(migrate(self.database_url))
        services: list[ServiceProcess] = []
        try:
            port = free_port()
            services = start_together(
                lambda: start_service(
                    "api", self.env | {"HEALTHGATE_API_PORT": str(port)}, self.directory / "api.log", port=port
                ),
                lambda: start_poller(self.env, self.directory / "poller.log"),
            )
            api = services[0]
            token = asyncio.run(self._admin_token())
            run = subprocess.run(
                schemathesis_command(api.base_url, token),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                env=os.environ
                | {
                    "SCHEMATHESIS_HOOKS": str(HOOKS),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                },
                timeout=RUN_GUARD_SECONDS,
            )
            leaks = asyncio.run(self._leaks())
            return SchemathesisOutcome(run.returncode, run.stdout.decode(errors="replace"), api.log_text(), leaks)
        finally:
            for service in services:
                service.stop()
            asyncio.run(self._drop())

    async def _admin_token(self) -> str:
        connection = await asyncpg.connect(self.database_url)
        try:
            return await create_token(connection, name="schemathesis", role="admin", groups=(), actor="test")
        finally:
            await connection.close()

    async def _leaks(self) -> list[str]:
        connection = await asyncpg.connect(self.database_url)
        try:
            return await checks_resolving_names(connection)
        finally:
            await connection.close()

    async def _drop(self) -> None:
        await drop_database(with_database(self.backing.database_url, "postgres"), database_name(self.database_url))
        await delete_topology(self.backing.amqp_url, self.exchange)
