"""cancel, retry and purge: every status each one accepts and refuses; structured logs."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import anyio
import pytest

import durable
from tests.integration.helpers import (
    eventually,
    execute,
    fetchval,
    open_engine,
    running_engine,
    until_blocked,
)

# -- a zoo of runs in every status --------------------------------------------------------


def zoo() -> durable.Workflow:
    """`zoo`: behaviour chosen by the input, so one workflow yields every status."""
    wf = durable.Workflow("zoo")

    async def release(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO undone (run_id) VALUES ($1)", ctx.run_id)

    @wf.step(compensate=release)
    async def reserve(ctx: durable.Context) -> str:
        return "reserved"

    @wf.step(max_attempts=1)
    async def decide(ctx: durable.Context) -> str:
        if ctx.input.get("fail"):
            raise durable.NonRetryable("told to fail")
        return "ok"

    wf.wait_for_signal("approval", "approved")
    return wf


SETUP = "CREATE TABLE undone (run_id text NOT NULL)"


async def status(engine: durable.Engine, run_id: str) -> durable.RunStatus:
    return (await engine.get_run(run_id)).status


async def until_status(engine: durable.Engine, run_id: str, wanted: durable.RunStatus) -> None:
    async def reached() -> bool:
        return await status(engine, run_id) is wanted

    await eventually(reached, timeout=10)


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_a_pending_run_ends_it_at_once(db: Any) -> None:
    async with open_engine(db, zoo(), setup=SETUP) as engine:
        run_id = await engine.start("zoo")
        assert await engine.cancel(run_id) is True
        run = await engine.get_run(run_id)
        assert run.status is durable.RunStatus.CANCELLED
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0


async def test_cancel_a_waiting_run_compensates_its_steps(db: Any) -> None:
    wf = zoo()
    async with running_engine(db, wf, setup=SETUP) as engine:
        run_id = await engine.start("zoo")
        await until_status(engine, run_id, durable.RunStatus.WAITING)
        assert await engine.cancel(run_id, reason="customer left") is True
        with pytest.raises(durable.RunCancelled) as info:
            await engine.wait(run_id, timeout=10)
        assert info.value.run.error == "customer left"
        assert await fetchval(engine, "SELECT count(*) FROM undone WHERE run_id = $1", run_id) == 1
        # A signal to the cancelled run is refused.
        assert await engine.signal(run_id, "approved") is False


async def test_cancel_a_running_run_waits_for_the_handler_then_compensates(db: Any) -> None:
    wf = durable.Workflow("slow")
    entered, release = anyio.Event(), anyio.Event()

    async def undo(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO undone (run_id) VALUES ($1)", ctx.run_id)

    @wf.step(compensate=undo)
    async def first(ctx: durable.Context) -> int:
        return 1

    @wf.step
    async def second(ctx: durable.Context) -> int:
        entered.set()
        await release.wait()
        return 2

    wf.step("third", first)
    async with running_engine(db, wf, setup=SETUP) as engine:
        run_id = await engine.start(wf)
        with anyio.fail_after(10):
            await entered.wait()
        # Pending still when `first` runs in the same transaction as `second` (a chain).
        assert await status(engine, run_id) in (
            durable.RunStatus.PENDING,
            durable.RunStatus.RUNNING,
        )
        outcome: list[bool] = []

        async def cancel() -> None:
            outcome.append(await engine.cancel(run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            # The cancel waits in the database for the lock of the node in flight.
            await until_blocked(engine, "cancel_tree_v1")
            assert outcome == []
            release.set()
        assert outcome == [True]
        with pytest.raises(durable.RunCancelled):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        keys = [(e.key, e.status) for e in run.journal]
        assert ("second", "completed") in keys  # the handler in flight finished and committed
        assert ("third", "completed") not in keys  # nothing ran after the cancel
        assert await fetchval(engine, "SELECT count(*) FROM undone") == 1


@pytest.mark.parametrize("final", ["completed", "failed", "cancelled"])
async def test_cancel_refuses_a_finished_run(db: Any, final: str) -> None:
    async with running_engine(db, zoo(), setup=SETUP) as engine:
        run_id = await engine.start("zoo", {"fail": final == "failed"})
        if final == "completed":
            await until_status(engine, run_id, durable.RunStatus.WAITING)
            await engine.signal(run_id, "approved")
        elif final == "cancelled":
            await engine.cancel(run_id)
        await until_status(engine, run_id, durable.RunStatus(final))
        assert await engine.cancel(run_id) is False
        assert await status(engine, run_id) is durable.RunStatus(final)


async def test_cancel_refuses_a_compensating_run(db: Any) -> None:
    async with open_engine(db, zoo(), setup=SETUP) as engine:
        run_id = await engine.start("zoo")
        await execute(
            engine,
            "UPDATE durable.runs SET status = 'compensating' WHERE id = $1",
            run_id,
        )
        assert await engine.cancel(run_id) is False
        assert await status(engine, run_id) is durable.RunStatus.COMPENSATING


async def test_cancel_an_unknown_run_raises(db: Any) -> None:
    async with open_engine(db, zoo(), setup=SETUP) as engine:
        with pytest.raises(durable.RunNotFound, match="no run with id 'nope'"):
            await engine.cancel("nope")


# -- retry ---------------------------------------------------------------------------------


async def test_retry_resumes_a_failed_run_at_its_failed_node(db: Any) -> None:
    wf = durable.Workflow("flaky")
    calls: list[str] = []
    broken = {"yes": True}

    @wf.step
    async def one(ctx: durable.Context) -> int:
        calls.append("one")
        return 1

    @wf.step(max_attempts=2, backoff=0)
    async def two(ctx: durable.Context) -> int:
        calls.append(f"two#{ctx.attempt}")
        if broken["yes"]:
            raise RuntimeError("dependency down")
        return 2

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        broken["yes"] = False
        assert await engine.retry(run_id) is True
        assert await engine.wait(run_id, timeout=10) == {"one": 1, "two": 2}
        run = await engine.get_run(run_id, journal=True)
    # A fresh attempt budget; the completed node did not run again.
    assert calls == ["one", "two#1", "two#2", "two#1"]
    assert run.error is None
    assert [(a.key, a.attempt) for a in run.attempts] == [("two", 1), ("two", 2)]


@pytest.mark.parametrize("state", ["pending", "waiting", "completed", "cancelled", "compensating"])
async def test_retry_refuses_runs_that_have_not_failed(db: Any, state: str) -> None:
    async with running_engine(db, zoo(), setup=SETUP) as engine:
        if state == "pending":
            async with open_engine(db, zoo()) as idle:  # no worker of its own
                run_id = await idle.start("zoo", idempotency_key="p")
            await execute(engine, "DELETE FROM durable.jobs WHERE run_id = $1", run_id)
        else:
            run_id = await engine.start("zoo")
            await until_status(engine, run_id, durable.RunStatus.WAITING)
            if state == "completed":
                await engine.signal(run_id, "approved")
            elif state == "cancelled":
                await engine.cancel(run_id)
            elif state == "compensating":
                await execute(
                    engine,
                    "UPDATE durable.runs SET status = 'compensating' WHERE id = $1",
                    run_id,
                )
            if state in ("completed", "cancelled"):
                await until_status(engine, run_id, durable.RunStatus(state))
        before = await status(engine, run_id)
        assert await engine.retry(run_id) is False
        assert await status(engine, run_id) is before
        # The states made by hand above lack their jobs: give them back (the invariant).
        await execute(engine, "SELECT durable.ensure_jobs_v1($1)", run_id)


async def test_retry_an_unknown_run_raises(db: Any) -> None:
    async with open_engine(db, zoo(), setup=SETUP) as engine:
        with pytest.raises(durable.RunNotFound):
            await engine.retry("nope")


# -- purge ---------------------------------------------------------------------------------


async def test_purge_deletes_old_finished_runs_with_their_rows_and_keeps_the_rest(
    db: Any,
) -> None:
    async with running_engine(db, zoo(), setup=SETUP) as engine:
        done = await engine.start("zoo")
        failed = await engine.start("zoo", {"fail": True})
        cancelled = await engine.start("zoo")
        waiting = await engine.start("zoo")
        recent = await engine.start("zoo", {"fail": True})
        for run_id in (done, cancelled, waiting):
            await until_status(engine, run_id, durable.RunStatus.WAITING)
        await engine.signal(done, "approved", {"by": "ann"})
        # A mailbox row that goes with the run (a name no wait takes: engine.signal refuses it).
        await execute(
            engine, "INSERT INTO durable.signals (run_id, name) VALUES ($1, 'unrelated')", waiting
        )
        await engine.cancel(cancelled)
        for run_id, final in (
            (done, durable.RunStatus.COMPLETED),
            (failed, durable.RunStatus.FAILED),
            (cancelled, durable.RunStatus.CANCELLED),
            (recent, durable.RunStatus.FAILED),
        ):
            await until_status(engine, run_id, final)
    async with open_engine(db, zoo()) as engine:
        # Age everything but `recent` by two days, including the unfinished run.
        await execute(
            engine,
            "UPDATE durable.runs SET created_at = now() - interval '2 days', "
            "finished_at = CASE WHEN finished_at IS NULL THEN NULL "
            "ELSE now() - interval '2 days' END WHERE id <> $1",
            recent,
        )
        assert await engine.purge(older_than=timedelta(days=1), batch_size=2) == 3
        left = {r.id for r in await engine.list_runs(limit=100)}
        assert left == {waiting, recent}
        for table in ("journal", "attempts", "signals"):
            gone = await fetchval(
                engine,
                f"SELECT count(*) FROM durable.{table} WHERE run_id = ANY($1::text[])",
                [done, failed, cancelled],
            )
            assert gone == 0, table
        assert (
            await fetchval(
                engine, "SELECT count(*) FROM durable.signals WHERE run_id = $1", waiting
            )
            == 1
        )
        # Nothing is older than a week.
        assert await engine.purge(older_than=timedelta(days=7)) == 0


async def test_purge_keeps_a_finished_child_while_its_parent_runs(db: Any) -> None:
    async with open_engine(db, zoo()) as engine:
        await execute(
            engine,
            "INSERT INTO durable.runs (id, workflow, input, status) "
            "VALUES ('parent', 'zoo', '{}', 'waiting');"
            "INSERT INTO durable.runs (id, workflow, input, status, parent_id, finished_at) "
            "VALUES ('child', 'zoo', '{}', 'completed', 'parent', now() - interval '9 days')",
        )
        assert await engine.purge(older_than=timedelta(days=1)) == 0
        await execute(
            engine,
            "UPDATE durable.runs SET status = 'completed', finished_at = now() WHERE id = 'parent'",
        )
        assert await engine.purge(older_than=timedelta(days=1)) == 1  # the child
        assert [r.id for r in await engine.list_runs()] == ["parent"]


async def test_purge_refuses_a_negative_age(db: Any) -> None:
    async with open_engine(db, zoo()) as engine:
        with pytest.raises(ValueError, match="negative"):
            await engine.purge(older_than=timedelta(seconds=-1))


# -- a job whose run is gone ---------------------------------------------------------------
# jobs.run_id has no foreign key to the partitioned runs (migration 0012): a job can outlive
# its run when a purge races a job insert. The claim that finds one deletes it.

ORPHAN = (
    "INSERT INTO durable.jobs (queue, task, run_id, priority) "
    "VALUES ($1, 'advance', $2, 100) RETURNING id"
)


def tick() -> durable.Workflow:
    wf = durable.Workflow("tick")

    @wf.step()
    async def only(ctx: durable.Context) -> int:
        return 1

    return wf


async def test_a_job_whose_run_is_gone_is_deleted_by_the_claim_and_the_queue_goes_on(
    db: Any,
) -> None:
    async with open_engine(db, tick()) as engine:
        run_id = await engine.start("tick")
        queue = await fetchval(engine, "SELECT queue FROM durable.runs WHERE id = $1", run_id)
        # At the head of the queue (the highest priority): every claim finds it first.
        orphan = await fetchval(engine, ORPHAN, queue, "01GONE0000000000000000000")
        # One slot: the claim that finds the orphan returns no job, and its transaction must
        # commit the deletion, or the orphan heads the queue again and the run is stranded.
        async with engine.worker(concurrency=1, poll_interval=0.05):
            assert await engine.wait(run_id, timeout=10) == {"only": 1}
        assert (
            await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE id = $1", orphan) == 0
        )


async def test_a_batch_claim_deletes_the_jobs_whose_run_is_gone(db: Any) -> None:
    async with open_engine(db, tick()) as engine:
        run_id = await engine.start("tick")
        queue = await fetchval(engine, "SELECT queue FROM durable.runs WHERE id = $1", run_id)
        orphan = await fetchval(engine, ORPHAN, queue, "01GONE0000000000000000000")
        async with engine.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM durable.claim_batch_v1($1::text[], 4, '{}')", [queue]
            )
            # The orphan headed the queue; the batch holds the run's job.
            assert [r["run_id"] for r in rows] == [run_id]
        assert (
            await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE id = $1", orphan) == 0
        )


# -- logs ----------------------------------------------------------------------------------


async def test_logs_carry_structured_run_fields(db: Any, caplog: Any) -> None:
    wf = durable.Workflow("logged")

    @wf.step(max_attempts=2, backoff=0)
    async def shaky(ctx: durable.Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first try")
        return 1

    caplog.set_level(logging.DEBUG, logger="durable")
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await engine.wait(run_id, timeout=10)
    retry = [r for r in caplog.records if r.name == "durable.runner" and "retrying" in r.message]
    assert len(retry) == 1
    record: Any = retry[0]
    assert (record.run_id, record.workflow, record.node, record.attempt) == (
        run_id,
        "logged",
        "shaky",
        1,
    )
    assert "RuntimeError: first try" in record.error
    done = [r for r in caplog.records if r.name == "durable.runner" and "completed" in r.message]
    assert any(getattr(r, "run_id", None) == run_id for r in done)
