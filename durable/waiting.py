"""Waiting for runs to finish (`Engine.wait`): one LISTEN connection per engine, woken by
each watched run's final transaction.

The listener can be lost (a terminated backend, a failover to a standby). Every waiter is
then woken: it listens again and re-reads its run, since a notification sent while nobody
listened is gone. Reads go to the primary, never to a read replica that may lag.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
import asyncpg

from durable.arguments import run_id_arg
from durable.db import Connection, is_connection_error, loads
from durable.errors import DatabaseUnavailable, RunCancelled, RunFailed
from durable.model import Run, RunStatus
from durable.sql import Queries

# How often `wait` re-reads a run in case a notification was missed (e.g. a reconnect).
_WAIT_RECHECK = 5.0


class Waiting:
    """`wait()` and the listener behind it, for the engine's client operations."""

    queries: Queries
    connect_timeout: float

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

    async def _fetch_run(self, run_id: str, *, primary: bool, journal: bool = False) -> Run:
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

    def _on_listener_lost(self, _conn: object) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def _ensure_listener(self) -> None:
        async with self._listener_lock:
            old = self._listener
            if old is not None:
                if _open(old):
                    return
                self._listener = None
                if self._listen_dsn is None:  # give the dead connection's place back
                    with contextlib.suppress(Exception):
                        await self.pool.release(old)  # type: ignore[arg-type]
            conn: Connection
            if self._listen_dsn is not None:
                conn = await asyncpg.connect(self._listen_dsn, timeout=self.connect_timeout)
            else:
                conn = await self.pool.acquire()
            conn.add_termination_listener(self._on_listener_lost)
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
        Reads the primary, never a read replica. A database that cannot be reached at the
        call raises `DatabaseUnavailable` at once; a connection lost once the wait has
        begun (a failover) is retried until `timeout`.
        """
        run_id = run_id_arg(run_id)
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        try:
            with anyio.fail_after(timeout):
                run = await self._watch(run_id, reached=False)
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
                    run = await self._watch(run_id, reached=True)
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[run_id]
                    self._results.pop(run_id, None)

    async def _watch(self, run_id: str, *, reached: bool) -> Run:
        """Listen (again, if the listener was lost), ask for the run's final NOTIFY and read
        the run, all on the primary: in that order, the run cannot finish unseen.

        Once the database has answered this wait (`reached`), a lost connection is retried
        with backoff, the caller's timeout bounding it; before, it raises at once. Asking
        again is a statement that changes nothing once the run is watched, and watches it
        again after a failover to a standby that had not received the first request
        (asynchronous replication).
        """
        delay = 0.1
        while True:
            with contextlib.suppress(Exception):
                await self._ensure_listener()
            try:
                async with self._acquire() as conn:
                    reached = True
                    # Only watched runs NOTIFY when they finish (NOTIFY serialises commits).
                    await conn.execute(self.queries["watch_run"], run_id)
                return await self._fetch_run(run_id, primary=True)
            except Exception as exc:
                lost = isinstance(exc, DatabaseUnavailable) or is_connection_error(exc)
                if not (reached and lost):
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, _WAIT_RECHECK)


def _open(conn: Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # a pooled connection, detached from its pool once it died
        return False
