-- Holds: reserve part of a wallet's balance, then capture the actual cost or
-- release the rest. A hold lives in Redis beside the balance (wallet/lua/
-- hold.lua); what happened to it is recorded here, append-only, so an audit
-- can replay every hold. A capture's money moves as an ordinary debit entry
-- of the ledger, keyed 'hold:<hold id>' in its wallet.
CREATE TABLE hold_events (
    hold_id          uuid NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('held', 'captured', 'released', 'expired')),
    wallet_id        uuid NOT NULL REFERENCES wallets (id),
    currency         char(3) NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    amount_micros    bigint NOT NULL CHECK (amount_micros BETWEEN 1 AND 9007199254740991),
    -- What the capture was asked for, and what the wallet's limit let it take.
    requested_micros bigint CHECK (requested_micros BETWEEN 1 AND 9007199254740991),
    captured_micros  bigint CHECK (captured_micros BETWEEN 0 AND 9007199254740991),
    -- The capture's debit entry (none when nothing could be captured). No
    -- foreign key: the entry commits on its own path, and may be reversed.
    entry_id         uuid,
    expires_at       timestamptz NOT NULL,
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    description      text CHECK (length(description) <= 1000),
    metadata         jsonb NOT NULL DEFAULT '{}',
    -- When it happened, by the Redis clock that decided it.
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hold_id, kind),
    CHECK ((kind = 'captured') = (requested_micros IS NOT NULL AND captured_micros IS NOT NULL)),
    CHECK (kind = 'captured' OR entry_id IS NULL)
);
-- A hold ends once: captured, released or expired, never two of them.
CREATE UNIQUE INDEX hold_events_one_end ON hold_events (hold_id) WHERE kind <> 'held';
CREATE INDEX hold_events_wallet ON hold_events (wallet_id, occurred_at);

CREATE TRIGGER hold_events_append_only BEFORE UPDATE OR DELETE ON hold_events
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER hold_events_no_truncate BEFORE TRUNCATE ON hold_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
