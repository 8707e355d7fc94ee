"""The app `make bench` serves: centime's own app, unchanged, plus two routes
that exist only for the comparison, served by the same process, server,
framework, middleware, guard and Postgres pool:

- POST /bench/floor: a trivial POST with no I/O (the framework floor);
- POST /bench/naive/wallets/{id}/debits: the naive peer, a debit done only in
  Postgres: one statement takes the balance from a row if it covers the
  amount and writes the entry and its lines (bench/sql/queries.sql).

    centime serve --app bench.server:create_bench_app"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from litestar import Response, post
from litestar.datastructures import State
from litestar.types import ASGIApp

from centime.app import create_app, served
from centime.settings import load_settings
from centime.sql import load_queries
from centime.wire import decode_body
from ledger.ids import uuid7
from wallet.api import IdempotencyKey
from wallet.charges import request_hash
from wallet.errors import InsufficientFunds
from wallet.schemas import CreateDebit
from wallet.service import parse_wallet_id

Q = load_queries("bench")
FLOOR_BODY = b'{"ok":true}'


@post("/bench/floor", include_in_schema=False, status_code=201)
async def floor(body: bytes) -> Response[bytes]:
    return Response(FLOOR_BODY, status_code=201, media_type="application/json")


@post("/bench/naive/wallets/{wallet_id:str}/debits", opt={"scope": "debit"}, include_in_schema=False)
async def naive_debit(
    wallet_id: str, body: bytes, state: State, idempotency_key: IdempotencyKey
) -> Response[dict[str, object]]:
    data = decode_body(body, CreateDebit)
    wallet = parse_wallet_id(wallet_id)
    entry_id = uuid7()
    created_at = datetime.now(UTC)
    async with state.pool.acquire(timeout=state.timeout_s) as conn:
        row = await conn.fetchrow(
            Q["naive_debit"],
            wallet,
            data.amount_micros,
            entry_id,
            idempotency_key,
            request_hash("debit", data.amount_micros, data.description, data.metadata),
            data.description,
            msgspec.json.encode(data.metadata).decode(),
            created_at,
        )
    if row is None:
        raise InsufficientFunds(f"wallet {wallet} cannot cover {data.amount_micros} micros", balance_micros=0)
    return Response(
        {
            "id": str(entry_id),
            "wallet_id": str(wallet),
            "kind": "debit",
            "amount_micros": data.amount_micros,
            "currency": row["currency"],
            "balance_micros": row["balance_micros"],
            "idempotency_key": idempotency_key,
            "created_at": created_at.isoformat(),
        },
        status_code=201,
    )


def create_bench_app() -> ASGIApp:
    settings = load_settings()
    app = create_app(settings)
    app.register(floor)
    app.register(naive_debit)
    return served(app, settings)
