"""Benchmark: the poller's whole path against a bare aiohttp loop and Prometheus' blackbox_exporter.

The path measured: a Tick (50 checks) in on the work queue -> HTTP check of a local nginx -> batch write of
results and check state (COPY, one transaction) with `check.result` rows in the outbox -> ack -> the outbox
relay publishes `check.result`. Completed checks/s are `check.result` events arriving on a queue this
benchmark binds to the exchange (counted by the queue's message count, so counting costs no consumer CPU;
check_results rows are cross-checked at the end).

Beside it, in the same run and against the same nginx:
(a) the same HTTP client (aiohttp, the poller's connector settings, uvloop) in a bare loop in one process, 50
    and 256 concurrent checks, no database or broker; also the poller's own probe code (`Prober.run`) in a bare
    loop, to tell the probe code's cost from the pipeline's;
(b) blackbox_exporter (`http_2xx` module, GET, 2xx, body must match "all good"), driven by
    `wrk -c 50 -t 2 -d 5s`; probes/s count only answers whose body says `probe_success 1` (a wrk Lua script).

Two modes: a new connection per check (the headline: blackbox_exporter makes one per probe, and real checks
hit many hosts minutes apart) against `/ok-close`, where nginx has `keepalive_timeout 0`, used by all three;
and keep-alive against `/ok` (blackbox_exporter 0.23 hard-codes keep-alives off in its http prober, so its
figure there is still one connection per probe; since issue 13 the poller does the same, with force_close, so that
each run reads the certificate the server presents now: its keep-alive figure is one connection per check too).
Goals, new-connection mode: poller >= 1.0x blackbox_exporter,
one poller process >= 0.5x the bare loop. Figures only: it never fails on a goal. Each goal is judged on the median
of alternating rounds (blackbox_exporter then two poller processes; the bare loops then one poller process; 3 rounds
quick, 5 full): on a shared 2-core machine a single pair of measurements swings by half.

Set-up: a throwaway database `healthgate_bench_<id>` (migrated; N hosts with one http check each, seeded
healthy so results flip nothing; schedule rows with next_run_at NULL so the pollers' schedulers dispatch
nothing), exchange `hgbench-<id>`, `healthgate poller` processes (started as the tests start them, on a free
HEALTHGATE_HEALTH_PORT: bench/_support.py `BenchRun.start_service`). This driver publishes the ticks (routing key
poller.tick) and keeps the work queue stocked. Everything is removed at the end, also on error, Ctrl-C or SIGTERM.

The blackbox_exporter harness is bench/_blackbox.py; the py-spy profile summary is bench/_profile.py.

    .venv/bin/python bench/poller.py [--quick] [--py-spy SECONDS] [--keep-profile PATH]

`--py-spy S` (needs `py-spy` on PATH or in .venv/bin: `pip install py-spy`) samples the one-process poller for
S seconds in the new-connection mode and prints where its CPU goes (HTTP check, DB read/write, outbox relay,
AMQP consumption).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _blackbox import Blackbox
from _profile import profile_poller
from _support import (
    CLOSE_PATH,
    EXPECTED_BODY,
    KEEPALIVE_PATH,
    REPO_ROOT,
    STATE_COLUMNS,
    BenchNginx,
    BenchRun,
    CpuMeter,
    CpuUse,
    cleanup_step,
    connected,
    copy_tables,
    default_group,
    failure_note,
    guarded,
    machine_note,
    metric_samples,
    other_work,
    process_tree,
    run_async,
    run_child,
)

from tests.support.processes import ServiceProcess, stop_process

RELAY_STOP_SECONDS = 10

HOSTS = 10_000
TICK_SIZE = 50
READY_TICKS = 64  # ticks kept waiting on the work queue
FEED_PERIOD_SECONDS = 0.02
MODES = {"new-conn": CLOSE_PATH, "keep-alive": KEEPALIVE_PATH}
BARE_CONCURRENCIES = (50, 256)
BLACKBOX_GOAL = 1.0
BARE_GOAL = 0.5
RESULT_QUEUE_SUFFIX = "bench-results"
NOISY_SHARE = 0.25  # CPU of processes not part of the benchmark, in cores, above which a figure is flagged
THIS_SCRIPT = str(Path(__file__).resolve())


@dataclass
class Plan:
    warmup: float
    seconds: float
    bare_seconds: float
    wrk_seconds: int
    rounds: int  # alternating rounds of the bare loops and the one-process poller (`measure_rounds`)


FULL = Plan(warmup=2.0, seconds=5.0, bare_seconds=3.0, wrk_seconds=4, rounds=5)
QUICK = Plan(warmup=1.5, seconds=3.0, bare_seconds=2.0, wrk_seconds=2, rounds=3)


# ---- bare loops (run in a child process: `poller.py --bare-loop KIND URL CONCURRENCY SECONDS`) -----------


async def bare_loop(kind: str, url: str, concurrency: int, seconds: float) -> dict[str, object]:
    import aiohttp

    from services.poller.probes import CheckTarget, Prober
    from shared.blocked_networks import GuardedResolver
    from shared.settings import Settings

    blocked = Settings().blocked_networks
    # The poller's session, as services/poller/app.py builds it.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(blocked), limit=0, ttl_dns_cache=10)
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": "healthgate-poller"},
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )
    prober = Prober(session, blocked, None)
    target = CheckTarget(
        check_id=uuid.uuid4(),
        host_id=uuid.uuid4(),
        check_type="http",
        timeout_seconds=10,
        host_name="bench",
        url=url,
        expected_body=EXPECTED_BODY,
    )
    needle = EXPECTED_BODY.encode()

    async def aiohttp_check() -> str | None:
        async with session.get(url, ssl=False, allow_redirects=False) as response:
            body = await response.content.read(1024 * 1024)
            if response.status != 200 or needle not in body:
                return f"{response.status} {body[:60]!r}"
        return None

    async def prober_check() -> str | None:
        outcome = await prober.run(target)
        return None if outcome.healthy else f"{outcome.reason}: {outcome.detail}"

    check = aiohttp_check if kind == "aiohttp" else prober_check
    counts = {"checks": 0, "errors": 0}
    first_error: list[str] = []
    measuring = False
    stop_at = time.monotonic() + 0.3

    async def loop() -> None:
        while time.monotonic() < stop_at:
            try:
                error = await check()
            except Exception as exc:  # counted, the loop goes on
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                if not first_error:
                    first_error.append(error)
                if measuring:
                    counts["errors"] += 1
            elif measuring:
                counts["checks"] += 1

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))  # warm-up
        measuring = True
        started = time.monotonic()
        cpu_started = time.process_time()
        stop_at = started + seconds
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    finally:
        await session.close()
    return {**counts, "seconds": wall, "cpu": cpu, "first_error": first_error[0] if first_error else ""}


def bare_loop_main(arguments: list[str]) -> int:
    import uvloop

    kind, url, concurrency, seconds = arguments[0], arguments[1], int(arguments[2]), float(arguments[3])
    print(json.dumps(uvloop.run(bare_loop(kind, url, concurrency, seconds))))
    return 0


# ---- an extra outbox relay process (`poller.py --relay DATABASE_URL AMQP_URL EXCHANGE`) -------------------


async def relay_process(database_url: str, amqp_url: str, exchange: str) -> None:
    """shared.outbox.OutboxRelay as it is, alone in a process: what running the relay off the worker's event
    loop would give (an experiment of this benchmark, not a feature of the poller)."""
    from prometheus_client import CollectorRegistry

    from shared.database import create_pool
    from shared.messaging import Broker
    from shared.outbox import OutboxMetrics, OutboxRelay
    from shared.topology import Topology

    pool = await create_pool(database_url, min_size=0, max_size=4)
    broker = Broker(amqp_url, Topology(exchange), connection_name="hg-bench-relay")
    await broker.run()
    await OutboxRelay(pool, broker, OutboxMetrics(CollectorRegistry())).run()


def relay_main(arguments: list[str]) -> int:
    import uvloop

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        uvloop.run(relay_process(arguments[0], arguments[1], arguments[2]))
    return 0


# ---- set-up -------------------------------------------------------------------------------------------


async def seed(database_url: str, hosts: int, url: str) -> list[uuid.UUID]:
    """N hosts with one http check each, all healthy already; schedule rows with next_run_at NULL."""
    from shared.schema import migrate

    await migrate(database_url)
    now = dt.datetime.now(dt.UTC)
    host_rows, check_rows, state_rows, schedule_rows = [], [], [], []
    for number in range(hosts):
        host_id, check_id = uuid.uuid4(), uuid.uuid4()
        host_rows.append((host_id, f"bench-{number:06d}.example.net", "bench", "healthy", 1, 1, now, now))
        check_rows.append(
            (check_id, host_id, "http", "http", True, True, 300, 10.0, 1, 1,
             url, "GET", "2xx", EXPECTED_BODY, True, False, now, now)
        )  # fmt: skip
        state_rows.append((check_id, host_id, "healthy", 0, 1, True, "ok", "status 200 OK", 1.0, now, now))
        schedule_rows.append((check_id, None))
    host_columns = ["id", "name", "group", "health_check_status", "checks_total", "checks_healthy", "created_at",
                    "updated_at"]  # fmt: skip
    check_columns = ["id", "host_id", "name", "check_type", "enabled", "critical", "interval_seconds",
                     "timeout_seconds", "failures_before_unhealthy", "successes_before_healthy", "url", "method",
                     "expected_status", "expected_body", "ignore_cert_errors", "follow_redirects", "created_at",
                     "updated_at"]  # fmt: skip
    async with connected(database_url) as connection:
        await copy_tables(
            connection,
            [
                ("hosts", host_columns, host_rows),
                ("health_checks", check_columns, check_rows),
                ("check_state", STATE_COLUMNS, state_rows),
                ("check_schedule", ["check_id", "next_run_at"], schedule_rows),
            ],
        )
    return [row[0] for row in check_rows]


def start_relay(database_url: str, amqp_url: str, exchange: str, tmp: Path) -> subprocess.Popen[bytes]:
    with (tmp / "relay.log").open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, THIS_SCRIPT, "--relay", database_url, amqp_url, exchange],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    time.sleep(1.5)  # connected and relaying (its first pass drains nothing: the backlog is discarded per phase)
    if process.poll() is not None:
        raise RuntimeError("the relay process exited: " + (tmp / "relay.log").read_text(errors="replace"))
    return process


def summarise_log(poller: ServiceProcess) -> str:
    """Warnings and errors in a poller's JSON log: how many, and the distinct messages."""
    seen: Counter[str] = Counter()
    for line in poller.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            seen[f"(not JSON) {line[:160]}"] += 1
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            seen[f"{entry['level']}: {entry.get('message')} {str(entry.get('error', ''))[:160]}".strip()] += 1
    if not seen:
        return f"poller {poller.process.pid} log: no warnings or errors"
    lines = [f"poller {poller.process.pid} log: {sum(seen.values())} warnings/errors:"]
    lines += [f"  {count} x {message}" for message, count in seen.most_common(6)]
    return "\n".join(lines)


