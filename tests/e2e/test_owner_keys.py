"""Keys that name owners, over real HTTP: every wallet, hold, batch item,
entry, top-up and list route answers another owner's object exactly as it
answers a missing one (the same status and body, nothing charged or
changed), the key's own owners' wallets work as with any key, an admin key
with owners creates and credits only its owners' wallets and cannot read
reconciliation runs, and a revoked key is refused by the server within 1 s."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from conftest import Keys, auth, run_cli

from centime.auth import Scope, create_api_key
from centime.settings import Settings

FUNDED_MICROS = 100_000


class Owned(msgspec.Struct, frozen=True):
    """Two owners' wallets; keys that see only the first owner."""

    own: str  # a wallet of the keys' owner
    other: str  # a wallet of another owner
    missing: str  # an id of no wallet
    read: str
    debit: str
    admin: str


async def scoped_key(settings: Settings, scope: Scope, owner_ids: list[str]) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return (await create_api_key(conn, f"scoped-{scope}", scope, owner_ids))[1]
    finally:
        await conn.close()


async def wallet_of(client: httpx.AsyncClient, keys: Keys, owner_id: str) -> str:
    created = await client.post(
        "/v1/wallets", json={"owner_id": owner_id, "currency": "usd"}, headers=auth(keys.admin)
    )
    assert created.status_code == 201, created.text
    wallet_id = created.json()["id"]
    funded = await client.post(
        f"/v1/wallets/{wallet_id}/credits",
        json={"amount_micros": FUNDED_MICROS, "reason": "test"},
        headers=auth(keys.admin, secrets.token_hex(8)),
    )
    assert funded.status_code == 201, funded.text
    return wallet_id


@pytest.fixture
async def owned(client: httpx.AsyncClient, keys: Keys, settings: Settings) -> Owned:
    owner, other_owner = f"own-{secrets.token_hex(4)}", f"other-{secrets.token_hex(4)}"
    return Owned(
        own=await wallet_of(client, keys, owner),
        other=await wallet_of(client, keys, other_owner),
        missing=str(uuid.uuid4()),
        read=await scoped_key(settings, "read", [owner, "nobody"]),
        debit=await scoped_key(settings, "debit", [owner]),
        admin=await scoped_key(settings, "admin", [owner]),
    )


def answer(response: httpx.Response, *ids: str) -> tuple[int, Any]:
    """Status and body, with the ids asked about replaced: a missing id and
    another owner's must read the same."""
    text = response.text
    for value in ids:
        text = text.replace(value, "<id>")
    return response.status_code, msgspec.json.decode(text)


async def balance(client: httpx.AsyncClient, keys: Keys, wallet_id: str) -> tuple[int, int]:
    got = await client.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert got.status_code == 200, got.text
    return got.json()["balance_micros"], got.json()["held_micros"]


async def test_another_owners_wallet_reads_as_missing(client: httpx.AsyncClient, owned: Owned) -> None:
    for path in ("/v1/wallets/{w}", "/v1/wallets/{w}/entries", "/v1/wallets/{w}/topups"):
        own = await client.get(path.format(w=owned.own), headers=auth(owned.read))
        assert own.status_code == 200, own.text
        other = await client.get(path.format(w=owned.other), headers=auth(owned.read))
        missing = await client.get(path.format(w=owned.missing), headers=auth(owned.read))
        assert answer(other, owned.other) == answer(missing, owned.missing), path
        assert other.json()["code"] == "wallet_not_found"


async def test_another_owners_wallet_takes_no_debit_hold_or_credit(
    client: httpx.AsyncClient, keys: Keys, owned: Owned
) -> None:
    cases = [
        ("/v1/wallets/{w}/debits", owned.debit, {"amount_micros": 10}),
        ("/v1/wallets/{w}/holds", owned.debit, {"amount_micros": 10}),
        ("/v1/wallets/{w}/credits", owned.admin, {"amount_micros": 10, "reason": "r"}),
    ]
    for path, key, body in cases:
        answers = []
        for wallet_id in (owned.other, owned.missing):
            response = await client.post(
                path.format(w=wallet_id), json=body, headers=auth(key, secrets.token_hex(8))
            )
            answers.append(answer(response, wallet_id))
        assert answers[0] == answers[1], path
        assert answers[0][0] == 404 and answers[0][1]["code"] == "wallet_not_found"
        own = await client.post(path.format(w=owned.own), json=body, headers=auth(key, secrets.token_hex(8)))
        assert own.status_code == 201, own.text
    assert await balance(client, keys, owned.other) == (FUNDED_MICROS, 0)


async def test_another_owners_hold_reads_as_missing_and_stays_held(
    client: httpx.AsyncClient, keys: Keys, owned: Owned
) -> None:
    created = await client.post(
        f"/v1/wallets/{owned.other}/holds",
        json={"amount_micros": 500},
        headers=auth(keys.debit, secrets.token_hex(8)),
    )
    assert created.status_code == 201, created.text
    hold_id, missing_hold = created.json()["id"], str(uuid.uuid4())
    for method, path, body in (
        ("GET", "/v1/holds/{h}", None),
        ("POST", "/v1/holds/{h}/capture", {"amount_micros": 100}),
        ("POST", "/v1/holds/{h}/release", None),
    ):
        answers = []
        for h in (hold_id, missing_hold):
            response = await client.request(method, path.format(h=h), json=body, headers=auth(owned.debit))
            answers.append(answer(response, h))
        assert answers[0] == answers[1], path
        assert answers[0][0] == 404 and answers[0][1]["code"] == "hold_not_found"
    held = await client.get(f"/v1/holds/{hold_id}", headers=auth(keys.read))
    assert held.json()["status"] == "held"
    assert await balance(client, keys, owned.other) == (FUNDED_MICROS, 500)


