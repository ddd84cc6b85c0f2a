"""Benchmark: a patch campaign over a simulated fleet (issue 12, "Speed"; CONTRACT §6).

2,000 hosts in 20 groups of 100, each group with `max_unavailable: 5`, each host with one gating tcp check against a
listener of this driver's own on 127.0.0.1 (healthy throughout). One job covers every host: this driver publishes a
`job.start` per host (all at once, groups interleaved), then plays the executor: on each `job.released` it "patches"
for 0.5 s and publishes `job.finished` (outcome succeeded); the gate verifies the host (its check re-run by a real
poller) and `job.verified` frees the group's budget for the next waiting host.

Printed:
- the campaign's makespan (first `job.start` published → last `job.verified` received) against its ideal: 20 rounds
  per group (2,000 / (20 x 5)) of the 0.5 s patch plus the verification (the median `job.finished` → `job.verified`
  measured in this run); goal makespan ≤ 1.2 x ideal. The bare 10 s of patching alone is printed too;
- the time from a `job.verified` that frees a slot to the next `job.released` in that group, p50/p99 (goal p99 ≤ 50 ms);
- the largest number of hosts of any group in patch at once, from the event stream (released → verified), must be ≤ 5;
- the gate's CPU (share of one core over the campaign) and RSS.

Set-up: a throwaway database `healthgate_bench_<id>` (hosts, checks, their state and schedule, and the 20 group
policies inserted with SQL), an exchange `hgbench-<id>`, one gate and one poller process. Everything is removed at the
end, also on error, Ctrl-C or SIGTERM.

    .venv/bin/python bench/campaign.py [--quick]
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aio_pika
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
    other_work,
    percentile,
    run_async,
    verdict,
)

from shared.schema import migrate
from shared.topology import Topology, declare_exchange
from tests.support.processes import ServiceProcess

PATCH_SECONDS = 0.5
MAX_UNAVAILABLE = 5
MAKESPAN_GOAL_RATIO = 1.2
FREED_TO_RELEASE_P99_GOAL_MS = 50.0
RETRY_SECONDS = 2
WINDOW = dt.timedelta(hours=2)


@dataclass(frozen=True)
class Plan:
    groups: int
    hosts_per_group: int


FULL = Plan(groups=20, hosts_per_group=100)
QUICK = Plan(groups=4, hosts_per_group=20)


# ---- the fleet ------------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    group_of: dict[uuid.UUID, str]
    order: list[uuid.UUID]  # the order of the job.start messages: groups interleaved


async def seed(database_url: str, plan: Plan, port: int) -> Fleet:
    """Hosts, one healthy tcp check each (127.0.0.1:`port`, interval a day: it runs only when the gate asks),
    its state (healthy for an hour) and schedule, and each group's policy, inserted with COPY."""
    now = dt.datetime.now(dt.UTC)
    hosts, checks, states, schedule, policies = [], [], [], [], []
    group_of: dict[uuid.UUID, str] = {}
    by_group: list[list[uuid.UUID]] = []
    for group_number in range(plan.groups):
        group = f"fleet-{group_number:02d}"
        policies.append((group, MAX_UNAVAILABLE))
        members = []
        for index in range(plan.hosts_per_group):
            host_id, check_id = uuid.uuid4(), uuid.uuid4()
            hosts.append((host_id, f"{group}-{index:03d}", group, "healthy", 1, 1))
            checks.append((check_id, host_id, "tcp", "tcp", True, True, 86400, 2.0, port, "127.0.0.1"))
            states.append(
                (check_id, host_id, "healthy", 0, 1, True, "ok", "connected", 0.3, now, now - dt.timedelta(hours=1))
            )
            schedule.append((check_id, now + dt.timedelta(days=1)))
            group_of[host_id] = group
            members.append(host_id)
        by_group.append(members)
    order = [members[index] for index in range(plan.hosts_per_group) for members in by_group]
    check_columns = ["id", "host_id", "name", "check_type", "enabled", "critical", "interval_seconds",
                     "timeout_seconds", "port", "address"]  # fmt: skip
    host_columns = ["id", "name", "group", "health_check_status", "checks_total", "checks_healthy"]
    async with connected(database_url) as connection:
        await copy_tables(
            connection,
            [("hosts", host_columns, hosts), ("health_checks", check_columns, checks),
             ("check_state", STATE_COLUMNS, states), ("check_schedule", ["check_id", "next_run_at"], schedule),
             ("group_policies", ["group", "max_unavailable_count"], policies)],
        )  # fmt: skip
        await connection.execute("UPDATE check_state SET healthy_since = status_changed_at")
    return Fleet(group_of, order)


