"""The only place ledger SQL runs. Every function takes its connection."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import msgspec

from centime.errors import invariant
from centime.sql import load_queries
from ledger.accounts import SYSTEM_ACCOUNT_KINDS, system_account_id
from ledger.ids import uuid7_floor
from ledger.schemas import EntryRecord, KeyHolder

Q = load_queries("ledger")
_metadata_decoder = msgspec.json.Decoder(dict[str, str])
_entries_encoder = msgspec.json.Encoder()
_INSERT_SKIPPING_KNOWN = Q["insert_entries"]
_INSERT_NEW = _INSERT_SKIPPING_KNOWN.replace(Q["skip_known_entries"], "", 1)
invariant(_INSERT_NEW != _INSERT_SKIPPING_KNOWN, "insert_entries lacks the clause skip_known_entries")
RETRY_TIMEOUT_S_MIN = 0.1
"""The least time the second try of insert_entries gets."""


async def insert_entries(
    conn: asyncpg.Connection, entries: Sequence[EntryRecord], *, timeout_s: float
) -> set[uuid.UUID]:
    """Write entries with their lines, skipping any already present by id or
    by (wallet, idempotency key). Returns the ids written by this call."""
    for entry in entries:
        # A time without a zone would be read in the session's zone.
        invariant(entry.created_at.tzinfo is not None, f"entry {entry.id} has a created_at without a zone")
    payload = _entries_encoder.encode(entries).decode()
    deadline_s = time.monotonic() + timeout_s
    if not conn.is_in_transaction():
        # Nearly every batch holds only new entries. A plain INSERT spares
        # Postgres ON CONFLICT's per-row probe of every unique index; a batch
        # that meets a known entry fails whole (the statement is its own
        # transaction: nothing written) and goes again, skipping what is known.
        try:
            rows = await conn.fetch(_INSERT_NEW, payload, timeout=timeout_s)
            return {row["id"] for row in rows}
        except asyncpg.UniqueViolationError:
            pass
    left_s = max(deadline_s - time.monotonic(), RETRY_TIMEOUT_S_MIN)
    rows = await conn.fetch(_INSERT_SKIPPING_KNOWN, payload, timeout=left_s)
    return {row["id"] for row in rows}


async def ensure_system_accounts(conn: asyncpg.Connection, currency: str) -> None:
    ids = [system_account_id(kind, currency) for kind in SYSTEM_ACCOUNT_KINDS]
    await conn.execute(Q["ensure_system_accounts"], ids, list(SYSTEM_ACCOUNT_KINDS), currency)


async def insert_wallet_account(conn: asyncpg.Connection, wallet_id: uuid.UUID, currency: str) -> None:
    await conn.execute(Q["insert_wallet_account"], wallet_id, currency)


def _record(row: asyncpg.Record) -> EntryRecord:
    return EntryRecord(
        id=row["id"],
        kind=row["kind"],
        currency=row["currency"],
        wallet_id=row["wallet_id"],
        amount_micros=row["amount_micros"],
        balance_micros=row["balance_micros"],
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        reverses_entry_id=row["reverses_entry_id"],
        description=row["description"],
        metadata=_metadata_decoder.decode(row["metadata"]),
        created_at=row["created_at"],
        stripe_object_id=row["stripe_object_id"],
    )


async def entries_by_id(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, EntryRecord]:
    rows = await conn.fetch(Q["entries_by_id"], list(ids))
    return {row["id"]: _record(row) for row in rows}


async def entry_by_wallet_key(
    conn: asyncpg.Connection, wallet_id: uuid.UUID, idempotency_key: str
) -> KeyHolder | None:
    row = await conn.fetchrow(Q["entry_by_wallet_key"], wallet_id, idempotency_key)
    return None if row is None else KeyHolder(_record(row), row["reversed_by"])


async def entries_by_wallet_keys(
    conn: asyncpg.Connection, wallet_ids: Sequence[uuid.UUID], idempotency_keys: Sequence[str]
) -> dict[tuple[uuid.UUID, str], KeyHolder]:
    """entry_by_wallet_key for many pairs in one query; absent pairs are missing."""
    rows = await conn.fetch(Q["entries_by_wallet_keys"], list(wallet_ids), list(idempotency_keys))
    return {
        (row["wallet_id"], row["idempotency_key"]): KeyHolder(_record(row), row["reversed_by"])
        for row in rows
    }


async def wallet_entries_page(
    conn: asyncpg.Connection, wallet_id: uuid.UUID, starting_after: uuid.UUID | None, limit: int
) -> list[EntryRecord]:
    return [
        _record(row) for row in await conn.fetch(Q["wallet_entries_page"], wallet_id, starting_after, limit)
    ]


async def unbalanced_entries(conn: asyncpg.Connection, limit: int) -> list[tuple[uuid.UUID, int, int]]:
    rows = await conn.fetch(Q["unbalanced_entries"], limit)
    return [(row["id"], row["line_count"], row["total_micros"]) for row in rows]


async def lines_total(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(Q["lines_total"])
    return row["total_micros"], row["line_count"]


async def mismatched_reversals(conn: asyncpg.Connection, limit: int) -> list[uuid.UUID]:
    return [row["id"] for row in await conn.fetch(Q["mismatched_reversals"], limit)]


async def reversed_entry_ids(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    return {row["id"] for row in await conn.fetch(Q["reversed_entry_ids"], list(ids))}


async def recent_keyed_entries_page(
    conn: asyncpg.Connection, since: datetime, after_entry_id: uuid.UUID | None, limit: int
) -> list[KeyHolder]:
    if after_entry_id is None:
        after_entry_id = uuid7_floor(int(since.timestamp() * 1000))
    rows = await conn.fetch(Q["recent_keyed_entries_page"], since, after_entry_id, limit)
    return [KeyHolder(_record(row), row["reversed_by"]) for row in rows]
