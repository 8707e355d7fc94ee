-- The nightly reconciliation: runs, the items they could not match, and the
-- entry kind of a healed fee.

-- A Stripe fee the ledger missed (its top-up was credited before the fee was
-- known): Stripe fees +fee, Stripe clearing -fee. Never touches a wallet.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_kind_check;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_kind_check CHECK (kind IN (
    'debit', 'credit', 'reversal',
    'topup', 'topup_refund', 'dispute_opened', 'dispute_won', 'dispute_lost',
    'stripe_fee'
));

CREATE TABLE reconciliation_runs (
    id                 uuid PRIMARY KEY,
    window_start       timestamptz NOT NULL,
    window_end         timestamptz NOT NULL,
    dry_run            boolean NOT NULL,
    -- running; clean (nothing unmatched); unmatched (items remain); failed.
    status             text NOT NULL CHECK (status IN ('running', 'clean', 'unmatched', 'failed')),
    -- A later run of the same window replaces this one's findings.
    superseded_by      uuid REFERENCES reconciliation_runs (id),
    transactions_seen  integer NOT NULL DEFAULT 0 CHECK (transactions_seen >= 0),
    -- {category: count} and {category: {currency: micros}}.
    counts             jsonb NOT NULL DEFAULT '{}',
    totals             jsonb NOT NULL DEFAULT '{}',
    healed             integer NOT NULL DEFAULT 0 CHECK (healed >= 0),
    wallets_checked    integer NOT NULL DEFAULT 0 CHECK (wallets_checked >= 0),
    error              text CHECK (length(error) <= 4000),
    started_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    duration_ms        integer CHECK (duration_ms >= 0),
    CHECK (window_start < window_end),
    CHECK ((status = 'running') = (finished_at IS NULL))
);
CREATE INDEX reconciliation_runs_window ON reconciliation_runs (window_start, window_end);
CREATE INDEX reconciliation_runs_started ON reconciliation_runs (started_at DESC, id DESC);

CREATE TABLE reconciliation_items (
    run_id                 uuid NOT NULL REFERENCES reconciliation_runs (id),
    item_no                integer NOT NULL CHECK (item_no >= 1),
    category               text NOT NULL CHECK (category IN (
                               'missing_in_ledger', 'missing_in_stripe', 'amount_mismatch',
                               'fee_mismatch', 'balance_drift')),
    -- What was found on each side; NULL where a side has nothing.
    stripe_object_id       text CHECK (length(stripe_object_id) <= 255),
    balance_transaction_id text CHECK (length(balance_transaction_id) <= 255),
    transaction_type       text CHECK (length(transaction_type) <= 64),
    currency               char(3),
    stripe_amount_micros   bigint,
    stripe_fee_micros      bigint,
    stripe_net_micros      bigint,
    ledger_amount_micros   bigint,
    ledger_fee_micros      bigint,
    ledger_net_micros      bigint,
    entry_id               uuid,
    wallet_id              uuid,
    -- healed: the run wrote what was missing (not in a dry run).
    healed                 boolean NOT NULL DEFAULT false,
    detail                 text NOT NULL CHECK (length(detail) <= 2000),
    PRIMARY KEY (run_id, item_no)
);

-- Recent reversals of a wallet (the drift check waits for their Redis undo).
-- Reversals are rare, so this index costs the debit path nothing.
CREATE INDEX journal_entries_wallet_reversals ON journal_entries (wallet_id, committed_at)
    WHERE kind = 'reversal';
