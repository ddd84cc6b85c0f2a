"""What the API commands print: the API's JSON (`--json`), Rich tables, and errors as one line on stderr.

Shared by the operator commands (services/operator_commands.py) and `apply`/`export` (services/fleet.py).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.api_client import ApiClientError

# Exit statuses (CONTRACT §1): 1 an API error or an unreachable API, 2 bad usage (Click's own), 3 an unhealthy test.
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNHEALTHY = 3

# Rich styles of the states the API reports, so that a table reads at a glance.
STATE_STYLES = {
    "healthy": "green",
    "unhealthy": "red",
    "degraded": "yellow",
    "unknown": "dim",
    "no_checks": "dim",
    "released": "green",
    "verified": "green",
    "waiting_health_check": "yellow",
    "verifying": "cyan",
    "failed": "red",
    "verification_failed": "red",
    "cancelled": "dim",
}

P = ParamSpec("P")
R = TypeVar("R")


def stdout_console() -> Console:
    """A console on stdout; when stdout is not a terminal (a pipe, a file) it is wide enough that rows do not wrap
    at 80 columns, and never coloured."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=200, no_color=True, highlight=False)


def fail(message: str, code: int = EXIT_API_ERROR) -> NoReturn:
    """Print `healthgate: <message>` as one line on stderr and exit with `code`."""
    print("healthgate: " + " ".join(message.split()), file=sys.stderr)
    raise typer.Exit(code)


def api_command(function: Callable[P, R]) -> Callable[P, R]:
    """A command that calls the API: an API error or an unreachable API → one line on stderr, exit 1."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except ApiClientError as exc:
            fail(str(exc))

    return wrapper


def print_json(document: Any) -> None:
    """`document` as indented JSON on stdout (what the API answered, parsed and written again)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def cell(value: Any) -> Text:
    """A value as table text: `-` for null, yes/no for booleans, compact JSON for lists and objects, a state in
    its colour. Text, never markup: a value holding `[...]` is shown as it is."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        return Text(", ".join(str(item) for item in value) or "-")
    if isinstance(value, dict | list):
        return Text(json.dumps(value, ensure_ascii=False))
    text = str(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


def table(columns: Sequence[tuple[str, Callable[[dict[str, Any]], Any]]], rows: Iterable[dict[str, Any]]) -> Table:
    """A table of `rows` with one column per (heading, value of a row)."""
    result = Table(box=None, header_style="bold", pad_edge=False)
    for heading, _ in columns:
        result.add_column(heading, overflow="fold")
    for row in rows:
        result.add_row(*(cell(value(row)) for _, value in columns))
    return result


def field_table(document: dict[str, Any], fields: Sequence[str] | None = None) -> Table:
    """One object as a two-column table: each field (in `fields`' order, else the document's) and its value."""
    result = Table(box=None, show_header=False, pad_edge=False)
    result.add_column(style="bold")
    result.add_column(overflow="fold")
    for name in fields or list(document):
        if name in document:
            result.add_row(name, cell(document[name]))
    return result


def show(renderables: Iterable[Any]) -> None:
    """Print Rich renderables (tables, text) on stdout."""
    console = stdout_console()
    for renderable in renderables:
        console.print(renderable)
