"""Helpers shared by the benchmark scripts (not a benchmark itself: `make bench` skips bench/_*.py).

- `BenchNginx`: the test suite's nginx (tests/support/nginx.py) plus `/ok-close`, which answers like `/ok` but
  with `keepalive_timeout 0`, so nginx closes every connection after its response: a new connection per check
  for every client, whatever the client's own pooling does.
- A run's throwaways (`BenchRun`): database and exchange names, the services started on them, their removal;
  `guarded` runs a benchmark so that the removal happens also after errors, Ctrl-C and SIGTERM.
  `BenchRun.start_service` starts a healthgate service with the tests' helper (tests/support/processes.py).
- Seeding: COPY of rows into tables (`copy_tables`), the check_state columns.
- Figures: percentiles, MET/NOT MET, load and "other work" on the machine, a service's /metrics samples.
- CPU accounting from /proc: per process group (PostgreSQL, RabbitMQ, nginx, ...) over a measurement.
- `find_binary`: a program the benchmarks drive (wrk, blackbox_exporter, py-spy), on PATH or at a known path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.samples import Sample  # noqa: E402

from shared.topology import QUEUES, Topology  # noqa: E402
from tests.support.nginx import OK_BODY, NginxServer  # noqa: E402
from tests.support.processes import ServiceProcess, free_port  # noqa: E402
from tests.support.processes import start_service as _start_service  # noqa: E402

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


def find_binary(name: str, *candidates: str) -> str | None:
    """`name` on PATH, else the first of `candidates` (paths) that is executable; None if there is none."""
    return shutil.which(name) or next((path for path in candidates if os.access(path, os.X_OK)), None)


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


# ---- a run: its throwaways, interruptions, clean-up -------------------------------------------------


@dataclass
class BenchRun:
    """One run's throwaways: the database `healthgate_bench_<id>` on HEALTHGATE_BENCH_DATABASE_URL's server, the
    exchange `hgbench-<id>` on HEALTHGATE_BENCH_AMQP_URL, and the services started on them (`remove` stops them)."""

    server_url: str
    amqp_url: str
    run_id: str
    services: list[tuple[str, ServiceProcess]] = field(default_factory=list)  # (label, process)

    @classmethod
    def new(cls) -> BenchRun:
        server_url, amqp_url = server_urls()
        return cls(server_url, amqp_url, uuid.uuid4().hex[:10])

    @property
    def database(self) -> str:
        return f"healthgate_bench_{self.run_id}"

    @property
    def exchange(self) -> str:
        return f"hgbench-{self.run_id}"

    @property
    def database_url(self) -> str:
        return with_database(self.server_url, self.database)

    def service_env(self, **settings: str) -> dict[str, str]:
        """A healthgate service's environment: this run's database and exchange, JSON logs, then `settings`."""
        return {
            "HEALTHGATE_DATABASE_URL": self.database_url,
            "HEALTHGATE_AMQP_URL": self.amqp_url,
            "HEALTHGATE_EXCHANGE": self.exchange,
            "HEALTHGATE_LOG_FORMAT": "json",
            **settings,
        }

    def start_service(
        self,
        name: str,
        port_setting: str,
        tmp: Path,
        *,
        label: str | None = None,
        log_name: str | None = None,
        **settings: str,
    ) -> ServiceProcess:
        """`healthgate NAME` on a free port (the setting `port_setting` gives it), logging to TMP/LOG_NAME.log
        (default NAME.log); returns once its /health/ready answers (tests/support/processes.py `start_service`:
        RuntimeError with the log when it exits or is not ready in 30 s). `label` (default NAME) names it in
        clean-up and log messages; `remove` stops it."""
        port = free_port()
        env = self.service_env(**{port_setting: str(port)}, **settings)
        service = _start_service(name, env, tmp / f"{log_name or name}.log", port=port)
        self.services.append((label or name, service))
        return service

    def start_api(self, tmp: Path) -> ServiceProcess:
        return self.start_service(
            "api",
            "HEALTHGATE_API_PORT",
            tmp,
            label="API",
            HEALTHGATE_API_HOST="127.0.0.1",
            HEALTHGATE_KEY_FILE=str(tmp / "key"),
        )

    def print_service_logs(self) -> None:
        for label, service in self.services:
            print(f"{label} log (last 3,000 characters):\n" + service.log_text()[-3000:], file=sys.stderr)

    def remove(self, extra_queues: Iterable[str] = (), retry_seconds: float = 0.0) -> None:
        """Stop the services, drop the database, delete the exchange and its queues (and `extra_queues`);
        `retry_seconds`: how long to keep trying while a server is unreachable."""
        for label, service in self.services:
            cleanup_step(f"stop the {label}", service.stop)
        remove_database(self.server_url, self.database, retry_seconds)
        remove_exchange(self.amqp_url, self.exchange, extra_queues, retry_seconds)


@dataclass
class Outcome:
    """A benchmark's exit status: 0 when its body ended, 130 when interrupted (an exception goes on up)."""

    exit_code: int = 1


