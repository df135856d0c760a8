"""Where a job is claimed: the asyncio worker loop that runs jobs inside their transactions.

Theory of operation. The worker runs `concurrency` slots. Each slot holds a connection and
loops: inside a transaction it claims one due job with `FOR UPDATE SKIP LOCKED`, runs the
job's handler in that same transaction, deletes (or re-points) the job row and commits —
sending `COMMIT; BEGIN` in one round trip so the next claim already runs in a fresh
transaction. The row lock is the job's ownership: if the process dies, PostgreSQL aborts the
transaction, the lock goes, and any worker may claim the job at once. Slots claim on their
own connections at the same time, so a worker with N free slots claims N jobs in parallel.

A slot whose claim finds nothing goes idle. Idle slots are woken one at a time: by a
`NOTIFY` (sent, once per enqueuing transaction, only while some worker has an idle slot and
has said so in the `listeners` table), by the poller when the next delayed job falls due on
the database clock or the polling interval passes, and by a slot that just claimed a job
(there may be more). `stop()` is graceful: no new claims, in-flight jobs get `grace_period`
seconds to finish, then they are cancelled and their transactions rolled back, which
releases them to other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from durable.db import Connection, is_connection_error
from durable.queue import Job, JobQueue
from durable.sql import Queries
from durable.stepconn import StepConnection, swallowed_error, undo

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


# How soon an idle worker looks again while due jobs are held elsewhere (their worker may
# die, which frees them silently).
_HELD_RECHECK = 0.5


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
        isolate: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.pool = pool
        self.queries = queries
        self.jobs = JobQueue(queries)
        self._claim_hook: ClaimHook = claim or self.jobs.claim
        self._follow_hook: FollowHook = claim_follow or self._commit_and_claim
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
        self._idle: list[asyncio.Event] = []  # events of idle slots, oldest first
        self._missed_wakeup = False
        self._poke = asyncio.Event()
        self._inflight = 0
        self._no_inflight = asyncio.Event()
        self._no_inflight.set()
        self._health = _Health()
        self.processed = 0

    def stop(self) -> None:
        """Stop claiming; in-flight jobs get `grace_period` seconds to finish."""
        self._stopping.set()
        for event in self._idle:
            event.set()
        self._poke.set()

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
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._listen)
                outer.start_soon(self._poll)
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

    # -- waking up -------------------------------------------------------------------------

    def _wake_one(self) -> None:
        """Wake the longest-idle slot; remember the wake-up if no slot is idle."""
        if self._idle:
            self._idle.pop(0).set()
        else:
            self._missed_wakeup = True

    def _on_notify(self, *_: object) -> None:
        self._wake_one()
        self._poke.set()

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect when it drops (polling covers the gap)."""
        health = self._health  # one outage, one log line: shared with the slots and poller
        while True:
            lost = asyncio.Event()
            try:
                async with self.pool.acquire() as conn:
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    await conn.add_listener(self.channel, self._on_notify)
                    health.ok()
                    # A notification may have been missed while we were not listening.
                    self._on_notify()
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

    async def _poll(self) -> None:
        """Wake a slot when the next delayed job falls due, or every `poll_interval`.

        While some slot is idle, the worker is registered in `listeners` so that enqueuing
        transactions NOTIFY it; once registered, one idle slot claims again, which closes the
        gap between its empty claim and the registration.
        """
        registered = False
        busy_ticks = 0
        while not self.stopping:
            due: float | None = None
            try:
                async with self.pool.acquire() as conn:
                    if self._idle and not registered:
                        await conn.execute(self.queries["register_listener"], self.name)
                        registered = True
                        self._wake_one()
                    elif registered and not self._idle:
                        busy_ticks += 1
                        if busy_ticks > 1:  # busy for a whole tick: stop asking for NOTIFYs
                            await conn.execute(self.queries["unregister_listener"], self.name)
                            registered = False
                    if self._idle:
                        busy_ticks = 0
                        due, held = await self.jobs.due_state(conn, self.queues)
                        if held:
                            # Due jobs are held by other transactions. If their worker dies
                            # the jobs come free with no NOTIFY: look again soon.
                            due = min(due, _HELD_RECHECK) if due is not None else _HELD_RECHECK
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("poller failed", extra={"worker": self.name})
                registered = False
                await self._sleep_or_poke(self._health.failed(exc))
                continue
            if due is not None and due <= 0:
                self._wake_one()
                due = None
            timeout = self.poll_interval if due is None else min(due, self.poll_interval)
            if not await self._sleep_or_poke(timeout):
                # A tick: refresh the registration and let a slot look, in case a NOTIFY was
                # lost (a reconnect) or a job became due on another worker's schedule.
                if registered:
                    with contextlib.suppress(Exception):
                        async with self.pool.acquire() as conn:
                            await conn.execute(self.queries["register_listener"], self.name)
                self._wake_one()

    async def _sleep_or_poke(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if poked (something changed), False on timeout."""
        with anyio.move_on_after(seconds):
            await self._poke.wait()
            self._poke.clear()
            return True
        return False

    async def _wait_idle(self) -> None:
        """Park this slot until woken (or until the worker stops)."""
        if self._missed_wakeup:
            self._missed_wakeup = False
            return
        event = asyncio.Event()
        self._idle.append(event)
        self._poke.set()  # the poller registers us as a listener and computes the next due
        try:
            await event.wait()
        finally:
            if event in self._idle:
                self._idle.remove(event)

    # -- a slot ----------------------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        """Claim and run jobs one after another on one connection until the worker stops.

        `tx` is None exactly when the connection is outside a transaction; a connection whose
        state is unknown (an error or a cancellation mid-job) is discarded, never reused.
        """
        conn: Connection | None = None
        tx: asyncpg.transaction.Transaction | None = None
        rested = False  # the connection sat idle: the server may have dropped it meanwhile
        try:
            while not self.stopping:
                try:
                    if conn is None:
                        conn = await self.pool.acquire()
                    assert conn is not None
                    if tx is None:
                        tx = conn.transaction()
                        await tx.start()
                    job = await self._claim_hook(conn, self.queues)
                    if job is None:
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
                if job is None:
                    await self._wait_idle()
                    rested = True
                    continue
                self._wake_one()  # there may be more work: let an idle slot look too
                assert tx is not None
                state, tx, after = await self._work(conn, tx, job)
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
        self, conn: Connection, tx: asyncpg.transaction.Transaction, job: Job
    ) -> tuple[str, asyncpg.transaction.Transaction | None, Callable[[], Awaitable[None]] | None]:
        """Run a claimed job (and the jobs it hands on to this slot) to its commit.

        Returns ("open", tx, None): the connection is in a fresh transaction, ready for the
        next claim; ("idle", None, after): committed, outside any transaction, with work to
        do after the commit (or None); ("broken", None, None): discard the connection.
        A cancellation propagates with the transaction still open (the slot discards it).
        """
        self._started()
        try:
            while True:
                outcome = await self._run_one(conn, tx, job)
                if outcome is None:  # rolled back and rescheduled
                    self._poke.set()
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
                self._poke.set()
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
        self._wake_one()  # the run's next job became due without a NOTIFY

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
            await self.jobs.retry(conn, job.id, retry_delay(job.attempts + 1))
