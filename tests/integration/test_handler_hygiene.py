"""What handler code does to the worker and its run (issue 11): an escaped CancelledError,
a kept `ctx.conn`, results changed in place, a handler cancelling its own run, a result
too large for a notification, two workers on one engine, a pool too small, inputs JSON
would change."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import asyncpg
import pytest
from helpers import eventually, fetchval, open_engine, running_engine

import durable


async def test_a_cancelled_error_escaping_a_handler_fails_the_attempt_not_the_worker(
    db: Any,
) -> None:
    """Defect 1: `t.cancel(); await t` inside a handler lets CancelledError escape. It is a
    failed attempt of that step; the worker goes on and runs the next run."""
    wf = durable.Workflow("escapes")

    @wf.step(max_attempts=2, backoff=0)
    async def leaky(ctx: durable.Context) -> None:
        task = asyncio.create_task(asyncio.sleep(10))
        task.cancel()
        await task

    ok = durable.Workflow("after")

    @ok.step
    async def fine(ctx: durable.Context) -> str:
        return "fine"

    async with running_engine(db, wf, ok) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
        assert await engine.wait(await engine.start(ok), timeout=10) == {"fine": "fine"}
        run = await engine.get_run(run_id, journal=True)
    assert "CancelledError" in (failed.value.run.error or "")
    assert [a.attempt for a in run.attempts] == [1, 2]


async def test_a_multibyte_result_under_the_character_cut_off_completes_while_waited_for(
    db: Any,
) -> None:
    """Defect 2: 2,800 Japanese characters are under 7,000 characters but over the 8,000
    bytes a notification holds. The run completes and `wait()` returns the result."""
    text = "日本語のテキスト" * 350
    wf = durable.Workflow("kanji")

    @wf.step
    async def big(ctx: durable.Context) -> str:
        return text

    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        results: list[Any] = []
        got = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                results.append(await engine.wait(run_id, timeout=10))
                got.set()

            tg.start_soon(waiter)

            async def watched() -> bool:
                return bool(
                    await fetchval(engine, "SELECT watched FROM durable.runs WHERE id = $1", run_id)
                )

            await eventually(watched)  # someone is in wait() before the run even starts
            async with engine.worker(concurrency=2, poll_interval=0.05):
                with anyio.fail_after(10):
                    await got.wait()
        assert results == [{"big": text}]


async def test_stopping_one_of_two_workers_on_one_engine_leaves_the_other_working(
    db: Any,
) -> None:
    """Defect 3: two workers on one engine; stopping the second must not close what the
    first uses: its `transactional=False` steps still complete."""
    release = anyio.Event()
    wf = durable.Workflow("outside")

    @wf.step(transactional=False)
    async def call_out(ctx: durable.Context) -> str:
        await release.wait()
        return "called"

    async with (
        open_engine(db, wf, lease_seconds=2) as engine,
        engine.worker(concurrency=2, poll_interval=0.05),
    ):
        async with engine.worker(concurrency=2, poll_interval=0.05):
            pass  # the second worker starts and stops
        run_id = await engine.start(wf)

        async def leased() -> bool:
            n = await fetchval(
                engine, "SELECT count(*) FROM durable.jobs WHERE lease_token IS NOT NULL"
            )
            return bool(n)

        await eventually(leased)
        release.set()
        assert await engine.wait(run_id, timeout=10) == {"call_out": "called"}
        run = await engine.get_run(run_id, journal=True)
    assert run.attempts == ()


@pytest.mark.parametrize(("size", "concurrency"), [(4, 4), (10, 16), (6, 4)])
async def test_a_pool_too_small_for_the_worker_is_refused_with_the_size_it_needs(
    db: Any, size: int, concurrency: int
) -> None:
    """Defect 4: `Engine(pool=...)` with a pool smaller than the worker needs refuses to
    start the worker, naming the size, instead of deadlocking."""
    wf = durable.Workflow("small")

    @wf.step
    async def one(ctx: durable.Context) -> int:
        return 1

    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=size)
    assert pool is not None
    try:
        engine = durable.Engine(pool=pool, workflows=[wf])
        async with engine:
            with pytest.raises(durable.ConfigurationError, match=f"needs {concurrency + 4}"):
                async with engine.worker(concurrency=concurrency):
                    pass
    finally:
        await pool.close()


async def test_a_pool_big_enough_runs_start_then_wait(db: Any) -> None:
    """The size the error names is enough: start, then wait, on the engine's own pool."""
    wf = durable.Workflow("sized")

    @wf.step
    async def one(ctx: durable.Context) -> int:
        return 1

    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=8)
    assert pool is not None
    try:
        async with (
            durable.Engine(pool=pool, workflows=[wf]) as engine,
            engine.worker(concurrency=4, poll_interval=0.05),
        ):
            assert await engine.wait(await engine.start(wf), timeout=10) == {"one": 1}
    finally:
        await pool.close()


