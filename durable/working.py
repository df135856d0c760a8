"""Running one claimed job up to its commit, and its work after the commit (`Worker`'s base)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from durable.batch import WALL_WINDOWS, BatchSizer
from durable.db import Connection, is_connection_error
from durable.queue import (
    ChainHook,
    ErrorHook,
    FollowHook,
    Handler,
    Job,
    JobQueue,
    Outcome,
    retry_delay,
)
from durable.stepconn import StepConnection, swallowed_error, undo
from durable.wakeup import Wakeups

log = logging.getLogger("durable.worker")


class Working:
    """A slot's work on the jobs it claimed, for the queue worker (`durable.worker.Worker`)."""

    jobs: JobQueue
    handlers: dict[str, Handler]
    isolate: bool
    name: str
    processed: int
    _inflight: int
    _no_inflight: asyncio.Event
    _wakeups: Wakeups
    _follow_hook: FollowHook
    _chain_hook: ChainHook | None
    #: Jobs whose run goes on one job at a time: a chain with them failed (`_run_one`).
    _unchained: set[int]
    chain_size: int
    batch_window: float
    _on_error: ErrorHook | None

    @property
    def stopping(self) -> bool:
        raise NotImplementedError

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

        A chain: when a job hands its run on to a step that may share the transaction
        (the chain hook says which), that step runs in the same transaction, without a
        commit and a re-lock in between; up to `chain_size` jobs, `batch_window` seconds
        of user code or `WALL_WINDOWS` windows of wall-clock time, then the transaction
        commits them together (group commit, as a batch does for the jobs of different
        runs). A crash rolls back the whole chain, whose steps then run again, each one's
        writes rolled back with it; so does a failure outside a handler (see `_run_one`).
        """
        links = 0  # jobs run in this transaction after the first
        began = time.monotonic()
        busy = 0.0  # seconds of user code in this transaction
        try:
            while True:
                started = time.monotonic()
                outcome = await self._run_one(conn, tx, job, chained=links > 0)
                took = time.monotonic() - started
                if outcome is not None and outcome.busy is not None:
                    took = outcome.busy
                if sizer is not None:
                    sizer.observe(took)
                if outcome is None:  # rolled back and rescheduled
                    self._wakeups.poke()
                    if conn.is_closed():
                        return "broken", None, None
                    return "open", await self._begin(conn), None
                after = outcome.after_commit
                if outcome.follow is not None and after is None and not self.stopping:
                    busy += took
                    link = self._next_link(outcome.follow, links, began, busy)
                    if link is not None:
                        links += 1
                        self.processed += 1
                        job = link
                        continue
                    # The hook commits and opens the next transaction (in one round trip);
                    # `tx` stays the top transaction, so handlers' savepoints still work.
                    follow = await self._follow_hook(conn, outcome.follow)
                    links, began, busy = 0, time.monotonic(), 0.0
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

    def _next_link(self, job_id: int, links: int, began: float, busy: float) -> Job | None:
        """The job a chain goes on with in this transaction, or None (see `_work`)."""
        if (
            self._chain_hook is None
            or job_id in self._unchained
            or links + 1 >= self.chain_size
            or busy >= self.batch_window
            or time.monotonic() - began >= WALL_WINDOWS * self.batch_window
        ):
            return None
        return self._chain_hook(job_id)

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
        self, conn: Connection, tx: asyncpg.transaction.Transaction, job: Job, chained: bool
    ) -> Outcome | None:
        """Run one claimed job up to its commit.

        A failing isolated handler is rolled back to its savepoint and its retry scheduled in
        the same transaction (the worker then commits both); otherwise the whole transaction
        rolls back and the retry is scheduled in a new one (None is returned). A job of a
        chain (`chained`: not the transaction's first) has no savepoint of its own, which
        would cost a round trip on every step: its failure rolls back the whole chain,
        whose jobs run again, and its run goes on unchained on this worker, so that the
        failure, should it come again, is recorded as that job's own (None is returned).
        """
        fields = self.log_fields(job)
        handler_conn: Any = StepConnection(conn) if self.isolate else conn
        try:
            return await self.call_handler(conn, handler_conn, job)
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
                # `tx` stays the top transaction across the raw ROLLBACK and BEGIN (as
                # across `COMMIT; BEGIN` below), and its commit ends the new one. The job
                # is locked again in the same message: no other slot takes it up meanwhile,
                # and the next claim does not take a rolled-back lock for a worker's death.
                await conn.execute("ROLLBACK; BEGIN; " + self.jobs.q["lock_job"] % job.id)
                if chained:
                    self._unchain(job, exc, fields)
                else:
                    await self._retry(conn, job, exc, fields)
                await tx.commit()
            return None

    def _unchain(self, job: Job, exc: Exception, fields: dict[str, object]) -> None:
        """A job of a chain failed outside its handler: the chain rolled back, nothing is
        recorded, and the job's run goes on one job at a time on this worker."""
        if len(self._unchained) > 10_000:  # runs that finished long ago, most likely
            self._unchained.clear()
        self._unchained.add(job.id)
        log.warning(
            "job %s failed outside its handler in a chain; the chain rolls back and its "
            "run goes on one job at a time: %r",
            job.id,
            exc,
            extra=fields,
        )

    def log_fields(self, job: Job) -> dict[str, object]:
        """The fields a log line about `job` carries."""
        return {
            "job_id": job.id,
            "task": job.task,
            "run_id": job.run_id,
            "queue": job.queue,
            "worker": self.name,
        }

    async def call_handler(self, conn: Connection, handler_conn: Any, job: Job) -> Outcome:
        """Run `job`'s handler on `handler_conn`; raise what it raised or swallowed; delete
        the job row unless the handler settled it."""
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
