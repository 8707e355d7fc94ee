"""Holds over real HTTP: a hold reserves available balance, a capture debits
the actual cost (more or less than held, within the overdraft limit) and
releases the rest in one step, releases and expiries end a hold once,
every step is recorded in the ledger and the hold_events table, and no
number of holds at once takes a wallet past CENTIME_HOLDS_PER_WALLET_MAX."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import Keys, Server, auth, new_wallet, start_server, stop_server

from centime.settings import Settings


async def hold(
    client: httpx.AsyncClient, keys: Keys, wallet_id: str, amount_micros: int, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/wallets/{wallet_id}/holds",
        json={"amount_micros": amount_micros, **body},
        headers=auth(keys.debit, secrets.token_hex(8)),
    )


async def wallet(client: httpx.AsyncClient, keys: Keys, wallet_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert response.status_code == 200, response.text
    return response.json()


async def events_of(settings: Settings, hold_id: str) -> list[tuple[str, int | None]]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT kind, captured_micros FROM hold_events WHERE hold_id = $1 ORDER BY kind <> 'held', occurred_at",
            hold_id,
        )
    finally:
        await conn.close()
    return [(row["kind"], row["captured_micros"]) for row in rows]


async def test_a_hold_reserves_and_a_capture_takes_the_cost(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=10_000)
    created = await hold(client, keys, wallet_id, 4_000, description="stream", metadata={"model": "m"})
    assert created.status_code == 201, created.text
    held = created.json()
    assert (held["status"], held["amount_micros"], held["currency"]) == ("held", 4_000, "usd")
    assert held["metadata"] == {"model": "m"}
    state = await wallet(client, keys, wallet_id)
    assert (state["balance_micros"], state["held_micros"], state["available_micros"]) == (
        10_000,
        4_000,
        6_000,
    )

    # A debit may only use what is available.
    refused = await client.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 6_001}, headers=auth(keys.debit, "d1")
    )
    assert refused.status_code == 402, refused.text

    captured = await client.post(
        f"/v1/holds/{held['id']}/capture", json={"amount_micros": 2_500}, headers=auth(keys.debit)
    )
    assert captured.status_code == 200, captured.text
    body = captured.json()
    assert (body["requested_micros"], body["captured_micros"], body["shortfall_micros"]) == (2_500, 2_500, 0)
    assert body["hold"]["status"] == "captured"
    assert body["entry"]["amount_micros"] == 2_500
    assert body["entry"]["idempotency_key"] == f"hold:{held['id']}"
    assert body["entry"]["description"] == "stream"
    state = await wallet(client, keys, wallet_id)
    assert (state["balance_micros"], state["held_micros"], state["available_micros"]) == (7_500, 0, 7_500)

    # The same capture again answers the same; another amount is a conflict.
    again = await client.post(
        f"/v1/holds/{held['id']}/capture", json={"amount_micros": 2_500}, headers=auth(keys.debit)
    )
    assert again.status_code == 200, again.text
    assert again.json()["entry"] == body["entry"]
    other = await client.post(
        f"/v1/holds/{held['id']}/capture", json={"amount_micros": 2_600}, headers=auth(keys.debit)
    )
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_conflict"
    released = await client.post(f"/v1/holds/{held['id']}/release", headers=auth(keys.debit))
    assert released.status_code == 409
    assert released.json()["code"] == "hold_not_held"
    assert (await wallet(client, keys, wallet_id))["balance_micros"] == 7_500
    assert await events_of(settings, held["id"]) == [("held", None), ("captured", 2_500)]


async def test_a_capture_over_the_hold_stops_at_the_overdraft_limit(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000, overdraft_limit_micros=500)
    first = (await hold(client, keys, wallet_id, 600)).json()
    second = (await hold(client, keys, wallet_id, 300)).json()
    assert (await wallet(client, keys, wallet_id))["available_micros"] == 600

    # The stream ran longer: 900 asked, 600 held. The wallet can pay its
    # balance plus the limit less the other hold: 1,000 + 500 - 300 = 1,200.
    over = await client.post(
        f"/v1/holds/{first['id']}/capture", json={"amount_micros": 900}, headers=auth(keys.debit)
    )
    assert over.status_code == 200, over.text
    assert (over.json()["captured_micros"], over.json()["shortfall_micros"]) == (900, 0)
    # Now 100 left and the limit 500, this hold released: it can take 600 of 1,000.
    short = await client.post(
        f"/v1/holds/{second['id']}/capture", json={"amount_micros": 1_000}, headers=auth(keys.debit)
    )
    assert short.status_code == 200, short.text
    assert (short.json()["captured_micros"], short.json()["shortfall_micros"]) == (600, 400)
    state = await wallet(client, keys, wallet_id)
    assert (state["balance_micros"], state["held_micros"], state["available_micros"]) == (-500, 0, 0)


async def test_release_is_once_and_frees_the_amount(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    held = (await hold(client, keys, wallet_id, 1_000)).json()
    assert (await hold(client, keys, wallet_id, 1)).status_code == 402
    first = await client.post(f"/v1/holds/{held['id']}/release", headers=auth(keys.debit))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "released"
    again = await client.post(f"/v1/holds/{held['id']}/release", headers=auth(keys.debit))
    assert again.status_code == 200
    assert again.json()["status"] == "released"
    capture = await client.post(
        f"/v1/holds/{held['id']}/capture", json={"amount_micros": 1}, headers=auth(keys.debit)
    )
    assert capture.status_code == 409
    assert capture.json()["code"] == "hold_not_held"
    assert (await wallet(client, keys, wallet_id))["available_micros"] == 1_000
    assert await events_of(settings, held["id"]) == [("held", None), ("released", None)]


async def test_an_expired_hold_cannot_be_captured_and_frees_the_amount(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    held = (await hold(client, keys, wallet_id, 700, expires_in_s=1)).json()
    # Until the hold's own expires_at (Redis's clock, the same host's), and a little past it.
    expires_at = datetime.fromisoformat(held["expires_at"])
    await asyncio.sleep(max((expires_at - datetime.now(UTC)).total_seconds(), 0) + 0.05)
    capture = await client.post(
        f"/v1/holds/{held['id']}/capture", json={"amount_micros": 100}, headers=auth(keys.debit)
    )
    assert capture.status_code == 409, capture.text
    assert capture.json()["code"] == "hold_not_held"
    state = await wallet(client, keys, wallet_id)
    assert (state["balance_micros"], state["held_micros"]) == (1_000, 0)
    got = await client.get(f"/v1/holds/{held['id']}", headers=auth(keys.read))
    assert got.json()["status"] == "expired"


async def test_the_worker_expires_holds_once(
    client: httpx.AsyncClient, keys: Keys, settings: Settings
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    ids = [(await hold(client, keys, wallet_id, 100, expires_in_s=1)).json()["id"] for _ in range(5)]
    assert (await wallet(client, keys, wallet_id))["held_micros"] == 500
    for _ in range(100):  # the serving process's sweeper runs every second
        if (await wallet(client, keys, wallet_id))["held_micros"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await wallet(client, keys, wallet_id))["held_micros"] == 0
    for _ in range(50):
        recorded = [await events_of(settings, hold_id) for hold_id in ids]
        if all(len(events) == 2 for events in recorded):
            break
        await asyncio.sleep(0.1)
    assert recorded == [[("held", None), ("expired", None)]] * 5


async def test_hold_replay_conflict_and_refusals(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    url = f"/v1/wallets/{wallet_id}/holds"
    first = await client.post(url, json={"amount_micros": 100}, headers=auth(keys.debit, "h1"))
    again = await client.post(url, json={"amount_micros": 100}, headers=auth(keys.debit, "h1"))
    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    conflict = await client.post(url, json={"amount_micros": 101}, headers=auth(keys.debit, "h1"))
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_conflict"
    assert (await wallet(client, keys, wallet_id))["held_micros"] == 100

    for body in ({"amount_micros": 0}, {"amount_micros": 1, "expires_in_s": 0}, {"amount_micros": 1, "x": 1}):
        bad = await client.post(url, json=body, headers=auth(keys.debit, secrets.token_hex(4)))
        assert bad.status_code == 400, (body, bad.text)
    too_long = {"amount_micros": 1, "expires_in_s": 24 * 3600 + 1}
    assert (await client.post(url, json=too_long, headers=auth(keys.debit, "h2"))).status_code == 400
    assert (await client.post(url, json={"amount_micros": 1}, headers=auth(keys.debit))).status_code == 400
    assert (
        await client.post(url, json={"amount_micros": 1}, headers=auth(keys.read, "h3"))
    ).status_code == 403
    missing = await client.get("/v1/holds/not-a-hold", headers=auth(keys.read))
    assert missing.status_code == 404
    assert missing.json()["code"] == "hold_not_found"
    unknown = await client.post(
        "/v1/holds/0190f2a0-0000-7000-8000-000000000000/capture",
        json={"amount_micros": 1},
        headers=auth(keys.debit),
    )
    assert unknown.status_code == 404


@pytest.mark.parametrize("overdraft", [0, 300])
async def test_holds_racing_debits_never_pass_the_limit(
    client: httpx.AsyncClient, keys: Keys, overdraft: int
) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000, overdraft_limit_micros=overdraft)

    async def debit(n: int) -> httpx.Response:
        return await client.post(
            f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 70}, headers=auth(keys.debit, f"d{n}")
        )

    answers = await asyncio.gather(
        *(hold(client, keys, wallet_id, 70) for _ in range(15)), *map(debit, range(15))
    )
    ok = [a for a in answers if a.status_code == 201]
    assert all(a.status_code in (201, 402) for a in answers)
    assert len(ok) == (1_000 + overdraft) // 70
    state = await wallet(client, keys, wallet_id)
    assert state["available_micros"] >= 0
    assert state["balance_micros"] - state["held_micros"] >= -overdraft


HOLDS_MAX = 5


@pytest.fixture(scope="module")
def bounded_server(settings: Settings) -> Iterator[Server]:
    """The run's database and Redis prefix, at most HOLDS_MAX active holds per wallet."""
    running = start_server(settings, CENTIME_HOLDS_PER_WALLET_MAX=str(HOLDS_MAX))
    yield running
    stop_server(running)


