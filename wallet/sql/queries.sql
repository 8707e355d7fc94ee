-- Queries of wallets. The only place wallet SQL lives.

-- name: insert_wallet
-- Returns nothing when the owner already has a wallet in that currency.
INSERT INTO wallets (id, owner_id, currency, overdraft_limit_micros)
VALUES ($1, $2, $3, $4)
ON CONFLICT (owner_id, currency) DO NOTHING
RETURNING id, owner_id, currency, overdraft_limit_micros, status, created_at

-- name: wallet_id_of_owner
-- The owner's wallet in that currency (the one insert_wallet met).
SELECT id FROM wallets WHERE owner_id = $1 AND currency = $2

-- name: wallet_by_id
SELECT id, owner_id, currency, overdraft_limit_micros, status, created_at
  FROM wallets WHERE id = $1

-- name: wallets_by_owner
SELECT id, owner_id, currency, overdraft_limit_micros, status, created_at
  FROM wallets WHERE owner_id = $1 ORDER BY created_at, id LIMIT $2

-- name: wallets_page
-- Every wallet in id order, a page at a time, with its ledger balance and
-- the last change that balance includes (one snapshot).
SELECT w.id, w.owner_id, w.currency, w.overdraft_limit_micros, w.status, w.created_at, w.change_seq,
       coalesce(-(SELECT sum(l.amount_micros) FROM journal_lines l WHERE l.account_id = w.id), 0)::bigint
           AS balance_micros
  FROM wallets w
 WHERE ($1::uuid IS NULL OR w.id > $1::uuid)
 ORDER BY w.id
 LIMIT $2

-- name: wallet_for_cache
-- What Redis holds of a wallet, read in one snapshot: the ledger balance
-- includes exactly the Postgres-first changes up to change_seq, and the
-- status is theirs.
SELECT w.overdraft_limit_micros, w.status, w.currency, w.change_seq,
       coalesce(-(SELECT sum(l.amount_micros) FROM journal_lines l WHERE l.account_id = w.id), 0)::bigint
           AS balance_micros
  FROM wallets w
 WHERE w.id = $1

-- name: lock_wallet
-- The wallet's row lock, taken before deciding a change (e.g. whether any
-- dispute is still open), so decisions about one wallet run one at a time.
-- NO KEY: the ledger's inserts (a foreign key share lock) are not blocked.
SELECT id FROM wallets WHERE id = $1 FOR NO KEY UPDATE

-- name: next_change_seq
-- The wallet's next change number, and its new status if $2 is not NULL.
-- Holds the wallet's row lock until commit, so changes commit in seq order.
UPDATE wallets SET change_seq = change_seq + 1, status = coalesce($2, status)
 WHERE id = $1
RETURNING change_seq

-- name: insert_change
INSERT INTO wallet_changes (wallet_id, seq, delta_micros, status, entry_id) VALUES ($1, $2, $3, $4, $5)

-- name: pending_changes
SELECT seq, delta_micros, status FROM wallet_changes WHERE wallet_id = $1 ORDER BY seq LIMIT $2

-- name: delete_applied_changes
DELETE FROM wallet_changes WHERE wallet_id = $1 AND seq <= $2

-- name: wallets_with_changes
-- Wallets with a change written before $1 and not yet applied to Redis, in
-- random order: a wallet stuck on a gap never starves the others. (Few rows
-- wait here: each is applied within a request or a sweep of its commit.)
SELECT wallet_id
  FROM (SELECT DISTINCT wallet_id FROM wallet_changes WHERE created_at < $1) AS waiting
 ORDER BY random()
 LIMIT $2

-- name: changes_count
SELECT count(*) FROM wallet_changes

-- name: recent_reversal
-- Whether a reversal of this wallet committed in the last $2 seconds: its
-- undo in Redis may still be on its way (see the partial index in 0003).
SELECT EXISTS (
    SELECT 1 FROM journal_entries
     WHERE wallet_id = $1 AND kind = 'reversal' AND committed_at > now() - make_interval(secs => $2)
)

-- name: insert_hold_events
-- Records hold events; one already recorded (same hold and kind) is skipped,
-- so the request and the sweeper may both record the same event.
INSERT INTO hold_events (
    hold_id, kind, wallet_id, currency, amount_micros, requested_micros, captured_micros, entry_id,
    expires_at, idempotency_key, description, metadata, occurred_at
)
SELECT e.hold_id, e.kind, e.wallet_id, e.currency, e.amount_micros, e.requested_micros, e.captured_micros,
       e.entry_id, e.expires_at, e.idempotency_key, e.description, e.metadata::jsonb, e.occurred_at
  FROM unnest(
           $1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
           $8::uuid[], $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::timestamptz[]
       ) AS e (hold_id, kind, wallet_id, currency, amount_micros, requested_micros, captured_micros,
               entry_id, expires_at, idempotency_key, description, metadata, occurred_at)
ON CONFLICT DO NOTHING

-- name: hold_events_of
-- What Postgres recorded of one hold: held first, then its end (by kind, not
-- by time: the Redis clock that stamped them may have stepped back).
SELECT hold_id, kind, wallet_id, currency, amount_micros, requested_micros, captured_micros, entry_id,
       expires_at, idempotency_key, description, metadata::text AS metadata, occurred_at
  FROM hold_events
 WHERE hold_id = $1
 ORDER BY kind <> 'held', occurred_at
 LIMIT 2

-- name: owners_of_wallets
SELECT id, owner_id FROM wallets WHERE id = ANY($1::uuid[])
