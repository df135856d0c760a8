"""Claiming a job with its run: the worker's claim hooks and the memos of runs handed on."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg

from durable.db import Connection
from durable.queue import Job
from durable.runtime.apply import Follow
from durable.runtime.transition import Complete, Iterate, RunState, Transition
from durable.runtime.visit import Shared, job_from_row
from durable.sql import Queries
from durable.workflow import Step, Workflow


class _Memo(NamedTuple):
    """What this worker knows of a run it handed on to itself: where it left it and the
    results so far; and, when it moved the run on to a step, the state it wrote
    (`moved`) and the transaction that wrote it, for a re-lock instead of a claim."""

    run_id: str
    queue: str
    epoch: int
    cursor: int
    results: dict[str, Any]
    moved: RunState | None = None
    written_by: int | None = None


def _continued(job_id: int, memo: _Memo) -> Job:
    """The job of a run this worker moved on to a step, as it wrote it (`memo.moved`)."""
    return Job(
        id=job_id,
        queue=memo.queue,
        task="advance",
        run_id=memo.run_id,
        payload={},
        priority=0,
        attempts=0,
        lease_token=None,
        prefetched=memo.moved,
    )


class Claiming:
    """The claim hooks of a `durable.runtime.runner.Runner` and what it remembers of the
    runs it hands on to itself."""

    q: Queries
    pool: asyncpg.Pool
    by_queue: dict[str, Workflow]
    max_claims: int
    shared: Shared
    _memos: dict[int, _Memo]

    async def claim(self, conn: Connection, queues: Sequence[str]) -> Job | None:
        """Worker claim hook: the most urgent due job, with its run locked and read."""
        return job_from_row(await conn.fetchrow(self.q["claim"], list(queues)))

    async def claim_batch(self, conn: Connection, queues: Sequence[str], n: int) -> list[Job]:
        """Worker batch claim hook: up to `n` due jobs of different runs, most urgent first,
        with their runs locked and read. A job this worker handed on to itself (its memo)
        reuses the results it knows, when its run is where the memo left it."""
        # The memos written last are those of runs likely at the head of the queue now.
        known = list(itertools.islice(reversed(self._memos), 256 + 16 * n))
        rows = await conn.fetch(self.q["claim_batch"], list(queues), n, known)
        if not rows:
            return []
        known_ids = set(known)
        results: dict[int, dict[str, Any]] = {}
        unknown: list[str] = []
        for row in rows:
            if row["id"] not in known_ids:
                continue
            memo = self._memos.pop(row["id"], None)
            if memo is not None and (row["run_id"], row["epoch"], row["cursor"]) == (
                memo.run_id,
                memo.epoch,
                memo.cursor,
            ):
                results[row["id"]] = memo.results
            else:
                unknown.append(row["run_id"])
        if unknown:
            read = {
                r["run_id"]: json.loads(r["results"] or "{}")
                for r in await conn.fetch(self.q["run_results_many"], unknown)
            }
            for row in rows:
                if row["id"] in known_ids and row["id"] not in results:
                    results[row["id"]] = read[row["run_id"]]
        jobs = []
        for row in rows:
            job = job_from_row(row, results.get(row["id"]))
            assert job is not None
            jobs.append(job)
        return jobs

    def batchable(self, job: Job) -> bool:
        """Whether a job may run after others in one transaction: not one that runs alone
        (a branch, a job whose claimer died, see claim_batch_v1), nor a step that leaves
        the transaction (`transactional=False`) or takes a named limit's slot (its lock
        would be held for the whole batch)."""
        s: RunState = job.prefetched
        if s.task == "branch" or job.payload.get("suspicious"):
            return False
        wf = self.by_queue.get(job.queue)
        if wf is None or s.task != "advance" or s.cursor >= len(wf.nodes):
            return True
        node = wf.nodes[s.cursor]
        return not (isinstance(node, Step) and (not node.transactional or node.limit is not None))

    def chain(self, job_id: int) -> Job | None:
        """Worker chain hook: the job the last transition handed on, to run in the same
        transaction, or None. Only when that transition moved the run on to a step that
        may share a transaction with others (`batchable`) and nothing stopped the run there
        (complete_node_v2 then gave `written_by`): the job and the run are still locked by
        this transaction, and the run is as it wrote it, so nothing is read again."""
        memo = self._memos.get(job_id)
        if memo is None or memo.moved is None:
            return None
        job = _continued(job_id, memo)
        if not self.batchable(job):
            return None
        del self._memos[job_id]
        return job

    async def claim_follow(self, conn: Connection, job_id: int) -> Job | None:
        """Worker follow hook: commit, then claim the job the last transition handed on.

        The results of the nodes before the run's position cannot change within an
        attempt epoch (only a retry, which starts a new epoch, forgets journal rows), so the
        results this worker just committed are reused when the run is where it left it.
        When it moved the run on to a step, the commit, the next BEGIN and a re-lock of job
        and run travel in one message, and the run is taken as written (relock_v1 raises
        unless nobody else wrote it since); else, or if that raises, the job is claimed.
        """
        memo = self._memos.pop(job_id, None)
        if memo is not None and memo.moved is not None:
            try:
                relock = self.q["relock"] % (job_id, memo.written_by)
                await conn.execute("COMMIT; BEGIN; " + relock)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != "DU040":
                    raise
                await conn.execute("ROLLBACK; BEGIN")
            else:
                return _continued(job_id, memo)
        else:
            await conn.execute("COMMIT; BEGIN")
        row = await conn.fetchrow(self.q["claim_by_id"], job_id, memo is None)
        if row is not None and row["queue"] not in self.by_queue:
            return None  # the run was upgraded to a queue this worker does not serve
        if row is None or memo is None:
            return job_from_row(row)
        results = memo.results
        if (row["run_id"], row["epoch"], row["cursor"]) != (memo.run_id, memo.epoch, memo.cursor):
            results = json.loads(await conn.fetchval(self.q["run_results"], memo.run_id) or "{}")
        return job_from_row(row, results)

    def _remember(
        self, job: Job, s: RunState, wf: Workflow, t: Transition, follow: Follow | None
    ) -> None:
        if isinstance(t, Iterate):
            memo = self.shared.iterations.get((s.run_id, s.current_node or "", s.epoch))
            if memo is not None and len(memo) == t.index:
                memo.append(json.loads(t.text))
        if follow is None:
            return
        if len(self._memos) > 10_000:  # runs handed on but never claimed by this worker
            self._memos.clear()
        # The results dict is extended in place, not copied (a copy costs a long chain
        # O(steps) a step): it has one owner at a time, the run's latest memo, which is
        # popped when used, and a memo is reused only while its run is at the memo's
        # cursor, so results of a step whose commit failed are never read.
        results = s.results if isinstance(s.results, dict) else dict(s.results)
        if not isinstance(t, Complete):
            self._memos[follow.job] = _Memo(s.run_id, job.queue, s.epoch, s.cursor, results)
            return
        cursor = s.cursor + 1
        results[wf.nodes[s.cursor].name] = json.loads(t.text)
        moved = None
        nxt = wf.nodes[cursor] if cursor < len(wf.nodes) else None
        if (
            s.task == "advance"
            and follow.written_by is not None
            and follow.clock is not None
            and isinstance(nxt, Step)
        ):
            moved = dataclasses.replace(
                s,
                lease_token=None,
                status="running",
                cursor=cursor,
                current_node=wf.nodes[cursor].name,
                iteration=0,
                attempt=1,
                wake_at=None,
                waiting_for=None,
                child_id=None,
                branches=None,
                now=follow.clock,
                results=results,
                replay=None,
                cancel=None,
            )
        self._memos[follow.job] = _Memo(
            s.run_id, job.queue, s.epoch, cursor, results, moved, follow.written_by
        )

    async def _lost(self, job: Job) -> bool | None:
        """None when the job's last locker committed (or nobody locked it). Otherwise its
        claimer most likely died mid-job: count the claim outside the job's transaction
        (which rolls back if this worker dies too) and say whether that happened too often
        in a row."""
        if not job.payload.get("suspicious"):
            return None
        async with self.pool.acquire() as c:
            n: int = await c.fetchval(self.q["count_claim"], job.id)
        return n > self.max_claims
