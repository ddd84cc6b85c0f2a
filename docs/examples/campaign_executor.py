#!/usr/bin/env python3
"""A patch-campaign executor for healthgate: the example of docs/campaigns.md.

It patches a list of hosts as one job, the way healthgate expects an executor to (docs/campaigns.md):

1. bind its own durable queue to the job events it needs, before it asks anything;
2. publish one `job.start` per host (persistent, publisher confirms, mandatory, with a timeout, sent again on a
   nack, a return or a timeout: a repeated `job.start` never yields a second decision);
3. patch a host only once healthgate published `job.released` for it, then publish `job.finished` with the
   outcome;
4. wait for `job.verified` or `job.verification_failed` for each patched host (or `job.failed` for one that was
   never released), and stop early once the job is halted.

Usage (the hosts are healthgate host ids):

    python docs/examples/campaign_executor.py --job-id patch-2026-12 --window-minutes 120 --max-failed-hosts 1 \\
        --patch-command 'ssh admin@{host_id}.example.internal sudo unattended-upgrade' \\
        35958d0d-0910-45bc-971f-5397dd9f1dfe 7c0a3b52-62a4-4a49-9a3e-1f6f4b0c2e11

Without --patch-command, patching is simulated by waiting --patch-seconds. The command runs through the shell with
`{host_id}` replaced; exit status 0 is `outcome: succeeded`, anything else `failed`. The exit status of the script
is 0 when every host was verified, else 1.

Needs aio-pika (`pip install aio-pika`). State is kept in memory: a real executor stores which hosts it patched
and which events it handled (by event id) so that it can carry on after a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

log = logging.getLogger("campaign-executor")

SOURCE = "/examples/campaign-executor"
# What this executor listens to. `job.*` would also match job.start, job.cancel and job.finished, including its
# own; binding the outbound keys alone keeps those out.
EVENTS = (
    "job.waiting",
    "job.released",
    "job.failed",
    "job.cancelled",
    "job.verified",
    "job.verification_failed",
    "job.halted",
    "job.resumed",
)
# A job host is done with one of these (docs/campaigns.md, "The life of a job host").
FINAL = {"job.failed": "failed", "job.cancelled": "cancelled", "job.verified": "verified",
         "job.verification_failed": "verification failed"}  # fmt: skip
PUBLISH_TIMEOUT_SECONDS = 10
PUBLISH_ATTEMPTS = 5


def cloudevent(routing_key: str, data: dict[str, Any]) -> tuple[str, bytes]:
    """A structured-mode CloudEvent (healthgate also takes the bare data object): its id and its JSON body."""
    event_id = str(uuid.uuid4())
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": f"healthgate.{routing_key}",
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }
    return event_id, json.dumps(event).encode()


def job_start(job_id: str, host_id: str, window_ends_at: dt.datetime, max_failed_hosts: int | None) -> dict[str, Any]:
    """The data of a `job.start` (docs/events.md). `max_failed_hosts` is taken from the job's first job.start that
    carries it; sending it on every one is harmless."""
    data: dict[str, Any] = {"job_id": job_id, "host_id": host_id, "window_ends_at": window_ends_at.isoformat()}
    if max_failed_hosts is not None:
        data["max_failed_hosts"] = max_failed_hosts
    return data


def job_finished(job_id: str, host_id: str, succeeded: bool, detail: str) -> dict[str, Any]:
    """The data of a `job.finished`: the executor is done with a released host (`detail` at most 1,000 characters)."""
    return {"job_id": job_id, "host_id": host_id, "outcome": "succeeded" if succeeded else "failed",
            "detail": detail[:1000]}  # fmt: skip


async def publish(exchange: AbstractExchange, routing_key: str, data: dict[str, Any]) -> None:
    """Publish persistently with publisher confirms and `mandatory`, and wait for the broker's confirm. A nack, a
    return (no queue bound: healthgate is not running yet) or a timeout sends the same message again, with the same
    id, a few times: healthgate drops the repeats of a job.start or job.finished it has handled."""
    event_id, body = cloudevent(routing_key, data)
    message = aio_pika.Message(
        body,
        content_type="application/cloudevents+json",
        message_id=event_id,
        correlation_id=data["job_id"],
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT_SECONDS)
            return
        except (TimeoutError, aio_pika.exceptions.DeliveryError) as exc:
            if attempt == PUBLISH_ATTEMPTS:
                raise
            log.warning("publishing %s failed (%s); sending it again", routing_key, exc or type(exc).__name__)
            await asyncio.sleep(min(2**attempt, 30))


async def patch(host_id: str, command: str | None, seconds: float) -> tuple[bool, str]:
    """Patch one host: run `command` with `{host_id}` replaced (exit status 0: succeeded), or, without one, wait
    `seconds` as a stand-in. Returns (succeeded, detail)."""
    if command is None:
        await asyncio.sleep(seconds)
        return True, f"simulated patch of {seconds:g} s"
    process = await asyncio.create_subprocess_shell(
        command.format(host_id=shlex.quote(host_id)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    tail = output.decode(errors="replace").strip()[-500:]
    return process.returncode == 0, f"exit status {process.returncode}" + (f": {tail}" if tail else "")


@dataclass
class Campaign:
    """One job over `hosts`: what happened to each host, and the event ids already handled."""

    job_id: str
    hosts: list[str]
    patch_command: str | None
    patch_seconds: float
    outcome: dict[str, str] = field(default_factory=dict)  # host_id -> final word (FINAL)
    patching: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    halted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish_if_done(self) -> None:
        """Done when every host has its final event. A halted job gets there too: its waiting hosts and any later
        job.start fail with reason job_halted, and the hosts in patch get their verification outcome."""
        if len(self.outcome) == len(self.hosts):
            self.done.set()


async def handle(campaign: Campaign, exchange: AbstractExchange, message: AbstractIncomingMessage) -> None:
    """One event from the executor's queue. Acked once handled (a job.released once its host is patched and its
    job.finished confirmed); an event seen before (same id: a redelivery) is only acked."""
    event = json.loads(message.body)
    data = event.get("data", event)
    if data.get("job_id") != campaign.job_id or event.get("id") in campaign.seen:
        await message.ack()  # another job's event, or a duplicate
        return
    routing_key, host_id = message.routing_key, data.get("host_id")
    if routing_key == "job.released" and host_id not in campaign.patching and host_id not in campaign.outcome:
        campaign.patching.add(host_id)
        log.info("released %s after %s s: patching", host_id, data.get("waited_seconds"))
        asyncio.get_running_loop().create_task(patch_and_finish(campaign, exchange, message, event["id"], host_id))
        return  # acked once the host is patched and job.finished is confirmed
    campaign.seen.add(event["id"])
    if routing_key == "job.waiting":
        log.info("%s waits for %s", host_id, ", ".join(data.get("waiting_for") or ["its checks"]))
    elif routing_key in FINAL:
        campaign.patching.discard(host_id)
        campaign.outcome[host_id] = FINAL[routing_key]
        reason = data.get("reason")
        log.info("%s: %s%s%s", host_id, FINAL[routing_key], f" ({reason})" if reason else "",
                 f": {data['detail']}" if data.get("detail") else "")  # fmt: skip
    elif routing_key == "job.halted":
        campaign.halted = True
        log.warning("job halted (%s): %s", data["reason"], data["detail"])
    elif routing_key == "job.resumed":
        log.warning("job resumed by %s: %s (hosts that failed stay failed)", data.get("by"), data["detail"])
    await message.ack()
    campaign.finish_if_done()


async def patch_and_finish(
    campaign: Campaign, exchange: AbstractExchange, message: AbstractIncomingMessage, event_id: str, host_id: str
) -> None:
    try:
        succeeded, detail = await patch(host_id, campaign.patch_command, campaign.patch_seconds)
    except Exception as exc:  # the patch itself broke: healthgate must still hear of it
        succeeded, detail = False, f"the patch could not run: {exc}"
    await publish(exchange, "job.finished", job_finished(campaign.job_id, host_id, succeeded, detail))
    log.info("finished %s: %s (%s); healthgate verifies it now", host_id, "succeeded" if succeeded else "failed",
             detail)  # fmt: skip
    campaign.seen.add(event_id)
    await message.ack()


async def run(args: argparse.Namespace) -> int:
    campaign = Campaign(args.job_id, list(dict.fromkeys(args.hosts)), args.patch_command, args.patch_seconds)
    connection = await aio_pika.connect_robust(args.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # Every unacked job.released holds one slot until its host is patched: room for all of them.
        await channel.set_qos(prefetch_count=2 * len(campaign.hosts) + 16)
        exchange = await channel.declare_exchange(args.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        # 1. The executor's own durable queue, bound before anything is asked: healthgate drops an event no queue
        # is bound for. A quorum queue with a delivery limit keeps a poison message from looping.
        queue = await channel.declare_queue(
            args.queue, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}
        )
        for routing_key in EVENTS:
            await queue.bind(exchange, routing_key)
        await queue.consume(lambda message: handle(campaign, exchange, message))

        # 2. One job.start per host, in the order the hosts should be patched: a group's waiting hosts are
        # released in the order their job.start arrived.
        window_ends_at = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=args.window_minutes)
        for host_id in campaign.hosts:
            if campaign.halted:  # no point asking: healthgate would fail it at once (job_halted)
                campaign.outcome[host_id] = "not started (job halted)"
                continue
            await publish(exchange, "job.start", job_start(args.job_id, host_id, window_ends_at, args.max_failed_hosts))
        campaign.finish_if_done()
        log.info("asked for %d hosts; the window ends at %s", len(campaign.hosts), window_ends_at.isoformat())

        # 3. and 4. happen in `handle`, until every host is done. The deadline: the window, then verification
        # (at most verify_delay_seconds + verify_timeout_seconds of the group's policy) and a margin.
        deadline = (window_ends_at - dt.datetime.now(dt.UTC)).total_seconds() + args.verify_allowance_seconds
        try:
            await asyncio.wait_for(campaign.done.wait(), timeout=deadline)
        except TimeoutError:
            log.error("gave up waiting: %d of %d hosts have an outcome", len(campaign.outcome), len(campaign.hosts))
    for host_id in campaign.hosts:
        print(f"{host_id}\t{campaign.outcome.get(host_id, 'no outcome')}")
    return 0 if all(campaign.outcome.get(host_id) == "verified" for host_id in campaign.hosts) else 1


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("hosts", nargs="+", metavar="HOST_ID", help="healthgate host ids, in patch order")
    parser.add_argument("--job-id", required=True, help="1-200 characters, no control characters")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", default="healthgate", help="HEALTHGATE_EXCHANGE")
    parser.add_argument("--queue", default="campaign-executor.events", help="this executor's own durable queue")
    parser.add_argument("--window-minutes", type=float, default=120.0, help="the maintenance window, from now")
    parser.add_argument("--max-failed-hosts", type=int, default=None, help="halt the job after more failed hosts")
    parser.add_argument("--patch-command", default=None, help="shell command, {host_id} replaced")
    parser.add_argument("--patch-seconds", type=float, default=1.0, help="simulated patch time without a command")
    parser.add_argument(
        "--verify-allowance-seconds", type=float, default=3600.0,
        help="how long to wait for verification outcomes after the window's end",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(run(parse_arguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
