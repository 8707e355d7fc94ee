"""Batch debits over real HTTP: each item is decided on its own and answered
in request order, the charged ones are in the ledger exactly once (a whole
batch in one group commit), a retry with the same keys replays, a bad batch
is refused whole with `fields` naming the offending place, and batches
racing single debits on one wallet never take it past its overdraft limit."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.asyncio as redis
from conftest import Keys, Server, auth, make_keys, new_wallet, run_cli, start_server, stop_server

from centime.settings import Settings
from wallet.cache import Cache

BATCH = "/v1/debits/batch"
MAX = 2**53 - 1
NOWHERE = "0190f2a0-0000-7000-8000-000000000000"  # a well-formed id of no wallet


async def post_batch(
    http: httpx.AsyncClient, keys: Keys, debits: list[dict[str, Any]], key: str | None = None
) -> list[dict[str, Any]]:
    response = await http.post(
        BATCH, json={"debits": debits}, headers=auth(keys.debit, key or secrets.token_hex(8))
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(debits)
    return results


async def balance(http: httpx.AsyncClient, keys: Keys, wallet_id: str) -> int:
    got = await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert got.status_code == 200, got.text
    return got.json()["balance_micros"]


async def ledger_debits(database_url: str, wallet_ids: list[str]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            """
            SELECT e.id, e.wallet_id, e.idempotency_key, e.amount_micros, e.balance_micros,
                   e.committed_at, r.id AS reversed_by
              FROM journal_entries e
              LEFT JOIN journal_entries r ON r.reverses_entry_id = e.id
             WHERE e.kind = 'debit' AND e.wallet_id = ANY($1::uuid[])
            """,
            [uuid.UUID(w) for w in wallet_ids],
        )
    finally:
        await conn.close()


def statuses(results: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    """(status, problem code) per item: what a client branches on."""
    return [(r["status"], (r["problem"] or {}).get("code")) for r in results]


async def test_a_batch_with_failing_items_commits_exactly_the_others(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    rich = await new_wallet(client, keys, funded_micros=10_000)
    poor = await new_wallet(client, keys, funded_micros=100)
    debits = [
        {"wallet_id": rich, "amount_micros": 1_000, "idempotency_key": "a"},
        {"wallet_id": poor, "amount_micros": 101, "idempotency_key": "b"},
        {"wallet_id": rich, "amount_micros": 2_000, "idempotency_key": "c", "description": "x"},
        {"wallet_id": NOWHERE, "amount_micros": 1, "idempotency_key": "d"},
        {"wallet_id": poor, "amount_micros": 100, "idempotency_key": "e"},
    ]
    key = secrets.token_hex(8)
    results = await post_batch(client, keys, debits, key)
    assert [r["status"] for r in results] == [201, 402, 201, 404, 201]
    assert results[1]["problem"]["code"] == "insufficient_funds"
    assert results[1]["problem"]["balance_micros"] == 100
    assert results[3]["problem"]["code"] == "wallet_not_found"
    assert [results[i]["entry"]["idempotency_key"] for i in (0, 2, 4)] == ["a", "c", "e"]
    assert [results[i]["replayed"] for i in (0, 2, 4)] == [False, False, False]
    assert all(results[i]["entry"] is None for i in (1, 3)) and results[0]["problem"] is None
    # Items of one wallet are charged in request order: running balances say so.
    assert [results[i]["entry"]["balance_micros"] for i in (0, 2)] == [9_000, 7_000]
    for wallet_id, expected in ((rich, 7_000), (poor, 0)):
        assert await balance(client, keys, wallet_id) == expected

    replayed = await post_batch(client, keys, debits, key)
    assert [r["status"] for r in replayed] == [201, 402, 201, 404, 201]
    assert all(replayed[i]["replayed"] for i in (0, 2, 4))
    assert [replayed[i]["entry"] for i in (0, 2, 4)] == [results[i]["entry"] for i in (0, 2, 4)]
    conflict = await client.post(BATCH, json={"debits": debits[:2]}, headers=auth(keys.debit, key))
    assert (conflict.status_code, conflict.json()["code"]) == (409, "idempotency_conflict")
    # Newest first, and a batch's entries are ordered as its items were.
    entries = await client.get(f"/v1/wallets/{rich}/entries", headers=auth(keys.read))
    assert [e["idempotency_key"] for e in entries.json()["data"] if e["kind"] == "debit"] == ["c", "a"]
    assert await balance(client, keys, rich) == 7_000


# --- A bad batch is refused whole --------------------------------------------------


def _items(wallet_id: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"wallet_id": wallet_id, "amount_micros": 1, "idempotency_key": f"bad-{i}", **extra} for i in range(n)
    ]


def _with(wallet: str, index: int, **changes: Any) -> dict[str, Any]:
    """Three good items on the wallet, item `index` changed (None removes a member)."""
    debits = _items(wallet, 3)
    for name, value in changes.items():
        if value is None:
            del debits[index][name]
        else:
            debits[index][name] = value
    return {"debits": debits}


# name: (body built from the funded wallet's id, status, code, fields)
BAD: dict[str, tuple[Any, int, str, list[str] | None]] = {
    "no-items": (lambda w: {"debits": []}, 400, "invalid_request", ["debits"]),
    "1001-items": (lambda w: {"debits": _items(w, 1001)}, 400, "invalid_request", ["debits"]),
    "no-debits-member": (lambda w: {}, 400, "invalid_request", ["debits"]),
    "unknown-top-level-field": (
        lambda w: {"debits": _items(w, 1), "currency": "usd"},
        400,
        "invalid_request",
        ["currency"],
    ),
    "unknown-item-field": (
        lambda w: _with(w, 1, currency="usd"),
        400,
        "invalid_request",
        ["debits[1].currency"],
    ),
    "wallet-id-not-an-id": (
        lambda w: _with(w, 2, wallet_id="nope"),
        400,
        "invalid_request",
        ["debits[2].wallet_id"],
    ),
    "amount-0": (lambda w: _with(w, 0, amount_micros=0), 400, "invalid_request", ["debits[0].amount_micros"]),
    "amount-over-2**53-1": (
        lambda w: _with(w, 1, amount_micros=MAX + 1),
        400,
        "invalid_request",
        ["debits[1].amount_micros"],
    ),
    "amount-a-string": (
        lambda w: _with(w, 1, amount_micros="1"),
        400,
        "invalid_request",
        ["debits[1].amount_micros"],
    ),
    "item-idempotency-key-missing": (
        lambda w: _with(w, 1, idempotency_key=None),
        400,
        "invalid_request",
        ["debits[1].idempotency_key"],
    ),
    "item-idempotency-key-empty": (
        lambda w: _with(w, 2, idempotency_key=""),
        400,
        "invalid_request",
        ["debits[2].idempotency_key"],
    ),
    "body-over-4MiB": (
        lambda w: {"debits": _items(w, 1, description="d" * (4 * 1024 * 1024 + 1))},
        413,
        "payload_too_large",
        None,
    ),
}


@pytest.fixture(scope="module")
async def funded(server: Server, keys: Keys) -> AsyncIterator[str]:
    """A funded wallet that every bad batch aims at: any leak would charge it."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        yield await new_wallet(http, keys, funded_micros=1_000_000)


