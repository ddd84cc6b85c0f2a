"""Reading the JSON of inbound messages: any valid JSON text, whatever its numbers or depth.

Python's `json` cannot read every valid JSON text. It refuses integers of more than 4,300 digits
(`sys.get_int_max_str_digits()`: converting longer ones takes quadratic time) and recurses once per
nesting level, so a document nested about 1,000 deep raises RecursionError. A job.start is valid with
any extra field (CONTRACT §5: unknown fields are ignored), so neither may cost it its decision:

- numbers: `json.loads` with `parse_int`/`parse_float` hooks that never convert an integer Python
  refuses, nor keep a float beyond its range (`1e400` would become `inf`): such a number is kept as an
  `OutOfRangeNumber`, which an ignored field may hold and every typed field refuses. `NaN`, `Infinity`
  and `-Infinity`, which Python reads and JSON (RFC 8259) does not have, make the text not JSON.
- depth: on RecursionError, the text is read again as ijson's stream of parse events
  (`ijson.basic_parse`, yajl2_c backend: a C parser with an explicit stack, no recursion), building the
  values down to `KEPT_DEPTH` levels; a container below that is only counted through and stands as a
  `NestedTooDeep`. Inbound models read fields one or two levels down (a CloudEvent's `data.*`), so
  what they validate is the same either way. (`ijson.parse`/`items` are not used: their prefix
  strings grow with the depth, to gigabytes for a 100,000-deep text.)
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

import ijson

# Below this depth, containers of a deeply nested text are counted through, not built.
KEPT_DEPTH = 64
# A text too deep for `json` is read event by event in Python, on the consumer's event loop: about
# 0.25 µs per byte (yajl2_c) or 0.6 µs (the pure Python backend), measured on a 4 MiB text. This bounds
# that to about a second at most (a job.start is under 1 KiB).
MAX_DEEP_TEXT_BYTES = 2 * 1024 * 1024
# JSON strings (whole, so that digits inside them are never taken for a number) or number tokens.
_STRING_OR_NUMBER = re.compile(
    rb'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![0-9A-Za-z.+-])-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?', re.DOTALL
)
# yajl replaces a lone surrogate escape ("\ud800", valid JSON) by "?"; the pure Python backend keeps it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JsonInputError(ValueError):
    """A message body (or a CloudEvent's decoded `data_base64`) this module cannot read as JSON; the
    message says why, in words fit for a detail."""


class OutOfRangeNumber:
    """Stands for a JSON number no Python number holds: an integer of more digits than Python converts
    (4,300 by default), or a number beyond a float's range (`1e400`). Every typed field refuses it (it
    is neither an int, a float nor a string); an ignored field may hold it."""

    __slots__ = ("text_length",)

    def __init__(self, text: str | bytes) -> None:
        self.text_length = len(text)

    def __repr__(self) -> str:
        return f"<JSON number of {self.text_length} characters, out of range>"


class NestedTooDeep:
    """Stands for an array or object nested below `KEPT_DEPTH` levels in a text too deep for Python's
    `json`: it was read (so the text is valid JSON) but not built. `kind` is "an array" or "an object"."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind} nested more than {KEPT_DEPTH} levels deep>"


