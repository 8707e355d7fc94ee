"""The Postgres ledger holds its own invariants: migrations apply once (also concurrently) and
refuse edits, the database refuses unbalanced, one-line, line-less, mixed-currency entries,
entries and lines naming a wallet, entry or account that does not exist, lines added to a
committed entry, any UPDATE, DELETE or TRUNCATE of journal tables and the removal of what they
name, and the repo, write_entries and the group-commit LedgerWriter write each entry once and
say what the ledger holds."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from conftest import RUN_ID, Stores, account_balance, create_database, drop_database

from centime.migrate import MigrationError, discover, migrate
from ledger import repo as ledger_repo
from ledger.accounts import credit_lines, debit_lines, reversal_id_for, reversal_of, system_account_id
from ledger.ids import uuid7
from ledger.schemas import EntryRecord, Line
from ledger.writer import (
    CommitFailed,
    Committed,
    KeyTaken,
    LedgerWriter,
    Outcome,
    is_definite_failure,
    write_entries,
)
from wallet import repo as wallet_repo

TIMEOUT_S = 10.0


# Fixtures and builders ---------------------------------------------------------


@pytest.fixture
async def conn(private_database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(private_database)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def empty_database(stores: Stores) -> AsyncIterator[str]:
    """A database with no schema at all, not even schema_migrations."""
    name = f"centime_empty_{RUN_ID}_{secrets.token_hex(3)}"
    url = await create_database(stores, name)
    try:
        yield url
    finally:
        await drop_database(stores, name)


async def make_wallet(conn: asyncpg.Connection, currency: str = "usd") -> uuid.UUID:
    wallet_id = uuid7()
    async with conn.transaction():
        row = await wallet_repo.insert_wallet(conn, wallet_id, f"owner-{secrets.token_hex(6)}", currency, 0)
        assert row is not None
        await ledger_repo.ensure_system_accounts(conn, currency)
        await ledger_repo.insert_wallet_account(conn, wallet_id, currency)
    return wallet_id


def debit(
    wallet_id: uuid.UUID,
    amount_micros: int = 100,
    *,
    key: str | None = "auto",
    currency: str = "usd",
    lines: Sequence[Line] | None = None,
    request_hash: str = "h",
) -> EntryRecord:
    return EntryRecord(
        id=uuid7(),
        kind="debit",
        currency=currency,
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        balance_micros=-amount_micros,
        idempotency_key=secrets.token_hex(8) if key == "auto" else key,
        request_hash=request_hash,
        description="test",
        metadata={"model": "m1"},
        created_at=datetime.now(UTC),
        lines=tuple(debit_lines(wallet_id, currency, amount_micros) if lines is None else lines),
    )


async def count(conn: asyncpg.Connection, table: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {table}")


# Migrations ------------------------------------------------------------------


async def test_migrations_apply_once_and_a_second_run_applies_nothing(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        expected = discover()
        assert expected, "there are migrations to apply"
        applied = await migrate(conn)
        assert [m.version for m in applied] == [m.version for m in expected]
        assert await migrate(conn) == []
        rows = await conn.fetch("SELECT version, name, sha256 FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"], r["sha256"]) for r in rows] == [
            (m.version, m.name, m.sha256) for m in expected
        ]
    finally:
        await conn.close()


async def test_the_template_database_is_fully_migrated(conn: asyncpg.Connection) -> None:
    assert await migrate(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(discover())


async def test_concurrent_migrations_apply_each_version_once(empty_database: str) -> None:
    first, second = await asyncio.gather(asyncpg.connect(empty_database), asyncpg.connect(empty_database))
    try:
        results = await asyncio.wait_for(asyncio.gather(migrate(first), migrate(second)), 60)
        applied = sorted(m.version for result in results for m in result)
        assert applied == [m.version for m in discover()]
        assert [] in results  # one run did everything, the other waited and found nothing to do
        rows = await first.fetch("SELECT version, count(*) AS n FROM schema_migrations GROUP BY version")
        assert {r["version"]: r["n"] for r in rows} == {m.version: 1 for m in discover()}
        # Both released the advisory lock: a third run does not block.
        assert await asyncio.wait_for(migrate(first), 10) == []
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_an_edited_migration_is_refused_and_the_lock_released(
    empty_database: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (x int);\n")
    (tmp_path / "0002_second.sql").write_text("CREATE TABLE second_table (x int);\n")
    conn = await asyncpg.connect(empty_database)
    other = await asyncpg.connect(empty_database)
    try:
        assert [m.version for m in await migrate(conn, tmp_path)] == [1, 2]

        (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (x bigint);\n")
        (tmp_path / "0003_third.sql").write_text("CREATE TABLE third_table (x int);\n")
        with pytest.raises(MigrationError, match=r"0001_first was edited"):
            await migrate(conn, tmp_path)
        # Refused before anything new was applied.
        assert await conn.fetchval("SELECT to_regclass('third_table')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 2

        # The failed run released its advisory lock: another session migrates at once.
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (x int);\n")
        applied = await asyncio.wait_for(migrate(other, tmp_path), 10)
        assert [m.version for m in applied] == [3]
    finally:
        await asyncio.gather(conn.close(), other.close())


async def test_a_failing_migration_leaves_no_trace(empty_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE good_table (x int);\n")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half_table (x int);\nSELECT no_such_column;\n")
    conn = await asyncpg.connect(empty_database)
    try:
        with pytest.raises(asyncpg.UndefinedColumnError):
            await migrate(conn, tmp_path)
        assert await conn.fetchval("SELECT to_regclass('good_table')") is not None
        assert await conn.fetchval("SELECT to_regclass('half_table')") is None
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [1]
    finally:
        await conn.close()


def test_discover_refuses_gaps_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        discover(tmp_path)
    (tmp_path / "0003_c.sql").unlink()
    (tmp_path / "2_Bad-Name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


# The database refuses broken entries ---------------------------------------------

_INSERT_ENTRY = """
INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, balance_micros,
                             idempotency_key, request_hash, created_at)
