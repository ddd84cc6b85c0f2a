"""Reading the JSON logs of the services the tests start (HEALTHGATE_LOG_FORMAT=json, one record per line)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from tests.support.processes import ServiceProcess


def log_lines(service: ServiceProcess, since: int = 0) -> list[dict[str, Any]]:
    """The service's JSON log records written after byte offset `since` (`log_path.stat().st_size` taken
    earlier); a line that is not a JSON object (a traceback, a partly written line) is skipped."""
    lines = []
    with service.log_path.open("rb") as log:
        log.seek(since)
        for line in log.read().decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    lines.append(entry)
    return lines
