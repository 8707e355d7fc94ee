"""The pure kernel and helpers are exact: money converts Stripe minor units to micros and back
exactly within bounds, settings decode CENTIME_* strictly, request hashes, UUIDv7 ids, entry lines
and named SQL loading behave as the ledger and the debit path rely on."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from centime.errors import InvariantViolation
from centime.money import (
    AMOUNT_MICROS_MAX,
    CURRENCY_EXPONENTS,
    AmountMicros,
    Currency,
    LimitMicros,
    is_supported_currency,
    micros_to_minor,
    minor_to_micros,
)
from centime.settings import SECRET_SETTINGS, Settings, SettingsError, load_settings, masked
from centime.sql import load_queries
from ledger.accounts import (
    SYSTEM_ACCOUNT_KINDS,
    credit_lines,
    debit_lines,
    reversal_id_for,
    reversal_of,
    system_account_id,
)
from ledger.ids import UUID_PATTERN, parse_uuid, uuid7
from ledger.schemas import EntryRecord
from wallet.charges import request_hash

# centime.money ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "minor", "micros"),
    [
        ("usd", 1, 10_000),
        ("usd", 1234, 12_340_000),
        ("jpy", 1, 1_000_000),
        ("jpy", 500, 500_000_000),
        ("kwd", 1, 1_000),
        ("kwd", 1234, 1_234_000),
    ],
)
def test_minor_units_convert_exactly_both_ways(currency: str, minor: int, micros: int) -> None:
    assert minor_to_micros(minor, currency) == micros
    assert micros_to_minor(micros, currency) == minor


@pytest.mark.parametrize(
    ("currency", "micros"),
    [("usd", 12_345_001), ("usd", 5_000), ("jpy", 1_500_000), ("jpy", 1), ("kwd", 1_234_500), ("kwd", 999)],
)
def test_micros_that_are_not_whole_minor_units_give_none(currency: str, micros: int) -> None:
    assert micros_to_minor(micros, currency) is None


def test_every_supported_currency_has_an_exact_exponent() -> None:
    assert CURRENCY_EXPONENTS["usd"] == 2
    assert CURRENCY_EXPONENTS["jpy"] == 0
    assert CURRENCY_EXPONENTS["kwd"] == 3
    for currency, exponent in CURRENCY_EXPONENTS.items():
        assert msgspec.convert(currency, Currency) == currency
        assert 0 <= exponent <= 6
        assert micros_to_minor(minor_to_micros(7, currency), currency) == 7
    assert is_supported_currency("usd")
    assert not is_supported_currency("USD")
    assert not is_supported_currency("xyz")


def test_conversion_is_exact_at_the_bound() -> None:
    # The largest whole number of cents within the bound converts without rounding.
    cents = AMOUNT_MICROS_MAX // 10_000
    assert minor_to_micros(cents, "usd") == cents * 10_000
    assert micros_to_minor(cents * 10_000, "usd") == cents
    assert micros_to_minor(AMOUNT_MICROS_MAX, "usd") is None  # ...991 is not whole cents


@pytest.mark.parametrize("value", [1, 2, 10**6, AMOUNT_MICROS_MAX])
def test_amount_micros_accepts_positive_values_within_the_bound(value: int) -> None:
    assert msgspec.convert(value, AmountMicros) == value


@pytest.mark.parametrize("value", [0, -1, AMOUNT_MICROS_MAX + 1, 2**63, 1.0, 0.5, True, "5"])
def test_amount_micros_refuses_zero_negative_too_large_and_non_integers(value: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(value, AmountMicros)


def test_limit_micros_allows_zero_and_refuses_the_rest() -> None:
    assert msgspec.convert(0, LimitMicros) == 0
    assert msgspec.convert(AMOUNT_MICROS_MAX, LimitMicros) == AMOUNT_MICROS_MAX
    for bad in (-1, AMOUNT_MICROS_MAX + 1):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, LimitMicros)


@pytest.mark.parametrize("bad", ["USD", "us", "usdd", "u$d", ""])
def test_currency_is_three_lower_case_letters(bad: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, Currency)


def test_amount_bound_is_the_largest_exact_double() -> None:
    assert AMOUNT_MICROS_MAX == 2**53 - 1
    assert float(AMOUNT_MICROS_MAX) == AMOUNT_MICROS_MAX
    assert float(AMOUNT_MICROS_MAX + 2) != AMOUNT_MICROS_MAX + 2


# centime.settings --------------------------------------------------------------


def test_defaults_with_an_empty_environment() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.redis_prefix == "c"
    assert settings.partition_count == 64
    assert settings.idempotency_ttl_s == 3600
    assert settings.run_sweeper is True


def test_values_are_decoded_from_strings_and_others_ignored() -> None:
    settings = load_settings(
        {
            "CENTIME_PARTITION_COUNT": "128",
            "CENTIME_IDEMPOTENCY_TTL_S": "60",
            "CENTIME_DATABASE_URL": "postgresql://db/x",
            "CENTIME_LOG_LEVEL": "DEBUG",
            "PATH": "/bin",
            "CENTIMES_PARTITION_COUNT": "not ours",
        }
    )
    assert settings.partition_count == 128
    assert settings.idempotency_ttl_s == 60
    assert settings.database_url == "postgresql://db/x"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CENTIME_PARTITION_COUNT", "0"),
        ("CENTIME_PARTITION_COUNT", "many"),
        ("CENTIME_IDEMPOTENCY_TTL_S", "59"),
        ("CENTIME_REDIS_PREFIX", "has:colon"),
        ("CENTIME_LOG_LEVEL", "debug"),
        ("CENTIME_COMMIT_BATCH_ENTRIES_MAX", "1001"),
        ("CENTIME_RUN_SWEEPER", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"CENTIME_LOG_LEVEL": "INFO", name: value})
    assert name in str(raised.value)
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CENTIME_STRIPE_SECRET_KEY", "pk_test_wrong_kind"),
        ("CENTIME_STRIPE_PUBLISHABLE_KEY", "sk_test_wrong_kind"),
        ("CENTIME_STRIPE_API_BASE", "api.stripe.com"),
        ("CENTIME_STRIPE_TIMEOUT_MS", "99"),
        ("CENTIME_TOPUP_MIN_MICROS", "0"),
    ],
)
def test_bad_stripe_and_topup_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


GOOD_TEXT_SETTINGS = {
    "CENTIME_DATABASE_URL": "postgresql://centime:pw@db:5432/centime",
    "CENTIME_REDIS_URL": "redis://:pw@redis:6379/0",
    "CENTIME_REDIS_PREFIX": "c",
    "CENTIME_LOG_LEVEL": "INFO",
    "CENTIME_METRICS_TOKEN": "m" * 32,
    "CENTIME_STRIPE_SECRET_KEY": "sk_test_abc",
    "CENTIME_STRIPE_PUBLISHABLE_KEY": "pk_test_abc",
    "CENTIME_STRIPE_WEBHOOK_SECRET": "whsec_abc",
    "CENTIME_STRIPE_API_BASE": "https://api.stripe.com",
    "CENTIME_STRIPE_JS_URL": "https://js.stripe.com/v3/",
    "CENTIME_RECONCILE_AT_UTC": "02:00",
}


def test_the_good_text_settings_decode() -> None:
    settings = load_settings(GOOD_TEXT_SETTINGS)
    assert settings.metrics_token == "m" * 32
    assert settings.redis_url == "redis://:pw@redis:6379/0"


@pytest.mark.parametrize("name", sorted(GOOD_TEXT_SETTINGS))
@pytest.mark.parametrize("tail", ["\n", "\r\n", " "])
def test_a_pattern_matches_the_whole_value(name: str, tail: str) -> None:
    """Python's $ matches before a trailing newline: every pattern ends in \\Z instead."""
    with pytest.raises(SettingsError, match=name):
        load_settings({**GOOD_TEXT_SETTINGS, name: GOOD_TEXT_SETTINGS[name] + tail})


