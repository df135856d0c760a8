"""Steps: context, results, retries, backoff on the DB clock, timeouts, serialization,
non-transactional steps (SPEC, Semantics: step)."""

from __future__ import annotations

import contextlib
from datetime import datetime
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
)

import durable

COUNTER_TABLE = "CREATE TABLE calls (node text NOT NULL, attempt int NOT NULL)"


async def test_results_flow_between_steps(db: Any) -> None:
    wf = durable.Workflow("order")
    seen: list[dict[str, Any]] = []

    @wf.step
    async def reserve(ctx: durable.Context) -> dict[str, Any]:
        seen.append(dict(ctx.results))
        return {"sku": ctx.input["sku"], "qty": 2}

    @wf.step
    async def price(ctx: durable.Context) -> float:
        seen.append(dict(ctx.results))
        return ctx.results["reserve"]["qty"] * 2.5

    @wf.step
    async def invoice(ctx: durable.Context) -> str:
        seen.append(dict(ctx.results))
        return f"{ctx.results['reserve']['sku']}:{ctx.results['price']}"

    async with running_engine(db, wf) as engine:
        run_id = await engine.start("order", {"sku": "A1"})
        result = await engine.wait(run_id, timeout=10)

    assert seen == [
        {},
        {"reserve": {"sku": "A1", "qty": 2}},
        {"reserve": {"sku": "A1", "qty": 2}, "price": 5.0},
    ]
    assert result == {"reserve": {"sku": "A1", "qty": 2}, "price": 5.0, "invoice": "A1:5.0"}


async def test_results_are_read_only(db: Any) -> None:
    wf = durable.Workflow("ro")
    outcome: dict[str, str] = {}

    @wf.step
    async def a(ctx: durable.Context) -> int:
        return 1

    @wf.step
    async def b(ctx: durable.Context) -> int:
        for name, mutate in {
            "set": lambda: ctx.results.__setitem__("a", 2),  # type: ignore[index]
            "del": lambda: ctx.results.__delitem__("a"),  # type: ignore[attr-defined]
            "add": lambda: ctx.results.__setitem__("z", 3),  # type: ignore[index]
        }.items():
            try:
                mutate()
            except (TypeError, AttributeError):
                outcome[name] = "refused"
            else:
                outcome[name] = "allowed"
        with pytest.raises(AttributeError):
            ctx.results = {}  # type: ignore[misc]
        return int(ctx.results["a"])

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)

    assert outcome == {"set": "refused", "del": "refused", "add": "refused"}
    assert result == {"a": 1, "b": 1}


async def test_context_fields(db: Any) -> None:
    wf = durable.Workflow("ctx")
    seen: dict[str, Any] = {}

    @wf.step
    async def first(ctx: durable.Context) -> None:
        seen["run_id"] = ctx.run_id
        seen["workflow"] = ctx.workflow
        seen["node"] = ctx.node
        seen["attempt"] = ctx.attempt
        seen["input"] = ctx.input
        assert ctx.conn is not None
        seen["in_tx"] = ctx.conn.is_in_transaction()
        seen["query"] = await ctx.conn.fetchval("SELECT 40 + 2")
        seen["run_visible"] = await ctx.conn.fetchval(
            "SELECT status FROM durable.runs WHERE id = $1", ctx.run_id
        )

    @wf.step
    async def second(ctx: durable.Context) -> None:
        seen["second_node"] = ctx.node

    async with running_engine(db, wf) as engine:
        run_id = await engine.start("ctx", {"n": [1, 2], "s": "é"})
        await engine.wait(run_id, timeout=10)

    assert seen["run_id"] == run_id
    assert len(run_id) == 26  # a ULID string
    assert seen["workflow"] == "ctx"
    assert seen["node"] == "first"
    assert seen["second_node"] == "second"
    assert seen["attempt"] == 1
    assert seen["input"] == {"n": [1, 2], "s": "é"}
    assert seen["in_tx"] is True
    assert seen["query"] == 42
    assert seen["run_visible"] in ("pending", "running")


