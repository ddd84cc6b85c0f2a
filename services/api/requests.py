"""Reading requests and writing responses: bodies, query strings, cursors, JSON answers."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.problems import Problem, field_errors, not_found, validation_problem

MAX_BODY_BYTES = 64 * 1024
ModelT = TypeVar("ModelT", bound=BaseModel)


class PageQuery(BaseModel):
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(None, max_length=1000)


async def read_json(request: Request) -> Any:
    """The request body as JSON: 413 when too large, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Problem(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Problem(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        document = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(400, f"request body is not valid JSON: {exc}") from None
    nul_fields = list(_fields_with_nul(document, ""))
    if nul_fields:
        raise field_errors([{"field": name or "body", "message": NUL_MESSAGE} for name in nul_fields])
    return document


NUL_MESSAGE = "must not contain NUL characters"


def _fields_with_nul(value: Any, path: str) -> Iterator[str]:
    """PostgreSQL text cannot hold U+0000, so such input is refused up front, naming the field."""
    if isinstance(value, str):
        if "\x00" in value:
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _fields_with_nul(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _fields_with_nul(item, f"{path}.{index}" if path else str(index))


def path_text(request: Request, name: str) -> str:
    """A text path parameter, percent-decoded once (services/api/paths.py); 422 naming `path.<name>` for NUL."""
    value: str = request.path_params[name]
    if "\x00" in value:
        raise field_errors([{"field": f"path.{name}", "message": NUL_MESSAGE}])
    return value


MAX_JOB_ID_LENGTH = 200  # CONTRACT §5 job.start; gate_jobs.job_id has the same CHECK


def path_job_id(request: Request) -> str:
    """The `{job_id}` of the path: any text that a job id may be, `/`, `?`, `#`, `%` and non-ASCII included.

    422 naming `path.job_id` for NUL (PostgreSQL text cannot hold it, as for every other input); 404 for an id
    longer than 200 characters, which no job can have (answered without a query). Other ids that no job can
    have (control characters) are looked up like any other and are simply not found: the rule about them
    belongs to the gate, and an id it stored must always be reachable here.
    """
    job_id = path_text(request, "job_id")
    if len(job_id) > MAX_JOB_ID_LENGTH:
        raise not_found("job")
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


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise field_errors([{"field": "query.cursor", "message": "not a cursor this list returned"}])
    return values


def json_response(body: BaseModel | None, status_code: int = 200) -> Response:
    if body is None:
        return Response(status_code=status_code)
    return Response(body.model_dump_json(exclude_unset=True), status_code=status_code, media_type="application/json")
