"""Benchmark: the HTTP client for checks, httpx 0.28 against aiohttp, on a real local nginx.

50 concurrent checks (GET, status check, read the body, look for "all good") against one nginx process of
tests/support/nginx.py, for about 5 s per measurement, each client in two modes:

- keep-alive: one shared client whose pooled connections are reused (aiohttp `TCPConnector(limit=0)`, the
  poller's connector; httpx `AsyncClient` with room for 50 kept-alive connections);
- new connection per check (as checks of many hosts minutes apart are, and as blackbox_exporter probes):
  `GET /ok-close`, where nginx has `keepalive_timeout 0` and closes after every response, and the client is
  told not to reuse either (aiohttp `TCPConnector(force_close=True)`, httpx `Limits(max_keepalive_connections=0)`);
  also httpx with a fresh `AsyncClient` per check (sharing one SSLContext, else each client would build one).

Each on uvloop and on asyncio's default loop, in two interleaved rounds of half the time (the loop order flipped
in the second), so that changing background load hits both sides of every ratio alike. Prints checks/s, the
client's own CPU per check (this process's CPU time / checks), nginx's CPU, and the ratios aiohttp/httpx and
uvloop/default. Figures only: it never fails on a goal.

httpx's keep-alive figure is low because httpcore 1.0's connection pool scans every pooled connection (is it
idle, has it expired: a getpeername() each) for every request, so its cost per request grows with the number of
pooled connections (~1,200 checks/s at concurrency 1, ~200 at 50 on the 2-core dev machine).

    .venv/bin/python bench/http_clients.py [--quick] [--seconds S] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import httpx
import uvloop
from _support import (
    CLOSE_PATH,
    EXPECTED_BODY,
    KEEPALIVE_PATH,
    BenchNginx,
    CpuMeter,
    guarded,
    machine_note,
    other_work,
    process_tree,
)

CONCURRENCY = 50
SECONDS = 5.0
QUICK_SECONDS = 1.5
ROUNDS = 2
WARMUP_SECONDS = 0.3
NEEDLE = EXPECTED_BODY.encode()

Check = Callable[[str], Awaitable[None]]


class CheckFailed(Exception):
    pass


@dataclass
class Result:
    client: str
    mode: str
    loop: str
    checks: int
    seconds: float
    errors: int
    first_error: str
    client_cpu: float  # this process's CPU seconds during the measurement
    nginx_cpu: float  # nginx's CPU seconds (cores x seconds)
    other_cpu: float = 0.0  # CPU seconds of every other process on the machine (noise)

    @property
    def rate(self) -> float:
        return self.checks / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_check(self) -> float:
        return self.client_cpu / self.checks * 1e6 if self.checks else 0.0


# ---- the contenders -----------------------------------------------------------------------------------


class Contender:
    """Opens a client, runs checks, closes. `check(url)` raises CheckFailed unless 200 with the body."""

    name = ""
    mode = ""

    async def open(self) -> None: ...

    async def check(self, url: str) -> None:
        raise NotImplementedError

    async def close(self) -> None: ...


class AiohttpShared(Contender):
    def __init__(self, *, force_close: bool) -> None:
        self.name = "aiohttp 3"
        self.mode = "new-conn" if force_close else "keep-alive"
        self.force_close = force_close
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=self.force_close)
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": "healthgate-bench"}
        )

    async def check(self, url: str) -> None:
        assert self.session is not None
        async with self.session.get(url, allow_redirects=False) as response:
            body = await response.read()
            if response.status != 200 or NEEDLE not in body:
                raise CheckFailed(f"{response.status} {body[:80]!r}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class HttpxShared(Contender):
    def __init__(self, *, keepalive: bool, concurrency: int) -> None:
        self.name = "httpx 0.28"
        self.mode = "keep-alive" if keepalive else "new-conn"
        self.limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency if keepalive else 0)
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self.client = httpx.AsyncClient(limits=self.limits, headers={"User-Agent": "healthgate-bench"})

    async def check(self, url: str) -> None:
        assert self.client is not None
        response = await self.client.get(url)
        if response.status_code != 200 or NEEDLE not in response.content:
            raise CheckFailed(f"{response.status_code} {response.content[:80]!r}")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class HttpxFresh(Contender):
    """A new AsyncClient per check (what code that does `async with httpx.AsyncClient() as c:` per check pays)."""

    def __init__(self) -> None:
        self.name = "httpx 0.28, AsyncClient per check"
        self.mode = "new-conn"
        self.context = ssl.create_default_context()

    async def check(self, url: str) -> None:
        async with httpx.AsyncClient(verify=self.context, headers={"User-Agent": "healthgate-bench"}) as client:
            response = await client.get(url)
        if response.status_code != 200 or NEEDLE not in response.content:
            raise CheckFailed(f"{response.status_code} {response.content[:80]!r}")


# ---- measuring -------------------------------------------------------------------------------------------


async def drive(contender: Contender, url: str, concurrency: int, seconds: float) -> tuple[int, int, str, float]:
    """Run `concurrency` check loops for `seconds` (after a short warm-up); (checks, errors, first, wall)."""
    await contender.open()
    try:
        counts = [0, 0]
        first_error: list[str] = []
        stop_at = 0.0
        measuring = False

        async def loop() -> None:
            while time.monotonic() < stop_at:
                try:
                    await contender.check(url)
                except Exception as exc:  # counted; a benchmark of a broken client still reports
                    if measuring:
                        counts[1] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}")
                    continue
                if measuring:
                    counts[0] += 1

        stop_at = time.monotonic() + WARMUP_SECONDS
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        measuring = True
        first_error.clear()
        started = time.monotonic()
        stop_at = started + seconds
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return counts[0], counts[1], (first_error[0] if first_error else ""), time.monotonic() - started
    finally:
        await contender.close()


NGINX_PIDS: set[int] = set()  # our nginx's master and worker (other nginx processes may run on the machine)


def measure(contender: Contender, url: str, loop_name: str, concurrency: int, seconds: float) -> Result:
    nginx_meter = CpuMeter(
        lambda pid, command: "nginx" if pid in NGINX_PIDS else None if pid == os.getpid() else "other"
    )
    factory = uvloop.new_event_loop if loop_name == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        nginx_meter.start()
        cpu_before = time.process_time()
        checks, errors, first_error, wall = runner.run(drive(contender, url, concurrency, seconds))
        client_cpu = time.process_time() - cpu_before
        use = nginx_meter.stop()
        nginx_cpu = use.groups.get("nginx", 0.0)
        other_cpu = use.groups.get("other", 0.0)
    # The warm-up's CPU is in client_cpu: scale it to the measured stretch.
    client_cpu *= wall / (wall + WARMUP_SECONDS)
    nginx_cpu *= wall / (wall + WARMUP_SECONDS)
    other_cpu *= wall / (wall + WARMUP_SECONDS)
    return Result(
        contender.name, contender.mode, loop_name, checks, wall, errors, first_error, client_cpu, nginx_cpu, other_cpu
    )


def contenders(concurrency: int) -> list[tuple[Contender, str]]:
    return [
        (HttpxShared(keepalive=True, concurrency=concurrency), KEEPALIVE_PATH),
        (AiohttpShared(force_close=False), KEEPALIVE_PATH),
        (HttpxShared(keepalive=False, concurrency=concurrency), CLOSE_PATH),
        (AiohttpShared(force_close=True), CLOSE_PATH),
        (HttpxFresh(), CLOSE_PATH),
    ]


def print_report(results: list[Result], concurrency: int) -> None:
    print(
        f"\n  {'client':<36} {'mode':<11} {'loop':<8} {'checks/s':>9} {'client CPU':>11} {'nginx CPU':>10}"
        f" {'others':>7} {'errors':>7}"
    )
    for result in results:
        print(
            f"  {result.client:<36} {result.mode:<11} {result.loop:<8} {result.rate:>9,.0f}"
            f" {result.cpu_us_per_check:>8.0f} µs {result.nginx_cpu / result.seconds * 100:>8.0f} %"
            f" {result.other_cpu / result.seconds * 100:>5.0f} % {result.errors:>7}"
        )
        if result.errors:
            print(f"      first error: {result.first_error}")
    print(
        "  (client CPU: this process's CPU time per check; nginx CPU: % of one core during the measurement;"
        " others: CPU of every other process on the machine, % of one core: above ~25% the figure is noisy)"
    )

    def find(client: str, mode: str, loop: str) -> Result | None:
        return next((r for r in results if r.client == client and r.mode == mode and r.loop == loop), None)

    print(
        f"\nRatios ({concurrency} concurrent checks, same run; the CPU-per-check ratios hold up better than"
        " checks/s when other work shares the machine):"
    )
    for loop in ("uvloop", "asyncio"):
        for mode in ("keep-alive", "new-conn"):
            fast, slow = find("aiohttp 3", mode, loop), find("httpx 0.28", mode, loop)
            if fast and slow and slow.rate:
                print(
                    f"  aiohttp/httpx   {mode:<11} {loop:<8} {fast.rate / slow.rate:>6.2f}x"
                    f"   ({fast.rate:,.0f} vs {slow.rate:,.0f} checks/s; CPU per check httpx/aiohttp"
                    f" {slow.cpu_us_per_check / max(1.0, fast.cpu_us_per_check):.1f}x)"
                )
        fast, fresh = find("aiohttp 3", "new-conn", loop), find("httpx 0.28, AsyncClient per check", "new-conn", loop)
        if fast and fresh and fresh.rate:
            print(f"  aiohttp/httpx (AsyncClient per check) new-conn {loop:<8} {fast.rate / fresh.rate:>6.2f}x")
    for client in ("aiohttp 3", "httpx 0.28", "httpx 0.28, AsyncClient per check"):
        for mode in ("keep-alive", "new-conn"):
            fast, slow = find(client, mode, "uvloop"), find(client, mode, "asyncio")
            if fast and slow and slow.rate:
                print(
                    f"  uvloop/asyncio  {client:<36} {mode:<11} {fast.rate / slow.rate:>6.2f}x"
                    f"   (CPU per check asyncio/uvloop {slow.cpu_us_per_check / max(1.0, fast.cpu_us_per_check):.2f}x)"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS} s per measurement (a smoke run)")
    parser.add_argument("--seconds", type=float, help=f"seconds per measurement (default {SECONDS})")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="concurrent checks (default 50)")
    arguments = parser.parse_args()
    seconds = arguments.seconds or (QUICK_SECONDS if arguments.quick else SECONDS)
    concurrency = arguments.concurrency

    print(
        f"HTTP client benchmark: {concurrency} concurrent checks (GET, status, read body) against one local nginx"
        f" process, {seconds:g} s per measurement; httpx {httpx.__version__}, aiohttp {aiohttp.__version__},"
        f" uvloop {uvloop.__version__}"
    )
    print(machine_note())
    nginx = BenchNginx()
    with guarded(nginx.stop) as outcome:
        nginx.start()
        assert nginx.process is not None
        NGINX_PIDS.update(process_tree(nginx.process.pid))
        print(
            f"nginx {nginx.http_base_url}: keep-alive on {KEEPALIVE_PATH}, new connection per check on {CLOSE_PATH}"
            " (keepalive_timeout 0)"
        )
        print(f"before measuring: {other_work()}")
        # ROUNDS interleaved rounds of seconds/ROUNDS each, the loop order flipped every round, so that drifting
        # background load hits every pair (aiohttp/httpx, uvloop/asyncio) alike; figures are summed over rounds.
        totals: dict[tuple[str, str, str], Result] = {}
        for round_number in range(ROUNDS):
            loops = ("uvloop", "asyncio") if round_number % 2 == 0 else ("asyncio", "uvloop")
            for contender, path in contenders(concurrency):
                for loop_name in loops:
                    result = measure(contender, nginx.http_url(path), loop_name, concurrency, seconds / ROUNDS)
                    key = (result.client, result.mode, loop_name)
                    empty = Result(result.client, result.mode, loop_name, 0, 0.0, 0, "", 0.0, 0.0)
                    total = totals.setdefault(key, empty)
                    total.checks += result.checks
                    total.seconds += result.seconds
                    total.errors += result.errors
                    total.first_error = total.first_error or result.first_error
                    total.client_cpu += result.client_cpu
                    total.nginx_cpu += result.nginx_cpu
                    total.other_cpu += result.other_cpu
            print(f"  round {round_number + 1}/{ROUNDS} done", flush=True)
        results = list(totals.values())
        print_report(results, concurrency)
        print(f"\nafter measuring: {other_work()}")
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
