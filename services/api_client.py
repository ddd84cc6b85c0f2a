"""A small typed client of healthgate's HTTP API (CONTRACT §3), for the operator commands and `apply`/`export`.

`ApiClient.from_env()` reads `HEALTHGATE_URL` (default http://127.0.0.1:8080) and `HEALTHGATE_TOKEN` (CONTRACT §1).
Every call returns the answer's parsed JSON (None for 204); an answer that is an error raises `ApiError` with the
status and the RFC 9457 problem's `detail`; an API that cannot be reached raises `ApiUnreachable`. Both derive from
`ApiClientError`, whose `str()` is one line an operator reads, never holding the token.

Paths are given as `/api/v1/...` strings; `api_path("jobs", job_id, "halt")` builds one with every segment
percent-encoded (a job id may hold `/`, CONTRACT §3).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
URL_VARIABLE = "HEALTHGATE_URL"
TOKEN_VARIABLE = "HEALTHGATE_TOKEN"
# A check's /test waits for a poller up to its timeout (≤ 60 s) + 5 s (CONTRACT §3): reads may take that long.
READ_TIMEOUT_SECONDS = 90.0
CONNECT_TIMEOUT_SECONDS = 10.0
# The API's largest page (CONTRACT §3: limit 1-500): fewest round trips when every item is wanted.
MAX_PAGE = 500

Params = Mapping[str, str | int | float | bool | None]


class ApiClientError(Exception):
    """A call did not give an answer the caller can use; `str()` is one readable line."""


class ApiError(ApiClientError):
    """The API answered with an error status.

    `status`: the HTTP status; `detail`: the problem's `detail` (or the status's reason when the answer was not
    a problem document); `problem`: the whole problem document (`{}` when there was none), including `errors`
    (`[{"field", "message"}]`) for a 422."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any]) -> None:
        self.status = status
        self.detail = detail
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        """The error as one line: the detail, and each field's problem for a 422."""
        text = self.detail
        errors = self.problem.get("errors")
        if isinstance(errors, list) and errors:
            described = "; ".join(
                f"{error.get('field', '?')}: {error.get('message', '')}" for error in errors if isinstance(error, dict)
            )
            text = f"{text} ({described})"
        return " ".join(f"{text} [HTTP {self.status}]".split())


class ApiUnreachable(ApiClientError):
    """No answer from the API (refused, timed out, bad URL): the message names the URL and the cause."""


