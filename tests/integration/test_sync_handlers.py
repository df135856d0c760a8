"""Plain `def` handlers (issue 16): they run on the engine's thread pool and get a
synchronous `ctx.conn` bridged to the node's transaction, with the savepoint, rollback and
time limits of async handlers; the event loop goes on meanwhile."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import anyio
import asyncpg
import pytest
from helpers import fetch, running_engine

import durable

TABLE = "CREATE TABLE notes (run text, note text)"


async def notes(engine: durable.Engine) -> list[str]:
    rows = await fetch(engine, "SELECT note FROM notes ORDER BY note")
    return [r["note"] for r in rows]


def write(ctx: durable.SyncContext, note: str) -> None:
    assert ctx.conn is not None
    ctx.conn.execute("INSERT INTO notes VALUES ($1, $2)", ctx.run_id, note)


async def test_a_sync_steps_writes_commit_with_the_node_and_roll_back_when_it_raises(
    db: Any,
) -> None:
    wf = durable.Workflow("sync_writes")
    threads: list[str] = []

    @wf.step(max_attempts=2, backoff=0)
    def record(ctx: durable.SyncContext) -> int:
        threads.append(threading.current_thread().name)
        write(ctx, f"attempt {ctx.attempt}")
        assert ctx.conn is not None
        count: int = ctx.conn.fetchval("SELECT count(*) FROM notes WHERE run = $1", ctx.run_id)
        if ctx.attempt == 1:
            raise RuntimeError("after writing")
        return count

    async with running_engine(db, wf, setup=TABLE) as engine:
        run_id = await engine.start(wf)
        # Attempt 1's row rolled back with it: attempt 2 sees only its own.
        assert await engine.wait(run_id, timeout=10) == {"record": 1}
        assert await notes(engine) == ["attempt 2"]
        run = await engine.get_run(run_id, journal=True)
    assert [(a.attempt, a.error) for a in run.attempts] == [(1, "RuntimeError: after writing")]
    assert all(name.startswith("durable-sync") for name in threads), threads


async def test_the_event_loop_runs_other_runs_while_a_sync_handler_sleeps(db: Any) -> None:
    slow = durable.Workflow("slow_sync")
    order: list[str] = []
    napping = threading.Event()

    @slow.step
    def nap(ctx: durable.SyncContext) -> str:
        napping.set()
        time.sleep(1.5)  # a blocking SDK call
        order.append("slow done")
        return "slept"

    fast = durable.Workflow("fast_async")

    @fast.step
    async def one(ctx: durable.Context) -> int:
        return 1

    @fast.step
    async def two(ctx: durable.Context) -> int:
        return 2

    async with running_engine(db, slow, fast, concurrency=4) as engine:
        slow_id = await engine.start(slow)
        await until(napping.is_set)
        started = time.monotonic()
        fast_id = await engine.start(fast)
        assert await engine.wait(fast_id, timeout=10) == {"one": 1, "two": 2}
        took = time.monotonic() - started
        order.append("fast done")
        assert await engine.wait(slow_id, timeout=10) == {"nap": "slept"}
    assert order == ["fast done", "slow done"]
    assert took < 1.0, took


async def until(check: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - a flag set by a thread, not an event
            await anyio.sleep(0.01)


async def test_a_sync_step_past_its_timeout_fails_and_its_late_write_is_refused(
    db: Any,
) -> None:
    wf = durable.Workflow("sync_timeout")
    late: list[BaseException] = []
    finished = threading.Event()

    @wf.step(max_attempts=1, timeout=0.3)
    def stuck(ctx: durable.SyncContext) -> None:
        write(ctx, "early")
        time.sleep(1.0)
        try:
            write(ctx, "late")
        except BaseException as exc:
            late.append(exc)
            raise
        finally:
            finished.set()

    async with running_engine(db, wf, setup=TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
        await until(finished.is_set)
        assert await notes(engine) == []  # the early write rolled back with the attempt
    assert "timed out after 0.3 s" in (failed.value.run.error or "")
    assert len(late) == 1
    assert isinstance(late[0], asyncpg.InterfaceError)
    assert "only valid during the attempt" in str(late[0])


async def test_sync_compensators_branches_loop_bodies_and_deciders(db: Any) -> None:
    wf = durable.Workflow("sync_everywhere")

    def undo(ctx: durable.SyncContext) -> str:
        write(ctx, "undone")
        return "undone"

    @wf.step(compensate=undo)
    def reserve(ctx: durable.SyncContext) -> str:
        write(ctx, "reserved")
        return "reserved"

    def branch(ctx: durable.SyncContext) -> str:
        write(ctx, f"branch {ctx.node}")
        return ctx.node

    wf.parallel("fan", {"a": branch, "b": branch})

    def pick(ctx: durable.SyncContext) -> str:
        assert ctx.conn is not None
        picked: str = ctx.conn.fetchval("SELECT 'air'")
        return picked

    wf.route("ship", pick, {"air": branch, "ground": branch})

    def more(ctx: durable.SyncContext, i: int) -> bool:
        return i < 2

    def body(ctx: durable.SyncLoopContext) -> int:
        write(ctx, f"iteration {ctx.iteration}")
        return ctx.iteration * 10

    wf.loop("poll", more, body)
    wf.sleep("nap", lambda ctx: 0)

    @wf.step(max_attempts=1)
    def fail(ctx: durable.SyncContext) -> None:
        raise durable.NonRetryable("stop here")

    async with running_engine(db, wf, setup=TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=15)
        assert await notes(engine) == [
            "branch fan#a",
            "branch fan#b",
            "branch ship",
            "iteration 0",
            "iteration 1",
            "reserved",
            "undone",
        ]
    run = failed.value.run
    assert run.results["fan"] == {"a": "fan#a", "b": "fan#b"}
    assert run.results["ship"] == {"branch": "air", "result": "ship"}
    assert run.results["poll"] == [0, 10]
    assert run.error == "NonRetryable: stop here"


async def test_a_kept_sync_connection_raises_after_the_attempt(db: Any) -> None:
    wf = durable.Workflow("sync_kept")
    kept: list[durable.SyncConnection] = []

    @wf.step
    def keep(ctx: durable.SyncContext) -> None:
        assert ctx.conn is not None
        kept.append(ctx.conn)

    async with running_engine(db, wf) as engine:
        await engine.wait(await engine.start(wf), timeout=10)
    with pytest.raises(asyncpg.InterfaceError, match="only valid during the attempt"):
        await anyio.to_thread.run_sync(kept[0].execute, "SELECT 1")


async def test_a_swallowed_error_and_a_nested_transaction_on_the_sync_connection(
    db: Any,
) -> None:
    wf = durable.Workflow("sync_errors")

    @wf.step
    def nested(ctx: durable.SyncContext) -> str:
        assert ctx.conn is not None
        try:
            with ctx.conn.transaction():
                write(ctx, "rolled back")
                ctx.conn.execute("SELECT 1/0")
        except asyncpg.DivisionByZeroError:
            pass  # the savepoint rolled back: the transaction goes on
        write(ctx, "kept")
        return "ok"

    @wf.step(max_attempts=1)
    def swallow(ctx: durable.SyncContext) -> str:
        assert ctx.conn is not None
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            ctx.conn.execute("SELECT 1/0")  # the transaction is aborted: no commit
        return "looks fine"

    async with running_engine(db, wf, setup=TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
        assert await notes(engine) == ["kept"]
    assert (failed.value.run.error or "").startswith("SwallowedDatabaseError")
    assert failed.value.run.results == {"nested": "ok"}


async def test_the_thread_pool_is_bounded_by_engine_threads(db: Any) -> None:
    wf = durable.Workflow("sync_bounded")
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def busy(ctx: durable.SyncContext) -> None:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.1)
        with lock:
            now[0] -= 1

    wf.parallel("fan", {k: busy for k in "abcd"})

    async with running_engine(db, wf, concurrency=4, threads=2) as engine:
        assert await engine.wait(await engine.start(wf), timeout=10) == {
            "fan": dict.fromkeys("abcd")
        }
    assert peak[0] == 2


async def test_a_non_transactional_sync_step_runs_on_a_thread_without_a_connection(
    db: Any,
) -> None:
    wf = durable.Workflow("sync_detached")

    @wf.step(transactional=False)
    def call_api(ctx: durable.SyncContext) -> bool:
        return ctx.conn is None and threading.current_thread().name.startswith("durable-sync")

    async with running_engine(db, wf) as engine:
        assert await engine.wait(await engine.start(wf), timeout=10) == {"call_api": True}


async def test_a_sync_connection_used_on_the_event_loop_says_so(db: Any) -> None:
    wf = durable.Workflow("sync_misused")
    seen: list[BaseException] = []

    def wrong(ctx: durable.SyncContext) -> Any:
        async def later() -> None:
            assert ctx.conn is not None
            try:
                ctx.conn.execute("SELECT 1")  # on the loop's thread: would deadlock
            except RuntimeError as exc:
                seen.append(exc)

        return later()  # an awaitable: awaited on the event loop

    wf.step("wrong", wrong)
    async with running_engine(db, wf) as engine:
        await engine.wait(await engine.start(wf), timeout=10)
    assert "cannot be used on the event loop's own thread" in str(seen[0])
