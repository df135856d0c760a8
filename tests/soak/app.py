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
- `flaky`: step `b` fails its first attempt (after writing its effect, which rolls back);
- `heal` (half of the doomed runs): the doomed node fails only while no `healed` row names
  the run. The driver inserts that row once the run has `failed`, then calls
  `engine.retry`: the run must end `completed`, the compensated steps and branches run
  again (their effects are in the journal's second epoch), everything else replays;
- `cancel` (about 12% of the runs, some of them doomed): the driver calls `engine.cancel`
  once or twice at a random time, or while a worker holds the run's node; their handlers
  keep their transactions open longer (`_hold`), so that cancels meet nodes in flight.

Every handler that writes through `ctx.conn` keys its effect by `ctx.node`, which is the
node's journal key (`a`, `fan#f0`, `lp#2`, `b@compensate`, ...) and by the run's epoch (how
many times it was retried, read from the run row in the node's transaction), so the checker
can match effects against each epoch's journal one to one. The effect tables have no unique
constraint: a duplicate would be visible.

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
    epoch integer NOT NULL,
    info text,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE comp_effects (
    id bigserial,
    run_id text NOT NULL,
    key text NOT NULL,
    epoch integer NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- A run's doomed node stops failing once its run is here (inserted by the driver, after
-- the run failed and before it retries it).
CREATE TABLE healed (
    run_id text PRIMARY KEY
);
-- The journal of a failed run as it was just before the driver retried it (retry forgets
-- the rows of what it re-runs), in the transaction that inserted its `healed` row.
CREATE TABLE journal_before_retry (
    run_id text NOT NULL,
    key text NOT NULL,
    status text NOT NULL,
    result jsonb,
    finished_at timestamptz NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (run_id, key)
);
-- Every engine.retry / engine.cancel the driver made: `accepted` is its return value, NULL
-- when it raised (the outcome is unknown). `called_at` is taken before the call,
-- `returned_at` after it; `in_flight`: the run's advisory lock was held by a worker just
-- before the cancel.
CREATE TABLE sent_retries (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    called_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    returned_at timestamptz,
    accepted boolean,
    error text
);
CREATE TABLE sent_cancels (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    in_flight boolean NOT NULL,
    called_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    returned_at timestamptz,
    accepted boolean,
    error text
);
-- Written on a connection of its own by the non-transactional step: at-least-once. The
-- token is the attempt's: the handler's own retry (its connection dropped after the insert
-- committed) must not count as a second execution.
CREATE TABLE ext_effects (
    run_id text NOT NULL,
    token text PRIMARY KEY,
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
    """The input of parent run `i`: its fate by index (exactly 5% `fan`, 15% `late`, half of
    each healed and retried by the driver in alternate blocks of 20; 10% flaky; 12.5%
    cancelled, including the unhealed doomed runs of index 9 mod 20), its timings at random."""
    k = i % 20
    doom = "fan" if k == 7 else "late" if k in (1, 9, 14) else ""
    heal = bool(doom) and (i // 20) % 2 == 0
    return {
        "i": i,
        "doom": doom,
        "heal": heal,
        "cancel": k in (3, 12) or (k == 9 and not heal),
        "flaky": k in (3, 16),
        "nap": round(rng.uniform(0.2, 1.0), 3),
        "route": ROUTES[i % len(ROUTES)],
        "n": 2 + i % 3,
        "ping": rng.random() < 0.5,
    }


async def _hold(ctx: durable.Context) -> None:
    """Keep the node's transaction open a few ms, so that kills land mid-transaction (and
    longer in runs the driver cancels, so that cancels meet nodes in flight)."""
    longer = ctx.input.get("cancel", False)
    await asyncio.sleep(random.uniform(0.02, 0.2) if longer else random.uniform(0.0, 0.015))


async def _effect(ctx: durable.Context, info: str | None = None) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO effects (run_id, key, epoch, info, pid) "
        "SELECT $1, $2, epoch, $3, $4 FROM durable.runs WHERE id = $1",
        ctx.run_id,
        ctx.node,
        info,
        os.getpid(),
    )
    await _hold(ctx)


async def _healed(ctx: durable.Context) -> bool:
    assert ctx.conn is not None
    found: bool = await ctx.conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM healed WHERE run_id = $1)", ctx.run_id
    )
    return found


def _step(name: str) -> Handler:
    async def handler(ctx: durable.Context) -> dict[str, Any]:
        await _effect(ctx)
        return {"node": ctx.node, "attempt": ctx.attempt}

    handler.__name__ = name
    return handler


async def _compensate(ctx: durable.Context) -> str:
    assert ctx.conn is not None
    await ctx.conn.execute(
        "INSERT INTO comp_effects (run_id, key, epoch, pid) "
        "SELECT $1, $2, epoch, $3 FROM durable.runs WHERE id = $1",
        ctx.run_id,
        ctx.node,
        os.getpid(),
    )
    await _hold(ctx)
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
                    "INSERT INTO ext_effects (run_id, token, attempt, pid) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (token) DO NOTHING",
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
    if ctx.input["doom"] == "fan" and ctx.node == "fan#f2" and not await _healed(ctx):
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
    if ctx.input["doom"] == "late" and not await _healed(ctx):
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