async def test_flaky_step_sees_attempts_1_2_3_and_completes(db: Any) -> None:
    wf = durable.Workflow("flaky")

    @wf.step(max_attempts=3, backoff=0)
    async def charge(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2)", ctx.node, ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"flaky {ctx.attempt}")
        return "charged"

    seen: list[int] = []

    @wf.step
    async def after(ctx: durable.Context) -> int:
        seen.append(ctx.attempt)
        return len(seen)

    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start("flaky", {})
        result = await engine.wait(run_id, timeout=10)
        # The failed attempts' inserts rolled back; only the committing attempt's row stays.
        rows = await fetchval(engine, "SELECT array_agg(attempt ORDER BY attempt) FROM calls")
        run = await engine.get_run(run_id, journal=True)

    assert result == {"charge": "charged", "after": 1}
    assert rows == [3]
    assert seen == [1]
    assert [(a.key, a.attempt) for a in run.attempts] == [("charge", 1), ("charge", 2)]
    assert [a.error for a in run.attempts] == ["RuntimeError: flaky 1", "RuntimeError: flaky 2"]
    entry = {e.key: e for e in run.journal}["charge"]
    assert entry.status == "completed"
    assert entry.attempts == 3
    assert entry.result == "charged"


async def test_attempts_seen_by_the_handler_through_a_list(db: Any) -> None:
    wf = durable.Workflow("flaky_list")
    attempts: list[int] = []

    @wf.step(max_attempts=4, backoff=0)
    async def work(ctx: durable.Context) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ValueError("not yet")
        return ctx.attempt

    async with running_engine(db, wf) as engine:
        result = await engine.wait(await engine.start(wf), timeout=10)
    assert attempts == [1, 2, 3]
    assert result == {"work": 3}


async def test_failing_handler_writes_roll_back_and_attempt_is_recorded(db: Any) -> None:
    wf = durable.Workflow("rollback")

    @wf.step(max_attempts=2, backoff=0)
    async def boom(ctx: durable.Context) -> None:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2)", ctx.node, ctx.attempt)
        raise RuntimeError(f"boom on attempt {ctx.attempt}")

    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        written = await fetchval(engine, "SELECT count(*) FROM calls")
        run = await engine.get_run(run_id, journal=True)

    assert written == 0
    assert [(a.key, a.attempt, a.error) for a in run.attempts] == [
        ("boom", 1, "RuntimeError: boom on attempt 1"),
        ("boom", 2, "RuntimeError: boom on attempt 2"),
    ]
    assert run.status is durable.RunStatus.FAILED
    assert run.error == "RuntimeError: boom on attempt 2"


async def test_retry_is_scheduled_on_the_db_clock_with_the_backoff(db: Any) -> None:
    wf = durable.Workflow("backoff")
    tx_starts: list[datetime] = []  # now(): the start of the attempt's transaction
    starts: list[datetime] = []  # clock_timestamp() when the handler began

    @wf.step(max_attempts=3, backoff=0.3)
    async def flaky(ctx: durable.Context) -> int:
        assert ctx.conn is not None
        tx_start, began = await ctx.conn.fetchrow("SELECT now(), clock_timestamp()")
        tx_starts.append(tx_start)
        starts.append(began)
        if ctx.attempt < 3:
            raise RuntimeError("again")
        return ctx.attempt

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"flaky": 3}
        run = await engine.get_run(run_id, journal=True)

    failed = [a for a in run.attempts if a.key == "flaky"]
    assert [a.attempt for a in failed] == [1, 2]
    assert len(starts) == 3
    # Each retry began at least the backoff after its failed attempt's transaction began
    # (both read from the database clock)...
    assert (starts[1] - tx_starts[0]).total_seconds() >= 0.3
    assert (starts[2] - tx_starts[1]).total_seconds() >= 0.3
    # (That the worker comes back for it when it is due, not at a poll, is the next tests'.)
    entry = {e.key: e for e in run.journal}["flaky"]
    assert entry.started_at is not None
    assert entry.attempts == 3
    assert (entry.started_at - failed[0].started_at).total_seconds() >= 0.6 - 0.01


async def test_backoff_is_counted_from_the_failure_not_from_the_attempt_start(db: Any) -> None:
    wf = durable.Workflow("slow_fail")
    began: list[datetime] = []

    @wf.step(max_attempts=2, backoff=0.3)
    async def slow(ctx: durable.Context) -> int:
        assert ctx.conn is not None
        began.append(await ctx.conn.fetchval("SELECT clock_timestamp()"))
        if ctx.attempt == 1:
            await anyio.sleep(0.5)  # longer than the backoff
            raise RuntimeError("slow failure")
        return ctx.attempt

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"slow": 2}
        run = await engine.get_run(run_id, journal=True)

    (failed,) = run.attempts
    assert (began[1] - failed.failed_at).total_seconds() >= 0.3


