"""`Engine(read_dsn=...)` and `durable runs --read-dsn`: listings read a streaming standby.

A primary and a synchronous streaming standby (`tests/cluster.py`). The primary logs every
statement (`log_statement=all`), so the test can tell which statements reached it; the
standby's `pg_stat_activity` shows which connection ran what. The standby's replay is
paused to make it lag on purpose: a run started then is not on the replica yet, while
`wait()`, which reads the primary, still sees it finish.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import durable
from durable.web import data
from tests.cluster import SKIP_REASON, Cluster, replication_bin_dir

BIN = replication_bin_dir()
pytestmark = pytest.mark.skipif(BIN is None, reason=SKIP_REASON)

REPO = Path(__file__).resolve().parents[2]
READS_APP = "durable-reads"

replica_wf = durable.Workflow("replica_demo")


@replica_wf.step
async def only(ctx: durable.Context) -> dict[str, Any]:
    return {"n": ctx.input["n"]}


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "durable.cli", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _log(path: Path, start: int = 0) -> str:
    """A server log from byte `start`, each statement's text as sent (the log indents the
    lines of a statement after its first)."""
    with path.open("rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace").replace("\n\t", "\n")


async def _seen_active(engine: durable.Engine, standby: asyncpg.Connection, sql: str) -> None:
    """Call list_runs in a few loops until the standby's pg_stat_activity shows the read
    pool running it (a pooled connection shows its reset query once idle)."""
    seen = asyncio.Event()

    async def reads() -> None:
        while not seen.is_set():
            await engine.list_runs()

    async def sample() -> None:
        while not await standby.fetchval(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name = $1 "
            "AND state = 'active' AND query = $2)",
            READS_APP,
            sql,
        ):
            pass
        seen.set()

    async with asyncio.timeout(30):
        await asyncio.gather(sample(), *(reads() for _ in range(4)))


LOGGED = {"log_statement": "all", "log_min_messages": "warning", "log_line_prefix": "%a@"}


async def test_listings_read_the_standby_and_wait_reads_the_primary() -> None:
    assert BIN is not None
    with Cluster(BIN, primary_settings=LOGGED, standby_settings=LOGGED) as cluster:
        await cluster.wait_streaming()
        admin = await asyncpg.connect(cluster.single(cluster.primary))
        try:
            await admin.execute("CREATE DATABASE app")
        finally:
            await admin.close()
        await cluster.wait_replayed(
            "postgres", "SELECT EXISTS (SELECT FROM pg_database WHERE datname = 'app')"
        )
        primary_dsn = cluster.single(cluster.primary, "app")
        read_dsn = cluster.single(cluster.standby, "app", application_name=READS_APP)
        primary_log = cluster.primary.data_dir / "server.log"
        standby_log = cluster.standby.data_dir / "server.log"
        engine = durable.Engine(primary_dsn, read_dsn=read_dsn, workflows=[replica_wf])
        list_sql = engine.queries["list_runs"]
        get_sql = engine.queries["get_run"]
        async with engine, engine.worker(concurrency=2):
            standby = await asyncpg.connect(cluster.single(cluster.standby, "app"))
            try:
                first = await engine.start(replica_wf, {"n": 1})
                assert await engine.wait(first, timeout=30) == {"only": {"n": 1}}
                await cluster.wait_replayed(
                    "app",
                    f"SELECT EXISTS (SELECT FROM durable.runs WHERE id = '{first}' "
                    "AND status = 'completed')",
                )

                # Listings and get_run: on the standby's read pool, never on the primary.
                logged = primary_log.stat().st_size
                runs = await engine.list_runs()
                assert [r.id for r in runs] == [first]
                run = await engine.get_run(first, journal=True)
                assert run.status is durable.RunStatus.COMPLETED
                assert run.result == {"only": {"n": 1}}
                assert [e.key for e in run.journal] == ["only"]
                primary_text = _log(primary_log)
                assert engine.queries["start_run"] in primary_text  # the log does log
                assert list_sql not in primary_text, "list_runs reached the primary"
                # (wait() read the run on the primary before: it must.)
                assert get_sql not in _log(primary_log, logged), "get_run reached the primary"
                assert READS_APP not in primary_text
                standby_text = _log(standby_log)
                assert f"{READS_APP}@LOG:  execute" in standby_text
                for sql in (list_sql, get_sql, engine.queries["get_journal"]):
                    assert sql in standby_text
                await _seen_active(engine, standby, list_sql)
                on_primary = await engine.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    READS_APP,
                )
                assert on_primary == 0

                # Lag: with the standby's replay paused, a new run is not on the replica
                # yet, but wait() reads the primary and sees it finish.
                await standby.execute("SELECT pg_wal_replay_pause()")
                second = await engine.start(replica_wf, {"n": 2})
                with pytest.raises(durable.RunNotFound):
                    await engine.get_run(second)
                assert [r.id for r in await engine.list_runs()] == [first]
                assert await engine.wait(second, timeout=30) == {"only": {"n": 2}}
                with pytest.raises(durable.RunNotFound):
                    await engine.get_run(second)

                # The CLI: --read-dsn (or $DURABLE_READ_DSN) lists from the lagging
                # replica, --dsn alone from the primary.
                listed = await asyncio.to_thread(
                    _cli, "runs", "list", "--dsn", primary_dsn, "--read-dsn", read_dsn
                )
                assert [r["id"] for r in listed] == [first]
                listed = await asyncio.to_thread(
                    _cli, "runs", "list", "--dsn", primary_dsn, env={"DURABLE_READ_DSN": read_dsn}
                )
                assert [r["id"] for r in listed] == [first]
                shown = await asyncio.to_thread(_cli, "runs", "show", first, "--read-dsn", read_dsn)
                assert shown["id"] == first
                assert list_sql not in _log(primary_log)
                listed = await asyncio.to_thread(_cli, "runs", "list", "--dsn", primary_dsn)
                assert [r["id"] for r in listed] == [second, first]
                assert list_sql in _log(primary_log)

                # get_run(primary=True): what the dashboard reads after an action.
                assert (await engine.get_run(second, primary=True)).result == {"only": {"n": 2}}

                # The dashboard's and admin API's reads go to the replica too.
                logged = primary_log.stat().st_size
                detail = await data.run_detail(engine, first)
                assert detail["id"] == first
                assert detail["mailbox"] == []
                assert [w["name"] for w in await data.workflows(engine)] == ["replica_demo"]
                assert len(await data.workers(engine)) == 1  # the primary's (UNLOGGED) registry
                await data.queues(engine)
                seen_by_primary = _log(primary_log, logged)
                for name in ("run_mailbox", "run_relatives", "workflow_counts", "queue_stats"):
                    sql = engine.queries[name]
                    assert sql in _log(standby_log), name
                    assert sql not in seen_by_primary, f"{name} reached the primary"

                await standby.execute("SELECT pg_wal_replay_resume()")
                await cluster.wait_replayed(
                    "app",
                    f"SELECT EXISTS (SELECT FROM durable.runs WHERE id = '{second}' "
                    "AND status = 'completed')",
                )
                assert (await engine.get_run(second)).result == {"only": {"n": 2}}
            finally:
                await standby.close()
