"""The app factory: opens Postgres and Redis once, composes the services,
and renders every error as RFC 9457 problem+json with a stable code."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import hmac
import logging
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import redis.asyncio as redis
from litestar import Litestar, MediaType, Request, Response, get, head
from litestar.datastructures import ResponseHeader, State
from litestar.di import Provide
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from centime import metrics
from centime.access import observed
from centime.api_reference import ApiReference
from centime.auth import PUBLIC_SCOPE, KeyStore, check_route_scopes, require_scope
from centime.errors import CentimeError, Unauthorized
from centime.fast_debits import fast_debits
from centime.logs import AccessLog, configure_logging
from centime.settings import Settings, load_settings
from centime.wire import (
    REQUEST_BODY_BYTES_MAX,
    STORAGE_ERRORS,
    check_query,
    problem_answer,
    problem_body,
)
from ledger.writer import LedgerWriter
from reconcile.api import ReconciliationController
from topup.api import (
    STRIPE_SIGNATURE_SCHEME,
    STRIPE_SIGNATURE_SECURITY,
    CheckoutController,
    TopUpController,
    state_topup_bounds,
)
from topup.gateway import StripeGateway
from topup.service import TopUps
from wallet.api import DebitBatchController, HoldController, WalletController
from wallet.cache import Cache
from wallet.for_topups import TopUpWallets
from wallet.holds import Holds
from wallet.service import Wallets
from wallet.sweeper import SweepReport, run_sweeper
from wallet.tick_client import TickClient
from wallet.write_through import CommitResult

log = logging.getLogger("centime")
PROBLEM_JSON = "application/problem+json"
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
"""On every problem: a browser never reads an error body as anything but JSON."""


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    metrics.errors_total.labels(code).inc()
    return Response(
        problem_body(status, code, title, detail, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=NOSNIFF,
    )


def _raised_error(_: Request, exc: Exception) -> Response[dict[str, Any]]:
    """A CentimeError, a storage error or anything else (centime.wire.problem_answer)."""
    answer = problem_answer(exc)
    return Response(
        answer.body, status_code=answer.status, media_type=PROBLEM_JSON, headers={**answer.headers, **NOSNIFF}
    )


def _field_name(error: dict[str, Any]) -> str:
    """The name a client knows: a header's own name, not the argument's."""
    key = str(error.get("key") or "body")
    if error.get("source") == "header":
        return "-".join(part.capitalize() for part in key.split("_"))
    return "body" if key == "data" else key


_MISSING_PARAMETER = re.compile(r"Missing required \w+ parameter '([^']+)'")


def _validation_error(_: Request, exc: ValidationException) -> Response[dict[str, Any]]:
    errors = [e for e in exc.extra if isinstance(e, dict)] if isinstance(exc.extra, list) else []
    fields = [_field_name(e) for e in errors]
    detail = (
        "; ".join(f"{name}: {e.get('message')}" for name, e in zip(fields, errors, strict=True)) or exc.detail
    )
    missing = _MISSING_PARAMETER.match(exc.detail or "")
    if not errors and missing:
        fields = [missing[1]]  # Litestar lists no error for a missing parameter: name it
    return problem(400, "invalid_request", "Invalid request", detail, fields=fields)


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _http_error(_: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's own refusals; their headers kept (a 405's `Allow`)."""
    code = _HTTP_CODES.get(exc.status_code, "http_error" if exc.status_code < 500 else "internal_error")
    response = problem(exc.status_code, code, code.replace("_", " ").capitalize(), exc.detail)
    response.headers.update(exc.headers or {})
    return response


def allowed_methods(app: Litestar) -> dict[str, str]:
    """The `Allow` answer of each path template: every method it serves.
    Litestar's own OPTIONS answer names only the methods of the first
    handler registered on a path (GET /v1/wallets was missing)."""
    methods: dict[str, set[str]] = {}
    for route in app.routes:
        methods.setdefault(route.path_format, set()).update(route.methods)
    return {path: ", ".join(sorted(names)) for path, names in methods.items()}


