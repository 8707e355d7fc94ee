"""Batch debits: many wallets debited in one request, each item on its own.

One apply.lua call per partition (all sent in one event-loop tick), one
group commit for every charge, and an answer per item in request order. A
retry with the same key and body replays each item through its own key."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import msgspec
import redis.exceptions

from centime.errors import InvalidRequest, Unavailable, invariant
from centime.settings import Settings
from centime.wire import STORAGE_ERRORS, problem_answer
from ledger import repo as ledger_repo
from ledger.ids import uuid7
from ledger.writer import Committed, QueueFull
from wallet.cache import ApplyItem, Cache
from wallet.charges import (
    PendingCharge,
    body_hash,
    charge_of,
    encode_payload,
    refusal_error,
    refuse_reserved_key,
    request_hash,
    to_entry,
)
from wallet.errors import IdempotencyConflict, RequestInProgress, WalletNotFound
from wallet.owners import OwnerIds, WalletOwners
from wallet.replies import ApplyReply, Missing, Refused
from wallet.schemas import BATCH_DEBITS_MAX, BatchItem, CreateBatch, Entry, EntryPayload
from wallet.write_through import CommitFuture, WriteThrough, all_done

REFUSALS_TO_CHECK_IN_LEDGER = frozenset({"insufficient", "frozen", "too_large"})
"""Refusals that a retry of an already charged request could meet: Redis may
have lost this key's record, and the ledger keeps keys forever."""

Answers = list[BatchItem | None]
"""A batch's answers so far, in request order (None: not answered yet)."""


class _Group(msgspec.Struct, frozen=True):
    """A batch round's charges, submitted together, and their commit deadline."""

    items: list[tuple[int, PendingCharge]]
    futures: list[CommitFuture]
    deadline: float


class _Round(msgspec.Struct):
    """What one round of charging left: the charges to commit, the refusals
    to look up in the ledger, the items whose wallet is missing from Redis."""

    charges: dict[int, PendingCharge]
    refused: list[tuple[int, Refused]]
    missing: list[int]


