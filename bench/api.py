"""Benchmark: the hosts page against a trivial authenticated endpoint, on one real API process.

Goal (figures, not a pass/fail test): with 10,000 hosts and 50,000 checks, one API process serves
`GET /api/v1/hosts?limit=50` at p99 <= 20 ms, and that page costs at most 3x `GET /api/v1/me` measured
in the same run. The headline is concurrency 1 (server latency, unloaded); concurrency 4 shows the same
under load.

Set-up: a throwaway database `healthgate_bench_<id>` on the server of HEALTHGATE_BENCH_DATABASE_URL
(migrated with the real migrations, seeded with COPY, summaries set by one UPDATE that mirrors
shared/hosts.py and is cross-checked against it), an exchange `hgbench-<id>` on
HEALTHGATE_BENCH_AMQP_URL, and one `healthgate api` process. All of it is removed at the end, also on
error, Ctrl-C or SIGTERM.

The load generator runs in this process. Requests of the compared endpoints are interleaved in
batches of ~2,000, several rounds, so machine noise hits both alike. Latency is measured per request
on the client with time.perf_counter, by default with a minimal keep-alive HTTP/1.1 client on asyncio
streams (`--client raw`), whose own cost per request is a few tens of microseconds; `--client httpx`
uses httpx.AsyncClient instead, whose per-request cost (~0.7 ms on the 2-core dev machine) is added to
both endpoints alike and so makes the ratio look better than the server's. The API's own handler time
per route (from its /metrics histogram) is printed too: the ratio without HTTP and client overhead.

    .venv/bin/python bench/api.py [--quick] [--client raw|httpx] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import httpx
from _support import (
    REPO_ROOT,
    STATE_COLUMNS,
    BenchRun,
    copy_tables,
    guarded,
    metric_samples,
    other_work,
    percentile_by_index,
    run_async,
    verdict,
)

from services.api.checks import WRITABLE_COLUMNS
from services.api.requests import encode_cursor
from shared.hosts import refresh_host_status
from shared.schema import migrate
from shared.tokens import create_token

HOSTS = 10_000
CHECKS_PER_HOST = 5
PAGE_LIMIT = 50
P99_GOAL_MS = 20.0
RATIO_GOAL = 3.0
SEED = 20240611

# 20 groups of uneven size, as an estate grows: (group, host-name stem, domain, weight).
GROUPS: tuple[tuple[str, str, str, int], ...] = (
    ("web-frontend", "web", "prod.eu-west-1.example.net", 14),
    ("api-gateway", "gw", "prod.eu-west-1.example.net", 6),
    ("payments", "pay", "pci.eu-west-1.example.net", 4),
    ("checkout", "chk", "prod.eu-west-1.example.net", 5),
    ("search", "srch", "prod.us-east-1.example.net", 6),
    ("postgres-primary", "pg", "db.eu-west-1.example.net", 2),
    ("postgres-replica", "pgr", "db.eu-west-1.example.net", 4),
    ("redis-cache", "redis", "cache.eu-west-1.example.net", 5),
    ("kafka-brokers", "kafka", "stream.eu-west-1.example.net", 3),
    ("k8s-workers-eu", "k8s-w", "k8s.eu-west-1.example.net", 12),
    ("k8s-workers-us", "k8s-w", "k8s.us-east-1.example.net", 10),
    ("ci-runners", "ci", "build.example.net", 7),
    ("monitoring", "mon", "ops.example.net", 2),
    ("logging", "log", "ops.example.net", 3),
    ("mail-relay", "mx", "mail.example.net", 1),
    ("dns", "ns", "infra.example.net", 1),
    ("vpn-gateways", "vpn", "edge.example.net", 1),
    ("batch-workers", "batch", "prod.us-east-1.example.net", 8),
    ("ml-training", "gpu", "ml.us-east-1.example.net", 3),
    ("office-it", "it", "corp.example.net", 3),
)

# Five checks per host: (name, type, type-specific fields, critical).
SERVICE_UNITS = (
    "nginx.service",
    "postgresql@15-main.service",
    "redis-server.service",
    "docker.service",
    "kubelet.service",
    "node-exporter.service",
    "sshd.service",
)
HTTP_PATHS = ("/healthz", "/health/ready", "/status", "/api/ping", "/")
TCP_PORTS = (22, 443, 5432, 6379, 9092, 9100, 8080)
# Per check: P(unhealthy), P(unknown = no result yet); the rest is healthy.
P_UNHEALTHY = 0.02
P_UNKNOWN = 0.01
P_DISABLED = 0.03
P_NON_CRITICAL = 0.2
FAILURE_REASONS = (
    ("connect", "connection refused"),
    ("timeout", "no answer within 10.0 s"),
    ("status", "HTTP 503, expected 2xx"),
    ("agent", "unit is failed"),
    ("dns", "name does not resolve"),
    ("tls", "certificate has expired"),
)

HOST_COLUMNS = ("id", "name", "group", "agent_url", "created_at", "updated_at")
# The API's own list of writable columns; this benchmark seeds no basic-auth checks (NULL there, as omitted).
CHECK_COLUMNS = ("id", "host_id", *WRITABLE_COLUMNS, "created_at", "updated_at")

# The rule of shared/hosts.py (_RECOMPUTE_SQL), for every host at once.
SUMMARY_UPDATE = """
UPDATE hosts
SET health_check_status = summary.status, checks_total = summary.total, checks_healthy = summary.healthy
FROM (
    SELECT
        c.host_id,
        count(*) AS total,
        count(*) FILTER (WHERE s.status = 'healthy') AS healthy,
        CASE
            WHEN bool_or(c.critical AND s.status = 'unhealthy') THEN 'unhealthy'
            WHEN bool_or(s.status = 'unknown') THEN 'unknown'
            WHEN bool_or(s.status = 'unhealthy') THEN 'degraded'
            ELSE 'healthy'
        END AS status
    FROM health_checks c
    JOIN check_state s ON s.check_id = c.id
    WHERE c.enabled
    GROUP BY c.host_id
) AS summary
WHERE hosts.id = summary.host_id
"""


# ---- seeding --------------------------------------------------------------------------------------


@dataclass
class Seeded:
    host_names: list[str]
    groups: list[str]
    statuses: dict[str, int]
    unhealthy_hosts: int


def generate_rows(rng: random.Random) -> tuple[list[tuple], list[tuple], list[tuple], list[str]]:
    now = dt.datetime.now(dt.UTC)
    total_weight = sum(weight for *_, weight in GROUPS)
    hosts: list[tuple] = []
    checks: list[tuple] = []
    states: list[tuple] = []
    for index, (group, stem, domain, weight) in enumerate(GROUPS):
        count = HOSTS * weight // total_weight
        if index == len(GROUPS) - 1:
            count = HOSTS - len(hosts)
        for number in range(1, count + 1):
            name = f"{stem}-{number:04d}.{domain}"
            host_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            created = now - dt.timedelta(days=rng.uniform(1, 900))
            hosts.append((host_id, name, group, f"https://{name}:9443", created, created))
            for row, state in host_checks(rng, host_id, name, created, now):
                checks.append(row)
                states.append(state)
    return hosts, checks, states, [group for group, *_ in GROUPS]


def host_checks(
    rng: random.Random, host_id: uuid.UUID, host_name: str, created: dt.datetime, now: dt.datetime
) -> Iterator[tuple[tuple, tuple]]:
    plan = [
        ("http", "http-health"),
        ("tcp", "ssh"),
        ("service", rng.choice(SERVICE_UNITS).removesuffix(".service").split("@")[0]),
        (rng.choice(("http", "tcp")), "app"),
        (rng.choice(("service", "http", "tcp")), "exporter"),
    ]
    for check_type, name in plan:
        check_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        enabled = rng.random() >= P_DISABLED
        critical = rng.random() >= P_NON_CRITICAL
        interval = rng.choice((30, 60, 60, 120, 300, 300, 300, 600))
        fields: dict[str, object] = {}
        if check_type == "http":
            path = rng.choice(HTTP_PATHS)
            fields = {
                "url": f"https://{host_name}{path}",
                "method": rng.choice(("GET", "GET", "HEAD")),
                "expected_status": rng.choice(("2xx", "2xx", "200", "200,204")),
                "expected_body": "ok" if rng.random() < 0.2 else None,
                "ignore_cert_errors": rng.random() < 0.7,
                "follow_redirects": rng.random() < 0.2,
            }
        elif check_type == "tcp":
            fields = {
                "port": 22 if name == "ssh" else rng.choice(TCP_PORTS),
                "address": None if rng.random() < 0.9 else "10.20.30.40",
            }
        else:
            fields = {"service_name": rng.choice(SERVICE_UNITS)}
        values = {
            "id": check_id,
            "host_id": host_id,
            "name": f"{name}-{check_type}",
            "check_type": check_type,
            "enabled": enabled,
            "critical": critical,
            "interval_seconds": interval,
            "timeout_seconds": rng.choice((2.0, 5.0, 10.0)),
            "failures_before_unhealthy": rng.choice((1, 1, 2, 3)),
            "successes_before_healthy": rng.choice((1, 1, 2)),
            **fields,
            "created_at": created,
            "updated_at": created,
        }
        yield (
            tuple(values.get(column) for column in CHECK_COLUMNS),
            check_state(rng, check_id, host_id, enabled, interval, now),
        )


def check_state(
    rng: random.Random,
    check_id: uuid.UUID,
    host_id: uuid.UUID,
    enabled: bool,
    interval: int,
    now: dt.datetime,
) -> tuple:
    draw = rng.random()
    status = "unhealthy" if draw < P_UNHEALTHY else "unknown" if draw < P_UNHEALTHY + P_UNKNOWN else "healthy"
    next_run = now + dt.timedelta(seconds=rng.uniform(0, interval)) if enabled else None
    if status == "unknown":
        return (check_id, host_id, status, 0, 0, None, None, None, None, None, next_run, None)
    checked = now - dt.timedelta(seconds=rng.uniform(0, interval))
    changed = checked - dt.timedelta(hours=rng.uniform(0, 2000))
    if status == "healthy":
        return (
            check_id,
            host_id,
            status,
            0,
            rng.randint(1, 5000),
            True,
            "ok",
            "HTTP 200",
            rng.lognormvariate(3, 0.6),
            checked,
            next_run,
            changed,
        )
    reason, detail = rng.choice(FAILURE_REASONS)
    return (
        check_id,
        host_id,
        status,
        rng.randint(1, 300),
        0,
        False,
        reason,
        detail,
        rng.lognormvariate(6, 1),
        checked,
        next_run,
        changed,
    )


async def seed(connection: asyncpg.Connection) -> Seeded:
    rng = random.Random(SEED)
    hosts, checks, states, groups = generate_rows(rng)
    # The schedule lives in check_schedule, which this benchmark does not read.
    states = [state[:10] + state[11:] for state in states]
    tables = [
        ("hosts", HOST_COLUMNS, hosts),
        ("health_checks", CHECK_COLUMNS, checks),
        ("check_state", STATE_COLUMNS, states),
    ]
    async with connection.transaction():
        await copy_tables(connection, tables, analyze=False)
        await connection.execute(SUMMARY_UPDATE)
    await verify_summaries(connection, rng, [row[0] for row in hosts])
    await connection.execute("VACUUM (ANALYZE) hosts, health_checks, check_state")
    statuses = {
        row["health_check_status"]: row["count"]
        for row in await connection.fetch("SELECT health_check_status, count(*) FROM hosts GROUP BY 1 ORDER BY 2 DESC")
    }
    return Seeded(sorted(row[1] for row in hosts), groups, statuses, statuses.get("unhealthy", 0))


async def verify_summaries(connection: asyncpg.Connection, rng: random.Random, host_ids: list[uuid.UUID]) -> None:
    """The bulk UPDATE must agree with the real per-host logic: recompute a sample, then roll back."""
    sample = rng.sample(host_ids, 300)
    transaction = connection.transaction()
    await transaction.start()
    try:
        for host_id in sample:
            before = await connection.fetchrow(
                "SELECT health_check_status, checks_total, checks_healthy FROM hosts WHERE id = $1", host_id
            )
            await refresh_host_status(connection, host_id, source="/healthgate/bench")
            after = await connection.fetchrow(
                "SELECT health_check_status, checks_total, checks_healthy FROM hosts WHERE id = $1", host_id
            )
            if tuple(before) != tuple(after):
                raise RuntimeError(
                    f"bulk summary of host {host_id} is {tuple(before)}, the real rule says {tuple(after)}"
                )
    finally:
        await transaction.rollback()


# ---- HTTP clients ---------------------------------------------------------------------------------


class RawClient:
    """One keep-alive HTTP/1.1 connection; GET only; enough for uvicorn's Content-Length answers."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.prefix = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\n{self.prefix}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise RuntimeError(f"answer to {path} has no Content-Length: {head!r}")
        body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.reader = self.writer = None


