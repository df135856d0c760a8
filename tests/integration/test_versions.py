"""Versions and deploys (SPEC, "Versions and deploys"): versions served side by side, runs
pinned to (workflow, version, shape), the shapes recorded and the warning at worker start,
`check`, `upgrade`, children at the highest version, and rolling deploys with and without
a version bump."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import anyio
import pytest
from helpers import HasDsn, eventually, execute, fetch, fetchval, open_engine, running_engine

import durable

Log = list[tuple[str, str, str]]  # (run id, journal key, the tag of the code that ran it)


def build(
    version: int, *nodes: str, name: str = "order", tag: str | None = None, log: Log | None = None
) -> durable.Workflow:
    """A workflow from node specs: `wait*` waits for signal 'go'; `p=x+y` is a parallel node
    `p` with branches x and y; `r=x+y` a route `r` that picks the input's "pick" (default
    its first branch); `name:sleep` and `name:step` force a kind; anything else is a step.
    Every handler returns (and logs) its journal key and `tag` (default `v<version>`); a
    handler named in the input's "fail" fails its first attempt, retried after 60 s."""
    wf = durable.Workflow(name, version=version)
    label = tag or f"v{version}"

    def handler(key: str) -> Any:
        async def run(ctx: durable.Context) -> str:
            if log is not None:
                log.append((ctx.run_id, key, label))
            if key in ctx.input.get("fail", ()) and ctx.attempt == 1:
                raise RuntimeError(f"{key} fails once")
            return f"{key} {label}"

        return run

    for spec in nodes:
        node, _, kind = spec.partition(":")
        if "=" in node:
            node, branches = node.split("=")
            keys = branches.split("+")
            if node.startswith("p"):
                wf.parallel(node, {k: handler(f"{node}#{k}") for k in keys}, backoff=60)
            else:
                first = keys[0]
                wf.route(
                    node,
                    lambda ctx, first=first: ctx.input.get("pick", first),
                    {k: handler(f"{node}#{k}") for k in keys},
                    backoff=60,
                )
        elif kind == "sleep":
            wf.sleep(node, 0)
        elif node.startswith("wait") and kind != "step":
            wf.wait_for_signal(node, "go")
        else:
            wf.step(node, handler(node), backoff=60)
    return wf


async def status_of(engine: durable.Engine, run_id: str) -> str:
    return (await engine.get_run(run_id)).status.value


async def settle(db: HasDsn, *workflows: durable.Workflow, ids: list[str], status: str) -> None:
    """Run a worker of `workflows` until every run of `ids` has `status`."""
    async with running_engine(db, *workflows) as engine:

        async def there() -> bool:
            return all([await status_of(engine, r) == status for r in ids])

        await eventually(there)


async def park(db: HasDsn, wf: durable.Workflow, n: int = 1, **input: Any) -> list[str]:
    """`n` runs of `wf`, each run by a worker of `wf` up to its signal wait."""
    async with open_engine(db, wf) as engine:
        ids = [await engine.start(wf, {"i": i, **input}) for i in range(n)]
    await settle(db, wf, ids=ids, status="waiting")
    return ids


async def pinned(engine: durable.Engine, run_id: str) -> tuple[str, int, list[tuple[str, str]]]:
    """A run's queue, version and jobs (task, queue)."""
    row = await fetch(engine, "SELECT queue, version FROM durable.runs WHERE id = $1", run_id)
    jobs = await fetch(
        engine, "SELECT task, queue FROM durable.jobs WHERE run_id = $1 ORDER BY id", run_id
    )
    return row[0]["queue"], row[0]["version"], [(j["task"], j["queue"]) for j in jobs]


async def due_now(engine: durable.Engine, run_id: str) -> None:
    """Make a run's retry (its wake time or its branch jobs' backoff) due now."""
    await execute(
        engine,
        "UPDATE durable.runs SET wake_at = now() WHERE id = $1 AND wake_at IS NOT NULL",
        run_id,
    )
    await execute(engine, "UPDATE durable.jobs SET run_at = now() WHERE run_id = $1", run_id)


async def journal_keys(engine: durable.Engine, run_id: str) -> list[str]:
    return [e.key for e in (await engine.get_run(run_id, journal=True)).journal]


