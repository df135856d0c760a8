"""Plain `def` user code: the engine's bounded thread pool, and the synchronous `ctx.conn`
bridged to the node's transaction.

Every user function durable calls (a handler, a compensator, a branch, a loop body, a
`select`, `condition`, child `start`, duration or signal-name function) goes through
`invoke`: an `async def` is awaited on the event loop, a plain `def` runs on a thread of
`Threads` with a `SyncContext`. Its `conn` is a `SyncConnection`: each statement is handed
to the event loop (`run_coroutine_threadsafe`) and runs on the node's own connection,
through the same `StepConnection` an async handler gets, so the lazy savepoint, the
rollback of a failed attempt and the detection of a swallowed error are the same. The
thread blocks until its statement is done; the event loop never blocks, so the worker's
other jobs go on meanwhile.

A thread cannot be stopped. When an attempt ends while its thread still runs (the node's
`timeout`, the transaction limit, a worker shutting down), the bridge is closed before the
attempt's writes are rolled back: a statement in flight is cancelled and awaited, and any
later one raises in the thread. The thread itself runs on until the function returns, and
holds its place in the pool until then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import asyncpg

from durable.context import Context, LoopContext, SyncContext, SyncLoopContext
from durable.db import Connection
from durable.errors import ConfigurationError
from durable.nodes import is_async

T = TypeVar("T")

#: Threads of an engine unless `Engine(threads=...)` says otherwise.
DEFAULT_THREADS = 16

_OVER = (
    "ctx.conn is only valid during the attempt it was given to; this attempt is over (it "
    "timed out, the worker stopped, or a handler kept a reference to it)"
)


class Threads:
    """The bounded pool that plain `def` user functions run on (`Engine(threads=...)`),
    started at the first such call and shared by the engine's workers."""

    def __init__(self, size: int = DEFAULT_THREADS) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"threads must be an integer >= 1, got {size!r}")
        self.size = size
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.size, thread_name_prefix="durable-sync"
                )
            return self._executor

    async def run(self, fn: Callable[..., Any], ctx: Context[Any], *args: Any) -> Any:
        """Call `fn(sync_ctx, *args)` on a thread; `sync_ctx` is `ctx` with a bridged
        `conn`. A returned awaitable is awaited on the event loop."""
        loop = asyncio.get_running_loop()
        bridge = None if ctx.conn is None else SyncConnection(ctx.conn, loop)
        call = functools.partial(contextvars.copy_context().run, fn, _sync(ctx, bridge), *args)
        try:
            value = await loop.run_in_executor(self._pool(), call)
        finally:
            if bridge is not None:
                with anyio.CancelScope(shield=True):
                    await bridge.close()
        if inspect.isawaitable(value):
            value = await value
        return value

    def close(self) -> None:
        """Stop the pool: calls not yet started are dropped; running ones finish on their
        own (a thread cannot be stopped). A later call starts a new pool."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


async def invoke(threads: Threads, fn: Callable[..., Any], ctx: Context[Any], *args: Any) -> Any:
    """Call user function `fn` with `ctx` (and `args`): awaited on the event loop if it is
    `async def`, else on a thread of `threads` with a `SyncContext`."""
    if is_async(fn):
        return await fn(ctx, *args)
    return await threads.run(fn, ctx, *args)


def _sync(ctx: Context[Any], conn: SyncConnection | None) -> SyncContext[Any]:
    fields: dict[str, Any] = {
        "input": ctx.input,
        "results": ctx.results,
        "run_id": ctx.run_id,
        "workflow": ctx.workflow,
        "node": ctx.node,
        "attempt": ctx.attempt,
        "conn": conn,
    }
    if isinstance(ctx, LoopContext):
        return SyncLoopContext(**fields, iteration=ctx.iteration)
    return SyncContext(**fields)


class SyncConnection:
    """The `ctx.conn` of a plain `def` handler: the node's transaction, used synchronously.

    Each call hands its statement to the event loop and blocks the calling thread until it
    is done, so writes commit atomically with the node's journal entry, exactly as those
    of an `async def` handler: a handler that raises has them rolled back. It offers
    asyncpg's `execute`, `executemany`, `fetch`, `fetchrow`, `fetchval`,
    `copy_records_to_table` and `transaction()` (a nested savepoint, as a `with` block).
    Valid only during the attempt; a call after it raises `asyncpg.InterfaceError`. Use it
    from the handler's thread (or threads it waits for), never from async code.
    """

    __slots__ = ("_closed", "_conn", "_loop", "_loop_thread", "_tasks")

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "a SyncConnection blocks its thread until the event loop has run the "
                "statement, so it cannot be used on the event loop's own thread: use it from "
                "a plain def handler, and ctx.conn of an async def handler with await"
            )
        if self._closed:
            raise asyncpg.InterfaceError(_OVER)
        future = asyncio.run_coroutine_threadsafe(self._track(make), self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise asyncpg.InterfaceError(_OVER) from None

    async def _track(self, make: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise asyncpg.InterfaceError(_OVER)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await make()
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        """End the bridge (on the event loop): cancel and await a statement in flight, and
        make every later call raise."""
        self._closed = True
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a statement (or several, without arguments); return the status of the last."""
        return self._run(lambda: self._conn.execute(query, *args, timeout=timeout))

    def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        """Run a statement once for each sequence of arguments in `args`."""
        self._run(lambda: self._conn.executemany(command, args, timeout=timeout))

    def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        """Run a query; return every row."""
        return self._run(lambda: self._conn.fetch(query, *args, timeout=timeout))

    def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> asyncpg.Record | None:
        """Run a query; return its first row, or None."""
        return self._run(lambda: self._conn.fetchrow(query, *args, timeout=timeout))

    def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        """Run a query; return one value of its first row (None without rows)."""
        return self._run(lambda: self._conn.fetchval(query, *args, column=column, timeout=timeout))

    def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        """Copy `records=` into a table with COPY, as `Connection.copy_records_to_table`."""
        return self._run(lambda: self._conn.copy_records_to_table(table_name, **kwargs))

    def transaction(self, **kwargs: Any) -> SyncTransaction:
        """A nested transaction (a savepoint) as a `with` block: rolled back if the block
        raises, released if it ends normally."""
        return SyncTransaction(self, kwargs)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<durable.SyncConnection ({state}) of {self._conn!r}>"


class SyncTransaction:
    """A savepoint of a `SyncConnection`, used as `with ctx.conn.transaction(): ...`."""

    def __init__(self, owner: SyncConnection, options: dict[str, Any]) -> None:
        self._owner = owner
        self._options = options
        self._inner: Any = None

    async def _begin(self) -> None:
        self._inner = self._owner._conn.transaction(**self._options)
        await self._inner.__aenter__()

    def __enter__(self) -> SyncTransaction:
        self._owner._run(self._begin)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        inner = self._inner
        self._owner._run(lambda: inner.__aexit__(exc_type, exc, tb))


__all__ = ["DEFAULT_THREADS", "SyncConnection", "SyncTransaction", "Threads", "invoke"]
