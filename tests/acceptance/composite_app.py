"""Workflows with composite nodes for the crash acceptance tests, importable by a worker
subprocess (`composite_worker_proc.py`) and by the test itself.

Configuration comes from the environment so that a freshly spawned worker builds exactly
the engine the test expects:

- `DURABLE_COMPOSITE_DSN`: the database (may carry `?application_name=...` so the test can
  tell worker connections apart in `pg_stat_activity`);
- `DURABLE_COMPOSITE_SLEEP`: the seconds of the `csleep` workflow's sleep (default 2).

Tables (`TABLES_SQL`), none with a unique constraint, so a duplicate would be visible:

- `effects (id, run_id, what, pid, at)`: written through `ctx.conn`, so a row exists only
  if the attempt that wrote it committed; `id`'s sequence counts every insert ever tried.
- `starts (run_id, what, pid, at)`: written on a separate autocommit connection when an
  attempt begins, so it keeps attempts that were rolled back or killed too. An attempt that
  starts after the committed attempt of the same `what` would be a re-run of committed work.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import durable

DSN_ENV = "DURABLE_COMPOSITE_DSN"
SLEEP_ENV = "DURABLE_COMPOSITE_SLEEP"

ITERATIONS = 10
BRANCHES = ("b0", "b1", "b2", "b3")
CHILD_STEPS = ("c1", "c2")

TABLES_SQL = """
CREATE TABLE effects (
    id bigserial,
    run_id text NOT NULL,
    what text NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE starts (
    run_id text NOT NULL,
    what text NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

Handler = Callable[[durable.Context], Awaitable[Any]]

_side: asyncpg.Pool | None = None
_side_lock = asyncio.Lock()


async def _side_pool() -> asyncpg.Pool:
    """A small pool of this process, outside every node's transaction."""
    global _side
    async with _side_lock:
        if _side is None:
            _side = await asyncpg.create_pool(os.environ[DSN_ENV], min_size=1, max_size=4)
    assert _side is not None
    return _side


async def close_side_pool() -> None:
    """Close this process's side pool, if it was opened."""
    global _side
    if _side is not None:
        await _side.close()
        _side = None


async def attempt(ctx: durable.Context, what: str, hold: tuple[float, float]) -> None:
    """Log the attempt's start (committed at once), write the effect in the node's
    transaction, then hold the transaction open a little so that kills land mid-node."""
    pool = await _side_pool()
    await pool.execute(
        "INSERT INTO starts (run_id, what, pid) VALUES ($1, $2, $3)", ctx.run_id, what, os.getpid()
    )
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO effects (run_id, what, pid) VALUES ($1, $2, $3)",
        ctx.run_id,
        what,
        os.getpid(),
    )
    await asyncio.sleep(random.uniform(*hold))


# -- mid-loop --------------------------------------------------------------------------------

cloop = durable.Workflow("cloop")


async def _loop_body(ctx: durable.LoopContext) -> dict[str, int]:
    assert len(ctx.results["lp"]) == ctx.iteration
    await attempt(ctx, f"lp#{ctx.iteration}", (0.03, 0.07))
    return {"i": ctx.iteration, "sq": ctx.iteration * ctx.iteration}


cloop.loop("lp", lambda ctx, i: i < ITERATIONS, _loop_body, max_iterations=ITERATIONS)


@cloop.step
async def tally(ctx: durable.Context) -> int:
    return sum(r["sq"] for r in ctx.results["lp"])


# -- mid-parallel ----------------------------------------------------------------------------

cpar = durable.Workflow("cpar")


def _branch(name: str) -> Handler:
    async def handler(ctx: durable.Context) -> dict[str, str]:
        await attempt(ctx, f"fan#{name}", (0.05, 0.12))
        return {"branch": name}

    handler.__name__ = name
    return handler


cpar.parallel("fan", {b: _branch(b) for b in BRANCHES}, max_attempts=3, backoff=0)


@cpar.step
async def gather(ctx: durable.Context) -> list[str]:
    return sorted(r["branch"] for r in ctx.results["fan"].values())


# -- parent and child ------------------------------------------------------------------------

cchild = durable.Workflow("cchild")


def _child_step(name: str) -> Handler:
    async def handler(ctx: durable.Context) -> dict[str, str]:
        await attempt(ctx, name, (0.05, 0.12))
        return {"step": name, "parent": ctx.input["parent"]}

    handler.__name__ = name
    return handler


for _name in CHILD_STEPS:
    cchild.step(_name, _child_step(_name), backoff=0)

cparent = durable.Workflow("cparent")


@cparent.step(backoff=0)
async def pre(ctx: durable.Context) -> str:
    await attempt(ctx, "pre", (0.03, 0.08))
    return "pre"


cparent.child_workflow("kid", lambda ctx: ("cchild", {"parent": ctx.run_id}))


@cparent.step(backoff=0)
async def post(ctx: durable.Context) -> Any:
    await attempt(ctx, "post", (0.03, 0.08))
    return ctx.results["kid"]


# -- sleep across a full stop ----------------------------------------------------------------

csleep = durable.Workflow("csleep")
csleep.sleep("nap", lambda ctx: float(os.environ.get(SLEEP_ENV, "2")))


@csleep.step
async def after(ctx: durable.Context) -> str:
    await attempt(ctx, "after", (0.0, 0.0))
    return "awake"


WORKFLOWS = (cloop, cpar, cchild, cparent, csleep)


def build_engine(dsn: str | None = None) -> durable.Engine:
    """The engine every process of a test uses; the DSN defaults to the environment's."""
    if dsn is None:
        dsn = os.environ[DSN_ENV]
    return durable.Engine(dsn, workflows=WORKFLOWS, pool_size=2)
