"""HTTP handlers of reconciliation runs (admin): read what the runs found.

A run spans every owner's wallets: a key that sees only some owners is
refused these routes (opt "spans_owners", centime/auth.py)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.datastructures import State
from litestar.params import Parameter

from centime.wire import Cursor, PathId, parse_cursor, problem_responses
from ledger.ids import parse_uuid
from reconcile.schemas import ITEMS_PAGE_SIZE_MAX, PAGE_SIZE_DEFAULT, RUNS_PAGE_SIZE_MAX, RunDetail, RunPage
from reconcile.service import RunNotFound, get_run, list_runs


class ReconciliationController(Controller):
    path = "/v1/reconciliation/runs"
    tags = ["reconciliation"]

    @get(
        "/",
        opt={"scope": "admin", "spans_owners": True},
        summary="List reconciliation runs, newest first",
        responses=problem_responses(400, 401, 403, 503),
    )
    async def list_runs(
        self,
        state: State,
        limit: Annotated[int, Parameter(ge=1, le=RUNS_PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT,
        starting_after: Cursor = None,
    ) -> RunPage:
        return await list_runs(
            state.pool,
            limit=limit,
            before=parse_cursor(starting_after, field="starting_after", names="a run id"),
            timeout_s=state.timeout_s,
        )

    @get(
        "/{run_id:str}",
        opt={"scope": "admin", "spans_owners": True},
        summary="Get a reconciliation run and its items",
        responses=problem_responses(400, 401, 403, 404, 503),
    )
    async def get_run(
        self,
        run_id: PathId,
        state: State,
        items_limit: Annotated[int, Parameter(ge=1, le=ITEMS_PAGE_SIZE_MAX)] = 100,
        items_after: Annotated[int, Parameter(ge=0, le=2**31 - 1)] = 0,
    ) -> RunDetail:
        parsed = parse_uuid(run_id)
        if parsed is None:
            raise RunNotFound(f"no reconciliation run {run_id!r}")
        return await get_run(
            state.pool, parsed, items_limit=items_limit, items_after=items_after, timeout_s=state.timeout_s
        )
