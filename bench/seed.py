"""Create and fund wallets for a load run against a running centime.

    python -m bench.seed --url http://127.0.0.1:8000 --key <admin key> \
        --wallets 1000 --fund-micros 1000000000 --out bench/results/wallets.txt

Writes one wallet id per line; bench/wrk/bench.lua and bench/locustfile.py read that file."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from pathlib import Path

import httpx

CONCURRENCY = 32
WALLETS_MAX = 100_000


async def seed(url: str, key: str, wallets: int, fund_micros: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    run = secrets.token_hex(4)
    ids: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(http: httpx.AsyncClient, n: int) -> None:
        async with gate:
            r = await http.post(
                "/v1/wallets", json={"owner_id": f"bench-{run}-{n}", "currency": "usd"}, headers=headers
            )
            r.raise_for_status()
            wallet_id = r.json()["id"]
            r = await http.post(
                f"/v1/wallets/{wallet_id}/credits",
                json={"amount_micros": fund_micros, "reason": "bench funding"},
                headers={**headers, "Idempotency-Key": f"fund-{run}-{n}"},
            )
            r.raise_for_status()
            ids.append(wallet_id)
            if len(ids) % 1000 == 0:
                print(f"seeded {len(ids)}/{wallets} wallets", file=sys.stderr)

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await asyncio.gather(*(one(http, n) for n in range(wallets)))
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an admin API key")
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--fund-micros", type=int, default=1_000_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/wallets.txt"))
    args = parser.parse_args()
    if not 1 <= args.wallets <= WALLETS_MAX:
        parser.error(f"--wallets must be within 1..{WALLETS_MAX}")
    ids = asyncio.run(seed(args.url, args.key, args.wallets, args.fund_micros))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(ids) + "\n")
    print(f"wrote {len(ids)} wallet ids to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