@pytest.mark.parametrize("name", BAD)
async def test_a_bad_batch_is_refused_whole(
    name: str, client: httpx.AsyncClient, keys: Keys, funded: str
) -> None:
    build, status, code, fields = BAD[name]
    response = await client.post(
        BATCH, content=json.dumps(build(funded)).encode(), headers=auth(keys.debit, secrets.token_hex(8))
    )
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), response.text
    if fields is not None:
        assert body["fields"] == fields, body
        assert fields[0] in body["detail"], body
    assert await balance(client, keys, funded) == 1_000_000


@pytest.mark.parametrize("scope", ["no-idempotency-key", "read-scope"])
async def test_a_batch_without_its_key_or_scope_is_refused(
    scope: str, client: httpx.AsyncClient, keys: Keys, funded: str
) -> None:
    headers = auth(keys.debit) if scope == "no-idempotency-key" else auth(keys.read, secrets.token_hex(8))
    response = await client.post(BATCH, json={"debits": _items(funded, 2)}, headers=headers)
    body = response.json()
    if scope == "no-idempotency-key":
        assert (response.status_code, body["code"]) == (400, "invalid_request"), body
        assert "Idempotency-Key" in body["detail"], body
    else:
        assert (response.status_code, body["code"]) == (403, "forbidden"), body
    assert await balance(client, keys, funded) == 1_000_000


async def test_a_missing_idempotency_key_is_named_in_fields(
    client: httpx.AsyncClient, keys: Keys, funded: str
) -> None:
    response = await client.post(BATCH, json={"debits": _items(funded, 1)}, headers=auth(keys.debit))
    assert response.json()["fields"] == ["Idempotency-Key"], response.text


