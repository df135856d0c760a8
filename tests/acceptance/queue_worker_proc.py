"""A real worker process for the queue tests: `python queue_worker_proc.py DSN [options]`.

It runs `durable.worker.Worker` on the queue `--queue` with one task, `insert`, whose handler
inserts `(item, job_id, pid)` into the table `--table` through the job's own connection, so
the row commits with the deletion of the job or not at all. The table must exist.

`--block SECONDS` makes the handler, after its insert, record `(job_id, pid)` in the table
`--progress-table` on a separate autocommit connection (the test sees "this job is mid-way")
and then sleep, so that a test can SIGKILL the process while it holds the job.

`--ready-file PATH` is created once the worker loop has started. SIGTERM and SIGINT stop the
worker gracefully; the process exits 0 when the worker stopped cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import anyio
import asyncpg

from durable.queue import Job
from durable.sql import Queries
from durable.worker import Worker


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dsn")
    parser.add_argument("--schema", default="durable")
    parser.add_argument("--queue", default="default")
    parser.add_argument("--table", default="effects")
    parser.add_argument("--progress-table", default="progress")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--block", type=float, default=0.0)
    parser.add_argument("--ready-file", default=None)
    return parser.parse_args(argv)


def quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    pid = os.getpid()
    pool = await asyncpg.create_pool(args.dsn, min_size=1, max_size=args.concurrency + 2)
    assert pool is not None
    progress: asyncpg.Connection | None = None
    progress_lock = asyncio.Lock()
    if args.block > 0:
        progress = await asyncpg.connect(args.dsn)
    insert_sql = f"INSERT INTO {quoted(args.table)} (item, job_id, pid) VALUES ($1, $2, $3)"
    progress_sql = f"INSERT INTO {quoted(args.progress_table)} (job_id, pid) VALUES ($1, $2)"

    async def insert(conn: asyncpg.Connection, job: Job) -> None:
        await conn.execute(insert_sql, job.payload["item"], job.id, pid)
        if progress is not None:
            async with progress_lock:
                await progress.execute(progress_sql, job.id, pid)
            await asyncio.sleep(args.block)

    worker = Worker(
        pool,
        Queries(args.schema),
        {"insert": insert},
        queues=[args.queue],
        concurrency=args.concurrency,
        poll_interval=args.poll_interval,
        grace_period=args.grace,
        name=f"proc-{pid}",
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            if args.ready_file:
                await anyio.Path(args.ready_file).write_text(str(pid))
    finally:
        if progress is not None:
            await progress.close()
        await pool.close()
    print(f"worker {pid} stopped after {worker.processed} jobs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
