"""Regression tests for the runtime defects reproduced in issue 10: each one strands a run, runs
something twice or retries forever on today's code, and asserts the behaviour SPEC asks for."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from helpers import (
    counting,
    eventually,
    fetch,
    fetchval,
    open_engine,
    refusing_journal,
    running_engine,
)

import durable

TERMINAL = ("completed", "failed", "cancelled")

# Pids of other sessions of this test's database that wait for a heavyweight lock.
LOCK_WAITERS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
ORDER BY pid
"""


# -- helpers ---------------------------------------------------------------------------------


async def describe(engine: durable.Engine, run_id: str) -> str:
    """One line on where a run is, for failure messages."""
    run = await engine.get_run(run_id, journal=True)
    jobs = await fetch(engine, "SELECT id, task FROM durable.jobs WHERE run_id = $1", run_id)
    unconsumed = await fetch(
        engine,
        "SELECT name FROM durable.signals WHERE run_id = $1 AND consumed_at IS NULL ORDER BY id",
        run_id,
    )
    return (
        f"status={run.status.value} current_node={run.current_node!r} error={run.error!r} "
        f"jobs={[(j['id'], j['task']) for j in jobs]} "
        f"journal={[(e.key, e.status) for e in run.journal]} "
        f"attempts={[(a.key, a.attempt) for a in run.attempts]} "
        f"unconsumed_signals={[r['name'] for r in unconsumed]}"
    )


