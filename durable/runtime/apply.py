"""The one writer of run state: turns a transition into the SQL call that journals it,
moves the run and ensures its jobs (sql/functions.sql), in the job's transaction.

Each function returns the run's job when it is due at once (a `Follow`), so that the
worker may continue the run on the same slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ulid import ULID

from durable import metrics
from durable.db import Connection, translated
from durable.runtime.transition import (
    Admit,
    BranchDone,
    Cancel,
    Choose,
    Compensated,
    Complete,
    Fail,
    FanOut,
    Finish,
    Iterate,
    Noop,
    Park,
    Retry,
    RunState,
    StartChild,
    Transition,
    WaitLimit,
)
from durable.sql import Queries
from durable.workflow import Workflow


@dataclass(frozen=True, slots=True)
class Follow:
    """The run's job, due at once. `written_by` (the transaction id) and `clock` are set
    when this transaction moved the run to its next node and left the job as it was: the
    worker may then re-lock the job after the commit instead of claiming it afresh."""

    job: int
    written_by: int | None = None
    clock: datetime | None = None


async def apply(
    conn: Connection, q: Queries, s: RunState, wf: Workflow, t: Transition
) -> Follow | None:
    """Apply transition `t` of run `s` (a `Lease` or `BranchDone` has its own function).

    A change the database refuses comes out as the `DurableError` it stands for (e.g.
    `IllegalTransition`), which the worker records as the job's failure."""
    with translated():
        return await _write(conn, q, s, wf, t)


async def _write(
    conn: Connection, q: Queries, s: RunState, wf: Workflow, t: Transition
) -> Follow | None:
    node = s.current_node
    started = s.now
    follow: int | None
    _count(s, wf, t)
    if isinstance(t, Complete):
        return await _complete(conn, q, s, wf, t)
    if isinstance(t, Retry):
        branch_job = s.job_id if s.task == "branch" else None
        follow = await conn.fetchval(
            q["retry_node"], s.run_id, t.key, t.attempt, t.error, started, t.delay, branch_job
        )
    elif isinstance(t, Fail):
        follow = await conn.fetchval(
            q["fail_node"], s.run_id, t.key, node, t.attempt, t.error, started
        )
    elif isinstance(t, Park):
        follow = await conn.fetchval(q["park"], s.run_id, t.wake_at, t.signal)
    elif isinstance(t, Iterate):
        follow = await conn.fetchval(
            q["iterate"], s.run_id, node, t.index, t.text, s.attempt, started
        )
    elif isinstance(t, FanOut):
        follow = await conn.fetchval(q["fan_out"], s.run_id, list(t.branches))
    elif isinstance(t, Choose):
        follow = await conn.fetchval(q["choose"], s.run_id, node, t.branch, s.attempt, started)
    elif isinstance(t, StartChild):
        follow = await conn.fetchval(
            q["start_child"],
            s.run_id,
            node,
            s.attempt,
            str(ULID()),
            t.workflow.name,
            t.workflow.queue,
            t.input,
            t.workflow.nodes[0].name,
            t.concurrency_key,
            t.workflow.concurrency,
        )
    elif isinstance(t, Compensated):
        follow = await conn.fetchval(
            q["compensated"], s.run_id, t.key, t.node, t.status, t.text, t.error, s.attempt, started
        )
    elif isinstance(t, Finish):
        await conn.execute(q["finish_run"], s.run_id, t.status, None)
        follow = None
    elif isinstance(t, Cancel):
        await conn.execute(q["apply_cancel"], s.run_id, t.reason)
        follow = await conn.fetchval(q["ensure_jobs"], s.run_id)
    elif isinstance(t, WaitLimit):
        follow = await conn.fetchval(q["limit_park"], s.run_id, t.wake_at, t.wait)
    elif isinstance(t, Admit):
        follow = await conn.fetchval(q["admit"], s.run_id)
    elif isinstance(t, Noop):
        follow = await conn.fetchval(q["ensure_jobs"], s.run_id)
    else:
        raise TypeError(f"no apply for {t!r}")
    return None if follow is None else Follow(follow)


async def _complete(
    conn: Connection, q: Queries, s: RunState, wf: Workflow, t: Complete
) -> Follow | None:
    nxt = s.cursor + 1
    name = wf.nodes[s.cursor].name
    row = await conn.fetchrow(
        q["complete_node"],
        s.run_id,
        name,
        t.text,
        s.attempt,
        s.now,
        t.replay,
        nxt,
        wf.nodes[nxt].name if nxt < len(wf.nodes) else None,
        t.consume,
        # The advance job a plain claim holds is due; a lease holder's is not (see below).
        s.job_id if s.task == "advance" and s.lease_token is None else None,
    )
    if t.note is not None:
        await conn.execute(q["note_journal"], s.run_id, name, t.note)
    if row is None or row["follow"] is None:
        return None
    return Follow(row["follow"], row["written_by"], row["clock"])


def _count(s: RunState, wf: Workflow, t: Transition) -> None:
    """Count the transition in this process's metrics (no-op without prometheus-client)."""
    node = s.current_node or ""
    if isinstance(t, Complete):
        if not t.replay and s.task != "compensate":
            metrics.attempt(wf.name, node)
        if s.cursor + 1 >= len(wf.nodes):
            metrics.run_finished(wf.name, "completed")
    elif isinstance(t, Retry | Fail):
        metrics.attempt(wf.name, t.key or node, failed=True, final=isinstance(t, Fail))
    elif isinstance(t, Compensated):
        metrics.attempt(wf.name, t.key, failed=t.status == "failed", final=True)
    elif isinstance(t, Finish):
        metrics.run_finished(wf.name, t.status)


async def branch_done(conn: Connection, q: Queries, s: RunState, t: BranchDone) -> int:
    """Journal a committed branch; return how many branches of the node are left."""
    with translated():
        left: int = await conn.fetchval(
            q["branch_done"], s.run_id, s.current_node, t.branch, t.text, s.attempt, s.now, s.job_id
        )
    return left


async def lease(conn: Connection, q: Queries, s: RunState, token: object, seconds: float) -> None:
    """Lease the run's job to a `transactional=False` attempt for `seconds`."""
    with translated():
        await conn.execute(q["lease"], s.run_id, token, seconds, s.job_id)
