"""Where schedules fire: the scheduler loop each worker runs, and the schedule operations
of the engine (`schedules`, `trigger`, `pause_schedule`, `resume_schedule`).

Theory of operation. Every worker of an engine that declares schedules runs one
`Scheduler` beside its slots; there is no leader to elect or lose. A pass locks, one at a
time, the due rows of the schedules the engine declares with `FOR UPDATE SKIP LOCKED`: a
row another scheduler holds is skipped, and once that one commits, the row's `next_at` is
past now and the row is no longer due. Inside the row's transaction the scheduler asks
`durable.schedule.plan` which ticks get a run, starts each through `Engine.start(conn=...)`
with the tick as its idempotency key, and moves `next_at` on: the runs and the row commit
together or not at all, so each tick starts exactly one run whatever the number of
workers, and a worker killed mid-pass leaves the tick to the next scheduler. Between
passes it sleeps until the next tick is due on the database clock, never longer than the
poll interval, so a clock moved forward (a test harness) is seen within one interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from durable.client import Client
from durable.db import Connection, dumps, is_connection_error, loads
from durable.errors import IdempotencyConflict, ScheduleNotFound
from durable.model import RunStatus
from durable.schedule import Cron, Schedule, ScheduleInfo, plan
from durable.wakeup import Health

log = logging.getLogger("durable.scheduler")


def tick_key(name: str, tick: datetime) -> str:
    """The idempotency key of the run of schedule `name` for `tick`."""
    return f"schedule:{name}:{tick.isoformat()}"


class ScheduleClient(Client):
    """The schedule operations of an `Engine` (see there for how to build one)."""

    _schedules: dict[str, Schedule]

    def __init__(self) -> None:
        super().__init__()
        self._declared = False

    async def _declare_schedules(self, conn: Connection) -> None:
        """Write this engine's schedules to the database (once per engine)."""
        if self._declared or not self._schedules:
            return
        now: datetime = await conn.fetchval(self.queries["db_now"])
        for s in self._schedules.values():
            await conn.execute(
                self.queries["declare_schedule"],
                s.name,
                s.workflow,
                s.cron,
                s.timezone,
                dumps(s.input, f"input of schedule {s.name!r}"),
                s.overlap,
                s.catch_up,
                s.max_catch_up,
                s.next_tick(now),
            )
        self._declared = True

    def _declared_schedule(self, name: str) -> Schedule:
        found = self._schedules.get(name)
        if found is None:
            known = ", ".join(sorted(self._schedules)) or "none"
            raise ScheduleNotFound(
                f"schedule {name!r} is not declared by this engine (declared: {known})"
            )
        return found

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule in the database, by name: this engine's and any other's."""
        async with self._acquire() as conn:
            await self._declare_schedules(conn)
            rows = await conn.fetch(self.queries["list_schedules"])
        return [
            ScheduleInfo(
                name=r["name"],
                workflow=r["workflow"],
                cron=r["cron"],
                timezone=r["timezone"],
                input=loads(r["input"]),
                overlap=r["overlap"],
                catch_up=r["catch_up"],
                max_catch_up=r["max_catch_up"],
                paused=r["paused"],
                next_at=None if r["paused"] else r["next_at"],
                last_tick=r["last_tick"],
                last_run_id=r["last_run_id"],
                last_run_status=RunStatus(r["last_run_status"]) if r["last_run_status"] else None,
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    async def trigger(self, name: str) -> str | None:
        """Start a run of schedule `name` now, as a tick falling now would (paused or not):
        its input's `scheduled_at` is the database time, and the schedule's `overlap`
        applies. Returns the run id, or None when `overlap="skip"` skipped it because the
        schedule's previous run is still active. Raises `ScheduleNotFound` unless this
        engine declares the schedule (the run needs its workflow and input)."""
        schedule = self._declared_schedule(name)
        async with self._acquire() as conn:
            await self._declare_schedules(conn)
            async with conn.transaction():
                row = await conn.fetchrow(self.queries["lock_schedule"], name)
                if row is None:  # deleted since it was declared
                    raise ScheduleNotFound(f"schedule {name!r} is not in the database")
                return await self._fire(
                    conn, schedule, row["overlap"], row["last_run_id"], row["now"], None
                )

    async def pause_schedule(self, name: str) -> bool:
        """Stop the ticks of schedule `name` until `resume_schedule` (runs it started go on;
        ticks that pass while paused start nothing, even once resumed). Returns False if it
        was already paused; raises `ScheduleNotFound`."""
        async with self._acquire() as conn:
            await self._declare_schedules(conn)
            async with conn.transaction():
                row = await conn.fetchrow(self.queries["lock_schedule"], name)
                if row is None:
                    raise ScheduleNotFound(f"no schedule named {name!r}")
                paused = await conn.fetchval(self.queries["pause_schedule"], name) is not None
        if paused:
            log.info("schedule %s paused", name, extra={"schedule": name})
        return paused

    async def resume_schedule(self, name: str) -> bool:
        """Let a paused schedule tick again, from its first tick after now. Returns False if
        it was not paused; raises `ScheduleNotFound`."""
        async with self._acquire() as conn:
            await self._declare_schedules(conn)
            async with conn.transaction():
                row = await conn.fetchrow(self.queries["lock_schedule"], name)
                if row is None:
                    raise ScheduleNotFound(f"no schedule named {name!r}")
                if not row["paused"]:
                    return False
                next_at = Cron(row["cron"], row["timezone"]).next_after(row["now"])
                await conn.execute(self.queries["resume_schedule"], name, next_at)
        log.info(
            "schedule %s resumed, next tick %s",
            name,
            next_at.isoformat(),
            extra={"schedule": name},
        )
        return True

    async def _fire(
        self,
        conn: Connection,
        schedule: Schedule,
        overlap: str,
        previous: str | None,
        tick: datetime,
        key: str | None,
    ) -> str | None:
        """Start the run of one tick in the transaction that holds the schedule's row,
        after applying `overlap` to its `previous` run; None when none was started."""
        name = schedule.name
        at = schedule._cron.local(tick).isoformat()
        fields: dict[str, Any] = {"schedule": name, "tick": at}
        if (
            previous is not None
            and overlap != "allow"
            and await conn.fetchval(self.queries["run_active"], previous)
        ):
            if overlap == "skip":
                log.info(
                    "schedule %s: tick %s skipped, its previous run %s is still active",
                    name,
                    at,
                    previous,
                    extra={**fields, "run_id": previous},
                )
                return None
            await conn.fetchval(
                self.queries["cancel"], previous, f"schedule {name!r}: replaced by tick {at}"
            )
            log.info(
                "schedule %s: previous run %s cancelled for tick %s",
                name,
                previous,
                at,
                extra={**fields, "run_id": previous},
            )
        try:
            # A savepoint, so that a refused start leaves the row's transaction usable.
            async with conn.transaction():
                run_id = await self.start(
                    schedule.workflow, schedule.run_input(tick), idempotency_key=key, conn=conn
                )
        except IdempotencyConflict:
            # The tick already has a run, started with the input of another release.
            log.warning(
                "schedule %s: tick %s already has a run (started with another input)",
                name,
                at,
                extra=fields,
            )
            return None
        await conn.execute(self.queries["schedule_started"], name, tick, run_id)
        log.info(
            "schedule %s: tick %s started run %s",
            name,
            at,
            run_id,
            extra={**fields, "run_id": run_id, "workflow": schedule.workflow},
        )
        return run_id


class Scheduler:
    """One worker's scheduler loop: fires the due ticks of `engine`'s schedules."""

    def __init__(
        self,
        engine: ScheduleClient,
        pool: asyncpg.Pool,
        *,
        poll_interval: float,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.poll_interval = poll_interval
        self.stopping = stopping
        self.names = sorted(engine._schedules)
        self._health = Health()
        self._crons: dict[tuple[str, str], Cron] = {
            (s.cron, s.timezone): s._cron for s in engine._schedules.values()
        }

    async def run(self) -> None:
        """Fire due ticks until cancelled or until the worker stops."""
        while not self.stopping():
            try:
                delay = await self.run_once()
                self._health.ok()
            except Exception as exc:
                if is_connection_error(exc):
                    delay = max(self._health.failed(exc), self.poll_interval)
                else:  # never the worker's end: the next pass tries again
                    log.exception("scheduler pass failed", extra={"error": repr(exc)})
                    delay = self.poll_interval
            await anyio.sleep(delay)

    async def run_once(self) -> float:
        """One pass: fire what is due now; return the seconds until the next pass."""
        query = self.engine.queries["schedule_seconds_to_next"]
        async with self.pool.acquire() as conn:
            seconds: float | None = await conn.fetchval(query, self.names)
            if seconds is not None and seconds <= 0:
                await self._fire_due(conn)
                seconds = await conn.fetchval(query, self.names)
                if seconds is not None and seconds <= 0:
                    # Still due: another scheduler holds it, or firing it failed here.
                    seconds = self.poll_interval
        if seconds is None:
            return self.poll_interval
        return min(seconds, self.poll_interval)

    async def _fire_due(self, conn: Connection) -> None:
        """Fire every due schedule no other scheduler holds, each in its own transaction."""
        pending = list(self.names)
        while pending and not self.stopping():
            name: str | None = None
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(self.engine.queries["due_schedule"], pending)
                    if row is None:
                        return
                    name = row["name"]
                    pending.remove(name)
                    await self._handle(conn, row)
            except Exception as exc:
                if name is None or is_connection_error(exc):
                    raise
                # Bounded: this schedule waits for the next pass, the others go on.
                log.exception("schedule %s: firing failed", name, extra={"schedule": name})

    async def _handle(self, conn: Connection, row: asyncpg.Record) -> None:
        name: str = row["name"]
        schedule = self.engine._schedules[name]
        # The row's timing: a process that declared another cron since is in effect.
        cron = self._crons.get((row["cron"], row["timezone"]))
        if cron is None:
            cron = self._crons[(row["cron"], row["timezone"])] = Cron(row["cron"], row["timezone"])
        decision = plan(
            cron,
            next_at=row["next_at"],
            now=row["now"],
            catch_up=row["catch_up"],
            max_catch_up=row["max_catch_up"],
        )
        previous: str | None = row["last_run_id"]
        for tick in decision.fire:
            run_id = await self.engine._fire(
                conn, schedule, row["overlap"], previous, tick, tick_key(name, tick)
            )
            previous = run_id or previous
        if decision.dropped or decision.more:
            log.info(
                "schedule %s: %s%d missed tick(s) since %s not run (catch_up=%r)",
                name,
                "more than " if decision.more else "",
                decision.dropped,
                cron.local(row["next_at"]).isoformat(),
                row["catch_up"],
                extra={"schedule": name, "dropped": decision.dropped},
            )
        await conn.execute(self.engine.queries["schedule_advance"], name, decision.next_at)