async def poll(
    check: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy; None once `timeout` seconds passed."""
    with anyio.move_on_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(interval)
    return None


async def until_status(
    engine: durable.Engine, run_id: str, statuses: tuple[str, ...], *, timeout: float = 8.0
) -> durable.Run:
    """The run once its status is one of `statuses`; fails the test after `timeout` s."""

    async def check() -> durable.Run | None:
        run = await engine.get_run(run_id, journal=True)
        return run if run.status.value in statuses else None

    run: durable.Run | None = await poll(check, timeout=timeout)
    if run is None:
        pytest.fail(
            f"run {run_id} did not reach {statuses} within {timeout:g} s: "
            + await describe(engine, run_id)
        )
    return run


async def until_finished(
    engine: durable.Engine, run_id: str, *, timeout: float = 8.0
) -> durable.Run:
    return await until_status(engine, run_id, TERMINAL, timeout=timeout)


async def jobs_of(engine: durable.Engine, run_id: str) -> int:
    n: int = await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE run_id = $1", run_id)
    return n


async def attempt_rows(engine: durable.Engine, run_id: str, key: str) -> int:
    n: int = await fetchval(
        engine, "SELECT count(*) FROM durable.attempts WHERE run_id = $1 AND key = $2", run_id, key
    )
    return n


async def lock_waiters(engine: durable.Engine, *, besides: tuple[int, ...] = ()) -> list[int]:
    return [r["pid"] for r in await fetch(engine, LOCK_WAITERS) if r["pid"] not in besides]


async def until_blocked_or_done(
    engine: durable.Engine, done: anyio.Event, *, besides: tuple[int, ...] = (), timeout: float = 5
) -> int | None:
    """The pid of a session waiting for a lock, or None once `done` is set (it never waited)."""

    async def check() -> tuple[int | None] | None:
        if done.is_set():
            return (None,)
        pids = await lock_waiters(engine, besides=besides)
        return (pids[0],) if pids else None

    found: tuple[int | None] = await eventually(check, timeout=timeout)
    return found[0]


# -- 1: an interrupted cancel ----------------------------------------------------------------


@pytest.mark.parametrize("interruption", ["backend_terminated", "caller_cancelled"])
async def test_cancel_interrupted_while_waiting_for_a_node_in_flight_does_not_strand_the_run(
    db: Any, interruption: str
) -> None:
    """Defect 1: `cancel()` waits for the lock of a node in flight; if its connection is
    killed, or its caller's scope is cancelled, while it waits, the run must still finish
    (`cancelled`, or `completed` if the cancel was lost) once the node commits, with no job
    left, and a later cancel of another run must still work. Today the cancel request
    stays behind, every claim skips the run, and it stays `running` with its job forever."""
    entered = anyio.Event()
    gate = anyio.Event()
    wf = durable.Workflow("held")

    @wf.step
    async def slow(ctx: durable.Context) -> int:
        entered.set()
        await gate.wait()
        return 1

    @wf.step
    async def after(ctx: durable.Context) -> int:
        return 2

    parked = durable.Workflow("parked")
    parked.wait_for_signal("wait", "go")

    async with running_engine(db, wf, parked) as engine:
        run_id = await engine.start(wf)
        with anyio.fail_after(5):
            await entered.wait()

        done = anyio.Event()
        outcome: list[Any] = []

        async def cancel() -> None:
            try:
                outcome.append(await engine.cancel(run_id))
            except Exception as exc:  # its connection was killed under it
                outcome.append(exc)
            finally:
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)
            waiter = await until_blocked_or_done(engine, done)
            if waiter is not None:  # the cancel waits for the node's lock: interrupt it
                if interruption == "backend_terminated":
                    assert await fetchval(engine, "SELECT pg_terminate_backend($1)", waiter)
                    with anyio.fail_after(5):
                        await done.wait()
                else:
                    tg.cancel_scope.cancel()
        gate.set()

        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value in ("cancelled", "completed"), await describe(engine, run_id)
        assert await jobs_of(engine, run_id) == 0, await describe(engine, run_id)

        fresh = await engine.start(parked)
        await until_status(engine, fresh, ("waiting",), timeout=5)
        assert await engine.cancel(fresh) is True
        assert (await until_finished(engine, fresh, timeout=5)).status.value == "cancelled"


# -- 2: retry of a loop that failed at a later iteration -------------------------------------


async def test_retry_of_a_loop_failed_at_a_later_iteration_resumes_inside_the_loop(
    db: Any,
) -> None:
    """Defect 2: a loop whose iteration 1 failed for good, once retried, resumes at
    iteration 1 (iteration 0 stands) and completes. Today `retry()` leaves the run
    `running` with no job."""
    broken = {"on": True}
    bodies: Counter[int] = Counter()

    async def body(ctx: durable.LoopContext) -> int:
        bodies[ctx.iteration] += 1
        if ctx.iteration == 1 and broken["on"]:
            raise durable.NonRetryable("iteration 1 is broken")
        return ctx.iteration * 10

    wf = durable.Workflow("looping")
    wf.loop("poll", lambda ctx, i: i < 3, body, max_attempts=1)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert (await until_finished(engine, run_id)).status.value == "failed"
        broken["on"] = False
        assert await engine.retry(run_id) is True
        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value == "completed", await describe(engine, run_id)
        assert run.results["poll"] == [0, 10, 20]
        assert bodies == {0: 1, 1: 2, 2: 1}  # iteration 0 committed: not re-run
        assert await jobs_of(engine, run_id) == 0


# -- 3: concurrent signals -------------------------------------------------------------------


async def test_concurrent_signals_do_not_leave_a_stale_job_that_absorbs_a_later_wake(
    db: Any,
) -> None:
    """Defect 3: two `signal()` calls racing on a waiting run that has no job must leave it
    exactly the one job it needs. Today each adds an advance job; the stale duplicate, if a
    worker is slow to reach it, absorbs the wake of the next wait, and the run waits forever
    with that signal unconsumed in its mailbox. Here the duplicate is held (as a slow worker
    would) until the next signal has been sent; the run must still complete."""
    wf = durable.Workflow("two_waits")
    wf.wait_for_signal("first", "go")
    wf.wait_for_signal("second", "next")

    @wf.step
    async def done(ctx: durable.Context) -> Any:
        return ctx.results["second"]

    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        async with engine.worker(concurrency=2, poll_interval=0.05):
            await until_status(engine, run_id, ("waiting",), timeout=5)

        # No worker now: the run waits for `go` and has no job. Two signals race on it.
        async with engine.pool.acquire() as first:
            tx = first.transaction()
            await tx.start()
            assert await engine.signal(run_id, "go", 1, conn=first)
            second_done = anyio.Event()

            async def second() -> None:
                assert await engine.signal(run_id, "go", 2)
                second_done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                # The second signal waits for the run the first one holds (or is done).
                await until_blocked_or_done(engine, second_done)
                await tx.commit()

        # Hold every job beyond the first, as a worker that is slow to reach it would.
        async with engine.pool.acquire() as holder:
            hold = holder.transaction()
            await hold.start()
            held = await holder.fetch(
                "SELECT id FROM durable.jobs WHERE id IN "
                "(SELECT id FROM durable.jobs WHERE run_id = $1 ORDER BY id OFFSET 1) FOR UPDATE",
                run_id,
            )
            async with engine.worker(concurrency=2, poll_interval=0.05):

                async def parked_at_second() -> bool:
                    run = await engine.get_run(run_id)
                    return run.current_node == "second" and run.status.value == "waiting"

                if not await poll(parked_at_second, timeout=5):
                    pytest.fail("never parked at `second`: " + await describe(engine, run_id))
                sent = anyio.Event()

                async def send_next() -> None:
                    assert await engine.signal(run_id, "next", "ok")
                    sent.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_next)
                    await until_blocked_or_done(engine, sent)
                    await hold.commit()  # the slow worker lets go
                    with anyio.fail_after(5):
                        await sent.wait()
                run = await until_finished(engine, run_id, timeout=6)
        assert run.status.value == "completed", f"{len(held)} duplicate job(s) were held"
        assert run.results["second"] == "ok"
        assert await jobs_of(engine, run_id) == 0
        unconsumed = await fetchval(
            engine,
            "SELECT count(*) FROM durable.signals WHERE run_id = $1 AND name = 'next' "
            "AND consumed_at IS NULL",
            run_id,
        )
        assert unconsumed == 0


# -- 4: rolling deploys ----------------------------------------------------------------------


async def test_an_old_worker_does_not_complete_a_run_started_by_code_with_more_nodes(
    db: Any,
) -> None:
    """Defect 4, appended node: while only an old worker (nodes a, b) runs, a run started by
    new code (a, b, c) must not end `completed` without c; once a new worker runs it
    completes, each node having run once. Today the old worker completes it without c."""
    calls: Counter[str] = Counter()
    old = durable.Workflow("deploy")
    old.step("a", counting("a", calls)).step("b", counting("b", calls))
    new = durable.Workflow("deploy")
    new.step("a", counting("a", calls)).step("b", counting("b", calls))
    new.step("c", counting("c", calls))

    async with open_engine(db, new) as new_engine, open_engine(db, old) as old_engine:
        run_id = await new_engine.start(new)
        async with old_engine.worker(concurrency=2, poll_interval=0.05):
            # The old worker runs a run of its own code to the end. A claim takes the most
            # urgent due job first and the new run's job is older, so every claim that
            # worker made passed it over: no waiting "long enough" involved.
            probe = await old_engine.start(old)
            assert await old_engine.wait(probe, timeout=10) == {"a": "a", "b": "b"}
        run = await new_engine.get_run(run_id)
        assert not run.status.terminal, (
            f"the old worker ended the run {run.status.value} (c ran {calls['c']} times): "
            + await describe(new_engine, run_id)
        )

        async with new_engine.worker(concurrency=2, poll_interval=0.05):
            run = await until_finished(new_engine, run_id, timeout=8)
        assert run.status.value == "completed", await describe(new_engine, run_id)
        assert sorted(run.results) == ["a", "b", "c"]
        assert calls == {"a": 2, "b": 2, "c": 1}  # a and b ran once more, for the probe
        assert await jobs_of(new_engine, run_id) == 0


async def test_a_parallel_branch_added_while_branches_are_in_flight_does_not_strand_the_run(
    db: Any,
) -> None:
    """Defect 4, added branch: branches x, y of an old deploy are in flight when new code
    declares x, y, z. The run must not stay `running` with no job: with the new worker it
    ends (completed with z run once, or failed with a clear error), or it keeps a job for a
    worker that can continue it and finishes once the old code runs again. Today the new
    worker commits x and y, z never gets a job, and the run stays `running` for good."""
    old_blocking = {"on": True}
    in_flight: set[str] = set()
    both_in_flight = anyio.Event()
    new_calls: Counter[str] = Counter()

    def old_branch(name: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            if old_blocking["on"]:
                in_flight.add(name)
                if len(in_flight) == 2:
                    both_in_flight.set()
                await anyio.sleep_forever()  # until the old worker shuts down
            return name

        return handler

    old = durable.Workflow("fanout")
    old.parallel("p", {"x": old_branch("x"), "y": old_branch("y")}, backoff=0)
    new = durable.Workflow("fanout")
    new.parallel(
        "p", {b: counting(b, new_calls) for b in ("x", "y", "z")}, max_attempts=3, backoff=0
    )

    probe = durable.Workflow("probe")
    probe.step("done", counting("probe", Counter()))

    async with open_engine(db, old) as old_engine, open_engine(db, new, probe) as new_engine:
        run_id = await old_engine.start(old)
        async with old_engine.worker(concurrency=2, poll_interval=0.05, grace_period=0.2):
            with anyio.fail_after(5):
                await both_in_flight.wait()
        # The old worker is gone; its branch transactions rolled back: x, y are due again.

        async with new_engine.worker(concurrency=4, poll_interval=0.05):
            # The new worker runs a later run to the end: its claims, which take the most
            # urgent due job first, had x and y before them all along.
            later = await new_engine.start(probe)
            assert await new_engine.wait(later, timeout=10) == {"done": "probe"}
            run = await new_engine.get_run(run_id, journal=True)
        if not run.status.terminal:
            assert await jobs_of(new_engine, run_id) > 0, (
                "stranded: the run is unfinished with no job: " + await describe(new_engine, run_id)
            )
            # Waiting for code that can continue it: the old worker comes back.
            old_blocking["on"] = False
            async with (
                old_engine.worker(concurrency=2, poll_interval=0.05),
                new_engine.worker(concurrency=2, poll_interval=0.05),
            ):
                run = await until_finished(new_engine, run_id, timeout=8)
        elif run.status.value == "completed":
            assert new_calls["z"] == 1
            assert sorted(run.results["p"]) == ["x", "y", "z"]
        assert run.status.value in ("completed", "failed"), await describe(new_engine, run_id)
        if run.status.value == "failed":
            assert run.error
        assert all(n <= 1 for n in new_calls.values()), new_calls
        assert await jobs_of(new_engine, run_id) == 0


# -- 5: database errors and writes in node functions -----------------------------------------

KINDS = ["route_select", "child_start", "signal_name", "sleep_duration"]

SIDE = "CREATE TABLE side (run_id text NOT NULL);"


def _with_failing_function(kind: str, fn: Any, calls: Counter[str]) -> list[durable.Workflow]:
    """A workflow `fn_fails`: a step, then a `kind` node (named `node`) whose function is fn."""
    wf = durable.Workflow("fn_fails")
    wf.step("first", counting("first", calls))
    kid = durable.Workflow("kid")
    kid.step("k", counting("k", calls))
    if kind == "route_select":
        wf.route("node", fn, {"only": counting("only", calls)}, max_attempts=2, backoff=0)
    elif kind == "child_start":
        wf.child_workflow("node", fn)
    elif kind == "signal_name":
        wf.wait_for_signal("node", fn)
    else:
        wf.sleep("node", fn)
    return [wf, kid]


async def _assert_bounded_failure(
    engine: durable.Engine, run_id: str, kind: str, calls: Counter[str], error: str
) -> None:
    run = await until_finished(engine, run_id, timeout=10)
    assert run.status.value == "failed", await describe(engine, run_id)
    assert error in (run.error or ""), run.error
    budget = 2 if kind == "route_select" else 3
    assert 1 <= calls["fn"] <= budget, calls
    # Every evaluation is a recorded attempt of the node: none is lost, none is extra.
    assert await attempt_rows(engine, run_id, "node") == calls["fn"]
    assert calls["first"] == 1  # committed: never re-run
    assert await jobs_of(engine, run_id) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_database_error_in_a_node_function_is_a_bounded_recorded_attempt(
    db: Any, kind: str
) -> None:
    """Defect 5, database error: a statement that fails on `ctx.conn` inside a route's
    `select`, a child's `start`, a signal-name function or a duration function is a recorded
    attempt of that node, within its budget (`max_attempts=2` for the route, the default 3
    at most otherwise), and the run ends `failed` keeping the error. Today the aborted
    transaction makes the engine's own bookkeeping fail, and the job is retried every
    1-60 s forever, outside any budget, with nothing recorded."""
    calls: Counter[str] = Counter()

    async def fn(ctx: durable.Context) -> Any:
        calls["fn"] += 1
        assert ctx.conn is not None
        await ctx.conn.execute("SELECT 1 / 0")
        return "unreachable"

    async with running_engine(db, *_with_failing_function(kind, fn, calls)) as engine:
        run_id = await engine.start("fn_fails")
        await _assert_bounded_failure(engine, run_id, kind, calls, "division by zero")


@pytest.mark.parametrize("kind", KINDS)
async def test_writes_of_a_failing_node_function_roll_back(db: Any, kind: str) -> None:
    """Defect 5, write then raise: what a route's `select`, a child's `start`, a signal-name
    function or a duration function wrote through `ctx.conn` before raising rolls back; only
    the failed attempt is recorded and the run ends `failed`. Today the write commits
    together with the failure record."""
    calls: Counter[str] = Counter()

    async def fn(ctx: durable.Context) -> Any:
        calls["fn"] += 1
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO side VALUES ($1)", ctx.run_id)
        raise RuntimeError("failed after a write")

    async with running_engine(db, *_with_failing_function(kind, fn, calls), setup=SIDE) as engine:
        run_id = await engine.start("fn_fails")
        await _assert_bounded_failure(engine, run_id, kind, calls, "failed after a write")
        assert await fetchval(engine, "SELECT count(*) FROM side") == 0


# -- 6: unbounded bookkeeping loops ----------------------------------------------------------


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "lone_surrogate"])
async def test_an_error_text_that_cannot_be_stored_is_a_recorded_attempt(db: Any, bad: str) -> None:
    """Defect 6, unstorable error text: a handler whose exception text holds a NUL or a lone
    surrogate fails its attempts like any other (two attempts with `max_attempts=2`, each
    recorded) and the run ends `failed` with an error text. Today recording the attempt
    fails and the step runs again every few seconds forever."""
    calls: Counter[str] = Counter()
    wf = durable.Workflow("bad_error")

    @wf.step(max_attempts=2, backoff=0)
    async def boom(ctx: durable.Context) -> None:
        calls["boom"] += 1
        raise RuntimeError(f"bad {bad} text")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value == "failed", await describe(engine, run_id)
        assert "bad" in (run.error or "")
        assert calls["boom"] == 2
        assert await attempt_rows(engine, run_id, "boom") == 2
        assert await jobs_of(engine, run_id) == 0


async def test_a_result_that_cannot_be_stored_is_a_recorded_attempt(db: Any) -> None:
    """Defect 6, unstorable result: a step returning a lone surrogate (not encodable as
    UTF-8) ends as a recorded failed attempt within its budget, and the run ends (failed,
    or completed if the engine can store the result after all), with no job left. Today the
    commit fails outside the node and the step runs again every few seconds forever."""
    calls: Counter[str] = Counter()
    wf = durable.Workflow("bad_result")

    @wf.step(max_attempts=2, backoff=0)
    async def emit(ctx: durable.Context) -> dict[str, str]:
        calls["emit"] += 1
        return {"text": "lone \ud800 surrogate"}

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value in ("failed", "completed"), await describe(engine, run_id)
        completed = 1 if run.status.value == "completed" else 0
        assert 1 <= calls["emit"] <= 2
        assert await attempt_rows(engine, run_id, "emit") == calls["emit"] - completed
        assert await jobs_of(engine, run_id) == 0


def _broken_backoff(failed_attempt: int) -> float:
    raise ZeroDivisionError("the backoff function broke")


@pytest.mark.parametrize("where", ["step", "compensator"])
async def test_a_raising_backoff_function_is_bounded(db: Any, where: str) -> None:
    """Defect 6, raising backoff: when a step's (or its compensator's) backoff function
    raises, the failure still counts against `max_attempts` and the run ends `failed` (not
    stuck `pending` or `compensating`), keeping the original error. Today the backoff error
    escapes the node and the handler runs again every few seconds forever."""
    calls: Counter[str] = Counter()
    wf = durable.Workflow("bad_backoff")

    async def release(ctx: durable.Context) -> None:
        calls["release"] += 1
        raise RuntimeError("release failed")

    if where == "step":

        @wf.step(max_attempts=2, backoff=_broken_backoff)
        async def flaky(ctx: durable.Context) -> None:
            calls["flaky"] += 1
            raise RuntimeError("flaky failed")

    else:

        @wf.step(max_attempts=2, backoff=_broken_backoff, compensate=release)
        async def reserve(ctx: durable.Context) -> str:
            calls["reserve"] += 1
            return "reserved"

        @wf.step
        async def charge(ctx: durable.Context) -> None:
            raise durable.NonRetryable("card declined")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_finished(engine, run_id, timeout=10)
        assert run.status.value == "failed", await describe(engine, run_id)
        if where == "step":
            assert "flaky failed" in (run.error or "")
            assert 1 <= calls["flaky"] <= 2
            assert await attempt_rows(engine, run_id, "flaky") == calls["flaky"]
        else:
            assert "card declined" in (run.error or "")
            assert calls["reserve"] == 1
            assert 1 <= calls["release"] <= 2
            assert any(e.key == "reserve@compensate" for e in run.journal)
        assert await jobs_of(engine, run_id) == 0


async def test_a_signal_timeout_beyond_the_datetime_range_is_bounded(db: Any) -> None:
    """Defect 6, out-of-range timeout: `wait_for_signal(timeout=sys.maxsize)` is either
    refused by the definition, or the run parks `waiting` (a signal then completes it), or
    the node fails as a recorded attempt; the step before it never runs again. Today the
    wake time overflows a datetime in the worker and the node is retried forever."""
    calls: Counter[str] = Counter()
    wf = durable.Workflow("far_timeout")
    wf.step("before", counting("before", calls))
    try:
        wf.wait_for_signal("approval", "approved", timeout=sys.maxsize)
    except durable.DefinitionError:
        return  # refused up front: also bounded
    wf.step("after", counting("after", calls))

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_status(engine, run_id, ("waiting", *TERMINAL), timeout=6)
        if run.status.value == "waiting":
            assert await engine.signal(run_id, "approved", {"by": "ann"})
            run = await until_finished(engine, run_id, timeout=5)
            assert run.status.value == "completed", await describe(engine, run_id)
            assert run.results["approval"] == {"by": "ann"}
        else:
            assert run.status.value == "failed", await describe(engine, run_id)
            assert await attempt_rows(engine, run_id, "approval") >= 1
        assert calls["before"] == 1
        assert await jobs_of(engine, run_id) == 0


async def test_retry_after_nodes_were_removed_from_the_end_is_bounded(db: Any) -> None:
    """Defect 6, retry after a shrink: a run that failed at its last node c is retried under
    code that no longer declares c. The run is pinned to the shape it started with, so that
    worker never touches it (no loop, no attempt); a worker of the old shape then runs c
    again, once per retry, each retry ending cleanly (the old runtime hit a duplicate
    journal key on every attempt after the first retry and retried the job forever)."""
    calls: Counter[str] = Counter()
    v1 = durable.Workflow("shrink")
    v1.step("a", counting("a", calls)).step("b", counting("b", calls))

    @v1.step
    async def c(ctx: durable.Context) -> None:
        calls["c"] += 1
        raise durable.NonRetryable("c is broken")

    v2 = durable.Workflow("shrink")
    v2.step("a", counting("a", calls)).step("b", counting("b", calls))

    async with running_engine(db, v1) as engine:
        run_id = await engine.start(v1)
        assert (await until_finished(engine, run_id)).status.value == "failed"

    async with running_engine(db, v2) as engine:
        assert await engine.retry(run_id) is True
        assert await engine.retry(run_id) is False  # not failed any more: it waits
        fresh = await engine.start(v2)
        await engine.wait(fresh, timeout=10)  # the worker claimed past the older job
        assert (await engine.get_run(run_id)).status.value == "running"
        assert await attempt_rows(engine, run_id, "c") == 1
    assert calls == {"a": 2, "b": 2, "c": 1}  # a and b: once for each run

    async with running_engine(db, v1) as engine:
        for expected in (2, 3):
            run = await until_finished(engine, run_id, timeout=6)
            assert run.status.value == "failed", await describe(engine, run_id)
            assert run.error == "NonRetryable: c is broken"
            assert await attempt_rows(engine, run_id, "c") == expected
            if expected == 2:
                assert await engine.retry(run_id) is True
        assert await jobs_of(engine, run_id) == 0
    assert calls == {"a": 2, "b": 2, "c": 3}


# -- 7: retry after compensation -------------------------------------------------------------


async def test_retry_after_compensation_re_runs_the_compensated_steps(db: Any) -> None:
    """Defect 7: reserve (compensated by release), then charge fails for good, so the
    reservation is released. `retry()` must re-run reserve (its compensator ran) before
    charge, so the order completes with a reservation. Today it resumes at charge and ends
    `completed` with no reservation."""
    declined = {"on": True}
    log: list[str] = []
    wf = durable.Workflow("order")

    async def release(ctx: durable.Context) -> None:
        log.append("release")
        assert ctx.conn is not None
        await ctx.conn.execute("DELETE FROM reservations WHERE run_id = $1", ctx.run_id)

    @wf.step(compensate=release)
    async def reserve(ctx: durable.Context) -> str:
        log.append("reserve")
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO reservations VALUES ($1)", ctx.run_id)
        return "reserved"

    @wf.step
    async def charge(ctx: durable.Context) -> str:
        log.append("charge")
        if declined["on"]:
            raise durable.NonRetryable("card declined")
        return "charged"

    setup = "CREATE TABLE reservations (run_id text PRIMARY KEY);"
    async with running_engine(db, wf, setup=setup) as engine:
        run_id = await engine.start(wf)
        assert (await until_finished(engine, run_id)).status.value == "failed"
        assert await fetchval(engine, "SELECT count(*) FROM reservations") == 0
        declined["on"] = False
        assert await engine.retry(run_id) is True
        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value == "completed", await describe(engine, run_id)
        reserved = await fetchval(
            engine, "SELECT count(*) FROM reservations WHERE run_id = $1", run_id
        )
        assert reserved == 1, f"the retried order completed without its reservation: {log}"
        assert log == ["reserve", "charge", "release", "reserve", "charge"]


# -- 8: cancelling a parent ------------------------------------------------------------------


async def test_a_crash_while_cancelling_a_parent_does_not_leave_its_child_running(
    db: Any,
) -> None:
    """Defect 8: cancelling a parent cancels its running children atomically with it. If
    the cancelling connection dies midway, either both are cancelled or neither is (and a
    new cancel then cancels both). Today the parent's cancel commits first and the children
    are cancelled one by one from Python afterwards: the crash leaves the child `waiting`
    while the parent ends `cancelled`."""
    kid = durable.Workflow("kid")
    kid.wait_for_signal("hold", "never")
    parent = durable.Workflow("parent")
    parent.child_workflow("kid", lambda ctx: ("kid", {}))

    async with running_engine(db, parent, kid) as engine:
        parent_id = await engine.start(parent)

        async def child_waiting() -> str | None:
            child: str | None = await fetchval(
                engine, "SELECT id FROM durable.runs WHERE parent_id = $1", parent_id
            )
            if child is None or (await engine.get_run(child)).status.value != "waiting":
                return None
            return child

        child_id: str = await eventually(child_waiting, timeout=5)
        await until_status(engine, parent_id, ("waiting",), timeout=5)

        # Another transaction holds the child's row, so cancelling reaches it and waits there.
        async with engine.pool.acquire() as locker:
            tx = locker.transaction()
            await tx.start()
            await locker.execute(
                "SELECT id FROM durable.runs WHERE id = $1 FOR NO KEY UPDATE", child_id
            )
            locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
            done = anyio.Event()
            committed: list[bool] = []

            async def cancel() -> None:
                try:
                    committed.append(await engine.cancel(parent_id))
                except Exception:  # its connection was killed under it: rolled back
                    committed.append(False)
                finally:
                    done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                waiter = await until_blocked_or_done(engine, done, besides=(locker_pid,))
                if waiter is not None:
                    assert await fetchval(engine, "SELECT pg_terminate_backend($1)", waiter)
                with anyio.fail_after(5):
                    await done.wait()
            await tx.rollback()

        # The cancel is over, committed or rolled back: whatever it did is visible now.
        p = await engine.get_run(parent_id)
        c = await engine.get_run(child_id)
        assert committed == [p.status.value in ("compensating", "cancelled")], (committed, p)
        if committed == [True]:
            assert c.status.value == "cancelled", (
                f"parent is {p.status.value} but its child is {c.status.value}: "
                + await describe(engine, child_id)
            )
        else:  # the cancel rolled back as a whole: the child was left alone too
            assert not c.status.terminal, await describe(engine, child_id)
            assert await engine.cancel(parent_id) is True
        assert (await until_finished(engine, parent_id, timeout=5)).status.value == "cancelled"
        assert (await until_finished(engine, child_id, timeout=5)).status.value == "cancelled"


# -- 9: purge and the lock order -------------------------------------------------------------


async def test_purge_does_not_wait_for_a_job_lock_while_holding_runs(db: Any) -> None:
    """Defect 9: one lock order everywhere, job then run. A finished run that still has a
    job row held by another transaction must not make `purge` wait for that job while it
    holds the run (it skips the run, or finishes without waiting). Today purge locks the run
    first, then waits on the job's lock in the cascading delete."""
    wf = durable.Workflow("short")
    wf.step("only", counting("only", Counter()))

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert (await until_finished(engine, run_id)).status.value == "completed"
        job_id = await fetchval(
            engine,
            "INSERT INTO durable.jobs (queue, task, run_id) VALUES ('elsewhere', 'advance', $1) "
            "RETURNING id",
            run_id,
        )
        async with engine.pool.acquire() as holder:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT id FROM durable.jobs WHERE id = $1 FOR UPDATE", job_id)
            holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
            done = anyio.Event()

            async def purge() -> None:
                await engine.purge(older_than=timedelta(0))
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(purge)
                waiter = await until_blocked_or_done(engine, done, besides=(holder_pid,))
                blocked = waiter is not None
                await tx.rollback()  # let a blocked purge finish
                with anyio.fail_after(5):
                    await done.wait()
        await fetchval(engine, "DELETE FROM durable.jobs WHERE id = $1", job_id)  # ours
        assert not blocked, "purge waited for a job's lock while holding its run"