VALUES ($1, 'debit', $2, $3, 100, 0, $4, 'h', now())
"""


async def insert_raw(
    conn: asyncpg.Connection,
    wallet_id: uuid.UUID,
    lines: Sequence[tuple[uuid.UUID, str, int]],
    *,
    entry_currency: str = "usd",
) -> uuid.UUID:
    """One statement writing an entry and the given (account, currency, amount) lines."""
    entry_id = uuid7()
    await conn.execute(
        f"WITH e AS ({_INSERT_ENTRY} RETURNING id) "
        "INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros) "
        "SELECT $1, n - 1, l.account_id, l.currency, l.amount_micros "
        "FROM unnest($5::uuid[], $6::text[], $7::bigint[]) WITH ORDINALITY AS l (account_id, currency, amount_micros, n)",
        entry_id,
        entry_currency,
        wallet_id,
        secrets.token_hex(8),
        [account for account, _, _ in lines],
        [currency for _, currency, _ in lines],
        [amount for _, _, amount in lines],
    )
    return entry_id


async def test_a_balanced_raw_entry_is_accepted(conn: asyncpg.Connection) -> None:
    """The control for the refusals below: the same statement shape succeeds when balanced."""
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    entry_id = await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (revenue, "usd", -100)])
    assert await conn.fetchval("SELECT count(*) FROM journal_lines WHERE entry_id = $1", entry_id) == 2


async def test_unbalanced_entry_is_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    with pytest.raises(asyncpg.CheckViolationError, match=r"does not balance: 2 lines summing to 1"):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (revenue, "usd", -99)])
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        await ledger_repo.insert_entries(
            conn,
            [debit(wallet_id, lines=[Line(wallet_id, 100), Line(revenue, -101)])],
            timeout_s=TIMEOUT_S,
        )
    assert await count(conn, "journal_entries") == 0
    assert await count(conn, "journal_lines") == 0


async def test_entry_with_one_line_is_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    with pytest.raises(asyncpg.CheckViolationError, match=r"does not balance: 1 lines summing to 100"):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100)])
    assert await count(conn, "journal_entries") == 0


async def test_entry_with_no_lines_is_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    with pytest.raises(asyncpg.CheckViolationError, match=r"does not balance: 0 lines summing to 0"):
        await conn.execute(_INSERT_ENTRY, uuid7(), "usd", wallet_id, "k")
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance: 0 lines"):
        await ledger_repo.insert_entries(conn, [debit(wallet_id, lines=[])], timeout_s=TIMEOUT_S)
    assert await count(conn, "journal_entries") == 0


async def test_lines_in_two_currencies_are_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn, "usd")
    await ledger_repo.ensure_system_accounts(conn, "eur")
    revenue_eur = system_account_id("revenue", "eur")
    revenue_usd = system_account_id("revenue", "usd")
    # A line in another currency than its entry.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (revenue_eur, "eur", -100)])
    # A line claiming the entry's currency on an account of another currency.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (revenue_eur, "usd", -100)])
    # An eur entry touching the usd wallet account.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert_raw(
            conn, wallet_id, [(wallet_id, "eur", 100), (revenue_eur, "eur", -100)], entry_currency="eur"
        )
    assert await count(conn, "journal_entries") == 0
    # Control: the same wallet in its own currency is fine.
    await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (revenue_usd, "usd", -100)])


async def test_lines_that_unbalance_a_committed_entry_are_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    entry = debit(wallet_id)
    await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="is committed"):
        await conn.execute(
            "INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros) "
            "VALUES ($1, 2, $2, 'usd', 5)",
            entry.id,
            wallet_id,
        )


_INSERT_LINES = (
    "INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros) "
    "SELECT $1, $5::int + n - 1, l.account_id, l.currency, l.amount_micros "
    "FROM unnest($2::uuid[], $3::text[], $4::bigint[]) WITH ORDINALITY AS l (account_id, currency, amount_micros, n)"
)


async def insert_lines(
    conn: asyncpg.Connection,
    entry_id: uuid.UUID,
    lines: Sequence[tuple[uuid.UUID, str, int]],
    *,
    first_line_no: int = 0,
) -> None:
    """One statement adding the given (account, currency, amount) lines to an entry."""
    await conn.execute(
        _INSERT_LINES,
        entry_id,
        [account for account, _, _ in lines],
        [currency for _, currency, _ in lines],
        [amount for _, _, amount in lines],
        first_line_no,
    )


async def test_an_entry_for_a_wallet_that_does_not_exist_is_refused(conn: asyncpg.Connection) -> None:
    await make_wallet(conn)
    nobody = uuid7()
    revenue = system_account_id("revenue", "usd")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=rf"wallet {nobody}, which does not exist"):
        await insert_raw(conn, nobody, [(revenue, "usd", 100), (revenue, "usd", -100)])
    with pytest.raises(asyncpg.ForeignKeyViolationError) as raised:
        await write_entries(
            conn, [debit(nobody, lines=[Line(revenue, 1), Line(revenue, -1)])], timeout_s=TIMEOUT_S
        )
    assert is_definite_failure(raised.value)
    assert await count(conn, "journal_entries") == 0


async def test_lines_of_an_entry_that_does_not_exist_are_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    missing = uuid7()
    with pytest.raises(
        asyncpg.ForeignKeyViolationError, match=rf"entry {missing} in usd, which does not exist"
    ):
        await insert_lines(conn, missing, [(wallet_id, "usd", 100), (revenue, "usd", -100)])
    assert await count(conn, "journal_lines") == 0


async def test_lines_naming_an_account_that_does_not_exist_are_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    nowhere = uuid7()
    with pytest.raises(
        asyncpg.ForeignKeyViolationError, match=rf"account {nowhere} in usd, which does not exist"
    ):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 100), (nowhere, "usd", -100)])
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await ledger_repo.insert_entries(
            conn, [debit(wallet_id, lines=[Line(wallet_id, 5), Line(nowhere, -5)])], timeout_s=TIMEOUT_S
        )
    assert await count(conn, "journal_entries") == 0


async def test_balanced_lines_in_two_currencies_are_refused(conn: asyncpg.Connection) -> None:
    """Each currency's lines balance on their own; the entry still has one currency."""
    wallet_id = await make_wallet(conn, "usd")
    other_wallet = await make_wallet(conn, "eur")
    revenue_usd = system_account_id("revenue", "usd")
    revenue_eur = system_account_id("revenue", "eur")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="in eur, which does not exist"):
        await insert_raw(
            conn,
            wallet_id,
            [
                (wallet_id, "usd", 100),
                (revenue_usd, "usd", -100),
                (other_wallet, "eur", 7),
                (revenue_eur, "eur", -7),
            ],
        )
    assert await count(conn, "journal_entries") == 0


