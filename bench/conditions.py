"""Benchmark: what an http check's `condition` costs the poller, as checks/s of a real poller with and without one.

The condition measured is `json.status == "UP" && latency_ms < 500` (CONTRACT §3), on http checks of a local nginx
whose `/actuator/health` answers `{"status":"UP"}` (nginx keeps connections alive, but the poller opens one per run
since issue 13's adversarial pass, as blackbox_exporter does; measured runs before that change had keep-alive).
Two sets of CHECKS checks, P and Q, alike but for the condition, run in alternating
rounds of one poller (the ticks fed are those of one set, then the other's). In a first phase Q has the condition,
in a second P has it (an UPDATE between them), each phase starting and ending with a round without: each round with
the condition sits between two without it, so a drift of this shared 2-core box during the run falls on both sides
alike, and each set is measured with and without the condition, so what makes one set's checks cheaper than the
other's (measured at about 5% in a run without any condition) cancels out. Goal: with / without >= 0.9x. Figures
only: it never fails on the goal.

The path measured is bench/poller.py's, reused from there: a Tick of 50 checks on the work queue -> the poller's
checks -> batch write of results and check state with `check.result` rows in the outbox -> ack -> the outbox relay
publishes `check.result`. Checks/s are the results the poller stored (its healthgate_results_stored counter): the
`check.result` events counted on a queue this benchmark binds are printed too, but they follow the outbox relay's
pace, which the database and broker (shared with whatever else runs on the box) set more than the checks do. A
round: warm-up, then a measured stretch. Each round with the condition is divided by the mean of its two neighbours;
the ratio reported is the geometric mean of the two phases' means of those. Noise is shown as their spread, each
side's spread over its rounds, and the two phases apart (their quotient shows what the choice of set alone does).

Also printed: the poller's CPU per check on each side, of the whole process and of its main thread alone (its event
loop, where checks and conditions run; the outbox relay has a thread of its own): figures less sensitive to the
box's other work than checks/s. And a check
that the condition was evaluated (the results' details say "condition true") and on the event loop (the poller
started no condition worker process), and the cost of one evaluation alone, measured in this process.

Set-up: a throwaway database and exchange (bench/_support.py `BenchRun`), 2 x CHECKS hosts with one http check each
(seeded healthy and never scheduled by bench/poller.py's `seed`), one `healthgate poller` process. Everything is
removed at the end, also on error, Ctrl-C or SIGTERM. About 100 s.

    .venv/bin/python bench/conditions.py [--quick] [--rounds N] [--checks N] [--condition CEL]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    CLOCK_TICKS,
    BenchNginx,
    BenchRun,
    CpuMeter,
    cleanup_step,
    connected,
    default_group,
    failure_note,
    guarded,
    machine_note,
    other_work,
    process_tree,
    run_async,
)
from poller import Outbox, Pipeline, poller_metrics, seed

from tests.support.processes import ServiceProcess

CONDITION = 'json.status == "UP" && latency_ms < 500'
PATH = "/actuator/health"
BODY = '{"status":"UP"}'
CHECKS = 2_000
GOAL = 0.9
RESULT_QUEUE_SUFFIX = "bench-results"  # as bench/poller.py's Pipeline names it


@dataclass
class Plan:
    rounds: int  # rounds with the condition, per phase
    warmup: float
    seconds: float


FULL = Plan(rounds=4, warmup=1.0, seconds=3.0)  # rounds with the condition per phase
QUICK = Plan(rounds=1, warmup=1.0, seconds=2.0)


class ActuatorNginx(BenchNginx):
    """The benchmarks' nginx with a Spring-Boot-like health endpoint answering `{"status":"UP"}`."""

    def _config(self) -> str:
        config = super()._config()
        marker = "        location / { return 404; }\n"
        if marker not in config:
            raise RuntimeError("bench/_support.py changed its nginx configuration; update bench/conditions.py")
        location = f"        location = {PATH} {{ default_type application/json; return 200 '{BODY}'; }}\n"
        return config.replace(marker, location + marker)


