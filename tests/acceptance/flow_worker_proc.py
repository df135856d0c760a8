"""A worker process for the flow-control acceptance tests.

    python tests/acceptance/flow_worker_proc.py [--concurrency N] [--poll-interval S]

The database comes from `DURABLE_FLOW_DSN` (see `flow_app`). Prints `ready <pid>` once the
worker claims jobs; SIGTERM or SIGINT stops it gracefully and the process exits 0.
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

import flow_app


async def main(args: argparse.Namespace) -> None:
    engine = flow_app.build_engine()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine, anyio.create_task_group() as tg:
        worker = await tg.start(
            functools.partial(
                engine.run_worker,
                concurrency=args.concurrency,
                poll_interval=args.poll_interval,
                grace_period=5.0,
            )
        )
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    logging.basicConfig(
        level=os.environ.get("DURABLE_APP_LOG", "WARNING"),
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main(parser.parse_args()))
    print(f"stopped {os.getpid()}", flush=True)
