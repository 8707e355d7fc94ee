"""Top-ups against Stripe's own test mode (not the fake): a card payment is
credited once with Stripe's real fee. Skipped unless STRIPE_TEST_SECRET_KEY
(an sk_test_ key) is set; Stripe cannot reach this machine's webhook, so the
test signs the event itself with the server's webhook secret."""

from __future__ import annotations

import os
import secrets

import httpx
import msgspec
import pytest
import stripe
from conftest import Keys, auth, new_wallet, start_server, stop_server
from stripe_support import make_event, sign

from centime.settings import Settings

pytestmark = pytest.mark.stripe_live

SECRET_KEY = os.environ.get("STRIPE_TEST_SECRET_KEY", "")


@pytest.mark.skipif(not SECRET_KEY.startswith("sk_test_"), reason="set STRIPE_TEST_SECRET_KEY=sk_test_...")
async def test_a_real_test_mode_payment_is_credited_once(settings: Settings, keys: Keys) -> None:
    webhook_secret = f"whsec_live_{secrets.token_hex(8)}"
    live = msgspec.structs.replace(
        settings,
        stripe_secret_key=SECRET_KEY,
        stripe_publishable_key="pk_test_unused",
        stripe_webhook_secret=webhook_secret,
    )
    server = start_server(live)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            wallet_id = await new_wallet(http, keys)
            created = await http.post(
                f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": 5_000_000}, headers=auth(keys.debit)
            )
            assert created.status_code == 201, created.text
            client = stripe.StripeClient(SECRET_KEY, http_client=stripe.HTTPXClient())
            intent = await client.v1.payment_intents.confirm_async(
                created.json()["payment_intent_id"],
                params={"payment_method": "pm_card_visa", "return_url": "https://example.com/done"},
            )
            assert intent.status == "succeeded"
            event = make_event("payment_intent.succeeded", intent.to_dict())
            for _ in range(2):
                answer = await http.post(
                    "/v1/webhooks/stripe",
                    content=event,
                    headers={"Stripe-Signature": sign(event, webhook_secret)},
                )
                assert answer.status_code == 200, answer.text
            topup = (await http.get(f"/v1/topups/{created.json()['id']}", headers=auth(keys.read))).json()
            assert (topup["status"], topup["credited_micros"]) == ("succeeded", 5_000_000)
            assert topup["fee_micros"] > 0
            wallet = (await http.get(f"/v1/wallets/{wallet_id}", headers=auth(keys.read))).json()
            assert wallet["balance_micros"] == 5_000_000
    finally:
        stop_server(server)