class HttpxClient:
    def __init__(self, base_url: str, token: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self.client.get(path)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


Client = RawClient | HttpxClient


# ---- workloads ------------------------------------------------------------------------------------


class Workload:
    """What one request of a measured line asks for; keeps per-worker cursor state."""

    label = ""

    def next_path(self, worker: int) -> str:
        raise NotImplementedError

    def answered(self, worker: int, body: bytes) -> None:
        """Called after timing stopped."""


class Fixed(Workload):
    def __init__(self, label: str, path: str) -> None:
        self.label, self.path = label, path

    def next_path(self, worker: int) -> str:
        return self.path


class HostPages(Workload):
    """A page of hosts: first pages, cursor pages followed from next_cursor, and jumps into the middle.

    After each page: with P(first) ask for a first page, with P(jump) a cursor at a random host name
    (as the API encodes it), otherwise follow next_cursor (a first page when the list has ended)."""

    def __init__(
        self,
        label: str,
        query: Callable[[random.Random], str],
        jump_names: list[str] | None,
        p_first: float = 0.2,
        p_jump: float = 0.2,
    ) -> None:
        self.label, self.query, self.jump_names = label, query, jump_names
        self.p_first, self.p_jump = p_first, p_jump
        self.rng = random.Random(SEED + 1)
        self.cursors: dict[int, str | None] = {}
        self.base: dict[int, str] = {}
        self.kinds = {"first": 0, "next_cursor": 0, "jump": 0}
        self.answers = 0

    def next_path(self, worker: int) -> str:
        draw = self.rng.random()
        cursor = self.cursors.get(worker)
        if self.jump_names and self.p_first <= draw < self.p_first + self.p_jump:
            self.base[worker] = self.query(self.rng)
            self.kinds["jump"] += 1
            return f"{self.base[worker]}&cursor={encode_cursor(self.rng.choice(self.jump_names))}"
        if draw < self.p_first or cursor is None:
            self.base[worker] = self.query(self.rng)
            self.kinds["first"] += 1
            return self.base[worker]
        self.kinds["next_cursor"] += 1
        return f"{self.base[worker]}&cursor={cursor}"

    def answered(self, worker: int, body: bytes) -> None:
        # The load generator shares the cores with the server: take next_cursor (the page's last key) off
        # the end of the body, and parse the whole page only now and then to check it.
        self.answers += 1
        marker = body.rfind(b'"next_cursor":')
        if marker < 0 or self.answers % 100 == 1:
            page = json.loads(body)
            if len(page["items"]) > PAGE_LIMIT or (page["next_cursor"] and len(page["items"]) != PAGE_LIMIT):
                raise RuntimeError(f"unexpected page: {len(page['items'])} items, next_cursor {page['next_cursor']}")
            self.cursors[worker] = page["next_cursor"]
            return
        value = body[marker + len(b'"next_cursor":') :].rstrip().removesuffix(b"}").strip()
        self.cursors[worker] = None if value == b"null" else json.loads(value)


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)  # seconds
    busy: float = 0.0  # wall time of this line's batches
    errors: int = 0
    rounds: list[Samples] = field(default_factory=list)  # one entry per measured round

    def add(self, other: Samples) -> None:
        self.latencies += other.latencies
        self.busy += other.busy
        self.errors += other.errors
        self.rounds.append(other)

    def percentile(self, fraction: float) -> float:
        return percentile_by_index(self.latencies, fraction) * 1000

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.busy if self.busy else 0.0


