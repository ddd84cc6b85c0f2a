"""Benchmark: a pruning pass over one day of expired results at 1M, 5M and 10M rows (issue 5, "Speed").

For each size, in a throwaway database of its own: the day before the boundary day holds N expired results
(one daily partition), the boundary day holds 10,000 expired rows just before the cutoff and 100,000 kept
ones after it, and today holds 200,000 current rows. Then `services.pruner.passes.prune_once` (the real pass,
retention 96 h) runs while "pollers" insert results. Figures:

- the pass's duration, each round (goal: flat across sizes, <= 1 s at every size), with where it went: the
  pass's statements, timed through a thin wrapper around the pool it is given;
- the pollers' insert p99 during the pass / their insert p99 without a pass (goal <= 1.5). The pollers are a
  separate process (so their timing shares no event loop or GIL with the pass) with 2 connections, each
  inserting batches of 50 results by COPY into check_results in a tight loop, as services/poller/results.py
  does; "without" is the 2 s before the pass in the same round (after a 0.3 s warm-up), less its last stretch,
  as long as the pass: that stretch is the "control" window, no pass in it, whose ratio shows what noise alone
  gives on this box. "During" is every insert that overlapped the pass; they are also filed under the pass
  statement they overlapped most. Several rounds per size (the pass is short), re-seeding each round.
- Steady state (in the 1M database): what an hourly pass meets every hour at the issue's scale (10,000 hosts x
  5 checks every 5 minutes = 14.4M results a day): the hour that expired since the previous pass, 600,000 rows
  in the boundary day, deleted row by row; no whole day to drop.

Seeding: rows are made inside PostgreSQL (INSERT ... SELECT over generate_series and a 50,000-check template,
one result per check per slot), into a plain table that gets its indexes afterwards and is then attached as
the expired day's partition (a CHECK constraint matching the bounds spares the attach its scan); the time this
takes is printed. The expired partition is a normal logged table with autovacuum off (a freshly filled table
would otherwise be picked by autovacuum, whose lock the pass's DETACH would wait for; a days-old partition was
vacuumed long ago) and ANALYZEd (the pass reports its row estimate); the boundary and current partitions get
VACUUM ANALYZE, and a CHECKPOINT runs before each round. Everything is removed at the end, also on error,
Ctrl-C or SIGTERM. About 2.5 minutes in all (10M rows take ~30-40 s to seed, per round); --quick: ~30 s.

    .venv/bin/python bench/pruner.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import multiprocessing
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from _support import (
    BenchRun,
    cleanup_step,
    guarded,
    load_line,
    machine_note,
    other_work,
    percentile,
    remove_database,
    run_async,
    spread,
    verdict,
    with_database,
)

from services.pruner.passes import Retention, prune_once
from shared.database import DELETE_BATCH, create_pool
from shared.results import ensure_result_partitions, result_partition_name
from shared.schema import migrate

SIZES = (1_000_000, 5_000_000, 10_000_000)
ROUNDS = {1_000_000: 3, 5_000_000: 3, 10_000_000: 2}
CHECKS = 50_000  # 10,000 hosts x 5 checks
RETENTION_HOURS = 96.0
BOUNDARY_EXPIRED_ROWS = 10_000
ROWS_PER_DAY = 10_000 * 5 * 288  # the estate: 14.4M results a day
STEADY_ROWS = ROWS_PER_DAY // 24  # what one hour adds, and so what an hourly pass finds expired
BOUNDARY_KEPT_ROWS = 100_000
CURRENT_ROWS = 200_000
WRITER_CONNECTIONS = 2
WRITER_BATCH = 50
BASELINE_SECONDS = 2.0
WARMUP_SECONDS = 0.3
AFTER_SECONDS = 0.3
PASS_GOAL_SECONDS = 1.0
RATIO_GOAL = 1.5
DROP_LABEL = "DROP TABLE (expired day)"
DELETE_LABEL = f"DELETE boundary rows (batches of {DELETE_BATCH})"
RESULT_COLUMNS = ["id", "check_id", "host_id", "checked_at", "healthy", "reason", "status", "detail", "latency_ms"]


# ---- the pollers: a separate process --------------------------------------------------------------------


def writer_process(dsn: str, pipe: PipeEnd, stop: Any) -> None:
    """Insert batches by COPY on each "go" until `stop` is set; send back [(start, end)] in monotonic seconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops this process
    run_async(_writer(dsn, pipe, stop))


