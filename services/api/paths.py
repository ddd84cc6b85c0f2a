"""Paths matched segment by segment on the raw path, so that an id may hold any character, `/` included.

uvicorn percent-decodes the request path into `scope["path"]` before routing, so Starlette's routes
cannot tell `/api/v1/jobs/deploy%2F2026%2F42` from `/api/v1/jobs/deploy/2026/42`, and a job id such as
`x/hosts/<uuid>/override` would even reach the override endpoint. `SegmentRoute` matches on
`scope["raw_path"]` instead (the ASGI spec keeps the bytes as sent there): it splits the path on `/`
first and percent-decodes each segment once, as UTF-8. A `{name}` stands for exactly one whole,
non-empty segment, so `%2F` inside an id is part of the id and can never be mistaken for a separator.
`path_segment` is the inverse, for links and form actions.

Rules (CONTRACT §3, "A `job_id` in a path is percent-encoded: every job id works"):
- A segment whose percent-decoded bytes are not UTF-8 (`%FF`) matches nothing (→ 404): no id holds such text.
  The one exception is a lone surrogate encoded as if it were a character (`%ED%A0%80` for U+D800, "surrogatepass"):
  JSON can carry one (`"\ud800"`), so a job.start's job_id can hold one, and its path must reach it as every other
  job id's does. No other parameter can hold one (a UUID cannot), and none is ever sent to the database as text.
- A literal segment also matches when sent percent-encoded (`%6Aobs` is `jobs`, RFC 3986 §6.2.2.2).
- When something rewrote `scope["path"]` after the server (Starlette's trailing-slash redirect tries the
  path with and without a final `/`), the raw path no longer describes the request; the route then falls
  back to the decoded path, as Starlette's own routes do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

from starlette.routing import Match, Route
from starlette.types import Scope

PARAMETER = re.compile(r"{(\w+)(?::str)?}")
_CACHE_KEY = "healthgate.path_segments"


def path_segment(value: str) -> str:
    """One path segment, percent-encoded so that any text (`/`, `?`, `#`, `%`, spaces, non-ASCII, NUL and other
    control characters, a lone surrogate) round-trips through `SegmentRoute`. `.` and `..` are encoded too: a
    browser or client would resolve them as dot-segments."""
    encoded = quote(value, safe="", errors="surrogatepass")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


# RFC 9110 §4.1: senders and recipients should support URIs of at least 8000 octets; a longer one may be refused
# by a proxy or server on the way (nginx's default buffers hold 8 KiB request lines).
MAX_LINKED_SEGMENT = 8000


def browser_reachable(value: str) -> bool:
    """Whether a browser keeps `path_segment(value)` in a URL. The WHATWG URL Standard, unlike RFC 3986, reads
    `%2E` as `.` in dot-segments, so `/jobs/%2E%2E` becomes `/` in any browser: ids `.` and `..` work in the
    API's paths (curl, httpx, any RFC 3986 client), and the dashboard gives them an address in the query
    instead (`/jobs?job_id=..`, services/api/dashboard/views.py `job_url`)."""
    return value not in (".", "..")


def linkable(value: str) -> bool:
    """Whether a dashboard page may link to this job id: its address stays under MAX_LINKED_SEGMENT characters
    (the gate answers a job_id of any length: a 2 MB one is shown, not linked)."""
    if len(value) > MAX_LINKED_SEGMENT:  # length first: quoting 2 MB takes a while
        return False
    return len(path_segment(value)) <= MAX_LINKED_SEGMENT


def request_segments(scope: Scope) -> tuple[str, ...] | None:
    """The request path's segments (after `root_path`), each percent-decoded once; None when one of them is
    not UTF-8 (a lone surrogate's three bytes aside, see above). `/a/b%2Fc` → `("a", "b/c")`; `/` → `("",)`.
    Cached on the scope: every route asks."""
    raw_path: bytes | None = scope.get("raw_path")
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    cached = scope.get(_CACHE_KEY)
    if cached is not None and cached[0] == (raw_path, path, root_path):
        cached_segments: tuple[str, ...] | None = cached[1]  # stored below
        return cached_segments
    segments = _split(raw_path, path, root_path)
    scope[_CACHE_KEY] = ((raw_path, path, root_path), segments)
    return segments


def _split(raw_path: bytes | None, path: str, root_path: str) -> tuple[str, ...] | None:
    raw = raw_path.decode("latin-1") if raw_path is not None else None
    # Trust the raw path only while it still decodes to the path the server made of it (uvicorn: root_path +
    # unquote(raw)); otherwise someone rewrote the path and the decoded one is all there is.
    if raw is None or unquote(raw, errors="replace") != path:
        route_path = _without_root(path, root_path)
        return tuple(route_path.split("/")[1:]) if route_path.startswith("/") else None
    raw = _without_root(raw, root_path)
    if not raw.startswith("/"):
        return None
    try:
        return tuple(unquote_to_bytes(segment).decode("utf-8", "surrogatepass") for segment in raw.split("/")[1:])
    except UnicodeDecodeError:
        return None


def _without_root(path: str, root_path: str) -> str:
    """The path below the app's mount point (uvicorn puts `root_path` in front of both paths)."""
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path) :] or "/"
    return path


class SegmentRoute(Route):
    """A Starlette route whose `{name}` parameters are whole path segments, matched on the raw path.

    Only plain `{name}` (str) parameters are allowed, each a whole segment: `/jobs/{job_id}/hosts/{host_id}`.
    `request.path_params[name]` is the segment percent-decoded once. Everything else (methods, 405 for a
    path that matches with another method, `url_path_for`) is Starlette's.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **options)
        self.template: tuple[tuple[bool, str], ...] = tuple(_template_segment(part) for part in path.split("/")[1:])

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        segments = request_segments(scope)
        if segments is None or len(segments) != len(self.template):
            return Match.NONE, {}
        matched: dict[str, str] = {}
        for (is_parameter, text), segment in zip(self.template, segments, strict=True):
            if is_parameter:
                if not segment:
                    return Match.NONE, {}
                matched[text] = segment
            elif segment != text:
                return Match.NONE, {}
        child_scope = {"endpoint": self.endpoint, "path_params": dict(scope.get("path_params", {})) | matched}
        if self.methods and scope["method"] not in self.methods:
            return Match.PARTIAL, child_scope
        return Match.FULL, child_scope


def _template_segment(part: str) -> tuple[bool, str]:
    """(True, name) for a `{name}` segment, (False, text) for a literal one."""
    parameter = PARAMETER.fullmatch(part)
    if parameter is not None:
        return True, parameter.group(1)
    if "{" in part or "}" in part:
        raise ValueError(f"a path parameter must be a whole segment of type str: {part!r}")
    return False, part
