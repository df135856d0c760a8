"""Saga compensation: reverse order, journaling, failing compensators, cancel, and stray jobs
during compensation (SPEC, Semantics: compensation, stale jobs)."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest
from helpers import (
    eventually,
    execute,
    fetch,
    fetchval,
    open_engine,
    running_engine,
    until_attempts,
    until_blocked,
)

import durable

EFFECTS = "CREATE TABLE effects (id bigserial PRIMARY KEY, what text NOT NULL)"


def saga(
    name: str,
    calls: list[str],
    *,
    steps: tuple[str, ...] = ("a", "b", "c"),
    failing: str = "d",
    max_attempts: int = 2,
    failing_compensator: str | None = None,
) -> durable.Workflow:
    """Steps that each write an effect and have a compensator, then a step that always fails."""
    wf = durable.Workflow(name)
    for step_name in steps:

        async def do(ctx: durable.Context, step_name: str = step_name) -> str:
            calls.append(f"{step_name}:{ctx.attempt}")
            assert ctx.conn is not None
            await ctx.conn.execute("INSERT INTO effects (what) VALUES ($1)", f"do {step_name}")
            return f"{step_name}-done"

        async def undo(ctx: durable.Context, step_name: str = step_name) -> str:
            calls.append(f"undo {step_name}:{ctx.attempt}")
            assert ctx.conn is not None
            await ctx.conn.execute("INSERT INTO effects (what) VALUES ($1)", f"undo {step_name}")
            if step_name == failing_compensator:
                raise RuntimeError(f"cannot undo {step_name}")
            return f"{step_name}-undone"

        wf.step(step_name, do, compensate=undo, max_attempts=max_attempts, backoff=0)

    async def fail(ctx: durable.Context) -> None:
        calls.append(f"{failing}:{ctx.attempt}")
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO effects (what) VALUES ($1)", f"do {failing}")
        raise RuntimeError(f"{failing} exploded on attempt {ctx.attempt}")

    wf.step(failing, fail, max_attempts=max_attempts, backoff=0)
    return wf


async def effects(engine: durable.Engine) -> list[str]:
    return [r["what"] for r in await fetch(engine, "SELECT what FROM effects ORDER BY id")]


async def test_exhausted_attempts_compensate_in_reverse_order(db: Any) -> None:
    calls: list[str] = []
    wf = saga("saga", calls, max_attempts=2)
    async with running_engine(db, wf, setup=EFFECTS) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        done = await effects(engine)
        run = await engine.get_run(run_id, journal=True)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    assert calls == ["a:1", "b:1", "c:1", "d:1", "d:2", "undo c:1", "undo b:1", "undo a:1"]
    # The failing step's writes rolled back; the compensators' writes committed.
    assert done == ["do a", "do b", "do c", "undo c", "undo b", "undo a"]
    assert run.status is durable.RunStatus.FAILED
    assert run.error == "RuntimeError: d exploded on attempt 2"
    assert info.value.run.id == run_id
    assert info.value.run.error == run.error
    assert run.finished_at is not None
    assert [(e.key, e.status) for e in run.journal] == [
        ("a", "completed"),
        ("b", "completed"),
        ("c", "completed"),
        ("d", "failed"),
        ("c@compensate", "completed"),
        ("b@compensate", "completed"),
        ("a@compensate", "completed"),
    ]
    journal = {e.key: e for e in run.journal}
    assert journal["b@compensate"].result == "b-undone"
    assert journal["b@compensate"].node == "b"
    assert journal["d"].error == "RuntimeError: d exploded on attempt 2"
    assert journal["d"].attempts == 2
    assert [(a.key, a.attempt) for a in run.attempts] == [("d", 1), ("d", 2)]
    # Completed results stay visible; compensations are not node results.
    assert run.results == {"a": "a-done", "b": "b-done", "c": "c-done"}
    assert run.result is None
    assert jobs == 0


async def test_compensation_order_follows_completion_not_declaration(db: Any) -> None:
    """Steps without a compensator are skipped; the rest run newest first."""
    calls: list[str] = []
    wf = durable.Workflow("mixed")

    async def undo_first(ctx: durable.Context) -> None:
        calls.append(f"undo first ({ctx.node})")

    async def undo_third(ctx: durable.Context) -> None:
        calls.append(f"undo third ({ctx.node})")
        assert ctx.results == {"first": 1, "second": 2, "third": 3}

    async def value(ctx: durable.Context) -> int:
        return {"first": 1, "second": 2, "third": 3}[ctx.node]

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("stop")

    wf.step("first", value, compensate=undo_first)
    wf.step("second", value)
    wf.step("third", value, compensate=undo_third)
    wf.step("fourth", fail)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert calls == ["undo third (third@compensate)", "undo first (first@compensate)"]
    assert [e.key for e in run.journal] == [
        "first",
        "second",
        "third",
        "fourth",
        "third@compensate",
        "first@compensate",
    ]


async def test_failure_of_the_first_step_compensates_nothing(db: Any) -> None:
    calls: list[str] = []
    wf = durable.Workflow("first_fails")

    async def undo(ctx: durable.Context) -> None:
        calls.append("undo")

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("no")

    wf.step("only", fail, compensate=undo)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
    # The failed step itself never completed, so its compensator does not run.
    assert calls == []
    assert [(e.key, e.status) for e in run.journal] == [("only", "failed")]
    assert run.error == "NonRetryable: no"


async def test_a_throwing_compensator_is_retried_journaled_and_does_not_stop_the_others(
    db: Any,
) -> None:
    calls: list[str] = []
    wf = saga("bad_undo", calls, max_attempts=3, failing_compensator="b")
    async with running_engine(db, wf, setup=EFFECTS) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        done = await effects(engine)
        run = await engine.get_run(run_id, journal=True)

    assert calls == [
        "a:1",
        "b:1",
        "c:1",
        "d:1",
        "d:2",
        "d:3",
        "undo c:1",
        "undo b:1",
        "undo b:2",
        "undo b:3",
        "undo a:1",
    ]
    # The failing compensator's writes rolled back each time; the others committed.
    assert done == ["do a", "do b", "do c", "undo c", "undo a"]
    journal = {e.key: e for e in run.journal}
    assert journal["b@compensate"].status == "failed"
    assert journal["b@compensate"].error == "RuntimeError: cannot undo b"
    assert journal["b@compensate"].attempts == 3
    assert journal["c@compensate"].status == "completed"
    assert journal["a@compensate"].status == "completed"
    assert [e.key for e in run.journal][-3:] == ["c@compensate", "b@compensate", "a@compensate"]
    retried = [(a.key, a.attempt) for a in run.attempts if a.key == "b@compensate"]
    assert retried[:2] == [("b@compensate", 1), ("b@compensate", 2)]
    # The run keeps the original error, not the compensator's.
    assert run.status is durable.RunStatus.FAILED
    assert run.error == "RuntimeError: d exploded on attempt 3"


async def test_compensator_context(db: Any) -> None:
    seen: dict[str, Any] = {}
    wf = durable.Workflow("comp_ctx")

    async def undo(ctx: durable.Context) -> None:
        seen.update(
            run_id=ctx.run_id,
            workflow=ctx.workflow,
            node=ctx.node,
            attempt=ctx.attempt,
            input=ctx.input,
            results=dict(ctx.results),
            has_conn=ctx.conn is not None,
        )

    async def ok(ctx: durable.Context) -> dict[str, int]:
        return {"id": 7}

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("x")

    wf.step("reserve", ok, compensate=undo).step("charge", fail)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, {"order": 1})
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)

    assert seen == {
        "run_id": run_id,
        "workflow": "comp_ctx",
        "node": "reserve@compensate",
        "attempt": 1,
        "input": {"order": 1},
        "results": {"reserve": {"id": 7}},
        "has_conn": True,
    }


async def test_cancel_mid_flight_compensates_and_ends_cancelled(db: Any) -> None:
    calls: list[str] = []
    wf = durable.Workflow("cancel_me")

    async def reserve(ctx: durable.Context) -> str:
        calls.append("reserve")
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO effects (what) VALUES ('reserved')")
        return "r1"

    async def release(ctx: durable.Context) -> None:
        calls.append("release")
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO effects (what) VALUES ('released')")

    async def charge(ctx: durable.Context) -> None:
        calls.append(f"charge:{ctx.attempt}")
        raise RuntimeError("gateway busy")

    wf.step("reserve", reserve, compensate=release)
    wf.step("charge", charge, max_attempts=5, backoff=30)  # parked in its retry backoff

    async with running_engine(db, wf, setup=EFFECTS) as engine:
        run_id = await engine.start(wf)
        parked = await until_attempts(engine, run_id, "charge", 1)
        assert parked.status is durable.RunStatus.RUNNING
        assert parked.current_node == "charge"

        assert await engine.cancel(run_id) is True
        with pytest.raises(durable.RunCancelled) as info:
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        done = await effects(engine)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")
        # Finished: a second cancel is refused.
        assert await engine.cancel(run_id) is False

    assert calls == ["reserve", "charge:1", "release"]
    assert done == ["reserved", "released"]
    assert info.value.run.status is durable.RunStatus.CANCELLED
    assert run.status is durable.RunStatus.CANCELLED
    assert run.error == "cancelled"
    assert run.finished_at is not None
    assert [(e.key, e.status) for e in run.journal] == [
        ("reserve", "completed"),
        ("reserve@compensate", "completed"),
    ]
    assert jobs == 0


async def test_cancel_of_a_pending_run_without_steps_done(db: Any) -> None:
    calls: list[str] = []
    wf = durable.Workflow("pending_cancel")

    async def undo(ctx: durable.Context) -> None:
        calls.append("undo")

    async def step(ctx: durable.Context) -> None:
        calls.append("step")

    wf.step("a", step, compensate=undo)

    # Create the run with no worker, cancel it, then let a worker finish the cancellation.
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.cancel(run_id, reason="changed my mind") is True
    async with running_engine(db, wf) as engine:
        with pytest.raises(durable.RunCancelled):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
    assert calls == []
    assert run.status is durable.RunStatus.CANCELLED
    assert run.error == "changed my mind"
    assert run.journal == ()


async def test_cancel_of_finished_runs_returns_false(db: Any) -> None:
    wf = durable.Workflow("finished")

    async def ok(ctx: durable.Context) -> int:
        return 1

    wf.step("a", ok)
    bad = durable.Workflow("finished_bad")

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("x")

    bad.step("a", fail)
    async with running_engine(db, wf, bad) as engine:
        done = await engine.start(wf)
        await engine.wait(done, timeout=10)
        failed = await engine.start(bad)
        with pytest.raises(durable.RunFailed):
            await engine.wait(failed, timeout=10)
        assert await engine.cancel(done) is False
        assert await engine.cancel(failed) is False
        assert (await engine.get_run(done)).status is durable.RunStatus.COMPLETED
        assert (await engine.get_run(failed)).status is durable.RunStatus.FAILED
        with pytest.raises(durable.RunNotFound):
            await engine.cancel("01ARZ3NDEKTSV4RRFFQ69G5FAV")


async def test_a_stray_advance_during_compensation_does_nothing(db: Any) -> None:
    """Seed defect 8: a stray advance must not re-run the failed node or skip compensation."""
    calls: list[str] = []
    wf = durable.Workflow("stray")

    async def reserve(ctx: durable.Context) -> str:
        calls.append("reserve")
        return "r"

    async def release(ctx: durable.Context) -> None:
        calls.append(f"release:{ctx.attempt}")
        if ctx.attempt == 1:
            raise RuntimeError("release failed once")

    async def charge(ctx: durable.Context) -> None:
        calls.append("charge")
        raise durable.NonRetryable("declined")

    # The compensator's retry waits 30 s, so the run sits in `compensating`.
    wf.step("reserve", reserve, compensate=release, max_attempts=2, backoff=30)
    wf.step("charge", charge)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_attempts(engine, run_id, "reserve@compensate", 1)
        assert run.status is durable.RunStatus.COMPENSATING

        # A stray advance job (the run's position is in the run row alone, so any advance
        # job means "the node at the run's position", here while it compensates).
        stray = await fetchval(
            engine,
            "INSERT INTO durable.jobs (queue, task, run_id) VALUES ($1, 'advance', $2) "
            "RETURNING id",
            wf.queue,
            run_id,
        )
        stray0 = stray

        async def strays_gone() -> bool:
            n = await fetchval(
                engine, "SELECT count(*) FROM durable.jobs WHERE id = ANY($1)", [stray, stray0]
            )
            return n == 0

        await eventually(strays_gone)
        assert calls == ["reserve", "charge", "release:1"]
        assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPENSATING

        # Let the compensator's retry run now.
        await execute(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert calls == ["reserve", "charge", "release:1", "release:2"]
    assert run.error == "NonRetryable: declined"
    assert [(e.key, e.status) for e in run.journal] == [
        ("reserve", "completed"),
        ("charge", "failed"),
        ("reserve@compensate", "completed"),
    ]


async def test_cancel_while_compensating_returns_false(db: Any) -> None:
    wf = durable.Workflow("comp_busy")

    async def ok(ctx: durable.Context) -> None:
        return None

    async def undo(ctx: durable.Context) -> None:
        raise RuntimeError("not yet")

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("x")

    wf.step("a", ok, compensate=undo, max_attempts=2, backoff=30).step("b", fail)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await until_attempts(engine, run_id, "a@compensate", 1)
        assert await engine.cancel(run_id) is False
        assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPENSATING


async def test_compensating_run_cannot_be_completed_by_hand(db: Any) -> None:
    wf = durable.Workflow("comp_guard")

    async def ok(ctx: durable.Context) -> None:
        return None

    async def undo(ctx: durable.Context) -> None:
        raise RuntimeError("not yet")

    async def fail(ctx: durable.Context) -> None:
        raise durable.NonRetryable("x")

    wf.step("a", ok, compensate=undo, max_attempts=2, backoff=30).step("b", fail)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await until_attempts(engine, run_id, "a@compensate", 1)
        for status in ("completed", "running", "pending"):
            with pytest.raises(asyncpg.CheckViolationError):
                await execute(
                    engine, "UPDATE durable.runs SET status = $2 WHERE id = $1", run_id, status
                )


async def test_cancel_during_a_running_handler_waits_for_it_then_compensates(db: Any) -> None:
    """A handler in flight finishes first; then every completed step is compensated once,
    newest first, and nothing after the cancel runs."""
    calls: list[str] = []
    in_b = anyio.Event()
    release_b = anyio.Event()
    wf = durable.Workflow("cancel_in_flight")

    async def do(ctx: durable.Context) -> str:
        calls.append(ctx.node)
        if ctx.node == "b":
            in_b.set()
            with anyio.fail_after(10):
                await release_b.wait()
        return ctx.node

    async def undo(ctx: durable.Context) -> None:
        calls.append(ctx.node)

    for name in ("a", "b", "c", "d"):
        wf.step(name, do, compensate=undo)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with anyio.fail_after(10):
            await in_b.wait()
        cancelled: list[bool] = []

        async def cancel() -> None:
            cancelled.append(await engine.cancel(run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            await until_blocked(engine, "cancel_tree_v1")  # on the in-flight job's lock
            assert cancelled == []
            release_b.set()
        with pytest.raises(durable.RunCancelled):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert cancelled == [True]
    done = [e.key for e in run.journal if "@" not in e.key]
    assert done[:2] == ["a", "b"]
    assert "d" not in done
    compensations = [e.key for e in run.journal if e.key.endswith("@compensate")]
    assert compensations == [f"{k}@compensate" for k in reversed(done)]
    assert calls == done + compensations
    assert run.status is durable.RunStatus.CANCELLED