async def run_batch(clients: list[Client], workload: Workload, requests: int) -> Samples:
    """`requests` requests spread over one worker per client; each worker waits for its answer."""
    samples = Samples()
    remaining = requests
    first_error: list[str] = []

    async def worker(index: int, client: Client) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            path = workload.next_path(index)
            started = time.perf_counter()
            status, body = await client.get(path)
            elapsed = time.perf_counter() - started
            if status != 200:
                samples.errors += 1
                if not first_error:
                    first_error.append(f"GET {path} -> {status}: {body[:300]!r}")
                continue
            samples.latencies.append(elapsed)
            workload.answered(index, body)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index, client) for index, client in enumerate(clients)))
    samples.busy = time.perf_counter() - started
    if first_error:
        raise RuntimeError(f"{samples.errors} failed requests, first: {first_error[0]}")
    return samples


async def measure(
    clients: list[Client], lines: list[tuple[Workload, int]], *, rounds: int, warmup: int
) -> dict[str, Samples]:
    """Warm up every line, then `rounds` rounds of one batch per line, the order rotated each round."""
    for workload, _ in lines:
        await run_batch(clients, workload, warmup)
    results = {workload.label: Samples() for workload, _ in lines}
    for round_number in range(rounds):
        shift = round_number % len(lines)
        for workload, batch in lines[shift:] + lines[:shift]:
            results[workload.label].add(await run_batch(clients, workload, batch))
    return results


