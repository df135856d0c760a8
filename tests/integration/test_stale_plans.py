"""Plans cached while the tables looked empty do not make every job scan the history.

A fresh install, or `VACUUM ANALYZE` after `durable purge`, records the journal and runs
tables as empty. Plans the runtime's functions cache per session then chose sequential
scans, so each drained job scanned the whole journal (two scans per job, cost growing with
the table) until autovacuum next analyzed it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

import durable

RUNS = 300
HISTORY = ("journal", "runs", "attempts", "signals")


async def noop(ctx: durable.Context) -> None:
    return None


async def seq_scans(conn: asyncpg.Connection) -> dict[str, int]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT relname, seq_scan FROM pg_stat_user_tables"
        " WHERE schemaname = 'durable' AND relname = ANY($1::text[])",
        list(HISTORY),
    )
    return {r["relname"]: r["seq_scan"] for r in rows}


async def test_a_drain_after_vacuum_analyze_of_empty_tables_scans_no_history(db: Any) -> None:
    wf = durable.Workflow("drained").step("one", noop).step("two", noop)
    conn = await asyncpg.connect(db.dsn)
    try:
        for table in HISTORY:
            await conn.execute(f"VACUUM ANALYZE durable.{table}")
        before = await seq_scans(conn)
        async with durable.Engine(db.dsn, workflows=[wf]) as engine:
            ids = [await engine.start(wf) for _ in range(RUNS)]
            async with engine.worker(concurrency=4):
                for run_id in ids:
                    await engine.wait(run_id, timeout=60)
        # The engine's sessions have ended, so their counters are flushed.
        after = await seq_scans(conn)
    finally:
        await conn.close()
    scans = {t: after[t] - before[t] for t in HISTORY}
    # A handful for the engine's own start-up queries; not one (or two) per job.
    assert all(n < RUNS // 10 for n in scans.values()), scans


async def test_no_runtime_function_that_disables_seq_scans_can_be_jit_compiled(db: Any) -> None:
    """With seq scans disabled, a scan of a table without a usable index looks so costly
    that PostgreSQL JIT-compiles the statement (150 ms per call, measured on a start)."""
    conn = await asyncpg.connect(db.dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, p.proconfig FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'durable'"
        )
    finally:
        await conn.close()
    seqscan_off = {r["proname"]: r["proconfig"] for r in rows if r["proconfig"]}
    assert "claim_v1" in seqscan_off
    assert "start_run_v1" in seqscan_off
    for name, config in seqscan_off.items():
        if "enable_seqscan=off" in config:
            assert "jit=off" in config, name
