"""A fake Stripe for tests: localstripe run in-process on 127.0.0.1, extended by monkeypatching.

Run it as ``python -m tests.fake_stripe --port N [--fee-percent-bps 290 --fee-fixed-minor 30]``
(``--port 0`` picks a free port). Once it serves, it prints one line to stdout,
``fake stripe listening on 127.0.0.1:<port>``, and flushes.

What it changes in localstripe, at startup only (localstripe itself is never edited):

- No persistence: ``Store.dump_to_disk`` and ``Store.try_load_from_disk`` are no-ops, so
  nothing reads or writes the shared ``/tmp/localstripe.pickle``; every process starts empty.
- Fees: balance transactions of type ``charge`` get ``fee = stripe_fee(amount, bps, fixed)``
  (half-up rounding) and one ``stripe_fee`` entry in ``fee_details``; ``net`` is
  ``amount - fee``. Refund transactions keep fee 0, as on Stripe. Default fee is 0.
- ``GET /v1/balance_transactions`` as on Stripe: filters ``created`` (an integer, or
  ``created[gt|gte|lt|lte]``), ``type``, ``source``, ``currency``; cursors ``starting_after``
  and ``ending_before``; ``limit`` 1..100 (default 10); newest first (ties: newest created
  first); ``expand[]=data.source``. Unknown parameters and unknown cursors are rejected.
- Idempotency: a POST repeating an ``Idempotency-Key`` with the same method, path and body
  replays the first response (header ``Idempotent-Replayed: true``); with other parameters it
  gets 400 ``idempotency_error``; while the first is still running, 409. 2xx and 402 responses
  are kept; other errors are not (as Stripe does for failed validation).
- ``PaymentIntent.latest_charge`` is the charge id unless expanded (localstripe always
  inlined the charge object); ``expand[]=latest_charge.balance_transaction`` works.
- ``Refund.payment_intent`` is filled from the charge when the refund names only the charge.
- ``POST /_config/balance_transactions`` (JSON, no auth) adds a balance transaction of any
  type, e.g. a dispute ``adjustment``, optionally with a past ``created``, for reconciler tests.
- ``DELETE /_config/data`` (localstripe's flush) also forgets idempotency keys (and disputes).
- Ids as long as Stripe's: a prefix and 24 characters (``re_`` ids are 27 long), not 14.
- Disputes (localstripe has none): ``POST /_config/disputes`` (JSON, no auth) stores a dispute
  object as given (tests build it with ``stripe_support.make_dispute``); ``GET
  /v1/disputes/{id}`` returns it.
- Outages: ``POST /_config/outage`` (JSON, no auth) with ``{"mode": ..., "path_prefix": "/v1/"}``
  makes every request under the prefix fail until ``{"mode": "off"}``: ``drop`` cuts the
  connection before handling it (Stripe unreachable: nothing happens), ``lose_answer`` handles
  it and then cuts the connection (Stripe acted, the answer was lost), ``error`` answers
  ``status`` (default 500) with a Stripe error body (``api_error``, or
  ``authentication_error`` for 401).

This module imports nothing from the product packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import signal
import sys
from typing import Any

from aiohttp import web

LISTEN_HOST = "127.0.0.1"
READY_PREFIX = "fake stripe listening on"


def stripe_fee(amount: int, fee_bps: int, fee_fixed_minor: int) -> int:
    """The fee on a charge of ``amount`` minor units: ``amount * bps / 10000`` rounded half up,
    plus the fixed part. 0 when both parts are 0."""
    if fee_bps == 0 and fee_fixed_minor == 0:
        return 0
    return (abs(amount) * fee_bps + 5_000) // 10_000 + fee_fixed_minor


def _disable_persistence(resources: Any) -> None:
    def _no_op(self: Any) -> None:
        return None

    resources.Store.dump_to_disk = _no_op
    resources.Store.try_load_from_disk = _no_op


STRIPE_ID_CHARS = 24
"""Characters after an id's prefix on Stripe (``re_`` + 24 = 27); localstripe makes 14."""


def _install_stripe_id_length(resources: Any) -> None:
    original = resources.random_id

    def random_id(n: int) -> str:
        return original(STRIPE_ID_CHARS if n == 14 else n)

    resources.random_id = random_id