# ---- reporting -------------------------------------------------------------------------------------


def print_table(title: str, results: dict[str, Samples], baseline: str) -> None:
    base = results[baseline]
    print(f"\n{title}")
    print(
        f"  {'endpoint':<46} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>8}"
        f" {'p50 x me':>8} {'p99 x me':>8}"
    )
    for label, samples in results.items():
        print(
            f"  {label:<46} {len(samples.latencies):>8} {samples.p50:>8.2f} {samples.p99:>8.2f}"
            f" {max(samples.latencies) * 1000:>8.1f} {samples.rps:>8.0f}"
            f" {samples.p50 / base.p50:>8.2f} {samples.p99 / base.p99:>8.2f}"
        )


def print_goals(title: str, page: Samples, me: Samples) -> None:
    ratio99, ratio50 = page.p99 / me.p99, page.p50 / me.p50
    print(
        f"  {title}: page p99 {page.p99:.2f} ms <= {P99_GOAL_MS:.0f} ms: {verdict(page.p99 <= P99_GOAL_MS)};"
        f" p99 ratio {ratio99:.2f}x <= {RATIO_GOAL:.0f}x: {verdict(ratio99 <= RATIO_GOAL)};"
        f" p50 ratio {ratio50:.2f}x <= {RATIO_GOAL:.0f}x: {verdict(ratio50 <= RATIO_GOAL)}"
    )