# -- 10: the route choice after a crash ------------------------------------------------------


async def test_the_route_choice_is_not_made_again_after_a_crash_mid_branch(db: Any) -> None:
    """Defect 10: a route's `select` runs once and its choice is journaled; a worker whose
    connection dies while the chosen branch runs must not lead to a second `select`. Today
    the choice is journaled in the branch's transaction and lost with it."""
    calls: Counter[str] = Counter()

    def select(ctx: durable.Context) -> str:
        calls["select"] += 1
        return "only"

    async def only(ctx: durable.Context) -> str:
        calls["only"] += 1
        if calls["only"] == 1:
            assert ctx.conn is not None
            await ctx.conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return "shipped"

    wf = durable.Workflow("ship")
    wf.route("pick", select, {"only": only}, max_attempts=3, backoff=0)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        run = await until_finished(engine, run_id, timeout=8)
        assert run.status.value == "completed", await describe(engine, run_id)
        assert run.results["pick"] == {"branch": "only", "result": "shipped"}
        assert calls["only"] == 2
        assert calls["select"] == 1, "select ran again after the crash"


# -- 11: retry with an old branch retry job --------------------------------------------------


async def test_retry_with_an_old_branch_retry_job_runs_each_branch_once(db: Any) -> None:
    """Defect 11: a parallel node fails for good (branch x) while branch y waits for its
    own retry. Retrying the run must give y one job, not a second one next to the old
    retry job: y's handler runs once after the retry, and the run completes with no job
    left. Today the old retry job survives the failure, the retry fans out again, and both
    y jobs run the handler side by side."""
    phase = {"n": 1}
    x_go = anyio.Event()
    release_y = anyio.Event()
    calls: Counter[str] = Counter()

    async def x(ctx: durable.Context) -> str:
        calls[f"x{phase['n']}"] += 1
        if phase["n"] == 1:
            await x_go.wait()
            raise durable.NonRetryable("x is broken")
        return "x"

    async def y(ctx: durable.Context) -> str:
        calls[f"y{phase['n']}"] += 1
        if phase["n"] == 1:
            raise RuntimeError("y needs another attempt")
        await release_y.wait()
        return "y"

    wf = durable.Workflow("fan")
    wf.parallel("p", {"x": x, "y": y}, max_attempts=3, backoff=2)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        # y's failed attempt 1 is committed (its retry is due 2 s later); then x fails.
        await eventually(lambda: attempt_rows(engine, run_id, "p#y"), timeout=5)
        x_go.set()
        assert (await until_finished(engine, run_id, timeout=5)).status.value == "failed"

        phase["n"] = 2
        assert await engine.retry(run_id) is True

        async def y_started() -> bool:
            return calls["y2"] >= 1

        await eventually(y_started, timeout=5)

        streak = [0]

        async def settled() -> bool:
            # Every job of the run is due and held by a worker, on two polls in a row:
            # nothing more will start.
            async with engine.pool.acquire() as conn, conn.transaction():
                delayed = await conn.fetchval(
                    "SELECT count(*) FROM durable.jobs WHERE run_id = $1 AND run_at > now()",
                    run_id,
                )
                free = await conn.fetch(
                    "SELECT id FROM durable.jobs WHERE run_id = $1 FOR UPDATE SKIP LOCKED",
                    run_id,
                )
            streak[0] = streak[0] + 1 if delayed == 0 and not free else 0
            return streak[0] >= 2

        await eventually(settled, timeout=6, interval=0.1)
        y_runs = calls["y2"]
        release_y.set()
        run = await until_finished(engine, run_id, timeout=8)
        assert y_runs == 1, f"y's handler ran {y_runs} times side by side after the retry"
        assert run.status.value == "completed", await describe(engine, run_id)
        assert run.results["p"] == {"x": "x", "y": "y"}
        assert await jobs_of(engine, run_id) == 0


