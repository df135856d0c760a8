"""Acceptance: real worker processes killed with SIGKILL lose nothing and repeat nothing.

Each test runs `workflow_worker_proc.py` subprocesses against a fresh database. A chaos
loop kills a random worker every 0.2-0.6 s (only workers that are up and claiming) and
starts a replacement, until every run is terminal. Each worker connects with its own
`application_name`, so just before a kill the test can see in `pg_stat_activity` how many
of the victim's transactions hold an xid, i.e. had claimed a job or written an effect:
those are the kills that land mid-step. The chaos tests run twice: on the workers'
defaults, and with batches of up to 16 jobs committed together (a window of 1 s, longer
than the steps' jitter), where a kill counts as mid-batch when one of the victim's
backends holds the claim locks of several runs (one shared advisory lock per claimed run)
just before it.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflows_app

import durable

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER_SCRIPT = HERE / "workflow_worker_proc.py"
REPO = HERE.parent.parent

RUNS = 200
WORKERS = 2
# Slots per worker in the chaos tests. With 8 (the script's default) the 1000 steps finish
# in about 1.5 s and only 2-3 kills land; with 4 the work lasts long enough for ~10 kills.
CHAOS_CONCURRENCY = 4
CHAOS_DEADLINE = 180.0
READY_TIMEOUT = 30.0
# Worker options of the batched chaos runs: a window longer than the steps' jitter, so
# that each slot's batches grow to 16 jobs and a kill lands while several are in flight.
BATCHED = ("--batch-size", "16", "--batch-window", "1.0")
STOP_TIMEOUT = 20.0
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

    @property
    def pid(self) -> int:
        return self.proc.pid

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
    """Starts, kills and stops worker subprocesses; always clean up with `close()`."""

    def __init__(
        self,
        dsn: str,
        tmp_path: Path,
        *,
        lease_seconds: float = 30.0,
        concurrency: int = 8,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.dsn = dsn
        self.args = args
        self.env = env or {}
        self.concurrency = concurrency
        self.tmp_path = tmp_path
        self.lease_seconds = lease_seconds
        self.spawned = 0
        self.all: list[WorkerProc] = []

    def spawn(self) -> WorkerProc:
        self.spawned += 1
        name = f"crashw{self.spawned}"
        out = self.tmp_path / f"{name}.out"
        err = self.tmp_path / f"{name}.err"
        env = {
            **os.environ,
            workflows_app.DSN_ENV: _with_app_name(self.dsn, name),
            workflows_app.LEASE_ENV: str(self.lease_seconds),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER_SCRIPT),
                    "--concurrency",
                    str(self.concurrency),
                    *self.args,
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
    transactions_killed: int = 0
    seconds: float = 0.0
    effects_rolled_back: int = 0
    kills_mid_batch: int = 0
    most_runs_in_a_killed_batch: int = 0


async def _busy_transactions(conn: asyncpg.Connection, app_name: str) -> int:
    """Transactions of one worker that hold an xid: a claimed job or an uncommitted write."""
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
        "AND backend_xid IS NOT NULL",
        app_name,
    )
    return n


async def _largest_batch(conn: asyncpg.Connection, app_name: str) -> int:
    """The most runs one transaction of a worker holds claimed: a claim takes the run's
    advisory lock (shared) for its transaction, so several on one backend are a batch."""
    n: int | None = await conn.fetchval(
        "SELECT max(n) FROM (SELECT l.pid, count(*) AS n FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.granted "
        "GROUP BY l.pid) AS per_backend",
        app_name,
    )
    return n or 0


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
                "SELECT status, current_node, count(*) FROM durable.runs "
                "WHERE status <> ALL($1::text[]) GROUP BY 1, 2",
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
        if not ready:
            continue
        i = rng.choice(ready)
        victim = live[i]
        busy = await _busy_transactions(conn, victim.app_name)
        batch = await _largest_batch(conn, victim.app_name)
        victim.kill()
        if batch > 1:
            stats.kills_mid_batch += 1
            stats.most_runs_in_a_killed_batch = max(stats.most_runs_in_a_killed_batch, batch)
        stats.kills += 1
        stats.transactions_killed += busy
        if busy:
            stats.kills_in_flight += 1
        live[i] = f.spawn()
    stats.seconds = time.monotonic() - t0
    await f.wait_ready(*live)  # a worker still booting has no SIGTERM handler yet
    codes = f.stop_gracefully(live)
    assert codes == [0] * len(live), f"graceful stop exit codes: {codes}"
    return stats


async def _start_runs(engine: durable.Engine, workflow: str) -> list[str]:
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> str:
        async with sem:
            return await engine.start(workflow, {"i": i})

    return list(await asyncio.gather(*(one(i) for i in range(RUNS))))


async def _prepare(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(workflows_app.TABLES_SQL)


async def _rolled_back_effects(conn: asyncpg.Connection) -> int:
    """Effect inserts that never committed: the sequence counts every attempt."""
    attempted: int = await conn.fetchval(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM effects_id_seq"
    )
    committed: int = await conn.fetchval("SELECT count(*) FROM effects")
    return attempted - committed


def _report(name: str, stats: ChaosStats) -> None:
    print(
        f"\n{name}: {RUNS} runs, {WORKERS} workers x {CHAOS_CONCURRENCY} slots, "
        f"{stats.seconds:.1f} s, {stats.kills} SIGKILLs, {stats.kills_in_flight} with work "
        f"in flight, {stats.transactions_killed} open transactions killed, "
        f"{stats.effects_rolled_back} effect inserts rolled back by kills, "
        f"{stats.kills_mid_batch} kills mid-batch (at most "
        f"{stats.most_runs_in_a_killed_batch} runs in one killed batch)"
    )


@pytest.mark.parametrize("batched", [False, True], ids=["defaults", "batched"])
async def test_crash5_sigkill_chaos_commits_every_step_exactly_once(
    db: Any, pool: asyncpg.Pool, tmp_path: Path, batched: bool
) -> None:
    dsn: str = db.dsn
    await _prepare(pool)
    async with workflows_app.build_engine(dsn) as engine:
        run_ids = await _start_runs(engine, "crash5")
        with fleet(
            dsn, tmp_path, concurrency=CHAOS_CONCURRENCY, args=BATCHED if batched else ()
        ) as f:
            async with pool.acquire() as conn:
                stats = await run_chaos(f, conn)
                stats.effects_rolled_back = await _rolled_back_effects(conn)
    _report("crash5 batched" if batched else "crash5", stats)

    async with pool.acquire() as conn:
        dupes = await conn.fetch(
            "SELECT run_id, step, count(*) FROM effects GROUP BY 1, 2 HAVING count(*) <> 1"
        )
        assert [tuple(r) for r in dupes] == []
        assert await conn.fetchval("SELECT count(*) FROM effects") == RUNS * 5
        missing = await conn.fetchval(
            "SELECT count(*) FROM unnest($1::text[]) AS r(id) CROSS JOIN unnest($2::text[]) "
            "AS s(step) WHERE NOT EXISTS (SELECT 1 FROM effects e "
            "WHERE e.run_id = r.id AND e.step = s.step)",
            run_ids,
            list(workflows_app.STEPS),
        )
        assert missing == 0
        statuses = await conn.fetch("SELECT status, count(*) FROM durable.runs GROUP BY 1")
        assert {r["status"]: r["count"] for r in statuses} == {"completed": RUNS}
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0
        journal = await conn.fetch(
            "SELECT key, count(*) FROM durable.journal WHERE status = 'completed' GROUP BY 1"
        )
        assert {r["key"]: r["count"] for r in journal} == dict.fromkeys(workflows_app.STEPS, RUNS)
    run = await _get_run(dsn, run_ids[0])
    assert set(run.result) == set(workflows_app.STEPS)

    assert stats.kills_in_flight >= 3, f"too few kills landed on work in flight: {stats}"
    assert stats.effects_rolled_back >= 3, f"too few kills landed mid-step: {stats}"
    if batched:
        assert stats.kills_mid_batch >= 3, f"too few kills landed mid-batch: {stats}"


@pytest.mark.parametrize("batched", [False, True], ids=["defaults", "batched"])
async def test_crash5fail_sigkill_chaos_compensates_every_run_exactly_once(
    db: Any, pool: asyncpg.Pool, tmp_path: Path, batched: bool
) -> None:
    dsn: str = db.dsn
    await _prepare(pool)
    async with workflows_app.build_engine(dsn) as engine:
        run_ids = await _start_runs(engine, "crash5fail")
        with fleet(
            dsn, tmp_path, concurrency=CHAOS_CONCURRENCY, args=BATCHED if batched else ()
        ) as f:
            async with pool.acquire() as conn:
                stats = await run_chaos(f, conn)
                # Every run's s4 inserts once and rolls back by design.
                stats.effects_rolled_back = await _rolled_back_effects(conn) - RUNS
    _report("crash5fail batched" if batched else "crash5fail", stats)

    compensated = workflows_app.COMPENSATED
    async with pool.acquire() as conn:
        runs = await conn.fetch("SELECT id, status, error FROM durable.runs")
        assert len(runs) == RUNS
        bad = [
            tuple(r) for r in runs if r["status"] != "failed" or "NonRetryable" not in r["error"]
        ]
        assert bad == []

        dupes = await conn.fetch(
            "SELECT run_id, step, count(*) FROM effects GROUP BY 1, 2 HAVING count(*) <> 1"
        )
        assert [tuple(r) for r in dupes] == []
        per_step = await conn.fetch("SELECT step, count(*) FROM effects GROUP BY 1")
        assert {r["step"]: r["count"] for r in per_step} == dict.fromkeys(compensated, RUNS)

        comp_dupes = await conn.fetch(
            "SELECT run_id, step, count(*) FROM comp_effects GROUP BY 1, 2 HAVING count(*) <> 1"
        )
        assert [tuple(r) for r in comp_dupes] == []
        comp_per_step = await conn.fetch("SELECT step, count(*) FROM comp_effects GROUP BY 1")
        assert {r["step"]: r["count"] for r in comp_per_step} == {
            f"{s}@compensate": RUNS for s in compensated
        }

        rows = await conn.fetch(
            "SELECT run_id, key, status FROM durable.journal ORDER BY run_id, seq"
        )
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0

    journals: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        journals[r["run_id"]].append((r["key"], r["status"]))
    assert set(journals) == set(run_ids)
    expected = (
        [(s, "completed") for s in compensated]
        + [(workflows_app.FAILING, "failed")]
        + [(f"{s}@compensate", "completed") for s in reversed(compensated)]
    )
    wrong = {rid: j for rid, j in journals.items() if j != expected}
    assert wrong == {}, (
        f"{len(wrong)} runs journaled out of order, e.g. {next(iter(wrong.items()))}"
    )

    run = await _get_run(dsn, run_ids[0], journal=True)
    assert run.status is durable.RunStatus.FAILED
    done = [e.key for e in run.journal if "@" not in e.key and e.status == "completed"]
    undone = [e.key.split("@")[0] for e in run.journal if e.key.endswith("@compensate")]
    assert undone == list(reversed(done))

    assert stats.kills_in_flight >= 3, f"too few kills landed on work in flight: {stats}"
    assert stats.effects_rolled_back >= 3, f"too few kills landed mid-step: {stats}"
    if batched:
        assert stats.kills_mid_batch >= 3, f"too few kills landed mid-batch: {stats}"


async def test_leased_step_of_a_killed_worker_is_retried_after_the_lease_lapses(
    db: Any, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    dsn: str = db.dsn
    lease_seconds = 2.0
    # Attempt 1 would take far longer than the lease: only heartbeats keep it.
    slow = {workflows_app.LEASE_SLEEP_ENV: "8"}
    await _prepare(pool)
    async with workflows_app.build_engine(dsn, lease_seconds=lease_seconds) as engine:
        with fleet(dsn, tmp_path, lease_seconds=lease_seconds, env=slow) as f:
            workers = [f.spawn(), f.spawn()]
            await f.wait_ready(*workers)
            run_id = await engine.start("lease", {})

            async with pool.acquire() as conn:
                first = await _poll_row(
                    conn,
                    "SELECT pid, started_at FROM lease_attempts WHERE run_id = $1 AND attempt = 1",
                    run_id,
                )
                victim = next(w for w in workers if w.pid == first["pid"])
                survivor = next(w for w in workers if w is not victim)
                # Let the live worker hold the step past its first lease: heartbeats extend
                # it and nobody takes it over while the worker lives.
                await _poll_row(
                    conn,
                    "SELECT 1 WHERE clock_timestamp() > $1::timestamptz + $2 * interval '1 s'",
                    first["started_at"],
                    lease_seconds * 1.25,
                )
                assert await conn.fetchval("SELECT count(*) FROM durable.attempts") == 0
                assert await conn.fetchval("SELECT count(*) FROM lease_attempts") == 1
                victim.kill()
                killed_at = await conn.fetchval("SELECT clock_timestamp()")
                # The lease as the dead worker left it (its last heartbeat).
                job = await conn.fetchrow(
                    "SELECT lease_token, run_at FROM durable.jobs WHERE run_id = $1", run_id
                )
            assert job is not None
            assert job["lease_token"] is not None
            lease_expiry = job["run_at"]
            elapsed = (lease_expiry - first["started_at"]).total_seconds()
            assert elapsed > lease_seconds, "no heartbeat extended the lease"
            assert lease_expiry > killed_at, "the lease had lapsed before the kill"

            result = await engine.wait(run_id, timeout=30)
            survivor.check_alive()
            assert f.stop_gracefully([survivor]) == [0]

        run = await engine.get_run(run_id, journal=True)

    assert run.status is durable.RunStatus.COMPLETED
    assert result == {"work": {"attempt": 2, "pid": survivor.pid}}

    async with pool.acquire() as conn:
        attempts = await conn.fetch(
            "SELECT attempt, pid, started_at FROM lease_attempts WHERE run_id = $1 "
            "ORDER BY attempt",
            run_id,
        )
        assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0
    assert [(a["attempt"], a["pid"]) for a in attempts] == [(1, victim.pid), (2, survivor.pid)]
    retried_at = attempts[1]["started_at"]
    assert retried_at >= lease_expiry, (retried_at, lease_expiry)

    assert len(run.attempts) == 1
    lost = run.attempts[0]
    assert (lost.key, lost.attempt) == ("work", 1)
    assert "WorkerLost" in lost.error, lost.error
    assert "lease lapsed" in lost.error, lost.error
    assert lost.failed_at >= lease_expiry
    assert [(e.key, e.status, e.attempts) for e in run.journal] == [("work", "completed", 2)]
    print(
        f"\nlease: killed {victim.pid} {(lease_expiry - killed_at).total_seconds():.2f} s "
        f"before its lease lapsed; {survivor.pid} retried "
        f"{(retried_at - killed_at).total_seconds():.2f} s after the kill"
    )


async def _poll_row(
    conn: asyncpg.Connection, sql: str, *args: object, timeout: float = 20.0
) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while True:
        row = await conn.fetchrow(sql, *args)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no row after {timeout} s: {sql}"
        await asyncio.sleep(0.02)


async def _get_run(dsn: str, run_id: str, *, journal: bool = False) -> durable.Run:
    async with workflows_app.build_engine(dsn) as engine:
        return await engine.get_run(run_id, journal=journal)
