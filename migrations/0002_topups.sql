-- Top-ups through Stripe, and the wallet changes that reach Redis after
-- Postgres (a transactional outbox).
--
-- Debits and admin credits go Redis first (wallet/lua/apply.lua). Everything
-- Stripe moves goes Postgres first: the entry, the event that caused it and a
-- wallet change commit in one transaction; the change is then applied to
-- Redis idempotently by its per-wallet sequence number.

-- Entries that Stripe caused. Their balance after is not known when they are
-- written (Redis applies them later), so like reversals they carry none.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_kind_check;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_kind_check CHECK (kind IN (
    'debit', 'credit', 'reversal',
    'topup', 'topup_refund', 'dispute_opened', 'dispute_won', 'dispute_lost'
));
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_check1;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_balance_known
    CHECK ((kind IN ('debit', 'credit')) = (balance_micros IS NOT NULL));
-- A Stripe entry names its Stripe object and has a key made of Stripe ids.
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_stripe_origin
    CHECK (kind IN ('debit', 'credit', 'reversal')
           OR (stripe_object_id IS NOT NULL AND idempotency_key IS NOT NULL));

-- API keys (debits, credits) are unique per wallet; Stripe keys are unique
-- everywhere, so no API key can ever take a Stripe entry's place, and one
-- Stripe object never moves money in two wallets.
DROP INDEX journal_entries_wallet_key;
CREATE UNIQUE INDEX journal_entries_wallet_key
    ON journal_entries (wallet_id, idempotency_key) WHERE kind IN ('debit', 'credit');
CREATE UNIQUE INDEX journal_entries_stripe_key
    ON journal_entries (idempotency_key) WHERE kind NOT IN ('debit', 'credit', 'reversal');
CREATE INDEX journal_entries_stripe_object ON journal_entries (stripe_object_id)
    WHERE stripe_object_id IS NOT NULL;

-- The count of Postgres-first changes to a wallet. Each change takes the
-- next number under the wallet's row lock, so numbers commit in order; Redis
-- keeps the last one it applied (field q) and applies each exactly once.
ALTER TABLE wallets ADD COLUMN change_seq bigint NOT NULL DEFAULT 0 CHECK (change_seq >= 0);

CREATE TABLE wallet_changes (
    wallet_id    uuid NOT NULL REFERENCES wallets (id),
    seq          bigint NOT NULL CHECK (seq >= 1),
    delta_micros bigint NOT NULL CHECK (abs(delta_micros) <= 9007199254740991),
    -- The wallet's status after this change, when it changed.
    status       text CHECK (status IN ('active', 'frozen')),
    entry_id     uuid REFERENCES journal_entries (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (wallet_id, seq)
);
CREATE INDEX wallet_changes_created ON wallet_changes (created_at);

CREATE TABLE stripe_customers (
    wallet_id   uuid PRIMARY KEY REFERENCES wallets (id),
    customer_id text NOT NULL UNIQUE CHECK (length(customer_id) BETWEEN 1 AND 255),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE topups (
    id                uuid PRIMARY KEY,
    wallet_id         uuid NOT NULL REFERENCES wallets (id),
    amount_micros     bigint NOT NULL CHECK (amount_micros BETWEEN 1 AND 9007199254740991),
    currency          char(3) NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN (
                          'pending', 'succeeded', 'failed', 'canceled',
                          'partially_refunded', 'refunded', 'disputed', 'dispute_lost')),
    idempotency_key   text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash      text NOT NULL,
    payment_intent_id text UNIQUE CHECK (length(payment_intent_id) BETWEEN 1 AND 255),
    client_secret     text CHECK (length(client_secret) BETWEEN 1 AND 1000),
    charge_id         text UNIQUE CHECK (length(charge_id) BETWEEN 1 AND 255),
    -- What the ledger holds for this top-up (its entries are the truth; these
    -- copies serve reads and the status).
    credited_micros   bigint NOT NULL DEFAULT 0 CHECK (credited_micros >= 0),
    fee_micros        bigint NOT NULL DEFAULT 0 CHECK (fee_micros >= 0),
    refunded_micros   bigint NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    disputed_micros   bigint NOT NULL DEFAULT 0 CHECK (disputed_micros >= 0),
    failure_message   text CHECK (length(failure_message) <= 1000),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (wallet_id, idempotency_key)
);
CREATE INDEX topups_wallet ON topups (wallet_id, id DESC);

CREATE TABLE disputes (
    id            text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    topup_id      uuid NOT NULL REFERENCES topups (id),
    wallet_id     uuid NOT NULL REFERENCES wallets (id),
    amount_micros bigint NOT NULL CHECK (amount_micros BETWEEN 1 AND 9007199254740991),
    -- open, then won or lost, never back: events may arrive in any order.
    status        text NOT NULL CHECK (status IN ('open', 'won', 'lost')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    CHECK ((status = 'open') = (closed_at IS NULL))
);
CREATE INDEX disputes_open_by_wallet ON disputes (wallet_id) WHERE status = 'open';

-- Each Stripe event once: stored in the transaction of its ledger effect.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    type         text NOT NULL CHECK (length(type) BETWEEN 1 AND 255),
    object_id    text CHECK (length(object_id) <= 255),
    outcome      text NOT NULL CHECK (length(outcome) BETWEEN 1 AND 255),
    processed_at timestamptz NOT NULL DEFAULT now()
);