async def poller_metrics(port: int) -> dict[str, float]:
    """The counters this benchmark reads from a poller's /metrics (summed over label sets)."""
    import httpx

    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    wanted: dict[str, float] = {}
    for sample in metric_samples(text):
        key = None
        if sample.name == "healthgate_checks_run_total":
            key = f"checks {sample.labels.get('reason', '?')}"
        elif sample.name == "healthgate_ticks_total":
            key = f"ticks {sample.labels.get('outcome', '?')}"
        elif sample.name == "healthgate_outbox_publish_failures_total":
            key = "outbox publish failures"
        elif sample.name == "healthgate_results_stored_total":
            key = "results stored"
        if key:
            wanted[key] = wanted.get(key, 0.0) + sample.value
    return wanted


# ---- the tick feeder and the result counter -------------------------------------------------------------


class Pipeline:
    """The driver's AMQP side: publishes ticks to keep the work queue stocked, counts check.result events."""

    def __init__(self, amqp_url: str, exchange: str, check_ids: list[uuid.UUID]) -> None:
        from shared.events import ScheduledRun, Tick

        self.amqp_url = amqp_url
        self.exchange_name = exchange
        self.bodies = [
            Tick(runs=[ScheduledRun(check_id=check_id) for check_id in check_ids[start : start + TICK_SIZE]])
            .model_dump_json()
            .encode()
            for start in range(0, len(check_ids), TICK_SIZE)
        ]
        self.next_body = 0
        self.published_ticks = 0
        self.counted_before_purges = 0
        self.feeding = asyncio.Event()
        self.connection = None
        self.channel = None
        self.exchange = None
        self.feeder: asyncio.Task[None] | None = None
        from shared.topology import POLLER_TICK_QUEUE, Topology

        topology = Topology(exchange)
        self.tick_queue = topology.queue_name(POLLER_TICK_QUEUE)
        self.result_queue = f"{exchange}.{RESULT_QUEUE_SUFFIX}"

    async def open(self) -> None:
        import aio_pika

        from shared.topology import Topology, declare_topology

        self.connection = await aio_pika.connect(self.amqp_url, client_properties={"connection_name": "hg-bench"})
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await declare_topology(self.channel, Topology(self.exchange_name))
        queue = await self.channel.declare_queue(self.result_queue, durable=False, exclusive=True)
        await queue.bind(self.exchange, "check.result")
        self.feeder = asyncio.create_task(self._feed())

    async def close(self) -> None:
        if self.feeder is not None:
            self.feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.feeder
        if self.connection is not None:
            await self.connection.close()

    async def _message_count(self, name: str) -> int:
        assert self.channel is not None
        queue = await self.channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count)

    async def results(self) -> int:
        """check.result events counted so far (this run)."""
        return self.counted_before_purges + await self._message_count(self.result_queue)

    async def purge(self) -> None:
        """Empty the result queue (keeps RabbitMQ's memory small); the count carries on."""
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.result_queue, passive=True)
        ok = await queue.purge()
        self.counted_before_purges += int(ok.message_count)

    async def purge_ticks(self) -> None:
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.tick_queue, passive=True)
        await queue.purge()

    async def _feed(self) -> None:
        import aio_pika

        assert self.exchange is not None
        while True:
            await self.feeding.wait()
            ready = await self._message_count(self.tick_queue)
            missing = READY_TICKS - ready
            if missing > 0:
                messages = []
                for _ in range(missing):
                    body = self.bodies[self.next_body]
                    self.next_body = (self.next_body + 1) % len(self.bodies)
                    messages.append(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=f"bench-{self.published_ticks + len(messages)}",
                        )
                    )
                await asyncio.gather(*(self.exchange.publish(message, "poller.tick") for message in messages))
                self.published_ticks += len(messages)
            await asyncio.sleep(FEED_PERIOD_SECONDS)


