"""Settings, decoded once from CENTIME_* environment variables into a frozen
struct. A bad value is a startup error that names the variable (and shows
no more of a secret than a short prefix).

Patterns end in \\Z, not $: Python's $ also matches before a trailing
newline, so "^...$" would let "sk_live_x\\n" through."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from centime.money import AMOUNT_MICROS_MAX

ENV_PREFIX = "CENTIME_"

Positive = Annotated[int, msgspec.Meta(ge=1)]
SECRET_SETTINGS = frozenset(
    {"database_url", "redis_url", "stripe_secret_key", "stripe_webhook_secret", "metrics_token"}
)
"""Settings whose value an error shows only as masked(value): URLs carry passwords."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Storage. With neither URL set, `centime serve` starts embedded ones.
    database_url: Annotated[str, msgspec.Meta(pattern=r"^postgres(ql)?://\S+\Z")] | None = None
    redis_url: Annotated[str, msgspec.Meta(pattern=r"^(redis|rediss|unix)://\S+\Z")] | None = None
    data_dir: str = ".centime"
    # Redis key layout: `<redis_prefix>:{p<n>}:...`. partition_count must never
    # change once wallets exist: it decides which partition holds a wallet.
    redis_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}\Z")] = "c"
    partition_count: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 64
    # Idempotency records live this long in Redis; the ledger keeps keys forever.
    idempotency_ttl_s: Annotated[int, msgspec.Meta(ge=60, le=7 * 24 * 3600)] = 3600
    # Group commit: entries per transaction, and transactions in flight.
    commit_batch_entries_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 16
    commit_connections: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    # Bounded waits. A debit whose commit outlives commit_timeout_ms is answered 503.
    commit_timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 2000
    database_timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 2000
    redis_timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 1000
    database_pool_max: Annotated[int, msgspec.Meta(ge=2, le=200)] = 10
    # The sweeper: settles outbox entries nobody committed, and abandoned ones.
    run_sweeper: bool = True
    sweeper_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=3_600_000)] = 1000
    sweeper_grace_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 30_000
    sweeper_batch_max: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500
    # Serve POST /v1/wallets/{id}/debits in front of the framework (centime/fast_debits.py).
    fast_debits: bool = True
    # Active (not yet captured, released or expired) holds per wallet: each costs Redis memory.
    holds_per_wallet_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    # API keys are cached in-process this long after a lookup. Revocations
    # reach every process within a second anyway (a poll): this bounds how
    # long a revoked key lives while that poll cannot reach Postgres.
    api_key_cache_ttl_s: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 60
    # When set, GET /metrics needs `Authorization: Bearer <token>`; unset, it is open.
    metrics_token: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._~+/-]{16,256}=*\Z")] | None = None
    log_level: Annotated[str, msgspec.Meta(pattern=r"^(DEBUG|INFO|WARNING|ERROR)\Z")] = "INFO"
    # Log lines as text, or one JSON object a line; and one access line per request.
    log_format: Annotated[str, msgspec.Meta(pattern=r"^(text|json)\Z")] = "text"
    access_log: bool = True
    # Top-ups through Stripe. Without a secret key, the top-up routes answer 503.
    stripe_secret_key: Annotated[str, msgspec.Meta(pattern=r"^(sk|rk)_[A-Za-z0-9_]{1,250}\Z")] | None = None
    stripe_publishable_key: Annotated[str, msgspec.Meta(pattern=r"^pk_[A-Za-z0-9_]{1,250}\Z")] | None = None
    stripe_webhook_secret: Annotated[str, msgspec.Meta(pattern=r"^[\x21-\x7e]{1,255}\Z")] | None = None
    stripe_api_base: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/\s]+\Z")] = "https://api.stripe.com"
    stripe_js_url: Annotated[str, msgspec.Meta(pattern=r"^https?://\S+\Z")] = "https://js.stripe.com/v3/"
    stripe_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=80_000)] = 10_000
    # A top-up's amount, in micros of the currency's major unit (0.50 to 10,000.00).
    topup_min_micros: Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MICROS_MAX)] = 500_000
    topup_max_micros: Annotated[int, msgspec.Meta(ge=1, le=AMOUNT_MICROS_MAX)] = 10_000_000_000
    # The nightly reconciliation, run by `centime worker` when Stripe is set up (HH:MM, UTC).
    reconcile_nightly: bool = True
    reconcile_at_utc: Annotated[str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]\Z")] = "02:00"


class SettingsError(Exception):
    """A CENTIME_* variable has a bad value; the message names it."""


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


SECRET_PREFIX_CHARS_MAX = 4


def masked(value: str) -> str:
    """A secret as an error may show it: a URL's scheme, or at most
    SECRET_PREFIX_CHARS_MAX characters (a quarter of a short one), then '…'."""
    scheme, separator, _ = value.partition("://")
    if separator and scheme.isalpha() and len(scheme) <= 10:
        return f"{scheme}{separator}…"
    return value[: min(SECRET_PREFIX_CHARS_MAX, len(value) // 4)] + "…"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Decode CENTIME_* variables. Unknown CENTIME_* names are errors too:
    a typo in a variable name must not silently fall back to a default."""
    environ = os.environ if environ is None else environ
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    raw: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in fields:
            raise SettingsError(
                f"{name} is not a centime setting (known: {', '.join(sorted(_env_name(f) for f in fields))})"
            )
        if value == "":
            continue  # empty means unset (compose's `${VAR:-}`): the default applies
        raw[field] = value
    for field, value in raw.items():
        try:
            msgspec.convert({field: value}, Settings, strict=False)
        except msgspec.ValidationError as exc:
            shown = masked(value) if field in SECRET_SETTINGS else value
            raise SettingsError(f"{_env_name(field)}={shown!r} is invalid: {exc}") from None
    settings = msgspec.convert(raw, Settings, strict=False)
    # Until a request has settled or handed over its charge, the charge is the
    # request's; the sweeper must not take it before then. A request waits for
    # the commit, then may call Redis (abandon) and, if Redis fails, write a
    # reversal to Postgres (a connection and two statements).
    request_window_ms = max(
        2 * (settings.commit_timeout_ms + settings.redis_timeout_ms),
        settings.commit_timeout_ms + settings.redis_timeout_ms + 3 * settings.database_timeout_ms,
    )
    if settings.sweeper_grace_ms < request_window_ms:
        raise SettingsError(
            f"{_env_name('sweeper_grace_ms')}={settings.sweeper_grace_ms} is shorter than a request's "
            f"settling window: at least max(2 x ({_env_name('commit_timeout_ms')} + {_env_name('redis_timeout_ms')}), "
            f"{_env_name('commit_timeout_ms')} + {_env_name('redis_timeout_ms')} + 3 x "
            f"{_env_name('database_timeout_ms')}) = {request_window_ms}"
        )
    if settings.topup_min_micros > settings.topup_max_micros:
        raise SettingsError(
            f"{_env_name('topup_min_micros')}={settings.topup_min_micros} exceeds "
            f"{_env_name('topup_max_micros')}={settings.topup_max_micros}"
        )
    return settings
