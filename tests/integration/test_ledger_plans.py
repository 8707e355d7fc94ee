"""The ledger's statement triggers (balance and references) probe by index, one
probe per written row: their cost does not grow with the size of the ledger
(a scan of every line made each group commit take 8 ms on a ledger of 36,000
lines). That holds for plans made on a large, analysed ledger and for plans a
connection cached while the ledger was still empty."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from ledger import repo as ledger_repo
from ledger.accounts import debit_lines, system_account_id
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from wallet import repo as wallet_repo

ENTRIES = 5_000
LEDGER_TABLES = ("wallets", "accounts", "journal_entries", "journal_lines")


def _debit(wallet_id: uuid.UUID) -> EntryRecord:
    return EntryRecord(
        id=uuid7(),
        kind="debit",
        currency="usd",
        wallet_id=wallet_id,
        amount_micros=1,
        balance_micros=0,
        idempotency_key=uuid7().hex,
        request_hash="h",
        created_at=datetime.now(UTC),
        lines=debit_lines(wallet_id, "usd", 1),
    )


async def _scans_of_a_write(conn: asyncpg.Connection, wallet_id: uuid.UUID) -> dict[str, int]:
    """Sequential scans of the ledger's tables while writing a few entries
    (this transaction's own counts, read before it commits)."""
    async with conn.transaction():
        written = await ledger_repo.insert_entries(conn, [_debit(wallet_id) for _ in range(3)], timeout_s=10)
        assert len(written) == 3
        rows = await conn.fetch(
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relname = ANY($1::text[])",
            list(LEDGER_TABLES),
        )
    return {row["relname"]: row["seq_scan"] for row in rows}


async def test_ledger_triggers_probe_by_index(private_database: str) -> None:
    early = await asyncpg.connect(private_database)
    conn = await asyncpg.connect(private_database)
    try:
        wallet_id = uuid.uuid4()
        await wallet_repo.insert_wallet(conn, wallet_id, "plans", "usd", 0)
        await ledger_repo.ensure_system_accounts(conn, "usd")
        await ledger_repo.insert_wallet_account(conn, wallet_id, "usd")
        # This connection plans (and keeps) the triggers' queries on a ledger of one entry.
        await ledger_repo.insert_entries(early, [_debit(wallet_id)], timeout_s=10)

        await conn.execute(
            """
            WITH e AS (
                INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, balance_micros,
                                             idempotency_key, created_at)
                SELECT gen_random_uuid(), 'debit', 'usd', $1, 1, 0, 'plan-' || g, now()
                  FROM generate_series(1, $3::int) AS g
                RETURNING id
            )
            INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
            SELECT e.id, n, CASE n WHEN 0 THEN $1 ELSE $2 END, 'usd', CASE n WHEN 0 THEN 1 ELSE -1 END
              FROM e, generate_series(0, 1) AS n
            """,
            wallet_id,
            system_account_id("revenue", "usd"),
            ENTRIES,
        )
        # Before ANALYZE: its invalidation would make the early connection plan anew.
        planned_on_an_empty_ledger = await _scans_of_a_write(early, wallet_id)
        await conn.execute("ANALYZE journal_lines; ANALYZE journal_entries")
        planned_on_a_large_ledger = await _scans_of_a_write(conn, wallet_id)
    finally:
        await early.close()
        await conn.close()
    nothing_scanned = dict.fromkeys(LEDGER_TABLES, 0)
    assert planned_on_a_large_ledger == nothing_scanned
    assert planned_on_an_empty_ledger == nothing_scanned
