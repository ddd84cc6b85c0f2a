"""The API service: one Starlette app whose lifespan owns the pool, the broker and the outbox relay."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from importlib.metadata import version

import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.api.check_runs import CheckRunClient
from services.api.context import ApiContext, ApiMetrics
from services.api.dashboard.views import Dashboard
from services.api.docs import docs_routes
from services.api.openapi import build_openapi
from services.api.problems import (
    Problem,
    handle_http_exception,
    handle_problem,
    handle_unexpected,
    problem_response,
)
from services.api.routes import ENDPOINTS
from shared.crypto import SecretBox, load_or_create_key
from shared.database import (
    ROLLED_BACK_BY_CONCURRENCY,
    TRANSIENT_DATABASE_ERRORS,
    DatabaseWatch,
    close_pool,
    create_pool,
    is_transient_database_error,
)
from shared.health import GracefulServer, ServiceHealth, base_url, health_routes, listen
from shared.messaging import Broker
from shared.notification_sending import NotificationSender
from shared.outbox import OutboxMetrics, OutboxRelay
from shared.settings import Settings
from shared.supervision import TaskGroupOfService
from shared.topology import Topology

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 15


async def handle_database_down(request: Request, exc: Exception) -> Response:
    """503 while PostgreSQL is unreachable. The outage is logged once by the api's DatabaseWatch (one
    warning, then one line when it is back), not once per request."""
    if not is_transient_database_error(exc):
        return await handle_unexpected(request, exc)
    request.app.state.database.report(exc)
    log.debug("database unavailable", extra={"path": request.url.path, "error": str(exc)})
    return problem_response(Problem(503, "the database is unavailable; try again shortly"))


async def handle_concurrent_change(request: Request, exc: Exception) -> Response:
    """503 with `Retry-After: 1` when PostgreSQL rolled the request's transaction back because of a concurrent one
    (`ROLLED_BACK_BY_CONCURRENCY`: a deadlock or a serialization failure). That transaction changed nothing, and
    sending the same request again is the cure; a 500 would wrongly say the request itself broke something.
    Logged as a warning: our transactions take their locks in one order, so a deadlock is worth a look."""
    log.warning(
        "transaction rolled back by a concurrent one",
        extra={"path": request.url.path, "method": request.method, "sqlstate": getattr(exc, "sqlstate", None)},
    )
    return problem_response(
        Problem(
            503, "a concurrent change rolled this request's transaction back; try again", headers={"Retry-After": "1"}
        )
    )


def create_app(settings: Settings, key: bytes) -> Starlette:
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    health = ServiceHealth("api", pool=None, broker=None, allowed_networks=settings.health_allowed_networks)
    openapi = build_openapi(ENDPOINTS, version=version("healthgate"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stack = contextlib.AsyncExitStack()
        # Connections open on demand, so the API serves (and reports not ready) while PostgreSQL is down.
        pool = await create_pool(settings.database_url, min_size=0, max_size=settings.pool_max_size(20))
        broker = Broker(settings.amqp_url, Topology(settings.exchange), connection_name="healthgate-api")
        database = DatabaseWatch(settings.database_url, pool)
        app.state.database = database
        check_runs = CheckRunClient(broker)
        relay = OutboxRelay(pool, broker, OutboxMetrics(registry), database)
        notifications = await stack.enter_async_context(NotificationSender(settings.blocked_networks))
        app.state.context = ApiContext(
            settings=settings,
            pool=pool,
            broker=broker,
            secrets=SecretBox(key),
            metrics=metrics,
            check_runs=check_runs,
            notifications=notifications,
        )
        health.pool, health.broker = pool, broker
        # A background task that dies makes the process exit (via SIGTERM to itself, which uvicorn
        # handles gracefully) so that its supervisor restarts it.
        background = TaskGroupOfService(on_failure=lambda: os.kill(os.getpid(), signal.SIGTERM))
        app.state.background = background
        background.start(database.run(), "database-watch")
        background.start(broker.run(check_runs.on_connected), "broker-connect")
        background.start(relay.run(), "outbox-relay")
        health.started = True
        try:
            yield
        finally:
            health.shutting_down = True
            await background.cancel_all()
            await broker.close()
            await stack.aclose()
            await close_pool(pool)
            log.info("api stopped")

    async def openapi_document(request: Request) -> Response:
        return JSONResponse(openapi)

    routes = [
        *(endpoint.route() for endpoint in ENDPOINTS),
        Route("/openapi.json", openapi_document, methods=["GET"]),
        *docs_routes(),
        *health_routes(health, registry),
        *Dashboard().routes(),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            Problem: handle_problem,
            HTTPException: handle_http_exception,
            **dict.fromkeys(TRANSIENT_DATABASE_ERRORS, handle_database_down),
            **dict.fromkeys(ROLLED_BACK_BY_CONCURRENCY, handle_concurrent_change),
            Exception: handle_unexpected,
        },
    )


def run_api(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; 1 if it stopped because a background task failed.

    Raises KeyFileError (unusable key file) or CannotListen (port taken, ...) before anything starts."""
    key = load_or_create_key(settings.key_file)
    # Listen before the app starts, so that a taken port stops the api at once with one line (CONTRACT §1).
    listeners = listen(settings.api_host, settings.api_port)
    app = create_app(settings, key)
    url = base_url(listeners)

    def announce() -> None:
        log.info(
            f"api started: dashboard {url}/, API reference {url}/docs, API {url}/api/v1, OpenAPI {url}/openapi.json,"
            f" health {url}/health, metrics {url}/metrics",
            extra={"port": listeners[0].getsockname()[1]},
        )

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )
    GracefulServer(config, on_started=announce).run(sockets=listeners)
    background = getattr(app.state, "background", None)
    return 1 if background is not None and background.failed else 0