def print_rounds(label: str, page: Samples, me: Samples) -> None:
    """Per-round figures: a p99 ratio that swings between rounds is machine noise, not the server."""
    pairs = list(zip(page.rounds, me.rounds, strict=True))
    ratios99 = sorted(p.p99 / m.p99 for p, m in pairs)
    print(
        f"  {label}: p99 me {' '.join(f'{m.p99:.2f}' for _, m in pairs)} ms,"
        f" page {' '.join(f'{p.p99:.2f}' for p, _ in pairs)} ms;"
        f" p99 ratio per round {' '.join(f'{p.p99 / m.p99:.2f}' for p, m in pairs)}"
        f" (median {ratios99[len(ratios99) // 2]:.2f});"
        f" p50 ratio per round {' '.join(f'{p.p50 / m.p50:.2f}' for p, m in pairs)}"
    )


# ---- the run ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    batch: int
    filter_batch: int
    warmup: int


async def open_clients(kind: str, base_url: str, token: str, count: int) -> list[Client]:
    parts = urlsplit(base_url)
    clients: list[Client] = []
    for _ in range(count):
        if kind == "raw":
            clients.append(RawClient(parts.hostname or "127.0.0.1", parts.port or 80, token))
        else:
            clients.append(HttpxClient(base_url, token))
    return clients


