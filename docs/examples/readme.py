"""The README's example: an order that reserves stock, charges, and waits for approval.

Runs as pasted: against `DURABLE_DSN` when it is set, else against a throwaway PostgreSQL
(the `server` extra) that is removed at the end.
"""

# --8<-- [start:readme]
import asyncio
import os

import durable
from durable.server import LocalPostgres

order = durable.Workflow("order")


async def release(ctx: durable.Context) -> None:
    await ctx.conn.execute("DELETE FROM reservations WHERE order_id = $1", ctx.input["id"])


@order.step(compensate=release)
async def reserve(ctx: durable.Context) -> dict:
    # ctx.conn is the transaction the step commits in: this write and the journal entry
    # commit together, or not at all.
    await ctx.conn.execute("INSERT INTO reservations (order_id) VALUES ($1)", ctx.input["id"])
    return {"reserved": True}


@order.step(max_attempts=5)
async def charge(ctx: durable.Context) -> str:
    return f"charged {ctx.input['amount']}"


order.wait_for_signal("approval", "approved", timeout=3600, default={"by": "auto"})


async def main(dsn: str) -> None:
    async with durable.Engine(dsn, workflows=[order]) as engine:
        async with engine.pool.acquire() as conn:  # the application's own table
            await conn.execute("CREATE TABLE IF NOT EXISTS reservations (order_id int)")
        async with engine.worker(concurrency=16):
            run_id = await engine.start("order", {"id": 42, "amount": 10})
            await engine.signal(run_id, "approved", {"by": "ann"})
            print(await engine.wait(run_id, timeout=30))
            # {'charge': 'charged 10', 'reserve': {'reserved': True}, 'approval': {'by': 'ann'}}


if os.environ.get("DURABLE_DSN"):
    asyncio.run(main(os.environ["DURABLE_DSN"]))
else:
    with LocalPostgres() as server:  # a throwaway PostgreSQL, removed on exit
        asyncio.run(main(server.dsn))
# --8<-- [end:readme]
