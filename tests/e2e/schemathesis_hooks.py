"""Schemathesis hooks for tests/e2e/test_schemathesis.py (loaded by the
schemathesis CLI through SCHEMATHESIS_HOOKS, not by pytest).

One hook, and why: JSON Schema 2020-12 (OpenAPI 3.1) counts 29.0 as an
integer, so schemathesis sends amounts spelled as whole floats. centime
refuses them by design (no floats on the wire: a client that computes money
in floats fails on its first request, not on its first inexact amount;
tests/e2e/test_bad_input.py proves the refusal), and no 2020-12 keyword can
say so; the schema's descriptions do. The hook spells such numbers as the
integers they equal before each call, and changes nothing else."""

from __future__ import annotations

from typing import Any

import schemathesis

NESTING_MAX = 32
"""Deeper than any body centime takes (a batch's debits' metadata is 3)."""


def as_integers(value: Any, depth: int = 0) -> Any:
    """`value` with every whole float (29.0) spelled as its integer (29)."""
    if depth > NESTING_MAX:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: as_integers(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [as_integers(item, depth + 1) for item in value]
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if isinstance(case.body, dict | list | float):
        case.body = as_integers(case.body)
