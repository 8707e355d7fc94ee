"""The debit endpoint without the framework: the hot path of centime.

`POST /v1/wallets/{id}/debits` is answered here, in front of Litestar, by
plain ASGI plumbing only: the headers, the query check, the API key, the
body's size, and the answer. What the request says is read by
wallet.api.read_debit (the Idempotency-Key header, the body), the one reader
the Litestar handler in wallet/api.py calls too; that handler documents the
route in OpenAPI and serves it when CENTIME_FAST_DEBITS=false. Both make the
same checks in the same order and give the same bodies, statuses, headers
and problem+json errors; tests/e2e/test_fast_debits.py sends what each
route does on its own (auth, body size, chunked bodies, query, routing,
owner keys, answers) to both and compares the answers byte for byte. Both
sit inside centime.access, which gives each request its id, count and
access line.

Why: on a debit, Litestar's routing, guard, signature model and response
machinery cost more CPU than charging Redis and writing the ledger together
(docs/performance.md has the profile). Everything else stays on Litestar."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.types import Receive, Scope, Send

from centime.auth import authorize
from centime.errors import CentimeError
from centime.wire import REQUEST_BODY_BYTES_MAX, check_query, problem_answer
from wallet.api import read_debit
from wallet.service import parse_wallet_id

PREFIX = "/v1/wallets/"
SUFFIX = "/debits"
ROUTE = "/v1/wallets/{wallet_id}/debits"
"""The route's template, as Litestar's OpenAPI and centime.access name it."""
_JSON = [(b"content-type", b"application/json")]
_PROBLEM_JSON = [(b"content-type", b"application/problem+json"), (b"x-content-type-options", b"nosniff")]
_REPLAYED = (b"idempotent-replayed", b"true")
TOO_LARGE_DETAIL = "Request Entity Too Large"
_encoder = msgspec.json.Encoder()


class _TooLarge(CentimeError):
    """Litestar's 413, as its handler renders it."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"


def fast_debits(app: Litestar) -> Any:
    """An ASGI app: debits answered here, everything else by `app`."""

    async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def send_problem(send: Send, exc: Exception) -> None:
        answer = problem_answer(exc)
        headers = list(_PROBLEM_JSON)
        headers += [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
        await send_response(send, answer.status, _encoder.encode(answer.body), headers)

    async def read_body(receive: Receive, announced: int | None) -> bytes:
        if announced is not None and announced > REQUEST_BODY_BYTES_MAX:
            raise _TooLarge(TOO_LARGE_DETAIL)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > REQUEST_BODY_BYTES_MAX:
                    raise _TooLarge(TOO_LARGE_DETAIL)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def debit(scope: Scope, receive: Receive, send: Send, wallet_raw: str) -> None:
        # The first of each header counts, as in Litestar.
        authorization: str | None = None
        idempotency_key: str | None = None
        announced: int | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"idempotency-key":
                if idempotency_key is None:
                    idempotency_key = value.decode("latin-1")
            elif name == b"content-length" and announced is None and value.isdigit():
                announced = int(value)
        try:
            state = app.state
            if scope.get("query_string"):  # as the Litestar app's middleware does, before its guard
                check_query(scope["query_string"])
            key = await authorize(authorization or "", "debit", state.key_store)
            # Litestar's order: the body's size, then what the handler reads.
            debit = read_debit(idempotency_key, await read_body(receive, announced), path=scope["path"])
            entry, replayed = await state.wallets.post_entry(
                parse_wallet_id(wallet_raw),
                kind="debit",
                amount_micros=debit.body.amount_micros,
                idempotency_key=debit.idempotency_key,
                description=debit.body.description,
                metadata=debit.body.metadata,
                owner_ids=key.owner_ids,
            )
        except Exception as exc:
            await send_problem(send, exc)
            return
        headers = list(_JSON)
        if replayed:
            headers.append(_REPLAYED)
        await send_response(send, 201, _encoder.encode(entry), headers)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(PREFIX) and path.endswith(SUFFIX):
                wallet_raw = path[len(PREFIX) : -len(SUFFIX)]
                if wallet_raw and "/" not in wallet_raw:
                    scope["path_template"] = ROUTE
                    await debit(scope, receive, send, wallet_raw)
                    return
        await app(scope, receive, send)

    return asgi
