"""Typed data and plain `def` handlers: a dataclass as the workflow's input, a pydantic
model as a step's result, and a synchronous step writing through its `ctx.conn`.

Run it with `python docs/examples/typed.py` (it needs pydantic, the `pydantic` extra): it
uses the PostgreSQL named by `DURABLE_DSN`, or starts a throwaway server when that is unset.
"""

from __future__ import annotations

import asyncio
import os

# --8<-- [start:typed]
from dataclasses import dataclass

import pydantic

import durable


@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class OrderIn:
    customer: str
    lines: list[Line]


class Quote(pydantic.BaseModel):
    cents: int
    currency: str = "EUR"


order = durable.Workflow("typed_order", input=OrderIn)


@order.step
async def price(ctx: durable.Context[OrderIn]) -> Quote:
    units = sum(line.qty for line in ctx.input.lines)  # ctx.input is an OrderIn
    return Quote(cents=units * 250)  # stored as JSON


@order.step
def invoice(ctx: durable.SyncContext[OrderIn]) -> str:
    # A plain def runs on the engine's threads: blocking calls are fine here. Its
    # ctx.conn is synchronous, and writes through it commit with the step, or not at all.
    quote = ctx.results["price"]  # a Quote again, decoded from its JSON
    ctx.conn.execute(
        "INSERT INTO invoices (customer, cents) VALUES ($1, $2)", ctx.input.customer, quote.cents
    )
    return f"{ctx.input.customer} owes {quote.cents / 100:.2f} {quote.currency}"


# --8<-- [end:typed]


async def run(dsn: str) -> None:
    async with durable.Engine(dsn, workflows=[order]) as engine:
        async with engine.pool.acquire() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS invoices (customer text, cents int)")
        async with engine.worker(concurrency=4):
            # --8<-- [start:start]
            run_id = await engine.start(order, OrderIn("ada", [Line("A1", 2), Line("B2")]))
            result = await engine.wait(run_id, timeout=30)
            # wait() and get_run() give the JSON form:
            # {'price': {'cents': 750, 'currency': 'EUR'}, 'invoice': 'ada owes 7.50 EUR'}
            try:
                await engine.start(order, {"customer": "bob", "lines": [{"sku": "A1", "qty": "2"}]})
            except durable.SerializationError as exc:
                print(exc)  # ... is invalid: field 'lines.0.qty': expected int, got str '2'
            # --8<-- [end:start]
            print(result)
            assert result == {
                "price": {"cents": 750, "currency": "EUR"},
                "invoice": "ada owes 7.50 EUR",
            }
            runs = await engine.list_runs(workflow="typed_order")
            assert len(runs) == 1  # the invalid input wrote nothing
            assert runs[0].input == {
                "customer": "ada",
                "lines": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}],
            }


async def main() -> None:
    dsn = os.environ.get("DURABLE_DSN")
    if dsn:
        await run(dsn)
        return
    from durable.server import LocalPostgres

    with LocalPostgres() as server:
        await run(server.dsn)


if __name__ == "__main__":
    asyncio.run(main())
