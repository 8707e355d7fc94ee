"""Postgres-first wallet changes (top-ups, refunds, disputes) reach Redis after their commit exactly once
and in order, on real Postgres and Redis: apply_changes.lua applies each numbered change once, skips
what it applied and stops at a gap; write_change numbers changes under the wallet's row lock in the
caller's transaction and writes nothing for a replayed Stripe key; apply_changes and the sweeper's
drain_changes apply every committed change once under concurrent appliers and writers, a lost Redis
hash, a writer that died before Redis, and a rebuilt cache, leaving Redis equal to the ledger."""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from conftest import HARNESS_PARTITIONS, Harness, account_balance

import wallet.changes as changes_module
from centime.errors import InvariantViolation
from centime.money import AMOUNT_MICROS_MAX
from ledger import repo as ledger_repo
from ledger.accounts import (
    dispute_lost_lines,
    dispute_opened_lines,
    dispute_won_lines,
    topup_lines,
    topup_refund_lines,
)
from ledger.ids import uuid7
from ledger.schemas import EntryKind, EntryRecord
from wallet import maintenance
from wallet import repo as wallet_repo
from wallet.cache import Cache, CachedWallet, WalletChange
from wallet.changes import (
    CHANGES_BATCH_MAX,
    apply_changes,
    drain_changes,
    load_from_ledger,
    write_change,
)
from wallet.maintenance import check, rebuild_cache

PARTITIONS = HARNESS_PARTITIONS
CURRENCY = "usd"
TIMEOUT_S = 5.0
MANY_CHANGES = 250
"""More than two of apply_changes' batches."""
assert MANY_CHANGES > 2 * CHANGES_BATCH_MAX


# Fixtures and helpers ---------------------------------------------------------------


async def cached_wallet(
    cache: Cache,
    *,
    balance_micros: int = 0,
    overdraft_limit_micros: int = 0,
    status: str = "active",
    change_seq: int = 0,
) -> uuid.UUID:
    wallet_id = uuid.uuid4()
    wallet = CachedWallet(balance_micros, overdraft_limit_micros, status, CURRENCY, change_seq)
    assert await cache.load_wallet(wallet_id, wallet, overwrite=False) is True
    return wallet_id


async def hash_of(cache: Cache, wallet_id: uuid.UUID) -> dict[str, str]:
    raw = await cache.client.hgetall(cache.wallet_key(wallet_id))
    return {key.decode(): value.decode() for key, value in raw.items()}


async def redis_balance(cache: Cache, wallet_id: uuid.UUID) -> int:
    cached = await cache.wallet(wallet_id)
    assert cached is not None
    return cached.balance_micros


async def redis_q(cache: Cache, wallet_id: uuid.UUID) -> int | None:
    value = await cache.client.hget(cache.wallet_key(wallet_id), "q")
    return None if value is None else int(value)


async def applied_seq(cache: Cache, wallet_id: uuid.UUID, batch: list[WalletChange]) -> int | None:
    """The last change Redis has applied after this batch (None: wallet absent)."""
    result = await cache.apply_changes(wallet_id, batch)
    return None if result is None else result[1]


def changes(*items: tuple[int, int] | tuple[int, int, str]) -> list[WalletChange]:
    return [WalletChange(item[0], item[1], item[2] if len(item) == 3 else None) for item in items]


async def new_wallet(h: Harness, *, overdraft_limit_micros: int = 0, load: bool = True) -> uuid.UUID:
    """A wallet as Wallets.create_wallet makes it: row, ledger account, Redis hash (unless `load` is off)."""
    wallet_id = uuid7()
    async with h.pool.acquire() as conn, conn.transaction():
        row = await wallet_repo.insert_wallet(
            conn, wallet_id, f"owner-{secrets.token_hex(6)}", CURRENCY, overdraft_limit_micros
        )
        assert row is not None
        await ledger_repo.ensure_system_accounts(conn, CURRENCY)
        await ledger_repo.insert_wallet_account(conn, wallet_id, CURRENCY)
    if load:
        async with h.pool.acquire() as conn:
            assert await load_from_ledger(conn, h.cache, wallet_id, overwrite=False) is not None
    return wallet_id


