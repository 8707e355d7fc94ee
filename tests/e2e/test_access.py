"""Every answer, on the fast debit path and on Litestar's routes, carries a
request id (the client's when it is safe, else a made one); every request
writes one access line with its method, route template, status, duration
and id and none of its headers; /metrics counts requests by route template,
with one label for every path that matched no route."""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Keys, Server, auth, new_wallet, start_server, stop_server

from centime.logs import ACCESS_LOG_FLUSH_S
from centime.settings import Settings

MADE_REQUEST_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")
DEBIT_ROUTE = "/v1/wallets/{wallet_id}/debits"
WALLET_ROUTE = "/v1/wallets/{wallet_id}"
LOG_WAIT_S = 5


@pytest.fixture(scope="module")
def logged_server(settings: Settings) -> Iterator[tuple[Server, Path]]:
    """centime with JSON logs, written to a file the test reads."""
    with tempfile.TemporaryDirectory(prefix="centime-access-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            running = start_server(settings, log=log, CENTIME_LOG_FORMAT="json")
            try:
                yield running, log_path
            finally:
                stop_server(running)


@pytest.fixture
async def http(logged_server: tuple[Server, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=logged_server[0].base_url, timeout=30) as client:
        yield client


def access_lines(log_path: Path, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The access lines of these requests, waiting for the buffer's flush."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = {}
        for line in log_path.read_text().splitlines():
            record = json.loads(line)  # every line is JSON, uvicorn's own too
            if record["logger"] == "centime.access" and record["request_id"] in request_ids:
                found[record["request_id"]] = record
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(ACCESS_LOG_FLUSH_S)


async def test_a_safe_client_id_is_echoed_any_other_is_replaced(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz", headers={"X-Request-Id": "lb-7.a_B"})).headers[
        "x-request-id"
    ] == "lb-7.a_B"
    made = []
    for unsafe in ["two words", "x" * 65, "", "id\u00e9".encode(), 'a"b', None]:
        headers: dict[str, Any] = {} if unsafe is None else {"X-Request-Id": unsafe}
        answer = await http.get("/healthz", headers=headers)
        assert MADE_REQUEST_ID.fullmatch(answer.headers["x-request-id"]), (unsafe, answer.headers)
        made.append(answer.headers["x-request-id"])
    assert len(set(made)) == len(made)


async def test_each_request_writes_one_access_line_without_headers(
    http: httpx.AsyncClient, logged_server: tuple[Server, Path], keys: Keys
) -> None:
    wallet_id = await new_wallet(http, keys, funded_micros=1_000)
    tag = secrets.token_hex(4)
    sent = {
        f"debit-{tag}": ("POST", f"/v1/wallets/{wallet_id}/debits", auth(keys.debit, tag), DEBIT_ROUTE, 201),
        f"broke-{tag}": (
            "POST",
            f"/v1/wallets/{wallet_id}/debits",
            auth(keys.debit, "b" + tag),
            DEBIT_ROUTE,
            402,
        ),
        f"read-{tag}": ("GET", f"/v1/wallets/{wallet_id}", auth(keys.read), WALLET_ROUTE, 200),
        f"nowhere-{tag}": ("GET", f"/nowhere/{tag}", auth(keys.read), "unmatched", 404),
        f"head-{tag}": ("HEAD", "/readyz", {}, "/readyz", 200),
    }
    for request_id, (method, path, headers, _, status) in sent.items():
        body = (
            {"amount_micros": 10 if request_id.startswith("debit") else 10_000} if method == "POST" else None
        )
        answer = await http.request(method, path, headers={**headers, "X-Request-Id": request_id}, json=body)
        assert (answer.status_code, answer.headers["x-request-id"]) == (status, request_id), answer.text
    lines = access_lines(logged_server[1], set(sent))
    assert set(lines) == set(sent)
    for request_id, (method, _, _, route, status) in sent.items():
        line = lines[request_id]
        assert (line["method"], line["route"], line["status"]) == (method, route, status), line
        assert line["level"] == "INFO" and 0 < line["duration_ms"] < 10_000, line
        assert set(line) == {
            "time",
            "level",
            "logger",
            "method",
            "route",
            "status",
            "duration_ms",
            "request_id",
        }
    written = logged_server[1].read_text()
    assert keys.debit not in written and keys.read not in written
    assert wallet_id not in written  # routes are templates, not paths


def requests_total(metrics_text: str, **labels: str) -> float:
    wanted = ",".join(f'{name}="{value}"' for name, value in labels.items())
    for line in metrics_text.splitlines():
        if line.startswith(f"centime_requests_total{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_by_route_and_unmatched_paths_share_one_label(http: httpx.AsyncClient) -> None:
    before = (await http.get("/metrics")).text
    tags = [secrets.token_hex(6) for _ in range(3)]
    for tag in tags:
        assert (await http.get(f"/no/such/{tag}")).status_code == 404
    assert (await http.head("/healthz")).status_code == 200
    after = (await http.get("/metrics")).text
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert requests_total(after, **unmatched) == requests_total(before, **unmatched) + len(tags)
    head = {"method": "HEAD", "route": "/healthz", "status": "200"}
    assert requests_total(after, **head) == requests_total(before, **head) + 1
    assert not any(tag in after for tag in tags)
