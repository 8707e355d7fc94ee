"""Strict JSON request bodies, and their OpenAPI description.

Litestar converts `data:` arguments leniently ("1" and 1.0 become 1). Money
must not be guessed at, so request bodies are decoded here, strictly, by
decoders built once per struct. A failure names the offending field."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
from typing import Annotated, Any, NamedTuple, TypeVar
from urllib.parse import unquote_to_bytes

import asyncpg
import msgspec
import redis.asyncio as redis
import redis.exceptions as redis_exceptions
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.params import Parameter

from centime import metrics
from centime.errors import CentimeError, InvalidRequest, invariant
from centime.logs import request_id_var
from ledger.ids import UUID_PATTERN, parse_uuid

T = TypeVar("T")
STORAGE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    redis.RedisError,
)
"""What Postgres and Redis raise. Only some of it means "not reachable or
not in time" (storage_unavailable); the rest is a bug."""
UNAVAILABLE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08: the connection failed or was lost
    asyncpg.exceptions.OperatorInterventionError,  # 57: statement timeout, shutdown, not yet accepting
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, out of disk or memory
    asyncpg.exceptions.TransactionRollbackError,  # 40: serialization failure, deadlock: retryable
    asyncpg.exceptions.LockNotAvailableError,  # 55P03: lock_timeout
    redis.ConnectionError,  # includes BusyLoadingError (Redis is loading its data)
    redis.TimeoutError,
    redis_exceptions.ReadOnlyError,  # a replica during failover
)
_CLOSED_INTERFACE = ("connection is closed", "pool is closing", "pool is closed")
STORAGE_DOWN_DETAIL = "storage did not answer in time; nothing was charged"
INTERNAL_ERROR_DETAIL = "an internal error occurred; it was logged"


def storage_unavailable(exc: BaseException) -> bool:
    """Postgres or Redis could not be reached or did not answer in time: a
    503 that a retry may cure. A constraint, data or script error from them
    is not: it is a bug, answered 500 (problem_answer)."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and str(exc).startswith(_CLOSED_INTERFACE)


REQUEST_BODY_BYTES_MAX = 64 * 1024


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem: the stable `code` says what went wrong. A 5xx
    names the request's id, the one its log lines carry."""
    body = {
        "type": f"https://centime.dev/problems/{code}",
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    body.update(extra)
    request_id = request_id_var.get()
    if status >= 500 and request_id is not None:
        body["request_id"] = request_id
    return body


class ProblemAnswer(NamedTuple):
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


_log = logging.getLogger("centime")


def problem_answer(exc: Exception) -> ProblemAnswer:
    """The answer to an error a handler raised, logged and counted: a
    CentimeError as it says, Postgres or Redis not answering 503 (the debit
    path settles its own storage errors before answering), anything else,
    Postgres refusing a statement included, 500, logged with its traceback."""
    headers: dict[str, str] = {}
    if isinstance(exc, CentimeError):
        if exc.status >= 500:
            _log.warning("%s: %s", exc.code, exc.detail, exc_info=exc.__cause__ is not None)
        if exc.status == 401:
            headers["WWW-Authenticate"] = exc.challenge
        status, code, title, detail, extra = exc.status, exc.code, exc.title, exc.detail, exc.extra
    elif storage_unavailable(exc):
        _log.warning("storage unavailable: %r", exc)
        status, code, title, detail, extra = (
            503,
            "unavailable",
            "Service unavailable",
            STORAGE_DOWN_DETAIL,
            {},
        )
    else:
        _log.error("unhandled error", exc_info=exc)
        status, code, title, detail, extra = (
            500,
            "internal_error",
            "Internal error",
            INTERNAL_ERROR_DETAIL,
            {},
        )
    metrics.errors_total.labels(code).inc()
    return ProblemAnswer(status, problem_body(status, code, title, detail, **extra), headers)


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_decoders: dict[type, msgspec.json.Decoder] = {}


UUID_SCHEMA = {"format": "uuid", "pattern": UUID_PATTERN}
PathId = Annotated[
    str,
    Parameter(
        description="A UUID (8-4-4-4-12 hex); any other text names nothing and is answered 404.",
        schema_extra=UUID_SCHEMA,
    ),
]
Cursor = Annotated[
    str | None,
    Parameter(
        required=False,
        description="The id of the last item of the previous page (a UUID); the page starts after it.",
        schema_extra={"type": "string", "one_of": None, **UUID_SCHEMA},
    ),
]


def parse_cursor(raw: str | None, *, field: str, names: str) -> uuid.UUID | None:
    """A paging cursor (the id of the last item seen), or None; 400 naming
    the field when it is not an id."""
    if raw is None:
        return None
    parsed = parse_uuid(raw)
    if parsed is None:
        raise InvalidRequest(f"{field}: not {names}", fields=[field])
    return parsed


def decode_body(body: bytes, struct: type[T]) -> T:
    """A request body, decoded strictly into `struct`: valid UTF-8, no
    unknown field, no key twice in one object. 400 naming the field otherwise."""
    decoder = _decoders.get(struct)
    if decoder is None:
        decoder = _decoders[struct] = msgspec.json.Decoder(struct)
    if not body.strip():
        raise InvalidRequest("body: empty; send a JSON object", fields=["body"])
    try:
        decoded = decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.search(message)
        path = _PATH.search(message)
        field = unknown[1] if unknown else (path[1] if path and path[1] else "body")
        reason = _PATH.sub("", message).replace("matching regex '^[^\\\\x00]*$'", "without NUL characters")
        top_level = re.split(r"[.\[]", field, maxsplit=1)[0]
        raise InvalidRequest(f"{field}: {reason}", fields=[top_level]) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"body: malformed JSON ({exc})", fields=["body"]) from None
    except UnicodeDecodeError:
        # msgspec raises it (not a DecodeError) for bytes in a string that are not UTF-8.
        raise InvalidRequest("body: not valid UTF-8", fields=["body"]) from None
    if has_duplicate_keys(body):
        raise InvalidRequest(f"body: {_duplicate_key(body)!r} appears twice in one object", fields=["body"])
    return decoded