class Batches:
    """post_batch of the wallet service; `load_missing` loads a wallet from the ledger into Redis."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        cache: Cache,
        settings: Settings,
        owners: WalletOwners,
        write_through: WriteThrough,
        load_missing: Callable[[uuid.UUID], Awaitable[None]],
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.settings = settings
        self.owners = owners
        self.write_through = write_through
        self.load_missing = load_missing
        self._database_timeout_s = settings.database_timeout_ms / 1000

    async def post_batch(
        self, batch: CreateBatch, *, idempotency_key: str, owner_ids: OwnerIds
    ) -> list[BatchItem]:
        if not await self.cache.claim_batch_key(
            idempotency_key, body_hash(batch), ttl_s=self.settings.idempotency_ttl_s
        ):
            raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used with another batch")
        payloads = _payloads(batch)
        answers: Answers = [None] * len(payloads)
        waiting = await self._admit(payloads, answers, owner_ids)
        groups: list[_Group] = []
        missing: list[int] = []
        for attempt in range(2):  # the second only for wallets missing from Redis, once loaded
            charged = await self._charge_batch(payloads, waiting, answers)
            missing = charged.missing
            # The commit starts now: no charge waits on the I/O below.
            if charged.charges:
                group = await self._submit_batch(charged.charges, answers)
                if group is not None:
                    groups.append(group)
            await self._look_up_refused(payloads, charged.refused, answers)
            if not missing or attempt == 1:
                break
            waiting = await self._load_missing(payloads, missing, answers)
            missing = []
            if not waiting:
                break
        for i in missing:
            answers[i] = _problem_item(Unavailable(f"wallet {payloads[i].wallet_id} could not be loaded"))
        for group in groups:
            await self._answer_group(group, payloads, answers)
        _answer_repeated_keys(payloads, answers)
        invariant(all(a is not None for a in answers), "every batch item has an answer")
        return [a for a in answers if a is not None]

    async def _admit(self, payloads: list[EntryPayload], answers: Answers, owner_ids: OwnerIds) -> list[int]:
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

    async def _load_missing(
        self, payloads: list[EntryPayload], missing: list[int], answers: Answers
    ) -> list[int]:
        """Load the wallets missing from Redis; the items to charge again."""
        wallet_ids = list({payloads[i].wallet_id: None for i in missing})
        loaded = await asyncio.gather(*map(self.load_missing, wallet_ids), return_exceptions=True)
        failed = dict(zip(wallet_ids, loaded, strict=True))
        for i in missing:
            exc = failed[payloads[i].wallet_id]
            if isinstance(exc, Exception):
                answers[i] = _problem_item(exc)
            elif isinstance(exc, BaseException):
                raise exc
        return [i for i in missing if answers[i] is None]

    async def _charge_batch(
        self, payloads: list[EntryPayload], indexes: list[int], answers: Answers
    ) -> _Round:
        """Charge the items `indexes` in Redis, one call per partition, and
        answer the replays and the refusals that need no I/O."""
        by_partition: dict[int, list[int]] = defaultdict(list)
        for i in indexes:
            by_partition[self.cache.partition(payloads[i].wallet_id)].append(i)
        replies = await asyncio.gather(
            *(
                self._apply(partition, [payloads[i] for i in items])
                for partition, items in by_partition.items()
            )
        )
        charged = _Round({}, [], [])
        for items, reply in zip(by_partition.values(), replies, strict=True):
            if isinstance(reply, BaseException):
                for i in items:  # the script may have run: hand each to the sweeper
                    p = payloads[i]
                    self.write_through.abandon_in_background(p.wallet_id, p.idempotency_key, p.id)
                    answers[i] = _problem_item(
                        Unavailable("the balance store did not answer; nothing was charged")
                    )
                continue
            for i, result in zip(items, reply, strict=True):
                outcome = charge_of(result, payloads[i])
                if isinstance(outcome, PendingCharge):
                    charged.charges[i] = outcome
                elif isinstance(outcome, Entry):
                    answers[i] = BatchItem(status=201, entry=outcome, replayed=True)
                elif isinstance(outcome, Missing):
                    charged.missing.append(i)
                elif outcome.reason in REFUSALS_TO_CHECK_IN_LEDGER:
                    charged.refused.append((i, outcome))
                else:
                    answers[i] = _problem_item(refusal_error(outcome, payloads[i]))
        return charged

    async def _apply(self, partition: int, payloads: list[EntryPayload]) -> list[ApplyReply] | BaseException:
        items = [
            ApplyItem(
                p.wallet_id,
                p.kind,
                p.amount_micros,
                p.request_hash,
                p.id,
                encode_payload(p),
                p.idempotency_key,
            )
            for p in payloads
        ]
        try:
            return await self.cache.apply_items(partition, items, ttl_s=self.settings.idempotency_ttl_s)
        except redis.exceptions.RedisError as exc:
            return exc

    async def _look_up_refused(
        self, payloads: list[EntryPayload], refused: list[tuple[int, Refused]], answers: Answers
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
        for i, refusal in refused:
            payload = payloads[i]
            holder = holders.get((payload.wallet_id, payload.idempotency_key))
            try:
                if holder is None:
                    raise refusal_error(refusal, payload)
                entry = await self.write_through.answer_as_holder(holder, payload)
                answers[i] = BatchItem(status=201, entry=entry, replayed=True)
            except Exception as exc:
                answers[i] = _problem_item(exc)

    async def _submit_batch(self, charges: dict[int, PendingCharge], answers: Answers) -> _Group | None:
        """Start the group commit of a round's charges. If the ledger's queue
        is full, undo them all (at once) and answer each 503."""
        items = list(charges.items())
        in_flight = self.write_through.charges
        for _, charge in items:
            in_flight[charge.entry.id] = charge
        try:
            futures = self.write_through.writer.submit_many([charge.entry for _, charge in items])
        except QueueFull as exc:
            for i, charge in items:
                in_flight.pop(charge.entry.id, None)
                answers[i] = _problem_item(
                    Unavailable(f"the ledger is overloaded; nothing was charged ({exc})")
                )
            await asyncio.gather(*(self.write_through.compensate(charge) for _, charge in items))
            return None
        deadline = asyncio.get_running_loop().time() + self.write_through.commit_timeout_s
        return _Group(items, futures, deadline)

    async def _answer_group(self, group: _Group, payloads: list[EntryPayload], answers: Answers) -> None:
        """The group commits in one statement: one wait for all of it, until
        commit_timeout_ms after it was submitted. A committed item is
        answered here, without a task; any other is answered as a single
        debit would be, with no more wait."""
        await all_done(group.futures, max(group.deadline - asyncio.get_running_loop().time(), 0))
        others: list[tuple[int, PendingCharge, CommitFuture]] = []
        for (i, charge), future in zip(group.items, group.futures, strict=True):
            committed = (
                future.done()
                and not future.cancelled()
                and future.exception() is None
                and isinstance(future.result(), Committed)
            )
            if committed:
                self.write_through.charges.pop(charge.entry.id, None)
                answers[i] = BatchItem(status=201, entry=to_entry(charge.entry))
                continue
            others.append((i, charge, future))

        async def answer(i: int, charge: PendingCharge, future: CommitFuture) -> None:
            try:
                entry, replayed = await self.write_through.answer_commit(
                    charge, payloads[i], future, wait_s=0
                )
                answers[i] = BatchItem(status=201, entry=entry, replayed=replayed)
            except Exception as exc:
                answers[i] = _problem_item(exc)

        await asyncio.gather(*(answer(i, c, f) for i, c, f in others))


def _payloads(batch: CreateBatch) -> list[EntryPayload]:
    """The batch's debits as entries, with ids in request order: a wallet's
    entries list newest first by id, and its items are charged in request
    order (uuid7 alone is random within a millisecond)."""
    debits = batch.debits
    invariant(1 <= len(debits) <= BATCH_DEBITS_MAX, f"{len(debits)} debits outside 1..{BATCH_DEBITS_MAX}")
    created_at = datetime.now(UTC)
    entry_ids = sorted(uuid7() for _ in debits)
    return [
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


def _answer_repeated_keys(payloads: list[EntryPayload], answers: Answers) -> None:
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


def _problem_item(exc: Exception) -> BatchItem:
    """A batch item's answer to an error: the problem a single debit would get."""
    answer = problem_answer(exc)
    return BatchItem(status=answer.status, problem=answer.body)
