"""The Redis side of wallets: key names, partitions, and the Lua scripts.

Every key of a wallet carries its partition as a hash tag (`c:{p17}:...`), so
each script touches one partition only and runs unchanged on Redis Cluster.
The partition is a stable hash of the wallet id over a fixed count."""

from __future__ import annotations

import secrets
import uuid
import zlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import msgspec
import redis.asyncio as redis
from redis.commands.core import AsyncScript

from centime.errors import invariant
from centime.money import AMOUNT_MICROS_MAX
from ledger.ids import uuid7
from wallet.replies import (
    ApplyReply,
    CaptureReply,
    EndHoldReply,
    HoldReply,
    apply_reply,
    capture_reply,
    end_hold_reply,
    hold_reply,
)
from wallet.schemas import CachedWallet, WalletChange
from wallet.tick_client import Script, TickClient

SCRIPTS = (
    "apply",
    "hold",
    "capture",
    "end_hold",
    "compensate",
    "abandon",
    "clear_committed",
    "refund_abandoned",
    "load_wallet",
    "restore_key",
    "undo_reversed",
    "apply_changes",
    "repair_balance",
    "drift_probe",
)


REPAIR_SCAN_MAX = 10_000
"""Outbox and abandoned entries repair_balance.lua looks through; beyond, it waits."""


class DriftProbe(msgspec.Struct, frozen=True):
    balance_micros: int
    pending_micros: int
    change_seq: int
    outbox_last_id: str
    in_flight: bool


class Undo(msgspec.Struct, frozen=True, gc=False):
    """How to undo a charge in Redis: a debit returns to the balance (b); a
    credit leaves the pending credits (p) it waited in. Only into the wallet
    as it was charged (epoch)."""

    field: str
    delta_micros: int
    epoch: str


class Clearing(msgspec.Struct, frozen=True, gc=False):
    """A committed entry to settle in Redis."""

    outbox_id: str
    entry_id: uuid.UUID
    wallet_id: uuid.UUID
    credit_micros: int
    epoch: str


class ApplyItem(msgspec.Struct, frozen=True, gc=False):
    """One debit or credit for apply.lua."""

    wallet_id: uuid.UUID
    kind: str
    amount_micros: int
    request_hash: str
    entry_id: uuid.UUID
    payload: bytes
    idempotency_key: str


class HoldState(msgspec.Struct, frozen=True, kw_only=True):
    """A hold as Redis keeps it (wallet/lua/hold.lua)."""

    wallet_id: uuid.UUID
    amount_micros: int
    status: str
    expires_at_ms: int
    currency: str
    payload: bytes
    ended_at_ms: int | None
    requested_micros: int | None
    captured_micros: int | None
    entry_id: uuid.UUID | None


def _wallet_key(tag: str, wallet: str) -> str:
    """Cache.wallet_key, from the partition's tag and the wallet id as text."""
    return f"{tag}:w:{wallet}"


def _idempotency_key(tag: str, wallet: str, key: str) -> str:
    """Cache.idempotency_key, from the partition's tag and the wallet id as text."""
    return f"{tag}:i:{wallet}:{key}"


def new_hold_id(wallet_id: uuid.UUID) -> uuid.UUID:
    """A UUIDv7 whose last four bytes are the wallet's partition hash, so a
    hold id alone names its partition: the wallet's (Cache.hold_partition)."""
    value = uuid7().bytes[:12] + zlib.crc32(wallet_id.bytes).to_bytes(4, "big")
    return uuid.UUID(bytes=value)