# ---- measurements -----------------------------------------------------------------------------------------


@dataclass
class Measurement:
    label: str
    mode: str
    rate: float
    cpu: CpuUse | None = None
    notes: list[str] = field(default_factory=list)
    stored: float | None = None  # pollers: results written to the database per second


# Processes this run started, by pid; set by `measure_all`. Other pollers on the machine (a test suite
# running meanwhile) are "other", and so are PostgreSQL backends of other databases.
OWN_PIDS: dict[int, str] = {}
BENCH_DATABASE: list[str] = []
OWN_NGINX: set[int] = set()
BACKEND = re.compile(r"\(\d+\) |\[local\]")


NOT_PART = ("other", "bench driver", "wrk")  # CPU groups that are not part of a contender's cost


def cpu_per_check(cpu: CpuUse, checks: float) -> float:
    """µs of CPU per check in every part of a contender (its processes, nginx, PostgreSQL, RabbitMQ)."""
    used = sum(seconds for group, seconds in cpu.groups.items() if group not in NOT_PART)
    return used / checks * 1e6 if checks else float("nan")


def classify(pid: int, command: str) -> str | None:
    if pid in OWN_PIDS:
        return OWN_PIDS[pid]
    group = default_group(pid, command, OWN_NGINX)
    if group == "postgresql" and BENCH_DATABASE and BACKEND.search(command) and BENCH_DATABASE[0] not in command:
        return "other"  # a backend of another database ("postgres: <cluster>: <user> <database> <client> ...")
    return group