# Duplicate keys. msgspec keeps the last of a repeated key, so
# {"amount_micros": 1, "amount_micros": 2} would charge 2 where a proxy or
# log that keeps the first reads 1. Decoding a valid body once more into
# plain dicts collapses repeated keys: it has duplicates exactly when its
# dicts hold fewer keys than the text names. Each key is followed by one
# colon and no other colon stands outside a string, so when the body's
# colons equal the dicts' keys the text names no more keys (the common case,
# one bytes.count). Otherwise the colons inside strings are subtracted
# (exact when the body has no backslash, so no escape), or, with escapes,
# the key tokens are counted by a regular expression.
# Measured (timeit, min of 9 runs, the shared 2-core VM, so ranges): on
# `{"amount_micros": 1000, "description": "x"}` the typed decode takes
# 0.8-1.0 us and this check 1.0-1.6 us more (2.4-3.9 us with a colon in a
# string); json.loads with an object_pairs_hook, the obvious alternative,
# 5.8-7.8 us. So under 1% of the server's 180-250 us of CPU per debit
# (docs/performance.md). A batch of 1,000 debits: about 1.5 ms, as long as
# its typed decode.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?')
"""Every JSON string, left to right (so no match starts inside one); group 1 is set on keys."""
_generic_decoder = msgspec.json.Decoder()


def has_duplicate_keys(body: bytes) -> bool:
    """Whether an object of `body` (valid JSON, already decoded into its
    request struct, so no deeper than the struct) names a key twice."""
    value = _generic_decoder.decode(body)
    keys = _key_count(value)
    colons = body.count(b":")
    if colons == keys:
        return False
    if b"\\" not in body:
        return colons - _colons_in_strings(value) != keys
    return sum(1 for token in _JSON_STRING.finditer(body) if token[1]) != keys


def _key_count(value: Any) -> int:
    """The keys of every object in a decoded JSON value (loops, not generators: cheaper)."""
    count = 0
    if isinstance(value, dict):
        count = len(value)
        for item in value.values():
            if isinstance(item, dict | list):
                count += _key_count(item)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                count += _key_count(item)
    return count


def _colons_in_strings(value: Any) -> int:
    """The colons inside the strings (keys too) of a decoded JSON value."""
    if isinstance(value, str):
        return value.count(":")
    count = 0
    if isinstance(value, dict):
        for key, item in value.items():
            count += key.count(":") + _colons_in_strings(item)
    elif isinstance(value, list):
        for item in value:
            count += _colons_in_strings(item)
    return count


