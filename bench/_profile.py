"""Where a poller process's CPU goes, from a py-spy profile (not a benchmark itself: `make bench` skips bench/_*.py).
Used by bench/poller.py `--py-spy SECONDS`.

`profile_poller` records a running process with `py-spy record --format raw` (collapsed stacks, "frame;frame;...
count" a line; py-spy on PATH or in .venv/bin: `pip install py-spy`) and `summarise_profile` turns the stacks into
shares by component of the poller (HTTP check, DB read/write, outbox relay, AMQP consumption, ...) and by the
package of the innermost Python frame.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from _support import REPO_ROOT, find_binary, run_child

# Components of the poller: the innermost project function on a sampled stack decides (function-name markers).
COMPONENTS = (
    ("store_results", "DB write: store_results (hosts/state locks, COPY results, UPDATE state, outbox COPY)"),
    ("enqueue_many", "DB write: store_results (hosts/state locks, COPY results, UPDATE state, outbox COPY)"),
    ("load_checks", "DB read: load_checks"),
    ("Prober", "HTTP check: Prober + aiohttp request/response (awaited code)"),
    ("_run_one", "HTTP check: Prober + aiohttp request/response (awaited code)"),
    ("relay_batch", "outbox relay: claim rows, publish with confirms, mark sent"),
    ("OutboxRelay", "outbox relay: claim rows, publish with confirms, mark sent"),
    ("_on_tick", "tick consumption: parse Tick, ack"),
    ("Scheduler", "scheduler (claims nothing in this benchmark)"),
    ("serve_health", "health/metrics server"),
)
# Stacks without a project function (protocol callbacks run by the event loop), by package on the stack.
PACKAGES = (
    ("aiohttp", "HTTP check: aiohttp/aiohappyeyeballs callbacks (connect, parse response, close)"),
    ("aiohappyeyeballs", "HTTP check: aiohttp/aiohappyeyeballs callbacks (connect, parse response, close)"),
    ("asyncpg", "DB: asyncpg protocol callbacks"),
    ("aiormq", "AMQP: aiormq/pamqp (frames in and out, confirms, deliveries)"),
    ("pamqp", "AMQP: aiormq/pamqp (frames in and out, confirms, deliveries)"),
    ("aio_pika", "AMQP: aio-pika (deliveries to consumers)"),
    ("uvicorn", "health/metrics server"),
)


def _frame_parts(frame: str) -> tuple[str, str]:
    """ "Class.method (package/module.py:12)" -> ("Class.method", "package/module.py")."""
    function, _, location = frame.partition(" (")
    return function, location.rpartition(":")[0]


def _package(path: str) -> str:
    """A frame's file -> its package: "aiohttp/client.py" -> "aiohttp", "services/poller/app.py" ->
    "services/poller", "<frozen ...>" -> "stdlib"."""
    if path.startswith("<frozen") or path.startswith("<"):
        return "stdlib"
    if path.startswith(("services/", "shared/")):
        return "/".join(path.split("/")[:2]).removesuffix(".py")
    return path.split("/")[0].removesuffix(".py")


def summarise_profile(raw: str) -> list[str]:
    """Collapsed stacks ("frame;frame;... count" a line, outermost frame first) -> report lines: shares of the
    samples by component (the innermost frame whose function names a `COMPONENTS` marker, else a `PACKAGES`
    package on the stack, else the innermost function) and by package of the innermost frame. Lines that are not
    a stack and a count are skipped."""
    components: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_parts(frame) for frame in stack.split(";")]
        component = None
        for function, _path in reversed(frames):  # innermost first
            names = function.split(".")
            component = next((name for marker, name in COMPONENTS if marker in names), None)
            if component:
                break
        if component is None:
            packages = {_package(path) for _, path in frames}
            component = next((name for marker, name in PACKAGES if marker in packages), None)
        if component is None:
            innermost = frames[-1][0]
            if innermost in ("Runner.run", "run"):
                component = "event loop itself (uvloop C code: polling, socket syscalls, scheduling callbacks)"
            else:
                component = "other: " + innermost
        components[component] += count
        leaves[_package(frames[-1][1])] += count
    if not total:
        return ["  (no samples)"]
    lines = [f"  {total} samples; by component (innermost project function on the stack, else package):"]
    lines += [f"    {share / total * 100:5.1f}%  {name}" for name, share in components.most_common(14)]
    lines.append("  by package of the innermost Python frame (uvloop's own C code counts as asyncio/runners):")
    lines += [f"    {share / total * 100:5.1f}%  {name}" for name, share in leaves.most_common(12)]
    return lines


async def profile_poller(pid: int, seconds: float, keep: Path | None, directory: Path) -> list[str]:
    """Record process `pid` with py-spy for `seconds` (whole seconds, 100 samples/s) and summarise it
    (`summarise_profile`). The raw stacks go to `keep`, else to DIRECTORY/profile.txt. Without py-spy, or when
    it fails, one line saying so (never raises for that)."""
    py_spy = find_binary("py-spy", str(REPO_ROOT / ".venv" / "bin" / "py-spy"))
    if py_spy is None:
        return ["  py-spy not found (pip install py-spy into .venv for a one-off profile)"]
    output = keep or directory / "profile.txt"
    status, log, _ = await run_child(
        py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100", "--format", "raw",
        "--output", str(output),
        merge_stderr=True,
    )  # fmt: skip
    if status != 0 or not output.exists():
        return [f"  py-spy failed: {log.decode(errors='replace')[-1000:]}"]
    return summarise_profile(output.read_text())
