"""A FastAPI app that mounts durable's admin app (JSON API, dashboard, /metrics) at
`/durable`, next to its own routes, with the engine and a worker in its lifespan.

    DURABLE_DSN=postgresql://localhost/app DURABLE_ADMIN_TOKEN=$(openssl rand -hex 24) \\
        python -m uvicorn examples.fastapi_admin:app

Then open http://127.0.0.1:8000/durable/ and log in with the token, or call the API with
`Authorization: Bearer $DURABLE_ADMIN_TOKEN` (`GET /durable/api/runs`). Set
`DURABLE_READ_TOKEN` too to give someone a read-only login. Prometheus scrapes
`/durable/metrics` with either token (`authorization: {credentials: ...}` in its config).

A mounted app's lifespan does not run under FastAPI: the engine is opened here, in the
outer app's lifespan, and the admin app uses it as it is.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

import durable
from durable.web import admin_app

greet = durable.Workflow("greet")


@greet.step
async def hello(ctx: durable.Context) -> str:
    return f"hello, {ctx.input.get('name', 'world')}"


engine = durable.Engine(
    os.environ.get("DURABLE_DSN", "postgresql://localhost/app"), workflows=[greet]
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine, engine.worker(concurrency=4):
        yield


app = FastAPI(lifespan=lifespan)
app.mount(
    "/durable",
    admin_app(
        engine,
        token=os.environ.get("DURABLE_ADMIN_TOKEN", ""),
        read_only_token=os.environ.get("DURABLE_READ_TOKEN") or None,
    ),
)


@app.post("/greetings")
async def start_greeting(body: dict[str, Any]) -> dict[str, str]:
    """Start a `greet` run; its progress shows on the dashboard."""
    return {"run_id": await engine.start("greet", body)}
