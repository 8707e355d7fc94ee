"""The one error type. Each subclass carries its HTTP status and stable code;
one handler in the face renders it as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any, ClassVar


class CentimeError(Exception):
    """Base of every error a client may see. `code` is stable and documented."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"
    challenge: ClassVar[str] = 'Bearer realm="centime"'
    """A 401's WWW-Authenticate: how to authenticate (RFC 9110 11.6.1)."""

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(CentimeError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"


class Unauthorized(CentimeError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(CentimeError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(CentimeError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(CentimeError):
    status = 409
    code = "conflict"
    title = "Conflict"


class Unavailable(CentimeError):
    """Storage did not answer in time. Nothing was charged."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"


class InvariantViolation(CentimeError):
    """Something that must hold did not. Never a client's fault."""

    status = 500
    code = "invariant_violation"
    title = "Invariant violation"


def invariant(condition: bool, message: str) -> None:
    """Assert what must hold. Unlike `assert`, this survives `python -O`."""
    if not condition:
        raise InvariantViolation(message)
