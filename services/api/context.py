"""What every handler needs, created once by the lifespan and passed down through the app state."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request

from services.api.check_runs import CheckRunClient
from shared.crypto import SecretBox
from shared.messaging import Broker
from shared.notification_sending import NotificationSender
from shared.settings import Settings

EVENT_SOURCE = "/healthgate/api"


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "healthgate_http_requests",
            "API requests answered",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "healthgate_http_request_duration_seconds",
            "API request handling time",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    pool: asyncpg.Pool
    broker: Broker
    secrets: SecretBox
    metrics: ApiMetrics
    check_runs: CheckRunClient
    # Sends /test's notifications (CONTRACT §7); its one HTTP session lives as long as the app.
    notifications: NotificationSender
    source: str = EVENT_SOURCE


def context_of(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context  # set by the app's lifespan
    return context
