"""The API reference at /schema works offline: its page names no host but
centime's own, and the renderer it loads is the pinned file vendored in the
package (the sha256 recorded in centime/static/README.md), served as
JavaScript with a long cache, gzipped or not as the client asks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx

from centime.api_reference import RAPIDOC_FILE

README = Path(__file__).resolve().parents[2] / "centime" / "static" / "README.md"
RAPIDOC_SHA256 = "affbd173a65e870e18f392cca963113bcdafb6e50e88cd2f6a834a65b22db94d"
"""rapidoc-min.js of the npm package rapidoc@9.3.8."""
URL = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']*)["']""")


async def test_the_page_names_no_other_host(client: httpx.AsyncClient) -> None:
    for path in ("/schema", "/schema/rapidoc"):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"].startswith("text/html")
        assert "//" not in page.text.replace("<!DOCTYPE html>", ""), (
            page.text
        )  # no http://, https:// or //host
        urls = URL.findall(page.text)
        assert f"/schema/assets/{RAPIDOC_FILE}" in urls and "/schema/openapi.json" in urls, urls
        assert all(url.startswith("/") for url in urls), urls


async def test_the_renderer_is_the_pinned_file_with_a_long_cache(client: httpx.AsyncClient) -> None:
    assert RAPIDOC_SHA256 in README.read_text()
    path = f"/schema/assets/{RAPIDOC_FILE}"
    zipped = await client.get(path, headers={"Accept-Encoding": "gzip"})
    plain = await client.get(path, headers={"Accept-Encoding": "identity"})
    for answer in (zipped, plain):
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "max-age=31536000" in answer.headers["cache-control"]
        assert hashlib.sha256(answer.content).hexdigest() == RAPIDOC_SHA256  # httpx unzips
    assert zipped.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain.headers
    assert int(zipped.headers["content-length"]) < len(plain.content) // 3  # sent as published: 217 of 863 kB
