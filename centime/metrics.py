"""Prometheus metrics (kernel: any package may record, none is imported).

One process, one registry. With several server workers each has its own;
scrape each, or run one worker per container."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry(auto_describe=True)

requests_total = Counter(
    "centime_requests",
    "HTTP requests answered, by method, route template (`unmatched`: no route) and status.",
    ["method", "route", "status"],
    registry=registry,
)
errors_total = Counter("centime_errors", "Problem responses, by code.", ["code"], registry=registry)
debit_latency_seconds = Histogram(
    "centime_debit_latency_seconds",
    "Time to answer a debit or credit, charge through commit.",
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=registry,
)
commit_batch_entries = Histogram(
    "centime_commit_batch_entries",
    "Entries per group-commit statement.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
    registry=registry,
)
outbox_depth = Gauge(
    "centime_outbox_depth",
    "Entries charged in Redis and not yet settled (outbox plus abandoned).",
    registry=registry,
)
sweeper_settled_total = Counter(
    "centime_sweeper_settled", "Entries the sweeper settled, by how.", ["how"], registry=registry
)
stripe_events_total = Counter(
    "centime_stripe_events",
    "Stripe webhook events handled, by type and result (processed, duplicate, ignored).",
    ["type", "result"],
    registry=registry,
)
