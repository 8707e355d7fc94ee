"""The wallet service: create and read wallets, and the debit path, composed
of its rooms (docs/architecture.md has the why):

- wallet/charges.py: the charge record and its codecs;
- wallet/replies.py: the Lua scripts' replies, typed;
- wallet/write_through.py: the commit of a charge to the ledger, and every
  way that settles it when the commit fails or is late;
- wallet/batches.py: batch debits.

The debit path: one Lua script charges Redis atomically and appends the
entry to its partition's outbox (apply.lua); the entry joins a group commit
into the Postgres ledger; the answer is sent only after the commit."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import redis.exceptions

from centime import metrics
from centime.errors import Forbidden, InvalidRequest, NotFound, Unavailable, invariant
from centime.money import is_supported_currency
from centime.settings import Settings
from ledger import repo as ledger_repo
from ledger.ids import parse_uuid, uuid7
from ledger.writer import LedgerWriter
from wallet import repo
from wallet.batches import REFUSALS_TO_CHECK_IN_LEDGER, Batches
from wallet.cache import Cache, CachedWallet
from wallet.changes import load_from_ledger
from wallet.charges import (
    PendingCharge,
    charge_of,
    encode_payload,
    refusal_error,
    refuse_reserved_key,
    request_hash,
    to_entry,
)
from wallet.errors import HoldNotFound, WalletExists, WalletNotFound
from wallet.owners import OwnerIds, WalletOwners, sees
from wallet.replies import Missing
from wallet.schemas import (
    PAGE_SIZE_MAX,
    WALLETS_PER_OWNER_MAX,
    BatchItem,
    CreateBatch,
    CreateWallet,
    Entry,
    EntryPage,
    EntryPayload,
    Wallet,
)
from wallet.write_through import CommitResult, WriteThrough

log = logging.getLogger(__name__)


def _parse_id(raw: str, not_found: type[NotFound], noun: str) -> uuid.UUID:
    """A path id that is not a UUID names nothing: 404, like any unknown id."""
    parsed = parse_uuid(raw)
    if parsed is None:
        raise not_found(f"no {noun} {raw!r}")
    return parsed


def parse_wallet_id(raw: str) -> uuid.UUID:
    return _parse_id(raw, WalletNotFound, "wallet")


def parse_hold_id(raw: str) -> uuid.UUID:
    return _parse_id(raw, HoldNotFound, "hold")


class Wallets:
    """The wallet service. Holds its connections, given explicitly."""

    def __init__(
        self, *, pool: asyncpg.Pool, cache: Cache, writer: LedgerWriter[CommitResult], settings: Settings
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.writer = writer
        self.settings = settings
        self._database_timeout_s = settings.database_timeout_ms / 1000
        self.owners = WalletOwners(pool, timeout_s=self._database_timeout_s)
        self.committing = WriteThrough(pool=pool, cache=cache, writer=writer, settings=settings)
        self.batches = Batches(
            pool=pool,
            cache=cache,
            settings=settings,
            owners=self.owners,
            write_through=self.committing,
            load_missing=self.load_missing,
        )
        # The writer's after-commit step (writer.start(after_commit=wallets.after_commit)),
        # and the hand-off of a charge whose script call failed: the write-through's own.
        self.after_commit = self.committing.after_commit
        self.abandon_in_background = self.committing.abandon_in_background

    # Reach: a caller whose key names owners sees only their wallets ----------

    async def check_reach(self, wallet_id: uuid.UUID, owner_ids: OwnerIds) -> None:
        """A wallet outside the caller's owners is answered as a missing one,
        with the same body: nothing tells that it exists."""
        if owner_ids is not None and not await self.owners.in_reach(wallet_id, owner_ids):
            raise WalletNotFound(f"no wallet {wallet_id}")

    # Wallets ---------------------------------------------------------------

    async def create_wallet(self, request: CreateWallet, *, owner_ids: OwnerIds) -> Wallet:
        if not sees(owner_ids, request.owner_id):
            raise Forbidden(f"this key creates wallets for its own owners only, not for {request.owner_id!r}")
        if not is_supported_currency(request.currency):
            raise InvalidRequest(
                f"currency: {request.currency!r} is not a supported ISO 4217 code", fields=["currency"]
            )
        wallet_id = uuid7()
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn, conn.transaction():
            row = await repo.insert_wallet(
                conn, wallet_id, request.owner_id, request.currency, request.overdraft_limit_micros
            )
            if row is None:
                existing_id = await repo.wallet_id_of_owner(conn, request.owner_id, request.currency)
                invariant(existing_id is not None, "insert_wallet met a wallet that is not there")
                raise WalletExists(
                    f"owner {request.owner_id!r} already has a {request.currency} wallet: {existing_id}",
                    wallet_id=str(existing_id),
                )
            await ledger_repo.ensure_system_accounts(conn, request.currency)
            await ledger_repo.insert_wallet_account(conn, wallet_id, request.currency)
        self.owners.remember(wallet_id, request.owner_id)
        cached = CachedWallet(0, row.overdraft_limit_micros, row.status, row.currency)
        try:
            await self.cache.load_wallet(wallet_id, cached, overwrite=False)
        except redis.exceptions.RedisError as exc:  # loaded from the ledger on first use
            log.warning("wallet %s created; Redis load deferred: %r", wallet_id, exc)
        return _wallet(row, 0, 0)

    async def get_wallet(self, wallet_id: uuid.UUID, *, owner_ids: OwnerIds) -> Wallet:
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
            row = await repo.wallet_by_id(conn, wallet_id)
            if row is None or not sees(owner_ids, row.owner_id):
                raise WalletNotFound(f"no wallet {wallet_id}")
            cached = await self._cached_or_load(conn, row)
        return _wallet(row, cached.balance_micros, cached.held_micros)

    async def list_wallets(self, owner_id: str, *, owner_ids: OwnerIds) -> list[Wallet]:
        if not sees(owner_ids, owner_id):
            # Whether the owner has wallets or not: this key sees none of them.
            raise WalletNotFound(f"no wallets of owner {owner_id!r} for this key")
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
            rows = await repo.wallets_by_owner(conn, owner_id, WALLETS_PER_OWNER_MAX)
            cached = [await self._cached_or_load(conn, row) for row in rows]
        return [_wallet(row, c.balance_micros, c.held_micros) for row, c in zip(rows, cached, strict=True)]

    async def _cached_or_load(self, conn: asyncpg.Connection, row: repo.WalletRow) -> CachedWallet:
        cached = await self.cache.wallet(row.id)
        if cached is not None:
            return cached
        loaded = await load_from_ledger(conn, self.cache, row.id, overwrite=False)
        invariant(loaded is not None, f"wallet {row.id} vanished while loading it")
        assert loaded is not None
        log.warning(
            "wallet %s was missing from Redis; loaded balance %d from the ledger",
            row.id,
            loaded.balance_micros,
        )
        return await self.cache.wallet(row.id) or loaded

    async def list_entries(
        self, wallet_id: uuid.UUID, *, limit: int, starting_after: uuid.UUID | None, owner_ids: OwnerIds
    ) -> EntryPage:
        invariant(1 <= limit <= PAGE_SIZE_MAX, f"limit {limit} outside 1..{PAGE_SIZE_MAX}")
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
            row = await repo.wallet_by_id(conn, wallet_id)
            if row is None or not sees(owner_ids, row.owner_id):
                raise WalletNotFound(f"no wallet {wallet_id}")
            records = await ledger_repo.wallet_entries_page(conn, wallet_id, starting_after, limit + 1)
        return EntryPage(data=[to_entry(r) for r in records[:limit]], has_more=len(records) > limit)

    # The debit path --------------------------------------------------------

    async def post_entry(
        self,
        wallet_id: uuid.UUID,
        *,
        kind: str,
        amount_micros: int,
        idempotency_key: str,
        description: str | None,
        metadata: dict[str, str],
        owner_ids: OwnerIds,
    ) -> tuple[Entry, bool]:
        """Debit or credit a wallet. Returns the entry and whether it is a replay."""
        started = time.perf_counter()
        try:
            refuse_reserved_key(idempotency_key, "Idempotency-Key")
            # A key of every owner pays nothing for the check; a key with
            # owners, a dict lookup once its wallet is remembered.
            if owner_ids is not None and not self.owners.known_in_reach(wallet_id, owner_ids):
                await self.check_reach(wallet_id, owner_ids)
            payload = EntryPayload(
                id=uuid7(),
                wallet_id=wallet_id,
                kind=kind,  # type: ignore[arg-type]
                amount_micros=amount_micros,
                idempotency_key=idempotency_key,
                request_hash=request_hash(kind, amount_micros, description, metadata),
                description=description,
                metadata=metadata,
                created_at=datetime.now(UTC),
            )
            charge_or_replay = await self._charge(payload)
            if isinstance(charge_or_replay, Entry):
                return charge_or_replay, True  # replayed, from Redis or from the ledger
            return await self.committing.write(charge_or_replay, payload)
        finally:
            metrics.debit_latency_seconds.observe(time.perf_counter() - started)

    async def post_batch(
        self, batch: CreateBatch, *, idempotency_key: str, owner_ids: OwnerIds
    ) -> list[BatchItem]:
        """Debit many wallets, each item on its own (wallet/batches.py)."""
        return await self.batches.post_batch(batch, idempotency_key=idempotency_key, owner_ids=owner_ids)

    async def _charge(self, payload: EntryPayload) -> PendingCharge | Entry:
        """Charge Redis (apply.lua): a charge to write through, or the entry
        to replay (from Redis, or from the ledger's holder of the key); a
        refusal raises."""
        encoded = encode_payload(payload)
        for _attempt in range(2):  # the second only after loading a wallet missing from Redis
            try:
                reply = await self.cache.apply(
                    wallet_id=payload.wallet_id,
                    kind=payload.kind,
                    amount_micros=payload.amount_micros,
                    request_hash=payload.request_hash,
                    entry_id=payload.id,
                    payload=encoded,
                    idempotency_key=payload.idempotency_key,
                    ttl_s=self.settings.idempotency_ttl_s,
                )
            except redis.exceptions.RedisError as exc:
                # The script may have run. Hand the entry to the sweeper, in
                # the background and bounded, so a 503 never leaves a charge.
                self.abandon_in_background(payload.wallet_id, payload.idempotency_key, payload.id)
                raise Unavailable("the balance store did not answer; nothing was charged") from exc
            outcome = charge_of(reply, payload)
            if isinstance(outcome, (PendingCharge, Entry)):
                return outcome
            if not isinstance(outcome, Missing):
                if outcome.reason in REFUSALS_TO_CHECK_IN_LEDGER:
                    # Redis may have lost this key's record: the ledger keeps
                    # keys forever, and a retry of a charged request must replay it.
                    async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
                        holder = await ledger_repo.entry_by_wallet_key(
                            conn, payload.wallet_id, payload.idempotency_key
                        )
                    if holder is not None:
                        return await self.committing.answer_as_holder(holder, payload)
                raise refusal_error(outcome, payload)
            await self.load_missing(payload.wallet_id)
        raise Unavailable(f"wallet {payload.wallet_id} could not be loaded into the balance store")

    async def load_missing(self, wallet_id: uuid.UUID) -> None:
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
            row = await repo.wallet_by_id(conn, wallet_id)
            if row is None:
                raise WalletNotFound(f"no wallet {wallet_id}")
            await self._cached_or_load(conn, row)

    async def write_through(self, charge: PendingCharge, payload: EntryPayload) -> tuple[Entry, bool]:
        """Commit a charge to the ledger and answer it (wallet/write_through.py)."""
        return await self.committing.write(charge, payload)


def _wallet(row: repo.WalletRow, balance_micros: int, held_micros: int) -> Wallet:
    return Wallet(
        id=row.id,
        owner_id=row.owner_id,
        currency=row.currency,
        balance_micros=balance_micros,
        held_micros=held_micros,
        # A frozen wallet can take no debit or hold.
        available_micros=0
        if row.status != "active"
        else balance_micros - held_micros + row.overdraft_limit_micros,
        overdraft_limit_micros=row.overdraft_limit_micros,
        status=row.status,  # type: ignore[arg-type]
        created_at=row.created_at,
    )
