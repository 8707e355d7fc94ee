"""Top-ups: prepaid balance bought through Stripe PaymentIntents.

Money moves Postgres first here (debits go Redis first). A webhook event is
handled in three steps:
  1. verify its signature, and skip it if its id is already stored;
  2. read the payment back from Stripe (events arrive late, twice, out of
     order: the event only says *which* payment changed, Stripe says what it
     is now);
  3. in one Postgres transaction: bring the ledger up to date with that
     payment (credit once, claw back each refund once, open or close each
     dispute once), update the top-up, and store the event id. Each ledger
     effect is a wallet change (wallet/for_topups.py), applied to Redis after the
     commit, exactly once, by this request or else by the sweeper.
So replaying any event, in any order, changes nothing: every effect is keyed
by the Stripe object that caused it, and the payment's state is Stripe's own.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Literal

import asyncpg
import msgspec
import redis.exceptions

from centime import metrics
from centime.errors import invariant
from centime.money import micros_to_minor, minor_to_micros
from centime.settings import Settings
from ledger.accounts import (
    dispute_lost_lines,
    dispute_opened_lines,
    dispute_won_lines,
    topup_lines,
    topup_refund_lines,
)
from ledger.ids import uuid7
from ledger.schemas import EntryKind, EntryRecord, Line
from topup import repo
from topup.errors import (
    StripeUnavailable,
    TopUpAmountInvalid,
    TopUpAmountNotPayable,
    TopUpNotFound,
    TopUpsDisabled,
    WebhookPayloadInvalid,
)
from topup.gateway import Event, StripeGateway
from topup.schemas import (
    PAGE_SIZE_MAX,
    CheckoutStatus,
    CreateTopUp,
    Dispute,
    Payment,
    StripeCharge,
    TopUp,
    TopUpPage,
    WebhookAnswer,
)
from wallet.errors import IdempotencyConflict
from wallet.for_topups import TopUpWallets
from wallet.owners import OwnerIds

log = logging.getLogger(__name__)

PAYMENT_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.processing",
        "charge.succeeded",
        "charge.refunded",
        "charge.refund.updated",
        "refund.created",
        "refund.updated",
    }
)
DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
DISPUTE_CLOSED_WON = frozenset({"won", "warning_closed"})
"""Dispute statuses that give the money back (an inquiry closed is won)."""
DISPUTE_CLOSED_LOST = frozenset({"lost"})
DisputeClosedAs = Literal["won", "lost"]
REFUND_SETTLED = frozenset({"succeeded", "pending"})
"""Refund statuses that take the money back. Stripe has accepted a pending
refund; a refund that later fails is left to reconciliation."""


OUTCOME_CHARS_MAX = 255
"""An event's stored outcome (stripe_events.outcome) is at most this long."""
OBJECT_ID_CHARS_MAX = 255
"""And so is its object's id (stripe_events.object_id); its own id and type
are refused beyond this when the event is decoded (topup.gateway.Event)."""


class _Duplicate(Exception):
    """Another delivery of the event committed first: roll back."""


class Effects:
    """What one event (or one heal) did to the ledger, counted, so that its
    summary stays short however much it did: one event of a charge with a
    hundred refunds claws back a hundred times and says so in one clause.
    Each effect's own record is its ledger entry (keyed by its Stripe id)."""

    def __init__(self) -> None:
        self.credited_micros = 0
        self.refunds = 0
        self.refunded_micros = 0
        self.disputes: list[str] = []
        """At most two: one event names one dispute, opened and closed once each."""

    def __bool__(self) -> bool:
        return bool(self.credited_micros or self.refunds or self.disputes)

    def credited(self, amount_micros: int) -> None:
        self.credited_micros += amount_micros

    def clawed_back(self, amount_micros: int) -> None:
        self.refunds += 1
        self.refunded_micros += amount_micros

    def dispute(self, summary: str) -> None:
        self.disputes.append(summary)

    def summary(self) -> str:
        """`processed: ...`, at most OUTCOME_CHARS_MAX characters."""
        clauses = []
        if self.credited_micros:
            clauses.append(f"credited {self.credited_micros} micros")
        if self.refunds:
            noun = "refund" if self.refunds == 1 else "refunds"
            clauses.append(f"clawed back {self.refunded_micros} micros ({self.refunds} {noun})")
        clauses.extend(self.disputes)
        return bounded(f"processed: {', '.join(clauses) or 'no change'}", OUTCOME_CHARS_MAX)