async def test_retry_runs_after_its_backoff_not_at_the_next_poll(db: Any) -> None:
    wf = durable.Workflow("prompt_retry")

    @wf.step(max_attempts=2, backoff=0.3)
    async def once(ctx: durable.Context) -> int:
        if ctx.attempt == 1:
            await anyio.sleep(0.2)  # the dispatcher looks for work while this job is locked
            raise RuntimeError("first attempt fails")
        return ctx.attempt

    # The retry is an UPDATE of the job row (no NOTIFY): the worker must still come back
    # for it when it is due. Its next poll is an hour away, so only that explains the run
    # completing within the deadline.
    async with running_engine(db, wf, poll_interval=3600.0) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=30) == {"once": 2}


async def test_non_retryable_fails_at_once_and_compensates(db: Any) -> None:
    wf = durable.Workflow("nonretry")
    calls: list[str] = []

    async def release(ctx: durable.Context) -> None:
        calls.append(f"release:{ctx.node}")

    @wf.step(compensate=release)
    async def reserve(ctx: durable.Context) -> int:
        return 1

    @wf.step(max_attempts=5, backoff=0)
    async def charge(ctx: durable.Context) -> None:
        calls.append(f"charge:{ctx.attempt}")
        raise durable.NonRetryable("card declined")

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert calls == ["charge:1", "release:reserve@compensate"]
    assert info.value.run.status is durable.RunStatus.FAILED
    assert run.error == "NonRetryable: card declined"
    assert [(a.key, a.attempt) for a in run.attempts] == [("charge", 1)]
    assert [(e.key, e.status) for e in run.journal] == [
        ("reserve", "completed"),
        ("charge", "failed"),
        ("reserve@compensate", "completed"),
    ]


async def test_a_handler_that_swallows_a_database_error_fails_its_attempt(db: Any) -> None:
    wf = durable.Workflow("swallow")
    attempts: list[int] = []

    @wf.step(max_attempts=2, backoff=0)
    async def swallow(ctx: durable.Context) -> str:
        attempts.append(ctx.attempt)
        assert ctx.conn is not None
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await ctx.conn.execute("SELECT 1 / 0")
        return "ok"

    outcome: Exception | None = None
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        try:
            await engine.wait(run_id, timeout=3)
        except (durable.RunFailed, TimeoutError) as exc:
            outcome = exc
        run = await engine.get_run(run_id, journal=True)

    if isinstance(outcome, TimeoutError):
        raise outcome  # the run is wedged: the swallowed error aborted its transaction
    assert isinstance(outcome, durable.RunFailed)
    assert "SwallowedDatabaseError" in (outcome.run.error or "")
    assert attempts == [1, 2]
    assert [(a.key, a.attempt) for a in run.attempts] == [("swallow", 1), ("swallow", 2)]


async def test_timeout_fails_a_long_attempt_and_then_retries(db: Any) -> None:
    wf = durable.Workflow("timeout")
    attempts: list[int] = []

    @wf.step(timeout=0.2, max_attempts=3, backoff=0)
    async def sometimes_slow(ctx: durable.Context) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await anyio.sleep(30)
        return ctx.attempt

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        # Within 10 s although the first attempt sleeps 30 s: the timeout cut it off.
        assert await engine.wait(run_id, timeout=10) == {"sometimes_slow": 2}
        run = await engine.get_run(run_id, journal=True)

    assert attempts == [1, 2]
    (failed,) = run.attempts
    assert failed.attempt == 1
    assert "TimeoutError" in failed.error
    assert "timed out" in failed.error


async def test_timeout_interrupting_a_query_on_ctx_conn_rolls_back_and_retries(db: Any) -> None:
    wf = durable.Workflow("timeout_sql")

    @wf.step(timeout=0.3, max_attempts=3, backoff=0)
    async def slow_sql(ctx: durable.Context) -> int:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2)", ctx.node, ctx.attempt)
        if ctx.attempt == 1:
            await ctx.conn.execute("SELECT pg_sleep(30)")
        return ctx.attempt

    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"slow_sql": 2}
        rows = await fetchval(engine, "SELECT array_agg(attempt ORDER BY attempt) FROM calls")
        run = await engine.get_run(run_id, journal=True)

    assert rows == [2]
    assert [(a.key, a.attempt) for a in run.attempts] == [("slow_sql", 1)]
    assert "timed out" in run.attempts[0].error


async def test_timeout_on_every_attempt_fails_the_run(db: Any) -> None:
    wf = durable.Workflow("always_slow")

    @wf.step(timeout=0.1, max_attempts=2, backoff=0)
    async def slow(ctx: durable.Context) -> None:
        await anyio.sleep(30)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    assert info.value.run.error is not None
    assert "timed out" in info.value.run.error


