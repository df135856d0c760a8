"""A worker process for the crash acceptance tests.

    python tests/acceptance/workflow_worker_proc.py [--dsn DSN] [--lease-seconds S]
        [--concurrency N] [--poll-interval S] [--grace-period S] [--batch-size N]
        [--batch-window S]

Unset options come from the environment (see `workflows_app`). Prints `ready <pid>` on
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
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflows_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--lease-seconds", type=float, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--grace-period", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--batch-window", type=float, default=None)
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    engine = workflows_app.build_engine(args.dsn, lease_seconds=args.lease_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    batching: dict[str, Any] = {}
    if args.batch_size is not None:
        batching["batch_size"] = args.batch_size
    if args.batch_window is not None:
        batching["batch_window"] = args.batch_window
    async with engine, anyio.create_task_group() as tg:
        worker = await tg.start(
            functools.partial(
                engine.run_worker,
                concurrency=args.concurrency,
                poll_interval=args.poll_interval,
                grace_period=args.grace_period,
                **batching,
            )
        )
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()  # run_worker returns once in-flight jobs are done


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("DURABLE_APP_LOG", "WARNING"),
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main(parse_args()))
    print(f"stopped {os.getpid()}", flush=True)