def bounded(text: str, chars_max: int) -> str:
    """`text`, cut to `chars_max` characters with an ellipsis when longer."""
    return text if len(text) <= chars_max else text[: chars_max - 1] + "\u2026"


def topup_request_hash(amount_micros: int) -> str:
    return hashlib.sha256(f"topup:{amount_micros}".encode()).hexdigest()[:32]


def topup_status(
    *,
    canceled: bool,
    failed: bool,
    credited_micros: int,
    refunded_micros: int,
    open_disputed_micros: int,
    lost_disputed_micros: int,
) -> str:
    if credited_micros == 0:
        if canceled:
            return "canceled"
        return "failed" if failed else "pending"
    if open_disputed_micros:
        return "disputed"
    if lost_disputed_micros:
        return "dispute_lost"
    if refunded_micros >= credited_micros:
        return "refunded"
    return "partially_refunded" if refunded_micros else "succeeded"


def _entry(
    row: repo.TopUpRow,
    *,
    kind: EntryKind,
    key: str,
    amount_micros: int,
    lines: tuple[Line, ...],
    stripe_object_id: str,
    description: str,
    metadata: dict[str, str],
) -> EntryRecord:
    return EntryRecord(
        id=uuid7(),
        kind=kind,
        currency=row.currency,
        wallet_id=row.wallet_id,
        amount_micros=amount_micros,
        balance_micros=None,
        idempotency_key=key,
        request_hash=None,
        description=description,
        metadata={"topup_id": str(row.id), **metadata},
        created_at=datetime.now(UTC),
        stripe_object_id=stripe_object_id,
        lines=lines,
    )


