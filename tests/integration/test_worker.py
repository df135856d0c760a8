"""The worker loop (durable/worker.py) against a real PostgreSQL.

In-process workers run on the test's event loop; the 10,000-job drain runs four real worker
processes (tests/acceptance/queue_worker_proc.py). Waits are polls with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from durable.queue import Job, JobQueue
from durable.sql import Queries
from durable.worker import Handler, Worker, retry_delay

ROOT = Path(__file__).resolve().parents[2]
WORKER_PROC = ROOT / "tests" / "acceptance" / "queue_worker_proc.py"
Q = "q"
HOUR = 3600.0  # a poll interval no test waits for: what happens in time happens otherwise
QUERIES = Queries("durable")
JOBS = JobQueue(QUERIES)

# A worker that hangs must fail its test, not stall the suite for the global 300 s.
pytestmark = pytest.mark.timeout(60)


class ClaimProbe:
    """A claim hook (`Worker(claim=...)`) that counts claims, so a test can tell when a worker
    has looked for work, found none, and gone to sleep."""

    def __init__(
        self, after: Callable[[asyncpg.Connection, Job | None], Awaitable[None]] | None = None
    ) -> None:
        self.active = 0
        self.empty = 0
        self.total = 0
        self.after = after

    async def __call__(self, conn: asyncpg.Connection, queues: Any) -> Job | None:
        self.active += 1
        try:
            job = await JOBS.claim(conn, queues)
            if self.after is not None:
                await self.after(conn, job)
        finally:
            self.active -= 1
        self.total += 1
        if job is None:
            self.empty += 1
        return job


async def poll(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.02
) -> None:
    """Wait until `check()` is true, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - polling a database / process
            await anyio.sleep(interval)


@asynccontextmanager
async def running(worker: Worker, *, stop_within: float = 10.0) -> AsyncIterator[anyio.Event]:
    """Run `worker` in the background; on exit stop it and require run() to return."""
    returned = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await worker.run(task_status=task_status)
        finally:
            returned.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        failed = False
        try:
            yield returned
        except BaseException:
            failed = True  # keep the test's own failure; do not wait long for the worker
            raise
        finally:
            worker.stop()
            with anyio.move_on_after(1.0 if failed else stop_within):
                await returned.wait()
            if not returned.is_set():
                tg.cancel_scope.cancel()
                if not failed:
                    raise AssertionError(
                        f"worker.run() did not return {stop_within} s after stop()"
                    )


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def enqueue(
    conn: asyncpg.Connection, payload: dict[str, Any], *, task: str = "t", delay: float = 0.0
) -> int:
    async with conn.transaction():
        return await JOBS.enqueue(conn, Q, task, payload, delay=delay)


async def listening(conn: asyncpg.Connection, channel: str = "durable_jobs") -> bool:
    """True when some backend of this database has executed LISTEN on `channel` and an idle
    worker has registered as a listener (job inserts NOTIFY only while one is)."""
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'idle' AND query ILIKE $1",
        f"LISTEN%{channel}%",
    )
    registered = await conn.fetchval("SELECT count(*) FROM durable.listeners")
    return bool(n) and bool(registered)


async def wait_idle(
    probe: ClaimProbe, conn: asyncpg.Connection, channel: str = "durable_jobs"
) -> None:
    """Wait until the worker listens, has claimed in vain and has stopped claiming (no claim
    for 0.2 s: the wake-up its listener sends itself on connecting has been handled)."""

    async def idle() -> bool:
        if not (probe.empty >= 1 and probe.active == 0 and await listening(conn, channel)):
            return False
        seen = probe.total
        await anyio.sleep(0.2)
        return probe.total == seen and probe.active == 0

    await poll(idle, timeout=10)


