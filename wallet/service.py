"""Wallet logic: create and read wallets, and the debit path.

The debit path (docs/architecture.md has the why):
  1. one Lua script charges Redis atomically and appends the entry to its
     partition's outbox, keyed by the request's idempotency key;
  2. the entry joins a group commit into the Postgres ledger;
  3. the answer is sent only after the commit. Every failure settles the
     charge: definitely not written -> refund now (compensate); unknown ->
     hand to the sweeper (abandon), which writes entry and reversal.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import redis.exceptions

from centime import metrics
from centime.errors import Forbidden, InvalidRequest, NotFound, Unavailable, invariant
from centime.money import AMOUNT_MICROS_MAX, is_supported_currency
from centime.settings import Settings
from centime.wire import STORAGE_ERRORS, problem_answer
from ledger import repo as ledger_repo
from ledger.accounts import credit_lines, debit_lines
from ledger.ids import parse_uuid, uuid7
from ledger.schemas import EntryRecord, KeyHolder
from ledger.writer import (
    CommitFailed,
    Committed,
    KeyTaken,
    LedgerWriter,
    Outcome,
    QueueFull,
    write_with_reversal,
)
from wallet import repo
from wallet.cache import ApplyItem, Cache, CachedWallet, Settling, Undo
from wallet.changes import load_from_ledger
from wallet.errors import (
    BalanceTooLarge,
    HoldNotFound,
    IdempotencyConflict,
    IdempotencyKeyReversed,
    InsufficientFunds,
    LedgerRefused,
    RequestInProgress,
    WalletExists,
    WalletFrozen,
    WalletNotFound,
)
from wallet.owners import OwnerIds, WalletOwners, sees
from wallet.schemas import (
    BATCH_DEBITS_MAX,
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

log = logging.getLogger(__name__)

REFUSALS_TO_CHECK_IN_LEDGER = frozenset({"insufficient", "frozen", "too_large"})
"""Refusals that a retry of an already charged request could meet."""

SETTLE_ABANDONED_FIRST = 2
"""settle_committed.lua's answer for an entry its request abandoned first."""

_COMMIT_LATE = object()
"""_commit_outcome's answer when the commit outlived commit_timeout_ms."""

UNDO_RETRY_S_MAX = 600.0
"""How long a request keeps trying to undo, in Redis, a charge it reversed in the ledger."""

SETTLE_WAIT_S = 5.0
"""After a lost race to abandon, how long to wait for the winner's answer."""

_payload_encoder = msgspec.json.Encoder(order="sorted")
_payload_decoder = msgspec.json.Decoder(EntryPayload)
_hash_encoder = msgspec.json.Encoder(order="sorted")


class AbandonedFirst(msgspec.Struct, frozen=True):
    """Committed, but the request had already handed the charge to the
    sweeper (its client got 503): the sweeper reverses it."""

    entry_id: uuid.UUID


class _Group(msgspec.Struct, frozen=True):
    """A batch round's charges, submitted together, and their commit deadline."""

    items: list[tuple[int, Charge]]
    futures: list[asyncio.Future[object]]
    deadline: float


class Charge(msgspec.Struct, frozen=True, gc=False):
    """What the service needs to settle a charge made in Redis."""

    entry: EntryRecord
    outbox_id: str
    epoch: str


def request_hash(kind: str, amount_micros: int, description: str | None, metadata: dict[str, str]) -> str:
    body = _hash_encoder.encode([kind, amount_micros, description, metadata])
    return hashlib.sha256(body).hexdigest()[:32]


def _parse_id(raw: str, not_found: type[NotFound], noun: str) -> uuid.UUID:
    """A path id that is not a UUID names nothing: 404, like any unknown id."""
    parsed = parse_uuid(raw)
    if parsed is None:
        raise not_found(f"no {noun} {raw!r}")
    return parsed


def parse_wallet_id(raw: str) -> uuid.UUID:
    return _parse_id(raw, WalletNotFound, "wallet")


