"""Redis balance drift is found and repaired only when that is safe, on real Postgres and Redis:
find_drift reports a wallet whose Redis balance stayed apart from its ledger balance and, when
asked, sets it to the ledger's (repair_balance.lua); it leaves alone a wallet with a charge in
flight (its own entry in the partition outbox or abandoned hash, as drift_probe.lua sees it),
one whose balance moved between its two passes, and one with a fresh reversal, and never repairs
one with a pending credit or a committed change Redis has not applied yet; a debit that races
the check (charged before the ledger read, committed after it or before the repair) is never
handed back; the scripts answer repaired, moved and missing, and the probe says busy."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest
from conftest import HARNESS_PARTITIONS, Harness

import wallet.cache as cache_module
from ledger import repo as ledger_repo
from ledger.accounts import topup_lines
from ledger.ids import uuid7
from ledger.schemas import EntryRecord
from ledger.writer import write_with_reversal
from wallet import maintenance
from wallet import repo as wallet_repo
from wallet.cache import DriftProbe
from wallet.changes import apply_changes, load_from_ledger, write_change
from wallet.charges import decode_payload, encode_payload, record_from_payload, request_hash
from wallet.maintenance import BalanceDrift, find_drift
from wallet.replies import Charged
from wallet.schemas import EntryPayload

PARTITIONS = HARNESS_PARTITIONS
CURRENCY = "usd"
TIMEOUT_S = 5.0
SETTLE_S = 0.05
QUIET_S = 30.0
"""The sweeper's default grace: a reversal younger than this may still be undoing in Redis."""
FUNDS = 5_000_000


async def top_up(h: Harness, wallet_id: uuid.UUID, micros: int, *, apply: bool = True) -> None:
    """A top-up as topup/service.py writes it (Postgres first), applied to Redis unless not."""
    charge = f"ch_{secrets.token_hex(8)}"
    entry = EntryRecord(
        id=uuid7(),
        kind="topup",
        currency=CURRENCY,
        wallet_id=wallet_id,
        amount_micros=micros,
        balance_micros=None,
        idempotency_key=f"topup:{charge}",
        request_hash=None,
        description="test top-up",
        metadata={},
        created_at=datetime.now(UTC),
        stripe_object_id=charge,
        lines=topup_lines(wallet_id, CURRENCY, micros, 0),
    )
    async with h.pool.acquire() as conn, conn.transaction():
        assert await write_change(conn, entry, status=None, timeout_s=TIMEOUT_S)
    if apply:
        assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 1


async def new_wallet(h: Harness, *, funded_micros: int = FUNDS, partition: int | None = None) -> uuid.UUID:
    """A wallet as Wallets.create_wallet makes it (row, account, Redis hash), optionally in a
    given partition, topped up with `funded_micros` (Redis in step with the ledger)."""
    wallet_id = uuid7()
    while partition is not None and h.cache.partition(wallet_id) != partition:
        wallet_id = uuid7()
    async with h.pool.acquire() as conn, conn.transaction():
        assert await wallet_repo.insert_wallet(conn, wallet_id, f"owner-{secrets.token_hex(6)}", CURRENCY, 0)
        await ledger_repo.ensure_system_accounts(conn, CURRENCY)
        await ledger_repo.insert_wallet_account(conn, wallet_id, CURRENCY)
    async with h.pool.acquire() as conn:
        assert await load_from_ledger(conn, h.cache, wallet_id, overwrite=False) is not None
    if funded_micros:
        await top_up(h, wallet_id, funded_micros)
    return wallet_id


async def charge_in_flight(
    h: Harness, wallet_id: uuid.UUID, micros: int, kind: str = "debit"
) -> tuple[str, uuid.UUID, str]:
    """The debit path's Redis half (apply.lua) with no commit after it: the charge waits in the
    partition outbox, its payload naming the wallet. Returns (key, entry id, outbox id)."""
    key, entry_id = f"k-{secrets.token_hex(6)}", uuid7()
    hashed = request_hash(kind, micros, None, {})
    payload = EntryPayload(
        id=entry_id,
        wallet_id=wallet_id,
        kind=kind,  # type: ignore[arg-type]
        amount_micros=micros,
        idempotency_key=key,
        request_hash=hashed,
        description=None,
        metadata={},
        created_at=datetime.now(UTC),
    )
    result = await h.cache.apply(
        wallet_id=wallet_id,
        kind=kind,
        amount_micros=micros,
        request_hash=hashed,
        entry_id=entry_id,
        payload=encode_payload(payload),
        idempotency_key=key,
        ttl_s=3600,
    )
    assert isinstance(result, Charged), result
    return key, entry_id, result.outbox_id


