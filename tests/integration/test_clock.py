"""One clock (issue 10): every statement reads the database clock through `now_v1()`,
shifted by the `durable.clock_offset` setting, so that a test can skip time and the same
SQL runs as in production."""

from __future__ import annotations

from typing import Any

import asyncpg
from helpers import eventually, fetchval, open_engine, running_engine

import durable


def nap() -> durable.Workflow:
    wf = durable.Workflow("nap")
    wf.sleep("hour", 3600)

    @wf.step
    async def after(ctx: durable.Context) -> str:
        return "awake"

    return wf


async def test_shifting_the_clock_setting_fires_an_hour_long_sleep_at_once(
    db: Any, server_dsn: str
) -> None:
    wf = nap()
    async with open_engine(db, wf) as engine, engine.worker(concurrency=2, poll_interval=0.05):
        run_id = await engine.start(wf)

        async def parked() -> bool:
            return (await engine.get_run(run_id)).status is durable.RunStatus.WAITING

        await eventually(parked)
    admin = await asyncpg.connect(server_dsn)
    try:
        # New sessions of this database see the clock an hour and a minute ahead.
        await admin.execute(f"ALTER DATABASE \"{db.name}\" SET durable.clock_offset = '3660'")
    finally:
        await admin.close()
    async with running_engine(db, wf) as engine:
        assert await engine.wait(run_id, timeout=10) == {"hour": None, "after": "awake"}
        shifted = await fetchval(engine, "SELECT durable.now_v1() - now() > interval '1 hour'")
    assert shifted is True
