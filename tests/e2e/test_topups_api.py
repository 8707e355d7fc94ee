"""Top-ups end to end over real HTTP, with localstripe as Stripe: a paid
top-up is credited once (gross, with Stripe's fee as its own lines),
whatever Stripe retries or reorders; refunds and disputes take it back;
a canceled payment credits nothing, a payment centime did not create is
ignored, and while Stripe is unreachable the answer is 503 and the retry
finishes the job."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import STRIPE_WEBHOOK_SECRET, Keys, Server, auth, new_wallet
from stripe_support import FakeStripe, make_dispute, make_event, pay, sign, stripe_client

from centime.settings import Settings

CREDIT_WAIT_S = 15.0


@pytest.fixture
async def http(stripe_server: Server) -> Any:
    async with httpx.AsyncClient(base_url=stripe_server.base_url, timeout=30) as client:
        yield client


async def start_topup(http: httpx.AsyncClient, keys: Keys, wallet_id: str, amount_micros: int) -> dict:
    response = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
    )
    assert response.status_code == 201, response.text
    return response.json()


async def topup_of(http: httpx.AsyncClient, keys: Keys, topup_id: str) -> dict:
    response = await http.get(f"/v1/topups/{topup_id}", headers=auth(keys.read))
    assert response.status_code == 200, response.text
    return response.json()


async def balance_of(http: httpx.AsyncClient, keys: Keys, wallet_id: str) -> int:
    response = await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))
    assert response.status_code == 200, response.text
    return response.json()["balance_micros"]


async def wait_for(predicate: Any, timeout_s: float = CREDIT_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out waiting")


async def post_event(
    http: httpx.AsyncClient, event: bytes, secret: str = STRIPE_WEBHOOK_SECRET
) -> httpx.Response:
    return await http.post(
        "/v1/webhooks/stripe",
        content=event,
        headers={"Stripe-Signature": sign(event, secret), "Content-Type": "application/json"},
    )


async def paid_topup(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe, amount_micros: int = 10_000_000
) -> tuple[str, dict]:
    wallet_id = await new_wallet(http, keys)
    topup = await start_topup(http, keys, wallet_id, amount_micros)
    await pay(stripe_client(fake_stripe.base_url), topup["payment_intent_id"])

    async def credited() -> bool:
        return (await topup_of(http, keys, topup["id"]))["status"] == "succeeded"

    await wait_for(credited)
    return wallet_id, await topup_of(http, keys, topup["id"])


async def test_a_paid_topup_is_credited_once_with_its_fee(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe, stripe_settings: Any
) -> None:
    wallet_id, topup = await paid_topup(http, keys, fake_stripe, 10_000_000)
    fee_minor = fake_stripe.fee(1_000)
    assert topup["credited_micros"] == 10_000_000
    assert topup["fee_micros"] == fee_minor * 10_000
    assert await balance_of(http, keys, wallet_id) == 10_000_000
    entries = (await http.get(f"/v1/wallets/{wallet_id}/entries", headers=auth(keys.read))).json()["data"]
    assert [(e["kind"], e["amount_micros"]) for e in entries] == [("topup", 10_000_000)]
    assert entries[0]["stripe_object_id"].startswith("ch_")
    conn = await asyncpg.connect(stripe_settings.database_url)
    try:
        lines = await conn.fetch(
            "SELECT a.kind, l.amount_micros FROM journal_lines l JOIN accounts a ON a.id = l.account_id "
            "WHERE l.entry_id = $1 ORDER BY l.line_no",
            __import__("uuid").UUID(entries[0]["id"]),
        )
    finally:
        await conn.close()
    assert [(r["kind"], r["amount_micros"]) for r in lines] == [
        ("stripe_clearing", 10_000_000 - fee_minor * 10_000),
        ("stripe_fees", fee_minor * 10_000),
        ("wallet", -10_000_000),
    ]


async def refund(fake_stripe: FakeStripe, payment_intent_id: str, amount_minor: int) -> dict:
    client = stripe_client(fake_stripe.base_url)
    intent = await client.v1.payment_intents.retrieve_async(payment_intent_id)
    created = await client.v1.refunds.create_async(
        params={"charge": intent.latest_charge, "amount": amount_minor}  # type: ignore[typeddict-item]
    )
    return created.to_dict()


async def charge_of(fake_stripe: FakeStripe, payment_intent_id: str) -> dict:
    client = stripe_client(fake_stripe.base_url)
    intent = await client.v1.payment_intents.retrieve_async(payment_intent_id)
    return (await client.v1.charges.retrieve_async(str(intent.latest_charge))).to_dict()


async def succeeded_event(fake_stripe: FakeStripe, payment_intent_id: str) -> bytes:
    client = stripe_client(fake_stripe.base_url)
    intent = (await client.v1.payment_intents.retrieve_async(payment_intent_id)).to_dict()
    return make_event("payment_intent.succeeded", intent)


async def paid_quietly(
    http: httpx.AsyncClient, keys: Keys, fake: FakeStripe, amount_micros: int
) -> tuple[str, dict, bytes]:
    """A top-up paid at the fake and its success event, which the test delivers (or not)."""
    wallet_id = await new_wallet(http, keys)
    topup = await start_topup(http, keys, wallet_id, amount_micros)
    await pay(stripe_client(fake.base_url), topup["payment_intent_id"])
    return wallet_id, topup, await succeeded_event(fake, topup["payment_intent_id"])


async def test_replays_and_reordered_events_change_nothing(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    wallet_id, topup = await paid_topup(http, keys, fake_stripe, 5_000_000)
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    succeeded = await succeeded_event(fake_stripe, topup["payment_intent_id"])
    others = [
        make_event("charge.succeeded", charge),
        make_event("customer.created", {"id": "cus_x", "object": "customer"}),
        make_event("charge.refunded", charge),
        succeeded,
    ]
    for _ in range(5):
        response = await post_event(http, succeeded)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] in ("duplicate", "processed: no change")
    for event in reversed(others):
        assert (await post_event(http, event)).status_code == 200
    for event in others:
        assert (await post_event(http, event)).json()["outcome"] == "duplicate"
    assert await balance_of(http, keys, wallet_id) == 5_000_000
    assert (await topup_of(http, keys, topup["id"]))["credited_micros"] == 5_000_000


async def test_a_bad_signature_is_refused_and_changes_nothing(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    wallet_id, topup, event = await paid_quietly(http, keys, fake_stripe, 2_000_000)
    for headers in (
        {"Stripe-Signature": sign(event, "whsec_wrong")},
        {"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET, timestamp=int(time.time()) - 3600)},
        {"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET, timestamp=int(time.time()) + 3600)},
        {"Stripe-Signature": "garbage"},
        {},
    ):
        response = await http.post("/v1/webhooks/stripe", content=event, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "webhook_signature_invalid"
        assert response.headers["www-authenticate"].startswith("Stripe-Signature")
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["x-content-type-options"] == "nosniff"
    tampered = event.replace(b'"amount": 200', b'"amount": 900')
    response = await http.post(
        "/v1/webhooks/stripe",
        content=tampered,
        headers={"Stripe-Signature": sign(event, STRIPE_WEBHOOK_SECRET)},
    )
    assert response.status_code == 401
    # The real, signed delivery from the fake still credits it, once.

    async def credited() -> bool:
        return (await topup_of(http, keys, topup["id"]))["status"] == "succeeded"

    await wait_for(credited)
    assert await balance_of(http, keys, wallet_id) == 2_000_000


async def test_refund_half_then_the_rest_claws_back_exactly(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    wallet_id, topup = await paid_topup(http, keys, fake_stripe, 10_000_000)
    debit = await http.post(
        f"/v1/wallets/{wallet_id}/debits",
        json={"amount_micros": 7_000_000},
        headers=auth(keys.debit, "spend"),
    )
    assert debit.status_code == 201, debit.text
    await refund(fake_stripe, topup["payment_intent_id"], 500)
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    first = await post_event(http, make_event("charge.refunded", charge))
    assert first.status_code == 200, first.text
    assert "clawed back 5000000 micros" in first.json()["outcome"]
    assert await balance_of(http, keys, wallet_id) == 3_000_000 - 5_000_000
    state = await topup_of(http, keys, topup["id"])
    assert (state["status"], state["refunded_micros"]) == ("partially_refunded", 5_000_000)

    await refund(fake_stripe, topup["payment_intent_id"], 500)
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    second = make_event("charge.refunded", charge)
    assert (await post_event(http, second)).status_code == 200
    assert (await post_event(http, first.request.content)).json()["outcome"] == "duplicate"
    assert (await post_event(http, make_event("charge.refunded", charge))).json()[
        "outcome"
    ] == "processed: no change"
    # Clawbacks may take the wallet below zero (-overdraft too): it shows, and debits stop.
    assert await balance_of(http, keys, wallet_id) == -7_000_000
    state = await topup_of(http, keys, topup["id"])
    assert (state["status"], state["refunded_micros"]) == ("refunded", 10_000_000)
    refused = await http.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 1}, headers=auth(keys.debit, "after")
    )
    assert refused.status_code == 402
    kinds = [
        e["kind"]
        for e in (await http.get(f"/v1/wallets/{wallet_id}/entries", headers=auth(keys.read))).json()["data"]
    ]
    assert kinds == ["topup_refund", "topup_refund", "debit", "topup"]


@pytest.mark.parametrize("outcome", ["lost", "won"])
async def test_a_dispute_freezes_withholds_then_settles(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe, outcome: str
) -> None:
    wallet_id, topup = await paid_topup(http, keys, fake_stripe, 10_000_000)
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    dispute_id = f"dp_{secrets.token_hex(8)}"
    created = make_dispute(charge, 400, "usd", dispute_id=dispute_id)
    response = await post_event(http, make_event("charge.dispute.created", created))
    assert response.status_code == 200, response.text
    wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
    assert (wallet["status"], wallet["balance_micros"]) == ("frozen", 6_000_000)
    assert wallet["available_micros"] == 0  # a frozen wallet can spend nothing, whatever it holds
    assert (await topup_of(http, keys, topup["id"]))["status"] == "disputed"
    frozen = await http.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 1}, headers=auth(keys.debit, "while-frozen")
    )
    assert frozen.status_code == 409 and frozen.json()["code"] == "wallet_frozen"

    closed = make_dispute(charge, 400, "usd", dispute_id=dispute_id, status=outcome)
    response = await post_event(http, make_event("charge.dispute.closed", closed))
    assert response.status_code == 200, response.text
    # A late `created` after `closed` never reopens it.
    assert (await post_event(http, make_event("charge.dispute.created", created))).status_code == 200
    wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
    expected = 10_000_000 if outcome == "won" else 6_000_000
    assert (wallet["status"], wallet["balance_micros"]) == ("active", expected)
    state = await topup_of(http, keys, topup["id"])
    assert state["status"] == ("succeeded" if outcome == "won" else "dispute_lost")
    spend = await http.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 1}, headers=auth(keys.debit, "after")
    )
    assert spend.status_code == 201, spend.text


async def event_stored(database_url: str | None, event_type: str, object_id: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM stripe_events WHERE type = $1 AND object_id = $2", event_type, object_id
            )
        )
    finally:
        await conn.close()


async def test_a_dispute_before_the_success_event_credits_first(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe, stripe_settings: Settings
) -> None:
    """Stripe is read back: the dispute's payment is credited, then withheld."""
    wallet_id = await new_wallet(http, keys)
    topup = await start_topup(http, keys, wallet_id, 3_000_000)
    client = stripe_client(fake_stripe.base_url)
    await pay(client, topup["payment_intent_id"])
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    closed = make_dispute(charge, 300, "usd", status="lost")
    response = await post_event(http, make_event("charge.dispute.closed", closed))
    assert response.status_code == 200, response.text
    assert "credited 3000000 micros" in response.json()["outcome"]
    # The fake's own succeeded event arrives afterwards, and changes nothing.
    payment_intent = topup["payment_intent_id"]
    await wait_for(
        lambda: event_stored(stripe_settings.database_url, "payment_intent.succeeded", payment_intent)
    )
    wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
    assert (wallet["status"], wallet["balance_micros"]) == ("active", 0)