POLLER_GROUPS = ("poller(s)", "extra relay process")
CPU_ORDER = ("poller(s)", "bare loop", "blackbox_exporter", "wrk", "nginx", "postgresql", "rabbitmq", "bench driver")


async def set_check_url(database_url: str, url: str) -> None:
    async with connected(database_url) as connection:
        await connection.execute("UPDATE health_checks SET url = $1", url)


class Outbox:
    """The bench database's outbox, seen from the driver."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.marked_sent = 0

    async def unsent(self) -> int:
        async with connected(self.database_url) as connection:
            return int(await connection.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))

    async def discard_backlog(self) -> None:
        """Mark unsent events sent without publishing them, so that a phase starts with an empty outbox and
        a relay's catch-up on the previous phase's backlog is not counted as this phase's throughput."""
        async with connected(self.database_url) as connection:
            status = await connection.execute("UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL")
            self.marked_sent += int(status.split()[-1])
            # As autovacuum would, in time: the relays' claim query walks the unsent index from its start.
            await connection.execute("VACUUM outbox")


async def measure_pollers(
    pipeline: Pipeline, outbox: Outbox, pollers: list[ServiceProcess], mode: str, plan: Plan, label: str
) -> Measurement:
    await outbox.discard_backlog()
    await pipeline.purge()
    before = [await poller_metrics(poller.port) for poller in pollers]
    pipeline.feeding.set()
    await asyncio.sleep(plan.warmup)
    meter = CpuMeter(classify)
    window_start = [await poller_metrics(poller.port) for poller in pollers]
    unsent_before = await outbox.unsent()
    count_before = await pipeline.results()
    meter.start()
    started = time.monotonic()
    await asyncio.sleep(plan.seconds)
    count_after = await pipeline.results()
    wall = time.monotonic() - started
    cpu = meter.stop()
    window_end = [await poller_metrics(poller.port) for poller in pollers]
    unsent_after = await outbox.unsent()
    pipeline.feeding.clear()
    stored = sum(
        new.get("results stored", 0.0) - old.get("results stored", 0.0)
        for old, new in zip(window_start, window_end, strict=True)
    )
    reasons: Counter[str] = Counter()
    for old, new in zip(before, window_end, strict=True):
        for key, value in new.items():
            if key != "results stored":
                reasons[key] += int(value - old.get(key, 0.0))
    published = count_after - count_before
    measurement = Measurement(label, mode, published / wall, cpu, stored=stored / wall)
    # The contender's own processes (the poller processes with their relays, and the extra relay
    # process when there is one), from /proc, beside the bare loop's and blackbox_exporter's own figures.
    own = sum(cpu.groups.get(group, 0.0) for group in POLLER_GROUPS)
    measurement.notes.append(
        f"CPU per check: {own / max(1, published) * 1e6:,.0f} µs in the poller process(es) incl. relay"
        f" per published result, {own / max(1.0, stored) * 1e6:,.0f} µs per stored result"
    )
    measurement.notes.append(
        f"CPU per check, all parts (pollers, relays, PostgreSQL, RabbitMQ, nginx):"
        f" {cpu_per_check(cpu, count_after - count_before):,.0f} µs per published result,"
        f" {cpu_per_check(cpu, stored):,.0f} µs per stored result"
    )
    measurement.notes.append(
        f"results stored {stored / wall:,.0f}/s (pollers' healthgate_results_stored), check.result published"
        f" {measurement.rate:,.0f}/s; outbox backlog {unsent_before:,} -> {unsent_after:,} unsent"
        f" ({(unsent_after - unsent_before) / wall:+,.0f}/s)"
    )
    measurement.notes.append(
        "poller metrics over warm-up + measurement: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v)
    )
    return measurement