def usable_base_url(url: str) -> str:
    """`url` (HEALTHGATE_URL) without a trailing `/`, when it can be the API's base URL: http or https, a host,
    no credentials (the API takes `HEALTHGATE_TOKEN`; a `user:password@` would be sent as Basic auth instead of
    the token, and named in every error message), no query or fragment. Raises ApiUnreachable otherwise, with a
    message that never holds the URL's password."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        shown = url if "@" not in url else "<a URL with credentials>"
        raise ApiUnreachable(f"{URL_VARIABLE}={shown!r} is not a usable URL: {exc}") from None
    if parsed.userinfo:
        raise ApiUnreachable(
            f"{URL_VARIABLE} must not hold credentials (user:password@): the API takes the token in {TOKEN_VARIABLE}"
        )
    if parsed.query or parsed.fragment:  # not shown: a query may hold a key
        raise ApiUnreachable(f"{URL_VARIABLE} must not have a query string or fragment: give the API's base URL")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ApiUnreachable(
            f"{URL_VARIABLE}={url!r} is not a usable URL: give http(s)://HOST[:PORT][/PREFIX], as {DEFAULT_URL}"
        )
    return url.rstrip("/")


def usable_token(token: str | None) -> str | None:
    """HEALTHGATE_TOKEN as it goes in the Authorization header: without the whitespace around it (a token read
    from a file keeps its newline), None when empty. A token holding anything but printable ASCII is no token
    (the API issues `hg_` and URL-safe base64), and would make an illegal header, whose error shows the token:
    ApiUnreachable then, with a message that never holds it."""
    if token is None or not token.strip():
        return None
    token = token.strip()
    if any(not "!" <= character <= "~" for character in token):
        raise ApiUnreachable(
            f"{TOKEN_VARIABLE} is not an API token: it holds a space, a control character or a character beyond "
            "ASCII (a token is printable ASCII, as `healthgate token create` prints it)"
        )
    return token


def not_the_api(status: int, base_url: str, what: str) -> ApiError:
    """The error for an answer no healthgate API gives (`what`: "is not JSON", ...): HEALTHGATE_URL names
    another server."""
    return ApiError(status, f"the answer of {base_url} {what}: is {URL_VARIABLE} the healthgate API's address?", {})


def page_items(page: Any, base_url: str) -> list[dict[str, Any]]:
    """The `items` of a list's answer (`{"items": [...], "next_cursor"}`); ApiError when it has no such shape."""
    items = page.get("items") if isinstance(page, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise not_the_api(200, base_url, "is not a page of items")
    return items


def redirect_error(status: int, location: str | None, base_url: str) -> ApiError:
    """The error for a 3xx answer: the API never redirects its own paths, so HEALTHGATE_URL names something else
    (a proxy that sends http to https, a path prefix that is not the API's). Following it would send the token
    wherever it points."""
    where = f" to {location}" if location and "@" not in location else ""
    return ApiError(
        status,
        f"{base_url} answered with a redirect{where}: set {URL_VARIABLE} to the API's own address",
        {},
    )


def api_path(*segments: str) -> str:
    """`/api/v1/<segment>/<segment>...` with each segment percent-encoded (`/` included, as `%2F`; a segment
    `.` or `..` as `%2E`, `%2E%2E`, which URL normalisation would otherwise resolve away: `jobs get ..`)."""
    return "/api/v1/" + "/".join(_segment(str(segment)) for segment in segments)


def _segment(text: str) -> str:
    return "%2E" * len(text) if text in (".", "..") else quote(text, safe="")


def _without_none(params: Params | None) -> dict[str, str | int | float | bool]:
    return {key: value for key, value in (params or {}).items() if value is not None}


class ApiClient:
    """A synchronous client of one healthgate API; use as a context manager (or call `close()`).

    `base_url`: the API's root (`http://host:port`, or with a path prefix); `token`: the bearer token, or None to
    call without one (the API then answers 401 except on public paths)."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = READ_TIMEOUT_SECONDS):
        self.base_url = usable_base_url(base_url)
        token = usable_token(token)
        headers = {"Accept": "application/json", "User-Agent": "healthgate-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._has_token = bool(token)
        try:
            self._http = httpx.Client(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS),
            )
        except (httpx.InvalidURL, ValueError) as exc:
            raise ApiUnreachable(f"{URL_VARIABLE}={self.base_url!r} is not a usable URL: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiClient:
        """A client for `HEALTHGATE_URL` (default http://127.0.0.1:8080) with `HEALTHGATE_TOKEN`."""
        env = os.environ if environ is None else environ
        return cls(env.get(URL_VARIABLE) or DEFAULT_URL, env.get(TOKEN_VARIABLE) or None)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, params: Params | None = None, json: Any = None) -> Any:
        """One call: the answer's JSON (None when it has no body). Raises ApiError for a 4xx/5xx answer and
        ApiUnreachable when there is no answer."""
        try:
            response = self._http.request(method, path, params=_without_none(params), json=json)
        except UNREACHABLE as exc:
            raise unreachable(exc, self.base_url) from None
        return answer_of(response, has_token=self._has_token, base_url=self.base_url)

    def get(self, path: str, params: Params | None = None) -> Any:
        """GET `path` (with query `params`; None values are left out) → parsed JSON."""
        return self.request("GET", path, params=params)

    def get_page(self, path: str, params: Params | None = None) -> dict[str, Any]:
        """GET a list's page (`{"items": [...], "next_cursor"}`); ApiError when the answer has another shape."""
        page = self.get(path, params)
        page_items(page, self.base_url)
        return dict(page)

    def post(self, path: str, body: Any = None) -> Any:
        """POST `body` as JSON → parsed JSON."""
        return self.request("POST", path, json=body)

    def put(self, path: str, body: Any) -> Any:
        """PUT `body` as JSON → parsed JSON."""
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        """DELETE `path` → None (204) or the answer's JSON."""
        return self.request("DELETE", path)

    def pages(self, path: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paged list (`{"items", "next_cursor"}`), following the cursor; `params` are sent
        with every page (the API wants the filters again with a cursor), `limit` defaults to 500."""
        query = {"limit": MAX_PAGE, **_without_none(params)}
        while True:
            page = self.get_page(path, query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query["cursor"] = cursor


# What httpx raises when there is no answer: the server is not reached, or the URL cannot be used.
UNREACHABLE = (httpx.TransportError, httpx.InvalidURL, httpx.UnsupportedProtocol)


def unreachable(exc: Exception, base_url: str) -> ApiUnreachable:
    """The one-line error for a call that got no answer (`exc`: one of UNREACHABLE). `base_url` passed
    `usable_base_url`: it holds no credentials or query to hide."""
    if isinstance(exc, httpx.TimeoutException):
        return ApiUnreachable(f"no answer from the healthgate API at {base_url} in time: {str(exc) or 'timed out'}")
    return ApiUnreachable(f"cannot reach the healthgate API at {base_url}: {exc}")


def answer_of(response: httpx.Response, *, has_token: bool, base_url: str) -> Any:
    """An answer's JSON (None when it has no body). Raises ApiError for a 4xx/5xx answer (its problem's `detail`),
    a redirect (`redirect_error`) or an answer that is not JSON (`not_the_api`)."""
    if response.is_error:
        problem: dict[str, Any] = {}
        try:
            document = response.json()
            if isinstance(document, dict):
                problem = document
        except ValueError:
            pass
        detail = problem.get("detail") or problem.get("title") or response.reason_phrase or "error"
        if response.status_code == 401 and not has_token:
            detail = f"{detail} (set {TOKEN_VARIABLE} to an API token)"
        raise ApiError(response.status_code, str(detail), problem)
    if response.is_redirect:
        raise redirect_error(response.status_code, response.headers.get("location"), base_url)
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise not_the_api(response.status_code, base_url, "is not JSON") from None
