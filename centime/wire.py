"""Strict JSON request bodies, and their OpenAPI description.

Litestar converts `data:` arguments leniently ("1" and 1.0 become 1). Money
must not be guessed at, so request bodies are decoded here, strictly, by
decoders built once per struct. A failure names the offending field."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, TypeVar

import asyncpg
import msgspec
import redis.asyncio as redis
import redis.exceptions as redis_exceptions
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema

from centime import metrics
from centime.errors import CentimeError, InvalidRequest
from centime.logs import request_id_var

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
            headers["WWW-Authenticate"] = 'Bearer realm="centime"'
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


def parse_cursor(raw: str | None, *, field: str, names: str) -> uuid.UUID | None:
    """A paging cursor (the id of the last item seen), or None; 400 naming
    the field when it is not an id."""
    if raw is None:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidRequest(f"{field}: not {names}", fields=[field]) from None


def decode_body(body: bytes, struct: type[T]) -> T:
    decoder = _decoders.get(struct)
    if decoder is None:
        decoder = _decoders[struct] = msgspec.json.Decoder(struct)
    if not body.strip():
        raise InvalidRequest("body: empty; send a JSON object", fields=["body"])
    try:
        return decoder.decode(body)
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


def _openapi_schema(struct: type) -> Schema:
    (_, schema_by_name) = msgspec.json.schema_components([struct], ref_template="#/components/schemas/{name}")
    definition: dict[str, Any] = schema_by_name[struct.__name__]
    properties = {
        name: Schema(**{k: v for k, v in _schema_fields(spec).items()})
        for name, spec in definition["properties"].items()
    }
    return Schema(
        type="object",
        title=definition.get("title"),
        properties=properties,
        required=definition.get("required", []),
        additional_properties=False,
    )


def _schema_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """Map a JSON-schema property to litestar Schema keyword arguments."""
    mapping = {
        "type": "type",
        "minimum": "minimum",
        "maximum": "maximum",
        "minLength": "min_length",
        "maxLength": "max_length",
        "pattern": "pattern",
        "description": "description",
        "maxProperties": "max_properties",
        "default": "default",
        "examples": "examples",
    }
    fields = {mapping[k]: v for k, v in spec.items() if k in mapping}
    if "anyOf" in spec:
        fields["one_of"] = [Schema(**_schema_fields(option)) for option in spec["anyOf"]]
    if "additionalProperties" in spec and isinstance(spec["additionalProperties"], dict):
        fields["additional_properties"] = Schema(**_schema_fields(spec["additionalProperties"]))
    return fields


def json_body(struct: type) -> type[Operation]:
    """An OpenAPI operation class documenting `struct` as the JSON body."""
    body = RequestBody(
        content={"application/json": OpenAPIMediaType(schema=_openapi_schema(struct))}, required=True
    )

    @dataclass
    class WithJsonBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return WithJsonBody


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details, as every error is answered. Some codes add
    members: `balance_micros` (insufficient_funds), `fields` (invalid_request),
    `wallet_id` (wallet_exists), `request_id` (5xx: the id in the server's log)."""

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
    401: "unauthorized: no API key, or an unknown one",
    402: "insufficient_funds: the balance (less what holds reserve) and overdraft limit cannot cover it; "
    "`balance_micros` says what is there",
    403: "forbidden: the key's scope does not cover this route",
    404: "wallet_not_found, hold_not_found or topup_not_found",
    409: "wallet_exists, idempotency_conflict, request_in_progress, idempotency_key_reversed, wallet_frozen, "
    "hold_not_held (captured, released or expired) or capture_reversed",
    413: "payload_too_large: the body is over the route's limit",
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


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problems a route can answer."""
    return {status: problem_response(PROBLEM_DESCRIPTIONS[status]) for status in statuses}
