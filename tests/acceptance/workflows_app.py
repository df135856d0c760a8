"""Workflows for the crash acceptance tests, importable by a worker subprocess.

Configuration comes from the environment so that a freshly spawned worker process builds
exactly the engine the test expects:

- `DURABLE_APP_DSN`: the database (may carry `?application_name=...` so the test can tell
  worker connections apart in `pg_stat_activity`);
- `DURABLE_APP_LEASE_SECONDS`: the lease of non-transactional steps (default 30);
- `DURABLE_APP_LEASE_SLEEP`: how long attempt 1 of the `lease` step sleeps (default 3).

Tables the test creates: `effects (run_id, step)`, `comp_effects (run_id, step)` and
`lease_attempts (run_id, attempt, pid, started_at)`, none with a unique constraint, so a
duplicate effect would be visible.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import durable

DSN_ENV = "DURABLE_APP_DSN"
LEASE_ENV = "DURABLE_APP_LEASE_SECONDS"
LEASE_SLEEP_ENV = "DURABLE_APP_LEASE_SLEEP"

STEPS = ("s1", "s2", "s3", "s4", "s5")
COMPENSATED = ("s1", "s2", "s3")
FAILING = "s4"

TABLES_SQL = """
-- `id` is not unique-constrained; its sequence counts every insert ever attempted, so
-- `last_value - count(*)` is the number of inserts that were rolled back.
CREATE TABLE effects (id bigserial, run_id text NOT NULL, step text NOT NULL);
CREATE TABLE comp_effects (run_id text NOT NULL, step text NOT NULL);
CREATE TABLE lease_attempts (
    run_id text NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

Handler = Callable[[durable.Context], Awaitable[Any]]


async def _jitter() -> None:
    """Hold the node's transaction open a little so that kills land mid-step."""
    await asyncio.sleep(random.uniform(0.0, 0.03))


def _effect(step: str) -> Handler:
    async def handler(ctx: durable.Context) -> dict[str, Any]:
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO effects (run_id, step) VALUES ($1, $2)", ctx.run_id, step
        )
        await _jitter()
        return {"step": step, "attempt": ctx.attempt}

    handler.__name__ = step
    return handler


def _failing(step: str) -> Handler:
    async def handler(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        # Written, then rolled back with the failed attempt's savepoint.
        await ctx.conn.execute(
            "INSERT INTO effects (run_id, step) VALUES ($1, $2)", ctx.run_id, step
        )
        await _jitter()
        raise durable.NonRetryable(f"{step} refuses for good")

    handler.__name__ = step
    return handler


def _compensator(step: str) -> Handler:
    key = f"{step}@compensate"

    async def handler(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO comp_effects (run_id, step) VALUES ($1, $2)", ctx.run_id, key
        )
        await _jitter()
        return key

    handler.__name__ = f"undo_{step}"
    return handler


crash5 = durable.Workflow("crash5")
for _name in STEPS:
    crash5.step(_name, _effect(_name), max_attempts=3, backoff=0)

crash5fail = durable.Workflow("crash5fail")
for _name in STEPS:
    crash5fail.step(
        _name,
        _failing(_name) if _name == FAILING else _effect(_name),
        max_attempts=3,
        backoff=0,
        compensate=_compensator(_name) if _name in COMPENSATED else None,
    )

# The failover test: two steps, a signal wait, two more steps; every step writes an effect.
HANDOVER_STEPS = ("h1", "h2", "h3", "h4")
handover = durable.Workflow("handover")
handover.step("h1", _effect("h1"), max_attempts=3, backoff=0)
handover.step("h2", _effect("h2"), max_attempts=3, backoff=0)
handover.wait_for_signal("go", "go")
handover.step("h3", _effect("h3"), max_attempts=3, backoff=0)
handover.step("h4", _effect("h4"), max_attempts=3, backoff=0)

lease = durable.Workflow("lease")


@lease.step(transactional=False)
async def work(ctx: durable.Context) -> dict[str, Any]:
    """Record the attempt's start on the database clock, then take long on attempt 1."""
    assert ctx.conn is None
    conn = await asyncpg.connect(os.environ[DSN_ENV])
    try:
        await conn.execute(
            "INSERT INTO lease_attempts (run_id, attempt, pid) VALUES ($1, $2, $3)",
            ctx.run_id,
            ctx.attempt,
            os.getpid(),
        )
    finally:
        await conn.close()
    if ctx.attempt < 2:
        await asyncio.sleep(float(os.environ.get(LEASE_SLEEP_ENV, "3")))
    return {"attempt": ctx.attempt, "pid": os.getpid()}


WORKFLOWS = (crash5, crash5fail, handover, lease)


def build_engine(dsn: str | None = None, *, lease_seconds: float | None = None) -> durable.Engine:
    """The engine every process of a test uses; unset arguments come from the environment."""
    if dsn is None:
        dsn = os.environ[DSN_ENV]
    if lease_seconds is None:
        lease_seconds = float(os.environ.get(LEASE_ENV, "30"))
    return durable.Engine(dsn, workflows=WORKFLOWS, lease_seconds=lease_seconds, pool_size=2)
