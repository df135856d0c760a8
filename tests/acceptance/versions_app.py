"""Two versions of one workflow for the versioned crash test, importable by a worker
subprocess. `DURABLE_APP_DSN` is the database; `DURABLE_APP_VERSIONS` the versions the
engine registers (`1` or `1,2`), and `DURABLE_APP_WORKER` the worker's name.

Every step writes a row to `ver_effects` through `ctx.conn`, in the step's transaction:
the version of the code that ran it, and the versions and name of the worker that did.
The table has no unique constraint, so a step committed twice would show.
"""

from __future__ import annotations

import asyncio
import os
import random

import durable

DSN_ENV = "DURABLE_APP_DSN"
VERSIONS_ENV = "DURABLE_APP_VERSIONS"
WORKER_ENV = "DURABLE_APP_WORKER"

STEPS = {1: ("s1", "s2", "s3"), 2: ("s1", "s2", "s3", "s4")}

TABLES_SQL = """
CREATE TABLE ver_effects (
    id bigserial, run_id text NOT NULL, step text NOT NULL, version integer NOT NULL,
    worker text NOT NULL, registered text NOT NULL
);
"""


def build(version: int) -> durable.Workflow:
    wf = durable.Workflow("versioned", version=version)
    for name in STEPS[version]:

        async def step(ctx: durable.Context, name: str = name) -> int:
            assert ctx.conn is not None
            await ctx.conn.execute(
                "INSERT INTO ver_effects (run_id, step, version, worker, registered) "
                "VALUES ($1, $2, $3, $4, $5)",
                ctx.run_id,
                name,
                version,
                os.environ.get(WORKER_ENV, "client"),
                os.environ.get(VERSIONS_ENV, "1,2"),
            )
            # Hold the transaction open a little so that kills land mid-step.
            await asyncio.sleep(random.uniform(0.0, 0.03))
            return version

        wf.step(name, step)
    return wf


def build_engine(dsn: str | None = None, versions: str | None = None) -> durable.Engine:
    chosen = versions or os.environ.get(VERSIONS_ENV, "1,2")
    return durable.Engine(
        dsn or os.environ[DSN_ENV],
        workflows=[build(int(v)) for v in chosen.split(",")],
        poll_interval=0.2,
    )
