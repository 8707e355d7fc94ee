"""Face: puts the reconciler together (Stripe, the top-up service for
healing, and the wallet drift check, which `reconcile` may not import)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import msgspec

from centime.app import stripe_gateway, topups_service
from centime.settings import Settings
from reconcile.schemas import Drift, DriftReport
from reconcile.service import Reconciler
from reconcile.stripe_source import BalanceTransactions
from wallet.cache import Cache
from wallet.maintenance import find_drift

SETTLE_MARGIN_S = 1.0
"""Added to the commit timeout: how long a wallet must stay still to count as drifted."""


@contextlib.asynccontextmanager
async def reconciler(settings: Settings, pool: asyncpg.Pool, cache: Cache) -> AsyncIterator[Reconciler]:
    if settings.stripe_secret_key is None:
        raise ValueError("reconciliation needs CENTIME_STRIPE_SECRET_KEY")
    gateway = stripe_gateway(settings)
    assert gateway is not None
    source = BalanceTransactions(
        secret_key=settings.stripe_secret_key,
        api_base=settings.stripe_api_base,
        timeout_ms=settings.stripe_timeout_ms,
    )
    settle_wait_s = settings.commit_timeout_ms / 1000 + SETTLE_MARGIN_S
    timeout_s = settings.database_timeout_ms / 1000

    async def check_balances(repair: bool) -> DriftReport:
        search = await find_drift(
            pool, cache, repair=repair, settle_wait_s=settle_wait_s, quiet_s=settings.sweeper_grace_ms / 1000
        )
        return DriftReport(
            wallets_checked=search.wallets_checked,
            drifts=[msgspec.convert(msgspec.to_builtins(d), Drift) for d in search.drifts],
            unexamined=search.unexamined,
        )

    try:
        yield Reconciler(
            pool=pool,
            topups=topups_service(pool, cache, gateway, settings),
            stripe=source,
            check_balances=check_balances,
            timeout_s=timeout_s,
        )
    finally:
        await source.close()
        await gateway.close()
