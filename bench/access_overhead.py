"""What centime.access costs a request, without a server: the wrapper around
an app that answers at once, with the access log off, in text and in JSON,
against the count-only middleware it replaced; and one access line against
one `logging` call for the same line. Best of REPEATS, in us.

    uv run python -m bench.access_overhead"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import timeit
from typing import Any

from centime import metrics
from centime.access import observed
from centime.logs import AccessLog

REQUESTS = 50_000
REPEATS = 5
ROUTE = "/v1/wallets/{wallet_id}/debits"
HEADERS = [
    (b"host", b"127.0.0.1"),
    (b"authorization", b"Bearer ck_x"),
    (b"idempotency-key", b"k"),
    (b"content-type", b"application/json"),
    (b"content-length", b"20"),
    (b"user-agent", b"wrk"),
]


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    scope["path_template"] = ROUTE
    await send(
        {"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


async def _sent(message: Any) -> None:
    return None


async def _received() -> Any:
    return {"type": "http.request"}


async def _per_request_us(app: Any) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(REQUESTS):
            scope = {"type": "http", "method": "POST", "path": "/v1/wallets/w/debits", "headers": HEADERS}
            await app(scope, _received, _sent)
        best = min(best, (time.perf_counter() - started) / REQUESTS * 1e6)
    return best


async def main() -> None:
    counter = metrics.requests_total.labels("POST", ROUTE, "201")

    async def counted(scope: Any, receive: Any, send: Any) -> None:  # the middleware before centime.access
        counter.inc()
        await _answer(scope, receive, send)

    apps = {
        "count only (before)": counted,
        "observed, access log off": observed(_answer, None),
        "observed, text access log": observed(_answer, AccessLog(io.StringIO(), json=False)),
        "observed, json access log": observed(_answer, AccessLog(io.StringIO(), json=True)),
    }
    for name, app in apps.items():
        print(f"{name}: {await _per_request_us(app):.2f} us/request")
    line = AccessLog(io.StringIO(), json=False)
    logger = logging.getLogger("bench.access_overhead")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    for name, write in {
        "AccessLog.write": lambda: line.write("POST", ROUTE, 201, 1.2345, "a1b2c3d4e5f6-1f"),
        "logging.info": lambda: logger.info("%s %s %s %.3fms request_id=%s", "POST", ROUTE, 201, 1.2345, "x"),
    }.items():
        best = min(timeit.repeat(write, number=REQUESTS, repeat=REPEATS)) / REQUESTS * 1e6
        print(f"{name}: {best:.2f} us/line")


if __name__ == "__main__":
    asyncio.run(main())
