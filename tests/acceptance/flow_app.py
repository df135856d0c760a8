"""Workflows for the flow-control acceptance tests, importable by a worker subprocess
(`flow_worker_proc.py`). The database comes from `DURABLE_FLOW_DSN`.

Tables the test creates (`TABLES_SQL`): `active` (each run's start and end as its own
steps saw them), `limited` (each attempt of a limited step, with its start and end) and
`holds` (the attempts of the `holder` step, written outside their transaction so that a
killed one stays visible).
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import asyncpg

import durable

DSN_ENV = "DURABLE_FLOW_DSN"

#: The shared limit of the crash test: 20 starts a second, 3 at once, across all workers.
SHARED = durable.Limit(rate=20, per=1.0, concurrency=3)
#: The rate of the three-process rate test.
RATED = durable.Limit(rate=10, per=1.0)
#: Runs of `flowcrash` active at once per key.
PER_KEY = 2

TABLES_SQL = """
CREATE TABLE active (
    run_id text PRIMARY KEY, key text NOT NULL, started_at timestamptz NOT NULL,
    ended_at timestamptz
);
CREATE TABLE limited (
    run_id text NOT NULL, attempt integer NOT NULL, pid integer NOT NULL,
    started_at timestamptz NOT NULL, ended_at timestamptz
);
CREATE TABLE holds (run_id text NOT NULL, pid integer NOT NULL, attempt integer NOT NULL);
"""


async def _jitter() -> None:
    """Hold the node's transaction open a little so that kills land mid-step."""
    await asyncio.sleep(random.uniform(0.0, 0.03))


flowcrash = durable.Workflow(
    "flowcrash", concurrency=PER_KEY, concurrency_key=lambda input: input["k"]
)


@flowcrash.step(backoff=0)
async def begin(ctx: durable.Context) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO active VALUES ($1, $2, clock_timestamp(), NULL)", ctx.run_id, ctx.input["k"]
    )
    await _jitter()


@flowcrash.step(limit="shared", backoff=0)
async def call(ctx: durable.Context) -> int:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO limited VALUES ($1, $2, $3, clock_timestamp(), NULL)",
        ctx.run_id,
        ctx.attempt,
        os.getpid(),
    )
    await _jitter()
    await ctx.conn.execute(
        "UPDATE limited SET ended_at = clock_timestamp() WHERE run_id = $1", ctx.run_id
    )
    return ctx.attempt


@flowcrash.step(backoff=0)
async def end(ctx: durable.Context) -> None:
    assert ctx.conn is not None
    await _jitter()
    await ctx.conn.execute(
        "UPDATE active SET ended_at = clock_timestamp() WHERE run_id = $1", ctx.run_id
    )


rated = durable.Workflow("rated")


@rated.step(limit="rated", max_attempts=1)
async def ping(ctx: durable.Context) -> int:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO limited VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp())",
        ctx.run_id,
        ctx.attempt,
        os.getpid(),
    )
    return ctx.attempt


holder = durable.Workflow("holder")


async def _hold(ctx: durable.Context) -> dict[str, Any]:
    """Record the attempt where the test sees it at once; the first one of a run asked to
    hold keeps its slot for a long time (the test kills its worker meanwhile)."""
    conn = await asyncpg.connect(os.environ[DSN_ENV])
    try:
        earlier = await conn.fetchval("SELECT count(*) FROM holds WHERE run_id = $1", ctx.run_id)
        await conn.execute(
            "INSERT INTO holds VALUES ($1, $2, $3)", ctx.run_id, os.getpid(), ctx.attempt
        )
    finally:
        await conn.close()
    if ctx.input.get("hold") and not earlier:
        await asyncio.sleep(600)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


holder.step("hold", _hold, limit="solo")

leased_holder = durable.Workflow("leased_holder")
leased_holder.step("hold", _hold, limit="solo_leased", transactional=False)

WORKFLOWS = (flowcrash, rated, holder, leased_holder)
LIMITS = {
    "shared": SHARED,
    "rated": RATED,
    "solo": durable.Limit(concurrency=1),
    "solo_leased": durable.Limit(concurrency=1),
}


def build_engine(dsn: str | None = None) -> durable.Engine:
    """The engine every process of a test uses."""
    return durable.Engine(
        dsn or os.environ[DSN_ENV],
        workflows=WORKFLOWS,
        limits=LIMITS,
        pool_size=2,
        lease_seconds=float(os.environ.get("DURABLE_FLOW_LEASE_SECONDS", "30")),
    )
