"""Acceptance: flow control across real worker processes (`flow_worker_proc.py`), some
killed with SIGKILL. Bounds are measured from the handlers' own committed records:

- a rate limit holds across three processes;
- a limit slot whose holder is killed (a transactional attempt, or a leased one) is
  released and the run waiting for it goes on;
- three processes under SIGKILL chaos, with a per-key bound on active runs and a shared
  rate-and-concurrency limit: no bound is ever exceeded, every run completes, and no slot
  is left in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flow_app

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER_SCRIPT = HERE / "flow_worker_proc.py"
REPO = HERE.parent.parent
READY_TIMEOUT = 30.0
DEADLINE = 180.0
#: A handler records its start a moment after its attempt took its token (the next
#: statement of its transaction): windows are checked this much short of `per`.
SLACK = timedelta(milliseconds=100)


def _with_app_name(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}application_name={name}"))


class Fleet:
    """Worker subprocesses, each with its own `application_name`; `close()` kills them all."""

    def __init__(self, dsn: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.dsn, self.tmp_path, self.env = dsn, tmp_path, env or {}
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path, Path, float]] = []

    def spawn(self, concurrency: int = 4) -> int:
        name = f"floww{len(self.procs) + 1}"
        out, err = self.tmp_path / f"{name}.out", self.tmp_path / f"{name}.err"
        env = {
            **os.environ,
            flow_app.DSN_ENV: _with_app_name(self.dsn, name),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER_SCRIPT), "--concurrency", str(concurrency)],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        self.procs.append((name, proc, out, err, time.monotonic()))
        return len(self.procs) - 1

    def name(self, i: int) -> str:
        return self.procs[i][0]

    def pid(self, i: int) -> int:
        return self.procs[i][1].pid

    def ready(self, i: int) -> bool:
        name, proc, out, err, started = self.procs[i]
        if proc.poll() is not None:
            raise AssertionError(
                f"{name} exited with {proc.returncode}:\n{err.read_text()[-3000:]}"
            )
        assert time.monotonic() - started < READY_TIMEOUT, f"{name} never got ready"
        return "ready" in out.read_text()

    async def wait_ready(self, *indexes: int) -> None:
        while True:
            if all(self.ready(i) for i in indexes):  # raises when one died or is too slow
                return
            await asyncio.sleep(0.05)

    def kill(self, i: int) -> None:
        proc = self.procs[i][1]
        if proc.poll() is None:
            proc.kill()  # SIGKILL
        proc.wait()

    def stop(self, indexes: list[int]) -> list[int | None]:
        for i in indexes:
            self.procs[i][1].send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for i in indexes:
            try:
                codes.append(self.procs[i][1].wait(timeout=20))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def close(self) -> None:
        for _, proc, *_ in self.procs:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


@contextlib.contextmanager
def fleet(dsn: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Fleet]:
    f = Fleet(dsn, tmp_path, env)
    try:
        yield f
    finally:
        f.close()


def max_overlap(intervals: list[tuple[Any, Any]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    top = now = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def most_in_a_window(starts: list[datetime], per: timedelta) -> int:
    starts = sorted(starts)
    return max(
        (sum(1 for u in starts[i:] if u - t <= per) for i, t in enumerate(starts)), default=0
    )


async def _until(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _unfinished(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM durable.runs WHERE finished_at IS NULL")
    return n


async def test_a_rate_limit_holds_across_three_worker_processes(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(flow_app.TABLES_SQL)
    async with flow_app.build_engine(db.dsn) as engine:
        ids = [await engine.start("rated", {"i": i}) for i in range(40)]
    with fleet(db.dsn, tmp_path) as f:
        workers = [f.spawn() for _ in range(3)]
        await f.wait_ready(*workers)
        async with pool.acquire() as conn:
            await _until(lambda: _done(conn))
        assert f.stop(workers) == [0, 0, 0]
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM limited ORDER BY started_at")
        statuses = await conn.fetch("SELECT DISTINCT status FROM durable.runs")
        attempts = await conn.fetchval("SELECT count(*) FROM durable.attempts")
    assert [r["status"] for r in statuses] == ["completed"]
    assert len(rows) == len(ids)
    starts = [r["started_at"] for r in rows]
    per = timedelta(seconds=flow_app.RATED.per)
    assert most_in_a_window(starts, per - SLACK) <= flow_app.RATED.rate
    assert starts[-1] - starts[0] >= 3 * per - SLACK  # 40 starts at 10 a second
    assert len({r["pid"] for r in rows}) >= 2, "the processes did not share the work"
    assert {r["attempt"] for r in rows} == {1}
    assert attempts == 0


async def _done(conn: asyncpg.Connection) -> bool:
    return await _unfinished(conn) == 0


@pytest.mark.parametrize("workflow", ["holder", "leased_holder"])
async def test_a_limit_slot_whose_holder_is_killed_is_released(
    db: Any, pool: asyncpg.Pool, tmp_path: Path, workflow: str
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(flow_app.TABLES_SQL)
    env = {"DURABLE_FLOW_LEASE_SECONDS": "2"}
    os.environ.update(env, **{flow_app.DSN_ENV: db.dsn})  # the in-process worker below too
    try:
        async with flow_app.build_engine(db.dsn) as engine:
            with fleet(db.dsn, tmp_path, env) as f:
                holder = f.spawn()
                await f.wait_ready(holder)
                first = await engine.start(workflow, {"hold": True})
                async with pool.acquire() as conn:
                    await _until(
                        lambda: conn.fetchval("SELECT count(*) FROM holds WHERE run_id = $1", first)
                    )
                    second = await engine.start(workflow, {})
                    # The holder process waits for the only slot, without an attempt.
                    await _until(
                        lambda: conn.fetchval(
                            "SELECT limit_wait IS NOT NULL FROM durable.runs WHERE id = $1", second
                        )
                    )
                    usage = await engine.limit_usage()
                    assert [u.in_flight for u in usage] == [1]
                    f.kill(holder)
            # A worker of this process takes over: the slot was released with the holder.
            async with engine.worker(concurrency=2, poll_interval=0.1):
                done = await engine.wait(second, timeout=30)
                await engine.wait(first, timeout=30)
            async with pool.acquire() as conn:
                holds = await conn.fetch(
                    "SELECT run_id, pid, attempt FROM holds ORDER BY run_id, attempt"
                )
            usage = await engine.limit_usage()
    finally:
        for k in (*env, flow_app.DSN_ENV):
            os.environ.pop(k, None)
    assert done["hold"]["pid"] == os.getpid()
    assert done["hold"]["attempt"] == 1  # waiting for the slot used no attempt
    killed = [h for h in holds if h["run_id"] == first]
    assert killed[0]["pid"] == f.pid(holder)
    # A transactional attempt killed mid-way runs again as the same attempt; a leased one
    # whose lease lapsed is recorded as lost and the next attempt runs (at least once).
    assert [h["attempt"] for h in killed] == ([1, 1] if workflow == "holder" else [1, 2])
    assert [u.in_flight for u in usage] == [0]


async def test_sigkill_chaos_keeps_a_per_key_bound_and_a_shared_limit(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    runs, keys = 60, ("k0", "k1", "k2", "k3")
    async with pool.acquire() as conn:
        await conn.execute(flow_app.TABLES_SQL)
    async with flow_app.build_engine(db.dsn) as engine:
        for i in range(runs):
            await engine.start("flowcrash", {"k": keys[i % len(keys)], "i": i})
    kills = kills_in_flight = 0
    rng = random.Random()
    with fleet(db.dsn, tmp_path) as f:
        live = [f.spawn() for _ in range(3)]
        t0 = time.monotonic()
        async with pool.acquire() as conn:
            while await _unfinished(conn):
                assert time.monotonic() - t0 < DEADLINE, "runs did not finish in time"
                await asyncio.sleep(rng.uniform(0.15, 0.4))
                ready = [n for n, i in enumerate(live) if f.ready(i)]
                if not ready:
                    continue
                # Kill a worker with work in flight: the point of the chaos (a quiet
                # machine finishes between random kills otherwise, and runs of this
                # workflow wait for their key's slot much of the time). Watch for one for
                # up to half a second, then kill any.
                watch_until = time.monotonic() + 0.5
                while True:
                    working = [
                        n
                        for n in ready
                        if await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE application_name = $1 AND backend_xid IS NOT NULL",
                            f.name(live[n]),
                        )
                    ]
                    if working or time.monotonic() > watch_until:
                        break
                    await asyncio.sleep(0.01)
                n = rng.choice(working or ready)
                busy = bool(working)
                f.kill(live[n])
                kills += 1
                kills_in_flight += bool(busy)
                live[n] = f.spawn()
        await f.wait_ready(*live)
        assert f.stop(live) == [0, 0, 0]
    async with pool.acquire() as conn:
        active = await conn.fetch("SELECT key, started_at, ended_at FROM active")
        limited = await conn.fetch("SELECT * FROM limited ORDER BY started_at")
        statuses = await conn.fetch("SELECT status, count(*) FROM durable.runs GROUP BY 1")
        jobs = await conn.fetchval("SELECT count(*) FROM durable.jobs")
        held = await conn.fetchval(
            "SELECT count(*) FROM durable.runs WHERE slot = 'queued' OR finished_at IS NULL"
        )
    async with flow_app.build_engine(db.dsn) as engine:
        usage = await engine.limit_usage()
    print(f"\nflowcrash: {runs} runs, {kills} SIGKILLs, {kills_in_flight} with work in flight")

    assert {r["status"]: r["count"] for r in statuses} == {"completed": runs}
    assert jobs == 0
    assert held == 0
    # Each run's steps committed once: one interval per run, one limited call per run.
    assert len(active) == runs
    assert len(limited) == runs
    per_key: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
    for r in active:
        per_key[r["key"]].append((r["started_at"], r["ended_at"]))
    assert max(max_overlap(v) for v in per_key.values()) <= flow_app.PER_KEY
    calls = [(r["started_at"], r["ended_at"]) for r in limited]
    assert max_overlap(calls) <= (flow_app.SHARED.concurrency or 0)
    per = timedelta(seconds=flow_app.SHARED.per)
    assert most_in_a_window([s for s, _ in calls], per - SLACK) <= (flow_app.SHARED.rate or 0)
    # No slot is left in use, nor any run waiting for one.
    assert [u.in_flight for u in usage] == [0]
    assert kills_in_flight >= 2, f"too few kills landed on work in flight ({kills} kills)"