def _add_dispute_routes(app: web.Application) -> None:
    from localstripe.errors import UserError

    disputes: dict[str, dict[str, Any]] = {}

    async def store(request: web.Request) -> web.StreamResponse:
        dispute = await request.json()
        if not isinstance(dispute, dict) or not str(dispute.get("id", "")).startswith("dp_"):
            raise UserError(400, "Expected a dispute object with an id dp_...")
        disputes[dispute["id"]] = dispute
        return web.json_response(dispute)

    async def retrieve(request: web.Request) -> web.StreamResponse:
        dispute = disputes.get(request.match_info["id"])
        if dispute is None:
            raise UserError(
                404, f"No such dispute: '{request.match_info['id']}'", {"code": "resource_missing"}
            )
        return web.json_response(dispute)

    async def forget(request: web.Request) -> web.StreamResponse:
        disputes.clear()
        return web.json_response({})

    app.router.add_post("/_config/disputes", store)
    app.router.add_get("/v1/disputes/{id}", retrieve)
    app.router.add_delete("/_config/disputes", forget)


def _install_fee_rule(resources: Any, fee_bps: int, fee_fixed_minor: int) -> None:
    original_init = resources.BalanceTransaction.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.type == "charge":
            fee = stripe_fee(self.amount, fee_bps, fee_fixed_minor)
            if fee:
                self.fee = fee
                self.fee_details = [
                    {
                        "amount": fee,
                        "application": None,
                        "currency": self.currency,
                        "description": "Stripe processing fees",
                        "type": "stripe_fee",
                    }
                ]

    resources.BalanceTransaction.__init__ = __init__


class _Page:
    """A list response in Stripe's shape (``object``, ``url``, ``has_more``, ``data``)."""

    def __init__(self, url: str, items: list[Any], has_more: bool) -> None:
        self.url = url
        self.items = items
        self.has_more = has_more

    def _export(self, expand: Any = None) -> dict[str, Any]:
        from localstripe.errors import UserError

        expand = [] if expand is None else expand
        if not isinstance(expand, list) or not all(isinstance(p, str) for p in expand):
            raise UserError(400, "Bad request")
        inner = []
        for path in expand:
            if not path.startswith("data."):
                raise UserError(400, f"This property cannot be expanded ({path}).")
            inner.append(path.removeprefix("data."))
        return {
            "object": "list",
            "url": self.url,
            "has_more": self.has_more,
            "data": [item._export(expand=inner) for item in self.items],
        }


def _int_param(name: str, value: Any) -> int:
    from localstripe.errors import UserError

    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(400, f"Invalid integer: {name}={value!r}", {"param": name}) from None


def _created_filters(created: Any) -> list[Any]:
    from localstripe.errors import UserError

    if created is None:
        return []
    if not isinstance(created, dict):
        at = _int_param("created", created)
        return [lambda t: t.created == at]
    tests = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    filters = []
    for op, raw in created.items():
        if op not in tests:
            raise UserError(400, f"Received unknown parameter: created[{op}]", {"param": f"created[{op}]"})
        bound = _int_param(f"created[{op}]", raw)
        filters.append(lambda t, test=tests[op], bound=bound: test(t.created, bound))
    return filters


def _install_balance_transaction_list(resources: Any) -> None:
    from localstripe.errors import UserError

    prefix = resources.BalanceTransaction.object + ":"

    def _api_list_all(
        cls: Any,
        url: str,
        limit: Any = None,
        starting_after: Any = None,
        ending_before: Any = None,
        created: Any = None,
        type: Any = None,
        source: Any = None,
        currency: Any = None,
        **unknown: Any,
    ) -> _Page:
        if unknown:
            name = sorted(unknown)[0]
            raise UserError(400, f"Received unknown parameter: {name}", {"param": name})
        limit = 10 if limit is None else _int_param("limit", limit)
        if not 1 <= limit <= 100:
            raise UserError(400, "limit must be between 1 and 100", {"param": "limit"})
        if starting_after is not None and ending_before is not None:
            raise UserError(400, "You may only specify one of starting_after and ending_before")
        filters = _created_filters(created)
        for name, wanted in (("type", type), ("source", source), ("currency", currency)):
            if wanted is not None:
                if not isinstance(wanted, str):
                    raise UserError(400, f"Invalid string: {name}", {"param": name})
                filters.append(lambda t, name=name, wanted=wanted: getattr(t, name) == wanted)

        # Newest first; the store keeps insertion order, which breaks ties within a second.
        everything = [v for k, v in resources.store.items() if k.startswith(prefix)]
        everything.reverse()
        everything.sort(key=lambda t: t.created, reverse=True)

        def position(cursor: Any, param: str) -> int:
            for i, txn in enumerate(everything):
                if txn.id == cursor:
                    return i
            raise UserError(
                404, f"No such balance_transaction: '{cursor}'", {"code": "resource_missing", "param": param}
            )

        def matches(txn: Any) -> bool:
            return all(f(txn) for f in filters)

        if ending_before is not None:
            before = [t for t in everything[: position(ending_before, "ending_before")] if matches(t)]
            return _Page(url, before[-limit:], len(before) > limit)
        start = 0 if starting_after is None else position(starting_after, "starting_after") + 1
        after = [t for t in everything[start:] if matches(t)]
        return _Page(url, after[:limit], len(after) > limit)

    resources.BalanceTransaction._api_list_all = classmethod(_api_list_all)


