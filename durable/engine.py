"""The public entry point: `Engine` holds the registered workflows and the pool, runs the
client operations (`durable.client`) and starts workers (`durable.serving`, `durable.runtime`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import asyncpg

from durable.db import Connection, acquire, create_pool, redact
from durable.errors import ConfigurationError, DefinitionError
from durable.flow import Limit, check_limits
from durable.migrate import migrate
from durable.runtime.threads import DEFAULT_THREADS, Threads
from durable.schedule import Schedule
from durable.serving import Serving
from durable.sql import Queries
from durable.workflow import Step, Workflow

log = logging.getLogger("durable.engine")


class Engine(Serving):
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
    `max_claims`: how many times workers may die holding one job (killed, out of memory)
    before its attempt is recorded as failed with `WorkerLost`. `connect_timeout`: seconds
    to wait for a server that accepts the connection but does not answer (with a
    multi-host DSN, for all its hosts together).
    `read_dsn`: a read replica (a streaming standby) for the reads that only show runs
    (`get_run`, `list_runs`, the dashboard's pages), on a pool of its own (`pool_size`
    connections at most); it may lag behind the primary. Everything that changes a run,
    and `wait()`, uses the primary.
    `schedules`: `durable.Schedule`s whose workflows are registered here; every worker of
    the engine runs them (see `schedules()`, `trigger`, `pause_schedule`).
    `threads`: how many plain `def` handlers (and other sync user functions) run at once,
    on a thread pool the engine's workers share; more wait for a thread, within their
    attempt's time limits. `server_settings`: PostgreSQL settings for every session the
    engine and its workers open (`application_name`, `statement_timeout`, ...).
    `limits`: the named `durable.Limit`s that steps use with `step(limit=name)`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        workflows: Iterable[Workflow[Any]] = (),
        schedules: Iterable[Schedule] = (),
        schema: str = "durable",
        pool_size: int = 10,
        lease_seconds: float = 30.0,
        transaction_timeout: float | None = 60.0,
        poll_interval: float = 1.0,
        statement_cache_size: int = 256,
        max_claims: int = 5,
        connect_timeout: float = 10.0,
        threads: int = DEFAULT_THREADS,
        server_settings: Mapping[str, str] | None = None,
        read_dsn: str | None = None,
        limits: Mapping[str, Limit] | None = None,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ConfigurationError("Engine needs exactly one of a DSN or an asyncpg pool")
        if transaction_timeout is not None and transaction_timeout <= 0:
            raise ConfigurationError("transaction_timeout must be > 0 seconds or None")
        if isinstance(max_claims, bool) or not isinstance(max_claims, int) or max_claims < 1:
            raise ConfigurationError(f"max_claims must be an integer >= 1, got {max_claims!r}")
        self.dsn = dsn
        self.read_dsn = read_dsn
        self._read_pool: asyncpg.Pool | None = None
        self.queries = Queries(schema)
        self.schema = schema
        self._limits = check_limits(limits)
        self._versions = {}
        for wf in workflows:
            self.register(wf)
        self._schedules = {}
        for schedule in schedules:
            self._add_schedule(schedule)
        self._pool = pool
        self._owns_pool = pool is None
        self._pool_size = pool_size
        self.poll_interval = poll_interval
        self.transaction_timeout = transaction_timeout
        self.lease_seconds = lease_seconds
        self.statement_cache_size = statement_cache_size
        self.max_claims = max_claims
        self.connect_timeout = connect_timeout
        self._threads = Threads(threads)
        self.server_settings = dict(server_settings or {})
        super().__init__()

    def __repr__(self) -> str:
        where = redact(self.dsn) if self.dsn else "pool"
        if self.read_dsn:
            where += f", read_dsn={redact(self.read_dsn)}"
        return f"Engine({where}, schema={self.schema!r}, workflows={sorted(self._versions)})"

    # -- set-up ----------------------------------------------------------------------------

    def register(self, workflow: Workflow[Any]) -> None:
        """Make `workflow` known to this engine. Several versions of one name may be
        registered, and are served side by side; a (name, version) pair is unique."""
        if not isinstance(workflow, Workflow):
            raise DefinitionError(f"expected a durable.Workflow, got {workflow!r}")
        if not workflow.nodes:
            raise DefinitionError(f"workflow {workflow.name!r} has no nodes")
        versions = self._versions.setdefault(workflow.name, {})
        existing = versions.get(workflow.version)
        if existing is not None and existing is not workflow:
            raise DefinitionError(
                f"workflow {workflow.name!r} version {workflow.version} is already registered"
            )
        for node in workflow.nodes:
            if isinstance(node, Step) and node.limit is not None and node.limit not in self._limits:
                known = ", ".join(repr(n) for n in sorted(self._limits)) or "none"
                raise DefinitionError(
                    f"step {node.name!r} of workflow {workflow.name!r} uses limit "
                    f"{node.limit!r}, which the engine does not declare (limits: {known}); "
                    "pass it in Engine(limits={...})"
                )
        versions[workflow.version] = workflow

    def _add_schedule(self, schedule: Schedule) -> None:
        if not isinstance(schedule, Schedule):
            raise DefinitionError(f"expected a durable.Schedule, got {schedule!r}")
        if schedule.name in self._schedules:
            raise DefinitionError(f"two schedules are named {schedule.name!r}")
        if schedule.workflow not in self._versions:
            known = ", ".join(sorted(self._versions)) or "none"
            raise DefinitionError(
                f"schedule {schedule.name!r} starts workflow {schedule.workflow!r}, which is "
                f"not registered (registered: {known})"
            )
        self._schedules[schedule.name] = schedule

    @property
    def workflows(self) -> Mapping[str, Workflow[Any]]:
        """The registered workflows by name: the highest version of each (what `start`
        and child workflows use unless told otherwise)."""
        return {name: v[max(v)] for name, v in sorted(self._versions.items())}

    @property
    def versions(self) -> Mapping[str, Mapping[int, Workflow[Any]]]:
        """Every registered workflow by name, then version."""
        return {name: dict(sorted(v.items())) for name, v in sorted(self._versions.items())}

    @property
    def limits(self) -> Mapping[str, Limit]:
        """The declared named limits by name."""
        return dict(self._limits)

    @property
    def pool(self) -> asyncpg.Pool:
        """The engine's asyncpg pool (open the engine first)."""
        if self._pool is None:
            raise ConfigurationError("the engine is not open: use 'async with engine:'")
        return self._pool

    @property
    def read_pool(self) -> asyncpg.Pool:
        """The pool for reads that may lag behind the primary: the read replica's with
        `read_dsn`, else `pool` (open the engine first)."""
        return self._read_pool if self._read_pool is not None else self.pool

    @property
    def _listen_dsn(self) -> str | None:
        return self.dsn

    def _acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        return acquire(self.pool, redact(self.dsn) if self.dsn else "the engine's pool")

    def _read_acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        if self._read_pool is None:
            return self._acquire()
        assert self.read_dsn is not None
        return acquire(self._read_pool, redact(self.read_dsn))

    def _open_pool(self, dsn: str) -> Awaitable[asyncpg.Pool]:
        return create_pool(
            dsn,
            min_size=1,
            max_size=self._pool_size,
            server_settings=self.server_settings,
            statement_cache_size=self.statement_cache_size,
            connect_timeout=self.connect_timeout,
        )

    async def open(self, *, migrate: bool = True) -> None:
        """Open the pool (when given a DSN) and the read replica's pool (when given a
        `read_dsn`) and, by default, apply pending migrations."""
        try:
            if self._pool is None:
                assert self.dsn is not None
                self._pool = await self._open_pool(self.dsn)
            if self.read_dsn is not None and self._read_pool is None:
                self._read_pool = await self._open_pool(self.read_dsn)
            if migrate:
                await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the listener and the pools the engine opened."""
        await self._close_listener(owned=self.dsn is not None)
        self._threads.close()
        if self._read_pool is not None:
            await self._read_pool.close()
            self._read_pool = None
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
