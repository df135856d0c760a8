"""Batched claims and group commit (durable.worker, claim_batch_v1): a slot that finds a
deep queue runs several runs' steps in one transaction, each under its own savepoint."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

import durable
from durable.batch import BatchSizer
from durable.sql import Queries

Q = Queries("durable")


async def effect(ctx: durable.Context) -> int:
    await ctx.conn.execute(
        "INSERT INTO effects (run_id, node) VALUES ($1, $2)", ctx.run_id, ctx.node
    )
    return ctx.input["n"]


async def flaky(ctx: durable.Context) -> int:
    """Writes, then fails for odd inputs: the write must roll back with the attempt only."""
    await ctx.conn.execute(
        "INSERT INTO effects (run_id, node) VALUES ($1, $2)", ctx.run_id, ctx.node
    )
    if ctx.input["n"] % 2:
        raise durable.NonRetryable("odd")
    return ctx.input["n"]


async def hot(ctx: durable.Context) -> None:
    await ctx.conn.execute("UPDATE rows SET hits = hits + 1 WHERE id = $1", ctx.input["n"])


ONE = durable.Workflow("one_effect").step("only", effect)
TWO = durable.Workflow("two_effects").step("a", effect).step("b", effect)
FLAKY = durable.Workflow("flaky").step("only", flaky)
HOT = durable.Workflow("hot").step("only", hot)


@pytest.fixture
async def tables(db: Any) -> None:
    conn = await asyncpg.connect(db.dsn)
    try:
        await conn.execute(
            "CREATE TABLE effects (run_id text, node text, UNIQUE (run_id, node));"
            "CREATE TABLE rows (id int PRIMARY KEY, hits int NOT NULL DEFAULT 0);"
            "INSERT INTO rows (id) SELECT generate_series(0, 99);"
        )
    finally:
        await conn.close()


async def _wait_finished(engine: durable.Engine, ids: list[str], timeout: float = 60) -> None:
    for run_id in ids:
        with contextlib.suppress(durable.RunFailed):
            await engine.wait(run_id, timeout=timeout)


async def test_a_deep_queue_drains_in_batches_with_every_effect_once(db: Any, tables: None) -> None:
    async with durable.Engine(db.dsn, workflows=[ONE, TWO]) as engine:
        ids = [await engine.start(ONE, {"n": i}) for i in range(200)]
        ids += [await engine.start(TWO, {"n": i}) for i in range(100)]
        async with engine.worker(concurrency=2, batch_size=16, batch_window=0.05) as worker:
            await _wait_finished(engine, ids)
        assert worker.batches > 0
        assert worker.batched >= 2 * worker.batches
        for run_id in ids:
            assert (await engine.get_run(run_id)).status == "completed"
    conn = await asyncpg.connect(db.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM effects") == 400
        assert await conn.fetchval("SELECT count(*) FROM durable.attempts") == 0
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0
    finally:
        await conn.close()


async def test_a_failing_step_in_a_batch_rolls_back_only_its_own_writes(
    db: Any, tables: None
) -> None:
    async with durable.Engine(db.dsn, workflows=[FLAKY]) as engine:
        ids = [await engine.start(FLAKY, {"n": i}) for i in range(120)]
        async with engine.worker(concurrency=1, batch_size=16, batch_window=0.05) as worker:
            await _wait_finished(engine, ids)
        assert worker.batches > 0
        runs = [await engine.get_run(run_id) for run_id in ids]
    assert [r.status for r in runs] == ["failed" if i % 2 else "completed" for i in range(120)]
    conn = await asyncpg.connect(db.dsn)
    try:
        written = {r["run_id"] for r in await conn.fetch("SELECT run_id FROM effects")}
        assert written == {ids[i] for i in range(0, 120, 2)}
        # One failed attempt per odd run, no more (nothing re-ran because of a neighbour).
        assert await conn.fetchval("SELECT count(*) FROM durable.attempts") == 60
    finally:
        await conn.close()


async def test_a_later_job_of_a_batch_that_waits_for_a_lock_goes_back_unrecorded(
    db: Any, tables: None
) -> None:
    holder = await asyncpg.connect(db.dsn)
    try:
        async with durable.Engine(db.dsn, workflows=[HOT]) as engine:
            ids = [await engine.start(HOT, {"n": i}) for i in range(60)]
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM rows WHERE id = 40 FOR UPDATE")
            async with engine.worker(concurrency=1, batch_size=16, batch_window=0.05) as worker:
                await asyncio.sleep(1.0)
                await tx.rollback()
                await _wait_finished(engine, ids)
            assert worker.deferred >= 1
            for run_id in ids:
                assert (await engine.get_run(run_id)).status == "completed"
        assert await holder.fetchval("SELECT count(*) FROM durable.attempts") == 0
        assert await holder.fetchval("SELECT sum(hits) FROM rows") == 60
    finally:
        await holder.close()


async def test_an_idle_worker_claims_one_job_at_a_time(db: Any, tables: None) -> None:
    async with durable.Engine(db.dsn, workflows=[TWO]) as engine:
        async with engine.worker(concurrency=2, batch_size=16) as worker:
            for i in range(5):
                await engine.wait(await engine.start(TWO, {"n": i}), timeout=10)
        assert worker.batches == 0


async def test_batch_claim_takes_different_runs_in_queue_order(db: Any) -> None:
    async with durable.Engine(db.dsn, workflows=[ONE]) as engine:
        ids = [await engine.start(ONE, {"n": i}) for i in range(5)]
        urgent = await engine.start(ONE, {"n": 9}, priority=5)
    conn = await asyncpg.connect(db.dsn)
    try:
        async with conn.transaction():
            rows = await conn.fetch(Q["claim_batch"], [ONE.queue], 4, [])
            assert [r["run_id"] for r in rows] == [urgent, *ids[:3]]
            assert all(r["status"] == "pending" for r in rows)
            other = await asyncpg.connect(db.dsn)
            try:
                async with other.transaction():
                    rest = await other.fetch(Q["claim_batch"], [ONE.queue], 4, [])
                    assert [r["run_id"] for r in rest] == ids[3:]
            finally:
                await other.close()
    finally:
        await conn.close()


def test_the_batch_size_grows_with_full_claims_and_shrinks_with_slow_jobs() -> None:
    sizer = BatchSizer(limit=16, window=0.005)
    assert sizer.size == 1
    sizer.done(1, 1)  # one job found once: an idle worker's claims stay the plain claim
    assert sizer.size == 1
    sizer.done(0, 0)
    sizer.done(1, 1)
    assert sizer.size == 1
    for want in (2, 4, 8, 16, 16):
        sizer.done(sizer.size, sizer.size)
        assert sizer.size == want
    sizer.done(16, 5)  # the window ran out after 5 jobs
    assert sizer.size == 5
    sizer.done(3, 3)  # a shallow queue
    assert sizer.size == 3
    for _ in range(20):
        sizer.observe(0.002)  # 2 ms a job: two fit in the window
    sizer.done(3, 3)
    assert sizer.size == 2
    sizer.done(2, 1, slow=True)
    assert sizer.size == 1
    sizer.done(0, 0)
    assert sizer.size == 1
