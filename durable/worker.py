"""Where a job is claimed: the asyncio worker loop that runs jobs inside their transactions.

Theory of operation. The worker runs `concurrency` slots. Each slot holds a connection and
loops: inside a transaction it claims one due job with `FOR UPDATE SKIP LOCKED`, runs the
job's handler in that same transaction, deletes (or re-points) the job row and commits —
sending `COMMIT; BEGIN` in one round trip so the next claim already runs in a fresh
transaction. The row lock is the job's ownership: if the process dies, PostgreSQL aborts the
transaction, the lock goes, and any worker may claim the job at once. Slots claim on their
own connections at the same time, so a worker with N free slots claims N jobs in parallel.

A slot whose claim finds nothing goes idle until woken (`durable.wakeup`). `stop()` is
graceful: no new claims, in-flight jobs get `grace_period` seconds to finish, then they are
cancelled and their transactions rolled back, which releases them to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from durable.batch import DEFAULT_BATCH_WINDOW, MAX_BATCH_SIZE, WALL_WINDOWS, BatchSizer
from durable.db import Connection, in_batch, is_connection_error, is_lock_conflict
from durable.queue import Job, JobQueue
from durable.sql import Queries
from durable.stepconn import StepConnection, swallowed_error, undo
from durable.wakeup import Health, Wakeups

log = logging.getLogger("durable.worker")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker does once a handler returns, inside the job's transaction.

    `settled`: the handler already deleted or rescheduled the job row itself (otherwise the
    worker deletes it). `follow`: a job id this slot claims right after the commit, so a run
    continues on the same worker without waiting for a claim. `after_commit`: work to run
    after the commit while the slot stays taken (non-transactional handlers). `solo`: the
    job changed more than its own run (a cancel reaching its children), so the jobs of a
    batch after it, whose runs were read at the claim, do not run in this transaction.
    `busy`: seconds the job spent in user code, what a batch's window counts (None: the
    whole job, handler and bookkeeping).
    """

    settled: bool = False
    follow: int | None = None
    after_commit: Callable[[], Awaitable[None]] | None = None
    solo: bool = False
    busy: float | None = None


Handler = Callable[[Connection, Job], Awaitable[Outcome | None]]
#: Claims the most urgent due job of the given queues in the connection's transaction.
ClaimHook = Callable[[Connection, Sequence[str]], Awaitable[Job | None]]
#: Commits the open transaction, opens the next one and claims a known job in it (a run
#: continuing on the same slot); None if the job is not due and free.
FollowHook = Callable[[Connection, int], Awaitable[Job | None]]
#: Records, in a new transaction, that a job's work failed outside its handler's own
#: bookkeeping (the job's transaction was rolled back).
ErrorHook = Callable[[Connection, Job, Exception], Awaitable[None]]
#: Claims up to `n` due jobs of the given queues (of different runs) in the connection's
#: transaction, most urgent first.
BatchClaimHook = Callable[[Connection, Sequence[str], int], Awaitable[list[Job]]]

# Jobs of a batch after the first run under this savepoint (see `Worker._work_batch`).
_NEXT_SAVEPOINT = "RELEASE SAVEPOINT durable_batch; SAVEPOINT durable_batch"
_UNDO_SAVEPOINT = "ROLLBACK TO SAVEPOINT durable_batch"


def retry_delay(attempts: int) -> float:
    """Backoff for a job whose handler raised: 1, 2, 4 ... seconds, at most 60."""
    return float(min(2 ** max(attempts - 1, 0), 60))


