"""The workers registry: each running worker keeps a row of `workers` fresh (a heartbeat
every few seconds: its host, pid, workflows, concurrency, jobs in flight) and deletes it
when it stops. A row whose heartbeat is older than three intervals is a worker that died
without saying so (`durable doctor` reports it; the dashboard's workers page shows it)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence

import anyio
import asyncpg

from durable.db import is_connection_error
from durable.sql import Queries
from durable.worker import Worker

log = logging.getLogger("durable.worker")

#: Seconds between two heartbeats of a worker.
HEARTBEAT_SECONDS = 5.0


async def heartbeat(
    pool: asyncpg.Pool,
    queries: Queries,
    worker: Worker,
    workflows: Sequence[str],
    *,
    interval: float = HEARTBEAT_SECONDS,
) -> None:
    """Keep `worker`'s row fresh until it stops (or this task is cancelled), then delete it.

    A heartbeat that fails (the database is away) is skipped: the worker's own outage
    handling reports it; the next beat writes the row again.
    """
    fields = (worker.name, socket.gethostname(), os.getpid(), sorted(workflows))
    try:
        while not worker.stopping:
            try:
                async with pool.acquire() as conn:
                    await conn.execute(
                        queries["worker_beat"],
                        *fields,
                        worker.concurrency,
                        worker.in_flight,
                        worker.processed,
                        interval,
                    )
            except Exception as exc:
                if not is_connection_error(exc):
                    log.exception("worker heartbeat failed", extra={"worker": worker.name})
            with anyio.move_on_after(interval):
                await worker.wait_stopping()
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            async with pool.acquire() as conn:
                await conn.execute(queries["worker_gone"], worker.name)