@contextlib.contextmanager
def guarded(
    cleanup: Callable[[], object], on_failure: Callable[[Exception], object] | None = None
) -> Iterator[Outcome]:
    """Runs a benchmark's body with SIGTERM taken as Ctrl-C. Interrupted: a note, exit code 130. An exception:
    `on_failure(exc)` (e.g. print a log), then it goes on up. In every case SIGINT and SIGTERM are then ignored
    and `cleanup()` runs, so that a second Ctrl-C cannot leave throwaways behind."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    outcome = Outcome()
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield outcome
        outcome.exit_code = 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        outcome.exit_code = 130
    except Exception as exc:
        if on_failure is not None:
            on_failure(exc)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()


def failure_note(exc: BaseException) -> str:
    return (
        f"\nbenchmark failed: {exc!r}\n(if RabbitMQ or PostgreSQL restarted meanwhile, e.g. for a test suite"
        " running on the same machine, run the benchmark again)"
    )


def run_async(coroutine: Awaitable[object], *, use_uvloop: bool = True) -> object:
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)  # type: ignore[arg-type]
    return asyncio.run(coroutine)  # type: ignore[arg-type]


async def run_child(*command: str, merge_stderr: bool = False, cwd: Path | None = None) -> tuple[int, bytes, bytes]:
    """Run a program (wrk, py-spy, a bare-loop child) to its end: (exit status, stdout, stderr); with
    `merge_stderr` its stderr goes into stdout and the third item is empty. When the wait is cancelled or
    interrupted (Ctrl-C, SIGTERM), the program is killed rather than left running."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        stdout, stderr = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    assert process.returncode is not None  # communicate() returns once the process has exited
    return process.returncode, stdout, stderr or b""


def cleanup_step(description: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:  # keep cleaning up the rest
        print(f"cleanup: could not {description}: {exc}", file=sys.stderr)


async def _retrying(action: Callable[[], Awaitable[object]], seconds: float) -> None:
    """`action()`, tried again every 2 s for up to `seconds` while its server is unreachable (e.g. the test
    suite restarting RabbitMQ); with 0 s, once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await action()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            print("cleanup: server unreachable, trying again in 2 s", file=sys.stderr)
            await asyncio.sleep(2)


def remove_database(server_url: str, name: str, retry_seconds: float = 0.0) -> None:
    """Drop a throwaway database as a clean-up step (a failure is printed, not raised)."""
    cleanup_step(
        f"drop database {name}", lambda: run_async(_retrying(lambda: drop_database(server_url, name), retry_seconds))
    )


def remove_exchange(amqp_url: str, exchange: str, extra_queues: Iterable[str] = (), retry_seconds: float = 0.0) -> None:
    """Delete a bench exchange and its queues as a clean-up step (a failure is printed, not raised)."""
    cleanup_step(
        f"delete exchange {exchange}",
        lambda: run_async(_retrying(lambda: delete_topology(amqp_url, exchange, extra_queues), retry_seconds)),
    )


# ---- databases and exchanges ------------------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@contextlib.asynccontextmanager
async def connected(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def drop_database(server_url: str, name: str) -> None:
    async with connected(with_database(server_url, "postgres")) as connection:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def delete_topology(amqp_url: str, exchange: str, extra_queues: Iterable[str] = ()) -> None:
    topology = Topology(exchange)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in [*extra_queues, topology.dead_letter_queue, *(topology.queue_name(spec) for spec in QUEUES)]:
            await channel.queue_delete(queue)
        for name in (topology.exchange, topology.dead_letter_exchange, topology.requeue_exchange):
            await channel.exchange_delete(name)


# ---- seeding ----------------------------------------------------------------------------------------

STATE_COLUMNS = (
    "check_id",
    "host_id",
    "status",
    "consecutive_failures",
    "consecutive_successes",
    "last_healthy",
    "last_reason",
    "last_detail",
    "last_latency_ms",
    "last_checked_at",
    "status_changed_at",
)


async def copy_tables(
    connection: asyncpg.Connection,
    tables: Sequence[tuple[str, Sequence[str], Sequence[tuple[object, ...]]]],
    *,
    analyze: bool = True,
) -> None:
    """COPY each (table, columns, records) in one transaction (a savepoint inside the caller's); then, unless
    `analyze` is false, VACUUM (ANALYZE) the tables, so that they have statistics as settled tables do."""
    async with connection.transaction():
        for table, columns, records in tables:
            await connection.copy_records_to_table(table, records=records, columns=columns)
    if analyze:
        await connection.execute(f"VACUUM (ANALYZE) {', '.join(table for table, _, _ in tables)}")


# ---- figures ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN without values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def percentile_by_index(values: Sequence[float], fraction: float) -> float:
    """The value at index int(fraction * n) of the sorted values (at some sizes one rank above `percentile`);
    NaN without values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values: Sequence[float], digits: int = 2, gap: str = " ") -> str:
    """p50, p99, max (ms) and count of latencies in ms, with `digits` decimals and `gap` between the parts."""
    if not values:
        return "no samples"
    return (
        f"p50 {percentile(values, 0.5):.{digits}f}{gap}p99 {percentile(values, 0.99):.{digits}f}"
        f"{gap}max {max(values):.{digits}f} ms{gap}(n={len(values)})"
    )


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def other_work(seconds: float = 1.0, noisy: str = "; expect noise") -> str:
    """How busy the machine is with work other than the benchmark, sampled while the benchmark is idle;
    `noisy` is added when that is more than 0.15 cores."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(value) for value in stat.readline().split()[1:]]
        idle = values[3] + values[4]  # idle, iowait
        return sum(values[:8]) - idle, sum(values[:8])

    try:
        busy_before, total_before = sample()
        time.sleep(seconds)
        busy_after, total_after = sample()
    except (OSError, IndexError, ValueError):
        return "unknown (no /proc/stat)"
    cores = os.cpu_count() or 1
    busy = (busy_after - busy_before) / max(1, total_after - total_before) * cores
    warning = noisy if busy > 0.15 else ""
    return f"{busy:.2f} of {cores} cores busy with other work{warning}"


def metric_samples(text: str) -> Iterator[Sample]:
    """The samples of a service's /metrics page (Prometheus text format, parsed by prometheus_client's own
    parser): name with its suffix (`_total`, `_bucket`, `_sum`, `_count`, `_created`), labels (strings as
    written, e.g. le="+Inf"), value. ValueError for text that is not that format."""
    for family in text_string_to_metric_families(text):
        yield from family.samples


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
