"""The wallet -> owner map behind keys with owners: it answers which wallets
a key's owners own with one query for those it does not remember, then from
memory alone (no I/O), never remembers a missing wallet, and stays bounded."""

from __future__ import annotations

import secrets
import uuid

import asyncpg

from ledger.ids import uuid7
from wallet import repo
from wallet.owners import WalletOwners


async def test_the_map_remembers_owners_within_its_bound(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    mine, theirs = f"mine-{secrets.token_hex(4)}", f"theirs-{secrets.token_hex(4)}"
    made = [(uuid7(), mine, "usd"), (uuid7(), mine, "eur"), (uuid7(), theirs, "usd")]
    wallets = {wallet_id: owner_id for wallet_id, owner_id, _ in made}
    async with pool.acquire(timeout=5) as conn:
        for wallet_id, owner_id, currency in made:
            assert await repo.insert_wallet(conn, wallet_id, owner_id, currency, 0) is not None
    owners = WalletOwners(pool, timeout_s=5, entries_max=2)
    missing = uuid.uuid4()
    ids = [*wallets, missing]
    reachable = await owners.reachable(ids, frozenset({mine}))
    assert reachable == {w for w, o in wallets.items() if o == mine}
    assert len(owners._owners) == 2 and missing not in owners._owners
    remembered = list(owners._owners)
    await pool.close()  # from here on, any query would raise
    for wallet_id in remembered:
        assert owners.known_in_reach(wallet_id, frozenset({wallets[wallet_id]}))
        assert await owners.in_reach(wallet_id, frozenset({wallets[wallet_id]}))
        assert not await owners.in_reach(wallet_id, frozenset({"nobody"}))
    assert not owners.known_in_reach(missing, frozenset({mine}))