async def tcp_listener() -> tuple[asyncio.Server, int]:
    """A port on 127.0.0.1 that accepts connections and closes them: the fleet's healthy tcp checks."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


# ---- the executor ---------------------------------------------------------------------------------------------


@dataclass
class Executor:
    """Publishes job.start and job.finished, and records every job.* event of the job by host, with its time."""

    exchange: aio_pika.abc.AbstractExchange
    job_id: str
    group_of: dict[uuid.UUID, str]
    events: list[tuple[float, str, uuid.UUID]] = field(default_factory=list)  # (perf time, routing key, host)
    seen: set[tuple[str, uuid.UUID]] = field(default_factory=set)
    finished_sent: dict[uuid.UUID, float] = field(default_factory=dict)
    patching: set[asyncio.Task[None]] = field(default_factory=set)
    duplicates: int = 0

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        routing_key = message.routing_key or ""
        if routing_key in ("job.start", "job.finished", "job.cancel"):
            return  # this driver's own messages, also matched by job.*
        data = json.loads(message.body)["data"]
        if data.get("job_id") != self.job_id or "host_id" not in data:
            return
        host_id = uuid.UUID(data["host_id"])
        if (routing_key, host_id) in self.seen:
            self.duplicates += 1
            return
        self.seen.add((routing_key, host_id))
        self.events.append((now, routing_key, host_id))
        if routing_key == "job.released":
            task = asyncio.ensure_future(self._patch(host_id))
            self.patching.add(task)
            task.add_done_callback(self.patching.discard)

    async def _patch(self, host_id: uuid.UUID) -> None:
        await asyncio.sleep(PATCH_SECONDS)
        self.finished_sent[host_id] = time.perf_counter()
        await self._publish("job.finished", {"job_id": self.job_id, "host_id": str(host_id), "outcome": "succeeded"})

    async def start_all(self, order: list[uuid.UUID]) -> float:
        window_ends_at = (dt.datetime.now(dt.UTC) + WINDOW).isoformat()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                self._publish(
                    "job.start", {"job_id": self.job_id, "host_id": str(host), "window_ends_at": window_ends_at}
                )
                for host in order
            )
        )
        return started

    async def _publish(self, routing_key: str, data: dict[str, str]) -> None:
        message = aio_pika.Message(
            json.dumps(data).encode(), content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.exchange.publish(message, routing_key, mandatory=True, timeout=30)

    def outcomes(self) -> int:
        return sum(1 for _, key, _ in self.events if key in ("job.verified", "job.verification_failed", "job.failed"))


@dataclass(frozen=True)
class Figures:
    makespan: float
    verify_p50: float
    verify_p99: float
    freed_to_release: list[float]
    most_in_patch: int
    unexpected: dict[str, int]


def analyse(executor: Executor, started: float) -> Figures:
    """Figures from the event stream: in patch per group (released → outcome), verification times, and for each
    verification outcome the time to the group's next release after it."""
    in_patch: dict[str, int] = defaultdict(int)
    most = 0
    freed_at: dict[str, list[float]] = defaultdict(list)  # outcomes not yet followed by a release, per group
    freed_to_release: list[float] = []
    verify: list[float] = []
    unexpected: dict[str, int] = defaultdict(int)
    for moment, key, host in sorted(executor.events, key=lambda event: event[0]):
        group = executor.group_of[host]
        if key == "job.released":
            in_patch[group] += 1
            most = max(most, in_patch[group])
            if freed_at[group]:
                freed_to_release.append((moment - freed_at[group].pop(0)) * 1000)
        elif key in ("job.verified", "job.verification_failed"):
            in_patch[group] -= 1
            freed_at[group].append(moment)
            if host in executor.finished_sent:
                verify.append(moment - executor.finished_sent[host])
            if key != "job.verified":
                unexpected[key] += 1
        elif key != "job.waiting":
            unexpected[key] += 1
    last = max((moment for moment, key, _ in executor.events if key == "job.verified"), default=started)
    return Figures(
        makespan=last - started,
        verify_p50=percentile(verify, 0.5) if verify else float("nan"),
        verify_p99=percentile(verify, 0.99) if verify else float("nan"),
        freed_to_release=freed_to_release,
        most_in_patch=most,
        unexpected=dict(unexpected),
    )