@pytest.fixture
async def pool(db: Any) -> AsyncIterator[asyncpg.Pool]:
    """The workers' pool; closing it may not hang on a connection a worker failed to return."""
    p = await asyncpg.create_pool(db.dsn, min_size=1, max_size=30)
    assert p is not None
    yield p
    with anyio.move_on_after(5):
        await p.close()
        return
    p.terminate()
    pytest.fail("the pool did not close within 5 s: a connection was never returned to it")


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as c:
        await c.execute(
            "CREATE TABLE effects (item int NOT NULL, job_id bigint NOT NULL,"
            " attempt int NOT NULL DEFAULT 0, executed_at timestamptz NOT NULL"
            " DEFAULT clock_timestamp())"
        )
        yield c


def insert_effect(*, then: Callable[[Job], Awaitable[None]] | None = None) -> Handler:
    async def handler(c: asyncpg.Connection, job: Job) -> None:
        await c.execute(
            "INSERT INTO effects (item, job_id, attempt) VALUES ($1, $2, $3)",
            job.payload["item"],
            job.id,
            job.attempts,
        )
        if then is not None:
            await then(job)

    return handler


async def effects(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT item FROM effects ORDER BY item")]


# -- basics --------------------------------------------------------------------------------


def test_worker_validates_its_options(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Worker(pool, QUERIES, {}, queues=[Q], concurrency=0)
    with pytest.raises(ValueError, match="poll_interval"):
        Worker(pool, QUERIES, {}, queues=[Q], poll_interval=0)


async def test_worker_needs_a_queue(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="queue"):
        await Worker(pool, QUERIES, {}, queues=[]).run()


async def test_worker_runs_every_job_once_and_deletes_it(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    async with conn.transaction():
        for i in range(200):
            await JOBS.enqueue(conn, Q, "t", {"item": i})
        await JOBS.enqueue(conn, "elsewhere", "t", {"item": -1})
    worker = Worker(pool, QUERIES, {"t": insert_effect()}, queues=[Q], concurrency=4)
    async with running(worker):
        await poll(lambda: _count_is(conn, 1), timeout=20)
    assert await effects(conn) == list(range(200))
    assert worker.processed == 200
    # The job of a queue this worker does not serve is untouched.
    assert await conn.fetchval("SELECT queue FROM durable.jobs") == "elsewhere"


async def _count_is(conn: asyncpg.Connection, n: int) -> bool:
    return await JOBS.count(conn) == n


# -- failures ------------------------------------------------------------------------------


async def test_a_failing_handler_rolls_back_its_writes_and_the_job_is_retried(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    async def fail_first(job: Job) -> None:
        if job.attempts == 0:
            raise RuntimeError("boom")

    job_id = await enqueue(conn, {"item": 1})
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect(then=fail_first)},
        queues=[Q],
        concurrency=2,
        poll_interval=0.1,
    )
    async with running(worker):

        async def failed_once() -> bool:
            return (
                await conn.fetchval("SELECT attempts FROM durable.jobs WHERE id = $1", job_id) == 1
            )

        await poll(failed_once, timeout=5, interval=0.005)
        row = await conn.fetchrow(
            "SELECT run_at, now() AS now FROM durable.jobs WHERE id = $1", job_id
        )
        if row is not None:  # not yet retried: the retry is scheduled ~1 s ahead
            assert row["run_at"] - row["now"] > timedelta(seconds=0.5)
        # The failed attempt's insert rolled back with it.
        assert await conn.fetchval("SELECT count(*) FROM effects WHERE attempt = 0") == 0

        await poll(lambda: _count_is(conn, 0), timeout=5)
    rows = await conn.fetch("SELECT item, job_id, attempt FROM effects")
    assert [tuple(r) for r in rows] == [(1, job_id, 1)]


async def test_a_job_without_handler_is_kept_and_retried(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    job_id = await enqueue(conn, {"item": 1}, task="unknown")
    worker = Worker(pool, QUERIES, {"t": insert_effect()}, queues=[Q], concurrency=2)
    async with running(worker):

        async def attempted() -> bool:
            return bool(
                await conn.fetchval("SELECT attempts FROM durable.jobs WHERE id = $1", job_id)
            )

        await poll(attempted, timeout=5)
    assert await JOBS.count(conn) == 1


async def test_a_failed_job_is_retried_when_its_backoff_elapses_not_at_the_next_poll(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The retry is a delayed job: an idle worker must wake when it is due (1 s), not at the
    next poll (an hour away: only the due time can explain the retry within the deadline)."""
    attempts_at: dict[int, float] = {}

    async def fail_first(job: Job) -> None:
        if job.attempts == 0:
            # Fail only once the worker has looked for more work meanwhile, as it does
            # whenever a handler takes more than a moment.
            await poll(lambda: _true(probe.empty >= 1), timeout=5)
            attempts_at[0] = time.monotonic()
            raise RuntimeError("boom")
        attempts_at[1] = time.monotonic()

    await enqueue(conn, {"item": 1})
    probe = ClaimProbe()
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect(then=fail_first)},
        queues=[Q],
        concurrency=4,
        poll_interval=HOUR,
        claim=probe,
    )
    async with running(worker):
        await poll(lambda: _count_is(conn, 0), timeout=15)
    # Not before its backoff either.
    assert attempts_at[1] - attempts_at[0] >= retry_delay(1) - 0.05


async def test_a_failed_job_is_not_claimable_by_others_before_its_backoff(
    pool: asyncpg.Pool, conn: asyncpg.Connection, db: Any
) -> None:
    """Between the handler's failure and the recorded retry no other worker may take the job.

    A logging handler on `durable.worker` runs when the worker reports the failure (its first
    ERROR record about the job; today that is after the rollback and before the retry is
    written) and tries to claim the job from another connection, as a competing worker would.
    """
    probes: list[asyncpg.Record | None] = []

    def claim_elsewhere() -> None:
        async def go() -> None:
            other = await asyncpg.connect(db.dsn)
            try:
                async with other.transaction():
                    probes.append(await other.fetchrow(QUERIES["claim_job"], [Q]))
            finally:
                await other.close()

        asyncio.run(go())

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "job_id", None) is not None and not probes:
                thread = threading.Thread(target=claim_elsewhere)
                thread.start()
                thread.join(10)

    async def always_fail(job: Job) -> None:
        raise RuntimeError("boom")

    job_id = await enqueue(conn, {"item": 1})
    probe = Probe(level=logging.ERROR)
    logger = logging.getLogger("durable.worker")
    logger.addHandler(probe)
    try:
        worker = Worker(
            pool,
            QUERIES,
            {"t": insert_effect(then=always_fail)},
            queues=[Q],
            concurrency=1,
            poll_interval=5.0,
        )
        async with running(worker):

            async def failed_once() -> bool:
                return (
                    await conn.fetchval("SELECT attempts FROM durable.jobs WHERE id = $1", job_id)
                    == 1
                )

            await poll(failed_once, timeout=5)
    finally:
        logger.removeHandler(probe)
    assert len(probes) == 1
    assert probes[0] is None, "another worker could claim the failed job before its backoff"


# -- delayed jobs --------------------------------------------------------------------------


async def _enqueue_delayed(conn: asyncpg.Connection, item: int, delay: float) -> Any:
    async with conn.transaction():
        job_id = await JOBS.enqueue(conn, Q, "t", {"item": item}, delay=delay)
        return await conn.fetchval("SELECT run_at FROM durable.jobs WHERE id = $1", job_id)


async def _lateness(conn: asyncpg.Connection, run_at: dict[int, Any]) -> dict[int, float]:
    rows = await conn.fetch("SELECT item, executed_at FROM effects")
    assert sorted(r["item"] for r in rows) == sorted(run_at)
    return {r["item"]: (r["executed_at"] - run_at[r["item"]]).total_seconds() for r in rows}


async def test_a_delayed_job_runs_when_due_on_the_database_clock(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    probe = ClaimProbe()
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect()},
        queues=[Q],
        concurrency=4,
        poll_interval=HOUR,
        claim=probe,
    )
    run_at: dict[int, Any] = {}
    async with running(worker):
        await wait_idle(probe, conn)
        for item, delay in enumerate((0.5, 1.0, 1.5)):
            run_at[item] = await _enqueue_delayed(conn, item, delay)
            await poll(lambda: _count_is(conn, 0), timeout=delay + 3)
    # Due by the database clock, never before; and run within the deadline although the
    # worker polls once an hour: it woke for the due time.
    late = await _lateness(conn, run_at)
    for item, seconds in late.items():
        assert seconds >= 0, f"job {item} ran {-seconds:.3f} s before its run_at"


async def test_delayed_jobs_enqueued_together_each_run_when_due(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    probe = ClaimProbe()
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect()},
        queues=[Q],
        concurrency=4,
        poll_interval=HOUR,
        claim=probe,
    )
    run_at: dict[int, Any] = {}
    async with running(worker):
        await wait_idle(probe, conn)
        async with conn.transaction():
            for item, delay in enumerate((0.5, 1.0, 1.5)):
                run_at[item] = await _enqueue_delayed(conn, item, delay)
        await poll(lambda: _count_is(conn, 0), timeout=12)
    # Due by the database clock, never before; and run within the deadline although the
    # worker polls once an hour: it woke for the due time.
    late = await _lateness(conn, run_at)
    for item, seconds in late.items():
        assert seconds >= 0, f"job {item} ran {-seconds:.3f} s before its run_at"


async def test_a_job_falling_due_during_an_empty_claim_is_not_left_to_the_next_poll(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The claim's snapshot is taken at its start; if the next job falls due before the
    worker asks how long to sleep, it is due now, and the worker must not sleep a poll."""
    armed = False
    run_at: dict[int, Any] = {}

    async def slow(c: asyncpg.Connection, job: Job | None) -> None:
        nonlocal armed
        if job is None and armed and run_at:
            armed = False
            # Take a moment, inside the claim transaction, past the job's run_at.
            while not await c.fetchval("SELECT clock_timestamp() > $1", run_at[0]):  # noqa: ASYNC110
                await anyio.sleep(0.01)

    probe = ClaimProbe(after=slow)

    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect()},
        queues=[Q],
        concurrency=4,
        poll_interval=HOUR,
        claim=probe,
    )
    async with running(worker):
        await wait_idle(probe, conn)
        armed = True
        run_at[0] = await _enqueue_delayed(conn, 0, 0.3)  # its NOTIFY starts the slow claim
        await poll(lambda: _count_is(conn, 0), timeout=8)
    # Run within the deadline although the worker polls once an hour: it did not sleep a poll.
    late = await _lateness(conn, run_at)
    assert late[0] >= 0, f"the job ran {-late[0]:.3f} s before its run_at"


# -- NOTIFY --------------------------------------------------------------------------------


async def test_an_idle_worker_picks_a_new_job_up_on_notify_not_on_poll(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The worker polls once an hour: only the NOTIFY of the enqueuing transaction can
    explain each pick-up within the deadline."""
    picked: list[int] = []

    async def record(job: Job) -> None:
        picked.append(job.id)

    probe = ClaimProbe()
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect(then=record)},
        queues=[Q],
        concurrency=4,
        poll_interval=HOUR,
        claim=probe,
    )
    async with running(worker):
        for item in range(3):
            await wait_idle(probe, conn)
            tx = conn.transaction()
            await tx.start()
            await JOBS.enqueue(conn, Q, "t", {"item": item})
            await tx.commit()
            await poll(lambda: _count_is(conn, 0), timeout=10, interval=0.005)
            await poll(lambda n=item: _effects_at_least(conn, n + 1), timeout=2)
    assert len(picked) == 3


async def _effects_at_least(conn: asyncpg.Connection, n: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM effects") >= n


async def test_one_notification_per_enqueuing_transaction(
    db: Any, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    received: list[str] = []
    listener = await asyncpg.connect(db.dsn)
    # An idle worker (of another queue, so the jobs stay put) is what notifications are for.
    probe = ClaimProbe()
    idle = Worker(pool, QUERIES, {}, queues=["elsewhere"], poll_interval=5.0, claim=probe)
    try:
        async with running(idle):
            await wait_idle(probe, conn)
            await listener.add_listener("durable_jobs", lambda *a: received.append(a[3]))

            async def flush(marker: str) -> list[str]:
                """NOTIFY a marker and wait for it: earlier commits' notifications came first."""
                await conn.execute("SELECT pg_notify('durable_jobs', $1)", marker)
                await poll(lambda: _contains(received, marker), timeout=5, interval=0.005)
                got = received[: received.index(marker)]
                del received[: received.index(marker) + 1]
                return got

            # 100 jobs, each its own INSERT statement, in one transaction.
            async with conn.transaction():
                for i in range(100):
                    await JOBS.enqueue(conn, Q, "t", {"item": i})
            assert await flush("m1") == [""]

            # 100 jobs through executemany (one prepared INSERT run 100 times), one transaction.
            async with conn.transaction():
                await conn.executemany(
                    QUERIES["enqueue_job"],
                    [(Q, "t", None, json.dumps({"item": i}), 0, 0.0) for i in range(100)],
                )
            assert await flush("m2") == [""]

            # Two transactions notify twice; a rolled-back one not at all.
            for _ in range(2):
                async with conn.transaction():
                    await JOBS.enqueue(conn, Q, "t", {"item": 0})
            tx = conn.transaction()
            await tx.start()
            await JOBS.enqueue(conn, Q, "t", {"item": 0})
            await tx.rollback()
            assert await flush("m3") == ["", ""]
        assert await JOBS.count(conn) == 202
    finally:
        await listener.close()


async def _contains(items: list[str], item: str) -> bool:
    return item in items


# -- graceful shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_stop_lets_the_inflight_job_finish_and_claims_nothing_new(
    pool: asyncpg.Pool, conn: asyncpg.Connection, concurrency: int
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def wait_for_release(job: Job) -> None:
        started.set()
        await release.wait()

    first = await enqueue(conn, {"item": 1})
    probe = ClaimProbe()
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect(then=wait_for_release)},
        queues=[Q],
        concurrency=concurrency,
        poll_interval=5.0,
        grace_period=30.0,
        claim=probe,
    )
    async with running(worker) as returned:
        with anyio.fail_after(5):
            await started.wait()
        if concurrency > 1:  # let the free slots' claims finish, so the worker is idle
            await wait_idle(probe, conn)
        worker.stop()
        second = await enqueue(conn, {"item": 2})
        assert not returned.is_set(), "run() returned while a job was in flight"
        # No need to watch run() for a while: it cannot return while the slot runs (a task
        # group), so it either waits for this release or cancels the job, which would roll
        # its effect back and leave the job queued (both checked below, once run() is done).
        release.set()
        with anyio.fail_after(5):
            await returned.wait()
    assert await conn.fetchval("SELECT count(*) FROM durable.jobs WHERE id = $1", first) == 0
    assert await effects(conn) == [1]
    # Enqueued after stop(): not claimed, still there, untouched.
    assert await conn.fetchval("SELECT attempts FROM durable.jobs WHERE id = $1", second) == 0


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_stop_releases_a_job_that_outlives_the_grace_period(
    pool: asyncpg.Pool, conn: asyncpg.Connection, concurrency: int
) -> None:
    started = asyncio.Event()

    async def hang(job: Job) -> None:
        started.set()
        await anyio.sleep_forever()

    grace = 0.5
    job_id = await enqueue(conn, {"item": 1})
    worker = Worker(
        pool,
        QUERIES,
        {"t": insert_effect(then=hang)},
        queues=[Q],
        concurrency=concurrency,
        poll_interval=5.0,
        grace_period=grace,
    )
    async with running(worker, stop_within=grace + 4) as returned:
        with anyio.fail_after(5):
            await started.wait()
        worker.stop()
        stopped = time.monotonic()
        with anyio.fail_after(grace + 10):
            await returned.wait()
        # It gave the job its grace period before releasing it.
        assert time.monotonic() - stopped >= grace - 0.05

    # The job is back in the queue, claimable at once by anyone, and its effect rolled back.
    async def claimable() -> bool:
        async with conn.transaction():
            job = await JOBS.claim(conn, [Q])
            return job is not None and job.id == job_id

    await poll(claimable, timeout=2)
    assert await effects(conn) == []


# -- reconnecting --------------------------------------------------------------------------


TERMINATE_OTHERS = (
    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()) t"
)


