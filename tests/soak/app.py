"""The soak's workflows, importable by the worker subprocesses and by the driver/checker.

`soak` uses every node type: steps writing an effect through `ctx.conn` (with compensators),
a non-transactional step under a lease, a sleep, a signal wait without timeout (the driver
sends `approve` from outside), a signal wait with a timeout and a default (`ping`, sent to
some runs at random times), a parallel node of three branches (with compensators), a route
chosen by the input, a loop of `n` iterations and a child workflow (`soak_child`, two
steps). The run's input decides its fate (see `plan_input`):

- `doom == ""`: the run completes;
- `doom == "late"`: step `doom` raises `NonRetryable` after everything else committed, so
  the run ends `failed` and `a`, the three branches and `b` are compensated;
- `doom == "fan"`: branch `f2` raises `NonRetryable`, so the parallel node fails; `a` and
  whichever of `f0`/`f1` had committed are compensated, nothing after `fan` runs;
- `flaky`: step `b` fails its first attempt (after writing its effect, which rolls back).

Every handler that writes through `ctx.conn` keys its effect by `ctx.node`, which is the
node's journal key (`a`, `fan#f0`, `lp#2`, `b@compensate`, ...), so the checker can match
effects against the journal one to one. The effect tables have no unique constraint: a
duplicate would be visible.

Environment: `SOAK_DSN`, the database (with `?application_name=soak-worker-N` for workers,
so that the driver can find and terminate their backends).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import durable

DSN_ENV = "SOAK_DSN"

BRANCHES = ("f0", "f1", "f2")
ROUTES = ("left", "middle", "right")
CHILD_STEPS = ("c1", "c2")
PING_TIMEOUT = 0.6
PING_DEFAULT = {"timeout": True}
LEASE_SECONDS = 3.0
#: The wait nodes, by the signal they consume.
WAIT_NODES = {"approve": "approval", "ping": "ping_wait"}
#: Journal keys whose handlers write one effect row (besides `fan#*` and `lp#*`).
EFFECT_STEPS = ("a", "pick", "b", "doom", "z")
#: Journal keys whose compensators write one `comp_effects` row (besides `fan#*`).
COMPENSATED_STEPS = ("a", "b")

TABLES_SQL = """
CREATE TABLE effects (
    id bigserial,
    run_id text NOT NULL,
    key text NOT NULL,
    info text,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE comp_effects (
    id bigserial,
    run_id text NOT NULL,
    key text NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Written on a connection of its own by the non-transactional step: at-least-once.
CREATE TABLE ext_effects (
    run_id text NOT NULL,
    token text NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Every signal the driver sent, recorded after engine.signal returned: accepted is its
-- return value, NULL when it raised (the outcome is unknown). `seq` (also in the payload)
-- makes the record idempotent: the driver retries it when its own connection drops.
CREATE TABLE sent_signals (
    seq bigint PRIMARY KEY,
    run_id text NOT NULL,
    name text NOT NULL,
    payload jsonb NOT NULL,
    accepted boolean,
    error text,
    sent_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

Handler = Callable[[durable.Context], Awaitable[Any]]


def plan_input(i: int, rng: random.Random) -> dict[str, Any]:
    """The input of parent run `i`: its fate by index (exactly 5% `fan`, 15% `late`,
    10% flaky), its timings at random."""
    k = i % 20
    doom = "fan" if k == 7 else "late" if k in (1, 9, 14) else ""
    return {
        "i": i,
        "doom": doom,
        "flaky": k in (3, 16),
        "nap": round(rng.uniform(0.2, 1.0), 3),
        "route": ROUTES[i % len(ROUTES)],
        "n": 2 + i % 3,
        "ping": rng.random() < 0.5,
    }


async def _hold() -> None:
    """Keep the node's transaction open a few ms, so that kills land mid-transaction."""
    await asyncio.sleep(random.uniform(0.0, 0.015))


async def _effect(ctx: durable.Context, info: str | None = None) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO effects (run_id, key, info, pid) VALUES ($1, $2, $3, $4)",
        ctx.run_id,
        ctx.node,
        info,
        os.getpid(),
    )
    await _hold()


def _step(name: str) -> Handler:
    async def handler(ctx: durable.Context) -> dict[str, Any]:
        await _effect(ctx)
        return {"node": ctx.node, "attempt": ctx.attempt}

    handler.__name__ = name
    return handler


async def _compensate(ctx: durable.Context) -> str:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO comp_effects (run_id, key, pid) VALUES ($1, $2, $3)",
        ctx.run_id,
        ctx.node,
        os.getpid(),
    )
    await _hold()
    return ctx.node


async def _ext(ctx: durable.Context) -> dict[str, Any]:
    """Outside any transaction (at-least-once): record the attempt on a connection of its own,
    retrying through outages and terminated connections."""
    assert ctx.conn is None
    token = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            conn = await asyncpg.connect(os.environ[DSN_ENV], timeout=5)
            try:
                await conn.execute(
                    "INSERT INTO ext_effects (run_id, token, attempt, pid) VALUES ($1, $2, $3, $4)",
                    ctx.run_id,
                    token,
                    ctx.attempt,
                    os.getpid(),
                )
            finally:
                await conn.close()
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
    return {"token": token}


async def _branch(ctx: durable.Context) -> str:
    await _effect(ctx)
    if ctx.input["doom"] == "fan" and ctx.node == "fan#f2":
        raise durable.NonRetryable("branch f2 doomed by the input")
    return ctx.node


def _route_branch(name: str) -> Handler:
    async def handler(ctx: durable.Context) -> str:
        await _effect(ctx, name)
        return name

    handler.__name__ = name
    return handler


async def _loop_body(ctx: durable.LoopContext) -> int:
    assert len(ctx.results["lp"]) == ctx.iteration
    await _effect(ctx)
    return ctx.iteration


async def _b(ctx: durable.Context) -> dict[str, Any]:
    await _effect(ctx)
    if ctx.input["flaky"] and ctx.attempt == 1:
        raise RuntimeError("b is flaky on its first attempt")
    return {"node": ctx.node, "attempt": ctx.attempt}


async def _doom(ctx: durable.Context) -> str:
    await _effect(ctx)
    if ctx.input["doom"] == "late":
        raise durable.NonRetryable("step doom doomed by the input")
    return "spared"


soak = durable.Workflow("soak")
soak.step("a", _step("a"), compensate=_compensate, backoff=0.1)
soak.step("ext", _ext, transactional=False, max_attempts=10, backoff=0.1)
soak.sleep("nap", lambda ctx: ctx.input["nap"])
soak.wait_for_signal("approval", "approve")
soak.wait_for_signal("ping_wait", lambda ctx: "ping", timeout=PING_TIMEOUT, default=PING_DEFAULT)
soak.parallel(
    "fan",
    dict.fromkeys(BRANCHES, _branch),
    compensate=dict.fromkeys(BRANCHES, _compensate),
    backoff=0.1,
)
soak.route("pick", lambda ctx: ctx.input["route"], {r: _route_branch(r) for r in ROUTES})
soak.loop("lp", lambda ctx, i: i < ctx.input["n"], _loop_body, max_iterations=10, backoff=0.1)
soak.child_workflow("kid", lambda ctx: ("soak_child", {"parent": ctx.run_id}))
soak.step("b", _b, compensate=_compensate, max_attempts=3, backoff=0.1)
soak.step("doom", _doom, backoff=0.1)
soak.step("z", _step("z"), backoff=0.1)

soak_child = durable.Workflow("soak_child")
for _name in CHILD_STEPS:
    soak_child.step(_name, _step(_name), backoff=0.1)

WORKFLOWS = (soak, soak_child)


def build_engine(dsn: str | None = None) -> durable.Engine:
    """The engine of every soak process; the DSN defaults to `$SOAK_DSN`."""
    return durable.Engine(
        dsn or os.environ[DSN_ENV],
        workflows=WORKFLOWS,
        pool_size=4,
        lease_seconds=LEASE_SECONDS,
    )
