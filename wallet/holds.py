"""Holds: reserve, then capture the actual cost or release the rest.

A hold lives in Redis beside its wallet's balance (same partition, one Lua
script per step, docs/architecture.md): hold.lua reserves, capture.lua turns
the reservation into an ordinary debit of the actual cost (written through
like any debit), end_hold.lua releases or expires it. Every step appends an
event to its partition's hold event stream; the request records it in
Postgres (`hold_events`, append-only) and the sweeper records whatever a
request did not, so an audit can replay every hold."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
import redis.exceptions

from centime.errors import Unavailable, invariant
from ledger import repo as ledger_repo
from ledger.ids import uuid7
from wallet import repo
from wallet.cache import Cache, HoldState, new_hold_id
from wallet.charges import (
    RESERVED_KEY_PREFIX,
    PendingCharge,
    encode_payload,
    record_from_payload,
    replayed_entry,
    request_hash,
    to_entry,
)
from wallet.errors import (
    CaptureReversed,
    HoldEnded,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    RequestInProgress,
    TooManyHolds,
    WalletFrozen,
)
from wallet.owners import OwnerIds
from wallet.replies import (
    AlreadyEnded,
    Captured,
    CaptureReplayed,
    EndedNow,
    Held,
    HoldReplayed,
    Missing,
    NoSuchHold,
    Replayed,
)
from wallet.schemas import Capture, Entry, EntryPayload, Hold, HoldPayload
from wallet.service import Wallets

log = logging.getLogger(__name__)

CAPTURE_KEY_PREFIX = RESERVED_KEY_PREFIX
"""A capture's debit is keyed 'hold:<hold id>' in its wallet: one per hold, in the ledger too."""
_PAYLOAD_HEAD = b'{"amount_micros":1'
"""A capture's payload is encoded with amount 1 and sent without this head:
capture.lua writes the amount it decides in its place."""
HOLD_EVENTS_BATCH_MAX = 500
"""Hold events read and recorded per partition per call."""

_hold_payload_encoder = msgspec.json.Encoder(order="sorted")
_hold_payload_decoder = msgspec.json.Decoder(HoldPayload)
_metadata_encoder = msgspec.json.Encoder(order="sorted")


def capture_key(hold_id: uuid.UUID) -> str:
    return f"{CAPTURE_KEY_PREFIX}{hold_id}"


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def hold_from_state(hold_id: uuid.UUID, state: HoldState) -> Hold:
    payload = _hold_payload_decoder.decode(state.payload)
    return Hold(
        id=hold_id,
        wallet_id=state.wallet_id,
        amount_micros=state.amount_micros,
        currency=state.currency,
        status=state.status,  # type: ignore[arg-type]
        expires_at=_datetime(state.expires_at_ms),
        idempotency_key=payload.idempotency_key,
        description=payload.description,
        metadata=payload.metadata,
        created_at=payload.created_at,
        ended_at=None if state.ended_at_ms is None else _datetime(state.ended_at_ms),
        captured_micros=state.captured_micros,
        entry_id=state.entry_id,
    )


def capture_answer(hold: Hold, entry: Entry | None, requested_micros: int, captured_micros: int) -> Capture:
    """A capture's answer; the shortfall is what the wallet's limit did not allow."""
    return Capture(
        hold=hold,
        entry=entry,
        requested_micros=requested_micros,
        captured_micros=captured_micros,
        shortfall_micros=requested_micros - captured_micros,
    )


def hold_from_events(rows: list[repo.HoldEventRow]) -> Hold:
    """A hold rebuilt from what Postgres recorded (after Redis let it go)."""
    first, last = rows[0], rows[-1]
    ended = last.kind != "held"
    status, ended_at = last.kind, last.occurred_at if ended else None
    if not ended and first.expires_at <= datetime.now(UTC):
        # Redis lost it (a flush) before it ended: whatever it held is free.
        status, ended_at = "expired", first.expires_at
    return Hold(
        id=first.hold_id,
        wallet_id=first.wallet_id,
        amount_micros=first.amount_micros,
        currency=first.currency,
        status=status,  # type: ignore[arg-type]
        expires_at=first.expires_at,
        idempotency_key=first.idempotency_key,
        description=first.description,
        metadata=msgspec.json.decode(first.metadata),
        created_at=rows[0].occurred_at,
        ended_at=ended_at,
        captured_micros=last.captured_micros,
        entry_id=last.entry_id,
    )


