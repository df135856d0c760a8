"""The public entry point: `Engine` starts, inspects, waits for and cancels runs, and runs
workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
from ulid import ULID

from durable.db import Connection, acquire, create_pool, dumps, loads, redact
from durable.errors import (
    ConfigurationError,
    DefinitionError,
    RunCancelled,
    RunFailed,
    RunNotFound,
    WorkflowNotFound,
)
from durable.migrate import migrate
from durable.model import Attempt, JournalEntry, Run, RunStatus
from durable.runner import Runner
from durable.sql import Queries
from durable.worker import Worker
from durable.workflow import Workflow

log = logging.getLogger("durable.engine")

# How often `wait` re-reads a run in case a notification was missed (e.g. a reconnect).
_WAIT_RECHECK = 5.0


def _run_from_record(row: asyncpg.Record) -> Run:
    return Run(
        id=row["id"],
        workflow=row["workflow"],
        status=RunStatus(row["status"]),
        input=loads(row["input"]),
        results=loads(row["results"]) or {},
        result=loads(row["result"]),
        error=row["error"],
        current_node=row["current_node"],
        parent_id=row["parent_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        children=tuple(row["children"] or ()),
    )


class Engine:
    """Runs registered workflows on PostgreSQL.

    Give it a DSN (it opens and closes its own pool) or an existing asyncpg `pool`. Use it as
    `async with engine:` (opens the pool and applies migrations), or call `open()`/`close()`.

    `schema`: where durable's tables live (validated). `lease_seconds`: how long a
    `transactional=False` attempt may go without a heartbeat before another worker retries
    it. `transaction_timeout`: the longest a node may keep its transaction open; an attempt
    that runs longer is cancelled and counted as failed (None: no limit).
    `poll_interval`: the workers' fallback polling period when no NOTIFY arrives.
    `statement_cache_size`: asyncpg's prepared-statement cache; 0 for PgBouncer in transaction
    mode (for starting runs and sending signals; workers need session mode).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        workflows: Iterable[Workflow] = (),
        schema: str = "durable",
        pool_size: int = 10,
        lease_seconds: float = 30.0,
        transaction_timeout: float | None = 60.0,
        poll_interval: float = 1.0,
        statement_cache_size: int = 256,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ConfigurationError("Engine needs exactly one of a DSN or an asyncpg pool")
        self.dsn = dsn
        self.queries = Queries(schema)
        self.schema = schema
        self._workflows: dict[str, Workflow] = {}
        for wf in workflows:
            self.register(wf)
        self._pool = pool
        self._owns_pool = pool is None
        self._pool_size = pool_size
        self.poll_interval = poll_interval
        if transaction_timeout is not None and transaction_timeout <= 0:
            raise ConfigurationError("transaction_timeout must be > 0 seconds or None")
        self.transaction_timeout = transaction_timeout
        self.statement_cache_size = statement_cache_size
        self.runner = Runner(
            self.queries,
            self._workflows,
            lease_seconds=lease_seconds,
            transaction_timeout=transaction_timeout,
        )
        self._runs_channel = f"{schema}_runs"
        self._listener: Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._results: dict[str, str] = {}  # results that came with a run's final NOTIFY

    def __repr__(self) -> str:
        where = redact(self.dsn) if self.dsn else "pool"
        return f"Engine({where}, schema={self.schema!r}, workflows={sorted(self._workflows)})"

    # -- set-up ----------------------------------------------------------------------------

    def register(self, workflow: Workflow) -> None:
        """Make `workflow` known to this engine (names are unique per engine)."""
        if not isinstance(workflow, Workflow):
            raise DefinitionError(f"expected a durable.Workflow, got {workflow!r}")
        if not workflow.nodes:
            raise DefinitionError(f"workflow {workflow.name!r} has no nodes")
        existing = self._workflows.get(workflow.name)
        if existing is not None and existing is not workflow:
            raise DefinitionError(f"a workflow named {workflow.name!r} is already registered")
        self._workflows[workflow.name] = workflow

    @property
    def workflows(self) -> Mapping[str, Workflow]:
        """The registered workflows by name."""
        return dict(self._workflows)

    @property
    def pool(self) -> asyncpg.Pool:
        """The engine's asyncpg pool (open the engine first)."""
        if self._pool is None:
            raise ConfigurationError("the engine is not open: use 'async with engine:'")
        return self._pool

    def _acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        return acquire(self.pool, redact(self.dsn) if self.dsn else "the engine's pool")

    async def open(self, *, migrate: bool = True) -> None:
        """Open the pool (when given a DSN) and, by default, apply pending migrations."""
        if self._pool is None:
            assert self.dsn is not None
            self._pool = await create_pool(
                self.dsn,
                min_size=1,
                max_size=self._pool_size,
                statement_cache_size=self.statement_cache_size,
            )
        if migrate:
            await self.migrate()

    async def close(self) -> None:
        """Close the listener and, if the engine opened it, the pool."""
        if self._listener is not None:
            with contextlib.suppress(Exception):
                if self.dsn is not None:
                    await self._listener.close()
                else:
                    await self._listener.remove_listener(self._runs_channel, self._on_finished)
                    await self.pool.release(self._listener)  # type: ignore[arg-type]
            self._listener = None
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def migrate(self) -> list[int]:
        """Apply pending migrations (safe from many processes at once)."""
        async with self._acquire() as conn:
            return await migrate(conn, self.schema)

    def _workflow(self, workflow: str | Workflow) -> Workflow:
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        found = self._workflows.get(name)
        if found is None:
            known = ", ".join(sorted(self._workflows)) or "none"
            raise WorkflowNotFound(f"workflow {name!r} is not registered (registered: {known})")
        return found

    # -- runs ------------------------------------------------------------------------------

    async def start(
        self,
        workflow: str | Workflow,
        input: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        conn: Connection | None = None,
    ) -> str:
        """Create a run and its first job in one transaction; return the run id (a ULID).

        Nothing is written unless the workflow is registered and `input` serializes to JSON.
        With `conn`, the run commits (or rolls back) with the caller's transaction. With an
        `idempotency_key`, a second start with the same key returns the first run's id.
        """
        wf = self._workflow(workflow)
        if input is None:
            input = {}
        if not isinstance(input, Mapping):
            raise TypeError(f"input must be a mapping (a JSON object), got {type(input).__name__}")
        text = dumps(dict(input), f"input of workflow {wf.name!r}")
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not idempotency_key or "\x00" in idempotency_key
        ):
            raise ValueError("idempotency_key must be a non-empty string without NUL")
        run_id = str(ULID())
        args = (run_id, wf.name, text, wf.nodes[0].name, idempotency_key, None, None)
        if conn is not None:
            return await self._insert_run(conn, wf.name, idempotency_key, args)
        async with self._acquire() as c:
            return await self._insert_run(c, wf.name, idempotency_key, args)

    async def _insert_run(
        self, conn: Connection, workflow: str, key: str | None, args: tuple[Any, ...]
    ) -> str:
        created: str | None = await conn.fetchval(self.queries["insert_run"], *args)
        if created is not None:
            log.debug("run %s started", created, extra={"run_id": created, "workflow": workflow})
            return created
        existing: str = await conn.fetchval(self.queries["find_idempotent_run"], workflow, key)
        return existing

    async def get_run(self, run_id: str, *, journal: bool = False) -> Run:
        """The run `run_id`; with `journal=True` also its journal and failed attempts."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(self.queries["get_run"], run_id)
            if row is None:
                raise RunNotFound(f"no run with id {run_id!r}")
            run = _run_from_record(row)
            if not journal:
                return run
            entries = tuple(
                JournalEntry(
                    key=r["key"],
                    node=r["node"],
                    status=r["status"],
                    result=loads(r["result"]),
                    error=r["error"],
                    attempts=r["attempts"],
                    started_at=r["started_at"],
                    finished_at=r["finished_at"],
                )
                for r in await conn.fetch(self.queries["get_journal"], run_id)
            )
            attempts = tuple(
                Attempt(
                    key=r["key"],
                    attempt=r["attempt"],
                    error=r["error"],
                    started_at=r["started_at"],
                    failed_at=r["failed_at"],
                )
                for r in await conn.fetch(self.queries["get_attempts"], run_id)
            )
        return Run(**{**run.__dict__, "journal": entries, "attempts": attempts})

    async def list_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[Run]:
        """Runs, newest first, optionally of one status and/or workflow."""
        if status is not None:
            status = RunStatus(status).value
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        async with self._acquire() as conn:
            rows = await conn.fetch(self.queries["list_runs"], status, workflow, limit)
        return [_run_from_record(r) for r in rows]

    # -- waiting ---------------------------------------------------------------------------

    def _on_finished(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        run_id, _, result = str(payload).partition("\n")
        waiters = self._waiters.get(run_id)
        if not waiters:
            return
        if result:  # a completed run's result, when small enough to travel with the NOTIFY
            self._results[run_id] = result
        for event in waiters:
            event.set()

    async def _ensure_listener(self) -> None:
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            conn: Connection
            if self.dsn is not None:
                conn = await asyncpg.connect(self.dsn)
            else:
                conn = await self.pool.acquire()
            await conn.add_listener(self._runs_channel, self._on_finished)
            self._listener = conn

    async def wait(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait until the run finishes; return its result.

        Raises `RunFailed` or `RunCancelled` (carrying the final `Run`), `RunNotFound`, or
        `TimeoutError` after `timeout` seconds. Woken by the run's own final transaction.
        """
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        try:
            with anyio.fail_after(timeout):
                with contextlib.suppress(Exception):
                    await self._ensure_listener()
                # Only watched runs NOTIFY when they finish (NOTIFY serialises commits).
                async with self._acquire() as conn:
                    await conn.execute(self.queries["watch_run"], run_id)
                run = await self.get_run(run_id)
                while True:
                    if run.status is RunStatus.COMPLETED:
                        return run.result
                    if run.status is RunStatus.FAILED:
                        raise RunFailed(run)
                    if run.status is RunStatus.CANCELLED:
                        raise RunCancelled(run)
                    with anyio.move_on_after(_WAIT_RECHECK):
                        await event.wait()
                    event.clear()
                    result = self._results.get(run_id)
                    if result is not None:
                        return loads(result)
                    run = await self.get_run(run_id)
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[run_id]
                    self._results.pop(run_id, None)

    # -- signals ---------------------------------------------------------------------------

    async def signal(
        self,
        run_id: str,
        name: str,
        payload: Any = None,
        *,
        conn: Connection | None = None,
    ) -> bool:
        """Send signal `name` with `payload` to a run's mailbox.

        The first `wait_for_signal` for that name consumes it (oldest first), whether it is
        already waiting (it is woken in this transaction) or reaches the wait later. Returns
        True when recorded, False when the run has finished or is compensating (no wait would
        ever consume it); raises `RunNotFound`. With `conn`, the signal commits with the
        caller's transaction.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"signal name must be a non-empty string without NUL, got {name!r}")
        text = dumps(payload, f"payload of signal {name!r}")
        if conn is not None:
            return await self._signal(conn, run_id, name, text)
        async with self._acquire() as c:
            return await self._signal(c, run_id, name, text)

    async def _signal(self, conn: Connection, run_id: str, name: str, text: str) -> bool:
        async with conn.transaction():
            held = [r["id"] for r in await conn.fetch(self.queries["lock_run_jobs"], run_id)]
            run = await conn.fetchrow(self.queries["lock_run"], run_id)
            if run is None:
                raise RunNotFound(f"no run with id {run_id!r}")
            if run["status"] in ("completed", "failed", "cancelled", "compensating"):
                return False  # finished, or rolling back: no wait will ever consume it
            await conn.execute(self.queries["record_signal"], run_id, name, text)
            if run["status"] == "waiting" and run["waiting_for"] == name:
                await conn.execute(
                    self.queries["wake_run"],
                    run_id,
                    run["workflow"],
                    dumps({"c": run["cursor"], "a": 1}, "job payload"),
                    self.queries.notify_channel,
                    held,
                )
        log.debug(
            "signal %s sent to run %s", name, run_id, extra={"run_id": run_id, "signal": name}
        )
        return True

    # -- cancelling ------------------------------------------------------------------------

    async def cancel(self, run_id: str, *, reason: str = "cancelled") -> bool:
        """Cancel a pending, running or waiting run: its completed steps are compensated and
        it ends `cancelled`. Returns False if the run had already finished or was failing.

        A handler in flight finishes first (its job is locked until it commits); no further
        node starts once the cancel is requested.
        """
        async with self._acquire() as conn:
            # Committed at once: from now on claims skip the run's jobs, so the cancel gets
            # their locks as soon as the transaction in flight (if any) ends.
            await conn.execute(self.queries["request_cancel"], run_id)
            try:
                async with conn.transaction():
                    await conn.fetch(self.queries["lock_run_jobs"], run_id)
                    row = await conn.fetchrow(self.queries["lock_run"], run_id)
                    if row is None:
                        raise RunNotFound(f"no run with id {run_id!r}")
                    if row["status"] in ("completed", "failed", "cancelled", "compensating"):
                        return False
                    if await conn.fetchval(self.queries["has_journal"], run_id):
                        # Compensation runs on a worker, which ends the run `cancelled`.
                        await conn.fetchval(
                            self.queries["begin_cancel"],
                            run_id,
                            reason,
                            row["workflow"],
                            dumps({"final": "cancelled", "a": 1}, "job payload"),
                        )
                    else:
                        await conn.execute(
                            self.queries["cancel_now"], run_id, reason, self._runs_channel
                        )
                    children = [
                        r["id"] for r in await conn.fetch(self.queries["active_children"], run_id)
                    ]
                    # Gone when the cancel commits, so the compensation job is claimable then.
                    await conn.execute(self.queries["drop_cancel_request"], run_id)
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.execute(self.queries["drop_cancel_request"], run_id)
        log.info("run %s cancelled", run_id, extra={"run_id": run_id})
        for child in children:
            await self.cancel(child, reason=f"parent run {run_id} was cancelled")
        return True

    # -- retry and purge -------------------------------------------------------------------

    async def retry(self, run_id: str) -> bool:
        """Resume a failed run at the node that failed, with a fresh attempt budget.

        Completed nodes are not re-run, and compensations that already ran stand (the walk
        will not run them twice). Returns False if the run is not `failed`; raises
        `RunNotFound` for an unknown id.
        """
        async with self._acquire() as conn, conn.transaction():
            await conn.fetch(self.queries["lock_run_jobs"], run_id)
            row = await conn.fetchrow(self.queries["lock_run"], run_id)
            if row is None:
                raise RunNotFound(f"no run with id {run_id!r}")
            if row["status"] != "failed":
                return False
            node = await conn.fetchval(self.queries["failed_node"], run_id)
            await conn.execute(
                self.queries["retry_run"], run_id, node, row["workflow"], row["cursor"]
            )
        log.info(
            "run %s retried from node %s", run_id, node, extra={"run_id": run_id, "node": node}
        )
        return True

    async def purge(self, *, older_than: timedelta, batch_size: int = 1000) -> int:
        """Delete runs that finished more than `older_than` ago, with their journal, attempts
        and mailbox, in batches of `batch_size`; return how many runs were deleted."""
        seconds = older_than.total_seconds()
        if seconds < 0:
            raise ValueError("older_than must not be negative")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total = 0
        while True:
            async with self._acquire() as conn:
                n: int = await conn.fetchval(self.queries["purge_runs"], seconds, batch_size)
            total += n
            if n < batch_size:
                break
        log.info(
            "purged %d runs finished more than %s ago", total, older_than, extra={"purged": total}
        )
        return total

    # -- working ---------------------------------------------------------------------------

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

    def _handlers(self) -> dict[str, Any]:
        return {
            "advance": self.runner.advance,
            "branch": self.runner.branch,
            "compensate": self.runner.compensate,
        }

    async def run_worker(
        self,
        *,
        concurrency: int = 16,
        poll_interval: float | None = None,
        grace_period: float = 10.0,
        task_status: anyio.abc.TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run a worker for every registered workflow until cancelled.

        With a DSN the worker has its own pool (`concurrency` + 2 connections), so web
        requests using the engine's pool are never starved by jobs.
        """
        if not self._workflows:
            raise ConfigurationError("register at least one workflow before running a worker")
        own_pool = self.dsn is not None
        pool = (
            await create_pool(
                self.dsn,
                # No floor: during an outage asyncpg would log every failed attempt to
                # refill it; the slots reconnect on demand.
                min_size=0,
                max_size=concurrency + 2,
                server_settings=self._worker_settings(),
                statement_cache_size=self.statement_cache_size,
            )
            if self.dsn is not None
            else self.pool
        )
        self.runner.pool = pool
        worker = Worker(
            pool,
            self.queries,
            self._handlers(),
            queues=list(self._workflows),
            concurrency=concurrency,
            poll_interval=poll_interval or self.poll_interval,
            grace_period=grace_period,
            claim=self.runner.claim,
            claim_follow=self.runner.claim_follow,
            isolate=False,
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
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
    ) -> AsyncIterator[Worker]:
        """Run a worker in the background for the duration of the block (e.g. a lifespan).

        On exit the worker stops claiming and in-flight jobs get `grace_period` seconds.
        """
        async with anyio.create_task_group() as tg:
            worker: Worker = await tg.start(
                lambda task_status: self.run_worker(
                    concurrency=concurrency,
                    poll_interval=poll_interval,
                    grace_period=grace_period,
                    task_status=task_status,
                )
            )
            try:
                yield worker
            finally:
                worker.stop()
