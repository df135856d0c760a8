"""The re-lock of a run a worker continues (relock_v1, sql/functions.sql): the worker takes
the run as it wrote it only when nobody else touched it since; otherwise DU040."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import durable
from durable.sql import Queries

Q = Queries("durable")


async def noop(ctx: durable.Context) -> None:
    return None


WF = durable.Workflow("relocked").step("first", noop).step("second", noop)


async def complete_first(
    db: Any, conn: asyncpg.Connection, before: str | None = None
) -> tuple[str, int, asyncpg.Record]:
    """Start a run, claim its job on `conn` and complete its first step there, as a worker
    does, and commit; `before` runs on another connection (and commits) while the step
    runs, with the run id as $1. The run id, the job id and complete_node_v2's row."""
    async with durable.Engine(db.dsn, workflows=[WF]) as engine:
        run_id = await engine.start(WF)
    async with conn.transaction():
        job = await conn.fetchrow(Q["claim"], [WF.queue])
        assert job is not None
        assert job["run_id"] == run_id
        if before is not None:
            other = await asyncpg.connect(db.dsn)
            try:
                await other.execute(before, run_id)
            finally:
                await other.close()
        done = await conn.fetchrow(
            Q["complete_node"],
            run_id,
            "first",
            "null",
            1,
            None,
            False,
            1,
            "second",
            None,
            job["id"],
        )
    assert done["follow"] == job["id"]  # the job stays the run's, due at once
    return run_id, job["id"], done


@pytest.fixture
async def moved(db: Any) -> AsyncIterator[dict[str, Any]]:
    """A run whose first step a worker connection completed and committed, as the worker
    does before it re-locks: the job id, the run id and the transaction that moved it."""
    conn = await asyncpg.connect(db.dsn)
    try:
        run_id, job_id, done = await complete_first(db, conn)
        yield {"conn": conn, "dsn": db.dsn, "job": job_id, "run": run_id, "xid": done["written_by"]}
    finally:
        await conn.close()


async def relock(m: dict[str, Any]) -> None:
    conn: asyncpg.Connection = m["conn"]
    async with conn.transaction():
        await conn.execute("SELECT durable.relock_v1($1, $2::text::xid)", m["job"], str(m["xid"]))
        # Job and run are locked by this transaction now.
        other = await asyncpg.connect(m["dsn"])
        try:
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute(
                    "SELECT 1 FROM durable.jobs WHERE id = $1 FOR UPDATE NOWAIT", m["job"]
                )
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute(
                    "SELECT 1 FROM durable.runs WHERE id = $1 FOR UPDATE NOWAIT", m["run"]
                )
        finally:
            await other.close()


async def test_relock_takes_the_run_nobody_touched(moved: dict[str, Any]) -> None:
    await relock(moved)


async def _refused(m: dict[str, Any]) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await relock(m)
    assert caught.value.sqlstate == "DU040"


async def _in_other(m: dict[str, Any], fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> None:
    other = await asyncpg.connect(m["dsn"])
    try:
        await fn(other)
    finally:
        await other.close()


async def test_relock_refuses_a_run_written_since(moved: dict[str, Any]) -> None:
    async def touch(c: asyncpg.Connection) -> None:
        await c.execute("UPDATE durable.runs SET updated_at = now() WHERE id = $1", moved["run"])

    await _in_other(moved, touch)
    await _refused(moved)


async def test_relock_refuses_a_job_another_worker_holds(moved: dict[str, Any]) -> None:
    other = await asyncpg.connect(moved["dsn"])
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM durable.jobs WHERE id = $1 FOR UPDATE", moved["job"])
            await _refused(moved)
    finally:
        await other.close()


async def test_relock_refuses_a_run_a_client_holds(moved: dict[str, Any]) -> None:
    other = await asyncpg.connect(moved["dsn"])
    try:
        async with other.transaction():
            # What cancel_tree_v1 and signal_v1 take first.
            await other.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", moved["run"]
            )
            await _refused(moved)
    finally:
        await other.close()


async def _written_by(db: Any, before: str | None = None) -> int | None:
    conn = await asyncpg.connect(db.dsn)
    try:
        return (await complete_first(db, conn, before))[2]["written_by"]
    finally:
        await conn.close()


async def test_a_step_that_nothing_stopped_hands_its_run_on_as_written(db: Any) -> None:
    assert await _written_by(db) is not None


@pytest.mark.parametrize(
    "before",
    [
        "INSERT INTO durable.cancel_requests (run_id, reason) VALUES ($1, 'stop')",
        "INSERT INTO durable.journal (run_id, key, node, status, result)"
        " VALUES ($1, 'second', 'second', 'completed', 'null')",
        "INSERT INTO durable.paused_workflows (workflow)"
        " SELECT workflow FROM durable.runs WHERE id = $1",
    ],
    ids=["cancel-requested", "journal-row-to-replay", "workflow-paused"],
)
async def test_a_step_whose_run_was_stopped_meanwhile_does_not_hand_it_on_as_written(
    db: Any, before: str
) -> None:
    """A cancel requested, a journal row at the next node (a retried run) or a paused
    workflow, committed while the step ran: complete_node_v2 gives no `written_by`, so the
    worker neither re-locks the run as it wrote it nor goes on with it in the same
    transaction (a chain); it claims the job afresh, and the claim sees why."""
    assert await _written_by(db, before) is None


async def test_relock_takes_a_run_whose_cancel_came_after_the_commit(
    moved: dict[str, Any],
) -> None:
    """What stops a run is read as the step's outcome is written; a cancel requested after
    that commit is seen at the end of the node the re-lock goes on with, as if it had come
    while that node ran (the canceller waits for the run's lock meanwhile)."""

    async def request(c: asyncpg.Connection) -> None:
        await c.execute(
            "INSERT INTO durable.cancel_requests (run_id, reason) VALUES ($1, 'stop')",
            moved["run"],
        )

    await _in_other(moved, request)
    await relock(moved)
    await _in_other(
        moved,
        lambda c: c.execute("DELETE FROM durable.cancel_requests WHERE run_id = $1", moved["run"]),
    )


async def _relock_behind(m: dict[str, Any], sql: str) -> asyncpg.PostgresError | None:
    """Re-lock while another transaction holds the run's row (it ran `sql` on it); the
    re-lock is seen waiting for that lock before the other commits."""
    other = await asyncpg.connect(m["dsn"])
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(sql, m["run"])
        pid = m["conn"].get_server_pid()
        task = asyncio.ensure_future(relock(m))
        with anyio.fail_after(10):
            while not await other.fetchval(  # noqa: ASYNC110 (polls pg_stat_activity)
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            ):
                await anyio.sleep(0.01)
        await tx.commit()
        try:
            await task
        except asyncpg.PostgresError as exc:
            return exc
        return None
    finally:
        await other.close()


async def test_relock_that_waited_for_a_writer_refuses_the_run_it_wrote(
    moved: dict[str, Any],
) -> None:
    exc = await _relock_behind(moved, "UPDATE durable.runs SET updated_at = now() WHERE id = $1")
    assert exc is not None
    assert exc.sqlstate == "DU040"


async def test_relock_that_waited_for_a_reader_takes_the_run(moved: dict[str, Any]) -> None:
    assert (
        await _relock_behind(moved, "SELECT 1 FROM durable.runs WHERE id = $1 FOR NO KEY UPDATE")
        is None
    )