# -- versions side by side -------------------------------------------------------------------


async def test_versions_of_one_workflow_run_side_by_side_each_on_its_own_code(db: Any) -> None:
    """One engine registers v1 and v2: `start` picks the highest, `start(version=)` or a
    `Workflow` picks one, `Run.version` says which, and each run runs its own version's
    nodes and handlers."""
    v1, v2 = build(1, "a", "b"), build(2, "a", "b", "c")
    async with running_engine(db, v1, v2) as engine:
        assert engine.workflows["order"] is v2
        assert dict(engine.versions["order"]) == {1: v1, 2: v2}
        latest = await engine.start("order", {})
        old = await engine.start("order", {}, version=1)
        also_old = await engine.start(v1, {})
        assert await engine.wait(latest, timeout=10) == {"a": "a v2", "b": "b v2", "c": "c v2"}
        assert await engine.wait(old, timeout=10) == {"a": "a v1", "b": "b v1"}
        assert await engine.wait(also_old, timeout=10) == {"a": "a v1", "b": "b v1"}
        assert [(await engine.get_run(r)).version for r in (latest, old, also_old)] == [2, 1, 1]
        assert {r.id for r in await engine.list_runs(workflow="order", version=1)} == {
            old,
            also_old,
        }
        assert [r.id for r in await engine.list_runs(version=2)] == [latest]
        queues = await fetch(engine, "SELECT version, queue FROM durable.shapes ORDER BY version")
    assert [(r["version"], r["queue"]) for r in queues] == [(1, v1.queue), (2, v2.queue)]
    assert v1.queue.startswith("order@")
    assert "@v" not in v1.queue
    assert v2.queue.startswith("order@v2@")


async def test_the_database_reads_the_version_from_the_queue_as_python_writes_it(
    db: Any,
) -> None:
    queues = [build(v, "a").queue for v in (1, 2, 10, 123)]
    async with open_engine(db) as engine:
        versions = [
            await fetchval(engine, "SELECT durable.queue_version_v1($1)", q) for q in queues
        ]
        legacy = await fetchval(engine, "SELECT durable.queue_version_v1('order')")
    assert versions == [1, 2, 10, 123]
    assert legacy == 1


async def test_start_refuses_a_version_that_is_not_registered_and_writes_nothing(db: Any) -> None:
    v1, v3 = build(1, "a"), build(3, "a")
    async with open_engine(db, v1, v3) as engine:
        with pytest.raises(durable.WorkflowNotFound, match=r"version 2 .*versions: 1, 3"):
            await engine.start("order", {}, version=2)
        with pytest.raises(durable.ArgumentError, match="version must be an integer >= 1"):
            await engine.start("order", {}, version=0)
        with pytest.raises(durable.ArgumentError, match="contradicts"):
            await engine.start(v1, {}, version=3)
        with pytest.raises(durable.WorkflowNotFound):
            await engine.start(build(2, "a"), {})
        assert await fetchval(engine, "SELECT count(*) FROM durable.runs") == 0
        with pytest.raises(durable.DefinitionError, match="version 3 is already registered"):
            engine.register(build(3, "a"))


async def test_a_worker_claims_only_the_versions_it_registers(db: Any) -> None:
    """Runs of v2 wait, untouched, while a worker of v1 alone works (their jobs are due and
    older than the v1 runs it completes), and complete once a worker of v2 exists."""
    log: Log = []
    v1, v2 = build(1, "a", "b", log=log), build(2, "a", "b", log=log)
    async with open_engine(db, v1, v2) as engine:
        newer = [await engine.start("order", {}) for _ in range(3)]
        older = [await engine.start("order", {}, version=1) for _ in range(3)]
    async with running_engine(db, v1) as engine:
        for run_id in older:
            await engine.wait(run_id, timeout=10)
        assert {await status_of(engine, r) for r in newer} == {"pending"}
    assert {tag for _, _, tag in log} == {"v1"}
    await settle(db, v2, ids=newer, status="completed")
    assert sorted(tag for r, _, tag in log if r in newer) == ["v2"] * 6