@dataclass
class Round:
    side: str  # "without" or "with"
    rate: float  # checks run and their results stored per second (the poller's healthgate_results_stored)
    published: float  # check.result events counted per second (the outbox relay's pace)
    poller_cpu_us: float  # poller process CPU per stored result
    loop_cpu_us: float  # the poller's main thread (its event loop: the checks, not the outbox relay's thread)


async def measure_round(
    pipeline: Pipeline, outbox: Outbox, poller: ServiceProcess, plan: Plan, side: str, bodies: list[bytes]
) -> Round:
    own = process_tree(poller.process.pid)

    def classify(pid: int, command: str) -> str | None:
        return "poller" if pid in own else default_group(pid, command)

    pipeline.bodies, pipeline.next_body = bodies, 0
    await outbox.discard_backlog()
    await pipeline.purge()
    pipeline.feeding.set()
    await asyncio.sleep(plan.warmup)
    meter = CpuMeter(classify)
    loop_before = process_cpu_seconds(poller.process.pid, thread=True)
    stored_before = (await poller_metrics(poller.port)).get("results stored", 0.0)
    published_before = await pipeline.results()
    meter.start()
    started = time.monotonic()
    await asyncio.sleep(plan.seconds)
    stored_after = (await poller_metrics(poller.port)).get("results stored", 0.0)
    published_after = await pipeline.results()
    wall = time.monotonic() - started
    cpu = meter.stop()
    loop_cpu = process_cpu_seconds(poller.process.pid, thread=True) - loop_before
    pipeline.feeding.clear()
    await pipeline.purge_ticks()
    await asyncio.sleep(0.5)  # the ticks at work finish before the next round's
    stored = stored_after - stored_before
    return Round(
        side, stored / wall, (published_after - published_before) / wall,
        cpu.groups.get("poller", 0.0) / max(1.0, stored) * 1e6, loop_cpu / max(1.0, stored) * 1e6,
    )  # fmt: skip


def process_cpu_seconds(pid: int, *, thread: bool = False) -> float:
    """utime + stime of a process, or with `thread` of its main thread alone (/proc/PID/task/PID/stat)."""
    path = f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def evaluation_cost() -> float:
    """µs per `ConditionEvaluator.judge` of CONDITION on the benchmark's answer, in this process (inline)."""
    from services.poller.conditions import ConditionEvaluator, ResponseFacts

    async with ConditionEvaluator() as evaluator:
        facts = ResponseFacts(200, {"content-type": "application/json"}, BODY, 1.5, None)
        assert evaluator.runs_inline(CONDITION, facts)
        for _ in range(1000):
            await evaluator.judge(CONDITION, facts, time_left=10)
        count = 20_000
        started = time.perf_counter()
        for _ in range(count):
            await evaluator.judge(CONDITION, facts, time_left=10)
        return (time.perf_counter() - started) / count * 1e6


def slowest_inline_ms() -> float:
    """ms of the costliest evaluation the inline rule still keeps on the event loop (16 references to 4 KiB of
    819 nested maps, tests/unit/test_poller_conditions.py), the least of 5, in this process."""
    from services.poller.conditions import ConditionEvaluator, ProgramCache, ResponseFacts, evaluate

    deep_maps = '{"":' * 819 + "0" + "}" * 819
    expression = "size([" + ",".join(["json"] * 16) + "]) == 0"
    facts = ResponseFacts(200, {"content-type": "application/json"}, deep_maps, 1.5, None)
    assert ConditionEvaluator().runs_inline(expression, facts)
    compiled = ProgramCache().get(expression)
    assert not isinstance(compiled, Exception)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        evaluate(compiled, expression, facts)
        timings.append(time.perf_counter() - started)
    return min(timings) * 1000


