"""With CENTIME_METRICS_TOKEN set, /metrics answers only `Authorization: Bearer <token>` (others
get a 401 problem); and a process started with a bad secret setting stops naming the variable,
never showing the secret."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from conftest import ROOT, Server, settings_env, start_server, stop_server

from centime.settings import Settings

TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def guarded_server(settings: Settings) -> Iterator[Server]:
    running = start_server(settings, CENTIME_METRICS_TOKEN=TOKEN)
    yield running
    stop_server(running)


@pytest.fixture
async def guarded(guarded_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded_server.base_url, timeout=30) as http:
        yield http


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
    ],
)
async def test_metrics_without_the_token_is_a_401_problem(
    guarded: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await guarded.get("/metrics", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == 'Bearer realm="centime"'
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.json()["code"] == "unauthorized"
    assert "centime_requests_total" not in response.text


async def test_metrics_with_the_token_answers(guarded: httpx.AsyncClient) -> None:
    for scheme in ("Bearer", "bearer"):
        response = await guarded.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert response.status_code == 200, response.text
        assert "centime_requests_total" in response.text


async def test_metrics_is_open_without_a_token(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert "centime_requests_total" in response.text


SECRET = "Zq9x7Yw8Vu6Ts5"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CENTIME_STRIPE_SECRET_KEY", f"sk_live_{SECRET}\n"),
        ("CENTIME_STRIPE_WEBHOOK_SECRET", f"whsec_{SECRET} "),
        ("CENTIME_METRICS_TOKEN", f"{SECRET}{SECRET}\n"),
        ("CENTIME_DATABASE_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:5432/x\n"),
        ("CENTIME_REDIS_URL", f"redis://:{SECRET}@127.0.0.1:6379/0 "),
    ],
)
def test_serve_with_a_bad_secret_stops_without_showing_it(settings: Settings, name: str, value: str) -> None:
    env = settings_env(settings, **{name: value})
    done = subprocess.run(
        [sys.executable, "-m", "centime", "serve", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"{name}=" in output and "is invalid" in output, output
    assert SECRET not in output and SECRET[:6] not in output, output
