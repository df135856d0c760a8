"""Acceptance: a schedule run by three real worker processes starts exactly one run per
tick, also when one of them is SIGKILLed between ticks.

The schedule's five ticks are five consecutive seconds a little in the future (a six-field
cron with a seconds field), so the three processes are all up and contend for each tick
in real time; nothing else can start a run of it. Each process logs the ticks it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "schedule_worker_proc.py"
REPO = HERE.parent.parent
READY_TIMEOUT = 30.0
STARTED = re.compile(r"\[(\d+)\] INFO durable\.scheduler: schedule five: tick (\S+) started run")


def five_seconds_from(start: datetime) -> tuple[str, list[datetime]]:
    """A cron expression (UTC) that ticks at five consecutive seconds from `start` on, in
    one minute, and those ticks."""
    start = start.replace(microsecond=0)
    if start.second > 54:
        start += timedelta(seconds=60 - start.second)
    ticks = [start + timedelta(seconds=i) for i in range(5)]
    seconds = ",".join(str(t.second) for t in ticks)
    return f"{seconds} {start.minute} {start.hour} {start.day} {start.month} *", ticks


def spawn(
    dsn: str, cron: str, tmp_path: Path, i: int
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / f"sched{i}.out", tmp_path / f"sched{i}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--dsn", dsn, "--name", "five", "--cron", cron],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
    return proc, out, err


async def poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await anyio.sleep(0.05)


async def test_three_worker_processes_start_exactly_five_runs_for_five_ticks(
    db: Any, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(db.dsn)
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        now: datetime = await conn.fetchval("SELECT durable.now_v1()")
        cron, ticks = five_seconds_from(now + timedelta(seconds=12))
        procs = [spawn(db.dsn, cron, tmp_path, i) for i in range(3)]

        async def ready() -> bool:
            for proc, _, err in procs:
                assert proc.poll() is None, err.read_text()[-3000:]
            return all("ready" in out.read_text() for _, out, _ in procs)

        await poll(ready, READY_TIMEOUT, "three ready workers")
        assert await conn.fetchval("SELECT durable.now_v1()") < ticks[0], (
            "the workers took too long to start: the first tick passed before all were up"
        )

        async def runs() -> int:
            n: int = await conn.fetchval("SELECT count(*) FROM durable.runs")
            return n

        # SIGKILL one process once two ticks have runs: the other two fire the rest.
        await poll(lambda: _at_least(runs, 2), 60, "two runs")
        procs[0][0].send_signal(signal.SIGKILL)
        procs[0][0].wait()

        async def all_done() -> bool:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM durable.runs WHERE status = 'completed'"
            )
            return n >= 5 and await conn.fetchval("SELECT durable.now_v1()") > ticks[
                -1
            ] + timedelta(seconds=2)

        await poll(all_done, 60, "five completed runs")
        for proc, _, _ in procs[1:]:
            proc.send_signal(signal.SIGTERM)
        for proc, _, err in procs[1:]:
            assert proc.wait(timeout=20) == 0, err.read_text()[-3000:]
        rows = await conn.fetch(
            "SELECT input->>'scheduled_at' AS at, idempotency_key AS key, status "
            "FROM durable.runs ORDER BY 1"
        )
        next_at = await conn.fetchval("SELECT next_at FROM durable.schedules WHERE name = 'five'")
    finally:
        for proc, _, _ in procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait()
        await conn.close()
    assert [r["at"] for r in rows] == [t.isoformat() for t in ticks]
    assert [r["key"] for r in rows] == [f"schedule:five:{t.isoformat()}" for t in ticks]
    assert {r["status"] for r in rows} == {"completed"}
    assert next_at > ticks[-1] + timedelta(days=300)  # the same seconds next year
    # Every tick was started once, by one process: the row lock decided, so no process
    # even reached the idempotency key with a duplicate.
    started = [m.groups() for _, _, err in procs for m in STARTED.finditer(err.read_text())]
    assert sorted(t for _, t in started) == [t.isoformat() for t in ticks]
    by_process = Counter(pid for pid, _ in started)
    print(f"\nticks started per process: {dict(by_process)}")


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)
