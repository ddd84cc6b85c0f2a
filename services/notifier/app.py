"""The notifier service (CONTRACT §7): consumes the notifiable events, records one delivery per matched channel, and
sends the due deliveries to webhooks and Slack. Any number may run against the same database and broker."""

from __future__ import annotations

from services.notifier.notifier import ChannelCache, Dispatcher, EventHandler, NotifierMetrics
from shared.crypto import SecretBox, load_or_create_key
from shared.database import close_pool, create_pool
from shared.notification_deliveries import RetryPolicy
from shared.notification_sending import NotificationSender
from shared.service import WorkerRuntime, run_service
from shared.settings import Settings
from shared.topology import NOTIFIER_EVENTS_QUEUE

# Events taken from the queue at once: those held while a batch is written make the next batch (services/notifier/
# notifier.py, EventHandler), so a burst is recorded in a few statements rather than one per event.
PREFETCH = 500
# At a stop, the POSTs at work get at most this long to finish, and their answers as long to be stored: the whole
# stop stays within CONTRACT §1's 20 s whatever HEALTHGATE_NOTIFIER_TIMEOUT_SECONDS says (up to 60 s). Those cut
# off stay leased and are sent again by a notifier once the lease ends.
DRAIN_SECONDS = 5.0
# The dispatcher's connections: a claim, the lag gauge and up to 3 statements storing answers at once.
DISPATCH_POOL_SIZE = 5


async def serve(settings: Settings, key: bytes) -> bool:
    """Run until SIGINT/SIGTERM; False if it stopped because one of its tasks failed."""
    async with (
        WorkerRuntime("notifier", settings, pool_size=10) as runtime,
        NotificationSender(settings.blocked_networks, timeout_seconds=settings.notifier_timeout_seconds) as sender,
    ):
        metrics = NotifierMetrics(runtime.registry)
        channels = ChannelCache(SecretBox(key))
        # Claims and answers commit without waiting for the WAL flush: PostgreSQL crashing within a moment of one
        # loses it, which at worst sends a delivery again (at least once, as a notifier killed mid-POST does); the
        # records themselves, which the acks depend on, are written through the service's pool, durably. And each
        # statement is planned for the table as it is: a generic plan cached while the table was nearly empty (a
        # fresh install, a start after pruning) scans it whole, and keeps doing so as it grows to millions.
        dispatch_pool = await create_pool(
            settings.database_url, min_size=0, max_size=settings.pool_max_size(DISPATCH_POOL_SIZE),
            server_settings={"synchronous_commit": "off", "plan_cache_mode": "force_custom_plan"},
        )  # fmt: skip
        dispatcher = Dispatcher(
            dispatch_pool, sender, channels, metrics, runtime.database,
            policy=RetryPolicy(first_seconds=settings.notifier_retry_seconds),
            timeout_seconds=settings.notifier_timeout_seconds, concurrency=settings.notifier_concurrency,
        )  # fmt: skip
        handler = EventHandler(runtime.pool, channels, dispatcher, metrics)
        runtime.consumers.add(NOTIFIER_EVENTS_QUEUE, handler.on_message, prefetch=PREFETCH)
        runtime.start_broker()
        runtime.tasks.start(channels.follow_changes(runtime.pool, runtime.database), "channel-changes")
        runtime.tasks.start(dispatcher.run(), "dispatcher")
        runtime.tasks.start(dispatcher.store_answers(), "answers")
        try:
            await runtime.stopped()
        finally:
            # Before the sender's HTTP session closes: the POSTs at work finish and their answers are stored; the
            # rest stay leased and are sent again (a receiver de-duplicates by webhook-id).
            await runtime.consumers.stop(runtime.consumer_grace_seconds)
            await dispatcher.drain(min(settings.notifier_timeout_seconds, DRAIN_SECONDS))
            await close_pool(dispatch_pool)
    return runtime.succeeded


def run_notifier(settings: Settings) -> int:
    """`healthgate notifier`: run until SIGINT/SIGTERM; the process's exit status (`run_service`). Raises
    KeyFileError for an unusable key file (the channels' secrets are encrypted with it), before anything starts."""
    key = load_or_create_key(settings.key_file)
    return run_service(serve(settings, key))
