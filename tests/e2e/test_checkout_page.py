"""The checkout page works in a real browser (headless Chromium): it shows the amount, hands
Stripe.js the publishable key and the client secret and mounts the Payment Element, shows
Stripe's own message for a declined card, says clearly when Stripe.js cannot load
(unreachable, hanging, or not Stripe), sends scripts only from its nonce and Stripe.js's
origin, keeps the client secret off a paid top-up's page, and shows the credit once paid.

Stripe.js is a small fake served by the test (this machine has no internet, and the real one
would need a real publishable key); the top-ups are real, paid through localstripe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest
from conftest import Keys, Server, auth, free_port, new_wallet, start_server, stop_server
from stripe_support import FakeStripe, pay, stripe_client

from centime.settings import Settings

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it with apt-get install chromium)"
)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # Chromium's sandbox refuses to start as root (CI, containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
]
VIRTUAL_TIME_MS = 15_000
"""Timers run fast in virtual time (the page's 1 s status polls, its 10 s Stripe.js wait);
virtual time stands still while a fetch is in flight, so fetches are real."""
BROWSER_TIMEOUT_S = 45.0
STRIPE_JS_WAIT_MS = 10_000  # the page's own bound on loading Stripe.js (checkout.html)
CREDIT_WAIT_S = 15.0

AMOUNT_MICROS = 10_000_000
AMOUNT_TEXT = "10.00 USD"
UNREACHABLE = "The secure payment form could not load (Stripe.js is unreachable)."
DECLINED = "Your card was declined."
SUBMITTED = "Payment submitted. Waiting for confirmation…"
CREDITED = "Payment received: your balance has been credited."


# The DOM as Chromium dumps it --------------------------------------------------------------

VOID_TAGS = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class Element(msgspec.Struct):
    tag: str
    attrs: dict[str, str | None]
    parts: list[str]

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())

    @property
    def hidden(self) -> bool:
        return "hidden" in self.attrs

    @property
    def disabled(self) -> bool:
        return "disabled" in self.attrs


class Dom(HTMLParser):
    """Elements by id, each with its attributes and its text (descendants included)."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.by_id: dict[str, Element] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        if element_id:
            self.by_id[element_id] = Element(tag, dict(attrs), [])
        if tag not in VOID_TAGS:
            self._open.append((tag, element_id))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id].parts.append(data)

    def __getitem__(self, element_id: str) -> Element:
        assert element_id in self.by_id, f"no #{element_id} in the page"
        return self.by_id[element_id]

    def stripe_calls(self) -> list[dict[str, Any]]:
        """What the page asked of the fake Stripe.js, in order."""
        return json.loads(self["fake-stripe-calls"].text) if "fake-stripe-calls" in self.by_id else []


