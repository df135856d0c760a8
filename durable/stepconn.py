"""The `ctx.conn` a handler gets: the node's connection, with a savepoint set lazily.

A failing handler's writes must roll back while the attempt is still recorded in the same
transaction, so its statements run under a savepoint. Most steps never touch `ctx.conn`; for
them a savepoint would be a wasted round trip on every step. `StepConnection` therefore
issues `SAVEPOINT` just before the handler's first statement, and `undo()` rolls back to it
only if it was set. Every method call that returns an awaitable goes through that check,
as do `transaction()` and `cursor()`, the two methods that run statements later.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Generator
from typing import Any

import asyncpg

from durable.db import Connection


class StepConnection:
    """Proxy of the node's connection that sets a savepoint before its first statement."""

    __slots__ = ("_conn", "_expired", "_savepoint", "failed")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._expired = False
        self._savepoint: asyncpg.transaction.Transaction | None = None
        #: A statement error the handler may have swallowed: it leaves the transaction
        #: aborted, so the attempt cannot commit even if the handler returns normally.
        self.failed: asyncpg.PostgresError | None = None

    async def _ensure_savepoint(self) -> None:
        if self._savepoint is None:
            savepoint = self._conn.transaction()
            await savepoint.start()
            self._savepoint = savepoint

    async def undo(self) -> None:
        """Roll back everything the handler did through this connection (if anything)."""
        if self._savepoint is not None:
            savepoint, self._savepoint = self._savepoint, None
            await savepoint.rollback()

    def expire(self) -> None:
        """The attempt is over: any later use of this connection raises."""
        self._expired = True

    def _check(self) -> None:
        if self._expired:
            raise asyncpg.InterfaceError(
                "ctx.conn is only valid during the attempt it was given to; this attempt is "
                "over (a handler kept a reference to it)"
            )

    def __getattr__(self, name: str) -> Any:
        self._check()
        attr = getattr(self._conn, name)
        if not callable(attr):
            return attr

        # Pool connection proxies expose coroutine methods as plain functions returning
        # coroutines, so look at what a call returns, not at the method: an awaitable has
        # not run yet and gets the savepoint in front of it.
        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if inspect.isawaitable(result):
                return self._after_savepoint(result)
            return result

        return guarded

    async def _after_savepoint(self, awaitable: Awaitable[Any]) -> Any:
        try:
            await self._ensure_savepoint()
        except BaseException:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise
        try:
            return await awaitable
        except asyncpg.PostgresError as exc:
            self.failed = exc
            raise

    def transaction(self, **kwargs: Any) -> _LazyTransaction:
        """A nested transaction (savepoint) of the handler's own, as `Connection.transaction`."""
        self._check()
        return _LazyTransaction(self, self._conn.transaction(**kwargs))

    def cursor(self, *args: Any, **kwargs: Any) -> _LazyCursor:
        """A server-side cursor, as `Connection.cursor`."""
        self._check()
        return _LazyCursor(self, self._conn.cursor(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<durable.StepConnection of {self._conn!r}>"


class _LazyTransaction:
    def __init__(self, owner: StepConnection, inner: asyncpg.transaction.Transaction) -> None:
        self._owner = owner
        self._inner = inner
        self._failed_before: asyncpg.PostgresError | None = None

    async def start(self) -> None:
        await self._owner._ensure_savepoint()
        self._failed_before = self._owner.failed
        await self._inner.start()

    async def commit(self) -> None:
        await self._inner.commit()

    async def rollback(self) -> None:
        await self._inner.rollback()
        # Errors inside a rolled-back block no longer abort the transaction.
        self._owner.failed = self._failed_before

    async def __aenter__(self) -> _LazyTransaction:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)
        if exc_type is not None:
            self._owner.failed = self._failed_before


class _LazyCursor:
    def __init__(self, owner: StepConnection, factory: Any) -> None:
        self._owner = owner
        self._factory = factory

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        await self._owner._ensure_savepoint()
        async for record in self._factory:
            yield record

    def __await__(self) -> Generator[Any, None, Any]:
        return self._open().__await__()

    async def _open(self) -> Any:
        await self._owner._ensure_savepoint()
        return await self._factory


def swallowed_error(conn: object) -> asyncpg.PostgresError | None:
    """The statement error a handler caught but left its transaction aborted by, if any."""
    return conn.failed if isinstance(conn, StepConnection) else None


async def undo(conn: object) -> None:
    """Roll back a handler's writes if `conn` is a `StepConnection` that set a savepoint."""
    if isinstance(conn, StepConnection):
        await conn.undo()


__all__ = ["StepConnection", "swallowed_error", "undo"]