async def truthful_options(message: Message, scope: Scope) -> None:
    """A before_send hook: an OPTIONS answer's `Allow` is what allowed_methods says."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    allow_by_path: dict[str, bytes] = scope["app"].state.allow_by_path
    value = allow_by_path.get(scope.get("path_template", ""))
    if value is not None:
        headers = [(name, old) for name, old in message.get("headers", []) if name.lower() != b"allow"]
        message["headers"] = [*headers, (b"allow", value)]


API_KEY_SCHEME = "apiKey"
_API_KEY_SECURITY = SecurityScheme(
    type="http",
    scheme="bearer",
    description="An API key made by `centime api-key create`: `Authorization: Bearer ck_...`. "
    "Scopes nest: admin can do everything, debit can also read, read only reads; "
    "each operation names the scope it needs.",
)


def state_api_keys(app: Litestar) -> None:
    """Every route that names a scope (centime.auth.require_scope) says in the
    OpenAPI that it needs a bearer API key of that scope; the public ones (the
    Stripe webhook, which Stripe signs) need none."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            scope = handler.opt.get("scope")
            if scope is not None and scope != PUBLIC_SCOPE:
                handler.security = [{API_KEY_SCHEME: [scope]}]


def refuse_bad_query(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: a query parameter that is not UTF-8 text without NUL
    is a 400 (centime.wire.check_query), before the guard or any handler
    touches storage."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            check_query(scope["query_string"])
        await app(scope, receive, send)

    return middleware


async def _wallets(state: State) -> Wallets:
    return state.wallets


async def _holds(state: State) -> Holds:
    return state.holds


async def _topups(state: State) -> TopUps:
    return state.topups


def _owner_ids(request: Request) -> frozenset[str] | None:
    """The owners whose wallets the request's API key sees (None: every owner)."""
    return request.scope["state"]["api_key"].owner_ids


def topups_service(
    pool: asyncpg.Pool, cache: Cache, gateway: StripeGateway | None, settings: Settings
) -> TopUps:
    """The top-up service on these stores, reaching wallets through wallet.for_topups."""
    timeout_s = settings.database_timeout_ms / 1000
    wallets = TopUpWallets(pool=pool, cache=cache, timeout_s=timeout_s)
    return TopUps(pool=pool, wallets=wallets, gateway=gateway, settings=settings)


def stripe_gateway(settings: Settings) -> StripeGateway | None:
    """The Stripe client, or None when no secret key is set (top-ups off)."""
    if settings.stripe_secret_key is None:
        return None
    return StripeGateway(
        secret_key=settings.stripe_secret_key,
        webhook_secret=settings.stripe_webhook_secret,
        api_base=settings.stripe_api_base,
        timeout_ms=settings.stripe_timeout_ms,
    )


@get("/healthz", include_in_schema=False, media_type=MediaType.TEXT)
async def healthz() -> str:
    return "ok"


@head("/healthz", include_in_schema=False)
async def healthz_head() -> None:
    """What load balancers send: 200, no body."""


async def _readiness(state: State) -> dict[str, str]:
    checks = {}
    try:
        async with state.pool.acquire(timeout=1) as conn:
            await conn.fetchval("SELECT 1", timeout=1)
        checks["postgres"] = "ok"
    except Exception as exc:  # the reason goes to the log, not to whoever asks
        log.warning("readyz: Postgres did not answer: %r", exc)
        checks["postgres"] = "down"
    try:
        await asyncio.wait_for(state.cache.client.ping(), 1)
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("readyz: Redis did not answer: %r", exc)
        checks["redis"] = "down"
    return checks


def _ready_status(checks: dict[str, str]) -> int:
    return 200 if all(v == "ok" for v in checks.values()) else 503


@get("/readyz", include_in_schema=False)
async def readyz(state: State) -> Response[dict[str, str]]:
    checks = await _readiness(state)
    return Response(checks, status_code=_ready_status(checks))


@head("/readyz", include_in_schema=False)
async def readyz_head(state: State) -> Response[None]:
    return Response(None, status_code=_ready_status(await _readiness(state)))


def check_metrics_token(authorization: str, token: str | None) -> None:
    """With CENTIME_METRICS_TOKEN set, /metrics needs `Authorization: Bearer
    <token>`, compared in constant time; unset, it is open."""
    if token is None:
        return
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise Unauthorized("send the metrics token: Authorization: Bearer <CENTIME_METRICS_TOKEN>")


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request, state: State) -> Response[bytes]:
    check_metrics_token(request.headers.get("authorization", ""), state.metrics_token)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


