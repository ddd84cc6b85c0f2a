"""Health endpoints (draft-inadarei-api-health-check) and `/metrics`, the same for every service."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.messaging import Broker

log = logging.getLogger(__name__)

HEALTH_CONTENT_TYPE = "application/health+json"
DEPENDENCY_TIMEOUT_SECONDS = 2.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ServiceHealth:
    """What a service's health endpoints look at; the service flips `started` and `shutting_down`."""

    service: str
    pool: asyncpg.Pool | None
    broker: Broker | None
    allowed_networks: Sequence[Network]
    started: bool = False
    shutting_down: bool = False
    started_monotonic: float = field(default_factory=time.monotonic)

    def client_sees_details(self, client_host: str | None) -> bool:
        if client_host is None:
            return False
        try:
            address = ipaddress.ip_address(client_host)
        except ValueError:
            return False
        return any(address in network for network in self.allowed_networks)

    async def check(self) -> tuple[str, dict[str, list[dict[str, object]]]]:
        """Overall status and the `checks` object of the health response."""
        now = dt.datetime.now(dt.UTC).isoformat()
        checks: dict[str, list[dict[str, object]]] = {
            "uptime": [
                {
                    "componentType": "system",
                    "observedValue": round(time.monotonic() - self.started_monotonic, 3),
                    "observedUnit": "s",
                    "status": "pass" if self.started and not self.shutting_down else "fail",
                    "time": now,
                }
            ]
        }
        if self.pool is not None:
            checks["postgresql:responseTime"] = [await self._probe("datastore", self._ping_database, now)]
        if self.broker is not None:
            checks["rabbitmq:responseTime"] = [await self._probe("component", self.broker.ping, now)]
        failed = any(entry["status"] == "fail" for entries in checks.values() for entry in entries)
        return ("fail" if failed else "pass"), checks

    async def _ping_database(self) -> float:
        assert self.pool is not None
        started = time.perf_counter()
        async with asyncio.timeout(DEPENDENCY_TIMEOUT_SECONDS):
            await self.pool.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000

    @staticmethod
    async def _probe(component_type: str, ping: object, now: str) -> dict[str, object]:
        entry: dict[str, object] = {"componentType": component_type, "observedUnit": "ms", "time": now}
        try:
            entry["observedValue"] = round(await ping(), 3)  # type: ignore[operator]
            entry["status"] = "pass"
        except Exception as exc:  # any failure of a dependency is reported, not raised
            entry["status"] = "fail"
            entry["output"] = str(exc) or type(exc).__name__
        return entry


def health_routes(health: ServiceHealth, registry: CollectorRegistry) -> list[Route]:
    async def live(request: Request) -> Response:
        status = "fail" if health.shutting_down else "pass"
        return _health_response({"status": status}, 503 if health.shutting_down else 200)

    async def ready(request: Request) -> Response:
        status, checks = await health.check()
        body: dict[str, object] = {"status": status}
        if health.client_sees_details(request.client.host if request.client else None):
            body |= {"serviceId": health.service, "checks": checks}
        return _health_response(body, 200 if status == "pass" else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/health", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _health_response(body: dict[str, object], status_code: int) -> Response:
    return Response(
        json.dumps(body),
        status_code=status_code,
        media_type=HEALTH_CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT/SIGTERM as usual but then exiting with status 0 instead of
    re-raising the signal: a graceful stop is a success for `healthgate up`, compose and systemd."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


async def serve_health(health: ServiceHealth, registry: CollectorRegistry, host: str, port: int) -> None:
    """Serve the health endpoints of a worker service until cancelled. Port 0 picks a free one."""
    app = Starlette(routes=health_routes(health, registry))
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        bound = server.servers[0].sockets[0].getsockname()
        log.info("health endpoints listening", extra={"host": bound[0], "port": bound[1]})
    try:
        await serving
    finally:
        server.should_exit = True
