"""Starting runs: validation before any write, the caller's transaction, idempotency
(SPEC, Semantics: start)."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest
from helpers import counts, fetch, open_engine, running_engine

import durable


def one_step(name: str = "order", calls: list[Any] | None = None) -> durable.Workflow:
    wf = durable.Workflow(name)

    async def work(ctx: durable.Context) -> Any:
        if calls is not None:
            calls.append(ctx.input)
        return ctx.input

    wf.step("work", work)
    return wf


async def test_start_creates_a_pending_run_and_its_first_job(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        run = await engine.get_run(run_id)
        jobs = await fetch(
            engine, "SELECT queue, task, run_id, payload::text AS payload FROM durable.jobs"
        )

    assert isinstance(run_id, str)
    assert len(run_id) == 26
    assert run.id == run_id
    assert run.workflow == "order"
    assert run.status is durable.RunStatus.PENDING
    assert run.input == {"sku": "A1"}
    assert run.results == {}
    assert run.result is None
    assert run.error is None
    assert run.current_node == "work"
    assert run.parent_id is None
    assert run.finished_at is None
    # The job says which run and what kind of work; its queue names the workflow's shape.
    assert [(j["queue"], j["task"], j["run_id"]) for j in jobs] == [(wf.queue, "advance", run_id)]
    assert wf.queue.startswith("order@")


async def test_start_accepts_the_workflow_object_and_no_input(db: Any) -> None:
    wf = one_step()
    async with running_engine(db, wf) as engine:
        by_object = await engine.start(wf, {"n": 1})
        by_name = await engine.start("order", {"n": 2})
        no_input = await engine.start(wf)
        assert await engine.wait(by_object, timeout=10) == {"work": {"n": 1}}
        assert await engine.wait(by_name, timeout=10) == {"work": {"n": 2}}
        assert await engine.wait(no_input, timeout=10) == {"work": {}}
    assert len({by_object, by_name, no_input}) == 3


async def test_unknown_workflow_raises_and_writes_nothing(db: Any) -> None:
    async with open_engine(db, one_step()) as engine:
        with pytest.raises(durable.WorkflowNotFound, match="nope"):
            await engine.start("nope", {"x": 1})
        with pytest.raises(durable.WorkflowNotFound):
            await engine.start(one_step("not_registered"), {"x": 1})
        assert await counts(engine) == (0, 0)


NON_JSON_INPUTS: dict[str, Any] = {
    "set": {"tags": {"a", "b"}},
    "object": {"obj": object()},
    "nan": {"price": float("nan")},
    "inf": {"price": float("inf")},
    "nested-set": {"deep": [{"x": {1, 2}}]},
    "bytes": {"raw": b"bytes"},
    "nul": {"text": "nul\x00char"},
    "tuple-key": {(1, 2): "tuple key"},
}


async def test_non_json_input_raises_and_writes_nothing(db: Any) -> None:
    async with open_engine(db, one_step()) as engine:
        for case, bad in NON_JSON_INPUTS.items():
            for key in (None, "k"):
                try:
                    await engine.start("order", bad, idempotency_key=key)
                except durable.SerializationError:
                    continue
                pytest.fail(f"non-JSON input accepted: {case} (idempotency_key={key!r})")
        assert await counts(engine) == (0, 0)


async def test_input_that_is_not_a_mapping_is_refused_and_writes_nothing(db: Any) -> None:
    async with open_engine(db, one_step()) as engine:
        for bad in ({1, 2}, [1, 2], "text", 3):
            with pytest.raises((durable.SerializationError, TypeError)):
                await engine.start("order", bad)  # type: ignore[arg-type]
        assert await counts(engine) == (0, 0)


async def test_validation_happens_before_the_callers_transaction_is_touched(db: Any) -> None:
    async with open_engine(db, one_step()) as engine:
        async with engine.pool.acquire() as conn, conn.transaction():
            await conn.execute("CREATE TABLE marker (x int)")
            with pytest.raises(durable.SerializationError):
                await engine.start("order", {"s": {1}}, conn=conn)
            with pytest.raises(durable.WorkflowNotFound):
                await engine.start("nope", {}, conn=conn)
            # The caller's transaction is still usable.
            await conn.execute("INSERT INTO marker VALUES (1)")
        assert await counts(engine) == (0, 0)


async def test_rolled_back_caller_transaction_leaves_no_run_and_no_job(db: Any) -> None:
    calls: list[Any] = []
    wf = one_step(calls=calls)
    async with running_engine(db, wf) as engine:
        async with engine.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            run_id = await engine.start(wf, {"n": 1}, conn=conn)
            # Visible inside the caller's transaction...
            assert await conn.fetchval("SELECT count(*) FROM durable.runs") == 1
            assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 1
            await tx.rollback()
        assert await counts(engine) == (0, 0)
        with pytest.raises(durable.RunNotFound):
            await engine.get_run(run_id)
        # A later run goes through, and the rolled-back one never ran.
        later = await engine.start(wf, {"n": 2})
        await engine.wait(later, timeout=10)
    assert calls == [{"n": 2}]


async def test_committed_caller_transaction_creates_run_and_job(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf) as engine:
        async with engine.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("CREATE TABLE orders (id int)")
                await conn.execute("INSERT INTO orders VALUES (1)")
                run_id = await engine.start(wf, {"order": 1}, conn=conn)
                # Not visible to anyone else before the caller commits.
                assert await counts(engine) == (0, 0)
            assert await counts(engine) == (1, 1)
        run = await engine.get_run(run_id)
        assert run.status is durable.RunStatus.PENDING
    async with running_engine(db, wf) as engine:
        assert await engine.wait(run_id, timeout=10) == {"work": {"order": 1}}


async def test_start_with_a_plain_connection_outside_a_transaction(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf) as engine:
        conn = await asyncpg.connect(db.dsn)
        try:
            run_id = await engine.start(wf, {"n": 1}, conn=conn)
        finally:
            await conn.close()
        assert (await engine.get_run(run_id)).status is durable.RunStatus.PENDING
        assert await counts(engine) == (1, 1)


async def test_idempotency_key_returns_the_same_run(db: Any) -> None:
    calls: list[Any] = []
    wf = one_step(calls=calls)
    async with running_engine(db, wf) as engine:
        first = await engine.start(wf, {"n": 1}, idempotency_key="req-42")
        again = await engine.start("order", {"n": 1}, idempotency_key="req-42")
        other = await engine.start(wf, {"n": 3}, idempotency_key="req-43")
        plain = await engine.start(wf, {"n": 4})
        assert first == again
        assert len({first, other, plain}) == 3
        assert await engine.wait(first, timeout=10) == {"work": {"n": 1}}
        await engine.wait(other, timeout=10)
        await engine.wait(plain, timeout=10)
        # Also after the run finished.
        assert await engine.start(wf, {"n": 1}, idempotency_key="req-42") == first
        runs, jobs = await counts(engine)
    assert runs == 3
    assert jobs == 0
    assert sorted(c["n"] for c in calls) == [1, 3, 4]


async def test_same_idempotency_key_from_ten_concurrent_tasks_makes_one_run(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf, pool_size=12) as engine:
        ids: list[str] = []

        async def start(i: int) -> None:
            ids.append(await engine.start(wf, {"same": True}, idempotency_key="same"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(start, i)
        assert len(ids) == 10
        assert len(set(ids)) == 1
        assert await counts(engine) == (1, 1)


async def test_concurrent_idempotent_starts_in_callers_transactions(db: Any) -> None:
    wf = one_step()
    async with open_engine(db, wf, pool_size=12) as engine:
        ids: list[str] = []

        async def start(i: int) -> None:
            async with engine.pool.acquire() as conn, conn.transaction():
                ids.append(
                    await engine.start(wf, {"same": True}, idempotency_key="tx-key", conn=conn)
                )

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(start, i)
        assert len(set(ids)) == 1
        assert all(ids)
        assert await counts(engine) == (1, 1)


async def test_bad_idempotency_key_is_refused_and_writes_nothing(db: Any) -> None:
    async with open_engine(db, one_step()) as engine:
        for key in ("", 42):
            with pytest.raises((ValueError, TypeError, durable.DurableError)):
                await engine.start("order", {}, idempotency_key=key)  # type: ignore[arg-type]
        assert await counts(engine) == (0, 0)


async def test_engine_with_an_existing_pool(db: Any, pool: asyncpg.Pool) -> None:
    wf = one_step()
    engine = durable.Engine(pool=pool, workflows=[wf])
    async with engine:
        assert engine.pool is pool
        async with engine.worker(concurrency=2, poll_interval=0.05, grace_period=2):
            run_id = await engine.start(wf, {"via": "pool"})
            assert await engine.wait(run_id, timeout=10) == {"work": {"via": "pool"}}
    # The engine did not close a pool it does not own.
    assert await pool.fetchval("SELECT 1") == 1
