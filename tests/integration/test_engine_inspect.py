"""Inspecting and awaiting runs: get_run (with journal), list_runs, wait."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
import asyncpg
import pytest
from helpers import eventually, fetchval, open_engine, running_engine, until_attempts

import durable
import durable.waiting

UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
HOUR = 3600.0


@pytest.fixture
def no_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Engine.wait` re-reads its run once an hour instead of every few seconds, so that
    only a notification can wake it within a test's deadline."""
    monkeypatch.setattr(durable.waiting, "_WAIT_RECHECK", HOUR)


def reading(engine: durable.Engine, read: anyio.Event) -> None:
    """Set `read` when `engine.wait` has read its run (and so waits for a notification)."""
    fetch_run = engine._fetch_run

    async def spy(run_id: str, *, primary: bool, journal: bool = False) -> durable.Run:
        run = await fetch_run(run_id, primary=primary, journal=journal)
        read.set()
        return run

    engine._fetch_run = spy  # type: ignore[method-assign]


async def until_watched(engine: durable.Engine, run_id: str) -> None:
    """Wait until someone is in `Engine.wait` for the run (its `watched` flag is set)."""

    async def check() -> bool:
        return bool(
            await fetchval(engine, "SELECT watched FROM durable.runs WHERE id = $1", run_id)
        )

    await eventually(check)


def simple(name: str, *, fail: bool = False) -> durable.Workflow:
    wf = durable.Workflow(name)

    async def work(ctx: durable.Context) -> Any:
        if fail:
            raise durable.NonRetryable(f"{name} failed")
        return {"echo": ctx.input}

    wf.step("work", work)
    return wf


async def test_get_run_of_an_unknown_id(db: Any) -> None:
    async with open_engine(db, simple("w")) as engine:
        with pytest.raises(durable.RunNotFound):
            await engine.get_run(UNKNOWN)
        with pytest.raises(durable.RunNotFound):
            await engine.get_run(UNKNOWN, journal=True)
        with pytest.raises(durable.RunNotFound):
            await engine.get_run("not-even-a-ulid")


async def test_get_run_of_a_completed_run(db: Any) -> None:
    wf = durable.Workflow("two")

    @wf.step(max_attempts=2, backoff=0)
    async def a(ctx: durable.Context) -> int:
        if ctx.attempt == 1:
            raise ValueError("first try")
        return 1

    @wf.step
    async def b(ctx: durable.Context) -> dict[str, int]:
        return {"b": ctx.results["a"] + 1}

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, {"k": "v"})
        await engine.wait(run_id, timeout=10)
        plain = await engine.get_run(run_id)
        full = await engine.get_run(run_id, journal=True)

    assert isinstance(plain, durable.Run)
    assert plain.id == run_id
    assert plain.workflow == "two"
    assert plain.status is durable.RunStatus.COMPLETED
    assert plain.status == "completed"
    assert plain.input == {"k": "v"}
    assert plain.results == {"a": 1, "b": {"b": 2}}
    assert plain.result == {"a": 1, "b": {"b": 2}}
    assert plain.error is None
    assert plain.current_node is None
    assert plain.parent_id is None
    assert plain.created_at <= plain.updated_at
    assert plain.finished_at is not None
    assert plain.journal == ()
    assert plain.attempts == ()

    assert [(e.key, e.node, e.status, e.result, e.error, e.attempts) for e in full.journal] == [
        ("a", "a", "completed", 1, None, 2),
        ("b", "b", "completed", {"b": 2}, None, 1),
    ]
    assert all(isinstance(e, durable.JournalEntry) for e in full.journal)
    (failed,) = full.attempts
    assert isinstance(failed, durable.Attempt)
    assert (failed.key, failed.attempt, failed.error) == ("a", 1, "ValueError: first try")
    assert full.journal[0].finished_at <= full.journal[1].finished_at


async def test_timeline_timestamps_are_ordered(db: Any) -> None:
    wf = durable.Workflow("timeline")

    @wf.step(max_attempts=2, backoff=0)
    async def slow(ctx: durable.Context) -> int:
        await anyio.sleep(0.05)
        if ctx.attempt == 1:
            raise RuntimeError("slow failure")
        return 1

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    (attempt,) = run.attempts
    assert attempt.started_at is not None
    assert attempt.started_at <= attempt.failed_at
    (entry,) = run.journal
    assert entry.started_at is not None
    assert entry.started_at <= entry.finished_at
    assert attempt.failed_at <= entry.started_at


