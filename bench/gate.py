"""Benchmark: the gate's decision latency and its memory with many jobs waiting (issue 4, "Speed").

(a) `job.start` -> `job.released` for hosts whose gating checks are healthy and fresh, 200 jobs/s offered
    open loop (published on a fixed schedule, never waiting for answers): p50/p99/max from the publish to
    the receipt of `job.released`, matched by job_id. Goal p99 <= 25 ms. Beside it, the CPU time per release of
    the gate, PostgreSQL and RabbitMQ, from the processes' own CPU time (/proc: stable on a shared machine, where
    latencies are not). Since issue 16 a healthy host's job.start is released on the fast path (two round trips:
    shared/jobs.py `record_start` and `decide_fast`); its breakdown reads the database's timestamps accordingly.
(b) A waiting job whose last failing check turns healthy: the check's state is updated the way the poller
    writes it (check_state in a transaction), then a `check.result` CloudEvent is published (routing key
    check.result); measured from that publish to the receipt of `job.released`. Goal p99 <= 500 ms. (The real
    poller publishes check.result through its outbox, after its commit: add its relay's delay to these figures.)
(c) Memory: the gate's RSS (VmRSS from /proc/<pid>/status) with 100 jobs waiting and with 10,000 waiting (every
    one announced: gate_jobs.waiting_announced). The retry interval is an hour, so no retry runs while the jobs
    pile up; then every waiting job's retry is made due at once (one retry sweep of 10,000 jobs) and the RSS is
    read again. "Flat" is read here as RSS(10,000) <= 1.10 x RSS(100).

(a) and (b) run in several short interleaved rounds, so load from other work hits both alike.

Set-up: a throwaway database `healthgate_bench_<id>` (migrated; hosts, tcp checks and their check_state
inserted with SQL), an exchange `hgbench-<id>`, ONE `healthgate gate` process, and a queue of this driver's
own bound to `job.*`. The latency breakdown comes from the database's own timestamps (gate_jobs.received_at
and decided_at, outbox.created_at and sent_at) against this driver's wall clock: same machine, same clock.
Everything is removed at the end, also on error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/gate.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aio_pika
import asyncpg
import httpx
from _support import (
    REPO_ROOT,
    STATE_COLUMNS,
    BenchRun,
    CpuMeter,
    connected,
    copy_tables,
    default_group,
    guarded,
    load_line,
    machine_note,
    metric_samples,
    other_work,
    percentile,
    run_async,
    verdict,
)
from _support import spread as _spread

from shared.events import CLOUDEVENTS_CONTENT_TYPE, CheckResult, encode_cloudevent
from shared.schema import migrate
from shared.topology import Topology, declare_exchange
from tests.support.processes import ServiceProcess

RELEASE_P99_GOAL_MS = 25.0
RECOVERY_P99_GOAL_MS = 500.0
MEMORY_FLAT_RATIO = 1.10
OFFERED_RATE = 200.0  # job.start per second, (a)
RECOVERY_RATE = 20.0  # recovering checks per second, (b)
RETRY_SECONDS = 3600  # the gate's retry interval: no retry fires while the benchmark runs (but see the sweep)
WINDOW = dt.timedelta(hours=2)
FRESH_HOSTS = 100
FRESH_CHECKS_PER_HOST = 2
DECISIONS = ("job.released", "job.failed", "job.cancelled")


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds_per_round: float  # (a)
    recoveries: int  # (b), over all rounds
    memory_jobs: int  # (c)


FULL = Plan(rounds=3, seconds_per_round=5.0, recoveries=210, memory_jobs=10_000)
QUICK = Plan(rounds=1, seconds_per_round=4.0, recoveries=60, memory_jobs=2_000)


# ---- figures ----------------------------------------------------------------------------------------------


spread: Callable[[Sequence[float]], str] = partial(_spread, digits=1, gap="  ")


def rss_kib(pid: int) -> dict[str, int]:
    figures = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon"):
                figures[name] = int(value.split()[0])
    return figures


HANDLING = "healthgate_gate_handling_seconds"


def gate_handling(base_url: str, routing_key: str) -> dict[str, float]:
    """The gate's own handling histogram for one routing key: {'sum':, 'count':, 'le=<bound>': cumulative}."""
    text = httpx.get(base_url + "/metrics", timeout=5).text
    figures: dict[str, float] = {}
    for sample in metric_samples(text):
        if sample.labels.get("routing_key") != routing_key:
            continue
        if sample.name == HANDLING + "_bucket":
            figures[f"le={sample.labels.get('le', '?')}"] = sample.value
        elif sample.name in (HANDLING + "_sum", HANDLING + "_count"):
            figures[sample.name.removeprefix(HANDLING + "_")] = sample.value
    return figures


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def histogram_sum(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    return {key: first.get(key, 0.0) + second.get(key, 0.0) for key in first.keys() | second.keys()}


def handling_line(delta: dict[str, float]) -> str:
    count = delta.get("count", 0)
    if count <= 0:
        return "no job.start handled"
    mean = delta.get("sum", 0) / count * 1000
    bounds = sorted(
        (float(key[3:]), value) for key, value in delta.items() if key.startswith("le=") and key != "le=+Inf"
    )
    p99_bound = next((bound for bound, cumulative in bounds if cumulative >= 0.99 * count), float("inf"))
    return f"mean {mean:.2f} ms, p99 <= {p99_bound * 1000:g} ms (its bucket bound), n={count:.0f}"


# ---- seeding ----------------------------------------------------------------------------------------------


@dataclass
class Seeded:
    fresh_hosts: list[uuid.UUID]
    recovering: list[tuple[uuid.UUID, uuid.UUID]]  # (host, its single gating check), unhealthy
    memory_hosts: list[uuid.UUID]


async def seed(database_url: str, plan: Plan) -> Seeded:
    """Hosts and tcp checks (port set, as the per-type CHECK wants) with their state, inserted with COPY."""
    now = dt.datetime.now(dt.UTC)
    hosts: list[tuple[object, ...]] = []
    checks: list[tuple[object, ...]] = []
    states: list[tuple[object, ...]] = []

    def add_host(prefix: str, index: int, check_count: int, healthy: bool) -> tuple[uuid.UUID, list[uuid.UUID]]:
        host_id = uuid.uuid4()
        hosts.append((host_id, f"{prefix}-{index:05d}.bench.example.net", f"bench-{prefix}"))
        check_ids = []
        for number in range(check_count):
            check_id = uuid.uuid4()
            check_ids.append(check_id)
            checks.append((check_id, host_id, f"tcp-{number}", "tcp", True, True, 86400, 5.0, 22 + number))
            states.append(
                (check_id, host_id, "healthy" if healthy else "unhealthy", 0 if healthy else 3, 5 if healthy else 0,
                 healthy, "ok" if healthy else "connect", "connected" if healthy else "connection refused",
                 1.2, now, now)
            )  # fmt: skip
        return host_id, check_ids

    fresh = [add_host("fresh", index, FRESH_CHECKS_PER_HOST, True)[0] for index in range(FRESH_HOSTS)]
    recovering = []
    for index in range(plan.recoveries):
        host_id, (check_id,) = add_host("recover", index, 1, False)
        recovering.append((host_id, check_id))
    memory = [add_host("mem", index, 1, False)[0] for index in range(plan.memory_jobs)]
    check_columns = ["id", "host_id", "name", "check_type", "enabled", "critical", "interval_seconds",
                     "timeout_seconds", "port"]  # fmt: skip
    async with connected(database_url) as connection:
        await copy_tables(
            connection,
            [("hosts", ["id", "name", "group"], hosts), ("health_checks", check_columns, checks),
             ("check_state", STATE_COLUMNS, states)],
        )  # fmt: skip
    return Seeded(fresh, recovering, memory)


# ---- the driver's side of the broker ----------------------------------------------------------------------


@dataclass
class Received:
    perf: float
    wall: float


@dataclass
class Driver:
    """Publishes job.start / check.result and receives every job.* event on a queue of its own."""

    exchange: aio_pika.abc.AbstractExchange
    sent: dict[str, tuple[float, float]] = field(default_factory=dict)  # job_id -> (perf, wall) of the publish
    events: dict[tuple[str, str], Received] = field(default_factory=dict)  # (routing key, job_id) -> first receipt
    duplicates: int = 0
    lateness: list[float] = field(default_factory=list)  # ms behind the open-loop schedule

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now_perf, now_wall = time.perf_counter(), time.time()
        routing_key = message.routing_key or ""
        if routing_key in ("job.start", "job.cancel"):
            return  # this driver's own requests, also matched by job.*
        job_id = message.correlation_id or json.loads(message.body)["data"]["job_id"]
        key = (routing_key, job_id)
        if key in self.events:
            self.duplicates += 1
        else:
            self.events[key] = Received(now_perf, now_wall)

    async def publish_start(self, job_id: str, host_id: uuid.UUID) -> None:
        window_ends_at = dt.datetime.now(dt.UTC) + WINDOW
        body = json.dumps({"job_id": job_id, "host_id": str(host_id), "window_ends_at": window_ends_at.isoformat()})
        message = aio_pika.Message(
            body.encode(), content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        self.sent[job_id] = (time.perf_counter(), time.time())
        await self.exchange.publish(message, "job.start")

    def decision(self, job_id: str) -> tuple[str, Received] | None:
        for routing_key in DECISIONS:
            received = self.events.get((routing_key, job_id))
            if received is not None:
                return routing_key, received
        return None

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def open_loop(self, count: int, rate: float, action: Callable[[int], object]) -> None:
        """Start `action(i)` at start + i/rate whatever happened to the earlier ones (open loop)."""
        tasks = []
        start = time.perf_counter() + 0.02
        for index in range(count):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lateness.append((time.perf_counter() - due) * 1000)
            tasks.append(asyncio.ensure_future(action(index)))  # type: ignore[arg-type]
        await asyncio.gather(*tasks)


# ---- (a) release of fresh healthy hosts -------------------------------------------------------------------


@dataclass
class Breakdown:
    """Per decided job: where the time between publish and receipt went (ms), from database timestamps."""

    parts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.parts.setdefault(name, []).append(value)

    def lines(self) -> list[str]:
        return [
            f"    {name:<58} p50 {percentile(values, 0.5):6.1f}  p99 {percentile(values, 0.99):6.1f} ms"
            for name, values in self.parts.items()
        ]


async def breakdown_of(
    pool: asyncpg.Pool, driver: Driver, job_ids: list[str], breakdown: Breakdown, start_label: str,
    starts: dict[str, float] | None = None,
) -> None:  # fmt: skip
    rows = await pool.fetch(
        """
        SELECT j.job_id, extract(epoch FROM j.received_at) AS received, extract(epoch FROM j.decided_at) AS decided,
               extract(epoch FROM o.created_at) AS evaluating, extract(epoch FROM o.sent_at) AS relayed
        FROM gate_jobs j
        JOIN outbox o ON o.correlation_id = j.job_id AND o.routing_key = 'job.released'
        WHERE j.job_id = ANY($1::text[]) AND o.sent_at IS NOT NULL
        """,
        job_ids,
    )
    for row in rows:
        job_id = row["job_id"]
        received = driver.events.get(("job.released", job_id))
        published = (starts or {}).get(job_id, driver.sent[job_id][1])
        if received is None:
            continue
        if starts is None:
            # (a), the fast release (issue 16): gate_record_start stamps received_at at its insert and the decision's
            # time just after (decided_at); gate_decide_fast's transaction is when the outbox row is created.
            breakdown.add(
                f"{start_label} -> job host inserted (broker, consume)", (float(row["received"]) - published) * 1000
            )
            breakdown.add(
                "inserted -> turn read, decision stamped (record_start)",
                (float(row["decided"]) - float(row["received"])) * 1000,
            )
            breakdown.add(
                "judged in the gate -> decide_fast begins", (float(row["evaluating"]) - float(row["decided"])) * 1000
            )
            breakdown.add(
                "decide_fast+commit -> relay txn begins (NOTIFY)",
                (float(row["relayed"]) - float(row["evaluating"])) * 1000,
            )
        else:
            breakdown.add(
                f"{start_label} -> evaluate txn begins (broker, consume)", (float(row["evaluating"]) - published) * 1000
            )
            breakdown.add(
                "evaluate: lock row, read checks, decide", (float(row["decided"]) - float(row["evaluating"])) * 1000
            )
            breakdown.add(
                "release+outbox+commit -> relay txn begins (NOTIFY)",
                (float(row["relayed"]) - float(row["decided"])) * 1000,
            )
        breakdown.add("relay txn -> publish+confirm -> this driver", (received.wall - float(row["relayed"])) * 1000)


async def release_round(
    driver: Driver, hosts: list[uuid.UUID], prefix: str, seconds: float
) -> tuple[list[float], list[str], int]:
    count = int(OFFERED_RATE * seconds)
    job_ids = [f"{prefix}-{index:05d}" for index in range(count)]
    await driver.open_loop(
        count, OFFERED_RATE, lambda index: driver.publish_start(job_ids[index], hosts[index % len(hosts)])
    )
    await driver.wait_until(lambda: all(driver.decision(job_id) for job_id in job_ids), timeout=30)
    latencies, other = [], 0
    for job_id in job_ids:
        decision = driver.decision(job_id)
        if decision is None:
            continue
        routing_key, received = decision
        if routing_key != "job.released":
            other += 1
            continue
        latencies.append((received.perf - driver.sent[job_id][0]) * 1000)
    missing = count - len(latencies) - other
    return latencies, job_ids, missing + other


# ---- (b) a waiting job whose last failing check recovers ---------------------------------------------------


async def recovery_round(
    driver: Driver, pool: asyncpg.Pool, recovering: list[tuple[uuid.UUID, uuid.UUID]], prefix: str
) -> tuple[list[float], list[str], dict[str, float], int]:
    job_ids = [f"{prefix}-{index:05d}" for index in range(len(recovering))]
    await asyncio.gather(
        *(driver.publish_start(job_id, host) for job_id, (host, _) in zip(job_ids, recovering, strict=True))
    )
    announced = await driver.wait_until(lambda: all(("job.waiting", job_id) in driver.events for job_id in job_ids), 30)
    if not announced:
        raise RuntimeError(f"{prefix}: not every job was announced waiting within 30 s")
    published: dict[str, tuple[float, float]] = {}

    async def recover(index: int) -> None:
        host_id, check_id = recovering[index]
        checked_at = dt.datetime.now(dt.UTC)
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(
                """
                UPDATE check_state
                SET status = 'healthy', consecutive_failures = 0, consecutive_successes = 1, last_healthy = true,
                    last_reason = 'ok', last_detail = 'connected', last_latency_ms = 1.1, last_checked_at = $2,
                    status_changed_at = $2
                WHERE check_id = $1
                """,
                check_id,
                checked_at,
            )
        result = CheckResult(
            check_id=check_id, host_id=host_id, healthy=True, reason="ok", status="healthy", detail="connected",
            latency_ms=1.1, checked_at=checked_at,
        )  # fmt: skip
        event_id, body = encode_cloudevent("check.result", result, source="/healthgate/poller/bench")
        message = aio_pika.Message(
            body, message_id=str(event_id), content_type=CLOUDEVENTS_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )  # fmt: skip
        published[job_ids[index]] = (time.perf_counter(), time.time())
        await driver.exchange.publish(message, "check.result")

    await driver.open_loop(len(recovering), RECOVERY_RATE, recover)
    await driver.wait_until(lambda: all(driver.decision(job_id) for job_id in job_ids), timeout=30)
    latencies, missing = [], 0
    for job_id in job_ids:
        decision = driver.decision(job_id)
        if decision is None or decision[0] != "job.released":
            missing += 1
            continue
        latencies.append((decision[1].perf - published[job_id][0]) * 1000)
    return latencies, job_ids, {job_id: wall for job_id, (_, wall) in published.items()}, missing


# ---- (c) memory with many jobs waiting ---------------------------------------------------------------------


async def count_announced(pool: asyncpg.Pool) -> int:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT count(*) FROM gate_jobs"
        " WHERE job_id LIKE 'mem-%' AND waiting_announced AND status = 'waiting_health_check'"
    )


async def wait_announced(pool: asyncpg.Pool, count: int, timeout: float) -> float:
    started = time.perf_counter()
    while await count_announced(pool) < count:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"fewer than {count} jobs announced waiting within {timeout:.0f} s")
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def memory(driver: Driver, pool: asyncpg.Pool, hosts: list[uuid.UUID], gate: ServiceProcess) -> None:
    pid = gate.process.pid
    small = 100
    print(f"\n(c) memory with jobs waiting (retry interval {RETRY_SECONDS} s: no retry runs while they pile up)")
    idle = rss_kib(pid)
    print(f"    gate RSS before (c), after (a) and (b):      {idle['VmRSS'] / 1024:7.1f} MiB")
    await asyncio.gather(*(driver.publish_start(f"mem-{index:05d}", hosts[index]) for index in range(small)))
    await wait_announced(pool, small, 30)
    await asyncio.sleep(1.0)
    at_small = rss_kib(pid)
    print(f"    gate RSS with {small:>6,} jobs waiting:            {at_small['VmRSS'] / 1024:7.1f} MiB")
    started = time.perf_counter()
    for chunk in range(small, len(hosts), 500):
        await asyncio.gather(
            *(
                driver.publish_start(f"mem-{index:05d}", hosts[index])
                for index in range(chunk, min(len(hosts), chunk + 500))
            )
        )
    published = time.perf_counter() - started
    took = await wait_announced(pool, len(hosts), 300) + published
    await asyncio.sleep(1.0)
    at_large = rss_kib(pid)
    ratio = at_large["VmRSS"] / at_small["VmRSS"]
    print(
        f"    gate RSS with {len(hosts):>6,} jobs waiting:            {at_large['VmRSS'] / 1024:7.1f} MiB"
        f"   (peak so far VmHWM {at_large['VmHWM'] / 1024:.1f} MiB)"
    )
    print(
        f"    {len(hosts) - small:,} more job.start taken and announced waiting in {took:.1f} s"
        f" ({(len(hosts) - small) / took:.0f} jobs/s, each: 2 transactions, job.waiting via the outbox, a re-run tick)"
    )
    # The retry timer: every waiting job's retry due at once (what an interval's end does to jobs that
    # started together), evaluated by the gate's timer in batches of 200.
    await pool.execute(
        "UPDATE gate_jobs SET next_retry_at = now() WHERE job_id LIKE 'mem-%' AND status = 'waiting_health_check'"
    )
    started = time.perf_counter()
    while await pool.fetchval(
        "SELECT count(*) FROM gate_jobs WHERE job_id LIKE 'mem-%' AND status = 'waiting_health_check'"
        " AND next_retry_at <= now()"
    ):
        if time.perf_counter() - started > 300:
            raise RuntimeError("the retry sweep did not finish within 300 s")
        await asyncio.sleep(0.1)
    sweep = time.perf_counter() - started
    after_sweep = rss_kib(pid)
    print(
        f"    retry sweep of all {len(hosts):,} (timer, batches of 200): {sweep:.1f} s"
        f" ({len(hosts) / sweep:.0f} jobs/s); RSS after it {after_sweep['VmRSS'] / 1024:.1f} MiB,"
        f" VmHWM {after_sweep['VmHWM'] / 1024:.1f} MiB"
    )
    label = f"RSS {len(hosts):,} waiting / 100 waiting = {ratio:.3f} (flat: <= {MEMORY_FLAT_RATIO:.2f})"
    if len(hosts) < 10_000:
        label += f" [--quick: {len(hosts):,}, not 10,000]"
    print(f"    GOAL memory flat: {label}: {verdict(ratio <= MEMORY_FLAT_RATIO)}")


