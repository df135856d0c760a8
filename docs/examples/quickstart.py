"""Quickstart: define a workflow, run a worker, start a run and wait for its result.

Run it with `python docs/examples/quickstart.py`: it uses the PostgreSQL named by
`DURABLE_DSN`, or starts a throwaway server (and removes it) when that is unset.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import durable
from durable.server import LocalPostgres


# --8<-- [start:workflow]
@dataclass
class Signup:
    email: str


@dataclass
class Account:
    account_id: int


signup = durable.Workflow("signup", input=Signup)


@signup.step
async def create_account(ctx: durable.Context[Signup]) -> Account:
    # ctx.conn is the transaction this step commits in: the INSERT and the step's
    # journal entry commit together, or not at all.
    account_id = await ctx.conn.fetchval(
        "INSERT INTO accounts (email) VALUES ($1) RETURNING id", ctx.input.email
    )
    return Account(account_id)


@signup.step(max_attempts=5)
async def welcome(ctx: durable.Context[Signup]) -> str:
    account = ctx.results["create_account"]  # the Account of the step before
    return f"welcome mail queued for account {account.account_id}"


# --8<-- [end:workflow]


async def run(dsn: str) -> None:
    # Opening the engine opens a connection pool and applies durable's migrations.
    async with durable.Engine(dsn, workflows=[signup]) as engine:
        async with engine.pool.acquire() as conn:  # the application's own table
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS accounts (id serial PRIMARY KEY, email text)"
            )
        async with engine.worker(concurrency=4):  # a worker in the background
            run_id = await engine.start("signup", Signup(email="ada@example.com"))
            result = await engine.wait(run_id, timeout=30)
    print(result)
    # {'welcome': 'welcome mail queued for account 1', 'create_account': {'account_id': 1}}


async def main() -> None:
    dsn = os.environ.get("DURABLE_DSN")
    if dsn:
        await run(dsn)
        return
    # No database given: a private server on a free loopback port, deleted on exit.
    with LocalPostgres() as server:
        await run(server.dsn)


if __name__ == "__main__":
    asyncio.run(main())