async def test_non_json_result_fails_and_its_writes_roll_back(db: Any) -> None:
    wf = durable.Workflow("bad_result")

    @wf.step
    async def produce(ctx: durable.Context) -> Any:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2)", ctx.node, ctx.attempt)
        return {"when": {1, 2, 3}}

    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        written = await fetchval(engine, "SELECT count(*) FROM calls")
        run = await engine.get_run(run_id, journal=True)

    assert written == 0
    assert run.status is durable.RunStatus.FAILED
    assert run.error is not None
    assert "SerializationError" in run.error
    assert info.value.run.error == run.error
    assert {e.key: e.status for e in run.journal} == {"produce": "failed"}


@pytest.mark.parametrize("bad", [float("nan"), object(), b"bytes"])
async def test_other_non_json_results_fail(db: Any, bad: Any) -> None:
    wf = durable.Workflow("bad_result2")

    @wf.step
    async def produce(ctx: durable.Context) -> Any:
        return [bad]

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    assert "SerializationError" in (info.value.run.error or "")


async def test_none_results_replay_as_none(db: Any) -> None:
    wf = durable.Workflow("nones")
    seen: dict[str, Any] = {}

    @wf.step
    async def nothing(ctx: durable.Context) -> None:
        return None

    @wf.step
    async def check(ctx: durable.Context) -> bool:
        seen["present"] = "nothing" in ctx.results
        seen["value"] = ctx.results["nothing"]
        return ctx.results["nothing"] is None

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id)

    assert seen == {"present": True, "value": None}
    assert result == {"nothing": None, "check": True}
    assert run.results == {"nothing": None, "check": True}


async def test_completed_run_result_is_the_mapping_of_every_node(db: Any) -> None:
    wf = durable.Workflow("mapping")
    values: dict[str, Any] = {
        "a": 1,
        "b": "two",
        "c": [1, {"x": None}],
        "d": {"nested": {"ok": True}},
        "e": None,
        "f": 2.5,
    }
    for name, value in values.items():

        async def fn(ctx: durable.Context, value: Any = value) -> Any:
            return value

        wf.step(name, fn)

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id)

    assert result == values
    assert run.result == values
    assert run.results == values
    assert run.status is durable.RunStatus.COMPLETED
    assert run.current_node is None
    assert run.error is None


async def test_non_transactional_step_has_no_conn_and_is_journaled(db: Any) -> None:
    wf = durable.Workflow("external")
    seen: dict[str, Any] = {}

    @wf.step
    async def before(ctx: durable.Context) -> int:
        return 1

    @wf.step(transactional=False)
    async def call_api(ctx: durable.Context) -> dict[str, Any]:
        seen["conn"] = ctx.conn
        seen["results"] = dict(ctx.results)
        seen["attempt"] = ctx.attempt
        await anyio.sleep(0.05)
        return {"status": 200}

    @wf.step
    async def after(ctx: durable.Context) -> Any:
        return ctx.results["call_api"]["status"]

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    assert seen == {"conn": None, "results": {"before": 1}, "attempt": 1}
    assert result == {"before": 1, "call_api": {"status": 200}, "after": 200}
    entry = {e.key: e for e in run.journal}["call_api"]
    assert entry.status == "completed"
    assert entry.result == {"status": 200}
    assert jobs == 0


async def test_non_transactional_step_retries(db: Any) -> None:
    wf = durable.Workflow("external_flaky")
    attempts: list[int] = []

    @wf.step(transactional=False, max_attempts=3, backoff=0)
    async def call_api(ctx: durable.Context) -> int:
        attempts.append(ctx.attempt)
        assert ctx.conn is None
        if ctx.attempt == 1:
            raise ConnectionRefusedError("upstream down")
        return ctx.attempt

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"call_api": 2}
        run = await engine.get_run(run_id, journal=True)

    assert attempts == [1, 2]
    assert [(a.key, a.attempt) for a in run.attempts] == [("call_api", 1)]
    assert "upstream down" in run.attempts[0].error


async def test_non_transactional_step_with_a_non_json_result_fails(db: Any) -> None:
    wf = durable.Workflow("external_bad")

    @wf.step(transactional=False)
    async def call_api(ctx: durable.Context) -> Any:
        return {1, 2}

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
    assert "SerializationError" in (info.value.run.error or "")