def _install_latest_charge_as_id(resources: Any) -> None:
    original_export = resources.PaymentIntent._export

    def _export(self: Any, expand: Any = None) -> dict[str, Any]:
        charge = self.latest_charge
        if not isinstance(expand, list | None) or charge is None:
            return original_export(self, expand=expand)
        paths = expand or []
        own = [p for p in paths if p != "latest_charge" and not p.startswith("latest_charge.")]
        inner = [p.removeprefix("latest_charge.") for p in paths if p.startswith("latest_charge.")]
        obj = original_export(self, expand=own)
        if inner or "latest_charge" in paths:
            obj["latest_charge"] = charge._export(expand=inner)
        else:
            obj["latest_charge"] = charge.id
        return obj

    resources.PaymentIntent._export = _export


def _install_refund_payment_intent(resources: Any) -> None:
    original_init = resources.Refund.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.payment_intent is None:
            self.payment_intent = resources.Charge._api_retrieve(self.charge).payment_intent

    resources.Refund.__init__ = __init__


def _idempotency_middleware() -> Any:
    """Replays POSTs that reuse an Idempotency-Key, the way Stripe does."""
    from localstripe.errors import UserError

    kept: dict[str, tuple[str, int, bytes]] = {}
    running: set[str] = set()

    def error(status: int, message: str) -> web.StreamResponse:
        response = UserError(status, message).to_response()
        response_body = response.body
        assert isinstance(response_body, bytes)
        body = response_body.replace(b'"invalid_request_error"', b'"idempotency_error"')
        return web.Response(body=body, status=status, content_type="application/json")

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "DELETE" and request.path == "/_config/data":
            kept.clear()
            return await handler(request)
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key or request.path.startswith("/_config/"):
            return await handler(request)
        body = await request.read()  # cached by aiohttp, the handler reads it again
        fingerprint = hashlib.sha256(request.path.encode() + b"\0" + body).hexdigest()
        if key in running:
            return error(409, "There is currently another in-progress request using this Idempotent Key.")
        if key in kept:
            first_fingerprint, status, first_body = kept[key]
            if first_fingerprint != fingerprint:
                return error(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with.",
                )
            return web.Response(
                body=first_body,
                status=status,
                content_type="application/json",
                headers={"Idempotent-Replayed": "true", "Idempotency-Key": key},
            )
        running.add(key)
        try:
            response = await handler(request)
        finally:
            running.discard(key)
        if (200 <= response.status < 300 or response.status == 402) and isinstance(response, web.Response):
            response_body = response.body
            if isinstance(response_body, bytes):
                kept[key] = (fingerprint, response.status, response_body)
        return response

    return middleware


OUTAGE_MODES = ("off", "drop", "lose_answer", "error")


