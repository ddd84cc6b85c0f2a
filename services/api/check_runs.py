"""`/test`: ask a poller over AMQP to run a check now, and wait for its result (request/reply)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from shared.events import CheckResult, CheckRunRequest
from shared.messaging import Broker
from shared.topology import POLLER_TEST_QUEUE, declare_reply_queue

log = logging.getLogger(__name__)


class CheckRunClient:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._instance_id = uuid.uuid4().hex
        self._waiting: dict[str, asyncio.Future[CheckResult]] = {}

    @property
    def reply_to(self) -> str:
        return self._broker.topology.reply_queue_name(self._instance_id)

    async def on_connected(self, connection: AbstractRobustConnection) -> None:
        """Start consuming this process's reply queue; the robust connection restores it."""
        channel = await connection.channel()
        queue = await declare_reply_queue(channel, self._broker.topology, self._instance_id)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._waiting.get(message.correlation_id or "")
        if waiter is None or waiter.done():
            return  # an answer that came after we gave up waiting
        try:
            waiter.set_result(CheckResult.model_validate_json(message.body))
        except ValidationError as exc:
            log.warning("malformed check-run reply", extra={"error": str(exc)})

    async def run(self, request: CheckRunRequest, timeout: float) -> CheckResult | None:
        """The poller's result, or None when no poller answered within `timeout` seconds.

        Raises PublishFailed when the broker is not reachable, Unroutable when no queue is bound for the request.
        """
        correlation_id = uuid.uuid4().hex
        waiter: asyncio.Future[CheckResult] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = waiter
        try:
            await self._broker.publish(
                POLLER_TEST_QUEUE.bindings[0],
                request.model_dump_json().encode(),
                message_id=correlation_id,
                correlation_id=correlation_id,
                content_type="application/json",
                reply_to=self.reply_to,
                expiration=timeout,
            )
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(correlation_id, None)
