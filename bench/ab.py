"""A/B of the debit rate between two source trees (or two keys), by
alternating wrk runs against one server at a time.

    python -m bench.ab --old /path/to/old/tree --new . [--pairs 4] [--seconds 15]

Each tree serves `centime serve` from its own checkout (its own .venv), on a
database of its own (migrated by its own code) on the Postgres of
CENTIME_AB_DATABASE_URL (default 127.0.0.1:5432) and a Redis prefix of its
own on CENTIME_AB_REDIS_URL. Each gets WALLETS funded wallets of owners
ab-0..ab-99, an unscoped debit key and, where the tree knows `--owner`, a key
scoped to all 100 owners (the owner check's worst case). Runs alternate:
old, new, new with the scoped key (and new with --new-env settings), then
again, PAIRS times; one JSON line per
run, and the means at the end. The machine should be otherwise idle."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WALLETS = 100
OWNERS = 100
PAIRS_MAX = 20
SECONDS_MAX = 120
CONNECTIONS = 64
START_TIMEOUT_S = 60.0
WRK_SCRIPT = Path(__file__).parent / "wrk" / "bench.lua"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tree:
    """One source tree, its database and Redis prefix, and its keys."""

    def __init__(self, name: str, root: Path, database_server: str, redis_url: str) -> None:
        self.name = name
        self.root = root.resolve()
        self.python = str(self.root / ".venv" / "bin" / "python")
        self.database = f"ab_{name}_{secrets.token_hex(3)}"
        self.env = {
            **os.environ,
            "CENTIME_DATABASE_URL": f"{database_server.rstrip('/')}/{self.database}",
            "CENTIME_REDIS_URL": redis_url,
            "CENTIME_REDIS_PREFIX": f"ab{secrets.token_hex(3)}",
            "CENTIME_LOG_LEVEL": "WARNING",
        }
        self.keys: dict[str, str] = {}
        self.wallets_file = Path(tempfile.mkstemp(prefix=f"ab-{name}-", suffix=".txt")[1])

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [self.python, "-m", "centime", *args], cwd=self.root, env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"{self.name}: centime {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
        lines = done.stdout.strip().splitlines()
        return lines[-1].strip() if lines else ""

    def serve(self, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        process = subprocess.Popen(
            [self.python, "-m", "centime", "serve", "--port", str(port)],
            cwd=self.root,
            env={**self.env, **env_extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        process.kill()
        raise SystemExit(f"{self.name}: the server did not become ready")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def seed(tree: Tree, database_server: str) -> None:
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", tree.database], check=True)
    tree.cli("migrate")
    admin = tree.cli("api-key", "create", "--name", "ab-admin", "--scope", "admin")
    tree.keys["all"] = tree.cli("api-key", "create", "--name", "ab-all", "--scope", "debit")
    owners = [arg for i in range(OWNERS) for arg in ("--owner", f"ab-{i}")]
    with contextlib.suppress(SystemExit):  # a tree before owner-scoped keys has no --owner
        tree.keys["owned"] = tree.cli("api-key", "create", "--name", "ab-owned", "--scope", "debit", *owners)
    process, url = tree.serve({})
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as http:
            ids = []
            for i in range(WALLETS):
                made = http.post("/v1/wallets", json={"owner_id": f"ab-{i % OWNERS}", "currency": "usd"})
                made.raise_for_status()
                wallet_id = made.json()["id"]
                funded = http.post(
                    f"/v1/wallets/{wallet_id}/credits",
                    json={"amount_micros": 10**15, "reason": "ab"},
                    headers={"Idempotency-Key": f"fund-{wallet_id}"},
                )
                funded.raise_for_status()
                ids.append(wallet_id)
        tree.wallets_file.write_text("\n".join(ids) + "\n")
    finally:
        _stop(process)


def run_wrk(
    tree: Tree, key_name: str, seconds: int, run: str, env_extra: dict[str, str]
) -> dict[str, object]:
    process, url = tree.serve(env_extra)
    try:
        env = {
            **os.environ,
            "BENCH_PATH": "/v1/wallets/{wallet}/debits",
            "BENCH_WALLETS": str(tree.wallets_file),
            "BENCH_KEY": tree.keys[key_name],
            "BENCH_RUN": run,
        }
        warm = ["wrk", "-t1", f"-c{CONNECTIONS}", "-d2s", "-s", str(WRK_SCRIPT), url]
        subprocess.run(warm, env={**env, "BENCH_RUN": run + "w"}, capture_output=True, check=True)
        cpu_before_s = _cpu_s(process.pid)
        done = subprocess.run(
            ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(WRK_SCRIPT), url],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        cpu_s = _cpu_s(process.pid) - cpu_before_s
    finally:
        _stop(process)
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("{"))
    result = json.loads(line)
    result["server_cpu_us_per_request"] = round(cpu_s * 1e6 / max(result["requests"], 1), 1)
    return result


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) of a process and its children's threads:
    less noisy than the rate on a shared machine, since it counts only what
    the server itself spent."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=4, choices=range(1, PAIRS_MAX + 1))
    parser.add_argument("--seconds", type=int, default=15, choices=range(2, SECONDS_MAX + 1))
    parser.add_argument(
        "--new-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a fourth arm: new with this setting",
    )
    args = parser.parse_args()
    database_server = os.environ.get("CENTIME_AB_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432")
    redis_url = os.environ.get("CENTIME_AB_REDIS_URL", "redis://127.0.0.1:6379/0")
    old = Tree("old", args.old, database_server, redis_url)
    new = Tree("new", args.new, database_server, redis_url)
    try:
        for tree in (old, new):
            seed(tree, database_server)
            print(
                f"seeded {tree.name}: {tree.database}, keys {sorted(tree.keys)}", file=sys.stderr, flush=True
            )
        new_env = dict(item.split("=", 1) for item in args.new_env)
        compare(old, new, pairs=args.pairs, seconds=args.seconds, new_env=new_env)
    finally:
        for tree in (old, new):
            subprocess.run(
                ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", tree.database], check=False
            )
            tree.wallets_file.unlink(missing_ok=True)


def _arm(tree: Tree, key_name: str, env_extra: dict[str, str]) -> str:
    return "/".join([tree.name, key_name, *(f"{k}={v}" for k, v in env_extra.items())])


def compare(old: Tree, new: Tree, *, pairs: int, seconds: int, new_env: dict[str, str]) -> None:
    arms = [(old, "all", {}), (new, "all", {})]
    if "owned" in new.keys:
        arms.append((new, "owned", {}))
    if new_env:
        arms.append((new, "all", new_env))
    rates: dict[str, list[float]] = {_arm(t, k, e): [] for t, k, e in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in rates}
    for pair in range(pairs):
        # Forward, then backward (ABBA): no arm always runs first after a server's start.
        for tree, key_name, env_extra in arms if pair % 2 == 0 else arms[::-1]:
            run = f"ab{pair}{tree.name}{key_name}{secrets.token_hex(2)}"
            result = run_wrk(tree, key_name, seconds, run, env_extra)
            arm = _arm(tree, key_name, env_extra)
            rates[arm].append(float(result["rps"]))  # type: ignore[arg-type]
            cpu[arm].append(float(result["server_cpu_us_per_request"]))  # type: ignore[arg-type]
            print(json.dumps({"pair": pair, "arm": arm, **result}), flush=True)
    summary = {
        arm: {"mean": round(statistics.mean(r)), "runs": [round(x) for x in r]} for arm, r in rates.items()
    }
    base = statistics.mean(rates["old/all"])
    for arm, values in rates.items():
        summary[arm]["vs_old"] = round(statistics.mean(values) / base, 3)
        summary[arm]["server_cpu_us_per_request"] = [round(x) for x in cpu[arm]]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