async def test_a_child_starts_at_the_highest_version_registered_on_the_worker_starting_it(
    db: Any,
) -> None:
    parent = durable.Workflow("parent")
    parent.child_workflow("kid", lambda ctx: ("order", {}))
    v1, v2 = build(1, "a"), build(2, "a")
    async with running_engine(db, parent, v1, v2) as engine:
        run_id = await engine.start("parent", {})
        assert await engine.wait(run_id, timeout=10) == {"kid": {"a": "a v2"}}
        (child,) = (await engine.get_run(run_id)).children
        assert (await engine.get_run(child)).version == 2
    async with running_engine(db, parent, v1) as engine:
        run_id = await engine.start("parent", {})
        assert await engine.wait(run_id, timeout=10) == {"kid": {"a": "a v1"}}
        (child,) = (await engine.get_run(run_id)).children
        assert (await engine.get_run(child)).version == 1


async def test_a_worker_warns_of_a_version_whose_shape_changed_under_unfinished_runs(
    db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning names the workflow, the version, the nodes added, removed and changed and
    the runs left waiting; runs of a version the worker does not register get a line of
    information; once the old runs are finished the worker says nothing."""
    caplog.set_level(logging.INFO, logger="durable.versions")
    old = build(1, "a", "wait", "b", "p=x+y", "c")
    ids = await park(db, old, n=2)
    await park(db, build(3, "a", "wait", name="other"))
    changed = build(1, "a", "wait", "b:sleep", "p=x+y+z", "d")
    caplog.clear()
    async with running_engine(db, changed, build(1, "a", "wait", name="other")):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "workflow 'order' version 1 changed shape" in message, message
    assert "added d; removed c; changed b (step -> sleep), p (branches ['x', 'y'] -> " in message
    assert "while 2 unfinished run(s) use the old one" in message
    assert "Keep the old code running, bump the version, or run `durable check`" in message
    assert (warnings[0].workflow, warnings[0].version, warnings[0].runs) == ("order", 1, 2)  # type: ignore[attr-defined]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(
        "1 unfinished run(s) of workflow 'other' version 3 wait for a worker that registers "
        "that version" in m
        for m in infos
    ), infos
    async with running_engine(db, old) as engine:
        for run_id in ids:
            assert await engine.signal(run_id, "go")
            await engine.wait(run_id, timeout=10)
    caplog.clear()
    async with running_engine(db, changed):
        pass
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# -- check -----------------------------------------------------------------------------------


async def test_check_is_ok_when_this_code_serves_every_unfinished_run(db: Any) -> None:
    v1, v2 = build(1, "a", "wait"), build(2, "a", "wait", "b")
    ids = await park(db, v1) + await park(db, v2)
    async with open_engine(db, v1, v2) as engine:
        report = await engine.check()
        assert await engine.cancel(await engine.start("order", {}, version=1))
    assert report.ok
    assert (report.unfinished, report.continuable, report.stranded) == (len(ids), len(ids), ())
    # Finished runs need no code: a v2-only engine is not ok for the parked v1 run alone.
    async with open_engine(db, v2) as engine:
        report = await engine.check()
    assert not report.ok
    assert [(g.cause, g.version, g.run_ids) for g in report.stranded] == [
        ("unknown_version", 1, (ids[0],))
    ]


async def test_check_lists_every_run_this_code_cannot_continue_grouped_by_cause(
    db: Any,
) -> None:
    v1 = build(1, "a", "wait", "c")
    v2_old = build(2, "a", "wait", "c", tag="old")
    v2_new = build(2, "a", "wait", "c", "d")
    gone = build(1, "a", "wait", name="gone")
    v1_ids = await park(db, v1, n=2)
    v2_ids = await park(db, v2_old, n=3)
    gone_ids = await park(db, gone)
    served = await park(db, v2_new)
    async with open_engine(db, v2_new) as engine:
        report = await engine.check()
    assert not report.ok
    assert (report.unfinished, report.continuable) == (7, 1)
    by_cause = report.by_cause()
    assert list(by_cause) == ["unknown_workflow", "unknown_version", "shape_changed"]
    ((g_gone,), (g_v1,), (g_v2,)) = by_cause.values()
    assert (g_gone.workflow, g_gone.version, g_gone.queue) == ("gone", 1, gone.queue)
    assert g_gone.run_ids == tuple(gone_ids)
    assert (g_v1.workflow, g_v1.version, g_v1.queue, g_v1.run_ids) == (
        "order",
        1,
        v1.queue,
        tuple(sorted(v1_ids)),
    )
    assert (g_v2.version, g_v2.queue, g_v2.run_ids) == (2, v2_old.queue, tuple(sorted(v2_ids)))
    assert g_v2.diff == durable.ShapeDiff(added=("d",))
    assert served[0] not in {r for g in report.stranded for r in g.run_ids}
    data = report.as_dict()
    assert data["ok"] is False
    assert data["stranded"] == 6
    assert data["causes"]["shape_changed"][0]["diff"] == {
        "added": ["d"],
        "removed": [],
        "changed": [],
    }


# -- upgrade ---------------------------------------------------------------------------------

OLD = ("a", "b", "wait", "c")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        pytest.param(("a", "b", "wait", "c", "d"), None, id="appended"),
        pytest.param(("a", "b", "wait", "x", "c"), None, id="inserted-after-the-position"),
        pytest.param(("a", "x", "b", "wait", "c"), None, id="inserted-before-not-journaled"),
        pytest.param(("a", "b", "wait"), None, id="removed-after-the-position"),
        pytest.param(
            ("a", "wait", "c"),
            "journaled node 'b' is not declared by version 2",
            id="journaled-node-removed",
        ),
        pytest.param(
            ("a", "b:sleep", "wait", "c"),
            "journaled node 'b' is a step but a sleep in version 2",
            id="journaled-node-kind-changed",
        ),
        pytest.param(
            ("a", "wait", "b", "c"),
            "journaled node 'b' comes after its position 'wait' in version 2",
            id="journaled-node-moved-after",
        ),
        pytest.param(
            ("a", "b", "c"),
            "its position, node 'wait', is not declared by version 2",
            id="position-removed",
        ),
        pytest.param(
            ("a", "b", "wait:step", "c"),
            "node 'wait' at its position is a wait_for_signal but a step in version 2",
            id="position-kind-changed",
        ),
    ],
)
async def test_upgrade_moves_a_run_when_and_only_when_its_journal_fits_the_target(
    db: Any, target: tuple[str, ...], reason: str | None
) -> None:
    """Runs parked at `wait` with `a` and `b` journaled. A moved run goes on, from its
    position, on the target's code (a node the target inserts before the position is not
    run); a refused run keeps its queue, version and jobs, and its old worker finishes it."""
    log: Log = []
    v1, v2 = build(1, *OLD, log=log), build(2, *target, log=log)
    ids = await park(db, v1, n=2)
    async with open_engine(db, v1, v2) as engine:
        before = {r: await pinned(engine, r) for r in ids}
        report = await engine.upgrade("order", from_version=1, to_version=2)
        after = {r: await pinned(engine, r) for r in ids}
        for run_id in ids:
            assert await engine.signal(run_id, "go")
    assert (report.workflow, report.from_version, report.to_version) == ("order", 1, 2)
    if reason is not None:
        assert report.moved == ()
        assert report.refused == tuple(durable.UpgradeRefusal(r, reason) for r in sorted(ids))
        assert after == before
        await settle(db, v1, ids=ids, status="completed")
        assert {tag for _, _, tag in log} == {"v1"}
        return
    assert report.moved == tuple(sorted(ids))
    assert report.refused == ()
    for run_id in ids:
        assert after[run_id] == (v2.queue, 2, [])  # parked on a signal: no job
    log.clear()
    async with running_engine(db, v2) as engine:
        for run_id in ids:
            result = await engine.wait(run_id, timeout=10)
            declared_after = target[target.index("wait") + 1 :]
            assert result == {
                "a": "a v1",
                "b": "b v1",
                "wait": None,
                **{n: f"{n} v2" for n in declared_after},
            }
            assert (await engine.get_run(run_id)).version == 2
    assert sorted(key for _, key, _ in log) == sorted(list(target[target.index("wait") + 1 :]) * 2)


async def test_upgrade_moves_the_jobs_of_a_run_and_only_workers_of_the_target_claim_them(
    db: Any,
) -> None:
    """A run with a due job (a step retrying after its backoff) moves with its job; the
    old worker no longer claims it, the new one does at once."""
    log: Log = []
    v1, v2 = build(1, "a", "b", log=log), build(2, "a", "b", "c", log=log)
    async with open_engine(db, v1) as engine:
        run_id = await engine.start(v1, {"fail": ["b"]})
    async with running_engine(db, v1) as engine:

        async def b_failed() -> bool:
            return len((await engine.get_run(run_id, journal=True)).attempts) == 1

        await eventually(b_failed)
    async with open_engine(db, v1, v2) as engine:
        await due_now(engine, run_id)
        report = await engine.upgrade("order", from_version=1)
        assert report.moved == (run_id,)
        assert report.to_version == 2
        assert await pinned(engine, run_id) == (v2.queue, 2, [("advance", v2.queue)])
    log.clear()
    async with running_engine(db, v1) as engine:
        other = await engine.start(v1, {})
        await engine.wait(other, timeout=10)
        assert await status_of(engine, run_id) == "running"
    assert [r for r, _, _ in log] == [other, other]
    async with running_engine(db, v2) as engine:
        assert await engine.wait(run_id, timeout=10) == {"a": "a v1", "b": "b v2", "c": "c v2"}


async def test_upgrade_after_a_forgotten_bump_moves_runs_to_the_current_shape_of_the_version(
    db: Any,
) -> None:
    old = build(1, "a", "wait", "c", tag="old")
    new = build(1, "a", "wait", "c", "d", tag="new")
    ids = await park(db, old, n=2)
    async with open_engine(db, new) as engine:
        assert [g.cause for g in (await engine.check()).stranded] == ["shape_changed"]
        report = await engine.upgrade("order", from_version=1, to_version=1)
        assert report.moved == tuple(sorted(ids))
        assert (await engine.check()).ok
    async with running_engine(db, new) as engine:
        for run_id in ids:
            assert await engine.signal(run_id, "go")
            assert await engine.wait(run_id, timeout=10) == {
                "a": "a old",
                "wait": None,
                "c": "c new",
                "d": "d new",
            }


async def test_a_dry_run_upgrade_says_what_would_move_and_changes_nothing(db: Any) -> None:
    v1, v2 = build(1, "a", "wait"), build(2, "a", "wait", "b")
    ids = await park(db, v1, n=3)
    async with open_engine(db, v1, v2) as engine:
        before = {r: await pinned(engine, r) for r in ids}
        dry = await engine.upgrade("order", from_version=1, dry_run=True)
        assert dry.dry_run
        assert dry.moved == tuple(sorted(ids))
        assert dry.refused == ()
        assert {r: await pinned(engine, r) for r in ids} == before
        real = await engine.upgrade("order", from_version=1)
        assert real.moved == dry.moved
        assert not real.dry_run
        again = await engine.upgrade("order", from_version=1)
        assert (again.moved, again.refused) == ((), ())  # nothing left at version 1


async def test_upgrade_keeps_the_branches_a_parallel_node_fanned_out(db: Any) -> None:
    """A run fanned out at `p` (branch y retrying after a long backoff) moves only to a
    parallel `p` with the same branch keys."""
    v1 = build(1, "a", "p=x+y")
    async with open_engine(db, v1) as engine:
        run_id = await engine.start(v1, {"fail": ["p#y"]})
    async with running_engine(db, v1) as engine:

        async def y_failed() -> bool:
            run = await engine.get_run(run_id, journal=True)
            return [a.key for a in run.attempts] == ["p#y"] and "p#x" in [
                e.key for e in run.journal
            ]

        await eventually(y_failed)
    added = build(2, "a", "p=x+y+z")
    async with open_engine(db, v1, added) as engine:
        report = await engine.upgrade("order", from_version=1)
    assert report.refused == (
        durable.UpgradeRefusal(
            run_id,
            "parallel 'p' fanned out branches ['x', 'y'], but version 2 declares ['x', 'y', 'z']",
        ),
    )
    appended = build(2, "a", "p=y+x", "b")
    async with open_engine(db, v1, appended) as engine:
        assert (await engine.upgrade("order", from_version=1)).moved == (run_id,)
        await due_now(engine, run_id)
    async with running_engine(db, appended) as engine:
        result = await engine.wait(run_id, timeout=10)
    assert result == {"a": "a v1", "p": {"y": "p#y v2", "x": "p#x v1"}, "b": "b v2"}


async def test_upgrade_keeps_the_branch_a_route_chose(db: Any) -> None:
    v1 = build(1, "a", "r=x+y")
    async with open_engine(db, v1) as engine:
        run_id = await engine.start(v1, {"fail": ["r#x"]})
    async with running_engine(db, v1) as engine:

        async def x_failed() -> bool:
            return [a.key for a in (await engine.get_run(run_id, journal=True)).attempts] == ["r"]

        await eventually(x_failed)
    async with open_engine(db, v1, build(2, "a", "r=y+z")) as engine:
        report = await engine.upgrade("order", from_version=1)
    assert report.refused == (
        durable.UpgradeRefusal(
            run_id, "route 'r' chose branch 'x', which version 2 does not declare"
        ),
    )
    v2 = build(2, "a", "r=z+x")
    async with open_engine(db, v1, v2) as engine:
        assert (await engine.upgrade("order", from_version=1)).moved == (run_id,)
        await due_now(engine, run_id)
    async with running_engine(db, v2) as engine:
        assert (await engine.wait(run_id, timeout=10))["r"] == {"branch": "x", "result": "r#x v2"}


async def test_upgrade_refuses_a_run_whose_non_transactional_step_is_in_flight(db: Any) -> None:
    started, release = anyio.Event(), anyio.Event()
    v1 = durable.Workflow("order")

    async def slow(ctx: durable.Context) -> str:
        started.set()
        with anyio.fail_after(10):
            await release.wait()
        return "slow v1"

    v1.step("slow", slow, transactional=False)
    v2 = durable.Workflow("order", version=2).step("slow", slow, transactional=False)
    async with running_engine(db, v1) as engine:
        run_id = await engine.start(v1, {})
        await started.wait()
        async with open_engine(db, v1, v2) as other:
            report = await other.upgrade("order", from_version=1)
        release.set()
        assert await engine.wait(run_id, timeout=10) == {"slow": "slow v1"}
    assert report.refused == (
        durable.UpgradeRefusal(
            run_id, "a transactional=False attempt is in flight; upgrade it once that settles"
        ),
    )


async def test_an_upgraded_parent_is_woken_by_its_child_on_its_new_queue(db: Any) -> None:
    """A parent waiting for its child moves; the child's final transaction, which gives the
    parent its job without locking it, gives it on the parent's new queue."""
    kid = build(1, "wait", name="kid")
    p1 = durable.Workflow("parent").child_workflow("child", lambda ctx: ("kid", {}))
    p2 = durable.Workflow("parent", version=2).child_workflow("child", lambda ctx: ("kid", {}))

    @p2.step
    async def after(ctx: durable.Context) -> str:
        return "after v2"

    async with open_engine(db, p1, kid) as engine:
        parent = await engine.start(p1, {})
    async with running_engine(db, p1, kid) as engine:

        async def child_parked() -> str | None:
            run = await engine.get_run(parent)
            if run.children and await status_of(engine, run.children[0]) == "waiting":
                return run.children[0]
            return None

        child = await eventually(child_parked)
    async with open_engine(db, p1, p2, kid) as engine:
        assert (await engine.upgrade("parent", from_version=1)).moved == (parent,)
    async with running_engine(db, p2, kid) as engine:
        assert await engine.signal(child, "go")
        result = await engine.wait(parent, timeout=10)
    assert result == {"child": {"wait": None}, "after": "after v2"}


