"""Connection pools: an engine on a pool you own (e.g. behind PgBouncer in transaction
mode) for the web app, workers with their own DSN (direct or PgBouncer session mode), and
an engine that reads a replica.

`main()` runs both against `DURABLE_DSN` (there is no PgBouncer in between here).
"""

from __future__ import annotations

import asyncio
import os

import asyncpg

import durable

reports = durable.Workflow("report")


@reports.step
async def build(ctx: durable.Context) -> str:
    return f"report {ctx.input['month']}"


# --8<-- [start:web]
async def open_web_engine(dsn: str) -> tuple[durable.Engine, asyncpg.Pool]:
    # Through PgBouncer in transaction mode a server connection is lent per transaction,
    # so asyncpg must not keep prepared statements on it: statement_cache_size=0.
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=20, statement_cache_size=0)
    engine = durable.Engine(pool=pool, workflows=[reports])
    await engine.open(migrate=False)  # migrations run once per deploy: `durable migrate`
    return engine, pool  # engine.close() leaves a pool it did not open to you


# --8<-- [end:web]


# --8<-- [start:worker]
async def run_worker(dsn: str) -> None:
    # A DSN-built engine gives its worker a pool of its own: concurrency + 2 connections,
    # so jobs never starve the engine's pool (pool_size) used by start(), signal(), ...
    async with durable.Engine(dsn, workflows=[reports], pool_size=2) as engine:
        await engine.run_worker(concurrency=8)  # until cancelled


# --8<-- [end:worker]


# --8<-- [start:replica]
async def open_engine_with_replica(primary: str, replica: str) -> durable.Engine:
    # get_run() and list_runs() read the replica, which may lag a little; start(),
    # signal(), cancel(), retry() and wait() use the primary.
    engine = durable.Engine(primary, read_dsn=replica, workflows=[reports])
    await engine.open(migrate=False)
    return engine


# --8<-- [end:replica]


async def main() -> None:
    dsn = os.environ["DURABLE_DSN"]
    async with durable.Engine(dsn):  # stands in for `durable migrate` in a deploy step
        pass
    web, pool = await open_web_engine(dsn)
    worker = asyncio.create_task(run_worker(dsn))
    try:
        run_id = await web.start("report", {"month": "2024-05"})
        assert await web.wait(run_id, timeout=30) == {"build": "report 2024-05"}
        # The primary stands in for a replica here (so there is no lag).
        dashboard = await open_engine_with_replica(dsn, dsn)
        try:
            assert (await dashboard.get_run(run_id)).result == {"build": "report 2024-05"}
            assert [r.id for r in await dashboard.list_runs(workflow="report")] == [run_id]
        finally:
            await dashboard.close()
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await web.close()
        await pool.close()
    print("started on the web pool, worked by a worker with its own pool")


if __name__ == "__main__":
    asyncio.run(main())
