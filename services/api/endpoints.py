"""An endpoint is declared once: its route, who may call it, and the models of its query, body and
answer. The same declaration builds the Starlette route and the OpenAPI document.

Access is decided in a fixed order: no or unknown token → 401; a host or a group outside the caller's
groups → 404 (its existence is not revealed), and so is, for a role that may not act on it, a job with no host
in the caller's groups; a role that may not do this → 403.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from services.api.auth import Principal, authenticate
from services.api.context import context_of
from services.api.paths import SegmentRoute
from services.api.problems import Problem, forbidden, not_found
from services.api.requests import path_job_id, path_uuid
from shared.database import ROLLED_BACK_BY_CONCURRENCY, TRANSIENT_DATABASE_ERRORS, is_transient_database_error
from shared.events import job_key
from shared.hosts import host_group
from shared.jobs import job_hosts_of_job
from shared.tokens import ROLES, Role

Handler = Callable[[Request, Principal], Awaitable[Response]]
ALL_ROLES: frozenset[Role] = frozenset(ROLES)
# Who may do what (CONTRACT §3); the dashboard checks the same sets.
ADMIN: frozenset[Role] = frozenset({"admin"})
CHECK_EDITORS: frozenset[Role] = frozenset({"admin", "operator"})


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    roles: frozenset[Role]
    tag: str
    query: type[BaseModel] | None = None
    body: Any = None
    response: Any = None
    status_code: int = 200
    errors: tuple[int, ...] = ()
    description: str = ""
    extra_responses: dict[int, str] = field(default_factory=dict)

    def route(self) -> SegmentRoute:
        """Matched segment by segment on the raw path: a `{job_id}` may hold `/` (as `%2F`), see paths.py."""
        return SegmentRoute(self.path, self._guarded, methods=[self.method], name=self.summary)

    async def _guarded(self, request: Request) -> Response:
        context = context_of(request)
        started = time.perf_counter()
        status = 500
        try:
            principal = await authenticate(context.pool, request.headers.get("authorization"))
            if "host_id" in request.path_params:
                await _require_visible_host(request, principal, path_uuid(request, "host_id"))
            if "group" in request.path_params and not principal.sees_group(request.path_params["group"]):
                raise not_found("group")
            if "job_id" in request.path_params and principal.role not in self.roles:
                await _require_visible_job(request, principal)
            if principal.role not in self.roles:
                raise forbidden(f"role {principal.role!r} may not {self.summary.lower()}")
            response = await self.handler(request, principal)
            status = response.status_code
            return response
        except Problem as problem:
            status = problem.status
            raise
        except ROLLED_BACK_BY_CONCURRENCY:
            status = 503  # as the app's handler answers it
            raise
        except TRANSIENT_DATABASE_ERRORS as error:
            status = 503 if is_transient_database_error(error) else 500  # as the app's handler answers it
            raise
        finally:
            context.metrics.requests.labels(self.method, self.path, str(status)).inc()
            context.metrics.latency.labels(self.method, self.path).observe(time.perf_counter() - started)


async def _require_visible_host(request: Request, principal: Principal, host_id: uuid.UUID) -> None:
    """404 unless the host exists and is in the caller's groups. Admins pass: their handlers answer
    404 themselves where a host must exist (jobs may name hosts the gate has never heard of)."""
    if principal.is_admin:
        return
    group = await host_group(context_of(request).pool, host_id)
    if group is None or not principal.sees_group(group):
        raise not_found("host")


async def _require_visible_job(request: Request, principal: Principal) -> None:
    """404 unless the job has a host in the caller's groups, for a caller whose role may not act on it anyway
    (CONTRACT §6: halt and resume answer 404 for a job with no host in the caller's groups, 403 for a non-admin
    who sees it). Those who may act check the job themselves."""
    key = job_key(path_job_id(request))
    if not await job_hosts_of_job(context_of(request).pool, key, principal.visible_groups()):
        raise not_found("job")
