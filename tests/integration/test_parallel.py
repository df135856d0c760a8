"""Parallel: every branch commits its own journal row in its own transaction, retries re-run
only the failed branch, a branch that exhausts its attempts fails the node and compensates,
and branches of one node run side by side on different workers
(SPEC, Semantics: parallel; seed defect 5)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import anyio
import pytest
from helpers import eventually, fetch, fetchval, running_engine

import durable

TABLES = """
CREATE TABLE calls (run_id text NOT NULL, branch text NOT NULL, attempt int NOT NULL);
CREATE TABLE comp (key text NOT NULL);
"""


def _branch(name: str, counter: Counter[str], *, fail_times: int = 0) -> Any:
    """A branch that writes (run, branch, attempt) through ctx.conn, counts every call in
    Python (rolled-back attempts included) and fails its first `fail_times` attempts."""

    async def handler(ctx: durable.Context) -> dict[str, Any]:
        counter[name] += 1
        assert ctx.conn is not None
        await ctx.conn.execute(
            "INSERT INTO calls VALUES ($1, $2, $3)", ctx.run_id, name, ctx.attempt
        )
        if ctx.attempt <= fail_times:
            raise RuntimeError(f"{name} flaked on attempt {ctx.attempt}")
        return {"branch": name, "attempt": ctx.attempt}

    handler.__name__ = name
    return handler


async def test_a_retry_reruns_only_the_failed_branch(db: Any) -> None:
    counter: Counter[str] = Counter()
    seen_after: list[Any] = []
    wf = durable.Workflow("fanout")

    @wf.step
    async def before(ctx: durable.Context) -> int:
        return 7

    wf.parallel(
        "fan",
        {
            "a": _branch("a", counter),
            "b": _branch("b", counter),
            "c": _branch("c", counter, fail_times=2),
        },
        max_attempts=3,
        backoff=0,
    )

    @wf.step
    async def after(ctx: durable.Context) -> str:
        seen_after.append(ctx.results["fan"])
        return "done"

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=10)
        calls = await fetch(
            engine, "SELECT branch, attempt FROM calls WHERE run_id = $1 ORDER BY 1, 2", run_id
        )
        run = await engine.get_run(run_id, journal=True)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    expected_fan = {
        "a": {"branch": "a", "attempt": 1},
        "b": {"branch": "b", "attempt": 1},
        "c": {"branch": "c", "attempt": 3},
    }
    assert result == {"before": 7, "fan": expected_fan, "after": "done"}
    assert seen_after == [expected_fan]
    # Python saw every attempt, the database only the committed ones.
    assert counter == {"a": 1, "b": 1, "c": 3}
    assert [tuple(r) for r in calls] == [("a", 1), ("b", 1), ("c", 3)]
    journal = {e.key: (e.status, e.attempts) for e in run.journal}
    assert journal == {
        "before": ("completed", 1),
        "fan#a": ("completed", 1),
        "fan#b": ("completed", 1),
        "fan#c": ("completed", 3),
        "fan": ("completed", journal["fan"][1]),  # attempts of the branch that finished it
        "after": ("completed", 1),
    }
    assert [e.key for e in run.journal][-2:] == ["fan", "after"]
    assert [(a.key, a.attempt) for a in run.attempts] == [("fan#c", 1), ("fan#c", 2)]
    assert run.results["fan"] == expected_fan
    assert jobs == 0


async def test_branches_have_their_own_transactions_and_run_side_by_side(db: Any) -> None:
    barrier = asyncio.Barrier(3)
    seen: dict[str, dict[str, Any]] = {}
    engines: list[durable.Engine] = []
    wf = durable.Workflow("sidebyside")

    def branch(name: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            assert ctx.conn is not None
            await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2, $3)", ctx.run_id, name, 1)
            info = await ctx.conn.fetchrow(
                "SELECT pg_backend_pid() AS pid, txid_current() AS xid, "
                "(SELECT count(*) FROM calls) AS visible"
            )
            assert info is not None
            with anyio.fail_after(10):
                await barrier.wait()  # passes only when all three are in flight at once
            # The run as the rest of the world sees it while its branches are in flight.
            status = await fetchval(
                engines[0], "SELECT status FROM durable.runs WHERE id = $1", ctx.run_id
            )
            seen[name] = {**dict(info), "status": status}
            return name.upper()

        return handler

    wf.parallel("fan", {n: branch(n) for n in ("x", "y", "z")}, max_attempts=1)

    async with running_engine(db, wf, setup=TABLES, concurrency=4) as engine:
        engines.append(engine)
        run_id = await engine.start(wf)
        result = await engine.wait(run_id, timeout=15)
        calls = await fetchval(engine, "SELECT count(*) FROM calls")

    assert result == {"fan": {"x": "X", "y": "Y", "z": "Z"}}
    assert calls == 3
    # Three transactions on three connections, none seeing the others' uncommitted rows.
    assert len({s["pid"] for s in seen.values()}) == 3
    assert len({s["xid"] for s in seen.values()}) == 3
    assert {s["visible"] for s in seen.values()} == {1}
    assert {s["status"] for s in seen.values()} == {"running"}


async def test_an_exhausted_branch_fails_the_node_and_compensates_completed_branches(
    db: Any,
) -> None:
    counter: Counter[str] = Counter()

    def undo(key: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            assert ctx.conn is not None
            await ctx.conn.execute("INSERT INTO comp VALUES ($1)", ctx.node)
            return f"undid {key}"

        handler.__name__ = f"undo_{key}"
        return handler

    async def doomed(ctx: durable.Context) -> None:
        counter["c"] += 1
        assert ctx.conn is not None
        # Fail only once the other two branches have committed, so that they are
        # journaled completed (and must be compensated) when the node fails.
        conn = ctx.conn

        async def others_committed() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM durable.journal WHERE run_id = $1 "
                "AND key = ANY('{fan#a,fan#b}'::text[])",
                ctx.run_id,
            )
            return bool(n == 2)

        await eventually(others_committed, timeout=10, interval=0.01)
        await ctx.conn.execute("INSERT INTO calls VALUES ($1, 'c', $2)", ctx.run_id, ctx.attempt)
        raise RuntimeError(f"c is down (attempt {ctx.attempt})")

    wf = durable.Workflow("fanfail")

    @wf.step(compensate=undo("s1"))
    async def s1(ctx: durable.Context) -> str:
        return "s1"

    wf.parallel(
        "fan",
        {"a": _branch("a", counter), "b": _branch("b", counter), "c": doomed},
        max_attempts=2,
        backoff=0,
        compensate={"a": undo("a"), "c": undo("c")},
    )

    @wf.step
    async def never(ctx: durable.Context) -> None:
        raise AssertionError("must not run")

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=15)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        calls = await fetch(engine, "SELECT branch FROM calls ORDER BY 1")
        run = await engine.get_run(run_id, journal=True)
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    assert run.status is durable.RunStatus.FAILED
    assert "c is down (attempt 2)" in (run.error or "")
    assert info.value.run.error == run.error
    assert counter == {"a": 1, "b": 1, "c": 2}
    assert [r["branch"] for r in calls] == ["a", "b"]  # c's writes rolled back
    # Compensation in reverse order of completion: branch a (b has no compensator, c never
    # completed), then the earlier step.
    assert comp == ["fan#a@compensate", "s1@compensate"]
    keys = [(e.key, e.status) for e in run.journal]
    assert keys[:1] == [("s1", "completed")]
    assert set(keys[1:3]) == {("fan#a", "completed"), ("fan#b", "completed")}
    assert keys[3:] == [
        ("fan", "failed"),
        ("fan#a@compensate", "completed"),
        ("s1@compensate", "completed"),
    ]
    assert [(a.key, a.attempt) for a in run.attempts] == [("fan#c", 1), ("fan#c", 2)]
    assert "never" not in run.results
    assert jobs == 0


async def test_a_later_failure_compensates_the_branches_in_reverse_order_of_completion(
    db: Any,
) -> None:
    order = ["y", "x", "z"]  # the order the branches will commit in

    def branch(name: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            assert ctx.conn is not None
            # Commit in a fixed order: wait until the branch before this one is journaled.
            pos = order.index(name)
            if pos:
                conn = ctx.conn

                async def previous_committed() -> bool:
                    n = await conn.fetchval(
                        "SELECT count(*) FROM durable.journal WHERE run_id = $1 AND key = $2",
                        ctx.run_id,
                        f"fan#{order[pos - 1]}",
                    )
                    return bool(n)

                await eventually(previous_committed, timeout=10, interval=0.01)
            await ctx.conn.execute("INSERT INTO calls VALUES ($1, $2, 1)", ctx.run_id, name)
            return name

        return handler

    def undo(name: str) -> Any:
        async def handler(ctx: durable.Context) -> None:
            assert ctx.conn is not None
            await ctx.conn.execute("INSERT INTO comp VALUES ($1)", ctx.node)

        return handler

    wf = durable.Workflow("latefail")

    @wf.step(compensate=undo("s1"))
    async def s1(ctx: durable.Context) -> str:
        return "s1"

    wf.parallel(
        "fan",
        {n: branch(n) for n in ("x", "y", "z")},
        compensate={n: undo(n) for n in ("x", "y", "z")},
    )

    @wf.step
    async def charge(ctx: durable.Context) -> None:
        raise durable.NonRetryable("card declined")

    async with running_engine(db, wf, setup=TABLES) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=15)
        comp = [r["key"] for r in await fetch(engine, "SELECT key FROM comp")]
        run = await engine.get_run(run_id, journal=True)

    assert [(e.key, e.status) for e in run.journal] == [
        ("s1", "completed"),
        ("fan#y", "completed"),
        ("fan#x", "completed"),
        ("fan#z", "completed"),
        ("fan", "completed"),
        ("charge", "failed"),
        ("fan#z@compensate", "completed"),
        ("fan#x@compensate", "completed"),
        ("fan#y@compensate", "completed"),
        ("s1@compensate", "completed"),
    ]
    assert comp == ["fan#z@compensate", "fan#x@compensate", "fan#y@compensate", "s1@compensate"]
    assert "card declined" in (run.error or "")


def _spread(label: str, barrier: asyncio.Barrier, seen: dict[str, dict[str, Any]]) -> Any:
    """The "spread" workflow as one engine registers it: its branches report `label`, so a
    branch tells which engine's worker ran it."""
    wf = durable.Workflow("spread")

    def branch(name: str) -> Any:
        async def handler(ctx: durable.Context) -> str:
            with anyio.fail_after(10):
                await barrier.wait()  # passes only when all three branches are in flight
            seen[name] = {"worker": label}
            return label

        return handler

    wf.parallel("fan", {n: branch(n) for n in ("p", "q", "r")}, max_attempts=1)
    return wf


async def test_branches_of_one_node_run_concurrently_on_different_workers(db: Any) -> None:
    barrier = asyncio.Barrier(3)
    seen: dict[str, dict[str, Any]] = {}
    one = durable.Engine(db.dsn, workflows=[_spread("one", barrier, seen)], pool_size=2)
    two = durable.Engine(db.dsn, workflows=[_spread("two", barrier, seen)], pool_size=2)

    # Two engines, two workers, two slots each: three branches held at a barrier need
    # both workers.
    async with (
        one,
        two,
        one.worker(concurrency=2, poll_interval=0.05, grace_period=2) as w1,
        two.worker(concurrency=2, poll_interval=0.05, grace_period=2) as w2,
    ):
        assert w1.name != w2.name
        run_id = await one.start("spread")
        result = await one.wait(run_id, timeout=15)
        run = await two.get_run(run_id, journal=True)

    workers = Counter(s["worker"] for s in seen.values())
    assert set(workers) == {"one", "two"}, workers
    assert sorted(workers.values()) == [1, 2]
    assert result == {"fan": {n: seen[n]["worker"] for n in ("p", "q", "r")}}
    assert sorted(e.key for e in run.journal) == ["fan", "fan#p", "fan#q", "fan#r"]
