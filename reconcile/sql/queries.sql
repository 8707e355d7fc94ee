-- Queries of the reconciler. The only place reconciliation SQL lives.

-- name: try_lock
-- One reconciliation at a time, across every worker and CLI: a session lock,
-- released when the run's connection closes, even if the process dies.
SELECT pg_try_advisory_lock(hashtext('centime.reconcile'))

-- name: unlock
SELECT pg_advisory_unlock(hashtext('centime.reconcile'))

-- name: insert_run
INSERT INTO reconciliation_runs (id, window_start, window_end, dry_run, status)
VALUES ($1, $2, $3, $4, 'running')

-- name: finish_run
UPDATE reconciliation_runs
   SET status = $2, transactions_seen = $3, counts = $4::jsonb, totals = $5::jsonb, healed = $6,
       wallets_checked = $7, error = $8, finished_at = now(),
       duration_ms = (extract(epoch FROM now() - started_at) * 1000)::integer
 WHERE id = $1

-- name: supersede_runs
-- A finished run replaces the earlier runs of the same window.
UPDATE reconciliation_runs SET superseded_by = $3
 WHERE window_start = $1 AND window_end = $2 AND id <> $3 AND superseded_by IS NULL AND status <> 'running'

-- name: insert_items
INSERT INTO reconciliation_items (
    run_id, item_no, category, stripe_object_id, balance_transaction_id, transaction_type, currency,
    stripe_amount_micros, stripe_fee_micros, stripe_net_micros,
    ledger_amount_micros, ledger_fee_micros, ledger_net_micros, entry_id, wallet_id, healed, detail
)
SELECT $1, i.*
  FROM unnest(
           $2::integer[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
           $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
           $14::uuid[], $15::uuid[], $16::boolean[], $17::text[]
       ) AS i

-- name: runs_page
-- Newest first; $1 is the cursor (a run id, exclusive) or NULL.
SELECT * FROM reconciliation_runs WHERE ($1::uuid IS NULL OR id < $1::uuid) ORDER BY id DESC LIMIT $2

-- name: run_by_id
SELECT * FROM reconciliation_runs WHERE id = $1

-- name: finished_run_of_window
-- A run that already covered this window for real, started after the window
-- had ended (a manual run of a day still under way does not count).
SELECT id FROM reconciliation_runs
 WHERE window_start = $1 AND window_end = $2 AND NOT dry_run AND status IN ('clean', 'unmatched')
   AND started_at >= window_end
 LIMIT 1

-- name: fail_interrupted_runs
-- Runs left 'running' by a process that died: the lock is ours, so none is.
UPDATE reconciliation_runs
   SET status = 'failed', error = 'interrupted: the process ended before the run did', finished_at = now(),
       duration_ms = (extract(epoch FROM now() - started_at) * 1000)::integer
 WHERE status = 'running' 

-- name: items_page
SELECT * FROM reconciliation_items WHERE run_id = $1 AND item_no > $2 ORDER BY item_no LIMIT $3

-- name: create_seen
-- The Stripe objects and balance transactions seen in this run's window,
-- kept in Postgres (not in memory) for the anti-join below.
CREATE TEMP TABLE IF NOT EXISTS reconcile_seen (object_id text PRIMARY KEY)

-- name: clear_seen
TRUNCATE reconcile_seen

-- name: add_seen
INSERT INTO reconcile_seen (object_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING

-- name: ledger_for_objects
-- Stripe's entries in the ledger for these objects, with the Stripe fee
-- each carries (its lines on a stripe_fees account).
SELECT e.id, e.kind, e.currency, e.wallet_id, e.amount_micros, e.stripe_object_id,
       coalesce((SELECT sum(l.amount_micros)
                   FROM journal_lines l
                   JOIN accounts a ON a.id = l.account_id AND a.kind = 'stripe_fees'
                  WHERE l.entry_id = e.id), 0)::bigint AS fee_micros
  FROM journal_entries e
 WHERE e.stripe_object_id = ANY($1::text[])

-- name: ledger_claims_unseen
-- Entries written in the window ($1 <= id < $2, ids are UUIDv7) that claim a
-- Stripe money movement Stripe did not list; in id order after $3.
SELECT e.id, e.kind, e.currency, e.wallet_id, e.amount_micros, e.stripe_object_id,
       coalesce((SELECT sum(l.amount_micros)
                   FROM journal_lines l
                   JOIN accounts a ON a.id = l.account_id AND a.kind = 'stripe_fees'
                  WHERE l.entry_id = e.id), 0)::bigint AS fee_micros
  FROM journal_entries e
 WHERE e.id >= $1 AND e.id < $2 AND e.id > $3
   AND e.kind IN ('topup', 'topup_refund', 'dispute_opened', 'dispute_won', 'stripe_fee')
   AND NOT EXISTS (SELECT 1 FROM reconcile_seen s WHERE s.object_id = e.stripe_object_id)
 ORDER BY e.id
 LIMIT $4
