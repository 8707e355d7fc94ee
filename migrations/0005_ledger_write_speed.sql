-- The ledger's references, checked once per statement instead of once per row.
--
-- Migration 0001 checked them with foreign keys: a trigger call, a lookup and
-- a row lock for each entry (its wallet) and each line (its entry and its
-- account, in the line's currency), and then ran the balance check twice per
-- statement (once from each table's trigger) through a SQL function planned
-- anew at each call. Together they took more time than the inserts themselves.
--
-- The same guarantees now hold through the two statement-level AFTER INSERT
-- triggers, each reading its transition table with one join per check:
--
-- - journal_entries: each new entry names an existing wallet (foreign_key_violation)
--   and has at least one line by the end of its statement (check_violation).
-- - journal_lines: each new line names an existing entry and an existing
--   account, both in the line's currency (foreign_key_violation); the entry
--   was written in this transaction (insufficient_privilege); and the lines
--   the statement adds to each entry are two or more summing to zero
--   (check_violation).
--
-- Together: an entry's lines are the sum of balanced additions (every line of
-- a new entry is written by its own statement, since a line of an entry that
-- does not exist yet is refused), and it has at least one, so it has two or
-- more lines summing to zero, as before. Each refusal keeps the SQLSTATE the
-- foreign keys and the old triggers raised. (The balance message counts the
-- lines the statement wrote for the entry: for a new entry, all of them.)
--
-- A foreign key also kept the rows it references from going away; here the
-- referenced tables do it themselves: journal_entries already refuses UPDATE,
-- DELETE and TRUNCATE; accounts refused UPDATE and DELETE and now refuse
-- TRUNCATE; wallets now refuse DELETE, TRUNCATE and a change of id
-- (insufficient_privilege, like the other append-only refusals; a wallet
-- the service created could not be deleted before either: its account,
-- which cannot be deleted, names it).
-- A row a check saw can therefore never disappear, so the checks need no row
-- locks. The foreign key of a reversal to the entry it reverses stays: its
-- check returns at once for the entries that reverse nothing.

ALTER TABLE journal_lines DROP CONSTRAINT journal_lines_entry_id_currency_fkey;
ALTER TABLE journal_lines DROP CONSTRAINT journal_lines_account_id_currency_fkey;
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_wallet_id_fkey;
-- Only the lines' foreign key used it; the primary key already makes ids unique.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_id_currency_key;
-- One reversal per entry, as before, without an index entry for each of the
-- entries that reverse nothing (nearly all of them). Lookups by
-- reverses_entry_id = x imply IS NOT NULL, so they still use it.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_reverses_entry_id_key;
CREATE UNIQUE INDEX journal_entries_reverses_entry_id_key ON journal_entries (reverses_entry_id)
    WHERE reverses_entry_id IS NOT NULL;

-- Both check functions probe by index, one probe per new row, whatever the
-- statistics say: PL/pgSQL keeps a plan for the life of the connection, and a
-- plan made while the ledger was small (a hash join over a scan of the whole
-- table, or a scan per row) must not be used once it is large. LATERAL (...
-- LIMIT 1) keeps each lookup a parameterised probe, and enable_seqscan = off
-- makes that probe an index scan even on a table that was empty when planned.

CREATE OR REPLACE FUNCTION ledger_check_new_entries() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
DECLARE
    problem record;
BEGIN
    -- Per entry: a probe into wallets and one into the lines' primary key.
    SELECT e.id, e.wallet_id, w.found IS NULL AS wallet_missing INTO problem
      FROM new_entries e
      LEFT JOIN LATERAL (SELECT true AS found FROM wallets WHERE id = e.wallet_id LIMIT 1) w ON true
      LEFT JOIN LATERAL (SELECT true AS found FROM journal_lines WHERE entry_id = e.id LIMIT 1) l ON true
     WHERE w.found IS NULL OR l.found IS NULL
     ORDER BY w.found IS NULL DESC
     LIMIT 1;
    IF problem.id IS NULL THEN
        RETURN NULL;
    ELSIF problem.wallet_missing THEN
        RAISE EXCEPTION 'journal entry % names wallet %, which does not exist', problem.id, problem.wallet_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RAISE EXCEPTION 'journal entry % does not balance: 0 lines summing to 0', problem.id
        USING ERRCODE = 'check_violation';
END
$$;

CREATE OR REPLACE FUNCTION ledger_check_new_lines() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
DECLARE
    entry_problem record;
    account_problem record;
BEGIN
    -- Per entry (and currency) the statement wrote lines for: a probe into
    -- journal_entries. An entry with lines in two currencies has a group that
    -- differs from the entry's currency; otherwise its one group holds every
    -- line this statement added to it.
    SELECT g.entry_id, g.currency, g.line_count, g.total_micros,
           CASE WHEN e.id IS NULL OR e.currency <> g.currency THEN 1
                WHEN e.committed_at <> now() THEN 2
                ELSE 3 END AS rank
      INTO entry_problem
      FROM (SELECT l.entry_id, l.currency, count(*) AS line_count, sum(l.amount_micros) AS total_micros
              FROM new_lines l
             GROUP BY l.entry_id, l.currency) AS g
      LEFT JOIN LATERAL (
               SELECT id, currency, committed_at FROM journal_entries WHERE id = g.entry_id LIMIT 1
           ) AS e ON true
     WHERE e.id IS NULL OR e.currency <> g.currency OR e.committed_at <> now()
        OR g.line_count < 2 OR g.total_micros <> 0
     ORDER BY rank
     LIMIT 1;
    IF entry_problem.rank = 1 THEN
        RAISE EXCEPTION 'journal line names entry % in %, which does not exist in that currency',
            entry_problem.entry_id, entry_problem.currency
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    -- Per account (and currency) named: a probe into accounts.
    SELECT l.account_id, l.currency INTO account_problem
      FROM (SELECT DISTINCT account_id, currency FROM new_lines) AS l
      LEFT JOIN LATERAL (SELECT id, currency FROM accounts WHERE id = l.account_id LIMIT 1) AS a ON true
     WHERE a.id IS NULL OR a.currency <> l.currency
     LIMIT 1;
    IF account_problem.account_id IS NOT NULL THEN
        RAISE EXCEPTION 'journal line names account % in %, which does not exist in that currency',
            account_problem.account_id, account_problem.currency
            USING ERRCODE = 'foreign_key_violation';
    ELSIF entry_problem.rank = 2 THEN
        -- Lines belong to an entry written in this transaction: a committed
        -- entry never changes, not even by balanced additions.
        RAISE EXCEPTION 'journal entry % is committed: lines cannot be added to it', entry_problem.entry_id
            USING ERRCODE = 'insufficient_privilege';
    ELSIF entry_problem.rank = 3 THEN
        RAISE EXCEPTION 'journal entry % does not balance: % lines summing to %',
            entry_problem.entry_id, entry_problem.line_count, entry_problem.total_micros
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- No longer called: the triggers check balance from the statement's own lines.
DROP FUNCTION ledger_unbalanced(uuid[]);

-- What the references point at stays.
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();

CREATE FUNCTION ledger_refuse_wallet_removal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'wallets are never removed (the ledger names them): % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER wallets_never_removed BEFORE DELETE ON wallets
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_wallet_removal();
CREATE TRIGGER wallets_id_fixed BEFORE UPDATE OF id ON wallets
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION ledger_refuse_wallet_removal();
CREATE TRIGGER wallets_no_truncate BEFORE TRUNCATE ON wallets
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_wallet_removal();