async def test_a_batch_answers_another_owners_item_as_a_missing_wallets(
    client: httpx.AsyncClient, keys: Keys, owned: Owned
) -> None:
    debits = [
        {"wallet_id": w, "amount_micros": 7, "idempotency_key": secrets.token_hex(6)}
        for w in (owned.own, owned.other, owned.missing)
    ]
    response = await client.post(
        "/v1/debits/batch", json={"debits": debits}, headers=auth(owned.debit, secrets.token_hex(8))
    )
    assert response.status_code == 200, response.text
    own, other, missing = response.json()["results"]
    assert own["status"] == 201
    assert other["problem"]["code"] == "wallet_not_found"
    assert other["problem"]["detail"].replace(owned.other, "<id>") == missing["problem"]["detail"].replace(
        owned.missing, "<id>"
    )
    assert {k: v for k, v in other.items() if k != "problem"} == {
        k: v for k, v in missing.items() if k != "problem"
    }
    assert await balance(client, keys, owned.other) == (FUNDED_MICROS, 0)
    assert (await balance(client, keys, owned.own))[0] == FUNDED_MICROS - 7


async def test_listing_another_owners_wallets_is_not_found(client: httpx.AsyncClient, owned: Owned) -> None:
    mine = await client.get("/v1/wallets/" + owned.own, headers=auth(owned.read))
    owner = mine.json()["owner_id"]
    listed = await client.get("/v1/wallets", params={"owner_id": owner}, headers=auth(owned.read))
    assert [w["id"] for w in listed.json()["data"]] == [owned.own]
    # Within its owners, an owner with no wallets is an empty list; outside, 404 whether or not
    # the owner has wallets.
    assert (await client.get("/v1/wallets?owner_id=nobody", headers=auth(owned.read))).json() == {"data": []}
    for other_owner in (f"other-{secrets.token_hex(4)}", "no-such-owner"):
        refused = await client.get("/v1/wallets", params={"owner_id": other_owner}, headers=auth(owned.read))
        assert refused.status_code == 404 and refused.json()["code"] == "wallet_not_found"
    other = await client.get("/v1/wallets/" + owned.other, headers=auth(owned.read))
    assert other.status_code == 404


async def test_an_admin_key_with_owners_stays_within_them(
    client: httpx.AsyncClient, keys: Keys, owned: Owned
) -> None:
    own_owner = (await client.get("/v1/wallets/" + owned.own, headers=auth(owned.read))).json()["owner_id"]
    refused = await client.post(
        "/v1/wallets", json={"owner_id": "someone-else", "currency": "usd"}, headers=auth(owned.admin)
    )
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden", refused.text
    created = await client.post(
        "/v1/wallets", json={"owner_id": own_owner, "currency": "eur"}, headers=auth(owned.admin)
    )
    assert created.status_code == 201, created.text
    runs = await client.get("/v1/reconciliation/runs", headers=auth(owned.admin))
    assert runs.status_code == 403, runs.text
    assert (await client.get("/v1/reconciliation/runs", headers=auth(keys.admin))).status_code == 200


async def test_the_cli_makes_lists_and_revokes_a_key_the_server_then_refuses(
    client: httpx.AsyncClient, keys: Keys, settings: Settings, owned: Owned
) -> None:
    owner = (await client.get("/v1/wallets/" + owned.own, headers=auth(owned.read))).json()["owner_id"]
    made = await asyncio.to_thread(
        run_cli, settings, "api-key", "create", "--name", "cli-key", "--scope", "read", "--owner", owner
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert (await client.get("/v1/wallets/" + owned.own, headers=auth(secret))).status_code == 200
    assert (await client.get("/v1/wallets/" + owned.other, headers=auth(secret))).status_code == 404
    listed = await asyncio.to_thread(run_cli, settings, "api-key", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = [msgspec.json.decode(line) for line in listed.stdout.splitlines()]
    (row,) = [r for r in rows if r["name"] == "cli-key" and r["owner_ids"] == [owner]]
    assert row["scope"] == "read" and row["revoked_at"] is None
    table = await asyncio.to_thread(run_cli, settings, "api-key", "list")
    assert row["id"] in table.stdout and "last used" in table.stdout

    revoked = await asyncio.to_thread(run_cli, settings, "api-key", "revoke", row["id"])
    assert revoked.returncode == 0, revoked.stderr
    done_at = time.monotonic()
    while (await client.get("/v1/wallets/" + owned.own, headers=auth(secret))).status_code != 401:
        assert time.monotonic() - done_at < 1.0, "the server still accepts the revoked key"
        await asyncio.sleep(0.02)

    again = await asyncio.to_thread(run_cli, settings, "api-key", "revoke", row["id"])
    assert again.returncode == 0 and "already revoked" in again.stderr
    unknown = await asyncio.to_thread(run_cli, settings, "api-key", "revoke", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no API key" in unknown.stderr
    bad = await asyncio.to_thread(run_cli, settings, "api-key", "revoke", "not-an-id")
    assert bad.returncode == 2 and "not a key id" in bad.stderr
    too_many = [arg for i in range(101) for arg in ("--owner", f"o{i}")]
    refused = await asyncio.to_thread(
        run_cli, settings, "api-key", "create", "--name", "n", "--scope", "read", *too_many
    )
    assert refused.returncode == 2 and "1..100 owners" in refused.stderr