async def test_upgrade_while_workers_of_both_versions_run_moves_each_run_once_and_safely(
    db: Any,
) -> None:
    """Workers of v1 and of v2 run while upgrades move the v1 runs to v2, again and again:
    every step commits once, a run's steps ran on v1 up to its move and on v2 after, and
    exactly the runs that moved have v2's appended step."""
    steps = [f"s{i}" for i in range(1, 7)]

    def chain(version: int, names: list[str]) -> durable.Workflow:
        wf = durable.Workflow("chain", version=version)
        for name in names:

            async def record(ctx: durable.Context, name: str = name) -> int:
                assert ctx.conn is not None
                await ctx.conn.execute(
                    "INSERT INTO effects (run_id, step, version) VALUES ($1, $2, $3)",
                    ctx.run_id,
                    name,
                    version,
                )
                await anyio.sleep(0.01)
                return version

            wf.step(name, record)
        return wf

    v1, v2 = chain(1, steps), chain(2, [*steps, "s7"])
    setup = (
        "CREATE TABLE effects (id bigserial PRIMARY KEY, run_id text, step text, version int, "
        "UNIQUE (run_id, step))"
    )
    async with open_engine(db, v1, v2, setup=setup) as engine:
        ids = [await engine.start("chain", {}, version=1) for _ in range(40)]
    moved: list[str] = []
    async with (
        running_engine(db, v1, concurrency=3),
        running_engine(db, v2, concurrency=3),
        open_engine(db, v1, v2) as engine,
    ):
        while True:
            report = await engine.upgrade("chain", from_version=1)
            assert report.refused == ()
            moved += report.moved
            runs = [await engine.get_run(r) for r in ids]
            if all(r.status is durable.RunStatus.COMPLETED for r in runs):
                break
            await anyio.sleep(0.05)
    assert moved, "no upgrade landed while runs were in flight"
    assert len(moved) == len(set(moved))
    async with open_engine(db, v1, v2) as engine:
        rows = await fetch(engine, "SELECT run_id, step, version FROM effects ORDER BY id")
        versions = {r: (await engine.get_run(r)).version for r in ids}
    by_run: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for row in rows:
        by_run[row["run_id"]].append((row["step"], row["version"]))
    for run_id in ids:
        done = by_run[run_id]
        names = [s for s, _ in done]
        seen = [v for _, v in done]
        assert names == ([*steps, "s7"] if versions[run_id] == 2 else steps), done
        assert seen == sorted(seen), done  # v1 up to the move, v2 after
        assert (run_id in moved) == (versions[run_id] == 2)