SECRET_VALUE = "9f8e7d6c5b4a39281706"
BAD_SECRETS = [
    ("CENTIME_STRIPE_SECRET_KEY", f"sk_live_{SECRET_VALUE}\n", "'sk_l…'"),
    ("CENTIME_STRIPE_SECRET_KEY", f"pk_live_{SECRET_VALUE}", "'pk_l…'"),
    ("CENTIME_STRIPE_WEBHOOK_SECRET", f"whsec_{SECRET_VALUE} ", "'whse…'"),
    ("CENTIME_DATABASE_URL", f"postgresql://centime:{SECRET_VALUE}@db/centime\n", "'postgresql://…'"),
    ("CENTIME_DATABASE_URL", f"mysql://centime:{SECRET_VALUE}@db/centime", "'mysql://…'"),
    ("CENTIME_REDIS_URL", f"redis://:{SECRET_VALUE}@redis:6379/0\n", "'redis://…'"),
    ("CENTIME_REDIS_URL", f"redis//:{SECRET_VALUE}@redis", "'redi…'"),
    ("CENTIME_METRICS_TOKEN", f"{SECRET_VALUE}\n", "'9f8e…'"),
    ("CENTIME_METRICS_TOKEN", SECRET_VALUE[:8], "'9f…'"),  # too short: a quarter shown
]


