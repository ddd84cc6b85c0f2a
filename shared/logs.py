"""Logging set-up: one JSON object per line (or plain text), with the `extra` fields of each record."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Literal

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured duplicate of the message
}


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra_fields(record)
        if extra:
            line += " " + " ".join(f"{key}={value}" for key, value in extra.items())
        return line


class _BrokerNoise(logging.Filter):
    """Drops what aiormq and aio-pika log about a lost or refused broker connection: the service copes (it
    reconnects by itself), and `shared.messaging.Broker` logs each outage once, as one warning with its cause
    and one line when it is over. An operator needs to know that it happened and why, not each attempt, nor
    where in the library.

    - aiormq's "error when creating transport" repeats a failed attempt that our Broker's first connect
      logs itself as a warning with the retry delay;
    - aiormq's "Unexpected connection close from remote" and "Cancelling cause reader exited abnormally"
      (a traceback) say that the connection was lost;
    - aio-pika's "Connection attempt to ... failed/cancelled. Reconnecting after 5 seconds.", one per attempt
      while the broker is away;
    - aio-pika's "Callback <OneShotCallback ... RobustChannel._on_close> error" lines, one per channel, say
      that a channel could not be closed on a connection already gone; the robust connection restores the
      channels when it reconnects.
    """

    DROPPED = (
        "error when creating transport",
        "Unexpected connection close from remote",
        "Cancelling cause reader exited abnormally",
        "Connection attempt to ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if template.startswith(self.DROPPED):
            return False
        return not (template.startswith("Callback ") and "RobustChannel._on_close" in record.getMessage())


def configure_logging(service: str, log_format: Literal["json", "text"], level: int = logging.INFO) -> None:
    """Log records of every library to stderr, one line each, as JSON objects or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika and uvicorn are chatty at INFO about every reconnect attempt, request and server start/stop
    # ("Started server process", "Waiting for application startup", ...): a service logs its own start line.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    for noisy in ("aiormq.connection", "aio_pika.tools", "aio_pika.robust_connection"):
        logging.getLogger(noisy).filters[:] = [_BrokerNoise()]