# ---- the run ----------------------------------------------------------------------------------------------


async def measure(
    database_url: str, amqp_url: str, exchange_name: str, seeded: Seeded, gate: ServiceProcess, plan: Plan
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    assert pool is not None
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_exchange(channel, Topology(exchange_name))
        driver = Driver(exchange)
        consumer_channel = await connection.channel()
        queue = await consumer_channel.declare_queue(exclusive=True, auto_delete=True)
        # Only what the driver waits for: bound to job.* it also got its own job.starts back, doubling its
        # consumption and the broker's routing for nothing (the harness's CPU, on the same 2 cores as the gate).
        for routing_key in (*DECISIONS, "job.waiting"):
            await queue.bind(exchange, routing_key)
        await queue.consume(driver.on_message, no_ack=True)

        # Warm-up: connections, prepared statements, the relay's first batches.
        warm, _, _ = await release_round(driver, seeded.fresh_hosts, "warm", 1.0)
        print(f"warm-up: {len(warm)} releases, {spread(warm)} (not counted)")

        release_all: list[float] = []
        recovery_all: list[float] = []
        release_breakdown, recovery_breakdown = Breakdown(), Breakdown()
        per_round = len(seeded.recovering) // plan.rounds
        meter = CpuMeter(lambda pid, command: "gate" if pid == gate.process.pid else default_group(pid, command))
        handling: dict[str, float] = {}
        problems = 0
        # CPU seconds of the (a) rounds by process group, and their releases: CPU per release from the processes'
        # own CPU time (/proc), which the machine's other load does not inflate as it does latencies.
        release_cpu: dict[str, float] = {}
        released = 0
        print(
            f"\n{plan.rounds} interleaved round(s): (a) {OFFERED_RATE:.0f} job.start/s"
            f" for {plan.seconds_per_round:.0f} s,"
            f" then (b) {per_round} recoveries at {RECOVERY_RATE:.0f}/s"
        )
        for number in range(1, plan.rounds + 1):
            handling_before = gate_handling(gate.base_url, "job.start")
            meter.start()
            latencies, job_ids, failed = await release_round(
                driver, seeded.fresh_hosts, f"a{number}", plan.seconds_per_round
            )
            cpu = meter.stop()
            handling = histogram_sum(
                handling, histogram_delta(handling_before, gate_handling(gate.base_url, "job.start"))
            )
            release_all += latencies
            problems += failed
            await breakdown_of(pool, driver, job_ids, release_breakdown, "publish")
            print(f"  round {number} (a) publish -> job.released: {spread(latencies)}; not released: {failed}")
            print(f"                {cpu.line(['gate', 'postgresql', 'rabbitmq', 'bench driver'])}")
            print(f"                CPU per release: {cpu_per_release(cpu.groups, len(latencies))}")
            for name, seconds in cpu.groups.items():
                release_cpu[name] = release_cpu.get(name, 0.0) + seconds
            released += len(latencies)
            batch = seeded.recovering[(number - 1) * per_round : number * per_round]
            latencies, job_ids, published, failed = await recovery_round(driver, pool, batch, f"b{number}")
            recovery_all += latencies
            problems += failed
            await breakdown_of(pool, driver, job_ids, recovery_breakdown, "check.result publish", published)
            print(f"  round {number} (b) check.result -> job.released: {spread(latencies)}; not released: {failed}")
        lateness = driver.lateness
        print(
            f"\n  open-loop schedule kept: publishes were p99 {percentile(lateness, 0.99):.1f} ms,"
            f" max {max(lateness):.1f} ms behind schedule; duplicate events received: {driver.duplicates};"
            f" jobs not released: {problems}"
        )
        print("\n(a) where the time goes, publish -> job.released (database timestamps vs this driver's clock):")
        print("\n".join(release_breakdown.lines()))
        print(
            "    gate's own job.start handling, consume to ack (its /metrics histogram, (a) rounds only):"
            f" {handling_line(handling)}"
        )
        print(f"    CPU per release, all (a) rounds: {cpu_per_release(release_cpu, released)}")
        print("\n(b) where the time goes, check.result -> job.released:")
        print("\n".join(recovery_breakdown.lines()))

        print("\nGOALS")
        print(
            f"  (a) job.start -> job.released, {OFFERED_RATE:.0f}/s offered: {spread(release_all)};"
            f" p99 <= {RELEASE_P99_GOAL_MS:.0f} ms: {verdict(percentile(release_all, 0.99) <= RELEASE_P99_GOAL_MS)}"
        )
        print(
            f"  (b) check.result -> job.released: {spread(recovery_all)};"
            f" p99 <= {RECOVERY_P99_GOAL_MS:.0f} ms: {verdict(percentile(recovery_all, 0.99) <= RECOVERY_P99_GOAL_MS)}"
        )
        await memory(driver, pool, seeded.memory_hosts, gate)
    finally:
        await connection.close()
        await pool.close()


def cpu_per_release(groups: dict[str, float], releases: int) -> str:
    """The gate's, PostgreSQL's and RabbitMQ's CPU time per release (µs), from CPU seconds by process group."""
    if releases == 0:
        return "no releases"
    parts = [f"{name} {groups.get(name, 0.0) / releases * 1e6:,.0f} µs" for name in ("gate", "postgresql", "rabbitmq")]
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round and 2,000 waiting jobs (a smoke run)")
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL

    run = BenchRun.new()
    os.chdir(REPO_ROOT)  # `python -m services.cli` in the gate process
    print(f"healthgate gate benchmark: database {run.database}, exchange {run.exchange}, one gate process")
    print(machine_note())
    print(f"before: {load_line()}; {other_work()}")
    with (
        tempfile.TemporaryDirectory(prefix="hgbench-gate-") as tmp,
        # Clean-up retries while a server is unreachable (e.g. the test suite restarting RabbitMQ).
        guarded(lambda: run.remove(retry_seconds=30.0), lambda _: run.print_service_logs()) as outcome,
    ):
        started = time.perf_counter()
        run_async(migrate(run.database_url))
        seeded: Seeded = run_async(seed(run.database_url, plan))  # type: ignore[assignment]
        print(
            f"seeded in {time.perf_counter() - started:.1f} s: {len(seeded.fresh_hosts)} hosts with"
            f" {FRESH_CHECKS_PER_HOST} healthy fresh tcp checks each, {len(seeded.recovering)} hosts with one"
            f" unhealthy check (b), {len(seeded.memory_hosts):,} hosts with one unhealthy check (c)"
        )
        # A free port rather than 0: the readiness wait (tests/support/processes.py) polls it.
        gate = run.start_service(
            "gate", "HEALTHGATE_HEALTH_PORT", Path(tmp), HEALTHGATE_GATE_RETRY_SECONDS=str(RETRY_SECONDS)
        )
        print(f"gate process {gate.process.pid} ready; RSS {rss_kib(gate.process.pid)['VmRSS'] / 1024:.1f} MiB")
        run_async(measure(run.database_url, run.amqp_url, run.exchange, seeded, gate, plan))
        print(f"\nafter: {load_line()}; {other_work()}")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
