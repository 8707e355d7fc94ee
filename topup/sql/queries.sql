-- Queries of top-ups, Stripe customers, disputes and Stripe events.
-- The only place top-up SQL lives. Ledger entries are written by ledger/ and
-- wallet/changes.py, in the same transactions.

-- name: insert_topup
-- Nothing when the wallet already has a top-up with this idempotency key.
INSERT INTO topups (id, wallet_id, amount_micros, currency, idempotency_key, request_hash)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (wallet_id, idempotency_key) DO NOTHING
RETURNING *

-- name: topup_by_wallet_key
SELECT * FROM topups WHERE wallet_id = $1 AND idempotency_key = $2

-- name: topup_by_id
SELECT * FROM topups WHERE id = $1

-- name: topup_by_id_for_update
-- Serialises the effects on one top-up: events for it run one at a time.
SELECT * FROM topups WHERE id = $1 FOR UPDATE

-- name: topup_by_payment_intent
SELECT * FROM topups WHERE payment_intent_id = $1

-- name: topup_by_charge
SELECT * FROM topups WHERE charge_id = $1

-- name: set_payment_intent
UPDATE topups SET payment_intent_id = $2, client_secret = $3, updated_at = now()
 WHERE id = $1
RETURNING *

-- name: set_topup_state
UPDATE topups
   SET status = $2, charge_id = coalesce($3, charge_id), credited_micros = $4, fee_micros = $5,
       refunded_micros = $6, disputed_micros = $7, failure_message = $8, updated_at = now()
 WHERE id = $1
RETURNING *

-- name: topups_page
-- Newest first; $2 is the cursor (a top-up id, exclusive) or NULL; $3 the limit.
SELECT * FROM topups
 WHERE wallet_id = $1 AND ($2::uuid IS NULL OR id < $2::uuid)
 ORDER BY id DESC
 LIMIT $3

-- name: customer_of_wallet
SELECT customer_id FROM stripe_customers WHERE wallet_id = $1

-- name: insert_customer
-- The first customer stored for a wallet wins; returns the one stored.
WITH inserted AS (
    INSERT INTO stripe_customers (wallet_id, customer_id) VALUES ($1, $2)
    ON CONFLICT (wallet_id) DO NOTHING
    RETURNING customer_id
)
SELECT customer_id FROM inserted
UNION ALL
SELECT customer_id FROM stripe_customers WHERE wallet_id = $1
LIMIT 1

-- name: event_seen
SELECT outcome FROM stripe_events WHERE id = $1

-- name: insert_event
-- Nothing when the event was processed before: the caller rolls back.
INSERT INTO stripe_events (id, type, object_id, outcome) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING id

-- name: dispute_for_update
SELECT * FROM disputes WHERE id = $1 FOR UPDATE

-- name: insert_dispute
INSERT INTO disputes (id, topup_id, wallet_id, amount_micros, status) VALUES ($1, $2, $3, $4, 'open')

-- name: close_dispute
UPDATE disputes SET status = $2, closed_at = now() WHERE id = $1 AND status = 'open'

-- name: open_disputes_of_wallet
SELECT count(*) FROM disputes WHERE wallet_id = $1 AND status = 'open'

-- name: dispute_totals_of_topup
-- Open and lost amounts of a top-up's disputes.
SELECT coalesce(sum(amount_micros) FILTER (WHERE status = 'open'), 0)::bigint AS open_micros,
       coalesce(sum(amount_micros) FILTER (WHERE status = 'lost'), 0)::bigint AS lost_micros
  FROM disputes
 WHERE topup_id = $1