class TopUps:
    """The top-up service. Holds its connections, given explicitly."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        wallets: TopUpWallets,
        gateway: StripeGateway | None,
        settings: Settings,
    ) -> None:
        self.pool = pool
        self.wallets = wallets
        self._stripe = gateway
        self.settings = settings
        self._timeout_s = settings.database_timeout_ms / 1000

    def _gateway(self) -> StripeGateway:
        if self._stripe is None:
            raise TopUpsDisabled("top-ups need CENTIME_STRIPE_SECRET_KEY (and the webhook secret) to be set")
        return self._stripe

    # Creating and reading ------------------------------------------------------

    async def create_topup(
        self, wallet_id: uuid.UUID, request: CreateTopUp, idempotency_key: str | None, *, owner_ids: OwnerIds
    ) -> tuple[TopUp, bool]:
        """A pending top-up with its PaymentIntent. Returns it and whether it
        is a replay of an earlier request with the same key."""
        gateway = self._gateway()
        wallet = await self.wallets.wallet(wallet_id, owner_ids=owner_ids)
        amount_minor = self._amount_minor(request.amount_micros, wallet.currency)
        request_hash = topup_request_hash(request.amount_micros)
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            row = await repo.insert_topup(
                conn,
                uuid7(),
                wallet.id,
                request.amount_micros,
                wallet.currency,
                idempotency_key,
                request_hash,
            )
            replayed = row is None
            if row is None:
                assert idempotency_key is not None  # only a key can conflict
                row = await repo.topup_by_wallet_key(conn, wallet.id, idempotency_key)
                invariant(row is not None, f"top-up with key {idempotency_key!r} vanished")
                assert row is not None
                if row.request_hash != request_hash:
                    raise IdempotencyConflict(
                        f"idempotency key {idempotency_key!r} was used for a top-up of another amount"
                    )
        if row.payment_intent_id is None:
            # New, or an earlier attempt failed at Stripe: Stripe's own
            # idempotency key (the top-up id) makes this create at most one.
            customer_id = await self._customer(wallet.id, wallet.owner_id)
            try:
                intent_id, client_secret = await gateway.create_payment_intent(
                    topup_id=str(row.id),
                    wallet_id=str(wallet.id),
                    amount_minor=amount_minor,
                    currency=wallet.currency,
                    customer_id=customer_id,
                )
            except TopUpAmountNotPayable as refused:
                async with self.pool.acquire(timeout=self._timeout_s) as conn:
                    await repo.set_topup_state(conn, row.id, _failed(row, refused.detail))
                raise
            async with self.pool.acquire(timeout=self._timeout_s) as conn:
                row = await repo.set_payment_intent(conn, row.id, intent_id, client_secret)
        return self._wire(row, with_secret=True), replayed

    def _amount_minor(self, amount_micros: int, currency: str) -> int:
        low, high = self.settings.topup_min_micros, self.settings.topup_max_micros
        if not low <= amount_micros <= high:
            raise TopUpAmountInvalid(
                f"amount_micros: a top-up is between {low} and {high} micros "
                f"({low / 1_000_000:.2f} to {high / 1_000_000:,.2f} {currency.upper()})",
                fields=["amount_micros"],
                minimum_micros=low,
                maximum_micros=high,
            )
        amount_minor = micros_to_minor(amount_micros, currency)
        if amount_minor is None:
            step = minor_to_micros(1, currency)
            raise TopUpAmountNotPayable(
                f"amount_micros: {currency} is paid in whole minor units, multiples of {step} micros",
                fields=["amount_micros"],
            )
        return amount_minor

    async def _customer(self, wallet_id: uuid.UUID, owner_id: str) -> str:
        """The wallet's Stripe customer, created once."""
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            existing = await repo.customer_of_wallet(conn, wallet_id)
        if existing is not None:
            return existing
        created = await self._gateway().create_customer(wallet_id=str(wallet_id), owner_id=owner_id)
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            return await repo.insert_customer(conn, wallet_id, created)

    async def get_topup(self, topup_id: uuid.UUID, *, owner_ids: OwnerIds) -> TopUp:
        row = await self._row(topup_id)
        if not await self.wallets.in_reach(row.wallet_id, owner_ids):
            raise TopUpNotFound(f"no top-up {topup_id}")  # as a missing one: nothing tells it exists
        return self._wire(row, with_secret=False)

    async def checkout(self, topup_id: uuid.UUID) -> repo.TopUpRow:
        """What the public checkout page shows (it holds the client secret)."""
        return await self._row(topup_id)

    async def checkout_status(self, topup_id: uuid.UUID) -> CheckoutStatus:
        row = await self._row(topup_id)
        return CheckoutStatus(
            status=row.status,  # type: ignore[arg-type]
            amount_micros=row.amount_micros,
            currency=row.currency,
            credited=row.credited_micros > 0,
        )

    async def _row(self, topup_id: uuid.UUID) -> repo.TopUpRow:
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            row = await repo.topup_by_id(conn, topup_id)
        if row is None:
            raise TopUpNotFound(f"no top-up {topup_id}")
        return row

    async def list_topups(
        self, wallet_id: uuid.UUID, *, limit: int, starting_after: uuid.UUID | None, owner_ids: OwnerIds
    ) -> TopUpPage:
        invariant(1 <= limit <= PAGE_SIZE_MAX, f"limit {limit} outside 1..{PAGE_SIZE_MAX}")
        await self.wallets.wallet(wallet_id, owner_ids=owner_ids)
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            rows = await repo.topups_page(conn, wallet_id, starting_after, limit + 1)
        return TopUpPage(
            data=[self._wire(r, with_secret=False) for r in rows[:limit]], has_more=len(rows) > limit
        )

    def _wire(self, row: repo.TopUpRow, *, with_secret: bool) -> TopUp:
        return TopUp(
            id=row.id,
            wallet_id=row.wallet_id,
            amount_micros=row.amount_micros,
            currency=row.currency,
            status=row.status,  # type: ignore[arg-type]
            payment_intent_id=row.payment_intent_id,
            client_secret=row.client_secret if with_secret else None,
            checkout_url=f"/checkout/{row.id}",
            credited_micros=row.credited_micros,
            fee_micros=row.fee_micros,
            refunded_micros=row.refunded_micros,
            disputed_micros=row.disputed_micros,
            failure_message=row.failure_message,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    # Webhooks --------------------------------------------------------------------

    async def handle_webhook(self, payload: bytes, signature: str | None) -> WebhookAnswer:
        gateway = self._gateway()
        event = gateway.verify_event(payload, signature)
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            seen = await repo.event_outcome(conn, event.id)
        if seen is not None:
            metrics.stripe_events_total.labels(event.type, "duplicate").inc()
            return WebhookAnswer(event_id=event.id, outcome="duplicate")
        if event.type in PAYMENT_EVENTS:
            outcome = await self._on_payment_event(event)
        elif event.type in DISPUTE_EVENTS:
            outcome = await self._on_dispute_event(event)
        else:
            outcome = await self._record_only(event, f"ignored: centime does not act on {event.type}")
        log.info("stripe event %s (%s): %s", event.id, event.type, outcome)
        metrics.stripe_events_total.labels(event.type, outcome.split(":", 1)[0]).inc()
        return WebhookAnswer(event_id=event.id, outcome=outcome)

    async def _record_only(self, event: Event, outcome: str) -> str:
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            stored = await _store_event(conn, event, outcome)
        return bounded(outcome, OUTCOME_CHARS_MAX) if stored else "duplicate"

    async def _on_payment_event(self, event: Event) -> str:
        intent_id = await self._payment_intent_of(event.object)
        if intent_id is None:
            return await self._record_only(event, "ignored: no PaymentIntent")
        outcome = await self._bring_up_to_date(intent_id, event, dispute=None)
        return outcome or await self._record_only(event, f"ignored: {intent_id} is not a centime top-up")

    async def _on_dispute_event(self, event: Event) -> str:
        try:
            dispute = msgspec.convert(event.object, Dispute)
        except msgspec.ValidationError as exc:
            raise WebhookPayloadInvalid(f"event {event.id}: not a dispute: {exc}") from None
        intent_id = await self._payment_intent_of_dispute(dispute)
        if intent_id is None:
            return await self._record_only(
                event, f"ignored: charge {_charge_id(dispute)} has no PaymentIntent"
            )
        # The payment is read too: a dispute can arrive before the success event.
        outcome = await self._bring_up_to_date(intent_id, event, dispute=dispute)
        return outcome or await self._record_only(event, f"ignored: {intent_id} is not a centime top-up")

    async def sync_payment(self, payment_intent_id: str) -> str | None:
        """Bring the ledger up to date with a PaymentIntent as Stripe has it
        now, exactly as its webhook events would (the reconciler heals a lost
        webhook with this). None when it is not a centime top-up."""
        return await self._bring_up_to_date(payment_intent_id, None, dispute=None)

    async def sync_refund(self, refund_id: str) -> str | None:
        """The same for the payment a refund belongs to: every settled refund
        of its charge is clawed back, each once (by its `refund:<id>` key)."""
        refund = await self._gateway().refund(refund_id)
        if refund.charge is None:
            return None
        intent_id = await self.payment_intent_of_charge(refund.charge)
        if intent_id is None:
            return None
        return await self._bring_up_to_date(intent_id, None, dispute=None)

    async def sync_dispute(self, dispute_id: str) -> str | None:
        """The same for a dispute, as Stripe has it now: opened once, closed
        once, exactly as its webhook events would have."""
        dispute = await self._gateway().dispute(dispute_id)
        intent_id = await self._payment_intent_of_dispute(dispute)
        if intent_id is None:
            return None
        return await self._bring_up_to_date(intent_id, None, dispute=dispute)

    async def _payment_intent_of_dispute(self, dispute: Dispute) -> str | None:
        return dispute.payment_intent or await self.payment_intent_of_charge(_charge_id(dispute))

    async def _bring_up_to_date(
        self, intent_id: str, event: Event | None, *, dispute: Dispute | None
    ) -> str | None:
        """Read the PaymentIntent back from Stripe and settle it (and the
        dispute) in one transaction. None when it is not a centime top-up."""
        payment = await self._gateway().payment(intent_id)
        row = await self._topup_of(payment)
        if row is None:
            return None
        return await self._in_transaction(event, row, payment, dispute=dispute)

    async def payment_intent_of_charge(self, charge_id: str) -> str | None:
        return await self._payment_intent_of({"object": "charge", "id": charge_id})

    async def _payment_intent_of(self, obj: dict) -> str | None:
        """The PaymentIntent an event's object belongs to."""
        if obj.get("object") == "payment_intent":
            return _str(obj.get("id"))
        intent_id = _str(obj.get("payment_intent"))
        if intent_id is not None:
            return intent_id
        charge_id = _str(obj.get("id")) if obj.get("object") == "charge" else _str(obj.get("charge"))
        if charge_id is None:
            return None
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            row = await repo.topup_by_charge(conn, charge_id)
        if row is not None and row.payment_intent_id is not None:
            return row.payment_intent_id
        return await self._gateway().payment_intent_of_charge(charge_id)

    async def _topup_of(self, payment: Payment) -> repo.TopUpRow | None:
        """The top-up of a PaymentIntent: by its id, or by the top-up id in
        its metadata (the intent was created but its id never stored)."""
        intent = payment.intent
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            row = await repo.topup_by_payment_intent(conn, intent.id)
            if row is None:
                try:
                    topup_id = uuid.UUID(intent.metadata.get("topup_id", ""))
                except ValueError:
                    return None
                row = await repo.topup_by_id(conn, topup_id)
                if row is None or str(row.wallet_id) != intent.metadata.get("wallet_id"):
                    return None
                if row.payment_intent_id is None and intent.client_secret is not None:
                    row = await repo.set_payment_intent(conn, row.id, intent.id, intent.client_secret)
        if row.payment_intent_id != intent.id:
            log.error(
                "PaymentIntent %s names top-up %s, which has %s", intent.id, row.id, row.payment_intent_id
            )
            return None
        return row

    async def _in_transaction(
        self, event: Event | None, row: repo.TopUpRow, payment: Payment, *, dispute: Dispute | None
    ) -> str:
        """Bring the ledger up to date with the payment (and the dispute),
        and store the event, in one transaction; then apply the wallet's
        changes to Redis."""
        try:
            async with self.pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
                # Lock order: the top-up, then its wallet. The wallet lock
                # serialises events of all the wallet's top-ups, so "is any
                # dispute still open?" is answered by committed truth.
                locked = await repo.topup_by_id(conn, row.id, for_update=True)
                assert locked is not None
                await self.wallets.lock(conn, row.wallet_id)
                effects = Effects()
                await self._settle_payment(conn, locked, payment, effects)
                if dispute is not None:
                    await self._settle_dispute(conn, locked, dispute, effects)
                outcome = effects.summary()
                if event is not None and not await _store_event(conn, event, outcome):
                    raise _Duplicate
        except _Duplicate:
            return "duplicate"
        if effects:
            await self._apply(row.wallet_id)
        return outcome

    async def _apply(self, wallet_id: uuid.UUID) -> None:
        try:
            await self.wallets.apply(wallet_id)
        except (redis.exceptions.RedisError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            # Committed: the sweeper applies it. The event is answered 200.
            log.warning(
                "wallet %s: changes committed, Redis not updated yet (the sweeper will): %r", wallet_id, exc
            )

    async def _settle_payment(
        self, conn: asyncpg.Connection, row: repo.TopUpRow, payment: Payment, effects: Effects
    ) -> None:
        """Credit the top-up once and claw back each refund once."""
        intent, charge = payment.intent, payment.charge
        invariant(
            intent.currency == row.currency,
            f"PaymentIntent {intent.id} is in {intent.currency}, top-up {row.id} in {row.currency}",
        )
        credited, fee, refunded = row.credited_micros, row.fee_micros, row.refunded_micros
        charge_id = row.charge_id
        if (
            intent.status == "succeeded"
            and credited == 0
            and charge is not None
            and charge.status == "succeeded"
        ):
            credited, fee = await self._credit(conn, row, payment, charge, effects)
            charge_id = charge.id
        if credited and charge is not None:
            refunded += await self._claw_back_refunds(conn, row, payment, charge, effects)
        error = intent.last_payment_error or {}
        failure = None
        if intent.status == "requires_payment_method" and error:  # the last attempt failed
            failure = str(error.get("message") or error.get("code") or "payment failed")[:1000]
        await self._save_state(
            conn,
            row,
            credited_micros=credited,
            fee_micros=fee,
            refunded_micros=refunded,
            charge_id=charge_id,
            canceled=intent.status == "canceled",
            failure=failure,
        )

    async def _credit(
        self,
        conn: asyncpg.Connection,
        row: repo.TopUpRow,
        payment: Payment,
        charge: StripeCharge,
        effects: Effects,
    ) -> tuple[int, int]:
        """Credit the wallet with the succeeded charge, once (key
        `topup:<id>`). Returns the gross and the fee, in micros."""
        intent = payment.intent
        gross = minor_to_micros(intent.amount_received or charge.amount, row.currency)
        transaction = payment.balance_transaction
        # A fee in another currency (settlement in the account's own) is
        # not this entry's: the reconciler reports it.
        fee = (
            minor_to_micros(transaction.fee, row.currency)
            if transaction is not None and transaction.currency == row.currency
            else 0
        )
        fee = min(fee, gross)
        entry = _entry(
            row,
            kind="topup",
            key=f"topup:{row.id}",
            amount_micros=gross,
            lines=topup_lines(row.wallet_id, row.currency, gross, fee),
            stripe_object_id=charge.id,
            description=f"top-up {row.id}",
            metadata={
                "payment_intent_id": intent.id,
                "charge_id": charge.id,
                "balance_transaction_id": transaction.id if transaction is not None else "",
            },
        )
        if await self.wallets.write(conn, entry, status=None):
            effects.credited(gross)
        return gross, fee

    async def _claw_back_refunds(
        self,
        conn: asyncpg.Connection,
        row: repo.TopUpRow,
        payment: Payment,
        charge: StripeCharge,
        effects: Effects,
    ) -> int:
        """Claw back each settled refund of the charge, once (key
        `refund:<id>`). Returns the micros clawed back by this call."""
        clawed_back = 0
        for refund in payment.refunds:
            if refund.status not in REFUND_SETTLED or refund.currency != row.currency:
                continue
            amount = minor_to_micros(refund.amount, row.currency)
            entry = _entry(
                row,
                kind="topup_refund",
                key=f"refund:{refund.id}",
                amount_micros=amount,
                lines=topup_refund_lines(row.wallet_id, row.currency, amount),
                stripe_object_id=refund.id,
                description=f"refund {refund.id} of top-up {row.id}",
                metadata={"payment_intent_id": payment.intent.id, "charge_id": charge.id},
            )
            if await self.wallets.write(conn, entry, status=None):
                clawed_back += amount
                effects.clawed_back(amount)
        return clawed_back

    async def _settle_dispute(
        self, conn: asyncpg.Connection, row: repo.TopUpRow, dispute: Dispute, effects: Effects
    ) -> None:
        """Open the dispute once (freeze the wallet, withhold the amount), and
        close it once (won: give it back; lost: it is gone). Never reopened:
        a late `created` after `closed` changes nothing."""
        current = await repo.topup_by_id(conn, row.id)
        assert current is not None
        if current.credited_micros == 0:
            # Stripe disputes only paid charges: Stripe's read is behind. Not
            # stored as processed: Stripe retries the event later.
            raise StripeUnavailable(
                f"dispute {dispute.id} on top-up {row.id}, which Stripe does not show as paid yet; retry later"
            )
        invariant(dispute.currency == row.currency, f"dispute {dispute.id} is in {dispute.currency}")
        stored = await repo.dispute_for_update(conn, dispute.id)
        changed = stored is None
        if stored is None:
            amount = minor_to_micros(dispute.amount, row.currency)
            await self._open_dispute(conn, row, dispute, amount, effects)
            status = "open"
        else:
            amount, status = stored.amount_micros, stored.status
        closed_as = _closed_as(dispute)
        if status == "open" and closed_as is not None:
            await self._close_dispute(conn, row, dispute, amount, closed_as, effects)
            changed = True
        if changed:
            await self._save_state(  # the payment's own state stands
                conn,
                current,
                credited_micros=current.credited_micros,
                fee_micros=current.fee_micros,
                refunded_micros=current.refunded_micros,
                charge_id=current.charge_id,
                canceled=current.status == "canceled",
                failure=current.failure_message,
            )

    async def _open_dispute(
        self, conn: asyncpg.Connection, row: repo.TopUpRow, dispute: Dispute, amount: int, effects: Effects
    ) -> None:
        """Record the dispute, freeze the wallet and withhold the amount."""
        await repo.insert_dispute(conn, dispute.id, row.id, row.wallet_id, amount)
        entry = _entry(
            row,
            kind="dispute_opened",
            key=f"dispute:{dispute.id}:opened",
            amount_micros=amount,
            lines=dispute_opened_lines(row.wallet_id, row.currency, amount),
            stripe_object_id=dispute.id,
            description=f"dispute {dispute.id} opened on top-up {row.id}",
            metadata={"charge_id": row.charge_id or ""},
        )
        await self.wallets.write(conn, entry, status="frozen")
        effects.dispute(f"dispute {dispute.id} opened: wallet frozen, {amount} micros withheld")

    async def _close_dispute(
        self,
        conn: asyncpg.Connection,
        row: repo.TopUpRow,
        dispute: Dispute,
        amount: int,
        closed_as: DisputeClosedAs,
        effects: Effects,
    ) -> None:
        """Close the open dispute: won gives the amount back, lost takes it
        for good; the wallet is active again when no other dispute is open."""
        await repo.close_dispute(conn, dispute.id, closed_as)
        still_open = await repo.open_disputes_of_wallet(conn, row.wallet_id)
        lines = (
            dispute_won_lines(row.wallet_id, row.currency, amount)
            if closed_as == "won"
            else dispute_lost_lines(row.currency, amount)
        )
        entry = _entry(
            row,
            kind="dispute_won" if closed_as == "won" else "dispute_lost",
            key=f"dispute:{dispute.id}:{closed_as}",
            amount_micros=amount,
            lines=lines,
            stripe_object_id=dispute.id,
            description=f"dispute {dispute.id} {closed_as} on top-up {row.id}",
            metadata={"charge_id": row.charge_id or ""},
        )
        await self.wallets.write(conn, entry, status="active" if still_open == 0 else None)
        effects.dispute(
            f"dispute {dispute.id} {closed_as}"
            + ("" if still_open else ": wallet active again")
            + (f", {amount} micros given back" if closed_as == "won" else "")
        )

    async def _save_state(
        self,
        conn: asyncpg.Connection,
        row: repo.TopUpRow,
        *,
        credited_micros: int,
        fee_micros: int,
        refunded_micros: int,
        charge_id: str | None,
        canceled: bool,
        failure: str | None,
    ) -> None:
        """Copy what the ledger now holds of the top-up onto its row."""
        open_micros, lost_micros = await repo.dispute_totals_of_topup(conn, row.id)
        state = repo.TopUpState(
            status=topup_status(
                canceled=canceled,
                failed=failure is not None,
                credited_micros=credited_micros,
                refunded_micros=refunded_micros,
                open_disputed_micros=open_micros,
                lost_disputed_micros=lost_micros,
            ),
            charge_id=charge_id,
            credited_micros=credited_micros,
            fee_micros=fee_micros,
            refunded_micros=refunded_micros,
            disputed_micros=open_micros + lost_micros,
            failure_message=None if credited_micros else failure,
        )
        await repo.set_topup_state(conn, row.id, state)


def _failed(row: repo.TopUpRow, message: str) -> repo.TopUpState:
    return repo.TopUpState(
        status="failed",
        charge_id=row.charge_id,
        credited_micros=row.credited_micros,
        fee_micros=row.fee_micros,
        refunded_micros=row.refunded_micros,
        disputed_micros=row.disputed_micros,
        failure_message=message[:1000],
    )


def _closed_as(dispute: Dispute) -> DisputeClosedAs | None:
    """How Stripe closed the dispute, or None while it is open."""
    if dispute.status in DISPUTE_CLOSED_WON:
        return "won"
    if dispute.status in DISPUTE_CLOSED_LOST:
        return "lost"
    return None


def _charge_id(dispute: Dispute) -> str:
    return dispute.charge if isinstance(dispute.charge, str) else dispute.charge.id


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


async def _store_event(conn: asyncpg.Connection, event: Event, outcome: str) -> bool:
    """Store the event as processed (False: it was already). Every text is
    within its column's bound: no event fails for what it says or did."""
    object_id = _str(event.object.get("id"))
    return await repo.insert_event(
        conn,
        event.id,
        event.type,
        None if object_id is None else bounded(object_id, OBJECT_ID_CHARS_MAX),
        bounded(outcome, OUTCOME_CHARS_MAX),
    )
