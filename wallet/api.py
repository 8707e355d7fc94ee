"""HTTP handlers of wallets: decode, one service call, return a struct."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.params import Parameter
from litestar.types import Scope

from centime.errors import InvalidRequest
from centime.wire import (
    Cursor,
    PathId,
    Problem,
    decode_body,
    json_body,
    parse_cursor,
    problem_response,
    problem_responses,
)
from wallet.holds import Holds
from wallet.owners import OwnerIds
from wallet.schemas import (
    BATCH_BODY_BYTES_MAX,
    CLIENT_KEY_PATTERN,
    IDEMPOTENCY_KEY_CHARS_MAX,
    NO_NUL,
    OWNER_ID_CHARS_MAX,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    BatchResult,
    Capture,
    CaptureHold,
    CreateBatch,
    CreateCredit,
    CreateDebit,
    CreateHold,
    CreateWallet,
    Entry,
    EntryPage,
    Hold,
    Wallet,
    WalletList,
)
from wallet.service import Wallets, parse_hold_id, parse_wallet_id

IDEMPOTENCY_HEADER = "Idempotency-Key"
KEY_DESCRIPTION = "Unique per wallet and request; a retry with the same key and body replays the result."
ENTRY_KEY_DESCRIPTION = f"{KEY_DESCRIPTION} Keys beginning with 'hold:' are reserved for hold captures."
IdempotencyKey = Annotated[
    str,
    Parameter(
        header=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_CHARS_MAX,
        description=KEY_DESCRIPTION,
    ),
]
EntryIdempotencyKey = Annotated[
    str,
    Parameter(
        header=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=IDEMPOTENCY_KEY_CHARS_MAX,
        description=ENTRY_KEY_DESCRIPTION,
        schema_extra={"pattern": CLIENT_KEY_PATTERN},
    ),
]
DebitIdempotencyKey = Annotated[
    str | None,
    Parameter(
        header=IDEMPOTENCY_HEADER,
        required=True,
        description=ENTRY_KEY_DESCRIPTION,
        schema_extra={
            "type": "string",
            "one_of": None,
            "min_length": 1,
            "max_length": IDEMPOTENCY_KEY_CHARS_MAX,
            "pattern": CLIENT_KEY_PATTERN,
        },
    ),
]
"""A debit's key, documented as EntryIdempotencyKey is but passed on as sent
(None if absent): read_debit checks it, for both debit routes."""
REPLAYED = {"Idempotent-Replayed": "true"}
# Every handler that touches wallets takes `owner_ids`, the owners its API key
# sees (None: every owner), provided by the app (centime/app.py) from the key.

HOLD_CONFLICTS = (
    "idempotency_conflict, wallet_frozen, or too_many_holds: the wallet has as many active holds "
    "as CENTIME_HOLDS_PER_WALLET_MAX allows (`holds_per_wallet_max` says how many); capture or "
    "release one, or wait for one to expire"
)


class WalletExistsProblem(Problem, kw_only=True):
    """409 wallet_exists: an owner has one wallet per currency."""

    wallet_id: Annotated[str, msgspec.Meta(description="The owner's existing wallet in this currency.")]


class DebitRequest(msgspec.Struct, frozen=True):
    """A debit request as read: its Idempotency-Key and its decoded body."""

    idempotency_key: str
    body: CreateDebit


def read_debit(idempotency_key: str | None, body: bytes, *, path: str) -> DebitRequest:
    """The one reader of a debit request, for the Litestar handler and the
    plain-ASGI route (centime/fast_debits.py): the Idempotency-Key header
    (the first one sent, None if none; `path` only words its absence), then
    the body. 400 naming the header or the field, worded as Litestar words
    its parameter errors on the other routes."""
    if idempotency_key is None:
        raise InvalidRequest(
            f"Missing required header parameter {IDEMPOTENCY_HEADER!r} for path {path}",
            fields=[IDEMPOTENCY_HEADER],
        )
    if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_CHARS_MAX:
        bound = ">= 1" if not idempotency_key else f"<= {IDEMPOTENCY_KEY_CHARS_MAX}"
        raise InvalidRequest(
            f"{IDEMPOTENCY_HEADER}: Expected `str` of length {bound}", fields=[IDEMPOTENCY_HEADER]
        )
    return DebitRequest(idempotency_key, decode_body(body, CreateDebit))


def _entry_response(entry: Entry, replayed: bool) -> Response[Entry]:
    return Response(entry, status_code=201, headers=REPLAYED if replayed else None)


class WalletController(Controller):
    path = "/v1/wallets"
    tags = ["wallets"]

    @post(
        "/",
        opt={"scope": "admin"},
        summary="Create a wallet",
        operation_class=json_body(CreateWallet),
        responses={
            **problem_responses(400, 401, 403, 413, 503),
            409: problem_response(
                "wallet_exists: the owner has a wallet in this currency; `wallet_id` names it",
                WalletExistsProblem,
            ),
        },
    )
    async def create_wallet(self, body: bytes, wallets: Wallets, owner_ids: OwnerIds) -> Wallet:
        return await wallets.create_wallet(decode_body(body, CreateWallet), owner_ids=owner_ids)

    @get(
        "/",
        opt={"scope": "read"},
        summary="List an owner's wallets",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def list_wallets(
        self,
        wallets: Wallets,
        owner_ids: OwnerIds,
        owner_id: Annotated[str, Parameter(min_length=1, max_length=OWNER_ID_CHARS_MAX, pattern=NO_NUL)],
    ) -> WalletList:
        return WalletList(data=await wallets.list_wallets(owner_id, owner_ids=owner_ids))

    @get(
        "/{wallet_id:str}",
        opt={"scope": "read"},
        summary="Get a wallet",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def get_wallet(self, wallet_id: PathId, wallets: Wallets, owner_ids: OwnerIds) -> Wallet:
        return await wallets.get_wallet(parse_wallet_id(wallet_id), owner_ids=owner_ids)

    @post(
        "/{wallet_id:str}/debits",
        opt={"scope": "debit"},
        summary="Debit a wallet",
        status_code=201,
        responses=problem_responses(400, 401, 402, 403, 404, 409, 413, 503),
        operation_class=json_body(CreateDebit),
    )
    async def create_debit(
        self,
        wallet_id: PathId,
        body: bytes,
        wallets: Wallets,
        owner_ids: OwnerIds,
        scope: Scope,
        idempotency_key: DebitIdempotencyKey = None,
    ) -> Response[Entry]:
        debit = read_debit(idempotency_key, body, path=scope["path"])
        entry, replayed = await wallets.post_entry(
            parse_wallet_id(wallet_id),
            kind="debit",
            amount_micros=debit.body.amount_micros,
            idempotency_key=debit.idempotency_key,
            description=debit.body.description,
            metadata=debit.body.metadata,
            owner_ids=owner_ids,
        )
        return _entry_response(entry, replayed)

    @post(
        "/{wallet_id:str}/credits",
        opt={"scope": "admin"},
        summary="Credit a wallet (grants, adjustments)",
        status_code=201,
        responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 503),
        operation_class=json_body(CreateCredit),
    )
    async def create_credit(
        self,
        wallet_id: PathId,
        body: bytes,
        wallets: Wallets,
        idempotency_key: EntryIdempotencyKey,
        owner_ids: OwnerIds,
    ) -> Response[Entry]:
        data = decode_body(body, CreateCredit)
        entry, replayed = await wallets.post_entry(
            parse_wallet_id(wallet_id),
            kind="credit",
            amount_micros=data.amount_micros,
            idempotency_key=idempotency_key,
            description=data.reason,
            metadata=data.metadata,
            owner_ids=owner_ids,
        )
        return _entry_response(entry, replayed)

    @post(
        "/{wallet_id:str}/holds",
        opt={"scope": "debit"},
        summary="Hold part of a wallet's balance (capture or release it later)",
        status_code=201,
        responses=problem_responses(400, 401, 402, 403, 404, 409, 413, 503, described={409: HOLD_CONFLICTS}),
        operation_class=json_body(CreateHold),
    )
    async def create_hold(
        self,
        wallet_id: PathId,
        body: bytes,
        holds: Holds,
        idempotency_key: IdempotencyKey,
        owner_ids: OwnerIds,
    ) -> Response[Hold]:
        data = decode_body(body, CreateHold)
        hold, replayed = await holds.create_hold(
            parse_wallet_id(wallet_id),
            amount_micros=data.amount_micros,
            expires_in_s=data.expires_in_s,
            idempotency_key=idempotency_key,
            description=data.description,
            metadata=data.metadata,
            owner_ids=owner_ids,
        )
        return Response(hold, status_code=201, headers=REPLAYED if replayed else None)

    @get(
        "/{wallet_id:str}/entries",
        opt={"scope": "read"},
        summary="List a wallet's entries, newest first",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def list_entries(
        self,
        wallet_id: PathId,
        wallets: Wallets,
        owner_ids: OwnerIds,
        limit: Annotated[int, Parameter(ge=1, le=PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT,
        starting_after: Cursor = None,
    ) -> EntryPage:
        cursor = parse_cursor(starting_after, field="starting_after", names="an entry id")
        return await wallets.list_entries(
            parse_wallet_id(wallet_id), limit=limit, starting_after=cursor, owner_ids=owner_ids
        )


class HoldController(Controller):
    path = "/v1/holds"
    tags = ["holds"]

    @get(
        "/{hold_id:str}",
        opt={"scope": "read"},
        summary="Get a hold",
        responses=problem_responses(400, 401, 404, 503),
    )
    async def get_hold(self, hold_id: PathId, holds: Holds, owner_ids: OwnerIds) -> Hold:
        return await holds.get_hold(parse_hold_id(hold_id), owner_ids=owner_ids)

    @post(
        "/{hold_id:str}/capture",
        opt={"scope": "debit"},
        summary="Capture a hold: debit the actual cost, release the rest",
        status_code=200,
        responses=problem_responses(400, 401, 403, 404, 409, 413, 503),
        operation_class=json_body(CaptureHold),
    )
    async def capture(self, hold_id: PathId, body: bytes, holds: Holds, owner_ids: OwnerIds) -> Capture:
        data = decode_body(body, CaptureHold)
        return await holds.capture(
            parse_hold_id(hold_id), amount_micros=data.amount_micros, owner_ids=owner_ids
        )

    @post(
        "/{hold_id:str}/release",
        opt={"scope": "debit"},
        summary="Release a hold",
        status_code=200,
        responses=problem_responses(400, 401, 403, 404, 409, 503),
    )
    async def release(self, hold_id: PathId, holds: Holds, owner_ids: OwnerIds) -> Hold:
        return await holds.release(parse_hold_id(hold_id), owner_ids=owner_ids)


class DebitBatchController(Controller):
    path = "/v1/debits"
    tags = ["wallets"]

    @post(
        "/batch",
        opt={"scope": "debit"},
        summary="Debit many wallets in one request, each debit on its own",
        status_code=200,
        responses=problem_responses(400, 401, 403, 409, 413, 503),
        operation_class=json_body(CreateBatch),
        request_max_body_size=BATCH_BODY_BYTES_MAX,
    )
    async def create_batch(
        self, body: bytes, wallets: Wallets, idempotency_key: IdempotencyKey, owner_ids: OwnerIds
    ) -> BatchResult:
        batch = decode_batch(body)
        return BatchResult(
            results=await wallets.post_batch(batch, idempotency_key=idempotency_key, owner_ids=owner_ids)
        )


_BATCH_DECODER = msgspec.json.Decoder(CreateBatch)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED = re.compile(r"(?:unknown|required) field `([^`]*)`")


def decode_batch(body: bytes) -> CreateBatch:
    """decode_body, with `fields` naming the offending member where it is
    (`debits[3].amount_micros`), not only `debits`: one item of up to
    1,000 is wrong, and the client must find which."""
    try:
        return decode_body(body, CreateBatch)
    except InvalidRequest as refused:
        try:
            _BATCH_DECODER.decode(body)
        except msgspec.ValidationError as exc:
            message = str(exc)
            at = _AT.search(message)
            place = at[1] if at else ""
            named = _NAMED.search(message)
            if named:
                place = f"{place}.{named[1]}" if place else named[1]
            if place:
                detail = refused.detail.split(": ", 1)[-1]
                raise InvalidRequest(f"{place}: {detail}", fields=[place]) from None
        except msgspec.DecodeError:
            pass
        raise
