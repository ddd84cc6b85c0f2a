"""A stand-in for the poller's test-run responder, until the real poller exists (next issue).

`POST /api/v1/hosts/{host_id}/health-checks/{check_id}/test` asks a poller over AMQP to run a check now
(request/reply: a `CheckRunRequest` on the queue of `POLLER_TEST_QUEUE`, the answer a `CheckResult`
sent through the default exchange to the request's `reply_to`, with its `correlation_id`). This
responder answers those requests without running anything, so tests of the API need no poller:

    async with stand_in_poller(backing.amqp_url, exchange_name) as poller:
        response = await admin.post(f"/api/v1/hosts/{host_id}/health-checks/{check_id}/test")
    assert poller.requests[0].check_id == uuid.UUID(check_id)

By default every check is reported healthy (`reason` "ok"); pass `answer` to report something else.
Once the real poller exists, tests that need a real run should start it instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared.events import CheckResult, CheckRunRequest
from shared.topology import POLLER_TEST_QUEUE, Topology, declare_exchange, declare_queue

Answer = Callable[[CheckRunRequest], CheckResult]


def healthy_result(request: CheckRunRequest) -> CheckResult:
    return CheckResult(
        check_id=request.check_id,
        host_id=request.host_id,
        healthy=True,
        reason="ok",
        status="healthy",
        detail="answered by the stand-in poller",
        latency_ms=1.0,
        checked_at=dt.datetime.now(dt.UTC),
    )


@dataclass
class StandInPoller:
    """What the responder received; `requests` in arrival order."""

    channel: AbstractChannel
    answer: Answer
    requests: list[CheckRunRequest] = field(default_factory=list)

    async def on_request(self, message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=False):
            request = CheckRunRequest.model_validate_json(message.body)
            self.requests.append(request)
            if not message.reply_to:
                return
            result = self.answer(request)
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    result.model_dump_json().encode(),
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.reply_to,
            )


@contextlib.asynccontextmanager
async def stand_in_poller(
    amqp_url: str, exchange_name: str, *, answer: Answer = healthy_result
) -> AsyncIterator[StandInPoller]:
    """Consume the poller's test-run queue of `exchange_name` and answer every request with `answer`.

    Requests are acked once answered. Declaring the queue (idempotent, same arguments as every
    service) means the responder works whether or not a service has declared the topology yet.
    """
    topology = Topology(exchange_name)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        exchange = await declare_exchange(channel, topology)
        queue = await declare_queue(channel, topology, POLLER_TEST_QUEUE, exchange)
        poller = StandInPoller(channel, answer)
        consumer_tag = await queue.consume(poller.on_request)
        try:
            yield poller
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(consumer_tag)
