"""A RabbitMQ node of the test's own, on ports of its own, that a test may stop, restart or kill.

The machine's shared broker (127.0.0.1:5672) serves every test session at once and must never be
restarted by a test. `RabbitNode` starts `rabbitmq-server` with its own node name, AMQP and
distribution ports, data, log and pid files under a temporary directory, a configuration file of its
own (the system's `/etc/rabbitmq` files name the shared node's port) and no plugins (no management
listener). Its own `HOME` gives it, and the `rabbitmqctl` calls that talk to it, an Erlang cookie of
their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_SECONDS = 90


def rabbitmq_available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and (RABBITMQ_BIN / "rabbitmqctl").exists()


class RabbitNode:
    """One RabbitMQ node: `amqp_url` to reach it; `stop_app`/`start_app` (the node stays up, the
    broker inside stops: clients see the connection closed by the server), `kill` and `start` (the
    whole node, as a crash and a reboot would)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"hgtest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        (base / "home").mkdir()
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            # The test machine's disk may be fuller than RabbitMQ's default 50 MB free limit allows for.
            "disk_free_limit.absolute = 1MB\n"
        )
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self._server: subprocess.Popen[bytes] | None = None
        self._app_stopped = False

    def ctl(self, *arguments: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *arguments],
            env=self.env, check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip

    def start(self) -> None:
        """Start the node (again, after `kill`) and wait until it accepts connections."""
        log = (self.base / "server.log").open("ab")
        self._server = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                self.ctl("await_startup", "--timeout", "5", timeout=30)
                return
            except subprocess.SubprocessError:
                if self._server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ node {self.name} did not start: {self.server_log()}") from None
                time.sleep(0.5)

    def stop_app(self) -> None:
        self._app_stopped = True
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup")
        self._app_stopped = False

    def ensure_running(self) -> None:
        """Bring the node back as it was, whatever a test did to it."""
        if self._server is None or self._server.poll() is not None:
            self._app_stopped = False
            self.start()
        elif self._app_stopped:
            self.start_app()

    def kill(self) -> None:
        """SIGKILL the whole node, as a crash would: no connection is closed politely."""
        if self._server is not None and self._server.poll() is None:
            os.killpg(self._server.pid, signal.SIGKILL)
            self._server.wait(30)

    def stop(self) -> None:
        if self._server is None or self._server.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60)
            self._server.wait(60)
        except subprocess.SubprocessError:
            self.kill()

    def server_log(self) -> str:
        logs = [self.base / "server.log", *sorted((self.base / "log").glob("*.log"))]
        return "\n".join(path.read_text(errors="replace")[-4000:] for path in logs if path.exists())


@contextlib.contextmanager
def rabbit_node() -> Iterator[RabbitNode]:
    """A started node of the test's own, stopped and deleted at the end."""
    base = Path(tempfile.mkdtemp(prefix="hg-rabbit-"))
    node = RabbitNode(base)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
