"""Stripe's balance transactions of a window, a bounded page at a time, with
retries and backoff when Stripe is rate limiting or failing. Uses only the
real Stripe API (`GET /v1/balance_transactions` with `created` filters)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import msgspec
import stripe

from reconcile.schemas import BalanceTransaction

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_SIZE = 100
"""Stripe's largest page."""
PAGES_MAX = 100_000
"""10 million transactions: a window larger than this is refused, not truncated."""
ATTEMPTS_MAX = 6
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class StripeListFailed(Exception):
    """Stripe kept failing past the retries, or refused the request."""


class BalanceTransactions:
    def __init__(self, *, secret_key: str, api_base: str, timeout_ms: int) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout_ms / 1000)
        # Retries here, not in the library: rate limits get their own backoff.
        self._client = stripe.StripeClient(
            secret_key, base_addresses={"api": api_base}, http_client=self._http, max_network_retries=0
        )

    async def close(self) -> None:
        await self._http.close_async()

    async def pages(self, since: datetime, until: datetime) -> AsyncIterator[list[BalanceTransaction]]:
        """Every balance transaction created in [since, until), newest first,
        one page at a time."""
        params: dict = {
            "created": {"gte": int(since.timestamp()), "lt": int(until.timestamp())},
            "limit": PAGE_SIZE,
        }
        for _page in range(PAGES_MAX):
            page = await self._page(params)
            items = [msgspec.convert(item, BalanceTransaction, strict=False) for item in page.get("data", [])]
            if items:
                yield items
            if not page.get("has_more") or not items:
                return
            params = {**params, "starting_after": items[-1].id}
        raise StripeListFailed(f"more than {PAGES_MAX * PAGE_SIZE} balance transactions in one window")

    async def known(self, object_id: str) -> bool:
        """Whether Stripe has a balance transaction with this id (txn_), or
        caused by this object, at any time."""
        if object_id.startswith("txn_"):
            try:
                await self._retrying(lambda: self._client.v1.balance_transactions.retrieve_async(object_id))
            except StripeListFailed as exc:
                if isinstance(exc.__cause__, stripe.InvalidRequestError) and exc.__cause__.http_status == 404:
                    return False
                raise
            return True
        page = await self._page({"source": object_id, "limit": 1})
        return bool(page.get("data"))

    async def _page(self, params: dict) -> dict:
        page = await self._retrying(lambda: self._client.v1.balance_transactions.list_async(params=params))
        return page.to_dict()

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        delay_s = BACKOFF_FIRST_S
        for attempt in range(1, ATTEMPTS_MAX + 1):
            try:
                return await call()
            except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
                if attempt == ATTEMPTS_MAX:
                    raise StripeListFailed(f"Stripe kept failing after {attempt} attempts: {exc}") from exc
                log.warning("listing balance transactions: %r; retry %d in %.1f s", exc, attempt, delay_s)
                await asyncio.sleep(delay_s * (0.5 + random.random()))
                delay_s = min(delay_s * 2, BACKOFF_MAX_S)
            except stripe.StripeError as exc:
                raise StripeListFailed(f"Stripe refused the balance transaction list: {exc}") from exc
        raise AssertionError("unreachable")
