"""Benchmark: the notifier (issue 14, "Speed"): 10,000 events to 5 webhook channels with a local receiver.

One notifier process (the real service) on a throwaway database and exchange; a receiver in this process (aiohttp on
127.0.0.1, one path per channel, answering 200 at once). Events (host.status_changed CloudEvents, as the poller
publishes them) are published at 500 events/s. Two phases in one run, each with fresh channels:

- A: 5 webhook channels. Figures: deliveries/s over the phase (first to last delivery of the 5 channels) and
  event-to-receiver latency (the CloudEvent's `time` to the POST's arrival) p50/p99/max (goal p99 <= 1 s);
- B: the same 5 channels' figures with a 6th channel whose receiver never answers (it holds its 8 slots until the
  10 s timeout, then retries); the ratio of the 5 channels' rate B/A (goal >= 0.9), printed side by side.

Figures only, no assertions (timing on a shared 2-core box is noisy: see the load line).

    .venv/bin/python bench/notifier.py [--events N] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aio_pika
from _support import BenchRun, guarded, load_line, machine_note, percentile, run_async, verdict
from aiohttp import web

from shared.crypto import SecretBox, load_or_create_key
from shared.events import HostStatusChanged, encode_cloudevent
from shared.notification_channels import ChannelFields, generate_secret, insert_channel
from shared.schema import migrate
from shared.topology import Topology, declare_exchange

CHANNELS = 5


class Sink:
    """The receiver: records (arrival time - event time) per path; /hang never answers."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.hung = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        if request.path.startswith("/hang"):
            self.hung += 1
            await self.release.wait()
            return web.Response(status=200)
        sent = dt.datetime.fromisoformat(json.loads(body)["time"]).timestamp()
        self.latencies[request.path].append(now - sent)
        self.arrivals[request.path].append(now)
        return web.Response(status=200)


async def publish_events(exchange: aio_pika.abc.AbstractExchange, host_id: uuid.UUID, count: int, rate: float) -> None:
    """`count` events at `rate` per second, in ticks of 10 ms (each tick's publishes confirmed together)."""
    started = time.monotonic()
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - started) * rate) + 1)
        batch = []
        for _ in range(due - sent):
            data = HostStatusChanged(
                host_id=host_id, previous="healthy", current="unhealthy", at=dt.datetime.now(dt.UTC)
            )
            _, body = encode_cloudevent("host.status_changed", data, source="bench")
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            batch.append(exchange.publish(message, "host.status_changed"))
        sent = due
        await asyncio.gather(*batch)
        await asyncio.sleep(0.01)


async def phase(
    name: str, db_url: str, box: SecretBox, sink: Sink, port: int, exchange: aio_pika.abc.AbstractExchange,
    events: int, rate: float, *, hang: bool,
) -> tuple[float, list[float]]:  # fmt: skip
    import asyncpg

    connection = await asyncpg.connect(db_url)
    try:
        await connection.execute("DELETE FROM notification_channels")
        paths = [f"/{name}-{index}" for index in range(CHANNELS)]
        urls = [f"http://127.0.0.1:{port}{path}" for path in paths]
        if hang:
            urls.append(f"http://127.0.0.1:{port}/hang")
        for url in urls:
            fields = ChannelFields(
                name=url, type="webhook", url=url, events=("host.status_changed",), groups=(),
                include_maintenance=False, enabled=True, secret=generate_secret(),
            )  # fmt: skip
            await insert_channel(connection, fields, box)
    finally:
        await connection.close()
    await asyncio.sleep(1.5)  # the notifier's channel cache is read again
    await publish_events(exchange, uuid.uuid4(), events, rate)
    deadline = time.monotonic() + 120
    while sum(len(sink.arrivals[path]) for path in paths) < events * CHANNELS and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    arrivals = sorted(at for path in paths for at in sink.arrivals[path])
    latencies = [value for path in paths for value in sink.latencies[path]]
    seconds = max(arrivals[-1] - arrivals[0], 1e-9) if arrivals else float("nan")
    return len(arrivals) / seconds, latencies


async def body(run: BenchRun, tmp: Path, events: int, rate: float) -> None:
    key_file = tmp / "key"
    await migrate(run.database_url)
    box = SecretBox(load_or_create_key(key_file))
    sink = Sink()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    run.start_service(
        "notifier", "HEALTHGATE_HEALTH_PORT", tmp, HEALTHGATE_KEY_FILE=str(key_file),
        HEALTHGATE_API_HOST="127.0.0.1",
    )  # fmt: skip
    print(machine_note())
    print(load_line())
    connection = await aio_pika.connect(run.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await declare_exchange(channel, Topology(run.exchange))
        print(f"{events:,} events at {rate:g}/s to {CHANNELS} webhook channels (one notifier process)")
        rate_a, latency_a = await phase("a", run.database_url, box, sink, port, exchange, events, rate, hang=False)
        rate_b, latency_b = await phase("b", run.database_url, box, sink, port, exchange, events, rate, hang=True)
    sink.release.set()
    for label, measured, latencies in (
        ("A: 5 channels", rate_a, latency_a),
        ("B: + a hanging 6th", rate_b, latency_b),
    ):
        print(
            f"{label:<20} {len(latencies):>7,} deliveries  {measured:8.0f} deliveries/s  latency p50 "
            f"{percentile(latencies, 0.5) * 1000:6.0f} ms  p99 {percentile(latencies, 0.99) * 1000:6.0f} ms  "
            f"max {max(latencies) * 1000:6.0f} ms  (goal p99 <= 1000 ms: "
            f"{verdict(percentile(latencies, 0.99) <= 1.0)})"
        )
    ratio = rate_b / rate_a if rate_a else float("nan")
    print(f"the 5 channels' rate with a hanging 6th / without: {ratio:.3f} (goal >= 0.90: {verdict(ratio >= 0.9)});"
          f" the hanging receiver holds {sink.hung} requests")  # fmt: skip
    print(load_line())
    await runner.cleanup()


def main(events: int, rate: float) -> None:
    run = BenchRun.new()
    tmp = Path(f"/tmp/hgbench-notifier-{run.run_id}")
    tmp.mkdir(parents=True, exist_ok=True)
    with guarded(run.remove, lambda exc: run.print_service_logs()) as outcome:
        run_async(body(run, tmp, events, rate))
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0)
    arguments = parser.parse_args()
    main(arguments.events, arguments.rate)