def stripe_entry(
    wallet_id: uuid.UUID,
    kind: EntryKind,
    amount_micros: int,
    *,
    key: str | None = None,
    entry_id: uuid.UUID | None = None,
    fee_micros: int = 0,
) -> EntryRecord:
    """An entry as topup/service.py writes it: Stripe origin, a Stripe key, no balance after."""
    if kind == "topup":
        lines = topup_lines(wallet_id, CURRENCY, amount_micros, fee_micros)
    elif kind == "topup_refund":
        lines = topup_refund_lines(wallet_id, CURRENCY, amount_micros)
    elif kind == "dispute_opened":
        lines = dispute_opened_lines(wallet_id, CURRENCY, amount_micros)
    elif kind == "dispute_won":
        lines = dispute_won_lines(wallet_id, CURRENCY, amount_micros)
    else:
        assert kind == "dispute_lost"
        lines = dispute_lost_lines(CURRENCY, amount_micros)
    object_id = f"ch_{secrets.token_hex(8)}"
    return EntryRecord(
        id=entry_id or uuid7(),
        kind=kind,
        currency=CURRENCY,
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        balance_micros=None,
        idempotency_key=key or f"{kind}:{object_id}",
        request_hash=None,
        description=f"test {kind}",
        metadata={},
        created_at=datetime.now(UTC),
        stripe_object_id=object_id,
        lines=lines,
    )


async def write(h: Harness, entry: EntryRecord, *, status: str | None = None) -> bool:
    """write_change in a transaction of its own, committed on return."""
    async with h.pool.acquire() as conn, conn.transaction():
        return await write_change(conn, entry, status=status, timeout_s=TIMEOUT_S)


async def write_topups(h: Harness, wallet_id: uuid.UUID, amounts_micros: list[int]) -> None:
    """Many changes in one transaction: positive amounts top up, negative ones refund."""
    async with h.pool.acquire() as conn, conn.transaction():
        for amount in amounts_micros:
            kind: EntryKind = "topup" if amount > 0 else "topup_refund"
            entry = stripe_entry(wallet_id, kind, abs(amount))
            assert await write_change(conn, entry, status=None, timeout_s=TIMEOUT_S)


async def ledger_balance(h: Harness, wallet_id: uuid.UUID) -> int:
    async with h.pool.acquire() as conn:
        return await account_balance(conn, wallet_id)


async def wallet_state(h: Harness, wallet_id: uuid.UUID) -> tuple[int, str]:
    """(wallets.change_seq, wallets.status)."""
    async with h.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT change_seq, status FROM wallets WHERE id = $1", wallet_id)
    return row["change_seq"], row["status"]


async def change_rows(h: Harness, wallet_id: uuid.UUID) -> list[asyncpg.Record]:
    async with h.pool.acquire() as conn:
        return await conn.fetch(
            "SELECT seq, delta_micros, status, entry_id FROM wallet_changes WHERE wallet_id = $1 ORDER BY seq",
            wallet_id,
        )


async def assert_in_step(h: Harness, wallet_id: uuid.UUID, *, expected_micros: int) -> None:
    """Quiescent: Redis equals the ledger, has applied every change, and none waits."""
    _, status = await wallet_state(h, wallet_id)
    assert await ledger_balance(h, wallet_id) == expected_micros
    assert await redis_balance(h.cache, wallet_id) == expected_micros
    assert await redis_q(h.cache, wallet_id) == (await wallet_state(h, wallet_id))[0]
    assert (await h.cache.wallet(wallet_id)).status == status  # type: ignore[union-attr]
    assert await change_rows(h, wallet_id) == []


# apply_changes.lua ------------------------------------------------------------------


async def test_script_applies_each_change_once_in_order(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=1_000)
    batch = changes((1, 500), (2, -200), (3, 7))
    assert await applied_seq(cache, wallet_id, batch) == 3
    assert await redis_balance(cache, wallet_id) == 1_307
    assert await redis_q(cache, wallet_id) == 3
    before = await hash_of(cache, wallet_id)
    for _ in range(3):  # a replayed batch, however often: nothing
        assert await applied_seq(cache, wallet_id, batch) == 3
    assert await hash_of(cache, wallet_id) == before
    # A batch that overlaps what is applied: only the new tail counts.
    assert await applied_seq(cache, wallet_id, changes((2, -200), (3, 7), (4, 1_000))) == 4
    assert await redis_balance(cache, wallet_id) == 2_307
    assert await redis_q(cache, wallet_id) == 4


