"""/metrics counts what the serving process's sweeper settled: after it expires a hold,
centime_sweeper_settled_total{how="holds_expired"} has grown by at least that hold."""

from __future__ import annotations

import asyncio
import re
import secrets

import httpx
from conftest import Keys, auth, new_wallet

EXPIRED = re.compile(r'^centime_sweeper_settled_total\{how="holds_expired"\} (\S+)$', re.MULTILINE)
WAIT_ROUNDS_MAX = 100
"""Tenths of a second to wait for the sweeper (it runs every second)."""


async def holds_expired(http: httpx.AsyncClient) -> float:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    found = EXPIRED.search(response.text)
    return float(found.group(1)) if found else 0.0


async def test_metrics_count_the_holds_the_sweeper_expired(client: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(client, keys, funded_micros=1_000)
    before = await holds_expired(client)
    held = await client.post(
        f"/v1/wallets/{wallet_id}/holds",
        json={"amount_micros": 100, "expires_in_s": 1},
        headers=auth(keys.debit, secrets.token_hex(8)),
    )
    assert held.status_code == 201, held.text
    for _ in range(WAIT_ROUNDS_MAX):
        if await holds_expired(client) >= before + 1:
            break
        await asyncio.sleep(0.1)
    assert await holds_expired(client) >= before + 1