async def test_list_runs_filters_by_status_workflow_and_limit_newest_first(db: Any) -> None:
    ok, bad = simple("ok"), simple("bad", fail=True)
    async with running_engine(db, ok, bad) as engine:
        started: list[str] = []
        for i in range(3):
            started.append(await engine.start(ok, {"i": i}))
            started.append(await engine.start(bad, {"i": i}))
        for run_id in started:
            with (
                pytest.raises(durable.RunFailed)
                if run_id in started[1::2]
                else contextlib.nullcontext()
            ):
                await engine.wait(run_id, timeout=10)

        everything = await engine.list_runs()
        failed = await engine.list_runs(status="failed")
        failed_enum = await engine.list_runs(status=durable.RunStatus.FAILED)
        completed_ok = await engine.list_runs(status="completed", workflow="ok")
        of_ok = await engine.list_runs(workflow="ok")
        bad_completed = await engine.list_runs(status="completed", workflow="bad")
        newest_two = await engine.list_runs(limit=2)
        pending = await engine.list_runs(status="pending")
        unknown = await engine.list_runs(workflow="nope")

    newest_first = list(reversed(started))
    assert [r.id for r in everything] == newest_first
    assert [r.id for r in failed] == newest_first[0::2]
    assert [r.id for r in failed_enum] == [r.id for r in failed]
    assert all(r.status is durable.RunStatus.FAILED and r.workflow == "bad" for r in failed)
    assert all(r.error == "NonRetryable: bad failed" for r in failed)
    assert [r.id for r in completed_ok] == newest_first[1::2]
    assert [r.id for r in of_ok] == newest_first[1::2]
    assert [r.result for r in completed_ok] == [{"work": {"echo": {"i": i}}} for i in (2, 1, 0)]
    assert bad_completed == []
    assert [r.id for r in newest_two] == newest_first[:2]
    assert pending == []
    assert unknown == []
    assert all(isinstance(r, durable.Run) for r in everything)


async def test_list_runs_rejects_bad_arguments(db: Any) -> None:
    async with open_engine(db, simple("w")) as engine:
        with pytest.raises(ValueError, match="nonsense"):
            await engine.list_runs(status="nonsense")
        with pytest.raises(ValueError, match="limit"):
            await engine.list_runs(limit=0)
        assert await engine.list_runs() == []


async def test_list_runs_default_limit_is_50(db: Any) -> None:
    wf = simple("many")
    async with open_engine(db, wf) as engine:
        async with engine.pool.acquire() as conn, conn.transaction():
            ids = [await engine.start(wf, {"i": i}, conn=conn) for i in range(55)]
        runs = await engine.list_runs()
        assert len(runs) == 50
        assert [r.id for r in runs] == list(reversed(ids))[:50]
        assert len(await engine.list_runs(limit=100)) == 55
        assert all(r.status is durable.RunStatus.PENDING for r in runs)


async def test_wait_returns_the_result(db: Any) -> None:
    wf = simple("w")
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, {"x": 1})
        assert await engine.wait(run_id, timeout=10) == {"work": {"echo": {"x": 1}}}
        # Waiting again on a finished run returns at once.
        with anyio.fail_after(1):
            assert await engine.wait(run_id) == {"work": {"echo": {"x": 1}}}


async def test_wait_raises_run_failed_carrying_the_run(db: Any) -> None:
    wf = simple("w", fail=True)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    run = info.value.run
    assert isinstance(run, durable.Run)
    assert run.id == run_id
    assert run.status is durable.RunStatus.FAILED
    assert run.error == "NonRetryable: w failed"
    assert run_id in str(info.value)
    assert isinstance(info.value, durable.DurableError)


async def test_wait_raises_run_cancelled(db: Any) -> None:
    wf = durable.Workflow("slow")

    @wf.step(max_attempts=2, backoff=30)
    async def parked(ctx: durable.Context) -> None:
        raise RuntimeError("wait for the retry")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await until_attempts(engine, run_id, "parked", 1)
        async with anyio.create_task_group() as tg:
            outcome: list[BaseException] = []

            async def waiter() -> None:
                try:
                    await engine.wait(run_id, timeout=10)
                except durable.DurableError as exc:
                    outcome.append(exc)

            tg.start_soon(waiter)
            await until_watched(engine, run_id)  # the waiter is in wait()
            assert await engine.cancel(run_id) is True
    (exc,) = outcome
    assert isinstance(exc, durable.RunCancelled)
    assert exc.run.id == run_id
    assert exc.run.status is durable.RunStatus.CANCELLED


