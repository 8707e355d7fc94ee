"""Who owns a wallet, for API keys that see only some owners' wallets.

A wallet's owner never changes, so each process keeps what it has read in
a bounded map: on the debit path the check is a dict lookup, and Postgres
is asked once per wallet (per process, until evicted)."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable

import asyncpg

from wallet import repo

OwnerIds = frozenset[str] | None
"""The owners whose wallets a caller sees (its API key's); None: every owner."""
WALLET_OWNERS_MAX = 100_000
"""Wallets whose owner a process remembers (least recently used goes first): ~20 MB."""


def sees(owner_ids: OwnerIds, owner_id: str) -> bool:
    """Whether a caller with these owner ids sees a wallet of `owner_id`."""
    return owner_ids is None or owner_id in owner_ids


class WalletOwners:
    """wallet id -> owner id, read from Postgres on a miss."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float, entries_max: int = WALLET_OWNERS_MAX) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._entries_max = entries_max
        self._owners: OrderedDict[uuid.UUID, str] = OrderedDict()

    def remember(self, wallet_id: uuid.UUID, owner_id: str) -> None:
        self._owners[wallet_id] = owner_id
        self._owners.move_to_end(wallet_id)
        while len(self._owners) > self._entries_max:
            self._owners.popitem(last=False)

    def known_in_reach(self, wallet_id: uuid.UUID, owner_ids: frozenset[str]) -> bool:
        """True if the wallet is remembered and one of `owner_ids` owns it:
        the debit path's check, with no await. False says nothing (ask in_reach)."""
        owner = self._owners.get(wallet_id)
        if owner is None:
            return False
        self._owners.move_to_end(wallet_id)
        return owner in owner_ids

    async def in_reach(self, wallet_id: uuid.UUID, owner_ids: frozenset[str]) -> bool:
        """Whether the wallet exists and one of `owner_ids` owns it."""
        if wallet_id in self._owners:
            return self.known_in_reach(wallet_id, owner_ids)
        return wallet_id in await self.reachable([wallet_id], owner_ids)

    async def reachable(self, wallet_ids: Iterable[uuid.UUID], owner_ids: frozenset[str]) -> set[uuid.UUID]:
        """Those of `wallet_ids` that exist and one of `owner_ids` owns: one
        query for all the ones not remembered. A missing wallet is not
        remembered (it may be created later)."""
        wanted = set(wallet_ids)
        owners = {w: self._owners[w] for w in wanted if w in self._owners}
        missing = [w for w in wanted if w not in owners]
        if missing:
            async with self._pool.acquire(timeout=self._timeout_s) as conn:
                found = await repo.owners_of_wallets(conn, missing, timeout_s=self._timeout_s)
            for wallet_id, owner_id in found.items():
                self.remember(wallet_id, owner_id)
            owners.update(found)
        return {w for w, owner in owners.items() if owner in owner_ids}