async def state(h: Harness, wallet_id: uuid.UUID) -> dict[str, str]:
    raw = await h.cache.client.hgetall(h.cache.wallet_key(wallet_id))
    return {key.decode(): value.decode() for key, value in raw.items()}


async def tamper(h: Harness, wallet_id: uuid.UUID, micros: int) -> None:
    await h.cache.client.hset(h.cache.wallet_key(wallet_id), "b", str(micros))


async def ledger_of(h: Harness, wallet_id: uuid.UUID) -> tuple[int, int]:
    """(ledger balance, wallets.change_seq)."""
    async with h.pool.acquire() as conn:
        cached = await wallet_repo.wallet_for_cache(conn, wallet_id)
    assert cached is not None
    return cached.balance_micros, cached.change_seq


async def drift(
    h: Harness, *, repair: bool, settle_wait_s: float = SETTLE_S, quiet_s: float = QUIET_S
) -> tuple[int, list[BalanceDrift]]:
    search = await find_drift(h.pool, h.cache, repair=repair, settle_wait_s=settle_wait_s, quiet_s=quiet_s)
    assert search.unexamined == 0
    return search.wallets_checked, search.drifts


async def probe_of(h: Harness, wallet_id: uuid.UUID) -> DriftProbe:
    probe = await h.cache.drift_probe(wallet_id)
    assert probe is not None
    return probe


async def repair(h: Harness, wallet_id: uuid.UUID, *, ledger: int, probe: DriftProbe | None = None) -> str:
    """repair_balance.lua with what drift_probe.lua read (default: a probe now)."""
    return await h.cache.repair_balance(
        wallet_id, probe or await probe_of(h, wallet_id), ledger_micros=ledger
    )


async def commit_from_outbox(
    h: Harness, wallet_id: uuid.UUID, outbox_id: str, *, balance_micros: int
) -> uuid.UUID:
    """What the sweeper does with an orphan (its worker died): commit it from its outbox
    payload, then trim it. Redis's balance already holds the charge."""
    outbox = h.cache.outbox_key(h.cache.partition(wallet_id))
    ((_, fields),) = await h.cache.client.xrange(outbox, outbox_id, outbox_id)
    record = record_from_payload(
        decode_payload(fields[b"e"]), balance_micros=balance_micros, currency=CURRENCY
    )
    async with h.pool.acquire() as conn:
        assert await ledger_repo.insert_entries(conn, [record], timeout_s=TIMEOUT_S) == {record.id}
    assert await h.cache.client.xdel(outbox, outbox_id) == 1
    return record.id


def found(wallet_id: uuid.UUID, redis_micros: int, ledger_micros: int, *, repaired: bool) -> BalanceDrift:
    return BalanceDrift(
        wallet_id=wallet_id,
        currency=CURRENCY,
        redis_micros=redis_micros,
        ledger_micros=ledger_micros,
        repaired=repaired,
    )


# find_drift ------------------------------------------------------------------------------


async def test_a_tampered_balance_is_reported_and_repaired_to_the_ledger(harness: Harness) -> None:
    h = harness
    tampered = await new_wallet(h)
    in_step = [await new_wallet(h), await new_wallet(h, funded_micros=0)]
    await tamper(h, tampered, 7_000_000)
    before = await state(h, tampered)

    assert await drift(h, repair=True) == (3, [found(tampered, 7_000_000, FUNDS, repaired=True)])
    after = await state(h, tampered)
    assert after == {**before, "b": str(FUNDS)}  # the balance alone: q, p, epoch untouched
    for wallet_id in in_step:
        assert (await h.cache.balances([wallet_id]))[0] == (await ledger_of(h, wallet_id))[0]
    assert await drift(h, repair=True) == (3, [])  # nothing left


