"""The OpenAPI 3.1 document, generated from the endpoint declarations and their pydantic models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from services.api.endpoints import Endpoint
from services.api.schemas import ProblemDetails

REF_TEMPLATE = "#/components/schemas/{model}"
PATH_PARAMETER = re.compile(r"{(\w+)}")
JOB_ID_DESCRIPTION = (
    "The job id as one percent-encoded path segment: every job id works, `/` sent as `%2F` included "
    "(`deploy/2026/42` → `deploy%2F2026%2F42`; also `?` `%3F`, `#` `%23`, `%` `%25`, non-ASCII as UTF-8). "
    "A job_id the gate answered as an invalid request (over 200 characters, control characters, NUL as `%00`) "
    "is found by it too, and shown as received."
)
GROUP_DESCRIPTION = "The group's name as one percent-encoded path segment (`/` as `%2F`)."
# OpenAPI 3.1 §4.8.7.1: component names match ^[a-zA-Z0-9._-]+$. Anything else becomes "_", as pydantic
# names its $defs, so `Page[HostView]` is `Page_HostView_` both as an endpoint's model and nested.
NOT_IN_COMPONENT_NAME = re.compile(r"[^a-zA-Z0-9._-]")
PROBLEM_STATUSES = {
    400: "The body is not JSON",
    401: "No or unknown token",
    403: "The caller's role may not do this",
    404: "Not found, or outside the caller's groups",
    409: "Conflicts with the current state",
    413: "The body is too large",
    422: "Invalid fields; `errors` names each",
    503: "A dependency is unavailable",
    504: "No poller answered in time",
}


class _Schemas:
    """Collects component schemas; request and response variants of a model may differ."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def reference(self, model: Any, mode: JsonSchemaMode) -> dict[str, Any]:
        schema = TypeAdapter(model).json_schema(ref_template=REF_TEMPLATE, mode=mode)
        self.components.update(schema.pop("$defs", {}))
        if isinstance(model, type) and issubclass(model, BaseModel):
            name = component_name(schema.get("title", model.__name__))
            self.components[name] = schema
            return {"$ref": REF_TEMPLATE.format(model=name)}
        return schema


def component_name(title: str) -> str:
    """A model's title as a valid OpenAPI component name (`Page[HostView]` → `Page_HostView_`)."""
    return NOT_IN_COMPONENT_NAME.sub("_", title)


def _parameters(endpoint: Endpoint, schemas: _Schemas) -> list[dict[str, Any]]:
    parameters = []
    for name in PATH_PARAMETER.findall(endpoint.path):
        schema: dict[str, Any] = {"type": "string"}
        parameter: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
        if name.endswith("_id") and name != "job_id":
            schema["format"] = "uuid"
        if name == "job_id":
            schema |= {"minLength": 1}  # any length: the gate answers (and keeps) longer job_ids too
            parameter["description"] = JOB_ID_DESCRIPTION
        if name == "group":
            schema |= {"minLength": 1, "maxLength": 100}
            parameter["description"] = GROUP_DESCRIPTION
        parameters.append(parameter)
    if endpoint.query is not None:
        query_schema = endpoint.query.model_json_schema(ref_template=REF_TEMPLATE)
        schemas.components.update(query_schema.pop("$defs", {}))
        for name, field_schema in query_schema["properties"].items():
            field_schema = _without_null(field_schema)
            description = field_schema.pop("description", None)
            parameter = {"name": name, "in": "query", "required": False, "schema": field_schema}
            if description:
                parameter["description"] = description
            parameters.append(parameter)
    return parameters


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null alternative of optional fields."""
    alternatives = [option for option in schema.get("anyOf", []) if option != {"type": "null"}]
    if len(alternatives) == 1:
        rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
        only: dict[str, Any] = alternatives[0]
        return only | rest
    return schema


def build_openapi(endpoints: Sequence[Endpoint], *, version: str) -> dict[str, Any]:
    schemas = _Schemas()
    problem = {"application/problem+json": {"schema": schemas.reference(ProblemDetails, "serialization")}}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        responses: dict[str, Any] = {}
        if endpoint.response is None:
            responses[str(endpoint.status_code)] = {"description": "Done"}
        else:
            responses[str(endpoint.status_code)] = {
                "description": endpoint.summary,
                "content": {"application/json": {"schema": schemas.reference(endpoint.response, "serialization")}},
            }
        for status in sorted({401, 403, *endpoint.errors}):
            responses[str(status)] = {"description": PROBLEM_STATUSES[status], "content": problem}
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": endpoint.handler.__name__,
            "tags": [endpoint.tag],
            "description": (endpoint.description + "\n\n" if endpoint.description else "")
            + "Roles: "
            + ", ".join(sorted(endpoint.roles))
            + ".",
            "parameters": _parameters(endpoint, schemas),
            "responses": responses,
            "security": [{"bearerAuth": []}],
        }
        if endpoint.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.reference(endpoint.body, "validation")}},
            }
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "healthgate",
            "version": version,
            "description": "Hosts, health checks, results, gate jobs, group policies, notification channels and "
            "audit of healthgate.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