RESERVED_KEY_PREFIX = "hold:"
"""A capture's debit is keyed 'hold:<hold id>' (wallet/holds.py): no client key may take it."""


def refuse_reserved_key(idempotency_key: str, field: str) -> None:
    if idempotency_key.startswith(RESERVED_KEY_PREFIX):
        raise InvalidRequest(
            f"{field}: keys beginning with {RESERVED_KEY_PREFIX!r} are reserved for hold captures",
            fields=[field],
        )


def parse_hold_id(raw: str) -> uuid.UUID:
    return _parse_id(raw, HoldNotFound, "hold")


def to_entry(record: EntryRecord) -> Entry:
    return Entry(
        id=record.id,
        wallet_id=record.wallet_id,
        kind=record.kind,
        amount_micros=record.amount_micros,
        currency=record.currency,
        balance_micros=record.balance_micros,
        idempotency_key=record.idempotency_key,
        description=record.description,
        metadata=record.metadata,
        reverses_entry_id=record.reverses_entry_id,
        stripe_object_id=record.stripe_object_id,
        created_at=record.created_at,
    )


def record_from_payload(payload: EntryPayload, *, balance_micros: int, currency: str) -> EntryRecord:
    lines = (debit_lines if payload.kind == "debit" else credit_lines)(
        payload.wallet_id, currency, payload.amount_micros
    )
    return EntryRecord(
        id=payload.id,
        kind=payload.kind,
        currency=currency,
        wallet_id=payload.wallet_id,
        amount_micros=payload.amount_micros,
        balance_micros=balance_micros,
        idempotency_key=payload.idempotency_key,
        request_hash=payload.request_hash,
        description=payload.description,
        metadata=payload.metadata,
        created_at=payload.created_at,
        lines=lines,
    )


def decode_payload(raw: bytes | str) -> EntryPayload:
    return _payload_decoder.decode(raw)


def encode_payload(payload: EntryPayload) -> bytes:
    return _payload_encoder.encode(payload)


def payload_of(record: EntryRecord) -> EntryPayload:
    """What Redis keeps of a ledger entry (the inverse of record_from_payload)."""
    invariant(record.kind in ("debit", "credit"), f"entry {record.id} is a {record.kind}, not a keyed entry")
    return EntryPayload(
        id=record.id,
        wallet_id=record.wallet_id,
        kind=record.kind,  # type: ignore[arg-type]
        amount_micros=record.amount_micros,
        idempotency_key=record.idempotency_key or "",
        request_hash=record.request_hash or "",
        description=record.description,
        metadata=record.metadata,
        created_at=record.created_at,
    )


def undo(charge: Charge) -> Undo:
    """How to undo this charge in Redis."""
    entry = charge.entry
    if entry.kind == "debit":
        return Undo("b", entry.amount_micros, charge.epoch)
    return Undo("p", -entry.amount_micros, charge.epoch)


def settling(charge: Charge) -> Settling:
    entry = charge.entry
    credit_micros = entry.amount_micros if entry.kind == "credit" else 0
    return Settling(charge.outbox_id, entry.id, entry.wallet_id, credit_micros, charge.epoch)