REDIS_CONNECTIONS_MAX = 256


def redis_client(url: str, settings: Settings) -> redis.Redis:
    """A client whose pool waits (bounded) for a free connection instead of
    failing at once under load. No automatic retries: a retried EVALSHA would
    look like a replay; the debit path settles Redis errors itself."""
    timeout_s = settings.redis_timeout_ms / 1000
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS_MAX,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


async def _key_store(pool: asyncpg.Pool, settings: Settings, timeout_s: float) -> KeyStore:
    """The process's API key cache, holding the keys used lately."""
    key_store = KeyStore(pool, ttl_s=settings.api_key_cache_ttl_s, timeout_s=timeout_s)
    try:
        log.info("cached %d API keys used lately", await key_store.warm())
    except STORAGE_ERRORS as exc:  # they are looked up on first use instead
        log.warning("could not cache the API keys used lately: %r", exc)
    return key_store


def serve_app() -> ASGIApp:
    """What `centime serve` serves."""
    settings = load_settings()
    return served(create_app(settings), settings)


def served(app: Litestar, settings: Settings) -> ASGIApp:
    """The app with the fast debit path in front, each request observed
    (centime.access: its id, its count, its access line), and this process's
    logging set up (a server's worker processes do not inherit it)."""
    configure_logging(settings.log_level, settings.log_format)
    inner = fast_debits(app) if settings.fast_debits else app
    access_log = None
    if settings.access_log:
        access_log = AccessLog(sys.stderr, json=settings.log_format == "json")
        atexit.register(access_log.flush)
    return observed(inner, access_log)


async def _open_stores(settings: Settings, stack: contextlib.AsyncExitStack) -> tuple[asyncpg.Pool, Cache]:
    """The Postgres pool and the Redis cache, closed by `stack`."""
    assert settings.database_url is not None and settings.redis_url is not None
    timeout_s = settings.database_timeout_ms / 1000
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.database_pool_max,
        command_timeout=timeout_s,
        timeout=timeout_s,
    )
    stack.push_async_callback(pool.close)
    client = redis_client(settings.redis_url, settings)
    stack.push_async_callback(client.aclose)
    tick = TickClient(settings.redis_url, timeout_s=settings.redis_timeout_ms / 1000)
    stack.push_async_callback(tick.close)
    cache = Cache(client, prefix=settings.redis_prefix, partition_count=settings.partition_count, tick=tick)
    return pool, cache


def _ledger_writer(settings: Settings) -> LedgerWriter[CommitResult]:
    """The group-commit writer, not started: its after-commit step is the
    wallet service's, given at start()."""
    assert settings.database_url is not None
    database_url = settings.database_url
    timeout_s = settings.database_timeout_ms / 1000
    return LedgerWriter(
        lambda: asyncpg.connect(database_url, timeout=timeout_s, command_timeout=timeout_s),
        batch_entries_max=settings.commit_batch_entries_max,
        connections=settings.commit_connections,
        timeout_s=timeout_s,
        queue_wait_max_s=settings.commit_timeout_ms / 1000,
        observe_batch=metrics.commit_batch_entries.observe,
    )


SETTLED_HOW = (
    "orphans_committed",
    "orphans_reversed",
    "abandoned_reversed",
    "abandoned_refunded",
    "changes_applied",
    "holds_expired",
)
"""The fields of a SweepReport that count as settled (`SweepReport.settled`),
each a `how` of centime_sweeper_settled_total."""


def record_sweep_pass(report: SweepReport, depth: int) -> None:
    """A sweeper pass, in /metrics: what it settled, by how, and the outbox left."""
    for how in SETTLED_HOW:
        count = getattr(report, how)
        if count:
            metrics.sweeper_settled_total.labels(how).inc(count)
    metrics.outbox_depth.set(depth)


