"""Route and loop: the route's choice is journaled once and reused by retries; every loop
iteration commits its own journal row with its own retry budget, the condition is checked
before max_iterations, and the run never parks between iterations
(SPEC, Semantics: route, loop; seed defects 5 and 6)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import fetch, fetchval, running_engine

import durable

TABLES = """
CREATE TABLE calls (run_id text NOT NULL, what text NOT NULL, attempt int NOT NULL);
CREATE TABLE comp (key text NOT NULL);
"""


async def _undo(ctx: durable.Context) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO comp VALUES ($1)", ctx.node)


# -- route -----------------------------------------------------------------------------------


def _flaky(name: str, counter: Counter[str], fail_times: int) -> Any:
    async def handler(ctx: durable.Context) -> dict[str, Any]:
        counter[name] += 1
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO calls VALUES ($1, $2, $3)", ctx.run_id, name, ctx.attempt
        )
        if ctx.attempt <= fail_times:
            raise RuntimeError(f"{name} failed attempt {ctx.attempt}")
        return {"via": name, "attempt": ctx.attempt}

    handler.__name__ = name
    return handler


async def test_the_route_decision_is_journaled_once_and_reused_by_retries(db: Any) -> None:
    counter: Counter[str] = Counter()
    choices = iter(["ground", "air", "sea", "ground", "air"])
    selected: list[str] = []

    def select(ctx: durable.Context) -> str:
        choice = next(choices)  # a different branch on every call
        selected.append(choice)
        return choice

    wf = durable.Workflow("ship")
    wf.route(
        "ship",
        select,
        {
            "ground": _flaky("ground", counter, 2),
            "air": _flaky("air", counter, 2),
            "sea": _flaky("sea", counter, 2),
        },
        max_attempts=3,
        backoff=0,
    )

    @wf.step
    async def after(ctx: durable.Context) -> Any:
        return ctx.results["ship"]

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        calls = await fetch(engine, "SELECT what, attempt FROM calls ORDER BY attempt")
        decisions = await fetchval(
            engine, "SELECT count(*) FROM durable.journal WHERE key = 'ship@route'"
        )

    expected = {"branch": "ground", "result": {"via": "ground", "attempt": 3}}
    assert result == {"ship": expected, "after": expected}
    assert selected == ["ground"], "select must be evaluated once"
    assert counter == {"ground": 3}
    assert [tuple(r) for r in calls] == [("ground", 3)]  # failed attempts rolled back
    assert decisions == 1
    journal = [(e.key, e.status, e.result) for e in run.journal]
    assert journal == [
        ("ship@route", "completed", "ground"),
        ("ship", "completed", expected),
        ("after", "completed", expected),
    ]
    assert [(a.key, a.attempt) for a in run.attempts] == [("ship", 1), ("ship", 2)]
    assert "ship@route" not in run.results


async def test_an_async_select_and_the_branch_context(db: Any) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def select(ctx: durable.Context) -> str:
        await anyio.lowlevel.checkpoint()
        return str(ctx.input["mode"])

    async def fast(ctx: durable.Context) -> str:
        seen.append((ctx.node, dict(ctx.results)))
        return "fast!"

    async def slow(ctx: durable.Context) -> str:
        return "slow"

    wf = durable.Workflow("routed")

    @wf.step
    async def first(ctx: durable.Context) -> int:
        return 1

    wf.route("pick", select, {"fast": fast, "slow": slow})

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, {"mode": "fast"})
        result = await engine.wait(run_id, timeout=10)

    assert result == {"first": 1, "pick": {"branch": "fast", "result": "fast!"}}
    assert seen == [("pick", {"first": 1})]


async def test_an_unknown_route_key_fails_the_node_listing_the_known_branches(db: Any) -> None:
    async def a(ctx: durable.Context) -> None:
        raise AssertionError("must not run")

    wf = durable.Workflow("lost")

    @wf.step(compensate=_undo)
    async def prepare(ctx: durable.Context) -> str:
        return "ready"

    wf.route("pick", lambda ctx: "teleport", {"ground": a, "air": a})

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        run = await engine.get_run(run_id, journal=True)

    error = info.value.run.error or ""
    assert "'teleport'" in error
    assert "'ground'" in error
    assert "'air'" in error
    assert [(e.key, e.status) for e in run.journal] == [
        ("prepare", "completed"),
        ("pick", "failed"),
        ("prepare@compensate", "completed"),
    ]
    assert comp == ["prepare@compensate"]


# -- loop ------------------------------------------------------------------------------------


async def test_each_iteration_commits_its_own_row_and_sees_the_results_so_far(db: Any) -> None:
    cond_seen: list[tuple[int, Any, list[Any]]] = []
    body_seen: list[tuple[int, Any, int]] = []
    in_iteration_1 = asyncio.Event()
    release = asyncio.Event()

    def condition(ctx: durable.Context, i: int) -> bool:
        cond_seen.append((i, ctx.node, list(ctx.results["lp"])))
        return i < ctx.input["n"]

    async def body(ctx: durable.LoopContext) -> dict[str, Any]:
        body_seen.append((ctx.iteration, list(ctx.results["lp"]), ctx.attempt))
        assert ctx.results["before"] == "b"
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO calls VALUES ($1, $2, $3)", ctx.run_id, f"lp#{ctx.iteration}", ctx.attempt
        )
        if ctx.iteration == 1:
            in_iteration_1.set()
            with anyio.fail_after(10):
                await release.wait()
        return {"i": ctx.iteration, "sq": ctx.iteration**2}

    wf = durable.Workflow("looper")

    @wf.step
    async def before(ctx: durable.Context) -> str:
        return "b"

    wf.loop("lp", condition, body, max_iterations=10)

    @wf.step
    async def after(ctx: durable.Context) -> Any:
        return ctx.results["lp"]

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf, {"n": 3})
        with anyio.fail_after(10):
            await in_iteration_1.wait()
        # Iteration 0 is committed while iteration 1 is still in flight.
        mid = await fetch(
            engine,
            "SELECT key, result FROM durable.journal WHERE run_id = $1 ORDER BY seq",
            run_id,
        )
        mid_calls = await fetch(engine, "SELECT what FROM calls")
        mid_run = await engine.get_run(run_id)
        release.set()
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)

    assert [r["key"] for r in mid] == ["before", "lp#0"]
    assert [r["what"] for r in mid_calls] == ["lp#0"]
    assert mid_run.status is durable.RunStatus.RUNNING
    assert mid_run.current_node == "lp"
    assert "lp" not in mid_run.results

    r = [{"i": i, "sq": i * i} for i in range(3)]
    assert result == {"before": "b", "lp": r, "after": r}
    assert cond_seen == [(0, "lp", []), (1, "lp", r[:1]), (2, "lp", r[:2]), (3, "lp", r)]
    assert body_seen == [(0, [], 1), (1, r[:1], 1), (2, r[:2], 1)]
    assert [(e.key, e.result) for e in run.journal] == [
        ("before", "b"),
        ("lp#0", r[0]),
        ("lp#1", r[1]),
        ("lp#2", r[2]),
        ("lp", r),
        ("after", r),
    ]
    finished = [e.finished_at for e in run.journal]
    assert finished == sorted(finished)


async def test_each_iteration_has_its_own_retry_budget(db: Any) -> None:
    counter: Counter[int] = Counter()

    async def body(ctx: durable.LoopContext) -> int:
        counter[ctx.iteration] += 1
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO calls VALUES ($1, $2, $3)", ctx.run_id, f"lp#{ctx.iteration}", ctx.attempt
        )
        if ctx.iteration in (1, 2) and ctx.attempt < 3:
            raise RuntimeError(f"iteration {ctx.iteration} attempt {ctx.attempt} failed")
        return ctx.iteration * 10

    wf = durable.Workflow("budget")
    wf.loop("lp", lambda ctx, i: i < 4, body, max_attempts=3, backoff=0)

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        calls = await fetch(engine, "SELECT what, attempt FROM calls ORDER BY what")

    assert result == {"lp": [0, 10, 20, 30]}
    # Only the failing iteration re-ran, each within its own budget of 3 attempts.
    assert counter == {0: 1, 1: 3, 2: 3, 3: 1}
    assert [tuple(c) for c in calls] == [("lp#0", 1), ("lp#1", 3), ("lp#2", 3), ("lp#3", 1)]
    assert [(a.key, a.attempt) for a in run.attempts] == [
        ("lp#1", 1),
        ("lp#1", 2),
        ("lp#2", 1),
        ("lp#2", 2),
    ]
    assert [(e.key, e.attempts) for e in run.journal] == [
        ("lp#0", 1),
        ("lp#1", 3),
        ("lp#2", 3),
        ("lp#3", 1),
        ("lp", 1),
    ]


async def test_an_iteration_that_exhausts_its_attempts_fails_the_loop(db: Any) -> None:
    async def body(ctx: durable.LoopContext) -> int:
        if ctx.iteration == 1:
            raise RuntimeError("iteration 1 is broken")
        return ctx.iteration

    wf = durable.Workflow("broken")

    @wf.step(compensate=_undo)
    async def s1(ctx: durable.Context) -> str:
        return "s1"

    wf.loop("lp", lambda ctx, i: i < 5, body, max_attempts=2, backoff=0)

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]

    assert "iteration 1 is broken" in (run.error or "")
    assert [(e.key, e.status) for e in run.journal] == [
        ("s1", "completed"),
        ("lp#0", "completed"),
        ("lp", "failed"),
        ("s1@compensate", "completed"),
    ]
    assert [(a.key, a.attempt) for a in run.attempts] == [("lp#1", 1), ("lp#1", 2)]
    assert comp == ["s1@compensate"]


async def test_a_loop_ending_exactly_at_max_iterations_completes(db: Any) -> None:
    async def body(ctx: durable.LoopContext) -> int:
        return ctx.iteration

    wf = durable.Workflow("exact")
    wf.loop("lp", lambda ctx, i: i < 3, body, max_iterations=3)
    empty = durable.Workflow("empty")
    empty.loop("lp", lambda ctx, i: False, body, max_iterations=0)

    async with running_engine(db, wf, empty) as engine:
        run_id = await engine.start(wf)
        assert await engine.wait(run_id, timeout=10) == {"lp": [0, 1, 2]}
        run_id = await engine.start(empty)
        assert await engine.wait(run_id, timeout=10) == {"lp": []}


async def test_a_condition_still_holding_at_max_iterations_fails(db: Any) -> None:
    calls: list[int] = []

    async def condition(ctx: durable.Context, i: int) -> bool:
        calls.append(i)
        return True

    async def body(ctx: durable.LoopContext) -> int:
        return ctx.iteration

    wf = durable.Workflow("endless")

    @wf.step(compensate=_undo)
    async def s1(ctx: durable.Context) -> str:
        return "s1"

    wf.loop("lp", condition, body, max_iterations=3, max_attempts=3, backoff=0)
    never = durable.Workflow("never")
    never.loop("lp", lambda ctx, i: True, body, max_iterations=0)

    async with running_engine(db, wf, never, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        zero = await engine.start(never)
        with pytest.raises(durable.RunFailed) as zero_info:
            await engine.wait(zero, timeout=10)

    error = info.value.run.error or ""
    assert "max_iterations=3" in error
    assert "lp" in error
    # The condition is asked first at i == 3 and the failure is not retried.
    assert calls == [0, 1, 2, 3]
    assert [(e.key, e.status) for e in run.journal] == [
        ("s1", "completed"),
        ("lp#0", "completed"),
        ("lp#1", "completed"),
        ("lp#2", "completed"),
        ("lp", "failed"),
        ("s1@compensate", "completed"),
    ]
    assert comp == ["s1@compensate"]
    assert "max_iterations=0" in (zero_info.value.run.error or "")


# Every row version of a run that commits, with how many loop iterations had committed:
# the run's whole history, not samples of it that could miss a short-lived state.
STATUS_LOG = """
CREATE TABLE status_log (status text NOT NULL, iterations integer NOT NULL);
CREATE FUNCTION log_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO status_log SELECT NEW.status, count(*) FROM durable.journal j
    WHERE j.run_id = NEW.id AND j.key LIKE 'lp#%';
    RETURN NULL;