@pytest.mark.parametrize(("name", "value", "shown"), BAD_SECRETS)
def test_a_bad_secret_is_never_echoed(name: str, value: str, shown: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value})
    message = str(raised.value)
    assert message.startswith(f"{name}={shown} is invalid"), message
    assert SECRET_VALUE[:6] not in message and SECRET_VALUE[-6:] not in message, message


def test_every_secret_setting_is_masked() -> None:
    assert {n.lower().removeprefix("centime_") for n, _, _ in BAD_SECRETS} == SECRET_SETTINGS
    assert masked("abc") == "…"
    assert masked("sk_live_x") == "sk…"  # a quarter of a short value, at most
    assert masked("sk_live_abcdefgh") == "sk_l…"
    assert masked("unix:///tmp/r.sock") == "unix://…"


def test_stripe_settings_decode_and_an_empty_value_means_unset() -> None:
    settings = load_settings(
        {
            "CENTIME_STRIPE_SECRET_KEY": "sk_test_abc",
            "CENTIME_STRIPE_PUBLISHABLE_KEY": "pk_test_abc",
            "CENTIME_STRIPE_WEBHOOK_SECRET": "whsec_abc",
            "CENTIME_STRIPE_API_BASE": "http://127.0.0.1:8420",
        }
    )
    assert (settings.stripe_secret_key, settings.stripe_api_base) == ("sk_test_abc", "http://127.0.0.1:8420")
    unset = load_settings({"CENTIME_STRIPE_SECRET_KEY": "", "CENTIME_DATABASE_URL": ""})
    assert (unset.stripe_secret_key, unset.database_url) == (None, None)
    assert (unset.topup_min_micros, unset.topup_max_micros) == (500_000, 10_000_000_000)


def test_a_topup_minimum_above_the_maximum_is_refused() -> None:
    with pytest.raises(
        SettingsError, match="CENTIME_TOPUP_MIN_MICROS=20 exceeds CENTIME_TOPUP_MAX_MICROS=10"
    ):
        load_settings({"CENTIME_TOPUP_MIN_MICROS": "20", "CENTIME_TOPUP_MAX_MICROS": "10"})


def test_an_unknown_centime_variable_is_refused() -> None:
    with pytest.raises(SettingsError, match="CENTIME_PARTITON_COUNT is not a centime setting") as raised:
        load_settings({"CENTIME_PARTITON_COUNT": "8"})
    assert "CENTIME_PARTITION_COUNT" in str(raised.value)  # the message lists the known names


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_bools_parse(raw: str, value: bool) -> None:
    assert load_settings({"CENTIME_RUN_SWEEPER": raw}).run_sweeper is value


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.partition_count = 3  # type: ignore[misc]


