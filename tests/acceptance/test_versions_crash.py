"""Acceptance: two versions served side by side by real worker processes, SIGKILLed at random.

Worker A registers only version 1 of `versioned`, worker B versions 1 and 2 (a step
appended). Runs of both versions are started; a chaos loop kills a random worker every
0.2-0.6 s and starts a replacement of the same kind, until every run is terminal. Every
step records, in its own transaction, the version of the code that ran it and the versions
of the worker that ran it: each run must complete on the code of its own version, no step
of a version may run on a worker lacking it, and no step may be lost or committed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import versions_app

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "versions_worker_proc.py"
REPO = HERE.parent.parent
RUNS_PER_VERSION = 60
KINDS = {"A": "1", "B": "1,2"}
DEADLINE = 180.0
READY_TIMEOUT = 30.0


def _with_app_name(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}application_name={name}"))


@dataclass
class Proc:
    kind: str
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    def ready(self) -> bool:
        return self.out.exists() and "ready" in self.out.read_text()

    def check_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.err.read_text()[-4000:]}"


class Fleet:
    def __init__(self, dsn: str, tmp_path: Path) -> None:
        self.dsn, self.tmp_path, self.spawned, self.all = dsn, tmp_path, 0, list[Proc]()

    def spawn(self, kind: str) -> Proc:
        self.spawned += 1
        name = f"ver{kind}{self.spawned}"
        out, err = self.tmp_path / f"{name}.out", self.tmp_path / f"{name}.err"
        env = {
            **os.environ,
            versions_app.DSN_ENV: _with_app_name(self.dsn, name),
            versions_app.VERSIONS_ENV: KINDS[kind],
            versions_app.WORKER_ENV: name,
            "PYTHONUNBUFFERED": "1",
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--concurrency", "4"],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        worker = Proc(kind, name, proc, out, err, time.monotonic())
        self.all.append(worker)
        return worker

    def close(self) -> None:
        for w in self.all:
            with contextlib.suppress(Exception):
                if w.proc.poll() is None:
                    w.proc.kill()
                w.proc.wait()


async def _busy(conn: asyncpg.Connection, name: str) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
        "AND backend_xid IS NOT NULL",
        name,
    )
    return n


async def _chaos(f: Fleet, conn: asyncpg.Connection) -> Counter[str]:
    """Kill a ready worker (one mid-step if any) every 0.2-0.6 s and replace it with one
    of its kind, until every run is terminal; then stop the survivors gracefully."""
    stats: Counter[str] = Counter()
    rng = random.Random()
    # B first, and ready before A starts: the oldest due jobs are v1 ones (started first),
    # so B's first claims take v1 runs. Claims are FIFO: started together, A (three steps a
    # run) stays ahead of B (four) on the v1 runs, and B would only ever find v2 jobs older.
    live = [f.spawn("B")]
    deadline = time.monotonic() + READY_TIMEOUT
    while not live[0].ready():
        live[0].check_alive()
        assert time.monotonic() < deadline, "worker B did not become ready"
        await asyncio.sleep(0.02)
    live.append(f.spawn("A"))
    t0 = time.monotonic()
    while await conn.fetchval("SELECT count(*) FROM durable.runs WHERE finished_at IS NULL"):
        if time.monotonic() - t0 > DEADLINE:
            left = await conn.fetch(
                "SELECT version, status, current_node, count(*) FROM durable.runs "
                "WHERE finished_at IS NULL GROUP BY 1, 2, 3"
            )
            raise AssertionError(f"runs not terminal after {DEADLINE} s: {left} ({stats})")
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        for w in live:
            w.check_alive()
            assert w.ready() or time.monotonic() - w.started < READY_TIMEOUT, w.name
        ready = [i for i, w in enumerate(live) if w.ready()]
        if not ready:
            continue
        # Prefer a worker that is inside a step's transaction (a kill there is the case
        # under test; a random pick on a fast machine lands mostly between steps), and of
        # the two kinds the one killed less so far (B, serving both versions, is busier).
        busy_of = {i: await _busy(conn, live[i].name) for i in ready}
        candidates = [i for i in ready if busy_of[i]] or ready
        fewest = min(stats[f"kills of {live[i].kind}"] for i in candidates)
        i = rng.choice([i for i in candidates if stats[f"kills of {live[i].kind}"] == fewest])
        victim = live[i]
        busy = busy_of[i]
        victim.proc.kill()
        victim.proc.wait()
        stats["kills"] += 1
        stats[f"kills of {victim.kind}"] += 1
        stats["kills in flight"] += bool(busy)
        live[i] = f.spawn(victim.kind)
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(w.ready() for w in live):  # a worker still booting has no SIGTERM handler
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for w in live:
        w.proc.terminate()
    assert [w.proc.wait(timeout=20) for w in live] == [0, 0]
    return stats


async def test_versions_side_by_side_under_sigkill_run_each_run_on_its_own_code(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(versions_app.TABLES_SQL)
    async with versions_app.build_engine(db.dsn, "1,2") as engine:
        ids: dict[int, list[str]] = {1: [], 2: []}
        for version in (1, 2):
            for i in range(RUNS_PER_VERSION):
                ids[version].append(await engine.start("versioned", {"i": i}, version=version))
    f = Fleet(db.dsn, tmp_path)
    try:
        async with pool.acquire() as conn:
            stats = await _chaos(f, conn)
    finally:
        f.close()
    print(f"\nversions: {2 * RUNS_PER_VERSION} runs, {dict(stats)}, {f.spawned} workers spawned")

    async with pool.acquire() as conn:
        runs = {
            r["id"]: (r["version"], r["status"])
            for r in await conn.fetch("SELECT id, version, status FROM durable.runs")
        }
        effects = await conn.fetch(
            "SELECT run_id, step, version, worker, registered FROM ver_effects"
        )
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0
    # None lost: every run completed, at the version it was started at.
    assert runs == {r: (v, "completed") for v, rs in ids.items() for r in rs}
    # Each step committed exactly once, on the code of the run's own version.
    committed = Counter((e["run_id"], e["step"], e["version"]) for e in effects)
    expected = Counter(
        (r, step, v) for v, rs in ids.items() for r in rs for step in versions_app.STEPS[v]
    )
    assert committed == expected
    # No step ran on a worker lacking its version; version 1 was served by both kinds.
    assert all(str(e["version"]) in e["registered"].split(",") for e in effects)
    assert {e["worker"][3] for e in effects if e["version"] == 2} == {"B"}
    assert {e["worker"][3] for e in effects if e["version"] == 1} == {"A", "B"}
    for w in f.all:
        assert "Traceback" not in w.err.read_text(), w.err.read_text()[-4000:]
    assert stats["kills in flight"] >= 3, stats
    assert stats["kills of A"], stats
    assert stats["kills of B"], stats
