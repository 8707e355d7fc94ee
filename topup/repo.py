"""The only place top-up SQL runs. Every function takes its connection."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from centime.sql import load_queries

Q = load_queries("topup")


class TopUpRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    currency: str
    status: str
    idempotency_key: str | None
    request_hash: str
    payment_intent_id: str | None
    client_secret: str | None
    charge_id: str | None
    credited_micros: int
    fee_micros: int
    refunded_micros: int
    disputed_micros: int
    failure_message: str | None
    created_at: datetime
    updated_at: datetime


class TopUpState(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger holds of a top-up, copied onto its row."""

    status: str
    charge_id: str | None
    credited_micros: int
    fee_micros: int
    refunded_micros: int
    disputed_micros: int
    failure_message: str | None


_FIELDS = tuple(msgspec.structs.fields(TopUpRow))


def _row(record: asyncpg.Record | None) -> TopUpRow | None:
    if record is None:
        return None
    return TopUpRow(**{f.name: record[f.name] for f in _FIELDS})


async def insert_topup(
    conn: asyncpg.Connection,
    topup_id: uuid.UUID,
    wallet_id: uuid.UUID,
    amount_micros: int,
    currency: str,
    idempotency_key: str | None,
    request_hash: str,
) -> TopUpRow | None:
    record = await conn.fetchrow(
        Q["insert_topup"], topup_id, wallet_id, amount_micros, currency, idempotency_key, request_hash
    )
    return _row(record)


async def topup_by_wallet_key(
    conn: asyncpg.Connection, wallet_id: uuid.UUID, idempotency_key: str
) -> TopUpRow | None:
    return _row(await conn.fetchrow(Q["topup_by_wallet_key"], wallet_id, idempotency_key))


async def topup_by_id(
    conn: asyncpg.Connection, topup_id: uuid.UUID, *, for_update: bool = False
) -> TopUpRow | None:
    query = Q["topup_by_id_for_update"] if for_update else Q["topup_by_id"]
    return _row(await conn.fetchrow(query, topup_id))


async def topup_by_payment_intent(conn: asyncpg.Connection, payment_intent_id: str) -> TopUpRow | None:
    return _row(await conn.fetchrow(Q["topup_by_payment_intent"], payment_intent_id))


async def topup_by_charge(conn: asyncpg.Connection, charge_id: str) -> TopUpRow | None:
    return _row(await conn.fetchrow(Q["topup_by_charge"], charge_id))


async def set_payment_intent(
    conn: asyncpg.Connection, topup_id: uuid.UUID, payment_intent_id: str, client_secret: str
) -> TopUpRow:
    row = _row(await conn.fetchrow(Q["set_payment_intent"], topup_id, payment_intent_id, client_secret))
    assert row is not None
    return row


async def set_topup_state(conn: asyncpg.Connection, topup_id: uuid.UUID, state: TopUpState) -> TopUpRow:
    record = await conn.fetchrow(
        Q["set_topup_state"],
        topup_id,
        state.status,
        state.charge_id,
        state.credited_micros,
        state.fee_micros,
        state.refunded_micros,
        state.disputed_micros,
        state.failure_message,
    )
    row = _row(record)
    assert row is not None
    return row


async def topups_page(
    conn: asyncpg.Connection, wallet_id: uuid.UUID, starting_after: uuid.UUID | None, limit: int
) -> list[TopUpRow]:
    records = await conn.fetch(Q["topups_page"], wallet_id, starting_after, limit)
    return [row for row in map(_row, records) if row is not None]


async def customer_of_wallet(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> str | None:
    return await conn.fetchval(Q["customer_of_wallet"], wallet_id)


async def insert_customer(conn: asyncpg.Connection, wallet_id: uuid.UUID, customer_id: str) -> str:
    return await conn.fetchval(Q["insert_customer"], wallet_id, customer_id)


async def event_outcome(conn: asyncpg.Connection, event_id: str) -> str | None:
    return await conn.fetchval(Q["event_seen"], event_id)


async def insert_event(
    conn: asyncpg.Connection, event_id: str, event_type: str, object_id: str | None, outcome: str
) -> bool:
    return await conn.fetchval(Q["insert_event"], event_id, event_type, object_id, outcome) is not None


class DisputeRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    topup_id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    status: str


async def dispute_for_update(conn: asyncpg.Connection, dispute_id: str) -> DisputeRow | None:
    record = await conn.fetchrow(Q["dispute_for_update"], dispute_id)
    if record is None:
        return None
    return DisputeRow(
        id=record["id"],
        topup_id=record["topup_id"],
        wallet_id=record["wallet_id"],
        amount_micros=record["amount_micros"],
        status=record["status"],
    )


async def insert_dispute(
    conn: asyncpg.Connection, dispute_id: str, topup_id: uuid.UUID, wallet_id: uuid.UUID, amount_micros: int
) -> None:
    await conn.execute(Q["insert_dispute"], dispute_id, topup_id, wallet_id, amount_micros)


async def close_dispute(conn: asyncpg.Connection, dispute_id: str, status: str) -> None:
    await conn.execute(Q["close_dispute"], dispute_id, status)


async def open_disputes_of_wallet(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> int:
    return await conn.fetchval(Q["open_disputes_of_wallet"], wallet_id)


async def dispute_totals_of_topup(conn: asyncpg.Connection, topup_id: uuid.UUID) -> tuple[int, int]:
    record = await conn.fetchrow(Q["dispute_totals_of_topup"], topup_id)
    return record["open_micros"], record["lost_micros"]
