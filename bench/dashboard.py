"""Dashboard benchmark: the hosts page with 10,000 hosts, first page, rendered by one API process.

Goal (issue 6): the first page renders in ≤ 100 ms server time. Measured one request at a time (so the
client-side time is the server time plus a loopback round trip), for the full page and for the
fragment the page fetches to refresh itself, and beside the JSON API's page of the same hosts.
Seeds with bench/api.py's data (10,000 hosts, 50,000 checks).
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
import uuid
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.processes import ServiceProcess, free_port, start_service  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_api", REPO_ROOT / "bench" / "api.py")
assert _spec is not None and _spec.loader is not None
bench_api = importlib.util.module_from_spec(_spec)
sys.modules["bench_api"] = bench_api  # dataclasses look their module up while the module loads
_spec.loader.exec_module(bench_api)

GOAL_MS = 100.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


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
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        print(f"{name:<40} {len(samples):>6} {p50:>8.2f} {p99:>8.2f} {max(samples):>8.2f}")
    page = results["GET /hosts (dashboard page)"]
    json_page = results["GET /api/v1/hosts?limit=50 (JSON API)"]
    p99 = percentile(page, 0.99)
    print(
        f"\nGoal: first hosts page with 10,000 hosts in <= {GOAL_MS:.0f} ms server time: p99 {p99:.2f} ms: "
        f"{'MET' if p99 <= GOAL_MS else 'NOT MET'} (p50 {statistics.median(page):.2f} ms; "
        f"{statistics.median(page) / statistics.median(json_page):.1f}x the JSON page, which skips the summary "
        "counts and HTML rendering)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    rounds, per_round = (1, 50) if arguments.quick else (4, 150)
    server_url = os.environ.get("HEALTHGATE_BENCH_DATABASE_URL", bench_api.DEFAULT_DATABASE_URL)
    amqp_url = os.environ.get("HEALTHGATE_BENCH_AMQP_URL", bench_api.DEFAULT_AMQP_URL)
    run_id = uuid.uuid4().hex[:10]
    database = f"healthgate_bench_{run_id}"
    database_url = bench_api.with_database(server_url, database)
    exchange = f"hgbench-{run_id}"
    os.chdir(REPO_ROOT)
    print(f"healthgate dashboard benchmark; {os.cpu_count()} CPU cores shared by the API, PostgreSQL and this client")
    api: ServiceProcess | None = None
    with tempfile.TemporaryDirectory(prefix="hgbench-") as tmp:
        try:
            token, _ = bench_api.run_async(bench_api.prepare(database_url))
            port = free_port()
            env = {
                "HEALTHGATE_DATABASE_URL": database_url, "HEALTHGATE_AMQP_URL": amqp_url,
                "HEALTHGATE_EXCHANGE": exchange, "HEALTHGATE_API_HOST": "127.0.0.1", "HEALTHGATE_API_PORT": str(port),
                "HEALTHGATE_KEY_FILE": str(Path(tmp) / "key"), "HEALTHGATE_LOG_FORMAT": "json",
            }  # fmt: skip
            api = start_service("api", env, Path(tmp) / "api.log", port=port)
            asyncio.run(measure(api.base_url, token, rounds, per_round))
        except KeyboardInterrupt:
            return 130
        finally:
            if api is not None:
                bench_api.cleanup_step("stop the API", api.stop)
            bench_api.cleanup_step(
                f"drop database {database}", lambda: bench_api.run_async(bench_api.drop_database(server_url, database))
            )
            bench_api.cleanup_step(
                f"delete exchange {exchange}",
                lambda: bench_api.run_async(bench_api.delete_topology(amqp_url, exchange)),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
