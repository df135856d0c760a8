"""A job whose worker dies mid-attempt again and again (issue 10, bounded failure): it is
claimed at most `max_claims` + 1 times, then its attempt fails with `WorkerLost` instead of
killing every worker that touches it, forever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg

import durable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_loop_proc

HERE = Path(__file__).resolve().parent
MAX_CLAIMS = 2


async def test_a_job_that_kills_its_worker_every_time_fails_with_worker_lost(db: Any) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        await conn.execute("CREATE TABLE deaths (pid int NOT NULL)")
    finally:
        await conn.close()
    engine = durable.Engine(db.dsn, workflows=[crash_loop_proc.crashy])
    async with engine:
        run_id = await engine.start("crashy")
        workers = 0
        with anyio.fail_after(60):
            while (await engine.get_run(run_id)).status is not durable.RunStatus.FAILED:
                assert workers <= MAX_CLAIMS + 1, "the crash loop is not bounded"
                # A supervisor restarting the worker, as systemd or Kubernetes would.
                proc = await anyio.open_process(
                    [sys.executable, str(HERE / "crash_loop_proc.py"), db.dsn, str(MAX_CLAIMS)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                workers += 1
                async with proc:
                    # It dies in the step, or records the lost attempt and stays up.
                    while proc.returncode is None:
                        run = await engine.get_run(run_id)
                        if run.status is durable.RunStatus.FAILED:
                            proc.terminate()
                        with anyio.move_on_after(0.05):
                            await proc.wait()
        run = await engine.get_run(run_id, journal=True)
        deaths = await engine.pool.fetchval("SELECT count(*) FROM deaths")
    assert run.status is durable.RunStatus.FAILED
    assert run.error is not None
    assert run.error.startswith("WorkerLost: workers died 2 times in a row"), run.error
    # The first claim and MAX_CLAIMS more died; the next claim recorded the attempt.
    assert deaths == MAX_CLAIMS + 1
    assert [a.error.split(":")[0] for a in run.attempts] == ["WorkerLost"]