class Wallets:
    """The wallet service. Holds its connections, given explicitly."""

    def __init__(self, *, pool: asyncpg.Pool, cache: Cache, writer: LedgerWriter, settings: Settings) -> None:
        self.pool = pool
        self.cache = cache
        self.writer = writer
        self.settings = settings
        self._commit_timeout_s = settings.commit_timeout_ms / 1000
        self._database_timeout_s = settings.database_timeout_ms / 1000
        self._charges: dict[uuid.UUID, Charge] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.owners = WalletOwners(pool, timeout_s=self._database_timeout_s)

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
            return await self.write_through(charge_or_replay, payload)
        finally:
            metrics.debit_latency_seconds.observe(time.perf_counter() - started)

    async def post_batch(
        self, batch: CreateBatch, *, idempotency_key: str, owner_ids: OwnerIds
    ) -> list[BatchItem]:
        """Debit many wallets, each item on its own: one apply.lua call per
        partition (all sent in one event-loop tick), one group commit for
        every charge, and an answer per item in request order. A retry with
        the same key and body replays each item through its own key."""
        batch_hash = hashlib.sha256(_hash_encoder.encode(batch)).hexdigest()[:32]
        if not await self.cache.claim_batch_key(
            idempotency_key, batch_hash, ttl_s=self.settings.idempotency_ttl_s
        ):
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used with another batch")
        debits = batch.debits
        invariant(1 <= len(debits) <= BATCH_DEBITS_MAX, f"{len(debits)} debits outside 1..{BATCH_DEBITS_MAX}")
        created_at = datetime.now(UTC)
        # Ids in request order: a wallet's entries list newest first by id,
        # and its items are charged in request order (uuid7 alone is random
        # within a millisecond).
        entry_ids = sorted(uuid7() for _ in debits)
        payloads = [
            EntryPayload(
                id=entry_id,
                wallet_id=item.wallet_id,
                kind="debit",
                amount_micros=item.amount_micros,
                idempotency_key=item.idempotency_key,
                request_hash=request_hash("debit", item.amount_micros, item.description, item.metadata),
                description=item.description,
                metadata=item.metadata,
                created_at=created_at,
            )
            for item, entry_id in zip(debits, entry_ids, strict=True)
        ]
        answers: list[BatchItem | None] = [None] * len(payloads)
        charges: dict[int, Charge] = {}
        waiting = await self._admit(payloads, answers, owner_ids)
        groups: list[_Group] = []
        missing: list[int] = []
        for attempt in range(2):  # the second only for wallets missing from Redis, once loaded
            charges, refused, missing = await self._charge_batch(payloads, waiting, answers)
            # The commit starts now: no charge waits on the I/O below.
            if charges:
                group = await self._submit_batch(charges, answers)
                if group is not None:
                    groups.append(group)
            await self._look_up_refused(payloads, refused, answers)
            if not missing or attempt == 1:
                break
            wallet_ids = list({payloads[i].wallet_id: None for i in missing})
            loaded = await asyncio.gather(*map(self.load_missing, wallet_ids), return_exceptions=True)
            failed = dict(zip(wallet_ids, loaded, strict=True))
            for i in missing:
                exc = failed[payloads[i].wallet_id]
                if isinstance(exc, Exception):
                    answers[i] = _problem_item(exc)
                elif isinstance(exc, BaseException):
                    raise exc
            waiting = [i for i in missing if answers[i] is None]
            missing = []
            if not waiting:
                break
        for i in missing:
            answers[i] = _problem_item(Unavailable(f"wallet {payloads[i].wallet_id} could not be loaded"))
        for group in groups:
            await self._settle_group(group, payloads, answers)
        _answer_repeated_keys(payloads, answers)
        invariant(all(a is not None for a in answers), "every batch item has an answer")
        return [a for a in answers if a is not None]

    async def _admit(
        self, payloads: list[EntryPayload], answers: list[BatchItem | None], owner_ids: OwnerIds
    ) -> list[int]:
        """The items to charge. The others are answered here: a reserved
        key, and a wallet outside `owner_ids` (as a missing wallet's item)."""
        admitted: list[int] = []
        for i, payload in enumerate(payloads):
            try:
                refuse_reserved_key(payload.idempotency_key, f"debits[{i}].idempotency_key")
                admitted.append(i)
            except InvalidRequest as exc:
                answers[i] = _problem_item(exc)
        if owner_ids is None:
            return admitted
        reachable = await self.owners.reachable((payloads[i].wallet_id for i in admitted), owner_ids)
        for i in admitted:
            if payloads[i].wallet_id not in reachable:
                answers[i] = _problem_item(WalletNotFound(f"no wallet {payloads[i].wallet_id}"))
        return [i for i in admitted if answers[i] is None]

    async def _charge_batch(
        self, payloads: list[EntryPayload], indexes: list[int], answers: list[BatchItem | None]
    ) -> tuple[dict[int, Charge], list[tuple[int, list[Any]]], list[int]]:
        """Charge the items `indexes` in Redis, one call per partition, and
        answer the replays and the refusals that need no I/O. Returns the
        charges, the refusals to look up in the ledger, and the items whose
        wallet is missing from Redis."""
        by_partition: dict[int, list[int]] = defaultdict(list)
        for i in indexes:
            by_partition[self.cache.partition(payloads[i].wallet_id)].append(i)

        async def charge(partition: int, items: list[int]) -> list[Any] | BaseException:
            apply_items = [
                ApplyItem(
                    p.wallet_id,
                    p.kind,
                    p.amount_micros,
                    p.request_hash,
                    p.id,
                    encode_payload(p),
                    p.idempotency_key,
                )
                for p in (payloads[i] for i in items)
            ]
            try:
                return await self.cache.apply_items(
                    partition, apply_items, ttl_s=self.settings.idempotency_ttl_s
                )
            except redis.exceptions.RedisError as exc:
                return exc

        replies = await asyncio.gather(*(charge(p, items) for p, items in by_partition.items()))
        charges: dict[int, Charge] = {}
        refused: list[tuple[int, list[Any]]] = []
        missing: list[int] = []
        for items, reply in zip(by_partition.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                for i in items:  # the script may have run: hand each to the sweeper
                    p = payloads[i]
                    self._spawn(self._abandon_later(p.wallet_id, p.idempotency_key, p.id, None))
                    answers[i] = _problem_item(
                        Unavailable("the balance store did not answer; nothing was charged")
                    )
                continue
            for i, result in zip(items, reply, strict=True):
                if result[0].decode() in REFUSALS_TO_CHECK_IN_LEDGER:
                    refused.append((i, result))
                    continue
                try:
                    charged = await self._charged(result, payloads[i])  # no I/O for these
                except Exception as exc:
                    answers[i] = _problem_item(exc)
                    continue
                if charged is None:
                    missing.append(i)
                elif isinstance(charged, Entry):
                    answers[i] = BatchItem(status=201, entry=charged, replayed=True)
                else:
                    charges[i] = charged
        return charges, refused, missing

    async def _look_up_refused(
        self,
        payloads: list[EntryPayload],
        refused: list[tuple[int, list[Any]]],
        answers: list[BatchItem | None],
    ) -> None:
        """Answer refused items: as the ledger's holder of their key, when it
        has one (Redis lost the record of a charged request), else with the
        refusal. One query for the whole batch."""
        if not refused:
            return
        try:
            async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
                holders = await ledger_repo.entries_by_wallet_keys(
                    conn,
                    [payloads[i].wallet_id for i, _ in refused],
                    [payloads[i].idempotency_key for i, _ in refused],
                )
        except STORAGE_ERRORS as exc:
            for i, _ in refused:
                answers[i] = _problem_item(exc)  # refused, nothing charged: a retry decides again
            return
        for i, result in refused:
            payload = payloads[i]
            holder = holders.get((payload.wallet_id, payload.idempotency_key))
            try:
                if holder is not None:
                    answers[i] = BatchItem(
                        status=201, entry=await self._answer_as_holder(holder, payload), replayed=True
                    )
                else:
                    self._refusal(result[0].decode(), result, payload)
            except Exception as exc:
                answers[i] = _problem_item(exc)

    async def _submit_batch(
        self, charges: dict[int, Charge], answers: list[BatchItem | None]
    ) -> _Group | None:
        """Start the group commit of a round's charges. If the ledger's queue
        is full, undo them all (at once) and answer each 503."""
        items = list(charges.items())
        for _, charge in items:
            self._charges[charge.entry.id] = charge
        try:
            futures = self.writer.submit_many([charge.entry for _, charge in items])
        except QueueFull as exc:
            for i, charge in items:
                self._charges.pop(charge.entry.id, None)
                answers[i] = _problem_item(
                    Unavailable(f"the ledger is overloaded; nothing was charged ({exc})")
                )
            await asyncio.gather(*(self._compensate(charge) for _, charge in items))
            return None
        deadline = asyncio.get_running_loop().time() + self._commit_timeout_s
        return _Group(items, futures, deadline)

    async def _settle_group(
        self, group: _Group, payloads: list[EntryPayload], answers: list[BatchItem | None]
    ) -> None:
        """The group commits in one statement: one wait for all of it, until
        commit_timeout_ms after it was submitted. A committed item is
        answered here, without a task; any other settles as a single debit
        would, with no more wait."""
        await _all_done(group.futures, max(group.deadline - asyncio.get_running_loop().time(), 0))
        others: list[tuple[int, Charge, asyncio.Future[object]]] = []
        for (i, charge), future in zip(group.items, group.futures, strict=True):
            if future.done() and not future.cancelled() and future.exception() is None:
                outcome = future.result()
                if isinstance(outcome, Committed):
                    self._charges.pop(charge.entry.id, None)
                    answers[i] = BatchItem(status=201, entry=to_entry(charge.entry))
                    continue
            others.append((i, charge, future))

        async def settle(i: int, charge: Charge, future: asyncio.Future[object]) -> None:
            try:
                entry, replayed = await self._settle_commit(charge, payloads[i], future, wait_s=0)
                answers[i] = BatchItem(status=201, entry=entry, replayed=replayed)
            except Exception as exc:
                answers[i] = _problem_item(exc)

        await asyncio.gather(*(settle(i, c, f) for i, c, f in others))

    async def _charge(self, payload: EntryPayload) -> Charge | Entry:
        encoded = encode_payload(payload)
        for _attempt in range(2):  # the second only after loading a wallet missing from Redis
            try:
                result = await self.cache.apply(
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
                self._spawn(self._abandon_later(payload.wallet_id, payload.idempotency_key, payload.id, None))
                raise Unavailable("the balance store did not answer; nothing was charged") from exc
            charged = await self._charged(result, payload)
            if charged is not None:
                return charged
            await self.load_missing(payload.wallet_id)
        raise Unavailable(f"wallet {payload.wallet_id} could not be loaded into the balance store")

    async def _charged(self, result: list[Any], payload: EntryPayload) -> Charge | Entry | None:
        """What apply.lua's reply for one item means: a charge to write
        through, an earlier result to replay, None when the wallet must be
        loaded first; a refusal raises."""
        status = result[0].decode()
        if status == "ok":
            balance = int(result[1])
            currency = result[3].decode()
            return Charge(
                record_from_payload(payload, balance_micros=balance, currency=currency),
                result[2].decode(),
                result[4].decode(),
            )
        if status == "missing":
            return None
        if status in REFUSALS_TO_CHECK_IN_LEDGER:
            # Redis may have lost this key's record: the ledger keeps keys
            # forever, and a retry of a charged request must replay it.
            async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
                holder = await ledger_repo.entry_by_wallet_key(
                    conn, payload.wallet_id, payload.idempotency_key
                )
            if holder is not None:
                return await self._answer_as_holder(holder, payload)
        return self._refusal(status, result, payload)

    def _refusal(self, status: str, result: list, payload: EntryPayload) -> Entry:
        if status == "replay":
            original = decode_payload(result[2])
            currency = result[3].decode()
            return to_entry(record_from_payload(original, balance_micros=int(result[1]), currency=currency))
        if status == "insufficient":
            balance = int(result[1])
            raise InsufficientFunds(
                f"balance {balance} micros cannot cover {payload.amount_micros} micros",
                balance_micros=balance,
            )
        if status == "frozen":
            raise WalletFrozen(f"wallet {payload.wallet_id} is frozen", balance_micros=int(result[1]))
        if status == "too_large":
            raise BalanceTooLarge(
                f"amount_micros: the balance would exceed {AMOUNT_MICROS_MAX} micros",
                fields=["amount_micros"],
            )
        if status == "conflict":
            raise IdempotencyConflict(
                f"idempotency key {payload.idempotency_key!r} was used with another request"
            )
        if status == "in_progress":
            raise RequestInProgress(
                f"a request with idempotency key {payload.idempotency_key!r} is still in progress; retry later"
            )
        if status == "reversed":
            raise IdempotencyKeyReversed(
                f"the request with idempotency key {payload.idempotency_key!r} failed and was reversed; "
                "nothing is charged; retry with a new key"
            )
        raise Unavailable(f"unexpected answer {status!r} from the balance store")

    async def load_missing(self, wallet_id: uuid.UUID) -> None:
        async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
            row = await repo.wallet_by_id(conn, wallet_id)
            if row is None:
                raise WalletNotFound(f"no wallet {wallet_id}")
            await self._cached_or_load(conn, row)

    async def write_through(self, charge: Charge, payload: EntryPayload) -> tuple[Entry, bool]:
        entry = charge.entry
        try:
            self._charges[entry.id] = charge
            future = self.writer.submit(entry)
        except QueueFull as exc:
            self._charges.pop(entry.id, None)
            await self._compensate(charge)
            raise Unavailable("the ledger is overloaded; nothing was charged") from exc
        return await self._settle_commit(charge, payload, future)

    async def _settle_commit(
        self,
        charge: Charge,
        payload: EntryPayload,
        future: asyncio.Future[object],
        *,
        wait_s: float | None = None,
    ) -> tuple[Entry, bool]:
        """Wait for the charge's commit (commit_timeout_ms, or `wait_s` when
        the caller has waited already), then answer, or settle it and raise."""
        entry = charge.entry
        try:
            outcome = await self._commit_outcome(future, self._commit_timeout_s if wait_s is None else wait_s)
            if outcome is _COMMIT_LATE:
                outcome = await self._abandon_or_wait(charge, future)
        except CommitFailed as exc:
            if exc.definite:
                await self._compensate(charge)
            else:
                await self._abandon(charge)
            if exc.refused:  # a bug, not an outage: 500, and a retry will not cure it
                raise LedgerRefused(
                    "the ledger refused the entry; it was logged, nothing was charged"
                ) from exc
            raise Unavailable("the ledger did not commit the entry; nothing was charged") from exc
        finally:
            self._charges.pop(entry.id, None)
        if isinstance(outcome, Committed):
            return to_entry(entry), False
        if isinstance(outcome, KeyTaken):
            return await self._key_taken(charge, outcome, payload)
        log.error("entry %s: abandoned while its request still waited; the sweeper reverses it", entry.id)
        raise Unavailable("the ledger did not commit the entry in time; nothing was charged")

    async def _commit_outcome(self, future: asyncio.Future[object], wait_s: float) -> object:
        """The writer's outcome (CommitFailed raises), or _COMMIT_LATE after
        `wait_s`; the future itself is never cancelled here. (What
        asyncio.wait_for(asyncio.shield(...)) does, without its two extra
        futures and a task switch per debit.)"""
        if not future.done():
            await _all_done((future,), wait_s)
            if not future.done():
                return _COMMIT_LATE
        return future.result()

    async def _key_taken(
        self, charge: Charge, outcome: KeyTaken, payload: EntryPayload
    ) -> tuple[Entry, bool]:
        """Redis had lost this key (expired or flushed); the ledger kept it.
        Undo our duplicate charge and answer as the key's holder says."""
        await self._compensate(charge)
        return await self._answer_as_holder(outcome.holder, payload), True

    async def _answer_as_holder(self, holder: KeyHolder, payload: EntryPayload) -> Entry:
        """Answer a request whose key the ledger holds for an earlier entry."""
        if holder.reversed_by is not None:
            self._refusal("reversed", [], payload)
        if holder.entry.request_hash != payload.request_hash:
            self._refusal("conflict", [], payload)
        if await self.cache.is_abandoned(holder.entry.wallet_id, holder.entry.id):
            self._refusal("in_progress", [], payload)  # the sweeper is about to reverse it
        return to_entry(holder.entry)

    async def _abandon_or_wait(self, charge: Charge, future: asyncio.Future[object]) -> object:
        """The commit is late: answer 503 unless it has just won the race."""
        if await self._abandon(charge):
            future.cancel()  # not written yet? then the writer skips it
            raise Unavailable("the ledger did not commit the entry in time; nothing was charged")
        try:
            return await asyncio.wait_for(future, SETTLE_WAIT_S)
        except (TimeoutError, CommitFailed) as exc:
            log.error("entry %s: lost the race to abandon, and no outcome arrived: %r", charge.entry.id, exc)
            raise Unavailable("the ledger did not commit the entry in time") from exc

    async def _compensate(self, charge: Charge) -> None:
        entry = charge.entry
        try:
            await self.cache.compensate(
                wallet_id=entry.wallet_id,
                idempotency_key=payload_key(entry),
                outbox_id=charge.outbox_id,
                undo=undo(charge),
                entry_id=entry.id,
            )
        except redis.exceptions.RedisError as exc:
            log.warning("entry %s: undo failed (%r); handing it to the sweeper", entry.id, exc)
            self._spawn(
                self._abandon_later(charge.entry.wallet_id, payload_key(entry), entry.id, charge.outbox_id)
            )

    async def _abandon(self, charge: Charge) -> bool:
        """Hand the charge to the sweeper. True unless the commit settled it first."""
        entry = charge.entry
        try:
            return await self.cache.abandon(
                wallet_id=entry.wallet_id,
                idempotency_key=payload_key(entry),
                entry_id=entry.id,
                outbox_id=charge.outbox_id,
            )
        except redis.exceptions.RedisError as exc:
            # Redis cannot record that this request answers 503, so record it
            # in the ledger: the entry beside its reversal, in one transaction.
            # Then undo it in Redis, wherever the charge stands by then.
            log.warning("entry %s: abandon failed (%r); reversing it in the ledger", entry.id, exc)
            self._charges.pop(entry.id, None)  # the writer must not settle it as committed now
            if await self._reverse_in_ledger(charge):
                self._spawn(self._undo_reversed_later(charge))
            else:
                self._spawn(
                    self._abandon_later(entry.wallet_id, payload_key(entry), entry.id, charge.outbox_id)
                )
            return True

    async def _reverse_in_ledger(self, charge: Charge) -> bool:
        """Write the entry and its reversal, atomically. False if Postgres failed too."""
        entry = charge.entry
        try:
            async with self.pool.acquire(timeout=self._database_timeout_s) as conn:
                outcome = await write_with_reversal(conn, entry, timeout_s=self._database_timeout_s)
            return isinstance(outcome, Committed)
        except Exception as exc:  # Postgres and Redis both failing: see docs/architecture.md
            log.error(
                "entry %s: answered 503 but neither Redis nor Postgres could record it: %r", entry.id, exc
            )
            return False

    async def _undo_reversed_later(self, charge: Charge) -> None:
        """Undo in Redis a charge the ledger now holds reversed. Unlike an
        abandon, nobody else undoes a charge the writer settled in Redis
        meanwhile (the sweeper only meets charges still in the outbox), so
        this keeps trying for UNDO_RETRY_S_MAX, not for half the grace
        period. Running late is safe: undo_reversed.lua undoes once. (If Redis
        stays away longer, or the process dies, the undo is lost: logged, and
        `centime check` and the nightly reconciliation report the drift.)"""
        await self._keep_trying(
            lambda: self.cache.undo_reversed(
                idempotency_key=payload_key(charge.entry), settling=settling(charge), undo=undo(charge)
            ),
            f"entry {charge.entry.id}: reversed in the ledger; Redis stayed unreachable to undo it",
            retry_s=UNDO_RETRY_S_MAX,
        )

    def abandon_in_background(self, wallet_id: uuid.UUID, idempotency_key: str, entry_id: uuid.UUID) -> None:
        """Hand a charge whose script call failed (it may have run) to the sweeper, bounded."""
        self._spawn(self._abandon_later(wallet_id, idempotency_key, entry_id, None))

    async def _abandon_later(
        self, wallet_id: uuid.UUID, idempotency_key: str, entry_id: uuid.UUID, outbox_id: str | None
    ) -> None:
        """Hand a charge to the sweeper. Abandoning is always safe: the sweeper
        writes the entry with its reversal. (A charge still in the outbox after
        the grace period is an orphan, which the sweeper reverses unless the
        ledger holds it.)"""
        await self._keep_trying(
            lambda: self.cache.abandon(
                wallet_id=wallet_id, idempotency_key=idempotency_key, entry_id=entry_id, outbox_id=outbox_id
            ),
            f"entry {entry_id}: Redis stayed unreachable; the sweeper settles it as an orphan",
            retry_s=self.settings.sweeper_grace_ms / 2000,
        )

    async def _keep_trying(
        self, attempt: Callable[[], Awaitable[object]], give_up_message: str, *, retry_s: float
    ) -> None:
        """Retry a Redis call with backoff (at most 1 s apart) for retry_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_s
        delay_s = 0.05
        while loop.time() < deadline:
            try:
                await attempt()
                return
            except redis.exceptions.RedisError:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)
        log.error(give_up_message)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def after_commit(self, entries: Sequence[EntryRecord], outcomes: list[Outcome]) -> list[object]:
        """Group-commit hook: settle committed entries in Redis, one script call
        per partition, one round trip. An entry its request abandoned first is
        the sweeper's to reverse."""
        by_partition: dict[int, list[tuple[int, Settling]]] = defaultdict(list)
        for index, (entry, outcome) in enumerate(zip(entries, outcomes, strict=True)):
            charge = self._charges.get(entry.id)
            if isinstance(outcome, Committed) and charge is not None:
                by_partition[self.cache.partition(entry.wallet_id)].append((index, settling(charge)))
        results: list[object] = list(outcomes)
        if not by_partition:
            return results
        settled = await self.cache.settle_committed(
            {p: [item for _, item in items] for p, items in by_partition.items()}
        )
        for partition, items in by_partition.items():
            for (i, _), state in zip(items, settled[partition], strict=True):
                if state == SETTLE_ABANDONED_FIRST:
                    results[i] = AbandonedFirst(entries[i].id)
        return results


def payload_key(entry: EntryRecord) -> str:
    invariant(entry.idempotency_key is not None, f"entry {entry.id} has no idempotency key")
    return entry.idempotency_key or ""


def _answer_repeated_keys(payloads: list[EntryPayload], answers: list[BatchItem | None]) -> None:
    """A key twice on one wallet in one batch is one debit. apply.lua found
    the later item's key taken by the earlier one, still in flight
    (request_in_progress); the batch answers only once that one is decided,
    so the later item (same body) gets its answer, replayed."""
    first: dict[tuple[uuid.UUID, str], int] = {}
    for i, payload in enumerate(payloads):
        j = first.setdefault((payload.wallet_id, payload.idempotency_key), i)
        answer, earlier = answers[i], answers[j]
        if (
            j != i
            and answer is not None
            and earlier is not None
            and answer.problem is not None
            and answer.problem.get("code") == RequestInProgress.code
            and payloads[j].request_hash == payload.request_hash
        ):
            answers[i] = msgspec.structs.replace(earlier, replayed=earlier.status == 201)


async def _all_done(futures: Sequence[asyncio.Future[object]], wait_s: float) -> None:
    """Return when every future is done, or after `wait_s`; cancels none."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    def late() -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    timer = loop.call_later(wait_s, late)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in pending:
            future.remove_done_callback(one_done)


def _problem_item(exc: Exception) -> BatchItem:
    """A batch item's answer to an error: the problem a single debit would get."""
    answer = problem_answer(exc)
    return BatchItem(status=answer.status, problem=answer.body)


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
