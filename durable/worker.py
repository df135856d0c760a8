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
import os
import socket
from collections.abc import Callable, Mapping, Sequence

import anyio
import asyncpg

from durable.batch import DEFAULT_BATCH_WINDOW, DEFAULT_CHAIN_SIZE, MAX_BATCH_SIZE, BatchSizer
from durable.db import Connection, is_connection_error
from durable.group_commit import Batches
from durable.queue import (
    BatchClaimHook,
    ChainHook,
    ClaimHook,
    ErrorHook,
    FollowHook,
    Handler,
    Job,
    JobQueue,
)
from durable.queue import Outcome as Outcome
from durable.queue import retry_delay as retry_delay
from durable.sql import Queries
from durable.wakeup import Health, Wakeups
from durable.working import Working

log = logging.getLogger("durable.worker")


class Worker(Working):
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
        chain: ChainHook | None = None,
        chain_size: int = DEFAULT_CHAIN_SIZE,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {batch_size}")
        if batch_window <= 0:
            raise ValueError(f"batch_window must be > 0 seconds, got {batch_window}")
        if not 1 <= chain_size <= MAX_BATCH_SIZE:
            raise ValueError(f"chain_size must be 1..{MAX_BATCH_SIZE}, got {chain_size}")
        self.pool = pool
        self.queries = queries
        self.jobs = JobQueue(queries)
        self._claim_hook: ClaimHook = claim or self.jobs.claim
        self._follow_hook: FollowHook = claim_follow or self._commit_and_claim
        self._on_error = on_error
        # Chains (group commit of one run's steps, see `Working._work`): off without a
        # chain hook or with a chain size of 1.
        self._chain_hook = chain if chain_size > 1 else None
        self.chain_size = chain_size
        self._unchained = set()
        # Batches (group commit, `durable.group_commit`): without a batch claim or with a
        # batch size of 1, every claim takes one job, exactly as without batching.
        self.batch_size = batch_size if claim_batch is not None else 1
        self.batch_window = batch_window
        self._batches: Batches | None = None
        if claim_batch is not None and self.batch_size > 1:
            self._batches = Batches(
                self, claim_batch, batchable or (lambda job: True), batch_window
            )
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
        if self._batches is not None:
            self._batches.wake()
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

    @property
    def batched(self) -> int:
        """Jobs run in batches of two or more (tests, benchmarks)."""
        return 0 if self._batches is None else self._batches.batched

    @property
    def batches(self) -> int:
        """Batches of two or more jobs run."""
        return 0 if self._batches is None else self._batches.batches

    @property
    def deferred(self) -> int:
        """Jobs of batches left to the next claim after a lock conflict."""
        return 0 if self._batches is None else self._batches.deferred

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
                    if self._batches is not None:
                        await self._batches.room()
                    # A claim under way counts as in flight: once its statement has locked
                    # a job, a stop() meanwhile must let that job run, not roll it back.
                    self._started()
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
                        # Committed, not rolled back: a claim that found only a job whose
                        # run is gone deleted it (claim_v1).
                        await tx.commit()
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
                try:
                    if self._batches is None:
                        job = jobs[0]
                        state, tx, after = await self._work(conn, tx, job)
                    elif len(jobs) == 1:
                        self._batches.claimed(1)
                        job = jobs[0]
                        state, tx, after = await self._work(conn, tx, job, sizer)
                        sizer.done(1, 1, slow=after is not None or sizer.last >= self.batch_window)
                    else:
                        self._batches.claimed(len(jobs))
                        state, tx, after, job = await self._batches.run(conn, tx, jobs, sizer)
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

    def _left(self) -> None:
        if self._batches is not None:
            self._batches.left()

    async def _claim(self, conn: Connection, size: int) -> list[Job]:
        """Claim up to `size` jobs: one with the plain claim (exactly as without batching),
        more with the batch claim."""
        if size > 1 and self._batches is not None:
            return await self._batches.claim(conn, self.queues, size)
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
