"""RFC 9457 problem details: every error the API answers is `application/problem+json`."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An error answer. Raise it anywhere in a handler; `problem_response` renders it."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers or {}


def unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="healthgate"'})


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} not found")


def forbidden(detail: str) -> Problem:
    return Problem(403, detail)


def conflict(detail: str) -> Problem:
    return Problem(409, detail)


def field_errors(errors: list[dict[str, str]]) -> Problem:
    fields = ", ".join(dict.fromkeys(error["field"] for error in errors))
    return Problem(422, f"invalid fields: {fields}", title="Validation failed", errors=errors)


def validation_problem(exc: ValidationError, *, prefix: str = "") -> Problem:
    """A 422 naming every bad field of a pydantic validation error."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        location = [str(part) for part in error["loc"]]
        field = prefix + ".".join(location) if location else (prefix.rstrip(".") or "body")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        errors.append({"field": field, "message": message})
    return field_errors(errors)


def _type_uri(status: int) -> str:
    return f"https://healthgate.dev/problems/{HTTPStatus(status).phrase.lower().replace(' ', '-')}"


def problem_response(problem: Problem) -> Response:
    body: dict[str, object] = {
        "type": _type_uri(problem.status),
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    return Response(
        json.dumps(body), status_code=problem.status, media_type=PROBLEM_CONTENT_TYPE, headers=problem.headers
    )


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the same format."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    return problem_response(Problem(exc.status_code, exc.detail, headers=headers))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
    return problem_response(Problem(500, "internal error; the details are in the service log"))