async def test_lines_added_to_an_entry_of_this_transaction_must_balance(conn: asyncpg.Connection) -> None:
    """Lines may follow their entry within its transaction (as before), but each
    statement's lines for an entry must balance: the entry stays balanced."""
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    entry = debit(wallet_id, 100)
    with pytest.raises(asyncpg.CheckViolationError, match=r"does not balance: 1 lines summing to 5"):
        async with conn.transaction():
            await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
            await insert_lines(conn, entry.id, [(wallet_id, "usd", 5)], first_line_no=2)
    assert await count(conn, "journal_entries") == 0

    async with conn.transaction():
        await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
        await insert_lines(conn, entry.id, [(wallet_id, "usd", 5), (revenue, "usd", -5)], first_line_no=2)
    assert await ledger_repo.unbalanced_entries(conn, 10) == []
    assert await ledger_repo.lines_total(conn) == (0, 4)


async def test_balanced_lines_cannot_be_added_to_a_committed_entry(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    entry = debit(wallet_id, 100)
    await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=rf"journal entry {entry.id} is committed"):
        await insert_lines(conn, entry.id, [(wallet_id, "usd", 5), (revenue, "usd", -5)], first_line_no=2)
    assert await ledger_repo.lines_total(conn) == (0, 2)


async def test_an_entry_is_reversed_at_most_once(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    original = debit(wallet_id, 100)
    reversal = reversal_of(original, reversal_id_for(original.id))
    second = EntryRecord(**{**_fields(reversal), "id": uuid7()})
    assert await ledger_repo.insert_entries(conn, [original, reversal], timeout_s=TIMEOUT_S) == {
        original.id,
        reversal.id,
    }
    # A second reversal of the same entry is skipped, like any conflicting entry.
    assert await ledger_repo.insert_entries(conn, [second], timeout_s=TIMEOUT_S) == set()
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(
            "INSERT INTO journal_entries (id, kind, currency, wallet_id, amount_micros, reverses_entry_id, created_at) "
            "VALUES ($1, 'reversal', 'usd', $2, 100, $3, now())",
            uuid7(),
            wallet_id,
            original.id,
        )
    # A reversal of an entry that does not exist is refused.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await ledger_repo.insert_entries(conn, [reversal_of(debit(wallet_id), uuid7())], timeout_s=TIMEOUT_S)


_NEVER_REMOVED = [
    ("DELETE FROM wallets", "DELETE"),
    ("UPDATE wallets SET id = gen_random_uuid()", "UPDATE"),
    ("TRUNCATE wallets CASCADE", "TRUNCATE"),
]


@pytest.mark.parametrize(("statement", "operation"), _NEVER_REMOVED)
async def test_wallets_are_never_removed(conn: asyncpg.Connection, statement: str, operation: str) -> None:
    """Entries name their wallet; with no foreign key, the wallet itself stays."""
    wallet_id = await make_wallet(conn)
    await ledger_repo.insert_entries(conn, [debit(wallet_id)], timeout_s=TIMEOUT_S)
    with pytest.raises(
        asyncpg.InsufficientPrivilegeError, match=rf"wallets are never removed.*{operation} refused"
    ):
        await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM wallets WHERE id = $1", wallet_id) == 1
    # Other updates of a wallet go on as before.
    assert await conn.execute("UPDATE wallets SET status = 'frozen' WHERE id = $1", wallet_id) == "UPDATE 1"


async def test_accounts_cannot_be_truncated(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    await ledger_repo.insert_entries(conn, [debit(wallet_id)], timeout_s=TIMEOUT_S)
    with pytest.raises(
        asyncpg.InsufficientPrivilegeError, match="ledger table accounts is append-only: TRUNCATE"
    ):
        await conn.execute("TRUNCATE accounts CASCADE")
    assert await count(conn, "accounts") == 1 + 6


async def test_zero_and_out_of_bound_amounts_are_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    revenue = system_account_id("revenue", "usd")
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", 0), (revenue, "usd", 0)])
    too_big = 2**53
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_raw(conn, wallet_id, [(wallet_id, "usd", too_big), (revenue, "usd", -too_big)])
    with pytest.raises(asyncpg.CheckViolationError):
        await ledger_repo.insert_entries(conn, [debit(wallet_id, too_big)], timeout_s=TIMEOUT_S)


_APPEND_ONLY = [
    ("UPDATE journal_entries SET description = 'edited'", "journal_entries", "UPDATE"),
    ("DELETE FROM journal_entries", "journal_entries", "DELETE"),
    ("TRUNCATE journal_entries CASCADE", "journal_entries", "TRUNCATE"),
    ("UPDATE journal_lines SET amount_micros = amount_micros * 2", "journal_lines", "UPDATE"),
    ("DELETE FROM journal_lines", "journal_lines", "DELETE"),
    ("TRUNCATE journal_lines", "journal_lines", "TRUNCATE"),
    ("UPDATE accounts SET currency = 'eur'", "accounts", "UPDATE"),
    ("DELETE FROM accounts WHERE kind = 'wallet'", "accounts", "DELETE"),
]


@pytest.mark.parametrize(("statement", "table", "operation"), _APPEND_ONLY)
async def test_ledger_tables_are_append_only(
    conn: asyncpg.Connection, statement: str, table: str, operation: str
) -> None:
    wallet_id = await make_wallet(conn)
    await ledger_repo.insert_entries(conn, [debit(wallet_id), debit(wallet_id)], timeout_s=TIMEOUT_S)
    before = await conn.fetch("SELECT * FROM journal_lines ORDER BY entry_id, line_no")
    with pytest.raises(
        asyncpg.InsufficientPrivilegeError, match=rf"ledger table {table} is append-only: {operation} refused"
    ):
        await conn.execute(statement)
    assert await conn.fetch("SELECT * FROM journal_lines ORDER BY entry_id, line_no") == before
    assert await count(conn, "journal_entries") == 2


async def test_plain_truncate_of_journal_entries_is_refused(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    await ledger_repo.insert_entries(conn, [debit(wallet_id)], timeout_s=TIMEOUT_S)
    with pytest.raises(asyncpg.PostgresError):
        await conn.execute("TRUNCATE journal_entries")
    assert await count(conn, "journal_entries") == 1


# ledger.repo.insert_entries ------------------------------------------------------


async def test_insert_entries_skips_known_ids_and_taken_keys(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    other_wallet = await make_wallet(conn)
    first = debit(wallet_id, 100, key="k1")
    assert await ledger_repo.insert_entries(conn, [first], timeout_s=TIMEOUT_S) == {first.id}

    same_key = debit(wallet_id, 7, key="k1")
    fresh = debit(wallet_id, 5, key="k2")
    same_key_other_wallet = debit(other_wallet, 9, key="k1")
    no_key = debit(wallet_id, 3, key=None)
    written = await ledger_repo.insert_entries(
        conn, [first, same_key, fresh, same_key_other_wallet, no_key], timeout_s=TIMEOUT_S
    )
    assert written == {fresh.id, same_key_other_wallet.id, no_key.id}
    # The skipped entry left no row and no lines.
    assert await conn.fetchval("SELECT count(*) FROM journal_entries WHERE id = $1", same_key.id) == 0
    assert await conn.fetchval("SELECT count(*) FROM journal_lines WHERE entry_id = $1", same_key.id) == 0
    assert await count(conn, "journal_entries") == 4
    assert await count(conn, "journal_lines") == 8
    assert await ledger_repo.lines_total(conn) == (0, 8)
    assert await account_balance(conn, wallet_id) == -(100 + 5 + 3)
    assert await ledger_repo.unbalanced_entries(conn, 10) == []


async def test_insert_entries_skips_a_duplicate_key_within_one_batch(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    a = debit(wallet_id, 10, key="dup")
    b = debit(wallet_id, 20, key="dup")
    written = await ledger_repo.insert_entries(conn, [a, b], timeout_s=TIMEOUT_S)
    assert written == {a.id}
    assert await account_balance(conn, wallet_id) == -10
    assert await ledger_repo.lines_total(conn) == (0, 2)


async def test_insert_entries_in_a_transaction_skips_known_entries_and_keeps_it_usable(
    conn: asyncpg.Connection,
) -> None:
    # Outside a transaction a batch is tried plainly first and again on a
    # unique violation; inside one, that failure would abort the caller's
    # transaction, so only the skipping form may run there.
    wallet_id = await make_wallet(conn)
    first = debit(wallet_id, 100, key="k1")
    async with conn.transaction():
        assert await ledger_repo.insert_entries(conn, [first], timeout_s=TIMEOUT_S) == {first.id}
        same_key, fresh = debit(wallet_id, 7, key="k1"), debit(wallet_id, 5, key="k2")
        written = await ledger_repo.insert_entries(conn, [first, same_key, fresh], timeout_s=TIMEOUT_S)
        assert written == {fresh.id}
        assert (
            await conn.fetchval("SELECT count(*) FROM journal_entries WHERE wallet_id = $1", wallet_id) == 2
        )
    assert await account_balance(conn, wallet_id) == -105


async def test_insert_entries_round_trips_every_field(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    entry = debit(wallet_id, 1234, key="k")
    await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
    stored = (await ledger_repo.entries_by_id(conn, [entry.id]))[entry.id]
    # entries_by_id does not load lines; everything else must come back unchanged.
    assert stored == EntryRecord(**{**_fields(entry), "lines": ()})


def _fields(entry: EntryRecord) -> dict[str, object]:
    return {name: getattr(entry, name) for name in entry.__struct_fields__}


async def test_a_reversal_may_carry_its_originals_key(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    original = debit(wallet_id, 100, key="k")
    reversal = reversal_of(original, reversal_id_for(original.id))
    written = await ledger_repo.insert_entries(conn, [original, reversal], timeout_s=TIMEOUT_S)
    assert written == {original.id, reversal.id}
    assert await account_balance(conn, wallet_id) == 0
    assert await ledger_repo.mismatched_reversals(conn, 10) == []


async def test_credit_lines_raise_the_wallet_balance(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    credit = EntryRecord(
        **{**_fields(debit(wallet_id, 500)), "kind": "credit", "lines": credit_lines(wallet_id, "usd", 500)}
    )
    await ledger_repo.insert_entries(conn, [credit], timeout_s=TIMEOUT_S)
    assert await account_balance(conn, wallet_id) == 500
    assert await account_balance(conn, system_account_id("promotions", "usd")) == -500


# ledger.writer.write_entries -------------------------------------------------------


async def test_write_entries_says_what_the_ledger_holds(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    first = debit(wallet_id, 100, key="k", request_hash="h1")
    assert await write_entries(conn, [first], timeout_s=TIMEOUT_S) == [Committed(first.id, written=True)]
    assert await write_entries(conn, [first], timeout_s=TIMEOUT_S) == [Committed(first.id, written=False)]

    retry = debit(wallet_id, 100, key="k", request_hash="h1")
    fresh = debit(wallet_id, 1, key="other")
    outcomes = await write_entries(conn, [retry, fresh], timeout_s=TIMEOUT_S)
    assert outcomes[1] == Committed(fresh.id, written=True)
    taken = outcomes[0]
    assert isinstance(taken, KeyTaken)
    assert taken.holder.entry.id == first.id
    assert taken.holder.entry.request_hash == "h1"
    assert taken.holder.entry.amount_micros == 100
    assert taken.holder.reversed_by is None

    reversal = reversal_of(first, reversal_id_for(first.id))
    assert await write_entries(conn, [reversal], timeout_s=TIMEOUT_S) == [
        Committed(reversal.id, written=True)
    ]
    (after_reversal,) = await write_entries(conn, [retry], timeout_s=TIMEOUT_S)
    assert isinstance(after_reversal, KeyTaken)
    assert after_reversal.holder.entry.id == first.id
    assert after_reversal.holder.reversed_by == reversal.id


async def test_write_entries_raises_a_definite_error_for_a_broken_batch(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    good = debit(wallet_id, 10)
    broken = debit(wallet_id, 10, lines=[Line(wallet_id, 10)])
    with pytest.raises(asyncpg.CheckViolationError) as raised:
        await write_entries(conn, [good, broken], timeout_s=TIMEOUT_S)
    assert is_definite_failure(raised.value)
    assert await count(conn, "journal_entries") == 0  # one statement: the good entry is not in either


def test_is_definite_failure_tells_answers_from_silence() -> None:
    assert is_definite_failure(asyncpg.CheckViolationError("x"))
    assert is_definite_failure(asyncpg.UniqueViolationError("x"))
    assert not is_definite_failure(asyncpg.AdminShutdownError("x"))  # 57P01
    assert not is_definite_failure(asyncpg.ConnectionDoesNotExistError("x"))  # 08003
    assert not is_definite_failure(TimeoutError())
    assert not is_definite_failure(OSError("reset"))


# ledger.writer.LedgerWriter --------------------------------------------------------


async def test_writer_group_commits_many_concurrent_submits(
    private_database: str, conn: asyncpg.Connection
) -> None:
    wallets = [await make_wallet(conn) for _ in range(4)]
    entries = [debit(wallets[n % 4], 1 + n) for n in range(200)]
    batches: list[int] = []
    connects = 0

    async def connect() -> asyncpg.Connection:
        nonlocal connects
        connects += 1
        return await asyncpg.connect(private_database)

    writer = LedgerWriter(
        connect, batch_entries_max=16, connections=2, timeout_s=TIMEOUT_S, observe_batch=batches.append
    )
    writer.start()
    try:
        futures = [writer.submit(entry) for entry in entries]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert outcomes == [Committed(entry.id, written=True) for entry in entries]
        assert sum(batches) == 200
        # 200 queued at once is a backlog: each worker takes an equal share
        # (100), not batch_entries_max.
        assert max(batches) <= 100
        assert any(size > 16 for size in batches)
        assert len(batches) < 200  # grouped, not one statement per entry
        assert connects == 2  # each worker keeps its connection

        again = await asyncio.wait_for(asyncio.gather(*[writer.submit(e) for e in entries[:20]]), 30)
        assert again == [Committed(entry.id, written=False) for entry in entries[:20]]
        # No backlog (20 waiting, 2 workers): batches stay within batch_entries_max.
        batches.clear()
        await asyncio.wait_for(asyncio.gather(*[writer.submit(e) for e in entries[20:40]]), 30)
        assert sum(batches) == 20
        assert max(batches) <= 16
    finally:
        await writer.stop()
    assert await count(conn, "journal_entries") == 200
    assert await ledger_repo.lines_total(conn) == (0, 400)
    assert sum([await account_balance(conn, w) for w in wallets]) == -sum(range(1, 201))


async def test_writer_hands_outcomes_to_the_after_commit_hook(
    private_database: str, conn: asyncpg.Connection
) -> None:
    wallet_id = await make_wallet(conn)
    seen: list[tuple[list[uuid.UUID], list[Outcome]]] = []

    async def after_commit(
        batch: Sequence[EntryRecord], outcomes: list[Outcome]
    ) -> list[tuple[str, uuid.UUID]]:
        seen.append(([e.id for e in batch], list(outcomes)))
        return [("cleared", e.id) for e in batch]

    writer: LedgerWriter[tuple[str, uuid.UUID]] = LedgerWriter(
        lambda: asyncpg.connect(private_database),
        batch_entries_max=8,
        connections=1,
        timeout_s=TIMEOUT_S,
    )
    writer.start(after_commit=after_commit)
    try:
        entries = [debit(wallet_id, 1) for _ in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*[writer.submit(e) for e in entries]), 30)
    finally:
        await writer.stop()
    assert results == [("cleared", e.id) for e in entries]
    assert [entry_id for ids, _ in seen for entry_id in ids] == [e.id for e in entries]
    assert all(isinstance(o, Committed) and o.written for _, outcomes in seen for o in outcomes)


async def test_writer_reports_a_failed_connect_as_definite() -> None:
    attempts = 0

    async def connect() -> asyncpg.Connection:
        nonlocal attempts
        attempts += 1
        raise OSError("connection refused")

    writer = LedgerWriter(connect, batch_entries_max=4, connections=1, timeout_s=1.0)
    writer.start()
    try:
        wallet_id = uuid7()
        futures = [writer.submit(debit(wallet_id)) for _ in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    finally:
        await writer.stop()
    assert all(isinstance(r, CommitFailed) and r.definite for r in results), results
    assert "cannot connect" in str(results[0])
    assert attempts >= 1


async def test_writer_reports_a_refused_batch_as_definite(
    private_database: str, conn: asyncpg.Connection
) -> None:
    wallet_id = await make_wallet(conn)
    writer = LedgerWriter(
        lambda: asyncpg.connect(private_database), batch_entries_max=4, connections=1, timeout_s=TIMEOUT_S
    )
    writer.start()
    try:
        broken = writer.submit(debit(wallet_id, lines=[Line(wallet_id, 5)]))
        with pytest.raises(CommitFailed) as raised:
            await asyncio.wait_for(broken, 10)
        assert raised.value.definite
        # The worker survives a refused batch and writes the next one.
        good = debit(wallet_id)
        assert await asyncio.wait_for(writer.submit(good), 10) == Committed(good.id, written=True)
    finally:
        await writer.stop()


async def test_writer_stop_fails_what_is_still_queued() -> None:
    writer = LedgerWriter(
        lambda: asyncpg.connect("postgresql://unused"), batch_entries_max=4, connections=1, timeout_s=1
    )
    future = writer.submit(debit(uuid7()))  # never started: nothing takes it
    await writer.stop()
    with pytest.raises(CommitFailed) as raised:
        await future
    assert raised.value.definite


async def test_writer_one_refused_entry_does_not_fail_its_batch_mates(
    private_database: str, conn: asyncpg.Connection
) -> None:
    wallet_id = await make_wallet(conn)
    gate = asyncio.Event()

    async def connect() -> asyncpg.Connection:
        await gate.wait()  # let all three queue up, so they form one batch
        return await asyncpg.connect(private_database)

    writer = LedgerWriter(connect, batch_entries_max=8, connections=1, timeout_s=TIMEOUT_S)
    writer.start()
    try:
        good = [debit(wallet_id, 1), debit(wallet_id, 2)]
        poison = EntryRecord(**{**_fields(debit(wallet_id, 3)), "metadata": {"note": "a\x00b"}})
        futures = [writer.submit(good[0]), writer.submit(poison), writer.submit(good[1])]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    finally:
        await writer.stop()
    assert isinstance(results[1], CommitFailed) and results[1].definite
    assert results[0] == Committed(good[0].id, written=True)
    assert results[2] == Committed(good[1].id, written=True)


async def test_writer_stop_settles_the_batch_in_flight() -> None:
    connecting = asyncio.Event()

    async def connect() -> asyncpg.Connection:
        connecting.set()
        await asyncio.Event().wait()  # Postgres never answers
        raise AssertionError("unreachable")

    writer = LedgerWriter(connect, batch_entries_max=4, connections=1, timeout_s=30)
    writer.start()
    future = writer.submit(debit(uuid7()))
    await asyncio.wait_for(connecting.wait(), 5)  # the worker has taken the batch
    await writer.stop()
    assert future.done()
    with pytest.raises(CommitFailed) as raised:
        future.result()
    assert not raised.value.definite  # cancelled mid-write: the outcome is unknown


async def test_lines_cannot_be_added_to_a_committed_entry(conn: asyncpg.Connection) -> None:
    wallet_id = await make_wallet(conn)
    entry = debit(wallet_id, 100)
    await ledger_repo.insert_entries(conn, [entry], timeout_s=TIMEOUT_S)
    revenue = system_account_id("revenue", "usd")
    with pytest.raises(asyncpg.PostgresError):
        await conn.execute(
            "INSERT INTO journal_lines (entry_id, line_no, account_id, currency, amount_micros) "
            "VALUES ($1, 2, $2, 'usd', 5000), ($1, 3, $3, 'usd', -5000)",
            entry.id,
            wallet_id,
            revenue,
        )
    assert await account_balance(conn, wallet_id) == -100