async def run_bare(kind: str, url: str, concurrency: int, seconds: float, mode: str) -> Measurement:
    meter = CpuMeter(classify)
    meter.start()
    status, stdout, stderr = await run_child(
        sys.executable, THIS_SCRIPT, "--bare-loop", kind, url, str(concurrency), str(seconds), cwd=REPO_ROOT
    )
    cpu = meter.stop()
    if status != 0:
        raise RuntimeError(f"bare loop failed: {stderr.decode(errors='replace')[-2000:]}")
    outcome = json.loads(stdout)
    # The child has exited: its own figure (CPU of the measured stretch, without start-up) stands in.
    cpu.groups["bare loop"] = outcome["cpu"] * cpu.wall / outcome["seconds"]
    name = "bare aiohttp loop" if kind == "aiohttp" else "bare Prober.run loop"
    measurement = Measurement(f"{name}, c={concurrency}", mode, outcome["checks"] / outcome["seconds"], cpu)
    measurement.notes.append(
        f"CPU per check: {outcome['cpu'] / max(1, outcome['checks']) * 1e6:.0f} µs in the loop process,"
        f" {cpu_per_check(cpu, measurement.rate * cpu.wall):.0f} µs with nginx's"
    )
    if outcome["errors"]:
        measurement.notes.append(f"{outcome['errors']} failed checks, first: {outcome['first_error']}")
    return measurement


@dataclass
class Round:
    """One alternating round of `measure_rounds`: the reference's rate (the best bare aiohttp loop, or
    blackbox_exporter) and the pollers'."""

    reference: float
    pollers: float

    @property
    def ratio(self) -> float:
        return self.pollers / self.reference


@dataclass
class Rounds:
    """The alternating rounds of one goal: `label` (pollers / reference), the goal's ratio and its rounds."""

    label: str
    goal: float
    rounds: list[Round] = field(default_factory=list)


async def measure_rounds(
    rounds: Rounds,
    reference: Callable[[], Awaitable[float]],
    pipeline: Pipeline,
    outbox: Outbox,
    pollers: list[ServiceProcess],
    plan: Plan,
) -> None:
    """`plan.rounds` rounds, each the reference (`reference()`: its rate) and then `pollers`, new connection per
    check, appended to `rounds`. The machine's 2 cores are shared with other guests: a single pair of measurements
    taken seconds apart gave 0.41x to 0.72x with the same code (one session, CPU steal up to 19 %), so a goal is
    judged on the median of the rounds' ratios."""
    label = f"poller, {len(pollers)} process{'es' if len(pollers) > 1 else ''}"
    for number in range(1, plan.rounds + 1):
        await until_idle(pipeline, pollers)
        reference_rate = await reference()
        measured = await measure_pollers(pipeline, outbox, pollers, "new-conn", plan, label)
        rounds.rounds.append(Round(reference_rate, measured.rate))
        print(
            f"  round {number}: reference {reference_rate:,.0f} checks/s, {label} {measured.rate:,.0f}/s:"
            f" {rounds.rounds[-1].ratio:.2f}x ({measured.notes[0]}; {measured.notes[2]})",
            flush=True,
        )


async def until_idle(pipeline: Pipeline, pollers: list[ServiceProcess], *, limit: float = 30.0) -> None:
    """Empty the work queue and wait until the pollers have finished the ticks they hold (their results stored
    count stays still for half a second; `limit` seconds at most), so that a reference measured next does not share
    the machine with them."""
    await pipeline.purge_ticks()
    deadline = time.monotonic() + limit
    stored = None
    while time.monotonic() < deadline:
        now = sum([(await poller_metrics(poller.port)).get("results stored", 0.0) for poller in pollers])
        if now == stored:
            return
        stored = now
        await asyncio.sleep(0.5)


