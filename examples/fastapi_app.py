"""A FastAPI app with a durable engine and a background worker in its lifespan.

Run it (from the repository root) against a PostgreSQL database:

    DURABLE_DSN=postgresql://localhost/app python -m uvicorn examples.fastapi_app:app

The `order` workflow reserves stock (a row written through `ctx.conn`, so it commits with
the step's journal entry or not at all), waits for an `approved` signal, then ships
(another row, same guarantee). Endpoints:

- `POST /orders` (JSON body = the run's input; optional `Idempotency-Key` header):
  start an `order` run, answer `202 {"run_id": ...}`. A retried request with the same key
  gets the same run back.
- `POST /runs/{run_id}/signals/{name}` (JSON body = the signal's payload): `202` when the
  signal was recorded, `404` for an unknown run, `409` when the run has finished (or is
  compensating, so no wait would ever consume the signal).
- `GET /runs/{run_id}`: the run's `status`, `current_node`, `results` so far, and its
  `result` or `error` once finished; `404` for an unknown run.

Errors are JSON `{"detail": ...}`: `404` for an unknown run (`RunNotFound`), `415` for a
POST whose body is not `application/json`, `422` for a body PostgreSQL cannot store as
JSON (`SerializationError`, e.g. a NUL character) or one FastAPI cannot parse.

Settings (environment): `DURABLE_DSN` (required), `DURABLE_WORKER_CONCURRENCY` (default 8)
and `DURABLE_GRACE_PERIOD` (seconds, default 10). On SIGTERM uvicorn runs the lifespan's
shutdown: the worker stops claiming, in-flight jobs get the grace period to commit, then
they are cancelled and rolled back, so another process (or this one, restarted) claims them
again. Nothing is half-committed, and no step's writes commit twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import durable

# The app's own table. A real app creates it with its migrations; the example keeps it in
# one file. Deliberately no unique constraint: the tests count rows to prove exactly-once.
CREATE_ORDER_EVENTS = """
CREATE TABLE IF NOT EXISTS order_events (
    id         bigserial PRIMARY KEY,
    run_id     text NOT NULL,
    step       text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# -- the workflow ------------------------------------------------------------------------

order = durable.Workflow("order")


@order.step
async def reserve(ctx: durable.Context) -> dict[str, Any]:
    """Reserve the order's items: the row commits atomically with this step's journal."""
    assert ctx.conn is not None
    items = ctx.input.get("items", [])
    await ctx.conn.execute(
        "INSERT INTO order_events (run_id, step, detail) VALUES ($1, 'reserve', $2::jsonb)",
        ctx.run_id,
        json.dumps({"items": items}),
    )
    return {"reserved": len(items)}


order.wait_for_signal("approval", "approved")


@order.step
async def ship(ctx: durable.Context) -> dict[str, Any]:
    """Ship the order once approved; the approval's payload is `ctx.results["approval"]`."""
    assert ctx.conn is not None
    approval = ctx.results["approval"]
    approved_by = approval.get("by") if isinstance(approval, dict) else None
    await ctx.conn.execute(
        "INSERT INTO order_events (run_id, step, detail) VALUES ($1, 'ship', $2::jsonb)",
        ctx.run_id,
        json.dumps({"approved_by": approved_by}),
    )
    return {"shipped": True, "approved_by": approved_by}


# -- the lifespan ------------------------------------------------------------------------


# --8<-- [start:lifespan]
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: open the engine (pool + migrations), create the app's table, start a
    worker. Shutdown (e.g. SIGTERM): stop the worker gracefully, then close the pool."""
    engine = durable.Engine(os.environ["DURABLE_DSN"], workflows=[order])
    concurrency = int(os.environ.get("DURABLE_WORKER_CONCURRENCY", "8"))
    grace_period = float(os.environ.get("DURABLE_GRACE_PERIOD", "10"))
    async with engine:
        async with engine.pool.acquire() as conn, conn.transaction():
            # Serialised, so that several server processes starting at once do not race.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('order_events'))")
            await conn.execute(CREATE_ORDER_EVENTS)
        async with engine.worker(concurrency=concurrency, grace_period=grace_period):
            app.state.engine = engine
            yield


app = FastAPI(title="durable orders", lifespan=lifespan)
# --8<-- [end:lifespan]


def get_engine(request: Request) -> durable.Engine:
    """The engine the lifespan opened."""
    engine: durable.Engine = request.app.state.engine
    return engine


EngineDep = Annotated[durable.Engine, Depends(get_engine)]


# -- the endpoints -----------------------------------------------------------------------


class Started(BaseModel):
    run_id: str


class Signalled(BaseModel):
    accepted: bool


class RunView(BaseModel):
    id: str
    workflow: str
    status: durable.RunStatus
    current_node: str | None
    results: dict[str, Any]
    result: Any = None
    error: str | None = None


# --8<-- [start:errors]
@app.exception_handler(durable.RunNotFound)
async def run_not_found(request: Request, exc: durable.RunNotFound) -> JSONResponse:
    """Any endpoint given an unknown run id answers 404."""
    return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": str(exc)})


@app.exception_handler(durable.SerializationError)
async def not_storable(request: Request, exc: durable.SerializationError) -> JSONResponse:
    """An input or payload PostgreSQL cannot store as JSON is the client's mistake: 422."""
    return JSONResponse(status_code=422, content={"detail": str(exc)})


async def json_body(request: Request) -> None:
    """Refuse a POST whose body is not JSON (415) before FastAPI guesses what it meant."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and await request.body():
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send the body as application/json"
        )


JsonBody = Depends(json_body)
# --8<-- [end:errors]


# --8<-- [start:endpoints]
@app.post("/orders", status_code=status.HTTP_202_ACCEPTED, dependencies=[JsonBody])
async def create_order(
    engine: EngineDep,
    body: Annotated[dict[str, Any], Body()],
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Started:
    """Start an `order` run; the same `Idempotency-Key` returns the same run."""
    run_id = await engine.start(order, body, idempotency_key=idempotency_key or None)
    return Started(run_id=run_id)


@app.post(
    "/runs/{run_id}/signals/{name}", status_code=status.HTTP_202_ACCEPTED, dependencies=[JsonBody]
)
async def send_signal(
    engine: EngineDep, run_id: str, name: str, payload: Annotated[Any, Body()] = None
) -> Signalled:
    """Record a signal (buffered if the run has not reached the wait yet)."""
    if not await engine.signal(run_id, name, payload):
        detail = f"run {run_id} has finished (or is compensating): no wait would consume it"
        raise HTTPException(status.HTTP_409_CONFLICT, detail)
    return Signalled(accepted=True)


@app.get("/runs/{run_id}")
async def read_run(engine: EngineDep, run_id: str) -> RunView:
    """The run's status, where it is, and its results so far."""
    run = await engine.get_run(run_id)
    return RunView(
        id=run.id,
        workflow=run.workflow,
        status=run.status,
        current_node=run.current_node,
        results=run.results,
        result=run.result,
        error=run.error,
    )


# --8<-- [end:endpoints]
