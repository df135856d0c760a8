"""Acceptance: composite nodes survive real worker processes killed with SIGKILL.

Each chaos test runs `composite_worker_proc.py` subprocesses against a fresh database and
kills a random ready worker every 0.2-0.6 s, starting a replacement each time, until every
run is terminal (deadline-polled). Then it checks that every effect written through
`ctx.conn` exists exactly once, that no attempt of a node started after that node's
committing attempt (nothing committed ran again), and that no job row is left.

Two more tests: a sleep whose every worker is stopped while it is parked completes once, at
or after its stored wake time, under a worker started later; and parked runs hold no worker
slots.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import composite_app

import durable

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER_SCRIPT = HERE / "composite_worker_proc.py"
REPO = HERE.parent.parent

RUNS = 40
WORKERS = 2
CONCURRENCY = 2
CHAOS_DEADLINE = 45.0
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
TERMINAL = ("completed", "failed", "cancelled")


def _with_app_name(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}application_name={name}"))


@dataclass
class WorkerProc:
    """One worker subprocess; its output goes to files under the test's tmp_path."""

    app_name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    def is_ready(self) -> bool:
        try:
            return "ready" in self.out.read_text()
        except FileNotFoundError:
            return False

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(
                f"worker {self.app_name} exited early with {code}:\n{self.err.read_text()[-4000:]}"
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        self.proc.wait()


class Fleet:
    """Starts, kills and stops worker subprocesses; `close()` kills whatever is left."""

    def __init__(self, dsn: str, tmp_path: Path, *, concurrency: int = CONCURRENCY) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.concurrency = concurrency
        self.spawned = 0
        self.all: list[WorkerProc] = []

    def spawn(self) -> WorkerProc:
        self.spawned += 1
        name = f"compw{self.spawned}"
        out = self.tmp_path / f"{name}.out"
        err = self.tmp_path / f"{name}.err"
        env = {
            **os.environ,
            composite_app.DSN_ENV: _with_app_name(self.dsn, name),
            "PYTHONUNBUFFERED": "1",
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER_SCRIPT),
                    "--concurrency",
                    str(self.concurrency),
                    "--poll-interval",
                    "0.2",
                ],
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
            )
        worker = WorkerProc(name, proc, out, err)
        self.all.append(worker)
        return worker

    async def wait_ready(self, *workers: WorkerProc) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.is_ready() for w in workers):
            for w in workers:
                w.check_alive()
            assert time.monotonic() < deadline, "workers did not become ready in time"
            await asyncio.sleep(0.05)

    def stop_gracefully(self, workers: list[WorkerProc]) -> list[int | None]:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for w in workers:
            try:
                codes.append(w.proc.wait(timeout=STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def close(self) -> None:
        for w in self.all:
            with contextlib.suppress(Exception):
                w.kill()


@contextlib.contextmanager
def fleet(dsn: str, tmp_path: Path, **kwargs: Any) -> Iterator[Fleet]:
    f = Fleet(dsn, tmp_path, **kwargs)
    try:
        yield f
    finally:
        f.close()


@dataclass
class ChaosStats:
    kills: int = 0
    kills_in_flight: int = 0
    seconds: float = 0.0
    effects_rolled_back: int = 0


def _local_ports(pid: int) -> list[int]:
    """The local TCP ports of a process's sockets (Linux /proc), to find its connections in
    pg_stat_activity whatever application_name the engine gives them."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def _busy_transactions(conn: asyncpg.Connection, pid: int) -> int:
    """Transactions of a worker process that hold an xid: a claimed job or a write."""
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1::int[]) "
        "AND backend_xid IS NOT NULL",
        _local_ports(pid),
    )
    return n


async def _unfinished(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM durable.runs WHERE status <> ALL($1::text[])", list(TERMINAL)
    )
    return n


async def run_chaos(f: Fleet, conn: asyncpg.Connection) -> ChaosStats:
    """Kill a random ready worker every 0.2-0.6 s and replace it, until all runs finish."""
    stats = ChaosStats()
    rng = random.Random()
    t0 = time.monotonic()
    live = [f.spawn() for _ in range(WORKERS)]
    while await _unfinished(conn):
        elapsed = time.monotonic() - t0
        if elapsed > CHAOS_DEADLINE:
            left = await conn.fetch(
                "SELECT workflow, status, current_node, count(*) FROM durable.runs "
                "WHERE status <> ALL($1::text[]) GROUP BY 1, 2, 3",
                list(TERMINAL),
            )
            jobs = await conn.fetch("SELECT * FROM durable.jobs LIMIT 10")
            raise AssertionError(
                f"runs not terminal after {elapsed:.0f} s ({stats}): "
                f"{[tuple(r) for r in left]}; jobs: {[dict(j) for j in jobs]}"
            )
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        for w in live:
            w.check_alive()
            if not w.is_ready():
                assert time.monotonic() - w.started < READY_TIMEOUT, f"{w.app_name} never ready"
        ready = [i for i, w in enumerate(live) if w.is_ready()]
        if not ready or not await _unfinished(conn):
            continue
        i = rng.choice(ready)
        victim = live[i]
        busy = await _busy_transactions(conn, victim.proc.pid)
        victim.kill()
        stats.kills += 1
        if busy:
            stats.kills_in_flight += 1
        live[i] = f.spawn()
    stats.seconds = time.monotonic() - t0
    await f.wait_ready(*live)  # a worker still booting has no SIGTERM handler yet
    codes = f.stop_gracefully(live)
    assert codes == [0] * len(live), f"graceful stop exit codes: {codes}"
    stats.effects_rolled_back = await conn.fetchval(
        "SELECT (CASE WHEN is_called THEN last_value ELSE 0 END) - (SELECT count(*) FROM effects) "
        "FROM effects_id_seq"
    )
    return stats


async def _prepare(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(composite_app.TABLES_SQL)


async def _start_runs(engine: durable.Engine, workflow: str) -> list[str]:
    return [await engine.start(workflow, {"i": i}) for i in range(RUNS)]


async def _check_effects_once(conn: asyncpg.Connection, expected: set[tuple[str, str]]) -> None:
    """Every expected (run, what) effect committed exactly once, nothing else committed, and
    no attempt of a committed node started after its committing attempt."""
    rows = await conn.fetch("SELECT run_id, what, count(*) AS n FROM effects GROUP BY 1, 2")
    dupes = [tuple(r) for r in rows if r["n"] != 1]
    assert dupes == []
    assert {(r["run_id"], r["what"]) for r in rows} == expected
    reruns = await conn.fetch(
        "SELECT s.run_id, s.what, s.pid, s.at, e.at AS committed_at, e.pid AS committed_pid "
        "FROM starts s JOIN effects e USING (run_id, what) WHERE s.at > e.at"
    )
    assert [dict(r) for r in reruns] == []
    assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0


def _report(name: str, stats: ChaosStats, extra: str = "") -> None:
    print(
        f"\n{name}: {RUNS} runs, {WORKERS} workers x {CONCURRENCY} slots, "
        f"{stats.seconds:.1f} s, {stats.kills} SIGKILLs ({stats.kills_in_flight} with work in "
        f"flight), {stats.effects_rolled_back} effect inserts rolled back by kills{extra}"
    )


async def test_sigkill_mid_loop_runs_every_iteration_exactly_once(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _prepare(pool)
    async with composite_app.build_engine(db.dsn) as engine:
        run_ids = await _start_runs(engine, "cloop")
        with fleet(db.dsn, tmp_path) as f:
            async with pool.acquire() as conn:
                stats = await run_chaos(f, conn)
        runs = [await engine.get_run(r, journal=True) for r in run_ids]
    _report("mid-loop", stats)

    n = composite_app.ITERATIONS
    expected_lp = [{"i": i, "sq": i * i} for i in range(n)]
    for run in runs:
        assert run.status is durable.RunStatus.COMPLETED, (run.id, run.status, run.error)
        assert run.result == {"lp": expected_lp, "tally": sum(i * i for i in range(n))}
        keys = [e.key for e in run.journal]
        assert keys == [f"lp#{i}" for i in range(n)] + ["lp", "tally"]
    async with pool.acquire() as conn:
        await _check_effects_once(conn, {(r, f"lp#{i}") for r in run_ids for i in range(n)})
    assert stats.kills >= 3, stats
    assert stats.kills_in_flight >= 1, stats
    assert stats.effects_rolled_back >= 1, f"no kill landed mid-node: {stats}"


async def test_sigkill_mid_parallel_runs_every_branch_exactly_once(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _prepare(pool)
    branches = composite_app.BRANCHES
    async with composite_app.build_engine(db.dsn) as engine:
        run_ids = await _start_runs(engine, "cpar")
        with fleet(db.dsn, tmp_path) as f:
            async with pool.acquire() as conn:
                stats = await run_chaos(f, conn)
        runs = [await engine.get_run(r, journal=True) for r in run_ids]
    _report("mid-parallel", stats)

    for run in runs:
        assert run.status is durable.RunStatus.COMPLETED, (run.id, run.status, run.error)
        assert run.result == {
            "fan": {b: {"branch": b} for b in branches},
            "gather": sorted(branches),
        }
        keys = [e.key for e in run.journal]
        assert sorted(keys[:4]) == sorted(f"fan#{b}" for b in branches)
        assert keys[4:] == ["fan", "gather"]
    async with pool.acquire() as conn:
        await _check_effects_once(conn, {(r, f"fan#{b}") for r in run_ids for b in branches})
    assert stats.kills >= 3, stats
    assert stats.kills_in_flight >= 1, stats
    assert stats.effects_rolled_back >= 1, f"no kill landed mid-node: {stats}"


async def test_sigkill_parent_and_child_workers_one_child_per_parent(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _prepare(pool)
    async with composite_app.build_engine(db.dsn) as engine:
        parent_ids = await _start_runs(engine, "cparent")
        with fleet(db.dsn, tmp_path) as f:
            async with pool.acquire() as conn:
                stats = await run_chaos(f, conn)
        parents = [await engine.get_run(r, journal=True) for r in parent_ids]
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT p.id, count(c.id) AS n, min(c.id) AS child "
                "FROM durable.runs p LEFT JOIN durable.runs c ON c.parent_id = p.id "
                "WHERE p.parent_id IS NULL GROUP BY p.id"
            )
            statuses = await conn.fetch(
                "SELECT workflow, status, count(*) AS n FROM durable.runs GROUP BY 1, 2"
            )
        children = {r["id"]: r["child"] for r in rows}
        child_runs = {p: await engine.get_run(c) for p, c in children.items()}
    _report("parent/child", stats)

    assert {r["id"]: r["n"] for r in rows} == dict.fromkeys(parent_ids, 1)
    assert {(r["workflow"], r["status"]): r["n"] for r in statuses} == {
        ("cparent", "completed"): RUNS,
        ("cchild", "completed"): RUNS,
    }
    for parent in parents:
        child = child_runs[parent.id]
        assert child.parent_id == parent.id
        assert parent.children == (child.id,)
        expected_child = {s: {"step": s, "parent": parent.id} for s in composite_app.CHILD_STEPS}
        assert child.result == expected_child
        assert parent.result == {"pre": "pre", "kid": expected_child, "post": expected_child}
        assert [e.key for e in parent.journal] == ["pre", "kid@child", "kid", "post"]
    expected = {(p, w) for p in parent_ids for w in ("pre", "post")} | {
        (c, s) for c in children.values() for s in composite_app.CHILD_STEPS
    }
    async with pool.acquire() as conn:
        await _check_effects_once(conn, expected)
    assert stats.kills >= 3, stats
    assert stats.kills_in_flight >= 1, stats
    assert stats.effects_rolled_back >= 1, f"no kill landed mid-node: {stats}"


async def test_a_sleep_outlives_every_worker_and_completes_once_after_its_wake_time(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _prepare(pool)
    async with composite_app.build_engine(db.dsn) as engine, pool.acquire() as conn:
        with fleet(db.dsn, tmp_path, concurrency=2) as f:
            first = [f.spawn(), f.spawn()]
            await f.wait_ready(*first)
            run_id = await engine.start("csleep")

            deadline = time.monotonic() + 10
            while True:
                parked = await conn.fetchrow(
                    "SELECT r.status, r.wake_at, j.run_at AS job_at, clock_timestamp() AS now "
                    "FROM durable.runs r LEFT JOIN durable.jobs j ON j.run_id = r.id "
                    "WHERE r.id = $1",
                    run_id,
                )
                if parked["status"] == "waiting":
                    break
                assert time.monotonic() < deadline, "the run never parked"
                await asyncio.sleep(0.01)
            wake_at = parked["wake_at"]
            assert parked["job_at"] == wake_at
            assert wake_at > parked["now"]

            # Every worker goes away right after the run parks.
            first[0].kill()
            assert f.stop_gracefully([first[1]]) == [0]
            assert all(w.proc.poll() is not None for w in first)

            # The wake time passes with no worker at all.
            deadline = time.monotonic() + 10
            while not await conn.fetchval("SELECT now() > $1::timestamptz", wake_at):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert await conn.fetchval("SELECT status FROM durable.runs WHERE id = $1", run_id) == (
                "waiting"
            )

            started_at = await conn.fetchval("SELECT clock_timestamp()")
            late = f.spawn()
            await f.wait_ready(late)
            result = await engine.wait(run_id, timeout=15)
            assert f.stop_gracefully([late]) == [0]

        run = await engine.get_run(run_id, journal=True)
        effects = await conn.fetch("SELECT run_id, what FROM effects")
        jobs = await conn.fetchval("SELECT count(*) FROM durable.jobs")

    assert result == {"nap": None, "after": "awake"}
    assert [(e.key, e.status) for e in run.journal] == [
        ("nap", "completed"),
        ("after", "completed"),
    ]
    nap = run.journal[0]
    assert nap.finished_at >= wake_at
    assert nap.finished_at >= started_at  # only the late worker could finish it
    assert (nap.finished_at - started_at).total_seconds() < 10
    assert [tuple(e) for e in effects] == [(run_id, "after")]
    assert jobs == 0


PARKED = 1000
QUICK = 100


async def test_parked_runs_hold_no_worker_slots(db: Any) -> None:
    on_signal = durable.Workflow("parked_signal")
    on_signal.wait_for_signal("w", "never")
    on_sleep = durable.Workflow("parked_sleep")
    on_sleep.sleep("nap", 3600)
    quick = durable.Workflow("quick")

    @quick.step
    async def only(ctx: durable.Context) -> int:
        return int(ctx.input["i"])

    async with durable.Engine(db.dsn, workflows=[on_signal, on_sleep, quick]) as engine:
        async with engine.pool.acquire() as conn, conn.transaction():
            for i in range(PARKED):
                await engine.start(on_signal if i % 2 else on_sleep, {"i": i}, conn=conn)

        async with engine.worker(concurrency=4, poll_interval=0.2):
            deadline = time.monotonic() + 30
            async with engine.pool.acquire() as conn:
                while (
                    await conn.fetchval(
                        "SELECT count(*) FROM durable.runs WHERE status = 'waiting'"
                    )
                    < PARKED
                ):
                    assert time.monotonic() < deadline, "runs did not park in time"
                    await asyncio.sleep(0.05)

            t0 = time.monotonic()
            quick_ids = [await engine.start(quick, {"i": i}) for i in range(QUICK)]
            async with engine.pool.acquire() as conn:
                while (
                    await conn.fetchval(
                        "SELECT count(*) FROM durable.runs WHERE workflow = 'quick' "
                        "AND status = 'completed'"
                    )
                    < QUICK
                ):
                    # A deadline, not a speed: parked runs holding the 4 slots would starve
                    # the quick runs for good.
                    assert time.monotonic() - t0 < 60, "quick runs starved by parked runs"
                    await asyncio.sleep(0.02)
            elapsed = time.monotonic() - t0

        async with engine.pool.acquire() as conn:
            statuses = await conn.fetch(
                "SELECT workflow, status, count(*) AS n FROM durable.runs GROUP BY 1, 2"
            )
            jobs = await conn.fetch(
                "SELECT split_part(queue, '@', 1) AS workflow, count(*) AS n, "
                "bool_and(run_at > now()) AS future FROM durable.jobs GROUP BY 1"
            )
        results = [(await engine.get_run(r)).result for r in quick_ids[:3]]

    print(f"\nparked: {QUICK} quick runs completed in {elapsed:.2f} s beside {PARKED} parked")
    assert {(r["workflow"], r["status"]): r["n"] for r in statuses} == {
        ("parked_signal", "waiting"): PARKED // 2,
        ("parked_sleep", "waiting"): PARKED // 2,
        ("quick", "completed"): QUICK,
    }
    # Signal waits keep no job; sleeps keep one delayed job each, none of them due.
    assert {r["workflow"]: (r["n"], r["future"]) for r in jobs} == {
        "parked_sleep": (PARKED // 2, True)
    }
    assert results == [{"only": i} for i in range(3)]
