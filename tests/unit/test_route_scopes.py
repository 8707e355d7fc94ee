"""Routes under /v1 are denied by default: an app with a /v1 route that
names no scope does not start, and the guard refuses such a route anyway;
routes outside /v1 and routes marked public take no key."""

from __future__ import annotations

import msgspec
import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from centime.app import _raised_error, create_app
from centime.auth import check_route_scopes, require_scope
from centime.errors import CentimeError
from centime.settings import Settings, load_settings
from reconcile.api import ReconciliationController


def offline_settings() -> Settings:
    """Enough to build the app; nothing is opened until its lifespan runs."""
    return msgspec.structs.replace(
        load_settings({}), database_url="postgresql://nowhere/x", redis_url="redis://nowhere"
    )


def test_the_app_starts_with_every_v1_route_scoped() -> None:
    create_app(offline_settings())


def test_the_app_does_not_start_with_an_unscoped_v1_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ReconciliationController.list_runs.opt, "scope")
    with pytest.raises(ValueError, match="GET /v1/reconciliation/runs"):
        create_app(offline_settings())


@get("/v1/forgotten", sync_to_thread=False)
def forgotten() -> str:
    return "secret"


@get("/v1/open", opt={"scope": "public"}, sync_to_thread=False)
def open_route() -> str:
    return "open"


@get("/elsewhere", sync_to_thread=False)
def elsewhere() -> str:
    return "elsewhere"


def test_the_guard_refuses_an_unscoped_v1_route_that_got_past_the_check() -> None:
    app = Litestar(
        [forgotten, open_route, elsewhere],
        guards=[require_scope],
        exception_handlers={CentimeError: _raised_error},
    )
    with pytest.raises(ValueError, match="GET /v1/forgotten"):
        check_route_scopes(app)
    with TestClient(app) as http:
        refused = http.get("/v1/forgotten")
        assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
        assert http.get("/v1/open").text == "open"
        assert http.get("/elsewhere").text == "elsewhere"
        assert http.options("/v1/open").status_code == 204  # Litestar's own Allow answer
