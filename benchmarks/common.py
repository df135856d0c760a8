"""Shared pieces of the benchmark harness: sizes, progress output, throwaway databases and
the polling helpers the scenarios use to see when their runs are done."""

from __future__ import annotations

import contextlib
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

import durable

_T0 = time.perf_counter()


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries only the report)."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does (full run or `--quick`)."""

    name: str
    baseline_tx_1: int  # transactions on one connection
    baseline_tx_8: int  # transactions in total over 8 connections
    chain_steps: int
    loop_iterations: int
    fanout_runs: int
    fanout_steps: int
    drain_runs: int
    start_runs: int
    start_callers: int
    latency_samples: int
    scale_rows: int
    scale_months: int  # the months before this one that scale's finished runs are spread over
    memory_runs: int
    repeats: int  # fan-out and scale are measured this many times; the median is reported
    concurrency: int
    scenario_timeout: float  # seconds before a scenario is abandoned (and reported as such)
    batch_size: int | None = None  # the workers' batch size (None: the engine's default)

    def worker_options(self) -> dict[str, int]:
        """The keyword arguments of the scenarios' `engine.worker(...)`."""
        options = {"concurrency": self.concurrency}
        if self.batch_size is not None:
            options["batch_size"] = self.batch_size
        return options


FULL = Sizes(
    name="full",
    baseline_tx_1=4000,
    baseline_tx_8=16000,
    chain_steps=1000,
    loop_iterations=3000,
    fanout_runs=500,
    fanout_steps=10,
    drain_runs=10_000,
    start_runs=5000,
    start_callers=16,
    latency_samples=200,
    scale_rows=1_000_000,
    scale_months=3,
    memory_runs=10_000,
    repeats=3,
    concurrency=16,
    scenario_timeout=900.0,
)

QUICK = Sizes(
    name="quick",
    baseline_tx_1=1000,
    baseline_tx_8=4000,
    chain_steps=1000,
    loop_iterations=1000,
    fanout_runs=200,
    fanout_steps=10,
    drain_runs=2000,
    start_runs=1000,
    start_callers=16,
    latency_samples=50,
    scale_rows=100_000,
    scale_months=3,
    memory_runs=2000,
    repeats=1,
    concurrency=16,
    scenario_timeout=120.0,
)


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str, label: str) -> AsyncIterator[str]:
    """Create an empty database for one scenario, yield its DSN, drop it afterwards."""
    name = "bench_" + re.sub(r"[^a-z0-9_]", "_", label.lower()) + "_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_dsn, name)
    finally:
        with anyio.CancelScope(shield=True):
            admin = await asyncpg.connect(server_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


async def start_many(
    engine: durable.Engine, workflow: str, n: int, *, callers: int = 16
) -> list[str]:
    """Start `n` runs of `workflow` from `callers` concurrent tasks; return their ids."""
    ids: list[str] = [""] * n

    async def caller(first: int) -> None:
        for i in range(first, n, callers):
            ids[i] = await engine.start(workflow, {"i": i})

    async with anyio.create_task_group() as tg:
        for k in range(min(callers, n)):
            tg.start_soon(caller, k)
    return ids


_TERMINAL = ("completed", "failed", "cancelled")


async def wait_all_finished(
    conn: asyncpg.Connection,
    first_id: str,
    expected: int,
    *,
    timeout: float,
    interval: float = 0.01,
) -> float:
    """Poll until `expected` runs with id >= `first_id` have finished; return the
    `perf_counter()` at which that was seen. Raise if any of them did not complete.

    Run ids are ULIDs (time-ordered), so `id >= first_id` selects exactly the runs a
    scenario started, through the primary key, even with a million older rows around.
    """
    query = (
        "SELECT count(*) FILTER (WHERE status = ANY($2::text[])) AS done,"
        " count(*) FILTER (WHERE status IN ('failed', 'cancelled')) AS bad"
        " FROM durable.runs WHERE id >= $1"
    )
    with anyio.fail_after(timeout):
        while True:
            row = await conn.fetchrow(query, first_id, list(_TERMINAL))
            assert row is not None  # an aggregate always returns a row
            if row["done"] >= expected:
                seen = time.perf_counter()
                if row["bad"]:
                    raise RuntimeError(f"{row['bad']} of {expected} runs did not complete")
                return seen
            await anyio.sleep(interval)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"