def spread_line(values: list[float], unit: str, digits: int = 0) -> str:
    mean = statistics.fmean(values)
    deviation = statistics.stdev(values) / mean * 100 if len(values) > 1 and mean else 0.0
    return (
        f"mean {mean:,.{digits}f} {unit}, min {min(values):,.{digits}f}, max {max(values):,.{digits}f},"
        f" relative stdev {deviation:.1f}% over {len(values)} rounds"
    )


def sandwich_ratios(rounds: list[Round]) -> list[float]:
    """Each round with the condition against the mean of the rounds without it on either side of it."""
    return [
        rounds[index].rate / statistics.fmean([rounds[index - 1].rate, rounds[index + 1].rate])
        for index in range(1, len(rounds) - 1)
        if rounds[index].side == "with"
    ]


async def run(arguments: argparse.Namespace, plan: Plan, tmp: Path, bench: BenchRun, nginx: ActuatorNginx) -> None:
    url = nginx.http_url(PATH)
    check_ids = await seed(bench.database_url, 2 * arguments.checks, url)
    sets = {"P": check_ids[: arguments.checks], "Q": check_ids[arguments.checks :]}
    async with connected(bench.database_url) as connection:
        await connection.execute("UPDATE health_checks SET expected_body = NULL")
    print(f"seeded 2 x {arguments.checks} hosts with one http check each of {url}")
    pipeline = Pipeline(bench.amqp_url, bench.exchange, check_ids)
    bodies = {name: Pipeline(bench.amqp_url, bench.exchange, ids).bodies for name, ids in sets.items()}
    phases: list[list[Round]] = []
    try:
        await pipeline.open()
        poller = await asyncio.to_thread(
            bench.start_service, "poller", "HEALTHGATE_HEALTH_PORT", tmp, label="poller",
            HEALTHGATE_KEY_FILE=str(tmp / "key"),
        )  # fmt: skip
        print(f"poller process {poller.process.pid} ready; before measuring: {other_work()}")
        outbox = Outbox(bench.database_url)
        for plain, conditioned in (("P", "Q"), ("Q", "P")):
            async with connected(bench.database_url) as connection:
                await connection.execute("UPDATE health_checks SET condition = NULL WHERE id = ANY($1)", sets[plain])
                await connection.execute(
                    "UPDATE health_checks SET condition = $1 WHERE id = ANY($2)", arguments.condition, sets[conditioned]
                )
                await connection.execute("VACUUM (ANALYZE) health_checks")
            print(f"phase {len(phases) + 1}: set {conditioned} with the condition, set {plain} without")
            phase: list[Round] = []
            for side in ["without", "with"] * plan.rounds + ["without"]:
                name = conditioned if side == "with" else plain
                done = await measure_round(pipeline, outbox, poller, plan, side, bodies[name])
                phase.append(done)
                print(f"  {side:<8} {name}  {done.rate:8,.0f} checks/s stored, {done.published:8,.0f}/s published,"
                      f" poller CPU {done.poller_cpu_us:4.0f} µs/check, its event loop's {done.loop_cpu_us:4.0f}",
                      flush=True)  # fmt: skip
            phases.append(phase)
        metrics = await poller_metrics(poller.port)
        workers = len(process_tree(poller.process.pid)) - 1
        async with connected(bench.database_url) as connection:
            evaluated = await connection.fetchval(
                "SELECT count(*) FROM check_results WHERE detail LIKE '%condition true'"
            )
            failing = await connection.fetchval("SELECT count(*) FROM check_results WHERE NOT healthy")
    finally:
        await pipeline.close()
    report(phases, metrics, workers, evaluated, failing, await evaluation_cost())