async def test_without_repair_drift_is_only_reported(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    await tamper(h, wallet_id, -3)
    for _ in range(2):  # reported each time, never touched
        assert await drift(h, repair=False) == (1, [found(wallet_id, -3, FUNDS, repaired=False)])
        assert (await state(h, wallet_id))["b"] == "-3"
    assert await drift(h, repair=True) == (1, [found(wallet_id, -3, FUNDS, repaired=True)])
    assert (await state(h, wallet_id))["b"] == str(FUNDS)


async def test_a_wallet_with_its_own_charge_in_flight_is_left_alone(harness: Harness) -> None:
    """A debit charged in Redis and not yet committed looks like drift; repairing it would hand
    the money back. Its outbox entry (or, once answered 503, its abandoned entry) marks it busy."""
    h = harness
    wallet_id = await new_wallet(h)
    key, entry_id, outbox_id = await charge_in_flight(h, wallet_id, 1_000)
    charged = str(FUNDS - 1_000)
    assert (await probe_of(h, wallet_id)).in_flight
    assert await drift(h, repair=True) == (1, [])
    assert (await state(h, wallet_id))["b"] == charged

    # Answered 503: the entry leaves the outbox for the abandoned hash; still in flight.
    assert await h.cache.abandon(
        wallet_id=wallet_id, idempotency_key=key, entry_id=entry_id, outbox_id=outbox_id
    )
    assert await h.cache.client.xlen(h.cache.outbox_key(h.cache.partition(wallet_id))) == 0
    assert (await probe_of(h, wallet_id)).in_flight
    assert await drift(h, repair=True) == (1, [])
    assert (await state(h, wallet_id))["b"] == charged


async def test_another_wallets_charge_in_the_partition_does_not_block_a_repair(harness: Harness) -> None:
    h = harness
    tampered = await new_wallet(h, partition=1)
    busy = await new_wallet(h, partition=1)
    await charge_in_flight(h, busy, 250)
    await tamper(h, tampered, 1)
    assert not (await probe_of(h, tampered)).in_flight
    assert await drift(h, repair=True) == (2, [found(tampered, 1, FUNDS, repaired=True)])
    assert (await state(h, tampered))["b"] == str(FUNDS)
    assert (await state(h, busy))["b"] == str(FUNDS - 250)


@pytest.mark.parametrize("commit_at", ["ledger read", "repair"])
async def test_a_charge_in_flight_when_probed_is_never_handed_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, commit_at: str
) -> None:
    """A wallet truly drifted passes the probe (nothing in flight). Then a debit races the
    check: charged in Redis just before the ledger is read and committed just after it (or
    charged and committed just before the repair). Setting Redis to the ledger balance read
    before that commit would hand the debit back; repair_balance.lua must see the wallet
    moved. The hooks are asserted to have run, so the race is the one described."""
    h = harness
    wallet_id = await new_wallet(h)
    tampered = FUNDS + 42
    await tamper(h, wallet_id, tampered)
    raced: list[str] = []

    async def debit_races() -> None:
        _, _, outbox_id = await charge_in_flight(h, wallet_id, 1_000)
        raced.append("charged")
        # The sweeper (or the writer) commits it with Redis's balance after the charge.
        await commit_from_outbox(h, wallet_id, outbox_id, balance_micros=tampered - 1_000)
        raced.append("committed")

    if commit_at == "ledger read":
        read_ledger = wallet_repo.wallet_for_cache

        async def read_amid_a_debit(conn: asyncpg.Connection, wid: uuid.UUID):  # type: ignore[no-untyped-def]
            if raced:  # once: ledger_of below reads through the same function
                return await read_ledger(conn, wid)
            _, _, outbox_id = await charge_in_flight(h, wallet_id, 1_000)
            raced.append("charged")
            cached = await read_ledger(conn, wid)  # before the debit's commit
            await commit_from_outbox(h, wallet_id, outbox_id, balance_micros=tampered - 1_000)
            raced.append("committed")
            return cached

        monkeypatch.setattr(maintenance.repo, "wallet_for_cache", read_amid_a_debit)
    else:
        repair_balance = h.cache.repair_balance

        async def debit_then_repair(wid: uuid.UUID, probe: DriftProbe, *, ledger_micros: int) -> str:
            await debit_races()
            return await repair_balance(wid, probe, ledger_micros=ledger_micros)

        monkeypatch.setattr(h.cache, "repair_balance", debit_then_repair)
    checked, drifts = await drift(h, repair=True)
    assert raced == ["charged", "committed"]  # the race happened inside the check
    assert (checked, drifts) == (1, [found(wallet_id, tampered, FUNDS, repaired=False)])
    assert await ledger_of(h, wallet_id) == (FUNDS - 1_000, 1)
    assert (await state(h, wallet_id))["b"] == str(tampered - 1_000)  # charged once, not handed back