def json_type(value: object) -> str:
    """The JSON type of a decoded value, for a message: "a number", "an array", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | OutOfRangeNumber):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, NestedTooDeep):
        return value.kind
    return type(value).__name__


def load_json(text: bytes, *, what: str = "body") -> Any:
    """`text` (UTF-8, or UTF-16/32 as `json.loads` detects) as Python values: objects as dicts,
    arrays as lists, and the stand-ins above. `what` names the text in errors ("body", "data_base64").

    Raises JsonInputError when `text` is not JSON, or when it nests deeper than Python's `json`
    recurses and is longer than MAX_DEEP_TEXT_BYTES."""
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except RecursionError:
        return _load_deep(text, what)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError, a refused constant
        raise JsonInputError(f"{what} is not JSON: {exc}") from None


def _parse_int(text: str) -> int | OutOfRangeNumber:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits()
        return OutOfRangeNumber(text)


def _parse_float(text: str) -> float | OutOfRangeNumber:
    value = float(text)
    return value if math.isfinite(value) else OutOfRangeNumber(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _load_deep(text: bytes, what: str) -> Any:
    """A text `json` could not read for its depth, read as a stream of parse events."""
    if len(text) > MAX_DEEP_TEXT_BYTES:
        raise JsonInputError(
            f"{what} is not JSON this service reads: nested deeper than Python's json decoder goes "
            f"(about 1,000 levels) and {len(text)} bytes long (at most {MAX_DEEP_TEXT_BYTES} bytes then)"
        )
    encoding = json.detect_encoding(text)
    if encoding != "utf-8":  # UTF-16 or 32, or a UTF-8 BOM, which `json.loads` reads and yajl does not
        try:
            text = text.decode(encoding).encode("utf-8")
        except UnicodeError as exc:
            raise JsonInputError(f"{what} is not JSON: {exc}") from None
    too_long = _too_many_digits()
    if too_long is not None and too_long.search(text):
        # Both ijson backends convert every integer (and a Decimal's exponent) with int(), which
        # refuses such a number and stops the whole parse: each number token of that many digits
        # becomes 1e99999 first, read as out of range as `json.loads` reads it here.
        text = _STRING_OR_NUMBER.sub(lambda match: _out_of_range_token(match, too_long), text)
    backend = "python" if _SURROGATE_ESCAPE.search(text) else "yajl2_c"
    try:
        return _build(_events(text, backend))
    except (ijson.JSONError, ValueError, ArithmeticError, SystemError) as exc:
        # JSONError: not JSON; ValueError: not UTF-8; the others: a number a backend still could not
        # convert (decimal.InvalidOperation, or yajl2_c's SystemError around int()'s ValueError).
        raise JsonInputError(f"{what} is not JSON: {_first_line(exc)}") from None


def _first_line(error: Exception) -> str:
    """The first line of a parser's error: yajl's go on with an excerpt of the text and an arrow,
    sometimes as the repr of bytes."""
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    lines = str(message).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _too_many_digits() -> re.Pattern[bytes] | None:
    """A run of more digits than int() converts (`sys.get_int_max_str_digits()`, 4,300 unless configured;
    None: no limit)."""
    limit = sys.get_int_max_str_digits()
    return re.compile(rb"[0-9]{%d}" % (limit + 1)) if limit else None


def _out_of_range_token(match: re.Match[bytes], too_long: re.Pattern[bytes]) -> bytes:
    token = match.group()
    if token.startswith(b'"') or not too_long.search(token):
        return token
    return b"-1e99999" if token.startswith(b"-") else b"1e99999"


def _events(text: bytes, backend: str) -> Iterator[tuple[str, Any]]:
    try:
        parser = ijson.get_backend(backend)
    except ImportError:  # no yajl2_c build for this platform: the pure Python backend reads the same
        parser = ijson.get_backend("python")
    # One buffer for the whole text: the pure Python backend would otherwise grow a long string
    # chunk by chunk, copying it each time.
    events: Iterator[tuple[str, Any]] = parser.basic_parse(text, buf_size=max(len(text), 1))  # ijson is untyped
    return events


def _build(events: Iterable[tuple[str, Any]]) -> Any:
    """The value of a stream of `ijson.basic_parse` events, built iteratively (no recursion) down to
    KEPT_DEPTH levels; a deeper container is only counted through. Duplicate keys: the last one wins, as
    in `json.loads`."""
    root: list[Any] = []
    containers: list[Any] = [root]  # the open containers that are built, innermost last
    keys: list[Any] = [None]  # the key of each one's next value (objects only)
    skipped = 0  # how many containers not built are open, innermost first
    for event, value in events:
        if skipped:
            if event == "start_array" or event == "start_map":
                skipped += 1
            elif event == "end_array" or event == "end_map":
                skipped -= 1
            continue
        if event == "map_key":
            keys[-1] = value
            continue
        if event == "end_array" or event == "end_map":
            containers.pop()
            keys.pop()
            continue
        opened: dict[Any, Any] | list[Any] | None = None
        if event == "start_array" or event == "start_map":
            if len(containers) > KEPT_DEPTH:
                item: Any = NestedTooDeep("an object" if event == "start_map" else "an array")
                skipped = 1
            else:
                item = opened = {} if event == "start_map" else []
        elif event == "number":
            item = _number(value)
        else:  # string, boolean, null
            item = value
        parent = containers[-1]
        if type(parent) is list:
            parent.append(item)
        else:
            parent[keys[-1]] = item
        if opened is not None:
            containers.append(opened)
            keys.append(None)
    return root[0]


def _number(value: int | Decimal | float) -> int | float | OutOfRangeNumber:
    if isinstance(value, int):
        return value
    as_float = float(value)
    return as_float if math.isfinite(as_float) else OutOfRangeNumber(str(value))
