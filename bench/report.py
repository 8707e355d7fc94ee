"""The results of `make bench`: latest.json, a chart (latest.png), and the
table printed at the end."""

from __future__ import annotations

import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from bench.progress import say

TARGETS = {
    "debit_vs_floor": (">=", 0.75),
    "hot_vs_naive": (">=", 4.0),
    "ledger_vs_copy": (">=", 0.5),
    "batch_vs_redis_ceiling": (">=", 1.0),
    "p99_ms_at_half_load": ("<=", 10.0),
}
GENERATORS = {
    "floor": "wrk",
    "debit": "wrk",
    "debit_hot": "wrk",
    "debit_half": "wrk, paced",
    "batch": "wrk, 100 debits per request",
    "mix": "locust",
    "naive_hot": "wrk",
    "naive": "wrk",
    "redis_ceiling": "redis-benchmark",
    "ledger_writer": "in process",
    "copy": "in process",
}


def _ratio(loads: dict[str, Any], top: str, bottom: str) -> float | None:
    if top not in loads or bottom not in loads or not loads[bottom].rps:
        return None
    return round(loads[top].rps / loads[bottom].rps, 3)


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "os": platform.platform()}


def build(
    measured: dict[str, Any], *, started: datetime, seconds: int, wallets: int, workers: int, connections: int
) -> dict[str, Any]:
    loads, checks = measured["loads"], measured["checks"]
    half = loads.get("debit_half")
    ratios = {
        "debit_vs_floor": _ratio(loads, "debit", "floor"),
        "hot_vs_naive": _ratio(loads, "debit_hot", "naive_hot"),
        "ledger_vs_copy": _ratio(loads, "ledger_writer", "copy"),
        "batch_vs_redis_ceiling": _ratio(loads, "batch", "redis_ceiling"),
    }
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": measured["versions"],
        "settings": {
            "seconds_per_scenario": seconds,
            "wallets": wallets,
            "server_workers": workers,
            "wrk_connections": connections,
        },
        "ratios": ratios,
        "p99_ms_at_half_load": half.p99_ms if half else None,
        "half_load_fraction": round(half.rps / loads["debit"].rps, 3) if half else None,
        "lost_entries": sum(c.lost for c in checks.values()),
        "duplicated_entries": sum(c.duplicated for c in checks.values()),
        "checks_ok": all(c.check_ok for c in checks.values()),
        "scenarios": {
            name: {"generator": GENERATORS.get(name, ""), **msgspec.to_builtins(load)}
            for name, load in loads.items()
        },
        "checks": {name: msgspec.to_builtins(check) for name, check in checks.items()},
    }


def _meets(name: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    sign, bound = TARGETS[name]
    ok = value >= bound if sign == ">=" else value <= bound
    return f"{'met' if ok else 'MISSED'} (target {sign} {bound:g})"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"centime bench, {result['date']}, {result['machine']['cpu']} x{result['machine']['cores']}",
        "",
        f"{'scenario':<15} {'generator':<16} {'per second':>12} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}",
    ]
    for name, s in result["scenarios"].items():
        lines.append(
            f"{name:<15} {s['generator']:<16} {s['rps']:>12,.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
            f"{s['non_2xx']:>8}"
        )
    lines.append("")
    for name, value in result["ratios"].items():
        lines.append(f"{name:<24} {'' if value is None else f'{value:.3f}':>8}  {_meets(name, value)}")
    p99 = result["p99_ms_at_half_load"]
    lines.append(
        f"{'p99_ms_at_half_load':<24} {'' if p99 is None else f'{p99:.2f}':>8}  "
        f"{_meets('p99_ms_at_half_load', p99)}, at {result['half_load_fraction']} of the debit rate"
    )
    lines.append(
        f"{'lost / duplicated':<24} {result['lost_entries']:>4} / {result['duplicated_entries']:<4}"
        f"  centime check after each debit run: {'ok' if result['checks_ok'] else 'FAILED'}"
    )
    return "\n".join(lines)


def write(result: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest.json").write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))
    say(f"wrote {directory / 'latest.json'}")
    chart(result, directory / "latest.png")


def chart(result: dict[str, Any], path: Path) -> None:
    """Throughput and p99 per scenario, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is missing (uv run --group bench): no chart")
        return
    names = [n for n in result["scenarios"] if n not in ("ledger_writer", "copy", "redis_ceiling")]
    scenarios = result["scenarios"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.barh(names, [scenarios[n]["rps"] for n in names], color="#2f6f9f")
    left.set_xlabel("requests per second")
    left.invert_yaxis()
    right.barh(names, [scenarios[n]["p99_ms"] for n in names], color="#c0504d")
    right.set_xlabel("p99 latency, ms")
    right.invert_yaxis()
    right.set_yticklabels([])
    figure.suptitle(
        f"centime bench {result['date'][:10]}, {result['machine']['cores']} cores, "
        f"{result['settings']['seconds_per_scenario']} s per scenario"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    say(f"wrote {path}")
