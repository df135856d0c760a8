"""A worker process for the versioned crash test: the engine of `versions_app` with the
versions `DURABLE_APP_VERSIONS` names.

    python tests/acceptance/versions_worker_proc.py [--concurrency N]

Prints `ready <pid>` once claiming; SIGTERM or SIGINT stops it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import versions_app


async def main(concurrency: int) -> None:
    engine = versions_app.build_engine()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine, anyio.create_task_group() as tg:
        worker = await tg.start(
            functools.partial(engine.run_worker, concurrency=concurrency, poll_interval=0.2)
        )
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=4)
    logging.basicConfig(
        level="WARNING", format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main(parser.parse_args().concurrency))
    print(f"stopped {os.getpid()}", flush=True)
