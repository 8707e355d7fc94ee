"""Every Lua script in wallet/lua/, run through wallet.cache.Cache on a real Redis, charges, refuses,
replays, settles and refunds exactly once, keeps balances exact up to 2**53 - 1, and touches one
hash-tag partition only."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis
from conftest import ROOT, delete_prefix
from redis.crc import key_slot

from centime.money import AMOUNT_MICROS_MAX
from centime.settings import Settings
from wallet.cache import SCRIPTS, Cache, CachedWallet

PARTITIONS = 4
TTL_S = 120
_TAG = re.compile(r"\{([^}]*)\}")


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[Cache]:
    # A prefix of this test's own: no running server or sweeper reads these outboxes.
    prefix = f"{settings.redis_prefix}lua{secrets.token_hex(3)}"
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield Cache(client, prefix=prefix, partition_count=PARTITIONS)
    finally:
        await client.aclose()
        await delete_prefix(settings.redis_url, prefix)


async def new_wallet(
    cache: Cache,
    *,
    balance_micros: int = 0,
    overdraft_limit_micros: int = 0,
    status: str = "active",
    currency: str = "usd",
) -> uuid.UUID:
    wallet_id = uuid.uuid4()
    loaded = await cache.load_wallet(
        wallet_id,
        CachedWallet(balance_micros, overdraft_limit_micros, status, currency),
        overwrite=False,
    )
    assert loaded is True
    return wallet_id


class Applied(msgspec.Struct, frozen=True):
    reply: list[str]
    entry_id: uuid.UUID
    key: str
    payload: bytes

    @property
    def status(self) -> str:
        return self.reply[0]


def _text(reply: list) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else str(item) for item in reply]


async def apply(
    cache: Cache,
    wallet_id: uuid.UUID,
    amount_micros: int,
    *,
    kind: str = "debit",
    key: str | None = None,
    request_hash: str = "hash-a",
    entry_id: uuid.UUID | None = None,
) -> Applied:
    key = key or secrets.token_hex(8)
    entry_id = entry_id or uuid.uuid4()
    payload = json.dumps({"id": str(entry_id), "amount_micros": amount_micros, "kind": kind}).encode()
    reply = await cache.apply(
        wallet_id=wallet_id,
        kind=kind,
        amount_micros=amount_micros,
        request_hash=request_hash,
        entry_id=entry_id,
        payload=payload,
        idempotency_key=key,
        ttl_s=TTL_S,
    )
    return Applied(_text(reply), entry_id, key, payload)


async def balance_text(cache: Cache, wallet_id: uuid.UUID) -> bytes | None:
    return await cache.client.hget(cache.wallet_key(wallet_id), "b")


async def outbox_ids(cache: Cache, wallet_id: uuid.UUID) -> list[str]:
    entries = await cache.client.xrange(cache.outbox_key(cache.partition(wallet_id)))
    return [entry_id.decode() for entry_id, _ in entries]


def tag(key: str) -> str:
    match = _TAG.search(key)
    assert match is not None, key
    return match.group(1)


# Keys and partitions ---------------------------------------------------------


def test_every_lua_file_is_a_registered_script() -> None:
    files = {path.stem for path in (ROOT / "wallet" / "lua").glob("*.lua")}
    assert files == set(SCRIPTS)


async def test_keys_of_one_wallet_share_one_partition_tag_and_cluster_slot(cache: Cache) -> None:
    partitions = set()
    for _ in range(64):
        wallet_id = uuid.uuid4()
        p = cache.partition(wallet_id)
        partitions.add(p)
        assert 0 <= p < PARTITIONS
        assert p == cache.partition(uuid.UUID(str(wallet_id)))  # stable
        keys = [
            cache.wallet_key(wallet_id),
            cache.idempotency_key(wallet_id, "plain"),
            # A client's key may hold braces: the first tag still wins.
            cache.idempotency_key(wallet_id, "{evil}}{x"),
            cache.outbox_key(p),
            cache.abandoned_key(p),
        ]
        assert {tag(k) for k in keys} == {f"p{p}"}
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert all(k.startswith(cache.prefix + ":") for k in keys)
    assert len(partitions) == PARTITIONS  # the hash spreads wallets, it is not a constant


async def test_a_full_cycle_creates_keys_in_the_wallets_partition_only(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    p = cache.partition(wallet_id)
    first = await apply(cache, wallet_id, 100)
    assert first.status == "ok"
    await cache.settle_committed({p: [first.reply[2]]})
    second = await apply(cache, wallet_id, 200)
    assert await cache.abandon(
        wallet_id=wallet_id, idempotency_key=second.key, entry_id=second.entry_id, outbox_id=None
    )
    third = await apply(cache, wallet_id, 300)
    assert third.status == "ok"
    assert await cache.settle_reversed(
        wallet_id=wallet_id, idempotency_key=second.key, entry_id=second.entry_id, delta_micros=200
    )
    keys = [k.decode() async for k in cache.client.scan_iter(match=f"{cache.prefix}:*")]
    # the wallet, three idempotency records and the outbox; the abandoned hash is empty again
    assert len(keys) == 5
    assert {tag(k) for k in keys} == {f"p{p}"}


# apply.lua: charges ----------------------------------------------------------


async def test_debit_charges_appends_to_outbox_and_stores_the_record(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    applied = await apply(cache, wallet_id, 300, key="k1", request_hash="h1")
    status, balance, outbox_id, currency = applied.reply
    assert (status, balance, currency) == ("ok", "700", "usd")
    assert await balance_text(cache, wallet_id) == b"700"

    stream = await cache.client.xrange(cache.outbox_key(cache.partition(wallet_id)), outbox_id, outbox_id)
    assert len(stream) == 1
    assert stream[0][1] == {b"e": applied.payload, b"b": b"700", b"c": b"usd"}

    record = await cache.client.hgetall(cache.idempotency_key(wallet_id, "k1"))
    assert record == {
        b"h": b"h1",
        b"id": str(applied.entry_id).encode(),
        b"e": applied.payload,
        b"b": b"700",
        b"x": outbox_id.encode(),
        b"st": b"ok",
        b"c": b"usd",
    }


async def test_credit_adds_and_ignores_overdraft(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=-40, overdraft_limit_micros=50, currency="eur")
    applied = await apply(cache, wallet_id, 100, kind="credit")
    assert applied.reply[0] == "ok"
    assert applied.reply[1] == "60"
    assert applied.reply[3] == "eur"
    assert await balance_text(cache, wallet_id) == b"60"


async def test_idempotency_record_expires_within_the_ttl(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=10)
    applied = await apply(cache, wallet_id, 1)
    ttl = await cache.client.ttl(cache.idempotency_key(wallet_id, applied.key))
    assert 0 < ttl <= TTL_S
    # The wallet itself never expires.
    assert await cache.client.ttl(cache.wallet_key(wallet_id)) == -1


# apply.lua: the idempotency key ----------------------------------------------


async def test_same_key_is_in_progress_until_committed_then_replays(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    first = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    outbox_id = first.reply[2]

    again = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    assert again.reply == ["in_progress"]

    assert await cache.settle_committed({cache.partition(wallet_id): [outbox_id]}) == {
        cache.partition(wallet_id): [True]
    }
    replay = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    assert replay.reply == ["replay", "700", first.payload.decode(), "usd"]
    # Neither the in-progress answer nor the replay charged again or wrote to the outbox.
    assert await balance_text(cache, wallet_id) == b"700"
    assert outbox_id not in await outbox_ids(cache, wallet_id)
    assert await outbox_ids(cache, wallet_id) == []


async def test_same_key_with_another_request_is_a_conflict(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    first = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    assert (await apply(cache, wallet_id, 300, key="k", request_hash="other")).reply == ["conflict"]
    await cache.settle_committed({cache.partition(wallet_id): [first.reply[2]]})
    assert (await apply(cache, wallet_id, 301, key="k", request_hash="other")).reply == ["conflict"]
    assert await balance_text(cache, wallet_id) == b"700"
    # The key belongs to one wallet: another wallet may use it freely.
    other = await new_wallet(cache, balance_micros=1_000)
    assert (await apply(cache, other, 5, key="k", request_hash="other")).status == "ok"


# apply.lua: refusals ---------------------------------------------------------


async def test_missing_wallet_is_reported_and_nothing_is_written(cache: Cache) -> None:
    wallet_id = uuid.uuid4()
    applied = await apply(cache, wallet_id, 1, key="k")
    assert applied.reply == ["missing"]
    assert await cache.client.exists(cache.wallet_key(wallet_id), cache.idempotency_key(wallet_id, "k")) == 0
    assert await outbox_ids(cache, wallet_id) == []


async def test_frozen_wallet_refuses_debits_and_writes_nothing(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000, status="frozen")
    applied = await apply(cache, wallet_id, 1, key="k")
    assert applied.reply == ["frozen", "1000"]
    assert await balance_text(cache, wallet_id) == b"1000"
    assert await cache.client.exists(cache.idempotency_key(wallet_id, "k")) == 0
    assert await outbox_ids(cache, wallet_id) == []


@pytest.mark.parametrize(("balance", "overdraft"), [(100, 0), (100, 50), (0, 7), (-5, 5)])
async def test_debit_may_reach_exactly_the_overdraft_limit_and_not_one_micro_more(
    cache: Cache, balance: int, overdraft: int
) -> None:
    floor = -overdraft
    one_too_many = await new_wallet(cache, balance_micros=balance, overdraft_limit_micros=overdraft)
    refused = await apply(cache, one_too_many, balance - floor + 1, key="k")
    assert refused.reply == ["insufficient", str(balance)]
    assert await cache.client.exists(cache.idempotency_key(one_too_many, "k")) == 0

    wallet_id = await new_wallet(cache, balance_micros=balance, overdraft_limit_micros=overdraft)
    if balance > floor:
        exact = await apply(cache, wallet_id, balance - floor)
        assert exact.reply[:2] == ["ok", str(floor)]
    assert await balance_text(cache, wallet_id) == str(floor).encode()
    refused = await apply(cache, wallet_id, 1)
    assert refused.reply == ["insufficient", str(floor)]
    assert await balance_text(cache, wallet_id) == str(floor).encode()


async def test_balances_are_exact_up_to_the_bound_and_refused_past_it(cache: Cache) -> None:
    top = str(AMOUNT_MICROS_MAX)  # 9007199254740991
    wallet_id = await new_wallet(cache)
    filled = await apply(cache, wallet_id, AMOUNT_MICROS_MAX, kind="credit")
    assert filled.reply[:2] == ["ok", top]
    assert await balance_text(cache, wallet_id) == top.encode()
    stream = await cache.client.xrange(cache.outbox_key(cache.partition(wallet_id)))
    assert stream[-1][1][b"b"] == top.encode()

    refused = await apply(cache, wallet_id, 1, kind="credit", key="over")
    assert refused.reply == ["too_large", top]
    assert await balance_text(cache, wallet_id) == top.encode()
    assert await cache.client.exists(cache.idempotency_key(wallet_id, "over")) == 0

    # Down by one from the top stays exact (a double would still hold it; a float32 would not).
    down = await apply(cache, wallet_id, 1)
    assert down.reply[:2] == ["ok", str(AMOUNT_MICROS_MAX - 1)]
    assert await balance_text(cache, wallet_id) == str(AMOUNT_MICROS_MAX - 1).encode()


async def test_overdraft_at_the_bound_reaches_minus_max_exactly(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, overdraft_limit_micros=AMOUNT_MICROS_MAX)
    spent = await apply(cache, wallet_id, AMOUNT_MICROS_MAX)
    assert spent.reply[:2] == ["ok", f"-{AMOUNT_MICROS_MAX}"]
    assert await balance_text(cache, wallet_id) == f"-{AMOUNT_MICROS_MAX}".encode()
    refused = await apply(cache, wallet_id, 1)
    assert refused.reply == ["insufficient", f"-{AMOUNT_MICROS_MAX}"]
    back = await apply(cache, wallet_id, AMOUNT_MICROS_MAX, kind="credit")
    assert back.reply[:2] == ["ok", "0"]


# compensate.lua --------------------------------------------------------------


async def test_compensate_refunds_once_and_frees_the_key(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    applied = await apply(cache, wallet_id, 300, key="k")
    outbox_id = applied.reply[2]
    kwargs = {
        "wallet_id": wallet_id,
        "idempotency_key": "k",
        "outbox_id": outbox_id,
        "delta_micros": 300,
        "entry_id": applied.entry_id,
    }
    assert await cache.compensate(**kwargs) is True
    assert await balance_text(cache, wallet_id) == b"1000"
    assert await cache.client.exists(cache.idempotency_key(wallet_id, "k")) == 0
    assert outbox_id not in await outbox_ids(cache, wallet_id)

    assert await cache.compensate(**kwargs) is False
    assert await balance_text(cache, wallet_id) == b"1000"

    # The key is free again: the same request charges anew.
    assert (await apply(cache, wallet_id, 300, key="k")).status == "ok"
    assert await balance_text(cache, wallet_id) == b"700"


async def test_compensate_keeps_a_record_that_belongs_to_another_entry(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    applied = await apply(cache, wallet_id, 300, key="k")
    assert await cache.compensate(
        wallet_id=wallet_id,
        idempotency_key="k",
        outbox_id=applied.reply[2],
        delta_micros=300,
        entry_id=uuid.uuid4(),  # not the record's entry
    )
    assert await balance_text(cache, wallet_id) == b"1000"
    assert (
        await cache.client.hget(cache.idempotency_key(wallet_id, "k"), "id") == str(applied.entry_id).encode()
    )


async def test_compensate_after_commit_settled_it_does_nothing(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    applied = await apply(cache, wallet_id, 300, key="k")
    await cache.settle_committed({cache.partition(wallet_id): [applied.reply[2]]})
    assert not await cache.compensate(
        wallet_id=wallet_id,
        idempotency_key="k",
        outbox_id=applied.reply[2],
        delta_micros=300,
        entry_id=applied.entry_id,
    )
    assert await balance_text(cache, wallet_id) == b"700"
    assert (await apply(cache, wallet_id, 300, key="k")).reply[0] == "replay"


# abandon.lua and settle_reversed.lua -----------------------------------------


@pytest.mark.parametrize("pass_outbox_id", [True, False])
async def test_abandon_then_settle_reversed_refunds_once_and_marks_the_key(
    cache: Cache, pass_outbox_id: bool
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    p = cache.partition(wallet_id)
    applied = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    outbox_id = applied.reply[2]

    abandoned = await cache.abandon(
        wallet_id=wallet_id,
        idempotency_key="k",
        entry_id=applied.entry_id,
        outbox_id=outbox_id if pass_outbox_id else None,
    )
    assert abandoned is True
    assert outbox_id not in await outbox_ids(cache, wallet_id)
    held = json.loads(await cache.client.hget(cache.abandoned_key(p), str(applied.entry_id)))
    assert held == {"e": applied.payload.decode(), "b": "700", "c": "usd"}
    # Abandoned and not yet settled: still in progress, still charged.
    assert (await apply(cache, wallet_id, 300, key="k", request_hash="h")).reply == ["in_progress"]
    assert await balance_text(cache, wallet_id) == b"700"
    # A second abandon, and a commit arriving late, both find nothing to take.
    assert not await cache.abandon(
        wallet_id=wallet_id, idempotency_key="k", entry_id=applied.entry_id, outbox_id=outbox_id
    )
    assert await cache.settle_committed({p: [outbox_id]}) == {p: [False]}

    settle = {
        "wallet_id": wallet_id,
        "idempotency_key": "k",
        "entry_id": applied.entry_id,
        "delta_micros": 300,
    }
    assert await cache.settle_reversed(**settle) is True
    assert await balance_text(cache, wallet_id) == b"1000"
    assert not await cache.client.hexists(cache.abandoned_key(p), str(applied.entry_id))
    record_key = cache.idempotency_key(wallet_id, "k")
    assert await cache.client.hget(record_key, "st") == b"reversed"
    assert 0 < await cache.client.ttl(record_key) <= TTL_S  # marking kept the expiry

    assert await cache.settle_reversed(**settle) is False
    assert await balance_text(cache, wallet_id) == b"1000"

    replayed = await apply(cache, wallet_id, 300, key="k", request_hash="h")
    assert replayed.reply == ["reversed", applied.payload.decode()]
    assert (await apply(cache, wallet_id, 300, key="k", request_hash="x")).reply == ["conflict"]
    assert await balance_text(cache, wallet_id) == b"1000"
    # Compensating the same charge afterwards cannot refund it a second time.
    assert not await cache.compensate(
        wallet_id=wallet_id,
        idempotency_key="k",
        outbox_id=outbox_id,
        delta_micros=300,
        entry_id=applied.entry_id,
    )
    assert await balance_text(cache, wallet_id) == b"1000"


async def test_abandon_refuses_unknown_or_settled_entries(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    p = cache.partition(wallet_id)
    applied = await apply(cache, wallet_id, 300, key="k")
    # A key never charged, and an entry id that is not the record's.
    assert not await cache.abandon(
        wallet_id=wallet_id, idempotency_key="never", entry_id=uuid.uuid4(), outbox_id=None
    )
    assert not await cache.abandon(
        wallet_id=wallet_id, idempotency_key="k", entry_id=uuid.uuid4(), outbox_id=None
    )
    assert await outbox_ids(cache, wallet_id) == [applied.reply[2]]
    # Committed first: nothing left to abandon.
    await cache.settle_committed({p: [applied.reply[2]]})
    assert not await cache.abandon(
        wallet_id=wallet_id, idempotency_key="k", entry_id=applied.entry_id, outbox_id=None
    )
    assert await cache.client.hlen(cache.abandoned_key(p)) == 0
    assert not await cache.settle_reversed(
        wallet_id=wallet_id, idempotency_key="k", entry_id=applied.entry_id, delta_micros=300
    )
    assert await balance_text(cache, wallet_id) == b"700"


async def test_abandoned_credit_is_reversed_with_a_negative_delta(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=0)
    applied = await apply(cache, wallet_id, 250, kind="credit", key="c")
    assert await cache.abandon(
        wallet_id=wallet_id, idempotency_key="c", entry_id=applied.entry_id, outbox_id=applied.reply[2]
    )
    assert await cache.settle_reversed(
        wallet_id=wallet_id, idempotency_key="c", entry_id=applied.entry_id, delta_micros=-250
    )
    assert await balance_text(cache, wallet_id) == b"0"


# settle_committed.lua --------------------------------------------------------


async def test_settle_committed_removes_each_entry_once_across_partitions(cache: Cache) -> None:
    by_partition: dict[int, list[str]] = {}
    while len(by_partition) < 2:
        wallet_id = await new_wallet(cache, balance_micros=100)
        applied = await apply(cache, wallet_id, 1)
        by_partition.setdefault(cache.partition(wallet_id), []).append(applied.reply[2])
    first = await cache.settle_committed(by_partition)
    assert first == {p: [True] * len(ids) for p, ids in by_partition.items()}
    second = await cache.settle_committed(by_partition)
    assert second == {p: [False] * len(ids) for p, ids in by_partition.items()}
    for p in by_partition:
        assert await cache.client.xlen(cache.outbox_key(p)) == 0


async def test_settle_committed_reports_per_id(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=100)
    p = cache.partition(wallet_id)
    a = await apply(cache, wallet_id, 1)
    b = await apply(cache, wallet_id, 2)
    assert await cache.settle_committed({p: [a.reply[2]]}) == {p: [True]}
    assert await cache.settle_committed({p: [a.reply[2], b.reply[2]]}) == {p: [False, True]}
    assert await cache.settle_committed({}) == {}


# load_wallet.lua ---------------------------------------------------------------


async def test_load_wallet_loads_if_absent_and_overwrites_only_when_asked(cache: Cache) -> None:
    wallet_id = uuid.uuid4()
    assert await cache.wallet(wallet_id) is None
    first = CachedWallet(500, 10, "active", "usd")
    assert await cache.load_wallet(wallet_id, first, overwrite=False) is True
    assert await cache.wallet(wallet_id) == first

    second = CachedWallet(-7, 20, "frozen", "usd")
    assert await cache.load_wallet(wallet_id, second, overwrite=False) is False
    assert await cache.wallet(wallet_id) == first

    assert await cache.load_wallet(wallet_id, second, overwrite=True) is True
    assert await cache.wallet(wallet_id) == second
    assert await cache.balances([wallet_id, uuid.uuid4()]) == [-7, None]
    # The overwritten status takes effect at once.
    assert (await apply(cache, wallet_id, 1)).reply == ["frozen", "-7"]


async def test_load_wallet_keeps_the_largest_balance_exact(cache: Cache) -> None:
    wallet_id = uuid.uuid4()
    exact = CachedWallet(-AMOUNT_MICROS_MAX, AMOUNT_MICROS_MAX, "active", "jpy")
    assert await cache.load_wallet(wallet_id, exact, overwrite=True)
    assert await balance_text(cache, wallet_id) == f"-{AMOUNT_MICROS_MAX}".encode()
    assert await cache.wallet(wallet_id) == exact


@pytest.mark.xfail(
    strict=True,
    reason="BUG: compensate.lua / settle_reversed.lua refund with an unchecked HINCRBY, so a debit "
    "refunded after a credit near the bound leaves the balance above 2**53 - 1",
)
async def test_a_refund_never_takes_the_balance_past_the_bound(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=50, overdraft_limit_micros=100)
    pending = await apply(cache, wallet_id, 100, key="d")  # charged, not yet committed
    assert pending.reply[:2] == ["ok", "-50"]
    # A credit while the debit is in flight: refusing it (too_large) or accepting it are both fine...
    await apply(cache, wallet_id, AMOUNT_MICROS_MAX, kind="credit", key="c")
    # ...but the debit's ledger write then fails definitely and is refunded.
    assert await cache.compensate(
        wallet_id=wallet_id,
        idempotency_key="d",
        outbox_id=pending.reply[2],
        delta_micros=100,
        entry_id=pending.entry_id,
    )
    balance = int(await balance_text(cache, wallet_id))
    assert -AMOUNT_MICROS_MAX <= balance <= AMOUNT_MICROS_MAX
