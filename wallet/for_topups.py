"""What top-ups may do to a wallet: the whole of the wallet that topup/ sees.

A top-up looks its wallet up (as its caller may see it), and moves money
Postgres first: in the transaction of the Stripe event that caused it, it
locks the wallet, writes a ledger entry with its wallet change (a credit, a
clawback, or a dispute that freezes or unfreezes the wallet), and after the
commit applies the wallet's changes to Redis (wallet/changes.py). Nothing
else of the wallet's SQL or Redis is a top-up's business."""

from __future__ import annotations

import uuid
from typing import Literal

import asyncpg
import msgspec

from ledger.schemas import EntryRecord
from wallet import changes, repo
from wallet.cache import Cache
from wallet.errors import WalletNotFound
from wallet.owners import OwnerIds, WalletOwners, sees

StatusChange = Literal["frozen", "active"] | None
"""What a change does to the wallet's status: a dispute opened freezes it,
the last one closed makes it active again; None leaves it as it is."""


class TopUpWallet(msgspec.Struct, frozen=True, kw_only=True):
    """A wallet as a top-up needs it: whom to bill, in which currency."""

    id: uuid.UUID
    owner_id: str
    currency: str


class TopUpWallets:
    """The wallets, as top-ups may use them. Holds its connections."""

    def __init__(self, *, pool: asyncpg.Pool, cache: Cache, timeout_s: float) -> None:
        self._pool = pool
        self._cache = cache
        self._timeout_s = timeout_s
        self._owners = WalletOwners(pool, timeout_s=timeout_s)

    async def wallet(self, wallet_id: uuid.UUID, *, owner_ids: OwnerIds) -> TopUpWallet:
        """The wallet, if the caller sees it; else WalletNotFound (as a
        missing one: nothing tells it exists)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            row = await repo.wallet_by_id(conn, wallet_id)
        if row is None or not sees(owner_ids, row.owner_id):
            raise WalletNotFound(f"no wallet {wallet_id}")
        return TopUpWallet(id=row.id, owner_id=row.owner_id, currency=row.currency)

    async def in_reach(self, wallet_id: uuid.UUID, owner_ids: OwnerIds) -> bool:
        """Whether a caller with these owner ids sees the wallet."""
        return owner_ids is None or await self._owners.in_reach(wallet_id, owner_ids)

    async def lock(self, conn: asyncpg.Connection, wallet_id: uuid.UUID) -> None:
        """Take the wallet's row lock for the caller's transaction, before
        reading what its changes depend on."""
        await changes.lock_wallet(conn, wallet_id)

    async def write(self, conn: asyncpg.Connection, entry: EntryRecord, *, status: StatusChange) -> bool:
        """Write the entry and its wallet change in the caller's transaction.
        False, writing nothing, when the entry is already in the ledger."""
        return await changes.write_change(conn, entry, status=status, timeout_s=self._timeout_s)

    async def apply(self, wallet_id: uuid.UUID) -> int:
        """After the commit: bring the wallet's Redis copy up to date with
        its committed changes (the sweeper does it if this fails)."""
        return await changes.apply_changes(self._pool, self._cache, wallet_id, timeout_s=self._timeout_s)
