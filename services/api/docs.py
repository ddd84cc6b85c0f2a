"""`/docs`: the interactive API reference (Swagger UI) over `/openapi.json` (CONTRACT §3).

Swagger UI's files come from the installed `swagger-ui-bundle-v2` package, never from a CDN: the reference
works offline and behind a firewall, and its version is pinned with the rest of the dependencies. The page
runs under the dashboard's Content-Security-Policy (scripts and styles from this origin only), so the small
script that starts Swagger UI is served as a file of its own rather than inline.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)
# Only what the page uses. The bundle also ships a demo index.html that loads the Petstore from the internet:
# it is not served.
ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")
ASSET_CACHE_SECONDS = 86400

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>healthgate API reference</title>
  <link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
  <script src="{DOCS_PATH}/init.js"></script>
</body>
</html>
"""

# Starts Swagger UI on /openapi.json. "Try it out" sends requests to this same API; the token entered under
# "Authorize" stays in the page's memory (persistAuthorization off).
INIT_SCRIPT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    persistAuthorization: false
  });
});
"""


def _secured(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    return response


async def docs_page(request: Request) -> Response:
    return _secured(HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"}))


async def init_script(request: Request) -> Response:
    return _secured(Response(INIT_SCRIPT, media_type="text/javascript", headers={"Cache-Control": "no-cache"}))


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        raise HTTPException(404, f"no asset {name!r}")
    path = Path(str(swagger_ui_path)) / name
    response = FileResponse(path, headers={"Cache-Control": f"public, max-age={ASSET_CACHE_SECONDS}"})
    return _secured(response)


def docs_routes() -> list[Route]:
    """The routes of the API reference: the page, its start script and Swagger UI's files."""
    return [
        Route(DOCS_PATH, docs_page, methods=["GET", "HEAD"]),
        Route(f"{DOCS_PATH}/init.js", init_script, methods=["GET", "HEAD"]),
        Route(ASSETS_PATH + "/{name}", asset, methods=["GET", "HEAD"]),
    ]
