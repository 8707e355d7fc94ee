"""Each sweeper pass is counted in the metrics registry: every kind of settled entry that
SweepReport.settled sums is a `how` of centime_sweeper_settled_total, incremented by its count."""

from __future__ import annotations

import msgspec
from prometheus_client import generate_latest

from centime import metrics
from centime.app import SETTLED_HOW, record_sweep_pass
from wallet.sweeper import SweepReport


def settled(how: str) -> float:
    return metrics.registry.get_sample_value("centime_sweeper_settled_total", {"how": how}) or 0.0


def test_the_counted_kinds_are_what_the_report_calls_settled() -> None:
    fields = [f.name for f in msgspec.structs.fields(SweepReport)]
    # Each field its own power of two: the sum tells exactly which fields `settled` adds.
    report = SweepReport(**{name: 2**i for i, name in enumerate(fields)})
    assert report.settled == sum(2 ** fields.index(how) for how in SETTLED_HOW)


def test_a_pass_counts_what_it_settled_by_how_and_sets_the_outbox_depth() -> None:
    before = {how: settled(how) for how in SETTLED_HOW}
    record_sweep_pass(SweepReport(orphans_committed=3, holds_expired=2, refused=7), 5)
    assert {how: settled(how) - before[how] for how in SETTLED_HOW} == {
        "orphans_committed": 3,
        "orphans_reversed": 0,
        "abandoned_reversed": 0,
        "abandoned_refunded": 0,
        "changes_applied": 0,
        "holds_expired": 2,
    }
    assert metrics.registry.get_sample_value("centime_outbox_depth") == 5
    assert b'centime_sweeper_settled_total{how="orphans_committed"}' in generate_latest(metrics.registry)