async def most_in_patch_recorded(database_url: str, job_id: str) -> int:
    """The most hosts of one group in patch at once as the database recorded it: each job host from its release
    (decided_at) to its verification outcome (verified_at), per group. The event stream can show one more for a
    moment: a release and the outcome that freed its slot are published by the outbox relays, which may deliver
    them in either order."""
    async with connected(database_url) as connection:
        value = await connection.fetchval(
            """
            WITH spans AS (
                SELECT h."group", j.decided_at AS at, 1 AS delta FROM gate_jobs j JOIN hosts h ON h.id = j.host_id
                WHERE j.job_id = $1 AND j.decided_at IS NOT NULL AND j.status IN ('released', 'verifying',
                    'verified', 'verification_failed')
                UNION ALL
                SELECT h."group", j.verified_at, -1 FROM gate_jobs j JOIN hosts h ON h.id = j.host_id
                WHERE j.job_id = $1 AND j.verified_at IS NOT NULL
            )
            SELECT COALESCE(max(running), 0) FROM (
                SELECT sum(delta) OVER (PARTITION BY "group" ORDER BY at, delta ROWS UNBOUNDED PRECEDING) AS running
                FROM spans
            ) s
            """,
            job_id,
        )
    return int(value)


async def campaign(run: BenchRun, fleet: Fleet, gate: ServiceProcess, timeout: float) -> None:
    connection = await aio_pika.connect(run.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_exchange(channel, Topology(run.exchange))
        executor = Executor(exchange, f"bench-campaign-{run.run_id}", fleet.group_of)
        consumer_channel = await connection.channel()
        queue = await consumer_channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "job.*")
        await queue.consume(executor.on_message, no_ack=True)

        meter = CpuMeter(lambda pid, command: "gate" if pid == gate.process.pid else default_group(pid, command))
        meter.start()
        started = await executor.start_all(fleet.order)
        deadline = time.monotonic() + timeout
        rss_peak = 0
        while executor.outcomes() < len(fleet.order) and time.monotonic() < deadline:
            rss_peak = max(rss_peak, rss_kib(gate.process.pid))
            await asyncio.sleep(0.1)
        cpu = meter.stop()
        await asyncio.gather(*executor.patching, return_exceptions=True)
        figures = analyse(executor, started)
        recorded = await most_in_patch_recorded(run.database_url, executor.job_id)
        async with connected(run.database_url) as db:
            intake = await db.fetchval(
                "SELECT extract(epoch FROM max(received_at) - min(received_at)) FROM gate_jobs WHERE job_id = $1",
                executor.job_id,
            )
    finally:
        await connection.close()

    hosts = len(fleet.order)
    groups = len(set(fleet.group_of.values()))
    rounds = hosts / (groups * MAX_UNAVAILABLE)
    ideal = rounds * (PATCH_SECONDS + figures.verify_p50)
    done = executor.outcomes()
    print(f"\ncampaign: {done} of {hosts} job hosts reached an outcome; duplicates received: {executor.duplicates};"
          f" other outcomes: {figures.unexpected or 'none'}")  # fmt: skip
    print(f"  verification, job.finished -> job.verified: p50 {figures.verify_p50 * 1000:.0f} ms,"
          f" p99 {figures.verify_p99 * 1000:.0f} ms")  # fmt: skip
    print(f"  the gate took in the {hosts:,} job.start messages in {float(intake or 0):.2f} s (first to last recorded)")
    print(f"  {cpu.line(['gate', 'postgresql', 'rabbitmq', 'bench driver'])}")
    print(f"  gate RSS: peak {rss_peak / 1024:.1f} MiB during the campaign")
    freed = figures.freed_to_release
    print("\nGOALS")
    ratio = figures.makespan / ideal if ideal > 0 else float("inf")
    print(
        f"  makespan {figures.makespan:.2f} s vs ideal {ideal:.2f} s ({rounds:.0f} rounds x (0.5 s patch +"
        f" {figures.verify_p50 * 1000:.0f} ms verification)): {ratio:.2f}x; <= {MAKESPAN_GOAL_RATIO}x:"
        f" {verdict(ratio <= MAKESPAN_GOAL_RATIO and done == hosts)}"
        f"  (patching alone: {rounds * PATCH_SECONDS:.1f} s, {figures.makespan / (rounds * PATCH_SECONDS):.2f}x)"
    )
    if freed:
        p50, p99 = percentile(freed, 0.5), percentile(freed, 0.99)
        print(
            f"  job.verified (slot freed) -> next job.released in the group: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            f" (n={len(freed)}); p99 <= {FREED_TO_RELEASE_P99_GOAL_MS:.0f} ms:"
            f" {verdict(p99 <= FREED_TO_RELEASE_P99_GOAL_MS)}"
        )
    else:
        print("  job.verified -> next job.released: no slot was freed while hosts waited")
    print(
        f"  most hosts of one group in patch at once, as recorded (release to outcome, database times): {recorded};"
        f" <= {MAX_UNAVAILABLE}: {verdict(recorded <= MAX_UNAVAILABLE)}"
        f"  (as the events arrived here: {figures.most_in_patch})"
    )


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 groups of 20 hosts (a smoke run)")
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL

    run = BenchRun.new()
    os.chdir(REPO_ROOT)  # `python -m services.cli` in the service processes
    print(f"healthgate campaign benchmark: database {run.database}, exchange {run.exchange}")
    print(machine_note())
    print(f"before: {load_line()}; {other_work()}")

    async def body(tmp: Path) -> None:
        listener, port = await tcp_listener()
        try:
            await migrate(run.database_url)
            fleet = await seed(run.database_url, plan, port)
            print(
                f"fleet: {len(fleet.order):,} hosts in {plan.groups} groups, max_unavailable {MAX_UNAVAILABLE}"
                f" per group, one tcp check each (127.0.0.1:{port}); patch {PATCH_SECONDS} s per host"
            )
            settings = {"HEALTHGATE_GATE_RETRY_SECONDS": str(RETRY_SECONDS)}
            gate = await asyncio.to_thread(run.start_service, "gate", "HEALTHGATE_HEALTH_PORT", tmp, **settings)
            await asyncio.to_thread(run.start_service, "poller", "HEALTHGATE_HEALTH_PORT", tmp)
            await campaign(run, fleet, gate, timeout=600)
        finally:
            listener.close()

    with (
        tempfile.TemporaryDirectory(prefix="hgbench-campaign-") as tmp,
        guarded(lambda: run.remove(retry_seconds=30.0), lambda _: run.print_service_logs()) as outcome,
    ):
        run_async(body(Path(tmp)))
        print(f"\nafter: {load_line()}; {other_work()}")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
