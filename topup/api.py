"""HTTP handlers of top-ups, the Stripe webhook and the checkout page:
decode, one service call, return a struct (or the page)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.params import Parameter

from centime.wire import decode_body, json_body, parse_cursor, problem_responses
from topup.checkout import render
from topup.errors import TopUpNotFound, WebhookSignatureInvalid
from topup.schemas import (
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    CheckoutStatus,
    CreateTopUp,
    TopUp,
    TopUpPage,
    WebhookAnswer,
)
from topup.service import TopUps
from wallet.schemas import IDEMPOTENCY_KEY_CHARS_MAX
from wallet.service import parse_wallet_id

log = logging.getLogger(__name__)

WEBHOOK_BODY_BYTES_MAX = 1024 * 1024
"""Stripe events are a few KB; a PaymentIntent with expansions stays far below this."""

OptionalIdempotencyKey = Annotated[
    str | None,
    Parameter(
        header="Idempotency-Key",
        required=False,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_CHARS_MAX,
        description="Optional. A retry with the same key and amount returns the same top-up.",
    ),
]


def parse_topup_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise TopUpNotFound(f"no top-up {raw!r}") from None


class TopUpController(Controller):
    path = "/v1"
    tags = ["top-ups"]

    @post(
        "/wallets/{wallet_id:str}/topups",
        opt={"scope": "debit"},
        summary="Start a top-up: a Stripe PaymentIntent to pay on the checkout page",
        status_code=201,
        responses=problem_responses(400, 401, 403, 404, 409, 502, 503),
        operation_class=json_body(CreateTopUp),
    )
    async def create_topup(
        self, wallet_id: str, body: bytes, topups: TopUps, idempotency_key: OptionalIdempotencyKey = None
    ) -> Response[TopUp]:
        data = decode_body(body, CreateTopUp)
        topup, replayed = await topups.create_topup(parse_wallet_id(wallet_id), data, idempotency_key)
        return Response(topup, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @get(
        "/topups/{topup_id:str}",
        opt={"scope": "read"},
        summary="Get a top-up",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def get_topup(self, topup_id: str, topups: TopUps) -> TopUp:
        return await topups.get_topup(parse_topup_id(topup_id))

    @get(
        "/wallets/{wallet_id:str}/topups",
        opt={"scope": "read"},
        summary="List a wallet's top-ups, newest first",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def list_topups(
        self,
        wallet_id: str,
        topups: TopUps,
        limit: Annotated[int, Parameter(ge=1, le=PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT,
        starting_after: str | None = None,
    ) -> TopUpPage:
        return await topups.list_topups(
            parse_wallet_id(wallet_id),
            limit=limit,
            starting_after=parse_cursor(starting_after, field="starting_after", names="a top-up id"),
        )

    @post(
        "/webhooks/stripe",
        summary="Stripe webhook endpoint (signed by Stripe; no API key)",
        status_code=200,
        responses=problem_responses(400, 503),
        request_max_body_size=WEBHOOK_BODY_BYTES_MAX,
    )
    async def stripe_webhook(self, request: Request, body: bytes, topups: TopUps) -> WebhookAnswer:
        try:
            return await topups.handle_webhook(body, request.headers.get("stripe-signature"))
        except WebhookSignatureInvalid as exc:
            client = request.client.host if request.client else "?"
            log.warning("refused a Stripe webhook from %s: %s", client, exc.detail)
            raise


class CheckoutController(Controller):
    """Public pages for the paying customer: the top-up id is the capability."""

    path = "/checkout"
    tags = ["checkout"]
    include_in_schema = False

    @get("/{topup_id:str}", media_type=MediaType.HTML)
    async def checkout_page(
        self,
        topup_id: str,
        topups: TopUps,
        returned: str | None = None,
        redirect_status: str | None = None,
    ) -> Response[str]:
        row = await topups.checkout(parse_topup_id(topup_id))
        settings = topups.settings
        page, headers = render(
            row,
            publishable_key=settings.stripe_publishable_key,
            stripe_js_url=settings.stripe_js_url,
            returned=returned is not None or redirect_status is not None,
        )
        return Response(page, media_type=MediaType.HTML, headers=headers)

    @get("/{topup_id:str}/status")
    async def checkout_status(self, topup_id: str, topups: TopUps) -> Response[CheckoutStatus]:
        status = await topups.checkout_status(parse_topup_id(topup_id))
        return Response(status, headers={"Cache-Control": "no-store"})
