"""The OpenAPI is the contract an outside tool reads: schemathesis, run against
/schema/openapi.json of a running centime (real Postgres, Redis, the fake
Stripe, so top-ups are on), with a fixed seed, every check and the stateful
phase, finds no server error and no conformance failure; and `centime check`
finds the ledger and Redis agreeing after it. Every 405 carries `Allow`, and
OPTIONS answers the methods each path really has.

What the run is told, besides the schema (each stated here, nothing else):
- positive_data_acceptance also takes 402 (insufficient_funds) and 422
  (balance_too_large, amount_not_payable): a schema-valid debit of an empty
  wallet is refused for its state, not its form; both are documented per route.
- tests/e2e/schemathesis_hooks.py spells whole floats (29.0) as integers:
  JSON Schema 2020-12 calls 29.0 an integer, centime refuses it by design.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from conftest import (
    RUN_ID,
    Keys,
    Server,
    Stores,
    create_database,
    drop_database,
    make_keys,
    run_cli,
    start_server,
    stop_server,
    with_stripe,
)
from stripe_support import FakeStripe

from centime.settings import Settings

RUN_TIME_S = 60
"""schemathesis' own budget (--max-time): fuzzing and stateful testing repeat until it is spent."""
RUN_TIMEOUT_S = RUN_TIME_S + 90
"""Loading the schema and the final report come on top of the budget."""
SEED = 20_251_203
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
STATE_REFUSALS = ["402", "422"]
_SUMMARY = re.compile(r"^=+ (.* in [0-9.]+s) =+$", re.MULTILINE)
METHODS_ASKED = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _config(api_key: str) -> str:
    """schemathesis.toml for the run."""
    accepted = ", ".join(f'"{status}"' for status in ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"])
    refusals = ", ".join(f'"{status}"' for status in STATE_REFUSALS)
    return f"""\
seed = {SEED}
max-time = {RUN_TIME_S}
workers = 1
hooks = "{HOOKS}"

[auth.openapi.apiKey]
bearer = "{api_key}"

[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = [{accepted}, {refusals}]

[phases.stateful]
enabled = true
"""


@pytest.fixture(scope="module")
async def contract_database(stores: Stores, template_database: str) -> AsyncIterator[str]:
    """A database of the module's own: `centime check` looks at every wallet in it."""
    name = f"centime_contract_{RUN_ID}"
    yield await create_database(stores, name, template_database)
    await drop_database(stores, name)


@pytest.fixture(scope="module")
def contract_server(
    settings: Settings, contract_database: str, fake_stripe: FakeStripe
) -> Iterator[tuple[Server, Settings]]:
    """centime with top-ups on, over its own database and Redis prefix. The
    schemathesis test, last in the module, stops it before `centime check`."""
    own = msgspec.structs.replace(
        with_stripe(settings, fake_stripe),
        database_url=contract_database,
        redis_prefix=f"{settings.redis_prefix}st{secrets.token_hex(2)}",
    )
    running = start_server(own)
    try:
        yield running, own
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
async def contract_keys(contract_server: tuple[Server, Settings]) -> Keys:
    _, own = contract_server
    assert own.database_url is not None
    return await make_keys(own.database_url)


_CASES = re.compile(r"^Test cases:\n\s*(.+)$", re.MULTILINE)


def _summary(output: str) -> str:
    """schemathesis' closing line and its count of test cases:
    '3 warnings in 60.06s; 2526 generated, 2526 passed, 30 skipped'."""
    closing = _SUMMARY.findall(output)
    cases = _CASES.findall(output)
    return "; ".join([*closing[-1:], *cases[-1:]]) or "(no summary line; see the output)"


def _run_schemathesis(base_url: str, api_key: str, workdir: Path) -> tuple[int, str, float]:
    config = workdir / "schemathesis.toml"
    config.write_text(_config(api_key), encoding="utf-8")
    env = {**os.environ, "NO_COLOR": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{base_url}/schema/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--generation-database",
            "none",
            "--no-color",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    (workdir / "schemathesis.txt").write_text(output, encoding="utf-8")
    return done.returncode, output, time.monotonic() - started


def test_every_405_says_allow_and_options_tells_the_truth(
    contract_server: tuple[Server, Settings], contract_keys: Keys
) -> None:
    """For every path of the schema: OPTIONS lists exactly its methods (and
    OPTIONS), every other method is 405 with that same `Allow`."""
    server, _ = contract_server
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        schema = http.get("/schema/openapi.json").json()
        headers = {"Authorization": f"Bearer {contract_keys.admin}"}
        example_id = "01a23b12-9995-71a3-9745-e71dc0721c86"
        for template, operations in schema["paths"].items():
            path = re.sub(r"\{[^}]+\}", example_id, template)
            allowed = {method.upper() for method in operations} | {"OPTIONS"}
            options = http.options(path)
            assert options.status_code == 204, (template, options.text)
            assert _methods(options.headers.get("allow")) == allowed, (template, options.headers)
            for method in sorted(set(METHODS_ASKED) - allowed):
                refused = http.request(method, path, headers=headers)
                assert refused.status_code == 405, (template, method, refused.text)
                assert _methods(refused.headers.get("allow")) == allowed, (template, method, refused.headers)
                assert refused.json()["code"] == "method_not_allowed"


def _methods(allow: str | None) -> set[str]:
    return {method.strip() for method in (allow or "").split(",") if method.strip()}


def test_the_schema_says_what_the_server_takes(contract_server: tuple[Server, Settings]) -> None:
    """Rules schemathesis would not find by chance, read off the schema: ids
    are UUIDs, debits come 1 to 1000 to a batch with their item schema, metadata
    keys and values are bounded, the currencies are a list, keys are bearer."""
    server, own = contract_server
    schema = httpx.get(f"{server.base_url}/schema/openapi.json", timeout=10).json()
    paths = schema["paths"]

    def body(path: str) -> dict:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    debits = body("/v1/debits/batch")["properties"]["debits"]
    assert (debits["minItems"], debits["maxItems"]) == (1, 1000)
    item = debits["items"]
    assert item["required"] == ["wallet_id", "amount_micros", "idempotency_key"]
    assert item["additionalProperties"] is False and item["properties"]["wallet_id"]["format"] == "uuid"
    metadata = body("/v1/wallets/{wallet_id}/debits")["properties"]["metadata"]
    assert (
        metadata["propertyNames"]["maxLength"] == 40 and metadata["additionalProperties"]["maxLength"] == 500
    )
    currency = body("/v1/wallets")["properties"]["currency"]
    assert "usd" in currency["enum"] and "tsh" not in currency["enum"]
    topup = body("/v1/wallets/{wallet_id}/topups")["properties"]["amount_micros"]
    assert (topup["minimum"], topup["maximum"]) == (own.topup_min_micros, own.topup_max_micros)
    entries = paths["/v1/wallets/{wallet_id}/entries"]["get"]
    cursor = next(p for p in entries["parameters"] if p["name"] == "starting_after")
    assert cursor["schema"]["format"] == "uuid" and cursor["schema"]["type"] == "string"
    assert entries["security"] == [{"apiKey": ["read"]}]
    assert paths["/v1/webhooks/stripe"]["post"]["security"] == [{"stripeSignature": []}]
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert {"402", "409", "413"} <= set(paths["/v1/wallets/{wallet_id}/debits"]["post"]["responses"])
    assert "422" in paths["/v1/wallets/{wallet_id}/credits"]["post"]["responses"]


def test_schemathesis_finds_nothing_and_the_ledger_holds(
    contract_server: tuple[Server, Settings],
    contract_keys: Keys,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    server, own = contract_server
    returncode, output, elapsed_s = _run_schemathesis(server.base_url, contract_keys.admin, tmp_path)
    summary = _summary(output)
    record_property("schemathesis_summary", f"{summary} (wall {elapsed_s:.0f} s)")
    failures = output[output.find("=== FAILURES") :] if "=== FAILURES" in output else output[-6000:]
    assert returncode == 0, (
        f"schemathesis: {summary}\n(full output: {tmp_path / 'schemathesis.txt'})\n{failures}"
    )
    assert not re.search(r"\b(failures?|errors?)\b", summary), summary

    stop_server(server)  # quiescence: every answered debit committed, the outbox drained
    checked = run_cli(own, "check")
    assert checked.returncode == 0, f"centime check after schemathesis:\n{checked.stdout}{checked.stderr}"
    assert checked.stdout.strip().splitlines()[-1].startswith("ok:"), checked.stdout
