"""Reading requests and writing responses: bodies, query strings, cursors, JSON answers."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.problems import Problem, field_errors, validation_problem

MAX_BODY_BYTES = 64 * 1024
ModelT = TypeVar("ModelT", bound=BaseModel)
KeyT = TypeVar("KeyT")
RowT = TypeVar("RowT")


class PageQuery(BaseModel):
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(None, max_length=1000)


async def read_json(request: Request, *, limit: int = MAX_BODY_BYTES) -> Any:
    """The request body as JSON: 413 when larger than `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"request body is larger than {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        document = json.loads(b"".join(chunks), parse_constant=_refuse_constant, parse_int=_parse_int)
    except RecursionError:
        raise Problem(400, "request body is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise Problem(400, f"request body is not valid JSON: {exc}") from None
    bad_strings = list(_bad_strings(document))
    if bad_strings:
        raise field_errors([{"field": name or "body", "message": message} for name, message in bad_strings])
    return document


NUL_MESSAGE = "must not contain NUL characters"
SURROGATE_MESSAGE = "must be valid Unicode (it holds a lone surrogate escape such as \\ud800)"


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON (RFC 8259) does not have.
    raise ValueError(f"{name} is not a JSON value")


def _parse_int(text: str) -> int | float:
    """Python refuses to read integers of more than 4,300 digits; such a number is out of range of
    every field, so it becomes an infinity, which validation refuses naming the field."""
    try:
        return int(text)
    except ValueError:
        return float("-inf") if text.startswith("-") else float("inf")


def _bad_strings(document: Any) -> Iterator[tuple[str, str]]:
    """(field, message) for each string PostgreSQL cannot store: one holding U+0000, or a lone
    surrogate (valid as a JSON escape, not encodable as UTF-8). Keys are checked as well. Iterative,
    so a deeply nested body cannot exhaust the stack."""
    pending: deque[tuple[Any, str]] = deque([(document, "")])
    while pending:
        value, path = pending.popleft()
        if isinstance(value, str):
            if "\x00" in value:
                yield path, NUL_MESSAGE
            elif _has_surrogate(value):
                yield path, SURROGATE_MESSAGE
        elif isinstance(value, dict):
            for key, item in value.items():
                pending.append((key, path))
                pending.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            pending.extend((item, f"{path}.{index}" if path else str(index)) for index, item in enumerate(value))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def path_text(request: Request, name: str) -> str:
    """A text path parameter to store or query as PostgreSQL text, percent-decoded once (services/api/paths.py);
    422 naming `path.<name>` for NUL or a lone surrogate (`%ED%A0%80`, which the paths decode for job ids). A job
    id is read with `path_job_id` instead: any text is a job id."""
    value: str = request.path_params[name]
    if "\x00" in value:
        raise field_errors([{"field": f"path.{name}", "message": NUL_MESSAGE}])
    if _has_surrogate(value):
        raise field_errors([{"field": f"path.{name}", "message": SURROGATE_MESSAGE}])
    return value


def path_job_id(request: Request) -> str:
    """The `{job_id}` of the path, exactly as sent: any text, `/`, `?`, `#`, `%`, non-ASCII, NUL and other
    control characters, more than 200 characters, a lone surrogate (services/api/paths.py) included.

    CONTRACT §3, "every job id works": a job_id the gate answered as an invalid request (too long, control
    characters) is stored under `shared.events.job_key(job_id)`, so callers look every job id up by that key
    (a valid job_id is its own key), never by the text itself, which PostgreSQL may not be able to hold."""
    job_id: str = request.path_params["job_id"]
    return job_id


async def read_model(request: Request, model: type[ModelT] | TypeAdapter[Any]) -> Any:
    """Validate the JSON body against a model or a type adapter (422 naming every bad field)."""
    document = await read_json(request)
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(document)
        return model.model_validate(document)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def read_query(request: Request, model: type[ModelT]) -> ModelT:
    """Validate the query string; a parameter given twice or unknown parameters are refused."""
    params: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key in params:
            raise field_errors([{"field": f"query.{key}", "message": "given more than once"}])
        if "\x00" in value:
            raise field_errors([{"field": f"query.{key}", "message": NUL_MESSAGE}])
        params[key] = value
    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise field_errors([{"field": f"query.{key}", "message": "unknown parameter"} for key in unknown])
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise validation_problem(exc, prefix="query.") from None


def path_uuid(request: Request, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise field_errors([{"field": f"path.{name}", "message": "not a UUID"}]) from None


def encode_cursor(*values: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode().rstrip("=")


NOT_A_CURSOR = "not a cursor this list returned"


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise field_errors([{"field": "query.cursor", "message": NOT_A_CURSOR}])
    return values


# PostgreSQL's bigint and its timestamptz range (4713 BC to 294276 AD; Python's datetime stops at year 9999 first).
_BIGINT = range(-(2**63), 2**63)


def _check_bindable(key: object) -> None:
    """Raise ValueError (or OverflowError) unless every part of a parsed cursor key (a value or a tuple of them)
    is one PostgreSQL and asyncpg accept: every key a list writes is; a forged one (`"\\ud800"`, a NUL, an id
    past 2**63, `9999-12-31T23:59:59-01:00`, which is year 10000 in UTC, or a timestamp without offset) is not."""
    for value in key if isinstance(key, tuple) else (key,):
        if isinstance(value, bool):
            raise ValueError("not a key value")
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError(NUL_MESSAGE)
            value.encode()  # UnicodeEncodeError for a lone surrogate
        elif isinstance(value, int) and value not in _BIGINT:
            raise ValueError("out of bigint range")
        elif isinstance(value, dt.datetime):
            if value.utcoffset() is None:
                raise ValueError("a timestamp without a UTC offset")
            value.astimezone(dt.UTC)  # OverflowError past year 9999 or before year 1 in UTC


def text_key(value: object) -> str:
    """A one-value cursor key that is text (a host name, a group name): TypeError for anything else (`5`, `null`,
    a list), which str() would turn into a name no page ended at; NUL and surrogates: `_check_bindable`."""
    if not isinstance(value, str):
        raise TypeError("this cursor holds a name")
    return value


@dataclass(frozen=True)
class Keyset(Generic[KeyT]):
    """Keyset pagination of one list (CONTRACT §3: `limit`, `cursor`, `next_cursor`): a page is the first
    `limit` rows after the key of the previous page's last row, in the list's total order, so pages never
    repeat or skip a row. The cursor holds only that key (`encode_cursor` of its JSON values); the client
    sends the same filters with it.

    `parse(*values)` reads the key back from a cursor's `arity` JSON values, and raises TypeError,
    ValueError or AttributeError when they are not a key this list wrote (the cursor was forged or cut):
    422 naming `query.cursor`. Whatever `parse` accepts is checked once more against what PostgreSQL can be
    sent (`_check_bindable`: text without NUL or a lone surrogate, a bigint, an aware timestamp within
    PostgreSQL's range), so that a forged value is a 422 here, not a 500 from the driver. `values(row)` gives a
    row's key as JSON values."""

    arity: int
    parse: Callable[..., KeyT]
    values: Callable[[Any], tuple[Any, ...]]

    def after(self, cursor: str | None) -> KeyT | None:
        """The key a page starts after: None for the first page (no cursor)."""
        if cursor is None:
            return None
        values = decode_cursor(cursor, self.arity)
        try:
            key = self.parse(*values)
            _check_bindable(key)
        except (TypeError, ValueError, AttributeError, OverflowError):  # UnicodeEncodeError is a ValueError
            raise field_errors([{"field": "query.cursor", "message": NOT_A_CURSOR}]) from None
        return key

    @staticmethod
    def rows_to_fetch(limit: int) -> int:
        """Fetch one row more than a page holds: whether it came says whether there is a next page."""
        return limit + 1

    def page(self, rows: Sequence[RowT], limit: int) -> tuple[list[RowT], str | None]:
        """The page of `rows` (fetched with `rows_to_fetch(limit)`) and the next page's cursor, or None."""
        shown = list(rows[:limit])
        next_cursor = encode_cursor(*self.values(shown[-1])) if len(rows) > limit else None
        return shown, next_cursor


def json_response(body: BaseModel | None, status_code: int = 200) -> Response:
    """`body` as JSON. A string UTF-8 cannot encode (a lone surrogate, in a job_id received as `"\ud800"`, which
    pydantic refuses to serialise) is written as the same JSON escape, by the standard library, which then
    escapes every non-ASCII character too: the same JSON value either way."""
    if body is None:
        return Response(status_code=status_code)
    try:
        content = body.model_dump_json(exclude_unset=True)
    except PydanticSerializationError:
        content = json.dumps(body.model_dump(mode="json", exclude_unset=True), ensure_ascii=True, separators=(",", ":"))
    return Response(content, status_code=status_code, media_type="application/json")
