"""The debit endpoint without the framework: the hot path of centime.

`POST /v1/wallets/{id}/debits` is answered here, in front of Litestar, by
plain ASGI: the same checks in the same order, the same service call, the
same bodies, statuses, headers and problem+json errors as the Litestar
handler in wallet/api.py, which still documents it in OpenAPI and serves it
when CENTIME_FAST_DEBITS=false. tests/e2e/test_fast_debits.py sends the same
requests to both and compares the answers byte for byte. Both sit inside
centime.access, which gives each request its id, count and access line.

Why: on a debit, Litestar's routing, guard, signature model and response
machinery cost more CPU than charging Redis and writing the ledger together
(docs/performance.md has the profile). Everything else stays on Litestar."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.types import Receive, Scope, Send

from centime.auth import authorize
from centime.errors import CentimeError, InvalidRequest
from centime.wire import REQUEST_BODY_BYTES_MAX, check_query, decode_body, problem_answer
from wallet.schemas import IDEMPOTENCY_KEY_CHARS_MAX, CreateDebit
from wallet.service import parse_wallet_id

PREFIX = "/v1/wallets/"
SUFFIX = "/debits"
ROUTE = "/v1/wallets/{wallet_id}/debits"
"""The route's template, as Litestar's OpenAPI and centime.access name it."""
IDEMPOTENCY_HEADER = "Idempotency-Key"
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
            # The order of Litestar's checks: the body's size, then the header, then the body.
            body = await read_body(receive, announced)
            if idempotency_key is None:
                raise InvalidRequest(
                    f"Missing required header parameter {IDEMPOTENCY_HEADER!r} for path {scope['path']}",
                    fields=[IDEMPOTENCY_HEADER],
                )
            if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_CHARS_MAX:
                bound = ">= 1" if not idempotency_key else f"<= {IDEMPOTENCY_KEY_CHARS_MAX}"
                raise InvalidRequest(
                    f"{IDEMPOTENCY_HEADER}: Expected `str` of length {bound}", fields=[IDEMPOTENCY_HEADER]
                )
            data = decode_body(body, CreateDebit)
            entry, replayed = await state.wallets.post_entry(
                parse_wallet_id(wallet_raw),
                kind="debit",
                amount_micros=data.amount_micros,
                idempotency_key=idempotency_key,
                description=data.description,
                metadata=data.metadata,
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