# --- A full batch --------------------------------------------------------------------

WALLETS_OF_FULL_BATCH = 40


async def test_a_full_batch_of_1000_over_many_wallets_is_in_the_ledger_once(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    """Its body (~120 KB) is past the 64 KiB of a single request; all 1,000
    items are charged, each once, and they share one group commit."""
    wallet_ids = await asyncio.gather(
        *(new_wallet(client, keys, funded_micros=1_000_000) for _ in range(WALLETS_OF_FULL_BATCH))
    )
    run = secrets.token_hex(4)
    debits = [
        {
            "wallet_id": wallet_ids[n % WALLETS_OF_FULL_BATCH],
            "amount_micros": 100 + n % 7,
            "idempotency_key": f"full-{run}-{n}",
            "description": f"call {n}",
            "metadata": {"n": str(n)},
        }
        for n in range(1000)
    ]
    assert len(json.dumps({"debits": debits})) > 64 * 1024
    results = await post_batch(client, keys, debits)
    assert Counter(r["status"] for r in results) == {201: 1000}
    assert not any(r["replayed"] for r in results)
    for debit, result in zip(debits, results, strict=True):
        entry = result["entry"]
        assert (entry["wallet_id"], entry["idempotency_key"], entry["amount_micros"]) == (
            debit["wallet_id"],
            debit["idempotency_key"],
            debit["amount_micros"],
        )
        assert entry["metadata"] == debit["metadata"]

    rows = await ledger_debits(settings.database_url or "", list(wallet_ids))
    by_key = Counter((str(r["wallet_id"]), r["idempotency_key"]) for r in rows)
    assert by_key == Counter((d["wallet_id"], d["idempotency_key"]) for d in debits)
    assert {str(r["id"]) for r in rows} == {r["entry"]["id"] for r in results}
    assert not any(r["reversed_by"] for r in rows)
    assert len({r["committed_at"] for r in rows}) == 1, "the batch was split over several commits"
    spent = Counter()
    for debit in debits:
        spent[debit["wallet_id"]] += debit["amount_micros"]
    for wallet_id in wallet_ids:
        assert await balance(client, keys, wallet_id) == 1_000_000 - spent[wallet_id]


# --- Keys inside a batch -------------------------------------------------------------


async def test_a_key_twice_on_one_wallet_in_one_batch_is_one_debit(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    """The same key on the same wallet is the same debit: the first item
    charges; a later item with the same body gets the first one's answer,
    replayed (the batch answers after the first has committed, so "in
    progress" would already be stale); a later item with another body is a
    conflict, as a single debit would be."""
    wallet_id = await new_wallet(client, keys, funded_micros=10_000)
    debits = [
        {"wallet_id": wallet_id, "amount_micros": 1_000, "idempotency_key": "k"},
        {"wallet_id": wallet_id, "amount_micros": 500, "idempotency_key": "other"},
        {"wallet_id": wallet_id, "amount_micros": 1_000, "idempotency_key": "k"},
        {"wallet_id": wallet_id, "amount_micros": 2_000, "idempotency_key": "k"},
    ]
    key = secrets.token_hex(8)
    results = await post_batch(client, keys, debits, key)
    assert statuses(results) == [(201, None), (201, None), (201, None), (409, "idempotency_conflict")]
    assert [r["replayed"] for r in results[:3]] == [False, False, True]
    assert results[2]["entry"] == results[0]["entry"]
    assert await balance(client, keys, wallet_id) == 8_500

    again = await post_batch(client, keys, debits, key)
    assert statuses(again) == statuses(results)
    assert [r["replayed"] for r in again[:3]] == [True, True, True]
    assert [r["entry"] for r in again[:3]] == [r["entry"] for r in results[:3]]
    assert await balance(client, keys, wallet_id) == 8_500
    entries = await client.get(f"/v1/wallets/{wallet_id}/entries", headers=auth(keys.read))
    assert sorted(e["idempotency_key"] for e in entries.json()["data"] if e["kind"] == "debit") == [
        "k",
        "other",
    ]


async def test_one_key_on_two_wallets_charges_both(client: httpx.AsyncClient, keys: Keys) -> None:
    """Idempotency keys are per wallet, in a batch as in single debits."""
    first = await new_wallet(client, keys, funded_micros=5_000)
    second = await new_wallet(client, keys, funded_micros=5_000)
    debits = [
        {"wallet_id": first, "amount_micros": 1_000, "idempotency_key": "same"},
        {"wallet_id": second, "amount_micros": 1_000, "idempotency_key": "same"},
    ]
    results = await post_batch(client, keys, debits)
    assert statuses(results) == [(201, None), (201, None)]
    assert results[0]["entry"]["id"] != results[1]["entry"]["id"]
    assert [r["entry"]["wallet_id"] for r in results] == [first, second]
    assert [await balance(client, keys, w) for w in (first, second)] == [4_000, 4_000]


async def freeze(settings: Settings, wallet_id: str) -> None:
    """Frozen in the ledger and in Redis, as an open dispute leaves it."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("UPDATE wallets SET status = 'frozen' WHERE id = $1", uuid.UUID(wallet_id))
    finally:
        await conn.close()
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
        await client.hset(cache.wallet_key(uuid.UUID(wallet_id)), "s", "frozen")
    finally:
        await client.aclose()


async def test_items_on_a_frozen_wallet_are_refused_and_the_others_charged(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    frozen = await new_wallet(client, keys, funded_micros=5_000)
    active = await new_wallet(client, keys, funded_micros=5_000)
    await freeze(settings, frozen)
    debits = [
        {"wallet_id": frozen, "amount_micros": 1_000, "idempotency_key": "f1"},
        {"wallet_id": active, "amount_micros": 1_000, "idempotency_key": "a1"},
        {"wallet_id": frozen, "amount_micros": 1, "idempotency_key": "f2"},
    ]
    results = await post_batch(client, keys, debits)
    assert statuses(results) == [(409, "wallet_frozen"), (201, None), (409, "wallet_frozen")]
    assert results[0]["problem"]["balance_micros"] == 5_000
    assert [await balance(client, keys, w) for w in (frozen, active)] == [5_000, 4_000]
    assert [r["wallet_id"] for r in await ledger_debits(settings.database_url or "", [frozen, active])] == [
        uuid.UUID(active)
    ]


async def test_keys_used_by_single_debits_replay_in_a_batch(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    """A batch item whose key a single debit used is that debit: replayed
    (from Redis, or from the ledger when Redis forgot the key), or a
    conflict if its body differs; and a single debit replays a batch item."""
    wallet_id = await new_wallet(client, keys, funded_micros=10_000)
    singles = {}
    for key, body in (("s1", {"amount_micros": 100, "description": "x"}), ("s2", {"amount_micros": 200}),
                      ("s3", {"amount_micros": 300, "metadata": {"a": "b"}})):  # fmt: skip
        response = await client.post(
            f"/v1/wallets/{wallet_id}/debits", json=body, headers=auth(keys.debit, key)
        )
        assert response.status_code == 201, response.text
        singles[key] = response.json()
    # Redis forgets s3's key (its TTL ran out): only the ledger remembers it.
    redis_client = redis.Redis.from_url(settings.redis_url or "")
    try:
        cache = Cache(redis_client, prefix=settings.redis_prefix, partition_count=settings.partition_count)
        assert await redis_client.delete(cache.idempotency_key(uuid.UUID(wallet_id), "s3")) == 1
    finally:
        await redis_client.aclose()

    debits = [
        {"wallet_id": wallet_id, "amount_micros": 100, "idempotency_key": "s1", "description": "x"},
        {"wallet_id": wallet_id, "amount_micros": 1_000, "idempotency_key": "new"},
        {"wallet_id": wallet_id, "amount_micros": 201, "idempotency_key": "s2"},
        {"wallet_id": wallet_id, "amount_micros": 300, "idempotency_key": "s3", "metadata": {"a": "b"}},
    ]
    results = await post_batch(client, keys, debits)
    assert statuses(results) == [(201, None), (201, None), (409, "idempotency_conflict"), (201, None)]
    assert [results[i]["replayed"] for i in (0, 1, 3)] == [True, False, True]
    assert results[0]["entry"]["id"] == singles["s1"]["id"]
    assert results[3]["entry"]["id"] == singles["s3"]["id"]
    assert await balance(client, keys, wallet_id) == 10_000 - 600 - 1_000

    single = await client.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 1_000}, headers=auth(keys.debit, "new")
    )
    assert (single.status_code, single.headers.get("idempotent-replayed")) == (201, "true"), single.text
    assert single.json()["id"] == results[1]["entry"]["id"]
    rows = await ledger_debits(settings.database_url or "", [wallet_id])
    assert Counter(r["idempotency_key"] for r in rows) == {"s1": 1, "s2": 1, "s3": 1, "new": 1}
    assert await balance(client, keys, wallet_id) == 10_000 - 600 - 1_000


# --- Invariant 4 under concurrency ----------------------------------------------------

AMOUNT_MICROS = 1_000
FUNDED_FOR = 150
OVERDRAFT_FOR = 50
RACING_BATCHES = 8
ITEMS_PER_BATCH = 40
RACING_SINGLES = 200


@pytest.fixture
async def private(settings: Settings, private_database: str) -> AsyncIterator[tuple[Settings, Server, Keys]]:
    """A server and database of the test's own: `centime check` looks at every wallet."""
    own = msgspec.structs.replace(settings, database_url=private_database)
    server = start_server(own)
    try:
        yield own, server, await make_keys(private_database)
    finally:
        stop_server(server)


async def test_batches_racing_single_debits_never_pass_the_overdraft_limit(private) -> None:  # type: ignore[no-untyped-def]
    """Batches (items on the hot wallet and a second one) and single debits
    at once on a wallet with room for exactly FUNDED_FOR + OVERDRAFT_FOR
    debits: exactly that many are charged, the balance stops at
    -overdraft_limit, and the ledger and `centime check` agree."""
    settings, server, keys = private
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
        hot = await new_wallet(
            http,
            keys,
            funded_micros=FUNDED_FOR * AMOUNT_MICROS,
            overdraft_limit_micros=OVERDRAFT_FOR * AMOUNT_MICROS,
        )
        side = await new_wallet(http, keys, funded_micros=RACING_BATCHES * ITEMS_PER_BATCH * AMOUNT_MICROS)

        async def batch(b: int) -> list[dict[str, Any]]:
            debits = [
                {
                    "wallet_id": hot if n % 4 else side,
                    "amount_micros": AMOUNT_MICROS,
                    "idempotency_key": f"race-b{b}-{n}",
                }
                for n in range(ITEMS_PER_BATCH)
            ]
            return await post_batch(http, keys, debits)

        async def single(n: int) -> int:
            response = await http.post(
                f"/v1/wallets/{hot}/debits",
                json={"amount_micros": AMOUNT_MICROS},
                headers=auth(keys.debit, f"race-s{n}"),
            )
            return response.status_code

        answered = await asyncio.gather(
            *(batch(b) for b in range(RACING_BATCHES)), *(single(n) for n in range(RACING_SINGLES))
        )
        batches: list[list[dict[str, Any]]] = answered[:RACING_BATCHES]  # type: ignore[assignment]
        singles: list[int] = answered[RACING_BATCHES:]  # type: ignore[assignment]
        on_hot = Counter()
        on_side = Counter()
        for results in batches:
            for n, r in enumerate(results):
                (on_hot if n % 4 else on_side)[r["status"]] += 1
        on_hot.update(singles)
        room = FUNDED_FOR + OVERDRAFT_FOR
        assert on_hot == {
            201: room,
            402: RACING_BATCHES * ITEMS_PER_BATCH * 3 // 4 + RACING_SINGLES - room,
        }, on_hot
        assert on_side == {201: RACING_BATCHES * ITEMS_PER_BATCH // 4}
        assert await balance(http, keys, hot) == -OVERDRAFT_FOR * AMOUNT_MICROS

    rows = await ledger_debits(settings.database_url or "", [hot])
    assert len(rows) == room and not any(r["reversed_by"] for r in rows)
    # Each charge saw the balance one step lower: none ever passed the limit.
    assert sorted(r["balance_micros"] for r in rows) == [
        (FUNDED_FOR - k) * AMOUNT_MICROS for k in range(room, 0, -1)
    ]
    checked = run_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_key_reserved_for_captures_is_refused_alone(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    debits = [
        {
            "wallet_id": wallet_id,
            "amount_micros": 10,
            "idempotency_key": "hold:0190f2a0-0000-7000-8000-0000000000aa",
        },
        {"wallet_id": wallet_id, "amount_micros": 10, "idempotency_key": "fine"},
    ]
    response = await client.post(
        BATCH, json={"debits": debits}, headers=auth(keys.debit, secrets.token_hex(8))
    )
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert (first["status"], first["problem"]["fields"]) == (400, ["debits[0].idempotency_key"])
    assert second["status"] == 201
    got = await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert got.json()["balance_micros"] == 990
