"""A soak worker process: `engine.run_worker(concurrency=8, poll_interval=0.5)` on asyncio.

    SOAK_DSN=postgresql://...?application_name=soak-worker-1 python -m tests.soak.worker_proc

Prints `ready <pid>` on stdout once the worker is claiming jobs. SIGTERM or SIGINT stops it
gracefully (no new claims, in-flight jobs finish) and the process exits 0. A worker started
while PostgreSQL is down (the driver restarts it) waits for it; a running worker rides out
the outage by itself (that is what the soak checks).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal

import anyio

from durable import DatabaseUnavailable
from tests.soak import app

CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "8"))
POLL_INTERVAL = float(os.environ.get("SOAK_POLL_INTERVAL", "0.5"))
GRACE_PERIOD = 10.0

log = logging.getLogger("soak.worker")


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = app.build_engine()
    started = False
    while not stop.is_set():
        try:
            # As `durable worker` does: open the engine (applying migrations), then work.
            async with engine, anyio.create_task_group() as tg:
                worker = await tg.start(
                    functools.partial(
                        engine.run_worker,
                        concurrency=CONCURRENCY,
                        poll_interval=POLL_INTERVAL,
                        grace_period=GRACE_PERIOD,
                    )
                )
                started = True
                print(f"ready {os.getpid()}", flush=True)
                await stop.wait()
                worker.stop()  # run_worker returns once in-flight jobs are done
            return
        except* DatabaseUnavailable as group:
            # Retried only at start-up (the engine's pool cannot open): a running worker
            # must back off and reconnect by itself, so there it is a failure.
            if started:
                raise
            log.warning("database unavailable at start-up, retrying: %s", group.exceptions[0])
            with anyio.move_on_after(0.5):
                await stop.wait()


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("SOAK_LOG", "WARNING"),
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main())
    print(f"stopped {os.getpid()}", flush=True)
