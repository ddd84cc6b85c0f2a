"""Benchmark: the poller's scheduler with 100,000 enabled checks at the default 300 s interval (333 due a second).

Goals (figures, not a pass/fail test): p99 dispatch lateness <= 1 s, and the scheduler's CPU <= 25% of one core.

Set-up: a throwaway database `healthgate_bench_<id>` (migrated; 20,000 hosts x 5 tcp checks, interval 300 s,
check_state rows, check_schedule.next_run_at spread uniformly over the next 300 s; all by COPY) and an exchange
`hgbench-<id>`. The scheduler runs alone in a child process (`scheduler.py --run-scheduler ...`), built as
services/poller/app.py builds it: `services.poller.scheduler.Scheduler` with a real asyncpg pool and
`shared.messaging.Broker`, on uvloop; no worker runs, so no check is executed. This driver consumes the ticks
from the work queue and acks them.

Measured over ~60 s after a warm-up:
- lateness per dispatched check: the time this driver receives its tick minus the check's slot (so it includes
  RabbitMQ's delivery, a little more than the scheduler's own publish-time figure, which is printed too from its
  healthgate_scheduler_lateness_seconds histogram);
- the scheduler's CPU: utime+stime of its process from /proc/<pid>/stat (the driver's consumer is another
  process and is not counted); PostgreSQL's CPU (the bench database's backends plus the server's background
  processes) and RabbitMQ's, from /proc too;
- the scheduler's passes: how long each `dispatch_due` took (claim + publish + commit), early vs late in the
  run (the schedule index gathers dead entries at its low end between vacuums).

    .venv/bin/python bench/scheduler.py [--quick] [--seconds S] [--checks N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    REPO_ROOT,
    BenchRun,
    CpuMeter,
    cleanup_step,
    connected,
    copy_tables,
    default_group,
    failure_note,
    guarded,
    machine_note,
    other_work,
    process_cpu_seconds,
    run_async,
    verdict,
)
from _support import percentile_by_index as percentile

CHECKS = 100_000
CHECKS_PER_HOST = 5
INTERVAL_SECONDS = 300
SECONDS = 60.0
QUICK_SECONDS = 15.0
WARMUP_SECONDS = 5.0
LATENESS_GOAL_SECONDS = 1.0
CPU_GOAL = 0.25
SEED = 20240612
THIS_SCRIPT = str(Path(__file__).resolve())


# ---- the scheduler process (`scheduler.py --run-scheduler DATABASE_URL AMQP_URL EXCHANGE`) ----------------


async def scheduler_process(database_url: str, amqp_url: str, exchange: str) -> dict[str, object]:
    from prometheus_client import CollectorRegistry

    from services.poller.scheduler import Scheduler, SchedulerMetrics
    from shared.database import DatabaseWatch, create_pool
    from shared.messaging import Broker
    from shared.topology import Topology

    # (monotonic start, seconds, claimed, seconds until the first publish, seconds publishing)
    pass_times: list[tuple[float, float, int, float, float]] = []
    publishes: list[tuple[float, float]] = []

    class TimedScheduler(Scheduler):
        """The real scheduler; its passes and publishes are timed around the real methods."""

        async def dispatch_due(self) -> int:
            publishes.clear()
            started = time.monotonic()
            claimed = await super().dispatch_due()
            ended = time.monotonic()
            first = min((start for start, _ in publishes), default=ended)
            last = max((end for _, end in publishes), default=ended)
            pass_times.append((started, ended - started, claimed, first - started, last - first))
            return claimed

        async def _publish(self, tick: object) -> None:
            started = time.monotonic()
            await super()._publish(tick)  # type: ignore[arg-type]
            publishes.append((started, time.monotonic()))

    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    pool = await create_pool(database_url, min_size=0, max_size=10)  # as services/poller/app.py
    broker = Broker(amqp_url, Topology(exchange), connection_name="hg-bench-scheduler")
    await broker.run()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    print(json.dumps({"ready": True}), flush=True)
    database = DatabaseWatch(database_url, pool)
    watching = asyncio.create_task(database.run())
    task = asyncio.create_task(TimedScheduler(pool, broker, metrics, database).run())
    await stopping.wait()
    for running in (task, watching):
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    await broker.close()
    await pool.close()
    buckets = {}
    for sample in registry.collect():
        for item in sample.samples:
            if item.name == "healthgate_scheduler_lateness_seconds_bucket":
                buckets[item.labels["le"]] = item.value
    return {
        "lateness_buckets": buckets,
        "dispatched": registry.get_sample_value("healthgate_scheduler_dispatched_total"),
        "failures": registry.get_sample_value("healthgate_scheduler_failures_total"),
        "passes": pass_times,
    }


def scheduler_main(arguments: list[str]) -> int:
    import uvloop

    print(json.dumps(uvloop.run(scheduler_process(arguments[0], arguments[1], arguments[2]))), flush=True)
    return 0


# ---- set-up ---------------------------------------------------------------------------------------------


async def seed(database_url: str, checks: int) -> None:
    from shared.schema import migrate

    await migrate(database_url)
    rng = random.Random(SEED)
    now = dt.datetime.now(dt.UTC)
    hosts, rows, states, schedule = [], [], [], []
    for number in range((checks + CHECKS_PER_HOST - 1) // CHECKS_PER_HOST):
        host_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        hosts.append((host_id, f"sched-{number:06d}.example.net", "bench"))
        for index in range(min(CHECKS_PER_HOST, checks - number * CHECKS_PER_HOST)):
            check_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            # tcp to a port on 127.0.0.1 that refuses, should anything ever run them
            rows.append((check_id, host_id, f"tcp-{index}", "tcp", INTERVAL_SECONDS, 2.0, 9, "127.0.0.1"))
            states.append((check_id, host_id))
            schedule.append((check_id, now + dt.timedelta(seconds=rng.uniform(0, INTERVAL_SECONDS))))
    check_columns = ["id", "host_id", "name", "check_type", "interval_seconds", "timeout_seconds", "port", "address"]
    async with connected(database_url) as connection:
        await copy_tables(
            connection,
            [
                ("hosts", ["id", "name", "group"], hosts),
                ("health_checks", check_columns, rows),
                ("check_state", ["check_id", "host_id"], states),
                ("check_schedule", ["check_id", "next_run_at"], schedule),
            ],
        )


# ---- measuring --------------------------------------------------------------------------------------------


class TickConsumer:
    """Consumes and acks ticks; records (receive time, lateness) per scheduled run."""

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.samples: list[tuple[float, float]] = []
        self.seen: dict[str, int] = {}
        self.ticks = 0
        self.connection = None

    async def start(self) -> None:
        import aio_pika

        from shared.topology import POLLER_TICK_QUEUE, Topology, declare_topology

        topology = Topology(self.exchange)
        self.connection = await aio_pika.connect(self.amqp_url, client_properties={"connection_name": "hg-bench"})
        channel = await self.connection.channel()
        await declare_topology(channel, topology)
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(
            topology.queue_name(POLLER_TICK_QUEUE), durable=True, arguments=topology.queue_arguments(POLLER_TICK_QUEUE)
        )
        await queue.consume(self._on_tick)

    async def _on_tick(self, message: object) -> None:
        received = time.time()
        body = json.loads(message.body)  # type: ignore[attr-defined]
        self.ticks += 1
        for run in body["runs"]:
            slot = dt.datetime.fromisoformat(run["slot"]).timestamp()
            self.samples.append((received, received - slot))
            self.seen[run["check_id"]] = self.seen.get(run["check_id"], 0) + 1
        await message.ack()  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def bucket_percentile(buckets: dict[str, float], fraction: float) -> str:
    """The bucket bound under which `fraction` of a Prometheus histogram's observations fall."""
    bounds = sorted(((float(bound), count) for bound, count in buckets.items()), key=lambda item: item[0])
    total = bounds[-1][1] if bounds else 0
    for bound, count in bounds:
        if total and count >= fraction * total:
            return f"<= {bound:g} s"
    return "?"


