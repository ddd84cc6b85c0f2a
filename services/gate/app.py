"""The gate service: consumes job requests and check results, decides jobs, runs the timers."""

from __future__ import annotations

from services.gate.consumer import Gate, GateMetrics
from shared.service import WorkerRuntime, run_service
from shared.settings import Settings


async def serve(settings: Settings) -> bool:
    """Run until SIGINT/SIGTERM; False if it stopped because one of its tasks failed."""
    async with WorkerRuntime("gate", settings, pool_size=20) as runtime:
        gate = Gate(
            runtime.pool, runtime.broker, GateMetrics(runtime.registry), runtime.database,
            retry_seconds=settings.gate_retry_seconds, unknown_host=settings.gate_unknown_host,
        )  # fmt: skip
        gate.consume(runtime.consumers)
        runtime.start_broker()
        runtime.tasks.start(gate.run_timers(), "timers")
        await runtime.stopped()
    return runtime.succeeded


def run_gate(settings: Settings) -> int:
    """`healthgate gate`: run until SIGINT/SIGTERM; the process's exit status (`run_service`)."""
    return run_service(serve(settings))
