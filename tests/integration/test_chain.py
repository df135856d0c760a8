"""Chains: a run's consecutive steps run on one worker slot in one transaction and commit
together (`Working._work`, `Claiming.chain`); what stops a run between two of them; and a
failure outside a handler in a chain, which rolls the chain back and stays bounded."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from helpers import (
    counting,
    eventually,
    fetch,
    fetchval,
    open_engine,
    refusing_journal,
    until_blocked,
)

import durable


def steps(name: str, n: int, calls: Counter[str], **options: Any) -> durable.Workflow:
    wf = durable.Workflow(name)
    for i in range(n):
        wf.step(f"s{i}", counting(f"s{i}", calls), **options)
    return wf


async def transactions_of(engine: durable.Engine, run_id: str) -> int:
    """How many transactions wrote the run's journal rows (their xmin)."""
    return await fetchval(
        engine,
        "SELECT count(DISTINCT xmin::text) FROM durable.journal WHERE run_id = $1",
        run_id,
    )


async def finished(engine: durable.Engine, run_id: str) -> None:
    async def done() -> bool:
        run = await engine.get_run(run_id)
        return run.status.value in ("completed", "failed", "cancelled")

    await eventually(done, timeout=20)


async def run_to_end(engine: durable.Engine, wf: durable.Workflow, **worker: Any) -> str:
    async with engine.worker(concurrency=2, poll_interval=0.05, **worker):
        run_id = await engine.start(wf)
        await engine.wait(run_id, timeout=15)
    return run_id


async def test_consecutive_steps_of_a_run_commit_together(db: Any) -> None:
    calls: Counter[str] = Counter()
    wf = steps("chained", 8, calls)
    async with open_engine(db, wf) as engine:
        chained = await run_to_end(engine, wf)
        alone = await run_to_end(engine, wf, chain_size=1)
        assert await transactions_of(engine, alone) == 8
        # One transaction for all 8 unless the machine was so slow that the chain's
        # wall-clock bound (10 windows, 50 ms) cut it; never one per step.
        assert await transactions_of(engine, chained) <= 4
    assert calls == Counter({f"s{i}": 2 for i in range(8)})


async def test_a_chain_commits_once_its_steps_spent_the_window(db: Any) -> None:
    async def slow(ctx: durable.Context) -> None:
        await asyncio.sleep(0.004)

    wf = durable.Workflow("windowed")
    for i in range(6):
        wf.step(f"s{i}", slow)
    async with open_engine(db, wf) as engine:
        run_id = await run_to_end(engine, wf, batch_window=0.005)
        # 4 ms each against a 5 ms window: a transaction ends after its second step.
        assert await transactions_of(engine, run_id) >= 3


async def test_a_chain_ends_at_a_step_that_leaves_the_transaction(db: Any) -> None:
    calls: Counter[str] = Counter()
    wf = durable.Workflow("leaving")
    wf.step("a", counting("a", calls))
    wf.step("b", counting("b", calls))
    wf.step("outside", counting("outside", calls), transactional=False)
    wf.step("c", counting("c", calls))
    async with open_engine(db, wf) as engine:
        run_id = await run_to_end(engine, wf)
        rows = await fetch(
            engine, "SELECT key, xmin::text AS tx FROM durable.journal WHERE run_id = $1", run_id
        )
    tx = {r["key"]: r["tx"] for r in rows}
    assert tx["a"] == tx["b"]
    assert tx["outside"] != tx["b"]
    assert calls == Counter(a=1, b=1, outside=1, c=1)


async def test_a_cancel_requested_in_a_step_stops_the_chain_there(db: Any) -> None:
    """A handler that cancels its own run: the request commits at once and the cancel takes
    effect as the node commits, so the next step, which the chain would run in the same
    transaction, never runs."""
    calls: Counter[str] = Counter()
    box: list[durable.Engine] = []
    wf = durable.Workflow("self_cancelled")

    @wf.step
    async def a(ctx: durable.Context) -> None:
        calls["a"] += 1
        await box[0].cancel(ctx.run_id)

    wf.step("b", counting("b", calls))
    async with open_engine(db, wf) as engine:
        box.append(engine)
        async with engine.worker(concurrency=2, poll_interval=0.05):
            run_id = await engine.start(wf)
            await finished(engine, run_id)
        run = await engine.get_run(run_id)
    assert run.status.value == "cancelled"
    assert calls == Counter(a=1)


