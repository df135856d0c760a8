"""Running workers for an `Engine`: `run_worker` and `worker`, with their pool and runner."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from durable import metrics
from durable.batch import DEFAULT_BATCH_SIZE, DEFAULT_BATCH_WINDOW, DEFAULT_CHAIN_SIZE
from durable.db import create_pool
from durable.errors import ConfigurationError
from durable.flow import Limit
from durable.history import History
from durable.operations import Operations
from durable.runtime import registry
from durable.runtime.runner import Runner
from durable.runtime.threads import Threads
from durable.scheduler import ScheduleClient, Scheduler
from durable.versions import announce
from durable.worker import Worker


class Serving(Operations, History, ScheduleClient):
    """The engine's workers: each serves every registered workflow and the schedules."""

    dsn: str | None
    transaction_timeout: float | None
    lease_seconds: float
    max_claims: int
    poll_interval: float
    statement_cache_size: int
    server_settings: dict[str, str]
    _limits: dict[str, Limit]
    _threads: Threads

    def _worker_settings(self) -> dict[str, str]:
        settings = {
            # A worker host that vanishes (not just its process) must not hold its jobs'
            # locks until the kernel's default keepalive gives up, hours later.
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
        }
        if self.transaction_timeout is not None:
            # Backstop for a worker whose event loop hangs mid-transaction: the server ends
            # the session, which releases the job to other workers.
            settings["idle_in_transaction_session_timeout"] = str(
                int((self.transaction_timeout + 30) * 1000)
            )
        return settings

    async def _announce(self) -> None:
        """Record the served shapes; say which unfinished runs this worker leaves waiting."""
        workflows = self._registered()
        async with self._acquire() as conn:
            await self._record_shapes(conn, workflows)
            await self._declare_schedules(conn)
            await announce(conn, self.queries, workflows)

    async def run_worker(
        self,
        *,
        concurrency: int = 16,
        poll_interval: float | None = None,
        grace_period: float = 10.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        chain_size: int = DEFAULT_CHAIN_SIZE,
        task_status: anyio.abc.TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a worker for every registered workflow until cancelled.

        With a DSN the worker has its own pool (`concurrency` + 3 connections, one more
        when the engine has schedules), so web requests using the engine's pool are never
        starved by jobs. Each worker also runs the engine's schedules.

        Batches (group commit): a slot that finds a deep queue claims up to `batch_size`
        due jobs of different runs in one statement, runs them one after the other in one
        transaction (each after the first under its own savepoint) and commits them
        together once they ran or `batch_window` seconds of work passed; the jobs not run
        go back to the queue at that commit. The size adapts: 1 on an idle queue and for
        a chain continuing on its slot, larger the deeper the queue, smaller the slower the
        handlers; a slow handler, a `transactional=False` step or a limited step ends its
        batch. The trade-off: the locks a batch's handlers take are held until its commit,
        up to `batch_window` plus one handler's time. Off by default (`batch_size=1`); they pay
        where slots wait on commits rather than on CPU: with 4 slots, `batch_size=16` about
        doubled the drain of one-step runs on 2 cores (docs/performance.md).

        Chains (group commit of one run's steps): when a node moves its run on to a step
        that may share a transaction (a transactional step without a named limit), the
        slot runs that step in the same transaction, and commits up to
        `chain_size` consecutive steps together, or fewer once they spent `batch_window`
        seconds of user code. A crash rolls back the chain's steps, which run again; the
        locks their handlers take are held until the chain commits. `chain_size=1` commits
        every step on its own.
        """
        if not self._versions:
            raise ConfigurationError("register at least one workflow before running a worker")
        own_pool = self.dsn is not None
        if not own_pool:
            # Slots hold a connection each; the listener, the poller and a claim count take
            # one more each, and wait()'s listener one on an engine built on a pool; the
            # scheduler one more when there are schedules.
            needed = concurrency + 4 + bool(self._schedules)
            if self.pool.get_max_size() < needed:
                raise ConfigurationError(
                    f"the engine's pool holds {self.pool.get_max_size()} connections, but a "
                    f"worker with concurrency={concurrency} needs {needed} "
                    f"(concurrency + {needed - concurrency}); "
                    "make the pool bigger or the concurrency smaller"
                )
        pool = (
            await create_pool(
                self.dsn,
                # No floor: during an outage asyncpg would log every failed attempt to
                # refill it; the slots reconnect on demand.
                min_size=0,
                max_size=concurrency + 3 + bool(self._schedules),
                server_settings={**self._worker_settings(), **self.server_settings},
                statement_cache_size=self.statement_cache_size,
                connect_timeout=self.connect_timeout,
            )
            if self.dsn is not None
            else self.pool
        )
        runner = Runner(
            self.queries,
            self._registered(),
            pool,
            lease_seconds=self.lease_seconds,
            transaction_timeout=self.transaction_timeout,
            max_claims=self.max_claims,
            limits=self._limits,
            threads=self._threads,
        )
        for wf in runner.by_queue.values():
            metrics.declare(wf.name, (node.name for node in wf.nodes))
        worker = Worker(
            pool,
            self.queries,
            dict.fromkeys(
                ("advance", "branch", "compensate", "admit"), metrics.timed(runner.handle)
            ),
            queues=runner.queues,
            concurrency=concurrency,
            poll_interval=poll_interval or self.poll_interval,
            grace_period=grace_period,
            claim=runner.claim,
            claim_follow=runner.claim_follow,
            isolate=False,
            on_error=runner.on_error,
            claim_batch=runner.claim_batch,
            batchable=runner.batchable,
            batch_size=batch_size,
            batch_window=batch_window,
            chain=runner.chain,
            chain_size=chain_size,
        )
        scheduler = (
            Scheduler(
                self,
                pool,
                poll_interval=poll_interval or self.poll_interval,
                stopping=lambda: worker.stopping,
            )
            if self._schedules
            else None
        )

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with anyio.create_task_group() as tg:
                if scheduler is not None:
                    tg.start_soon(scheduler.run)
                await worker.run(task_status=task_status)
                tg.cancel_scope.cancel()

        try:
            await self._announce()
            async with anyio.create_task_group() as tg:
                await tg.start(serve)
                tg.start_soon(
                    registry.heartbeat, pool, self.queries, worker, sorted(self._versions)
                )
                task_status.started(worker)
        finally:
            if own_pool:
                with anyio.CancelScope(shield=True):
                    await pool.close()

    @contextlib.asynccontextmanager
    async def worker(
        self,
        *,
        concurrency: int = 16,
        poll_interval: float | None = None,
        grace_period: float = 10.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        chain_size: int = DEFAULT_CHAIN_SIZE,
    ) -> AsyncIterator[Worker]:
        """Run a worker in the background for the duration of the block (e.g. a lifespan).

        On exit the worker stops claiming and in-flight jobs get `grace_period` seconds. An
        exception raised in the block comes out as itself; should the worker crash as well,
        both come out together in an `ExceptionGroup`.
        """
        try:
            async with anyio.create_task_group() as tg:
                worker: Worker = await tg.start(
                    lambda task_status: self.run_worker(
                        concurrency=concurrency,
                        poll_interval=poll_interval,
                        grace_period=grace_period,
                        batch_size=batch_size,
                        batch_window=batch_window,
                        chain_size=chain_size,
                        task_status=task_status,
                    )
                )
                try:
                    yield worker
                finally:
                    worker.stop()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise _unwrap(group.exceptions[0]) from None
            raise


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