def event_row(fields: dict[bytes, bytes]) -> repo.HoldEventRow:
    """A hold event as hold.lua, capture.lua or end_hold.lua appended it."""
    payload = _hold_payload_decoder.decode(fields[b"d"])
    kind = fields[b"k"].decode()
    captured = kind == "captured"
    entry = fields.get(b"n", b"")
    return repo.HoldEventRow(
        hold_id=payload.id,
        kind=kind,
        wallet_id=payload.wallet_id,
        currency=fields[b"c"].decode(),
        amount_micros=payload.amount_micros,
        requested_micros=int(fields[b"r"]) if captured else None,
        captured_micros=int(fields[b"a"]) if captured else None,
        entry_id=uuid.UUID(entry.decode()) if entry else None,
        expires_at=_datetime(int(fields[b"x"])),
        idempotency_key=payload.idempotency_key,
        description=payload.description,
        metadata=_metadata_encoder.encode(payload.metadata).decode(),
        occurred_at=_datetime(int(fields[b"t"])),
    )


async def record_events(
    pool: asyncpg.Pool,
    cache: Cache,
    partition: int,
    events: list[tuple[str, dict[bytes, bytes]]],
    *,
    timeout_s: float,
) -> int:
    """Record hold events in Postgres (idempotent), then drop them from the
    stream. An unreadable event is logged and left for an operator."""
    rows: list[repo.HoldEventRow] = []
    done: list[str] = []
    for event_id, fields in events:
        try:
            rows.append(event_row(fields))
            done.append(event_id)
        except (KeyError, ValueError, msgspec.DecodeError) as exc:
            log.error("hold event %s of partition %d is unreadable: %r %r", event_id, partition, fields, exc)
    if rows:
        async with pool.acquire(timeout=timeout_s) as conn:
            await repo.insert_hold_events(conn, rows, timeout_s=timeout_s)
        await cache.forget_hold_events(partition, done)
    return len(rows)


async def drain_events(
    pool: asyncpg.Pool, cache: Cache, *, before_ms: int, budget: int, timeout_s: float
) -> int:
    """Record the events no request recorded (it died, or Postgres was down):
    those older than `before_ms`, at most `budget` in all."""
    recorded = 0
    for partition in await cache.partitions_with_hold_events():
        if recorded >= budget:
            break
        count = min(budget - recorded, HOLD_EVENTS_BATCH_MAX)
        events = await cache.hold_events(partition, before_ms=before_ms, count=count)
        if events:
            recorded += await record_events(pool, cache, partition, events, timeout_s=timeout_s)
    return recorded


async def expire_due(cache: Cache, *, now_ms: int, budget: int) -> int:
    """End the holds whose time has come, at most `budget`; each once (end_hold.lua)."""
    expired = 0
    for partition in await cache.partitions_with_holds_due(now_ms):
        if expired >= budget:
            break
        for hold_id, wallet_id in await cache.due_holds(partition, now_ms=now_ms, count=budget - expired):
            ended = await cache.end_hold(hold_id, wallet_id, "expired")
            if isinstance(ended, EndedNow):
                expired += 1
            elif isinstance(ended, NoSuchHold):
                # Its hash is gone (flushed): nothing holds the amount any more.
                await cache.client.zrem(cache.hold_expiry_key(partition), f"{hold_id}:{wallet_id}")
    return expired


