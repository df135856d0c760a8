"""Where a job is claimed: the asyncio worker loop that runs jobs inside their transactions.

Theory of operation. A dispatcher task takes a free slot, opens a transaction on a pooled
connection and claims one due job with `FOR UPDATE SKIP LOCKED`; the job and its connection
are handed to a task that runs the job's handler inside that same transaction, deletes the
job row and commits. The row lock is the job's ownership: if the process dies, PostgreSQL
aborts the transaction, the lock goes, and any worker may claim the job at once.

When no job is due the dispatcher sleeps until a `NOTIFY` (sent once per enqueuing
transaction), until the next delayed job is due on the database clock, or until the polling
interval passes, whichever comes first. `stop()` is graceful: no new claims, in-flight jobs
get `grace_period` seconds to finish, then they are cancelled and their transactions rolled
back, which releases them to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio
import asyncpg
from anyio.abc import TaskGroup

from durable.db import Connection, is_connection_error
from durable.queue import Job, JobQueue
from durable.sql import Queries

log = logging.getLogger("durable.worker")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker does once a handler returns, inside the job's transaction.

    `settled`: the handler already deleted or rescheduled the job row itself (otherwise the
    worker deletes it). `follow`: a job id this slot claims right after the commit, so a run
    continues on the same worker without waiting for a claim. `after_commit`: work to run
    after the commit while the slot stays taken (non-transactional handlers).
    """

    settled: bool = False
    follow: int | None = None
    after_commit: Callable[[], Awaitable[None]] | None = None


Handler = Callable[[Connection, Job], Awaitable[Outcome | None]]
#: Claims the most urgent due job of the given queues in the connection's transaction.
ClaimHook = Callable[[Connection, Sequence[str]], Awaitable[Job | None]]
#: Commits the open transaction, opens the next one and claims a known job in it (a run
#: continuing on the same slot); None if the job is not due and free.
FollowHook = Callable[[Connection, int], Awaitable[Job | None]]


def retry_delay(attempts: int) -> float:
    """Backoff for a job whose handler raised: 1, 2, 4 ... seconds, at most 60."""
    return float(min(2 ** max(attempts - 1, 0), 60))