class Worker:
    """Runs jobs of the given queues, up to `concurrency` at once, each in its transaction."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Queries,
        handlers: Mapping[str, Handler],
        *,
        queues: Sequence[str],
        concurrency: int = 16,
        poll_interval: float = 1.0,
        grace_period: float = 10.0,
        name: str | None = None,
        claim: ClaimHook | None = None,
        claim_follow: FollowHook | None = None,
        isolate: bool = True,
        on_error: ErrorHook | None = None,
        claim_batch: BatchClaimHook | None = None,
        batchable: Callable[[Job], bool] | None = None,
        batch_size: int = 1,
        batch_window: float = DEFAULT_BATCH_WINDOW,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        if batch_window <= 0:
            raise ValueError(f"batch_window must be > 0 seconds, got {batch_window}")
        self.pool = pool
        self.queries = queries
        self.jobs = JobQueue(queries)
        self._claim_hook: ClaimHook = claim or self.jobs.claim
        self._follow_hook: FollowHook = claim_follow or self._commit_and_claim
        self._on_error = on_error
        # Batches (group commit): without a batch claim, every claim takes one job.
        self._batch_hook = claim_batch
        self._batchable = batchable or (lambda job: True)
        self.batch_size = batch_size if claim_batch is not None else 1
        self.batch_window = batch_window
        # A job after the first of a batch waits at most this long for a lock: the lock's
        # holder may be another batch waiting for one of ours (PostgreSQL would only find
        # that deadlock after deadlock_timeout, 1 s by default).
        wait_ms = max(10, round(4000 * batch_window))
        self._first_savepoint = f"SET LOCAL lock_timeout = {wait_ms}; SAVEPOINT durable_batch"
        # Slots holding a claim's transaction, and the recent claims' mean size: while
        # batches are large, fewer slots claim at once (see `_room_to_claim`).
        self._active = 0
        self._mean_claim = 1.0
        self._room = asyncio.Event()
        #: Jobs run in batches of two or more, and the batches (tests, benchmarks).
        self.batched = 0
        self.batches = 0
        #: Jobs of batches left to the next claim after a lock conflict.
        self.deferred = 0
        # Handlers get a connection that sets a savepoint before their first statement, so
        # a failure rolls back their writes alone and the retry is recorded in the same
        # transaction, with the job still locked. The engine's handlers manage their own
        # failures and opt out, saving that round trip.
        self.isolate = isolate
        self.channel = queries.notify_channel
        self.handlers = dict(handlers)
        self.queues = sorted(set(queues))
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.grace_period = grace_period
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._stopping = asyncio.Event()
        self._health = Health()
        self._wakeups = Wakeups(
            pool,
            queries,
            self.jobs,
            queues=self.queues,
            poll_interval=poll_interval,
            name=self.name,
            stopping=self._stopping,
            health=self._health,
        )
        self._inflight = 0
        self._no_inflight = asyncio.Event()
        self._no_inflight.set()
        self.processed = 0

    def stop(self) -> None:
        """Stop claiming; in-flight jobs get `grace_period` seconds to finish."""
        self._stopping.set()
        self._room.set()
        self._wakeups.wake_all()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        """Return once `stop()` was called."""
        await self._stopping.wait()

    @property
    def in_flight(self) -> int:
        """How many jobs the worker is running now."""
        return self._inflight

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Work until `stop()` is called (then shut down gracefully) or until cancelled."""
        if not self.queues:
            raise ValueError("a worker needs at least one queue to claim from")
        log.info(
            "worker %s started: queues=%s concurrency=%d",
            self.name,
            self.queues,
            self.concurrency,
            extra={"worker": self.name},
        )
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._wakeups.listen)
                outer.start_soon(self._wakeups.poll)
                async with anyio.create_task_group() as slots:
                    for index in range(self.concurrency):
                        slots.start_soon(self._slot, index)
                    task_status.started()
                    await self._stopping.wait()
                    with anyio.move_on_after(self.grace_period):
                        await self._no_inflight.wait()
                    if self._inflight:
                        log.warning(
                            "grace period over: releasing %d in-flight jobs",
                            self._inflight,
                            extra={"worker": self.name},
                        )
                    slots.cancel_scope.cancel()
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with self.pool.acquire() as conn:
                    await conn.execute(self.queries["unregister_listener"], self.name)
        log.info(
            "worker %s stopped after %d jobs",
            self.name,
            self.processed,
            extra={"worker": self.name},
        )

    # -- a slot ----------------------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        """Claim and run jobs one after another on one connection until the worker stops.

        `tx` is None exactly when the connection is outside a transaction; a connection whose
        state is unknown (an error or a cancellation mid-job) is discarded, never reused.
        """
        conn: Connection | None = None
        tx: asyncpg.transaction.Transaction | None = None
        rested = False  # the connection sat idle: the server may have dropped it meanwhile
        sizer = BatchSizer(self.batch_size, self.batch_window)
        try:
            while not self.stopping:
                try:
                    if conn is None:
                        conn = await self.pool.acquire()
                    assert conn is not None
                    if tx is None:
                        tx = conn.transaction()
                        await tx.start()
                    await self._room_to_claim()
                    # A claim under way counts as in flight: once its statement has locked
                    # a job, a stop() meanwhile must let that job run, not roll it back.
                    self._started()
                    self._active += 1
                    try:
                        jobs = await self._claim(conn, sizer.size)
                    except BaseException:
                        self._finished()
                        self._left()
                        raise
                    if not jobs:
                        self._finished()
                        self._left()
                        sizer.done(0, 0)
                        await tx.rollback()
                        tx = None
                except Exception as exc:
                    if conn is not None:
                        await self._discard(conn)
                    conn, tx = None, None
                    if rested and is_connection_error(exc):
                        # Dropped while we idled (an outage that is over, or a terminated
                        # backend): take a fresh connection at once, not an outage to log.
                        rested = False
                        continue
                    if not is_connection_error(exc):
                        log.exception("claim failed", extra={"worker": self.name})
                    with anyio.move_on_after(self._health.failed(exc)):
                        await self._stopping.wait()
                    continue
                rested = False
                self._health.ok()
                if not jobs:
                    await self._wakeups.wait_idle()
                    rested = True
                    continue
                self._wakeups.wake_one()  # there may be more work: let an idle slot look too
                assert tx is not None
                self._mean_claim = 0.9 * self._mean_claim + 0.1 * len(jobs)
                try:
                    if len(jobs) == 1:
                        job = jobs[0]
                        state, tx, after = await self._work(conn, tx, job, sizer)
                        sizer.done(1, 1, slow=after is not None or sizer.last >= self.batch_window)
                    else:
                        state, tx, after, job = await self._work_batch(conn, tx, jobs, sizer)
                finally:
                    self._left()
                if state == "broken":
                    await self._discard(conn)
                    conn, tx = None, None
                elif after is not None:
                    # Work after the commit (non-transactional handlers) holds the slot,
                    # not a connection.
                    released, conn = conn, None
                    await self._release(released)
                    await self._after_commit(after, job)
        finally:
            if conn is not None:
                if tx is None:
                    await self._release(conn)  # idle, outside any transaction
                else:
                    await self._discard(conn)

    async def _room_to_claim(self) -> None:
        """Wait while enough slots hold claims: with batches of about `n` jobs, at most
        concurrency / n slots (and at least 4) claim at once, so that the jobs a worker
        holds stay near its concurrency. Every claim's statement walks past the due jobs
        other transactions hold (SKIP LOCKED): 16 slots holding 16 jobs each made a claim
        cost more than the steps it took."""
        if self._batch_hook is None:
            return
        while not self.stopping:
            room = max(min(4, self.concurrency), math.ceil(self.concurrency / self._mean_claim))
            if self._active < room:
                return
            self._room.clear()
            await self._room.wait()

    def _left(self) -> None:
        """A slot's claim transaction is over: another slot may claim."""
        self._active -= 1
        self._room.set()

    async def _claim(self, conn: Connection, size: int) -> list[Job]:
        """Claim up to `size` jobs: one with the plain claim (exactly as without batching),
        more with the batch claim."""
        if size > 1 and self._batch_hook is not None:
            return await self._batch_hook(conn, self.queues, size)
        job = await self._claim_hook(conn, self.queues)
        return [] if job is None else [job]

    async def _commit_and_claim(self, conn: Connection, job_id: int) -> Job | None:
        await conn.execute("COMMIT; BEGIN")
        return await self.jobs.claim_by_id(conn, job_id)

    async def _discard(self, conn: Connection) -> None:
        """Drop a connection whose transaction state is unknown; the server rolls it back."""
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            # A connection the server closed is already detached from the pool: calls on
            # it raise InterfaceError, and there is nothing left to give back.
            conn.terminate()
            await self.pool.release(conn)  # type: ignore[arg-type]

    async def _release(self, conn: Connection) -> None:
        """Give an idle connection (outside any transaction) back to the pool."""
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.pool.release(conn)  # type: ignore[arg-type]

    # -- working ---------------------------------------------------------------------------

    def _started(self) -> None:
        self._inflight += 1
        self._no_inflight.clear()

    def _finished(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._no_inflight.set()

    async def _work(
        self,
        conn: Connection,
        tx: asyncpg.transaction.Transaction,
        job: Job,
        sizer: BatchSizer | None = None,
    ) -> tuple[str, asyncpg.transaction.Transaction | None, Callable[[], Awaitable[None]] | None]:
        """Run a claimed job (and the jobs it hands on to this slot) to its commit.

        Returns ("open", tx, None): the connection is in a fresh transaction, ready for the
        next claim; ("idle", None, after): committed, outside any transaction, with work to
        do after the commit (or None); ("broken", None, None): discard the connection.
        A cancellation propagates with the transaction still open (the slot discards it).
        The job's claim already counted it in flight; this ends that count.
        """
        try:
            while True:
                began = time.monotonic()
                outcome = await self._run_one(conn, tx, job)
                if sizer is not None:
                    busy = None if outcome is None else outcome.busy
                    sizer.observe(time.monotonic() - began if busy is None else busy)
                if outcome is None:  # rolled back and rescheduled
                    self._wakeups.poke()
                    if conn.is_closed():
                        return "broken", None, None
                    return "open", await self._begin(conn), None
                after = outcome.after_commit
                if outcome.follow is not None and after is None and not self.stopping:
                    # The hook commits and opens the next transaction (in one round trip);
                    # `tx` stays the top transaction, so handlers' savepoints still work.
                    follow = await self._follow_hook(conn, outcome.follow)
                    self.processed += 1
                    if follow is not None:
                        job = follow
                        continue
                    await tx.rollback()
                    return "open", await self._begin(conn), None
                if after is not None or self.stopping:
                    await tx.commit()
                    self.processed += 1
                    return "idle", None, after
                # Commit and open the next claim's transaction in one round trip.
                await conn.execute("COMMIT; BEGIN")
                self.processed += 1
                # The job may have been rescheduled (a retry) without a NOTIFY: the poller
                # looks at the next due time again.
                self._wakeups.poke()
                return "open", tx, None
        except Exception as exc:
            # The connection or the commit failed under us; the server rolls back and the job
            # is free for any worker again.
            if not is_connection_error(exc):
                log.exception(
                    "job %s failed outside its handler",
                    job.id,
                    extra={"job_id": job.id, "task": job.task, "run_id": job.run_id},
                )
            return "broken", None, None
        finally:
            self._finished()

    async def _work_batch(
        self,
        conn: Connection,
        tx: asyncpg.transaction.Transaction,
        jobs: list[Job],
        sizer: BatchSizer,
    ) -> tuple[
        str, asyncpg.transaction.Transaction | None, Callable[[], Awaitable[None]] | None, Job
    ]:
        """Run claimed jobs one after the other in the open transaction and commit them
        together (group commit); returns what `_work` does, and the job last run.

        The first job runs as a job claimed alone does. Each later one runs under a
        savepoint, so a failure rolls back its own work only and is recorded in the same
        transaction, its job still locked; it waits for a lock at most a few windows (a
        lock held by another batch, which may wait for this one), else it is left for the
        next claim, unrecorded. The batch commits once every job ran, or when its handlers
        spent `batch_window` seconds (one alone: a slow handler), or `WALL_WINDOWS` windows
        of wall-clock time passed, a job left the transaction (a lease) or changed other
        runs, or the next job must run alone: the jobs not run are released by that commit,
        free for any worker at once. Follow-up jobs are not taken
        on here: they are due when the batch commits, at the head of the queue.
        """
        self._inflight += len(jobs) - 1  # the claim counted one
        began = time.monotonic()
        wall = WALL_WINDOWS * self.batch_window
        busy = 0.0  # seconds of user code so far
        ran = 0
        slow = False
        after: Callable[[], Awaitable[None]] | None = None
        last = jobs[0]
        try:
            for index, job in enumerate(jobs):
                if index:
                    if (
                        self.stopping
                        or busy >= self.batch_window
                        or time.monotonic() - began >= wall
                        or not self._batchable(job)
                    ):
                        break
                    await conn.execute(self._first_savepoint if index == 1 else _NEXT_SAVEPOINT)
                last = job
                started = time.monotonic()
                if index == 0:
                    first = await self._run_one(conn, tx, job)
                    if first is None:  # rolled back, the whole batch released; rescheduled
                        ran = 1
                        self._wakeups.wake_one()
                        if conn.is_closed():
                            return "broken", None, None, job
                        return "open", await self._begin(conn), None, job
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
                if outcome.solo or took >= self.batch_window:
                    slow = took >= self.batch_window
                    break
            if after is not None or self.stopping:
                await tx.commit()
                state: tuple[str, asyncpg.transaction.Transaction | None] = ("idle", None)
            else:
                await conn.execute("COMMIT; BEGIN")
                state = ("open", tx)
            self.processed += ran
            if ran > 1:
                self.batched += ran
                self.batches += 1
            self._wakeups.poke()
            if ran < len(jobs):
                self._wakeups.wake_one()  # the jobs not run are free again
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
            self._inflight -= len(jobs) - 1
            self._finished()

    async def _run_later(self, conn: Connection, job: Job) -> Outcome | None:
        """Run a job after the first of a batch, under the batch's savepoint. A failure
        rolls back to it and is recorded in this transaction; None: the job met a lock
        conflict and goes back to the queue when the batch commits, nothing recorded."""
        fields = {
            "job_id": job.id,
            "task": job.task,
            "run_id": job.run_id,
            "queue": job.queue,
            "worker": self.name,
        }
        handler_conn: Any = StepConnection(conn) if self.isolate else conn
        try:
            handler = self.handlers.get(job.task)
            if handler is None:
                raise LookupError(f"no handler for task {job.task!r} on this worker")
            outcome = await handler(handler_conn, job) or Outcome()
            failed = swallowed_error(handler_conn)
            if failed is not None:
                raise failed
            if not outcome.settled:
                await self.jobs.delete(conn, job.id)
            return outcome
        except Exception as exc:
            if is_connection_error(exc):
                log.warning("job %s lost its connection: %s", job.id, exc, extra=fields)
                raise
            await conn.execute(_UNDO_SAVEPOINT)
            if is_lock_conflict(exc):
                self.deferred += 1
                log.debug("job %s left to the next claim: %s", job.id, exc, extra=fields)
                return None
            self._log_retry(job, exc, fields)
            if self._on_error is not None:
                await self._on_error(conn, job, exc)
            else:
                await self.jobs.retry(conn, job.id, retry_delay(job.attempts + 1))
            return Outcome(settled=True)

    async def _after_commit(self, after: Callable[[], Awaitable[None]], job: Job) -> None:
        self._started()
        try:
            await after()
        except Exception as exc:
            if is_connection_error(exc):
                log.warning(
                    "after-commit work of job %s lost its connection (the job's lease will "
                    "lapse and another worker retries it): %s",
                    job.id,
                    exc,
                    extra={"job_id": job.id, "task": job.task, "run_id": job.run_id},
                )
                return
            log.exception(
                "after-commit work of job %s failed",
                job.id,
                extra={"job_id": job.id, "task": job.task, "run_id": job.run_id},
            )
        finally:
            self._finished()
        self._wakeups.wake_one()  # the run's next job became due without a NOTIFY

    async def _begin(self, conn: Connection) -> asyncpg.transaction.Transaction:
        tx = conn.transaction()
        await tx.start()
        return tx

    async def _run_one(
        self, conn: Connection, tx: asyncpg.transaction.Transaction, job: Job
    ) -> Outcome | None:
        """Run one claimed job up to its commit.

        A failing isolated handler is rolled back to its savepoint and its retry scheduled in
        the same transaction (the worker then commits both); otherwise the whole transaction
        rolls back and the retry is scheduled in a new one (None is returned).
        """
        fields = {
            "job_id": job.id,
            "task": job.task,
            "run_id": job.run_id,
            "queue": job.queue,
            "worker": self.name,
        }
        handler_conn: Any = StepConnection(conn) if self.isolate else conn
        try:
            handler = self.handlers.get(job.task)
            if handler is None:
                raise LookupError(f"no handler for task {job.task!r} on this worker")
            outcome = await handler(handler_conn, job) or Outcome()
            failed = swallowed_error(handler_conn)
            if failed is not None:
                raise failed
            if not outcome.settled:
                await self.jobs.delete(conn, job.id)
            return outcome
        except Exception as exc:
            if is_connection_error(exc):
                log.warning("job %s lost its connection: %s", job.id, exc, extra=fields)
                raise
            if self.isolate:
                await undo(handler_conn)
                self._log_retry(job, exc, fields)
                await self.jobs.retry(conn, job.id, retry_delay(job.attempts + 1))
                return Outcome(settled=True)
            with anyio.CancelScope(shield=True):
                await tx.rollback()
                await self._retry(conn, job, exc, fields)
            return None

    def _log_retry(self, job: Job, exc: Exception, fields: dict[str, object]) -> None:
        log.error(
            "job %s (%s) failed, retrying in %.0f s: %r",
            job.id,
            job.task,
            retry_delay(job.attempts + 1),
            exc,
            extra={**fields, "attempt": job.attempts + 1},
            exc_info=exc,
        )

    async def _retry(
        self, conn: Connection, job: Job, exc: Exception, fields: dict[str, object]
    ) -> None:
        self._log_retry(job, exc, fields)
        async with conn.transaction():
            if self._on_error is not None:
                await self._on_error(conn, job, exc)
            else:
                await self.jobs.retry(conn, job.id, retry_delay(job.attempts + 1))