# wallet.charges.request_hash ------------------------------------------------------


BASE = ("debit", 1500, "completion", {"model": "m1", "user": "u"})


def test_request_hash_is_stable_and_pinned() -> None:
    # Hashes are stored in Redis and the ledger: they must not change across releases.
    kind, amount, description, metadata = BASE
    body = json.dumps([kind, amount, description, metadata], sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(body.encode()).hexdigest()[:32]
    assert request_hash(*BASE) == expected
    assert request_hash(*BASE) == request_hash(kind, amount, description, dict(reversed(metadata.items())))
    assert len(expected) == 32


@pytest.mark.parametrize(
    "changed",
    [
        ("credit", 1500, "completion", {"model": "m1", "user": "u"}),
        ("debit", 1501, "completion", {"model": "m1", "user": "u"}),
        ("debit", 1500, "completion!", {"model": "m1", "user": "u"}),
        ("debit", 1500, None, {"model": "m1", "user": "u"}),
        ("debit", 1500, "", {"model": "m1", "user": "u"}),
        ("debit", 1500, "completion", {"model": "m2", "user": "u"}),
        ("debit", 1500, "completion", {"model": "m1"}),
        ("debit", 1500, "completion", {"model": "m1", "user": "u", "x": ""}),
        ("debit", 1500, "completion", {}),
    ],
)
def test_request_hash_changes_with_each_field(changed: tuple) -> None:
    assert request_hash(*changed) != request_hash(*BASE)


# ledger.ids.uuid7 --------------------------------------------------------------------


def test_uuid7_is_version_7_with_the_rfc_variant_and_the_given_time() -> None:
    now_ms = 1_700_000_000_123
    for _ in range(100):
        value = uuid7(now_ms)
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert value.int >> 80 == now_ms
    assert uuid7().version == 7


def test_uuid7_is_time_ordered_across_milliseconds() -> None:
    ms = 1_700_000_000_000
    for step in range(1, 200):
        earlier, later = uuid7(ms + step - 1), uuid7(ms + step)
        assert earlier < later
        assert str(earlier) < str(later)  # also as text: entries page by id


def test_uuid7_has_random_bits() -> None:
    ids = {uuid7(1) for _ in range(1000)}
    assert len(ids) == 1000


def test_uuid7_follows_the_clock() -> None:
    before = datetime.now(UTC).timestamp() * 1000
    value = uuid7()
    after = datetime.now(UTC).timestamp() * 1000
    assert int(before) - 1 <= value.int >> 80 <= int(after) + 1


# ledger.accounts -------------------------------------------------------------------------


WALLET = uuid.UUID("01900000-0000-7000-8000-000000000001")


def test_debit_and_credit_lines_balance_and_move_the_wallet_the_right_way() -> None:
    debit = debit_lines(WALLET, "usd", 250)
    assert sum(line.amount_micros for line in debit) == 0
    assert {line.account_id: line.amount_micros for line in debit} == {
        WALLET: 250,  # our liability to the user falls (debit side, positive)
        system_account_id("revenue", "usd"): -250,
    }
    credit = credit_lines(WALLET, "usd", 250)
    assert sum(line.amount_micros for line in credit) == 0
    assert {line.account_id: line.amount_micros for line in credit} == {
        WALLET: -250,
        system_account_id("promotions", "usd"): 250,
    }


def test_system_accounts_are_distinct_per_kind_and_currency() -> None:
    ids = {system_account_id(kind, currency) for kind in SYSTEM_ACCOUNT_KINDS for currency in ("usd", "eur")}
    assert len(ids) == 2 * len(SYSTEM_ACCOUNT_KINDS)
    assert system_account_id("revenue", "usd") == system_account_id("revenue", "usd")
    with pytest.raises(InvariantViolation):
        system_account_id("wallet", "usd")


def _entry(**overrides: object) -> EntryRecord:
    fields: dict[str, object] = {
        "id": uuid7(),
        "kind": "debit",
        "currency": "usd",
        "wallet_id": WALLET,
        "amount_micros": 250,
        "balance_micros": 750,
        "idempotency_key": "k",
        "request_hash": "h",
        "description": "call",
        "metadata": {"a": "b"},
        "created_at": datetime(2024, 1, 2, tzinfo=UTC),
        "lines": debit_lines(WALLET, "usd", 250),
    }
    fields.update(overrides)
    return EntryRecord(**fields)  # type: ignore[arg-type]


def test_reversal_of_negates_every_line_and_points_at_the_original() -> None:
    original = _entry()
    reversal_id = reversal_id_for(original.id)
    reversal = reversal_of(original, reversal_id)
    assert reversal.id == reversal_id
    assert reversal.kind == "reversal"
    assert reversal.reverses_entry_id == original.id
    assert reversal.balance_micros is None
    assert (reversal.wallet_id, reversal.currency, reversal.amount_micros) == (WALLET, "usd", 250)
    assert [(line.account_id, line.amount_micros) for line in reversal.lines] == [
        (line.account_id, -line.amount_micros) for line in original.lines
    ]
    assert sum(line.amount_micros for line in original.lines + reversal.lines) == 0


def test_reversal_of_an_entry_without_lines_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation):
        reversal_of(_entry(lines=()), uuid7())