async def test_a_failure_recording_a_chained_step_is_a_bounded_attempt_of_that_step(
    db: Any,
) -> None:
    """The database refuses the journal row of `c`, the third step, which a chain runs in
    the transaction of `a` and `b`. The chain rolls back whole (a and b run again), the run
    goes on one job at a time, and the refusal is then recorded as attempts of `c`, which
    count against its budget: the run fails at `c` instead of re-running the chain forever."""
    setup = refusing_journal("c")
    calls: Counter[str] = Counter()
    wf = durable.Workflow("refused_in_chain")
    wf.step("a", counting("a", calls))
    wf.step("b", counting("b", calls))
    wf.step("c", counting("c", calls), max_attempts=2, backoff=0)
    async with open_engine(db, wf, setup=setup) as engine:
        async with engine.worker(concurrency=2, poll_interval=0.05):
            run_id = await engine.start(wf)
            await finished(engine, run_id)
        run = await engine.get_run(run_id)
        attempts = await fetchval(
            engine,
            "SELECT count(*) FROM durable.attempts WHERE run_id = $1 AND key = 'c'",
            run_id,
        )
        completed = await fetch(
            engine,
            "SELECT key FROM durable.journal WHERE run_id = $1 AND status = 'completed'"
            " ORDER BY key",
            run_id,
        )
    assert run.status.value == "failed", run
    assert run.error is not None
    assert "journal refuses c" in run.error
    assert attempts == 2
    assert [r["key"] for r in completed] == ["a", "b"]
    # The chain ran a, b and c once and rolled back; then a and b committed, and c ran
    # its two recorded attempts (a slot descheduled in between may add a lost-worker rerun).
    assert calls["a"] == calls["b"] == 2
    assert 3 <= calls["c"] <= 3 + 5


async def test_a_client_cancel_waits_for_the_node_in_flight_not_for_the_chain(db: Any) -> None:
    """A chain whose window has room left (a long one here) would go on after the step in
    flight; a client's cancel waiting for the run (take_run_v1) makes it commit at that
    step's end instead: the step in flight finishes, the next one never runs."""
    calls: Counter[str] = Counter()
    entered, release = asyncio.Event(), asyncio.Event()
    wf = durable.Workflow("cancelled_mid_chain")
    wf.step("a", counting("a", calls))

    @wf.step
    async def b(ctx: durable.Context) -> None:
        calls["b"] += 1
        entered.set()
        await release.wait()

    wf.step("c", counting("c", calls))
    async with open_engine(db, wf) as engine:
        async with engine.worker(concurrency=2, poll_interval=0.05, batch_window=60):
            run_id = await engine.start(wf)
            await asyncio.wait_for(entered.wait(), 10)
            cancel = asyncio.ensure_future(engine.cancel(run_id))
            await until_blocked(engine, "cancel_tree_v1")
            release.set()
            assert await asyncio.wait_for(cancel, 10) is True
            await finished(engine, run_id)
        run = await engine.get_run(run_id, journal=True)
    assert run.status.value == "cancelled"
    assert ("b", "completed") in [(e.key, e.status) for e in run.journal]
    assert calls == Counter(a=1, b=1)


async def test_get_run_with_its_journal_reads_one_moment(db: Any) -> None:
    """`get_run(journal=True)` reads the run, its journal and its attempts in three
    statements. A node's commit between them (more likely now that a chain commits several
    nodes at once) showed a run behind its own history: here the attempts' read waits for a
    transaction that records an attempt and touches the run, and the answer must show all
    of that transaction or none of it, never the attempt without the run's change."""
    wf = durable.Workflow("one_moment")
    wf.step("a", counting("a", Counter()))
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        async with engine.pool.acquire() as writer:
            tx = writer.transaction()
            await tx.start()
            await writer.execute("LOCK TABLE durable.attempts IN ACCESS EXCLUSIVE MODE")
            read = asyncio.ensure_future(engine.get_run(run_id, journal=True))
            await until_blocked(engine, 'FROM "durable".attempts')
            await writer.execute(
                "INSERT INTO durable.attempts (run_id, key, attempt, error, started_at, epoch)"
                " VALUES ($1, 'a', 1, 'boom', now(), 0)",
                run_id,
            )
            await writer.execute(
                "UPDATE durable.runs SET updated_at = '2030-01-01' WHERE id = $1", run_id
            )
            await tx.commit()
        run = await asyncio.wait_for(read, 10)
    assert (run.updated_at.year == 2030) == (len(run.attempts) == 1), run


async def test_the_dashboards_run_page_reads_one_moment(db: Any) -> None:
    """The same root as above in the dashboard's run page, which read the mailbox on a
    connection of its own after `get_run`: here the mailbox's read waits for a transaction
    that puts a signal in it and touches the run; the page shows all of it or none."""
    from durable.web import data

    wf = durable.Workflow("page_moment")
    wf.wait_for_signal("go", "go")
    async with open_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        async with engine.pool.acquire() as writer:
            tx = writer.transaction()
            await tx.start()
            await writer.execute("LOCK TABLE durable.signals IN ACCESS EXCLUSIVE MODE")
            page = asyncio.ensure_future(data.run_detail(engine, run_id))
            await until_blocked(engine, 'FROM "durable".signals')
            await writer.execute(
                "INSERT INTO durable.signals (run_id, name, payload) VALUES ($1, 'go', '1')",
                run_id,
            )
            await writer.execute(
                "UPDATE durable.runs SET updated_at = '2030-01-01' WHERE id = $1", run_id
            )
            await tx.commit()
        detail = await asyncio.wait_for(page, 10)
    assert detail["updated_at"].startswith("2030") == (len(detail["mailbox"]) == 1), detail
