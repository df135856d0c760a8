"""A worker process with one schedule, for the schedule acceptance tests.

    python tests/acceptance/schedule_worker_proc.py --dsn DSN --name NAME --cron EXPR

The engine registers the workflow `tick` (one step) and the schedule NAME (`overlap="allow"`,
`catch_up="none"`). Logs at INFO to stderr, each line with the process id, so the test can
tell which process started which tick. Prints `ready <pid>` once the worker runs; SIGTERM
stops it gracefully.
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


def build_engine(dsn: str, name: str, cron: str) -> durable.Engine:
    wf = durable.Workflow("tick")

    @wf.step
    async def record(ctx: durable.Context) -> str:
        return str(ctx.input["scheduled_at"])

    schedule = durable.Schedule(name, cron=cron, workflow=wf, overlap="allow", catch_up="none")
    return durable.Engine(dsn, workflows=[wf], schedules=[schedule])


async def main(args: argparse.Namespace) -> None:
    engine = build_engine(args.dsn, args.name, args.cron)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine, anyio.create_task_group() as tg:
        worker = await tg.start(
            functools.partial(engine.run_worker, concurrency=2, poll_interval=args.poll_interval)
        )
        print(f"ready {os.getpid()}", flush=True)
        await stop.wait()
        worker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cron", required=True)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("durable.scheduler").setLevel(logging.INFO)
    asyncio.run(main(parser.parse_args()))
