"""Realistic traffic against any running centime, for locust:

    python -m bench.seed --url http://127.0.0.1:8000 --key $ADMIN --wallets 1000
    CENTIME_KEY=$DEBIT uv run --group bench locust -f bench/locustfile.py \\
        --host http://127.0.0.1:8000 --headless -u 64 -r 16 -t 60s \\
        --html bench/results/locust.html

Mostly debits spread over many wallets, some balance reads, a few hot
wallets taking a large share, and an occasional debit that must be refused
for insufficient funds (402 counts as the expected answer). Wallet ids come
from bench/results/wallets.txt (or $WALLETS), one per line, as bench.seed
writes them. locust tops out near 3k requests/s per process on a 2-core
machine: for throughput figures use wrk (bench/wrk/bench.lua; `make bench` does)."""

from __future__ import annotations

import itertools
import os
import random
import secrets
from pathlib import Path

from locust import FastHttpUser, between, task

WALLETS_FILE = Path(os.environ.get("WALLETS", "bench/results/wallets.txt"))
HOT_WALLETS = 3
"""The first few wallets of the file take a large share of the debits."""
DEBIT_MICROS_MAX = 5_000
TOO_MUCH_MICROS = 2**53 - 1
"""More than any seeded wallet holds: always refused, 402."""


def _wallets() -> list[str]:
    if not WALLETS_FILE.exists():
        raise SystemExit(
            f"{WALLETS_FILE} is missing: run `python -m bench.seed ...` first (see this file's doc)"
        )
    wallets = [line.strip() for line in WALLETS_FILE.read_text().splitlines() if line.strip()]
    if len(wallets) <= HOT_WALLETS:
        raise SystemExit(f"{WALLETS_FILE} lists {len(wallets)} wallets; seed more than {HOT_WALLETS}")
    return wallets


WALLETS = _wallets()
DEBIT_KEY = os.environ.get("CENTIME_KEY") or ""
READ_KEY = os.environ.get("CENTIME_READ_KEY") or DEBIT_KEY
if not DEBIT_KEY:
    raise SystemExit("set CENTIME_KEY to a key of scope debit (centime api-key create --scope debit)")
_sequence = itertools.count()
_run = secrets.token_hex(4)


class WalletUser(FastHttpUser):
    wait_time = between(0, 0.01)

    def _debit(self, wallet_id: str, amount_micros: int, name: str, expect: int = 201) -> None:
        key = f"locust-{_run}-{next(_sequence)}"
        with self.client.post(
            f"/v1/wallets/{wallet_id}/debits",
            json={"amount_micros": amount_micros, "description": "locust"},
            headers={"Authorization": f"Bearer {DEBIT_KEY}", "Idempotency-Key": key},
            name=name,
            catch_response=True,
        ) as response:
            if response.status_code == expect:
                response.success()
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(80)
    def debit(self) -> None:
        self._debit(random.choice(WALLETS[HOT_WALLETS:]), random.randint(1, DEBIT_MICROS_MAX), "debit")

    @task(8)
    def debit_hot_wallet(self) -> None:
        self._debit(random.choice(WALLETS[:HOT_WALLETS]), random.randint(1, DEBIT_MICROS_MAX), "debit (hot)")

    @task(10)
    def read_balance(self) -> None:
        self.client.get(
            f"/v1/wallets/{random.choice(WALLETS)}",
            headers={"Authorization": f"Bearer {READ_KEY}"},
            name="read wallet",
        )

    @task(2)
    def insufficient_funds(self) -> None:
        self._debit(random.choice(WALLETS), TOO_MUCH_MICROS, "debit (insufficient)", expect=402)
