-- Queries of the ledger. The only place ledger SQL lives.

-- name: insert_entries
-- Writes entries and their lines in one statement: the balance trigger checks
-- each entry when the statement ends, so both must be in it. An entry already
-- present (same id, or same wallet and idempotency key) is skipped with its
-- lines; RETURNING names the entries this statement wrote. ledger/repo.py
-- first runs it without the clause skip_known_entries (cheaper when every
-- entry is new), and with it when that meets a known entry.
-- $1: the entries as one JSON array (ledger.schemas.EntryRecord, as msgspec
-- encodes it): one parameter that Postgres parses, instead of eighteen arrays
-- that the client encodes element by element (docs/performance.md).
WITH e AS MATERIALIZED (
    SELECT *
      FROM json_to_recordset($1::json) AS e (
               id uuid, kind text, currency text, wallet_id uuid, amount_micros bigint,
               balance_micros bigint, idempotency_key text, request_hash text,
               reverses_entry_id uuid, description text, metadata jsonb, created_at timestamptz,
               stripe_object_id text, lines json
           )
), written AS (
    INSERT INTO journal_entries (
        id, kind, currency, wallet_id, amount_micros, balance_micros,
        idempotency_key, request_hash, reverses_entry_id, description, metadata, created_at,
        stripe_object_id
    )
    SELECT id, kind, currency, wallet_id, amount_micros, balance_micros,
           idempotency_key, request_hash, reverses_entry_id, description,
           metadata, created_at, stripe_object_id
      FROM e
    ON CONFLICT DO NOTHING
    RETURNING id
), lines AS (
    INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros)
    SELECT e.id, (l.n - 1)::smallint, l.account_id, e.currency, l.amount_micros
      FROM e
      CROSS JOIN LATERAL ROWS FROM (
               json_to_recordset(e.lines) AS (account_id uuid, amount_micros bigint)
           ) WITH ORDINALITY AS l (account_id, amount_micros, n)
     WHERE e.id IN (SELECT id FROM written)
)
SELECT id FROM written

-- name: skip_known_entries
ON CONFLICT DO NOTHING

-- name: ensure_system_accounts
-- Creates the system accounts of a currency if missing. $1: ids, $2: kinds.
INSERT INTO accounts (id, kind, currency)
SELECT a.id, a.kind, $3 FROM unnest($1::uuid[], $2::text[]) AS a (id, kind)
ON CONFLICT DO NOTHING

-- name: insert_wallet_account
INSERT INTO accounts (id, kind, currency, wallet_id) VALUES ($1, 'wallet', $2, $1)

-- name: entries_by_id
SELECT id, kind, currency, wallet_id, amount_micros, balance_micros, idempotency_key,
       request_hash, reverses_entry_id, description, metadata::text AS metadata, created_at,
       stripe_object_id
  FROM journal_entries
 WHERE id = ANY($1::uuid[])

-- name: entry_by_wallet_key
-- The debit or credit that holds this API idempotency key in this wallet, and
-- the id of its reversal, if it has one.
SELECT e.id, e.kind, e.currency, e.wallet_id, e.amount_micros, e.balance_micros,
       e.idempotency_key, e.request_hash, e.reverses_entry_id, e.description,
       e.metadata::text AS metadata, e.created_at, e.stripe_object_id, r.id AS reversed_by
  FROM journal_entries e
  LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
 WHERE e.wallet_id = $1 AND e.idempotency_key = $2 AND e.kind IN ('debit', 'credit')

-- name: wallet_entries_page
-- Newest first; $2 is the cursor (an entry id, exclusive) or NULL; $3 the limit.
SELECT id, kind, currency, wallet_id, amount_micros, balance_micros, idempotency_key,
       request_hash, reverses_entry_id, description, metadata::text AS metadata, created_at,
       stripe_object_id
  FROM journal_entries
 WHERE wallet_id = $1 AND ($2::uuid IS NULL OR id < $2::uuid)
 ORDER BY id DESC
 LIMIT $3

-- name: unbalanced_entries
-- Entries whose lines do not sum to zero, or that have fewer than two lines.
SELECT e.id, count(l.entry_id) AS line_count, coalesce(sum(l.amount_micros), 0)::bigint AS total_micros
  FROM journal_entries e
  LEFT JOIN journal_lines l ON l.entry_id = e.id
 GROUP BY e.id
HAVING count(l.entry_id) < 2 OR coalesce(sum(l.amount_micros), 0) <> 0
 LIMIT $1

-- name: lines_total
SELECT coalesce(sum(amount_micros), 0)::bigint AS total_micros, count(*) AS line_count
  FROM journal_lines

-- name: mismatched_reversals
-- A reversal must reverse an entry of the same wallet and amount.
SELECT r.id
  FROM journal_entries r
  JOIN journal_entries o ON o.id = r.reverses_entry_id
 WHERE r.kind = 'reversal' AND (o.wallet_id <> r.wallet_id OR o.amount_micros <> r.amount_micros)
 LIMIT $1

-- name: reversed_entry_ids
-- Which of these entries have a reversal.
SELECT reverses_entry_id AS id FROM journal_entries WHERE reverses_entry_id = ANY($1::uuid[])

-- name: recent_keyed_entries_page
-- Debits and credits created since $1, in id order after $2, with whether
-- each was reversed: what rebuild-cache restores of the idempotency records.
-- Ids are UUIDv7, so the first page starts at the UUIDv7 of $1 and walks
-- the primary key from there, not from the oldest entry.
SELECT e.id, e.kind, e.currency, e.wallet_id, e.amount_micros, e.balance_micros, e.idempotency_key,
       e.request_hash, e.reverses_entry_id, e.description, e.metadata::text AS metadata, e.created_at,
       e.stripe_object_id, r.id AS reversed_by
  FROM journal_entries e
  LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
 WHERE e.id > $2::uuid AND e.kind IN ('debit', 'credit') AND e.created_at >= $1
 ORDER BY e.id
 LIMIT $3

-- name: entries_by_wallet_keys
-- The debits and credits that hold these (wallet, API idempotency key)
-- pairs ($1[i], $2[i]), with their reversals: a batch's refused items, at once.
SELECT e.id, e.kind, e.currency, e.wallet_id, e.amount_micros, e.balance_micros,
       e.idempotency_key, e.request_hash, e.reverses_entry_id, e.description,
       e.metadata::text AS metadata, e.created_at, e.stripe_object_id, r.id AS reversed_by
  FROM unnest($1::uuid[], $2::text[]) AS k (wallet_id, idempotency_key)
  JOIN journal_entries e
    ON e.wallet_id = k.wallet_id AND e.idempotency_key = k.idempotency_key AND e.kind IN ('debit', 'credit')
  LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