async def test_script_stops_at_a_gap_until_it_is_filled(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=0)
    assert await applied_seq(cache, wallet_id, changes((1, 10), (2, 20), (4, 40), (5, 50))) == 2
    assert await redis_balance(cache, wallet_id) == 30
    assert await redis_q(cache, wallet_id) == 2
    # A batch wholly beyond the gap: nothing, not even in part.
    before = await hash_of(cache, wallet_id)
    assert await applied_seq(cache, wallet_id, changes((4, 40), (5, 50))) == 2
    assert await hash_of(cache, wallet_id) == before
    # The gap filled: the rest applies, each once.
    assert await applied_seq(cache, wallet_id, changes((1, 10), (2, 20), (3, 30), (4, 40), (5, 50))) == 5
    assert await redis_balance(cache, wallet_id) == 150
    assert await redis_q(cache, wallet_id) == 5


async def test_script_skips_changes_already_applied(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=100, change_seq=7)
    assert await redis_q(cache, wallet_id) == 7  # load_wallet.lua writes q
    # 6 and 7 are in the loaded balance already; only 8 applies.
    assert await applied_seq(cache, wallet_id, changes((6, 1_000), (7, 1_000), (8, 5))) == 8
    assert await redis_balance(cache, wallet_id) == 105
    assert await applied_seq(cache, wallet_id, changes((1, 1_000), (8, 5))) == 8
    assert await redis_balance(cache, wallet_id) == 105


async def test_script_sets_the_status_only_when_given(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=1_000)
    assert await applied_seq(cache, wallet_id, changes((1, -400, "frozen"))) == 1
    assert (await hash_of(cache, wallet_id))["s"] == "frozen"
    assert await applied_seq(cache, wallet_id, changes((2, 50))) == 2  # '' leaves it alone
    assert (await hash_of(cache, wallet_id))["s"] == "frozen"
    assert await applied_seq(cache, wallet_id, changes((3, 400, "active"), (4, -1))) == 4
    wallet = await cache.wallet(wallet_id)
    assert wallet == CachedWallet(1_049, 0, "active", CURRENCY)
    # Statuses apply in order within one batch: the last one given wins.
    assert await applied_seq(cache, wallet_id, changes((5, 0, "frozen"), (6, 0, "active"), (7, 0))) == 7
    assert (await hash_of(cache, wallet_id))["s"] == "active"


async def test_script_claws_back_below_the_overdraft_limit(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=100, overdraft_limit_micros=50)
    assert await applied_seq(cache, wallet_id, changes((1, -1_000, "frozen"))) == 1
    assert await redis_balance(cache, wallet_id) == -900  # below -overdraft: a clawback may
    assert await applied_seq(cache, wallet_id, changes((2, -(AMOUNT_MICROS_MAX - 1_000)))) == 2
    assert await redis_balance(cache, wallet_id) == -AMOUNT_MICROS_MAX + 100


async def test_script_is_exact_at_the_bound(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=AMOUNT_MICROS_MAX - 5)
    assert await applied_seq(cache, wallet_id, changes((1, 5))) == 1
    assert await redis_balance(cache, wallet_id) == AMOUNT_MICROS_MAX
    assert await applied_seq(cache, wallet_id, changes((2, -AMOUNT_MICROS_MAX), (3, 1))) == 3
    assert await redis_balance(cache, wallet_id) == 1


async def test_script_answers_missing_for_an_absent_or_partial_hash(cache: Cache) -> None:
    absent = uuid.uuid4()
    assert await applied_seq(cache, absent, changes((1, 100))) is None
    assert await cache.client.exists(cache.wallet_key(absent)) == 0  # wrote nothing
    for dropped in ("b", "o", "s", "c", "e"):
        wallet_id = await cached_wallet(cache, balance_micros=10)
        await cache.client.hdel(cache.wallet_key(wallet_id), dropped)
        before = await hash_of(cache, wallet_id)
        assert await applied_seq(cache, wallet_id, changes((1, 100, "frozen"))) is None, dropped
        assert await hash_of(cache, wallet_id) == before, dropped


