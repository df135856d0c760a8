"""Exactly-once and at-least-once boundaries; docs/guides/idempotency.md shows these parts.

`main()` runs them against the PostgreSQL in `DURABLE_DSN` and checks the outcomes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import durable

TABLES = """
CREATE TABLE orders (id serial PRIMARY KEY, sku text NOT NULL, paid boolean DEFAULT false);
CREATE TABLE payments (idempotency_key text PRIMARY KEY, amount int NOT NULL);
"""


class PaymentGateway:
    """Stands in for an external API that honours an idempotency key, as most payment APIs
    do (the key is a request header there; a table here)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def charge(self, amount: int, *, idempotency_key: str) -> str:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO payments VALUES ($1, $2) ON CONFLICT DO NOTHING",
                idempotency_key,
                amount,
            )
        return f"payment {idempotency_key}"


gateway: PaymentGateway

# --8<-- [start:workflow]
fulfil = durable.Workflow("fulfil")


@fulfil.step(transactional=False, max_attempts=5)
async def charge(ctx: durable.Context) -> str:
    # An external call runs at least once (a crash after the call but before the journal
    # commits repeats it): give the provider a key that is the same on every attempt.
    key = f"{ctx.run_id}:{ctx.node}"
    return await gateway.charge(ctx.input["amount"], idempotency_key=key)


@fulfil.step
async def mark_paid(ctx: durable.Context) -> None:
    # A write through ctx.conn commits exactly once, together with the journal entry.
    await ctx.conn.execute("UPDATE orders SET paid = true WHERE id = $1", ctx.input["order_id"])


# --8<-- [end:workflow]


# --8<-- [start:start-in-transaction]
async def place_order(engine: durable.Engine, sku: str, amount: int) -> str:
    async with engine.pool.acquire() as conn, conn.transaction():
        order_id = await conn.fetchval("INSERT INTO orders (sku) VALUES ($1) RETURNING id", sku)
        # The run and its first job commit with the order, or roll back with it.
        return await engine.start("fulfil", {"order_id": order_id, "amount": amount}, conn=conn)


# --8<-- [end:start-in-transaction]


# --8<-- [start:idempotency-key]
async def checkout(engine: durable.Engine, order_id: int, request_id: str) -> str:
    # A client that retries the request sends the same id: it gets the first run's id back.
    return await engine.start(
        "fulfil", {"order_id": order_id, "amount": 25}, idempotency_key=f"checkout-{request_id}"
    )


# --8<-- [end:idempotency-key]


async def main() -> None:
    global gateway
    engine = durable.Engine(os.environ["DURABLE_DSN"], workflows=[fulfil])
    async with engine:
        gateway = PaymentGateway(engine.pool)
        async with engine.pool.acquire() as conn:
            await conn.execute(TABLES)

        # A transaction that rolls back leaves neither the order nor a run behind.
        try:
            async with engine.pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO orders (sku) VALUES ('X')")
                await engine.start("fulfil", {"order_id": 0, "amount": 1}, conn=conn)
                raise RuntimeError("the request failed after start()")
        except RuntimeError:
            pass
        assert await engine.list_runs(workflow="fulfil") == []

        async with engine.worker(concurrency=4, poll_interval=0.1):
            run_id = await place_order(engine, "A1", 25)
            async with engine.pool.acquire() as conn:
                other = await conn.fetchval("INSERT INTO orders (sku) VALUES ('B2') RETURNING id")
            first = await checkout(engine, other, "7f3a")
            assert await checkout(engine, other, "7f3a") == first  # the client retried
            await engine.wait(run_id, timeout=30)
            await engine.wait(first, timeout=30)
        async with engine.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE sku = 'X'") == 0
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE paid") == 2
            assert await conn.fetchval("SELECT count(*) FROM payments") == 2
    print("two orders paid, one payment each, no run for the rolled-back order")


if __name__ == "__main__":
    asyncio.run(main())