class Holds:
    """The hold service. Captures are written through by the wallet service."""

    def __init__(self, *, wallets: Wallets) -> None:
        self.wallets = wallets
        self.cache = wallets.cache
        self.pool = wallets.pool
        self.settings = wallets.settings
        self._timeout_s = wallets.settings.database_timeout_ms / 1000

    async def create_hold(
        self,
        wallet_id: uuid.UUID,
        *,
        amount_micros: int,
        expires_in_s: int,
        idempotency_key: str,
        description: str | None,
        metadata: dict[str, str],
        owner_ids: OwnerIds,
    ) -> tuple[Hold, bool]:
        """Reserve `amount_micros`. Returns the hold and whether it is a replay."""
        await self.wallets.check_reach(wallet_id, owner_ids)
        payload = HoldPayload(
            id=new_hold_id(wallet_id),
            wallet_id=wallet_id,
            amount_micros=amount_micros,
            idempotency_key=idempotency_key,
            request_hash=request_hash(f"hold:{expires_in_s}", amount_micros, description, metadata),
            description=description,
            metadata=metadata,
            created_at=datetime.now(UTC),
        )
        for _attempt in range(2):  # the second only after loading a wallet missing from Redis
            reply = await self.cache.hold(
                hold_id=payload.id,
                wallet_id=wallet_id,
                amount_micros=amount_micros,
                request_hash=payload.request_hash,
                payload=_hold_payload_encoder.encode(payload),
                expires_in_s=expires_in_s,
                idempotency_key=idempotency_key,
                ttl_s=self.settings.idempotency_ttl_s,
                holds_max=self.settings.holds_per_wallet_max,
            )
            if isinstance(reply, Held):
                await self._record(wallet_id, reply.event_id)
                return await self._hold(payload.id), False
            if isinstance(reply, HoldReplayed):
                return await self._hold(reply.hold_id), True
            if isinstance(reply, Missing):
                await self.wallets.load_missing(wallet_id)
                continue
            if reply.reason == "conflict":
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} was used with another request"
                )
            if reply.reason == "frozen":
                raise WalletFrozen(f"wallet {wallet_id} is frozen", balance_micros=reply.balance_micros)
            if reply.reason == "too_many":
                bound = self.settings.holds_per_wallet_max
                raise TooManyHolds(
                    f"wallet {wallet_id} has {reply.count} active holds, the most it may have "
                    f"(CENTIME_HOLDS_PER_WALLET_MAX={bound}); capture or release one first",
                    holds_per_wallet_max=bound,
                )
            balance, held = reply.balance_micros, reply.count or 0  # insufficient
            raise InsufficientFunds(
                f"balance {balance} micros, of which {held} held, cannot cover a hold of {amount_micros} micros",
                balance_micros=balance,
                held_micros=held,
            )
        raise Unavailable(f"wallet {wallet_id} could not be loaded into the balance store")

    async def _check_reach(self, hold_id: uuid.UUID, wallet_id: uuid.UUID, owner_ids: OwnerIds) -> None:
        """A hold on a wallet outside the caller's owners is answered as a
        missing hold, with the same body: nothing tells that it exists."""
        if owner_ids is not None and not await self.wallets.owners.in_reach(wallet_id, owner_ids):
            raise HoldNotFound(f"no hold {hold_id}")

    async def get_hold(self, hold_id: uuid.UUID, *, owner_ids: OwnerIds) -> Hold:
        hold = await self._hold(hold_id)
        await self._check_reach(hold_id, hold.wallet_id, owner_ids)
        return hold

    async def _hold(self, hold_id: uuid.UUID) -> Hold:
        state = await self.cache.hold_state(hold_id)
        if state is not None:
            return hold_from_state(hold_id, state)
        return hold_from_events(await self._recorded(hold_id))

    async def _recorded(self, hold_id: uuid.UUID) -> list[repo.HoldEventRow]:
        """What Postgres recorded of a hold Redis let go; HoldNotFound if nothing."""
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            rows = await repo.hold_events_of(conn, hold_id)
        if not rows:
            raise HoldNotFound(f"no hold {hold_id}")
        return rows

    async def release(self, hold_id: uuid.UUID, *, owner_ids: OwnerIds) -> Hold:
        """Release a held hold. Releasing one that was released or expired
        answers it as it is; one that was captured is a conflict."""
        state = await self.cache.hold_state(hold_id)
        if state is None:
            # Redis let it go (long ended, or lost): answer as Postgres recorded it.
            hold = await self.get_hold(hold_id, owner_ids=owner_ids)
            if hold.status in ("released", "expired"):
                return hold
            raise HoldEnded(
                f"hold {hold_id} has {hold.status}; there is nothing to release", hold_status=hold.status
            )
        await self._check_reach(hold_id, state.wallet_id, owner_ids)
        ended = await self.cache.end_hold(hold_id, state.wallet_id, "released")
        if isinstance(ended, EndedNow):
            await self._record(state.wallet_id, ended.event_id)
        elif isinstance(ended, AlreadyEnded) and ended.status == "captured":
            raise HoldEnded(
                f"hold {hold_id} was captured; there is nothing to release", hold_status="captured"
            )
        elif isinstance(ended, NoSuchHold):
            raise HoldNotFound(f"no hold {hold_id}")
        return await self._hold(hold_id)

    async def capture(self, hold_id: uuid.UUID, *, amount_micros: int, owner_ids: OwnerIds) -> Capture:
        """Debit the actual cost and release the hold, atomically; written
        through like a debit. Replaying the same capture answers the same."""
        state = await self.cache.hold_state(hold_id)
        if state is None:
            return await self._replayed_from_postgres(hold_id, amount_micros, owner_ids)
        wallet_id = state.wallet_id
        await self._check_reach(hold_id, wallet_id, owner_ids)
        held = _hold_payload_decoder.decode(state.payload)
        key = capture_key(hold_id)
        payload = EntryPayload(
            id=uuid7(),
            wallet_id=wallet_id,
            kind="debit",
            amount_micros=1,  # capture.lua writes the amount it captures
            idempotency_key=key,
            request_hash=request_hash("capture", amount_micros, None, {}),
            description=held.description,
            metadata=held.metadata,
            created_at=datetime.now(UTC),
        )
        encoded = encode_payload(payload)
        invariant(encoded.startswith(_PAYLOAD_HEAD), "a capture payload must begin with its amount")
        for _attempt in range(2):  # the second only after loading a wallet missing from Redis
            try:
                reply = await self.cache.capture(
                    hold_id=hold_id,
                    wallet_id=wallet_id,
                    requested_micros=amount_micros,
                    request_hash=payload.request_hash,
                    entry_id=payload.id,
                    payload_tail=encoded[len(_PAYLOAD_HEAD) :],
                    idempotency_key=key,
                    ttl_s=self.settings.idempotency_ttl_s,
                )
            except redis.exceptions.RedisError as exc:
                # The script may have run: hand its charge to the sweeper now,
                # as a single debit does, rather than after the grace period.
                self.wallets.abandon_in_background(wallet_id, key, payload.id)
                raise Unavailable("the balance store did not answer; nothing was charged") from exc
            if isinstance(reply, Captured):
                return await self._captured(hold_id, state, payload, reply, amount_micros)
            if isinstance(reply, CaptureReplayed):
                return await self._replayed(hold_id, reply)
            if isinstance(reply, Missing):
                await self.wallets.load_missing(wallet_id)
                continue
            if isinstance(reply, AlreadyEnded):
                ended = reply.status
                raise HoldEnded(f"hold {hold_id} has {ended}; there is nothing to capture", hold_status=ended)
            if isinstance(reply, NoSuchHold):
                raise HoldNotFound(f"no hold {hold_id}")
            raise IdempotencyConflict(f"hold {hold_id} was captured with another amount")
        raise Unavailable(f"wallet {wallet_id} could not be loaded into the balance store")

    async def _captured(
        self,
        hold_id: uuid.UUID,
        state: HoldState,
        payload: EntryPayload,
        reply: Captured,
        requested_micros: int,
    ) -> Capture:
        captured = reply.captured_micros
        entry = None
        if captured > 0:
            invariant(reply.balance_micros is not None, f"hold {hold_id}: captured without a balance")
            charged = msgspec.structs.replace(payload, amount_micros=captured)
            record = record_from_payload(
                charged, balance_micros=reply.balance_micros or 0, currency=reply.currency
            )
            # Raises Unavailable (not charged; the hold stays captured, so it
            # is released) when the ledger did not commit.
            entry, _ = await self.wallets.write_through(
                PendingCharge(record, reply.outbox_id, reply.epoch), charged
            )
        # Committed: from here on nothing may fail the answer. The event is
        # recorded if it can be (else the sweeper does it), and the hold is
        # answered from what capture.lua decided, without reading Redis again.
        await self._record(payload.wallet_id, reply.event_id)
        ended = msgspec.structs.replace(
            state,
            status="captured",
            ended_at_ms=reply.ended_at_ms,
            requested_micros=requested_micros,
            captured_micros=captured,
            entry_id=payload.id if captured > 0 else None,
        )
        return capture_answer(hold_from_state(hold_id, ended), entry, requested_micros, captured)

    async def _replayed(self, hold_id: uuid.UUID, reply: CaptureReplayed) -> Capture:
        captured, requested, state = reply.captured_micros, reply.requested_micros, reply.state
        entry = None
        if state == "in_progress":
            raise RequestInProgress(f"the capture of hold {hold_id} is still in progress; retry later")
        if state == "reversed":
            raise CaptureReversed(
                f"the capture of hold {hold_id} failed and was reversed: nothing is charged, and the hold is released"
            )
        if state == "ok":
            entry = replayed_entry(Replayed(reply.balance_micros or 0, reply.payload, reply.currency))
        elif state == "gone" and reply.entry_id is not None:
            entry = await self._capture_entry(hold_id, reply.entry_id)
        return capture_answer(await self._hold(hold_id), entry, requested, captured)

    async def _replayed_from_postgres(
        self, hold_id: uuid.UUID, requested_micros: int, owner_ids: OwnerIds
    ) -> Capture:
        """Redis let the hold go (its idempotency TTL after it ended, or lost):
        answer as Postgres recorded it, as a replay does while Redis keeps it."""
        rows = await self._recorded(hold_id)
        await self._check_reach(hold_id, rows[0].wallet_id, owner_ids)
        hold, last = hold_from_events(rows), rows[-1]
        if last.kind != "captured":
            raise HoldEnded(
                f"hold {hold_id} has {hold.status}; there is nothing to capture", hold_status=hold.status
            )
        if last.requested_micros != requested_micros:
            raise IdempotencyConflict(f"hold {hold_id} was captured with another amount")
        entry = None if last.entry_id is None else await self._capture_entry(hold_id, last.entry_id)
        return capture_answer(hold, entry, requested_micros, last.captured_micros or 0)

    async def _capture_entry(self, hold_id: uuid.UUID, entry_id: uuid.UUID) -> Entry:
        """A capture's entry as the ledger holds it; CaptureReversed if it never committed or was reversed."""
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            found = await ledger_repo.entries_by_id(conn, [entry_id])
            reversed_ids = await ledger_repo.reversed_entry_ids(conn, [entry_id])
        if entry_id not in found or entry_id in reversed_ids:
            raise CaptureReversed(
                f"the capture of hold {hold_id} failed: nothing is charged, and the hold is released"
            )
        return to_entry(found[entry_id])

    async def _record(self, wallet_id: uuid.UUID, event_id: str) -> None:
        """Record one event now. If Postgres or Redis fails, the event waits
        in its stream for the sweeper: the answer does not depend on it."""
        partition = self.cache.partition(wallet_id)
        try:
            events = await self.cache.hold_events_range(partition, event_id)
            await record_events(self.pool, self.cache, partition, events, timeout_s=self._timeout_s)
        except Exception as exc:  # the answer never depends on it
            log.warning("hold event %s not recorded now (the sweeper will): %r", event_id, exc)
