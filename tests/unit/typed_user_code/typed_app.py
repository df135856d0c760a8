"""A small typed application, as a user writes it."""

from __future__ import annotations

from dataclasses import dataclass

import pydantic

import durable


@dataclass
class OrderIn:
    sku: str
    qty: int


class Receipt(pydantic.BaseModel):
    total: int


order = durable.Workflow("order", input=OrderIn)


@order.step(max_attempts=5)
async def reserve(ctx: durable.Context[OrderIn]) -> int:
    assert ctx.conn is not None
    left: int = await ctx.conn.fetchval(
        "UPDATE stock SET qty = qty - $2 WHERE sku = $1 RETURNING qty", ctx.input.sku, ctx.input.qty
    )
    return left


@order.step
def receipt(ctx: durable.SyncContext[OrderIn]) -> Receipt:
    assert ctx.conn is not None
    ctx.conn.execute("INSERT INTO receipts (sku) VALUES ($1)", ctx.input.sku)
    return Receipt(total=ctx.input.qty * 100)


async def more(ctx: durable.Context[OrderIn], i: int) -> bool:
    return i < ctx.input.qty


async def poll(ctx: durable.LoopContext[OrderIn]) -> int:
    return ctx.iteration + ctx.input.qty


order.loop("poll", more, poll)
order.route("ship", lambda ctx: "air", {"air": reserve})
order.wait_for_signal("paid", "paid", timeout=3600)

plain = durable.Workflow("plain")


@plain.step
async def hello(ctx: durable.Context) -> str:
    name: str = ctx.input["name"]
    return name


async def main(dsn: str) -> None:
    async with durable.Engine(dsn, workflows=[order, plain], threads=4) as engine:
        run_id = await engine.start(order, OrderIn(sku="A1", qty=2))
        await engine.signal(run_id, "paid", {"by": "card"}, dedupe_key="evt_1")
        await engine.start("plain", {"name": "ada"})
