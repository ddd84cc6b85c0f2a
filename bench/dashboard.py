"""Dashboard benchmark: the hosts page with 10,000 hosts, first page, rendered by one API process.

Goal (issue 6): the first page renders in ≤ 100 ms server time. Measured one request at a time (so the
client-side time is the server time plus a loopback round trip), for the full page and for the
fragment the page fetches to refresh itself, and beside the JSON API's page of the same hosts.
Seeds with bench/api.py's data (10,000 hosts, 50,000 checks) and a day of hourly uptime counts for every check,
which the page reads for each listed host's uptime (issue 15).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import httpx
from _support import REPO_ROOT, BenchRun, percentile_by_index, run_async, verdict

# bench/api.py's seeding (10,000 hosts, 50,000 checks): `bench_api.prepare`.
_spec = importlib.util.spec_from_file_location("bench_api", REPO_ROOT / "bench" / "api.py")
assert _spec is not None and _spec.loader is not None
bench_api = importlib.util.module_from_spec(_spec)
sys.modules["bench_api"] = bench_api  # dataclasses look their module up while the module loads
_spec.loader.exec_module(bench_api)

GOAL_MS = 100.0


async def seed_uptime(database_url: str) -> None:
    """A full day of hourly counts for every check (`check_uptime_hours`, 24 rows a check, 1.2 million in all), as a
    day of polling leaves them: the hosts page reads each listed host's uptime from them (issue 15)."""
    connection = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        await connection.execute(
            """
            INSERT INTO check_uptime_hours (check_id, hour, healthy, total)
            SELECT c.id, date_trunc('hour', now(), 'UTC') - make_interval(hours => h),
                   360 - (h + abs(hashtext(c.id::text))) % 3, 360
            FROM health_checks c CROSS JOIN generate_series(0, 23) AS h
            ON CONFLICT DO NOTHING
            """
        )
        await connection.execute("ANALYZE check_uptime_hours")
        rows = await connection.fetchval("SELECT count(*) FROM check_uptime_hours")
        print(f"seeded {rows} hourly uptime counts in {time.perf_counter() - started:.1f} s")
    finally:
        await connection.close()


async def sign_in(client: httpx.AsyncClient, token: str) -> None:
    form = await client.get("/login")
    match = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert match, "no CSRF token on the sign-in form"
    answer = await client.post("/login", data={"csrf": match.group(1), "token": token, "next": "/hosts"})
    assert answer.status_code == 303, answer.text


async def timed(client: httpx.AsyncClient, path: str, count: int, headers: dict[str, str] | None = None) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        response = await client.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text[:300]
    return samples


async def measure(base_url: str, token: str, rounds: int, per_round: int) -> None:
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as browser,
        httpx.AsyncClient(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api,
    ):
        await sign_in(browser, token)
        first = await browser.get("/hosts")
        rows = first.text.count("data-host=")
        print(f"hosts page: {len(first.content) / 1024:.0f} KiB, {rows} host rows on the first page")
        results: dict[str, list[float]] = {"GET /hosts (dashboard page)": [], "GET /hosts?fragment=1 (refresh)": [],
                                           "GET /api/v1/hosts?limit=50 (JSON API)": []}  # fmt: skip
        for _name, path, client in (
            ("GET /hosts (dashboard page)", "/hosts", browser),
            ("GET /hosts?fragment=1 (refresh)", "/hosts?fragment=1", browser),
            ("GET /api/v1/hosts?limit=50 (JSON API)", "/api/v1/hosts?limit=50", api),
        ):
            await timed(client, path, 20)  # warm-up
        for _ in range(rounds):  # interleaved, so that machine noise hits all three alike
            results["GET /hosts (dashboard page)"] += await timed(browser, "/hosts", per_round)
            results["GET /hosts?fragment=1 (refresh)"] += await timed(browser, "/hosts?fragment=1", per_round)
            results["GET /api/v1/hosts?limit=50 (JSON API)"] += await timed(api, "/api/v1/hosts?limit=50", per_round)
    print(f"\n{'request (one at a time)':<40} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, samples in results.items():
        p50, p99 = statistics.median(samples), percentile_by_index(samples, 0.99)
        print(f"{name:<40} {len(samples):>6} {p50:>8.2f} {p99:>8.2f} {max(samples):>8.2f}")
    page = results["GET /hosts (dashboard page)"]
    json_page = results["GET /api/v1/hosts?limit=50 (JSON API)"]
    p99 = percentile_by_index(page, 0.99)
    print(
        f"\nGoal: first hosts page with 10,000 hosts in <= {GOAL_MS:.0f} ms server time: p99 {p99:.2f} ms: "
        f"{verdict(p99 <= GOAL_MS)} (p50 {statistics.median(page):.2f} ms; "
        f"{statistics.median(page) / statistics.median(json_page):.1f}x the JSON page, which skips the summary "
        "counts and HTML rendering)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    rounds, per_round = (1, 50) if arguments.quick else (4, 150)
    run = BenchRun.new()
    os.chdir(REPO_ROOT)
    print(f"healthgate dashboard benchmark; {os.cpu_count()} CPU cores shared by the API, PostgreSQL and this client")
    with tempfile.TemporaryDirectory(prefix="hgbench-") as tmp:
        try:
            token, _ = run_async(bench_api.prepare(run.database_url))  # type: ignore[misc]
            asyncio.run(seed_uptime(run.database_url))
            api = run.start_api(Path(tmp))
            asyncio.run(measure(api.base_url, token, rounds, per_round))
        except KeyboardInterrupt:
            return 130
        finally:
            run.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
