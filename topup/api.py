"""HTTP handlers of top-ups, the Stripe webhook and the checkout page:
decode, one service call, return a struct (or the page)."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.openapi.spec import OpenAPI, RequestBody, Schema, SecurityScheme
from litestar.params import Parameter

from centime.settings import Settings
from centime.wire import Cursor, PathId, decode_body, json_body, parse_cursor, problem_responses
from ledger.ids import parse_uuid
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
from wallet.owners import OwnerIds
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
    parsed = parse_uuid(raw)
    if parsed is None:
        raise TopUpNotFound(f"no top-up {raw!r}")
    return parsed


STRIPE_SIGNATURE_SCHEME = "stripeSignature"
STRIPE_SIGNATURE_SECURITY = SecurityScheme(
    type="apiKey",
    name="Stripe-Signature",
    security_scheme_in="header",
    description="Stripe signs each webhook delivery with the endpoint's secret "
    "(CENTIME_STRIPE_WEBHOOK_SECRET); one that does not verify is answered 401 webhook_signature_invalid.",
)


class TopUpController(Controller):
    path = "/v1"
    tags = ["top-ups"]

    @post(
        "/wallets/{wallet_id:str}/topups",
        opt={"scope": "debit"},
        summary="Start a top-up: a Stripe PaymentIntent to pay on the checkout page",
        status_code=201,
        responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503),
        operation_class=json_body(CreateTopUp),
    )
    async def create_topup(
        self,
        wallet_id: PathId,
        body: bytes,
        topups: TopUps,
        owner_ids: OwnerIds,
        idempotency_key: OptionalIdempotencyKey = None,
    ) -> Response[TopUp]:
        data = decode_body(body, CreateTopUp)
        topup, replayed = await topups.create_topup(
            parse_wallet_id(wallet_id), data, idempotency_key, owner_ids=owner_ids
        )
        return Response(topup, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @get(
        "/topups/{topup_id:str}",
        opt={"scope": "read"},
        summary="Get a top-up",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def get_topup(self, topup_id: PathId, topups: TopUps, owner_ids: OwnerIds) -> TopUp:
        return await topups.get_topup(parse_topup_id(topup_id), owner_ids=owner_ids)

    @get(
        "/wallets/{wallet_id:str}/topups",
        opt={"scope": "read"},
        summary="List a wallet's top-ups, newest first",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def list_topups(
        self,
        wallet_id: PathId,
        topups: TopUps,
        owner_ids: OwnerIds,
        limit: Annotated[int, Parameter(ge=1, le=PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT,
        starting_after: Cursor = None,
    ) -> TopUpPage:
        return await topups.list_topups(
            parse_wallet_id(wallet_id),
            limit=limit,
            starting_after=parse_cursor(starting_after, field="starting_after", names="a top-up id"),
            owner_ids=owner_ids,
        )

    @post(
        "/webhooks/stripe",
        # Stripe sends no API key: the signature (checked by the service) is the credential.
        opt={"scope": "public"},
        summary="Stripe webhook endpoint (signed by Stripe; no API key)",
        status_code=200,
        responses=problem_responses(400, 401, 413, 503),
        security=[{STRIPE_SIGNATURE_SCHEME: []}],
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
        topup_id: PathId,
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
    async def checkout_status(self, topup_id: PathId, topups: TopUps) -> Response[CheckoutStatus]:
        status = await topups.checkout_status(parse_topup_id(topup_id))
        return Response(status, headers={"Cache-Control": "no-store"})


TOPUPS_PATH = "/v1/wallets/{wallet_id}/topups"


def state_topup_bounds(openapi: OpenAPI, settings: Settings) -> None:
    """The OpenAPI of a top-up's amount states the configured bounds
    (CENTIME_TOPUP_MIN_MICROS, CENTIME_TOPUP_MAX_MICROS), which the schema
    of CreateTopUp cannot know before the settings are read."""
    operation = openapi.paths[TOPUPS_PATH].post  # type: ignore[index]
    assert operation is not None and isinstance(operation.request_body, RequestBody)
    schema = operation.request_body.content["application/json"].schema
    assert isinstance(schema, Schema) and schema.properties is not None
    amount = schema.properties["amount_micros"]
    assert isinstance(amount, Schema)
    amount.minimum = settings.topup_min_micros
    amount.maximum = settings.topup_max_micros
    amount.description = (
        f"{settings.topup_min_micros} to {settings.topup_max_micros} micros, in whole minor units of the "
        "wallet's currency (multiples of 10000 micros for usd); an amount the currency cannot pay is "
        "answered 422 amount_not_payable."
    )