async def test_an_attempt_waiting_for_its_backoff_holds_no_transaction(db: Any) -> None:
    """While a retry waits for its backoff, other runs keep going on a single slot."""
    wf = durable.Workflow("parked")

    @wf.step(max_attempts=2, backoff=30)
    async def wait_long(ctx: durable.Context) -> None:
        if ctx.input.get("fail"):
            raise RuntimeError("retry later")

    async with running_engine(db, wf, concurrency=1) as engine:
        parked = await engine.start(wf, {"fail": True})
        await until_attempts(engine, parked, "wait_long", 1)
        quick = await engine.start(wf, {"fail": False})
        assert await engine.wait(quick, timeout=5) == {"wait_long": None}
        assert (await engine.get_run(parked)).status is durable.RunStatus.RUNNING


async def test_db_refuses_an_illegal_status_change(db: Any) -> None:
    wf = durable.Workflow("guard")

    @wf.step
    async def a(ctx: durable.Context) -> int:
        return 1

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        await engine.wait(run_id, timeout=10)
        with pytest.raises(asyncpg.CheckViolationError):
            await fetchval(
                engine, "UPDATE durable.runs SET status = 'running' WHERE status = 'completed'"
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await fetchval(
                engine, "UPDATE durable.runs SET status = 'pending' WHERE id = $1", run_id
            )
        assert (await engine.get_run(run_id)).status is durable.RunStatus.COMPLETED


# -- stale and duplicate jobs ----------------------------------------------------------------


def counted_workflow(name: str, *, park_second: bool) -> durable.Workflow:
    """Three steps that count their runs in `calls`; the second can park in a long backoff."""
    wf = durable.Workflow(name)

    async def count(ctx: durable.Context) -> str:
        assert ctx.conn is not None
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2)", ctx.node, ctx.attempt)
        if park_second and ctx.node == "b" and ctx.attempt == 1:
            raise RuntimeError("park in the backoff")
        return ctx.node

    wf.step("a", count)
    wf.step("b", count, max_attempts=2, backoff=30)
    wf.step("c", count)
    return wf


async def node_calls(engine: durable.Engine) -> list[tuple[str, int]]:
    rows = await fetch(engine, "SELECT node, attempt FROM calls ORDER BY node, attempt")
    return [(r["node"], r["attempt"]) for r in rows]


async def insert_job(
    engine: durable.Engine, wf: durable.Workflow, run_id: str, task: str, branch: str | None = None
) -> int:
    job_id: int = await fetchval(
        engine,
        "INSERT INTO durable.jobs (queue, task, run_id, branch) "
        "VALUES ($1, $2, $3, $4) RETURNING id",
        wf.queue,
        task,
        run_id,
        branch,
    )
    return job_id


async def gone(engine: durable.Engine, *job_ids: int) -> None:
    async def check() -> bool:
        n = await fetchval(
            engine, "SELECT count(*) FROM durable.jobs WHERE id = ANY($1)", list(job_ids)
        )
        return n == 0

    await eventually(check, timeout=10)


async def test_a_second_advance_job_is_refused_and_stray_jobs_are_no_ops(db: Any) -> None:
    """A job says only which run and what kind of work: the database refuses a second
    `advance` job for a run, and stray `compensate` or `branch` jobs for a run parked at a
    step do nothing and go."""
    wf = counted_workflow("dup", park_second=True)
    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start(wf)
        run = await until_attempts(engine, run_id, "b", 1)  # past node 0, parked at node 1
        assert run.current_node == "b"
        assert await node_calls(engine) == [("a", 1)]

        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_job(engine, wf, run_id, "advance")
        strays = [
            await insert_job(engine, wf, run_id, "compensate"),
            await insert_job(engine, wf, run_id, "branch", "x"),
        ]
        await gone(engine, *strays)
        assert await node_calls(engine) == [("a", 1)]  # step a did not run again
        assert (await engine.get_run(run_id)).current_node == "b"

        # Bring the real retry forward; the run completes with every node run once.
        await execute(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)
        await execute(engine, "UPDATE durable.runs SET wake_at = now() WHERE id = $1", run_id)
        assert await engine.wait(run_id, timeout=10) == {"a": "a", "b": "b", "c": "c"}
        assert await node_calls(engine) == [("a", 1), ("b", 2), ("c", 1)]
        assert await fetchval(engine, "SELECT count(*) FROM durable.jobs") == 0