async def load(base_url: str, token: str, seeded: Seeded, plan: Plan, client_kind: str) -> None:
    me = Fixed("GET /api/v1/me", "/api/v1/me")
    page = HostPages(
        f"GET /api/v1/hosts?limit={PAGE_LIMIT} (first/cursor)",
        lambda rng: f"/api/v1/hosts?limit={PAGE_LIMIT}",
        seeded.host_names,
    )
    by_group = HostPages(
        f"  ?group=<random of {len(seeded.groups)}> (first/cursor)",
        lambda rng: f"/api/v1/hosts?limit={PAGE_LIMIT}&group={quote(rng.choice(seeded.groups))}",
        None,
        p_first=0.3,
        p_jump=0.0,
    )
    by_status = HostPages(
        f"  ?health_check_status=unhealthy ({seeded.unhealthy_hosts} hosts)",
        lambda rng: f"/api/v1/hosts?limit={PAGE_LIMIT}&health_check_status=unhealthy",
        None,
        p_first=0.3,
        p_jump=0.0,
    )
    outcome: dict[int, dict[str, Samples]] = {}
    for concurrency in (1, 4):
        clients = await open_clients(client_kind, base_url, token, concurrency)
        try:
            lines: list[tuple[Workload, int]] = [(me, plan.batch), (page, plan.batch)]
            if concurrency == 1:
                lines += [(by_group, plan.filter_batch), (by_status, plan.filter_batch)]
            handled_before = await handler_seconds(base_url)
            started = time.perf_counter()
            results = await measure(clients, lines, rounds=plan.rounds, warmup=plan.warmup)
            took = time.perf_counter() - started
            handled = await handler_seconds(base_url)
        finally:
            for client in clients:
                await client.close()
        outcome[concurrency] = results
        kind = "unloaded: server latency" if concurrency == 1 else "loaded"
        title = (
            f"concurrency {concurrency} ({kind}),"
            f" {plan.rounds} interleaved rounds, batches of {plan.batch}, {took:.1f} s"
        )
        print_table(title, results, me.label)
        means = {
            route: (total - handled_before.get(route, (0.0, 0))[0]) / (count - handled_before.get(route, (0.0, 0))[1])
            for route, (total, count) in handled.items()
            if count > handled_before.get(route, (0.0, 0))[1]
        }
        if "/api/v1/me" in means and "/api/v1/hosts" in means:
            print(
                "  server-side handler time (API's /metrics, mean incl. warm-up and filters; excludes HTTP parsing"
                f" and sending): /api/v1/me {means['/api/v1/me'] * 1000:.3f} ms,"
                f" /api/v1/hosts {means['/api/v1/hosts'] * 1000:.3f} ms"
                f" ({means['/api/v1/hosts'] / means['/api/v1/me']:.2f}x)"
            )
    print(
        f"\n  page requests: {page.kinds['first']} first pages,"
        f" {page.kinds['next_cursor']} followed next_cursor,"
        f" {page.kinds['jump']} cursor jumps to a random host"
    )

    print("\nPer round (same order of magnitude = stable; one outlier round = noise from other work):")
    print_rounds("concurrency 1", outcome[1][page.label], outcome[1][me.label])
    print_rounds("concurrency 4", outcome[4][page.label], outcome[4][me.label])

    print("\nGoals (p99 of the page <= 20 ms; page <= 3x GET /api/v1/me, same run):")
    print_goals("HEADLINE concurrency 1", outcome[1][page.label], outcome[1][me.label])
    print_goals("concurrency 4         ", outcome[4][page.label], outcome[4][me.label])
    print_goals("filter ?group= c=1    ", outcome[1][by_group.label], outcome[1][me.label])
    print_goals("filter ?status= c=1   ", outcome[1][by_status.label], outcome[1][me.label])