async def _compose(app: Litestar, settings: Settings, stack: contextlib.AsyncExitStack) -> None:
    """Open the stores, make the services into app.state, start the
    background work; `stack` undoes it all, last first."""
    pool, cache = await _open_stores(settings, stack)
    timeout_s = settings.database_timeout_ms / 1000
    writer = _ledger_writer(settings)
    wallets = Wallets(pool=pool, cache=cache, writer=writer, settings=settings)
    gateway = stripe_gateway(settings)
    if gateway is not None:
        stack.push_async_callback(gateway.close)
    key_store = await _key_store(pool, settings, timeout_s)
    app.state.update(
        pool=pool,
        cache=cache,
        wallets=wallets,
        holds=Holds(wallets=wallets),
        topups=topups_service(pool, cache, gateway, settings),
        timeout_s=timeout_s,
        key_store=key_store,
        metrics_token=settings.metrics_token,
    )
    writer.start(after_commit=wallets.after_commit)
    stack.push_async_callback(writer.stop)
    stack.push_async_callback(key_store.close)
    # What exists now lives as long as the process: out of the collector's
    # sight, so its full collections stop walking it (p99 of a debit under
    # load 39 -> 15 ms, docs/performance.md).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    sweeper = None
    if settings.run_sweeper:
        sweeper = asyncio.create_task(
            run_sweeper(pool, cache, settings, stop=stop, on_pass=record_sweep_pass)
        )
    key_store.watch(stop)

    async def halt() -> None:
        stop.set()
        if sweeper is not None:
            await sweeper

    stack.push_async_callback(halt)


def _exception_handlers() -> dict[type[Exception], Any]:
    """Every error as one problem+json (centime.wire.problem_answer)."""
    return {
        CentimeError: _raised_error,
        ValidationException: _validation_error,
        NotAuthorizedException: _http_error,
        PermissionDeniedException: _http_error,
        HTTPException: _http_error,
        **dict.fromkeys(STORAGE_ERRORS, _raised_error),
        Exception: _raised_error,
    }


def _openapi_config() -> OpenAPIConfig:
    """The schema at /schema/openapi.json, its security schemes, and the offline reference page."""
    return OpenAPIConfig(
        title="centime",
        version="0.1.0",
        description="Wallets and a double-entry ledger for micro-payments.",
        path="/schema",
        components=Components(
            security_schemes={
                API_KEY_SCHEME: _API_KEY_SECURITY,
                STRIPE_SIGNATURE_SCHEME: STRIPE_SIGNATURE_SECURITY,
            }
        ),
        render_plugins=[ApiReference()],
    )


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()
    if settings.database_url is None or settings.redis_url is None:
        raise SystemExit("CENTIME_DATABASE_URL and CENTIME_REDIS_URL must be set (centime serve sets them)")

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await _compose(app, settings, stack)
            yield

    app = Litestar(
        route_handlers=[
            WalletController,
            HoldController,
            DebitBatchController,
            TopUpController,
            CheckoutController,
            ReconciliationController,
            healthz,
            healthz_head,
            readyz,
            readyz_head,
            metrics_endpoint,
        ],
        lifespan=[lifespan],
        guards=[require_scope],
        middleware=[refuse_bad_query],
        before_send=[truthful_options],
        dependencies={
            "wallets": Provide(_wallets),
            "holds": Provide(_holds),
            "topups": Provide(_topups),
            "owner_ids": Provide(_owner_ids, sync_to_thread=False),
        },
        exception_handlers=_exception_handlers(),
        openapi_config=_openapi_config(),
        response_headers=[
            ResponseHeader(
                name="X-Request-Id",
                description="The request's id: the client's X-Request-Id if it is 1..64 characters of "
                "[A-Za-z0-9._-], else one the server made. Log lines of the request and a 5xx problem carry it.",
                documentation_only=True,  # centime.access sets it, on every answer
            )
        ],
        request_max_body_size=REQUEST_BODY_BYTES_MAX,
        logging_config=None,  # centime.logs configures logging; Litestar's would take the root logger
        debug=False,
    )
    check_route_scopes(app)  # deny by default: an unscoped /v1 route does not start
    app.state.allow_by_path = {path: value.encode() for path, value in allowed_methods(app).items()}
    state_api_keys(app)
    state_topup_bounds(app.openapi_schema, settings)
    return app
