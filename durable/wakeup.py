"""How idle worker slots are woken: the NOTIFY listener, the due-time poller, the idle queue.

A slot whose claim finds nothing goes idle. Idle slots are woken one at a time: by a
`NOTIFY` (sent, once per enqueuing transaction, only while some worker has an idle slot and
has said so in the `listeners` table), by the poller when the next delayed job falls due on
the database clock or the polling interval passes, and by a slot that just claimed a job
(there may be more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import anyio
import asyncpg

from durable.db import is_connection_error
from durable.queue import JobQueue
from durable.sql import Queries

log = logging.getLogger("durable.worker")

# How soon an idle worker looks again while due jobs are held elsewhere (their worker may
# die, which frees them silently).
_HELD_RECHECK = 0.5


class Health:
    """Logs a database outage once when it starts and once when it ends."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Count a failure (logging the outage if it starts); return the seconds to back off."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = asyncio.get_running_loop().time()
            log.warning(
                "database unavailable, retrying with backoff: %s", exc, extra={"error": repr(exc)}
            )
        return float(min(0.05 * 2 ** min(self.failures, 7), 5.0))

    def ok(self) -> None:
        """Note that the database answered (logging the end of an outage, if any)."""
        if self.down_since is not None:
            seconds = asyncio.get_running_loop().time() - self.down_since
            log.warning(
                "database reachable again after %.1f s",
                seconds,
                extra={"outage_seconds": round(seconds, 3)},
            )
        self.down_since = None
        self.failures = 0


class Wakeups:
    """The idle slots of one worker, and the listener and poller that wake them."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Queries,
        jobs: JobQueue,
        *,
        queues: Sequence[str],
        poll_interval: float,
        name: str,
        stopping: asyncio.Event,
        health: Health,
    ) -> None:
        self.pool = pool
        self.queries = queries
        self.jobs = jobs
        self.channel = queries.notify_channel
        self.queues = queues
        self.poll_interval = poll_interval
        self.name = name
        self._stopping = stopping
        # One outage, one log line: shared with the worker's slots.
        self._health = health
        self._idle: list[asyncio.Event] = []  # events of idle slots, oldest first
        self._missed_wakeup = False
        self._poke = asyncio.Event()
        # Set by the listener on every (re)connect: the poller registers again, since the
        # server it reached may not have our row in the unlogged `listeners` table (a
        # standby promoted after a failover starts with it empty).
        self._relistened = False

    def wake_one(self) -> None:
        """Wake the longest-idle slot; remember the wake-up if no slot is idle."""
        if self._idle:
            self._idle.pop(0).set()
        else:
            self._missed_wakeup = True

    def poke(self) -> None:
        """Make the poller look at the next due time again now."""
        self._poke.set()

    def wake_all(self) -> None:
        """Wake every idle slot and the poller (the worker is stopping)."""
        for event in self._idle:
            event.set()
        self._poke.set()

    async def wait_idle(self) -> None:
        """Park the calling slot until woken (or until the worker stops)."""
        if self._missed_wakeup:
            self._missed_wakeup = False
            return
        event = asyncio.Event()
        self._idle.append(event)
        self._poke.set()  # the poller registers us as a listener and computes the next due
        try:
            await event.wait()
        finally:
            if event in self._idle:
                self._idle.remove(event)

    def _on_notify(self, *_: object) -> None:
        self.wake_one()
        self._poke.set()

    async def listen(self) -> None:
        """Hold a LISTEN connection; reconnect when it drops (polling covers the gap).

        After every connect the worker registers as a listener again and a slot looks for
        due jobs: a notification sent while we were not listening is lost, and after a
        failover the server is another one.
        """
        health = self._health
        check_every = self.poll_interval * 5
        while True:
            lost = asyncio.Event()
            try:
                async with self.pool.acquire() as conn:
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    await conn.add_listener(self.channel, self._on_notify)
                    health.ok()
                    self._relistened = True
                    self._on_notify()
                    try:
                        while not lost.is_set():
                            with anyio.move_on_after(check_every):
                                await lost.wait()
                            if lost.is_set():
                                break
                            # Detect a silently dead link (a host gone without closing its
                            # connections): no answer within the period counts as lost.
                            with anyio.move_on_after(max(check_every, 5.0)) as check:
                                await conn.execute("SELECT 1")
                            if check.cancelled_caught:
                                conn.terminate()
                                lost.set()
                    finally:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            if not conn.is_closed():
                                await conn.remove_listener(self.channel, self._on_notify)
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("listener failed", extra={"worker": self.name})
                await anyio.sleep(health.failed(exc))

    async def poll(self) -> None:
        """Wake a slot when the next delayed job falls due, or every `poll_interval`.

        While some slot is idle, the worker is registered in `listeners` so that enqueuing
        transactions NOTIFY it; once registered, one idle slot claims again, which closes the
        gap between its empty claim and the registration.
        """
        registered = False
        busy_ticks = 0
        while not self._stopping.is_set():
            due: float | None = None
            if self._relistened:
                self._relistened = False
                registered = False
            try:
                async with self.pool.acquire() as conn:
                    if self._idle and not registered:
                        await conn.execute(self.queries["register_listener"], self.name)
                        registered = True
                        self.wake_one()
                    elif registered and not self._idle:
                        busy_ticks += 1
                        if busy_ticks > 1:  # busy for a whole tick: stop asking for NOTIFYs
                            await conn.execute(self.queries["unregister_listener"], self.name)
                            registered = False
                    if self._idle:
                        busy_ticks = 0
                        due, held = await self.jobs.due_state(conn, self.queues)
                        if held:
                            # Due jobs are held by other transactions. If their worker dies
                            # the jobs come free with no NOTIFY: look again soon.
                            due = min(due, _HELD_RECHECK) if due is not None else _HELD_RECHECK
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("poller failed", extra={"worker": self.name})
                registered = False
                await self._sleep_or_poke(self._health.failed(exc))
                continue
            if due is not None and due <= 0:
                self.wake_one()
                due = None
            timeout = self.poll_interval if due is None else min(due, self.poll_interval)
            if not await self._sleep_or_poke(timeout):
                # A tick: refresh the registration and let a slot look, in case a NOTIFY was
                # lost (a reconnect) or a job became due on another worker's schedule.
                if registered:
                    with contextlib.suppress(Exception):
                        async with self.pool.acquire() as conn:
                            await conn.execute(self.queries["register_listener"], self.name)
                self.wake_one()

    async def _sleep_or_poke(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if poked (something changed), False on timeout."""
        with anyio.move_on_after(seconds):
            await self._poke.wait()
            self._poke.clear()
            return True
        return False
