"""Testing workflows with durable's pytest plugin: a fresh database per test, and a harness
whose virtual clock runs a week-long workflow in milliseconds. In your project, the
`pytest_plugins` line and the `durable_template_sql` fixture go in `conftest.py`.

`main()` runs this file with pytest against the server of `DURABLE_DSN` (or a throwaway
server when that is unset): `python docs/examples/testing.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

# --8<-- [start:imports]
from dataclasses import dataclass
from datetime import timedelta

import pytest

import durable
from durable.testing import Harness

# --8<-- [end:imports]

# --8<-- [start:conftest]
pytest_plugins = ["durable.testing"]


@pytest.fixture(scope="session")
def durable_template_sql() -> str:
    """Your application's tables, in every test database."""
    return """
        CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0));
        INSERT INTO stock VALUES ('A1', 10);
    """


# --8<-- [end:conftest]


# The code under test: in your project, import it from your application.
# --8<-- [start:workflow]
@dataclass
class OrderIn:
    sku: str
    qty: int
    card: str


order = durable.Workflow("order", input=OrderIn)


async def restock(ctx: durable.Context[OrderIn]) -> None:
    await ctx.conn.execute(
        "UPDATE stock SET qty = qty + $2 WHERE sku = $1", ctx.input.sku, ctx.input.qty
    )


@order.step(compensate=restock)
async def reserve(ctx: durable.Context[OrderIn]) -> int:
    left: int = await ctx.conn.fetchval(
        "UPDATE stock SET qty = qty - $2 WHERE sku = $1 RETURNING qty",
        ctx.input.sku,
        ctx.input.qty,
    )
    return left


# A week to pay, reminders with 10-minute backoffs when the mail service is down.
order.wait_for_signal("payment", "paid", timeout=timedelta(days=7).total_seconds())


@order.step(max_attempts=3, backoff=600)
async def charge(ctx: durable.Context[OrderIn]) -> str:
    if ctx.input.card == "declined":
        raise durable.NonRetryable("card declined")
    if ctx.attempt < 3:
        raise ConnectionError("the payment service is down")
    return f"charged on attempt {ctx.attempt}"


# --8<-- [end:workflow]


# --8<-- [start:tests]
pytestmark = pytest.mark.asyncio  # pytest-asyncio; the fixtures themselves are not async


async def stock(h: Harness) -> int:
    async with h.engine.pool.acquire() as conn:
        qty: int = await conn.fetchval("SELECT qty FROM stock WHERE sku = 'A1'")
        return qty


async def test_a_paid_order_is_charged_after_two_backoffs(durable_dsn: str) -> None:
    async with Harness(durable_dsn, workflows=[order]) as h:
        run_id = await h.engine.start(order, OrderIn(sku="A1", qty=3, card="ok"))
        await h.run_until_idle()  # reserved; waiting for the payment
        assert await stock(h) == 7
        await h.engine.signal(run_id, "paid", {"amount": 30})
        await h.run_until_idle()  # charge failed once; the retry is due in 10 minutes
        await h.clock.advance(600)
        await h.clock.advance(600)
        result = await h.engine.wait(run_id, timeout=5)  # a stuck run fails, never hangs
    assert result == {"reserve": 7, "payment": {"amount": 30}, "charge": "charged on attempt 3"}


async def test_an_unpaid_order_is_released_after_a_week(durable_dsn: str) -> None:
    async with Harness(durable_dsn, workflows=[order]) as h:
        run_id = await h.engine.start(order, OrderIn(sku="A1", qty=3, card="ok"))
        await h.clock.advance(timedelta(days=7))  # milliseconds of real time
        with pytest.raises(durable.RunFailed) as failed:
            await h.engine.wait(run_id, timeout=5)
        assert await stock(h) == 10  # the reservation was compensated
    assert failed.value.run.error == "SignalTimeout: no signal 'paid' arrived within 604800 s"


async def test_a_declined_card_restocks(durable_dsn: str) -> None:
    async with Harness(durable_dsn, workflows=[order]) as h:
        run_id = await h.engine.start(order, {"sku": "A1", "qty": 3, "card": "declined"})
        await h.engine.signal(run_id, "paid", None)
        with pytest.raises(durable.RunFailed):
            await h.engine.wait(run_id, timeout=5)
        run = await h.engine.get_run(run_id, journal=True)
        assert [(e.key, e.status) for e in run.journal] == [
            ("reserve", "completed"),
            ("payment", "completed"),
            ("charge", "failed"),
            ("reserve@compensate", "completed"),
        ]
        assert await stock(h) == 10


# --8<-- [end:tests]


def main() -> int:
    env = dict(os.environ)
    if env.get("DURABLE_DSN"):
        env["DURABLE_TEST_DSN"] = env["DURABLE_DSN"]
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