REQUEST_DURATION = "healthgate_http_request_duration_seconds"


async def handler_seconds(base_url: str) -> dict[str, tuple[float, int]]:
    """Per route: (total seconds, requests) of the API's own request-handling histogram (summed over its other
    labels)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for sample in metric_samples(text):
        route = sample.labels.get("route")
        if route is None:
            continue
        if sample.name == REQUEST_DURATION + "_sum":
            sums[route] = sums.get(route, 0.0) + sample.value
        elif sample.name == REQUEST_DURATION + "_count":
            counts[route] = counts.get(route, 0) + int(sample.value)
    return {route: (sums.get(route, 0.0), counts[route]) for route in counts}


async def prepare(database_url: str) -> tuple[str, Seeded]:
    started = time.perf_counter()
    await migrate(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        seeded = await seed(connection)
        token = await create_token(connection, name="bench-admin", role="admin", groups=[], actor="bench")
        counts = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM hosts) AS hosts, (SELECT count(*) FROM health_checks) AS checks,"
            " (SELECT count(*) FROM check_state) AS states"
        )
    finally:
        await connection.close()
    summary = ", ".join(f"{status} {count}" for status, count in seeded.statuses.items())
    print(
        f"seeded {counts['hosts']} hosts in {len(seeded.groups)} groups, {counts['checks']} checks,"
        f" {counts['states']} check states in {time.perf_counter() - started:.1f} s; hosts: {summary}"
    )
    return token, seeded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller batches (a smoke run)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the load generator's HTTP client")
    parser.add_argument(
        "--keep", action="store_true", help="print the token and database and wait for Enter before measuring"
    )
    arguments = parser.parse_args()
    plan = (
        Plan(rounds=1, batch=300, filter_batch=150, warmup=50)
        if arguments.quick
        else Plan(rounds=4, batch=2000, filter_batch=700, warmup=300)
    )

    run = BenchRun.new()
    os.chdir(REPO_ROOT)  # `python -m services.cli` in the API process
    print(
        f"healthgate API benchmark: {HOSTS} hosts, {HOSTS * CHECKS_PER_HOST} checks,"
        f" page limit {PAGE_LIMIT}, client {arguments.client}, database {run.database}, exchange {run.exchange}"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores shared by the API process, PostgreSQL and this load"
        " generator; concurrency 1 is the headline (server latency), concurrency 4 saturates the cores."
    )
    noisy = "; expect noisy p99s (the p50s hold)"
    with (
        tempfile.TemporaryDirectory(prefix="hgbench-") as tmp,
        guarded(run.remove, lambda _: run.print_service_logs()) as outcome,
    ):
        token, seeded = run_async(prepare(run.database_url))  # type: ignore[misc]
        api = run.start_api(Path(tmp))
        print(f"API process {api.process.pid} ready on {api.base_url}")
        if arguments.keep:
            print(f"token: {token}\ndatabase: {run.database_url}")
            input("press Enter to run the benchmark... ")
        print(f"before measuring: {other_work(noisy=noisy)}")
        run_async(load(api.base_url, token, seeded, plan, arguments.client))
        print(f"\nafter measuring: {other_work(noisy=noisy)}")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
