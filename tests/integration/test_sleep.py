"""Sleep and sleep_until: the wake time is computed once on the database clock and stored,
the run is parked without a job due or a worker slot held, and an early delivery re-parks
(SPEC, Semantics: sleep / sleep_until; seed defect 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import eventually, execute, fetch, fetchval, open_engine, running_engine

import durable

COMP_TABLE = "CREATE TABLE comp (key text NOT NULL)"


async def _parked(engine: durable.Engine, run_id: str, node: str) -> Any:
    """Wait until the run is `waiting` at `node`; return its runs row."""

    async def check() -> Any:
        rows = await fetch(
            engine,
            "SELECT status, current_node, wake_at, waiting_for FROM durable.runs WHERE id = $1",
            run_id,
        )
        row = rows[0]
        return row if row["status"] == "waiting" and row["current_node"] == node else None

    return await eventually(check, timeout=10)


async def _jobs(engine: durable.Engine, run_id: str) -> list[Any]:
    return await fetch(
        engine,
        "SELECT id, task, run_at, run_at <= now() AS due FROM durable.jobs WHERE run_id = $1",
        run_id,
    )


async def _journal_row(engine: durable.Engine, run_id: str, key: str) -> Any:
    rows = await fetch(
        engine,
        "SELECT key, status, result, finished_at FROM durable.journal "
        "WHERE run_id = $1 AND key = $2",
        run_id,
        key,
    )
    assert len(rows) == 1, (key, rows)
    return rows[0]


async def test_wake_time_is_computed_once_on_the_db_clock_and_an_early_job_reparks(
    db: Any,
) -> None:
    calls: list[dict[str, Any]] = []

    def seconds(ctx: durable.Context) -> float:
        calls.append(dict(ctx.results))
        return 2.0

    wf = durable.Workflow("napper")

    @wf.step
    async def before(ctx: durable.Context) -> str:
        return "b"

    wf.sleep("nap", seconds)

    @wf.step
    async def after(ctx: durable.Context) -> str:
        return "a"

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf)
        row = await _parked(engine, run_id, "nap")
        wake_at: datetime = row["wake_at"]
        assert wake_at is not None
        assert row["waiting_for"] is None
        parked_at = (await _journal_row(engine, run_id, "before"))["finished_at"]
        # Computed from the DB clock when the node was first visited: 2 s after `before`.
        assert timedelta(seconds=1.95) <= wake_at - parked_at <= timedelta(seconds=2.5)
        db_now: datetime = await fetchval(engine, "SELECT clock_timestamp()")
        assert db_now < wake_at

        jobs = await _jobs(engine, run_id)
        assert [(j["task"], j["run_at"], j["due"]) for j in jobs] == [("advance", wake_at, False)]
        assert (
            await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE run_at <= now()") == 0
        )

        # Deliver the job early by hand: the node re-parks at the stored wake time.
        await execute(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)

        async def reparked() -> bool:
            jobs = await _jobs(engine, run_id)
            return len(jobs) == 1 and jobs[0]["run_at"] == wake_at

        await eventually(reparked, timeout=5)
        run = await engine.get_run(run_id, journal=True)
        assert run.status is durable.RunStatus.WAITING
        assert run.current_node == "nap"
        assert [e.key for e in run.journal] == ["before"]
        assert await fetchval(engine, "SELECT wake_at FROM durable.runs WHERE id = $1", run_id) == (
            wake_at
        )
        assert await fetchval(engine, "SELECT now() < $1::timestamptz", wake_at)

        result = await engine.wait(run_id, timeout=10)
        nap = await _journal_row(engine, run_id, "nap")

    assert result == {"before": "b", "nap": None, "after": "a"}
    assert len(calls) == 1, "the sleep duration must be computed once"
    assert calls == [{"before": "b"}]
    assert nap["status"] == "completed"
    assert nap["finished_at"] >= wake_at
    final = await _final_row(db, run_id)
    assert final["wake_at"] is None
    assert final["jobs"] == 0


async def _final_row(db: Any, run_id: str) -> Any:
    async with open_engine(db) as engine:
        rows = await fetch(
            engine,
            "SELECT wake_at, waiting_for, (SELECT count(*) FROM durable.jobs) AS jobs "
            "FROM durable.runs WHERE id = $1",
            run_id,
        )
    return rows[0]


async def test_sleep_seconds_from_sync_and_async_functions_of_ctx(db: Any) -> None:
    seen: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def first(ctx: durable.Context) -> float:
        seen.append(("first", dict(ctx.input), dict(ctx.results)))
        return float(ctx.input["first"])

    async def second(ctx: durable.Context) -> float:
        seen.append(("second", dict(ctx.input), dict(ctx.results)))
        await anyio.lowlevel.checkpoint()
        return float(ctx.results["plan"]["second"])

    wf = durable.Workflow("napper2")

    @wf.step
    async def plan(ctx: durable.Context) -> dict[str, float]:
        return {"second": 0.7}

    wf.sleep("nap1", first)
    wf.sleep("nap2", second)

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        run_id = await engine.start(wf, {"first": 0.6})
        row1 = await _parked(engine, run_id, "nap1")
        plan_done = (await _journal_row(engine, run_id, "plan"))["finished_at"]
        row2 = await _parked(engine, run_id, "nap2")
        nap1 = await _journal_row(engine, run_id, "nap1")
        result = await engine.wait(run_id, timeout=10)
        nap2 = await _journal_row(engine, run_id, "nap2")

    assert result == {"plan": {"second": 0.7}, "nap1": None, "nap2": None}
    assert seen == [
        ("first", {"first": 0.6}, {"plan": {"second": 0.7}}),
        ("second", {"first": 0.6}, {"plan": {"second": 0.7}, "nap1": None}),
    ]
    assert timedelta(seconds=0.55) <= row1["wake_at"] - plan_done <= timedelta(seconds=1.0)
    assert nap1["finished_at"] >= row1["wake_at"]
    assert (
        timedelta(seconds=0.65) <= row2["wake_at"] - nap1["finished_at"] <= timedelta(seconds=1.1)
    )
    assert nap2["finished_at"] >= row2["wake_at"]


async def test_sleep_until_an_aware_datetime_and_a_function(db: Any) -> None:
    plus5 = timezone(timedelta(hours=5))
    target = (datetime.now(UTC) + timedelta(seconds=0.8)).astimezone(plus5)
    seen: list[dict[str, Any]] = []

    async def until(ctx: durable.Context) -> datetime:
        seen.append(dict(ctx.results))
        return datetime.fromisoformat(ctx.input["until"])

    wf = durable.Workflow("until")
    wf.sleep_until("fixed", target)
    wf.sleep_until("computed", until)
    wf.sleep_until("past", lambda ctx: datetime(2000, 1, 1, tzinfo=UTC))

    async with running_engine(db, wf, poll_interval=0.05) as engine:
        second = await fetchval(engine, "SELECT clock_timestamp() + interval '1.5 seconds'")
        run_id = await engine.start(wf, {"until": second.isoformat()})
        row1 = await _parked(engine, run_id, "fixed")
        row2 = await _parked(engine, run_id, "computed")
        fixed = await _journal_row(engine, run_id, "fixed")
        result = await engine.wait(run_id, timeout=10)
        computed = await _journal_row(engine, run_id, "computed")
        past = await _journal_row(engine, run_id, "past")

    assert result == {"fixed": None, "computed": None, "past": None}
    assert row1["wake_at"] == target  # the same instant, whatever the time zone
    assert fixed["finished_at"] >= target
    assert row2["wake_at"] == second
    assert computed["finished_at"] >= second
    assert seen == [{"fixed": None}]
    # A moment already past completes at once, without parking.
    assert past["finished_at"] - computed["finished_at"] < timedelta(seconds=0.5)


async def test_sleep_until_a_naive_datetime_fails_the_node_with_a_clear_error(db: Any) -> None:
    wf0 = durable.Workflow("naive_literal")
    with pytest.raises(durable.DefinitionError, match="aware datetime"):
        wf0.sleep_until("when", datetime(2030, 1, 1))

    async def undo(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO comp VALUES ($1)", ctx.node)

    wf = durable.Workflow("naive")

    @wf.step(compensate=undo)
    async def book(ctx: durable.Context) -> str:
        return "booked"

    async def naive(ctx: durable.Context) -> datetime:
        return datetime(2030, 1, 1, 12, 0)

    wf.sleep_until("deadline", naive)

    @wf.step
    async def never(ctx: durable.Context) -> None:
        raise AssertionError("must not run")

    async with running_engine(db, wf, setup=COMP_TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    run = await _run(db, run_id)
    assert run.status is durable.RunStatus.FAILED
    assert run.error is not None
    assert "aware datetime" in run.error, run.error
    assert "deadline" in run.error, run.error
    assert info.value.run.error == run.error
    assert [(e.key, e.status) for e in run.journal] == [
        ("book", "completed"),
        ("deadline", "failed"),
        ("book@compensate", "completed"),
    ]
    assert comp == ["book@compensate"]
    assert jobs == 0


async def test_sleep_with_a_bad_computed_duration_fails_the_node(db: Any) -> None:
    wf = durable.Workflow("badnap")
    wf.sleep("nap", lambda ctx: -1)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    error = info.value.run.error or ""
    assert "nap" in error
    assert "-1" in error


async def test_a_sleeping_run_holds_no_worker_slot(db: Any) -> None:
    sleeper = durable.Workflow("sleeper")
    sleeper.sleep("long", 3600)
    quick = durable.Workflow("quick")

    @quick.step
    async def only(ctx: durable.Context) -> int:
        return 1

    async with running_engine(db, sleeper, quick, concurrency=1, poll_interval=0.05) as engine:
        sleeping = [await engine.start(sleeper) for _ in range(3)]
        for run_id in sleeping:
            await _parked(engine, run_id, "long")
        # One slot and three runs asleep for an hour: the quick runs complete only if no
        # sleeper holds the slot.
        quick_ids = [await engine.start(quick) for _ in range(5)]
        for run_id in quick_ids:
            assert await engine.wait(run_id, timeout=10) == {"only": 1}
        statuses = {(await engine.get_run(r)).status for r in sleeping}
    assert statuses == {durable.RunStatus.WAITING}


async def test_sleep_zero_completes_without_parking(db: Any) -> None:
    wf = durable.Workflow("nonap")
    wf.sleep("nap", 0)

    @wf.step
    async def after(ctx: durable.Context) -> str:
        return "done"

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=5) == {"nap": None, "after": "done"}


async def _run(db: Any, run_id: str) -> durable.Run:
    async with open_engine(db) as engine:
        return await engine.get_run(run_id, journal=True)