async def browse(url: str, *, virtual_time: bool = True, stop_after_ms: int | None = None) -> Dom:
    """Opens ``url`` in a fresh headless Chromium profile and returns the DOM as it stands after
    the virtual time budget (without virtual time: once the page has loaded, or after
    ``stop_after_ms`` of real time, whichever comes first)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="centime-chromium-") as profile:
        args = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        if virtual_time:
            args.append(f"--virtual-time-budget={VIRTUAL_TIME_MS}")
        if stop_after_ms is not None:
            args.append(f"--timeout={stop_after_ms}")
        process = await asyncio.create_subprocess_exec(
            *args,
            "--dump-dom",
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a hung browser is killed whole
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), BROWSER_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise AssertionError(f"chromium did not finish {url} within {BROWSER_TIMEOUT_S} s") from None
    markup = out.decode()
    assert process.returncode == 0 and "</html>" in markup, (
        f"chromium exited with {process.returncode} on {url}:\n{err.decode()[-3000:]}"
    )
    return Dom(markup)


# A fake Stripe.js ----------------------------------------------------------------------------

FAKE_STRIPE_JS = """\
(function () {
  "use strict";
  const MODE = %(mode)s;
  const calls = [];
  function record(call) {
    calls.push(call);
    let node = document.getElementById("fake-stripe-calls");
    if (!node) {
      node = document.createElement("pre");
      node.id = "fake-stripe-calls";
      node.hidden = true;
      document.body.appendChild(node);
    }
    node.textContent = JSON.stringify(calls);
  }
  window.Stripe = function (publishableKey) {
    record({ call: "Stripe", publishableKey: publishableKey });
    return {
      elements: function (options) {
        record({ call: "elements", clientSecret: options.clientSecret });
        return {
          create: function (type) {
            record({ call: "create", type: type });
            return {
              mount: function (selector) {
                record({ call: "mount", selector: selector });
                document.querySelector(selector).textContent = "fake payment element";
                if (MODE === "declines") {  // the customer presses Pay
                  setTimeout(function () { document.getElementById("payment-form").requestSubmit(); }, 100);
                }
              },
            };
          },
        };
      },
      confirmPayment: function (params) {
        record({
          call: "confirmPayment",
          withElements: Boolean(params.elements),
          returnUrl: params.confirmParams.return_url,
          payDisabled: document.getElementById("pay").disabled,
        });
        return Promise.resolve({ error: { type: "card_error", code: "card_declined", message: %(declined)s } });
      },
    };
  };
})();
"""


LATE_JS = """\
(function () {
  "use strict";
  const node = document.createElement("pre");
  node.id = "late-stripe-js";
  node.hidden = true;
  node.textContent = JSON.stringify({ errorShown: !document.getElementById("error").hidden });
  document.body.appendChild(node);
})();
"""
LATE_MARGIN_S = 1.5
"""How long after the page's bound the hanging Stripe.js finally answers."""