def report(
    phases: list[list[Round]],
    metrics: dict[str, float],
    workers: int,
    evaluated: int,
    failing: int,
    alone_us: float,
) -> None:
    rounds = [measured for phase in phases for measured in phase]
    without = [r for r in rounds if r.side == "without"]
    with_ = [r for r in rounds if r.side == "with"]
    print(f"\nchecks/s without a condition: {spread_line([r.rate for r in without], 'checks/s')}")
    print(f"checks/s with the condition:  {spread_line([r.rate for r in with_], 'checks/s')}")
    per_phase = [sandwich_ratios(phase) for phase in phases]
    means = [statistics.fmean(ratios) for ratios in per_phase]
    ratio = statistics.geometric_mean(means)
    every = [value for ratios in per_phase for value in ratios]
    print(
        f"\nratio with / without: {ratio:.3f}x (goal >= {GOAL}x): {'MET' if ratio >= GOAL else 'NOT MET'}"
        f"\n  each round with the condition against the mean of its two neighbours without, phase by phase: "
        + "; ".join(", ".join(f"{value:.3f}" for value in ratios) for ratios in per_phase)
        + f"\n  (min {min(every):.3f}, max {max(every):.3f}, stdev {statistics.stdev(every):.3f});"
        f" phase means {' and '.join(f'{mean:.3f}' for mean in means)}: apart by"
        f" {math.sqrt(means[0] / means[1]):.3f}x either way, what the choice of set does plus noise; the"
        " geometric mean cancels the first"
    )
    for label, attribute in (("poller CPU", "poller_cpu_us"), ("its event loop's (main thread)", "loop_cpu_us")):
        cpu_without = statistics.fmean(getattr(r, attribute) for r in without)
        cpu_with = statistics.fmean(getattr(r, attribute) for r in with_)
        print(
            f"{label} per check: {cpu_without:.0f} µs without, {cpu_with:.0f} µs with the condition"
            f" ({cpu_with - cpu_without:+.0f} µs, {cpu_with / cpu_without:.3f}x)"
        )
    print(f"one evaluation alone (ConditionEvaluator.judge, inline, in this process): {alone_us:.1f} µs")
    print(
        f"the costliest evaluation still run inline (16 references to 4 KiB of nested maps): {slowest_inline_ms():.1f}"
        " ms (196 references held the loop 62 ms before the inline rule counted them)"
    )
    print(
        f"cross-check: {evaluated:,} stored results say 'condition true', {failing:,} unhealthy results;"
        f" the poller has {workers} condition worker process(es) (0: every evaluation ran inline);"
        f" poller metrics: {', '.join(f'{k} {v:,.0f}' for k, v in sorted(metrics.items()) if v)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one short round with the condition a phase")
    parser.add_argument("--rounds", type=int, help="rounds with the condition per phase")
    parser.add_argument("--checks", type=int, default=CHECKS, help=f"http checks per set (default {CHECKS})")
    parser.add_argument("--condition", default=CONDITION, help="another condition to measure (an experiment)")
    arguments = parser.parse_args()
    plan = QUICK if arguments.quick else FULL
    if arguments.rounds:
        plan = dataclasses.replace(plan, rounds=arguments.rounds)
    bench = BenchRun.new()
    print(
        f"healthgate condition benchmark: 2 x {arguments.checks} http checks, 2 phases of {plan.rounds} rounds with the"
        f" condition and {plan.rounds + 1} without, each"
        f" {plan.seconds:g} s after {plan.warmup:g} s warm-up, condition {CONDITION!r}; database {bench.database},"
        f" exchange {bench.exchange}"
    )
    print(machine_note())
    nginx = ActuatorNginx()
    with tempfile.TemporaryDirectory(prefix="hgbench-conditions-") as tmp_name:

        def failed(exc: Exception) -> None:
            print(failure_note(exc), file=sys.stderr)
            bench.print_service_logs()

        def clean_up() -> None:
            for label, service in bench.services:
                cleanup_step(f"stop {label} (pid {service.process.pid})", service.stop)
            cleanup_step("stop nginx", nginx.stop)
            bench.remove(extra_queues=[f"{bench.exchange}.{RESULT_QUEUE_SUFFIX}"])

        with guarded(clean_up, failed) as outcome:
            nginx.start()
            started = time.monotonic()
            run_async(run(arguments, plan, Path(tmp_name), bench, nginx))
            print(f"\n(took {time.monotonic() - started:.0f} s)")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