@pytest.mark.parametrize("field", ["b", "p", "q"])
async def test_a_wallet_that_moves_between_the_passes_is_not_reported(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    """Whatever moves (balance, pending credits, applied changes), the wallet is in use: not drift."""
    h = harness
    wallet_id = await new_wallet(h)
    await tamper(h, wallet_id, 42)
    first_pass_done = asyncio.Event()
    original = h.cache.balance_states

    async def observed(wallet_ids: Sequence[uuid.UUID]) -> list[tuple[int, int, int] | None]:
        result = await original(wallet_ids)
        first_pass_done.set()
        return result

    monkeypatch.setattr(h.cache, "balance_states", observed)
    task = asyncio.create_task(drift(h, repair=True, settle_wait_s=0.5))
    await asyncio.wait_for(first_pass_done.wait(), 5)
    assert not task.done()  # waiting for the wallet to settle
    await h.cache.client.hincrby(h.cache.wallet_key(wallet_id), field, 1)
    moved = await state(h, wallet_id)
    assert await asyncio.wait_for(task, 10) == (1, [])
    assert await state(h, wallet_id) == moved  # not repaired either


async def test_a_pending_credit_is_never_repaired(harness: Harness) -> None:
    h = harness
    # A credit charged in Redis waits in p (and in the outbox) until committed: in flight.
    crediting = await new_wallet(h)
    await charge_in_flight(h, crediting, 300, kind="credit")
    await tamper(h, crediting, 10)
    # A pending credit with no entry of its own in the outbox: drift, but not repairable.
    pending = await new_wallet(h)
    await h.cache.client.hset(h.cache.wallet_key(pending), mapping={"p": "300", "b": "10"})
    for wallet_id in (crediting, pending):
        assert (await state(h, wallet_id))["p"] == "300"

    assert await drift(h, repair=True) == (2, [found(pending, 10, FUNDS, repaired=False)])
    for wallet_id in (crediting, pending):
        assert (await state(h, wallet_id))["b"] == "10"
    assert await repair(h, pending, ledger=FUNDS) == "moved"  # the script refuses too
    assert (await state(h, pending))["b"] == "10"


async def test_a_change_redis_has_not_applied_is_neither_drift_nor_repaired(harness: Harness) -> None:
    """A top-up committed in Postgres, its apply still to come: Redis's q is behind the
    wallet's change_seq; it is on its way (the sweeper applies it), and setting b to the
    ledger would count the top-up twice."""
    h = harness
    wallet_id = await new_wallet(h)
    await top_up(h, wallet_id, 2_000_000, apply=False)
    assert await ledger_of(h, wallet_id) == (FUNDS + 2_000_000, 2)
    assert (await state(h, wallet_id))["q"] == "1"
    assert await drift(h, repair=True) == (1, [])
    assert (await state(h, wallet_id))["b"] == str(FUNDS)
    # Had it been called with the ledger's change_seq, the script refuses as well.
    probe = msgspec.structs.replace(await probe_of(h, wallet_id), change_seq=2)
    assert await repair(h, wallet_id, ledger=FUNDS + 2_000_000, probe=probe) == "moved"
    assert (await state(h, wallet_id))["b"] == str(FUNDS)
    # The change applied: in step, nothing to report, nothing counted twice.
    assert await apply_changes(h.pool, h.cache, wallet_id, timeout_s=TIMEOUT_S) == 1
    assert await drift(h, repair=True) == (1, [])
    assert (await state(h, wallet_id))["b"] == str(FUNDS + 2_000_000)


async def test_a_fresh_reversal_is_given_time_to_undo_in_redis(harness: Harness) -> None:
    """A debit answered 503 is written beside its reversal (net zero in the ledger) before the
    sweeper gives the money back in Redis: until then Redis is lower, and that is not drift."""
    h = harness
    wallet_id = await new_wallet(h)
    _, _, outbox_id = await charge_in_flight(h, wallet_id, 1_000)
    outbox = h.cache.outbox_key(h.cache.partition(wallet_id))
    ((_, fields),) = await h.cache.client.xrange(outbox, outbox_id, outbox_id)
    record = record_from_payload(
        decode_payload(fields[b"e"]), balance_micros=FUNDS - 1_000, currency=CURRENCY
    )
    async with h.pool.acquire() as conn:
        await write_with_reversal(conn, record, timeout_s=TIMEOUT_S)
    await h.cache.client.xdel(outbox, outbox_id)  # off the outbox; the refund to b still to come
    assert await ledger_of(h, wallet_id) == (FUNDS, 1)
    assert await drift(h, repair=True) == (1, [])
    assert (await state(h, wallet_id))["b"] == str(FUNDS - 1_000)
    # Once the reversal is older than quiet_s, a Redis still short of it is drift.
    assert await drift(h, repair=False, quiet_s=0) == (
        1,
        [found(wallet_id, FUNDS - 1_000, FUNDS, repaired=False)],
    )


async def test_a_wallet_missing_from_redis_is_not_drift(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    await h.cache.client.delete(h.cache.wallet_key(wallet_id))
    assert await h.cache.drift_probe(wallet_id) is None
    assert await drift(h, repair=True) == (1, [])
    assert await h.cache.client.exists(h.cache.wallet_key(wallet_id)) == 0  # the next use loads it


# drift_probe.lua and repair_balance.lua -----------------------------------------------------


async def test_probe_reads_the_wallet_and_its_partition(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h, partition=3)
    assert await probe_of(h, wallet_id) == DriftProbe(FUNDS, 0, 1, "0-0", False)  # no stream yet
    await h.cache.client.hset(h.cache.wallet_key(wallet_id), "p", "7")
    other = await new_wallet(h, partition=3)
    _, _, outbox_id = await charge_in_flight(h, other, 5)
    assert await probe_of(h, wallet_id) == DriftProbe(FUNDS, 7, 1, outbox_id, False)
    await h.cache.client.xdel(h.cache.outbox_key(3), outbox_id)
    assert (await probe_of(h, wallet_id)).outbox_last_id == outbox_id  # the last id outlives the entry


async def test_probe_says_busy_for_its_own_entries_or_too_many_to_look_through(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    wallet_id = await new_wallet(h, partition=2)
    others = [await new_wallet(h, partition=2) for _ in range(3)]
    for other in others:  # other wallets' entries: looked through, not in the way
        await charge_in_flight(h, other, 1)
    abandoned = h.cache.abandoned_key(2)
    await h.cache.client.hset(abandoned, str(uuid7()), f'{{"e":"{{\\"wallet_id\\":\\"{others[0]}\\"}}"}}')
    monkeypatch.setattr(cache_module, "REPAIR_SCAN_MAX", 3)
    assert not (await probe_of(h, wallet_id)).in_flight  # 3 outbox and 1 abandoned: within
    await charge_in_flight(h, others[1], 1)  # 4 > 3 to look through: busy, whoever's they are
    assert (await probe_of(h, wallet_id)).in_flight
    monkeypatch.setattr(cache_module, "REPAIR_SCAN_MAX", 10_000)
    assert not (await probe_of(h, wallet_id)).in_flight
    # Its own entry in the abandoned hash (any value naming the wallet).
    await h.cache.client.hset(abandoned, str(uuid7()), f'{{"e":"{{\\"wallet_id\\":\\"{wallet_id}\\"}}"}}')
    assert (await probe_of(h, wallet_id)).in_flight


async def test_script_repairs_what_did_not_move(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h)
    await tamper(h, wallet_id, 99)
    probe = await probe_of(h, wallet_id)
    assert await repair(h, wallet_id, ledger=FUNDS, probe=probe) == "repaired"
    assert (await state(h, wallet_id))["b"] == str(FUNDS)
    assert await repair(h, wallet_id, ledger=FUNDS) == "repaired"  # idempotent
    assert await repair(h, wallet_id, ledger=FUNDS, probe=probe) == "moved"  # b is no longer 99


async def test_script_answers_moved_when_anything_changed_since_the_probe(harness: Harness) -> None:
    h = harness
    wallet_id = await new_wallet(h, partition=0)
    await tamper(h, wallet_id, 99)
    probe = await probe_of(h, wallet_id)
    for stale in (
        msgspec.structs.replace(probe, balance_micros=98),
        msgspec.structs.replace(probe, change_seq=0),
        msgspec.structs.replace(probe, change_seq=2),
    ):
        assert await repair(h, wallet_id, ledger=FUNDS, probe=stale) == "moved", stale
    # A charge of any wallet of the partition since the probe: the ledger read may predate it.
    other = await new_wallet(h, partition=0)
    _, _, outbox_id = await charge_in_flight(h, other, 1)
    await h.cache.client.xdel(h.cache.outbox_key(0), outbox_id)  # even one already settled
    assert await repair(h, wallet_id, ledger=FUNDS, probe=probe) == "moved"
    # Any pending credit.
    await h.cache.client.hset(h.cache.wallet_key(wallet_id), "p", "-5")
    assert await repair(h, wallet_id, ledger=FUNDS) == "moved"
    assert (await state(h, wallet_id))["b"] == "99"


async def test_script_answers_missing_for_an_absent_wallet(harness: Harness) -> None:
    h = harness
    absent = uuid.uuid4()
    probe = DriftProbe(0, 0, 0, "0-0", False)
    assert await repair(h, absent, ledger=FUNDS, probe=probe) == "missing"
    assert await h.cache.client.exists(h.cache.wallet_key(absent)) == 0  # wrote nothing