async def test_script_counts_a_hash_without_q_as_none_applied(cache: Cache) -> None:
    """A wallet loaded before changes existed has no q: its first change is 1."""
    wallet_id = await cached_wallet(cache, balance_micros=10)
    await cache.client.hdel(cache.wallet_key(wallet_id), "q")
    assert await redis_q(cache, wallet_id) is None
    assert await applied_seq(cache, wallet_id, changes((2, 100))) == 0  # a gap from 0
    assert await redis_q(cache, wallet_id) is None
    assert await applied_seq(cache, wallet_id, changes((1, 1), (2, 100))) == 2
    assert await redis_balance(cache, wallet_id) == 111
    assert await redis_q(cache, wallet_id) == 2


# write_change -------------------------------------------------------------------------


async def test_write_change_numbers_each_change_with_the_wallet_delta(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    topup = stripe_entry(wallet_id, "topup", 10_000_000, fee_micros=320_000)
    refund = stripe_entry(wallet_id, "topup_refund", 2_000_000)
    opened = stripe_entry(wallet_id, "dispute_opened", 3_000_000)
    lost = stripe_entry(wallet_id, "dispute_lost", 3_000_000)
    assert await write(h, topup) is True
    assert await write(h, refund) is True
    assert await write(h, opened, status="frozen") is True
    assert await wallet_state(h, wallet_id) == (3, "frozen")
    assert await write(h, lost, status="active") is True
    rows = [tuple(row) for row in await change_rows(h, wallet_id)]
    assert rows == [
        (1, 10_000_000, None, topup.id),  # the gross: the wallet line, negated, not Stripe's net
        (2, -2_000_000, None, refund.id),
        (3, -3_000_000, "frozen", opened.id),
        (4, 0, "active", lost.id),  # no wallet line: only the status moves
    ]
    assert await wallet_state(h, wallet_id) == (4, "active")
    assert await ledger_balance(h, wallet_id) == sum(row[1] for row in rows) == 5_000_000
    assert await redis_balance(h.cache, wallet_id) == 0  # Postgres first: Redis waits for apply


async def test_write_change_writes_nothing_for_a_replayed_stripe_key(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    first = stripe_entry(wallet_id, "dispute_opened", 700, key="dispute:dp_1:opened")
    assert await write(h, first, status="frozen") is True
    won = stripe_entry(wallet_id, "dispute_won", 700, key="dispute:dp_1:won")
    assert await write(h, won, status="active") is True
    assert await wallet_state(h, wallet_id) == (2, "active")
    # The same Stripe key under a new entry id (a redelivered event), and the same entry again.
    again = stripe_entry(wallet_id, "dispute_opened", 700, key="dispute:dp_1:opened")
    assert again.id != first.id
    assert await write(h, again, status="frozen") is False
    assert await write(h, first, status="frozen") is False
    assert await wallet_state(h, wallet_id) == (2, "active")  # no seq bump, no status change
    assert [row["seq"] for row in await change_rows(h, wallet_id)] == [1, 2]
    async with h.pool.acquire() as conn:
        entries = await ledger_repo.wallet_entries_page(conn, wallet_id, None, 10)
    assert {e.id for e in entries} == {first.id, won.id}
    assert await ledger_balance(h, wallet_id) == 0


async def test_concurrent_writes_of_one_stripe_key_write_once(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)

    async def deliver() -> bool:
        async with h.pool.acquire() as conn, conn.transaction():
            written = await write_change(
                conn,
                stripe_entry(wallet_id, "topup", 1_000, key="topup:once"),
                status=None,
                timeout_s=TIMEOUT_S,
            )
            await asyncio.sleep(0.02)  # hold the key while the others arrive
            return written

    assert sorted(await asyncio.gather(*(deliver() for _ in range(6)))) == [False] * 5 + [True]
    assert await wallet_state(h, wallet_id) == (1, "active")
    assert len(await change_rows(h, wallet_id)) == 1
    await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    await assert_in_step(h, wallet_id, expected_micros=1_000)


async def test_write_change_refuses_to_run_outside_a_transaction(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    async with h.pool.acquire() as conn:
        with pytest.raises(InvariantViolation):
            await write_change(conn, stripe_entry(wallet_id, "topup", 100), status=None, timeout_s=TIMEOUT_S)
    assert await wallet_state(h, wallet_id) == (0, "active")
    assert await change_rows(h, wallet_id) == []
    assert await ledger_balance(h, wallet_id) == 0


async def test_write_change_rolls_back_with_its_cause(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)

    class Cause(Exception):
        pass

    with pytest.raises(Cause):
        async with h.pool.acquire() as conn, conn.transaction():
            entry = stripe_entry(wallet_id, "dispute_opened", 100)
            assert await write_change(conn, entry, status="frozen", timeout_s=TIMEOUT_S)
            raise Cause
    assert await wallet_state(h, wallet_id) == (0, "active")
    assert await change_rows(h, wallet_id) == []
    assert await ledger_balance(h, wallet_id) == 0
    # The number is not burnt: the next change is 1.
    assert await write(h, stripe_entry(wallet_id, "topup", 100)) is True
    assert [row["seq"] for row in await change_rows(h, wallet_id)] == [1]


# apply_changes ------------------------------------------------------------------------


async def test_apply_changes_brings_redis_to_the_ledger(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    await write(h, stripe_entry(wallet_id, "topup", 5_000, fee_micros=100))
    await write(h, stripe_entry(wallet_id, "topup_refund", 1_000))
    await write(h, stripe_entry(wallet_id, "dispute_opened", 3_000), status="frozen")
    assert await redis_balance(h.cache, wallet_id) == 0
    assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 3
    await assert_in_step(h, wallet_id, expected_micros=1_000)
    assert (await h.cache.wallet(wallet_id)).status == "frozen"  # type: ignore[union-attr]
    assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 0
    # A refund larger than what is left: the wallet goes below zero, and Redis follows.
    await write(h, stripe_entry(wallet_id, "topup_refund", 4_000))
    assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 1
    await assert_in_step(h, wallet_id, expected_micros=-3_000)


async def test_concurrent_apply_changes_apply_each_change_once(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    rng = random.Random(7)
    amounts = [rng.choice((1, -1)) * rng.randint(1, 1_000_000) for _ in range(MANY_CHANGES)]
    await write_topups(h, wallet_id, amounts)
    assert len(await change_rows(h, wallet_id)) == MANY_CHANGES
    counts = await asyncio.gather(
        *(apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) for _ in range(4))
    )
    await assert_in_step(h, wallet_id, expected_micros=sum(amounts))
    assert await redis_q(h.cache, wallet_id) == MANY_CHANGES
    assert sum(counts) == MANY_CHANGES  # each caller counts only what it applied


async def test_apply_changes_loads_a_lost_wallet_from_the_ledger(harness: Harness) -> None:
    h = harness
    lost = await new_wallet(h)
    partial = await new_wallet(h)
    never_loaded = await new_wallet(h, load=False)
    amounts = [1_000, -300, 50, 7, -2]
    for wallet_id in (lost, partial, never_loaded):
        await write_topups(h, wallet_id, amounts)
    await h.cache.client.delete(h.cache.wallet_key(lost))
    await h.cache.client.hdel(h.cache.wallet_key(partial), "e")
    for wallet_id in (lost, partial, never_loaded):
        await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
        # Loaded with every committed change in its balance and q = change_seq: none applied twice.
        await assert_in_step(h, wallet_id, expected_micros=sum(amounts))
        assert await redis_q(h.cache, wallet_id) == len(amounts)
        assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 0
        await write_topups(h, wallet_id, [10])
        assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 1
        await assert_in_step(h, wallet_id, expected_micros=sum(amounts) + 10)


async def test_apply_changes_with_many_changes_and_a_lost_wallet_applies_none_twice(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    amounts = list(range(1, MANY_CHANGES + 1))
    await write_topups(h, wallet_id, amounts)
    await h.cache.client.delete(h.cache.wallet_key(wallet_id))
    await asyncio.gather(*(apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) for _ in range(3)))
    await assert_in_step(h, wallet_id, expected_micros=sum(amounts))


async def test_concurrent_writers_number_contiguously_and_apply_once(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    writers, changes_per_writer = 8, 12
    rng = random.Random(11)
    done = asyncio.Event()
    expected: list[int] = []

    async def writer(n: int) -> list[int]:
        seqs: list[int] = []
        for i in range(changes_per_writer):
            amount = (n + 1) * 1_000 + i
            kind: EntryKind = "topup" if i % 3 else "topup_refund"
            async with h.pool.acquire() as conn, conn.transaction():
                assert await write_change(
                    conn, stripe_entry(wallet_id, kind, amount), status=None, timeout_s=TIMEOUT_S
                )
                seqs.append(await conn.fetchval("SELECT change_seq FROM wallets WHERE id = $1", wallet_id))
                await asyncio.sleep(rng.uniform(0, 0.003))  # hold the row lock while others queue
            expected.append(amount if kind == "topup" else -amount)
            await asyncio.sleep(0)
        return seqs

    async def applier() -> None:
        while not done.is_set():
            await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
            await asyncio.sleep(0.001)

    appliers = [asyncio.create_task(applier()) for _ in range(2)]
    try:
        seqs = await asyncio.gather(*(writer(n) for n in range(writers)))
    finally:
        done.set()
        await asyncio.gather(*appliers)
    await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    total = writers * changes_per_writer
    assert sorted(seq for per_writer in seqs for seq in per_writer) == list(range(1, total + 1))
    for per_writer in seqs:  # each writer's own changes commit in its order
        assert per_writer == sorted(per_writer)
    assert await wallet_state(h, wallet_id) == (total, "active")
    await assert_in_step(h, wallet_id, expected_micros=sum(expected))


async def test_apply_changes_counts_only_what_it_applied(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    await write_topups(h, wallet_id, [100, 200, 300])
    # Another caller applied them to Redis and has not deleted the rows yet (or died first).
    async with h.pool.acquire() as conn:
        pending = await wallet_repo.pending_changes(conn, wallet_id, CHANGES_BATCH_MAX)
    assert await h.cache.apply_changes(wallet_id, pending) == (0, 3)
    applied = await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    await assert_in_step(h, wallet_id, expected_micros=600)  # the balance is right either way
    assert applied == 0


# The crash net: drain_changes ---------------------------------------------------------


async def test_drain_applies_what_a_dead_writer_left_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    wallets = [await new_wallet(h) for _ in range(3)]
    amounts = {wallet_id: [1_000 * (n + 1), -(n + 1), 5] for n, wallet_id in enumerate(wallets)}
    for wallet_id in wallets:  # committed; the process "dies" before apply_changes
        await write_topups(h, wallet_id, amounts[wallet_id])
    # Young changes belong to their writer: the sweeper leaves them.
    assert await drain_changes(h.pool, h.cache, wallets_max=10, timeout_s=TIMEOUT_S) == 0
    assert all([await redis_balance(h.cache, w) == 0 for w in wallets])
    assert all([len(await change_rows(h, w)) == 3 for w in wallets])

    monkeypatch.setattr(changes_module, "DRAIN_DELAY_S", 0.0)
    # Bounded: at most wallets_max wallets per pass.
    assert await drain_changes(h.pool, h.cache, wallets_max=2, timeout_s=TIMEOUT_S) == 6
    assert await drain_changes(h.pool, h.cache, wallets_max=2, timeout_s=TIMEOUT_S) == 3
    assert await drain_changes(h.pool, h.cache, wallets_max=2, timeout_s=TIMEOUT_S) == 0
    for wallet_id in wallets:
        await assert_in_step(h, wallet_id, expected_micros=sum(amounts[wallet_id]))


async def test_drain_after_a_writer_died_between_redis_and_the_delete(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    monkeypatch.setattr(changes_module, "DRAIN_DELAY_S", 0.0)
    wallet_id = await new_wallet(h)
    await write_topups(h, wallet_id, [500, -20, 3])
    async with h.pool.acquire() as conn:
        pending = await wallet_repo.pending_changes(conn, wallet_id, CHANGES_BATCH_MAX)
    assert await h.cache.apply_changes(wallet_id, pending[:2]) == (0, 2)  # then the process died
    await write_topups(h, wallet_id, [40])
    await drain_changes(h.pool, h.cache, wallets_max=10, timeout_s=TIMEOUT_S)
    await assert_in_step(h, wallet_id, expected_micros=523)
    assert await drain_changes(h.pool, h.cache, wallets_max=10, timeout_s=TIMEOUT_S) == 0
    await assert_in_step(h, wallet_id, expected_micros=523)


# Maintenance: rebuild-cache and check -------------------------------------------------


async def test_rebuild_cache_then_apply_applies_nothing_twice(harness: Harness) -> None:
    h = harness
    applied_some = await new_wallet(h)
    lost = await new_wallet(h)
    await write_topups(h, applied_some, [1_000])
    assert await apply_changes(h.pool, h.cache, applied_some, timeout_s=TIMEOUT_S) == 1
    await write_topups(h, applied_some, [200, -30])  # committed, not applied
    await write_topups(h, lost, [77, 3])
    await h.cache.client.delete(h.cache.wallet_key(lost))

    report = await rebuild_cache(h.pool, h.cache, idempotency_ttl_s=60)
    assert report.wallets == 2
    # The ledger snapshot holds every committed change, and q says so.
    assert await redis_balance(h.cache, applied_some) == 1_170
    assert await redis_q(h.cache, applied_some) == 3
    assert await redis_balance(h.cache, lost) == 80
    assert await redis_q(h.cache, lost) == 2

    for wallet_id in (applied_some, lost):
        await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    await assert_in_step(h, applied_some, expected_micros=1_170)
    await assert_in_step(h, lost, expected_micros=80)
    await write_topups(h, lost, [-100])
    assert await apply_changes(h.pool, h.cache, lost, timeout_s=TIMEOUT_S) == 1
    await assert_in_step(h, lost, expected_micros=-20)


async def test_rebuild_never_steps_back_past_a_change_applied_meanwhile(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A top-up commits and reaches Redis (its row deleted) between the rebuild's read of a
    page and its overwrite: the rebuild reads that wallet again instead of losing it."""
    h = harness
    wallet_id = await new_wallet(h)
    await write_topups(h, wallet_id, [1_000])
    await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    read_page = maintenance.repo.wallets_page

    async def page_then_a_topup(conn: asyncpg.Connection, after: uuid.UUID | None, limit: int) -> Any:
        page = await read_page(conn, after, limit)
        if page:
            await write_topups(h, wallet_id, [2_000])
            assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 1
        return page

    monkeypatch.setattr(maintenance.repo, "wallets_page", page_then_a_topup)
    report = await rebuild_cache(h.pool, h.cache, idempotency_ttl_s=60)
    assert (report.wallets, report.wallets_reread) == (1, 1)
    await assert_in_step(h, wallet_id, expected_micros=3_000)
    assert await redis_q(h.cache, wallet_id) == 2


async def test_load_wallet_refuses_to_overwrite_with_an_older_snapshot(cache: Cache) -> None:
    wallet_id = await cached_wallet(cache, balance_micros=500, change_seq=4)
    older = CachedWallet(100, 0, "active", CURRENCY, 3)
    assert await cache.load_wallet(wallet_id, older, overwrite=True) is False
    assert await redis_q(cache, wallet_id) == 4 and await redis_balance(cache, wallet_id) == 500
    same = CachedWallet(700, 0, "active", CURRENCY, 4)
    assert await cache.load_wallet(wallet_id, same, overwrite=True) is True
    assert await redis_balance(cache, wallet_id) == 700


async def test_check_reports_unapplied_changes(harness: Harness) -> None:
    h = harness
    first, second = await new_wallet(h), await new_wallet(h)
    await write_topups(h, first, [10, 20])
    await write_topups(h, second, [30])
    report = await check(h.pool, h.cache)
    assert report.unapplied_changes == 3
    assert report.wallets_checked == 2
    assert report.entries_unbalanced == []
    assert report.lines_total_micros == 0
    for wallet_id in (first, second):
        await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S)
    report = await check(h.pool, h.cache)
    assert report.unapplied_changes == 0
    assert report.wallets_drifted == []
    assert report.ok