def print_rounds(all_rounds: list[Rounds]) -> None:
    print("\nAlternating rounds, new-conn (HEADLINE: the goals are judged on the medians):")
    for rounds in all_rounds:
        if not rounds.rounds:
            continue
        ratios = sorted(r.ratio for r in rounds.rounds)
        median = statistics.median(ratios)
        shown = ", ".join(f"{r.ratio:.2f}x" for r in rounds.rounds)
        print(f"  {rounds.label} in each of {len(ratios)} rounds: {shown}")
        print(
            f"    median {median:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}x) (goal >= {rounds.goal:.1f}x):"
            f" {'MET' if median >= rounds.goal else 'NOT MET'}"
        )


async def measure_blackbox(blackbox: Blackbox, url: str, seconds: int, mode: str) -> Measurement:
    probes = await blackbox.measure(url, seconds, classify)
    cpu = probes.cpu
    measurement = Measurement("blackbox_exporter (wrk -c 50 -t 2)", mode, probes.ok / probes.seconds, cpu)
    measurement.notes.append(
        f"CPU per probe: {cpu.groups.get('blackbox_exporter', 0.0) / max(1, probes.ok) * 1e6:.0f} µs in"
        f" blackbox_exporter, {cpu_per_check(cpu, probes.ok):.0f} µs with nginx's (wrk's not counted)"
    )
    if probes.failed:
        measurement.notes.append(f"{probes.failed} probes failed or answered non-200 (not counted)")
    return measurement


# ---- the run ---------------------------------------------------------------------------------------------


def print_results(measurements: list[Measurement]) -> None:
    for mode in MODES:
        print(f"\n{mode} ({'GET ' + MODES[mode]}):")
        print(f"  {'contender':<40} {'checks/s':>9}")
        for m in (m for m in measurements if m.mode == mode):
            print(f"  {m.label:<40} {m.rate:>9,.0f}")
            if m.cpu is not None:
                noisy = m.cpu.share("other")
                flag = f" <- NOISY: other processes took {noisy * 100:.0f}% of a core" if noisy > NOISY_SHARE else ""
                print(f"      {m.cpu.line(CPU_ORDER)}{flag}")
            for note in m.notes:
                print(f"      {note}")


def print_ratios(measurements: list[Measurement]) -> None:
    def pick(mode: str, prefix: str) -> list[Measurement]:
        return [m for m in measurements if m.mode == mode and m.label.startswith(prefix)]

    print("\nRatios (same run; checks/s = check.result events published):")
    for mode in MODES:
        blackbox = pick(mode, "blackbox")
        bare = pick(mode, "bare aiohttp")
        pollers = [m for m in pick(mode, "poller") if "relay" not in m.label]
        one = [m for m in pollers if m.label == "poller, 1 process"]
        experiments = [m for m in pick(mode, "poller") if "relay" in m.label]
        if not (blackbox and bare and one):
            continue
        best_bare = max(bare, key=lambda m: m.rate)
        best_poller = max(pollers, key=lambda m: m.rate)
        ratio_bb = best_poller.rate / blackbox[0].rate
        ratio_bare = one[0].rate / best_bare.rate
        goal = mode == "new-conn"

        def judged(goal_ratio: float, goal: bool = goal) -> str:
            if not goal:
                return "the goals are for the new-connection mode"
            return f"one pair of measurements; the goal >= {goal_ratio:.1f}x is judged on the alternating rounds below"

        print(f"  {mode}:")
        for m in pollers:
            print(f"    {m.label} / blackbox_exporter: {m.rate / blackbox[0].rate:.2f}x")
        print(f"    best poller ({best_poller.label}) / blackbox_exporter: {ratio_bb:.2f}x ({judged(BLACKBOX_GOAL)})")
        print(f"    poller, 1 process / {best_bare.label}: {ratio_bare:.2f}x ({judged(BARE_GOAL)})")
        for m in bare:
            if m is not best_bare:
                print(f"    poller, 1 process / {m.label}: {one[0].rate / m.rate:.2f}x")
        for m in pick(mode, "bare Prober"):
            print(f"    {m.label} / {best_bare.label}: {m.rate / best_bare.rate:.2f}x")
        for m in pollers:
            if m.stored is not None:
                print(
                    f"    (results stored, before the outbox: {m.label} {m.stored:,.0f}/s ="
                    f" {m.stored / blackbox[0].rate:.2f}x blackbox_exporter, {m.stored / best_bare.rate:.2f}x"
                    f" {best_bare.label})"
                )
        for m in experiments:
            print(
                f"    experiment: {m.label} / blackbox_exporter: {m.rate / blackbox[0].rate:.2f}x,"
                f" / {best_bare.label}: {m.rate / best_bare.rate:.2f}x"
            )


