"""A module that defines the engine a `durable worker` process runs.

    durable worker worker_app:engine --concurrency 16

`main()` plays a deploy against `DURABLE_DSN`: this process starts runs (as a web app
would), a `durable worker` subprocess works them, and SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import durable

# --8<-- [start:engine]
invoices = durable.Workflow("invoice")


@invoices.step
async def render(ctx: durable.Context) -> str:
    return f"invoice for {ctx.input['customer']}"


@invoices.step(max_attempts=5)
async def deliver(ctx: durable.Context) -> str:
    return f"delivered: {ctx.results['render']}"


# Importing this module must not connect anywhere: the command opens the engine itself
# (and applies migrations unless given --no-migrate).
engine = durable.Engine(
    os.environ.get("DURABLE_DSN", "postgresql://localhost/app"),
    workflows=[invoices],
    pool_size=4,
)
# --8<-- [end:engine]


async def main() -> None:
    async with engine:
        run_ids = [await engine.start("invoice", {"customer": c}) for c in ("ann", "bob")]
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "durable.cli",
            "worker",
            "worker_app:engine",
            "--concurrency",
            "4",
            "--grace-period",
            "5",
            cwd=Path(__file__).parent,  # the command imports MODULE from the working directory
        )
        try:
            for run_id in run_ids:
                result = await engine.wait(run_id, timeout=30)
                assert result["deliver"].startswith("delivered: invoice for")
        finally:
            worker.send_signal(signal.SIGTERM)  # graceful: stop claiming, finish in-flight
            code = await asyncio.wait_for(worker.wait(), timeout=30)
    assert code == 0, f"durable worker exited with {code}"
    print("both invoices delivered by a separate worker process, which stopped cleanly")


if __name__ == "__main__":
    asyncio.run(main())
