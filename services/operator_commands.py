"""The operator commands over the HTTP API (CONTRACT §1): hosts, checks, jobs and groups."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `hosts`, `checks`, `jobs` and `groups` to the `healthgate` app."""