async def test_a_declined_card_fails_the_topup_and_credits_nothing(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    import stripe

    wallet_id = await new_wallet(http, keys)
    topup = await start_topup(http, keys, wallet_id, 1_000_000)
    with pytest.raises(stripe.CardError):
        await pay(
            stripe_client(fake_stripe.base_url), topup["payment_intent_id"], "pm_card_chargeCustomerFail"
        )

    async def failed() -> bool:
        return (await topup_of(http, keys, topup["id"]))["status"] == "failed"

    await wait_for(failed)
    state = await topup_of(http, keys, topup["id"])
    assert state["failure_message"] and state["credited_micros"] == 0
    assert await balance_of(http, keys, wallet_id) == 0


@pytest.mark.parametrize(
    ("amount_micros", "status", "code", "fragment"),
    [
        (499_999, 400, "invalid_request", "between 500000 and 10000000000"),
        (10_000_000_001, 400, "invalid_request", "between 500000 and 10000000000"),
        # Within the bounds the OpenAPI states, but not whole cents: the wallet refuses it.
        (1_000_001, 422, "amount_not_payable", "multiples of 10000 micros"),
    ],
)
async def test_topup_amounts_outside_the_rules_are_refused(
    http: httpx.AsyncClient, keys: Keys, amount_micros: int, status: int, code: str, fragment: str
) -> None:
    wallet_id = await new_wallet(http, keys)
    response = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
    )
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["fields"] == ["amount_micros"]
    assert fragment in body["detail"]


