"""hold.lua, capture.lua and end_hold.lua, run through wallet.cache.Cache on a real Redis, reserve,
capture and end each hold exactly once, refuse what they must without writing anything, never let
balance - held pass -overdraft_limit, keep amounts exact up to 2**53 - 1, and append every step to
the partition's hold event stream in a form wallet/holds.py records in Postgres."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
import redis.exceptions
from conftest import Harness
from lua_support import as_sent
from redis.crc import key_slot

from centime.money import AMOUNT_MICROS_MAX
from ledger.ids import uuid7
from wallet import repo
from wallet.cache import Cache, CachedWallet, Clearing, Undo, WalletChange, new_hold_id
from wallet.charges import decode_payload, encode_payload
from wallet.holds import capture_key, event_row, expire_due, record_events
from wallet.schemas import EntryPayload, HoldPayload

TTL_S = 120
EXPIRES_IN_S = 300
HOLDS_MAX = 1000
EXPIRY_WAIT_S = 5.0
_TAG = re.compile(r"\{([^}]*)\}")
_CAPTURE_HEAD = b'{"amount_micros":1'
"""As wallet/holds.py: a capture's payload is encoded with amount 1 and sent without this head."""
_hold_encoder = msgspec.json.Encoder(order="sorted")


# Helpers -----------------------------------------------------------------------


async def new_wallet(
    cache: Cache,
    *,
    balance_micros: int = 0,
    overdraft_limit_micros: int = 0,
    status: str = "active",
    currency: str = "usd",
) -> uuid.UUID:
    wallet_id = uuid.uuid4()
    wallet = CachedWallet(balance_micros, overdraft_limit_micros, status, currency)
    assert await cache.load_wallet(wallet_id, wallet, overwrite=False) is True
    return wallet_id


class Held(msgspec.Struct, frozen=True):
    reply: list[str]
    hold_id: uuid.UUID
    wallet_id: uuid.UUID
    amount_micros: int
    key: str
    payload: bytes

    @property
    def status(self) -> str:
        return self.reply[0]


async def hold(
    cache: Cache,
    wallet_id: uuid.UUID,
    amount_micros: int | str,
    *,
    key: str | None = None,
    request_hash: str = "hash-h",
    expires_in_s: int | str = EXPIRES_IN_S,
    ttl_s: int = TTL_S,
    hold_id: uuid.UUID | None = None,
    holds_max: int | str = HOLDS_MAX,
) -> Held:
    key = key or secrets.token_hex(8)
    hold_id = hold_id or new_hold_id(wallet_id)
    payload = _hold_encoder.encode(
        HoldPayload(
            id=hold_id,
            wallet_id=wallet_id,
            amount_micros=amount_micros if isinstance(amount_micros, int) else 1,
            idempotency_key=key,
            request_hash=request_hash,
            description="stream",
            metadata={"model": "m"},
            created_at=datetime.now(UTC),
        )
    )
    reply = await cache.hold(
        hold_id=hold_id,
        wallet_id=wallet_id,
        amount_micros=amount_micros,  # type: ignore[arg-type]  (bad values on purpose)
        request_hash=request_hash,
        payload=payload,
        expires_in_s=expires_in_s,  # type: ignore[arg-type]
        idempotency_key=key,
        ttl_s=ttl_s,
        holds_max=holds_max,  # type: ignore[arg-type]  (bad values on purpose)
    )
    amount = amount_micros if isinstance(amount_micros, int) else 0
    return Held(as_sent(reply), hold_id, wallet_id, amount, key, payload)


class Captured(msgspec.Struct, frozen=True):
    reply: list[str]
    held: Held
    entry_id: uuid.UUID
    tail: bytes

    @property
    def status(self) -> str:
        return self.reply[0]

    def payload(self, captured_micros: int) -> bytes:
        return b'{"amount_micros":' + str(captured_micros).encode() + self.tail

    def clearing(self) -> Clearing:
        # capture.lua's ok reply: captured, balance after, outbox id, currency, epoch, event id
        return Clearing(self.reply[3], self.entry_id, self.held.wallet_id, 0, self.reply[5])


async def capture(
    cache: Cache,
    held: Held,
    requested_micros: int | str,
    *,
    request_hash: str | None = None,
    wallet_id: uuid.UUID | None = None,
) -> Captured:
    entry_id = uuid7()
    encoded = encode_payload(
        EntryPayload(
            id=entry_id,
            wallet_id=held.wallet_id,
            kind="debit",
            amount_micros=1,
            idempotency_key=capture_key(held.hold_id),
            request_hash=request_hash or f"capture-{requested_micros}",
            description="stream",
            metadata={"model": "m"},
            created_at=datetime.now(UTC),
        )
    )
    assert encoded.startswith(_CAPTURE_HEAD)
    tail = encoded[len(_CAPTURE_HEAD) :]
    reply = await cache.capture(
        hold_id=held.hold_id,
        wallet_id=wallet_id or held.wallet_id,
        requested_micros=requested_micros,  # type: ignore[arg-type]  (bad values on purpose)
        request_hash=request_hash or f"capture-{requested_micros}",
        entry_id=entry_id,
        payload_tail=tail,
        idempotency_key=capture_key(held.hold_id),
        ttl_s=TTL_S,
    )
    return Captured(as_sent(reply), held, entry_id, tail)


async def end_hold(cache: Cache, held: Held, status: str, *, wallet_id: uuid.UUID | None = None) -> list[str]:
    return as_sent(await cache.end_hold(held.hold_id, wallet_id or held.wallet_id, status))


