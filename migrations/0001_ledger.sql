-- The double-entry ledger, wallets and API keys.
--
-- Money is bigint micros, bounded by 2^53 - 1 (Redis Lua numbers are doubles).
-- Sign convention for lines: positive = debit side, negative = credit side.
-- Every entry's lines sum to zero in one currency; the database enforces it.
-- Ledger tables (journal_entries, journal_lines) are append-only: UPDATE,
-- DELETE and TRUNCATE are refused by triggers.

CREATE TABLE wallets (
    id                     uuid PRIMARY KEY,
    owner_id               text NOT NULL CHECK (length(owner_id) BETWEEN 1 AND 128),
    currency               char(3) NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    overdraft_limit_micros bigint NOT NULL DEFAULT 0
        CHECK (overdraft_limit_micros BETWEEN 0 AND 9007199254740991),
    status                 text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'frozen')),
    created_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, currency)
);

-- One liability account per wallet (its id is the wallet's id), and system
-- accounts per currency (revenue, promotions, ...), created on first use.
CREATE TABLE accounts (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('wallet', 'revenue', 'promotions', 'stripe_clearing', 'stripe_fees', 'refunds', 'disputes')),
    currency   char(3) NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    wallet_id  uuid UNIQUE REFERENCES wallets (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'wallet') = (wallet_id IS NOT NULL)),
    UNIQUE (id, currency)
);
CREATE UNIQUE INDEX accounts_system_kind_currency ON accounts (kind, currency) WHERE wallet_id IS NULL;

CREATE TABLE journal_entries (
    id                uuid PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('debit', 'credit', 'reversal')),
    currency          char(3) NOT NULL,
    wallet_id         uuid NOT NULL REFERENCES wallets (id),
    amount_micros     bigint NOT NULL CHECK (amount_micros BETWEEN 1 AND 9007199254740991),
    -- The wallet balance right after this entry, as the atomic Redis step saw
    -- it. Reversals carry none: the refund reaches Redis after they commit.
    balance_micros    bigint CHECK (balance_micros BETWEEN -9007199254740991 AND 9007199254740991),
    idempotency_key   text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash      text,
    reverses_entry_id uuid UNIQUE REFERENCES journal_entries (id),
    description       text CHECK (length(description) <= 1000),
    metadata          jsonb NOT NULL DEFAULT '{}',
    stripe_object_id  text,
    created_at        timestamptz NOT NULL,
    committed_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, currency),
    CHECK ((kind = 'reversal') = (reverses_entry_id IS NOT NULL)),
    CHECK ((kind = 'reversal') = (balance_micros IS NULL))
);
-- Idempotency outlives Redis: a debit or credit key is unique per wallet, forever.
CREATE UNIQUE INDEX journal_entries_wallet_key
    ON journal_entries (wallet_id, idempotency_key) WHERE kind <> 'reversal';
-- Newest-first pages of a wallet's entries (ids are time-ordered UUIDv7).
CREATE INDEX journal_entries_wallet_id ON journal_entries (wallet_id, id DESC);

CREATE TABLE journal_lines (
    entry_id      uuid NOT NULL,
    line_no       smallint NOT NULL CHECK (line_no >= 0),
    account_id    uuid NOT NULL,
    currency      char(3) NOT NULL,
    amount_micros bigint NOT NULL CHECK (amount_micros <> 0 AND abs(amount_micros) <= 9007199254740991),
    PRIMARY KEY (entry_id, line_no),
    -- One currency per entry: every line's currency is its entry's and its account's.
    FOREIGN KEY (entry_id, currency) REFERENCES journal_entries (id, currency),
    FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency)
);
CREATE INDEX journal_lines_account ON journal_lines (account_id);

-- Balance check, set-based, once per statement: every entry the statement
-- wrote (or wrote lines for) has two or more lines summing to zero. So an
-- entry and its lines must be written by one statement (a data-modifying CTE;
-- see ledger/sql/queries.sql), whose AFTER triggers run when it has finished.
CREATE FUNCTION ledger_unbalanced(entry_ids uuid[]) RETURNS text LANGUAGE sql STABLE AS $$
    -- One index probe per entry (LATERAL), never a scan of all lines.
    SELECT format('journal entry %s does not balance: %s lines summing to %s', e.id, s.line_count, s.total_micros)
      FROM unnest(entry_ids) AS e (id)
     CROSS JOIN LATERAL (
               SELECT count(*) AS line_count, coalesce(sum(l.amount_micros), 0) AS total_micros
                 FROM journal_lines l
                WHERE l.entry_id = e.id
           ) AS s
     WHERE s.line_count < 2 OR s.total_micros <> 0
     LIMIT 1
$$;

CREATE FUNCTION ledger_check_new_entries() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    problem text := ledger_unbalanced(ARRAY(SELECT id FROM new_entries));
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION ledger_check_new_lines() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    entry_ids uuid[] := ARRAY(SELECT DISTINCT entry_id FROM new_lines);
    problem text := ledger_unbalanced(entry_ids);
    old_entry uuid;
BEGIN
    -- Lines belong to an entry written in this transaction: a committed
    -- entry never changes, not even by balanced additions.
    SELECT e.id INTO old_entry
      FROM journal_entries e
     WHERE e.id = ANY (entry_ids) AND e.committed_at <> now()
     LIMIT 1;
    IF old_entry IS NOT NULL THEN
        RAISE EXCEPTION 'journal entry % is committed: lines cannot be added to it', old_entry
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER journal_entries_balanced AFTER INSERT ON journal_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT
    EXECUTE FUNCTION ledger_check_new_entries();
CREATE TRIGGER journal_lines_balanced AFTER INSERT ON journal_lines
    REFERENCING NEW TABLE AS new_lines FOR EACH STATEMENT
    EXECUTE FUNCTION ledger_check_new_lines();

-- Append-only: corrections are new entries (reversals), never edits.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_entries_no_truncate BEFORE TRUNCATE ON journal_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_lines_append_only BEFORE UPDATE OR DELETE ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_lines_no_truncate BEFORE TRUNCATE ON journal_lines
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER accounts_append_only BEFORE UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    scope      text NOT NULL CHECK (scope IN ('admin', 'debit', 'read')),
    -- sha256 of the secret; the secret itself is shown once and never stored.
    key_sha256 bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
