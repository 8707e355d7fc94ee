"""The only place reconciliation SQL runs. Every function takes its connection."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from centime.sql import load_queries
from reconcile.schemas import Item, Run

Q = load_queries("reconcile")
_json = msgspec.json.Encoder(order="sorted")
_counts = msgspec.json.Decoder(dict[str, int])
_totals = msgspec.json.Decoder(dict[str, dict[str, int]])


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    kind: str
    currency: str
    wallet_id: uuid.UUID
    amount_micros: int
    stripe_object_id: str
    fee_micros: int


def _entry(record: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(**{name: record[name] for name in LedgerEntry.__struct_fields__})


def _run(record: asyncpg.Record) -> Run:
    return Run(
        id=record["id"],
        window_start=record["window_start"],
        window_end=record["window_end"],
        dry_run=record["dry_run"],
        status=record["status"],
        superseded_by=record["superseded_by"],
        transactions_seen=record["transactions_seen"],
        counts=_counts.decode(record["counts"]),
        totals=_totals.decode(record["totals"]),
        healed=record["healed"],
        wallets_checked=record["wallets_checked"],
        error=record["error"],
        started_at=record["started_at"],
        finished_at=record["finished_at"],
        duration_ms=record["duration_ms"],
    )


async def try_lock(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval(Q["try_lock"])


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.fetchval(Q["unlock"])


async def fail_interrupted_runs(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["fail_interrupted_runs"])


async def insert_run(
    conn: asyncpg.Connection, run_id: uuid.UUID, window_start: datetime, window_end: datetime, dry_run: bool
) -> None:
    await conn.execute(Q["insert_run"], run_id, window_start, window_end, dry_run)


async def finish_run(
    conn: asyncpg.Connection,
    run_id: uuid.UUID,
    *,
    status: str,
    transactions_seen: int,
    counts: dict[str, int],
    totals: dict[str, dict[str, int]],
    healed: int,
    wallets_checked: int,
    error: str | None,
) -> None:
    await conn.execute(
        Q["finish_run"],
        run_id,
        status,
        transactions_seen,
        _json.encode(counts).decode(),
        _json.encode(totals).decode(),
        healed,
        wallets_checked,
        error,
    )


async def supersede_runs(
    conn: asyncpg.Connection, window_start: datetime, window_end: datetime, run_id: uuid.UUID
) -> None:
    await conn.execute(Q["supersede_runs"], window_start, window_end, run_id)


async def insert_items(conn: asyncpg.Connection, run_id: uuid.UUID, items: Sequence[Item]) -> None:
    if not items:
        return
    columns = [
        "item_no",
        "category",
        "stripe_object_id",
        "balance_transaction_id",
        "transaction_type",
        "currency",
        "stripe_amount_micros",
        "stripe_fee_micros",
        "stripe_net_micros",
        "ledger_amount_micros",
        "ledger_fee_micros",
        "ledger_net_micros",
        "entry_id",
        "wallet_id",
        "healed",
        "detail",
    ]
    await conn.execute(Q["insert_items"], run_id, *([getattr(i, c) for i in items] for c in columns))


async def runs_page(conn: asyncpg.Connection, before: uuid.UUID | None, limit: int) -> list[Run]:
    return [_run(r) for r in await conn.fetch(Q["runs_page"], before, limit)]


async def run_by_id(conn: asyncpg.Connection, run_id: uuid.UUID) -> Run | None:
    record = await conn.fetchrow(Q["run_by_id"], run_id)
    return None if record is None else _run(record)


async def finished_run_of_window(
    conn: asyncpg.Connection, window_start: datetime, window_end: datetime
) -> uuid.UUID | None:
    return await conn.fetchval(Q["finished_run_of_window"], window_start, window_end)


async def items_page(
    conn: asyncpg.Connection, run_id: uuid.UUID, after_item_no: int, limit: int
) -> list[Item]:
    records = await conn.fetch(Q["items_page"], run_id, after_item_no, limit)
    return [Item(**{name: r[name] for name in Item.__struct_fields__}) for r in records]


async def start_seen(conn: asyncpg.Connection) -> None:
    await conn.execute(Q["create_seen"])
    await conn.execute(Q["clear_seen"])


async def add_seen(conn: asyncpg.Connection, object_ids: Sequence[str]) -> None:
    await conn.execute(Q["add_seen"], list(object_ids))


async def ledger_for_objects(conn: asyncpg.Connection, object_ids: Sequence[str]) -> list[LedgerEntry]:
    return [_entry(r) for r in await conn.fetch(Q["ledger_for_objects"], list(object_ids))]


async def ledger_claims_unseen(
    conn: asyncpg.Connection, first_id: uuid.UUID, end_id: uuid.UUID, after_id: uuid.UUID, limit: int
) -> list[LedgerEntry]:
    records = await conn.fetch(Q["ledger_claims_unseen"], first_id, end_id, after_id, limit)
    return [_entry(r) for r in records]