def test_reversal_id_is_deterministic_and_distinct() -> None:
    a, b = uuid7(), uuid7()
    assert reversal_id_for(a) == reversal_id_for(uuid.UUID(str(a)))
    assert reversal_id_for(a) != reversal_id_for(b)
    assert reversal_id_for(a) not in (a, b)


# centime.sql.load_queries ---------------------------------------------------------------------


@pytest.fixture
def sql_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A throwaway importable package; call it with the text of its sql/queries.sql."""
    name = f"sqlpkg_{secrets.token_hex(4)}"

    def make(text: str) -> str:
        (tmp_path / name / "sql").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "sql" / "queries.sql").write_text(text)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    sys.modules.pop(name, None)


def test_load_queries_reads_named_blocks(sql_package) -> None:
    package = sql_package(
        "-- A header, not a query.\n\n"
        "-- name: first\n-- Documents the query.\nSELECT 1\n\n"
        "-- name: second_one\nSELECT 2\n"
    )
    assert load_queries(package) == {"first": "-- Documents the query.\nSELECT 1", "second_one": "SELECT 2"}


def test_load_queries_rejects_a_duplicate_name(sql_package) -> None:
    package = sql_package("-- name: same\nSELECT 1\n\n-- name: other\nSELECT 2\n\n-- name: same\nSELECT 3\n")
    with pytest.raises(ValueError, match="query same defined twice"):
        load_queries(package)


def test_the_shipped_query_files_load() -> None:
    assert "insert_entries" in load_queries("ledger")
    assert "insert_wallet" in load_queries("wallet")
    assert "migrations_lock" in load_queries("centime", "queries/queries.sql")


@pytest.mark.parametrize(
    "raw",
    [
        "01a23b12-9995-71a3-9745-e71dc0721c86\n",  # Python's `$` alone would take this
        "{01a23b12-9995-71a3-9745-e71dc0721c86}",
        "urn:uuid:01a23b12-9995-71a3-9745-e71dc0721c86",
        "01a23b12999571a39745e71dc0721c86",
        "01a23b12-9995-71a3-9745-e71dc0721c8",
        "",
    ],
)
def test_an_id_is_a_uuid_only_as_the_openapi_writes_it(raw: str) -> None:
    assert parse_uuid(raw) is None
    assert re.fullmatch(UUID_PATTERN, raw) is None


def test_a_uuid_in_any_case_is_an_id() -> None:
    raw = "01A23B12-9995-71a3-9745-e71dc0721c86"
    assert parse_uuid(raw) == uuid.UUID(raw)
