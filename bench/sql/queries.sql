-- Queries of the benchmark only (bench/). Nothing in centime uses them.

-- name: seed_wallets
-- $1 ids, $2 owner ids: wallets in usd with their liability accounts.
WITH w AS (
    INSERT INTO wallets (id, owner_id, currency)
    SELECT id, owner_id, 'usd' FROM unnest($1::uuid[], $2::text[]) AS t (id, owner_id)
    RETURNING id
)
INSERT INTO accounts (id, kind, currency, wallet_id)
SELECT id, 'wallet', 'usd', id FROM w

-- name: naive_schema
-- The naive peer keeps each balance in a Postgres row, as a service without
-- Redis would.
CREATE TABLE IF NOT EXISTS bench_naive_balances (
    wallet_id              uuid PRIMARY KEY REFERENCES wallets (id),
    currency               char(3) NOT NULL,
    revenue_account_id     uuid NOT NULL,
    overdraft_limit_micros bigint NOT NULL,
    balance_micros         bigint NOT NULL
)

-- name: naive_load
-- Start the naive balances at the ledger's. $1: the wallets.
INSERT INTO bench_naive_balances (wallet_id, currency, revenue_account_id, overdraft_limit_micros, balance_micros)
SELECT w.id, w.currency, $2::uuid, w.overdraft_limit_micros,
       -coalesce((SELECT sum(l.amount_micros) FROM journal_lines l WHERE l.account_id = w.id), 0)
  FROM wallets w
 WHERE w.id = ANY($1::uuid[])
ON CONFLICT (wallet_id) DO UPDATE SET balance_micros = excluded.balance_micros

-- name: naive_debit
-- The naive peer's whole debit, one statement: take the balance if it
-- covers the amount, and write the entry and its two lines. No row comes
-- back when the balance is short. $1 wallet, $2 amount_micros, $3 entry id,
-- $4 idempotency key, $5 request hash, $6 description, $7 metadata (JSON),
-- $8 created_at.
WITH wallet AS (
    UPDATE bench_naive_balances
       SET balance_micros = balance_micros - $2
     WHERE wallet_id = $1 AND balance_micros - $2 >= -overdraft_limit_micros
 RETURNING wallet_id, currency, revenue_account_id, balance_micros
), entry AS (
    INSERT INTO journal_entries (
        id, kind, currency, wallet_id, amount_micros, balance_micros,
        idempotency_key, request_hash, description, metadata, created_at
    )
    SELECT $3, 'debit', currency, wallet_id, $2, balance_micros, $4, $5, $6, $7::jsonb, $8
      FROM wallet
    RETURNING id, currency
), lines AS (
    INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
    SELECT entry.id, 0, $1, entry.currency, $2 FROM entry
    UNION ALL
    SELECT entry.id, 1, wallet.revenue_account_id, entry.currency, -$2 FROM entry, wallet
)
SELECT balance_micros, currency FROM wallet

-- name: run_debits
-- The debits a run wrote, by idempotency key, and whether each was reversed.
-- $1: the run's key prefix (a LIKE pattern).
SELECT e.idempotency_key, count(*) AS entries, count(r.id) AS reversals
  FROM journal_entries e
  LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
 WHERE e.kind = 'debit' AND e.idempotency_key LIKE $1
 GROUP BY e.idempotency_key

-- name: copy_tables
-- Tables shaped like the ledger's, with their indexes, without the triggers
-- and foreign keys: what a raw COPY of the same rows costs (CHECKs kept).
DROP TABLE IF EXISTS bench_copy_lines, bench_copy_entries;
CREATE TABLE bench_copy_entries (LIKE journal_entries INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE bench_copy_lines (LIKE journal_lines INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)
