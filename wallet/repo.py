"""The only place wallet SQL runs. Every function takes its connection."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from centime.sql import load_queries
from wallet.schemas import CachedWallet, WalletChange

Q = load_queries("wallet")


class WalletRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    owner_id: str
    currency: str
    overdraft_limit_micros: int
    status: str
    created_at: datetime


class WalletWithBalance(msgspec.Struct, frozen=True, kw_only=True):
    wallet: WalletRow
    balance_micros: int
    change_seq: int


def _row(record: asyncpg.Record) -> WalletRow:
    return WalletRow(
        id=record["id"],
        owner_id=record["owner_id"],
        currency=record["currency"],
        overdraft_limit_micros=record["overdraft_limit_micros"],
        status=record["status"],
        created_at=record["created_at"],
    )


async def insert_wallet(
    conn: asyncpg.Connection,
    wallet_id: uuid.UUID,
    owner_id: str,
    currency: str,
    overdraft_limit_micros: int,
) -> WalletRow | None:
    record = await conn.fetchrow(Q["insert_wallet"], wallet_id, owner_id, currency, overdraft_limit_micros)
    return None if record is None else _row(record)


async def wallet_id_of_owner(conn: asyncpg.Connection, owner_id: str, currency: str) -> uuid.UUID | None:
    return await conn.fetchval(Q["wallet_id_of_owner"], owner_id, currency)


async def wallet_by_id(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> WalletRow | None:
    record = await conn.fetchrow(Q["wallet_by_id"], wallet_id)
    return None if record is None else _row(record)


async def owners_of_wallets(
    conn: asyncpg.Connection, wallet_ids: list[uuid.UUID], *, timeout_s: float
) -> dict[uuid.UUID, str]:
    records = await conn.fetch(Q["owners_of_wallets"], wallet_ids, timeout=timeout_s)
    return {record["id"]: record["owner_id"] for record in records}


async def wallets_by_owner(conn: asyncpg.Connection, owner_id: str, limit: int) -> list[WalletRow]:
    return [_row(record) for record in await conn.fetch(Q["wallets_by_owner"], owner_id, limit)]


async def wallets_page(
    conn: asyncpg.Connection, after_wallet_id: uuid.UUID | None, limit: int
) -> list[WalletWithBalance]:
    records = await conn.fetch(Q["wallets_page"], after_wallet_id, limit)
    return [
        WalletWithBalance(
            wallet=_row(record), balance_micros=record["balance_micros"], change_seq=record["change_seq"]
        )
        for record in records
    ]


async def wallet_for_cache(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> CachedWallet | None:
    record = await conn.fetchrow(Q["wallet_for_cache"], wallet_id)
    if record is None:
        return None
    return CachedWallet(
        balance_micros=record["balance_micros"],
        overdraft_limit_micros=record["overdraft_limit_micros"],
        status=record["status"],
        currency=record["currency"],
        change_seq=record["change_seq"],
    )


async def lock_wallet(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> bool:
    return await conn.fetchval(Q["lock_wallet"], wallet_id) is not None


async def recent_reversal(conn: asyncpg.Connection, wallet_id: uuid.UUID, within_s: float) -> bool:
    return await conn.fetchval(Q["recent_reversal"], wallet_id, float(within_s))


async def next_change_seq(conn: asyncpg.Connection, wallet_id: uuid.UUID, status: str | None) -> int | None:
    return await conn.fetchval(Q["next_change_seq"], wallet_id, status)


async def insert_change(
    conn: asyncpg.Connection,
    wallet_id: uuid.UUID,
    seq: int,
    delta_micros: int,
    status: str | None,
    entry_id: uuid.UUID | None,
) -> None:
    await conn.execute(Q["insert_change"], wallet_id, seq, delta_micros, status, entry_id)


async def pending_changes(conn: asyncpg.Connection, wallet_id: uuid.UUID, limit: int) -> list[WalletChange]:
    records = await conn.fetch(Q["pending_changes"], wallet_id, limit)
    return [WalletChange(r["seq"], r["delta_micros"], r["status"]) for r in records]


async def delete_applied_changes(conn: asyncpg.Connection, wallet_id: uuid.UUID, applied_seq: int) -> None:
    await conn.execute(Q["delete_applied_changes"], wallet_id, applied_seq)


async def wallets_with_changes(conn: asyncpg.Connection, before: datetime, limit: int) -> list[uuid.UUID]:
    return [r["wallet_id"] for r in await conn.fetch(Q["wallets_with_changes"], before, limit)]


async def changes_count(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(Q["changes_count"])


class HoldEventRow(msgspec.Struct, frozen=True, kw_only=True):
    hold_id: uuid.UUID
    kind: str
    wallet_id: uuid.UUID
    currency: str
    amount_micros: int
    requested_micros: int | None
    captured_micros: int | None
    entry_id: uuid.UUID | None
    expires_at: datetime
    idempotency_key: str
    description: str | None
    metadata: str
    """JSON text."""
    occurred_at: datetime


async def insert_hold_events(conn: asyncpg.Connection, rows: list[HoldEventRow], *, timeout_s: float) -> None:
    columns = [f.name for f in msgspec.structs.fields(HoldEventRow)]
    await conn.execute(
        Q["insert_hold_events"],
        *([getattr(row, name) for row in rows] for name in columns),
        timeout=timeout_s,
    )


async def hold_events_of(conn: asyncpg.Connection, hold_id: uuid.UUID) -> list[HoldEventRow]:
    return [HoldEventRow(**dict(record)) for record in await conn.fetch(Q["hold_events_of"], hold_id)]