async def test_jobs_for_a_finished_run_do_nothing(db: Any) -> None:
    wf = counted_workflow("done", park_second=False)
    async with running_engine(db, wf, setup=COUNTER_TABLE) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        before = await engine.get_run(run_id, journal=True)
        jobs = [
            await insert_job(engine, wf, run_id, "advance"),
            await insert_job(engine, wf, run_id, "branch", "x"),
            await insert_job(engine, wf, run_id, "compensate"),
        ]
        await gone(engine, *jobs)
        after = await engine.get_run(run_id, journal=True)
        assert await node_calls(engine) == [("a", 1), ("b", 1), ("c", 1)]

    assert result == {"a": "a", "b": "b", "c": "c"}
    assert after.status is durable.RunStatus.COMPLETED
    assert after.result == result
    assert after.journal == before.journal
    assert after.updated_at == before.updated_at


async def test_jobs_for_a_failed_run_do_nothing(db: Any) -> None:
    wf = durable.Workflow("failed_stale")
    calls: list[str] = []

    async def undo(ctx: durable.Context) -> None:
        calls.append("undo")

    async def ok(ctx: durable.Context) -> None:
        calls.append("ok")

    async def fail(ctx: durable.Context) -> None:
        calls.append("fail")
        raise durable.NonRetryable("x")

    wf.step("a", ok, compensate=undo).step("b", fail)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        jobs = [
            await insert_job(engine, wf, run_id, "advance"),
            await insert_job(engine, wf, run_id, "compensate"),
        ]
        await gone(engine, *jobs)
        run = await engine.get_run(run_id, journal=True)
    assert calls == ["ok", "fail", "undo"]
    assert run.status is durable.RunStatus.FAILED
    assert [e.key for e in run.journal] == ["a", "b", "a@compensate"]


# -- leases of non-transactional steps -------------------------------------------------------


async def test_heartbeat_keeps_the_lease_of_a_long_non_transactional_step(db: Any) -> None:
    """The attempt outlives its lease several times over; heartbeats keep other slots off it:
    at its end, the lease still runs (its expiry was pushed past the first one)."""
    wf = durable.Workflow("long_call")
    attempts: list[int] = []
    leases: list[tuple[Any, Any]] = []  # (expiry, database clock) at the attempt's end
    engines: list[durable.Engine] = []

    @wf.step(transactional=False, max_attempts=3, backoff=0)
    async def call(ctx: durable.Context) -> int:
        attempts.append(ctx.attempt)
        await anyio.sleep(1.5)
        row = await fetch(
            engines[0],
            "SELECT run_at, now() FROM durable.jobs WHERE run_id = $1 AND lease_token IS NOT NULL",
            ctx.run_id,
        )
        leases.extend((r[0], r[1]) for r in row)
        return ctx.attempt

    async with running_engine(db, wf, concurrency=4, lease_seconds=0.6) as engine:
        engines.append(engine)
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"call": 1}
        run = await engine.get_run(run_id, journal=True)

    # 1.5 s into a 0.6 s lease, the job is still leased to this attempt, until later: no
    # other slot could have claimed it (a claim needs run_at <= now).
    ((expiry, now),) = leases
    assert expiry > now
    assert attempts == [1]
    assert run.attempts == ()


async def test_a_lapsed_lease_is_retried_by_another_worker(db: Any) -> None:
    """A worker that dies mid-attempt leaves a lease; once it lapses, the next worker runs the
    next attempt (at-least-once) and records the lost one."""
    wf = durable.Workflow("lost_call")
    attempts: list[int] = []
    started = anyio.Event()

    @wf.step(transactional=False, max_attempts=3, backoff=0)
    async def call(ctx: durable.Context) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            started.set()
            await anyio.sleep(30)  # the worker is stopped (killed) while we are here
        return ctx.attempt

    async with open_engine(db, wf, lease_seconds=0.5) as engine:
        async with engine.worker(concurrency=2, poll_interval=0.05, grace_period=0):
            run_id = await engine.start(wf)
            with anyio.fail_after(10):
                await started.wait()
        # The first worker is gone; its attempt never settled.
        assert (await engine.get_run(run_id)).status is durable.RunStatus.RUNNING
        async with engine.worker(concurrency=2, poll_interval=0.05, grace_period=2):
            assert await engine.wait(run_id, timeout=10) == {"call": 2}
        run = await engine.get_run(run_id, journal=True)

    assert attempts == [1, 2]
    ((key, attempt, error),) = [(a.key, a.attempt, a.error) for a in run.attempts]
    assert (key, attempt) == ("call", 1)
    assert "lease" in error
