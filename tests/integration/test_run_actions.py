"""Operator actions: pause_run / resume_run, fork, and bulk cancel / retry by filter."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import durable
from tests.integration.helpers import eventually, fetchval, open_engine, running_engine


def order() -> durable.Workflow:
    """reserve -> charge (fails when the input says so) -> approval signal -> ship."""
    wf = durable.Workflow("order")

    @wf.step
    async def reserve(ctx: durable.Context) -> str:
        return f"reserved {ctx.input.get('sku')}"

    @wf.step(max_attempts=1)
    async def charge(ctx: durable.Context) -> int:
        if ctx.input.get("card") == "bad":
            raise durable.NonRetryable("card declined")
        return 42

    wf.wait_for_signal("approval", "approved")

    @wf.step
    async def ship(ctx: durable.Context) -> str:
        return f"shipped after {ctx.results['charge']}"

    return wf


async def jobs_of(engine: durable.Engine, run_id: str) -> int:
    return int(
        await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE run_id = $1", run_id)
    )


async def until(engine: durable.Engine, run_id: str, status: durable.RunStatus) -> durable.Run:
    async def reached() -> durable.Run | None:
        run = await engine.get_run(run_id)
        return run if run.status is status else None

    run: durable.Run = await eventually(reached, timeout=10)
    return run


# -- pause and resume ----------------------------------------------------------------------


async def test_a_paused_pending_run_is_not_claimed_until_resumed(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        async with engine.pool.acquire() as conn, conn.transaction():
            # started and paused before any worker can see it
            run_id = await engine.start("order", {"sku": "A1"}, conn=conn)
        assert await engine.pause_run(run_id) in (True, False)
        run = await engine.get_run(run_id)
        if run.status is durable.RunStatus.PENDING:
            assert run.paused
            await anyio.sleep(0.3)
            assert (await engine.get_run(run_id)).status is durable.RunStatus.PENDING
            assert await jobs_of(engine, run_id) == 0
        assert await engine.resume_run(run_id) is run.paused
        await until(engine, run_id, durable.RunStatus.WAITING)


async def test_a_paused_waiting_run_keeps_signals_and_goes_on_when_resumed(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        await until(engine, run_id, durable.RunStatus.WAITING)
        assert await engine.pause_run(run_id) is True
        assert await engine.pause_run(run_id) is False  # already paused
        assert await engine.signal(run_id, "approved", {"by": "ann"}) is True
        await anyio.sleep(0.3)
        run = await engine.get_run(run_id)
        assert run.status is durable.RunStatus.WAITING
        assert run.paused
        assert await jobs_of(engine, run_id) == 0
        assert await engine.resume_run(run_id) is True
        assert await engine.resume_run(run_id) is False
        result = await engine.wait(run_id, timeout=10)
        assert result["ship"] == "shipped after 42"
        assert result["approval"] == {"by": "ann"}
        assert not (await engine.get_run(run_id)).paused


async def test_a_paused_sleep_does_not_wake_until_resumed(db: Any) -> None:
    wf = durable.Workflow("nap")
    wf.sleep("nap", 0.2)

    @wf.step
    async def after(ctx: durable.Context) -> str:
        return "awake"

    async with running_engine(db, wf) as engine:
        run_id = await engine.start("nap")
        await until(engine, run_id, durable.RunStatus.WAITING)
        assert await engine.pause_run(run_id) is True
        await anyio.sleep(0.6)  # the wake time passes while paused
        assert (await engine.get_run(run_id)).status is durable.RunStatus.WAITING
        await engine.resume_run(run_id)
        assert (await engine.wait(run_id, timeout=10))["after"] == "awake"


async def test_a_paused_parent_is_not_woken_by_its_child(db: Any) -> None:
    child = durable.Workflow("child")
    gate = anyio.Event()

    @child.step
    async def work(ctx: durable.Context) -> int:
        await gate.wait()
        return 7

    parent = durable.Workflow("parent")
    parent.child_workflow("kid", lambda ctx: ("child", {}))

    @parent.step
    async def done(ctx: durable.Context) -> int:
        return int(ctx.results["kid"]["work"]) + 1

    async with running_engine(db, parent, child) as engine:
        run_id = await engine.start("parent")
        await until(engine, run_id, durable.RunStatus.WAITING)
        assert await engine.pause_run(run_id) is True
        gate.set()
        kid = (await engine.get_run(run_id)).children[0]
        await until(engine, kid, durable.RunStatus.COMPLETED)
        await anyio.sleep(0.3)
        assert (await engine.get_run(run_id)).status is durable.RunStatus.WAITING
        assert await jobs_of(engine, run_id) == 0
        await engine.resume_run(run_id)
        assert (await engine.wait(run_id, timeout=10))["done"] == 8


async def test_cancel_of_a_paused_run_compensates_it(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        await until(engine, run_id, durable.RunStatus.WAITING)
        await engine.pause_run(run_id)
        assert await engine.cancel(run_id) is True
        run = await until(engine, run_id, durable.RunStatus.CANCELLED)
        assert not run.paused


async def test_pause_and_resume_refuse_finished_and_unknown_runs(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        run_id = await engine.start("order")
        await engine.cancel(run_id)
        assert await engine.pause_run(run_id) is False
        assert await engine.resume_run(run_id) is False
        with pytest.raises(durable.RunNotFound):
            await engine.pause_run("nope")
        with pytest.raises(durable.RunNotFound):
            await engine.resume_run("nope")


# -- fork ----------------------------------------------------------------------------------


async def test_fork_a_failed_run_from_its_failed_node_with_an_edited_input(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        run_id = await engine.start("order", {"sku": "A1", "card": "bad"})
        await until(engine, run_id, durable.RunStatus.FAILED)
        fork_id = await engine.fork(run_id, input={"sku": "A1", "card": "good"})
        assert fork_id != run_id
        await until(engine, fork_id, durable.RunStatus.WAITING)
        await engine.signal(fork_id, "approved")
        result = await engine.wait(fork_id, timeout=10)
        assert result["reserve"] == "reserved A1"
        assert result["ship"] == "shipped after 42"
        fork = await engine.get_run(fork_id, journal=True)
        assert fork.forked_from == run_id
        assert fork.input == {"sku": "A1", "card": "good"}
        # reserve was replayed from the original's journal, not run again
        reserve = next(e for e in fork.journal if e.key == "reserve")
        original = await engine.get_run(run_id, journal=True)
        assert (
            reserve.finished_at
            == next(e for e in original.journal if e.key == "reserve").finished_at
        )
        assert original.status is durable.RunStatus.FAILED  # left as it was


async def test_fork_from_an_earlier_node_keeps_only_what_came_before(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        await until(engine, run_id, durable.RunStatus.WAITING)
        fork_id = await engine.fork(run_id, from_node="reserve", input={"sku": "B2"})
        await until(engine, fork_id, durable.RunStatus.WAITING)
        fork = await engine.get_run(fork_id)
        assert fork.results["reserve"] == "reserved B2"
        await engine.cancel(run_id)
        await engine.cancel(fork_id)


async def test_fork_refuses_unknown_nodes_unreached_nodes_and_unknown_runs(db: Any) -> None:
    async with open_engine(db, order()) as engine:
        run_id = await engine.start("order")
        with pytest.raises(durable.ArgumentError, match="no node 'nope'"):
            await engine.fork(run_id, from_node="nope")
        with pytest.raises(durable.ArgumentError, match="has not completed node 'reserve'"):
            await engine.fork(run_id, from_node="ship")
        with pytest.raises(durable.RunNotFound):
            await engine.fork("nope")
        with pytest.raises(durable.ArgumentTypeError):
            await engine.fork(run_id, input=[1])  # type: ignore[arg-type]
        await engine.cancel(run_id)
        with pytest.raises(durable.ArgumentError, match="name the node"):
            await engine.fork(run_id)  # cancelled, nothing failed: no default node


# -- bulk ----------------------------------------------------------------------------------


async def test_bulk_cancel_and_retry_by_filter(db: Any) -> None:
    async with running_engine(db, order()) as engine:
        bad = [await engine.start("order", {"card": "bad"}) for _ in range(5)]
        waiting = [await engine.start("order", {"card": "good"}) for _ in range(4)]
        for run_id in bad:
            await until(engine, run_id, durable.RunStatus.FAILED)
        for run_id in waiting:
            await until(engine, run_id, durable.RunStatus.WAITING)
        with pytest.raises(durable.ArgumentError, match="at least one filter"):
            await engine.cancel_runs(durable.RunFilter())
        cancelled = await engine.cancel_runs(
            durable.RunFilter(status="waiting", workflow="order"), reason="bulk", batch_size=3
        )
        assert sorted(cancelled) == sorted(waiting)
        for run_id in waiting:
            run = await until(engine, run_id, durable.RunStatus.CANCELLED)
            assert run.error == "bulk"
        retried = await engine.retry_runs(durable.RunFilter(workflow="order"), batch_size=2)
        assert sorted(retried) == sorted(bad)
        for run_id in bad:  # they fail again: the card is still bad
            await eventually(lambda r=run_id: _failed_twice(engine, r), timeout=10)
        assert await engine.cancel_runs(durable.RunFilter(status="completed")) == []


async def _failed_twice(engine: durable.Engine, run_id: str) -> bool:
    run = await engine.get_run(run_id)
    epoch = await fetchval(engine, "SELECT epoch FROM durable.runs WHERE id = $1", run_id)
    return run.status is durable.RunStatus.FAILED and epoch == 1
