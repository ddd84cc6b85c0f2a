"""Helpers shared by the benchmark scripts (not a benchmark itself: `make bench` skips bench/_*.py).

- `BenchNginx`: the test suite's nginx (tests/support/nginx.py) plus `/ok-close`, which answers like `/ok` but
  with `keepalive_timeout 0`, so nginx closes every connection after its response: a new connection per check
  for every client, whatever the client's own pooling does.
- Throwaway databases and bench exchanges: names, creation, removal (also after errors and Ctrl-C).
- CPU accounting from /proc: per process group (PostgreSQL, RabbitMQ, nginx, ...) over a measurement.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402

from shared.topology import QUEUES, Topology  # noqa: E402
from tests.support.nginx import OK_BODY, NginxServer  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CLOSE_PATH = "/ok-close"
KEEPALIVE_PATH = "/ok"
EXPECTED_BODY = OK_BODY.strip()  # "all good"
NGINX_WORKER_CONNECTIONS = 4096


def machine_note() -> str:
    return (
        f"machine: {os.cpu_count()} CPU cores shared by everything in this run (the measured process(es),"
        " nginx, PostgreSQL, RabbitMQ and this driver): figures are for this 2-core box, ratios are the point"
    )


def server_urls() -> tuple[str, str]:
    return (
        os.environ.get("HEALTHGATE_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("HEALTHGATE_BENCH_AMQP_URL", DEFAULT_AMQP_URL),
    )


# ---- nginx ------------------------------------------------------------------------------------------


class BenchNginx(NginxServer):
    """The tests' nginx (one worker process, as there) with `/ok-close` added and more worker connections."""

    def _config(self) -> str:
        config = super()._config()
        close_location = (
            f'        location = {CLOSE_PATH} {{ keepalive_timeout 0; return 200 "all good\\n"; }}\n'
            "        location / { return 404; }\n"
        )
        marker = "        location / { return 404; }\n"
        if marker not in config or "events { worker_connections 256; }" not in config:
            raise RuntimeError("tests/support/nginx.py changed its configuration; update bench/_support.py")
        config = config.replace(marker, close_location)
        return config.replace(
            "events { worker_connections 256; }", f"events {{ worker_connections {NGINX_WORKER_CONNECTIONS}; }}"
        )


# ---- databases and exchanges ------------------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def drop_database(server_url: str, name: str) -> None:
    connection = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def delete_topology(amqp_url: str, exchange: str, extra_queues: Iterable[str] = ()) -> None:
    topology = Topology(exchange)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in [*extra_queues, topology.dead_letter_queue, *(topology.queue_name(spec) for spec in QUEUES)]:
            await channel.queue_delete(queue)
        for name in (topology.exchange, topology.dead_letter_exchange):
            await channel.exchange_delete(name)


def run_async(coroutine: Awaitable[object], *, use_uvloop: bool = True) -> object:
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)  # type: ignore[arg-type]
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def cleanup_step(description: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:  # keep cleaning up the rest
        print(f"cleanup: could not {description}: {exc}", file=sys.stderr)


# ---- CPU accounting ---------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(root: int) -> set[int]:
    """`root` and its descendants now (e.g. nginx's master and its workers)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_pid(int(entry))
            if parent is not None:
                parents[int(entry)] = parent
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def snapshot_cpu() -> dict[int, tuple[str, float]]:
    """Every process's (command line, CPU seconds) now."""
    result = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        seconds = process_cpu_seconds(pid)
        if seconds is not None:
            result[pid] = (_command(pid), seconds)
    return result


@dataclass
class CpuUse:
    """CPU seconds per group between two snapshots, over `wall` seconds of wall time."""

    wall: float
    groups: dict[str, float]

    def share(self, group: str) -> float:
        """Cores used on average (1.0 = one core busy all the time)."""
        return self.groups.get(group, 0.0) / self.wall if self.wall > 0 else 0.0

    def line(self, order: Iterable[str] = ()) -> str:
        names = [name for name in order if name in self.groups] + sorted(set(self.groups) - set(order))
        parts = [f"{name} {self.share(name) * 100:.0f}%" for name in names if self.groups[name] > 0.005 * self.wall]
        total = sum(self.groups.values()) / self.wall if self.wall > 0 else 0.0
        return f"CPU (% of one core): {', '.join(parts)}; total {total * 100:.0f}% of {os.cpu_count()} cores"


class CpuMeter:
    """Measures CPU use by group over a stretch of time; `classify(pid, command)` names a process's group."""

    def __init__(self, classify: Callable[[int, str], str | None]) -> None:
        self._classify = classify
        self._before: dict[int, tuple[str, float]] = {}
        self._started = 0.0

    def start(self) -> None:
        self._before = snapshot_cpu()
        self._started = time.monotonic()

    def stop(self) -> CpuUse:
        after = snapshot_cpu()
        wall = time.monotonic() - self._started
        groups: dict[str, float] = {}
        for pid, (command, seconds) in after.items():
            group = self._classify(pid, command)
            if group is None:
                continue
            before = self._before.get(pid)
            used = seconds - (before[1] if before is not None else 0.0)
            groups[group] = groups.get(group, 0.0) + max(0.0, used)
        return CpuUse(wall, groups)


def default_group(pid: int, command: str, own_nginx: set[int] | None = None) -> str | None:
    """PostgreSQL, RabbitMQ, nginx (ours only, when `own_nginx` is given), blackbox_exporter, wrk, this driver;
    everything else is 'other'."""
    if pid == os.getpid():
        return "bench driver"
    if own_nginx is not None and command.startswith("nginx"):
        return "nginx" if pid in own_nginx else "other"
    if command.startswith("postgres") or "/postgres " in command or command.endswith("/postgres"):
        return "postgresql"
    if "beam.smp" in command or "erl_child_setup" in command or "epmd" in command:
        return "rabbitmq"
    if command.startswith("nginx"):
        return "nginx"
    if "blackbox" in command:
        return "blackbox_exporter"
    if command.startswith("wrk"):
        return "wrk"
    return "other"


def other_work(seconds: float = 1.0) -> str:
    """How busy the machine is with work other than the benchmark, sampled while the benchmark is idle."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(value) for value in stat.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        busy_before, total_before = sample()
        time.sleep(seconds)
        busy_after, total_after = sample()
    except (OSError, IndexError, ValueError):
        return "unknown (no /proc/stat)"
    cores = os.cpu_count() or 1
    busy = (busy_after - busy_before) / max(1, total_after - total_before) * cores
    warning = "; expect noise" if busy > 0.15 else ""
    return f"{busy:.2f} of {cores} cores busy with other work{warning}"
