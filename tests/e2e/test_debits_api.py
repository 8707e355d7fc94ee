"""The debit API over real HTTP keeps its contract: charges once per key,
replays with the header, refuses conflicts, and pages entries newest first."""

from __future__ import annotations

import secrets

import httpx
from conftest import Keys, auth, new_wallet


async def test_debit_then_replay_then_conflict(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000_000)
    key = secrets.token_hex(8)
    body = {"amount_micros": 1_500, "description": "completion", "metadata": {"model": "m1"}}

    first = await client.post(f"/v1/wallets/{wallet_id}/debits", json=body, headers=auth(keys.debit, key))
    assert first.status_code == 201, first.text
    entry = first.json()
    assert entry["kind"] == "debit"
    assert entry["amount_micros"] == 1_500
    assert entry["balance_micros"] == 998_500
    assert entry["idempotency_key"] == key
    assert entry["metadata"] == {"model": "m1"}
    assert "idempotent-replayed" not in first.headers

    replay = await client.post(f"/v1/wallets/{wallet_id}/debits", json=body, headers=auth(keys.debit, key))
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == entry

    conflict = await client.post(
        f"/v1/wallets/{wallet_id}/debits",
        json={**body, "amount_micros": 1_501},
        headers=auth(keys.debit, key),
    )
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_conflict"
    assert conflict.headers["content-type"].startswith("application/problem+json")

    wallet = (await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
    assert wallet["balance_micros"] == 998_500


async def test_insufficient_funds_names_the_balance(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=100)
    response = await client.post(
        f"/v1/wallets/{wallet_id}/debits",
        json={"amount_micros": 101},
        headers=auth(keys.debit, "k"),
    )
    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_funds"
    assert response.json()["balance_micros"] == 100
    # A refused debit stores nothing: the same key may be used again.
    ok = await client.post(
        f"/v1/wallets/{wallet_id}/debits",
        json={"amount_micros": 100},
        headers=auth(keys.debit, "k"),
    )
    assert ok.status_code == 201
    assert ok.json()["balance_micros"] == 0


async def test_overdraft_limit_is_the_floor(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=10, overdraft_limit_micros=5)
    url = f"/v1/wallets/{wallet_id}/debits"
    assert (
        await client.post(url, json={"amount_micros": 15}, headers=auth(keys.debit, "a"))
    ).status_code == 201
    refused = await client.post(url, json={"amount_micros": 1}, headers=auth(keys.debit, "b"))
    assert refused.status_code == 402
    assert refused.json()["balance_micros"] == -5


async def test_entries_page_newest_first(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    for n in range(5):
        r = await client.post(
            f"/v1/wallets/{wallet_id}/debits",
            json={"amount_micros": n + 1},
            headers=auth(keys.debit, f"e{n}"),
        )
        assert r.status_code == 201
    seen: list[dict] = []
    cursor = None
    for _ in range(10):
        params = {"limit": 2} | ({"starting_after": cursor} if cursor else {})
        page = (
            await client.get(f"/v1/wallets/{wallet_id}/entries", params=params, headers=auth(keys.read))
        ).json()
        seen.extend(page["data"])
        if not page["has_more"]:
            break
        cursor = page["data"][-1]["id"]
    assert [e["kind"] for e in seen] == ["debit"] * 5 + ["credit"]
    assert [e["amount_micros"] for e in seen[:5]] == [5, 4, 3, 2, 1]


async def test_wallet_exists_and_owner_listing(client: httpx.AsyncClient, keys: Keys) -> None:
    owner = f"owner-{secrets.token_hex(4)}"
    body = {"owner_id": owner, "currency": "eur"}
    first = await client.post("/v1/wallets", json=body, headers=auth(keys.admin))
    assert first.status_code == 201
    again = await client.post("/v1/wallets", json=body, headers=auth(keys.admin))
    assert again.status_code == 409
    assert again.json()["code"] == "wallet_exists"
    assert again.json()["wallet_id"] == first.json()["id"]
    assert (
        await client.post("/v1/wallets", json={**body, "currency": "usd"}, headers=auth(keys.admin))
    ).status_code == 201
    listed = (await client.get("/v1/wallets", params={"owner_id": owner}, headers=auth(keys.read))).json()[
        "data"
    ]
    assert sorted(w["currency"] for w in listed) == ["eur", "usd"]


async def test_scopes(client: httpx.AsyncClient, keys: Keys) -> None:
    """Scopes nest: admin covers debit, debit covers read, read covers no write."""
    wallet_id = await new_wallet(client, keys, funded_micros=10)
    debit = f"/v1/wallets/{wallet_id}/debits"
    by_admin = await client.post(debit, json={"amount_micros": 1}, headers=auth(keys.admin, "s0"))
    assert by_admin.status_code == 201, by_admin.text
    read_by_debit = await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.debit))
    assert read_by_debit.status_code == 200, read_by_debit.text
    assert read_by_debit.json()["balance_micros"] == 9
    read_only = await client.post(debit, json={"amount_micros": 1}, headers=auth(keys.read, "s1"))
    assert (read_only.status_code, read_only.json()["code"]) == (403, "forbidden"), read_only.text
    credit = await client.post(
        f"/v1/wallets/{wallet_id}/credits",
        json={"amount_micros": 1, "reason": "x"},
        headers=auth(keys.debit, "s2"),
    )
    assert credit.status_code == 403
    unknown = await client.get(f"/v1/wallets/{wallet_id}", headers=auth("ck_not_a_key"))
    assert unknown.status_code == 401
    assert unknown.json()["code"] == "unauthorized"


async def test_health_and_schema(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    for path in ("/healthz", "/readyz"):  # what load balancers send
        head = await client.head(path)
        assert (head.status_code, head.content) == (200, b""), path
    schema = (await client.get("/schema/openapi.json")).json()
    debit = schema["paths"]["/v1/wallets/{wallet_id}/debits"]["post"]
    assert debit["requestBody"]["content"]["application/json"]["schema"]["required"] == ["amount_micros"]
    assert set(debit["responses"]) >= {"201", "400", "401", "402", "403", "404", "409", "503"}
    assert "application/problem+json" in debit["responses"]["402"]["content"]
    exists = schema["paths"]["/v1/wallets"]["post"]["responses"]["409"]["content"]["application/problem+json"]
    exists_schema = schema["components"]["schemas"][exists["schema"]["$ref"].rsplit("/", 1)[1]]
    assert "wallet_id" in exists_schema["required"]
    metrics = (await client.get("/metrics")).text
    assert "centime_debit_latency_seconds" in metrics
    assert "centime_commit_batch_entries" in metrics


async def test_a_credit_the_balance_cannot_take_is_422(client: httpx.AsyncClient, keys: Keys) -> None:
    """Well-formed (the OpenAPI allows 2**53 - 1), refused for the wallet's state: 422, not 400."""
    wallet_id = await new_wallet(client, keys, funded_micros=2**53 - 1)
    refused = await client.post(
        f"/v1/wallets/{wallet_id}/credits",
        json={"amount_micros": 1, "reason": "one too many"},
        headers=auth(keys.admin, "too-much"),
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "balance_too_large" and refused.json()["fields"] == ["amount_micros"]
