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

from durable.arguments import count_arg
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
        month as 'busy'. `purge` deletes finished runs row by row instead, and also works
        on the months kept here. With `dry_run`, nothing is dropped and the report says
        what would be.
        """
        if not isinstance(older_than, timedelta):
            raise ArgumentTypeError(
                f"older_than must be a datetime.timedelta, got {type(older_than).__name__}"
            )
        seconds = older_than.total_seconds()
        if seconds < 0:
            raise ArgumentError("older_than must not be negative")
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
            await self._drop_detached(conn)
            report.files_seconds[part.name] = time.perf_counter() - t0
            log.info(
                "dropped history partition %s (about %d runs) in %.3f s, its files in %.3f s",
                part.name,
                part.runs,
                elapsed,
                report.files_seconds[part.name],
                extra={"partition": part.name, "runs": part.runs, "seconds": elapsed},
            )
            # Left behind by the drop, free for a start to take over until deleted here, in
            # transactions of their own that lock no table.
            while True:
                n: int = await conn.fetchval(
                    self.queries["forget_keys"], part.first_id or "", part.end_id, _KEYS_BATCH
                )
                report.keys_deleted += n
                if n < _KEYS_BATCH:
                    break
            return None
        return "busy"

    async def _drop_detached(self, conn: Connection) -> None:
        """Drop the tables of detached history partitions, each in a transaction of its
        own that locks only that table (the month is already out of the history tables)."""
        for table in await conn.fetch(self.queries["detached_history"]):
            await conn.fetchval(self.queries["drop_detached_history"], table[0])
