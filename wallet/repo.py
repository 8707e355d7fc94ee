"""The only place wallet SQL runs. Every function takes its connection."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import msgspec

from centime.sql import load_queries

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


async def wallet_by_id(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> WalletRow | None:
    record = await conn.fetchrow(Q["wallet_by_id"], wallet_id)
    return None if record is None else _row(record)


async def wallets_by_owner(conn: asyncpg.Connection, owner_id: str, limit: int) -> list[WalletRow]:
    return [_row(record) for record in await conn.fetch(Q["wallets_by_owner"], owner_id, limit)]


async def wallets_page(
    conn: asyncpg.Connection, after_wallet_id: uuid.UUID | None, limit: int
) -> list[WalletWithBalance]:
    records = await conn.fetch(Q["wallets_page"], after_wallet_id, limit)
    return [
        WalletWithBalance(wallet=_row(record), balance_micros=record["balance_micros"]) for record in records
    ]
