"""The API reference page at /schema, whole without the network: RapiDoc,
pinned, served from the package (centime/static/README.md says which file,
its sha256 and its license), and a page that names no other host."""

from __future__ import annotations

import functools
import gzip
from importlib.resources import files
from typing import Any

from litestar import Request, Response, get
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.router import Router

RAPIDOC_VERSION = "9.3.8"
RAPIDOC_FILE = f"rapidoc-{RAPIDOC_VERSION}.min.js"
JAVASCRIPT = "text/javascript"
"""Litestar adds `; charset=utf-8` to text/ types."""
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
"""A year: the file's name carries its version, a new version is a new name."""
SYSTEM_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
MONO_FONT = "ui-monospace, Menlo, Consolas, monospace"
"""Fonts the browser has: RapiDoc's default (Open Sans) comes from Google's font CDN."""


@functools.cache
def rapidoc_gzip() -> bytes:
    return files("centime").joinpath("static", RAPIDOC_FILE + ".gz").read_bytes()


@functools.cache
def rapidoc_plain() -> bytes:
    return gzip.decompress(rapidoc_gzip())


def _accepts_gzip(request: Request[Any, Any, Any]) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "")


@get(f"/assets/{RAPIDOC_FILE}", include_in_schema=False, sync_to_thread=False)
def rapidoc_asset(request: Request[Any, Any, Any]) -> Response[bytes]:
    """RapiDoc's bundle, gzipped as published when the client takes gzip."""
    headers = {"Cache-Control": ASSET_CACHE_CONTROL, "Vary": "Accept-Encoding"}
    if _accepts_gzip(request):
        return Response(
            rapidoc_gzip(), media_type=JAVASCRIPT, headers={**headers, "Content-Encoding": "gzip"}
        )
    return Response(rapidoc_plain(), media_type=JAVASCRIPT, headers=headers)


class ApiReference(OpenAPIRenderPlugin):
    """The OpenAPI document rendered by the vendored RapiDoc."""

    def __init__(self) -> None:
        super().__init__(path="/rapidoc", favicon="")
        self._asset_url = ""

    def receive_router(self, router: Router) -> None:
        router.register(rapidoc_asset)
        self._asset_url = f"{router.path.rstrip('/')}/assets/{RAPIDOC_FILE}"

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = openapi_schema["info"]["title"]
        return f"""<!DOCTYPE html>
<html>
  <head>
    <title>{title} API reference</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <script type="module" src="{self._asset_url}"></script>
    {self.style}
  </head>
  <body>
    <rapi-doc spec-url="{self.get_openapi_json_route(request)}" render-style="read" show-header="false"
      regular-font="{SYSTEM_FONT}" mono-font="{MONO_FONT}"></rapi-doc>
  </body>
</html>
""".encode()