async def test_worker_survives_its_connections_being_terminated(
    db: Any, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    admin = await asyncpg.connect(db.dsn)
    try:
        await enqueue(conn, {"item": 0})
        probe = ClaimProbe()
        worker = Worker(
            pool,
            QUERIES,
            {"t": insert_effect()},
            queues=[Q],
            concurrency=4,
            poll_interval=HOUR,
            claim=probe,
        )
        async with running(worker) as returned:

            async def drained() -> bool:
                return await admin.fetchval("SELECT count(*) FROM durable.jobs") == 0

            await poll(drained, timeout=5)
            await poll(lambda: listening(admin), timeout=10)
            killed = await admin.fetchval(TERMINATE_OTHERS)
            assert killed >= 2  # at least the listener's and the test's own pooled connection

            async with admin.transaction():
                for i in range(1, 21):
                    await JOBS.enqueue(admin, Q, "t", {"item": i})
            await poll(drained, timeout=20, interval=0.05)
            assert not returned.is_set(), "worker.run() ended after losing its connections"

            # The listener is back: a new job is picked up on NOTIFY (the next poll is an
            # hour away).
            await wait_idle(probe, admin)
            async with admin.transaction():
                await JOBS.enqueue(admin, Q, "t", {"item": 21})
            await poll(drained, timeout=10, interval=0.005)
        items = [r[0] for r in await admin.fetch("SELECT item FROM effects ORDER BY item")]
        assert items == list(range(22))
    finally:
        await admin.close()


async def test_after_its_listener_reconnects_the_worker_asks_for_notifications_again(
    db: Any, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """What a failover leaves behind: the LISTEN connection gone, and the worker's row in the
    unlogged `listeners` table too (a promoted standby starts with it empty). Once the
    listener is back the worker registers again at once, not at its next tick (an hour
    here), so a new job's NOTIFY reaches it."""
    admin = await asyncpg.connect(db.dsn)
    try:
        probe = ClaimProbe()
        worker = Worker(
            pool,
            QUERIES,
            {"t": insert_effect()},
            queues=[Q],
            concurrency=2,
            poll_interval=3600.0,
            claim=probe,
        )
        async with running(worker):
            await wait_idle(probe, admin)
            await admin.execute("DELETE FROM durable.listeners")
            killed = await admin.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query ILIKE 'LISTEN%') t"
            )
            assert killed == 1
            await poll(lambda: listening(admin), timeout=5)
            await wait_idle(probe, admin)
            async with admin.transaction():
                await JOBS.enqueue(admin, Q, "t", {"item": 1})
            committed = time.monotonic()

            async def drained() -> bool:
                return await admin.fetchval("SELECT count(*) FROM durable.jobs") == 0

            await poll(drained, timeout=5, interval=0.005)
            assert time.monotonic() - committed < 1.0
    finally:
        await admin.close()


