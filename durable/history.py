"""Partitioned history: the month partitions of runs and their journal, attempts and
mailbox, and retention by dropping a whole month at once (`Engine.drop_history`).

Runs are partitioned by their id, a ULID, whose first 10 characters are its creation time:
a month's runs are a range of ids (sql/schema.sql, docs/guides/scaling.md). Dropping a
month detaches its partitions, which locks the tables for milliseconds however many rows
it holds, then drops them, which locks nothing else, where `purge` deletes row by row; it
drops nothing that `purge` with the same `older_than` would keep, and keeps a partition
whole while any run in it has not finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from ulid import ULID

from durable.arguments import age_arg, count_arg
from durable.client import Client
from durable.db import Connection
from durable.errors import ArgumentError, ArgumentTypeError
from durable.migrate import PARTITIONS_AHEAD

log = logging.getLogger("durable.engine")

#: Why a partition is kept, as `HistoryDrop.kept` says it.
KEPT_BECAUSE = {
    "current": "its month is not over",
    "unfinished": "a run in it has not finished",
    "recent": "a run in it finished more recently than older_than",
    "awaited": "a run in it is the child of an unfinished run",
    "busy": "its tables stayed locked by other transactions (try again later)",
}

_KEYS_BATCH = 10_000
_NO_SUCH_PARTITION = "DU080"  # history_blocker_v1: the partition is not there (any more)


@dataclass(frozen=True)
class HistoryPartition:
    """One partition of the history tables: the runs created in one month (UTC), with their
    journal, failed attempts and signals. `name` is `yYYYYmMM`, or `legacy` for the rows
    of a database partitioned by migration 0009 (`start` None: from its first run).
    `first_id` and `end_id` bound its run ids (`end_id` excluded); `runs` is PostgreSQL's
    estimate (as of autovacuum's last analyze of it)."""

    name: str
    start: datetime | None
    end: datetime
    runs: int
    first_id: str | None
    end_id: str


@dataclass
class HistoryDrop:
    """What `Engine.drop_history` did, or with `dry_run` would do: the partitions dropped
    (by name, oldest first); those kept, with the reason: 'current' (its month is not
    over), 'unfinished', 'recent' (a run finished within `older_than`), 'awaited' (a run
    is the child of an unfinished run) or 'busy' (its tables stayed locked); for each
    drop, the seconds its transaction took, locks waited for included (the history tables
    are locked for that long), and the seconds deleting its files took afterwards (which
    locks nothing they use); and how many idempotency keys of dropped runs were deleted."""

    dropped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files_seconds: dict[str, float] = field(default_factory=dict)
    keys_deleted: int = 0


def _time_of(prefix: str) -> datetime:
    """The time a ULID prefix (10 characters) stands for."""
    return ULID.from_str(prefix.ljust(26, "0")).datetime.astimezone(UTC)


def _partition(row: asyncpg.Record) -> HistoryPartition:
    name, lo, hi = row["name"], row["lo"], row["hi"]
    start = _time_of(lo) if lo is not None else None
    return HistoryPartition(name, start, _time_of(hi), int(row["runs"]), lo, hi)


class History(Client):
    """The history partitions of an `Engine`."""

    async def history_partitions(self) -> list[HistoryPartition]:
        """The partitions of the history tables, oldest first (the DEFAULT partition,
        which holds any run id no month covers, aside)."""
        async with self._acquire() as conn:
            rows = await conn.fetch(self.queries["history_partitions"])
        return [_partition(r) for r in rows]

    async def drop_history(
        self,
        *,
        older_than: timedelta,
        dry_run: bool = False,
        lock_timeout: float = 0.5,
        attempts: int = 3,
    ) -> HistoryDrop:
        """Drop every month of history whose runs all finished more than `older_than` ago,
        whole: its partition of runs, journal, attempts and signals. A month is kept while
        it is not over, while any run in it has not finished (it is dropped once they all
        have: runs are never moved out), while one finished within `older_than`, or while
        one is the child of an unfinished run. Make the partitions of this month and the
        next as well, if missing (as `migrate` does).

        Each drop is a transaction of its own that locks the four tables for a few
        milliseconds; it waits at most `lock_timeout` seconds for its locks (statements on
        those tables wait behind it meanwhile), up to `attempts` times, and then leaves the
        month as 'busy'. Then the month's tables, out of the history tables, are dropped
        side by side on connections of the pool, which locks nothing else; their files are
        gone when this returns. When dropping one fails (a view of it, say), the others are
        dropped still, the month's keys deleted, and then that error is raised; the next
        call drops the tables left. `purge` deletes finished runs row by row instead, and
        also works on the months kept here. With `dry_run`, nothing is dropped and the
        report says what would be.
        """
        seconds = age_arg(older_than, "older_than")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
            raise ArgumentTypeError("lock_timeout must be a number of seconds")
        if lock_timeout <= 0:
            raise ArgumentError("lock_timeout must be positive")
        count_arg(attempts, "attempts")
        report = HistoryDrop()
        async with self._acquire() as conn:
            if not dry_run:
                await self._drop_detached(conn)  # left by a drop that did not finish
            await conn.fetchval(self.queries["ensure_partitions"], PARTITIONS_AHEAD)
            parts = [_partition(r) for r in await conn.fetch(self.queries["history_partitions"])]
            for part in parts:
                try:
                    if dry_run:
                        blocker = await conn.fetchval(
                            self.queries["history_blocker"], part.name, seconds
                        )
                    else:
                        blocker = await self._drop(
                            conn, part, seconds, lock_timeout, attempts, report
                        )
                except asyncpg.PostgresError as exc:
                    if exc.sqlstate == _NO_SUCH_PARTITION:
                        continue  # another drop_history took it meanwhile
                    raise
                if blocker is None:
                    report.dropped.append(part.name)
                else:
                    report.kept[part.name] = blocker
        return report

    async def _drop(
        self,
        conn: Connection,
        part: HistoryPartition,
        seconds: float,
        lock_timeout: float,
        attempts: int,
        report: HistoryDrop,
    ) -> str | None:
        """Drop one partition (retrying a lock timeout), then delete its keys in batches;
        its blocker, or None when it went."""
        for attempt in range(attempts):
            t0 = time.perf_counter()
            try:
                async with conn.transaction():
                    await conn.execute(
                        self.queries["history_lock_timeout"], f"{int(lock_timeout * 1000)}ms"
                    )
                    blocker: str | None = await conn.fetchval(
                        self.queries["drop_history_partition"], part.name, seconds
                    )
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
                if attempt + 1 < attempts:
                    await asyncio.sleep(lock_timeout * (attempt + 1))
                continue
            if blocker is not None:
                return blocker
            elapsed = time.perf_counter() - t0
            report.seconds[part.name] = elapsed
            t0 = time.perf_counter()
            try:
                await self._drop_detached(conn)
            except Exception:
                # The month is out of the history tables all the same (the next call drops
                # the tables left): its keys must not stay behind for good.
                await self._forget_keys(conn, part, report)
                raise
            report.files_seconds[part.name] = time.perf_counter() - t0
            log.info(
                "dropped history partition %s (about %d runs) in %.3f s, its files in %.3f s",
                part.name,
                part.runs,
                elapsed,
                report.files_seconds[part.name],
                extra={"partition": part.name, "runs": part.runs, "seconds": elapsed},
            )
            await self._forget_keys(conn, part, report)
            return None
        return "busy"

    async def _forget_keys(
        self, conn: Connection, part: HistoryPartition, report: HistoryDrop
    ) -> None:
        """Delete the keys of the runs of dropped partition `part`."""
        # Left behind by the drop, free for a start to take over until deleted here, in
        # transactions of their own that lock no table.
        while True:
            n: int = await conn.fetchval(
                self.queries["forget_keys"], part.first_id or "", part.end_id, _KEYS_BATCH
            )
            report.keys_deleted += n
            if n < _KEYS_BATCH:
                break

    async def _drop_detached(self, conn: Connection) -> None:
        """Drop the tables of detached history partitions, each in a transaction of its
        own that locks only that table (the month is out of the history tables already),
        side by side on connections of the pool besides `conn`. Deleting a table's files
        takes time in proportion to its size: the kernel frees its cached pages, which
        connections on several cores do at once (a month of 2.8 GB on tmpfs: 0.30 s one
        table after the other, 0.17 to 0.25 s side by side), and on a disk that discards
        freed blocks as they are freed, like this machine's, waits for the discards, which
        such a disk may take one at a time (no faster side by side there). Side by side,
        a table whose lock is held (someone reading it) holds none of the others back.
        Every table is tried even when the drop of one fails; the first failure is raised
        then, and the next call drops what is left."""
        names = [r[0] for r in await conn.fetch(self.queries["detached_history"])]
        tables = iter(names)
        failed: list[BaseException] = []

        async def drop_on(c: Connection) -> None:
            for table in tables:  # shared: each table is taken by one connection
                try:
                    await c.fetchval(self.queries["drop_detached_history"], table)
                except asyncpg.PostgresError as exc:
                    failed.append(exc)

        async def drop_pooled() -> None:
            async with self._acquire() as c:
                await drop_on(c)

        # Only connections the pool has free or can open: a busy pool is not waited for,
        # as `conn` drops whatever the others do not.
        pool = self.pool
        free = pool.get_max_size() - pool.get_size() + pool.get_idle_size()
        extra = min(len(names) - 1, free)
        # return_exceptions: every drop ends before this returns, a lost connection too.
        ended = await asyncio.gather(
            drop_on(conn), *(drop_pooled() for _ in range(extra)), return_exceptions=True
        )
        failed += [e for e in ended if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
