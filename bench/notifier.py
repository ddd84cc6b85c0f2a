"""Benchmark: the notifier (issue 14, "Speed"): 10,000 events to 5 webhook channels with a local receiver.

The real notifier service (one process, or `--notifiers N`, as any number may run) on a throwaway database and
exchange. The receiver is nginx (its own process, the tests' tests/support/nginx.py with one location answering 200
to every POST), so that it costs the box little and never is the bottleneck; it logs `$msec` and `$http_webhook_id`
of each request, read afterwards. Events (host.status_changed CloudEvents, as the poller publishes them) are
published with confirms to the exchange at 500 events/s; each event's publish time is kept by id. Two phases in one
run, each with fresh channels:

- A: 5 webhook channels. Figures: deliveries/s over the phase (first to last delivery of the 5 channels) and
  event-to-receiver latency (the publish to nginx's log of the POST) p50/p99/max (goal p99 <= 1 s);
- B: the same with a 6th channel whose receiver never answers (a socket that listens and never accepts: each POST
  waits for the 10 s timeout, then is retried with back-off); the 5 channels' figures, and the ratio of their rate
  B/A (goal >= 0.9), side by side.

Also the CPU each part of the box used during each phase. Figures only, no assertions (timing on a shared 2-core
box is noisy: see the load lines; repeat runs).

    .venv/bin/python bench/notifier.py [--events N] [--rate R] [--notifiers N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aio_pika
import asyncpg
from _support import (
    BenchRun,
    CpuMeter,
    default_group,
    guarded,
    load_line,
    machine_note,
    percentile,
    process_tree,
    run_async,
    verdict,
)

from shared.crypto import SecretBox, load_or_create_key
from shared.events import HostStatusChanged, encode_cloudevent
from shared.notification_channels import ChannelFields, generate_secret, insert_channel
from shared.schema import migrate
from shared.topology import Topology, declare_exchange
from tests.support.nginx import NginxServer

CHANNELS = 5
WAIT_SECONDS = 180


class ReceiverNginx(NginxServer):
    """nginx answering 200 to every request, logging `$msec $http_webhook_id $uri` of each to `log_path`."""

    @property
    def log_path(self) -> Path:
        return self.directory / "received.log"

    def _config(self) -> str:
        config = super()._config()
        marker = "        location / { return 404; }\n"
        if marker not in config or "    access_log off;\n" not in config:
            raise RuntimeError("tests/support/nginx.py changed its configuration; update bench/notifier.py")
        config = config.replace(marker, "        location / { return 200; }\n")
        return config.replace(
            "    access_log off;\n",
            "    log_format received '$msec $http_webhook_id $uri';\n"
            f"    access_log {self.log_path} received;\n"
            "    keepalive_requests 1000000;\n",
        ).replace("events { worker_connections 256; }", "events { worker_connections 4096; }")

    def received(self) -> list[tuple[float, str, str]]:
        """(arrival time, webhook-id, path) of each request so far."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((float(parts[0]), parts[1], parts[2]))
        return rows


@dataclass
class Phase:
    name: str
    published: dict[str, float] = field(default_factory=dict)  # event id → publish time (epoch seconds)
    rate: float = float("nan")
    latencies: list[float] = field(default_factory=list)
    cpu: str = ""


async def publish_events(
    exchange: aio_pika.abc.AbstractExchange, host_id: uuid.UUID, count: int, rate: float, published: dict[str, float]
) -> None:
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
            event_id, body = encode_cloudevent("host.status_changed", data, source="bench")
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            published[str(event_id)] = time.time()
            batch.append(exchange.publish(message, "host.status_changed"))
        sent = due
        await asyncio.gather(*batch)
        await asyncio.sleep(0.01)


async def phase(
    result: Phase, db_url: str, box: SecretBox, receiver: ReceiverNginx, hang_url: str,
    exchange: aio_pika.abc.AbstractExchange, events: int, rate: float, meter: CpuMeter, *, hang: bool,
) -> None:  # fmt: skip
    connection = await asyncpg.connect(db_url)
    try:
        await connection.execute("DELETE FROM notification_channels")
        paths = [f"/{result.name}-{index}" for index in range(CHANNELS)]
        urls = [receiver.http_url(path) for path in paths]
        if hang:
            urls.append(hang_url)
        for url in urls:
            fields = ChannelFields(
                name=url, type="webhook", url=url, events=("host.status_changed",), groups=(),
                include_maintenance=False, enabled=True, secret=generate_secret(),
            )  # fmt: skip
            await insert_channel(connection, fields, box)
        # The previous phase's dead rows are vacuumed now rather than by autovacuum during this phase.
        await connection.execute("VACUUM ANALYZE notification_deliveries")
    finally:
        await connection.close()
    await asyncio.sleep(1.5)  # the channels are announced to the notifiers at once; a margin for a loaded box
    meter.start()
    await publish_events(exchange, uuid.uuid4(), events, rate, result.published)
    wanted = set(paths)
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        got = [row for row in receiver.received() if row[2] in wanted]
        if len(got) >= events * CHANNELS:
            break
        await asyncio.sleep(0.2)
    result.cpu = meter.stop().line(("notifier", "nginx", "postgresql", "rabbitmq", "bench driver"))
    got = [row for row in receiver.received() if row[2] in wanted]
    arrivals = sorted(at for at, _, _ in got)
    result.latencies = [at - result.published[event_id] for at, event_id, _ in got if event_id in result.published]
    result.rate = len(arrivals) / max(arrivals[-1] - arrivals[0], 1e-9) if arrivals else float("nan")