async def test_a_jpy_topup_is_whole_yen(http: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(http, keys, currency="jpy")
    refused = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": 1_500_000}, headers=auth(keys.debit)
    )
    assert refused.status_code == 422 and "multiples of 1000000 micros" in refused.json()["detail"]
    accepted = await start_topup(http, keys, wallet_id, 500_000_000)
    assert accepted["currency"] == "jpy"


async def test_the_idempotency_key_returns_the_same_topup(http: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(http, keys)
    url = f"/v1/wallets/{wallet_id}/topups"
    first = await http.post(url, json={"amount_micros": 1_000_000}, headers=auth(keys.debit, "buy-1"))
    again = await http.post(url, json={"amount_micros": 1_000_000}, headers=auth(keys.debit, "buy-1"))
    other = await http.post(url, json={"amount_micros": 2_000_000}, headers=auth(keys.debit, "buy-1"))
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 409)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["payment_intent_id"] == first.json()["payment_intent_id"]
    page = (await http.get(url, headers=auth(keys.read))).json()
    assert [t["id"] for t in page["data"]] == [first.json()["id"]] and page["has_more"] is False
    fetched = await topup_of(http, keys, first.json()["id"])
    assert fetched["client_secret"] is None  # only the creator sees it
    assert first.json()["client_secret"]


