"""The test harness: an engine and a worker on a test database, with a virtual clock that
fires a week of sleeps, signal timeouts and retry backoffs in milliseconds.

Time is virtual: `await h.clock.advance(3600)` shifts the database clock that every
statement of the engine reads (`now_v1()`: the server's clock plus the `durable.clock_offset`
setting, which the harness sets on each of the engine's sessions), so what falls due in
that hour is due at once, and the same SQL runs as in production. A session reads the
setting it started with, so an advance replaces the engine's sessions: the worker stops
(in-flight work finishes), the pools are reopened, the worker starts again. The setting is
given when a session starts, which any role may do (`ALTER DATABASE ... SET` of a custom
setting needs a superuser).

`durable.testing` is the pytest plugin that gives each test a fresh database, and exports
the harness too.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import anyio

from durable.engine import Engine
from durable.errors import ArgumentError
from durable.worker import Worker
from durable.workflow import Workflow

#: The setting `now_v1()` adds to the database clock, in seconds.
CLOCK_SETTING = "durable.clock_offset"

# Jobs of the engine's queues that are due now, or out on a lease (a transactional=False
# step running): while any is left, the engine has work to do.
_BUSY = """
SELECT count(*) FROM {schema}.jobs
WHERE queue = ANY($1::text[]) AND (run_at <= {schema}.now_v1() OR lease_token IS NOT NULL)
"""


class VirtualClock:
    """The database clock of a `Harness`: real time, plus what `advance` added."""

    def __init__(self, harness: Harness) -> None:
        self._harness = harness
        #: Seconds the engine's clock is ahead of real time.
        self.offset = 0.0

    async def now(self) -> datetime:
        """The virtual time: the database clock as the engine's statements read it."""
        engine = self._harness.engine
        async with engine.pool.acquire() as conn:
            now: datetime = await conn.fetchval(f"SELECT {engine.queries.schema_sql}.now_v1()")
        return now

    async def advance(self, seconds: float | timedelta, *, timeout: float = 10.0) -> None:
        """Move the clock forward: sleeps, signal timeouts, retry backoffs, delayed starts
        and schedules that fall due within `seconds` are due at once (run them with
        `Harness.run_until_idle`).

        What is due now runs first (as `run_until_idle(timeout=timeout)`), so a run just
        started or signalled has stored its wake time before the clock moves: time skips
        only while the engine has nothing to do, as when a week passes in production.
        Then the worker stops, the engine's sessions are replaced by sessions that read
        the new offset, and the worker starts again.
        """
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ArgumentError(f"advance takes seconds >= 0 or a timedelta, got {seconds!r}")
        await self._harness.run_until_idle(timeout=timeout)
        await self._harness._shift(self.offset + float(seconds))


class Harness:
    """An `Engine` and a running worker on a test database, with a virtual clock.

    `async with Harness(dsn, workflows=[wf]) as h:` opens the engine (applying migrations)
    and starts a worker of `concurrency` slots; `h.engine` is the engine, `h.clock` the
    `VirtualClock`. Other keyword arguments go to `Engine` (its `poll_interval` defaults
    to 50 ms here). The clock is shifted for the engine's own sessions only: a
    connection you open yourself reads real time, one from `h.engine.pool` virtual time.
    """

    def __init__(
        self,
        dsn: str,
        *,
        workflows: Iterable[Workflow[Any]] = (),
        concurrency: int = 4,
        grace_period: float = 5.0,
        **engine_options: Any,
    ) -> None:
        engine_options.setdefault("poll_interval", 0.05)
        settings = dict(engine_options.pop("server_settings", None) or {})
        settings[CLOCK_SETTING] = "0"
        self.engine = Engine(dsn, workflows=workflows, server_settings=settings, **engine_options)
        self.clock = VirtualClock(self)
        self.concurrency = concurrency
        self.grace_period = grace_period
        self._task: asyncio.Task[None] | None = None
        self._worker: Worker | None = None

    async def __aenter__(self) -> Harness:
        await self.engine.open()
        try:
            await self._start()
        except BaseException:
            await self.engine.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stop()
        finally:
            await self.engine.close()

    async def run_until_idle(self, *, timeout: float = 10.0) -> None:
        """Wait until no job of the engine's workflows is due or in flight.

        Runs parked for a signal or sleeping past the virtual now are idle. Raises
        `TimeoutError` after `timeout` seconds of real time, and the worker's own error if
        it crashed.
        """
        engine = self.engine
        busy = _BUSY.format(schema=engine.queries.schema_sql)
        queues = sorted(wf.queue for wf in engine.workflows.values())
        try:
            with anyio.fail_after(timeout):
                while True:
                    self._check_worker()
                    async with engine.pool.acquire() as conn:
                        if not await conn.fetchval(busy, queues):
                            return
                    await anyio.sleep(0.005)
        except TimeoutError:
            async with engine.pool.acquire() as conn:
                left = await conn.fetchval(busy, queues)
            raise TimeoutError(
                f"the engine was still busy after {timeout:g} s: {left} job(s) due or in flight"
            ) from None

    # -- the worker ------------------------------------------------------------------------

    async def _start(self) -> None:
        started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(started), name="durable-harness-worker")
        either: set[asyncio.Future[Any]] = {started, self._task}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            self._task.result()  # the worker failed to start: its error
            raise RuntimeError("the harness's worker stopped before it started")
        self._worker = started.result()

    async def _serve(self, started: asyncio.Future[Worker]) -> None:
        run = functools.partial(
            self.engine.run_worker, concurrency=self.concurrency, grace_period=self.grace_period
        )
        async with anyio.create_task_group() as tg:
            worker: Worker = await tg.start(run)
            started.set_result(worker)

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        await task

    def _check_worker(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None:
                self._task.result()
            raise RuntimeError("the harness's worker is not running")

    async def _shift(self, offset: float) -> None:
        # A session reads the setting it started with, so the engine's sessions are all
        # replaced: the worker's (with its pool) and the engine's pool.
        await self._stop()
        self.clock.offset = offset
        self.engine.server_settings[CLOCK_SETTING] = repr(offset)
        await self.engine.close()
        await self.engine.open(migrate=False)
        await self._start()


__all__ = ["CLOCK_SETTING", "Harness", "VirtualClock"]
