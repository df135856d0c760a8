"""The engine and a background worker in a web app's lifespan, without any web framework.

FastAPI (and Starlette) accept an async context manager as `lifespan`: everything before
its `yield` runs at start-up, everything after at shutdown. `main()` drives the lifespan
and the endpoint bodies directly, the way the server would, against `DURABLE_DSN`.
"""

from __future__ import annotations

# --8<-- [start:imports]
import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import durable

# --8<-- [end:imports]

approvals = durable.Workflow("approval")
approvals.wait_for_signal("decision", "decided", timeout=24 * 3600, default={"ok": False})


@approvals.step
async def apply(ctx: durable.Context) -> str:
    return "applied" if ctx.results["decision"]["ok"] else "rejected"


# --8<-- [start:lifespan]
engine = durable.Engine(
    os.environ.get("DURABLE_DSN", "postgresql://localhost/app"), workflows=[approvals]
)


@asynccontextmanager
async def lifespan(app: object) -> AsyncIterator[None]:
    # Start-up: open the pool, apply migrations, start a worker. Shutdown: the worker stops
    # claiming, in-flight jobs get the grace period, then the pool closes.
    async with engine, engine.worker(concurrency=8, grace_period=10):
        yield


# app = FastAPI(lifespan=lifespan)
# --8<-- [end:lifespan]


# --8<-- [start:endpoints]
async def create_request(body: dict[str, Any], request_id: str) -> dict[str, str]:
    """POST /requests: a retried request (same request_id) gets the same run back."""
    run_id = await engine.start("approval", body, idempotency_key=request_id)
    return {"run_id": run_id}


async def decide(run_id: str, ok: bool, request_id: str) -> dict[str, bool]:
    """POST /requests/{run_id}/decision: False when the run had already finished. A retried
    request (same request_id) records one decision."""
    accepted = await engine.signal(run_id, "decided", {"ok": ok}, dedupe_key=request_id)
    return {"accepted": accepted}


async def read(run_id: str) -> dict[str, Any]:
    """GET /requests/{run_id}: the run's status and, once completed, its result."""
    run = await engine.get_run(run_id)  # raises durable.RunNotFound -> answer 404
    return {"status": run.status.value, "node": run.current_node, "result": run.result}


# --8<-- [end:endpoints]


async def main() -> None:
    async with lifespan(None):
        first = await create_request({"amount": 40}, request_id="req-1")
        again = await create_request({"amount": 40}, request_id="req-1")
        assert first == again
        run_id = first["run_id"]
        assert (await decide(run_id, ok=True, request_id="dec-1")) == {"accepted": True}
        assert (await decide(run_id, ok=True, request_id="dec-1")) == {"accepted": True}
        await engine.wait(run_id, timeout=30)
        state = await read(run_id)
        assert state["status"] == "completed"
        assert state["result"]["apply"] == "applied"
        assert (await decide(run_id, ok=False, request_id="dec-2")) == {"accepted": False}
    print(state)


if __name__ == "__main__":
    asyncio.run(main())