class Cache:
    """Key names and script calls. Holds the client; no other state."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, partition_count: int, tick: TickClient | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.partition_count = partition_count
        # The debit path's two calls (apply, clear_committed) go through the
        # tick client when there is one (wallet/tick_client.py); all else
        # through redis-py.
        self.tick = tick
        texts = {
            name: resources.files("wallet").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")
            for name in SCRIPTS
        }
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(text) for name, text in texts.items()
        }
        self._tick_apply = Script(texts["apply"])
        self._tick_settle = Script(texts["clear_committed"])
        # Key prefixes of each partition, formatted once: the debit path names several keys per call.
        self._tags = [f"{prefix}:{{p{partition}}}" for partition in range(partition_count)]

    # Keys ----------------------------------------------------------------

    def partition(self, wallet_id: uuid.UUID) -> int:
        return zlib.crc32(wallet_id.bytes) % self.partition_count

    def hold_partition(self, hold_id: uuid.UUID) -> int:
        """The partition of the hold's wallet (new_hold_id)."""
        return int.from_bytes(hold_id.bytes[12:], "big") % self.partition_count

    def _tag(self, partition: int) -> str:
        return self._tags[partition]

    def wallet_key(self, wallet_id: uuid.UUID) -> str:
        return _wallet_key(self._tag(self.partition(wallet_id)), str(wallet_id))

    def idempotency_key(self, wallet_id: uuid.UUID, key: str) -> str:
        return _idempotency_key(self._tag(self.partition(wallet_id)), str(wallet_id), key)

    def outbox_key(self, partition: int) -> str:
        return f"{self._tag(partition)}:outbox"

    def abandoned_key(self, partition: int) -> str:
        return f"{self._tag(partition)}:abandoned"

    def batch_key(self, idempotency_key: str) -> str:
        partition = zlib.crc32(idempotency_key.encode()) % self.partition_count
        return f"{self._tag(partition)}:batch:{idempotency_key}"

    async def claim_batch_key(self, idempotency_key: str, request_hash: str, *, ttl_s: int) -> bool:
        """Bind a batch's Idempotency-Key to its body. False when the key is
        bound to another body (its items replay through their own keys)."""
        key = self.batch_key(idempotency_key)
        if await self.client.set(key, request_hash, nx=True, ex=ttl_s):
            return True
        return await self.client.get(key) == request_hash.encode()

    def hold_key(self, hold_id: uuid.UUID) -> str:
        return f"{self._tag(self.hold_partition(hold_id))}:h:{hold_id}"

    def hold_idempotency_key(self, wallet_id: uuid.UUID, key: str) -> str:
        return f"{self._tag(self.partition(wallet_id))}:hi:{wallet_id}:{key}"

    def hold_expiry_key(self, partition: int) -> str:
        return f"{self._tag(partition)}:hold_expiry"

    def hold_events_key(self, partition: int) -> str:
        return f"{self._tag(partition)}:hold_events"

    # Scripts -------------------------------------------------------------

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._scripts[name](keys=list(keys), args=list(args))

    async def apply(
        self,
        *,
        wallet_id: uuid.UUID,
        kind: str,
        amount_micros: int,
        request_hash: str,
        entry_id: uuid.UUID,
        payload: bytes,
        idempotency_key: str,
        ttl_s: int,
    ) -> ApplyReply:
        item = ApplyItem(wallet_id, kind, amount_micros, request_hash, entry_id, payload, idempotency_key)
        (reply,) = await self.apply_items(self.partition(wallet_id), [item], ttl_s=ttl_s)
        return reply

    async def apply_items(
        self, partition: int, items: Sequence[ApplyItem], *, ttl_s: int
    ) -> list[ApplyReply]:
        """Debit or credit wallets of one partition in one script call; a
        reply per item (apply.lua)."""
        keys = [self.outbox_key(partition), self.abandoned_key(partition)]
        tag = self._tag(partition)
        args: list[Any] = [ttl_s, AMOUNT_MICROS_MAX]
        for item in items:
            invariant(
                self.partition(item.wallet_id) == partition, f"wallet {item.wallet_id} not in {partition}"
            )
            # wallet_key and idempotency_key, with the partition and the wallet id formatted once
            wallet = str(item.wallet_id)
            keys += [_wallet_key(tag, wallet), _idempotency_key(tag, wallet, item.idempotency_key)]
            args += [item.kind, str(item.amount_micros), item.request_hash, str(item.entry_id), item.payload]
        if self.tick is not None:
            replies = await self.tick.evalsha(self._tick_apply, keys, args)
        else:
            replies = await self._run("apply", keys, args)
        return [apply_reply(reply) for reply in replies]

    # Holds -------------------------------------------------------------------

    async def hold(
        self,
        *,
        hold_id: uuid.UUID,
        wallet_id: uuid.UUID,
        amount_micros: int,
        request_hash: str,
        payload: bytes,
        expires_in_s: int,
        idempotency_key: str,
        ttl_s: int,
        holds_max: int,
    ) -> HoldReply:
        """Reserve an amount (hold.lua), unless the wallet has `holds_max` active holds."""
        p = self.partition(wallet_id)
        invariant(self.hold_partition(hold_id) == p, f"hold {hold_id} is not in its wallet's partition")
        keys = [
            self.wallet_key(wallet_id),
            self.hold_idempotency_key(wallet_id, idempotency_key),
            self.hold_key(hold_id),
            self.hold_expiry_key(p),
            self.hold_events_key(p),
        ]
        args = [
            str(hold_id),
            str(amount_micros),
            request_hash,
            payload,
            expires_in_s,
            ttl_s,
            str(wallet_id),
            AMOUNT_MICROS_MAX,
            holds_max,
        ]
        return hold_reply(await self._run("hold", keys, args))

    async def capture(
        self,
        *,
        hold_id: uuid.UUID,
        wallet_id: uuid.UUID,
        requested_micros: int,
        request_hash: str,
        entry_id: uuid.UUID,
        payload_tail: bytes,
        idempotency_key: str,
        ttl_s: int,
    ) -> CaptureReply:
        p = self.partition(wallet_id)
        keys = [
            self.hold_key(hold_id),
            self.wallet_key(wallet_id),
            self.idempotency_key(wallet_id, idempotency_key),
            self.outbox_key(p),
            self.abandoned_key(p),
            self.hold_expiry_key(p),
            self.hold_events_key(p),
        ]
        args = [
            str(hold_id),
            str(wallet_id),
            str(requested_micros),
            request_hash,
            str(entry_id),
            payload_tail,
            ttl_s,
            AMOUNT_MICROS_MAX,
        ]
        return capture_reply(await self._run("capture", keys, args))

    async def end_hold(self, hold_id: uuid.UUID, wallet_id: uuid.UUID, status: str) -> EndHoldReply:
        """Release or expire a hold (end_hold.lua)."""
        p = self.partition(wallet_id)
        keys = [
            self.hold_key(hold_id),
            self.wallet_key(wallet_id),
            self.hold_expiry_key(p),
            self.hold_events_key(p),
        ]
        return end_hold_reply(await self._run("end_hold", keys, [str(hold_id), str(wallet_id), status]))

    async def hold_state(self, hold_id: uuid.UUID) -> HoldState | None:
        fields = await self.client.hmget(
            self.hold_key(hold_id), "w", "a", "st", "x", "c", "d", "t", "r", "k", "n"
        )
        w, a, st, x, c, d, t, r, k, n = fields
        if w is None or a is None or st is None or x is None or c is None or d is None:
            return None
        return HoldState(
            wallet_id=uuid.UUID(w.decode()),
            amount_micros=int(a),
            status=st.decode(),
            expires_at_ms=int(x),
            currency=c.decode(),
            payload=d,
            ended_at_ms=None if t is None else int(t),
            requested_micros=None if r is None else int(r),
            captured_micros=None if k is None else int(k),
            entry_id=uuid.UUID(n.decode()) if n else None,
        )

    async def partitions_with_holds_due(self, now_ms: int) -> list[int]:
        """The partitions with a hold whose time has come: one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for p in range(self.partition_count):
                pipe.zcount(self.hold_expiry_key(p), "-inf", now_ms)
            counts = await pipe.execute()
        return [p for p, count in enumerate(counts) if count]

    async def partitions_with_hold_events(self) -> list[int]:
        """The partitions with hold events waiting to be recorded: one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for p in range(self.partition_count):
                pipe.xlen(self.hold_events_key(p))
            lengths = await pipe.execute()
        return [p for p, length in enumerate(lengths) if length]

    async def due_holds(
        self, partition: int, *, now_ms: int, count: int
    ) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(hold id, wallet id) of up to `count` holds of the partition whose time has come."""
        members = await self.client.zrangebyscore(
            self.hold_expiry_key(partition), "-inf", now_ms, start=0, num=count
        )
        due = []
        for member in members:
            hold_text, _, wallet_text = member.decode().partition(":")
            due.append((uuid.UUID(hold_text), uuid.UUID(wallet_text)))
        return due

    async def hold_events(
        self, partition: int, *, before_ms: int | None, count: int
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` hold events not yet recorded in Postgres, oldest
        first (only those older than `before_ms` when given)."""
        end = "+" if before_ms is None else str(max(before_ms, 0))
        entries = await self.client.xrange(self.hold_events_key(partition), "-", end, count=count)
        return [(event_id.decode(), fields) for event_id, fields in entries]

    async def hold_events_range(self, partition: int, event_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
        """The one event `event_id`, if it is still waiting to be recorded."""
        entries = await self.client.xrange(self.hold_events_key(partition), event_id, event_id)
        return [(found.decode(), fields) for found, fields in entries]

    async def forget_hold_events(self, partition: int, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self.client.xdel(self.hold_events_key(partition), *event_ids)

    async def compensate(
        self, *, wallet_id: uuid.UUID, idempotency_key: str, outbox_id: str, undo: Undo, entry_id: uuid.UUID
    ) -> bool:
        p = self.partition(wallet_id)
        keys = [
            self.wallet_key(wallet_id),
            self.idempotency_key(wallet_id, idempotency_key),
            self.outbox_key(p),
        ]
        args = [outbox_id, undo.field, str(undo.delta_micros), str(entry_id), undo.epoch]
        return await self._run("compensate", keys, args) == 1

    async def abandon(
        self, *, wallet_id: uuid.UUID, idempotency_key: str, entry_id: uuid.UUID, outbox_id: str | None
    ) -> bool:
        p = self.partition(wallet_id)
        keys = [self.idempotency_key(wallet_id, idempotency_key), self.outbox_key(p), self.abandoned_key(p)]
        return await self._run("abandon", keys, [str(entry_id), outbox_id or ""]) == 1

    async def is_abandoned(self, wallet_id: uuid.UUID, entry_id: uuid.UUID) -> bool:
        return bool(await self.client.hexists(self.abandoned_key(self.partition(wallet_id)), str(entry_id)))

    async def clear_committed(self, committed: dict[int, list[Clearing]]) -> dict[int, list[int]]:
        """Settle committed entries, one script call per partition, all in one
        round trip. Per entry: 1 settled now, 2 abandoned first, 0 settled before."""
        calls: list[tuple[list[str], list[str]]] = []
        for partition, items in committed.items():
            keys = [self.outbox_key(partition), self.abandoned_key(partition)]
            keys += [self.wallet_key(item.wallet_id) for item in items]
            args: list[str] = []
            for item in items:
                args += [item.outbox_id, str(item.entry_id), str(item.credit_micros), item.epoch]
            calls.append((keys, args))
        if self.tick is not None:
            replies = await self.tick.evalsha_many(self._tick_settle, calls)
        else:
            script = self._scripts["clear_committed"]
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        return {p: [int(flag) for flag in reply] for p, reply in zip(committed, replies, strict=True)}

    async def refund_abandoned(
        self,
        *,
        wallet_id: uuid.UUID,
        idempotency_key: str,
        entry_id: uuid.UUID,
        undo: Undo,
        mark_reversed: bool,
    ) -> bool:
        p = self.partition(wallet_id)
        keys = [
            self.wallet_key(wallet_id),
            self.idempotency_key(wallet_id, idempotency_key),
            self.abandoned_key(p),
        ]
        args = [
            str(entry_id),
            undo.field,
            str(undo.delta_micros),
            "reversed" if mark_reversed else "forget",
            undo.epoch,
        ]
        return await self._run("refund_abandoned", keys, args) == 1

    async def load_wallet(self, wallet_id: uuid.UUID, wallet: CachedWallet, *, overwrite: bool) -> bool:
        """True if written. False if the wallet was there (not overwriting),
        or if Redis has applied later changes than `wallet` includes (then
        read the ledger again)."""
        args = [
            wallet.balance_micros,
            wallet.overdraft_limit_micros,
            wallet.status,
            wallet.currency,
            "1" if overwrite else "0",
            secrets.token_hex(8),  # a new epoch: undos of earlier charges skip this wallet
            wallet.change_seq,
        ]
        return await self._run("load_wallet", [self.wallet_key(wallet_id)], args) == 1

    async def apply_changes(
        self, wallet_id: uuid.UUID, changes: Sequence[WalletChange]
    ) -> tuple[int, int] | None:
        """Apply changes in seq order, each once. Returns the last change
        applied before and after this call, or None when the wallet is not in
        Redis (load it first)."""
        args: list[Any] = []
        for change in changes:
            args += [change.seq, change.delta_micros, change.status or ""]
        result = await self._run("apply_changes", [self.wallet_key(wallet_id)], args)
        return None if result[0] == b"missing" else (int(result[2]), int(result[1]))

    async def undo_reversed(self, *, idempotency_key: str, clearing: Clearing, undo: Undo) -> bool:
        """Undo a charge the ledger has reversed, wherever it stands in Redis."""
        wallet_id = clearing.wallet_id
        p = self.partition(wallet_id)
        keys = [
            self.wallet_key(wallet_id),
            self.idempotency_key(wallet_id, idempotency_key),
            self.outbox_key(p),
            self.abandoned_key(p),
        ]
        args = [
            clearing.outbox_id,
            str(clearing.entry_id),
            undo.field,
            str(undo.delta_micros),
            undo.epoch,
            str(clearing.credit_micros),
        ]
        return await self._run("undo_reversed", keys, args) == 1

    async def restore_key(
        self,
        *,
        wallet_id: uuid.UUID,
        idempotency_key: str,
        request_hash: str,
        entry_id: uuid.UUID,
        payload: bytes,
        balance_micros: int,
        currency: str,
        reversed_: bool,
        ttl_s: int,
    ) -> bool:
        keys = [self.idempotency_key(wallet_id, idempotency_key)]
        args = [
            request_hash,
            str(entry_id),
            payload,
            str(balance_micros),
            currency,
            "reversed" if reversed_ else "ok",
            ttl_s,
        ]
        return await self._run("restore_key", keys, args) == 1

    async def drift_probe(self, wallet_id: uuid.UUID) -> DriftProbe | None:
        """The wallet's balance, pending credits, last applied change, its
        partition's last charge id, and whether a charge of it is in flight.
        None when the wallet is absent."""
        p = self.partition(wallet_id)
        keys = [self.wallet_key(wallet_id), self.outbox_key(p), self.abandoned_key(p)]
        b, pending, q, last_id, busy = await self._run("drift_probe", keys, [str(wallet_id), REPAIR_SCAN_MAX])
        if b == b"":
            return None
        return DriftProbe(int(b), int(pending), int(q), last_id.decode(), busy == 1)

    async def repair_balance(self, wallet_id: uuid.UUID, probe: DriftProbe, *, ledger_micros: int) -> str:
        """Set the balance to the ledger's if nothing touched the wallet, or
        charged anything in its partition, since `probe` (repair_balance.lua)."""
        keys = [self.wallet_key(wallet_id), self.outbox_key(self.partition(wallet_id))]
        args = [str(probe.balance_micros), str(probe.change_seq), probe.outbox_last_id, str(ledger_micros)]
        return (await self._run("repair_balance", keys, args)).decode()

    async def balance_states(self, wallet_ids: Sequence[uuid.UUID]) -> list[tuple[int, int, int] | None]:
        """(balance, pending credits, last change applied) of each wallet, or None if absent."""
        async with self.client.pipeline(transaction=False) as pipe:
            for wallet_id in wallet_ids:
                pipe.hmget(self.wallet_key(wallet_id), "b", "p", "q")
            values = await pipe.execute()
        return [None if b is None else (int(b), int(p or 0), int(q or 0)) for b, p, q in values]

    # Reads -----------------------------------------------------------------

    async def wallet(self, wallet_id: uuid.UUID) -> CachedWallet | None:
        """The wallet as the debit path sees it; None when absent or partial
        (apply.lua answers `missing` for both, and the next load repairs it)."""
        fields = await self.client.hmget(self.wallet_key(wallet_id), "b", "o", "s", "c", "e", "h")
        if any(value is None for value in fields[:5]):
            return None
        balance, overdraft, status, currency, _, held = fields
        return CachedWallet(
            int(balance), int(overdraft), status.decode(), currency.decode(), held_micros=int(held or 0)
        )

    async def balances(self, wallet_ids: Sequence[uuid.UUID]) -> list[int | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for wallet_id in wallet_ids:
                pipe.hget(self.wallet_key(wallet_id), "b")
            values = await pipe.execute()
        return [None if value is None else int(value) for value in values]

    async def outbox_depth(self) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            for p in range(self.partition_count):
                pipe.xlen(self.outbox_key(p))
                pipe.hlen(self.abandoned_key(p))
            return sum(await pipe.execute())

    async def server_time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros // 1000
