"""A worker process for the composite-node crash acceptance tests.

    python tests/acceptance/composite_worker_proc.py [--dsn DSN] [--concurrency N]
        [--poll-interval S] [--grace-period S]

The DSN defaults to `$DURABLE_COMPOSITE_DSN` (see `composite_app`). Prints `ready <pid>` on
stdout once the worker is claiming jobs. SIGTERM or SIGINT stops it gracefully (no new
claims, in-flight jobs finish) and the process exits 0.
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

import composite_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--grace-period", type=float, default=10.0)
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    if args.dsn is not None:
        os.environ[composite_app.DSN_ENV] = args.dsn  # the app's side pool reads it too
    engine = composite_app.build_engine(args.dsn)
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
                grace_period=args.grace_period,
            )
        )
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()  # run_worker returns once in-flight jobs are done
    await composite_app.close_side_pool()


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("DURABLE_APP_LOG", "WARNING"),
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main(parse_args()))
    print(f"stopped {os.getpid()}", flush=True)