END
$$;
CREATE TRIGGER log_status AFTER INSERT OR UPDATE ON durable.runs
    FOR EACH ROW EXECUTE FUNCTION log_status();
"""


async def _watch_loop(db: Any, first_step: bool) -> Counter[str]:
    """Run a 40-iteration loop; count the statuses the run row ever committed with."""

    async def body(ctx: durable.LoopContext) -> int:
        return ctx.iteration

    wf = durable.Workflow("busy")
    if first_step:

        @wf.step
        async def before(ctx: durable.Context) -> str:
            return "b"

    wf.loop("lp", lambda ctx, i: i < 40, body)
    statuses: Counter[str] = Counter()
    async with running_engine(db, wf, setup=STATUS_LOG) as engine:
        result = await engine.wait(await engine.start(wf), timeout=15)
        for row in await fetch(engine, "SELECT status, iterations FROM status_log"):
            statuses[row["status"]] += 1
            if 0 < row["iterations"] < 40:
                statuses[f"mid_loop:{row['status']}"] += 1
    assert result["lp"] == list(range(40))
    return statuses


async def test_the_run_is_never_waiting_between_iterations(db: Any) -> None:
    statuses = await _watch_loop(db, first_step=True)
    assert statuses["waiting"] == 0, statuses
    assert statuses["mid_loop:running"] > 0, statuses
    assert set(statuses) <= {"pending", "running", "completed", "mid_loop:running"}, statuses


async def test_a_loop_as_first_node_shows_the_run_running_between_iterations(db: Any) -> None:
    statuses = await _watch_loop(db, first_step=False)
    assert statuses["waiting"] == 0, statuses
    assert statuses["mid_loop:running"] > 0, statuses
    assert statuses["mid_loop:pending"] == 0, statuses