async def test_a_job_whose_connection_is_terminated_mid_way_runs_again_and_commits_once(
    db: Any, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    runs: list[int] = []
    handler_conns: list[asyncpg.Connection] = []

    async def block(job: Job) -> None:
        runs.append(job.id)
        started.set()
        await release.wait()

    async def handler(c: asyncpg.Connection, job: Job) -> None:
        handler_conns.append(c)
        await insert_effect(then=block)(c, job)

    def closed(c: asyncpg.Connection) -> bool:
        try:
            return c.is_closed()
        except asyncpg.InterfaceError:  # a pooled connection detached once it died
            return True

    admin = await asyncpg.connect(db.dsn)
    try:
        await enqueue(conn, {"item": 1})
        worker = Worker(pool, QUERIES, {"t": handler}, queues=[Q], concurrency=4, poll_interval=0.5)
        async with running(worker) as returned:
            with anyio.fail_after(5):
                await started.wait()
            assert await admin.fetchval(TERMINATE_OTHERS) >= 1
            # The handler is busy elsewhere (say, an HTTP call) while its connection dies;
            # once the client has noticed, the handler goes on and its next query fails.
            await poll(lambda: _true(closed(handler_conns[0])), timeout=5)
            release.set()

            async def drained() -> bool:
                return await admin.fetchval("SELECT count(*) FROM durable.jobs") == 0

            await poll(drained, timeout=10, interval=0.05)
            assert not returned.is_set(), "worker.run() ended after losing a job's connection"
        assert len(runs) >= 2
        assert [r[0] for r in await admin.fetch("SELECT item FROM effects")] == [1]
    finally:
        await admin.close()


# -- the 10,000-job drain with real processes ----------------------------------------------


def spawn_worker(dsn: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER_PROC), dsn, *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    async def exited() -> bool:
        return proc.poll() is not None

    await poll(exited, timeout=timeout, interval=0.05)
    return proc.returncode


def assert_running(procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs, strict=True):
        if proc.poll() is not None:
            raise AssertionError(
                f"worker {proc.pid} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            )


@pytest.mark.timeout(300)
async def test_four_worker_processes_drain_10000_jobs_exactly_once(db: Any, tmp_path: Path) -> None:
    n = 10_000
    conn = await asyncpg.connect(db.dsn)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"worker{i}.log" for i in range(4)]
    try:
        await conn.execute(
            "CREATE TABLE effects (item int NOT NULL, job_id bigint NOT NULL, pid int NOT NULL)"
        )
        ready = [tmp_path / f"ready{i}" for i in range(4)]
        for i in range(4):
            procs.append(
                spawn_worker(
                    db.dsn,
                    logs[i],
                    "--queue",
                    "drain",
                    "--concurrency",
                    "8",
                    "--poll-interval",
                    "1.0",
                    "--ready-file",
                    str(ready[i]),
                )
            )

        async def all_ready() -> bool:
            assert_running(procs, logs)
            return all(p.exists() for p in ready)

        await poll(all_ready, timeout=30, interval=0.05)

        async with conn.transaction():
            await conn.executemany(
                QUERIES["enqueue_job"],
                [("drain", "insert", None, json.dumps({"item": i}), 0, 0.0) for i in range(n)],
            )

        async def drained() -> bool:
            assert_running(procs, logs)
            return await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0

        await poll(drained, timeout=240, interval=0.2)

        row = await conn.fetchrow(
            "SELECT count(*) AS total, count(DISTINCT item) AS items,"
            " count(DISTINCT job_id) AS jobs, min(item) AS lo, max(item) AS hi,"
            " count(DISTINCT pid) AS pids FROM effects"
        )
        assert row["total"] == n
        assert row["items"] == n
        assert row["jobs"] == n
        assert (row["lo"], row["hi"]) == (0, n - 1)
        assert row["pids"] == 4, "every worker process should have taken part"
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0

        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs, strict=True):
            code = await wait_exit(proc, 20)
            assert code == 0, f"worker {proc.pid} exited {code}:\n{log.read_text()[-4000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await conn.close()