# -- rolling deploys -------------------------------------------------------------------------

BASE = ("a", "wait", "p=x+y", "c")
CHANGES = {
    "appended-node": ("a", "wait", "p=x+y", "c", "d"),
    "added-branch": ("a", "wait", "p=x+y+z", "c"),
    "removed-node": ("a", "wait", "p=x+y"),
}


@pytest.mark.parametrize("bump", [False, True], ids=["same-version", "version-bump"])
@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_rolling_deploy_never_lets_one_shape_continue_a_run_of_another(
    db: Any, change: str, bump: bool
) -> None:
    """Old and new code side by side, runs of each parked mid-way and then signalled: an
    old worker never continues a run the new code started, a new worker never continues a
    run of the old shape, and each finishes on the code it started with. With a version
    bump the new release may keep the old version registered, and then continues old runs
    on the old code."""
    log: Log = []
    old = build(1, *BASE, tag="old", log=log)
    new = build(2 if bump else 1, *CHANGES[change], tag="new", log=log)
    (r_new,) = await park(db, new)
    (r_old,) = await park(db, old)
    log.clear()

    async with running_engine(db, old) as engine:
        assert await engine.signal(r_new, "go")  # due first: claims go oldest first
        assert await engine.signal(r_old, "go")
        result = await engine.wait(r_old, timeout=10)
        assert set(result) == {"a", "wait", "p", "c"}
        assert (await engine.get_run(r_new)).status is durable.RunStatus.WAITING
        assert await journal_keys(engine, r_new) == ["a"]
    assert {(r, tag) for r, _, tag in log} == {(r_old, "old")}

    (r_old2,) = await park(db, old)
    log.clear()
    async with running_engine(db, new) as engine:
        assert await engine.signal(r_old2, "go")
        await engine.wait(r_new, timeout=10)
        assert await journal_keys(engine, r_old2) == ["a"]
        assert (await engine.get_run(r_old2)).status is durable.RunStatus.WAITING
        final = await engine.get_run(r_new)
    assert {(r, tag) for r, _, tag in log} == {(r_new, "new")}
    assert set(final.result) == {n.split("=")[0] for n in CHANGES[change]}
    assert final.version == new.version

    log.clear()
    workers = (old, new) if bump else (old,)
    await settle(db, *workers, ids=[r_old2], status="completed")
    assert {(r, tag) for r, _, tag in log} == {(r_old2, "old")}