class _Health:
    """Logs a database outage once when it starts and once when it ends."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        self.failures += 1
        if self.down_since is None:
            self.down_since = asyncio.get_running_loop().time()
            log.warning(
                "database unavailable, retrying with backoff: %s", exc, extra={"error": repr(exc)}
            )
        return float(min(0.05 * 2 ** min(self.failures, 7), 5.0))

    def ok(self) -> None:
        if self.down_since is not None:
            seconds = asyncio.get_running_loop().time() - self.down_since
            log.warning(
                "database reachable again after %.1f s",
                seconds,
                extra={"outage_seconds": round(seconds, 3)},
            )
        self.down_since = None
        self.failures = 0


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
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.pool = pool
        self.jobs = JobQueue(queries)
        self._claim_hook: ClaimHook = claim or self.jobs.claim
        self._follow_hook: FollowHook = claim_follow or self._commit_and_claim
        self.channel = queries.notify_channel
        self.handlers = dict(handlers)
        self.queues = sorted(set(queues))
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.grace_period = grace_period
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._slots = anyio.Semaphore(concurrency)
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._health = _Health()
        self.processed = 0

    def stop(self) -> None:
        """Stop claiming; in-flight jobs get `grace_period` seconds to finish."""
        self._stopping.set()
        self._wakeup.set()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stopping.is_set()

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
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._listen)
            async with anyio.create_task_group() as jobs_tg:
                task_status.started()
                await self._dispatch(jobs_tg)
                with anyio.move_on_after(self.grace_period):
                    await self._idle.wait()
                if self._inflight:
                    log.warning(
                        "grace period over: releasing %d in-flight jobs",
                        self._inflight,
                        extra={"worker": self.name},
                    )
                jobs_tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        log.info(
            "worker %s stopped after %d jobs",
            self.name,
            self.processed,
            extra={"worker": self.name},
        )

    # -- waking up -------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect when it drops (polling covers the gap)."""
        health = _Health()
        while True:
            lost = asyncio.Event()
            try:
                async with self.pool.acquire() as conn:
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    await conn.add_listener(self.channel, self._on_notify)
                    health.ok()
                    # A notification may have been missed while we were not listening.
                    self._wakeup.set()
                    try:
                        while not lost.is_set():
                            with anyio.move_on_after(self.poll_interval * 5):
                                await lost.wait()
                            if not lost.is_set():
                                await conn.execute("SELECT 1")  # detect a silently dead link
                    finally:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            if not conn.is_closed():
                                await conn.remove_listener(self.channel, self._on_notify)
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("listener failed", extra={"worker": self.name})
                await anyio.sleep(health.failed(exc))

    async def _wait_for_work(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._wakeup.wait()

    # -- claiming --------------------------------------------------------------------------

    async def _dispatch(self, tg: TaskGroup) -> None:
        while not self.stopping:
            await self._slots.acquire()
            if self.stopping:
                self._slots.release()
                break
            self._wakeup.clear()
            try:
                claimed, due = await self._claim()
            except Exception as exc:
                self._slots.release()
                if not is_connection_error(exc):
                    log.exception("claim failed", extra={"worker": self.name})
                await self._wait_stop(self._health.failed(exc))
                continue
            self._health.ok()
            if claimed is not None:
                self._started()
                tg.start_soon(self._work, *claimed)
                continue
            self._slots.release()
            timeout = (
                self.poll_interval if due is None or due <= 0 else min(due, self.poll_interval)
            )
            await self._wait_for_work(timeout)

    async def _wait_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    async def _claim(
        self,
    ) -> tuple[tuple[Connection, asyncpg.transaction.Transaction, Job] | None, float | None]:
        conn = await self.pool.acquire()
        try:
            tx = conn.transaction()
            await tx.start()
            job = await self._claim_hook(conn, self.queues)
            if job is not None:
                return (conn, tx, job), None
            due = await self.jobs.next_due(conn, self.queues)
            await tx.rollback()
        except BaseException:
            await self._discard(conn)
            raise
        await self.pool.release(conn)
        return None, due

    async def _commit_and_claim(self, conn: Connection, job_id: int) -> Job | None:
        await conn.execute("COMMIT; BEGIN")
        return await self.jobs.claim_by_id(conn, job_id)

    async def _discard(self, conn: Connection) -> None:
        """Drop a connection whose transaction state is unknown; the server rolls it back."""
        with anyio.CancelScope(shield=True):
            conn.terminate()
            with contextlib.suppress(Exception):
                await self.pool.release(conn)  # type: ignore[arg-type]

    # -- working ---------------------------------------------------------------------------

    def _started(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _finished(self) -> None:
        self._inflight -= 1
        self._slots.release()
        if self._inflight == 0:
            self._idle.set()

    async def _work(self, conn: Connection, tx: asyncpg.transaction.Transaction, job: Job) -> None:
        after: Callable[[], Awaitable[None]] | None = None
        try:
            while True:
                outcome = await self._run_one(conn, tx, job)
                if outcome is None:
                    break
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
                    break
                await tx.commit()
                self.processed += 1
                # The job may have been rescheduled (a retry) without a NOTIFY, or handed to
                # another node: let the dispatcher look at what is due again.
                self._wakeup.set()
                break
        except Exception as exc:
            # The connection or the commit failed under us; the server rolls back and the job
            # is free for any worker again.
            if not is_connection_error(exc):
                log.exception(
                    "job %s failed outside its handler",
                    job.id,
                    extra={"job_id": job.id, "task": job.task, "run_id": job.run_id},
                )
            await self._discard(conn)
            self._finished()
            return
        except BaseException:
            await self._discard(conn)
            self._finished()
            raise
        await self.pool.release(conn)  # type: ignore[arg-type]
        try:
            if after is not None:
                await after()
                # The run's next job became due without a NOTIFY: look for it now.
                self._wakeup.set()
        except Exception:
            log.exception(
                "after-commit work of job %s failed",
                job.id,
                extra={"job_id": job.id, "task": job.task, "run_id": job.run_id},
            )
        finally:
            self._finished()

    async def _run_one(
        self, conn: Connection, tx: asyncpg.transaction.Transaction, job: Job
    ) -> Outcome | None:
        """Run one claimed job up to its commit; on error roll back and schedule a retry."""
        try:
            handler = self.handlers.get(job.task)
            if handler is None:
                raise LookupError(f"no handler for task {job.task!r} on this worker")
            outcome = await handler(conn, job) or Outcome()
            if not outcome.settled:
                await self.jobs.delete(conn, job.id)
            return outcome
        except Exception as exc:
            fields = {
                "job_id": job.id,
                "task": job.task,
                "run_id": job.run_id,
                "queue": job.queue,
                "worker": self.name,
            }
            if is_connection_error(exc):
                log.warning("job %s lost its connection: %s", job.id, exc, extra=fields)
                raise
            with anyio.CancelScope(shield=True):
                await tx.rollback()
                await self._retry(conn, job, exc, fields)
            return None

    async def _retry(
        self, conn: Connection, job: Job, exc: Exception, fields: dict[str, object]
    ) -> None:
        delay = retry_delay(job.attempts + 1)
        log.error(
            "job %s (%s) failed, retrying in %.0f s: %r",
            job.id,
            job.task,
            delay,
            exc,
            extra={**fields, "attempt": job.attempts + 1},
            exc_info=exc,
        )
        async with conn.transaction():
            await self.jobs.retry(conn, job.id, delay)
