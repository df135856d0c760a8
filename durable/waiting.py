"""Waiting for runs to finish (`Engine.wait`): one LISTEN connection per engine, woken by
each watched run's final transaction."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
import asyncpg

from durable.arguments import run_id_arg
from durable.db import Connection, loads
from durable.errors import RunCancelled, RunFailed
from durable.model import Run, RunStatus
from durable.sql import Queries

# How often `wait` re-reads a run in case a notification was missed (e.g. a reconnect).
_WAIT_RECHECK = 5.0


class Waiting:
    """`wait()` and the listener behind it, for the engine's client operations."""

    queries: Queries

    def __init__(self) -> None:
        self._runs_channel = f"{self.queries.schema}_runs"
        self._listener: Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._results: dict[str, str] = {}  # results that came with a run's final NOTIFY

    def _acquire(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        raise NotImplementedError

    @property
    def _listen_dsn(self) -> str | None:
        raise NotImplementedError

    @property
    def pool(self) -> asyncpg.Pool:
        raise NotImplementedError

    async def get_run(self, run_id: str, *, journal: bool = False) -> Run:
        raise NotImplementedError

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
            if self._listen_dsn is not None:
                conn = await asyncpg.connect(self._listen_dsn)
            else:
                conn = await self.pool.acquire()
            await conn.add_listener(self._runs_channel, self._on_finished)
            self._listener = conn

    async def _close_listener(self, *, owned: bool) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                if owned:
                    await self._listener.close()
                else:
                    await self._listener.remove_listener(self._runs_channel, self._on_finished)
                    await self.pool.release(self._listener)  # type: ignore[arg-type]
            self._listener = None

    async def wait(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait until the run finishes; return its result, in its JSON form (typed results
        are the dicts they are stored as, not model instances).

        Raises `RunFailed` or `RunCancelled` (carrying the final `Run`), `RunNotFound`, or
        `TimeoutError` after `timeout` seconds. Woken by the run's own final transaction.
        """
        run_id = run_id_arg(run_id)
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
