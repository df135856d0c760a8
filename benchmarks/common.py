"""Shared pieces of the benchmark harness: sizes, progress output, throwaway databases and
the polling helpers the scenarios use to see when their runs are done."""

from __future__ import annotations

import contextlib
import os
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


class BackendCpu:
    """The CPU (user and system) PostgreSQL's backends of one database spent between
    `begin()` and `end()`, from `/proc/<pid>/stat`: a rate moves 3-5% between rounds on a
    shared machine, the server's CPU per step much less. Backends that connect in between
    count whole (their start-up is part of the work); read `end()` before the workers'
    connections close, as an exited backend's CPU is gone. `end()` gives None when the
    server does not run on this machine (its backends' pids name other processes here)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.before: dict[int, float] = {}
        self.process = 0.0  # this process's CPU (client and worker), set by `end()`

    async def _sample(self) -> dict[int, float] | None:
        row = await self.conn.fetchrow(
            "SELECT current_database() AS db, array_agg(pid) AS pids FROM pg_stat_activity "
            "WHERE datname = current_database()"
        )
        return _backend_cpu(list(row["pids"] or ()), row["db"])

    async def begin(self) -> None:
        self.before = await self._sample() or {}
        self.process = -time.process_time()

    async def end(self) -> float | None:
        """Seconds of backend CPU since `begin()`, or None (see the class). It also sets
        `process`, the seconds of CPU this process (the engine's client and worker) spent."""
        self.process += time.process_time()
        after = await self._sample()
        if not after:
            return None
        return sum(after.values()) - sum(v for k, v in self.before.items() if k in after)


def _backend_cpu(pids: list[int], db: str) -> dict[int, float] | None:
    """utime + stime in seconds of each of `pids`, or None if one is not a backend of
    database `db` on this machine (its process title names the database)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if not title.startswith("postgres") or db not in title:
            return None  # not this server's backend: the server runs elsewhere
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per(seconds: float | None, n: int, process: float) -> dict[str, float]:
    """`{"pg_cpu_us": ..., "py_cpu_us": ...}`: the backends' CPU per unit of work in µs (left
    out when unknown) and this process's."""
    out = {"py_cpu_us": process * 1e6 / n}
    if seconds is not None:
        out["pg_cpu_us"] = seconds * 1e6 / n
    return out


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
    chain_size: int | None = None  # the workers' chain size (None: the engine's default)

    def worker_options(self) -> dict[str, int]:
        """The keyword arguments of the scenarios' `engine.worker(...)`."""
        options = {"concurrency": self.concurrency}
        if self.batch_size is not None:
            options["batch_size"] = self.batch_size
        if self.chain_size is not None:
            options["chain_size"] = self.chain_size
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