async def test_a_kept_ctx_conn_raises_after_its_attempt(db: Any) -> None:
    """Defect 5: a handler that keeps `ctx.conn` and uses it after returning gets an error,
    and its write does not commit inside another step's transaction."""
    kept: list[Any] = []
    errors: list[str] = []
    wf = durable.Workflow("keeper")

    @wf.step
    async def keep(ctx: durable.Context) -> None:
        kept.append(ctx.conn)

    @wf.step
    async def later(ctx: durable.Context) -> None:
        try:
            await kept[0].execute("INSERT INTO sneaky VALUES (1)")
        except asyncpg.InterfaceError as exc:
            errors.append(str(exc))

    async with running_engine(db, wf, setup="CREATE TABLE sneaky (x int)") as engine:
        await engine.wait(await engine.start(wf), timeout=10)
        assert await fetchval(engine, "SELECT count(*) FROM sneaky") == 0
    assert errors
    assert "only valid during the attempt" in errors[0]


async def test_changing_ctx_results_in_place_changes_nothing_later_nodes_see(db: Any) -> None:
    """Defect 6: a handler that changes a result it read in place does not change what
    later nodes see, nor the run's result."""
    seen: list[Any] = []
    wf = durable.Workflow("mutator")

    @wf.step
    async def a(ctx: durable.Context) -> dict[str, Any]:
        return {"items": [1, 2]}

    @wf.step
    async def b(ctx: durable.Context) -> None:
        ctx.results["a"]["items"].append(3)
        ctx.results["a"]["extra"] = True

    @wf.step
    async def c(ctx: durable.Context) -> None:
        seen.append(ctx.results["a"])

    async with running_engine(db, wf) as engine:
        result = await engine.wait(await engine.start(wf), timeout=10)
    assert seen == [{"items": [1, 2]}]
    assert result["a"] == {"items": [1, 2]}


async def test_a_handler_cancelling_its_own_run_ends_it_cancelled(db: Any) -> None:
    """Defect 7: a step that calls `engine.cancel()` on its own run does not block on its
    own lock: the cancel takes effect when the node commits, and the run ends `cancelled`
    with its completed steps compensated."""
    undone: list[str] = []
    holder: dict[str, durable.Engine] = {}
    wf = durable.Workflow("self_cancel")

    async def undo(ctx: durable.Context) -> None:
        undone.append(ctx.node)

    @wf.step(compensate=undo)
    async def first(ctx: durable.Context) -> str:
        return "done"

    @wf.step(compensate=undo)
    async def quit(ctx: durable.Context) -> str:
        assert await holder["engine"].cancel(ctx.run_id, reason="changed my mind") is True
        return "quit"

    @wf.step
    async def never(ctx: durable.Context) -> None:
        raise AssertionError("ran after the cancel")

    async with running_engine(db, wf, transaction_timeout=5) as engine:
        holder["engine"] = engine
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunCancelled) as info:
            await engine.wait(run_id, timeout=10)
    assert info.value.run.error == "changed my mind"
    assert undone == ["quit@compensate", "first@compensate"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({1: "a", "1": "b"}, id="keys-that-collide"),
        pytest.param({"text": "lone \ud800 surrogate"}, id="lone-surrogate"),
    ],
)
async def test_inputs_json_would_change_are_refused_before_any_write(db: Any, bad: Any) -> None:
    """Defect 8: `{1: "a", "1": "b"}` would be stored as `{"1": "b"}`; a lone surrogate
    cannot be stored at all. Both are a `SerializationError`, with nothing written."""
    wf = durable.Workflow("picky")

    @wf.step
    async def one(ctx: durable.Context) -> int:
        return 1

    async with open_engine(db, wf) as engine:
        with pytest.raises(durable.SerializationError):
            await engine.start(wf, bad)
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 0


async def test_an_illegal_status_change_by_the_runtime_is_an_illegal_transition(db: Any) -> None:
    """Item 11: a handler that marks its own run `completed` behind durable's back makes the
    node's commit an illegal change (completed -> running). The database refuses it; the
    worker's failure is an `IllegalTransition` naming the run and both statuses (not
    asyncpg's CheckViolationError), recorded as a failed attempt of the node."""
    wf = durable.Workflow("tamper")

    @wf.step(max_attempts=1)
    async def tamper(ctx: durable.Context) -> int:
        assert ctx.conn is not None
        await ctx.conn.execute(
            "UPDATE durable.runs SET status = 'completed', finished_at = now() WHERE id = $1",
            ctx.run_id,
        )
        return 1

    @wf.step
    async def after(ctx: durable.Context) -> None:
        raise AssertionError("ran after a refused commit")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    error = info.value.run.error or ""
    assert f"IllegalTransition: run {run_id} cannot move from 'completed' to 'running'" in error
    assert "CheckViolation" not in error


async def test_an_illegal_status_change_through_the_engine_raises_illegal_transition(
    db: Any,
) -> None:
    """Item 11: a status change the guard refuses, made on a connection of the engine,
    raises `IllegalTransition` carrying the run id and the statuses; the run is unchanged."""
    wf = durable.Workflow("guarded")

    @wf.step
    async def one(ctx: durable.Context) -> int:
        return 1

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await engine.wait(run_id, timeout=10)
        with pytest.raises(durable.IllegalTransition) as info:
            async with engine._acquire() as conn:  # how every Engine method borrows one
                await conn.execute(
                    "UPDATE durable.runs SET status = 'running' WHERE id = $1", run_id
                )
        assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPLETED
    refused = info.value
    assert isinstance(refused, durable.DurableError)
    assert (refused.run_id, refused.from_status, refused.to_status) == (
        run_id,
        "completed",
        "running",
    )
    assert isinstance(refused.__cause__, asyncpg.CheckViolationError)