async def body(run: BenchRun, tmp: Path, events: int, rate: float, notifiers: int, rounds: int) -> None:
    key_file = tmp / "key"
    await migrate(run.database_url)
    box = SecretBox(load_or_create_key(key_file))
    # The hanging receiver: connections complete into the listen backlog and are never accepted nor answered.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(4096)
    hang_url = f"http://127.0.0.1:{hanging.getsockname()[1]}/hang"
    with ReceiverNginx(tmp / "nginx") as receiver, hanging:
        notifier_pids = set()
        for index in range(notifiers):
            service = run.start_service(
                "notifier", "HEALTHGATE_HEALTH_PORT", tmp, label=f"notifier {index + 1}", log_name=f"notifier-{index}",
                HEALTHGATE_KEY_FILE=str(key_file), HEALTHGATE_API_HOST="127.0.0.1",
            )  # fmt: skip
            notifier_pids.add(service.process.pid)
        nginx_pids = process_tree(receiver.process.pid) if receiver.process else set()

        def classify(pid: int, command: str) -> str | None:
            if pid in notifier_pids:
                return "notifier"
            if pid in nginx_pids:
                return "nginx"
            return default_group(pid, command, own_nginx=nginx_pids)

        meter = CpuMeter(classify)
        print(machine_note())
        print(load_line())
        connection = await aio_pika.connect(run.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await declare_exchange(channel, Topology(run.exchange))
            process_words = "one notifier process" if notifiers == 1 else f"{notifiers} notifier processes"
            print(f"{events:,} events at {rate:g}/s to {CHANNELS} webhook channels ({process_words}), receiver nginx")
            pairs = []
            for round_ in range(rounds):
                a, b = Phase(f"a{round_}"), Phase(f"b{round_}")
                await phase(a, run.database_url, box, receiver, hang_url, exchange, events, rate, meter, hang=False)
                await phase(b, run.database_url, box, receiver, hang_url, exchange, events, rate, meter, hang=True)
                pairs.append((a, b))
    for round_, (a, b) in enumerate(pairs):
        if rounds > 1:
            print(f"round {round_ + 1}:")
        for label, result in (("A: 5 channels", a), ("B: + a hanging 6th", b)):
            latencies = result.latencies or [float("nan")]
            p99 = percentile(latencies, 0.99)
            print(
                f"{label:<20} {len(result.latencies):>7,} deliveries  {result.rate:8.0f} deliveries/s  latency p50 "
                f"{percentile(latencies, 0.5) * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms  "
                f"max {max(latencies) * 1000:6.0f} ms  (goal p99 <= 1000 ms: {verdict(p99 <= 1.0)})"
            )
            print(f"{'':<20} {result.cpu}")
        ratio = b.rate / a.rate if a.rate else float("nan")
        print(f"the 5 channels' rate with a hanging 6th / without: {ratio:.3f} (goal >= 0.90: {verdict(ratio >= 0.9)})")
        missing = [len(result.published) * CHANNELS - len(result.latencies) for result in (a, b)]
        if any(missing):
            print(f"not delivered within {WAIT_SECONDS} s: A {missing[0]:,}, B {missing[1]:,}")
    print(load_line())


def main(events: int, rate: float, notifiers: int, rounds: int) -> None:
    run = BenchRun.new()
    tmp = Path(f"/tmp/hgbench-notifier-{run.run_id}")
    tmp.mkdir(parents=True, exist_ok=True)
    with guarded(run.remove, lambda exc: run.print_service_logs()) as outcome:
        run_async(body(run, tmp, events, rate, notifiers, rounds))
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--notifiers", type=int, default=1, help="notifier processes (any number may run)")
    parser.add_argument("--rounds", type=int, default=1, help="A then B this many times (noise shows)")
    arguments = parser.parse_args()
    main(arguments.events, arguments.rate, arguments.notifiers, arguments.rounds)