def _outage_middleware(app: web.Application) -> Any:
    """Fails requests the way an unreachable or failing Stripe would (see the module doc)."""
    from localstripe.errors import UserError

    outage: dict[str, Any] = {"mode": "off", "path_prefix": "/v1/", "status": 500}

    async def configure(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            mode = body["mode"]
            assert mode in OUTAGE_MODES
            path_prefix = str(body.get("path_prefix", "/v1/"))
            status = int(body.get("status", 500))
            assert 400 <= status <= 599
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(400, f"Expected JSON with mode in {OUTAGE_MODES}") from None
        outage.update(mode=mode, path_prefix=path_prefix, status=status)
        return web.json_response(outage)

    app.router.add_post("/_config/outage", configure)

    def cut(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()  # a reset, no answer
        return web.Response(status=500)  # never sent

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        mode = outage["mode"]
        if mode == "off" or not request.path.startswith(outage["path_prefix"]):
            return await handler(request)
        if mode == "drop":
            return cut(request)
        if mode == "lose_answer":
            await handler(request)
            return cut(request)
        kind = "authentication_error" if outage["status"] == 401 else "api_error"
        body = {"error": {"type": kind, "message": f"fake outage: {outage['status']}"}}
        return web.json_response(body, status=outage["status"])

    return middleware


def _add_balance_transaction_route(app: web.Application, resources: Any) -> None:
    from localstripe.errors import UserError

    async def add_balance_transaction(request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
            assert isinstance(data, dict)
            amount = data["amount"]
            currency = data["currency"]
            assert isinstance(amount, int) and isinstance(currency, str) and currency
            fee = int(data.get("fee", 0))
            kind = str(data.get("type", "adjustment"))
            count = int(data.get("count", 1))
            assert 1 <= count <= 100_000
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(400, "Expected JSON with integer amount and currency") from None
        if count > 1:  # many alike, each source suffixed with its number: {"count": N, ...}
            source = data.get("source")
            for number in range(count):
                one = {**data, "count": 1, "source": f"{source}_{number}" if source else None}
                add_one(one, amount, currency, fee, kind)
            return web.json_response({"added": count})
        return web.json_response(add_one(data, amount, currency, fee, kind)._export())

    def add_one(data: dict, amount: int, currency: str, fee: int, kind: str) -> Any:
        txn = resources.BalanceTransaction.__new__(resources.BalanceTransaction)
        resources.StripeObject.__init__(txn)  # gives id, created, livemode and stores it
        if data.get("created") is not None:
            txn.created = int(data["created"])
        txn.amount = amount
        txn.available_on = int(data.get("available_on", txn.created))
        txn.currency = currency
        txn.description = data.get("description")
        txn.exchange_rate = data.get("exchange_rate")
        txn.fee = fee
        txn.fee_details = data.get(
            "fee_details",
            [
                {
                    "amount": fee,
                    "application": None,
                    "currency": currency,
                    "description": None,
                    "type": "stripe_fee",
                }
            ]
            if fee
            else [],
        )
        txn.reporting_category = str(data.get("reporting_category", kind))
        txn.source = data.get("source")
        txn.status = str(data.get("status", "available"))
        txn.type = kind
        return txn

    async def set_fee(request: web.Request) -> web.StreamResponse:
        """Change a transaction's fee (tests: a fee Stripe settles after the webhook read it)
        and, given `created`, its time (tests: a transaction of another day)."""
        txn = resources.BalanceTransaction._api_retrieve(request.match_info["id"])
        try:
            body = await request.json()
            fee = int(body.get("fee", txn.fee))
            if body.get("created") is not None:
                txn.created = int(body["created"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(400, "Expected JSON with an integer fee or created") from None
        txn.fee = fee
        txn.fee_details = (
            [
                {
                    "amount": fee,
                    "application": None,
                    "currency": txn.currency,
                    "description": None,
                    "type": "stripe_fee",
                }
            ]
            if fee
            else []
        )
        return web.json_response(txn._export())

    app.router.add_post("/_config/balance_transactions", add_balance_transaction)
    app.router.add_post("/_config/balance_transactions/{id}", set_fee)


def build_app(fee_bps: int = 0, fee_fixed_minor: int = 0) -> web.Application:
    """localstripe's app with the patches above. Call once per process."""
    from localstripe import resources

    _disable_persistence(resources)
    _install_stripe_id_length(resources)
    _install_fee_rule(resources, fee_bps, fee_fixed_minor)
    _install_balance_transaction_list(resources)
    _install_latest_charge_as_id(resources)
    _install_refund_payment_intent(resources)

    from localstripe.server import app

    app.middlewares.insert(0, _idempotency_middleware())
    app.middlewares.insert(0, _outage_middleware(app))  # outermost: a lost answer was still kept
    _add_balance_transaction_route(app, resources)
    _add_dispute_routes(app)
    return app


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LISTEN_HOST, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"{READY_PREFIX} {LISTEN_HOST}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_stripe", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--fee-percent-bps", type=int, default=0, help="percentage fee in basis points")
    parser.add_argument("--fee-fixed-minor", type=int, default=0, help="fixed fee in minor units")
    args = parser.parse_args(argv)
    app = build_app(args.fee_percent_bps, args.fee_fixed_minor)
    asyncio.run(serve(app, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