def _duplicate_key(body: bytes) -> str:
    """The first key named twice in one object (only when there is one: slow)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(items)

    json.loads(body, object_pairs_hook=pairs)
    return found[0] if found else "a key"


def check_query(query_string: bytes) -> None:
    """400 naming the first query parameter whose name or value, percent-
    decoded, is not UTF-8 or holds a NUL: Litestar would pass on U+FFFD for
    the one, and Postgres text refuses the other. For every route, before
    any storage is touched. Its pairs are bounded by the server's request
    line limit."""
    if query_string.isascii() and b"%" not in query_string and b"\x00" not in query_string:
        return
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        raw_name = unquote_to_bytes(name.replace(b"+", b" "))
        raw_value = unquote_to_bytes(value.replace(b"+", b" "))
        shown = raw_name.decode(errors="backslashreplace")
        try:
            raw_name.decode()
            raw_value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"{shown}: not UTF-8 once percent-decoded", fields=[shown]) from None
        if b"\x00" in raw_name or b"\x00" in raw_value:
            raise InvalidRequest(f"{shown}: holds a NUL character", fields=[shown])


_SCHEMA_FIELD_BY_KEYWORD = {
    field.metadata.get("alias", field.name): field.name
    for field in dataclasses.fields(Schema)
    if field.name != "data_container"
}
"""JSON Schema keyword -> litestar Schema field (`maxLength` -> `max_length`)."""
_SUBSCHEMA_KEYWORDS = {"items", "not", "propertyNames", "additionalProperties", "contains"}
_SUBSCHEMA_LIST_KEYWORDS = {"anyOf", "oneOf", "allOf", "prefixItems"}
_SCHEMA_DEPTH_MAX = 16
"""Request structs nest two deep (a batch, its debits, their metadata)."""


def openapi_schema(struct: type) -> Schema:
    """`struct`'s JSON schema as msgspec enforces it, every keyword kept and
    nested structs inlined: a request body is decoded by msgspec, so its
    schema must say exactly what msgspec takes."""
    (root,), components = msgspec.json.schema_components([struct], ref_template="{name}")
    return _to_schema(root, components, depth=0)


def _to_schema(spec: dict[str, Any], components: dict[str, Any], *, depth: int) -> Schema:
    invariant(depth < _SCHEMA_DEPTH_MAX, f"request schema nests deeper than {_SCHEMA_DEPTH_MAX}")
    if "$ref" in spec:
        spec = {**components[spec["$ref"]], **{k: v for k, v in spec.items() if k != "$ref"}}

    def sub(value: Any) -> Any:
        return _to_schema(value, components, depth=depth + 1) if isinstance(value, dict) else value

    fields: dict[str, Any] = {}
    for keyword, value in spec.items():
        if keyword == "properties":
            converted: Any = {name: sub(option) for name, option in value.items()}
        elif keyword in _SUBSCHEMA_KEYWORDS:
            converted = sub(value)
        elif keyword in _SUBSCHEMA_LIST_KEYWORDS:
            converted = [sub(option) for option in value]
        else:
            converted = value
        fields[_SCHEMA_FIELD_BY_KEYWORD[keyword]] = converted
    return Schema(**fields)


def json_body(struct: type) -> type[Operation]:
    """An OpenAPI operation class documenting `struct` as the JSON body."""
    body = RequestBody(
        content={"application/json": OpenAPIMediaType(schema=openapi_schema(struct))}, required=True
    )

    @dataclasses.dataclass
    class WithJsonBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return WithJsonBody


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details, as every error is answered. Some codes add
    members: `balance_micros` (insufficient_funds), `fields` (invalid_request),
    `holds_per_wallet_max` (too_many_holds), `wallet_id` (wallet_exists), `request_id`
    (5xx: the id in the server's log)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: (
        Annotated[
            str,
            msgspec.Meta(description="On a 5xx: the request's id (X-Request-Id), as the server logged it."),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


PROBLEM_DESCRIPTIONS = {
    400: "invalid_request: the body, a header or a parameter is wrong; `fields` names it",
    401: "unauthorized: no API key, a malformed one (keys are `ck_` and 43 URL-safe characters), "
    "or an unknown or revoked one (webhook_signature_invalid on the Stripe webhook)",
    402: "insufficient_funds: the balance (less what holds reserve) and overdraft limit cannot cover it; "
    "`balance_micros` says what is there",
    403: "forbidden: the key's scope does not cover this route; or the key names owners and the "
    "route creates a wallet for another owner, or shows every owner's data",
    404: "wallet_not_found, hold_not_found or topup_not_found; for a key that names owners, also "
    "another owner's wallet, hold or top-up, with the same body as a missing one",
    409: "wallet_exists, idempotency_conflict, request_in_progress, idempotency_key_reversed, wallet_frozen, "
    "hold_not_held (captured, released or expired) or capture_reversed",
    413: "payload_too_large: the body is over the route's limit",
    422: "balance_too_large (a credit the balance cannot take) or amount_not_payable (a top-up the wallet's "
    "currency cannot pay: not whole minor units, or below Stripe's minimum)",
    502: "stripe_refused: Stripe refused a request centime made (a configuration problem, logged)",
    503: "unavailable (storage did not answer in time; nothing was charged), stripe_unavailable or topups_disabled",
}


def problem_response(description: str, container: type[Problem] = Problem) -> ResponseSpec:
    """The OpenAPI entry of one problem answer."""
    return ResponseSpec(
        data_container=container,
        description=description,
        media_type="application/problem+json",
        generate_examples=False,
    )


def problem_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problems a route can answer; `described`
    replaces the shared description of a status where the route's own is
    more precise."""
    descriptions = {**PROBLEM_DESCRIPTIONS, **(described or {})}
    return {status: problem_response(descriptions[status]) for status in statuses}
