"""Where a batch runs: a worker slot's claimed jobs, one after the other in one transaction,
committed together (group commit).

Theory of operation. A slot whose claim took several jobs (`claim_batch_v1`, sized by
`durable.batch.BatchSizer`) runs the first as a job claimed alone, and each later one under
a savepoint, so a failure rolls back that job's work only and is recorded in the same
transaction, its job still locked. A later job waits for a lock at most a few windows: the
lock's holder may be another batch waiting for one of ours, which PostgreSQL would find
only after `deadlock_timeout`. On such a conflict the job is left to the next claim,
unrecorded. The batch commits once every job ran, or when its handlers spent the window
(one alone: a slow handler), or after `WALL_WINDOWS` windows of wall-clock time, or when a
job left the transaction (a lease), changed other runs, or must run alone: the jobs not run
are released by that commit, free for any worker at once.

Every claim walks past the due jobs other transactions hold (`SKIP LOCKED` still visits
them), so while batches are large fewer slots claim at once (`Batches.room`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from durable.batch import WALL_WINDOWS, BatchSizer
from durable.db import Connection, in_batch, is_connection_error, is_lock_conflict
from durable.queue import BatchClaimHook, Job, Outcome, retry_delay
from durable.stepconn import StepConnection

if TYPE_CHECKING:
    from durable.worker import Worker

log = logging.getLogger("durable.worker")

_NEXT_SAVEPOINT = "RELEASE SAVEPOINT durable_batch; SAVEPOINT durable_batch"
_UNDO_SAVEPOINT = "ROLLBACK TO SAVEPOINT durable_batch"

#: What running a batch leaves: the connection's state ("open", "idle" or "broken", as
#: `Worker._work` returns), its transaction, work after the commit, and the job run last.
BatchEnd = tuple[
    str, asyncpg.transaction.Transaction | None, Callable[[], Awaitable[None]] | None, Job
]


class Batches:
    """The batches of one worker: how many of its slots claim at once, and running them."""

    def __init__(
        self,
        worker: Worker,
        claim: BatchClaimHook,
        batchable: Callable[[Job], bool],
        window: float,
    ) -> None:
        self.worker = worker
        self.claim = claim
        self.batchable = batchable
        self.window = window
        wait_ms = max(10, round(4000 * window))
        self._first_savepoint = f"SET LOCAL lock_timeout = {wait_ms}; SAVEPOINT durable_batch"
        # Slots holding a claim's transaction, and the recent claims' mean size.
        self._active = 0
        self._mean_claim = 1.0
        self._room = asyncio.Event()
        #: Jobs run in batches of two or more, and the batches (tests, benchmarks).
        self.batched = 0
        self.batches = 0
        #: Jobs of batches left to the next claim after a lock conflict.
        self.deferred = 0

    async def room(self) -> None:
        """Wait while enough slots hold claims: with batches of about `n` jobs, at most
        concurrency / n slots (and at least 4) claim at once, so that the jobs a worker
        holds stay near its concurrency. 16 slots holding 16 jobs each made a claim cost
        more than the steps it took."""
        concurrency = self.worker.concurrency
        while not self.worker.stopping:
            room = max(min(4, concurrency), math.ceil(concurrency / self._mean_claim))
            if self._active < room:
                self._active += 1
                return
            self._room.clear()
            await self._room.wait()

    def claimed(self, n: int) -> None:
        """A slot's claim took `n` jobs."""
        self._mean_claim = 0.9 * self._mean_claim + 0.1 * n

    def left(self) -> None:
        """A slot's claim transaction is over: another slot may claim."""
        self._active -= 1
        self._room.set()

    def wake(self) -> None:
        """The worker stops: no slot waits for room any more."""
        self._room.set()

    async def run(
        self,
        conn: Connection,
        tx: asyncpg.transaction.Transaction,
        jobs: list[Job],
        sizer: BatchSizer,
    ) -> BatchEnd:
        """Run claimed jobs one after the other in the open transaction and commit them
        together (see the module's docstring). Follow-up jobs are not taken on here: they
        are due when the batch commits, at the head of the queue."""
        w = self.worker
        w._inflight += len(jobs) - 1  # the claim counted one
        began = time.monotonic()
        wall = WALL_WINDOWS * self.window
        busy = 0.0  # seconds of user code so far
        ran = 0
        slow = False
        after: Callable[[], Awaitable[None]] | None = None
        last = jobs[0]
        try:
            for index, job in enumerate(jobs):
                if index:
                    if (
                        w.stopping
                        or busy >= self.window
                        or time.monotonic() - began >= wall
                        or not self.batchable(job)
                    ):
                        break
                    await conn.execute(self._first_savepoint if index == 1 else _NEXT_SAVEPOINT)
                last = job
                started = time.monotonic()
                if index == 0:
                    first = await w._run_one(conn, tx, job, chained=False)
                    if first is None:  # rolled back, the whole batch released; rescheduled
                        ran = 1
                        w._wakeups.wake_one()
                        if conn.is_closed():
                            return "broken", None, None, job
                        return "open", await w._begin(conn), None, job
                    outcome = first
                else:
                    token = in_batch.set(True)
                    try:
                        later = await self._run_later(conn, job)
                    finally:
                        in_batch.reset(token)
                    if later is None:  # a lock conflict: back to the queue at the commit
                        break
                    outcome = later
                ran += 1
                took = time.monotonic() - started if outcome.busy is None else outcome.busy
                busy += took
                sizer.observe(took)
                if outcome.after_commit is not None:
                    after, slow = outcome.after_commit, True
                    break
                if outcome.solo or took >= self.window:
                    slow = took >= self.window
                    break
            if after is not None or w.stopping:
                await tx.commit()
                state: tuple[str, asyncpg.transaction.Transaction | None] = ("idle", None)
            else:
                await conn.execute("COMMIT; BEGIN")
                state = ("open", tx)
            w.processed += ran
            if ran > 1:
                self.batched += ran
                self.batches += 1
            w._wakeups.poke()
            if ran < len(jobs):
                w._wakeups.wake_one()  # the jobs not run are free again
            return state[0], state[1], after, last
        except Exception as exc:
            # The connection or the commit failed under us (or recording a failure did):
            # the server rolls back the batch and its jobs are free for any worker again.
            if not is_connection_error(exc):
                log.exception(
                    "a batch of %d jobs failed outside its handlers at job %s",
                    len(jobs),
                    last.id,
                    extra={"job_id": last.id, "task": last.task, "run_id": last.run_id},
                )
            return "broken", None, None, last
        finally:
            sizer.done(len(jobs), ran, slow=slow)
            w._inflight -= len(jobs) - 1
            w._finished()

    async def _run_later(self, conn: Connection, job: Job) -> Outcome | None:
        """Run a job after the first of a batch, under the batch's savepoint. A failure
        rolls back to it and is recorded in this transaction; None: the job met a lock
        conflict and goes back to the queue when the batch commits, nothing recorded."""
        w = self.worker
        fields = w.log_fields(job)
        handler_conn: Any = StepConnection(conn) if w.isolate else conn
        try:
            return await w.call_handler(conn, handler_conn, job)
        except Exception as exc:
            if is_connection_error(exc):
                log.warning("job %s lost its connection: %s", job.id, exc, extra=fields)
                raise
            await conn.execute(_UNDO_SAVEPOINT)
            if is_lock_conflict(exc):
                self.deferred += 1
                log.debug("job %s left to the next claim: %s", job.id, exc, extra=fields)
                return None
            w._log_retry(job, exc, fields)
            if w._on_error is not None:
                await w._on_error(conn, job, exc)
            else:
                await w.jobs.retry(conn, job.id, retry_delay(job.attempts + 1))
            return Outcome(settled=True)
