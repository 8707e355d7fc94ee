-- Queries of wallets. The only place wallet SQL lives.

-- name: insert_wallet
-- Returns nothing when the owner already has a wallet in that currency.
INSERT INTO wallets (id, owner_id, currency, overdraft_limit_micros)
VALUES ($1, $2, $3, $4)
ON CONFLICT (owner_id, currency) DO NOTHING
RETURNING id, owner_id, currency, overdraft_limit_micros, status, created_at

-- name: wallet_by_id
SELECT id, owner_id, currency, overdraft_limit_micros, status, created_at
  FROM wallets WHERE id = $1

-- name: wallets_by_owner
SELECT id, owner_id, currency, overdraft_limit_micros, status, created_at
  FROM wallets WHERE owner_id = $1 ORDER BY created_at, id LIMIT $2

-- name: wallets_page
-- Every wallet in id order, a page at a time, with its ledger balance.
SELECT w.id, w.owner_id, w.currency, w.overdraft_limit_micros, w.status, w.created_at,
       coalesce(-(SELECT sum(l.amount_micros) FROM journal_lines l WHERE l.account_id = w.id), 0)::bigint
           AS balance_micros
  FROM wallets w
 WHERE ($1::uuid IS NULL OR w.id > $1::uuid)
 ORDER BY w.id
 LIMIT $2