async def run(arguments: argparse.Namespace, plan: Plan, tmp: Path, bench: BenchRun, state: dict[str, object]) -> None:
    database_url, amqp_url = bench.database_url, bench.amqp_url
    nginx: BenchNginx = state["nginx"]  # type: ignore[assignment]
    urls = {mode: nginx.http_url(path) for mode, path in MODES.items()}

    started = time.monotonic()
    check_ids = await seed(database_url, arguments.hosts, urls["new-conn"])
    print(f"seeded {len(check_ids)} hosts with one http check each in {time.monotonic() - started:.1f} s")
    pipeline = Pipeline(amqp_url, bench.exchange, check_ids)
    try:
        await pipeline.open()
        await measure_all(arguments, plan, tmp, bench, state, pipeline, urls)
    finally:
        await pipeline.close()


async def measure_all(
    arguments: argparse.Namespace,
    plan: Plan,
    tmp: Path,
    bench: BenchRun,
    state: dict[str, object],
    pipeline: Pipeline,
    urls: dict[str, str],
) -> None:
    database_url, amqp_url = bench.database_url, bench.amqp_url
    pollers: list[ServiceProcess] = []
    BENCH_DATABASE.append(bench.database)
    nginx: BenchNginx = state["nginx"]  # type: ignore[assignment]
    assert nginx.process is not None
    OWN_NGINX.update(process_tree(nginx.process.pid))
    blackbox = Blackbox(tmp)
    state["blackbox"] = blackbox
    blackbox.start()
    await blackbox.wait_ready(urls["new-conn"])
    print(f"before measuring: {other_work()}")
    measurements: list[Measurement] = []

    def done(measurement: Measurement) -> None:
        measurements.append(measurement)
        print(f"  {measurement.mode:<10} {measurement.label:<40} {measurement.rate:>9,.0f} checks/s", flush=True)

    for mode in () if arguments.skip_baselines else ("new-conn", "keep-alive"):
        url = urls[mode]
        for concurrency in BARE_CONCURRENCIES:
            done(await run_bare("aiohttp", url, concurrency, plan.bare_seconds, mode))
        if mode == "new-conn":
            done(await run_bare("prober", url, 256, plan.bare_seconds, mode))
        done(await measure_blackbox(blackbox, url, plan.wrk_seconds, mode))

    profile: list[str] = []
    bare_rounds = Rounds("poller, 1 process / best bare aiohttp loop (c=50 or 256)", BARE_GOAL)
    blackbox_rounds = Rounds("poller, 2 processes / blackbox_exporter", BLACKBOX_GOAL)

    async def best_bare_rate() -> float:
        measured = [
            await run_bare("aiohttp", urls["new-conn"], c, plan.bare_seconds, "new-conn") for c in BARE_CONCURRENCIES
        ]
        return max(m.rate for m in measured)

    async def blackbox_rate() -> float:
        return (await measure_blackbox(blackbox, urls["new-conn"], plan.wrk_seconds, "new-conn")).rate

    outbox = Outbox(database_url)
    # (poller processes, an extra relay process too, mode). The extra relay is an experiment of this benchmark:
    # shared.outbox.OutboxRelay as it is, in a process of its own, beside the pollers' own relays.
    phases = [
        (1, False, "new-conn"), (1, False, "keep-alive"), (1, True, "new-conn"), (1, True, "keep-alive"),
        (2, False, "new-conn"), (2, False, "keep-alive"), (2, True, "new-conn"),
    ]  # fmt: skip
    relay: subprocess.Popen[bytes] | None = None
    for count, with_relay, mode in phases:
        while len(pollers) < count:
            number = len(pollers) + 1
            poller = await asyncio.to_thread(
                bench.start_service, "poller", "HEALTHGATE_HEALTH_PORT", tmp, label=f"poller {number}",
                log_name=f"poller-{number}", HEALTHGATE_KEY_FILE=str(tmp / "key"),
            )  # fmt: skip
            pollers.append(poller)
            OWN_PIDS[poller.process.pid] = "poller(s)"
            print(f"poller process {poller.process.pid} ready (health port {poller.port})")
        if with_relay and relay is None:
            relay = await asyncio.to_thread(start_relay, database_url, amqp_url, bench.exchange, tmp)
            state["relay"] = relay
            OWN_PIDS[relay.pid] = "extra relay process"
        elif relay is not None and not with_relay:
            await asyncio.to_thread(stop_process, relay, timeout=RELAY_STOP_SECONDS)
            relay = None
        label = f"poller, {count} process{'es' if count > 1 else ''}" + (" + relay process" if with_relay else "")
        await set_check_url(database_url, urls[mode])
        done(await measure_pollers(pipeline, outbox, pollers, mode, plan, label))
        if not with_relay and mode == "new-conn" and not arguments.skip_baselines:
            if count == 1:
                print(f"alternating rounds of the bare aiohttp loops and poller, 1 process ({plan.rounds}):")
                await measure_rounds(bare_rounds, best_bare_rate, pipeline, outbox, pollers, plan)
            else:
                print(f"alternating rounds of blackbox_exporter and poller, {count} processes ({plan.rounds}):")
                await measure_rounds(blackbox_rounds, blackbox_rate, pipeline, outbox, pollers, plan)
        if count == 1 and not with_relay and mode == "new-conn" and arguments.py_spy:
            print(f"profiling poller process {pollers[0].process.pid} for {arguments.py_spy:g} s with py-spy")
            pipeline.feeding.set()
            await asyncio.sleep(1.0)
            profile = await profile_poller(pollers[0].process.pid, arguments.py_spy, arguments.keep_profile, tmp)
            pipeline.feeding.clear()

    blackbox.stop()
    await pipeline.purge_ticks()
    await asyncio.sleep(1.0)
    for poller in pollers:
        await asyncio.to_thread(poller.stop)
    if relay is not None:
        await asyncio.to_thread(stop_process, relay, timeout=RELAY_STOP_SECONDS)
    async with connected(database_url) as connection:
        rows = await connection.fetchval("SELECT count(*) FROM check_results")
        unsent = await connection.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    events = await pipeline.results()
    for poller in pollers:
        print(summarise_log(poller))
    print(
        f"\ncross-check: {rows} rows in check_results, {events} check.result events counted, {outbox.marked_sent}"
        f" outbox rows marked sent unpublished between phases by this benchmark, {unsent} unsent at the end;"
        f" {pipeline.published_ticks} ticks ({pipeline.published_ticks * TICK_SIZE} checks) published"
        " (the work queue is purged after each poller phase, so not all of them ran)"
    )

    print_results(measurements)
    print_ratios(measurements)
    print_rounds([bare_rounds, blackbox_rounds])
    if profile:
        print(f"\npy-spy profile of one poller process, new-connection mode, {arguments.py_spy:g} s:")
        print("\n".join(profile))
    print(f"\nafter measuring: {other_work()}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-loop":
        return bare_loop_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        return relay_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (a smoke run)")
    parser.add_argument("--hosts", type=int, default=HOSTS, help=f"hosts (one http check each; default {HOSTS})")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS", help="profile one poller with py-spy")
    parser.add_argument("--keep-profile", type=Path, help="write py-spy's collapsed stacks here")
    parser.add_argument("--skip-baselines", action="store_true", help="measure only the pollers (no ratios)")
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL

    bench = BenchRun.new()
    state: dict[str, object] = {}
    print(
        f"healthgate poller benchmark: {arguments.hosts} http checks, ticks of {TICK_SIZE}, database"
        f" {bench.database}, exchange {bench.exchange}; measurements of {plan.seconds:g} s after"
        f" {plan.warmup:g} s warm-up (pollers), {plan.bare_seconds:g} s (bare loops), {plan.wrk_seconds} s (wrk)"
    )
    print(machine_note())
    with tempfile.TemporaryDirectory(prefix="hgbench-poller-") as tmp_name:
        tmp = Path(tmp_name)
        nginx = BenchNginx()
        state["nginx"] = nginx

        def failed(exc: Exception) -> None:
            print(failure_note(exc), file=sys.stderr)
            bench.print_service_logs()

        def clean_up() -> None:
            # The pollers first (they use nginx, the database and the broker), then the rest; `bench.remove`
            # would stop them too, after the others.
            for label, service in bench.services:
                cleanup_step(f"stop {label} (pid {service.process.pid})", service.stop)
            if "relay" in state:
                relay: subprocess.Popen[bytes] = state["relay"]  # type: ignore[assignment]
                cleanup_step("stop the relay process", lambda: stop_process(relay, timeout=RELAY_STOP_SECONDS))
            if "blackbox" in state:
                cleanup_step("stop blackbox_exporter", state["blackbox"].stop)  # type: ignore[attr-defined]
            cleanup_step("stop nginx", nginx.stop)
            bench.remove(extra_queues=[f"{bench.exchange}.{RESULT_QUEUE_SUFFIX}"])

        with guarded(clean_up, failed) as outcome:
            nginx.start()
            print(f"nginx (1 worker process) {nginx.http_base_url}: new connection per check on {CLOSE_PATH}")
            run_async(run(arguments, plan, tmp, bench, state))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
