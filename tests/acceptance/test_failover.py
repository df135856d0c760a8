"""Acceptance: the primary dies mid-run, the synchronous standby is promoted, nothing is lost.

A primary and a synchronous streaming standby on loopback (`tests/cluster.py`: `initdb`,
`pg_basebackup -R`, `pg_ctl`). One worker process (`workflow_worker_proc.py`) and this
test's client both connect through the multi-host DSN
`postgresql://127.0.0.1:P1,127.0.0.1:P2/app?target_session_attrs=read-write`. The client
starts 200 `handover` runs (two steps, a signal wait, two steps; each step inserts an
effect row through `ctx.conn`) and signals each one, retrying a call that fails with the
same idempotency key or signal dedupe key. Midway, with steps in flight and the client
mid-stream, the primary is crashed (`pg_ctl stop -m immediate`) and the standby promoted
(`pg_ctl promote`).

Then, on the new primary: every run acknowledged before the crash is there, every run
completes exactly once with each of its four effects written once, no run or job is left
behind, the same worker process did the work after the failover (never restarted), and
`wait()` calls made before the crash return the runs' results.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflows_app

import durable
from durable.db import CONNECTION_ERRORS
from tests.cluster import SKIP_REASON, Cluster, replication_bin_dir

BIN = replication_bin_dir()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(BIN is None, reason=SKIP_REASON)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER_SCRIPT = HERE / "workflow_worker_proc.py"
WORKER_APP = "failover-worker"

RUNS = 200
STEPS = workflows_app.HANDOVER_STEPS
LANES = 4  # concurrent client calls
SIGNAL_LAG = 3  # a lane signals a run after starting three more
CONCURRENCY = 4
# The crash comes once this many runs are acknowledged and this many effects committed.
KILL_AT_RUNS = 70
GATE_AT = 100
KILL_AT_EFFECTS = 120
OUTAGE = 0.5  # seconds with no primary at all before the standby is promoted
DEADLINE = 90.0

T = TypeVar("T")


@dataclass
class Client:
    """Starts and signals the runs, retrying each call that fails on a lost database."""

    engine: durable.Engine
    # Starts past GATE_AT wait for the crash to be under way: the client cannot finish first.
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: dict[int, str] = field(default_factory=dict)  # acknowledged: i -> run id
    signalled: set[str] = field(default_factory=set)
    retries: int = 0
    stalled: float = 0.0  # the longest a single call took, retries included

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        began = time.monotonic()
        while True:
            try:
                result = await call()
            except (durable.DatabaseUnavailable, *CONNECTION_ERRORS):
                self.retries += 1
                await asyncio.sleep(0.1)
                continue
            self.stalled = max(self.stalled, time.monotonic() - began)
            return result

    async def _signal(self, i: int) -> None:
        run_id = self.started[i]
        assert await self._retrying(
            lambda: self.engine.signal(run_id, "go", {"i": i}, dedupe_key=f"go-{i}")
        )
        self.signalled.add(run_id)

    async def run(self) -> None:
        """Start and signal every run from `LANES` concurrent callers (a web app's requests).

        Each lane signals its own runs `SIGNAL_LAG` starts late, so that some signals find
        the run waiting and some are buffered before it gets there.
        """

        async def lane(indices: list[int]) -> None:
            for n, i in enumerate(indices):
                if i >= GATE_AT:
                    await self.gate.wait()
                self.started[i] = await self._retrying(
                    lambda i=i: self.engine.start("handover", {"i": i}, idempotency_key=f"h-{i}")
                )
                if n >= SIGNAL_LAG:
                    await self._signal(indices[n - SIGNAL_LAG])
            for i in indices[-SIGNAL_LAG:]:
                await self._signal(i)

        await asyncio.gather(*(lane(list(range(k, RUNS, LANES))) for k in range(LANES)))


def _spawn_worker(dsn: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    env = {
        **os.environ,
        workflows_app.DSN_ENV: dsn,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
    }
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), "--concurrency", str(CONCURRENCY)],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
    return proc, out, err


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_failover_to_a_synchronous_standby_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    assert BIN is not None
    with Cluster(BIN, synchronous=True) as cluster:
        await cluster.wait_streaming()
        admin = await asyncpg.connect(cluster.single(cluster.primary))
        try:
            await admin.execute("CREATE DATABASE app")
        finally:
            await admin.close()
        dsn = cluster.dsn("app")
        setup = await asyncpg.connect(dsn)
        try:
            await setup.execute(workflows_app.TABLES_SQL)
        finally:
            await setup.close()

        worker, out, err = _spawn_worker(cluster.dsn("app", application_name=WORKER_APP), tmp_path)
        try:
            engine = workflows_app.build_engine(dsn)
            async with engine:
                await _until(
                    lambda: asyncio.to_thread(_ready, worker, out, err),
                    60,
                    "the worker process to be ready",
                )
                watch = await asyncpg.connect(cluster.single(cluster.primary, "app"))
                client = Client(engine)
                client_task = asyncio.create_task(client.run())
                began = time.monotonic()

                async def due_for_the_crash() -> bool:
                    if client_task.done():
                        client_task.result()
                        raise AssertionError("the client finished before the crash")
                    effects = await watch.fetchval("SELECT count(*) FROM effects")
                    return len(client.started) >= KILL_AT_RUNS and effects >= KILL_AT_EFFECTS

                await _until(due_for_the_crash, 60, "runs and effects before the crash")
                # wait() calls in flight across the failover, on runs not finished yet.
                unfinished = [
                    r["id"]
                    for r in await watch.fetch(
                        "SELECT id FROM durable.runs WHERE finished_at IS NULL ORDER BY id LIMIT 5"
                    )
                ]
                waiters = [
                    asyncio.create_task(engine.wait(run_id, timeout=DEADLINE))
                    for run_id in unfinished
                ]

                async def watched() -> bool:
                    n: int = await watch.fetchval(
                        "SELECT count(*) FROM durable.runs WHERE id = ANY($1::text[]) "
                        "AND (watched OR finished_at IS NOT NULL)",
                        unfinished,
                    )
                    return n == len(unfinished)

                await _until(watched, 30, "the waiters to begin")  # listening, and watching
                in_flight = await watch.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
                    "AND backend_xid IS NOT NULL",
                    WORKER_APP,
                )
                acknowledged = dict(client.started)
                signalled = set(client.signalled)
                effects_before = await watch.fetchval("SELECT count(*) FROM effects")
                await watch.close()

                client.gate.set()  # the rest of the client's calls meet the crash
                crashed = time.monotonic()
                cluster.primary.stop("immediate")
                await asyncio.sleep(OUTAGE)
                cluster.standby.promote()
                promoted = time.monotonic()

                new = await asyncpg.connect(cluster.single(cluster.standby, "app"))
                try:
                    assert not await new.fetchval("SELECT pg_is_in_recovery()")
                    # Synchronous replication: everything acknowledged is on the standby.
                    there = await new.fetch(
                        "SELECT id FROM durable.runs WHERE id = ANY($1::text[])",
                        list(acknowledged.values()),
                    )
                    assert len(there) == len(acknowledged), "acknowledged runs were lost"

                    await asyncio.wait_for(client_task, DEADLINE)
                    client_done = time.monotonic()

                    async def all_completed() -> bool:
                        assert worker.poll() is None, f"worker exited: {err.read_text()[-3000:]}"
                        n: int = await new.fetchval(
                            "SELECT count(*) FROM durable.runs WHERE status = 'completed'"
                        )
                        return n == RUNS

                    await _until(all_completed, DEADLINE, "every run to complete")
                    done = time.monotonic()
                    results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
                    await _check(new, client, acknowledged)
                    effects_after = await new.fetchval("SELECT count(*) FROM effects")
                finally:
                    await new.close()

            for run_id, result in zip(unfinished, results, strict=True):
                assert set(result) == {*STEPS, "go"}, (run_id, result)

            # The same process did the rest of the work: it recovered without a restart.
            assert worker.poll() is None, "the worker process did not survive the failover"
            assert effects_after - effects_before > 0
            worker.terminate()
            assert worker.wait(timeout=30) == 0, err.read_text()[-3000:]
            log = err.read_text()
            assert "database unavailable" in log, log[-3000:]
            assert "database reachable again" in log, log[-3000:]
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    print(
        f"\nfailover: {RUNS} runs; crash {crashed - began:.1f} s in, after "
        f"{len(acknowledged)} acknowledged starts, "
        f"{len(signalled)} signals and {effects_before} effects, with {in_flight} worker "
        f"transactions open; promoted {promoted - crashed:.1f} s after the crash; all "
        f"complete {done - promoted:.1f} s after the promotion (the client's last call "
        f"{client_done - promoted:.1f} s after); client retried "
        f"{client.retries} calls, longest call {client.stalled:.1f} s"
    )


def _ready(worker: subprocess.Popen[bytes], out: Path, err: Path) -> bool:
    if worker.poll() is not None:
        raise AssertionError(f"worker exited early: {err.read_text()[-3000:]}")
    return "ready" in out.read_text()


async def _check(conn: asyncpg.Connection, client: Client, acknowledged: dict[int, str]) -> None:
    """Exactly once, on the new primary: runs, effects, journal; nothing left behind."""
    runs = await conn.fetch("SELECT id, idempotency_key, status FROM durable.runs")
    assert len(runs) == RUNS
    by_key = {r["idempotency_key"]: r["id"] for r in runs}
    assert set(by_key) == {f"h-{i}" for i in range(RUNS)}
    for i, run_id in acknowledged.items():
        assert by_key[f"h-{i}"] == run_id
    assert {r["id"] for r in runs} == set(client.started.values()) == client.signalled

    dupes = await conn.fetch(
        "SELECT run_id, step, count(*) FROM effects GROUP BY 1, 2 HAVING count(*) <> 1"
    )
    assert [tuple(r) for r in dupes] == [], "an effect was written twice"
    assert await conn.fetchval("SELECT count(*) FROM effects") == RUNS * len(STEPS)
    missing = await conn.fetchval(
        "SELECT count(*) FROM durable.runs r CROSS JOIN unnest($1::text[]) AS s(step) "
        "WHERE NOT EXISTS (SELECT FROM effects e WHERE e.run_id = r.id AND e.step = s.step)",
        list(STEPS),
    )
    assert missing == 0
    journal = await conn.fetch(
        "SELECT key, count(*) FROM durable.journal WHERE status = 'completed' GROUP BY 1"
    )
    assert {r["key"]: r["count"] for r in journal} == dict.fromkeys((*STEPS, "go"), RUNS)
    assert await conn.fetchval("SELECT count(*) FROM durable.jobs") == 0
    # A signal retried after a lost connection is recorded once (its dedupe key).
    signals = await conn.fetch(
        "SELECT run_id, count(*) AS n, bool_and(consumed_at IS NOT NULL) AS consumed "
        "FROM durable.signals GROUP BY 1"
    )
    assert len(signals) == RUNS
    assert all(r["n"] == 1 and r["consumed"] for r in signals), [
        dict(r) for r in signals if r["n"] != 1 or not r["consumed"]
    ]
