"""A real gRPC server (grpcio) serving the standard health service (grpc_health.v1.HealthServicer) on a free port
of 127.0.0.1, plaintext or TLS, as the peer of the poller's grpc checks.

    with GrpcHealthServer() as server:                       # plaintext; "" (the server) is SERVING
        server.set("payments", "NOT_SERVING")                # SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN
        server.port, server.address                          # 127.0.0.1 and its port
    with GrpcHealthServer(tls=self_signed()) as secure:      # TLS with a KeyPair of tests/support/certificates.py
        ...
    with GrpcHealthServer(answer=b"\xff") as broken:         # Check answers these bytes as its message, unread
        ...

A service never `set` is unknown to the server: Check answers NOT_FOUND. The server runs in this process, on
gRPC's threads, so sync and async tests alike can use it; the poller under test runs in another process.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from types import TracebackType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support.certificates import KeyPair

SERVER_THREADS = 4


class GrpcHealthServer:
    """gRPC's health servicer on 127.0.0.1: `start()`/`stop()` or a context manager."""

    def __init__(self, *, tls: KeyPair | None = None, answer: bytes | None = None) -> None:
        self.tls = tls
        self.answer = answer
        self.port = 0
        self.address = "127.0.0.1"
        self._health = health.HealthServicer()
        self._server: grpc.Server | None = None

    def set(self, service: str, status: str) -> None:
        """Set what Check answers for `service` ("" is the server as a whole)."""
        self._health.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    def start(self) -> GrpcHealthServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS))
        if self.answer is None:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        else:
            server.add_generic_rpc_handlers([_answering(self.answer)])
        if self.tls is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([(self.tls.key_pem, self.tls.cert_pem)])
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        if not self.port:
            raise RuntimeError("the gRPC server could not bind a port of 127.0.0.1")
        self.set("", "SERVING")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> GrpcHealthServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answering(answer: bytes) -> grpc.GenericRpcHandler:
    """Health/Check answering `answer` as its response message (no serializer: the bytes go out as they are),
    whatever the request: the server of a broken or hostile implementation."""
    check = grpc.unary_unary_rpc_method_handler(lambda request, context: answer)
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check})


@pytest.fixture(scope="session")
def grpc_health() -> Iterator[GrpcHealthServer]:
    """One plaintext health server for the session: "" and "payments" SERVING, "batch" NOT_SERVING, "legacy"
    UNKNOWN; any other service is unknown (NOT_FOUND). Tests must not change it."""
    with GrpcHealthServer() as server:
        server.set("payments", "SERVING")
        server.set("batch", "NOT_SERVING")
        server.set("legacy", "UNKNOWN")
        yield server
