"""Testing workflows against a real PostgreSQL: one migrated template database per test
session, a fresh clone of it per test. Put the fixtures in your `conftest.py`.

`main()` runs this file with pytest against the server of `DURABLE_DSN` (or a throwaway
server when that is unset): `python docs/examples/testing.py`.
"""

from __future__ import annotations

# --8<-- [start:imports]
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

import durable
from durable.server import LocalPostgres

# --8<-- [end:imports]

# The code under test: in your project, import it from your application.
APP_SCHEMA = "CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))"
order = durable.Workflow("order")


async def restock(ctx: durable.Context) -> None:
    await ctx.conn.execute(
        "UPDATE stock SET qty = qty + $2 WHERE sku = $1", ctx.input["sku"], ctx.input["qty"]
    )


@order.step(compensate=restock)
async def reserve(ctx: durable.Context) -> int:
    left: int = await ctx.conn.fetchval(
        "UPDATE stock SET qty = qty - $2 WHERE sku = $1 RETURNING qty",
        ctx.input["sku"],
        ctx.input["qty"],
    )
    return left


@order.step
async def charge(ctx: durable.Context) -> str:
    if ctx.input["card"] == "declined":
        raise durable.NonRetryable("card declined")
    return "charged"


# --8<-- [start:fixtures]
TEMPLATE = "myapp_test_template"
pytestmark = pytest.mark.asyncio(loop_scope="session")


def on_database(dsn: str, name: str) -> str:
    """`dsn` pointed at another database of the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    dsn = os.environ.get("DURABLE_TEST_DSN")
    if dsn:  # a server you run: a CI service container, docker compose, ...
        yield dsn
        return
    with LocalPostgres() as server:  # else a throwaway server for the session
        yield server.dsn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template(server_dsn: str) -> str:
    """Once per session: a database with durable's tables and the app's own schema."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    # Opening an engine applies durable's migrations; then add the app's own tables.
    engine = durable.Engine(on_database(server_dsn, TEMPLATE))
    async with engine, engine.pool.acquire() as conn:
        await conn.execute(APP_SCHEMA)
    return TEMPLATE


@pytest_asyncio.fixture(loop_scope="session")
async def engine(server_dsn: str, template: str) -> AsyncIterator[durable.Engine]:
    """Per test: a fresh clone of the template and an open engine on it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    async with durable.Engine(on_database(server_dsn, name), workflows=[order]) as engine:
        async with engine.pool.acquire() as conn:
            await conn.execute("INSERT INTO stock VALUES ('A1', 10)")
        yield engine
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# --8<-- [end:fixtures]


# --8<-- [start:tests]
async def stock(engine: durable.Engine) -> int:
    async with engine.pool.acquire() as conn:
        qty: int = await conn.fetchval("SELECT qty FROM stock WHERE sku = 'A1'")
        return qty


async def test_order_completes(engine: durable.Engine) -> None:
    async with engine.worker(concurrency=2, poll_interval=0.05):
        run_id = await engine.start("order", {"sku": "A1", "qty": 3, "card": "ok"})
        result = await engine.wait(run_id, timeout=10)  # a stuck run fails, never hangs
    assert result == {"reserve": 7, "charge": "charged"}
    assert await stock(engine) == 7


async def test_declined_card_restocks(engine: durable.Engine) -> None:
    async with engine.worker(concurrency=2, poll_interval=0.05):
        run_id = await engine.start("order", {"sku": "A1", "qty": 3, "card": "declined"})
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
    assert failed.value.run.error == "NonRetryable: card declined"
    run = await engine.get_run(run_id, journal=True)
    assert [(e.key, e.status) for e in run.journal] == [
        ("reserve", "completed"),
        ("charge", "failed"),
        ("reserve@compensate", "completed"),
    ]
    assert await stock(engine) == 10


# --8<-- [end:tests]


def main() -> int:
    env = dict(os.environ)
    if env.get("DURABLE_DSN"):
        env["DURABLE_TEST_DSN"] = env["DURABLE_DSN"]
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
