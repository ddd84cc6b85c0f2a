"""Logging a dependency's outages as state changes: one warning when it is lost, one line when it is back.

A service that loses PostgreSQL or RabbitMQ copes by itself (it waits, reconnects, holds nothing), so
an operator needs to know that an outage happened, why and for how long, not every retry of every
task. Every part of a service that notices an outage reports it to the same `OutageLog`; only the
first report after the dependency was up is logged, and the first success after that is logged once
as recovered, with the outage's length.
"""

from __future__ import annotations

import logging
import time

from shared.details import safe_detail


class OutageLog:
    """State-change logging of one dependency, called from its service's event loop.

    `down_message` is logged at WARNING with the error (`error`: text, never a traceback) on the first
    `down()` after an `up()` (or at first); `up_message` at INFO with `outage_seconds` on the first
    `up()` after a `down()`."""

    def __init__(
        self,
        logger: logging.Logger,
        down_message: str,
        up_message: str,
        *,
        fields: dict[str, object] | None = None,
    ) -> None:
        self._logger = logger
        self._down_message = down_message
        self._up_message = up_message
        self._fields = dict(fields or {})
        self._down_since: float | None = None

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def down(self, error: BaseException | str) -> bool:
        """Record that the dependency is unreachable; True (and one log line) if it was not already."""
        if self._down_since is not None:
            return False
        self._down_since = time.monotonic()
        self._logger.warning(self._down_message, extra=self._fields | {"error": describe_error(error)})
        return True

    def up(self) -> bool:
        """Record that the dependency answers again; True (and one log line) if it was down."""
        since, self._down_since = self._down_since, None
        if since is None:
            return False
        self._logger.info(self._up_message, extra=self._fields | {"outage_seconds": round(time.monotonic() - since, 1)})
        return True


def describe_error(error: BaseException | str) -> str:
    """One line about an error (its first line, bounded, credentials redacted), or its type's name when it has no
    text (TimeoutError())."""
    text = error if isinstance(error, str) else (str(error).strip() or type(error).__name__)
    return safe_detail(text.splitlines()[0] if text else "unknown error")
