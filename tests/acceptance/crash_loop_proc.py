"""A worker process whose step kills the process it runs in, every time (a segfault or an
OOM kill in real life): `python crash_loop_proc.py DSN MAX_CLAIMS`. Each death is logged
as a row of `deaths` first, so the test counts them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg

import durable

crashy = durable.Workflow("crashy")


@crashy.step(max_attempts=1)
async def explode(ctx: durable.Context) -> None:
    # Commits on its own connection (the step's transaction dies with the process).
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute("INSERT INTO deaths (pid) VALUES ($1)", os.getpid())
    await conn.close()
    os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    engine = durable.Engine(sys.argv[1], workflows=[crashy], max_claims=int(sys.argv[2]))
    async with engine, engine.worker(concurrency=1, poll_interval=0.05):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
