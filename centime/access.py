"""What every HTTP request gets, on the fast debit path and on Litestar's
routes alike: an id, a count in /metrics and a line in the access log.

The id is the client's `X-Request-Id` when it is 1..64 characters of
[A-Za-z0-9._-], else one made here; it is in centime.logs.request_id_var
while the request runs (so every log line of the request carries it), it is
echoed as `X-Request-Id` on the answer, and a 5xx problem names it.

The route is the template the request matched, as OpenAPI spells it
(`/v1/wallets/{wallet_id}/debits`): Litestar leaves it in
scope["path_template"], the fast debit path sets it itself. A request that
matched no route is `unmatched`, a method outside HTTP's usual ones `OTHER`,
so the label sets stay as small as the route table."""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from centime import metrics
from centime.logs import AccessLog, request_id_var

REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
NO_ANSWER_STATUS = 500
"""What the server answers when the app raised before answering."""


def observed(app: ASGIApp, access_log: AccessLog | None) -> ASGIApp:
    """`app`, each HTTP request given an id, counted and logged once answered.

    Made ids are `<12 random hex digits of this process>-<a counter in hex>`:
    unique enough to find a request in the logs, and cheaper than a uuid
    (0.4 us against 3.5 us for uuid4().hex, measured on a loaded machine)."""
    process_tag = os.urandom(6).hex()
    serial = itertools.count(1)
    counters: dict[tuple[str, str, int], Any] = {}

    def count(method: str, route: str, status: int) -> None:
        counter = counters.get((method, route, status))
        if counter is None:
            counter = counters[method, route, status] = metrics.requests_total.labels(
                method, route, str(status)
            )
        counter.inc()

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id: str | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if _CLIENT_REQUEST_ID.fullmatch(value):
                    request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = f"{process_tag}-{next(serial):x}"
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = NO_ANSWER_STATUS

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await app(scope, receive, observed_send)
        finally:
            request_id_var.reset(token)
            method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
            route = scope.get("path_template") or UNMATCHED_ROUTE
            count(method, route, status)
            if access_log is not None:
                access_log.write(method, route, status, (time.perf_counter() - started) * 1000, request_id)

    return asgi