async def _writer(dsn: str, pipe: PipeEnd, stop: Any) -> None:
    connections = [await asyncpg.connect(dsn) for _ in range(WRITER_CONNECTIONS)]
    checks = [(uuid.uuid4(), uuid.uuid4()) for _ in range(CHECKS // 10)]
    try:
        while pipe.recv() == "go":
            samples: list[tuple[float, float]] = []

            async def insert_loop(
                connection: asyncpg.Connection, offset: int, samples: list[tuple[float, float]]
            ) -> None:
                position = offset
                while not stop.is_set():
                    now = dt.datetime.now(dt.UTC)
                    rows = []
                    for _ in range(WRITER_BATCH):
                        check_id, host_id = checks[position % len(checks)]
                        position += 1
                        rows.append((uuid.uuid4(), check_id, host_id, now, True, "ok", "healthy", "HTTP 200", 3.2))
                    started = time.monotonic()
                    await connection.copy_records_to_table("check_results", records=rows, columns=RESULT_COLUMNS)
                    samples.append((started, time.monotonic()))

            await asyncio.gather(
                *(insert_loop(connection, index * 997, samples) for index, connection in enumerate(connections))
            )
            pipe.send(samples)
    finally:
        for connection in connections:
            await connection.close()


@dataclass
class Writer:
    process: Any
    pipe: PipeEnd
    stop: Any

    @classmethod
    def start(cls, dsn: str) -> Writer:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        stop = context.Event()
        process = context.Process(target=writer_process, args=(dsn, theirs, stop), daemon=True)
        process.start()
        return cls(process, ours, stop)

    def go(self) -> None:
        self.stop.clear()
        self.pipe.send("go")

    def halt(self) -> list[tuple[float, float]]:
        self.stop.set()
        if not self.pipe.poll(30):
            raise RuntimeError("the writer process did not answer")
        return self.pipe.recv()  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.pipe.send("quit")
            except OSError:
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# ---- timing the pass's statements --------------------------------------------------------------------------


def statement_label(query: str) -> str:
    text = " ".join(query.split())
    text = re.sub(r"check_results_\d{8}", "check_results_<day>", text)
    for prefix, label in (
        ("SELECT pg_try_advisory_lock", "advisory lock"),
        ("SELECT pg_advisory_unlock", "advisory unlock"),
        ("SELECT now()", "now()"),
        ("SELECT child.relname FROM pg_inherits", "ensure partitions: list"),
        ("CREATE TABLE", "ensure partitions: create"),
        ("SELECT child.relname AS name", "list partitions"),
        ("SELECT reltuples", "row estimate"),
        ("ALTER TABLE check_results DETACH PARTITION check_results_<day> CONCURRENTLY", "DETACH ... CONCURRENTLY"),
        ("ALTER TABLE check_results DETACH PARTITION check_results_<day> FINALIZE", "DETACH ... FINALIZE"),
        ("DROP TABLE IF EXISTS", "DROP leftovers"),
        ("DROP TABLE", DROP_LABEL),
        ("SELECT relname FROM pg_class", "find leftovers"),
        ("DELETE FROM check_results_<day>", DELETE_LABEL),
        ("DELETE FROM gate_jobs", "DELETE decided gate jobs"),
        ("DELETE FROM outbox", "DELETE sent outbox rows"),
        ("SELECT min(checked_at)", "oldest result"),
    ):
        if text.startswith(prefix):
            return label
    return text[:60]


@dataclass(frozen=True)
class Span:
    """One statement of the pass: its label and when it ran (monotonic seconds, comparable across processes)."""

    label: str
    start: float
    end: float


class TimedConnection:
    """An asyncpg connection whose execute/fetch* calls are timed, by statement."""

    def __init__(self, connection: asyncpg.Connection, spans: list[Span]) -> None:
        self._connection = connection
        self._spans = spans

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def _timed(self, method: str, query: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await getattr(self._connection, method)(query, *args, **kwargs)
        finally:
            self._spans.append(Span(statement_label(query), started, time.monotonic()))

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("execute", query, *args, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("fetch", query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("fetchval", query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await self._timed("fetchrow", query, *args, **kwargs)


class _TimedAcquire:
    def __init__(self, acquiring: Any, spans: list[Span]) -> None:
        self._acquiring = acquiring
        self._spans = spans

    async def __aenter__(self) -> TimedConnection:
        return TimedConnection(await self._acquiring.__aenter__(), self._spans)

    async def __aexit__(self, *exc: object) -> None:
        await self._acquiring.__aexit__(*exc)


class TimedPool:
    """What prune_once uses of a pool (acquire), handing out timed connections."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.spans: list[Span] = []

    def acquire(self) -> _TimedAcquire:
        return _TimedAcquire(self._pool.acquire(), self.spans)


# ---- seeding ----------------------------------------------------------------------------------------------


async def fill(connection: asyncpg.Connection, table: str, start: dt.datetime, seconds: float, rows: int) -> None:
    """`rows` results spread evenly over [start, start + seconds): slots of one result per template check."""
    slots = math.ceil(rows / CHECKS)
    slot_step = seconds * 1e6 / slots
    check_step = slot_step / min(rows, CHECKS)
    await connection.execute(
        f"""
        INSERT INTO {table} ({", ".join(RESULT_COLUMNS)})
        SELECT t.id, t.check_id, t.host_id, s.at + (t.n * $3::float8) * interval '1 microsecond',
               true, 'ok', 'healthy', 'HTTP 200 in 12 ms', 12.5
        FROM (SELECT g, $1::timestamptz + (g * $2::float8) * interval '1 microsecond' AS at
              FROM generate_series(0, $4::int - 1) AS g) AS s
        CROSS JOIN bench_template AS t
        WHERE s.g * {CHECKS}::bigint + t.n < $5::bigint
        """,
        start,
        slot_step,
        check_step,
        slots,
        rows,
    )


@dataclass
class Day:
    day: dt.date

    @property
    def name(self) -> str:
        return result_partition_name(self.day)

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.day, dt.time(), dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(days=1)


async def seed_expired_day(connection: asyncpg.Connection, day: Day, rows: int) -> dict[str, float]:
    """A plain table filled, indexed, then attached as the day's partition. Returns seconds per step."""
    steps: dict[str, float] = {}
    started = time.perf_counter()
    await connection.execute(
        f"CREATE TABLE {day.name} (LIKE check_results INCLUDING DEFAULTS) WITH (autovacuum_enabled = false)"
    )
    await fill(connection, day.name, day.start, 86400.0, rows)
    steps["insert"] = time.perf_counter() - started
    started = time.perf_counter()
    await connection.execute("SET maintenance_work_mem = '512MB'")
    await connection.execute(f"ALTER TABLE {day.name} ADD PRIMARY KEY (check_id, checked_at, id)")
    await connection.execute(f"CREATE INDEX ON {day.name} (checked_at)")
    await connection.execute("RESET maintenance_work_mem")
    steps["indexes"] = time.perf_counter() - started
    started = time.perf_counter()
    bounds = f"FROM ('{day.start.isoformat()}') TO ('{day.end.isoformat()}')"
    await connection.execute(
        f"ALTER TABLE {day.name} ADD CONSTRAINT bench_bounds"
        f" CHECK (checked_at >= '{day.start.isoformat()}' AND checked_at < '{day.end.isoformat()}')"
    )
    await connection.execute(f"ALTER TABLE check_results ATTACH PARTITION {day.name} FOR VALUES {bounds}")
    await connection.execute(f"ALTER TABLE {day.name} DROP CONSTRAINT bench_bounds")
    await connection.execute(f"ANALYZE {day.name}")
    steps["attach+analyze"] = time.perf_counter() - started
    return steps


@dataclass
class Layout:
    today: Day
    boundary: Day
    expired: Day


async def prepare_database(connection: asyncpg.Connection) -> Layout:
    now: dt.datetime = await connection.fetchval("SELECT now()")
    cutoff = now - dt.timedelta(hours=RETENTION_HOURS)
    boundary = Day(cutoff.date())
    layout = Layout(today=Day(now.date()), boundary=boundary, expired=Day(boundary.day - dt.timedelta(days=1)))
    # Partitions from the boundary day to a week ahead (the migration made yesterday's to a week ahead).
    day = boundary.day + dt.timedelta(days=1)
    while day < now.date():
        await ensure_result_partitions(connection, day, days_ahead=0)
        day += dt.timedelta(days=1)
    await connection.execute(
        "CREATE UNLOGGED TABLE bench_template AS"
        " SELECT n, gen_random_uuid() AS id, gen_random_uuid() AS check_id,"
        f" ('00000000-0000-4000-8000-' || lpad(to_hex(n / 5), 12, '0'))::uuid AS host_id"
        f" FROM generate_series(0, {CHECKS - 1}) AS n"
    )
    await fill(connection, layout.today.name, now - dt.timedelta(hours=1), 3000.0, CURRENT_ROWS)
    kept_from = cutoff + dt.timedelta(minutes=10)
    if boundary.end - kept_from > dt.timedelta(minutes=1):
        await fill(connection, boundary.name, kept_from, (boundary.end - kept_from).total_seconds(), BOUNDARY_KEPT_ROWS)
    return layout


async def seed_boundary_rows(connection: asyncpg.Connection, layout: Layout, rows: int, minutes: float) -> int:
    """`rows` expired rows in the boundary day, over the `minutes` before the cutoff (2 minutes of margin)."""
    now: dt.datetime = await connection.fetchval("SELECT now()")
    cutoff = now - dt.timedelta(hours=RETENTION_HOURS)
    first = max(layout.boundary.start + dt.timedelta(seconds=1), cutoff - dt.timedelta(minutes=minutes + 2))
    last = cutoff - dt.timedelta(minutes=2)
    if last <= first or first.date() != layout.boundary.day:
        return 0  # the cutoff lies too close to midnight: no room for expired rows in the boundary day
    await fill(connection, layout.boundary.name, first, (last - first).total_seconds(), rows)
    return rows


# ---- one round: a pass with the pollers writing -----------------------------------------------------------


@dataclass
class RoundResult:
    seconds: float
    dropped: list[str]
    dropped_rows: int
    deleted_rows: int
    spans: list[Span]
    samples: list[tuple[float, float]]
    pass_start: float
    pass_end: float
    without: list[float]  # the baseline window before the pass (less the control window)
    during: list[float]  # every insert that overlapped the pass
    control: list[float]  # the window just before the pass, as long as the pass: what noise alone does

    @property
    def drop_seconds(self) -> float:
        return sum(span.end - span.start for span in self.spans if span.label == DROP_LABEL)

    @property
    def ratio(self) -> float:
        return percentile(self.during, 0.99) / percentile(self.without, 0.99)

    def during_by_statement(self) -> dict[str, list[float]]:
        """Each insert that overlapped the pass, filed under the pass statement it overlapped most."""
        grouped: dict[str, list[float]] = {}
        for start, end in self.samples:
            if not (start < self.pass_end and end > self.pass_start):
                continue
            best, overlap = "between statements", 0.0
            for span in self.spans:
                shared = min(end, span.end) - max(start, span.start)
                if shared > overlap:
                    best, overlap = span.label, shared
            if best not in (DROP_LABEL, DELETE_LABEL, "between statements"):
                best = "other statements"
            grouped.setdefault(best, []).append((end - start) * 1000)
        return grouped


async def one_round(pool: asyncpg.Pool, writer: Writer, retention: Retention) -> RoundResult:
    timed = TimedPool(pool)
    go = time.monotonic()
    writer.go()
    await asyncio.sleep(BASELINE_SECONDS)
    pass_start = time.monotonic()
    report = await prune_once(timed, retention)  # type: ignore[arg-type]
    pass_end = time.monotonic()
    await asyncio.sleep(AFTER_SECONDS)
    samples = writer.halt()

    def overlapping(first: float, last: float) -> list[float]:
        return [(end - start) * 1000 for start, end in samples if start < last and end > first]

    # The control window: the end of the baseline, as long as the pass (at most half the baseline).
    control_start = pass_start - min(pass_end - pass_start, (BASELINE_SECONDS - WARMUP_SECONDS) / 2)
    without = [(end - start) * 1000 for start, end in samples if start >= go + WARMUP_SECONDS and end <= control_start]
    return RoundResult(
        seconds=pass_end - pass_start, dropped=report.partitions_dropped, dropped_rows=report.partition_rows_dropped,
        deleted_rows=report.result_rows_deleted, spans=timed.spans, samples=samples, pass_start=pass_start,
        pass_end=pass_end, without=without, during=overlapping(pass_start, pass_end),
        control=overlapping(control_start, pass_start),
    )  # fmt: skip


def print_round(number: int, outcome: RoundResult, seeding: str) -> None:
    print(f"  round {number}: {seeding}")
    dropped = ", ".join(outcome.dropped) or "nothing"
    print(
        f"    pass {outcome.seconds:.3f} s: dropped {dropped} (~{outcome.dropped_rows:,} rows),"
        f" deleted {outcome.deleted_rows:,} boundary rows"
    )
    timings: dict[str, list[float]] = {}
    for span in outcome.spans:
        timings.setdefault(span.label, []).append(span.end - span.start)
    top = sorted(timings.items(), key=lambda item: -sum(item[1]))[:6]
    print(
        "    where: "
        + ", ".join(f"{label} {sum(values) * 1000:.1f} ms" + (f" ({len(values)}x)" if len(values) > 1 else "")
                    for label, values in top)
    )  # fmt: skip
    print(
        f"    inserts without a pass: {spread(outcome.without)}\n"
        f"    inserts during the pass: {spread(outcome.during)}; p99 ratio {outcome.ratio:.2f}\n"
        f"    control (just before the pass, as long, no pass): {spread(outcome.control)}"
    )


@dataclass
class SizeResult:
    label: str
    rows: int
    rounds: list[RoundResult] = field(default_factory=list)

    def pooled(self, attribute: str) -> list[float]:
        return [value for outcome in self.rounds for value in getattr(outcome, attribute)]

    @property
    def ratio(self) -> float:
        return percentile(self.pooled("during"), 0.99) / percentile(self.pooled("without"), 0.99)

    @property
    def control_ratio(self) -> float:
        return percentile(self.pooled("control"), 0.99) / percentile(self.pooled("without"), 0.99)


def print_size(result: SizeResult) -> None:
    seconds = [outcome.seconds for outcome in result.rounds]
    rest = [outcome.seconds - outcome.drop_seconds for outcome in result.rounds]
    without, during, control = (result.pooled(name) for name in ("without", "during", "control"))
    print(
        f"  {result.label}: pass {' '.join(f'{value:.3f}' for value in seconds)} s"
        f" (without its DROP TABLE: {' '.join(f'{value:.3f}' for value in rest)} s);"
        f" inserts p99 without {percentile(without, 0.99):.2f} ms (n={len(without)}),"
        f" during {percentile(during, 0.99):.2f} ms (n={len(during)}): ratio {result.ratio:.2f};"
        f" control window {percentile(control, 0.99):.2f} ms (n={len(control)}): ratio {result.control_ratio:.2f}"
    )
    grouped: dict[str, list[float]] = {}
    for outcome in result.rounds:
        for label, values in outcome.during_by_statement().items():
            grouped.setdefault(label, []).extend(values)
    print("    inserts during the pass, by the pass statement they overlapped most:")
    for label, values in sorted(grouped.items()):
        print(f"      {label}: {spread(values)}")


# ---- one size ----------------------------------------------------------------------------------------------


def retention() -> Retention:
    return Retention(
        results=dt.timedelta(hours=RETENTION_HOURS), decided_jobs=dt.timedelta(days=30),
        sent_outbox=dt.timedelta(hours=24),
    )  # fmt: skip


async def settle(connection: asyncpg.Connection, layout: Layout) -> None:
    for day in (layout.boundary, layout.today):
        await connection.execute(f"VACUUM ANALYZE {day.name}")
    await connection.execute("CHECKPOINT")


async def measure_size(database_url: str, rows: int, rounds: int, steady_rounds: int) -> list[SizeResult]:
    started = time.perf_counter()
    await migrate(database_url)
    connection = await asyncpg.connect(database_url)
    pool = await create_pool(database_url, min_size=1, max_size=3)  # the pruner service's pool size
    writer = Writer.start(database_url)
    results = [SizeResult(f"{rows:,} expired rows", rows)]
    try:
        layout = await prepare_database(connection)
        print(
            f"\n{rows:,} expired rows: database ready in {time.perf_counter() - started:.1f} s"
            f" (expired day {layout.expired.day}, boundary day {layout.boundary.day}, {CURRENT_ROWS:,} current rows,"
            f" {BOUNDARY_KEPT_ROWS:,} kept rows in the boundary day)"
        )
        for number in range(1, rounds + 1):
            seeding = time.perf_counter()
            steps = await seed_expired_day(connection, layout.expired, rows)
            boundary_rows = await seed_boundary_rows(connection, layout, BOUNDARY_EXPIRED_ROWS, 50)
            await settle(connection, layout)
            outcome = await one_round(pool, writer, retention())
            results[0].rounds.append(outcome)
            print_round(
                number, outcome,
                f"seeded in {time.perf_counter() - seeding:.1f} s (insert {steps['insert']:.1f} s,"
                f" indexes {steps['indexes']:.1f} s, attach+analyze {steps['attach+analyze']:.1f} s,"
                f" {boundary_rows:,} expired boundary rows, vacuum, checkpoint)",
            )  # fmt: skip
        print_size(results[0])
        if steady_rounds:
            steady = SizeResult(f"steady state, {STEADY_ROWS:,} boundary rows", STEADY_ROWS)
            results.append(steady)
            print(
                f"\nsteady state: an hourly pass at {ROWS_PER_DAY:,} results a day (10,000 hosts x 5 checks every"
                f" 5 min) finds the hour that expired since the last pass in the boundary day: {STEADY_ROWS:,} rows"
                " to delete, no whole day to drop"
            )
            for number in range(1, steady_rounds + 1):
                seeding = time.perf_counter()
                boundary_rows = await seed_boundary_rows(connection, layout, STEADY_ROWS, 60)
                await settle(connection, layout)
                outcome = await one_round(pool, writer, retention())
                steady.rounds.append(outcome)
                print_round(number, outcome, f"seeded {boundary_rows:,} rows in {time.perf_counter() - seeding:.1f} s")
            print_size(steady)
    finally:
        cleanup_step("stop the writer process", writer.close)
        await pool.close()
        await connection.close()
    return results


# ---- the run ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M rows only, two rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per size (default: 3 at 1M and 5M, 2 at 10M)")
    arguments = parser.parse_args()
    sizes = SIZES[:1] if arguments.quick else SIZES

    run = BenchRun.new()
    databases: list[str] = []

    def drop_databases() -> None:
        for database in databases:
            remove_database(run.server_url, database)

    print(
        f"healthgate pruner benchmark: sizes {', '.join(f'{size:,}' for size in sizes)} expired rows,"
        f" retention {RETENTION_HOURS:.0f} h, {WRITER_CONNECTIONS} writer connections x {WRITER_BATCH}-row COPY batches"
    )
    print(machine_note())
    print(f"before: {load_line()}; {other_work()}")
    sized: list[SizeResult] = []
    steady: list[SizeResult] = []
    began = time.perf_counter()
    with guarded(drop_databases) as outcome:
        for index, size in enumerate(sizes):
            database = f"{run.database}_{size // 1_000_000}m"
            databases.append(database)
            rounds = arguments.rounds or (2 if arguments.quick else ROUNDS[size])
            steady_rounds = 0 if index else (1 if arguments.quick else 2)
            try:
                measured: list[SizeResult] = run_async(  # type: ignore[assignment]
                    measure_size(with_database(run.server_url, database), size, rounds, steady_rounds)
                )
            finally:
                remove_database(run.server_url, database)
            sized.append(measured[0])
            steady += measured[1:]
        print_goals(sized, steady)
        print(f"\ntotal {time.perf_counter() - began:.0f} s; after: {load_line()}; {other_work()}")
    return outcome.exit_code


def print_goals(sized: list[SizeResult], steady: list[SizeResult]) -> None:
    print(
        f"\nGOALS (pass <= {PASS_GOAL_SECONDS:.0f} s and flat; inserts p99 during a pass / without <= {RATIO_GOAL};"
        " the control ratio is what the same comparison gives with no pass at all: the noise floor)"
    )
    for result in [*sized, *steady]:
        slowest = max(outcome.seconds for outcome in result.rounds)
        print(
            f"  {result.label:<40} slowest pass {slowest:.3f} s: {verdict(slowest <= PASS_GOAL_SECONDS)};"
            f" inserts p99 ratio {result.ratio:.2f}: {verdict(result.ratio <= RATIO_GOAL)}"
            f" (control {result.control_ratio:.2f})"
        )
    if len(sized) > 1:
        for label, measure in (
            ("pass", lambda outcome: outcome.seconds),
            ("DROP TABLE alone", lambda outcome: outcome.drop_seconds),
            ("pass without its DROP TABLE", lambda outcome: outcome.seconds - outcome.drop_seconds),
        ):
            medians = [percentile([measure(outcome) for outcome in result.rounds], 0.5) for result in sized]
            growth = medians[-1] / medians[0]
            print(
                f"  flat? median {label}: {' -> '.join(f'{value:.3f}' for value in medians)} s,"
                f" {sized[-1].rows // sized[0].rows}x the rows: {growth:.2f}x"
                f" ({'flat' if growth <= 1.5 else 'grows with the data'})"
            )


if __name__ == "__main__":
    sys.exit(main())
