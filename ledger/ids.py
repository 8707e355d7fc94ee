"""Time-ordered UUIDs (RFC 9562 version 7): entries sort by creation time."""

from __future__ import annotations

import os
import re
import time
import uuid


def uuid7(now_ms: int | None = None) -> uuid.UUID:
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64 & (0xFFF << 64)  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b: 62 bits
    return uuid.UUID(int=value)


def uuid7_floor(ms: int) -> uuid.UUID:
    """The smallest UUIDv7 of a millisecond: every id made then or later sorts after it."""
    return uuid.UUID(int=((ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (0b10 << 62))


UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
"""An id as the OpenAPI states it (and `format: uuid` means): 8-4-4-4-12 hex.
The server matches it with `fullmatch`, which ends at the string's end, as
ECMA's `$` does; Python's `$` alone would also take a trailing newline."""
_UUID = re.compile(UUID_PATTERN)


def parse_uuid(raw: str) -> uuid.UUID | None:
    """`raw` as a UUID when it is written as UUID_PATTERN says, else None
    (uuid.UUID alone also takes braces, `urn:uuid:` and no hyphens)."""
    if _UUID.fullmatch(raw) is None:
        return None
    return uuid.UUID(raw)
