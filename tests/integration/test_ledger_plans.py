"""The balance triggers probe the lines of each written entry by index: their
cost does not grow with the size of the ledger (a scan of every line made
each group commit take 8 ms on a ledger of 36,000 lines)."""

from __future__ import annotations

import uuid

import asyncpg

from ledger import repo as ledger_repo
from ledger.accounts import system_account_id
from wallet import repo as wallet_repo

ENTRIES = 5_000


async def test_balance_check_probes_by_index(private_database: str) -> None:
    conn = await asyncpg.connect(private_database)
    try:
        wallet_id = uuid.uuid4()
        await wallet_repo.insert_wallet(conn, wallet_id, "plans", "usd", 0)
        await ledger_repo.ensure_system_accounts(conn, "usd")
        await ledger_repo.insert_wallet_account(conn, wallet_id, "usd")
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
        await conn.execute("ANALYZE journal_lines; ANALYZE journal_entries")
        one_entry = [await conn.fetchval("SELECT id FROM journal_entries LIMIT 1")]
        body = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'ledger_unbalanced'")
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {_as_query(body)}", one_entry))
        assert await conn.fetchval("SELECT ledger_unbalanced($1)", one_entry) is None
    finally:
        await conn.close()
    assert "Seq Scan on journal_lines" not in plan, plan
    assert "journal_lines_pkey" in plan, plan


def _as_query(function_body: str) -> str:
    """The SQL function's body as a query on $1 (its one argument)."""
    return function_body.replace("entry_ids", "$1::uuid[]")
