"""Acceptance: a worker process SIGKILLed mid-job loses nothing, and the job runs once more.

The worker processes are `queue_worker_proc.py`. The first one's handler inserts the job's
effect row, records "mid-job" in an unlogged `progress` table on a separate autocommit
connection, then sleeps; the test kills it there with SIGKILL. PostgreSQL rolls the dead
worker's transaction back (effect and all), the row lock goes with it, and another worker
completes the job: one effect row, no job row left, and promptly, not at the next poll.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from durable.queue import JobQueue
from durable.sql import Queries

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKER_PROC = HERE / "queue_worker_proc.py"
QUEUE = "crash"
JOBS = JobQueue(Queries("durable"))
# The workers' poll interval: longer than any deadline here, so a job a worker takes over
# in time was not found by its poll.
POLL_INTERVAL = 3600.0


class Proc:
    """A worker subprocess with its output in a file."""

    def __init__(self, dsn: str, log: Path, *args: str) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER_PROC),
                    dsn,
                    "--queue",
                    QUEUE,
                    "--poll-interval",
                    str(POLL_INTERVAL),
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        if self.popen.poll() is None:
            return True
        raise AssertionError(
            f"worker {self.pid} exited {self.popen.returncode}:\n{self.log.read_text()[-4000:]}"
        )

    async def exit_code(self, timeout: float) -> int:
        async def exited() -> bool:
            return self.popen.poll() is not None

        await poll(exited, timeout=timeout)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
async def conn(db: Any) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db.dsn)
    await c.execute(
        "CREATE TABLE effects (item int NOT NULL, job_id bigint NOT NULL, pid int NOT NULL);"
        "CREATE UNLOGGED TABLE progress (job_id bigint NOT NULL, pid int NOT NULL)"
    )
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


async def poll(check: Any, *, timeout: float, interval: float = 0.01) -> None:
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - polling a database / process
            await anyio.sleep(interval)


async def idle_after_claiming(conn: asyncpg.Connection, app: str) -> bool:
    """True when the worker connected as `app` listens and a claim of it has finished.

    An idle worker's only pooled connections are its listener (last query: LISTEN) and the
    one its claims use, which the pool resets on release (last query: the reset query).
    """
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE query ILIKE 'LISTEN%durable_jobs%') AS listening,"
        "       count(*) FILTER (WHERE query ILIKE '%pg_advisory_unlock_all%') AS claimed"
        " FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = $1 AND state = 'idle'",
        app,
    )
    return bool(row["listening"] and row["claimed"])


def with_app_name(dsn: str, app: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}application_name={app}"))


async def start_and_kill_mid_job(
    db: Any, conn: asyncpg.Connection, procs: list[Proc], tmp_path: Path
) -> tuple[int, Proc]:
    """Enqueue one job, let a blocking worker take it half-way, return (job id, the worker)."""
    async with conn.transaction():
        job_id = await JOBS.enqueue(conn, QUEUE, "insert", {"item": 1})
    victim = Proc(db.dsn, tmp_path / "victim.log", "--block", "3600", "--concurrency", "2")
    procs.append(victim)

    async def mid_job() -> bool:
        victim.alive()
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM progress WHERE job_id = $1 AND pid = $2", job_id, victim.pid
            )
        )

    await poll(mid_job, timeout=30, interval=0.02)
    # The job is held (a SKIP LOCKED claim passes it by) and its effect is not committed.
    async with conn.transaction():
        assert await JOBS.claim(conn, [QUEUE]) is None
    assert await conn.fetchval("SELECT count(*) FROM effects") == 0
    return job_id, victim


async def assert_done_once(conn: asyncpg.Connection, job_id: int, by: Proc) -> None:
    rows = await conn.fetch("SELECT item, job_id, pid FROM effects")
    assert [tuple(r) for r in rows] == [(1, job_id, by.pid)]
    assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0


async def test_a_job_killed_mid_way_is_completed_once_by_a_new_worker(
    db: Any, conn: asyncpg.Connection, procs: list[Proc], tmp_path: Path
) -> None:
    job_id, victim = await start_and_kill_mid_job(db, conn, procs, tmp_path)

    victim.popen.send_signal(signal.SIGKILL)
    assert await victim.exit_code(5) == -signal.SIGKILL
    # Claimable at once, by anyone: no lease or visibility timeout to wait out.
    tx = conn.transaction()
    await tx.start()
    try:
        free = await JOBS.claim(conn, [QUEUE])
    finally:
        await tx.rollback()  # give it back untouched
    assert free is not None
    assert free.id == job_id

    rescuer = Proc(db.dsn, tmp_path / "rescuer.log", "--concurrency", "2")
    procs.append(rescuer)

    async def drained() -> bool:
        rescuer.alive()
        return await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0

    await poll(drained, timeout=15)
    await assert_done_once(conn, job_id, rescuer)

    rescuer.popen.send_signal(signal.SIGTERM)
    assert await rescuer.exit_code(15) == 0


async def test_a_running_idle_worker_takes_over_a_killed_workers_job_promptly(
    db: Any, conn: asyncpg.Connection, procs: list[Proc], tmp_path: Path
) -> None:
    job_id, victim = await start_and_kill_mid_job(db, conn, procs, tmp_path)

    standby = Proc(with_app_name(db.dsn, "standby"), tmp_path / "standby.log", "--concurrency", "2")
    procs.append(standby)

    async def standby_idle() -> bool:
        standby.alive()
        return await idle_after_claiming(conn, "standby")

    # The standby has looked for work and found the job held. Its listener's first wake-up
    # may trigger one more claim right after; give that a moment to finish too, so that the
    # standby is asleep (until a NOTIFY or its poll interval) when the victim dies.
    await poll(standby_idle, timeout=30, interval=0.01)
    await anyio.sleep(0.5)
    async with conn.transaction():
        assert await JOBS.claim(conn, [QUEUE]) is None

    victim.popen.send_signal(signal.SIGKILL)
    assert await victim.exit_code(5) == -signal.SIGKILL

    async def drained() -> bool:
        standby.alive()
        return await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0

    # Its poll is an hour away: taking the job within the deadline means it looked again
    # because it had seen the job held.
    await poll(drained, timeout=30)
    await assert_done_once(conn, job_id, standby)

    standby.popen.send_signal(signal.SIGTERM)
    assert await standby.exit_code(15) == 0