# -- bookkeeping failures outside user code ----------------------------------------------------


async def test_a_database_error_while_recording_an_outcome_is_a_bounded_attempt(db: Any) -> None:
    """Bounded failure everywhere: when recording a node's outcome fails in the database (here
    a trigger refuses the journal row of `b`), the failure is an attempt of `b` that counts
    against its budget; the run fails and compensates instead of retrying the job forever."""
    setup = refusing_journal("b")
    calls: Counter[str] = Counter()
    wf = durable.Workflow("refused")
    wf.step("a", counting("a", calls))
    wf.step("b", counting("b", calls), max_attempts=2, backoff=0)
    async with running_engine(db, wf, setup=setup) as engine:
        run_id = await engine.start(wf)
        run = await until_finished(engine, run_id, timeout=15)
        assert run.status.value == "failed", await describe(engine, run_id)
        assert await attempt_rows(engine, run_id, "b") == 2
    assert run.error is not None
    assert "journal refuses b" in run.error
    # Two recorded attempts. The worker locks the job again in the message that rolls back
    # the failed transaction, but a slot descheduled between the two leaves the job free
    # for a moment: another slot that takes it up then finds a job whose locker aborted and
    # counts that claim as a worker lost, so the reruns stay within `max_claims` (5).
    assert 2 <= calls["b"] <= 2 + 5


