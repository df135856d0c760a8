"""The "drain vs pgqueuer" row: durable's drain of one-step runs against pgqueuer's drain of
no-op jobs, on the same server in the same run, the rounds interleaved (durable, pgqueuer,
durable, ...), each in a fresh database. pgqueuer runs on its defaults (`QueueManager.run()`
as it comes: batches of 10, continuous mode). It is the optional `bench` extra; without it
the row says so and the rest of the run goes on."""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
import asyncpg

from benchmarks import scenarios
from benchmarks.common import Sizes, fresh_database, progress


class Skipped(Exception):
    """Raised when a scenario cannot run here (an optional dependency is missing)."""


async def pgqueuer_drain(dsn: str, n: int, timeout: float) -> float:
    """`n` no-op jobs enqueued before the queue manager starts; jobs/s until the queue
    table is empty (every job acknowledged), polled every 10 ms as the durable drain is."""
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    setup = await asyncpg.connect(dsn)
    worker = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(setup))
        await queries.install()
        for first in range(0, n, 1000):
            size = min(1000, n - first)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        table = queries.qbe.qualified.queue_table
        qm = QueueManager(Queries(AsyncpgDriver(worker)))

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(qm.run)
            with anyio.fail_after(timeout):
                while True:
                    if not await setup.fetchval(f"SELECT count(*) FROM {table}"):
                        break
                    await anyio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            qm.shutdown.set()
    finally:
        await worker.close()
        await setup.close()
    return n / elapsed


async def drain_vs_pgqueuer(dsn: str, sizes: Sizes) -> dict[str, Any]:
    """`repeats` interleaved rounds of the durable drain and the pgqueuer drain of
    `drain_runs` each; the medians and their ratio."""
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        raise Skipped("pgqueuer not installed (pip install 'durable[bench]')") from None
    ours: list[float] = []
    theirs: list[float] = []
    for round_ in range(sizes.repeats):
        async with fresh_database(dsn, "drain_durable") as db:
            ours.append(float((await scenarios.drain(db, sizes))["value"]))
        async with fresh_database(dsn, "drain_pgqueuer") as db:
            theirs.append(await pgqueuer_drain(db, sizes.drain_runs, sizes.scenario_timeout))
        progress(
            f"drain vs pgqueuer, round {round_ + 1}: durable {ours[-1]:,.0f} runs/s, "
            f"pgqueuer {theirs[-1]:,.0f} jobs/s"
        )
    value, base = statistics.median(ours), statistics.median(theirs)
    return {
        "value": value,
        "unit": "runs/s",
        "pgqueuer": base,
        "ratio": value / base,
        "samples": ours,
        "pgqueuer_samples": theirs,
        "jobs": sizes.drain_runs,
    }