async def test_wait_times_out(db: Any) -> None:
    wf = simple("w")
    async with open_engine(db, wf) as engine:  # no worker: the run stays pending
        run_id = await engine.start(wf)
        began = time.monotonic()
        with anyio.fail_after(30), pytest.raises(TimeoutError):
            await engine.wait(run_id, timeout=0.3)
        assert time.monotonic() - began >= 0.25  # it waited for its timeout, not less
        assert (await engine.get_run(run_id)).status is durable.RunStatus.PENDING


async def test_wait_for_an_unknown_run(db: Any) -> None:
    async with open_engine(db, simple("w")) as engine:
        with anyio.fail_after(5), pytest.raises(durable.RunNotFound):
            await engine.wait(UNKNOWN, timeout=3)


async def test_wait_is_woken_by_the_runs_final_transaction(db: Any, no_polls: None) -> None:
    """The run finishes only once its waiter has read it and waits. Nothing but the run's
    final transaction can wake that waiter within the deadline: the worker polls once an
    hour and `wait` re-reads the run once an hour (`no_polls`)."""
    wf = durable.Workflow("prompt")
    read = anyio.Event()

    @wf.step
    async def work(ctx: durable.Context) -> str:
        with anyio.fail_after(10):
            await read.wait()
        return "done"

    async with running_engine(db, wf, poll_interval=HOUR) as engine:
        reading(engine, read)
        run_id = await engine.start(wf)
        with anyio.fail_after(30):
            assert await engine.wait(run_id, timeout=None) == {"work": "done"}


async def test_many_waiters_on_one_run(db: Any) -> None:
    wf = durable.Workflow("shared")

    @wf.step
    async def work(ctx: durable.Context) -> int:
        await anyio.sleep(0.2)
        return 7

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        results: list[Any] = []

        async def waiter() -> None:
            results.append(await engine.wait(run_id, timeout=10))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(waiter)
    assert results == [{"work": 7}] * 5


async def test_engine_with_a_pool_waits_promptly(db: Any, no_polls: None) -> None:
    """An engine on a caller's pool listens too: its waiter is woken by the run's final
    transaction (no poll or re-read could do it within the deadline, see `no_polls`)."""
    wf = durable.Workflow("pooled")
    read = anyio.Event()

    @wf.step
    async def work(ctx: durable.Context) -> int:
        with anyio.fail_after(10):
            await read.wait()
        return 1

    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=10)
    assert pool is not None
    try:
        engine = durable.Engine(pool=pool, workflows=[wf])
        async with engine, engine.worker(concurrency=2, poll_interval=HOUR, grace_period=2):
            reading(engine, read)
            run_id = await engine.start(wf)
            with anyio.fail_after(30):
                assert await engine.wait(run_id, timeout=None) == {"work": 1}
    finally:
        await pool.close()


@pytest.mark.parametrize("pooled", [False, True], ids=["dsn", "pool"])
async def test_wait_listens_again_after_losing_its_listener(
    db: Any, monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    """The LISTEN connection dies (a terminated backend, a failover) while wait() waits:
    wait() listens again and re-reads the run, so the run's final NOTIFY still wakes it.
    Without that only the periodic re-check (made an hour here) would."""
    monkeypatch.setattr("durable.waiting._WAIT_RECHECK", 3600.0)
    wf = durable.Workflow("relisten")
    wf.wait_for_signal("go", "go")
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=12) if pooled else None
    engine = (
        durable.Engine(pool=pool, workflows=[wf])
        if pool
        else durable.Engine(db.dsn, workflows=[wf])
    )
    try:
        async with engine, engine.worker(concurrency=2, poll_interval=0.05, grace_period=2):
            run_id = await engine.start(wf)
            outcome: list[Any] = []

            async def waiter() -> None:
                outcome.append(await engine.wait(run_id, timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                listen_sql = f"LISTEN %{engine.queries.schema}_runs%"

                async def listener(besides: int | None = None) -> int | None:
                    pid: int | None = await engine.pool.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND query ILIKE $1 AND pid IS DISTINCT FROM $2",
                        listen_sql,
                        besides,
                    )
                    return pid

                old = await eventually(listener)
                assert await engine.pool.fetchval("SELECT pg_terminate_backend($1)", old)
                await eventually(lambda: listener(besides=old))  # listening again
                sent = time.monotonic()
                assert await engine.signal(run_id, "go", {"ok": 1})
            assert outcome == [{"go": {"ok": 1}}]
            assert time.monotonic() - sent < 5
    finally:
        if pool is not None:
            await pool.close()