async def test_a_failure_recorded_after_the_run_moved_on_is_not_charged_to_its_new_node(
    db: Any,
) -> None:
    """A slot whose transaction failed on a job records the failure in a new one; if
    another slot took the job up in between and moved the run on, the failure was of work
    that is no longer there: it must not count as an attempt of the node the run is at now
    (with `max_attempts=1` that node would fail without ever running)."""
    from durable.runtime.runner import Runner
    from durable.runtime.visit import job_from_row

    calls: Counter[str] = Counter()
    wf = durable.Workflow("moved_on")
    wf.step("a", counting("a", calls))
    wf.step("b", counting("b", calls), max_attempts=1)
    async with open_engine(db, wf) as engine:
        runner = Runner(engine.queries, engine._registered(), engine.pool)
        run_id = await engine.start(wf)
        job_id = await fetchval(engine, "SELECT id FROM durable.jobs WHERE run_id = $1", run_id)
        claim = engine.queries["claim_by_id"]
        async with engine.pool.acquire() as conn:
            async with conn.transaction():  # the slot whose transaction then fails
                stale = job_from_row(await conn.fetchrow(claim, job_id, True))
            async with conn.transaction():  # another slot runs `a` meanwhile
                fresh = job_from_row(await conn.fetchrow(claim, job_id, True))
                assert fresh is not None
                await runner.handle(conn, fresh)
            assert stale is not None
            async with conn.transaction():
                await runner.on_error(conn, stale, RuntimeError("journal refuses a"))
        run = await engine.get_run(run_id)
        assert (run.status.value, run.current_node) == ("running", "b"), await describe(
            engine, run_id
        )
        assert await attempt_rows(engine, run_id, "b") == 0
        assert calls == Counter({"a": 1})
