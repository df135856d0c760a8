"""A worker process for the memory scenario, so that its RSS is the worker's alone.

    python -m benchmarks.worker_proc --dsn DSN [--concurrency N]

Prints `ready <pid>` on stdout once the worker claims jobs; SIGTERM or SIGINT stops it
gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal

import anyio

import durable
from benchmarks import workflows
from durable.cli import run_async


async def main(args: argparse.Namespace) -> None:
    engine = durable.Engine(args.dsn, workflows=[workflows.parked()])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine, anyio.create_task_group() as tg:
        worker = await tg.start(functools.partial(engine.run_worker, concurrency=args.concurrency))
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    logging.basicConfig(level=logging.WARNING)
    run_async(main(parser.parse_args()))