class FakeStripeJs:
    """Serves Stripe.js at ``url`` as ``mode`` says: ``stripe`` (a fake Stripe that mounts),
    ``declines`` (that also presses Pay, then declines the card),
    ``not-stripe`` (JavaScript that defines no ``Stripe``) or ``hang`` (answers only after the
    page's own bound, with JavaScript that defines no ``Stripe`` but notes what the page showed
    by then)."""

    def __init__(self) -> None:
        self.mode = "stripe"
        self.requests = 0
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests += 1
                if fake.mode == "hang":
                    # Answers only after the page's own bound (or never, once released).
                    if fake.release.wait(STRIPE_JS_WAIT_MS / 1000 + LATE_MARGIN_S):
                        self.close_connection = True
                        return
                    body = LATE_JS.encode()
                elif fake.mode == "not-stripe":
                    body = b"window.NotStripe = {};\n"
                else:
                    body = (
                        FAKE_STRIPE_JS % {"mode": json.dumps(fake.mode), "declined": json.dumps(DECLINED)}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/javascript; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-stripe-js", daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return self.origin + "/v3/"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_stripe_js() -> Iterator[FakeStripeJs]:
    fake = FakeStripeJs()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def checkout_servers(
    stripe_settings: Settings, fake_stripe_js: FakeStripeJs
) -> Iterator[tuple[Server, Server]]:
    """Two more centime processes on the run's database: one loading Stripe.js from the fake,
    one from a closed port. They start side by side; Stripe's webhooks go to ``stripe_server``."""
    started: dict[str, Server] = {}
    errors: list[BaseException] = []
    urls = {"fake": fake_stripe_js.url, "unreachable": f"http://127.0.0.1:{free_port()}/v3/"}

    def start(name: str) -> None:
        try:
            started[name] = start_server(stripe_settings, CENTIME_STRIPE_JS_URL=urls[name])
        except BaseException as exc:  # surfaced below, after every start has finished
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if errors:
            raise errors[0]
        yield started["fake"], started["unreachable"]
    finally:
        for server in started.values():
            stop_server(server)


@pytest.fixture(scope="module")
def checkout_server(checkout_servers: tuple[Server, Server]) -> Server:
    return checkout_servers[0]


@pytest.fixture(scope="module")
def unreachable_server(checkout_servers: tuple[Server, Server]) -> Server:
    return checkout_servers[1]


@pytest.fixture
async def http(stripe_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stripe_server.base_url, timeout=30) as client:
        yield client


async def start_topup(
    http: httpx.AsyncClient, keys: Keys, amount_micros: int = AMOUNT_MICROS
) -> dict[str, Any]:
    wallet_id = await new_wallet(http, keys)
    response = await http.post(
        f"/v1/wallets/{wallet_id}/topups", json={"amount_micros": amount_micros}, headers=auth(keys.debit)
    )
    assert response.status_code == 201, response.text
    topup = response.json()
    assert topup["status"] == "pending" and topup["client_secret"], topup
    return topup


def assert_stripe_js_failed(dom: Dom) -> None:
    assert dom["error"].text.startswith(UNREACHABLE), dom["error"].text
    assert "Nothing was charged." in dom["error"].text
    assert not dom["error"].hidden
    assert dom["payment-form"].hidden and dom["pay"].disabled
    assert dom["loading"].hidden
    assert dom["amount"].text == AMOUNT_TEXT  # the customer still sees what they were about to pay


# Tests ---------------------------------------------------------------------------------------


async def test_the_page_shows_the_amount_and_mounts_the_payment_element(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    topup = await start_topup(http, keys)
    fake_stripe_js.mode = "stripe"
    dom = await browse(checkout_server.base_url + topup["checkout_url"])

    assert dom["amount"].text == AMOUNT_TEXT
    assert dom["amount"].attrs["data-amount-micros"] == str(AMOUNT_MICROS)
    assert dom["amount"].attrs["data-currency"] == "usd"
    assert dom["pay"].text == f"Pay {AMOUNT_TEXT}"
    assert dom["payment-element"].text == "fake payment element"
    assert not dom["payment-form"].hidden and not dom["pay"].disabled
    assert dom["loading"].hidden and dom["error"].hidden and dom["status"].hidden
    assert dom.stripe_calls() == [
        {"call": "Stripe", "publishableKey": "pk_test_centime"},
        {"call": "elements", "clientSecret": topup["client_secret"]},
        {"call": "create", "type": "payment"},
        {"call": "mount", "selector": "#payment-element"},
    ]


async def test_a_declined_card_shows_stripes_message_and_the_customer_can_retry(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    topup = await start_topup(http, keys)
    fake_stripe_js.mode = "declines"
    dom = await browse(checkout_server.base_url + topup["checkout_url"])

    confirm = dom.stripe_calls()[-1]
    assert confirm == {
        "call": "confirmPayment",
        "withElements": True,
        "returnUrl": f"{checkout_server.base_url}/checkout/{topup['id']}?returned=1",
        "payDisabled": True,  # no second submit while Stripe confirms
    }
    assert dom["error"].text == DECLINED and not dom["error"].hidden
    assert not dom["payment-form"].hidden and not dom["pay"].disabled


async def test_back_from_stripe_the_page_waits_for_the_credit(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    topup = await start_topup(http, keys)  # never paid: the webhook never comes
    requests_before = fake_stripe_js.requests
    dom = await browse(f"{checkout_server.base_url}{topup['checkout_url']}?returned=1")

    assert dom["status"].text == SUBMITTED and not dom["status"].hidden
    assert dom["payment-form"].hidden and dom["loading"].hidden and dom["error"].hidden
    assert dom["amount"].text == AMOUNT_TEXT
    assert fake_stripe_js.requests == requests_before  # back from Stripe: no second payment form


async def test_unreachable_stripe_js_shows_a_clear_error(
    http: httpx.AsyncClient, keys: Keys, unreachable_server: Server
) -> None:
    topup = await start_topup(http, keys)
    dom = await browse(unreachable_server.base_url + topup["checkout_url"])
    assert_stripe_js_failed(dom)


async def test_stripe_js_that_defines_no_stripe_shows_the_same_error(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    topup = await start_topup(http, keys)
    fake_stripe_js.mode = "not-stripe"
    dom = await browse(checkout_server.base_url + topup["checkout_url"])
    assert_stripe_js_failed(dom)


async def test_stripe_js_that_hangs_gives_up_after_the_pages_bound(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    # Virtual time stands still while a fetch is in flight, so this one runs in real time. The
    # fake answers 1.5 s after the page's 10 s bound, then notes whether the error was showing.
    topup = await start_topup(http, keys)
    fake_stripe_js.mode = "hang"
    started = time.monotonic()
    dom = await browse(
        checkout_server.base_url + topup["checkout_url"], virtual_time=False, stop_after_ms=30_000
    )
    assert time.monotonic() - started >= STRIPE_JS_WAIT_MS / 1000 + LATE_MARGIN_S
    assert json.loads(dom["late-stripe-js"].text) == {"errorShown": True}  # the page gave up first
    assert_stripe_js_failed(dom)


async def test_the_policy_allows_scripts_only_from_the_nonce_and_stripe_js(
    http: httpx.AsyncClient, keys: Keys, checkout_server: Server, fake_stripe_js: FakeStripeJs
) -> None:
    topup = await start_topup(http, keys, 1_234_560_000)
    async with httpx.AsyncClient(base_url=checkout_server.base_url, timeout=30) as page_http:
        first = await page_http.get(topup["checkout_url"])
        second = await page_http.get(topup["checkout_url"])
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    directives = dict(d.strip().split(" ", 1) for d in first.headers["content-security-policy"].split(";"))
    nonce = re.search(r'<script nonce="([^"]+)">', first.text)
    assert nonce is not None
    assert (
        directives["script-src"]
        == f"'nonce-{nonce.group(1)}' {fake_stripe_js.origin} https://*.js.stripe.com"
    )
    assert directives["default-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["base-uri"] == "'none'"
    assert fake_stripe_js.origin in directives["frame-src"]
    assert nonce.group(1) not in second.text  # a fresh nonce per response
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["referrer-policy"] == "no-referrer"
    assert first.headers["x-content-type-options"] == "nosniff"
    # The amount is server-rendered, grouped, in the currency's minor-unit digits.
    assert '<p id="amount" data-amount-micros="1234560000" data-currency="usd">1,234.56 USD</p>' in first.text
    # A pending top-up's page carries its client secret, once (Stripe.js needs it); a paid
    # one's does not (the last test).
    assert first.text.count(topup["client_secret"]) == 1


async def test_a_paid_topup_shows_the_credit_and_no_longer_carries_its_secret(
    http: httpx.AsyncClient,
    keys: Keys,
    checkout_server: Server,
    fake_stripe_js: FakeStripeJs,
    fake_stripe: FakeStripe,
) -> None:
    topup = await start_topup(http, keys)
    await pay(stripe_client(fake_stripe.base_url), topup["payment_intent_id"])
    status_url = f"{topup['checkout_url']}/status"
    deadline = time.monotonic() + CREDIT_WAIT_S
    while (status := (await http.get(status_url)).json())["status"] != "succeeded":
        assert time.monotonic() < deadline, f"not credited within {CREDIT_WAIT_S} s: {status}"
        await asyncio.sleep(0.1)
    assert status == {
        "status": "succeeded",
        "amount_micros": AMOUNT_MICROS,
        "currency": "usd",
        "credited": True,
    }

    fake_stripe_js.mode = "stripe"
    requests_before = fake_stripe_js.requests
    for url in (f"{topup['checkout_url']}?returned=1", topup["checkout_url"]):
        dom = await browse(checkout_server.base_url + url)
        assert dom["status"].text == CREDITED and not dom["status"].hidden, url
        assert dom["status"].attrs["class"] == "message success", url
        assert dom["payment-form"].hidden and dom["loading"].hidden and dom["error"].hidden, url
        assert dom["amount"].text == AMOUNT_TEXT, url
    assert fake_stripe_js.requests == requests_before  # nothing left to pay: Stripe.js not loaded

    # The client secret is only for paying: a paid top-up's page no longer carries it.
    page = await http.get(topup["checkout_url"])
    assert page.status_code == 200
    assert topup["client_secret"] not in page.text
    assert '"clientSecret":null' in page.text