async def test_topup_routes_refuse_bad_ids_and_scopes(http: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(http, keys)
    assert (await http.get("/v1/topups/not-a-uuid", headers=auth(keys.read))).json()[
        "code"
    ] == "topup_not_found"
    missing = await http.post(
        f"/v1/wallets/{secrets.token_hex(4)}/topups",
        json={"amount_micros": 1_000_000},
        headers=auth(keys.debit),
    )
    assert missing.status_code == 404 and missing.json()["code"] == "wallet_not_found"
    read_only = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": 1_000_000}, headers=auth(keys.read)
    )
    assert read_only.status_code == 403
    typo = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micro": 1_000_000}, headers=auth(keys.debit)
    )
    assert typo.status_code == 400 and typo.json()["code"] == "invalid_request"
    cursor = await http.get(f"/v1/wallets/{wallet_id}/topups?starting_after=x", headers=auth(keys.read))
    assert cursor.status_code == 400


async def test_without_stripe_settings_topups_answer_503(client: httpx.AsyncClient, keys: Keys) -> None:
    """The default server of the suite has no Stripe key."""
    wallet_id = await new_wallet(client, keys)
    response = await client.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": 1_000_000}, headers=auth(keys.debit)
    )
    assert response.status_code == 503 and response.json()["code"] == "topups_disabled"
    webhook = await client.post(
        "/v1/webhooks/stripe", content=b"{}", headers={"Stripe-Signature": "t=1,v1=x"}
    )
    assert webhook.status_code == 503