async def wallet_fields(cache: Cache, wallet_id: uuid.UUID) -> dict[str, str]:
    raw = await cache.client.hgetall(cache.wallet_key(wallet_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def balance_and_held(cache: Cache, wallet_id: uuid.UUID) -> tuple[int, int]:
    b, h = await cache.client.hmget(cache.wallet_key(wallet_id), "b", "h")
    assert b is not None
    return int(b), int(h or 0)


async def active_holds(cache: Cache, wallet_id: uuid.UUID) -> int:
    """The wallet's count of active holds (n), the one hold.lua bounds."""
    return int(await cache.client.hget(cache.wallet_key(wallet_id), "n") or 0)


async def hold_fields(cache: Cache, held: Held) -> dict[str, str]:
    raw = await cache.client.hgetall(cache.hold_key(held.hold_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def events(cache: Cache, wallet_id: uuid.UUID) -> list[tuple[str, dict[bytes, bytes]]]:
    return await cache.hold_events(cache.partition(wallet_id), before_ms=None, count=1000)


async def event_kinds(cache: Cache, wallet_id: uuid.UUID) -> list[str]:
    return [fields[b"k"].decode() for _, fields in await events(cache, wallet_id)]


async def due_members(cache: Cache, wallet_id: uuid.UUID) -> list[str]:
    members = await cache.client.zrange(cache.hold_expiry_key(cache.partition(wallet_id)), 0, -1)
    return [m.decode() for m in members]


async def outbox(cache: Cache, wallet_id: uuid.UUID) -> list[tuple[str, dict[bytes, bytes]]]:
    entries = await cache.client.xrange(cache.outbox_key(cache.partition(wallet_id)))
    return [(entry_id.decode(), fields) for entry_id, fields in entries]


async def snapshot(cache: Cache, held: Held) -> dict[str, object]:
    """Everything the three scripts write, for 'wrote nothing' checks."""
    wallet_id = held.wallet_id
    return {
        "wallet": await wallet_fields(cache, wallet_id),
        "hold": await hold_fields(cache, held),
        "record": await cache.client.hgetall(cache.hold_idempotency_key(wallet_id, held.key)),
        "capture_record": await cache.client.hgetall(
            cache.idempotency_key(wallet_id, capture_key(held.hold_id))
        ),
        "due": await due_members(cache, wallet_id),
        "events": await events(cache, wallet_id),
        "outbox": await outbox(cache, wallet_id),
    }


async def wait_until_due(cache: Cache, held: Held) -> None:
    """Poll the Redis clock (the one the scripts read) until the hold's time has come."""
    expires_ms = int((await hold_fields(cache, held))["x"])
    deadline = time.monotonic() + EXPIRY_WAIT_S
    while await cache.server_time_ms() < expires_ms:
        assert time.monotonic() < deadline, "the Redis clock did not reach the hold's expiry"
        await asyncio.sleep(0.05)


def tag(key: str) -> str:
    match = _TAG.search(key)
    assert match is not None, key
    return match.group(1)


# hold.lua: reserving -------------------------------------------------------------


async def test_a_hold_reserves_and_writes_its_hash_record_expiry_and_event(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    before_ms = await cache.server_time_ms()
    held = await hold(cache, wallet_id, 400, key="k1", request_hash="h1", expires_in_s=60)
    after_ms = await cache.server_time_ms()
    status, hold_id, expires_ms, event_id = held.reply
    assert (status, hold_id) == ("ok", str(held.hold_id))
    assert before_ms + 60_000 <= int(expires_ms) <= after_ms + 60_000

    assert await balance_and_held(cache, wallet_id) == (1_000, 400)
    assert await active_holds(cache, wallet_id) == 1
    assert (await cache.wallet(wallet_id)) == CachedWallet(1_000, 0, "active", "usd", held_micros=400)
    assert await hold_fields(cache, held) == {
        "w": str(wallet_id),
        "a": "400",
        "st": "held",
        "x": expires_ms,
        "c": "usd",
        "d": held.payload.decode(),
        "i": str(TTL_S),
    }
    assert await cache.client.hgetall(cache.hold_idempotency_key(wallet_id, "k1")) == {
        b"h": b"h1",
        b"id": hold_id.encode(),
    }
    # The record outlives the hold's expiry by the idempotency TTL; the hold itself never
    # expires while held (the wallet's h counts it), and is kept that long once it ends.
    assert 60 < await cache.client.ttl(cache.hold_idempotency_key(wallet_id, "k1")) <= 60 + TTL_S
    assert await cache.client.ttl(cache.hold_key(held.hold_id)) == -1
    assert await due_members(cache, wallet_id) == [f"{hold_id}:{wallet_id}"]
    score = await cache.client.zscore(
        cache.hold_expiry_key(cache.partition(wallet_id)), f"{hold_id}:{wallet_id}"
    )
    assert score == int(expires_ms)

    ((found_id, fields),) = await events(cache, wallet_id)
    assert found_id == event_id
    assert set(fields) == {b"d", b"k", b"x", b"t", b"c"}
    assert (fields[b"d"], fields[b"k"], fields[b"x"], fields[b"c"]) == (
        held.payload,
        b"held",
        expires_ms.encode(),
        b"usd",
    )
    assert before_ms <= int(fields[b"t"]) <= after_ms
    row = event_row(fields)
    assert (row.hold_id, row.kind, row.wallet_id, row.amount_micros, row.currency) == (
        held.hold_id,
        "held",
        wallet_id,
        400,
        "usd",
    )
    assert (row.requested_micros, row.captured_micros, row.entry_id) == (None, None, None)
    assert row.expires_at == datetime.fromtimestamp(int(expires_ms) / 1000, UTC)
    assert (row.idempotency_key, row.description, msgspec.json.decode(row.metadata)) == (
        "k1",
        "stream",
        {"model": "m"},
    )
    state = await cache.hold_state(held.hold_id)
    assert state is not None
    assert (state.status, state.amount_micros, state.wallet_id, state.ended_at_ms) == (
        "held",
        400,
        wallet_id,
        None,
    )


async def test_every_key_of_a_hold_is_in_its_wallets_partition(cache: Cache) -> None:
    for _ in range(32):
        wallet_id = uuid.uuid4()
        hold_id = new_hold_id(wallet_id)
        p = cache.partition(wallet_id)
        assert cache.hold_partition(hold_id) == p
        assert hold_id.version == 7
        keys = [
            cache.wallet_key(wallet_id),
            cache.hold_key(hold_id),
            cache.hold_idempotency_key(wallet_id, "{evil}}{x"),
            cache.idempotency_key(wallet_id, capture_key(hold_id)),
            cache.hold_expiry_key(p),
            cache.hold_events_key(p),
            cache.outbox_key(p),
            cache.abandoned_key(p),
        ]
        assert {tag(k) for k in keys} == {f"p{p}"}
        assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_a_hold_replays_its_key_and_conflicts_with_another_body(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    first = await hold(cache, wallet_id, 300, key="k", request_hash="h")
    assert first.status == "ok"
    before = await snapshot(cache, first)

    again = await hold(cache, wallet_id, 300, key="k", request_hash="h")
    assert again.reply == ["replay", str(first.hold_id)]
    other = await hold(cache, wallet_id, 301, key="k", request_hash="other")
    assert other.reply == ["conflict"]
    assert await snapshot(cache, first) == before  # one hold, one event, held once
    assert await cache.client.exists(cache.hold_key(again.hold_id), cache.hold_key(other.hold_id)) == 0

    # Still so after the hold ended; another wallet may use the key freely.
    assert (await end_hold(cache, first, "released"))[:2] == ["ok", "released"]
    assert (await hold(cache, wallet_id, 300, key="k", request_hash="h")).reply == [
        "replay",
        str(first.hold_id),
    ]
    assert (await hold(cache, wallet_id, 1, key="k", request_hash="x")).reply == ["conflict"]
    assert await balance_and_held(cache, wallet_id) == (1_000, 0)
    elsewhere = await new_wallet(cache, balance_micros=10)
    assert (await hold(cache, elsewhere, 5, key="k", request_hash="x")).status == "ok"


@pytest.mark.parametrize(("balance", "overdraft"), [(1_000, 0), (1_000, 200), (0, 500), (-100, 300)])
async def test_a_hold_counts_other_holds_and_the_overdraft_limit(
    cache: Cache, balance: int, overdraft: int
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=balance, overdraft_limit_micros=overdraft)
    room = balance + overdraft
    first = await hold(cache, wallet_id, 100)
    assert first.status == "ok"
    refused = await hold(cache, wallet_id, room - 100 + 1, key="over")
    assert refused.reply == ["insufficient", str(balance), "100"]
    assert (
        await cache.client.exists(
            cache.hold_idempotency_key(wallet_id, "over"), cache.hold_key(refused.hold_id)
        )
        == 0
    )
    exact = await hold(cache, wallet_id, room - 100)
    assert exact.status == "ok"
    assert await balance_and_held(cache, wallet_id) == (balance, room)
    assert (await hold(cache, wallet_id, 1)).reply == ["insufficient", str(balance), str(room)]
    assert await event_kinds(cache, wallet_id) == ["held", "held"]
    assert len(await due_members(cache, wallet_id)) == 2


async def test_debits_only_spend_what_holds_leave_available(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000, overdraft_limit_micros=100)
    assert (await hold(cache, wallet_id, 800)).status == "ok"
    debit = dict(kind="debit", request_hash="d", payload=b"{}", ttl_s=TTL_S)
    refused = await cache.apply(
        wallet_id=wallet_id, amount_micros=301, entry_id=uuid7(), idempotency_key="a", **debit
    )
    assert as_sent(refused) == ["insufficient", "1000"]
    spent = await cache.apply(
        wallet_id=wallet_id, amount_micros=300, entry_id=uuid7(), idempotency_key="b", **debit
    )
    assert as_sent(spent)[:2] == ["ok", "700"]
    assert await balance_and_held(cache, wallet_id) == (700, 800)  # 700 - 800 = -100: the limit exactly
    assert (await hold(cache, wallet_id, 1)).reply == ["insufficient", "700", "800"]


async def test_a_frozen_wallet_refuses_holds_and_writes_nothing(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000, overdraft_limit_micros=50, status="frozen")
    before = await wallet_fields(cache, wallet_id)
    refused = await hold(cache, wallet_id, 1, key="k")
    assert refused.reply == ["frozen", "1000"]
    after = await snapshot(cache, refused)
    assert after["wallet"] == before
    assert not any(after[name] for name in ("hold", "record", "due", "events"))


@pytest.mark.parametrize("partial", [None, {"b": "5"}, {"b": "5", "o": "0", "s": "active", "c": "usd"}])
async def test_a_hold_on_a_missing_or_partial_wallet_asks_for_a_load(
    cache: Cache, partial: dict[str, str] | None
) -> None:
    wallet_id = uuid.uuid4()
    if partial:
        await cache.client.hset(cache.wallet_key(wallet_id), mapping=partial)
    refused = await hold(cache, wallet_id, 1, key="k")
    assert refused.reply == ["missing"]
    after = await snapshot(cache, refused)
    assert after["wallet"] == (partial or {})
    assert not any(after[name] for name in ("hold", "record", "due", "events"))


async def test_hold_amounts_are_exact_from_one_micro_to_the_bound(cache: Cache) -> None:
    top = AMOUNT_MICROS_MAX
    wallet_id = await new_wallet(cache, balance_micros=1)
    assert (await hold(cache, wallet_id, 1)).status == "ok"
    assert (await hold(cache, wallet_id, 1)).reply == ["insufficient", "1", "1"]

    # The largest balance and overdraft: held may reach both, exactly, and not one micro more.
    wallet_id = await new_wallet(cache, balance_micros=top, overdraft_limit_micros=top)
    first = await hold(cache, wallet_id, top)
    second = await hold(cache, wallet_id, top)
    assert first.status == second.status == "ok"
    assert await balance_and_held(cache, wallet_id) == (top, 2 * top)
    assert (await hold(cache, wallet_id, 1)).reply == ["insufficient", str(top), str(2 * top)]
    # A capture of all of it takes the balance to -top exactly and frees both holds.
    taken = await capture(cache, first, top)
    assert taken.reply[:3] == ["ok", str(top), "0"]
    taken = await capture(cache, second, top)
    assert taken.reply[:3] == ["ok", str(top), str(-top)]
    assert await balance_and_held(cache, wallet_id) == (-top, 0)
    assert (await capture(cache, second, top)).reply[:3] == ["replay", str(top), str(top)]


@pytest.mark.parametrize("expires_in_s", [1, 86_400])
async def test_expires_in_s_sets_the_expiry_by_the_redis_clock(cache: Cache, expires_in_s: int) -> None:
    wallet_id = await new_wallet(cache, balance_micros=10)
    before_ms = await cache.server_time_ms()
    held = await hold(cache, wallet_id, 1, expires_in_s=expires_in_s)
    after_ms = await cache.server_time_ms()
    assert held.status == "ok"
    assert before_ms + expires_in_s * 1000 <= int(held.reply[2]) <= after_ms + expires_in_s * 1000


@pytest.mark.parametrize(
    ("amount", "expires_in_s", "ttl_s"),
    [
        (0, 1, TTL_S),
        (-1, 1, TTL_S),
        (AMOUNT_MICROS_MAX + 1, 1, TTL_S),
        ("1.5", 1, TTL_S),
        ("1e3", 1, TTL_S),
        ("0x10", 1, TTL_S),
        (" 7", 1, TTL_S),
        ("", 1, TTL_S),
        ("abc", 1, TTL_S),
        (1, 0, TTL_S),
        (1, -1, TTL_S),
        (1, "1.5", TTL_S),
        (1, "soon", TTL_S),
        (1, 1, 0),
        (1, 1, -5),
    ],
)
async def test_a_hold_with_bad_arguments_is_an_error_that_writes_nothing(
    cache: Cache, amount: int | str, expires_in_s: int | str, ttl_s: int
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000_000)
    before = await wallet_fields(cache, wallet_id)
    with pytest.raises(redis.exceptions.ResponseError, match="hold: bad amount, expiry, ttl or bound"):
        await hold(cache, wallet_id, amount, expires_in_s=expires_in_s, ttl_s=ttl_s, key="k")
    assert await wallet_fields(cache, wallet_id) == before
    keys = [cache.hold_idempotency_key(wallet_id, "k")]
    assert await cache.client.exists(*keys) == 0
    assert await due_members(cache, wallet_id) == []
    assert await events(cache, wallet_id) == []


@pytest.mark.parametrize("holds_max", [0, -1, "1.5", "", "many"])
async def test_a_hold_with_a_bad_bound_is_an_error_that_writes_nothing(
    cache: Cache, holds_max: int | str
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    before = await wallet_fields(cache, wallet_id)
    with pytest.raises(redis.exceptions.ResponseError, match="hold: bad amount, expiry, ttl or bound"):
        await hold(cache, wallet_id, 1, holds_max=holds_max, key="k")
    assert await wallet_fields(cache, wallet_id) == before
    assert await due_members(cache, wallet_id) == []


async def test_a_wallet_has_at_most_holds_max_active_holds_and_each_end_gives_one_back(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    released, captured = (
        await hold(cache, wallet_id, 1, holds_max=3),
        await hold(cache, wallet_id, 1, holds_max=3),
    )
    expiring = await hold(cache, wallet_id, 1, holds_max=3, expires_in_s=1)
    assert [h.status for h in (released, captured, expiring)] == ["ok", "ok", "ok"]
    before = await wallet_fields(cache, wallet_id)
    refused = await hold(cache, wallet_id, 1, holds_max=3)
    assert refused.reply == ["too_many", "3"]
    after = await snapshot(cache, refused)
    assert after["wallet"] == before and before["n"] == "3"
    assert not any(after[name] for name in ("hold", "record"))
    assert len(after["due"]) == 3 and len(after["events"]) == 3
    # A replay of a key held before is still a replay at the bound, not a refusal.
    assert (await hold(cache, wallet_id, 1, holds_max=3, key=released.key)).reply == [
        "replay",
        str(released.hold_id),
    ]
    # A lower bound than the wallet has refuses, and ends nothing.
    assert (await hold(cache, wallet_id, 1, holds_max=2)).reply == ["too_many", "3"]
    # Released, captured, expired: each gives one back.
    assert (await end_hold(cache, released, "released"))[:2] == ["ok", "released"]
    assert await active_holds(cache, wallet_id) == 2
    assert (await capture(cache, captured, 1)).status == "ok"
    assert await active_holds(cache, wallet_id) == 1
    await wait_until_due(cache, expiring)
    assert await expire_due(cache, now_ms=await cache.server_time_ms(), budget=10) == 1
    assert await active_holds(cache, wallet_id) == 0
    # Ending twice gives nothing more back.
    assert (await end_hold(cache, released, "released"))[0] == "ended"
    assert await active_holds(cache, wallet_id) == 0
    assert [(await hold(cache, wallet_id, 1, holds_max=3)).status for _ in range(4)] == ["ok"] * 3 + [
        "too_many"
    ]


async def test_a_capture_after_expiry_gives_its_place_back(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    expiring = await hold(cache, wallet_id, 1, holds_max=1, expires_in_s=1)
    assert (await hold(cache, wallet_id, 1, holds_max=1)).reply == ["too_many", "1"]
    await wait_until_due(cache, expiring)
    assert (await capture(cache, expiring, 1)).reply == ["ended", "expired"]
    assert await active_holds(cache, wallet_id) == 0
    assert (await hold(cache, wallet_id, 1, holds_max=1)).status == "ok"


async def test_concurrent_holds_never_pass_the_bound(cache: Cache) -> None:
    """One script step counts and adds: of 60 holds at once under a bound of 5, exactly 5 hold."""
    wallet_id = await new_wallet(cache, balance_micros=1_000_000)
    replies = await asyncio.gather(*(hold(cache, wallet_id, 1, holds_max=5) for _ in range(60)))
    statuses = sorted(r.status for r in replies)
    assert statuses == ["ok"] * 5 + ["too_many"] * 55
    assert await active_holds(cache, wallet_id) == 5
    assert await balance_and_held(cache, wallet_id) == (1_000_000, 5)
    assert len(await due_members(cache, wallet_id)) == 5


# capture.lua -------------------------------------------------------------------


async def test_a_capture_debits_the_cost_releases_the_hold_and_writes_an_ordinary_charge(
    cache: Cache,
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 500)
    epoch = (await wallet_fields(cache, wallet_id))["e"]
    before_ms = await cache.server_time_ms()
    taken = await capture(cache, held, 300)
    status, captured, after, outbox_id, currency, charged_epoch, event_id, ended_ms = taken.reply
    assert (status, captured, after, currency, charged_epoch) == ("ok", "300", "700", "usd", epoch)
    assert int(ended_ms) >= before_ms
    assert await balance_and_held(cache, wallet_id) == (700, 0)

    # The charge is the debit path's: an outbox entry and an idempotency record keyed hold:<id>.
    ((found_id, fields),) = await outbox(cache, wallet_id)
    assert found_id == outbox_id
    assert fields == {b"e": taken.payload(300), b"b": b"700", b"c": b"usd", b"w": epoch.encode()}
    entry = decode_payload(fields[b"e"])
    assert (entry.id, entry.amount_micros, entry.kind, entry.idempotency_key) == (
        taken.entry_id,
        300,
        "debit",
        f"hold:{held.hold_id}",
    )
    record_key = cache.idempotency_key(wallet_id, capture_key(held.hold_id))
    assert await cache.client.hgetall(record_key) == {
        b"h": b"capture-300",
        b"id": str(taken.entry_id).encode(),
        b"e": taken.payload(300),
        b"b": b"700",
        b"x": outbox_id.encode(),
        b"st": b"ok",
        b"c": b"usd",
    }
    assert await cache.client.ttl(record_key) >= TTL_S - 5

    fields_now = await hold_fields(cache, held)
    assert (fields_now["st"], fields_now["r"], fields_now["k"], fields_now["n"]) == (
        "captured",
        "300",
        "300",
        str(taken.entry_id),
    )
    assert int(fields_now["t"]) >= before_ms
    assert 0 < await cache.client.ttl(cache.hold_key(held.hold_id)) <= TTL_S  # ended: kept, then let go
    assert await due_members(cache, wallet_id) == []

    (_, held_event), (found_event, captured_event) = await events(cache, wallet_id)
    assert found_event == event_id
    assert captured_event[b"k"] == b"captured"
    assert (captured_event[b"r"], captured_event[b"a"], captured_event[b"n"]) == (
        b"300",
        b"300",
        str(taken.entry_id).encode(),
    )
    assert (captured_event[b"d"], captured_event[b"x"], captured_event[b"t"]) == (
        held.payload,
        held_event[b"x"],
        fields_now["t"].encode(),
    )
    row = event_row(captured_event)
    assert (row.kind, row.requested_micros, row.captured_micros, row.entry_id) == (
        "captured",
        300,
        300,
        taken.entry_id,
    )


async def test_a_capture_replays_while_in_progress_then_committed_and_conflicts_on_another_amount(
    cache: Cache,
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 500)
    taken = await capture(cache, held, 600)
    assert taken.reply[:3] == ["ok", "600", "400"]
    before = await snapshot(cache, held)

    in_progress = await capture(cache, held, 600)
    assert in_progress.reply == [
        "replay",
        "600",
        "600",
        str(taken.entry_id),
        "in_progress",
        taken.payload(600).decode(),
        "400",
        "usd",
    ]
    assert (await capture(cache, held, 599)).reply == ["conflict"]
    assert await snapshot(cache, held) == before  # replays and conflicts write nothing

    assert await cache.clear_committed({cache.partition(wallet_id): [taken.clearing()]}) == {
        cache.partition(wallet_id): [1]
    }
    committed = await capture(cache, held, 600)
    assert committed.reply[4] == "ok"
    assert committed.reply[:4] == in_progress.reply[:4]
    assert await balance_and_held(cache, wallet_id) == (400, 0)
    assert await event_kinds(cache, wallet_id) == ["held", "captured"]


async def test_a_capture_replay_reports_reversed_and_gone(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    first = await hold(cache, wallet_id, 100)
    second = await hold(cache, wallet_id, 100)
    one = await capture(cache, first, 100)
    two = await capture(cache, second, 100)
    record_one = cache.idempotency_key(wallet_id, capture_key(first.hold_id))
    # The first is abandoned and reversed by the sweeper; the second compensated (its key freed).
    assert await cache.abandon(
        wallet_id=wallet_id,
        idempotency_key=capture_key(first.hold_id),
        entry_id=one.entry_id,
        outbox_id=one.reply[3],
    )
    assert await cache.client.hget(record_one, "id") == str(one.entry_id).encode()
    assert (await capture(cache, first, 100)).reply[4] == "in_progress"  # waiting for the sweeper
    assert await cache.refund_abandoned(
        wallet_id=wallet_id,
        idempotency_key=capture_key(first.hold_id),
        entry_id=one.entry_id,
        undo=_undo(one, 100),
        mark_reversed=True,
    )
    assert (await capture(cache, first, 100)).reply[4] == "reversed"
    assert await cache.compensate(
        wallet_id=wallet_id,
        idempotency_key=capture_key(second.hold_id),
        outbox_id=two.reply[3],
        undo=_undo(two, 100),
        entry_id=two.entry_id,
    )
    gone = await capture(cache, second, 100)
    assert gone.reply[:5] == ["replay", "100", "100", str(two.entry_id), "gone"]
    # Both refunded; both holds stay captured (nothing is captured twice) and held nothing.
    assert await balance_and_held(cache, wallet_id) == (1_000, 0)
    assert (await hold_fields(cache, first))["st"] == (await hold_fields(cache, second))["st"] == "captured"
    assert await outbox(cache, wallet_id) == []


def _undo(taken: Captured, amount_micros: int) -> Undo:
    return Undo("b", amount_micros, taken.reply[5])


@pytest.mark.parametrize(
    ("balance", "overdraft", "other_hold", "amount", "requested", "captured"),
    [
        # Over the hold, within the limit: all of it.
        (1_000, 500, 300, 600, 900, 900),
        (1_000, 0, 0, 100, 1_000, 1_000),
        # Over what the limit allows (other holds still count): what it allows.
        (100, 500, 0, 300, 1_000, 600),
        (1_000, 500, 300, 600, 1_300, 1_200),
        (1_000, 0, 400, 600, 601, 600),
        # Under the hold: the cost, and the rest is released.
        (1_000, 0, 0, 600, 1, 1),
    ],
)
async def test_a_capture_takes_the_cost_as_far_as_the_limit_allows(
    cache: Cache, balance: int, overdraft: int, other_hold: int, amount: int, requested: int, captured: int
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=balance, overdraft_limit_micros=overdraft)
    held = await hold(cache, wallet_id, amount)
    assert held.status == "ok"
    if other_hold:
        assert (await hold(cache, wallet_id, other_hold)).status == "ok"
    taken = await capture(cache, held, requested)
    assert taken.reply[:3] == ["ok", str(captured), str(balance - captured)]
    b, h = await balance_and_held(cache, wallet_id)
    assert (b, h) == (balance - captured, other_hold)
    assert b - h >= -overdraft
    (_, fields) = (await outbox(cache, wallet_id))[0]
    assert decode_payload(fields[b"e"]).amount_micros == captured
    row = event_row((await events(cache, wallet_id))[-1][1])
    assert (row.requested_micros, row.captured_micros) == (requested, captured)


async def test_a_capture_with_nothing_capturable_captures_zero_and_writes_no_entry(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 300)
    # A clawback (a refund or a dispute) may take a wallet below its limit: then nothing is capturable.
    assert await cache.apply_changes(wallet_id, [WalletChange(seq=1, delta_micros=-2_000, status=None)]) == (
        0,
        1,
    )
    taken = await capture(cache, held, 500)
    status, captured, after, outbox_id, currency, _epoch, event_id, _ended_ms = taken.reply
    assert (status, captured, after, outbox_id, currency) == ("ok", "0", "", "", "usd")
    assert await balance_and_held(cache, wallet_id) == (-1_000, 0)  # the hold is released all the same
    assert await outbox(cache, wallet_id) == []
    assert await cache.client.exists(cache.idempotency_key(wallet_id, capture_key(held.hold_id))) == 0
    fields = await hold_fields(cache, held)
    assert (fields["st"], fields["r"], fields["k"], fields["n"]) == ("captured", "500", "0", "")
    state = await cache.hold_state(held.hold_id)
    assert state is not None and (state.captured_micros, state.entry_id) == (0, None)
    ((found_id, last),) = (await events(cache, wallet_id))[1:]
    assert found_id == event_id
    row = event_row(last)
    assert (row.kind, row.requested_micros, row.captured_micros, row.entry_id) == ("captured", 500, 0, None)
    assert (await capture(cache, held, 500)).reply == ["replay", "0", "500", "", "none", "", "", "usd"]
    assert (await capture(cache, held, 501)).reply == ["conflict"]


@pytest.mark.parametrize("overdraft", [0, 10_000])
async def test_a_frozen_wallet_pays_at_most_what_was_held(cache: Cache, overdraft: int) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000, overdraft_limit_micros=overdraft)
    held = await hold(cache, wallet_id, 300)
    other = await hold(cache, wallet_id, 100)
    assert await cache.apply_changes(wallet_id, [WalletChange(seq=1, delta_micros=0, status="frozen")]) == (
        0,
        1,
    )
    taken = await capture(cache, held, 800)
    assert taken.reply[:3] == ["ok", "300", "700"]
    assert await balance_and_held(cache, wallet_id) == (700, 100)
    # Under the hold, a frozen wallet still pays the cost.
    assert (await capture(cache, other, 40)).reply[:3] == ["ok", "40", "660"]
    assert await balance_and_held(cache, wallet_id) == (660, 0)
    # And a new hold is refused.
    assert (await hold(cache, wallet_id, 1)).reply == ["frozen", "660"]


async def test_a_capture_of_an_unknown_hold_or_another_wallets_is_not_found(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 100)
    before = await snapshot(cache, held)
    other = await new_wallet(cache, balance_micros=1_000)
    assert (await capture(cache, held, 50, wallet_id=other)).reply == ["not_found"]
    ghost = Held([], new_hold_id(wallet_id), wallet_id, 1, "ghost", b"")
    assert (await capture(cache, ghost, 50)).reply == ["not_found"]
    assert await snapshot(cache, held) == before
    assert await balance_and_held(cache, other) == (1_000, 0)


async def test_a_capture_on_a_missing_wallet_asks_for_a_load_and_writes_nothing(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 400)
    await cache.client.delete(cache.wallet_key(wallet_id))
    before = await snapshot(cache, held)
    assert (await capture(cache, held, 100)).reply == ["missing"]
    assert await snapshot(cache, held) == before
    # Loaded again from the ledger: the holds reserved went with the lost hash, never below zero.
    assert await cache.load_wallet(wallet_id, CachedWallet(1_000, 0, "active", "usd"), overwrite=False)
    assert (await capture(cache, held, 100)).reply[:3] == ["ok", "100", "900"]
    assert await balance_and_held(cache, wallet_id) == (900, 0)


@pytest.mark.parametrize("requested", [0, -1, AMOUNT_MICROS_MAX + 1, "1.5", "1e3", "0x10", " 7", "", "abc"])
async def test_a_capture_with_a_bad_amount_is_an_error_that_writes_nothing(
    cache: Cache, requested: int | str
) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000_000)
    held = await hold(cache, wallet_id, 100)
    before = await snapshot(cache, held)
    with pytest.raises(redis.exceptions.ResponseError, match="capture: bad amount"):
        await capture(cache, held, requested)
    assert await snapshot(cache, held) == before


async def test_a_capture_after_expiry_expires_the_hold_and_frees_the_amount(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 700, expires_in_s=1)
    other = await hold(cache, wallet_id, 200)
    await wait_until_due(cache, held)
    refused = await capture(cache, held, 100)
    assert refused.reply == ["ended", "expired"]
    assert await balance_and_held(cache, wallet_id) == (1_000, 200)  # only the other hold is held
    fields = await hold_fields(cache, held)
    assert fields["st"] == "expired" and "r" not in fields and "k" not in fields
    assert await due_members(cache, wallet_id) == [f"{other.hold_id}:{wallet_id}"]
    assert await outbox(cache, wallet_id) == []
    assert await event_kinds(cache, wallet_id) == ["held", "held", "expired"]
    row = event_row((await events(cache, wallet_id))[-1][1])
    assert (row.hold_id, row.kind, row.occurred_at) == (
        held.hold_id,
        "expired",
        datetime.fromtimestamp(int(fields["t"]) / 1000, UTC),
    )
    # Once: no second event, no second release, whoever asks.
    assert (await capture(cache, held, 100)).reply == ["ended", "expired"]
    assert await end_hold(cache, held, "expired") == ["ended", "expired"]
    assert await end_hold(cache, held, "released") == ["ended", "expired"]
    assert await expire_due(cache, now_ms=await cache.server_time_ms(), budget=100) == 0
    assert await balance_and_held(cache, wallet_id) == (1_000, 200)
    assert await event_kinds(cache, wallet_id) == ["held", "held", "expired"]


# end_hold.lua ------------------------------------------------------------------


async def test_a_release_frees_the_amount_once(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 600)
    other = await hold(cache, wallet_id, 400)
    released = await end_hold(cache, held, "released")
    status, ended_as, event_id = released
    assert (status, ended_as) == ("ok", "released")
    assert await balance_and_held(cache, wallet_id) == (1_000, 400)
    fields = await hold_fields(cache, held)
    assert fields["st"] == "released" and "t" in fields
    assert 0 < await cache.client.ttl(cache.hold_key(held.hold_id)) <= TTL_S  # ended: kept, then let go
    assert await due_members(cache, wallet_id) == [f"{other.hold_id}:{wallet_id}"]
    found_id, last = (await events(cache, wallet_id))[-1]
    assert found_id == event_id
    assert set(last) == {b"d", b"k", b"x", b"t", b"c"}
    assert (last[b"k"], last[b"d"], last[b"t"]) == (b"released", held.payload, fields["t"].encode())
    before = await snapshot(cache, held)
    assert await end_hold(cache, held, "released") == ["ended", "released"]
    assert await end_hold(cache, held, "expired") == ["ended", "released"]
    assert (await capture(cache, held, 1)).reply == ["ended", "released"]
    assert await snapshot(cache, held) == before


async def test_an_expiry_before_its_time_is_not_due_and_a_release_after_it_expires(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    early = await hold(cache, wallet_id, 300, expires_in_s=60)
    before = await snapshot(cache, early)
    assert await end_hold(cache, early, "expired") == ["not_due"]
    assert await snapshot(cache, early) == before

    late = await hold(cache, wallet_id, 200, expires_in_s=1)
    await wait_until_due(cache, late)
    assert (await end_hold(cache, late, "released"))[:2] == ["ok", "expired"]
    assert await balance_and_held(cache, wallet_id) == (1_000, 300)
    assert await event_kinds(cache, wallet_id) == ["held", "held", "expired"]


async def test_end_hold_after_a_capture_is_ended_and_unknown_holds_are_not_found(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 600)
    assert (await capture(cache, held, 100)).status == "ok"
    before = await snapshot(cache, held)
    assert await end_hold(cache, held, "released") == ["ended", "captured"]
    assert await end_hold(cache, held, "expired") == ["ended", "captured"]
    assert await snapshot(cache, held) == before
    ghost = Held([], new_hold_id(wallet_id), wallet_id, 1, "ghost", b"")
    assert await end_hold(cache, ghost, "released") == ["not_found"]
    live = await hold(cache, wallet_id, 10)
    other = await new_wallet(cache, balance_micros=1_000)
    assert await end_hold(cache, live, "released", wallet_id=other) == ["not_found"]
    assert (await hold_fields(cache, live))["st"] == "held"
    assert await balance_and_held(cache, wallet_id) == (900, 10)


@pytest.mark.parametrize("status", ["captured", "held", "", "RELEASED", "bogus"])
async def test_end_hold_with_a_bad_status_is_an_error_that_writes_nothing(cache: Cache, status: str) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 100)
    before = await snapshot(cache, held)
    with pytest.raises(redis.exceptions.ResponseError, match="end_hold: bad status"):
        await end_hold(cache, held, status)
    assert await snapshot(cache, held) == before


async def test_held_never_goes_below_zero_after_a_wallet_is_lost_and_loaded(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    released = await hold(cache, wallet_id, 300)
    captured = await hold(cache, wallet_id, 300)
    expired = await hold(cache, wallet_id, 300, expires_in_s=1)
    # Redis loses the wallet (not the holds); the ledger loads it again with nothing held.
    await cache.client.delete(cache.wallet_key(wallet_id))
    assert await cache.load_wallet(wallet_id, CachedWallet(1_000, 0, "active", "usd"), overwrite=False)
    assert await balance_and_held(cache, wallet_id) == (1_000, 0)
    assert (await end_hold(cache, released, "released"))[:2] == ["ok", "released"]
    assert (await capture(cache, captured, 100)).reply[:3] == ["ok", "100", "900"]
    await wait_until_due(cache, expired)
    assert await expire_due(cache, now_ms=await cache.server_time_ms(), budget=10) == 1
    fields = await wallet_fields(cache, wallet_id)
    assert int(fields.get("h", "0")) == 0
    assert int(fields.get("n", "0")) == 0


# load_wallet.lua keeps what holds reserve -----------------------------------------


async def test_load_wallet_keeps_held(cache: Cache) -> None:
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 300)
    # Not overwriting a complete wallet: untouched.
    assert await cache.load_wallet(wallet_id, CachedWallet(5, 0, "active", "usd"), overwrite=False) is False
    assert await balance_and_held(cache, wallet_id) == (1_000, 300)
    # rebuild-cache overwrites the balance from the ledger; holds live only in Redis and stay.
    assert await cache.load_wallet(wallet_id, CachedWallet(800, 100, "active", "usd"), overwrite=True) is True
    assert await balance_and_held(cache, wallet_id) == (800, 300)
    assert await active_holds(cache, wallet_id) == 1
    assert (await hold(cache, wallet_id, 601)).reply == ["insufficient", "800", "300"]
    # A partial hash (its epoch lost) is repaired by a load that keeps h too.
    await cache.client.hdel(cache.wallet_key(wallet_id), "e")
    assert (await capture(cache, held, 10)).reply == ["missing"]
    assert (
        await cache.load_wallet(wallet_id, CachedWallet(800, 100, "active", "usd"), overwrite=False) is True
    )
    assert await balance_and_held(cache, wallet_id) == (800, 300)
    assert await active_holds(cache, wallet_id) == 1
    assert (await end_hold(cache, held, "released"))[:2] == ["ok", "released"]
    assert await balance_and_held(cache, wallet_id) == (800, 0)
    assert await active_holds(cache, wallet_id) == 0


# Expiry by the sweeper, and what the events record -------------------------------


async def test_expire_due_ends_each_due_hold_once_within_its_budget(cache: Cache) -> None:
    wallets = [await new_wallet(cache, balance_micros=10_000) for _ in range(4)]
    due = [await hold(cache, wallets[n % 4], 100 + n, expires_in_s=1) for n in range(10)]
    later = [await hold(cache, w, 1_000, expires_in_s=600) for w in wallets]
    await wait_until_due(cache, due[-1])
    now_ms = await cache.server_time_ms()
    done = [await expire_due(cache, now_ms=now_ms, budget=4) for _ in range(4)]
    assert done == [4, 4, 2, 0]
    for held in due:
        assert (await hold_fields(cache, held))["st"] == "expired"
    for held in later:
        assert (await hold_fields(cache, held))["st"] == "held"
    for wallet_id in wallets:
        assert await balance_and_held(cache, wallet_id) == (10_000, 1_000)
    kinds: list[str] = []
    for p in {cache.partition(w) for w in wallets}:
        kinds += [f[b"k"].decode() for _, f in await cache.hold_events(p, before_ms=None, count=1000)]
    assert sorted(kinds) == sorted(["held"] * 14 + ["expired"] * 10)


async def test_a_hold_whose_time_passed_long_ago_still_frees_its_amount(cache: Cache) -> None:
    """The sweeper may come by long after the expiry (the worker was down):
    whatever Redis lets go meanwhile, the amount held must come back."""
    wallet_id = await new_wallet(cache, balance_micros=1_000)
    held = await hold(cache, wallet_id, 400, expires_in_s=1, ttl_s=1)
    deadline = time.monotonic() + EXPIRY_WAIT_S
    expires_ms = int(held.reply[2])
    # Past the hold's expiry plus the idempotency TTL (when its record goes).
    while await cache.server_time_ms() < expires_ms + 1_500:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await cache.client.exists(cache.hold_idempotency_key(wallet_id, held.key)) == 0
    assert await expire_due(cache, now_ms=await cache.server_time_ms(), budget=10) == 1
    assert await balance_and_held(cache, wallet_id) == (1_000, 0)
    assert (await hold_fields(cache, held))["st"] == "expired"
    assert await cache.client.ttl(cache.hold_key(held.hold_id)) > 0  # an ended hold does not stay forever
    assert await event_kinds(cache, wallet_id) == ["held", "expired"]


async def test_every_event_is_recorded_in_postgres_once(harness: Harness) -> None:
    cache, pool = harness.cache, harness.pool
    async with pool.acquire() as conn:
        wallet_id = await conn.fetchval(
            "INSERT INTO wallets (id, owner_id, currency, overdraft_limit_micros) "
            "VALUES ($1, $2, 'usd', 0) RETURNING id",
            uuid7(),
            f"owner-{secrets.token_hex(4)}",
        )
    assert await cache.load_wallet(wallet_id, CachedWallet(1_000, 0, "active", "usd"), overwrite=False)
    captured = await hold(cache, wallet_id, 100)
    released = await hold(cache, wallet_id, 100)
    expired = await hold(cache, wallet_id, 100, expires_in_s=1)
    nothing = await hold(cache, wallet_id, 100)
    taken = await capture(cache, captured, 150)
    assert taken.status == "ok"
    assert (await end_hold(cache, released, "released"))[0] == "ok"
    await cache.client.hset(cache.wallet_key(wallet_id), "b", "-500")  # as a clawback would
    assert (await capture(cache, nothing, 10)).reply[1] == "0"
    await wait_until_due(cache, expired)
    assert await expire_due(cache, now_ms=await cache.server_time_ms(), budget=10) == 1

    partition = cache.partition(wallet_id)
    pending = await cache.hold_events(partition, before_ms=None, count=100)
    assert len(pending) == 8
    # Recorded twice (a request and the sweeper both may): each event once.
    assert await record_events(pool, cache, partition, pending[:5], timeout_s=5) == 5
    assert await record_events(pool, cache, partition, pending, timeout_s=5) == 8
    assert await cache.hold_events(partition, before_ms=None, count=100) == []
    async with pool.acquire() as conn:
        rows = {
            (row.hold_id, row.kind): row
            for h in (captured, released, expired, nothing)
            for row in await repo.hold_events_of(conn, h.hold_id)
        }
    assert sorted((h, k) for h, k in rows) == sorted(
        [(h.hold_id, "held") for h in (captured, released, expired, nothing)]
        + [
            (captured.hold_id, "captured"),
            (released.hold_id, "released"),
            (expired.hold_id, "expired"),
            (nothing.hold_id, "captured"),
        ]
    )
    got = rows[captured.hold_id, "captured"]
    assert (got.requested_micros, got.captured_micros, got.entry_id) == (150, 150, taken.entry_id)
    got = rows[nothing.hold_id, "captured"]
    assert (got.requested_micros, got.captured_micros, got.entry_id) == (10, 0, None)
    assert all(row.amount_micros == 100 and row.currency == "usd" for row in rows.values())