@pytest.fixture
async def bounded(bounded_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=bounded_server.base_url, timeout=30, limits=limits) as http:
        yield http


async def test_holds_at_once_never_pass_the_bound_and_ending_one_gives_room(
    bounded: httpx.AsyncClient, keys: Keys
) -> None:
    wallet_id = await new_wallet(bounded, keys, funded_micros=1_000_000)
    answers = await asyncio.gather(*(hold(bounded, keys, wallet_id, 10) for _ in range(40)))
    assert sorted(a.status_code for a in answers) == [201] * HOLDS_MAX + [409] * (40 - HOLDS_MAX)
    refused = next(a for a in answers if a.status_code == 409)
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert (problem["code"], problem["holds_per_wallet_max"]) == ("too_many_holds", HOLDS_MAX)
    assert "CENTIME_HOLDS_PER_WALLET_MAX=5" in problem["detail"]
    assert (await wallet(bounded, keys, wallet_id))["held_micros"] == 10 * HOLDS_MAX

    held = [a.json()["id"] for a in answers if a.status_code == 201]
    released = await bounded.post(f"/v1/holds/{held[0]}/release", headers=auth(keys.debit))
    assert released.status_code == 200, released.text
    captured = await bounded.post(
        f"/v1/holds/{held[1]}/capture", json={"amount_micros": 7}, headers=auth(keys.debit)
    )
    assert captured.status_code == 200, captured.text
    again = await asyncio.gather(*(hold(bounded, keys, wallet_id, 10) for _ in range(10)))
    assert sorted(a.status_code for a in again) == [201] * 2 + [409] * 8
    state = await wallet(bounded, keys, wallet_id)
    assert (state["balance_micros"], state["held_micros"]) == (1_000_000 - 7, 10 * HOLDS_MAX)


async def test_the_schema_lists_too_many_holds_on_the_hold_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    conflict = schema["paths"]["/v1/wallets/{wallet_id}/holds"]["post"]["responses"]["409"]
    assert "too_many_holds" in conflict["description"]
    assert "application/problem+json" in conflict["content"]
    debit = schema["paths"]["/v1/wallets/{wallet_id}/debits"]["post"]["responses"]["409"]
    assert "too_many_holds" not in debit["description"]
