"""child_workflow: the child run is created with the parent's journal marker and carries
parent_id, the parent waits without a job and is woken by the child's final transaction,
a failed or cancelled child fails the parent's node, and cancelling the parent cancels its
running children (SPEC, Semantics: child_workflow; seed defects 1 and 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import eventually, fetch, fetchval, running_engine

import durable

TABLES = """
CREATE TABLE effects (run_id text NOT NULL, what text NOT NULL);
CREATE TABLE comp (run_id text NOT NULL, key text NOT NULL);
"""


async def _undo(ctx: durable.Context) -> None:
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO comp VALUES ($1, $2)", ctx.run_id, ctx.node)


async def _effect(ctx: durable.Context) -> str:
    assert ctx.conn is not None
    await ctx.conn.execute("INSERT INTO effects VALUES ($1, $2)", ctx.run_id, ctx.node)
    return ctx.node


async def _children(engine: durable.Engine, parent_id: str) -> list[Any]:
    return await fetch(
        engine,
        "SELECT id, workflow, status, parent_node, input FROM durable.runs "
        "WHERE parent_id = $1 ORDER BY id",
        parent_id,
    )


async def test_parent_waits_for_its_child_and_is_woken_by_the_childs_final_transaction(
    db: Any,
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    child = durable.Workflow("kyc")

    @child.step
    async def check(ctx: durable.Context) -> dict[str, Any]:
        entered.set()
        with anyio.fail_after(15):
            await release.wait()
        return {"person": ctx.input["person"], "ok": True}

    child.step("record", _effect)

    parent = durable.Workflow("onboard")
    parent.step("pre", _effect)
    parent.child_workflow("kyc", lambda ctx: ("kyc", {"person": ctx.input["who"]}))

    @parent.step
    async def post(ctx: durable.Context) -> Any:
        return ctx.results["kyc"]

    async with running_engine(db, parent, child, setup=TABLES, poll_interval=5.0) as engine:
        parent_id = await engine.start(parent, {"who": "ann"})
        with anyio.fail_after(10):
            await entered.wait()

        kids = await _children(engine, parent_id)
        assert len(kids) == 1
        child_id = kids[0]["id"]
        assert (kids[0]["workflow"], kids[0]["parent_node"]) == ("kyc", "kyc")
        p = await engine.get_run(parent_id, journal=True)
        c = await engine.get_run(child_id)
        # The link both ways.
        assert p.children == (child_id,)
        assert c.parent_id == parent_id
        assert p.parent_id is None
        assert c.children == ()
        assert c.input == {"person": "ann"}
        # The parent is parked with no job at all: nothing polls the child.
        assert p.status is durable.RunStatus.WAITING
        assert p.current_node == "kyc"
        assert [e.key for e in p.journal] == ["pre", "kyc@child"]
        assert p.journal[1].result == {"run_id": child_id}
        assert (
            await fetchval(engine, "SELECT count(*) FROM durable.jobs WHERE run_id = $1", parent_id)
            == 0
        )
        # Its first step is in flight, not committed yet.
        assert c.status is durable.RunStatus.PENDING

        release.set()
        result = await engine.wait(parent_id, timeout=10)
        times = await fetch(
            engine,
            "SELECT id, finished_at FROM durable.runs WHERE id = ANY($1::text[])",
            [parent_id, child_id],
        )
        child_run = await engine.get_run(child_id)
        effects = await fetch(engine, "SELECT run_id, what FROM effects ORDER BY 2")
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    child_result = {"check": {"person": "ann", "ok": True}, "record": "record"}
    assert child_run.status is durable.RunStatus.COMPLETED
    assert child_run.result == child_result
    assert result == {"pre": "pre", "kyc": child_result, "post": child_result}
    finished = {r["id"]: r["finished_at"] for r in times}
    lag = (finished[parent_id] - finished[child_id]).total_seconds()
    # The worker polls every 5 s: only the child's own final transaction can explain this.
    assert 0 <= lag < 0.5, f"parent finished {lag:.3f} s after its child"
    assert sorted((r["run_id"], r["what"]) for r in effects) == sorted(
        [(parent_id, "pre"), (child_id, "record")]
    )
    assert jobs == 0


async def test_exactly_one_child_run_per_child_node(db: Any) -> None:
    calls: list[str] = []

    child = durable.Workflow("leaf")

    @child.step
    async def double(ctx: durable.Context) -> int:
        return int(ctx.input["x"]) * 2

    async def start_second(ctx: durable.Context) -> tuple[str, dict[str, Any]]:
        calls.append(ctx.node)
        await anyio.lowlevel.checkpoint()
        return ("leaf", {"x": ctx.results["one"]["double"]})

    def start_first(ctx: durable.Context) -> tuple[str, dict[str, Any]]:
        calls.append(ctx.node)
        return ("leaf", {"x": ctx.input["x"]})

    parent = durable.Workflow("tree")
    parent.child_workflow("one", start_first)
    parent.child_workflow("two", start_second)

    async with running_engine(db, parent, child) as engine:
        parent_ids = [await engine.start(parent, {"x": i}) for i in range(5)]
        results = [await engine.wait(p, timeout=10) for p in parent_ids]
        per_parent = await fetch(
            engine,
            "SELECT parent_id, parent_node, count(*) AS n FROM durable.runs "
            "WHERE parent_id IS NOT NULL GROUP BY 1, 2",
        )
        statuses = await fetch(engine, "SELECT status, count(*) AS n FROM durable.runs GROUP BY 1")

    assert results == [{"one": {"double": 2 * i}, "two": {"double": 4 * i}} for i in range(5)]
    assert sorted((r["parent_id"], r["parent_node"], r["n"]) for r in per_parent) == sorted(
        (p, node, 1) for p in parent_ids for node in ("one", "two")
    )
    assert {r["status"]: r["n"] for r in statuses} == {"completed": 15}
    assert sorted(calls) == ["one"] * 5 + ["two"] * 5


async def test_a_failed_child_fails_the_parent_node_and_compensates(db: Any) -> None:
    child = durable.Workflow("doomed")
    child.step("c1", _effect, compensate=_undo)

    @child.step
    async def c2(ctx: durable.Context) -> None:
        raise durable.NonRetryable("child refuses")

    parent = durable.Workflow("hopeful")
    parent.step("p1", _effect, compensate=_undo)
    parent.child_workflow("kid", lambda ctx: ("doomed", {}))

    @parent.step
    async def never(ctx: durable.Context) -> None:
        raise AssertionError("must not run")

    async with running_engine(db, parent, child, setup=TABLES) as engine:
        parent_id = await engine.start(parent)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(parent_id, timeout=10)
        run = await engine.get_run(parent_id, journal=True)
        (kid,) = run.children
        child_run = await engine.get_run(kid, journal=True)
        comp = await fetch(engine, "SELECT run_id, key FROM comp")
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")

    assert child_run.status is durable.RunStatus.FAILED
    assert "child refuses" in (child_run.error or "")
    error = info.value.run.error or ""
    assert kid in error
    assert "failed" in error
    assert [(e.key, e.status) for e in run.journal] == [
        ("p1", "completed"),
        ("kid@child", "completed"),
        ("kid", "failed"),
        ("p1@compensate", "completed"),
    ]
    assert sorted((r["run_id"], r["key"]) for r in comp) == sorted(
        [(kid, "c1@compensate"), (parent_id, "p1@compensate")]
    )
    assert jobs == 0


async def test_cancelling_the_parent_cancels_the_running_child(db: Any) -> None:
    child = durable.Workflow("patient")
    child.step("c1", _effect, compensate=_undo)
    child.wait_for_signal("forever", "never")

    parent = durable.Workflow("impatient")
    parent.step("p1", _effect, compensate=_undo)
    parent.child_workflow("kid", lambda ctx: ("patient", {}))

    async with running_engine(db, parent, child, setup=TABLES) as engine:
        parent_id = await engine.start(parent)

        async def child_parked() -> str | None:
            kids = await _children(engine, parent_id)
            return kids[0]["id"] if kids and kids[0]["status"] == "waiting" else None

        kid = await eventually(child_parked, timeout=10)
        assert (await engine.get_run(parent_id)).status is durable.RunStatus.WAITING
        assert await engine.cancel(parent_id) is True
        with pytest.raises(durable.RunCancelled):
            await engine.wait(parent_id, timeout=10)
        with pytest.raises(durable.RunCancelled):
            await engine.wait(kid, timeout=10)
        run = await engine.get_run(parent_id, journal=True)
        comp = await fetch(engine, "SELECT run_id, key FROM comp")
        jobs = await fetchval(engine, "SELECT count(*) FROM durable.jobs")
        assert await engine.signal(kid, "never", 1) is False

    assert sorted((r["run_id"], r["key"]) for r in comp) == sorted(
        [(kid, "c1@compensate"), (parent_id, "p1@compensate")]
    )
    assert [(e.key, e.status) for e in run.journal] == [
        ("p1", "completed"),
        ("kid@child", "completed"),
        ("p1@compensate", "completed"),
    ]
    assert jobs == 0


async def test_a_cancelled_child_fails_the_parent_node(db: Any) -> None:
    child = durable.Workflow("stuck")
    child.wait_for_signal("forever", "never")
    parent = durable.Workflow("waiter")
    parent.child_workflow("kid", lambda ctx: ("stuck", {}))

    async with running_engine(db, parent, child) as engine:
        parent_id = await engine.start(parent)

        async def child_parked() -> str | None:
            kids = await _children(engine, parent_id)
            return kids[0]["id"] if kids and kids[0]["status"] == "waiting" else None

        kid = await eventually(child_parked, timeout=10)
        assert await engine.cancel(kid) is True
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(parent_id, timeout=10)

    error = info.value.run.error or ""
    assert kid in error
    assert "cancelled" in error


async def test_a_child_of_an_unregistered_workflow_fails_the_node(db: Any) -> None:
    parent = durable.Workflow("orphan")
    parent.child_workflow("kid", lambda ctx: ("nobody", {}))
    bad_spec = durable.Workflow("badspec")
    bad_spec.child_workflow("kid", lambda ctx: "orphan")

    async with running_engine(db, parent, bad_spec) as engine:
        run_id = await engine.start(parent)
        with pytest.raises(durable.RunFailed) as info:
            await engine.wait(run_id, timeout=10)
        bad_id = await engine.start(bad_spec)
        with pytest.raises(durable.RunFailed) as bad_info:
            await engine.wait(bad_id, timeout=10)
        children = await fetchval(
            engine, "SELECT count(*) FROM durable.runs WHERE parent_id IS NOT NULL"
        )

    assert "'nobody'" in (info.value.run.error or "")
    assert "not registered" in (info.value.run.error or "")
    assert "start must return (workflow_name, input)" in (bad_info.value.run.error or "")
    assert children == 0
