"""Fleet benchmark: `healthgate apply` of a 5,000-host, 20,000-check file on an empty system, then again with no
change (planning only).

Goals (issue 15): the first apply ≤ 60 s, the no-change plan ≤ 5 s, on this 2-core machine. Each is the whole
`healthgate apply -f FILE` command (a process of its own: start-up, reading and validating the file, reading the
API's state in pages of 500, planning, printing and, the first time, 25,000 writes with 16 in flight) against one
API process on a fresh database. The checks are disabled (no poller runs: the writes are what is measured).
New hosts go with their checks through `POST /api/v1/hosts:batchCreate` (100 hosts a request).

Between the two applies the benchmark waits for the API's outbox relay to publish the first apply's events (the
plan is measured on a settled system). The no-change plan is also timed with the same fleet written as JSON (read
by the json module instead of a YAML loader), and the reading of the YAML file alone: the goal is judged on the
YAML file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from _support import REPO_ROOT, BenchRun, load_line, machine_note, verdict
from ruamel.yaml import YAML

from shared.schema import migrate
from shared.tokens import create_token

FIRST_GOAL_SECONDS = 60.0
PLAN_GOAL_SECONDS = 5.0


def fleet_file(hosts: int) -> str:
    """`hosts` hosts in 20 groups, 4 checks each (tcp, http, dns, grpc), on 127.0.0.1, disabled."""
    lines = ["hosts:"]
    for index in range(hosts):
        lines += [
            f"  - name: host-{index:05d}",
            f"    group: group-{index % 20:02d}",
            f"    agent_url: http://127.0.0.1:{9000 + index % 1000}",
            "    checks:",
            "      - {name: ssh, check_type: tcp, port: 22, address: 127.0.0.1, enabled: false}",
            f"      - {{name: health, check_type: http, url: 'http://127.0.0.1:8000/h/{index}', enabled: false,"
            " interval_seconds: 60}",
            "      - {name: dns, check_type: dns, dns_name: db.internal, dns_server: 127.0.0.1, enabled: false}",
            "      - {name: grpc, check_type: grpc, port: 50051, address: 127.0.0.1, critical: false, enabled: false}",
        ]
    lines += ["groups:", "  group-00: {max_unavailable: 2}", "  group-01: {max_unavailable: 10%}"]
    return "\n".join(lines) + "\n"


async def prepare(database_url: str) -> str:
    await migrate(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        return await create_token(connection, name="bench-admin", role="admin", groups=[], actor="bench")
    finally:
        await connection.close()


async def outbox_drained(database_url: str, timeout: float = 300.0) -> float:
    """Seconds until the outbox holds no unsent event (the first apply's 20,000 check.config.created events keep
    the API's relay and RabbitMQ busy for a while: the plan is measured on a settled system)."""
    started = time.perf_counter()
    connection = await asyncpg.connect(database_url)
    try:
        while time.perf_counter() - started < timeout:
            if not await connection.fetchval("SELECT EXISTS (SELECT 1 FROM outbox WHERE sent_at IS NULL)"):
                break
            await asyncio.sleep(0.5)
    finally:
        await connection.close()
    return time.perf_counter() - started


def timed_read(path: Path) -> float:
    from services.fleet import load_fleet

    started = time.perf_counter()
    load_fleet(path.read_text(), str(path), {})
    return time.perf_counter() - started


def timed_apply(path: Path, env: dict[str, str], label: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "apply", "-f", str(path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{label}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 hosts (a smoke run)")
    arguments = parser.parse_args()
    hosts = 500 if arguments.quick else 5000
    run = BenchRun.new()
    print(f"healthgate fleet benchmark: apply of {hosts} hosts, {hosts * 4} checks; {machine_note()}")
    with tempfile.TemporaryDirectory(prefix="hgbench-") as tmp:
        try:
            token = asyncio.run(prepare(run.database_url))
            api = run.start_api(Path(tmp))
            path = Path(tmp) / "fleet.yaml"
            path.write_text(fleet_file(hosts))
            env = os.environ | {"HEALTHGATE_URL": api.base_url, "HEALTHGATE_TOKEN": token}
            first, first_summary = timed_apply(path, env, "first apply")
            print(f"first apply (empty system): {first:.1f} s  [{first_summary}]  {load_line()}")
            drained = asyncio.run(outbox_drained(run.database_url))
            print(f"(waited {drained:.1f} s for the API's outbox relay to publish the first apply's events)")
            second, second_summary = timed_apply(path, env, "second apply")
            print(f"second apply (no change, planning only): {second:.2f} s  [{second_summary}]  {load_line()}")
            json_path = Path(tmp) / "fleet.json"
            json_path.write_text(json.dumps(YAML(typ="safe").load(path.read_text()), indent=1))
            as_json, json_summary = timed_apply(json_path, env, "second apply, JSON")
            print(f"the same, file as JSON: {as_json:.2f} s  [{json_summary}]  {load_line()}")
            reading = timed_read(path)
            print(f"  of which reading and validating the YAML file alone: {reading:.2f} s (in this process)")
            print(
                f"\nGoal: first apply <= {FIRST_GOAL_SECONDS:.0f} s: {first:.1f} s: "
                f"{verdict(first <= FIRST_GOAL_SECONDS) if not arguments.quick else '(quick run: no verdict)'}"
            )
            print(
                f"Goal: no-change plan <= {PLAN_GOAL_SECONDS:.0f} s: {second:.2f} s: "
                f"{verdict(second <= PLAN_GOAL_SECONDS) if not arguments.quick else '(quick run: no verdict)'}"
            )
        except KeyboardInterrupt:
            return 130
        finally:
            run.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
