"""Long-running tasks of a service: a task that dies unexpectedly is logged and stops the service,
so that its supervisor (`healthgate up`, compose, systemd) restarts it rather than it limping on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

# How long cancelled tasks get to end when a service stops. One stuck on a database that stopped
# answering is left behind: the service then cuts its connections (`shared.database.close_pool`).
TASKS_STOP_SECONDS = 3.0


class TaskGroupOfService:
    def __init__(self, on_failure: Callable[[], None]) -> None:
        self._on_failure = on_failure
        self.tasks: list[asyncio.Task[Any]] = []
        self.failed = False

    def start(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._check)
        self.tasks.append(task)
        return task

    def _check(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self.failed = True
        log.error(
            "a service task failed; stopping",
            extra={"task": task.get_name(), "error": repr(error)},
            exc_info=(type(error), error, error.__traceback__),
        )
        self._on_failure()

    async def cancel_all(self, timeout: float = TASKS_STOP_SECONDS) -> None:
        """Cancel every task and wait up to `timeout` seconds for them to end. A task
        may be stuck where a cancel does not reach at once (a query to a database that stopped
        answering ends only at its command timeout); the caller then closes what it waits on."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)