def classify_for(scheduler_pid: int, database: str) -> object:
    backend = re.compile(r"\(\d+\) |\[local\]")

    def classify(pid: int, command: str) -> str | None:
        if pid == scheduler_pid:
            return "scheduler"
        group = default_group(pid, command)
        if group == "postgresql" and backend.search(command) and database not in command:
            return "other"  # another database's backend (a test suite running meanwhile)
        return group

    return classify


async def measure(arguments: argparse.Namespace, run: BenchRun, state: dict[str, object], tmp: Path) -> None:
    database_url, amqp_url = run.database_url, run.amqp_url
    started = time.monotonic()
    await seed(database_url, arguments.checks)
    print(
        f"seeded {arguments.checks:,} enabled tcp checks ({arguments.checks // CHECKS_PER_HOST:,} hosts), interval"
        f" {INTERVAL_SECONDS} s, next runs spread over the next {INTERVAL_SECONDS} s, in"
        f" {time.monotonic() - started:.1f} s: {arguments.checks / INTERVAL_SECONDS:,.0f} due a second"
    )
    consumer = TickConsumer(amqp_url, run.exchange)
    await consumer.start()
    try:
        print(f"before measuring: {other_work()}")
        log = (tmp / "scheduler.log").open("ab")
        process = await asyncio.create_subprocess_exec(
            sys.executable, THIS_SCRIPT, "--run-scheduler", database_url, amqp_url, run.exchange,
            stdout=asyncio.subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
        )  # fmt: skip
        log.close()
        state["process"] = process
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), 30)
        if b"ready" not in ready:
            raise RuntimeError("the scheduler process did not start: " + (tmp / "scheduler.log").read_text())
        print(f"scheduler process {process.pid} started; warming up {arguments.warmup:g} s")
        await asyncio.sleep(arguments.warmup)

        meter = CpuMeter(classify_for(process.pid, run.database))  # type: ignore[arg-type]
        cpu_before = process_cpu_seconds(process.pid) or 0.0
        meter.start()
        window_start = time.time()
        window_started = time.monotonic()
        await asyncio.sleep(arguments.seconds)
        window_end = time.time()
        wall = time.monotonic() - window_started
        cpu_after = process_cpu_seconds(process.pid) or 0.0
        use = meter.stop()

        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        report = json.loads(output.decode().strip().splitlines()[-1])
    finally:
        await consumer.close()

    late = [lateness for received, lateness in consumer.samples if window_start <= received < window_end]
    cpu_share = (cpu_after - cpu_before) / wall
    # The child's time.monotonic() is the same system clock as this process's.
    passes = [item for item in report["passes"] if window_started <= item[0] < window_started + wall]
    window_passes = [item[1] for item in passes]
    first, last = passes[: max(1, len(passes) // 5)], passes[-max(1, len(passes) // 5) :]
    duplicates = sum(1 for count in consumer.seen.values() if count > 1)
    print(
        f"\nmeasured {wall:.1f} s after {arguments.warmup:g} s warm-up: {len(late):,} checks dispatched and received"
        f" ({len(late) / wall:,.0f}/s, expected {arguments.checks / INTERVAL_SECONDS:,.0f}/s);"
        f" {consumer.ticks:,} ticks in all; checks dispatched twice: {duplicates}"
    )
    print(
        f"lateness (tick received by this driver - slot): p50 {percentile(late, 0.5) * 1000:.0f} ms,"
        f" p90 {percentile(late, 0.9) * 1000:.0f} ms, p99 {percentile(late, 0.99) * 1000:.0f} ms,"
        f" max {max(late, default=float('nan')) * 1000:.0f} ms"
    )
    buckets = report["lateness_buckets"]
    print(
        f"scheduler's own histogram (at publish-confirm, whole run incl. start-up catch-up):"
        f" p50 {bucket_percentile(buckets, 0.5)}, p99 {bucket_percentile(buckets, 0.99)};"
        f" dispatched {report['dispatched']:,.0f}, failed passes {report['failures']:.0f}"
    )
    if window_passes:
        print(
            f"scheduler passes in the window: {len(passes):,}, dispatch_due"
            f" p50 {percentile(window_passes, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(window_passes, 0.99) * 1000:.1f} ms; first fifth of the window mean"
            f" {sum(item[1] for item in first) / max(1, len(first)) * 1000:.1f} ms, last fifth"
            f" {sum(item[1] for item in last) / max(1, len(last)) * 1000:.1f} ms;"
            f" mean claimed per pass {sum(item[2] for item in passes) / max(1, len(passes)):.0f}"
        )
        slowest = sorted(passes, key=lambda item: item[1])[-3:]
        print(
            "  slowest passes (total = claim query + publishing with confirms + commit): "
            + "; ".join(
                f"{total * 1000:.0f} ms = {claim * 1000:.0f} + {publish * 1000:.0f}"
                f" + {(total - claim - publish) * 1000:.0f} ms ({claimed} checks)"
                for _, total, claimed, claim, publish in reversed(slowest)
            )
        )
        claims = [item[3] for item in passes]
        publishing = [item[4] for item in passes if item[2]]
        print(
            f"  claim query p50 {percentile(claims, 0.5) * 1000:.1f} ms, p99 {percentile(claims, 0.99) * 1000:.1f} ms;"
            f" publishing a pass's ticks p50 {percentile(publishing, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(publishing, 0.99) * 1000:.1f} ms"
        )
    print(f"scheduler CPU: {cpu_share * 100:.1f}% of one core ({cpu_after - cpu_before:.2f} s in {wall:.1f} s)")
    print(
        f"PostgreSQL CPU (this database's backends + background processes): {use.share('postgresql') * 100:.1f}%"
        f" of one core; RabbitMQ {use.share('rabbitmq') * 100:.1f}%; this driver (consumer)"
        f" {use.share('bench driver') * 100:.1f}%; other processes {use.share('other') * 100:.1f}%"
    )
    p99 = percentile(late, 0.99)
    print("\nGoals:")
    print(
        f"  p99 dispatch lateness {p99 * 1000:.0f} ms <= {LATENESS_GOAL_SECONDS * 1000:.0f} ms:"
        f" {verdict(p99 <= LATENESS_GOAL_SECONDS)}"
    )
    print(
        f"  scheduler CPU {cpu_share * 100:.1f}% <= {CPU_GOAL * 100:.0f}% of one core: {verdict(cpu_share <= CPU_GOAL)}"
    )
    print(f"\nafter measuring: {other_work()}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-scheduler":
        return scheduler_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"measure {QUICK_SECONDS:g} s (a smoke run)")
    parser.add_argument("--seconds", type=float, help=f"seconds measured (default {SECONDS:g})")
    parser.add_argument("--checks", type=int, default=CHECKS, help=f"enabled checks (default {CHECKS:,})")
    arguments = parser.parse_args()
    arguments.seconds = arguments.seconds or (QUICK_SECONDS if arguments.quick else SECONDS)
    arguments.warmup = 3.0 if arguments.quick else WARMUP_SECONDS

    run = BenchRun.new()
    state: dict[str, object] = {}  # "process": the scheduler process, once started
    print(
        f"healthgate scheduler benchmark: {arguments.checks:,} checks every {INTERVAL_SECONDS} s, database"
        f" {run.database}, exchange {run.exchange}, {arguments.seconds:g} s measured"
    )
    print(machine_note())
    with tempfile.TemporaryDirectory(prefix="hgbench-scheduler-") as tmp_name:
        tmp = Path(tmp_name)

        def failed(exc: Exception) -> None:
            print(failure_note(exc), file=sys.stderr)
            with contextlib.suppress(OSError):
                print("scheduler log:\n" + (tmp / "scheduler.log").read_text()[-3000:], file=sys.stderr)

        def clean_up() -> None:
            process = state.get("process")
            if process is not None and process.returncode is None:  # type: ignore[attr-defined]
                cleanup_step("stop the scheduler process", lambda: kill(process.pid))  # type: ignore[attr-defined]
            run.remove()

        with guarded(clean_up, failed) as outcome:
            run_async(measure(arguments, run, state, tmp))
    return outcome.exit_code


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


if __name__ == "__main__":
    sys.exit(main())
