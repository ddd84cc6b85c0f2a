"""Prometheus' blackbox_exporter as a benchmark contender, driven by wrk (not a benchmark itself: `make bench`
skips bench/_*.py). Used by bench/poller.py.

`Blackbox` runs `prometheus-blackbox-exporter` on a free 127.0.0.1 port with one module, `http_2xx` (GET, 2xx,
the body must match "all good"), and `Blackbox.measure` drives its /probe endpoint with `wrk -c 50 -t 2`. A probe
counts only when its answer says `probe_success 1` (a wrk Lua script; wrk's own Requests/sec counts any 200).
Both programs come from `make bench-deps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _support import EXPECTED_BODY, CpuMeter, CpuUse, find_binary, run_child

from tests.support.processes import free_port, stop_process

BLACKBOX_CONFIG = f"""modules:
  http_2xx:
    prober: http
    timeout: 5s
    http:
      method: GET
      preferred_ip_protocol: ip4
      fail_if_body_not_matches_regexp:
        - "{EXPECTED_BODY}"
"""

# Counts answers whose body says the probe succeeded; wrk's own Requests/sec counts any 200.
WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; failed = 0 end
function response(status, headers, body)
  if status == 200 and string.find(body, "\\nprobe_success 1", 1, true) then ok = ok + 1 else failed = failed + 1 end
end
function done(summary, latency, requests)
  local total_ok, total_failed = 0, 0
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok"); total_failed = total_failed + thread:get("failed")
  end
  io.write(string.format("PROBES ok=%d failed=%d seconds=%f\\n", total_ok, total_failed, summary.duration / 1e6))
end
"""
WRK_SUMMARY = re.compile(r"PROBES ok=(\d+) failed=(\d+) seconds=([0-9.]+)")


@dataclass
class Probes:
    """One wrk run against blackbox_exporter: successful and failed probes over `seconds` (wrk's own duration),
    and the CPU used meanwhile by group (wrk's own CPU under "wrk", from this process's reaped children)."""

    ok: int
    failed: int
    seconds: float
    cpu: CpuUse


class Blackbox:
    """A blackbox_exporter process of this run; its config, log and the wrk script live in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        """Start blackbox_exporter (RuntimeError when it is not installed); `wait_ready` waits for it."""
        binary = find_binary("prometheus-blackbox-exporter", "/usr/bin/prometheus-blackbox-exporter")
        if binary is None:
            raise RuntimeError("prometheus-blackbox-exporter is not installed: run `make bench-deps`")
        config = self.directory / "blackbox.yml"
        config.write_text(BLACKBOX_CONFIG)
        (self.directory / "probes.lua").write_text(WRK_SCRIPT)
        self.port = free_port()
        with (self.directory / "blackbox.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    async def wait_ready(self, target: str) -> None:
        """Wait up to 15 s until a probe of `target` (a URL) succeeds; RuntimeError when the exporter exits
        or the probe never succeeds."""
        import httpx

        deadline = time.monotonic() + 15
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError("blackbox_exporter exited: " + (self.directory / "blackbox.log").read_text())
                with contextlib.suppress(httpx.HTTPError):
                    answer = await http.get(self.probe_url(target))
                    if "\nprobe_success 1" in answer.text:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"blackbox_exporter does not probe {target} successfully")

    def probe_url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.port}/probe?target={target}&module=http_2xx"

    async def measure(self, target: str, seconds: int, classify: Callable[[int, str], str | None]) -> Probes:
        """`wrk -c 50 -t 2 -d SECONDS` against probes of `target`; CPU by the groups `classify` names (see
        `CpuMeter`). RuntimeError when wrk is missing or fails."""
        wrk = find_binary("wrk", "/usr/bin/wrk")
        if wrk is None:
            raise RuntimeError("wrk is not installed: run `make bench-deps`")
        meter = CpuMeter(classify)
        meter.start()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        status, stdout, _ = await run_child(
            wrk, "-c", "50", "-t", "2", "-d", f"{seconds}s", "-s", str(self.directory / "probes.lua"),
            self.probe_url(target),
            merge_stderr=True,
        )  # fmt: skip
        cpu = meter.stop()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.groups["wrk"] = (
            children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
        )  # wrk has exited and been reaped: its CPU is in this process's children's usage
        output = stdout.decode(errors="replace")
        found = WRK_SUMMARY.search(output)
        if status != 0 or found is None:
            raise RuntimeError(f"wrk failed:\n{output}")
        return Probes(int(found.group(1)), int(found.group(2)), float(found.group(3)), cpu)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
