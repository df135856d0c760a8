"""Where a node runs: claim a job with its run, let the node's module decide, apply.

One `Runner` per worker. Its hooks plug into the queue worker (`durable.worker.Worker`):
`claim` takes the most urgent due job of the served queues with its run locked and read,
`claim_follow` commits and claims the job the last transition handed on (the run goes on
on the same slot), and `handle` decides and applies, all in the job's transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

import asyncpg

from durable.codec import returns
from durable.db import Connection
from durable.errors import DefinitionChanged
from durable.flow import Limit
from durable.nodes import DEFAULT_MAX_ATTEMPTS
from durable.queue import Job, JobQueue
from durable.queue import Outcome as JobOutcome
from durable.runtime import apply, compensation, lease
from durable.runtime.apply import Follow
from durable.runtime.attempt import run_attempt
from durable.runtime.claiming import Claiming, _Memo
from durable.runtime.nodes import child, loop, parallel, route, signal, sleep, step
from durable.runtime.threads import Threads
from durable.runtime.transition import (
    Admit,
    BranchDone,
    Cancel,
    Complete,
    Fail,
    Finish,
    Lease,
    Noop,
    Outcome,
    Retry,
    RunState,
    StartChild,
    Transition,
    after_failure,
    describe,
)
from durable.runtime.visit import JobVisit, Shared, job_from_row, state_from_row
from durable.sql import Queries
from durable.stepconn import undo
from durable.tracing import node_span, record_failure
from durable.workflow import Loop, Parallel, Step, Workflow, default_backoff

log = logging.getLogger("durable.runner")


_FINISHED = ("completed", "failed", "cancelled")

_KINDS: dict[str, Callable[[Any, Any], Awaitable[Transition]]] = {
    "step": step.visit,
    "sleep": sleep.visit,
    "sleep_until": sleep.visit,
    "wait_for_signal": signal.visit,
    "parallel": parallel.visit,
    "route": route.visit,
    "loop": loop.visit,
    "child_workflow": child.visit,
}


def _traced(t: Transition) -> Transition:
    """Mark the current node span with a failed attempt (no-op without OpenTelemetry)."""
    if isinstance(t, Retry | Fail):
        record_failure(t.cause or RuntimeError(t.error), final=isinstance(t, Fail))
    return t


class Runner(Claiming):
    """Runs the jobs of the given workflows: one per worker, sharing nothing with others."""

    def __init__(
        self,
        queries: Queries,
        workflows: Iterable[Workflow],
        pool: asyncpg.Pool,
        *,
        lease_seconds: float = 30.0,
        transaction_timeout: float | None = 60.0,
        max_claims: int = 5,
        threads: Threads | None = None,
        limits: Mapping[str, Limit] | None = None,
    ) -> None:
        self.q = queries
        self.pool = pool
        workflows = list(workflows)
        self.by_queue = {wf.queue: wf for wf in workflows}
        # Child runs start at the highest version this worker registers.
        self.by_name = {wf.name: wf for wf in sorted(workflows, key=lambda w: w.version)}
        self.queues = sorted(self.by_queue)
        self.lease_seconds = lease_seconds
        self.transaction_timeout = transaction_timeout
        self.max_claims = max_claims
        self.jobs = JobQueue(queries)
        # Follow job id -> what this worker knows of the run it handed on to itself.
        self._memos: dict[int, _Memo] = {}
        self.shared = Shared(
            queries,
            transaction_timeout,
            max_claims,
            self.by_name,
            pool,
            threads or Threads(),
            limits or {},
        )

    # -- handling --------------------------------------------------------------------------

    async def handle(self, conn: Connection, job: Job) -> JobOutcome:
        """Decide what the job's run does next and apply it, in the job's transaction."""
        s: RunState = job.prefetched
        wf = self.by_queue[job.queue]
        lost = await self._lost(job)
        v = JobVisit(self.shared, conn, s, wf, bool(lost))
        try:
            if s.lease_token is not None:
                await conn.execute(self.q["release_lease"], s.job_id)
            transition = await self._decide(v, wf)
            if isinstance(transition, Lease):
                return await self._lease(v, wf, transition.token)
            follow = await self._apply(v, wf, transition)
            if v.holds is not None:  # the slot frees as this transaction commits
                await conn.execute(self.q["limit_wake"], v.holds)
            self._remember(job, s, wf, transition, follow)
            if lost is not None:  # committed with the work: the count is of deaths in a row
                await conn.execute(self.q["forget_claims"], job.id)
        finally:
            for c in v.conns:
                c.expire()
        return JobOutcome(
            settled=True,
            follow=None if follow is None else follow.job,
            # A cancel reaches the run's children, whose jobs a batch may hold as read.
            solo=isinstance(transition, Cancel),
            busy=v.busy,
        )

    async def _decide(self, v: JobVisit, wf: Workflow) -> Transition:
        s = v.state
        if s.task == "compensate":
            if s.status != "compensating":
                return Noop("the run is not compensating")
            rows = list(await v.conn.fetch(self.q["journal_newest"], s.run_id))
            with node_span("compensate", "compensation", run_id=s.run_id, attempt=s.attempt):
                return _traced(await compensation.visit(v, wf, rows))
        if s.status in _FINISHED or s.status == "compensating":
            return Noop("the run finished or is compensating")
        if s.cancel is not None:
            return Noop("a cancel is pending") if s.task == "branch" else Cancel(s.cancel)
        if s.task == "admit":
            return Admit()
        if s.cursor >= len(wf.nodes) or wf.nodes[s.cursor].name != s.current_node:
            changed = DefinitionChanged(
                f"run {s.run_id} is at node {s.current_node!r} (#{s.cursor + 1}), which "
                f"workflow {wf.name!r} does not declare there"
            )
            return after_failure(s, s.current_node or f"#{s.cursor}", changed, 1, lambda _: 0.0)
        node = wf.nodes[s.cursor]
        if s.task == "branch":
            if not isinstance(node, Parallel) or s.branch is None:
                return Noop("the run is not at a parallel node")
            with node_span("branch", s.branch, run_id=s.run_id, attempt=s.attempt):
                return _traced(await parallel.branch(v, node, s.branch))
        if s.replay is not None:
            return Complete(s.replay, replay=True)  # retried run: committed nodes replay
        with node_span(node.kind, node.name, run_id=s.run_id, workflow=wf.name, attempt=s.attempt):
            return _traced(await _KINDS[node.kind](v, node))

    async def _apply(self, v: JobVisit, wf: Workflow, t: Transition) -> Follow | None:
        s = v.state
        self._log(s, wf, t)
        if s.task != "branch":
            return await apply.apply(v.conn, self.q, s, wf, t)
        # A branch ran without the run's lock: see, under the lock, whether the run still
        # fans this branch out (it may have failed or been cancelled meanwhile).
        now = await v.conn.fetchrow(self.q["branch_check"], s.run_id)
        if (
            now is None
            or now["status"] != "running"
            or now["cursor"] != s.cursor
            or now["epoch"] != s.epoch
            or now["cancel"]
            or s.branch not in (now["branches"] or ())
        ):
            for c in v.conns:
                await undo(c)
            return await apply.apply(v.conn, self.q, s, wf, Noop("the branch is moot"))
        if isinstance(t, BranchDone):
            if await apply.branch_done(v.conn, self.q, s, t):
                return None
            node = cast(Parallel, wf.nodes[s.cursor])
            t = await parallel.complete(v, node)
        return await apply.apply(v.conn, self.q, s, wf, t)

    def _log(self, s: RunState, wf: Workflow, t: Transition) -> None:
        fields: dict[str, object] = {
            "run_id": s.run_id,
            "workflow": wf.name,
            "node": s.current_node,
        }
        if isinstance(t, Retry):
            fields["attempt"] = t.attempt
            log.warning(
                "run %s: %s attempt %d failed, retrying in %.2f s: %s",
                s.run_id,
                t.key,
                t.attempt,
                t.delay,
                t.error,
                extra={**fields, "error": t.error},
            )
        elif isinstance(t, Fail):
            log.error(
                "run %s: node %s failed for good: %s",
                s.run_id,
                s.current_node,
                t.error,
                extra={**fields, "error": t.error},
            )
        elif isinstance(t, Complete) and s.task != "compensate" and s.cursor + 1 >= len(wf.nodes):
            log.info("run %s completed", s.run_id, extra=fields)
        elif isinstance(t, Finish):
            log.info("run %s %s", s.run_id, t.status, extra={**fields, "status": t.status})
        elif isinstance(t, StartChild):
            log.info("run %s starts a child run of %s", s.run_id, t.workflow.name, extra=fields)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("run %s: %r", s.run_id, t, extra=fields)

    async def on_error(self, conn: Connection, job: Job, exc: Exception) -> None:
        """Worker error hook: the job's work failed outside any user code (a database error
        while applying a transition). Its transaction was rolled back; record the failure as
        an attempt of the work the job was doing, in a new transaction, so that it counts
        against that node's budget like any other failure (bounded failure everywhere)."""
        again = job_from_row(await conn.fetchrow(self.q["claim_by_id"], job.id, True))
        if again is None or again.queue not in self.by_queue:
            return  # taken by another worker meanwhile, gone or upgraded: nothing to record
        s: RunState = again.prefetched
        wf = self.by_queue[again.queue]
        if s.status in _FINISHED:
            await apply.apply(conn, self.q, s, wf, Noop("finished"))
            return
        if _moved(job.prefetched, s):
            # Another slot took the job up in between and moved the run on: the failure
            # was of work that is no longer there, and charging it to the run's position
            # now would fail a node that did not run.
            await apply.apply(conn, self.q, s, wf, Noop("the run moved on"))
            return
        error = RuntimeError(f"durable could not record the outcome: {describe(exc)}")
        t: Transition
        if s.task == "compensate":
            t = after_failure(s, "compensation", error, DEFAULT_MAX_ATTEMPTS, default_backoff)
            if isinstance(t, Fail):
                t = Finish(s.ending or "failed")
        else:
            node = wf.nodes[s.cursor] if s.cursor < len(wf.nodes) else None
            key = s.current_node or f"#{s.cursor}"
            if s.task == "branch" and s.branch is not None:
                key = f"{key}#{s.branch}"
            elif isinstance(node, Loop):
                key = f"{key}#{s.iteration}"
            t = after_failure(
                s,
                key,
                error,
                getattr(node, "max_attempts", 1),
                getattr(node, "backoff", default_backoff),
            )
        self._log(s, wf, t)
        await apply.apply(conn, self.q, s, wf, t)

    # -- non-transactional steps -----------------------------------------------------------

    async def _lease(self, v: JobVisit, wf: Workflow, token: uuid.UUID) -> JobOutcome:
        s = v.state
        node = cast(Step, wf.nodes[s.cursor])
        holds = v.holds  # a limit slot the lease holds: its settle wakes the next waiter
        await apply.lease(v.conn, self.q, s, token, self.lease_seconds)
        ctx = v.detached_context(node.name)

        async def attempt() -> Outcome:
            what = f"step {node.name!r}"
            return await run_attempt(
                ctx,
                what,
                lambda: v.invoke(node.fn, ctx),
                timeout=node.timeout,
                transaction_timeout=None,
                returns=returns(node.fn, what),
            )

        async def extend(c: Connection, seconds: float) -> bool:
            return await self.jobs.extend_lease(c, s.job_id, token, seconds)

        async def settle(out: Outcome) -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(self.q["claim_leased"], s.job_id, token)
                if row is None:
                    return  # the lease lapsed and another worker took the job over
                now = state_from_row(row)
                await conn.execute(self.q["release_lease"], s.job_id)
                if now.status != "running" or now.cursor != s.cursor or now.attempt != s.attempt:
                    await apply.apply(conn, self.q, now, wf, Noop("the run moved on"))
                    return
                settled = JobVisit(self.shared, conn, now, wf, False)
                await self._apply(settled, wf, step.settle(settled, node, out))
                if holds is not None:
                    await conn.execute(self.q["limit_wake"], holds)

        async def detached() -> None:
            await lease.run_leased(self.pool, extend, s, node, attempt, settle, self.lease_seconds)

        return JobOutcome(settled=True, after_commit=detached)


def _moved(before: object, now: RunState) -> bool:
    """Whether the run is no longer where `before` (the state a failed job was claimed
    with) had it: another node, iteration, attempt, epoch, status or kind of work."""
    if not isinstance(before, RunState):
        return False
    fields = ("task", "branch", "status", "cursor", "current_node", "iteration", "attempt", "epoch")
    return any(getattr(before, f) != getattr(now, f) for f in fields)
