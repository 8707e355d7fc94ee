"""Concurrent debits over HTTP never overdraw: 1,000 at once on one wallet
funded for 400 give exactly 400 charges, and the ledger and `centime check`
agree."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import httpx
import msgspec
import pytest
from conftest import Keys, Server, auth, make_keys, new_wallet, run_cli, start_server, stop_server

from centime.settings import Settings

DEBITS = 1_000
FUNDED_FOR = 400
AMOUNT_MICROS = 2_500


@pytest.fixture
async def private(settings: Settings, private_database: str) -> AsyncIterator[tuple[Settings, Server, Keys]]:
    own = msgspec.structs.replace(settings, database_url=private_database)
    server = start_server(own)
    try:
        yield own, server, await make_keys(private_database)
    finally:
        stop_server(server)


async def _storm(server: Server, keys: Keys, overdraft_limit_micros: int) -> tuple[str, Counter[int], dict]:
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
        wallet_id = await new_wallet(
            http,
            keys,
            funded_micros=FUNDED_FOR * AMOUNT_MICROS - overdraft_limit_micros,
            overdraft_limit_micros=overdraft_limit_micros,
        )
        responses = await asyncio.gather(
            *(
                http.post(
                    f"/v1/wallets/{wallet_id}/debits",
                    json={"amount_micros": AMOUNT_MICROS},
                    headers=auth(keys.debit, f"storm-{n}"),
                )
                for n in range(DEBITS)
            )
        )
        wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
    return wallet_id, Counter(r.status_code for r in responses), wallet


@pytest.mark.parametrize(
    "overdraft_limit_micros", [0, 100 * AMOUNT_MICROS], ids=["no-overdraft", "overdraft"]
)
async def test_exactly_the_funded_debits_succeed(private, overdraft_limit_micros: int) -> None:
    settings, server, keys = private
    wallet_id, statuses, wallet = await _storm(server, keys, overdraft_limit_micros)

    assert statuses == {201: FUNDED_FOR, 402: DEBITS - FUNDED_FOR}
    assert wallet["balance_micros"] == -overdraft_limit_micros

    conn = await asyncpg.connect(settings.database_url)
    try:
        debits = await conn.fetchval(
            "SELECT count(*) FROM journal_entries WHERE wallet_id = $1 AND kind = 'debit'",
            wallet_id,
        )
        ledger_balance = await conn.fetchval(
            "SELECT -sum(amount_micros) FROM journal_lines WHERE account_id = $1", wallet_id
        )
    finally:
        await conn.close()
    assert debits == FUNDED_FOR
    assert ledger_balance == -overdraft_limit_micros

    checked = run_cli(settings, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok: 1 wallets checked" in checked.stdout
