"""Helpers for tests that talk to Stripe: start the fake (tests/fake_stripe.py), sign and build
webhook events and disputes, and a Stripe client pointed at the fake.

Notes on the fake (localstripe underneath), for test writers:

- Payment methods: ``pm_card_visa`` succeeds; ``pm_card_chargeCustomerFail`` is declined at
  confirm (402, ``stripe.CardError`` with code ``card_declined``; the intent goes back to
  ``requires_payment_method`` and ``payment_intent.payment_failed`` is sent);
  ``pm_card_visa_chargeDeclined`` cannot even be attached, but confirms fine.
- localstripe cannot confirm with a ``payment_method`` parameter: use :func:`pay`.
- Webhooks are sent about 1 s after the event, signed with the registered secret.
- Disputes do not exist in localstripe: build them with :func:`make_dispute`, wrap them with
  :func:`make_event`, sign them with :func:`sign` and post them to the service yourself;
  :meth:`FakeStripe.put_dispute` makes the fake answer ``GET /v1/disputes/{id}`` with one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

ROOT = Path(__file__).resolve().parent.parent
READY_PREFIX = "fake stripe listening on"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
API_KEY = "sk_test_centime"


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class FakeStripe:
    """A running fake Stripe process. Use as a context manager or call :meth:`stop`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, fee_bps: int, fee_fixed_minor: int):
        self.process = process
        self.port = port
        self.fee_bps = fee_bps
        self.fee_fixed_minor = fee_fixed_minor

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fee(self, amount_minor: int) -> int:
        """The fee the fake charges on a charge of ``amount_minor`` (same rule as the fake)."""
        if self.fee_bps == 0 and self.fee_fixed_minor == 0:
            return 0
        return (abs(amount_minor) * self.fee_bps + 5_000) // 10_000 + self.fee_fixed_minor

    def reset(self) -> None:
        """Forget every object and idempotency key (webhook registrations stay)."""
        httpx.delete(f"{self.base_url}/_config/data", timeout=5).raise_for_status()
        httpx.delete(f"{self.base_url}/_config/disputes", timeout=5).raise_for_status()

    def set_outage(self, mode: str, *, path_prefix: str = "/v1/", status: int = 500) -> None:
        """Makes requests under ``path_prefix`` fail until ``set_outage("off")``: ``drop`` (cut
        before handling: unreachable), ``lose_answer`` (handled, then cut) or ``error``
        (answered ``status``). The fake's own webhook deliveries are unaffected."""
        body = {"mode": mode, "path_prefix": path_prefix, "status": status}
        httpx.post(f"{self.base_url}/_config/outage", json=body, timeout=5).raise_for_status()

    @contextlib.contextmanager
    def outage(self, mode: str, *, path_prefix: str = "/v1/", status: int = 500) -> Iterator[None]:
        """:meth:`set_outage` for the duration of a block, then off again."""
        self.set_outage(mode, path_prefix=path_prefix, status=status)
        try:
            yield
        finally:
            self.set_outage("off")

    def put_dispute(self, dispute: dict[str, Any]) -> None:
        """Makes Stripe know ``dispute`` (from :func:`make_dispute`): ``GET /v1/disputes/{id}``."""
        httpx.post(f"{self.base_url}/_config/disputes", json=dispute, timeout=5).raise_for_status()

    def add_balance_transaction(self, **fields: Any) -> dict[str, Any]:
        """Adds a balance transaction of any type (default ``adjustment``): fields ``amount``,
        ``currency`` (required), ``type``, ``reporting_category``, ``source``, ``fee``,
        ``fee_details``, ``description``, ``created``, ``available_on``, ``status``."""
        response = httpx.post(f"{self.base_url}/_config/balance_transactions", json=fields, timeout=5)
        response.raise_for_status()
        return response.json()

    def set_fee(
        self, transaction_id: str, fee: int | None = None, *, created: int | None = None
    ) -> dict[str, Any]:
        """Changes a balance transaction's fee, as if Stripe settled it after a webhook read it,
        and/or its creation time (a transaction of another day)."""
        body = {key: value for key, value in (("fee", fee), ("created", created)) if value is not None}
        response = httpx.post(f"{self.base_url}/_config/balance_transactions/{transaction_id}", json=body)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        """Terminate, then kill if it has not exited within a bound. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> FakeStripe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(process: subprocess.Popen[bytes], deadline: float) -> int:
    """Reads the ready line (bounded by ``deadline``) and returns the port it names."""
    assert process.stdout is not None
    buffered = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake stripe did not start within {START_TIMEOUT_S} s")
            if selector.select(timeout=min(remaining, 0.2)):
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    process.wait(timeout=STOP_TIMEOUT_S)
                    raise RuntimeError(f"fake stripe exited with {process.returncode} before it was ready")
                buffered += chunk
            elif process.poll() is not None:
                raise RuntimeError(f"fake stripe exited with {process.returncode} before it was ready")
    line = buffered.split(b"\n", 1)[0].decode()
    if not line.startswith(READY_PREFIX):
        raise RuntimeError(f"unexpected first line from fake stripe: {line!r}")
    return int(line.rsplit(":", 1)[1])


def start_fake_stripe(port: int | None = None, fee_bps: int = 0, fee_fixed_minor: int = 0) -> FakeStripe:
    """Starts ``python -m tests.fake_stripe`` and waits (at most ~15 s) until it serves.

    Without ``port`` the fake binds port 0 and reports the port it got, so there is no race
    for a free port. Its stderr goes to ours (pytest captures it)."""
    command = [sys.executable, "-m", "tests.fake_stripe", "--port", str(port or 0)]
    command += ["--fee-percent-bps", str(fee_bps), "--fee-fixed-minor", str(fee_fixed_minor)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    fake = FakeStripe(process, port or 0, fee_bps, fee_fixed_minor)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        fake.port = _wait_ready(process, deadline)
        while not _answers(fake.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake stripe port {fake.port} did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.05)
    except BaseException:
        fake.stop()
        raise
    return fake


def fake_stripe_fixture(*, scope: Any = "session", fee_bps: int = 0, fee_fixed_minor: int = 0) -> Any:
    """A pytest fixture factory: ``fake_stripe = fake_stripe_fixture(fee_bps=290, fee_fixed_minor=30)``
    at module level gives tests a running :class:`FakeStripe`."""

    @pytest.fixture(scope=scope)
    def _fake_stripe() -> Iterator[FakeStripe]:
        with start_fake_stripe(fee_bps=fee_bps, fee_fixed_minor=fee_fixed_minor) as fake:
            yield fake

    return _fake_stripe


def register_webhook(
    base_url: str, url: str, secret: str, events: list[str] | None = None, webhook_id: str | None = None
) -> str:
    """Tells the fake to post events (all, or only ``events``) to ``url``, signed with ``secret``.
    Registering again under the same ``webhook_id`` replaces it. Returns the id."""
    webhook_id = webhook_id or "wh_" + secrets.token_hex(6)
    form: dict[str, Any] = {"url": url, "secret": secret}
    if events is not None:
        form["events[]"] = list(events)
    response = httpx.post(f"{base_url}/_config/webhooks/{webhook_id}", data=form, timeout=5)
    response.raise_for_status()
    return webhook_id


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``: ``t=<ts>,v1=<hex HMAC-SHA256>``."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def make_event(
    event_type: str, obj: dict[str, Any], *, event_id: str | None = None, created: int | None = None
) -> bytes:
    """A webhook event body in Stripe's shape, as JSON bytes."""
    event = {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "api_version": stripe.api_version,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    return json.dumps(event).encode()


def make_dispute(
    charge: dict[str, Any] | str,
    amount_minor: int,
    currency: str,
    status: str = "needs_response",
    dispute_id: str | None = None,
    payment_intent: str | None = None,
) -> dict[str, Any]:
    """A dispute object in Stripe's shape. ``charge`` is a charge id or object; from an object
    the payment intent is taken unless given."""
    if isinstance(charge, dict):
        charge_id = charge["id"]
        payment_intent = payment_intent or charge.get("payment_intent")
    else:
        charge_id = charge
    created = int(time.time())
    return {
        "id": dispute_id or "dp_" + secrets.token_hex(12),
        "object": "dispute",
        "amount": amount_minor,
        "balance_transactions": [],
        "charge": charge_id,
        "created": created,
        "currency": currency,
        "evidence_details": {
            "due_by": created + 7 * 86_400,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": status,
    }


def stripe_client(base_url: str) -> stripe.StripeClient:
    """A Stripe client for the fake: async methods (``*_async``) and sync ones both work, no retries."""
    return stripe.StripeClient(
        API_KEY,
        base_addresses={"api": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
        max_network_retries=0,
    )


async def pay(
    client: stripe.StripeClient, payment_intent_id: str, payment_method: str = "pm_card_visa"
) -> Any:
    """Attaches ``payment_method`` to the intent, then confirms it; returns the confirmed intent.

    localstripe rejects ``confirm(payment_method=...)`` (500 Not implemented), hence two calls.
    ``pm_card_chargeCustomerFail`` makes the confirm raise ``stripe.CardError`` (card_declined)."""
    await client.v1.payment_intents.update_async(payment_intent_id, params={"payment_method": payment_method})
    return await client.v1.payment_intents.confirm_async(payment_intent_id)