async def test_concurrent_dispute_events_leave_the_wallet_frozen_exactly_while_one_is_open(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    """Events of different top-ups of one wallet serialise on the wallet: two
    closures at once unfreeze it; a closure beside an opening leaves it frozen."""
    wallet_id = await new_wallet(http, keys)
    client = stripe_client(fake_stripe.base_url)
    charges = []
    for _ in range(3):
        topup = await start_topup(http, keys, wallet_id, 1_000_000)
        await pay(client, topup["payment_intent_id"])
        charges.append(await charge_of(fake_stripe, topup["payment_intent_id"]))
    ids = [f"dp_{secrets.token_hex(8)}" for _ in charges]

    async def dispute_event(i: int, status: str) -> httpx.Response:
        kind = "charge.dispute.created" if status == "needs_response" else "charge.dispute.closed"
        return await post_event(
            http, make_event(kind, make_dispute(charges[i], 100, "usd", dispute_id=ids[i], status=status))
        )

    async def status() -> str:
        return (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()["status"]

    for i in (0, 1):
        assert (await dispute_event(i, "needs_response")).status_code == 200
    answers = await asyncio.gather(dispute_event(0, "won"), dispute_event(1, "won"))
    assert [a.status_code for a in answers] == [200, 200]
    assert await status() == "active"

    assert (await dispute_event(0, "needs_response")).json()[
        "outcome"
    ] == "processed: no change"  # never reopens
    assert (await dispute_event(1, "won")).json()["outcome"] == "processed: no change"
    assert (await dispute_event(2, "needs_response")).status_code == 200
    assert await status() == "frozen"
    await dispute_event(2, "lost")
    assert await status() == "active"
    assert await balance_of(http, keys, wallet_id) == 3_000_000 - 1_000_000


async def test_signed_but_malformed_events_are_400_and_unknown_ones_ignored(http: httpx.AsyncClient) -> None:
    not_json = b"not json at all"
    answer = await post_event(http, not_json)
    assert answer.status_code == 400 and answer.json()["code"] == "webhook_payload_invalid"
    broken_dispute = make_event("charge.dispute.created", {"id": "dp_x", "object": "dispute"})
    answer = await post_event(http, broken_dispute)
    assert answer.status_code == 400 and answer.json()["code"] == "webhook_payload_invalid"
    unknown = make_event("invoice.paid", {"id": "in_x", "object": "invoice"})
    answer = await post_event(http, unknown)
    assert answer.status_code == 200 and answer.json()["outcome"].startswith("ignored")
    assert (await post_event(http, unknown)).json()["outcome"] == "duplicate"
    # Signed, yet naming a PaymentIntent Stripe does not know (a webhook secret shared with
    # another account): Stripe refuses the read-back, the event is retried, nothing moves.
    # One that Stripe knows and centime did not create is stored as ignored (below).
    unknown_to_stripe = make_event(
        "payment_intent.succeeded", {"id": "pi_unknown", "object": "payment_intent", "metadata": {}}
    )
    answer = await post_event(http, unknown_to_stripe)
    assert answer.status_code == 502, answer.text
    assert answer.json()["code"] == "stripe_refused"
    too_big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    answer = await post_event(http, too_big)
    assert answer.status_code == 413


async def test_a_dispute_on_a_payment_stripe_shows_unpaid_is_retried_not_swallowed(
    http: httpx.AsyncClient, keys: Keys
) -> None:
    wallet_id = await new_wallet(http, keys)
    topup = await start_topup(http, keys, wallet_id, 1_000_000)  # never paid
    dispute = make_dispute("ch_unpaid", 100, "usd", payment_intent=topup["payment_intent_id"])
    event = make_event("charge.dispute.created", dispute)
    for _ in range(2):  # not stored as processed: each delivery is tried again
        answer = await post_event(http, event)
        assert answer.status_code == 503 and answer.json()["code"] == "stripe_unavailable", answer.text
    assert (await topup_of(http, keys, topup["id"]))["status"] == "pending"


async def test_a_hundred_refunds_in_one_event_claw_back_every_one(
    http: httpx.AsyncClient, keys: Keys, fake_stripe: FakeStripe
) -> None:
    """Refunds made while webhooks were not delivered, then one event: every
    refund is clawed back, its outcome stays bounded, and the refunded money
    cannot be spent (it once stayed spendable: the outcome overflowed its column
    and every delivery answered 503)."""
    wallet_id, topup = await paid_topup(http, keys, fake_stripe, 20_000_000)
    refunds = [await refund(fake_stripe, topup["payment_intent_id"], 10) for _ in range(120)]
    assert {len(r["id"]) for r in refunds} == {27}  # Stripe's real id length; more than one page
    charge = await charge_of(fake_stripe, topup["payment_intent_id"])
    event = make_event("charge.refunded", charge)
    answer = await post_event(http, event)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "processed: clawed back 12000000 micros (120 refunds)"
    assert await balance_of(http, keys, wallet_id) == 8_000_000
    spend = await http.post(
        f"/v1/wallets/{wallet_id}/debits", json={"amount_micros": 15_000_000}, headers=auth(keys.debit, "big")
    )
    assert spend.status_code == 402, spend.text
    assert (await post_event(http, event)).json()["outcome"] == "duplicate"
    state = await topup_of(http, keys, topup["id"])
    assert (state["status"], state["refunded_micros"]) == ("partially_refunded", 12_000_000)


# Events the test delivers alone (the silent fake sends none), and Stripe outages --------


@pytest.fixture
async def silent(silent_stripe_server: Server) -> Any:
    async with httpx.AsyncClient(base_url=silent_stripe_server.base_url, timeout=30) as client:
        yield client


async def intent_of(fake: FakeStripe, payment_intent_id: str) -> dict:
    client = stripe_client(fake.base_url)
    return (await client.v1.payment_intents.retrieve_async(payment_intent_id)).to_dict()


async def test_a_canceled_payment_cancels_the_topup_and_credits_nothing(
    silent: httpx.AsyncClient, keys: Keys, silent_fake_stripe: FakeStripe
) -> None:
    wallet_id = await new_wallet(silent, keys)
    topup = await start_topup(silent, keys, wallet_id, 4_000_000)
    client = stripe_client(silent_fake_stripe.base_url)
    canceled = (await client.v1.payment_intents.cancel_async(topup["payment_intent_id"])).to_dict()
    assert canceled["status"] == "canceled"
    event = make_event("payment_intent.canceled", canceled)
    answer = await post_event(silent, event)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "processed: no change"
    state = await topup_of(silent, keys, topup["id"])
    assert (state["status"], state["credited_micros"]) == ("canceled", 0)
    assert (await post_event(silent, event)).json()["outcome"] == "duplicate"
    assert await balance_of(silent, keys, wallet_id) == 0


async def test_a_refund_update_claws_the_refund_back_once(
    silent: httpx.AsyncClient, keys: Keys, silent_fake_stripe: FakeStripe
) -> None:
    """`charge.refund.updated` (its object is the refund) is the only event of this refund."""
    wallet_id, topup, event = await paid_quietly(silent, keys, silent_fake_stripe, 6_000_000)
    credited = await post_event(silent, event)
    assert credited.json()["outcome"] == "processed: credited 6000000 micros", credited.text
    refunded = await refund(silent_fake_stripe, topup["payment_intent_id"], 250)
    assert refunded["object"] == "refund" and refunded["status"] == "succeeded"

    answer = await post_event(silent, make_event("charge.refund.updated", refunded))
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "processed: clawed back 2500000 micros (1 refund)"
    again = await post_event(silent, make_event("charge.refund.updated", refunded))
    assert again.json()["outcome"] == "processed: no change"
    assert await balance_of(silent, keys, wallet_id) == 3_500_000
    state = await topup_of(silent, keys, topup["id"])
    assert (state["status"], state["refunded_micros"]) == ("partially_refunded", 2_500_000)


async def test_events_of_payment_intents_centime_did_not_create_are_stored_as_ignored(
    silent: httpx.AsyncClient, keys: Keys, silent_fake_stripe: FakeStripe, settings: Settings
) -> None:
    """Another integration on the same Stripe account: Stripe knows the payment, its
    metadata names no top-up of centime's (none, or one of another wallet). The event is
    answered 200 and stored, so Stripe stops sending it, and no money moves."""
    wallet_id = await new_wallet(silent, keys)
    ours = await start_topup(silent, keys, wallet_id, 1_000_000)
    client = stripe_client(silent_fake_stripe.base_url)
    foreign = [
        await client.v1.payment_intents.create_async(params={"amount": 1_000, "currency": "usd"}),
        await client.v1.payment_intents.create_async(
            params={
                "amount": 100,
                "currency": "usd",
                "metadata": {"topup_id": ours["id"], "wallet_id": str(uuid.uuid4())},
            }
        ),
    ]
    for intent in foreign:
        await pay(client, intent.id)
        event = make_event("payment_intent.succeeded", await intent_of(silent_fake_stripe, intent.id))
        answer = await post_event(silent, event)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == f"ignored: {intent.id} is not a centime top-up"
        assert (await post_event(silent, event)).json()["outcome"] == "duplicate"
        assert await event_stored(settings.database_url, "payment_intent.succeeded", intent.id)
    state = await topup_of(silent, keys, ours["id"])
    assert (state["status"], state["payment_intent_id"]) == ("pending", ours["payment_intent_id"])
    assert await balance_of(silent, keys, wallet_id) == 0


async def intents_of_topup(fake: FakeStripe, topup_id: str) -> list[str]:
    """The PaymentIntents the fake holds for a top-up (by the metadata centime sets)."""
    client = stripe_client(fake.base_url)
    found: list[str] = []
    params: dict[str, Any] = {"limit": 100}
    for _page in range(100):
        page = (await client.v1.payment_intents.list_async(params=params)).to_dict()  # type: ignore[arg-type]
        found += [i["id"] for i in page["data"] if i["metadata"].get("topup_id") == topup_id]
        if not page["has_more"]:
            return found
        params["starting_after"] = page["data"][-1]["id"]
    raise AssertionError("more PaymentIntents than the fake should hold")


async def test_a_topup_stripe_did_not_answer_is_finished_by_a_retry_with_its_key(
    silent: httpx.AsyncClient, keys: Keys, silent_fake_stripe: FakeStripe
) -> None:
    """503 while Stripe is unreachable; the same key then finishes the same top-up, with
    one PaymentIntent even when Stripe made it and only its answer was lost."""
    wallet_id = await new_wallet(silent, keys)
    url = f"/v1/wallets/{wallet_id}/topups"
    for key, outage in (("unreachable", "drop"), ("answer-lost", "lose_answer")):
        with silent_fake_stripe.outage(outage):
            down = await silent.post(url, json={"amount_micros": 2_000_000}, headers=auth(keys.debit, key))
        assert down.status_code == 503, down.text
        assert down.json()["code"] == "stripe_unavailable"
        pending = (await silent.get(url, headers=auth(keys.read))).json()["data"][0]
        assert (pending["status"], pending["payment_intent_id"]) == ("pending", None)

        retried = await silent.post(url, json={"amount_micros": 2_000_000}, headers=auth(keys.debit, key))
        assert retried.status_code == 201, retried.text
        assert retried.headers["idempotent-replayed"] == "true"
        finished = retried.json()
        assert finished["id"] == pending["id"] and finished["client_secret"]
        assert await intents_of_topup(silent_fake_stripe, finished["id"]) == [finished["payment_intent_id"]]
    assert len((await silent.get(url, headers=auth(keys.read))).json()["data"]) == 2


async def test_a_webhook_stripe_cannot_confirm_is_answered_503_and_its_retry_credits(
    silent: httpx.AsyncClient, keys: Keys, silent_fake_stripe: FakeStripe, settings: Settings
) -> None:
    wallet_id, topup, event = await paid_quietly(silent, keys, silent_fake_stripe, 3_000_000)
    with silent_fake_stripe.outage("drop"):
        down = await post_event(silent, event)
    assert down.status_code == 503, down.text
    assert down.json()["code"] == "stripe_unavailable"
    assert (await topup_of(silent, keys, topup["id"]))["status"] == "pending"
    assert not await event_stored(
        settings.database_url, "payment_intent.succeeded", topup["payment_intent_id"]
    )

    retried = await post_event(silent, event)  # Stripe sends it again
    assert retried.status_code == 200, retried.text
    assert retried.json()["outcome"] == "processed: credited 3000000 micros"
    assert await balance_of(silent, keys, wallet_id) == 3_000_000


async def test_the_topup_list_pages_past_one_page(silent: httpx.AsyncClient, keys: Keys) -> None:
    wallet_id = await new_wallet(silent, keys)
    created = [(await start_topup(silent, keys, wallet_id, 1_000_000 + n * 10_000))["id"] for n in range(5)]
    url = f"/v1/wallets/{wallet_id}/topups"
    pages: list[tuple[list[str], bool]] = []
    cursor = ""
    for _page in range(len(created)):
        body = (await silent.get(f"{url}?limit=2{cursor}", headers=auth(keys.read))).json()
        pages.append(([t["id"] for t in body["data"]], body["has_more"]))
        if not body["has_more"]:
            break
        cursor = f"&starting_after={body['data'][-1]['id']}"
    newest_first = created[::-1]
    assert pages == [(newest_first[0:2], True), (newest_first[2:4], True), (newest_first[4:], False)]
    whole = (await silent.get(f"{url}?limit=5", headers=auth(keys.read))).json()
    assert ([t["id"] for t in whole["data"]], whole["has_more"]) == (newest_first, False)
