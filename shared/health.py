"""Health endpoints (draft-inadarei-api-health-check) and `/metrics`, the same for every service."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.messaging import Broker
from shared.settings import ServiceConfigError

log = logging.getLogger(__name__)

HEALTH_CONTENT_TYPE = "application/health+json"
DEPENDENCY_TIMEOUT_SECONDS = 2.0
LISTEN_BACKLOG = 2048  # uvicorn's default
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
    async def _probe(component_type: str, ping: Callable[[], Awaitable[float]], now: str) -> dict[str, object]:
        entry: dict[str, object] = {"componentType": component_type, "observedUnit": "ms", "time": now}
        try:
            entry["observedValue"] = round(await ping(), 3)
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


class CannotListen(ServiceConfigError):
    """The service cannot listen on its address (port taken, no permission, unknown host): it must not start."""


def listen(host: str, port: int) -> list[socket.socket]:
    """Bind and listen on every address `host` resolves to, as asyncio's create_server would, and return the
    listening sockets (for uvicorn's `serve(sockets=...)`). Port 0 picks a free port (the same one on every
    address). Done before anything else starts, so that a service whose port is taken stops at once with one
    clear line instead of uvicorn logging the error while the rest of the process runs on (CONTRACT §1).

    Raises CannotListen naming host, port and cause ("address already in use", "permission denied", ...).
    """

    def failure(reason: str) -> CannotListen:
        return CannotListen(f"cannot listen on {host_port(host, port)}: {reason}")

    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise failure(_reason(exc)) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(found):
            listener = socket.socket(family, kind, protocol)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            listener.bind(address)
            # listen() now, not when uvicorn starts: on Linux, two SO_REUSEADDR sockets may both bind one
            # port while neither listens, so only listen() proves the port is ours.
            listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for listener in sockets:
            listener.close()
        raise failure(_reason(exc)) from None
    return sockets


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "address already in use"
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    return text[:1].lower() + text[1:]


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets as in a URL."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def base_url(listeners: Sequence[socket.socket]) -> str:
    """`http://host:port` of the first listening socket (the real port when 0 was asked for)."""
    host, port = listeners[0].getsockname()[:2]
    return f"http://{host_port(host, port)}"


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT/SIGTERM as usual but then exiting with status 0 instead of
    re-raising the signal: a graceful stop is a success for `healthgate up`, compose and systemd.
    `on_started` runs once the server accepts connections (for the start line with the URLs served)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

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


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service that owns SIGINT/SIGTERM itself: uvicorn would otherwise replace the service's
    handlers with its own and stop serving /health/live (503 while stopping) at the first signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_health(health: ServiceHealth, registry: CollectorRegistry, listeners: list[socket.socket]) -> None:
    """Serve the health endpoints of a worker service on already listening sockets (see `listen`) until
    cancelled."""
    app = Starlette(routes=health_routes(health, registry))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = _EmbeddedServer(config)
    try:
        await server.serve(sockets=listeners)
    finally:
        server.should_exit = True
        for listening in getattr(server, "servers", []):
            listening.close()
